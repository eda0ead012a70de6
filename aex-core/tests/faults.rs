//! Storage faults: a full disk and a read-only database file give `Unavailable`, and leave
//! nothing half-written: what was acknowledged is there, what failed is not, and the audit is
//! clean.

mod common;

use std::path::Path;

use aex_core::{AdmitRequest, Error, Kernel, Usage};
use common::*;

fn files_size(db: &Path) -> u64 {
    ["", "-wal"]
        .iter()
        .filter_map(|suffix| std::fs::metadata(format!("{}{suffix}", db.display())).ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

/// Admits and commits under a file-size limit until the "disk" is full, then reports what it
/// was told succeeded and how it failed.
#[test]
#[ignore = "the body of a child process: its parent test runs it"]
fn child_disk_full() {
    let (db, token) = (child_env("AEX_FAULT_DB"), child_env("AEX_FAULT_TOKEN"));
    let k = file_kernel(Path::new(&db));
    let limit = files_size(Path::new(&db)) + 1024 * 1024;
    // SAFETY: plain libc calls on this process; ignoring SIGXFSZ turns the limit into EFBIG.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let rlim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &rlim), 0);
    }
    let (mut admitted, mut committed) = (0, 0);
    let failure = loop {
        let req = AdmitRequest::new(MODEL).input_tokens(1_000).max_output_tokens(100);
        let a = match k.admit(&token, &req) {
            Ok(a) => a,
            Err(e) => break e,
        };
        admitted += 1;
        match k.commit(&a.execution_id, Usage::new(900, 80)) {
            Ok(_) => committed += 1,
            Err(e) => break e,
        }
        assert!(admitted < 100_000, "the file-size limit never took effect");
    };
    // Later calls keep failing the same way; none half-succeeds.
    let again = k.admit(&token, &AdmitRequest::new(MODEL).input_tokens(10).max_output_tokens(10));
    println!("{MARK}{admitted} {committed} {} {}", failure.status(), again.map_or_else(|e| e.status(), |_| 200));
}

#[test]
fn a_full_disk_gives_unavailable_and_keeps_what_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("full.db");
    let token = {
        let k = file_kernel(&db);
        agent(&k, "atlas", 1_000_000_000)
    };
    let mut child = spawn_child("child_disk_full", &[("AEX_FAULT_DB", db.to_str().unwrap()), ("AEX_FAULT_TOKEN", &token)]);
    let report: Vec<i64> = child_lines(&mut child).next().expect("the child reports").split(' ').map(|n| n.parse().unwrap()).collect();
    assert!(child.wait().unwrap().success());
    let [admitted, committed, status, again] = report[..] else { panic!("bad report {report:?}") };
    assert!(admitted >= 10, "the disk filled too early to tell anything: {report:?}");
    assert_eq!(status, 503, "a full disk is Unavailable");
    assert_eq!(again, 503, "and stays so");

    // Reopened without the limit: exactly the acknowledged work is there.
    let k = file_kernel(&db);
    let kinds: Vec<String> = k.events(1, usize::MAX).unwrap().into_iter().map(|e| e.kind).collect();
    let count = |kind: &str| kinds.iter().filter(|k| *k == kind).count() as i64;
    assert_eq!(count("execution.reserved"), admitted);
    assert_eq!(count("execution.committed"), committed);
    let a = k.agent("atlas").unwrap();
    let open = admitted - committed; // an admission acknowledged before a failed commit stays open
    assert_eq!(a.reserved_micro, open * 210, "{a:?}"); // 1,000 in at $0.15/M + 100 out at $0.60/M
    assert_clean(&k);
    // The reopened store works.
    let adm = k.admit(&token, &AdmitRequest::new(MODEL).input_tokens(1_000).max_output_tokens(100)).unwrap();
    k.commit(&adm.execution_id, Usage::new(900, 80)).unwrap();
    assert_clean(&k);
}

/// Opens a database it may not write, as an unprivileged user if the test runs as root.
#[test]
#[ignore = "the body of a child process: its parent test runs it"]
fn child_read_only() {
    // SAFETY: plain libc calls on this process.
    unsafe {
        if libc::geteuid() == 0 {
            assert_eq!(libc::setgid(65_534), 0);
            assert_eq!(libc::setuid(65_534), 0);
        }
    }
    let db = child_env("AEX_FAULT_DB");
    let outcome = match Kernel::open(&db, common::options(&aex_core::ManualClock::new(T0))) {
        Ok(_) => "opened".to_string(),
        Err(e @ Error::Unavailable(_)) => format!("{} {e}", e.status()),
        Err(e) => format!("other {e}"),
    };
    println!("{MARK}{outcome}");
}

#[test]
fn a_read_only_database_gives_unavailable_and_is_left_untouched() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ro.db");
    {
        let k = file_kernel(&db);
        agent(&k, "atlas", 1_000_000);
    }
    // The side lock file may stay writable: only the database itself is read-only, and the
    // directory, so no journal can be created beside it.
    std::fs::set_permissions(format!("{}.lock", db.display()), std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    let before = std::fs::read(&db).unwrap();

    let mut child = spawn_child("child_read_only", &[("AEX_FAULT_DB", db.to_str().unwrap())]);
    let outcome = child_lines(&mut child).next().expect("the child reports");
    assert!(child.wait().unwrap().success());
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(outcome.starts_with("503 "), "{outcome}");
    assert!(outcome.contains("read") || outcome.contains("open"), "the message says why: {outcome}");
    assert_eq!(std::fs::read(&db).unwrap(), before, "the file is unchanged");
    assert!(!Path::new(&format!("{}-wal", db.display())).exists());
}

#[test]
fn a_store_error_during_authentication_fails_the_call_and_records_no_denial() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("aex.db");
    let k = file_kernel(&db);
    let token = agent(&k, "atlas", 1_000_000);
    let before = snapshot(&k);
    // The token lookup's query now fails inside the admission's transaction.
    let shell = rusqlite::Connection::open(&db).unwrap();
    shell.execute_batch("ALTER TABLE agents RENAME COLUMN token_hash TO token_digest").unwrap();
    let e = k.admit(&token, &AdmitRequest::new(MODEL).input_tokens(10).max_output_tokens(10)).unwrap_err();
    assert!(!e.is_denial(), "a store failure is not a denial: {e:?}");
    assert!(matches!(e.status(), 500 | 503), "{e:?}");
    assert!(e.to_string().contains("token_hash"), "the message says what failed: {e}");
    shell.execute_batch("ALTER TABLE agents RENAME COLUMN token_digest TO token_hash").unwrap();
    assert_eq!(snapshot(&k), before, "the failed transaction left nothing, no admission.denied event either");
    k.admit(&token, &AdmitRequest::new(MODEL).input_tokens(10).max_output_tokens(10)).unwrap();
    assert_clean(&k);
}
