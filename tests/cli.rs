//! The `tollgate` binary as an administrator runs it: `check-config` on the
//! bundled example and on a broken file, `hash-secret`, and usage errors.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn tollgate(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("TOLLGATE_CONFIG")
        .env("TOLLGATE_FAKE_NOW", "2026-06-10T10:00:00Z")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the tollgate binary runs");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The bundled example with its directories moved under `dir`, so the
/// disk checks pass as any user.
fn example_in(dir: &Path) -> String {
    bundled_in("config/tollgate.example.toml", dir)
}

/// A bundled config with its absolute directories moved under `dir`.
fn bundled_in(file: &str, dir: &Path) -> String {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
    let d = dir.display();
    let text = text
        .replace("\"/var/lib/", &format!("\"{d}/var/lib/"))
        .replace("sqlite:///var/lib/", &format!("sqlite://{d}/var/lib/"))
        .replace("\"/srv/", &format!("\"{d}/srv/"))
        .replace("\"/var/spool/", &format!("\"{d}/var/spool/"));
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn check_config_prints_snapshots_for_the_example() {
    let dir = tempfile::TempDir::new().unwrap();
    let example = example_in(dir.path());
    let out = tollgate(&["check-config", "--config", &example], None);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    for want in [
        "configuration OK",
        "reseller northwind",
        "5 TiB allotted / 500 GiB allotted to customers / 4.5 TiB free",
        "20 TiB allotted / 6 TiB allotted to resellers + Default Customer / 14 TiB free",
        "customer Contoso",
        "500 GiB allotted / 200 GiB allotted to clients / 300 GiB free",
        "1000 allotted / 0 debited / 0 this month / 1000 available",
        "25 allotted / 0 debited / 0 this month / 25 available",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}

/// CONFIG.md Additions: auto-adding without an enroll key on a public
/// address is valid, with a warning; on loopback it is not worth one.
#[test]
fn check_config_warns_about_open_auto_add_on_a_public_address() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("open.toml");
    let body = "[default_customer]\nauto_add_clients = true\n[[reseller]]\nname = \"r\"\n[[customer]]\nname = \"Keyless\"\nreseller = \"r\"\nemail = \"k@x.example\"\nbackup_location = \"./k\"\nauto_add_clients = true\n";
    for (listen, warned) in [("0.0.0.0:7443", true), ("127.0.0.1:7443", false)] {
        std::fs::write(
            &path,
            format!("[server]\nlisten = [\"{listen}\"]\nstate = \"sqlite://s/s.db\"\n{body}"),
        )
        .unwrap();
        let out = tollgate(&["check-config", "--config", path.to_str().unwrap()], None);
        assert_eq!(out.status.code(), Some(0), "a warning is not an error");
        let err = text(&out.stderr);
        for customer in ["Default Customer", "Keyless"] {
            assert_eq!(
                err.contains(&format!(
                    "warning: customer {customer:?} adds unknown clients"
                )),
                warned,
                "{listen}: {err}"
            );
        }
        let json = tollgate(
            &["check-config", "--json", "--config", path.to_str().unwrap()],
            None,
        );
        let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(
            doc["warnings"].as_array().unwrap().len(),
            if warned { 2 } else { 0 }
        );
    }
}

#[test]
fn check_config_json_is_one_document() {
    let dir = tempfile::TempDir::new().unwrap();
    let example = example_in(dir.path());
    let out = tollgate(&["check-config", "--json", "--config", &example], None);
    assert_eq!(out.status.code(), Some(0));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(doc["ok"], true);
    let r = &doc["resellers"][0];
    assert_eq!(r["name"], "northwind");
    assert_eq!(r["space"]["allotted"], 5u64 << 40);
    assert_eq!(r["space"]["allotted_to_children"], 500u64 << 30);
    assert_eq!(r["space"]["free"], (5u64 << 40) - (500u64 << 30));
    assert_eq!(r["customers"][0]["mcal"]["allotted"], 25);
    assert_eq!(doc["server"]["mcal"]["available"], 1000);
}

#[test]
fn three_mistakes_give_three_located_errors() {
    let file = "tests/fixtures/config/three-mistakes.toml";
    let out = tollgate(&["check-config", "--config", file], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let located: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with(&format!("{file}:")))
        .collect();
    let errors: Vec<&&str> = located
        .iter()
        .filter(|l| !l.contains("problems found"))
        .collect();
    assert_eq!(errors.len(), 3, "{stderr}");
    for (line, key) in [
        (5, "server.throttle.rate"),
        (9, "reseller[northwind].space"),
        (11, "reseller[northwind].email_report"),
    ] {
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with(&format!("{file}:{line}:")) && e.contains(key)),
            "no error for {key} on line {line}:\n{stderr}"
        );
    }
    assert!(stderr.contains("3 problems found"), "{stderr}");

    let out = tollgate(&["check-config", "--json", "--config", file], None);
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["errors"].as_array().unwrap().len(), 3);
    assert_eq!(doc["errors"][0]["rule"], "rate");
}

#[test]
fn config_path_comes_from_the_environment() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/quickstart.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("check-config")
        .env("TOLLGATE_CONFIG", &path)
        .env("TOLLGATE_FAKE_NOW", "2026-06-10T10:00:00Z")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("quickstart.toml: configuration OK"));
}

#[test]
fn a_missing_file_is_a_clear_failure() {
    let out = tollgate(
        &["check-config", "--config", "/nonexistent/tollgate.toml"],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cannot read /nonexistent/tollgate.toml"),
        "{stderr}"
    );
}

#[test]
fn hash_secret_reads_stdin_and_prints_a_verifiable_phc_string() {
    let out = tollgate(&["hash-secret"], Some("correct horse\n"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let phc = text(&out.stdout);
    let phc = phc.trim();
    assert!(phc.starts_with("$argon2id$"), "{phc}");
    use argon2::{Argon2, PasswordVerifier};
    let v = Argon2::default();
    assert!(
        v.verify_password(b"correct horse", phc).is_ok(),
        "the trailing newline is not part of the secret"
    );
    assert!(v.verify_password(b"correct horse\n", phc).is_err());

    let again = tollgate(&["hash-secret"], Some("correct horse\n"));
    assert_ne!(
        text(&again.stdout).trim(),
        phc,
        "each hash has its own salt"
    );

    let empty = tollgate(&["hash-secret"], Some(""));
    assert_eq!(empty.status.code(), Some(1));
    assert!(text(&empty.stderr).contains("empty"));
}

#[test]
fn wrong_usage_exits_2() {
    assert_eq!(
        tollgate(&["check-config", "--bogus"], None).status.code(),
        Some(2)
    );
    assert_eq!(tollgate(&["no-such-command"], None).status.code(), Some(2));
}

/// Issue 12 item 12: check-config checks what the file names on disk:
/// TLS files that exist, can be read and match; directories that exist
/// and are writable, or can be made.
#[test]
fn check_config_checks_the_files_and_directories_it_names() {
    let dir = tempfile::TempDir::new().unwrap();
    let d = dir.path();
    std::fs::write(d.join("not-a-dir"), "x").unwrap();
    std::fs::write(d.join("garbage.crt"), "not PEM").unwrap();
    let config = d.join("t.toml");
    let write = |tls: &str, acme: &str| {
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = [\"127.0.0.1:7443\"]\nstate = \"sqlite://{d}/state/s.db\"\n{tls}\n\
                 [default_customer]\nbackup_location = \"{d}/default\"\n\
                 [[reseller]]\nname = \"r\"\n[[customer]]\nname = \"Acme\"\nreseller = \"r\"\nemail = \"a@x.example\"\nbackup_location = \"{acme}\"\n",
                d = d.display()
            ),
        )
        .unwrap();
    };
    // Missing certificate files, and a location under a regular file.
    write(
        &format!(
            "[server.tls]\ncert = \"{d}/tls/server.crt\"\nkey = \"{d}/tls/server.key\"",
            d = d.display()
        ),
        &format!("{}/not-a-dir/acme", d.display()),
    );
    let out = tollgate(
        &["check-config", "--config", config.to_str().unwrap()],
        None,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for want in [
        format!(
            "server.tls.cert: cannot read {}/tls/server.crt: No such file or directory",
            d.display()
        ),
        format!(
            "server.tls.key: cannot read {}/tls/server.key: No such file or directory",
            d.display()
        ),
        format!(
            "customer[Acme].backup_location: {d}/not-a-dir/acme does not exist and cannot be made: {d}/not-a-dir is not a directory",
            d = d.display()
        ),
        "3 problems found on disk".to_string(),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
    let json = tollgate(
        &[
            "check-config",
            "--json",
            "--config",
            config.to_str().unwrap(),
        ],
        None,
    );
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["errors"].as_array().unwrap().len(), 3, "{doc}");
    assert_eq!(doc["errors"][0]["rule"], "disk");

    // A file that exists but is no certificate.
    write(
        &format!(
            "[server.tls]\ncert = \"{d}/garbage.crt\"\nkey = \"{d}/garbage.crt\"",
            d = d.display()
        ),
        &format!("{}/acme", d.display()),
    );
    let out = tollgate(
        &["check-config", "--config", config.to_str().unwrap()],
        None,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("server.tls: ") && err.contains("garbage.crt"),
        "{err}"
    );

    // A real pair passes; the check itself makes nothing.
    let tls = d.join("tls-real");
    std::fs::create_dir_all(&tls).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["backup.example".into()]).unwrap();
    std::fs::write(tls.join("c.pem"), cert.cert.pem()).unwrap();
    std::fs::write(tls.join("k.pem"), cert.signing_key.serialize_pem()).unwrap();
    write(
        &format!(
            "[server.tls]\ncert = \"{t}/c.pem\"\nkey = \"{t}/k.pem\"",
            t = tls.display()
        ),
        &format!("{}/acme", d.display()),
    );
    let out = tollgate(
        &["check-config", "--config", config.to_str().unwrap()],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!d.join("acme").exists() && !d.join("state").exists());
}

/// The config the Debian package installs passes check-config, disk
/// checks included, and listens on one dual-stack socket.
#[test]
fn the_packaged_config_passes_check_config() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = bundled_in("config/tollgate.deb.toml", dir.path());
    let out = tollgate(&["check-config", "--config", &config], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("listen = [\"[::]:7443\"]"));
}
