//! Delivery from the outbox: SMTP through lettre when `server.email.smtp`
//! is set (plain, STARTTLS with `?tls=starttls`, implicit TLS with
//! `smtps://`; AUTH with `user:password@`), else one `.eml` file per message
//! in `spool`, written to a temporary name, fsynced and renamed.

use super::MailError;
use crate::config::Config;
use crate::state::{Queued, State};
use lettre::address::Envelope;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{info, warn};

/// How long one SMTP conversation may take before it counts as failed.
pub const SMTP_TIMEOUT: Duration = Duration::from_secs(20);
/// First retry delay; it doubles per failed attempt up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(2);
/// Longest delay between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30 * 60);

/// Where messages go.
pub enum Transport {
    /// An SMTP relay.
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    /// A spool directory of `.eml` files.
    Spool(PathBuf),
}

impl Transport {
    /// The transport `cfg` asks for; `None` when `server.email` is absent.
    pub fn from_config(cfg: &Config) -> Result<Option<Transport>, MailError> {
        let Some(email) = &cfg.server.email else {
            return Ok(None);
        };
        if let Some(url) = &email.smtp {
            // CONFIG.md spells STARTTLS `?tls=starttls`; lettre says `required`.
            let url = url.0.replace("tls=starttls", "tls=required");
            let t: AsyncSmtpTransport<Tokio1Executor> =
                AsyncSmtpTransport::<Tokio1Executor>::from_url(&url)
                    .map_err(|e| MailError::Transport(redact(&e.to_string())))?
                    .timeout(Some(SMTP_TIMEOUT))
                    .build();
            return Ok(Some(Transport::Smtp(t)));
        }
        match &email.spool {
            Some(dir) => Ok(Some(Transport::Spool(dir.clone()))),
            None => Err(MailError::NotConfigured),
        }
    }

    /// Hands one message over.
    pub async fn send(&self, q: &Queued) -> Result<(), MailError> {
        match self {
            Transport::Smtp(t) => {
                let from = q
                    .mail_from
                    .parse::<lettre::message::Mailbox>()
                    .map(|m| m.email)
                    .map_err(|e| MailError::Address(format!("{}: {e}", q.mail_from)))?;
                let to = q
                    .to()
                    .iter()
                    .map(|a| a.parse::<lettre::message::Mailbox>().map(|m| m.email))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| MailError::Address(e.to_string()))?;
                let env =
                    Envelope::new(Some(from), to).map_err(|e| MailError::Address(e.to_string()))?;
                t.send_raw(&env, &q.message)
                    .await
                    .map(|_| ())
                    .map_err(|e| MailError::Transport(redact(&e.to_string())))
            }
            Transport::Spool(dir) => {
                let (dir, id, bytes) = (dir.clone(), q.id, q.message.clone());
                tokio::task::spawn_blocking(move || spool(&dir, id, &bytes))
                    .await
                    .map_err(|e| MailError::Transport(e.to_string()))?
                    .map_err(|e| MailError::Transport(e.to_string()))
            }
        }
    }
}

/// Never let a URL's password reach a log line.
fn redact(s: &str) -> String {
    crate::config::redact_url(s)
}

/// Writes `<spool>/<id>.eml` atomically: a reader never sees half a file.
fn spool(dir: &Path, id: i64, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    crate::storage::create_private_dirs(dir)?;
    let name = format!("tollgate-{id:010}.eml");
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(&name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// The delay before attempt `attempts + 1`.
pub fn backoff(attempts: i64) -> Duration {
    let shift = attempts.clamp(0, 20) as u32;
    FIRST_BACKOFF.saturating_mul(1 << shift).min(MAX_BACKOFF)
}

/// One pass over the due messages. Returns (delivered, failed).
pub async fn deliver_due(state: &State, t: &Transport) -> Result<(u32, u32), MailError> {
    let (mut sent, mut failed) = (0, 0);
    loop {
        let now = crate::clock::now();
        let batch = state.due_mail(now, 50).await?;
        if batch.is_empty() {
            return Ok((sent, failed));
        }
        for q in batch {
            match t.send(&q).await {
                Ok(()) => {
                    state.mail_sent(q.id, crate::clock::now()).await?;
                    info!(id = q.id, to = ?q.to(), subject = %q.subject, "mail delivered");
                    sent += 1;
                }
                Err(e) => {
                    let wait = backoff(q.attempts);
                    let retry = crate::clock::now()
                        + jiff::SignedDuration::try_from(wait).unwrap_or_default();
                    warn!(id = q.id, attempt = q.attempts + 1, error = %e, retry_in = ?wait, "mail delivery failed; it stays in the outbox");
                    state.mail_failed(q.id, &e.to_string(), retry).await?;
                    failed += 1;
                }
            }
        }
        if failed > 0 {
            // The relay is likely down: leave the rest for the next pass.
            return Ok((sent, failed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_secs(2));
        assert_eq!(backoff(1), Duration::from_secs(4));
        assert_eq!(backoff(5), Duration::from_secs(64));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }

    #[test]
    fn spooled_files_appear_whole() {
        let d = tempfile::TempDir::new().unwrap();
        spool(d.path(), 7, b"Subject: x\r\n\r\nbody\r\n").unwrap();
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["tollgate-0000000007.eml"]);
    }
}
