//! Bad input gets a clear error naming the field and the rule, and changes nothing.

mod common;

use aex_core::admission::MAX_MESSAGES_BYTES;
use aex_core::settlement::MAX_REASON_LEN;
use aex_core::{AdmitRequest, AgentSpec, Error, Kernel, Message, Usage, money};
use common::*;

/// Runs `op`, expects a 400 naming `field`, and proves the state unchanged.
fn refused(k: &Kernel, field: &str, op: impl FnOnce(&Kernel) -> Result<(), Error>) {
    let before = snapshot(k);
    match op(k) {
        Err(Error::InvalidRequest { field: f, rule }) => {
            assert_eq!(f, field, "rule: {rule}");
            assert!(!rule.is_empty());
        }
        other => panic!("expected InvalidRequest on {field}, got {other:?}"),
    }
    assert_eq!(snapshot(k), before, "state changed after refusing {field}");
    assert_clean(k);
}

fn setup() -> (Kernel, String, String) {
    let (k, _) = kernel();
    let token = agent(&k, "atlas", 1_000_000);
    let open = k.admit(&token, &AdmitRequest::new(MODEL).input_tokens(10).max_output_tokens(10)).unwrap();
    (k, token, open.execution_id)
}

#[test]
fn bad_agent_names() {
    let (k, _, _) = setup();
    let long = "x".repeat(65);
    for name in ["", long.as_str(), "has space", "-leading", "naïve", "tab\there", "nul\0", "semi;colon", "😀"] {
        refused(&k, "name", |k| k.create_agent(&AgentSpec::new(name, 1)).map(|_| ()));
    }
    k.create_agent(&AgentSpec::new("x".repeat(64), 1)).unwrap();
}

#[test]
fn bad_agent_settings() {
    let (k, _, _) = setup();
    refused(&k, "budget_micro", |k| k.create_agent(&AgentSpec::new("b", -1)).map(|_| ()));
    refused(&k, "budget_micro", |k| k.create_agent(&AgentSpec::new("b", money::MAX_MICRO + 1)).map(|_| ()));
    refused(&k, "budget_micro", |k| k.create_agent(&AgentSpec::new("b", i64::MAX)).map(|_| ()));
    refused(&k, "rpm", |k| k.create_agent(&AgentSpec { rpm: Some(0), ..AgentSpec::new("b", 1) }).map(|_| ()));
    refused(&k, "tpm", |k| k.create_agent(&AgentSpec { tpm: Some(0), ..AgentSpec::new("b", 1) }).map(|_| ()));
    refused(&k, "ttl_ms", |k| k.create_agent(&AgentSpec { ttl_ms: Some(-5), ..AgentSpec::new("b", 1) }).map(|_| ()));
    refused(&k, "ttl_ms", |k| k.create_agent(&AgentSpec { ttl_ms: Some(i64::MAX), ..AgentSpec::new("b", 1) }).map(|_| ()));
    let spaced = AgentSpec { allowed_models: vec!["gpt 4".into()], ..AgentSpec::new("b", 1) };
    refused(&k, "allowed_models", |k| k.create_agent(&spaced).map(|_| ()));
    refused(&k, "budget_micro", |k| k.set_budget("atlas", -1).map(|_| ()));
    refused(&k, "budget_micro", |k| k.set_budget("atlas", i64::MAX).map(|_| ()));
    refused(&k, "delta_micro", |k| k.add_budget("atlas", -1_000_001).map(|_| ()));
    refused(&k, "delta_micro", |k| k.add_budget("atlas", i64::MAX).map(|_| ()));
    refused(&k, "ttl_ms", |k| k.rotate_token("atlas", Some(0)).map(|_| ()));
    refused(&k, "max_concurrent", |k| k.create_agent(&AgentSpec { max_concurrent: Some(0), ..AgentSpec::new("b", 1) }).map(|_| ()));
    refused(&k, "team", |k| k.create_agent(&AgentSpec { team: Some("no spaces".into()), ..AgentSpec::new("b", 1) }).map(|_| ()));
    refused(&k, "name", |k| k.create_team(&aex_core::TeamSpec::new("", 1)).map(|_| ()));
    refused(&k, "budget_micro", |k| k.create_team(&aex_core::TeamSpec::new("t", -5)).map(|_| ()));
    refused(&k, "parent", |k| k.create_team(&aex_core::TeamSpec { parent: Some("a b".into()), ..aex_core::TeamSpec::new("t", 5) }).map(|_| ()));
    refused(&k, "budget_micro", |k| k.set_team_budget("t", -1).map(|_| ()));
    assert!(matches!(aex_core::BudgetPeriod::parse("hourly"), Err(Error::InvalidRequest { ref field, .. }) if field == "budget_period"));
}

#[test]
fn teams_nest_at_most_eight_deep() {
    let (k, _, _) = setup();
    k.create_team(&aex_core::TeamSpec::new("t0", 1)).unwrap();
    for i in 1..8 {
        let spec = aex_core::TeamSpec { parent: Some(format!("t{}", i - 1)), ..aex_core::TeamSpec::new(format!("t{i}"), 1) };
        k.create_team(&spec).unwrap();
    }
    let spec = aex_core::TeamSpec { parent: Some("t7".into()), ..aex_core::TeamSpec::new("t8", 1) };
    refused(&k, "parent", |k| k.create_team(&spec).map(|_| ()));
}

#[test]
fn bad_usd_text() {
    for text in ["-0.01", "1e9", "0.0000001", "NaN", "", "1.2.3", "99999999999"] {
        let e = money::parse_usd("budget_usd", text).unwrap_err();
        assert!(matches!(&e, Error::InvalidRequest { field, .. } if field == "budget_usd"), "{text}: {e}");
    }
}

#[test]
fn bad_admission_requests() {
    let (k, token, _) = setup();
    let base = || AdmitRequest::new(MODEL).input_tokens(10).max_output_tokens(10);
    let long_id = "a".repeat(129);
    for id in ["", long_id.as_str(), "has space", "slash/no", "ünï", "new\nline"] {
        refused(&k, "execution_id", |k| k.admit(&token, &base().execution_id(id)).map(|_| ()));
    }
    refused(&k, "model", |k| k.admit(&token, &AdmitRequest::new("").max_output_tokens(1)).map(|_| ()));
    refused(&k, "model", |k| k.admit(&token, &AdmitRequest::new("a b").max_output_tokens(1)).map(|_| ()));
    refused(&k, "input_tokens", |k| k.admit(&token, &base().input_tokens(-1)).map(|_| ()));
    refused(&k, "input_tokens", |k| k.admit(&token, &base().input_tokens(i64::MAX)).map(|_| ()));
    refused(&k, "max_output_tokens", |k| k.admit(&token, &base().max_output_tokens(0)).map(|_| ()));
    refused(&k, "max_output_tokens", |k| k.admit(&token, &base().max_output_tokens(-3)).map(|_| ()));
    let huge = AdmitRequest { messages: vec![Message::new("user", "x".repeat(65 << 20))], ..base() };
    refused(&k, "messages", |k| k.admit(&token, &huge).map(|_| ()));
}

#[test]
fn bad_settlements() {
    let (k, _, id) = setup();
    refused(&k, "usage.input_tokens", |k| k.commit(&id, Usage::new(-1, 0)).map(|_| ()));
    refused(&k, "usage.output_tokens", |k| k.commit(&id, Usage::new(0, -5)).map(|_| ()));
    refused(&k, "usage.output_tokens", |k| k.commit(&id, Usage::new(0, i64::MAX)).map(|_| ()));
    let cached = Usage { input_tokens: 1, output_tokens: 1, cached_input_tokens: -1 };
    refused(&k, "usage.cached_input_tokens", |k| k.commit(&id, cached).map(|_| ()));
    let cached = Usage { input_tokens: 1, output_tokens: 1, cached_input_tokens: 2 };
    refused(&k, "usage.cached_input_tokens", |k| k.commit(&id, cached).map(|_| ()));
    refused(&k, "reason", |k| k.release(&id, &"r".repeat(1025)).map(|_| ()));
    refused(&k, "error", |k| k.fail(&id, &"e".repeat(1025)).map(|_| ()));
    refused(&k, "reason", |k| k.release(&id, "not\0sent").map(|_| ()));
    refused(&k, "error", |k| k.fail(&id, "\0").map(|_| ()));
    // Still open and settleable after all that.
    k.commit(&id, Usage::new(10, 10)).unwrap();
}

#[test]
fn a_reason_of_exactly_the_limit_is_kept_and_one_byte_more_is_refused() {
    let (k, token, id) = setup();
    let at = "é".repeat(MAX_REASON_LEN / 2); // the limit is in bytes
    refused(&k, "reason", |k| k.release(&id, &format!("{at}r")).map(|_| ()));
    k.release(&id, &at).unwrap();
    assert_eq!(k.execution(&id).unwrap().reason.as_deref(), Some(at.as_str()));

    let failing = k.admit(&token, &AdmitRequest::new(MODEL).input_tokens(10).max_output_tokens(10)).unwrap().execution_id;
    refused(&k, "error", |k| k.fail(&failing, &format!("{at}e")).map(|_| ()));
    k.fail(&failing, &at).unwrap();
    assert_eq!(k.execution(&failing).unwrap().reason.as_deref(), Some(at.as_str()));
    assert_clean(&k);
}

#[test]
fn messages_of_exactly_the_size_cap_are_admitted_and_one_byte_more_is_refused() {
    let (k, token, _) = setup();
    // The cap counts every message's role and content bytes.
    let content = MAX_MESSAGES_BYTES - "system".len() - "user".len() - "rules".len();
    let request = |extra: usize| AdmitRequest {
        messages: vec![Message::new("system", "rules"), Message::new("user", "x".repeat(content + extra))],
        ..AdmitRequest::new(MODEL).input_tokens(10).max_output_tokens(10)
    };
    refused(&k, "messages", |k| k.admit(&token, &request(1)).map(|_| ()));
    k.admit(&token, &request(0)).unwrap();
    assert_clean(&k);
}

#[test]
fn settling_twice_and_unknown_ids_change_nothing() {
    let (k, _, id) = setup();
    k.commit(&id, Usage::new(10, 10)).unwrap();
    let before = snapshot(&k);
    assert_eq!(k.commit(&id, Usage::new(10, 11)).unwrap_err().status(), 409);
    assert_eq!(k.release(&id, "again").unwrap_err().status(), 409);
    assert_eq!(k.commit("no-such-execution", Usage::new(1, 1)).unwrap_err().status(), 404);
    assert!(k.commit(&id, Usage::new(10, 10)).unwrap().replayed);
    assert_eq!(snapshot(&k), before);
    assert_clean(&k);
}

#[test]
fn bad_options() {
    let e = Kernel::open_in_memory(aex_core::KernelOptions { reservation_ttl_ms: 0, ..Default::default() }).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { ref field, .. } if field == "reservation_ttl_ms"));
    let e = Kernel::open_in_memory(aex_core::KernelOptions { ledger_key: Some(vec![]), ..Default::default() }).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { ref field, .. } if field == "ledger_key"));
    let bad = aex_core::ModelSpec::priced(aex_core::Prices { input: -1, output: 0, cached_input: None }, 1);
    let e = aex_core::Config::new().with_model("m", bad).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { ref field, .. } if field == "models.m.input_price"), "{e}");
    let bad = aex_core::ModelSpec::priced(aex_core::Prices { input: 0, output: 0, cached_input: None }, 0);
    let e = aex_core::Config::new().with_model("m", bad).unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { ref field, .. } if field == "models.m.max_output_tokens"), "{e}");
}

#[test]
fn a_file_whose_schema_version_aex_never_wrote_is_refused() {
    // SQLite's user_version is a signed header field; a damaged or foreign file may hold any
    // value. Found by fuzzing `audit_corrupt`: a negative one was used as an index.
    for version in [-5_i64, i64::from(i32::MIN), 1_000] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd.db");
        rusqlite::Connection::open(&path).unwrap().pragma_update(None, "user_version", version).unwrap();
        let e = Kernel::open(&path, aex_core::KernelOptions::default()).unwrap_err();
        assert!(matches!(e, aex_core::Error::Unavailable(_)), "{version}: {e:?}");
        assert!(e.to_string().contains("schema version"), "{e}");
    }
}
