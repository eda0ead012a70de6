//! `aex_options`: how to open a kernel.

use std::ffi::c_char;

use aex_core::{Config, Durability, Error};

use crate::error::{aex_error, aex_status, arg_str, guard};

/// Settings for `aex_kernel_open`. Create with `aex_options_new`, free with `aex_options_free`.
/// Not thread-safe: configure it on one thread, then it may be used to open any number of
/// kernels.
pub struct aex_options {
    pub(crate) options: aex_core::KernelOptions,
    pub(crate) manual_clock: Option<aex_core::ManualClock>,
}

/// New default options: durability "full", no ledger key, a 15-minute reservation TTL, no
/// models, the system clock, and the dispatch defaults of `aex_options_set_dispatch`. Never
/// NULL.
#[unsafe(no_mangle)]
pub extern "C" fn aex_options_new() -> *mut aex_options {
    Box::into_raw(Box::new(aex_options { options: aex_core::KernelOptions::default(), manual_clock: None }))
}

/// Frees options. NULL is a no-op.
///
/// # Safety
/// `opts` must be NULL or from `aex_options_new`, not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_options_free(opts: *mut aex_options) {
    if !opts.is_null() {
        // SAFETY: from `Box::into_raw` in `aex_options_new`, per the contract.
        drop(unsafe { Box::from_raw(opts) });
    }
}

fn opts_mut<'a>(opts: *mut aex_options) -> Result<&'a mut aex_options, Error> {
    // SAFETY: NULL or a live `aex_options` used from one thread, per the contract.
    unsafe { opts.as_mut() }.ok_or_else(|| Error::invalid("opts", "must not be NULL"))
}

/// Sets the durability: "full" (admissions fsynced before they return; the default), "normal" or
/// "memory". What each survives: the README, "Durability".
///
/// # Safety
/// `opts` must be a live `aex_options`; `durability` a NUL-terminated string; `err` NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_options_set_durability(opts: *mut aex_options, durability: *const c_char, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let d = Durability::parse(arg_str(durability, "durability")?)?;
        opts_mut(opts)?.options.store.durability = d;
        Ok(())
    })
}

/// Sets a secret key that makes the ledger chain HMAC-SHA-256. The bytes are copied.
///
/// # Safety
/// `opts` must be a live `aex_options`; `key` must point to `len` readable bytes; `err` NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_options_set_ledger_key(opts: *mut aex_options, key: *const u8, len: usize, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        if key.is_null() || len == 0 {
            return Err(Error::invalid("key", "must be at least one byte"));
        }
        // SAFETY: `key` points to `len` readable bytes, per the contract.
        let bytes = unsafe { std::slice::from_raw_parts(key, len) }.to_vec();
        opts_mut(opts)?.options.ledger_key = Some(bytes);
        Ok(())
    })
}

/// Reads the models config from a `models.yaml` file now. On failure the options are unchanged
/// and the message names the field and line.
///
/// # Safety
/// As `aex_options_set_durability`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_options_set_config_path(opts: *mut aex_options, path: *const c_char, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let config = Config::load(arg_str(path, "path")?)?;
        opts_mut(opts)?.options.config = config;
        Ok(())
    })
}

/// Sets the models config from `models.yaml` text.
///
/// # Safety
/// As `aex_options_set_durability`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_options_set_config_yaml(opts: *mut aex_options, yaml: *const c_char, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let config = Config::from_yaml(arg_str(yaml, "yaml")?)?;
        opts_mut(opts)?.options.config = config;
        Ok(())
    })
}

/// Sets how long an unsettled reservation lives, in ms (> 0).
///
/// # Safety
/// `opts` must be a live `aex_options`; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_options_set_reservation_ttl_ms(opts: *mut aex_options, ttl_ms: i64, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        if ttl_ms <= 0 {
            return Err(Error::invalid("ttl_ms", "must be positive"));
        }
        opts_mut(opts)?.options.reservation_ttl_ms = ttl_ms;
        Ok(())
    })
}

/// For tests: replaces the system clock with a manual one standing at `start_ms`, moved only by
/// `aex_kernel_advance_clock`.
///
/// # Safety
/// `opts` must be a live `aex_options`; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_options_set_manual_clock(opts: *mut aex_options, start_ms: i64, err: *mut *mut aex_error) -> aex_status {
    guard(err, || {
        let o = opts_mut(opts)?;
        let clock = aex_core::ManualClock::new(start_ms);
        o.options.clock = std::sync::Arc::new(clock.clone());
        o.manual_clock = Some(clock);
        Ok(())
    })
}

/// Sets the timeouts and retries of governed provider calls (`aex_kernel_call` /
/// `aex_kernel_stream`). Timeouts are in ms, each > 0.
///
/// * `connect_timeout_ms` (default 10000): how long to wait for the connection to the provider,
///   and at most half of `request_timeout_ms`.
///   A connection that cannot be made (refused, unreachable, or not made within this time)
///   sent nothing: its reservation is released (nothing is charged) and the attempt may be
///   retried.
/// * `request_timeout_ms` (default 600000): counted from the start of the attempt, how long
///   until the provider's answer starts (its status line and headers: the time to first byte);
///   then, for a plain call, how long its body may take to arrive; and for a stream, the longest
///   idle gap between two chunks (time spent in the callback does not count); a healthy stream
///   of any length is never cut. When it runs out, the request may have reached the provider:
///   the call is charged (from the counted output, or at the full reservation when nothing was
///   seen), returns `AEX_UNAVAILABLE`, and is not retried. (A connection still pending fails
///   first, at the connect timeout — never more than half of this one — and is released.)
/// * `max_retries` (0 to 10, default 2): retries of a failure that cost nothing (a connection
///   that could not be made, a provider 5xx) on the same model, with jittered backoff, before
///   the model's `fallbacks` are tried.
///
/// # Safety
/// `opts` must be a live `aex_options`; `err` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aex_options_set_dispatch(
    opts: *mut aex_options,
    connect_timeout_ms: i64,
    request_timeout_ms: i64,
    max_retries: u32,
    err: *mut *mut aex_error,
) -> aex_status {
    guard(err, || {
        let d = dispatch_options(connect_timeout_ms, request_timeout_ms, max_retries)?;
        opts_mut(opts)?.options.dispatch = d;
        Ok(())
    })
}

/// Validated dispatch options.
pub(crate) fn dispatch_options(connect_timeout_ms: i64, request_timeout_ms: i64, max_retries: u32) -> Result<aex_core::dispatch::DispatchOptions, Error> {
    let ms = |field: &str, v: i64| {
        u64::try_from(v).ok().filter(|v| *v > 0).map(std::time::Duration::from_millis).ok_or_else(|| Error::invalid(field, "must be a positive number of milliseconds"))
    };
    if max_retries > 10 {
        return Err(Error::invalid("max_retries", "must be at most 10"));
    }
    Ok(aex_core::dispatch::DispatchOptions {
        connect_timeout: ms("connect_timeout_ms", connect_timeout_ms)?,
        request_timeout: ms("request_timeout_ms", request_timeout_ms)?,
        max_retries,
        ..Default::default()
    })
}
