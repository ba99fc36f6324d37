//! The session's phases in-process, over `tokio::io::duplex`, on tokio's
//! paused clock, against a real SQLite state in a temp dir.
//!
//! Time moves only when a test calls `advance`: a task that keeps yielding
//! ([`hold_the_clock`]) stops tokio from auto-advancing the paused clock
//! while the database's own threads work, which would fire timeouts that
//! real time never reaches. A test advances only at a point it has
//! observed: the session's stream reports whether its last read or write
//! is pending ([`Probe`]), so "the session waits for a frame" and "the
//! peer stopped reading" are states to wait for, not sleeps.

use super::*;
use crate::server::{Context, Notice, Phase};
use crate::state::State;
use bytes::Bytes;
use futures_util::FutureExt;
use serde_json::json;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::sync::watch;
use tokio::time::advance;

const IDLE: Duration = Duration::from_secs(60);
const HELLO: Duration = Duration::from_secs(10);
/// Real time a test waits at most for something to happen.
const REAL_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps the runtime busy so the paused clock never auto-advances.
fn hold_the_clock() -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async {
        loop {
            tokio::task::yield_now().await;
        }
    }))
}

/// The server's end of a duplex, telling whether its last read and its
/// last write were pending.
struct Probe {
    inner: DuplexStream,
    reading: Arc<AtomicBool>,
    writing: Arc<AtomicBool>,
}

impl AsyncRead for Probe {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.reading.store(r.is_pending(), Ordering::SeqCst);
        r
    }
}

impl AsyncWrite for Probe {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.writing.store(r.is_pending(), Ordering::SeqCst);
        r
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct Harness {
    ctx: Arc<Context>,
    phase: watch::Sender<Phase>,
    dir: tempfile::TempDir,
    _clock: AbortOnDrop,
}

fn config_text(server_keys: &str, tables: &str, acme_active: bool) -> String {
    format!(
        r#"
[server]
state = "sqlite://state/state.db"
timezone = "UTC"
idle_timeout = "60s"
hello_timeout = "10s"
max_frame = "4 KiB"
{server_keys}
{tables}

[default_customer]
auto_add_clients = true
backup_location = "./backup/default"

[[reseller]]
name = "r"

[[customer]]
name = "Acme"
reseller = "r"
email = "it@acme.example"
backup_location = "./backup/acme"
auto_add_clients = true
activated = {acme_active}
"#
    )
}

async fn harness(server_keys: &str, tables: &str) -> Harness {
    let clock = hold_the_clock();
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("tollgate.toml");
    let cfg = Config::from_str(&config_text(server_keys, tables, true), &path)
        .unwrap_or_else(|e| panic!("{e:?}"));
    let state = State::open(&cfg).await.unwrap();
    let tls = crate::tls::server_tls(&cfg).unwrap().config;
    let (phase, rx) = watch::channel(Phase::Running);
    let ctx = Arc::new(Context::new(Arc::new(cfg), state, tls, rx));
    Harness {
        ctx,
        phase,
        dir,
        _clock: clock,
    }
}

impl Harness {
    /// Swaps in the config with Acme deactivated and tells the sessions,
    /// as a reload does.
    fn deactivate_acme(&self) {
        let cfg = Config::from_str(
            &config_text("", "", false),
            &self.dir.path().join("tollgate.toml"),
        )
        .unwrap();
        self.ctx.cfg.store(Arc::new(cfg));
        self.ctx.notify_all(Notice::Reloaded);
    }
}

/// A client connected to a session task.
struct Peer {
    conn: Framed<DuplexStream, FrameCodec>,
    task: tokio::task::JoinHandle<Option<String>>,
    reading: Arc<AtomicBool>,
    writing: Arc<AtomicBool>,
}

fn connect(h: &Harness, capacity: usize) -> Peer {
    let (client, server) = tokio::io::duplex(capacity);
    let (reading, writing) = (Arc::default(), Arc::default());
    let probe = Probe {
        inner: server,
        reading: Arc::clone(&reading),
        writing: Arc::clone(&writing),
    };
    let acc = Accepted {
        peer: "192.0.2.10:5555".parse().unwrap(),
        handshake: None,
        source: None,
        deadline: Instant::now() + HELLO,
    };
    Peer {
        conn: Framed::new(client, FrameCodec::new(16 << 20)),
        task: tokio::spawn(connection(h.ctx.clone(), probe, acc, None)),
        reading,
        writing,
    }
}

/// Waits (in real time, the clock held) until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(t0.elapsed() < REAL_LIMIT, "never happened: {what}");
        tokio::task::yield_now().await;
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

/// Lets every runnable task run (no time passes).
async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

fn json_frame(kind: Kind, v: serde_json::Value) -> Frame {
    Frame {
        kind,
        payload: Bytes::from(v.to_string()),
    }
}

impl Peer {
    async fn send(&mut self, f: Frame) {
        self.conn.send(f).await.unwrap();
    }

    /// The next frame, waiting in real time (the clock held).
    async fn recv(&mut self) -> Frame {
        let t0 = std::time::Instant::now();
        loop {
            if let Some(r) = self.conn.next().now_or_never() {
                return r
                    .expect("a frame, not the end")
                    .expect("a well-formed frame");
            }
            assert!(t0.elapsed() < REAL_LIMIT, "no frame arrived");
            tokio::task::yield_now().await;
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    /// A frame if one is there now.
    fn try_recv(&mut self) -> Option<Frame> {
        self.conn
            .next()
            .now_or_never()
            .flatten()
            .map(|r| r.unwrap())
    }

    async fn body<T: serde::de::DeserializeOwned>(&mut self, kind: Kind) -> T {
        let f = self.recv().await;
        assert_eq!(f.kind, kind, "{:?}", String::from_utf8_lossy(&f.payload));
        wire::parse(&f.payload).unwrap()
    }

    /// HELLO, then WELCOME; returns the issued secret, if any.
    async fn hello(&mut self, extra: serde_json::Value) -> wire::Welcome {
        let mut h = json!({"protocol": 1, "client_id": "PC", "schedule": "nightly"});
        for (k, v) in extra.as_object().unwrap() {
            h[k] = v.clone();
        }
        self.send(json_frame(Kind::Hello, h)).await;
        self.body(Kind::Welcome).await
    }

    /// The session's result, once it has ended (in real time).
    async fn result(self) -> Option<String> {
        let t0 = std::time::Instant::now();
        while !self.task.is_finished() {
            assert!(t0.elapsed() < REAL_LIMIT, "the session did not end");
            tokio::task::yield_now().await;
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        self.task.await.unwrap()
    }

    async fn upload(&mut self, path: &str, data: &[u8]) {
        self.send(json_frame(
            Kind::Put,
            json!({"path": path, "size": data.len()}),
        ))
        .await;
        for c in data.chunks(4096) {
            self.send(Frame {
                kind: Kind::Data,
                payload: Bytes::copy_from_slice(c),
            })
            .await;
        }
        let sha = crate::storage::sha256_hex(data);
        self.send(json_frame(Kind::End, json!({"sha256": sha})))
            .await;
    }
}

fn reject_code(f: &Frame) -> wire::Reject {
    assert_eq!(
        f.kind,
        Kind::Reject,
        "{:?}",
        String::from_utf8_lossy(&f.payload)
    );
    wire::parse(&f.payload).unwrap()
}

fn error_code(f: &Frame) -> ErrorBody {
    assert_eq!(
        f.kind,
        Kind::Error,
        "{:?}",
        String::from_utf8_lossy(&f.payload)
    );
    wire::parse(&f.payload).unwrap()
}

#[tokio::test(start_paused = true)]
async fn no_hello_is_refused_at_hello_timeout_not_before() {
    let h = harness("", "").await;
    let mut p = connect(&h, 64 << 10);
    until("the session waits for HELLO", || {
        p.reading.load(Ordering::SeqCst)
    })
    .await;
    advance(HELLO - Duration::from_millis(1)).await;
    settle().await;
    assert!(p.try_recv().is_none(), "refused early");
    advance(Duration::from_millis(1)).await;
    let f = p.recv().await;
    assert_eq!(reject_code(&f).code, "timeout");
    assert_eq!(p.result().await, None);
    // Recorded (the daemon writes noted refusals once a second).
    assert_eq!(h.ctx.state.flush_refusals().await.unwrap(), 1);
}

/// PROTOCOL.md Additions: until WELCOME a frame may be `hello_max_frame`
/// (16 KiB) and no more; the length alone decides, before a byte of the
/// payload is read or allocated.
#[tokio::test(start_paused = true)]
async fn frames_before_welcome_are_bounded_by_hello_max_frame() {
    let h = harness("", "").await;
    // One byte over: refused on the header alone, with no payload sent.
    let mut p = connect(&h, 64 << 10);
    let over = (16u32 << 10) + 2;
    let mut header = over.to_be_bytes().to_vec();
    header.push(Kind::Hello as u8);
    p.conn.get_mut().write_all(&header).await.unwrap();
    let e = error_code(&p.recv().await);
    assert_eq!((e.code.as_str(), e.fatal), ("frame_too_large", true));
    assert_eq!(p.result().await, None);

    // Exactly at the limit: a padded HELLO of 16 KiB is read and admitted.
    let mut p = connect(&h, 64 << 10);
    let base =
        json!({"protocol": 1, "client_id": "PC", "schedule": "nightly", "pad": ""}).to_string();
    let pad = "x".repeat((16 << 10) - base.len());
    let hello = json!({"protocol": 1, "client_id": "PC", "schedule": "nightly", "pad": pad});
    assert_eq!(hello.to_string().len(), 16 << 10);
    p.send(json_frame(Kind::Hello, hello)).await;
    let w: wire::Welcome = p.body(Kind::Welcome).await;
    assert_eq!(w.max_frame, 4096, "after WELCOME, max_frame applies");
    p.send(json_frame(Kind::Bye, json!({}))).await;
    assert_eq!(p.recv().await.kind, Kind::Bye);
    assert_eq!(p.result().await.as_deref(), Some("ok"));
}

#[tokio::test(start_paused = true)]
async fn a_silent_session_ends_at_idle_timeout_not_before() {
    let h = harness("", "").await;
    let mut p = connect(&h, 64 << 10);
    p.hello(json!({})).await;
    until("the session waits for a request", || {
        p.reading.load(Ordering::SeqCst)
    })
    .await;
    advance(IDLE - Duration::from_millis(1)).await;
    settle().await;
    assert!(p.try_recv().is_none(), "ended early");
    advance(Duration::from_millis(1)).await;
    let bye: wire::Bye = p.body(Kind::Bye).await;
    assert_eq!(bye.reason.as_deref(), Some("idle_timeout"));
    assert_eq!(p.result().await.as_deref(), Some("idle_timeout"));
}

/// Uploads a 64 KiB file, GETs it, reads FILE and stops reading: the
/// session's sends block on a full stream.
async fn stalled_download(h: &Harness, hello: serde_json::Value) -> Peer {
    let mut p = connect(h, 8 << 10);
    p.hello(hello).await;
    let data: Vec<u8> = (0..64 << 10).map(|i| (i % 251) as u8).collect();
    p.upload("big.bin", &data).await;
    let stored: wire::FileInfo = p.body(Kind::Stored).await;
    assert_eq!(stored.size, 64 << 10);
    p.send(json_frame(Kind::Get, json!({"path": "big.bin"})))
        .await;
    // Read FILE byte-exactly, past the frame reader (whose buffer would
    // drain the stream): FILE and the first DATA fit the 8 KiB stream,
    // the second DATA's send blocks for good, and it is the only send in
    // flight from then on.
    assert!(p.conn.read_buffer().is_empty());
    let raw = p.conn.get_mut();
    let mut len = [0u8; 4];
    raw.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    raw.read_exact(&mut body).await.unwrap();
    assert_eq!(body[0], Kind::File as u8);
    let file: wire::FileInfo = wire::parse(&body[1..]).unwrap();
    assert_eq!(file.size, 64 << 10);
    until("the session's send blocks", || {
        p.writing.load(Ordering::SeqCst)
    })
    .await;
    p
}

/// A peer that stops reading during GET is cut after `idle_timeout`.
#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_is_cut_after_idle_timeout() {
    let h = harness("", "").await;
    let p = stalled_download(&h, json!({})).await;
    advance(IDLE - Duration::from_millis(1)).await;
    settle().await;
    assert!(!p.task.is_finished(), "cut early");
    advance(Duration::from_millis(1)).await;
    settle().await;
    // The BYE cannot leave either; it is given LAST_WORD.
    advance(LAST_WORD).await;
    assert_eq!(p.result().await.as_deref(), Some("idle_timeout"));
}

/// Deactivation, removal and a forced shutdown reach a session whose peer
/// stopped reading, at once (well within PROTOCOL.md's one second).
#[tokio::test(start_paused = true)]
async fn notices_reach_a_session_blocked_in_a_send() {
    for (name, want) in [
        ("deactivation", "customer_deactivated"),
        ("removal", "client_removed"),
        ("shutdown", "shutting_down"),
    ] {
        let h = harness("", "").await;
        let p = stalled_download(&h, json!({"customer": "Acme"})).await;
        let t0 = Instant::now();
        match name {
            "deactivation" => h.deactivate_acme(),
            "removal" => {
                h.ctx
                    .notify_all(Notice::Client(crate::state::ClientEvent::Removed));
            }
            _ => {
                h.phase.send(Phase::Forced).unwrap();
            }
        }
        settle().await;
        advance(LAST_WORD).await;
        assert_eq!(p.result().await.as_deref(), Some(want), "{name}");
        assert!(t0.elapsed() <= LAST_WORD, "{name}: {:?}", t0.elapsed());
    }
}

/// PROTOCOL.md Additions: the DATA discarded after an ERROR to a PUT is
/// read at the session's rate, and the session stays in step.
#[tokio::test(start_paused = true)]
async fn discarded_data_is_throttled_and_the_session_stays_in_step() {
    let h = harness("", "[server.throttle]\nrate = \"64 KiB/s\"").await;
    let mut p = connect(&h, 1 << 20);
    p.hello(json!({})).await;
    const N: usize = 256 << 10;
    p.send(json_frame(
        Kind::Put,
        json!({"path": "../escape", "size": N}),
    ))
    .await;
    for _ in 0..N / 4096 {
        p.send(Frame {
            kind: Kind::Data,
            payload: Bytes::from(vec![7u8; 4096]),
        })
        .await;
    }
    p.send(json_frame(Kind::End, json!({"sha256": "0".repeat(64)})))
        .await;
    p.send(json_frame(Kind::Bye, json!({}))).await;
    assert_eq!(error_code(&p.recv().await).code, "bad_path");
    let t0 = Instant::now();
    let step = Duration::from_millis(50);
    let bye = loop {
        settle().await;
        if let Some(f) = p.try_recv() {
            break f;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the discard never ended"
        );
        advance(step).await;
    };
    assert_eq!(
        bye.kind,
        Kind::Bye,
        "nothing answers the discarded DATA and END"
    );
    // 256 KiB at 64 KiB/s, less at most one burst (64 KiB) of credit.
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "discarded DATA beat the rate: {took:?}"
    );
    assert!(took <= Duration::from_secs(5), "{took:?}");
    assert_eq!(p.result().await.as_deref(), Some("ok"));
}

#[tokio::test(start_paused = true)]
async fn an_empty_data_frame_is_fatal() {
    let h = harness("", "").await;
    let mut p = connect(&h, 64 << 10);
    p.hello(json!({})).await;
    p.send(json_frame(Kind::Put, json!({"path": "a", "size": 1})))
        .await;
    p.send(Frame {
        kind: Kind::Data,
        payload: Bytes::new(),
    })
    .await;
    let e = error_code(&p.recv().await);
    assert_eq!((e.code.as_str(), e.fatal), ("protocol_violation", true));
    assert_eq!(p.result().await.as_deref(), Some("protocol_violation"));
    // The upload in flight was dropped with its reservation.
    let leftover = h.ctx.state.reserved_total().await.unwrap();
    assert_eq!(leftover, 0);
}

/// Requests sent all at once are answered in order, the failed one's DATA
/// and END swallowed.
#[tokio::test(start_paused = true)]
async fn pipelined_requests_are_answered_in_order() {
    let h = harness("", "").await;
    let mut p = connect(&h, 1 << 20);
    p.hello(json!({})).await;
    p.upload("a.txt", b"first").await;
    p.upload("/abs", b"refused").await;
    p.upload("c/d.txt", &[9u8; 10_000]).await;
    p.send(json_frame(Kind::List, json!({}))).await;
    p.send(json_frame(Kind::Bye, json!({}))).await;
    let a: wire::FileInfo = p.body(Kind::Stored).await;
    assert_eq!(a.path, "a.txt");
    assert_eq!(error_code(&p.recv().await).code, "bad_path");
    let c: wire::FileInfo = p.body(Kind::Stored).await;
    assert_eq!((c.path.as_str(), c.size), ("c/d.txt", 10_000));
    let l: wire::Listing = p.body(Kind::Listing).await;
    let paths: Vec<_> = l.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["a.txt", "c/d.txt"]);
    assert_eq!(p.recv().await.kind, Kind::Bye);
}

/// PROTOCOL.md Additions: file sizes.
#[tokio::test(start_paused = true)]
async fn put_sizes_are_bounded() {
    let h = harness("", "[server.limits]\nmax_file_size = \"1 MiB\"").await;
    let mut p = connect(&h, 64 << 10);
    p.hello(json!({})).await;
    for (size, want) in [
        (json!(1_048_577u64), "quota_exceeded"),
        (json!(9_223_372_036_854_775_808u64), "bad_request"),
        (json!(-1), "bad_request"),
        (json!(1.5), "bad_request"),
    ] {
        p.send(json_frame(Kind::Put, json!({"path": "f", "size": size})))
            .await;
        assert_eq!(error_code(&p.recv().await).code, want, "{size}");
    }
    p.upload("f", &[1u8; 1 << 20]).await;
    let ok: wire::FileInfo = p.body(Kind::Stored).await;
    assert_eq!(ok.size, 1 << 20, "exactly max_file_size fits");
}

/// PROTOCOL.md Additions: at most `max_sessions_per_client` sessions of
/// one client at once; REJECT `rate_limited` with `retry_after`, once the
/// client has proved who it is.
#[tokio::test(start_paused = true)]
async fn sessions_per_client_are_capped() {
    let h = harness("", "[server.limits]\nmax_sessions_per_client = 1").await;
    let mut first = connect(&h, 64 << 10);
    let secret = first.hello(json!({})).await.secret.unwrap();
    // A stranger's HELLO for the id is refused for what it is, never
    // `rate_limited`: the cap is checked after the client proved itself.
    let mut stranger = connect(&h, 64 << 10);
    stranger
        .send(json_frame(
            Kind::Hello,
            json!({"protocol": 1, "client_id": "PC", "schedule": "s"}),
        ))
        .await;
    assert_eq!(reject_code(&stranger.recv().await).code, "auth_failed");
    let mut second = connect(&h, 64 << 10);
    second
        .send(json_frame(
            Kind::Hello,
            json!({"protocol": 1, "client_id": "PC", "schedule": "s", "secret": secret}),
        ))
        .await;
    let r = reject_code(&second.recv().await);
    assert_eq!(
        (r.code.as_str(), r.retry_after),
        ("rate_limited", Some(SESSION_RETRY_AFTER))
    );
    first.send(json_frame(Kind::Bye, json!({}))).await;
    assert_eq!(first.recv().await.kind, Kind::Bye);
    first.result().await;
    let mut third = connect(&h, 64 << 10);
    let w = third.hello(json!({"secret": secret})).await;
    assert!(!w.registered, "the slot is free again");
}

/// DELETE removes the directories the file leaves empty, and no more.
#[tokio::test(start_paused = true)]
async fn delete_removes_the_directories_it_empties() {
    let h = harness("", "").await;
    let mut p = connect(&h, 1 << 20);
    p.hello(json!({})).await;
    p.upload("a/b/c/one.txt", b"1").await;
    p.upload("a/two.txt", b"2").await;
    for _ in 0..2 {
        let _: wire::FileInfo = p.body(Kind::Stored).await;
    }
    p.send(json_frame(Kind::Delete, json!({"path": "a/b/c/one.txt"})))
        .await;
    let d: wire::Deleted = p.body(Kind::Deleted).await;
    assert_eq!(d.freed, 1);
    let root = h.dir.path().join("backup/default/PC");
    assert!(!root.join("a/b").exists(), "a/b/c and a/b were emptied");
    assert!(root.join("a/two.txt").exists(), "a still holds a file");
    p.send(json_frame(Kind::Delete, json!({"path": "a/two.txt"})))
        .await;
    let _: wire::Deleted = p.body(Kind::Deleted).await;
    assert!(!root.join("a").exists());
    assert!(root.exists(), "the client's own directory stays");
}

/// PROTOCOL.md Additions, "File metadata": `mode` and `mtime` from PUT are
/// stored and returned in STORED, LISTING and FILE; `null` where a PUT had
/// none; a wrong one is `bad_request` naming the field.
#[tokio::test(start_paused = true)]
async fn file_metadata_is_kept_and_returned() {
    let h = harness("", "").await;
    let mut p = connect(&h, 1 << 20);
    p.hello(json!({})).await;
    let data = b"metadata".to_vec();
    let sha = crate::storage::sha256_hex(&data);
    let put = |path: &str, extra: serde_json::Value| {
        let mut v = json!({"path": path, "size": data.len()});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        json_frame(Kind::Put, v)
    };
    for (extra, want) in [
        (json!({"mode": 4096}), "`mode`"),
        (json!({"mode": "0644"}), "`mode`"),
        (json!({"mtime": "yesterday"}), "`mtime`"),
        (json!({"mtime": "x".repeat(100)}), "`mtime`"),
    ] {
        p.send(put("bad", extra.clone())).await;
        let e = error_code(&p.recv().await);
        assert_eq!(e.code, "bad_request", "{extra}");
        assert!(e.message.contains(want), "{extra}: {}", e.message);
    }
    p.send(put(
        "with",
        json!({"mode": 0o600, "mtime": "2026-01-02T03:04:05.123456789+01:00"}),
    ))
    .await;
    p.send(Frame {
        kind: Kind::Data,
        payload: Bytes::from(data.clone()),
    })
    .await;
    p.send(json_frame(Kind::End, json!({"sha256": sha}))).await;
    let stored: wire::FileInfo = p.body(Kind::Stored).await;
    assert_eq!(stored.mode, Some(0o600));
    assert_eq!(
        stored.mtime.as_deref(),
        Some("2026-01-02T02:04:05.123456789Z"),
        "kept in UTC"
    );
    p.upload("without", &data).await;
    let _: wire::FileInfo = p.body(Kind::Stored).await;
    p.send(json_frame(Kind::List, json!({}))).await;
    let f = p.recv().await;
    let raw: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
    let entries = raw["entries"].as_array().unwrap();
    assert_eq!(entries[0]["path"], "with");
    assert_eq!(entries[0]["mode"], 0o600);
    assert_eq!(entries[0]["mtime"], "2026-01-02T02:04:05.123456789Z");
    assert_eq!(entries[1]["path"], "without");
    assert!(
        entries[1]["mode"].is_null() && entries[1]["mtime"].is_null(),
        "{raw}"
    );
    p.send(json_frame(Kind::Get, json!({"path": "with"}))).await;
    let file: wire::FileInfo = p.body(Kind::File).await;
    assert_eq!(
        (file.mode, file.mtime.as_deref()),
        (Some(0o600), Some("2026-01-02T02:04:05.123456789Z"))
    );
}
