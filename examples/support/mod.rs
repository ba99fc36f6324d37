//! Shared by the tools in `examples/`: start the release daemon on a config
//! and read the address and certificate pin it prints; open framed TLS
//! connections to it; upload a file as a client would; read a process's
//! CPU time and resident memory from /proc.
#![allow(dead_code)] // each tool uses part of this

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;
use tollgate::wire::{Frame, FrameCodec, Kind};

/// Where the tools connect, and how.
pub struct Target {
    pub addr: String,
    pub tls: Arc<rustls::ClientConfig>,
}

/// A framed TLS connection to the daemon.
pub type Conn = Framed<tokio_rustls::client::TlsStream<TcpStream>, FrameCodec>;

/// Opens a TLS connection to `t`, before HELLO.
pub async fn connect(t: &Target) -> Conn {
    let tcp = TcpStream::connect(&t.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let s = TlsConnector::from(t.tls.clone())
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    Framed::new(s, FrameCodec::new(16 << 20))
}

/// A frame with a JSON body.
pub fn j(kind: Kind, v: serde_json::Value) -> Frame {
    Frame {
        kind,
        payload: Bytes::from(v.to_string()),
    }
}

/// Starts `target/release/tollgate serve --config CONFIG` (or the binary
/// `TOLLGATE_BIN` names: CI's smoke run uses the debug build); returns the
/// process, its listening address and its certificate pin.
pub fn start_release_daemon(config: &Path) -> (Child, String, String) {
    start_release_daemon_with(config, &[])
}

/// [`start_release_daemon`] with more `serve` arguments (`--node NAME`).
pub fn start_release_daemon_with(config: &Path, args: &[&str]) -> (Child, String, String) {
    let s = start_daemon(config, args);
    (s.child, s.addr, s.pin)
}

/// A daemon started by [`start_daemon`].
pub struct Started {
    pub child: Child,
    pub addr: String,
    pub pin: String,
    /// The web console's address, when `[server.web]` is set.
    pub console: Option<String>,
}

/// Starts the daemon and reads every address it prints.
pub fn start_daemon(config: &Path, args: &[&str]) -> Started {
    let bin = std::env::var("TOLLGATE_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/tollgate").to_string()
    });
    let bin = bin.as_str();
    let mut daemon = Command::new(bin)
        .args(["serve", "--config"])
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{bin}: {e} (run `cargo build --release` first)"));
    let mut lines = BufReader::new(daemon.stdout.take().unwrap()).lines();
    let (mut pin, mut addr, mut console) = (String::new(), String::new(), None);
    while addr.is_empty() {
        let line = lines.next().expect("the daemon exited").unwrap();
        if let Some(p) = line.strip_prefix("tollgate: certificate ") {
            pin = p.into();
        }
        if let Some(a) = line.strip_prefix("tollgate: console on ") {
            console = Some(a.to_string());
        }
        if let Some(a) = line.strip_prefix("tollgate: listening on ") {
            addr = a.into();
        }
    }
    // Keep draining stdout so the daemon never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    Started {
        child: daemon,
        addr,
        pin,
        console,
    }
}

/// Uploads `size` bytes in 64 KiB frames; bytes per second, PUT to STORED.
pub async fn upload(mut c: Conn, size: u64) -> Result<f64, String> {
    let frame = 64 << 10;
    let chunk = Bytes::from(vec![0xA5u8; frame as usize]);
    let digest = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let mut n = 0;
        while n < size {
            let k = frame.min(size - n);
            h.update(&chunk[..k as usize]);
            n += k;
        }
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let e = |e: std::io::Error| e.to_string();
    let t0 = Instant::now();
    c.send(j(Kind::Put, json!({"path": "bench.bin", "size": size})))
        .await
        .map_err(e)?;
    let mut n = 0;
    while n < size {
        let k = frame.min(size - n);
        c.send(Frame {
            kind: Kind::Data,
            payload: chunk.slice(..k as usize),
        })
        .await
        .map_err(e)?;
        n += k;
    }
    c.send(j(Kind::End, json!({"sha256": digest})))
        .await
        .map_err(e)?;
    expect(&mut c, Kind::Stored).await?;
    Ok(size as f64 / t0.elapsed().as_secs_f64())
}

/// The next frame, which must be of `kind`; anything else, as a message.
pub async fn expect(c: &mut Conn, kind: Kind) -> Result<Frame, String> {
    match c.next().await {
        Some(Ok(f)) if f.kind == kind => Ok(f),
        Some(Ok(f)) => Err(format!(
            "{:?}: {}",
            f.kind,
            String::from_utf8_lossy(&f.payload)
        )),
        Some(Err(e)) => Err(e.to_string()),
        None => Err(format!("closed before {kind:?}")),
    }
}

/// User + system CPU seconds of `pids`.
pub fn cpu(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|s| stat_cpu(&s))
        .sum()
}

/// User + system CPU seconds in a `/proc/…/stat` line (of a process or a
/// thread); 0 when it cannot be read.
pub fn stat_cpu(stat: &str) -> f64 {
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (n(11) + n(12)) as f64 / 100.0
}

/// Resident memory of `pids`, in KiB.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

/// Connects and says HELLO; the connection once WELCOMEd.
pub async fn hello(t: &Target, id: &str, customer: &str) -> Result<Conn, String> {
    let mut c = tokio::time::timeout(Duration::from_secs(120), connect(t))
        .await
        .map_err(|_| "connect timed out".to_string())?;
    c.send(j(
        Kind::Hello,
        json!({"protocol": 1, "client_id": id, "customer": customer, "schedule": "bench"}),
    ))
    .await
    .map_err(|e| e.to_string())?;
    expect(&mut c, Kind::Welcome).await?;
    Ok(c)
}
