//! The C ABI's string and JSON inputs: whatever bytes arrive, every call returns a status with an
//! error exactly when it is not `AEX_OK`, never panics or crashes, and the kernel's books stay
//! consistent (`aex_kernel_audit` clean, the agent never over its budget).
#![no_main]

use std::ffi::{CStr, CString, c_char};
use std::ptr::null_mut;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use aex::*;
use libfuzzer_sys::fuzz_target;

struct Fixture {
    kernel: *mut aex_kernel,
    token: CString,
}

// SAFETY: the kernel handle is thread-safe by contract; the fuzzer calls from one thread anyway.
unsafe impl Send for Fixture {}
unsafe impl Sync for Fixture {}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// Checks the status/error pairing and frees the error.
fn checked(status: aex_status, err: *mut aex_error) -> aex_status {
    assert_eq!(status == AEX_OK, err.is_null(), "status {status} and error disagree");
    if !err.is_null() {
        // SAFETY: a live error from the call above.
        unsafe {
            assert_eq!(aex_error_status(err), status);
            assert!(!CStr::from_ptr(aex_error_message(err)).to_bytes().is_empty());
            aex_error_free(err);
        }
    }
    status
}

fn take_string(s: *mut c_char) -> String {
    assert!(!s.is_null());
    // SAFETY: a string aex returned; freed once, here.
    unsafe {
        let out = CStr::from_ptr(s).to_str().expect("aex returns UTF-8").to_string();
        aex_string_free(s);
        out
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| unsafe {
        let opts = aex_options_new();
        let mut err = null_mut();
        let yaml = c("providers:\n  openai: {base_url: \"http://127.0.0.1:9/v1\"}\nmodels:\n  gpt-4o-mini: {provider: openai, input_price: 0.15, output_price: 0.60, max_output_tokens: 4096}\n");
        assert_eq!(checked(aex_options_set_config_yaml(opts, yaml.as_ptr(), &mut err), err), AEX_OK);
        let mut kernel = null_mut();
        let mut err = null_mut();
        assert_eq!(checked(aex_kernel_open(c(":memory:").as_ptr(), opts, &mut kernel, &mut err), err), AEX_OK);
        aex_options_free(opts);
        let mut token = null_mut();
        let mut err = null_mut();
        let spec = c(r#"{"name": "fuzz", "budget_usd": "1.00"}"#);
        assert_eq!(checked(aex_kernel_create_agent(kernel, spec.as_ptr(), &mut token, &mut err), err), AEX_OK);
        Fixture { kernel, token: c(&take_string(token)) }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&op, rest)) = data.split_first() else { return };
    // C strings end at the first NUL, as a C caller's would.
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    let s = CString::new(&rest[..end]).unwrap();
    let f = fixture();
    let k = f.kernel;
    let mut err = null_mut();
    // SAFETY: every pointer passed is live or NULL as each function's contract allows.
    unsafe {
        match op % 9 {
            0 => {
                let mut token = null_mut();
                if checked(aex_kernel_create_agent(k, s.as_ptr(), &mut token, &mut err), err) == AEX_OK {
                    assert!(take_string(token).starts_with("aex_"));
                }
            }
            1 | 2 => {
                let mut a = null_mut();
                let token = if op % 9 == 1 { f.token.as_ptr() } else { s.as_ptr() };
                let request = if op % 9 == 1 { s.clone() } else { c(r#"{"model": "gpt-4o-mini", "input_tokens": 10}"#) };
                if checked(aex_kernel_admit(k, token, request.as_ptr(), &mut a, &mut err), err) == AEX_OK {
                    let id = CStr::from_ptr(aex_admission_execution_id(a)).to_owned();
                    let mut out = std::mem::zeroed();
                    let mut err = null_mut();
                    assert_eq!(checked(aex_kernel_release(k, id.as_ptr(), c("fuzz").as_ptr(), &mut out, &mut err), err), AEX_OK);
                    aex_admission_free(a);
                }
            }
            3 => {
                let mut out = std::mem::zeroed();
                checked(aex_kernel_release(k, s.as_ptr(), s.as_ptr(), &mut out, &mut err), err);
            }
            4 => {
                let mut out = std::mem::zeroed();
                checked(aex_kernel_fail(k, s.as_ptr(), s.as_ptr(), &mut out, &mut err), err);
            }
            5 => {
                let mut json = null_mut();
                if checked(aex_kernel_agent(k, s.as_ptr(), &mut json, &mut err), err) == AEX_OK {
                    take_string(json);
                }
            }
            6 => {
                if s.as_bytes() != b"fuzz" {
                    checked(aex_kernel_set_budget(k, s.as_ptr(), 1_000, &mut err), err);
                }
            }
            7 => {
                checked(aex_kernel_create_team(k, s.as_ptr(), 1_000_000, s.as_ptr(), &mut err), err);
            }
            _ => {
                let mut json = null_mut();
                if checked(aex_kernel_audit(k, s.as_ptr(), &mut json, &mut err), err) == AEX_OK {
                    take_string(json);
                }
            }
        }
        // The books stay right: nothing left reserved after every call, and the whole ledger
        // audits clean every 64th (a full audit each time would slow the run as it grows).
        static RUNS: AtomicU64 = AtomicU64::new(0);
        if RUNS.fetch_add(1, Ordering::Relaxed).is_multiple_of(64) {
            let mut json = null_mut();
            let mut err = null_mut();
            assert_eq!(checked(aex_kernel_audit(k, std::ptr::null(), &mut json, &mut err), err), AEX_OK);
            let report = take_string(json);
            assert!(report.contains(r#""clean":true"#), "audit failed: {report}");
        }
        let mut json = null_mut();
        let mut err = null_mut();
        assert_eq!(checked(aex_kernel_agent(k, c("fuzz").as_ptr(), &mut json, &mut err), err), AEX_OK);
        let agent = take_string(json);
        assert!(agent.contains(r#""reserved_micro":0"#), "a reservation was left behind: {agent}");
    }
});
