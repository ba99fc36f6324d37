//! Reservations in memory (issue 13 item 2). A reservation holds space for
//! an upload in flight; it never outlives the process (reconcile drops
//! them all at start), so it needs no SQLite round trip and no fsync.
//!
//! Exactness: space is checked against committed usage plus the ledger.
//! A commit adds to committed usage first, then bumps the usage generation,
//! then releases its reservation. [`State::reserve_space`](super::State::reserve_space)
//! notes the generation, reads committed usage (outside any lock, beside
//! other reservations' reads), takes the reserving lock (reservations are
//! decided one at a time), reads the ledger's sums, and only then checks
//! the generation: if it did not move, any commit its read missed has not
//! released its hold yet, so the ledger counted it; if it moved, committed
//! usage is read again, after the ledger. Either way a commit in between
//! is counted twice (refusing early, briefly) but never not at all. Moves
//! and removals take the reserving lock for as long as their transaction
//! runs and bump the generation before letting go.
//!
//! The PostgreSQL backend (next issue) keeps the same interface with rows
//! per node, an expiry and a heartbeat instead of this map.

use crate::policy::space::{LevelUsage, Usage};
use std::collections::HashMap;
use std::sync::Mutex;

/// One upload's hold.
#[derive(Clone, Debug)]
struct Hold {
    client: String,
    customer: String,
    size: u64,
}

#[derive(Debug, Default)]
struct Inner {
    next: i64,
    holds: HashMap<i64, Hold>,
    client: HashMap<String, u64>,
    customer: HashMap<String, u64>,
    total: u64,
}

/// Bytes held, at each level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// By the client.
    pub client: u64,
    /// By the customer's clients.
    pub customer: u64,
    /// By the customers of the customer's reseller.
    pub reseller: u64,
    /// By everyone.
    pub server: u64,
}

impl Held {
    /// The usage at every level: these holds beside the committed bytes
    /// (`reseller` is `None` for a customer without a reseller).
    pub fn with_committed(
        self,
        client: i64,
        customer: i64,
        reseller: Option<i64>,
        server: i64,
    ) -> LevelUsage {
        let u = |used: i64, reserved: u64| Usage {
            used: used.max(0) as u64,
            reserved,
        };
        LevelUsage {
            client: u(client, self.client),
            customer: u(customer, self.customer),
            reseller: reseller.map_or(Usage::default(), |r| u(r, self.reseller)),
            server: u(server, self.server),
        }
    }
}

/// The process's reservations.
#[derive(Debug)]
pub struct Ledger {
    inner: Mutex<Inner>,
    reserving: tokio::sync::Mutex<()>,
    /// Bumped after every committed change of usage or of a client's
    /// customer, before its reservation is released: a reservation that
    /// read committed usage outside the reserving lock reads it again when
    /// this moved meanwhile.
    usage_gen: std::sync::atomic::AtomicU64,
}

fn key(s: &str) -> String {
    s.to_lowercase()
}

fn gauges(g: &Inner) {
    metrics::gauge!(crate::metrics::UPLOADS_IN_FLIGHT).set(g.holds.len() as f64);
    metrics::gauge!(crate::metrics::SPACE_RESERVED).set(g.total as f64);
}

fn sub(map: &mut HashMap<String, u64>, k: &str, n: u64) {
    if let Some(v) = map.get_mut(k) {
        *v = v.saturating_sub(n);
        if *v == 0 {
            map.remove(k);
        }
    }
}

impl Default for Ledger {
    fn default() -> Ledger {
        // Ids start past any a previous process recorded in a pending
        // commit, so one can never release another's hold.
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as i64);
        Ledger {
            inner: Mutex::new(Inner {
                next: base,
                ..Inner::default()
            }),
            reserving: tokio::sync::Mutex::new(()),
            usage_gen: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lock under which a reservation is decided, and moves and
    /// removals run.
    pub async fn reserving(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.reserving.lock().await
    }

    /// Committed usage changed (called after the commit, before releasing
    /// the reservation it consumed, and before letting go of the reserving
    /// lock).
    pub fn usage_changed(&self) {
        self.usage_gen
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// The count of committed usage changes so far.
    pub fn usage_gen(&self) -> u64 {
        self.usage_gen.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// What is held by `client`, `customer`, the `reseller_customers` and
    /// everyone (names compare without regard to case).
    pub fn held(&self, client: &str, customer: &str, reseller_customers: &[&str]) -> Held {
        let g = self.lock();
        let get = |m: &HashMap<String, u64>, k: &str| m.get(&key(k)).copied().unwrap_or(0);
        Held {
            client: get(&g.client, client),
            customer: get(&g.customer, customer),
            reseller: reseller_customers
                .iter()
                .map(|c| get(&g.customer, c))
                .fold(0, u64::saturating_add),
            server: g.total,
        }
    }

    /// Holds `size` bytes for `client` of `customer`; returns the id.
    pub fn insert(&self, client: &str, customer: &str, size: u64) -> i64 {
        let mut g = self.lock();
        g.next += 1;
        let id = g.next;
        let (c, cu) = (key(client), key(customer));
        *g.client.entry(c.clone()).or_default() += size;
        *g.customer.entry(cu.clone()).or_default() += size;
        g.total = g.total.saturating_add(size);
        g.holds.insert(
            id,
            Hold {
                client: c,
                customer: cu,
                size,
            },
        );
        gauges(&g);
        id
    }

    /// Lets go of a hold; false when it was not held (already released).
    pub fn release(&self, id: i64) -> bool {
        let mut g = self.lock();
        let Some(h) = g.holds.remove(&id) else {
            return false;
        };
        sub(&mut g.client, &h.client, h.size);
        sub(&mut g.customer, &h.customer, h.size);
        g.total = g.total.saturating_sub(h.size);
        gauges(&g);
        true
    }

    /// Lets go of every hold of `client` (it was removed).
    pub fn release_client(&self, client: &str) {
        let ids: Vec<i64> = {
            let g = self.lock();
            let k = key(client);
            g.holds
                .iter()
                .filter(|(_, h)| h.client == k)
                .map(|(id, _)| *id)
                .collect()
        };
        for id in ids {
            self.release(id);
        }
    }

    /// Uploads in flight for `client`.
    pub fn in_flight(&self, client: &str) -> usize {
        let k = key(client);
        self.lock().holds.values().filter(|h| h.client == k).count()
    }

    /// Bytes held per client and per customer, keyed by lowercased name.
    pub fn by_client_and_customer(&self) -> (HashMap<String, u64>, HashMap<String, u64>) {
        let g = self.lock();
        (g.client.clone(), g.customer.clone())
    }

    /// Bytes held by `client`.
    pub fn client(&self, client: &str) -> u64 {
        self.lock().client.get(&key(client)).copied().unwrap_or(0)
    }

    /// Bytes held by the clients of `customer`.
    pub fn customer(&self, customer: &str) -> u64 {
        self.lock()
            .customer
            .get(&key(customer))
            .copied()
            .unwrap_or(0)
    }

    /// Bytes held by everyone.
    pub fn total(&self) -> u64 {
        self.lock().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_add_up_per_level_and_release_once() {
        let l = Ledger::default();
        let a = l.insert("PC-1", "Acme", 100);
        let b = l.insert("pc-1", "ACME", 50);
        let c = l.insert("PC-2", "Beta", 7);
        assert_eq!(
            l.held("Pc-1", "acme", &["Acme", "beta"]),
            Held {
                client: 150,
                customer: 150,
                reseller: 157,
                server: 157
            }
        );
        assert_eq!(l.in_flight("PC-1"), 2);
        assert!(l.release(a));
        assert!(!l.release(a), "a hold is released once");
        assert_eq!(l.client("PC-1"), 50);
        l.release_client("PC-1");
        assert_eq!((l.client("PC-1"), l.customer("Acme"), l.total()), (0, 0, 7));
        assert!(!l.release(b));
        assert!(l.release(c));
        assert_eq!(l.total(), 0);
    }
}
