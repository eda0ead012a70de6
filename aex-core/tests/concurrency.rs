//! Races: threads sharing one kernel, OS processes sharing one file, and a worker killed with
//! SIGKILL between admission and settlement.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use aex_core::{AdmitRequest, Clock, ExecutionState, Kernel, KernelOptions, ManualClock, SystemClock, Usage};
use common::*;

/// Each call reserves exactly 450 micro-USD and commits exactly that.
const PER_CALL: i64 = 450;

fn req() -> AdmitRequest {
    AdmitRequest::new(MODEL).input_tokens(1_000).max_output_tokens(500)
}

/// Admits and commits until the budget says no; returns how many calls were admitted. After
/// every admission it checks that the agent never holds more than its budget.
fn run_until_denied(k: &Kernel, token: &str, name: &str) -> i64 {
    let mut admitted = 0;
    loop {
        match k.admit(token, &req()) {
            Ok(a) => {
                assert_eq!(a.reserved_micro, PER_CALL);
                let agent = k.agent(name).unwrap();
                assert!(
                    agent.spent_micro + agent.reserved_micro <= agent.budget_micro,
                    "overshoot: {agent:?}"
                );
                if let Some(team) = &agent.team {
                    let team = k.team(team).unwrap();
                    assert!(team.spent_micro + team.reserved_micro <= team.budget_micro, "team overshoot: {team:?}");
                }
                admitted += 1;
                k.mark_dispatched(&a.execution_id).unwrap();
                let s = k.commit(&a.execution_id, Usage::new(1_000, 500)).unwrap();
                assert_eq!(s.cost_micro, PER_CALL);
            }
            Err(e) => {
                assert_eq!(e.status(), 402, "{e}");
                return admitted;
            }
        }
    }
}

#[test]
fn eight_threads_admit_exactly_k_calls() {
    const K: i64 = 120;
    let dir = tempfile::tempdir().unwrap();
    let db = shared_db(dir.path());
    let k = open_shared(&db);
    let token = Arc::new(agent(&k, "atlas", K * PER_CALL));
    let total = Arc::new(AtomicI64::new(0));
    // Four threads share the first kernel (group commit on SQLite); four more open kernels of
    // their own (another lock owner on the same file; on PostgreSQL, connections of their own).
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let k = if i < 4 { k.clone() } else { open_shared(&db) };
            let (token, total) = (token.clone(), total.clone());
            std::thread::spawn(move || total.fetch_add(run_until_denied(&k, &token, "atlas"), Ordering::SeqCst))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(total.load(Ordering::SeqCst), K);
    let a = k.agent("atlas").unwrap();
    assert_eq!((a.spent_micro, a.reserved_micro), (K * PER_CALL, 0));
    assert_clean(&k);
}

/// Waits for racing children and adds up the calls each reports having admitted.
fn admitted_by(children: Vec<std::process::Child>) -> i64 {
    let mut total = 0;
    for mut c in children {
        let counts: Vec<i64> = child_lines(&mut c).map(|l| l.parse().unwrap()).collect();
        assert_eq!(counts.len(), 1, "a child did not report");
        total += counts[0];
        assert!(c.wait().unwrap().success());
    }
    total
}

/// The body of one racing process, started by `four_processes_admit_exactly_k_calls`.
#[test]
#[ignore = "the body of a child process: its parent test runs it"]
fn child_racer() {
    let db = std::env::var("AEX_TEST_DB").expect("run by four_processes_admit_exactly_k_calls");
    let token = std::env::var("AEX_TEST_TOKEN").expect("run by four_processes_admit_exactly_k_calls");
    let name = std::env::var("AEX_TEST_AGENT").unwrap_or_else(|_| "atlas".into());
    let k = open_shared(&db);
    println!("{MARK}{}", run_until_denied(&k, &token, &name));
}

#[test]
fn four_processes_admit_exactly_k_calls() {
    const K: i64 = 400;
    let dir = tempfile::tempdir().unwrap();
    let db = shared_db(dir.path());
    let k = open_shared(&db);
    let token = agent(&k, "atlas", K * PER_CALL);
    let db_text = db.as_str();
    let children = (0..4).map(|_| spawn_child("child_racer", &[("AEX_TEST_DB", db_text), ("AEX_TEST_TOKEN", &token)])).collect();
    let total = admitted_by(children);
    assert_eq!(total, K);
    let a = k.agent("atlas").unwrap();
    assert_eq!((a.spent_micro, a.reserved_micro), (K * PER_CALL, 0));
    assert_clean(&k);
}

#[test]
fn four_processes_share_a_team_budget_exactly() {
    const K: i64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let db = shared_db(dir.path());
    let k = open_shared(&db);
    k.create_team(&aex_core::TeamSpec::new("org", K * PER_CALL)).unwrap();
    let agents: Vec<(String, String)> = (0..2)
        .map(|i| {
            let name = format!("agent-{i}");
            let spec = aex_core::AgentSpec { team: Some("org".into()), ..aex_core::AgentSpec::new(&name, 1_000_000) };
            (name, k.create_agent(&spec).unwrap().token.expose().to_string())
        })
        .collect();
    let db_text = db.as_str();
    let children = (0..4)
        .map(|i| {
            let (name, token) = &agents[i % 2];
            spawn_child("child_racer", &[("AEX_TEST_DB", db_text), ("AEX_TEST_TOKEN", token), ("AEX_TEST_AGENT", name)])
        })
        .collect();
    let total = admitted_by(children);
    assert_eq!(total, K);
    let team = k.team("org").unwrap();
    assert_eq!((team.spent_micro, team.reserved_micro), (K * PER_CALL, 0));
    assert_clean(&k);
}

const CRASH_TTL_MS: i64 = 60_000;

fn crash_options(clock: Arc<dyn aex_core::Clock>) -> KernelOptions {
    KernelOptions { config: config(), reservation_ttl_ms: CRASH_TTL_MS, clock, ..Default::default() }
}

/// The body of the worker that gets killed, started by `a_worker_killed_mid_call_is_reconciled_on_reopen`.
#[test]
#[ignore = "the body of a child process: its parent test runs it"]
fn child_crasher() {
    let db = std::env::var("AEX_TEST_CRASH_DB").expect("run by the crash test");
    let token = std::env::var("AEX_TEST_TOKEN").expect("run by the crash test");
    let k = Kernel::open(&db, crash_options(Arc::new(SystemClock))).unwrap();
    k.admit(&token, &req().execution_id("idle")).unwrap();
    k.admit(&token, &req().execution_id("sent")).unwrap();
    k.mark_dispatched("sent").unwrap();
    println!("{MARK}ready");
    std::thread::sleep(std::time::Duration::from_secs(120));
}

#[test]
fn a_worker_killed_mid_call_is_reconciled_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("aex.db");
    let token = {
        let k = Kernel::open(&db, crash_options(Arc::new(SystemClock))).unwrap();
        agent(&k, "atlas", 10_000)
    };
    let mut child = spawn_child("child_crasher", &[("AEX_TEST_CRASH_DB", db.to_str().unwrap()), ("AEX_TEST_TOKEN", &token)]);
    assert_eq!(child_lines(&mut child).next().as_deref(), Some("ready"));
    child.kill().unwrap(); // SIGKILL
    assert!(!child.wait().unwrap().success());

    // Before the TTL nothing is due: both reservations still hold the budget.
    let now = SystemClock.now_ms();
    let k = Kernel::open(&db, crash_options(Arc::new(ManualClock::new(now)))).unwrap();
    let a = k.agent("atlas").unwrap();
    assert_eq!((a.spent_micro, a.reserved_micro), (0, 2 * PER_CALL));
    assert_clean(&k);
    drop(k);

    // After the TTL, opening reconciles: the idle one is released, the dispatched one charged.
    let k = Kernel::open(&db, crash_options(Arc::new(ManualClock::new(now + CRASH_TTL_MS + 1)))).unwrap();
    let a = k.agent("atlas").unwrap();
    assert_eq!((a.spent_micro, a.reserved_micro), (PER_CALL, 0));
    assert_eq!(k.execution("idle").unwrap().state, ExecutionState::Released);
    let sent = k.execution("sent").unwrap();
    assert_eq!((sent.state, sent.cost_micro, sent.reason.as_deref()), (ExecutionState::Committed, Some(PER_CALL), Some("expired")));
    assert_clean(&k);
}

/// The body of a process that tries an agent's old token after another process rotated it.
#[test]
#[ignore = "the body of a child process: its parent test runs it"]
fn child_old_token() {
    let db = std::env::var("AEX_TEST_DB").expect("run by rotation_revokes_across_processes");
    let token = std::env::var("AEX_TEST_TOKEN").expect("run by rotation_revokes_across_processes");
    let k = file_kernel(Path::new(&db));
    let outcome = match k.admit(&token, &req()) {
        Ok(_) => "admitted".to_string(),
        Err(e) => e.reason().to_string(),
    };
    println!("{MARK}{outcome}");
}

#[test]
fn rotation_revokes_across_processes_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("aex.db");
    let k = file_kernel(&db);
    let old = agent(&k, "atlas", 1_000_000);
    let ask = |token: &str| {
        let mut c = spawn_child("child_old_token", &[("AEX_TEST_DB", db.to_str().unwrap()), ("AEX_TEST_TOKEN", token)]);
        let lines: Vec<String> = child_lines(&mut c).collect();
        assert!(c.wait().unwrap().success());
        lines.concat()
    };
    assert_eq!(ask(&old), "admitted");
    let new = k.rotate_token("atlas", None).unwrap();
    assert_eq!(ask(&old), "unknown_token", "another process refuses the old token right after the rotation");
    assert_eq!(ask(new.expose()), "admitted");
}
