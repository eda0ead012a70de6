//! [`Kernel`]: the one object the bindings hold.

use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;
use serde_json::json;

use crate::admission::refused_tokens::RefusedTokens;
use crate::admission::{self, AdmitRequest, Admission};
use crate::agent::{self, Agent, AgentSpec};
use crate::budget::BudgetPeriod;
use crate::auth::Token;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::error::{ConflictReason, Error, NotFoundKind, Result};
use crate::execution::Execution;
use crate::ledger::audit::{self, AuditReport};
use crate::ledger::{self, ChainHasher, Event, EventKind, Head, NewEvent};
use crate::money;
use crate::outside::Guard;
use crate::reconcile::{self, ReconcileReport};
use crate::settlement::{self, Settlement, Terminal, Usage};
use crate::store::{SqliteStore, Store, StoreOptions, Tx};
use crate::team::{Team, TeamSpec};
use sha2::{Digest, Sha256};

/// The default reservation TTL: 15 minutes, long enough for a slow streamed reply.
pub const DEFAULT_RESERVATION_TTL_MS: i64 = 15 * 60 * 1000;

const META_LEDGER_MODE: &str = "ledger_mode";

/// Inside a write transaction: unwraps `$result`, or ends the transaction with its error as the
/// caller's answer (a lookup that finds nothing has changed nothing, so there is nothing to undo).
macro_rules! or_answer {
    ($result:expr) => {
        match $result {
            Ok(value) => value,
            Err(e) => return Ok(Err(e)),
        }
    };
}
const META_LEDGER_KEY_CHECK: &str = "ledger_key_check";
const META_CONFIG_HASH: &str = "config_hash";
/// Set once every agent and team row carries a seal (see [`crate::outside`]).
const META_SEALED: &str = "sealed";

/// How to open a kernel. `Debug` never shows the ledger key.
#[derive(Clone)]
pub struct KernelOptions {
    /// Durability and busy timeout of the SQLite store.
    pub store: StoreOptions,
    /// A secret that turns the ledger's chain into HMAC-SHA-256. A database created with a key
    /// must always be opened with the same key, and one created without, without.
    pub ledger_key: Option<Vec<u8>>,
    /// How long an unsettled reservation lives, ms.
    pub reservation_ttl_ms: i64,
    /// The models and their prices.
    pub config: Config,
    /// The time source.
    pub clock: Arc<dyn Clock>,
    /// Timeouts and retries of governed provider calls.
    #[cfg(feature = "dispatch")]
    pub dispatch: crate::dispatch::DispatchOptions,
}

impl Default for KernelOptions {
    fn default() -> Self {
        KernelOptions {
            store: StoreOptions::default(),
            ledger_key: None,
            reservation_ttl_ms: DEFAULT_RESERVATION_TTL_MS,
            config: Config::default(),
            clock: Arc::new(SystemClock),
            #[cfg(feature = "dispatch")]
            dispatch: crate::dispatch::DispatchOptions::default(),
        }
    }
}

impl std::fmt::Debug for KernelOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelOptions")
            .field("store", &self.store)
            .field("ledger_key", &self.ledger_key.as_ref().map(|_| "<redacted>"))
            .field("reservation_ttl_ms", &self.reservation_ttl_ms)
            .field("config", &self.config)
            .field("clock", &self.clock)
            .finish()
    }
}

/// A new agent and its token, which is shown this once.
#[derive(Debug, Clone)]
pub struct CreatedAgent {
    /// The agent as stored.
    pub agent: Agent,
    /// The secret token. Hand it to the agent; aex keeps only its hash.
    pub token: Token,
}

/// The governance kernel: agents, admission, settlement, ledger and audit over one store.
///
/// `Send + Sync` and cheap to clone (an `Arc`): share one kernel between threads. Every method is
/// one store transaction, so concurrent callers — in this process or in others sharing the file —
/// see each other's effects in a single serial order. Nothing is cached between calls.
///
/// A kernel belongs to the process that opened it: after `fork()`, calls in the child fail with
/// [`Error::Unavailable`] (a SQLite connection must not cross a fork); open a new kernel there.
#[derive(Clone, Debug)]
pub struct Kernel {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The process that opened the store. A SQLite connection must not be used across `fork()`,
    /// so a forked child gets `Unavailable` instead of a corrupted database.
    pid: u32,
    store: Box<dyn Store>,
    clock: Arc<dyn Clock>,
    hasher: ChainHasher,
    config: RwLock<Arc<Config>>,
    reservation_ttl_ms: i64,
    /// Refused tokens of the current window, not yet in the ledger (see
    /// [`crate::admission::refused_tokens`]).
    refused_tokens: RefusedTokens,
    #[cfg(feature = "dispatch")]
    dispatch: crate::dispatch::DispatchState,
}

impl Drop for Inner {
    /// Writes the summary of refused tokens counted but not yet recorded (best effort: a store
    /// that fails now loses only that count).
    fn drop(&mut self) {
        if std::process::id() != self.pid {
            return;
        }
        if let Some(summary) = self.refused_tokens.drain() {
            let (hasher, now) = (&self.hasher, self.clock.now_ms());
            let _ = self.store.write(&mut |tx| ledger::append(tx, hasher, now, NewEvent::global(EventKind::Denied, 0, summary.clone())));
        }
    }
}

impl Kernel {
    /// Opens (creating if needed) the SQLite database at `path` — or, when `path` is a
    /// `postgresql://` (or `postgres://`) URL, that PostgreSQL database ([`crate::store::PgStore`],
    /// for fleets; `options.store` applies to SQLite only) — migrates it, checks the ledger key,
    /// and expires every due reservation.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] for bad options, a malformed URL (field `path`) or a ledger key
    /// that does not match the database; [`Error::Unavailable`] when the file or server cannot be
    /// opened or migrated.
    pub fn open(path: impl AsRef<Path>, options: KernelOptions) -> Result<Kernel> {
        if path.as_ref().as_os_str().is_empty() {
            // SQLite would open a throwaway temporary database for "", which no other kernel sees.
            return Err(Error::invalid("path", "must name a database file (or use an in-memory kernel)"));
        }
        if let Some(url) = path.as_ref().to_str().filter(|p| crate::store::postgres::is_url(p)) {
            let store = crate::store::PgStore::open(url)?;
            return Kernel::with_store(Box::new(store), options);
        }
        let store = SqliteStore::open(path.as_ref(), options.store)?;
        Kernel::with_store(Box::new(store), options)
    }

    /// A kernel over a private in-memory database, for tests and experiments.
    ///
    /// # Errors
    /// As [`Kernel::open`].
    pub fn open_in_memory(options: KernelOptions) -> Result<Kernel> {
        Kernel::with_store(Box::new(SqliteStore::open_in_memory()?), options)
    }

    /// A kernel over any [`Store`].
    ///
    /// # Errors
    /// As [`Kernel::open`].
    pub fn with_store(store: Box<dyn Store>, options: KernelOptions) -> Result<Kernel> {
        if options.reservation_ttl_ms <= 0 {
            return Err(Error::invalid("reservation_ttl_ms", "must be positive"));
        }
        let hasher = ChainHasher::new(options.ledger_key.as_deref())?;
        let kernel = Kernel {
            inner: Arc::new(Inner {
                pid: std::process::id(),
                store,
                clock: options.clock,
                hasher,
                config: RwLock::new(Arc::new(options.config)),
                reservation_ttl_ms: options.reservation_ttl_ms,
                refused_tokens: RefusedTokens::default(),
                #[cfg(feature = "dispatch")]
                dispatch: crate::dispatch::DispatchState::new(options.dispatch),
            }),
        };
        kernel.check_ledger_mode()?;
        kernel.options_config_valid()?;
        kernel.record_initial_config()?;
        kernel.seal_unsealed()?;
        kernel.reconcile()?;
        Ok(kernel)
    }

    fn options_config_valid(&self) -> Result<()> {
        self.config().validate()
    }

    /// Checks the stored ledger mode against the key given. With a key, the mode is never taken
    /// from the database: whoever can write the file can also write `sha256` there and re-forge
    /// the chain without the key, so a keyed open of a database that says `sha256` (or says
    /// nothing while it holds events) is refused as tampered, never reopened without the key.
    fn check_ledger_mode(&self) -> Result<()> {
        let hasher = &self.inner.hasher;
        self.write(|tx| {
            let mode = tx.meta(META_LEDGER_MODE)?;
            let check = tx.meta(META_LEDGER_KEY_CHECK)?.unwrap_or_default();
            let keyed = matches!(hasher, ChainHasher::Hmac(_));
            match mode {
                Some(m) if keyed && m != hasher.mode() => Ok(Err(Error::Tampered {
                    field: "ledger_mode".into(),
                    message: format!(
                        "a ledger key was given but this database says its ledger is '{m}': either it was created \
                         without a key, or its mode was rewritten to drop the key; a keyed ledger is never reopened \
                         without its key"
                    ),
                })),
                None if keyed && tx.ledger_head()?.is_some() => Ok(Err(Error::Tampered {
                    field: "ledger_mode".into(),
                    message: "this database's ledger has events but no recorded mode".into(),
                })),
                None => {
                    tx.set_meta(META_LEDGER_MODE, hasher.mode())?;
                    tx.set_meta(META_LEDGER_KEY_CHECK, &hasher.key_check())?;
                    Ok(Ok(()))
                }
                Some(m) if m != hasher.mode() => Ok(Err(Error::invalid(
                    "ledger_key",
                    format!("this database's ledger is '{m}'; open it {} a ledger key", if m == "sha256" { "without" } else { "with" }),
                ))),
                Some(_) if check != hasher.key_check() => {
                    Ok(Err(Error::invalid("ledger_key", "does not match the key this database's ledger was written with")))
                }
                Some(_) => Ok(Ok(())),
            }
        })
    }

    fn now(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    #[cfg(feature = "dispatch")]
    pub(crate) fn dispatch_state(&self) -> &crate::dispatch::DispatchState {
        &self.inner.dispatch
    }

    /// Runs `f` in a write transaction. `f`'s outer error rolls back; its inner result is the
    /// answer, returned after the commit (so a denial or an expiry on the way is kept).
    fn check_process(&self) -> Result<()> {
        if std::process::id() != self.inner.pid {
            return Err(Error::Unavailable(format!(
                "this kernel was opened by process {}; after fork(), open a new kernel in the child",
                self.inner.pid
            )));
        }
        Ok(())
    }

    /// Every write transaction sees the store through a [`Guard`]: agent and team rows are
    /// checked against their seals when loaded and re-sealed when written (see
    /// [`crate::outside`]).
    fn write<T: Send>(&self, mut f: impl FnMut(&mut Guard<'_>) -> Result<Result<T>> + Send) -> Result<T> {
        self.check_process()?;
        let hasher = &self.inner.hasher;
        let now = self.now();
        let mut out = None;
        self.inner.store.write(&mut |tx| {
            out = Some(f(&mut Guard::new(tx, hasher, now))?);
            Ok(())
        })?;
        out.unwrap_or_else(|| Err(Error::Internal("transaction produced no result".into())))
    }

    fn read<T: Send>(&self, mut f: impl FnMut(&mut dyn Tx) -> Result<T> + Send) -> Result<T> {
        self.check_process()?;
        let mut out = None;
        self.inner.store.read(&mut |tx| {
            out = Some(f(tx)?);
            Ok(())
        })?;
        out.ok_or_else(|| Error::Internal("transaction produced no result".into()))
    }

    fn agent_named(tx: &mut dyn Tx, name: &str) -> Result<Agent> {
        tx.agent_by_name(name)?.ok_or_else(|| Error::NotFound { what: NotFoundKind::Agent, key: name.to_string() })
    }

    fn team_named(tx: &mut dyn Tx, name: &str) -> Result<Team> {
        tx.team_by_name(name)?.ok_or_else(|| Error::NotFound { what: NotFoundKind::Team, key: name.to_string() })
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.inner.config.read().clone()
    }

    // ---- agents -------------------------------------------------------------------------------

    /// Creates an agent and returns it with its token (shown only here).
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] naming a bad field; [`Error::Conflict`] (`name_taken`).
    pub fn create_agent(&self, spec: &AgentSpec) -> Result<CreatedAgent> {
        spec.validate()?;
        let token = Token::generate()?;
        let hasher = &self.inner.hasher;
        let now = self.now();
        let mut agent = Agent {
            id: 0,
            name: spec.name.clone(),
            token_prefix: token.display_prefix().to_string(),
            scope: spec.scope,
            ttl_ms: spec.ttl_ms,
            expires_at_ms: spec.ttl_ms.map(|t| now.saturating_add(t)),
            disabled: false,
            budget_micro: spec.budget_micro,
            spent_micro: 0,
            reserved_micro: 0,
            rpm: spec.rpm,
            tpm: spec.tpm,
            allowed_models: spec.allowed_models.clone(),
            capabilities: spec.capabilities,
            strict: spec.strict,
            allow_passthrough: spec.allow_passthrough,
            max_concurrent: spec.max_concurrent,
            budget_period: spec.budget_period,
            period_start_ms: spec.budget_period.start_of(now),
            team_id: None,
            team: spec.team.clone(),
            created_at_ms: now,
        };
        agent.id = self.write(|tx| {
            if let Some(team) = &spec.team {
                agent.team_id = Some(or_answer!(Self::team_named(tx, team)).id);
            }
            let id = match tx.insert_agent(&agent, &token.hash()) {
                Ok(id) => id,
                Err(e @ Error::Conflict { .. }) => return Ok(Err(e)),
                Err(e) => return Err(e),
            };
            let data = json!({
                "token_sha256": hex::encode(token.hash().0),
                "expires_at_ms": agent.expires_at_ms,
                "scope": spec.scope.as_str(),
                "rpm": spec.rpm,
                "tpm": spec.tpm,
                "allowed_models": spec.allowed_models,
                "tools": spec.capabilities.tools,
                "streaming": spec.capabilities.streaming,
                "vision": spec.capabilities.vision,
                "strict": spec.strict,
                "ttl_ms": spec.ttl_ms,
                "allow_passthrough": spec.allow_passthrough,
                "max_concurrent": spec.max_concurrent,
                "budget_period": spec.budget_period.as_str(),
                "period_start_ms": agent.period_start_ms,
                "team": spec.team,
            });
            ledger::append(tx, hasher, now, NewEvent::agent(EventKind::AgentCreated, &spec.name, spec.budget_micro, data))?;
            Ok(Ok(id))
        })?;
        Ok(CreatedAgent { agent, token })
    }

    /// All agents, by name.
    ///
    /// # Errors
    /// Store errors.
    pub fn list_agents(&self) -> Result<Vec<Agent>> {
        self.read(|tx| tx.agents())
    }

    /// The agent a token belongs to, checked as admission checks it (known, unexpired, enabled),
    /// without admitting anything or writing to the ledger: for surfaces that answer a token's
    /// holder (a gateway's model list).
    ///
    /// # Errors
    /// [`Error::Unauthenticated`] with its reason; the store's errors.
    pub fn authenticate(&self, token: &str) -> Result<Agent> {
        let now = self.now();
        self.read(|tx| crate::admission::authenticate(tx, token, now))
    }

    /// One agent's settings and counters (never its token).
    ///
    /// # Errors
    /// [`Error::NotFound`].
    pub fn agent(&self, name: &str) -> Result<Agent> {
        self.read(|tx| Self::agent_named(tx, name))
    }

    /// Sets an agent's budget to `budget_micro`. A budget below what is already spent and
    /// reserved is allowed: the agent's next admission is denied.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] outside `0..=MAX_MICRO`; [`Error::NotFound`].
    pub fn set_budget(&self, name: &str, budget_micro: i64) -> Result<Agent> {
        money::check_amount("budget_micro", budget_micro)?;
        self.change_budget(name, |_| Ok(budget_micro))
    }

    /// Adds `delta_micro` (which may be negative) to an agent's budget.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] when the new budget would leave `0..=MAX_MICRO`;
    /// [`Error::NotFound`].
    pub fn add_budget(&self, name: &str, delta_micro: i64) -> Result<Agent> {
        self.change_budget(name, |old| {
            let new = old.checked_add(delta_micro).ok_or_else(|| Error::invalid("delta_micro", "overflows"))?;
            money::check_amount("budget_micro", new).map_err(|_| {
                Error::invalid("delta_micro", format!("would make the budget {new} micro-USD, outside 0..=1e9 USD"))
            })
        })
    }

    fn change_budget(&self, name: &str, new_budget: impl Fn(i64) -> Result<i64> + Sync) -> Result<Agent> {
        let hasher = &self.inner.hasher;
        let now = self.now();
        self.write(|tx| {
            let mut agent = or_answer!(Self::agent_named(tx, name));
            let old = agent.budget_micro;
            agent.budget_micro = or_answer!(new_budget(old));
            tx.update_agent(&agent)?;
            let data = json!({ "previous_micro": old });
            ledger::append(tx, hasher, now, NewEvent::agent(EventKind::BudgetSet, name, agent.budget_micro, data))?;
            Ok(Ok(agent))
        })
    }

    /// Disables (`true`) or enables (`false`) an agent. A disabled agent's token is refused with
    /// `agent_disabled`; its open executions can still be settled.
    ///
    /// # Errors
    /// [`Error::NotFound`].
    pub fn set_disabled(&self, name: &str, disabled: bool) -> Result<Agent> {
        let hasher = &self.inner.hasher;
        let now = self.now();
        self.write(|tx| {
            let mut agent = or_answer!(Self::agent_named(tx, name));
            if agent.disabled != disabled {
                agent.disabled = disabled;
                tx.update_agent(&agent)?;
                let kind = if disabled { EventKind::AgentDisabled } else { EventKind::AgentEnabled };
                ledger::append(tx, hasher, now, NewEvent::agent(kind, name, 0, json!({})))?;
            }
            Ok(Ok(agent))
        })
    }

    /// Deletes an agent. Its open reservations are released first (each an `execution.released`
    /// event with reason `agent_deleted`): with the agent gone there is no budget left to charge,
    /// and a late settlement of one of them is a `Conflict`. Its token stops working at once. The
    /// ledger keeps its whole history; the name may be reused.
    ///
    /// # Errors
    /// [`Error::NotFound`].
    pub fn delete_agent(&self, name: &str) -> Result<()> {
        let hasher = &self.inner.hasher;
        let now = self.now();
        self.write(|tx| {
            let agent = or_answer!(Self::agent_named(tx, name));
            for e in tx.open_executions(Some(agent.id), None)? {
                settlement::settle(tx, hasher, &e.id, Terminal::Release("agent_deleted"), now, false)??;
            }
            let agent = Self::agent_named(tx, name)?;
            let data = json!({ "budget_micro": agent.budget_micro, "spent_micro": agent.spent_micro });
            ledger::append(tx, hasher, now, NewEvent::agent(EventKind::AgentDeleted, name, 0, data))?;
            tx.delete_agent(agent.id)?;
            Ok(Ok(()))
        })
    }

    /// Replaces an agent's token; the old one stops working at once. `ttl_ms` sets a new token
    /// lifetime; `None` renews the agent's existing lifetime (or none) from now.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] for a bad TTL; [`Error::NotFound`].
    pub fn rotate_token(&self, name: &str, ttl_ms: Option<i64>) -> Result<Token> {
        if let Some(t) = ttl_ms {
            agent::validate_ttl(t)?;
        }
        let token = Token::generate()?;
        let hasher = &self.inner.hasher;
        let now = self.now();
        self.write(|tx| {
            let mut agent = or_answer!(Self::agent_named(tx, name));
            if ttl_ms.is_some() {
                agent.ttl_ms = ttl_ms;
                tx.update_agent(&agent)?;
            }
            let expires = agent.ttl_ms.map(|t| now.saturating_add(t));
            tx.set_token(agent.id, &token.hash(), token.display_prefix(), expires)?;
            let data = json!({ "token_sha256": hex::encode(token.hash().0), "ttl_ms": agent.ttl_ms, "expires_at_ms": expires });
            ledger::append(tx, hasher, now, NewEvent::agent(EventKind::TokenRotated, name, 0, data))?;
            Ok(Ok(()))
        })?;
        Ok(token)
    }

    /// Changes how often an agent's budget renews. `spent` and `reserved` are kept and the new
    /// period starts at the start of the current calendar period of its kind, so what remains
    /// does not change (see [`crate::budget::period`]).
    ///
    /// # Errors
    /// [`Error::NotFound`].
    pub fn set_budget_period(&self, name: &str, period: BudgetPeriod) -> Result<Agent> {
        let hasher = &self.inner.hasher;
        let now = self.now();
        self.write(|tx| {
            let mut agent = or_answer!(Self::agent_named(tx, name));
            agent.budget_period = period;
            agent.period_start_ms = period.start_of(now);
            tx.update_agent(&agent)?;
            let data = json!({ "period": period.as_str(), "period_start_ms": agent.period_start_ms });
            ledger::append(tx, hasher, now, NewEvent::agent(EventKind::BudgetPeriodSet, name, 0, data))?;
            Ok(Ok(agent))
        })
    }

    // ---- teams ----------------------------------------------------------------------------------

    /// Creates a team (see [`crate::team`]).
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] naming a bad field; [`Error::NotFound`] for an unknown parent;
    /// [`Error::Conflict`] (`name_taken`).
    pub fn create_team(&self, spec: &TeamSpec) -> Result<Team> {
        spec.validate()?;
        let hasher = &self.inner.hasher;
        let now = self.now();
        self.write(|tx| {
            let parent = or_answer!(spec.parent.as_deref().map(|p| Self::team_named(tx, p)).transpose());
            if let Some(p) = &parent {
                // The new team, its parent, and every team above that.
                let mut depth = 2;
                let mut next = p.parent_id;
                while let Some(id) = next {
                    depth += 1;
                    next = tx.team_by_id(id)?.and_then(|t| t.parent_id);
                }
                if depth > crate::team::MAX_DEPTH {
                    return Ok(Err(Error::invalid("parent", format!("teams nest at most {} deep", crate::team::MAX_DEPTH))));
                }
            }
            let mut team = Team {
                id: 0,
                name: spec.name.clone(),
                parent_id: parent.as_ref().map(|p| p.id),
                parent: spec.parent.clone(),
                budget_micro: spec.budget_micro,
                spent_micro: 0,
                reserved_micro: 0,
                created_at_ms: now,
            };
            team.id = match tx.insert_team(&team) {
                Ok(id) => id,
                Err(e @ Error::Conflict { .. }) => return Ok(Err(e)),
                Err(e) => return Err(e),
            };
            let data = json!({ "team": spec.name, "parent": spec.parent });
            ledger::append(tx, hasher, now, NewEvent::global(EventKind::TeamCreated, spec.budget_micro, data))?;
            Ok(Ok(team))
        })
    }

    /// One team.
    ///
    /// # Errors
    /// [`Error::NotFound`].
    pub fn team(&self, name: &str) -> Result<Team> {
        self.read(|tx| Self::team_named(tx, name))
    }

    /// All teams, by name.
    ///
    /// # Errors
    /// Store errors.
    pub fn list_teams(&self) -> Result<Vec<Team>> {
        self.read(|tx| tx.teams())
    }

    /// Sets a team's budget.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] outside `0..=MAX_MICRO`; [`Error::NotFound`].
    pub fn set_team_budget(&self, name: &str, budget_micro: i64) -> Result<Team> {
        money::check_amount("budget_micro", budget_micro)?;
        let hasher = &self.inner.hasher;
        let now = self.now();
        self.write(|tx| {
            let mut team = or_answer!(Self::team_named(tx, name));
            let previous = team.budget_micro;
            team.budget_micro = budget_micro;
            tx.update_team_budget(team.id, budget_micro)?;
            let data = json!({ "team": name, "previous_micro": previous });
            ledger::append(tx, hasher, now, NewEvent::global(EventKind::TeamBudgetSet, budget_micro, data))?;
            Ok(Ok(team))
        })
    }

    /// Deletes a team that has no members and holds no reservations.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Conflict`] (`invalid_transition`) while agents or teams belong
    /// to it or it holds reservations.
    pub fn delete_team(&self, name: &str) -> Result<()> {
        let hasher = &self.inner.hasher;
        let now = self.now();
        self.write(|tx| {
            let team = or_answer!(Self::team_named(tx, name));
            if tx.team_members(team.id)? > 0 || team.reserved_micro != 0 {
                return Ok(Err(Error::conflict(
                    ConflictReason::InvalidTransition,
                    format!("team '{name}' still has members or open reservations"),
                )));
            }
            tx.delete_team(team.id)?;
            let data = json!({ "team": name, "spent_micro": team.spent_micro });
            ledger::append(tx, hasher, now, NewEvent::global(EventKind::TeamDeleted, 0, data))?;
            Ok(Ok(()))
        })
    }

    // ---- config ---------------------------------------------------------------------------------

    /// Puts `config` in force for the next admission, and records a `config.loaded` event with its
    /// hash. Open reservations keep the prices they were admitted with.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] when its cross-references do not hold (the config in force stays).
    pub fn reload_config(&self, config: Config) -> Result<()> {
        if let Err(e) = config.validate() {
            self.record_rejected_config(None, &e)?;
            return Err(e);
        }
        let now = self.now();
        let hash = config.hash();
        let models = config.models().count();
        let hasher = &self.inner.hasher;
        // The event and the swap happen under the config lock, so the ledger order is the order
        // in which configs came into force.
        let mut current = self.inner.config.write();
        self.write(|tx| {
            let data = json!({ "hash": hex::encode(hash), "models": models });
            ledger::append(tx, hasher, now, NewEvent::global(EventKind::ConfigLoaded, 0, data))?;
            tx.set_meta(META_CONFIG_HASH, &hex::encode(hash))?;
            Ok(Ok(()))
        })?;
        *current = Arc::new(config);
        Ok(())
    }

    /// Reads `path` (a `models.yaml`) and puts it in force. A file that cannot be read or parsed
    /// is refused with an error naming the field and line; the refusal is recorded as a
    /// `config.rejected` event and the config in force stays.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] (see [`Config::load`]).
    pub fn reload_config_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        match Config::load(path) {
            Ok(config) => self.reload_config(config),
            Err(e) => {
                let bytes = std::fs::read(path).unwrap_or_default();
                self.record_rejected_config(Some(Sha256::digest(&bytes).into()), &e)?;
                Err(e)
            }
        }
    }

    fn record_rejected_config(&self, hash: Option<[u8; 32]>, error: &Error) -> Result<()> {
        let now = self.now();
        let hasher = &self.inner.hasher;
        self.write(|tx| {
            let data = json!({ "hash": hash.map(hex::encode), "error": error.to_string() });
            ledger::append(tx, hasher, now, NewEvent::global(EventKind::ConfigRejected, 0, data))?;
            Ok(Ok(()))
        })
    }

    /// Records the config given at open, unless the store's last loaded config has the same hash
    /// (several processes opening one file with one config record it once).
    fn record_initial_config(&self) -> Result<()> {
        let config = self.config();
        if config.models().next().is_none() {
            return Ok(());
        }
        let hash = hex::encode(config.hash());
        let models = config.models().count();
        let now = self.now();
        let hasher = &self.inner.hasher;
        self.write(|tx| {
            if tx.meta(META_CONFIG_HASH)?.as_deref() != Some(hash.as_str()) {
                let data = json!({ "hash": hash, "models": models });
                ledger::append(tx, hasher, now, NewEvent::global(EventKind::ConfigLoaded, 0, data))?;
                tx.set_meta(META_CONFIG_HASH, &hash)?;
            }
            Ok(Ok(()))
        })
    }

    // ---- one guarded call -----------------------------------------------------------------------

    /// Admits a call: auth, idempotency, policy, budget (see [`crate::admission`]). On success the
    /// estimate is reserved until settled or expired.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] for malformed input (nothing recorded); the denials
    /// [`Error::Unauthenticated`], [`Error::PolicyDenied`], [`Error::InsufficientBudget`] (each
    /// recorded in the ledger, nothing reserved); [`Error::Conflict`] for a reused execution id
    /// with a different request.
    pub fn admit(&self, token: &str, request: &AdmitRequest) -> Result<Admission> {
        self.admit_then(token, request, false)
    }

    /// Admits and marks dispatched in one transaction, for callers about to send the request
    /// right away (the dispatcher): the same ledger events as [`Kernel::admit`] followed by
    /// [`Kernel::mark_dispatched`], one transaction fewer.
    ///
    /// # Errors
    /// As [`Kernel::admit`].
    pub fn admit_dispatched(&self, token: &str, request: &AdmitRequest) -> Result<Admission> {
        self.admit_then(token, request, true)
    }

    fn admit_then(&self, token: &str, request: &AdmitRequest, dispatch: bool) -> Result<Admission> {
        request.validate()?;
        let execution_id = match &request.execution_id {
            Some(id) => id.clone(),
            None => uuid::Uuid::now_v7().to_string(),
        };
        let config = self.config();
        let cx = admission::Context {
            hasher: &self.inner.hasher,
            config: &config,
            now: self.now(),
            reservation_ttl_ms: self.inner.reservation_ttl_ms,
            refused_tokens: &self.inner.refused_tokens,
        };
        let hasher = &self.inner.hasher;
        let prepared = admission::Prepared::of(&config, request);
        self.write(|tx| {
            let admitted = admission::admit(tx, &cx, token, request, &prepared, &execution_id)?;
            match admitted {
                Ok(a) if dispatch && !a.replayed => {
                    let e = settlement::mark_dispatched(tx, hasher, &a.execution_id, cx.now)??;
                    Ok(Ok(Admission { state: e.state, ..a }))
                }
                other => Ok(other),
            }
        })
    }

    /// Records that the call was handed to the provider. From then on an expired reservation is
    /// charged in full instead of released. Idempotent.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Conflict`] if the execution is already terminal.
    pub fn mark_dispatched(&self, execution_id: &str) -> Result<Execution> {
        let now = self.now();
        self.write(|tx| settlement::mark_dispatched(tx, &self.inner.hasher, execution_id, now))
    }

    /// Settles an execution at the real `usage`, priced with the reservation's prices.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] for bad usage (nothing changes); [`Error::NotFound`];
    /// [`Error::Conflict`] if the execution was settled otherwise.
    pub fn commit(&self, execution_id: &str, usage: Usage) -> Result<Settlement> {
        self.settle(execution_id, Terminal::Commit(usage, false))
    }

    /// Settles an execution whose provider reported no usage (a stream cut off, a callback
    /// without token counts) at a usage counted by the caller. Input tokens are raised to at least
    /// what the reservation counted, so an estimate never charges less than admission assumed; the
    /// ledger event is marked `"estimated": true`.
    ///
    /// # Errors
    /// As [`Kernel::commit`].
    pub fn commit_estimated(&self, execution_id: &str, usage: Usage) -> Result<Settlement> {
        self.settle(execution_id, Terminal::Commit(usage, true))
    }

    /// Gives an execution's reservation back: the call did not happen.
    ///
    /// # Errors
    /// As [`Kernel::commit`].
    pub fn release(&self, execution_id: &str, reason: &str) -> Result<Settlement> {
        self.settle(execution_id, Terminal::Release(reason))
    }

    /// Gives an execution's reservation back and records the failure.
    ///
    /// # Errors
    /// As [`Kernel::commit`].
    pub fn fail(&self, execution_id: &str, error: &str) -> Result<Settlement> {
        self.settle(execution_id, Terminal::Fail(error))
    }

    fn settle(&self, execution_id: &str, call: Terminal<'_>) -> Result<Settlement> {
        call.validate()?;
        let now = self.now();
        self.write(|tx| settlement::settle(tx, &self.inner.hasher, execution_id, call, now, true))
    }

    /// One execution as stored.
    ///
    /// # Errors
    /// [`Error::NotFound`].
    pub fn execution(&self, execution_id: &str) -> Result<Execution> {
        self.read(|tx| {
            tx.execution(execution_id)?
                .ok_or_else(|| Error::NotFound { what: NotFoundKind::Execution, key: execution_id.to_string() })
        })
    }

    /// Expires every due reservation of every agent (see [`crate::reconcile`]). Runs on open;
    /// admissions do it lazily per agent, so calling it is never required.
    ///
    /// # Errors
    /// Store errors.
    pub fn reconcile(&self) -> Result<ReconcileReport> {
        let now = self.now();
        self.write(|tx| reconcile::expire_due(tx, &self.inner.hasher, None, now).map(Ok))
    }

    /// Seals the rows of a database written before seals existed, each recorded as a baseline
    /// event; once done, the store is marked and a row without a seal is tampering.
    fn seal_unsealed(&self) -> Result<()> {
        // A seal removed by hand is not baselined (see `seal_unsealed`): the open goes on, that row
        // is refused when it is loaded, and the audit names it.
        match self.write(|tx| {
            if tx.meta(META_SEALED)?.is_none() {
                tx.seal_unsealed()?;
                tx.set_meta(META_SEALED, "1")?;
            }
            Ok(Ok(()))
        }) {
            Err(Error::Tampered { .. }) => Ok(()),
            other => other,
        }
    }

    /// The store's schema version (see [`crate::store::Store::schema_version`]).
    pub fn schema_version(&self) -> u32 {
        self.inner.store.schema_version()
    }

    /// How many write operations this kernel's store has run in this process, and in how many
    /// transactions (fewer when group commit shares them between threads).
    pub fn write_stats(&self) -> crate::store::WriteStats {
        self.inner.store.write_stats()
    }

    /// What is unsafe about how the store is set up — its files readable or writable by other
    /// users, owned by another user, or in a directory others may write to — one sentence each,
    /// found when it was opened. aex does not change existing files' modes; the CLI prints these.
    pub fn warnings(&self) -> Vec<String> {
        self.inner.store.warnings()
    }

    // ---- ledger -----------------------------------------------------------------------------------

    /// The latest event's seq and hash, or `None` for an empty ledger. Under `full` durability
    /// it may name settlements not yet fsynced, which a power cut takes back (see
    /// [`crate::Durability::Full`]): an anchor to keep for [`Kernel::audit`] is the head of an
    /// audit report, whose own write is fsynced.
    ///
    /// # Errors
    /// Store errors.
    pub fn head(&self) -> Result<Option<Head>> {
        self.read(|tx| tx.ledger_head())
    }

    /// Up to `limit` events from `from_seq` on, in order.
    ///
    /// # Errors
    /// Store errors.
    pub fn events(&self, from_seq: u64, limit: usize) -> Result<Vec<Event>> {
        self.read(|tx| {
            let mut out = Vec::new();
            tx.for_each_event(from_seq, &mut |e| {
                out.push(e);
                Ok(out.len() < limit)
            })?;
            Ok(out)
        })
    }

    /// Committed spend per agent over the last `window_ms`, from the ledger (for burn rates).
    /// Scans the ledger; meant for operators, not the hot path.
    ///
    /// # Errors
    /// Store errors.
    pub fn spend_in_window(&self, window_ms: i64) -> Result<std::collections::BTreeMap<String, i64>> {
        let since = self.now().saturating_sub(window_ms);
        self.read(|tx| Ok(tx.spend_since(since)?.into_iter().collect()))
    }

    /// The time now, by the kernel's clock, ms since the epoch.
    pub fn now_ms(&self) -> i64 {
        self.now()
    }

    /// Verifies the ledger and the counters over one snapshot (see [`crate::ledger::audit`]).
    /// With `anchor`, also proves the event at `anchor.seq` still has `anchor.hash`.
    ///
    /// # Errors
    /// Store errors only: what the audit finds is in the report.
    ///
    /// First, one write transaction reads every agent and team row, so restricting edits made
    /// outside aex since the last transaction that read them are recorded (see
    /// [`crate::outside`]) and show in the ledger the audit verifies.
    pub fn audit(&self, anchor: Option<&Head>) -> Result<AuditReport> {
        self.write(|tx| tx.sweep().map(Ok))?;
        let now = self.now();
        self.read(|tx| audit::run(tx, &self.inner.hasher, anchor, now))
    }
}
