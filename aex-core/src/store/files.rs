//! The store's files are private to the user who runs aex.
//!
//! The database holds every agent's spend and the ledger; its lock file is what every writer
//! queues on. So aex creates the database and the lock file as `0600` whatever the umask
//! (SQLite then gives the `-wal` and `-shm` files the database's mode), and directories it
//! creates as `0700`. It does not change the mode of files that already exist — an operator may
//! have chosen it — but [`warnings`] names every one that is group/other accessible or owned by
//! another user, for the CLI to print.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// Opens `path` read-write, creating it as `0600` if it does not exist.
pub(super) fn open_private(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Creates `path` as an empty `0600` file if it does not exist. An existing file is not opened
/// at all: closing a descriptor of it would drop the classic locks another copy of SQLite in this
/// process holds on it (see `ofd`).
pub(super) fn create_private(path: &Path) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// What is unsafe about the permissions of the database at `db` and its side files: each
/// existing file that is group/other accessible or owned by another user, and a directory that
/// others may write to (they could replace the files) — one sentence each, with the fix.
pub fn warnings(db: &Path) -> Vec<String> {
    let mut out = Vec::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: `geteuid` cannot fail.
        let me = unsafe { libc::geteuid() };
        let mut files = vec![db.to_path_buf()];
        for suffix in ["-wal", "-shm", ".lock"] {
            let mut p = db.as_os_str().to_owned();
            p.push(suffix);
            files.push(p.into());
        }
        for file in files {
            let Ok(meta) = std::fs::metadata(&file) else { continue };
            let mode = meta.mode() & 0o777;
            if meta.uid() != me {
                out.push(format!("{} is owned by another user (uid {}): only the user who runs aex should own it", file.display(), meta.uid()));
            } else if mode & 0o077 != 0 {
                out.push(format!(
                    "{} is readable or writable by other users (mode {mode:04o}): run chmod 600 on it",
                    file.display()
                ));
            }
        }
        let dir = db.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if let Ok(meta) = std::fs::metadata(dir) {
            let mode = meta.mode();
            let sticky = mode & 0o1000 != 0;
            if mode & 0o022 != 0 && !sticky {
                out.push(format!(
                    "directory {} is writable by other users (mode {:04o}): they could replace the database; run chmod go-w on it",
                    dir.display(),
                    mode & 0o777
                ));
            }
        }
    }
    out
}

/// Whether a config file may be trusted: owned by this user (or root) and writable by nobody
/// else. A config names the hosts that receive prompts and provider keys, so one that another
/// user can change is refused.
///
/// # Errors
/// A sentence naming the file and the rule.
pub fn check_config_file(path: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        // SAFETY: `geteuid` cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me && meta.uid() != 0 {
            return Err(format!(
                "{} is owned by another user (uid {}); a config must be owned by the user who runs aex (or root)",
                path.display(),
                meta.uid()
            ));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(format!(
                "{} is writable by other users (mode {:04o}); run chmod go-w on it",
                path.display(),
                meta.mode() & 0o777
            ));
        }
        // Whoever may write the directory may replace the file (a sticky directory stops that).
        let dir = std::fs::canonicalize(path).ok().and_then(|p| p.parent().map(Path::to_path_buf));
        if let Some(dir) = dir
            && let Ok(d) = std::fs::metadata(&dir)
            && d.mode() & 0o022 != 0
            && d.mode() & 0o1000 == 0
        {
            return Err(format!(
                "{} is in {}, which other users may write (mode {:04o}): they could replace it",
                path.display(),
                dir.display(),
                d.mode() & 0o777
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}
