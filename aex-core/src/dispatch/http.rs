//! The HTTP side of governed calls: the shared client, attempts, retries and fallbacks.

use std::sync::OnceLock;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

use super::sse::Lines;
use super::{DispatchOptions, Endpoint, Failure, ProviderCall, ProviderReply, admit_request, output_text, passthrough_required, usage_of};
use crate::admission::count_text_tokens;
use crate::error::{Error, RateWindow, Result};
use crate::settlement::{Settlement, Usage};
use crate::Kernel;

/// The dispatcher's lazily built parts, owned by the kernel: one HTTP client (connection pool)
/// and, for the blocking API, one runtime. `Send + Sync`.
#[derive(Debug, Default)]
pub struct DispatchState {
    options: DispatchOptions,
    client: OnceLock<reqwest::Client>,
    runtime: OnceLock<tokio::runtime::Runtime>,
}

impl DispatchState {
    /// State with these options; nothing is built until the first call.
    pub fn new(options: DispatchOptions) -> Self {
        DispatchState { options, client: OnceLock::new(), runtime: OnceLock::new() }
    }

    fn client(&self) -> Result<&reqwest::Client> {
        if let Some(c) = self.client.get() {
            return Ok(c);
        }
        // rustls needs a process-wide crypto provider; installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(self.options.connect_timeout)
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

/// Runs the whole call: attempts, retries with backoff, fallbacks.
pub(super) async fn run<'c>(
    kernel: &Kernel,
    token: &str,
    call: ProviderCall,
    mut on_chunk: Option<&mut (dyn FnMut(&str) -> bool + Send + 'c)>,
) -> Result<ProviderReply> {
    let model = call.body.get("model").and_then(Value::as_str).ok_or_else(|| Error::invalid("model", "the request must name its model"))?.to_string();
    let fallbacks = kernel.config().model(&model).map(|s| s.fallbacks.clone()).unwrap_or_default();
    let base_id = call.execution_id.clone().unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let options = kernel.dispatch_state().options;
    let mut attempts = 0;
    let mut last = String::new();
    for (f, candidate) in std::iter::once(&model).chain(fallbacks.iter()).enumerate() {
        for retry in 0..=options.max_retries {
            if retry > 0 {
                tokio::time::sleep(jitter(options.retry_base_delay, retry - 1)).await;
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
            match attempt(kernel, token, &call, &body, candidate, &id, on_chunk.as_deref_mut()).await {
                Ok(mut reply) => {
                    reply.attempts = attempts;
                    return Ok(reply);
                }
                Err(Failure::Final(e)) if f == 0 || !e.is_denial() => return Err(e),
                Err(Failure::Final(e)) => {
                    // A fallback the agent may not use: try the next one.
                    last = e.to_string();
                    break;
                }
                Err(Failure::Retryable(why)) => last = why,
            }
        }
    }
    Err(Error::Unavailable(format!("every attempt failed ({attempts}); last: {last}")))
}

/// Settles an attempt that produced a response, from its usage or, without one, its counted
/// output (estimated).
fn settle(kernel: &Kernel, id: &str, model: &str, usage: Option<Usage>, text: &str, input: i64) -> std::result::Result<(Settlement, bool), Failure> {
    let result = match usage {
        Some(u) => kernel.commit(id, u).map(|s| (s, false)),
        None => kernel.commit_estimated(id, Usage::new(input, count_text_tokens(model, text))).map(|s| (s, true)),
    };
    result.map_err(Failure::Final)
}

async fn attempt<'c>(
    kernel: &Kernel,
    token: &str,
    call: &ProviderCall,
    body: &Value,
    model: &str,
    id: &str,
    on_chunk: Option<&mut (dyn FnMut(&str) -> bool + Send + 'c)>,
) -> std::result::Result<ProviderReply, Failure> {
    let route = route(kernel, model, call.endpoint, call.passthrough_key.as_deref()).map_err(Failure::Final)?;
    let request = admit_request(call.endpoint, body, id, call.passthrough_key.is_some()).map_err(Failure::Final)?;
    let admission = kernel.admit_dispatched(token, &request).map_err(Failure::Final)?;
    if admission.replayed {
        // The same execution id was admitted before: it was sent then, and is never sent twice.
        return Err(Failure::Final(Error::Conflict {
            reason: crate::error::ConflictReason::IdempotencyConflict,
            message: format!("execution '{id}' was already sent (it is {}); aex never sends an execution twice", admission.state.as_str()),
        }));
    }
    // Admission succeeds only for configured models, which always have a route.
    let route = route.ok_or_else(|| Failure::Final(Error::Internal(format!("model '{model}' admitted without a route"))))?;
    let stream = on_chunk.is_some();

    let mut body = body.clone();
    body["model"] = Value::String(route.upstream_model.clone());
    match call.endpoint {
        Endpoint::ChatCompletions if body.get("max_tokens").is_none() && body.get("max_completion_tokens").is_none() => {
            body["max_tokens"] = admission.max_output_tokens.into();
        }
        Endpoint::Responses if body.get("max_output_tokens").is_none() => body["max_output_tokens"] = admission.max_output_tokens.into(),
        _ => {}
    }
    if stream {
        body["stream"] = Value::Bool(true);
        if call.endpoint == Endpoint::ChatCompletions {
            let mut options = body.get("stream_options").cloned().unwrap_or_else(|| Value::Object(Default::default()));
            options["include_usage"] = Value::Bool(true);
            body["stream_options"] = options;
        }
    }

    let state = kernel.dispatch_state();
    let client = state.client().map_err(Failure::Final)?;
    let mut req = client.post(&route.url).json(&body).timeout(state.options.request_timeout);
    if let Some(key) = &route.key {
        req = req.bearer_auth(key);
    }
    let failed = |why: String| {
        let _ = kernel.fail(id, &why);
        Failure::Retryable(why)
    };
    let response = match req.send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => {
            // The request may have reached the provider: charge the reservation (estimated).
            let _ = kernel.commit_estimated(id, Usage::new(admission.input_tokens, admission.max_output_tokens));
            return Err(Failure::Retryable(format!("{model}: timed out")));
        }
        Err(e) => return Err(failed(format!("{model}: cannot reach the provider ({})", e.without_url()))),
    };
    let status = response.status();
    if status.as_u16() == 429 {
        let _ = kernel.fail(id, "provider 429");
        let retry_after_ms = response
            .headers()
            .get("retry-after-ms")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .or_else(|| Some(response.headers().get("retry-after")?.to_str().ok()?.parse::<f64>().ok()? as u64 * 1000))
            .unwrap_or(1_000);
        return Err(Failure::Final(Error::RateLimited { window: RateWindow::Provider, limit: 0, retry_after_ms }));
    }
    if status.is_server_error() {
        return Err(failed(format!("{model}: provider answered {status}")));
    }
    if !status.is_success() {
        let _ = kernel.fail(id, &format!("provider answered {status}"));
        return Err(Failure::Final(Error::invalid("request", format!("the provider refused it with {status}"))));
    }

    let Some(on_chunk) = on_chunk else {
        let value: Value = match response.json().await {
            Ok(v) => v,
            Err(e) if e.is_timeout() => {
                let _ = kernel.commit_estimated(id, Usage::new(admission.input_tokens, admission.max_output_tokens));
                return Err(Failure::Retryable(format!("{model}: timed out")));
            }
            Err(e) => return Err(failed(format!("{model}: unreadable response ({})", e.without_url()))),
        };
        let usage = value.get("usage").and_then(|u| {
            let mut u = usage_of(u)?;
            if call.endpoint == Endpoint::Embeddings {
                u.output_tokens = 0;
            }
            Some(u)
        });
        let (settlement, estimated) = settle(kernel, id, model, usage, &output_text(&value), admission.input_tokens)?;
        return Ok(ProviderReply { response: value, model: model.to_string(), settlement, attempts: 1, estimated });
    };

    // Streaming: pass each payload through; keep usage and text for the settlement.
    let mut lines = Lines::default();
    let mut usage = None;
    let mut text = String::new();
    let mut bytes = response.bytes_stream();
    let mut done = false;
    let mut abandoned = false;
    let mut cut = None;
    'read: while let Some(chunk) = bytes.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                cut = Some(format!("{model}: the stream was cut ({})", e.without_url()));
                break;
            }
        };
        for data in lines.feed(&chunk) {
            if data == "[DONE]" {
                done = true;
                break 'read;
            }
            if let Ok(v) = serde_json::from_str::<Value>(&data) {
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()).and_then(usage_of) {
                    usage = Some(u);
                }
                if let Some(u) = v.pointer("/response/usage").and_then(usage_of) {
                    usage = Some(u);
                }
                for c in v.get("choices").and_then(Value::as_array).into_iter().flatten() {
                    if let Some(t) = c.pointer("/delta/content").and_then(Value::as_str) {
                        text.push_str(t);
                    }
                }
                if v.get("type").and_then(Value::as_str) == Some("response.output_text.delta") {
                    text.push_str(v.get("delta").and_then(Value::as_str).unwrap_or(""));
                }
            }
            if !on_chunk(&data) {
                abandoned = true;
                break 'read;
            }
        }
    }
    let complete = (done || usage.is_some()) && !abandoned && cut.is_none();
    let (settlement, estimated) = settle(kernel, id, model, if complete { usage } else { None }, &text, admission.input_tokens)?;
    if let Some(why) = cut.or_else(|| (!done && !abandoned && usage.is_none()).then(|| format!("{model}: the stream ended early"))) {
        return Err(Failure::Final(Error::Unavailable(format!("{why}; settled from the counted output"))));
    }
    Ok(ProviderReply { response: Value::Null, model: model.to_string(), settlement, attempts: 1, estimated })
}
