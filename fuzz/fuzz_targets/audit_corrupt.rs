//! `audit` over a randomly corrupted database file: opening it and auditing it end in a report
//! or an error, never a panic or a hang (libFuzzer's `-timeout` catches the latter).
#![no_main]

use std::sync::OnceLock;

use aex_core::{AdmitRequest, AgentSpec, Config, Durability, Kernel, KernelOptions, ModelSpec, Prices, StoreOptions, TeamSpec, Usage};
use libfuzzer_sys::fuzz_target;

fn options() -> KernelOptions {
    let config = Config::new()
        .with_model("gpt-4o-mini", ModelSpec::priced(Prices::from_usd("0.15", "0.60").unwrap(), 4_096))
        .unwrap();
    KernelOptions { config, store: StoreOptions { durability: Durability::Memory, ..StoreOptions::default() }, ..KernelOptions::default() }
}

/// A small but complete database: a team, agents, every kind of settlement, checkpointed into
/// one file.
fn pristine() -> &'static [u8] {
    static DB: OnceLock<Vec<u8>> = OnceLock::new();
    DB.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.db");
        let k = Kernel::open(&path, options()).unwrap();
        k.create_team(&TeamSpec { name: "research".into(), budget_micro: 5_000_000, parent: None }).unwrap();
        let mut spec = AgentSpec::new("atlas", 2_000_000);
        spec.team = Some("research".into());
        let token = k.create_agent(&spec).unwrap().token;
        k.create_agent(&AgentSpec::new("bolt", 1_000_000)).unwrap();
        let req = AdmitRequest::new("gpt-4o-mini").input_tokens(1_000).max_output_tokens(200);
        for i in 0..12 {
            let a = k.admit(token.expose(), &req).unwrap();
            match i % 3 {
                0 => drop(k.commit(&a.execution_id, Usage::new(900, 150)).unwrap()),
                1 => drop(k.release(&a.execution_id, "not needed").unwrap()),
                _ => drop(k.fail(&a.execution_id, "provider error").unwrap()),
            }
        }
        drop(k);
        std::fs::read(&path).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let db = pristine();
    let mut bytes = db.to_vec();
    // Each 5 bytes: a little-endian offset into the file and a byte to XOR there.
    for chunk in data.chunks_exact(5) {
        let at = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize % bytes.len();
        bytes[at] ^= chunk[4].max(1);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.db");
    std::fs::write(&path, &bytes).unwrap();
    match Kernel::open(&path, options()) {
        Ok(k) => match k.audit(None) {
            Ok(report) => {
                let _ = report.is_clean();
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        },
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
