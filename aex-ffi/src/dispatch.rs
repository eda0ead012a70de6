//! Governed provider calls (`aex_kernel_call`, `aex_kernel_stream`) and the lookup of what one
//! came to (`aex_kernel_execution`). The rules — the output cap, retries, how a failure settles —
//! are aex-core's (`aex_core::dispatch`); this converts arguments and outcomes.
//!
//! Re-entrancy. A stream's callback runs on the calling thread, inside the kernel's dispatch
//! runtime. From there a governed call would have to block on a runtime from inside one (tokio
//! forbids it, and the outer stream could not move meanwhile), so it is refused with a status,
//! decided before anything is reserved; every other function may be called, including closing or
//! freeing the kernel being streamed on (see `kernel.rs`: a call holds the kernel, not a lock).

use std::cell::Cell;
use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};

use aex_core::dispatch::{CallFailure, Endpoint, ProviderCall, ProviderReply};
use aex_core::{Error, wire};

use crate::error::{aex_error, aex_status, arg_str, give_string, guard, opt_str, out_ptr};
use crate::kernel::{aex_kernel, aex_settlement, put, with_governed_call, with_kernel};

thread_local! {
    /// How many stream callbacks this thread is inside (callbacks do not nest, but a callback
    /// may run another kernel's non-governed functions).
    static CALLBACK_DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Whether this thread is inside a stream callback.
pub(crate) fn in_callback() -> bool {
    CALLBACK_DEPTH.with(Cell::get) > 0
}

/// Marks this thread as inside a stream callback while it lives.
struct InCallback;

impl InCallback {
    fn enter() -> InCallback {
        CALLBACK_DEPTH.with(|d| d.set(d.get() + 1));
        InCallback
    }
}

impl Drop for InCallback {
    fn drop(&mut self) {
        CALLBACK_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// Called with each streamed SSE `data` payload (`len` bytes, not NUL-terminated, valid only
/// during the call) on the thread that called `aex_kernel_stream`, one payload at a time. Return
/// `true` to continue, `false` to stop the stream (it is then settled from the counted output).
/// Time spent in the callback does not count toward the stream's idle gap timeout.
///
/// What a callback may call: any aex function except the two that make a governed call,
/// `aex_kernel_call` and `aex_kernel_stream` (on any kernel), which return
/// `AEX_INVALID_REQUEST` (field "callback") at once and reserve nothing: make that call after
/// the callback has returned. It may close the kernel it streams on (`aex_kernel_close`) or free
/// it (`aex_kernel_free`; the pointer must not be used again): the stream is then cancelled (no
/// further payload is delivered), settles by the money rules, and `aex_kernel_stream` returns
/// `AEX_UNAVAILABLE`. The callback
/// must return normally: no C++ exception or `longjmp` may leave it.
pub type aex_chunk_callback = Option<unsafe extern "C" fn(userdata: *mut c_void, data: *const c_char, len: usize) -> bool>;

fn nested_call() -> Error {
    Error::invalid(
        "callback",
        "a governed call (aex_kernel_call, aex_kernel_stream) cannot be made from inside a stream callback: \
         it would block the stream that called it; make it after the callback returns",
    )
}

fn provider_call(
    endpoint: *const c_char,
    request_json: *const c_char,
    passthrough_key: *const c_char,
    execution_id: *const c_char,
) -> Result<ProviderCall, Error> {
    let endpoint = Endpoint::parse(arg_str(endpoint, "endpoint")?)?;
    let body: serde_json::Value =
        serde_json::from_str(arg_str(request_json, "request_json")?).map_err(|e| Error::invalid("request_json", e.to_string()))?;
    if !body.is_object() {
        return Err(Error::invalid("request_json", "must be a JSON object"));
    }
    let mut call = ProviderCall::new(endpoint, body);
    call.passthrough_key = opt_str(passthrough_key, "passthrough_key")?.map(str::to_string);
    call.execution_id = opt_str(execution_id, "execution_id")?.map(str::to_string);
    Ok(call)
}

/// Writes what a governed call came to — the execution id of the attempt that answered (or of
/// the last attempt, on a failure) and its settlement — to the optional out-params, also when
/// the call failed after an attempt was admitted.
fn settled(
    result: Result<ProviderReply, Box<CallFailure>>,
    execution_id_out: *mut *mut c_char,
    settlement_out: *mut aex_settlement,
) -> Result<ProviderReply, Error> {
    let (id, settlement) = match &result {
        Ok(reply) => (Some(reply.execution_id.as_str()), Some(&reply.settlement)),
        Err(failure) => (failure.execution_id.as_deref(), failure.settlement.as_ref()),
    };
    if let Some(s) = settlement
        && !settlement_out.is_null()
    {
        put(settlement_out, aex_settlement::from(s));
    }
    if let Some(id) = id
        && !execution_id_out.is_null()
    {
        put(execution_id_out, give_string(id));
    }
    result.map_err(|failure| failure.error)
}

/// Makes one governed provider call: admits `request_json` (an OpenAI-style body for
/// `endpoint`: "chat", "responses" or "embeddings"), sends it to the model's provider with its
/// output cap set to the reservation's, settles it from the provider's usage, and writes the
/// provider's response body, byte for byte, to `*response_json` (free with `aex_string_free`).
///
/// `passthrough_key` (may be NULL) is the agent's own provider key; it is never recorded.
/// `execution_id` (may be NULL: aex makes a UUIDv7) is the host's id for the call: its first
/// attempt is admitted under it, retries and fallbacks under `ID.retry1`, `ID.fallback1`, ...
/// An id that was admitted before is never sent again (`AEX_CONFLICT`, reason
/// `idempotency_conflict`, nothing reserved), so a host unsure whether a call happened (it
/// crashed, say) may retry it under the same id, and on a conflict look up what became of it
/// with `aex_kernel_execution`.
///
/// What the call came to, written also when it failed after an attempt was admitted (and left
/// untouched when none was: a denial, a malformed request):
/// * `execution_id_out` (may be NULL) receives the execution id of the attempt that answered, or
///   of the last attempt on a failure (look it up with `aex_kernel_execution`); free it with
///   `aex_string_free`;
/// * `settlement_out` (may be NULL) receives that attempt's settlement: on a failure, a charge
///   (the request may have reached the provider: a cut answer, a timeout, a cancellation;
///   `AEX_UNAVAILABLE`) or a returned reservation (nothing was sent, or the provider refused), so
///   the host learns what it paid. Left untouched when that settlement could not be written (the
///   reservation then expires by the TTL rule).
///
/// Blocks the calling thread on the kernel's own runtime; thread-safe. Must not be called from
/// inside a stream callback (`AEX_INVALID_REQUEST`, field "callback"). `aex_kernel_close` on
/// another thread cancels it (`AEX_UNAVAILABLE`, settled as above).
///
/// # Safety
/// `k` live; `token`, `endpoint`, `request_json` NUL-terminated strings; `passthrough_key` and
/// `execution_id` NULL or such strings; `response_json` writable; `execution_id_out` and
/// `settlement_out` NULL or writable; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_call(
    k: *const aex_kernel,
    token: *const c_char,
    endpoint: *const c_char,
    request_json: *const c_char,
    passthrough_key: *const c_char,
    execution_id: *const c_char,
    response_json: *mut *mut c_char,
    execution_id_out: *mut *mut c_char,
    settlement_out: *mut aex_settlement,
    err: *mut *mut aex_error,
) -> aex_status {
    guard(err, || {
        if in_callback() {
            return Err(nested_call());
        }
        let token = arg_str(token, "token")?;
        let call = provider_call(endpoint, request_json, passthrough_key, execution_id)?;
        out_ptr(response_json, "response_json")?;
        let cancel = call.cancel.clone();
        let reply = with_governed_call(k, &cancel, |kernel| kernel.call_provider_blocking(token, call).map_err(Box::new))?;
        let reply = settled(reply, execution_id_out, settlement_out)?;
        put(response_json, give_string(&reply.raw));
        Ok(())
    })
}

struct Userdata(*mut c_void);
// SAFETY: the pointer is only handed back to the caller's callback, on the caller's thread.
unsafe impl Send for Userdata {}

/// As `aex_kernel_call` for a streaming request: the body is sent with `"stream": true` (and
/// `stream_options.include_usage` for chat), and `callback` receives each SSE `data` payload as
/// it arrives (see `aex_chunk_callback` for what it may call). Returns when the stream ends, is
/// stopped by the callback, is cut or stalls (`AEX_UNAVAILABLE`), or is cancelled by
/// `aex_kernel_close` (`AEX_UNAVAILABLE`); the call is settled in every case, from the
/// provider's usage or else from the counted output (marked estimated), and the settlement and
/// execution id are written as for `aex_kernel_call`.
///
/// # Safety
/// As `aex_kernel_call`; `callback` must be a valid function; `userdata` is passed to it as is.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_stream(
    k: *const aex_kernel,
    token: *const c_char,
    endpoint: *const c_char,
    request_json: *const c_char,
    passthrough_key: *const c_char,
    execution_id: *const c_char,
    callback: aex_chunk_callback,
    userdata: *mut c_void,
    execution_id_out: *mut *mut c_char,
    settlement_out: *mut aex_settlement,
    err: *mut *mut aex_error,
) -> aex_status {
    guard(err, || {
        if in_callback() {
            return Err(nested_call());
        }
        let token = arg_str(token, "token")?;
        let call = provider_call(endpoint, request_json, passthrough_key, execution_id)?;
        let callback = callback.ok_or_else(|| Error::invalid("callback", "must not be NULL"))?;
        let userdata = Userdata(userdata);
        let cancel = call.cancel.clone();
        // Once the kernel is closed, no payload reaches the callback: payloads already received
        // end the stream instead (it is abandoned, and settles from what was counted).
        let closed = AtomicBool::new(false);
        let (closed_flag, cancelled) = (&closed, cancel.clone());
        let mut on_chunk = move |data: &str| {
            if cancelled.is_cancelled() {
                closed_flag.store(true, Ordering::Relaxed);
                return false;
            }
            let u = &userdata;
            let _inside = InCallback::enter();
            // SAFETY: the caller promises a valid callback; `data` lives for the call.
            unsafe { callback(u.0, data.as_ptr().cast(), data.len()) }
        };
        let reply = with_governed_call(k, &cancel, |kernel| kernel.stream_provider_blocking(token, call, &mut on_chunk).map_err(Box::new))?;
        settled(reply, execution_id_out, settlement_out)?;
        if closed.load(Ordering::Relaxed) {
            return Err(Error::Unavailable("the kernel was closed during the stream; it was settled from the counted output".into()));
        }
        Ok(())
    })
}

/// Writes one execution as JSON to `*json_out` (free with `aex_string_free`): `execution_id`,
/// `agent`, `state` ("RESERVED", "DISPATCHED", "COMMITTED", "RELEASED", "FAILED"), `model`,
/// `input_tokens`, `max_output_tokens`, `reserved_micro`, `cost_micro`, `reason`,
/// `created_at_ms`, `expires_at_ms`, `dispatched_at_ms`, `settled_at_ms` (`null` until they
/// apply). `AEX_NOT_FOUND` for an id never admitted.
///
/// # Safety
/// `k` live; `execution_id` a NUL-terminated string; `json_out` writable; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_execution(k: *const aex_kernel, execution_id: *const c_char, json_out: *mut *mut c_char, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let id = arg_str(execution_id, "execution_id")?;
        out_ptr(json_out, "json_out")?;
        let execution = with_kernel(k, |k| k.execution(id))?;
        put(json_out, give_string(&wire::execution_json(&execution).to_string()));
        Ok(())
    })
}
