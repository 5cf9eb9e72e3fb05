//! One error type for the whole service. Every failure a client can see becomes an RFC 9457
//! `application/problem+json` body with a stable machine-readable `code`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::db::StorageFault;

/// An error answered to the client: HTTP status, stable code and a human explanation.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status of the response.
    pub status: StatusCode,
    /// Stable identifier clients can match on (`not_found`, `invalid_json`, ...).
    pub code: &'static str,
    /// What went wrong and, where possible, what to do about it.
    pub detail: String,
}

/// The problem document (RFC 9457) as sent on the wire.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct Problem {
    /// URI reference naming the problem type (`/problems/{code}`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the problem type.
    pub title: String,
    /// HTTP status code.
    pub status: u16,
    /// Explanation specific to this occurrence.
    pub detail: String,
    /// Stable machine-readable code.
    pub code: String,
}

impl ApiError {
    /// Builds an error with the given status, code and detail.
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
        }
    }

    /// 404 for a resource id that does not exist.
    pub fn not_found(what: &str, id: i64) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} {id} does not exist"),
        )
    }

    /// 422 for input that parsed but breaks a rule.
    pub fn invalid(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
    }

    /// 400 for a request that could not be parsed at all.
    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    /// 500 for a failure that is ours, not the client's; the cause is logged, not sent.
    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server failed to handle the request; see its log",
        )
    }

    /// A failure of the storage (full disk, read-only or locked database), answered as what
    /// it is, 507 or 503, with a stable code; the cause is logged, not sent.
    pub fn storage(fault: StorageFault, err: impl std::fmt::Display) -> Self {
        let (status, code, detail) = match fault {
            StorageFault::Full => (
                StatusCode::INSUFFICIENT_STORAGE,
                "storage_full",
                "the server's disk is full, so nothing was saved; try again once space has \
                 been freed",
            ),
            StorageFault::ReadOnly => (
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_read_only",
                "the server cannot write its database (it is read-only), so nothing was saved",
            ),
            StorageFault::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_busy",
                "the database is locked by another program, so nothing was saved; try again in \
                 a moment",
            ),
            StorageFault::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                "the server cannot read or write its database; see its log",
            ),
        };
        tracing::error!(error = %err, code, "storage failure");
        Self::new(status, code, detail)
    }

    /// The problem document for this error.
    pub fn problem(&self) -> Problem {
        Problem {
            kind: format!("/problems/{}", self.code),
            title: self
                .status
                .canonical_reason()
                .unwrap_or("Error")
                .to_string(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            code: self.code.to_string(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.detail)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        // Kept with the response so that `surface::guard` can show the same error as the
        // studio's HTML page on a non-API address without parsing the body back.
        response.extensions_mut().insert(self.clone());
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body may be left unread, so this connection cannot carry another
            // request; say so, or a client may reuse it and see a reset.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err {
            if db.is_unique_violation() {
                return Self::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    "a record with the same unique value already exists",
                );
            }
        }
        match StorageFault::of(&err) {
            Some(fault) => Self::storage(fault, err),
            None => Self::internal(err),
        }
    }
}

/// Result alias for handlers and store functions.
pub type ApiResult<T> = Result<T, ApiError>;
