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

/// Runs `sql` on the database `url` names, from a thread of its own.
fn psql(url: &str, sql: &str) {
    let (url, sql) = (url.to_string(), sql.to_string());
    std::thread::spawn(move || postgres::Client::connect(&url, postgres::NoTls).unwrap().batch_execute(&sql).unwrap()).join().unwrap();
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
