//! What the admin sees must be true (issue 12), against the real daemon and
//! the real commands: a declared client moved in the config moves with its
//! files (or the change is refused with the reason), and `status` only
//! reads, even for a user who may only read, even while the config file on
//! disk is broken.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tempfile::TempDir;
use tollgate::client::{Session, Upload};

fn config(d: &Path, decl_customer: &str) -> String {
    format!(
        r#"[server]
listen = ["127.0.0.1:0"]
state = "sqlite://state/state.db"
timezone = "UTC"
metrics_listen = "127.0.0.1:0"

[default_customer]
backup_location = "{d}/backup/default"

[[reseller]]
name = "r"

[[customer]]
name = "Alpha"
reseller = "r"
email = "a@x.example"
backup_location = "{d}/backup/alpha"
space = "1 GiB"

[[customer]]
name = "Beta"
reseller = "r"
email = "b@x.example"
backup_location = "{d}/backup/beta"
space = "1 GiB"

[[customer]]
name = "Tiny"
reseller = "r"
email = "t@x.example"
backup_location = "{d}/backup/tiny"
space = "1 KiB"

[[client]]
id = "DECL"
customer = "{decl_customer}"
"#,
        d = d.display()
    )
}

fn metric(d: &Daemon, name: &str) -> f64 {
    let (_, body) = http_get(d.metrics.as_deref().unwrap(), "/metrics");
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

/// CONFIG.md "Moving a client": a declared client moves by editing the
/// config, and its files move with it, as `clients move` moves them; a
/// move the target cannot take is refused with the reason, and nothing
/// moves.
#[tokio::test(flavor = "multi_thread")]
async fn a_declared_client_moved_in_the_config_moves_with_its_files() {
    let dir = TempDir::new().unwrap();
    let d0 = dir.path();
    std::fs::write(d0.join("tollgate.toml"), config(d0, "Alpha")).unwrap();
    let d = Daemon::start(d0);
    let mut files = Vec::new();
    for i in 0..3u64 {
        let p = d0.join(format!("src/{i}.bin"));
        make_file(&p, 200_000 + i as usize, i);
        files.push(Upload {
            local: p,
            remote: format!("docs/{i}.bin"),
            ..Default::default()
        });
    }
    let o = d.opts("DECL");
    let mut s = Session::connect(&o).await.unwrap();
    assert_eq!(s.welcome.customer, "Alpha");
    assert!(
        s.upload(&files, &|_| {})
            .await
            .unwrap()
            .iter()
            .all(|r| r.is_ok())
    );
    s.bye().await.unwrap();

    replace_config(d0, &config(d0, "Beta"));
    assert!(
        wait_until(Duration::from_secs(10), || moved_and_reloaded(&d.log())),
        "the daemon applied the move:\n{}",
        d.log()
    );
    assert!(
        !d0.join("backup/alpha/DECL").exists(),
        "nothing is stranded"
    );
    assert!(d0.join("backup/beta/DECL/docs/0.bin").exists());
    let mut s = Session::connect(&o).await.unwrap();
    assert_eq!(s.welcome.customer, "Beta");
    for (i, f) in files.iter().enumerate() {
        let dest = d0.join(format!("restored/{i}.bin"));
        s.get(&f.remote, &dest).await.unwrap();
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            std::fs::read(&f.local).unwrap()
        );
    }
    s.bye().await.unwrap();

    // Tiny has 1 KiB: the move is refused, with the reason, and nothing
    // changes: the running config stays, the files stay where they are.
    let before = metric(&d, "tollgate_reloads_total{result=\"failed\"}");
    replace_config(d0, &config(d0, "Tiny"));
    assert!(
        wait_until(Duration::from_secs(10), || metric(
            &d,
            "tollgate_reloads_total{result=\"failed\"}"
        ) > before),
        "the reload was not refused:\n{}",
        d.log()
    );
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("reload refused"))
        .expect("a refused reload in the log");
    assert!(
        line.contains("Tiny") && line.contains("lacks space"),
        "{line}"
    );
    assert_eq!(metric(&d, "tollgate_reload_failed"), 1.0);
    assert!(d0.join("backup/beta/DECL/docs/0.bin").exists());
    assert!(!d0.join("backup/tiny/DECL").exists());
    let s = Session::connect(&o).await.unwrap();
    assert_eq!(
        s.welcome.customer, "Beta",
        "the config in force is the last good one"
    );
    s.bye().await.unwrap();
    // status says where it is and what the file asks for.
    let out = admin_ok(&d.config, &["status"], &[]);
    assert!(
        out.contains("moves to customer Tiny when the daemon applies"),
        "{out}"
    );
}

fn run_as_reader(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // root can write anything: read as `nobody` instead.
        cmd.uid(65534).gid(65534);
    }
}

fn chmod_tree(p: &Path, dir_mode: u32, file_mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(p).unwrap();
    let mode = if meta.is_dir() { dir_mode } else { file_mode };
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    if meta.is_dir() {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            chmod_tree(&e.path(), dir_mode, file_mode);
        }
    }
}

/// The files of a state directory with their digests. SQLite's reader
/// files (`-shm`, an empty `-wal`) are not content: a reader makes them.
fn digest_tree(p: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let reader_file =
            name.ends_with("-shm") || (name.ends_with("-wal") && e.metadata().unwrap().len() == 0);
        if e.file_type().unwrap().is_file() && !reader_file {
            let bytes = std::fs::read(e.path()).unwrap();
            out.push((
                e.file_name().to_string_lossy().into_owned(),
                sha256_hex(&bytes),
            ));
        }
    }
    out.sort();
    out
}

/// A `state_dir` apart from the SQLite file, not made yet: the daemon's
/// first start makes it and saves the applied copy there at once, for
/// `status` to fall back on (before, it warned that saving failed, and the
/// copy appeared only after a reload).
#[tokio::test(flavor = "multi_thread")]
async fn the_first_start_saves_the_applied_copy_in_a_new_state_dir() {
    let dir = TempDir::new().unwrap();
    let d0 = dir.path();
    let state_dir = d0.join("var/lib/tollgate");
    let cfg = config(d0, "Alpha").replace(
        "state = \"sqlite://state/state.db\"\n",
        &format!(
            "state = \"sqlite://state/state.db\"\nstate_dir = \"{}\"\n",
            state_dir.display()
        ),
    );
    assert!(cfg.contains("state_dir"));
    std::fs::write(d0.join("tollgate.toml"), &cfg).unwrap();
    let mut d = Daemon::start(d0);
    let copy = state_dir.join("applied-config.toml");
    assert_eq!(
        std::fs::read_to_string(&copy).ok().as_deref(),
        Some(cfg.as_str()),
        "{}",
        d.log()
    );
    assert!(
        !d.log().contains("saving the applied configuration failed"),
        "{}",
        d.log()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state_dir), 0o700);
    assert_eq!(mode(&copy), 0o600);
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(20)), Some(0));
}

/// `status` and `clients list` only read: they work for a user who may
/// only read the database, change no byte of it, and go on while the
/// config file on disk is broken (showing the state against the config
/// the daemon last applied, with the file's errors).
#[tokio::test(flavor = "multi_thread")]
async fn status_only_reads_even_with_a_broken_config() {
    let dir = TempDir::new().unwrap();
    let d0 = dir.path();
    std::fs::write(d0.join("tollgate.toml"), config(d0, "Alpha")).unwrap();
    let mut d = Daemon::start(d0);
    let file = d0.join("f.bin");
    make_file(&file, 1000, 1);
    let o = d.opts("DECL");
    let mut s = Session::connect(&o).await.unwrap();
    s.upload(
        &[Upload {
            local: file,
            remote: "f.bin".into(),
            ..Default::default()
        }],
        &|_| {},
    )
    .await
    .unwrap();
    s.bye().await.unwrap();
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(20)), Some(0));

    // The file breaks, and a client is declared there that the daemon has
    // never seen.
    let broken = config(d0, "Alpha").replace("space = \"1 GiB\"", "space = \"1 GiB\"\nspacee = 3")
        + "\n[[client]]\nid = \"NEWCOMER\"\ncustomer = \"Beta\"\n";
    std::fs::write(d0.join("tollgate.toml"), &broken).unwrap();
    chmod_tree(d0, 0o755, 0o644);
    chmod_tree(&d0.join("state"), 0o555, 0o444);
    let before = digest_tree(&d0.join("state"));
    for args in [&["status"][..], &["status", "--json"], &["clients", "list"]] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.args(args)
            .arg("--config")
            .arg(d0.join("tollgate.toml"))
            .env("TOLLGATE_FAKE_NOW", PINNED_NOW);
        run_as_reader(&mut cmd);
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stdout.contains("DECL"), "{args:?}: {stdout}");
        assert!(
            stderr.contains("unknown key") || stderr.contains("spacee"),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains("is not in force; showing the state against the configuration the daemon last applied"), "{stderr}");
        // The applied config knows nothing of NEWCOMER: it is not shown
        // as if it were in force.
        assert!(!stdout.contains("NEWCOMER"), "{stdout}");
    }
    chmod_tree(&d0.join("state"), 0o755, 0o644);
    assert_eq!(
        digest_tree(&d0.join("state")),
        before,
        "a read-only command changed the state"
    );

    // With a valid file, a declared client the daemon has not recorded yet
    // shows as not yet connected, and still nothing is written.
    let fixed = config(d0, "Alpha") + "\n[[client]]\nid = \"NEWCOMER\"\ncustomer = \"Beta\"\n";
    std::fs::write(d0.join("tollgate.toml"), fixed).unwrap();
    let out = admin_ok(&d0.join("tollgate.toml"), &["status"], &[]);
    assert!(
        out.contains("NEWCOMER (desktop, not yet connected)"),
        "{out}"
    );
    assert_eq!(digest_tree(&d0.join("state")), before);
}

/// Issue 12, item 9: what the reference client backs up comes back as it
/// was: under its full path (two folders of one name do not collide), with
/// its mode and modification time; files that have not changed are not
/// sent again unless `--full`.
#[tokio::test(flavor = "multi_thread")]
async fn the_reference_client_gives_back_paths_modes_and_times() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new().unwrap();
    let d0 = dir.path();
    write_config(
        d0,
        "",
        &format!(
            "[default_customer]\nauto_add_clients = true\nbackup_location = \"{}/backup\"\n",
            d0.display()
        ),
    );
    let d = Daemon::start(d0);
    let work = d0.join("work");
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    for (folder, body, mode) in [("a", "private", 0o600), ("b", "public", 0o644)] {
        let p = work.join(folder).join("Documents/x.txt");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, body).unwrap();
        set_mode_and_mtime(&p, mode, old);
    }
    let client = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .current_dir(&work)
            .arg("client")
            .args(args)
            .args([
                "--server",
                &d.addr,
                "--pin",
                &d.pin,
                "--id",
                "LAPTOP",
                "--secret-file",
            ])
            .arg(d0.join("laptop.secret"))
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (out, _) = client(&["backup", "a/Documents", "b/Documents"]);
    assert!(out.contains("stored 2 of 2 file(s)"), "{out}");
    let (out, _) = client(&["list", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let paths: Vec<&str> = doc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["a/Documents/x.txt", "b/Documents/x.txt"]);

    // Nothing changed: nothing is sent.
    let (out, err) = client(&["backup", "a/Documents", "b/Documents"]);
    assert!(err.contains("2 file(s) unchanged"), "{err}");
    assert!(out.contains("stored 0 of 0 file(s)"), "{out}");
    // One changed: that one is sent; --full sends both.
    std::fs::write(work.join("b/Documents/x.txt"), "public, edited").unwrap();
    let (out, err) = client(&["backup", "a/Documents", "b/Documents"]);
    assert!(
        err.contains("1 file(s) unchanged") && out.contains("stored 1 of 1 file(s)"),
        "{out}{err}"
    );
    let (out, _) = client(&["backup", "--full", "a/Documents", "b/Documents"]);
    assert!(out.contains("stored 2 of 2 file(s)"), "{out}");

    let dest = d0.join("restored");
    let (out, _) = client(&["restore", dest.to_str().unwrap()]);
    assert!(out.contains("restored 2 file(s)"), "{out}");
    let a = dest.join("a/Documents/x.txt");
    assert_eq!(std::fs::read_to_string(&a).unwrap(), "private");
    let meta = std::fs::metadata(&a).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(meta.modified().unwrap(), old);
    let b = dest.join("b/Documents/x.txt");
    assert_eq!(std::fs::read_to_string(&b).unwrap(), "public, edited");
    assert_eq!(
        std::fs::metadata(&b).unwrap().permissions().mode() & 0o7777,
        0o644
    );
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// CONFIG.md Additions: every file the daemon makes is 0600 and every
/// directory 0700, whatever the umask it was started with; a backup
/// location made by hand that others can open draws a warning at start.
#[tokio::test(flavor = "multi_thread")]
async fn every_file_the_daemon_makes_is_its_own() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new().unwrap();
    let d0 = dir.path();
    // An admin's mkdir with umask 022.
    std::fs::create_dir_all(d0.join("backup/alpha")).unwrap();
    std::fs::set_permissions(
        d0.join("backup/alpha"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let spool = d0.join("spool/mail");
    let text = config(d0, "Alpha").replacen(
        "metrics_listen = \"127.0.0.1:0\"\n",
        &format!(
            "metrics_listen = \"127.0.0.1:0\"\n\n[server.email]\nfrom = \"t@x.example\"\nadmin = \"noc@x.example\"\nspool = \"{}\"\nreport_interval = \"0s\"\n",
            spool.display()
        ),
        1,
    )
    .replacen(
        "email = \"a@x.example\"\n",
        "email = \"a@x.example\"\nemail_reports = true\n",
        1,
    );
    std::fs::write(d0.join("tollgate.toml"), text).unwrap();
    // The daemon inherits a permissive umask, as from a login shell.
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o022));
    let d = Daemon::start(d0);
    let log = d.log();
    let warned = log
        .lines()
        .find(|l| l.contains("backup_location is open to other users"))
        .unwrap_or_else(|| panic!("no warning about backup/alpha:\n{log}"));
    assert!(
        warned.contains("Alpha") && warned.contains("0755"),
        "{warned}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("open to other users") && l.contains("Beta")),
        "Beta's location was made by the daemon: {log}"
    );

    let src = d0.join("src/a.bin");
    make_file(&src, 10_000, 1);
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut s = Session::connect(&d.opts("DECL")).await.unwrap();
    let up = Upload::new(src.clone(), "deep/er/a.bin".into()).unwrap();
    assert!(s.upload(&[up], &|_| {}).await.unwrap()[0].is_ok());
    s.bye().await.unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || std::fs::read_dir(&spool)
            .map(|r| r
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".eml")))
            .unwrap_or(false)),
        "a report reached the spool:\n{}",
        d.log()
    );

    let mut files = vec![
        d0.join("backup/alpha/DECL/deep/er/a.bin"),
        d0.join("state/state.db"),
        d0.join("state/applied-config.toml"),
    ];
    let mut dirs = vec![
        d0.join("backup/alpha/DECL"),
        d0.join("backup/alpha/DECL/deep"),
        d0.join("backup/alpha/DECL/deep/er"),
        d0.join("backup/beta"),
        d0.join("backup/default"),
        d0.join("spool/mail"),
        d0.join("spool"),
    ];
    let mut todo = vec![d0.join("state")];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p.clone());
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    for e in std::fs::read_dir(&spool).unwrap().flatten() {
        files.push(e.path());
    }
    assert!(
        files.iter().any(|p| p.to_string_lossy().ends_with(".key")),
        "the self-signed key is among them: {files:?}"
    );
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    for p in &dirs {
        assert_eq!(mode(p), 0o700, "{}", p.display());
    }
}
