//! The writer pool (issue 13 item 3): a fixed set of threads writes and
//! hashes the temporary files of every upload; their fsyncs run beside it
//! ([`PipedTemp::sync`]). An upload holds no
//! thread. Its chunks wait in its own queue, and whichever pool thread is
//! free takes the upload's next run of chunks; an upload is run by one
//! thread at a time, so its bytes stay in order. At most [`PIPE_DEPTH`]
//! chunks wait per upload, so a slow disk slows that upload's reads
//! (backpressure) without holding a thread another upload needs. No
//! device (filesystem) may keep more than half the threads busy, nor more
//! than [`SYNCS_PER_DEVICE`] of tokio's blocking threads in fsync, so a
//! slow or hung backup disk stalls its own uploads, not everyone's.
//!
//! Before, each upload held a `spawn_blocking` thread until its END, and
//! tokio has 512 of them: upload 513 waited for a thread another upload
//! held, and with every client waiting for its next chunk to be taken, they
//! could wait for each other for good.

use super::{SyncedTemp, TempFile};
use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// Chunks queued per upload before its writes wait.
pub const PIPE_DEPTH: usize = 4;
/// Chunks one pool thread writes for an upload before it lets others run.
const RUN: usize = 8;

/// The device of the temporary directory `dir`, created if missing. Asked
/// once per directory: the pool needs it before any file work is queued.
fn device_of(dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    static DEVICES: OnceLock<Mutex<std::collections::HashMap<std::path::PathBuf, u64>>> =
        OnceLock::new();
    let devices = DEVICES.get_or_init(Default::default);
    if let Some(d) = lock(devices).get(dir) {
        return Ok(*d);
    }
    super::create_private_dirs(dir)?;
    let dev = std::fs::metadata(dir)?.dev();
    lock(devices).insert(dir.to_owned(), dev);
    Ok(dev)
}

/// What a pool thread does for an upload, in order.
enum Op {
    /// Create the file in this directory.
    Create(std::path::PathBuf, oneshot::Sender<io::Result<()>>),
    /// Append and hash; the permit is returned once written.
    Write(Bytes, OwnedSemaphorePermit),
    /// Hand back the file, every byte written (its fsync is the caller's).
    Finish(oneshot::Sender<io::Result<InFlight<TempFile>>>),
    /// Remove the file (a failed or abandoned upload).
    Discard(Option<oneshot::Sender<()>>),
    /// Panic on the pool thread (a bug, in tests).
    #[cfg(test)]
    Panic,
}

/// One upload's file and queue.
struct Slot {
    /// The device its file is on.
    dev: u64,
    inner: Mutex<SlotInner>,
}

impl Slot {
    fn new(dev: u64) -> Arc<Slot> {
        Arc::new(Slot {
            dev,
            inner: Mutex::new(SlotInner {
                temp: None,
                ops: VecDeque::new(),
                scheduled: false,
                failed: None,
            }),
        })
    }
}

struct SlotInner {
    /// None while a pool thread works on it, or once synced or discarded.
    temp: Option<TempFile>,
    ops: VecDeque<Op>,
    /// Queued on the pool or being run.
    scheduled: bool,
    /// The first write error; later writes and the sync report it.
    failed: Option<(io::ErrorKind, String)>,
}

/// The threads and the uploads that have work for them.
struct Pool {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Most threads one device may keep busy.
    per_device: usize,
}

/// Uploads with work, kept per device: a thread looks only at the head of
/// each device's line, so finding work costs the number of devices, not
/// the number of uploads waiting. (One line for all, scanned for an
/// upload whose device had a thread to spare, cost every woken thread a
/// pass over 10,000 uploads when one disk was at its share: seconds of
/// CPU in the 10,000-upload benchmark.)
#[derive(Default)]
struct Queue {
    devices: std::collections::HashMap<u64, Line>,
    /// Arrival number of the next upload queued: among devices with a
    /// thread to spare, the one whose head came first runs.
    arrivals: u64,
}

#[derive(Default)]
struct Line {
    ready: VecDeque<(u64, Arc<Slot>)>,
    /// Threads busy on this device.
    busy: usize,
}

impl Line {
    /// Threads this device may still take.
    fn room(&self, per_device: usize) -> usize {
        per_device.saturating_sub(self.busy)
    }
}

impl Queue {
    fn push(&mut self, slot: Arc<Slot>) {
        self.arrivals += 1;
        let n = self.arrivals;
        self.devices
            .entry(slot.dev)
            .or_default()
            .ready
            .push_back((n, slot));
    }
}

static POOL: OnceLock<Arc<Pool>> = OnceLock::new();

/// Fsyncs of upload files in flight at once per device (filesystem).
pub const SYNCS_PER_DEVICE: usize = 16;
/// Fsyncs of upload files in flight at once in all: well under tokio's
/// 512 blocking threads, so hung disks cannot take the threads that
/// commits, restores and password checks need.
pub const SYNCS_IN_ALL: usize = 128;

/// Places among the fsyncs of `dev` and of all devices.
async fn sync_permits(dev: u64) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
    static SYNCS: OnceLock<Mutex<std::collections::HashMap<u64, Arc<Semaphore>>>> = OnceLock::new();
    static ALL: OnceLock<Arc<Semaphore>> = OnceLock::new();
    let sem = lock(SYNCS.get_or_init(Default::default))
        .entry(dev)
        .or_insert_with(|| Arc::new(Semaphore::new(SYNCS_PER_DEVICE)))
        .clone();
    let own = sem.acquire_owned().await.ok()?;
    let all = ALL
        .get_or_init(|| Arc::new(Semaphore::new(SYNCS_IN_ALL)))
        .clone()
        .acquire_owned()
        .await
        .ok()?;
    Some((own, all))
}

/// Threads in the pool: two per core (a thread blocked in fsync leaves
/// the other busy), at least 4 and at most 64.
pub fn pool_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores * 2).clamp(4, 64)
}

fn new_pool() -> Arc<Pool> {
    Arc::new(Pool {
        queue: Mutex::new(Queue::default()),
        wake: Condvar::new(),
        per_device: (pool_threads() / 2).max(1),
    })
}

fn spawn_threads(pool: &Arc<Pool>) -> io::Result<()> {
    for i in 0..pool_threads() {
        let p = pool.clone();
        std::thread::Builder::new()
            .name(format!("tollgate-writer-{i}"))
            .spawn(move || p.work())?;
    }
    Ok(())
}

/// Starts the pool's threads (the daemon does at start, so a failure is
/// an error there rather than in the first upload).
pub fn start_pool() -> io::Result<()> {
    if POOL.get().is_some() {
        return Ok(());
    }
    let pool = new_pool();
    spawn_threads(&pool)?;
    // Another caller may have won the race; its pool serves, and these
    // threads wait on a queue nobody feeds.
    let _ = POOL.set(pool);
    Ok(())
}

fn pool() -> &'static Arc<Pool> {
    POOL.get_or_init(|| {
        let pool = new_pool();
        spawn_threads(&pool).expect("the writer pool's threads start");
        pool
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    /// Queues `op` for `slot` and makes sure a thread will run it.
    fn push(&self, slot: &Arc<Slot>, op: Op) {
        let mut s = lock(&slot.inner);
        s.ops.push_back(op);
        if !s.scheduled {
            s.scheduled = true;
            drop(s);
            let mut q = lock(&self.queue);
            q.push(slot.clone());
            // A device at its share of threads gets no thread woken: one
            // of its own takes the upload when done.
            let room = q.devices[&slot.dev].room(self.per_device) > 0;
            drop(q);
            if room {
                self.wake.notify_one();
            }
        }
    }

    /// The next upload whose device has a thread to spare, waiting for one.
    fn next(&self) -> Arc<Slot> {
        let mut q = lock(&self.queue);
        loop {
            let first = q
                .devices
                .iter()
                .filter(|(_, l)| l.room(self.per_device) > 0)
                .filter_map(|(dev, l)| l.ready.front().map(|(n, _)| (*n, *dev)))
                .min();
            if let Some((_, dev)) = first {
                let line = q.devices.get_mut(&dev).expect("the device was just seen");
                let (_, slot) = line.ready.pop_front().expect("its line has a head");
                line.busy += 1;
                return slot;
            }
            q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn work(&self) {
        loop {
            let slot = self.next();
            // A panic in one upload's file work must cost that upload, not
            // the pool: the thread lives on, the device's share is given
            // back, and the upload's callers get an error instead of
            // waiting for a run that never comes.
            let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(&slot)))
                .unwrap_or_else(|_| {
                    tracing::error!(
                        "a writer pool thread panicked; the upload it was writing fails"
                    );
                    let mut s = lock(&slot.inner);
                    s.failed = Some((
                        io::ErrorKind::Other,
                        "the writer pool failed on this upload".into(),
                    ));
                    // Their reply senders go: each waiter sees an error.
                    s.ops.clear();
                    s.scheduled = false;
                    false
                });
            self.done_with(slot, again);
        }
    }

    /// Runs up to [`RUN`] of the upload's queued operations; whether more
    /// are queued (the upload is scheduled again).
    fn run(&self, slot: &Arc<Slot>) -> bool {
        let (mut temp, ops, mut failed) = {
            let mut s = lock(&slot.inner);
            let n = s.ops.len().min(RUN);
            (
                Held(s.temp.take()),
                s.ops.drain(..n).collect::<Vec<_>>(),
                s.failed.clone(),
            )
        };
        // The file I/O runs without the slot's lock: the session may
        // queue more meanwhile.
        for op in ops {
            match op {
                Op::Create(dir, reply) => {
                    let r = TempFile::create(&dir).map(|t| *temp = Some(t));
                    if let Err(e) = &r {
                        failed = Some((e.kind(), e.to_string()));
                    }
                    let _ = reply.send(r);
                }
                Op::Write(b, permit) => {
                    if failed.is_none()
                        && let Some(t) = temp.as_mut()
                        && let Err(e) = t.write(&b)
                    {
                        failed = Some((e.kind(), e.to_string()));
                        if let Some(t) = temp.take() {
                            t.discard();
                        }
                    }
                    drop(permit);
                }
                Op::Finish(reply) => {
                    let r = match (&failed, temp.take()) {
                        (Some((k, m)), t) => {
                            if let Some(t) = t {
                                t.discard();
                            }
                            Err(io::Error::new(*k, m.clone()))
                        }
                        (None, Some(t)) => Ok(InFlight(Some(t))),
                        (None, None) => Err(io::Error::other("the upload is gone")),
                    };
                    // Nobody waits any more (the session ended): the
                    // file is nobody's, and InFlight removes it.
                    let _ = reply.send(r);
                }
                Op::Discard(reply) => {
                    if let Some(t) = temp.take() {
                        t.discard();
                    }
                    if let Some(r) = reply {
                        let _ = r.send(());
                    }
                }
                #[cfg(test)]
                Op::Panic => panic!("a test made a writer pool thread panic"),
            }
        }
        // Past the open-file budget an idle upload's file is closed
        // (after an fsync: outside the slot's lock, which the session
        // takes to queue).
        let idle = lock(&slot.inner).ops.is_empty();
        if idle
            && failed.is_none()
            && let Some(t) = temp.as_mut()
            && let Err(e) = t.park_if_over_budget()
        {
            failed = Some((e.kind(), e.to_string()));
            if let Some(t) = temp.take() {
                t.discard();
            }
        }
        let mut s = lock(&slot.inner);
        s.temp = temp.take();
        s.failed = failed;
        // More came meanwhile: back of the line, so one busy
        // upload cannot keep a thread to itself.
        s.scheduled = !s.ops.is_empty();
        s.scheduled
    }

    /// Gives back the thread `slot`'s device lent, and queues the upload
    /// again if it has more to do.
    fn done_with(&self, slot: Arc<Slot>, again: bool) {
        let mut q = lock(&self.queue);
        let dev = slot.dev;
        if again {
            q.push(slot);
        }
        if let Some(line) = q.devices.get_mut(&dev) {
            line.busy = line.busy.saturating_sub(1);
            if line.busy == 0 && line.ready.is_empty() {
                q.devices.remove(&dev);
            }
        }
        // This thread takes the next upload itself; a waiter is woken
        // only for more than that. (Waking them all after every run
        // was a futex wake, most often for nothing, per 64 KiB.)
        let runnable: usize = q
            .devices
            .values()
            .map(|l| l.ready.len().min(l.room(self.per_device)))
            .sum();
        drop(q);
        if runnable > 1 {
            self.wake.notify_one();
        }
    }
}

/// An upload's file while a pool thread works on it: removed if that work
/// panics, since the upload is failed then and nothing else would remove
/// it before the next start's sweep.
struct Held(Option<TempFile>);

impl std::ops::Deref for Held {
    type Target = Option<TempFile>;
    fn deref(&self) -> &Option<TempFile> {
        &self.0
    }
}

impl std::ops::DerefMut for Held {
    fn deref_mut(&mut self) -> &mut Option<TempFile> {
        &mut self.0
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(t) = self.0.take()
        {
            t.discard();
        }
    }
}

/// An upload's temporary file, written by the pool. Its API is async; no
/// call blocks the runtime on disk I/O except the first `create` in a
/// directory, which makes the directory and reads its device.
pub struct PipedTemp {
    slot: Arc<Slot>,
    room: Arc<Semaphore>,
    queued: u64,
    /// Synced or discarded: Drop has nothing to do.
    done: bool,
}

impl PipedTemp {
    /// Creates the temporary file in `dir`, on the pool: a create is disk
    /// work too (on ext4 it searches inode bitmaps under the directory's
    /// lock), and 10,000 PUTs at once made on tokio's workers stalled
    /// every session for seconds.
    pub async fn create(dir: &Path) -> io::Result<PipedTemp> {
        let dev = device_of(dir)?;
        PipedTemp::create_on(dir, dev).await
    }

    /// As [`PipedTemp::create`], with the device given.
    async fn create_on(dir: &Path, dev: u64) -> io::Result<PipedTemp> {
        let mut t = PipedTemp {
            slot: Slot::new(dev),
            room: Arc::new(Semaphore::new(PIPE_DEPTH)),
            queued: 0,
            done: false,
        };
        let (tx, rx) = oneshot::channel();
        pool().push(&t.slot, Op::Create(dir.to_owned(), tx));
        // Dropped while waiting (a cancelled session), Drop's discard
        // queues behind the create.
        match rx.await {
            Ok(Ok(())) => Ok(t),
            Ok(Err(e)) => {
                t.done = true;
                Err(e)
            }
            Err(_) => Err(io::Error::other("the writer pool dropped the upload")),
        }
    }

    /// Bytes handed to the pool so far.
    pub fn size(&self) -> u64 {
        self.queued
    }

    /// Queues a chunk, waiting while [`PIPE_DEPTH`] are queued; fails with
    /// the write error if an earlier chunk failed.
    pub async fn write(&mut self, b: Bytes) -> io::Result<()> {
        let permit = self
            .room
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| io::Error::other("the upload is closed"))?;
        if let Some((k, m)) = lock(&self.slot.inner).failed.clone() {
            return Err(io::Error::new(k, m));
        }
        self.queued += b.len() as u64;
        pool().push(&self.slot, Op::Write(b, permit));
        Ok(())
    }

    /// Waits for every byte to be written and fsynced.
    ///
    /// The fsync runs on tokio's blocking threads, up to
    /// [`SYNCS_PER_DEVICE`] at once per device and [`SYNCS_IN_ALL`] in
    /// all, not on the pool: it waits on the
    /// device, not the CPU, and the filesystem's journal commits
    /// concurrent fsyncs together (ext4, XFS). On the pool's two threads
    /// per device, 10,000 uploads ending at once queued their fsyncs two
    /// by two, seconds behind.
    pub async fn sync(mut self) -> io::Result<SyncedTemp> {
        // Taken first, so no await lies between receiving the file and
        // handing it to its thread. Cancelled here, Drop discards the
        // file; cancelled while an answer waits in a channel, the answer's
        // InFlight removes it.
        let permits = sync_permits(self.slot.dev).await;
        self.done = true;
        let (tx, rx) = oneshot::channel();
        pool().push(&self.slot, Op::Finish(tx));
        let temp = rx
            .await
            .map_err(|_| io::Error::other("the writer pool dropped the upload"))??
            .take();
        let (tx, rx) = oneshot::channel();
        tokio::task::spawn_blocking(move || {
            // Held until the fsync returns, even if the session is gone.
            let _permits = permits;
            let _ = tx.send(temp.sync().map(|s| InFlight(Some(s))));
        });
        rx.await
            .map_err(|_| io::Error::other("the upload's fsync did not finish"))?
            .map(InFlight::take)
    }

    /// Removes the temporary file, once what is queued is done.
    pub async fn discard(mut self) {
        self.done = true;
        let (tx, rx) = oneshot::channel();
        pool().push(&self.slot, Op::Discard(Some(tx)));
        let _ = rx.await;
    }
}

/// A temporary file handed from a thread to its session through a channel:
/// removed if the session is gone before it takes it (a cancelled session
/// drops the receiver with the answer still in it).
struct InFlight<T: Temp>(Option<T>);

/// A temporary file's path, for [`InFlight`].
trait Temp {
    fn temp_path(&self) -> &std::path::Path;
}

impl Temp for TempFile {
    fn temp_path(&self) -> &std::path::Path {
        self.path()
    }
}

impl Temp for SyncedTemp {
    fn temp_path(&self) -> &std::path::Path {
        &self.path
    }
}

impl<T: Temp> InFlight<T> {
    fn take(mut self) -> T {
        self.0.take().expect("an InFlight is taken once")
    }
}

impl<T: Temp> Drop for InFlight<T> {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            let _ = std::fs::remove_file(t.temp_path());
        }
    }
}

impl Drop for PipedTemp {
    /// An upload dropped mid-way (its session ended) leaves no file behind.
    fn drop(&mut self) {
        if !self.done {
            pool().push(&self.slot, Op::Discard(None));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::time::Duration;

    impl PipedTemp {
        /// Waits until no pool thread holds the upload (its file is back
        /// in the slot).
        async fn idle(&self) {
            while lock(&self.slot.inner).scheduled {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    /// A thread takes the oldest upload among devices with a thread to
    /// spare, and never one of a device at its share.
    #[test]
    fn the_oldest_upload_of_a_device_with_room_runs_first() {
        let pool = Pool {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            per_device: 2,
        };
        let (a1, a2, a3, b1) = (Slot::new(1), Slot::new(1), Slot::new(1), Slot::new(2));
        for s in [&a1, &a2, &b1, &a3] {
            lock(&pool.queue).push(s.clone());
        }
        assert!(Arc::ptr_eq(&pool.next(), &a1));
        assert!(Arc::ptr_eq(&pool.next(), &a2));
        // Device 1 has both its threads: b1 runs before a3, though later.
        assert!(Arc::ptr_eq(&pool.next(), &b1));
        assert_eq!(lock(&pool.queue).devices[&1].busy, 2);
        lock(&pool.queue).devices.get_mut(&1).unwrap().busy -= 1;
        assert!(Arc::ptr_eq(&pool.next(), &a3));
        assert!(
            lock(&pool.queue)
                .devices
                .values()
                .all(|l| l.ready.is_empty())
        );
    }

    /// A panic in one upload's file work fails that upload's callers and
    /// costs the pool nothing. Twice as many panics as it has threads: had
    /// a panic killed its thread or kept the device's share of threads,
    /// the later uploads would never be answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_fails_its_upload_and_the_pool_lives_on() {
        let dir = tempfile::TempDir::new().unwrap();
        let pool = new_pool();
        spawn_threads(&pool).unwrap();
        async fn within<T>(
            what: &str,
            rx: oneshot::Receiver<T>,
        ) -> Result<T, oneshot::error::RecvError> {
            tokio::time::timeout(Duration::from_secs(60), rx)
                .await
                .unwrap_or_else(|_| panic!("{what} was never answered"))
        }
        for _ in 0..2 * pool_threads() {
            let slot = Slot::new(7);
            let (created, rx_created) = oneshot::channel();
            pool.push(&slot, Op::Create(dir.path().to_owned(), created));
            pool.push(&slot, Op::Panic);
            let (finished, rx_finished) = oneshot::channel();
            pool.push(&slot, Op::Finish(finished));
            within("a create", rx_created).await.unwrap().unwrap();
            match within("the finish", rx_finished).await {
                Err(_) | Ok(Err(_)) => {}
                Ok(Ok(_)) => panic!("an upload whose thread panicked finished"),
            }
        }
        // A failed upload leaves no file behind (removed as the panic
        // unwinds, which may be just after its callers were answered).
        let start = std::time::Instant::now();
        loop {
            let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
            if left.is_empty() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "files left after the panics: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The one after: a whole upload, on every thread's share.
        let slot = Slot::new(7);
        let (created, rx_created) = oneshot::channel();
        pool.push(&slot, Op::Create(dir.path().to_owned(), created));
        let permit = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
        pool.push(&slot, Op::Write(chunk(0, 0), permit));
        let (finished, rx_finished) = oneshot::channel();
        pool.push(&slot, Op::Finish(finished));
        within("a create", rx_created).await.unwrap().unwrap();
        let t = within("the finish", rx_finished)
            .await
            .unwrap()
            .unwrap()
            .take();
        assert_eq!(t.size(), chunk(0, 0).len() as u64);
        t.discard();
        loop {
            let busy = lock(&pool.queue).devices.get(&7).map_or(0, |l| l.busy);
            if busy == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn chunk(upload: usize, i: usize) -> Bytes {
        Bytes::from(vec![(upload * 31 + i) as u8; 1000 + i])
    }

    fn digest(upload: usize, chunks: usize) -> String {
        let mut h = Sha256::new();
        for i in 0..chunks {
            h.update(chunk(upload, i));
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// 1,000 uploads open at once, more than tokio's 512 blocking threads
    /// and far more than the pool's, each fed more chunks than its queue
    /// holds, round-robin: every client waits for its next chunk to be
    /// taken. With a thread per upload, upload 513 never got one and the
    /// round stalled for good; with the pool every upload completes, in
    /// order, byte-exact.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thousand_uploads_share_the_pool_in_order() {
        let dir = tempfile::TempDir::new().unwrap();
        const UPLOADS: usize = 1000;
        const CHUNKS: usize = 3 * PIPE_DEPTH;
        assert!(pool_threads() < UPLOADS);
        let run = async {
            let mut temps = Vec::new();
            for _ in 0..UPLOADS {
                temps.push(PipedTemp::create(dir.path()).await.unwrap());
            }
            for i in 0..CHUNKS {
                for (u, t) in temps.iter_mut().enumerate() {
                    t.write(chunk(u, i)).await.unwrap();
                }
            }
            let mut out = Vec::new();
            for t in temps {
                out.push(t.sync().await.unwrap());
            }
            out
        };
        let synced = tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .expect("the uploads finished");
        for (u, s) in synced.iter().enumerate() {
            assert_eq!(s.sha256, digest(u, CHUNKS), "upload {u}");
            let want: u64 = (0..CHUNKS).map(|i| chunk(u, i).len() as u64).sum();
            assert_eq!(s.size, want);
            assert_eq!(std::fs::metadata(&s.path).unwrap().len(), want);
        }
    }

    /// Past the open-file budget, an upload's file is closed between its
    /// writes and opened again for the next: 200 uploads keep about 8
    /// files open, and every byte still lands in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_the_budget_files_are_closed_between_writes() {
        const UPLOADS: usize = 200;
        const BUDGET: usize = 8;
        let dir = tempfile::TempDir::new().unwrap();
        super::super::set_open_temp_budget(BUDGET);
        let run = async {
            let mut temps = Vec::new();
            for _ in 0..UPLOADS {
                temps.push(PipedTemp::create(dir.path()).await.unwrap());
            }
            for i in 0..3 {
                for (u, t) in temps.iter_mut().enumerate() {
                    t.write(chunk(u, i)).await.unwrap();
                }
            }
            // Once the pool is idle for these uploads, count what it
            // left open.
            for t in &temps {
                t.idle().await;
            }
            let open = temps
                .iter()
                .filter(|t| {
                    lock(&t.slot.inner)
                        .temp
                        .as_ref()
                        .is_some_and(|f| !f.is_parked())
                })
                .count();
            let mut out = Vec::new();
            for t in temps {
                out.push(t.sync().await.unwrap());
            }
            (open, out)
        };
        let (open, synced) = tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .expect("the uploads finished");
        super::super::set_open_temp_budget(usize::MAX);
        // Threads finishing runs at once may each see the count below
        // the budget; other tests' files only make it park more.
        assert!(open <= BUDGET + pool_threads(), "{open} files left open");
        for (u, s) in synced.iter().enumerate() {
            assert_eq!(s.sha256, digest(u, 3), "upload {u}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn discarded_and_dropped_uploads_leave_no_file() {
        let dir = tempfile::TempDir::new().unwrap();
        let count = || std::fs::read_dir(dir.path()).unwrap().count();
        let mut a = PipedTemp::create(dir.path()).await.unwrap();
        a.write(chunk(0, 0)).await.unwrap();
        a.discard().await;
        assert_eq!(count(), 0);
        let mut b = PipedTemp::create(dir.path()).await.unwrap();
        b.write(chunk(1, 0)).await.unwrap();
        drop(b);
        // A session cancelled while its file is being finished or fsynced.
        for _ in 0..20 {
            let mut c = PipedTemp::create(dir.path()).await.unwrap();
            c.write(chunk(2, 0)).await.unwrap();
            tokio::select! {
                biased;
                _ = c.sync() => {}
                _ = std::future::ready(()) => {}
            }
        }
        // Cancelled while the answer waits in its channel: polled once (the
        // FINISH is queued), the pool answers, then the session is gone.
        for _ in 0..5 {
            let mut c = PipedTemp::create(dir.path()).await.unwrap();
            c.write(chunk(3, 0)).await.unwrap();
            let mut s = Box::pin(c.sync());
            assert!(futures_util::poll!(s.as_mut()).is_pending());
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(s);
        }
        let gone = async {
            while count() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), gone)
            .await
            .expect("a dropped upload's file is removed");
    }

    /// A write that fails (the file's directory is a full device here:
    /// /dev/full) is reported by a later write or by the sync, and the
    /// temporary file is removed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_is_reported_and_nothing_is_left() {
        let dir = tempfile::TempDir::new().unwrap();
        let mut t = PipedTemp::create(dir.path()).await.unwrap();
        t.idle().await;
        let path = {
            let mut s = lock(&t.slot.inner);
            let temp = s.temp.as_mut().unwrap();
            temp.replace_file_for_test(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/dev/full")
                    .unwrap(),
            );
            temp.path().to_path_buf()
        };
        t.write(Bytes::from(vec![1u8; 100_000])).await.unwrap();
        let e = t.sync().await.unwrap_err();
        assert!(e.to_string().contains("No space left"), "{e}");
        assert!(!path.exists());
    }

    /// A hung backup disk (here: writes into FIFOs nobody reads) keeps at
    /// most half the pool busy; uploads to other disks go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_disk_holds_at_most_half_the_pool() {
        let dir = tempfile::TempDir::new().unwrap();
        const HUNG_DEV: u64 = u64::MAX - 7;
        let mut hung = Vec::new();
        let mut fifos = Vec::new();
        // Created first: once its threads hang, a create on that disk
        // waits too.
        let mut created = Vec::new();
        for _ in 0..pool_threads() {
            let t = PipedTemp::create_on(dir.path(), HUNG_DEV).await.unwrap();
            t.idle().await;
            created.push(t);
        }
        for (i, mut t) in created.into_iter().enumerate() {
            let fifo = dir.path().join(format!("fifo-{i}"));
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &fifo,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_bits_truncate(0o600),
                0,
            )
            .unwrap();
            // Read-write, so the open does not wait for a reader.
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&fifo)
                .unwrap();
            lock(&t.slot.inner)
                .temp
                .as_mut()
                .unwrap()
                .replace_file_for_test(f);
            // More than a pipe holds: the write blocks.
            t.write(Bytes::from(vec![0u8; 1 << 20])).await.unwrap();
            hung.push(t);
            fifos.push(fifo);
        }
        let mut ok = PipedTemp::create(dir.path()).await.unwrap();
        ok.write(chunk(3, 0)).await.unwrap();
        let synced = tokio::time::timeout(Duration::from_secs(30), ok.sync())
            .await
            .expect("an upload to another disk is not held up")
            .unwrap();
        assert_eq!(synced.sha256, digest(3, 1));
        // Unblock the hung writers: drain the FIFOs.
        for fifo in fifos {
            std::thread::spawn(move || {
                use std::io::Read;
                let mut f = std::fs::File::open(fifo).unwrap();
                let mut buf = vec![0u8; 1 << 16];
                while f.read(&mut buf).is_ok_and(|n| n > 0) {}
            });
        }
        for t in hung {
            t.discard().await;
        }
    }
}
