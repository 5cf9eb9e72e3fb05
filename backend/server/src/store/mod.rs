//! Persistent records: every SQL statement the service runs lives below this module, so the
//! handlers never see SQL and the schema has one owner.

pub mod characters;
pub mod frame_attention;
pub mod frame_media;
pub mod frame_versions;
pub mod job_events;
pub mod job_runs;
pub mod jobs;
pub mod stories;
pub mod workers;

use base64::Engine;

use crate::error::ApiError;

/// Default and largest page sizes for list endpoints.
pub const DEFAULT_PAGE: i64 = 50;
/// Largest page a client may ask for.
pub const MAX_PAGE: i64 = 200;

/// A page of a list, with the cursor of the next page when there is one.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Page<T> {
    /// The records of this page, oldest first.
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Encodes the id a page ended at as an opaque cursor.
pub fn encode_cursor(last_id: i64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("after:{last_id}"))
}

/// Decodes a cursor made by [`encode_cursor`].
pub fn decode_cursor(cursor: &str) -> Result<i64, ApiError> {
    let bad =
        || ApiError::bad_request("invalid_cursor", "the cursor is not one this server issued");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    text.strip_prefix("after:")
        .and_then(|n| n.parse().ok())
        .ok_or_else(bad)
}

/// Clamps a requested page size into 1..=MAX_PAGE.
pub fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be between 1 and {MAX_PAGE}; got {n}"),
        )),
    }
}

/// Splits `limit + 1` fetched rows into a page and its next cursor.
pub fn paginate<T>(mut rows: Vec<T>, limit: i64, id_of: impl Fn(&T) -> i64) -> Page<T> {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = if more {
        rows.last().map(|r| encode_cursor(id_of(r)))
    } else {
        None
    };
    Page {
        items: rows,
        next_cursor,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        assert_eq!(decode_cursor(&encode_cursor(42)).unwrap(), 42);
        assert_eq!(decode_cursor("zzz").unwrap_err().code, "invalid_cursor");
        let page = paginate(vec![1, 2, 3], 2, |x| *x);
        assert_eq!(page.items, vec![1, 2]);
        assert_eq!(
            decode_cursor(page.next_cursor.as_deref().unwrap()).unwrap(),
            2
        );
        assert!(paginate(vec![1, 2], 2, |x| *x).next_cursor.is_none());
    }
}
