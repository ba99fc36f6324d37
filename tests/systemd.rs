//! systemd integration (sd_notify(3)): with NOTIFY_SOCKET pointed at a test
//! datagram socket, the daemon reports READY=1 once it listens, feeds the
//! watchdog at half its interval, brackets a reload with RELOADING=1 and
//! READY=1, and reports STOPPING=1 on SIGTERM.

mod common;

use common::*;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};
use tempfile::TempDir;

fn messages(
    sock: &UnixDatagram,
    until: impl Fn(&[String]) -> bool,
    limit: Duration,
) -> Vec<String> {
    let mut got = Vec::new();
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    while !until(&got) && t0.elapsed() < limit {
        if let Ok(n) = sock.recv(&mut buf) {
            got.extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_string),
            );
        }
    }
    got
}

#[test]
fn ready_watchdog_and_stopping() {
    let dir = TempDir::new().unwrap();
    write_config(
        dir.path(),
        "",
        &format!(
            "[default_customer]\nbackup_location = \"{}/b\"\n",
            dir.path().display()
        ),
    );
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut d = Daemon::start_with_env(
        dir.path(),
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );

    let got = messages(
        &sock,
        |m| m.iter().filter(|l| *l == "WATCHDOG=1").count() >= 3,
        Duration::from_secs(10),
    );
    assert!(got.iter().any(|l| l == "READY=1"), "{got:?}");
    assert!(
        got.iter()
            .any(|l| l.starts_with("STATUS=serving on 127.0.0.1:")),
        "{got:?}"
    );
    let ready_at = got.iter().position(|l| l == "READY=1").unwrap();
    let first_dog = got.iter().position(|l| l == "WATCHDOG=1").unwrap();
    assert!(
        ready_at < first_dog,
        "READY=1 comes before the first WATCHDOG=1: {got:?}"
    );

    // A reload (SIGHUP) is bracketed by RELOADING=1 with MONOTONIC_USEC,
    // then READY=1 (sd_notify(3), Type=notify-reload semantics).
    d.signal("HUP");
    let got = messages(
        &sock,
        |m| {
            m.iter()
                .position(|l| l == "RELOADING=1")
                .is_some_and(|i| m[i..].iter().any(|l| l == "READY=1"))
        },
        Duration::from_secs(10),
    );
    let reloading = got
        .iter()
        .position(|l| l == "RELOADING=1")
        .unwrap_or_else(|| panic!("no RELOADING=1: {got:?}"));
    let usec = got[reloading + 1]
        .strip_prefix("MONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("MONOTONIC_USEC follows RELOADING=1: {got:?}"));
    assert!(usec.parse::<u64>().unwrap() > 0);
    let ready = reloading
        + got[reloading..]
            .iter()
            .position(|l| l == "READY=1")
            .unwrap_or_else(|| panic!("READY=1 after the reload: {got:?}"));
    assert!(
        got[ready..]
            .iter()
            .any(|l| l.starts_with("STATUS=") && l.contains("last reload ok")),
        "STATUS= sums up the reload: {got:?}"
    );

    d.signal("TERM");
    let got = messages(
        &sock,
        |m| m.iter().any(|l| l == "STOPPING=1"),
        Duration::from_secs(10),
    );
    assert!(got.iter().any(|l| l == "STOPPING=1"), "{got:?}");
    assert_eq!(d.wait(Duration::from_secs(10)), Some(0));
}

/// Socket activation (sd_listen_fds(3)): the daemon serves the socket it
/// inherits as fd 3 and binds nothing of `server.listen`.
#[tokio::test(flavor = "multi_thread")]
async fn serves_a_socket_handed_over_by_systemd() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let dir = TempDir::new().unwrap();
    // `listen` names a port that is taken: binding it would fail.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = write_config(
        dir.path(),
        "",
        &format!(
            "[default_customer]\nbackup_location = \"{}/b\"\nauto_add_clients = true\n",
            dir.path().display()
        ),
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("127.0.0.1:0", &taken.local_addr().unwrap().to_string());
    std::fs::write(&cfg, text).unwrap();
    let sock = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap().to_string();
    let fd = sock.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .env("LISTEN_FDS", "1")
        .env("TOLLGATE_FAKE_NOW", common::PINNED_NOW)
        .env_remove("LISTEN_PID")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("daemon.log")).unwrap());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(sock);
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let mut pin = None;
    let listening = loop {
        let Some(Ok(l)) = lines.next() else {
            let _ = child.kill();
            panic!(
                "exited: {}",
                std::fs::read_to_string(dir.path().join("daemon.log")).unwrap()
            );
        };
        if let Some(p) = l.strip_prefix("tollgate: certificate ") {
            pin = Some(p.to_string());
        }
        if let Some(a) = l.strip_prefix("tollgate: listening on ") {
            break a.to_string();
        }
    };
    assert_eq!(listening, addr, "the inherited socket is served");
    let o = tollgate::client::Options {
        server: addr,
        id: "ACTIVATED".into(),
        schedule: "s".into(),
        pin,
        secret_file: dir.path().join("a.secret"),
        ..Default::default()
    };
    let s = tollgate::client::Session::connect(&o).await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(s.is_ok(), "{:?}", s.err());
}

/// `--log-format json`: every log line is one JSON object, and under
/// systemd (JOURNAL_STREAM) it carries no timestamp, as in text format.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_one_object_per_line() {
    for journal in [false, true] {
        let dir = TempDir::new().unwrap();
        write_config(
            dir.path(),
            "",
            &format!(
                "[default_customer]\nbackup_location = \"{}/b\"\nauto_add_clients = true\n",
                dir.path().display()
            ),
        );
        let env: &[(&str, &str)] = if journal {
            &[("JOURNAL_STREAM", "8:1234")]
        } else {
            &[]
        };
        let d = Daemon::start_with(dir.path(), env, &["--log-format", "json"]);
        tollgate::client::Session::connect(&d.opts("JSON-PC"))
            .await
            .unwrap()
            .bye()
            .await
            .unwrap();
        assert!(wait_until(Duration::from_secs(5), || d
            .log()
            .contains("session ended")));
        let log = d.log();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let admitted = lines
            .iter()
            .find(|v| v["fields"]["message"] == "admitted")
            .unwrap_or_else(|| panic!("{log}"));
        assert_eq!(admitted["fields"]["code"], "welcome");
        assert_eq!(admitted["span"]["client"], "JSON-PC", "{admitted}");
        assert!(admitted["span"]["peer"].is_string(), "{admitted}");
        // A JSON object keeps its time under the journal too: log shippers
        // read the object, not the journal's stamp. It says its offset.
        for v in &lines {
            let t = v["timestamp"].as_str().unwrap_or_else(|| panic!("{v}"));
            assert!(
                t.parse::<jiff::Timestamp>().is_ok() && (t.ends_with("+00:00")),
                "an RFC 3339 time with the UTC zone's offset: {t}"
            );
        }
    }
}
