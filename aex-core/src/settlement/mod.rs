//! Settlement: every execution reaches exactly one terminal state.
//!
//! * `commit(usage)` charges the real cost, priced with the prices frozen at admission, and gives
//!   back the rest of the reservation. A cost above the reservation is charged too and recorded as
//!   an `execution.overrun` event; it can push spent past budget by that one call, after which the
//!   agent's next admission is denied.
//! * `release(reason)`: the call did not happen; the whole reservation comes back.
//! * `fail(error)`: the call failed; the whole reservation comes back and the failure is recorded.
//!
//! Repeating the terminal call an execution already took returns the recorded result with
//! `replayed = true` (a commit must repeat the same usage). Any other call on a terminal execution
//! is a [`Conflict`](crate::Error::Conflict): `invalid_transition`, or `execution_expired` when
//! the expiry rule settled it first (see [`crate::reconcile`]). An open execution past its TTL is
//! expired before the call is considered, so the outcome never depends on whether someone else
//! happened to look at the agent first.

use serde_json::json;

use crate::budget;
use crate::config::Prices;
use crate::error::{ConflictReason, Error, NotFoundKind, Result};
use crate::execution::{Execution, ExecutionState};
use crate::ledger::{self, ChainHasher, EventKind, NewEvent};
use crate::money;
use crate::reconcile::{self, EXPIRED_REASON};
use crate::store::{Prefetch, Tx};

/// The most tokens one usage field may report: one billion.
pub const MAX_TOKENS: i64 = 1_000_000_000;
/// Longest release reason or failure text kept.
pub const MAX_REASON_LEN: usize = 1024;

/// Tokens a call really used, as the provider reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Usage {
    /// Prompt tokens, including cached ones.
    pub input_tokens: i64,
    /// Completion tokens.
    pub output_tokens: i64,
    /// The part of `input_tokens` served from the provider's cache.
    pub cached_input_tokens: i64,
}

impl Usage {
    /// Usage without cached tokens.
    pub fn new(input_tokens: i64, output_tokens: i64) -> Usage {
        Usage { input_tokens, output_tokens, cached_input_tokens: 0 }
    }

    /// Checks the numbers.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] naming `usage.FIELD` for a negative count, a count over
    /// [`MAX_TOKENS`], or more cached than input tokens.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("usage.input_tokens", self.input_tokens),
            ("usage.output_tokens", self.output_tokens),
            ("usage.cached_input_tokens", self.cached_input_tokens),
        ] {
            if v < 0 {
                return Err(Error::invalid(field, format!("must not be negative, got {v}")));
            }
            if v > MAX_TOKENS {
                return Err(Error::invalid(field, format!("must be at most {MAX_TOKENS}, got {v}")));
            }
        }
        if self.cached_input_tokens > self.input_tokens {
            return Err(Error::invalid("usage.cached_input_tokens", "must not exceed usage.input_tokens"));
        }
        Ok(())
    }

    /// The cost of this usage at `prices`, each part rounded up separately.
    pub fn cost(&self, prices: &Prices) -> i64 {
        let uncached = self.input_tokens - self.cached_input_tokens;
        money::cost(uncached, prices.input)
            + money::cost(self.cached_input_tokens, prices.cached_input.unwrap_or(prices.input))
            + money::cost(self.output_tokens, prices.output)
    }
}

/// The outcome of a terminal call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// The execution.
    pub execution_id: String,
    /// The agent it belongs to.
    pub agent: String,
    /// Its terminal state.
    pub state: ExecutionState,
    /// What admission reserved, micro-USD.
    pub reserved_micro: i64,
    /// What was charged, micro-USD (0 unless committed).
    pub cost_micro: i64,
    /// What went back to the budget: `reserved - cost`, at least 0.
    pub released_micro: i64,
    /// What was charged beyond the reservation, at least 0.
    pub overrun_micro: i64,
    /// The settlement was made by the TTL rule, not by the caller.
    pub expired: bool,
    /// This call repeated an earlier identical one; nothing changed.
    pub replayed: bool,
}

impl Settlement {
    /// The settlement an execution in a terminal state stands for.
    pub fn of(e: &Execution, replayed: bool) -> Settlement {
        let cost = e.cost_micro.unwrap_or(0);
        Settlement {
            execution_id: e.id.clone(),
            agent: e.agent.clone(),
            state: e.state,
            reserved_micro: e.reserved_micro,
            cost_micro: cost,
            released_micro: (e.reserved_micro - cost).max(0),
            overrun_micro: (cost - e.reserved_micro).max(0),
            expired: e.reason.as_deref() == Some(EXPIRED_REASON),
            replayed,
        }
    }
}

/// The terminal call asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Terminal<'a> {
    /// Commit at `usage`; `estimated` when aex counted it because the provider reported none.
    Commit(Usage, bool),
    Release(&'a str),
    Fail(&'a str),
}

impl Terminal<'_> {
    fn state(&self) -> ExecutionState {
        match self {
            Terminal::Commit(..) => ExecutionState::Committed,
            Terminal::Release(_) => ExecutionState::Released,
            Terminal::Fail(_) => ExecutionState::Failed,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        match self {
            Terminal::Commit(u, _) => u.validate(),
            Terminal::Release(t) => check_reason("reason", t),
            Terminal::Fail(t) => check_reason("error", t),
        }
    }
}

fn check_reason(field: &str, text: &str) -> Result<()> {
    if text.len() > MAX_REASON_LEN {
        return Err(Error::invalid(field, format!("must be at most {MAX_REASON_LEN} bytes")));
    }
    // A NUL cannot be stored as text by every store (PostgreSQL refuses it), and a settlement
    // refused by the store would be retried in vain until the TTL rule charged it in full.
    if text.contains('\0') {
        return Err(Error::invalid(field, "must not contain a NUL character"));
    }
    Ok(())
}

/// Loads an execution for a settlement call, applying the expiry rule first if it is due.
fn load(tx: &mut dyn Tx, hasher: &ChainHasher, id: &str, now: i64) -> Result<Execution> {
    let mut e = tx.execution(id)?.ok_or_else(|| Error::NotFound { what: NotFoundKind::Execution, key: id.to_string() })?;
    if e.state.is_open() && e.expires_at_ms <= now {
        reconcile::expire(tx, hasher, &mut e, now)?;
    }
    Ok(e)
}

fn refuse(e: &Execution, asked: &str) -> Error {
    if e.reason.as_deref() == Some(EXPIRED_REASON) {
        Error::conflict(
            ConflictReason::ExecutionExpired,
            format!("execution '{}' passed its TTL and was settled as {} before this {asked}", e.id, e.state.as_str()),
        )
    } else {
        Error::conflict(
            ConflictReason::InvalidTransition,
            format!("execution '{}' is {}; it cannot {asked}", e.id, e.state.as_str()),
        )
    }
}

/// Marks an execution dispatched. Repeating it is harmless. The outer `Result` fails the
/// transaction; the inner one is the caller's answer after the transaction commits (an expiry
/// applied on the way is kept).
pub(crate) fn mark_dispatched(tx: &mut dyn Tx, hasher: &ChainHasher, id: &str, now: i64) -> Result<Result<Execution>> {
    let mut e = match load(tx, hasher, id, now) {
        Ok(e) => e,
        Err(err @ Error::NotFound { .. }) => return Ok(Err(err)),
        Err(err) => return Err(err),
    };
    match e.state {
        ExecutionState::Dispatched => Ok(Ok(e)),
        ExecutionState::Reserved => {
            e.state = ExecutionState::Dispatched;
            e.dispatched_at_ms = Some(now);
            tx.update_execution(&e)?;
            ledger::append(tx, hasher, now, NewEvent::execution(EventKind::Dispatched, &e.agent, &e.id, 0, json!({})))?;
            Ok(Ok(e))
        }
        _ => Ok(Err(refuse(&e, "be dispatched"))),
    }
}

/// Brings an execution to a terminal state, or replays the identical earlier call.
///
/// `alone`: the transaction's closure writes nothing but this settlement, so the settlement may
/// reach disk after the commit returns where losing it is safe ([`Tx::sync_later`]).
pub(crate) fn settle(tx: &mut dyn Tx, hasher: &ChainHasher, id: &str, call: Terminal<'_>, now: i64, alone: bool) -> Result<Result<Settlement>> {
    tx.prefetch(&[Prefetch::Execution(id), Prefetch::AgentOfExecution(id)]);
    let mut e = match load(tx, hasher, id, now) {
        Ok(e) => e,
        Err(err @ Error::NotFound { .. }) => return Ok(Err(err)),
        Err(err) => return Err(err),
    };
    // An estimate never charges less input than admission counted.
    let call = match call {
        Terminal::Commit(u, true) => Terminal::Commit(Usage { input_tokens: u.input_tokens.max(e.input_tokens), ..u }, true),
        other => other,
    };
    let asked = match call {
        Terminal::Commit(..) => "commit",
        Terminal::Release(_) => "release",
        Terminal::Fail(_) => "fail",
    };
    if !e.state.is_open() {
        let same = e.state == call.state()
            && match call {
                Terminal::Commit(u, _) => e.usage == Some(u),
                _ => true,
            };
        return Ok(if same { Ok(Settlement::of(&e, true)) } else { Err(refuse(&e, asked)) });
    }
    let was_dispatched = e.state == ExecutionState::Dispatched;
    e.state = call.state();
    e.settled_at_ms = Some(now);
    let (kind, amount, data) = match call {
        Terminal::Commit(usage, estimated) => {
            let cost = usage.cost(&e.prices);
            e.cost_micro = Some(cost);
            e.usage = Some(usage);
            let data = json!({
                "reserved_micro": e.reserved_micro,
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cached_input_tokens": usage.cached_input_tokens,
                "estimated": estimated,
            });
            (EventKind::Committed, cost, data)
        }
        Terminal::Release(reason) => {
            e.reason = Some(reason.to_string());
            (EventKind::Released, e.reserved_micro, json!({ "reason": reason }))
        }
        Terminal::Fail(error) => {
            e.reason = Some(error.to_string());
            (EventKind::Failed, e.reserved_micro, json!({ "error": error }))
        }
    };
    let (charged, rate_delta) = match call {
        Terminal::Commit(u, _) => (amount, u.input_tokens + u.output_tokens - e.rate_tokens),
        _ => (0, -e.rate_tokens),
    };
    tx.update_execution(&e)?;
    budget::post(tx, hasher, &e, charged, rate_delta, now)?;
    ledger::append(tx, hasher, now, NewEvent::execution(kind, &e.agent, &e.id, amount, data))?;
    let settlement = Settlement::of(&e, false);
    if settlement.overrun_micro > 0 {
        let data = json!({ "reserved_micro": e.reserved_micro, "cost_micro": settlement.cost_micro });
        ledger::append(tx, hasher, now, NewEvent::execution(EventKind::Overrun, &e.agent, &e.id, settlement.overrun_micro, data))?;
    }
    // What a power cut may take back: the settlement of a dispatched execution charging at most
    // its reservation. The dispatch mark is on disk, so the execution comes back dispatched and
    // the TTL rule charges the full reservation — over-charged, never under. A reserved
    // execution's settlement must be on disk at once (the TTL rule would release it, though a
    // provider may have billed it), and so must an overrun (the reservation is less than it).
    if alone && was_dispatched && settlement.overrun_micro == 0 {
        tx.sync_later();
    }
    Ok(Ok(settlement))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_cost_prices_parts_separately_and_rounds_up() {
        let p = Prices { input: 150_000, output: 600_000, cached_input: Some(75_000) };
        assert_eq!(Usage::new(1_000, 500).cost(&p), 150 + 300);
        let cached = Usage { input_tokens: 1_000, output_tokens: 0, cached_input_tokens: 400 };
        assert_eq!(cached.cost(&p), 90 + 30);
        assert_eq!(Usage::new(1, 1).cost(&p), 2);
    }

    #[test]
    fn usage_validation_names_the_field() {
        let e = Usage::new(-1, 0).validate().unwrap_err();
        assert!(e.to_string().contains("usage.input_tokens"), "{e}");
        let e = Usage { input_tokens: 1, output_tokens: 0, cached_input_tokens: 2 }.validate().unwrap_err();
        assert!(e.to_string().contains("usage.cached_input_tokens"), "{e}");
        assert!(Usage::new(0, MAX_TOKENS + 1).validate().is_err());
        // Exactly at the limits is valid.
        assert!(Usage { input_tokens: MAX_TOKENS, output_tokens: MAX_TOKENS, cached_input_tokens: MAX_TOKENS }.validate().is_ok());
        assert!(Usage::new(0, 0).validate().is_ok());
    }
}
