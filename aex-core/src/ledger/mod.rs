//! The append-only, hash-chained ledger of every decision.
//!
//! Each [`Event`] row is `seq, ts, kind, agent, execution_id, amount_micro, data, prev_hash, hash`
//! with `hash = SHA-256(prev_hash || canonical bytes of the row)` (or HMAC-SHA-256 under a key,
//! see [`ChainHasher`]) and an all-zero hash before the first event. The canonical bytes are the
//! compact JSON array `[seq, ts, kind, agent, execution_id, amount_micro, data]`, where `data` is
//! the stored JSON text itself, so verification hashes exactly the bytes on disk.
//!
//! Events are appended inside the same store transaction as the state change they describe, so
//! the ledger and the counters can never disagree except by tampering — which [`audit`] finds.

pub mod audit;

use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::store::Tx;

/// The hash before the first event.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

macro_rules! event_kinds {
    ($($variant:ident => $code:literal, $doc:literal;)+) => {
        /// What an event records. The string forms are stable and stored in the ledger.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EventKind {
            $(#[doc = $doc] $variant,)+
        }

        impl EventKind {
            /// The stored name, e.g. `execution.committed`.
            pub const fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $code,)+ }
            }

            /// Parses a stored name.
            pub fn parse(s: &str) -> Option<EventKind> {
                match s { $($code => Some(Self::$variant),)+ _ => None }
            }
        }
    };
}

event_kinds! {
    AgentCreated => "agent.created", "An agent was created; `amount` is its budget, `data` every other setting (the token as its SHA-256 digest, `token_sha256`).";
    BudgetSet => "agent.budget_set", "An agent's budget changed; `amount` is the new budget, `data.previous_micro` the old one.";
    AgentDisabled => "agent.disabled", "An agent was disabled.";
    AgentEnabled => "agent.enabled", "An agent was enabled.";
    AgentDeleted => "agent.deleted", "An agent was deleted (its open reservations were released first).";
    BudgetRenewed => "agent.budget_renewed", "A budget period ended: `spent` starts again from zero.";
    BudgetPeriodSet => "agent.budget_period_set", "An agent's budget period changed; `spent` and `reserved` kept.";
    TeamCreated => "team.created", "A team was created; `amount` is its budget, `data.team` its name.";
    TeamBudgetSet => "team.budget_set", "A team's budget changed; `amount` is the new budget.";
    TeamDeleted => "team.deleted", "A team was deleted.";
    ConfigLoaded => "config.loaded", "A config came into force; `data.hash` identifies it.";
    ConfigRejected => "config.rejected", "A config was refused; the previous one stays in force.";
    TokenRotated => "agent.token_rotated", "An agent's token was replaced; the old one stopped working. `data.token_sha256` is the new token's digest (never the token).";
    OperatorEdit => "agent.operator_edit", "A restricting edit made to the agent's row outside aex, recorded by the first transaction that read it: `data.field`, `data.old`, `data.new` (see [`crate::outside`]).";
    TeamOperatorEdit => "team.operator_edit", "A restricting edit made to a team's row outside aex: `data.team`, `data.field`, `data.old`, `data.new`.";
    AgentRecorded => "agent.recorded", "Every power field of an agent row written before seals existed, recorded once as its baseline.";
    TeamRecorded => "team.recorded", "Every power field of a team row written before seals existed, recorded once as its baseline.";
    Reserved => "execution.reserved", "An admission reserved `amount`.";
    Dispatched => "execution.dispatched", "The call was handed to the provider.";
    Committed => "execution.committed", "Settled at the real cost `amount`; the rest of the reservation returned.";
    Overrun => "execution.overrun", "The real cost exceeded the reservation by `amount` (charged).";
    Released => "execution.released", "The call did not happen; `amount` returned.";
    Failed => "execution.failed", "The call failed; `amount` returned.";
    Expired => "execution.expired", "The reservation passed its TTL; `data.settled_as` says released or committed, `amount` what was charged.";
    Denied => "admission.denied", "An admission was refused; nothing reserved. `data` has status and reason.";
}

/// One stored ledger row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Position in the chain, from 1, without gaps.
    pub seq: u64,
    /// Time of the decision, ms since the epoch.
    pub ts_ms: i64,
    /// The event kind's stored name (text, so a tampered value is still readable).
    pub kind: String,
    /// The agent's name, if the event concerns one.
    pub agent: Option<String>,
    /// The execution id, if the event concerns one.
    pub execution_id: Option<String>,
    /// The amount the event moves, micro-USD (see [`EventKind`]).
    pub amount_micro: i64,
    /// Canonical JSON with the event's details.
    pub data: String,
    /// The previous event's hash.
    pub prev_hash: [u8; 32],
    /// This event's hash.
    pub hash: [u8; 32],
}

impl Event {
    /// The canonical bytes the hash covers.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        canonical_bytes(self.seq, self.ts_ms, &self.kind, self.agent.as_deref(), self.execution_id.as_deref(), self.amount_micro, &self.data)
    }
}

fn canonical_bytes(
    seq: u64,
    ts_ms: i64,
    kind: &str,
    agent: Option<&str>,
    execution_id: Option<&str>,
    amount_micro: i64,
    data: &str,
) -> Vec<u8> {
    // A tuple serializes as a JSON array; serializing plain values cannot fail.
    serde_json::to_vec(&(seq, ts_ms, kind, agent, execution_id, amount_micro, data)).unwrap_or_default()
}

/// The latest event's position and hash: store it elsewhere and pass it to `audit` later to prove
/// nothing before it was rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The latest sequence number.
    pub seq: u64,
    /// Its hash.
    pub hash: [u8; 32],
}

impl Head {
    /// `SEQ:HEX`, the form the CLI prints and accepts.
    pub fn to_text(&self) -> String {
        format!("{}:{}", self.seq, hex::encode(self.hash))
    }

    /// Parses `SEQ:HEX`.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] on field `anchor`.
    pub fn parse(text: &str) -> Result<Head> {
        let bad = || Error::invalid("anchor", format!("must be SEQ:HASH with a 64-digit hex hash, got '{text}'"));
        let (seq, h) = text.split_once(':').ok_or_else(bad)?;
        let seq = seq.parse().map_err(|_| bad())?;
        let bytes = hex::decode(h).map_err(|_| bad())?;
        Ok(Head { seq, hash: bytes.try_into().map_err(|_| bad())? })
    }
}

/// How the chain is hashed: plain SHA-256, or HMAC-SHA-256 under a secret key so that whoever can
/// rewrite the database file cannot re-forge the chain. Cheap to clone.
#[derive(Clone)]
pub enum ChainHasher {
    /// `SHA-256(prev_hash || bytes)`.
    Sha256,
    /// `HMAC-SHA-256(key, prev_hash || bytes)`.
    Hmac(Hmac<Sha256>),
}

impl std::fmt::Debug for ChainHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.mode())
    }
}

impl ChainHasher {
    /// A hasher for an optional key.
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] on field `ledger_key` for an empty key.
    pub fn new(key: Option<&[u8]>) -> Result<ChainHasher> {
        match key {
            None => Ok(ChainHasher::Sha256),
            Some([]) => Err(Error::invalid("ledger_key", "must not be empty")),
            Some(k) => Hmac::<Sha256>::new_from_slice(k)
                .map(ChainHasher::Hmac)
                .map_err(|e| Error::invalid("ledger_key", e.to_string())),
        }
    }

    /// `sha256` or `hmac-sha256`: stored in the database so a mismatch is caught on open.
    pub fn mode(&self) -> &'static str {
        match self {
            ChainHasher::Sha256 => "sha256",
            ChainHasher::Hmac(_) => "hmac-sha256",
        }
    }

    /// A value that identifies the key without revealing it (empty for plain SHA-256).
    pub fn key_check(&self) -> String {
        match self {
            ChainHasher::Sha256 => String::new(),
            ChainHasher::Hmac(_) => hex::encode(self.link(&GENESIS_HASH, b"aex ledger key check")),
        }
    }

    /// The hash of one link of the chain.
    pub fn link(&self, prev: &[u8; 32], bytes: &[u8]) -> [u8; 32] {
        match self {
            ChainHasher::Sha256 => {
                let mut h = Sha256::new();
                h.update(prev);
                h.update(bytes);
                h.finalize().into()
            }
            ChainHasher::Hmac(mac) => {
                let mut m = mac.clone();
                m.update(prev);
                m.update(bytes);
                m.finalize().into_bytes().into()
            }
        }
    }
}

/// An event to append: the fields the caller decides. The ledger adds seq, hashes and time.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    /// What happened.
    pub kind: EventKind,
    /// The agent concerned.
    pub agent: Option<&'a str>,
    /// The execution concerned.
    pub execution_id: Option<&'a str>,
    /// The amount moved.
    pub amount_micro: i64,
    /// Details, as a JSON object.
    pub data: Value,
}

impl<'a> NewEvent<'a> {
    /// An event about an agent.
    pub fn agent(kind: EventKind, agent: &'a str, amount_micro: i64, data: Value) -> Self {
        NewEvent { kind, agent: Some(agent), execution_id: None, amount_micro, data }
    }

    /// An event about no agent.
    pub fn global(kind: EventKind, amount_micro: i64, data: Value) -> Self {
        NewEvent { kind, agent: None, execution_id: None, amount_micro, data }
    }

    /// An event about an execution of an agent.
    pub fn execution(kind: EventKind, agent: &'a str, execution_id: &'a str, amount_micro: i64, data: Value) -> Self {
        NewEvent { kind, agent: Some(agent), execution_id: Some(execution_id), amount_micro, data }
    }
}

/// Appends an event in the caller's transaction, chaining it to the current head.
///
/// # Errors
/// Store errors.
pub fn append(tx: &mut dyn Tx, hasher: &ChainHasher, ts_ms: i64, event: NewEvent<'_>) -> Result<()> {
    let (seq, prev_hash) = match tx.ledger_head()? {
        Some(head) => (head.seq + 1, head.hash),
        None => (1, GENESIS_HASH),
    };
    let data = serde_json::to_string(&event.data).map_err(|e| Error::Internal(format!("ledger data: {e}")))?;
    let bytes = canonical_bytes(seq, ts_ms, event.kind.as_str(), event.agent, event.execution_id, event.amount_micro, &data);
    let hash = hasher.link(&prev_hash, &bytes);
    tx.append_event(&Event {
        seq,
        ts_ms,
        kind: event.kind.as_str().to_string(),
        agent: event.agent.map(str::to_string),
        execution_id: event.execution_id.map(str::to_string),
        amount_micro: event.amount_micro,
        data,
        prev_hash,
        hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for k in [EventKind::AgentCreated, EventKind::Expired, EventKind::Denied] {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(EventKind::parse("nope"), None);
    }

    #[test]
    fn hmac_differs_from_sha_and_depends_on_key() {
        let plain = ChainHasher::new(None).unwrap();
        let a = ChainHasher::new(Some(b"key-a")).unwrap();
        let b = ChainHasher::new(Some(b"key-b")).unwrap();
        let link = |h: &ChainHasher| h.link(&GENESIS_HASH, b"row");
        assert_ne!(link(&plain), link(&a));
        assert_ne!(link(&a), link(&b));
        assert_eq!(link(&a), link(&ChainHasher::new(Some(b"key-a")).unwrap()));
        assert!(ChainHasher::new(Some(b"")).is_err());
        assert!(!format!("{a:?}").contains("key-a"));
    }

    #[test]
    fn head_text_round_trips() {
        let h = Head { seq: 42, hash: [7; 32] };
        assert_eq!(Head::parse(&h.to_text()).unwrap(), h);
        assert_eq!(Head::parse("x:00").unwrap_err().status(), 400);
    }
}
