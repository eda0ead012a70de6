//! The fleet store: one PostgreSQL database shared by kernels on many machines.
//!
//! The same rules as the SQLite store, over the network: every write transaction first takes one
//! transaction-scoped advisory lock (`pg_advisory_xact_lock`), so writers of every process on
//! every machine take turns exactly as SQLite's single writer makes them, and each statement after
//! the lock sees everything committed before it (READ COMMITTED). An admission's check and its
//! reservation therefore see and change the same state, and the ledger stays one chain. A read
//! runs in a read-only REPEATABLE READ transaction: one consistent snapshot.
//!
//! One connection per [`PgStore`], owned by a thread of its own: every transaction runs there,
//! one after another, while its caller waits. (The driver runs its own small async runtime, which
//! must not be entered from a caller's — the dispatcher and `aex serve` call the store from async
//! tasks.) A lost connection fails the operation in hand with [`Error::Unavailable`] (never an
//! admission without the store) and is made again by the next one. A commit whose outcome is
//! unknown — the connection lost during `COMMIT` — is reported as `Unavailable` too; an admission
//! re-sent with the same execution id is answered from the store, never reserved twice, and a
//! dispatched call never settled is charged in full at its TTL, as after a crash.
//!
//! Credentials come from the URL and never reach errors, logs or `Debug` output.
//!
//! Every wait is bounded, as with SQLite: connecting (10 s unless the URL says otherwise), the
//! write lock (`lock_timeout`, 10 s), a statement (30 s), and a transaction left idle by a stalled
//! process (the server ends it after 30 s, releasing the lock); TCP keepalives notice a vanished
//! peer. Commits wait for the server's durable commit (`synchronous_commit = on`); what survives
//! a server crash is then the server's `fsync` and replication settings.
//!
//! Each kernel reads its own clock for expiry, rate windows and budget periods, so the machines of
//! a fleet must keep their clocks in step (NTP): a machine ahead by Δ expires others'
//! reservations Δ early.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;
use std::sync::mpsc;

use parking_lot::{Condvar, Mutex};
use postgres::types::ToSql;
use postgres::{Client, NoTls, Row, Statement, Transaction};

use super::columns::{blob32, limit_u32, seal_from, select_agents, select_executions, select_teams};
use super::{Store, Tx};
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
use crate::team::Team;

/// Whether `path` names a PostgreSQL database (`postgresql://…` or `postgres://…`).
pub fn is_url(path: &str) -> bool {
    path.starts_with("postgresql://") || path.starts_with("postgres://")
}

/// The advisory lock every write transaction takes: "aex" in ASCII, one key for the database.
const WRITE_LOCK: i64 = 0x0061_6578;
/// The advisory lock held while the schema is created or migrated.
const SCHEMA_LOCK: i64 = 0x0061_6578_0001;

/// Session settings of every connection: bounded waits (see the module docs) and durable
/// commits whatever the server's default.
const SESSION: &str = "SET lock_timeout = '10s'; SET statement_timeout = '30s'; \
     SET idle_in_transaction_session_timeout = '30s'; SET synchronous_commit = on";

/// The schema, one entry per version; `aex_schema.version` holds how many are applied.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE aex_schema (version INTEGER NOT NULL);
INSERT INTO aex_schema (version) VALUES (0);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE agents (
    id                BIGSERIAL PRIMARY KEY,
    name              TEXT    COLLATE "C" NOT NULL UNIQUE,
    token_hash        BYTEA   NOT NULL UNIQUE,
    token_prefix      TEXT    NOT NULL,
    scope             TEXT    NOT NULL,
    ttl_ms            BIGINT,
    expires_at_ms     BIGINT,
    disabled          BOOLEAN NOT NULL,
    budget_micro      BIGINT  NOT NULL,
    spent_micro       BIGINT  NOT NULL,
    reserved_micro    BIGINT  NOT NULL,
    rpm               BIGINT,
    tpm               BIGINT,
    allowed_models    TEXT    NOT NULL,
    allow_tools       BOOLEAN NOT NULL,
    allow_streaming   BOOLEAN NOT NULL,
    allow_vision      BOOLEAN NOT NULL,
    strict            BOOLEAN NOT NULL,
    allow_passthrough BOOLEAN NOT NULL,
    max_concurrent    BIGINT,
    budget_period     TEXT    NOT NULL,
    period_start_ms   BIGINT  NOT NULL,
    team_id           BIGINT,
    created_at_ms     BIGINT  NOT NULL,
    seal              TEXT,
    seal_tag          BYTEA
);

CREATE TABLE teams (
    id             BIGSERIAL PRIMARY KEY,
    name           TEXT   COLLATE "C" NOT NULL UNIQUE,
    parent_id      BIGINT,
    budget_micro   BIGINT NOT NULL,
    spent_micro    BIGINT NOT NULL,
    reserved_micro BIGINT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    seal           TEXT,
    seal_tag       BYTEA
);

CREATE TABLE rate_buckets (
    scope    TEXT   NOT NULL,
    second   BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    tokens   BIGINT NOT NULL,
    PRIMARY KEY (scope, second)
);

CREATE TABLE executions (
    id                 TEXT   COLLATE "C" PRIMARY KEY,
    agent_id           BIGINT NOT NULL,
    agent              TEXT   NOT NULL,
    request_hash       BYTEA  NOT NULL,
    state              TEXT   NOT NULL,
    model              TEXT   NOT NULL,
    input_tokens       BIGINT NOT NULL,
    max_output_tokens  BIGINT NOT NULL,
    input_price        BIGINT NOT NULL,
    output_price       BIGINT NOT NULL,
    cached_input_price BIGINT,
    reserved_micro     BIGINT NOT NULL,
    cost_micro         BIGINT,
    usage_input        BIGINT,
    usage_output       BIGINT,
    usage_cached_input BIGINT,
    reason             TEXT,
    created_at_ms      BIGINT NOT NULL,
    expires_at_ms      BIGINT NOT NULL,
    dispatched_at_ms   BIGINT,
    settled_at_ms      BIGINT,
    teams              TEXT   NOT NULL,
    rate_scopes        TEXT   NOT NULL,
    rate_tokens        BIGINT NOT NULL
);

-- Text that is ordered (names, execution ids) sorts by bytes, as SQLite sorts it.
-- Open reservations by expiry, as in the SQLite schema.
CREATE INDEX executions_due ON executions (expires_at_ms) WHERE state IN ('RESERVED', 'DISPATCHED');

CREATE TABLE ledger (
    seq          BIGINT PRIMARY KEY,
    ts_ms        BIGINT NOT NULL,
    kind         TEXT   NOT NULL,
    agent        TEXT,
    execution_id TEXT,
    amount_micro BIGINT NOT NULL,
    data         TEXT   NOT NULL,
    prev_hash    BYTEA  NOT NULL,
    hash         BYTEA  NOT NULL
);

CREATE FUNCTION aex_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the ledger is append-only'; END $$;
CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION aex_ledger_append_only();
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger
    FOR EACH STATEMENT EXECUTE FUNCTION aex_ledger_append_only();
"#];

/// The tables of aex's schema: a database holding one of them without `aex_schema` is not
/// aex's (or is half-made by hand), and is refused.
const TABLES: &[&str] = &["meta", "agents", "teams", "rate_buckets", "executions", "ledger"];

/// The PostgreSQL implementation of [`Store`]. `Send + Sync`; share it behind an `Arc`.
pub struct PgStore {
    /// Where the database is, for messages: host, port and database name, never credentials.
    place: String,
    /// Work for the connection's thread; `None` once dropping.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    worker: Option<std::thread::JoinHandle<()>>,
    /// The process that started the thread: it exists only there.
    pid: u32,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("database", &self.place).finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Closing the queue ends the thread, which closes the connection.
        self.jobs.lock().take();
        if let Some(worker) = self.worker.take() {
            if self.pid != std::process::id() {
                // A forked child: the thread was not copied, so joining would wait forever.
                std::mem::forget(worker);
                return;
            }
            let _ = worker.join();
        }
    }
}

/// The connection's thread's state: how to connect, and the connection when there is one.
struct Link {
    config: postgres::Config,
    place: String,
    conn: Option<Conn>,
}

/// The connection settings aex adds where the URL sets none: a bounded connect and keepalives.
fn bounded(mut config: postgres::Config) -> postgres::Config {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    config.keepalives(true).keepalives_idle(std::time::Duration::from_secs(30));
    config
}

/// One connection and its prepared statements.
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

/// Work for the connection's thread: a closure borrowed from a caller that waits on `done`.
struct Job {
    /// Points into the stack of the caller, which does not return (nor touch the closure) until
    /// `done` is set; the thread does not touch it after setting it.
    run: *mut (dyn FnMut(&mut Link) + Send + 'static),
    done: Arc<(Mutex<bool>, Condvar)>,
}

// SAFETY: the closure is `Send`, and only the connection's thread calls it, while its caller
// waits (see `Job::run`).
unsafe impl Send for Job {}

impl PgStore {
    /// Connects to the database `url` names (`postgresql://user@host:port/db`), creating or
    /// migrating aex's schema (safe when several processes open a new database at once).
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] on field `path` for a malformed URL; [`Error::Unavailable`] when
    /// the server cannot be reached or refuses the credentials, the database is not aex's, or its
    /// schema is newer than this aex understands. No message carries the password.
    pub fn open(url: &str) -> Result<PgStore> {
        let config: postgres::Config = url
            .parse()
            .map_err(|e: postgres::Error| Error::invalid("path", format!("is not a valid PostgreSQL URL ({})", redact(&e.to_string(), url))))?;
        // A password with an unencoded '@' would leave part of itself in the host name.
        if config.get_hosts().iter().any(|h| matches!(h, postgres::config::Host::Tcp(h) if h.contains('@'))) {
            return Err(Error::invalid("path", "is not a valid PostgreSQL URL (percent-encode '@' in the password as %40)"));
        }
        let place = describe(&config);
        let (jobs, queue) = mpsc::channel::<Job>();
        let mut link = Link { config: bounded(config), place: place.clone(), conn: None };
        let worker = std::thread::Builder::new()
            .name("aex-postgres".into())
            .spawn(move || {
                for job in queue {
                    // SAFETY: see `Job::run`: the caller waits until `done` is set below.
                    let run = unsafe { &mut *job.run };
                    run(&mut link);
                    let (lock, signal) = &*job.done;
                    *lock.lock() = true;
                    signal.notify_one();
                }
            })
            .map_err(|e| Error::Unavailable(format!("cannot start the PostgreSQL connection's thread: {e}")))?;
        let store = PgStore { place, jobs: Mutex::new(Some(jobs)), worker: Some(worker), pid: std::process::id() };
        store.migrate()?;
        Ok(store)
    }

    /// Runs `f` on the connection's thread with a live connection (made first if there is none)
    /// and returns what it returns; a panic in `f` resumes here. A connection that failed is
    /// dropped, so the next call makes a new one.
    fn with_conn<T: Send>(&self, f: impl FnOnce(&mut Conn) -> Result<T> + Send) -> Result<T> {
        let mut f = Some(f);
        let mut out: Option<std::thread::Result<Result<T>>> = None;
        let mut run = |link: &mut Link| {
            let f = f.take().expect("run once");
            out = Some(catch_unwind(AssertUnwindSafe(|| link.with_conn(f))));
        };
        let run: &mut (dyn FnMut(&mut Link) + Send + '_) = &mut run;
        // SAFETY: only the lifetime is erased; this function waits below until the thread has
        // run the closure and set `done`, and the thread does not touch it after that.
        let run: *mut (dyn FnMut(&mut Link) + Send + 'static) = unsafe { std::mem::transmute(run) };
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let sent = match self.jobs.lock().as_ref() {
            Some(jobs) => jobs.send(Job { run, done: done.clone() }).is_ok(),
            None => false,
        };
        if !sent {
            return Err(Error::Unavailable(format!("the connection to PostgreSQL at {} is closed", self.place)));
        }
        let (lock, signal) = &*done;
        let mut finished = lock.lock();
        while !*finished {
            signal.wait(&mut finished);
        }
        drop(finished);
        match out.take() {
            Some(Ok(result)) => result,
            Some(Err(panic)) => resume_unwind(panic),
            None => Err(Error::Internal("the PostgreSQL thread ended without running the transaction".into())),
        }
    }

    fn migrate(&self) -> Result<()> {
        self.with_conn(|conn| {
            let client = &mut conn.client;
            // Session-level: held while this process looks and creates, released after.
            client.execute("SELECT pg_advisory_lock($1)", &[&SCHEMA_LOCK]).map_err(|e| pg(&e))?;
            let migrated = migrate_locked(client);
            let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&SCHEMA_LOCK]).map_err(|e| pg(&e));
            migrated.and(unlocked.map(drop))
        })
    }
}

impl Link {
    fn with_conn<T>(&mut self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        if self.conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let mut client = self
                .config
                .connect(NoTls)
                .map_err(|e| Error::Unavailable(format!("cannot connect to PostgreSQL at {}: {}", self.place, plain(&e))))?;
            client.batch_execute(SESSION).map_err(|e| pg(&e))?;
            self.conn = Some(Conn { client, statements: HashMap::new() });
        }
        let conn = self.conn.as_mut().expect("connected above");
        let result = f(conn);
        if conn.client.is_closed() {
            self.conn = None;
        }
        result
    }
}

fn migrate_locked(client: &mut Client) -> Result<()> {
    let has = |client: &mut Client, table: &str| -> Result<bool> {
        let row = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).map_err(|e| pg(&e))?;
        Ok(row.get(0))
    };
    let version: i64 = if has(client, "aex_schema")? {
        client.query_one("SELECT version::BIGINT FROM aex_schema", &[]).map_err(|e| pg(&e))?.get(0)
    } else {
        let mut found = None;
        for t in TABLES {
            if has(client, t)? {
                found = Some(t);
                break;
            }
        }
        if let Some(t) = found {
            return Err(Error::Unavailable(format!(
                "this PostgreSQL database is not aex's: it has a table '{t}' but no aex schema; use an empty database"
            )));
        }
        -1
    };
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(Error::Unavailable(format!(
            "database schema version {version} is newer than this aex understands ({known}); upgrade aex"
        )));
    }
    let first = if version < 0 { 0 } else { version as usize };
    if first == MIGRATIONS.len() {
        return Ok(());
    }
    let mut tx = client.transaction().map_err(|e| pg(&e))?;
    for sql in &MIGRATIONS[first..] {
        tx.batch_execute(sql).map_err(|e| pg(&e))?;
    }
    tx.execute("UPDATE aex_schema SET version = $1", &[&(known as i32)]).map_err(|e| pg(&e))?;
    tx.commit().map_err(|e| pg(&e))
}

/// Host, port and database of a config, for messages.
fn describe(config: &postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            postgres::config::Host::Tcp(h) => h.clone(),
            postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().or(config.get_user()).unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

/// A driver error as text, without anything of the URL's credentials (the driver's messages
/// never carry the password; the database error's own text is kept).
fn plain(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// A parse error's text with the URL's password, if it appears, cut out.
fn redact(text: &str, url: &str) -> String {
    let password = url.split_once("://").and_then(|(_, rest)| rest.split_once('@')).and_then(|(auth, _)| auth.split_once(':')).map(|(_, p)| p);
    match password {
        Some(p) if !p.is_empty() => text.replace(p, "***"),
        _ => text.to_string(),
    }
}

fn pg(e: &postgres::Error) -> Error {
    if e.is_closed() || e.as_db_error().is_none() {
        Error::Unavailable(format!("the PostgreSQL connection failed: {}", plain(e)))
    } else {
        Error::Unavailable(format!("PostgreSQL refused a statement: {}", plain(e)))
    }
}

fn is_unique_violation(e: &postgres::Error) -> bool {
    e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION)
}

impl Store for PgStore {
    fn write(&self, f: &mut (dyn FnMut(&mut dyn Tx) -> Result<()> + Send)) -> Result<()> {
        self.with_conn(|conn| {
            let mut tx = conn.client.transaction().map_err(|e| pg(&e))?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK]).map_err(|e| pg(&e))?;
            let outcome = catch_unwind(AssertUnwindSafe(|| f(&mut PgTx { tx: &mut tx, statements: &mut conn.statements })));
            match outcome {
                Ok(Ok(())) => tx.commit().map_err(|e| {
                    Error::Unavailable(format!("the commit's outcome is unknown (retry with the same execution id): {}", plain(&e)))
                }),
                Ok(Err(e)) => {
                    let _ = tx.rollback();
                    Err(e)
                }
                Err(panic) => {
                    let _ = tx.rollback();
                    resume_unwind(panic)
                }
            }
        })
    }

    fn read(&self, f: &mut (dyn FnMut(&mut dyn Tx) -> Result<()> + Send)) -> Result<()> {
        self.with_conn(|conn| {
            let mut tx = conn
                .client
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(|e| pg(&e))?;
            let outcome = catch_unwind(AssertUnwindSafe(|| f(&mut PgTx { tx: &mut tx, statements: &mut conn.statements })));
            let _ = tx.rollback();
            outcome.unwrap_or_else(|panic| resume_unwind(panic))
        })
    }

    fn schema_version(&self) -> u32 {
        MIGRATIONS.len() as u32
    }
}

/// One closure's view of a transaction.
struct PgTx<'a, 't> {
    tx: &'a mut Transaction<'t>,
    statements: &'a mut HashMap<&'static str, Statement>,
}

type Params<'p> = [&'p (dyn ToSql + Sync)];

impl PgTx<'_, '_> {
    fn statement(&mut self, sql: &'static str) -> Result<Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(sql).map_err(|e| pg(&e))?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    fn query(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Vec<Row>> {
        let s = self.statement(sql)?;
        self.tx.query(&s, params).map_err(|e| pg(&e))
    }

    fn query_opt(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Option<Row>> {
        let s = self.statement(sql)?;
        self.tx.query_opt(&s, params).map_err(|e| pg(&e))
    }

    fn execute(&mut self, sql: &'static str, params: &Params<'_>) -> Result<u64> {
        let s = self.statement(sql)?;
        self.tx.execute(&s, params).map_err(|e| pg(&e))
    }

    /// Runs an insert that returns one id, naming a unique-name violation as a conflict. The
    /// violation aborts the transaction, so it runs inside a savepoint.
    fn insert_named(&mut self, sql: &'static str, params: &Params<'_>, what: &str, name: &str) -> Result<i64> {
        let s = self.statement(sql)?;
        let mut savepoint = self.tx.savepoint("aex_insert").map_err(|e| pg(&e))?;
        match savepoint.query_one(&s, params) {
            Ok(row) => {
                savepoint.commit().map_err(|e| pg(&e))?;
                get(&row, 0)
            }
            Err(e) if is_unique_violation(&e) => {
                let _ = savepoint.rollback();
                Err(Error::conflict(ConflictReason::NameTaken, format!("{what} named '{name}' exists already")))
            }
            Err(e) => Err(pg(&e)),
        }
    }
}

/// One column, with a type mismatch (a column edited to another type by hand) as an error.
fn get<'r, T: postgres::types::FromSql<'r>>(row: &'r Row, i: usize) -> Result<T> {
    row.try_get(i).map_err(|e| Error::Unavailable(format!("PostgreSQL returned an unreadable column {i}: {e}")))
}

fn agent_from_row(r: &Row) -> Result<Agent> {
    let scope: String = get(r, 3)?;
    let models: String = get(r, 12)?;
    Ok(Agent {
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
    })
}

fn team_from_row(r: &Row) -> Result<Team> {
    Ok(Team {
        id: get(r, 0)?,
        name: get(r, 1)?,
        parent_id: get(r, 2)?,
        parent: get(r, 3)?,
        budget_micro: get(r, 4)?,
        spent_micro: get(r, 5)?,
        reserved_micro: get(r, 6)?,
        created_at_ms: get(r, 7)?,
    })
}

fn execution_from_row(r: &Row) -> Result<Execution> {
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
        self.query_opt(select_agents!("WHERE token_hash = $1"), &[&&token.0[..]])?.map(|r| agent_from_row(&r)).transpose()
    }

    fn agent_by_name(&mut self, name: &str) -> Result<Option<Agent>> {
        self.query_opt(select_agents!("WHERE name = $1"), &[&name])?.map(|r| agent_from_row(&r)).transpose()
    }

    fn agent_by_id(&mut self, id: i64) -> Result<Option<Agent>> {
        self.query_opt(select_agents!("WHERE id = $1"), &[&id])?.map(|r| agent_from_row(&r)).transpose()
    }

    fn agents(&mut self) -> Result<Vec<Agent>> {
        self.query(select_agents!("ORDER BY agents.name"), &[])?.iter().map(agent_from_row).collect()
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
        self.execute(
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
        self.execute("UPDATE agents SET spent_micro=$2, reserved_micro=$3 WHERE id=$1", &[&agent_id, &spent_micro, &reserved_micro])?;
        Ok(())
    }

    fn update_counters_sealed(&mut self, agent_id: i64, spent_micro: i64, reserved_micro: i64, text: &str, tag: &[u8]) -> Result<()> {
        self.execute(
            "UPDATE agents SET spent_micro=$2, reserved_micro=$3, seal=$4, seal_tag=$5 WHERE id=$1",
            &[&agent_id, &spent_micro, &reserved_micro, &text, &tag],
        )?;
        Ok(())
    }

    fn set_token(&mut self, agent_id: i64, token: &TokenHash, prefix: &str, expires_at_ms: Option<i64>) -> Result<()> {
        self.execute(
            "UPDATE agents SET token_hash=$2, token_prefix=$3, expires_at_ms=$4 WHERE id=$1",
            &[&agent_id, &&token.0[..], &prefix, &expires_at_ms],
        )?;
        Ok(())
    }

    fn delete_agent(&mut self, agent_id: i64) -> Result<()> {
        self.execute("DELETE FROM agents WHERE id=$1", &[&agent_id])?;
        Ok(())
    }

    fn agent_seal(&mut self, agent_id: i64) -> Result<Option<(TokenHash, Option<Seal>)>> {
        self.query_opt("SELECT token_hash, seal, seal_tag FROM agents WHERE id = $1", &[&agent_id])?
            .map(|r| Ok((TokenHash(blob32(get(&r, 0)?)), seal_from(get(&r, 1)?, get(&r, 2)?))))
            .transpose()
    }

    fn set_agent_seal(&mut self, agent_id: i64, text: &str, tag: &[u8]) -> Result<()> {
        self.execute("UPDATE agents SET seal = $2, seal_tag = $3 WHERE id = $1", &[&agent_id, &text, &tag])?;
        Ok(())
    }

    fn team_by_name(&mut self, name: &str) -> Result<Option<Team>> {
        self.query_opt(select_teams!("WHERE name = $1"), &[&name])?.map(|r| team_from_row(&r)).transpose()
    }

    fn team_by_id(&mut self, id: i64) -> Result<Option<Team>> {
        self.query_opt(select_teams!("WHERE id = $1"), &[&id])?.map(|r| team_from_row(&r)).transpose()
    }

    fn teams(&mut self) -> Result<Vec<Team>> {
        self.query(select_teams!("ORDER BY teams.name"), &[])?.iter().map(team_from_row).collect()
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
        self.execute("UPDATE teams SET budget_micro=$2 WHERE id=$1", &[&team_id, &budget_micro])?;
        Ok(())
    }

    fn update_team_counters(&mut self, team_id: i64, spent_micro: i64, reserved_micro: i64) -> Result<()> {
        self.execute("UPDATE teams SET spent_micro=$2, reserved_micro=$3 WHERE id=$1", &[&team_id, &spent_micro, &reserved_micro])?;
        Ok(())
    }

    fn update_team_counters_sealed(&mut self, team_id: i64, spent_micro: i64, reserved_micro: i64, text: &str, tag: &[u8]) -> Result<()> {
        self.execute(
            "UPDATE teams SET spent_micro=$2, reserved_micro=$3, seal=$4, seal_tag=$5 WHERE id=$1",
            &[&team_id, &spent_micro, &reserved_micro, &text, &tag],
        )?;
        Ok(())
    }

    fn delete_team(&mut self, team_id: i64) -> Result<()> {
        self.execute("DELETE FROM teams WHERE id=$1", &[&team_id])?;
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
        Ok(self
            .query_opt("SELECT seal, seal_tag FROM teams WHERE id = $1", &[&team_id])?
            .map(|r| Ok::<_, Error>(seal_from(get(&r, 0)?, get(&r, 1)?)))
            .transpose()?
            .flatten())
    }

    fn set_team_seal(&mut self, team_id: i64, text: &str, tag: &[u8]) -> Result<()> {
        self.execute("UPDATE teams SET seal = $2, seal_tag = $3 WHERE id = $1", &[&team_id, &text, &tag])?;
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
        self.query_opt(select_executions!("WHERE id = $1"), &[&id])?.map(|r| execution_from_row(&r)).transpose()
    }

    fn insert_execution(&mut self, e: &Execution) -> Result<()> {
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
            let Some(last) = rows.last() else { return Ok(()) };
            after = get(last, 0)?;
            for r in &rows {
                f(execution_from_row(r)?)?;
            }
        }
    }

    fn ledger_head(&mut self) -> Result<Option<Head>> {
        self.query_opt("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1", &[])?
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
}
