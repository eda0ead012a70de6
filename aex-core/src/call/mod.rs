//! One provider call in flight, and the one place that decides how it settles.
//!
//! The layers that talk to a provider — the dispatcher here, and the bindings' guards and
//! wrappers — only *feed* a [`Call`]: the request may have been sent ([`Call::sent`]), here is
//! output ([`Call::output`]: text and tool-call arguments), here is the provider's usage
//! ([`Call::usage`]), and it ended like this ([`Call::end`] with an [`Ending`]). From that, and
//! only here, the call settles by the two money rules:
//!
//! 1. **What may have reached the provider ends charged.** From the provider's usage when it
//!    reported a valid one; otherwise from what was counted — the admitted input plus every
//!    output token seen (content and tool-call arguments); and when nothing was seen (a timeout
//!    after sending, a 2xx whose body cannot be read, a cancellation before the answer, usage out
//!    of range) at the full reservation. Both estimates are marked `estimated` in the ledger.
//!    The reservation is returned only when nothing was sent ([`Call::sent`] never called, or
//!    [`Ending::NotSent`]: released) or the provider refused before doing work
//!    ([`Ending::Refused`]: a 3xx, 4xx, 429 or 5xx status; [`Ending::Failed`] with no output
//!    seen: failed). A failure after output was seen is charged for that output.
//! 2. Exactly once: [`Call::end`] consumes the call; a call dropped without ending (a panic, a
//!    cancelled future, an abandoned iterator) ends as [`Ending::Interrupted`].
//!
//! Thread-safety: a `Call` belongs to one task at a time (`Send`, not shared).

use serde_json::Value;

use crate::Kernel;
use crate::admission::{Admission, count_text_tokens};
use crate::error::Result;
use crate::settlement::{MAX_TOKENS, Settlement, Usage};

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The provider answered in full (with or without a usage report).
    Completed,
    /// The provider refused before doing any work: this HTTP status (3xx, 4xx, 429, 5xx).
    Refused {
        /// The status it answered.
        status: u16,
    },
    /// The caller reports that the provider failed before doing any work (an error response it
    /// received); why, for the ledger.
    Failed(String),
    /// The call ended in doubt: a stream cut or abandoned, a timeout after sending, an unreadable
    /// answer, a cancellation. Why, for the ledger.
    Interrupted(String),
    /// aex knows nothing reached the provider after all (the connection could not be made):
    /// released, whatever was marked sent. Why, for the ledger.
    NotSent(String),
}

/// The settlement of a call, and whether aex estimated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The execution's settlement.
    pub settlement: Settlement,
    /// The amount was counted or assumed by aex, not reported by the provider.
    pub estimated: bool,
}

/// One admitted execution on its way to and from the provider. See the module docs.
#[derive(Debug)]
pub struct Call {
    kernel: Kernel,
    execution_id: String,
    /// The name the tokenizer knows the model by.
    count_model: String,
    input_tokens: i64,
    max_output_tokens: i64,
    sent: bool,
    output: String,
    usage: Option<Usage>,
    bad_usage: bool,
    ended: bool,
}

impl Call {
    /// A call for an admitted execution; `count_model` is the model name to count output tokens
    /// with (the provider's name for it).
    pub fn new(kernel: &Kernel, admission: &Admission, count_model: &str) -> Call {
        Call {
            kernel: kernel.clone(),
            execution_id: admission.execution_id.clone(),
            count_model: count_model.to_string(),
            input_tokens: admission.input_tokens,
            max_output_tokens: admission.max_output_tokens,
            sent: false,
            output: String::new(),
            usage: None,
            bad_usage: false,
            ended: false,
        }
    }

    /// A call for an execution admitted earlier (by id), as the bindings hold it: the output is
    /// counted with the model's configured provider name.
    ///
    /// # Errors
    /// [`crate::Error::NotFound`] for an unknown execution; the store's errors.
    pub fn for_execution(kernel: &Kernel, execution_id: &str) -> Result<Call> {
        let e = kernel.execution(execution_id)?;
        let config = kernel.config();
        let count_model = config.model(&e.model).map_or(e.model.as_str(), |spec| spec.upstream_name(&e.model)).to_string();
        let mut call = Call {
            kernel: kernel.clone(),
            execution_id: e.id.clone(),
            count_model,
            input_tokens: e.input_tokens,
            max_output_tokens: e.max_output_tokens,
            sent: e.dispatched_at_ms.is_some(),
            output: String::new(),
            usage: None,
            bad_usage: false,
            ended: false,
        };
        if !e.state.is_open() {
            call.ended = true; // already settled: nothing left to do on drop
        }
        Ok(call)
    }

    /// The execution id.
    pub fn execution_id(&self) -> &str {
        &self.execution_id
    }

    /// The request may have reached the provider: from now on the call ends charged (unless the
    /// provider refuses it before doing work).
    pub fn sent(&mut self) {
        self.sent = true;
    }

    /// Output the provider produced: message text, a stream's delta, tool-call arguments.
    pub fn output(&mut self, text: &str) {
        self.output.push_str(text);
    }

    /// An OpenAI-style `usage` object (chat, responses or embeddings). One whose counts are
    /// missing, negative or beyond [`MAX_TOKENS`] is not trusted: the call then settles at its
    /// full reservation. `embeddings` usage reports no output.
    pub fn usage(&mut self, usage: &Value, embeddings: bool) {
        match usage_of(usage) {
            Some(mut u) => {
                if embeddings {
                    u.output_tokens = 0;
                }
                self.reported(u);
            }
            None if usage.is_null() => {}
            None => self.bad_usage = true,
        }
    }

    /// Token counts the provider reported, already read from its usage object. Counts out of
    /// range are not trusted (the call then settles at its full reservation).
    pub fn reported(&mut self, usage: Usage) {
        if usage.validate().is_ok() {
            self.usage = Some(usage);
        } else {
            self.bad_usage = true;
        }
    }

    /// Feeds the call one answer body or stream event, parsed: the output it carries (unless
    /// `embeddings`, which bill no output) and its usage (`usage`, or a Responses event's
    /// `response.usage`). Returns whether it says the answer is whole (see [`is_complete`]).
    pub fn observe(&mut self, v: &Value, embeddings: bool) -> bool {
        if !embeddings {
            self.output(&output_of(v));
        }
        let usage = v.get("usage").filter(|u| !u.is_null()).or_else(|| v.pointer("/response/usage").filter(|u| !u.is_null()));
        if let Some(u) = usage {
            self.usage(u, embeddings);
        }
        is_complete(v)
    }

    /// Whether a usage report has been seen.
    pub fn has_usage(&self) -> bool {
        self.usage.is_some()
    }

    /// Ends the call and settles it, exactly once (see the module docs).
    ///
    /// # Errors
    /// The store's errors; [`crate::Error::Conflict`] if the execution was settled elsewhere.
    pub fn end(mut self, ending: Ending) -> Result<Settled> {
        self.ended = true;
        self.settle(ending)
    }

    fn settle(&mut self, ending: Ending) -> Result<Settled> {
        let result = self.decide(ending);
        if let Err(crate::Error::Conflict { .. }) = &result
            && let Ok(e) = self.kernel.execution(&self.execution_id)
            && !e.state.is_open()
        {
            // Settled elsewhere meanwhile (the caller's own `commit` or `fail`): that stands.
            return Ok(Settled { settlement: Settlement::of(&e, true), estimated: false });
        }
        result
    }

    fn decide(&mut self, ending: Ending) -> Result<Settled> {
        let k = &self.kernel;
        let id = self.execution_id.as_str();
        if !self.sent {
            let why = match &ending {
                Ending::Interrupted(why) | Ending::Failed(why) => why.as_str(),
                Ending::Refused { .. } | Ending::Completed | Ending::NotSent(_) => "not sent",
            };
            return Ok(Settled { settlement: k.release(id, why)?, estimated: false });
        }
        let full = Usage::new(self.input_tokens, self.max_output_tokens);
        let counted = || Usage::new(self.input_tokens, count_text_tokens(&self.count_model, &self.output).min(MAX_TOKENS));
        let estimate = |u: Usage| Ok(Settled { settlement: k.commit_estimated(id, u)?, estimated: true });
        match (ending, self.usage, self.bad_usage) {
            (Ending::NotSent(why), _, _) => Ok(Settled { settlement: k.release(id, &why)?, estimated: false }),
            (Ending::Refused { status }, _, _) => {
                Ok(Settled { settlement: k.fail(id, &format!("provider answered {status}"))?, estimated: false })
            }
            // A failure after output was seen: the provider did that work, so it is charged.
            (Ending::Failed(_), None, false) if !self.output.is_empty() => estimate(counted()),
            (Ending::Failed(why), _, _) => Ok(Settled { settlement: k.fail(id, &why)?, estimated: false }),
            (_, _, true) => estimate(full),
            (_, Some(u), false) => Ok(Settled { settlement: k.commit(id, u)?, estimated: false }),
            (Ending::Completed, None, false) => estimate(counted()),
            (Ending::Interrupted(_), None, false) if !self.output.is_empty() => estimate(counted()),
            (Ending::Interrupted(_), None, false) => estimate(full),
        }
    }
}

impl Drop for Call {
    /// A call dropped without [`Call::end`] — a panic, a cancelled future, an abandoned stream —
    /// ends as interrupted (best effort: a store error now leaves the execution to the TTL rule,
    /// which charges a dispatched one in full).
    fn drop(&mut self) {
        if !self.ended {
            self.ended = true;
            let _ = self.settle(Ending::Interrupted("dropped".into()));
        }
    }
}

/// `(input, output, cached input)` tokens from an OpenAI-style `usage` object of any endpoint,
/// or `None` when it has no input count.
pub fn usage_of(usage: &Value) -> Option<Usage> {
    let n = |v: Option<&Value>| v.and_then(Value::as_i64);
    let input = n(usage.get("prompt_tokens")).or_else(|| n(usage.get("input_tokens")))?;
    let output = n(usage.get("completion_tokens")).or_else(|| n(usage.get("output_tokens"))).unwrap_or(0);
    let cached = n(usage.pointer("/prompt_tokens_details/cached_tokens"))
        .or_else(|| n(usage.pointer("/input_tokens_details/cached_tokens")))
        .unwrap_or(0);
    Some(Usage { input_tokens: input, output_tokens: output, cached_input_tokens: cached.clamp(0, input.max(0)) })
}

/// The output a response or stream event carries that is billed as output: message text,
/// refusals and reasoning text, tool-call, function-call and custom-tool arguments — for chat
/// (plain and streamed), legacy completions, and responses (bodies and stream events).
pub fn output_of(v: &Value) -> String {
    let mut out = String::new();
    let mut text = |t: Option<&Value>| {
        if let Some(t) = t.and_then(Value::as_str) {
            out.push_str(t);
        }
    };
    for c in v.get("choices").and_then(Value::as_array).into_iter().flatten() {
        text(c.get("text"));
        for part in ["message", "delta"] {
            let Some(m) = c.get(part) else { continue };
            for key in ["content", "refusal", "reasoning_content"] {
                text(m.get(key));
            }
            text(m.pointer("/function_call/arguments"));
            for t in m.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
                text(t.pointer("/function/arguments"));
            }
        }
    }
    text(v.get("output_text"));
    let delta_kinds = [
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
    ];
    if v.get("type").and_then(Value::as_str).is_some_and(|k| delta_kinds.contains(&k)) {
        text(v.get("delta"));
    }
    for item in v.get("output").and_then(Value::as_array).into_iter().flatten() {
        text(item.get("arguments"));
        text(item.get("input"));
        // `output_text`, where present, already holds the message text.
        if v.get("output_text").is_none() {
            for c in item.get("content").and_then(Value::as_array).into_iter().flatten() {
                text(c.get("text"));
                text(c.get("refusal"));
            }
        }
    }
    out
}

/// Whether an answer body or stream event says the answer is whole: a Responses terminal
/// event, a choice with a `finish_reason`, or a usage report.
pub fn is_complete(v: &Value) -> bool {
    matches!(v.get("type").and_then(Value::as_str), Some("response.completed" | "response.incomplete" | "response.failed"))
        || v.get("choices").and_then(Value::as_array).is_some_and(|cs| cs.iter().any(|c| c.get("finish_reason").is_some_and(|f| !f.is_null())))
        || v.get("usage").is_some_and(Value::is_object)
}
