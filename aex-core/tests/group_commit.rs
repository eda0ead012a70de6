//! Group commit: concurrent writers of one store share transactions, yet each one's result,
//! failure and panic stay its own, and no increment is lost. Part of the conformance suite: run
//! on SQLite, and on PostgreSQL when `AEX_TEST_POSTGRES` names a server.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use aex_core::store::{PgStore, SqliteStore, Store, StoreOptions, Tx};
use aex_core::{Durability, Error, Result};

/// The store under test: a SQLite file in `dir`, or a new PostgreSQL database (which batches up
/// to its own limit). Opened again by [`reopen`].
fn store(dir: &tempfile::TempDir, max_batch: usize) -> Arc<dyn Store> {
    match std::env::var(common::POSTGRES) {
        Ok(admin) if !admin.is_empty() => {
            let url = common::new_postgres_db(&admin);
            std::fs::write(dir.path().join("url"), &url).unwrap();
            Arc::new(PgStore::open(&url).unwrap())
        }
        _ => sqlite(dir, max_batch),
    }
}

fn sqlite(dir: &tempfile::TempDir, max_batch: usize) -> Arc<dyn Store> {
    let options = StoreOptions { durability: Durability::Full, max_batch, ..StoreOptions::default() };
    Arc::new(SqliteStore::open(&dir.path().join("g.db"), options).unwrap())
}

/// The same database as [`store`] made, opened again.
fn reopen(dir: &tempfile::TempDir) -> Arc<dyn Store> {
    match std::fs::read_to_string(dir.path().join("url")) {
        Ok(url) => Arc::new(PgStore::open(&url).unwrap()),
        Err(_) => sqlite(dir, 64),
    }
}

fn meta(store: &dyn Store, key: &str) -> Option<String> {
    let mut out = None;
    store
        .read(&mut |tx| {
            out = tx.meta(key)?;
            Ok(())
        })
        .unwrap();
    out
}

fn increment(tx: &mut dyn Tx) -> Result<()> {
    let n: u64 = tx.meta("counter")?.map_or(0, |v| v.parse().unwrap());
    tx.set_meta("counter", &(n + 1).to_string())
}

#[test]
fn concurrent_increments_are_serial_and_share_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir, 64);
    std::thread::scope(|s| {
        for _ in 0..8 {
            let store = &store;
            s.spawn(move || {
                for _ in 0..100 {
                    store.write(&mut increment).unwrap();
                }
            });
        }
    });
    assert_eq!(meta(&*store, "counter").as_deref(), Some("800"));
    let stats = store.write_stats();
    // The migration ran outside the queue; every increment is counted once.
    assert_eq!(stats.writes, 800);
    assert!(stats.transactions < stats.writes, "no transaction was shared: {stats:?}");

    // Reopened from the file, the count is the same: every write was committed.
    drop(store);
    let again = reopen(&dir);
    assert_eq!(meta(&*again, "counter").as_deref(), Some("800"));
}

/// Holds the leader's role for a while so that the writers started meanwhile queue up and run
/// as one batch, in whatever order they queued.
fn batch_behind_a_slow_writer(store: &dyn Store, writers: Vec<Box<dyn FnOnce() + Send + '_>>) {
    let started = Barrier::new(2);
    std::thread::scope(|s| {
        s.spawn(|| {
            store
                .write(&mut |tx| {
                    started.wait();
                    std::thread::sleep(Duration::from_millis(300));
                    tx.set_meta("slow", "done")
                })
                .unwrap();
        });
        started.wait();
        for w in writers {
            s.spawn(w);
        }
    });
}

#[test]
fn a_failing_writer_in_a_shared_transaction_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir, 64);
    let before = store.write_stats();
    let writers: Vec<Box<dyn FnOnce() + Send + '_>> = (0..6)
        .map(|i| {
            let store = &store;
            Box::new(move || {
                let result = store.write(&mut |tx| {
                    tx.set_meta(&format!("key{i}"), "written")?;
                    if i % 2 == 1 {
                        Err(Error::invalid("key", "odd writers fail after writing"))
                    } else {
                        Ok(())
                    }
                });
                match result {
                    Ok(()) => assert_eq!(i % 2, 0),
                    Err(e) => assert!(i % 2 == 1 && e.to_string().contains("odd writers fail"), "{e}"),
                }
            }) as Box<dyn FnOnce() + Send + '_>
        })
        .collect();
    batch_behind_a_slow_writer(&*store, writers);
    for i in 0..6 {
        let expected = (i % 2 == 0).then(|| "written".to_string());
        assert_eq!(meta(&*store, &format!("key{i}")), expected, "key{i}");
    }
    assert_eq!(meta(&*store, "slow").as_deref(), Some("done"));
    let stats = store.write_stats();
    assert_eq!(stats.writes - before.writes, 7);
    assert!(stats.largest_batch >= 2, "the queued writers did not share a transaction: {stats:?}");
}

#[test]
fn a_panicking_writer_gets_its_panic_and_the_others_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir, 64);
    let writers: Vec<Box<dyn FnOnce() + Send + '_>> = vec![
        Box::new(|| {
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                store.write(&mut |tx| {
                    tx.set_meta("panicked", "written")?;
                    panic!("a bug in a writer");
                })
            }));
            let payload = caught.expect_err("the panic reaches its own writer");
            assert_eq!(payload.downcast_ref::<&str>(), Some(&"a bug in a writer"));
        }),
        Box::new(|| store.write(&mut |tx| tx.set_meta("kept", "written")).unwrap()),
        Box::new(|| store.write(&mut increment).unwrap()),
    ];
    batch_behind_a_slow_writer(&*store, writers);
    assert_eq!(meta(&*store, "panicked"), None);
    assert_eq!(meta(&*store, "kept").as_deref(), Some("written"));
    assert_eq!(meta(&*store, "counter").as_deref(), Some("1"));
    // The store still works afterwards.
    store.write(&mut increment).unwrap();
    assert_eq!(meta(&*store, "counter").as_deref(), Some("2"));
}

/// A SQLite option: every run tests it on SQLite.
#[test]
fn max_batch_one_gives_every_write_its_own_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir, 1);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| (0..50).for_each(|_| store.write(&mut increment).unwrap()));
        }
    });
    assert_eq!(meta(&*store, "counter").as_deref(), Some("200"));
    let stats = store.write_stats();
    assert_eq!((stats.writes, stats.transactions, stats.largest_batch), (200, 200, 1));
}

#[test]
fn a_kernel_reports_its_writes_and_shares_transactions_between_threads() {
    use aex_core::{AdmitRequest, AgentSpec, Kernel, KernelOptions, Usage};
    let dir = tempfile::tempdir().unwrap();
    let options = KernelOptions {
        config: aex_core::Config::new()
            .with_model("m", aex_core::ModelSpec::priced(aex_core::Prices::from_usd("1", "1").unwrap(), 100))
            .unwrap(),
        store: StoreOptions { durability: Durability::Full, ..StoreOptions::default() },
        ..KernelOptions::default()
    };
    let k = match std::env::var(common::POSTGRES) {
        Ok(admin) if !admin.is_empty() => Kernel::open(common::new_postgres_db(&admin), options).unwrap(),
        _ => Kernel::open(dir.path().join("k.db"), options).unwrap(),
    };
    let tokens: Vec<String> =
        (0..8).map(|i| k.create_agent(&AgentSpec::new(format!("a{i}"), 1_000_000_000)).unwrap().token.expose().to_string()).collect();
    let before = k.write_stats();
    let req = AdmitRequest::new("m").input_tokens(10).max_output_tokens(10);
    std::thread::scope(|s| {
        for token in &tokens {
            let (k, req) = (&k, &req);
            s.spawn(move || {
                for _ in 0..25 {
                    let a = k.admit(token, req).unwrap();
                    k.commit(&a.execution_id, Usage::new(10, 5)).unwrap();
                }
            });
        }
    });
    let after = k.write_stats();
    assert_eq!(after.writes - before.writes, 8 * 25 * 2, "one write per admission and per settlement");
    assert!(after.transactions - before.transactions < after.writes - before.writes, "no transaction was shared: {after:?}");
    for i in 0..8 {
        let a = k.agent(&format!("a{i}")).unwrap();
        assert_eq!((a.spent_micro, a.reserved_micro), (25 * 15, 0));
    }
    let report = k.audit(None).unwrap();
    assert!(report.is_clean(), "{:?}", report.failure);
}

/// A write the store itself refuses (here PostgreSQL refusing a NUL byte in text, which SQLite
/// stores) may come to light only after later writers of the same batch ran: whatever each
/// writer is told must be true of the database afterwards — no writer told "committed" whose
/// change is gone, none told "failed" whose change stands.
#[test]
fn what_each_writer_of_a_batch_is_told_is_what_the_store_holds() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir, 64);
    let told: Vec<std::sync::Mutex<Option<bool>>> = (0..5).map(|_| std::sync::Mutex::new(None)).collect();
    let writers: Vec<Box<dyn FnOnce() + Send + '_>> = (0..5)
        .map(|i| {
            let (store, told) = (&store, &told);
            Box::new(move || {
                let value = if i == 2 { "bad\0value" } else { "written" };
                let result = store.write(&mut |tx| {
                    increment(tx)?;
                    tx.set_meta(&format!("key{i}"), value)
                });
                if let Err(e) = &result {
                    // A writer whose own change was fine is told plainly why it was undone.
                    assert!(!e.to_string().contains("savepoint") && !e.to_string().contains("aborted"), "{e}");
                }
                *told[i].lock().unwrap() = Some(result.is_ok());
            }) as Box<dyn FnOnce() + Send + '_>
        })
        .collect();
    batch_behind_a_slow_writer(&*store, writers);
    let mut committed = 1; // the slow writer's
    for (i, told) in told.iter().enumerate() {
        let ok = told.lock().unwrap().expect("every writer returned");
        let stored = meta(&*store, &format!("key{i}"));
        assert_eq!(stored.is_some(), ok, "key{i}: told {ok}, stored {stored:?}");
        committed += usize::from(ok);
    }
    // Each committed writer's increment counted once, and no failed one's.
    assert_eq!(meta(&*store, "counter"), Some((committed - 1).to_string()).filter(|c| c != "0"));
    assert_eq!(meta(&*store, "slow").as_deref(), Some("done"));
    // The store goes on working.
    store.write(&mut |tx| tx.set_meta("after", "written")).unwrap();
    assert_eq!(meta(&*store, "after").as_deref(), Some("written"));
}
