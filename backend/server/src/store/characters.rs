//! Characters: a name, the pronoun captions use for them, and a portrait image.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::AnyPool;
use utoipa::ToSchema;

use super::{decode_cursor, paginate, Page};
use crate::auth::Owner;
use crate::db::now;
use crate::error::{ApiError, ApiResult};
use crate::images::NormalizedImage;

/// The pronoun a story uses for a character.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Pronoun {
    /// he / him / his
    He,
    /// she / her / her
    She,
    /// they / them / their
    They,
    /// it / it / its
    It,
}

impl Pronoun {
    /// The stored and wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Pronoun::He => "he",
            Pronoun::She => "she",
            Pronoun::They => "they",
            Pronoun::It => "it",
        }
    }

    /// Parses a form or database value; errors name the allowed values.
    pub fn parse(text: &str) -> ApiResult<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "he" => Ok(Pronoun::He),
            "she" => Ok(Pronoun::She),
            "they" => Ok(Pronoun::They),
            "it" => Ok(Pronoun::It),
            other => Err(ApiError::invalid(
                "invalid_pronoun",
                format!("pronoun must be one of he, she, they, it; got {other:?}"),
            )),
        }
    }
}

/// Facts about a character's stored portrait.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PortraitInfo {
    /// Where to fetch the image.
    pub url: String,
    /// MIME type of the stored image.
    pub mime: String,
    /// Width in pixels.
    pub width: i64,
    /// Height in pixels.
    pub height: i64,
}

/// A character as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Character {
    /// Stable id.
    pub id: i64,
    /// Name as written in captions (unique, case-insensitive).
    pub name: String,
    /// Pronoun used for the character.
    pub pronoun: Pronoun,
    /// The portrait.
    pub portrait: PortraitInfo,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Last change (RFC 3339).
    pub updated_at: String,
}

#[derive(sqlx::FromRow)]
struct CharacterRow {
    id: i64,
    name: String,
    pronoun: String,
    portrait_mime: String,
    portrait_width: i64,
    portrait_height: i64,
    created_at: String,
    updated_at: String,
}

impl CharacterRow {
    fn into_api(self) -> ApiResult<Character> {
        Ok(Character {
            portrait: PortraitInfo {
                url: format!("/api/characters/{}/portrait", self.id),
                mime: self.portrait_mime,
                width: self.portrait_width,
                height: self.portrait_height,
            },
            id: self.id,
            name: self.name,
            pronoun: Pronoun::parse(&self.pronoun)?,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

const COLUMNS: &str =
    "id, name, pronoun, portrait_mime, portrait_width, portrait_height, created_at, updated_at";

/// A stored portrait with its content hash (the ETag).
pub struct Portrait {
    /// Encoded image bytes.
    pub bytes: Vec<u8>,
    /// MIME type.
    pub mime: String,
    /// Hex SHA-256 of `bytes`.
    pub sha256: String,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn name_taken(name: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::CONFLICT,
        "name_taken",
        format!("a character named {name:?} already exists; names must be unique so captions can refer to them"),
    )
}

fn map_unique(err: sqlx::Error, name: &str) -> ApiError {
    match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => name_taken(name),
        _ => ApiError::from(err),
    }
}

/// Inserts a character with an already-normalised portrait.
pub async fn create(
    pool: &AnyPool,
    owner: Owner,
    name: &str,
    pronoun: Pronoun,
    portrait: &NormalizedImage,
) -> ApiResult<Character> {
    let now = now();
    // `fetch_all`, not `fetch_one`: that reads the id and drops the statement before it has
    // finished, so a commit that fails (SQLITE_FULL on a full disk) went unnoticed and the read
    // below answered 404 for a row that was never stored. `fetch_all` runs it to the end.
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO characters (owner_id, name, pronoun, portrait, portrait_mime, portrait_width,
                                 portrait_height, portrait_sha256, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
    )
    .bind(owner)
    .bind(name)
    .bind(pronoun.as_str())
    .bind(&portrait.bytes)
    .bind(portrait.mime)
    .bind(portrait.width as i64)
    .bind(portrait.height as i64)
    .bind(sha256_hex(&portrait.bytes))
    .bind(&now)
    .bind(&now)
    .fetch_all(pool)
    .await
    .map_err(|e| map_unique(e, name))?;
    let id = ids
        .first()
        .copied()
        .ok_or_else(|| ApiError::internal("the database stored the character but gave no id"))?;
    get(pool, id).await
}

/// Whose character `id` is (`None`: made with auth off, or absent).
pub async fn owner_of(pool: &AnyPool, id: i64) -> ApiResult<Owner> {
    Ok(
        sqlx::query_scalar::<_, Option<i64>>("SELECT owner_id FROM characters WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?
            .flatten(),
    )
}

/// Fetches one character or 404.
pub async fn get(pool: &AnyPool, id: i64) -> ApiResult<Character> {
    let row: Option<CharacterRow> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM characters WHERE id = $1"))
            .bind(id)
            .fetch_optional(pool)
            .await?;
    row.ok_or_else(|| ApiError::not_found("character", id))?
        .into_api()
}

/// Lists characters in id order, a page at a time.
pub async fn list(
    pool: &AnyPool,
    owner: Owner,
    cursor: Option<&str>,
    limit: i64,
) -> ApiResult<Page<Character>> {
    let after = cursor.map(decode_cursor).transpose()?.unwrap_or(0);
    let rows: Vec<CharacterRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM characters WHERE id > $1 AND ($2 IS NULL OR owner_id = $3)
         ORDER BY id LIMIT $4"
    ))
    .bind(after)
    .bind(owner)
    .bind(owner)
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let items = rows
        .into_iter()
        .map(CharacterRow::into_api)
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(paginate(items, limit, |c| c.id))
}

/// Every character of `owner`, for pages and mention lookup.
pub async fn all(pool: &AnyPool, owner: Owner) -> ApiResult<Vec<Character>> {
    let rows: Vec<CharacterRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM characters WHERE ($1 IS NULL OR owner_id = $2) ORDER BY id"
    ))
    .bind(owner)
    .bind(owner)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(CharacterRow::into_api).collect()
}

/// The fields a partial update may change; `None` keeps the current value.
#[derive(Debug, Default)]
pub struct CharacterChanges {
    /// New name (already validated).
    pub name: Option<String>,
    /// New pronoun.
    pub pronoun: Option<Pronoun>,
    /// New portrait (already normalised).
    pub portrait: Option<NormalizedImage>,
    /// Captions to rewrite in the same transaction (a rename carried into the stories).
    pub captions: Vec<CaptionRewrite>,
}

/// One caption to replace, applied only if it still reads `from` (an edit made meanwhile
/// wins over the rewrite planned before it).
#[derive(Debug, Clone)]
pub struct CaptionRewrite {
    /// The story of the frame.
    pub story_id: i64,
    /// The frame.
    pub frame_id: i64,
    /// The caption the rewrite was planned from.
    pub from: String,
    /// The new caption.
    pub to: String,
}

/// What [`update`] did.
#[derive(Debug)]
pub struct Updated {
    /// The character as it is now.
    pub character: Character,
    /// Captions rewritten.
    pub captions: usize,
    /// Stories whose captions changed.
    pub stories: usize,
}

/// Applies a partial update in one transaction; 404 if the character does not exist.
pub async fn update(pool: &AnyPool, id: i64, changes: CharacterChanges) -> ApiResult<Updated> {
    // IMMEDIATE: a deferred transaction that reads and then writes fails at once with
    // SQLITE_BUSY if another connection wrote meanwhile (WAL snapshots); busy_timeout only
    // covers waiting for the write lock taken up front.
    let mut tx = crate::db::begin_write(pool).await?;
    let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM characters WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    if exists.is_none() {
        return Err(ApiError::not_found("character", id));
    }
    let now = now();
    if let Some(name) = &changes.name {
        sqlx::query("UPDATE characters SET name = $1, updated_at = $2 WHERE id = $3")
            .bind(name)
            .bind(&now)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| map_unique(e, name))?;
    }
    if let Some(pronoun) = changes.pronoun {
        sqlx::query("UPDATE characters SET pronoun = $1, updated_at = $2 WHERE id = $3")
            .bind(pronoun.as_str())
            .bind(&now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    if let Some(portrait) = &changes.portrait {
        sqlx::query(
            "UPDATE characters SET portrait = $1, portrait_mime = $2, portrait_width = $3,
                    portrait_height = $4, portrait_sha256 = $5, updated_at = $6 WHERE id = $7",
        )
        .bind(&portrait.bytes)
        .bind(portrait.mime)
        .bind(portrait.width as i64)
        .bind(portrait.height as i64)
        .bind(sha256_hex(&portrait.bytes))
        .bind(&now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }
    let mut rewritten = 0;
    let mut stories = std::collections::BTreeSet::new();
    for rewrite in &changes.captions {
        let done = sqlx::query(
            "UPDATE frames SET caption = $1, updated_at = $2 WHERE id = $3 AND story_id = $4 AND caption = $5",
        )
        .bind(&rewrite.to)
        .bind(&now)
        .bind(rewrite.frame_id)
        .bind(rewrite.story_id)
        .bind(&rewrite.from)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() > 0 {
            rewritten += 1;
            stories.insert(rewrite.story_id);
        }
    }
    for &story in &stories {
        sqlx::query("UPDATE stories SET updated_at = $1 WHERE id = $2")
            .bind(&now)
            .bind(story)
            .execute(&mut *tx)
            .await?;
        // Images drawn from the old wording become `stale`, as after any caption edit.
        super::jobs::refresh_frames(&mut tx, story).await?;
    }
    tx.commit().await?;
    Ok(Updated {
        character: get(pool, id).await?,
        captions: rewritten,
        stories: stories.len(),
    })
}

/// Deletes a character (it leaves every story cast it was in); 404 if absent.
pub async fn delete(pool: &AnyPool, id: i64) -> ApiResult<()> {
    // Under the write lock, as every write that cascades into rows a running job writes.
    let mut tx = crate::db::begin_write(pool).await?;
    let done = sqlx::query("DELETE FROM characters WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::not_found("character", id));
    }
    tx.commit().await?;
    Ok(())
}

/// The portrait bytes of a character; 404 if absent.
pub async fn portrait(pool: &AnyPool, id: i64) -> ApiResult<Portrait> {
    let row: Option<(Vec<u8>, String, String)> = sqlx::query_as(
        "SELECT portrait, portrait_mime, portrait_sha256 FROM characters WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let (bytes, mime, sha256) = row.ok_or_else(|| ApiError::not_found("character", id))?;
    Ok(Portrait {
        bytes,
        mime,
        sha256,
    })
}
