//! The cross-process write lock: an exclusive `flock` on `<db>.lock`, held for one write
//! transaction, waited for fairly and never longer than the store's timeout.
//!
//! A blocking `flock` queues waiters in the kernel, which is fair between processes (SQLite's own
//! busy handler is not: with several processes some waited seconds). But a blocking `flock`
//! cannot time out, so a process stopped while holding the lock would stall every writer. So:
//! the lock is first tried without blocking; when it is busy, a waiter thread of this store makes
//! the blocking call on the store's own lock description while the writer waits for it on a
//! condition variable with a deadline. At the deadline the writer gives up with `Unavailable`;
//! the waiter's request stays queued in the kernel, and whoever asks next takes it over (or the
//! waiter drops the lock at once if nobody wants it by the time it is granted). So a wait is
//! always bounded, and the kernel's queue order is kept.
//!
//! Thread-safety: callers of [`SideLock::acquire`] must be serialized (the store calls it only
//! while holding its connection); the waiter thread coordinates with them through `state`.

use std::fs::{File, TryLockError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};

/// The lock file of one store.
#[derive(Debug)]
pub(super) struct SideLock {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    state: Mutex<State>,
    signal: Condvar,
}

#[derive(Debug, Default)]
struct State {
    phase: Phase,
    waiter_running: bool,
}

#[derive(Debug, Default)]
enum Phase {
    /// Nobody holds or waits for the lock through this store's waiter.
    #[default]
    Idle,
    /// A writer waits; the waiter thread is (or is about to be) blocked in `flock`.
    Wanted,
    /// The waiter got the lock (or an error) for the waiting writer.
    Granted(std::result::Result<(), String>),
    /// The writer gave up; the waiter drops the lock when it gets it, unless someone wants it.
    Abandoned,
    /// The store is gone; the waiter ends.
    Closed,
}

/// Holds the lock until dropped.
#[derive(Debug)]
pub(super) struct SideGuard<'a>(&'a File);

impl Drop for SideGuard<'_> {
    fn drop(&mut self) {
        // Closing the process also releases it; an unlock error leaves nothing to do.
        let _ = self.0.unlock();
    }
}

impl SideLock {
    /// Wraps an open lock file.
    pub(super) fn new(file: File) -> SideLock {
        SideLock { inner: Arc::new(Inner { file, state: Mutex::new(State::default()), signal: Condvar::new() }) }
    }

    /// Takes the lock, waiting at most `timeout`.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when another process held it for the whole `timeout`, or the lock
    /// call failed.
    pub(super) fn acquire(&self, timeout: Duration) -> Result<SideGuard<'_>> {
        let inner = &*self.inner;
        let mut state = inner.state.lock();
        match state.phase {
            // The waiter's request from an abandoned wait is still queued: take it over.
            Phase::Abandoned => state.phase = Phase::Wanted,
            Phase::Idle => match inner.file.try_lock() {
                Ok(()) => return Ok(SideGuard(&inner.file)),
                Err(TryLockError::WouldBlock) => state.phase = Phase::Wanted,
                Err(TryLockError::Error(e)) => return Err(unavailable(&e.to_string())),
            },
            Phase::Wanted | Phase::Granted(_) | Phase::Closed => {
                return Err(Error::Internal("the store's write lock was asked for twice at once".into()));
            }
        }
        if !state.waiter_running {
            let waiter = self.inner.clone();
            let spawned = std::thread::Builder::new().name("aex-store-lock".into()).spawn(move || wait_loop(&waiter));
            if let Err(e) = spawned {
                state.phase = Phase::Idle;
                return Err(unavailable(&format!("cannot start the lock waiter: {e}")));
            }
            state.waiter_running = true;
        }
        inner.signal.notify_all();
        let deadline = Instant::now() + timeout;
        loop {
            if let Phase::Granted(_) = state.phase {
                let Phase::Granted(result) = std::mem::take(&mut state.phase) else { unreachable!() };
                return result.map(|()| SideGuard(&inner.file)).map_err(|e| unavailable(&e));
            }
            if inner.signal.wait_until(&mut state, deadline).timed_out() && !matches!(state.phase, Phase::Granted(_)) {
                state.phase = Phase::Abandoned;
                return Err(Error::Unavailable(format!(
                    "the store is busy: another process held its write lock for over {} ms",
                    timeout.as_millis()
                )));
            }
        }
    }
}

impl Drop for SideLock {
    fn drop(&mut self) {
        self.inner.state.lock().phase = Phase::Closed;
        self.inner.signal.notify_all();
    }
}

/// The waiter thread: blocks in `flock` whenever a writer wants the lock.
fn wait_loop(inner: &Inner) {
    let mut state = inner.state.lock();
    loop {
        match state.phase {
            Phase::Wanted => {}
            Phase::Closed => return,
            _ => {
                inner.signal.wait(&mut state);
                continue;
            }
        }
        drop(state);
        let locked = inner.file.lock().map_err(|e| e.to_string());
        state = inner.state.lock();
        match state.phase {
            Phase::Wanted => {
                state.phase = Phase::Granted(locked);
                inner.signal.notify_all();
            }
            _ => {
                if locked.is_ok() {
                    let _ = inner.file.unlock();
                }
                if !matches!(state.phase, Phase::Closed) {
                    state.phase = Phase::Idle;
                }
            }
        }
    }
}

fn unavailable(detail: &str) -> Error {
    Error::Unavailable(format!("cannot take the store's write lock: {detail}"))
}
