//! The store in one process with other users of its files: two kernels on one file, another
//! connection that opens and closes, a held lock file, and the files' permissions.

mod common;

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use aex_core::{AdmitRequest, Durability, Error, Kernel, KernelOptions, StoreOptions, Usage};
use common::*;

/// Reserved and committed by each call below: 1,000 input and 500 output tokens of `mini`.
const PER_CALL: i64 = 450;

fn open(path: &Path, busy: Duration) -> Kernel {
    let options = KernelOptions {
        config: config(),
        store: StoreOptions { durability: Durability::Normal, busy_timeout: busy, ..Default::default() },
        ..Default::default()
    };
    Kernel::open(path, options).unwrap()
}

fn call(k: &Kernel, token: &str) -> Result<(), Error> {
    let a = k.admit(token, &AdmitRequest::new(MODEL).input_tokens(1_000).max_output_tokens(500))?;
    k.mark_dispatched(&a.execution_id)?;
    k.commit(&a.execution_id, Usage::new(1_000, 500))?;
    Ok(())
}

#[test]
fn open_file_description_locks_are_in_force_on_linux() {
    let dir = tempfile::tempdir().unwrap();
    let _k = open(&dir.path().join("aex.db"), Duration::from_secs(5));
    assert_eq!(aex_core::store::ofd::active(), cfg!(target_os = "linux"));
}

/// Two kernels on one file in one process race one budget from four threads each, while a third
/// connection opens, reads, writes and closes the file again and again: exactly the calls the
/// budget holds are admitted, every one is on disk, and the audit is clean.
#[test]
fn two_kernels_in_one_process_share_a_budget_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aex.db");
    let first = open(&path, Duration::from_secs(10));
    let second = open(&path, Duration::from_secs(10));
    let k_calls = 120;
    let token = agent(&first, "atlas", k_calls * PER_CALL);
    let admitted = Arc::new(AtomicI64::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let browser = {
        let (path, done) = (path.clone(), done.clone());
        std::thread::spawn(move || {
            let mut opened = 0;
            while !done.load(Ordering::Relaxed) {
                let c = rusqlite::Connection::open(&path).unwrap();
                c.busy_timeout(Duration::from_secs(10)).unwrap();
                let _: i64 = c.query_row("SELECT count(*) FROM agents", [], |r| r.get(0)).unwrap();
                c.execute_batch("CREATE TABLE IF NOT EXISTS notebook (note TEXT); INSERT INTO notebook VALUES ('x');").unwrap();
                drop(c);
                opened += 1;
            }
            opened
        })
    };
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let k = if i % 2 == 0 { first.clone() } else { second.clone() };
            let (token, admitted) = (token.clone(), admitted.clone());
            std::thread::spawn(move || {
                loop {
                    match call(&k, &token) {
                        Ok(()) => admitted.fetch_add(1, Ordering::Relaxed),
                        Err(e) if e.status() == 402 => return,
                        Err(e) => panic!("{e}"),
                    };
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    assert!(browser.join().unwrap() > 0);
    assert_eq!(admitted.load(Ordering::Relaxed), k_calls);
    drop((first, second));
    let k = open(&path, Duration::from_secs(10));
    let atlas = k.agent("atlas").unwrap();
    assert_eq!((atlas.spent_micro, atlas.reserved_micro), (k_calls * PER_CALL, 0));
    assert_clean(&k);
}

/// A lock file held elsewhere (here: another open file description in this process, as another
/// process's would be) makes a write wait at most the store's timeout, then `Unavailable`; once
/// it is free, writes go on, and an abandoned wait does not keep the lock.
#[test]
fn a_held_write_lock_is_waited_for_at_most_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aex.db");
    let k = open(&path, Duration::from_millis(300));
    let lock = File::options().write(true).open(dir.path().join("aex.db.lock")).unwrap();
    lock.lock().unwrap();
    let started = Instant::now();
    let err = k.create_agent(&aex_core::AgentSpec::new("atlas", 1_000)).unwrap_err();
    let waited = started.elapsed();
    assert_eq!(err.status(), 503, "{err}");
    assert!(err.to_string().contains("write lock"), "{err}");
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(5), "waited {waited:?}");
    assert!(k.list_agents().unwrap().is_empty(), "nothing was written");

    // Freed: the abandoned wait is granted, finds nobody, and lets go at once.
    lock.unlock().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while lock.try_lock().is_err() {
        assert!(Instant::now() < deadline, "the abandoned waiter kept the lock");
        std::thread::sleep(Duration::from_millis(5));
    }
    lock.unlock().unwrap();
    let token = agent(&k, "atlas", 10 * PER_CALL);
    call(&k, &token).unwrap();

    // Held again, and freed while a writer waits: that writer gets it.
    lock.lock().unwrap();
    let writer = {
        let (k, token) = (k.clone(), token.clone());
        std::thread::spawn(move || call(&k, &token))
    };
    std::thread::sleep(Duration::from_millis(100));
    lock.unlock().unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(k.agent("atlas").unwrap().spent_micro, 2 * PER_CALL);
    assert_clean(&k);
}

#[cfg(unix)]
#[test]
fn the_store_files_are_created_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aex.db");
    let k = open(&path, Duration::from_secs(5));
    let token = agent(&k, "atlas", 10 * PER_CALL);
    call(&k, &token).unwrap();
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let file = format!("{}{suffix}", path.display());
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file} has mode {mode:o}");
    }
    assert!(k.warnings().is_empty(), "{:?}", k.warnings());
}

#[cfg(unix)]
#[test]
fn files_others_can_read_are_named_in_the_warnings_and_left_as_they_are() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aex.db");
    drop(open(&path, Duration::from_secs(5)));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let k = open(&path, Duration::from_secs(5));
    let warnings = k.warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("aex.db is readable or writable by other users (mode 0644)"), "{warnings:?}");
    assert!(warnings[1].contains("is writable by other users (mode 0777)"), "{warnings:?}");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644, "not silently changed");
}

/// What another copy of SQLite in this process would see: a classic POSIX `F_GETLK` on the
/// database and its shared memory reports aex's locks (it would not for classic locks of the
/// same process), so that copy can neither take the exclusive lock it needs to delete the WAL
/// nor believe it is the only user of the WAL index.
#[cfg(target_os = "linux")]
#[test]
fn a_classic_lock_query_in_this_process_sees_aex_locks() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aex.db");
    let k = open(&path, Duration::from_secs(5));
    let token = agent(&k, "atlas", 10 * PER_CALL);
    call(&k, &token).unwrap();
    let held = |file: &Path, start: i64, len: i64| {
        let f = File::options().read(true).write(true).open(file).unwrap();
        // SAFETY: a zeroed `flock` filled in below, on a descriptor this test owns.
        let mut q: libc::flock = unsafe { std::mem::zeroed() };
        q.l_type = libc::F_WRLCK as i16;
        q.l_whence = libc::SEEK_SET as i16;
        q.l_start = start;
        q.l_len = len;
        assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &raw mut q) }, 0);
        q.l_type != libc::F_UNLCK as i16
    };
    // SQLite's SHARED range of the database file, held by a WAL-mode connection while it is open.
    assert!(held(&path, 0x4000_0002, 510), "the database's shared lock is invisible to a classic query");
    // The shared-memory "dead man switch" byte, held (shared) by every connection to the WAL index.
    assert!(held(Path::new(&format!("{}-shm", path.display())), 128, 1), "the WAL index's lock is invisible");
    drop(k);
}

/// Reads do not queue behind a write that waits for another connection's lock (an operator's
/// `sqlite3` shell mid-transaction): they run on a connection of their own, as WAL readers that
/// never wait for writers. The write itself waits, then goes through once the lock is released.
#[test]
fn reads_answer_while_a_write_waits_for_an_outside_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aex.db");
    let k = file_kernel(&path);
    let token = agent(&k, "atlas", 1_000_000);
    let outside = rusqlite::Connection::open(&path).unwrap();
    outside.execute_batch("BEGIN IMMEDIATE; UPDATE agents SET rpm = rpm;").unwrap();
    let writer = {
        let k = k.clone();
        std::thread::spawn(move || k.admit(&token, &AdmitRequest::new(MODEL).input_tokens(10).max_output_tokens(10)))
    };
    std::thread::sleep(Duration::from_millis(300)); // the admission is waiting for the lock
    let started = Instant::now();
    let agent = k.agent("atlas").unwrap();
    k.head().unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "reads took {:?}", started.elapsed());
    assert_eq!(agent.reserved_micro, 0, "the waiting write is not visible yet");
    outside.execute_batch("ROLLBACK").unwrap();
    let admitted = writer.join().unwrap().unwrap();
    assert_eq!(k.agent("atlas").unwrap().reserved_micro, admitted.reserved_micro);
    assert_clean(&k);
}
