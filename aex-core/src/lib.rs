//! # aex-core — the governance kernel
//!
//! Before an agent's LLM call leaves the process, aex authenticates the agent's token, checks
//! policy, and reserves budget; after the call it settles the real cost exactly once; every
//! decision is appended to a hash-chained ledger that [`Kernel::audit`] verifies and replays.
//!
//! ```no_run
//! use aex_core::{AdmitRequest, AgentSpec, Config, Kernel, KernelOptions, ModelSpec, Prices, Usage};
//!
//! # fn main() -> aex_core::Result<()> {
//! let config = Config::new().with_model("gpt-4o-mini", ModelSpec::priced(Prices::from_usd("0.15", "0.60")?, 16_384))?;
//! let kernel = Kernel::open("agents.db", KernelOptions { config, ..Default::default() })?;
//! let created = kernel.create_agent(&AgentSpec::new("atlas", 5_000_000))?; // $5
//! let admission = kernel.admit(
//!     created.token.expose(),
//!     &AdmitRequest::new("gpt-4o-mini").input_tokens(1_200).max_output_tokens(256),
//! )?;
//! // ... call the provider ...
//! kernel.commit(&admission.execution_id, Usage::new(1_187, 203))?;
//! assert!(kernel.audit(None)?.is_clean());
//! # Ok(()) }
//! ```
//!
//! ## Where the rules live
//!
//! | module | holds |
//! |---|---|
//! | [`money`] | micro-USD, exact USD parsing, the round-up cost rule |
//! | [`auth`] | tokens: generation, hashing, scopes |
//! | [`agent`] | agent settings, validation |
//! | [`config`] | models, prices, providers, shared limits; `models.yaml` |
//! | [`admission`] | the admission pipeline and its order |
//! | [`policy`] | what an agent may call |
//! | [`rate`] | sliding RPM / TPM windows and concurrency caps |
//! | [`team`] | shared team budgets above agents |
//! | [`budget`] | reservation estimate and fit, budget periods |
//! | [`settlement`] | terminal states, exactly once |
//! | [`reconcile`] | expiry of abandoned reservations |
//! | [`ledger`] | the hash chain, `audit` and replay |
//! | [`outside`] | edits made behind aex's back: operator actions, tampering, the seals |
//! | [`store`] | the `Store` trait and the SQLite store |
//! | `dispatch` | governed provider calls over HTTP (feature `dispatch`, on by default) |
//! | [`clock`] | time, replaceable in tests |
//! | [`wire`] | the JSON forms shared by the C ABI, the vectors and the CLI |
//!
//! ## Threads and processes
//!
//! [`Kernel`] is `Send + Sync` and cheap to clone. Every operation is one exclusive store
//! transaction, serialized across threads by a mutex and across processes by a file lock plus
//! SQLite's own locking, so a budget shared by any number of callers is never overshot.

pub mod admission;
pub mod call;
pub mod agent;
pub mod auth;
pub mod budget;
pub mod clock;
pub mod config;
#[cfg(feature = "dispatch")]
pub mod dispatch;
mod error;
pub mod execution;
mod kernel;
pub mod ledger;
pub mod money;
pub mod outside;
pub mod policy;
pub mod rate;
pub mod reconcile;
pub mod settlement;
pub mod store;
pub mod team;
pub mod wire;

pub use admission::{AdmitRequest, Admission, Message};
pub use agent::{Agent, AgentSpec, Capabilities};
pub use auth::{Scope, Token};
pub use clock::{Clock, ManualClock, SystemClock};
pub use budget::BudgetPeriod;
pub use config::{Config, Limits, ModelCapabilities, ModelSpec, Prices, Provider};
pub use error::{AuthFailure, ConflictReason, Error, NotFoundKind, PolicyRule, RateWindow, Result};
pub use execution::{Execution, ExecutionState};
pub use kernel::{CreatedAgent, DEFAULT_RESERVATION_TTL_MS, Kernel, KernelOptions};
pub use ledger::audit::{AuditFailure, AuditReport, AuditRule};
pub use ledger::{Event, EventKind, Head};
pub use reconcile::ReconcileReport;
pub use settlement::{Settlement, Usage};
pub use store::{Durability, StoreOptions};
pub use team::{Team, TeamSpec};

/// The version of aex, from the build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
