//! The embedded store: one SQLite file in WAL mode.
//!
//! One connection per [`SqliteStore`], behind a mutex: threads of one process take turns, which
//! costs nothing because SQLite admits one writer at a time anyway. Across processes, every write
//! transaction first takes an exclusive `flock` on a side file (`<db>.lock`), then `BEGIN
//! IMMEDIATE`. The kernel's lock queue is fair where SQLite's busy handler is not (with several
//! processes, some waited seconds for one transaction), and SQLite's own locks plus
//! `busy_timeout` still protect against writers that do not take the side lock, such as the
//! `sqlite3` shell. The side lock is held only for the length of one short transaction, and
//! waited for at most `busy_timeout` (`side_lock`). aex's SQLite locks with open-file-description
//! locks, so another copy of SQLite in this process cannot lose its writes (`ofd`).
//!
//! **Group commit.** Concurrent writers of one process share one SQLite transaction, so one
//! commit (and, under `full`, one fsync) serves many of them. A writer queues its closure and,
//! if the connection is free, becomes the leader: it takes every queued closure (up to
//! `max_batch`), runs each inside a savepoint of one transaction, commits, and hands each writer
//! its own result. A closure that fails is rolled back to its savepoint and leaves no trace; the
//! others are unaffected. Every writer returns only after the commit that holds its change is
//! done (durable as its `durability` says), and gets `Unavailable` if that commit failed. Each
//! closure sees the changes of the ones before it, exactly as if their transactions had committed
//! one after another. A lone writer runs in a transaction of its own, as before.
//!
//! Nothing read is cached between transactions: another process's change, or a hand edit in the
//! `sqlite3` shell, governs the very next operation.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::columns::{blob32, limit_u32, seal_from, select_agents, select_executions, select_teams};
use super::side_lock::{SideGuard, SideLock};
use super::{Store, Tx, WriteStats, files};
use crate::agent::{Agent, Capabilities};
use crate::budget::BudgetPeriod;
use crate::rate::Bucket;
use crate::team::Team;
use crate::auth::{Scope, TokenHash};
use crate::config::Prices;
use crate::error::{ConflictReason, Error, Result};
use crate::execution::{Execution, ExecutionState};
use crate::ledger::{Event, Head};
use crate::outside::Seal;
use crate::settlement::Usage;

/// How hard each commit is pushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every commit that must survive a power cut is fsynced before it returns: admissions,
    /// dispatch marks, agent and team changes — everything but a settlement that may be lost
    /// safely ([`Tx::sync_later`]: a dispatched execution's, charging at most its reservation,
    /// made on its own). Such a settlement reaches disk with the next fsynced commit or
    /// checkpoint; lost to a power cut before that, its execution is still dispatched and the
    /// TTL rule charges its full reservation — over-charged, never under-charged. So a call
    /// admitted dispatched costs one fsync. A failed fsync leaves the store refusing writes until
    /// it is opened again. Survives power loss.
    #[default]
    Full,
    /// WAL is fsynced at checkpoints (`synchronous=NORMAL`). Survives a process crash; a power
    /// loss may roll back the last commits, never corrupt the file.
    Normal,
    /// No fsync at all (`synchronous=OFF`). Survives a process crash, not an OS crash. For tests.
    Memory,
}

impl Durability {
    /// Parses `full`, `normal` or `memory`.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] on field `durability`.
    pub fn parse(s: &str) -> Result<Durability> {
        match s {
            "full" => Ok(Durability::Full),
            "normal" => Ok(Durability::Normal),
            "memory" => Ok(Durability::Memory),
            _ => Err(Error::invalid("durability", format!("must be 'full', 'normal' or 'memory', got '{s}'"))),
        }
    }

    fn pragma(self) -> &'static str {
        match self {
            // The store fsyncs the WAL itself after each commit that needs it (`sync_wal`).
            Durability::Full => "NORMAL",
            Durability::Normal => "NORMAL",
            Durability::Memory => "OFF",
        }
    }
}

/// Store settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// fsync policy.
    pub durability: Durability,
    /// How long a transaction waits for SQLite's lock before failing with `Unavailable`.
    pub busy_timeout: Duration,
    /// The most writers one shared transaction may serve (group commit); `1` gives every write
    /// a transaction of its own. Values below 1 count as 1.
    pub max_batch: usize,
}

/// The default [`StoreOptions::max_batch`].
pub const DEFAULT_MAX_BATCH: usize = 64;

/// Prepared statements kept per connection. Every statement a call runs stays compiled: an
/// admission and its settlement touch more distinct statements than rusqlite's default of 16,
/// and an evicted one is parsed and planned again on its next use.
const STATEMENT_CACHE: usize = 128;

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { durability: Durability::Full, busy_timeout: Duration::from_secs(10), max_batch: DEFAULT_MAX_BATCH }
    }
}

/// The schema, one entry per version; `PRAGMA user_version` holds how many are applied.
const MIGRATIONS: &[&str] = &[r"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE agents (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    name              TEXT    NOT NULL UNIQUE,
    token_hash        BLOB    NOT NULL UNIQUE,
    token_prefix      TEXT    NOT NULL,
    scope             TEXT    NOT NULL,
    ttl_ms            INTEGER,
    expires_at_ms     INTEGER,
    disabled          INTEGER NOT NULL,
    budget_micro      INTEGER NOT NULL,
    spent_micro       INTEGER NOT NULL,
    reserved_micro    INTEGER NOT NULL,
    rpm               INTEGER,
    tpm               INTEGER,
    allowed_models    TEXT    NOT NULL,
    allow_tools       INTEGER NOT NULL,
    allow_streaming   INTEGER NOT NULL,
    allow_vision      INTEGER NOT NULL,
    strict            INTEGER NOT NULL,
    allow_passthrough INTEGER NOT NULL,
    max_concurrent    INTEGER,
    budget_period     TEXT    NOT NULL,
    period_start_ms   INTEGER NOT NULL,
    team_id           INTEGER,
    created_at_ms     INTEGER NOT NULL
) STRICT;

CREATE TABLE teams (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    name           TEXT    NOT NULL UNIQUE,
    parent_id      INTEGER,
    budget_micro   INTEGER NOT NULL,
    spent_micro    INTEGER NOT NULL,
    reserved_micro INTEGER NOT NULL,
    created_at_ms  INTEGER NOT NULL
) STRICT;

CREATE TABLE rate_buckets (
    scope    TEXT    NOT NULL,
    second   INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    tokens   INTEGER NOT NULL,
    PRIMARY KEY (scope, second)
) STRICT, WITHOUT ROWID;

CREATE TABLE executions (
    id                 TEXT    PRIMARY KEY,
    agent_id           INTEGER NOT NULL,
    agent              TEXT    NOT NULL,
    request_hash       BLOB    NOT NULL,
    state              TEXT    NOT NULL,
    model              TEXT    NOT NULL,
    input_tokens       INTEGER NOT NULL,
    max_output_tokens  INTEGER NOT NULL,
    input_price        INTEGER NOT NULL,
    output_price       INTEGER NOT NULL,
    cached_input_price INTEGER,
    reserved_micro     INTEGER NOT NULL,
    cost_micro         INTEGER,
    usage_input        INTEGER,
    usage_output       INTEGER,
    usage_cached_input INTEGER,
    reason             TEXT,
    created_at_ms      INTEGER NOT NULL,
    expires_at_ms      INTEGER NOT NULL,
    dispatched_at_ms   INTEGER,
    settled_at_ms      INTEGER,
    teams              TEXT    NOT NULL,
    rate_scopes        TEXT    NOT NULL,
    rate_tokens        INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- Open reservations by expiry: small (only open executions), and only due ones match
-- `expires_at_ms <= now`, so both the per-agent and the all-agents query read just those.
CREATE INDEX executions_due ON executions (expires_at_ms) WHERE state IN ('RESERVED', 'DISPATCHED');

CREATE TABLE ledger (
    seq          INTEGER PRIMARY KEY,
    ts_ms        INTEGER NOT NULL,
    kind         TEXT    NOT NULL,
    agent        TEXT,
    execution_id TEXT,
    amount_micro INTEGER NOT NULL,
    data         TEXT    NOT NULL,
    prev_hash    BLOB    NOT NULL,
    hash         BLOB    NOT NULL
) STRICT;

CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
    BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
", r"
-- Seals: each row's power fields as aex last wrote them, with their tag (see `outside`).
ALTER TABLE agents ADD COLUMN seal TEXT;
ALTER TABLE agents ADD COLUMN seal_tag BLOB;
ALTER TABLE teams ADD COLUMN seal TEXT;
ALTER TABLE teams ADD COLUMN seal_tag BLOB;
"];

/// The SQLite implementation of [`Store`]. `Send + Sync`; share it behind an `Arc`.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// A second connection for reads of a file database: WAL readers never wait for writers, so
    /// a read does not queue behind a write that waits for another process's lock. `None` for an
    /// in-memory database (a second connection would be another database).
    reader: Option<Mutex<Connection>>,
    /// Writes waiting for a leader to run them.
    queue: Mutex<Vec<Job>>,
    max_batch: usize,
    stats: Mutex<WriteStats>,
    /// How long a writer waits for the cross-process lock (the store's busy timeout).
    lock_timeout: Duration,
    /// The cross-process write lock; `None` for an in-memory database.
    lock: Option<SideLock>,
    /// Whether commits that must survive a power cut are fsynced (`full`, on a file).
    sync_commits: bool,
    /// Why this store refuses every write: a commit it could not fsync (see `sync`).
    broken: Mutex<Option<String>>,
    path: Option<PathBuf>,
    /// What was unsafe about the files' permissions at open.
    warnings: Vec<String>,
}

/// A write closure, with its borrows' lifetime erased so that the leader's thread may run it.
type WriteFn<'a> = dyn FnMut(&mut dyn Tx) -> Result<()> + Send + 'a;

/// One queued write: its closure and where its result goes.
struct Job {
    /// Points into the stack of the writer that queued it, which does not return (nor touch the
    /// closure) until `done` holds its result; the leader does not touch it after that.
    f: *mut WriteFn<'static>,
    done: Arc<Slot>,
}

// SAFETY: the closure is `Send`, and the pointer is dereferenced by one thread at a time: the
// leader that took the job from the queue, while its writer waits on `done`.
unsafe impl Send for Job {}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

/// A writer's mailbox: its result once a leader has run and committed (or failed) its closure,
/// or a nudge to try to lead.
#[derive(Debug, Default)]
struct Slot {
    state: Mutex<SlotState>,
    signal: Condvar,
}

#[derive(Debug, Default)]
struct SlotState {
    result: Option<std::result::Result<Result<()>, Panic>>,
    nudged: bool,
}

/// A panic caught in a closure, carried back to the writer's own thread.
struct Panic(Box<dyn Any + Send>);

impl std::fmt::Debug for Panic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Panic")
    }
}

impl Slot {
    fn finish(&self, result: std::result::Result<Result<()>, Panic>) {
        self.state.lock().result = Some(result);
        self.signal.notify_one();
    }

    fn nudge(&self) {
        self.state.lock().nudged = true;
        self.signal.notify_one();
    }

    /// Waits for the result, or `None` when nudged to try to lead.
    fn wait(&self) -> Option<std::result::Result<Result<()>, Panic>> {
        let mut state = self.state.lock();
        loop {
            if let Some(result) = state.result.take() {
                return Some(result);
            }
            if std::mem::take(&mut state.nudged) {
                return None;
            }
            self.signal.wait(&mut state);
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and migrates its schema.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the file cannot be opened, locked or migrated, or its schema is
    /// newer than this version of aex understands.
    pub fn open(path: &Path, options: StoreOptions) -> Result<SqliteStore> {
        // Before aex's SQLite opens its first file: lock so that other copies of SQLite in this
        // process see aex's locks (see `ofd`).
        super::ofd::active();
        super::ofd::reap_parked();
        // Created private before SQLite opens it, so the WAL and shm files (which SQLite creates
        // with the database's mode) are private too.
        files::create_private(path).map_err(|e| Error::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        // One file, one lock file: reached through a symlink or another path, the database is
        // locked and checked where SQLite keeps its WAL, beside the real file.
        let real = std::fs::canonicalize(path).map_err(|e| Error::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        let path = real.as_path();
        let warnings = files::warnings(path);
        let conn = Connection::open(path).map_err(|e| Error::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock = files::open_private(Path::new(&lock_path))
            .map_err(|e| Error::Unavailable(format!("cannot open lock file {}: {e}", Path::new(&lock_path).display())))?;
        conn.busy_timeout(options.busy_timeout)?;
        // WAL mode is what makes readers never block the writer, and what `sync_wal` fsyncs.
        let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Unavailable(format!("cannot put {} in WAL mode (it stays in '{mode}' mode)", path.display())));
        }
        conn.pragma_update(None, "synchronous", options.durability.pragma())?;
        let mut store = SqliteStore::new(conn, Some(SideLock::new(lock)), Some(path.to_path_buf()), options);
        store.warnings = warnings;
        store.migrate()?;
        let reader = Connection::open(path).map_err(|e| Error::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        reader.busy_timeout(options.busy_timeout)?;
        reader.pragma_update(None, "query_only", true)?;
        store.reader = Some(Mutex::new(reader));
        Ok(store)
    }

    /// A private in-memory database, for tests and throwaway kernels.
    ///
    /// # Errors
    /// [`Error::Unavailable`] if SQLite cannot allocate it.
    pub fn open_in_memory() -> Result<SqliteStore> {
        let store = SqliteStore::new(Connection::open_in_memory()?, None, None, StoreOptions::default());
        store.migrate()?;
        Ok(store)
    }

    fn new(conn: Connection, lock: Option<SideLock>, path: Option<PathBuf>, options: StoreOptions) -> SqliteStore {
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        SqliteStore {
            sync_commits: path.is_some() && options.durability == Durability::Full,
            broken: Mutex::new(None),
            conn: Mutex::new(conn),
            reader: None,
            queue: Mutex::new(Vec::new()),
            max_batch: options.max_batch.max(1),
            lock_timeout: options.busy_timeout,
            stats: Mutex::new(WriteStats::default()),
            lock,
            path,
            warnings: Vec::new(),
        }
    }

    /// Takes the cross-process write lock (none for an in-memory database), waiting at most the
    /// store's timeout.
    fn side_lock(&self) -> Result<Option<SideGuard<'_>>> {
        self.lock.as_ref().map(|l| l.acquire(self.lock_timeout)).transpose()
    }

    /// The database file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn migrate(&self) -> Result<()> {
        let conn = self.conn.lock();
        let _side = self.side_lock()?;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let migrated = (|| {
            let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
            let known = MIGRATIONS.len() as i64;
            if version > known {
                return Err(Error::Unavailable(format!(
                    "database schema version {version} is newer than this aex understands ({known}); upgrade aex"
                )));
            }
            if version < 0 {
                // The header's user_version is a signed field: a damaged or foreign file.
                return Err(Error::Unavailable(format!("database schema version {version} is not one aex ever wrote")));
            }
            for sql in &MIGRATIONS[version as usize..] {
                conn.execute_batch(sql)?;
            }
            conn.pragma_update(None, "user_version", known)?;
            conn.execute_batch("COMMIT")?;
            self.sync(&conn)
        })();
        if migrated.is_err() && !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        migrated
    }

    /// Queues `f` and returns once a leader (this thread, or another writer's) has run it and
    /// committed its changes, or rolled them back on `Err`, a panic or a failed commit.
    fn write_queued(&self, f: &mut WriteFn<'_>) -> Result<()> {
        // SAFETY: only the lifetime is erased; see `Job::f`.
        let f: *mut WriteFn<'static> = unsafe { std::mem::transmute::<&mut WriteFn<'_>, &mut WriteFn<'static>>(f) };
        let done = Arc::new(Slot::default());
        self.queue.lock().push(Job { f, done: done.clone() });
        loop {
            if let Some(conn) = self.conn.try_lock() {
                self.lead(&conn);
                drop(conn);
                self.hand_over();
            }
            let ready = done.state.lock().result.is_some();
            if (ready || self.conn.is_locked())
                && let Some(result) = done.wait()
            {
                return result.unwrap_or_else(|panic| resume_unwind(panic.0));
            }
        }
    }

    /// After releasing the connection: writers that queued while it was held need a leader, so
    /// the oldest is nudged to become one.
    fn hand_over(&self) {
        if let Some(next) = self.queue.lock().first() {
            next.done.nudge();
        }
    }

    /// Runs one batch of queued writes in one transaction and hands out the results.
    fn lead(&self, conn: &Connection) {
        let jobs: Vec<Job> = {
            let mut queue = self.queue.lock();
            let n = queue.len().min(self.max_batch);
            queue.drain(..n).collect()
        };
        if jobs.is_empty() {
            return;
        }
        if let Some(why) = self.broken.lock().clone() {
            return jobs.iter().for_each(|j| j.done.finish(Ok(Err(Error::Unavailable(why.clone())))));
        }
        let started = std::time::Instant::now();
        let side = match self.side_lock() {
            Ok(side) => side,
            Err(e) => return jobs.iter().for_each(|j| j.done.finish(Ok(Err(e.clone())))),
        };
        if let Err(e) = run(conn, "BEGIN IMMEDIATE") {
            return jobs.iter().for_each(|j| j.done.finish(Ok(Err(e.clone()))));
        }
        let alone = jobs.len() == 1;
        let mut results = Vec::with_capacity(jobs.len());
        let mut sync_now = false;
        for job in &jobs {
            let (result, later) = self.run_member(conn, job, alone);
            sync_now |= matches!(result, Ok(Ok(()))) && !later;
            results.push(result);
        }
        let mut committed = if conn.is_autocommit() {
            Err(Error::Unavailable("the store rolled the transaction back".into()))
        } else if alone && !matches!(results[0], Ok(Ok(()))) {
            run(conn, "ROLLBACK")
        } else {
            run(conn, "COMMIT")
        };
        if committed.is_err() && !conn.is_autocommit() {
            let _ = run(conn, "ROLLBACK");
        }
        // Other processes may write while this one waits for the disk.
        drop(side);
        if committed.is_ok() && sync_now {
            committed = self.sync(conn);
        }
        self.stats.lock().record(jobs.len(), started.elapsed());
        for (job, result) in jobs.iter().zip(results) {
            let result = match (&committed, result) {
                (Err(e @ Error::Unavailable(m)), Ok(Ok(()))) if m.starts_with(NOT_ON_DISK) => Ok(Err(e.clone())),
                (Err(e), Ok(Ok(()))) => Ok(Err(Error::Unavailable(format!("the transaction was rolled back: {e}")))),
                (_, result) => result,
            };
            job.done.finish(result);
        }
    }

    /// Runs one queued closure: inside a savepoint unless it is `alone` in its transaction.
    /// Also returns whether the closure said its change may reach disk later
    /// ([`Tx::sync_later`]).
    fn run_member(&self, conn: &Connection, job: &Job, alone: bool) -> (std::result::Result<Result<()>, Panic>, bool) {
        if conn.is_autocommit() {
            // An earlier member's failure made SQLite roll back the whole transaction.
            return (Ok(Err(Error::Unavailable("the store rolled the transaction back".into()))), false);
        }
        if !alone && let Err(e) = run(conn, "SAVEPOINT member") {
            return (Ok(Err(e)), false);
        }
        // SAFETY: see `Job::f`; its writer is blocked on `job.done` until `finish`.
        let f = unsafe { &mut *job.f };
        let mut tx = SqliteTx::new(conn);
        let result = catch_unwind(AssertUnwindSafe(|| f(&mut tx))).map_err(Panic);
        let later = tx.sync_later;
        if !alone && !conn.is_autocommit() {
            let kept = matches!(result, Ok(Ok(())));
            if let Err(e) = (if kept { Ok(()) } else { run(conn, "ROLLBACK TO member") }).and_then(|()| run(conn, "RELEASE member")) {
                // The savepoint could not be closed, so this member's changes cannot be told
                // apart from the others': the whole transaction goes, and every member fails.
                let _ = run(conn, "ROLLBACK");
                return (Ok(Err(e)), false);
            }
        }
        (result, later)
    }

    /// After a commit that must survive a power cut, under `full`: fsyncs the WAL, which holds
    /// that commit's frames and every earlier one (whoever wrote them). The connection runs at
    /// `synchronous=NORMAL`, so SQLite itself fsyncs only at checkpoints; this is the commit's
    /// fsync, taken only when the transaction needs it. Nothing to do otherwise.
    ///
    /// The commit is visible to other connections before this returns. If the fsync fails, its
    /// writers get [`Error::Unavailable`] although the change stands (an admission then holds
    /// its reservation until the TTL rule settles it: charged in full if it was admitted
    /// dispatched, never under-charged), and the store refuses every later write until the
    /// database is opened again: after a failed fsync the OS may have dropped those pages while
    /// a later fsync succeeds, so nothing written after it could be trusted to be on disk.
    fn sync(&self, conn: &Connection) -> Result<()> {
        if !self.sync_commits {
            return Ok(());
        }
        sync_wal(conn).map_err(|e| {
            let why = format!("{NOT_ON_DISK}: {e}");
            *self.broken.lock() = Some(format!("{why}; this kernel refuses writes until the database is opened again"));
            Error::Unavailable(why)
        })
    }
}

/// How a commit whose fsync failed is reported.
const NOT_ON_DISK: &str = "the change was committed but could not be written to disk";

/// fsyncs the connection's write-ahead log through SQLite's own file object (the VFS's `xSync`,
/// as SQLite's `synchronous=FULL` commit does). No WAL open means nothing was written.
fn sync_wal(conn: &Connection) -> std::result::Result<(), String> {
    use rusqlite::ffi;
    let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: the caller holds the connection (its mutex), so no other thread uses the handle;
    // SQLITE_FCNTL_JOURNAL_POINTER writes one `sqlite3_file *` (the WAL's, or null) to `file`.
    let rc = unsafe {
        ffi::sqlite3_file_control(conn.handle(), c"main".as_ptr(), ffi::SQLITE_FCNTL_JOURNAL_POINTER, (&raw mut file).cast())
    };
    if rc != ffi::SQLITE_OK {
        return Err(format!("cannot reach the write-ahead log (SQLite error {rc})"));
    }
    // SAFETY: a non-null pointer is the open WAL file of this connection, valid while the
    // connection is in WAL mode and held by the caller; its methods are the VFS's.
    unsafe {
        if file.is_null() || (*file).pMethods.is_null() {
            return Ok(());
        }
        let Some(x_sync) = (*(*file).pMethods).xSync else { return Ok(()) };
        match x_sync(file, ffi::SQLITE_SYNC_NORMAL) {
            ffi::SQLITE_OK => Ok(()),
            rc => Err(format!("fsync of the write-ahead log failed (SQLite error {rc})")),
        }
    }
}

/// Runs one transaction-control statement, prepared once per connection.
fn run(conn: &Connection, sql: &str) -> Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

impl Store for SqliteStore {
    fn write(&self, f: &mut WriteFn<'_>) -> Result<()> {
        self.write_queued(f)
    }

    fn schema_version(&self) -> u32 {
        // `open` migrated the file to exactly this version, or refused it.
        MIGRATIONS.len() as u32
    }

    fn write_stats(&self) -> WriteStats {
        *self.stats.lock()
    }

    fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    fn read(&self, f: &mut (dyn FnMut(&mut dyn Tx) -> Result<()> + Send)) -> Result<()> {
        if let Some(reader) = &self.reader {
            let conn = reader.lock();
            conn.execute_batch("BEGIN DEFERRED")?;
            let result = catch_unwind(AssertUnwindSafe(|| f(&mut SqliteTx::new(&conn))));
            let _ = conn.execute_batch("ROLLBACK");
            return result.unwrap_or_else(|panic| resume_unwind(panic));
        }
        let conn = self.conn.lock();
        conn.execute_batch("BEGIN DEFERRED")?;
        let result = catch_unwind(AssertUnwindSafe(|| f(&mut SqliteTx::new(&conn))));
        let _ = conn.execute_batch("ROLLBACK");
        drop(conn);
        self.hand_over();
        result.unwrap_or_else(|panic| resume_unwind(panic))
    }
}

/// One closure's view of a transaction.
struct SqliteTx<'c> {
    conn: &'c Connection,
    /// The seal columns of the agent or team row loaded last, handed to the seal check that
    /// follows the load without a second query. Taken once; cleared by any write to that table;
    /// dropped with the closure.
    last_seal: Option<LastSeal>,
    /// Set by [`Tx::sync_later`].
    sync_later: bool,
}

#[derive(Debug)]
enum LastSeal {
    Agent(i64, TokenHash, Option<Seal>),
    Team(i64, Option<Seal>),
}

impl<'c> SqliteTx<'c> {
    fn new(conn: &'c Connection) -> Self {
        SqliteTx { conn, last_seal: None, sync_later: false }
    }

    fn load_agent(&mut self, sql: &str, key: impl rusqlite::Params) -> Result<Option<Agent>> {
        let row = self
            .conn
            .prepare_cached(sql)?
            .query_row(key, |r| {
                let seal = LastSeal::Agent(r.get(0)?, TokenHash(blob32(r.get(24)?)), seal_from(r.get(25)?, r.get(26)?));
                Ok((agent_from_row(r)?, seal))
            })
            .optional()?;
        Ok(row.map(|(agent, seal)| {
            self.last_seal = Some(seal);
            agent
        }))
    }

    fn load_team(&mut self, sql: &str, key: impl rusqlite::Params) -> Result<Option<Team>> {
        let row = self
            .conn
            .prepare_cached(sql)?
            .query_row(key, |r| Ok((team_from_row(r)?, LastSeal::Team(r.get(0)?, seal_from(r.get(8)?, r.get(9)?)))))
            .optional()?;
        Ok(row.map(|(team, seal)| {
            self.last_seal = Some(seal);
            team
        }))
    }
}

fn agent_from_row(r: &Row<'_>) -> rusqlite::Result<Agent> {
    let scope: String = r.get(3)?;
    let models: String = r.get(12)?;
    Ok(Agent {
        id: r.get(0)?,
        name: r.get(1)?,
        token_prefix: r.get(2)?,
        scope: if scope == Scope::ReadOnly.as_str() { Scope::ReadOnly } else { Scope::Execution },
        ttl_ms: r.get(4)?,
        expires_at_ms: r.get(5)?,
        disabled: r.get(6)?,
        budget_micro: r.get(7)?,
        spent_micro: r.get(8)?,
        reserved_micro: r.get(9)?,
        rpm: limit_u32(r.get(10)?),
        tpm: r.get::<_, Option<i64>>(11)?.map(|v| v.max(0) as u64),
        allowed_models: serde_json::from_str(&models).unwrap_or_default(),
        capabilities: Capabilities { tools: r.get(13)?, streaming: r.get(14)?, vision: r.get(15)? },
        strict: r.get(16)?,
        allow_passthrough: r.get(17)?,
        max_concurrent: limit_u32(r.get(18)?),
        budget_period: BudgetPeriod::parse(&r.get::<_, String>(19)?).unwrap_or_default(),
        period_start_ms: r.get(20)?,
        team_id: r.get(21)?,
        team: r.get(22)?,
        created_at_ms: r.get(23)?,
    })
}

fn team_from_row(r: &Row<'_>) -> rusqlite::Result<Team> {
    Ok(Team {
        id: r.get(0)?,
        name: r.get(1)?,
        parent_id: r.get(2)?,
        parent: r.get(3)?,
        budget_micro: r.get(4)?,
        spent_micro: r.get(5)?,
        reserved_micro: r.get(6)?,
        created_at_ms: r.get(7)?,
    })
}

fn execution_from_row(r: &Row<'_>) -> rusqlite::Result<Execution> {
    let hash: Vec<u8> = r.get(3)?;
    let state: String = r.get(4)?;
    let usage_input: Option<i64> = r.get(13)?;
    let usage = match usage_input {
        Some(input_tokens) => Some(Usage {
            input_tokens,
            output_tokens: r.get::<_, Option<i64>>(14)?.unwrap_or(0),
            cached_input_tokens: r.get::<_, Option<i64>>(15)?.unwrap_or(0),
        }),
        None => None,
    };
    Ok(Execution {
        id: r.get(0)?,
        agent_id: r.get(1)?,
        agent: r.get(2)?,
        request_hash: hash.try_into().unwrap_or([0; 32]),
        state: ExecutionState::parse(&state).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(4, rusqlite::types::Type::Text, Box::new(e))
        })?,
        model: r.get(5)?,
        input_tokens: r.get(6)?,
        max_output_tokens: r.get(7)?,
        prices: Prices { input: r.get(8)?, output: r.get(9)?, cached_input: r.get(10)? },
        reserved_micro: r.get(11)?,
        cost_micro: r.get(12)?,
        usage,
        reason: r.get(16)?,
        created_at_ms: r.get(17)?,
        expires_at_ms: r.get(18)?,
        dispatched_at_ms: r.get(19)?,
        settled_at_ms: r.get(20)?,
        teams: r.get::<_, String>(21)?.split_whitespace().filter_map(|t| t.parse().ok()).collect(),
        rate_scopes: r.get(22)?,
        rate_tokens: r.get(23)?,
    })
}

fn event_from_row(r: &Row<'_>) -> rusqlite::Result<Event> {
    Ok(Event {
        seq: r.get::<_, i64>(0)?.max(0) as u64,
        ts_ms: r.get(1)?,
        kind: r.get(2)?,
        agent: r.get(3)?,
        execution_id: r.get(4)?,
        amount_micro: r.get(5)?,
        data: r.get(6)?,
        prev_hash: blob32(r.get(7)?),
        hash: blob32(r.get(8)?),
    })
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

impl Tx for SqliteTx<'_> {
    fn agent_by_token(&mut self, token: &TokenHash) -> Result<Option<Agent>> {
        self.load_agent(select_agents!("WHERE token_hash = ?1"), [&token.0[..]])
    }

    fn agent_by_name(&mut self, name: &str) -> Result<Option<Agent>> {
        self.load_agent(select_agents!("WHERE name = ?1"), [name])
    }

    fn agent_by_id(&mut self, id: i64) -> Result<Option<Agent>> {
        self.load_agent(select_agents!("WHERE id = ?1"), [id])
    }

    fn agents(&mut self) -> Result<Vec<Agent>> {
        let sql = select_agents!("ORDER BY agents.name");
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map([], agent_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn insert_agent(&mut self, a: &Agent, token: &TokenHash) -> Result<i64> {
        self.last_seal = None;
        let models = serde_json::to_string(&a.allowed_models).map_err(|e| Error::Internal(e.to_string()))?;
        let res = self.conn.prepare_cached(
            "INSERT INTO agents (name, token_hash, token_prefix, scope, ttl_ms, expires_at_ms, disabled, budget_micro, \
             spent_micro, reserved_micro, rpm, tpm, allowed_models, allow_tools, allow_streaming, allow_vision, strict, \
             allow_passthrough, max_concurrent, budget_period, period_start_ms, team_id, created_at_ms) \
             VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20,?21,?22,?23)",
        )?
        .execute(params![
            a.name,
            &token.0[..],
            a.token_prefix,
            a.scope.as_str(),
            a.ttl_ms,
            a.expires_at_ms,
            a.disabled,
            a.budget_micro,
            a.spent_micro,
            a.reserved_micro,
            a.rpm,
            a.tpm.map(|v| v as i64),
            models,
            a.capabilities.tools,
            a.capabilities.streaming,
            a.capabilities.vision,
            a.strict,
            a.allow_passthrough,
            a.max_concurrent,
            a.budget_period.as_str(),
            a.period_start_ms,
            a.team_id,
            a.created_at_ms,
        ]);
        match res {
            Ok(_) => Ok(self.conn.last_insert_rowid()),
            Err(e) if is_unique_violation(&e) => {
                Err(Error::conflict(ConflictReason::NameTaken, format!("an agent named '{}' exists already", a.name)))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn update_agent(&mut self, a: &Agent) -> Result<()> {
        self.last_seal = None;
        let models = serde_json::to_string(&a.allowed_models).map_err(|e| Error::Internal(e.to_string()))?;
        self.conn
            .prepare_cached(
                "UPDATE agents SET scope=?2, ttl_ms=?3, expires_at_ms=?4, disabled=?5, budget_micro=?6, spent_micro=?7, \
                 reserved_micro=?8, rpm=?9, tpm=?10, allowed_models=?11, allow_tools=?12, allow_streaming=?13, \
                 allow_vision=?14, strict=?15, allow_passthrough=?16, max_concurrent=?17, budget_period=?18, \
                 period_start_ms=?19, team_id=?20 WHERE id=?1",
            )?
            .execute(params![
                a.id,
                a.scope.as_str(),
                a.ttl_ms,
                a.expires_at_ms,
                a.disabled,
                a.budget_micro,
                a.spent_micro,
                a.reserved_micro,
                a.rpm,
                a.tpm.map(|v| v as i64),
                models,
                a.capabilities.tools,
                a.capabilities.streaming,
                a.capabilities.vision,
                a.strict,
                a.allow_passthrough,
                a.max_concurrent,
                a.budget_period.as_str(),
                a.period_start_ms,
                a.team_id,
            ])?;
        Ok(())
    }

    fn update_counters(&mut self, agent_id: i64, spent_micro: i64, reserved_micro: i64) -> Result<()> {
        self.last_seal = None;
        self.conn
            .prepare_cached("UPDATE agents SET spent_micro=?2, reserved_micro=?3 WHERE id=?1")?
            .execute(params![agent_id, spent_micro, reserved_micro])?;
        Ok(())
    }

    fn update_counters_sealed(&mut self, agent_id: i64, spent_micro: i64, reserved_micro: i64, text: &str, tag: &[u8]) -> Result<()> {
        self.last_seal = None;
        self.conn
            .prepare_cached("UPDATE agents SET spent_micro=?2, reserved_micro=?3, seal=?4, seal_tag=?5 WHERE id=?1")?
            .execute(params![agent_id, spent_micro, reserved_micro, text, tag])?;
        Ok(())
    }

    fn set_token(&mut self, agent_id: i64, token: &TokenHash, prefix: &str, expires_at_ms: Option<i64>) -> Result<()> {
        self.last_seal = None;
        self.conn
            .prepare_cached("UPDATE agents SET token_hash=?2, token_prefix=?3, expires_at_ms=?4 WHERE id=?1")?
            .execute(params![agent_id, &token.0[..], prefix, expires_at_ms])?;
        Ok(())
    }

    fn delete_agent(&mut self, agent_id: i64) -> Result<()> {
        self.last_seal = None;
        self.conn.prepare_cached("DELETE FROM agents WHERE id=?1")?.execute([agent_id])?;
        Ok(())
    }

    fn agent_seal(&mut self, agent_id: i64) -> Result<Option<(TokenHash, Option<Seal>)>> {
        if let Some(LastSeal::Agent(id, token, seal)) = self.last_seal.take()
            && id == agent_id
        {
            return Ok(Some((token, seal)));
        }
        Ok(self
            .conn
            .prepare_cached("SELECT token_hash, seal, seal_tag FROM agents WHERE id = ?1")?
            .query_row([agent_id], |r| {
                let token: Vec<u8> = r.get(0)?;
                Ok((TokenHash(blob32(token)), seal_from(r.get(1)?, r.get(2)?)))
            })
            .optional()?)
    }

    fn set_agent_seal(&mut self, agent_id: i64, text: &str, tag: &[u8]) -> Result<()> {
        self.last_seal = None;
        self.conn.prepare_cached("UPDATE agents SET seal = ?2, seal_tag = ?3 WHERE id = ?1")?.execute(params![agent_id, text, tag])?;
        Ok(())
    }

    fn team_by_name(&mut self, name: &str) -> Result<Option<Team>> {
        self.load_team(select_teams!("WHERE name = ?1"), [name])
    }

    fn team_by_id(&mut self, id: i64) -> Result<Option<Team>> {
        self.load_team(select_teams!("WHERE id = ?1"), [id])
    }

    fn teams(&mut self) -> Result<Vec<Team>> {
        let mut stmt = self.conn.prepare_cached(select_teams!("ORDER BY teams.name"))?;
        let rows = stmt.query_map([], team_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn insert_team(&mut self, t: &Team) -> Result<i64> {
        self.last_seal = None;
        let res = self
            .conn
            .prepare_cached(
                "INSERT INTO teams (name, parent_id, budget_micro, spent_micro, reserved_micro, created_at_ms) \
                 VALUES (?1,?2,?3,?4,?5,?6)",
            )?
            .execute(params![t.name, t.parent_id, t.budget_micro, t.spent_micro, t.reserved_micro, t.created_at_ms]);
        match res {
            Ok(_) => Ok(self.conn.last_insert_rowid()),
            Err(e) if is_unique_violation(&e) => {
                Err(Error::conflict(ConflictReason::NameTaken, format!("a team named '{}' exists already", t.name)))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn update_team_budget(&mut self, team_id: i64, budget_micro: i64) -> Result<()> {
        self.last_seal = None;
        self.conn.prepare_cached("UPDATE teams SET budget_micro=?2 WHERE id=?1")?.execute(params![team_id, budget_micro])?;
        Ok(())
    }

    fn update_team_counters(&mut self, team_id: i64, spent_micro: i64, reserved_micro: i64) -> Result<()> {
        self.last_seal = None;
        self.conn
            .prepare_cached("UPDATE teams SET spent_micro=?2, reserved_micro=?3 WHERE id=?1")?
            .execute(params![team_id, spent_micro, reserved_micro])?;
        Ok(())
    }

    fn update_team_counters_sealed(&mut self, team_id: i64, spent_micro: i64, reserved_micro: i64, text: &str, tag: &[u8]) -> Result<()> {
        self.last_seal = None;
        self.conn
            .prepare_cached("UPDATE teams SET spent_micro=?2, reserved_micro=?3, seal=?4, seal_tag=?5 WHERE id=?1")?
            .execute(params![team_id, spent_micro, reserved_micro, text, tag])?;
        Ok(())
    }

    fn delete_team(&mut self, team_id: i64) -> Result<()> {
        self.last_seal = None;
        self.conn.prepare_cached("DELETE FROM teams WHERE id=?1")?.execute([team_id])?;
        Ok(())
    }

    fn team_members(&mut self, team_id: i64) -> Result<i64> {
        Ok(self.conn.prepare_cached(
            "SELECT (SELECT COUNT(*) FROM agents WHERE team_id = ?1) + (SELECT COUNT(*) FROM teams WHERE parent_id = ?1)",
        )?
        .query_row([team_id], |r| r.get(0))?)
    }

    fn team_seal(&mut self, team_id: i64) -> Result<Option<Seal>> {
        if let Some(LastSeal::Team(id, seal)) = self.last_seal.take()
            && id == team_id
        {
            return Ok(seal);
        }
        Ok(self
            .conn
            .prepare_cached("SELECT seal, seal_tag FROM teams WHERE id = ?1")?
            .query_row([team_id], |r| Ok(seal_from(r.get(0)?, r.get(1)?)))
            .optional()?
            .flatten())
    }

    fn set_team_seal(&mut self, team_id: i64, text: &str, tag: &[u8]) -> Result<()> {
        self.last_seal = None;
        self.conn.prepare_cached("UPDATE teams SET seal = ?2, seal_tag = ?3 WHERE id = ?1")?.execute(params![team_id, text, tag])?;
        Ok(())
    }

    fn all_rate_buckets(&mut self, from_second: i64) -> Result<Vec<(String, Bucket)>> {
        let mut stmt = self.conn.prepare("SELECT scope, second, requests, tokens FROM rate_buckets WHERE second >= ?1")?;
        let rows = stmt.query_map([from_second], |r| {
            Ok((r.get(0)?, Bucket { second: r.get(1)?, requests: r.get(2)?, tokens: r.get(3)? }))
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn rate_buckets(&mut self, scope: &str, from_second: i64) -> Result<Vec<Bucket>> {
        let mut stmt = self.conn.prepare_cached("SELECT second, requests, tokens FROM rate_buckets WHERE scope = ?1 AND second >= ?2")?;
        let rows = stmt.query_map(params![scope, from_second], |r| {
            Ok(Bucket { second: r.get(0)?, requests: r.get(1)?, tokens: r.get(2)? })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn rate_add(&mut self, scope: &str, second: i64, requests: i64, tokens: i64) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO rate_buckets (scope, second, requests, tokens) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (scope, second) DO UPDATE SET requests = requests + ?3, tokens = tokens + ?4",
            )?
            .execute(params![scope, second, requests, tokens])?;
        Ok(())
    }

    fn rate_prune(&mut self, scope: &str, before_second: i64) -> Result<()> {
        self.conn.prepare_cached("DELETE FROM rate_buckets WHERE scope = ?1 AND second < ?2")?.execute(params![scope, before_second])?;
        Ok(())
    }

    fn rate_adjust(&mut self, scope: &str, second: i64, delta: i64) -> Result<()> {
        self.conn
            .prepare_cached("UPDATE rate_buckets SET tokens = max(0, tokens + ?3) WHERE scope = ?1 AND second = ?2")?
            .execute(params![scope, second, delta])?;
        Ok(())
    }

    fn open_count(&mut self, agent_id: Option<i64>) -> Result<(i64, Option<i64>)> {
        let row = |r: &Row<'_>| Ok((r.get(0)?, r.get(1)?));
        Ok(match agent_id {
            Some(id) => self
                .conn
                .prepare_cached(
                    "SELECT COUNT(*), MIN(expires_at_ms) FROM executions \
                     WHERE state IN ('RESERVED', 'DISPATCHED') AND expires_at_ms IS NOT NULL AND agent_id = ?1",
                )?
                .query_row([id], row)?,
            None => self
                .conn
                .prepare_cached(
                    "SELECT COUNT(*), MIN(expires_at_ms) FROM executions \
                     WHERE state IN ('RESERVED', 'DISPATCHED') AND expires_at_ms IS NOT NULL",
                )?
                .query_row([], row)?,
        })
    }

    fn execution(&mut self, id: &str) -> Result<Option<Execution>> {
        let sql = select_executions!("WHERE id = ?1");
        Ok(self.conn.prepare_cached(sql)?.query_row([id], execution_from_row).optional()?)
    }

    fn insert_execution(&mut self, e: &Execution) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO executions (id, agent_id, agent, request_hash, state, model, input_tokens, \
                 max_output_tokens, input_price, output_price, cached_input_price, reserved_micro, created_at_ms, \
                 expires_at_ms, teams, rate_scopes, rate_tokens) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17)",
            )?
            .execute(params![
                e.id,
                e.agent_id,
                e.agent,
                &e.request_hash[..],
                e.state.as_str(),
                e.model,
                e.input_tokens,
                e.max_output_tokens,
                e.prices.input,
                e.prices.output,
                e.prices.cached_input,
                e.reserved_micro,
                e.created_at_ms,
                e.expires_at_ms,
                e.teams.iter().map(i64::to_string).collect::<Vec<_>>().join(" "),
                e.rate_scopes,
                e.rate_tokens,
            ])?;
        Ok(())
    }

    fn update_execution(&mut self, e: &Execution) -> Result<()> {
        let u = e.usage.as_ref();
        self.conn
            .prepare_cached(
                "UPDATE executions SET state=?2, cost_micro=?3, usage_input=?4, usage_output=?5, usage_cached_input=?6, \
                 reason=?7, dispatched_at_ms=?8, settled_at_ms=?9 WHERE id=?1",
            )?
            .execute(params![
                e.id,
                e.state.as_str(),
                e.cost_micro,
                u.map(|u| u.input_tokens),
                u.map(|u| u.output_tokens),
                u.map(|u| u.cached_input_tokens),
                e.reason,
                e.dispatched_at_ms,
                e.settled_at_ms,
            ])?;
        Ok(())
    }

    fn open_executions(&mut self, agent_id: Option<i64>, expiring_by: Option<i64>) -> Result<Vec<Execution>> {
        // One statement per shape; both seek through `executions_due`. No ORDER BY: with it,
        // SQLite re-prepares the statement whenever `now` changes; the few rows are sorted here.
        let by = expiring_by.unwrap_or(i64::MAX);
        let mut rows = match agent_id {
            Some(id) => {
                let sql = select_executions!(
                    "WHERE state IN ('RESERVED', 'DISPATCHED') AND expires_at_ms <= ?1 AND agent_id = ?2"
                );
                let mut stmt = self.conn.prepare_cached(sql)?;
                stmt.query_map(params![by, id], execution_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?
            }
            None => {
                let sql = select_executions!("WHERE state IN ('RESERVED', 'DISPATCHED') AND expires_at_ms <= ?1");
                let mut stmt = self.conn.prepare_cached(sql)?;
                stmt.query_map(params![by], execution_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?
            }
        };
        rows.sort_by(|a, b| (a.expires_at_ms, &a.id).cmp(&(b.expires_at_ms, &b.id)));
        Ok(rows)
    }

    fn for_each_execution(&mut self, f: &mut dyn FnMut(Execution) -> Result<()>) -> Result<()> {
        let sql = select_executions!("ORDER BY id");
        let mut stmt = self.conn.prepare(sql)?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            f(execution_from_row(r)?)?;
        }
        Ok(())
    }

    fn ledger_head(&mut self) -> Result<Option<Head>> {
        Ok(self
            .conn
            .prepare_cached("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1")?
            .query_row([], |r| {
                let seq: i64 = r.get(0)?;
                let hash: Vec<u8> = r.get(1)?;
                Ok(Head { seq: seq.max(0) as u64, hash: hash.try_into().unwrap_or([0; 32]) })
            })
            .optional()?)
    }

    fn append_event(&mut self, e: &Event) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO ledger (seq, ts_ms, kind, agent, execution_id, amount_micro, data, prev_hash, hash) \
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)",
            )?
            .execute(params![
                e.seq as i64,
                e.ts_ms,
                e.kind,
                e.agent,
                e.execution_id,
                e.amount_micro,
                e.data,
                &e.prev_hash[..],
                &e.hash[..],
            ])?;
        Ok(())
    }

    fn for_each_event(&mut self, from_seq: u64, f: &mut dyn FnMut(Event) -> Result<bool>) -> Result<()> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, ts_ms, kind, agent, execution_id, amount_micro, data, prev_hash, hash FROM ledger \
             WHERE seq >= ?1 ORDER BY seq",
        )?;
        let mut rows = stmt.query([from_seq as i64])?;
        while let Some(r) = rows.next()? {
            if !f(event_from_row(r)?)? {
                break;
            }
        }
        Ok(())
    }

    fn spend_since(&mut self, since_ms: i64) -> Result<Vec<(String, i64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT agent, SUM(amount_micro) FROM ledger WHERE ts_ms >= ?1 AND agent IS NOT NULL \
             AND kind IN ('execution.committed', 'execution.expired') GROUP BY agent",
        )?;
        let rows = stmt.query_map([since_ms], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn meta(&mut self, key: &str) -> Result<Option<String>> {
        Ok(self.conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?.query_row([key], |r| r.get(0)).optional()?)
    }

    fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        self.conn
            .prepare_cached("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2")?
            .execute([key, value])?;
        Ok(())
    }

    fn sync_later(&mut self) {
        self.sync_later = true;
    }
}
