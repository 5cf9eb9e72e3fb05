//! One error format per surface, and the `Host` allow-list.
//!
//! The service has two surfaces: the API for programs (`/api/...`, and the probes and the
//! OpenAPI document beside it), whose errors are RFC 9457 problem documents, and the studio for
//! people (every other address), whose errors are the HTML error page. Handlers mostly answer
//! errors as [`ApiError`]s, and axum itself answers some (405 with an empty body, 413 and 415
//! as plain text from its extractors); the [`guard`] middleware turns every error response
//! into its surface's format, so no status of either surface comes out in the other's format
//! or with an empty body.
//!
//! It also checks the `Host` a request is addressed to, against DNS rebinding: a page on an
//! attacker's domain whose name they re-point to 127.0.0.1 could otherwise script the studio
//! from the victim's browser. A server bound to a loopback address answers only to loopback
//! names by default; a request for another host gets 421 Misdirected Request.

use std::net::{IpAddr, SocketAddr};

use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::AppState;

/// Which format an address's errors take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Problem documents (`application/problem+json`).
    Api,
    /// The studio's HTML error page.
    Page,
}

impl Surface {
    /// The surface of a request path: the API and the machine endpoints beside it, or a page.
    pub fn of(path: &str) -> Self {
        if path == "/api"
            || path.starts_with("/api/")
            || matches!(path, "/healthz" | "/readyz" | "/openapi.json")
        {
            Self::Api
        } else {
            Self::Page
        }
    }

    /// Answers an error in this surface's format.
    pub fn answer(self, error: ApiError) -> Response {
        match self {
            Self::Api => error.into_response(),
            Self::Page => {
                let mut response = crate::pages::error_page(error.status, &error.detail);
                if error.status == StatusCode::PAYLOAD_TOO_LARGE {
                    // As for the problem document: the rest of the body may be unread.
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                response
            }
        }
    }
}

/// The `Host` names the server answers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedHosts {
    /// Any host (`*`, and the default when bound to a non-loopback address).
    Any,
    /// Only these.
    Only(Vec<HostPattern>),
}

/// One allowed host: a name or IP address, with the one port it may carry or any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// Lower case, without a trailing dot; IPv6 addresses in brackets.
    host: String,
    port: Option<u16>,
}

/// Splits a `Host` value (or an allow-list entry) into its normalised host and port; `None`
/// when it is not a plain `host[:port]`.
fn split_host(text: &str) -> Option<(String, Option<u16>)> {
    let text = text.trim();
    // A bare IPv6 address, as someone may write it in the allow-list.
    if let Ok(ip) = text.parse::<std::net::Ipv6Addr>() {
        return Some((format!("[{ip}]"), None));
    }
    if text.is_empty() || text.contains(['@', '/', '?', '#']) {
        return None;
    }
    let authority: axum::http::uri::Authority = text.parse().ok()?;
    if authority.as_str().len() != text.len() {
        return None;
    }
    let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }
    Some((host, authority.port_u16()))
}

impl AllowedHosts {
    /// The default for a server bound to `bind`: the loopback names (`localhost`, `127.0.0.1`,
    /// `[::1]` and the bound address itself, any port) on a loopback address, else any host.
    pub fn default_for(bind: SocketAddr) -> Self {
        if !bind.ip().is_loopback() {
            return Self::Any;
        }
        let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()];
        let own = match bind.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        if !hosts.contains(&own) {
            hosts.push(own);
        }
        Self::Only(
            hosts
                .into_iter()
                .map(|host| HostPattern { host, port: None })
                .collect(),
        )
    }

    /// Reads the `allowed_hosts` setting: host names or addresses, each optionally with a
    /// port (`studio.example`, `studio.example:8443`, `[::1]`); `*` allows any host.
    pub fn parse(entries: &[String]) -> anyhow::Result<Self> {
        if entries.iter().any(|e| e.trim() == "*") {
            return Ok(Self::Any);
        }
        let entries: Vec<&String> = entries.iter().filter(|e| !e.trim().is_empty()).collect();
        if entries.is_empty() {
            anyhow::bail!(
                "the allowed hosts list is empty, which would refuse every request; name at \
                 least one host (e.g. localhost), or * to allow any"
            );
        }
        entries
            .into_iter()
            .map(|entry| match split_host(entry) {
                Some((host, port)) => Ok(HostPattern { host, port }),
                None => anyhow::bail!(
                    "invalid allowed host {entry:?}: expected a host name or address with an \
                     optional port, such as studio.example or 127.0.0.1:8080 (or * for any)"
                ),
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map(Self::Only)
    }

    /// Whether a request addressed to `host` (a `Host` header value) is allowed.
    pub fn allows(&self, host: &str) -> bool {
        let Self::Only(patterns) = self else {
            return true;
        };
        let Some((host, port)) = split_host(host) else {
            return false;
        };
        patterns
            .iter()
            .any(|p| p.host == host && (p.port.is_none() || p.port == port))
    }
}

/// The host a request is addressed to: its `Host` header, else the authority of an
/// absolute-form target. `Err` for a `Host` header that is not text.
fn requested_host(request: &Request) -> Result<Option<String>, ()> {
    match request.headers().get(header::HOST) {
        Some(value) => value.to_str().map(|v| Some(v.to_string())).map_err(|_| ()),
        None => Ok(request.uri().authority().map(|a| a.to_string())),
    }
}

/// Middleware around the whole application: refuses requests for a host that is not allowed
/// (421), then gives every error response its surface's format.
pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let surface = Surface::of(request.uri().path());
    let method = request.method().clone();
    match requested_host(&request) {
        Ok(Some(host)) if !state.allowed_hosts.allows(&host) => {
            tracing::warn!(host = %host, "refused a request for a host that is not allowed");
            return surface.answer(ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected_request",
                format!(
                    "this server does not answer to the host name {host:?}; open it under a \
                     name it is configured for (its --allowed-hosts setting)"
                ),
            ));
        }
        // No Host at all (HTTP/1.0): not something a browser sends, so not a rebinding.
        Ok(_) => {}
        Err(()) if matches!(*state.allowed_hosts, AllowedHosts::Any) => {}
        Err(()) => {
            return surface.answer(ApiError::bad_request(
                "invalid_host",
                "the Host header is not a valid host name",
            ))
        }
    }
    let response = next.run(request).await;
    unify(surface, &method, response).await
}

/// Gives an error response the format of its surface; other responses pass unchanged.
async fn unify(surface: Surface, method: &Method, response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let in_format = match surface {
        // `application/json`: `/readyz` answers 503 with its own report, on purpose.
        Surface::Api => {
            content_type.starts_with("application/problem+json")
                || content_type.starts_with("application/json")
        }
        Surface::Page => content_type.starts_with("text/html"),
    };
    if in_format {
        return response;
    }
    // An error a handler made knows its code and detail; take them from it rather than from
    // its rendered body.
    let known = response.extensions().get::<ApiError>().cloned();
    let (parts, body) = response.into_parts();
    let error = match known {
        Some(error) => error,
        None => {
            // axum's own rejections say what went wrong in a short plain-text body.
            let text = to_bytes(body, 16 * 1024)
                .await
                .ok()
                .and_then(|b| String::from_utf8(b.to_vec()).ok())
                .filter(|t| content_type.starts_with("text/plain") && !t.trim().is_empty());
            let detail = default_detail(status, method, text);
            ApiError::new(status, code_for(status), detail)
        }
    };
    let mut answer = surface.answer(error);
    // Keep what the original answer said besides its body (Allow, Retry-After, Connection,
    // HX-* headers).
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().insert(name.clone(), value.clone());
        }
    }
    answer
}

/// A stable code for an error status that no handler named.
fn code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        404 => "no_route",
        405 => "method_not_allowed",
        406 => "not_acceptable",
        408 => "request_timeout",
        411 => "length_required",
        413 => "payload_too_large",
        414 => "uri_too_long",
        415 => "unsupported_media_type",
        421 => "misdirected_request",
        422 => "invalid_body",
        429 => "too_many_requests",
        431 => "headers_too_large",
        500 => "internal",
        503 => "unavailable",
        507 => "storage_full",
        _ if status.is_server_error() => "internal",
        _ => "bad_request",
    }
}

fn default_detail(status: StatusCode, method: &Method, text: Option<String>) -> String {
    match status {
        StatusCode::NOT_FOUND => "there is nothing at this address".into(),
        // axum adds the `Allow` header after this middleware has run (so it is not known
        // here); the answer carries it.
        StatusCode::METHOD_NOT_ALLOWED => format!(
            "{method} is not allowed at this address; its Allow header lists the methods it \
             accepts"
        ),
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "the request body is larger than this address accepts ({} MiB; portrait uploads \
             {} MiB, story archives {} MiB)",
            crate::config::FORM_BODY_LIMIT / (1024 * 1024),
            crate::config::UPLOAD_BODY_LIMIT / (1024 * 1024),
            crate::import::MAX_ARCHIVE_BYTES / (1024 * 1024)
        ),
        _ => text.unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("the request failed")
                .to_string()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surfaces_and_hosts() {
        assert_eq!(Surface::of("/api/characters"), Surface::Api);
        assert_eq!(Surface::of("/readyz"), Surface::Api);
        assert_eq!(Surface::of("/apiary"), Surface::Page);
        assert_eq!(Surface::of("/ui/stories"), Surface::Page);
        let hosts =
            AllowedHosts::parse(&["a.example".into(), "b.example:8443".into(), "::1".into()])
                .unwrap();
        assert!(hosts.allows("a.example:1234"));
        assert!(hosts.allows("A.EXAMPLE."));
        assert!(hosts.allows("b.example:8443"));
        assert!(!hosts.allows("b.example:8080"));
        assert!(!hosts.allows("b.example"));
        assert!(hosts.allows("[::1]:80"));
        assert!(!hosts.allows("a.example@evil.example"));
        assert!(!hosts.allows("evil.example"));
        assert!(!hosts.allows(""));
        let own = AllowedHosts::default_for("127.0.0.2:80".parse().unwrap());
        assert!(own.allows("127.0.0.2:80") && own.allows("localhost"));
        assert_eq!(
            AllowedHosts::default_for("[::]:80".parse().unwrap()),
            AllowedHosts::Any
        );
    }
}
