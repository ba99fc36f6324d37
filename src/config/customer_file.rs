//! The console's customer files (issue 16; docs/console.md "Add a New
//! Customer"): one `[[customer]]` per file in an `[[include]]` directory,
//! named after the customer, optionally followed by its `[[client]]`
//! tables. This module owns the file names, the text the form writes and
//! reading a file back for "Edit". It does no I/O; the console does.

use super::include::Include;
use std::fmt::Write as _;

/// Longest file name the console writes (most filesystems allow 255 bytes).
pub const MAX_FILE_NAME: usize = 200;

/// The file name for customer `name`: lowercased (customer names compare
/// case-insensitively, so two spellings share one file), with every byte
/// other than `a-z`, `0-9`, `-` and `_` written `%XX`. A name can never
/// become a path, a hidden file or `..`. None when it would be too long.
pub fn file_name(name: &str) -> Option<String> {
    let mut out = String::new();
    for b in name.to_lowercase().bytes() {
        if b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out.push_str(".toml");
    (!name.is_empty() && out.len() <= MAX_FILE_NAME).then_some(out)
}

/// A directory name for `name` (a customer's or a reseller's backup
/// directory the console derives): lowercase ASCII letters and digits,
/// every other run of characters one `-`. When that loses anything but
/// case, a short hash of the lowercased name follows, so two names that
/// differ share a directory only if they differ in case alone (and names
/// compare case-insensitively).
pub fn dir_name(name: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_matches('-').to_string();
    if !out.is_empty() && out == name.to_lowercase() {
        return out;
    }
    let h = Sha256::digest(name.to_lowercase().as_bytes());
    let tag: String = h[..4].iter().map(|b| format!("{b:02x}")).collect();
    if out.is_empty() {
        tag
    } else {
        format!("{out}-{tag}")
    }
}

/// The includes the console may write a customer of `reseller` through,
/// in order of preference: the reseller's own directories, then, for the
/// admin, the admin's (those with no reseller). Only includes whose
/// pattern takes `file` count (any, when `file` is None).
pub fn includes_for<'a: 'b, 'b>(
    includes: &'a [Include],
    reseller: &'b str,
    admin: bool,
    file: Option<&'b str>,
) -> impl Iterator<Item = &'a Include> + 'b {
    let takes = move |i: &&Include| file.is_none_or(|f| i.takes(f));
    let own = includes
        .iter()
        .filter(takes)
        .filter(move |i| i.reseller.as_deref() == Some(reseller));
    let admins = includes
        .iter()
        .filter(takes)
        .filter(move |i| admin && i.reseller.is_none());
    own.chain(admins)
}

/// The include a new customer file of `reseller` goes through: the first
/// of [`includes_for`].
pub fn include_for<'a>(
    includes: &'a [Include],
    reseller: &str,
    admin: bool,
    file: &str,
) -> Option<&'a Include> {
    includes_for(includes, reseller, admin, Some(file)).next()
}

/// A customer's throttle as the form sets it (CONFIG.md `throttle`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DraftThrottle {
    /// Use the reseller's or the server's.
    Inherit,
    /// Explicitly unthrottled.
    Off,
    /// Throttled to `rate` during `hours`.
    On {
        /// A rate with its unit, as typed ("20 Mbit/s").
        rate: String,
        /// "always" or "HH:MM-HH:MM".
        hours: String,
        /// No limit on Saturday and Sunday.
        weekends_unthrottled: bool,
    },
}

/// An aggregate cap as the form sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraftAggregate {
    /// A rate with its unit.
    pub rate: String,
    /// "always" or "HH:MM-HH:MM".
    pub hours: String,
    /// No cap on Saturday and Sunday.
    pub weekends_unthrottled: bool,
}

/// Every key of one `[[customer]]` the form writes; strings as typed (the
/// validator judges them), passwords already hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    /// `name`.
    pub name: String,
    /// `reseller`.
    pub reseller: String,
    /// `email`.
    pub email: String,
    /// `address`, `city`, `phone`, `fax`, `notes` (empty ones are left out).
    pub records: [(&'static str, String); 5],
    /// `backup_location`.
    pub backup_location: String,
    /// `space`; None = left out.
    pub space: Option<String>,
    /// `auto_add_clients`.
    pub auto_add_clients: bool,
    /// `enroll_key`: a PHC hash.
    pub enroll_key: Option<String>,
    /// `email_reports`.
    pub email_reports: bool,
    /// `web_access`: user name and PHC hash.
    pub web_access: Option<(String, String)>,
    /// `mcal_limit`; None = "auto".
    pub mcal_limit: Option<u64>,
    /// `activated`.
    pub activated: bool,
    /// `max_clients`.
    pub max_clients: Option<u64>,
    /// `throttle`.
    pub throttle: DraftThrottle,
    /// `aggregate`.
    pub aggregate: Option<DraftAggregate>,
    /// `consolidated_report`: recipients and frequency.
    pub consolidated_report: Option<(Vec<String>, String)>,
    /// `send_account_details`.
    pub send_account_details: bool,
}

/// `s` as a TOML string, escaped.
fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

impl Draft {
    /// The `[[customer]]` table, after `header` (each line made a comment).
    pub fn render(&self, header: &str) -> String {
        let mut t = String::new();
        for line in header.lines() {
            let line: String = line
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            let _ = writeln!(t, "# {line}");
        }
        t.push_str("[[customer]]\n");
        let mut kv = |k: &str, v: String| {
            let _ = writeln!(t, "{k} = {v}");
        };
        kv("name", q(&self.name));
        kv("reseller", q(&self.reseller));
        kv("email", q(&self.email));
        for (k, v) in &self.records {
            if !v.is_empty() {
                kv(k, q(v));
            }
        }
        kv("backup_location", q(&self.backup_location));
        if let Some(s) = &self.space {
            kv("space", q(s));
        }
        kv("auto_add_clients", self.auto_add_clients.to_string());
        if let Some(k) = &self.enroll_key {
            kv("enroll_key", q(k));
        }
        kv("email_reports", self.email_reports.to_string());
        if let Some((user, hash)) = &self.web_access {
            kv(
                "web_access",
                format!("{{ user = {}, password = {} }}", q(user), q(hash)),
            );
        }
        kv(
            "mcal_limit",
            self.mcal_limit.map_or_else(|| q("auto"), |n| n.to_string()),
        );
        kv("activated", self.activated.to_string());
        if let Some(n) = self.max_clients {
            kv("max_clients", n.to_string());
        }
        kv(
            "throttle",
            match &self.throttle {
                DraftThrottle::Inherit => q("inherit"),
                DraftThrottle::Off => "{ enabled = false }".into(),
                DraftThrottle::On {
                    rate,
                    hours,
                    weekends_unthrottled,
                } => format!(
                    "{{ enabled = true, rate = {}, hours = {}, weekends_unthrottled = {weekends_unthrottled} }}",
                    q(rate),
                    q(hours)
                ),
            },
        );
        if let Some(a) = &self.aggregate {
            kv(
                "aggregate",
                format!(
                    "{{ rate = {}, hours = {}, weekends_unthrottled = {} }}",
                    q(&a.rate),
                    q(&a.hours),
                    a.weekends_unthrottled
                ),
            );
        }
        if let Some((to, freq)) = &self.consolidated_report {
            let to: Vec<String> = to.iter().map(|r| q(r)).collect();
            kv(
                "consolidated_report",
                format!(
                    "{{ recipients = [{}], frequency = {} }}",
                    to.join(", "),
                    q(freq)
                ),
            );
        }
        kv(
            "send_account_details",
            self.send_account_details.to_string(),
        );
        t
    }
}

/// A customer file read back for "Edit": its one customer table, and the
/// text of the `[[client]]` tables after it, kept as written. None when
/// the file is not in that shape (arranged by hand: several customers, or
/// clients first); the console then leaves it to be edited on disk.
pub fn split(text: &str) -> Option<(toml::Table, &str)> {
    let whole: toml::Table = toml::from_str(text).ok()?;
    let clients_in = |t: &toml::Table| {
        t.get("client")
            .and_then(|c| c.as_array())
            .map_or(0, Vec::len)
    };
    // The first `[[client]]` header line that really is one: a line inside
    // a multi-line string is not (cutting there leaves the head unparsed,
    // or its tables differ from the whole file's).
    let at = std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .filter(|&i| {
            let line: String = text[i..]
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            line.starts_with("[[client]]")
        })
        .find(|&i| {
            let (head, rest) = text.split_at(i);
            let (Ok(h), Ok(r)) = (
                toml::from_str::<toml::Table>(head),
                toml::from_str::<toml::Table>(rest),
            ) else {
                return false;
            };
            h.get("customer") == whole.get("customer") && clients_in(&r) == clients_in(&whole)
        })
        .unwrap_or(text.len());
    let (head, clients) = text.split_at(at);
    let mut doc: toml::Table = toml::from_str(head).ok()?;
    let customers = doc.remove("customer")?;
    if !doc.is_empty() {
        return None;
    }
    let mut list = match customers {
        toml::Value::Array(a) if a.len() == 1 => a,
        _ => return None,
    };
    let toml::Value::Table(customer) = list.remove(0) else {
        return None;
    };
    let rest: toml::Table = toml::from_str(clients).ok()?;
    if rest.keys().any(|k| k != "client") {
        return None;
    }
    Some((customer, clients))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn names_become_plain_file_names() {
        for (name, file) in [
            ("Contoso", Some("contoso.toml")),
            ("ACME Ltd.", Some("acme%20ltd%2E.toml")),
            ("..", Some("%2E%2E.toml")),
            ("a/b", Some("a%2Fb.toml")),
            (".hidden", Some("%2Ehidden.toml")),
            ("Zoë", Some("zo%C3%AB.toml")),
            ("", None),
        ] {
            assert_eq!(file_name(name).as_deref(), file, "{name:?}");
        }
        assert_eq!(file_name(&"é".repeat(40)), None, "too long for a file");
        assert_eq!(dir_name("Contoso"), "contoso");
        assert_eq!(dir_name("acme-2"), "acme-2");
        assert!(dir_name("Contoso Ltd.").starts_with("contoso-ltd-"));
        assert_ne!(
            dir_name("Contoso Ltd"),
            dir_name("Contoso-Ltd"),
            "lossy names get a hash"
        );
        assert_eq!(
            dir_name("Contoso Ltd"),
            dir_name("CONTOSO LTD"),
            "case alone does not count"
        );
        assert_ne!(dir_name(".."), dir_name("//"));
        assert!(!dir_name("..").contains('.'));
    }

    fn inc(dir: &str, reseller: Option<&str>) -> Include {
        Include {
            dir: PathBuf::from(dir),
            pattern: "*.toml".into(),
            reseller: reseller.map(str::to_string),
            span: 0..0,
        }
    }

    #[test]
    fn each_login_writes_only_through_its_include() {
        let all = [
            inc("/a", Some("acme")),
            inc("/admin", None),
            inc("/g", Some("globex")),
        ];
        let dir = |r, admin| include_for(&all, r, admin, "x.toml").map(|i| i.dir.clone());
        assert_eq!(dir("acme", false), Some(PathBuf::from("/a")));
        assert_eq!(dir("globex", false), Some(PathBuf::from("/g")));
        assert_eq!(
            dir("initech", false),
            None,
            "a reseller without a directory"
        );
        assert_eq!(dir("initech", true), Some(PathBuf::from("/admin")));
        assert_eq!(dir("acme", true), Some(PathBuf::from("/a")));
        assert_eq!(
            include_for(&all, "acme", false, "x.conf").map(|i| i.dir.clone()),
            None
        );
    }

    fn draft() -> Draft {
        Draft {
            name: "Contoso \"HQ\"".into(),
            reseller: "acme".into(),
            email: "it@contoso.example".into(),
            records: [
                ("address", "1 Main St".into()),
                ("city", String::new()),
                ("phone", String::new()),
                ("fax", String::new()),
                ("notes", "line one\nline two".into()),
            ],
            backup_location: "/srv/backup/contoso".into(),
            space: Some("500 GiB".into()),
            auto_add_clients: true,
            enroll_key: None,
            email_reports: true,
            web_access: Some(("contoso".into(), "$argon2id$x".into())),
            mcal_limit: Some(25),
            activated: true,
            max_clients: Some(40),
            throttle: DraftThrottle::On {
                rate: "20 Mbit/s".into(),
                hours: "20:00-06:00".into(),
                weekends_unthrottled: true,
            },
            aggregate: None,
            consolidated_report: Some((vec!["cio@contoso.example".into()], "weekly".into())),
            send_account_details: true,
        }
    }

    #[test]
    fn a_draft_reads_back_as_the_table_it_describes() {
        let text = draft().render("Written by the console\nfor acme\u{7}");
        assert!(
            text.starts_with("# Written by the console\n# for acme?\n[[customer]]\n"),
            "{text}"
        );
        let clients = "\n[[client]]\nid = \"PC-1\"\ncustomer = \"Contoso\"\nkind = \"desktop\"\n";
        let whole = format!("{text}{clients}");
        let (c, rest) = split(&whole).expect("the console's shape");
        assert_eq!(rest, clients.trim_start());
        assert_eq!(c["name"].as_str(), Some("Contoso \"HQ\""));
        assert_eq!(c["notes"].as_str(), Some("line one\nline two"));
        assert!(!c.contains_key("city"), "empty records are left out");
        assert_eq!(c["mcal_limit"].as_integer(), Some(25));
        assert_eq!(c["web_access"]["user"].as_str(), Some("contoso"));
        assert_eq!(c["throttle"]["hours"].as_str(), Some("20:00-06:00"));
        assert_eq!(
            c["consolidated_report"]["recipients"][0].as_str(),
            Some("cio@contoso.example")
        );
    }

    #[test]
    fn a_client_header_inside_the_notes_is_not_a_table() {
        let mut d = draft();
        d.records[4].1 = "see below\n[[client]]\nid = \"X\"".into();
        let text = d.render("");
        let (c, rest) = split(&text).expect("still the console's shape");
        assert_eq!(rest, "");
        assert!(c["notes"].as_str().unwrap().contains("[[client]]"));
    }

    #[test]
    fn files_arranged_by_hand_are_not_split() {
        let one = draft().render("");
        for text in [
            format!("{one}{one}"),
            format!("[[client]]\nid = \"A\"\ncustomer = \"C\"\n{one}"),
            format!("{one}\n[[client]]\nid = \"A\"\n[[customer]]\nname = \"B\"\n"),
            "not toml [".to_string(),
        ] {
            assert!(split(&text).is_none(), "{text}");
        }
    }
}
