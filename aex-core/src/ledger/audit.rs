//! `audit`: verify the chain, then rebuild every counter from the events alone.
//!
//! Over one read snapshot, in this order, stopping at the first failure:
//! 1. **chain** — seqs run 1, 2, 3, … without gaps; each `prev_hash` is the previous event's hash
//!    (zero for the first); each `hash` is recomputed from the row's bytes with the kernel's hasher
//!    (a plain-SHA-256 rewrite of a keyed ledger fails here); an `anchor`, if given, matches.
//! 2. **replay** — the events are applied to empty counters: `created` and `budget_set` events
//!    set budgets, `reserved` adds to `reserved` (of the agent and of each team it names),
//!    terminal events move it to `spent` or back, `budget_renewed` starts `spent` again. An
//!    execution may have at most one terminal event, and every event must fit the state replay
//!    has reached.
//! 3. **live state** — every agent and team row equals its replayed budget, spent and reserved;
//!    `spent` equals the committed costs (for an agent, since its last renewal) and `reserved`
//!    the open reservations in the executions table; every execution row agrees with its
//!    replayed state. A team is named `team:NAME` in a failure.
//!
//! Removing the newest events leaves a valid shorter chain; the counters check catches it when
//! they moved money, and a [`Head`] kept elsewhere and passed as the anchor always does.

use std::collections::{BTreeMap, HashMap};

use super::{ChainHasher, EventKind, GENESIS_HASH, Head};
use crate::error::Result;
use crate::execution::ExecutionState;
use crate::store::Tx;

/// Which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditRule {
    /// An event is missing or out of order.
    Sequence,
    /// An event's `prev_hash` is not the previous event's hash.
    Link,
    /// An event's hash does not match its contents.
    Hash,
    /// The anchor's event is missing or has another hash.
    Anchor,
    /// An event's kind is unknown or it does not fit the replayed state.
    Event,
    /// An execution has more than one terminal event.
    OneTerminal,
    /// An agent row differs from the replayed counters.
    Counters,
    /// An agent's `spent` differs from its committed executions.
    SpentSum,
    /// An agent's `reserved` differs from its open executions.
    ReservedSum,
    /// An execution row differs from its replayed state.
    Execution,
}

impl AuditRule {
    /// The stable code, e.g. `hash`.
    pub const fn as_str(self) -> &'static str {
        match self {
            AuditRule::Sequence => "sequence",
            AuditRule::Link => "link",
            AuditRule::Hash => "hash",
            AuditRule::Anchor => "anchor",
            AuditRule::Event => "event",
            AuditRule::OneTerminal => "one_terminal",
            AuditRule::Counters => "counters",
            AuditRule::SpentSum => "spent_sum",
            AuditRule::ReservedSum => "reserved_sum",
            AuditRule::Execution => "execution",
        }
    }
}

/// The first thing found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFailure {
    /// Which check.
    pub rule: AuditRule,
    /// The event at fault, for chain and replay failures.
    pub seq: Option<u64>,
    /// The agent at fault, if any.
    pub agent: Option<String>,
    /// The execution at fault, if any.
    pub execution_id: Option<String>,
    /// What was expected and what was found.
    pub message: String,
}

impl std::fmt::Display for AuditFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.rule.as_str())?;
        if let Some(seq) = self.seq {
            write!(f, " at seq {seq}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What an audit checked and found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    /// Events verified.
    pub events: u64,
    /// Live agents checked.
    pub agents: u64,
    /// Executions checked.
    pub executions: u64,
    /// The head verified up to.
    pub head: Option<Head>,
    /// `sha256` or `hmac-sha256`.
    pub mode: &'static str,
    /// The first failure, or `None` when everything holds.
    pub failure: Option<AuditFailure>,
}

impl AuditReport {
    /// Whether everything holds.
    pub fn is_clean(&self) -> bool {
        self.failure.is_none()
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counters {
    budget: i64,
    spent: i64,
    reserved: i64,
    /// When `spent` last started from zero (the last `budget_renewed`; 0 before any): the
    /// executions committed since then make up `spent`.
    spent_since_ms: i64,
}

#[derive(Debug)]
struct ExecReplay {
    agent: String,
    teams: Vec<String>,
    reserved: i64,
    state: ExecutionState,
    cost: i64,
}

/// Replayed state: agents and teams by name, executions by id.
#[derive(Debug, Default)]
struct Replay {
    agents: HashMap<String, Counters>,
    teams: HashMap<String, Counters>,
    execs: HashMap<String, ExecReplay>,
}

fn fail(rule: AuditRule, seq: Option<u64>, agent: Option<&str>, exec: Option<&str>, message: String) -> AuditFailure {
    AuditFailure { rule, seq, agent: agent.map(str::to_string), execution_id: exec.map(str::to_string), message }
}

/// Runs the audit inside a read transaction.
pub(crate) fn run(tx: &mut dyn Tx, hasher: &ChainHasher, anchor: Option<&Head>) -> Result<AuditReport> {
    let mut report =
        AuditReport { events: 0, agents: 0, executions: 0, head: None, mode: hasher.mode(), failure: None };
    let mut state = Replay::default();
    let mut prev = GENESIS_HASH;
    let mut expected_seq = 1u64;
    let mut failure: Option<AuditFailure> = None;

    tx.for_each_event(0, &mut |e| {
        let seq = Some(e.seq);
        if e.seq != expected_seq {
            let msg = if e.seq > expected_seq {
                format!("event {expected_seq} is missing (found {} next)", e.seq)
            } else {
                format!("event {} found where {expected_seq} was expected", e.seq)
            };
            failure = Some(fail(AuditRule::Sequence, Some(expected_seq), None, None, msg));
            return Ok(false);
        }
        if e.prev_hash != prev {
            failure = Some(fail(AuditRule::Link, seq, None, None, "prev_hash is not the previous event's hash".into()));
            return Ok(false);
        }
        if hasher.link(&prev, &e.canonical_bytes()) != e.hash {
            failure = Some(fail(AuditRule::Hash, seq, None, None, "hash does not match the event's contents".into()));
            return Ok(false);
        }
        if let Some(a) = anchor
            && a.seq == e.seq
            && a.hash != e.hash
        {
            failure = Some(fail(AuditRule::Anchor, seq, None, None, "event differs from the anchor".into()));
            return Ok(false);
        }
        prev = e.hash;
        expected_seq += 1;
        report.events += 1;
        report.head = Some(Head { seq: e.seq, hash: e.hash });
        if let Some(f) = replay(&mut state, &e) {
            failure = Some(f);
            return Ok(false);
        }
        Ok(true)
    })?;
    if failure.is_none()
        && let Some(a) = anchor
        && a.seq >= expected_seq
    {
        let msg = format!("anchor seq {} is beyond the ledger's last event {}", a.seq, expected_seq - 1);
        failure = Some(fail(AuditRule::Anchor, Some(a.seq), None, None, msg));
    }
    if failure.is_none() {
        failure = check_live(tx, &state, &mut report)?;
    }
    report.failure = failure;
    Ok(report)
}

/// Applies one event to the replayed state; returns a failure if it does not fit.
fn replay(state: &mut Replay, e: &super::Event) -> Option<AuditFailure> {
    let seq = Some(e.seq);
    let bad = |rule, msg: String| Some(fail(rule, seq, e.agent.as_deref(), e.execution_id.as_deref(), msg));
    let Some(kind) = EventKind::parse(&e.kind) else {
        return bad(AuditRule::Event, format!("unknown event kind '{}'", e.kind));
    };
    let data = || serde_json::from_str::<serde_json::Value>(&e.data).unwrap_or_default();
    match kind {
        EventKind::Denied | EventKind::ConfigLoaded | EventKind::ConfigRejected => return None,
        EventKind::TeamCreated | EventKind::TeamBudgetSet | EventKind::TeamDeleted => {
            let data = data();
            let Some(team) = data.get("team").and_then(|t| t.as_str()) else {
                return bad(AuditRule::Event, format!("{} event without a team", e.kind));
            };
            let exists = state.teams.contains_key(team);
            match kind {
                EventKind::TeamCreated if exists => return bad(AuditRule::Event, format!("team '{team}' created twice")),
                EventKind::TeamCreated => {
                    state.teams.insert(team.to_string(), Counters { budget: e.amount_micro, ..Counters::default() });
                }
                _ if !exists => return bad(AuditRule::Event, format!("{} event for team '{team}', which does not exist", e.kind)),
                EventKind::TeamBudgetSet => state.teams.entry(team.to_string()).or_default().budget = e.amount_micro,
                _ => {
                    state.teams.remove(team);
                }
            }
            return None;
        }
        _ => {}
    }
    let Some(name) = e.agent.as_deref() else {
        return bad(AuditRule::Event, format!("{} event without an agent", e.kind));
    };
    match kind {
        EventKind::AgentCreated => {
            if state.agents.insert(name.to_string(), Counters { budget: e.amount_micro, ..Counters::default() }).is_some() {
                return bad(AuditRule::Event, format!("agent '{name}' created twice"));
            }
            return None;
        }
        EventKind::AgentDeleted => {
            if state.agents.remove(name).is_none() {
                return bad(AuditRule::Event, format!("agent '{name}' deleted but does not exist"));
            }
            return None;
        }
        _ => {}
    }
    let Some(agent) = state.agents.get_mut(name) else {
        return bad(AuditRule::Event, format!("{} event for agent '{name}', which does not exist", e.kind));
    };
    match kind {
        EventKind::BudgetSet => agent.budget = e.amount_micro,
        EventKind::BudgetRenewed => {
            agent.spent = 0;
            agent.spent_since_ms = e.ts_ms;
        }
        EventKind::AgentDisabled | EventKind::AgentEnabled | EventKind::TokenRotated | EventKind::BudgetPeriodSet => {}
        _ => {
            let Some(id) = e.execution_id.as_deref() else {
                return bad(AuditRule::Event, format!("{} event without an execution id", e.kind));
            };
            if kind == EventKind::Reserved {
                if state.execs.contains_key(id) {
                    return bad(AuditRule::Event, format!("execution '{id}' reserved twice"));
                }
                let teams: Vec<String> = data()
                    .get("teams")
                    .and_then(|t| t.as_array())
                    .map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                agent.reserved += e.amount_micro;
                for t in &teams {
                    let Some(team) = state.teams.get_mut(t) else {
                        return bad(AuditRule::Event, format!("reserves on team '{t}', which does not exist"));
                    };
                    team.reserved += e.amount_micro;
                }
                let x = ExecReplay { agent: name.to_string(), teams, reserved: e.amount_micro, state: ExecutionState::Reserved, cost: 0 };
                state.execs.insert(id.to_string(), x);
                return None;
            }
            let Some(x) = state.execs.get_mut(id) else {
                return bad(AuditRule::Event, format!("{} event for execution '{id}', which was never reserved", e.kind));
            };
            if x.agent != name {
                return bad(AuditRule::Event, format!("execution '{id}' belongs to agent '{}'", x.agent));
            }
            if kind == EventKind::Overrun {
                return (x.state != ExecutionState::Committed || e.amount_micro != x.cost - x.reserved)
                    .then(|| fail(AuditRule::Event, seq, Some(name), Some(id), "overrun does not follow its commit".into()));
            }
            if !x.state.is_open() {
                let msg = format!("execution '{id}' already ended as {}; {} is a second terminal event", x.state.as_str(), e.kind);
                return bad(AuditRule::OneTerminal, msg);
            }
            let (new_state, charged) = match kind {
                EventKind::Dispatched => {
                    x.state = ExecutionState::Dispatched;
                    return None;
                }
                EventKind::Committed => (ExecutionState::Committed, e.amount_micro),
                EventKind::Released => (ExecutionState::Released, 0),
                EventKind::Failed => (ExecutionState::Failed, 0),
                EventKind::Expired if x.state == ExecutionState::Dispatched => (ExecutionState::Committed, e.amount_micro),
                EventKind::Expired => (ExecutionState::Released, 0),
                _ => return bad(AuditRule::Event, format!("unexpected {} event", e.kind)),
            };
            if matches!(kind, EventKind::Released | EventKind::Failed) && e.amount_micro != x.reserved {
                return bad(AuditRule::Event, format!("returns {} but {} was reserved", e.amount_micro, x.reserved));
            }
            agent.reserved -= x.reserved;
            agent.spent += charged;
            for t in &x.teams {
                // A team with open reservations cannot be deleted, so it is still there.
                if let Some(team) = state.teams.get_mut(t) {
                    team.reserved -= x.reserved;
                    team.spent += charged;
                }
            }
            x.state = new_state;
            x.cost = charged;
        }
    }
    None
}

/// Per-budget sums over the executions table: committed cost (since the period start, for
/// agents) and open reservations.
#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    spent: i64,
    reserved: i64,
}

/// Compares the live tables with the replayed state.
fn check_live(tx: &mut dyn Tx, replayed: &Replay, report: &mut AuditReport) -> Result<Option<AuditFailure>> {
    let live = tx.agents()?;
    let live_teams = tx.teams()?;
    report.agents = live.len() as u64;
    // Spend counts from the agent's last renewal as the ledger recorded it (not `period_start_ms`,
    // which a period change moves while keeping what was spent).
    let spent_since: HashMap<i64, i64> =
        live.iter().map(|a| (a.id, replayed.agents.get(&a.name).map_or(0, |c| c.spent_since_ms))).collect();
    let mut agent_sums: BTreeMap<i64, Sums> = BTreeMap::new();
    let mut team_sums: BTreeMap<i64, Sums> = BTreeMap::new();
    let mut first: Option<AuditFailure> = None;
    tx.for_each_execution(&mut |x| {
        report.executions += 1;
        if x.state == ExecutionState::Committed {
            let cost = x.cost_micro.unwrap_or(0);
            let since = spent_since.get(&x.agent_id).copied().unwrap_or(0);
            if x.settled_at_ms.unwrap_or(0) >= since {
                agent_sums.entry(x.agent_id).or_default().spent += cost;
            }
            for t in &x.teams {
                team_sums.entry(*t).or_default().spent += cost;
            }
        } else if x.state.is_open() {
            agent_sums.entry(x.agent_id).or_default().reserved += x.reserved_micro;
            for t in &x.teams {
                team_sums.entry(*t).or_default().reserved += x.reserved_micro;
            }
        }
        if first.is_some() {
            return Ok(());
        }
        let msg = match replayed.execs.get(&x.id) {
            None => Some("execution row has no reservation event".to_string()),
            Some(r) if r.state != x.state => Some(format!("row is {}, the ledger says {}", x.state.as_str(), r.state.as_str())),
            Some(r) if r.reserved != x.reserved_micro => Some(format!("row reserves {}, the ledger {}", x.reserved_micro, r.reserved)),
            Some(r) if x.state == ExecutionState::Committed && r.cost != x.cost_micro.unwrap_or(0) => {
                Some(format!("row cost {}, the ledger {}", x.cost_micro.unwrap_or(0), r.cost))
            }
            Some(_) => None,
        };
        if let Some(msg) = msg {
            first = Some(fail(AuditRule::Execution, None, Some(&x.agent), Some(&x.id), msg));
        }
        Ok(())
    })?;
    if first.is_some() {
        return Ok(first);
    }
    let budgets = live
        .iter()
        .map(|a| ("agent", a.name.as_str(), a.budget_micro, a.spent_micro, a.reserved_micro, agent_sums.get(&a.id), &replayed.agents))
        .chain(live_teams.iter().map(|t| {
            ("team", t.name.as_str(), t.budget_micro, t.spent_micro, t.reserved_micro, team_sums.get(&t.id), &replayed.teams)
        }));
    for (what, name, budget, spent, reserved, sums, replay) in budgets {
        let who = Some(if what == "agent" { name.to_string() } else { format!("team:{name}") });
        let who = who.as_deref();
        let Some(r) = replay.get(name) else {
            return Ok(Some(fail(AuditRule::Counters, None, who, None, format!("{what} row has no creation event"))));
        };
        for (field, row, replayed) in [("budget_micro", budget, r.budget), ("spent_micro", spent, r.spent), ("reserved_micro", reserved, r.reserved)] {
            if row != replayed {
                let msg = format!("{field} is {row} in the {what}s table but the ledger replays to {replayed}");
                return Ok(Some(fail(AuditRule::Counters, None, who, None, msg)));
            }
        }
        let sums = sums.copied().unwrap_or_default();
        if spent != sums.spent {
            let msg = format!("spent_micro is {spent} but committed executions sum to {}", sums.spent);
            return Ok(Some(fail(AuditRule::SpentSum, None, who, None, msg)));
        }
        if reserved != sums.reserved {
            let msg = format!("reserved_micro is {reserved} but open executions sum to {}", sums.reserved);
            return Ok(Some(fail(AuditRule::ReservedSum, None, who, None, msg)));
        }
    }
    if let Some(missing) = replayed.agents.keys().find(|n| !live.iter().any(|a| &a.name == *n)) {
        return Ok(Some(fail(AuditRule::Counters, None, Some(missing), None, "the ledger has an agent with no row".into())));
    }
    if let Some(missing) = replayed.teams.keys().find(|n| !live_teams.iter().any(|t| &t.name == *n)) {
        let who = format!("team:{missing}");
        return Ok(Some(fail(AuditRule::Counters, None, Some(&who), None, "the ledger has a team with no row".into())));
    }
    Ok(None)
}
