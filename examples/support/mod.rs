//! Shared by the tools in `examples/`: start the release daemon on a config
//! and read the address and certificate pin it prints; open framed TLS
//! connections to it.

use bytes::Bytes;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
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
    let bin = std::env::var("TOLLGATE_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/tollgate").to_string()
    });
    let bin = bin.as_str();
    let mut daemon = Command::new(bin)
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{bin}: {e} (run `cargo build --release` first)"));
    let mut lines = BufReader::new(daemon.stdout.take().unwrap()).lines();
    let (mut pin, mut addr) = (String::new(), String::new());
    while addr.is_empty() {
        let line = lines.next().expect("the daemon exited").unwrap();
        if let Some(p) = line.strip_prefix("tollgate: certificate ") {
            pin = p.into();
        }
        if let Some(a) = line.strip_prefix("tollgate: listening on ") {
            addr = a.into();
        }
    }
    // Keep draining stdout so the daemon never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    (daemon, addr, pin)
}
