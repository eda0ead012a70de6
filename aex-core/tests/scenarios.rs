//! Scenario tests through the public API: every operation, every denial, every status.

mod common;

use aex_core::{
    AdmitRequest, AgentSpec, AuthFailure, Capabilities, ConflictReason, Error, EventKind, ExecutionState, Kernel,
    KernelOptions, Message, PolicyRule, Scope, Usage,
};
use common::*;

fn req() -> AdmitRequest {
    AdmitRequest::new(MODEL).input_tokens(1_000).max_output_tokens(500)
}

fn last_event(k: &Kernel) -> aex_core::Event {
    let head = k.head().unwrap().unwrap();
    k.events(head.seq, 1).unwrap().remove(0)
}

#[test]
fn admit_then_commit_charges_the_real_cost_and_returns_the_rest() {
    let (k, _) = kernel();
    let token = agent(&k, "atlas", 10_000);
    let a = k.admit(&token, &req()).unwrap();
    assert_eq!(a.reserved_micro, 150 + 300);
    assert_eq!((a.input_tokens, a.max_output_tokens, a.state, a.replayed), (1_000, 500, ExecutionState::Reserved, false));
    let agent = k.agent("atlas").unwrap();
    assert_eq!((agent.spent_micro, agent.reserved_micro), (0, 450));

    k.mark_dispatched(&a.execution_id).unwrap();
    let s = k.commit(&a.execution_id, Usage::new(1_000, 200)).unwrap();
    assert_eq!((s.cost_micro, s.released_micro, s.overrun_micro, s.replayed), (270, 180, 0, false));
    assert_eq!(s.state, ExecutionState::Committed);
    let agent = k.agent("atlas").unwrap();
    assert_eq!((agent.spent_micro, agent.reserved_micro, agent.remaining_micro()), (270, 0, 10_000 - 270));
    let kinds: Vec<String> = k.events(1, 100).unwrap().into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, ["config.loaded", "agent.created", "execution.reserved", "execution.dispatched", "execution.committed"]);
    assert_clean(&k);
}

#[test]
fn cached_input_is_priced_at_its_own_rate() {
    let (k, _) = kernel();
    let token = agent(&k, "atlas", 1_000_000);
    let a = k.admit(&token, &AdmitRequest::new(BIG_MODEL).input_tokens(10_000).max_output_tokens(100)).unwrap();
    assert_eq!(a.reserved_micro, 30_000 + 1_500);
    let s = k.commit(&a.execution_id, Usage { input_tokens: 10_000, output_tokens: 100, cached_input_tokens: 8_000 }).unwrap();
    assert_eq!(s.cost_micro, 6_000 + 2_400 + 1_500);
    assert_clean(&k);
}

#[test]
fn output_cap_defaults_to_the_model_and_is_clamped_to_it() {
    let (k, _) = kernel();
    let token = agent(&k, "atlas", 1_000_000);
    let a = k.admit(&token, &AdmitRequest::new(MODEL).input_tokens(0)).unwrap();
    assert_eq!((a.max_output_tokens, a.reserved_micro), (1_000, 600));
    let b = k.admit(&token, &AdmitRequest::new(MODEL).input_tokens(0).max_output_tokens(50_000)).unwrap();
    assert_eq!(b.max_output_tokens, 1_000);
}

#[test]
fn input_tokens_are_counted_from_messages_when_not_given() {
    let (k, _) = kernel();
    let token = agent(&k, "atlas", 1_000_000);
    let mut r = AdmitRequest::new(MODEL).max_output_tokens(10);
    r.messages = vec![Message::new("system", "be brief"), Message::new("user", "hello there")];
    let a = k.admit(&token, &r).unwrap();
    assert_eq!(a.input_tokens, (6 + 8) + (4 + 11) + 2 * 4 + 3);
}

#[test]
fn insufficient_budget_is_denied_with_amounts_recorded_and_nothing_reserved() {
    let (k, _) = kernel();
    let token = agent(&k, "atlas", 449);
    let before = k.agent("atlas").unwrap();
    let e = k.admit(&token, &req()).unwrap_err();
    assert_eq!((e.status(), e.reason()), (402, "budget_exceeded"));
    assert_eq!(e, Error::InsufficientBudget { agent: "atlas".into(), team: None, needed_micro: 450, remaining_micro: 449 });
    assert!(e.to_string().contains("needed 0.00045 USD, remaining 0.000449 USD"), "{e}");
    assert_eq!(k.agent("atlas").unwrap(), before);
    let ev = last_event(&k);
    assert_eq!((ev.kind.as_str(), ev.amount_micro), (EventKind::Denied.as_str(), 450));
    assert!(ev.data.contains("\"reason\":\"budget_exceeded\""), "{}", ev.data);
    // A budget that fits exactly is admitted.
    k.set_budget("atlas", 450).unwrap();
    k.admit(&token, &req()).unwrap();
    assert_clean(&k);
}

#[test]
fn authentication_denials() {
    let (k, clock) = kernel();
    let created = k
        .create_agent(&AgentSpec { ttl_ms: Some(60_000), ..AgentSpec::new("atlas", 1_000_000) })
        .unwrap();
    let token = created.token.expose();
    assert_eq!(created.agent.expires_at_ms, Some(T0 + 60_000));

    let unknown = format!("aex_{}", "0".repeat(48));
    let e = k.admit(&unknown, &req()).unwrap_err();
    assert_eq!(e, Error::Unauthenticated { reason: AuthFailure::UnknownToken });
    assert_eq!(e.status(), 401);
    let ev = last_event(&k);
    assert_eq!((ev.kind.as_str(), ev.agent.as_deref()), ("admission.denied", None));
    assert!(k.admit("not-a-token", &req()).is_err_and(|e| e.reason() == "unknown_token"));

    k.set_disabled("atlas", true).unwrap();
    assert_eq!(k.admit(token, &req()).unwrap_err().reason(), "agent_disabled");
    k.set_disabled("atlas", false).unwrap();
    k.admit(token, &req()).unwrap();

    clock.advance(60_000);
    let e = k.admit(token, &req()).unwrap_err();
    assert_eq!(e, Error::Unauthenticated { reason: AuthFailure::TokenExpired });
    assert_eq!(k.agent("atlas").unwrap().reserved_micro, 450, "the denial reserved nothing");
    assert_clean(&k);
}

#[test]
fn read_only_scope_cannot_execute() {
    let (k, _) = kernel();
    let spec = AgentSpec { scope: Scope::ReadOnly, ..AgentSpec::new("viewer", 1_000_000) };
    let token = k.create_agent(&spec).unwrap().token;
    let e = k.admit(token.expose(), &req()).unwrap_err();
    assert_eq!((e.status(), e.reason()), (403, "scope_read_only"));
    assert_eq!(k.agent("viewer").unwrap().reserved_micro, 0);
}

#[test]
fn policy_denials_name_the_rule() {
    let (k, _) = kernel();
    let spec = AgentSpec {
        allowed_models: vec![MODEL.into()],
        capabilities: Capabilities { tools: false, streaming: false, vision: false },
        strict: true,
        ..AgentSpec::new("atlas", 1_000_000)
    };
    let token = k.create_agent(&spec).unwrap().token.expose().to_string();
    let cases: Vec<(AdmitRequest, PolicyRule)> = vec![
        (AdmitRequest::new("unknown-model").input_tokens(1).max_output_tokens(1), PolicyRule::ModelNotConfigured),
        (AdmitRequest::new(BIG_MODEL).input_tokens(1).max_output_tokens(1), PolicyRule::ModelNotAllowed),
        (AdmitRequest { tools: true, ..req() }, PolicyRule::ToolsNotAllowed),
        (AdmitRequest { streaming: true, ..req() }, PolicyRule::StreamingNotAllowed),
        (AdmitRequest { vision: true, ..req() }, PolicyRule::VisionNotAllowed),
        (AdmitRequest::new(MODEL).input_tokens(1), PolicyRule::StrictMaxOutputTokens),
    ];
    for (r, rule) in cases {
        match k.admit(&token, &r) {
            Err(Error::PolicyDenied { reason, message }) => {
                assert_eq!(reason, rule);
                assert!(message.contains("atlas") || message.contains("unknown-model"), "{message}");
            }
            other => panic!("{rule:?}: {other:?}"),
        }
        assert_eq!(last_event(&k).kind, "admission.denied");
    }
    assert_eq!(k.agent("atlas").unwrap().reserved_micro, 0);
    k.admit(&token, &req()).unwrap();
    assert_clean(&k);
}

#[test]
fn idempotent_replay_reserves_once_and_conflicts_on_a_different_request() {
    let (k, _) = kernel();
    let token = agent(&k, "atlas", 1_000_000);
    let other = agent(&k, "other", 1_000_000);
    let a = k.admit(&token, &req().execution_id("job-1")).unwrap();
    let b = k.admit(&token, &req().execution_id("job-1")).unwrap();
    assert!(!a.replayed && b.replayed);
    assert_eq!(b.reserved_micro, a.reserved_micro);
    assert_eq!(k.agent("atlas").unwrap().reserved_micro, 450);

    let e = k.admit(&token, &req().execution_id("job-1").max_output_tokens(501)).unwrap_err();
    assert_eq!((e.status(), e.reason()), (409, "idempotency_conflict"));
    let e = k.admit(&other, &req().execution_id("job-1")).unwrap_err();
    assert_eq!(e.reason(), "idempotency_conflict");

    k.commit("job-1", Usage::new(1_000, 10)).unwrap();
    let c = k.admit(&token, &req().execution_id("job-1")).unwrap();
    assert!(c.replayed);
    assert_eq!(c.state, ExecutionState::Committed);
    assert_eq!(k.agent("atlas").unwrap().spent_micro, 156);
    assert_clean(&k);
}

#[test]
fn a_denied_execution_id_may_be_retried() {
    let (k, _) = kernel();
    let token = agent(&k, "atlas", 100);
    assert_eq!(k.admit(&token, &req().execution_id("retry-me")).unwrap_err().status(), 402);
    k.add_budget("atlas", 1_000).unwrap();
    let a = k.admit(&token, &req().execution_id("retry-me")).unwrap();
    assert!(!a.replayed);
    assert_clean(&k);
}

#[test]
fn terminal_calls_happen_once_and_repeat_identically() {
    let (k, _) = kernel();
    let token = agent(&k, "atlas", 1_000_000);
    let a = k.admit(&token, &req()).unwrap();
    let id = a.execution_id.as_str();
    let first = k.commit(id, Usage::new(900, 100)).unwrap();
    let again = k.commit(id, Usage::new(900, 100)).unwrap();
    assert_eq!(again, aex_core::Settlement { replayed: true, ..first.clone() });
    let e = k.commit(id, Usage::new(900, 101)).unwrap_err();
    assert_eq!((e.status(), e.reason()), (409, "invalid_transition"));
    assert_eq!(k.release(id, "x").unwrap_err().reason(), "invalid_transition");
    assert_eq!(k.fail(id, "x").unwrap_err().reason(), "invalid_transition");
    assert_eq!(k.mark_dispatched(id).unwrap_err().reason(), "invalid_transition");
    assert_eq!(k.agent("atlas").unwrap().spent_micro, first.cost_micro);

    let b = k.admit(&token, &req()).unwrap();
    let r = k.release(&b.execution_id, "user cancelled").unwrap();
    assert_eq!((r.state, r.released_micro, r.cost_micro), (ExecutionState::Released, 450, 0));
    assert!(k.release(&b.execution_id, "again").unwrap().replayed);
    assert_eq!(k.commit(&b.execution_id, Usage::new(1, 1)).unwrap_err().status(), 409);

    let c = k.admit(&token, &req()).unwrap();
    k.mark_dispatched(&c.execution_id).unwrap();
    k.mark_dispatched(&c.execution_id).unwrap();
    let f = k.fail(&c.execution_id, "provider 500").unwrap();
    assert_eq!((f.state, f.released_micro), (ExecutionState::Failed, 450));
    assert!(k.fail(&c.execution_id, "provider 500").unwrap().replayed);
    assert_eq!(k.release(&c.execution_id, "x").unwrap_err().status(), 409);
    assert_eq!(k.execution(&c.execution_id).unwrap().reason.as_deref(), Some("provider 500"));

    let agent = k.agent("atlas").unwrap();
    assert_eq!((agent.spent_micro, agent.reserved_micro), (first.cost_micro, 0));
    assert_clean(&k);
}

#[test]
fn overrun_is_charged_recorded_and_then_blocks_admission() {
    let (k, _) = kernel();
    let token = agent(&k, "atlas", 500);
    let a = k.admit(&token, &req()).unwrap();
    let s = k.commit(&a.execution_id, Usage::new(1_000, 1_000)).unwrap();
    assert_eq!((s.cost_micro, s.overrun_micro, s.released_micro), (750, 300, 0));
    let agent = k.agent("atlas").unwrap();
    assert_eq!((agent.spent_micro, agent.remaining_micro()), (750, -250));
    let ev = last_event(&k);
    assert_eq!((ev.kind.as_str(), ev.amount_micro), ("execution.overrun", 300));
    let e = k.admit(&token, &AdmitRequest::new(MODEL).input_tokens(0).max_output_tokens(1)).unwrap_err();
    assert_eq!(e, Error::InsufficientBudget { agent: "atlas".into(), team: None, needed_micro: 1, remaining_micro: -250 });
    assert_clean(&k);
}

#[test]
fn unknown_executions_and_agents_are_not_found() {
    let (k, _) = kernel();
    let head = k.head().unwrap();
    for e in [
        k.commit("nope", Usage::new(1, 1)).unwrap_err(),
        k.release("nope", "").unwrap_err(),
        k.fail("nope", "").unwrap_err(),
        k.mark_dispatched("nope").unwrap_err(),
        k.execution("nope").unwrap_err(),
    ] {
        assert_eq!((e.status(), e.reason()), (404, "execution_not_found"));
    }
    for e in [
        k.agent("ghost").unwrap_err(),
        k.set_budget("ghost", 1).unwrap_err(),
        k.add_budget("ghost", 1).unwrap_err(),
        k.set_disabled("ghost", true).unwrap_err(),
        k.delete_agent("ghost").unwrap_err(),
        k.rotate_token("ghost", None).unwrap_err(),
    ] {
        assert_eq!((e.status(), e.reason()), (404, "agent_not_found"));
    }
    assert_eq!(k.head().unwrap(), head, "nothing was recorded");
}

#[test]
fn agent_management() {
    let (k, _) = kernel();
    let spec = AgentSpec { rpm: Some(30), tpm: Some(10_000), allowed_models: vec![MODEL.into()], ..AgentSpec::new("b", 5) };
    let created = k.create_agent(&spec).unwrap();
    agent(&k, "a", 7);
    assert!(!format!("{:?}", created.agent).contains(created.token.expose()));
    assert!(!format!("{:?}", created.token).contains(&created.token.expose()[10..]));
    let e = k.create_agent(&AgentSpec::new("a", 1)).unwrap_err();
    assert_eq!((e.status(), e.reason()), (409, "name_taken"));

    let names: Vec<String> = k.list_agents().unwrap().into_iter().map(|a| a.name).collect();
    assert_eq!(names, ["a", "b"]);
    let b = k.agent("b").unwrap();
    assert_eq!((b.rpm, b.tpm, b.allowed_models.clone(), b.budget_micro), (Some(30), Some(10_000), vec![MODEL.to_string()], 5));
    assert_eq!(b.token_prefix, created.token.expose()[..10]);

    assert_eq!(k.set_budget("b", 9).unwrap().budget_micro, 9);
    assert_eq!(k.add_budget("b", 11).unwrap().budget_micro, 20);
    assert_eq!(k.add_budget("b", -20).unwrap().budget_micro, 0);
    assert!(k.set_disabled("b", true).unwrap().disabled);
    assert!(!k.set_disabled("b", false).unwrap().disabled);
    assert_clean(&k);
}

#[test]
fn rotation_revokes_the_old_token_at_once() {
    let (k, clock) = kernel();
    let created = k.create_agent(&AgentSpec { ttl_ms: Some(3_600_000), ..AgentSpec::new("atlas", 1_000_000) }).unwrap();
    let old = created.token.expose().to_string();
    clock.advance(1_000);
    let new = k.rotate_token("atlas", None).unwrap();
    assert_ne!(new.expose(), old);
    assert_eq!(k.admit(&old, &req()).unwrap_err().reason(), "unknown_token");
    k.admit(new.expose(), &req()).unwrap();
    let agent = k.agent("atlas").unwrap();
    assert_eq!(agent.expires_at_ms, Some(T0 + 1_000 + 3_600_000), "the TTL is renewed from the rotation");
    assert_eq!(agent.token_prefix, new.expose()[..10]);

    let short = k.rotate_token("atlas", Some(10)).unwrap();
    clock.advance(10);
    assert_eq!(k.admit(short.expose(), &req()).unwrap_err().reason(), "token_expired");
    assert_eq!(k.rotate_token("atlas", Some(0)).unwrap_err().status(), 400);
    assert_clean(&k);
}

#[test]
fn deleting_an_agent_releases_its_reservations_and_revokes_its_token() {
    let (k, _) = kernel();
    let token = agent(&k, "atlas", 1_000_000);
    let open = k.admit(&token, &req()).unwrap();
    let done = k.admit(&token, &req()).unwrap();
    k.commit(&done.execution_id, Usage::new(10, 10)).unwrap();
    k.delete_agent("atlas").unwrap();

    assert_eq!(k.agent("atlas").unwrap_err().status(), 404);
    assert_eq!(k.admit(&token, &req()).unwrap_err().reason(), "unknown_token");
    let e = k.execution(&open.execution_id).unwrap();
    assert_eq!((e.state, e.reason.as_deref()), (ExecutionState::Released, Some("agent_deleted")));
    assert_eq!(k.commit(&open.execution_id, Usage::new(1, 1)).unwrap_err().status(), 409);
    assert_clean(&k);

    let again = agent(&k, "atlas", 10);
    assert_eq!(k.agent("atlas").unwrap().spent_micro, 0, "a reused name starts afresh");
    assert_eq!(k.admit(&again, &req()).unwrap_err().status(), 402);
    assert_clean(&k);
}

#[test]
fn expired_reservations_release_or_settle_in_full() {
    let (k, clock) = kernel();
    let token = agent(&k, "atlas", 1_000);
    let idle = k.admit(&token, &req()).unwrap();
    let sent = k.admit(&token, &req()).unwrap();
    k.mark_dispatched(&sent.execution_id).unwrap();
    assert_eq!(k.admit(&token, &req()).unwrap_err().status(), 402, "both reservations hold the budget");

    clock.advance(aex_core::DEFAULT_RESERVATION_TTL_MS);
    // The next admission touches the agent and expires both first.
    let third = k.admit(&token, &req()).unwrap();
    let a = k.agent("atlas").unwrap();
    assert_eq!((a.spent_micro, a.reserved_micro), (450, 450));
    let idle = k.execution(&idle.execution_id).unwrap();
    assert_eq!((idle.state, idle.reason.as_deref()), (ExecutionState::Released, Some("expired")));
    let sent_row = k.execution(&sent.execution_id).unwrap();
    assert_eq!((sent_row.state, sent_row.cost_micro), (ExecutionState::Committed, Some(450)));

    let e = k.commit(&sent.execution_id, Usage::new(1, 1)).unwrap_err();
    assert_eq!((e.status(), e.reason()), (409, "execution_expired"));
    let e = k.commit(&idle.id, Usage::new(1, 1)).unwrap_err();
    assert_eq!(e.reason(), "execution_expired");
    assert!(k.release(&idle.id, "late").unwrap().expired);

    // A settlement call on a due execution applies the expiry itself, with no admission between.
    clock.advance(aex_core::DEFAULT_RESERVATION_TTL_MS);
    assert_eq!(k.commit(&third.execution_id, Usage::new(1, 1)).unwrap_err().reason(), "execution_expired");
    let kinds = k.events(1, 100).unwrap().into_iter().filter(|e| e.kind == "execution.expired").count();
    assert_eq!(kinds, 3);
    assert_clean(&k);
}

#[test]
fn reconcile_expires_every_agent() {
    let (k, clock) = kernel();
    let a = agent(&k, "a", 1_000_000);
    let b = agent(&k, "b", 1_000_000);
    k.admit(&a, &req()).unwrap();
    let x = k.admit(&b, &req()).unwrap();
    k.mark_dispatched(&x.execution_id).unwrap();
    assert_eq!(k.reconcile().unwrap(), aex_core::ReconcileReport::default());
    clock.advance(aex_core::DEFAULT_RESERVATION_TTL_MS + 1);
    assert_eq!(k.reconcile().unwrap(), aex_core::ReconcileReport { released: 1, settled: 1 });
    assert_eq!(k.agent("a").unwrap().reserved_micro, 0);
    assert_eq!(k.agent("b").unwrap().spent_micro, 450);
    assert_clean(&k);
}

#[test]
fn the_reconcile_report_counts_releases_and_settlements_apart() {
    let (k, clock) = kernel();
    let t = agent(&k, "a", 1_000_000);
    let ids: Vec<String> = (0..5).map(|_| k.admit(&t, &req()).unwrap().execution_id).collect();
    k.mark_dispatched(&ids[0]).unwrap();
    k.commit(&ids[4], Usage::new(10, 10)).unwrap();
    clock.advance(aex_core::DEFAULT_RESERVATION_TTL_MS);
    // Three never sent, one sent, one already settled.
    assert_eq!(k.reconcile().unwrap(), aex_core::ReconcileReport { released: 3, settled: 1 });
    assert_eq!(k.reconcile().unwrap(), aex_core::ReconcileReport::default());
    let a = k.agent("a").unwrap();
    assert_eq!((a.spent_micro, a.reserved_micro), (450 + 8, 0));
    assert_clean(&k);
}

#[test]
fn an_admission_sees_the_budget_its_own_lazy_expiry_gave_back() {
    let (k, clock) = kernel();
    // Room for exactly one reservation of 450; a second fits only once the first has expired.
    let t = agent(&k, "a", 450);
    let first = k.admit(&t, &req()).unwrap();
    assert_eq!(k.admit(&t, &req()).unwrap_err().status(), 402);
    clock.advance(aex_core::DEFAULT_RESERVATION_TTL_MS);
    let second = k.admit(&t, &req()).unwrap();
    assert_eq!(k.execution(&first.execution_id).unwrap().state, ExecutionState::Released);
    let a = k.agent("a").unwrap();
    assert_eq!((a.spent_micro, a.reserved_micro), (0, second.reserved_micro));

    // A dispatched reservation is charged in full by the same lazy expiry, and the admission
    // after it sees that spend.
    k.mark_dispatched(&second.execution_id).unwrap();
    k.add_budget("a", 450).unwrap();
    clock.advance(aex_core::DEFAULT_RESERVATION_TTL_MS);
    let third = k.admit(&t, &req()).unwrap();
    let a = k.agent("a").unwrap();
    assert_eq!((a.spent_micro, a.reserved_micro), (450, third.reserved_micro));
    assert_eq!(k.admit(&t, &req()).unwrap_err().status(), 402);
    assert_clean(&k);
}

#[test]
fn an_outside_write_governs_the_next_admission() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aex.db");
    let k = file_kernel(&path);
    let token = agent(&k, "atlas", 1_000_000);
    let a = k.admit(&token, &req()).unwrap();
    k.commit(&a.execution_id, Usage::new(100, 100)).unwrap();

    let shell = rusqlite::Connection::open(&path).unwrap();
    shell.execute("UPDATE agents SET budget_micro = spent_micro WHERE name = 'atlas'", []).unwrap();
    let e = k.admit(&token, &req()).unwrap_err();
    assert_eq!(e, Error::InsufficientBudget { agent: "atlas".into(), team: None, needed_micro: 450, remaining_micro: 0 });
    // A restricting hand edit is an operator action: that admission recorded it, so the audit is
    // clean and shows it.
    assert_clean(&k);
    let edits: Vec<_> = k.events(1, 1_000).unwrap().into_iter().filter(|e| e.kind == "agent.operator_edit").collect();
    assert_eq!(edits.len(), 1);
    assert!(edits[0].data.contains("\"field\":\"budget_micro\""), "{:?}", edits[0]);
}

#[test]
fn the_ledger_key_must_match_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aex.db");
    let keyed = |key: Option<&[u8]>| KernelOptions { ledger_key: key.map(<[u8]>::to_vec), config: config(), ..Default::default() };
    let k = Kernel::open(&path, keyed(Some(b"secret-1"))).unwrap();
    agent(&k, "atlas", 1);
    let report = k.audit(None).unwrap();
    assert!(report.is_clean() && report.mode == "hmac-sha256");
    drop(k);
    for (key, needle) in [(None, "without"), (Some(&b"secret-2"[..]), "does not match")] {
        let e = Kernel::open(&path, keyed(key)).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("ledger_key") && !e.to_string().contains("secret"), "{e}");
        assert!(e.to_string().contains(needle) || key.is_none(), "{e}");
    }
    assert!(!format!("{:?}", keyed(Some(b"secret-1"))).contains("secret-1"));
    Kernel::open(&path, keyed(Some(b"secret-1"))).unwrap();
}

#[test]
fn an_unreachable_store_is_unavailable() {
    let e = Kernel::open("/nonexistent-dir/aex.db", KernelOptions::default()).unwrap_err();
    assert_eq!((e.status(), e.reason()), (503, "unavailable"));
}

#[test]
fn every_status_has_its_number() {
    use aex_core::{NotFoundKind, RateWindow};
    let cases = [
        (Error::invalid("f", "r"), 400),
        (Error::Unauthenticated { reason: AuthFailure::UnknownToken }, 401),
        (Error::InsufficientBudget { agent: "a".into(), team: None, needed_micro: 1, remaining_micro: 0 }, 402),
        (Error::PolicyDenied { reason: PolicyRule::ModelNotAllowed, message: String::new() }, 403),
        (Error::NotFound { what: NotFoundKind::Agent, key: "a".into() }, 404),
        (Error::Conflict { reason: ConflictReason::NameTaken, message: String::new() }, 409),
        (Error::RateLimited { window: RateWindow::AgentRpm, limit: 1, retry_after_ms: 5 }, 429),
        (Error::Internal("bug".into()), 500),
        (Error::Unavailable("io".into()), 503),
    ];
    for (e, status) in cases {
        assert_eq!(e.status(), status, "{e}");
        assert_eq!(e.is_denial(), matches!(status, 401 | 402 | 403 | 429));
    }
}

#[test]
fn an_estimated_commit_is_marked_and_never_below_the_admitted_input() {
    let (k, _) = kernel();
    let token = agent(&k, "atlas", 1_000_000);
    let a = k.admit(&token, &req()).unwrap();
    let s = k.commit_estimated(&a.execution_id, Usage::new(10, 200)).unwrap();
    assert_eq!(s.cost_micro, 150 + 120, "input raised to the 1,000 tokens admission counted");
    let ev = last_event(&k);
    assert!(ev.kind == "execution.committed" && ev.data.contains("\"estimated\":true"), "{}", ev.data);
    assert!(k.commit_estimated(&a.execution_id, Usage::new(10, 200)).unwrap().replayed);
    assert_clean(&k);
}

#[test]
fn tokens_never_reach_the_database_files() {
    let dir = tempfile::tempdir().unwrap();
    let k = file_kernel(&dir.path().join("aex.db"));
    let token = agent(&k, "atlas", 1_000_000);
    let rotated = k.rotate_token("atlas", None).unwrap();
    let a = k.admit(rotated.expose(), &req()).unwrap();
    k.commit(&a.execution_id, Usage::new(10, 10)).unwrap();
    assert!(k.admit(&token, &req()).is_err()); // a denial with the old token is recorded too
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        for secret in [token.as_str(), rotated.expose()] {
            let secret_part = &secret.as_bytes()[10..]; // past the display prefix
            assert!(!bytes.windows(secret_part.len()).any(|w| w == secret_part), "a token reached the database files");
        }
    }
}
