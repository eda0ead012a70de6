//! One transaction's statements on the wire, in as few round trips as the rules allow.
//!
//! A statement whose result the rules do not read (a write: `INSERT`, `UPDATE`, `DELETE`, and the
//! transaction's own `BEGIN` and lock) is not sent at once: it waits in a queue and travels with
//! the next statement whose rows are needed, or with the `COMMIT`, in one pipelined round trip
//! (the server runs them in order, each its own protocol message). Every read therefore still
//! sees every write before it, exactly as if each had been sent alone. A write transaction's
//! first round trip also brings the ledger's head, which nearly every write needs.
//!
//! A failed statement aborts the server's transaction, so the first failure is kept and every
//! later call returns it without sending anything; only the rollback goes out. A transaction
//! that fails before anything was sent costs no round trip at all.
//!
//! Within one transaction, agent and team rows read once are answered from memory until a write
//! to either table (the write lock, or the read transaction's snapshot, keeps everyone else's
//! changes out). Nothing is kept between transactions.

use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use tokio::runtime::Runtime;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{Row, Statement};

use super::tx::{agent_from_row, execution_from_row, get};
use super::{needs_new_connection, pg, plain, Conn, WRITE_LOCK};
use crate::agent::Agent;
use crate::auth::TokenHash;
use crate::error::{Error, Result};
use crate::execution::Execution;
use crate::ledger::Head;
use crate::outside::Seal;
use crate::team::Team;

/// Parameters as the callers write them.
pub(super) type Params<'p> = [&'p (dyn ToSql + Sync)];

/// A parameter already encoded in the binary format of the type the statement expects, so a
/// queued statement owns its values without copying the caller's types.
#[derive(Debug)]
struct Encoded(Option<Bytes>);

impl ToSql for Encoded {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            Some(bytes) => {
                out.extend_from_slice(bytes);
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Checked against the statement's type when encoded (`encode`).
        true
    }

    to_sql_checked!();
}

/// What a queued statement's rows are for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Purpose {
    /// Nothing: only success is checked.
    Check,
    /// The ledger's head, kept in [`Cache::head`].
    Head,
    /// An execution (or its absence), kept in [`Cache::executions`].
    Execution(String),
    /// An agent row, kept in [`Cache::agents`].
    Agent,
    /// The rows the caller waits for.
    Rows,
}

struct Queued {
    statement: Statement,
    params: Vec<Encoded>,
    purpose: Purpose,
}

/// Rows read in this transaction, answered from memory until a write changes their table.
#[derive(Default)]
pub(super) struct Cache {
    /// The ledger's head: `None` until known, `Some(None)` for an empty ledger.
    pub(super) head: Option<Option<Head>>,
    /// Agents read, with their token digest and seal.
    pub(super) agents: Vec<(Agent, TokenHash, Option<Seal>)>,
    /// Teams read, with their seal.
    pub(super) teams: Vec<(Team, Option<Seal>)>,
    /// Executions read by id, `None` for one that does not exist.
    pub(super) executions: Vec<(String, Option<Execution>)>,
}

/// How a transaction's pipeline stands.
pub(super) struct Pipe<'c> {
    rt: &'c Runtime,
    conn: &'c mut Conn,
    queue: Vec<Queued>,
    /// The first failure: the server's transaction is aborted.
    failed: Option<Error>,
    /// Whether any statement of this transaction reached the server.
    sent: bool,
    /// Whether a write was queued ([`Pipe::defer`]).
    wrote: bool,
    /// Whether a `ROLLBACK TO SAVEPOINT` waits in the queue: until it is sent the server's
    /// transaction may stand aborted, where preparing a statement would fail.
    recovering: bool,
    pub(super) cache: Cache,
}

/// A write transaction's start.
const BEGIN_WRITE: &str = "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE";
/// A read transaction's start: one consistent, read-only snapshot.
const BEGIN_READ: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
/// The latest ledger entry.
pub(super) const HEAD: &str = "SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1";

impl<'c> Pipe<'c> {
    fn new(rt: &'c Runtime, conn: &'c mut Conn) -> Pipe<'c> {
        Pipe { rt, conn, queue: Vec::new(), failed: None, sent: false, wrote: false, recovering: false, cache: Cache::default() }
    }

    /// A write transaction: `BEGIN`, the write lock and the ledger's head, all queued.
    pub(super) fn write(rt: &'c Runtime, conn: &'c mut Conn) -> Result<Pipe<'c>> {
        let mut pipe = Pipe::new(rt, conn);
        // READ COMMITTED whatever the server's default: each statement after the lock sees every
        // commit before it (a snapshot taken before the lock would not).
        pipe.queue(BEGIN_WRITE, &[], Purpose::Check)?;
        pipe.queue("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK], Purpose::Check)?;
        pipe.queue(HEAD, &[], Purpose::Head)?;
        Ok(pipe)
    }

    /// A read transaction: its `BEGIN`, queued.
    pub(super) fn read(rt: &'c Runtime, conn: &'c mut Conn) -> Result<Pipe<'c>> {
        let mut pipe = Pipe::new(rt, conn);
        pipe.queue(BEGIN_READ, &[], Purpose::Check)?;
        Ok(pipe)
    }

    /// Queues a statement whose result is only checked (sent with the next read or the commit).
    pub(super) fn defer(&mut self, sql: &'static str, params: &Params<'_>) -> Result<()> {
        self.wrote = true;
        self.queue(sql, params, Purpose::Check)
    }

    /// Queues the read of an execution by id, kept when the next round trip brings it (see
    /// [`crate::store::Tx::prefetch`]).
    pub(super) fn prefetch_execution(&mut self, sql: &'static str, id: &str) -> Result<()> {
        self.queue(sql, &[&id], Purpose::Execution(id.to_string()))
    }

    /// Queues the read of an agent row (`sql` selects at most one, by `key`), kept when the next
    /// round trip brings it.
    pub(super) fn prefetch_agent(&mut self, sql: &'static str, key: &str) -> Result<()> {
        self.queue(sql, &[&key], Purpose::Agent)
    }

    /// Drops what queued prefetches (`purpose` matching) would bring: a write queued after them
    /// changes it, and they read what was there before.
    pub(super) fn forget_prefetched(&mut self, stale: impl Fn(&Purpose) -> bool) {
        for q in &mut self.queue {
            if stale(&q.purpose) {
                q.purpose = Purpose::Check;
            }
        }
    }

    /// Runs a statement now, with everything queued before it, and returns its rows.
    pub(super) fn query(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Vec<Row>> {
        self.fetch(sql, params)?.map_err(|e| pg(&e))
    }

    /// As [`Pipe::query`], but the statement's own failure is handed back as the driver's error,
    /// for a caller that may undo it with [`Pipe::recover`] (until then the transaction stands
    /// failed); a failure of anything queued before it is this crate's error.
    pub(super) fn fetch(&mut self, sql: &'static str, params: &Params<'_>) -> Result<std::result::Result<Vec<Row>, tokio_postgres::Error>> {
        self.queue(sql, params, Purpose::Rows)?;
        let outcome = self.round_trip()?.pop().expect("the statement's own result");
        if let Err(e) = &outcome {
            self.fail(e);
        }
        Ok(outcome)
    }

    /// Queues `ROLLBACK TO SAVEPOINT` (`savepoint_rollback`) and forgets the failure it undoes,
    /// and everything read (the rollback may change it). If the savepoint does not exist (a
    /// failure before it was made), the rollback fails in turn when sent, and the transaction
    /// stays failed.
    pub(super) fn recover(&mut self, savepoint_rollback: &'static str) -> Result<()> {
        self.failed = None;
        self.cache = Cache::default();
        self.forget_prefetched(|_| true);
        self.defer(savepoint_rollback, &[])?;
        self.recovering = true;
        Ok(())
    }

    /// The transaction's first failure, if a statement failed.
    pub(super) fn failure(&self) -> Option<Error> {
        self.failed.clone()
    }

    /// Sends everything queued and `COMMIT`; if a statement failed earlier (and the closure went
    /// on regardless), rolls back and returns that failure instead. A statement the server
    /// refuses is reported as it is (the transaction was rolled back); a connection lost with the
    /// `COMMIT` on its way leaves the outcome unknown, which the error says.
    pub(super) fn commit(mut self) -> Result<()> {
        if let Some(e) = self.failed.take() {
            self.rollback();
            return Err(e);
        }
        if !self.sent && !self.wrote {
            // Nothing was read or written: there is nothing to commit.
            return Ok(());
        }
        self.queue("COMMIT", &[], Purpose::Check)?;
        match self.round_trip() {
            Ok(_) => Ok(()),
            Err(e @ Error::Unavailable(_)) if e.to_string().contains(LOST) => {
                Err(Error::Unavailable(format!("the commit's outcome is unknown (retry with the same execution id): {e}")))
            }
            Err(e) => Err(e),
        }
    }

    /// Ends the transaction without keeping anything: nothing to send if nothing was sent.
    pub(super) fn rollback(mut self) {
        self.queue.clear();
        if self.sent && !self.conn.broken {
            let client = &self.conn.client;
            if self.rt.block_on(client.batch_execute("ROLLBACK")).is_err() {
                // The transaction may still be open: the session is not reused.
                self.conn.broken = true;
            }
        }
    }

    /// A read transaction's end: its snapshot let go.
    pub(super) fn finish(self) {
        self.rollback();
    }

    fn queue(&mut self, sql: &'static str, params: &Params<'_>, purpose: Purpose) -> Result<()> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.recovering && !self.conn.is_prepared(sql) {
            // The rollback to the savepoint first, so the new statement is prepared in a
            // transaction that stands.
            self.round_trip()?;
        }
        let statement = match self.conn.statement(self.rt, sql) {
            Ok(s) => s,
            Err(e) => return Err(self.fail(&e)),
        };
        let params = encode(&statement, params)?;
        self.queue.push(Queued { statement, params, purpose });
        Ok(())
    }

    /// Records a failure: the server's transaction is aborted from here on.
    fn fail(&mut self, e: &tokio_postgres::Error) -> Error {
        let error = pg(e);
        self.failed = Some(error.clone());
        error
    }

    /// Sends the queue in one pipeline and waits for every answer. Returns the outcome of each
    /// statement queued with [`Purpose::Rows`] (at most the last one); fails if any other
    /// statement failed.
    fn round_trip(&mut self) -> Result<Vec<std::result::Result<Vec<Row>, tokio_postgres::Error>>> {
        let queue = std::mem::take(&mut self.queue);
        self.recovering = false;
        let client = &self.conn.client;
        self.sent = true;
        let outcomes = self.rt.block_on(futures_util::future::join_all(queue.iter().map(|q| async move {
            let params = q.params.iter().map(|p| p as &(dyn ToSql + Sync));
            client.query_raw(&q.statement, params).await?.try_collect::<Vec<Row>>().await
        })));
        let mut rows = Vec::new();
        let mut first: Option<tokio_postgres::Error> = None;
        for (q, outcome) in queue.into_iter().zip(outcomes) {
            if let Err(e) = &outcome {
                self.conn.broken |= needs_new_connection(e);
            }
            match (q.purpose, outcome) {
                (Purpose::Rows, outcome) => rows.push(outcome),
                (_, Err(e)) => {
                    first.get_or_insert(e);
                }
                // A fetched-ahead row that does not read (a column edited to another type) is not
                // kept: the read itself fetches it again, and reports it. Every statement's
                // outcome is still looked at, the COMMIT's included.
                (Purpose::Head, Ok(found)) => {
                    if let Ok(head) = head_from(found.first()) {
                        self.cache.head = Some(head);
                    }
                }
                (Purpose::Execution(id), Ok(found)) => {
                    if let Ok(execution) = found.first().map(execution_from_row).transpose() {
                        self.cache.executions.retain(|(cached, _)| *cached != id);
                        self.cache.executions.push((id, execution));
                    }
                }
                (Purpose::Agent, Ok(found)) => {
                    if let Some(Ok(agent)) = found.first().map(agent_from_row) {
                        self.cache.agents.retain(|(cached, ..)| cached.id != agent.0.id);
                        self.cache.agents.push(agent);
                    }
                }
                (Purpose::Check, Ok(_)) => {}
            }
        }
        match first {
            Some(e) if e.as_db_error().is_none() => {
                let error = Error::Unavailable(format!("{LOST}: {}", plain(&e)));
                self.failed = Some(error.clone());
                Err(error)
            }
            Some(e) => Err(self.fail(&e)),
            None => Ok(rows),
        }
    }
}

/// How a failure of the connection itself (not a statement the server refused) begins.
const LOST: &str = "the PostgreSQL connection failed";

fn encode(statement: &Statement, params: &Params<'_>) -> Result<Vec<Encoded>> {
    let types = statement.params();
    if types.len() != params.len() {
        return Err(Error::Internal(format!("a statement expects {} parameters, got {}", types.len(), params.len())));
    }
    types
        .iter()
        .zip(params)
        .map(|(ty, value)| {
            let mut buf = BytesMut::new();
            match value.to_sql_checked(ty, &mut buf) {
                Ok(IsNull::Yes) => Ok(Encoded(None)),
                Ok(IsNull::No) => Ok(Encoded(Some(buf.freeze()))),
                Err(e) => Err(Error::Internal(format!("a parameter of type {ty} could not be encoded: {e}"))),
            }
        })
        .collect()
}

/// The ledger's head from the row of [`HEAD`], if any.
fn head_from(row: Option<&Row>) -> Result<Option<Head>> {
    row.map(|r| {
        let seq: i64 = get(r, 0)?;
        let hash: Vec<u8> = get(r, 1)?;
        Ok(Head { seq: seq.max(0) as u64, hash: hash.try_into().unwrap_or([0; 32]) })
    })
    .transpose()
}
