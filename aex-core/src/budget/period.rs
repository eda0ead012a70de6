//! Budget periods: a budget that renews every calendar day, week (from Monday) or month, UTC.
//!
//! `spent` counts what was committed since `period_start`. Renewal is lazy: whenever an admission,
//! a settlement or an expiry touches the agent at or after the next period boundary, `spent` starts
//! again from zero and `period_start` moves to the start of the current period, as one
//! `agent.budget_renewed` event. Because every operation that charges the agent renews it first, in
//! the same transaction, nothing committed in the new period is ever reset. Open reservations carry
//! over and are charged to the period in which they settle.
//!
//! Changing an agent's period keeps its `spent` and `reserved` and sets `period_start` to the start
//! of the current period of the new kind: what remains of the budget does not change, so a change
//! never leaves an agent instantly over budget; the first renewal comes at the next boundary.

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Utc};
use serde_json::json;

use crate::agent::Agent;
use crate::error::{Error, Result};
use crate::ledger::{self, ChainHasher, EventKind, NewEvent};
use crate::store::Tx;

/// How often a budget renews.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BudgetPeriod {
    /// Never: one budget for the agent's life (the default).
    #[default]
    Never,
    /// Every calendar day, from 00:00 UTC.
    Day,
    /// Every calendar week, from Monday 00:00 UTC.
    Week,
    /// Every calendar month, from the 1st, 00:00 UTC.
    Month,
}

impl BudgetPeriod {
    /// The stored name: `never`, `day`, `week` or `month`.
    pub const fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Never => "never",
            BudgetPeriod::Day => "day",
            BudgetPeriod::Week => "week",
            BudgetPeriod::Month => "month",
        }
    }

    /// Parses a period name (`daily`, `weekly`, `monthly` are accepted too).
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] on field `budget_period`.
    pub fn parse(s: &str) -> Result<BudgetPeriod> {
        Ok(match s {
            "never" | "none" => BudgetPeriod::Never,
            "day" | "daily" => BudgetPeriod::Day,
            "week" | "weekly" => BudgetPeriod::Week,
            "month" | "monthly" => BudgetPeriod::Month,
            _ => return Err(Error::invalid("budget_period", format!("must be never, day, week or month, got '{s}'"))),
        })
    }

    /// The start, in ms since the epoch, of the period containing `now_ms` (0 for `Never`).
    pub fn start_of(self, now_ms: i64) -> i64 {
        let Some(now) = DateTime::<Utc>::from_timestamp_millis(now_ms) else { return 0 };
        let day = now.date_naive();
        let first: NaiveDate = match self {
            BudgetPeriod::Never => return 0,
            BudgetPeriod::Day => day,
            BudgetPeriod::Week => day - Duration::days(i64::from(day.weekday().num_days_from_monday())),
            BudgetPeriod::Month => day.with_day(1).unwrap_or(day),
        };
        midnight(first)
    }

    /// The start of the period after the one starting at `start_ms` (`i64::MAX` for `Never`).
    pub fn next_after(self, start_ms: i64) -> i64 {
        let Some(start) = DateTime::<Utc>::from_timestamp_millis(start_ms) else { return i64::MAX };
        let day = start.date_naive();
        let next = match self {
            BudgetPeriod::Never => return i64::MAX,
            BudgetPeriod::Day => day.succ_opt(),
            BudgetPeriod::Week => day.checked_add_signed(Duration::days(7)),
            BudgetPeriod::Month => day.checked_add_months(chrono::Months::new(1)),
        };
        next.map_or(i64::MAX, midnight)
    }
}

fn midnight(d: NaiveDate) -> i64 {
    Utc.from_utc_datetime(&d.and_time(NaiveTime::MIN)).timestamp_millis()
}

/// Renews the agent's budget if a period boundary has passed, in the caller's transaction.
/// Returns whether it did.
pub(crate) fn renew_if_due(tx: &mut dyn Tx, hasher: &ChainHasher, agent: &mut Agent, now: i64) -> Result<bool> {
    let period = agent.budget_period;
    if period == BudgetPeriod::Never || now < period.next_after(agent.period_start_ms) {
        return Ok(false);
    }
    let previous_spent = agent.spent_micro;
    agent.spent_micro = 0;
    agent.period_start_ms = period.start_of(now);
    tx.update_agent(agent)?;
    let data = json!({
        "period": period.as_str(),
        "period_start_ms": agent.period_start_ms,
        "previous_spent_micro": previous_spent,
    });
    ledger::append(tx, hasher, now, NewEvent::agent(EventKind::BudgetRenewed, &agent.name, 0, data))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(y: i32, m: u32, d: u32, h: u32) -> i64 {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap().timestamp_millis()
    }

    #[test]
    fn calendar_periods_in_utc() {
        let now = ms(2026, 11, 21, 15); // a Saturday
        assert_eq!(BudgetPeriod::Day.start_of(now), ms(2026, 11, 21, 0));
        assert_eq!(BudgetPeriod::Week.start_of(now), ms(2026, 11, 16, 0));
        assert_eq!(BudgetPeriod::Month.start_of(now), ms(2026, 11, 1, 0));
        assert_eq!(BudgetPeriod::Day.next_after(ms(2026, 12, 31, 0)), ms(2027, 1, 1, 0));
        assert_eq!(BudgetPeriod::Week.next_after(ms(2026, 11, 16, 0)), ms(2026, 11, 23, 0));
        assert_eq!(BudgetPeriod::Month.next_after(ms(2026, 1, 1, 0)), ms(2026, 2, 1, 0));
        assert_eq!(BudgetPeriod::Month.next_after(ms(2026, 12, 1, 0)), ms(2027, 1, 1, 0));
        assert_eq!(BudgetPeriod::Never.next_after(0), i64::MAX);
        assert_eq!(BudgetPeriod::parse("monthly").unwrap(), BudgetPeriod::Month);
        assert_eq!(BudgetPeriod::parse("hourly").unwrap_err().status(), 400);
    }
}
