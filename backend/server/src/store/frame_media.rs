//! Frames with everything the studio's strip and the exports show: status, seed, generation
//! time and, when asked for, the image bytes. Read-only; the job worker writes these columns.

use sqlx::AnyPool;

use crate::error::{ApiError, ApiResult};

/// One frame of a story, in story order.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FrameMedia {
    /// Stable frame id.
    pub id: i64,
    /// 0-based place in the story.
    pub position: i64,
    /// The caption.
    pub caption: String,
    /// pending, queued, running, ready, stale or failed.
    pub status: String,
    /// Seed of the stored image.
    pub seed: Option<i64>,
    /// How long generating the stored image took.
    pub duration_ms: Option<i64>,
    /// Whether an image is stored.
    #[sqlx(try_from = "crate::db::Flag")]
    pub has_image: bool,
    /// The image bytes (only when asked for, and only when there is one).
    pub image: Option<Vec<u8>>,
    /// MIME type of the image.
    pub image_mime: Option<String>,
    /// The history version its image is.
    pub version_id: Option<i64>,
    /// How many versions its history keeps.
    pub version_count: i64,
    /// How many cross-attention heatmaps are stored with the image.
    pub attention_count: i64,
    /// Last change (RFC 3339).
    pub updated_at: String,
}

/// The frames of a story in order; 404 when the story does not exist. `with_images` loads
/// the image bytes too (exports), otherwise they stay in the database (the strip).
pub async fn frames(pool: &AnyPool, story: i64, with_images: bool) -> ApiResult<Vec<FrameMedia>> {
    let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM stories WHERE id = $1")
        .bind(story)
        .fetch_optional(pool)
        .await?;
    if exists.is_none() {
        return Err(ApiError::not_found("story", story));
    }
    let image = if with_images { "image" } else { "NULL" };
    let rows: Vec<FrameMedia> = sqlx::query_as(&format!(
        "SELECT id, position, caption, status, seed, duration_ms, CASE WHEN image IS NOT NULL THEN 1 ELSE 0 END AS has_image,
                {image} AS image, image_mime, updated_at, version_id,
                (SELECT COUNT(*) FROM frame_versions v WHERE v.frame_id = frames.id)
                    AS version_count,
                (SELECT COUNT(*) FROM frame_attention a WHERE a.frame_id = frames.id)
                    AS attention_count
         FROM frames WHERE story_id = $1 ORDER BY position"
    ))
    .bind(story)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}
