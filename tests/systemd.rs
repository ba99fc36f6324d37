//! systemd integration (sd_notify(3)): with NOTIFY_SOCKET pointed at a test
//! datagram socket, the daemon reports READY=1 once it listens, feeds the
//! watchdog at half its interval, and reports STOPPING=1 on SIGTERM.

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

    // SIGHUP is logged, not fatal (live reload is not built yet).
    d.signal("HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        d.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "SIGHUP killed the daemon"
    );
    assert!(d.log().contains("SIGHUP"), "{}", d.log());

    d.signal("TERM");
    let got = messages(
        &sock,
        |m| m.iter().any(|l| l == "STOPPING=1"),
        Duration::from_secs(10),
    );
    assert!(got.iter().any(|l| l == "STOPPING=1"), "{got:?}");
    assert_eq!(d.wait(Duration::from_secs(10)), Some(0));
}
