//! Accounts: who a request acts for, and what it may touch.
//!
//! With auth off (the default for a single person on a loopback address) every request acts
//! as [`Principal::Local`], which sees everything. With auth on, a request authenticates with a
//! session cookie (set by the login page) or an `Authorization: Bearer` API token; one that does
//! neither gets 401 (API) or the login page (studio), except on the public addresses (login,
//! static assets, probes, API docs).
//!
//! Per-user data: characters and stories belong to a user; frames, versions, heatmaps, jobs,
//! events and exports belong to their story. Handlers check a resource with [`Principal::story`],
//! [`Principal::character`] or [`Principal::job`] before touching it; another user's resource
//! answers 404, exactly like a missing one, so nothing leaks. Lists filter by owner
//! ([`Principal::owner`]). Admins see the whole job queue (`GET /api/jobs`), nothing else of
//! other users.

use std::net::SocketAddr;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{AnyConnection, AnyPool};

use crate::db::Flag;
use utoipa::ToSchema;

use crate::db::now;
use crate::error::{ApiError, ApiResult};
use crate::surface::Surface;
use crate::AppState;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "storygpt_session";
/// How long a session lasts without a new login.
pub const SESSION_DAYS: i64 = 14;
/// Failed logins allowed per account name in [`THROTTLE_MINUTES`].
pub const MAX_FAILED_LOGINS: i64 = 5;
/// Failed logins allowed per client address in [`THROTTLE_MINUTES`] (more than per name: one
/// address may be a whole office behind NAT, trying several accounts).
pub const MAX_FAILED_LOGINS_PER_ADDRESS: i64 = 20;
/// The window failed logins are counted in.
pub const THROTTLE_MINUTES: i64 = 15;
/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 10;

/// Whether requests must authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// One person, no accounts: every request acts as [`Principal::Local`].
    #[default]
    Off,
    /// Accounts: sessions and API tokens.
    On,
}

impl std::str::FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "on" => Ok(Self::On),
            other => Err(format!("auth must be `on` or `off`, not {other:?}")),
        }
    }
}

/// How a user's request authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// A browser session; its CSRF token.
    Session {
        /// The token the session's forms carry.
        csrf: String,
    },
    /// An API token (its id).
    Token(i64),
}

/// A signed-in user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub id: i64,
    /// Login name.
    pub name: String,
    /// Whether the user administers the service.
    pub admin: bool,
    /// How the request authenticated.
    pub via: Via,
}

/// Who a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Auth is off: the one local person, who sees everything.
    Local,
    /// A signed-in user.
    User(User),
    /// Nobody signed in (auth on; only public addresses answer).
    Anonymous,
}

/// The owner a store call is limited to: `None` for everything (auth off).
pub type Owner = Option<i64>;

fn not_found(what: &'static str, id: i64) -> ApiError {
    ApiError::not_found(what, id)
}

impl Principal {
    /// The owner records made by this request get, and lists are limited to.
    pub fn owner(&self) -> Owner {
        match self {
            Principal::User(user) => Some(user.id),
            // Anonymous requests never reach a handler that reads data; an impossible owner
            // keeps a mistake from showing everything.
            Principal::Anonymous => Some(-1),
            Principal::Local => None,
        }
    }

    /// Whether this request may see the whole job queue.
    pub fn sees_queue(&self) -> bool {
        match self {
            Principal::Local => true,
            Principal::User(user) => user.admin,
            Principal::Anonymous => false,
        }
    }

    /// The signed-in user, if any.
    pub fn user(&self) -> Option<&User> {
        match self {
            Principal::User(user) => Some(user),
            _ => None,
        }
    }

    /// 404 unless story `id` exists and belongs to this request's user.
    pub async fn story(&self, pool: &AnyPool, id: i64) -> ApiResult<()> {
        let owner: Option<Option<i64>> =
            sqlx::query_scalar("SELECT owner_id FROM stories WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?;
        match (owner, self.owner()) {
            (None, _) => Err(not_found("story", id)),
            (Some(_), None) => Ok(()),
            (Some(found), Some(me)) if found == Some(me) => Ok(()),
            _ => Err(not_found("story", id)),
        }
    }

    /// 404 unless character `id` exists and belongs to this request's user.
    pub async fn character(&self, pool: &AnyPool, id: i64) -> ApiResult<()> {
        let owner: Option<Option<i64>> =
            sqlx::query_scalar("SELECT owner_id FROM characters WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?;
        match (owner, self.owner()) {
            (None, _) => Err(not_found("character", id)),
            (Some(_), None) => Ok(()),
            (Some(found), Some(me)) if found == Some(me) => Ok(()),
            _ => Err(not_found("character", id)),
        }
    }

    /// 404 unless job `id` exists and is of a story of this request's user (admins: any job).
    pub async fn job(&self, pool: &AnyPool, id: i64) -> ApiResult<()> {
        let owner: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT s.owner_id FROM jobs j JOIN stories s ON s.id = j.story_id WHERE j.id = $1",
        )
        .bind(id)
        .fetch_optional(pool)
        .await?;
        match (owner, self.owner()) {
            (None, _) => Err(not_found("job", id)),
            (Some(_), _) if self.sees_queue() => Ok(()),
            (Some(found), Some(me)) if found == Some(me) => Ok(()),
            _ => Err(not_found("job", id)),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // `authenticate` runs before every handler; without it (a router built without the
        // layer) nobody is signed in.
        Ok(parts
            .extensions
            .get::<Principal>()
            .cloned()
            .unwrap_or(Principal::Anonymous))
    }
}

/// Hex SHA-256 of a secret: what the database keeps of session cookies and API tokens, which
/// are long random strings (no salt or slow hash needed, unlike passwords).
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A fresh random secret (32 bytes, URL-safe base64).
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An argon2id PHC string of `password`.
pub fn hash_password(password: &str) -> ApiResult<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::internal(format!("cannot hash a password: {e}")))
}

/// Whether `password` matches the PHC string `hash`.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Checks a new user's name (1..=64 letters, digits, `.`, `_`, `-`) and password (at least
/// [`MIN_PASSWORD_CHARS`] characters, at most 1024).
pub fn check_credentials(name: &str, password: &str) -> ApiResult<()> {
    let valid_name = !name.is_empty()
        && name.chars().count() <= 64
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !valid_name {
        return Err(ApiError::invalid(
            "invalid_user_name",
            "a user name is 1 to 64 letters, digits, dots, underscores or hyphens",
        ));
    }
    let chars = password.chars().count();
    if !(MIN_PASSWORD_CHARS..=1024).contains(&chars) {
        return Err(ApiError::invalid(
            "weak_password",
            format!("a password has at least {MIN_PASSWORD_CHARS} characters"),
        ));
    }
    Ok(())
}

/// A user as the admin pages and the CLI list them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct UserInfo {
    /// User id.
    pub id: i64,
    /// Login name.
    pub name: String,
    /// Whether the user administers the service.
    #[sqlx(try_from = "crate::db::Flag")]
    pub is_admin: bool,
    /// When the account was made (RFC 3339).
    pub created_at: String,
}

/// Makes a user. The first user is always an admin and receives every character and story
/// made before accounts existed (or while auth was off).
pub async fn add_user(
    pool: &AnyPool,
    name: &str,
    password: &str,
    admin: bool,
) -> ApiResult<UserInfo> {
    check_credentials(name, password)?;
    let hash = hash_password(password)?;
    let mut tx = crate::db::begin_write(pool).await?;
    let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(&mut *tx)
        .await?;
    let first = users == 0;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO users (name, password_hash, is_admin, created_at) VALUES ($1, $2, $3, $4)
         RETURNING id",
    )
    .bind(name)
    .bind(&hash)
    .bind(i64::from(admin || first))
    .bind(now())
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => ApiError::new(
            StatusCode::CONFLICT,
            "user_exists",
            format!("there is already a user named {name:?}"),
        ),
        _ => ApiError::from(e),
    })?;
    if first {
        for table in ["characters", "stories"] {
            sqlx::query(&format!(
                "UPDATE {table} SET owner_id = $1 WHERE owner_id IS NULL"
            ))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
    }
    let user = user_info(&mut tx, id).await?;
    tx.commit().await?;
    Ok(user)
}

async fn user_info(conn: &mut AnyConnection, id: i64) -> ApiResult<UserInfo> {
    sqlx::query_as("SELECT id, name, is_admin, created_at FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| ApiError::not_found("user", id))
}

/// Every user, oldest first.
pub async fn users(pool: &AnyPool) -> ApiResult<Vec<UserInfo>> {
    Ok(
        sqlx::query_as("SELECT id, name, is_admin, created_at FROM users ORDER BY id")
            .fetch_all(pool)
            .await?,
    )
}

/// How many users there are.
pub async fn user_count(pool: &AnyPool) -> ApiResult<i64> {
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(pool)
        .await?)
}

/// Why a login failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginRefused {
    /// Wrong name or password (never says which).
    Wrong,
    /// Too many failures for this name or address lately; try again after the window.
    Throttled,
}

/// A new session: the cookie secret and its CSRF token.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// The cookie value.
    pub secret: String,
    /// The token its forms carry.
    pub csrf: String,
    /// The user.
    pub user_id: i64,
}

/// Checks a login and opens a session. Failures are counted per name and per address, and
/// past [`MAX_FAILED_LOGINS`] for the name or [`MAX_FAILED_LOGINS_PER_ADDRESS`] from the
/// address in [`THROTTLE_MINUTES`] every attempt is refused
/// (even a right one) until the window passes, so guessing is slow whichever is varied.
pub async fn login(
    pool: &AnyPool,
    name: &str,
    password: &str,
    address: &str,
) -> ApiResult<Result<NewSession, LoginRefused>> {
    let since = (chrono::Utc::now() - chrono::Duration::minutes(THROTTLE_MINUTES))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let (by_name, by_address): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM login_failures WHERE lower(user_name) = lower($1) AND at > $2),
                (SELECT COUNT(*) FROM login_failures WHERE address = $3 AND at > $4)",
    )
    .bind(name)
    .bind(&since)
    .bind(address)
    .bind(&since)
    .fetch_one(pool)
    .await?;
    if by_name >= MAX_FAILED_LOGINS || by_address >= MAX_FAILED_LOGINS_PER_ADDRESS {
        return Ok(Err(LoginRefused::Throttled));
    }
    let found: Option<(i64, String)> =
        sqlx::query_as("SELECT id, password_hash FROM users WHERE lower(name) = lower($1)")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    // An unknown name still pays for a hash, so timing does not tell names apart.
    let ok = match &found {
        Some((_, hash)) => verify_password(password, hash),
        None => {
            let _ = verify_password(password, dummy_hash());
            false
        }
    };
    let Some((user_id, _)) = found.filter(|_| ok) else {
        sqlx::query("INSERT INTO login_failures (user_name, address, at) VALUES ($1, $2, $3)")
            .bind(name)
            .bind(address)
            .bind(now())
            .execute(pool)
            .await?;
        // Old failures are of no more use.
        sqlx::query("DELETE FROM login_failures WHERE at <= $1")
            .bind(&since)
            .execute(pool)
            .await?;
        return Ok(Err(LoginRefused::Wrong));
    };
    let session = NewSession {
        secret: new_secret(),
        csrf: new_secret(),
        user_id,
    };
    let expires = (chrono::Utc::now() + chrono::Duration::days(SESSION_DAYS))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    sqlx::query(
        "INSERT INTO sessions (token_hash, user_id, csrf_token, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(secret_hash(&session.secret))
    .bind(user_id)
    .bind(&session.csrf)
    .bind(now())
    .bind(&expires)
    .execute(pool)
    .await?;
    sqlx::query("DELETE FROM sessions WHERE expires_at <= $1")
        .bind(now())
        .execute(pool)
        .await?;
    Ok(Ok(session))
}

/// A hash of a random password, verified against for unknown names (made once).
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| hash_password(&new_secret()).unwrap_or_default())
}

/// Ends a session.
pub async fn logout(pool: &AnyPool, secret: &str) -> ApiResult<()> {
    sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
        .bind(secret_hash(secret))
        .execute(pool)
        .await?;
    Ok(())
}

/// An API token as its owner sees it (never the secret, which is shown once).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct ApiToken {
    /// Token id.
    pub id: i64,
    /// What the user called it.
    pub name: String,
    /// Its first characters, to tell tokens apart.
    pub prefix: String,
    /// When it was made (RFC 3339).
    pub created_at: String,
    /// When it was last used.
    pub last_used_at: Option<String>,
    /// When it was revoked (a revoked token authenticates nothing).
    pub revoked_at: Option<String>,
}

/// A token just made: the only time its secret is seen.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    /// The token.
    #[serde(flatten)]
    pub token: ApiToken,
    /// The secret to send as `Authorization: Bearer <secret>`; not stored, shown once.
    pub secret: String,
}

/// Prefix of every API token's secret, so a leaked one is recognisable.
pub const TOKEN_PREFIX: &str = "sgv_";

/// Makes an API token for `user`.
pub async fn create_token(pool: &AnyPool, user: i64, name: &str) -> ApiResult<CreatedToken> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::invalid(
            "invalid_token_name",
            "a token's name is 1 to 100 characters (say what will use it)",
        ));
    }
    let secret = format!("{TOKEN_PREFIX}{}", new_secret());
    let prefix: String = secret.chars().take(TOKEN_PREFIX.len() + 6).collect();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO api_tokens (user_id, name, token_hash, prefix, created_at)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(user)
    .bind(name)
    .bind(secret_hash(&secret))
    .bind(&prefix)
    .bind(now())
    .fetch_one(pool)
    .await?;
    let token = token(pool, user, id).await?;
    Ok(CreatedToken { token, secret })
}

/// One of `user`'s tokens (404 for another user's).
pub async fn token(pool: &AnyPool, user: i64, id: i64) -> ApiResult<ApiToken> {
    sqlx::query_as(
        "SELECT id, name, prefix, created_at, last_used_at, revoked_at FROM api_tokens
         WHERE id = $1 AND user_id = $2",
    )
    .bind(id)
    .bind(user)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| ApiError::not_found("token", id))
}

/// `user`'s tokens, newest first.
pub async fn tokens(pool: &AnyPool, user: i64) -> ApiResult<Vec<ApiToken>> {
    Ok(sqlx::query_as(
        "SELECT id, name, prefix, created_at, last_used_at, revoked_at FROM api_tokens
         WHERE user_id = $1 ORDER BY id DESC",
    )
    .bind(user)
    .fetch_all(pool)
    .await?)
}

/// Revokes one of `user`'s tokens (revoking a revoked one changes nothing).
pub async fn revoke_token(pool: &AnyPool, user: i64, id: i64) -> ApiResult<ApiToken> {
    sqlx::query(
        "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2 AND user_id = $3",
    )
    .bind(now())
    .bind(id)
    .bind(user)
    .execute(pool)
    .await?;
    token(pool, user, id).await
}

/// The user a session cookie or bearer token stands for (`None`: neither is valid).
async fn resolve(pool: &AnyPool, headers: &HeaderMap) -> ApiResult<Option<User>> {
    if let Some(secret) = bearer(headers) {
        let found: Option<(i64, i64, String, Flag)> = sqlx::query_as(
            "SELECT t.id, u.id, u.name, u.is_admin FROM api_tokens t JOIN users u ON u.id = t.user_id
             WHERE t.token_hash = $1 AND t.revoked_at IS NULL",
        )
        .bind(secret_hash(&secret))
        .fetch_optional(pool)
        .await?;
        let Some((token, id, name, Flag(admin))) = found else {
            return Ok(None);
        };
        sqlx::query("UPDATE api_tokens SET last_used_at = $1 WHERE id = $2")
            .bind(now())
            .bind(token)
            .execute(pool)
            .await?;
        return Ok(Some(User {
            id,
            name,
            admin,
            via: Via::Token(token),
        }));
    }
    let Some(secret) = session_cookie(headers) else {
        return Ok(None);
    };
    let found: Option<(i64, String, Flag, String)> = sqlx::query_as(
        "SELECT u.id, u.name, u.is_admin, s.csrf_token FROM sessions s JOIN users u ON u.id = s.user_id
         WHERE s.token_hash = $1 AND s.expires_at > $2",
    )
    .bind(secret_hash(&secret))
    .bind(now())
    .fetch_optional(pool)
    .await?;
    Ok(found.map(|(id, name, Flag(admin), csrf)| User {
        id,
        name,
        admin,
        via: Via::Session { csrf },
    }))
}

/// The secret of an `Authorization: Bearer` header.
fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, secret) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| secret.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The session cookie's value, if the request carries one.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.to_string())
}

/// The `Set-Cookie` of a new session (`Secure` when the service is reached over TLS).
pub fn session_set_cookie(secret: &str, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let max_age = SESSION_DAYS * 24 * 3600;
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={secret}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The `Set-Cookie` that ends the session cookie.
pub fn session_clear_cookie() -> HeaderValue {
    HeaderValue::from_static("storygpt_session=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0")
}

/// Whether a request reached the service over TLS (directly, or through a proxy that says
/// so in `X-Forwarded-Proto`).
pub fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// Addresses that answer without signing in.
fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/login" | "/logout" | "/healthz" | "/readyz" | "/openapi.json" | "/docs"
    ) || path.starts_with("/static/")
}

/// Whether a request changes something (and so needs the CSRF check).
fn is_unsafe(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The origin (`scheme://host[:port]`) a browser says a request came from: `Origin`, else the
/// origin part of `Referer`.
fn request_origin(headers: &HeaderMap) -> Option<String> {
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        return Some(origin.to_string());
    }
    let referer = headers.get(header::REFERER)?.to_str().ok()?;
    let (scheme, rest) = referer.split_once("://")?;
    let host = rest.split(['/', '?', '#']).next()?;
    Some(format!("{scheme}://{host}"))
}

/// Whether `origin` names the host the request was sent to.
fn same_origin(origin: &str, headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some((_, origin_host)) = origin.split_once("://") else {
        return false;
    };
    origin_host.eq_ignore_ascii_case(host)
}

/// Resolves who the request acts for, refuses what it may not do, and adds the security
/// headers every response carries.
///
/// CSRF: a request that changes something and comes from a browser page of another site is
/// refused (403) by its `Origin` (or `Referer`). With a session cookie, one of them must be
/// present and name this site; bearer-token requests carry no ambient credentials and are not
/// checked. With auth off the same check guards the local person's data from other sites.
pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_string();
    let surface = Surface::of(&path);
    let principal = match state.auth {
        AuthMode::Off => Principal::Local,
        AuthMode::On => match resolve(&state.pool, request.headers()).await {
            Ok(Some(user)) => Principal::User(user),
            Ok(None) => Principal::Anonymous,
            Err(e) => return surface.answer(e),
        },
    };
    if is_unsafe(request.method()) {
        let cookie_session = matches!(
            &principal,
            Principal::User(User {
                via: Via::Session { .. },
                ..
            })
        );
        let origin = request_origin(request.headers());
        let refused = match &origin {
            Some(origin) => !same_origin(origin, request.headers()),
            // Browsers send Origin with every POST; a cookie without it is not trusted.
            None => cookie_session,
        };
        if refused {
            tracing::warn!(path = %path, origin = ?origin, "refused a cross-site request");
            return surface.answer(ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_site_request",
                "this request came from another site's page; send it from the studio itself",
            ));
        }
    }
    if principal == Principal::Anonymous && !is_public(&path) {
        return match surface {
            Surface::Api => {
                let mut response = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "sign in first: send `Authorization: Bearer <API token>` (make one in the \
                     studio under Account), or use the studio's login page",
                )
                .into_response();
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"storygpt-v\""),
                );
                response
            }
            Surface::Page => {
                let next_path = request
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|| "/".into());
                let target = if request.method() == Method::GET {
                    format!(
                        "/login?next={}",
                        form_urlencoded::byte_serialize(next_path.as_bytes()).collect::<String>()
                    )
                } else {
                    "/login".to_string()
                };
                Redirect::to(&target).into_response()
            }
        };
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// The client address a request came from, for login throttling ("unknown" when the server
/// did not record it, as in tests that call the router directly).
pub fn client_address(headers: &axum::http::Extensions) -> String {
    headers
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(remote)| remote.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The owner check of every route with an id in its path, in one place: after routing, the
/// route's template says what each path parameter names (`/stories/{id}`, `/characters/{id}`,
/// `/jobs/{id}`, `/stories/{story}/jobs/{job}`), and a story, character or job of another user
/// answers 404 before the handler runs. Frames, versions and heatmaps are checked by their
/// handlers to be within the story of the path. A parameter that is not a number is left to
/// the handler, which refuses it as before.
pub async fn owns_path(
    State(state): State<AppState>,
    matched: axum::extract::MatchedPath,
    params: axum::extract::RawPathParams,
    request: Request,
    next: Next,
) -> Response {
    let principal = request
        .extensions()
        .get::<Principal>()
        .cloned()
        .unwrap_or(Principal::Anonymous);
    let surface = Surface::of(request.uri().path());
    let template = matched.as_str().to_string();
    for (name, value) in params.iter() {
        let Ok(id) = value.parse::<i64>() else {
            continue;
        };
        let Some(kind) = resource_of(&template, name) else {
            continue;
        };
        let checked = match kind {
            Resource::Story => principal.story(&state.pool, id).await,
            Resource::Character => principal.character(&state.pool, id).await,
            Resource::Job => principal.job(&state.pool, id).await,
        };
        if let Err(e) = checked {
            return surface.answer(e);
        }
    }
    next.run(request).await
}

/// What a path parameter of a route names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource {
    Story,
    Character,
    Job,
}

/// The resource path parameter `name` names in route `template`: the collection segment right
/// before `{name}`.
fn resource_of(template: &str, name: &str) -> Option<Resource> {
    let marker = format!("{{{name}}}");
    let segments: Vec<&str> = template.split('/').collect();
    let at = segments.iter().position(|s| *s == marker)?;
    match *segments.get(at.checked_sub(1)?)? {
        "stories" => Some(Resource::Story),
        "characters" => Some(Resource::Character),
        "jobs" => Some(Resource::Job),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_parameters_name_their_resources() {
        assert_eq!(
            resource_of("/api/stories/{id}/frames/{frame_id}", "id"),
            Some(Resource::Story)
        );
        assert_eq!(
            resource_of("/api/stories/{id}/frames/{frame_id}", "frame_id"),
            None
        );
        assert_eq!(
            resource_of("/ui/stories/{story}/jobs/{job}/cancel", "story"),
            Some(Resource::Story)
        );
        assert_eq!(
            resource_of("/ui/stories/{story}/jobs/{job}/cancel", "job"),
            Some(Resource::Job)
        );
        assert_eq!(
            resource_of("/api/characters/{id}/portrait", "id"),
            Some(Resource::Character)
        );
        assert_eq!(resource_of("/api/model/cast/{k}/portrait", "k"), None);
        assert_eq!(
            resource_of("/api/jobs/{id}/events", "id"),
            Some(Resource::Job)
        );
    }

    #[test]
    fn passwords_verify_only_themselves() {
        let hash = hash_password("correct horse battery").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &hash));
        assert!(!verify_password("correct horse batterY", &hash));
        assert!(!verify_password("anything", "not a hash"));
    }

    #[test]
    fn cross_site_origins_are_told_apart() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(same_origin("http://127.0.0.1:8080", &headers));
        assert!(!same_origin("http://evil.example", &headers));
        assert!(!same_origin("http://127.0.0.1:8081", &headers));
        headers.insert(
            header::REFERER,
            HeaderValue::from_static("https://evil.example/page?x=1"),
        );
        assert_eq!(
            request_origin(&headers).as_deref(),
            Some("https://evil.example")
        );
    }
}

/// Per-user limits (users only: with auth off there is one person and the global queue
/// capacity is the limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Jobs a user may have queued or running at once.
    pub max_queued_jobs: i64,
    /// Bytes of portraits and frame images (every version) a user may store.
    pub max_storage_bytes: i64,
}

/// Default of [`Quotas::max_queued_jobs`].
pub const DEFAULT_USER_MAX_QUEUED_JOBS: i64 = 8;
/// Default of [`Quotas::max_storage_bytes`] (2 GiB).
pub const DEFAULT_USER_MAX_STORAGE_MB: i64 = 2048;

impl Default for Quotas {
    fn default() -> Self {
        Self {
            max_queued_jobs: DEFAULT_USER_MAX_QUEUED_JOBS,
            max_storage_bytes: DEFAULT_USER_MAX_STORAGE_MB * 1024 * 1024,
        }
    }
}

/// Bytes `owner` stores: portraits, and every version of every frame image of their stories.
pub async fn stored_bytes(pool: &AnyPool, owner: i64) -> ApiResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COALESCE((SELECT SUM(LENGTH(portrait)) FROM characters WHERE owner_id = $1), 0)
              + COALESCE((SELECT SUM(LENGTH(v.image)) FROM frame_versions v
                          JOIN frames f ON f.id = v.frame_id JOIN stories s ON s.id = f.story_id
                          WHERE s.owner_id = $2), 0)",
    )
    .bind(owner)
    .bind(owner)
    .fetch_one(pool)
    .await?)
}

impl Quotas {
    /// 413 when storing `adding` more bytes would take `owner` past their storage limit (or
    /// they are past it already).
    pub async fn check_storage(
        &self,
        pool: &AnyPool,
        owner: Owner,
        adding: usize,
    ) -> ApiResult<()> {
        let Some(owner) = owner else {
            return Ok(());
        };
        let stored = stored_bytes(pool, owner).await?;
        if stored + adding as i64 > self.max_storage_bytes {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "storage_quota",
                format!(
                    "your account stores {} MiB of portraits and frames, and its limit is {} MiB; \
                     delete old stories, frame versions or characters to make room",
                    stored / (1024 * 1024),
                    self.max_storage_bytes / (1024 * 1024)
                ),
            ));
        }
        Ok(())
    }

    /// 429 when `owner` already has their limit of jobs queued or running.
    pub async fn check_jobs(&self, pool: &AnyPool, owner: Owner) -> ApiResult<()> {
        let Some(owner) = owner else {
            return Ok(());
        };
        let active: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs j JOIN stories s ON s.id = j.story_id
             WHERE s.owner_id = $1 AND j.status IN ('queued', 'running')",
        )
        .bind(owner)
        .fetch_one(pool)
        .await?;
        if active >= self.max_queued_jobs {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "user_queue_full",
                format!(
                    "you have {active} jobs queued or running, your account's limit; wait for one \
                     to finish (or cancel one), then try again"
                ),
            ));
        }
        Ok(())
    }
}
