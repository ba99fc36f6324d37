//! `[[include]]` (issue 16): a main file and directories of customer files
//! bound to resellers, read as one config. Each rule has its located error
//! here, in the included file and line it came from.

use std::path::{Path, PathBuf};
use tollgate::config::{Config, ConfigError, LoadError, Rule};

const MAIN: &str = r#"
[server]
listen = ["127.0.0.1:0"]
state = "sqlite://state/state.db"
total_space = "100 GiB"

[default_customer]
backup_location = "./backup/default"
space = "10 GiB"

[[reseller]]
name = "acme"
space = "10 GiB"

[[reseller]]
name = "globex"
space = "10 GiB"

[[customer]]
name = "Main Street"
reseller = "acme"
email = "it@main.example"
backup_location = "./backup/main"
space = "1 GiB"

[[include]]
path = "resellers.d/acme/*.toml"
reseller = "acme"

[[include]]
path = "admin.d/*.toml"
"#;

fn customer(name: &str, reseller: &str, space: &str) -> String {
    format!(
        "[[customer]]\nname = \"{name}\"\nreseller = \"{reseller}\"\nemail = \"it@{}.example\"\nbackup_location = \"./backup/{}\"\nspace = \"{space}\"\n",
        name.to_lowercase().replace(' ', "-"),
        name.to_lowercase().replace(' ', "-")
    )
}

/// A temp dir with the main file and `files` (relative path, text).
fn setup(files: &[(&str, String)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for d in ["resellers.d/acme", "admin.d"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    let main = dir.path().join("tollgate.toml");
    std::fs::write(&main, MAIN).unwrap();
    for (p, text) in files {
        std::fs::write(dir.path().join(p), text).unwrap();
    }
    (dir, main)
}

fn errors(main: &Path) -> Vec<ConfigError> {
    match Config::load(main) {
        Ok(_) => panic!("the set loaded, but it is invalid"),
        Err(LoadError::Invalid(e)) => e,
        Err(e) => panic!("{e}"),
    }
}

/// The one error, checked for its rule, file, line and key.
fn one(errs: &[ConfigError], rule: Rule, file: &Path, line: usize, key: &str) {
    assert_eq!(errs.len(), 1, "{errs:#?}");
    let e = &errs[0];
    assert_eq!(
        (e.rule, e.file.as_path(), e.line, e.key.as_str()),
        (rule, file, line, key),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with(&format!("{}:{line}:", file.display())),
        "{e}"
    );
}

#[test]
fn a_valid_set_loads_as_one_config() {
    let client = "[[client]]\nid = \"PC-1\"\ncustomer = \"Contoso\"\nkind = \"server\"\n";
    let (dir, main) = setup(&[
        (
            "resellers.d/acme/contoso.toml",
            format!("{}{client}", customer("Contoso", "acme", "2 GiB")),
        ),
        (
            "resellers.d/acme/fabrikam.toml",
            customer("Fabrikam", "acme", "2 GiB"),
        ),
        // Not matched by the pattern, and hidden: ignored.
        ("resellers.d/acme/notes.txt", "not toml at all [".into()),
        ("resellers.d/acme/.contoso.toml.swp", "garbage [".into()),
        (
            "admin.d/initech.toml",
            customer("Initech", "globex", "3 GiB"),
        ),
    ]);
    let cfg = Config::load(&main).unwrap_or_else(|e| panic!("{e}: {e:?}"));
    let names: Vec<&str> = cfg.customers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "Default Customer",
            "Main Street",
            "Contoso",
            "Fabrikam",
            "Initech"
        ]
    );
    let contoso = cfg.customer_by_name("contoso").unwrap();
    assert_eq!(
        cfg.reseller(cfg.customer(contoso).reseller.unwrap()).name,
        "acme"
    );
    let pc = cfg.declared_client("PC-1").unwrap();
    assert_eq!(cfg.client(pc).customer, contoso);
    assert_eq!(cfg.includes.len(), 2);
    assert_eq!(cfg.includes[0].reseller.as_deref(), Some("acme"));
    assert_eq!(cfg.includes[1].reseller, None);
    // The saved text reads back to the same set without the directories
    // (the daemon's applied copy).
    let again = Config::from_str(&cfg.source.0, &main).unwrap();
    assert_eq!(again.customers.len(), cfg.customers.len());
    drop(dir);
}

#[test]
fn an_included_file_may_hold_only_customers_and_clients() {
    let bad = format!(
        "{}\n[server]\nmax_connections = 5\n",
        customer("Contoso", "acme", "1 GiB")
    );
    let (dir, main) = setup(&[("resellers.d/acme/contoso.toml", bad)]);
    let file = dir.path().join("resellers.d/acme/contoso.toml");
    one(&errors(&main), Rule::Include, &file, 8, "server");
}

#[test]
fn a_resellers_file_cannot_hold_another_resellers_customer() {
    let (dir, main) = setup(&[
        (
            "resellers.d/acme/ok.toml",
            customer("Contoso", "acme", "1 GiB"),
        ),
        (
            "resellers.d/acme/sneaky.toml",
            customer("Stolen", "globex", "1 GiB"),
        ),
    ]);
    let file = dir.path().join("resellers.d/acme/sneaky.toml");
    one(
        &errors(&main),
        Rule::Include,
        &file,
        3,
        "customer[Stolen].reseller",
    );
}

#[test]
fn a_resellers_file_cannot_declare_another_resellers_client() {
    let client = "[[client]]\nid = \"PC-9\"\ncustomer = \"Initech\"\n";
    let (dir, main) = setup(&[
        (
            "admin.d/initech.toml",
            customer("Initech", "globex", "1 GiB"),
        ),
        ("resellers.d/acme/clients.toml", client.to_string()),
    ]);
    let file = dir.path().join("resellers.d/acme/clients.toml");
    one(
        &errors(&main),
        Rule::Include,
        &file,
        3,
        "client[PC-9].customer",
    );
}

#[test]
fn an_over_allocating_space_is_located_in_the_included_file() {
    // acme has 10 GiB; Main Street holds 1 GiB of it.
    let (dir, main) = setup(&[(
        "resellers.d/acme/big.toml",
        customer("Big", "acme", "9500 MiB"),
    )]);
    let errs = errors(&main);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].rule, Rule::SpaceOverAllocated, "{}", errs[0]);
    let text = errs[0].to_string();
    assert!(text.contains("acme"), "names the reseller: {text}");
    // At the included customer's space, not the reseller's in the main file.
    let file = dir.path().join("resellers.d/acme/big.toml");
    assert_eq!(
        (errs[0].file.as_path(), errs[0].line, errs[0].key.as_str()),
        (file.as_path(), 6, "customer[Big].space"),
        "{text}"
    );
}

#[test]
fn a_broken_included_file_is_located_and_the_rest_still_checked() {
    let (dir, main) = setup(&[
        (
            "resellers.d/acme/broken.toml",
            "[[customer]]\nname = \"Broken\nreseller = \"acme\"\n".into(),
        ),
        (
            "resellers.d/acme/dup.toml",
            customer("Main Street", "acme", "1 GiB"),
        ),
    ]);
    let errs = errors(&main);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    let broken = dir.path().join("resellers.d/acme/broken.toml");
    let dup = dir.path().join("resellers.d/acme/dup.toml");
    assert!(
        errs.iter()
            .any(|e| e.rule == Rule::Include && e.file == broken && e.line == 2),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.rule == Rule::Duplicate && e.file == dup && e.line == 2),
        "a duplicate name across files is located in the second: {errs:#?}"
    );
}

#[test]
fn check_config_and_status_treat_the_set_as_one() {
    let (dir, main) = setup(&[(
        "resellers.d/acme/contoso.toml",
        customer("Contoso", "acme", "2 GiB"),
    )]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check-config", "--json", "--config"])
        .arg(&main)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = doc.to_string();
    assert!(text.contains("Contoso"), "{text}");
    drop(dir);
}

mod common;

/// The daemon follows the include directories: a customer file dropped into
/// a reseller's directory reloads the set, and the new customer's first
/// client is admitted over the protocol; a file that breaks the rules is
/// refused with its location, and the running set stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_reloads_when_an_included_file_appears() {
    let dir = tempfile::tempdir().unwrap();
    let acme = dir.path().join("resellers.d/acme");
    std::fs::create_dir_all(&acme).unwrap();
    common::write_config(
        dir.path(),
        "",
        &format!(
            "[default_customer]\nbackup_location = \"{}\"\n[[reseller]]\nname = \"acme\"\n[[include]]\npath = \"resellers.d/acme/*.toml\"\nreseller = \"acme\"\n",
            dir.path().join("backup/default").display()
        ),
    );
    let d = common::Daemon::start(dir.path());
    let mut o = d.opts("PC-1");
    o.customer = Some("Contoso".into());
    let refused = tollgate::client::Session::connect(&o)
        .await
        .err()
        .expect("no such customer yet");
    assert_eq!(refused.code(), Some("unknown_customer"), "{refused}");

    // Written the way an editor or the console does: temp file, rename.
    let write = |name: &str, text: String| {
        let tmp = acme.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, acme.join(name)).unwrap();
    };
    write(
        "contoso.toml",
        format!(
            "{}auto_add_clients = true\n",
            customer("Contoso", "acme", "1 GiB").replace(
                "backup_location = \"./backup/contoso\"",
                &format!(
                    "backup_location = \"{}\"",
                    dir.path().join("backup/contoso").display()
                )
            )
        ),
    );
    assert!(
        common::wait_until(std::time::Duration::from_secs(20), || d
            .log()
            .contains("reloaded")),
        "the new file reloads the set: {}",
        d.log()
    );
    let s = tollgate::client::Session::connect(&o).await.unwrap();
    assert_eq!(s.welcome.customer, "Contoso");
    s.bye().await.unwrap();

    // Another reseller's customer in acme's directory: refused, located.
    write("stolen.toml", customer("Stolen", "globex", "1 GiB"));
    assert!(
        common::wait_until(std::time::Duration::from_secs(20), || d
            .log()
            .contains("stolen.toml:3:")),
        "the refused reload names the file and line: {}",
        d.log()
    );
    let s = tollgate::client::Session::connect(&o).await.unwrap();
    assert_eq!(s.welcome.customer, "Contoso", "the running set stays");
    s.bye().await.unwrap();
}
