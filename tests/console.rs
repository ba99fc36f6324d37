//! The web console in a real headless Chromium (issue 15), against the
//! real daemon with data made by real backups through the protocol:
//! logins of each kind and what each sees, isolation (404 for anything
//! not the login's), CSRF, logout, a live deactivation, a byte-exact
//! download, penalties for wrong passwords, and a screenshot of each page.

#[path = "common/browser.rs"]
mod browser;
mod common;

use browser::Browser;
use common::{Daemon, phc, write_config};
use fantoccini::Locator;
use std::path::Path;
use std::time::Duration;
use tollgate::client::{Session, Upload};
use tollgate::config::units::format_size;

/// Browsers are heavy on two cores: one test drives one at a time.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ADMIN_PW: &str = "tg-console-admin-0451";
const ACME_PW: &str = "tg-console-acme-0451";
const GLOBEX_PW: &str = "tg-console-globex-0451";
const CONTOSO_PW: &str = "tg-console-contoso-0451";
const FABRIKAM_PW: &str = "tg-console-fabrikam-0451";

fn body(dir: &Path, contoso_active: bool) -> String {
    let loc = |n: &str| dir.join("backup").join(n).display().to_string();
    format!(
        r#"
[server.web]
listen = "127.0.0.1:0"
public_url = "https://backup.example.com:8443"
admin = {{ user = "admin", password = "{admin}" }}

[server.mcal]
pool = 50

[server.email]
from = "tollgate@backup.example"
spool = "mail"

[default_customer]
auto_add_clients = true
backup_location = "{def}"

[[reseller]]
name = "acme"
space = "10 GiB"
web_access = {{ user = "acme-admin", password = "{acme}" }}

[[reseller]]
name = "globex"
web_access = {{ user = "globex-admin", password = "{globex}" }}

[[customer]]
name = "Contoso Ltd"
reseller = "acme"
email = "it@contoso.example"
backup_location = "{contoso}"
space = "1 GiB"
auto_add_clients = true
activated = {contoso_active}
web_access = {{ user = "contoso", password = "{contoso_pw}" }}

[[customer]]
name = "Fabrikam"
reseller = "acme"
email = "it@fabrikam.example"
backup_location = "{fabrikam}"
space = "2 GiB"
auto_add_clients = true
web_access = {{ username = "fabrikam", password = "{fabrikam_pw}" }}

[[customer]]
name = "Initech"
reseller = "globex"
email = "it@initech.example"
backup_location = "{initech}"
auto_add_clients = true
"#,
        admin = phc(ADMIN_PW),
        acme = phc(ACME_PW),
        globex = phc(GLOBEX_PW),
        contoso_pw = phc(CONTOSO_PW),
        fabrikam_pw = phc(FABRIKAM_PW),
        def = loc("default"),
        contoso = loc("contoso"),
        fabrikam = loc("fabrikam"),
        initech = loc("initech"),
    )
}

/// Backs up `files` (name, bytes) as client `id` of `customer`; returns
/// the bytes stored.
async fn backup(d: &Daemon, customer: &str, id: &str, files: &[(&str, Vec<u8>)]) -> u64 {
    let src = d.dir.join("src").join(id);
    let mut uploads = Vec::new();
    for (name, data) in files {
        let p = src.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        uploads.push(Upload::new(p, name.to_string()).unwrap());
    }
    let mut o = d.opts(id);
    o.customer = Some(customer.into());
    let mut s = Session::connect(&o).await.unwrap();
    for r in s.upload(&uploads, &|_| {}).await.unwrap() {
        r.unwrap();
    }
    s.bye().await.unwrap();
    files.iter().map(|(_, d)| d.len() as u64).sum()
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Every kind of login sees its part and nothing else; CSRF, logout, a
/// live deactivation, a download; a screenshot of every page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_login_sees_its_own_subtree_in_a_real_browser() {
    if !browser::available() {
        return;
    }
    let _one = ONE_BROWSER.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    write_config(tmp.path(), "", &body(tmp.path(), true));
    let d = Daemon::start(tmp.path());
    let console = d
        .console
        .clone()
        .expect("the daemon prints the console's address");

    let big = random_bytes(300_000, 7);
    let contoso_bytes = backup(
        &d,
        "Contoso Ltd",
        "LAPTOP-1",
        &[
            ("docs/a.txt", b"hello contoso\n".to_vec()),
            ("photos/big.bin", big.clone()),
        ],
    )
    .await;
    backup(
        &d,
        "Fabrikam",
        "FAB-1",
        &[("secret.txt", b"fabrikam only\n".to_vec())],
    )
    .await;
    backup(
        &d,
        "Initech",
        "INI-1",
        &[("tps.txt", b"reports\n".to_vec())],
    )
    .await;

    // 60 days of history for the charts, as the daemon's snapshots would
    // have left it (the test's clock is pinned to 2026-06-10).
    {
        let db = d.db().await;
        let day0 = jiff::civil::date(2026, 4, 11);
        for i in 0..60i64 {
            let day = day0.checked_add(jiff::Span::new().days(i)).unwrap();
            for (customer, used) in [("Contoso Ltd", 2_000 * i * i), ("Fabrikam", 5_000 * i)] {
                sqlx::query(
                    "INSERT INTO usage_daily (day, customer, used, at) VALUES (?1, ?2, ?3, 0)",
                )
                .bind(day.to_string())
                .bind(customer)
                .bind(used)
                .execute(&db)
                .await
                .unwrap();
            }
        }
        db.close().await;
    }
    let b = Browser::start(&console).await;

    // Not logged in: every page leads to the login form.
    b.goto("/customers/Contoso%20Ltd").await;
    assert_eq!(b.path().await, "/login");
    b.screenshot("login").await;

    // --- The customer.
    b.login("contoso", CONTOSO_PW).await;
    assert_eq!(b.path().await, "/customers/Contoso%20Ltd");
    let t = b.text().await;
    assert!(t.contains("Contoso Ltd"), "{t}");
    assert!(t.contains("LAPTOP-1"), "{t}");
    assert!(
        t.contains(&format!("{} of 1 GiB", format_size(contoso_bytes))),
        "{t}"
    );
    assert!(
        t.contains("1 this month"),
        "one MCAL debited this month: {t}"
    );
    assert!(!t.contains("FAB-1") && !t.contains("Fabrikam"), "{t}");
    // The chart is an SVG image the page loads.
    let img = b.client.find(Locator::Css("img.chart")).await.unwrap();
    let loaded = b
        .client
        .execute(
            "return arguments[0].naturalWidth",
            vec![serde_json::to_value(&img).unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(loaded, serde_json::json!(720), "the usage chart loads");
    b.screenshot("customer").await;

    b.click(Locator::LinkText("LAPTOP-1")).await;
    let t = b.text().await;
    assert!(
        t.contains("nightly") && t.contains("ok"),
        "the session is listed: {t}"
    );
    assert!(
        t.contains("photos/big.bin") && t.contains("docs/a.txt"),
        "{t}"
    );
    b.screenshot("client").await;

    // A download is byte-exact.
    b.client
        .find(Locator::LinkText("photos/big.bin"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert_eq!(
        b.downloaded("big.bin").await,
        big,
        "the download is byte-exact"
    );

    b.goto("/customers/Contoso%20Ltd/connect").await;
    let t = b.text().await;
    assert!(t.contains(&d.pin), "the fingerprint is shown: {t}");
    let port = d.addr.rsplit(':').next().unwrap();
    assert!(
        t.contains(&format!("backup.example.com:{port}")),
        "the server address, with the port the daemon bound: {t}"
    );
    b.screenshot("connect").await;

    // Isolation: another customer's pages, clients, files and the admin's
    // and reseller's pages are all 404, the same as a name that does not
    // exist.
    for path in [
        "/customers/Fabrikam",
        "/customers/Fabrikam/clients/FAB-1",
        "/customers/Fabrikam/clients/FAB-1/download?path=secret.txt",
        "/customers/Contoso%20Ltd/clients/FAB-1",
        "/customers/Contoso%20Ltd/clients/FAB-1/download?path=secret.txt",
        "/customers/Contoso%20Ltd/clients/LAPTOP-1/download?path=..%2F..%2FFAB-1%2Fsecret.txt",
        "/customers/Fabrikam/usage.svg",
        "/customers/No%20Such%20Customer",
        "/resellers/acme",
        "/admin",
    ] {
        b.goto(path).await;
        let t = b.text().await;
        assert!(
            t.contains("Not found."),
            "{path} must answer 404 to a customer: {t}"
        );
        assert!(!t.contains("fabrikam only"), "{path}");
    }

    // CSRF: a POST without the token is refused, and the session lives on.
    b.goto("/customers/Contoso%20Ltd").await;
    b.client
        .execute(
            "document.querySelector(\"form[action='/logout'] input[name=csrf]\").remove();",
            vec![],
        )
        .await
        .unwrap();
    b.click(Locator::Css("form[action='/logout'] button")).await;
    let t = b.text().await;
    assert!(t.contains("did not come from this console"), "{t}");
    b.goto("/customers/Contoso%20Ltd").await;
    assert_eq!(
        b.path().await,
        "/customers/Contoso%20Ltd",
        "still logged in"
    );

    // Logout ends the session on the server: the old cookie is dead.
    let old = b.client.get_named_cookie("tollgate_session").await.unwrap();
    b.logout().await;
    b.client.add_cookie(old.clone()).await.unwrap();
    b.goto("/customers/Contoso%20Ltd").await;
    assert_eq!(b.path().await, "/login", "a logged-out session is gone");

    // --- The reseller: its customers, and only them.
    b.login("acme-admin", ACME_PW).await;
    assert_eq!(b.path().await, "/resellers/acme");
    let t = b.text().await;
    assert!(t.contains("Contoso Ltd") && t.contains("Fabrikam"), "{t}");
    assert!(!t.contains("Initech"), "{t}");
    assert!(
        t.contains("Allotted to customers") && t.contains("1 GiB"),
        "{t}"
    );
    b.screenshot("reseller").await;
    b.goto("/customers/Fabrikam/clients/FAB-1").await;
    assert!(
        b.text().await.contains("secret.txt"),
        "drill-down into its customers"
    );
    for path in [
        "/customers/Initech",
        "/customers/Initech/clients/INI-1",
        "/customers/Initech/clients/INI-1/download?path=tps.txt",
        "/resellers/globex",
        "/resellers/globex/usage.svg",
        "/customers/Default%20Customer",
        "/admin",
    ] {
        b.goto(path).await;
        assert!(
            b.text().await.contains("Not found."),
            "{path} must answer 404 to acme"
        );
    }
    // A crafted POST for another reseller's customer is 404 too.
    b.goto("/resellers/acme").await;
    b.client
        .execute(
            "document.querySelector(\"form[action='/admin/account-details'] input[name=customer]\").value = 'Initech';",
            vec![],
        )
        .await
        .unwrap();
    b.click(Locator::Css("form[action='/admin/account-details'] button"))
        .await;
    assert!(b.text().await.contains("Not found."));
    b.goto("/resellers/acme").await;
    b.logout().await;

    // --- The admin: the whole tree, refusals, outbox, penalties, reload.
    b.login("admin", ADMIN_PW).await;
    assert_eq!(b.path().await, "/admin");
    let t = b.text().await;
    for name in [
        "Default Customer",
        "acme",
        "globex",
        "Contoso Ltd",
        "Fabrikam",
        "Initech",
    ] {
        assert!(t.contains(name), "the admin sees {name}: {t}");
    }
    assert!(t.contains("3 this month"), "three MCALs debited: {t}");
    // "Send account details" for Fabrikam queues a mail without a password.
    b.run_and_wait(
        "for (const f of document.querySelectorAll(\"form[action='/admin/account-details']\")) { if (f.querySelector('input[name=customer]').value === 'Fabrikam') { f.querySelector('button').click(); } }",
    )
    .await;
    assert!(
        b.text()
            .await
            .contains("Account details queued for Fabrikam")
    );
    let mail = d.dir.join("mail");
    assert!(
        common::wait_until(Duration::from_secs(10), || {
            std::fs::read_dir(&mail).map(|r| r.count()).unwrap_or(0) >= 1
        }),
        "the account-details mail is written to the spool"
    );
    for e in std::fs::read_dir(&mail).unwrap().flatten() {
        let m = std::fs::read_to_string(e.path()).unwrap();
        if m.contains("Your backup account: Fabrikam") {
            assert!(m.contains("fabrikam"), "the user name: {m}");
            assert!(
                !m.contains(FABRIKAM_PW) && !m.contains("$argon2"),
                "no password: {m}"
            );
        }
    }
    b.goto("/admin").await;
    b.screenshot("admin").await;

    // A live change: a reload deactivates Contoso; the next page load shows it.
    common::replace_config(
        tmp.path(),
        &std::fs::read_to_string(tmp.path().join("tollgate.toml"))
            .unwrap()
            .replace("activated = true", "activated = false"),
    );
    assert!(
        common::wait_until(Duration::from_secs(20), || d
            .log()
            .matches("reloaded")
            .count()
            >= 1),
        "the daemon reloads"
    );
    b.goto("/customers/Contoso%20Ltd").await;
    let t = b.text().await;
    assert!(
        t.contains("deactivated"),
        "one page load shows the deactivation: {t}"
    );
    b.screenshot("customer-deactivated").await;
    b.goto("/admin").await;
    let t = b.text().await;
    assert!(t.contains("Last reload:") && t.contains("ok"), "{t}");

    b.close().await;
}

/// Wrong passwords cost the source the `auth_failed` penalty: past the
/// threshold even the right password is refused until it runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_are_penalized_in_a_real_browser() {
    if !browser::available() {
        return;
    }
    let _one = ONE_BROWSER.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    write_config(
        tmp.path(),
        "[server.limits.penalties]\nexempt = []\nauth_failed = \"5s\"\nmin = \"12s\"\nmax = \"1m\"\n",
        &body(tmp.path(), true),
    );
    let d = Daemon::start(tmp.path());
    let b = Browser::start(d.console.as_deref().unwrap()).await;
    // 5 s each: the third failure (15 s) passes `min` (12 s).
    for i in 0..3 {
        b.login("contoso", "not-the-secret").await;
        let t = b.text().await;
        assert!(
            t.contains("Wrong user name or password."),
            "attempt {i}: {t}"
        );
    }
    b.screenshot("login-failed").await;
    assert!(
        d.log().contains("penalizing source 127.0.0.1"),
        "the penalty is logged"
    );
    // The right password now meets the penalty, on a kept-alive
    // connection (429) or a new one (closed before TLS).
    b.goto("/login").await;
    let t = b.text().await;
    let refused = t.contains("Too many failed logins") || !t.contains("Log in");
    if !refused {
        b.login("contoso", CONTOSO_PW).await;
        let t = b.text().await;
        assert!(
            t.contains("Too many failed logins"),
            "the right password is refused while penalized: {t}"
        );
    }
    assert!(
        d.log()
            .contains("authentication failure for web:contoso from 127.0.0.1"),
        "fail2ban's line"
    );
    b.close().await;
}

/// The account-details mail through a real SMTP server: once per new
/// customer with `send_account_details = true` (not again after a
/// restart, once more for a customer a reload adds), again on demand with
/// `tollgate account send`, and never with a password in it.
#[test]
fn account_details_go_once_per_new_customer_and_again_on_demand() {
    use common::{Smtp, free_port};
    let tmp = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(&tmp.path().join("maildir"), free_port());
    let loc = |n: &str| tmp.path().join("backup").join(n).display().to_string();
    let customer = |name: &str, user: &str, pw: &str| {
        format!(
            "[[customer]]\nname = \"{name}\"\nreseller = \"acme\"\nemail = \"it@{user}.example\"\nbackup_location = \"{}\"\nauto_add_clients = true\nsend_account_details = true\nweb_access = {{ user = \"{user}\", password = \"{}\" }}\n",
            loc(user),
            phc(pw)
        )
    };
    let head = format!(
        "[server.email]\nfrom = \"tollgate@backup.example\"\nsmtp = \"smtp://127.0.0.1:{}\"\n[server.web]\nlisten = \"127.0.0.1:0\"\npublic_url = \"https://backup.example.com:8443\"\n[default_customer]\nbackup_location = \"{}\"\n[[reseller]]\nname = \"acme\"\n",
        smtp.port,
        loc("default")
    );
    let two = format!(
        "{head}{}{}",
        customer("Contoso Ltd", "contoso", CONTOSO_PW),
        customer("Fabrikam", "fabrikam", FABRIKAM_PW)
    );
    write_config(tmp.path(), "", &two);
    let mut d = Daemon::start(tmp.path());
    let got = smtp.wait_for(2, Duration::from_secs(20));
    assert_eq!(got.len(), 2, "one mail per new customer");
    // The plain-text part, decoded (quoted-printable wraps long lines).
    let text = |m: &[u8]| {
        let parsed = mail_parser::MessageParser::default().parse(m).unwrap();
        format!(
            "{}\n{}",
            parsed.subject().unwrap_or_default(),
            parsed.body_text(0).unwrap_or_default()
        )
    };
    let all: String = got.iter().map(|m| text(m)).collect();
    assert!(all.contains("Your backup account: Contoso Ltd"));
    assert!(all.contains("Your backup account: Fabrikam"));
    assert!(
        all.contains("https://backup.example.com:8443"),
        "the console's address"
    );
    assert!(all.contains(&d.pin), "the certificate's fingerprint");
    assert!(all.contains("User name:   contoso"), "{all}");
    for secret in [CONTOSO_PW, FABRIKAM_PW, "$argon2"] {
        assert!(!all.contains(secret), "no password or hash in the mail");
    }

    // A restart sends nothing again. (Delivery is at least once: a crash
    // between the relay's 250 and the outbox's record resends, so the
    // restart waits until both are recorded as sent.)
    let db = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let pool = d.db().await;
        for _ in 0..200 {
            let sent: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE sent_at IS NOT NULL")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            if sent == 2 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    });
    assert!(db, "both mails are recorded as sent");
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(30)), Some(0));
    let mut d = Daemon::start(tmp.path());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(smtp.messages().len(), 2, "not again after a restart");

    // A reload that adds a customer sends its mail, once.
    common::replace_config(
        tmp.path(),
        &format!(
            "{}\n{two}{}",
            "[server]\nlisten = [\"127.0.0.1:0\"]\nstate = \"sqlite://state/state.db\"\ntimezone = \"UTC\"\n",
            customer("Initech", "initech", GLOBEX_PW)
        ),
    );
    let got = smtp.wait_for(3, Duration::from_secs(20));
    assert_eq!(got.len(), 3, "the new customer's mail");
    assert!(text(&got[2]).contains("Your backup account: Initech"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(smtp.messages().len(), 3, "exactly once");

    // On demand: `tollgate account send`.
    let out = common::admin_ok(
        &d.config,
        &["account", "send", "--customer", "contoso ltd"],
        &[],
    );
    assert!(
        out.contains("sent the account details of Contoso Ltd to it@contoso.example"),
        "{out}"
    );
    let got = smtp.wait_for(4, Duration::from_secs(20));
    assert_eq!(got.len(), 4);
    assert!(text(&got[3]).contains("Your backup account: Contoso Ltd"));
    assert!(!text(&got[3]).contains(CONTOSO_PW));
    d.kill9();
}

/// The console's connections are bounded like the backup port's: a TLS
/// handshake that fails costs the source the `no_hello` penalty (past the
/// threshold its connections are closed before TLS), and a request whose
/// head does not arrive in time is cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_penalized_and_a_slow_request_head_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().unwrap();
    let web = |dir: &Path| {
        format!(
            "[server.web]\nlisten = \"127.0.0.1:0\"\nadmin = {{ user = \"admin\", password = \"{}\" }}\n[default_customer]\nbackup_location = \"{}\"\n",
            phc(ADMIN_PW),
            dir.join("backup").display()
        )
    };
    // Loopback is exempt from penalties by default: the slow head first.
    write_config(tmp.path(), "", &web(tmp.path()));
    let d = Daemon::start(tmp.path());
    let console = d.console.clone().unwrap();

    // A request head dripped and never finished: closed within the header
    // timeout (10 s), with generous slack for a loaded machine.
    let tls = {
        let cfg = tollgate::tls::client_config(Some(&d.pin), None).unwrap();
        let mut cfg = (*cfg).clone();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
    };
    let tcp = tokio::net::TcpStream::connect(&console).await.unwrap();
    let mut s = tls
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    s.write_all(b"GET /login HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 512];
    let closed = tokio::time::timeout(Duration::from_secs(40), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a 408 may come first
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a request head that never ends is cut off");
    assert!(
        t0.elapsed() >= Duration::from_secs(5),
        "not before the timeout: {:?}",
        t0.elapsed()
    );
    drop(d);

    // Garbage instead of TLS, three times at 5 s each past a 12 s
    // threshold: the fourth connection is closed before TLS.
    let tmp = tempfile::tempdir().unwrap();
    write_config(
        tmp.path(),
        "[server.limits.penalties]\nexempt = []\nno_hello = \"5s\"\nmin = \"12s\"\nmax = \"1m\"\n",
        &web(tmp.path()),
    );
    let d = Daemon::start(tmp.path());
    let console = d.console.clone().unwrap();
    for _ in 0..3 {
        let mut t = tokio::net::TcpStream::connect(&console).await.unwrap();
        t.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(10), t.read(&mut buf)).await;
    }
    assert!(
        common::wait_until(Duration::from_secs(10), || d
            .log()
            .contains("penalizing source 127.0.0.1")),
        "the penalty starts: {}",
        d.log()
    );
    let tcp = tokio::net::TcpStream::connect(&console).await.unwrap();
    let refused = tls
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await;
    assert!(
        refused.is_err(),
        "a penalized source's connection is closed before TLS"
    );
}
