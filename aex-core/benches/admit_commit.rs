//! admit + commit on a file database: durability `full` and `normal`, one thread and several.
//!
//! Run: `cargo bench -p aex-core --bench admit_commit`. Each iteration is one whole guarded call
//! (admission with auth, idempotency, policy and budget; then commit with usage), two store
//! transactions and two ledger events. With several threads the time is wall-clock per call
//! across all threads (inverse throughput).

use std::sync::Arc;
use std::time::{Duration, Instant};

use aex_core::{AdmitRequest, AgentSpec, Config, Durability, Kernel, KernelOptions, ModelSpec, Prices, StoreOptions, Usage, money};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn open(dir: &std::path::Path, durability: Durability) -> (Kernel, String) {
    let config = Config::new()
        .with_model("gpt-4o-mini", ModelSpec::priced(Prices::from_usd("0.15", "0.60").unwrap(), 16_384))
        .unwrap();
    let options = KernelOptions { config, store: StoreOptions { durability, ..Default::default() }, ..Default::default() };
    let k = Kernel::open(dir.join("bench.db"), options).unwrap();
    let token = k.create_agent(&AgentSpec::new("bench", money::MAX_MICRO)).unwrap().token.expose().to_string();
    (k, token)
}

fn guarded_call(k: &Kernel, token: &str, req: &AdmitRequest) {
    let a = k.admit(token, req).unwrap();
    k.commit(&a.execution_id, Usage::new(1_200, 180)).unwrap();
}

fn bench(c: &mut Criterion) {
    let req = AdmitRequest::new("gpt-4o-mini").input_tokens(1_200).max_output_tokens(256);
    let mut group = c.benchmark_group("admit_commit");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(8));
    for (label, durability) in [("normal", Durability::Normal), ("full", Durability::Full)] {
        for threads in [1usize, 4] {
            let dir = tempfile::tempdir().unwrap();
            let (k, token) = open(dir.path(), durability);
            let token = Arc::new(token);
            group.bench_function(BenchmarkId::new(label, format!("{threads}-thread")), |b| {
                b.iter_custom(|iters| {
                    let per = iters.div_ceil(threads as u64);
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for _ in 0..threads {
                            let (k, token, req) = (&k, &token, &req);
                            s.spawn(move || (0..per).for_each(|_| guarded_call(k, token, req)));
                        }
                    });
                    start.elapsed().mul_f64(iters as f64 / (per * threads as u64) as f64)
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
