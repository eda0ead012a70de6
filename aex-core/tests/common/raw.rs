//! Raw SQL on the database under test, as an operator's shell (`sqlite3`, `psql`) or an attacker
//! holding the file or the server's password would send it: the same statements on SQLite and
//! PostgreSQL. Placeholders are `$1`, `$2`, … on both.

/// A value for a placeholder.
#[derive(Debug, Clone)]
pub enum V {
    I(i64),
    T(String),
    B(Vec<u8>),
}

/// A connection of its own to the database a test's kernel uses.
pub enum Raw {
    Sqlite(rusqlite::Connection),
    Pg(postgres::Client),
}

impl Raw {
    /// Connects to `db`: a SQLite file's path, or a PostgreSQL URL.
    pub fn open(db: &str) -> Raw {
        if db.starts_with("postgresql://") || db.starts_with("postgres://") {
            Raw::Pg(postgres::Client::connect(db, postgres::NoTls).expect("reach the test server"))
        } else {
            Raw::Sqlite(rusqlite::Connection::open(db).unwrap())
        }
    }

    /// Whether this is the fleet store.
    pub fn is_postgres(&self) -> bool {
        matches!(self, Raw::Pg(_))
    }

    /// Runs one statement; the rows it changed, or the store's refusal as text.
    pub fn execute(&mut self, sql: &str, params: &[V]) -> Result<u64, String> {
        match self {
            Raw::Sqlite(c) => {
                let sql = numbered(sql);
                let values: Vec<rusqlite::types::Value> = params.iter().map(sqlite_value).collect();
                c.execute(&sql, rusqlite::params_from_iter(values)).map(|n| n as u64).map_err(|e| e.to_string())
            }
            Raw::Pg(c) => {
                let values: Vec<Box<dyn postgres::types::ToSql + Sync>> = params.iter().map(pg_value).collect();
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = values.iter().map(|v| &**v).collect();
                c.execute(sql, &refs).map_err(|e| e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string()))
            }
        }
    }

    /// Runs statements separated by `;`, without parameters.
    pub fn batch(&mut self, sql: &str) {
        match self {
            Raw::Sqlite(c) => c.execute_batch(sql).unwrap(),
            Raw::Pg(c) => c.batch_execute(sql).unwrap(),
        }
    }

    /// The one value (a blob) the query returns.
    pub fn blob(&mut self, sql: &str) -> Vec<u8> {
        match self {
            Raw::Sqlite(c) => c.query_row(sql, [], |r| r.get(0)).unwrap(),
            Raw::Pg(c) => c.query_one(sql, &[]).unwrap().get(0),
        }
    }

    /// Everything the database holds, table by table, as text: what a token must never appear in.
    pub fn dump(&mut self) -> Vec<(String, Vec<u8>)> {
        let tables = ["meta", "agents", "teams", "rate_buckets", "executions", "ledger"];
        tables
            .iter()
            .map(|t| {
                let text: String = match self {
                    Raw::Sqlite(c) => {
                        let mut stmt = c.prepare(&format!("SELECT * FROM {t}")).unwrap();
                        let n = stmt.column_count();
                        let rows = stmt
                            .query_map([], |r| {
                                Ok((0..n).map(|i| format!("{:?}", r.get_ref(i).unwrap())).collect::<Vec<_>>().join("|"))
                            })
                            .unwrap();
                        rows.map(Result::unwrap).collect::<Vec<_>>().join("\n")
                    }
                    Raw::Pg(c) => c
                        .query_one(&format!("SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM {t} t"), &[])
                        .unwrap()
                        .get(0),
                };
                (t.to_string(), text.into_bytes())
            })
            .collect()
    }

    /// Drops the triggers that keep the ledger append-only, as an attacker with full access can.
    pub fn drop_ledger_guards(&mut self) {
        match self {
            Raw::Sqlite(_) => self.batch("DROP TRIGGER ledger_no_update; DROP TRIGGER ledger_no_delete;"),
            Raw::Pg(_) => self.batch("DROP TRIGGER ledger_append_only ON ledger; DROP TRIGGER ledger_no_truncate ON ledger;"),
        }
    }
}

/// `$N` placeholders as SQLite's numbered `?N` (SQLite reads `$1` as a name, numbered by first
/// appearance).
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

fn sqlite_value(v: &V) -> rusqlite::types::Value {
    match v {
        V::I(i) => rusqlite::types::Value::Integer(*i),
        V::T(t) => rusqlite::types::Value::Text(t.clone()),
        V::B(b) => rusqlite::types::Value::Blob(b.clone()),
    }
}

fn pg_value(v: &V) -> Box<dyn postgres::types::ToSql + Sync> {
    match v {
        V::I(i) => Box::new(*i),
        V::T(t) => Box::new(t.clone()),
        V::B(b) => Box::new(b.clone()),
    }
}
