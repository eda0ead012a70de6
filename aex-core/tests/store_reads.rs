//! Inside one write transaction every read sees every write before it, whatever a store sends
//! late or fetches early (the PostgreSQL store queues writes until the next read and fetches
//! announced reads ahead): the `Tx` contract, through the public `Store` API. Part of the
//! conformance suite: run on SQLite, and on PostgreSQL when `AEX_TEST_POSTGRES` names a server.

mod common;

use std::sync::Arc;

use aex_core::store::{PgStore, Prefetch, SqliteStore, Store, StoreOptions};
use aex_core::{AdmitRequest, Kernel, Result};
use common::{agent, MODEL};

/// A kernel and a second handle on its database, with one agent holding one open execution:
/// `(kernel, store, agent id, execution id)`.
fn setup(dir: &tempfile::TempDir) -> (Kernel, Arc<dyn Store>, i64, String) {
    let db = common::shared_db(dir.path());
    let k = common::open_shared(&db);
    let token = agent(&k, "atlas", 10_000_000);
    let a = k.admit(&token, &AdmitRequest::new(MODEL).input_tokens(100).max_output_tokens(100)).unwrap();
    let store: Arc<dyn Store> = if db.starts_with("postgresql://") {
        Arc::new(PgStore::open(&db).unwrap())
    } else {
        Arc::new(SqliteStore::open(std::path::Path::new(&db), StoreOptions::default()).unwrap())
    };
    let id = k.agent("atlas").unwrap().id;
    (k, store, id, a.execution_id)
}

#[test]
fn reads_announced_ahead_still_see_the_writes_made_before_them() {
    let dir = tempfile::tempdir().unwrap();
    let (_k, store, agent_id, execution_id) = setup(&dir);
    store
        .write(&mut |tx| {
            tx.prefetch(&[Prefetch::Execution(&execution_id), Prefetch::AgentOfExecution(&execution_id)]);
            // Written before anything announced was sent or read.
            tx.update_counters(agent_id, 111, 222)?;
            let mut e = tx.execution(&execution_id)?.expect("the execution");
            e.reason = Some("changed in this transaction".into());
            tx.update_execution(&e)?;
            let a = tx.agent_by_id(agent_id)?.expect("the agent");
            assert_eq!((a.spent_micro, a.reserved_micro), (111, 222));
            let e = tx.execution(&execution_id)?.expect("the execution");
            assert_eq!(e.reason.as_deref(), Some("changed in this transaction"));
            Err(aex_core::Error::invalid("test", "roll back: the counters were only for reading"))
        })
        .unwrap_err();
}

#[test]
fn reads_after_reads_see_the_writes_between_them() {
    let dir = tempfile::tempdir().unwrap();
    let (k, store, agent_id, _) = setup(&dir);
    let head = k.head().unwrap().expect("a ledger");
    let result: Result<()> = store.write(&mut |tx| {
        // Read once (a store may keep it), then changed, then read again.
        let before = tx.agent_by_id(agent_id)?.expect("the agent");
        tx.update_counters(agent_id, before.spent_micro + 5, before.reserved_micro)?;
        assert_eq!(tx.agent_by_id(agent_id)?.unwrap().spent_micro, before.spent_micro + 5);
        let by_name = tx.agent_by_name("atlas")?.unwrap();
        assert_eq!(by_name.spent_micro, before.spent_micro + 5);
        // The ledger's head, read, then moved by an append in this transaction.
        assert_eq!(tx.ledger_head()?.as_ref(), Some(&head));
        let mut last = None;
        tx.for_each_event(head.seq, &mut |e| {
            last = Some(e);
            Ok(false)
        })?;
        let mut event = last.expect("the last event");
        event.seq = head.seq + 1;
        event.prev_hash = head.hash;
        event.hash = [7; 32];
        tx.append_event(&event)?;
        assert_eq!(tx.ledger_head()?.map(|h| (h.seq, h.hash)), Some((head.seq + 1, [7; 32])));
        Err(aex_core::Error::invalid("test", "roll back: the event is not a real one"))
    });
    assert!(result.is_err());
    // Rolled back: nothing of it stands.
    assert_eq!(k.head().unwrap().as_ref(), Some(&head));
}

/// What a write transaction whose closure went on past a failed statement returns is what the
/// store holds: committed with everything, or failed with nothing.
#[test]
fn a_closure_that_ignores_a_failed_statement_commits_nothing_it_is_not_told_of() {
    let dir = tempfile::tempdir().unwrap();
    let (_k, store, _, _) = setup(&dir);
    let result = store.write(&mut |tx| {
        tx.set_meta("first", "written")?;
        // PostgreSQL refuses a NUL byte in text (SQLite stores it); the error is ignored.
        let _ = tx.set_meta("second", "nul\0byte");
        let _ = tx.meta("second");
        Ok(())
    });
    let mut stored = None;
    store
        .read(&mut |tx| {
            stored = tx.meta("first")?;
            Ok(())
        })
        .unwrap();
    assert_eq!(stored.is_some(), result.is_ok(), "told {result:?}, stored {stored:?}");
    // Either way, the store goes on working.
    store.write(&mut |tx| tx.set_meta("after", "written")).unwrap();
}
