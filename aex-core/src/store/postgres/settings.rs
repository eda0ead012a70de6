//! What a connection is made from, as libpq reads it: the URL first; what the URL leaves out
//! from the usual `PG*` environment variables (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`,
//! `PGDATABASE`, `PGSSLMODE`, `PGSSLROOTCERT`, `PGCONNECT_TIMEOUT`); a password still missing
//! from the password file (`PGPASSFILE`, else `~/.pgpass`, ignored unless only its owner can read
//! it); and the TLS mode (`sslmode`: `disable`, `allow`/`prefer` (the default), `require`,
//! `verify-ca`, `verify-full`; `sslrootcert`: a PEM file of trusted certificates, or `system`).
//! As with libpq, `allow`, `prefer` and `require` check the server's certificate chain when
//! trusted certificates are given (`sslrootcert`, or a `~/.postgresql/root.crt` that exists), and
//! encrypt without checking when none are.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// How the connection is encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Tls {
    /// Never (`sslmode=disable`).
    Off,
    /// Encrypted if the server offers it (`allow`, `prefer`), or always (`required`: `require`
    /// and the `verify-*` modes), the server's certificate checked as `check` says.
    On { required: bool, check: Check },
}

/// What is checked of the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Check {
    /// Nothing (`allow`, `prefer`, `require` with no trusted certificates at hand).
    Nothing,
    /// Its chain up to `Roots` (`verify-ca`; `allow`, `prefer`, `require` given certificates).
    Chain(Roots),
    /// Its chain and the host name it names (`verify-full`).
    ChainAndName(Roots),
}

/// The certificates a server's is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Roots {
    /// A PEM file.
    File(PathBuf),
    /// The operating system's trusted roots.
    System,
}

/// A connection's settings and the TLS to use.
pub(super) struct Settings {
    pub(super) config: tokio_postgres::Config,
    pub(super) tls: Tls,
}

/// Reads `url`, completing it from `env` (the process environment, or a test's).
///
/// # Errors
/// [`Error::InvalidRequest`] on field `path` for a URL that cannot be read, or a TLS setting
/// that is not one of libpq's; never quoting the password.
pub(super) fn read(url: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    // The TLS settings are aex's to read (the driver knows fewer modes); the rest is the driver's.
    let mut sslmode = None;
    let mut sslrootcert = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = || url::form_urlencoded::parse(format!("v={value}").as_bytes()).next().map(|(_, v)| v.into_owned());
        match key {
            "sslmode" => sslmode = decoded(),
            "sslrootcert" => sslrootcert = decoded(),
            _ => rest.push(pair),
        }
    }
    // The driver fills in port 5432 for a host without one, where libpq would take PGPORT.
    let base = match env("PGPORT").filter(|p| !p.is_empty()) {
        Some(port) => with_default_port(base, &port)?,
        None => base.to_string(),
    };
    let driver_url = if rest.is_empty() { base } else { format!("{base}?{}", rest.join("&")) };
    let mut config: tokio_postgres::Config = driver_url.parse().map_err(|e: tokio_postgres::Error| {
        // The driver's cause says which part ("invalid value for option `port`").
        let cause = std::error::Error::source(&e).map_or_else(|| e.to_string(), |c| format!("{e}: {c}"));
        Error::invalid("path", format!("is not a valid PostgreSQL URL ({})", redact(&cause, url)))
    })?;
    // A password with an unencoded '@' would leave part of itself in the host name.
    if config.get_hosts().iter().any(|h| matches!(h, tokio_postgres::config::Host::Tcp(h) if h.contains('@'))) {
        return Err(Error::invalid("path", "is not a valid PostgreSQL URL (percent-encode '@' in the password as %40)"));
    }
    if config.get_hosts().is_empty() {
        match env("PGHOST").filter(|h| !h.is_empty()) {
            Some(hosts) => hosts.split(',').for_each(|h| {
                config.host(h.trim());
            }),
            None => {
                config.host("localhost");
            }
        }
    }
    if config.get_ports().is_empty()
        && let Some(port) = env("PGPORT").filter(|p| !p.is_empty())
    {
        let port = port.parse().map_err(|_| Error::invalid("PGPORT", format!("must be a port number, not '{port}'")))?;
        config.port(port);
    }
    if config.get_user().is_none() {
        match env("PGUSER").or_else(|| env("USER")).filter(|u| !u.is_empty()) {
            Some(user) => config.user(&user),
            None => return Err(Error::invalid("path", "names no user (give one in the URL, or set PGUSER)")),
        };
    }
    if config.get_dbname().is_none()
        && let Some(db) = env("PGDATABASE").filter(|d| !d.is_empty())
    {
        config.dbname(&db);
    }
    if config.get_connect_timeout().is_none()
        && let Some(secs) = env("PGCONNECT_TIMEOUT").filter(|s| !s.is_empty())
    {
        let secs: u64 =
            secs.parse().map_err(|_| Error::invalid("PGCONNECT_TIMEOUT", format!("must be a number of seconds, not '{secs}'")))?;
        config.connect_timeout(std::time::Duration::from_secs(secs.max(2)));
    }
    if config.get_password().is_none() {
        if let Some(password) = env("PGPASSWORD") {
            config.password(password);
        } else if let Some(password) = password_file(&config, env) {
            config.password(password);
        }
    }
    let mode = sslmode.or_else(|| env("PGSSLMODE")).unwrap_or_else(|| "prefer".into());
    let roots = sslrootcert.or_else(|| env("PGSSLROOTCERT")).filter(|r| !r.is_empty());
    // Trusted certificates at hand: given, or in libpq's default place.
    let given = match roots.as_deref() {
        Some("system") => Some(Roots::System),
        Some(path) => Some(Roots::File(PathBuf::from(path))),
        None => match env("HOME").map(|h| PathBuf::from(h).join(".postgresql/root.crt")) {
            Some(path) if path.is_file() => Some(Roots::File(path)),
            _ => None,
        },
    };
    let chain = || given.clone().map_or(Check::Nothing, Check::Chain);
    let roots = || given.clone().unwrap_or(Roots::System);
    use tokio_postgres::config::SslMode;
    let tls = match mode.as_str() {
        "disable" => Tls::Off,
        "allow" | "prefer" => Tls::On { required: false, check: chain() },
        "require" => Tls::On { required: true, check: chain() },
        "verify-ca" => Tls::On { required: true, check: Check::Chain(roots()) },
        "verify-full" => Tls::On { required: true, check: Check::ChainAndName(roots()) },
        other => {
            return Err(Error::invalid(
                "sslmode",
                format!("must be disable, allow, prefer, require, verify-ca or verify-full, not '{other}'"),
            ));
        }
    };
    config.ssl_mode(match tls {
        Tls::Off => SslMode::Disable,
        Tls::On { required: false, .. } => SslMode::Prefer,
        Tls::On { required: true, .. } => SslMode::Require,
    });
    Ok(Settings { config, tls })
}

/// `url` (without its query) with `port` given to each host that names none.
///
/// # Errors
/// [`Error::InvalidRequest`] on field `PGPORT` if `port` is not a port number.
fn with_default_port(url: &str, port: &str) -> Result<String> {
    port.parse::<u16>().map_err(|_| Error::invalid("PGPORT", format!("must be a port number, not '{port}'")))?;
    let Some((scheme, rest)) = url.split_once("://") else { return Ok(url.to_string()) };
    let end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let (credentials, hosts) = match authority.rfind('@') {
        Some(at) => authority.split_at(at + 1),
        None => ("", authority),
    };
    if hosts.is_empty() {
        return Ok(url.to_string());
    }
    let hosts: Vec<String> = hosts
        .split(',')
        .map(|h| {
            let named = match h.rfind(']') {
                Some(close) => h[close..].contains(':'),
                None => h.contains(':'),
            };
            if named { h.to_string() } else { format!("{h}:{port}") }
        })
        .collect();
    Ok(format!("{scheme}://{credentials}{}{path}", hosts.join(",")))
}

/// The password for `config`'s first host, port, database and user from the password file, if
/// one line matches (`host:port:database:user:password`, `*` matching anything, `\:` and `\\`
/// escaped). The file is ignored unless it is a regular file only its owner can read, as libpq
/// ignores it.
fn password_file(config: &tokio_postgres::Config, env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let path = match env("PGPASSFILE").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env("HOME")?).join(".pgpass"),
    };
    let meta = std::fs::metadata(&path).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if !meta.is_file() || meta.permissions().mode() & 0o077 != 0 {
            return None;
        }
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        // A Unix socket is "localhost" to the password file.
        _ => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432).to_string();
    let user = config.get_user().unwrap_or_default();
    let db = config.get_dbname().unwrap_or(user);
    let wanted = [host.as_str(), port.as_str(), db, user];
    text.lines().filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty()).find_map(|line| {
        let fields = split_fields(line);
        if fields.len() < 5 {
            return None;
        }
        let matches = wanted.iter().zip(&fields).all(|(want, field)| field == "*" || field == want);
        matches.then(|| fields[4..].join(":"))
    })
}

/// A password-file line's fields: split at unescaped `:`, with `\:` and `\\` unescaped.
fn split_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut().expect("one field").push(next);
                }
            }
            ':' => fields.push(String::new()),
            c => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}

/// A parse error's text with the URL's password, if it appears, cut out.
fn redact(text: &str, url: &str) -> String {
    let password = url.split_once("://").and_then(|(_, rest)| rest.split_once('@')).and_then(|(auth, _)| auth.split_once(':')).map(|(_, p)| p);
    match password {
        Some(p) if !p.is_empty() => text.replace(p, "***"),
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn read_with(url: &str, vars: &[(&str, &str)]) -> Result<Settings> {
        let env: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        read(url, &move |k| env.get(k).cloned())
    }

    fn host(s: &Settings) -> String {
        match &s.config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        }
    }

    #[test]
    fn the_url_wins_and_the_environment_fills_what_it_leaves_out() {
        let vars = [("PGHOST", "db.env"), ("PGPORT", "6543"), ("PGUSER", "envuser"), ("PGDATABASE", "envdb"), ("PGPASSWORD", "envpw")];
        let s = read_with("postgresql://urluser:urlpw@db.url:5433/urldb", &vars).unwrap();
        assert_eq!((host(&s).as_str(), s.config.get_ports()[0]), ("db.url", 5433));
        assert_eq!((s.config.get_user(), s.config.get_dbname()), (Some("urluser"), Some("urldb")));
        assert_eq!(s.config.get_password(), Some(&b"urlpw"[..]));
        let s = read_with("postgresql://", &vars).unwrap();
        assert_eq!((host(&s).as_str(), s.config.get_ports()[0]), ("db.env", 6543));
        assert_eq!((s.config.get_user(), s.config.get_dbname()), (Some("envuser"), Some("envdb")));
        assert_eq!(s.config.get_password(), Some(&b"envpw"[..]));
        // Nothing at all: localhost, and the login name as the user.
        let s = read_with("postgres://", &[("USER", "login")]).unwrap();
        assert_eq!((host(&s).as_str(), s.config.get_user()), ("localhost", Some("login")));
        let e = read_with("postgres://", &[]).err().unwrap();
        assert!(e.to_string().contains("names no user"), "{e}");
        let e = read_with("postgres://u@h", &[("PGPORT", "five")]).err().unwrap();
        assert!(e.to_string().contains("PGPORT") && e.to_string().contains("port number"), "{e}");
        // PGPORT for each host the URL gives without a port, as libpq reads it.
        let s = read_with("postgresql://u:p@a,[::1],b:7000/d", &[("PGPORT", "6000")]).unwrap();
        assert_eq!(s.config.get_ports(), &[6000, 6000, 7000]);
        let s = read_with("postgresql://u@a/d", &[]).unwrap();
        assert_eq!(s.config.get_ports(), &[5432]);
    }

    #[test]
    fn the_password_file_answers_when_nothing_else_does_and_only_if_private() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(
            &file,
            "# comment\nother.host:*:*:*:wrong\ndb.example:5432:fleet:aex:pa\\:ss\\\\word\n*:*:*:aex:fallback\n",
        )
        .unwrap();
        let pass = file.to_str().unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
            let s = read_with("postgresql://aex@db.example/fleet", &[("PGPASSFILE", pass)]).unwrap();
            assert_eq!(s.config.get_password(), None, "a file others can read is ignored");
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let s = read_with("postgresql://aex@db.example/fleet", &[("PGPASSFILE", pass)]).unwrap();
        assert_eq!(s.config.get_password(), Some(&b"pa:ss\\word"[..]));
        let s = read_with("postgresql://aex@db.example:5433/fleet", &[("PGPASSFILE", pass)]).unwrap();
        assert_eq!(s.config.get_password(), Some(&b"fallback"[..]));
        let s = read_with("postgresql://someone@db.example/fleet", &[("PGPASSFILE", pass)]).unwrap();
        assert_eq!(s.config.get_password(), None);
        // PGPASSWORD comes before the file; the URL before both.
        let s = read_with("postgresql://aex@db.example/fleet", &[("PGPASSFILE", pass), ("PGPASSWORD", "env")]).unwrap();
        assert_eq!(s.config.get_password(), Some(&b"env"[..]));
        // ~/.pgpass when PGPASSFILE is unset.
        std::fs::copy(&file, dir.path().join(".pgpass")).unwrap();
        let s = read_with("postgresql://aex@db.example/fleet", &[("HOME", dir.path().to_str().unwrap())]).unwrap();
        assert_eq!(s.config.get_password(), Some(&b"pa:ss\\word"[..]));
    }

    #[test]
    fn tls_modes_read_like_libpq() {
        let tls = |url: &str, vars: &[(&str, &str)]| read_with(url, vars).unwrap().tls;
        let unchecked = |required| Tls::On { required, check: Check::Nothing };
        assert_eq!(tls("postgresql://u@h/d", &[]), unchecked(false));
        assert_eq!(tls("postgresql://u@h/d?sslmode=disable", &[]), Tls::Off);
        assert_eq!(tls("postgresql://u@h/d?sslmode=require", &[]), unchecked(true));
        assert_eq!(tls("postgresql://u@h/d", &[("PGSSLMODE", "require")]), unchecked(true));
        let file = Roots::File("/etc/ca file.pem".into());
        assert_eq!(
            tls("postgresql://u@h/d?sslmode=verify-full&sslrootcert=/etc/ca%20file.pem", &[]),
            Tls::On { required: true, check: Check::ChainAndName(file.clone()) }
        );
        assert_eq!(tls("postgresql://u@h/d?sslmode=verify-ca&sslrootcert=system", &[]), Tls::On { required: true, check: Check::Chain(Roots::System) });
        assert_eq!(tls("postgresql://u@h/d?sslmode=verify-full", &[]), Tls::On { required: true, check: Check::ChainAndName(Roots::System) });
        // As libpq: given trusted certificates, require and prefer check the chain.
        assert_eq!(
            tls("postgresql://u@h/d?sslmode=require&sslrootcert=/etc/ca%20file.pem", &[]),
            Tls::On { required: true, check: Check::Chain(file.clone()) }
        );
        assert_eq!(tls("postgresql://u@h/d", &[("PGSSLROOTCERT", "/etc/ca file.pem")]), Tls::On { required: false, check: Check::Chain(file) });
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".postgresql")).unwrap();
        std::fs::write(home.path().join(".postgresql/root.crt"), "").unwrap();
        let at_home = Roots::File(home.path().join(".postgresql/root.crt"));
        assert_eq!(
            tls("postgresql://u@h/d?sslmode=require", &[("HOME", home.path().to_str().unwrap())]),
            Tls::On { required: true, check: Check::Chain(at_home) }
        );
        // The URL's mode wins over the environment's; other parameters still reach the driver.
        let s = read_with("postgresql://u@h/d?connect_timeout=3&sslmode=disable", &[("PGSSLMODE", "verify-full")]).unwrap();
        assert_eq!((s.tls, s.config.get_connect_timeout()), (Tls::Off, Some(&std::time::Duration::from_secs(3))));
        let e = read_with("postgresql://u@h/d?sslmode=sometimes", &[]).err().unwrap();
        assert!(e.to_string().contains("sslmode") && e.to_string().contains("verify-full"), "{e}");
    }

    #[test]
    fn errors_name_the_part_and_never_quote_the_password() {
        let e = read_with("postgresql://aex:hunter2@host:notaport/db", &[]).err().unwrap();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.to_string().contains("port"), "{e}");
        let e = read_with("postgresql://aex:hunter2@host/db?connect_timeout=abc", &[]).err().unwrap();
        assert!(e.to_string().contains("connect_timeout") && !e.to_string().contains("hunter2"), "{e}");
        let e = read_with("postgresql://aex:hunter2@host/db?frobnicate=1", &[]).err().unwrap();
        assert!(e.to_string().contains("frobnicate"), "{e}");
    }
}
