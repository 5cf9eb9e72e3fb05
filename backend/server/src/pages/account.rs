//! Signing in and out, and the account page: API tokens (made, shown once, revoked) and, for
//! admins, the users. Plain forms, so they work without JavaScript.

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use super::{form_field, render, sentence};
use crate::api::ApiPath;
use crate::auth::{self, ApiToken, AuthMode, LoginRefused, Principal, UserInfo};
use crate::error::{ApiError, ApiResult};
use crate::AppState;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/account", get(account_page))
        .route("/ui/account/tokens", post(create_token))
        .route("/ui/account/tokens/{id}/revoke", post(revoke_token))
        .route("/ui/account/users", post(add_user))
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    next: String,
    name: String,
    error: String,
    auth_on: bool,
}

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

/// Where to go after signing in: a path of this site only (never `//host` or a full URL).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.into(),
        _ => "/".into(),
    }
}

async fn login_page(State(state): State<AppState>, Query(q): Query<NextQuery>) -> Response {
    render(
        LoginPage {
            next: safe_next(q.next.as_deref()),
            name: String::new(),
            error: String::new(),
            auth_on: state.auth == AuthMode::On,
        },
        StatusCode::OK,
    )
}

/// `POST /login`: `name`, `password`, `next`. Right: a session cookie and a 303 to `next`.
/// Wrong: the form again (401) saying so, never which of the two was wrong. Too many
/// failures lately: 429 with `Retry-After`.
async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: axum::extract::Request,
) -> ApiResult<Response> {
    let address = auth::client_address(request.extensions());
    let body = axum::body::to_bytes(request.into_body(), 64 * 1024)
        .await
        .map_err(|_| ApiError::bad_request("invalid_form", "the login form is too large"))?;
    let name = form_field(&body, "name").unwrap_or_default();
    let password = form_field(&body, "password").unwrap_or_default();
    let next = safe_next(form_field(&body, "next").as_deref());
    if state.auth == AuthMode::Off {
        return Ok(Redirect::to(&next).into_response());
    }
    let page = |error: &str| LoginPage {
        next: next.clone(),
        name: name.clone(),
        error: error.to_string(),
        auth_on: true,
    };
    match auth::login(&state.pool, name.trim(), &password, &address).await? {
        Ok(session) => {
            let mut response = Redirect::to(&next).into_response();
            response.headers_mut().insert(
                header::SET_COOKIE,
                auth::session_set_cookie(&session.secret, auth::over_tls(&headers)),
            );
            Ok(response)
        }
        Err(LoginRefused::Wrong) => Ok(render(
            page("That name and password do not match an account."),
            StatusCode::UNAUTHORIZED,
        )),
        Err(LoginRefused::Throttled) => {
            let mut response = render(
                page(&format!(
                    "Too many failed sign-ins for this account or from this address; try again \
                     in {} minutes.",
                    auth::THROTTLE_MINUTES
                )),
                StatusCode::TOO_MANY_REQUESTS,
            );
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(auth::THROTTLE_MINUTES as u64 * 60),
            );
            Ok(response)
        }
    }
}

/// `POST /logout`: ends the session and goes to the login page.
async fn logout(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    if let Some(secret) = auth::session_cookie(&headers) {
        auth::logout(&state.pool, &secret).await?;
    }
    let mut response = Redirect::to("/login").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, auth::session_clear_cookie());
    Ok(response)
}

#[derive(Template)]
#[template(path = "account.html")]
struct AccountPage {
    auth_on: bool,
    name: String,
    admin: bool,
    tokens: Vec<ApiToken>,
    users: Vec<UserInfo>,
    /// The generation workers (admins, and everyone with auth off).
    workers: Vec<crate::store::workers::WorkerInfo>,
    /// A token just made: its secret, shown this once.
    new_secret: String,
    message: String,
    error: bool,
}

async fn account_view(
    state: &AppState,
    principal: &Principal,
    new_secret: String,
    message: String,
    error: bool,
) -> ApiResult<AccountPage> {
    let lease = state.settings.lease;
    let Some(user) = principal.user() else {
        return Ok(AccountPage {
            auth_on: false,
            name: String::new(),
            admin: false,
            tokens: Vec::new(),
            users: Vec::new(),
            workers: crate::store::workers::list(&state.pool, lease).await?,
            new_secret,
            message,
            error,
        });
    };
    Ok(AccountPage {
        auth_on: true,
        name: user.name.clone(),
        admin: user.admin,
        tokens: auth::tokens(&state.pool, user.id).await?,
        users: if user.admin {
            auth::users(&state.pool).await?
        } else {
            Vec::new()
        },
        workers: if user.admin {
            crate::store::workers::list(&state.pool, lease).await?
        } else {
            Vec::new()
        },
        new_secret,
        message,
        error,
    })
}

async fn account_page(State(state): State<AppState>, principal: Principal) -> ApiResult<Response> {
    let page = account_view(&state, &principal, String::new(), String::new(), false).await?;
    Ok(render(page, StatusCode::OK))
}

fn signed_in(principal: &Principal) -> ApiResult<&auth::User> {
    principal.user().ok_or_else(|| {
        ApiError::invalid(
            "auth_off",
            "accounts are off on this server (it runs with --auth off), so there are no tokens \
             or users to manage",
        )
    })
}

/// `POST /ui/account/tokens`: `name`. The page shows the new token's secret once.
async fn create_token(
    State(state): State<AppState>,
    principal: Principal,
    body: Bytes,
) -> ApiResult<Response> {
    let user = signed_in(&principal)?;
    let name = form_field(&body, "name").unwrap_or_default();
    match auth::create_token(&state.pool, user.id, &name).await {
        Ok(created) => {
            let message = format!(
                "Token \"{}\" made. Copy it now: it is not stored and will not be shown again.",
                created.token.name
            );
            let page = account_view(&state, &principal, created.secret, message, false).await?;
            Ok(render(page, StatusCode::CREATED))
        }
        Err(e) if e.status.is_client_error() => {
            let page =
                account_view(&state, &principal, String::new(), sentence(&e.detail), true).await?;
            Ok(render(page, e.status))
        }
        Err(e) => Err(e),
    }
}

/// `POST /ui/account/tokens/{id}/revoke`.
async fn revoke_token(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Response> {
    let user = signed_in(&principal)?;
    auth::revoke_token(&state.pool, user.id, id).await?;
    Ok(Redirect::to("/account").into_response())
}

/// `POST /ui/account/users` (admins): `name`, `password`, `admin`.
async fn add_user(
    State(state): State<AppState>,
    principal: Principal,
    body: Bytes,
) -> ApiResult<Response> {
    let user = signed_in(&principal)?;
    if !user.admin {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "there is no page at this address",
        ));
    }
    let name = form_field(&body, "name").unwrap_or_default();
    let password = form_field(&body, "password").unwrap_or_default();
    let admin = form_field(&body, "admin").is_some();
    let (message, error, status) =
        match auth::add_user(&state.pool, name.trim(), &password, admin).await {
            Ok(made) => (
                format!("User {} made.", made.name),
                false,
                StatusCode::CREATED,
            ),
            Err(e) if e.status.is_client_error() => (sentence(&e.detail), true, e.status),
            Err(e) => return Err(e),
        };
    let page = account_view(&state, &principal, String::new(), message, error).await?;
    Ok(render(page, status))
}
