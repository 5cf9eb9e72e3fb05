//! Frame history (`frame_versions`): every image drawn for a frame, with how it was drawn and
//! which versions of the earlier frames it looked at. The frame row carries a copy of its
//! current version (image, seed, timing, caption drawn from, and `frame_attention` its maps),
//! so reading a story never reads the history; [`record_in`] adds a version and makes it
//! current, [`restore`] makes an older one current again.
//!
//! "Drawn from an older context": the LLM reads the frames before a frame when it draws it,
//! so a frame whose recorded context (the `[frame_id, version_id]` pairs of the frames before
//! it) differs from what now precedes it was drawn from a story that no longer exists: an
//! earlier frame was redrawn, restored, inserted, deleted or moved since.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, AnyPool};
use utoipa::ToSchema;

use super::frame_attention::{self, AttentionPng};
use super::jobs::refresh_frames;
use crate::db::now;
use crate::error::{ApiError, ApiResult};

/// The frames before a frame, as `(frame_id, version_id)` in story order.
pub type Context = Vec<(i64, Option<i64>)>;

/// How a version was drawn (absent for images older than the history, and for imports).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DrawOptions {
    /// Denoising steps.
    pub steps: u32,
    /// Classifier-free guidance scale.
    pub guidance_scale: f64,
    /// Sampler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    /// Model bundle that drew it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
    /// What guidance steered away from ("" = the empty prompt).
    #[serde(default)]
    pub negative_prompt: String,
    /// Frame width in pixels (absent: the bundle's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// Frame height in pixels (absent: the bundle's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
}

/// A new image for a frame.
#[derive(Debug, Clone)]
pub struct NewVersion<'a> {
    /// The frame it belongs to.
    pub frame_id: i64,
    /// Image bytes.
    pub image: &'a [u8],
    /// Their MIME type.
    pub mime: &'a str,
    /// The caption it was drawn from.
    pub caption: Option<&'a str>,
    /// Seed of its noise.
    pub seed: Option<i64>,
    /// How long drawing it took.
    pub duration_ms: Option<i64>,
    /// How it was drawn.
    pub options: Option<&'a DrawOptions>,
    /// The job that drew it.
    pub job_id: Option<i64>,
    /// The frames it looked at (`None`: unknown).
    pub context: Option<Context>,
    /// Its cross-attention heatmaps.
    pub attention: &'a [AttentionPng],
}

/// One version of a frame, as the API lists it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FrameVersion {
    /// Version id.
    pub id: i64,
    /// The frame it belongs to.
    pub frame_id: i64,
    /// Whether it is the frame's image now.
    pub current: bool,
    /// The caption it was drawn from (absent when unknown).
    pub caption: Option<String>,
    /// Seed of its noise.
    pub seed: Option<i64>,
    /// How long drawing it took.
    pub duration_ms: Option<i64>,
    /// How it was drawn (absent for images older than the history, and imports).
    pub options: Option<DrawOptions>,
    /// The job that drew it (absent for imports, older images, or a deleted job).
    pub job_id: Option<i64>,
    /// Whether the frames before it changed since it was drawn (false when unknown).
    pub older_context: bool,
    /// When it was drawn (RFC 3339).
    pub created_at: String,
    /// Its image.
    pub image_url: String,
}

/// The `(frame_id, version_id)` of the frames before `frame` in its story now.
pub async fn current_context_in(conn: &mut AnyConnection, frame: i64) -> ApiResult<Context> {
    Ok(sqlx::query_as(
        "SELECT f.id, f.version_id FROM frames f JOIN frames me ON me.story_id = f.story_id
         WHERE me.id = $1 AND f.position < me.position ORDER BY f.position",
    )
    .bind(frame)
    .fetch_all(conn)
    .await?)
}

/// The `(frame_id, version_id)` now of each frame id in `ids` (`None` for a deleted frame or
/// one without an image), in the order given: the context of a frame drawn from a job's
/// snapshot of its story.
pub async fn versions_of_in(conn: &mut AnyConnection, ids: &[i64]) -> ApiResult<Context> {
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        let version: Option<Option<i64>> =
            sqlx::query_scalar("SELECT version_id FROM frames WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?;
        out.push((id, version.flatten()));
    }
    Ok(out)
}

/// Stores a new version of a frame and makes it current: the frame's image, seed, timing and
/// drawn-from caption are replaced and its heatmaps with them. Part of the caller's
/// transaction; returns the version id.
pub async fn record_in(conn: &mut AnyConnection, version: &NewVersion<'_>) -> ApiResult<i64> {
    let now = now();
    let options = version
        .options
        .map(serde_json::to_string)
        .transpose()
        .map_err(ApiError::internal)?;
    let context = version
        .context
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(ApiError::internal)?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO frame_versions (frame_id, image, image_mime, caption, seed, duration_ms,
                                     options, job_id, context, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
    )
    .bind(version.frame_id)
    .bind(version.image)
    .bind(version.mime)
    .bind(version.caption)
    .bind(version.seed)
    .bind(version.duration_ms)
    .bind(&options)
    .bind(version.job_id)
    .bind(&context)
    .bind(&now)
    .fetch_one(&mut *conn)
    .await?;
    for (ordinal, map) in version.attention.iter().enumerate() {
        sqlx::query(
            "INSERT INTO frame_version_attention (version_id, ordinal, text, characters, png)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(ordinal as i64)
        .bind(&map.text)
        .bind(serde_json::to_string(&map.characters).map_err(ApiError::internal)?)
        .bind(&map.png)
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(
        "UPDATE frames SET image = $1, image_mime = $2, seed = $3, duration_ms = $4,
                image_caption = $5, version_id = $6, updated_at = $7 WHERE id = $8",
    )
    .bind(version.image)
    .bind(version.mime)
    .bind(version.seed)
    .bind(version.duration_ms)
    .bind(version.caption)
    .bind(id)
    .bind(&now)
    .bind(version.frame_id)
    .execute(&mut *conn)
    .await?;
    frame_attention::replace_in(conn, version.frame_id, version.attention).await?;
    Ok(id)
}

/// For each frame of `story` with a current version whose context is known: whether the
/// frames before it changed since it was drawn.
pub async fn older_context_in(
    conn: &mut AnyConnection,
    story: i64,
) -> ApiResult<HashMap<i64, bool>> {
    let rows: Vec<(i64, Option<i64>, Option<String>)> = sqlx::query_as(
        "SELECT f.id, f.version_id, v.context FROM frames f
         LEFT JOIN frame_versions v ON v.id = f.version_id
         WHERE f.story_id = $1 ORDER BY f.position",
    )
    .bind(story)
    .fetch_all(conn)
    .await?;
    let mut before: Context = Vec::with_capacity(rows.len());
    let mut out = HashMap::new();
    for (id, version, context) in rows {
        if let Some(text) = context {
            let recorded: Context = serde_json::from_str(&text)
                .map_err(|e| ApiError::internal(format!("frame version context: {e}")))?;
            out.insert(id, recorded != before);
        }
        before.push((id, version));
    }
    Ok(out)
}

/// [`older_context_in`] on a pooled connection.
pub async fn older_context(pool: &AnyPool, story: i64) -> ApiResult<HashMap<i64, bool>> {
    older_context_in(&mut *pool.acquire().await?, story).await
}

/// How each frame of `story` with a known recipe drew its current image, by frame id.
pub async fn drawn_with(pool: &AnyPool, story: i64) -> ApiResult<HashMap<i64, DrawOptions>> {
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT f.id, v.options FROM frames f JOIN frame_versions v ON v.id = f.version_id
         WHERE f.story_id = $1 AND v.options IS NOT NULL",
    )
    .bind(story)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(frame, options)| {
            let options = serde_json::from_str(&options)
                .map_err(|e| ApiError::internal(format!("frame version options: {e}")))?;
            Ok((frame, options))
        })
        .collect()
}

/// How many versions each frame of `story` has.
pub async fn counts(pool: &AnyPool, story: i64) -> ApiResult<HashMap<i64, i64>> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT v.frame_id, COUNT(*) FROM frame_versions v JOIN frames f ON f.id = v.frame_id
         WHERE f.story_id = $1 GROUP BY v.frame_id",
    )
    .bind(story)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// 404 unless the story exists and `frame` is one of its frames.
async fn check_frame(conn: &mut AnyConnection, story: i64, frame: i64) -> ApiResult<()> {
    let found: Option<(i64, Option<i64>)> = sqlx::query_as(
        "SELECT s.id, f.id FROM stories s LEFT JOIN frames f ON f.story_id = s.id AND f.id = $1
         WHERE s.id = $2",
    )
    .bind(frame)
    .bind(story)
    .fetch_optional(conn)
    .await?;
    match found {
        None => Err(ApiError::not_found("story", story)),
        Some((_, None)) => Err(ApiError::not_found("frame", frame)),
        Some(_) => Ok(()),
    }
}

#[derive(sqlx::FromRow)]
struct VersionRow {
    id: i64,
    caption: Option<String>,
    seed: Option<i64>,
    duration_ms: Option<i64>,
    options: Option<String>,
    job_id: Option<i64>,
    context: Option<String>,
    created_at: String,
}

/// Every version of a frame, newest first; 404 for an unknown story or frame.
pub async fn list(pool: &AnyPool, story: i64, frame: i64) -> ApiResult<Vec<FrameVersion>> {
    let mut conn = pool.acquire().await?;
    check_frame(&mut conn, story, frame).await?;
    let current: Option<i64> = sqlx::query_scalar("SELECT version_id FROM frames WHERE id = $1")
        .bind(frame)
        .fetch_one(&mut *conn)
        .await?;
    let before = current_context_in(&mut conn, frame).await?;
    let rows: Vec<VersionRow> = sqlx::query_as(
        "SELECT id, caption, seed, duration_ms, options, job_id, context, created_at
         FROM frame_versions WHERE frame_id = $1 ORDER BY id DESC",
    )
    .bind(frame)
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            let options = r
                .options
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| ApiError::internal(format!("frame version options: {e}")))?;
            let context: Option<Context> = r
                .context
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| ApiError::internal(format!("frame version context: {e}")))?;
            Ok(FrameVersion {
                id: r.id,
                frame_id: frame,
                current: current == Some(r.id),
                caption: r.caption,
                seed: r.seed,
                duration_ms: r.duration_ms,
                options,
                job_id: r.job_id,
                older_context: context.is_some_and(|c| c != before),
                created_at: r.created_at,
                image_url: format!(
                    "/api/stories/{story}/frames/{frame}/versions/{}/image",
                    r.id
                ),
            })
        })
        .collect()
}

fn version_not_found(frame: i64, version: i64) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "not_found",
        format!("frame {frame} has no version {version}"),
    )
}

/// The image bytes and MIME type of one version.
pub async fn image(
    pool: &AnyPool,
    story: i64,
    frame: i64,
    version: i64,
) -> ApiResult<(Vec<u8>, String)> {
    let mut conn = pool.acquire().await?;
    check_frame(&mut conn, story, frame).await?;
    let row: Option<(Vec<u8>, String)> = sqlx::query_as(
        "SELECT image, image_mime FROM frame_versions WHERE id = $1 AND frame_id = $2",
    )
    .bind(version)
    .bind(frame)
    .fetch_optional(&mut *conn)
    .await?;
    row.ok_or_else(|| version_not_found(frame, version))
}

/// The active job of a story, if one is queued or running: history changes wait for it, so a
/// job never draws from a context that changes under it.
async fn active_job(conn: &mut AnyConnection, story: i64) -> ApiResult<Option<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM jobs WHERE story_id = $1 AND status IN ('queued', 'running')
         ORDER BY id LIMIT 1",
    )
    .bind(story)
    .fetch_optional(conn)
    .await?)
}

fn busy(job: i64, what: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::CONFLICT,
        "story_busy",
        format!("job {job} is drawing this story; {what} once it has finished, or cancel it first"),
    )
}

/// A version's image with what the frame row copies of it.
#[derive(sqlx::FromRow)]
struct StoredImage {
    image: Vec<u8>,
    image_mime: String,
    caption: Option<String>,
    seed: Option<i64>,
    duration_ms: Option<i64>,
}

/// Makes `version` the frame's image again (its seed, timing, drawn-from caption and heatmaps
/// with it). The frame is `stale` afterwards if its caption changed since that version was
/// drawn. Refused with 409 while a job of the story is queued or running.
pub async fn restore(pool: &AnyPool, story: i64, frame: i64, version: i64) -> ApiResult<()> {
    let mut tx = crate::db::begin_write(pool).await?;
    check_frame(&mut tx, story, frame).await?;
    let row: Option<StoredImage> = sqlx::query_as(
        "SELECT image, image_mime, caption, seed, duration_ms FROM frame_versions
         WHERE id = $1 AND frame_id = $2",
    )
    .bind(version)
    .bind(frame)
    .fetch_optional(&mut *tx)
    .await?;
    let StoredImage {
        image,
        image_mime: mime,
        caption,
        seed,
        duration_ms,
    } = row.ok_or_else(|| version_not_found(frame, version))?;
    if let Some(job) = active_job(&mut tx, story).await? {
        return Err(busy(job, "restore a version"));
    }
    let maps: Vec<(String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT text, characters, png FROM frame_version_attention WHERE version_id = $1
         ORDER BY ordinal",
    )
    .bind(version)
    .fetch_all(&mut *tx)
    .await?;
    let maps = maps
        .into_iter()
        .map(|(text, characters, png)| {
            Ok(AttentionPng {
                text,
                characters: serde_json::from_str(&characters)
                    .map_err(|e| ApiError::internal(format!("attention characters: {e}")))?,
                png,
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    let now = now();
    sqlx::query(
        "UPDATE frames SET image = $1, image_mime = $2, seed = $3, duration_ms = $4,
                image_caption = $5, version_id = $6, updated_at = $7 WHERE id = $8",
    )
    .bind(&image)
    .bind(&mime)
    .bind(seed)
    .bind(duration_ms)
    .bind(&caption)
    .bind(version)
    .bind(&now)
    .bind(frame)
    .execute(&mut *tx)
    .await?;
    frame_attention::replace_in(&mut tx, frame, &maps).await?;
    sqlx::query("UPDATE stories SET updated_at = $1 WHERE id = $2")
        .bind(&now)
        .bind(story)
        .execute(&mut *tx)
        .await?;
    refresh_frames(&mut tx, story).await?;
    tx.commit().await?;
    Ok(())
}

/// Deletes a version that is not the frame's current image (409 for the current one: restore
/// another first, or delete the frame).
pub async fn delete(pool: &AnyPool, story: i64, frame: i64, version: i64) -> ApiResult<()> {
    let mut tx = crate::db::begin_write(pool).await?;
    check_frame(&mut tx, story, frame).await?;
    let current: Option<i64> = sqlx::query_scalar("SELECT version_id FROM frames WHERE id = $1")
        .bind(frame)
        .fetch_one(&mut *tx)
        .await?;
    if current == Some(version) {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "current_version",
            format!(
                "version {version} is frame {frame}'s image now; restore another version before \
                 deleting it"
            ),
        ));
    }
    let deleted = sqlx::query("DELETE FROM frame_versions WHERE id = $1 AND frame_id = $2")
        .bind(version)
        .bind(frame)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if deleted == 0 {
        return Err(version_not_found(frame, version));
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use sqlx::Connection;

    /// A database made before the history keeps its images: each becomes its frame's first
    /// (current) version, heatmaps included, with an unknown context (never marked).
    #[tokio::test]
    async fn the_migration_makes_every_stored_image_a_first_version() {
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect("sqlite::memory:")
            .await
            .unwrap();
        for sql in [
            include_str!("../../../../migrations/sqlite/0001_initial.sql"),
            include_str!("../../../../migrations/sqlite/0002_job_frames.sql"),
            include_str!("../../../../migrations/sqlite/0003_frame_attention.sql"),
            include_str!("../../../../migrations/sqlite/0004_job_turns.sql"),
        ] {
            sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
        }
        sqlx::raw_sql(
            "INSERT INTO stories (id, title, created_at, updated_at) VALUES (1, 'S', 't', 't');
             INSERT INTO frames (id, story_id, position, caption, status, image, image_mime, seed,
                                 duration_ms, image_caption, created_at, updated_at)
                 VALUES (10, 1, 0, 'A.', 'ready', x'89504e47', 'image/png', 7, 100, 'A.', 't', 'u'),
                        (11, 1, 1, 'B.', 'pending', NULL, NULL, NULL, NULL, NULL, 't', 't');
             INSERT INTO frame_attention (frame_id, ordinal, text, characters, png)
                 VALUES (10, 0, 'Tom', '[\"Tom\"]', x'01');",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::raw_sql(include_str!(
            "../../../../migrations/sqlite/0005_frame_versions.sql"
        ))
        .execute(&mut conn)
        .await
        .unwrap();
        type Row = (i64, Vec<u8>, Option<String>, Option<i64>, Option<String>);
        let versions: Vec<Row> =
            sqlx::query_as("SELECT frame_id, image, caption, seed, context FROM frame_versions")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        assert_eq!(
            versions,
            vec![(
                10,
                vec![0x89, 0x50, 0x4e, 0x47],
                Some("A.".into()),
                Some(7),
                None
            )]
        );
        let current: Vec<(i64, Option<i64>)> =
            sqlx::query_as("SELECT id, version_id FROM frames ORDER BY id")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        assert_eq!(current, vec![(10, Some(1)), (11, None)]);
        let maps: Vec<(i64, String)> =
            sqlx::query_as("SELECT version_id, text FROM frame_version_attention")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        assert_eq!(maps, vec![(1, "Tom".to_string())]);
        assert!(super::older_context_in(&mut conn, 1)
            .await
            .unwrap()
            .is_empty());
    }
}
