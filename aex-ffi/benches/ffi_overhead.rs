//! What the C ABI adds to a guarded call: the same admit + commit through `aex_core::Kernel` and
//! through the exported `aex_*` functions, on one in-memory kernel, in interleaved rounds so both
//! see the same machine. Run: `cargo bench -p aex-ffi --bench ffi_overhead`.

use std::ffi::{CStr, CString, c_char};
use std::time::Instant;

use aex::*;
use aex_core::{AdmitRequest, Usage};

const ROUNDS: usize = 60;
const CALLS: usize = 300;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let yaml = CString::new("models:\n  mini: {input_price: 0.15, output_price: 0.60}\n").unwrap();
    let mut kernel: *mut aex_kernel = std::ptr::null_mut();
    let mut token: *mut c_char = std::ptr::null_mut();
    // SAFETY: every pointer passed is live and every out-param writable, as the ABI requires.
    unsafe {
        let opts = aex_options_new();
        assert_eq!(aex_options_set_config_yaml(opts, yaml.as_ptr(), std::ptr::null_mut()), AEX_OK);
        assert_eq!(aex_kernel_open(c":memory:".as_ptr(), opts, &mut kernel, std::ptr::null_mut()), AEX_OK);
        aex_options_free(opts);
        let spec = c"{\"name\": \"bench\", \"budget_micro\": 1000000000000000}";
        assert_eq!(aex_kernel_create_agent(kernel, spec.as_ptr(), &mut token, std::ptr::null_mut()), AEX_OK);
    }
    // The Rust side uses a second kernel with the same store shape, so neither pays for the
    // other's growing tables more than its own.
    let config = aex_core::Config::from_yaml(yaml.to_str().unwrap()).unwrap();
    let rust = aex_core::Kernel::open_in_memory(aex_core::KernelOptions { config, ..Default::default() }).unwrap();
    let rust_token = rust.create_agent(&aex_core::AgentSpec::new("bench", aex_core::money::MAX_MICRO)).unwrap().token;
    let request = c"{\"model\": \"mini\", \"input_tokens\": 1200, \"max_output_tokens\": 256}";
    let rust_request = AdmitRequest::new("mini").input_tokens(1_200).max_output_tokens(256);
    let usage = aex_usage { input_tokens: 1_200, output_tokens: 180, cached_input_tokens: 0 };

    let (mut rust_us, mut ffi_us) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..CALLS {
            let a = rust.admit(rust_token.expose(), &rust_request).unwrap();
            rust.commit(&a.execution_id, Usage::new(1_200, 180)).unwrap();
        }
        rust_us.push(start.elapsed().as_secs_f64() * 1e6 / CALLS as f64);

        let start = Instant::now();
        for _ in 0..CALLS {
            // SAFETY: as above.
            unsafe {
                let mut adm: *mut aex_admission = std::ptr::null_mut();
                assert_eq!(aex_kernel_admit(kernel, token, request.as_ptr(), &mut adm, std::ptr::null_mut()), AEX_OK);
                let mut done = std::mem::zeroed::<aex_settlement>();
                let id = aex_admission_execution_id(adm);
                assert_eq!(aex_kernel_commit(kernel, id, &usage, &mut done, std::ptr::null_mut()), AEX_OK);
                aex_admission_free(adm);
            }
        }
        ffi_us.push(start.elapsed().as_secs_f64() * 1e6 / CALLS as f64);
    }
    let (r, f) = (median(&mut rust_us), median(&mut ffi_us));
    println!("admit + commit, in-memory store, median of {ROUNDS} rounds x {CALLS} calls");
    println!("  Rust API   {r:8.2} us per call");
    println!("  C ABI      {f:8.2} us per call");
    println!("  C ABI adds {:8.2} us per call (difference of medians; noisy on a shared machine)", f - r);
    // The conversion work alone, without the store: parse the request JSON, as aex_kernel_admit does.
    let text = request.to_str().unwrap();
    let n = 100_000;
    let start = Instant::now();
    for _ in 0..n {
        std::hint::black_box(aex_core::wire::admit_request(std::hint::black_box(text)).unwrap());
    }
    println!("  of which request JSON parsing {:8.2} us per call", start.elapsed().as_secs_f64() * 1e6 / f64::from(n));
    // SAFETY: allocated above, freed once.
    unsafe {
        let _ = CStr::from_ptr(token);
        aex_string_free(token);
        aex_kernel_free(kernel);
    }
}
