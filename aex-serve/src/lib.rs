//! `aex serve`: an OpenAI-compatible gateway over one aex kernel, for agents in any language and
//! for tools that only take a `base_url`.
//!
//! Point `OPENAI_BASE_URL` at `http://HOST:PORT/v1`, use the agent's aex token as the API key,
//! and every call is governed by the same kernel — and the same database — that in-process
//! Python and C agents use: admission (auth, policy, rate windows, budget on the agent and its
//! teams), routing to the model's provider with the host's key or the agent's own
//! (`x-aex-provider-key`, for agents allowed passthrough; never logged, never sent to another
//! provider), the output cap injected, streaming with usage, exactly-once settlement, and the
//! dispatcher's retry and fallback rules. The gateway itself holds no rules: see
//! [`aex_core::dispatch`].
//!
//! Endpoints: `POST /v1/chat/completions`, `/v1/responses`, `/v1/embeddings` (also under
//! `/openai/v1/`), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus; see
//! `metrics`), `GET /dashboard` (live; see [`dashboard`]), and the admin endpoints
//! `POST /admin/reload_config`, `GET /admin/activity`, `GET /admin/replay`. Errors are
//! OpenAI-shaped JSON ([`errors`]).
//!
//! **Admin token.** Admin endpoints, the metrics and the dashboard need `Authorization: Bearer <admin token>` when the gateway
//! has one; binding an address that is not loopback without one is refused at start
//! ([`Gateway::bind`]).
//!
//! **Reliability.** Binding raises the process's soft limit of open files to its hard limit
//! (idle connections must not exhaust descriptors). Request bodies are limited ([`ServeOptions::max_body_bytes`], 413); a client
//! must send its headers within [`ServeOptions::header_timeout`] and its body within
//! [`ServeOptions::idle_timeout`] (408), so a slow client cannot hold a worker. A client that
//! disconnects mid-call has its call cancelled and settled by the money rules (nothing is left
//! reserved). Shutdown ([`Gateway::run`]'s signal) stops accepting, lets calls in flight finish
//! for [`ServeOptions::shutdown_grace`], then cancels the rest, which settle at once; a killed
//! process leaves its reservations to the TTL rule.
//!
//! Thread-safety: a [`Gateway`] runs on the caller's tokio runtime; the kernel is shared.

pub mod errors;

mod admin;
pub mod dashboard;
mod metrics;
mod proxy;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aex_core::dispatch::Cancel;
use aex_core::{Error, Kernel, Result};
use axum::Router;
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

/// How many worker threads a gateway's runtime should have. The kernel's store calls block
/// their thread (a write transaction, briefly), so the gateway needs more workers than cores for
/// concurrent requests to reach the store together — where group commit batches them into one
/// transaction — instead of queueing behind a blocked worker.
pub const WORKER_THREADS: usize = 16;

/// How the gateway listens and protects itself.
#[derive(Clone)]
pub struct ServeOptions {
    /// Where to listen. Default `127.0.0.1:9000`.
    pub addr: SocketAddr,
    /// The admin token (for the admin endpoints); required unless `addr` is loopback.
    pub admin_token: Option<String>,
    /// The config file that `POST /admin/reload_config` reloads, if any.
    pub config_path: Option<PathBuf>,
    /// The largest request body accepted (413 beyond). Default 8 MiB.
    pub max_body_bytes: usize,
    /// How long a connection may take to send a request's headers (the first, or the next on a
    /// kept-alive connection). Default 30 s.
    pub header_timeout: Duration,
    /// How long a client may take to send a request's body (408 beyond). Default 60 s.
    pub idle_timeout: Duration,
    /// On shutdown, how long calls in flight may run before they are cancelled. Default 30 s.
    pub shutdown_grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 9000)),
            admin_token: None,
            config_path: None,
            max_body_bytes: 8 << 20,
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("addr", &self.addr)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<set>"))
            .field("config_path", &self.config_path)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("header_timeout", &self.header_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

/// The calls in flight, so shutdown can cancel what outlives the grace period.
#[derive(Default)]
pub(crate) struct Flights {
    next: AtomicU64,
    cancels: parking_lot::Mutex<HashMap<u64, Cancel>>,
}

/// One call in flight; leaves the registry when dropped.
pub(crate) struct Flight {
    flights: Arc<Flights>,
    id: u64,
}

impl Flights {
    pub(crate) fn start(self: &Arc<Self>, cancel: Cancel) -> Flight {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.cancels.lock().insert(id, cancel);
        Flight { flights: self.clone(), id }
    }

    fn cancel_all(&self) -> usize {
        let cancels = self.cancels.lock();
        cancels.values().for_each(Cancel::cancel);
        cancels.len()
    }

    fn len(&self) -> usize {
        self.cancels.lock().len()
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.flights.cancels.lock().remove(&self.id);
    }
}

/// What every handler shares.
pub(crate) struct App {
    pub(crate) kernel: Kernel,
    pub(crate) options: ServeOptions,
    pub(crate) flights: Arc<Flights>,
    pub(crate) metrics: metrics::Metrics,
    pub(crate) audit: dashboard::AuditCache,
}

/// A bound gateway, ready to [`Gateway::run`].
pub struct Gateway {
    listener: tokio::net::TcpListener,
    app: Arc<App>,
}

impl Gateway {
    /// Binds the listening socket. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] (field `admin_token`) for an address that is not loopback
    /// without an admin token, or an empty admin token; [`Error::Unavailable`] when the address
    /// cannot be bound.
    pub async fn bind(kernel: Kernel, options: ServeOptions) -> Result<Gateway> {
        match &options.admin_token {
            Some(t) if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic() && b != b';' && b != b',') => {
                return Err(Error::invalid("admin_token", "must be visible ASCII without spaces, ';' or ','"));
            }
            None if !options.addr.ip().is_loopback() => {
                return Err(Error::invalid(
                    "admin_token",
                    format!("is required to listen on {} (not loopback): anyone who can reach it could read the ledger", options.addr.ip()),
                ));
            }
            _ => {}
        }
        raise_open_files_limit();
        let listener = tokio::net::TcpListener::bind(options.addr).await.map_err(|e| Error::Unavailable(format!("cannot listen on {}: {e}", options.addr)))?;
        Ok(Gateway { listener, app: Arc::new(App { kernel, options, flights: Arc::default(), metrics: metrics::Metrics::default(), audit: dashboard::AuditCache::default() }) })
    }

    /// The address it listens on (with the port the system chose for port 0).
    ///
    /// # Errors
    /// [`Error::Unavailable`] if the socket cannot say.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener.local_addr().map_err(|e| Error::Unavailable(e.to_string()))
    }

    /// Serves until `shutdown` completes, then stops accepting, lets calls in flight finish for
    /// the grace period, cancels what remains (each settles by the money rules) and returns
    /// when every connection is closed.
    ///
    /// # Errors
    /// None today: a failed `accept` (out of descriptors, say) is retried after a pause.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let app = self.app;
        let router = router(app.clone());
        let graceful = GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new()).header_read_timeout(app.options.header_timeout);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone()));
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        let _ = connection.await;
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(self.listener);
        let drained = graceful.shutdown();
        tokio::pin!(drained);
        if tokio::time::timeout(app.options.shutdown_grace, &mut drained).await.is_err() {
            app.flights.cancel_all();
            // Cancelled calls settle at once and their responses end; give them a moment.
            let _ = tokio::time::timeout(Duration::from_secs(5), drained).await;
        }
        Ok(())
    }

    /// Calls in flight now (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        self.app.flights.len()
    }
}

/// Raises this process's soft limit of open files to its hard limit: each connection is a
/// descriptor (two for a call in flight), and the common soft default of 1,024 would let idle
/// connections lock every client out until the header timeout. Best effort.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn router(app: Arc<App>) -> Router {
    let governed = Router::new()
        .route("/chat/completions", post(proxy::chat))
        .route("/responses", post(proxy::responses))
        .route("/embeddings", post(proxy::embeddings))
        .route("/models", get(admin::models));
    Router::new()
        .nest("/v1", governed.clone())
        .nest("/openai/v1", governed)
        .route("/health", get(admin::health))
        .route("/metrics", get(admin::metrics))
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard/data", get(dashboard::data))
        .route("/admin/reload_config", post(admin::reload_config))
        .route("/admin/activity", get(admin::activity))
        .route("/admin/replay", get(admin::replay))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

async fn not_found(uri: axum::http::Uri) -> errors::ApiError {
    errors::ApiError::new(axum::http::StatusCode::NOT_FOUND, "not_found", format!("no endpoint at {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> errors::ApiError {
    errors::ApiError::new(axum::http::StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("{method} is not allowed on {}", uri.path()))
}
