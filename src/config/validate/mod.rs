//! Every validation rule of CONFIG.md, applied to the raw document. All
//! problems are collected, each with its rule, location, key path and a
//! sentence saying what would be right; a [`Config`] is built only when
//! there are none.

use super::raw::{
    self, LimitValue, RateValue, RawAggregate, RawConfig, RawCustomer, RawThrottle, SizeValue,
};
use super::units;
use super::*;
use std::collections::hash_map::Entry;
use std::ops::Range;
use toml::Spanned;

mod includes;
mod limits;
mod locations;
mod web;

/// The rule a [`ConfigError`] breaks; each has a fixture in
/// `tests/fixtures/config/invalid/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// The file is not TOML, or a value has the wrong TOML type.
    Syntax,
    /// A key that the format does not have.
    UnknownKey,
    /// A required field is missing.
    Required,
    /// A name that refers to nothing.
    Reference,
    /// A name or id used twice.
    Duplicate,
    /// "Default Customer" used for a `[[customer]]`.
    ReservedName,
    /// A key that is not allowed where it stands.
    NotAllowed,
    /// A client id or schedule name of the wrong shape.
    Identifier,
    /// A size that does not parse.
    Size,
    /// A rate that does not parse, lacks a unit, or is 0.
    Rate,
    /// A duration that does not parse or is 0.
    Duration,
    /// An hours value that does not parse.
    Hours,
    /// A number outside its allowed range.
    Range,
    /// A `backup_location` that is not absolute.
    AbsolutePath,
    /// Children allotted more space than their parent has.
    SpaceOverAllocated,
    /// A space missing under a parent that has one.
    SpaceMissing,
    /// More declared clients than `max_clients`.
    ClientLimit,
    /// A plaintext value where a PHC hash belongs.
    PlaintextSecret,
    /// An `mcal_limit` that is neither "auto" nor an integer ≥ 0.
    McalLimit,
    /// A report frequency other than daily, weekly or monthly.
    Frequency,
    /// A malformed e-mail address.
    Email,
    /// An unknown IANA time zone.
    Timezone,
    /// A socket address that does not parse.
    Address,
    /// A `state` URL of an unknown kind.
    StateUrl,
    /// Inconsistent TLS settings.
    Tls,
    /// A client kind other than desktop, laptop or server.
    Kind,
    /// An SMTP URL of the wrong form.
    Smtp,
    /// A throttle that is neither "inherit" nor a complete table.
    Throttle,
    /// `[server.limits]` values that contradict each other or the protocol.
    Limits,
    /// Backup locations that are equal, nested, or inside `state_dir`.
    Overlap,
    /// An `[[include]]` whose files cannot be read, or an included file
    /// holding what only the main file may, or another reseller's
    /// customer or client.
    Include,
    /// A network in `penalties.exempt` that does not parse.
    Cidr,
}

impl Rule {
    /// Every rule, for tests that prove each has a fixture.
    pub const ALL: [Rule; 32] = [
        Rule::Syntax,
        Rule::UnknownKey,
        Rule::Required,
        Rule::Reference,
        Rule::Duplicate,
        Rule::ReservedName,
        Rule::NotAllowed,
        Rule::Identifier,
        Rule::Size,
        Rule::Rate,
        Rule::Duration,
        Rule::Hours,
        Rule::Range,
        Rule::AbsolutePath,
        Rule::SpaceOverAllocated,
        Rule::SpaceMissing,
        Rule::ClientLimit,
        Rule::PlaintextSecret,
        Rule::McalLimit,
        Rule::Frequency,
        Rule::Email,
        Rule::Timezone,
        Rule::Address,
        Rule::StateUrl,
        Rule::Tls,
        Rule::Kind,
        Rule::Smtp,
        Rule::Throttle,
        Rule::Limits,
        Rule::Cidr,
        Rule::Overlap,
        Rule::Include,
    ];

    /// A stable kebab-case name, used in `--json` output and fixtures.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Syntax => "syntax",
            Rule::UnknownKey => "unknown-key",
            Rule::Required => "required",
            Rule::Reference => "reference",
            Rule::Duplicate => "duplicate",
            Rule::ReservedName => "reserved-name",
            Rule::NotAllowed => "not-allowed",
            Rule::Identifier => "identifier",
            Rule::Size => "size",
            Rule::Rate => "rate",
            Rule::Duration => "duration",
            Rule::Hours => "hours",
            Rule::Range => "range",
            Rule::AbsolutePath => "absolute-path",
            Rule::SpaceOverAllocated => "space-over-allocated",
            Rule::SpaceMissing => "space-missing",
            Rule::ClientLimit => "client-limit",
            Rule::PlaintextSecret => "plaintext-secret",
            Rule::McalLimit => "mcal-limit",
            Rule::Frequency => "frequency",
            Rule::Email => "email",
            Rule::Timezone => "timezone",
            Rule::Address => "address",
            Rule::StateUrl => "state-url",
            Rule::Tls => "tls",
            Rule::Kind => "kind",
            Rule::Smtp => "smtp",
            Rule::Throttle => "throttle",
            Rule::Limits => "limits",
            Rule::Cidr => "cidr",
            Rule::Overlap => "overlap",
            Rule::Include => "include",
        }
    }
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Which rule it breaks.
    pub rule: Rule,
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// Dotted key path, e.g. `customer[Contoso].space`.
    pub key: String,
    /// What is wrong and what would be right. Never contains a secret.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.key,
            self.message
        )
    }
}

struct V<'a> {
    src: &'a str,
    file: &'a Path,
    dir: PathBuf,
    errors: Vec<ConfigError>,
    /// Where each part of `src` came from (the main file, then included
    /// files); a single segment for a file without includes.
    segments: Vec<super::include::Segment>,
    /// The main file's includes, by index.
    includes: Vec<super::include::Include>,
}

type Sp<T> = Option<Spanned<T>>;

impl V<'_> {
    /// A `reseller` naming no `[[reseller]]` (of `resellers`), with a hint.
    fn no_reseller(
        &mut self,
        name: &Spanned<String>,
        key: impl fmt::Display,
        resellers: &[Reseller],
    ) {
        let names: Vec<&str> = resellers.iter().map(|r| r.name.as_str()).collect();
        self.err(
            Rule::Reference,
            name.span(),
            key,
            format!(
                "no [[reseller]] is named {:?}{}",
                name.get_ref(),
                raw::hint_for(name.get_ref(), &names)
            ),
        );
    }

    fn err(
        &mut self,
        rule: Rule,
        span: Range<usize>,
        key: impl fmt::Display,
        msg: impl Into<String>,
    ) {
        let key = key.to_string();
        // One problem per key: a value already reported as invalid (or of
        // the wrong type, and so set aside) does not also count as missing.
        let secondary = |e: &ConfigError| {
            e.key == key
                && (e.rule == Rule::Syntax || matches!(rule, Rule::Required | Rule::SpaceMissing))
        };
        if key != "(document)" && self.errors.iter().any(secondary) {
            return;
        }
        let at = span.start.min(self.src.len());
        let (file, line, column) = match super::include::segment_of(&self.segments, at) {
            Some(seg) if self.segments.len() > 1 => {
                let (line, column) = line_col(&self.src[seg.start..], at - seg.start);
                (seg.file.clone(), line, column)
            }
            _ => {
                let (line, column) = line_col(self.src, at);
                (self.file.to_path_buf(), line, column)
            }
        };
        self.errors.push(ConfigError {
            rule,
            file,
            line,
            column,
            key,
            message: msg.into(),
        });
    }

    fn string(&mut self, v: &Sp<String>) -> Option<String> {
        v.as_ref().map(|s| s.get_ref().clone())
    }

    fn bool(&mut self, v: &Sp<bool>, default: bool) -> bool {
        v_bool(v, default)
    }

    fn required<'v, T>(
        &mut self,
        v: &'v Sp<T>,
        parent: Range<usize>,
        key: impl fmt::Display + Copy,
        what: &str,
    ) -> Option<&'v Spanned<T>> {
        if v.is_none() {
            self.err(Rule::Required, parent, key, format!("{what} is required"));
        }
        v.as_ref()
    }

    fn size(&mut self, v: &Sp<SizeValue>, key: impl fmt::Display + Copy) -> Option<u64> {
        let v = v.as_ref()?;
        match v.get_ref() {
            SizeValue::Int(n) if *n >= 0 => Some(*n as u64),
            SizeValue::Int(n) => {
                self.err(
                    Rule::Size,
                    v.span(),
                    key,
                    format!("{n} is negative; a size is ≥ 0 bytes"),
                );
                None
            }
            SizeValue::Text(s) => match units::parse_size(s) {
                Ok(b) => Some(b),
                Err(e) => {
                    self.err(Rule::Size, v.span(), key, e);
                    None
                }
            },
        }
    }

    fn rate(
        &mut self,
        v: &RateValue,
        span: Range<usize>,
        key: impl fmt::Display + Copy,
    ) -> Option<u64> {
        let parsed = match v {
            RateValue::Number(n) => Err(units::bare_rate_message(n)),
            RateValue::Text(s) => units::parse_rate(s),
        };
        match parsed {
            Ok(0) => {
                self.err(
                    Rule::Rate,
                    span,
                    key,
                    "a rate must be greater than 0; to lift the limit write enabled = false",
                );
                None
            }
            Ok(r) => Some(r),
            Err(e) => {
                self.err(Rule::Rate, span, key, e);
                None
            }
        }
    }

    fn duration(
        &mut self,
        v: &Sp<String>,
        key: impl fmt::Display + Copy,
        default: Duration,
    ) -> Duration {
        let Some(v) = v else { return default };
        match units::parse_duration(v.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.err(Rule::Duration, v.span(), key, "must be longer than 0");
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.err(Rule::Duration, v.span(), key, e);
                default
            }
        }
    }

    fn hours(
        &mut self,
        v: Option<&str>,
        span: Range<usize>,
        key: impl fmt::Display + Copy,
    ) -> Hours {
        match v.map(units::parse_hours) {
            None => Hours::Always,
            Some(Ok(h)) => h,
            Some(Err(e)) => {
                self.err(Rule::Hours, span, key, e);
                Hours::Always
            }
        }
    }

    fn count(
        &mut self,
        v: &Sp<i64>,
        key: impl fmt::Display + Copy,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<i64> {
        let v = v.as_ref()?;
        let n = *v.get_ref();
        if !range.contains(&n) {
            self.err(
                Rule::Range,
                v.span(),
                key,
                format!(
                    "{n} is out of range; use a whole number from {} to {}",
                    range.start(),
                    range.end()
                ),
            );
            return None;
        }
        Some(n)
    }

    fn email(&mut self, v: &Spanned<String>, key: impl fmt::Display + Copy) -> Option<String> {
        let s = v.get_ref();
        if is_valid_email(s) {
            Some(s.clone())
        } else {
            self.err(
                Rule::Email,
                v.span(),
                key,
                format!("{s:?} is not an e-mail address; write e.g. \"it@example.com\""),
            );
            None
        }
    }

    /// An `IP:PORT` address; `example` shows the form in the message.
    fn address(&mut self, v: &Spanned<String>, key: &str, example: &str) -> Option<SocketAddr> {
        match v.get_ref().parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.err(
                    Rule::Address,
                    v.span(),
                    key,
                    format!(
                        "{:?} is not an address; write IP:PORT, e.g. \"{example}\"",
                        v.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn phc(&mut self, v: &Spanned<String>, key: impl fmt::Display + Copy) -> Option<PhcHash> {
        let s = v.get_ref();
        match argon2::PasswordHash::new(s) {
            Ok(h) if h.algorithm.as_str().starts_with("argon2") && h.hash.is_some() => {
                Some(PhcHash::new(s.clone()))
            }
            // The value is never echoed: it may be a plaintext secret.
            _ => {
                self.err(
                    Rule::PlaintextSecret,
                    v.span(),
                    key,
                    "must be an argon2 PHC hash string, not the secret itself; run `tollgate hash-secret` and paste what it prints",
                );
                None
            }
        }
    }

    /// Resolves a path relative to the config file's directory.
    fn path(&self, s: &str) -> PathBuf {
        normalize(&self.dir.join(s))
    }

    fn throttle(&mut self, v: &Sp<RawThrottle>, key: impl fmt::Display + Copy) -> ThrottleSetting {
        let Some(v) = v else {
            return ThrottleSetting::Inherit;
        };
        let span = v.span();
        match v.get_ref() {
            RawThrottle::Word(w) if w == "inherit" => ThrottleSetting::Inherit,
            RawThrottle::Word(w) => {
                self.err(
                    Rule::Throttle,
                    span,
                    key,
                    format!("{w:?} is not a throttle; write \"inherit\" or a table such as {{ enabled = true, rate = \"20 MiB/s\" }}"),
                );
                ThrottleSetting::Inherit
            }
            RawThrottle::Table(t) => {
                let enabled = v_bool(&t.enabled, true);
                let rate_key = K(&key, "rate");
                let rate = t
                    .rate
                    .as_ref()
                    .and_then(|r| self.rate(r.get_ref(), r.span(), rate_key));
                if enabled && t.rate.is_none() {
                    self.err(
                        Rule::Throttle,
                        span,
                        rate_key,
                        "an enabled throttle needs a rate, e.g. rate = \"20 MiB/s\"; or write enabled = false",
                    );
                }
                let hours = match &t.hours {
                    Some(h) => self.hours(Some(h.get_ref()), h.span(), K(&key, "hours")),
                    None => Hours::Always,
                };
                ThrottleSetting::Explicit(Throttle {
                    enabled,
                    rate,
                    hours,
                    weekends_unthrottled: v_bool(&t.weekends_unthrottled, false),
                })
            }
        }
    }

    fn aggregate(
        &mut self,
        v: &Sp<RawAggregate>,
        key: impl fmt::Display + Copy,
    ) -> Option<Aggregate> {
        let v = v.as_ref()?;
        let a = v.get_ref();
        let rate = match self.required(&a.rate, v.span(), K(&key, "rate"), "an aggregate's rate") {
            Some(r) => self.rate(r.get_ref(), r.span(), K(&key, "rate")),
            None => None,
        };
        let hours = match &a.hours {
            Some(h) => self.hours(Some(h.get_ref()), h.span(), K(&key, "hours")),
            None => Hours::Always,
        };
        Some(Aggregate {
            rate: rate?,
            hours,
            weekends_unthrottled: self.bool(&a.weekends_unthrottled, false),
        })
    }

    fn mcal_limit(&mut self, v: &Sp<LimitValue>, key: impl fmt::Display + Copy) -> McalLimit {
        let Some(v) = v else { return McalLimit::Auto };
        match v.get_ref() {
            LimitValue::Int(n) if *n >= 0 => McalLimit::Fixed(*n as u64),
            LimitValue::Text(s) if s == "auto" => McalLimit::Auto,
            other => {
                let shown = match other {
                    LimitValue::Int(n) => n.to_string(),
                    LimitValue::Text(s) => format!("{s:?}"),
                };
                self.err(
                    Rule::McalLimit,
                    v.span(),
                    key,
                    format!("{shown} is not an MCAL limit; write \"auto\" or a whole number ≥ 0"),
                );
                McalLimit::Auto
            }
        }
    }
}

fn v_bool(v: &Sp<bool>, default: bool) -> bool {
    v.as_ref().map_or(default, |b| *b.get_ref())
}

/// A key path built only when an error needs it: `parent.field`.
#[derive(Clone, Copy)]
struct K<D>(D, &'static str);

impl<D: fmt::Display> fmt::Display for K<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// 1-based line and column (in characters) of byte offset `at`.
pub(crate) fn line_col(src: &str, at: usize) -> (usize, usize) {
    let at = at.min(src.len());
    let before = &src[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, src[line_start..at].chars().count() + 1)
}

/// The Default Customer's `backup_location` when the file names none:
/// `<state_dir>-backup/default`, beside `state_dir` and never inside it.
pub(crate) fn default_location(state_dir: &Path) -> PathBuf {
    let name = state_dir
        .file_name()
        .map(|n| format!("{}-backup", n.to_string_lossy()))
        .unwrap_or_else(|| "tollgate-backup".into());
    let parent = state_dir.parent().unwrap_or(Path::new("/"));
    normalize(&parent.join(name).join("default"))
}

/// Folds `.` and `..` without touching the file system.
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// A pragmatic check of `local@domain` (RFC 5321 shape, no comments or quotes).
pub(crate) fn is_valid_email(s: &str) -> bool {
    let Some((local, domain)) = s.rsplit_once('@') else {
        return false;
    };
    let local_ok = (1..=64).contains(&local.len())
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~.-".contains(&b));
    let domain_ok = (1..=253).contains(&domain.len())
        && domain.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    local_ok && domain_ok
}

/// A display label for the n-th table of an array, by name when it has one.
fn label(kind: &str, name: Option<&Spanned<String>>, index: usize) -> String {
    match name {
        Some(n) => format!("{kind}[{}]", n.get_ref()),
        None => format!("{kind}[#{}]", index + 1),
    }
}

pub(super) fn validate(src: &str, file: &Path) -> Result<Config, Vec<ConfigError>> {
    validate_assembled(src, file, Vec::new(), Vec::new(), Vec::new())
}

/// Validates `src`, the main file with its included files appended
/// (`include::assemble`): `segments` say where each part came from,
/// `errors` are those already found in the included files on their own.
pub(super) fn validate_assembled(
    src: &str,
    file: &Path,
    segments: Vec<super::include::Segment>,
    includes: Vec<super::include::Include>,
    errors: Vec<ConfigError>,
) -> Result<Config, Vec<ConfigError>> {
    let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut v = V {
        src,
        file,
        dir,
        errors,
        segments,
        includes,
    };
    let parsed = raw::parse(src);
    let type_errors = match &parsed {
        Ok(p) => &p.type_errors,
        Err((_, t)) => t,
    };
    for t in type_errors {
        v.err(
            Rule::Syntax,
            t.span.clone(),
            &t.key,
            type_message(&t.message),
        );
    }
    let (doc, unknown) = match parsed {
        Ok(p) => (p.raw, p.unknown),
        Err((e, _)) => {
            let span = e.span().unwrap_or(0..0);
            let (key, message) = syntax_message(src, span.clone(), e.message().trim());
            v.err(Rule::Syntax, span, key, message);
            v.errors.sort_by_key(|e| (e.line, e.column));
            return Err(v.errors);
        }
    };
    for path in unknown {
        let last = match path.last() {
            Some(raw::Seg::Key(k)) => k.clone(),
            _ => String::new(),
        };
        let (span, key) = raw::locate(src, &path).unwrap_or((0..0, last.clone()));
        let hint = match raw::suggest(&last) {
            Some(k) => format!("did you mean `{k}`?"),
            None => "see docs/configuration.md for the keys this table takes".to_string(),
        };
        v.err(
            Rule::UnknownKey,
            span,
            key,
            format!("unknown key `{last}` ({hint}); a misspelt key must not silently do nothing"),
        );
    }
    let config = build(&mut v, &doc).map(|mut c| {
        c.includes = v.includes.clone();
        c
    });
    if v.errors.is_empty() {
        Ok(config.expect("a config is built whenever no error was recorded"))
    } else {
        v.errors.sort_by_key(|e| (e.line, e.column));
        Err(v.errors)
    }
}

/// serde's "invalid type: string \"2\", expected i64", in the file's terms.
fn type_message(m: &str) -> String {
    let Some(rest) = m.strip_prefix("invalid type: ") else {
        return m.to_string();
    };
    let Some((found, expected)) = rest.split_once(", expected ") else {
        return m.to_string();
    };
    let expected = match expected {
        "i64" | "u64" | "u32" | "i32" | "an integer" => "a whole number (no quotes)",
        "a boolean" => "true or false (no quotes)",
        "a string" => "a quoted string",
        "a sequence" => "an array, e.g. [\"…\"]",
        other => other,
    };
    format!("expected {expected}, found {found}; the value is ignored while the rest is checked")
}

/// A TOML syntax error's key and message; a duplicate key is named, with
/// the line of its first definition.
fn syntax_message(src: &str, span: Range<usize>, m: &str) -> (String, String) {
    if m.starts_with("duplicate key") {
        let name = src.get(span.clone()).unwrap_or("").trim();
        // The table it sits in: the one of the entry just before it, unless
        // a header comes between them.
        let entries = raw::all_entries(src);
        let prev = entries
            .iter()
            .filter(|(r, _)| r.end <= span.start)
            .max_by_key(|(r, _)| r.end);
        let header = src[..span.start]
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
        let between = |from: usize| {
            src[from..span.start]
                .lines()
                .any(|l| l.trim().starts_with('['))
        };
        let table = match (prev, header) {
            (Some((r, k)), _) if !between(r.end) => k.rsplit_once('.').map(|(t, _)| t.to_string()),
            (_, h) => h,
        };
        let key = match &table {
            Some(t) => format!("{t}.{name}"),
            None => name.to_string(),
        };
        let first = entries
            .iter()
            .find(|(r, k)| *k == key && r.start < span.start)
            .map(|(r, _)| (r.start, ()));
        let message = match first {
            Some((at, _)) => format!(
                "duplicate key `{name}`: it is already set on line {}; keep one",
                line_col(src, at).0
            ),
            None => format!("duplicate key `{name}`; keep one"),
        };
        return (key, message);
    }
    ("(document)".to_string(), m.to_string())
}

fn build(v: &mut V<'_>, doc: &RawConfig) -> Option<Config> {
    let server = server(v, doc);
    let mut resellers = Vec::new();
    let mut reseller_by_name: HashMap<String, ResellerId> = HashMap::new();
    for (i, r) in doc.reseller.iter().enumerate() {
        let key = label("reseller", r.get_ref().name.as_ref(), i);
        let raw = r.get_ref();
        let name = v
            .required(&raw.name, r.span(), K(&key, "name"), "a reseller's name")
            .map(|n| n.get_ref().clone());
        if let (Some(n), Some(sp)) = (&name, &raw.name) {
            if reseller_by_name.contains_key(n) {
                v.err(
                    Rule::Duplicate,
                    sp.span(),
                    K(&key, "name"),
                    format!("reseller {n:?} is defined twice; names must be unique"),
                );
            } else {
                reseller_by_name.insert(n.clone(), ResellerId(resellers.len() as u32));
            }
        }
        let email = raw
            .email
            .as_ref()
            .and_then(|e| v.email(e, K(&key, "email")));
        let email_reports = v.bool(&raw.email_reports, false);
        if email_reports && raw.email.is_none() {
            v.err(
                Rule::Required,
                r.span(),
                K(&key, "email"),
                "email is required when email_reports = true",
            );
        }
        resellers.push(Reseller {
            name: name.unwrap_or_default(),
            email,
            space: v.size(&raw.space, K(&key, "space")),
            activated: v.bool(&raw.activated, true),
            email_reports,
            mcal_limit: v.mcal_limit(&raw.mcal_limit, K(&key, "mcal_limit")),
            throttle: v.throttle(&raw.throttle, K(&key, "throttle")),
            aggregate: v.aggregate(&raw.aggregate, K(&key, "aggregate")),
            web_access: raw
                .web_access
                .as_ref()
                .and_then(|w| web::web_access(v, w, &format!("{key}.web_access"))),
            customers: Vec::new(),
        });
    }

    let default_raw = doc.default_customer.as_ref();
    let empty = RawCustomer::default();
    let (dc, dc_span) = match default_raw {
        Some(d) => (d.get_ref(), d.span()),
        None => (&empty, 0..0),
    };
    for (field, present) in [
        ("name", dc.name.as_ref().map(|s| s.span())),
        ("reseller", dc.reseller.as_ref().map(|s| s.span())),
    ] {
        if let Some(span) = present {
            v.err(
                Rule::NotAllowed,
                span,
                format!("default_customer.{field}"),
                format!(
                    "the Default Customer's {field} is fixed; declare a [[customer]] to use another"
                ),
            );
        }
    }
    let mut customers = vec![customer(
        v,
        dc,
        dc_span.clone(),
        "default_customer",
        None,
        &server,
    )];
    let mut customer_by_name: HashMap<String, CustomerId> = HashMap::new();
    customer_by_name.insert(DEFAULT_CUSTOMER_NAME.to_lowercase(), CustomerId::DEFAULT);
    for (i, c) in doc.customer.iter().enumerate() {
        let raw = c.get_ref();
        let key = label("customer", raw.name.as_ref(), i);
        let id = CustomerId(customers.len() as u32);
        let name = v
            .required(&raw.name, c.span(), K(&key, "name"), "a customer's name")
            .cloned();
        if let Some(n) = &name {
            let lower = n.get_ref().to_lowercase();
            if lower == DEFAULT_CUSTOMER_NAME.to_lowercase() {
                v.err(Rule::ReservedName, n.span(), K(&key, "name"), "\"Default Customer\" is reserved for the built-in customer; configure it under [default_customer]");
            } else if let Entry::Vacant(slot) = customer_by_name.entry(lower) {
                slot.insert(id);
            } else {
                v.err(
                    Rule::Duplicate,
                    n.span(),
                    K(&key, "name"),
                    format!(
                        "customer {:?} is defined twice (names compare case-insensitively)",
                        n.get_ref()
                    ),
                );
            }
        }
        let reseller = match v.required(
            &raw.reseller,
            c.span(),
            K(&key, "reseller"),
            "a customer's reseller",
        ) {
            Some(r) => match reseller_by_name.get(r.get_ref()) {
                Some(&rid) => Some(rid),
                None => {
                    v.no_reseller(r, K(&key, "reseller"), &resellers);
                    None
                }
            },
            None => None,
        };
        if let Some(rid) = reseller {
            resellers[rid.0 as usize].customers.push(id);
        }
        v.required(&raw.email, c.span(), K(&key, "email"), "a customer's email");
        let mut cust = customer(v, raw, c.span(), &key, reseller, &server);
        cust.name = name.map(|n| n.into_inner()).unwrap_or_default();
        customers.push(cust);
    }

    let mut clients = Vec::new();
    let mut client_by_id: HashMap<String, DeclaredClientId> = HashMap::new();
    // Client ids are unique without regard to case (PROTOCOL.md Additions).
    let mut lower_ids: HashMap<String, String> = HashMap::new();
    for (i, c) in doc.client.iter().enumerate() {
        let raw = c.get_ref();
        let key = label("client", raw.id.as_ref(), i);
        let did = DeclaredClientId(clients.len() as u32);
        let id = v
            .required(&raw.id, c.span(), K(&key, "id"), "a client's id")
            .cloned();
        if let Some(idv) = &id {
            let s = idv.get_ref();
            if !is_valid_identifier(s) {
                v.err(Rule::Identifier, idv.span(), K(&key, "id"), format!("{s:?} is not a client id: use 1-64 of A-Z a-z 0-9 . _ -, not starting with '.'"));
            } else if let Some(first) = lower_ids.get(&s.to_ascii_lowercase()) {
                let msg = if first == s {
                    format!("client {s:?} is declared twice")
                } else {
                    format!(
                        "client {s:?} is declared twice: ids ignore letter case, and {first:?} is declared above"
                    )
                };
                v.err(Rule::Duplicate, idv.span(), K(&key, "id"), msg);
            } else {
                lower_ids.insert(s.to_ascii_lowercase(), s.clone());
                client_by_id.insert(s.clone(), did);
            }
        }
        let customer = match v.required(
            &raw.customer,
            c.span(),
            K(&key, "customer"),
            "a client's customer",
        ) {
            Some(n) => match customer_by_name.get(&n.get_ref().to_lowercase()) {
                Some(&cid) => Some(cid),
                None => {
                    let names: Vec<&str> = customers.iter().map(|c| c.name.as_str()).collect();
                    v.err(
                        Rule::Reference,
                        n.span(),
                        K(&key, "customer"),
                        format!(
                            "no customer is named {:?}{}",
                            n.get_ref(),
                            raw::hint_for(n.get_ref(), &names)
                        ),
                    );
                    None
                }
            },
            None => None,
        };
        let kind = match &raw.kind {
            None => Kind::Desktop,
            Some(k) => Kind::parse(k.get_ref()).unwrap_or_else(|| {
                v.err(
                    Rule::Kind,
                    k.span(),
                    K(&key, "kind"),
                    format!(
                        "{:?} is not a kind; use desktop, laptop or server",
                        k.get_ref()
                    ),
                );
                Kind::Desktop
            }),
        };
        let mut schedules = BTreeMap::new();
        if let Some(s) = &raw.schedules {
            for (name, sched) in s.get_ref() {
                let skey = format!("{key}.schedules.{name}");
                if !is_valid_identifier(name) {
                    v.err(Rule::Identifier, sched.span(), skey.clone(), format!("{name:?} is not a schedule name: use 1-64 of A-Z a-z 0-9 . _ -, not starting with '.'"));
                }
                let t = v.throttle(&sched.get_ref().throttle, K(&skey, "throttle"));
                schedules.insert(name.clone(), t);
            }
        }
        if let Some(cid) = customer {
            customers[cid.0 as usize].clients.push(did);
        }
        clients.push(ClientDecl {
            id: id.map(|i| i.into_inner()).unwrap_or_default(),
            customer: customer.unwrap_or(CustomerId::DEFAULT),
            kind,
            space: v.size(&raw.space, K(&key, "space")),
            throttle: v.throttle(&raw.throttle, K(&key, "throttle")),
            schedules,
        });
    }

    let server = server?;
    let config = Config {
        path: v.file.to_path_buf(),
        source: Source(std::sync::Arc::from(v.src)),
        server,
        resellers,
        customers,
        clients,
        reseller_by_name,
        customer_by_name,
        client_by_id,
        includes: Vec::new(),
    };
    check_nesting(v, doc, &config);
    locations::check_locations(v, doc, &config);
    web::check_logins(v, doc);
    includes::check(v, doc, &config);
    Some(config)
}

fn server(v: &mut V<'_>, doc: &RawConfig) -> Option<Server> {
    let default = raw::RawServer::default();
    let (s, span) = match &doc.server {
        Some(s) => (s.get_ref(), s.span()),
        None => (&default, 0..0),
    };
    let mut listen = Vec::new();
    match &s.listen {
        None => listen.push(
            DEFAULT_LISTEN
                .parse()
                .expect("the default listen address parses"),
        ),
        Some(l) if l.get_ref().is_empty() => {
            v.err(
                Rule::Address,
                l.span(),
                "server.listen",
                "needs at least one address, e.g. [\"0.0.0.0:7443\"]",
            );
        }
        Some(l) => {
            for a in l.get_ref() {
                match a.get_ref().parse::<SocketAddr>() {
                    Ok(addr) => listen.push(addr),
                    Err(_) => v.err(Rule::Address, a.span(), "server.listen", format!("{:?} is not an address; write IP:PORT, e.g. \"0.0.0.0:7443\" or \"[::]:7443\"", a.get_ref())),
                }
            }
        }
    }
    let metrics_listen = s
        .metrics_listen
        .as_ref()
        .and_then(|a| v.address(a, "server.metrics_listen", "127.0.0.1:9464"));
    let state = match &s.state {
        None => Some(StateUrl::Sqlite(PathBuf::from(
            DEFAULT_STATE.trim_start_matches("sqlite://"),
        ))),
        Some(u) => {
            let url = u.get_ref();
            if let Some(p) = url
                .strip_prefix("sqlite://")
                .or_else(|| url.strip_prefix("sqlite:"))
            {
                let p = p.split('?').next().unwrap_or_default();
                if p.is_empty() || p == ":memory:" {
                    v.err(
                        Rule::StateUrl,
                        u.span(),
                        "server.state",
                        "the state must be a file, e.g. \"sqlite:///var/lib/tollgate/state.db\"",
                    );
                    None
                } else {
                    Some(StateUrl::Sqlite(v.path(p)))
                }
            } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                Some(StateUrl::Postgres(url.clone()))
            } else {
                v.err(
                    Rule::StateUrl,
                    u.span(),
                    "server.state",
                    "use \"sqlite:///path/to/state.db\" or \"postgres://user@host/db\"",
                );
                None
            }
        }
    };
    let state_dir = match (&s.state_dir, &state) {
        (Some(d), _) => v.path(d.get_ref()),
        (None, Some(StateUrl::Sqlite(p))) => p.parent().map(Path::to_path_buf).unwrap_or_default(),
        (None, _) => PathBuf::from("/var/lib/tollgate"),
    };
    let timezone = match &s.timezone {
        None => jiff::tz::TimeZone::system(),
        Some(z) => match jiff::tz::TimeZone::get(z.get_ref()) {
            Ok(tz) => tz,
            Err(_) => {
                v.err(Rule::Timezone, z.span(), "server.timezone", format!("{:?} is not a known IANA time zone; write e.g. \"Europe/Berlin\" or \"UTC\"", z.get_ref()));
                jiff::tz::TimeZone::UTC
            }
        },
    };
    let total_space = v.size(&s.total_space, "server.total_space");
    let max_connections = v
        .count(&s.max_connections, "server.max_connections", 1..=1_000_000)
        .map_or(DEFAULT_MAX_CONNECTIONS, |n| n as u32);
    let hello_timeout = v.duration(
        &s.hello_timeout,
        "server.hello_timeout",
        DEFAULT_HELLO_TIMEOUT,
    );
    let idle_timeout = v.duration(&s.idle_timeout, "server.idle_timeout", DEFAULT_IDLE_TIMEOUT);
    let shutdown_grace = v.duration(
        &s.shutdown_grace,
        "server.shutdown_grace",
        DEFAULT_SHUTDOWN_GRACE,
    );
    let max_frame = match (&s.max_frame, v.size(&s.max_frame, "server.max_frame")) {
        (Some(sp), Some(n)) if !(MIN_MAX_FRAME as u64..=MAX_MAX_FRAME as u64).contains(&n) => {
            v.err(
                Rule::Range,
                sp.span(),
                "server.max_frame",
                format!(
                    "{} is out of range; use 4 KiB to 16 MiB",
                    units::format_size(n)
                ),
            );
            DEFAULT_MAX_FRAME
        }
        (_, Some(n)) => n as u32,
        (_, None) => DEFAULT_MAX_FRAME,
    };

    let mut tls = Tls::default();
    if let Some(t) = &s.tls {
        let r = t.get_ref();
        tls.cert = r.cert.as_ref().map(|p| v.path(p.get_ref()));
        tls.key = r.key.as_ref().map(|p| v.path(p.get_ref()));
        tls.client_ca = r.client_ca.as_ref().map(|p| v.path(p.get_ref()));
        tls.require_client_cert = v.bool(&r.require_client_cert, false);
        if tls.cert.is_some() != tls.key.is_some() {
            v.err(
                Rule::Tls,
                t.span(),
                "server.tls",
                "set both cert and key, or neither (then a self-signed pair is made in state_dir)",
            );
        }
        if tls.require_client_cert && tls.client_ca.is_none() {
            v.err(
                Rule::Tls,
                t.span(),
                "server.tls.require_client_cert",
                "requiring client certificates needs client_ca to verify them",
            );
        }
    }

    let mcal = s.mcal.as_ref().map(|m| {
        let r = m.get_ref();
        let pool = match v.required(&r.pool, m.span(), "server.mcal.pool", "the MCAL pool") {
            Some(_) => v
                .count(&r.pool, "server.mcal.pool", 0..=i64::MAX)
                .unwrap_or(0) as u64,
            None => 0,
        };
        let mut cost = Costs::default();
        if let Some(c) = &r.cost {
            let c = c.get_ref();
            for (field, slot, key) in [
                (&c.desktop, &mut cost.desktop, "server.mcal.cost.desktop"),
                (&c.laptop, &mut cost.laptop, "server.mcal.cost.laptop"),
                (&c.server, &mut cost.server, "server.mcal.cost.server"),
            ] {
                if let Some(n) = v.count(field, key, 0..=1_000_000) {
                    *slot = n as u32;
                }
            }
        }
        Mcal { pool, cost }
    });

    let email = s.email.as_ref().map(|e| {
        let r = e.get_ref();
        let from = v
            .required(&r.from, e.span(), "server.email.from", "the sender address")
            .and_then(|f| v.email(f, "server.email.from"))
            .unwrap_or_default();
        let admin = r.admin.as_ref().and_then(|a| v.email(a, "server.email.admin"));
        let smtp = r.smtp.as_ref().and_then(|u| {
            let url = u.get_ref();
            let ok = (url.starts_with("smtp://") || url.starts_with("smtps://"))
                && url.split_once("://").is_some_and(|(_, rest)| !rest.is_empty());
            if ok {
                Some(SmtpUrl(url.clone()))
            } else {
                v.err(Rule::Smtp, u.span(), "server.email.smtp", "use smtp://host:port, smtp://host:port?tls=starttls or smtps://host:port (user:password@ before the host for AUTH)");
                None
            }
        });
        let spool = r.spool.as_ref().map(|p| v.path(p.get_ref()));
        let report_interval = v.duration_or_zero(
            &r.report_interval,
            "server.email.report_interval",
            DEFAULT_REPORT_INTERVAL,
        );
        Email {
            from,
            admin,
            smtp,
            spool,
            report_interval,
        }
    });

    let _ = span;
    Some(Server {
        listen,
        state_dir,
        state: state?,
        timezone,
        total_space,
        max_connections,
        hello_timeout,
        idle_timeout,
        shutdown_grace,
        max_frame,
        metrics_listen,
        tls,
        mcal,
        throttle: v.throttle(&s.throttle, "server.throttle"),
        aggregate: v.aggregate(&s.aggregate, "server.aggregate"),
        email,
        limits: limits::limits(v, &s.limits, max_frame),
        retention: limits::retention(v, &s.retention),
        cluster: limits::cluster(v, &s.cluster),
        web: web::web(v, &s.web),
    })
}

fn customer(
    v: &mut V<'_>,
    raw: &RawCustomer,
    span: Range<usize>,
    key: &str,
    reseller: Option<ResellerId>,
    server: &Option<Server>,
) -> Customer {
    let email = raw
        .email
        .as_ref()
        .and_then(|e| v.email(e, K(&key, "email")));
    let email_reports = v.bool(&raw.email_reports, false);
    if reseller.is_none() && email_reports && raw.email.is_none() {
        v.err(
            Rule::Required,
            span.clone(),
            K(&key, "email"),
            "email is required when email_reports = true",
        );
    }
    let is_default = key == "default_customer";
    let backup_location = match &raw.backup_location {
        Some(b) => {
            let s = b.get_ref();
            // Bare relative paths are ambiguous (relative to what?); explicit
            // ./ and ../ resolve against the config file's directory.
            if !(s.starts_with('/') || s.starts_with("./") || s.starts_with("../")) {
                v.err(Rule::AbsolutePath, b.span(), K(&key, "backup_location"), format!("{s:?} must be absolute (\"/srv/backup/...\"), or start with ./ or ../ to be relative to this file's directory"));
            }
            v.path(s)
        }
        // Beside state_dir, never inside it (CONFIG.md Additions):
        // /var/lib/tollgate → /var/lib/tollgate-backup/default.
        None if is_default => server
            .as_ref()
            .map(|s| default_location(&s.state_dir))
            .unwrap_or_default(),
        None => {
            v.err(
                Rule::Required,
                span.clone(),
                K(&key, "backup_location"),
                "a customer's backup_location is required (an absolute directory)",
            );
            PathBuf::new()
        }
    };
    let web_access = raw
        .web_access
        .as_ref()
        .and_then(|w| web::web_access(v, w, &format!("{key}.web_access")));
    let consolidated_report = raw.consolidated_report.as_ref().and_then(|c| {
        let r = c.get_ref();
        let rkey = K(&key, "consolidated_report");
        let recipients: Vec<String> = match v.required(
            &r.recipients,
            c.span(),
            K(&rkey, "recipients"),
            "the report's recipients",
        ) {
            Some(list) if list.get_ref().is_empty() => {
                v.err(
                    Rule::Required,
                    list.span(),
                    K(&rkey, "recipients"),
                    "needs at least one address",
                );
                Vec::new()
            }
            Some(list) => list
                .get_ref()
                .iter()
                .filter_map(|a| v.email(a, K(&rkey, "recipients")))
                .collect(),
            None => Vec::new(),
        };
        let frequency = v
            .required(
                &r.frequency,
                c.span(),
                K(&rkey, "frequency"),
                "the report's frequency",
            )
            .and_then(|f| match f.get_ref().as_str() {
                "daily" => Some(Frequency::Daily),
                "weekly" => Some(Frequency::Weekly),
                "monthly" => Some(Frequency::Monthly),
                other => {
                    v.err(
                        Rule::Frequency,
                        f.span(),
                        K(&rkey, "frequency"),
                        format!("{other:?} is not a frequency; use daily, weekly or monthly"),
                    );
                    None
                }
            });
        Some(ConsolidatedReport {
            recipients,
            frequency: frequency?,
        })
    });
    Customer {
        name: DEFAULT_CUSTOMER_NAME.to_string(),
        reseller,
        email,
        records: Records {
            address: v.string(&raw.address),
            city: v.string(&raw.city),
            phone: v.string(&raw.phone),
            fax: v.string(&raw.fax),
            notes: v.string(&raw.notes),
        },
        backup_location,
        space: v.size(&raw.space, K(&key, "space")),
        auto_add_clients: v.bool(&raw.auto_add_clients, false),
        enroll_key: raw
            .enroll_key
            .as_ref()
            .and_then(|k| v.phc(k, K(&key, "enroll_key"))),
        email_reports,
        web_access,
        mcal_limit: v.mcal_limit(&raw.mcal_limit, K(&key, "mcal_limit")),
        activated: v.bool(&raw.activated, true),
        max_clients: v
            .count(
                &raw.max_clients,
                K(&key, "max_clients"),
                0..=u32::MAX as i64,
            )
            .map(|n| n as u32),
        throttle: v.throttle(&raw.throttle, K(&key, "throttle")),
        aggregate: v.aggregate(&raw.aggregate, K(&key, "aggregate")),
        consolidated_report,
        clients: Vec::new(),
        send_account_details: v.bool(&raw.send_account_details, false),
    }
}

/// The children that add up in an over-allocation, largest first:
/// `"north" 60 GiB + "south" 50 GiB` (at most eight named).
fn addends<'a>(items: impl Iterator<Item = (&'a str, Option<u64>)>) -> String {
    let mut items: Vec<(&str, u64)> = items
        .filter_map(|(n, s)| s.filter(|s| *s > 0).map(|s| (n, s)))
        .collect();
    items.sort_by_key(|i| std::cmp::Reverse(i.1));
    let mut parts: Vec<String> = items
        .iter()
        .take(8)
        .map(|(n, s)| format!("{n:?} {}", units::format_size(*s)))
        .collect();
    if items.len() > 8 {
        parts.push(format!("{} more", items.len() - 8));
    }
    parts.join(" + ")
}

/// CONFIG.md "Space allotments nest", plus declared clients against
/// `max_clients`.
fn check_nesting(v: &mut V<'_>, doc: &RawConfig, cfg: &Config) {
    use crate::policy::space::allotted_to_children;
    use units::format_size as fs;
    let server_span = doc
        .server
        .as_ref()
        .and_then(|s| s.get_ref().total_space.as_ref().map(|t| t.span()))
        .unwrap_or(0..0);
    if let Some(total) = cfg.server.total_space {
        let dc_span = doc
            .default_customer
            .as_ref()
            .map_or(server_span.clone(), |d| d.span());
        if cfg.customers[0].space.is_none() {
            v.err(Rule::SpaceMissing, dc_span, "default_customer.space", "required because server.total_space is set; write e.g. space = \"0 B\" to give it none");
        }
        for (i, r) in cfg.resellers.iter().enumerate() {
            if r.space.is_none() {
                v.err(
                    Rule::SpaceMissing,
                    doc.reseller[i].span(),
                    format!("reseller[{}].space", r.name),
                    "required because server.total_space is set",
                );
            }
        }
        let sum = allotted_to_children(cfg, crate::policy::space::Node::Server);
        if sum > total {
            v.err(
                Rule::SpaceOverAllocated,
                server_span,
                "server.total_space",
                format!(
                    "the resellers and the Default Customer are allotted {} together ({}), more than the server's total_space of {}",
                    fs(sum),
                    addends(
                        cfg.resellers
                            .iter()
                            .map(|r| (r.name.as_str(), r.space))
                            .chain([(cfg.customers[0].name.as_str(), cfg.customers[0].space)])
                    ),
                    fs(total)
                ),
            );
        }
    }
    for (i, r) in cfg.resellers.iter().enumerate() {
        let rid = ResellerId(i as u32);
        let Some(space) = r.space else { continue };
        for &cid in &r.customers {
            if cfg.customer(cid).space.is_none() {
                let idx = cid.0 as usize - 1;
                v.err(
                    Rule::SpaceMissing,
                    doc.customer[idx].span(),
                    format!("customer[{}].space", cfg.customer(cid).name),
                    format!("required because reseller {:?} has a space", r.name),
                );
            }
        }
        let sum = allotted_to_children(cfg, crate::policy::space::Node::Reseller(rid));
        if sum > space {
            // With included files, the error points at the space of the
            // last customer an included file adds (the newest file is the
            // likely cause, and the console's form shows it beside its
            // field); otherwise at the reseller's own space.
            let included = r.customers.iter().rev().find_map(|&cid| {
                let raw = doc.customer[cid.0 as usize - 1].get_ref();
                let s = raw.space.as_ref()?.span();
                super::include::segment_of(&v.segments, s.start)?
                    .include
                    .map(|_| (s, format!("customer[{}].space", cfg.customer(cid).name)))
            });
            let (span, key) = included.unwrap_or_else(|| {
                let span = doc.reseller[i]
                    .get_ref()
                    .space
                    .as_ref()
                    .map_or(doc.reseller[i].span(), |s| s.span());
                (span, format!("reseller[{}].space", r.name))
            });
            v.err(
                Rule::SpaceOverAllocated,
                span,
                key,
                format!(
                    "its customers are allotted {} together ({}), more than reseller {:?}'s space of {}",
                    fs(sum),
                    addends(r.customers.iter().map(|&c| {
                        let c = cfg.customer(c);
                        (c.name.as_str(), c.space)
                    })),
                    r.name,
                    fs(space)
                ),
            );
        }
    }
    for (i, c) in cfg.customers.iter().enumerate() {
        let cid = CustomerId(i as u32);
        let raw = if i == 0 {
            doc.default_customer.as_ref()
        } else {
            doc.customer.get(i - 1)
        };
        let key = if i == 0 {
            "default_customer".to_string()
        } else {
            format!("customer[{}]", c.name)
        };
        if let Some(space) = c.space {
            let sum = allotted_to_children(cfg, crate::policy::space::Node::Customer(cid));
            if sum > space {
                let span = raw
                    .and_then(|r| r.get_ref().space.as_ref().map(|s| s.span()))
                    .unwrap_or(0..0);
                v.err(
                    Rule::SpaceOverAllocated,
                    span,
                    K(&key, "space"),
                    format!(
                        "its declared clients are allotted {} together ({}), more than customer {:?}'s space of {}",
                        fs(sum),
                        addends(c.clients.iter().map(|&d| {
                            let d = cfg.client(d);
                            (d.id.as_str(), d.space)
                        })),
                        c.name,
                        fs(space)
                    ),
                );
            }
        }
        if let Some(max) = c.max_clients
            && c.clients.len() > max as usize
        {
            let span = raw
                .and_then(|r| r.get_ref().max_clients.as_ref().map(|s| s.span()))
                .unwrap_or(0..0);
            v.err(
                Rule::ClientLimit,
                span,
                K(&key, "max_clients"),
                format!(
                    "{} clients are declared for customer {:?}, more than its max_clients of {max}",
                    c.clients.len(),
                    c.name
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        for ok in ["it@contoso.example", "a.b+c@x.y", "noc@localhost"] {
            assert!(is_valid_email(ok), "{ok}");
        }
        for bad in [
            "", "x", "@x.y", "a@", "a b@x.y", "a@x..y", "a@-x.y", ".a@x.y", "a@x_y.z",
        ] {
            assert!(!is_valid_email(bad), "{bad}");
        }
    }

    #[test]
    fn line_and_column() {
        let src = "a = 1\nbé = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        assert_eq!(line_col(src, src.find('=').unwrap()), (1, 3));
        assert_eq!(line_col(src, src.rfind('=').unwrap()), (2, 4));
    }

    #[test]
    fn normalizes_paths() {
        assert_eq!(
            normalize(Path::new("/a/config/../var/./x")),
            PathBuf::from("/a/var/x")
        );
    }
}
