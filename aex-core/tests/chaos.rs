//! Chaos and soak: worker processes run a mixed workload on one database while the test SIGKILLs
//! random workers and restarts them. At the end the ledger shows no budget over its limit at any
//! instant, every reservation is settled or expired by the rules, the replay equals the live
//! counters, and the audit is clean.
//!
//! Part of the conformance suite: on a file, or, when `AEX_TEST_POSTGRES` names a server, on a
//! PostgreSQL database — "machines" that each hold a connection of their own, while the test also
//! ends every connection to the database (`pg_terminate_backend`) and restarts the server at once
//! (`pg_ctl restart -m immediate`, given its directory as `AEX_TEST_POSTGRES_DIR`). A store that
//! is away answers `503`; the workers carry on when it is back, and what they never heard the end
//! of is settled by the TTL rule.
//!
//! `cargo test -p aex-core --release --test chaos` runs it for `AEX_CHAOS_SECONDS` (default 20);
//! set it to 600 or more for a soak.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aex_core::{
    AdmitRequest, AgentSpec, Clock, Config, Durability, Error, Kernel, KernelOptions, ModelSpec, Prices, StoreOptions, SystemClock,
    TeamSpec, Usage,
};
use common::{MODEL, child_env, config, spawn_child};
use rand::{RngExt, SeedableRng, rngs::StdRng};

const WORKERS: usize = 4;
const TTL_MS: i64 = 1_500;
const TEAM: &str = "pool";
/// Two agents in the team, whose tokens every worker uses: their own budgets are ample, so the
/// team's is the one they meet. The workers' own agents are outside the team and meet theirs.
const SHARED: [&str; 2] = ["shared-a", "shared-b"];

fn options(config: Config) -> KernelOptions {
    KernelOptions {
        config,
        reservation_ttl_ms: TTL_MS,
        store: StoreOptions { durability: Durability::Normal, ..StoreOptions::default() },
        clock: Arc::new(SystemClock),
        ..KernelOptions::default()
    }
}

/// The same model at twice the price: reloading between the two changes what new admissions
/// reserve, never what open ones hold.
fn dearer_config() -> Config {
    Config::new().with_model(MODEL, ModelSpec::priced(Prices::from_usd("0.30", "1.20").unwrap(), 1_000)).unwrap()
}

/// Whether the store may be away for a while (the fleet store while its server restarts): then
/// `503` is an answer to expect, and to wait out.
fn faults() -> bool {
    std::env::var("AEX_CHAOS_FAULTS").is_ok_and(|v| v == "1")
}

/// `op`'s result; while the store is away (and only if `wait`), `op` again until it is back.
fn through<T>(wait: bool, mut op: impl FnMut() -> aex_core::Result<T>) -> aex_core::Result<T> {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        match op() {
            Err(Error::Unavailable(_)) if wait && Instant::now() < give_up => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// One worker's life, until the stop file appears or it is killed.
#[test]
#[ignore = "the body of a child process: its parent test runs it"]
fn child_chaos_worker() {
    let (db, name, shared, stop) = (child_env("AEX_CHAOS_DB"), child_env("AEX_CHAOS_AGENT"), child_env("AEX_CHAOS_SHARED"), child_env("AEX_CHAOS_STOP"));
    let k = through(faults(), || Kernel::open(&db, options(config()))).unwrap();
    let mut rng = StdRng::seed_from_u64(u64::from(std::process::id()) ^ SystemClock.now_ms().unsigned_abs());
    // A restarted worker does not know its agent's token: it rotates a new one, as an operator would.
    let mut own = through(faults(), || k.rotate_token(&name, None)).unwrap().expose().to_string();
    let mut dear = false;
    while !Path::new(&stop).exists() {
        match rng.random_range(0..100) {
            0..4 => own = through(faults(), || k.rotate_token(&name, None)).unwrap().expose().to_string(),
            4..7 => {
                dear = !dear;
                through(faults(), || k.reload_config(if dear { dearer_config() } else { config() })).unwrap();
            }
            7..9 => drop(through(faults(), || k.add_budget(&name, 1_000)).unwrap()),
            _ => {
                let shared: Vec<&str> = shared.split(' ').collect();
                let token = if rng.random_bool(0.5) { own.as_str() } else { shared[rng.random_range(0..shared.len())] };
                call(&k, token, &mut rng);
            }
        }
    }
}

/// Admits one call and settles it one of the ways a real agent would, or abandons it.
fn call(k: &Kernel, token: &str, rng: &mut StdRng) {
    let req = AdmitRequest::new(MODEL).input_tokens(rng.random_range(1..=2_000)).max_output_tokens(rng.random_range(1..=1_000));
    let a = match k.admit(token, &req) {
        Ok(a) => a,
        Err(Error::InsufficientBudget { .. }) => return,
        // The store away: whether the admission stands is unknown, and the TTL rule settles it.
        Err(Error::Unavailable(_)) if faults() => return,
        Err(e) => panic!("admission failed unexpectedly: {e}"),
    };
    // Real usage never exceeds the reservation here, so a budget can only be exceeded by a bug.
    let usage = Usage::new(rng.random_range(0..=a.input_tokens), rng.random_range(0..=a.max_output_tokens));
    let id = &a.execution_id;
    let settled = match rng.random_range(0..100) {
        0..40 => k.commit(id, usage).map(drop),
        40..55 => k.release(id, "not needed").map(drop),
        55..70 => k.fail(id, "provider error").map(drop),
        70..80 => k.mark_dispatched(id).and_then(|_| k.commit(id, usage)).map(drop),
        80..85 => k.mark_dispatched(id).map(drop), // sent, then the agent vanished: charged in full at expiry
        _ => Ok(()),                                 // never sent: released at expiry
    };
    match settled {
        // A worker starved past the TTL finds its execution expired: the rules settled it.
        Ok(()) | Err(Error::Conflict { .. }) => {}
        // The store away: left to the TTL rule, as a crash would leave it.
        Err(Error::Unavailable(_)) if faults() => {}
        Err(e) => panic!("settlement failed unexpectedly: {e}"),
    }
}


fn spawn_worker(db: &str, agent: &str, shared: &str, stop: &Path, faults: bool) -> Child {
    let stop = stop.to_str().unwrap();
    let faults = if faults { "1" } else { "0" };
    spawn_child(
        "child_chaos_worker",
        &[("AEX_CHAOS_DB", db), ("AEX_CHAOS_AGENT", agent), ("AEX_CHAOS_SHARED", shared), ("AEX_CHAOS_STOP", stop), ("AEX_CHAOS_FAULTS", faults)],
    )
}

/// The test server's directory, for restarting it (`scripts/postgres restart`).
fn server_dir() -> String {
    std::env::var("AEX_TEST_POSTGRES_DIR")
        .ok()
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| panic!("AEX_TEST_POSTGRES_DIR must name the test server's directory (scripts/postgres start DIR)"))
}

/// Ends every connection to the database `db` (a URL) from the server's side.
fn terminate_backends(db: &str) {
    let (base, name) = db.rsplit_once('/').unwrap();
    let admin = format!("{base}/postgres");
    common::raw::Raw::open(&admin)
        .batch(&format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"));
}

/// Restarts the test server at once: every process killed, then crash recovery.
fn restart_server() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/postgres");
    let status = std::process::Command::new(script).args(["restart", &server_dir()]).status().unwrap();
    assert!(status.success(), "the test server did not restart");
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Books {
    budget: i64,
    spent: i64,
    reserved: i64,
}

struct Open {
    agent: String,
    teams: Vec<String>,
    reserved: i64,
    dispatched: bool,
}

/// The books as the ledger tells them.
struct Walk {
    agents: HashMap<String, Books>,
    teams: HashMap<String, Books>,
    /// Executions reserved and not (yet) settled or expired.
    open: HashMap<String, Open>,
    reservations: u64,
    /// Reservations expired (never sent, sent).
    expired: [u64; 2],
}

/// Walks the whole ledger, keeping every agent's and team's books, and checks after each event
/// that none holds more (spent plus reserved) than its budget.
fn walk_ledger(k: &Kernel) -> Walk {
    let (mut agents, mut teams) = (HashMap::<String, Books>::new(), HashMap::<String, Books>::new());
    let mut open = HashMap::<String, Open>::new();
    let mut reservations = 0;
    let mut expired = [0; 2];
    let mut denials = std::collections::BTreeMap::new();
    let mut from = 1;
    loop {
        let events = k.events(from, 10_000).unwrap();
        let Some(last) = events.last() else { break };
        from = last.seq + 1;
        for e in events {
            let data: serde_json::Value = serde_json::from_str(&e.data).unwrap();
            let agent = e.agent.clone().unwrap_or_default();
            let mut touched_teams: Vec<String> = Vec::new();
            match e.kind.as_str() {
                "agent.created" => drop(agents.insert(agent.clone(), Books { budget: e.amount_micro, ..Books::default() })),
                "agent.budget_set" => agents.get_mut(&agent).unwrap().budget = e.amount_micro,
                "team.created" => {
                    let team = data["team"].as_str().unwrap().to_string();
                    teams.insert(team, Books { budget: e.amount_micro, ..Books::default() });
                }
                "team.budget_set" => teams.get_mut(data["team"].as_str().unwrap()).unwrap().budget = e.amount_micro,
                "execution.reserved" => {
                    reservations += 1;
                    let ts: Vec<String> = data["teams"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
                    agents.get_mut(&agent).unwrap().reserved += e.amount_micro;
                    for t in &ts {
                        teams.get_mut(t).unwrap().reserved += e.amount_micro;
                    }
                    touched_teams.clone_from(&ts);
                    let id = e.execution_id.clone().unwrap();
                    open.insert(id, Open { agent: agent.clone(), teams: ts, reserved: e.amount_micro, dispatched: false });
                }
                "execution.committed" | "execution.released" | "execution.failed" | "execution.expired" => {
                    let x = open.remove(e.execution_id.as_deref().unwrap()).expect("one terminal event per reservation");
                    assert_eq!(x.agent, agent);
                    let charged = if matches!(e.kind.as_str(), "execution.committed" | "execution.expired") { e.amount_micro } else { 0 };
                    assert!(charged <= x.reserved, "seq {}: charged {charged} beyond the reservation {}", e.seq, x.reserved);
                    if e.kind == "execution.expired" {
                        // The TTL rule: released if never sent, charged in full if sent.
                        let rule = if x.dispatched { x.reserved } else { 0 };
                        assert_eq!(charged, rule, "seq {}: expiry of a {}dispatched reservation", e.seq, if x.dispatched { "" } else { "never " });
                        expired[usize::from(x.dispatched)] += 1;
                    }
                    let books = agents.get_mut(&agent).unwrap();
                    books.reserved -= x.reserved;
                    books.spent += charged;
                    for t in &x.teams {
                        let books = teams.get_mut(t).unwrap();
                        books.reserved -= x.reserved;
                        books.spent += charged;
                    }
                    touched_teams = x.teams;
                }
                "admission.denied" => {
                    *denials.entry(data["reason"].as_str().unwrap_or("?").to_string()).or_insert(0u64) += 1;
                }
                "execution.dispatched" => open.get_mut(e.execution_id.as_deref().unwrap()).unwrap().dispatched = true,
                "execution.overrun" => panic!("seq {}: an overrun, though no usage exceeded its reservation", e.seq),
                _ => {}
            }
            if let Some(b) = agents.get(&agent) {
                assert!(b.spent + b.reserved <= b.budget, "seq {}: agent '{agent}' over budget: {b:?}", e.seq);
            }
            for t in &touched_teams {
                let b = teams[t];
                assert!(b.spent + b.reserved <= b.budget, "seq {}: team '{t}' over budget: {b:?}", e.seq);
            }
        }
    }
    for reason in ["budget_exceeded", "team_budget_exceeded"] {
        assert!(denials.get(reason).is_some_and(|&n| n > 0), "the run never reached a {reason} boundary: {denials:?}");
    }
    eprintln!("denials: {denials:?}");
    Walk { agents, teams, open, reservations, expired }
}

#[test]
fn killed_and_restarted_workers_never_overshoot_and_the_books_balance() {
    let seconds: u64 = std::env::var("AEX_CHAOS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let db = common::shared_db(dir.path());
    let fleet = db.starts_with("postgresql://");
    let stop = dir.path().join("stop");
    let names: Vec<String> = (0..WORKERS).map(|i| format!("worker{i}")).collect();
    // Small enough that the run meets every budget however slow the machine is: on the fleet
    // store, where a call takes milliseconds and the server restarts, a third of the file's.
    let budget = if fleet { 20_000 } else { 60_000 };
    let shared = {
        let k = Kernel::open(&db, options(config())).unwrap();
        // As small as a worker's own budget: four workers' shared calls spend it about four times
        // as fast as each spends its own.
        k.create_team(&TeamSpec { name: TEAM.into(), budget_micro: budget, parent: None }).unwrap();
        for name in &names {
            k.create_agent(&AgentSpec::new(name, budget)).unwrap();
        }
        let tokens: Vec<String> = SHARED
            .iter()
            .map(|name| {
                let mut spec = AgentSpec::new(*name, 50_000_000);
                spec.team = Some(TEAM.into());
                k.create_agent(&spec).unwrap().token.expose().to_string()
            })
            .collect();
        tokens.join(" ")
    };

    let mut workers: Vec<Child> = names.iter().map(|n| spawn_worker(&db, n, &shared, &stop, fleet)).collect();
    // The test tops up the team as it goes (it alone changes the team's budget), so the run
    // keeps meeting the team's limit and the agents' without spending it for good.
    let admin = Kernel::open(&db, options(config())).unwrap();
    let mut rng = StdRng::seed_from_u64(SystemClock.now_ms().unsigned_abs());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut kills, mut cut, mut restarts) = (0, 0, 0);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(rng.random_range(50..400)));
        let i = rng.random_range(0..WORKERS);
        if let Some(status) = workers[i].try_wait().unwrap() {
            panic!("worker {i} ended on its own: {status}");
        }
        workers[i].kill().unwrap(); // SIGKILL, wherever it is: mid-transaction, mid-fsync, idle
        workers[i].wait().unwrap();
        kills += 1;
        workers[i] = spawn_worker(&db, &names[i], &shared, &stop, fleet);
        if fleet {
            // The server's faults, between the workers' deaths: connections cut, then a crash.
            match kills % 8 {
                3 => {
                    terminate_backends(&db);
                    cut += 1;
                }
                7 => {
                    restart_server();
                    restarts += 1;
                }
                _ => {}
            }
        }
        let team = through(fleet, || admin.team(TEAM)).unwrap();
        through(fleet, || admin.set_team_budget(TEAM, team.budget_micro + 1_000)).unwrap();
    }
    drop(admin);
    std::fs::write(&stop, b"").unwrap();
    for (i, mut w) in workers.into_iter().enumerate() {
        let status = w.wait().unwrap();
        assert!(status.success(), "worker {i} failed: {status}");
    }
    assert!(kills >= 10, "only {kills} kills");
    if fleet {
        assert!(cut >= 1 && restarts >= 1, "the server's faults: {cut} cuts, {restarts} restarts");
    }

    // Every abandoned reservation is past its TTL now; opening reconciles them.
    std::thread::sleep(Duration::from_millis(TTL_MS as u64 + 100));
    let k = Kernel::open(&db, options(config())).unwrap();
    let Walk { agents, teams, open, reservations, expired } = walk_ledger(&k);
    assert!(reservations >= 200, "too little happened: {reservations} reservations");
    assert!(expired[0] > 0 && expired[1] > 0, "abandoned reservations of both kinds expire: {expired:?}");
    assert!(open.is_empty(), "{} reservations neither settled nor expired", open.len());
    for a in k.list_agents().unwrap() {
        let b = agents[&a.name];
        assert_eq!((a.budget_micro, a.spent_micro, a.reserved_micro), (b.budget, b.spent, 0), "agent {}", a.name);
    }
    let team = k.team(TEAM).unwrap();
    assert_eq!((team.spent_micro, team.reserved_micro), (teams[TEAM].spent, 0));
    let report = k.audit(None).unwrap();
    assert!(report.is_clean(), "audit failed after {kills} kills: {:?}", report.failure);
    eprintln!(
        "chaos: {seconds}s, {kills} kills, {cut} connection cuts, {restarts} server restarts, {reservations} reservations \
         ({} expired unsent, {} expired sent), {} events, audit clean",
        expired[0], expired[1], report.events
    );
}
