//! Secrets and scopes: after a workload that issues, rotates, expires and misuses tokens, no
//! token (nor its secret part) is found in any database file or table, ledger event, error text,
//! error JSON or `Debug` output; a read-only token cannot admit by any path. Part of the
//! conformance suite: on SQLite, and on PostgreSQL when `AEX_TEST_POSTGRES` names a server.

mod common;

use aex_core::{AdmitRequest, AgentSpec, Error, Kernel, KernelOptions, Scope, Usage, wire};
use common::*;

fn req() -> AdmitRequest {
    AdmitRequest::new(MODEL).input_tokens(100).max_output_tokens(50)
}

/// Every form a failed call's error reaches a user in: Display, Debug and the JSON the C ABI
/// and the CLI print.
fn error_texts(e: &Error) -> Vec<String> {
    vec![e.to_string(), format!("{e:?}"), wire::error_json(e).to_string()]
}

#[test]
fn no_token_reaches_files_ledger_errors_or_debug_output() {
    let dir = tempfile::tempdir().unwrap();
    let clock = aex_core::ManualClock::new(T0);
    let options = KernelOptions { store: aex_core::StoreOptions { durability: aex_core::Durability::Normal, ..Default::default() }, ..options(&clock) };
    let db = shared_db(dir.path());
    let k = Kernel::open(&db, options.clone()).unwrap();
    let mut secrets: Vec<String> = Vec::new();
    let mut texts: Vec<String> = vec![format!("{k:?}"), format!("{options:?}")];

    let created = k.create_agent(&AgentSpec::new("atlas", 1_000_000)).unwrap();
    texts.push(format!("{created:?}"));
    texts.push(format!("{}", created.token));
    secrets.push(created.token.expose().to_string());
    let expiring = k.create_agent(&AgentSpec { ttl_ms: Some(1_000), ..AgentSpec::new("brief", 1_000_000) }).unwrap();
    secrets.push(expiring.token.expose().to_string());
    let viewer = k.create_agent(&AgentSpec { scope: Scope::ReadOnly, ..AgentSpec::new("viewer", 1_000_000) }).unwrap();
    secrets.push(viewer.token.expose().to_string());
    let rotated = k.rotate_token("atlas", None).unwrap();
    texts.push(format!("{rotated:?}"));
    secrets.push(rotated.expose().to_string());

    // Work with the live token; every kind of refusal with the others.
    let a = k.admit(rotated.expose(), &req()).unwrap();
    k.commit(&a.execution_id, Usage::new(90, 40)).unwrap();
    clock.advance(2_000);
    let mut errors = vec![
        k.admit(&secrets[0], &req()).unwrap_err(),      // rotated away
        k.admit(&secrets[1], &req()).unwrap_err(),      // expired
        k.admit(&secrets[2], &req()).unwrap_err(),      // read-only
        k.admit_dispatched(&secrets[2], &req()).unwrap_err(),
    ];
    // The live token with its last character changed (to '1' if it already was '0').
    let live = rotated.expose();
    let near_miss = format!("{}{}", &live[..live.len() - 1], if live.ends_with('0') { '1' } else { '0' });
    errors.push(k.admit(&near_miss, &req()).unwrap_err());
    secrets.push(near_miss);
    let malformed = format!("{}!{}", &rotated.expose()[..20], &rotated.expose()[21..]);
    errors.push(k.admit(&malformed, &req()).unwrap_err());
    secrets.push(malformed);
    k.set_disabled("atlas", true).unwrap();
    errors.push(k.admit(rotated.expose(), &req()).unwrap_err());
    k.delete_agent("brief").unwrap();
    errors.push(k.admit(&secrets[1], &req()).unwrap_err());
    assert_eq!(errors.iter().filter(|e| e.status() == 401).count(), 6, "{errors:?}");
    assert_eq!(errors.iter().filter(|e| e.reason() == "scope_read_only").count(), 2, "{errors:?}");
    texts.extend(errors.iter().flat_map(error_texts));
    texts.extend(k.list_agents().unwrap().iter().map(|a| format!("{a:?} {}", wire::agent_json(a))));
    for e in k.events(1, usize::MAX).unwrap() {
        texts.push(format!("{e:?}"));
    }
    drop(k);

    // Every table's rows, and on SQLite every file byte (free pages and the WAL included).
    let mut files = common::raw::Raw::open(&db).dump();
    if !db.starts_with("postgresql://") {
        let on_disk: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| {
                let path = entry.unwrap().path();
                (path.display().to_string(), std::fs::read(&path).unwrap())
            })
            .collect();
        assert!(on_disk.len() >= 2, "the database and its lock file: {:?}", on_disk.iter().map(|f| &f.0).collect::<Vec<_>>());
        files.extend(on_disk);
    }
    assert!(files.iter().any(|(name, rows)| name == "ledger" && !rows.is_empty()), "the dump holds the ledger");
    for secret in &secrets {
        // Past the 10-character display prefix ("aex_" + 6 hex digits), which is not secret.
        let part = &secret[10..];
        for text in &texts {
            assert!(!text.contains(part), "a token's secret part reached: {text}");
        }
        for (name, bytes) in &files {
            assert!(!bytes.windows(part.len()).any(|w| w == part.as_bytes()), "a token's secret part reached {name}");
        }
    }
}

#[test]
fn a_read_only_token_cannot_admit_and_leaves_nothing_reserved() {
    let (k, _clock) = kernel();
    let viewer = k.create_agent(&AgentSpec { scope: Scope::ReadOnly, ..AgentSpec::new("viewer", 1_000_000) }).unwrap();
    for e in [k.admit(viewer.token.expose(), &req()).unwrap_err(), k.admit_dispatched(viewer.token.expose(), &req()).unwrap_err()] {
        assert_eq!((e.status(), e.reason()), (403, "scope_read_only"));
    }
    let a = k.agent("viewer").unwrap();
    assert_eq!((a.spent_micro, a.reserved_micro), (0, 0));
    assert_clean(&k);
}

/// A caller without a valid token cannot grow the ledger: refusals are written once per window
/// in full and otherwise counted into one summary event, which the next window's first refusal
/// (or dropping the kernel) writes.
#[test]
fn refused_tokens_write_a_bounded_number_of_events() {
    use aex_core::admission::REFUSED_TOKENS_WINDOW_MS;
    let dir = tempfile::tempdir().unwrap();
    let path = shared_db(dir.path());
    let clock = aex_core::ManualClock::new(T0);
    let k = Kernel::open(&path, options(&clock)).unwrap();
    let token = agent(&k, "atlas", 1_000_000);
    k.set_disabled("atlas", true).unwrap();
    let before = k.head().unwrap().unwrap().seq;
    for i in 0..2_000 {
        let made_up = format!("aex_{i:048}");
        assert_eq!(k.admit(&made_up, &req()).unwrap_err().reason(), "unknown_token");
    }
    assert_eq!(k.admit(&token, &req()).unwrap_err().reason(), "agent_disabled");
    assert_eq!(k.head().unwrap().unwrap().seq, before + 1, "only the window's first refusal is written");

    clock.advance(REFUSED_TOKENS_WINDOW_MS);
    assert_eq!(k.admit("not-a-token", &req()).unwrap_err().reason(), "unknown_token");
    let events = k.events(before + 1, 10).unwrap();
    let kinds: Vec<(&str, Option<&str>)> = events.iter().map(|e| (e.kind.as_str(), e.execution_id.as_deref())).collect();
    assert_eq!(kinds.len(), 3, "{kinds:?}");
    let summary: serde_json::Value = serde_json::from_str(&events[1].data).unwrap();
    assert_eq!(events[1].kind, "admission.denied");
    assert_eq!(events[1].execution_id, None);
    assert_eq!(summary["count"], 2_000);
    assert_eq!(summary["reasons"]["unknown_token"], 1_999);
    assert_eq!(summary["reasons"]["agent_disabled"], 1);
    assert_eq!((summary["from_ms"].as_i64(), summary["to_ms"].as_i64()), (Some(T0), Some(T0)));
    assert!(events[2].execution_id.is_some(), "the new window's first refusal is written in full");

    // Counted refusals not yet written reach the ledger when the kernel goes away.
    assert!(k.admit("not-a-token", &req()).is_err());
    let head = k.head().unwrap().unwrap().seq;
    drop(k);
    let k = Kernel::open(&path, options(&clock)).unwrap();
    let last = k.events(head + 1, 1).unwrap();
    assert_eq!(last.len(), 1);
    assert!(last[0].data.contains("\"count\":1"), "{}", last[0].data);
    assert_clean(&k);
}
