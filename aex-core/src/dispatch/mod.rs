//! Governed provider calls: admit → dispatch → send → settle, in one call.
//!
//! For hosts without an HTTP stack of their own (C and C++ above all) and for anyone who wants a
//! single call. The model is routed by `models.yaml` to its provider's OpenAI-compatible
//! `base_url` (`/chat/completions`, `/responses`, `/embeddings`), the provider's own model name
//! is substituted, and the response comes back unchanged.
//!
//! **Keys.** The host's key comes from the provider's `api_key_env`. A request may instead carry
//! the agent's own key (passthrough), allowed only for agents created with `allow_passthrough`;
//! when it does, the host's key is never used. A provider whose `api_key_env` is set but empty in
//! the environment is strict bring-your-own-key: requests without a passthrough key are denied
//! (`passthrough_required`). A provider without `api_key_env` (a local server) gets no key. Keys
//! never reach the ledger, logs or errors.
//!
//! **One governed call.** The request is admitted exactly as [`crate::Kernel::admit`] would (its
//! model, messages, output cap, tools, streaming and images), marked dispatched, and sent with
//! its output cap (`max_tokens` / `max_completion_tokens` / `max_output_tokens`) set to the
//! reservation's, whatever the body asked — more, `null` or nothing — so what is sent never asks
//! for more than was reserved. Multipliers of the output (`n`, `best_of` above 1) are refused.
//! How the attempt settles is decided by [`crate::call::Call`], which this module only feeds
//! (sent, output and tool-call arguments, usage, how it ended).
//!
//! **Failures.** Only failures that cost nothing are retried: a connection that could not be
//! made (nothing was written: released) and a provider 5xx (refused before work: failed). A
//! provider 429 ends the call with [`Error::RateLimited`] (`provider_rate_limit`) and its
//! retry-after; a 3xx (redirects are never followed: they would re-send the prompt elsewhere) or
//! another 4xx ends it too, reservation returned. Everything after the request may have been
//! written — a connection lost after sending, no answer within `request_timeout`, a 2xx whose
//! body cannot be read or is not JSON, a stream cut or stalled — is charged (from the counted
//! output, or at the full reservation when nothing was seen), reported as
//! [`Error::Unavailable`], and never retried. Retries use jittered exponential backoff, then the
//! model's `fallbacks` are tried in order; with a passthrough key only fallbacks of the same
//! provider are. Every attempt is its own execution (`ID`, `ID.retry1`, `ID.fallback1`, ...), and
//! an execution id that was admitted before is never sent again (`Conflict`,
//! `idempotency_conflict`). A failed call reports its last attempt's execution id and settlement
//! ([`CallFailure`]), so the caller learns what a charged failure cost.
//!
//! **Cancellation.** [`ProviderCall::cancel`] stops a call from elsewhere at once, wherever it
//! waits — never at the provider's pace — and it settles by the same rule: released before its
//! request started to be sent (and no retry or fallback follows), charged after.

mod http;
mod sse;

use std::time::Duration;

pub use http::DispatchState;

use serde_json::Value;

use crate::admission::{AdmitRequest, Message};
use crate::error::{Error, PolicyRule, Result};
use crate::settlement::Settlement;
use crate::Kernel;

/// Which OpenAI-compatible endpoint a call goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST {base_url}/chat/completions`.
    ChatCompletions,
    /// `POST {base_url}/responses`.
    Responses,
    /// `POST {base_url}/embeddings`.
    Embeddings,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Responses => "/responses",
            Endpoint::Embeddings => "/embeddings",
        }
    }

    /// Parses `chat`, `responses` or `embeddings`.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] on field `endpoint`.
    pub fn parse(s: &str) -> Result<Endpoint> {
        match s {
            "chat" | "chat.completions" | "chat_completions" => Ok(Endpoint::ChatCompletions),
            "responses" => Ok(Endpoint::Responses),
            "embeddings" => Ok(Endpoint::Embeddings),
            _ => Err(Error::invalid("endpoint", format!("must be chat, responses or embeddings, got '{s}'"))),
        }
    }
}

/// Timeouts and retries of governed calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchOptions {
    /// How long to wait for a connection — at most half of `request_timeout`, so that a
    /// connection still pending fails as one (nothing was written: released) before the request
    /// timeout, whose expiry is charged.
    pub connect_timeout: Duration,
    /// How long until the provider's answer starts, from the start of the attempt; then, for a
    /// plain call, how long its body may take, and for a stream, the longest gap between two
    /// chunks (a healthy stream of any length is never cut).
    pub request_timeout: Duration,
    /// Retries of a retryable failure on the same model before moving to a fallback.
    pub max_retries: u32,
    /// The first retry's delay; each later one doubles, with ±50 % jitter.
    pub retry_base_delay: Duration,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        DispatchOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(600),
            max_retries: 2,
            retry_base_delay: Duration::from_millis(250),
        }
    }
}

/// A handle that cancels a governed call from elsewhere (another thread, a signal handler's
/// flag, an async task being dropped). Cheap to clone; every clone cancels the same call.
///
/// A cancelled call stops at once, wherever it is waiting (connecting, for the answer, between
/// stream chunks, before a retry), and settles by the money rules: released if its request had
/// not started to be sent, otherwise charged — from the counted output, or at the full
/// reservation when nothing was seen — and then fails with [`Error::Unavailable`] ("cancelled
/// by the caller"). `Send + Sync`.
#[derive(Debug, Clone, Default)]
pub struct Cancel(tokio_util::sync::CancellationToken);

impl Cancel {
    /// A handle that has not been cancelled.
    pub fn new() -> Self {
        Cancel::default()
    }

    /// Cancels the call (idempotent).
    pub fn cancel(&self) {
        self.0.cancel();
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.is_cancelled()
    }

    pub(crate) async fn cancelled(&self) {
        self.0.cancelled().await;
    }
}

/// A governed call that failed, and what its last attempt came to: the execution id and its
/// settlement, so a caller can tell what it paid (a charged failure) and look the call up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct CallFailure {
    /// Why it failed.
    pub error: Error,
    /// The last attempt's execution id; `None` when no attempt was admitted (a denial, a
    /// malformed body).
    pub execution_id: Option<String>,
    /// That attempt's settlement (charged, failed or released); `None` when it was not settled
    /// (no attempt admitted, or its settlement itself failed and the TTL rule will settle it).
    pub settlement: Option<Settlement>,
}

impl From<Error> for CallFailure {
    fn from(error: Error) -> Self {
        CallFailure { error, execution_id: None, settlement: None }
    }
}

impl From<CallFailure> for Error {
    fn from(f: CallFailure) -> Self {
        f.error
    }
}

/// One governed provider call.
#[derive(Debug, Clone)]
pub struct ProviderCall {
    /// Where it goes.
    pub endpoint: Endpoint,
    /// The OpenAI-style request body (`model`, `messages`, `max_tokens`, `stream`, ...).
    pub body: Value,
    /// The agent's own provider key, if it brings one. Never logged or recorded.
    pub passthrough_key: Option<String>,
    /// The execution id of the first attempt; a UUIDv7 when `None`.
    pub execution_id: Option<String>,
    /// Cancels the call; keep a clone to cancel it from elsewhere.
    pub cancel: Cancel,
}

impl ProviderCall {
    /// A call to `endpoint` with `body`.
    pub fn new(endpoint: Endpoint, body: Value) -> Self {
        ProviderCall { endpoint, body, passthrough_key: None, execution_id: None, cancel: Cancel::new() }
    }
}

/// The outcome of a governed call.
#[derive(Debug, Clone)]
pub struct ProviderReply {
    /// The provider's response body, parsed (`Null` for a stream: its chunks went to the
    /// callback).
    pub response: Value,
    /// The provider's response body exactly as it sent it (empty for a stream).
    pub raw: String,
    /// The execution id of the attempt that answered.
    pub execution_id: String,
    /// The model that answered (the requested one, or a fallback).
    pub model: String,
    /// The execution that was settled.
    pub settlement: Settlement,
    /// How many attempts were made.
    pub attempts: u32,
    /// The settlement was counted by aex (no usage from the provider, or a stream abandoned).
    pub estimated: bool,
    /// How long the answering attempt waited on the provider: from sending the request to its
    /// answer's last byte (a stream's end). The rest of the call's time is aex's own.
    pub provider_time: Duration,
}

/// What an attempt's failure means for the rest of the call.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Give up with this error (a denial, a bad request, a provider 429).
    Final(Error),
    /// Try again, or fall back (a connection error, 5xx, a timeout).
    Retryable(String),
}

/// The admission request an OpenAI-style request body describes, with everything the provider
/// bills as input counted: message text and content parts, every other field of a message
/// (tool calls and their arguments, names, tool call ids), tool and function definitions, a
/// `response_format` or Responses `text` schema, Responses input items of every kind
/// (`function_call_output`, ...), and embeddings given as token arrays (each token counted).
/// `config` names the tokenizer for token arrays.
///
/// # Errors
/// [`Error::InvalidRequest`] naming the field: no `model`; `messages` not a list of objects, or
/// a `content` that is neither text nor a list of parts; `stream` not a boolean; an output cap
/// not an integer; `n` / `best_of` above 1 (several completions would exceed the
/// reservation); and input aex cannot count because the provider stores it
/// (`previous_response_id`, `conversation`, a stored `prompt`).
pub fn request_of(endpoint: Endpoint, body: &Value, execution_id: Option<&str>, passthrough: bool, config: &crate::Config) -> Result<AdmitRequest> {
    let model = body.get("model").and_then(Value::as_str).ok_or_else(|| Error::invalid("model", "the request must name its model"))?;
    if !body.is_object() {
        return Err(Error::invalid("body", "must be a JSON object"));
    }
    let mut input = Input::default();
    let max_key = match endpoint {
        Endpoint::ChatCompletions => {
            let messages = match body.get("messages") {
                None | Some(Value::Null) => &[][..],
                Some(Value::Array(items)) => items.as_slice(),
                Some(other) => return Err(Error::invalid("messages", format!("must be a list of messages, got {}", kind(other)))),
            };
            for (i, m) in messages.iter().enumerate() {
                input.message(m, &format!("messages[{i}]"))?;
            }
            for key in ["tools", "functions", "response_format"] {
                input.json(key, body.get(key));
            }
            if body.get("max_completion_tokens").is_some() { "max_completion_tokens" } else { "max_tokens" }
        }
        Endpoint::Responses => {
            for stored in ["previous_response_id", "conversation", "prompt"] {
                if body.get(stored).is_some_and(|v| !v.is_null()) {
                    return Err(Error::invalid(
                        stored,
                        "carries input stored at the provider, which aex cannot count before the call: send the input itself",
                    ));
                }
            }
            if let Some(i) = body.get("instructions").filter(|v| !v.is_null()) {
                input.content("system", i, "instructions")?;
            }
            match body.get("input") {
                Some(Value::Array(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        if item.get("role").is_some() {
                            input.message(item, &format!("input[{i}]"))?;
                        } else {
                            input.json("input", Some(item)); // function_call_output and other items
                        }
                    }
                }
                Some(Value::Null) | None => {}
                Some(other) => input.content("user", other, "input")?,
            }
            for key in ["tools", "text"] {
                input.json(key, body.get(key));
            }
            "max_output_tokens"
        }
        Endpoint::Embeddings => {
            match body.get("input") {
                Some(Value::String(s)) => input.text("user", s.clone()),
                Some(Value::Array(items)) => {
                    for item in items {
                        match item {
                            Value::String(s) => input.text("user", s.clone()),
                            Value::Number(_) => input.raw_tokens += 1,
                            Value::Array(tokens) => input.raw_tokens += tokens.len() as i64,
                            other => return Err(Error::invalid("input", format!("must be text, tokens, or a list of them, got {}", kind(other)))),
                        }
                    }
                }
                Some(Value::Null) | None => {}
                Some(other) => return Err(Error::invalid("input", format!("must be text, tokens, or a list of them, got {}", kind(other)))),
            }
            ""
        }
    };
    let max_output_tokens = if endpoint == Endpoint::Embeddings {
        Some(1)
    } else {
        match body.get(max_key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_i64().ok_or_else(|| Error::invalid(max_key, "must be an integer"))?),
        }
    };
    for multiplier in ["n", "best_of"] {
        match body.get(multiplier) {
            None | Some(Value::Null) => {}
            Some(v) if v.as_i64() == Some(1) => {}
            Some(v) => {
                return Err(Error::invalid(
                    multiplier,
                    format!("must be 1 (got {v}): aex reserves for one completion per call, and several would exceed it"),
                ));
            }
        }
    }
    let streaming = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(Error::invalid("stream", format!("must be true or false, got {other}"))),
    };
    let tools = ["tools", "functions"].iter().any(|k| body.get(*k).and_then(Value::as_array).is_some_and(|t| !t.is_empty()));
    let input_tokens = (input.raw_tokens > 0).then(|| {
        let count_model = config.model(model).map_or(model, |spec| spec.upstream_name(model));
        crate::admission::estimate_input_tokens(count_model, &input.messages).saturating_add(input.raw_tokens)
    });
    Ok(AdmitRequest {
        execution_id: execution_id.map(str::to_string),
        model: model.to_string(),
        input_tokens,
        max_output_tokens,
        messages: input.messages,
        tools,
        streaming,
        vision: input.vision,
        passthrough,
    })
}

/// The name of a JSON value's kind, for errors.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The input of a request, as text to count, and whether it carries images.
#[derive(Default)]
struct Input {
    messages: Vec<Message>,
    raw_tokens: i64,
    vision: bool,
}

impl Input {
    fn text(&mut self, role: &str, text: String) {
        self.messages.push(Message::new(role, text));
    }

    /// A field sent as JSON (tool definitions, schemas, input items): counted as its JSON text.
    fn json(&mut self, label: &str, v: Option<&Value>) {
        if let Some(v) = v.filter(|v| !v.is_null()) {
            self.text(label, v.to_string());
        }
    }

    /// A message content: text, or a list of parts (text parts counted, images noted).
    fn content(&mut self, role: &str, content: &Value, field: &str) -> Result<()> {
        match content {
            Value::Null => self.text(role, String::new()),
            Value::String(text) => self.text(role, text.clone()),
            Value::Array(parts) => {
                let mut text = String::new();
                for part in parts {
                    match part.get("type").and_then(Value::as_str) {
                        Some("image_url" | "input_image" | "image") => self.vision = true,
                        _ => match part.get("text").and_then(Value::as_str).or_else(|| part.as_str()) {
                            Some(t) => text.push_str(t),
                            // Another kind of part (audio, a file): counted as its JSON.
                            None => text.push_str(&part.to_string()),
                        },
                    }
                }
                self.text(role, text);
            }
            other => return Err(Error::invalid(field, format!("must be text or a list of content parts, got {}", kind(other)))),
        }
        Ok(())
    }

    /// One message: its content, and every other field but its role counted as JSON.
    fn message(&mut self, m: &Value, field: &str) -> Result<()> {
        let Some(fields) = m.as_object() else {
            return Err(Error::invalid(field, format!("must be a message object, got {}", kind(m))));
        };
        let role = fields.get("role").and_then(Value::as_str).unwrap_or("user");
        self.content(role, fields.get("content").unwrap_or(&Value::Null), &format!("{field}.content"))?;
        for (key, value) in fields {
            if key != "role" && key != "content" && !value.is_null() {
                self.text(role, value.to_string());
            }
        }
        Ok(())
    }
}

// A failure carries what it cost; it is the cold path, so its size does not matter.
#[allow(clippy::result_large_err)]
impl Kernel {
    /// Makes one governed provider call (see the module docs) and returns the provider's
    /// response unchanged.
    ///
    /// # Errors
    /// A [`CallFailure`]: the error — the admission's denials; [`Error::RateLimited`]
    /// (`provider_rate_limit`) on a provider 429; [`Error::Unavailable`] when every attempt
    /// failed, when an attempt failed after its request may have reached the provider (charged),
    /// or when the call was cancelled; [`Error::InvalidRequest`] for a malformed body or a
    /// provider 4xx — with the last attempt's execution id and settlement.
    pub async fn call_provider(&self, token: &str, call: ProviderCall) -> std::result::Result<ProviderReply, CallFailure> {
        http::run(self, token, call, None).await
    }

    /// As [`Kernel::call_provider`] for `"stream": true` requests: each SSE `data` payload is
    /// passed to `on_chunk` as it arrives; returning `false` abandons the stream, which is then
    /// settled from the counted output (estimated).
    ///
    /// # Errors
    /// As [`Kernel::call_provider`]; a stream cut off mid-way is settled, then reported as
    /// [`Error::Unavailable`].
    pub async fn stream_provider(
        &self,
        token: &str,
        call: ProviderCall,
        on_chunk: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> std::result::Result<ProviderReply, CallFailure> {
        http::run(self, token, call, Some(on_chunk)).await
    }

    /// [`Kernel::call_provider`] on the kernel's own runtime, for callers without one. Must not
    /// be called from inside an async runtime.
    ///
    /// # Errors
    /// As [`Kernel::call_provider`].
    pub fn call_provider_blocking(&self, token: &str, call: ProviderCall) -> std::result::Result<ProviderReply, CallFailure> {
        self.block_on(self.call_provider(token, call))?
    }

    /// [`Kernel::stream_provider`] on the kernel's own runtime.
    ///
    /// # Errors
    /// As [`Kernel::stream_provider`].
    pub fn stream_provider_blocking(
        &self,
        token: &str,
        call: ProviderCall,
        on_chunk: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> std::result::Result<ProviderReply, CallFailure> {
        self.block_on(self.stream_provider(token, call, on_chunk))?
    }

    /// Runs `future` to completion on the kernel's dispatch runtime (one worker thread, built on
    /// first use), on the calling thread: for bindings that wrap a governed call with work of
    /// their own (watching for a signal, say). Must not be called from inside an async runtime.
    ///
    /// # Errors
    /// [`Error::Unavailable`] if the runtime cannot be started.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> Result<F::Output> {
        Ok(self.dispatch_state().runtime()?.block_on(future))
    }
}

/// The denial for a strict bring-your-own-key provider called without a key.
pub(crate) fn passthrough_required(provider: &str) -> Error {
    Error::PolicyDenied {
        reason: PolicyRule::PassthroughRequired,
        message: format!("the host holds no key for provider '{provider}': the request must bring the agent's own"),
    }
}
