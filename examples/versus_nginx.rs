//! tollgate beside nginx's stream module, same workloads, same client, one
//! run (issue 13). nginx terminates TLS and throttles with
//! `proxy_upload_rate`, passing the bytes to a sink that speaks just enough
//! of PROTOCOL.md (WELCOME to HELLO, STORED to END) for the client to run
//! unchanged; tollgate also registers, reserves, hashes and fsyncs.
//!
//! Workloads, each started all together:
//! - A: SESSIONS_A sessions × 640 KiB at 64 KiB/s;
//! - B: SESSIONS_B sessions × 80 KiB at 8 KiB/s;
//! - C: REGISTRATIONS new clients connecting at once (connect to WELCOME).
//!
//! Rates are measured by the client, from PUT sent to STORED received. CPU
//! is the daemon's (nginx: master and workers) user + system time over the
//! workload; RSS per connection is the growth with every session of B open.
//! After each of tollgate's upload workloads, the storage floor is what the
//! same bytes cost to hash, write and make durable on one thread with
//! nothing else (see [`storage_floor`]).
//!
//! Run (scripts/versus-nginx installs nginx and raises the open-file limit):
//! `cargo build --release && cargo run --release --example versus_nginx -- [SESSIONS_A] [SESSIONS_B] [REGISTRATIONS]`
//! Without nginx (`nginx` not on PATH), only tollgate is measured.
//! `--python-client` runs the upload workloads with
//! `examples/support/pyclient.py` (Python asyncio, as issue 13 measured
//! before its work) instead of the Rust client.

#[path = "support/mod.rs"]
mod support;

use support::{Target, cpu, hello, j, rss_kib, upload};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tollgate::wire::{FrameCodec, Kind};

const KIB: u64 = 1024;
/// Connections being opened at once while a workload is set up.
const OPENING: usize = 256;

/// One workload of sessions uploading at a fixed rate.
struct Uploads {
    name: &'static str,
    sessions: usize,
    size: u64,
    rate: u64,
    customer: &'static str,
}

/// What one server under test is.
struct Server {
    name: &'static str,
    /// Processes whose CPU and RSS count.
    pids: Box<dyn Fn() -> Vec<u32>>,
    /// Where each workload connects.
    a: Arc<Target>,
    b: Arc<Target>,
    c: Arc<Target>,
}

#[derive(Default)]
struct Row {
    median: f64,
    worst: f64,
    failed: usize,
    cpu: f64,
    rss_per_conn: Option<f64>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("sink") {
        return sink();
    }
    let n: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let a = Uploads {
        name: "A",
        sessions: n.first().copied().unwrap_or(1000),
        size: 640 * KIB,
        rate: 64 * KIB,
        customer: "A",
    };
    let b = Uploads {
        name: "B",
        sessions: n.get(1).copied().unwrap_or(10_000),
        size: 80 * KIB,
        rate: 8 * KIB,
        customer: "B",
    };
    let regs = n.get(2).copied().unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(a, b, regs));
}

async fn run(a: Uploads, b: Uploads, regs: usize) {
    let dir = tempfile::TempDir::new().unwrap();
    let mut results = Vec::new();
    // `--tollgate-only` skips nginx (to iterate on tollgate alone).
    let only = std::env::args().any(|a| a == "--tollgate-only");
    let have_nginx = !only && which("nginx").is_some();
    if only {
        println!("--tollgate-only: nginx is not measured");
    } else if !have_nginx {
        println!("nginx is not installed: only tollgate is measured");
    }
    // A fresh server for each workload: memory freed by one workload must
    // not hide the next one's growth.
    for nginx in [false, true] {
        if nginx && !have_nginx {
            continue;
        }
        let mut r = Results::default();
        for w in ["C", "A", "B"] {
            // A workload of 0 sessions is skipped.
            let count = match w {
                "C" => regs,
                "A" => a.sessions,
                _ => b.sessions,
            };
            if count == 0 {
                continue;
            }
            let run_dir = dir
                .path()
                .join(format!("{}-{w}", if nginx { "nginx" } else { "tollgate" }));
            std::fs::create_dir_all(&run_dir).unwrap();
            let (procs, server) = if nginx {
                start_nginx(&run_dir, &a, &b).unwrap()
            } else {
                start_tollgate(&run_dir, &a, &b)
            };
            if w == "C" {
                println!("== {}", server.name);
            }
            match w {
                "C" => r.registrations = registrations(&server, regs).await,
                "A" => r
                    .uploads
                    .push((a.title(), uploads(&server, &server.a, &a, true).await)),
                _ => r
                    .uploads
                    .push((b.title(), uploads(&server, &server.b, &b, true).await)),
            }
            stop(procs, (server.pids)());
            if !nginx && w != "C" {
                let u = if w == "A" { &a } else { &b };
                let floor = storage_floor(&run_dir.join("floor"), u);
                println!(
                    "   {}: storage floor (hash, write, fsync, rename; one thread): CPU {floor:.1} s",
                    u.name
                );
                r.floors.push((u.title(), floor));
            }
        }
        results.push((if nginx { "nginx" } else { "tollgate" }, r));
    }

    println!();
    println!(
        "| workload | server | median rate error | worst | failed | CPU s | RSS per connection |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, rows) in &results {
        for (w, r) in rows.uploads.iter() {
            println!(
                "| {w} | {name} | {:+.2}% | {:+.2}% | {} | {:.1} | {} |",
                r.median,
                r.worst,
                r.failed,
                r.cpu,
                r.rss_per_conn
                    .map(|k| format!("{k:.1} KiB"))
                    .unwrap_or_else(|| "".into())
            );
        }
    }
    for (name, rows) in &results {
        for (w, floor) in rows.floors.iter() {
            println!("| {w} | storage floor (beside {name}) | | | | {floor:.1} | |");
        }
    }
    println!();
    println!(
        "| C: {regs} new clients at once | per second | p50 connect→WELCOME | p99 | failed | CPU s |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, rows) in &results {
        let c = &rows.registrations;
        println!(
            "| {name} | {:.0} | {:.0} ms | {:.0} ms | {} | {:.1} |",
            c.per_second, c.p50_ms, c.p99_ms, c.failed, c.cpu
        );
    }
    let failed: usize = results
        .iter()
        .map(|(_, r)| {
            r.registrations.failed + r.uploads.iter().map(|(_, u)| u.failed).sum::<usize>()
        })
        .sum();
    if failed > 0 {
        eprintln!("versus_nginx: {failed} sessions or registrations failed");
        std::process::exit(1);
    }
}

impl Uploads {
    fn title(&self) -> String {
        format!(
            "{}: {} × {} KiB at {} KiB/s",
            self.name,
            self.sessions,
            self.size / KIB,
            self.rate / KIB
        )
    }
}

/// Stops each process with SIGTERM (nginx's master then stops its workers)
/// and waits for it; then kills whatever of `also` (nginx's workers) is
/// left.
fn stop(procs: Vec<Child>, also: Vec<u32>) {
    for mut p in procs {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&p),
            rustix::process::Signal::TERM,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = p.kill();
                let _ = p.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for pid in also {
        if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }
}

#[derive(Default)]
struct Results {
    uploads: Vec<(String, Row)>,
    /// [`storage_floor`] of each upload workload (tollgate's runs only).
    floors: Vec<(String, f64)>,
    registrations: Regs,
}

#[derive(Default)]
struct Regs {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: usize,
    cpu: f64,
}

/// Workload C: `n` new clients connect at once.
async fn registrations(s: &Server, n: usize) -> Regs {
    let cpu0 = cpu(&(s.pids)());
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let t = s.c.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let c = hello(&t, &format!("reg-{i}"), "C").await.ok()?;
                let took = start.elapsed();
                drop(c);
                Some(took)
            })
        })
        .collect();
    let mut lat = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Some(d) => lat.push(d.as_secs_f64() * 1000.0),
            None => failed += 1,
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    let r = Regs {
        per_second: lat.len() as f64 / wall,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        failed,
        cpu: cpu(&(s.pids)()) - cpu0,
    };
    println!(
        "   C: {n} new clients: {:.0}/s, p50 {:.0} ms, p99 {:.0} ms, {failed} failed",
        r.per_second, r.p50_ms, r.p99_ms
    );
    r
}

/// Opens every session of `w` (HELLO → WELCOME), then starts every upload
/// at once.
async fn uploads(s: &Server, t: &Arc<Target>, w: &Uploads, rss: bool) -> Row {
    let pids = (s.pids)();
    let rss0 = rss_kib(&pids);
    let python = std::env::args().any(|a| a == "--python-client");
    let (opened, mut failed) = if python {
        open_python(t, w)
    } else {
        open_rust(t, w).await
    };
    let rss1 = rss_kib(&(s.pids)());
    let cpu0 = cpu(&(s.pids)());
    let threads0 = threads(&(s.pids)());
    let (rates, more) = match opened {
        Opened::Rust(conns) => run_rust(conns, w).await,
        Opened::Python(child, out) => run_python(child, out),
    };
    failed += more;
    let mut errs: Vec<f64> = rates
        .iter()
        .map(|r| 100.0 * (r - w.rate as f64) / w.rate as f64)
        .collect();
    let cpu = cpu(&(s.pids)()) - cpu0;
    let mut by_thread: Vec<(String, f64)> = threads(&(s.pids)())
        .into_iter()
        .map(|(name, t)| {
            let before = threads0.get(&name).copied().unwrap_or(0.0);
            (name, t - before)
        })
        .collect();
    // Threads that ended during the workload (tokio's blocking pool lets
    // idle ones go) took their CPU with them from /proc's task list.
    let ended = cpu - by_thread.iter().map(|t| t.1).sum::<f64>();
    by_thread.push(("threads since ended".into(), ended));
    by_thread.retain(|(_, t)| *t >= 0.05);
    by_thread.sort_by(|a, b| b.1.total_cmp(&a.1));
    errs.sort_by(f64::total_cmp);
    let median = errs.get(errs.len() / 2).copied().unwrap_or(f64::NAN);
    let worst = errs
        .iter()
        .copied()
        .max_by(|x, y| x.abs().total_cmp(&y.abs()))
        .unwrap_or(f64::NAN);
    let per_conn = rss.then(|| rss1.saturating_sub(rss0) as f64 / w.sessions.max(1) as f64);
    println!(
        "   {}: {} × {} KiB at {} KiB/s: median {median:+.2}%, worst {worst:+.2}%, min {:+.2}%, max {:+.2}%, {failed} failed, CPU {cpu:.1} s{}",
        w.name,
        w.sessions,
        w.size / KIB,
        w.rate / KIB,
        errs.first().copied().unwrap_or(f64::NAN),
        errs.last().copied().unwrap_or(f64::NAN),
        per_conn
            .map(|k| format!(", RSS {k:.1} KiB per connection"))
            .unwrap_or_default()
    );
    println!(
        "      CPU by thread: {}",
        by_thread
            .iter()
            .map(|(n, t)| format!("{n} {t:.1} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Row {
        median,
        worst,
        failed,
        cpu,
        rss_per_conn: per_conn,
    }
}

/// A workload's sessions, open (HELLO → WELCOME) and waiting to upload.
enum Opened {
    Rust(Vec<support::Conn>),
    /// `examples/support/pyclient.py`, waiting for a line on its stdin,
    /// and its stdout.
    Python(Child, BufReader<ChildStdout>),
}

async fn open_rust(t: &Arc<Target>, w: &Uploads) -> (Opened, usize) {
    let gate = Arc::new(Semaphore::new(OPENING));
    let opening: Vec<_> = (0..w.sessions)
        .map(|i| {
            let (t, gate) = (t.clone(), gate.clone());
            let id = format!("{}-{i}", w.name);
            let customer = w.customer;
            tokio::spawn(async move {
                let _p = gate.acquire_owned().await.unwrap();
                hello(&t, &id, customer).await
            })
        })
        .collect();
    let mut conns = Vec::new();
    let mut failed = 0;
    for o in opening {
        match o.await.unwrap() {
            Ok(c) => conns.push(c),
            Err(e) => {
                if failed == 0 {
                    eprintln!("   {}: a session failed to open: {e}", w.name);
                }
                failed += 1;
            }
        }
    }
    (Opened::Rust(conns), failed)
}

/// Every session's rate (bytes a second, PUT to STORED), and the failures.
async fn run_rust(conns: Vec<support::Conn>, w: &Uploads) -> (Vec<f64>, usize) {
    let start = Arc::new(tokio::sync::Barrier::new(conns.len() + 1));
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| {
            let start = start.clone();
            let size = w.size;
            tokio::spawn(async move {
                start.wait().await;
                upload(c, size).await
            })
        })
        .collect();
    start.wait().await;
    let (mut rates, mut failed) = (Vec::new(), 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(r) => rates.push(r),
            Err(e) => {
                if failed == 0 {
                    eprintln!("   {}: an upload failed: {e}", w.name);
                }
                failed += 1;
            }
        }
    }
    (rates, failed)
}

/// Starts the Python client on `w`; returns once every session is open.
fn open_python(t: &Target, w: &Uploads) -> (Opened, usize) {
    let (host, port) = t.addr.rsplit_once(':').unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/support/pyclient.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args([host, port])
        .args([w.sessions.to_string(), w.size.to_string()])
        .args([w.name, w.customer])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs examples/support/pyclient.py");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let line = read_line(&mut out);
    // "opened N failed M"
    let failed = line
        .split_whitespace()
        .nth(3)
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("pyclient.py: {line:?}"));
    (Opened::Python(child, out), failed)
}

fn run_python(mut child: Child, mut out: BufReader<ChildStdout>) -> (Vec<f64>, usize) {
    use std::io::Write;
    writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
    let line = read_line(&mut out);
    let _ = child.wait();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("pyclient.py: {line:?}"));
    if let Some(e) = v["first_error"].get(0) {
        eprintln!("   an upload failed: {e}");
    }
    let rates = v["rates"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r.as_f64())
        .collect();
    (rates, v["failed"].as_u64().unwrap_or(0) as usize)
}

/// One line of the Python client's stdout, without its newline (blocking:
/// the tool waits on it).
fn read_line(out: &mut BufReader<ChildStdout>) -> String {
    let mut line = String::new();
    let _ = out.read_line(&mut line);
    line.trim_end().to_string()
}

fn start_tollgate(dir: &Path, a: &Uploads, b: &Uploads) -> (Vec<Child>, Server) {
    let max = a.sessions.max(b.sessions) + 1000;
    let mut cfg = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nstate = \"sqlite://state/state.db\"\ntimezone = \"UTC\"\nmax_connections = {max}\n[server.limits]\nhandshakes = {max}\nper_source_connections = {max}\nregistrations_per_minute = 1000000\n[default_customer]\nbackup_location = \"{}/d\"\n[[reseller]]\nname = \"r\"\n",
        dir.display()
    );
    for (name, extra) in [
        (
            a.customer,
            format!("throttle = {{ rate = \"{} KiB/s\" }}", a.rate / KIB),
        ),
        (
            b.customer,
            format!("throttle = {{ rate = \"{} KiB/s\" }}", b.rate / KIB),
        ),
        ("C", String::new()),
    ] {
        cfg += &format!(
            "[[customer]]\nname = \"{name}\"\nreseller = \"r\"\nemail = \"x@y.example\"\nbackup_location = \"{}/{name}\"\nauto_add_clients = true\n{extra}\n",
            dir.display()
        );
    }
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, cfg).unwrap();
    let (daemon, addr, pin) = support::start_release_daemon(&path);
    let pid = daemon.id();
    let t = Arc::new(Target {
        addr,
        tls: tollgate::tls::client_config(Some(&pin), None).unwrap(),
    });
    (
        vec![daemon],
        Server {
            name: "tollgate",
            pids: Box::new(move || vec![pid]),
            a: t.clone(),
            b: t.clone(),
            c: t,
        },
    )
}

/// nginx on three TLS ports (A's rate, B's rate, unthrottled for C), all
/// passing to one sink process; `None` when nginx is not installed.
fn start_nginx(dir: &Path, a: &Uploads, b: &Uploads) -> Option<(Vec<Child>, Server)> {
    let nginx = which("nginx")?;
    let dir = dir.to_path_buf();
    let module = ["/usr/lib/nginx/modules/ngx_stream_module.so"]
        .into_iter()
        .find(|m| Path::new(m).exists());
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let pin = tollgate::tls::fingerprint(cert.cert.der());

    let mut sink = Command::new(std::env::current_exe().unwrap())
        .arg("sink")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let sink_addr = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(sink.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        line.trim().to_string()
    };
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let server = |port: u16, rate: Option<u64>| {
        format!(
            "    server {{\n        listen 127.0.0.1:{port} ssl;\n        ssl_certificate {d}/cert.pem;\n        ssl_certificate_key {d}/key.pem;\n        proxy_pass {sink_addr};\n{}    }}\n",
            rate.map(|r| format!("        proxy_upload_rate {}k;\n", r / KIB))
                .unwrap_or_default(),
            d = dir.display()
        )
    };
    let conf = format!(
        "{}worker_processes auto;\nworker_rlimit_nofile 100000;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log warn;\nevents {{\n    worker_connections 50000;\n}}\nstream {{\n{}{}{}}}\n",
        module
            .map(|m| format!("load_module {m};\n"))
            .unwrap_or_default(),
        server(ports[0], Some(a.rate)),
        server(ports[1], Some(b.rate)),
        server(ports[2], None),
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let master = Command::new(nginx)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .spawn()
        .unwrap();
    let mpid = master.id();
    for p in &ports {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", *p)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen; see {}",
                dir.join("logs/error.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let tls = tollgate::tls::client_config(Some(&pin), None).unwrap();
    let target = |p: u16| {
        Arc::new(Target {
            addr: format!("127.0.0.1:{p}"),
            tls: tls.clone(),
        })
    };
    Some((
        vec![master, sink],
        Server {
            name: "nginx",
            pids: Box::new(move || {
                let mut v = vec![mpid];
                v.extend(children(mpid));
                v
            }),
            a: target(ports[0]),
            b: target(ports[1]),
            c: target(ports[2]),
        },
    ))
}

/// The sink behind nginx: WELCOME to HELLO, STORED to END, everything else
/// read and dropped.
fn sink() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", l.local_addr().unwrap());
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut f = tokio_util::codec::Framed::new(s, FrameCodec::new(16 << 20));
                while let Some(Ok(frame)) = f.next().await {
                    let reply = match frame.kind {
                        Kind::Hello => j(
                            Kind::Welcome,
                            json!({"session": "sink", "max_frame": 16 << 20}),
                        ),
                        Kind::End => j(Kind::Stored, json!({})),
                        _ => continue,
                    };
                    if f.send(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn children(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let f: Vec<&str> = s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if f.get(1).and_then(|x| x.parse::<u32>().ok()) == Some(pid) {
            v.push(p);
        }
    }
    v
}

/// The CPU seconds that storing `w`'s bytes costs with nothing else
/// around it: one thread creates each session's file, writes it in the
/// client's 64 KiB chunks while hashing them (SHA-256), fsyncs it, renames
/// it into its client's directory and fsyncs that, which is what tollgate
/// must do before STORED (PROTOCOL.md Upload). No TLS, throttle, sessions
/// or database: tollgate's CPU above this floor is what it spends where
/// nginx spends all of its own.
fn storage_floor(dir: &Path, w: &Uploads) -> f64 {
    use sha2::Digest;
    use std::io::Write;
    let thread_cpu = || {
        support::stat_cpu(&std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default())
    };
    let chunk = vec![0xA5u8; 64 << 10];
    let temp = dir.join("tmp");
    std::fs::create_dir_all(&temp).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            let cpu0 = thread_cpu();
            for i in 0..w.sessions {
                let from = temp.join(format!("{i}.tmp"));
                let mut f = std::fs::File::create(&from).unwrap();
                let mut h = sha2::Sha256::new();
                let mut n = 0;
                while n < w.size {
                    let k = (chunk.len() as u64).min(w.size - n) as usize;
                    h.update(&chunk[..k]);
                    f.write_all(&chunk[..k]).unwrap();
                    n += k as u64;
                }
                std::hint::black_box(h.finalize());
                f.sync_all().unwrap();
                let client = dir.join(format!("{}-{i}", w.name));
                std::fs::create_dir_all(&client).unwrap();
                std::fs::rename(&from, client.join("bench.bin")).unwrap();
                std::fs::File::open(&client).unwrap().sync_all().unwrap();
            }
            thread_cpu() - cpu0
        })
        .join()
        .unwrap()
    })
}

/// CPU seconds of `pids`' threads, summed by thread name. tokio names its
/// workers and its blocking pool's threads alike; the workers are started
/// when the runtime is built, before any blocking thread, so the lowest
/// thread ids are them (as many as `TOKIO_WORKER_THREADS`, or the CPUs,
/// the daemon's default).
fn threads(pids: &[u32]) -> std::collections::HashMap<String, f64> {
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut m = std::collections::HashMap::new();
    for p in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        let mut tasks: Vec<(u32, String, f64)> = tasks
            .flatten()
            .filter_map(|t| {
                let dir = t.path();
                let tid = t.file_name().to_str()?.parse().ok()?;
                let name = std::fs::read_to_string(dir.join("comm")).ok()?;
                let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
                Some((tid, name.trim().to_string(), support::stat_cpu(&stat)))
            })
            .collect();
        tasks.sort_by_key(|t| t.0);
        let mut tokio_seen = 0;
        for (_, mut name, cpu) in tasks {
            if name == "tokio-rt-worker" {
                tokio_seen += 1;
                name = if tokio_seen <= workers {
                    "tokio workers"
                } else {
                    "tokio blocking pool"
                }
                .into();
            }
            *m.entry(name).or_insert(0.0) += cpu;
        }
    }
    m
}
