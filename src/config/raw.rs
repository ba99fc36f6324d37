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

/// Parses `src`, returning the raw document and the paths of unknown keys.
pub fn parse(src: &str) -> Result<(RawConfig, Vec<Vec<Seg>>), toml::de::Error> {
    let mut unknown = Vec::new();
    let de = toml::de::Deserializer::parse(src)?;
    let raw = serde_ignored::deserialize(de, |path| unknown.push(segments(&path)))?;
    Ok((raw, unknown))
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
    "password",
    "max_clients",
    "consolidated_report",
    "recipients",
    "frequency",
    "id",
    "kind",
    "schedules",
];

/// The known key closest to `unknown`, if it is a plausible typo.
pub fn suggest(unknown: &str) -> Option<&'static str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1];
            for (j, cb) in b.iter().enumerate() {
                let sub = prev[j] + usize::from(ca != *cb);
                cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
            }
            prev = cur;
        }
        prev[b.len()]
    }
    KNOWN_KEYS
        .iter()
        .map(|k| (distance(unknown, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4) && *d < k.len())
        .min()
        .map(|(_, k)| k)
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
}

/// `web_access = { username, password }`.
#[derive(Debug, Default, Deserialize)]
pub struct RawWebAccess {
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
        let (raw, mut unknown) = parse(src).unwrap();
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
