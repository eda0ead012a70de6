//! The fleet store: one PostgreSQL database shared by kernels on many machines.
//!
//! The same rules as the SQLite store, over the network: every write transaction first takes one
//! transaction-scoped advisory lock (`pg_advisory_xact_lock`), so writers of every process on
//! every machine take turns exactly as SQLite's single writer makes them, and each statement after
//! the lock sees everything committed before it (READ COMMITTED). An admission's check and its
//! reservation therefore see and change the same state, and the ledger stays one chain. A read
//! runs in a read-only REPEATABLE READ transaction: one consistent snapshot.
//!
//! One connection per [`PgStore`], owned by a thread of its own: every transaction runs there
//! while its caller waits. (The driver runs on a small async runtime of that thread, which must
//! not be entered from a caller's — the dispatcher and `aex serve` call the store from async
//! tasks.) Writes that queue while the connection is busy share one transaction (group commit,
//! the `group` module), and within a transaction writes travel with the next read or the commit
//! (the `pipeline` module): an admission and its settlement take five round trips between them, not
//! twenty. A lost connection fails the operation in hand with [`Error::Unavailable`] (never an
//! admission without the store) and is made again by the next one. A commit whose outcome is
//! unknown — the connection lost during `COMMIT` — is reported as `Unavailable` too; an admission
//! re-sent with the same execution id is answered from the store, never reserved twice, and a
//! dispatched call never settled is charged in full at its TTL, as after a crash.
//!
//! Statements are prepared once per connection and planned generically (`plan_cache_mode`):
//! every one is a lookup by key, and planning each call again cost more than running it.
//!
//! Connection settings are read as libpq reads them: the URL, then the `PG*` environment
//! variables and the password file for what it leaves out, and TLS by `sslmode` (the `settings`
//! and `tls` modules). Credentials never reach errors, logs or `Debug` output.
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

mod group;
mod pipeline;
mod schema;
mod settings;
mod tls;
mod tx;

use std::collections::HashMap;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use tokio::runtime::Runtime;
use tokio_postgres::{Client, Statement};

use self::pipeline::Pipe;
use self::tx::PgTx;
use super::{Store, Tx, WriteStats};
use crate::error::{Error, Result};

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
     SET idle_in_transaction_session_timeout = '30s'; SET synchronous_commit = on; \
     SET plan_cache_mode = force_generic_plan";

/// The PostgreSQL implementation of [`Store`]. `Send + Sync`; share it behind an `Arc`.
pub struct PgStore {
    /// Where the database is, for messages: host, port and database name, never credentials.
    place: String,
    /// Writes and transactions so far (group commit).
    stats: Arc<Mutex<WriteStats>>,
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

/// The connection's thread's state: how to connect, the runtime that drives the driver, and the
/// connection when there is one.
struct Link {
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    place: String,
    rt: Runtime,
    conn: Option<Conn>,
}

/// The connection settings aex adds where the URL sets none: a bounded connect and keepalives.
fn bounded(mut config: tokio_postgres::Config) -> tokio_postgres::Config {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    config.keepalives(true).keepalives_idle(std::time::Duration::from_secs(30));
    config
}

/// One connection and its prepared statements, by their text.
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
    /// Set when an error showed the connection gone (the server ended the session, or the
    /// socket failed): the next operation makes a new one. The driver notices a closed socket
    /// only while this thread waits on it, so [`Client::is_closed`] alone can be late.
    broken: bool,
}

impl Conn {
    /// Whether `sql` is prepared on this connection already.
    fn is_prepared(&self, sql: &str) -> bool {
        self.statements.contains_key(sql)
    }

    /// The prepared statement for `sql`, prepared on first use (one round trip per connection).
    fn statement(&mut self, rt: &Runtime, sql: &'static str) -> std::result::Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = rt.block_on(self.client.prepare(sql)).inspect_err(|e| self.broken |= needs_new_connection(e))?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }
}

/// A write closure, as [`Store::write`] takes it.
type WriteFn<'a> = dyn FnMut(&mut dyn Tx) -> Result<()> + Send + 'a;
/// What a write closure came to: its result, or its panic.
type Outcome = std::thread::Result<Result<()>>;

/// Work for the connection's thread, borrowed from a caller that waits on `done`: the pointers
/// point into that caller's stack, which does not return (nor touch them) until `done` is set;
/// the thread does not touch them after setting it.
struct Job {
    work: Work,
    done: Arc<(Mutex<bool>, Condvar)>,
}

enum Work {
    /// Anything to run with the connection.
    Run(*mut (dyn FnMut(&mut Link) + Send + 'static)),
    /// A write closure and where its outcome goes. It may share one transaction with the writes
    /// queued behind it (group commit, [`group`]).
    Write(*mut WriteFn<'static>, *mut Option<Outcome>),
}

// SAFETY: the closures are `Send`, and only the connection's thread touches what the pointers
// point to, while their caller waits (see `Job`).
unsafe impl Send for Job {}

impl Job {
    fn finish(&self) {
        let (lock, signal) = &*self.done;
        *lock.lock() = true;
        signal.notify_one();
    }
}

/// The most write closures one transaction serves.
const MAX_BATCH: usize = 64;

/// The connection's thread: runs each job in turn; a write takes every write queued behind it
/// (up to [`MAX_BATCH`]) into its transaction.
fn serve(mut link: Link, queue: mpsc::Receiver<Job>, stats: Arc<Mutex<WriteStats>>) {
    let mut next: Option<Job> = None;
    loop {
        let job = match next.take() {
            Some(job) => job,
            None => match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        match job.work {
            Work::Run(run) => {
                // SAFETY: see `Job`.
                unsafe { (*run)(&mut link) };
                job.finish();
            }
            Work::Write(..) => {
                let mut batch = vec![job];
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(more) if matches!(more.work, Work::Write(..)) => batch.push(more),
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let started = std::time::Instant::now();
                let mut members: Vec<group::Member<'_>> = batch
                    .iter()
                    .map(|job| match job.work {
                        // SAFETY: see `Job`: each caller waits until its job is finished below.
                        Work::Write(f, out) => unsafe { group::Member { f: &mut *f, out: &mut *out } },
                        Work::Run(_) => unreachable!("only writes are batched"),
                    })
                    .collect();
                let failed = link.with_conn(|rt, conn| {
                    group::run(rt, conn, &mut members);
                    Ok(())
                });
                if let Err(e) = failed {
                    for m in &mut members {
                        m.out.get_or_insert(Ok(Err(e.clone())));
                    }
                }
                drop(members);
                stats.lock().record(batch.len(), started.elapsed());
                batch.iter().for_each(Job::finish);
            }
        }
    }
}

impl PgStore {
    /// Connects to the database `url` names (`postgresql://user@host:port/db`), creating or
    /// migrating aex's schema (safe when several processes open a new database at once).
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] on field `path` for a malformed URL; [`Error::Unavailable`] when
    /// the server cannot be reached or refuses the credentials, the database is not aex's, or its
    /// schema is newer than this aex understands. No message carries the password.
    pub fn open(url: &str) -> Result<PgStore> {
        let settings = settings::read(url, &|name| std::env::var(name).ok())?;
        let tls = tls::connector(&settings.tls)?;
        let config = settings.config;
        let place = describe(&config);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Unavailable(format!("cannot start the PostgreSQL connection's runtime: {e}")))?;
        let link = Link { config: bounded(config), tls, place: place.clone(), rt, conn: None };
        let (jobs, queue) = mpsc::channel::<Job>();
        let stats = Arc::new(Mutex::new(WriteStats::default()));
        let counted = stats.clone();
        let worker = std::thread::Builder::new()
            .name("aex-postgres".into())
            .spawn(move || serve(link, queue, counted))
            .map_err(|e| Error::Unavailable(format!("cannot start the PostgreSQL connection's thread: {e}")))?;
        let store = PgStore { place, stats, jobs: Mutex::new(Some(jobs)), worker: Some(worker), pid: std::process::id() };
        store.migrate()?;
        Ok(store)
    }

    /// Runs `f` with a live connection (made first if there is none) and returns what it
    /// returns; a panic in `f` resumes here. A connection that failed is dropped, so the next
    /// call makes a new one. `f` runs on the connection's thread while the caller waits (a
    /// caller inside an async runtime must not block on another; running every caller's
    /// transactions there measured no slower than running a blocking caller's on its own thread).
    fn with_conn<T: Send>(&self, f: impl FnOnce(&Runtime, &mut Conn) -> Result<T> + Send) -> Result<T> {
        let mut f = Some(f);
        let mut out: Option<std::thread::Result<Result<T>>> = None;
        let mut run = |link: &mut Link| {
            let f = f.take().expect("run once");
            out = Some(catch_unwind(AssertUnwindSafe(|| link.with_conn(f))));
        };
        let run: &mut (dyn FnMut(&mut Link) + Send + '_) = &mut run;
        // SAFETY: only the lifetime is erased; `submit` waits until the thread has run the
        // closure, and the thread does not touch it after that.
        let run: *mut (dyn FnMut(&mut Link) + Send + 'static) = unsafe { std::mem::transmute(run) };
        self.submit(Work::Run(run))?;
        match out.take() {
            Some(Ok(result)) => result,
            Some(Err(panic)) => resume_unwind(panic),
            None => Err(Error::Internal("the PostgreSQL thread ended without running the transaction".into())),
        }
    }

    /// Hands `work` to the connection's thread and waits until it is done.
    fn submit(&self, work: Work) -> Result<()> {
        if self.pid != std::process::id() {
            // A forked child: the connection is the parent's, and the thread was not copied.
            return Err(Error::Unavailable(format!(
                "this connection to PostgreSQL at {} was opened by the parent of a forked process; open the kernel again in this one",
                self.place
            )));
        }
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let sent = match self.jobs.lock().as_ref() {
            Some(jobs) => jobs.send(Job { work, done: done.clone() }).is_ok(),
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
        Ok(())
    }

    fn migrate(&self) -> Result<()> {
        self.with_conn(|rt, conn| rt.block_on(schema::migrate(&mut conn.client)))
    }
}

impl Link {
    fn with_conn<T>(&mut self, f: impl FnOnce(&Runtime, &mut Conn) -> Result<T>) -> Result<T> {
        if self.conn.as_ref().is_some_and(|c| c.broken || c.client.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let (client, connection) = self
                .rt
                .block_on(self.config.connect(self.tls.clone()))
                .map_err(|e| Error::Unavailable(format!("cannot connect to PostgreSQL at {}: {}", self.place, plain(&e))))?;
            // Driven whenever this thread waits on the runtime; it ends when the connection does.
            self.rt.spawn(connection);
            self.rt.block_on(client.batch_execute(SESSION)).map_err(|e| pg(&e))?;
            self.conn = Some(Conn { client, statements: HashMap::new(), broken: false });
        }
        let conn = self.conn.as_mut().expect("connected above");
        let result = f(&self.rt, conn);
        if conn.broken || conn.client.is_closed() {
            self.conn = None;
        }
        result
    }
}

/// Host, port and database of a config, for messages.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().or(config.get_user()).unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

/// A driver error as text, without anything of the URL's credentials (the driver's messages
/// never carry the password; the database error's own text is kept).
fn plain(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            // With its causes: "error performing TLS handshake" says little without them.
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                let more = c.to_string();
                if !text.contains(&more) {
                    text = format!("{text}: {more}");
                }
                cause = c.source();
            }
            text
        }
    }
}

fn pg(e: &tokio_postgres::Error) -> Error {
    use tokio_postgres::error::SqlState;
    if matches!(e.code(), Some(c) if *c == SqlState::IN_FAILED_SQL_TRANSACTION || *c == SqlState::S_E_INVALID_SPECIFICATION) {
        // What follows a refused statement in the same transaction (in a group commit, another
        // caller's): the refusal itself is reported to whoever made it.
        return Error::Unavailable(
            "the transaction was rolled back: a write before this one in it (in a group commit, another caller's) was refused by PostgreSQL"
                .into(),
        );
    }
    if e.is_closed() || e.as_db_error().is_none() {
        Error::Unavailable(format!("the PostgreSQL connection failed: {}", plain(e)))
    } else {
        Error::Unavailable(format!("PostgreSQL refused a statement: {}", plain(e)))
    }
}

/// Whether an error means the session is over: the socket failed, or the server ended the
/// session (a `FATAL` error: terminated by an administrator, a shutdown, an idle timeout).
fn ends_session(e: &tokio_postgres::Error) -> bool {
    e.is_closed() || e.as_db_error().is_none_or(|db| matches!(db.severity(), "FATAL" | "PANIC"))
}

/// Whether an error means the connection must be made again: the session is over, or its
/// prepared statements no longer fit the tables (a column's type changed by hand: "cached plan
/// must not change result type") or are gone (a pooler between discarded them).
fn needs_new_connection(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    ends_session(e) || matches!(e.code(), Some(c) if *c == SqlState::FEATURE_NOT_SUPPORTED || *c == SqlState::INVALID_SQL_STATEMENT_NAME)
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

impl Store for PgStore {
    fn write(&self, f: &mut WriteFn<'_>) -> Result<()> {
        let mut out: Option<Outcome> = None;
        // SAFETY: only the lifetime is erased; `submit` waits until the thread is done with it.
        let f: *mut WriteFn<'static> = unsafe { std::mem::transmute::<&mut WriteFn<'_>, &mut WriteFn<'static>>(f) };
        self.submit(Work::Write(f, &raw mut out))?;
        match out {
            Some(Ok(result)) => result,
            Some(Err(panic)) => resume_unwind(panic),
            None => Err(Error::Internal("the PostgreSQL thread ended without running the transaction".into())),
        }
    }

    fn write_stats(&self) -> WriteStats {
        *self.stats.lock()
    }

    fn read(&self, f: &mut (dyn FnMut(&mut dyn Tx) -> Result<()> + Send)) -> Result<()> {
        self.with_conn(|rt, conn| {
            let mut pipe = Pipe::read(rt, conn)?;
            let outcome = catch_unwind(AssertUnwindSafe(|| f(&mut PgTx { pipe: &mut pipe })));
            pipe.finish();
            outcome.unwrap_or_else(|panic| resume_unwind(panic))
        })
    }

    fn schema_version(&self) -> u32 {
        schema::MIGRATIONS.len() as u32
    }
}
