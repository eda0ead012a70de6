//! The HTTP side of governed calls: the shared client, attempts, retries and fallbacks.

use std::sync::OnceLock;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

use super::sse::Lines;
use super::{CallFailure, Cancel, DispatchOptions, Endpoint, Failure, ProviderCall, ProviderReply, passthrough_required, request_of};
use crate::Kernel;
use crate::call::{Call, Ending, Settled};
use crate::error::{Error, RateWindow, Result};
use crate::settlement::Settlement;

/// The dispatcher's lazily built parts, owned by the kernel: one HTTP client (connection pool)
/// and, for the blocking API, one runtime. `Send + Sync`.
#[derive(Debug, Default)]
pub struct DispatchState {
    options: DispatchOptions,
    client: OnceLock<reqwest::Client>,
    runtime: OnceLock<tokio::runtime::Runtime>,
    /// The process that built the runtime: its worker threads exist only there.
    runtime_pid: OnceLock<u32>,
}

impl Drop for DispatchState {
    fn drop(&mut self) {
        // In a child forked after the runtime started, its threads do not exist: shutting it
        // down would wait for them forever. Leak it instead (the child's copy of its memory).
        if self.runtime_pid.get().is_some_and(|&pid| pid != std::process::id())
            && let Some(runtime) = self.runtime.take()
        {
            std::mem::forget(runtime);
        }
    }
}

impl DispatchState {
    /// State with these options; nothing is built until the first call.
    pub fn new(options: DispatchOptions) -> Self {
        DispatchState { options, client: OnceLock::new(), runtime: OnceLock::new(), runtime_pid: OnceLock::new() }
    }

    fn client(&self) -> Result<&reqwest::Client> {
        if let Some(c) = self.client.get() {
            return Ok(c);
        }
        // rustls needs a process-wide crypto provider; installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            // A connection still pending must fail as a connection error (nothing written:
            // released) well before the request timeout, whose expiry is charged.
            .connect_timeout(self.options.connect_timeout.min(self.options.request_timeout / 2))
            // A redirect would re-send the prompt (and the key) to another host: never followed.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Unavailable(format!("cannot build the HTTP client: {e}")))?;
        Ok(self.client.get_or_init(|| client))
    }

    pub(crate) fn runtime(&self) -> Result<&tokio::runtime::Runtime> {
        if let Some(r) = self.runtime.get() {
            return Ok(r);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("aex-dispatch")
            .enable_all()
            .build()
            .map_err(|e| Error::Unavailable(format!("cannot start the dispatch runtime: {e}")))?;
        let _ = self.runtime_pid.set(std::process::id());
        Ok(self.runtime.get_or_init(|| runtime))
    }
}

/// Where and how to send one attempt.
struct Route {
    url: String,
    upstream_model: String,
    key: Option<String>,
}

fn route(kernel: &Kernel, model: &str, endpoint: Endpoint, passthrough: Option<&str>) -> Result<Option<Route>> {
    let config = kernel.config();
    let Some(spec) = config.model(model) else { return Ok(None) };
    let provider_name = spec.provider.as_deref().ok_or_else(|| Error::invalid("model", format!("model '{model}' names no provider to send it to")))?;
    let provider = config.provider(provider_name).ok_or_else(|| Error::Internal(format!("provider '{provider_name}' vanished")))?;
    let key = match (passthrough, &provider.api_key_env) {
        (Some(k), _) => Some(k.to_string()),
        (None, None) => None,
        (None, Some(var)) => match std::env::var(var) {
            Ok(k) if !k.is_empty() => Some(k),
            _ => return Err(passthrough_required(provider_name)),
        },
    };
    Ok(Some(Route {
        url: format!("{}{}", provider.base_url.trim_end_matches('/'), endpoint.path()),
        upstream_model: spec.upstream_name(model).to_string(),
        key,
    }))
}

fn jitter(base: Duration, attempt: u32) -> Duration {
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    let factor = 0.5 + f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX); // 0.5 ..= 1.5
    base.mul_f64(f64::from(1u32 << attempt.min(10)) * factor)
}

/// The last attempt admitted, and its settlement once made: what a failed call reports.
#[derive(Default)]
struct Last {
    execution_id: Option<String>,
    settlement: Option<Settlement>,
}

impl Last {
    fn admitted(&mut self, id: &str) {
        self.execution_id = Some(id.to_string());
        self.settlement = None;
    }

    /// Ends `call` and remembers its settlement.
    fn end(&mut self, call: Call, ending: Ending) -> Result<Settled> {
        let settled = call.end(ending);
        if let Ok(s) = &settled {
            self.settlement = Some(s.settlement.clone());
        }
        settled
    }

    fn fail(&self, error: Error) -> CallFailure {
        CallFailure { error, execution_id: self.execution_id.clone(), settlement: self.settlement.clone() }
    }
}

/// What waiting for the provider came to.
enum Wait<T> {
    Done(T),
    TimedOut,
    Cancelled,
}

/// Waits for `f` at most `limit`, or until the call is cancelled.
async fn wait<T>(cancel: &Cancel, limit: Duration, f: impl std::future::Future<Output = T>) -> Wait<T> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Wait::Cancelled,
        r = tokio::time::timeout(limit, f) => r.map_or(Wait::TimedOut, Wait::Done),
    }
}

fn cancelled() -> Error {
    Error::Unavailable("cancelled by the caller before the request was sent; nothing was charged".into())
}

/// Runs the whole call: attempts, retries with backoff, fallbacks.
pub(super) async fn run<'c>(
    kernel: &Kernel,
    token: &str,
    call: ProviderCall,
    mut on_chunk: Option<&mut (dyn FnMut(&str) -> bool + Send + 'c)>,
) -> std::result::Result<ProviderReply, CallFailure> {
    let model = call.body.get("model").and_then(Value::as_str).ok_or_else(|| Error::invalid("model", "the request must name its model"))?.to_string();
    if on_chunk.is_none() && call.body.get("stream").and_then(Value::as_bool) == Some(true) {
        // Its answer would be an event stream, unreadable as one JSON body: refused before any
        // reservation, not charged as an unreadable answer.
        return Err(Error::invalid("stream", "a plain call cannot stream: use the streaming call (stream_provider, chat_stream, aex_kernel_stream)").into());
    }
    let config = kernel.config();
    let provider_of = |m: &str| config.model(m).and_then(|s| s.provider.clone());
    let mut fallbacks = config.model(&model).map(|s| s.fallbacks.clone()).unwrap_or_default();
    if call.passthrough_key.is_some() {
        // An agent's own key was given for its model's provider, and goes to no other.
        let home = provider_of(&model);
        fallbacks.retain(|f| provider_of(f) == home);
    }
    let base_id = call.execution_id.clone().unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let options = kernel.dispatch_state().options;
    let mut attempts = 0;
    let mut last = String::new();
    let mut tried = Last::default();
    for (f, candidate) in std::iter::once(&model).chain(fallbacks.iter()).enumerate() {
        for retry in 0..=options.max_retries {
            if retry > 0 {
                let pause = jitter(options.retry_base_delay, retry - 1);
                if let Wait::Cancelled = wait(&call.cancel, pause, std::future::pending::<()>()).await {
                    return Err(tried.fail(cancelled()));
                }
            }
            if call.cancel.is_cancelled() {
                return Err(tried.fail(cancelled()));
            }
            let mut id = base_id.clone();
            if f > 0 {
                id.push_str(&format!(".fallback{f}"));
            }
            if retry > 0 {
                id.push_str(&format!(".retry{retry}"));
            }
            attempts += 1;
            let mut body = call.body.clone();
            body["model"] = Value::String(candidate.clone());
            match attempt(kernel, token, &call, body, candidate, &id, on_chunk.as_deref_mut(), &mut tried).await {
                Ok(mut reply) => {
                    reply.attempts = attempts;
                    return Ok(reply);
                }
                Err(Failure::Final(e)) if f == 0 || !e.is_denial() => return Err(tried.fail(e)),
                Err(Failure::Final(e)) => {
                    // A fallback the agent may not use: try the next one.
                    last = e.to_string();
                    break;
                }
                Err(Failure::Retryable(why)) => last = why,
            }
        }
    }
    Err(tried.fail(Error::Unavailable(format!("every attempt failed ({attempts}); last: {last}"))))
}

/// Sets the output cap the request is sent with to the reservation's, whatever the caller asked
/// (more, `null`, or nothing): what is sent never asks for more than was reserved.
fn cap_output(endpoint: Endpoint, body: &mut Value, cap: i64) {
    match endpoint {
        Endpoint::ChatCompletions => {
            let completion = body.get("max_completion_tokens").is_some();
            if completion {
                body["max_completion_tokens"] = cap.into();
            }
            if body.get("max_tokens").is_some() || !completion {
                body["max_tokens"] = cap.into();
            }
        }
        Endpoint::Responses => body["max_output_tokens"] = cap.into(),
        Endpoint::Embeddings => {}
    }
}

/// Why the call was charged although it failed, for the caller's error.
fn charged(model: &str, why: &str, settled: Result<Settled>) -> Failure {
    let how = match settled {
        Ok(s) => format!("charged {} micro-USD", s.settlement.cost_micro),
        Err(e) => format!("its settlement failed ({e}); the reservation expires by the TTL rule"),
    };
    Failure::Final(Error::Unavailable(format!("{model}: {why}; it may have reached the provider, so it was {how}")))
}

#[allow(clippy::too_many_arguments)] // one attempt's whole context, passed once
async fn attempt<'c>(
    kernel: &Kernel,
    token: &str,
    call: &ProviderCall,
    mut body: Value,
    model: &str,
    id: &str,
    on_chunk: Option<&mut (dyn FnMut(&str) -> bool + Send + 'c)>,
    last: &mut Last,
) -> std::result::Result<ProviderReply, Failure> {
    let route = route(kernel, model, call.endpoint, call.passthrough_key.as_deref()).map_err(Failure::Final)?;
    let request = request_of(call.endpoint, &body, Some(id), call.passthrough_key.is_some(), &kernel.config()).map_err(Failure::Final)?;
    let admission = kernel.admit_dispatched(token, &request).map_err(Failure::Final)?;
    if admission.replayed {
        // The same execution id was admitted before: it was sent then, and is never sent twice.
        return Err(Failure::Final(Error::Conflict {
            reason: crate::error::ConflictReason::IdempotencyConflict,
            message: format!("execution '{id}' was already sent (it is {}); aex never sends an execution twice", admission.state.as_str()),
        }));
    }
    last.admitted(id);
    // Admission succeeds only for configured models, which always have a route.
    let route = route.ok_or_else(|| Failure::Final(Error::Internal(format!("model '{model}' admitted without a route"))))?;
    let mut governed = Call::new(kernel, &admission, &route.upstream_model);
    let stream = on_chunk.is_some();
    let embeddings = call.endpoint == Endpoint::Embeddings;

    body["model"] = Value::String(route.upstream_model.clone());
    cap_output(call.endpoint, &mut body, admission.max_output_tokens);
    if stream {
        body["stream"] = Value::Bool(true);
        if call.endpoint == Endpoint::ChatCompletions {
            let mut options = body.get("stream_options").cloned().unwrap_or_else(|| Value::Object(Default::default()));
            options["include_usage"] = Value::Bool(true);
            body["stream_options"] = options;
        }
    }

    let state = kernel.dispatch_state();
    let timeout = state.options.request_timeout;
    let client = state.client().map_err(Failure::Final)?;
    let mut req = client.post(&route.url).json(&body);
    if let Some(key) = &route.key {
        req = req.bearer_auth(key);
    }
    let cancel = &call.cancel;
    let sent_at = std::time::Instant::now();
    // From here the request may be on its way: if this attempt is dropped (its caller went
    // away), the call settles charged. Only a connection that could not be made says otherwise.
    governed.sent();
    let response = match wait(cancel, timeout, req.send()).await {
        Wait::Done(Ok(r)) => r,
        Wait::Done(Err(e)) if e.is_connect() => {
            // Nothing was written: the reservation returns, and another try costs nothing.
            let _ = last.end(governed, Ending::NotSent("cannot connect".into()));
            return Err(Failure::Retryable(format!("{model}: cannot reach the provider ({})", e.without_url())));
        }
        Wait::Done(Err(e)) => {
            let why = if e.is_timeout() {
                format!("no answer within {} ms", timeout.as_millis())
            } else {
                format!("the connection failed after the request was sent ({})", e.without_url())
            };
            return Err(charged(model, &why, last.end(governed, Ending::Interrupted(why.clone()))));
        }
        Wait::TimedOut => {
            let why = format!("no answer within {} ms", timeout.as_millis());
            return Err(charged(model, &why, last.end(governed, Ending::Interrupted(why.clone()))));
        }
        Wait::Cancelled => {
            let why = "cancelled by the caller while waiting for the answer".to_string();
            return Err(charged(model, &why, last.end(governed, Ending::Interrupted(why.clone()))));
        }
    };
    let status = response.status();
    if !status.is_success() {
        let refused = Ending::Refused { status: status.as_u16() };
        if status.as_u16() == 429 {
            let retry_after_ms = response
                .headers()
                .get("retry-after-ms")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .or_else(|| Some(response.headers().get("retry-after")?.to_str().ok()?.parse::<f64>().ok()? as u64 * 1000))
                .unwrap_or(1_000);
            last.end(governed, refused).map_err(Failure::Final)?;
            return Err(Failure::Final(Error::RateLimited { window: RateWindow::Provider, limit: 0, retry_after_ms }));
        }
        last.end(governed, refused).map_err(Failure::Final)?;
        return Err(if status.is_server_error() {
            Failure::Retryable(format!("{model}: provider answered {status}"))
        } else if matches!(status.as_u16(), 401 | 403) {
            // The key was refused: the operator's (or the agent's own) key, not the request.
            Failure::Final(Error::Unavailable(format!("{model}: the provider refused the key ({status}): check the provider's api_key_env, or the agent's own key")))
        } else if status.is_redirection() {
            Failure::Final(Error::Unavailable(format!("{model}: the provider answered a redirect ({status}); aex does not follow redirects")))
        } else {
            Failure::Final(Error::invalid("request", format!("the provider refused it with {status}")))
        });
    }

    let Some(on_chunk) = on_chunk else {
        let why = match wait(cancel, timeout, response.bytes()).await {
            Wait::Done(Ok(bytes)) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(value) if is_answer(&value) => return complete(governed, last, model, embeddings, value, &bytes, sent_at.elapsed()),
                Ok(_) => format!("its answer ({status}) is an error object, not a completion"),
                Err(_) => format!("its answer ({status}) is not JSON"),
            },
            Wait::Done(Err(e)) => format!("its answer was cut ({})", e.without_url()),
            Wait::TimedOut => format!("its answer did not arrive within {} ms", timeout.as_millis()),
            Wait::Cancelled => "cancelled by the caller while its answer arrived".to_string(),
        };
        return Err(charged(model, &why, last.end(governed, Ending::Interrupted(why.clone()))));
    };

    // Streaming: pass each payload through; feed the call its output and usage. A gap between
    // chunks longer than the timeout ends the stream.
    let mut lines = Lines::default();
    let mut bytes = response.bytes_stream();
    let mut done = false;
    let mut abandoned = false;
    let mut cut = None;
    'read: loop {
        let chunk = match wait(cancel, timeout, bytes.next()).await {
            Wait::Done(Some(Ok(c))) => c,
            Wait::Done(None) => break,
            Wait::Done(Some(Err(e))) => {
                cut = Some(format!("the stream was cut ({})", e.without_url()));
                break;
            }
            Wait::TimedOut => {
                cut = Some(format!("the stream stalled for {} ms", timeout.as_millis()));
                break;
            }
            Wait::Cancelled => {
                cut = Some("the caller cancelled it".to_string());
                break;
            }
        };
        for data in lines.feed(&chunk) {
            if data.is_empty() {
                continue; // a keep-alive (`event: ping`) carries no payload
            }
            if data == "[DONE]" {
                done = true;
                break 'read;
            }
            if let Ok(v) = serde_json::from_str::<Value>(&data) {
                governed.observe(&v, embeddings);
            }
            if !on_chunk(&data) {
                abandoned = true;
                break 'read;
            }
        }
    }
    let complete = (done || governed.has_usage()) && !abandoned && cut.is_none();
    let early = cut.or_else(|| (!complete && !abandoned).then(|| "the stream ended early".to_string()));
    let ending = match (&early, abandoned) {
        (Some(why), _) => Ending::Interrupted(why.clone()),
        (None, true) => Ending::Interrupted("abandoned by the caller".into()),
        (None, false) => Ending::Completed,
    };
    let settled = last.end(governed, ending).map_err(Failure::Final)?;
    if let Some(why) = early {
        return Err(Failure::Final(Error::Unavailable(format!("{model}: {why}; settled from the counted output"))));
    }
    Ok(ProviderReply {
        response: Value::Null,
        raw: String::new(),
        execution_id: id.to_string(),
        model: model.to_string(),
        settlement: settled.settlement,
        attempts: 1,
        estimated: settled.estimated,
        provider_time: sent_at.elapsed(),
    })
}

/// A plain (not streamed) answer read in full: settle from its usage and hand back its bytes.
fn complete(
    mut governed: Call,
    last: &mut Last,
    model: &str,
    embeddings: bool,
    value: Value,
    bytes: &[u8],
    provider_time: Duration,
) -> std::result::Result<ProviderReply, Failure> {
    governed.observe(&value, embeddings);
    let execution_id = governed.execution_id().to_string();
    let settled = last.end(governed, Ending::Completed).map_err(Failure::Final)?;
    Ok(ProviderReply {
        response: value,
        raw: String::from_utf8_lossy(bytes).into_owned(),
        execution_id,
        model: model.to_string(),
        settlement: settled.settlement,
        attempts: 1,
        estimated: settled.estimated,
        provider_time,
    })
}

/// Whether a 2xx body is an answer: an object that is not an error object (one with an `error`
/// and no choices, output items or embeddings).
fn is_answer(v: &Value) -> bool {
    let error = v.get("error").is_some_and(|e| !e.is_null());
    v.is_object() && (!error || ["choices", "output", "data"].iter().any(|k| v.get(*k).is_some_and(Value::is_array)))
}
