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
//!    Replay also rebuilds every power field of every agent and team (token digest, scope,
//!    expiry, disabled, period, limits, models, capabilities, strict, passthrough, team) from the
//!    events that set them, including the `operator_edit` events that record restricting edits
//!    made outside aex; such an event must restrict and must start from the replayed value. A
//!    commit must charge its usage at the prices its reservation froze.
//! 3. **live state** — every execution row agrees with its replayed state (state, amounts,
//!    admission time, rate scopes and tokens); every agent and team row has, field by field in
//!    the order of [`crate::outside::AGENT_FIELDS`], its replayed value — or one that only
//!    restricts it (an operator's edit no transaction has read yet, see [`crate::outside`]);
//!    anything else fails `counters` (budget, spent, reserved) or `policy` (the other fields),
//!    naming the field. `spent` equals the committed costs (for an agent, since its last
//!    renewal) and `reserved` the open reservations in the executions table. Each row's seal
//!    must verify and equal the replayed state. A team is named `team:NAME` in a failure.
//! 4. **rate windows** — the `rate_buckets` rows of the last minute equal the windows rebuilt
//!    from the admissions and settlements replayed (a deleted or lowered bucket resets a window).
//!
//! Removing the newest events leaves a valid shorter chain; the counters check catches it when
//! they moved money, and a [`Head`] kept elsewhere and passed as the anchor always does (keep
//! one that is on disk: an audit report's, see [`crate::Kernel::head`]).

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use super::{ChainHasher, EventKind, GENESIS_HASH, Head};
use crate::config::Prices;
use crate::error::Result;
use crate::execution::ExecutionState;
use crate::outside::{self, Recorded, Table, Verdict};
use crate::rate;
use crate::settlement::Usage;
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
    /// A field of an agent or team row that grants or limits power differs from the ledger in a
    /// loosening direction, or the row's seal is missing, forged or differs from the ledger.
    Policy,
    /// A rate window of the last minute differs from the admissions the ledger records.
    RateWindow,
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
            AuditRule::Policy => "policy",
            AuditRule::RateWindow => "rate_window",
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
    /// The first column at fault, for `counters`, `policy` and `rate_window` failures
    /// (`rate_buckets` for a window).
    pub field: Option<String>,
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
    /// When it was admitted (the reservation event's time).
    created_ms: i64,
    prices: Prices,
    /// Rate scopes and tokens counted at admission; `None` in events written before they were
    /// recorded.
    rate: Option<(String, i64)>,
    /// Tokens its rate windows hold now: the estimate while open, the real usage once committed,
    /// nothing once released.
    rate_now: i64,
}

/// Replayed state: agents and teams by name, executions by id, and the power fields the ledger
/// has set for each agent and team (a field no event has set yet is absent: unknown).
#[derive(Debug, Default)]
struct Replay {
    agents: HashMap<String, Counters>,
    teams: HashMap<String, Counters>,
    execs: HashMap<String, ExecReplay>,
    fields: HashMap<(Table, String), HashMap<&'static str, Value>>,
}

impl Replay {
    fn counters(&mut self, table: Table, name: &str) -> Option<&mut Counters> {
        match table {
            Table::Agents => self.agents.get_mut(name),
            Table::Teams => self.teams.get_mut(name),
        }
    }

    /// The replayed value of a field, if known.
    fn value(&self, table: Table, name: &str, field: &str) -> Option<Value> {
        let counters = match table {
            Table::Agents => self.agents.get(name),
            Table::Teams => self.teams.get(name),
        };
        match field {
            "budget_micro" => counters.map(|c| json!(c.budget)),
            "spent_micro" => counters.map(|c| json!(c.spent)),
            "reserved_micro" => counters.map(|c| json!(c.reserved)),
            _ => self.fields.get(&(table, name.to_string())).and_then(|f| f.get(field)).cloned(),
        }
    }

    /// Applies an `operator_edit` (`baseline` false) or a `recorded` baseline event's fields;
    /// a failure message when it does not fit.
    fn apply_fields(&mut self, table: Table, name: &str, data: &Value, baseline: bool) -> Option<String> {
        let edits: Vec<(&'static str, Option<Value>, Value)> = if baseline {
            table.fields().iter().filter_map(|f| data.get(*f).map(|v| (*f, None, v.clone()))).collect()
        } else {
            let field = data.get("field").and_then(Value::as_str).unwrap_or_default();
            let Some(field) = table.fields().iter().copied().find(|f| *f == field) else {
                return Some(format!("operator edit of unknown field '{field}'"));
            };
            vec![(field, Some(data.get("old").cloned().unwrap_or_default()), data.get("new").cloned().unwrap_or_default())]
        };
        for (field, claimed_old, new) in edits {
            let known = self.value(table, name, field);
            if let Some(old) = &claimed_old {
                if known.as_ref().is_some_and(|k| k != old) {
                    return Some(format!("operator edit of {field} starts from {old} but the ledger says {}", known.unwrap_or_default()));
                }
                if outside::judge(field, old, &new) != Verdict::Operator {
                    return Some(format!("operator edit of {field} from {old} to {new} does not restrict"));
                }
            } else if let Some(k) = &known
                && *k != new
                && outside::judge(field, k, &new) != Verdict::Operator
            {
                return Some(format!("baseline sets {field} to {new} but the ledger says {k}"));
            }
            match field {
                "budget_micro" => {
                    if let (Some(c), Some(b)) = (self.counters(table, name), new.as_i64()) {
                        c.budget = b;
                    }
                }
                // Replay keeps counting the money itself.
                "spent_micro" | "reserved_micro" => {}
                _ => {
                    self.fields.entry((table, name.to_string())).or_default().insert(field, new);
                }
            }
        }
        None
    }

    /// Sets the fields named in `keys` (event data key, field) that `data` holds.
    fn set_from(&mut self, table: Table, name: &str, data: &Value, keys: &[(&str, &'static str)]) {
        let fields = self.fields.entry((table, name.to_string())).or_default();
        for (key, field) in keys {
            if let Some(v) = data.get(*key) {
                fields.insert(field, v.clone());
            }
        }
    }
}

/// `agent.created` data keys and the fields they set.
const CREATED_KEYS: &[(&str, &str)] = &[
    ("token_sha256", "token_hash"),
    ("scope", "scope"),
    ("expires_at_ms", "expires_at_ms"),
    ("ttl_ms", "ttl_ms"),
    ("budget_period", "budget_period"),
    ("period_start_ms", "period_start_ms"),
    ("rpm", "rpm"),
    ("tpm", "tpm"),
    ("max_concurrent", "max_concurrent"),
    ("allowed_models", "allowed_models"),
    ("tools", "allow_tools"),
    ("streaming", "allow_streaming"),
    ("vision", "allow_vision"),
    ("strict", "strict"),
    ("allow_passthrough", "allow_passthrough"),
    ("team", "team"),
];

fn fail(rule: AuditRule, seq: Option<u64>, agent: Option<&str>, exec: Option<&str>, message: String) -> AuditFailure {
    AuditFailure { rule, seq, agent: agent.map(str::to_string), execution_id: exec.map(str::to_string), field: None, message }
}

fn fail_field(rule: AuditRule, who: Option<&str>, field: &str, message: String) -> AuditFailure {
    AuditFailure { field: Some(field.to_string()), ..fail(rule, None, who, None, message) }
}

/// Runs the audit inside a read transaction.
pub(crate) fn run(tx: &mut dyn Tx, hasher: &ChainHasher, anchor: Option<&Head>, now: i64) -> Result<AuditReport> {
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
        failure = check_live(tx, hasher, &state, &mut report)?;
    }
    if failure.is_none() {
        failure = check_rate_windows(tx, &state, now)?;
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
        EventKind::TeamCreated
        | EventKind::TeamBudgetSet
        | EventKind::TeamDeleted
        | EventKind::TeamOperatorEdit
        | EventKind::TeamRecorded => {
            let data = data();
            let Some(team) = data.get("team").and_then(|t| t.as_str()) else {
                return bad(AuditRule::Event, format!("{} event without a team", e.kind));
            };
            let exists = state.teams.contains_key(team);
            match kind {
                EventKind::TeamCreated if exists => return bad(AuditRule::Event, format!("team '{team}' created twice")),
                EventKind::TeamCreated => {
                    state.teams.insert(team.to_string(), Counters { budget: e.amount_micro, ..Counters::default() });
                    let fields = HashMap::from([("name", json!(team)), ("parent", data.get("parent").cloned().unwrap_or_default())]);
                    state.fields.insert((Table::Teams, team.to_string()), fields);
                }
                _ if !exists => return bad(AuditRule::Event, format!("{} event for team '{team}', which does not exist", e.kind)),
                EventKind::TeamBudgetSet => state.teams.entry(team.to_string()).or_default().budget = e.amount_micro,
                EventKind::TeamOperatorEdit | EventKind::TeamRecorded => {
                    if let Some(msg) = state.apply_fields(Table::Teams, team, &data, kind == EventKind::TeamRecorded) {
                        return bad(AuditRule::Event, msg);
                    }
                }
                _ => {
                    state.teams.remove(team);
                    state.fields.remove(&(Table::Teams, team.to_string()));
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
            let fields = HashMap::from([("name", json!(name)), ("disabled", json!(false))]);
            state.fields.insert((Table::Agents, name.to_string()), fields);
            state.set_from(Table::Agents, name, &data(), CREATED_KEYS);
            return None;
        }
        EventKind::AgentDeleted => {
            if state.agents.remove(name).is_none() {
                return bad(AuditRule::Event, format!("agent '{name}' deleted but does not exist"));
            }
            state.fields.remove(&(Table::Agents, name.to_string()));
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
            state.set_from(Table::Agents, name, &data(), &[("period_start_ms", "period_start_ms")]);
        }
        EventKind::AgentDisabled | EventKind::AgentEnabled => {
            let disabled = json!(kind == EventKind::AgentDisabled);
            state.fields.entry((Table::Agents, name.to_string())).or_default().insert("disabled", disabled);
        }
        EventKind::TokenRotated => {
            let data = data();
            if data.get("token_sha256").is_none() {
                // Written before rotations recorded the digest: the token is unknown from here.
                state.fields.entry((Table::Agents, name.to_string())).or_default().remove("token_hash");
            }
            state.set_from(Table::Agents, name, &data, &[("token_sha256", "token_hash"), ("ttl_ms", "ttl_ms"), ("expires_at_ms", "expires_at_ms")]);
        }
        EventKind::BudgetPeriodSet => {
            state.set_from(Table::Agents, name, &data(), &[("period", "budget_period"), ("period_start_ms", "period_start_ms")]);
        }
        EventKind::OperatorEdit | EventKind::AgentRecorded => {
            if let Some(msg) = state.apply_fields(Table::Agents, name, &data(), kind == EventKind::AgentRecorded) {
                return bad(AuditRule::Event, msg);
            }
        }
        _ => {
            let Some(id) = e.execution_id.as_deref() else {
                return bad(AuditRule::Event, format!("{} event without an execution id", e.kind));
            };
            if kind == EventKind::Reserved {
                if state.execs.contains_key(id) {
                    return bad(AuditRule::Event, format!("execution '{id}' reserved twice"));
                }
                let data = data();
                let teams: Vec<String> = data
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
                let int = |k: &str| data.get(k).and_then(Value::as_i64);
                let prices = Prices {
                    input: int("input_price").unwrap_or(0),
                    output: int("output_price").unwrap_or(0),
                    cached_input: int("cached_input_price"),
                };
                let rate = data.get("rate_scopes").and_then(Value::as_str).map(|s| (s.to_string(), int("rate_tokens").unwrap_or(0)));
                let x = ExecReplay {
                    agent: name.to_string(),
                    teams,
                    reserved: e.amount_micro,
                    state: ExecutionState::Reserved,
                    cost: 0,
                    created_ms: e.ts_ms,
                    prices,
                    rate_now: rate.as_ref().map_or(0, |r| r.1),
                    rate,
                };
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
            if kind == EventKind::Committed {
                let data = data();
                let int = |k: &str| data.get(k).and_then(Value::as_i64).unwrap_or(0);
                let usage = Usage { input_tokens: int("input_tokens"), output_tokens: int("output_tokens"), cached_input_tokens: int("cached_input_tokens") };
                let cost = usage.cost(&x.prices);
                if cost != e.amount_micro {
                    return bad(AuditRule::Event, format!("charges {} but its usage costs {cost} at the prices reserved", e.amount_micro));
                }
                x.rate_now = usage.input_tokens + usage.output_tokens;
            } else if new_state == ExecutionState::Committed && e.amount_micro != x.reserved {
                return bad(AuditRule::Event, format!("expiry charges {} but {} was reserved", e.amount_micro, x.reserved));
            } else if new_state != ExecutionState::Committed {
                x.rate_now = 0;
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
fn check_live(tx: &mut dyn Tx, hasher: &ChainHasher, replayed: &Replay, report: &mut AuditReport) -> Result<Option<AuditFailure>> {
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
            Some(r) if r.created_ms != x.created_at_ms => Some(format!("row admitted at {}, the ledger at {}", x.created_at_ms, r.created_ms)),
            Some(r) if r.prices != x.prices => Some(format!("row prices {:?}, the ledger {:?}", x.prices, r.prices)),
            Some(ExecReplay { rate: Some((scopes, tokens)), .. }) if *scopes != x.rate_scopes || *tokens != x.rate_tokens => Some(format!(
                "row counts {} tokens in rate scopes '{}', the ledger {tokens} in '{scopes}'",
                x.rate_tokens, x.rate_scopes
            )),
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
    for a in &live {
        let (token, seal) = tx.agent_seal(a.id)?.unwrap_or((crate::auth::TokenHash([0; 32]), None));
        let row = Recorded::of_agent(a, &hex::encode(token.0));
        if let Some(f) = check_row(hasher, replayed, Table::Agents, a.id, &row, agent_sums.get(&a.id), seal.as_ref()) {
            return Ok(Some(f));
        }
    }
    for t in &live_teams {
        let seal = tx.team_seal(t.id)?;
        if let Some(f) = check_row(hasher, replayed, Table::Teams, t.id, &Recorded::of_team(t), team_sums.get(&t.id), seal.as_ref()) {
            return Ok(Some(f));
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

/// Checks one agent or team row: its fields against replay, its counters against the executions,
/// its seal against replay.
fn check_row(
    hasher: &ChainHasher,
    replayed: &Replay,
    table: Table,
    id: i64,
    row: &Recorded,
    sums: Option<&Sums>,
    seal: Option<&outside::Seal>,
) -> Option<AuditFailure> {
    let name = row.get("name").and_then(Value::as_str).unwrap_or_default();
    let what = table.noun();
    let who = match table {
        Table::Agents => name.to_string(),
        Table::Teams => format!("team:{name}"),
    };
    let who = Some(who.as_str());
    let exists = match table {
        Table::Agents => replayed.agents.contains_key(name),
        Table::Teams => replayed.teams.contains_key(name),
    };
    if !exists {
        return Some(fail(AuditRule::Counters, None, who, None, format!("{what} row has no creation event")));
    }
    for (field, value) in row.iter() {
        let Some(expected) = replayed.value(table, name, field) else { continue };
        // A restricting difference is an operator's edit that no transaction has read yet.
        if *value != expected && outside::judge(field, &expected, value) == Verdict::Tampering {
            let rule = if matches!(field, "budget_micro" | "spent_micro" | "reserved_micro") { AuditRule::Counters } else { AuditRule::Policy };
            let msg = format!("{field} is {value} in the {} table but the ledger replays to {expected}", table.name());
            return Some(fail_field(rule, who, field, msg));
        }
    }
    let counter = |f: &str| row.get(f).and_then(Value::as_i64).unwrap_or(0);
    let (spent, reserved) = (counter("spent_micro"), counter("reserved_micro"));
    let sums = sums.copied().unwrap_or_default();
    if spent != sums.spent {
        let msg = format!("spent_micro is {spent} but committed executions sum to {}", sums.spent);
        return Some(AuditFailure { field: Some("spent_micro".into()), ..fail(AuditRule::SpentSum, None, who, None, msg) });
    }
    if reserved != sums.reserved {
        let msg = format!("reserved_micro is {reserved} but open executions sum to {}", sums.reserved);
        return Some(AuditFailure { field: Some("reserved_micro".into()), ..fail(AuditRule::ReservedSum, None, who, None, msg) });
    }
    let sealed = match outside::open_seal(hasher, table, id, seal) {
        Ok(sealed) => sealed,
        Err(msg) => return Some(fail_field(AuditRule::Policy, who, "seal", msg)),
    };
    for (field, value) in sealed.iter() {
        if let Some(expected) = replayed.value(table, name, field)
            && *value != expected
        {
            let msg = format!("the row's seal records {field} = {value} but the ledger replays to {expected}");
            return Some(fail_field(AuditRule::Policy, who, field, msg));
        }
    }
    None
}

/// Rebuilds the rate windows of the last minute from the replayed admissions and compares them
/// with the `rate_buckets` rows. Skipped while the window still holds admissions recorded before
/// reservation events carried their rate scopes.
fn check_rate_windows(tx: &mut dyn Tx, replayed: &Replay, now: i64) -> Result<Option<AuditFailure>> {
    let from = rate::first_bucket(now);
    let mut expected: BTreeMap<(String, i64), (i64, i64)> = BTreeMap::new();
    for x in replayed.execs.values() {
        let second = rate::bucket_of(x.created_ms);
        if second < from {
            continue;
        }
        let Some((scopes, _)) = &x.rate else { return Ok(None) };
        for scope in scopes.split_whitespace() {
            let b = expected.entry((scope.to_string(), second)).or_default();
            b.0 += 1;
            b.1 += x.rate_now;
        }
    }
    let mut live: BTreeMap<(String, i64), (i64, i64)> =
        tx.all_rate_buckets(from)?.into_iter().map(|(scope, b)| ((scope, b.second), (b.requests, b.tokens))).collect();
    let window = |scope: &str, second: i64, got: (i64, i64), want: (i64, i64)| {
        let msg = format!(
            "rate_buckets holds {} requests and {} tokens for scope '{scope}' at second {second}, but the ledger's \
             admissions count {} and {} (a deleted or lowered bucket resets a rate window)",
            got.0, got.1, want.0, want.1
        );
        Some(fail_field(AuditRule::RateWindow, None, "rate_buckets", msg))
    };
    for ((scope, second), want) in &expected {
        let got = live.remove(&(scope.clone(), *second)).unwrap_or((0, 0));
        if got != *want {
            return Ok(window(scope, *second, got, *want));
        }
    }
    Ok(live.into_iter().next().and_then(|((scope, second), got)| window(&scope, second, got, (0, 0))))
}
