//! Stories: a title, a cast of characters and an ordered list of frames (one per caption).
//! Frame positions stay dense (0..n) through inserts, deletes and reorders.

use serde::{Deserialize, Serialize};
use sqlx::{Any, AnyPool, Transaction};
use utoipa::ToSchema;

use super::{decode_cursor, paginate, Page};
use crate::auth::Owner;
use crate::db::now;
use crate::error::{ApiError, ApiResult};
use crate::validate::MAX_CAPTIONS;

/// One frame of a story: its caption and, once generated, its image.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Frame {
    /// Stable id of the frame (survives reorders).
    pub id: i64,
    /// 0-based place in the story.
    pub position: i64,
    /// The caption the frame illustrates.
    pub caption: String,
    /// pending, queued, running, ready, stale (caption changed since generation) or failed.
    pub status: String,
    /// Seed of the generated image, when there is one.
    pub seed: Option<i64>,
    /// URL of the generated image, when there is one.
    pub image_url: Option<String>,
    /// The version of the frame's history its image is (absent without an image).
    pub version_id: Option<i64>,
    /// How many drawn versions the frame's history keeps (`.../versions` lists them).
    pub versions: i64,
    /// Whether a frame before it was redrawn, restored, added, deleted or moved since its
    /// image was drawn, so the image was drawn from a story that has changed.
    pub older_context: bool,
    /// Last change (RFC 3339).
    pub updated_at: String,
}

/// A story with its cast and frames.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Story {
    /// Stable id.
    pub id: i64,
    /// Title.
    pub title: String,
    /// Ids of the characters the captions may name, in the order given.
    pub character_ids: Vec<i64>,
    /// Frames in story order.
    pub frames: Vec<Frame>,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Last change to the story or any of its frames (RFC 3339).
    pub updated_at: String,
}

/// A story in a list: no frames, just their count.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct StorySummary {
    /// Stable id.
    pub id: i64,
    /// Title.
    pub title: String,
    /// Number of frames (captions).
    pub frame_count: i64,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Last change (RFC 3339).
    pub updated_at: String,
}

#[derive(sqlx::FromRow)]
struct FrameRow {
    id: i64,
    position: i64,
    caption: String,
    status: String,
    seed: Option<i64>,
    #[sqlx(try_from = "crate::db::Flag")]
    has_image: bool,
    version_id: Option<i64>,
    versions: i64,
    updated_at: String,
}

type Tx<'a> = Transaction<'a, Any>;

/// Every id must be a character the story's owner may cast: their own (a story made with auth
/// off, which has no owner, may cast any). Another user's character reads as unknown.
async fn check_cast(tx: &mut Tx<'_>, story: i64, ids: &[i64]) -> ApiResult<()> {
    let owner: Option<i64> = sqlx::query_scalar("SELECT owner_id FROM stories WHERE id = $1")
        .bind(story)
        .fetch_optional(&mut **tx)
        .await?
        .flatten();
    for &id in ids {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM characters WHERE id = $1 AND ($2 IS NULL OR owner_id IS NOT DISTINCT FROM $3)",
        )
        .bind(id)
        .bind(owner)
        .bind(owner)
        .fetch_optional(&mut **tx)
        .await?;
        if found.is_none() {
            return Err(ApiError::invalid(
                "unknown_character",
                format!("character {id} does not exist; create it first or remove it from character_ids"),
            ));
        }
    }
    Ok(())
}

async fn set_cast(tx: &mut Tx<'_>, story: i64, ids: &[i64]) -> ApiResult<()> {
    check_cast(tx, story, ids).await?;
    sqlx::query("DELETE FROM story_characters WHERE story_id = $1")
        .bind(story)
        .execute(&mut **tx)
        .await?;
    for &id in ids {
        sqlx::query("INSERT INTO story_characters (story_id, character_id) VALUES ($1, $2)")
            .bind(story)
            .bind(id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

async fn touch(tx: &mut Tx<'_>, story: i64) -> ApiResult<()> {
    let done = sqlx::query("UPDATE stories SET updated_at = $1 WHERE id = $2")
        .bind(now())
        .bind(story)
        .execute(&mut **tx)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::not_found("story", story));
    }
    Ok(())
}

/// Gives an imported frame its image (already checked and re-encoded), seed and drawing
/// options as its first version, as if drawn from its current caption after the frames
/// imported before it.
pub async fn import_frame_image(
    pool: &AnyPool,
    story: i64,
    frame: i64,
    image: &crate::images::NormalizedImage,
    seed: Option<i64>,
    options: Option<&super::frame_versions::DrawOptions>,
) -> ApiResult<()> {
    let mut tx = crate::db::begin_write(pool).await?;
    touch(&mut tx, story).await?;
    let caption: Option<String> =
        sqlx::query_scalar("SELECT caption FROM frames WHERE id = $1 AND story_id = $2")
            .bind(frame)
            .bind(story)
            .fetch_optional(&mut *tx)
            .await?;
    let caption = caption.ok_or_else(|| ApiError::not_found("frame", frame))?;
    let context = super::frame_versions::current_context_in(&mut tx, frame).await?;
    super::frame_versions::record_in(
        &mut tx,
        &super::frame_versions::NewVersion {
            frame_id: frame,
            image: &image.bytes,
            mime: image.mime,
            caption: Some(&caption),
            seed,
            duration_ms: None,
            options,
            job_id: None,
            context: Some(context),
            attention: &[],
        },
    )
    .await?;
    super::jobs::refresh_frames(&mut tx, story).await?;
    tx.commit().await?;
    Ok(())
}

/// Ids of the stories whose cast includes character `character`, oldest first.
pub async fn casting(pool: &AnyPool, character: i64) -> ApiResult<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT story_id FROM story_characters WHERE character_id = $1 ORDER BY story_id",
    )
    .bind(character)
    .fetch_all(pool)
    .await?)
}

/// Creates a story with validated captions and cast (all or nothing).
pub async fn create(
    pool: &AnyPool,
    owner: Owner,
    title: &str,
    captions: &[String],
    cast: &[i64],
) -> ApiResult<Story> {
    // IMMEDIATE: a deferred transaction that reads and then writes fails at once with
    // SQLITE_BUSY if another connection wrote meanwhile (WAL snapshots); busy_timeout only
    // covers waiting for the write lock taken up front.
    let mut tx = crate::db::begin_write(pool).await?;
    let now = now();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO stories (title, owner_id, created_at, updated_at) VALUES ($1, $2, $3, $4)
         RETURNING id",
    )
    .bind(title)
    .bind(owner)
    .bind(&now)
    .bind(&now)
    .fetch_one(&mut *tx)
    .await?;
    set_cast(&mut tx, id, cast).await?;
    for (position, caption) in captions.iter().enumerate() {
        sqlx::query(
            "INSERT INTO frames (story_id, position, caption, created_at, updated_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(position as i64)
        .bind(caption)
        .bind(&now)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    get(pool, id).await
}

/// Fetches a story with its cast and frames, or 404.
pub async fn get(pool: &AnyPool, id: i64) -> ApiResult<Story> {
    let head: Option<(String, String, String)> =
        sqlx::query_as("SELECT title, created_at, updated_at FROM stories WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    let (title, created_at, updated_at) = head.ok_or_else(|| ApiError::not_found("story", id))?;
    let character_ids: Vec<i64> = sqlx::query_scalar(
        "SELECT character_id FROM story_characters WHERE story_id = $1 ORDER BY rowid",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    let rows: Vec<FrameRow> = sqlx::query_as(
        "SELECT id, position, caption, status, seed, CASE WHEN image IS NOT NULL THEN 1 ELSE 0 END AS has_image, version_id,
                (SELECT COUNT(*) FROM frame_versions v WHERE v.frame_id = frames.id) AS versions,
                updated_at
         FROM frames WHERE story_id = $1 ORDER BY position",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    let older = super::frame_versions::older_context(pool, id).await?;
    let frames = rows
        .into_iter()
        .map(|r| Frame {
            image_url: r
                .has_image
                .then(|| format!("/api/stories/{id}/frames/{}/image", r.id)),
            id: r.id,
            position: r.position,
            caption: r.caption,
            status: r.status,
            seed: r.seed,
            version_id: r.version_id,
            versions: r.versions,
            older_context: older.get(&r.id).copied().unwrap_or(false),
            updated_at: r.updated_at,
        })
        .collect();
    Ok(Story {
        id,
        title,
        character_ids,
        frames,
        created_at,
        updated_at,
    })
}

/// Whose story `id` is (`None`: made with auth off, or absent).
pub async fn owner_of(pool: &AnyPool, id: i64) -> ApiResult<Owner> {
    Ok(
        sqlx::query_scalar::<_, Option<i64>>("SELECT owner_id FROM stories WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?
            .flatten(),
    )
}

/// 404 unless the story exists.
pub async fn exists(pool: &AnyPool, id: i64) -> ApiResult<()> {
    let found: Option<i64> = sqlx::query_scalar("SELECT id FROM stories WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    found
        .map(|_| ())
        .ok_or_else(|| ApiError::not_found("story", id))
}

/// Lists stories in id order, a page at a time.
pub async fn list(
    pool: &AnyPool,
    owner: Owner,
    cursor: Option<&str>,
    limit: i64,
) -> ApiResult<Page<StorySummary>> {
    let after = cursor.map(decode_cursor).transpose()?.unwrap_or(0);
    let rows: Vec<StorySummary> = sqlx::query_as(
        "SELECT s.id, s.title, s.created_at, s.updated_at,
                (SELECT COUNT(*) FROM frames f WHERE f.story_id = s.id) AS frame_count
         FROM stories s WHERE s.id > $1 AND ($2 IS NULL OR s.owner_id = $3) ORDER BY s.id LIMIT $4",
    )
    .bind(after)
    .bind(owner)
    .bind(owner)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    Ok(paginate(rows, limit, |s| s.id))
}

/// Changes the title and/or the cast; 404 if absent, 422 for unknown characters.
pub async fn update(
    pool: &AnyPool,
    id: i64,
    title: Option<&str>,
    cast: Option<&[i64]>,
) -> ApiResult<Story> {
    // IMMEDIATE: a deferred transaction that reads and then writes fails at once with
    // SQLITE_BUSY if another connection wrote meanwhile (WAL snapshots); busy_timeout only
    // covers waiting for the write lock taken up front.
    let mut tx = crate::db::begin_write(pool).await?;
    touch(&mut tx, id).await?;
    if let Some(title) = title {
        sqlx::query("UPDATE stories SET title = $1 WHERE id = $2")
            .bind(title)
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    if let Some(cast) = cast {
        set_cast(&mut tx, id, cast).await?;
    }
    tx.commit().await?;
    get(pool, id).await
}

/// Deletes a story with its frames and jobs; 404 if absent.
pub async fn delete(pool: &AnyPool, id: i64) -> ApiResult<()> {
    // Under the write lock: the cascade locks frames, jobs and their rows in another order
    // than a running job's transactions do, which on PostgreSQL could deadlock with one of
    // them and fail one side (a 503 to the user, seen in CI).
    let mut tx = crate::db::begin_write(pool).await?;
    let done = sqlx::query("DELETE FROM stories WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::not_found("story", id));
    }
    tx.commit().await?;
    Ok(())
}

/// Inserts a caption at `position` (default: the end), shifting later frames down.
pub async fn insert_frame(
    pool: &AnyPool,
    story: i64,
    caption: &str,
    position: Option<i64>,
) -> ApiResult<Story> {
    // IMMEDIATE: a deferred transaction that reads and then writes fails at once with
    // SQLITE_BUSY if another connection wrote meanwhile (WAL snapshots); busy_timeout only
    // covers waiting for the write lock taken up front.
    let mut tx = crate::db::begin_write(pool).await?;
    touch(&mut tx, story).await?;
    insert_frame_in(&mut tx, story, caption, position).await?;
    tx.commit().await?;
    get(pool, story).await
}

/// Inserts a caption at `position` (default: the end) in the caller's transaction, moving the
/// frames from there on one place down; returns the new frame's id and position.
pub(crate) async fn insert_frame_in(
    conn: &mut sqlx::AnyConnection,
    story: i64,
    caption: &str,
    position: Option<i64>,
) -> ApiResult<(i64, i64)> {
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM frames WHERE story_id = $1")
        .bind(story)
        .fetch_one(&mut *conn)
        .await?;
    if count >= MAX_CAPTIONS as i64 {
        return Err(ApiError::invalid(
            "too_many_captions",
            format!("a story has at most {MAX_CAPTIONS} captions"),
        ));
    }
    let position = position.unwrap_or(count);
    if !(0..=count).contains(&position) {
        return Err(ApiError::invalid(
            "invalid_position",
            format!("position must be between 0 and {count}; got {position}"),
        ));
    }
    // Two passes through negative positions keep UNIQUE(story_id, position) true at every row.
    sqlx::query(
        "UPDATE frames SET position = -position - 2 WHERE story_id = $1 AND position >= $2",
    )
    .bind(story)
    .bind(position)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE frames SET position = -position - 1 WHERE story_id = $1 AND position < 0")
        .bind(story)
        .execute(&mut *conn)
        .await?;
    let now = now();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO frames (story_id, position, caption, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(story)
    .bind(position)
    .bind(caption)
    .bind(&now)
    .bind(&now)
    .fetch_one(&mut *conn)
    .await?;
    Ok((id, position))
}

async fn frame_position(tx: &mut Tx<'_>, story: i64, frame: i64) -> ApiResult<i64> {
    let position: Option<i64> =
        sqlx::query_scalar("SELECT position FROM frames WHERE id = $1 AND story_id = $2")
            .bind(frame)
            .bind(story)
            .fetch_optional(&mut **tx)
            .await?;
    position.ok_or_else(|| ApiError::not_found("frame", frame))
}

/// Replaces a frame's caption; an already generated image is kept but marked `stale`.
pub async fn edit_caption(
    pool: &AnyPool,
    story: i64,
    frame: i64,
    caption: &str,
) -> ApiResult<Story> {
    // IMMEDIATE: a deferred transaction that reads and then writes fails at once with
    // SQLITE_BUSY if another connection wrote meanwhile (WAL snapshots); busy_timeout only
    // covers waiting for the write lock taken up front.
    let mut tx = crate::db::begin_write(pool).await?;
    touch(&mut tx, story).await?;
    frame_position(&mut tx, story, frame).await?;
    sqlx::query("UPDATE frames SET caption = $1, updated_at = $2 WHERE id = $3")
        .bind(caption)
        .bind(now())
        .bind(frame)
        .execute(&mut *tx)
        .await?;
    // An image drawn from another caption becomes `stale` (and `ready` again if the caption
    // goes back); a frame a job still has to draw stays `queued`.
    super::jobs::refresh_frames(&mut tx, story).await?;
    tx.commit().await?;
    get(pool, story).await
}

/// Removes a frame and closes the gap in positions.
pub async fn delete_frame(pool: &AnyPool, story: i64, frame: i64) -> ApiResult<Story> {
    // IMMEDIATE: a deferred transaction that reads and then writes fails at once with
    // SQLITE_BUSY if another connection wrote meanwhile (WAL snapshots); busy_timeout only
    // covers waiting for the write lock taken up front.
    let mut tx = crate::db::begin_write(pool).await?;
    touch(&mut tx, story).await?;
    let position = frame_position(&mut tx, story, frame).await?;
    sqlx::query("DELETE FROM frames WHERE id = $1")
        .bind(frame)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE frames SET position = -position WHERE story_id = $1 AND position > $2")
        .bind(story)
        .bind(position)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE frames SET position = -position - 1 WHERE story_id = $1 AND position < 0")
        .bind(story)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    get(pool, story).await
}

/// Puts the frames in the given order; `frame_ids` must list each frame exactly once.
pub async fn reorder(pool: &AnyPool, story: i64, frame_ids: &[i64]) -> ApiResult<Story> {
    // IMMEDIATE: a deferred transaction that reads and then writes fails at once with
    // SQLITE_BUSY if another connection wrote meanwhile (WAL snapshots); busy_timeout only
    // covers waiting for the write lock taken up front.
    let mut tx = crate::db::begin_write(pool).await?;
    touch(&mut tx, story).await?;
    let mut current: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM frames WHERE story_id = $1 ORDER BY id")
            .bind(story)
            .fetch_all(&mut *tx)
            .await?;
    let mut wanted = frame_ids.to_vec();
    wanted.sort_unstable();
    current.sort_unstable();
    if wanted != current {
        return Err(ApiError::invalid(
            "invalid_order",
            format!(
                "frame_ids must list each of the story's {} frames exactly once",
                current.len()
            ),
        ));
    }
    sqlx::query("UPDATE frames SET position = -position - 1 WHERE story_id = $1")
        .bind(story)
        .execute(&mut *tx)
        .await?;
    let now = now();
    for (position, id) in frame_ids.iter().enumerate() {
        sqlx::query("UPDATE frames SET position = $1, updated_at = $2 WHERE id = $3")
            .bind(position as i64)
            .bind(&now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    get(pool, story).await
}

/// A frame's generated image bytes and MIME type; 404 if the frame or its image is absent.
pub async fn frame_image(pool: &AnyPool, story: i64, frame: i64) -> ApiResult<(Vec<u8>, String)> {
    let row: Option<(Option<Vec<u8>>, Option<String>)> =
        sqlx::query_as("SELECT image, image_mime FROM frames WHERE id = $1 AND story_id = $2")
            .bind(frame)
            .bind(story)
            .fetch_optional(pool)
            .await?;
    match row {
        Some((Some(bytes), Some(mime))) => Ok((bytes, mime)),
        Some(_) => Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "no_image",
            format!("frame {frame} has not been generated yet"),
        )),
        None => Err(ApiError::not_found("frame", frame)),
    }
}
