//! Runs every shared scenario vector in `tests/vectors/*.json` through the Rust API. The C and
//! Python suites run the same files; all three must agree exactly. The format is described in
//! `tests/vectors/README.md`.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use aex_core::{Config, KernelOptions, ManualClock, TeamSpec, wire};
use serde_json::{Value, json};

fn vectors() -> Vec<(PathBuf, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors");
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "json")).collect();
    files.sort();
    assert!(files.len() >= 5, "expected the shared vectors in {}", dir.display());
    files.into_iter().map(|p| (p.clone(), serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap())).collect()
}

fn ok(v: Value) -> Value {
    let mut v = v;
    v["status"] = json!(0);
    v
}

fn outcome<T>(r: aex_core::Result<T>, to_json: impl FnOnce(&T) -> Value) -> Value {
    match r {
        Ok(v) => ok(to_json(&v)),
        Err(e) => wire::error_json(&e),
    }
}

fn s<'a>(step: &'a Value, key: &str) -> &'a str {
    step[key].as_str().unwrap_or_else(|| panic!("step {step} needs a string '{key}'"))
}

fn run(path: &std::path::Path, v: &Value) {
    let clock = ManualClock::new(v["start_ms"].as_i64().unwrap());
    let mut options = KernelOptions { clock: Arc::new(clock.clone()), ..Default::default() };
    options.config = Config::from_yaml(v["models_yaml"].as_str().unwrap()).unwrap();
    if let Some(ttl) = v["reservation_ttl_ms"].as_i64() {
        options.reservation_ttl_ms = ttl;
    }
    let k = common::store_kernel(options);
    let mut names: HashMap<String, String> = HashMap::new();
    let lookup = |names: &HashMap<String, String>, key: &str| names.get(key).cloned().unwrap_or_else(|| key.to_string());

    for (i, step) in v["steps"].as_array().unwrap().iter().enumerate() {
        let op = s(step, "op");
        let result = match op {
            "create_agent" => {
                let r = wire::agent_spec(&step["spec"].to_string()).and_then(|spec| k.create_agent(&spec));
                if let (Ok(created), Some(alias)) = (&r, step["as"].as_str()) {
                    names.insert(alias.to_string(), created.token.expose().to_string());
                }
                outcome(r, |c| wire::agent_json(&c.agent))
            }
            "create_team" => {
                let spec = TeamSpec {
                    name: s(step, "name").to_string(),
                    budget_micro: step["budget_micro"].as_i64().unwrap(),
                    parent: step["parent"].as_str().map(str::to_string),
                };
                outcome(k.create_team(&spec), wire::team_json)
            }
            "admit" => {
                let token = lookup(&names, s(step, "token"));
                let r = wire::admit_request(&step["request"].to_string()).and_then(|req| k.admit(&token, &req));
                if let (Ok(a), Some(alias)) = (&r, step["as"].as_str()) {
                    names.insert(alias.to_string(), a.execution_id.clone());
                }
                outcome(r, wire::admission_json)
            }
            "dispatch" => outcome(k.mark_dispatched(&lookup(&names, s(step, "execution"))), |e| json!({"state": e.state.as_str()})),
            "commit" => {
                let id = lookup(&names, s(step, "execution"));
                outcome(wire::usage(&step["usage"].to_string()).and_then(|u| k.commit(&id, u)), wire::settlement_json)
            }
            "release" => outcome(k.release(&lookup(&names, s(step, "execution")), s(step, "reason")), wire::settlement_json),
            "fail" => outcome(k.fail(&lookup(&names, s(step, "execution")), s(step, "error")), wire::settlement_json),
            "set_budget" => outcome(k.set_budget(s(step, "agent"), step["budget_micro"].as_i64().unwrap()), wire::agent_json),
            "disable" => outcome(k.set_disabled(s(step, "agent"), true), wire::agent_json),
            "enable" => outcome(k.set_disabled(s(step, "agent"), false), wire::agent_json),
            "delete_agent" => outcome(k.delete_agent(s(step, "agent")), |()| json!({})),
            "rotate_token" => {
                let r = k.rotate_token(s(step, "agent"), step["ttl_ms"].as_i64());
                if let (Ok(t), Some(alias)) = (&r, step["as"].as_str()) {
                    names.insert(alias.to_string(), t.expose().to_string());
                }
                outcome(r, |_| json!({}))
            }
            "inspect" => outcome(k.agent(s(step, "agent")), wire::agent_json),
            "inspect_team" => outcome(k.team(s(step, "team")), wire::team_json),
            "advance" => {
                clock.advance(step["ms"].as_i64().unwrap());
                ok(json!({}))
            }
            "audit" => outcome(k.audit(None), wire::audit_json),
            other => panic!("{}: unknown op '{other}'", path.display()),
        };
        let expect = step.get("expect").cloned().unwrap_or_else(|| json!({"status": 0}));
        let expect = if expect.get("status").is_none() { ok(expect) } else { expect };
        for (key, want) in expect.as_object().unwrap() {
            assert_eq!(
                &result[key],
                want,
                "{} step {i} ({op}): '{key}' differs; the whole result was {result}",
                path.file_name().unwrap().to_string_lossy()
            );
        }
    }
}

#[test]
fn every_shared_vector_passes_through_the_rust_api() {
    for (path, v) in vectors() {
        run(&path, &v);
    }
}
