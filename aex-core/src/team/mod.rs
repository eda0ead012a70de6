//! Teams: shared budgets that several agents draw from.
//!
//! An agent may belong to one team; a team may belong to a parent team, and so on up (at most
//! [`MAX_DEPTH`] levels). One admission reserves on the agent **and** on every team above it, in the
//! same transaction — all or none: if any of them lacks room, the admission is denied with
//! [`crate::Error::InsufficientBudget`] naming that team, and nothing is reserved anywhere.
//! Settlement posts the real cost to each of the budgets that reserved, even if membership changes
//! in between (the execution remembers them).
//!
//! Team budgets do not renew; set them with [`crate::Kernel::set_team_budget`]. A team cannot be
//! deleted while agents or teams belong to it or it holds reservations.

use crate::agent::validate_name_as;
use crate::error::Result;
use crate::money;

/// How many teams may stand above an agent.
pub const MAX_DEPTH: usize = 8;

/// The settings for a new team.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamSpec {
    /// Unique team name, same rule as agent names.
    pub name: String,
    /// Budget in micro-USD.
    pub budget_micro: i64,
    /// The parent team, if any (it must exist).
    pub parent: Option<String>,
}

impl TeamSpec {
    /// A top-level team.
    pub fn new(name: impl Into<String>, budget_micro: i64) -> TeamSpec {
        TeamSpec { name: name.into(), budget_micro, parent: None }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`crate::Error::InvalidRequest`] naming `name`, `budget_micro` or `parent`.
    pub fn validate(&self) -> Result<()> {
        validate_name_as("name", &self.name)?;
        money::check_amount("budget_micro", self.budget_micro)?;
        if let Some(p) = &self.parent {
            validate_name_as("parent", p)?;
        }
        Ok(())
    }
}

/// A team as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Team {
    /// Store id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// The parent team's id.
    pub parent_id: Option<i64>,
    /// The parent team's name.
    pub parent: Option<String>,
    /// Budget, micro-USD.
    pub budget_micro: i64,
    /// Committed spend of all its members, micro-USD.
    pub spent_micro: i64,
    /// Open reservations of all its members, micro-USD.
    pub reserved_micro: i64,
    /// Creation time.
    pub created_at_ms: i64,
}

impl Team {
    /// `budget - spent - reserved`.
    pub fn remaining_micro(&self) -> i64 {
        self.budget_micro - self.spent_micro - self.reserved_micro
    }
}
