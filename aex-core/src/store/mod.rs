//! Persistence behind a trait, so the rules never see SQL.
//!
//! A [`Store`] runs closures inside transactions. A write transaction is exclusive across threads
//! and processes from its first statement (SQLite's `BEGIN IMMEDIATE`), so the check and the
//! reservation of an admission see and change the same state; nothing read in one transaction is
//! trusted in the next. A read transaction sees one consistent snapshot.
//!
//! [`SqliteStore`] is the embedded implementation; [`PgStore`] serves fleets on many machines
//! from one PostgreSQL database. Both implement the same two traits, and the rules above them are
//! the same.

mod columns;
pub mod files;
pub mod ofd;
pub mod postgres;
mod side_lock;
mod sqlite;

pub use postgres::PgStore;
pub use sqlite::{DEFAULT_MAX_BATCH, Durability, SqliteStore, StoreOptions};

use crate::agent::Agent;
use crate::auth::TokenHash;
use crate::error::Result;
use crate::execution::Execution;
use crate::ledger::{Event, Head};
use crate::outside::Seal;
use crate::rate::Bucket;
use crate::team::Team;

/// A transactional store. Implementations are shared between threads.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Runs `f` in an exclusive write transaction: committed if `f` returns `Ok`, rolled back
    /// (leaving no trace) if it returns `Err` or panics (the panic then resumes in the caller).
    /// Returns only once the change is committed. An implementation may run `f` on another
    /// thread, and run several callers' closures in one transaction (group commit), provided
    /// each sees the changes of those before it and a failing one leaves no trace.
    ///
    /// # Errors
    /// [`crate::Error::Unavailable`] when the store stays busy past its timeout, I/O fails, or
    /// the commit fails; whatever `f` returns.
    fn write(&self, f: &mut (dyn FnMut(&mut dyn Tx) -> Result<()> + Send)) -> Result<()>;

    /// How many writes this store has run in this process, in how many transactions. A store
    /// without group commit reports one transaction per write (the default).
    fn write_stats(&self) -> WriteStats {
        WriteStats::default()
    }

    /// The version of the store's schema (opening a store migrates it to its newest). 0 for a
    /// store without versions.
    fn schema_version(&self) -> u32 {
        0
    }

    /// What is unsafe about how the store is set up (file permissions, ...), one sentence each,
    /// for the CLI to print. Empty by default.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// Runs `f` over one consistent snapshot; it must not write. An implementation may run `f`
    /// on another thread while the caller waits.
    ///
    /// # Errors
    /// As [`Store::write`].
    fn read(&self, f: &mut (dyn FnMut(&mut dyn Tx) -> Result<()> + Send)) -> Result<()>;
}

/// How many writes a store has run, in how many transactions: the group-commit ratio.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Write closures run (committed or not).
    pub writes: u64,
    /// Write transactions they ran in.
    pub transactions: u64,
    /// The most closures one transaction held.
    pub largest_batch: u64,
    /// The time write transactions took in all, from waiting for the file's lock to the end of
    /// the commit: with `transactions`, their mean.
    pub busy: std::time::Duration,
}

impl WriteStats {
    /// Counts one transaction that ran `batch` writes and took `took`.
    pub fn record(&mut self, batch: usize, took: std::time::Duration) {
        self.writes += batch as u64;
        self.transactions += 1;
        self.largest_batch = self.largest_batch.max(batch as u64);
        self.busy += took;
    }
}

/// The operations the rules need inside one transaction.
pub trait Tx {
    /// The agent holding this token digest.
    fn agent_by_token(&mut self, token: &TokenHash) -> Result<Option<Agent>>;
    /// The agent with this name.
    fn agent_by_name(&mut self, name: &str) -> Result<Option<Agent>>;
    /// The agent with this id.
    fn agent_by_id(&mut self, id: i64) -> Result<Option<Agent>>;
    /// All agents, by name.
    fn agents(&mut self) -> Result<Vec<Agent>>;
    /// Inserts an agent (its `id` is ignored) and returns the new id. Names are unique: inserting
    /// a taken name is a [`crate::Error::Conflict`].
    fn insert_agent(&mut self, agent: &Agent, token: &TokenHash) -> Result<i64>;
    /// Writes an agent's settings and counters (not its token).
    fn update_agent(&mut self, agent: &Agent) -> Result<()>;
    /// Writes only an agent's counters.
    fn update_counters(&mut self, agent_id: i64, spent_micro: i64, reserved_micro: i64) -> Result<()>;
    /// Writes an agent's counters and its seal (one statement where the store can).
    fn update_counters_sealed(&mut self, agent_id: i64, spent_micro: i64, reserved_micro: i64, text: &str, tag: &[u8]) -> Result<()> {
        self.update_counters(agent_id, spent_micro, reserved_micro)?;
        self.set_agent_seal(agent_id, text, tag)
    }
    /// Replaces an agent's token.
    fn set_token(&mut self, agent_id: i64, token: &TokenHash, prefix: &str, expires_at_ms: Option<i64>) -> Result<()>;
    /// Deletes an agent row.
    fn delete_agent(&mut self, agent_id: i64) -> Result<()>;
    /// An agent's stored token digest and its seal (`None` when the row has none), or `None`
    /// without the row (see [`crate::outside`]).
    fn agent_seal(&mut self, agent_id: i64) -> Result<Option<(TokenHash, Option<Seal>)>>;
    /// Writes an agent's seal.
    fn set_agent_seal(&mut self, agent_id: i64, text: &str, tag: &[u8]) -> Result<()>;

    /// The team with this name.
    fn team_by_name(&mut self, name: &str) -> Result<Option<Team>>;
    /// The team with this id.
    fn team_by_id(&mut self, id: i64) -> Result<Option<Team>>;
    /// All teams, by name.
    fn teams(&mut self) -> Result<Vec<Team>>;
    /// Inserts a team (its `id` is ignored) and returns the new id; a taken name is a
    /// [`crate::Error::Conflict`].
    fn insert_team(&mut self, team: &Team) -> Result<i64>;
    /// Writes a team's budget.
    fn update_team_budget(&mut self, team_id: i64, budget_micro: i64) -> Result<()>;
    /// Writes a team's counters.
    fn update_team_counters(&mut self, team_id: i64, spent_micro: i64, reserved_micro: i64) -> Result<()>;
    /// Writes a team's counters and its seal.
    fn update_team_counters_sealed(&mut self, team_id: i64, spent_micro: i64, reserved_micro: i64, text: &str, tag: &[u8]) -> Result<()> {
        self.update_team_counters(team_id, spent_micro, reserved_micro)?;
        self.set_team_seal(team_id, text, tag)
    }
    /// Deletes a team row.
    fn delete_team(&mut self, team_id: i64) -> Result<()>;
    /// How many agents and teams belong to a team.
    fn team_members(&mut self, team_id: i64) -> Result<i64>;
    /// A team's seal, `None` when it has none.
    fn team_seal(&mut self, team_id: i64) -> Result<Option<Seal>>;
    /// Writes a team's seal.
    fn set_team_seal(&mut self, team_id: i64, text: &str, tag: &[u8]) -> Result<()>;

    /// The rate buckets of `scope` from `from_second` on, in any order.
    fn rate_buckets(&mut self, scope: &str, from_second: i64) -> Result<Vec<Bucket>>;
    /// Every scope's rate buckets from `from_second` on, in any order.
    fn all_rate_buckets(&mut self, from_second: i64) -> Result<Vec<(String, Bucket)>>;
    /// Adds to (or creates) one rate bucket.
    fn rate_add(&mut self, scope: &str, second: i64, requests: i64, tokens: i64) -> Result<()>;
    /// Deletes a scope's buckets before `before_second`.
    fn rate_prune(&mut self, scope: &str, before_second: i64) -> Result<()>;
    /// Adds `delta` tokens to an existing bucket (never below zero); no-op if it is gone.
    fn rate_adjust(&mut self, scope: &str, second: i64, delta: i64) -> Result<()>;
    /// Open executions, of one agent or all, and the earliest expiry among them.
    fn open_count(&mut self, agent_id: Option<i64>) -> Result<(i64, Option<i64>)>;

    /// The execution with this id.
    fn execution(&mut self, id: &str) -> Result<Option<Execution>>;
    /// Inserts a new execution.
    fn insert_execution(&mut self, execution: &Execution) -> Result<()>;
    /// Writes an execution's state and settlement fields.
    fn update_execution(&mut self, execution: &Execution) -> Result<()>;
    /// Open (reserved or dispatched) executions, of one agent or all, optionally only those whose
    /// `expires_at_ms <= expiring_by`, oldest first.
    fn open_executions(&mut self, agent_id: Option<i64>, expiring_by: Option<i64>) -> Result<Vec<Execution>>;
    /// Calls `f` on every execution, in id order.
    fn for_each_execution(&mut self, f: &mut dyn FnMut(Execution) -> Result<()>) -> Result<()>;

    /// The latest event's seq and hash.
    fn ledger_head(&mut self) -> Result<Option<Head>>;
    /// Appends one event.
    fn append_event(&mut self, event: &Event) -> Result<()>;
    /// Calls `f` on events with `seq >= from_seq` in seq order until it returns `false`.
    fn for_each_event(&mut self, from_seq: u64, f: &mut dyn FnMut(Event) -> Result<bool>) -> Result<()>;

    /// Committed spend per agent name from events at or after `since_ms`.
    fn spend_since(&mut self, since_ms: i64) -> Result<Vec<(String, i64)>>;

    /// A value from the store's metadata.
    fn meta(&mut self, key: &str) -> Result<Option<String>>;
    /// Sets a metadata value.
    fn set_meta(&mut self, key: &str, value: &str) -> Result<()>;

    /// Says that this write may reach disk after the store returns: losing it to a power cut
    /// must leave a state the rules settle safely — the settlement of a dispatched execution,
    /// which the TTL rule then charges in full. A store that fsyncs commits may skip the fsync of
    /// a transaction whose every write says so; a later fsynced commit or checkpoint persists it.
    /// Does nothing by default.
    fn sync_later(&mut self) {}

    /// Says what this transaction is about to read, so a store that pays a network round trip
    /// per read can fetch it with the next one. A hint only: the reads themselves follow, and
    /// must return what they would have without it (a store answers them from what it fetched
    /// only while nothing written since could change it). Does nothing by default.
    fn prefetch(&mut self, _wants: &[Prefetch<'_>]) {}
}

/// A read announced to [`Tx::prefetch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch<'a> {
    /// [`Tx::execution`] of this id.
    Execution(&'a str),
    /// [`Tx::agent_by_id`] of the agent that holds this execution.
    AgentOfExecution(&'a str),
}
