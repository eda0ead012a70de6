//! Statuses, `aex_error`, and the guard every exported function runs its body in.

use std::cell::Cell;
use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

use aex_core::Error;

/// A status: `AEX_OK` or one of the error table's numbers.
pub type aex_status = i32;

/// Success.
pub const AEX_OK: aex_status = 0;
/// Malformed input; the message names the field and the rule.
pub const AEX_INVALID_REQUEST: aex_status = 400;
/// Unknown, expired, revoked or disabled token.
pub const AEX_UNAUTHENTICATED: aex_status = 401;
/// The reservation does not fit; see `aex_error_needed_micro` / `aex_error_remaining_micro`.
pub const AEX_INSUFFICIENT_BUDGET: aex_status = 402;
/// A policy rule denied the request; `aex_error_reason` says which.
pub const AEX_POLICY_DENIED: aex_status = 403;
/// No such agent, team or execution.
pub const AEX_NOT_FOUND: aex_status = 404;
/// Idempotency conflict, invalid state transition, or name taken.
pub const AEX_CONFLICT: aex_status = 409;
/// A rate window is full; see `aex_error_retry_after_ms`.
pub const AEX_RATE_LIMITED: aex_status = 429;
/// A bug in aex (including a caught panic).
pub const AEX_INTERNAL: aex_status = 500;
/// The store is busy beyond its timeout, an I/O operation failed, or the kernel is closed.
pub const AEX_UNAVAILABLE: aex_status = 503;

/// The longest string argument accepted: 80 MiB.
const MAX_ARG_BYTES: usize = 80 << 20;

/// Details of a failure. Owned by the caller once returned; free it with `aex_error_free`. The
/// strings its accessors return live as long as it does. Not shared between threads by aex.
pub struct aex_error {
    status: aex_status,
    reason: CString,
    message: CString,
    field: Option<CString>,
    team: Option<CString>,
    needed_micro: i64,
    remaining_micro: i64,
    retry_after_ms: i64,
    limit: i64,
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "\\0")).unwrap_or_default()
}

impl aex_error {
    fn from_error(e: &Error) -> aex_error {
        let mut out = aex_error {
            status: aex_status::from(e.status()),
            reason: cstring(e.reason()),
            message: cstring(&e.to_string()),
            field: None,
            team: None,
            needed_micro: 0,
            remaining_micro: 0,
            retry_after_ms: -1,
            limit: -1,
        };
        // Exhaustive on purpose: a new variant must be mapped here before this builds.
        match e {
            Error::InvalidRequest { field, .. } | Error::Tampered { field, .. } => out.field = Some(cstring(field)),
            Error::InsufficientBudget { needed_micro, remaining_micro, team, .. } => {
                out.needed_micro = *needed_micro;
                out.remaining_micro = *remaining_micro;
                out.team = team.as_deref().map(cstring);
            }
            Error::RateLimited { retry_after_ms, limit, .. } => {
                out.retry_after_ms = i64::try_from(*retry_after_ms).unwrap_or(i64::MAX);
                out.limit = i64::try_from(*limit).unwrap_or(i64::MAX);
            }
            Error::Unauthenticated { .. }
            | Error::PolicyDenied { .. }
            | Error::NotFound { .. }
            | Error::Conflict { .. }
            | Error::Internal(_)
            | Error::Unavailable(_) => {}
        }
        out
    }
}

/// Writes `e` to `*err` if `err` is not NULL and returns its status.
pub(crate) fn fail(err: *mut *mut aex_error, e: &Error) -> aex_status {
    if !err.is_null() {
        // SAFETY: a non-NULL `err` points to writable storage for one pointer, per the contract.
        unsafe { *err = Box::into_raw(Box::new(aex_error::from_error(e))) };
    }
    aex_status::from(e.status())
}

thread_local! {
    /// How many exported calls this thread is inside.
    static INSIDE: Cell<u32> = const { Cell::new(0) };
}

/// Installs, once, a panic hook that stays silent for panics aex catches: a library must not
/// write to its host's stderr. Panics in an exported call (returned as `AEX_INTERNAL`) and on
/// aex's own threads (named `aex-...`) are not printed; every other panic goes to the hook that
/// was installed before.
fn quiet_panics() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let ours = INSIDE.with(Cell::get) > 0 || std::thread::current().name().is_some_and(|n| n.starts_with("aex-"));
            if !ours {
                previous(info);
            }
        }));
    });
}

/// Runs `body` marked as inside aex (see [`quiet_panics`]).
fn inside<T>(body: impl FnOnce() -> T) -> std::thread::Result<T> {
    quiet_panics();
    INSIDE.with(|d| d.set(d.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(body));
    INSIDE.with(|d| d.set(d.get().saturating_sub(1)));
    result
}

/// Runs an exported function's body: maps its error to a status and `*err`, and a panic to
/// `AEX_INTERNAL`.
pub(crate) fn guard(err: *mut *mut aex_error, body: impl FnOnce() -> Result<(), Error>) -> aex_status {
    match inside(body) {
        Ok(Ok(())) => AEX_OK,
        Ok(Err(e)) => fail(err, &e),
        Err(panic) => {
            let what = panic.downcast_ref::<&str>().map(|s| (*s).to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
            fail(err, &Error::Internal(format!("panic in aex: {}", what.unwrap_or_default())))
        }
    }
}

/// Runs the body of an exported function that returns nothing (`_close`, `_free`): a panic is
/// caught and dropped, never unwound into the host.
pub(crate) fn quietly(body: impl FnOnce()) {
    let _ = inside(body);
}

/// A string argument: not NULL, valid UTF-8, at most 80 MiB.
pub(crate) fn arg_str<'a>(p: *const c_char, name: &str) -> Result<&'a str, Error> {
    if p.is_null() {
        return Err(Error::invalid(name, "must not be NULL"));
    }
    // SAFETY: non-NULL, and the caller promises a NUL-terminated string that outlives the call.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    if bytes.len() > MAX_ARG_BYTES {
        return Err(Error::invalid(name, "must be at most 80 MiB"));
    }
    std::str::from_utf8(bytes).map_err(|_| Error::invalid(name, "must be valid UTF-8"))
}

/// An optional string argument: NULL is `None`.
pub(crate) fn opt_str<'a>(p: *const c_char, name: &str) -> Result<Option<&'a str>, Error> {
    if p.is_null() { Ok(None) } else { arg_str(p, name).map(Some) }
}

/// Checks that an out-param is not NULL, before any work is done.
pub(crate) fn out_ptr<T>(p: *mut T, name: &str) -> Result<(), Error> {
    if p.is_null() { Err(Error::invalid(name, "must not be NULL")) } else { Ok(()) }
}

/// Hands a string to the caller.
pub(crate) fn give_string(s: &str) -> *mut c_char {
    cstring(s).into_raw()
}

/// The error's status.
///
/// # Safety
/// `err` must be NULL or a live `aex_error`. NULL gives `AEX_OK`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_error_status(err: *const aex_error) -> aex_status {
    // SAFETY: NULL or live, per the contract.
    unsafe { err.as_ref() }.map_or(AEX_OK, |e| e.status)
}

/// The stable, machine-readable reason code, e.g. "budget_exceeded". Lives as long as `err`.
///
/// # Safety
/// `err` must be NULL or a live `aex_error`. NULL gives "".
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_error_reason(err: *const aex_error) -> *const c_char {
    // SAFETY: NULL or live, per the contract.
    unsafe { err.as_ref() }.map_or(c"".as_ptr(), |e| e.reason.as_ptr())
}

/// The human-readable message, naming the field and rule for `AEX_INVALID_REQUEST`. Never
/// contains a token or key. Lives as long as `err`.
///
/// # Safety
/// `err` must be NULL or a live `aex_error`. NULL gives "".
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_error_message(err: *const aex_error) -> *const c_char {
    // SAFETY: NULL or live, per the contract.
    unsafe { err.as_ref() }.map_or(c"".as_ptr(), |e| e.message.as_ptr())
}

/// For `AEX_INVALID_REQUEST`, the field at fault; for `AEX_UNAVAILABLE` with reason `tampered`,
/// the column or setting found tampered; otherwise NULL. Lives as long as `err`.
///
/// # Safety
/// `err` must be NULL or a live `aex_error`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_error_field(err: *const aex_error) -> *const c_char {
    // SAFETY: NULL or live, per the contract.
    unsafe { err.as_ref() }.and_then(|e| e.field.as_ref()).map_or(std::ptr::null(), |f| f.as_ptr())
}

/// For `AEX_INSUFFICIENT_BUDGET` on a team's budget, the team; otherwise NULL.
///
/// # Safety
/// `err` must be NULL or a live `aex_error`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_error_team(err: *const aex_error) -> *const c_char {
    // SAFETY: NULL or live, per the contract.
    unsafe { err.as_ref() }.and_then(|e| e.team.as_ref()).map_or(std::ptr::null(), |f| f.as_ptr())
}

/// For `AEX_INSUFFICIENT_BUDGET`, the reservation asked for, micro-USD; otherwise 0.
///
/// # Safety
/// `err` must be NULL or a live `aex_error`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_error_needed_micro(err: *const aex_error) -> i64 {
    // SAFETY: NULL or live, per the contract.
    unsafe { err.as_ref() }.map_or(0, |e| e.needed_micro)
}

/// For `AEX_INSUFFICIENT_BUDGET`, what remained, micro-USD (negative after an overrun);
/// otherwise 0.
///
/// # Safety
/// `err` must be NULL or a live `aex_error`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_error_remaining_micro(err: *const aex_error) -> i64 {
    // SAFETY: NULL or live, per the contract.
    unsafe { err.as_ref() }.map_or(0, |e| e.remaining_micro)
}

/// For `AEX_RATE_LIMITED`, when to retry, in ms; otherwise -1.
///
/// # Safety
/// `err` must be NULL or a live `aex_error`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_error_retry_after_ms(err: *const aex_error) -> i64 {
    // SAFETY: NULL or live, per the contract.
    unsafe { err.as_ref() }.map_or(-1, |e| e.retry_after_ms)
}

/// For `AEX_RATE_LIMITED`, the limit of the full window; otherwise -1.
///
/// # Safety
/// `err` must be NULL or a live `aex_error`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_error_limit(err: *const aex_error) -> i64 {
    // SAFETY: NULL or live, per the contract.
    unsafe { err.as_ref() }.map_or(-1, |e| e.limit)
}

/// Frees an error. NULL is a no-op.
///
/// # Safety
/// `err` must be NULL or an `aex_error` from aex, not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_error_free(err: *mut aex_error) {
    if !err.is_null() {
        // SAFETY: from `Box::into_raw` in `fail`, not yet freed, per the contract.
        drop(unsafe { Box::from_raw(err) });
    }
}

/// The name of a status ("ok", "invalid_request", ..., "unavailable"), or "unknown" for a
/// number this library does not know (for instance one from a newer library). Static.
#[unsafe(no_mangle)]
pub extern "C" fn aex_status_name(status: aex_status) -> *const c_char {
    let name: &'static CStr = match status {
        AEX_OK => c"ok",
        AEX_INVALID_REQUEST => c"invalid_request",
        AEX_UNAUTHENTICATED => c"unauthenticated",
        AEX_INSUFFICIENT_BUDGET => c"insufficient_budget",
        AEX_POLICY_DENIED => c"policy_denied",
        AEX_NOT_FOUND => c"not_found",
        AEX_CONFLICT => c"conflict",
        AEX_RATE_LIMITED => c"rate_limited",
        AEX_INTERNAL => c"internal",
        AEX_UNAVAILABLE => c"unavailable",
        _ => c"unknown",
    };
    name.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_error_and_never_unwinds_out() {
        let mut err: *mut aex_error = std::ptr::null_mut();
        let status = guard(&mut err, || panic!("boom"));
        assert_eq!(status, AEX_INTERNAL);
        // SAFETY: `guard` wrote a live error on failure.
        unsafe {
            assert_eq!(aex_error_status(err), AEX_INTERNAL);
            let message = CStr::from_ptr(aex_error_message(err)).to_str().unwrap();
            assert!(message.contains("panic in aex: boom"), "{message}");
            aex_error_free(err);
        }
    }

    #[test]
    fn every_status_has_a_name() {
        for (status, name) in [(AEX_OK, "ok"), (AEX_RATE_LIMITED, "rate_limited"), (AEX_UNAVAILABLE, "unavailable"), (7, "unknown")] {
            // SAFETY: static strings.
            assert_eq!(unsafe { CStr::from_ptr(aex_status_name(status)) }.to_str().unwrap(), name);
        }
    }
}
