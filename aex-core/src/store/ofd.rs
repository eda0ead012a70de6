//! Open-file-description locks for aex's copy of SQLite, so that another copy of SQLite in the
//! same process cannot lose aex's writes.
//!
//! **The hazard.** SQLite's unix VFS locks with classic POSIX record locks (`fcntl(F_SETLK)`).
//! Those belong to the *process*: another copy of the SQLite library in the same process — Python's
//! `sqlite3` module, a C host's `libsqlite3`, a notebook's `pandas.read_sql` — can neither see aex's
//! locks (a process never conflicts with itself) nor keep its own, because closing *any*
//! descriptor of a file drops every POSIX lock the process holds on it. When such a connection
//! closes, it believes it is the last one: it checkpoints and deletes `aex.db-wal` and
//! `aex.db-shm` while aex keeps appending to the unlinked WAL. Other processes then read stale
//! counters, and everything acknowledged since is gone after a crash. This is SQLite's documented
//! "multiple copies of SQLite linked into the same application" hazard.
//!
//! **The fix.** aex replaces two system calls of *its own* copy's unix VFS (`xSetSystemCall`,
//! before its first connection opens a file): `fcntl` and `close`. Every lock request
//! (`F_SETLK`, `F_SETLKW`, `F_GETLK`) becomes its open-file-description twin (`F_OFD_SETLK`, …).
//! OFD locks conflict with classic POSIX locks even inside one process, and closing some other
//! descriptor of the file does not release them. So the other copy sees aex's locks exactly as it
//! would see another process's: it cannot get the exclusive lock it needs to checkpoint and delete
//! the WAL, and it finds the shared-memory "dead man switch" held, so it never resets the WAL
//! index. Whatever else the process links, aex's WAL is never deleted under it.
//!
//! **One lock description per file.** SQLite shares one lock state per file among all of its
//! connections in a process (its inode table) and may take a lock through one connection's
//! descriptor and drop it through another's — harmless with per-process POSIX locks, but with
//! per-description locks it would leave the first one's lock behind. So all lock requests for one
//! file (identified by device and inode) go to one descriptor that this module opens for it and
//! keeps while any of aex's descriptors of that file is open; two kernels on one file in one
//! process therefore behave exactly as SQLite expects, while each other copy of SQLite, and each
//! other process, sees them as one lock owner. The `close` hook closes that descriptor when the
//! last of aex's descriptors of the file closes (SQLite only closes a file's last descriptor when
//! it holds no lock on it, so nothing is dropped early).
//!
//! **Closing without unlocking others.** The other direction matters as much: closing *any*
//! descriptor of a file drops every classic lock the process holds on it — including the other
//! copy's. So when aex's SQLite closes a descriptor of a file on which classic locks of this
//! process exist (`/proc/locks`), the descriptor is kept open ("parked") and closed later, once
//! they are gone; and aex never opens and closes the database file itself.
//!
//! **Where it applies.** Linux (OFD locks since 3.15). Elsewhere, or on a kernel that refuses
//! `F_OFD_GETLK`, aex keeps SQLite's classic locks, and the hazard stays: there, open the database
//! from another copy of SQLite only in another process. [`active`] says which is in force.
//!
//! Thread-safety: the replacement is installed once per process (SQLite's `xSetSystemCall` is not
//! itself thread-safe, so it runs before aex opens its first file); the descriptor table is behind
//! a mutex that is never held across a blocking call. After `fork()`, a child starts a table of
//! its own rather than share lock descriptions with its parent.

use std::sync::OnceLock;

/// Whether aex's SQLite locks with open-file-description locks in this process (installing them
/// on first call). `false` where the platform has none (see the module docs), or when the
/// environment sets `AEX_UNSAFE_CLASSIC_LOCKS=1` before aex opens its first database — a switch
/// for diagnosis and for the tests that show the hazard, which it brings back.
pub fn active() -> bool {
    *INSTALLED.get_or_init(|| std::env::var_os(UNSAFE_CLASSIC_LOCKS).is_none_or(|v| v != "1") && imp::install())
}

/// The environment variable that keeps SQLite's classic locks (see [`active`]).
pub const UNSAFE_CLASSIC_LOCKS: &str = "AEX_UNSAFE_CLASSIC_LOCKS";

static INSTALLED: OnceLock<bool> = OnceLock::new();

#[cfg(any(target_os = "linux", target_os = "android"))]
mod imp {
    use std::ffi::{CStr, c_int, c_void};

    use libc::{F_GETLK, F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW, F_SETLK, F_SETLKW, flock};
    use parking_lot::Mutex;
    use rusqlite::ffi;

    unsafe extern "C" {
        /// The C shim in `ofd.c`: a variadic `fcntl` that calls the function given to
        /// `aex_ofd_set_impl` ([`ofd_fcntl`]).
        fn aex_ofd_fcntl(fd: c_int, cmd: c_int, ...) -> c_int;
        fn aex_ofd_set_impl(f: extern "C" fn(c_int, c_int, *mut c_void) -> c_int);
    }

    /// The file a descriptor refers to.
    type FileId = (libc::dev_t, libc::ino_t);

    /// The lock descriptor of one file and which of SQLite's descriptors refer to that file.
    struct Entry {
        lock_fd: c_int,
        users: Vec<c_int>,
    }

    /// Few files are open at once (two per database: the file and its shared memory), so a list
    /// searched in order does.
    struct Table {
        pid: u32,
        files: Vec<(FileId, Entry)>,
        /// Descriptors SQLite closed while another copy of SQLite in this process held classic
        /// locks on the same file: closing them would have dropped those locks (see
        /// [`aex_ofd_close`]). Closed once no such lock remains.
        parked: Vec<(FileId, c_int)>,
    }

    impl Table {
        fn new(pid: u32) -> Table {
            Table { pid, files: Vec::new(), parked: Vec::new() }
        }
    }

    static TABLE: Mutex<Option<Table>> = Mutex::new(None);

    pub(super) fn install() -> bool {
        if !ofd_supported() {
            return false;
        }
        // SAFETY: `sqlite3_vfs_find(NULL)` returns the default VFS, which lives for the whole
        // process; `xSetSystemCall` swaps one entry of the unix VFS's system-call table (shared by
        // every unix VFS variant). The replacements have the signatures SQLite casts them to:
        // `fcntl` is variadic (the C shim), `close` is `int (*)(int)`.
        unsafe {
            aex_ofd_set_impl(ofd_fcntl);
            let vfs = ffi::sqlite3_vfs_find(std::ptr::null());
            let Some(vfs) = vfs.as_ref() else { return false };
            let Some(set) = vfs.xSetSystemCall else { return false };
            let fcntl: unsafe extern "C" fn(c_int, c_int, ...) -> c_int = aex_ofd_fcntl;
            let close: unsafe extern "C" fn(c_int) -> c_int = aex_ofd_close;
            let fcntl_ptr: ffi::sqlite3_syscall_ptr = Some(std::mem::transmute::<unsafe extern "C" fn(c_int, c_int, ...) -> c_int, unsafe extern "C" fn()>(fcntl));
            let close_ptr: ffi::sqlite3_syscall_ptr = Some(std::mem::transmute::<unsafe extern "C" fn(c_int) -> c_int, unsafe extern "C" fn()>(close));
            let vfs_ptr = std::ptr::from_ref(vfs).cast_mut();
            if set(vfs_ptr, c"close".as_ptr(), close_ptr) != ffi::SQLITE_OK {
                return false;
            }
            if set(vfs_ptr, c"fcntl".as_ptr(), fcntl_ptr) != ffi::SQLITE_OK {
                set(vfs_ptr, c"close".as_ptr(), None);
                return false;
            }
        }
        true
    }

    /// Asks the kernel about a lock with `F_OFD_GETLK` on a scratch file: old kernels say EINVAL.
    fn ofd_supported() -> bool {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // An anonymous in-memory file (no file system involved); a scratch file where there is
        // no `memfd_create`.
        // SAFETY: a NUL-terminated name; the descriptor, if any, is owned from here on.
        let memfd = unsafe { libc::memfd_create(c"aex-ofd-probe".as_ptr(), libc::MFD_CLOEXEC) };
        let fd: OwnedFd = if memfd >= 0 {
            // SAFETY: a descriptor just returned to us and owned by nothing else.
            unsafe { OwnedFd::from_raw_fd(memfd) }
        } else {
            match tempfile_in_tmp() {
                Ok(file) => file.into(),
                Err(_) => return false,
            }
        };
        let mut probe = empty_lock(libc::F_WRLCK as i16);
        // SAFETY: a valid descriptor and a valid `flock`.
        unsafe { libc::fcntl(fd.as_raw_fd(), F_OFD_GETLK, &raw mut probe) == 0 }
    }

    /// A scratch file of this process's own: created new (never an existing file, or one a
    /// symlink points to), then unlinked.
    fn tempfile_in_tmp() -> std::io::Result<std::fs::File> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(".aex-ofd-probe-{}-{nanos}", std::process::id()));
        let mut options = std::fs::File::options();
        options.create_new(true).read(true).write(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&path)?;
        let _ = std::fs::remove_file(&path);
        Ok(file)
    }

    fn empty_lock(kind: i16) -> flock {
        // SAFETY: `flock` is plain old data; all-zero is a valid value.
        let mut l: flock = unsafe { std::mem::zeroed() };
        l.l_type = kind;
        l.l_whence = libc::SEEK_SET as i16;
        l
    }

    fn errno() -> c_int {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
    }

    fn set_errno(e: c_int) {
        // SAFETY: the calling thread's errno location.
        unsafe { *libc::__errno_location() = e };
    }

    fn file_id(fd: c_int) -> Result<FileId, c_int> {
        // SAFETY: `fstat` writes into a zeroed `stat`; a bad descriptor is reported as EBADF.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &raw mut st) } != 0 {
            return Err(errno());
        }
        Ok((st.st_dev, st.st_ino))
    }

    /// A new open file description of the file behind `fd`, read-write where possible: reopened
    /// through `/proc/self/fd`, else a duplicate of `fd` itself.
    fn open_lock_fd(fd: c_int) -> Result<c_int, c_int> {
        let path = format!("/proc/self/fd/{fd}\0");
        let path = CStr::from_bytes_with_nul(path.as_bytes()).map_err(|_| libc::EINVAL)?;
        // SAFETY: a NUL-terminated path; the result is checked.
        let reopened = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if reopened >= 0 {
            return Ok(reopened);
        }
        // SAFETY: duplicating a descriptor the caller holds.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup >= 0 { Ok(dup) } else { Err(errno()) }
    }

    /// The descriptor that holds every lock on the file behind `fd`, registering `fd` as one of
    /// its users. A descriptor already registered is found without a system call: it stays
    /// registered until SQLite closes it through the `close` hook, so its number cannot have been
    /// reused for another file meanwhile.
    fn lock_fd_for(fd: c_int) -> Result<c_int, c_int> {
        if let Some(table) = TABLE.lock().as_ref()
            && let Some((_, entry)) = table.files.iter().find(|(_, e)| e.users.contains(&fd))
        {
            return Ok(entry.lock_fd);
        }
        // A descriptor not seen before (so no system call was spent on the common path above).
        let id = file_id(fd)?;
        let pid = std::process::id();
        let mut guard = TABLE.lock();
        let table = guard.get_or_insert_with(|| Table::new(pid));
        if table.pid != pid {
            // A forked child opening its own connection: the inherited lock descriptors are
            // shared with the parent, so they cannot stand for this process. Start afresh.
            for (_, entry) in &table.files {
                // SAFETY: descriptors this table opened.
                unsafe { libc::close(entry.lock_fd) };
            }
            *table = Table::new(pid);
        }
        if let Some((_, entry)) = table.files.iter_mut().find(|(f, _)| *f == id) {
            if !entry.users.contains(&fd) {
                entry.users.push(fd);
            }
            return Ok(entry.lock_fd);
        }
        let lock_fd = open_lock_fd(fd)?;
        table.files.push((id, Entry { lock_fd, users: vec![fd] }));
        Ok(lock_fd)
    }

    /// SQLite's `fcntl`: lock requests go to the file's lock descriptor as OFD locks; anything
    /// else passes through.
    extern "C" fn ofd_fcntl(fd: c_int, cmd: c_int, arg: *mut c_void) -> c_int {
        let ofd_cmd = match cmd {
            F_SETLK => F_OFD_SETLK,
            F_SETLKW => F_OFD_SETLKW,
            F_GETLK => F_OFD_GETLK,
            // SAFETY: the caller's own request, passed on as it came.
            _ => return unsafe { libc::fcntl(fd, cmd, arg) },
        };
        if arg.is_null() {
            set_errno(libc::EFAULT);
            return -1;
        }
        let lock_fd = match lock_fd_for(fd) {
            Ok(lock_fd) => lock_fd,
            Err(e) => {
                set_errno(e);
                return -1;
            }
        };
        // SAFETY: SQLite passes a valid `struct flock` with every lock command.
        let caller = unsafe { &mut *arg.cast::<flock>() };
        let mut request = *caller;
        request.l_pid = 0; // OFD locks require it; SQLite leaves it unset.
        // SAFETY: a descriptor from the table and a valid `flock`; errno is the kernel's.
        let rc = unsafe { libc::fcntl(lock_fd, ofd_cmd, &raw mut request) };
        if rc == 0 && cmd == F_GETLK {
            *caller = request;
        }
        rc
    }

    /// Whether some process's classic POSIX lock on the file `id` is owned by `pid`, from
    /// `/proc/locks` (`N: POSIX ADVISORY READ|WRITE PID MAJ:MIN:INODE START END`). When the
    /// table cannot be read, `true`: keeping a descriptor open is the safe mistake.
    fn classic_locks_held(id: FileId, pid: u32) -> bool {
        let Ok(table) = std::fs::read_to_string("/proc/locks") else { return true };
        let file = format!("{:02x}:{:02x}:{}", libc::major(id.0), libc::minor(id.0), id.1);
        let pid = pid.to_string();
        table.lines().any(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Blocked waiters are listed as "N: -> POSIX ..."; they hold nothing.
            f.len() >= 6 && f[1] == "POSIX" && f[4] == pid && f[5] == file
        })
    }

    /// Closes the parked descriptors of files no copy of SQLite in this process holds a classic
    /// lock on any more.
    fn reap(table: &mut Table) {
        let pid = table.pid;
        let mut still: Vec<(FileId, c_int)> = Vec::new();
        let mut checked: Vec<(FileId, bool)> = Vec::new();
        for (id, fd) in std::mem::take(&mut table.parked) {
            let held = match checked.iter().find(|(f, _)| *f == id) {
                Some((_, held)) => *held,
                None => {
                    let held = classic_locks_held(id, pid);
                    checked.push((id, held));
                    held
                }
            };
            if held {
                still.push((id, fd));
            } else {
                // SAFETY: a descriptor this table kept open in SQLite's stead.
                unsafe { libc::close(fd) };
            }
        }
        table.parked = still;
    }

    /// Closes what the table parked, where that is now safe; called when aex opens a database.
    pub(super) fn reap_parked() {
        if let Some(table) = TABLE.lock().as_mut().filter(|t| t.pid == std::process::id() && !t.parked.is_empty()) {
            reap(table);
        }
    }

    /// SQLite's `close`. Forgets `fd`, with the file's lock descriptor when `fd` was the last of
    /// SQLite's descriptors of that file. Then closes them — unless another copy of SQLite in
    /// this process holds classic POSIX locks on the file: closing *any* descriptor of a file
    /// drops all of the process's classic locks on it, which would silently unlock that copy
    /// (it could then lose its writes, or overwrite aex's). Such descriptors are parked, still
    /// open, and closed when aex next closes or opens a file and the locks are gone. (SQLite
    /// itself defers its own closes the same way, for its own connections.)
    extern "C" fn aex_ofd_close(fd: c_int) -> c_int {
        let pid = std::process::id();
        let id = file_id(fd).ok();
        let mut guard = TABLE.lock();
        let table = guard.get_or_insert_with(|| Table::new(pid));
        if table.pid != pid {
            *table = Table::new(pid);
        }
        let mut closing = vec![fd];
        let mut lock_fd = None;
        if let Some(at) = table.files.iter().position(|(_, e)| e.users.contains(&fd)) {
            let entry = &mut table.files[at].1;
            entry.users.retain(|&u| u != fd);
            if entry.users.is_empty() {
                lock_fd = Some(entry.lock_fd);
                closing.push(entry.lock_fd);
                table.files.swap_remove(at);
            }
        }
        if let Some(id) = id
            && classic_locks_held(id, pid)
        {
            // Drop aex's own locks now, as the close would have (SQLite relies on that for the
            // shared memory's "dead man switch"); the other copy's classic locks stay.
            if let Some(lock_fd) = lock_fd {
                let mut all = empty_lock(libc::F_UNLCK as i16);
                // SAFETY: the table's own descriptor and a valid `flock` (whole file).
                unsafe { libc::fcntl(lock_fd, F_OFD_SETLK, &raw mut all) };
            }
            table.parked.extend(closing.into_iter().map(|f| (id, f)));
            return 0;
        }
        if !table.parked.is_empty() {
            reap(table);
        }
        let mut rc = 0;
        for f in closing {
            // SAFETY: SQLite's own descriptor, closed as it asked, and the table's lock descriptor.
            let r = unsafe { libc::close(f) };
            if f == fd {
                rc = r;
            }
        }
        rc
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod imp {
    pub(super) fn install() -> bool {
        false
    }

    pub(super) fn reap_parked() {}
}

/// Closes descriptors parked because another copy of SQLite held classic locks, where that is
/// now safe (see `aex_ofd_close`).
pub(crate) fn reap_parked() {
    if *INSTALLED.get().unwrap_or(&false) {
        imp::reap_parked();
    }
}
