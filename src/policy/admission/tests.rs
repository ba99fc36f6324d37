//! Admission, case by case: every REJECT code from a minimal scenario, and
//! the order of the steps.

use super::*;
use crate::policy::space::Usage;
use std::collections::HashSet;
use std::path::Path;

/// A cheap argon2id hash of "open-sesame" (m=8 KiB, t=1) so tests stay fast;
/// verification reads the parameters from the string.
fn cheap_hash(secret: &str) -> String {
    use argon2::{Algorithm, Argon2, Params, PasswordHasher, Version};
    let a = Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(8, 1, 1, None).unwrap(),
    );
    a.hash_password(secret.as_bytes()).unwrap().to_string()
}

fn cfg() -> Config {
    let key = cheap_hash("open-sesame");
    let src = format!(
        r#"
        [server]
        timezone = "Europe/Berlin"
        total_space = "100 GiB"
        throttle = {{ rate = "10 MiB/s" }}
        [server.mcal]
        pool = 100

        [default_customer]
        auto_add_clients = true
        space = "1 GiB"

        [[reseller]]
        name = "r"
        space = "50 GiB"
        mcal_limit = 10

        [[reseller]]
        name = "off"
        space = "1 GiB"
        activated = false

        [[customer]]
        name = "Open"
        reseller = "r"
        email = "o@x.example"
        backup_location = "/srv/open"
        space = "10 GiB"
        auto_add_clients = true
        max_clients = 2
        mcal_limit = 3

        [[customer]]
        name = "Closed"
        reseller = "r"
        email = "c@x.example"
        backup_location = "/srv/closed"
        space = "1 GiB"

        [[customer]]
        name = "Keyed"
        reseller = "r"
        email = "k@x.example"
        backup_location = "/srv/keyed"
        space = "10 GiB"
        auto_add_clients = true
        enroll_key = "{key}"

        [[customer]]
        name = "Asleep"
        reseller = "r"
        email = "a@x.example"
        backup_location = "/srv/asleep"
        space = "1 GiB"
        auto_add_clients = true
        activated = false
        mcal_limit = 0

        [[customer]]
        name = "UnderOff"
        reseller = "off"
        email = "u@x.example"
        backup_location = "/srv/underoff"
        space = "1 GiB"
        auto_add_clients = true

        [[client]]
        id = "DECL"
        customer = "Keyed"
        kind = "server"
        space = "1 GiB"
    "#
    );
    Config::from_str(&src, Path::new("/t.toml")).unwrap_or_else(|e| panic!("{e:?}"))
}

fn hello(id: &str) -> Hello {
    Hello {
        protocol: 1,
        client_id: id.into(),
        schedule: "nightly".into(),
        ..Hello::default()
    }
}

/// A registered client's record; its id is HELLO's unless a case sets one.
fn registered(c: &Config, customer: &str, kind: Kind, secret: &str) -> Option<ClientRecord> {
    Some(ClientRecord {
        customer: c.customer_by_name(customer).unwrap(),
        kind,
        secret_sha256: Some(secret_digest(secret)),
        ..ClientRecord::default()
    })
}

/// What the session's shell does around [`super::admit`]: the enroll key
/// verified off the write lane (here inline), and the record's id filled in.
fn admit(c: &Config, h: &Hello, s: &Snapshot, at: Timestamp) -> Result<Admitted, Rejection> {
    let mut s = s.clone();
    if let Some(r) = s.client.as_mut()
        && r.id.is_empty()
    {
        r.id = h.client_id.clone();
    }
    s.enroll = enroll_key_target(c, h, s.client.as_ref()).map(|(customer, hash)| EnrollVerdict {
        customer,
        ok: hash.verify(h.enroll_key.as_deref().unwrap_or_default()),
    });
    super::admit(c, h, &s, at)
}

fn at() -> Timestamp {
    "2026-11-25T12:00:00Z".parse().unwrap()
}

type Edit = fn(&Config, &mut Hello, &mut Snapshot);

/// (name, how to set it up, expected code)
fn reject_cases() -> Vec<(&'static str, Edit, RejectCode)> {
    use RejectCode::*;
    vec![
        ("protocol 2", |_, h, _| h.protocol = 2, UnsupportedProtocol),
        (
            "protocol 2 beats a bad id",
            |_, h, _| {
                h.protocol = 2;
                h.client_id = ".bad".into()
            },
            UnsupportedProtocol,
        ),
        (
            "id starting with a dot",
            |_, h, _| h.client_id = ".hidden".into(),
            BadRequest,
        ),
        (
            "id too long",
            |_, h, _| h.client_id = "x".repeat(65),
            BadRequest,
        ),
        (
            "id with a slash",
            |_, h, _| h.client_id = "a/b".into(),
            BadRequest,
        ),
        (
            "empty schedule",
            |_, h, _| h.schedule = String::new(),
            BadRequest,
        ),
        (
            "unknown kind",
            |_, h, _| h.kind = Some("tablet".into()),
            BadRequest,
        ),
        (
            "unknown intent",
            |_, h, _| h.intent = Some("upload".into()),
            BadRequest,
        ),
        (
            "long hostname",
            |_, h, _| h.hostname = Some("h".repeat(256)),
            BadRequest,
        ),
        (
            "NUL in hostname",
            |_, h, _| h.hostname = Some("pc\u{0}1".into()),
            BadRequest,
        ),
        (
            "escape sequence in hostname",
            |_, h, _| h.hostname = Some("\u{1b}]0;owned\u{7}".into()),
            BadRequest,
        ),
        (
            "C1 control in hostname",
            |_, h, _| h.hostname = Some("pc\u{9b}1".into()),
            BadRequest,
        ),
        (
            "shutting down",
            |_, _, s| s.shutting_down = true,
            ShuttingDown,
        ),
        (
            "shutting down beats busy",
            |_, _, s| {
                s.shutting_down = true;
                s.connections_full = true
            },
            ShuttingDown,
        ),
        (
            "connections full",
            |_, _, s| s.connections_full = true,
            Busy,
        ),
        (
            "wrong secret",
            |c, h, s| {
                s.client = registered(c, "Open", Kind::Desktop, "right");
                h.secret = Some("wrong".into())
            },
            AuthFailed,
        ),
        (
            "missing secret",
            |c, _, s| s.client = registered(c, "Open", Kind::Desktop, "right"),
            AuthFailed,
        ),
        (
            "enroll key missing",
            |_, h, _| h.customer = Some("Keyed".into()),
            AuthFailed,
        ),
        (
            "enroll key wrong",
            |_, h, _| {
                h.customer = Some("Keyed".into());
                h.enroll_key = Some("guess".into())
            },
            AuthFailed,
        ),
        (
            "declared, first connection, no key",
            |_, h, _| h.client_id = "DECL".into(),
            AuthFailed,
        ),
        (
            "unknown customer",
            |_, h, _| h.customer = Some("Nobody".into()),
            UnknownCustomer,
        ),
        (
            "customer without auto-add",
            |_, h, _| h.customer = Some("Closed".into()),
            UnknownClient,
        ),
        (
            "client slots full",
            |_, h, s| {
                h.customer = Some("open".into());
                s.customer_clients = 2
            },
            ClientLimit,
        ),
        (
            "customer deactivated",
            |_, h, _| h.customer = Some("Asleep".into()),
            CustomerDeactivated,
        ),
        (
            "sixty registrations in the last minute",
            |_, h, s| {
                h.customer = Some("Open".into());
                s.nth_recent_registration = Some(at().as_second() - 30)
            },
            RateLimited,
        ),
        (
            "a removed client's id is reserved",
            |c, h, s| {
                let mut r = registered(c, "Open", Kind::Desktop, "x").unwrap();
                r.secret_sha256 = None;
                r.removed = true;
                s.client = Some(r);
                h.customer = Some("Open".into())
            },
            AuthFailed,
        ),
        (
            "the same id in other letter case",
            |c, h, s| {
                let mut r = registered(c, "Open", Kind::Desktop, "s").unwrap();
                r.id = "new-pc".into();
                s.client = Some(r);
                h.secret = Some("s".into())
            },
            AuthFailed,
        ),
        (
            "an expired readmit key",
            |c, h, s| {
                let mut r = registered(c, "Open", Kind::Desktop, "lost").unwrap();
                r.readmit = Some((secret_digest("key"), at()));
                s.client = Some(r);
                h.enroll_key = Some("key".into())
            },
            AuthFailed,
        ),
        (
            "deactivated beats mcal",
            |_, h, s| {
                h.customer = Some("Asleep".into());
                s.mcal.global_total = 100
            },
            CustomerDeactivated,
        ),
        (
            "deactivated beats quota",
            |_, h, s| {
                h.customer = Some("Asleep".into());
                s.usage.customer.used = 1 << 30
            },
            CustomerDeactivated,
        ),
        (
            "reseller deactivated",
            |_, h, _| h.customer = Some("UnderOff".into()),
            CustomerDeactivated,
        ),
        (
            "customer allotment used",
            |_, h, s| {
                h.customer = Some("Open".into());
                s.mcal.customer_total = 3
            },
            McalExhausted,
        ),
        (
            "server costs 2, 1 left",
            |_, h, s| {
                h.customer = Some("Open".into());
                h.kind = Some("server".into());
                s.mcal.customer_total = 2
            },
            McalExhausted,
        ),
        (
            "reseller allotment used",
            |_, h, s| {
                h.customer = Some("Open".into());
                s.mcal.reseller_total = 10
            },
            McalExhausted,
        ),
        (
            "global pool used",
            |_, _, s| s.mcal.global_total = 100,
            McalExhausted,
        ),
        (
            "mcal beats quota",
            |_, _, s| {
                s.mcal.global_total = 100;
                s.usage.server.used = 100 << 30
            },
            McalExhausted,
        ),
        (
            "customer space full",
            |_, h, s| {
                h.customer = Some("Open".into());
                s.usage.customer = Usage {
                    used: 9 << 30,
                    reserved: 1 << 30,
                }
            },
            QuotaExceeded,
        ),
        (
            "reseller space full",
            |_, h, s| {
                h.customer = Some("Open".into());
                s.usage.reseller.used = 50 << 30
            },
            QuotaExceeded,
        ),
        (
            "server space full",
            |_, _, s| s.usage.server.reserved = 100 << 30,
            QuotaExceeded,
        ),
        (
            "default customer full",
            |_, _, s| s.usage.customer.used = 1 << 30,
            QuotaExceeded,
        ),
        (
            "client space full",
            |c, h, s| {
                h.client_id = "DECL".into();
                h.secret = Some("s".into());
                s.client = registered(c, "Keyed", Kind::Server, "s");
                s.usage.client.used = 1 << 30
            },
            QuotaExceeded,
        ),
    ]
}

#[test]
fn every_reject_code_from_a_minimal_scenario() {
    let c = cfg();
    let mut seen = HashSet::new();
    for (name, edit, want) in reject_cases() {
        let mut h = hello("NEW-PC");
        let mut s = Snapshot::default();
        edit(&c, &mut h, &mut s);
        match admit(&c, &h, &s, at()) {
            Ok(a) => panic!("{name}: admitted {a:?}, wanted {want}"),
            Err(r) => {
                assert_eq!(r.code, want, "{name}: {}", r.message);
                assert!(
                    !r.message.contains("open-sesame") && !r.message.contains("argon2"),
                    "{name}: message leaks: {}",
                    r.message
                );
            }
        }
        seen.insert(want);
    }
    // `timeout` is decided by the session's HELLO timer, not by admission.
    let unreachable: HashSet<_> = [RejectCode::Timeout].into();
    for code in RejectCode::ALL {
        assert!(
            seen.contains(&code) || unreachable.contains(&code),
            "{code} has no scenario"
        );
    }
}

#[test]
fn admissions() {
    let c = cfg();
    let open = c.customer_by_name("Open").unwrap();
    let keyed = c.customer_by_name("Keyed").unwrap();
    let march = Month {
        year: 2026,
        month: 11,
    };

    // Auto-added to the Default Customer: a secret is issued, 1 MCAL debited.
    let a = admit(&c, &hello("NEW-PC"), &Snapshot::default(), at()).unwrap();
    assert_eq!(
        (a.customer, a.registration, a.kind, a.mcal_debit),
        (
            CustomerId::DEFAULT,
            Registration::AutoAdded,
            Kind::Desktop,
            Some((march, 1))
        )
    );
    assert!(a.issues_secret());
    assert_eq!(a.space_left, Some(1 << 30));
    assert_eq!(a.rate.rate, Some(10 << 20));

    // Auto-added to a named customer as a server: costs 2, fits 3 - 1.
    let mut h = hello("SRV");
    h.customer = Some("OPEN".into());
    h.kind = Some("server".into());
    let s = Snapshot {
        customer_clients: 1,
        mcal: McalState {
            customer_total: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let a = admit(&c, &h, &s, at()).unwrap();
    assert_eq!(
        (a.customer, a.kind, a.mcal_debit),
        (open, Kind::Server, Some((march, 2)))
    );

    // The right enroll key.
    let mut h = hello("K1");
    h.customer = Some("Keyed".into());
    h.enroll_key = Some("open-sesame".into());
    assert_eq!(
        admit(&c, &h, &Snapshot::default(), at()).unwrap().customer,
        keyed
    );

    // A declared client's first connection: its config customer and kind.
    let mut h = hello("DECL");
    h.enroll_key = Some("open-sesame".into());
    h.customer = Some("Open".into()); // ignored for a declared client
    h.kind = Some("laptop".into()); // the config says server
    let a = admit(&c, &h, &Snapshot::default(), at()).unwrap();
    assert_eq!(
        (a.customer, a.registration, a.kind, a.mcal_debit),
        (
            keyed,
            Registration::Declared,
            Kind::Server,
            Some((march, 2))
        )
    );
    assert_eq!(a.space_left, Some(1 << 30));

    // A registered client with the right secret: `customer` is ignored.
    let mut h = hello("OLD");
    h.secret = Some("s3cret".into());
    h.customer = Some("Closed".into());
    let s = Snapshot {
        client: registered(&c, "Open", Kind::Laptop, "s3cret"),
        ..Default::default()
    };
    let a = admit(&c, &h, &s, at()).unwrap();
    assert_eq!(
        (a.customer, a.registration, a.kind),
        (open, Registration::Existing, Kind::Laptop)
    );
    assert!(!a.issues_secret());

    // Already debited this month: no debit, even with the pool empty.
    let s = Snapshot {
        client: registered(&c, "Open", Kind::Laptop, "s3cret"),
        mcal: McalState {
            client_debited_this_month: true,
            global_total: 100,
            customer_total: 3,
            reseller_total: 10,
        },
        ..Default::default()
    };
    assert_eq!(admit(&c, &h, &s, at()).unwrap().mcal_debit, None);

    // Restore skips MCAL and space.
    let mut r = h.clone();
    r.intent = Some("restore".into());
    let s = Snapshot {
        client: registered(&c, "Open", Kind::Laptop, "s3cret"),
        mcal: McalState {
            global_total: 100,
            ..Default::default()
        },
        usage: LevelUsage {
            customer: Usage {
                used: 10 << 30,
                reserved: 0,
            },
            ..Default::default()
        },
        ..Default::default()
    };
    let a = admit(&c, &r, &s, at()).unwrap();
    assert_eq!(
        (a.intent, a.mcal_debit, a.space_left),
        (Intent::Restore, None, Some(0))
    );

    // A full client slot count does not stop a registered client.
    let s = Snapshot {
        client: registered(&c, "Open", Kind::Laptop, "s3cret"),
        customer_clients: 2,
        ..Default::default()
    };
    assert!(admit(&c, &h, &s, at()).is_ok());
}

/// PROTOCOL.md Additions: removed ids stay reserved until `clients
/// readmit`; the readmit key also serves a client that lost its secret.
#[test]
fn readmission() {
    let c = cfg();
    let open = c.customer_by_name("Open").unwrap();
    let later = "2026-11-28T12:00:00Z".parse::<Timestamp>().unwrap();
    let removed = |readmit: Option<&str>| {
        let mut r = registered(&c, "Open", Kind::Laptop, "old").unwrap();
        r.secret_sha256 = None;
        r.removed = true;
        r.readmit = readmit.map(|k| (secret_digest(k), later));
        Snapshot {
            client: Some(r),
            ..Default::default()
        }
    };
    let mut h = hello("GONE");
    h.customer = Some("Keyed".into()); // ignored: it comes back where it was
    h.enroll_key = Some("one-time".into());
    let a = admit(&c, &h, &removed(Some("one-time")), at()).unwrap();
    assert_eq!(
        (a.customer, a.registration, a.kind),
        (open, Registration::Readmitted, Kind::Laptop)
    );
    assert!(a.issues_secret());
    // Without the key, or with another, or after it expired: refused.
    for (key, when) in [
        (None, at()),
        (Some("guess"), at()),
        (Some("one-time"), later),
    ] {
        h.enroll_key = key.map(str::to_string);
        let r = admit(&c, &h, &removed(Some("one-time")), when).unwrap_err();
        assert_eq!(r.code, RejectCode::AuthFailed, "{key:?}");
        assert!(
            r.message.contains("readmit") || r.message.contains("secret"),
            "{}",
            r.message
        );
    }
    // Readmitting a removed client takes a client slot again.
    h.enroll_key = Some("one-time".into());
    let mut full = removed(Some("one-time"));
    full.customer_clients = 2;
    assert_eq!(
        admit(&c, &h, &full, at()).unwrap_err().code,
        RejectCode::ClientLimit
    );
    // A registered client that lost its secret: the key issues a new one,
    // and the old secret still works until then.
    let mut lost = registered(&c, "Open", Kind::Desktop, "old").unwrap();
    lost.readmit = Some((secret_digest("one-time"), later));
    let s = Snapshot {
        client: Some(lost),
        ..Default::default()
    };
    let a = admit(&c, &h, &s, at()).unwrap();
    assert_eq!(a.registration, Registration::Readmitted);
    let mut with_secret = hello("GONE");
    with_secret.secret = Some("old".into());
    assert_eq!(
        admit(&c, &with_secret, &s, at()).unwrap().registration,
        Registration::Existing
    );
}

/// `registrations_per_minute`: a sliding minute; `retry_after` is when the
/// oldest registration that counts leaves it.
#[test]
fn registration_rate_table() {
    let t: Timestamp = "2026-11-25T12:00:00Z".parse().unwrap();
    let now = t.as_second();
    // (the `per_minute`-th newest registration, if that many, → retry_after)
    let cases: &[(Option<i64>, Option<u64>)] = &[
        (None, None),
        (Some(now - 50), Some(10)),
        (Some(now - 60), None),
        (Some(now - 70), None),
        (Some(now), Some(60)),
        (Some(now - 59), Some(1)),
        // Registered "after" now (the clock stepped back): the window still
        // ends a minute after that registration.
        (Some(now + 30), Some(90)),
    ];
    for (nth, want) in cases {
        let got = registration_rate(2, *nth, t, "C").err();
        assert_eq!(got.as_ref().and_then(|r| r.retry_after), *want, "{nth:?}");
        if let Some(r) = got {
            assert_eq!(r.code, RejectCode::RateLimited);
        }
    }
}

#[test]
fn the_enroll_key_is_checked_for_the_customer_it_was_verified_for() {
    let c = cfg();
    let mut h = hello("K2");
    h.customer = Some("Keyed".into());
    h.enroll_key = Some("open-sesame".into());
    let keyed = c.customer_by_name("Keyed").unwrap();
    let open = c.customer_by_name("Open").unwrap();
    let s = |customer, ok| Snapshot {
        enroll: Some(EnrollVerdict { customer, ok }),
        ..Default::default()
    };
    assert!(super::admit(&c, &h, &s(keyed, true), at()).is_ok());
    assert_eq!(
        super::admit(&c, &h, &s(keyed, false), at())
            .unwrap_err()
            .code,
        RejectCode::AuthFailed
    );
    assert_eq!(
        super::admit(&c, &h, &s(open, true), at()).unwrap_err().code,
        RejectCode::AuthFailed,
        "a verdict about another customer"
    );
    assert_eq!(
        super::admit(&c, &h, &Snapshot::default(), at())
            .unwrap_err()
            .code,
        RejectCode::AuthFailed,
        "no verdict"
    );
    assert_eq!(enroll_key_target(&c, &h, None).map(|(c, _)| c), Some(keyed));
    // A registered client's key is never verified: it proves itself otherwise.
    let rec = registered(&c, "Keyed", Kind::Desktop, "s");
    assert!(enroll_key_target(&c, &h, rec.as_ref()).is_none());
}

#[test]
fn no_mcal_table_means_no_licences() {
    let c = Config::from_str(
        "[server]\ntimezone = \"UTC\"\n[default_customer]\nauto_add_clients = true\n",
        Path::new("/t.toml"),
    )
    .unwrap();
    let s = Snapshot {
        mcal: McalState {
            global_total: u64::MAX / 2,
            ..Default::default()
        },
        ..Default::default()
    };
    let a = admit(&c, &hello("X"), &s, at()).unwrap();
    assert_eq!((a.mcal_debit, a.space_left), (None, None));
}

#[test]
fn debit_month_is_the_server_zone_month() {
    let c = cfg();
    // 23:30 UTC on 30 November is already December in Berlin.
    let late: Timestamp = "2026-11-30T23:30:00Z".parse().unwrap();
    let a = admit(&c, &hello("X"), &Snapshot::default(), late).unwrap();
    assert_eq!(
        a.mcal_debit,
        Some((
            Month {
                year: 2026,
                month: 12
            },
            1
        ))
    );
}

#[test]
fn hello_debug_hides_secrets() {
    let mut h = hello("X");
    h.secret = Some("hunter2".into());
    h.enroll_key = Some("open-sesame".into());
    let d = format!("{h:?}");
    assert!(!d.contains("hunter2") && !d.contains("open-sesame"), "{d}");
}
