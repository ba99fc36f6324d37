//! Shares of an aggregate cap among the nodes of a cluster (issue 14
//! item 3), the Doorman way (youtube/doorman, `doc/algorithms.md`, "fair
//! share"): each node says how much it wants; the capacity is split
//! max-min fairly (nobody gets more than it wants, and what one does not
//! want is split among the others), and what nobody wants is split evenly,
//! so a node whose demand grows has room before its next refresh.
//!
//! A node is granted its share only out of capacity no other node's
//! unexpired grant holds ([`grant`]), so the grants in force never sum
//! past the cap, even while shares move.

/// Max-min fair shares of `capacity` for `wants` (same order), spare
/// capacity split evenly. The shares sum to `capacity` exactly when
/// anyone wants anything, and never more.
pub fn fair_shares(capacity: u64, wants: &[u64]) -> Vec<u64> {
    let n = wants.len();
    if n == 0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (wants[i], i));
    let mut share = vec![0u64; n];
    let mut left = capacity;
    for (k, &i) in order.iter().enumerate() {
        let even = left / (n - k) as u64;
        share[i] = wants[i].min(even);
        left -= share[i];
    }
    // What nobody wants, split evenly; the remainder to the first nodes.
    let (each, rest) = (left / n as u64, left % n as u64);
    for (k, s) in share.iter_mut().enumerate() {
        *s += each + u64::from((k as u64) < rest);
    }
    share
}

/// What a node may be granted now: its fair share, but no more than the
/// capacity other nodes' unexpired grants leave free.
pub fn grant(capacity: u64, fair: u64, others_granted: u64) -> u64 {
    fair.min(capacity.saturating_sub(others_granted))
}

/// A node's share when it cannot reach the database: the cap divided by
/// the configured node count (issue 14). This sums to the cap only when
/// every node falls back; while the others still reach the database they
/// may take the cut-off node's share once its grant expires, and the cap
/// is exceeded by at most this much until it is reachable again.
pub fn fallback(capacity: u64, nodes: u32) -> u64 {
    capacity / u64::from(nodes.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_shares_table() {
        // (capacity, wants, shares)
        let cases: &[(u64, &[u64], &[u64])] = &[
            (30, &[], &[]),
            (30, &[100], &[30]),
            (30, &[100, 100, 100], &[10, 10, 10]),
            // What the small one does not want goes to the others.
            (30, &[20, 20, 5], &[12, 13, 5]),
            (30, &[5, 20, 20], &[5, 12, 13]),
            // Nobody wants it all: the spare is split evenly.
            (30, &[1, 2, 3], &[9, 10, 11]),
            (30, &[0, 0, 0], &[10, 10, 10]),
            (31, &[100, 100, 100], &[10, 10, 11]),
            (0, &[5, 5], &[0, 0]),
            (
                u64::MAX,
                &[u64::MAX, u64::MAX],
                &[u64::MAX / 2, u64::MAX / 2 + 1],
            ),
        ];
        for &(cap, wants, want) in cases {
            let got = fair_shares(cap, wants);
            assert_eq!(got, want, "capacity {cap}, wants {wants:?}");
            if !wants.is_empty() {
                assert_eq!(
                    got.iter().map(|&s| u128::from(s)).sum::<u128>(),
                    u128::from(cap)
                );
            }
        }
    }

    #[test]
    fn a_grant_never_takes_what_others_hold() {
        assert_eq!(grant(30, 15, 10), 15);
        assert_eq!(grant(30, 15, 20), 10);
        assert_eq!(grant(30, 15, 40), 0);
        assert_eq!(fallback(30, 3), 10);
        assert_eq!(fallback(31, 3), 10);
        assert_eq!(fallback(30, 0), 30);
    }
}
