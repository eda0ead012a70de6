//! Server-sent events, as OpenAI-compatible providers stream them: `data: ...` lines.

/// Splits a byte stream into SSE `data` payloads, across chunk boundaries.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    /// Feeds bytes; returns the complete `data` payloads they finish.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(data) = line.strip_prefix("data:") {
                out.push(data.trim_start().to_string());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_survive_chunk_boundaries() {
        let mut l = Lines::default();
        assert!(l.feed(b"data: {\"a\"").is_empty());
        assert_eq!(l.feed(b":1}\n\nevent: x\ndata: [DONE]\r\n"), ["{\"a\":1}", "[DONE]"]);
    }
}
