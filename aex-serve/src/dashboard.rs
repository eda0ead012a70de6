//! `GET /dashboard`: one self-contained page (no external assets) that polls
//! `GET /dashboard/data` every second and shows, for an operator deciding whether to sever an
//! agent: each agent's budget as a bar of spent / reserved / remaining, its burn rate over the
//! last hour and the time to exhaustion at that rate, denials by reason, the latest ledger events,
//! and the audit's status and head.
//!
//! The data is read from the store, so it covers every agent sharing the database (in-process
//! Python and C agents too), not only the gateway's. The audit walks the whole ledger, so it is
//! re-run when the ledger has grown (at most every [`AUDIT_EVERY`]) and otherwise every
//! [`AUDIT_MAX_AGE`] (the page shows the head it verified); everything else is read at each poll.
//!
//! With an admin token, `/dashboard?token=…` checks it once and sets an `HttpOnly`,
//! `SameSite=Strict` cookie, so the page and its polls carry it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde_json::{Value, json};

use crate::App;
use crate::admin::admin;
use crate::errors::ApiError;

/// The audit is re-run when the ledger has grown, at most this often.
pub const AUDIT_EVERY: Duration = Duration::from_secs(2);
/// ... and at least this often, so an edit that adds no ledger event shows within it.
pub const AUDIT_MAX_AGE: Duration = Duration::from_secs(10);
/// The window burn rates are measured over.
const BURN_WINDOW_MS: i64 = 3_600_000;
/// How many of the latest events the page lists, and how far back denials are counted.
const LATEST: usize = 25;
const DENIALS_OVER: usize = 1_000;

/// The last audit: when it ran, the head it was asked about, and its report.
#[derive(Default)]
pub(crate) struct AuditCache(parking_lot::Mutex<Option<(Instant, Option<String>, Value)>>);

#[derive(serde::Deserialize)]
pub(crate) struct Login {
    token: Option<String>,
}

pub(crate) async fn page(State(app): State<Arc<App>>, headers: HeaderMap, Query(login): Query<Login>) -> Result<Response, ApiError> {
    if let Some(token) = login.token {
        // Check it as a bearer token would be, then keep it in a cookie and drop it from the URL.
        let mut as_header = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
            as_header.insert(header::AUTHORIZATION, v);
        }
        admin(&app, &as_header)?;
        let cookie = format!("aex_admin={token}; HttpOnly; SameSite=Strict; Path=/");
        let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/dashboard")]).into_response();
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, v);
        }
        return Ok(response);
    }
    admin(&app, &headers)?;
    Ok(Html(PAGE).into_response())
}

pub(crate) async fn data(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let k = &app.kernel;
    let burned = k.spend_in_window(BURN_WINDOW_MS)?;
    let agents: Vec<Value> = k
        .list_agents()?
        .iter()
        .map(|a| {
            let remaining = a.remaining_micro();
            let per_hour = burned.get(&a.name).copied().unwrap_or(0);
            let hours_left = (per_hour > 0).then(|| remaining.max(0) as f64 / per_hour as f64);
            json!({
                "name": a.name, "disabled": a.disabled, "team": a.team,
                "budget_micro": a.budget_micro, "spent_micro": a.spent_micro,
                "reserved_micro": a.reserved_micro, "remaining_micro": remaining,
                "burn_micro_per_hour": per_hour, "hours_to_exhaustion": hours_left,
            })
        })
        .collect();
    let head = k.head()?;
    let newest = head.as_ref().map_or(0, |h| h.seq);
    let recent = k.events(newest.saturating_sub(DENIALS_OVER as u64 - 1).max(1), DENIALS_OVER)?;
    let mut denials: BTreeMap<String, u64> = BTreeMap::new();
    for e in recent.iter().filter(|e| e.kind == "admission.denied") {
        let reason = serde_json::from_str::<Value>(&e.data).ok().and_then(|d| d.get("reason")?.as_str().map(str::to_string)).unwrap_or_default();
        *denials.entry(reason).or_default() += 1;
    }
    let latest: Vec<Value> = recent.iter().rev().take(LATEST).map(aex_core::wire::event_json).collect();
    let head_text = head.as_ref().map(aex_core::Head::to_text);
    let audit = {
        let mut cache = app.audit.0.lock();
        match cache.as_ref() {
            // Fresh enough: checked within AUDIT_EVERY, or the ledger has not grown and it was
            // checked within AUDIT_MAX_AGE (an edit that adds no event is found within that).
            Some((at, seen, report)) if at.elapsed() < AUDIT_EVERY || (*seen == head_text && at.elapsed() < AUDIT_MAX_AGE) => report.clone(),
            _ => {
                let report = aex_core::wire::audit_json(&k.audit(None)?);
                *cache = Some((Instant::now(), head_text.clone(), report.clone()));
                report
            }
        }
    };
    Ok(Json(json!({
        "now_ms": k.now_ms(),
        "head": head_text,
        "agents": agents,
        "denials": denials,
        "denials_over_events": DENIALS_OVER,
        "latest": latest,
        "audit": audit,
    })))
}

/// The page: HTML, CSS and script in one, nothing fetched from elsewhere.
const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>aex — live</title>
<style>
  :root { --spent: #d9534f; --reserved: #f0ad4e; --left: #5cb85c; --ink: #1d2330; --muted: #6b7280; }
  body { font: 14px/1.4 system-ui, sans-serif; color: var(--ink); margin: 0; background: #f6f7f9; }
  header { display: flex; gap: 1.5rem; align-items: baseline; padding: .8rem 1.2rem; background: #1d2330; color: #fff; }
  header h1 { font-size: 1.1rem; margin: 0; }
  #audit.clean { color: #8fe39b; } #audit.failed { color: #ff8a80; font-weight: bold; }
  main { display: grid; grid-template-columns: 2fr 1fr; gap: 1rem; padding: 1rem 1.2rem; }
  section { background: #fff; border-radius: 6px; padding: .8rem 1rem; box-shadow: 0 1px 2px #0001; }
  h2 { font-size: .95rem; margin: 0 0 .6rem; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
  table { width: 100%; border-collapse: collapse; }
  td, th { text-align: left; padding: .3rem .4rem; border-bottom: 1px solid #eee; font-variant-numeric: tabular-nums; }
  .bar { display: flex; height: 12px; width: 220px; border-radius: 3px; overflow: hidden; background: #eee; }
  .bar span { display: block; height: 100%; }
  .bar .s { background: var(--spent); } .bar .r { background: var(--reserved); } .bar .l { background: var(--left); }
  tr.disabled td { color: var(--muted); text-decoration: line-through; }
  tr.low td.remaining { color: var(--spent); font-weight: bold; }
  .muted { color: var(--muted); }
  #events td { font-size: 12px; }
  .legend span { display: inline-block; width: .8em; height: .8em; margin: 0 .2em 0 .8em; border-radius: 2px; }
</style>
</head>
<body>
<header>
  <h1>aex</h1>
  <div>audit: <span id="audit">…</span></div>
  <div>head: <code id="head">…</code></div>
  <div class="muted">updated <span id="updated">never</span></div>
</header>
<main>
  <section style="grid-column: 1 / -1">
    <h2>Agents <span class="legend muted"><span style="background:var(--spent)"></span>spent<span style="background:var(--reserved)"></span>reserved<span style="background:var(--left)"></span>remaining</span></h2>
    <table id="agents"><thead><tr><th>agent</th><th>budget</th><th></th><th>spent</th><th>reserved</th><th>remaining</th><th>burn /h</th><th>runs out in</th><th>state</th></tr></thead><tbody></tbody></table>
  </section>
  <section>
    <h2>Latest events</h2>
    <table id="events"><tbody></tbody></table>
  </section>
  <section>
    <h2>Denials by reason</h2>
    <table id="denials"><tbody></tbody></table>
    <p class="muted" id="denials-note"></p>
  </section>
</main>
<script>
"use strict";
const usd = m => (m < 0 ? "-$" : "$") + (Math.abs(m) / 1e6).toFixed(6).replace(/0{1,4}$/, "");
const text = (tag, value, cls) => { const e = document.createElement(tag); e.textContent = value; if (cls) e.className = cls; return e; };
function hours(h) {
  if (h === null) return "—";
  if (h < 1) return Math.max(1, Math.round(h * 60)) + " min";
  if (h < 48) return h.toFixed(1) + " h";
  return (h / 24).toFixed(1) + " d";
}
function row(cells, attrs) {
  const tr = document.createElement("tr");
  for (const [k, v] of Object.entries(attrs || {})) tr.setAttribute(k, v);
  for (const c of cells) tr.appendChild(c instanceof Node ? c : text("td", c));
  return tr;
}
function bar(a) {
  const total = Math.max(a.budget_micro, a.spent_micro + a.reserved_micro, 1);
  const td = document.createElement("td"), b = document.createElement("div");
  b.className = "bar";
  for (const [cls, v] of [["s", a.spent_micro], ["r", a.reserved_micro], ["l", Math.max(a.remaining_micro, 0)]]) {
    const s = document.createElement("span"); s.className = cls; s.style.width = (100 * v / total) + "%"; b.appendChild(s);
  }
  td.appendChild(b);
  return td;
}
function render(d) {
  const audit = document.getElementById("audit");
  const through = d.audit.head ? ", through event " + d.audit.head.split(":")[0] : "";
  audit.textContent = d.audit.clean ? "clean (" + d.audit.events + " events" + through + ")" : "FAILED: " + (d.audit.failure ? d.audit.failure.message : "?");
  audit.className = d.audit.clean ? "clean" : "failed";
  document.getElementById("head").textContent = d.head || "empty";
  document.getElementById("updated").textContent = new Date(d.now_ms).toLocaleTimeString();
  const agents = document.querySelector("#agents tbody");
  agents.replaceChildren(...d.agents.map(a => {
    const low = a.remaining_micro < 0.1 * a.budget_micro;
    return row([
      text("td", a.name, "name"), text("td", usd(a.budget_micro), "budget"), bar(a),
      text("td", usd(a.spent_micro), "spent"), text("td", usd(a.reserved_micro), "reserved"),
      text("td", usd(a.remaining_micro), "remaining"), text("td", usd(a.burn_micro_per_hour), "burn"),
      text("td", hours(a.hours_to_exhaustion), "exhaustion"), text("td", a.disabled ? "disabled" : "active", "state"),
    ], { "data-agent": a.name, class: (a.disabled ? "disabled " : "") + (low ? "low" : "") });
  }));
  document.querySelector("#events tbody").replaceChildren(...d.latest.map(e => row([
    text("td", e.seq, "seq"), text("td", new Date(e.ts_ms).toLocaleTimeString()), text("td", e.kind, "kind"),
    text("td", e.agent || ""), text("td", e.amount_micro ? usd(e.amount_micro) : ""),
  ], { "data-seq": e.seq })));
  const denials = Object.entries(d.denials).sort((x, y) => y[1] - x[1]);
  document.querySelector("#denials tbody").replaceChildren(...denials.map(([reason, n]) => row([text("td", reason, "reason"), text("td", n, "count")], { "data-reason": reason })));
  document.getElementById("denials-note").textContent = denials.length ? "over the last " + d.denials_over_events + " events" : "none in the last " + d.denials_over_events + " events";
}
async function poll() {
  try {
    const r = await fetch("/dashboard/data", { credentials: "same-origin", cache: "no-store" });
    if (r.ok) render(await r.json());
    else document.getElementById("updated").textContent = "error " + r.status;
  } catch (e) {
    document.getElementById("updated").textContent = "unreachable";
  }
  setTimeout(poll, 1000);
}
poll();
</script>
</body>
</html>
"##;
