//! Errors as OpenAI-shaped JSON: `{"error": {"message", "type", "code", "param"}}`, with the
//! status of DESIGN.md's table and the stable reason as `code`, plus aex's own fields (a 402's
//! `needed_micro` / `remaining_micro` / `team`, a 429's `retry_after_ms`). A 429 carries
//! `Retry-After` (seconds, rounded up) and `retry-after-ms`.

use aex_core::Error;
use aex_core::dispatch::CallFailure;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
    retry_after_ms: Option<u64>,
    execution_id: Option<String>,
}

/// The OpenAI error `type` for a status.
fn openai_type(status: u16) -> &'static str {
    match status {
        400 | 413 => "invalid_request_error",
        401 => "authentication_error",
        402 => "insufficient_quota",
        403 => "permission_error",
        404 => "not_found_error",
        409 => "conflict_error",
        429 => "rate_limit_error",
        _ => "server_error",
    }
}

impl ApiError {
    /// A gateway-level refusal with this status, reason (`code`) and message.
    pub fn new(status: StatusCode, reason: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        ApiError {
            status,
            body: json!({"error": {"message": message, "type": openai_type(status.as_u16()), "code": reason, "param": null}}),
            retry_after_ms: None,
            execution_id: None,
        }
    }

    /// A malformed request: 400 naming the field and the rule.
    pub fn invalid(field: &str, rule: impl std::fmt::Display) -> Self {
        ApiError::from(&Error::invalid(field, rule.to_string()))
    }
}

impl From<&Error> for ApiError {
    fn from(e: &Error) -> Self {
        let status = e.status();
        let data = aex_core::wire::error_json(e);
        let mut error = json!({
            "message": e.to_string(),
            "type": openai_type(status),
            "code": e.reason(),
            "param": data.get("field").cloned().unwrap_or(Value::Null),
        });
        for key in ["needed_micro", "remaining_micro", "team", "retry_after_ms", "limit"] {
            if let Some(v) = data.get(key) {
                error[key] = v.clone();
            }
        }
        let retry_after_ms = match e {
            Error::RateLimited { retry_after_ms, .. } => Some(*retry_after_ms),
            _ => None,
        };
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body: json!({ "error": error }),
            retry_after_ms,
            execution_id: None,
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError::from(&e)
    }
}

impl From<CallFailure> for ApiError {
    fn from(f: CallFailure) -> Self {
        let mut e = ApiError::from(&f.error);
        if let Some(s) = &f.settlement {
            e.body["error"]["cost_micro"] = json!(s.cost_micro);
        }
        e.execution_id = f.execution_id;
        e
    }
}

impl ApiError {
    /// The error's JSON body.
    pub fn body(&self) -> &Value {
        &self.body
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable reason (the body's `code`).
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        let headers = response.headers_mut();
        if let Some(ms) = self.retry_after_ms {
            headers.insert("retry-after", HeaderValue::from(ms.div_ceil(1000).max(1)));
            headers.insert("retry-after-ms", HeaderValue::from(ms));
        }
        if let Some(id) = self.execution_id.and_then(|id| HeaderValue::from_str(&id).ok()) {
            headers.insert("x-aex-execution-id", id);
        }
        response
    }
}
