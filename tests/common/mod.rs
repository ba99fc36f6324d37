//! Starting the real daemon for integration tests: a temp dir, a config
//! that listens on port 0, and the address and certificate pin it prints.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;
use tollgate::client::Options;
use tollgate::wire::{Frame, FrameCodec, Kind};

pub struct Daemon {
    pub child: Option<Child>,
    pub addr: String,
    pub pin: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// `/metrics` and `/healthz`, when `metrics_listen` is set.
    pub metrics: Option<String>,
    /// Its log file's name in `dir`.
    pub log_name: String,
    /// The web console's address, when `[server.web]` is set.
    pub console: Option<String>,
}

/// The instant every test daemon and admin command starts its clock at
/// (`TOLLGATE_FAKE_NOW`), unless the test pins its own: a Wednesday in
/// mid-month at 10:00 UTC, far from any window edge, month end, weekend or
/// DST change, so no test passes or fails by the hour it runs at. The clock
/// runs on from there at the real pace.
pub const PINNED_NOW: &str = "2026-06-10T10:00:00Z";

/// `env` with `TOLLGATE_FAKE_NOW` added when it does not set it.
pub fn pinned<'a>(env: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v = env.to_vec();
    if !v.iter().any(|(k, _)| *k == "TOLLGATE_FAKE_NOW") {
        v.push(("TOLLGATE_FAKE_NOW", PINNED_NOW));
    }
    v
}

/// The config every test starts from; `body` follows `[server]`'s keys.
pub fn write_config(dir: &Path, server_extra: &str, body: &str) -> PathBuf {
    let path = dir.join("tollgate.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nstate = \"sqlite://state/state.db\"\ntimezone = \"UTC\"\n{server_extra}\n{body}"
        ),
    )
    .unwrap();
    path
}

impl Daemon {
    /// Starts `tollgate serve` on the config in `dir` and waits until it listens.
    pub fn start(dir: &Path) -> Daemon {
        Daemon::start_with_env(dir, &[])
    }

    /// Like [`Daemon::start`], with extra environment variables.
    pub fn start_with_env(dir: &Path, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with(dir, env, &[])
    }

    /// Like [`Daemon::start`], with extra environment and `serve` arguments.
    pub fn start_with(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Daemon {
        Daemon::start_logging(dir, env, args, "daemon.log")
    }

    /// One node of a cluster (`serve --node NODE`) on the config in `dir`,
    /// which its other nodes share; its log is `daemon-NODE.log`.
    pub fn start_node(dir: &Path, node: &str, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_logging(dir, env, &["--node", node], &format!("daemon-{node}.log"))
    }

    fn start_logging(dir: &Path, env: &[(&str, &str)], args: &[&str], log_name: &str) -> Daemon {
        let config = dir.join("tollgate.toml");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(log_name))
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config"])
            .arg(&config)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(pinned(env))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut pin = None;
        let mut addr = None;
        let mut metrics = None;
        let mut console = None;
        while addr.is_none() {
            let Some(Ok(line)) = lines.next() else {
                let log = std::fs::read_to_string(dir.join(log_name)).unwrap_or_default();
                panic!("the daemon exited before listening:\n{log}");
            };
            if let Some(p) = line.strip_prefix("tollgate: certificate ") {
                pin = Some(p.to_string());
            }
            if let Some(a) = line.strip_prefix("tollgate: metrics on ") {
                metrics = Some(a.to_string());
            }
            if let Some(a) = line.strip_prefix("tollgate: console on ") {
                console = Some(a.to_string());
            }
            if let Some(a) = line.strip_prefix("tollgate: listening on ") {
                addr = Some(a.to_string());
            }
        }
        // Keep draining stdout so the daemon never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Daemon {
            child: Some(child),
            addr: addr.unwrap(),
            pin: pin.unwrap(),
            dir: dir.to_path_buf(),
            config,
            metrics,
            log_name: log_name.to_string(),
            console,
        }
    }

    /// Client options for `id`, with its secret file in the temp dir.
    pub fn opts(&self, id: &str) -> Options {
        Options {
            server: self.addr.clone(),
            id: id.into(),
            schedule: "nightly".into(),
            pin: Some(self.pin.clone()),
            secret_file: self.dir.join("secrets").join(format!("{id}.secret")),
            ..Options::default()
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// SIGKILL, and wait for it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the daemon to exit by itself; returns its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let t0 = std::time::Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s.code();
            }
            if t0.elapsed() > limit {
                let _ = c.kill();
                panic!("the daemon did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(&self.log_name)).unwrap_or_default()
    }

    /// Resident memory of the daemon, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap()
    }

    /// A raw TLS connection speaking frames, before HELLO.
    pub async fn raw(&self) -> Framed<TlsStream<TcpStream>, FrameCodec> {
        Framed::new(self.tls().await, FrameCodec::new(16 << 20))
    }

    /// A raw TLS stream, for writing bytes that are not frames.
    pub async fn tls(&self) -> TlsStream<TcpStream> {
        let cfg = tollgate::tls::client_config(Some(&self.pin), None).unwrap();
        let tcp = TcpStream::connect(&self.addr).await.unwrap();
        TlsConnector::from(Arc::clone(&cfg))
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap()
    }

    /// A TLS stream from a chosen loopback source address (`127.0.0.x`), so
    /// one test can be several sources; the error when the daemon closes
    /// the connection before or during the handshake.
    pub async fn tls_from(&self, src: &str) -> std::io::Result<TlsStream<TcpStream>> {
        let cfg = tollgate::tls::client_config(Some(&self.pin), None).unwrap();
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(format!("{src}:0").parse().unwrap())?;
        let tcp = sock.connect(self.addr.parse().unwrap()).await?;
        tcp.set_nodelay(true)?;
        TlsConnector::from(Arc::clone(&cfg))
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
    }

    /// Frames over [`Daemon::tls_from`].
    pub async fn raw_from(
        &self,
        src: &str,
    ) -> std::io::Result<Framed<TlsStream<TcpStream>, FrameCodec>> {
        Ok(Framed::new(
            self.tls_from(src).await?,
            FrameCodec::new(16 << 20),
        ))
    }

    /// The size of the state database with its write-ahead log, in bytes.
    pub fn db_bytes(&self) -> u64 {
        ["state/state.db", "state/state.db-wal"]
            .iter()
            .filter_map(|f| std::fs::metadata(self.dir.join(f)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Opens the daemon's database read-only-ish for checks.
    pub async fn db(&self) -> sqlx::SqlitePool {
        sqlx::SqlitePool::connect(&format!(
            "sqlite://{}",
            self.dir.join("state/state.db").display()
        ))
        .await
        .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        archive_log(&self.dir, &self.log_name);
    }
}

/// Where every test daemon's log is kept after its temp dir is gone, with
/// the secrets that test used beside it; `.ci/check-log-secrets` greps the
/// logs of a whole run for them.
pub fn log_archive() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("daemon-logs")
}

fn archive_log(dir: &Path, log_name: &str) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let out = log_archive();
    let _ = std::fs::create_dir_all(&out);
    let name = format!(
        "{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        std::thread::current()
            .name()
            .unwrap_or("test")
            .replace("::", "-")
    );
    let _ = std::fs::copy(dir.join(log_name), out.join(format!("{name}.log")));
    // Secrets issued to clients, and every secret-looking value in the
    // config (argon2 hashes, passwords in URLs).
    let mut secrets = Vec::new();
    for d in [dir.join("secrets"), dir.to_path_buf()] {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "secret")
                && let Ok(s) = std::fs::read_to_string(e.path())
            {
                secrets.push(s.trim().to_string());
            }
        }
    }
    if let Ok(cfg) = std::fs::read_to_string(dir.join("tollgate.toml")) {
        for w in cfg.split(['"', '\'', ' ', '\n']) {
            if w.starts_with("$argon2") {
                secrets.push(w.to_string());
            }
            // A database password in a state URL.
            if let Ok(u) = url::Url::parse(w)
                && let Some(p) = u.password()
            {
                secrets.push(p.to_string());
            }
        }
    }
    secrets.extend(TEST_SECRETS.iter().map(|s| s.to_string()));
    secrets.retain(|s| s.len() >= 8);
    let _ = std::fs::write(out.join(format!("{name}.secrets")), secrets.join("\n"));
}

/// An argon2id PHC string of `secret`, as `tollgate hash-secret` prints it.
pub fn phc(secret: &str) -> String {
    use argon2::PasswordHasher;
    argon2::Argon2::default()
        .hash_password(secret.as_bytes())
        .unwrap()
        .to_string()
}

/// Plain secrets the tests type in (wrong secrets, enroll keys, passwords).
pub const TEST_SECRETS: &[&str] = &[
    "not-the-secret",
    "correct horse",
    "tg-enroll-key-0451",
    "tg-smtp-pass-0451",
    // Typed into the console's forms (tests/console*.rs).
    "tg-console-admin-0451",
    "tg-console-acme-0451",
    "tg-form-admin-0451",
    "tg-form-acme-0451",
    "tg-form-contoso-0451",
    "tg-form-enroll-0451",
    "same-0451",
];

/// `GET path` over plain HTTP/1.1; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    // Bodies may come chunked.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    (status, body)
}

/// Runs `tollgate ARGS --config CONFIG` with extra environment, asserts
/// that it exits 0, and returns its stdout.
pub fn admin_ok(config: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .arg("--config")
        .arg(config)
        .envs(pinned(env))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "tollgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Replaces the config the way `mv new.toml tollgate.toml` does.
pub fn replace_config(dir: &Path, text: &str) {
    let tmp = dir.join("tollgate.toml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("tollgate.toml")).unwrap();
}

/// Polls `f` every 20 ms until it is true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// Polls `f` every 20 ms until it is true or `limit` passes (async).
pub async fn until(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f().await
}

/// Refusals the daemon wrote, summed over their counts (it writes them
/// once a second).
pub async fn refusals(pool: &sqlx::SqlitePool, filter: &str) -> i64 {
    let sql = format!("SELECT COALESCE(SUM(count), 0) FROM refusals {filter}");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A HELLO frame from JSON text.
pub fn hello_json(json: &str) -> Frame {
    Frame {
        kind: Kind::Hello,
        payload: bytes::Bytes::from(json.to_string()),
    }
}

pub fn frame(kind: Kind, json: serde_json::Value) -> Frame {
    Frame {
        kind,
        payload: bytes::Bytes::from(json.to_string()),
    }
}

/// Raw bytes of a frame header with any length and type.
pub async fn write_raw(s: &mut TlsStream<TcpStream>, len: u32, ty: u8, payload: &[u8]) {
    let mut b = len.to_be_bytes().to_vec();
    b.push(ty);
    b.extend_from_slice(payload);
    s.write_all(&b).await.unwrap();
    s.flush().await.unwrap();
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `size` deterministic pseudo-random bytes to `path`.
pub fn make_file(path: &Path, size: usize, seed: u64) {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut data = Vec::with_capacity(size);
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(size);
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, data).unwrap();
}

/// A real SMTP server for the e-mail tests: aiosmtpd (`.ci/run` installs
/// it) storing every message in a maildir, with the envelope in the
/// `X-MailFrom` and `X-RcptTo` headers.
pub struct Smtp {
    child: Child,
    pub port: u16,
    pub maildir: PathBuf,
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Smtp {
    /// Starts aiosmtpd on `port` and waits until it answers.
    pub fn start(maildir: &Path, port: u16) -> Smtp {
        Smtp::start_with(maildir, port, &[])
    }

    /// Like [`Smtp::start`], with `tests/support/smtpd.py` options
    /// (`--starttls CERT KEY`, `--smtps CERT KEY`, `--auth USER:PASSWORD`).
    pub fn start_with(maildir: &Path, port: u16, extra: &[&str]) -> Smtp {
        let python = std::env::var("TOLLGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let err = maildir.with_extension("smtp.log");
        let implicit_tls = extra.contains(&"--smtps");
        let child = Command::new(&python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/support/smtpd.py"
            ))
            .args(["--port", &port.to_string(), "--maildir"])
            .arg(maildir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
        let mut s = Smtp {
            child,
            port,
            maildir: maildir.to_path_buf(),
        };
        let t0 = std::time::Instant::now();
        loop {
            if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::Read;
                if implicit_tls {
                    // The greeting is inside TLS: a connection is enough.
                    return s;
                }
                let mut greet = [0u8; 3];
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                if c.read_exact(&mut greet).is_ok() && &greet == b"220" {
                    return s;
                }
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!(
                    "aiosmtpd exited ({status}); is it installed (python3 -m pip install aiosmtpd)?\n{}",
                    std::fs::read_to_string(&err).unwrap_or_default()
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "aiosmtpd did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every message received so far, oldest first.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
        for sub in ["new", "cur"] {
            for e in std::fs::read_dir(self.maildir.join(sub))
                .into_iter()
                .flatten()
                .flatten()
            {
                let t = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                files.push((t, e.path()));
            }
        }
        files.sort();
        files
            .into_iter()
            .filter_map(|(_, p)| std::fs::read(p).ok())
            .collect()
    }

    /// Waits until at least `n` messages arrived.
    pub fn wait_for(&self, n: usize, limit: Duration) -> Vec<Vec<u8>> {
        let t0 = std::time::Instant::now();
        loop {
            let m = self.messages();
            if m.len() >= n || t0.elapsed() > limit {
                return m;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The daemon moved a declared client by the config and then finished the
/// reload (the new config is in force only once "reloaded" is logged; a
/// HELLO between the two is admitted under the old one).
pub fn moved_and_reloaded(log: &str) -> bool {
    log.find("declared client moved by the config")
        .is_some_and(|i| log[i..].contains("reloaded "))
}

/// Gives `p` permission bits `mode` and modification time `mtime`.
pub fn set_mode_and_mtime(p: &Path, mode: u32, mtime: std::time::SystemTime) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

/// A database of its own on the tests' PostgreSQL (scripts/test provides
/// one through `TOLLGATE_TEST_DATABASE_URL`), dropped when this goes.
pub struct PgDb {
    /// postgres://… naming the fresh database.
    pub url: String,
    admin: String,
    name: String,
}

impl PgDb {
    /// A fresh, empty database; `None` (said loudly) where no PostgreSQL
    /// is available and `TOLLGATE_REQUIRE_POSTGRES` is unset. CI sets it,
    /// so there a missing server fails the test instead.
    pub async fn create(test: &str) -> Option<PgDb> {
        let Some(admin) = std::env::var("TOLLGATE_TEST_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
        else {
            if std::env::var_os("TOLLGATE_REQUIRE_POSTGRES").is_some() {
                panic!(
                    "TOLLGATE_REQUIRE_POSTGRES is set but TOLLGATE_TEST_DATABASE_URL is not: run the tests through scripts/test"
                );
            }
            // Straight to stderr: the test harness captures eprintln!, and
            // a skip must be seen.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: no PostgreSQL (run scripts/test, or set TOLLGATE_TEST_DATABASE_URL)"
            );
            return None;
        };
        let mut rnd = [0u8; 6];
        getrandom::fill(&mut rnd).unwrap();
        let name = format!(
            "tg_{}",
            rnd.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let pool = sqlx::PgPool::connect(&admin).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let mut url = url::Url::parse(&admin).unwrap();
        url.set_path(&name);
        Some(PgDb {
            url: url.to_string(),
            admin,
            name,
        })
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Its own runtime: a test's runtime may be shutting down.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(pool) = sqlx::PgPool::connect(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&pool)
                    .await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}
