//! Per-call latency percentiles of admit + commit, which criterion's averaged samples hide.
//!
//! Run: `cargo bench -p aex-core --bench latency` (`-- CALLS` to change the count, default 5000).
//! Prints p50 / p90 / p99 / p99.9 of each whole guarded call (admit, then commit) on a fresh file
//! database for each durability, and for an in-memory database as the CPU-only reference.

use std::time::Instant;

use aex_core::{AdmitRequest, AgentSpec, Config, Durability, Kernel, KernelOptions, ModelSpec, Prices, StoreOptions, Usage, money};

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
    println!("{:<10} {:>6} {:>6} {:>6} {:>7}", "store", "p50", "p90", "p99", "p99.9");
    for label in ["in-memory", "memory", "normal", "full"] {
        let dir = tempfile::tempdir().unwrap();
        let durability = Durability::parse(if label == "in-memory" { "memory" } else { label }).unwrap();
        let options = KernelOptions { config: config.clone(), store: StoreOptions { durability, ..Default::default() }, ..Default::default() };
        let k = if label == "in-memory" { Kernel::open_in_memory(options) } else { Kernel::open(dir.path().join("b.db"), options) }.unwrap();
        let token = k.create_agent(&AgentSpec::new("bench", money::MAX_MICRO)).unwrap().token;
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
        println!("{label:<10} {:>6} {:>6} {:>6} {:>7}", p(0.5), p(0.9), p(0.99), p(0.999));
    }
}
