//! The one error type of aex, and the stable numbers and reason codes every surface shares.
//!
//! Each variant maps to one status of the error table in `DESIGN.md` through [`Error::status`]; the
//! C ABI returns that number and the Python exceptions carry it as `.status`. [`Error::reason`]
//! gives a stable machine-readable code, so callers can branch on *why* without parsing messages.
//! A denial (401, 402, 403, 429) is an expected outcome, not a bug: it carries its data (amounts,
//! windows) as fields. No variant ever holds a token or a provider key.

use std::fmt;

/// `Result` with aex's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Declares a field-less enum of stable reason codes with `as_str` and `Display`.
macro_rules! reason_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $code:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// The stable, machine-readable code of this reason.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $code,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

reason_enum! {
    /// Why a token was not accepted (status 401).
    AuthFailure {
        /// No agent holds this token (never issued, rotated away, or the agent was deleted).
        UnknownToken => "unknown_token",
        /// The token's TTL has passed.
        TokenExpired => "token_expired",
        /// The agent exists but is disabled.
        AgentDisabled => "agent_disabled",
    }
}

reason_enum! {
    /// Which policy rule denied a request (status 403).
    PolicyRule {
        /// The token's scope is `read-only`; it cannot execute.
        ScopeReadOnly => "scope_read_only",
        /// The model is not in the configuration, so it has no price and no route.
        ModelNotConfigured => "model_not_configured",
        /// The agent's allowed-models list does not include the model.
        ModelNotAllowed => "model_not_allowed",
        /// The request uses tools and the agent may not.
        ToolsNotAllowed => "tools_not_allowed",
        /// The request streams and the agent may not.
        StreamingNotAllowed => "streaming_not_allowed",
        /// The request carries images and the agent may not.
        VisionNotAllowed => "vision_not_allowed",
        /// Strict mode: the request has no `max_output_tokens`, so its cost cannot be bounded.
        StrictMaxOutputTokens => "strict_max_output_tokens",
        /// Strict mode: the model has no price, so its cost cannot be bounded.
        StrictUnpricedModel => "strict_unpriced_model",
        /// The request uses tools and the model does not support them.
        ModelLacksTools => "model_lacks_tools",
        /// The request streams and the model cannot.
        ModelLacksStreaming => "model_lacks_streaming",
        /// The request carries images and the model cannot read them.
        ModelLacksVision => "model_lacks_vision",
        /// Input plus output tokens exceed the model's context window.
        ContextWindowExceeded => "context_window_exceeded",
        /// The request alone needs more tokens than a tokens-per-minute limit allows, so no wait
        /// would let it through.
        ExceedsRateLimit => "exceeds_rate_limit",
        /// The request carries its own provider key and the agent may not pass keys through.
        PassthroughNotAllowed => "passthrough_not_allowed",
        /// The host holds no key for the provider, so the request must bring the agent's own.
        PassthroughRequired => "passthrough_required",
    }
}

reason_enum! {
    /// What kind of thing was not found (status 404).
    NotFoundKind {
        /// No agent by that name.
        Agent => "agent_not_found",
        /// No execution by that id.
        Execution => "execution_not_found",
        /// No team by that name.
        Team => "team_not_found",
    }
}

reason_enum! {
    /// Why a request conflicts with the recorded state (status 409).
    ConflictReason {
        /// The execution id was used before with a different request or by another agent.
        IdempotencyConflict => "idempotency_conflict",
        /// The execution is in a state the call cannot move it from (e.g. commit after release).
        InvalidTransition => "invalid_transition",
        /// The reservation passed its TTL and was settled by the expiry rule before this call.
        ExecutionExpired => "execution_expired",
        /// An agent with that name exists already.
        NameTaken => "name_taken",
    }
}

reason_enum! {
    /// Which rate window denied a request (status 429).
    RateWindow {
        /// The agent's requests per minute.
        AgentRpm => "agent_rpm",
        /// The agent's tokens per minute.
        AgentTpm => "agent_tpm",
        /// The model's tokens per minute, across agents.
        ModelTpm => "model_tpm",
        /// All tokens per minute, across agents and models.
        GlobalTpm => "global_tpm",
        /// The agent's open executions.
        AgentConcurrency => "agent_concurrency",
        /// All open executions.
        GlobalConcurrency => "global_concurrency",
        /// The provider itself answered 429.
        Provider => "provider_rate_limit",
    }
}

/// Every way an aex operation can fail. Match it exhaustively: a new variant must be mapped by
/// every binding before it builds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Malformed input (400). `field` names the argument, `rule` the rule it broke.
    #[error("invalid {field}: {rule}")]
    InvalidRequest {
        /// The argument or field at fault, e.g. `"budget_micro"` or `"usage.output_tokens"`.
        field: String,
        /// The rule it broke, as a sentence fragment.
        rule: String,
    },
    /// The token was not accepted (401).
    #[error("unauthenticated: {reason}")]
    Unauthenticated {
        /// Why.
        reason: AuthFailure,
    },
    /// The reservation does not fit in the agent's remaining budget (402).
    #[error(
        "insufficient budget for {}: needed {} USD, remaining {} USD",
        match team { Some(t) => format!("team '{t}' of agent '{agent}'"), None => format!("agent '{agent}'") },
        crate::money::format_usd(*needed_micro),
        crate::money::format_usd(*remaining_micro)
    )]
    InsufficientBudget {
        /// The agent denied.
        agent: String,
        /// The team whose budget lacked room, when it was not the agent's own.
        team: Option<String>,
        /// The reservation asked for, in micro-USD.
        needed_micro: i64,
        /// `budget - spent - reserved` at the time, in micro-USD (negative after an overrun).
        remaining_micro: i64,
    },
    /// A policy rule denied the request (403).
    #[error("policy denied ({reason}): {message}")]
    PolicyDenied {
        /// The rule.
        reason: PolicyRule,
        /// A sentence naming the rule and the offending value.
        message: String,
    },
    /// The agent or execution does not exist (404).
    #[error("{what}: '{key}'")]
    NotFound {
        /// Agent or execution.
        what: NotFoundKind,
        /// The name or id looked up.
        key: String,
    },
    /// The request conflicts with recorded state (409).
    #[error("conflict ({reason}): {message}")]
    Conflict {
        /// Why.
        reason: ConflictReason,
        /// What was recorded and what was asked.
        message: String,
    },
    /// A rate window is full (429).
    #[error("rate limited ({window}): limit {limit}, retry after {retry_after_ms} ms")]
    RateLimited {
        /// The window that is full.
        window: RateWindow,
        /// The window's limit.
        limit: u64,
        /// When the window will have room, in milliseconds from now.
        retry_after_ms: u64,
    },
    /// A bug in aex (500). Never a panic across a language boundary.
    #[error("internal error: {0}")]
    Internal(String),
    /// The store is busy beyond its timeout, or an I/O operation failed (503).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The database was changed behind aex's back in a way that grants power or rewrites
    /// history (503): a row disagrees with the ledger in a loosening direction, a row's seal is
    /// missing or forged, or the stored ledger mode contradicts the key given. aex refuses to act
    /// on it (see [`crate::outside`]); nothing was changed.
    #[error("tampered ({field}): {message}")]
    Tampered {
        /// The column or setting at fault, e.g. `"token_hash"`, `"seal"` or `"ledger_mode"`.
        field: String,
        /// Which row, what was found and what the ledger says.
        message: String,
    },
}

impl Error {
    /// The status number of the error table: the C status code and Python's `.status`.
    pub const fn status(&self) -> u16 {
        match self {
            Error::InvalidRequest { .. } => 400,
            Error::Unauthenticated { .. } => 401,
            Error::InsufficientBudget { .. } => 402,
            Error::PolicyDenied { .. } => 403,
            Error::NotFound { .. } => 404,
            Error::Conflict { .. } => 409,
            Error::RateLimited { .. } => 429,
            Error::Internal(_) => 500,
            Error::Unavailable(_) | Error::Tampered { .. } => 503,
        }
    }

    /// The stable machine-readable reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidRequest { .. } => "invalid_request",
            Error::Unauthenticated { reason } => reason.as_str(),
            Error::InsufficientBudget { team: None, .. } => "budget_exceeded",
            Error::InsufficientBudget { team: Some(_), .. } => "team_budget_exceeded",
            Error::PolicyDenied { reason, .. } => reason.as_str(),
            Error::NotFound { what, .. } => what.as_str(),
            Error::Conflict { reason, .. } => reason.as_str(),
            Error::RateLimited { window, .. } => window.as_str(),
            Error::Internal(_) => "internal",
            Error::Unavailable(_) => "unavailable",
            Error::Tampered { .. } => "tampered",
        }
    }

    /// Whether this error is a denial of an admission (401, 402, 403, 429), which the ledger
    /// records as an `admission.denied` event.
    pub const fn is_denial(&self) -> bool {
        matches!(
            self,
            Error::Unauthenticated { .. }
                | Error::InsufficientBudget { .. }
                | Error::PolicyDenied { .. }
                | Error::RateLimited { .. }
        )
    }

    /// Shorthand for [`Error::InvalidRequest`].
    pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Error::InvalidRequest { field: field.into(), rule: rule.into() }
    }

    pub(crate) fn conflict(reason: ConflictReason, message: impl Into<String>) -> Self {
        Error::Conflict { reason, message: message.into() }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode;
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                Error::Unavailable(format!("store busy beyond its timeout: {e}"))
            }
            Some(
                ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
                | ErrorCode::ReadOnly
                | ErrorCode::CannotOpen
                | ErrorCode::PermissionDenied
                | ErrorCode::FileLockingProtocolFailed
                | ErrorCode::NotADatabase
                | ErrorCode::DatabaseCorrupt,
            ) => Error::Unavailable(format!("store I/O failure: {e}")),
            _ => Error::Internal(format!("store: {e}")),
        }
    }
}
