//! Agents: who may spend, how much, and on what.
//!
//! An [`AgentSpec`] is what a caller asks for at creation; an [`Agent`] is what the store holds
//! and `inspect` shows. Neither ever holds the token; the store keeps only its digest.

use crate::auth::Scope;
use crate::budget::BudgetPeriod;
use crate::error::{Error, Result};
use crate::money;

/// Longest agent name accepted.
pub const MAX_NAME_LEN: usize = 64;
/// Most entries in an allowed-models list.
pub const MAX_ALLOWED_MODELS: usize = 256;
/// Longest TTL accepted for a token: ten years.
pub const MAX_TTL_MS: i64 = 10 * 366 * 24 * 3600 * 1000;

/// What kinds of request an agent may make beyond plain text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Capabilities {
    /// May send tool definitions.
    pub tools: bool,
    /// May stream responses.
    pub streaming: bool,
    /// May send images.
    pub vision: bool,
}

impl Default for Capabilities {
    /// Everything allowed, as the HTTP daemon did unless told otherwise.
    fn default() -> Self {
        Capabilities { tools: true, streaming: true, vision: true }
    }
}

/// The settings for a new agent. Build with [`AgentSpec::new`] and adjust the public fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSpec {
    /// Unique name: 1 to 64 characters of `A-Z a-z 0-9 . _ -`, starting with a letter or digit.
    pub name: String,
    /// Budget in micro-USD, `0..=MAX_MICRO`.
    pub budget_micro: i64,
    /// Requests per minute; `None` for no limit.
    pub rpm: Option<u32>,
    /// Tokens per minute; `None` for no limit.
    pub tpm: Option<u64>,
    /// Models the agent may call; empty means any configured model.
    pub allowed_models: Vec<String>,
    /// Tools, streaming, vision.
    pub capabilities: Capabilities,
    /// Deny what cannot be bounded (unpriced models, requests without `max_output_tokens`).
    pub strict: bool,
    /// Token lifetime in milliseconds; `None` for a token that does not expire.
    pub ttl_ms: Option<i64>,
    /// What the token may do.
    pub scope: Scope,
    /// Whether requests may carry the agent's own provider key.
    pub allow_passthrough: bool,
    /// Open executions at once; `None` for no limit.
    pub max_concurrent: Option<u32>,
    /// How often the budget renews.
    pub budget_period: BudgetPeriod,
    /// The team whose budget this agent also draws from, if any (it must exist).
    pub team: Option<String>,
}

impl AgentSpec {
    /// An agent with this name and budget, no rate limits, every configured model and
    /// capability, not strict, no TTL, `execution` scope, no passthrough.
    pub fn new(name: impl Into<String>, budget_micro: i64) -> Self {
        AgentSpec {
            name: name.into(),
            budget_micro,
            rpm: None,
            tpm: None,
            allowed_models: Vec::new(),
            capabilities: Capabilities::default(),
            strict: false,
            ttl_ms: None,
            scope: Scope::Execution,
            allow_passthrough: false,
            max_concurrent: None,
            budget_period: BudgetPeriod::Never,
            team: None,
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] naming the first field that breaks its rule.
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        money::check_amount("budget_micro", self.budget_micro)?;
        if self.rpm == Some(0) {
            return Err(Error::invalid("rpm", "must be at least 1 (omit it for no limit)"));
        }
        if self.tpm == Some(0) {
            return Err(Error::invalid("tpm", "must be at least 1 (omit it for no limit)"));
        }
        if self.max_concurrent == Some(0) {
            return Err(Error::invalid("max_concurrent", "must be at least 1 (omit it for no limit)"));
        }
        if let Some(team) = &self.team {
            validate_name_as("team", team)?;
        }
        if self.allowed_models.len() > MAX_ALLOWED_MODELS {
            return Err(Error::invalid("allowed_models", format!("must list at most {MAX_ALLOWED_MODELS} models")));
        }
        for m in &self.allowed_models {
            validate_model_name("allowed_models", m)?;
        }
        if let Some(ttl) = self.ttl_ms {
            validate_ttl(ttl)?;
        }
        Ok(())
    }
}

/// Checks an agent or team name against the naming rule.
///
/// # Errors
/// [`Error::InvalidRequest`] on field `name`.
pub fn validate_name(name: &str) -> Result<()> {
    validate_name_as("name", name)
}

/// Checks a name against the naming rule: 1 to 64 characters of `A-Z a-z 0-9 . _ -`, starting
/// with a letter or digit.
///
/// # Errors
/// [`Error::InvalidRequest`] on `field`.
pub fn validate_name_as(field: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(field, format!("must be at most {MAX_NAME_LEN} characters, got {}", name.len())));
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if !name.chars().all(ok_char) || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(Error::invalid(
            field,
            "must use only A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit",
        ));
    }
    Ok(())
}

/// Checks a model name: 1 to 128 printable ASCII characters without spaces.
///
/// # Errors
/// [`Error::InvalidRequest`] on `field`.
pub fn validate_model_name(field: &str, model: &str) -> Result<()> {
    if model.is_empty() || model.len() > 128 || !model.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::invalid(field, "model names must be 1 to 128 printable ASCII characters without spaces"));
    }
    Ok(())
}

/// Checks a TTL in milliseconds.
///
/// # Errors
/// [`Error::InvalidRequest`] on field `ttl_ms` unless `1..=MAX_TTL_MS`.
pub fn validate_ttl(ttl_ms: i64) -> Result<i64> {
    if ttl_ms <= 0 || ttl_ms > MAX_TTL_MS {
        return Err(Error::invalid("ttl_ms", format!("must be between 1 ms and 10 years, got {ttl_ms}")));
    }
    Ok(ttl_ms)
}

/// An agent as stored: settings and counters. Never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// Store-assigned id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// The first characters of the current token, for recognition (`aex_3f9a1c`).
    pub token_prefix: String,
    /// What the token may do.
    pub scope: Scope,
    /// The token lifetime the agent was given, renewed on rotation.
    pub ttl_ms: Option<i64>,
    /// When the current token stops working, ms since the epoch.
    pub expires_at_ms: Option<i64>,
    /// A disabled agent cannot be authenticated.
    pub disabled: bool,
    /// Budget, micro-USD.
    pub budget_micro: i64,
    /// Committed spend, micro-USD.
    pub spent_micro: i64,
    /// Sum of open reservations, micro-USD.
    pub reserved_micro: i64,
    /// Requests per minute, if limited.
    pub rpm: Option<u32>,
    /// Tokens per minute, if limited.
    pub tpm: Option<u64>,
    /// Allowed models; empty means any configured model.
    pub allowed_models: Vec<String>,
    /// Tools, streaming, vision.
    pub capabilities: Capabilities,
    /// Strict mode.
    pub strict: bool,
    /// Passthrough provider keys allowed.
    pub allow_passthrough: bool,
    /// Open executions at once, if limited.
    pub max_concurrent: Option<u32>,
    /// How often the budget renews.
    pub budget_period: BudgetPeriod,
    /// Start of the current budget period (0 for a budget that never renews): `spent` counts
    /// what was committed since.
    pub period_start_ms: i64,
    /// The team's store id, if the agent draws from one.
    pub team_id: Option<i64>,
    /// The team's name, if the agent draws from one.
    pub team: Option<String>,
    /// Creation time, ms since the epoch.
    pub created_at_ms: i64,
}

impl Agent {
    /// `budget - spent - reserved`: what a new reservation may take. Negative after an overrun.
    pub fn remaining_micro(&self) -> i64 {
        self.budget_micro - self.spent_micro - self.reserved_micro
    }
}
