//! Rate windows: requests and tokens per minute, and open executions, checked at admission.
//!
//! Windows slide; they are not fixed minutes (a fixed window admits two full windows' worth
//! across its boundary). Their state lives in the store, in one-second buckets per scope
//! (`a:<agent id>`, `m:<model>`, `g` for global), so every process sharing the file shares them.
//! A check sums the buckets of the last **61** seconds: that span always covers the 60 s before
//! now, so no 60-second span ever holds more than the limit — at worst a request waits up to one
//! second longer than an exact log would make it. A denial's `retry_after_ms` is computed from the
//! buckets: when the oldest ones leave the window, there will be room.
//!
//! TPM counts the reservation's token estimate (input + max output) at admission and is corrected
//! at settlement: to the real usage on commit, to nothing on release, failure or expiry without
//! dispatch. Only scopes with a limit are written, so unlimited agents pay nothing. Old buckets
//! are pruned on access; there is no background job.

use crate::admission::AdmitRequest;
use crate::agent::Agent;
use crate::config::Config;
use crate::error::{Error, PolicyRule, RateWindow, Result};
use crate::store::Tx;

/// The window length.
pub const WINDOW_MS: i64 = 60_000;
const BUCKET_MS: i64 = 1_000;
/// Buckets summed: one more than the window holds, so the whole window is always covered.
const BUCKETS: i64 = WINDOW_MS / BUCKET_MS + 1;

/// One second of one scope's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Seconds since the epoch.
    pub second: i64,
    /// Requests admitted in that second.
    pub requests: i64,
    /// Tokens counted for them (estimates, corrected at settlement).
    pub tokens: i64,
}

/// What an admission will record once the budget also says yes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Plan {
    /// The scopes written, space-separated (stored with the execution for the correction).
    pub scopes: String,
    /// The tokens counted.
    pub tokens: i64,
}

struct Limit {
    window: RateWindow,
    limit: u64,
    requests: bool,
}

/// The first bucket of the window ending at `now`.
pub(crate) fn first_bucket(now: i64) -> i64 {
    bucket_of(now) - BUCKETS + 1
}

/// The bucket (second) a time falls in.
pub(crate) fn bucket_of(ms: i64) -> i64 {
    ms.div_euclid(BUCKET_MS)
}

/// When, in ms from `now`, dropping the oldest buckets brings `used + need` within `limit`.
fn retry_after(buckets: &[Bucket], used: i64, need: i64, limit: i64, requests: bool, now: i64) -> u64 {
    let mut left = used;
    for b in buckets {
        left -= if requests { b.requests } else { b.tokens };
        if left + need <= limit {
            return u64::try_from(((b.second + BUCKETS) * BUCKET_MS - now).max(1)).unwrap_or(1);
        }
    }
    WINDOW_MS as u64
}

/// Checks every rate window and concurrency cap that applies. The outer `Result` is a store
/// error; the inner one a denial.
pub(crate) fn check(tx: &mut dyn Tx, agent: &Agent, config: &Config, req: &AdmitRequest, tokens: i64, now: i64) -> Result<Result<Plan>> {
    let mut scopes: Vec<(String, Vec<Limit>)> = Vec::new();
    let mut agent_limits = Vec::new();
    if let Some(rpm) = agent.rpm {
        agent_limits.push(Limit { window: RateWindow::AgentRpm, limit: u64::from(rpm), requests: true });
    }
    if let Some(tpm) = agent.tpm {
        agent_limits.push(Limit { window: RateWindow::AgentTpm, limit: tpm, requests: false });
    }
    if !agent_limits.is_empty() {
        scopes.push((format!("a:{}", agent.id), agent_limits));
    }
    if let Some(&tpm) = config.limits().model_tokens_per_minute.get(&req.model) {
        scopes.push((format!("m:{}", req.model), vec![Limit { window: RateWindow::ModelTpm, limit: tpm, requests: false }]));
    }
    if let Some(tpm) = config.limits().max_tokens_per_minute {
        scopes.push(("g".to_string(), vec![Limit { window: RateWindow::GlobalTpm, limit: tpm, requests: false }]));
    }

    for (scope, limits) in &scopes {
        let mut buckets = tx.rate_buckets(scope, first_bucket(now))?;
        buckets.sort_by_key(|b| b.second);
        for l in limits {
            let limit = i64::try_from(l.limit).unwrap_or(i64::MAX);
            let (used, need) = if l.requests {
                (buckets.iter().map(|b| b.requests).sum::<i64>(), 1)
            } else {
                (buckets.iter().map(|b| b.tokens).sum::<i64>(), tokens)
            };
            if need > limit {
                return Ok(Err(Error::PolicyDenied {
                    reason: PolicyRule::ExceedsRateLimit,
                    message: format!("the request needs {need} tokens but {} allows {limit} per minute", l.window),
                }));
            }
            if used + need > limit {
                let retry_after_ms = retry_after(&buckets, used, need, limit, l.requests, now);
                return Ok(Err(Error::RateLimited { window: l.window, limit: l.limit, retry_after_ms }));
            }
        }
    }

    let caps = [
        (agent.max_concurrent.map(u64::from), Some(agent.id), RateWindow::AgentConcurrency),
        (config.limits().max_concurrent, None, RateWindow::GlobalConcurrency),
    ];
    for (cap, agent_id, window) in caps {
        let Some(cap) = cap else { continue };
        let (open, earliest_expiry) = tx.open_count(agent_id)?;
        if u64::try_from(open).unwrap_or(0) >= cap {
            let retry_after_ms = earliest_expiry.map_or(1, |t| u64::try_from((t - now).max(1)).unwrap_or(1));
            return Ok(Err(Error::RateLimited { window, limit: cap, retry_after_ms }));
        }
    }

    let scopes = scopes.into_iter().map(|(s, _)| s).collect::<Vec<_>>().join(" ");
    Ok(Ok(Plan { scopes, tokens }))
}

/// Counts an admitted request in every scope of its plan and prunes old buckets.
pub(crate) fn record(tx: &mut dyn Tx, plan: &Plan, now: i64) -> Result<()> {
    let second = bucket_of(now);
    for scope in plan.scopes.split_whitespace() {
        tx.rate_add(scope, second, 1, plan.tokens)?;
        tx.rate_prune(scope, first_bucket(now))?;
    }
    Ok(())
}

/// Corrects the tokens an admission counted by `delta` (real minus estimated), if its bucket is
/// still in the store.
pub(crate) fn correct(tx: &mut dyn Tx, scopes: &str, admitted_at_ms: i64, delta: i64) -> Result<()> {
    if delta == 0 {
        return Ok(());
    }
    let second = admitted_at_ms.div_euclid(BUCKET_MS);
    for scope in scopes.split_whitespace() {
        tx.rate_adjust(scope, second, delta)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_waits_for_the_oldest_buckets_to_leave() {
        let now = 100_500; // second 100
        let b = |second, tokens| Bucket { second, requests: 1, tokens };
        let buckets = [b(40, 300), b(70, 300), b(99, 300)];
        // Limit 1000, 900 used, need 200: bucket 40 must leave, at second 101.
        assert_eq!(retry_after(&buckets, 900, 200, 1_000, false, now), 500);
        // Need 500: buckets 40 and 70 must leave, at second 131.
        assert_eq!(retry_after(&buckets, 900, 500, 1_000, false, now), 30_500);
        assert_eq!(first_bucket(now), 40);
    }
}
