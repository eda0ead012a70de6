//! The [`Tx`] methods in SQL, over a [`Pipe`]: reads go out at once (with any writes queued
//! before them), writes wait for the next round trip.

use tokio_postgres::Row;

use super::is_unique_violation;
use super::pipeline::{Params, Pipe, Purpose, HEAD};
use crate::agent::{Agent, Capabilities};
use crate::auth::{Scope, TokenHash};
use crate::budget::BudgetPeriod;
use crate::config::Prices;
use crate::error::{ConflictReason, Error, Result};
use crate::execution::{Execution, ExecutionState};
use crate::ledger::{Event, Head};
use crate::outside::Seal;
use crate::rate::Bucket;
use crate::settlement::Usage;
use crate::store::columns::{blob32, limit_u32, seal_from, select_agents, select_executions, select_teams};
use crate::store::{Prefetch, Tx};
use crate::team::Team;

/// One closure's view of a transaction.
pub(super) struct PgTx<'p, 'c> {
    pub(super) pipe: &'p mut Pipe<'c>,
}

impl PgTx<'_, '_> {
    fn query(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Vec<Row>> {
        self.pipe.query(sql, params)
    }

    fn query_opt(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Option<Row>> {
        Ok(self.pipe.query(sql, params)?.into_iter().next())
    }

    /// A write: queued, sent with the next read or the commit.
    fn execute(&mut self, sql: &'static str, params: &Params<'_>) -> Result<()> {
        self.pipe.defer(sql, params)
    }

    /// A write to the agent `id`: that agent is read again.
    fn execute_agent(&mut self, id: i64, sql: &'static str, params: &Params<'_>) -> Result<()> {
        self.pipe.cache.agents.retain(|a| a.0.id != id);
        self.pipe.forget_prefetched(|p| *p == Purpose::Agent);
        self.execute(sql, params)
    }

    /// A write to the team `id`: that team is read again.
    fn execute_team(&mut self, id: i64, sql: &'static str, params: &Params<'_>) -> Result<()> {
        self.pipe.cache.teams.retain(|t| t.0.id != id);
        self.execute(sql, params)
    }

    /// A row added to or removed from `agents` or `teams` (an agent row carries its team's
    /// name): everything of either is read again.
    fn execute_rows(&mut self, sql: &'static str, params: &Params<'_>) -> Result<()> {
        self.pipe.forget_prefetched(|p| *p == Purpose::Agent);
        self.pipe.cache.agents.clear();
        self.pipe.cache.teams.clear();
        self.execute(sql, params)
    }

    /// Runs an insert that returns one id, naming a unique-name violation as a conflict. The
    /// violation aborts the transaction, so it runs inside a savepoint.
    fn insert_named(&mut self, sql: &'static str, params: &Params<'_>, what: &str, name: &str) -> Result<i64> {
        self.pipe.forget_prefetched(|p| *p == Purpose::Agent);
        self.pipe.cache.agents.clear();
        self.pipe.cache.teams.clear();
        self.pipe.defer("SAVEPOINT aex_insert", &[])?;
        match self.pipe.fetch(sql, params)? {
            Ok(rows) => {
                self.pipe.defer("RELEASE SAVEPOINT aex_insert", &[])?;
                let row = rows.first().ok_or_else(|| Error::Internal(format!("inserting {what} returned no id")))?;
                get(row, 0)
            }
            Err(e) if is_unique_violation(&e) => {
                self.pipe.recover("ROLLBACK TO SAVEPOINT aex_insert")?;
                self.pipe.defer("RELEASE SAVEPOINT aex_insert", &[])?;
                Err(Error::conflict(ConflictReason::NameTaken, format!("{what} named '{name}' exists already")))
            }
            Err(e) => Err(super::pg(&e)),
        }
    }

    /// An agent, from memory if read in this transaction, else by `sql` (one of the agent
    /// selects, its one parameter `key`).
    fn agent_where(
        &mut self,
        hit: impl Fn(&(Agent, TokenHash, Option<Seal>)) -> bool,
        sql: &'static str,
        key: &(dyn tokio_postgres::types::ToSql + Sync),
    ) -> Result<Option<Agent>> {
        if let Some(found) = self.pipe.cache.agents.iter().find(|a| hit(a)) {
            return Ok(Some(found.0.clone()));
        }
        let Some(row) = self.query_opt(sql, &[key])? else {
            return Ok(None);
        };
        let found = agent_from_row(&row)?;
        let agent = found.0.clone();
        self.pipe.cache.agents.push(found);
        Ok(Some(agent))
    }

    fn team_where(
        &mut self,
        hit: impl Fn(&Team) -> bool,
        sql: &'static str,
        key: &(dyn tokio_postgres::types::ToSql + Sync),
    ) -> Result<Option<Team>> {
        if let Some(found) = self.pipe.cache.teams.iter().find(|t| hit(&t.0)) {
            return Ok(Some(found.0.clone()));
        }
        let Some(row) = self.query_opt(sql, &[key])? else {
            return Ok(None);
        };
        let found = team_from_row(&row)?;
        let team = found.0.clone();
        self.pipe.cache.teams.push(found);
        Ok(Some(team))
    }
}

/// One column, with a type mismatch (a column edited to another type by hand) as an error.
pub(super) fn get<'r, T: tokio_postgres::types::FromSql<'r>>(row: &'r Row, i: usize) -> Result<T> {
    row.try_get(i).map_err(|e| Error::Unavailable(format!("PostgreSQL returned an unreadable column {i}: {e}")))
}

/// An agent row (of `select_agents!`), with its token digest and seal.
pub(super) fn agent_from_row(r: &Row) -> Result<(Agent, TokenHash, Option<Seal>)> {
    let scope: String = get(r, 3)?;
    let models: String = get(r, 12)?;
    let agent = Agent {
        id: get(r, 0)?,
        name: get(r, 1)?,
        token_prefix: get(r, 2)?,
        scope: if scope == Scope::ReadOnly.as_str() { Scope::ReadOnly } else { Scope::Execution },
        ttl_ms: get(r, 4)?,
        expires_at_ms: get(r, 5)?,
        disabled: get(r, 6)?,
        budget_micro: get(r, 7)?,
        spent_micro: get(r, 8)?,
        reserved_micro: get(r, 9)?,
        rpm: limit_u32(get(r, 10)?),
        tpm: get::<Option<i64>>(r, 11)?.map(|v| v.max(0) as u64),
        allowed_models: serde_json::from_str(&models).unwrap_or_default(),
        capabilities: Capabilities { tools: get(r, 13)?, streaming: get(r, 14)?, vision: get(r, 15)? },
        strict: get(r, 16)?,
        allow_passthrough: get(r, 17)?,
        max_concurrent: limit_u32(get(r, 18)?),
        budget_period: BudgetPeriod::parse(&get::<String>(r, 19)?).unwrap_or_default(),
        period_start_ms: get(r, 20)?,
        team_id: get(r, 21)?,
        team: get(r, 22)?,
        created_at_ms: get(r, 23)?,
    };
    Ok((agent, TokenHash(blob32(get(r, 24)?)), seal_from(get(r, 25)?, get(r, 26)?)))
}

/// A team row (of `select_teams!`), with its seal.
fn team_from_row(r: &Row) -> Result<(Team, Option<Seal>)> {
    let team = Team {
        id: get(r, 0)?,
        name: get(r, 1)?,
        parent_id: get(r, 2)?,
        parent: get(r, 3)?,
        budget_micro: get(r, 4)?,
        spent_micro: get(r, 5)?,
        reserved_micro: get(r, 6)?,
        created_at_ms: get(r, 7)?,
    };
    Ok((team, seal_from(get(r, 8)?, get(r, 9)?)))
}

pub(super) fn execution_from_row(r: &Row) -> Result<Execution> {
    let hash: Vec<u8> = get(r, 3)?;
    let state: String = get(r, 4)?;
    let usage = match get::<Option<i64>>(r, 13)? {
        Some(input_tokens) => Some(Usage {
            input_tokens,
            output_tokens: get::<Option<i64>>(r, 14)?.unwrap_or(0),
            cached_input_tokens: get::<Option<i64>>(r, 15)?.unwrap_or(0),
        }),
        None => None,
    };
    Ok(Execution {
        id: get(r, 0)?,
        agent_id: get(r, 1)?,
        agent: get(r, 2)?,
        request_hash: hash.try_into().unwrap_or([0; 32]),
        state: ExecutionState::parse(&state)?,
        model: get(r, 5)?,
        input_tokens: get(r, 6)?,
        max_output_tokens: get(r, 7)?,
        prices: Prices { input: get(r, 8)?, output: get(r, 9)?, cached_input: get(r, 10)? },
        reserved_micro: get(r, 11)?,
        cost_micro: get(r, 12)?,
        usage,
        reason: get(r, 16)?,
        created_at_ms: get(r, 17)?,
        expires_at_ms: get(r, 18)?,
        dispatched_at_ms: get(r, 19)?,
        settled_at_ms: get(r, 20)?,
        teams: get::<String>(r, 21)?.split_whitespace().filter_map(|t| t.parse().ok()).collect(),
        rate_scopes: get(r, 22)?,
        rate_tokens: get(r, 23)?,
    })
}

fn event_from_row(r: &Row) -> Result<Event> {
    Ok(Event {
        seq: get::<i64>(r, 0)?.max(0) as u64,
        ts_ms: get(r, 1)?,
        kind: get(r, 2)?,
        agent: get(r, 3)?,
        execution_id: get(r, 4)?,
        amount_micro: get(r, 5)?,
        data: get(r, 6)?,
        prev_hash: blob32(get(r, 7)?),
        hash: blob32(get(r, 8)?),
    })
}

fn opt_i64(v: Option<u32>) -> Option<i64> {
    v.map(i64::from)
}

impl Tx for PgTx<'_, '_> {
    fn agent_by_token(&mut self, token: &TokenHash) -> Result<Option<Agent>> {
        self.agent_where(|a| a.1 == *token, select_agents!("WHERE token_hash = $1"), &&token.0[..])
    }

    fn agent_by_name(&mut self, name: &str) -> Result<Option<Agent>> {
        self.agent_where(|a| a.0.name == name, select_agents!("WHERE name = $1"), &name)
    }

    fn agent_by_id(&mut self, id: i64) -> Result<Option<Agent>> {
        self.agent_where(|a| a.0.id == id, select_agents!("WHERE id = $1"), &id)
    }

    fn agents(&mut self) -> Result<Vec<Agent>> {
        self.query(select_agents!("ORDER BY agents.name"), &[])?.iter().map(|r| Ok(agent_from_row(r)?.0)).collect()
    }

    fn insert_agent(&mut self, a: &Agent, token: &TokenHash) -> Result<i64> {
        let models = serde_json::to_string(&a.allowed_models).map_err(|e| Error::Internal(e.to_string()))?;
        let tpm = a.tpm.map(|v| v.min(i64::MAX as u64) as i64);
        self.insert_named(
            "INSERT INTO agents (name, token_hash, token_prefix, scope, ttl_ms, expires_at_ms, disabled, budget_micro, \
             spent_micro, reserved_micro, rpm, tpm, allowed_models, allow_tools, allow_streaming, allow_vision, strict, \
             allow_passthrough, max_concurrent, budget_period, period_start_ms, team_id, created_at_ms) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21,$22,$23) RETURNING id",
            &[
                &a.name,
                &&token.0[..],
                &a.token_prefix,
                &a.scope.as_str(),
                &a.ttl_ms,
                &a.expires_at_ms,
                &a.disabled,
                &a.budget_micro,
                &a.spent_micro,
                &a.reserved_micro,
                &opt_i64(a.rpm),
                &tpm,
                &models,
                &a.capabilities.tools,
                &a.capabilities.streaming,
                &a.capabilities.vision,
                &a.strict,
                &a.allow_passthrough,
                &opt_i64(a.max_concurrent),
                &a.budget_period.as_str(),
                &a.period_start_ms,
                &a.team_id,
                &a.created_at_ms,
            ],
            "an agent",
            &a.name,
        )
    }

    fn update_agent(&mut self, a: &Agent) -> Result<()> {
        let models = serde_json::to_string(&a.allowed_models).map_err(|e| Error::Internal(e.to_string()))?;
        let tpm = a.tpm.map(|v| v.min(i64::MAX as u64) as i64);
        self.execute_agent(
            a.id,
            "UPDATE agents SET scope=$2, ttl_ms=$3, expires_at_ms=$4, disabled=$5, budget_micro=$6, spent_micro=$7, \
             reserved_micro=$8, rpm=$9, tpm=$10, allowed_models=$11, allow_tools=$12, allow_streaming=$13, \
             allow_vision=$14, strict=$15, allow_passthrough=$16, max_concurrent=$17, budget_period=$18, \
             period_start_ms=$19, team_id=$20 WHERE id=$1",
            &[
                &a.id,
                &a.scope.as_str(),
                &a.ttl_ms,
                &a.expires_at_ms,
                &a.disabled,
                &a.budget_micro,
                &a.spent_micro,
                &a.reserved_micro,
                &opt_i64(a.rpm),
                &tpm,
                &models,
                &a.capabilities.tools,
                &a.capabilities.streaming,
                &a.capabilities.vision,
                &a.strict,
                &a.allow_passthrough,
                &opt_i64(a.max_concurrent),
                &a.budget_period.as_str(),
                &a.period_start_ms,
                &a.team_id,
            ],
        )?;
        Ok(())
    }

    fn update_counters(&mut self, agent_id: i64, spent_micro: i64, reserved_micro: i64) -> Result<()> {
        self.execute_agent(
            agent_id,
            "UPDATE agents SET spent_micro=$2, reserved_micro=$3 WHERE id=$1",
            &[&agent_id, &spent_micro, &reserved_micro],
        )?;
        Ok(())
    }

    fn update_counters_sealed(&mut self, agent_id: i64, spent_micro: i64, reserved_micro: i64, text: &str, tag: &[u8]) -> Result<()> {
        self.execute_agent(
            agent_id,
            "UPDATE agents SET spent_micro=$2, reserved_micro=$3, seal=$4, seal_tag=$5 WHERE id=$1",
            &[&agent_id, &spent_micro, &reserved_micro, &text, &tag],
        )?;
        Ok(())
    }

    fn set_token(&mut self, agent_id: i64, token: &TokenHash, prefix: &str, expires_at_ms: Option<i64>) -> Result<()> {
        self.execute_agent(
            agent_id,
            "UPDATE agents SET token_hash=$2, token_prefix=$3, expires_at_ms=$4 WHERE id=$1",
            &[&agent_id, &&token.0[..], &prefix, &expires_at_ms],
        )?;
        Ok(())
    }

    fn delete_agent(&mut self, agent_id: i64) -> Result<()> {
        self.execute_rows("DELETE FROM agents WHERE id=$1", &[&agent_id])?;
        Ok(())
    }

    fn agent_seal(&mut self, agent_id: i64) -> Result<Option<(TokenHash, Option<Seal>)>> {
        if let Some(found) = self.pipe.cache.agents.iter().find(|a| a.0.id == agent_id) {
            return Ok(Some((found.1, found.2.clone())));
        }
        self.query_opt("SELECT token_hash, seal, seal_tag FROM agents WHERE id = $1", &[&agent_id])?
            .map(|r| Ok((TokenHash(blob32(get(&r, 0)?)), seal_from(get(&r, 1)?, get(&r, 2)?))))
            .transpose()
    }

    fn set_agent_seal(&mut self, agent_id: i64, text: &str, tag: &[u8]) -> Result<()> {
        self.execute_agent(agent_id, "UPDATE agents SET seal = $2, seal_tag = $3 WHERE id = $1", &[&agent_id, &text, &tag])?;
        Ok(())
    }

    fn team_by_name(&mut self, name: &str) -> Result<Option<Team>> {
        self.team_where(|t| t.name == name, select_teams!("WHERE name = $1"), &name)
    }

    fn team_by_id(&mut self, id: i64) -> Result<Option<Team>> {
        self.team_where(|t| t.id == id, select_teams!("WHERE id = $1"), &id)
    }

    fn teams(&mut self) -> Result<Vec<Team>> {
        self.query(select_teams!("ORDER BY teams.name"), &[])?.iter().map(|r| Ok(team_from_row(r)?.0)).collect()
    }

    fn insert_team(&mut self, t: &Team) -> Result<i64> {
        self.insert_named(
            "INSERT INTO teams (name, parent_id, budget_micro, spent_micro, reserved_micro, created_at_ms) \
             VALUES ($1,$2,$3,$4,$5,$6) RETURNING id",
            &[&t.name, &t.parent_id, &t.budget_micro, &t.spent_micro, &t.reserved_micro, &t.created_at_ms],
            "a team",
            &t.name,
        )
    }

    fn update_team_budget(&mut self, team_id: i64, budget_micro: i64) -> Result<()> {
        self.execute_team(team_id, "UPDATE teams SET budget_micro=$2 WHERE id=$1", &[&team_id, &budget_micro])?;
        Ok(())
    }

    fn update_team_counters(&mut self, team_id: i64, spent_micro: i64, reserved_micro: i64) -> Result<()> {
        self.execute_team(
            team_id,
            "UPDATE teams SET spent_micro=$2, reserved_micro=$3 WHERE id=$1",
            &[&team_id, &spent_micro, &reserved_micro],
        )?;
        Ok(())
    }

    fn update_team_counters_sealed(&mut self, team_id: i64, spent_micro: i64, reserved_micro: i64, text: &str, tag: &[u8]) -> Result<()> {
        self.execute_team(
            team_id,
            "UPDATE teams SET spent_micro=$2, reserved_micro=$3, seal=$4, seal_tag=$5 WHERE id=$1",
            &[&team_id, &spent_micro, &reserved_micro, &text, &tag],
        )?;
        Ok(())
    }

    fn delete_team(&mut self, team_id: i64) -> Result<()> {
        self.execute_rows("DELETE FROM teams WHERE id=$1", &[&team_id])?;
        Ok(())
    }

    fn team_members(&mut self, team_id: i64) -> Result<i64> {
        let row = self.query_opt(
            "SELECT (SELECT COUNT(*) FROM agents WHERE team_id = $1) + (SELECT COUNT(*) FROM teams WHERE parent_id = $1)",
            &[&team_id],
        )?;
        row.map_or(Ok(0), |r| get(&r, 0))
    }

    fn team_seal(&mut self, team_id: i64) -> Result<Option<Seal>> {
        if let Some(found) = self.pipe.cache.teams.iter().find(|t| t.0.id == team_id) {
            return Ok(found.1.clone());
        }
        Ok(self
            .query_opt("SELECT seal, seal_tag FROM teams WHERE id = $1", &[&team_id])?
            .map(|r| Ok::<_, Error>(seal_from(get(&r, 0)?, get(&r, 1)?)))
            .transpose()?
            .flatten())
    }

    fn set_team_seal(&mut self, team_id: i64, text: &str, tag: &[u8]) -> Result<()> {
        self.execute_team(team_id, "UPDATE teams SET seal = $2, seal_tag = $3 WHERE id = $1", &[&team_id, &text, &tag])?;
        Ok(())
    }

    fn rate_buckets(&mut self, scope: &str, from_second: i64) -> Result<Vec<Bucket>> {
        self.query("SELECT second, requests, tokens FROM rate_buckets WHERE scope = $1 AND second >= $2", &[&scope, &from_second])?
            .iter()
            .map(|r| Ok(Bucket { second: get(r, 0)?, requests: get(r, 1)?, tokens: get(r, 2)? }))
            .collect()
    }

    fn all_rate_buckets(&mut self, from_second: i64) -> Result<Vec<(String, Bucket)>> {
        self.query("SELECT scope, second, requests, tokens FROM rate_buckets WHERE second >= $1", &[&from_second])?
            .iter()
            .map(|r| Ok((get(r, 0)?, Bucket { second: get(r, 1)?, requests: get(r, 2)?, tokens: get(r, 3)? })))
            .collect()
    }

    fn rate_add(&mut self, scope: &str, second: i64, requests: i64, tokens: i64) -> Result<()> {
        self.execute(
            "INSERT INTO rate_buckets (scope, second, requests, tokens) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (scope, second) DO UPDATE SET requests = rate_buckets.requests + $3, tokens = rate_buckets.tokens + $4",
            &[&scope, &second, &requests, &tokens],
        )?;
        Ok(())
    }

    fn rate_prune(&mut self, scope: &str, before_second: i64) -> Result<()> {
        self.execute("DELETE FROM rate_buckets WHERE scope = $1 AND second < $2", &[&scope, &before_second])?;
        Ok(())
    }

    fn rate_adjust(&mut self, scope: &str, second: i64, delta: i64) -> Result<()> {
        self.execute(
            "UPDATE rate_buckets SET tokens = GREATEST(0, tokens + $3) WHERE scope = $1 AND second = $2",
            &[&scope, &second, &delta],
        )?;
        Ok(())
    }

    fn open_count(&mut self, agent_id: Option<i64>) -> Result<(i64, Option<i64>)> {
        let row = match agent_id {
            Some(id) => self.query_opt(
                "SELECT COUNT(*), MIN(expires_at_ms) FROM executions WHERE state IN ('RESERVED', 'DISPATCHED') AND agent_id = $1",
                &[&id],
            )?,
            None => self.query_opt("SELECT COUNT(*), MIN(expires_at_ms) FROM executions WHERE state IN ('RESERVED', 'DISPATCHED')", &[])?,
        };
        row.map_or(Ok((0, None)), |r| Ok((get(&r, 0)?, get(&r, 1)?)))
    }

    fn execution(&mut self, id: &str) -> Result<Option<Execution>> {
        if let Some((_, found)) = self.pipe.cache.executions.iter().find(|(cached, _)| cached == id) {
            return Ok(found.clone());
        }
        self.query_opt(select_executions!("WHERE id = $1"), &[&id])?.map(|r| execution_from_row(&r)).transpose()
    }

    fn insert_execution(&mut self, e: &Execution) -> Result<()> {
        self.pipe.cache.executions.retain(|(cached, _)| *cached != e.id);
        self.pipe.forget_prefetched(|p| matches!(p, Purpose::Execution(id) if *id == e.id));
        let teams = e.teams.iter().map(i64::to_string).collect::<Vec<_>>().join(" ");
        self.execute(
            "INSERT INTO executions (id, agent_id, agent, request_hash, state, model, input_tokens, \
             max_output_tokens, input_price, output_price, cached_input_price, reserved_micro, created_at_ms, \
             expires_at_ms, teams, rate_scopes, rate_tokens) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17)",
            &[
                &e.id,
                &e.agent_id,
                &e.agent,
                &&e.request_hash[..],
                &e.state.as_str(),
                &e.model,
                &e.input_tokens,
                &e.max_output_tokens,
                &e.prices.input,
                &e.prices.output,
                &e.prices.cached_input,
                &e.reserved_micro,
                &e.created_at_ms,
                &e.expires_at_ms,
                &teams,
                &e.rate_scopes,
                &e.rate_tokens,
            ],
        )?;
        Ok(())
    }

    fn update_execution(&mut self, e: &Execution) -> Result<()> {
        self.pipe.cache.executions.retain(|(cached, _)| *cached != e.id);
        self.pipe.forget_prefetched(|p| matches!(p, Purpose::Execution(id) if *id == e.id));
        let u = e.usage.as_ref();
        self.execute(
            "UPDATE executions SET state=$2, cost_micro=$3, usage_input=$4, usage_output=$5, usage_cached_input=$6, \
             reason=$7, dispatched_at_ms=$8, settled_at_ms=$9 WHERE id=$1",
            &[
                &e.id,
                &e.state.as_str(),
                &e.cost_micro,
                &u.map(|u| u.input_tokens),
                &u.map(|u| u.output_tokens),
                &u.map(|u| u.cached_input_tokens),
                &e.reason,
                &e.dispatched_at_ms,
                &e.settled_at_ms,
            ],
        )?;
        Ok(())
    }

    fn open_executions(&mut self, agent_id: Option<i64>, expiring_by: Option<i64>) -> Result<Vec<Execution>> {
        let by = expiring_by.unwrap_or(i64::MAX);
        let rows = match agent_id {
            Some(id) => self.query(
                select_executions!(
                    "WHERE state IN ('RESERVED', 'DISPATCHED') AND expires_at_ms <= $1 AND agent_id = $2 ORDER BY expires_at_ms, id"
                ),
                &[&by, &id],
            )?,
            None => self.query(
                select_executions!("WHERE state IN ('RESERVED', 'DISPATCHED') AND expires_at_ms <= $1 ORDER BY expires_at_ms, id"),
                &[&by],
            )?,
        };
        rows.iter().map(execution_from_row).collect()
    }

    fn for_each_execution(&mut self, f: &mut dyn FnMut(Execution) -> Result<()>) -> Result<()> {
        // Page by id, so a large table is never held in memory at once.
        let mut after = String::new();
        loop {
            let rows = self.query(select_executions!("WHERE id > $1 ORDER BY id LIMIT 1000"), &[&after])?;
            let Some(last) = rows.last() else {
                return Ok(());
            };
            after = get(last, 0)?;
            for r in &rows {
                f(execution_from_row(r)?)?;
            }
        }
    }

    fn ledger_head(&mut self) -> Result<Option<Head>> {
        if let Some(head) = &self.pipe.cache.head {
            return Ok(head.clone());
        }
        self.query_opt(HEAD, &[])?
            .map(|r| {
                let hash: Vec<u8> = get(&r, 1)?;
                Ok(Head { seq: get::<i64>(&r, 0)?.max(0) as u64, hash: hash.try_into().unwrap_or([0; 32]) })
            })
            .transpose()
    }

    fn append_event(&mut self, e: &Event) -> Result<()> {
        self.execute(
            "INSERT INTO ledger (seq, ts_ms, kind, agent, execution_id, amount_micro, data, prev_hash, hash) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
            &[&(e.seq as i64), &e.ts_ms, &e.kind, &e.agent, &e.execution_id, &e.amount_micro, &e.data, &&e.prev_hash[..], &&e.hash[..]],
        )?;
        self.pipe.forget_prefetched(|p| *p == Purpose::Head);
        self.pipe.cache.head = Some(Some(Head { seq: e.seq, hash: e.hash }));
        Ok(())
    }

    fn for_each_event(&mut self, from_seq: u64, f: &mut dyn FnMut(Event) -> Result<bool>) -> Result<()> {
        let mut next = from_seq as i64;
        loop {
            let rows = self.query(
                "SELECT seq, ts_ms, kind, agent, execution_id, amount_micro, data, prev_hash, hash FROM ledger \
                 WHERE seq >= $1 ORDER BY seq LIMIT 1000",
                &[&next],
            )?;
            if rows.is_empty() {
                return Ok(());
            }
            for r in &rows {
                let event = event_from_row(r)?;
                next = event.seq as i64 + 1;
                if !f(event)? {
                    return Ok(());
                }
            }
        }
    }

    fn spend_since(&mut self, since_ms: i64) -> Result<Vec<(String, i64)>> {
        self.query(
            "SELECT agent, SUM(amount_micro)::BIGINT FROM ledger WHERE ts_ms >= $1 AND agent IS NOT NULL \
             AND kind IN ('execution.committed', 'execution.expired') GROUP BY agent",
            &[&since_ms],
        )?
        .iter()
        .map(|r| Ok((get(r, 0)?, get(r, 1)?)))
        .collect()
    }

    fn meta(&mut self, key: &str) -> Result<Option<String>> {
        self.query_opt("SELECT value FROM meta WHERE key = $1", &[&key])?.map(|r| get(&r, 0)).transpose()
    }

    fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        self.execute("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2", &[&key, &value])?;
        Ok(())
    }

    fn prefetch(&mut self, wants: &[Prefetch<'_>]) {
        // A hint: a statement that cannot be queued now fails again, and is reported, when read.
        for want in wants {
            let _ = match *want {
                Prefetch::Execution(id) => self.pipe.prefetch_execution(select_executions!("WHERE id = $1"), id),
                Prefetch::AgentOfExecution(id) => {
                    self.pipe.prefetch_agent(select_agents!("WHERE id = (SELECT agent_id FROM executions WHERE id = $1)"), id)
                }
            };
        }
    }
}
