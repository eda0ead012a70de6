//! `aex_kernel` and the guarded-call surface.

use std::ffi::{CString, c_char};

use aex_core::{Error, ExecutionState, Head, Kernel, ManualClock, Settlement, TeamSpec, Usage, wire};
use parking_lot::RwLock;

use crate::error::{aex_error, aex_status, arg_str, give_string, guard, opt_str, out_ptr};
use crate::options::aex_options;

/// A governance kernel over one database. Thread-safe: any number of threads may call any
/// function on one handle at once. `aex_kernel_close` ends its use (later calls return
/// `AEX_UNAVAILABLE`); `aex_kernel_free` releases it, after which the pointer must not be used
/// (that cannot be detected).
pub struct aex_kernel {
    kernel: RwLock<Option<Kernel>>,
    clock: Option<ManualClock>,
}

/// An admitted execution. Owned by the caller; free with `aex_admission_free`. Immutable, so it
/// may be read from any thread.
pub struct aex_admission {
    execution_id: CString,
    reserved_micro: i64,
    input_tokens: i64,
    max_output_tokens: i64,
    expires_at_ms: i64,
    replayed: bool,
    state: aex_execution_state,
}

/// Where an execution stands.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum aex_execution_state {
    /// Admitted; budget reserved; not sent.
    Reserved = 0,
    /// Handed to the provider.
    Dispatched = 1,
    /// Settled at its real cost.
    Committed = 2,
    /// Given back without a call.
    Released = 3,
    /// The call failed; given back.
    Failed = 4,
}

impl From<ExecutionState> for aex_execution_state {
    fn from(s: ExecutionState) -> Self {
        match s {
            ExecutionState::Reserved => aex_execution_state::Reserved,
            ExecutionState::Dispatched => aex_execution_state::Dispatched,
            ExecutionState::Committed => aex_execution_state::Committed,
            ExecutionState::Released => aex_execution_state::Released,
            ExecutionState::Failed => aex_execution_state::Failed,
        }
    }
}

/// Tokens a call used, as the provider reported them. A plain value, owned by the caller.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct aex_usage {
    /// Prompt tokens, including cached ones.
    pub input_tokens: i64,
    /// Completion tokens.
    pub output_tokens: i64,
    /// The part of `input_tokens` served from the provider's cache.
    pub cached_input_tokens: i64,
}

/// The outcome of commit, release or fail. A plain value written into caller storage.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct aex_settlement {
    /// The terminal state.
    pub state: aex_execution_state,
    /// What admission reserved, micro-USD.
    pub reserved_micro: i64,
    /// What was charged, micro-USD.
    pub cost_micro: i64,
    /// What went back to the budget, micro-USD.
    pub released_micro: i64,
    /// What was charged beyond the reservation, micro-USD.
    pub overrun_micro: i64,
    /// Settled by the TTL rule before this call.
    pub expired: bool,
    /// This call repeated an identical earlier one; nothing changed.
    pub replayed: bool,
}

impl From<&Settlement> for aex_settlement {
    fn from(s: &Settlement) -> Self {
        aex_settlement {
            state: s.state.into(),
            reserved_micro: s.reserved_micro,
            cost_micro: s.cost_micro,
            released_micro: s.released_micro,
            overrun_micro: s.overrun_micro,
            expired: s.expired,
            replayed: s.replayed,
        }
    }
}

fn with_kernel<T>(k: *const aex_kernel, f: impl FnOnce(&Kernel) -> Result<T, Error>) -> Result<T, Error> {
    // SAFETY: NULL or a live `aex_kernel` (use after `aex_kernel_free` is undefined, as documented).
    let handle = unsafe { k.as_ref() }.ok_or_else(|| Error::invalid("kernel", "must not be NULL"))?;
    let guard = handle.kernel.read();
    let kernel = guard.as_ref().ok_or_else(|| Error::Unavailable("the kernel is closed".into()))?;
    f(kernel)
}

/// Writes a value to a checked out-param.
fn put<T>(out: *mut T, value: T) {
    // SAFETY: checked non-NULL with `out_ptr` before any work; writable per the contract.
    unsafe { out.write(value) };
}

/// Opens (creating if needed) the database at `path` (":memory:" for a private in-memory one)
/// with `opts` (NULL for defaults), and writes the kernel to `*out`.
///
/// # Safety
/// `path` must be a NUL-terminated string; `opts` NULL or live; `out` writable; `err` NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_open(path: *const c_char, opts: *const aex_options, out: *mut *mut aex_kernel, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let path = arg_str(path, "path")?;
        out_ptr(out, "out")?;
        // SAFETY: NULL or live, per the contract.
        let opts = unsafe { opts.as_ref() };
        let options = opts.map(|o| o.options.clone()).unwrap_or_default();
        let clock = opts.and_then(|o| o.manual_clock.clone());
        let kernel = if path == ":memory:" { Kernel::open_in_memory(options)? } else { Kernel::open(path, options)? };
        put(out, Box::into_raw(Box::new(aex_kernel { kernel: RwLock::new(Some(kernel)), clock })));
        Ok(())
    })
}

/// Closes the kernel's store. Calls made after it return `AEX_UNAVAILABLE`; calls in progress
/// finish first. The handle itself stays valid until `aex_kernel_free`. NULL is a no-op.
///
/// # Safety
/// `k` must be NULL or a live `aex_kernel`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_close(k: *const aex_kernel) {
    // SAFETY: NULL or live, per the contract.
    if let Some(handle) = unsafe { k.as_ref() } {
        handle.kernel.write().take();
    }
}

/// Closes (if needed) and frees a kernel. NULL is a no-op. No other thread may be using it.
///
/// # Safety
/// `k` must be NULL or from `aex_kernel_open`, not yet freed, and unused by other threads.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_free(k: *mut aex_kernel) {
    if !k.is_null() {
        // SAFETY: from `Box::into_raw` in `aex_kernel_open`, per the contract.
        drop(unsafe { Box::from_raw(k) });
    }
}

/// For tests: moves a manual clock (see `aex_options_set_manual_clock`) by `ms`.
///
/// # Safety
/// `k` must be NULL or live; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_advance_clock(k: *const aex_kernel, ms: i64, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        // SAFETY: NULL or live, per the contract.
        let handle = unsafe { k.as_ref() }.ok_or_else(|| Error::invalid("kernel", "must not be NULL"))?;
        let clock = handle.clock.as_ref().ok_or_else(|| Error::invalid("kernel", "was not opened with a manual clock"))?;
        clock.advance(ms);
        Ok(())
    })
}

/// Creates an agent from a JSON spec (`{"name": "atlas", "budget_usd": "5.00", "rpm": 30, ...}`,
/// the form of `aex_core::wire::agent_spec`) and writes its token to `*token_out`: shown this
/// once; free it with `aex_string_free`.
///
/// # Safety
/// `k` live; `spec_json` a NUL-terminated string; `token_out` writable; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_create_agent(k: *const aex_kernel, spec_json: *const c_char, token_out: *mut *mut c_char, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let spec = wire::agent_spec(arg_str(spec_json, "spec_json")?)?;
        out_ptr(token_out, "token_out")?;
        let created = with_kernel(k, |k| k.create_agent(&spec))?;
        put(token_out, give_string(created.token.expose()));
        Ok(())
    })
}

/// Writes one agent as JSON (never its token) to `*json_out`; free it with `aex_string_free`.
///
/// # Safety
/// `k` live; `name` a NUL-terminated string; `json_out` writable; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_agent(k: *const aex_kernel, name: *const c_char, json_out: *mut *mut c_char, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let name = arg_str(name, "name")?;
        out_ptr(json_out, "json_out")?;
        let agent = with_kernel(k, |k| k.agent(name))?;
        put(json_out, give_string(&wire::agent_json(&agent).to_string()));
        Ok(())
    })
}

/// Writes all agents as a JSON array to `*json_out`; free it with `aex_string_free`.
///
/// # Safety
/// `k` live; `json_out` writable; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_list_agents(k: *const aex_kernel, json_out: *mut *mut c_char, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        out_ptr(json_out, "json_out")?;
        let agents = with_kernel(k, Kernel::list_agents)?;
        let list: Vec<_> = agents.iter().map(wire::agent_json).collect();
        put(json_out, give_string(&serde_json::Value::from(list).to_string()));
        Ok(())
    })
}

/// Sets an agent's budget, micro-USD.
///
/// # Safety
/// `k` live; `name` a NUL-terminated string; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_set_budget(k: *const aex_kernel, name: *const c_char, budget_micro: i64, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let name = arg_str(name, "name")?;
        with_kernel(k, |k| k.set_budget(name, budget_micro)).map(drop)
    })
}

/// Disables (`disabled = true`) or enables an agent.
///
/// # Safety
/// `k` live; `name` a NUL-terminated string; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_set_disabled(k: *const aex_kernel, name: *const c_char, disabled: bool, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let name = arg_str(name, "name")?;
        with_kernel(k, |k| k.set_disabled(name, disabled)).map(drop)
    })
}

/// Deletes an agent, releasing its open reservations first.
///
/// # Safety
/// `k` live; `name` a NUL-terminated string; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_delete_agent(k: *const aex_kernel, name: *const c_char, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let name = arg_str(name, "name")?;
        with_kernel(k, |k| k.delete_agent(name))
    })
}

/// Replaces an agent's token (the old one stops working at once) and writes the new one to
/// `*token_out`. `ttl_ms` > 0 sets a new lifetime; 0 renews the agent's existing one.
///
/// # Safety
/// `k` live; `name` a NUL-terminated string; `token_out` writable; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_rotate_token(k: *const aex_kernel, name: *const c_char, ttl_ms: i64, token_out: *mut *mut c_char, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let name = arg_str(name, "name")?;
        out_ptr(token_out, "token_out")?;
        let ttl = if ttl_ms == 0 { None } else { Some(ttl_ms) };
        let token = with_kernel(k, |k| k.rotate_token(name, ttl))?;
        put(token_out, give_string(token.expose()));
        Ok(())
    })
}

/// Creates a team with a budget in micro-USD under an optional `parent` (NULL for none).
///
/// # Safety
/// `k` live; `name` a NUL-terminated string; `parent` NULL or one; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_create_team(k: *const aex_kernel, name: *const c_char, budget_micro: i64, parent: *const c_char, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let spec = TeamSpec { name: arg_str(name, "name")?.to_string(), budget_micro, parent: opt_str(parent, "parent")?.map(str::to_string) };
        with_kernel(k, |k| k.create_team(&spec)).map(drop)
    })
}

/// Writes one team as JSON to `*json_out`; free it with `aex_string_free`.
///
/// # Safety
/// `k` live; `name` a NUL-terminated string; `json_out` writable; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_team(k: *const aex_kernel, name: *const c_char, json_out: *mut *mut c_char, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let name = arg_str(name, "name")?;
        out_ptr(json_out, "json_out")?;
        let team = with_kernel(k, |k| k.team(name))?;
        put(json_out, give_string(&wire::team_json(&team).to_string()));
        Ok(())
    })
}

/// Admits a call. `request_json` is the request (`{"model": "gpt-4o-mini", "input_tokens": 1200,
/// "max_output_tokens": 256, "execution_id": "job-1", "messages": [...], "tools": false, "stream":
/// false, "vision": false}`). On success `*out` receives the admission (free with
/// `aex_admission_free`); on a denial nothing is reserved and `*err` says why.
///
/// # Safety
/// `k` live; `token` and `request_json` NUL-terminated strings; `out` writable; `err` NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_admit(k: *const aex_kernel, token: *const c_char, request_json: *const c_char, out: *mut *mut aex_admission, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let token = arg_str(token, "token")?;
        let request = wire::admit_request(arg_str(request_json, "request_json")?)?;
        out_ptr(out, "out")?;
        let a = with_kernel(k, |k| k.admit(token, &request))?;
        let adm = aex_admission {
            execution_id: CString::new(a.execution_id).map_err(|_| Error::Internal("execution id with NUL".into()))?,
            reserved_micro: a.reserved_micro,
            input_tokens: a.input_tokens,
            max_output_tokens: a.max_output_tokens,
            expires_at_ms: a.expires_at_ms,
            replayed: a.replayed,
            state: a.state.into(),
        };
        put(out, Box::into_raw(Box::new(adm)));
        Ok(())
    })
}

/// Records that the call was handed to the provider.
///
/// # Safety
/// `k` live; `execution_id` a NUL-terminated string; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_mark_dispatched(k: *const aex_kernel, execution_id: *const c_char, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let id = arg_str(execution_id, "execution_id")?;
        with_kernel(k, |k| k.mark_dispatched(id)).map(drop)
    })
}

/// Settles an execution at the real usage and writes the outcome to `*out`.
///
/// # Safety
/// `k` live; `execution_id` a NUL-terminated string; `usage` readable; `out` writable; `err`
/// NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_commit(k: *const aex_kernel, execution_id: *const c_char, usage: *const aex_usage, out: *mut aex_settlement, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let id = arg_str(execution_id, "execution_id")?;
        // SAFETY: NULL or readable, per the contract.
        let u = unsafe { usage.as_ref() }.ok_or_else(|| Error::invalid("usage", "must not be NULL"))?;
        out_ptr(out, "out")?;
        let usage = Usage { input_tokens: u.input_tokens, output_tokens: u.output_tokens, cached_input_tokens: u.cached_input_tokens };
        let s = with_kernel(k, |k| k.commit(id, usage))?;
        put(out, aex_settlement::from(&s));
        Ok(())
    })
}

/// Gives the reservation back: the call did not happen. `reason` may be NULL.
///
/// # Safety
/// `k` live; `execution_id` a NUL-terminated string; `reason` NULL or one; `out` writable; `err`
/// NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_release(k: *const aex_kernel, execution_id: *const c_char, reason: *const c_char, out: *mut aex_settlement, err: *mut *mut aex_error) -> aex_status {
    give_back(k, execution_id, reason, "reason", out, err, Kernel::release)
}

/// Release and fail: both give the reservation back and record a text.
fn give_back(
    k: *const aex_kernel,
    execution_id: *const c_char,
    text: *const c_char,
    text_name: &str,
    out: *mut aex_settlement,
    err: *mut *mut aex_error,
    settle: fn(&Kernel, &str, &str) -> aex_core::Result<Settlement>,
) -> aex_status {
    guard(err, || {
        let id = arg_str(execution_id, "execution_id")?;
        let text = opt_str(text, text_name)?.unwrap_or("");
        out_ptr(out, "out")?;
        let s = with_kernel(k, |k| settle(k, id, text))?;
        put(out, aex_settlement::from(&s));
        Ok(())
    })
}

/// Gives the reservation back and records the failure. `error` may be NULL.
///
/// # Safety
/// As `aex_kernel_release`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_fail(k: *const aex_kernel, execution_id: *const c_char, error: *const c_char, out: *mut aex_settlement, err: *mut *mut aex_error) -> aex_status {
    give_back(k, execution_id, error, "error", out, err, Kernel::fail)
}

/// Verifies the ledger and counters and writes the report as JSON to `*json_out` (`"clean":
/// true|false`, counts, head, and the first failure). `anchor` ("SEQ:HASH") may be NULL. What
/// the audit finds is in the report; the status is `AEX_OK` unless the audit could not run.
///
/// # Safety
/// `k` live; `anchor` NULL or a NUL-terminated string; `json_out` writable; `err` NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_audit(k: *const aex_kernel, anchor: *const c_char, json_out: *mut *mut c_char, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let anchor = opt_str(anchor, "anchor")?.map(Head::parse).transpose()?;
        out_ptr(json_out, "json_out")?;
        let report = with_kernel(k, |k| k.audit(anchor.as_ref()))?;
        put(json_out, give_string(&wire::audit_json(&report).to_string()));
        Ok(())
    })
}

/// Writes the ledger's head as "SEQ:HASH" to `*head_out`, or NULL for an empty ledger; free it
/// with `aex_string_free`.
///
/// # Safety
/// `k` live; `head_out` writable; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_head(k: *const aex_kernel, head_out: *mut *mut c_char, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        out_ptr(head_out, "head_out")?;
        let head = with_kernel(k, Kernel::head)?;
        put(head_out, head.map_or(std::ptr::null_mut(), |h| give_string(&h.to_text())));
        Ok(())
    })
}

/// Reloads the models config from a `models.yaml` file. A bad file is refused (the message
/// names the field and line), recorded in the ledger, and the config in force stays.
///
/// # Safety
/// `k` live; `path` a NUL-terminated string; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_reload_config(k: *const aex_kernel, path: *const c_char, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let path = arg_str(path, "path")?;
        with_kernel(k, |k| k.reload_config_file(path))
    })
}

fn admission<'a>(a: *const aex_admission) -> Option<&'a aex_admission> {
    // SAFETY: NULL or a live admission, per each accessor's contract.
    unsafe { a.as_ref() }
}

/// The execution id to settle with. Lives as long as `a`; "" for NULL.
///
/// # Safety
/// `a` must be NULL or a live `aex_admission`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_admission_execution_id(a: *const aex_admission) -> *const c_char {
    admission(a).map_or(c"".as_ptr(), |a| a.execution_id.as_ptr())
}

/// The reservation, micro-USD.
///
/// # Safety
/// `a` must be NULL or a live `aex_admission` (NULL gives 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_admission_reserved_micro(a: *const aex_admission) -> i64 {
    admission(a).map_or(0, |a| a.reserved_micro)
}

/// The input tokens reserved for.
///
/// # Safety
/// `a` must be NULL or a live `aex_admission` (NULL gives 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_admission_input_tokens(a: *const aex_admission) -> i64 {
    admission(a).map_or(0, |a| a.input_tokens)
}

/// The output cap reserved for: send it as the provider's `max_tokens`.
///
/// # Safety
/// `a` must be NULL or a live `aex_admission` (NULL gives 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_admission_max_output_tokens(a: *const aex_admission) -> i64 {
    admission(a).map_or(0, |a| a.max_output_tokens)
}

/// When the reservation expires if unsettled, ms since the epoch.
///
/// # Safety
/// `a` must be NULL or a live `aex_admission` (NULL gives 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_admission_expires_at_ms(a: *const aex_admission) -> i64 {
    admission(a).map_or(0, |a| a.expires_at_ms)
}

/// Whether this admission repeated an earlier identical one (nothing more was reserved).
///
/// # Safety
/// `a` must be NULL or a live `aex_admission` (NULL gives false).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_admission_replayed(a: *const aex_admission) -> bool {
    admission(a).is_some_and(|a| a.replayed)
}

/// The execution's state when admitted (not `RESERVED` only for a replay).
///
/// # Safety
/// `a` must be NULL or a live `aex_admission` (NULL gives RESERVED).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_admission_state(a: *const aex_admission) -> aex_execution_state {
    admission(a).map_or(aex_execution_state::Reserved, |a| a.state)
}

/// Frees an admission. NULL is a no-op.
///
/// # Safety
/// `a` must be NULL or from `aex_kernel_admit`, not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_admission_free(a: *mut aex_admission) {
    if !a.is_null() {
        // SAFETY: from `Box::into_raw` in `aex_kernel_admit`, per the contract.
        drop(unsafe { Box::from_raw(a) });
    }
}


/// Called with each streamed SSE `data` payload (`len` bytes, not NUL-terminated) on the thread
/// that called `aex_kernel_stream`. Return `true` to continue, `false` to stop the stream (it is
/// then settled from the counted output).
pub type aex_chunk_callback = Option<unsafe extern "C" fn(userdata: *mut std::ffi::c_void, data: *const c_char, len: usize) -> bool>;

fn provider_call(endpoint: *const c_char, request_json: *const c_char, passthrough_key: *const c_char) -> Result<aex_core::dispatch::ProviderCall, Error> {
    let endpoint = aex_core::dispatch::Endpoint::parse(arg_str(endpoint, "endpoint")?)?;
    let body: serde_json::Value =
        serde_json::from_str(arg_str(request_json, "request_json")?).map_err(|e| Error::invalid("request_json", e.to_string()))?;
    if !body.is_object() {
        return Err(Error::invalid("request_json", "must be a JSON object"));
    }
    let mut call = aex_core::dispatch::ProviderCall::new(endpoint, body);
    call.passthrough_key = opt_str(passthrough_key, "passthrough_key")?.map(str::to_string);
    Ok(call)
}

/// Makes one governed provider call: admits `request_json` (an OpenAI-style body for
/// `endpoint`: "chat", "responses" or "embeddings"), sends it to the model's provider, settles
/// from the usage, and writes the provider's response JSON, unchanged, to `*response_json` (free
/// with `aex_string_free`). `passthrough_key` (may be NULL) is the agent's own provider key; it
/// is never recorded. `settlement_out` (may be NULL) receives the settlement — also when the
/// call fails after its last attempt was settled: a charged failure (the request may have
/// reached the provider: a cut answer, a timeout) or a returned reservation, so the host learns
/// what it paid; it is left untouched when no attempt was admitted. Blocks the calling
/// thread on the kernel's own runtime; thread-safe.
///
/// # Safety
/// `k` live; `token`, `endpoint`, `request_json` NUL-terminated strings; `passthrough_key` NULL
/// or one; `response_json` writable; `settlement_out` NULL or writable; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_call(
    k: *const aex_kernel,
    token: *const c_char,
    endpoint: *const c_char,
    request_json: *const c_char,
    passthrough_key: *const c_char,
    response_json: *mut *mut c_char,
    settlement_out: *mut aex_settlement,
    err: *mut *mut aex_error,
) -> aex_status {
    guard(err, || {
        let token = arg_str(token, "token")?;
        let call = provider_call(endpoint, request_json, passthrough_key)?;
        out_ptr(response_json, "response_json")?;
        let reply = with_kernel(k, |k| Ok(k.call_provider_blocking(token, call)))?;
        let reply = settled(reply, settlement_out)?;
        put(response_json, give_string(&reply.raw));
        Ok(())
    })
}

/// Writes what a governed call came to — its settlement, also when it failed after being
/// settled (a charged failure, a refusal) — to `settlement_out` (may be NULL).
fn settled(
    result: Result<aex_core::dispatch::ProviderReply, aex_core::dispatch::CallFailure>,
    settlement_out: *mut aex_settlement,
) -> Result<aex_core::dispatch::ProviderReply, Error> {
    let settlement = match &result {
        Ok(reply) => Some(&reply.settlement),
        Err(failure) => failure.settlement.as_ref(),
    };
    if let Some(s) = settlement
        && !settlement_out.is_null()
    {
        put(settlement_out, aex_settlement::from(s));
    }
    result.map_err(Error::from)
}

struct Userdata(*mut std::ffi::c_void);
// SAFETY: the pointer is only handed back to the caller's callback, on the caller's thread.
unsafe impl Send for Userdata {}

/// As `aex_kernel_call` for a streaming request: the body is sent with `"stream": true` (and
/// `stream_options.include_usage` for chat), and `callback` receives each SSE `data` payload as
/// it arrives. Returns when the stream ends, is stopped by the callback, or fails; the call is
/// settled in every case (from the counted output, marked estimated, when usage is missing).
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
    callback: aex_chunk_callback,
    userdata: *mut std::ffi::c_void,
    settlement_out: *mut aex_settlement,
    err: *mut *mut aex_error,
) -> aex_status {
    guard(err, || {
        let token = arg_str(token, "token")?;
        let call = provider_call(endpoint, request_json, passthrough_key)?;
        let callback = callback.ok_or_else(|| Error::invalid("callback", "must not be NULL"))?;
        let userdata = Userdata(userdata);
        let mut on_chunk = move |data: &str| {
            let u = &userdata;
            // SAFETY: the caller promises a valid callback; `data` lives for the call.
            unsafe { callback(u.0, data.as_ptr().cast(), data.len()) }
        };
        let reply = with_kernel(k, |k| Ok(k.stream_provider_blocking(token, call, &mut on_chunk)))?;
        settled(reply, settlement_out)?;
        Ok(())
    })
}
