//! The one wall-clock throttling test (bounds wide on purpose): a customer
//! throttled to 2 MiB/s uploads 10 MiB over real TLS to the real daemon.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tollgate::client::{Session, Upload};

#[tokio::test(flavor = "multi_thread")]
async fn two_mib_per_second_holds_end_to_end() {
    let dir = TempDir::new().unwrap();
    write_config(
        dir.path(),
        "",
        &format!(
            "[[reseller]]\nname = \"r\"\n[[customer]]\nname = \"Slow\"\nreseller = \"r\"\nemail = \"s@x.example\"\nbackup_location = \"{}/slow\"\nauto_add_clients = true\nthrottle = {{ enabled = true, rate = \"2 MiB/s\" }}\n",
            dir.path().display()
        ),
    );
    let d = Daemon::start(dir.path());
    let file = dir.path().join("ten.bin");
    make_file(&file, 10 << 20, 9);
    let mut o = d.opts("SLOW-PC");
    o.customer = Some("Slow".into());
    let mut s = Session::connect(&o).await.unwrap();
    assert_eq!(
        s.welcome.rate,
        Some(2 << 20),
        "WELCOME shows the rate in force"
    );
    let t0 = Instant::now();
    // The progress the reference client shows: (when, bytes so far).
    let seen = std::sync::Mutex::new(Vec::<(Duration, u64)>::new());
    let total = std::sync::atomic::AtomicU64::new(0);
    let progress = |n: u64| {
        let sum = total.fetch_add(n, std::sync::atomic::Ordering::SeqCst) + n;
        seen.lock().unwrap().push((t0.elapsed(), sum));
    };
    let r = s
        .upload(
            &[Upload {
                local: file,
                remote: "ten.bin".into(),
                ..Default::default()
            }],
            &progress,
        )
        .await
        .unwrap();
    let took = t0.elapsed();
    // Issue 12: the progress counts bytes that left for the socket, which
    // the server takes at 2 MiB/s; it may lead by what sits between (the
    // client's 256 KiB send buffer, the 1 MiB frame the server reads before
    // it pays, the bucket's burst, and the server's kernel receive buffer,
    // which Linux autotunes up to tcp_rmem's maximum and grows further on a
    // loaded machine: about 3 MiB here, seen at 4+ MiB under the full
    // suite). It may never lead by the file: before, the whole 10 MiB
    // counted as sent at once, which this bound refuses for the first 2 s.
    let samples = seen.lock().unwrap().clone();
    let lead = samples
        .iter()
        .map(|&(t, n)| n as f64 / (1 << 20) as f64 - 2.0 * t.as_secs_f64())
        .fold(f64::MIN, f64::max);
    assert!(
        lead <= 6.0,
        "progress led the 2 MiB/s the server takes by {lead:.2} MiB: {samples:?}"
    );
    assert!(r[0].is_ok(), "{:?}", r[0]);
    s.bye().await.unwrap();
    assert!(
        took >= Duration::from_millis(4800) && took <= Duration::from_millis(5400),
        "10 MiB at 2 MiB/s took {took:?}"
    );
    let ended =
        |l: &&str| l.contains("session ended") && l.contains("SLOW-PC") && l.contains("files_ok=1");
    assert!(
        wait_until(Duration::from_secs(10), || d
            .log()
            .lines()
            .any(|l| ended(&l))),
        "an end-of-session line"
    );
    let log = d.log();
    let line = log.lines().rev().find(ended).unwrap();
    assert!(
        line.contains("configured_rate=Some(2097152)") && line.contains("wait_session_ms="),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_moved_client_follows_its_new_customer_and_a_removed_one_is_ended() {
    let dir = TempDir::new().unwrap();
    let cust = |name: &str, rate: &str| {
        format!(
            "[[customer]]\nname = \"{name}\"\nreseller = \"r\"\nemail = \"x@x.example\"\nbackup_location = \"{}/{name}\"\nauto_add_clients = true\nthrottle = {{ enabled = true, rate = \"{rate}\" }}\n",
            dir.path().display()
        )
    };
    write_config(
        dir.path(),
        "",
        &format!(
            "[[reseller]]\nname = \"r\"\n{}{}",
            cust("Slow", "1 MiB/s"),
            cust("Fast", "8 MiB/s")
        ),
    );
    let d = Daemon::start(dir.path());
    let file = dir.path().join("four.bin");
    make_file(&file, 4 << 20, 4);
    let mut o = d.opts("MOVER");
    o.customer = Some("Slow".into());
    let mut s = Session::connect(&o).await.unwrap();
    assert_eq!(s.welcome.rate, Some(1 << 20));
    let up = |name: &str| {
        [Upload {
            local: file.clone(),
            remote: name.into(),
            ..Default::default()
        }]
    };

    // The administrator moves the idle client; the live session follows.
    admin_ok(
        &d.config,
        &["clients", "move", "MOVER", "--to", "Fast"],
        &[],
    );
    // The daemon polls the admin commands' events twice a second.
    assert!(
        wait_until(Duration::from_secs(10), || d
            .log()
            .contains("client moved; following it")),
        "the live session followed the move"
    );
    let t0 = Instant::now();
    assert!(s.upload(&up("after-move.bin"), &|_| {}).await.unwrap()[0].is_ok());
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "4 MiB took {took:?}: still at the old customer's 1 MiB/s"
    );
    assert!(
        dir.path().join("Fast/MOVER/after-move.bin").exists(),
        "stored under the new customer"
    );

    // Removal ends the session with BYE client_removed.
    admin_ok(&d.config, &["clients", "remove", "MOVER"], &[]);
    let t0 = Instant::now();
    let err = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match s.list(None).await {
            Err(e) => break e,
            Ok(_) if t0.elapsed() < Duration::from_secs(3) => continue,
            Ok(_) => panic!("the session outlived its client's removal:\n{}", d.log()),
        }
    };
    assert!(err.to_string().contains("client_removed"), "{err}");
}
