//! `/api/me`, `/api/tokens` and `/api/users`: the signed-in user, their API tokens, and (for
//! admins) the users. With auth off there is no user: these answer `422 auth_off`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiJson, ApiPath};
use crate::auth::{self, ApiToken, CreatedToken, Principal, User, UserInfo};
use crate::error::{ApiError, ApiResult, Problem};
use crate::AppState;

fn signed_in(principal: &Principal) -> ApiResult<&User> {
    principal.user().ok_or_else(|| {
        ApiError::invalid(
            "auth_off",
            "accounts are off on this server (it runs with --auth off): there is no user",
        )
    })
}

/// Who the request acts for.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Me {
    /// User id.
    pub id: i64,
    /// Login name.
    pub name: String,
    /// Whether the user administers the service.
    pub is_admin: bool,
}

/// The signed-in user.
#[utoipa::path(get, path = "/api/me", tag = "accounts",
    responses((status = 200, description = "The user", body = Me),
              (status = 401, description = "Not signed in", body = Problem),
              (status = 422, description = "Accounts are off", body = Problem)))]
pub async fn me(principal: Principal) -> ApiResult<Json<Me>> {
    let user = signed_in(&principal)?;
    Ok(Json(Me {
        id: user.id,
        name: user.name.clone(),
        is_admin: user.admin,
    }))
}

/// Body that makes an API token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "nightly export script"}))]
pub struct NewToken {
    /// What the token is for, 1..=100 characters.
    pub name: String,
}

/// Makes an API token for the signed-in user; its `secret` is in this answer only.
#[utoipa::path(post, path = "/api/tokens", tag = "accounts", request_body = NewToken,
    responses((status = 201, description = "The token with its secret", body = CreatedToken),
              (status = 401, description = "Not signed in", body = Problem),
              (status = 422, description = "Invalid name, or accounts are off", body = Problem)))]
pub async fn create_token(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<NewToken>,
) -> ApiResult<Response> {
    let user = signed_in(&principal)?;
    let token = auth::create_token(&state.pool, user.id, &body.name).await?;
    Ok((StatusCode::CREATED, Json(token)).into_response())
}

/// The signed-in user's tokens, newest first (never their secrets).
#[utoipa::path(get, path = "/api/tokens", tag = "accounts",
    responses((status = 200, description = "The tokens", body = Vec<ApiToken>),
              (status = 401, description = "Not signed in", body = Problem)))]
pub async fn tokens(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Vec<ApiToken>>> {
    let user = signed_in(&principal)?;
    Ok(Json(auth::tokens(&state.pool, user.id).await?))
}

/// Revokes one of the signed-in user's tokens; it authenticates nothing from then on.
#[utoipa::path(delete, path = "/api/tokens/{id}", tag = "accounts", params(("id" = i64, Path)),
    responses((status = 200, description = "The revoked token", body = ApiToken),
              (status = 404, description = "No such token of this user", body = Problem)))]
pub async fn revoke_token(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<ApiToken>> {
    let user = signed_in(&principal)?;
    Ok(Json(auth::revoke_token(&state.pool, user.id, id).await?))
}

/// Body that makes a user.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "wilma", "password": "a long passphrase", "admin": false}))]
pub struct NewUser {
    /// Login name: 1..=64 letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// At least 10 characters.
    pub password: String,
    /// Whether the user administers the service.
    #[serde(default)]
    pub admin: bool,
}

/// 404 unless the request is an admin's (nothing tells others the route exists).
fn admin(principal: &Principal) -> ApiResult<&User> {
    match principal.user() {
        Some(user) if user.admin => Ok(user),
        Some(_) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "there is nothing at this address",
        )),
        None => signed_in(principal),
    }
}

/// Makes a user (admins only).
#[utoipa::path(post, path = "/api/users", tag = "accounts", request_body = NewUser,
    responses((status = 201, description = "The user", body = UserInfo),
              (status = 404, description = "Not an admin", body = Problem),
              (status = 409, description = "The name is taken", body = Problem),
              (status = 422, description = "Invalid name or weak password", body = Problem)))]
pub async fn add_user(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<NewUser>,
) -> ApiResult<Response> {
    admin(&principal)?;
    let user = auth::add_user(&state.pool, body.name.trim(), &body.password, body.admin).await?;
    Ok((StatusCode::CREATED, Json(user)).into_response())
}

/// Every user (admins only).
#[utoipa::path(get, path = "/api/users", tag = "accounts",
    responses((status = 200, description = "The users", body = Vec<UserInfo>),
              (status = 404, description = "Not an admin", body = Problem)))]
pub async fn users(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Vec<UserInfo>>> {
    admin(&principal)?;
    Ok(Json(auth::users(&state.pool).await?))
}

/// The generation workers seen in the last day, in this process or others (`storygpt-v
/// worker`), with their device, bundle, latest heartbeat and the job they draw; `alive` when
/// the heartbeat is within the lease. Admins only (everyone with auth off).
#[utoipa::path(get, path = "/api/workers", tag = "jobs",
    responses((status = 200, description = "The workers, newest first", body = Vec<crate::store::workers::WorkerInfo>),
              (status = 404, description = "Not an admin", body = Problem)))]
pub async fn workers(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<Vec<crate::store::workers::WorkerInfo>>> {
    if !matches!(principal, Principal::Local) {
        admin(&principal)?;
    }
    Ok(Json(
        crate::store::workers::list(&state.pool, state.settings.lease).await?,
    ))
}
