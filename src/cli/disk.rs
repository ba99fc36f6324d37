//! What `check-config` checks on disk once the file itself is valid (issue
//! 12 item 12): the TLS files it names exist, can be read and make a
//! working pair; the directories the daemon writes (state, backup
//! locations, mail spool) exist and are writable by this user, or can be
//! made. The daemon's own load does not do this: a reload must not be
//! refused because a backup disk is briefly away.

use crate::config::{Config, StateUrl};
use std::path::{Path, PathBuf};

/// One problem: the key, and what is wrong.
pub type Problem = (String, String);

/// Every problem found on disk for `cfg`, as the current user.
pub fn problems(cfg: &Config) -> Vec<Problem> {
    let mut out = Vec::new();
    let tls = &cfg.server.tls;
    let mut readable = true;
    let files = [
        ("server.tls.cert", tls.cert.as_ref()),
        ("server.tls.key", tls.key.as_ref()),
        ("server.tls.client_ca", tls.client_ca.as_ref()),
    ];
    for (k, path) in files {
        if let Some(p) = path
            && let Err(e) = std::fs::File::open(p)
        {
            out.push((k.into(), format!("cannot read {}: {e}", p.display())));
            readable = false;
        }
    }
    // Without a pair, the self-signed one is made in state_dir (checked
    // below); building it here would make it.
    if readable
        && tls.cert.is_some()
        && tls.key.is_some()
        && let Err(e) = crate::tls::server_tls(cfg)
    {
        out.push(("server.tls".into(), e.to_string()));
    }
    out.extend(dir_problem("server.state_dir", &cfg.server.state_dir));
    if let StateUrl::Sqlite(db) = &cfg.server.state
        && let Some(parent) = db.parent().filter(|p| *p != cfg.server.state_dir)
    {
        out.extend(dir_problem("server.state", parent));
    }
    for (i, c) in cfg.customers.iter().enumerate() {
        let key = if i == crate::config::CustomerId::DEFAULT.0 as usize {
            "default_customer.backup_location".to_string()
        } else {
            format!("customer[{}].backup_location", c.name)
        };
        out.extend(dir_problem(&key, &c.backup_location));
    }
    if let Some(spool) = cfg.server.email.as_ref().and_then(|e| e.spool.as_ref()) {
        out.extend(dir_problem("server.email.spool", spool));
    }
    out
}

/// None when `dir` is a directory this user may write, or can be made.
fn dir_problem(key: &str, dir: &Path) -> Option<Problem> {
    let problem = |m: String| Some((key.to_string(), m));
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => problem(format!("{} is not a directory", dir.display())),
        Ok(_) => writable(dir).err().and_then(|e| {
            problem(format!(
                "{} is not writable by {}: {e}",
                dir.display(),
                whoami()
            ))
        }),
        Err(_) => {
            // It will be made: the nearest existing ancestor must be a
            // directory this user may write.
            let ancestor: PathBuf = dir
                .ancestors()
                .skip(1)
                .find(|a| a.as_os_str().is_empty() || std::fs::symlink_metadata(a).is_ok())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("/"));
            let ancestor = if ancestor.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                ancestor
            };
            match std::fs::metadata(&ancestor) {
                Ok(m) if !m.is_dir() => problem(format!(
                    "{} does not exist and cannot be made: {} is not a directory",
                    dir.display(),
                    ancestor.display()
                )),
                Ok(_) => writable(&ancestor).err().and_then(|e| {
                    problem(format!(
                        "{} does not exist and cannot be made: {} is not writable by {}: {e}",
                        dir.display(),
                        ancestor.display(),
                        whoami()
                    ))
                }),
                Err(e) => problem(format!(
                    "{} does not exist and cannot be made: {}: {e}",
                    dir.display(),
                    ancestor.display()
                )),
            }
        }
    }
}

fn writable(dir: &Path) -> rustix::io::Result<()> {
    use rustix::fs::{Access, AtFlags, CWD, accessat};
    accessat(
        CWD,
        dir,
        Access::WRITE_OK | Access::EXEC_OK,
        AtFlags::EACCESS,
    )
}

/// "user 998" (the uid; names need NSS, which this does not link).
fn whoami() -> String {
    format!("user {}", rustix::process::geteuid().as_raw())
}
