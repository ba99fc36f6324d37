//! Every file under tests/fixtures/config/: each invalid one produces the
//! errors its `#!` markers name (rule, key path, and the marker's own line),
//! each valid one loads, and together the invalid ones cover every rule.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tollgate::config::{Config, LoadError, Rule};

fn toml_files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

/// `#! rule key` markers, optionally `#! rule key | words the message
/// must contain`: (rule name, key path, 1-based line, words).
fn markers(src: &str) -> Vec<(String, String, usize, Option<String>)> {
    src.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let (_, m) = line.split_once("#! ")?;
            let (m, words) = match m.split_once(" | ") {
                Some((m, w)) => (m, Some(w.trim().to_string())),
                None => (m, None),
            };
            let (rule, key) = m.trim().split_once(' ')?;
            Some((rule.to_string(), key.trim().to_string(), i + 1, words))
        })
        .collect()
}

#[test]
fn invalid_fixtures_report_each_marked_error() {
    let files = toml_files("tests/fixtures/config/invalid");
    let mut covered = BTreeSet::new();
    let mut visited = 0;
    for path in &files {
        let src = std::fs::read_to_string(path).unwrap();
        let want = markers(&src);
        assert!(!want.is_empty(), "{} has no #! marker", path.display());
        let errors = match Config::load(path) {
            Ok(_) => panic!("{} loaded, but it is invalid", path.display()),
            Err(LoadError::Invalid(e)) => e,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        assert_eq!(errors.len(), want.len(), "{}: {errors:#?}", path.display());
        for (rule, key, line, words) in &want {
            let hit = errors
                .iter()
                .find(|e| e.rule.name() == rule && &e.key == key && e.line == *line);
            let Some(e) = hit else {
                panic!(
                    "{}: no {rule} error for {key} on line {line}; got {errors:#?}",
                    path.display()
                );
            };
            let shown = e.to_string();
            if let Some(w) = words {
                assert!(
                    shown.contains(w.as_str()),
                    "{}: the message lacks {w:?}: {shown}",
                    path.display()
                );
            }
            assert!(
                shown.contains(&format!(":{line}:")) && shown.contains(key.as_str()),
                "{}: message lacks line or key: {shown}",
                path.display()
            );
            covered.insert(e.rule);
        }
        visited += 1;
    }
    assert_eq!(visited, files.len());
    assert!(
        visited >= Rule::ALL.len(),
        "only {visited} fixtures were read"
    );
    let missing: Vec<_> = Rule::ALL.iter().filter(|r| !covered.contains(r)).collect();
    assert!(missing.is_empty(), "rules without a fixture: {missing:?}");
}

#[test]
fn valid_fixtures_and_bundled_configs_load() {
    let mut files = toml_files("tests/fixtures/config/valid");
    files.extend(toml_files("config"));
    assert!(files.len() >= 4, "{files:?}");
    for path in &files {
        if let Err(e) = Config::load(path) {
            match e {
                LoadError::Invalid(errs) => panic!(
                    "{}:\n{}",
                    path.display(),
                    errs.iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
                other => panic!("{other}"),
            }
        }
    }
}

#[test]
fn relative_paths_resolve_against_the_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = Config::load(&root.join("config/quickstart.toml")).unwrap();
    let tollgate::config::StateUrl::Sqlite(db) = &cfg.server.state else {
        panic!("quickstart uses SQLite");
    };
    assert_eq!(db, &root.join("var/state/state.db"));
    assert_eq!(cfg.server.state_dir, root.join("var/state"));
    assert_eq!(
        cfg.customers[0].backup_location,
        root.join("var/backup/default")
    );
    let night = Config::load(&root.join("tests/fixtures/config/valid/night-window.toml")).unwrap();
    assert_eq!(
        night.customers[1].backup_location,
        root.join("tests/fixtures/config/valid/relative/to/this/file")
    );
}

#[test]
fn debug_output_never_shows_hashes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = Config::load(&root.join("config/tollgate.example.toml")).unwrap();
    let shown = format!("{cfg:?}");
    assert!(
        !shown.contains("$argon2"),
        "a hash leaked into Debug output"
    );
    assert!(shown.contains("PhcHash(<redacted>)"));
}

/// A text validated on its own (`Config::from_str`: the applied copy, the
/// fuzz target) has no include segments: every fixture still gives the
/// same verdict, and never a panic (the fuzzer found one, issue 16).
#[test]
fn each_fixture_validates_on_its_own_text_too() {
    for dir in [
        "tests/fixtures/config/invalid",
        "tests/fixtures/config/valid",
    ] {
        for path in toml_files(dir) {
            let text = std::fs::read_to_string(&path).unwrap();
            let loaded = Config::load(&path).is_ok();
            let alone = Config::from_str(&text, &path).is_ok();
            // Include errors need the directories the main file names.
            if !text.contains("[[include]]") {
                assert_eq!(alone, loaded, "{}", path.display());
            }
        }
    }
    let crash = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fuzz/seeds/config/over-allocated-alone.toml"
    ))
    .unwrap();
    let text = String::from_utf8(crash).unwrap();
    let errs = Config::from_str(&text, std::path::Path::new("fuzz.toml")).unwrap_err();
    assert!(
        errs.iter().any(|e| e.rule == Rule::SpaceOverAllocated),
        "{errs:#?}"
    );
}
