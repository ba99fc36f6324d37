//! Backup locations must not overlap (CONFIG.md, Additions of 2026-11-30):
//! no two are equal, neither contains the other, and none lies inside
//! `state_dir` or contains it. Two customers in one directory would see
//! each other's clients' files; a location inside `state_dir` would mix
//! client files with the daemon's database and keys.

use super::*;

/// Where a customer's `backup_location` is written in the file: its value,
/// or its table when the location is the default.
fn span_of(doc: &RawConfig, i: usize) -> (Range<usize>, String) {
    let (table, key) = if i == 0 {
        (
            doc.default_customer.as_ref(),
            "default_customer".to_string(),
        )
    } else {
        let raw = doc.customer.get(i - 1);
        let key = label(
            "customer",
            raw.and_then(|c| c.get_ref().name.as_ref()),
            i - 1,
        );
        (raw, key)
    };
    let span = table
        .map(|t| {
            t.get_ref()
                .backup_location
                .as_ref()
                .map_or(t.span(), |b| b.span())
        })
        .unwrap_or(0..0);
    (span, format!("{key}.backup_location"))
}

pub(super) fn check_locations(v: &mut V<'_>, doc: &RawConfig, cfg: &Config) {
    let name = |i: usize| &cfg.customers[i].name;
    let locs: Vec<&Path> = cfg
        .customers
        .iter()
        .map(|c| c.backup_location.as_path())
        .collect();
    for j in 0..locs.len() {
        let (span, key) = span_of(doc, j);
        for i in 0..j {
            let (a, b) = (locs[i], locs[j]);
            let what = if a == b {
                format!(
                    "{} is also customer {:?}'s backup_location; each customer needs a directory of its own",
                    b.display(),
                    name(i)
                )
            } else if b.starts_with(a) {
                format!(
                    "{} lies inside customer {:?}'s backup_location {}; give each customer a directory of its own, side by side",
                    b.display(),
                    name(i),
                    a.display()
                )
            } else if a.starts_with(b) {
                format!(
                    "{} contains customer {:?}'s backup_location {}; give each customer a directory of its own, side by side",
                    b.display(),
                    name(i),
                    a.display()
                )
            } else {
                continue;
            };
            // One error per location: the first it clashes with.
            v.err(Rule::Overlap, span.clone(), &key, what);
            break;
        }
        if v.errors.last().is_some_and(|e| e.key == key) {
            continue;
        }
        let state = cfg.server.state_dir.as_path();
        let b = locs[j];
        let what = if b.starts_with(state) {
            format!(
                "{} lies inside state_dir {}, beside the daemon's database and keys; put backups elsewhere",
                b.display(),
                state.display()
            )
        } else if state.starts_with(b) {
            format!(
                "{} contains state_dir {} (the daemon's database and keys); put backups elsewhere",
                b.display(),
                state.display()
            )
        } else {
            continue;
        };
        v.err(Rule::Overlap, span, &key, what);
    }
}
