//! Policy, rate windows, config reload, token counting, budget periods and team budgets,
//! through the public API.

mod common;

use std::sync::Arc;

use aex_core::{
    AdmitRequest, AgentSpec, BudgetPeriod, Config, Error, Kernel, KernelOptions, ManualClock, Message, PolicyRule,
    RateWindow, ReconcileReport, TeamSpec, Usage, rate,
};
use common::*;

const YAML: &str = r#"
providers:
  local: {base_url: "http://127.0.0.1:9/v1"}
models:
  mini:
    provider: local
    input_price: 0.15
    output_price: 0.60
    max_output_tokens: 1000
    context_window: 5000
    vision: true
  text-only:
    input_price: 1
    output_price: 2
    tools: false
    streaming: false
  gpt-4o-mini:
    input_price: 0.15
    output_price: 0.60
  local-llama: {}
"#;

fn yaml_kernel(yaml: &str) -> (Kernel, ManualClock) {
    let clock = ManualClock::new(T0);
    let options = KernelOptions { config: Config::from_yaml(yaml).unwrap(), clock: Arc::new(clock.clone()), ..Default::default() };
    (common::store_kernel(options), clock)
}

fn spec(name: &str) -> AgentSpec {
    AgentSpec::new(name, 1_000_000_000)
}

fn small(model: &str) -> AdmitRequest {
    AdmitRequest::new(model).input_tokens(200).max_output_tokens(200)
}

fn denied(k: &Kernel, token: &str, r: &AdmitRequest) -> Error {
    let e = k.admit(token, r).unwrap_err();
    let last = k.events(k.head().unwrap().unwrap().seq, 1).unwrap().remove(0);
    assert_eq!(last.kind, "admission.denied", "every denial is in the ledger");
    e
}

#[test]
fn model_capabilities_context_window_and_strict_pricing() {
    let (k, _) = yaml_kernel(YAML);
    let t = k.create_agent(&spec("a")).unwrap().token.expose().to_string();
    let rule = |e: Error| match e {
        Error::PolicyDenied { reason, .. } => reason,
        other => panic!("{other:?}"),
    };
    assert_eq!(rule(denied(&k, &t, &AdmitRequest { tools: true, ..small("text-only") })), PolicyRule::ModelLacksTools);
    assert_eq!(rule(denied(&k, &t, &AdmitRequest { streaming: true, ..small("text-only") })), PolicyRule::ModelLacksStreaming);
    assert_eq!(rule(denied(&k, &t, &AdmitRequest { vision: true, ..small("text-only") })), PolicyRule::ModelLacksVision);
    k.admit(&t, &AdmitRequest { vision: true, tools: true, streaming: true, ..small("mini") }).unwrap();
    let e = denied(&k, &t, &AdmitRequest::new("mini").input_tokens(4_500).max_output_tokens(600));
    assert_eq!(rule(e), PolicyRule::ContextWindowExceeded);

    // An unpriced model is free to a normal agent and refused to a strict one.
    let free = k.admit(&t, &small("local-llama")).unwrap();
    assert_eq!(free.reserved_micro, 0);
    assert_eq!(k.commit(&free.execution_id, Usage::new(5_000, 5_000)).unwrap().cost_micro, 0);
    let strict = k.create_agent(&AgentSpec { strict: true, ..spec("s") }).unwrap().token.expose().to_string();
    assert_eq!(rule(denied(&k, &strict, &small("local-llama"))), PolicyRule::StrictUnpricedModel);
    k.admit(&strict, &small("mini")).unwrap();
    assert_clean(&k);
}

#[test]
fn openai_models_count_input_with_their_tokenizer() {
    let (k, _) = yaml_kernel(YAML);
    let t = k.create_agent(&spec("a")).unwrap().token.expose().to_string();
    let mut r = AdmitRequest::new("gpt-4o-mini").max_output_tokens(10);
    r.messages = vec![Message::new("user", "hello world")];
    assert_eq!(k.admit(&t, &r).unwrap().input_tokens, 1 + 2 + 3 + 3);
    let mut r = AdmitRequest::new("local-llama").max_output_tokens(10);
    r.messages = vec![Message::new("user", "hello world")];
    assert_eq!(k.admit(&t, &r).unwrap().input_tokens, 4 + 11 + 4 + 3, "other models get the byte bound");
}

#[test]
fn agent_rpm_is_a_sliding_window_with_a_computed_retry_after() {
    let (k, clock) = yaml_kernel(YAML);
    let t = k.create_agent(&AgentSpec { rpm: Some(3), ..spec("a") }).unwrap().token.expose().to_string();
    for _ in 0..3 {
        k.admit(&t, &small("mini")).unwrap();
        clock.advance(10_000);
    }
    // Now T0 + 30 s; the first request (second T0/1000) leaves the window at T0 + 61 s.
    let e = denied(&k, &t, &small("mini"));
    assert_eq!(e, Error::RateLimited { window: RateWindow::AgentRpm, limit: 3, retry_after_ms: 31_000 });
    assert_eq!(e.status(), 429);
    clock.advance(30_999);
    assert_eq!(k.admit(&t, &small("mini")).unwrap_err().reason(), "agent_rpm");
    clock.advance(1);
    k.admit(&t, &small("mini")).unwrap();
    assert_clean(&k);
}

#[test]
fn a_burst_across_a_minute_boundary_never_exceeds_the_limit_in_any_60_seconds() {
    let (k, clock) = yaml_kernel(YAML);
    let t = k.create_agent(&AgentSpec { rpm: Some(10), ..spec("a") }).unwrap().token.expose().to_string();
    let mut admitted = Vec::new();
    // Quiet until 55 s past a minute, then hammer every 250 ms for five minutes.
    clock.set(T0 + 55_000);
    for _ in 0..1_200 {
        if let Ok(a) = k.admit(&t, &small("mini")) {
            k.commit(&a.execution_id, Usage::new(10, 10)).unwrap();
            admitted.push(clock.now_ms_for_test());
        }
        clock.advance(250);
    }
    for (i, &at) in admitted.iter().enumerate() {
        let in_span = admitted[..=i].iter().filter(|&&x| x > at - 60_000).count();
        assert!(in_span <= 10, "{in_span} requests in the 60 s before {at}");
    }
    assert!(admitted.len() >= 45, "the window must still let 10 per minute through, got {}", admitted.len());
    assert_clean(&k);
}

trait Now {
    fn now_ms_for_test(&self) -> i64;
}

impl Now for ManualClock {
    fn now_ms_for_test(&self) -> i64 {
        aex_core::Clock::now_ms(self)
    }
}

#[test]
fn agent_tpm_counts_estimates_and_is_corrected_at_settlement() {
    let (k, _) = yaml_kernel(YAML);
    let t = k.create_agent(&AgentSpec { tpm: Some(1_000), ..spec("a") }).unwrap().token.expose().to_string();
    let a = k.admit(&t, &small("mini")).unwrap(); // 400 counted
    let b = k.admit(&t, &small("mini")).unwrap(); // 800
    match denied(&k, &t, &small("mini")) {
        Error::RateLimited { window: RateWindow::AgentTpm, limit: 1_000, retry_after_ms } => {
            assert_eq!(retry_after_ms, 61_000);
        }
        other => panic!("{other:?}"),
    }
    k.commit(&a.execution_id, Usage::new(50, 50)).unwrap(); // 800 -> 500
    k.admit(&t, &small("mini")).unwrap(); // 900
    assert_eq!(k.admit(&t, &small("mini")).unwrap_err().reason(), "agent_tpm");
    k.release(&b.execution_id, "not sent").unwrap(); // 900 -> 500
    k.admit(&t, &small("mini")).unwrap();
    // A request bigger than the whole limit can never pass: a policy denial, not a wait.
    let e = denied(&k, &t, &AdmitRequest::new("mini").input_tokens(900).max_output_tokens(200));
    assert_eq!(e.reason(), "exceeds_rate_limit");
    assert_clean(&k);
}

/// A request that counts exactly `n` tokens against a TPM window.
fn tokens(n: i64) -> AdmitRequest {
    AdmitRequest::new("mini").input_tokens(n - 1).max_output_tokens(1)
}

/// Asserts that the TPM window of an agent with `tpm: 1000` holds exactly `used` tokens: a request
/// for one token more than the room left is denied, one for the room is admitted. Then lets the
/// window pass, so the next phase starts from an empty one.
fn assert_window(k: &Kernel, clock: &ManualClock, t: &str, used: i64) {
    let room = 1_000 - used;
    match denied(k, t, &tokens(room + 1)) {
        Error::RateLimited { window: RateWindow::AgentTpm, .. } if room < 1_000 => {}
        Error::PolicyDenied { reason: PolicyRule::ExceedsRateLimit, .. } if room == 1_000 => {}
        other => panic!("{} tokens with {used} counted: {other:?}", room + 1),
    }
    if room > 0 {
        k.admit(t, &tokens(room)).unwrap_or_else(|e| panic!("{room} tokens with {used} counted: {e:?}"));
    }
    clock.advance(rate::WINDOW_MS + 1_000);
}

#[test]
fn the_tpm_window_holds_exactly_the_settled_tokens_after_commit_release_fail_and_expiry() {
    let clock = ManualClock::new(T0);
    let options = KernelOptions {
        config: Config::from_yaml(YAML).unwrap(),
        clock: Arc::new(clock.clone()),
        reservation_ttl_ms: 10_000, // expiries inside one window
        ..Default::default()
    };
    let k = common::store_kernel(options);
    let t = k.create_agent(&AgentSpec { tpm: Some(1_000), ..spec("a") }).unwrap().token.expose().to_string();
    let estimate = || AdmitRequest::new("mini").input_tokens(300).max_output_tokens(300); // 600 counted
    assert_window(&k, &clock, &t, 0);

    // Admission counts the estimate (this reservation is left to expire, after its window);
    // commit moves the window from the estimate to input + output.
    k.admit(&t, &estimate()).unwrap();
    assert_window(&k, &clock, &t, 600);
    let a = k.admit(&t, &estimate()).unwrap();
    k.commit(&a.execution_id, Usage::new(300, 100)).unwrap();
    assert_window(&k, &clock, &t, 400);
    // An overrun counts what was really used, above the estimate.
    let a = k.admit(&t, &estimate()).unwrap();
    k.commit(&a.execution_id, Usage::new(500, 400)).unwrap();
    assert_window(&k, &clock, &t, 900);

    // Release and fail: nothing was used, nothing stays counted.
    let a = k.admit(&t, &estimate()).unwrap();
    k.release(&a.execution_id, "not sent").unwrap();
    assert_window(&k, &clock, &t, 0);
    let a = k.admit(&t, &estimate()).unwrap();
    k.fail(&a.execution_id, "connection refused").unwrap();
    assert_window(&k, &clock, &t, 0);

    // Expiry of a reservation never sent releases its tokens (here lazily, by the next admission
    // of the agent); expiry of a dispatched one charges the full reservation and keeps them.
    k.admit(&t, &estimate()).unwrap();
    clock.advance(10_000);
    assert_window(&k, &clock, &t, 0);
    let a = k.admit(&t, &estimate()).unwrap();
    k.mark_dispatched(&a.execution_id).unwrap();
    clock.advance(10_000);
    assert_eq!(k.reconcile().unwrap(), ReconcileReport { released: 0, settled: 1 });
    assert_window(&k, &clock, &t, 600);
    assert_clean(&k);
}

#[test]
fn a_single_request_of_exactly_the_tpm_limit_is_admitted_and_one_token_more_is_refused() {
    let (k, _) = yaml_kernel(YAML);
    let a = k.create_agent(&AgentSpec { tpm: Some(1_000), ..spec("a") }).unwrap().token.expose().to_string();
    let b = k.create_agent(&AgentSpec { tpm: Some(1_000), ..spec("b") }).unwrap().token.expose().to_string();
    k.admit(&a, &tokens(1_000)).unwrap();
    let e = denied(&k, &b, &tokens(1_001));
    assert!(matches!(e, Error::PolicyDenied { reason: PolicyRule::ExceedsRateLimit, .. }), "{e:?}");
    assert!(e.to_string().contains("1001") && e.to_string().contains("1000"), "{e}");
    k.admit(&b, &tokens(1_000)).unwrap();
    assert_clean(&k);
}

#[test]
fn a_request_filling_the_context_window_exactly_is_admitted_and_one_token_more_is_denied() {
    let (k, _) = yaml_kernel(YAML); // mini: context_window 5000, max_output_tokens 1000
    let t = k.create_agent(&spec("a")).unwrap().token.expose().to_string();
    k.admit(&t, &AdmitRequest::new("mini").input_tokens(4_000).max_output_tokens(1_000)).unwrap();
    // The output cap is clamped to the model's before the window is checked.
    k.admit(&t, &AdmitRequest::new("mini").input_tokens(4_000).max_output_tokens(4_000)).unwrap();
    let e = denied(&k, &t, &AdmitRequest::new("mini").input_tokens(4_001).max_output_tokens(1_000));
    assert!(matches!(e, Error::PolicyDenied { reason: PolicyRule::ContextWindowExceeded, .. }), "{e:?}");
    assert_clean(&k);
}

#[test]
fn the_daemon_seed_scenario_global_tpm_denies_before_any_provider_call() {
    let yaml = format!("{YAML}limits:\n  max_tokens_per_minute: 1000\n");
    let (k, _) = yaml_kernel(&yaml);
    let a = k.create_agent(&spec("a")).unwrap().token.expose().to_string();
    let b = k.create_agent(&spec("b")).unwrap().token.expose().to_string();
    let mut provider_calls = 0;
    let mut denial = None;
    for i in 0..10 {
        match k.admit(if i % 2 == 0 { &a } else { &b }, &small("mini")) {
            Ok(adm) => {
                provider_calls += 1; // only an admitted call reaches the provider
                k.mark_dispatched(&adm.execution_id).unwrap();
            }
            Err(e) => {
                denial = Some(e);
                break;
            }
        }
    }
    assert_eq!(provider_calls, 2, "1000 TPM fits two 400-token calls");
    let e = denial.unwrap();
    assert_eq!((e.status(), e.reason()), (429, "global_tpm"));
    assert!(matches!(e, Error::RateLimited { retry_after_ms, .. } if retry_after_ms > 0 && retry_after_ms <= 61_000));
}

#[test]
fn model_tpm_is_shared_across_agents() {
    let yaml = format!("{YAML}limits:\n  model_tokens_per_minute: {{mini: 900}}\n");
    let (k, _) = yaml_kernel(&yaml);
    let a = k.create_agent(&spec("a")).unwrap().token.expose().to_string();
    let b = k.create_agent(&spec("b")).unwrap().token.expose().to_string();
    k.admit(&a, &small("mini")).unwrap();
    k.admit(&b, &small("mini")).unwrap();
    assert_eq!(denied(&k, &a, &small("mini")).reason(), "model_tpm");
    k.admit(&a, &small("gpt-4o-mini")).unwrap();
}

#[test]
fn concurrency_caps_per_agent_and_global() {
    let yaml = format!("{YAML}limits:\n  max_concurrent: 3\n");
    let (k, clock) = yaml_kernel(&yaml);
    let a = k.create_agent(&AgentSpec { max_concurrent: Some(2), ..spec("a") }).unwrap().token.expose().to_string();
    let b = k.create_agent(&spec("b")).unwrap().token.expose().to_string();
    let first = k.admit(&a, &small("mini")).unwrap();
    clock.advance(1_000);
    k.admit(&a, &small("mini")).unwrap();
    match denied(&k, &a, &small("mini")) {
        Error::RateLimited { window: RateWindow::AgentConcurrency, limit: 2, retry_after_ms } => {
            assert_eq!(retry_after_ms, (first.expires_at_ms - T0 - 1_000) as u64, "until the oldest reservation expires");
        }
        other => panic!("{other:?}"),
    }
    k.admit(&b, &small("mini")).unwrap();
    assert_eq!(denied(&k, &b, &small("mini")).reason(), "global_concurrency");
    k.commit(&first.execution_id, Usage::new(1, 1)).unwrap();
    k.admit(&a, &small("mini")).unwrap();
    assert_clean(&k);
}

#[test]
fn reload_takes_effect_on_the_next_admission_and_a_bad_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("models.yaml");
    std::fs::write(&path, YAML).unwrap();
    let (k, _) = yaml_kernel(YAML);
    let t = k.create_agent(&spec("a")).unwrap().token.expose().to_string();
    assert_eq!(k.admit(&t, &small("brand-new")).unwrap_err().reason(), "model_not_configured");
    let open = k.admit(&t, &small("mini")).unwrap();

    let changed = YAML.replace("output_price: 0.60\n    max_output_tokens: 1000", "output_price: 6.00\n    max_output_tokens: 1000")
        + "  brand-new: {input_price: 1, output_price: 1}\n";
    std::fs::write(&path, &changed).unwrap();
    k.reload_config_file(&path).unwrap();
    let new = k.admit(&t, &small("mini")).unwrap();
    assert_eq!((open.reserved_micro, new.reserved_micro), (30 + 120, 30 + 1_200));
    k.admit(&t, &small("brand-new")).unwrap();
    // The reservation made before the reload keeps its prices.
    assert_eq!(k.commit(&open.execution_id, Usage::new(200, 200)).unwrap().cost_micro, 150);

    std::fs::write(&path, "models:\n  mini: {input_price: 1, output_price: 1, max_output_tokens: many}\n").unwrap();
    let e = k.reload_config_file(&path).unwrap_err();
    assert_eq!(e.status(), 400);
    assert!(e.to_string().contains("line 2"), "{e}");
    assert_eq!(k.admit(&t, &small("mini")).unwrap().reserved_micro, 30 + 1_200, "the old config still governs");
    k.admit(&t, &small("brand-new")).unwrap();

    let kinds: Vec<String> = k.events(1, 1_000).unwrap().into_iter().map(|e| e.kind).filter(|k| k.starts_with("config.")).collect();
    assert_eq!(kinds, ["config.loaded", "config.loaded", "config.rejected"]);
    let loaded = k.events(1, 1_000).unwrap().into_iter().filter(|e| e.kind == "config.loaded").nth(1).unwrap();
    // Config::hash of a file is the SHA-256 of its bytes (checked in the config unit tests).
    let hash: String = Config::from_yaml(&changed).unwrap().hash().iter().map(|b| format!("{b:02x}")).collect();
    assert!(loaded.data.contains(&hash), "the event carries the config's hash");
    assert_clean(&k);
}

#[test]
fn a_daily_budget_renews_lazily_and_never_resets_new_spend() {
    let (k, clock) = kernel();
    // T0 is midnight UTC; start at 23:55.
    clock.set(T0 + 24 * 3_600_000 - 300_000);
    let s = AgentSpec { budget_period: BudgetPeriod::Day, ..AgentSpec::new("daily", 1_000) };
    let t = k.create_agent(&s).unwrap().token.expose().to_string();
    let r = || AdmitRequest::new(MODEL).input_tokens(1_000).max_output_tokens(500); // 450
    let a = k.admit(&t, &r()).unwrap();
    k.commit(&a.execution_id, Usage::new(1_000, 500)).unwrap();
    let late = k.admit(&t, &r()).unwrap();
    assert_eq!(denied(&k, &t, &r()).status(), 402);

    // After midnight the call admitted yesterday settles: the period renews first, then charges.
    clock.set(T0 + 24 * 3_600_000 + 5);
    k.commit(&late.execution_id, Usage::new(1_000, 500)).unwrap();
    let agent = k.agent("daily").unwrap();
    assert_eq!((agent.spent_micro, agent.reserved_micro, agent.period_start_ms), (450, 0, T0 + 24 * 3_600_000));
    let renewed = k.events(1, 100).unwrap().into_iter().filter(|e| e.kind == "agent.budget_renewed").count();
    assert_eq!(renewed, 1);
    k.admit(&t, &r()).unwrap();
    assert_eq!(denied(&k, &t, &r()).status(), 402, "450 + 450 spent or reserved of 1000");
    assert_clean(&k);
}

#[test]
fn changing_the_period_never_leaves_an_agent_instantly_over_budget() {
    let (k, clock) = kernel();
    clock.set(T0 + 10 * 86_400_000 + 3_600_000);
    let t = agent(&k, "atlas", 1_000);
    let a = k.admit(&t, &AdmitRequest::new(MODEL).input_tokens(1_000).max_output_tokens(500)).unwrap();
    k.commit(&a.execution_id, Usage::new(1_000, 500)).unwrap();
    let before = k.agent("atlas").unwrap().remaining_micro();
    let after = k.set_budget_period("atlas", BudgetPeriod::Month).unwrap();
    assert_eq!(after.remaining_micro(), before);
    assert_eq!(after.period_start_ms, BudgetPeriod::Month.start_of(T0 + 10 * 86_400_000));
    k.admit(&t, &AdmitRequest::new(MODEL).input_tokens(1_000).max_output_tokens(500)).unwrap();
    assert_clean(&k);
}

#[test]
fn team_budgets_reserve_all_or_nothing_and_post_to_every_level() {
    let (k, _) = kernel();
    k.create_team(&TeamSpec::new("org", 2_000)).unwrap();
    k.create_team(&TeamSpec { parent: Some("org".into()), ..TeamSpec::new("research", 1_000) }).unwrap();
    let a = k.create_agent(&AgentSpec { team: Some("research".into()), ..AgentSpec::new("a", 10_000) }).unwrap();
    let b = k.create_agent(&AgentSpec { team: Some("research".into()), ..AgentSpec::new("b", 10_000) }).unwrap();
    assert_eq!(a.agent.team.as_deref(), Some("research"));
    let r = || AdmitRequest::new(MODEL).input_tokens(1_000).max_output_tokens(500); // 450

    let x = k.admit(a.token.expose(), &r()).unwrap();
    k.admit(b.token.expose(), &r()).unwrap();
    assert_eq!(k.team("research").unwrap().reserved_micro, 900);
    assert_eq!(k.team("org").unwrap().reserved_micro, 900);
    // The agent has room; its team does not.
    let e = denied(&k, a.token.expose(), &r());
    assert_eq!(e, Error::InsufficientBudget { agent: "a".into(), team: Some("research".into()), needed_micro: 450, remaining_micro: 100 });
    assert_eq!(e.reason(), "team_budget_exceeded");
    assert_eq!(k.agent("a").unwrap().reserved_micro, 450, "nothing reserved on the agent either");

    let s = k.commit(&x.execution_id, Usage::new(1_000, 100)).unwrap();
    assert_eq!(s.cost_micro, 210);
    for team in ["research", "org"] {
        let t = k.team(team).unwrap();
        assert_eq!((t.spent_micro, t.reserved_micro), (210, 450), "{team}");
    }
    // The grandparent can be the one that says no.
    k.set_team_budget("research", 1_000_000).unwrap();
    k.set_team_budget("org", 1_000).unwrap();
    assert_eq!(denied(&k, a.token.expose(), &r()), Error::InsufficientBudget {
        agent: "a".into(),
        team: Some("org".into()),
        needed_micro: 450,
        remaining_micro: 1_000 - 210 - 450,
    });

    assert_eq!(k.delete_team("research").unwrap_err().status(), 409);
    assert_eq!(k.create_agent(&AgentSpec { team: Some("ghost".into()), ..AgentSpec::new("c", 1) }).unwrap_err().reason(), "team_not_found");
    assert_eq!(k.create_team(&TeamSpec::new("org", 1)).unwrap_err().reason(), "name_taken");
    assert_eq!(k.create_team(&TeamSpec::new("bad", -1)).unwrap_err().status(), 400);
    k.delete_agent("a").unwrap();
    k.delete_agent("b").unwrap();
    k.delete_team("research").unwrap();
    assert_eq!(k.list_teams().unwrap().len(), 1);
    assert_clean(&k);
}

#[test]
fn tampered_team_counters_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aex.db");
    let k = file_kernel(&path);
    k.create_team(&TeamSpec::new("org", 10_000)).unwrap();
    let t = k.create_agent(&AgentSpec { team: Some("org".into()), ..AgentSpec::new("a", 10_000) }).unwrap().token;
    let x = k.admit(t.expose(), &AdmitRequest::new(MODEL).input_tokens(10).max_output_tokens(10)).unwrap();
    k.commit(&x.execution_id, Usage::new(10, 10)).unwrap();
    assert_clean(&k);
    rusqlite::Connection::open(&path).unwrap().execute("UPDATE teams SET spent_micro = 0", []).unwrap();
    let f = k.audit(None).unwrap().failure.unwrap();
    assert_eq!((f.rule, f.agent.as_deref()), (aex_core::AuditRule::Counters, Some("team:org")), "{f}");
}

#[test]
fn threads_racing_through_a_shared_team_budget_never_overshoot_it() {
    const K: i64 = 60;
    const PER_CALL: i64 = 450;
    let dir = tempfile::tempdir().unwrap();
    let k = file_kernel(&dir.path().join("aex.db"));
    k.create_team(&TeamSpec::new("org", K * PER_CALL)).unwrap();
    let tokens: Vec<String> = (0..4)
        .map(|i| {
            let s = AgentSpec { team: Some("org".into()), ..AgentSpec::new(format!("agent-{i}"), 1_000_000) };
            k.create_agent(&s).unwrap().token.expose().to_string()
        })
        .collect();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let (k, token) = (k.clone(), tokens[i % 4].clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while let Ok(a) = k.admit(&token, &AdmitRequest::new(MODEL).input_tokens(1_000).max_output_tokens(500)) {
                    let team = k.team("org").unwrap();
                    assert!(team.spent_micro + team.reserved_micro <= team.budget_micro, "{team:?}");
                    k.commit(&a.execution_id, Usage::new(1_000, 500)).unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: i64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, K);
    assert_eq!(k.team("org").unwrap().spent_micro, K * PER_CALL);
    assert_clean(&k);
}

#[test]
fn spend_from_before_a_period_change_still_audits() {
    let (k, clock) = kernel();
    let t = agent(&k, "atlas", 10_000);
    let a = k.admit(&t, &AdmitRequest::new(MODEL).input_tokens(1_000).max_output_tokens(500)).unwrap();
    k.commit(&a.execution_id, Usage::new(1_000, 500)).unwrap(); // charged in January
    clock.set(T0 + 40 * 86_400_000); // February 10
    k.set_budget_period("atlas", BudgetPeriod::Month).unwrap();
    assert_eq!(k.agent("atlas").unwrap().spent_micro, 450, "kept across the change");
    assert_clean(&k);
    clock.set(T0 + 60 * 86_400_000); // March 2: renewed on the next touch
    let b = k.admit(&t, &AdmitRequest::new(MODEL).input_tokens(1_000).max_output_tokens(500)).unwrap();
    k.commit(&b.execution_id, Usage::new(1_000, 500)).unwrap();
    assert_eq!(k.agent("atlas").unwrap().spent_micro, 450);
    assert_clean(&k);
}
