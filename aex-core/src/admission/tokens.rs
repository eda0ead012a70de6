//! Counting input tokens when the caller did not.
//!
//! Until a real tokenizer is wired in per model family, aex uses an upper bound that holds for
//! every byte-level BPE tokenizer (GPT, Claude, Llama families): a token covers at least one byte,
//! so a text never has more tokens than UTF-8 bytes. Each message adds the role's bytes and a
//! fixed framing overhead of 4 tokens, and the reply is primed with 3, as OpenAI's chat format
//! does. Over-estimating only reserves more; settlement charges the real usage.

use super::Message;

/// Framing tokens per message.
const PER_MESSAGE: i64 = 4;
/// Tokens priming the reply.
const PER_REPLY: i64 = 3;

/// A conservative count of the input tokens `messages` will cost on `model`.
pub fn estimate_input_tokens(_model: &str, messages: &[Message]) -> i64 {
    let body: usize = messages.iter().map(|m| m.role.len() + m.content.len()).sum();
    i64::try_from(body).unwrap_or(i64::MAX).saturating_add(PER_MESSAGE * messages.len() as i64 + PER_REPLY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_counts_bytes_and_framing() {
        assert_eq!(estimate_input_tokens("m", &[]), 3);
        let msgs = [Message::new("user", "héllo")]; // 4 + 6 bytes
        assert_eq!(estimate_input_tokens("m", &msgs), 10 + 4 + 3);
    }
}
