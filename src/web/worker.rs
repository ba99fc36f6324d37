//! Where the console's CPU work runs: one thread of its own at the lowest
//! scheduling priority (nice 19). Building a page over 10,000 clients is
//! milliseconds of CPU; on this thread it takes only what the daemon's
//! other threads leave, so admissions and backups never wait for a page,
//! and however many pages are asked for, the console takes at most one
//! core. The queue is bounded: past [`QUEUE`] jobs, a page answers 503.

use super::WebError;
use std::sync::OnceLock;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use tokio::sync::oneshot;
use tracing::warn;

/// Jobs waiting at most.
pub const QUEUE: usize = 64;
/// The console thread's nice value.
pub const NICE: i32 = 19;

type Job = Box<dyn FnOnce() + Send>;

fn sender() -> &'static SyncSender<Job> {
    static TX: OnceLock<SyncSender<Job>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        std::thread::Builder::new()
            .name("tollgate-console".into())
            .spawn(move || {
                // Per thread on Linux: PRIO_PROCESS with a thread id.
                if let Err(e) =
                    rustix::process::setpriority_process(Some(rustix::thread::gettid()), NICE)
                {
                    warn!(error = %e, "cannot lower the console thread's priority");
                }
                for job in rx {
                    // A panicking page must not take the thread with it.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .expect("spawning the console thread");
        tx
    })
}

/// Runs `f` on the console thread and waits for its result.
pub async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, WebError> {
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    match sender().try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => return Err(WebError::Busy),
        Err(TrySendError::Disconnected(_)) => return Err(WebError::Busy),
    }
    // A panic drops the sender: the page fails, the daemon does not.
    rx.await.map_err(|_| WebError::Busy)
}
