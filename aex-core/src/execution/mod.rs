//! Executions: one guarded call's reservation and its way to exactly one terminal state.
//!
//! ```text
//! RESERVED -> DISPATCHED -> COMMITTED
//!     \            \-------> RELEASED | FAILED
//!      \-------------------> COMMITTED | RELEASED | FAILED
//! ```
//! A refused admission reserves nothing and creates no execution; it is recorded in the ledger as
//! an `admission.denied` event (the `DENIED` outcome), and the same execution id may be used again.

use crate::config::Prices;
use crate::error::{Error, Result};
use crate::settlement::Usage;

/// Longest execution id accepted.
pub const MAX_EXECUTION_ID_LEN: usize = 128;

/// Where an execution stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExecutionState {
    /// Admitted; budget reserved; the call has not been sent.
    Reserved,
    /// The call was handed to the provider.
    Dispatched,
    /// Settled at its real cost (terminal).
    Committed,
    /// Given back without a call (terminal).
    Released,
    /// The call failed; given back (terminal).
    Failed,
}

impl ExecutionState {
    /// The stored name, e.g. `COMMITTED`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ExecutionState::Reserved => "RESERVED",
            ExecutionState::Dispatched => "DISPATCHED",
            ExecutionState::Committed => "COMMITTED",
            ExecutionState::Released => "RELEASED",
            ExecutionState::Failed => "FAILED",
        }
    }

    /// Parses a stored name.
    ///
    /// # Errors
    /// [`Error::Internal`]: the store holds a state this version does not know.
    pub fn parse(s: &str) -> Result<ExecutionState> {
        Ok(match s {
            "RESERVED" => ExecutionState::Reserved,
            "DISPATCHED" => ExecutionState::Dispatched,
            "COMMITTED" => ExecutionState::Committed,
            "RELEASED" => ExecutionState::Released,
            "FAILED" => ExecutionState::Failed,
            other => return Err(Error::Internal(format!("unknown execution state '{other}' in store"))),
        })
    }

    /// Whether the execution still holds a reservation.
    pub const fn is_open(self) -> bool {
        matches!(self, ExecutionState::Reserved | ExecutionState::Dispatched)
    }
}

/// Checks a caller-supplied execution id: 1 to 128 characters of `A-Z a-z 0-9 . _ : -`.
///
/// # Errors
/// [`Error::InvalidRequest`] on field `execution_id`.
pub fn validate_execution_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > MAX_EXECUTION_ID_LEN {
        return Err(Error::invalid("execution_id", format!("must be 1 to {MAX_EXECUTION_ID_LEN} characters")));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')) {
        return Err(Error::invalid("execution_id", "must use only A-Z, a-z, 0-9, '.', '_', ':' and '-'"));
    }
    Ok(())
}

/// One execution as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    /// The execution id (the caller's, or a generated UUIDv7).
    pub id: String,
    /// The agent's store id.
    pub agent_id: i64,
    /// The agent's name at admission.
    pub agent: String,
    /// SHA-256 of the canonical request, for idempotency.
    pub request_hash: [u8; 32],
    /// Current state.
    pub state: ExecutionState,
    /// The model admitted.
    pub model: String,
    /// Input tokens reserved for.
    pub input_tokens: i64,
    /// Output tokens reserved for.
    pub max_output_tokens: i64,
    /// Prices frozen at admission.
    pub prices: Prices,
    /// The reservation, micro-USD.
    pub reserved_micro: i64,
    /// The amount charged, once committed.
    pub cost_micro: Option<i64>,
    /// The usage committed, once committed by the caller.
    pub usage: Option<Usage>,
    /// Why it was released, failed or expired.
    pub reason: Option<String>,
    /// Admission time.
    pub created_at_ms: i64,
    /// When an unsettled reservation expires.
    pub expires_at_ms: i64,
    /// When it was dispatched.
    pub dispatched_at_ms: Option<i64>,
    /// When it reached its terminal state.
    pub settled_at_ms: Option<i64>,
    /// The teams whose budgets reserved too, nearest first.
    pub teams: Vec<i64>,
    /// The rate-window scopes that counted it, space-separated.
    pub rate_scopes: String,
    /// The tokens the rate windows counted at admission.
    pub rate_tokens: i64,
}
