//! "Add a New Customer" (issue 16) in a real headless Chromium against the
//! real daemon: a reseller adds a customer with every field, the file
//! appears and validates, the reloaded daemon admits its first client over
//! the protocol and the account-details mail goes once (through a real
//! SMTP server); edit and deactivate rewrite the file; a form with errors
//! shows each beside its field and writes nothing; crafted POSTs for
//! another reseller write nothing; a manual edit made meanwhile is not
//! overwritten.

#[path = "common/browser.rs"]
mod browser;
mod common;

use browser::Browser;
use common::{Daemon, Smtp, free_port, phc, write_config};
use fantoccini::Locator;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tollgate::config::Config;

/// Browsers are heavy on two cores: one test drives one at a time.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ADMIN_PW: &str = "tg-form-admin-0451";
const ACME_PW: &str = "tg-form-acme-0451";
const GLOBEX_PW: &str = "tg-form-globex-0451";
const NEW_CUSTOMER_PW: &str = "tg-form-contoso-0451";
const ENROLL_KEY: &str = "tg-form-enroll-0451";

/// The main file: resellers acme (10 GiB, 1 GiB of it to Main Street) and
/// globex, each with its include directory, and an admin's directory.
fn setup(dir: &Path, smtp_port: u16) -> PathBuf {
    let loc = |n: &str| dir.join("backup").join(n).display().to_string();
    for d in ["resellers.d/acme", "resellers.d/globex", "admin.d"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    write_config(
        dir,
        "",
        &format!(
            r#"
[server.web]
listen = "127.0.0.1:0"
public_url = "https://backup.example.com:8443"
admin = {{ user = "admin", password = "{admin}" }}

[server.mcal]
pool = 50

[server.email]
from = "tollgate@backup.example"
smtp = "smtp://127.0.0.1:{smtp_port}"

[default_customer]
backup_location = "{def}"

[[reseller]]
name = "acme"
space = "10 GiB"
web_access = {{ user = "acme-admin", password = "{acme}" }}

[[reseller]]
name = "globex"
web_access = {{ user = "globex-admin", password = "{globex}" }}

[[customer]]
name = "Main Street"
reseller = "acme"
email = "it@main.example"
backup_location = "{main}"
space = "1 GiB"

[[customer]]
name = "Initech"
reseller = "globex"
email = "it@initech.example"
backup_location = "{initech}"

[[include]]
path = "resellers.d/acme/*.toml"
reseller = "acme"

[[include]]
path = "resellers.d/globex/*.toml"
reseller = "globex"

[[include]]
path = "admin.d/*.toml"
"#,
            admin = phc(ADMIN_PW),
            acme = phc(ACME_PW),
            globex = phc(GLOBEX_PW),
            def = loc("default"),
            main = loc("main"),
            initech = loc("initech"),
        ),
    )
}

/// The names of the files in `dir`, hidden ones too.
fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The subject and plain text of each message.
fn texts(msgs: &[Vec<u8>]) -> Vec<String> {
    msgs.iter()
        .map(|m| {
            let p = mail_parser::MessageParser::default().parse(m).unwrap();
            format!(
                "{}\n{}",
                p.subject().unwrap_or_default(),
                p.body_text(0).unwrap_or_default()
            )
        })
        .collect()
}

/// Fills in every field of the form for "Contoso Ltd".
async fn fill_everything(b: &Browser) {
    for (css, v) in [
        ("#name", "Contoso Ltd"),
        ("#email", "it@contoso.example"),
        ("#address", "1 Main St"),
        ("#city", "Springfield"),
        ("#phone", "+1 555 0100"),
        ("#fax", "+1 555 0101"),
        ("#notes", "Priority support"),
        ("#space", "2 GiB"),
        ("#enroll_key", ENROLL_KEY),
        ("#enroll_key_confirm", ENROLL_KEY),
        ("#web_user", "contoso"),
        ("#web_password", NEW_CUSTOMER_PW),
        ("#web_password_confirm", NEW_CUSTOMER_PW),
        ("#mcal_fixed", "10"),
        ("#max_clients", "5"),
        ("#throttle_from", "08:00"),
        ("#throttle_to", "18:00"),
        ("#throttle_rate", "20 Mbit/s"),
        ("#aggregate_rate", "50 MiB/s"),
        ("#aggregate_hours", "always"),
        (
            "#report_recipients",
            "cio@contoso.example, it@contoso.example",
        ),
    ] {
        b.fill(css, v).await;
    }
    for (css, on) in [
        ("input[name=auto_add_clients]", true),
        ("input[name=email_reports]", true),
        ("input[name=web_access]", true),
        ("input[name=mcal_mode][value=fixed]", true),
        ("input[name=activated][value=yes]", true),
        ("input[name=throttle_mode][value=custom]", true),
        ("input[name=throttle_enabled]", true),
        ("input[name=throttle_when][value=hours]", true),
        ("input[name=throttle_weekends]", true),
        ("input[name=aggregate_weekends]", true),
        ("input[name=report]", true),
        ("input[name=send_account_details]", true),
    ] {
        b.tick(css, on).await;
    }
    b.client
        .find(Locator::Css("#report_frequency option[value=monthly]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// A reseller adds a customer with every field; the file appears and
/// validates; the daemon admits its first client; the mail goes once;
/// Edit and Deactivate rewrite the file; a manual edit made while a form
/// is open is not overwritten; the admin's page lists each change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reseller_adds_a_customer_and_its_first_client_is_admitted() {
    if !browser::available() {
        return;
    }
    let _one = ONE_BROWSER.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(&tmp.path().join("maildir"), free_port());
    let main = setup(tmp.path(), smtp.port);
    let d = Daemon::start(tmp.path());
    let b = Browser::start(d.console.as_deref().unwrap()).await;
    b.login("acme-admin", ACME_PW).await;
    b.goto("/resellers/acme").await;
    b.click(Locator::Css("#add-customer")).await;
    assert_eq!(b.path().await, "/resellers/acme/customers/new");
    let t = b.text().await;
    for snapshot in [
        "Disk space allotted for the reseller 10 GiB",
        "Total backup space allotted to customers 1 GiB",
        "Free backup space available 9 GiB",
        "MCALs available in the global pool: 50",
    ] {
        assert!(
            t.contains(snapshot),
            "the reseller's snapshot: {snapshot}\n{t}"
        );
    }
    fill_everything(&b).await;
    b.fit_page().await;
    b.screenshot("customer-form-filled").await;
    b.click(Locator::Css("#save")).await;
    let t = b.text().await;
    assert_eq!(b.path().await, "/customers/Contoso%20Ltd", "{t}");
    assert!(t.contains("Saved Contoso Ltd"), "{t}");

    // The file: in acme's directory, named from the customer, 0600, with
    // its header, hashes only, and valid as part of the set.
    let acme = tmp.path().join("resellers.d/acme");
    assert_eq!(
        files(&acme),
        ["contoso%20ltd.toml"],
        "one file, no temp file left"
    );
    let file = acme.join("contoso%20ltd.toml");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.starts_with(
            "# Written by the tollgate web console for reseller acme (user acme-admin) at "
        ),
        "{text}"
    );
    for secret in [NEW_CUSTOMER_PW, ENROLL_KEY] {
        assert!(
            !text.contains(secret),
            "a typed secret reached the disk:\n{text}"
        );
    }
    let cfg = Config::load(&main).expect("the set validates");
    let c = cfg.customer(cfg.customer_by_name("Contoso Ltd").unwrap());
    assert_eq!(cfg.reseller(c.reseller.unwrap()).name, "acme");
    assert_eq!(c.email.as_deref(), Some("it@contoso.example"));
    assert_eq!(c.records.city.as_deref(), Some("Springfield"));
    assert_eq!(c.records.fax.as_deref(), Some("+1 555 0101"));
    assert_eq!(c.records.notes.as_deref(), Some("Priority support"));
    assert_eq!(c.space, Some(2 << 30));
    assert!(c.auto_add_clients && c.email_reports && c.activated && c.send_account_details);
    assert!(
        c.enroll_key.as_ref().unwrap().verify(ENROLL_KEY),
        "the enroll key, hashed"
    );
    let w = c.web_access.as_ref().unwrap();
    assert_eq!(w.username, "contoso");
    assert!(w.password.verify(NEW_CUSTOMER_PW), "the password, hashed");
    assert_eq!(c.mcal_limit, tollgate::config::McalLimit::Fixed(10));
    assert_eq!(c.max_clients, Some(5));
    let tollgate::config::ThrottleSetting::Explicit(th) = c.throttle else {
        panic!("a throttle of its own")
    };
    assert_eq!(th.rate, Some(20_000_000 / 8));
    assert_eq!(th.hours.to_string(), "08:00-18:00");
    assert!(th.weekends_unthrottled);
    assert_eq!(c.aggregate.unwrap().rate, 50 << 20);
    let r = c.consolidated_report.as_ref().unwrap();
    assert_eq!(r.recipients, ["cio@contoso.example", "it@contoso.example"]);
    assert_eq!(r.frequency, tollgate::config::Frequency::Monthly);
    assert!(
        c.backup_location
            .starts_with(tmp.path().join("backup/acme")),
        "{:?}",
        c.backup_location
    );

    // The reloaded daemon admits the first client, with the enroll key.
    let mut o = d.opts("CONTOSO-PC1");
    o.customer = Some("Contoso Ltd".into());
    o.enroll_key = Some(ENROLL_KEY.into());
    let s = tollgate::client::Session::connect(&o).await.unwrap();
    assert_eq!(s.welcome.customer, "Contoso Ltd");
    s.bye().await.unwrap();

    // The account details, once.
    let got = smtp.wait_for(1, Duration::from_secs(20));
    let t = texts(&got);
    assert_eq!(t.len(), 1, "{t:?}");
    assert!(
        t[0].contains("Your backup account: Contoso Ltd"),
        "{}",
        t[0]
    );
    assert!(t[0].contains("User name:   contoso"), "{}", t[0]);
    assert!(!t[0].contains(NEW_CUSTOMER_PW) && !t[0].contains("$argon2"));

    // The customer can log in with the password typed into the form.
    b.logout().await;
    b.login("contoso", NEW_CUSTOMER_PW).await;
    assert_eq!(b.path().await, "/customers/Contoso%20Ltd");
    b.goto("/resellers/acme/customers/new").await;
    assert!(
        b.text().await.contains("Not found."),
        "a customer adds no customers"
    );
    b.goto("/customers/Contoso%20Ltd/edit").await;
    assert!(b.text().await.contains("Not found."), "nor edits itself");
    b.goto("/").await;
    b.logout().await;

    // Edit: the form comes back filled in; a change rewrites the file.
    b.login("acme-admin", ACME_PW).await;
    b.goto("/customers/Contoso%20Ltd").await;
    b.click(Locator::Css("#edit-customer")).await;
    assert_eq!(b.value("#space").await, "2 GiB");
    assert_eq!(b.value("#throttle_rate").await, "20 Mbit/s");
    assert_eq!(b.value("#web_user").await, "contoso");
    assert_eq!(
        b.value("#web_password").await,
        "",
        "no password is sent back"
    );
    b.fill("#max_clients", "7").await;
    b.click(Locator::Css("#save")).await;
    assert!(b.text().await.contains("Saved Contoso Ltd"));
    let cfg = Config::load(&main).unwrap();
    let c = cfg.customer(cfg.customer_by_name("Contoso Ltd").unwrap());
    assert_eq!(c.max_clients, Some(7));
    assert!(
        c.web_access
            .as_ref()
            .unwrap()
            .password
            .verify(NEW_CUSTOMER_PW),
        "the password is kept"
    );
    assert!(
        c.enroll_key.as_ref().unwrap().verify(ENROLL_KEY),
        "the enroll key is kept"
    );

    // A manual edit while the form is open is not overwritten.
    b.click(Locator::Css("#edit-customer")).await;
    let by_hand = std::fs::read_to_string(&file)
        .unwrap()
        .replace("max_clients = 7", "max_clients = 9");
    std::fs::write(&file, &by_hand).unwrap();
    b.fill("#max_clients", "3").await;
    b.click(Locator::Css("#save")).await;
    let t = b.text().await;
    assert!(
        t.contains("changed on disk after this form was opened"),
        "{t}"
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        by_hand,
        "the manual edit stands"
    );

    // Deactivate rewrites the file; the daemon turns the client away.
    b.goto("/customers/Contoso%20Ltd").await;
    b.click(Locator::Css("#activation")).await;
    assert!(b.text().await.contains("Saved Contoso Ltd"));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("activated = false") && text.contains("max_clients = 9"),
        "{text}"
    );
    let refused = tollgate::client::Session::connect(&o)
        .await
        .err()
        .expect("deactivated");
    assert_eq!(refused.code(), Some("customer_deactivated"), "{refused}");
    b.logout().await;

    // The admin's page lists each change: who, what, when.
    b.login("admin", ADMIN_PW).await;
    let mut rows = Vec::new();
    for r in b
        .client
        .find_all(Locator::Css("#audit tbody tr"))
        .await
        .unwrap()
    {
        rows.push(r.text().await.unwrap());
    }
    assert_eq!(rows.len(), 3, "{rows:#?}");
    // Newest first.
    for (row, parts) in rows.iter().zip([
        ["deactivate", "changed: activated"],
        ["edit", "changed: max_clients"],
        ["add", "added"],
    ]) {
        for p in parts.iter().chain(&[
            "acme-admin (reseller acme)",
            "Contoso Ltd",
            "contoso%20ltd.toml",
        ]) {
            assert!(row.contains(p), "{p:?} in {row:?}");
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(smtp.messages().len(), 1, "the account details went once");
    b.close().await;
}

/// Errors come back beside their fields and nothing is written; another
/// reseller's directory cannot be reached, even by a crafted POST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_form_or_a_foreign_post_writes_nothing() {
    if !browser::available() {
        return;
    }
    let _one = ONE_BROWSER.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(&tmp.path().join("maildir"), free_port());
    let _main = setup(tmp.path(), smtp.port);
    let d = Daemon::start(tmp.path());
    let b = Browser::start(d.console.as_deref().unwrap()).await;
    b.login("acme-admin", ACME_PW).await;
    b.goto("/resellers/acme/customers/new").await;
    // 9.5 GiB more than the 1 GiB Main Street has: over acme's 10 GiB.
    b.fill("#name", "Big Co").await;
    b.fill("#email", "it@big.example").await;
    b.fill("#space", "9500 MiB").await;
    b.fill("#max_clients", "lots").await;
    b.tick("input[name=web_access]", true).await;
    b.fill("#web_user", "big").await;
    b.fill("#web_password", "one").await;
    b.fill("#web_password_confirm", "two").await;
    b.click(Locator::Css("#save")).await;
    // The form's own checks first: each beside its field.
    let m = b
        .text_of("#error-max_clients")
        .await
        .expect("beside max_clients");
    assert!(m.contains("whole number"), "{m}");
    let m = b
        .text_of("#error-web_access")
        .await
        .expect("beside web access");
    assert!(m.contains("differ"), "{m}");
    assert_eq!(b.value("#name").await, "Big Co", "what was typed stays");
    // Then the validator's: the space over-allocates the reseller.
    b.fill("#max_clients", "").await;
    b.fill("#web_password", "same-0451").await;
    b.fill("#web_password_confirm", "same-0451").await;
    b.click(Locator::Css("#save")).await;
    let m = b
        .text_of("#error-space")
        .await
        .expect("beside the space field");
    assert!(
        m.contains("more than reseller \"acme\"'s space of 10 GiB"),
        "{m}"
    );
    assert!(b.text_of("#error-max_clients").await.is_none());
    // A clash with another reseller's login is named, not who holds it.
    b.fill("#space", "1 GiB").await;
    b.fill("#web_user", "globex-admin").await;
    b.fill("#web_password", "same-0451").await;
    b.fill("#web_password_confirm", "same-0451").await;
    b.click(Locator::Css("#save")).await;
    let m = b
        .text_of("#error-web_access")
        .await
        .expect("beside web access");
    assert!(m.contains("already in use"), "{m}");
    assert!(
        !m.contains("globex"),
        "another reseller's login is not named: {m}"
    );
    b.fill("#web_user", "big").await;
    b.fill("#space", "9500 MiB").await;
    b.fill("#web_password", "same-0451").await;
    b.fill("#web_password_confirm", "same-0451").await;
    b.click(Locator::Css("#save")).await;
    assert!(b.text_of("#error-space").await.is_some());
    b.fit_page().await;
    b.screenshot("customer-form-errors").await;
    for dir in ["resellers.d/acme", "resellers.d/globex", "admin.d"] {
        assert!(
            files(&tmp.path().join(dir)).is_empty(),
            "nothing written in {dir}"
        );
    }

    // Crafted POSTs, with acme's valid session and CSRF token, for
    // another reseller and its customer: 404, and nothing written.
    let csrf = b.value("input[name=csrf]").await;
    for (action, fields) in [
        (
            "/resellers/globex/customers/new",
            "name=Stolen&email=it%40stolen.example&activated=yes&mcal_mode=auto&throttle_mode=inherit",
        ),
        (
            "/customers/Initech/edit",
            "email=it%40initech.example&activated=no",
        ),
        ("/customers/Initech/activation", "activated=no"),
    ] {
        let script = format!(
            "const f = document.createElement('form'); f.method = 'post'; f.action = '{action}';
             for (const [k, v] of new URLSearchParams('{fields}&csrf={csrf}')) {{
               const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v; f.appendChild(i); }}
             document.body.appendChild(f); f.submit();"
        );
        b.run_and_wait(&script).await;
        let t = b.text().await;
        assert!(t.contains("Not found."), "{action}: {t}");
    }
    for dir in ["resellers.d/acme", "resellers.d/globex", "admin.d"] {
        assert!(
            files(&tmp.path().join(dir)).is_empty(),
            "nothing written in {dir}"
        );
    }
    let db = d.db().await;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM console_audit")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(n, 0, "no change was made");

    // The admin may add under globex: its file goes to globex's directory.
    b.goto("/").await;
    b.logout().await;
    b.login("admin", ADMIN_PW).await;
    b.goto("/resellers/globex/customers/new").await;
    b.fill("#name", "Hooli").await;
    b.fill("#email", "it@hooli.example").await;
    b.click(Locator::Css("#save")).await;
    assert!(b.text().await.contains("Saved Hooli"), "{}", b.text().await);
    assert_eq!(
        files(&tmp.path().join("resellers.d/globex")),
        ["hooli.toml"]
    );

    // A set that validates but that the daemon refuses to apply (a backup
    // location it cannot create): the file is taken back, nothing changes.
    b.goto("/resellers/globex/customers/new").await;
    b.fill("#name", "Umbrella").await;
    b.fill("#email", "it@umbrella.example").await;
    b.fill("#backup_location", "/proc/tollgate-cannot-be-here")
        .await;
    b.click(Locator::Css("#save")).await;
    let t = b.text().await;
    assert!(
        t.contains("refused the new configuration; the file was put back"),
        "{t}"
    );
    assert_eq!(
        files(&tmp.path().join("resellers.d/globex")),
        ["hooli.toml"]
    );
    assert!(d.log().contains("reload refused"), "{}", d.log());
    b.close().await;
}
