//! What a caller without a valid token can make aex write: a bounded amount.
//!
//! Every other denial names an agent that holds a valid token, and the agent's rate windows and
//! the operator bound how often it comes. A refused token (unknown, malformed, expired, revoked,
//! disabled) is different: anyone can present one in a loop, and recording each as an event let
//! 20,000 attempts add 20,000 events (9 MB) in a third of a second. So refused tokens are recorded
//! per window of [`WINDOW_MS`] and per kernel: the first in a window is written as it comes (an
//! `admission.denied` event like any other, so a lone attempt is in the ledger at once); the rest
//! of that window are counted in memory, and written as one `admission.denied` summary
//! (`data.count`, `data.reasons`, `data.from_ms`, `data.to_ms`, no execution id) in front of the
//! first refusal of a later window, or when the kernel is dropped. A crash loses at most one
//! window's count, never an admission or a charge.
//!
//! Thread-safety: one mutex, held for a few instructions inside the admission transaction.

use std::collections::BTreeMap;

use parking_lot::Mutex;
use serde_json::{Value, json};

/// The length of one window of refused tokens, ms.
pub const WINDOW_MS: i64 = 60_000;

/// The refused tokens of the current window.
#[derive(Debug, Default)]
pub(crate) struct RefusedTokens {
    state: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// When the window's first refusal (the one written in full) came; `None` before any.
    started_ms: Option<i64>,
    /// Refusals after the first, by reason code.
    counted: BTreeMap<&'static str, u64>,
    last_ms: i64,
}

/// What to write for one refusal.
#[derive(Debug, PartialEq)]
pub(crate) struct Record {
    /// The summary of the previous window, to write first.
    pub summary: Option<Value>,
    /// Whether this refusal is written as an event of its own.
    pub write_this: bool,
}

impl RefusedTokens {
    /// Counts one refusal at `now` with `reason` and says what to write.
    pub(crate) fn refuse(&self, now: i64, reason: &'static str) -> Record {
        let mut w = self.state.lock();
        match w.started_ms {
            Some(start) if now.saturating_sub(start) < WINDOW_MS => {
                *w.counted.entry(reason).or_default() += 1;
                w.last_ms = now;
                Record { summary: None, write_this: false }
            }
            _ => {
                let summary = w.take_summary();
                w.started_ms = Some(now);
                w.last_ms = now;
                Record { summary, write_this: true }
            }
        }
    }

    /// The summary of the refusals counted but not yet written, if any.
    pub(crate) fn drain(&self) -> Option<Value> {
        self.state.lock().take_summary()
    }
}

impl Window {
    fn take_summary(&mut self) -> Option<Value> {
        if self.counted.is_empty() {
            return None;
        }
        let counted = std::mem::take(&mut self.counted);
        let count: u64 = counted.values().sum();
        Some(json!({
            "status": 401,
            "reason": "refused_tokens_summary",
            "count": count,
            "reasons": counted,
            "from_ms": self.started_ms,
            "to_ms": self.last_ms,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_each_window_is_written_and_the_rest_summarized() {
        let r = RefusedTokens::default();
        assert_eq!(r.refuse(1_000, "unknown_token"), Record { summary: None, write_this: true });
        assert!(!r.refuse(1_001, "unknown_token").write_this);
        assert!(!r.refuse(1_000 + WINDOW_MS - 1, "token_expired").write_this);
        let next = r.refuse(1_000 + WINDOW_MS, "unknown_token");
        assert!(next.write_this);
        let summary = next.summary.expect("the previous window's summary");
        assert_eq!(summary["count"], 2);
        assert_eq!(summary["reasons"]["unknown_token"], 1);
        assert_eq!(summary["reasons"]["token_expired"], 1);
        assert_eq!((summary["from_ms"].as_i64(), summary["to_ms"].as_i64()), (Some(1_000), Some(1_000 + WINDOW_MS - 1)));
        assert_eq!(r.drain(), None, "nothing counted since");
        assert!(!r.refuse(1_000 + WINDOW_MS + 5, "unknown_token").write_this);
        assert_eq!(r.drain().expect("one counted")["count"], 1);
    }
}
