//! The configuration file exactly as written: serde structs whose leaves keep
//! their source spans. Nothing here judges a value; `validate` does that and
//! turns these into the typed model. Unknown keys are not rejected by serde
//! (that would stop at the first one) but collected with `serde_ignored`, so
//! that every unknown key is reported at once.

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use std::collections::BTreeMap;
use std::fmt;
use toml::Spanned;

/// One segment of the path to a value in the document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    /// A table key.
    Key(String),
    /// An array index.
    Index(usize),
}

/// A value of the wrong TOML type (a string where a number belongs, …).
/// It is reported, set aside, and the rest of the file is still checked.
#[derive(Debug, Clone)]
pub struct TypeError {
    /// The value's span in the file.
    pub span: std::ops::Range<usize>,
    /// Its key path, as errors name it (`customer[Acme].max_clients`).
    pub key: String,
    /// The parser's words, e.g. `invalid type: string "2", expected i64`.
    pub message: String,
}

/// What [`parse`] gives back.
pub struct Parsed {
    /// The document without the values of the wrong type.
    pub raw: RawConfig,
    /// Paths of keys the format does not have.
    pub unknown: Vec<Vec<Seg>>,
    /// The values set aside.
    pub type_errors: Vec<TypeError>,
}

/// At most this many values of the wrong type are set aside; beyond it the
/// file is not worth checking further.
const MAX_TYPE_ERRORS: usize = 100;

/// Parses `src`, returning the raw document, the paths of unknown keys and
/// the values of the wrong type. A TOML syntax error is returned as it is
/// (with the type errors found before it, if any): the text is not a
/// document. A value of the wrong type is blanked out (its key and value
/// become spaces, so every other span stays where it was) and the parse is
/// run again, so one bad value does not hide the rest (issue 12).
pub fn parse(src: &str) -> Result<Parsed, (toml::de::Error, Vec<TypeError>)> {
    let mut text = std::borrow::Cow::Borrowed(src);
    let mut type_errors = Vec::new();
    loop {
        let mut unknown = Vec::new();
        let de = match toml::de::Deserializer::parse(&text) {
            Ok(de) => de,
            Err(e) => return Err((e, type_errors)),
        };
        let e = match serde_ignored::deserialize(de, |path| unknown.push(segments(&path))) {
            Ok(raw) => {
                return Ok(Parsed {
                    raw,
                    unknown,
                    type_errors,
                });
            }
            Err(e) => e,
        };
        let Some(span) = e.span().filter(|_| type_errors.len() < MAX_TYPE_ERRORS) else {
            return Err((e, type_errors));
        };
        let entries = entries_at(&text, span.start);
        let Some((_, key)) = entries.last().cloned() else {
            return Err((e, type_errors));
        };
        // The innermost entry that can go without breaking the document:
        // `enabled = "yes"` inside `{ … }` cannot, the whole `throttle = { … }`
        // can. Never a header-made table: that would take its neighbours.
        let blanked = entries.iter().rev().find_map(|(range, _)| {
            let cut = &text[range.clone()];
            if cut.lines().skip(1).any(|l| l.trim_start().starts_with('[')) {
                return None;
            }
            let mut next = text.to_string();
            let spaces: String = cut
                .bytes()
                .map(|b| {
                    if b == b'\n' || b == b'\r' {
                        b as char
                    } else {
                        ' '
                    }
                })
                .collect();
            next.replace_range(range.clone(), &spaces);
            toml::de::DeTable::parse(&next).is_ok().then_some(next)
        });
        let Some(next) = blanked else {
            return Err((e, type_errors));
        };
        type_errors.push(TypeError {
            span,
            key,
            message: e.message().trim().to_string(),
        });
        text = std::borrow::Cow::Owned(next);
    }
}

/// The entries (`key = value`) that enclose byte `at`, outermost first:
/// each one's span from its key to the end of its value, and its key path
/// (array-of-table elements named by their `name` or `id`). Parses with
/// recovery, so it also serves for a document with a syntax error.
pub fn entries_at(src: &str, at: usize) -> Vec<(std::ops::Range<usize>, String)> {
    entries(src, Some(at))
}

/// Every entry in the file, in document order (see [`entries_at`]).
pub fn all_entries(src: &str) -> Vec<(std::ops::Range<usize>, String)> {
    entries(src, None)
}

fn entries(src: &str, at: Option<usize>) -> Vec<(std::ops::Range<usize>, String)> {
    use toml::de::{DeTable, DeValue};
    fn walk_value(
        v: &Spanned<DeValue<'_>>,
        at: Option<usize>,
        label: &str,
        out: &mut Vec<(std::ops::Range<usize>, String)>,
    ) {
        match v.get_ref() {
            DeValue::Table(t) => walk_table(t, at, label, out),
            DeValue::Array(a) => {
                // A header-made table's span is its header alone: look
                // inside every element, keep only entries that hold `at`.
                for (i, e) in a.iter().enumerate() {
                    let name = e.get_ref().as_table().and_then(|t| {
                        t.iter()
                            .find(|(k, _)| matches!(k.get_ref().as_ref(), "name" | "id"))
                            .and_then(|(_, v)| v.get_ref().as_str().map(str::to_string))
                    });
                    let label = match name {
                        Some(n) => format!("{label}[{n}]"),
                        None => format!("{label}[#{}]", i + 1),
                    };
                    walk_value(e, at, &label, out);
                }
            }
            _ => {}
        }
    }
    fn walk_table(
        t: &DeTable<'_>,
        at: Option<usize>,
        label: &str,
        out: &mut Vec<(std::ops::Range<usize>, String)>,
    ) {
        for (k, v) in t.iter() {
            let (ks, vs) = (k.span(), v.span());
            let range = ks.start.min(vs.start)..ks.end.max(vs.end);
            let label = if label.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{label}.{}", k.get_ref())
            };
            if at.is_none_or(|at| range.contains(&at)) {
                out.push((range, label.clone()));
            }
            walk_value(v, at, &label, out);
        }
    }
    let (root, _) = DeTable::parse_recoverable(src);
    let mut out = Vec::new();
    walk_table(root.get_ref(), at, "", &mut out);
    out
}

fn segments(path: &serde_ignored::Path<'_>) -> Vec<Seg> {
    use serde_ignored::Path;
    let mut out = match path {
        Path::Root => return Vec::new(),
        Path::Seq { parent, .. }
        | Path::Map { parent, .. }
        | Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => segments(parent),
    };
    match path {
        Path::Seq { index, .. } => out.push(Seg::Index(*index)),
        // Spanned<T> travels through serde as a map with private keys.
        Path::Map { key, .. } if !key.starts_with("$__serde_spanned_private") => {
            out.push(Seg::Key(key.clone()))
        }
        _ => {}
    }
    out
}

/// Finds the span of the key at `path` in `src`, and a readable key path
/// that names array elements by their `name` or `id` (`customer[Contoso].x`).
pub fn locate(src: &str, path: &[Seg]) -> Option<(std::ops::Range<usize>, String)> {
    use toml::de::{DeTable, DeValue};
    let root = DeTable::parse(src).ok()?;
    let mut value: Option<&Spanned<DeValue<'_>>> = None;
    let mut span = None;
    let mut label = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                let t = match value {
                    None => root.get_ref(),
                    Some(v) => v.get_ref().as_table()?,
                };
                let (key, v) = t.iter().find(|(key, _)| key.get_ref() == k)?;
                span = Some(key.span());
                value = Some(v);
                if !label.is_empty() {
                    label.push('.');
                }
                label.push_str(k);
            }
            Seg::Index(i) => {
                let v = value?.get_ref().as_array()?.get(*i)?;
                let name = v.get_ref().as_table().and_then(|t| {
                    t.iter()
                        .find(|(k, _)| matches!(k.get_ref().as_ref(), "name" | "id"))
                        .and_then(|(_, v)| v.get_ref().as_str().map(str::to_string))
                });
                match name {
                    Some(n) => label.push_str(&format!("[{n}]")),
                    None => label.push_str(&format!("[#{}]", i + 1)),
                }
                span = Some(v.span());
                value = Some(v);
            }
        }
    }
    Some((span?, label))
}

/// Every key the format has, for "did you mean" hints.
pub const KNOWN_KEYS: &[&str] = &[
    "server",
    "default_customer",
    "reseller",
    "customer",
    "client",
    "listen",
    "state_dir",
    "state",
    "timezone",
    "total_space",
    "max_connections",
    "hello_timeout",
    "idle_timeout",
    "shutdown_grace",
    "max_frame",
    "metrics_listen",
    "tls",
    "cert",
    "key",
    "client_ca",
    "require_client_cert",
    "mcal",
    "pool",
    "cost",
    "desktop",
    "laptop",
    "throttle",
    "aggregate",
    "email",
    "from",
    "admin",
    "smtp",
    "spool",
    "enabled",
    "rate",
    "hours",
    "weekends_unthrottled",
    "name",
    "space",
    "activated",
    "email_reports",
    "mcal_limit",
    "address",
    "city",
    "phone",
    "fax",
    "notes",
    "backup_location",
    "auto_add_clients",
    "enroll_key",
    "web_access",
    "username",
    "user",
    "web",
    "public_url",
    "session_idle",
    "send_account_details",
    "include",
    "path",
    "usage",
    "audit",
    "password",
    "max_clients",
    "cluster",
    "node",
    "nodes",
    "lease",
    "consolidated_report",
    "recipients",
    "frequency",
    "id",
    "kind",
    "schedules",
];

/// The known key closest to `unknown`, if it is a plausible typo.
pub fn suggest(unknown: &str) -> Option<&'static str> {
    closest(unknown, KNOWN_KEYS.iter().copied())
}

/// The candidate closest to `wrong`, when it is a plausible typo of it:
/// within two edits (a quarter of the length for long names), compared
/// without regard to case; ties go to the first.
pub fn closest<'a>(wrong: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let w = wrong.to_lowercase();
    candidates
        .map(|c| (strsim::damerau_levenshtein(&w, &c.to_lowercase()), c))
        .filter(|(d, c)| *d <= 2.max(c.chars().count() / 4) && *d < c.chars().count())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// " (did you mean \"x\"?)" for a wrong reference, or the names there are
/// when there are few, so the admin sees what would fit.
pub fn hint_for(wrong: &str, names: &[&str]) -> String {
    if let Some(c) = closest(wrong, names.iter().copied()) {
        return format!("; did you mean {c:?}?");
    }
    match names.len() {
        0 => String::new(),
        1..=6 => format!(
            "; the names are {}",
            names
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => String::new(),
    }
}

/// The top level of the file.
#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    pub server: Option<Spanned<RawServer>>,
    pub default_customer: Option<Spanned<RawCustomer>>,
    #[serde(default)]
    pub reseller: Vec<Spanned<RawReseller>>,
    #[serde(default)]
    pub customer: Vec<Spanned<RawCustomer>>,
    #[serde(default)]
    pub client: Vec<Spanned<RawClient>>,
    #[serde(default)]
    pub include: Vec<Spanned<RawInclude>>,
}

/// `[[include]]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawInclude {
    pub path: Option<Spanned<String>>,
    pub reseller: Option<Spanned<String>>,
}

/// `[server]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawServer {
    pub listen: Option<Spanned<Vec<Spanned<String>>>>,
    pub state_dir: Option<Spanned<String>>,
    pub state: Option<Spanned<String>>,
    pub timezone: Option<Spanned<String>>,
    pub total_space: Option<Spanned<SizeValue>>,
    pub max_connections: Option<Spanned<i64>>,
    pub hello_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub shutdown_grace: Option<Spanned<String>>,
    pub max_frame: Option<Spanned<SizeValue>>,
    pub metrics_listen: Option<Spanned<String>>,
    pub tls: Option<Spanned<RawTls>>,
    pub mcal: Option<Spanned<RawMcal>>,
    pub throttle: Option<Spanned<RawThrottle>>,
    pub aggregate: Option<Spanned<RawAggregate>>,
    pub email: Option<Spanned<RawEmail>>,
    pub limits: Option<Spanned<RawLimits>>,
    pub retention: Option<Spanned<RawRetention>>,
    pub cluster: Option<Spanned<RawCluster>>,
    pub web: Option<Spanned<RawWeb>>,
}

/// `[server.web]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawWeb {
    pub listen: Option<Spanned<String>>,
    pub public_url: Option<Spanned<String>>,
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub admin: Option<Spanned<RawWebAccess>>,
    pub session_idle: Option<Spanned<String>>,
}

/// `[server.cluster]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawCluster {
    pub node: Option<Spanned<String>>,
    pub nodes: Option<Spanned<i64>>,
    pub lease: Option<Spanned<String>>,
}

/// `[server.limits]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawLimits {
    pub hello_max_frame: Option<Spanned<SizeValue>>,
    pub handshakes: Option<Spanned<i64>>,
    pub per_source_connections: Option<Spanned<i64>>,
    pub max_sessions_per_client: Option<Spanned<i64>>,
    pub max_file_size: Option<Spanned<SizeValue>>,
    pub registrations_per_minute: Option<Spanned<i64>>,
    pub penalties: Option<Spanned<RawPenalties>>,
}

/// `[server.limits.penalties]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawPenalties {
    pub auth_failed: Option<Spanned<String>>,
    pub bad_hello: Option<Spanned<String>>,
    pub no_hello: Option<Spanned<String>>,
    pub min: Option<Spanned<String>>,
    pub max: Option<Spanned<String>>,
    pub exempt: Option<Spanned<Vec<Spanned<String>>>>,
    pub max_sources: Option<Spanned<i64>>,
    pub overflow: Option<Spanned<String>>,
}

/// `[server.retention]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawRetention {
    pub refusals: Option<Spanned<String>>,
    pub sessions: Option<Spanned<String>>,
    pub client_events: Option<Spanned<String>>,
    pub sent_mail: Option<Spanned<String>>,
    pub usage: Option<Spanned<String>>,
    pub audit: Option<Spanned<String>>,
}

/// `[server.tls]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawTls {
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub client_ca: Option<Spanned<String>>,
    pub require_client_cert: Option<Spanned<bool>>,
}

/// `[server.mcal]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawMcal {
    pub pool: Option<Spanned<i64>>,
    pub cost: Option<Spanned<RawCost>>,
}

/// `[server.mcal].cost`.
#[derive(Debug, Default, Deserialize)]
pub struct RawCost {
    pub desktop: Option<Spanned<i64>>,
    pub laptop: Option<Spanned<i64>>,
    pub server: Option<Spanned<i64>>,
}

/// `[server.email]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawEmail {
    pub report_interval: Option<Spanned<String>>,
    pub from: Option<Spanned<String>>,
    pub admin: Option<Spanned<String>>,
    pub smtp: Option<Spanned<String>>,
    pub spool: Option<Spanned<String>>,
}

/// A throttle: the string `"inherit"` or a table.
#[derive(Debug)]
pub enum RawThrottle {
    /// Any string; only "inherit" is valid.
    Word(String),
    /// `{ enabled, rate, hours, weekends_unthrottled }`.
    Table(RawThrottleTable),
}

/// The table form of a throttle.
#[derive(Debug, Default, Deserialize)]
pub struct RawThrottleTable {
    pub enabled: Option<Spanned<bool>>,
    pub rate: Option<Spanned<RateValue>>,
    pub hours: Option<Spanned<String>>,
    pub weekends_unthrottled: Option<Spanned<bool>>,
}

impl<'de> Deserialize<'de> for RawThrottle {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawThrottle;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "\"inherit\" or a table such as { enabled = true, rate = \"20 MiB/s\" }",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawThrottle, E> {
                Ok(RawThrottle::Word(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawThrottle, A::Error> {
                RawThrottleTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawThrottle::Table)
            }
        }
        d.deserialize_any(V)
    }
}

/// `aggregate = { rate, hours, weekends_unthrottled }`.
#[derive(Debug, Default, Deserialize)]
pub struct RawAggregate {
    pub rate: Option<Spanned<RateValue>>,
    pub hours: Option<Spanned<String>>,
    pub weekends_unthrottled: Option<Spanned<bool>>,
}

/// `[[reseller]]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawReseller {
    pub name: Option<Spanned<String>>,
    pub email: Option<Spanned<String>>,
    pub space: Option<Spanned<SizeValue>>,
    pub activated: Option<Spanned<bool>>,
    pub email_reports: Option<Spanned<bool>>,
    pub mcal_limit: Option<Spanned<LimitValue>>,
    pub throttle: Option<Spanned<RawThrottle>>,
    pub aggregate: Option<Spanned<RawAggregate>>,
    pub web_access: Option<Spanned<RawWebAccess>>,
}

/// `[[customer]]` and `[default_customer]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawCustomer {
    pub name: Option<Spanned<String>>,
    pub reseller: Option<Spanned<String>>,
    pub email: Option<Spanned<String>>,
    pub address: Option<Spanned<String>>,
    pub city: Option<Spanned<String>>,
    pub phone: Option<Spanned<String>>,
    pub fax: Option<Spanned<String>>,
    pub notes: Option<Spanned<String>>,
    pub backup_location: Option<Spanned<String>>,
    pub space: Option<Spanned<SizeValue>>,
    pub auto_add_clients: Option<Spanned<bool>>,
    pub enroll_key: Option<Spanned<String>>,
    pub email_reports: Option<Spanned<bool>>,
    pub web_access: Option<Spanned<RawWebAccess>>,
    pub mcal_limit: Option<Spanned<LimitValue>>,
    pub activated: Option<Spanned<bool>>,
    pub max_clients: Option<Spanned<i64>>,
    pub throttle: Option<Spanned<RawThrottle>>,
    pub aggregate: Option<Spanned<RawAggregate>>,
    pub consolidated_report: Option<Spanned<RawReport>>,
    pub send_account_details: Option<Spanned<bool>>,
}

/// `web_access = { username, password }`. CONFIG.md's Additions write
/// `user`; its first example writes `username`. Both are accepted.
#[derive(Debug, Default, Deserialize)]
pub struct RawWebAccess {
    #[serde(alias = "user")]
    pub username: Option<Spanned<String>>,
    pub password: Option<Spanned<String>>,
}

/// `consolidated_report = { recipients, frequency }`.
#[derive(Debug, Default, Deserialize)]
pub struct RawReport {
    pub recipients: Option<Spanned<Vec<Spanned<String>>>>,
    pub frequency: Option<Spanned<String>>,
}

/// `[[client]]`.
#[derive(Debug, Default, Deserialize)]
pub struct RawClient {
    pub id: Option<Spanned<String>>,
    pub customer: Option<Spanned<String>>,
    pub kind: Option<Spanned<String>>,
    pub space: Option<Spanned<SizeValue>>,
    pub throttle: Option<Spanned<RawThrottle>>,
    pub schedules: Option<Spanned<BTreeMap<String, Spanned<RawSchedule>>>>,
}

/// `schedules.<name> = { throttle = … }`.
#[derive(Debug, Default, Deserialize)]
pub struct RawSchedule {
    pub throttle: Option<Spanned<RawThrottle>>,
}

/// A size: a TOML integer (bytes) or a string with a unit.
#[derive(Debug, Clone)]
pub enum SizeValue {
    /// Integer bytes, possibly negative (refused later).
    Int(i64),
    /// `"500 GiB"`.
    Text(String),
}

/// A rate: must be a string with a unit, but a bare number is read so that
/// it can be refused with a hint instead of a type error.
#[derive(Debug, Clone)]
pub enum RateValue {
    /// A bare number; always refused.
    Number(String),
    /// `"20 MiB/s"`.
    Text(String),
}

/// `mcal_limit`: `"auto"` or an integer.
#[derive(Debug, Clone)]
pub enum LimitValue {
    /// An integer, possibly negative (refused later).
    Int(i64),
    /// Any string; only "auto" is valid.
    Text(String),
}

macro_rules! int_or_text {
    ($ty:ident, $int:expr, $text:expr, $expect:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expect)
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$ty, E> {
                        Ok(($int)(v))
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$ty, E> {
                        Ok(($int)(i64::try_from(v).unwrap_or(i64::MAX)))
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        Ok(($text)(v.to_string()))
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

int_or_text!(
    SizeValue,
    SizeValue::Int,
    SizeValue::Text,
    "a size: integer bytes or a string such as \"500 GiB\""
);
int_or_text!(
    LimitValue,
    LimitValue::Int,
    LimitValue::Text,
    "\"auto\" or a whole number of MCALs"
);
int_or_text!(
    RateValue,
    |v: i64| RateValue::Number(v.to_string()),
    RateValue::Text,
    "a rate with a unit, such as \"20 MiB/s\" or \"100 Mbit/s\""
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_every_unknown_key_with_its_span() {
        let src = "[server]\nlisten = [\"127.0.0.1:1\"]\nlisen = 1\n\n[[customer]]\nname = \"a\"\nthrottle = { enabled = true, rte = \"1 MB/s\" }\ncolour = \"red\"\n";
        let Ok(Parsed {
            raw, mut unknown, ..
        }) = parse(src)
        else {
            panic!("parses")
        };
        assert_eq!(raw.customer.len(), 1);
        unknown.sort_by_key(|p| locate(src, p).map(|(s, _)| s.start));
        let k = |s: &str| Seg::Key(s.into());
        assert_eq!(
            unknown,
            vec![
                vec![k("server"), k("lisen")],
                vec![k("customer"), Seg::Index(0), k("throttle"), k("rte")],
                vec![k("customer"), Seg::Index(0), k("colour")],
            ]
        );
        let (span, label) = locate(src, &unknown[1]).unwrap();
        assert_eq!(
            (&src[span], label.as_str()),
            ("rte", "customer[a].throttle.rte")
        );
        let (span, label) = locate(src, &unknown[2]).unwrap();
        assert_eq!(
            (&src[span], label.as_str()),
            ("colour", "customer[a].colour")
        );
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggest("lisen"), Some("listen"));
        assert_eq!(suggest("email_report"), Some("email_reports"));
        assert_eq!(suggest("rte"), Some("rate"));
        assert_eq!(suggest("colour"), None);
    }
}
