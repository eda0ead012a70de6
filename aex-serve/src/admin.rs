//! The endpoints besides the governed calls: `GET /health`, `GET /v1/models` (the calling agent's
//! allowed, configured models), and the admin endpoints `POST /admin/reload_config`,
//! `GET /admin/activity` (recent ledger events) and `GET /admin/replay` (the audit).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::App;
use crate::errors::ApiError;
use crate::proxy::{bearer, bearer_token};

pub(crate) async fn health(State(app): State<Arc<App>>) -> Response {
    match app.kernel.head() {
        Ok(head) => Json(json!({
            "status": "ok",
            "version": env!("CARGO_PKG_VERSION"),
            "head": head.map(|h| h.to_text()),
            "config_hash": app.kernel.config().hash_hex(),
        }))
        .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Prometheus metrics: behind the admin token (they name every agent and its money).
pub(crate) async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Response, ApiError> {
    admin(&app, &headers)?;
    let text = app.metrics.render(&app.kernel)?;
    Ok(([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response())
}

pub(crate) async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let token = bearer(&headers)?;
    let agent = app.kernel.authenticate(&token)?;
    let config = app.kernel.config();
    let data: Vec<Value> = config
        .models()
        .filter(|(name, _)| agent.allowed_models.is_empty() || agent.allowed_models.iter().any(|m| m == name))
        .map(|(name, spec)| json!({"id": name, "object": "model", "created": 0, "owned_by": spec.provider.as_deref().unwrap_or("aex")}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// Checks the admin token, when the gateway has one (it must, unless it listens on loopback): as
/// `Authorization: Bearer <token>`, or the dashboard's `aex_admin` cookie.
///
/// Without an admin token (loopback only), a request must name a loopback host and come from no
/// other web origin: a page elsewhere cannot read the ledger or reload the config through the
/// operator's browser (DNS rebinding, cross-site requests).
pub(crate) fn admin(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &app.options.admin_token else {
        let loopback = |v: Option<&str>| {
            let Some(v) = v else { return true };
            let authority = v.split_once("://").map_or(v, |(_, rest)| rest);
            let host = authority.rsplit_once(':').filter(|(h, p)| !h.is_empty() && p.chars().all(|c| c.is_ascii_digit())).map_or(authority, |(h, _)| h);
            matches!(host.trim_matches(['[', ']']), "127.0.0.1" | "localhost" | "::1")
        };
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
        return if host.is_some() && loopback(host) && loopback(origin) {
            Ok(())
        } else {
            Err(ApiError::new(StatusCode::FORBIDDEN, "loopback_only", "without an admin token, admin endpoints answer only loopback hosts and origins"))
        };
    };
    let bearer = bearer_token(headers);
    let cookie = || {
        headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| c.trim().strip_prefix("aex_admin="))
    };
    let given = bearer.or_else(cookie).unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "admin_token_required", "this endpoint needs the admin token: 'Authorization: Bearer <admin token>'"))
    }
}

pub(crate) async fn reload_config(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let Some(path) = &app.options.config_path else {
        return Err(ApiError::new(StatusCode::CONFLICT, "no_config_file", "the gateway was started without a config file to reload"));
    };
    app.kernel.reload_config_file(path)?;
    Ok(Json(json!({"reloaded": true, "config_hash": app.kernel.config().hash_hex()})))
}

#[derive(serde::Deserialize)]
pub(crate) struct Activity {
    limit: Option<usize>,
}

pub(crate) async fn activity(State(app): State<Arc<App>>, headers: HeaderMap, Query(q): Query<Activity>) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1_000);
    let head = app.kernel.head()?.map_or(0, |h| h.seq);
    let from = head.saturating_sub(limit as u64 - 1).max(1);
    let events = app.kernel.events(from, limit)?;
    let data: Vec<Value> = events.iter().rev().map(aex_core::wire::event_json).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

pub(crate) async fn replay(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let report = app.kernel.audit(None)?;
    Ok(Json(aex_core::wire::audit_json(&report)))
}
