//! What a reload changes, by name (issue 12, item 14): the resellers,
//! customers and declared clients added, removed or changed, and which of
//! their keys changed. Pure: two configs in, a list out; the reload logs it.
//!
//! Entries are matched by name (customers without regard to case, as the
//! file's uniqueness rule reads them; client ids likewise), so moving a
//! block within the file changes nothing. A reference to another entry is
//! compared by that entry's name, not its position in the file.

use super::{ClientDecl, Config, Customer, Reseller, Server};
use std::collections::BTreeMap;
use std::fmt;

/// What happened to one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// New in the file.
    Added,
    /// Gone from the file.
    Removed,
    /// Present in both; these keys differ.
    Changed(Vec<&'static str>),
}

/// One entry's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryChange {
    /// `server`, `reseller`, `customer` or `client`.
    pub what: &'static str,
    /// Its name or id, as the new file writes it (the old one's if removed).
    pub name: String,
    /// What happened.
    pub change: Change,
}

impl fmt::Display for EntryChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.change {
            Change::Added => write!(f, "{} {:?} added", self.what, self.name),
            Change::Removed => write!(f, "{} {:?} removed", self.what, self.name),
            Change::Changed(keys) => {
                write!(
                    f,
                    "{} {:?} changed: {}",
                    self.what,
                    self.name,
                    keys.join(", ")
                )
            }
        }
    }
}

/// Compares named fields by their `Debug` text (every config type has one;
/// secrets compare by value, as their `Debug` hides them).
macro_rules! differing {
    ($a:expr, $b:expr; $($field:ident),* $(,)?) => {{
        let mut keys: Vec<&'static str> = Vec::new();
        $(
            if format!("{:?}", $a.$field) != format!("{:?}", $b.$field) {
                keys.push(stringify!($field));
            }
        )*
        keys
    }};
}

fn server_keys(a: &Server, b: &Server) -> Vec<&'static str> {
    let mut keys = differing!(a, b; listen, state_dir, state, total_space,
        max_connections, hello_timeout, idle_timeout, shutdown_grace, max_frame,
        metrics_listen, tls, mcal, throttle, aggregate, email, limits, retention, cluster, web);
    // The admin's hash hides in `Debug`.
    let admin = |s: &Server| s.web.as_ref().and_then(|w| w.admin.clone());
    if admin(a) != admin(b) && !keys.contains(&"web") {
        keys.push("web");
    }
    // Zones compare by name: jiff's Debug shows how the zone was loaded.
    if a.timezone.iana_name() != b.timezone.iana_name() {
        keys.insert(0, "timezone");
    }
    keys
}

fn reseller_keys(a: &Reseller, b: &Reseller) -> Vec<&'static str> {
    let mut keys =
        differing!(a, b; email, space, activated, email_reports, mcal_limit, throttle, aggregate);
    if a.web_access != b.web_access {
        keys.push("web_access");
    }
    keys
}

fn customer_keys(old: &Config, a: &Customer, new: &Config, b: &Customer) -> Vec<&'static str> {
    let mut keys = differing!(a, b; email, records, backup_location, space, auto_add_clients,
        email_reports, mcal_limit, activated, max_clients, throttle, aggregate,
        consolidated_report, send_account_details);
    let ra = a.reseller.map(|r| old.reseller(r).name.as_str());
    let rb = b.reseller.map(|r| new.reseller(r).name.as_str());
    if ra != rb {
        keys.push("reseller");
    }
    if a.enroll_key != b.enroll_key {
        keys.push("enroll_key");
    }
    if a.web_access != b.web_access {
        keys.push("web_access");
    }
    keys
}

fn client_keys(old: &Config, a: &ClientDecl, new: &Config, b: &ClientDecl) -> Vec<&'static str> {
    let mut keys = differing!(a, b; kind, space, throttle, schedules);
    if old.customer(a.customer).name.to_lowercase() != new.customer(b.customer).name.to_lowercase()
    {
        keys.insert(0, "customer");
    }
    keys
}

/// Pairs up entries by a key and reports each addition, removal and change.
fn compare<'a, T>(
    what: &'static str,
    old: impl Iterator<Item = (String, &'a T)>,
    new: impl Iterator<Item = (String, &'a T)>,
    keys: impl Fn(&T, &T) -> Vec<&'static str>,
    out: &mut Vec<EntryChange>,
) where
    T: 'a,
    T: Named,
{
    let old: BTreeMap<String, &T> = old.collect();
    let mut seen = std::collections::BTreeSet::new();
    for (k, b) in new {
        seen.insert(k.clone());
        let change = match old.get(&k) {
            None => Change::Added,
            Some(a) => match keys(a, b) {
                v if v.is_empty() => continue,
                v => Change::Changed(v),
            },
        };
        out.push(EntryChange {
            what,
            name: b.name().to_string(),
            change,
        });
    }
    for (k, a) in &old {
        if !seen.contains(k) {
            out.push(EntryChange {
                what,
                name: a.name().to_string(),
                change: Change::Removed,
            });
        }
    }
}

trait Named {
    fn name(&self) -> &str;
}
impl Named for Reseller {
    fn name(&self) -> &str {
        &self.name
    }
}
impl Named for Customer {
    fn name(&self) -> &str {
        &self.name
    }
}
impl Named for ClientDecl {
    fn name(&self) -> &str {
        &self.id
    }
}

/// Everything `new` changes from `old`, in the order server, resellers,
/// customers (the Default Customer first), clients.
pub fn diff(old: &Config, new: &Config) -> Vec<EntryChange> {
    let mut out = Vec::new();
    let keys = server_keys(&old.server, &new.server);
    if !keys.is_empty() {
        out.push(EntryChange {
            what: "server",
            name: "[server]".into(),
            change: Change::Changed(keys),
        });
    }
    compare(
        "reseller",
        old.resellers.iter().map(|r| (r.name.clone(), r)),
        new.resellers.iter().map(|r| (r.name.clone(), r)),
        reseller_keys,
        &mut out,
    );
    compare(
        "customer",
        old.customers.iter().map(|c| (c.name.to_lowercase(), c)),
        new.customers.iter().map(|c| (c.name.to_lowercase(), c)),
        |a, b| customer_keys(old, a, new, b),
        &mut out,
    );
    compare(
        "client",
        old.clients.iter().map(|c| (c.id.to_lowercase(), c)),
        new.clients.iter().map(|c| (c.id.to_lowercase(), c)),
        |a, b| client_keys(old, a, new, b),
        &mut out,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(body: &str) -> Config {
        let src = format!(
            "[server]\nlisten = [\"127.0.0.1:7443\"]\nstate = \"sqlite:///tmp/tg-diff/state.db\"\ntimezone = \"UTC\"\n{body}"
        );
        Config::from_str(&src, Path::new("/tmp/tg-diff/tollgate.toml")).unwrap()
    }

    const BASE: &str = r#"
[[reseller]]
name = "north"

[[reseller]]
name = "south"

[[customer]]
name = "Acme"
reseller = "north"
email = "it@acme.example"
backup_location = "/srv/b/acme"

[[customer]]
name = "Bolt"
reseller = "north"
email = "it@bolt.example"
backup_location = "/srv/b/bolt"

[[client]]
id = "PC-1"
customer = "Acme"
"#;

    fn lines(old: &str, new: &str) -> Vec<String> {
        diff(&cfg(old), &cfg(new))
            .iter()
            .map(|c| c.to_string())
            .collect()
    }

    #[test]
    fn what_a_reload_changes_is_named() {
        let table: &[(&str, &str, &[&str])] = &[
            ("same file", BASE, &[]),
            (
                "blocks reordered: nothing changed",
                &BASE.replace(
                    "[[reseller]]\nname = \"north\"\n\n[[reseller]]\nname = \"south\"\n",
                    "[[reseller]]\nname = \"south\"\n\n[[reseller]]\nname = \"north\"\n",
                ),
                &[],
            ),
            (
                "a customer's space and activation",
                &BASE.replace(
                    "backup_location = \"/srv/b/bolt\"\n",
                    "backup_location = \"/srv/b/bolt\"\nspace = \"1 GiB\"\nactivated = false\n",
                ),
                &["customer \"Bolt\" changed: space, activated"],
            ),
            (
                "a customer moves to another reseller",
                &BASE.replace(
                    "name = \"Bolt\"\nreseller = \"north\"",
                    "name = \"Bolt\"\nreseller = \"south\"",
                ),
                &["customer \"Bolt\" changed: reseller"],
            ),
            (
                "a declared client moves",
                &BASE.replace("customer = \"Acme\"", "customer = \"Bolt\""),
                &["client \"PC-1\" changed: customer"],
            ),
            (
                "added and removed",
                &format!(
                    "{}\n[[client]]\nid = \"PC-2\"\ncustomer = \"Bolt\"\n",
                    BASE.replace("[[reseller]]\nname = \"south\"\n", "")
                ),
                &["reseller \"south\" removed", "client \"PC-2\" added"],
            ),
            (
                "the server's throttle",
                &format!("[server.throttle]\nenabled = true\nrate = \"1 MiB/s\"\n{BASE}"),
                &["server \"[server]\" changed: throttle"],
            ),
        ];
        for (what, new, want) in table {
            assert_eq!(lines(BASE, new), *want, "{what}");
        }
    }

    #[test]
    fn a_new_enroll_key_is_a_change_though_its_debug_hides_it() {
        let phc = |secret: &str| {
            use argon2::{Algorithm, Argon2, Params, PasswordHasher, Version};
            let params = Params::new(8, 1, 1, None).unwrap();
            let a = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
            a.hash_password(secret.as_bytes()).unwrap().to_string()
        };
        let (h1, h2) = (phc("one"), phc("two"));
        let with = |h: &str| {
            BASE.replace(
                "backup_location = \"/srv/b/acme\"\n",
                &format!("backup_location = \"/srv/b/acme\"\nenroll_key = \"{h}\"\n"),
            )
        };
        assert_eq!(
            lines(&with(&h1), &with(&h2)),
            ["customer \"Acme\" changed: enroll_key"]
        );
    }
}
