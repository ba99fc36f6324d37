//! Console logins (CONFIG.md Semantics: web console): who may log in, the
//! server-side sessions, and the CSRF tokens.
//!
//! - Passwords are checked against the config's PHC hashes on the argon2
//!   pool the backup listener uses, and a failure costs the source the
//!   `auth_failed` penalty, so guessing is throttled on both ports alike.
//!   An unknown user name is checked against a dummy hash, so the answer
//!   takes as long and reveals nothing.
//! - A session is a random 256-bit id in a `Secure; HttpOnly;
//!   SameSite=Strict` cookie, mapped in memory to its login. It ends after
//!   `session_idle` without a request, at logout, when the daemon stops,
//!   and as soon as a reload changes or removes that login's `web_access`
//!   (each request compares the account with the one it logged in with).
//! - Every form carries the session's CSRF token; the login form, which
//!   has no session yet, carries a token paired with a short-lived cookie.

use super::listen::Peer;
use super::{Console, WebError};
use crate::config::{Config, PhcHash, WebAccess};
use crate::limits::penalty::Reason;
use axum::Form;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use tracing::{info, warn};

/// The session cookie. (Not `__Host-` prefixed: with them, the login in
/// the browser tests failed: Chromium did not return a prefixed cookie to
/// the console on its self-signed pair, the default.)
pub const SESSION_COOKIE: &str = "tollgate_session";
/// The login form's cookie (its CSRF pair).
pub const LOGIN_COOKIE: &str = "tollgate_login";
/// Sessions held at most; past it, the longest idle goes first.
pub const MAX_SESSIONS: usize = 10_000;
/// Sessions of one login at most; past it, that login's longest idle goes
/// (logging in again and again cannot push other people out).
pub const MAX_SESSIONS_PER_LOGIN: usize = 20;
/// Longest user name or password looked at.
pub const MAX_CREDENTIAL: usize = 1024;
/// How long a login form stays valid.
pub const LOGIN_FORM_TTL: Duration = Duration::from_secs(15 * 60);

/// Who a login is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// `server.web.admin`: everything.
    Admin,
    /// A reseller (by name): its customers and their clients.
    Reseller(String),
    /// A customer (by name): its clients.
    Customer(String),
}

impl Login {
    /// Its home page.
    pub fn home(&self) -> String {
        match self {
            Login::Admin => "/admin".into(),
            Login::Reseller(r) => format!("/resellers/{}", super::pages::seg(r)),
            Login::Customer(c) => format!("/customers/{}", super::pages::seg(c)),
        }
    }

    /// The account this login rests on in `cfg`, if it is still there.
    fn account<'c>(&self, cfg: &'c Config) -> Option<&'c WebAccess> {
        match self {
            Login::Admin => cfg.server.web.as_ref()?.admin.as_ref(),
            Login::Reseller(r) => cfg
                .reseller_by_name(r)
                .and_then(|id| cfg.reseller(id).web_access.as_ref()),
            Login::Customer(c) => cfg
                .customer_by_name(c)
                .and_then(|id| cfg.customer(id).web_access.as_ref()),
        }
    }
}

/// The login whose user name is `user` (compared case-insensitively, as
/// the validator keeps them unique that way).
pub fn find(cfg: &Config, user: &str) -> Option<(Login, WebAccess)> {
    let is = |w: &Option<WebAccess>| {
        w.as_ref()
            .filter(|w| w.username.to_lowercase() == user.to_lowercase())
            .cloned()
    };
    if let Some(w) = cfg.server.web.as_ref().and_then(|w| is(&w.admin)) {
        return Some((Login::Admin, w));
    }
    for r in &cfg.resellers {
        if let Some(w) = is(&r.web_access) {
            return Some((Login::Reseller(r.name.clone()), w));
        }
    }
    for c in &cfg.customers {
        if let Some(w) = is(&c.web_access) {
            return Some((Login::Customer(c.name.clone()), w));
        }
    }
    None
}

struct Session {
    login: Login,
    account: WebAccess,
    csrf: String,
    last: Instant,
}

/// The live sessions, by id.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

/// A request's login, taken from its session cookie.
#[derive(Debug, Clone)]
pub struct Authed {
    /// Who.
    pub login: Login,
    /// The user name, as configured.
    pub user: String,
    /// The session's CSRF token, for forms.
    pub csrf: String,
    id: String,
}

impl Authed {
    /// Refuses a form whose token is not this session's.
    pub fn check_csrf(&self, token: &str) -> Result<(), WebError> {
        if bool::from(self.csrf.as_bytes().ct_eq(token.as_bytes())) {
            Ok(())
        } else {
            Err(WebError::Csrf)
        }
    }
}

impl Sessions {
    fn create(&self, login: Login, account: WebAccess) -> Result<(String, String), WebError> {
        let id = random_token()?;
        let csrf = random_token()?;
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let oldest = |map: &HashMap<String, Session>, same: bool| {
            map.iter()
                .filter(|(_, s)| !same || s.login == login)
                .min_by_key(|(_, s)| s.last)
                .map(|(k, _)| k.clone())
        };
        if map.values().filter(|s| s.login == login).count() >= MAX_SESSIONS_PER_LOGIN
            && let Some(k) = oldest(&map, true)
        {
            map.remove(&k);
        }
        if map.len() >= MAX_SESSIONS
            && let Some(k) = oldest(&map, false)
        {
            map.remove(&k);
        }
        map.insert(
            id.clone(),
            Session {
                login,
                account,
                csrf: csrf.clone(),
                last: Instant::now(),
            },
        );
        Ok((id, csrf))
    }

    /// The login of session `id`, if it is live and its account unchanged.
    fn get(&self, cfg: &Config, id: &str) -> Option<Authed> {
        let idle = cfg.server.web.as_ref()?.session_idle;
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let s = map.get_mut(id)?;
        let now = Instant::now();
        let same = s.login.account(cfg) == Some(&s.account);
        if !same || now.duration_since(s.last) > idle {
            map.remove(id);
            return None;
        }
        s.last = now;
        Some(Authed {
            login: s.login.clone(),
            user: s.account.username.clone(),
            csrf: s.csrf.clone(),
            id: id.to_string(),
        })
    }

    fn remove(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Drops idle sessions and those whose account changed.
    pub fn sweep(&self, cfg: &Config) {
        let Some(idle) = cfg.server.web.as_ref().map(|w| w.session_idle) else {
            return;
        };
        let now = Instant::now();
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, s| {
                now.duration_since(s.last) <= idle && s.login.account(cfg) == Some(&s.account)
            });
    }

    /// Sessions held now.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// 256 random bits, URL-safe.
fn random_token() -> Result<String, WebError> {
    crate::state::new_secret().map_err(WebError::State)
}

/// The value of cookie `name` in `headers`.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Sends a request without a live session to the login page.
pub struct ToLogin;

impl IntoResponse for ToLogin {
    fn into_response(self) -> Response {
        Redirect::to("/login").into_response()
    }
}

impl FromRequestParts<Arc<Console>> for Authed {
    type Rejection = ToLogin;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Arc<Console>,
    ) -> Result<Authed, ToLogin> {
        let id = cookie(&parts.headers, SESSION_COOKIE).ok_or(ToLogin)?;
        let cfg = console.ctx.cfg.load();
        console.sessions.get(&cfg, id).ok_or(ToLogin)
    }
}

impl axum::extract::OptionalFromRequestParts<Arc<Console>> for Authed {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Arc<Console>,
    ) -> Result<Option<Authed>, Self::Rejection> {
        Ok(
            <Authed as FromRequestParts<Arc<Console>>>::from_request_parts(parts, console)
                .await
                .ok(),
        )
    }
}

fn set_cookie(name: &str, value: &str, path: &str, max_age: Option<u64>) -> String {
    let age = max_age.map_or(String::new(), |a| format!("; Max-Age={a}"));
    format!("{name}={value}; Path={path}; Secure; HttpOnly; SameSite=Strict{age}")
}

/// `GET /login`.
pub async fn login_form(
    State(console): State<Arc<Console>>,
    authed: Option<Authed>,
) -> Result<Response, WebError> {
    if let Some(a) = authed {
        return Ok(Redirect::to(&a.login.home()).into_response());
    }
    login_page(&console, None, StatusCode::OK).await
}

async fn login_page(
    console: &Arc<Console>,
    error: Option<&str>,
    status: StatusCode,
) -> Result<Response, WebError> {
    let token = random_token()?;
    // Rendered here, not on the page thread: a flood of login pages must
    // not fill the queue that logged-in pages wait in.
    let body = super::pages::render_now(
        console,
        "login.html",
        minijinja::context! { csrf => token, error => error },
    )?;
    Ok((
        status,
        [(
            header::SET_COOKIE,
            set_cookie(
                LOGIN_COOKIE,
                &token,
                "/login",
                Some(LOGIN_FORM_TTL.as_secs()),
            ),
        )],
        body,
    )
        .into_response())
}

/// The login form.
#[derive(Deserialize)]
pub struct LoginForm {
    username: String,
    password: String,
    #[serde(default)]
    csrf: String,
}

/// A hash that no password matches, checked for unknown user names so
/// that they take as long as known ones.
fn dummy_hash() -> &'static PhcHash {
    static DUMMY: OnceLock<PhcHash> = OnceLock::new();
    DUMMY.get_or_init(|| {
        use argon2::PasswordHasher;
        let s = argon2::Argon2::default()
            .hash_password(b"tollgate: no such user")
            .map(|h| h.to_string())
            .unwrap_or_default();
        PhcHash::new(s)
    })
}

/// `POST /login`.
pub async fn login(
    State(console): State<Arc<Console>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, WebError> {
    let paired = cookie(&headers, LOGIN_COOKIE)
        .is_some_and(|c| bool::from(c.as_bytes().ct_eq(form.csrf.as_bytes())));
    if !paired {
        return Err(WebError::Csrf);
    }
    let cfg = console.ctx.cfg.load_full();
    let limits = &cfg.server.limits;
    let now = Instant::now();
    if console.ctx.limits.is_blocked(limits, peer.ip(), now) {
        return Err(WebError::Penalized);
    }
    let sane = |s: &str| !s.is_empty() && s.len() <= MAX_CREDENTIAL;
    let found = if sane(&form.username) && sane(&form.password) {
        find(&cfg, &form.username)
    } else {
        None
    };
    let hash = found
        .as_ref()
        .map_or_else(|| dummy_hash().clone(), |(_, w)| w.password.clone());
    let ok = console
        .ctx
        .limits
        .verify(
            peer.ip(),
            &hash,
            &form.password,
            now + Duration::from_secs(10),
        )
        .await
        .ok_or(WebError::Busy)?;
    match found {
        Some((login, account)) if ok => {
            info!(user = %crate::config::escape_log(&account.username, 64), peer = %peer.ip(), "web console: logged in");
            let home = login.home();
            let (id, _) = console.sessions.create(login, account)?;
            Ok((
                StatusCode::SEE_OTHER,
                [
                    (header::LOCATION, home),
                    (
                        header::SET_COOKIE,
                        set_cookie(SESSION_COOKIE, &id, "/", None),
                    ),
                ],
            )
                .into_response())
        }
        _ => {
            warn!(
                "{}",
                crate::limits::auth_failure_line(&format!("web:{}", form.username), peer.ip())
            );
            console
                .ctx
                .limits
                .penalize(limits, peer.ip(), Reason::AuthFailed, now);
            login_page(
                &console,
                Some("Wrong user name or password."),
                StatusCode::UNAUTHORIZED,
            )
            .await
        }
    }
}

/// A form with only the CSRF token.
#[derive(Deserialize)]
pub struct CsrfForm {
    /// The session's token.
    #[serde(default)]
    pub csrf: String,
}

/// `POST /logout`.
pub async fn logout(
    State(console): State<Arc<Console>>,
    authed: Authed,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    authed.check_csrf(&form.csrf)?;
    console.sessions.remove(&authed.id);
    info!(user = %crate::config::escape_log(&authed.user, 64), "web console: logged out");
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/login".to_string()),
            (
                header::SET_COOKIE,
                set_cookie(SESSION_COOKIE, "", "/", Some(0)),
            ),
        ],
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PHC: &str = "$argon2id$v=19$m=19456,t=2,p=1$dZZ3ob0YSGTwo6umRpK5sA$SQCrzyZK5ExW4JIEsSNKKTiL8p2MX+QKZixCvXOsetA";

    fn cfg(contoso_user: &str, idle: &str) -> Config {
        Config::from_str(
            &format!(
                r#"
[server]
state_dir = "/tmp/tollgate-web-test"
[server.web]
listen = "127.0.0.1:8443"
session_idle = "{idle}"
admin = {{ user = "admin", password = "{PHC}" }}
[default_customer]
backup_location = "/srv/b/default"
[[reseller]]
name = "acme"
web_access = {{ user = "acme", password = "{PHC}" }}
[[customer]]
name = "Contoso Ltd"
reseller = "acme"
email = "a@contoso.example"
backup_location = "/srv/b/contoso"
web_access = {{ user = "{contoso_user}", password = "{PHC}" }}
"#
            ),
            std::path::Path::new("/etc/tollgate/tollgate.toml"),
        )
        .unwrap()
    }

    #[test]
    fn user_names_find_their_login_case_insensitively() {
        let c = cfg("contoso", "30m");
        let cases = [
            ("admin", Some(Login::Admin)),
            ("ACME", Some(Login::Reseller("acme".into()))),
            ("Contoso", Some(Login::Customer("Contoso Ltd".into()))),
            ("nobody", None),
            ("", None),
        ];
        for (user, want) in cases {
            assert_eq!(find(&c, user).map(|(l, _)| l), want, "{user}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_ends_when_idle_or_when_its_login_changes() {
        let c = cfg("contoso", "30m");
        let s = Sessions::default();
        let (login, account) = find(&c, "contoso").unwrap();
        let (id, csrf) = s.create(login.clone(), account).unwrap();
        let a = s.get(&c, &id).expect("live");
        assert_eq!(a.login, login);
        assert!(a.check_csrf(&csrf).is_ok());
        assert!(a.check_csrf("").is_err() && a.check_csrf("x").is_err());
        assert!(s.get(&c, "not-a-session").is_none());

        // Each request restarts the idle clock.
        tokio::time::advance(Duration::from_secs(29 * 60)).await;
        assert!(s.get(&c, &id).is_some());
        tokio::time::advance(Duration::from_secs(29 * 60)).await;
        assert!(s.get(&c, &id).is_some());
        tokio::time::advance(Duration::from_secs(31 * 60)).await;
        assert!(s.get(&c, &id).is_none(), "idle past session_idle");
        assert!(s.is_empty());

        // A reload that changes the login ends its sessions.
        let (login, account) = find(&c, "contoso").unwrap();
        let (id, _) = s.create(login, account).unwrap();
        let renamed = cfg("contoso-it", "30m");
        assert!(
            s.get(&renamed, &id).is_none(),
            "a changed web_access ends it"
        );
        assert!(s.get(&c, &id).is_none(), "and it stays ended");

        // Logout forgets it on the server.
        let (login, account) = find(&c, "acme").unwrap();
        let (id, _) = s.create(login, account).unwrap();
        s.remove(&id);
        assert!(s.get(&c, &id).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn logging_in_again_and_again_replaces_only_ones_own_sessions() {
        let c = cfg("contoso", "30m");
        let s = Sessions::default();
        let (admin, admin_account) = find(&c, "admin").unwrap();
        let (admin_id, _) = s.create(admin, admin_account).unwrap();
        let (login, account) = find(&c, "contoso").unwrap();
        let mut ids = Vec::new();
        for _ in 0..MAX_SESSIONS_PER_LOGIN + 5 {
            tokio::time::advance(Duration::from_secs(1)).await;
            ids.push(s.create(login.clone(), account.clone()).unwrap().0);
        }
        assert_eq!(s.len(), MAX_SESSIONS_PER_LOGIN + 1);
        assert!(
            s.get(&c, &admin_id).is_some(),
            "another login's session stays"
        );
        assert!(s.get(&c, &ids[0]).is_none(), "the oldest of its own went");
        assert!(s.get(&c, ids.last().unwrap()).is_some());
    }

    #[test]
    fn cookies_are_read_by_exact_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "x_tollgate_session=evil; tollgate_session=abc; other=1"
                .parse()
                .unwrap(),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, LOGIN_COOKIE), None);
    }
}
