//! Carrying a character's new name into the captions of the stories that cast it, so a
//! rename does not leave captions naming someone who no longer exists.

use sqlx::AnyPool;

use crate::error::ApiResult;
use crate::mentions::{self, CastMember};
use crate::store::characters::{self, CaptionRewrite};
use crate::store::stories;

/// The caption rewrites that rename character `id` to `new_name` in every story whose cast
/// includes it (only there do its captions mean that character).
pub async fn caption_rewrites(
    pool: &AnyPool,
    id: i64,
    new_name: &str,
) -> ApiResult<Vec<CaptionRewrite>> {
    let library = characters::all(pool, characters::owner_of(pool, id).await?).await?;
    let mut rewrites = Vec::new();
    for story_id in stories::casting(pool, id).await? {
        let story = stories::get(pool, story_id).await?;
        let cast: Vec<CastMember> = story
            .character_ids
            .iter()
            .filter_map(|cid| library.iter().find(|c| c.id == *cid))
            .map(|c| CastMember {
                name: c.name.clone(),
                pronoun: c.pronoun,
            })
            .collect();
        let Some(who) = story
            .character_ids
            .iter()
            .filter(|cid| library.iter().any(|c| c.id == **cid))
            .position(|cid| *cid == id)
        else {
            continue;
        };
        let captions: Vec<&str> = story.frames.iter().map(|f| f.caption.as_str()).collect();
        let renamed = mentions::rename_mentions(&captions, &cast, who, new_name);
        for (frame, to) in story.frames.iter().zip(renamed) {
            if let Some(to) = to {
                rewrites.push(CaptionRewrite {
                    story_id,
                    frame_id: frame.id,
                    from: frame.caption.clone(),
                    to,
                });
            }
        }
    }
    Ok(rewrites)
}
