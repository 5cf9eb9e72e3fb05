//! Strict reading of the studio's urlencoded forms, checked once for every form route before
//! its handler runs: each field is valid UTF-8 (a byte sequence that is not would otherwise be
//! read as U+FFFD and stored), and each field is sent once (else the last one would silently
//! win), except those a form repeats on purpose. Multipart forms (the add-character form) are
//! checked where they are read, in `pages::read_upload`.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::config::{FORM_BODY_LIMIT, UPLOAD_BODY_LIMIT};
use crate::error::ApiError;

/// Fields a form may send more than once: the cast checkboxes of the story forms.
const REPEATABLE: &[&str] = &["character_id"];

/// Middleware of the page routes: refuses an urlencoded body that is too large (413), holds
/// invalid UTF-8 or repeats a field (422), and hands the others on unchanged.
pub(super) async fn strict_urlencoded(request: Request, next: Next) -> Response {
    let urlencoded = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().is_some_and(|m| {
                m.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    if !urlencoded {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let bytes = match read_bounded(body).await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    if let Err(e) = check(&bytes) {
        return e.into_response();
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Reads a form body of at most [`FORM_BODY_LIMIT`]. A larger one is read on to its end (up
/// to the upload limit) and dropped before the 413 goes out, so the browser finishes sending
/// and shows the answer instead of a reset connection.
async fn read_bounded(body: Body) -> Result<Vec<u8>, Response> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request("invalid_body", format!("cannot read the form: {e}"))
                .into_response()
        })?;
        total += chunk.len();
        if total <= FORM_BODY_LIMIT {
            bytes.extend_from_slice(&chunk);
        } else if total > UPLOAD_BODY_LIMIT {
            break;
        }
    }
    if total > FORM_BODY_LIMIT {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the form is larger than {} MiB",
                FORM_BODY_LIMIT / (1024 * 1024)
            ),
        )
        .into_response());
    }
    Ok(bytes)
}

/// Checks an urlencoded body: every name and value decodes to valid UTF-8, and no field but
/// the [`REPEATABLE`] ones appears twice. Linear in the body's length.
pub(super) fn check(body: &[u8]) -> Result<(), ApiError> {
    let mut seen = std::collections::HashSet::new();
    for pair in body.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &[][..]),
        };
        let name = String::from_utf8(decode(name)).map_err(|_| {
            ApiError::invalid(
                "invalid_utf8",
                "a form field's name is not valid UTF-8 text; send the form as UTF-8",
            )
        })?;
        if std::str::from_utf8(&decode(value)).is_err() {
            return Err(ApiError::invalid(
                "invalid_utf8",
                format!("the form field {name:?} is not valid UTF-8 text; send the form as UTF-8"),
            ));
        }
        if !REPEATABLE.contains(&name.as_str()) && !seen.insert(name.clone()) {
            return Err(ApiError::invalid(
                "duplicate_field",
                format!("the form field {name:?} is sent more than once; send it once"),
            ));
        }
    }
    Ok(())
}

/// Percent-decodes one urlencoded name or value (`+` is a space), as `form_urlencoded` does,
/// but into bytes, without replacing what is not UTF-8.
fn decode(text: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                text.get(i + 1).and_then(|&b| hex(b)),
                text.get(i + 2).and_then(|&b| hex(b)),
            ) {
                (Some(high), Some(low)) => {
                    out.push(high * 16 + low);
                    i += 2;
                }
                // A `%` not followed by two hex digits stands for itself.
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_invalid_utf8_and_repeats() {
        assert!(check(b"title=Caf%C3%A9&captions=a+b&character_id=1&character_id=2").is_ok());
        assert!(check(b"a=100%25&b=%zz&&c").is_ok());
        let e = check(b"title=%FF").unwrap_err();
        assert_eq!((e.code, e.status.as_u16()), ("invalid_utf8", 422));
        assert!(e.detail.contains("\"title\""), "{}", e.detail);
        assert_eq!(check(b"name=\xff").unwrap_err().code, "invalid_utf8");
        assert_eq!(check(b"%C3=x").unwrap_err().code, "invalid_utf8");
        let e = check(b"name=a&pronoun=he&name=b").unwrap_err();
        assert_eq!(e.code, "duplicate_field");
        assert!(e.detail.contains("\"name\""), "{}", e.detail);
        // Names are compared decoded: `na%6De` is `name`.
        assert_eq!(
            check(b"name=a&na%6De=b").unwrap_err().code,
            "duplicate_field"
        );
    }
}
