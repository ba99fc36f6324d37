//! The typed model of `[server.limits]`, `[server.limits.penalties]` and
//! `[server.retention]` (CONFIG.md, Additions of 2026-11-30), with their
//! defaults as named constants. `validate` fills these in; `limits` (the
//! per-source table) and `server` read them.

use std::net::IpAddr;
use std::time::Duration;

/// `hello_max_frame` when omitted: the largest frame before WELCOME.
pub const DEFAULT_HELLO_MAX_FRAME: u32 = 16 << 10;
/// Smallest `hello_max_frame` accepted: a HELLO with every field must fit.
pub const MIN_HELLO_MAX_FRAME: u32 = 1 << 10;
/// `handshakes` when omitted.
pub const DEFAULT_HANDSHAKES: u32 = 256;
/// `per_source_connections` when omitted.
pub const DEFAULT_PER_SOURCE_CONNECTIONS: u32 = 64;
/// `max_sessions_per_client` when omitted.
pub const DEFAULT_MAX_SESSIONS_PER_CLIENT: u32 = 4;
/// `max_file_size` when omitted: 1 TiB.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 1 << 40;
/// Largest file size the protocol can express (PROTOCOL.md Additions).
pub const MAX_FILE_SIZE_LIMIT: u64 = i64::MAX as u64;
/// `registrations_per_minute` when omitted.
pub const DEFAULT_REGISTRATIONS_PER_MINUTE: u32 = 60;
/// `penalties.auth_failed` when omitted.
pub const DEFAULT_PENALTY_AUTH_FAILED: Duration = Duration::from_secs(5);
/// `penalties.bad_hello` when omitted.
pub const DEFAULT_PENALTY_BAD_HELLO: Duration = Duration::from_secs(2);
/// `penalties.no_hello` when omitted.
pub const DEFAULT_PENALTY_NO_HELLO: Duration = Duration::from_secs(1);
/// `penalties.min` when omitted.
pub const DEFAULT_PENALTY_MIN: Duration = Duration::from_secs(15);
/// `penalties.max` when omitted.
pub const DEFAULT_PENALTY_MAX: Duration = Duration::from_secs(600);
/// `penalties.exempt` when omitted.
pub const DEFAULT_EXEMPT: [&str; 2] = ["127.0.0.0/8", "::1/128"];
/// `penalties.max_sources` when omitted.
pub const DEFAULT_MAX_SOURCES: u32 = 65_536;
/// `retention.refusals` when omitted: 90 days.
pub const DEFAULT_RETAIN_REFUSALS: Duration = Duration::from_secs(90 * 86_400);
/// `retention.sessions` when omitted: 400 days.
pub const DEFAULT_RETAIN_SESSIONS: Duration = Duration::from_secs(400 * 86_400);
/// `retention.client_events` when omitted: 30 days.
pub const DEFAULT_RETAIN_CLIENT_EVENTS: Duration = Duration::from_secs(30 * 86_400);
/// `retention.sent_mail` when omitted: 90 days.
pub const DEFAULT_RETAIN_SENT_MAIL: Duration = Duration::from_secs(90 * 86_400);
/// `server.retention.usage` when omitted: a year of daily snapshots and a
/// month more, so a year-on-year comparison has its start.
pub const DEFAULT_RETAIN_USAGE: Duration = Duration::from_secs(400 * 86_400);
/// `server.retention.audit` when omitted: two years of console changes.
pub const DEFAULT_RETAIN_AUDIT: Duration = Duration::from_secs(730 * 86_400);

/// `[server.limits]`: bounds on what a peer may hold or cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload accepted until WELCOME.
    pub hello_max_frame: u32,
    /// Connections at most between accept and WELCOME or REJECT.
    pub handshakes: u32,
    /// Concurrent connections at most from one source.
    pub per_source_connections: u32,
    /// Concurrent sessions at most of one client id.
    pub max_sessions_per_client: u32,
    /// Largest `size` a PUT may announce.
    pub max_file_size: u64,
    /// New clients at most per customer per minute.
    pub registrations_per_minute: u32,
    /// `[server.limits.penalties]`.
    pub penalties: Penalties,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            hello_max_frame: DEFAULT_HELLO_MAX_FRAME,
            handshakes: DEFAULT_HANDSHAKES,
            per_source_connections: DEFAULT_PER_SOURCE_CONNECTIONS,
            max_sessions_per_client: DEFAULT_MAX_SESSIONS_PER_CLIENT,
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            registrations_per_minute: DEFAULT_REGISTRATIONS_PER_MINUTE,
            penalties: Penalties::default(),
        }
    }
}

/// `[server.limits.penalties]`, after OpenSSH's `PerSourcePenalties`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Penalties {
    /// Earned by a wrong secret or enroll key.
    pub auth_failed: Duration,
    /// Earned by a HELLO refused as malformed or naming no known client.
    pub bad_hello: Duration,
    /// Earned by a connection that ends before a valid HELLO.
    pub no_hello: Duration,
    /// A source is blocked once its penalty exceeds this.
    pub min: Duration,
    /// Penalties stop accumulating here.
    pub max: Duration,
    /// Networks never penalized.
    pub exempt: Vec<Cidr>,
    /// Sources tracked at most.
    pub max_sources: u32,
    /// What happens to new sources while the table is full.
    pub overflow: Overflow,
}

impl Default for Penalties {
    fn default() -> Self {
        Penalties {
            auth_failed: DEFAULT_PENALTY_AUTH_FAILED,
            bad_hello: DEFAULT_PENALTY_BAD_HELLO,
            no_hello: DEFAULT_PENALTY_NO_HELLO,
            min: DEFAULT_PENALTY_MIN,
            max: DEFAULT_PENALTY_MAX,
            exempt: DEFAULT_EXEMPT
                .iter()
                .map(|c| c.parse().expect("the default exempt networks parse"))
                .collect(),
            max_sources: DEFAULT_MAX_SOURCES,
            overflow: Overflow::Permissive,
        }
    }
}

impl Penalties {
    /// Whether `ip` lies in an exempt network.
    pub fn is_exempt(&self, ip: IpAddr) -> bool {
        self.exempt.iter().any(|c| c.contains(ip))
    }
}

/// `penalties.overflow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// New sources are let in untracked while the table is full.
    #[default]
    Permissive,
    /// Every unexempted new source is refused while the table is full.
    DenyAll,
}

/// An IPv4 or IPv6 network (`penalties.exempt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(ipnet::IpNet);

impl Cidr {
    /// Whether `ip` is inside; an IPv4-mapped IPv6 address counts as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&canonical(ip))
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let net = s
            .parse::<ipnet::IpNet>()
            .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| {
                format!("{s:?} is not a network; write e.g. \"192.0.2.0/24\" or \"2001:db8::/32\"")
            })?;
        Ok(Cidr(net.trunc()))
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// `ip` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, as a dual-stack
/// socket reports IPv4 peers) turned back into IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The source `ip` counts as (CONFIG.md `per_source_connections`): the
/// address itself for IPv4, its /64 for IPv6 (one host usually holds a
/// whole /64, and must not rotate through it).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// `s` made safe for one log line: printable ASCII stays, everything else
/// is escaped (`\xNN`, `\u{…}`), so a peer's text can neither break the
/// line nor forge another one; cut to `max` characters.
pub fn escape_log(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        match c {
            '\\' => out.push_str("\\\\"),
            c if c.is_ascii_graphic() || c == ' ' => out.push(c),
            c if c.is_ascii() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    out
}

/// `[server.retention]`: how long state history is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Refusal rows.
    pub refusals: Duration,
    /// Session rows.
    pub sessions: Duration,
    /// Moves and removals recorded for the daemon.
    pub client_events: Duration,
    /// Delivered outbox messages and the alert log.
    pub sent_mail: Duration,
    /// Daily usage snapshots (the console's charts).
    pub usage: Duration,
    /// Changes made through the console (its audit log).
    pub audit: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            refusals: DEFAULT_RETAIN_REFUSALS,
            sessions: DEFAULT_RETAIN_SESSIONS,
            client_events: DEFAULT_RETAIN_CLIENT_EVENTS,
            sent_mail: DEFAULT_RETAIN_SENT_MAIL,
            usage: DEFAULT_RETAIN_USAGE,
            audit: DEFAULT_RETAIN_AUDIT,
        }
    }
}

/// `[server.cluster]`: this node among several on one PostgreSQL state
/// (docs/scale-out.md). Ignored on SQLite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// This node's name, unique in the cluster; the host name by default.
    pub node: String,
    /// Nodes the cluster runs: a node that cannot reach the database
    /// falls back to an aggregate cap divided by this.
    pub nodes: u32,
    /// How long a node's lease runs after each heartbeat: a node that
    /// died stops holding space and work within this.
    pub lease: Duration,
}

/// Nodes in a cluster at most.
pub const MAX_NODES: u32 = 64;
/// The default node lease.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            node: default_node_name(),
            nodes: 1,
            lease: DEFAULT_LEASE,
        }
    }
}

/// `tollgate serve --node NAME`: this process's node name, over
/// `server.cluster.node`, at start and at every reload.
static NODE_OVERRIDE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets this process's node name (`serve --node`); false when it is not
/// a valid name or was set before.
pub fn set_node_override(name: &str) -> bool {
    valid_node_name(name) && NODE_OVERRIDE.set(name.to_string()).is_ok()
}

/// The node name `serve --node` gave, if any.
pub fn node_override() -> Option<&'static str> {
    NODE_OVERRIDE.get().map(String::as_str)
}

/// The host name, or "tollgate" when it cannot be read.
pub fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| valid_node_name(s))
        .unwrap_or_else(|| "tollgate".to_string())
}

/// A node name: 1 to 64 of ASCII letters, digits, `-`, `_` and `.`, not
/// starting with `.` (it names a directory: `.` and `..` must not be
/// names).
pub fn valid_node_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_safe_directory_names() {
        for ok in ["a", "node-1", "db_2", "n.example"] {
            assert!(valid_node_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(!valid_node_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn log_text_is_escaped_and_cut() {
        assert_eq!(escape_log("a b/c.txt", 100), "a b/c.txt");
        assert_eq!(
            escape_log("x\nauthentication failure for a from 1.2.3.4", 100),
            "x\\x0aauthentication failure for a from 1.2.3.4"
        );
        assert_eq!(escape_log("\r\u{7f}é\\", 100), "\\x0d\\x7f\\u{e9}\\\\");
        assert_eq!(escape_log(&"z".repeat(600), 512).chars().count(), 513);
        assert_eq!(
            source_of("2001:db8:1:2:3:4:5:6".parse().unwrap()).to_string(),
            "2001:db8:1:2::"
        );
        assert_eq!(
            source_of("::ffff:10.1.2.3".parse().unwrap()).to_string(),
            "10.1.2.3"
        );
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "192.0.2.7/24".parse().unwrap();
        assert_eq!(c.to_string(), "192.0.2.0/24");
        assert!(c.contains("192.0.2.200".parse().unwrap()));
        assert!(!c.contains("192.0.3.1".parse().unwrap()));
        assert!(
            c.contains("::ffff:192.0.2.9".parse().unwrap()),
            "mapped IPv4"
        );
        let one: Cidr = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("::2".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("example.com".parse::<Cidr>().is_err());
        let d = Penalties::default();
        assert!(d.is_exempt("127.8.9.10".parse().unwrap()));
        assert!(d.is_exempt("::1".parse().unwrap()));
        assert!(!d.is_exempt("10.0.0.1".parse().unwrap()));
    }
}
