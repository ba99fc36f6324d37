//! Files on disk (PROTOCOL.md "Storage layout"): a client's files live at
//! `<customer backup_location>/<client_id>/<path>`; uploads are written to
//! `<backup_location>/.tollgate-tmp/`, which no client id can name (ids may
//! not start with '.') and LIST never shows (LIST reads the index).
//!
//! A commit is write, fsync, record pending, rename, fsync the directory,
//! update the index (docs/state.md): a crash at any point leaves the old
//! file or the new one, never a partial one, and `State::reconcile` plus
//! [`sweep_temp`] put index and disk back in agreement at startup.

mod pool;

pub use pool::{PIPE_DEPTH, PipedTemp, pool_threads, start_pool};

use crate::config::{Config, CustomerId};
use crate::state::{PendingCommit, State, StateError};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// Directory under each backup location that holds uploads in progress.
pub const TEMP_DIR: &str = ".tollgate-tmp";
/// Longest path a client may use, in bytes (PROTOCOL.md Upload).
pub const MAX_PATH: usize = 1024;
/// Longest path component, in bytes.
pub const MAX_COMPONENT: usize = 255;
/// Most components a path may have (PROTOCOL.md Additions, "Path depth").
pub const MAX_DEPTH: usize = 64;

/// Why a client path is refused (ERROR `bad_path`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    /// Empty or longer than 1024 bytes.
    #[error("a path must be 1 to 1024 bytes long")]
    Length,
    /// Starts with '/'.
    #[error("a path must be relative (no leading '/')")]
    Absolute,
    /// Contains NUL or a backslash.
    #[error("a path must not contain NUL or '\\'")]
    Character,
    /// An empty, "." or ".." component.
    #[error("a path must not have empty, '.' or '..' components")]
    Component,
    /// A component longer than 255 bytes.
    #[error("each path component must be at most 255 bytes")]
    ComponentLength,
    /// More than 64 components.
    #[error("a path may have at most 64 components")]
    Depth,
}

/// Checks a client path against PROTOCOL.md's rules.
pub fn validate_path(p: &str) -> Result<(), BadPath> {
    if p.is_empty() || p.len() > MAX_PATH {
        return Err(BadPath::Length);
    }
    if p.starts_with('/') {
        return Err(BadPath::Absolute);
    }
    if p.contains('\0') || p.contains('\\') {
        return Err(BadPath::Character);
    }
    for (i, c) in p.split('/').enumerate() {
        if c.is_empty() || c == "." || c == ".." {
            return Err(BadPath::Component);
        }
        if c.len() > MAX_COMPONENT {
            return Err(BadPath::ComponentLength);
        }
        if i >= MAX_DEPTH {
            return Err(BadPath::Depth);
        }
    }
    Ok(())
}

/// Per-(client, path) locks: concurrent PUTs of one path commit one after
/// the other, in the order their ENDs arrived (tokio's mutex is fair), and
/// a DELETE waits for a commit of the same path, so the index always
/// names the file on disk. Entries live while someone holds or waits.
#[derive(Debug, Default)]
pub struct PathLocks {
    map: std::sync::Mutex<std::collections::HashMap<(String, String), PathLock>>,
}

type PathLock = std::sync::Arc<tokio::sync::Mutex<()>>;

/// A held path lock; dropping it releases the path.
pub struct PathGuard<'a> {
    locks: &'a PathLocks,
    key: (String, String),
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl PathLocks {
    /// Waits for `path` of `client` (ids without regard to case).
    pub async fn lock(&self, client: &str, path: &str) -> PathGuard<'_> {
        let key = (client.to_ascii_lowercase(), path.to_string());
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let guard = m.lock_owned().await;
        PathGuard {
            locks: self,
            key,
            guard: Some(guard),
        }
    }

    /// Paths with a holder or a waiter.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no path is locked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for PathGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.locks.map.lock().unwrap_or_else(|p| p.into_inner());
        // Only this map hands out clones; a count of 1 means nobody waits.
        if map
            .get(&self.key)
            .is_some_and(|m| std::sync::Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

/// Removes the directories between `file`'s parent and `root` (exclusive)
/// that are empty, deepest first (a DELETE leaves no empty directories
/// behind). Stops at the first that is not empty.
pub fn remove_empty_parents(file: &Path, root: &Path) {
    let mut dir = file.parent();
    while let Some(d) = dir {
        if d == root || !d.starts_with(root) {
            break;
        }
        if fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
}

/// Where a client's files live.
pub fn client_dir(cfg: &Config, customer: CustomerId, client: &str) -> PathBuf {
    cfg.customer(customer).backup_location.join(client)
}

/// Moves a client's files from customer `from`'s location to `to`'s
/// (`clients move`).
pub fn move_client_files(
    cfg: &Config,
    client: &str,
    from: CustomerId,
    to: CustomerId,
) -> io::Result<()> {
    move_dir(&client_dir(cfg, from, client), &client_dir(cfg, to, client))
}

/// Deletes a client's files under the customer named `customer` (`clients
/// remove --purge`); nothing to do when that customer is gone or the
/// client never stored anything.
pub fn purge_client_files(cfg: &Config, client: &str, customer: &str) -> io::Result<()> {
    let Some(c) = cfg.customer_by_name(customer) else {
        return Ok(());
    };
    match std::fs::remove_dir_all(client_dir(cfg, c, client)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Where uploads under `customer` are written before their commit.
pub fn temp_dir(cfg: &Config, customer: CustomerId) -> PathBuf {
    let dir = cfg.customer(customer).backup_location.join(TEMP_DIR);
    // Nodes of a cluster share the backup locations: each keeps its own
    // temporary files, and sweeps only those (docs/scale-out.md).
    match cfg.server.state {
        crate::config::StateUrl::Postgres(_) => dir.join(&cfg.server.cluster.node),
        crate::config::StateUrl::Sqlite(_) => dir,
    }
}

/// The steps of a commit, reported to a hook so crash tests can stop the
/// process between any two of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The bytes are written to the temporary file.
    Written,
    /// The temporary file is fsynced.
    Synced,
    /// It is renamed into place and the directory fsynced.
    Renamed,
    /// The index and usage are updated.
    Indexed,
}

/// Makes every file and directory this process creates from now on its
/// owner's alone (umask 077), as CONFIG.md asks of the daemon's files.
pub fn private_umask() {
    use rustix::fs::Mode;
    rustix::process::umask(Mode::from_bits_truncate(0o077));
}

/// `create_dir_all` with mode 0700 for each directory it makes.
pub fn create_private_dirs(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Temporary files open now, and how many may stay open between writes.
static OPEN_TEMPS: AtomicUsize = AtomicUsize::new(0);
static TEMP_BUDGET: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Sets how many upload temporary files may stay open between writes;
/// past it, a file is closed after its writes and opened again for the
/// next. Each upload holds a socket too, so at `max_connections` uploads
/// an open-file limit of twice that would otherwise run out (EMFILE).
pub fn set_open_temp_budget(n: usize) {
    TEMP_BUDGET.store(n.max(1), Ordering::Relaxed);
}

/// Upload temporary files open now (also the gauge
/// `tollgate_open_temp_files`).
pub fn open_temps() -> usize {
    OPEN_TEMPS.load(Ordering::Relaxed)
}

/// An open temporary file, counted in [`OPEN_TEMPS`].
struct Counted(File);

impl Counted {
    fn new(f: File) -> Counted {
        OPEN_TEMPS.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::OPEN_TEMP_FILES).increment(1.0);
        Counted(f)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        OPEN_TEMPS.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::OPEN_TEMP_FILES).decrement(1.0);
    }
}

/// An upload being written to its temporary file, hashed as it goes.
pub struct TempFile {
    path: PathBuf,
    /// None while parked (closed to keep within the budget).
    file: Option<Counted>,
    hasher: Sha256,
    size: u64,
    /// Bytes whose writeback has been started.
    written_back: u64,
    /// Device and inode, to know the file again when it is reopened.
    id: (u64, u64),
}

/// Bytes written before their writeback is started.
const WRITEBACK_AFTER: u64 = 64 << 10;

/// Starts writing `len` bytes at `off` to the device without waiting,
/// and lets the kernel drop them from its cache once written: Linux's
/// `posix_fadvise(POSIX_FADV_DONTNEED)` starts writeback of the range's
/// dirty pages (as RocksDB's `bytes_per_sync` and PostgreSQL's
/// `backend_flush_after` do with `sync_file_range`, which rustix lacks).
/// Left to the kernel, an upload's bytes stay dirty until its END's fsync,
/// and on ext4 (data=ordered) each fsync then waits for every upload's
/// dirty bytes: 10,000 uploads ending together all waited seconds for
/// 800 MB. A backup is not read back soon, so its pages are not worth
/// keeping. Advisory: an error here is left to the fsync.
fn start_writeback(file: &File, off: u64, len: u64) {
    use rustix::fs::{Advice, fadvise};
    let _ = fadvise(file, off, std::num::NonZeroU64::new(len), Advice::DontNeed);
}

impl TempFile {
    /// Creates a fresh temporary file in `dir` (created if missing).
    pub fn create(dir: &Path) -> io::Result<TempFile> {
        create_private_dirs(dir)?;
        let mut rnd = [0u8; 12];
        getrandom::fill(&mut rnd).map_err(|e| io::Error::other(e.to_string()))?;
        let name: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        let path = dir.join(format!("{name}.part"));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let id = {
            use std::os::unix::fs::MetadataExt;
            let m = file.metadata()?;
            (m.dev(), m.ino())
        };
        Ok(TempFile {
            path,
            id,
            file: Some(Counted::new(file)),
            hasher: Sha256::new(),
            size: 0,
            written_back: 0,
        })
    }

    /// Appends bytes.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        self.open()?.write_all(buf)?;
        self.hasher.update(buf);
        self.size += buf.len() as u64;
        let pending = self.size - self.written_back;
        if pending >= WRITEBACK_AFTER
            && let Some(f) = &self.file
        {
            start_writeback(&f.0, self.written_back, pending);
            self.written_back = self.size;
        }
        Ok(())
    }

    /// The open file, opened again if parked. The directory is the
    /// daemon's own (0700) and the name random; O_NOFOLLOW and the size
    /// check refuse a file that is not the one left.
    fn open(&mut self) -> io::Result<&mut File> {
        use std::os::unix::fs::MetadataExt;
        if self.file.is_none() {
            // O_NONBLOCK: a FIFO put in its place must not hang a pool
            // thread in open; it is then refused as not the same file.
            let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
            let f = fs::OpenOptions::new()
                .append(true)
                .custom_flags(flags.bits() as i32)
                .open(&self.path)?;
            let m = f.metadata()?;
            if (m.dev(), m.ino()) != self.id || m.len() != self.size {
                return Err(io::Error::other(
                    "the temporary file changed while it was closed",
                ));
            }
            self.file = Some(Counted::new(f));
        }
        Ok(&mut self.file.as_mut().expect("opened above").0)
    }

    /// Closes the file until the next write if more temporary files are
    /// open than the budget allows.
    pub fn park_if_over_budget(&mut self) -> io::Result<()> {
        if OPEN_TEMPS.load(Ordering::Relaxed) > TEMP_BUDGET.load(Ordering::Relaxed) {
            self.park()?;
        }
        Ok(())
    }

    /// Closes the file until the next write. Its data is fsynced first:
    /// a writeback error is reported to open descriptors, and with none
    /// open the kernel may forget it along with the inode, so the END's
    /// fsync could pass over bytes that never reached the disk.
    fn park(&mut self) -> io::Result<()> {
        if let Some(f) = self.file.take() {
            f.0.sync_data()?;
        }
        Ok(())
    }

    /// Whether the file is closed until its next write.
    pub fn is_parked(&self) -> bool {
        self.file.is_none()
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fsyncs the file; returns it with its size and digest.
    pub fn sync(mut self) -> io::Result<SyncedTemp> {
        if let Err(e) = self.open().and_then(|f| f.sync_all()) {
            let _ = fs::remove_file(&self.path);
            return Err(e);
        }
        Ok(SyncedTemp {
            path: self.path,
            size: self.size,
            sha256: hex(&self.hasher.finalize()),
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes go to `file` from now on (a full device, in tests).
    #[cfg(test)]
    pub(crate) fn replace_file_for_test(&mut self, file: File) {
        self.file = Some(Counted::new(file));
    }

    /// Removes the temporary file (an upload that failed).
    pub fn discard(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A temporary file that is written and fsynced.
#[derive(Debug)]
pub struct SyncedTemp {
    /// Its path.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
}

/// Why a commit failed; the upload's reservation is released and nothing
/// of it is visible.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Disk full or another I/O failure (ERROR `storage_error`).
    #[error("storage: {0}")]
    Io(#[from] io::Error),
    /// The state store failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// The metadata a PUT may carry (PROTOCOL.md Additions), kept in the index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileMeta {
    /// Permission bits, at most 0o7777.
    pub mode: Option<u32>,
    /// Modification time, RFC 3339 in UTC.
    pub mtime: Option<String>,
}

/// Commits `temp` as `path` of `client`: pending record, rename, directory
/// fsync, index update. Returns the usage change. `hook` sees each step.
#[allow(clippy::too_many_arguments)]
pub async fn commit(
    state: &State,
    cfg: &Config,
    customer: CustomerId,
    client: &str,
    path: &str,
    temp: SyncedTemp,
    reservation: Option<i64>,
    meta: FileMeta,
    at: jiff::Timestamp,
    hook: &mut (dyn FnMut(Step) + Send),
) -> Result<i64, CommitError> {
    let dir = client_dir(cfg, customer, client);
    let final_path = dir.join(path);
    let pending = PendingCommit {
        client: client.to_string(),
        path: path.to_string(),
        temp_path: temp.path.clone(),
        final_path: final_path.clone(),
        mode: meta.mode,
        mtime: meta.mtime,
        size: temp.size,
        sha256: temp.sha256.clone(),
        modified: at,
        reservation,
    };
    let id = match state.begin_commit(&pending).await {
        Ok(id) => id,
        Err(e) => {
            // Nothing refers to the reservation yet. (Once a pending row
            // does, a failure keeps it held until restart: the rename may
            // have happened, and reconcile decides.)
            if let Some(r) = reservation {
                state.release_reservation(r).await?;
            }
            return Err(e.into());
        }
    };
    let (tp, fp, staging) = (
        temp.path.clone(),
        final_path.clone(),
        temp_dir(cfg, customer),
    );
    let renamed = tokio::task::spawn_blocking(move || rename_durably(&tp, &fp, &dir, &staging))
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    match renamed {
        Ok(()) => {}
        Err(Renamed::No(e)) => {
            // The row goes first: a crash between must not leave a row
            // whose temp is gone, which would read as "renamed".
            state.abort_commit(id).await?;
            let _ = fs::remove_file(&temp.path);
            return Err(e.into());
        }
        Err(Renamed::Yes(e)) => {
            // The new file is in place, but a later step failed (a
            // directory fsync): index what is on disk, and tell the client
            // it is not known to be durable (it sends it again).
            state.commit_file(id).await?;
            return Err(e.into());
        }
    }
    hook(Step::Renamed);
    let delta = state.commit_file(id).await?;
    hook(Step::Indexed);
    Ok(delta)
}

/// Why [`rename_durably`] failed: before the new file was in place, or
/// after.
#[derive(Debug)]
enum Renamed {
    /// Nothing changed at the destination.
    No(io::Error),
    /// The file is in place; a later step (a directory fsync) failed.
    Yes(io::Error),
}

/// Renames `from` to `to`, creating `to`'s directories under `root`, and
/// fsyncs every directory whose entries changed.
///
/// `from` can be on another filesystem when the client moved, mid-upload,
/// to a customer whose backup location is elsewhere. Then it is first copied
/// into `staging` (the destination's temporary directory, swept at start),
/// fsynced, and renamed from there: the file still appears atomically.
fn rename_durably(from: &Path, to: &Path, root: &Path, staging: &Path) -> Result<(), Renamed> {
    let before = Renamed::No;
    let parent = to
        .parent()
        .ok_or_else(|| before(io::Error::other("a stored file has no parent directory")))?;
    // A DELETE of another path may remove an emptied directory between
    // creating it and the rename: make it again and retry.
    let mut tries = 0;
    let first = loop {
        create_private_dirs(parent).map_err(before)?;
        match fs::rename(from, to) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 3 && from.exists() => {
                tries += 1;
            }
            r => break r,
        }
    };
    match first {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
            create_private_dirs(staging).map_err(before)?;
            let staged = staging.join(format!(
                "xdev-{:016x}",
                getrandom::u64().unwrap_or_default()
            ));
            let copied = fs::copy(from, &staged).and_then(|_| File::open(&staged)?.sync_all());
            if let Err(e) = copied {
                let _ = fs::remove_file(&staged);
                return Err(before(e));
            }
            if let Err(e) = fs::rename(&staged, to) {
                let _ = fs::remove_file(&staged);
                return Err(before(e));
            }
            // In place now; the temp's removal is tidying (the sweep does
            // it at start otherwise, and reconcile sees the new file by its
            // digest).
            let _ = fs::remove_file(from);
        }
        Err(e) => return Err(before(e)),
    }
    let after = Renamed::Yes;
    let mut dir = parent;
    loop {
        sync_dir(dir).map_err(after)?;
        if dir == root {
            break;
        }
        match dir.parent() {
            Some(p) if p.starts_with(root) => dir = p,
            _ => break,
        }
    }
    if let Some(tdir) = from.parent() {
        sync_dir(tdir).map_err(after)?;
    }
    Ok(())
}

/// Fsyncs directory `dir` after a change the caller made, sharing the
/// fsync with every other caller for whom it is also late enough (group
/// commit for directories). 10,000 uploads ending at once each fsynced the
/// backup location and the temporary directory, one after another on the
/// same inode; now one fsync covers every change made before it started.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    static DIRS: OnceLock<Mutex<HashMap<PathBuf, Arc<DirSync>>>> = OnceLock::new();
    let dirs = DIRS.get_or_init(Default::default);
    let ds = lock(dirs).entry(dir.to_owned()).or_default().clone();
    let r = ds.sync(|| File::open(dir).and_then(|d| d.sync_all()));
    let mut map = lock(dirs);
    drop(ds);
    // Only the map holds it: nobody waits on it any more. (Callers let go
    // under the map's lock, so the last one out always sees this.)
    if map.get(dir).is_some_and(|d| Arc::strong_count(d) == 1) {
        map.remove(dir);
    }
    r
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One directory's fsync rounds.
#[derive(Default)]
struct DirSync {
    rounds: Mutex<Rounds>,
    done: Condvar,
}

#[derive(Default)]
struct Rounds {
    started: u64,
    finished: u64,
    running: bool,
    /// The last round that failed, and how.
    failed: Option<(u64, io::ErrorKind, String)>,
}

impl DirSync {
    fn sync(&self, fsync: impl Fn() -> io::Result<()>) -> io::Result<()> {
        let mut g = lock(&self.rounds);
        // A round already running may have started before the caller's
        // change: only the next one to start is sure to cover it.
        let need = g.started + 1;
        loop {
            if g.finished >= need {
                // A later round's failure is reported too: an fsync error
                // is rare, and erring towards "not durable" is safe.
                return match &g.failed {
                    Some((round, kind, msg)) if *round >= need => {
                        Err(io::Error::new(*kind, msg.clone()))
                    }
                    _ => Ok(()),
                };
            }
            if g.running {
                g = self.done.wait(g).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            g.running = true;
            g.started += 1;
            let round = g.started;
            drop(g);
            // A round that unwound would leave `running` set and every later
            // caller for this directory waiting for good: it fails instead.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&fsync))
                .unwrap_or_else(|_| Err(io::Error::other("the directory fsync panicked")));
            g = lock(&self.rounds);
            g.running = false;
            g.finished = round;
            if let Err(e) = r {
                g.failed = Some((round, e.kind(), e.to_string()));
            }
            self.done.notify_all();
        }
    }
}

/// Writes `data` to `path` durably and atomically: a temporary file beside
/// it (created with `mode`), fsync, rename over `path`, fsync the
/// directory. A crash leaves the old file or the new one, never a torn one.
pub fn write_durably(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("a file to write needs a name"))?;
    let temp = dir.join(format!(
        ".{}.{:016x}.tmp",
        name.to_string_lossy(),
        getrandom::u64().unwrap_or_default()
    ));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&temp, path)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

/// Removes leftover temporary files under every backup location; returns
/// how many. Run at startup after `State::reconcile`.
pub fn sweep_temp(cfg: &Config) -> io::Result<u64> {
    let mut n = 0;
    let mut seen = std::collections::HashSet::new();
    for (i, _) in cfg.customers.iter().enumerate() {
        let dir = temp_dir(cfg, CustomerId(i as u32));
        if !seen.insert(dir.clone()) {
            continue;
        }
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            if e.file_type()?.is_file() {
                fs::remove_file(e.path())?;
                n += 1;
            }
        }
    }
    Ok(n)
}

/// The SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// The SHA-256 of `data`, lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Moves a client's directory between backup locations: a rename on one
/// filesystem, else copy, verify, then delete (CONFIG.md "Moving a client").
pub fn move_dir(from: &Path, to: &Path) -> io::Result<()> {
    if !from.exists() {
        return Ok(());
    }
    if to.exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} already exists", to.display()),
        ));
    }
    if let Some(p) = to.parent() {
        create_private_dirs(p)?;
    }
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(18) => {
            // EXDEV: another filesystem.
            copy_tree(from, to)?;
            verify_tree(from, to)?;
            fs::remove_dir_all(from)
        }
        Err(e) => Err(e),
    }
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    create_private_dirs(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &dest)?;
        } else {
            fs::copy(e.path(), &dest)?;
            File::open(&dest)?.sync_all()?;
        }
    }
    File::open(to)?.sync_all()
}

fn verify_tree(from: &Path, to: &Path) -> io::Result<()> {
    for e in fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            verify_tree(&e.path(), &dest)?;
        } else if sha256_file(&e.path())? != sha256_file(&dest)? {
            return Err(io::Error::other(format!(
                "copy of {} does not match",
                e.path().display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cross-filesystem case needs two filesystems: /dev/shm (tmpfs on
    /// Linux) and the system temp dir.
    #[test]
    fn rename_durably_crosses_filesystems() {
        use std::os::unix::fs::MetadataExt;
        let shm = tempfile::TempDir::new_in("/dev/shm").expect("/dev/shm is needed for this test");
        let disk = tempfile::TempDir::new().unwrap();
        assert_ne!(
            fs::metadata(shm.path()).unwrap().dev(),
            fs::metadata(disk.path()).unwrap().dev(),
            "/dev/shm and the temp dir must be different filesystems for this test"
        );
        let from = shm.path().join("upload.tmp");
        fs::write(&from, b"moved mid-upload").unwrap();
        let root = disk.path().join("client");
        let to = root.join("dir/file.bin");
        let staging = disk.path().join(TEMP_DIR);
        rename_durably(&from, &to, &root, &staging).unwrap();
        assert_eq!(fs::read(&to).unwrap(), b"moved mid-upload");
        assert!(!from.exists(), "the source is removed");
        assert_eq!(
            fs::read_dir(&staging).unwrap().count(),
            0,
            "nothing is left staged"
        );
    }

    #[test]
    fn paths() {
        for ok in [
            "a",
            "docs/a.txt",
            "a/b/c",
            "x.y",
            "..a",
            "a..",
            &"n".repeat(255),
            "ü/é",
            &["d"; 64].join("/"),
        ] {
            assert_eq!(validate_path(ok), Ok(()), "{ok}");
        }
        let long = format!("{}/{}", "a".repeat(600), "b".repeat(600));
        let cases: &[(&str, BadPath)] = &[
            ("", BadPath::Length),
            (&long, BadPath::Length),
            ("/etc/passwd", BadPath::Absolute),
            ("a\0b", BadPath::Character),
            ("a\\b", BadPath::Character),
            ("a//b", BadPath::Component),
            (&["d"; 65].join("/"), BadPath::Depth),
            ("a/", BadPath::Component),
            ("./a", BadPath::Component),
            ("a/../../etc", BadPath::Component),
            ("..", BadPath::Component),
        ];
        for (p, want) in cases {
            assert_eq!(validate_path(p).as_ref(), Err(want), "{p:?}");
        }
        assert_eq!(
            validate_path(&"n".repeat(256)),
            Err(BadPath::ComponentLength)
        );
    }

    /// A temp file holding "abc", closed until its next write.
    fn parked(dir: &Path) -> TempFile {
        let mut t = TempFile::create(dir).unwrap();
        t.write(b"abc").unwrap();
        t.park().unwrap();
        t
    }

    #[test]
    fn a_parked_temp_file_reopens_where_it_left_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = parked(dir.path());
        assert!(t.is_parked());
        t.write(b"def").unwrap();
        assert!(!t.is_parked());
        t.park().unwrap();
        let synced = t.sync().unwrap();
        assert_eq!(fs::read(&synced.path).unwrap(), b"abcdef");
        assert_eq!(synced.size, 6);
        assert_eq!(synced.sha256, hex(&Sha256::digest(b"abcdef")));
    }

    #[test]
    fn a_parked_temp_file_that_changed_or_became_a_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = parked(dir.path());
        fs::OpenOptions::new()
            .append(true)
            .open(t.path())
            .unwrap()
            .write_all(b"x")
            .unwrap();
        let e = t.write(b"def").unwrap_err();
        assert!(e.to_string().contains("changed"), "{e}");

        let mut t = parked(dir.path());
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, b"abc").unwrap();
        fs::remove_file(t.path()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, t.path()).unwrap();
        assert!(t.write(b"def").is_err(), "a symlink is not followed");
        assert_eq!(fs::read(&elsewhere).unwrap(), b"abc");

        // Another file of the same length put in its place.
        let mut t = parked(dir.path());
        let other = dir.path().join("other");
        fs::write(&other, b"xyz").unwrap();
        fs::rename(&other, t.path()).unwrap();
        let e = t.write(b"def").unwrap_err();
        assert!(e.to_string().contains("changed"), "{e}");
    }

    /// 40 callers at once share fsyncs, and each returns only after an
    /// fsync that started after it was called.
    #[test]
    fn directory_fsyncs_are_shared_and_late_enough() {
        use std::time::{Duration, Instant};
        let ds = Arc::new(DirSync::default());
        let rounds = Arc::new(Mutex::new(Vec::<(Instant, Instant)>::new()));
        let threads: Vec<_> = (0..40)
            .map(|i| {
                let (ds, rounds) = (ds.clone(), rounds.clone());
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(i % 7));
                    let t0 = Instant::now();
                    ds.sync(|| {
                        let start = Instant::now();
                        std::thread::sleep(Duration::from_millis(10));
                        lock(&rounds).push((start, Instant::now()));
                        Ok(())
                    })
                    .unwrap();
                    let t1 = Instant::now();
                    assert!(
                        lock(&rounds).iter().any(|&(s, e)| s >= t0 && e <= t1),
                        "caller {i} returned without an fsync that started after it"
                    );
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = lock(&rounds).len();
        assert!(n < 40, "{n} fsyncs for 40 callers: none shared");
    }

    /// A round whose fsync panics fails its callers, including one that
    /// waited on it from another thread, and the next round runs.
    #[test]
    fn a_panicking_directory_fsync_fails_its_round_and_blocks_no_one() {
        use std::time::Duration;
        let ds = Arc::new(DirSync::default());
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let leader = std::thread::spawn({
            let ds = ds.clone();
            move || {
                ds.sync(|| {
                    entered_tx.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(50));
                    panic!("injected");
                })
            }
        });
        entered_rx.recv().unwrap();
        // This caller arrives mid-round: it waits, then runs a round itself.
        let waiter = std::thread::spawn({
            let ds = ds.clone();
            move || ds.sync(|| Ok(()))
        });
        let e = leader.join().expect("the panic stays inside").unwrap_err();
        assert!(e.to_string().contains("panicked"), "{e}");
        waiter.join().unwrap().unwrap();
        ds.sync(|| Ok(())).unwrap();
    }

    #[test]
    fn a_failed_directory_fsync_fails_its_callers_not_later_ones() {
        let ds = DirSync::default();
        let e = ds
            .sync(|| Err(io::Error::other("device gone")))
            .unwrap_err();
        assert!(e.to_string().contains("device gone"));
        ds.sync(|| Ok(())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        sync_dir(dir.path()).unwrap();
        assert!(sync_dir(&dir.path().join("missing")).is_err());
    }
}
