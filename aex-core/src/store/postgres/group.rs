//! Group commit: the writes of one process that queue while its connection is busy share one
//! transaction, so they pay for one lock, one ledger-head read and one `COMMIT` between them.
//!
//! Each closure runs inside a savepoint of its own. A closure that fails (an error, a panic, or a
//! statement the server refused) is rolled back to its savepoint and leaves no trace; the others
//! are unaffected, and each sees the changes of those before it, exactly as if their transactions
//! had committed one after another. Writes travel late (see [`super::pipeline`]), so a write the
//! server refuses may come to light while a later closure runs: its savepoint then cannot be
//! told apart, the whole transaction is rolled back, and every closure of the batch fails with
//! [`Error::Unavailable`] — never a closure told it succeeded when its change is gone. A closure
//! alone runs in a transaction of its own, without savepoints.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use tokio::runtime::Runtime;

use super::pipeline::Pipe;
use super::tx::PgTx;
use super::{Conn, Outcome, WriteFn, MAX_BATCH};
use crate::error::Error;

/// One closure of a batch and where its outcome goes.
pub(super) struct Member<'a> {
    pub(super) f: &'a mut WriteFn<'static>,
    pub(super) out: &'a mut Option<Outcome>,
}

/// Runs `members` in one transaction and sets each one's outcome.
pub(super) fn run(rt: &Runtime, conn: &mut Conn, members: &mut [Member<'_>]) {
    let mut pipe = match Pipe::write(rt, conn) {
        Ok(pipe) => pipe,
        Err(e) => {
            return members.iter_mut().for_each(|m| *m.out = Some(Ok(Err(e.clone()))));
        }
    };
    if let [alone] = members {
        let outcome = catch_unwind(AssertUnwindSafe(|| (alone.f)(&mut PgTx { pipe: &mut pipe })));
        *alone.out = Some(match outcome {
            // A statement that failed while the closure went on regardless fails the commit.
            Ok(Ok(())) => Ok(pipe.commit()),
            other => {
                pipe.rollback();
                other
            }
        });
        return;
    }
    for (i, m) in members.iter_mut().enumerate() {
        let names = savepoint(i);
        if let Err(e) = pipe.defer(names.open, &[]) {
            *m.out = Some(Ok(Err(e)));
            continue;
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| (m.f)(&mut PgTx { pipe: &mut pipe })));
        let outcome = match (outcome, pipe.failure()) {
            (Ok(Ok(())), Some(refused)) => Ok(Err(refused)),
            (outcome, _) => outcome,
        };
        if matches!(outcome, Ok(Ok(()))) {
            let _ = pipe.defer(names.release, &[]);
        } else {
            // Undone to its savepoint; what was read since may have changed with it.
            let _ = pipe.recover(names.rollback);
            let _ = pipe.defer(names.release, &[]);
        }
        *m.out = Some(outcome);
    }
    if let Err(e) = pipe.commit() {
        let e = match e {
            Error::Unavailable(m) if m.starts_with("the commit's outcome is unknown") => Error::Unavailable(m),
            e => Error::Unavailable(format!("the transaction was rolled back: {e}")),
        };
        for m in members.iter_mut() {
            if matches!(m.out, Some(Ok(Ok(())))) {
                *m.out = Some(Ok(Err(e.clone())));
            }
        }
    }
}

/// The statements of the `i`th member's savepoint.
struct Savepoint {
    open: &'static str,
    release: &'static str,
    rollback: &'static str,
}

/// Each member's savepoint has a name of its own, so rolling back to one that a refused
/// statement kept from being made fails (and fails the batch) instead of undoing an earlier
/// member's change. The statements are prepared once per connection, so their text lives as
/// long as the process: [`MAX_BATCH`] names, made once.
fn savepoint(i: usize) -> &'static Savepoint {
    static NAMES: OnceLock<Vec<Savepoint>> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        (0..MAX_BATCH)
            .map(|i| Savepoint {
                open: Box::leak(format!("SAVEPOINT aex_member_{i}").into_boxed_str()),
                release: Box::leak(format!("RELEASE SAVEPOINT aex_member_{i}").into_boxed_str()),
                rollback: Box::leak(format!("ROLLBACK TO SAVEPOINT aex_member_{i}").into_boxed_str()),
            })
            .collect()
    });
    &names[i]
}
