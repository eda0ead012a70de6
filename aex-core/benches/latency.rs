//! Per-call latency percentiles of admit + commit, which criterion's averaged samples hide.
//!
//! Run: `cargo bench -p aex-core --bench latency` (`-- CALLS` to change the count, default 5000).
//! Prints p50 / p90 / p99 / p99.9 of each whole guarded call (admit, then commit) on a fresh file
//! database for each durability, and for an in-memory database as the CPU-only reference.

use std::time::Instant;

use aex_core::admission::estimate_input_tokens;
use aex_core::{
    AdmitRequest, AgentSpec, Config, Durability, Kernel, KernelOptions, Limits, Message, ModelSpec, Prices, StoreOptions,
    Usage, money,
};

fn percentile(sorted: &[u128], p: f64) -> u128 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let calls: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(5_000);
    let config = Config::new()
        .with_model("gpt-4o-mini", ModelSpec::priced(Prices::from_usd("0.15", "0.60").unwrap(), 16_384))
        .unwrap();
    let req = AdmitRequest::new("gpt-4o-mini").input_tokens(1_200).max_output_tokens(256);
    println!("admit + commit, {calls} calls each, microseconds");
    println!("{:<14} {:>6} {:>6} {:>6} {:>7}", "store", "p50", "p90", "p99", "p99.9");
    // "+limits": every window on (agent RPM and TPM, model and global TPM, concurrency caps),
    // set high enough never to deny, so each call pays for all of them.
    let limits = Limits {
        max_tokens_per_minute: Some(u64::MAX / 4),
        model_tokens_per_minute: [("gpt-4o-mini".to_string(), u64::MAX / 4)].into(),
        max_concurrent: Some(1_000),
    };
    let limited = config.clone().with_limits(limits).unwrap();
    for label in ["in-memory", "memory", "normal", "normal+limits", "full"] {
        let dir = tempfile::tempdir().unwrap();
        let durability = match label {
            "in-memory" | "memory" => Durability::Memory,
            "full" => Durability::Full,
            _ => Durability::Normal,
        };
        let with_limits = label.ends_with("+limits");
        let config = if with_limits { limited.clone() } else { config.clone() };
        let options = KernelOptions { config, store: StoreOptions { durability, ..Default::default() }, ..Default::default() };
        let k = if label == "in-memory" { Kernel::open_in_memory(options) } else { Kernel::open(dir.path().join("b.db"), options) }.unwrap();
        let mut spec = AgentSpec::new("bench", money::MAX_MICRO);
        if with_limits {
            (spec.rpm, spec.tpm, spec.max_concurrent) = (Some(u32::MAX), Some(u64::MAX / 4), Some(1_000));
        }
        let token = k.create_agent(&spec).unwrap().token;
        let mut micros: Vec<u128> = (0..calls)
            .map(|_| {
                let start = Instant::now();
                let a = k.admit(token.expose(), &req).unwrap();
                k.commit(&a.execution_id, Usage::new(1_200, 180)).unwrap();
                start.elapsed().as_micros()
            })
            .collect();
        micros.sort_unstable();
        let p = |q| percentile(&micros, q);
        println!("{label:<14} {:>6} {:>6} {:>6} {:>7}", p(0.5), p(0.9), p(0.99), p(0.999));
    }

    println!("\ninput-token counting, microseconds per KB of prompt (median of 200)");
    let text = "The agent reads the tool output, plans the next step and calls the model again. ".repeat(2_000);
    for (model, kb) in [("gpt-4o-mini", 1), ("gpt-4o-mini", 64), ("llama3", 1), ("llama3", 64)] {
        let messages = [Message::new("user", &text[..kb * 1024])];
        estimate_input_tokens(model, &messages); // the tokenizer loads once, lazily: not measured
        let mut micros: Vec<f64> = (0..200)
            .map(|_| {
                let start = Instant::now();
                std::hint::black_box(estimate_input_tokens(model, std::hint::black_box(&messages)));
                start.elapsed().as_secs_f64() * 1e6 / kb as f64
            })
            .collect();
        micros.sort_by(f64::total_cmp);
        println!("{model:<12} {kb:>3} KB  {:>8.2}", micros[100]);
    }
}
