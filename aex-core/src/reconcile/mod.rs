//! Expiry of reservations that were never settled (a crashed or forgetful worker).
//!
//! Every reservation carries `expires_at_ms` (admission time + the kernel's reservation TTL).
//! Once that time has passed:
//! * a reservation never dispatched is **released** — no call left the process;
//! * a dispatched one is **settled at its full reservation** — the provider may have billed, and
//!   aex never under-charges.
//!
//! Both are `execution.expired` events whose `amount` is what was charged. Expiry runs when a
//! kernel opens the store, lazily inside every admission for the agent it touches, and inside any
//! settlement call on an execution that is due, so a dead worker never blocks a budget past the
//! TTL, restart or not, and no background thread is needed.

use serde_json::json;

use crate::budget;
use crate::error::{Error, Result};
use crate::execution::{Execution, ExecutionState};
use crate::ledger::{self, ChainHasher, EventKind, NewEvent};
use crate::store::Tx;

/// The `reason` recorded on an execution settled by expiry.
pub const EXPIRED_REASON: &str = "expired";

/// What a reconcile pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReconcileReport {
    /// Reservations released (never dispatched).
    pub released: u64,
    /// Dispatched reservations settled at their full amount.
    pub settled: u64,
}

/// Expires every due open execution, of one agent or of all. Across all agents, an execution
/// whose agent or team row is found tampered (see [`crate::outside`]) is skipped and stays open,
/// so one such row neither blocks the others nor gets acted on; `audit` names it.
pub(crate) fn expire_due(tx: &mut dyn Tx, hasher: &ChainHasher, agent_id: Option<i64>, now: i64) -> Result<ReconcileReport> {
    let mut report = ReconcileReport::default();
    for mut e in tx.open_executions(agent_id, Some(now))? {
        if agent_id.is_none() && !rows_usable(tx, &e)? {
            continue;
        }
        if e.state == ExecutionState::Dispatched {
            report.settled += 1;
        } else {
            report.released += 1;
        }
        expire(tx, hasher, &mut e, now)?;
    }
    Ok(report)
}

/// Whether the rows an expiry would post to can be acted on. Loading them runs the seal check,
/// which writes nothing when it refuses, so skipping leaves no trace.
fn rows_usable(tx: &mut dyn Tx, e: &Execution) -> Result<bool> {
    if !usable(tx.agent_by_id(e.agent_id).map(drop))? {
        return Ok(false);
    }
    for &t in &e.teams {
        if !usable(tx.team_by_id(t).map(drop))? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn usable(loaded: Result<()>) -> Result<bool> {
    match loaded {
        Ok(()) => Ok(true),
        Err(Error::Tampered { .. }) => Ok(false),
        Err(other) => Err(other),
    }
}

/// Applies the expiry rule to one open execution that is due.
pub(crate) fn expire(tx: &mut dyn Tx, hasher: &ChainHasher, e: &mut Execution, now: i64) -> Result<()> {
    let (state, charged, rate_delta) = if e.state == ExecutionState::Dispatched {
        (ExecutionState::Committed, e.reserved_micro, 0)
    } else {
        (ExecutionState::Released, 0, -e.rate_tokens)
    };
    e.state = state;
    e.reason = Some(EXPIRED_REASON.to_string());
    e.settled_at_ms = Some(now);
    if state == ExecutionState::Committed {
        e.cost_micro = Some(charged);
    }
    tx.update_execution(e)?;
    budget::post(tx, hasher, e, charged, rate_delta, now)?;
    let data = json!({
        "settled_as": state.as_str(),
        "reserved_micro": e.reserved_micro,
        "expires_at_ms": e.expires_at_ms,
    });
    ledger::append(tx, hasher, now, NewEvent::execution(EventKind::Expired, &e.agent, &e.id, charged, data))
}
