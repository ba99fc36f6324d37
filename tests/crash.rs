//! Crash safety of a commit: a child process runs a real commit (temp file,
//! fsync, pending record, rename, directory fsync, index update) and is
//! killed with SIGKILL right after one of its steps. After restart,
//! reconcile and the temp sweep, the index equals what is on disk, file for
//! file and byte for byte, usage equals the committed bytes, and the file
//! is the old version or the new one, never a mix.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tempfile::TempDir;
use tollgate::config::{Config, CustomerId, Kind};
use tollgate::state::State;
use tollgate::storage::{self, Step, TempFile};

const OLD: &[u8] = b"old version of the file\n";

fn new_content() -> Vec<u8> {
    (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect()
}

fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("tollgate.toml");
    std::fs::write(
        &path,
        "[server]\ntimezone = \"UTC\"\nstate = \"sqlite://state/state.db\"\n[default_customer]\nbackup_location = \"./backup\"\nauto_add_clients = true\n",
    )
    .unwrap();
    path
}

fn now() -> jiff::Timestamp {
    "2026-11-25T12:00:00Z".parse().unwrap()
}

/// Writes `data` as `path` of client PC through the real commit, calling
/// `hook` after each step.
async fn store(
    st: &State,
    cfg: &Config,
    path: &str,
    data: &[u8],
    hook: &mut (dyn FnMut(Step) + Send),
) {
    let res = st
        .reserve_space(cfg, "PC", data.len() as u64, now())
        .await
        .unwrap()
        .unwrap();
    let mut tmp = TempFile::create(&storage::temp_dir(cfg, CustomerId::DEFAULT)).unwrap();
    tmp.write(data).unwrap();
    hook(Step::Written);
    let synced = tmp.sync().unwrap();
    hook(Step::Synced);
    storage::commit(
        st,
        cfg,
        CustomerId::DEFAULT,
        "PC",
        path,
        synced,
        Some(res),
        storage::FileMeta {
            mode: Some(0o640),
            mtime: Some("2026-01-02T03:04:05Z".into()),
        },
        now(),
        hook,
    )
    .await
    .unwrap();
}

/// The child: commits the new content and stops dead after the step named
/// in TOLLGATE_CRASH_STEP, telling the parent it got there.
#[tokio::test]
#[ignore = "helper process for the crash tests; run by them with --include-ignored"]
async fn crash_child() {
    let Ok(cfg_path) = std::env::var("TOLLGATE_CRASH_CONFIG") else {
        return;
    };
    let step = std::env::var("TOLLGATE_CRASH_STEP").unwrap();
    let path = std::env::var("TOLLGATE_CRASH_PATH").unwrap();
    let cfg = Config::load(Path::new(&cfg_path)).unwrap();
    let st = State::open(&cfg).await.unwrap();
    let mut hook = move |s: Step| {
        if format!("{s:?}") == step {
            println!("REACHED {s:?}");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(60));
            }
        }
    };
    store(&st, &cfg, &path, &new_content(), &mut hook).await;
    unreachable!("the hook never returns at the chosen step");
}

/// Files under the client's directory, with their SHA-256.
fn on_disk(root: &Path) -> BTreeMap<String, (u64, String)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u64, String)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(
                    rel,
                    (
                        std::fs::metadata(&p).unwrap().len(),
                        storage::sha256_file(&p).unwrap(),
                    ),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

async fn crash_at(step: Step, replace: bool) {
    let dir = TempDir::new().unwrap();
    let cfg_path = write_config(dir.path());
    let cfg = Config::load(&cfg_path).unwrap();
    let path = if replace {
        "docs/report.bin"
    } else {
        "docs/new/fresh.bin"
    };
    {
        let st = State::open(&cfg).await.unwrap();
        st.register_client(&cfg, "PC", CustomerId::DEFAULT, Kind::Desktop, None, now())
            .await
            .unwrap()
            .unwrap();
        store(&st, &cfg, "docs/report.bin", OLD, &mut |_| {}).await;
        store(&st, &cfg, "other.txt", b"bystander", &mut |_| {}).await;
        st.close().await;
    }

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child",
            "--include-ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("TOLLGATE_CRASH_CONFIG", &cfg_path)
        .env("TOLLGATE_CRASH_STEP", format!("{step:?}"))
        .env("TOLLGATE_CRASH_PATH", path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The harness may print "test crash_child ... " on the same line.
    let reached = lines.find_map(|l| {
        l.ok()
            .and_then(|l| l.find("REACHED").map(|i| l[i..].to_string()))
    });
    assert_eq!(
        reached,
        Some(format!("REACHED {step:?}")),
        "the child never got to {step:?}"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // Restart: reconcile, sweep, then compare index and disk.
    let st = State::open(&cfg).await.unwrap();
    st.reconcile().await.unwrap();
    storage::sweep_temp(&cfg).unwrap();
    let client_dir = storage::client_dir(&cfg, CustomerId::DEFAULT, "PC");
    let disk = on_disk(&client_dir);
    let index: BTreeMap<String, (u64, String)> = st
        .list_files("PC", "", None, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|f| (f.path, (f.size as u64, f.sha256)))
        .collect();
    assert_eq!(
        index, disk,
        "index and disk disagree after a crash at {step:?} (replace={replace})"
    );

    let content = std::fs::read(client_dir.join(path)).ok();
    let committed = matches!(step, Step::Renamed | Step::Indexed);
    let want = if committed {
        Some(new_content())
    } else if replace {
        Some(OLD.to_vec())
    } else {
        None
    };
    assert!(
        content == want,
        "{path} is neither the old nor the new version after {step:?}"
    );

    let total: u64 = disk.values().map(|(s, _)| s).sum();
    let rows = st.clients(&cfg, now()).await.unwrap();
    assert_eq!(
        rows[0].used as u64, total,
        "usage differs from the committed bytes"
    );
    assert_eq!(rows[0].reserved, 0, "a reservation survived the restart");
    let leftovers = std::fs::read_dir(storage::temp_dir(&cfg, CustomerId::DEFAULT))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0, "a temporary file survived");
    st.close().await;
}

#[tokio::test]
async fn crash_after_write() {
    crash_at(Step::Written, true).await;
    crash_at(Step::Written, false).await;
}

#[tokio::test]
async fn crash_after_fsync() {
    crash_at(Step::Synced, true).await;
    crash_at(Step::Synced, false).await;
}

#[tokio::test]
async fn crash_after_rename() {
    crash_at(Step::Renamed, true).await;
    crash_at(Step::Renamed, false).await;
}

#[tokio::test]
async fn crash_after_index_update() {
    crash_at(Step::Indexed, true).await;
    crash_at(Step::Indexed, false).await;
}

/// A commit interrupted after its rename, whose file was then changed by
/// hand: reconcile hashes the file outside its transaction and indexes what
/// is there, and usage follows the real size. Also when the size is the
/// same: the digest decides, not the size.
#[tokio::test]
async fn a_file_changed_after_the_rename_is_indexed_as_found() {
    changed_after_rename(b"changed by hand".to_vec()).await;
    let same_size = vec![7u8; new_content().len()];
    changed_after_rename(same_size).await;
}

async fn changed_after_rename(replacement: Vec<u8>) {
    let dir = TempDir::new().unwrap();
    let cfg = Config::load(&write_config(dir.path())).unwrap();
    let st = State::open(&cfg).await.unwrap();
    st.register_client(&cfg, "PC", CustomerId::DEFAULT, Kind::Desktop, None, now())
        .await
        .unwrap()
        .unwrap();
    let data = new_content();
    let res = st
        .reserve_space(&cfg, "PC", data.len() as u64, now())
        .await
        .unwrap()
        .unwrap();
    let mut tmp = TempFile::create(&storage::temp_dir(&cfg, CustomerId::DEFAULT)).unwrap();
    tmp.write(&data).unwrap();
    let synced = tmp.sync().unwrap();
    let client_dir = storage::client_dir(&cfg, CustomerId::DEFAULT, "PC");
    let fin = client_dir.join("big.bin");
    std::fs::create_dir_all(&client_dir).unwrap();
    st.begin_commit(&tollgate::state::PendingCommit {
        client: "PC".into(),
        path: "big.bin".into(),
        temp_path: synced.path.clone(),
        final_path: fin.clone(),
        size: synced.size,
        sha256: synced.sha256.clone(),
        modified: now(),
        reservation: Some(res),
        mode: None,
        mtime: None,
    })
    .await
    .unwrap();
    std::fs::rename(&synced.path, &fin).unwrap();
    std::fs::write(&fin, &replacement).unwrap();
    st.close().await;

    let st = State::open(&cfg).await.unwrap();
    let r = st.reconcile().await.unwrap();
    assert_eq!((r.rolled_forward, r.rolled_back), (1, 0));
    let files = st.list_files("PC", "", None, 10).await.unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].size as usize, replacement.len());
    assert_eq!(files[0].sha256, on_disk(&client_dir)["big.bin"].1);
    let rows = st.clients(&cfg, now()).await.unwrap();
    assert_eq!(
        (rows[0].used as usize, rows[0].reserved),
        (replacement.len(), 0)
    );
    st.close().await;
}
