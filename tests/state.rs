//! The state store with many concurrent tasks and pooled connections:
//! licences, client slots and space never go over. Every test runs twice,
//! against a real SQLite file and against a real PostgreSQL database
//! (`on_both!`; PostgreSQL comes from scripts/test).

mod common;

use std::path::Path;
use std::sync::Arc;
use tempfile::TempDir;
use tollgate::config::{Config, CustomerId, Kind};
use tollgate::policy::admission::{Hello, Registration, RejectCode};
use tollgate::state::{AdmitOutcome, MoveRefused, PendingCommit, Readmit, State};

const MIB: u64 = 1 << 20;

/// Which backend a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A test's temporary directory and, on PostgreSQL, its own database.
struct Fixture {
    dir: TempDir,
    pg: Option<common::PgDb>,
}

impl Fixture {
    /// `None` when PostgreSQL is wanted and there is none (said loudly;
    /// CI requires it).
    async fn new(backend: Backend, test: &str) -> Option<Fixture> {
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(common::PgDb::create(test).await?),
        };
        Some(Fixture {
            dir: TempDir::new().unwrap(),
            pg,
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn state_url(&self) -> String {
        match &self.pg {
            Some(pg) => pg.url.clone(),
            None => format!("sqlite://{}/state/state.db", self.dir.path().display()),
        }
    }
}

/// Runs the test function once on each backend, as `NAME::sqlite` and
/// `NAME::postgres`; the body finds its backend in `BACKEND`.
macro_rules! on_both {
    ($(#[$m:meta])* async fn $name:ident() $body:block) => {
        mod $name {
            use super::*;
            $(#[$m])*
            async fn sqlite() {
                const BACKEND: Backend = Backend::Sqlite;
                $body
            }
            $(#[$m])*
            async fn postgres() {
                const BACKEND: Backend = Backend::Postgres;
                $body
            }
        }
    };
}

/// The fixture for this test on `BACKEND`, or return (skipped).
macro_rules! fixture {
    () => {
        match Fixture::new(BACKEND, module_path!()).await {
            Some(f) => f,
            None => return,
        }
    };
}

fn config(dir: &Fixture, body: &str) -> Config {
    let src = format!(
        "[server]\ntimezone = \"Europe/Berlin\"\nstate = \"{}\"\n{body}\n[server.cluster]\nnode = \"test\"\n",
        dir.state_url()
    );
    Config::from_str(&src, &dir.path().join("tollgate.toml")).unwrap_or_else(|e| panic!("{e:#?}"))
}

async fn open(dir: &Path, cfg: &Config) -> State {
    let st = State::open(cfg).await.unwrap();
    st.sync_declared(cfg, "2026-11-25T12:00:00Z".parse().unwrap(), |_, _, _| {
        Ok(())
    })
    .await
    .unwrap()
    .unwrap();
    let _ = dir;
    st
}

fn hello(id: &str, customer: Option<&str>) -> Hello {
    Hello {
        protocol: 1,
        client_id: id.into(),
        customer: customer.map(str::to_string),
        schedule: "nightly".into(),
        ..Hello::default()
    }
}

fn at(s: &str) -> jiff::Timestamp {
    s.parse().unwrap()
}

/// Commits a file of `size` bytes to the index as the daemon would (the
/// disk side is not needed for usage accounting).
async fn commit(st: &State, cfg: &Config, client: &str, path: &str, size: u64) {
    let r = st
        .reserve_space(cfg, client, size, at("2026-11-25T12:00:00Z"))
        .await
        .unwrap()
        .expect("room");
    commit_reserved(st, client, path, size, r).await;
}

/// The index half of [`commit`], for reservation `r`.
async fn commit_reserved(st: &State, client: &str, path: &str, size: u64, r: i64) {
    let id = st
        .begin_commit(&PendingCommit {
            client: client.into(),
            path: path.into(),
            temp_path: "/nonexistent/tmp".into(),
            final_path: "/nonexistent/final".into(),
            size,
            sha256: "0".repeat(64),
            modified: at("2026-11-25T12:00:00Z"),
            reservation: Some(r),
            ..Default::default()
        })
        .await
        .unwrap();
    st.commit_file(id).await.unwrap();
}

/// The value of `sql`, a query of one number (NULL counts as 0).
async fn count(st: &State, sql: &str) -> i64 {
    let q = format!("SELECT CAST(COALESCE(({sql}), 0) AS BIGINT)");
    match st.cluster() {
        Some(c) => sqlx::query_scalar(sqlx::AssertSqlSafe(q))
            .fetch_one(c.pool())
            .await
            .unwrap(),
        None => {
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", st.path().display()))
                .await
                .unwrap();
            let n = sqlx::query_scalar(sqlx::AssertSqlSafe(q))
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            n
        }
    }
}

/// Runs `sql` (no parameters) on the test's database.
async fn exec(st: &State, sql: &str) -> Result<u64, sqlx::Error> {
    match st.cluster() {
        Some(c) => Ok(sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(c.pool())
            .await?
            .rows_affected()),
        None => {
            let pool =
                sqlx::SqlitePool::connect(&format!("sqlite://{}", st.path().display())).await?;
            let r = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                .execute(&pool)
                .await;
            pool.close().await;
            Ok(r?.rows_affected())
        }
    }
}

/// The running MCAL totals admission reads agree with the debits.
async fn assert_totals_match(st: &State) {
    let mismatches = count(
        st,
        "SELECT COUNT(*) FROM (
           SELECT 'global' AS scope, '' AS name, SUM(cost) AS sum FROM mcal_debits HAVING COUNT(*) > 0
           UNION ALL SELECT 'customer', customer, SUM(cost) FROM mcal_debits GROUP BY customer
           UNION ALL SELECT 'reseller', reseller, SUM(cost) FROM mcal_debits WHERE reseller IS NOT NULL GROUP BY reseller
         ) d FULL JOIN (SELECT * FROM mcal_totals WHERE total <> 0) t
           ON t.scope = d.scope AND t.name = d.name
         WHERE d.sum IS DISTINCT FROM t.total",
    )
    .await;
    assert_eq!(mismatches, 0, "mcal_totals differ from the debits");
}

on_both! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_first_backups_for_ten_mcals_debit_exactly_ten() {
    let dir = fixture!();
    let cfg = Arc::new(config(
        &dir,
        "[server.mcal]\npool = 1000\n[[reseller]]\nname = \"r\"\n[[customer]]\nname = \"C\"\nreseller = \"r\"\nemail = \"c@x.example\"\nbackup_location = \"/srv/c\"\nauto_add_clients = true\nmcal_limit = 10\n",
    ));
    let st = open(dir.path(), &cfg).await;
    let t = at("2026-11-25T12:00:00Z");
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (st, cfg) = (st.clone(), cfg.clone());
        tasks.push(tokio::spawn(async move {
            st.admit(
                &cfg,
                &hello(&format!("PC{i:03}"), Some("C")),
                Some("127.0.0.1".parse().unwrap()),
                t,
                false,
                false,
            )
            .await
            .unwrap()
        }));
    }
    let mut admitted = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            AdmitOutcome::Admitted {
                admitted: a,
                secret,
            } => {
                assert_eq!(a.registration, Registration::AutoAdded);
                assert!(secret.is_some());
                admitted += 1;
            }
            AdmitOutcome::Rejected(r) => {
                assert_eq!(r.code, RejectCode::McalExhausted, "{}", r.message);
                refused += 1;
            }
        }
    }
    assert_eq!((admitted, refused), (10, 90));
    assert_eq!(count(&st, "SELECT SUM(cost) FROM mcal_debits").await, 10);
    assert_totals_match(&st).await;
    // Refused first HELLOs registered nothing, and each was recorded.
    assert_eq!(count(&st, "SELECT COUNT(*) FROM clients").await, 10);
    assert_eq!(
        count(
            &st,
            "SELECT SUM(count) FROM refusals WHERE code = 'mcal_exhausted'"
        )
        .await,
        90
    );
}
}

on_both! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_registrations_for_ten_slots_register_exactly_ten() {
    let dir = fixture!();
    let cfg = Arc::new(config(
        &dir,
        "[default_customer]\nauto_add_clients = true\nmax_clients = 15\n",
    ));
    let st = open(dir.path(), &cfg).await;
    let t = at("2026-11-25T12:00:00Z");
    for i in 0..5 {
        st.register_client(
            &cfg,
            &format!("OLD{i}"),
            CustomerId::DEFAULT,
            Kind::Desktop,
            None,
            t,
        )
        .await
        .unwrap()
        .unwrap();
    }
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (st, cfg) = (st.clone(), cfg.clone());
        tasks.push(tokio::spawn(async move {
            st.register_client(
                &cfg,
                &format!("NEW{i:03}"),
                CustomerId::DEFAULT,
                Kind::Laptop,
                Some("h"),
                t,
            )
            .await
            .unwrap()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(secret) => {
                assert_eq!(secret.len(), 43, "32 bytes, base64url without padding");
                ok += 1;
            }
            Err(r) => assert_eq!(r.code, RejectCode::ClientLimit),
        }
    }
    assert_eq!(ok, 10);
    assert_eq!(count(&st, "SELECT COUNT(*) FROM clients").await, 15);

    // The same race through admission.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (st, cfg) = (st.clone(), cfg.clone());
        tasks.push(tokio::spawn(async move {
            st.admit(
                &cfg,
                &hello(&format!("LATE{i}"), None),
                None,
                t,
                false,
                false,
            )
            .await
            .unwrap()
        }));
    }
    for t in tasks {
        match t.await.unwrap() {
            AdmitOutcome::Rejected(r) => assert_eq!(r.code, RejectCode::ClientLimit),
            other => panic!("admitted past max_clients: {other:?}"),
        }
    }
    assert_eq!(count(&st, "SELECT COUNT(*) FROM clients").await, 15);
}
}

/// 50 racing reservations by clients of `racers` against the last 1 MiB;
/// `caps` are (customers, bytes) that their reservations must not exceed.
async fn race_last_mib(
    dir: Fixture,
    body: &str,
    fill: &[(&str, &str, u64)],
    racers: &[&str],
    caps: &[(&[&str], u64)],
) {
    let cfg = Arc::new(config(&dir, body));
    let st = open(dir.path(), &cfg).await;
    let t = at("2026-11-25T12:00:00Z");
    for (client, customer, bytes) in fill {
        let cid = cfg.customer_by_name(customer).unwrap();
        st.register_client(&cfg, client, cid, Kind::Desktop, None, t)
            .await
            .unwrap()
            .unwrap();
        commit(&st, &cfg, client, "filler", *bytes).await;
    }
    for (i, c) in racers.iter().enumerate() {
        let cid = cfg.customer_by_name(c).unwrap();
        st.register_client(&cfg, &format!("R{i}"), cid, Kind::Desktop, None, t)
            .await
            .unwrap()
            .unwrap();
    }
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let (st, cfg) = (st.clone(), cfg.clone());
        // 40 KiB to 89 KiB each: together far more than 1 MiB.
        let size = (40 + i) * 1024;
        let client = format!("R{}", i as usize % racers.len());
        tasks.push(tokio::spawn(async move {
            (
                size,
                st.reserve_space(&cfg, &client, size, t).await.unwrap(),
            )
        }));
    }
    let (mut granted, mut refused) = (0u64, 0);
    for task in tasks {
        match task.await.unwrap() {
            (size, Ok(_)) => granted += size,
            (_, Err(q)) => {
                assert!(q.left < 89 * 1024, "refused with {} bytes left", q.left);
                refused += 1;
            }
        }
    }
    assert!(granted <= MIB, "{granted} bytes reserved against 1 MiB");
    assert!(
        granted > MIB - 2 * 89 * 1024,
        "only {granted} granted: refusals were not needed"
    );
    assert!(refused > 0);
    assert_eq!(st.reserved_total().await.unwrap(), granted);
    let totals = st.totals(&cfg, t).await.unwrap();
    for (customers, cap) in caps {
        let held: u64 = customers
            .iter()
            .map(|c| totals.customers[&c.to_lowercase()].reserved)
            .sum();
        assert!(held <= *cap, "{customers:?} hold {held} bytes, over {cap}");
    }
}

on_both! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_reservations_never_overrun_the_customer() {
    race_last_mib(
        fixture!(),
        "[[reseller]]\nname = \"r\"\nspace = \"1 GiB\"\n[[customer]]\nname = \"C\"\nreseller = \"r\"\nemail = \"c@x.example\"\nbackup_location = \"/srv/c\"\nspace = \"10 MiB\"\n",
        &[("F", "C", 9 * MIB)],
        &["C", "C", "C"],
        &[(&["C"], MIB)],
    )
    .await;
}
}

on_both! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_reservations_never_overrun_the_reseller() {
    // Each customer has room; together they have 1 MiB left under the reseller.
    race_last_mib(
        fixture!(),
        "[[reseller]]\nname = \"r\"\nspace = \"10 MiB\"\n[[customer]]\nname = \"A\"\nreseller = \"r\"\nemail = \"a@x.example\"\nbackup_location = \"/srv/a\"\nspace = \"6 MiB\"\n[[customer]]\nname = \"B\"\nreseller = \"r\"\nemail = \"b@x.example\"\nbackup_location = \"/srv/b\"\nspace = \"4 MiB\"\n",
        &[("F1", "A", 5 * MIB), ("F2", "B", 4 * MIB)],
        &["A", "A", "A"],
        &[(&["A", "B"], MIB)],
    )
    .await;
}
}

on_both! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_reservations_never_overrun_the_server() {
    // 1 MiB left on the server, half under each of its two children.
    race_last_mib(
        fixture!(),
        "total_space = \"10 MiB\"\n[default_customer]\nspace = \"5 MiB\"\n[[reseller]]\nname = \"r\"\nspace = \"5 MiB\"\n[[customer]]\nname = \"A\"\nreseller = \"r\"\nemail = \"a@x.example\"\nbackup_location = \"/srv/a\"\nspace = \"5 MiB\"\n",
        &[("F1", "Default Customer", 4 * MIB + MIB / 2), ("F2", "A", 4 * MIB + MIB / 2)],
        &["Default Customer", "A"],
        &[(&["Default Customer"], MIB / 2), (&["A"], MIB / 2), (&["Default Customer", "A"], MIB)],
    )
    .await;
}
}

on_both! {
#[tokio::test]
async fn a_month_change_lets_each_client_be_debited_once_more() {
    let dir = fixture!();
    let cfg = config(
        &dir,
        "[server.mcal]\npool = 100\n[default_customer]\nauto_add_clients = true\n",
    );
    let st = open(dir.path(), &cfg).await;
    let mut h = hello("LAPTOP", None);
    h.kind = Some("server".into());
    let debit = |o: AdmitOutcome| match o {
        AdmitOutcome::Admitted { admitted, secret } => {
            (admitted.mcal_debit.map(|(m, c)| (m.to_string(), c)), secret)
        }
        AdmitOutcome::Rejected(r) => panic!("{r:?}"),
    };
    // 22:30 UTC on 30 November is 23:30 in Berlin: still November.
    let (d, secret) = debit(
        st.admit(&cfg, &h, None, at("2026-11-30T22:30:00Z"), false, false)
            .await
            .unwrap(),
    );
    assert_eq!(d, Some(("2026-11".into(), 2)));
    h.secret = secret;
    let (d, _) = debit(
        st.admit(&cfg, &h, None, at("2026-11-30T22:50:00Z"), false, false)
            .await
            .unwrap(),
    );
    assert_eq!(d, None, "one debit per month");
    // 23:00 UTC is midnight in Berlin: December.
    let (d, _) = debit(
        st.admit(&cfg, &h, None, at("2026-11-30T23:00:00Z"), false, false)
            .await
            .unwrap(),
    );
    assert_eq!(d, Some(("2026-12".into(), 2)));
    let (d, _) = debit(
        st.admit(&cfg, &h, None, at("2026-12-15T12:00:00Z"), false, false)
            .await
            .unwrap(),
    );
    assert_eq!(d, None);
    assert_eq!(count(&st, "SELECT SUM(cost) FROM mcal_debits").await, 4);
    // debit_mcal_for_month agrees.
    assert_eq!(
        st.debit_mcal_for_month(&cfg, "LAPTOP", at("2026-12-20T12:00:00Z"))
            .await
            .unwrap(),
        Ok(0)
    );
    assert_eq!(
        st.debit_mcal_for_month(&cfg, "LAPTOP", at("2027-01-01T12:00:00Z"))
            .await
            .unwrap(),
        Ok(2)
    );
    // A restore needs no licence, so the pool running dry does not stop it.
}
}

on_both! {
#[tokio::test]
async fn wrong_and_missing_secrets_are_refused_and_recorded() {
    let dir = fixture!();
    let cfg = config(&dir, "[default_customer]\nauto_add_clients = true\n");
    let st = open(dir.path(), &cfg).await;
    let t = at("2026-11-25T12:00:00Z");
    let AdmitOutcome::Admitted {
        secret: Some(secret),
        ..
    } = st
        .admit(
            &cfg,
            &hello("PC", None),
            Some("10.0.0.1".parse().unwrap()),
            t,
            false,
            false,
        )
        .await
        .unwrap()
    else {
        panic!("first HELLO registers");
    };
    let mut h = hello("PC", None);
    for (s, want) in [
        (None, Some(RejectCode::AuthFailed)),
        (Some("nope".to_string()), Some(RejectCode::AuthFailed)),
        (Some(secret.clone()), None),
    ] {
        h.secret = s;
        match st
            .admit(&cfg, &h, Some("10.0.0.1".parse().unwrap()), t, false, false)
            .await
            .unwrap()
        {
            AdmitOutcome::Admitted { admitted, secret } => {
                assert_eq!(want, None);
                assert_eq!(
                    (admitted.registration, secret),
                    (Registration::Existing, None)
                );
            }
            AdmitOutcome::Rejected(r) => assert_eq!(Some(r.code), want),
        }
    }
    assert_eq!(
        count(
            &st,
            "SELECT SUM(count) FROM refusals WHERE code = 'auth_failed' AND source = '10.0.0.1'"
        )
        .await,
        2
    );
    // The stored value is a digest, never the secret.
    assert_eq!(
        count(
            &st,
            &format!("SELECT COUNT(*) FROM clients WHERE CAST(secret_sha256 AS TEXT) = '{secret}'")
        )
        .await,
        0
    );
}
}

const MOVE_CFG: &str = "[server.mcal]\npool = 100\n[default_customer]\nauto_add_clients = true\n
[[reseller]]\nname = \"r\"\nspace = \"100 MiB\"\n
[[customer]]\nname = \"Big\"\nreseller = \"r\"\nemail = \"b@x.example\"\nbackup_location = \"BIG\"\nspace = \"50 MiB\"\nmax_clients = 5\n
[[customer]]\nname = \"Tiny\"\nreseller = \"r\"\nemail = \"t@x.example\"\nbackup_location = \"TINY\"\nspace = \"1 MiB\"\n
[[customer]]\nname = \"Full\"\nreseller = \"r\"\nemail = \"f@x.example\"\nbackup_location = \"FULL\"\nspace = \"10 MiB\"\nmax_clients = 0\n
[[customer]]\nname = \"Broke\"\nreseller = \"r\"\nemail = \"k@x.example\"\nbackup_location = \"BROKE\"\nspace = \"10 MiB\"\nmcal_limit = 1\n
[[client]]\nid = \"DECL\"\ncustomer = \"Big\"\n";

fn move_cfg(dir: &Fixture) -> Config {
    let body = MOVE_CFG
        .replace("\"BIG\"", &format!("\"{}/big\"", dir.path().display()))
        .replace("\"TINY\"", &format!("\"{}/tiny\"", dir.path().display()))
        .replace("\"FULL\"", &format!("\"{}/full\"", dir.path().display()))
        .replace("\"BROKE\"", &format!("\"{}/broke\"", dir.path().display()));
    config(dir, &body)
}

on_both! {
#[tokio::test]
async fn move_client_moves_usage_and_data_and_refuses_with_reasons() {
    let dir = fixture!();
    let cfg = move_cfg(&dir);
    let st = open(dir.path(), &cfg).await;
    let t = at("2026-11-25T12:00:00Z");
    // PC lives under the Default Customer with 2 MiB and this month's debit.
    let AdmitOutcome::Admitted { .. } = st
        .admit(&cfg, &hello("PC", None), None, t, false, false)
        .await
        .unwrap()
    else {
        panic!()
    };
    commit(&st, &cfg, "PC", "a", 2 * MIB).await;
    let src_dir = tollgate::storage::client_dir(&cfg, CustomerId::DEFAULT, "PC");
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::write(src_dir.join("a"), b"data").unwrap();

    let mv = |to: &'static str| {
        let (st, cfg) = (st.clone(), cfg.clone());
        async move {
            st.move_client(&cfg, "PC", to, t, |_, from, to| {
                tollgate::storage::move_dir(
                    &tollgate::storage::client_dir(&cfg, from, "PC"),
                    &tollgate::storage::client_dir(&cfg, to, "PC"),
                )
            })
            .await
            .unwrap()
        }
    };
    assert!(
        matches!(mv("Tiny").await, Err(MoveRefused::Space { needed, .. }) if needed == 2 * MIB)
    );
    assert!(matches!(mv("Full").await, Err(MoveRefused::Slots(_))));
    // Broke's allotment of 1 cannot take another monthly debit once used.
    st.register_client(
        &cfg,
        "B1",
        cfg.customer_by_name("Broke").unwrap(),
        Kind::Desktop,
        None,
        t,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(st.debit_mcal_for_month(&cfg, "B1", t).await.unwrap(), Ok(1));
    assert!(matches!(mv("Broke").await, Err(MoveRefused::Mcal(_))));
    assert!(matches!(
        mv("Nobody").await,
        Err(MoveRefused::UnknownCustomer(_))
    ));
    assert!(matches!(
        mv("default customer").await,
        Err(MoveRefused::SameCustomer(..))
    ));
    let declared = st
        .move_client(&cfg, "DECL", "Tiny", t, |_, _, _| Ok(()))
        .await
        .unwrap();
    assert!(matches!(declared, Err(MoveRefused::Declared(_))));
    // Nothing moved yet.
    assert!(src_dir.join("a").exists());
    assert_eq!(
        count(
            &st,
            "SELECT used FROM customer_usage WHERE customer = 'Default Customer'"
        )
        .await,
        2 * MIB as i64
    );

    mv("Big").await.expect("Big has room");
    let big = cfg.customer_by_name("Big").unwrap();
    assert_eq!(
        std::fs::read(tollgate::storage::client_dir(&cfg, big, "PC").join("a")).unwrap(),
        b"data"
    );
    assert!(!src_dir.exists());
    assert_eq!(
        count(
            &st,
            "SELECT used FROM customer_usage WHERE customer = 'Default Customer'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &st,
            "SELECT used FROM customer_usage WHERE customer = 'Big'"
        )
        .await,
        2 * MIB as i64
    );
    // This month's debit stays with the Default Customer; next month's goes to Big.
    assert_eq!(
        count(
            &st,
            "SELECT COUNT(*) FROM mcal_debits WHERE client = 'PC' AND customer = 'Default Customer'"
        )
        .await,
        1
    );
    assert_eq!(st.debit_mcal_for_month(&cfg, "PC", t).await.unwrap(), Ok(0));
    assert_eq!(
        st.debit_mcal_for_month(&cfg, "PC", at("2026-12-02T12:00:00Z"))
            .await
            .unwrap(),
        Ok(1)
    );
    assert_eq!(count(&st, "SELECT COUNT(*) FROM mcal_debits WHERE client = 'PC' AND customer = 'Big' AND month = '2026-12'").await, 1);
}
}

on_both! {
#[tokio::test]
async fn remove_frees_the_month_and_purge_frees_the_space() {
    let dir = fixture!();
    let cfg = move_cfg(&dir);
    let st = open(dir.path(), &cfg).await;
    let t = at("2026-11-25T12:00:00Z");
    let big = cfg.customer_by_name("Big").unwrap();
    for id in ["KEEP", "PURGE"] {
        st.register_client(&cfg, id, big, Kind::Desktop, None, t)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(st.debit_mcal_for_month(&cfg, id, t).await.unwrap(), Ok(1));
        commit(&st, &cfg, id, "f", 3 * MIB).await;
        let d = tollgate::storage::client_dir(&cfg, big, id);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("f"), b"x").unwrap();
    }
    assert_eq!(
        count(
            &st,
            "SELECT used FROM customer_usage WHERE customer = 'Big'"
        )
        .await,
        6 * MIB as i64
    );

    let kept = st
        .remove_client(&cfg, "KEEP", false, t, |_, _| panic!("no purge"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((kept.freed_bytes, kept.freed_mcal), (0, 1));
    assert_eq!(
        count(
            &st,
            "SELECT used FROM customer_usage WHERE customer = 'Big'"
        )
        .await,
        6 * MIB as i64
    );
    assert!(
        tollgate::storage::client_dir(&cfg, big, "KEEP")
            .join("f")
            .exists()
    );
    assert_eq!(
        count(
            &st,
            "SELECT COUNT(*) FROM clients WHERE id = 'KEEP' AND secret_sha256 IS NULL"
        )
        .await,
        1
    );

    let purged = st
        .remove_client(&cfg, "PURGE", true, t, |_, _| {
            std::fs::remove_dir_all(tollgate::storage::client_dir(&cfg, big, "PURGE"))
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!((purged.freed_bytes, purged.freed_mcal), (3 * MIB, 1));
    assert_eq!(
        count(
            &st,
            "SELECT used FROM customer_usage WHERE customer = 'Big'"
        )
        .await,
        3 * MIB as i64
    );
    assert_eq!(
        count(&st, "SELECT COUNT(*) FROM clients WHERE id = 'PURGE'").await,
        0
    );
    assert_eq!(
        count(&st, "SELECT COUNT(*) FROM files WHERE client = 'PURGE'").await,
        0
    );
    assert!(!tollgate::storage::client_dir(&cfg, big, "PURGE").exists());
    assert_eq!(
        count(
            &st,
            "SELECT COUNT(*) FROM mcal_debits WHERE month = '2026-11' AND customer = 'Big'"
        )
        .await,
        0
    );
    assert_totals_match(&st).await;
    assert!(
        st.remove_client(&cfg, "PURGE", true, t, |_, _| Ok(()))
            .await
            .unwrap()
            .is_none()
    );
}
}

on_both! {
#[tokio::test]
async fn declared_clients_are_upserted_and_follow_the_config() {
    let dir = fixture!();
    let base = "[default_customer]\n[[reseller]]\nname = \"r\"\n[[customer]]\nname = \"A\"\nreseller = \"r\"\nemail = \"a@x.example\"\nbackup_location = \"/srv/a\"\n[[customer]]\nname = \"B\"\nreseller = \"r\"\nemail = \"b@x.example\"\nbackup_location = \"/srv/b\"\n";
    let cfg = config(
        &dir,
        &format!(
            "{base}[[client]]\nid = \"D1\"\ncustomer = \"A\"\nkind = \"server\"\n[[client]]\nid = \"D2\"\ncustomer = \"A\"\n"
        ),
    );
    let st = open(dir.path(), &cfg).await;
    assert_eq!(
        count(
            &st,
            "SELECT COUNT(*) FROM clients WHERE declared = 1 AND secret_sha256 IS NULL"
        )
        .await,
        2
    );
    // D1 connects and stores 1 MiB under A.
    let t = at("2026-11-25T12:00:00Z");
    let AdmitOutcome::Admitted {
        admitted,
        secret: Some(_),
    } = st
        .admit(&cfg, &hello("D1", None), None, t, false, false)
        .await
        .unwrap()
    else {
        panic!("a declared client's first HELLO issues a secret");
    };
    assert_eq!(
        (admitted.registration, admitted.kind),
        (Registration::Declared, Kind::Server)
    );
    commit(&st, &cfg, "D1", "f", MIB).await;
    // The config moves D1 to B and drops D2 (never connected).
    let cfg2 = config(
        &dir,
        &format!("{base}[[client]]\nid = \"D1\"\ncustomer = \"B\"\nkind = \"server\"\n"),
    );
    let moved = st
        .sync_declared(&cfg2, "2026-11-25T12:00:00Z".parse().unwrap(), |_, _, _| {
            Ok(())
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        moved,
        vec![("D1".to_string(), "A".to_string(), "B".to_string())]
    );
    assert_eq!(
        count(&st, "SELECT used FROM customer_usage WHERE customer = 'A'").await,
        0
    );
    assert_eq!(
        count(&st, "SELECT used FROM customer_usage WHERE customer = 'B'").await,
        MIB as i64
    );
    assert_eq!(
        count(&st, "SELECT COUNT(*) FROM clients WHERE id = 'D2'").await,
        0
    );
    assert_eq!(
        count(
            &st,
            "SELECT COUNT(*) FROM clients WHERE id = 'D1' AND secret_sha256 IS NOT NULL"
        )
        .await,
        1,
        "the secret survives a reload"
    );
}
}

fn admitted(o: AdmitOutcome) -> (Registration, Option<String>) {
    match o {
        AdmitOutcome::Admitted { admitted, secret } => (admitted.registration, secret),
        AdmitOutcome::Rejected(r) => panic!("refused: {r:?}"),
    }
}

fn refused(o: AdmitOutcome) -> RejectCode {
    match o {
        AdmitOutcome::Admitted { .. } => panic!("admitted"),
        AdmitOutcome::Rejected(r) => r.code,
    }
}

on_both! {
/// PROTOCOL.md Additions: a removed id stays reserved; the readmit key
/// gives it back once, within 7 days; the same for a lost secret.
#[tokio::test]
async fn removed_ids_are_reserved_until_readmitted_once() {
    let dir = fixture!();
    let cfg = config(&dir, "[default_customer]\nauto_add_clients = true\n");
    let st = open(dir.path(), &cfg).await;
    let t = at("2026-11-25T12:00:00Z");
    let (_, old) = admitted(
        st.admit(&cfg, &hello("PC", None), None, t, false, false)
            .await
            .unwrap(),
    );
    st.remove_client(&cfg, "pc", false, t, |_, _| panic!("no purge"))
        .await
        .unwrap()
        .unwrap();
    let mut h = hello("PC", None);
    assert_eq!(
        refused(st.admit(&cfg, &h, None, t, false, false).await.unwrap()),
        RejectCode::AuthFailed
    );
    h.secret = old;
    assert_eq!(
        refused(st.admit(&cfg, &h, None, t, false, false).await.unwrap()),
        RejectCode::AuthFailed
    );
    let Readmit::Key { id, key, expires } = st.readmit("pc", t).await.unwrap() else {
        panic!("a key")
    };
    assert_eq!((id.as_str(), expires), ("PC", at("2026-12-02T12:00:00Z")));
    h.enroll_key = Some(key.clone());
    // After 7 days the key is dead.
    assert_eq!(
        refused(
            st.admit(&cfg, &h, None, expires, false, false)
                .await
                .unwrap()
        ),
        RejectCode::AuthFailed
    );
    let (reg, new) = admitted(st.admit(&cfg, &h, None, t, false, false).await.unwrap());
    assert_eq!(reg, Registration::Readmitted);
    assert!(new.is_some());
    // Once only.
    h.secret = None;
    assert_eq!(
        refused(st.admit(&cfg, &h, None, t, false, false).await.unwrap()),
        RejectCode::AuthFailed,
        "the key is spent"
    );
    h.secret = new.clone();
    h.enroll_key = None;
    assert_eq!(
        admitted(st.admit(&cfg, &h, None, t, false, false).await.unwrap()).0,
        Registration::Existing
    );
    // Lost secret: a readmit key for a registered client.
    let Readmit::Key { key, .. } = st.readmit("PC", t).await.unwrap() else {
        panic!()
    };
    h.secret = None;
    h.enroll_key = Some(key);
    assert_eq!(
        admitted(st.admit(&cfg, &h, None, t, false, false).await.unwrap()).0,
        Registration::Readmitted
    );
    assert_eq!(
        st.readmit("NOBODY", t).await.unwrap(),
        Readmit::NoSuchClient
    );
}
}

on_both! {
/// CONFIG.md Additions, "State retention": refusals are one row per
/// (source, code, customer, minute) with a count; invalid ids are stored
/// as `(invalid)`; nothing a peer sent is stored beyond 256 bytes.
#[tokio::test]
async fn refusals_are_aggregated_and_bounded() {
    let dir = fixture!();
    let cfg = config(&dir, "[default_customer]\nauto_add_clients = true\n");
    let st = open(dir.path(), &cfg).await;
    let t = at("2026-11-25T12:00:40Z");
    let src: std::net::IpAddr = "198.51.100.7".parse().unwrap();
    let long_customer = "C".repeat(10_000);
    for i in 0..1000 {
        let id = if i % 2 == 0 {
            "x".repeat(900_000)
        } else {
            format!("PC-{i}")
        };
        assert!(st.note_refusal(
            t + jiff::SignedDuration::from_secs(i % 40),
            Some(src),
            Some(&id),
            Some(&long_customer),
            RejectCode::UnknownCustomer.as_str(),
        ));
    }
    assert_eq!(st.flush_refusals().await.unwrap(), 1000);
    assert_eq!(st.flush_refusals().await.unwrap(), 0, "nothing twice");
    // 12:00:40 + 0..39 s spans two minutes.
    assert_eq!(count(&st, "SELECT COUNT(*) FROM refusals").await, 2);
    assert_eq!(count(&st, "SELECT SUM(count) FROM refusals").await, 1000);
    assert_eq!(
        count(&st, "SELECT MAX(length(customer)) FROM refusals").await,
        256
    );
    assert_eq!(
        count(
            &st,
            "SELECT COUNT(*) FROM refusals WHERE client LIKE 'PC-%' OR client = '(invalid)'"
        )
        .await,
        2
    );
    // A later flush adds to the same rows.
    st.record_refusal(
        t,
        "PC-1",
        Some(&long_customer),
        RejectCode::UnknownCustomer,
        Some(src),
    )
    .await
    .unwrap();
    assert_eq!(count(&st, "SELECT COUNT(*) FROM refusals").await, 2);
    assert_eq!(count(&st, "SELECT SUM(count) FROM refusals").await, 1001);
    // IPv4-mapped sources are stored as IPv4.
    st.record_refusal(
        t,
        "",
        None,
        RejectCode::Timeout,
        Some("::ffff:198.51.100.7".parse().unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(
        count(&st, "SELECT COUNT(*) FROM refusals WHERE source = '198.51.100.7' AND code = 'timeout' AND client = ''").await,
        1
    );
}
}

on_both! {
/// CONFIG.md `[server.retention]`: old rows go, in batches, recent ones
/// stay, and live history (undelivered mail) is never pruned.
#[tokio::test]
async fn retention_prunes_old_history_in_batches() {
    let dir = fixture!();
    let cfg = config(&dir, "[default_customer]\nauto_add_clients = true\n");
    let st = open(dir.path(), &cfg).await;
    let now = at("2026-11-25T12:00:00Z");
    let day = 86_400i64;
    let n = now.as_second();
    // 1,200 refusal minutes 91 days old, 10 from yesterday.
    let rows: Vec<String> = (0..1210i64)
        .map(|i| {
            let at = if i < 1200 {
                n - 91 * day + i * 60
            } else {
                n - day + i
            };
            format!("({at}, '192.0.2.1', 'timeout', '', '', 1)")
        })
        .collect();
    exec(
        &st,
        &format!(
            "INSERT INTO refusals (at, source, code, customer, client, count) VALUES {}",
            rows.join(", ")
        ),
    )
    .await
    .unwrap();
    for (id, started) in [("old", n - 401 * day), ("new", n - 399 * day)] {
        exec(&st, &format!("INSERT INTO sessions (id, client, customer, schedule, intent, started_at) VALUES ('{id}', 'PC', 'Default Customer', 's', 'backup', {started})"))
            .await
            .unwrap();
    }
    for (at, sent) in [
        (n - 100 * day, Some(n - 100 * day)),
        (n - 100 * day, None),
        (n - day, Some(n - day)),
    ] {
        let sent = sent.map_or("NULL".to_string(), |s| s.to_string());
        // '\x00': one zero byte on PostgreSQL, text on SQLite; either is
        // a message.
        exec(&st, &format!("INSERT INTO outbox (created_at, kind, subject, mail_from, recipients, message, next_attempt_at, sent_at) VALUES ({at}, 'alert', 's', 'f@x.example', '[]', '\\x00', {at}, {sent})"))
            .await
            .unwrap();
    }
    exec(
        &st,
        &format!(
            "INSERT INTO client_events (at, client, kind) VALUES ({}, 'PC', 'removed'), ({}, 'PC', 'removed')",
            n - 31 * day,
            n - 29 * day
        ),
    )
    .await
    .unwrap();
    let p = st
        .prune(&tollgate::config::Retention::default(), now)
        .await
        .unwrap();
    assert_eq!(
        (p.refusals, p.sessions, p.sent_mail, p.client_events),
        (1200, 1, 1, 1)
    );
    assert_eq!(count(&st, "SELECT COUNT(*) FROM refusals").await, 10);
    assert_eq!(
        count(&st, "SELECT COUNT(*) FROM sessions WHERE id = 'new'").await,
        1
    );
    assert_eq!(
        count(&st, "SELECT COUNT(*) FROM outbox WHERE sent_at IS NULL").await,
        1,
        "undelivered mail stays, however old"
    );
    assert_eq!(
        st.prune(&tollgate::config::Retention::default(), now)
            .await
            .unwrap()
            .total(),
        0
    );
}
}

on_both! {
/// `registrations_per_minute` counts new clients per customer, exactly,
/// under concurrency; `retry_after` says when the next one fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registrations_per_minute_hold_under_concurrency() {
    let dir = fixture!();
    let cfg = Arc::new(config(
        &dir,
        "[server.limits]\nregistrations_per_minute = 5\n[default_customer]\nauto_add_clients = true\n",
    ));
    let st = open(dir.path(), &cfg).await;
    let t = at("2026-11-25T12:00:00Z");
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (st, cfg) = (st.clone(), cfg.clone());
        tasks.push(tokio::spawn(async move {
            st.admit(&cfg, &hello(&format!("N{i}"), None), None, t, false, false)
                .await
                .unwrap()
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            AdmitOutcome::Admitted { .. } => ok += 1,
            AdmitOutcome::Rejected(r) => {
                assert_eq!((r.code, r.retry_after), (RejectCode::RateLimited, Some(60)));
            }
        }
    }
    assert_eq!(ok, 5);
    let later = at("2026-11-25T12:01:00Z");
    let o = st
        .admit(&cfg, &hello("LATER", None), None, later, false, false)
        .await
        .unwrap();
    assert!(
        matches!(o, AdmitOutcome::Admitted { .. }),
        "a minute later it fits"
    );
}
}

on_both! {
/// The minute slides: with registrations spread over it, the refusal's
/// `retry_after` is when the `registrations_per_minute`-th newest leaves
/// it, and one leaving makes room for exactly one.
#[tokio::test]
async fn the_registration_window_slides() {
    let dir = fixture!();
    let cfg = config(
        &dir,
        "[server.limits]\nregistrations_per_minute = 3\n[default_customer]\nauto_add_clients = true\n",
    );
    let st = open(dir.path(), &cfg).await;
    let t0 = at("2026-11-25T12:00:00Z").as_second();
    let at_s = |s: i64| jiff::Timestamp::from_second(t0 + s).unwrap();
    let admit = |id: &'static str, s: i64| {
        let (st, cfg) = (&st, &cfg);
        async move {
            match st.admit(cfg, &hello(id, None), None, at_s(s), false, false).await.unwrap() {
                AdmitOutcome::Admitted { .. } => None,
                AdmitOutcome::Rejected(r) => {
                    assert_eq!(r.code, RejectCode::RateLimited, "{id}");
                    Some(r.retry_after.unwrap())
                }
            }
        }
    };
    for (id, s) in [("W0", 0), ("W10", 10), ("W20", 20)] {
        assert_eq!(admit(id, s).await, None, "{id} fits");
    }
    assert_eq!(admit("X50", 50).await, Some(10), "W0 leaves at 60");
    assert_eq!(admit("W61", 61).await, None, "W0 has left");
    assert_eq!(admit("X62", 62).await, Some(8), "W10 leaves at 70");
    assert_eq!(admit("W70", 70).await, None, "W10 has left");
    assert_eq!(admit("X71", 71).await, Some(9), "W20 leaves at 80");
}
}

on_both! {
/// Client ids are unique without regard to case: registering `pc-1` next
/// to `PC-1` is refused, and nothing is half-registered.
#[tokio::test]
async fn ids_differing_in_case_are_one_id() {
    let dir = fixture!();
    let cfg = config(&dir, "[default_customer]\nauto_add_clients = true\n");
    let st = open(dir.path(), &cfg).await;
    let t = at("2026-11-25T12:00:00Z");
    admitted(
        st.admit(&cfg, &hello("PC-1", None), None, t, false, false)
            .await
            .unwrap(),
    );
    assert_eq!(
        refused(
            st.admit(&cfg, &hello("pc-1", None), None, t, false, false)
                .await
                .unwrap()
        ),
        RejectCode::AuthFailed
    );
    assert_eq!(count(&st, "SELECT COUNT(*) FROM clients").await, 1);
    // The database itself refuses a second spelling.
    let dup = exec(
        &st,
        "INSERT INTO clients (id, customer, kind) VALUES ('Pc-1', 'Default Customer', 'desktop')",
    )
    .await;
    assert!(dup.is_err(), "the NOCASE unique index");
}
}

on_both! {
#[tokio::test]
async fn noted_session_starts_are_written_together_and_before_their_end() {
    use tollgate::state::{SessionEnd, SessionStart};
    let dir = fixture!();
    let cfg = config(&dir, "");
    let st = open(dir.path(), &cfg).await;
    let t = at("2026-11-25T12:00:00Z");
    let ids: Vec<String> = (0..450).map(|i| format!("s{i}")).collect();
    for id in &ids {
        st.note_session_start(&SessionStart {
            id,
            client: "PC",
            customer: "Default Customer",
            schedule: "nightly",
            intent: "backup",
            peer: None,
            at: t,
        });
    }
    assert_eq!(count(&st, "SELECT COUNT(*) FROM sessions").await, 0);
    // The SQLite writer's batches count operations; PostgreSQL has none.
    let batches = || {
        st.writer_stats()
            .map(|w| w.batches.load(std::sync::atomic::Ordering::Relaxed))
    };
    assert_eq!(batches().is_some(), BACKEND == Backend::Sqlite);
    let before = batches();
    assert_eq!(st.flush_session_starts().await.unwrap(), 450);
    assert_eq!(
        batches(),
        before.map(|b| b + 1),
        "450 starts are one operation"
    );
    assert_eq!(count(&st, "SELECT COUNT(*) FROM sessions").await, 450);
    assert_eq!(st.flush_session_starts().await.unwrap(), 0);

    // A session that ends before the next flush still has its row.
    st.note_session_start(&SessionStart {
        id: "short",
        client: "PC",
        customer: "Default Customer",
        schedule: "nightly",
        intent: "backup",
        peer: None,
        at: t,
    });
    let end = SessionEnd {
        at: t,
        bytes_in: 7,
        bytes_out: 0,
        files_ok: 1,
        files_failed: 0,
        result: "ok",
    };
    st.end_session("short", &end, &[]).await.unwrap();
    assert_eq!(
        count(
            &st,
            "SELECT COUNT(*) FROM sessions WHERE id = 'short' AND ended_at IS NOT NULL AND bytes_in = 7"
        )
        .await,
        1
    );
}
}

on_both! {
/// Reservations racing commits (issue 13: reservations live in memory and
/// commits move bytes from them to committed usage): 16 uploaders try 40
/// uploads of 20 to 59 KiB each against a 4 MiB customer, reserving while
/// others commit. What is committed never exceeds it (a reservation that
/// missed a commit's bytes would let it), and the usage is exactly what
/// was committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reservations_racing_commits_never_overrun() {
    let dir = fixture!();
    let cfg = Arc::new(config(
        &dir,
        "[[reseller]]\nname = \"r\"\n[[customer]]\nname = \"C\"\nreseller = \"r\"\nemail = \"c@x.example\"\nbackup_location = \"/srv/c\"\nspace = \"4 MiB\"\n",
    ));
    let st = open(dir.path(), &cfg).await;
    let t = at("2026-11-25T12:00:00Z");
    let cid = cfg.customer_by_name("C").unwrap();
    for i in 0..8 {
        st.register_client(&cfg, &format!("R{i}"), cid, Kind::Desktop, None, t)
            .await
            .unwrap()
            .unwrap();
    }
    let committed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    // 16 uploaders, 40 tries each: reservations keep reading committed
    // usage while other uploads commit and release.
    for k in 0..16u64 {
        let (st, cfg, committed) = (st.clone(), cfg.clone(), committed.clone());
        tasks.push(tokio::spawn(async move {
            let client = format!("R{}", k % 8);
            for i in 0..40u64 {
                let size = (20 + (k * 7 + i * 13) % 40) * 1024;
                let Ok(r) = st.reserve_space(&cfg, &client, size, t).await.unwrap() else {
                    continue;
                };
                commit_reserved(&st, &client, &format!("f{k}-{i}"), size, r).await;
                committed.fetch_add(size, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let used = count(&st, "SELECT used FROM customer_usage WHERE customer = 'C'").await as u64;
    assert_eq!(used, committed.load(std::sync::atomic::Ordering::Relaxed));
    assert!(used <= 4 * MIB, "committed {used} bytes of 4 MiB");
    assert!(
        used > 4 * MIB - 59 * 1024,
        "only {used} committed: refusals were not needed"
    );
    assert_eq!(
        st.reserved_total().await.unwrap(),
        0,
        "every reservation was released"
    );
}
}

on_both! {
/// 200 uploads ending at once, 40 of them of one file, commit in groups
/// (SQLite: `state::grouped`); every caller is told its own usage change,
/// and the usage is the index's sum at every level.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commits_ending_together_keep_usage_exact() {
    let dir = fixture!();
    let cfg = Arc::new(config(
        &dir,
        "[[reseller]]\nname = \"r\"\n[[customer]]\nname = \"C\"\nreseller = \"r\"\nemail = \"c@x.example\"\nbackup_location = \"/srv/c\"\n",
    ));
    let st = open(dir.path(), &cfg).await;
    let t = at("2026-11-25T12:00:00Z");
    let cid = cfg.customer_by_name("C").unwrap();
    for i in 0..4 {
        st.register_client(&cfg, &format!("G{i}"), cid, Kind::Desktop, None, t)
            .await
            .unwrap()
            .unwrap();
    }
    let ops = st
        .writer_stats()
        .map(|s| s.committed.load(std::sync::atomic::Ordering::Relaxed));
    let start = Arc::new(tokio::sync::Barrier::new(200));
    let tasks: Vec<_> = (0..200u64)
        .map(|k| {
            let (st, cfg, start) = (st.clone(), cfg.clone(), start.clone());
            tokio::spawn(async move {
                let (client, path) = if k % 5 == 0 {
                    ("G0".to_string(), "same".to_string())
                } else {
                    (format!("G{}", k % 4), format!("f{k}"))
                };
                let size = 1000 + k * 17;
                let r = st
                    .reserve_space(&cfg, &client, size, t)
                    .await
                    .unwrap()
                    .expect("room");
                start.wait().await;
                let id = st
                    .begin_commit(&PendingCommit {
                        client: client.clone(),
                        path,
                        temp_path: format!("/nonexistent/tmp{k}").into(),
                        final_path: "/nonexistent/final".into(),
                        size,
                        sha256: "0".repeat(64),
                        modified: t,
                        reservation: Some(r),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                st.commit_file(id).await.unwrap()
            })
        })
        .collect();
    let mut told = 0;
    for task in tasks {
        told += task.await.unwrap();
    }
    let files = count(&st, "SELECT SUM(size) FROM files").await;
    assert_eq!(count(&st, "SELECT COUNT(*) FROM files").await, 161);
    assert_eq!(told, files, "the changes each caller was told add up");
    assert_eq!(count(&st, "SELECT SUM(used) FROM clients").await, files);
    assert_eq!(
        count(&st, "SELECT used FROM clients WHERE id = 'G0'").await,
        count(&st, "SELECT SUM(size) FROM files WHERE client = 'G0'").await
    );
    assert_eq!(count(&st, "SELECT used FROM customer_usage WHERE customer = 'C'").await, files);
    assert_eq!(count(&st, "SELECT COUNT(*) FROM pending_commits").await, 0);
    assert_eq!(st.reserved_total().await.unwrap(), 0);
    // On SQLite the 400 operations ran as far fewer on the writer.
    if let (Some(before), Some(s)) = (ops, st.writer_stats()) {
        let ran = s.committed.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(ran < 200, "{ran} writer operations for 400 grouped ones");
    }
}
}

on_both! {
/// A session that ends while the start flush is under way still ends up
/// with one row that has its start and its end, whichever goes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_ending_during_the_start_flush_keeps_its_row() {
    use tollgate::state::{SessionEnd, SessionStart};
    let dir = fixture!();
    let cfg = config(&dir, "");
    let st = open(dir.path(), &cfg).await;
    let t = at("2026-11-25T12:00:00Z");
    for i in 0..40 {
        let id = format!("race{i}");
        st.note_session_start(&SessionStart {
            id: &id,
            client: "PC",
            customer: "Default Customer",
            schedule: "nightly",
            intent: "backup",
            peer: None,
            at: t,
        });
        let end = SessionEnd {
            at: t,
            bytes_in: 1,
            bytes_out: 0,
            files_ok: 1,
            files_failed: 0,
            result: "ok",
        };
        let (a, b) = tokio::join!(st.flush_session_starts(), st.end_session(&id, &end, &[]));
        a.unwrap();
        b.unwrap();
    }
    assert_eq!(
        count(
            &st,
            "SELECT COUNT(*) FROM sessions WHERE id LIKE 'race%' AND ended_at IS NOT NULL AND started_at IS NOT NULL"
        )
        .await,
        40
    );
    assert_eq!(
        st.flush_session_starts().await.unwrap(),
        0,
        "nothing left noted"
    );
}
}

on_both! {
/// A request an admin command left behind (it was killed before it could
/// withdraw it) is never applied later.
#[tokio::test]
async fn an_old_admin_request_expires_instead_of_being_applied() {
    use tollgate::state::requests::{Change, Outcome, REQUEST_VALID_SECS};
    let dir = fixture!();
    let cfg = config(&dir, "");
    let st = open(dir.path(), &cfg).await;
    let change = Change::Remove {
        client: "PC".into(),
        purge: true,
    };
    let old = st.request(&change).await.unwrap();
    exec(
        &st,
        &format!(
            "UPDATE admin_requests SET requested_at = requested_at - {} WHERE id = {old}",
            REQUEST_VALID_SECS + 1
        ),
    )
    .await
    .unwrap();
    let fresh = st.request(&change).await.unwrap();
    let now = jiff::Timestamp::now();
    let claimed = st.claim_request(now).await.unwrap().expect("the fresh one");
    assert_eq!((claimed.id, claimed.change), (fresh, change));
    assert!(matches!(
        st.outcome(old).await.unwrap(),
        Some(Outcome::Failed { .. })
    ));
    assert!(st.claim_request(now).await.unwrap().is_none());
    // Claimed requests cannot be withdrawn; unclaimed ones can, once.
    assert!(!st.cancel_request(fresh, now).await.unwrap());
    let third = st
        .request(&Change::Move {
            client: "PC".into(),
            to: "X".into(),
        })
        .await
        .unwrap();
    assert!(st.cancel_request(third, now).await.unwrap());
    assert!(!st.cancel_request(third, now).await.unwrap());
    assert!(
        st.claim_request(now).await.unwrap().is_none(),
        "a withdrawn request is not applied"
    );
}
}

on_both! {
/// The web console's reads and records (issue 15) on both backends:
/// refusals filtered by code, customers and client; the outbox; the last
/// session result per client; daily usage snapshots (a later one of a day
/// replaces the earlier) and live usage; the account-details record, once
/// per customer whatever the case of its name.
#[tokio::test]
async fn console_reads_and_records_agree_on_both_backends() {
    use tollgate::state::Outgoing;
    use tollgate::state::console::RefusalFilter;
    let dir = fixture!();
    let cfg = config(
        &dir,
        &format!(
            "[default_customer]\nauto_add_clients = true\n[[reseller]]\nname = \"acme\"\n[[customer]]\nname = \"Contoso Ltd\"\nreseller = \"acme\"\nemail = \"a@contoso.example\"\nbackup_location = \"{}\"\nauto_add_clients = true\n",
            dir.path().join("contoso").display()
        ),
    );
    let st = open(dir.path(), &cfg).await;
    let t = at("2026-11-25T12:00:00Z");
    for (id, customer) in [("PC", None), ("LAPTOP", Some("Contoso Ltd"))] {
        let AdmitOutcome::Admitted { .. } = st
            .admit(&cfg, &hello(id, customer), None, t, false, false)
            .await
            .unwrap()
        else {
            panic!("{id} admitted")
        };
    }
    commit(&st, &cfg, "PC", "a", 3 * MIB).await;
    commit(&st, &cfg, "LAPTOP", "b", 5 * MIB).await;

    // Refusals: two codes, two customers, one client.
    for (code, customer, client) in [
        (RejectCode::AuthFailed, Some("Contoso Ltd"), "LAPTOP"),
        (RejectCode::Timeout, None, ""),
        (RejectCode::McalExhausted, Some("Default Customer"), "PC"),
    ] {
        st.record_refusal(t, client, customer, code, Some("192.0.2.9".parse().unwrap()))
            .await
            .unwrap();
    }
    let codes = |rows: Vec<tollgate::state::console::RefusalRow>| {
        let mut v: Vec<String> = rows.into_iter().map(|r| r.code).collect();
        v.sort();
        v
    };
    let all = st.refusals(&RefusalFilter::default(), 100).await.unwrap();
    assert_eq!(codes(all), ["auth_failed", "mcal_exhausted", "timeout"]);
    let by_code = RefusalFilter { code: Some("timeout".into()), ..Default::default() };
    assert_eq!(codes(st.refusals(&by_code, 100).await.unwrap()), ["timeout"]);
    let by_customers = RefusalFilter {
        customers: Some(vec!["contoso ltd".into(), "Default Customer".into()]),
        ..Default::default()
    };
    assert_eq!(
        codes(st.refusals(&by_customers, 100).await.unwrap()),
        ["auth_failed", "mcal_exhausted"],
        "customer names compare case-insensitively"
    );
    let by_client = RefusalFilter { client: Some("PC".into()), ..Default::default() };
    assert_eq!(codes(st.refusals(&by_client, 100).await.unwrap()), ["mcal_exhausted"]);
    assert_eq!(st.refusals(&RefusalFilter::default(), 1).await.unwrap().len(), 1, "bounded");

    // The last finished session's result per client.
    for (id, client, customer, started, result) in [
        ("s1", "LAPTOP", "Contoso Ltd", 100, "'ok'"),
        ("s2", "LAPTOP", "Contoso Ltd", 200, "'storage_error'"),
        ("s3", "LAPTOP", "Contoso Ltd", 300, "NULL"),
    ] {
        let ended = if result == "NULL" { "NULL".to_string() } else { (started + 10).to_string() };
        exec(&st, &format!("INSERT INTO sessions (id, client, customer, schedule, intent, started_at, ended_at, result) VALUES ('{id}', '{client}', '{customer}', 'nightly', 'backup', {started}, {ended}, {result})"))
            .await
            .unwrap();
    }
    let results = st.last_results("contoso ltd").await.unwrap();
    assert_eq!(results.get("laptop").map(String::as_str), Some("storage_error"), "the newest finished one");
    let sessions = st.client_sessions("LAPTOP", "contoso ltd", 2).await.unwrap();
    assert!(st.client_sessions("LAPTOP", "Default Customer", 2).await.unwrap().is_empty(), "another customer's history stays its own");
    assert_eq!(sessions.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["s3", "s2"]);

    // Usage snapshots: the day's last one stands; live usage sums.
    assert_eq!(st.snapshot_usage("2026-11-24", t).await.unwrap(), 2);
    commit(&st, &cfg, "LAPTOP", "c", MIB).await;
    st.snapshot_usage("2026-11-25", t).await.unwrap();
    commit(&st, &cfg, "LAPTOP", "d", MIB).await;
    st.snapshot_usage("2026-11-25", t).await.unwrap();
    let names = vec!["Contoso Ltd".to_string()];
    let hist = st.usage_history(&names, "2026-11-01").await.unwrap();
    let got: Vec<(String, i64)> = hist.into_iter().map(|p| (p.day, p.used)).collect();
    assert_eq!(
        got,
        [("2026-11-24".to_string(), 5 * MIB as i64), ("2026-11-25".to_string(), 7 * MIB as i64)]
    );
    assert!(st.usage_history(&names, "2026-11-25").await.unwrap().len() == 1);
    let both = vec!["contoso ltd".to_string(), "Default Customer".to_string()];
    assert_eq!(st.usage_now(&both).await.unwrap(), 10 * MIB as i64);
    assert_eq!(st.usage_now(&[]).await.unwrap(), 0);

    // The account-details record: once per customer.
    let m = Outgoing {
        kind: "account_details",
        subject: "s".into(),
        from: "f@x.example".into(),
        to: vec!["a@contoso.example".into()],
        message: b"m".to_vec(),
    };
    assert!(st.enqueue_account_details("Contoso Ltd", &m, t).await.unwrap());
    assert!(!st.enqueue_account_details("CONTOSO LTD", &m, t).await.unwrap());
    assert_eq!(st.account_details_sent().await.unwrap(), ["Contoso Ltd"]);
    let outbox = st.outbox(10).await.unwrap();
    assert_eq!(outbox.len(), 1, "one message queued");
    assert_eq!(outbox[0].kind, "account_details");

    // The console's audit log: newest first, bounded, pruned by age.
    use tollgate::state::console::AuditEntry;
    for (at, action) in [(t.as_second() - 10 * 86_400, "add"), (t.as_second(), "deactivate")] {
        let e = AuditEntry {
            at,
            login: "reseller acme".into(),
            username: "acme-admin".into(),
            action: action.into(),
            customer: "Contoso Ltd".into(),
            file: "/etc/tollgate/resellers.d/acme/contoso%20ltd.toml".into(),
            detail: "activated = false".into(),
        };
        st.record_audit(&e).await.unwrap();
    }
    let log = st.audit_log(10).await.unwrap();
    assert_eq!(log.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(), ["deactivate", "add"]);
    assert_eq!(log[0].username, "acme-admin");
    assert_eq!(st.audit_log(1).await.unwrap().len(), 1, "bounded");
    let r = tollgate::config::Retention {
        audit: std::time::Duration::from_secs(5 * 86_400),
        ..Default::default()
    };
    assert_eq!(st.prune(&r, t).await.unwrap().audit, 1);
    assert_eq!(st.audit_log(10).await.unwrap().len(), 1);
}
}
