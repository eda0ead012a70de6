//! aex's tables in PostgreSQL, created and migrated on open.

use tokio_postgres::Client;

use super::{pg, SCHEMA_LOCK};
use crate::error::{Error, Result};

/// The schema, one entry per version; `aex_schema.version` holds how many are applied.
pub(super) const MIGRATIONS: &[&str] = &[r#"
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

/// Creates or migrates the schema under a session advisory lock, so processes opening a new
/// database at once take turns (the first creates, the rest find it made).
///
/// # Errors
/// [`Error::Unavailable`] when the database is not aex's, its schema is newer than this aex
/// understands, or a statement fails.
pub(super) async fn migrate(client: &mut Client) -> Result<()> {
    // Session-level: held while this process looks and creates, released after.
    client.execute("SELECT pg_advisory_lock($1)", &[&SCHEMA_LOCK]).await.map_err(|e| pg(&e))?;
    let migrated = migrate_locked(client).await;
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&SCHEMA_LOCK]).await.map_err(|e| pg(&e));
    migrated.and(unlocked.map(drop))
}

async fn has(client: &Client, table: &str) -> Result<bool> {
    let row = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await.map_err(|e| pg(&e))?;
    Ok(row.get(0))
}

async fn migrate_locked(client: &mut Client) -> Result<()> {
    let version: i64 = if has(client, "aex_schema").await? {
        client.query_one("SELECT version::BIGINT FROM aex_schema", &[]).await.map_err(|e| pg(&e))?.get(0)
    } else {
        for t in TABLES {
            if has(client, t).await? {
                return Err(Error::Unavailable(format!(
                    "this PostgreSQL database is not aex's: it has a table '{t}' but no aex schema; use an empty database"
                )));
            }
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
    let tx = client.transaction().await.map_err(|e| pg(&e))?;
    for sql in &MIGRATIONS[first..] {
        tx.batch_execute(sql).await.map_err(|e| pg(&e))?;
    }
    tx.execute("UPDATE aex_schema SET version = $1", &[&(known as i32)]).await.map_err(|e| pg(&e))?;
    tx.commit().await.map_err(|e| pg(&e))
}
