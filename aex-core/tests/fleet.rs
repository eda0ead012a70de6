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
    // require encrypts without checking; disable does not encrypt.
    let k = Kernel::open(format!("{url}?sslmode=require"), options()).unwrap();
    assert_eq!(encrypted(&admin, &url), "t");
    drop(k);
    let k = Kernel::open(format!("{url}?sslmode=disable"), options()).unwrap();
    assert_eq!(encrypted(&admin, &url), "f");
    drop(k);
}
