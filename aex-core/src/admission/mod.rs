//! Admission: the decision made before a call leaves the process.
//!
//! Inside one exclusive store transaction, in this order:
//! 1. **auth** — the token is known, not expired, its agent not disabled; its scope may execute.
//!    Then the agent's budget period is renewed if due ([`crate::budget::period`]) and its due
//!    reservations are expired ([`crate::reconcile`]).
//! 2. **idempotency** — the execution id (the caller's, or a new UUIDv7). Seen before with the
//!    same request hash and agent: the original admission is returned with `replayed = true` and
//!    nothing more is reserved. Seen with a different request or agent: `Conflict`.
//! 3. **policy** — [`crate::policy::check`]; then input tokens are counted (unless given), the
//!    output cap is clamped to the model's, and the context window is checked.
//! 4. **rate** — [`crate::rate`]: sliding RPM / TPM windows (agent, model, global) and
//!    concurrency caps (agent, global).
//! 5. **budget** — [`crate::budget`]: reserve the estimate on the agent and every team above it,
//!    or deny. Only now are the rate windows charged.
//!
//! A denial (401, 402, 403, 429) reserves nothing; it is written to the ledger as an
//! `admission.denied` event in the same transaction, and the execution id stays free for a retry.
//! Malformed input (400) is refused before the store is touched.

pub(crate) mod refused_tokens;
mod tokens;

pub use refused_tokens::WINDOW_MS as REFUSED_TOKENS_WINDOW_MS;
pub use tokens::{TOKENIZE_MAX_BYTES, count_text_tokens, estimate_input_tokens};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::agent::{Agent, validate_model_name};
use crate::auth::{Scope, TokenHash};
use crate::budget::{self, period};
use crate::config::{Config, Prices};
use crate::error::{AuthFailure, ConflictReason, Error, PolicyRule, Result};
use crate::execution::{Execution, ExecutionState, validate_execution_id};
use crate::ledger::{self, ChainHasher, EventKind, NewEvent};
use crate::policy;
use crate::rate;
use crate::reconcile;
use crate::settlement::MAX_TOKENS;
use crate::store::{Prefetch, Tx};

/// The largest total message text accepted in one request: 64 MiB.
pub const MAX_MESSAGES_BYTES: usize = 64 << 20;

/// One chat message, as far as admission cares: who speaks and the text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: String,
    /// The text content.
    pub content: String,
}

impl Message {
    /// A message.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message { role: role.into(), content: content.into() }
    }
}

/// What the agent wants to call. Provider keys never go here.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AdmitRequest {
    /// The caller's idempotency key; `None` to generate a UUIDv7.
    pub execution_id: Option<String>,
    /// The model to call.
    pub model: String,
    /// Input tokens, if the caller counted them; otherwise counted from `messages`.
    pub input_tokens: Option<i64>,
    /// The output cap; `None` uses the model's default (denied in strict mode).
    pub max_output_tokens: Option<i64>,
    /// The prompt, used to count input tokens and for the request hash.
    pub messages: Vec<Message>,
    /// The request defines tools.
    pub tools: bool,
    /// The request streams.
    pub streaming: bool,
    /// The request carries images.
    pub vision: bool,
    /// The request carries the agent's own provider key (the key itself never comes here).
    pub passthrough: bool,
}

impl AdmitRequest {
    /// A request for `model` with no prompt and no limits given.
    pub fn new(model: impl Into<String>) -> Self {
        AdmitRequest { model: model.into(), ..Default::default() }
    }

    /// Sets the counted input tokens.
    pub fn input_tokens(mut self, n: i64) -> Self {
        self.input_tokens = Some(n);
        self
    }

    /// Sets the output cap.
    pub fn max_output_tokens(mut self, n: i64) -> Self {
        self.max_output_tokens = Some(n);
        self
    }

    /// Sets the execution id.
    pub fn execution_id(mut self, id: impl Into<String>) -> Self {
        self.execution_id = Some(id.into());
        self
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if let Some(id) = &self.execution_id {
            validate_execution_id(id)?;
        }
        validate_model_name("model", &self.model)?;
        if let Some(n) = self.input_tokens
            && !(0..=MAX_TOKENS).contains(&n)
        {
            return Err(Error::invalid("input_tokens", format!("must be between 0 and {MAX_TOKENS}, got {n}")));
        }
        if let Some(n) = self.max_output_tokens
            && !(1..=MAX_TOKENS).contains(&n)
        {
            return Err(Error::invalid("max_output_tokens", format!("must be between 1 and {MAX_TOKENS}, got {n}")));
        }
        let bytes: usize = self.messages.iter().map(|m| m.role.len() + m.content.len()).sum();
        if bytes > MAX_MESSAGES_BYTES {
            return Err(Error::invalid("messages", format!("must total at most {MAX_MESSAGES_BYTES} bytes")));
        }
        Ok(())
    }

    /// SHA-256 over the canonical JSON of the request's non-secret fields (not the execution id).
    pub fn hash(&self) -> [u8; 32] {
        let messages: Vec<(&str, &str)> = self.messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
        let canonical = json!({
            "model": self.model,
            "input_tokens": self.input_tokens,
            "max_output_tokens": self.max_output_tokens,
            "messages": messages,
            "tools": self.tools,
            "streaming": self.streaming,
            "vision": self.vision,
            "passthrough": self.passthrough,
        });
        Sha256::digest(canonical.to_string().as_bytes()).into()
    }
}

/// An admitted execution: what was reserved, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The execution id to settle with.
    pub execution_id: String,
    /// The agent's name.
    pub agent: String,
    /// The model admitted.
    pub model: String,
    /// Input tokens reserved for.
    pub input_tokens: i64,
    /// Output tokens reserved for: send this as the provider's `max_tokens`.
    pub max_output_tokens: i64,
    /// Prices frozen into the reservation.
    pub prices: Prices,
    /// The reservation, micro-USD.
    pub reserved_micro: i64,
    /// When the reservation expires if unsettled.
    pub expires_at_ms: i64,
    /// The execution's state now (not `RESERVED` only for a replay of a later stage).
    pub state: ExecutionState,
    /// This admission repeated an earlier identical one; nothing more was reserved.
    pub replayed: bool,
}

impl Admission {
    fn of(e: &Execution, replayed: bool) -> Admission {
        Admission {
            execution_id: e.id.clone(),
            agent: e.agent.clone(),
            model: e.model.clone(),
            input_tokens: e.input_tokens,
            max_output_tokens: e.max_output_tokens,
            prices: e.prices,
            reserved_micro: e.reserved_micro,
            expires_at_ms: e.expires_at_ms,
            state: e.state,
            replayed,
        }
    }
}

/// The work on a request that needs no store: its hash and, unless the caller counted them, its
/// input tokens. Done before the write transaction, so a large prompt never holds the lock
/// (tokenizing tens of megabytes takes seconds; the transaction takes microseconds).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prepared {
    pub request_hash: [u8; 32],
    /// The caller's count, else the count for the model's configured tokenizer; `None` for a
    /// model the config does not know (policy denies it).
    pub input_tokens: Option<i64>,
}

impl Prepared {
    pub(crate) fn of(config: &Config, req: &AdmitRequest) -> Prepared {
        let input_tokens = req.input_tokens.or_else(|| {
            config.model(&req.model).map(|spec| estimate_input_tokens(spec.upstream_name(&req.model), &req.messages))
        });
        Prepared { request_hash: req.hash(), input_tokens }
    }
}

/// Everything admission needs besides the transaction.
pub(crate) struct Context<'a> {
    pub hasher: &'a ChainHasher,
    pub config: &'a Config,
    pub now: i64,
    pub reservation_ttl_ms: i64,
    pub refused_tokens: &'a refused_tokens::RefusedTokens,
}

/// Authenticates a token against the store.
pub(crate) fn authenticate(tx: &mut dyn Tx, token: &str, now: i64) -> Result<Agent> {
    let hash = TokenHash::of_presented(token)?;
    let agent = tx.agent_by_token(&hash)?.ok_or(Error::Unauthenticated { reason: AuthFailure::UnknownToken })?;
    if agent.expires_at_ms.is_some_and(|t| t <= now) {
        return Err(Error::Unauthenticated { reason: AuthFailure::TokenExpired });
    }
    if agent.disabled {
        return Err(Error::Unauthenticated { reason: AuthFailure::AgentDisabled });
    }
    Ok(agent)
}

/// Runs the pipeline. The outer `Result` fails the transaction (store errors); the inner one is
/// the caller's answer, and the transaction commits either way (a denial is recorded).
pub(crate) fn admit(
    tx: &mut dyn Tx,
    cx: &Context<'_>,
    token: &str,
    req: &AdmitRequest,
    prepared: &Prepared,
    execution_id: &str,
) -> Result<Result<Admission>> {
    tx.prefetch(&[Prefetch::Execution(execution_id)]);
    // 1. auth
    let mut agent = match authenticate(tx, token, cx.now) {
        Ok(agent) => agent,
        Err(denial) if denial.is_denial() => return refuse_token(tx, cx, execution_id, req, denial),
        Err(other) => return Err(other),
    };
    if agent.scope == Scope::ReadOnly {
        let denial = Error::PolicyDenied {
            reason: PolicyRule::ScopeReadOnly,
            message: format!("agent '{}' has a read-only token; it cannot execute", agent.name),
        };
        return deny(tx, cx, Some(&agent.name), execution_id, req, denial);
    }
    // Bring the agent up to date: a new budget period, then its abandoned reservations.
    period::renew_if_due(tx, cx.hasher, &mut agent, cx.now)?;
    let expired = reconcile::expire_due(tx, cx.hasher, Some(agent.id), cx.now)?;
    if expired != reconcile::ReconcileReport::default() {
        agent = tx.agent_by_id(agent.id)?.ok_or_else(|| Error::Internal("agent vanished inside a transaction".into()))?;
    }

    // 2. idempotency
    let request_hash = prepared.request_hash;
    if let Some(existing) = tx.execution(execution_id)? {
        if existing.agent_id != agent.id || existing.request_hash != request_hash {
            return Ok(Err(Error::conflict(
                ConflictReason::IdempotencyConflict,
                format!("execution id '{execution_id}' was used before for a different request"),
            )));
        }
        return Ok(Ok(Admission::of(&existing, true)));
    }

    // 3. policy
    let spec = match policy::check(&agent, cx.config, req) {
        Ok(spec) => spec,
        Err(denial) => return deny(tx, cx, Some(&agent.name), execution_id, req, denial),
    };
    let input_tokens = prepared
        .input_tokens
        .unwrap_or_else(|| estimate_input_tokens(spec.upstream_name(&req.model), &req.messages));
    let max_output_tokens = req.max_output_tokens.map_or(spec.max_output_tokens, |n| n.min(spec.max_output_tokens));
    if let Err(denial) = policy::check_context_window(&req.model, spec, input_tokens, max_output_tokens) {
        return deny(tx, cx, Some(&agent.name), execution_id, req, denial);
    }

    // 4. rate windows
    let plan = match rate::check(tx, &agent, cx.config, req, input_tokens + max_output_tokens, cx.now)? {
        Ok(plan) => plan,
        Err(denial) => return deny(tx, cx, Some(&agent.name), execution_id, req, denial),
    };

    // 5. budget: the agent's and every team's above it
    let teams = budget::team_chain(tx, &agent)?;
    let prices = spec.prices.unwrap_or(Prices { input: 0, output: 0, cached_input: None });
    let reserved = budget::estimate(&prices, input_tokens, max_output_tokens);
    if let Err(denial) = budget::check_fits(&agent, &teams, reserved) {
        return deny(tx, cx, Some(&agent.name), execution_id, req, denial);
    }

    rate::record(tx, &plan, cx.now)?;
    let execution = Execution {
        id: execution_id.to_string(),
        agent_id: agent.id,
        agent: agent.name.clone(),
        request_hash,
        state: ExecutionState::Reserved,
        model: req.model.clone(),
        input_tokens,
        max_output_tokens,
        prices,
        reserved_micro: reserved,
        cost_micro: None,
        usage: None,
        reason: None,
        created_at_ms: cx.now,
        expires_at_ms: cx.now.saturating_add(cx.reservation_ttl_ms),
        dispatched_at_ms: None,
        settled_at_ms: None,
        teams: teams.iter().map(|t| t.id).collect(),
        rate_scopes: plan.scopes,
        rate_tokens: plan.tokens,
    };
    tx.insert_execution(&execution)?;
    tx.update_counters(agent.id, agent.spent_micro, agent.reserved_micro + reserved)?;
    for t in &teams {
        tx.update_team_counters(t.id, t.spent_micro, t.reserved_micro + reserved)?;
    }
    let data = json!({
        "model": execution.model,
        "input_tokens": input_tokens,
        "max_output_tokens": max_output_tokens,
        "input_price": prices.input,
        "output_price": prices.output,
        "cached_input_price": prices.cached_input,
        "priced": spec.prices.is_some(),
        "expires_at_ms": execution.expires_at_ms,
        "teams": budget::team_names(&teams),
        "rate_scopes": execution.rate_scopes,
        "rate_tokens": execution.rate_tokens,
    });
    ledger::append(tx, cx.hasher, cx.now, NewEvent::execution(EventKind::Reserved, &agent.name, execution_id, reserved, data))?;
    Ok(Ok(Admission::of(&execution, false)))
}

/// Records a refused token within the bound of [`refused_tokens`] and returns the denial.
fn refuse_token(tx: &mut dyn Tx, cx: &Context<'_>, execution_id: &str, req: &AdmitRequest, denial: Error) -> Result<Result<Admission>> {
    let record = cx.refused_tokens.refuse(cx.now, denial.reason());
    if let Some(summary) = record.summary {
        ledger::append(tx, cx.hasher, cx.now, NewEvent::global(EventKind::Denied, 0, summary))?;
    }
    if record.write_this { deny(tx, cx, None, execution_id, req, denial) } else { Ok(Err(denial)) }
}

/// Records a denial and returns it as the caller's answer.
fn deny(
    tx: &mut dyn Tx,
    cx: &Context<'_>,
    agent: Option<&str>,
    execution_id: &str,
    req: &AdmitRequest,
    denial: Error,
) -> Result<Result<Admission>> {
    let needed = match &denial {
        Error::InsufficientBudget { needed_micro, .. } => *needed_micro,
        _ => 0,
    };
    let data = json!({
        "status": denial.status(),
        "reason": denial.reason(),
        "model": req.model,
        "message": denial.to_string(),
    });
    let event = NewEvent { kind: EventKind::Denied, agent, execution_id: Some(execution_id), amount_micro: needed, data };
    ledger::append(tx, cx.hasher, cx.now, event)?;
    Ok(Err(denial))
}
