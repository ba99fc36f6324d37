//! `tollgate state migrate --to URL` (CLI.md; issue 14) against a real
//! PostgreSQL: state made by the real daemon goes SQLite → PostgreSQL →
//! SQLite, and the copy shows the same `status` and the same rows, checked
//! here independently of the command's own verification.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use tempfile::TempDir;

fn body(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "[server.mcal]\npool = 10\n\
         [[reseller]]\nname = \"r\"\nspace = \"10 MiB\"\n\
         [[customer]]\nname = \"Acme\"\nreseller = \"r\"\nemail = \"a@x.example\"\nbackup_location = \"{d}/acme\"\nauto_add_clients = true\nspace = \"4 MiB\"\nmcal_limit = 3\n\
         [[customer]]\nname = \"Zeta\"\nreseller = \"r\"\nemail = \"z@x.example\"\nbackup_location = \"{d}/zeta\"\nauto_add_clients = true\nspace = \"2 MiB\"\n"
    )
}

/// Runs `tollgate ARGS --config CONFIG` at the tests' pinned time.
fn tollgate(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("TOLLGATE_FAKE_NOW", PINNED_NOW)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config like the one in `dir`, with `state` replaced.
fn config_with_state(dir: &Path, name: &str, state: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(dir.join("tollgate.toml")).unwrap();
    let text = text.replace(
        "state = \"sqlite://state/state.db\"",
        &format!("state = \"{state}\""),
    );
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Every row of every table of a SQLite file, as sorted text, with the
/// identity counters: compared as a whole, not through the command.
async fn dump(path: &Path) -> Vec<String> {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", path.display()))
        .await
        .unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name <> '_sqlx_migrations' ORDER BY name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut out = Vec::new();
    for t in tables {
        let cols: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info(?)")
            .bind(&t)
            .fetch_all(&pool)
            .await
            .unwrap();
        let expr: Vec<String> = cols.iter().map(|c| format!("quote({c})")).collect();
        let mut rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM {t}",
            expr.join(" || ',' || ")
        )))
        .fetch_all(&pool)
        .await
        .unwrap();
        rows.sort();
        out.extend(rows.into_iter().map(|r| format!("{t}: {r}")));
    }
    pool.close().await;
    out
}

/// (table, column, type, not null) of every column of a SQLite state, in
/// PostgreSQL's terms.
async fn sqlite_columns(path: &Path) -> Vec<(String, String, String, bool)> {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", path.display()))
        .await
        .unwrap();
    let rows: Vec<(String, String, String, bool)> = sqlx::query_as(
        "SELECT m.name, p.name, p.type, p.\"notnull\" OR p.pk
           FROM sqlite_master m, pragma_table_info(m.name) p
          WHERE m.type = 'table' AND m.name NOT IN ('sqlite_sequence', '_sqlx_migrations')",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    let mut out: Vec<_> = rows
        .into_iter()
        .map(|(t, c, ty, nn)| {
            let ty = match ty.as_str() {
                "INTEGER" => "bigint",
                "TEXT" => "text",
                "BLOB" => "bytea",
                other => panic!("{t}.{c}: type {other}"),
            };
            (t, c, ty.to_string(), nn)
        })
        .collect();
    out.sort();
    out
}

/// The same of a PostgreSQL state.
async fn pg_columns(url: &str) -> Vec<(String, String, String, bool)> {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    // PostgreSQL's own tables, for several nodes, are not SQLite's.
    let mut skip = vec!["_sqlx_migrations".to_string()];
    skip.extend(
        tollgate::state::postgres::CLUSTER_TABLES
            .iter()
            .map(|t| t.to_string()),
    );
    let mut out: Vec<(String, String, String, bool)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text, is_nullable = 'NO'
           FROM information_schema.columns
          WHERE table_schema = current_schema() AND NOT (table_name::text = ANY($1))",
    )
    .bind(&skip)
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    out.sort();
    out
}

/// Stores `files` (name, bytes) as `id` under `customer`.
async fn backup(d: &Daemon, dir: &Path, id: &str, customer: &str, files: &[(&str, usize)]) {
    let mut o = d.opts(id);
    o.customer = Some(customer.into());
    let mut s = tollgate::client::Session::connect(&o).await.unwrap();
    let mut ups = Vec::new();
    for (i, (name, size)) in files.iter().enumerate() {
        let local = dir.join(format!("{id}-{name}"));
        make_file(&local, *size, i as u64 + 7);
        ups.push(tollgate::client::Upload {
            local,
            remote: (*name).into(),
            ..Default::default()
        });
    }
    let stored = s.upload(&ups, &|_| {}).await.unwrap();
    assert!(stored.iter().all(|r| r.is_ok()), "{stored:?}");
    s.bye().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_to_postgres_and_back_keeps_every_row_and_the_status() {
    let Some(pg) = PgDb::create("sqlite_to_postgres_and_back").await else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let config = write_config(dir.path(), "", &body(dir.path()));
    let mut d = Daemon::start(dir.path());
    backup(
        &d,
        dir.path(),
        "ACME-PC1",
        "Acme",
        &[("a.bin", 300_000), ("dir/é b.txt", 10)],
    )
    .await;
    backup(
        &d,
        dir.path(),
        "ACME-FS1",
        "Acme",
        &[("big.img", 1_000_000)],
    )
    .await;
    backup(&d, dir.path(), "ZETA-1", "Zeta", &[("z", 1)]).await;
    // A refusal: a client id the protocol forbids.
    let mut o = d.opts("bad id!");
    o.customer = Some("Acme".into());
    assert!(tollgate::client::Session::connect(&o).await.is_err());

    // Refused while the daemon serves the state.
    let (code, _, err) = tollgate(&config, &["state", "migrate", "--to", &pg.url]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("stop it first"), "{err}");

    // A removal refunds a licence and leaves an event, with the daemon
    // stopped (so the command applies it itself).
    d.signal("TERM");
    assert_eq!(d.wait(std::time::Duration::from_secs(30)), Some(0));
    let (code, _, err) = tollgate(&config, &["clients", "remove", "ZETA-1"]);
    assert_eq!(code, Some(0), "{err}");

    let (_, status_before, _) = tollgate(&config, &["status", "--json"]);
    let (_, clients_before, _) = tollgate(&config, &["clients", "list", "--json"]);
    assert!(status_before.contains("ACME-FS1"), "{status_before}");

    let (code, out, err) = tollgate(&config, &["state", "migrate", "--to", &pg.url]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("verified: 20 tables"), "{out}");
    assert!(out.contains("files"), "{out}");

    // The two schemas: the same tables and columns, types and NOT NULLs.
    let original = dir.path().join("state").join("state.db");
    assert_eq!(sqlite_columns(&original).await, pg_columns(&pg.url).await);

    // Into a database that already holds state: refused, nothing changed.
    let (code, _, err) = tollgate(&config, &["state", "migrate", "--to", &pg.url]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is not empty: table clients has rows"),
        "{err}"
    );

    // Same kind: refused.
    let other = format!("sqlite://{}/other.db", dir.path().display());
    let (code, _, err) = tollgate(&config, &["state", "migrate", "--to", &other]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("other kind of database"), "{err}");
    assert!(!dir.path().join("other.db").exists());

    // The PostgreSQL copy, served as it is, shows the same status.
    let on_pg = config_with_state(dir.path(), "pg.toml", &pg.url);
    let (code, status_pg, err) = tollgate(&on_pg, &["status", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let (_, clients_pg, _) = tollgate(&on_pg, &["clients", "list", "--json"]);
    assert_eq!(status_before, status_pg);
    assert_eq!(clients_before, clients_pg);

    // And back, from a config whose state is the PostgreSQL copy.
    let copy = dir.path().join("copy").join("state.db");
    let to = format!("sqlite://{}", copy.display());
    let (code, out, err) = tollgate(&on_pg, &["state", "migrate", "--to", &to]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("verified"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let (a, b) = (dump(&original).await, dump(&copy).await);
    assert!(
        a.iter()
            .any(|r| r.starts_with("files: 'ACME-PC1','dir/é b.txt'")),
        "{a:#?}"
    );
    assert!(a.iter().any(|r| r.starts_with("refusals: ")), "{a:#?}");
    assert!(a.iter().any(|r| r.starts_with("client_events: ")), "{a:#?}");
    assert!(
        a.iter()
            .any(|r| r.starts_with("sqlite_sequence: 'client_events'")),
        "{a:#?}"
    );
    assert_eq!(a, b);

    let on_copy = config_with_state(dir.path(), "copy.toml", &to);
    let (_, status_after, _) = tollgate(&on_copy, &["status", "--json"]);
    let (_, clients_after, _) = tollgate(&on_copy, &["clients", "list", "--json"]);
    assert_eq!(status_before, status_after);
    assert_eq!(clients_before, clients_after);
}

#[tokio::test]
async fn a_bad_target_is_refused_with_the_reason() {
    let dir = TempDir::new().unwrap();
    let config = write_config(dir.path(), "", &body(dir.path()));
    // No state yet.
    let (code, _, err) = tollgate(
        &config,
        &["state", "migrate", "--to", "postgres://x@127.0.0.1:1/db"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no state database"), "{err}");
    let mut d = Daemon::start(dir.path());
    d.signal("TERM");
    assert_eq!(d.wait(std::time::Duration::from_secs(30)), Some(0));
    let (code, _, err) = tollgate(&config, &["state", "migrate", "--to", "mysql://x/y"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("use sqlite:///path/to/state.db or postgres://"),
        "{err}"
    );
    // A password in the URL is not echoed.
    let (code, out, err) = tollgate(
        &config,
        &[
            "state",
            "migrate",
            "--to",
            "postgres://u:hunter2@127.0.0.1:1/db",
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        !out.contains("hunter2") && !err.contains("hunter2"),
        "{out}\n{err}"
    );
}
