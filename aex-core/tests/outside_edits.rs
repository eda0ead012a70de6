//! Edits made to the database behind aex's back, under the keyed (HMAC) and the plain chain:
//! restricting edits are operator actions (obeyed, ledgered, audit clean); every edit that grants
//! power is refused by the kernel (503 `tampered`, naming the field) and named by the audit.
//! Part of the conformance suite: edits with the `sqlite3` shell to a file, or, when
//! `AEX_TEST_POSTGRES` names a server, with `psql` (a connection of its own) to a database.

mod common;

use aex_core::ledger::ChainHasher;
use aex_core::{
    AdmitRequest, AgentSpec, AuditRule, Durability, Error, Event, Kernel, KernelOptions, StoreOptions, TeamSpec, Usage,
};
use common::raw::{Raw, V};
use common::*;
use sha2::{Digest, Sha256};

const KEY: &[u8] = b"ledger-secret";

/// Runs `test` once without and once with a ledger key.
fn both(test: impl Fn(Option<&[u8]>)) {
    test(None);
    test(Some(KEY));
}

fn open(db: &str, key: Option<&[u8]>) -> aex_core::Result<Kernel> {
    let options = KernelOptions {
        config: config(),
        ledger_key: key.map(<[u8]>::to_vec),
        store: StoreOptions { durability: Durability::Normal, ..Default::default() },
        ..Default::default()
    };
    Kernel::open(db, options)
}

/// Another connection to the database, like the `sqlite3` shell or `psql`: no key, no aex.
fn shell(db: &str) -> Raw {
    Raw::open(db)
}

fn req() -> AdmitRequest {
    AdmitRequest::new(MODEL).input_tokens(1_000).max_output_tokens(500)
}

/// A kernel with agent `atlas` (models `mini` and `big`, rpm 100) that has spent something, and
/// its token.
fn with_activity(db: &str, key: Option<&[u8]>) -> (Kernel, String) {
    let k = open(db, key).unwrap();
    let mut spec = AgentSpec::new("atlas", 5_000_000);
    spec.allowed_models = vec![MODEL.into(), BIG_MODEL.into()];
    spec.rpm = Some(100);
    let token = k.create_agent(&spec).unwrap().token.expose().to_string();
    let a = k.admit(&token, &req()).unwrap();
    k.commit(&a.execution_id, Usage::new(900, 100)).unwrap();
    assert_clean(&k);
    (k, token)
}

/// The refusal: 503, reason `tampered`, naming `field`.
fn assert_tampered<T: std::fmt::Debug>(result: aex_core::Result<T>, field: &str) {
    match result {
        Err(e @ Error::Tampered { .. }) => {
            assert_eq!((e.status(), e.reason()), (503, "tampered"));
            let Error::Tampered { field: got, .. } = &e else { unreachable!() };
            assert_eq!(got, field, "{e}");
        }
        other => panic!("expected a refusal naming {field}, got {other:?}"),
    }
}

/// The audit's first failure: `rule`, naming `field` of `agent`.
fn assert_audit_names(k: &Kernel, rule: AuditRule, agent: &str, field: &str) {
    let f = k.audit(None).unwrap().failure.unwrap_or_else(|| panic!("audit missed the edit of {field}"));
    assert_eq!((f.rule, f.agent.as_deref(), f.field.as_deref()), (rule, Some(agent), Some(field)), "{f}");
}

fn events_of_kind(k: &Kernel, kind: &str) -> Vec<Event> {
    k.events(1, 100_000).unwrap().into_iter().filter(|e| e.kind == kind).collect()
}

fn data(e: &Event) -> serde_json::Value {
    serde_json::from_str(&e.data).unwrap()
}

// ---- tampering: every edit that grants power ---------------------------------------------------

#[test]
fn a_replaced_token_hash_is_refused_and_named() {
    both(|key| {
        let dir = tempfile::tempdir().unwrap();
        let path = shared_db(dir.path());
        let (k, token) = with_activity(&path, key);
        let mine = format!("aex_{}", "ab".repeat(24));
        let digest: [u8; 32] = Sha256::digest(mine.as_bytes()).into();
        shell(&path).execute("UPDATE agents SET token_hash = $1 WHERE name = 'atlas'", &[V::B(digest.to_vec())]).unwrap();
        let head = k.head().unwrap();
        assert_tampered(k.admit(&mine, &req()), "token_hash");
        assert_eq!(k.head().unwrap(), head, "nothing was written over the tampered row");
        assert_eq!(k.admit(&token, &req()).unwrap_err().status(), 401, "the real token no longer matches a row");
        assert_audit_names(&k, AuditRule::Policy, "atlas", "token_hash");
    });
}

#[test]
fn passthrough_turned_on_is_refused_and_named() {
    both(|key| {
        let dir = tempfile::tempdir().unwrap();
        let path = shared_db(dir.path());
        let (k, token) = with_activity(&path, key);
        shell(&path).execute("UPDATE agents SET allow_passthrough = TRUE WHERE name = 'atlas'", &[]).unwrap();
        let mut r = req();
        r.passthrough = true;
        assert_tampered(k.admit(&token, &r), "allow_passthrough");
        assert_audit_names(&k, AuditRule::Policy, "atlas", "allow_passthrough");
    });
}

#[test]
fn widened_models_are_refused_and_named() {
    both(|key| {
        let dir = tempfile::tempdir().unwrap();
        let path = shared_db(dir.path());
        let (k, token) = with_activity(&path, key);
        shell(&path).execute("UPDATE agents SET allowed_models = '[]' WHERE name = 'atlas'", &[]).unwrap();
        assert_tampered(k.admit(&token, &req()), "allowed_models");
        shell(&path).execute("UPDATE agents SET allowed_models = '[\"mini\",\"other\"]' WHERE name = 'atlas'", &[]).unwrap();
        assert_tampered(k.admit(&token, &req()), "allowed_models");
        assert_audit_names(&k, AuditRule::Policy, "atlas", "allowed_models");
    });
}

#[test]
fn a_budget_period_set_by_sql_is_never_renewed() {
    both(|key| {
        let dir = tempfile::tempdir().unwrap();
        let path = shared_db(dir.path());
        let (k, token) = with_activity(&path, key);
        let spent = k.agent("atlas").unwrap().spent_micro;
        shell(&path).execute("UPDATE agents SET budget_period = 'day', period_start_ms = 0 WHERE name = 'atlas'", &[]).unwrap();
        assert_tampered(k.admit(&token, &req()), "budget_period");
        let a = k.agent("atlas").unwrap();
        assert_eq!(a.spent_micro, spent, "spend was not reset");
        assert!(events_of_kind(&k, "agent.budget_renewed").is_empty(), "no renewal was written over it");
        assert_audit_names(&k, AuditRule::Policy, "atlas", "budget_period");
    });
}

#[test]
fn loosened_counters_and_reenabling_are_refused_and_named() {
    let cases: &[(&str, AuditRule, &str)] = &[
        ("UPDATE agents SET budget_micro = budget_micro + 1 WHERE name = 'atlas'", AuditRule::Counters, "budget_micro"),
        ("UPDATE agents SET spent_micro = spent_micro - 1 WHERE name = 'atlas'", AuditRule::Counters, "spent_micro"),
        ("UPDATE agents SET rpm = NULL WHERE name = 'atlas'", AuditRule::Policy, "rpm"),
        ("UPDATE agents SET expires_at_ms = 1 WHERE name = 'atlas'", AuditRule::Policy, "expires_at_ms"),
        ("UPDATE agents SET scope = 'read-only' WHERE name = 'atlas'", AuditRule::Policy, "scope"),
        ("UPDATE agents SET seal = NULL WHERE name = 'atlas'", AuditRule::Policy, "seal"),
        ("UPDATE agents SET seal = replace(seal, ',100,', ',1000,'), rpm = 1000 WHERE name = 'atlas'", AuditRule::Policy, "rpm"),
    ];
    both(|key| {
        for (sql, rule, field) in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = shared_db(dir.path());
            let (k, token) = with_activity(&path, key);
            assert_eq!(shell(&path).execute(sql, &[]).unwrap(), 1, "{sql}");
            // A forged seal fails its tag, so the kernel names the seal; the audit, replaying the
            // ledger, names the field.
            let refused = if sql.contains("SET seal =") { "seal" } else { field };
            assert_tampered(k.admit(&token, &req()), refused);
            assert_audit_names(&k, *rule, "atlas", field);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = shared_db(dir.path());
        let (k, token) = with_activity(&path, key);
        k.set_disabled("atlas", true).unwrap();
        shell(&path).execute("UPDATE agents SET disabled = FALSE WHERE name = 'atlas'", &[]).unwrap();
        assert_tampered(k.admit(&token, &req()), "disabled");
        assert_tampered(k.set_budget("atlas", 1), "disabled");
        assert_audit_names(&k, AuditRule::Policy, "atlas", "disabled");
    });
}

#[test]
fn a_team_raised_or_reassigned_by_sql_is_refused_and_named() {
    both(|key| {
        let dir = tempfile::tempdir().unwrap();
        let path = shared_db(dir.path());
        let k = open(&path, key).unwrap();
        k.create_team(&TeamSpec::new("ops", 1_000_000)).unwrap();
        let mut spec = AgentSpec::new("atlas", 5_000_000);
        spec.team = Some("ops".into());
        let token = k.create_agent(&spec).unwrap().token.expose().to_string();
        k.create_agent(&AgentSpec::new("beta", 5_000_000)).unwrap();
        k.admit(&token, &req()).unwrap();
        shell(&path).execute("UPDATE teams SET budget_micro = 2000000 WHERE name = 'ops'", &[]).unwrap();
        assert_tampered(k.admit(&token, &req()), "budget_micro");
        assert_audit_names(&k, AuditRule::Counters, "team:ops", "budget_micro");
        shell(&path).execute("UPDATE teams SET budget_micro = 1000000 WHERE name = 'ops'", &[]).unwrap();
        assert_clean(&k);
        shell(&path).execute("UPDATE agents SET team_id = NULL WHERE name = 'atlas'", &[]).unwrap();
        assert_tampered(k.admit(&token, &req()), "team");
        assert_audit_names(&k, AuditRule::Policy, "atlas", "team");
    });
}

#[test]
fn deleted_rate_windows_are_named_by_the_audit() {
    both(|key| {
        let dir = tempfile::tempdir().unwrap();
        let path = shared_db(dir.path());
        let k = open(&path, key).unwrap();
        let mut spec = AgentSpec::new("atlas", 5_000_000);
        spec.rpm = Some(2);
        let token = k.create_agent(&spec).unwrap().token.expose().to_string();
        let a = k.admit(&token, &req()).unwrap();
        k.commit(&a.execution_id, Usage::new(700, 50)).unwrap();
        let b = k.admit(&token, &req()).unwrap();
        k.release(&b.execution_id, "not needed").unwrap();
        assert_eq!(k.admit(&token, &req()).unwrap_err().status(), 429);
        assert_clean(&k);
        assert!(shell(&path).execute("DELETE FROM rate_buckets", &[]).unwrap() >= 1);
        let f = k.audit(None).unwrap().failure.expect("audit missed the deleted rate window");
        assert_eq!((f.rule, f.field.as_deref()), (AuditRule::RateWindow, Some("rate_buckets")), "{f}");
        assert!(f.message.contains("a:1"), "{f}");
    });
}

#[test]
fn edited_executions_are_named_by_the_audit() {
    both(|key| {
        let dir = tempfile::tempdir().unwrap();
        let path = shared_db(dir.path());
        let (k, token) = with_activity(&path, key);
        let open = k.admit(&token, &req()).unwrap();
        shell(&path).execute("UPDATE executions SET input_price = 0, output_price = 0 WHERE id = $1", &[V::T(open.execution_id.clone())]).unwrap();
        let f = k.audit(None).unwrap().failure.expect("audit missed the price edit");
        assert_eq!((f.rule, f.execution_id.as_deref()), (AuditRule::Execution, Some(open.execution_id.as_str())), "{f}");
    });
}

/// Lowers the first committed cost by 100 and rewrites the whole chain with plain SHA-256, as
/// someone without the key would, keeping the tables consistent with it.
fn downgrade_and_reforge(k: &Kernel, db: &str) {
    let plain = ChainHasher::new(None).unwrap();
    let events = k.events(1, 100_000).unwrap();
    let mut c = shell(db);
    c.drop_ledger_guards();
    c.execute("UPDATE meta SET value = 'sha256' WHERE key = 'ledger_mode'", &[]).unwrap();
    c.execute("UPDATE meta SET value = '' WHERE key = 'ledger_key_check'", &[]).unwrap();
    let mut prev = [0u8; 32];
    let mut edited = false;
    for mut e in events {
        if e.kind == "execution.committed" && !edited {
            edited = true;
            e.amount_micro -= 100;
            c.execute("UPDATE executions SET cost_micro = cost_micro - 100 WHERE id = $1", &[V::T(e.execution_id.clone().unwrap())]).unwrap();
            c.execute("UPDATE agents SET spent_micro = spent_micro - 100", &[]).unwrap();
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
    assert!(edited);
}

#[test]
fn a_ledger_mode_downgraded_to_sha256_is_refused_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = shared_db(dir.path());
    let (k, _) = with_activity(&path, Some(KEY));
    downgrade_and_reforge(&k, &path);
    drop(k);
    assert_tampered(open(&path, Some(KEY)), "ledger_mode");
    // The same refusal whenever a key is given and the stored mode is missing.
    shell(&path).execute("DELETE FROM meta WHERE key = 'ledger_mode'", &[]).unwrap();
    assert_tampered(open(&path, Some(KEY)), "ledger_mode");
}

// ---- operator actions: restricting edits are obeyed, ledgered, and the audit stays clean -------

/// A restricting edit: `sql`, then `request` is denied with `status` and `reason`, and the ledger
/// holds one `kind` event for `field`.
struct Edit<'a> {
    sql: &'a str,
    request: AdmitRequest,
    status: u16,
    reason: &'a str,
    kind: &'a str,
    field: &'a str,
}

/// Runs the edit's SQL through `run` (this process or another) while executions are open, then
/// checks that the next admission obeys it, the audit is clean, and the ledger holds one operator
/// edit of the field from the old value to the new.
fn operator_edit(key: Option<&[u8]>, edit: &Edit<'_>, run: impl Fn(&str, &str)) {
    let dir = tempfile::tempdir().unwrap();
    let path = shared_db(dir.path());
    let (k, token) = with_activity(&path, key);
    k.create_team(&TeamSpec::new("ops", 9_000_000)).unwrap();
    let mut spec = AgentSpec::new("crew", 5_000_000);
    spec.team = Some("ops".into());
    let crew = k.create_agent(&spec).unwrap().token.expose().to_string();
    let c = k.admit(&crew, &req()).unwrap();
    k.commit(&c.execution_id, Usage::new(900, 100)).unwrap();
    // One execution of each stays open while the row is edited.
    k.admit(&token, &req()).unwrap();
    k.admit(&crew, &req()).unwrap();
    let before: serde_json::Value = if edit.kind == "team.operator_edit" {
        serde_json::json!(k.team("ops").unwrap().budget_micro)
    } else {
        serde_json::Value::Null
    };
    run(&path, edit.sql);
    let who = if edit.kind == "team.operator_edit" { &crew } else { &token };
    let e = k.admit(who, &edit.request).unwrap_err();
    assert_eq!((e.status(), e.reason()), (edit.status, edit.reason), "{}: {e}", edit.sql);
    assert_clean(&k);
    let edits = events_of_kind(&k, edit.kind);
    assert_eq!(edits.len(), 1, "{}: {edits:?}", edit.sql);
    let d = data(&edits[0]);
    assert_eq!(d["field"], edit.field, "{d}");
    assert_ne!(d["old"], d["new"], "{d}");
    if !before.is_null() {
        assert_eq!(d["old"], before, "{d}");
    }
    // Obeyed from then on, with nothing more recorded.
    assert_eq!(k.admit(who, &edit.request).unwrap_err().status(), edit.status);
    assert_eq!(events_of_kind(&k, edit.kind).len(), 1);
    assert_clean(&k);
}

fn edits() -> Vec<Edit<'static>> {
    let plain = req;
    let edit = |sql, request, status, reason, field| Edit { sql, request, status, reason, kind: "agent.operator_edit", field };
    let mut tools = plain();
    tools.tools = true;
    let mut vision = plain();
    vision.vision = true;
    let mut streaming = plain();
    streaming.streaming = true;
    vec![
        edit("UPDATE agents SET budget_micro = spent_micro WHERE name = 'atlas'", plain(), 402, "budget_exceeded", "budget_micro"),
        edit("UPDATE agents SET disabled = TRUE WHERE name = 'atlas'", plain(), 401, "agent_disabled", "disabled"),
        edit("UPDATE agents SET rpm = 1 WHERE name = 'atlas'", plain(), 429, "agent_rpm", "rpm"),
        edit("UPDATE agents SET tpm = 10 WHERE name = 'atlas'", plain(), 403, "exceeds_rate_limit", "tpm"),
        edit("UPDATE agents SET max_concurrent = 1 WHERE name = 'atlas'", plain(), 429, "agent_concurrency", "max_concurrent"),
        edit(
            "UPDATE agents SET allowed_models = '[\"big\"]' WHERE name = 'atlas'",
            plain(),
            403,
            "model_not_allowed",
            "allowed_models",
        ),
        edit("UPDATE agents SET strict = TRUE WHERE name = 'atlas'", AdmitRequest::new(MODEL), 403, "strict_max_output_tokens", "strict"),
        edit("UPDATE agents SET allow_tools = FALSE WHERE name = 'atlas'", tools, 403, "tools_not_allowed", "allow_tools"),
        edit("UPDATE agents SET allow_streaming = FALSE WHERE name = 'atlas'", streaming, 403, "streaming_not_allowed", "allow_streaming"),
        edit("UPDATE agents SET allow_vision = FALSE WHERE name = 'atlas'", vision, 403, "vision_not_allowed", "allow_vision"),
        Edit {
            sql: "UPDATE teams SET budget_micro = spent_micro WHERE name = 'ops'",
            request: plain(),
            status: 402,
            reason: "team_budget_exceeded",
            kind: "team.operator_edit",
            field: "budget_micro",
        },
    ]
}

#[test]
fn restricting_edits_are_ledgered_obeyed_and_audit_clean() {
    both(|key| {
        for edit in edits() {
            operator_edit(key, &edit, |path, sql| assert_eq!(shell(path).execute(sql, &[]).unwrap(), 1, "{sql}"));
        }
    });
}

#[test]
fn live_severing_shows_in_the_audit_without_another_admission() {
    both(|key| {
        let dir = tempfile::tempdir().unwrap();
        let path = shared_db(dir.path());
        let (k, token) = with_activity(&path, key);
        let spent = k.agent("atlas").unwrap().spent_micro;
        shell(&path).execute("UPDATE agents SET budget_micro = spent_micro WHERE name = 'atlas'", &[]).unwrap();
        assert_clean(&k);
        let edits = events_of_kind(&k, "agent.operator_edit");
        assert_eq!(edits.len(), 1);
        assert_eq!(data(&edits[0]), serde_json::json!({"field": "budget_micro", "old": 5_000_000, "new": spent}));
        assert_eq!(k.admit(&token, &req()).unwrap_err().status(), 402);
        // Raising it again goes through aex, which ledgers it.
        k.set_budget("atlas", 5_000_000).unwrap();
        k.admit(&token, &req()).unwrap();
        assert_clean(&k);
    });
}

/// The child side of the cross-process test: runs `AEX_TEST_SQL` on `AEX_TEST_DB` with its own
/// connection, as the `sqlite3` shell or `psql` would.
#[test]
#[ignore = "run by severing_from_another_process"]
fn child_runs_sql() {
    let mut c = Raw::open(&child_env("AEX_TEST_DB"));
    let n = c.execute(&child_env("AEX_TEST_SQL"), &[]).unwrap();
    println!("{MARK}rows {n}");
}

#[test]
fn severing_from_another_process() {
    both(|key| {
        let edit = &edits()[0];
        operator_edit(key, edit, |path, sql| {
            let mut child = spawn_child("child_runs_sql", &[("AEX_TEST_DB", path), ("AEX_TEST_SQL", sql)]);
            let lines: Vec<String> = child_lines(&mut child).collect();
            assert!(child.wait().unwrap().success());
            assert_eq!(lines, ["rows 1"]);
        });
    });
}

/// Rewrites the ledger as a version before seals wrote it (no `token_sha256` in creations and
/// rotations) and re-chains it with `key`, as that version would have.
fn rewrite_as_before_seals(db: &str, key: Option<&[u8]>) {
    let hasher = ChainHasher::new(key).unwrap();
    let k = open(db, key).unwrap();
    let events = k.events(1, 100_000).unwrap();
    drop(k);
    let mut c = shell(db);
    c.drop_ledger_guards();
    let mut prev = [0u8; 32];
    for mut e in events {
        let mut d: serde_json::Value = serde_json::from_str(&e.data).unwrap();
        if let Some(map) = d.as_object_mut() {
            map.remove("token_sha256");
        }
        e.data = d.to_string();
        e.prev_hash = prev;
        e.hash = hasher.link(&prev, &e.canonical_bytes());
        prev = e.hash;
        c.execute(
            "UPDATE ledger SET data = $2, prev_hash = $3, hash = $4 WHERE seq = $1",
            &[V::I(e.seq as i64), V::T(e.data.clone()), V::B(e.prev_hash.to_vec()), V::B(e.hash.to_vec())],
        )
        .unwrap();
    }
}

#[test]
fn rows_written_before_seals_are_sealed_once_on_open() {
    both(|key| {
        let dir = tempfile::tempdir().unwrap();
        let path = shared_db(dir.path());
        let (k, token) = with_activity(&path, key);
        k.create_team(&TeamSpec::new("ops", 1_000)).unwrap();
        drop(k);
        // As a database from before seals: no seal columns filled, no mark, and a ledger written
        // as aex wrote it then (creations without a token digest), chained with the same hasher.
        let mut c = shell(&path);
        c.batch("UPDATE agents SET seal = NULL, seal_tag = NULL; UPDATE teams SET seal = NULL, seal_tag = NULL; DELETE FROM meta WHERE key = 'sealed';");
        rewrite_as_before_seals(&path, key);
        let k = open(&path, key).unwrap();
        assert_eq!(events_of_kind(&k, "agent.recorded").len(), 1);
        assert_eq!(events_of_kind(&k, "team.recorded").len(), 1);
        k.admit(&token, &req()).unwrap();
        assert_clean(&k);
        // Once sealed, a missing seal is tampering again.
        c.execute("UPDATE agents SET seal = NULL", &[]).unwrap();
        assert_tampered(k.admit(&token, &req()), "seal");
    });
}

/// An open execution's reservation inflated, or moved to another agent, by hand: releasing or
/// expiring it would hand the difference back as budget, so the kernel refuses to settle it and
/// no budget is exceeded.
#[test]
fn an_edited_open_execution_is_not_settled_into_free_budget() {
    both(|key| {
        let dir = tempfile::tempdir().unwrap();
        let path = shared_db(dir.path());
        let k = open(&path, key).unwrap();
        k.create_team(&TeamSpec { name: "pool".into(), budget_micro: 2_000, parent: None }).unwrap();
        let mut spec = AgentSpec::new("atlas", 1_000);
        spec.team = Some("pool".into());
        let token = k.create_agent(&spec).unwrap().token.expose().to_string();
        let other = agent(&k, "beta", 1_000);
        agent(&k, "gamma", 1_000);
        let small = || AdmitRequest::new(MODEL).input_tokens(1_000).max_output_tokens(500);
        let inflated = k.admit(&token, &small()).unwrap();
        shell(&path).execute("UPDATE executions SET reserved_micro = 1000000000 WHERE id = $1", &[V::T(inflated.execution_id.clone())]).unwrap();
        assert_tampered(k.release(&inflated.execution_id, "cancelled"), "reserved_micro");
        let moved = k.admit(&other, &small()).unwrap();
        shell(&path)
            .execute(
                "UPDATE executions SET agent_id = (SELECT id FROM agents WHERE name = 'gamma'), agent = 'gamma' WHERE id = $1",
                &[V::T(moved.execution_id.clone())],
            )
            .unwrap();
        // gamma holds nothing: the moved reservation would leave it below zero.
        k.commit(&inflated.execution_id, Usage::new(0, 0)).unwrap_err();
        assert_tampered(k.release(&moved.execution_id, "cancelled"), "reserved_micro");
        for name in ["atlas", "beta", "gamma"] {
            let a = k.agent(name).unwrap();
            assert!(a.reserved_micro >= 0 && a.spent_micro + a.reserved_micro <= a.budget_micro, "{a:?}");
        }
        let team = k.team("pool").unwrap();
        assert!(team.reserved_micro >= 0 && team.spent_micro + team.reserved_micro <= team.budget_micro, "{team:?}");
        assert!(!k.audit(None).unwrap().is_clean());
    });
}

/// Deleting the store's `sealed` mark (or a row's seal) does not turn a loosened row into a new
/// baseline: the row stays refused, and no keyed event is written over it.
#[test]
fn a_removed_seal_is_not_baselined_again() {
    both(|key| {
        let dir = tempfile::tempdir().unwrap();
        let path = shared_db(dir.path());
        let (k, token) = with_activity(&path, key);
        drop(k);
        shell(&path).batch("UPDATE agents SET budget_micro = 1000000000, seal = NULL, seal_tag = NULL; DELETE FROM meta WHERE key = 'sealed';");
        let k = open(&path, key).unwrap();
        assert!(events_of_kind(&k, "agent.recorded").is_empty(), "no baseline over a loosened row");
        assert_tampered(k.admit(&token, &req()), "seal");
        assert!(!k.audit(None).unwrap().is_clean());
    });
}

/// Limits edited out of range by hand reach the seal check instead of failing every read: below
/// zero is a restriction (recorded), above the range a loosening (refused); the rest of the
/// database, listing and the audit included, keeps working.
#[test]
fn limits_out_of_range_are_checked_not_fatal() {
    both(|key| {
        let dir = tempfile::tempdir().unwrap();
        let path = shared_db(dir.path());
        let (k, token) = with_activity(&path, key);
        let beta = agent(&k, "beta", 1_000_000);
        shell(&path).execute("UPDATE agents SET rpm = 1099511627776 WHERE name = 'atlas'", &[]).unwrap();
        assert_tampered(k.admit(&token, &req()), "rpm");
        k.admit(&beta, &req()).unwrap();
        assert!(k.audit(None).is_ok(), "the audit runs");
        shell(&path).execute("UPDATE agents SET rpm = -1, max_concurrent = -1 WHERE name = 'beta'", &[]).unwrap();
        let denied = k.admit(&beta, &req()).unwrap_err();
        assert!(denied.is_denial(), "a negative limit lets nothing through: {denied}");
        assert_eq!(k.list_agents().unwrap().len(), 2);
        let too_many: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
        shell(&path).execute("UPDATE agents SET allowed_models = $1 WHERE name = 'beta'", &[V::T(serde_json::to_string(&too_many).unwrap())]).unwrap();
        assert_tampered(k.admit(&beta, &req()), "allowed_models");
    });
}
