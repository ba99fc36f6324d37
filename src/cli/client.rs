//! `tollgate client backup|restore|list|delete` (CLI.md): the reference
//! client on the command line. On REJECT or ERROR it prints the code and
//! message and exits non-zero.

use crate::client::{self, ClientError, Options, Session};
use crate::config::units::format_size;
use clap::{Args, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// Connection options shared by every client command.
#[derive(Debug, Args)]
pub struct Common {
    /// The daemon, HOST:PORT.
    #[arg(long)]
    server: String,
    /// This client's id.
    #[arg(long)]
    id: String,
    /// Pin the server certificate: sha256:HEX (the daemon prints it at start).
    #[arg(long)]
    pin: Option<String>,
    /// Verify the server against this CA certificate (PEM) instead.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Customer to register under (first connection only).
    #[arg(long)]
    customer: Option<String>,
    /// The customer's enrollment key (first connection only).
    #[arg(long, env = "TOLLGATE_ENROLL_KEY", hide_env_values = true)]
    enroll_key: Option<String>,
    /// desktop, laptop or server (recorded at registration).
    #[arg(long)]
    kind: Option<String>,
    /// Where the issued secret is kept [default: ~/.config/tollgate/<ID>.secret].
    #[arg(long)]
    secret_file: Option<PathBuf>,
}

/// `tollgate client …`.
#[derive(Debug, Subcommand)]
pub enum ClientAction {
    /// Upload files and folders (recursively), pipelined.
    Backup {
        #[command(flatten)]
        common: Common,
        /// Backup schedule name.
        #[arg(long, default_value = "manual")]
        schedule: String,
        /// Send every file, also those the server already holds unchanged.
        #[arg(long)]
        full: bool,
        /// Files and folders to upload; each is stored under its path as
        /// given, without a leading `/` (as tar does).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Download stored files into DEST, keeping their paths, modes and
    /// modification times.
    Restore {
        #[command(flatten)]
        common: Common,
        /// Only paths starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Where to put them.
        dest: PathBuf,
    },
    /// List stored files.
    List {
        #[command(flatten)]
        common: Common,
        /// Only paths starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Delete stored files.
    Delete {
        #[command(flatten)]
        common: Common,
        /// Paths to delete.
        #[arg(required = true)]
        paths: Vec<String>,
    },
}

fn options(c: Common, schedule: &str, intent: &str) -> Options {
    Options {
        secret_file: c
            .secret_file
            .unwrap_or_else(|| client::default_secret_file(&c.id)),
        server: c.server,
        id: c.id,
        schedule: schedule.into(),
        pin: c.pin,
        ca: c.ca,
        customer: c.customer,
        enroll_key: c.enroll_key,
        kind: c.kind,
        intent: Some(intent.into()),
    }
}

fn fail(e: ClientError) -> ExitCode {
    eprintln!("tollgate: {e}");
    ExitCode::FAILURE
}

/// Runs a client command.
pub fn run(action: ClientAction) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(async {
        match action {
            ClientAction::Backup {
                common,
                schedule,
                full,
                paths,
            } => backup(options(common, &schedule, "backup"), &paths, full).await,
            ClientAction::Restore {
                common,
                prefix,
                dest,
            } => restore(options(common, "manual", "restore"), prefix, &dest).await,
            ClientAction::List {
                common,
                prefix,
                json,
            } => list(options(common, "manual", "restore"), prefix, json).await,
            ClientAction::Delete { common, paths } => {
                delete(options(common, "manual", "restore"), &paths).await
            }
        }
    }))
}

async fn backup(o: Options, paths: &[PathBuf], full: bool) -> ExitCode {
    let all = match client::collect(paths) {
        Ok(f) => f,
        Err(e) => return fail(e.into()),
    };
    let mut s = match Session::connect(&o).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if s.welcome.secret.is_some() {
        eprintln!(
            "registered as {} under customer {}; secret saved to {}",
            o.id,
            s.welcome.customer,
            o.secret_file.display()
        );
    }
    // Incremental: a file whose size and modification time equal what the
    // server holds is not sent again, unless --full.
    let files: Vec<client::Upload> = if full {
        all
    } else {
        let held = match s.list(None).await {
            Ok(e) => e,
            Err(e) => return fail(e),
        };
        let held: std::collections::HashMap<String, (u64, Option<String>)> = held
            .into_iter()
            .map(|e| (e.path, (e.size, e.mtime)))
            .collect();
        let before = all.len();
        let changed: Vec<client::Upload> = all
            .into_iter()
            .filter(|f| {
                let size = std::fs::metadata(&f.local).map(|m| m.len()).ok();
                match held.get(&f.remote) {
                    Some((n, Some(t))) => Some(*n) != size || Some(t) != f.mtime.as_ref(),
                    _ => true,
                }
            })
            .collect();
        if changed.len() < before {
            eprintln!(
                "{} file(s) unchanged since the last backup, not sent (--full sends them)",
                before - changed.len()
            );
        }
        changed
    };
    let total: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(&f.local).ok())
        .map(|m| m.len())
        .sum();
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let progress = |n: u64| {
        if let Some(b) = &bar {
            b.inc(n);
        }
    };
    let results = match s.upload(&files, &progress).await {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let mut failed = 0;
    for (f, r) in files.iter().zip(&results) {
        if let Err(e) = r {
            failed += 1;
            eprintln!("{}: {e}", f.remote);
        }
    }
    let stored = results.iter().filter(|r| r.is_ok()).count();
    let _ = s.bye().await;
    println!(
        "stored {stored} of {} file(s), {}",
        files.len(),
        format_size(total)
    );
    if failed > 0 || stored < files.len() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

async fn restore(o: Options, prefix: Option<String>, dest: &std::path::Path) -> ExitCode {
    let mut s = match Session::connect(&o).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let entries = match s.list(prefix.as_deref()).await {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let mut bytes = 0;
    for e in &entries {
        // Never write outside DEST, whatever the server says.
        if crate::storage::validate_path(&e.path).is_err() {
            eprintln!(
                "tollgate: skipping unsafe path {:?} from the server",
                e.path
            );
            return ExitCode::FAILURE;
        }
        match s.get(&e.path, &dest.join(&e.path)).await {
            Ok(n) => bytes += n,
            Err(err) => return fail(err),
        }
    }
    let _ = s.bye().await;
    println!("restored {} file(s), {}", entries.len(), format_size(bytes));
    ExitCode::SUCCESS
}

async fn list(o: Options, prefix: Option<String>, json: bool) -> ExitCode {
    let mut s = match Session::connect(&o).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let entries = match s.list(prefix.as_deref()).await {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let _ = s.bye().await;
    let printed = (|| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if json {
            writeln!(out, "{}", serde_json::json!({ "entries": entries }))?;
        } else {
            for e in entries {
                writeln!(
                    out,
                    "{:>10}  {}  {}",
                    format_size(e.size),
                    e.modified,
                    e.path
                )?;
            }
        }
        out.flush()
    })();
    match printed {
        // `| head` closed the pipe: not an error.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => fail(e.into()),
        _ => ExitCode::SUCCESS,
    }
}

async fn delete(o: Options, paths: &[String]) -> ExitCode {
    let mut s = match Session::connect(&o).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    for p in paths {
        match s.delete(p).await {
            Ok(freed) => println!("deleted {p} ({} freed)", format_size(freed)),
            Err(e) => return fail(e),
        }
    }
    let _ = s.bye().await;
    ExitCode::SUCCESS
}
