//! Refused HELLOs (and PUTs refused with `quota_exceeded`), stored bounded (CONFIG.md Additions, "State
//! retention"): one row per (source, code, customer, minute) with a count;
//! the client id only when it is a valid id, else `(invalid)`; nothing a
//! peer sent beyond 256 bytes.
//!
//! The daemon notes refusals in memory ([`State::note_refusal`], no I/O)
//! and a background task writes them once a second in one transaction
//! ([`State::flush_refusals`]): a flood of refused HELLOs costs one small
//! write a second, never a write per HELLO in the lane every admission
//! waits for. A crash loses at most the last second of counts.

use super::{State, StateError, secs};
use crate::config::is_valid_identifier;
use crate::policy::admission::RejectCode;
use jiff::Timestamp;
use std::collections::HashMap;
use std::net::IpAddr;

/// Bytes of a peer-supplied value stored at most.
pub const MAX_STORED: usize = 256;
/// Distinct refusal rows held in memory between flushes; beyond this a
/// refusal is counted in the log and metrics only.
pub const MAX_PENDING: usize = 10_000;
/// Rows written per transaction when refusals are flushed.
pub const FLUSH_BATCH: usize = 500;
/// What `client` holds for an id that is not a valid client id.
pub const INVALID_ID: &str = "(invalid)";

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    minute: i64,
    source: String,
    code: &'static str,
    customer: String,
}

/// Refusals noted since the last flush.
#[derive(Debug, Default)]
pub(super) struct Pending {
    rows: HashMap<Key, (String, i64)>,
}

/// `s` cut to at most `max` bytes, on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl State {
    /// Notes a refusal for the next flush. `client` is HELLO's id as sent
    /// (stored only if valid); `customer` the configured customer it
    /// concerns, or the name HELLO gave. Returns false when the buffer was
    /// full and the refusal could not be kept.
    pub fn note_refusal(
        &self,
        at: Timestamp,
        source: Option<IpAddr>,
        client: Option<&str>,
        customer: Option<&str>,
        code: &'static str,
    ) -> bool {
        let key = Key {
            minute: secs(at).div_euclid(60) * 60,
            source: source
                .map(|ip| crate::config::source_of(ip).to_string())
                .unwrap_or_default(),
            code,
            customer: truncate(customer.unwrap_or_default(), MAX_STORED).to_string(),
        };
        let client = match client {
            Some(id) if is_valid_identifier(id) => id.to_string(),
            Some(_) => INVALID_ID.to_string(),
            None => String::new(),
        };
        let mut p = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        if p.rows.len() >= MAX_PENDING && !p.rows.contains_key(&key) {
            return false;
        }
        let row = p.rows.entry(key).or_insert_with(|| (String::new(), 0));
        if !client.is_empty() || row.0.is_empty() {
            row.0 = client;
        }
        row.1 += 1;
        true
    }

    /// Writes the noted refusals, adding to existing rows; returns how many
    /// refusals were written. On failure they are put back for the next try.
    pub async fn flush_refusals(&self) -> Result<u64, StateError> {
        let rows =
            std::mem::take(&mut self.refusals.lock().unwrap_or_else(|p| p.into_inner()).rows);
        if rows.is_empty() {
            return Ok(0);
        }
        let written: i64 = rows.values().map(|(_, n)| n).sum();
        let rows: Vec<(Key, (String, i64))> = rows.into_iter().collect();
        // In batches, each its own short transaction: admissions wait for
        // the same write lane.
        for (i, batch) in rows.chunks(FLUSH_BATCH).enumerate() {
            if let Err(e) = self.write_refusals(batch).await {
                self.put_back(rows.into_iter().skip(i * FLUSH_BATCH));
                return Err(e);
            }
            tokio::task::yield_now().await;
        }
        Ok(written as u64)
    }

    async fn write_refusals(&self, batch: &[(Key, (String, i64))]) -> Result<(), StateError> {
        super::in_tx!(self, sql, tx => {
            for (k, (client, n)) in batch {
                sqlx::query(
                    "INSERT INTO refusals (at, source, code, customer, client, count) VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (at, source, code, customer) DO UPDATE SET count = refusals.count + excluded.count,
                       client = CASE WHEN excluded.client = '' THEN refusals.client ELSE excluded.client END",
                )
                .bind(k.minute)
                .bind(&k.source)
                .bind(k.code)
                .bind(&k.customer)
                .bind(client)
                .bind(n)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Puts refusals that could not be written back for the next flush.
    fn put_back(&self, rows: impl Iterator<Item = (Key, (String, i64))>) {
        let mut p = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        for (k, (client, n)) in rows {
            if p.rows.len() >= MAX_PENDING && !p.rows.contains_key(&k) {
                continue;
            }
            let row = p.rows.entry(k).or_insert_with(|| (String::new(), 0));
            if row.0.is_empty() {
                row.0 = client;
            }
            row.1 += n;
        }
    }

    /// Records one refusal at once (note, then flush): for the admin
    /// commands and tests; the daemon notes and flushes once a second.
    pub async fn record_refusal(
        &self,
        at: Timestamp,
        client: &str,
        customer: Option<&str>,
        code: RejectCode,
        source: Option<IpAddr>,
    ) -> Result<(), StateError> {
        self.note_refusal(
            at,
            source,
            Some(client).filter(|c| !c.is_empty()),
            customer,
            code.as_str(),
        );
        self.flush_refusals().await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdef", 3), "abc");
        assert_eq!(truncate("aé", 2), "a", "é is two bytes");
        assert_eq!(truncate(&"ü".repeat(300), MAX_STORED).len(), MAX_STORED);
    }
}
