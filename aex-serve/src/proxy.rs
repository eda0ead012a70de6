//! The governed endpoints: `POST /v1/chat/completions`, `/v1/responses`, `/v1/embeddings` (and
//! the same under `/openai/v1/`). Each request goes through the kernel's dispatcher — admission,
//! routing, the injected output cap, streaming with usage, settlement, retries and fallbacks —
//! exactly as `kernel.chat` does; this module only moves bytes between HTTP and it.
//!
//! A client that goes away settles its call by the money rules: a plain call's request is
//! dropped (its call object settles as interrupted); a stream is cancelled at once, even while
//! the provider stalls, and settles from the counted output.

use std::sync::Arc;

use aex_core::dispatch::{CallFailure, Cancel, Endpoint, ProviderCall, ProviderReply};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::App;
use crate::errors::ApiError;

/// The agent token from `Authorization: Bearer …`.
pub(crate) fn bearer(headers: &HeaderMap) -> Result<String, ApiError> {
    bearer_token(headers).map(str::to_string).ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "missing_token", "send the agent token as 'Authorization: Bearer <token>'"))
}

/// The token of an `Authorization: Bearer <token>` header (scheme in any case, spaces trimmed).
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A header the request may carry, as text: absent is `None`; present but not visible ASCII is
/// refused naming `field` — never silently dropped (a dropped execution id would let the same
/// call be sent twice; a dropped provider key would send the host's).
fn text_header(headers: &HeaderMap, name: &str, field: &str) -> Result<Option<String>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(text) => Ok(Some(text.to_string())),
            Err(_) => Err(ApiError::invalid(field, format!("the {name} header must be visible ASCII text"))),
        },
    }
}

/// Reads the whole body, within the size limit (413) and the idle timeout (408).
async fn read_body(app: &App, body: Body) -> Result<Bytes, ApiError> {
    let limit = app.options.max_body_bytes;
    match tokio::time::timeout(app.options.idle_timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("the request body is larger than {limit} bytes")))
            } else {
                Err(ApiError::invalid("body", format!("could not be read ({e})")))
            }
        }
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request body did not arrive within {} ms", app.options.idle_timeout.as_millis()),
        )),
    }
}

/// Cancels a call when dropped: held by whatever lives exactly as long as the client's interest.
struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// What the streaming task hands the response body.
enum Event {
    Data(String),
    Done(Result<ProviderReply, CallFailure>),
}

pub(crate) async fn chat(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    answer(app, Endpoint::ChatCompletions, headers, body).await
}

pub(crate) async fn responses(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    answer(app, Endpoint::Responses, headers, body).await
}

pub(crate) async fn embeddings(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    answer(app, Endpoint::Embeddings, headers, body).await
}

/// Runs a governed request and counts its answer.
async fn answer(app: Arc<App>, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let name = match endpoint {
        Endpoint::ChatCompletions => "chat",
        Endpoint::Responses => "responses",
        Endpoint::Embeddings => "embeddings",
    };
    match governed(app.clone(), endpoint, headers, body).await {
        Ok(response) => {
            app.metrics.answered(name, response.status().as_u16(), "ok");
            response
        }
        Err(e) => {
            app.metrics.answered(name, e.status().as_u16(), e.code());
            e.into_response()
        }
    }
}

/// Counts how a call settled.
fn count(app: &App, result: &Result<ProviderReply, CallFailure>, started: std::time::Instant) {
    match result {
        Ok(reply) => app.metrics.settled(reply.settlement.state, reply.estimated, Some((reply.provider_time, started.elapsed()))),
        Err(CallFailure { settlement: Some(s), .. }) => app.metrics.settled(s.state, false, None),
        Err(_) => {}
    }
}

async fn governed(app: Arc<App>, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let token = bearer(&headers)?;
    let bytes = read_body(&app, body).await?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid("body", format!("is not valid JSON ({e})")))?;
    if !value.is_object() {
        return Err(ApiError::invalid("body", "must be a JSON object"));
    }
    let stream = endpoint != Endpoint::Embeddings && value.get("stream").and_then(Value::as_bool) == Some(true);
    let mut call = ProviderCall::new(endpoint, value);
    call.passthrough_key = text_header(&headers, "x-aex-provider-key", "provider_key")?;
    // The first attempt's id is known before anything is sent, so even a stream names it.
    let execution_id = text_header(&headers, "x-aex-execution-id", "execution_id")?.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    call.execution_id = Some(execution_id.clone());
    let flight = app.flights.start(call.cancel.clone());
    if !stream {
        let result = app.kernel.call_provider(&token, call).await;
        drop(flight);
        count(&app, &result, started);
        let reply = result?;
        let mut response = Response::new(Body::empty());
        let h = response.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        settled_headers(h, &reply);
        *response.body_mut() = Body::from(reply.raw);
        return Ok(response);
    }

    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let on_drop = CancelOnDrop(call.cancel.clone());
    let worker = app.clone();
    tokio::spawn(async move {
        let _flight = flight;
        let chunks = tx.clone();
        let result = worker.kernel.stream_provider(&token, call, &mut |data| chunks.send(Event::Data(data.to_string())).is_ok()).await;
        count(&worker, &result, started);
        let _ = tx.send(Event::Done(result));
    });
    // Until the first event, the answer can still be an HTTP error (a denial, a provider 429).
    let first = rx.recv().await;
    let first = match first {
        Some(Event::Done(Err(failure))) => return Err(failure.into()),
        Some(Event::Done(Ok(reply))) => {
            let mut response = sse(futures_util::stream::iter([Ok::<_, std::convert::Infallible>(Bytes::from_static(b"data: [DONE]\n\n"))])).into_response();
            settled_headers(response.headers_mut(), &reply);
            return Ok(response);
        }
        Some(event) => event,
        None => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the stream ended without an outcome")),
    };
    // The body owns the receiver and the cancel guard: when the client goes away the body is
    // dropped, the call is cancelled at once, and it settles from what was counted.
    let events = futures_util::stream::once(async move { first }).chain(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let body = events
        .map(move |event| {
            let _hold = &on_drop;
            Ok::<_, std::convert::Infallible>(match event {
                Event::Data(data) => Bytes::from(format!("data: {data}\n\n")),
                Event::Done(Ok(_)) => Bytes::from_static(b"data: [DONE]\n\n"),
                Event::Done(Err(failure)) => Bytes::from(format!("data: {}\n\n", ApiError::from(failure).body())),
            })
        });
    let mut response = sse(body).into_response();
    if let Ok(id) = HeaderValue::from_str(&execution_id) {
        response.headers_mut().insert("x-aex-execution-id", id);
    }
    Ok(response)
}

fn sse<S>(body: S) -> Response
where
    S: futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
{
    let mut response = Response::new(Body::from_stream(body));
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// What a settled call reports beside its answer.
fn settled_headers(h: &mut HeaderMap, reply: &ProviderReply) {
    if let Ok(id) = HeaderValue::from_str(&reply.execution_id) {
        h.insert("x-aex-execution-id", id);
    }
    h.insert("x-aex-cost-micro", HeaderValue::from(reply.settlement.cost_micro));
}
