//! The starter cast: the characters a trained bundle was trained on, which the bundle lists in
//! `cast/cast.json` with their portraits next to it. It is read once at start; the studio and
//! `POST /api/characters/starter-cast` turn it into ordinary characters (the same checks and
//! storage as an uploaded portrait), so the user can rename or delete them like any other.
//!
//! An untrained bundle has no `cast/` directory and offers no starter cast. A cast that cannot
//! be used (unreadable or malformed file, a portrait missing or refused) is logged and left
//! out: the service runs without a starter cast rather than not at all.

use std::path::{Component, Path};

use anyhow::{bail, Context};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sqlx::AnyPool;

use crate::config::MAX_PORTRAIT_BYTES;
use crate::error::{ApiError, ApiResult};
use crate::images::{normalize_portrait, NormalizedImage};
use crate::store::characters::{self, Character, Pronoun};
use crate::store::stories::{self, Story};
use crate::validate;

/// Where a bundle lists the characters it was trained on.
pub const CAST_FILE: &str = "cast/cast.json";

/// Title of the example story offered with the starter cast.
pub const EXAMPLE_TITLE: &str = "Mia and Bob";

/// Captions of the example story: they name Mia and Bob, so it is offered only when the
/// starter cast has both.
pub const EXAMPLE_CAPTIONS: [&str; 4] = [
    "Mia walks in the forest.",
    "She waves at Bob.",
    "Bob and Mia laugh at the beach.",
    "They look at a red ball.",
];

const EXAMPLE_NAMES: [&str; 2] = ["Mia", "Bob"];

/// One entry of `cast.json` as written by `storygpt-v train`. Unknown fields are ignored, so
/// a bundle from a later version that says more about a character still loads.
#[derive(Deserialize)]
struct Entry {
    name: String,
    pronoun: String,
    #[serde(default)]
    description: String,
    portrait: String,
}

/// A character of the starter cast, its portrait checked and normalised like an upload.
#[derive(Debug, Clone)]
pub struct Member {
    /// Name as captions write it.
    pub name: String,
    /// Pronoun the captions use for it.
    pub pronoun: Pronoun,
    /// What the character looks like, as the training data describes it (may be empty).
    pub description: String,
    /// The portrait, ready to store.
    pub portrait: NormalizedImage,
    /// Hex SHA-256 of the normalised portrait (its ETag).
    pub sha256: String,
}

/// The starter cast of the loaded bundle; empty when it has none.
#[derive(Debug, Clone, Default)]
pub struct StarterCast {
    members: Vec<Member>,
}

impl StarterCast {
    /// Reads `bundle/cast/cast.json` and its portraits. Never fails: without a `cast/`
    /// directory the cast is empty, and a cast that cannot be used is logged and left empty.
    pub fn load(bundle: &Path) -> StarterCast {
        let dir = bundle.join("cast");
        if !dir.exists() {
            return StarterCast::default();
        }
        let file = bundle.join(CAST_FILE);
        match read(&dir) {
            Ok(members) => {
                tracing::info!(
                    file = %file.display(), characters = members.len(),
                    "the studio offers the bundle's starter cast"
                );
                StarterCast { members }
            }
            Err(e) => {
                tracing::warn!(
                    file = %file.display(),
                    "the bundle's starter cast is not offered: {e:#}. Fix or remove the bundle's \
                     cast/ directory (cast.json is a list of {{name, pronoun, description, \
                     portrait}}, portrait a file name inside cast/)"
                );
                StarterCast::default()
            }
        }
    }

    /// The characters, in the order `cast.json` lists them.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Whether the bundle offers no starter cast.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether the example story fits this cast (it names every character its captions use).
    pub fn offers_example_story(&self) -> bool {
        EXAMPLE_NAMES
            .iter()
            .all(|name| self.members.iter().any(|m| same_name(&m.name, name)))
    }
}

/// Names compare as the characters table's `COLLATE NOCASE` unique index compares them
/// (ASCII letters only), so "already there" means what the database would refuse.
fn same_name(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

fn read(dir: &Path) -> anyhow::Result<Vec<Member>> {
    let path = dir.join("cast.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let entries: Vec<Entry> = serde_json::from_str(&text).context(
        "cast.json is not a JSON list of {name, pronoun, description, portrait} objects",
    )?;
    if entries.is_empty() {
        bail!("cast.json lists no characters");
    }
    if entries.len() > validate::MAX_CAST {
        bail!(
            "cast.json lists {} characters; a story's cast holds at most {}",
            entries.len(),
            validate::MAX_CAST
        );
    }
    let mut members: Vec<Member> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let member = read_member(dir, entry).with_context(|| format!("entry {}", i + 1))?;
        if let Some(twin) = members.iter().find(|m| same_name(&m.name, &member.name)) {
            bail!(
                "entry {}: {:?} is listed twice (as {:?} before); names must be unique",
                i + 1,
                member.name,
                twin.name
            );
        }
        members.push(member);
    }
    Ok(members)
}

fn read_member(dir: &Path, entry: Entry) -> anyhow::Result<Member> {
    // The same rules as a character made through the API or the studio's form.
    let name = validate::name(&entry.name).map_err(|e| anyhow::anyhow!(e.detail))?;
    let pronoun = Pronoun::parse(&entry.pronoun).map_err(|e| anyhow::anyhow!(e.detail))?;
    let relative = Path::new(&entry.portrait);
    // The portrait must lie inside cast/: a bundle names files, it does not reach elsewhere.
    let inside = !entry.portrait.is_empty()
        && relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if !inside {
        bail!(
            "the portrait of {name} is {:?}; it must be a file name inside cast/",
            entry.portrait
        );
    }
    let file = dir.join(relative);
    let size = std::fs::metadata(&file)
        .with_context(|| format!("the portrait of {name}, {}, cannot be read", file.display()))?
        .len();
    if size > MAX_PORTRAIT_BYTES as u64 {
        bail!(
            "the portrait of {name}, {}, is {size} bytes; at most {MAX_PORTRAIT_BYTES} are accepted",
            file.display()
        );
    }
    let bytes = std::fs::read(&file)
        .with_context(|| format!("the portrait of {name}, {}, cannot be read", file.display()))?;
    let portrait = normalize_portrait(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "the portrait of {name}, {}, is refused: {}",
            file.display(),
            e.detail
        )
    })?;
    Ok(Member {
        sha256: hex::encode(Sha256::digest(&portrait.bytes)),
        name,
        pronoun,
        description: entry.description.trim().to_string(),
        portrait,
    })
}

/// What adding the starter cast did.
#[derive(Debug, Clone)]
pub struct Added {
    /// The characters it created, in cast order.
    pub added: Vec<Character>,
    /// Cast names skipped because a character of that name (any case) was already there.
    pub skipped: Vec<String>,
    /// The library's character for each cast member, in cast order (added or already there).
    pub character_ids: Vec<i64>,
}

impl Added {
    /// One sentence for the studio's status line.
    pub fn summary(&self) -> String {
        let n = self.added.len();
        let plural = if n == 1 { "" } else { "s" };
        let were = if self.skipped.len() == 1 {
            "was"
        } else {
            "were"
        };
        match (n, self.skipped.len()) {
            (_, 0) => format!("Added {n} character{plural}."),
            (0, 1) => format!("Nothing added: {} was already there.", self.skipped[0]),
            (0, k) => {
                format!("Nothing added: all {k} characters of the starter cast were already there.")
            }
            (_, _) => format!(
                "Added {n} character{plural}; {} {were} already there.",
                self.skipped.join(", ")
            ),
        }
    }
}

fn no_cast() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        "no_starter_cast",
        "the loaded model bundle lists no characters it was trained on (no usable cast/cast.json)",
    )
}

/// Creates every cast member whose name (any case) is not in the library yet, through the
/// same store call as an upload; the others are skipped. Each character is its own
/// transaction, so a failure part-way keeps those already made, and a retry adds the rest.
pub async fn add(
    pool: &AnyPool,
    owner: crate::auth::Owner,
    cast: &StarterCast,
) -> ApiResult<Added> {
    if cast.is_empty() {
        return Err(no_cast());
    }
    let existing = characters::all(pool, owner).await?;
    let mut added = Vec::new();
    let mut skipped = Vec::new();
    for member in cast.members() {
        if existing.iter().any(|c| same_name(&c.name, &member.name)) {
            skipped.push(member.name.clone());
            continue;
        }
        match characters::create(pool, owner, &member.name, member.pronoun, &member.portrait).await
        {
            Ok(character) => added.push(character),
            // Someone else added it since the list was read: it is there, which is the point.
            Err(e) if e.code == "name_taken" => skipped.push(member.name.clone()),
            Err(e) => return Err(e),
        }
    }
    let library = characters::all(pool, owner).await?;
    let character_ids = cast
        .members()
        .iter()
        .filter_map(|m| library.iter().find(|c| same_name(&c.name, &m.name)))
        .map(|c| c.id)
        .collect();
    Ok(Added {
        added,
        skipped,
        character_ids,
    })
}

/// [`add`], then a story of [`EXAMPLE_CAPTIONS`] whose cast is the whole starter cast.
pub async fn add_with_example_story(
    pool: &AnyPool,
    owner: crate::auth::Owner,
    cast: &StarterCast,
) -> ApiResult<(Added, Story)> {
    if cast.is_empty() {
        return Err(no_cast());
    }
    if !cast.offers_example_story() {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "no_example_story",
            format!(
                "the example story needs {} in the starter cast, and this model's cast lacks them",
                EXAMPLE_NAMES.join(" and ")
            ),
        ));
    }
    let added = add(pool, owner, cast).await?;
    let title = validate::title(EXAMPLE_TITLE)?;
    let captions: Vec<String> = EXAMPLE_CAPTIONS.iter().map(|c| c.to_string()).collect();
    let captions = validate::captions(&captions)?;
    let ids = validate::cast(&added.character_ids)?;
    let story = stories::create(pool, owner, &title, &captions, &ids).await?;
    Ok((added, story))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png() -> Vec<u8> {
        let img = image::RgbImage::from_pixel(4, 4, image::Rgb([9, 8, 7]));
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    fn bundle(json: &str, portraits: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("cast")).unwrap();
        std::fs::write(dir.path().join(CAST_FILE), json).unwrap();
        for p in portraits {
            std::fs::write(dir.path().join("cast").join(p), png()).unwrap();
        }
        dir
    }

    #[test]
    fn reads_a_cast_and_refuses_broken_ones() {
        let ok = bundle(
            r#"[{"name": "Mia", "pronoun": "she", "description": "a woman", "portrait": "mia.png"},
                {"name": "Bob", "pronoun": "he", "portrait": "bob.png", "extra": 1}]"#,
            &["mia.png", "bob.png"],
        );
        let cast = StarterCast::load(ok.path());
        assert_eq!(cast.members().len(), 2);
        assert_eq!(cast.members()[0].pronoun, Pronoun::She);
        assert_eq!(cast.members()[1].description, "");
        assert!(cast.offers_example_story());
        let tom = bundle(
            r#"[{"name": "Tom", "pronoun": "he", "portrait": "tom.png"}]"#,
            &["tom.png"],
        );
        let tom = StarterCast::load(tom.path());
        // Its captions name Mia and Bob, whom this cast lacks.
        assert!(!tom.is_empty() && !tom.offers_example_story());

        let none = tempfile::tempdir().unwrap();
        assert!(StarterCast::load(none.path()).is_empty());
        for (json, files) in [
            ("{not json", &["mia.png"][..]),
            ("[]", &[][..]),
            (
                r#"[{"name": "Mia", "pronoun": "she", "portrait": "gone.png"}]"#,
                &[][..],
            ),
            (
                r#"[{"name": "Mia", "pronoun": "xe", "portrait": "mia.png"}]"#,
                &["mia.png"][..],
            ),
            (
                r#"[{"name": "Mia", "pronoun": "she", "portrait": "../mia.png"}]"#,
                &["mia.png"][..],
            ),
            (
                r#"[{"name": "Mia", "pronoun": "she", "portrait": "mia.png"},
                    {"name": "MIA", "pronoun": "she", "portrait": "mia.png"}]"#,
                &["mia.png"][..],
            ),
        ] {
            assert!(
                StarterCast::load(bundle(json, files).path()).is_empty(),
                "{json}"
            );
        }
        let not_image = bundle(
            r#"[{"name": "Mia", "pronoun": "she", "portrait": "mia.png"}]"#,
            &[],
        );
        std::fs::write(not_image.path().join("cast/mia.png"), "text").unwrap();
        assert!(StarterCast::load(not_image.path()).is_empty());
    }

    #[test]
    fn summaries_say_what_happened() {
        let summary = |added: usize, skipped: &[&str]| {
            let character = Character {
                id: 1,
                name: "X".into(),
                pronoun: Pronoun::He,
                portrait: characters::PortraitInfo {
                    url: String::new(),
                    mime: "image/png".into(),
                    width: 1,
                    height: 1,
                },
                created_at: String::new(),
                updated_at: String::new(),
            };
            Added {
                added: vec![character; added],
                skipped: skipped.iter().map(|s| s.to_string()).collect(),
                character_ids: Vec::new(),
            }
            .summary()
        };
        assert_eq!(summary(7, &[]), "Added 7 characters.");
        assert_eq!(summary(1, &[]), "Added 1 character.");
        assert_eq!(
            summary(5, &["Tom", "Mia"]),
            "Added 5 characters; Tom, Mia were already there."
        );
        assert_eq!(
            summary(6, &["Tom"]),
            "Added 6 characters; Tom was already there."
        );
        assert_eq!(
            summary(0, &["Tom", "Mia"]),
            "Nothing added: all 2 characters of the starter cast were already there."
        );
        assert_eq!(
            summary(0, &["Tom"]),
            "Nothing added: Tom was already there."
        );
    }
}
