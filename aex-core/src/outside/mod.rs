//! Outside edits: what an edit made to the database behind aex's back means, and how every write
//! transaction tells an operator's action from tampering.
//!
//! The database may be edited by hand (the documented "live severing": `UPDATE agents SET
//! budget_micro = spent_micro WHERE name = 'atlas'`). An edit that only **restricts** is an
//! operator action: lowering `budget_micro`, setting `disabled`, lowering (or setting) `rpm`,
//! `tpm` or `max_concurrent`, narrowing `allowed_models`, turning `allow_tools`,
//! `allow_streaming`, `allow_vision` or `allow_passthrough` off, turning `strict` on; for a team,
//! lowering `budget_micro`. Every other change of a field that grants or limits power is
//! **tampering**: raising a budget, lowering `spent_micro` or `reserved_micro` (or changing them
//! at all), re-enabling, widening models or capabilities, and any change of the token hash, scope,
//! expiry, TTL, budget period or its start, team or name. Loosening is done through aex, which
//! ledgers it.
//!
//! ## One mechanism: the seal
//!
//! Each `agents` and `teams` row carries a **seal**: the row's power fields ([`AGENT_FIELDS`],
//! [`TEAM_FIELDS`]) as aex last wrote them, as a canonical JSON array in that order, with a tag
//! `link(zero, ["aex seal", table, id, text])` computed by the ledger's [`ChainHasher`] — an
//! HMAC under the ledger key, so whoever can write the file without the key cannot forge a seal
//! (without a key it is a plain SHA-256, which catches careless edits only, like the chain).
//! aex writes the seal in the same transaction as the change and its ledger event, so the seal is
//! always the ledger's replayed state of that row; `audit` checks exactly that.
//!
//! Every write transaction runs its closure over a `Guard`, which wraps the store's [`Tx`]:
//! whenever the closure loads an agent or team row (admission, settlement, expiry, any change
//! through aex), the guard compares the live row with its seal before handing it out.
//! * Same fields, valid tag: the row is used. The cost is one primary-key read of the seal
//!   columns, one serialization and one tag.
//! * Only restricting differences: each is appended to the ledger as an `agent.operator_edit` /
//!   `team.operator_edit` event (`field`, `old`, `new`) and the row is re-sealed, in this same
//!   transaction — so the very decision that read the row obeys it, and the audit replays it.
//! * Any loosening difference, a missing or forged seal: the closure fails with
//!   [`Error::Tampered`] (503) naming the first such field, and its transaction rolls back. aex
//!   never admits, settles, renews a period or writes a keyed event over such a row. The row
//!   works again once it is put back to its sealed values (the message says them).
//!
//! The guard remembers the rows it verified or wrote only for the closure it serves; nothing
//! outlives the transaction, so an edit made between two transactions governs the next one.
//!
//! What the seal does not cover, by design: copying back an older, genuinely sealed row (from a
//! backup of the file) is accepted by the kernel and named by `audit`, which compares every seal
//! with the replayed ledger; a whole-file rollback is found only with an anchor (see
//! [`crate::ledger::audit`]). Deleted `rate_buckets` rows reset RPM/TPM windows; the kernel does
//! not rebuild windows on the hot path, so such a deletion can let through at most one more
//! window's worth of requests (budgets still hold), and `audit` names it while the window it
//! reset is still within the last minute.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::agent::Agent;
use crate::error::{Error, Result};
use crate::ledger::{self, ChainHasher, Event, EventKind, GENESIS_HASH, Head, NewEvent};
use crate::execution::Execution;
use crate::rate::Bucket;
use crate::store::Tx;
use crate::team::Team;
use crate::auth::TokenHash;

/// The power fields of an agent row, in the order they are checked and named.
pub const AGENT_FIELDS: &[&str] = &[
    "name",
    "token_hash",
    "scope",
    "expires_at_ms",
    "ttl_ms",
    "disabled",
    "budget_micro",
    "spent_micro",
    "reserved_micro",
    "budget_period",
    "period_start_ms",
    "rpm",
    "tpm",
    "max_concurrent",
    "allowed_models",
    "allow_tools",
    "allow_streaming",
    "allow_vision",
    "strict",
    "allow_passthrough",
    "team",
];

/// The power fields of a team row, in order.
pub const TEAM_FIELDS: &[&str] = &["name", "budget_micro", "spent_micro", "reserved_micro", "parent"];

/// Which table a sealed row is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// `agents`.
    Agents,
    /// `teams`.
    Teams,
}

impl Table {
    /// `agent` or `team`.
    pub const fn noun(self) -> &'static str {
        match self {
            Table::Agents => "agent",
            Table::Teams => "team",
        }
    }

    /// The table's name.
    pub const fn name(self) -> &'static str {
        match self {
            Table::Agents => "agents",
            Table::Teams => "teams",
        }
    }

    /// Its power fields, in order.
    pub const fn fields(self) -> &'static [&'static str] {
        match self {
            Table::Agents => AGENT_FIELDS,
            Table::Teams => TEAM_FIELDS,
        }
    }

    fn edit_kind(self) -> EventKind {
        match self {
            Table::Agents => EventKind::OperatorEdit,
            Table::Teams => EventKind::TeamOperatorEdit,
        }
    }

    fn baseline_kind(self) -> EventKind {
        match self {
            Table::Agents => EventKind::AgentRecorded,
            Table::Teams => EventKind::TeamRecorded,
        }
    }
}

/// A row's power fields, one value per field of its table, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    table: Table,
    values: Vec<Value>,
}

impl Recorded {
    /// An agent row's fields; `token_hash` is the hex of the stored SHA-256 digest of its token.
    pub fn of_agent(a: &Agent, token_hash: &str) -> Recorded {
        let values = vec![
            json!(a.name),
            json!(token_hash),
            json!(a.scope.as_str()),
            json!(a.expires_at_ms),
            json!(a.ttl_ms),
            json!(a.disabled),
            json!(a.budget_micro),
            json!(a.spent_micro),
            json!(a.reserved_micro),
            json!(a.budget_period.as_str()),
            json!(a.period_start_ms),
            json!(a.rpm),
            json!(a.tpm),
            json!(a.max_concurrent),
            json!(a.allowed_models),
            json!(a.capabilities.tools),
            json!(a.capabilities.streaming),
            json!(a.capabilities.vision),
            json!(a.strict),
            json!(a.allow_passthrough),
            json!(a.team),
        ];
        Recorded { table: Table::Agents, values }
    }

    /// A team row's fields.
    pub fn of_team(t: &Team) -> Recorded {
        let values = vec![json!(t.name), json!(t.budget_micro), json!(t.spent_micro), json!(t.reserved_micro), json!(t.parent)];
        Recorded { table: Table::Teams, values }
    }

    /// The value of `field`.
    pub fn get(&self, field: &str) -> Option<&Value> {
        self.table.fields().iter().position(|f| *f == field).map(|i| &self.values[i])
    }

    fn set(&mut self, field: &str, value: Value) {
        if let Some(i) = self.table.fields().iter().position(|f| *f == field) {
            self.values[i] = value;
        }
    }

    /// The fields and their values, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &Value)> {
        self.table.fields().iter().copied().zip(&self.values)
    }

    /// Canonical text: a compact JSON array of the values in field order (short, because it is
    /// stored in the row and hashed on every load).
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(256);
        out.push('[');
        for (i, value) in self.values.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            // Writing to a String cannot fail; `Value`'s Display is compact JSON.
            let _ = write!(out, "{value}");
        }
        out.push(']');
        out
    }

    /// The fields as a JSON object (for ledger events).
    pub fn to_json(&self) -> Value {
        Value::Object(self.iter().map(|(f, v)| (f.to_string(), v.clone())).collect())
    }

    /// Parses a seal's text; `None` unless it holds one value per field of `table`.
    pub fn parse(table: Table, text: &str) -> Option<Recorded> {
        let values: Vec<Value> = serde_json::from_str(text).ok()?;
        (values.len() == table.fields().len()).then_some(Recorded { table, values })
    }

    fn name(&self) -> &str {
        self.values[0].as_str().unwrap_or_default()
    }
}

/// What an outside change of one field is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It only restricts: an operator action, recorded and obeyed.
    Operator,
    /// It grants power or rewrites history: refused by the kernel, named by the audit.
    Tampering,
}

/// Judges a change of `field` from `old` (as ledgered) to `new` (as found).
pub fn judge(field: &str, old: &Value, new: &Value) -> Verdict {
    let restricts = match field {
        "budget_micro" => matches!((old.as_i64(), new.as_i64()), (Some(o), Some(n)) if n < o),
        "disabled" | "strict" => *old == Value::Bool(false) && *new == Value::Bool(true),
        "allow_tools" | "allow_streaming" | "allow_vision" | "allow_passthrough" => {
            *old == Value::Bool(true) && *new == Value::Bool(false)
        }
        // `null` is no limit.
        "rpm" | "tpm" | "max_concurrent" => match (old.as_u64(), new.as_u64()) {
            (None, Some(_)) => old.is_null(),
            (Some(o), Some(n)) => n < o,
            _ => false,
        },
        // Empty is every configured model.
        "allowed_models" => match (old.as_array(), new.as_array()) {
            (Some(o), Some(n)) => !n.is_empty() && (o.is_empty() || n.iter().all(|m| o.contains(m))),
            _ => false,
        },
        _ => false,
    };
    if restricts { Verdict::Operator } else { Verdict::Tampering }
}

/// One field that differs between the ledgered and the live row.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The field (column) name.
    pub field: &'static str,
    /// As ledgered.
    pub old: Value,
    /// As found.
    pub new: Value,
    /// What it is.
    pub verdict: Verdict,
}

/// Every field that differs, in field order.
pub fn changes(recorded: &Recorded, live: &Recorded) -> Vec<Change> {
    recorded
        .iter()
        .zip(&live.values)
        .filter(|((_, old), new)| old != new)
        .map(|((field, old), new)| Change { field, old: old.clone(), new: new.clone(), verdict: judge(field, old, new) })
        .collect()
}

/// A row's seal as stored: its ledgered fields' text and their tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    /// [`Recorded::text`].
    pub text: String,
    /// [`tag`] of the text.
    pub tag: Vec<u8>,
}

/// The tag that authenticates a seal's text for one row: the ledger hasher's link from the zero
/// hash over `aex seal NUL table NUL id NUL text` (ledger rows hash JSON arrays, which start with
/// `[`, so the two can never be confused).
pub fn tag(hasher: &ChainHasher, table: Table, id: i64, text: &str) -> [u8; 32] {
    let mut bytes = Vec::with_capacity(text.len() + 32);
    bytes.extend_from_slice(b"aex seal\0");
    bytes.extend_from_slice(table.noun().as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(id.to_string().as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(text.as_bytes());
    hasher.link(&GENESIS_HASH, &bytes)
}

/// Checks a stored seal's tag and reads it. `Err` names what is wrong.
pub fn open_seal(hasher: &ChainHasher, table: Table, id: i64, seal: Option<&Seal>) -> std::result::Result<Recorded, String> {
    let Some(seal) = seal else { return Err("the row has no seal: it was not written by aex".into()) };
    if seal.tag[..] != tag(hasher, table, id, &seal.text)[..] {
        return Err("the row's seal does not verify: it was not written by aex with this ledger key".into());
    }
    Recorded::parse(table, &seal.text).ok_or_else(|| "the row's seal cannot be read".into())
}

fn tampered(table: Table, name: &str, field: &str, message: String) -> Error {
    Error::Tampered { field: field.to_string(), message: format!("{} '{name}': {message}", table.noun()) }
}

/// The refusal for a loosening change.
fn loosened(table: Table, name: &str, c: &Change) -> Error {
    tampered(
        table,
        name,
        c.field,
        format!(
            "{} is {} in the {} table but the ledger says {}; only restricting edits may be made outside aex \
             (put it back, then change it through aex)",
            c.field,
            c.new,
            table.name(),
            c.old
        ),
    )
}

/// The ledger event recording one operator edit.
fn edit_event<'a>(table: Table, name: &'a str, c: &Change) -> NewEvent<'a> {
    let data = json!({ "field": c.field, "old": c.old, "new": c.new });
    match table {
        Table::Agents => NewEvent::agent(table.edit_kind(), name, 0, data),
        Table::Teams => {
            let mut data = data;
            data["team"] = json!(name);
            NewEvent::global(table.edit_kind(), 0, data)
        }
    }
}

/// A write transaction as the rules see it: the store's [`Tx`], with every agent and team row
/// checked against its seal when loaded and re-sealed when written (see the module docs).
pub(crate) struct Guard<'t> {
    tx: &'t mut dyn Tx,
    hasher: &'t ChainHasher,
    now: i64,
    /// Rows verified or written by this closure, as now sealed. Dropped with the closure.
    seen: HashMap<(Table, i64), Recorded>,
}

impl<'t> Guard<'t> {
    pub(crate) fn new(tx: &'t mut dyn Tx, hasher: &'t ChainHasher, now: i64) -> Guard<'t> {
        Guard { tx, hasher, now, seen: HashMap::new() }
    }

    fn check_agent(&mut self, agent: Agent) -> Result<Agent> {
        if self.seen.contains_key(&(Table::Agents, agent.id)) {
            return Ok(agent);
        }
        if agent.allowed_models.len() > crate::agent::MAX_ALLOWED_MODELS {
            // More than aex ever writes (and comparing such lists would hold the write lock).
            let rule = format!("lists {} models; aex allows at most {}", agent.allowed_models.len(), crate::agent::MAX_ALLOWED_MODELS);
            return Err(tampered(Table::Agents, &agent.name, "allowed_models", rule));
        }
        let (token, seal) = self.tx.agent_seal(agent.id)?.ok_or_else(|| Error::Internal("agent vanished inside a transaction".into()))?;
        let live = Recorded::of_agent(&agent, &hex::encode(token.0));
        self.verify(Table::Agents, agent.id, live, seal)?;
        Ok(agent)
    }

    fn check_team(&mut self, team: Team) -> Result<Team> {
        if self.seen.contains_key(&(Table::Teams, team.id)) {
            return Ok(team);
        }
        let seal = self.tx.team_seal(team.id)?;
        self.verify(Table::Teams, team.id, Recorded::of_team(&team), seal)?;
        Ok(team)
    }

    /// Compares a live row with its seal: uses it, records restricting edits, or refuses.
    fn verify(&mut self, table: Table, id: i64, live: Recorded, seal: Option<Seal>) -> Result<()> {
        let name = live.name().to_string();
        if let Some(seal) = &seal
            && seal.text == live.text()
            && seal.tag[..] == tag(self.hasher, table, id, &seal.text)[..]
        {
            self.seen.insert((table, id), live);
            return Ok(());
        }
        let recorded = open_seal(self.hasher, table, id, seal.as_ref()).map_err(|m| tampered(table, &name, "seal", m))?;
        let changes = changes(&recorded, &live);
        if let Some(c) = changes.iter().find(|c| c.verdict == Verdict::Tampering) {
            return Err(loosened(table, recorded.name(), c));
        }
        for c in &changes {
            ledger::append(self.tx, self.hasher, self.now, edit_event(table, &name, c))?;
        }
        self.seal(table, id, live)
    }

    fn seal(&mut self, table: Table, id: i64, rec: Recorded) -> Result<()> {
        let text = rec.text();
        let tag = tag(self.hasher, table, id, &text);
        match table {
            Table::Agents => self.tx.set_agent_seal(id, &text, &tag)?,
            Table::Teams => self.tx.set_team_seal(id, &text, &tag)?,
        }
        self.seen.insert((table, id), rec);
        Ok(())
    }

    /// Makes sure a row this closure is about to write was verified (loading it if it was not),
    /// and returns whether it exists.
    fn ensure_seen(&mut self, table: Table, id: i64) -> Result<bool> {
        if !self.seen.contains_key(&(table, id)) {
            match table {
                Table::Agents => {
                    self.agent_by_id(id)?;
                }
                Table::Teams => {
                    self.team_by_id(id)?;
                }
            }
        }
        Ok(self.seen.contains_key(&(table, id)))
    }

    /// The sealed state of a row this closure is about to write.
    fn sealed(&mut self, table: Table, id: i64) -> Result<Option<Recorded>> {
        self.ensure_seen(table, id)?;
        Ok(self.seen.get(&(table, id)).cloned())
    }

    /// Changes some fields of a row and re-seals it.
    fn reseal(&mut self, table: Table, id: i64, fields: &[(&str, Value)]) -> Result<()> {
        if let Some(mut rec) = self.sealed(table, id)? {
            for (f, v) in fields {
                rec.set(f, v.clone());
            }
            self.seal(table, id, rec)?;
        }
        Ok(())
    }

    /// Writes a row's counters and its new seal in one statement: the hot path of admission and
    /// settlement.
    fn write_counters(&mut self, table: Table, id: i64, spent: i64, reserved: i64) -> Result<()> {
        if !self.ensure_seen(table, id)? {
            return match table {
                Table::Agents => self.tx.update_counters(id, spent, reserved),
                Table::Teams => self.tx.update_team_counters(id, spent, reserved),
            };
        }
        let Some(rec) = self.seen.get_mut(&(table, id)) else { return Ok(()) };
        rec.set("spent_micro", json!(spent));
        rec.set("reserved_micro", json!(reserved));
        let text = rec.text();
        let tag = tag(self.hasher, table, id, &text);
        match table {
            Table::Agents => self.tx.update_counters_sealed(id, spent, reserved, &text, &tag),
            Table::Teams => self.tx.update_team_counters_sealed(id, spent, reserved, &text, &tag),
        }
    }

    /// Checks every agent and team row, recording operator edits; rows found tampered are
    /// skipped (their refusal writes nothing), for `audit` to name.
    pub(crate) fn sweep(&mut self) -> Result<()> {
        for a in self.tx.agents()? {
            match self.check_agent(a) {
                Ok(_) | Err(Error::Tampered { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        for t in self.tx.teams()? {
            match self.check_team(t) {
                Ok(_) | Err(Error::Tampered { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Seals every row that has no seal and records it as an `agent.recorded` / `team.recorded`
    /// baseline event: for a database written before seals existed. Run once, when the store's
    /// `sealed` mark is absent; afterwards a missing seal is tampering.
    ///
    /// Only a database that has never been sealed gets a baseline: if any row carries a seal, or
    /// the ledger holds anything a sealing aex writes (baselines, operator edits, creations with
    /// a token digest), an unsealed row was unsealed by hand — deleting the mark, or the seal
    /// columns with the schema version, does not turn tampering into a baseline.
    pub(crate) fn seal_unsealed(&mut self) -> Result<()> {
        // Each row once, with its seal; store errors propagate.
        let (mut sealed, mut agents, mut teams) = (false, Vec::new(), Vec::new());
        for a in self.tx.agents()? {
            match self.tx.agent_seal(a.id)? {
                Some((token, None)) => agents.push((a, token)),
                Some((_, Some(_))) => sealed = true,
                None => {}
            }
        }
        for t in self.tx.teams()? {
            if self.tx.team_seal(t.id)?.is_none() { teams.push(t) } else { sealed = true }
        }
        let first = match (agents.first(), teams.first()) {
            (Some((a, _)), _) => (Table::Agents, a.name.clone()),
            (None, Some(t)) => (Table::Teams, t.name.clone()),
            (None, None) => return Ok(()),
        };
        if !sealed {
            self.tx.for_each_event(1, &mut |e| {
                sealed = matches!(e.kind.as_str(), "agent.recorded" | "team.recorded" | "agent.operator_edit" | "team.operator_edit")
                    || (e.kind == "agent.created" && e.data.contains("token_sha256"));
                Ok(!sealed)
            })?;
        }
        if sealed {
            return Err(tampered(first.0, &first.1, "seal", "has no seal, but this database was sealed: the seal was removed by hand".into()));
        }
        for (a, token) in agents {
            let rec = Recorded::of_agent(&a, &hex::encode(token.0));
            let kind = Table::Agents.baseline_kind();
            ledger::append(self.tx, self.hasher, self.now, NewEvent::agent(kind, &a.name, 0, rec.to_json()))?;
            self.seal(Table::Agents, a.id, rec)?;
        }
        for t in teams {
            let rec = Recorded::of_team(&t);
            let mut data = rec.to_json();
            data["team"] = json!(t.name);
            ledger::append(self.tx, self.hasher, self.now, NewEvent::global(Table::Teams.baseline_kind(), 0, data))?;
            self.seal(Table::Teams, t.id, rec)?;
        }
        Ok(())
    }
}

/// Reads go to the store and through the seal check; writes of agents and teams re-seal them.
impl Tx for Guard<'_> {
    fn agent_by_token(&mut self, token: &TokenHash) -> Result<Option<Agent>> {
        self.tx.agent_by_token(token)?.map(|a| self.check_agent(a)).transpose()
    }
    fn agent_by_name(&mut self, name: &str) -> Result<Option<Agent>> {
        self.tx.agent_by_name(name)?.map(|a| self.check_agent(a)).transpose()
    }
    fn agent_by_id(&mut self, id: i64) -> Result<Option<Agent>> {
        self.tx.agent_by_id(id)?.map(|a| self.check_agent(a)).transpose()
    }
    fn agents(&mut self) -> Result<Vec<Agent>> {
        self.tx.agents()?.into_iter().map(|a| self.check_agent(a)).collect()
    }
    fn insert_agent(&mut self, agent: &Agent, token: &TokenHash) -> Result<i64> {
        let id = self.tx.insert_agent(agent, token)?;
        self.seal(Table::Agents, id, Recorded::of_agent(agent, &hex::encode(token.0)))?;
        Ok(id)
    }
    fn update_agent(&mut self, agent: &Agent) -> Result<()> {
        self.ensure_seen(Table::Agents, agent.id)?;
        let token = self.seen.get(&(Table::Agents, agent.id)).and_then(|r| r.get("token_hash").cloned());
        self.tx.update_agent(agent)?;
        if let Some(Value::String(token)) = token {
            self.seal(Table::Agents, agent.id, Recorded::of_agent(agent, &token))?;
        }
        Ok(())
    }
    fn update_counters(&mut self, agent_id: i64, spent_micro: i64, reserved_micro: i64) -> Result<()> {
        self.write_counters(Table::Agents, agent_id, spent_micro, reserved_micro)
    }
    fn set_token(&mut self, agent_id: i64, token: &TokenHash, prefix: &str, expires_at_ms: Option<i64>) -> Result<()> {
        self.sealed(Table::Agents, agent_id)?;
        self.tx.set_token(agent_id, token, prefix, expires_at_ms)?;
        let fields = [("token_hash", json!(hex::encode(token.0))), ("expires_at_ms", json!(expires_at_ms))];
        self.reseal(Table::Agents, agent_id, &fields)
    }
    fn delete_agent(&mut self, agent_id: i64) -> Result<()> {
        self.tx.delete_agent(agent_id)?;
        self.seen.remove(&(Table::Agents, agent_id));
        Ok(())
    }
    fn agent_seal(&mut self, agent_id: i64) -> Result<Option<(TokenHash, Option<Seal>)>> {
        self.tx.agent_seal(agent_id)
    }
    fn set_agent_seal(&mut self, agent_id: i64, text: &str, tag: &[u8]) -> Result<()> {
        self.tx.set_agent_seal(agent_id, text, tag)
    }

    fn team_by_name(&mut self, name: &str) -> Result<Option<Team>> {
        self.tx.team_by_name(name)?.map(|t| self.check_team(t)).transpose()
    }
    fn team_by_id(&mut self, id: i64) -> Result<Option<Team>> {
        self.tx.team_by_id(id)?.map(|t| self.check_team(t)).transpose()
    }
    fn teams(&mut self) -> Result<Vec<Team>> {
        self.tx.teams()?.into_iter().map(|t| self.check_team(t)).collect()
    }
    fn insert_team(&mut self, team: &Team) -> Result<i64> {
        let id = self.tx.insert_team(team)?;
        self.seal(Table::Teams, id, Recorded::of_team(team))?;
        Ok(id)
    }
    fn update_team_budget(&mut self, team_id: i64, budget_micro: i64) -> Result<()> {
        self.sealed(Table::Teams, team_id)?;
        self.tx.update_team_budget(team_id, budget_micro)?;
        self.reseal(Table::Teams, team_id, &[("budget_micro", json!(budget_micro))])
    }
    fn update_team_counters(&mut self, team_id: i64, spent_micro: i64, reserved_micro: i64) -> Result<()> {
        self.write_counters(Table::Teams, team_id, spent_micro, reserved_micro)
    }
    fn delete_team(&mut self, team_id: i64) -> Result<()> {
        self.tx.delete_team(team_id)?;
        self.seen.remove(&(Table::Teams, team_id));
        Ok(())
    }
    fn team_members(&mut self, team_id: i64) -> Result<i64> {
        self.tx.team_members(team_id)
    }
    fn team_seal(&mut self, team_id: i64) -> Result<Option<Seal>> {
        self.tx.team_seal(team_id)
    }
    fn set_team_seal(&mut self, team_id: i64, text: &str, tag: &[u8]) -> Result<()> {
        self.tx.set_team_seal(team_id, text, tag)
    }

    fn rate_buckets(&mut self, scope: &str, from_second: i64) -> Result<Vec<Bucket>> {
        self.tx.rate_buckets(scope, from_second)
    }
    fn all_rate_buckets(&mut self, from_second: i64) -> Result<Vec<(String, Bucket)>> {
        self.tx.all_rate_buckets(from_second)
    }
    fn rate_add(&mut self, scope: &str, second: i64, requests: i64, tokens: i64) -> Result<()> {
        self.tx.rate_add(scope, second, requests, tokens)
    }
    fn rate_prune(&mut self, scope: &str, before_second: i64) -> Result<()> {
        self.tx.rate_prune(scope, before_second)
    }
    fn rate_adjust(&mut self, scope: &str, second: i64, delta: i64) -> Result<()> {
        self.tx.rate_adjust(scope, second, delta)
    }
    fn open_count(&mut self, agent_id: Option<i64>) -> Result<(i64, Option<i64>)> {
        self.tx.open_count(agent_id)
    }

    fn execution(&mut self, id: &str) -> Result<Option<Execution>> {
        self.tx.execution(id)
    }
    fn insert_execution(&mut self, execution: &Execution) -> Result<()> {
        self.tx.insert_execution(execution)
    }
    fn update_execution(&mut self, execution: &Execution) -> Result<()> {
        self.tx.update_execution(execution)
    }
    fn open_executions(&mut self, agent_id: Option<i64>, expiring_by: Option<i64>) -> Result<Vec<Execution>> {
        self.tx.open_executions(agent_id, expiring_by)
    }
    fn for_each_execution(&mut self, f: &mut dyn FnMut(Execution) -> Result<()>) -> Result<()> {
        self.tx.for_each_execution(f)
    }

    fn ledger_head(&mut self) -> Result<Option<Head>> {
        self.tx.ledger_head()
    }
    fn append_event(&mut self, event: &Event) -> Result<()> {
        self.tx.append_event(event)
    }
    fn for_each_event(&mut self, from_seq: u64, f: &mut dyn FnMut(Event) -> Result<bool>) -> Result<()> {
        self.tx.for_each_event(from_seq, f)
    }
    fn spend_since(&mut self, since_ms: i64) -> Result<Vec<(String, i64)>> {
        self.tx.spend_since(since_ms)
    }
    fn meta(&mut self, key: &str) -> Result<Option<String>> {
        self.tx.meta(key)
    }
    fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        self.tx.set_meta(key, value)
    }
    fn sync_later(&mut self) {
        self.tx.sync_later();
    }
    fn prefetch(&mut self, wants: &[crate::store::Prefetch<'_>]) {
        self.tx.prefetch(wants);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restricting_edits_are_operator_actions_and_the_rest_tampering() {
        use Verdict::*;
        let cases: &[(&str, Value, Value, Verdict)] = &[
            ("budget_micro", json!(100), json!(99), Operator),
            ("budget_micro", json!(100), json!(101), Tampering),
            ("disabled", json!(false), json!(true), Operator),
            ("disabled", json!(true), json!(false), Tampering),
            ("strict", json!(false), json!(true), Operator),
            ("strict", json!(true), json!(false), Tampering),
            ("allow_tools", json!(true), json!(false), Operator),
            ("allow_vision", json!(false), json!(true), Tampering),
            ("allow_passthrough", json!(false), json!(true), Tampering),
            ("allow_passthrough", json!(true), json!(false), Operator),
            ("rpm", json!(null), json!(5), Operator),
            ("rpm", json!(10), json!(5), Operator),
            ("rpm", json!(10), json!(11), Tampering),
            ("tpm", json!(10), json!(null), Tampering),
            ("max_concurrent", json!(3), json!(1), Operator),
            ("allowed_models", json!([]), json!(["a"]), Operator),
            ("allowed_models", json!(["a", "b"]), json!(["b"]), Operator),
            ("allowed_models", json!(["a"]), json!([]), Tampering),
            ("allowed_models", json!(["a"]), json!(["a", "c"]), Tampering),
            ("spent_micro", json!(10), json!(9), Tampering),
            ("spent_micro", json!(10), json!(11), Tampering),
            ("token_hash", json!("aa"), json!("bb"), Tampering),
            ("scope", json!("execution"), json!("read-only"), Tampering),
            ("budget_period", json!("never"), json!("day"), Tampering),
            ("period_start_ms", json!(5), json!(0), Tampering),
            ("team", json!(null), json!("t"), Tampering),
        ];
        for (field, old, new, verdict) in cases {
            assert_eq!(judge(field, old, new), *verdict, "{field}: {old} -> {new}");
        }
    }

    #[test]
    fn seals_round_trip_and_bind_the_row() {
        let t = Team { id: 3, name: "ops".into(), parent_id: None, parent: None, budget_micro: 9, spent_micro: 1, reserved_micro: 2, created_at_ms: 0 };
        let rec = Recorded::of_team(&t);
        assert_eq!(Recorded::parse(Table::Teams, &rec.text()).unwrap(), rec);
        let h = ChainHasher::new(Some(b"k")).unwrap();
        let seal = Seal { text: rec.text(), tag: tag(&h, Table::Teams, 3, &rec.text()).to_vec() };
        assert!(open_seal(&h, Table::Teams, 3, Some(&seal)).is_ok());
        assert!(open_seal(&h, Table::Teams, 4, Some(&seal)).is_err(), "a seal cannot move to another row");
        assert!(open_seal(&ChainHasher::new(None).unwrap(), Table::Teams, 3, Some(&seal)).is_err());
    }
}
