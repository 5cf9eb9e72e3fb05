//! Reading a story archive (the ZIP that `GET /api/stories/{id}/export.zip` writes) back as
//! a new story: its captions, its cast with their portraits, and its drawn frames with their
//! seeds. Everything is read and checked before anything is stored, so a refused archive
//! leaves no trace.

use std::io::{Cursor, Read};

use serde::Deserialize;
use sqlx::AnyPool;

use crate::error::{ApiError, ApiResult};
use crate::export::{STORY_FORMAT, STORY_VERSION};
use crate::images::{normalize_portrait_bounded, NormalizedImage};
use crate::store::characters::{self, Pronoun};
use crate::store::frame_versions::DrawOptions;
use crate::store::stories::{self, Story};
use crate::validate::{self, MAX_CAST};

/// Largest archive accepted (the request body limit of the import routes).
pub const MAX_ARCHIVE_BYTES: usize = 64 * 1024 * 1024;
/// Largest `story.json`.
const MAX_STORY_JSON_BYTES: u64 = 2 * 1024 * 1024;
/// Largest image in the archive once inflated (a portrait's upload limit is 10 MiB).
const MAX_ENTRY_BYTES: u64 = 16 * 1024 * 1024;
/// Most bytes inflated from one archive: a small ZIP must not expand into gigabytes.
const MAX_INFLATED_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Deserialize)]
struct StoryJson {
    format: String,
    version: u64,
    title: String,
    #[serde(default)]
    characters: Vec<CharacterJson>,
    frames: Vec<FrameJson>,
}

#[derive(Deserialize)]
struct CharacterJson {
    name: String,
    pronoun: String,
    /// Version 2: the portrait's path in the archive.
    #[serde(default)]
    portrait: Option<String>,
}

#[derive(Deserialize)]
struct FrameJson {
    caption: String,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    image: Option<String>,
    // How the image was drawn (version 2, every field optional).
    #[serde(default)]
    steps: Option<u32>,
    #[serde(default)]
    guidance_scale: Option<f64>,
    #[serde(default)]
    scheduler: Option<String>,
    #[serde(default)]
    bundle: Option<String>,
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    height: Option<u32>,
}

impl FrameJson {
    /// How the image was drawn, when the archive says (steps and guidance at least).
    fn options(&self) -> Option<DrawOptions> {
        Some(DrawOptions {
            steps: self.steps?,
            guidance_scale: self.guidance_scale?,
            scheduler: self.scheduler.clone(),
            bundle: self.bundle.clone(),
            negative_prompt: self.negative_prompt.clone().unwrap_or_default(),
            width: self.width,
            height: self.height,
        })
    }
}

/// A cast member read from an archive.
pub struct ImportedCharacter {
    /// Name (validated).
    pub name: String,
    /// Pronoun.
    pub pronoun: Pronoun,
    /// Portrait bytes as stored in the archive (checked when the story is stored).
    pub portrait: Option<Vec<u8>>,
}

/// A frame read from an archive.
pub struct ImportedFrame {
    /// Seed of its image, if it has one.
    pub seed: Option<i64>,
    /// Image bytes as stored in the archive.
    pub image: Option<Vec<u8>>,
    /// How the image was drawn, when the archive says.
    pub options: Option<DrawOptions>,
}

/// A story read from an archive, checked but not stored.
pub struct ImportedStory {
    /// Title.
    pub title: String,
    /// Captions in story order.
    pub captions: Vec<String>,
    /// The cast, in story order.
    pub characters: Vec<ImportedCharacter>,
    /// One per caption.
    pub frames: Vec<ImportedFrame>,
}

fn invalid(detail: impl Into<String>) -> ApiError {
    ApiError::invalid("invalid_archive", detail)
}

/// An archive being read, with what is left of its inflate budget.
struct Archive<'a> {
    zip: zip::ZipArchive<Cursor<&'a [u8]>>,
    budget: u64,
}

impl Archive<'_> {
    /// Reads entry `name`, at most `limit` bytes inflated, counting them against the budget.
    fn read(&mut self, name: &str, limit: u64) -> ApiResult<Vec<u8>> {
        let entry = self
            .zip
            .by_name(name)
            .map_err(|_| invalid(format!("the archive has no {name}, which story.json names")))?;
        // The declared size can lie: the read itself is capped too.
        let cap = limit.min(self.budget);
        let mut bytes = Vec::new();
        entry
            .take(cap + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| invalid(format!("{name} cannot be read from the archive: {e}")))?;
        if bytes.len() as u64 > cap {
            return Err(invalid(format!(
                "{name} is larger than {} MiB once unpacked",
                cap / (1024 * 1024)
            )));
        }
        self.budget -= bytes.len() as u64;
        Ok(bytes)
    }

    /// The image at `path`, when story.json names one.
    fn image(&mut self, path: Option<&String>) -> ApiResult<Option<Vec<u8>>> {
        path.map(|p| self.read(p, MAX_ENTRY_BYTES)).transpose()
    }
}

/// Reads and checks an archive (no database access; run it off the async threads).
pub fn read_archive(bytes: &[u8]) -> ApiResult<ImportedStory> {
    let zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
        invalid(format!(
            "this is not a ZIP archive ({e}); import the .zip a story export downloads"
        ))
    })?;
    if zip.index_for_name("story.json").is_none() {
        return Err(invalid(
            "the archive has no story.json: it is not a storygpt-v story export",
        ));
    }
    let mut archive = Archive {
        zip,
        budget: MAX_INFLATED_BYTES,
    };
    let text = archive.read("story.json", MAX_STORY_JSON_BYTES)?;
    let story: StoryJson = serde_json::from_slice(&text)
        .map_err(|e| invalid(format!("story.json is not a story export: {e}")))?;
    if story.format != STORY_FORMAT {
        return Err(invalid(format!(
            "story.json says it is {:?}, not {STORY_FORMAT:?}",
            story.format
        )));
    }
    if !(1..=STORY_VERSION).contains(&story.version) {
        return Err(invalid(format!(
            "story.json is version {}; this server reads versions 1 to {STORY_VERSION}",
            story.version
        )));
    }
    let title = validate::title(&story.title)?;
    let captions: Vec<String> = story.frames.iter().map(|f| f.caption.clone()).collect();
    let captions = validate::captions(&captions)?;
    if story.characters.len() > MAX_CAST {
        return Err(invalid(format!(
            "the cast has {} characters; a story has at most {MAX_CAST}",
            story.characters.len()
        )));
    }
    let mut characters = Vec::with_capacity(story.characters.len());
    for c in &story.characters {
        let portrait = archive.image(c.portrait.as_ref())?;
        characters.push(ImportedCharacter {
            name: validate::name(&c.name)?,
            pronoun: Pronoun::parse(&c.pronoun)?,
            portrait,
        });
    }
    let mut frames = Vec::with_capacity(story.frames.len());
    for f in &story.frames {
        let image = archive.image(f.image.as_ref())?;
        let options = f.options().filter(|_| image.is_some());
        frames.push(ImportedFrame {
            seed: f.seed.filter(|_| image.is_some()),
            image,
            options,
        });
    }
    Ok(ImportedStory {
        title,
        captions,
        characters,
        frames,
    })
}

/// An image from the archive, checked and re-encoded as an upload is; a refusal names it.
async fn checked(bytes: Vec<u8>, what: &str) -> ApiResult<NormalizedImage> {
    normalize_portrait_bounded(bytes)
        .await
        .map_err(|e| ApiError::invalid(e.code, format!("{what}: {}", e.detail)))
}

/// Stores an imported story: each cast member is the library character of the same name
/// (case-insensitive) when there is one, else a new character with the archive's portrait;
/// frames get their images and seeds back. Images are checked and re-encoded as uploads are,
/// all before anything is written.
pub async fn store(
    pool: &AnyPool,
    owner: crate::auth::Owner,
    story: ImportedStory,
) -> ApiResult<Story> {
    let library = characters::all(pool, owner).await?;
    enum CastChoice {
        Existing(i64),
        New(String, Pronoun, NormalizedImage),
    }
    let mut cast = Vec::with_capacity(story.characters.len());
    for c in story.characters {
        if let Some(existing) = library
            .iter()
            .find(|l| l.name.to_lowercase() == c.name.to_lowercase())
        {
            cast.push(CastChoice::Existing(existing.id));
            continue;
        }
        let Some(bytes) = c.portrait else {
            return Err(invalid(format!(
                "the archive casts {} without a portrait, and the library has no character \
                 of that name: add {} first, then import again",
                c.name, c.name
            )));
        };
        let image = checked(bytes, &format!("the portrait of {}", c.name)).await?;
        cast.push(CastChoice::New(c.name, c.pronoun, image));
    }
    let mut images = Vec::with_capacity(story.frames.len());
    for (i, frame) in story.frames.into_iter().enumerate() {
        images.push(match frame.image {
            Some(bytes) => Some((
                checked(bytes, &format!("the image of frame {}", i + 1)).await?,
                frame.seed,
                frame.options,
            )),
            None => None,
        });
    }
    let mut ids = Vec::with_capacity(cast.len());
    for choice in cast {
        ids.push(match choice {
            CastChoice::Existing(id) => id,
            CastChoice::New(name, pronoun, image) => {
                characters::create(pool, owner, &name, pronoun, &image)
                    .await?
                    .id
            }
        });
    }
    let created = stories::create(pool, owner, &story.title, &story.captions, &ids).await?;
    for (frame, image) in created.frames.iter().zip(images) {
        if let Some((image, seed, options)) = image {
            stories::import_frame_image(pool, created.id, frame.id, &image, seed, options.as_ref())
                .await?;
        }
    }
    stories::get(pool, created.id).await
}
