//! The `[[include]]` rules (issue 16, docs/configuration.md): each entry
//! names a pattern and an existing reseller (or none, for the admin's
//! files); a customer that came through a reseller's include belongs to
//! that reseller, and a client to one of its customers. Errors point into
//! the included file the offending table came from.

use super::*;
use crate::config::include::segment_of;

pub(super) fn check(v: &mut V<'_>, doc: &RawConfig, config: &Config) {
    for (i, inc) in doc.include.iter().enumerate() {
        let key = format!("include[#{}]", i + 1);
        let r = inc.get_ref();
        if let Some(p) = v.required(&r.path, inc.span(), K(&key, "path"), "an include's path") {
            let ok = Path::new(p.get_ref())
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.is_empty() && !n.contains('/'));
            if !ok {
                let span = p.span();
                v.err(
                    Rule::Include,
                    span,
                    K(&key, "path"),
                    "name the files in a directory, e.g. \"/etc/tollgate/resellers.d/acme/*.toml\"",
                );
            }
        }
        if let Some(name) = &r.reseller
            && config.reseller_by_name(name.get_ref()).is_none()
        {
            v.no_reseller(name, K(&key, "reseller"), &config.resellers);
        }
    }
    // The reseller each part of the text is bound to (None: the main file
    // or an admin's include, where any reseller goes).
    let bound = |v: &V<'_>, at: usize| -> Option<String> {
        segment_of(&v.segments, at)?
            .include
            .and_then(|i| v.includes.get(i))
            .and_then(|inc| inc.reseller.clone())
    };
    if v.segments.len() <= 1 {
        return;
    }
    for (i, c) in doc.customer.iter().enumerate() {
        let Some(reseller) = bound(v, c.span().start) else {
            continue;
        };
        let raw = c.get_ref();
        let key = label("customer", raw.name.as_ref(), i);
        if let Some(r) = &raw.reseller
            && r.get_ref() != &reseller
        {
            v.err(
                Rule::Include,
                r.span(),
                K(&key, "reseller"),
                format!(
                    "this file is included for reseller {reseller:?}: its customers belong to {reseller:?}, not {:?}",
                    r.get_ref()
                ),
            );
        }
    }
    for (i, c) in doc.client.iter().enumerate() {
        let Some(reseller) = bound(v, c.span().start) else {
            continue;
        };
        let raw = c.get_ref();
        let key = label("client", raw.id.as_ref(), i);
        let Some(cust) = &raw.customer else { continue };
        let owner = config
            .customer_by_name(cust.get_ref())
            .and_then(|id| config.customer(id).reseller)
            .map(|r| config.reseller(r).name.clone());
        if owner.as_deref() != Some(reseller.as_str()) {
            v.err(
                Rule::Include,
                cust.span(),
                K(&key, "customer"),
                format!(
                    "this file is included for reseller {reseller:?}: its clients belong to {reseller:?}'s customers, and {:?} is not one",
                    cust.get_ref()
                ),
            );
        }
    }
}
