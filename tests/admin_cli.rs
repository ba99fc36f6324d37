//! `tollgate status` and `tollgate clients …` against a seeded SQLite state,
//! run as the binary an administrator uses.

use std::path::Path;
use std::process::{Command, Output};
use tempfile::TempDir;
use tollgate::config::{Config, Kind};
use tollgate::policy::admission::RejectCode;
use tollgate::state::{PendingCommit, SessionEnd, SessionStart, State};

const GIB: u64 = 1 << 30;

/// The instant the state is seeded at and the commands run at: a Wednesday
/// at 23:30 in Berlin, inside CONTOSO-FS01's 20:00-06:00 window, so the
/// throttle `status` shows does not depend on the hour the test runs.
const NOW: &str = "2026-11-18T22:30:00Z";

fn now() -> jiff::Timestamp {
    NOW.parse().unwrap()
}

fn write_config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tollgate.toml");
    std::fs::write(
        &path,
        r#"
[server]
timezone = "Europe/Berlin"
state = "sqlite://state/state.db"
total_space = "20 TiB"
[server.mcal]
pool = 1000
[server.throttle]
rate = "100 Mbit/s"

[default_customer]
backup_location = "./backup/default"
space = "1 TiB"
auto_add_clients = true

[[reseller]]
name = "northwind"
space = "5 TiB"
mcal_limit = 100

[[customer]]
name = "Contoso"
reseller = "northwind"
email = "it@contoso.example"
backup_location = "./backup/contoso"
space = "500 GiB"
max_clients = 40
mcal_limit = 25

[[customer]]
name = "Fabrikam"
reseller = "northwind"
email = "it@fabrikam.example"
backup_location = "./backup/fabrikam"
space = "10 GiB"
activated = false

[[client]]
id = "CONTOSO-FS01"
customer = "Contoso"
kind = "server"
space = "200 GiB"
throttle = { rate = "20 MiB/s", hours = "20:00-06:00" }
schedules = { nightly = { throttle = { enabled = false } } }
"#,
    )
    .unwrap();
    path
}

async fn seed(cfg: &Config) {
    let st = State::open(cfg).await.unwrap();
    st.sync_declared(cfg, "2026-11-25T12:00:00Z".parse().unwrap(), |_, _, _| {
        Ok(())
    })
    .await
    .unwrap()
    .unwrap();
    let t = now();
    let contoso = cfg.customer_by_name("Contoso").unwrap();
    for (id, size) in [
        ("CONTOSO-FS01", 12 * GIB + 3 * GIB / 10),
        ("CONTOSO-PC1", GIB),
    ] {
        if id != "CONTOSO-FS01" {
            st.register_client(cfg, id, contoso, Kind::Desktop, Some("pc1.contoso"), t)
                .await
                .unwrap()
                .unwrap();
        }
        st.debit_mcal_for_month(cfg, id, t).await.unwrap().unwrap();
        let r = st.reserve_space(cfg, id, size, t).await.unwrap().unwrap();
        let p = st
            .begin_commit(&PendingCommit {
                client: id.into(),
                path: "big.img".into(),
                temp_path: "/nonexistent/t".into(),
                final_path: "/nonexistent/f".into(),
                size,
                sha256: "0".repeat(64),
                modified: t,
                reservation: Some(r),
                ..Default::default()
            })
            .await
            .unwrap();
        st.commit_file(p).await.unwrap();
    }
    st.start_session(&SessionStart {
        id: "s1",
        client: "CONTOSO-PC1",
        customer: "Contoso",
        schedule: "nightly",
        intent: "backup",
        peer: None,
        at: t,
    })
    .await
    .unwrap();
    st.end_session(
        "s1",
        &SessionEnd {
            at: t,
            bytes_in: GIB,
            bytes_out: 0,
            files_ok: 1,
            files_failed: 0,
            result: "ok",
        },
        &[],
    )
    .await
    .unwrap();
    st.record_refusal(
        t,
        "STRANGER",
        Some("Contoso"),
        RejectCode::AuthFailed,
        Some("192.0.2.1".parse().unwrap()),
    )
    .await
    .unwrap();
    st.close().await;
}

fn tollgate(cfg: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .env("TOLLGATE_CONFIG", cfg)
        .env("TOLLGATE_FAKE_NOW", NOW)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn status_shows_the_tree_with_readable_numbers() {
    let dir = TempDir::new().unwrap();
    let path = write_config(dir.path());
    let cfg = Config::load(&path).unwrap();
    seed(&cfg).await;

    let out = tollgate(&path, &["status"]);
    let s = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{s}{}", text(&out.stderr));
    for want in [
        "customer Contoso: 13.3 GiB of 500 GiB used",
        "2 client(s) of 40",
        "MCAL 25: 3 debited, 3 this month, 22 available",
        "1 refused in 24 h",
        "CONTOSO-FS01 (server, not yet connected): 12.3 GiB of 200 GiB stored",
        "CONTOSO-PC1 (desktop): 1 GiB stored; last backup 20",
        "all schedules: 100 Mbit/s",
        "other schedules: 20 MiB/s",
        "nightly: unthrottled",
        "customer Fabrikam [DEACTIVATED]",
        "reseller northwind: 13.3 GiB of 5 TiB used",
        "server: 13.3 GiB of 20 TiB used",
    ] {
        assert!(s.contains(want), "missing {want:?} in:\n{s}");
    }

    let out = tollgate(&path, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    let contoso = &doc["resellers"][0]["customers"][0];
    assert_eq!(contoso["name"], "Contoso");
    assert_eq!(contoso["space"]["used"], 13 * GIB + 3 * GIB / 10);
    assert_eq!(contoso["mcal"]["available"], 22);
    assert_eq!(contoso["refusals_24h"], 1);
    let fs01 = contoso["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "CONTOSO-FS01")
        .unwrap();
    assert_eq!(fs01["throttle_now"][0]["schedule"], "nightly");
    assert_eq!(fs01["throttle_now"][0]["rate"], serde_json::Value::Null);
    assert!(
        contoso["clients"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == "CONTOSO-PC1" && c["last_backup"].is_i64())
    );
    assert_eq!(doc["server"]["mcal"]["debited"], 3);
    assert_eq!(doc["resellers"][0]["customers"][1]["activated"], false);
}

#[tokio::test]
async fn clients_list_move_and_remove() {
    let dir = TempDir::new().unwrap();
    let path = write_config(dir.path());
    let cfg = Config::load(&path).unwrap();
    seed(&cfg).await;

    let out = tollgate(&path, &["clients", "list"]);
    let s = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    let lines: Vec<&str> = s.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("LAST SEEN"),
        "{s}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("CONTOSO-PC1") && l.contains("Contoso") && l.contains("1 GiB")),
        "{s}"
    );

    // Fabrikam has 10 GiB; the client stores 1 GiB, but the move is refused
    // for the declared one and accepted for PC1... after a refused attempt to
    // a customer without room.
    std::fs::create_dir_all(dir.path().join("backup/contoso/CONTOSO-PC1")).unwrap();
    std::fs::write(dir.path().join("backup/contoso/CONTOSO-PC1/big.img"), b"x").unwrap();
    let out = tollgate(
        &path,
        &["clients", "move", "CONTOSO-FS01", "--to", "Fabrikam"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("declared in the config"),
        "{}",
        text(&out.stderr)
    );

    let small = tollgate(
        &path,
        &["clients", "move", "CONTOSO-PC1", "--to", "Default Customer"],
    );
    assert_eq!(small.status.code(), Some(0), "{}", text(&small.stderr));
    assert!(
        dir.path()
            .join("backup/default/CONTOSO-PC1/big.img")
            .exists()
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&tollgate(&path, &["status", "--json"]).stdout).unwrap();
    assert_eq!(doc["default_customer"]["space"]["used"], GIB);
    assert_eq!(
        doc["resellers"][0]["customers"][0]["space"]["used"],
        12 * GIB + 3 * GIB / 10
    );

    let none = tollgate(&path, &["clients", "remove", "NOBODY"]);
    assert_eq!(none.status.code(), Some(1));
    let rm = tollgate(&path, &["clients", "remove", "CONTOSO-PC1", "--purge"]);
    assert_eq!(rm.status.code(), Some(0), "{}", text(&rm.stderr));
    assert!(
        text(&rm.stdout).contains("1 GiB freed"),
        "{}",
        text(&rm.stdout)
    );
    assert!(!dir.path().join("backup/default/CONTOSO-PC1").exists());
    let doc: serde_json::Value =
        serde_json::from_slice(&tollgate(&path, &["status", "--json"]).stdout).unwrap();
    assert_eq!(doc["default_customer"]["space"]["used"], 0);
}

#[tokio::test]
async fn a_move_without_room_is_refused_with_the_reason() {
    let dir = TempDir::new().unwrap();
    let path = write_config(dir.path());
    let cfg = Config::load(&path).unwrap();
    seed(&cfg).await;
    // HUGE stores 12 GiB; Fabrikam has 10 GiB in all.
    let st = State::open(&cfg).await.unwrap();
    let t = now();
    let contoso = cfg.customer_by_name("Contoso").unwrap();
    st.register_client(&cfg, "HUGE", contoso, Kind::Desktop, None, t)
        .await
        .unwrap()
        .unwrap();
    let r = st
        .reserve_space(&cfg, "HUGE", 12 * GIB, t)
        .await
        .unwrap()
        .unwrap();
    let p = st
        .begin_commit(&PendingCommit {
            client: "HUGE".into(),
            path: "x".into(),
            temp_path: "/nonexistent/t".into(),
            final_path: "/nonexistent/f".into(),
            size: 12 * GIB,
            sha256: "0".repeat(64),
            modified: t,
            reservation: Some(r),
            ..Default::default()
        })
        .await
        .unwrap();
    st.commit_file(p).await.unwrap();
    st.close().await;

    let out = tollgate(&path, &["clients", "move", "HUGE", "--to", "Fabrikam"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("refused") && err.contains("lacks space") && err.contains("Fabrikam"),
        "{err}"
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&tollgate(&path, &["status", "--json"]).stdout).unwrap();
    assert_eq!(
        doc["resellers"][0]["customers"][1]["space"]["used"], 0,
        "nothing moved"
    );
}

/// Issue 12, item 10: `clients list --json | head` is not an error.
#[tokio::test]
async fn a_reader_that_leaves_early_is_not_an_error() {
    use std::io::Read;
    let dir = TempDir::new().unwrap();
    let path = write_config(dir.path());
    let cfg = Config::load(&path).unwrap();
    seed(&cfg).await;
    let st = State::open(&cfg).await.unwrap();
    let contoso = cfg.customer_by_name("Contoso").unwrap();
    // Enough output to fill the pipe.
    for i in 0..38 {
        st.register_client(
            &cfg,
            &format!("FILLER-{i:04}-{}", "x".repeat(40)),
            contoso,
            Kind::Desktop,
            None,
            now(),
        )
        .await
        .unwrap()
        .unwrap();
    }
    st.close().await;
    for args in [
        &["clients", "list", "--json"][..],
        &["clients", "list"],
        &["status", "--json"],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .env("TOLLGATE_CONFIG", &path)
            .env("TOLLGATE_FAKE_NOW", NOW)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0u8; 16];
        child.stdout.take().unwrap().read_exact(&mut first).unwrap();
        // The reader goes (like `head -c 16`) while the command still writes.
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("Broken pipe") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
}
