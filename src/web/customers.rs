//! "Add a New Customer" (issue 16; docs/console.md): the form that writes
//! a customer's own file into an `[[include]]` directory, and "Edit" and
//! "Deactivate", which rewrite that file.
//!
//! Who may write where: a reseller only through its own include; the admin
//! through the reseller's include or else an admin's. The file's name
//! comes from the customer's name (`config::customer_file::file_name`),
//! never from the request, so no request can name a path. A customer
//! login writes nothing.
//!
//! Every save goes through the validator the file goes through, with the
//! new text in place of the file (`Config::check_with`). Only a valid set
//! is written: temp file, fsync, rename, fsync the directory. Then the
//! daemon reloads; if the reload is refused, the old file comes back. A
//! file that changed on disk after the form was opened (its SHA-256 is not
//! the one the form carries) is never overwritten. Every change is kept in
//! the state's audit log, and the admin's page lists it.

use super::auth::{Authed, Login};
use super::pages::{customer_for, message, render, reseller_for, seg, who};
use super::{Console, WebError};
use crate::config::customer_file::{self, Draft, DraftAggregate, DraftThrottle};
use crate::config::{Config, ConfigError, CustomerId, LoadError, Rule};
use crate::server::ReloadRecord;
use axum::Form;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use minijinja::context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Longest customer name the form takes.
pub const MAX_NAME: usize = 100;
/// Longest value of any other one-line field.
pub const MAX_FIELD: usize = 500;
/// Longest notes.
pub const MAX_NOTES: usize = 4000;
/// Customers the console adds to one reseller at most (each is a file the
/// daemon reads at every reload).
pub const MAX_CUSTOMERS: usize = 1000;
/// Saves one web user may make in a minute (each one reloads the daemon).
pub const SAVES_PER_MINUTE: usize = 20;
/// How long a save waits for the daemon's reload.
pub const RELOAD_WAIT: Duration = Duration::from_secs(60);

/// The form's fields, as posted (an unticked box is absent). Passwords are
/// never sent back to the browser.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct CustomerForm {
    /// The session's CSRF token.
    #[serde(skip_serializing)]
    pub csrf: String,
    /// SHA-256 of the file when the form was opened; "new" for a new one.
    pub base: String,
    /// `name`.
    pub name: String,
    /// `email`.
    pub email: String,
    /// `address`.
    pub address: String,
    /// `city`.
    pub city: String,
    /// `phone`.
    pub phone: String,
    /// `fax`.
    pub fax: String,
    /// `notes`.
    pub notes: String,
    /// `backup_location` (the admin's; a reseller's is derived).
    pub backup_location: String,
    /// `space`.
    pub space: String,
    /// `auto_add_clients`.
    pub auto_add_clients: Option<String>,
    /// A new enroll key (hashed before it touches disk).
    #[serde(skip_serializing)]
    pub enroll_key: String,
    /// The same again.
    #[serde(skip_serializing)]
    pub enroll_key_confirm: String,
    /// Remove the enroll key (an edit).
    pub enroll_key_clear: Option<String>,
    /// Whether the file has an enroll key now (shown on an edit).
    pub has_enroll_key: bool,
    /// `email_reports`.
    pub email_reports: Option<String>,
    /// `web_access` on.
    pub web_access: Option<String>,
    /// Its user name.
    pub web_user: String,
    /// A new password (hashed before it touches disk).
    #[serde(skip_serializing)]
    pub web_password: String,
    /// The same again.
    #[serde(skip_serializing)]
    pub web_password_confirm: String,
    /// Whether the file has a web password now (an edit).
    pub has_web_password: bool,
    /// "auto" or "fixed".
    pub mcal_mode: String,
    /// The fixed number.
    pub mcal_fixed: String,
    /// "yes" or "no".
    pub activated: String,
    /// `max_clients`; empty = no limit.
    pub max_clients: String,
    /// "inherit" or "custom".
    pub throttle_mode: String,
    /// Throttling on (custom).
    pub throttle_enabled: Option<String>,
    /// "always" or "hours".
    pub throttle_when: String,
    /// Start of the hours, HH:MM.
    pub throttle_from: String,
    /// End of the hours, HH:MM.
    pub throttle_to: String,
    /// No throttling on weekends.
    pub throttle_weekends: Option<String>,
    /// The rate per backup.
    pub throttle_rate: String,
    /// Aggregate cap rate; empty = none.
    pub aggregate_rate: String,
    /// "always" or "HH:MM-HH:MM".
    pub aggregate_hours: String,
    /// No cap on weekends.
    pub aggregate_weekends: Option<String>,
    /// A consolidated report on.
    pub report: Option<String>,
    /// Its recipients, comma-separated.
    pub report_recipients: String,
    /// daily, weekly or monthly.
    pub report_frequency: String,
    /// `send_account_details`.
    pub send_account_details: Option<String>,
}

fn on(b: bool) -> Option<String> {
    b.then(|| "on".to_string())
}

impl CustomerForm {
    /// A new customer's form, with the seed's defaults.
    fn new_customer(cfg: &Config) -> CustomerForm {
        CustomerForm {
            base: "new".into(),
            auto_add_clients: on(true),
            mcal_mode: "auto".into(),
            activated: "yes".into(),
            throttle_mode: "inherit".into(),
            throttle_enabled: on(true),
            throttle_when: "always".into(),
            aggregate_hours: "always".into(),
            report_frequency: "weekly".into(),
            send_account_details: on(cfg.server.email.is_some() && cfg.server.web.is_some()),
            ..Default::default()
        }
    }

    /// The form for the customer table `t` of a file whose hash is `base`.
    fn from_table(t: &toml::Table, base: String) -> CustomerForm {
        let s = |v: Option<&toml::Value>| match v {
            Some(toml::Value::String(s)) => s.clone(),
            Some(toml::Value::Integer(n)) => n.to_string(),
            _ => String::new(),
        };
        let b = |v: Option<&toml::Value>, d: bool| v.and_then(|v| v.as_bool()).unwrap_or(d);
        let sub = |k: &str| t.get(k).and_then(|v| v.as_table());
        let mut f = CustomerForm {
            base,
            name: s(t.get("name")),
            email: s(t.get("email")),
            address: s(t.get("address")),
            city: s(t.get("city")),
            phone: s(t.get("phone")),
            fax: s(t.get("fax")),
            notes: s(t.get("notes")),
            backup_location: s(t.get("backup_location")),
            // A plain number of bytes reads back with its unit.
            space: match t.get("space") {
                Some(toml::Value::Integer(n)) => format!("{n} B"),
                v => s(v),
            },
            auto_add_clients: on(b(t.get("auto_add_clients"), false)),
            has_enroll_key: t.get("enroll_key").is_some(),
            email_reports: on(b(t.get("email_reports"), false)),
            activated: if b(t.get("activated"), true) {
                "yes"
            } else {
                "no"
            }
            .into(),
            max_clients: s(t.get("max_clients")),
            send_account_details: on(b(t.get("send_account_details"), false)),
            throttle_mode: "inherit".into(),
            throttle_enabled: on(true),
            throttle_when: "always".into(),
            aggregate_hours: "always".into(),
            report_frequency: "weekly".into(),
            ..Default::default()
        };
        match t.get("mcal_limit") {
            Some(toml::Value::Integer(n)) => {
                f.mcal_mode = "fixed".into();
                f.mcal_fixed = n.to_string();
            }
            _ => f.mcal_mode = "auto".into(),
        }
        if let Some(w) = sub("web_access") {
            f.web_access = on(true);
            f.web_user = s(w.get("user").or_else(|| w.get("username")));
            f.has_web_password = w.get("password").is_some();
        }
        if let Some(th) = sub("throttle") {
            f.throttle_mode = "custom".into();
            f.throttle_enabled = on(b(th.get("enabled"), true));
            f.throttle_rate = s(th.get("rate"));
            f.throttle_weekends = on(b(th.get("weekends_unthrottled"), false));
            let hours = s(th.get("hours"));
            if let Some((from, to)) = hours.split_once('-') {
                f.throttle_when = "hours".into();
                f.throttle_from = from.trim().into();
                f.throttle_to = to.trim().into();
            }
        }
        if let Some(a) = sub("aggregate") {
            f.aggregate_rate = s(a.get("rate"));
            let hours = s(a.get("hours"));
            f.aggregate_hours = if hours.is_empty() {
                "always".into()
            } else {
                hours
            };
            f.aggregate_weekends = on(b(a.get("weekends_unthrottled"), false));
        }
        if let Some(r) = sub("consolidated_report") {
            f.report = on(true);
            f.report_recipients = r
                .get("recipients")
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            f.report_frequency = s(r.get("frequency"));
        }
        f
    }

    /// Every field within its length bound and free of control
    /// characters (the notes may have line breaks).
    fn bounded(&self) -> Result<(), String> {
        let all = [
            &self.name,
            &self.base,
            &self.email,
            &self.address,
            &self.city,
            &self.phone,
            &self.fax,
            &self.notes,
            &self.backup_location,
            &self.space,
            &self.enroll_key,
            &self.enroll_key_confirm,
            &self.web_user,
            &self.web_password,
            &self.web_password_confirm,
            &self.mcal_mode,
            &self.mcal_fixed,
            &self.activated,
            &self.max_clients,
            &self.throttle_mode,
            &self.throttle_when,
            &self.throttle_from,
            &self.throttle_to,
            &self.throttle_rate,
            &self.aggregate_rate,
            &self.aggregate_hours,
            &self.report_recipients,
            &self.report_frequency,
        ];
        let clean = |s: &str| !s.chars().any(char::is_control);
        if self.name.chars().count() > MAX_NAME
            || self.notes.len() > MAX_NOTES
            || all.iter().any(|s| s.len() > MAX_FIELD)
        {
            return Err(format!(
                "A field is too long: a name is at most {MAX_NAME} characters, the notes {MAX_NOTES}, other fields {MAX_FIELD}."
            ));
        }
        if !all.iter().all(|s| clean(s))
            || self
                .notes
                .chars()
                .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            return Err("A field holds a control character; only the notes may span lines.".into());
        }
        Ok(())
    }
}

/// Errors beside each field (keyed like the TOML keys), and those that
/// belong to no field.
#[derive(Debug, Default, Serialize)]
struct Problems {
    fields: BTreeMap<String, Vec<String>>,
    general: Vec<String>,
    /// They come from a save (rather than from opening the form).
    posted: bool,
}

impl Problems {
    fn field(&mut self, key: &str, msg: impl Into<String>) {
        self.fields.entry(key.into()).or_default().push(msg.into());
    }
    fn is_empty(&self) -> bool {
        self.fields.is_empty() && self.general.is_empty()
    }
}

/// What is wrong with `name` before the validator sees it: a customer
/// file must be named after it.
fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("a customer needs a name")
    } else if customer_file::file_name(name).is_none() {
        Some("this name is too long to be a file name; shorten it")
    } else {
        None
    }
}

/// The form's own checks, and the draft it describes when they pass (with
/// passwords still to hash: `hash_me` holds the plain ones by key).
fn draft_of(
    f: &CustomerForm,
    reseller: &str,
    backup_location: String,
    old: Option<&toml::Table>,
    p: &mut Problems,
) -> Draft {
    let name = f.name.trim().to_string();
    if let Some(why) = name_problem(&name) {
        p.field("name", why);
    }
    let old_str = |path: &[&str]| {
        let mut v = old.map(|t| toml::Value::Table(t.clone()))?;
        for k in path {
            v = v.as_table()?.get(*k)?.clone();
        }
        v.as_str().map(str::to_string)
    };
    // The enroll key: a new one typed twice, the old hash kept, or none.
    let enroll_key = if !f.enroll_key.is_empty() {
        if f.enroll_key != f.enroll_key_confirm {
            p.field("enroll_key", "the two entries differ");
        }
        Some(String::new())
    } else if f.enroll_key_clear.is_some() {
        None
    } else {
        old_str(&["enroll_key"])
    };
    let web_access = if f.web_access.is_some() {
        let user = f.web_user.trim().to_string();
        if user.is_empty() {
            p.field("web_access", "a user name is needed for web access");
        }
        let kept = old_str(&["web_access", "password"]);
        if !f.web_password.is_empty() {
            if f.web_password != f.web_password_confirm {
                p.field("web_access", "the two passwords differ");
            }
            Some((user, String::new()))
        } else if let Some(hash) = kept {
            Some((user, hash))
        } else {
            p.field("web_access", "a password is needed for web access");
            Some((user, String::new()))
        }
    } else {
        None
    };
    let whole = |s: &str, key: &str, what: &str, p: &mut Problems| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() {
            return None;
        }
        s.parse::<u64>()
            .ok()
            .filter(|&n| i64::try_from(n).is_ok())
            .or_else(|| {
                p.field(key, format!("{what}: a whole number, e.g. 25"));
                None
            })
    };
    let mcal_limit = if f.mcal_mode == "fixed" {
        let n = whole(&f.mcal_fixed, "mcal_limit", "MCALs", p);
        if n.is_none() && f.mcal_fixed.trim().is_empty() {
            p.field(
                "mcal_limit",
                "give the number of MCALs, or choose automatic",
            );
        }
        n
    } else {
        None
    };
    let max_clients = whole(&f.max_clients, "max_clients", "clients", p);
    let throttle = if f.throttle_mode != "custom" {
        DraftThrottle::Inherit
    } else if f.throttle_enabled.is_none() {
        DraftThrottle::Off
    } else {
        let rate = f.throttle_rate.trim().to_string();
        if rate.is_empty() {
            p.field(
                "throttle",
                "give the rate each backup may reach, e.g. 20 Mbit/s",
            );
        }
        let hours = if f.throttle_when == "hours" {
            format!("{}-{}", f.throttle_from.trim(), f.throttle_to.trim())
        } else {
            "always".into()
        };
        DraftThrottle::On {
            rate,
            hours,
            weekends_unthrottled: f.throttle_weekends.is_some(),
        }
    };
    let aggregate = (!f.aggregate_rate.trim().is_empty()).then(|| DraftAggregate {
        rate: f.aggregate_rate.trim().to_string(),
        hours: match f.aggregate_hours.trim() {
            "" => "always".into(),
            h => h.to_string(),
        },
        weekends_unthrottled: f.aggregate_weekends.is_some(),
    });
    let consolidated_report = f.report.is_some().then(|| {
        let to: Vec<String> = f
            .report_recipients
            .split([',', ';', ' ', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if to.is_empty() {
            p.field("consolidated_report", "give at least one recipient");
        }
        (to, f.report_frequency.trim().to_string())
    });
    let trim = |s: &str| s.trim().to_string();
    Draft {
        name,
        reseller: reseller.to_string(),
        email: trim(&f.email),
        records: [
            ("address", trim(&f.address)),
            ("city", trim(&f.city)),
            ("phone", trim(&f.phone)),
            ("fax", trim(&f.fax)),
            ("notes", f.notes.trim_end().to_string()),
        ],
        backup_location,
        space: Some(trim(&f.space)).filter(|s| !s.is_empty()),
        auto_add_clients: f.auto_add_clients.is_some(),
        enroll_key,
        email_reports: f.email_reports.is_some(),
        web_access,
        mcal_limit,
        activated: f.activated != "no",
        max_clients,
        throttle,
        aggregate,
        consolidated_report,
        send_account_details: f.send_account_details.is_some(),
    }
}

/// Where a login's customer files for `reseller` go, and the customer
/// `name`'s file there.
fn place(cfg: &Config, login: &Login, reseller: &str, name: &str) -> Option<PathBuf> {
    let file = customer_file::file_name(name)?;
    let inc = customer_file::include_for(&cfg.includes, reseller, *login == Login::Admin, &file)?;
    Some(inc.dir.join(file))
}

/// Where a reseller's new customers' backups go: beside the Default
/// Customer's, under the reseller's name (a reseller never picks a path).
fn derived_location(cfg: &Config, reseller: &str, name: &str) -> String {
    let root = cfg.customers[0]
        .backup_location
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let dir = root.join(customer_file::dir_name(reseller));
    if name.is_empty() {
        return format!("{}/", dir.display());
    }
    dir.join(customer_file::dir_name(name))
        .display()
        .to_string()
}

/// A customer's file as it is now: its hash, its bytes, and its customer
/// table and client tables. `Ok(None)` when there is no such file.
fn read_file(path: &std::path::Path) -> std::io::Result<Option<(String, String)>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some((
            crate::storage::sha256_hex(&b),
            String::from_utf8_lossy(&b).into_owned(),
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The page for a form: new (under `reseller`) or an edit of `editing`.
struct Page<'a> {
    reseller: &'a str,
    editing: Option<CustomerId>,
}

async fn form_page(
    console: &Arc<Console>,
    authed: &Authed,
    cfg: &Arc<Config>,
    page: Page<'_>,
    f: &CustomerForm,
    p: &Problems,
) -> Result<Html<String>, WebError> {
    let rid = cfg
        .reseller_by_name(page.reseller)
        .ok_or(WebError::NotFound)?;
    let r = cfg.reseller(rid);
    let allotted_to_customers =
        crate::policy::space::allotted_to_children(cfg, crate::policy::space::Node::Reseller(rid));
    let snapshot = context! {
        allotted => r.space,
        allotted_to_customers => allotted_to_customers,
        free => r.space.map(|s| s.saturating_sub(allotted_to_customers)),
    };
    let pool = match &cfg.server.mcal {
        Some(m) => {
            let _turn = super::pages::turn(console).await?;
            let used = console.ctx.state.totals(cfg, crate::clock::now()).await?;
            Some(crate::policy::space::pool_snapshot(m, used.global_debits))
        }
        None => None,
    };
    let admin = authed.login == Login::Admin;
    let action = match page.editing {
        Some(c) => format!("/customers/{}/edit", seg(&cfg.customer(c).name)),
        None => format!("/resellers/{}/customers/new", seg(page.reseller)),
    };
    render(
        console,
        "customer_form.html",
        context! {
            who => who(authed),
            crumbs => vec![context! { href => format!("/resellers/{}", seg(page.reseller)), name => page.reseller }],
            editing => page.editing.map(|c| cfg.customer(c).name.clone()),
            action => action,
            reseller => page.reseller,
            admin => admin,
            derived => if f.name.trim().is_empty() {
                derived_location(cfg, page.reseller, "") + "(from the customer's name)"
            } else {
                derived_location(cfg, page.reseller, f.name.trim())
            },
            snapshot => snapshot,
            pool => pool,
            email_set => cfg.server.email.is_some(),
            f => f,
            errors => p.fields,
            general => p.general,
            posted => p.posted,
        },
    )
    .await
}

/// `GET /resellers/{reseller}/customers/new`.
pub async fn new_form(
    State(console): State<Arc<Console>>,
    authed: Authed,
    Path(reseller): Path<String>,
) -> Result<Html<String>, WebError> {
    let cfg = console.ctx.cfg.load_full();
    let rid = reseller_for(&cfg, &authed.login, &reseller)?;
    let name = cfg.reseller(rid).name.clone();
    let mut p = Problems::default();
    let admin = authed.login == Login::Admin;
    if customer_file::includes_for(&cfg.includes, &name, admin, None)
        .next()
        .is_none()
    {
        p.general.push(no_directory(&name));
    }
    let f = CustomerForm::new_customer(&cfg);
    form_page(
        &console,
        &authed,
        &cfg,
        Page {
            reseller: &name,
            editing: None,
        },
        &f,
        &p,
    )
    .await
}

fn no_directory(reseller: &str) -> String {
    format!(
        "No directory takes customer files for reseller {reseller:?}: the server's admin adds an [[include]] with reseller = {reseller:?} to the main configuration first (docs/configuration.md)."
    )
}

/// `POST /resellers/{reseller}/customers/new`.
pub async fn create(
    State(console): State<Arc<Console>>,
    authed: Authed,
    Path(reseller): Path<String>,
    Form(f): Form<CustomerForm>,
) -> Result<Response, WebError> {
    authed.check_csrf(&f.csrf)?;
    let cfg = console.ctx.cfg.load_full();
    let rid = reseller_for(&cfg, &authed.login, &reseller)?;
    let reseller = cfg.reseller(rid).name.clone();
    save(&console, &authed, &reseller, None, f).await
}

/// The customer `name` and its file, if `login` may edit it there.
fn editable(
    cfg: &Config,
    login: &Login,
    name: &str,
) -> Result<(CustomerId, String, Option<PathBuf>), WebError> {
    if matches!(login, Login::Customer(_)) {
        return Err(WebError::NotFound);
    }
    let id = customer_for(cfg, login, name)?;
    let c = cfg.customer(id);
    let reseller = c
        .reseller
        .map(|r| cfg.reseller(r).name.clone())
        .ok_or(WebError::NotFound)?;
    // The admin's customers may sit in the reseller's directory or in an
    // admin's: the one that holds the file, else where a new one would go.
    let file = customer_file::file_name(&c.name);
    let held = file.as_ref().and_then(|file| {
        customer_file::includes_for(&cfg.includes, &reseller, *login == Login::Admin, Some(file))
            .map(|i| i.dir.join(file))
            .find(|p| p.is_file())
    });
    let path = held.or_else(|| place(cfg, login, &reseller, &c.name));
    Ok((id, reseller, path))
}

/// Why a customer cannot be edited here.
fn not_here(login: &Login) -> String {
    match login {
        Login::Admin => "This customer is not kept in a file of its own in an include directory (it is in the main configuration, or in a file arranged by hand): edit it there.".into(),
        _ => "This customer's settings are kept by the server's admin: ask them to change it.".into(),
    }
}

/// The form for customer `id` as its file at `path` holds it now, if that
/// file is in the console's shape and holds that customer.
async fn form_of_file(
    cfg: &Config,
    id: CustomerId,
    path: Option<PathBuf>,
) -> Option<(CustomerForm, PathBuf)> {
    let path = path?;
    let p = path.clone();
    let (hash, text) = tokio::task::spawn_blocking(move || read_file(&p))
        .await
        .ok()?
        .ok()??;
    let (t, _) = customer_file::split(&text)?;
    let same = t
        .get("name")
        .and_then(|n| n.as_str())
        .is_some_and(|n| n.to_lowercase() == cfg.customer(id).name.to_lowercase());
    same.then(|| (CustomerForm::from_table(&t, hash), path))
}

/// `GET /customers/{customer}/edit`.
pub async fn edit_form(
    State(console): State<Arc<Console>>,
    authed: Authed,
    Path(name): Path<String>,
) -> Result<Response, WebError> {
    let cfg = console.ctx.cfg.load_full();
    let (id, reseller, path) = editable(&cfg, &authed.login, &name)?;
    let Some((f, _)) = form_of_file(&cfg, id, path).await else {
        return Ok(message(&console, &authed, "Edit", &not_here(&authed.login))
            .await?
            .into_response());
    };
    let page = Page {
        reseller: &reseller,
        editing: Some(id),
    };
    Ok(
        form_page(&console, &authed, &cfg, page, &f, &Problems::default())
            .await?
            .into_response(),
    )
}

/// `POST /customers/{customer}/edit`.
pub async fn update(
    State(console): State<Arc<Console>>,
    authed: Authed,
    Path(name): Path<String>,
    Form(mut f): Form<CustomerForm>,
) -> Result<Response, WebError> {
    authed.check_csrf(&f.csrf)?;
    let cfg = console.ctx.cfg.load_full();
    let (id, reseller, path) = editable(&cfg, &authed.login, &name)?;
    let Some(path) = path else {
        return Ok(message(&console, &authed, "Edit", &not_here(&authed.login))
            .await?
            .into_response());
    };
    // An edit never renames: the name (and so the file) stays.
    f.name = cfg.customer(id).name.clone();
    save(&console, &authed, &reseller, Some(Edit { id, path }), f).await
}

/// The activation buttons' form.
#[derive(Debug, Deserialize)]
pub struct Activation {
    csrf: String,
    /// "yes" or "no".
    activated: String,
}

/// `POST /customers/{customer}/activation`: "Deactivate" and "Activate"
/// rewrite the customer's file with only `activated` changed.
pub async fn activation(
    State(console): State<Arc<Console>>,
    authed: Authed,
    Path(name): Path<String>,
    Form(a): Form<Activation>,
) -> Result<Response, WebError> {
    authed.check_csrf(&a.csrf)?;
    let cfg = console.ctx.cfg.load_full();
    let (id, reseller, path) = editable(&cfg, &authed.login, &name)?;
    let Some((mut f, path)) = form_of_file(&cfg, id, path).await else {
        return Ok(
            message(&console, &authed, "Activation", &not_here(&authed.login))
                .await?
                .into_response(),
        );
    };
    f.activated = if a.activated == "no" { "no" } else { "yes" }.into();
    f.name = cfg.customer(id).name.clone();
    save(&console, &authed, &reseller, Some(Edit { id, path }), f).await
}

impl Console {
    /// Counts a save by `user`; false past [`SAVES_PER_MINUTE`].
    fn may_save(&self, user: &str) -> bool {
        let now = tokio::time::Instant::now();
        let mut saves = self.saves.lock().unwrap_or_else(|p| p.into_inner());
        saves.retain(|_, v| {
            v.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
            !v.is_empty()
        });
        let mine = saves.entry(user.to_lowercase()).or_default();
        if mine.len() >= SAVES_PER_MINUTE {
            return false;
        }
        mine.push(now);
        true
    }
}

/// What is the saving login's own, for sorting errors: the customer's
/// name and its reseller's customers.
struct Ours<'a> {
    reseller: &'a str,
    name: &'a str,
    customers: std::collections::HashSet<String>,
}

impl<'a> Ours<'a> {
    fn of(cfg: &Config, reseller: &'a str, name: &'a str) -> Ours<'a> {
        let mut customers: std::collections::HashSet<String> = cfg
            .reseller_by_name(reseller)
            .map(|r| {
                cfg.reseller(r)
                    .customers
                    .iter()
                    .map(|&c| cfg.customer(c).name.to_lowercase())
                    .collect()
            })
            .unwrap_or_default();
        customers.insert(name.to_lowercase());
        Ours {
            reseller,
            name,
            customers,
        }
    }
}

/// Which form field a validation error belongs to, if any: errors in the
/// customer's own table by key, and its reseller's over-allocation (which
/// the space field causes) at `space`.
fn field_of(e: &ConfigError, file: &std::path::Path, ours: &Ours<'_>) -> Option<String> {
    if e.rule == Rule::SpaceOverAllocated {
        let mine = e.key == format!("reseller[{}].space", ours.reseller)
            || e.key
                .strip_prefix("customer[")
                .and_then(|k| k.strip_suffix("].space"))
                .is_some_and(|c| ours.customers.contains(&c.to_lowercase()));
        return mine.then(|| "space".into());
    }
    if e.file != file {
        return None;
    }
    let rest = e
        .key
        .strip_prefix(&format!("customer[{}].", ours.name))
        .or_else(|| e.key.strip_prefix("customer[#1]."))?;
    let field = rest.split(['.', '[']).next()?;
    let field = match field {
        "username" | "user" | "password" => "web_access",
        f => f,
    };
    Some(field.to_string())
}

/// What a reseller is told of an error in its own file: a clash names
/// what it clashes with (another reseller's customer, login or path), so
/// a reseller learns only that there is one.
fn for_login(e: &ConfigError, login: &Login) -> String {
    match (login, e.rule) {
        (Login::Admin, _) => e.message.clone(),
        (_, Rule::Duplicate) => {
            "this is already in use elsewhere on the server; choose another".into()
        }
        (_, Rule::Overlap) => {
            "this backup location overlaps another one on the server; choose another name".into()
        }
        _ => e.message.clone(),
    }
}

/// Sorts the validator's errors onto the form. Errors elsewhere in the set
/// are shown whole to the admin; a reseller learns only that there are
/// some (they may name other resellers' customers and files).
fn place_errors(
    errors: &[ConfigError],
    file: &std::path::Path,
    ours: &Ours<'_>,
    login: &Login,
    p: &mut Problems,
) {
    let mut elsewhere = 0;
    for e in errors {
        match field_of(e, file, ours) {
            Some(field) => p.field(&field, for_login(e, login)),
            None if e.file == file => p
                .general
                .push(format!("{}: {}", e.key, for_login(e, login))),
            None if *login == Login::Admin => p.general.push(e.to_string()),
            None => elsewhere += 1,
        }
    }
    if elsewhere > 0 {
        p.general.push(format!(
            "The server's configuration has {elsewhere} problem(s) outside this customer; nothing can be saved until the server's admin fixes them."
        ));
    }
}

/// Asks the daemon's reload task to reload and waits for its outcome.
async fn reload(console: &Console) -> Option<ReloadRecord> {
    let tx = console.ctx.reload_now.get()?;
    let (ask, answer) = tokio::sync::oneshot::channel();
    tx.send(Some(ask)).ok()?;
    tokio::time::timeout(RELOAD_WAIT, answer).await.ok()?.ok()
}

/// A customer being edited: its id and the file it is kept in.
struct Edit {
    id: CustomerId,
    path: PathBuf,
}

/// The SHA-256 of `path` now, or None when there is no such file.
async fn disk_hash(path: &std::path::Path) -> std::io::Result<Option<String>> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || read_file(&p))
        .await
        .map_err(std::io::Error::other)?
        .map(|f| f.map(|(h, _)| h))
}

/// Checks, writes and applies one customer's file, or shows the form again
/// with each problem beside its field (writing nothing).
async fn save(
    console: &Arc<Console>,
    authed: &Authed,
    reseller: &str,
    editing: Option<Edit>,
    f: CustomerForm,
) -> Result<Response, WebError> {
    let cfg = console.ctx.cfg.load_full();
    let mut p = Problems::default();
    let page = Page {
        reseller,
        editing: editing.as_ref().map(|e| e.id),
    };
    if !console.may_save(&authed.user) {
        p.general.push(format!(
            "More than {SAVES_PER_MINUTE} changes in a minute from this login; wait a minute and save again."
        ));
        return again(console, authed, &cfg, page, f, p).await;
    }
    if let Err(why) = f.bounded() {
        p.general.push(why);
        return again(console, authed, &cfg, page, f, p).await;
    }
    // An edit keeps the name exactly (its file and history are named after it).
    let name = match &editing {
        Some(e) => cfg.customer(e.id).name.clone(),
        None => f.name.trim().to_string(),
    };
    if editing.is_none() {
        let count = cfg
            .reseller_by_name(reseller)
            .map_or(0, |r| cfg.reseller(r).customers.len());
        if count >= MAX_CUSTOMERS {
            p.general.push(format!(
                "Reseller {reseller} has {count} customers; the console adds at most {MAX_CUSTOMERS} to one reseller. The server's admin can add more in the files."
            ));
            return again(console, authed, &cfg, page, f, p).await;
        }
    }
    // Typed passwords are hashed first, outside the lock below, on the
    // daemon's bounded argon2 pool.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let hashed = |secret: &str, confirm: &str| {
        let go = !secret.is_empty() && secret == confirm;
        let secret = secret.to_string();
        let limits = console.ctx.limits.clone();
        async move {
            if !go {
                return Ok(None);
            }
            match limits.hash(&secret, deadline).await {
                Some(h) => Ok(Some(h.as_str().to_string())),
                None => Err(WebError::Busy),
            }
        }
    };
    let enroll_hash = hashed(&f.enroll_key, &f.enroll_key_confirm).await?;
    let web_hash = hashed(&f.web_password, &f.web_password_confirm).await?;

    // One save at a time: the check of the file on disk, the validation
    // and the write are one step, against the config in force now.
    let _one = console.edits.lock().await;
    let cfg = console.ctx.cfg.load_full();
    let path = match &editing {
        Some(e) => Some(e.path.clone()),
        None => place(&cfg, &authed.login, reseller, &name),
    };
    let Some(path) = path else {
        match name_problem(&name) {
            Some(why) => p.field("name", why),
            None => p.general.push(no_directory(reseller)),
        }
        return again(console, authed, &cfg, page, f, p).await;
    };
    let p2 = path.clone();
    let now = match tokio::task::spawn_blocking(move || read_file(&p2)).await {
        Ok(Ok(n)) => n,
        _ => {
            warn!(file = %path.display(), "web console: cannot read a customer file");
            p.general.push(
                "The customer's file cannot be read; the server's log has the details.".into(),
            );
            return again(console, authed, &cfg, page, f, p).await;
        }
    };
    let (old_text, old_table, clients) = match (&now, &editing) {
        (Some(_), None) => {
            p.field(
                "name",
                "a customer file with this name already exists; choose another name, or edit that customer",
            );
            return again(console, authed, &cfg, page, f, p).await;
        }
        (None, Some(_)) => {
            p.general.push(
                "The customer's file is gone from disk (removed by hand?); nothing was written."
                    .into(),
            );
            return again(console, authed, &cfg, page, f, p).await;
        }
        (Some((hash, _)), Some(_)) if *hash != f.base => {
            p.general.push(CHANGED_ON_DISK.into());
            return again(console, authed, &cfg, page, f, p).await;
        }
        (Some((_, text)), Some(_)) => match customer_file::split(text) {
            Some((t, clients)) => (Some(text.clone()), Some(t), clients.to_string()),
            None => {
                p.general.push(not_here(&authed.login));
                return again(console, authed, &cfg, page, f, p).await;
            }
        },
        (None, None) => (None, None, String::new()),
    };
    let base = now.as_ref().map(|(h, _)| h.clone());
    let admin = authed.login == Login::Admin;
    let typed = f.backup_location.trim();
    let location = match &old_table {
        // A reseller never chooses a path; an edit keeps the one it had.
        Some(t) if !admin || typed.is_empty() => t
            .get("backup_location")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string(),
        _ if admin && !typed.is_empty() => typed.to_string(),
        _ => derived_location(&cfg, reseller, &name),
    };
    let mut g = f.clone();
    g.name = name.clone();
    let mut draft = draft_of(&g, reseller, location, old_table.as_ref(), &mut p);
    if !p.is_empty() {
        return again(console, authed, &cfg, page, f, p).await;
    }
    if let Some(h) = enroll_hash {
        draft.enroll_key = Some(h);
    }
    if let (Some((_, hash)), Some(h)) = (&mut draft.web_access, web_hash) {
        *hash = h;
    }
    let at = crate::clock::now();
    // Who, for the file's header and the audit log alike.
    let login = match &authed.login {
        Login::Admin => "admin".to_string(),
        Login::Reseller(r) => format!("reseller {r}"),
        Login::Customer(c) => format!("customer {c}"),
    };
    let header = format!(
        "Written by the tollgate web console for {login} (user {}) at {}.\nEdits made here by hand are kept: the console will not overwrite\nthis file if it changed after its form was opened.",
        authed.user,
        crate::state::status::when(&cfg, Some(at.as_second()))
    );
    let mut text = draft.render(&header);
    if !clients.is_empty() {
        text.push('\n');
        text.push_str(&clients);
    }
    let (main, p2, t2) = (cfg.path.clone(), path.clone(), text.clone());
    let checked = tokio::task::spawn_blocking(move || Config::check_with(&main, &p2, &t2))
        .await
        .unwrap_or_else(|e| {
            Err(LoadError::Read {
                path: cfg.path.clone(),
                source: std::io::Error::other(e.to_string()),
            })
        });
    match checked {
        Ok(_) => {}
        Err(LoadError::Invalid(errors)) => {
            let ours = Ours::of(&cfg, reseller, &name);
            place_errors(&errors, &path, &ours, &authed.login, &mut p);
            return again(console, authed, &cfg, page, f, p).await;
        }
        Err(e) => {
            warn!(error = %e, "web console: cannot check the configuration");
            p.general.push(
                "The server's configuration cannot be read; the server's log has the details."
                    .into(),
            );
            return again(console, authed, &cfg, page, f, p).await;
        }
    }
    // Last look before the rename: a hand edit made while the set was
    // being checked is not overwritten either.
    if disk_hash(&path).await.ok() != Some(base.clone()) {
        p.general.push(CHANGED_ON_DISK.into());
        return again(console, authed, &cfg, page, f, p).await;
    }
    let ours = Some(crate::storage::sha256_hex(text.as_bytes()));
    if let Err(e) = write(&path, Some(text.clone())).await {
        // The rename may have happened before the directory's fsync failed.
        if disk_hash(&path).await.ok() != Some(ours.clone()) {
            warn!(file = %path.display(), error = %e, "web console: cannot write a customer file");
            p.general.push("The customer's file could not be written (the disk may be full); nothing changed. The server's log has the details.".into());
            return again(console, authed, &cfg, page, f, p).await;
        }
        warn!(file = %path.display(), error = %e, "web console: a customer file was written, but its directory could not be synced");
    }
    let done = match reload(console).await {
        Some(r) if !r.ok => {
            // Put the old file back (unless someone changed it since): a
            // set the daemon refuses must not wait on disk for the next
            // reload.
            let restored = if disk_hash(&path).await.ok() == Some(ours.clone()) {
                write(&path, old_text).await.is_ok()
            } else {
                false
            };
            if !restored {
                warn!(file = %path.display(), "web console: a refused customer file could not be put back");
            }
            let _ = reload(console).await;
            p.general.push(if restored {
                "The daemon refused the new configuration; the file was put back as it was, and nothing changed.".into()
            } else {
                "The daemon refused the new configuration, and the file could not be put back; the server's admin must look at it.".into()
            });
            if admin {
                p.general.push(r.summary);
                p.general.extend(r.errors);
            }
            return again(console, authed, &cfg, page, f, p).await;
        }
        Some(_) => "saved",
        None => {
            warn!("web console: no reload answer; the file watcher will apply the change");
            "saved-pending"
        }
    };
    let action = match (&editing, old_table.as_ref()) {
        (None, _) => "add",
        (Some(_), Some(t))
            if t.get("activated").and_then(|v| v.as_bool()).unwrap_or(true) != draft.activated =>
        {
            if draft.activated {
                "activate"
            } else {
                "deactivate"
            }
        }
        _ => "edit",
    };
    let detail = changed_keys(old_table.as_ref(), &text);
    let entry = crate::state::console::AuditEntry {
        at: at.as_second(),
        login,
        username: authed.user.clone(),
        action: action.into(),
        customer: name.clone(),
        file: path.display().to_string(),
        detail: detail.clone(),
    };
    info!(
        user = %crate::config::escape_log(&authed.user, 64),
        customer = %crate::config::escape_log(&name, 100),
        file = %path.display(),
        action = %action,
        detail = %detail,
        "web console: customer saved"
    );
    // The change is made: a failed audit row is logged, not shown as a
    // failed save (a retry would find the file already there).
    if let Err(e) = console.ctx.state.record_audit(&entry).await {
        tracing::error!(error = %e, customer = %crate::config::escape_log(&name, 100), "web console: the audit log could not record a change");
    }
    Ok(Redirect::to(&format!(
        "/customers/{}?done={done}&to={}",
        seg(&name),
        seg(&name)
    ))
    .into_response())
}

const CHANGED_ON_DISK: &str = "The customer's file was changed on disk after this form was opened. Nothing was written: open the form again to see the file as it is now.";

/// The keys whose values differ between the old table and the new text's
/// (secrets named, never shown).
fn changed_keys(old: Option<&toml::Table>, new_text: &str) -> String {
    let Some(old) = old else {
        return "added".into();
    };
    let Some((new, _)) = customer_file::split(new_text) else {
        return "rewritten".into();
    };
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    let changed: Vec<&str> = keys
        .into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(String::as_str)
        .collect();
    if changed.is_empty() {
        "no change".into()
    } else {
        format!("changed: {}", changed.join(", "))
    }
}

/// Writes `text` to `path` durably, or removes `path` when `text` is None.
async fn write(path: &std::path::Path, text: Option<String>) -> std::io::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || match text {
        Some(t) => crate::storage::write_durably(&path, t.as_bytes(), 0o600),
        None => match std::fs::remove_file(&path) {
            Ok(()) => {
                std::fs::File::open(path.parent().unwrap_or(std::path::Path::new(".")))?.sync_all()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        },
    })
    .await
    .map_err(std::io::Error::other)?
}

/// The form again, with its problems, as 422.
async fn again(
    console: &Arc<Console>,
    authed: &Authed,
    cfg: &Arc<Config>,
    page: Page<'_>,
    f: CustomerForm,
    p: Problems,
) -> Result<Response, WebError> {
    let p = Problems { posted: true, ..p };
    let html = form_page(console, authed, cfg, page, &f, &p).await?;
    Ok((StatusCode::UNPROCESSABLE_ENTITY, html).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(rule: Rule, file: &str, key: &str) -> ConfigError {
        ConfigError {
            rule,
            file: PathBuf::from(file),
            line: 1,
            column: 1,
            key: key.into(),
            message: "m".into(),
        }
    }

    #[test]
    fn errors_land_beside_their_fields() {
        let f = std::path::Path::new("/inc/acme/contoso.toml");
        let cases = [
            (
                err(
                    Rule::Size,
                    "/inc/acme/contoso.toml",
                    "customer[Contoso].space",
                ),
                Some("space"),
            ),
            (
                err(
                    Rule::Email,
                    "/inc/acme/contoso.toml",
                    "customer[Contoso].email",
                ),
                Some("email"),
            ),
            (
                err(
                    Rule::Throttle,
                    "/inc/acme/contoso.toml",
                    "customer[Contoso].throttle.rate",
                ),
                Some("throttle"),
            ),
            (
                err(
                    Rule::Duplicate,
                    "/inc/acme/contoso.toml",
                    "customer[Contoso].web_access.username",
                ),
                Some("web_access"),
            ),
            (
                err(
                    Rule::SpaceOverAllocated,
                    "/etc/tollgate.toml",
                    "reseller[acme].space",
                ),
                Some("space"),
            ),
            (
                err(
                    Rule::SpaceOverAllocated,
                    "/inc/acme/zz.toml",
                    "customer[Zed].space",
                ),
                Some("space"),
            ),
            (
                err(Rule::Size, "/inc/acme/zz.toml", "customer[Zed].space"),
                None,
            ),
            (
                err(Rule::Required, "/etc/tollgate.toml", "server.listen"),
                None,
            ),
        ];
        let ours = Ours {
            reseller: "acme",
            name: "Contoso",
            customers: ["contoso".to_string(), "zed".to_string()].into(),
        };
        for (e, want) in cases {
            assert_eq!(field_of(&e, f, &ours).as_deref(), want, "{}", e.key);
        }
        // Another reseller's over-allocation is not this form's.
        let theirs = err(
            Rule::SpaceOverAllocated,
            "/inc/globex/x.toml",
            "customer[Secret Co].space",
        );
        assert_eq!(field_of(&theirs, f, &ours), None);
        let theirs = err(
            Rule::SpaceOverAllocated,
            "/etc/tollgate.toml",
            "reseller[globex].space",
        );
        assert_eq!(field_of(&theirs, f, &ours), None);
    }

    #[test]
    fn a_reseller_learns_only_the_count_of_others_errors() {
        let f = std::path::Path::new("/inc/acme/contoso.toml");
        let mut clash = err(
            Rule::Duplicate,
            "/inc/acme/contoso.toml",
            "customer[Contoso].web_access.username",
        );
        clash.message =
            "web user name \"x\" is already the login of reseller[globex].web_access".into();
        let errors = [
            err(
                Rule::Size,
                "/inc/globex/secret.toml",
                "customer[Secret Co].space",
            ),
            err(
                Rule::Email,
                "/inc/acme/contoso.toml",
                "customer[Contoso].email",
            ),
            clash,
        ];
        let ours = Ours {
            reseller: "acme",
            name: "Contoso",
            customers: ["contoso".to_string()].into(),
        };
        let mut p = Problems::default();
        place_errors(&errors, f, &ours, &Login::Reseller("acme".into()), &mut p);
        assert_eq!(p.fields["email"], ["m"]);
        assert_eq!(p.general.len(), 1);
        assert!(!p.general[0].contains("Secret"), "{:?}", p.general);
        assert!(
            !p.fields["web_access"][0].contains("globex"),
            "{:?}",
            p.fields
        );
        let mut p = Problems::default();
        place_errors(&errors, f, &ours, &Login::Admin, &mut p);
        assert!(
            p.general[0].contains("/inc/globex/secret.toml"),
            "{:?}",
            p.general
        );
        assert!(
            p.fields["web_access"][0].contains("globex"),
            "the admin sees it whole"
        );
    }

    #[test]
    fn the_form_keeps_secrets_it_is_not_given() {
        let old: toml::Table = toml::from_str(
            "name = \"C\"\nenroll_key = \"$argon2id$old\"\nweb_access = { user = \"c\", password = \"$argon2id$pw\" }\n",
        )
        .unwrap();
        let mut f = CustomerForm::from_table(&old, "h".into());
        f.email = "it@c.example".into();
        let mut p = Problems::default();
        let d = draft_of(&f, "acme", "/srv/c".into(), Some(&old), &mut p);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(d.enroll_key.as_deref(), Some("$argon2id$old"));
        assert_eq!(d.web_access, Some(("c".into(), "$argon2id$pw".into())));
        f.enroll_key_clear = on(true);
        f.web_password = "a".into();
        f.web_password_confirm = "b".into();
        let d = draft_of(&f, "acme", "/srv/c".into(), Some(&old), &mut p);
        assert_eq!(d.enroll_key, None, "cleared");
        assert_eq!(p.fields["web_access"], ["the two passwords differ"]);
    }

    #[test]
    fn a_form_reads_back_from_the_file_it_wrote() {
        let cfg_less = CustomerForm {
            name: "Contoso".into(),
            email: "it@contoso.example".into(),
            space: "500 GiB".into(),
            auto_add_clients: on(true),
            mcal_mode: "fixed".into(),
            mcal_fixed: "25".into(),
            activated: "no".into(),
            max_clients: "40".into(),
            throttle_mode: "custom".into(),
            throttle_enabled: on(true),
            throttle_when: "hours".into(),
            throttle_from: "20:00".into(),
            throttle_to: "06:00".into(),
            throttle_weekends: on(true),
            throttle_rate: "20 Mbit/s".into(),
            aggregate_rate: "50 MiB/s".into(),
            aggregate_hours: "08:00-18:00".into(),
            report: on(true),
            report_recipients: "a@x.example, b@x.example".into(),
            report_frequency: "monthly".into(),
            ..Default::default()
        };
        let mut p = Problems::default();
        let d = draft_of(&cfg_less, "acme", "/srv/c".into(), None, &mut p);
        assert!(p.is_empty(), "{p:?}");
        let (t, _) = customer_file::split(&d.render("")).unwrap();
        let back = CustomerForm::from_table(&t, "h".into());
        for (a, b) in [
            (&back.space, &cfg_less.space),
            (&back.mcal_fixed, &cfg_less.mcal_fixed),
            (&back.activated, &cfg_less.activated),
            (&back.max_clients, &cfg_less.max_clients),
            (&back.throttle_from, &cfg_less.throttle_from),
            (&back.throttle_to, &cfg_less.throttle_to),
            (&back.throttle_rate, &cfg_less.throttle_rate),
            (&back.aggregate_hours, &cfg_less.aggregate_hours),
            (&back.report_recipients, &cfg_less.report_recipients),
            (&back.report_frequency, &cfg_less.report_frequency),
        ] {
            assert_eq!(a, b);
        }
        assert_eq!(back.throttle_weekends, on(true));
    }
}
