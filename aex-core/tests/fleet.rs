//! The fleet store's own edges: URLs, credentials, foreign and newer databases, concurrent first
//! opens, lost connections. (The rules themselves are the conformance suite's: the same tests run
//! against PostgreSQL when `AEX_TEST_POSTGRES` names a server, see `common::store_kernel`.)
//!
//! The tests that need a server are ignored in a plain `cargo test`; `scripts/test` runs them
//! against a throwaway server (`--include-ignored` with `AEX_TEST_POSTGRES` set).

mod common;

use aex_core::{AdmitRequest, Error, Kernel, KernelOptions, Usage};
use common::{MODEL, POSTGRES, agent, assert_clean, config};

fn options() -> KernelOptions {
    KernelOptions { config: config(), ..Default::default() }
}

/// The admin URL of the test server.
fn server() -> String {
    std::env::var(POSTGRES).ok().filter(|u| !u.is_empty()).unwrap_or_else(|| panic!("{POSTGRES} must name a PostgreSQL server"))
}

/// Runs `sql` on the database `url` names, through a connection of its own.
fn psql(url: &str, sql: &str) {
    common::raw::Raw::open(url).batch(sql);
}

#[test]
fn a_malformed_url_is_refused_naming_the_path() {
    let e = Kernel::open("postgresql://aex@127.0.0.1:notaport/db", options()).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { ref field, .. } if field == "path"), "{e:?}");
    assert!(e.to_string().contains("PostgreSQL URL"), "{e}");
}

#[test]
fn an_unreachable_server_is_unavailable_and_its_password_never_shows() {
    // Port 1 on loopback: nothing listens there.
    let e = Kernel::open("postgresql://aex:s3cret-pw@127.0.0.1:1/fleet?connect_timeout=2", options()).unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    let (text, debug) = (e.to_string(), format!("{e:?}"));
    assert!(text.contains("127.0.0.1:1/fleet"), "{text}");
    assert!(!text.contains("s3cret-pw") && !debug.contains("s3cret-pw"), "{text} / {debug}");
    let e = Kernel::open("postgresql://aex:s3cret-pw@127.0.0.1:notaport/db", options()).unwrap_err();
    assert!(!e.to_string().contains("s3cret-pw") && !format!("{e:?}").contains("s3cret-pw"), "{e}");
    // An unencoded '@' in the password would put its tail in the host name, and so in messages.
    let e = Kernel::open("postgresql://aex:s3cret@pw@127.0.0.1:1/db", options()).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { .. }), "{e:?}");
    assert!(e.to_string().contains("%40") && !e.to_string().contains("pw@127"), "{e}");
}

#[test]
#[ignore = "needs a PostgreSQL server: scripts/test runs it with AEX_TEST_POSTGRES"]
fn a_database_that_is_not_aexs_is_refused_and_left_unchanged() {
    let admin = server();
    let url = fresh(&admin);
    psql(&url, "CREATE TABLE agents (x INTEGER)");
    let e = Kernel::open(&url, options()).unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    assert!(e.to_string().contains("not aex's") && e.to_string().contains("'agents'"), "{e}");
    // Nothing was created beside the stranger's table.
    psql(&url, "DO $$ BEGIN IF to_regclass('aex_schema') IS NOT NULL OR to_regclass('ledger') IS NOT NULL THEN RAISE EXCEPTION 'created'; END IF; END $$");
}

#[test]
#[ignore = "needs a PostgreSQL server: scripts/test runs it with AEX_TEST_POSTGRES"]
fn a_newer_schema_is_refused() {
    let admin = server();
    let url = fresh(&admin);
    drop(Kernel::open(&url, options()).unwrap());
    psql(&url, "UPDATE aex_schema SET version = 99");
    let e = Kernel::open(&url, options()).unwrap_err();
    assert!(e.to_string().contains("newer than this aex understands"), "{e}");
}

#[test]
#[ignore = "needs a PostgreSQL server: scripts/test runs it with AEX_TEST_POSTGRES"]
fn kernels_opening_a_new_database_at_once_create_it_once() {
    let admin = server();
    let url = fresh(&admin);
    let kernels: Vec<Kernel> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6).map(|_| s.spawn(|| Kernel::open(&url, options()).unwrap())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let token = agent(&kernels[0], "atlas", 10_000_000);
    for k in &kernels {
        let a = k.admit(&token, &AdmitRequest::new(MODEL).input_tokens(100).max_output_tokens(100)).unwrap();
        k.commit(&a.execution_id, Usage::new(100, 10)).unwrap();
    }
    assert_clean(&kernels[3]);
}

#[test]
#[ignore = "needs a PostgreSQL server: scripts/test runs it with AEX_TEST_POSTGRES"]
fn a_dropped_connection_fails_closed_and_the_kernel_reconnects() {
    let admin = server();
    let url = fresh(&admin);
    let k = Kernel::open(&url, options()).unwrap();
    let token = agent(&k, "atlas", 10_000_000);
    let db = url.rsplit_once('/').unwrap().1.to_string();
    // The server ends every connection to this database (as a restart or a failover would).
    psql(&admin, &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}' AND pid <> pg_backend_pid()"));
    let request = AdmitRequest::new(MODEL).input_tokens(100).max_output_tokens(100);
    // The first operation after the loss fails as unavailable (never admitted without the
    // store), or already runs on a new connection; the next one certainly does.
    match k.admit(&token, &request) {
        Ok(a) => drop(k.commit(&a.execution_id, Usage::new(100, 10)).unwrap()),
        Err(e) => assert!(matches!(e, Error::Unavailable(_)), "{e:?}"),
    }
    let a = k.admit(&token, &request).unwrap();
    k.commit(&a.execution_id, Usage::new(100, 10)).unwrap();
    let atlas = k.agent("atlas").unwrap();
    assert_eq!(atlas.reserved_micro, 0);
    assert_clean(&k);
}

/// A new, empty database on the test server.
fn fresh(admin: &str) -> String {
    common::new_postgres_db(admin)
}

/// The first column of the first row `sql` returns, as text, from the database `url` names.
fn psql_value(url: &str, sql: &str) -> String {
    let (url, sql) = (url.to_string(), sql.to_string());
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let rows = client.simple_query(&sql).unwrap();
        rows.iter()
            .find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
                _ => None,
            })
            .unwrap_or_default()
    })
    .join()
    .unwrap()
}

/// A new database owned by a new role that signs in with `password`: the role's URL, without
/// the password.
fn database_with_password(admin: &str, password: &str) -> String {
    let url = fresh(admin);
    let db = url.rsplit_once('/').unwrap().1.to_string();
    let role = format!("r{}", uuid::Uuid::now_v7().simple());
    psql(admin, &format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'; ALTER DATABASE {db} OWNER TO {role}"));
    url.replacen("://aex@", &format!("://{role}@"), 1)
}

#[test]
#[ignore = "needs a PostgreSQL server: scripts/test runs it with AEX_TEST_POSTGRES"]
fn a_wrong_password_is_refused_naming_the_cause_and_creates_nothing() {
    let admin = server();
    let url = database_with_password(&admin, "right-pw");
    let wrong = url.replacen('@', ":wrong-pw@", 1);
    let e = Kernel::open(&wrong, options()).unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    assert!(e.to_string().contains("password authentication failed"), "{e}");
    assert!(!e.to_string().contains("wrong-pw") && !format!("{e:?}").contains("wrong-pw"), "{e:?}");
    let as_admin = format!("{}/{}", admin.rsplit_once('/').unwrap().0, url.rsplit_once('/').unwrap().1);
    assert_eq!(psql_value(&as_admin, "SELECT to_regclass('aex_schema') IS NULL"), "t", "nothing was created");
    // The right one, in the URL, works.
    let k = Kernel::open(url.replacen('@', ":right-pw@", 1), options()).unwrap();
    let token = agent(&k, "atlas", 1_000_000);
    k.admit(&token, &AdmitRequest::new(MODEL).input_tokens(10).max_output_tokens(10)).unwrap();
}

/// The CA of the test server's certificate, when it offers TLS (`scripts/postgres start DIR tls`).
fn test_ca() -> String {
    std::env::var("AEX_TEST_POSTGRES_CA")
        .ok()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| panic!("AEX_TEST_POSTGRES_CA must name the CA of a test server started with tls"))
}

/// Whether the kernel's connections to `url`'s database are encrypted, as the server sees them.
fn encrypted(admin: &str, url: &str) -> String {
    let db = url.rsplit_once('/').unwrap().1.split('?').next().unwrap().to_string();
    psql_value(
        admin,
        &format!("SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = '{db}'"),
    )
}

#[test]
#[ignore = "needs a PostgreSQL server offering TLS: scripts/test runs it with AEX_TEST_POSTGRES and AEX_TEST_POSTGRES_CA"]
fn tls_is_used_as_sslmode_says_and_a_certificate_from_elsewhere_is_refused() {
    let (admin, ca) = (server(), test_ca());
    let other_ca = std::path::Path::new(&ca).with_file_name("other-ca.pem");
    let url = fresh(&admin);
    let verified = format!("{url}?sslmode=verify-full&sslrootcert={ca}");
    let k = Kernel::open(&verified, options()).unwrap();
    let token = agent(&k, "atlas", 1_000_000);
    k.admit(&token, &AdmitRequest::new(MODEL).input_tokens(10).max_output_tokens(10)).unwrap();
    assert_eq!(encrypted(&admin, &url), "t");
    drop(k);
    // The certificate names localhost too; verify-ca checks the chain, not the name.
    let by_name = verified.replacen("127.0.0.1", "localhost", 1);
    Kernel::open(&by_name, options()).unwrap();
    Kernel::open(format!("{url}?sslmode=verify-ca&sslrootcert={ca}"), options()).unwrap();
    // A certificate signed by a CA the client does not trust: refused, never used unverified.
    let e = Kernel::open(format!("{url}?sslmode=verify-full&sslrootcert={}", other_ca.display()), options()).unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    let e = Kernel::open(format!("{url}?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"), options()).unwrap_err();
    assert!(e.to_string().contains("sslrootcert") && e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    // require and prefer check the chain when given trusted certificates, as libpq does.
    for mode in ["require", "prefer"] {
        let e = Kernel::open(format!("{url}?sslmode={mode}&sslrootcert={}", other_ca.display()), options()).unwrap_err();
        assert!(e.to_string().to_lowercase().contains("certificate"), "{mode}: {e}");
        Kernel::open(format!("{url}?sslmode={mode}&sslrootcert={ca}"), options()).unwrap();
    }
    // require without certificates encrypts without checking; disable does not encrypt.
    let k = Kernel::open(format!("{url}?sslmode=require"), options()).unwrap();
    assert_eq!(encrypted(&admin, &url), "t");
    drop(k);
    let k = Kernel::open(format!("{url}?sslmode=disable"), options()).unwrap();
    assert_eq!(encrypted(&admin, &url), "f");
    drop(k);
}

/// What the [`CuttingProxy`] does with the next `COMMIT` it sees.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Nothing: every message passes.
    Off,
    /// Delivers the `COMMIT` to the server, then cuts the client off before any answer.
    AfterCommit,
    /// Cuts both sides before the `COMMIT` reaches the server.
    BeforeCommit,
}

/// A TCP proxy in front of the test server that reads the protocol's messages from the client
/// and can cut a connection exactly at a `COMMIT`: the connection lost during `COMMIT`, whose
/// outcome the client cannot know. (Plain TCP: use `sslmode=disable` through it.)
struct CuttingProxy {
    port: u16,
    cut: std::sync::Arc<std::sync::Mutex<Cut>>,
}

impl CuttingProxy {
    fn start(server_port: u16) -> CuttingProxy {
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(Mutex::new(Cut::Off));
        let shared = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let server = std::net::TcpStream::connect(("127.0.0.1", server_port)).unwrap();
                let cut = shared.clone();
                std::thread::spawn(move || proxy_connection(client, server, cut));
            }
        });
        CuttingProxy { port, cut }
    }

    fn arm(&self, how: Cut) {
        *self.cut.lock().unwrap() = how;
    }
}

fn proxy_connection(client: std::net::TcpStream, server: std::net::TcpStream, cut: std::sync::Arc<std::sync::Mutex<Cut>>) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    let severed = std::sync::Arc::new(AtomicBool::new(false));
    // Server to client: bytes as they come, until the connection is severed.
    let (mut from_server, mut to_client) = (server.try_clone().unwrap(), client.try_clone().unwrap());
    let quiet = severed.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = from_server.read(&mut buf) {
            if n == 0 || quiet.load(Ordering::SeqCst) || to_client.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to_client.shutdown(std::net::Shutdown::Both);
    });
    // Client to server: message by message (the startup message has no type byte).
    let (mut from_client, mut to_server) = (client, server);
    let mut pending: Vec<u8> = Vec::new();
    let mut started = false;
    let mut commit_statement: Option<Vec<u8>> = None;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from_client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        loop {
            let (header, kind) = if started { (5, pending.first().copied()) } else { (4, None) };
            if pending.len() < header {
                break;
            }
            let at = header - 4;
            let len = u32::from_be_bytes(pending[at..at + 4].try_into().unwrap()) as usize;
            if pending.len() < at + len {
                break;
            }
            let message: Vec<u8> = pending.drain(..at + len).collect();
            let body = &message[header..];
            started = true;
            match kind {
                // Parse: statement name, then its text.
                Some(b'P') => {
                    let mut parts = body.split(|&b| b == 0);
                    let (name, text) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
                    if text == b"COMMIT" {
                        commit_statement = Some(name.to_vec());
                    }
                }
                // Bind: portal name, then statement name.
                Some(b'B') => {
                    let statement = body.split(|&b| b == 0).nth(1).unwrap_or_default();
                    let how = *cut.lock().unwrap();
                    if how != Cut::Off && commit_statement.as_deref() == Some(statement) {
                        *cut.lock().unwrap() = Cut::Off;
                        severed.store(true, Ordering::SeqCst);
                        if how == Cut::AfterCommit {
                            // The COMMIT's Bind, Execute and Sync reach the server; no answer
                            // reaches the client.
                            let _ = to_server.write_all(&message);
                            let _ = to_server.write_all(&pending);
                            std::thread::sleep(std::time::Duration::from_millis(200));
                        }
                        let _ = to_server.shutdown(std::net::Shutdown::Both);
                        let _ = from_client.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                }
                _ => {}
            }
            if to_server.write_all(&message).is_err() {
                return;
            }
        }
    }
    let _ = to_server.shutdown(std::net::Shutdown::Both);
}

#[test]
#[ignore = "needs a PostgreSQL server: scripts/test runs it with AEX_TEST_POSTGRES"]
fn a_commit_whose_outcome_is_unknown_is_settled_by_retrying_with_the_same_id() {
    let admin = server();
    let url = fresh(&admin);
    let port: u16 = url.rsplit_once(':').unwrap().1.split('/').next().unwrap().parse().unwrap();
    let proxy = CuttingProxy::start(port);
    let through = format!("{}:{}/{}?sslmode=disable", url.rsplit_once(':').unwrap().0, proxy.port, url.rsplit_once('/').unwrap().1);
    let k = Kernel::open(&through, options()).unwrap();
    let token = agent(&k, "atlas", 10_000_000);
    let request = |id: &str| AdmitRequest::new(MODEL).input_tokens(1_000).max_output_tokens(500).execution_id(id);
    let reserved_once = {
        let a = k.admit(&token, &request("probe")).unwrap();
        k.release(&a.execution_id, "probe").unwrap();
        a.reserved_micro
    };
    for (how, id) in [(Cut::AfterCommit, "delivered"), (Cut::BeforeCommit, "lost")] {
        // The admission's COMMIT: cut.
        proxy.arm(how);
        let e = k.admit(&token, &request(id)).unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)) && e.to_string().contains("outcome is unknown"), "{e}");
        // Retried with the same id (the kernel reconnects): one reservation, whatever happened.
        let a = k.admit(&token, &request(id)).unwrap();
        assert_eq!(a.replayed, how == Cut::AfterCommit, "{id}: the first admission {} the server", if a.replayed { "reached" } else { "never reached" });
        assert_eq!(k.agent("atlas").unwrap().reserved_micro, reserved_once, "{id}");
        // The settlement's COMMIT: cut, then retried.
        proxy.arm(how);
        let e = k.commit(id, Usage::new(1_000, 400)).unwrap_err();
        assert!(matches!(e, Error::Unavailable(_)) && e.to_string().contains("outcome is unknown"), "{e}");
        let s = k.commit(id, Usage::new(1_000, 400)).unwrap();
        assert_eq!(s.replayed, how == Cut::AfterCommit, "{id}");
        assert_eq!(k.agent("atlas").unwrap().reserved_micro, 0, "{id}");
    }
    // Charged exactly once each: the ledger holds one reservation and one commitment per id.
    let events = k.events(1, 10_000).unwrap();
    for id in ["delivered", "lost"] {
        let of = |kind: &str| events.iter().filter(|e| e.execution_id.as_deref() == Some(id) && e.kind == kind).count();
        assert_eq!((of("execution.reserved"), of("execution.committed")), (1, 1), "{id}");
    }
    let atlas = k.agent("atlas").unwrap();
    let committed: i64 = events.iter().filter(|e| e.kind == "execution.committed").map(|e| e.amount_micro).sum();
    assert_eq!(atlas.spent_micro, committed);
    assert_clean(&k);
}

#[test]
#[ignore = "needs a PostgreSQL server: scripts/test runs it with AEX_TEST_POSTGRES"]
fn a_server_whose_default_isolation_is_stricter_changes_nothing() {
    let admin = server();
    let url = fresh(&admin);
    let db = url.rsplit_once('/').unwrap().1.to_string();
    psql(&admin, &format!("ALTER DATABASE {db} SET default_transaction_isolation = 'repeatable read'"));
    let k = Kernel::open(&url, options()).unwrap();
    let token = agent(&k, "atlas", 10_000_000);
    let kernels: Vec<Kernel> = (0..3).map(|_| Kernel::open(&url, options()).unwrap()).collect();
    std::thread::scope(|s| {
        for k in &kernels {
            for _ in 0..3 {
                let token = &token;
                s.spawn(move || {
                    for _ in 0..15 {
                        let a = k.admit(token, &AdmitRequest::new(MODEL).input_tokens(100).max_output_tokens(100)).unwrap();
                        k.commit(&a.execution_id, Usage::new(100, 10)).unwrap();
                    }
                });
            }
        }
    });
    assert_eq!(k.agent("atlas").unwrap().reserved_micro, 0);
    assert_clean(&k);
}

#[test]
#[ignore = "needs a PostgreSQL server: scripts/test runs it with AEX_TEST_POSTGRES"]
fn a_column_type_changed_by_hand_costs_one_call_not_every_call() {
    let admin = server();
    let url = fresh(&admin);
    let k = Kernel::open(&url, options()).unwrap();
    let token = agent(&k, "atlas", 10_000_000);
    let request = AdmitRequest::new(MODEL).input_tokens(100).max_output_tokens(100);
    k.admit(&token, &request).unwrap();
    // The prepared statements' result types change under them.
    psql(&url, "ALTER TABLE agents ALTER COLUMN token_prefix TYPE varchar(64)");
    match k.admit(&token, &request) {
        Ok(_) => {}
        Err(e) => assert!(matches!(e, Error::Unavailable(_)), "{e:?}"),
    }
    for _ in 0..3 {
        k.admit(&token, &request).unwrap();
    }
}
