//! The web console under load (issue 15, docs/benchmarks.md "Console"),
//! against the real daemon:
//! - pages over CLIENTS clients: one customer with CLIENTS declared
//!   clients (rows in state, as the daemon records them at start); its
//!   page and the admin's page, each loaded LOADS times over HTTPS on a
//!   kept-alive connection with a logged-in session: time from request to
//!   the last byte of the page;
//! - admissions with and without the console busy: ADMITS new clients
//!   register (connect, TLS, HELLO to WELCOME), 32 at a time, first alone,
//!   then while two browsers' worth of loaders fetch the big page back to
//!   back.
//!
//! `scripts/console-load [CLIENTS] [LOADS] [ADMITS]`.

#[path = "support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::{Target, cpu};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const PASSWORD: &str = "console-load-admin";
const CONCURRENCY: usize = 32;
/// Console users loading the big page while admissions run …
const LOADERS: usize = 4;
/// … each this often (a person clicking through pages fast).
const LOAD_EVERY: Duration = Duration::from_millis(250);
/// Idle and busy runs of admissions, alternating.
const ROUNDS: usize = 3;

/// A kept-alive HTTPS connection to the console.
struct Http {
    s: TlsStream<TcpStream>,
    cookie: String,
}

impl Http {
    async fn open(addr: &str, tls: &Arc<rustls::ClientConfig>) -> Http {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let s = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        Http {
            s,
            cookie: String::new(),
        }
    }

    /// Sends one request; (status, headers, body).
    async fn request(&mut self, method: &str, path: &str, body: &str) -> (u16, String, Vec<u8>) {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nCookie: {}\r\n",
            self.cookie
        );
        if !body.is_empty() {
            req.push_str(&format!(
                "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        self.s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 << 10];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = self.s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the console closed the connection");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let n = self.s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the console closed the connection mid-body");
            buf.extend_from_slice(&chunk[..n]);
        }
        for l in head.lines() {
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("set-cookie")
            {
                let pair = v.trim().split(';').next().unwrap_or("").to_string();
                if !self.cookie.is_empty() {
                    self.cookie.push_str("; ");
                }
                self.cookie.push_str(&pair);
            }
        }
        (status, head, buf[head_end..head_end + len].to_vec())
    }

    /// Logs in as the admin.
    async fn login(&mut self) {
        let (_, _, page) = self.request("GET", "/login", "").await;
        let page = String::from_utf8_lossy(&page);
        let token = page
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap()
            .to_string();
        let (status, _, _) = self
            .request(
                "POST",
                "/login",
                &format!("username=admin&password={PASSWORD}&csrf={token}"),
            )
            .await;
        assert_eq!(status, 303, "logged in");
    }
}

/// Kills the daemon when the tool ends, however it ends.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn page_times(
    addr: &str,
    tls: &Arc<rustls::ClientConfig>,
    path: &str,
    loads: usize,
) -> (Vec<f64>, usize) {
    let mut h = Http::open(addr, tls).await;
    h.login().await;
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..loads {
        let t0 = Instant::now();
        let (status, _, body) = h.request("GET", path, "").await;
        times.push(t0.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(status, 200, "{path}");
        bytes = body.len();
    }
    (times, bytes)
}

/// Registers `n` new clients, CONCURRENCY at a time; latencies in ms.
async fn admissions(t: &Arc<Target>, prefix: &str, n: usize) -> (Vec<f64>, f64) {
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (t, sem, id) = (t.clone(), sem.clone(), format!("{prefix}-{i}"));
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await.unwrap();
            let s = Instant::now();
            let c = support::hello(&t, &id, "Default Customer").await.unwrap();
            let ms = s.elapsed().as_secs_f64() * 1000.0;
            drop(c);
            ms
        }));
    }
    let mut v = Vec::new();
    for t in tasks {
        v.push(t.await.unwrap());
    }
    (v, n as f64 / t0.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("CLIENTS LOADS ADMITS"))
        .collect();
    let clients = args.first().copied().unwrap_or(10_000);
    let loads = args.get(1).copied().unwrap_or(50);
    let admits = args.get(2).copied().unwrap_or(2_000);

    let dir = tempfile::tempdir().unwrap();
    let hash = {
        use argon2::PasswordHasher;
        argon2::Argon2::default()
            .hash_password(PASSWORD.as_bytes())
            .unwrap()
            .to_string()
    };
    let mut cfg = format!(
        r#"[server]
listen = ["127.0.0.1:0"]
state = "sqlite://state/state.db"
timezone = "UTC"
# CONCURRENCY admissions at a time: 1,000 leaves the open-file limit room
max_connections = 1000
[server.limits]
registrations_per_minute = 1000000
handshakes = 1024
per_source_connections = 100000
[server.mcal]
pool = 1000000
[server.web]
listen = "127.0.0.1:0"
admin = {{ user = "admin", password = "{hash}" }}
[default_customer]
auto_add_clients = true
backup_location = "{dir}/backup/default"
[[reseller]]
name = "r"
[[customer]]
name = "Big"
reseller = "r"
email = "it@big.example"
backup_location = "{dir}/backup/big"
"#,
        dir = dir.path().display()
    );
    for i in 0..clients {
        cfg.push_str(&format!(
            "[[client]]\nid = \"BIG-{i:05}\"\ncustomer = \"Big\"\n"
        ));
    }
    let config = dir.path().join("tollgate.toml");
    std::fs::write(&config, cfg).unwrap();
    let started = Instant::now();
    let d = support::start_daemon(&config, &[]);
    let mut child = Kill(d.child);
    let pid = child.0.id();
    eprintln!(
        "daemon up with {clients} declared clients in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let console = d.console.expect("the console's address");
    let tls = tollgate::tls::client_config(Some(&d.pin), None).unwrap();
    let mut web_tls = (*tls).clone();
    web_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let web_tls = Arc::new(web_tls);
    let target = Arc::new(Target {
        addr: d.addr.clone(),
        tls,
    });

    // Warm up (the first page compiles nothing, but fills caches).
    page_times(&console, &web_tls, "/customers/Big", 2).await;
    let cpu0 = cpu(&[pid]);
    let (mut cust, cust_bytes) = page_times(&console, &web_tls, "/customers/Big", loads).await;
    let cpu_page = (cpu(&[pid]) - cpu0) / loads as f64 * 1000.0;
    let (mut admin, admin_bytes) = page_times(&console, &web_tls, "/admin", loads).await;

    // Idle and busy runs alternate, three of each: the database grows from
    // run to run, so each busy run sits between two idle ones.
    let mut runs: Vec<(bool, Vec<f64>, f64, f64)> = Vec::new();
    for round in 0..ROUNDS * 2 {
        let busy_run = round % 2 == 1;
        let busy = Arc::new(AtomicBool::new(true));
        let mut loaders = Vec::new();
        if busy_run {
            for _ in 0..LOADERS {
                // One login at a time: the daemon checks at most two
                // passwords per source at once and answers the third 503.
                let mut h = Http::open(&console, &web_tls).await;
                h.login().await;
                let busy = busy.clone();
                loaders.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    let mut tick = tokio::time::interval(LOAD_EVERY);
                    while busy.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let (status, _, _) = h.request("GET", "/customers/Big", "").await;
                        assert_eq!(status, 200);
                        n += 1;
                    }
                    n
                }));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let t0 = Instant::now();
        let (lat, rate) = admissions(&target, &format!("R{round}"), admits).await;
        let secs = t0.elapsed().as_secs_f64();
        busy.store(false, Ordering::Relaxed);
        let mut pages = 0;
        for l in loaders {
            pages += l.await.unwrap();
        }
        runs.push((busy_run, lat, rate, pages as f64 / secs));
    }
    let _ = child.0.kill();
    let _ = child.0.wait();

    println!(
        "## Console: {clients} clients, {loads} loads per page, {admits} admissions per run\n"
    );
    println!("| page | bytes | p50 ms | p99 ms | max ms | daemon CPU ms per load |");
    println!("|---|---|---|---|---|---|");
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "| customer page ({clients} clients) | {cust_bytes} | {:.1} | {:.1} | {:.1} | {cpu_page:.1} |",
        pct(&mut cust, 0.5),
        pct(&mut cust, 0.99),
        max(&cust)
    );
    println!(
        "| admin page (whole tree) | {admin_bytes} | {:.1} | {:.1} | {:.1} | |",
        pct(&mut admin, 0.5),
        pct(&mut admin, 0.99),
        max(&admin)
    );
    println!();
    println!(
        "| admissions ({CONCURRENCY} at a time), in run order | console pages/s meanwhile | admissions/s | p50 ms | p99 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|");
    let (mut idle_p50, mut busy_p50) = (Vec::new(), Vec::new());
    for (busy_run, mut lat, rate, pages) in runs {
        let p50 = pct(&mut lat, 0.5);
        if busy_run {
            &mut busy_p50
        } else {
            &mut idle_p50
        }
        .push(p50);
        println!(
            "| {} | {pages:.1} | {rate:.0} | {p50:.1} | {:.1} | {:.1} |",
            if busy_run {
                format!(
                    "{LOADERS} console users, each loading the {clients}-client page every {} ms",
                    LOAD_EVERY.as_millis()
                )
            } else {
                "console idle".to_string()
            },
            pct(&mut lat, 0.99),
            max(&lat)
        );
    }
    println!(
        "\nmedian admission p50: console idle {:.1} ms, console busy {:.1} ms",
        pct(&mut idle_p50, 0.5),
        pct(&mut busy_p50, 0.5)
    );
    let p50 = pct(&mut cust, 0.5);
    if std::env::var("CONSOLE_LOAD_CHECK").as_deref() == Ok("1") && p50 >= 100.0 {
        eprintln!("FAILED: the {clients}-client page's median is {p50:.1} ms (≥ 100 ms)");
        std::process::exit(1);
    }
}
