//! The cross-attention heatmaps stored with a frame's image (`frame_attention`): one grey PNG
//! per character mention of the caption the image was drawn from. The worker writes them in
//! the transaction that stores the image ([`replace_in`], called from `job_runs::frame_done`);
//! the API reads them.

use sqlx::{AnyConnection, AnyPool};

use crate::error::{ApiError, ApiResult};

/// One mention's heatmap, ready to store.
#[derive(Debug, Clone)]
pub struct AttentionPng {
    /// The mention as written ("He").
    pub text: String,
    /// The characters it refers to.
    pub characters: Vec<String>,
    /// Frame-sized 8-bit grey PNG.
    pub png: Vec<u8>,
}

/// A stored heatmap without its bytes.
#[derive(Debug, Clone)]
pub struct AttentionEntry {
    /// 0-based place in caption order.
    pub ordinal: i64,
    /// The mention as written.
    pub text: String,
    /// The characters it refers to.
    pub characters: Vec<String>,
}

/// Replaces the maps of `frame` with `maps` (none: the frame keeps none, since maps of an
/// earlier image would describe a picture that is no longer there).
pub async fn replace_in(
    conn: &mut AnyConnection,
    frame: i64,
    maps: &[AttentionPng],
) -> ApiResult<()> {
    sqlx::query("DELETE FROM frame_attention WHERE frame_id = $1")
        .bind(frame)
        .execute(&mut *conn)
        .await?;
    for (ordinal, map) in maps.iter().enumerate() {
        sqlx::query(
            "INSERT INTO frame_attention (frame_id, ordinal, text, characters, png)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(frame)
        .bind(ordinal as i64)
        .bind(&map.text)
        .bind(serde_json::to_string(&map.characters).map_err(ApiError::internal)?)
        .bind(&map.png)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// 404 unless the story exists and `frame` is one of its frames.
async fn check_frame(pool: &AnyPool, story: i64, frame: i64) -> ApiResult<()> {
    let found: Option<(i64, Option<i64>)> = sqlx::query_as(
        "SELECT s.id, f.id FROM stories s LEFT JOIN frames f ON f.story_id = s.id AND f.id = $1
         WHERE s.id = $2",
    )
    .bind(frame)
    .bind(story)
    .fetch_optional(pool)
    .await?;
    match found {
        None => Err(ApiError::not_found("story", story)),
        Some((_, None)) => Err(ApiError::not_found("frame", frame)),
        Some(_) => Ok(()),
    }
}

/// The maps of a frame in caption order (empty when its image has none, or it has no image).
pub async fn list(pool: &AnyPool, story: i64, frame: i64) -> ApiResult<Vec<AttentionEntry>> {
    check_frame(pool, story, frame).await?;
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT ordinal, text, characters FROM frame_attention WHERE frame_id = $1 ORDER BY ordinal",
    )
    .bind(frame)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(ordinal, text, characters)| {
            Ok(AttentionEntry {
                ordinal,
                text,
                characters: serde_json::from_str(&characters)
                    .map_err(|e| ApiError::internal(format!("attention characters: {e}")))?,
            })
        })
        .collect()
}

/// The PNG of map `ordinal` of a frame.
pub async fn png(pool: &AnyPool, story: i64, frame: i64, ordinal: i64) -> ApiResult<Vec<u8>> {
    check_frame(pool, story, frame).await?;
    let png: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT png FROM frame_attention WHERE frame_id = $1 AND ordinal = $2")
            .bind(frame)
            .bind(ordinal)
            .fetch_optional(pool)
            .await?;
    png.ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "not_found",
            format!("frame {frame} has no attention map {ordinal}; list them at /api/stories/{story}/frames/{frame}/attention"),
        )
    })
}
