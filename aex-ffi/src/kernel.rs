//! `aex_kernel` and the guarded-call surface (admit, settle, agents, teams, ledger).
//!
//! Shutdown and re-entrancy. A call never holds a lock while it runs: it takes a clone of the
//! kernel (an `Arc`) from the handle under a short lock, and a governed call also registers its
//! `Cancel`. So `aex_kernel_close` can take the kernel out, cancel what is registered and return
//! at once, from any thread or from inside a stream callback, and a call made after it began
//! fails at once; the store closes when the last clone goes. Where that last clone goes matters
//! twice (see [`retire`]): never inside a stream callback (a tokio runtime must not be shut down
//! from one), and never in a forked child (the runtime's threads are not there to join).

use std::collections::HashMap;
use std::ffi::{CString, c_char};
use std::sync::Arc;

use aex_core::dispatch::Cancel;
use aex_core::{Error, ExecutionState, Head, Kernel, ManualClock, Settlement, TeamSpec, Usage, wire};
use parking_lot::Mutex;

use crate::error::{aex_error, aex_status, arg_str, give_string, guard, opt_str, out_ptr, quietly};
use crate::options::aex_options;

/// A governance kernel over one database. Thread-safe: any number of threads may call any
/// function on one handle at once. `aex_kernel_close` ends its use at once (calls in progress
/// are cancelled, later calls return `AEX_UNAVAILABLE`); `aex_kernel_free` closes it and
/// releases the handle, after which the pointer must not be used (that cannot be detected).
/// It belongs to the process that opened it: in a `fork()`ed child every call returns
/// `AEX_UNAVAILABLE`, and `aex_kernel_close` / `aex_kernel_free` return without touching what
/// the parent's threads own.
pub struct aex_kernel {
    shared: Arc<Handle>,
}

/// What an `aex_kernel` points to. Shared (`Arc`) with the governed calls in progress, so a call
/// holds the kernel — never a lock — for as long as it runs, and closing or freeing the handle
/// (even from inside a stream callback) never waits for one.
struct Handle {
    state: Mutex<State>,
    clock: Option<ManualClock>,
    /// The process that opened the kernel.
    pid: u32,
}

/// Locked only to look the kernel up or to (de)register a call, never across a call.
struct State {
    /// `None` once closed.
    kernel: Option<Kernel>,
    /// The governed calls in progress, by slot: `aex_kernel_close` cancels them.
    calls: HashMap<u64, Cancel>,
    next_slot: u64,
}

fn closed() -> Error {
    Error::Unavailable("the kernel is closed".into())
}

impl Handle {
    fn forked(&self) -> bool {
        std::process::id() != self.pid
    }

    fn kernel(&self) -> Result<Kernel, Error> {
        self.state.lock().kernel.clone().ok_or_else(closed)
    }

    /// The kernel, with `cancel` registered so that closing cancels the call; the slot frees it.
    fn register(&self, cancel: Cancel) -> Result<(Kernel, u64), Error> {
        let mut state = self.state.lock();
        let kernel = state.kernel.clone().ok_or_else(closed)?;
        let slot = state.next_slot;
        state.next_slot += 1;
        state.calls.insert(slot, cancel);
        Ok((kernel, slot))
    }

    fn deregister(&self, slot: u64) {
        self.state.lock().calls.remove(&slot);
    }

    /// Refuses later calls, cancels the calls in progress (each settles by the money rules on
    /// its own thread), and lets go of the kernel; never waits for a call. In a forked child it
    /// does nothing: the parent's threads may have held the lock at the fork, and the child's
    /// calls fail anyway.
    fn close(&self) {
        if self.forked() {
            return;
        }
        let (kernel, calls) = {
            let mut state = self.state.lock();
            (state.kernel.take(), std::mem::take(&mut state.calls))
        };
        for cancel in calls.values() {
            cancel.cancel();
        }
        if let Some(kernel) = kernel {
            retire(kernel, self.pid);
        }
    }
}

/// Lets go of a clone of a kernel. The last one closes the store and shuts the dispatch runtime
/// down, which must not happen in two places: in a forked child (the runtime's threads are not
/// there, and joining them never returns), where it is leaked, and inside a stream callback
/// (which runs on a dispatch runtime, where shutting one down is forbidden), where another
/// thread does it.
fn retire(kernel: Kernel, opened_by: u32) {
    if std::process::id() != opened_by {
        std::mem::forget(kernel);
    } else if crate::dispatch::in_callback() {
        std::thread::scope(|s| {
            if let Err(e) = std::thread::Builder::new().name("aex-retire".into()).spawn_scoped(s, move || drop(kernel)) {
                // No thread to be had: leak the kernel rather than shut a runtime down here.
                drop(e);
            }
        });
    } else {
        drop(kernel);
    }
}

fn handle<'a>(k: *const aex_kernel) -> Result<&'a aex_kernel, Error> {
    // SAFETY: NULL or a live `aex_kernel` (use after `aex_kernel_free` is undefined, as
    // documented); the reference is used only during the exported call that received `k`.
    unsafe { k.as_ref() }.ok_or_else(|| Error::invalid("kernel", "must not be NULL"))
}

/// Runs `f` on the open kernel: a clone of it, so no lock is held while `f` runs.
pub(crate) fn with_kernel<T>(k: *const aex_kernel, f: impl FnOnce(&Kernel) -> Result<T, Error>) -> Result<T, Error> {
    let shared = &handle(k)?.shared;
    let kernel = Held { kernel: Some(shared.kernel()?), pid: shared.pid };
    f(kernel.get())
}

/// A clone of the kernel, retired (see [`retire`]) when dropped, on every path.
struct Held {
    kernel: Option<Kernel>,
    pid: u32,
}

impl Held {
    fn get(&self) -> &Kernel {
        self.kernel.as_ref().expect("held until dropped")
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(kernel) = self.kernel.take() {
            retire(kernel, self.pid);
        }
    }
}

/// A governed call's registration: its cancel is removed from the handle when it ends.
struct InFlight {
    shared: Arc<Handle>,
    slot: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.deregister(self.slot);
    }
}

/// Runs a governed call `f` on the open kernel with `cancel` registered, so that closing the
/// kernel cancels it. The handle is held (an `Arc`) for the call's duration, so freeing the
/// handle from inside the call's own callback is safe.
pub(crate) fn with_governed_call<T>(k: *const aex_kernel, cancel: &Cancel, f: impl FnOnce(&Kernel) -> T) -> Result<T, Error> {
    let shared = Arc::clone(&handle(k)?.shared);
    let (kernel, slot) = shared.register(cancel.clone())?;
    let kernel = Held { kernel: Some(kernel), pid: shared.pid };
    let _in_flight = InFlight { shared, slot };
    Ok(f(kernel.get()))
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

/// Where an execution stands: one of the `AEX_EXECUTION_STATE_*` values. A fixed-width integer
/// rather than an enum, so that structs holding it have one layout under every compiler flag
/// (`-fshort-enums` changes an enum's size).
pub type aex_execution_state = i32;

/// Admitted; budget reserved; not sent.
pub const AEX_EXECUTION_STATE_RESERVED: aex_execution_state = 0;
/// Handed to the provider.
pub const AEX_EXECUTION_STATE_DISPATCHED: aex_execution_state = 1;
/// Settled at its real cost.
pub const AEX_EXECUTION_STATE_COMMITTED: aex_execution_state = 2;
/// Given back without a call.
pub const AEX_EXECUTION_STATE_RELEASED: aex_execution_state = 3;
/// The call failed; given back.
pub const AEX_EXECUTION_STATE_FAILED: aex_execution_state = 4;

fn state_of(s: ExecutionState) -> aex_execution_state {
    match s {
        ExecutionState::Reserved => AEX_EXECUTION_STATE_RESERVED,
        ExecutionState::Dispatched => AEX_EXECUTION_STATE_DISPATCHED,
        ExecutionState::Committed => AEX_EXECUTION_STATE_COMMITTED,
        ExecutionState::Released => AEX_EXECUTION_STATE_RELEASED,
        ExecutionState::Failed => AEX_EXECUTION_STATE_FAILED,
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

/// The outcome of commit, release or fail, or of a governed call. A plain value written into
/// caller storage.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct aex_settlement {
    /// The terminal state: an `AEX_EXECUTION_STATE_*` value.
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
            state: state_of(s.state),
            reserved_micro: s.reserved_micro,
            cost_micro: s.cost_micro,
            released_micro: s.released_micro,
            overrun_micro: s.overrun_micro,
            expired: s.expired,
            replayed: s.replayed,
        }
    }
}

/// Writes a value to a checked out-param.
pub(crate) fn put<T>(out: *mut T, value: T) {
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
        let state = State { kernel: Some(kernel), calls: HashMap::new(), next_slot: 0 };
        let shared = Arc::new(Handle { state: Mutex::new(state), clock, pid: std::process::id() });
        put(out, Box::into_raw(Box::new(aex_kernel { shared })));
        Ok(())
    })
}

/// Closes the kernel, at once: calls made after it began return `AEX_UNAVAILABLE`, and governed
/// calls in progress (`aex_kernel_call`, `aex_kernel_stream`, on any thread) are cancelled:
/// each settles by the money rules (released if its request was not sent yet, otherwise
/// charged), a stream delivers no further payload, and each returns `AEX_UNAVAILABLE` (unless
/// it had already completed). It never waits for a call in progress, nor for a
/// stalled provider; the database is closed when the last call in progress has returned. May be
/// called from any thread, from inside a stream callback, and more than once. The handle stays
/// valid until `aex_kernel_free`. NULL is a no-op.
///
/// # Safety
/// `k` must be NULL or a live `aex_kernel`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_close(k: *mut aex_kernel) {
    quietly(|| {
        if let Ok(h) = handle(k) {
            h.shared.close();
        }
    });
}

/// Closes the kernel (as `aex_kernel_close`) and frees the handle. NULL is a no-op. No other
/// thread may use the handle during or after this call; a stream callback may free the kernel
/// it is called for (its stream is cancelled as by `aex_kernel_close` and returns once settled;
/// the pointer must not be used again). In a `fork()`ed child it only forgets the parent's
/// kernel (nothing the parent owns is closed, joined or written).
///
/// # Safety
/// `k` must be NULL or from `aex_kernel_open`, not yet freed, and unused by other threads.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_free(k: *mut aex_kernel) {
    if k.is_null() {
        return;
    }
    // SAFETY: from `Box::into_raw` in `aex_kernel_open`, per the contract.
    let boxed = unsafe { Box::from_raw(k) };
    quietly(move || {
        if boxed.shared.forked() {
            // The parent's threads (the dispatch runtime's) do not exist here, and its locks
            // may have been held at the fork: touch nothing.
            std::mem::forget(boxed);
            return;
        }
        boxed.shared.close();
        // A call still in progress (the stream whose callback is freeing its own kernel) holds
        // the handle until it returns.
        drop(boxed);
    });
}

/// For tests: moves a manual clock (see `aex_options_set_manual_clock`) by `ms`.
///
/// # Safety
/// `k` must be NULL or live; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_kernel_advance_clock(k: *const aex_kernel, ms: i64, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let clock = handle(k)?.shared.clock.as_ref().ok_or_else(|| Error::invalid("kernel", "was not opened with a manual clock"))?;
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
            state: state_of(a.state),
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
    admission(a).map_or(AEX_EXECUTION_STATE_RESERVED, |a| a.state)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_cancels_the_calls_in_progress_at_once_and_refuses_new_ones() {
        let mut k: *mut aex_kernel = std::ptr::null_mut();
        // SAFETY: valid arguments; the kernel is freed below and not used after.
        unsafe {
            assert_eq!(aex_kernel_open(c":memory:".as_ptr(), std::ptr::null(), &mut k, std::ptr::null_mut()), crate::AEX_OK);
            let shared = Arc::clone(&handle(k).unwrap().shared);
            let in_flight = Cancel::new();
            let (kernel, slot) = shared.register(in_flight.clone()).unwrap();
            aex_kernel_close(k);
            assert!(in_flight.is_cancelled());
            assert!(matches!(shared.register(Cancel::new()), Err(Error::Unavailable(_))));
            // The call in progress still holds the kernel, and can settle with it.
            assert!(kernel.list_agents().is_ok());
            shared.deregister(slot);
            drop(kernel);
            aex_kernel_free(k);
        }
    }
}
