//! `[server.web]` and the console logins (CONFIG.md, Additions of
//! 2026-11-30): the listener, the public URL, the admin's, resellers' and
//! customers' `web_access`, and the rule that user names are unique.

use super::*;
use crate::config::raw::{RawWeb, RawWebAccess};
use crate::config::{DEFAULT_SESSION_IDLE, Web};

/// `web_access = { username, password }` (or `user`); `key` names the
/// table (`customer[x].web_access`, `server.web.admin`).
pub(super) fn web_access(v: &mut V<'_>, w: &Spanned<RawWebAccess>, key: &str) -> Option<WebAccess> {
    let r = w.get_ref();
    let username = v
        .required(
            &r.username,
            w.span(),
            K(key, "username"),
            "web_access.username",
        )
        .and_then(|u| {
            let name = u.get_ref();
            // Shown in pages and logs, compared on every login.
            let ok = (1..=64).contains(&name.chars().count())
                && !name.chars().any(|c| c.is_control() || c.is_whitespace());
            if !ok {
                v.err(
                    Rule::Identifier,
                    u.span(),
                    K(key, "username"),
                    "a user name is 1 to 64 characters, without spaces or control characters",
                );
            }
            ok.then(|| name.clone())
        });
    let password = v
        .required(
            &r.password,
            w.span(),
            K(key, "password"),
            "web_access.password (a hash from `tollgate hash-secret`)",
        )
        .and_then(|p| v.phc(p, K(key, "password")));
    Some(WebAccess {
        username: username?,
        password: password?,
    })
}

/// `[server.web]`.
pub(super) fn web(v: &mut V<'_>, raw: &Sp<RawWeb>) -> Option<Web> {
    let w = raw.as_ref()?;
    let r = w.get_ref();
    let listen = v
        .required(
            &r.listen,
            w.span(),
            "server.web.listen",
            "the console's address",
        )
        .and_then(|a| v.address(a, "server.web.listen", "127.0.0.1:8443"));
    let public_url = r
        .public_url
        .as_ref()
        .and_then(|u| match url::Url::parse(u.get_ref()) {
            Ok(parsed) if parsed.scheme() == "https" && parsed.host().is_some() => {
                Some(u.get_ref().trim_end_matches('/').to_string())
            }
            _ => {
                v.err(
                    Rule::Address,
                    u.span(),
                    "server.web.public_url",
                    format!(
                        "{:?} is not an https URL; write e.g. \"https://backup.example.com:8443\"",
                        u.get_ref()
                    ),
                );
                None
            }
        });
    let cert = r.cert.as_ref().map(|p| v.path(p.get_ref()));
    let key = r.key.as_ref().map(|p| v.path(p.get_ref()));
    if cert.is_some() != key.is_some() {
        v.err(
            Rule::Tls,
            w.span(),
            "server.web",
            "set both cert and key, or neither (then the console uses the daemon's certificate)",
        );
    }
    let admin = r
        .admin
        .as_ref()
        .and_then(|a| web_access(v, a, "server.web.admin"));
    let session_idle = v.duration(
        &r.session_idle,
        "server.web.session_idle",
        DEFAULT_SESSION_IDLE,
    );
    Some(Web {
        listen: listen?,
        public_url,
        cert,
        key,
        admin,
        session_idle,
    })
}

/// Web user names are unique across the admin, resellers and customers
/// (compared case-insensitively: a login must name one account).
pub(super) fn check_logins(v: &mut V<'_>, doc: &RawConfig) {
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut one = |v: &mut V<'_>, w: &Spanned<RawWebAccess>, owner: String| {
        let Some(u) = &w.get_ref().username else {
            return;
        };
        match seen.entry(u.get_ref().to_lowercase()) {
            Entry::Occupied(first) => v.err(
                Rule::Duplicate,
                u.span(),
                format!("{owner}.username"),
                format!(
                    "web user name {:?} is already the login of {}; web user names must be unique",
                    u.get_ref(),
                    first.get()
                ),
            ),
            Entry::Vacant(slot) => {
                slot.insert(owner);
            }
        }
    };
    if let Some(a) = doc
        .server
        .as_ref()
        .and_then(|s| s.get_ref().web.as_ref())
        .and_then(|w| w.get_ref().admin.as_ref())
    {
        one(v, a, "server.web.admin".into());
    }
    for (i, r) in doc.reseller.iter().enumerate() {
        if let Some(w) = &r.get_ref().web_access {
            let owner = label("reseller", r.get_ref().name.as_ref(), i);
            one(v, w, format!("{owner}.web_access"));
        }
    }
    if let Some(w) = doc
        .default_customer
        .as_ref()
        .and_then(|d| d.get_ref().web_access.as_ref())
    {
        one(v, w, "default_customer.web_access".into());
    }
    for (i, c) in doc.customer.iter().enumerate() {
        if let Some(w) = &c.get_ref().web_access {
            let owner = label("customer", c.get_ref().name.as_ref(), i);
            one(v, w, format!("{owner}.web_access"));
        }
    }
}
