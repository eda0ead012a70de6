//! Power cuts under `full` durability: what must be on disk before a provider is called is the
//! admission (with its dispatch mark); a settlement of a dispatched execution may reach disk with
//! the next fsync, and lost before that, the TTL rule charges the execution in full — over-charged,
//! never under-charged. One fsync per governed call.
//!
//! A power cut is simulated exactly: this test binary makes a VFS that wraps SQLite's own `unix`
//! VFS its default, and at every successful `xSync` of a database or WAL file it copies that file
//! aside. The copies are what the disk holds after a power cut at that moment (each file as of
//! its last fsync); a kernel opened on them is the machine after the cut. It can also make an
//! fsync fail.
//!
//! Linux only: copying a database file opens and closes it, which is safe beside SQLite's locks
//! only where aex takes open-file-description locks (see `store::ofd`).
#![cfg(target_os = "linux")]

mod common;

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

use aex_core::{AdmitRequest, Durability, ExecutionState, Kernel, KernelOptions, ManualClock, StoreOptions, Usage};
use common::{MODEL, T0, agent, assert_clean, config};
use rusqlite::ffi;

/// The shim's file object: its own header, then the `unix` VFS's file object.
#[repr(C)]
struct ShimFile {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    /// The file's path, for database and WAL files (owned; freed on close).
    path: *mut PathBuf,
}

/// fsyncs seen per file path.
static SYNCS: Mutex<Option<HashMap<PathBuf, usize>>> = Mutex::new(None);
/// A file whose fsyncs fail (with `SQLITE_IOERR_FSYNC`, as a failing disk's would).
static FAIL_SYNCS_OF: Mutex<Option<PathBuf>> = Mutex::new(None);
static mut UNIX: *mut ffi::sqlite3_vfs = std::ptr::null_mut();
static mut SHIM_VFS: std::mem::MaybeUninit<ffi::sqlite3_vfs> = std::mem::MaybeUninit::uninit();
static INSTALL: Once = Once::new();

unsafe fn real(f: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    unsafe { (*f.cast::<ShimFile>()).real }
}

unsafe fn methods(f: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    unsafe { &*(*real(f)).pMethods }
}

unsafe extern "C" fn x_close(f: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let shim = f.cast::<ShimFile>();
        if !(*shim).path.is_null() {
            drop(Box::from_raw((*shim).path));
            (*shim).path = std::ptr::null_mut();
        }
        methods(f).xClose.unwrap()(real(f))
    }
}
unsafe extern "C" fn x_read(f: *mut ffi::sqlite3_file, buf: *mut c_void, n: c_int, off: ffi::sqlite3_int64) -> c_int {
    unsafe { methods(f).xRead.unwrap()(real(f), buf, n, off) }
}
unsafe extern "C" fn x_write(f: *mut ffi::sqlite3_file, buf: *const c_void, n: c_int, off: ffi::sqlite3_int64) -> c_int {
    unsafe { methods(f).xWrite.unwrap()(real(f), buf, n, off) }
}
unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    unsafe { methods(f).xTruncate.unwrap()(real(f), size) }
}
/// The real fsync, then the copy of what it made durable (a copy that fails fails the fsync).
unsafe extern "C" fn x_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    unsafe {
        let path = (*f.cast::<ShimFile>()).path;
        if !path.is_null() && FAIL_SYNCS_OF.lock().unwrap().as_deref() == Some(&*path) {
            return ffi::SQLITE_IOERR_FSYNC;
        }
        let rc = methods(f).xSync.unwrap()(real(f), flags);
        if rc == ffi::SQLITE_OK && !path.is_null() {
            let path = &*path;
            if std::fs::copy(path, synced(path)).is_err() {
                return ffi::SQLITE_IOERR_FSYNC;
            }
            *SYNCS.lock().unwrap().get_or_insert_default().entry(path.clone()).or_default() += 1;
        }
        rc
    }
}
unsafe extern "C" fn x_file_size(f: *mut ffi::sqlite3_file, size: *mut ffi::sqlite3_int64) -> c_int {
    unsafe { methods(f).xFileSize.unwrap()(real(f), size) }
}
unsafe extern "C" fn x_lock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe { methods(f).xLock.unwrap()(real(f), level) }
}
unsafe extern "C" fn x_unlock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe { methods(f).xUnlock.unwrap()(real(f), level) }
}
unsafe extern "C" fn x_check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    unsafe { methods(f).xCheckReservedLock.unwrap()(real(f), out) }
}
unsafe extern "C" fn x_file_control(f: *mut ffi::sqlite3_file, op: c_int, arg: *mut c_void) -> c_int {
    unsafe { methods(f).xFileControl.unwrap()(real(f), op, arg) }
}
unsafe extern "C" fn x_sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    unsafe { methods(f).xSectorSize.unwrap()(real(f)) }
}
unsafe extern "C" fn x_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    unsafe { methods(f).xDeviceCharacteristics.unwrap()(real(f)) }
}
unsafe extern "C" fn x_shm_map(f: *mut ffi::sqlite3_file, page: c_int, size: c_int, extend: c_int, out: *mut *mut c_void) -> c_int {
    unsafe { methods(f).xShmMap.unwrap()(real(f), page, size, extend, out) }
}
unsafe extern "C" fn x_shm_lock(f: *mut ffi::sqlite3_file, offset: c_int, n: c_int, flags: c_int) -> c_int {
    unsafe { methods(f).xShmLock.unwrap()(real(f), offset, n, flags) }
}
unsafe extern "C" fn x_shm_barrier(f: *mut ffi::sqlite3_file) {
    unsafe { methods(f).xShmBarrier.unwrap()(real(f)) }
}
unsafe extern "C" fn x_shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    unsafe { methods(f).xShmUnmap.unwrap()(real(f), delete) }
}
unsafe extern "C" fn x_fetch(f: *mut ffi::sqlite3_file, off: ffi::sqlite3_int64, n: c_int, out: *mut *mut c_void) -> c_int {
    unsafe { methods(f).xFetch.unwrap()(real(f), off, n, out) }
}
unsafe extern "C" fn x_unfetch(f: *mut ffi::sqlite3_file, off: ffi::sqlite3_int64, p: *mut c_void) -> c_int {
    unsafe { methods(f).xUnfetch.unwrap()(real(f), off, p) }
}

static SHIM_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: Some(x_fetch),
    xUnfetch: Some(x_unfetch),
};

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    f: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    unsafe {
        let shim = f.cast::<ShimFile>();
        let inner = f.cast::<u8>().add(std::mem::size_of::<ShimFile>()).cast::<ffi::sqlite3_file>();
        (*shim).real = inner;
        (*shim).path = std::ptr::null_mut();
        (*shim).base.pMethods = std::ptr::null();
        let rc = (*UNIX).xOpen.unwrap()(UNIX, name, inner, flags, out_flags);
        if rc != ffi::SQLITE_OK || (*inner).pMethods.is_null() {
            return rc;
        }
        if !name.is_null() && flags & (ffi::SQLITE_OPEN_MAIN_DB | ffi::SQLITE_OPEN_WAL) != 0 {
            let path = CStr::from_ptr(name as *const c_char).to_string_lossy().into_owned();
            (*shim).path = Box::into_raw(Box::new(PathBuf::from(path)));
        }
        (*shim).base.pMethods = &SHIM_METHODS;
        rc
    }
}

/// Makes the shim SQLite's default VFS, once per process (before any kernel of this binary opens).
fn install() {
    INSTALL.call_once(|| unsafe {
        assert_eq!(ffi::sqlite3_initialize(), ffi::SQLITE_OK);
        UNIX = ffi::sqlite3_vfs_find(c"unix".as_ptr());
        assert!(!UNIX.is_null());
        let mut vfs = std::ptr::read(UNIX);
        vfs.szOsFile += std::mem::size_of::<ShimFile>() as c_int;
        vfs.zName = c"aex-power-cut".as_ptr();
        vfs.pNext = std::ptr::null_mut();
        vfs.xOpen = Some(x_open);
        let slot = &raw mut SHIM_VFS;
        (*slot).write(vfs);
        assert_eq!(ffi::sqlite3_vfs_register((*slot).as_mut_ptr(), 1), ffi::SQLITE_OK);
    });
}

fn synced(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".synced");
    PathBuf::from(s)
}

fn wal(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}

fn wal_syncs(db: &Path) -> usize {
    let key = wal(&std::fs::canonicalize(db).unwrap());
    SYNCS.lock().unwrap().get_or_insert_default().get(&key).copied().unwrap_or(0)
}

/// The machine after a power cut now: each of the database's files as of its last fsync, in a
/// directory of their own. Returns the database path there.
fn cut(db: &Path, into: &Path) -> PathBuf {
    std::fs::create_dir_all(into).unwrap();
    let real = std::fs::canonicalize(db).unwrap();
    let target = into.join(real.file_name().unwrap());
    match std::fs::copy(synced(&real), &target) {
        Ok(_) => {}
        // Never fsynced: SQLite created it empty, and in WAL mode wrote nothing to it yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => drop(std::fs::File::create(&target).unwrap()),
        Err(e) => panic!("{e}"),
    }
    // A WAL never fsynced is not there after the cut.
    let _ = std::fs::copy(synced(&wal(&real)), wal(&target));
    target
}

fn open(path: &Path, clock: &ManualClock) -> Kernel {
    let options = KernelOptions {
        config: config(),
        clock: std::sync::Arc::new(clock.clone()),
        store: StoreOptions { durability: Durability::Full, ..Default::default() },
        ..Default::default()
    };
    Kernel::open(path, options).unwrap()
}

/// A `full` kernel on a new file, with the shim installed, and an agent "atlas" with $10: the
/// directory (kept alive), the database path, the clock, the kernel and the agent's token.
fn setup() -> (tempfile::TempDir, PathBuf, ManualClock, Kernel, String) {
    install();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("aex.db");
    let clock = ManualClock::new(T0);
    let k = open(&db, &clock);
    let token = agent(&k, "atlas", 10_000_000);
    (dir, db, clock, k, token)
}

/// A clock just past a reservation's TTL from the start.
fn after_ttl() -> ManualClock {
    ManualClock::new(T0 + aex_core::DEFAULT_RESERVATION_TTL_MS + 1)
}

fn request() -> AdmitRequest {
    AdmitRequest::new(MODEL).input_tokens(1_000).max_output_tokens(500)
}

#[test]
fn full_durability_fsyncs_the_admission_and_lets_a_dispatched_settlement_ride_on_the_next() {
    let (dir, db, clock, k, token) = setup();

    // The admission, dispatched in the same transaction: fsynced before it returns.
    let before = wal_syncs(&db);
    let first = k.admit_dispatched(&token, &request()).unwrap();
    assert_eq!(wal_syncs(&db), before + 1, "the admission of a dispatched call is fsynced once");
    let reserved = first.reserved_micro;

    // Its settlement is not fsynced...
    let usage = Usage::new(1_000, 20);
    let settled = k.commit(&first.execution_id, usage).unwrap();
    assert!(settled.cost_micro < reserved);
    assert_eq!(wal_syncs(&db), before + 1, "a dispatched execution's settlement waits for the next fsync");

    // ...so a power cut now loses it: the execution is dispatched again, and once its TTL passes
    // it is charged in full.
    let after_cut = cut(&db, &dir.path().join("cut-1"));
    let revived = open(&after_cut, &clock);
    let e = revived.execution(&first.execution_id).unwrap();
    assert_eq!(e.state, ExecutionState::Dispatched, "the settlement was lost with the power");
    assert_eq!(revived.agent("atlas").unwrap().spent_micro, 0);
    assert_clean(&revived);
    drop(revived);
    let later = after_ttl();
    let revived = open(&after_cut, &later);
    let e = revived.execution(&first.execution_id).unwrap();
    assert_eq!(e.state, ExecutionState::Committed);
    assert_eq!(e.cost_micro, Some(reserved), "charged its full reservation: over, never under");
    let atlas = revived.agent("atlas").unwrap();
    assert_eq!((atlas.spent_micro, atlas.reserved_micro), (reserved, 0));
    assert_clean(&revived);
    drop(revived);

    // The next admission's fsync carries the settlement before it to disk.
    let second = k.admit_dispatched(&token, &request()).unwrap();
    assert_eq!(wal_syncs(&db), before + 2);
    let after_cut = cut(&db, &dir.path().join("cut-2"));
    let revived = open(&after_cut, &clock);
    let e = revived.execution(&first.execution_id).unwrap();
    assert_eq!((e.state, e.cost_micro), (ExecutionState::Committed, Some(settled.cost_micro)));
    assert_eq!(revived.execution(&second.execution_id).unwrap().state, ExecutionState::Dispatched);
    let atlas = revived.agent("atlas").unwrap();
    assert_eq!((atlas.spent_micro, atlas.reserved_micro), (settled.cost_micro, second.reserved_micro));
    assert_clean(&revived);
}

#[test]
fn full_durability_fsyncs_the_settlement_of_a_call_never_marked_dispatched() {
    let (dir, db, _clock, k, token) = setup();

    // The TTL rule would release a reserved execution whose settlement was lost, though the
    // caller may have called the provider: so this settlement is fsynced at once.
    let admitted = k.admit(&token, &request()).unwrap();
    let before = wal_syncs(&db);
    let settled = k.commit(&admitted.execution_id, Usage::new(1_000, 20)).unwrap();
    assert_eq!(wal_syncs(&db), before + 1);
    let later = after_ttl();
    let revived = open(&cut(&db, &dir.path().join("cut")), &later);
    let e = revived.execution(&admitted.execution_id).unwrap();
    assert_eq!((e.state, e.cost_micro), (ExecutionState::Committed, Some(settled.cost_micro)));
    assert_clean(&revived);

    // So is every other change: an agent created, a budget set, a release.
    let before = wal_syncs(&db);
    k.set_budget("atlas", 20_000_000).unwrap();
    let admitted = k.admit(&token, &request()).unwrap();
    k.release(&admitted.execution_id, "not sent").unwrap();
    assert_eq!(wal_syncs(&db), before + 3);
}

#[test]
fn under_normal_durability_no_commit_is_fsynced() {
    install();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("aex.db");
    let options = KernelOptions {
        config: config(),
        store: StoreOptions { durability: Durability::Normal, ..Default::default() },
        ..Default::default()
    };
    let k = Kernel::open(&db, options).unwrap();
    let token = agent(&k, "atlas", 10_000_000);
    let before = wal_syncs(&db);
    for _ in 0..20 {
        let a = k.admit(&token, &request()).unwrap();
        k.commit(&a.execution_id, Usage::new(1_000, 20)).unwrap();
    }
    assert_eq!(wal_syncs(&db), before, "normal fsyncs only at checkpoints");
}

#[test]
fn under_full_an_overrun_settlement_is_fsynced_at_once() {
    // Lost to a power cut, the TTL rule would charge only the reservation: less than the cost.
    let (dir, db, _clock, k, token) = setup();
    let admitted = k.admit_dispatched(&token, &request()).unwrap();
    let before = wal_syncs(&db);
    let settled = k.commit(&admitted.execution_id, Usage::new(1_000, 5_000)).unwrap();
    assert!(settled.overrun_micro > 0);
    assert_eq!(wal_syncs(&db), before + 1, "an overrun is fsynced");
    let later = after_ttl();
    let revived = open(&cut(&db, &dir.path().join("cut")), &later);
    let e = revived.execution(&admitted.execution_id).unwrap();
    assert_eq!(e.cost_micro, Some(settled.cost_micro));
    assert_eq!(revived.agent("atlas").unwrap().spent_micro, settled.cost_micro);
    assert_clean(&revived);
}

#[test]
fn under_full_deleting_an_agent_with_a_dispatched_call_is_fsynced() {
    // The deletion releases the agent's open executions in the same transaction: a dispatched
    // one among them must not let the deletion (and its token's revocation) wait for the disk.
    let (dir, db, clock, k, token) = setup();
    k.admit_dispatched(&token, &request()).unwrap();
    let before = wal_syncs(&db);
    k.delete_agent("atlas").unwrap();
    assert_eq!(wal_syncs(&db), before + 1);
    let revived = open(&cut(&db, &dir.path().join("cut")), &clock);
    assert!(revived.agent("atlas").is_err(), "the deletion survived the cut");
    assert!(revived.admit(&token, &request()).is_err(), "and so did the token's revocation");
    assert_clean(&revived);
}

#[test]
fn a_failed_fsync_is_reported_and_the_kernel_then_refuses_every_write() {
    let (_dir, db, clock, k, token) = setup();
    let wal_path = wal(&std::fs::canonicalize(&db).unwrap());
    *FAIL_SYNCS_OF.lock().unwrap() = Some(wal_path);
    let failed = k.admit_dispatched(&token, &request()).unwrap_err();
    *FAIL_SYNCS_OF.lock().unwrap() = None;
    assert!(matches!(failed, aex_core::Error::Unavailable(_)), "{failed:?}");
    assert!(failed.to_string().contains("could not be written to disk"), "{failed}");

    // The disk may have dropped those pages while a later fsync succeeds: no write after it is
    // trusted, though reads go on.
    let refused = k.create_agent(&aex_core::AgentSpec::new("nova", 1_000)).unwrap_err();
    assert!(refused.to_string().contains("refuses writes until the database is opened again"), "{refused}");
    assert!(k.admit(&token, &request()).is_err());
    assert_eq!(k.agent("atlas").unwrap().name, "atlas");
    drop(k);

    // Opened again, it works; the admission whose fsync failed stands (it was committed), so it
    // is not lost: dispatched, the TTL rule charges it in full.
    let k = open(&db, &clock);
    k.admit_dispatched(&token, &request()).unwrap();
    assert_eq!(k.agent("atlas").unwrap().reserved_micro, 2 * request_reservation(&k));
    assert_clean(&k);
}

/// What one [`request`] reserves.
fn request_reservation(k: &Kernel) -> i64 {
    let token = agent(k, "probe", 10_000_000);
    let a = k.admit(&token, &request()).unwrap();
    k.release(&a.execution_id, "probe").unwrap();
    a.reserved_micro
}
