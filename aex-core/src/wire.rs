//! The JSON forms every surface shares: what the C ABI takes and gives as JSON text, what the
//! scenario vectors in `tests/vectors` are written in, and what the CLI prints with `--json`.
//!
//! Parsing is strict: unknown fields are refused (a misspelt `max_output_tokens` must not vanish)
//! and errors name the field. Amounts are integers in micro-USD (`*_micro`); a budget may also be
//! given as exact USD text (`"budget_usd": "5.00"`).

use serde::Deserialize;
use serde_json::{Value, json};

use crate::admission::{AdmitRequest, Admission, Message};
use crate::agent::{Agent, AgentSpec, Capabilities};
use crate::auth::Scope;
use crate::budget::BudgetPeriod;
use crate::error::{Error, Result};
use crate::execution::Execution;
use crate::ledger::audit::AuditReport;
use crate::money;
use crate::settlement::{Settlement, Usage};
use crate::team::Team;

fn parse<'a, T: Deserialize<'a>>(what: &str, text: &'a str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| {
        // serde names the field in its message ("unknown field `x`", "missing field `name`").
        Error::invalid(what, e.to_string())
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentSpecJson {
    name: String,
    budget_usd: Option<String>,
    budget_micro: Option<i64>,
    rpm: Option<u32>,
    tpm: Option<u64>,
    #[serde(default)]
    allowed_models: Vec<String>,
    tools: Option<bool>,
    streaming: Option<bool>,
    vision: Option<bool>,
    #[serde(default)]
    strict: bool,
    ttl_ms: Option<i64>,
    scope: Option<String>,
    #[serde(default)]
    allow_passthrough: bool,
    max_concurrent: Option<u32>,
    budget_period: Option<String>,
    team: Option<String>,
}

/// Parses an agent spec: `{"name": "atlas", "budget_usd": "5.00", "rpm": 30, ...}`.
///
/// # Errors
/// [`Error::InvalidRequest`] naming the field (`agent_spec` for JSON syntax and shape).
pub fn agent_spec(text: &str) -> Result<AgentSpec> {
    let j: AgentSpecJson = parse("agent_spec", text)?;
    let budget_micro = match (&j.budget_usd, j.budget_micro) {
        (Some(usd), None) => money::parse_usd("budget_usd", usd)?,
        (None, Some(micro)) => micro,
        _ => return Err(Error::invalid("budget_usd", "give exactly one of budget_usd and budget_micro")),
    };
    let defaults = Capabilities::default();
    Ok(AgentSpec {
        name: j.name,
        budget_micro,
        rpm: j.rpm,
        tpm: j.tpm,
        allowed_models: j.allowed_models,
        capabilities: Capabilities {
            tools: j.tools.unwrap_or(defaults.tools),
            streaming: j.streaming.unwrap_or(defaults.streaming),
            vision: j.vision.unwrap_or(defaults.vision),
        },
        strict: j.strict,
        ttl_ms: j.ttl_ms,
        scope: j.scope.as_deref().map(Scope::parse).transpose()?.unwrap_or_default(),
        allow_passthrough: j.allow_passthrough,
        max_concurrent: j.max_concurrent,
        budget_period: j.budget_period.as_deref().map(BudgetPeriod::parse).transpose()?.unwrap_or_default(),
        team: j.team,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageJson {
    role: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdmitRequestJson {
    execution_id: Option<String>,
    model: String,
    input_tokens: Option<i64>,
    max_output_tokens: Option<i64>,
    #[serde(default)]
    messages: Vec<MessageJson>,
    #[serde(default)]
    tools: bool,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    vision: bool,
}

/// Parses an admission request: `{"model": "gpt-4o-mini", "input_tokens": 1200,
/// "max_output_tokens": 256, "messages": [{"role": "user", "content": "..."}], "tools": false,
/// "stream": false, "vision": false, "execution_id": "job-1"}`.
///
/// # Errors
/// [`Error::InvalidRequest`] naming the field (`request` for JSON syntax and shape).
pub fn admit_request(text: &str) -> Result<AdmitRequest> {
    let j: AdmitRequestJson = parse("request", text)?;
    Ok(AdmitRequest {
        execution_id: j.execution_id,
        model: j.model,
        input_tokens: j.input_tokens,
        max_output_tokens: j.max_output_tokens,
        messages: j.messages.into_iter().map(|m| Message { role: m.role, content: m.content }).collect(),
        tools: j.tools,
        streaming: j.stream,
        vision: j.vision,
        passthrough: false,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageJson {
    input_tokens: i64,
    output_tokens: i64,
    #[serde(default)]
    cached_input_tokens: i64,
}

/// Parses usage: `{"input_tokens": 1187, "output_tokens": 203, "cached_input_tokens": 0}`.
///
/// # Errors
/// [`Error::InvalidRequest`] (`usage`).
pub fn usage(text: &str) -> Result<Usage> {
    let j: UsageJson = parse("usage", text)?;
    Ok(Usage { input_tokens: j.input_tokens, output_tokens: j.output_tokens, cached_input_tokens: j.cached_input_tokens })
}

/// An agent (never its token).
pub fn agent_json(a: &Agent) -> Value {
    json!({
        "name": a.name,
        "token_prefix": a.token_prefix,
        "scope": a.scope.as_str(),
        "ttl_ms": a.ttl_ms,
        "expires_at_ms": a.expires_at_ms,
        "disabled": a.disabled,
        "budget_micro": a.budget_micro,
        "spent_micro": a.spent_micro,
        "reserved_micro": a.reserved_micro,
        "remaining_micro": a.remaining_micro(),
        "rpm": a.rpm,
        "tpm": a.tpm,
        "allowed_models": a.allowed_models,
        "tools": a.capabilities.tools,
        "streaming": a.capabilities.streaming,
        "vision": a.capabilities.vision,
        "strict": a.strict,
        "allow_passthrough": a.allow_passthrough,
        "max_concurrent": a.max_concurrent,
        "budget_period": a.budget_period.as_str(),
        "period_start_ms": a.period_start_ms,
        "team": a.team,
        "created_at_ms": a.created_at_ms,
    })
}

/// A team.
pub fn team_json(t: &Team) -> Value {
    json!({
        "name": t.name,
        "parent": t.parent,
        "budget_micro": t.budget_micro,
        "spent_micro": t.spent_micro,
        "reserved_micro": t.reserved_micro,
        "remaining_micro": t.remaining_micro(),
    })
}

/// An admission.
pub fn admission_json(a: &Admission) -> Value {
    json!({
        "execution_id": a.execution_id,
        "agent": a.agent,
        "model": a.model,
        "input_tokens": a.input_tokens,
        "max_output_tokens": a.max_output_tokens,
        "reserved_micro": a.reserved_micro,
        "expires_at_ms": a.expires_at_ms,
        "state": a.state.as_str(),
        "replayed": a.replayed,
    })
}

/// A settlement.
pub fn settlement_json(s: &Settlement) -> Value {
    json!({
        "execution_id": s.execution_id,
        "agent": s.agent,
        "state": s.state.as_str(),
        "reserved_micro": s.reserved_micro,
        "cost_micro": s.cost_micro,
        "released_micro": s.released_micro,
        "overrun_micro": s.overrun_micro,
        "expired": s.expired,
        "replayed": s.replayed,
    })
}

/// A ledger event: its fields, `data` parsed, `hash` as hex.
pub fn event_json(e: &crate::ledger::Event) -> Value {
    json!({
        "seq": e.seq, "ts_ms": e.ts_ms, "kind": e.kind, "agent": e.agent,
        "execution_id": e.execution_id, "amount_micro": e.amount_micro,
        "data": serde_json::from_str::<Value>(&e.data).unwrap_or(Value::Null),
        "hash": hex::encode(e.hash),
    })
}

/// One execution as stored: its state, reservation and charge (never its request hash). The
/// times are ms since the epoch; `cost_micro`, `reason`, `dispatched_at_ms` and `settled_at_ms`
/// are `null` until they apply.
pub fn execution_json(e: &Execution) -> Value {
    json!({
        "execution_id": e.id,
        "agent": e.agent,
        "state": e.state.as_str(),
        "model": e.model,
        "input_tokens": e.input_tokens,
        "max_output_tokens": e.max_output_tokens,
        "reserved_micro": e.reserved_micro,
        "cost_micro": e.cost_micro,
        "reason": e.reason,
        "created_at_ms": e.created_at_ms,
        "expires_at_ms": e.expires_at_ms,
        "dispatched_at_ms": e.dispatched_at_ms,
        "settled_at_ms": e.settled_at_ms,
    })
}

/// An audit report: `clean`, counts, head, and the first failure.
pub fn audit_json(r: &AuditReport) -> Value {
    json!({
        "clean": r.is_clean(),
        "events": r.events,
        "agents": r.agents,
        "executions": r.executions,
        "mode": r.mode,
        "head": r.head.as_ref().map(|h| h.to_text()),
        "failure": r.failure.as_ref().map(|f| json!({
            "rule": f.rule.as_str(),
            "seq": f.seq,
            "agent": f.agent,
            "execution_id": f.execution_id,
            "field": f.field,
            "message": f.message,
        })),
    })
}

/// An error: status, reason, message and the denial's data.
pub fn error_json(e: &Error) -> Value {
    let mut v = json!({ "status": e.status(), "reason": e.reason(), "message": e.to_string() });
    match e {
        Error::InsufficientBudget { needed_micro, remaining_micro, team, .. } => {
            v["needed_micro"] = json!(needed_micro);
            v["remaining_micro"] = json!(remaining_micro);
            v["team"] = json!(team);
        }
        Error::RateLimited { retry_after_ms, limit, .. } => {
            v["retry_after_ms"] = json!(retry_after_ms);
            v["limit"] = json!(limit);
        }
        Error::InvalidRequest { field, .. } | Error::Tampered { field, .. } => v["field"] = json!(field),
        _ => {}
    }
    v
}
