//! The reference client (CLI.md `tollgate client …`): connect over TLS,
//! HELLO, keep the issued secret, and upload (pipelined), list, restore and
//! delete files. Tests use it as any third-party client would.

use crate::wire::{self, ErrorBody, Frame, FrameCodec, Kind};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;

/// Largest frame the client accepts from a server.
pub const CLIENT_MAX_FRAME: u32 = 16 << 20;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused the HELLO.
    #[error("refused: {code}: {message}{}", retry_after.map(|s| format!(" (retry after {s} s)")).unwrap_or_default())]
    Rejected {
        /// REJECT code.
        code: String,
        /// REJECT message.
        message: String,
        /// With `rate_limited`: seconds to wait before trying again.
        retry_after: Option<u64>,
    },
    /// The server answered a request with ERROR.
    #[error("error: {code}: {message}")]
    Server {
        /// ERROR code.
        code: String,
        /// ERROR message.
        message: String,
    },
    /// The server ended the session.
    #[error("the server ended the session ({0})")]
    Bye(String),
    /// The server said something out of protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Network or file trouble.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// TLS setup.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The server's certificate is not the pinned one.
    #[error("{0}")]
    Pin(crate::tls::PinMismatch),
}

impl ClientError {
    /// The REJECT or ERROR code, if the server gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Rejected { code, .. } | ClientError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// How to reach the server and who we are.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// HOST:PORT.
    pub server: String,
    /// Client id.
    pub id: String,
    /// Schedule name.
    pub schedule: String,
    /// `sha256:<hex>` of the server certificate.
    pub pin: Option<String>,
    /// CA file to verify the server with.
    pub ca: Option<PathBuf>,
    /// Customer to register under.
    pub customer: Option<String>,
    /// Enrollment key.
    pub enroll_key: Option<String>,
    /// desktop, laptop or server.
    pub kind: Option<String>,
    /// Where the secret is kept (mode 0600).
    pub secret_file: PathBuf,
    /// backup or restore.
    pub intent: Option<String>,
}

/// The default secret file: `~/.config/tollgate/<ID>.secret`.
pub fn default_secret_file(id: &str) -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".config/tollgate").join(format!("{id}.secret"))
}

type Conn = Framed<TlsStream<TcpStream>, FrameCodec>;

/// An admitted session.
pub struct Session {
    conn: Conn,
    /// The server's WELCOME.
    pub welcome: wire::Welcome,
}

fn server_error(f: &Frame) -> ClientError {
    match wire::parse::<ErrorBody>(&f.payload) {
        Ok(e) => ClientError::Server {
            code: e.code,
            message: e.message,
        },
        Err(e) => ClientError::Protocol(format!("unreadable ERROR: {e}")),
    }
}

async fn next(conn: &mut Conn) -> Result<Frame, ClientError> {
    match conn.next().await {
        Some(Ok(f)) if f.kind == Kind::Error => Err(server_error(&f)),
        Some(Ok(f)) if f.kind == Kind::Bye => {
            let b: wire::Bye = wire::parse(&f.payload).unwrap_or_default();
            Err(ClientError::Bye(
                b.reason.unwrap_or_else(|| "no reason".into()),
            ))
        }
        Some(Ok(f)) => Ok(f),
        Some(Err(e)) => Err(ClientError::Protocol(e.to_string())),
        None => Err(ClientError::Protocol(
            "the server closed the connection".into(),
        )),
    }
}

fn expect<T: serde::de::DeserializeOwned>(f: &Frame, kind: Kind) -> Result<T, ClientError> {
    if f.kind != kind {
        return Err(ClientError::Protocol(format!(
            "expected {kind:?}, got {:?}",
            f.kind
        )));
    }
    wire::parse(&f.payload).map_err(ClientError::Protocol)
}

/// One file to upload.
#[derive(Debug, Clone, Default)]
pub struct Upload {
    /// Where it is read from.
    pub local: PathBuf,
    /// Its path on the server.
    pub remote: String,
    /// Its permission bits, sent as PUT's `mode`.
    pub mode: Option<u32>,
    /// Its modification time (RFC 3339), sent as PUT's `mtime`.
    pub mtime: Option<String>,
}

impl Upload {
    /// `local` stored as `remote`, with the file's own mode and mtime.
    pub fn new(local: PathBuf, remote: String) -> std::io::Result<Upload> {
        let meta = std::fs::metadata(&local)?;
        Ok(Upload {
            mode: Some(mode_of(&meta)),
            mtime: mtime_of(&meta),
            local,
            remote,
        })
    }
}

fn mode_of(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & wire::MAX_MODE
}

fn mtime_of(meta: &std::fs::Metadata) -> Option<String> {
    let t = meta.modified().ok()?;
    jiff::Timestamp::try_from(t).ok().map(|t| t.to_string())
}

/// The path a local file is stored under, as tar names it: the path as
/// given, without a leading `/`, `.` components dropped. A path with `..`
/// is made absolute first, so nothing is stored above its root.
pub fn remote_name(p: &Path) -> std::io::Result<String> {
    use std::path::Component;
    let p = if p.components().any(|c| c == Component::ParentDir) {
        std::path::absolute(p)?
            .components()
            .fold(PathBuf::new(), |mut acc, c| {
                match c {
                    Component::ParentDir => {
                        acc.pop();
                    }
                    other => acc.push(other),
                }
                acc
            })
    } else {
        p.to_path_buf()
    };
    let parts: Vec<String> = p
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    Ok(parts.join("/"))
}

/// Collects the files under `paths` (recursively). Each keeps its full
/// path as given, as tar does ([`remote_name`]), so two folders with the
/// same name in different places never collide.
pub fn collect(paths: &[PathBuf]) -> std::io::Result<Vec<Upload>> {
    fn walk(dir: &Path, out: &mut Vec<Upload>) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() {
                walk(&p, out)?;
            } else if ft.is_file() {
                out.push(Upload::new(p.clone(), remote_name(&p)?)?);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if std::fs::metadata(p)?.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(Upload::new(p.clone(), remote_name(p)?)?);
        }
    }
    Ok(out)
}

/// Sets a restored file's mode and modification time from what the
/// server kept (FILE's `mode` and `mtime`), where it kept them.
pub fn apply_meta(path: &Path, mode: Option<u32>, mtime: Option<&str>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(t) = mtime.and_then(|t| t.parse::<jiff::Timestamp>().ok()) {
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        let since = std::time::Duration::new(
            t.as_second().unsigned_abs(),
            t.subsec_nanosecond().unsigned_abs(),
        );
        let when = if t.as_second() >= 0 {
            std::time::UNIX_EPOCH + since
        } else {
            std::time::UNIX_EPOCH - since
        };
        f.set_modified(when)?;
    }
    if let Some(m) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m & wire::MAX_MODE))?;
    }
    Ok(())
}

/// A failed handshake because the certificate is not the pinned one
/// becomes [`ClientError::Pin`], whose text says so plainly.
fn pin_mismatch(e: std::io::Error) -> ClientError {
    let pin = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|r| match r {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
                o.0.downcast_ref::<crate::tls::PinMismatch>().cloned()
            }
            _ => None,
        });
    match pin {
        Some(p) => ClientError::Pin(p),
        None => ClientError::Io(e),
    }
}

/// The send buffer the client asks the kernel for. Progress counts bytes
/// that left for the socket; a small buffer keeps that close to what the
/// server has taken, which a throttled upload takes slowly.
pub const SEND_BUFFER: u32 = 256 << 10;

/// Connects to HOST:PORT with a [`SEND_BUFFER`]-sized send buffer, trying
/// each address the name resolves to.
async fn connect_tcp(server: &str) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host(server).await? {
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        let _ = sock.set_send_buffer_size(SEND_BUFFER);
        match sock.connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{server} resolves to no address"),
        )
    }))
}

impl Session {
    /// Connects, says HELLO, and stores an issued secret.
    pub async fn connect(o: &Options) -> Result<Session, ClientError> {
        let tls = crate::tls::client_config(o.pin.as_deref(), o.ca.as_deref())?;
        let host = o
            .server
            .rsplit_once(':')
            .map_or(o.server.as_str(), |(h, _)| h)
            .trim_matches(['[', ']']);
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| ClientError::Protocol(format!("server name {host:?}: {e}")))?;
        let tcp = connect_tcp(&o.server).await?;
        tcp.set_nodelay(true)?;
        let stream = TlsConnector::from(Arc::clone(&tls))
            .connect(name, tcp)
            .await
            .map_err(pin_mismatch)?;
        let mut conn = Framed::new(stream, FrameCodec::new(CLIENT_MAX_FRAME));
        let secret = std::fs::read_to_string(&o.secret_file)
            .ok()
            .map(|s| s.trim().to_string());
        let hello = wire::HelloOut {
            protocol: 1,
            client_id: &o.id,
            secret: secret.as_deref(),
            customer: o.customer.as_deref(),
            enroll_key: o.enroll_key.as_deref(),
            kind: o.kind.as_deref(),
            hostname: None,
            schedule: &o.schedule,
            intent: o.intent.as_deref(),
        };
        conn.send(Frame::json(Kind::Hello, &hello)).await?;
        let f = match conn.next().await {
            Some(Ok(f)) => f,
            Some(Err(e)) => return Err(ClientError::Protocol(e.to_string())),
            None => {
                return Err(ClientError::Protocol(
                    "the server closed the connection before answering HELLO".into(),
                ));
            }
        };
        match f.kind {
            Kind::Reject => {
                let r: wire::Reject = wire::parse(&f.payload).map_err(ClientError::Protocol)?;
                Err(ClientError::Rejected {
                    code: r.code,
                    message: r.message,
                    retry_after: r.retry_after,
                })
            }
            Kind::Error => Err(server_error(&f)),
            Kind::Welcome => {
                let welcome: wire::Welcome =
                    wire::parse(&f.payload).map_err(ClientError::Protocol)?;
                if let Some(s) = &welcome.secret {
                    if let Some(dir) = o.secret_file.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    crate::tls::write_private(&o.secret_file, s.as_bytes())?;
                }
                Ok(Session { conn, welcome })
            }
            other => Err(ClientError::Protocol(format!(
                "expected WELCOME, got {other:?}"
            ))),
        }
    }

    /// Uploads `files` pipelined: all requests are sent while replies are
    /// read. Returns one result per file, in order; `progress` sees bytes
    /// once they have left for the socket (each DATA frame is flushed), not
    /// when they are queued, so a throttled upload shows its real pace.
    pub async fn upload(
        &mut self,
        files: &[Upload],
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Vec<Result<wire::FileInfo, ClientError>>, ClientError> {
        let chunk = self.welcome.max_frame as usize;
        let (mut sink, mut stream) = (&mut self.conn).split();
        let writer = async {
            for f in files {
                let mut file = tokio::fs::File::open(&f.local).await?;
                let size = file.metadata().await?.len();
                sink.feed(Frame::json(
                    Kind::Put,
                    &wire::Put {
                        path: f.remote.clone(),
                        size,
                        mode: f.mode,
                        mtime: f.mtime.clone(),
                    },
                ))
                .await?;
                let mut h = Sha256::new();
                let mut sent = 0u64;
                while sent < size {
                    let mut buf = vec![0u8; chunk.min((size - sent) as usize)];
                    file.read_exact(&mut buf).await?;
                    h.update(&buf);
                    let n = buf.len() as u64;
                    sent += n;
                    sink.send(Frame {
                        kind: Kind::Data,
                        payload: Bytes::from(buf),
                    })
                    .await?;
                    progress(n);
                }
                let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
                sink.feed(Frame::json(Kind::End, &wire::End { sha256 }))
                    .await?;
            }
            sink.flush().await?;
            Ok::<_, std::io::Error>(())
        };
        let reader = async {
            let mut results = Vec::with_capacity(files.len());
            while results.len() < files.len() {
                match stream.next().await {
                    Some(Ok(f)) if f.kind == Kind::Stored => results.push(
                        wire::parse::<wire::FileInfo>(&f.payload).map_err(ClientError::Protocol),
                    ),
                    Some(Ok(f)) if f.kind == Kind::Error => {
                        let e = server_error(&f);
                        let fatal = wire::parse::<ErrorBody>(&f.payload)
                            .map(|b| b.fatal)
                            .unwrap_or(true);
                        results.push(Err(e));
                        if fatal {
                            break;
                        }
                    }
                    Some(Ok(f)) if f.kind == Kind::Bye => {
                        let b: wire::Bye = wire::parse(&f.payload).unwrap_or_default();
                        return Err(ClientError::Bye(b.reason.unwrap_or_default()));
                    }
                    Some(Ok(f)) => {
                        return Err(ClientError::Protocol(format!(
                            "unexpected {:?} during upload",
                            f.kind
                        )));
                    }
                    Some(Err(e)) => return Err(ClientError::Protocol(e.to_string())),
                    None => {
                        return Err(ClientError::Protocol(
                            "the server closed the connection".into(),
                        ));
                    }
                }
            }
            Ok(results)
        };
        let (w, r) = tokio::join!(writer, reader);
        let results = r?;
        w?;
        Ok(results)
    }

    /// Every stored file under `prefix`, across LISTING pages.
    pub async fn list(&mut self, prefix: Option<&str>) -> Result<Vec<wire::Entry>, ClientError> {
        self.conn
            .send(Frame::json(
                Kind::List,
                &wire::List {
                    prefix: prefix.map(str::to_string),
                },
            ))
            .await?;
        let mut all = Vec::new();
        loop {
            let f = next(&mut self.conn).await?;
            let page: wire::Listing = expect(&f, Kind::Listing)?;
            all.extend(page.entries);
            if !page.more {
                return Ok(all);
            }
        }
    }

    /// Downloads `path` into `dest` (written to a temporary name, verified,
    /// then renamed). Returns its size.
    pub async fn get(&mut self, path: &str, dest: &Path) -> Result<u64, ClientError> {
        self.conn
            .send(Frame::json(
                Kind::Get,
                &wire::PathOnly { path: path.into() },
            ))
            .await?;
        let info: wire::FileInfo = expect(&next(&mut self.conn).await?, Kind::File)?;
        if let Some(d) = dest.parent() {
            tokio::fs::create_dir_all(d).await?;
        }
        let tmp = dest.with_extension("tollgate-part");
        let mut out = tokio::fs::File::create(&tmp).await?;
        let mut h = Sha256::new();
        let mut got = 0u64;
        loop {
            let f = next(&mut self.conn).await?;
            match f.kind {
                Kind::Data => {
                    h.update(&f.payload);
                    got += f.payload.len() as u64;
                    out.write_all(&f.payload).await?;
                }
                Kind::End => {
                    let end: wire::End = wire::parse(&f.payload).map_err(ClientError::Protocol)?;
                    let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
                    if got != info.size || digest != end.sha256 || digest != info.sha256 {
                        let _ = tokio::fs::remove_file(&tmp).await;
                        return Err(ClientError::Protocol(format!(
                            "{path}: the download does not match its size or SHA-256"
                        )));
                    }
                    out.sync_all().await?;
                    drop(out);
                    apply_meta(&tmp, info.mode, info.mtime.as_deref())?;
                    tokio::fs::rename(&tmp, dest).await?;
                    return Ok(got);
                }
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected {other:?} during download"
                    )));
                }
            }
        }
    }

    /// Deletes `path`; returns the bytes freed.
    pub async fn delete(&mut self, path: &str) -> Result<u64, ClientError> {
        self.conn
            .send(Frame::json(
                Kind::Delete,
                &wire::PathOnly { path: path.into() },
            ))
            .await?;
        let d: wire::Deleted = expect(&next(&mut self.conn).await?, Kind::Deleted)?;
        Ok(d.freed)
    }

    /// Says BYE and waits for the server's.
    pub async fn bye(mut self) -> Result<(), ClientError> {
        self.conn
            .send(Frame::json(Kind::Bye, &wire::Bye::default()))
            .await?;
        match self.conn.next().await {
            Some(Ok(f)) if f.kind == Kind::Bye => Ok(()),
            Some(Ok(f)) => Err(ClientError::Protocol(format!(
                "expected BYE, got {:?}",
                f.kind
            ))),
            _ => Ok(()),
        }
    }
}
