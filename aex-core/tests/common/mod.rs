//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod raw;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use aex_core::{
    Agent, AgentSpec, Config, Durability, Kernel, KernelOptions, ManualClock, ModelSpec, Prices, StoreOptions,
};

/// $0.15 / $0.60 per million tokens, like gpt-4o-mini; output capped at 1,000 tokens.
pub const MODEL: &str = "mini";
/// $3 / $15 per million tokens; output capped at 4,096.
pub const BIG_MODEL: &str = "big";
/// Start of the manual clock: 2026-01-01T00:00:00Z.
pub const T0: i64 = 1_767_225_600_000;

pub fn config() -> Config {
    Config::new()
        .with_model(MODEL, ModelSpec::priced(Prices::from_usd("0.15", "0.60").unwrap(), 1_000))
        .unwrap()
        .with_model(
            BIG_MODEL,
            ModelSpec::priced(Prices { input: 3_000_000, output: 15_000_000, cached_input: Some(300_000) }, 4_096),
        )
        .unwrap()
}

pub fn options(clock: &ManualClock) -> KernelOptions {
    KernelOptions { config: config(), clock: Arc::new(clock.clone()), ..Default::default() }
}

/// An in-memory kernel on a manual clock (on the conformance store: see [`store_kernel`]).
pub fn kernel() -> (Kernel, ManualClock) {
    let clock = ManualClock::new(T0);
    (store_kernel(options(&clock)), clock)
}

/// The environment variable naming a PostgreSQL server (a URL to a database its user may create
/// databases from) to run the conformance tests against instead of SQLite.
pub const POSTGRES: &str = "AEX_TEST_POSTGRES";

/// A fresh kernel on the store under test: a private in-memory SQLite database, or, when
/// [`POSTGRES`] names a server, a new PostgreSQL database of its own on that server. The tests
/// that call this are the conformance suite: one rule, tested once, run against both stores.
pub fn store_kernel(options: KernelOptions) -> Kernel {
    match std::env::var(POSTGRES) {
        Ok(admin) if !admin.is_empty() => Kernel::open(new_postgres_db(&admin), options).unwrap(),
        _ => Kernel::open_in_memory(options).unwrap(),
    }
}

/// A kernel on a file in `dir`, with the system clock and `normal` durability.
pub fn file_kernel(path: &std::path::Path) -> Kernel {
    let options = KernelOptions {
        config: config(),
        store: StoreOptions { durability: Durability::Normal, ..Default::default() },
        ..Default::default()
    };
    Kernel::open(path, options).unwrap()
}

/// A new database that several kernels (threads, processes) can open with [`open_shared`]: a
/// file in `dir`, or, when [`POSTGRES`] names a server, a new PostgreSQL database on it.
pub fn shared_db(dir: &std::path::Path) -> String {
    match std::env::var(POSTGRES) {
        Ok(admin) if !admin.is_empty() => new_postgres_db(&admin),
        _ => dir.join("aex.db").to_str().unwrap().to_string(),
    }
}

/// A kernel on a database from [`shared_db`] (`normal` durability for a file).
pub fn open_shared(db: &str) -> Kernel {
    file_kernel(std::path::Path::new(db))
}

/// Creates an empty database on the server `admin` names and returns its URL.
pub fn new_postgres_db(admin: &str) -> String {
    let name = format!("aex_test_{}", uuid::Uuid::now_v7().simple());
    // On a thread of its own: the driver must not run inside a test's async runtime.
    let create = format!("CREATE DATABASE {name}");
    let url = admin.to_string();
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("reach the test server");
        client.batch_execute(&create).expect("create a test database");
    })
    .join()
    .unwrap();
    let (base, _) = admin.rsplit_once('/').expect("a URL ending in a database name");
    format!("{base}/{name}")
}

/// Creates an agent and returns its token text.
pub fn agent(k: &Kernel, name: &str, budget_micro: i64) -> String {
    k.create_agent(&AgentSpec::new(name, budget_micro)).unwrap().token.expose().to_string()
}

/// Everything observable about the kernel's state, to prove an operation changed nothing.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    pub agents: Vec<Agent>,
    pub head: Option<aex_core::Head>,
}

pub fn snapshot(k: &Kernel) -> Snapshot {
    Snapshot { agents: k.list_agents().unwrap(), head: k.head().unwrap() }
}

pub fn assert_clean(k: &Kernel) {
    let report = k.audit(None).unwrap();
    assert!(report.is_clean(), "audit failed: {:?}", report.failure);
}

/// Marks what a child process reports, among libtest's own output (which may share the line).
pub const MARK: &str = "AEX-CHILD ";

/// Re-runs this test binary as a child executing only `test_name`, with `env` set.
pub fn spawn_child(test_name: &str, env: &[(&str, &str)]) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test_name, "--ignored", "--nocapture", "--test-threads=1"]).stdout(Stdio::piped()).stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

pub fn child_lines(child: &mut std::process::Child) -> impl Iterator<Item = String> + '_ {
    BufReader::new(child.stdout.as_mut().unwrap())
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.find(MARK).map(|at| l[at + MARK.len()..].to_string()))
}

/// A variable the parent test sets for its child process.
pub fn child_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by the parent test"))
}

/// A raw HTTP server on 127.0.0.1 that hands each connection to `serve` after reading the
/// request's head and body.
pub async fn raw_server<F, Fut>(serve: F) -> String
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let serve = std::sync::Arc::new(serve);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let serve = serve.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&seen);
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let length = text[..head_end]
                            .lines()
                            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                            .unwrap_or(0);
                        if seen.len() >= head_end + 4 + length {
                            break;
                        }
                    }
                }
                serve(socket).await;
            });
        }
    });
    url
}
