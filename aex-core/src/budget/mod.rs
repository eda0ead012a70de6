//! Budget reservation: what an admission sets aside, and whether it fits.
//!
//! `estimate = cost(input_tokens, input price) + cost(max_output_tokens, output price)`, with the
//! ceiling rule of [`crate::money::cost`]. A reservation fits when
//! `budget - spent - reserved >= estimate`; otherwise the admission is denied with
//! [`Error::InsufficientBudget`] and nothing is reserved. The check and the reservation happen in
//! one exclusive store transaction, so concurrent admissions — threads or processes — can never
//! together reserve more than the budget.

pub mod period;

pub use period::BudgetPeriod;

use serde_json::json;

use crate::agent::Agent;
use crate::config::Prices;
use crate::error::{Error, Result};
use crate::execution::Execution;
use crate::ledger::ChainHasher;
use crate::money;
use crate::rate;
use crate::store::Tx;
use crate::team::{MAX_DEPTH, Team};

/// The amount to reserve for a call of at most `input_tokens` in and `max_output_tokens` out.
pub fn estimate(prices: &Prices, input_tokens: i64, max_output_tokens: i64) -> i64 {
    money::cost(input_tokens, prices.input) + money::cost(max_output_tokens, prices.output)
}

/// Checks that `estimate` fits the agent's remaining budget and every team's above it.
///
/// # Errors
/// [`Error::InsufficientBudget`] with what was needed and what remains, naming the team when it
/// is a team's budget that lacks room.
pub fn check_fits(agent: &Agent, teams: &[Team], estimate: i64) -> Result<()> {
    let deny = |team: Option<&Team>, remaining| Error::InsufficientBudget {
        agent: agent.name.clone(),
        team: team.map(|t| t.name.clone()),
        needed_micro: estimate,
        remaining_micro: remaining,
    };
    if agent.remaining_micro() < estimate {
        return Err(deny(None, agent.remaining_micro()));
    }
    match teams.iter().find(|t| t.remaining_micro() < estimate) {
        Some(t) => Err(deny(Some(t), t.remaining_micro())),
        None => Ok(()),
    }
}

/// The teams above an agent, nearest first.
pub(crate) fn team_chain(tx: &mut dyn Tx, agent: &Agent) -> Result<Vec<Team>> {
    let mut chain = Vec::new();
    let mut next = agent.team_id;
    while let Some(id) = next {
        if chain.len() == MAX_DEPTH {
            return Err(Error::Internal(format!("agent '{}' has more than {MAX_DEPTH} teams above it", agent.name)));
        }
        let team = tx.team_by_id(id)?.ok_or_else(|| Error::Internal(format!("team {id} of agent '{}' is missing", agent.name)))?;
        next = team.parent_id;
        chain.push(team);
    }
    Ok(chain)
}

/// Takes an open execution's reservation off its agent and teams and charges `charged` to each,
/// renewing the agent's period first; corrects the rate windows by `rate_delta` tokens.
pub(crate) fn post(tx: &mut dyn Tx, hasher: &ChainHasher, e: &Execution, charged: i64, rate_delta: i64, now: i64) -> Result<()> {
    let mut agent = tx
        .agent_by_id(e.agent_id)?
        .ok_or_else(|| Error::Internal(format!("open execution '{}' has no agent", e.id)))?;
    period::renew_if_due(tx, hasher, &mut agent, now)?;
    // An execution row edited by hand (a reservation inflated, moved to another agent) would take
    // off more than its agent or team holds, and give the difference back as budget: refused.
    let over = |holds: i64, who: &str| {
        (e.reserved_micro < 0 || holds < e.reserved_micro).then(|| Error::Tampered {
            field: "reserved_micro".into(),
            message: format!(
                "execution '{}' returns a reservation of {} micro-USD but {who} holds {holds}: the execution was edited by hand",
                e.id, e.reserved_micro
            ),
        })
    };
    if let Some(err) = over(agent.reserved_micro, &format!("agent '{}'", agent.name)) {
        return Err(err);
    }
    tx.update_counters(agent.id, agent.spent_micro + charged, agent.reserved_micro - e.reserved_micro)?;
    for &id in &e.teams {
        let t = tx.team_by_id(id)?.ok_or_else(|| Error::Internal(format!("team {id} of execution '{}' is missing", e.id)))?;
        if let Some(err) = over(t.reserved_micro, &format!("team '{}'", t.name)) {
            return Err(err);
        }
        tx.update_team_counters(id, t.spent_micro + charged, t.reserved_micro - e.reserved_micro)?;
    }
    rate::correct(tx, &e.rate_scopes, e.created_at_ms, rate_delta)
}

/// The `teams` list recorded in ledger events, by name.
pub(crate) fn team_names(teams: &[Team]) -> serde_json::Value {
    json!(teams.iter().map(|t| t.name.as_str()).collect::<Vec<_>>())
}
