//! Tamper tests: every edit to the ledger or the counters is reported precisely by `audit`.
//! Part of the conformance suite: on a SQLite file, or a PostgreSQL database when
//! `AEX_TEST_POSTGRES` names a server (edited through a connection of the attacker's own).

mod common;

use aex_core::ledger::ChainHasher;
use aex_core::{AdmitRequest, AuditRule, Kernel, KernelOptions, Usage};
use common::raw::{Raw, V};
use common::*;

/// A new database for one history: a file in `dir`, or a database on the test server.
fn new_db(dir: &tempfile::TempDir) -> String {
    shared_db(dir.path())
}

/// Builds a known history and returns the kernel. Events:
/// 1 config loaded, 2 created atlas, 3 created beta, 4 reserved e1, 5 dispatched e1,
/// 6 committed e1, 7 reserved e2, 8 released e2, 9 denied.
fn history(db: &str, key: Option<&[u8]>) -> Kernel {
    let options = KernelOptions { config: config(), ledger_key: key.map(<[u8]>::to_vec), ..Default::default() };
    let k = Kernel::open(db, options).unwrap();
    let atlas = agent(&k, "atlas", 1_000_000);
    let beta = agent(&k, "beta", 500);
    let req = || AdmitRequest::new(MODEL).input_tokens(1_000).max_output_tokens(500);
    k.admit(&atlas, &req().execution_id("e1")).unwrap();
    k.mark_dispatched("e1").unwrap();
    k.commit("e1", Usage::new(900, 100)).unwrap();
    k.admit(&beta, &req().execution_id("e2")).unwrap();
    k.release("e2", "cancelled").unwrap();
    assert_eq!(k.admit(&beta, &req().max_output_tokens(1_000).execution_id("e3")).unwrap_err().status(), 402);
    assert_eq!(k.head().unwrap().unwrap().seq, 9);
    assert_clean(&k);
    k
}

/// An attacker with the file, or the server's password: the append-only triggers are no obstacle.
fn attacker(db: &str) -> Raw {
    let mut c = Raw::open(db);
    c.drop_ledger_guards();
    c
}

fn expect(k: &Kernel, rule: AuditRule, seq: Option<u64>) -> aex_core::AuditFailure {
    let failure = k.audit(None).unwrap().failure.unwrap_or_else(|| panic!("audit missed a {rule:?} tamper"));
    assert_eq!((failure.rule, failure.seq), (rule, seq), "{failure}");
    failure
}

fn flip(blob: Vec<u8>) -> Vec<u8> {
    let mut b = blob;
    b[7] ^= 0x01;
    b
}

#[test]
fn the_ledger_refuses_updates_and_deletes_through_sql() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_db(&dir);
    let _k = history(&path, None);
    let mut c = Raw::open(&path);
    assert!(c.execute("UPDATE ledger SET amount_micro = 0 WHERE seq = 6", &[]).is_err());
    assert!(c.execute("DELETE FROM ledger WHERE seq = 9", &[]).is_err());
}

#[test]
fn one_changed_byte_in_any_field_is_found_at_its_seq() {
    let edits: &[(&str, &str, AuditRule)] = &[
        ("ts_ms", "UPDATE ledger SET ts_ms = ts_ms + 1 WHERE seq = 6", AuditRule::Hash),
        ("kind", "UPDATE ledger SET kind = 'execution.commitTed' WHERE seq = 6", AuditRule::Hash),
        ("agent", "UPDATE ledger SET agent = 'atlaS' WHERE seq = 6", AuditRule::Hash),
        ("execution_id", "UPDATE ledger SET execution_id = 'e9' WHERE seq = 6", AuditRule::Hash),
        ("amount", "UPDATE ledger SET amount_micro = amount_micro - 1 WHERE seq = 6", AuditRule::Hash),
        ("data", "UPDATE ledger SET data = replace(data, '900', '901') WHERE seq = 6", AuditRule::Hash),
    ];
    for (field, sql, rule) in edits {
        let dir = tempfile::tempdir().unwrap();
        let path = new_db(&dir);
        let k = history(&path, None);
        assert_eq!(attacker(&path).execute(sql, &[]).unwrap(), 1, "{field}");
        let f = expect(&k, *rule, Some(6));
        assert!(f.message.contains("hash"), "{field}: {f}");
    }
    for (column, rule) in [("prev_hash", AuditRule::Link), ("hash", AuditRule::Hash)] {
        let dir = tempfile::tempdir().unwrap();
        let path = new_db(&dir);
        let k = history(&path, None);
        let mut c = attacker(&path);
        let blob = c.blob(&format!("SELECT {column} FROM ledger WHERE seq = 6"));
        c.execute(&format!("UPDATE ledger SET {column} = $1 WHERE seq = 6"), &[V::B(flip(blob))]).unwrap();
        expect(&k, rule, Some(6));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = new_db(&dir);
    let k = history(&path, None);
    attacker(&path).execute("UPDATE ledger SET seq = 1006 WHERE seq = 6", &[]).unwrap();
    let f = expect(&k, AuditRule::Sequence, Some(6));
    assert!(f.message.contains("event 6 is missing"), "{f}");
}

#[test]
fn a_deleted_event_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_db(&dir);
    let k = history(&path, None);
    attacker(&path).execute("DELETE FROM ledger WHERE seq = 5", &[]).unwrap();
    expect(&k, AuditRule::Sequence, Some(5));
}

#[test]
fn swapped_events_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_db(&dir);
    let k = history(&path, None);
    attacker(&path)
        .batch("UPDATE ledger SET seq = -7 WHERE seq = 7; UPDATE ledger SET seq = 7 WHERE seq = 8; UPDATE ledger SET seq = 8 WHERE seq = -7;");
    expect(&k, AuditRule::Link, Some(7));
}

#[test]
fn removing_the_newest_event_is_found_by_an_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_db(&dir);
    let k = history(&path, None);
    let anchor = k.head().unwrap().unwrap();
    assert!(k.audit(Some(&anchor)).unwrap().is_clean());
    attacker(&path).execute("DELETE FROM ledger WHERE seq = 9", &[]).unwrap();
    assert!(k.audit(None).unwrap().is_clean(), "a denial moved no money: only the anchor can tell");
    let f = k.audit(Some(&anchor)).unwrap().failure.unwrap();
    assert_eq!((f.rule, f.seq), (AuditRule::Anchor, Some(9)), "{f}");
}

#[test]
fn edited_counters_are_found_with_the_agent_named() {
    let cases: &[(&str, AuditRule, &str)] = &[
        ("UPDATE agents SET spent_micro = spent_micro - 1 WHERE name = 'atlas'", AuditRule::Counters, "atlas"),
        ("UPDATE agents SET budget_micro = 1000 WHERE name = 'beta'", AuditRule::Counters, "beta"),
        ("UPDATE agents SET reserved_micro = 7 WHERE name = 'beta'", AuditRule::Counters, "beta"),
        ("UPDATE executions SET cost_micro = 1 WHERE id = 'e1'", AuditRule::Execution, "atlas"),
        ("UPDATE executions SET state = 'RESERVED' WHERE id = 'e2'", AuditRule::Execution, "beta"),
    ];
    for (sql, rule, name) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = new_db(&dir);
        let k = history(&path, None);
        attacker(&path).execute(sql, &[]).unwrap();
        let f = expect(&k, *rule, None);
        assert_eq!(f.agent.as_deref(), Some(*name), "{sql}: {f}");
    }
}

#[test]
fn a_second_terminal_event_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_db(&dir);
    let k = history(&path, None);
    // Forge a well-chained extra release of e2 at the head: the chain holds, the rule does not.
    let head = k.head().unwrap().unwrap();
    let mut forged = k.events(8, 1).unwrap().remove(0);
    forged.seq = head.seq + 1;
    forged.prev_hash = head.hash;
    forged.hash = ChainHasher::new(None).unwrap().link(&head.hash, &forged.canonical_bytes());
    attacker(&path)
        .execute(
            "INSERT INTO ledger (seq, ts_ms, kind, agent, execution_id, amount_micro, data, prev_hash, hash) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
            &[
                V::I(forged.seq as i64),
                V::I(forged.ts_ms),
                V::T(forged.kind),
                V::T(forged.agent.unwrap()),
                V::T(forged.execution_id.unwrap()),
                V::I(forged.amount_micro),
                V::T(forged.data),
                V::B(forged.prev_hash.to_vec()),
                V::B(forged.hash.to_vec()),
            ],
        )
        .unwrap();
    let f = expect(&k, AuditRule::OneTerminal, Some(10));
    assert_eq!(f.execution_id.as_deref(), Some("e2"));
}

/// Rewrites every event from `from` on with a plain SHA-256 chain, as an attacker without the key
/// would, after changing event `edit_seq`'s amount.
fn reforge_with_sha256(k: &Kernel, db: &str, edit_seq: u64) {
    let plain = ChainHasher::new(None).unwrap();
    let mut c = attacker(db);
    let mut prev = [0u8; 32];
    for mut e in k.events(1, 1_000).unwrap() {
        if e.seq == edit_seq {
            e.amount_micro -= 100;
        }
        e.prev_hash = prev;
        e.hash = plain.link(&prev, &e.canonical_bytes());
        prev = e.hash;
        c.execute(
            "UPDATE ledger SET amount_micro = $2, prev_hash = $3, hash = $4 WHERE seq = $1",
            &[V::I(e.seq as i64), V::I(e.amount_micro), V::B(e.prev_hash.to_vec()), V::B(e.hash.to_vec())],
        )
        .unwrap();
    }
}

#[test]
fn a_recomputed_sha256_chain_is_caught_under_an_hmac_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_db(&dir);
    let k = history(&path, Some(b"ledger-secret"));
    reforge_with_sha256(&k, &path, 6);
    expect(&k, AuditRule::Hash, Some(1));
}

#[test]
fn without_a_key_a_recomputed_chain_still_fails_replay() {
    let dir = tempfile::tempdir().unwrap();
    let path = new_db(&dir);
    let k = history(&path, None);
    reforge_with_sha256(&k, &path, 6);
    // The lowered commit no longer matches its usage at the prices its reservation froze.
    let f = expect(&k, AuditRule::Event, Some(6));
    assert_eq!(f.execution_id.as_deref(), Some("e1"));
    assert!(f.message.contains("at the prices reserved"), "{f}");
}
