//! What both stores read the same way: the column lists of their `SELECT`s (the same schema,
//! column for column) and the conversions of columns into what the rules hold.

use crate::outside::Seal;

/// `SELECT <agent columns> FROM agents <rest>`, as a literal so statement lookup costs no
/// formatting. Columns 24–26 are the token digest and the seal.
macro_rules! select_agents {
    ($rest:literal) => {
        concat!(
            "SELECT id, name, token_prefix, scope, ttl_ms, expires_at_ms, disabled, budget_micro, spent_micro, ",
            "reserved_micro, rpm, tpm, allowed_models, allow_tools, allow_streaming, allow_vision, strict, ",
            "allow_passthrough, max_concurrent, budget_period, period_start_ms, team_id, ",
            "(SELECT t.name FROM teams t WHERE t.id = agents.team_id) AS team_name, created_at_ms, token_hash, seal, ",
            "seal_tag FROM agents ",
            $rest
        )
    };
}
pub(super) use select_agents;

/// `SELECT <team columns> FROM teams <rest>`. Columns 8–9 are the seal.
macro_rules! select_teams {
    ($rest:literal) => {
        concat!(
            "SELECT id, name, parent_id, (SELECT p.name FROM teams p WHERE p.id = teams.parent_id) AS parent_name, ",
            "budget_micro, spent_micro, reserved_micro, created_at_ms, seal, seal_tag FROM teams ",
            $rest
        )
    };
}
pub(super) use select_teams;

/// `SELECT <execution columns> FROM executions <rest>`.
macro_rules! select_executions {
    ($rest:literal) => {
        concat!(
            "SELECT id, agent_id, agent, request_hash, state, model, input_tokens, max_output_tokens, input_price, ",
            "output_price, cached_input_price, reserved_micro, cost_micro, usage_input, usage_output, ",
            "usage_cached_input, reason, created_at_ms, expires_at_ms, dispatched_at_ms, settled_at_ms, teams, ",
            "rate_scopes, rate_tokens FROM executions ",
            $rest
        )
    };
}
pub(super) use select_executions;

/// A limit column as the rules hold it. A value edited out of range by hand reads as the nearest
/// one in range — below zero as 0 (nothing passes: a restriction), above as the largest (a
/// loosening) — so the row reaches the seal check, which records or refuses it, instead of
/// failing every read of the table.
pub(super) fn limit_u32(v: Option<i64>) -> Option<u32> {
    v.map(|v| u32::try_from(v.max(0)).unwrap_or(u32::MAX))
}

/// A 32-byte digest column. A tampered value of the wrong length still loads (padded or cut), so
/// the check that reads it reports the mismatch.
pub(super) fn blob32(v: Vec<u8>) -> [u8; 32] {
    let mut out = [0u8; 32];
    let n = v.len().min(32);
    out[..n].copy_from_slice(&v[..n]);
    out
}

/// A seal from its two columns; `None` when either is missing.
pub(super) fn seal_from(text: Option<String>, tag: Option<Vec<u8>>) -> Option<Seal> {
    Some(Seal { text: text?, tag: tag? })
}
