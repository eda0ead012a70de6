//! Budget reservation: what an admission sets aside, and whether it fits.
//!
//! `estimate = cost(input_tokens, input price) + cost(max_output_tokens, output price)`, with the
//! ceiling rule of [`crate::money::cost`]. A reservation fits when
//! `budget - spent - reserved >= estimate`; otherwise the admission is denied with
//! [`Error::InsufficientBudget`] and nothing is reserved. The check and the reservation happen in
//! one exclusive store transaction, so concurrent admissions — threads or processes — can never
//! together reserve more than the budget.

use crate::agent::Agent;
use crate::config::Prices;
use crate::error::{Error, Result};
use crate::money;

/// The amount to reserve for a call of at most `input_tokens` in and `max_output_tokens` out.
pub fn estimate(prices: &Prices, input_tokens: i64, max_output_tokens: i64) -> i64 {
    money::cost(input_tokens, prices.input) + money::cost(max_output_tokens, prices.output)
}

/// Checks that `estimate` fits the agent's remaining budget.
///
/// # Errors
/// [`Error::InsufficientBudget`] with what was needed and what remains.
pub fn check_fits(agent: &Agent, estimate: i64) -> Result<()> {
    let remaining = agent.remaining_micro();
    if remaining < estimate {
        return Err(Error::InsufficientBudget {
            agent: agent.name.clone(),
            needed_micro: estimate,
            remaining_micro: remaining,
        });
    }
    Ok(())
}
