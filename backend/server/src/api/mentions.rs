//! `POST /api/mentions`: who each caption names or refers to, for editors that highlight
//! captions as they are typed. The JSON twin of the story editor's highlight fragment; the
//! rules are in `crate::mentions`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ApiJson;
use crate::error::{ApiError, ApiResult, Problem};
use crate::mentions::{self, CastMember, SpanKind};
use crate::store::characters::Pronoun;
use crate::validate::{self, MAX_CAPTIONS, MAX_CAPTION_CHARS, MAX_CAST};

/// A character the captions may name.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CastEntry {
    /// The name as captions write it (1..=64 characters, unique case-insensitively).
    pub name: String,
    /// The pronoun captions use for the character.
    pub pronoun: Pronoun,
}

/// Captions of a story, in order, and its cast.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"captions": ["Mia walks in the forest.", "She waves at Bob."], "cast": [{"name": "Mia", "pronoun": "she"}, {"name": "Bob", "pronoun": "he"}]}))]
pub struct MentionsRequest {
    /// Captions in story order (at most 200, each at most 1000 characters; may be empty
    /// while being typed).
    pub captions: Vec<String>,
    /// The characters the captions may name (at most 64).
    #[serde(default)]
    pub cast: Vec<CastEntry>,
}

/// What a mention is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MentionType {
    /// A cast member's name.
    Character,
    /// A personal pronoun, with the characters it refers to.
    Pronoun,
    /// A capitalised word that looks like the name of a character the cast does not have.
    Unknown,
}

/// Grammatical case of a pronoun.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PronounCase {
    /// he, she, they, it
    Subject,
    /// him, her, them, it
    Object,
    /// his, her, hers, their, its
    Possessive,
    /// himself, herself, themselves, itself
    Reflexive,
}

impl From<data::Case> for PronounCase {
    fn from(case: data::Case) -> Self {
        match case {
            data::Case::Subject => PronounCase::Subject,
            data::Case::Object => PronounCase::Object,
            data::Case::Possessive => PronounCase::Possessive,
            data::Case::Reflexive => PronounCase::Reflexive,
        }
    }
}

/// One mention in a caption.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MentionOut {
    /// Offset of the first character, in Unicode scalar values.
    pub start: usize,
    /// Offset one past the last character, in Unicode scalar values.
    pub end: usize,
    /// UTF-8 byte offset of the first character.
    pub byte_start: usize,
    /// UTF-8 byte offset one past the last character.
    pub byte_end: usize,
    /// The text as written.
    pub text: String,
    /// character, pronoun or unknown.
    pub kind: MentionType,
    /// For a name: the cast member's name as given in `cast`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub character: Option<String>,
    /// For a name: its 0-based index in `cast`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cast_index: Option<usize>,
    /// For a name: written as a possessive ("Fred's").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub possessive: Option<bool>,
    /// For a pronoun: its family.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pronoun: Option<Pronoun>,
    /// For a pronoun: its case as written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub case: Option<PronounCase>,
    /// For a pronoun: the cast members it refers to, in cast order; empty when no earlier
    /// character fits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refers_to: Option<Vec<String>>,
    /// For a pronoun: more than one character fits a he/she/it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ambiguous: Option<bool>,
}

/// The mentions of one caption.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CaptionMentions {
    /// 0-based index of the caption in the request.
    pub index: usize,
    /// Mentions in text order.
    pub mentions: Vec<MentionOut>,
}

/// Mentions of every caption, in request order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MentionsResponse {
    /// One entry per caption.
    pub captions: Vec<CaptionMentions>,
}

fn check(body: &MentionsRequest) -> ApiResult<Vec<CastMember>> {
    if body.captions.len() > MAX_CAPTIONS {
        return Err(ApiError::invalid(
            "too_many_captions",
            format!(
                "at most {MAX_CAPTIONS} captions; {} were given",
                body.captions.len()
            ),
        ));
    }
    for (i, caption) in body.captions.iter().enumerate() {
        let count = caption.chars().count();
        if count > MAX_CAPTION_CHARS {
            return Err(ApiError::invalid(
                "invalid_caption",
                format!(
                    "caption {}: the caption is {count} characters long; at most \
                     {MAX_CAPTION_CHARS} are allowed",
                    i + 1
                ),
            ));
        }
    }
    if body.cast.len() > MAX_CAST {
        return Err(ApiError::invalid(
            "too_many_characters",
            format!("a cast has at most {MAX_CAST} characters"),
        ));
    }
    let mut cast: Vec<CastMember> = Vec::with_capacity(body.cast.len());
    for entry in &body.cast {
        let name = validate::name(&entry.name)?;
        if cast
            .iter()
            .any(|c| c.name.to_lowercase() == name.to_lowercase())
        {
            return Err(ApiError::invalid(
                "invalid_cast",
                format!("the cast names {name:?} twice; each name must be unique"),
            ));
        }
        cast.push(CastMember {
            name,
            pronoun: entry.pronoun,
        });
    }
    Ok(cast)
}

/// Turns analysed spans into the wire form.
pub fn to_wire(spans: Vec<mentions::Span>, cast: &[CastMember]) -> Vec<MentionOut> {
    spans
        .into_iter()
        .map(|s| {
            let mut out = MentionOut {
                start: s.start,
                end: s.end,
                byte_start: s.byte_start,
                byte_end: s.byte_end,
                text: s.text,
                kind: MentionType::Unknown,
                character: None,
                cast_index: None,
                possessive: None,
                pronoun: None,
                case: None,
                refers_to: None,
                ambiguous: None,
            };
            match s.kind {
                SpanKind::Character {
                    cast_index,
                    possessive,
                } => {
                    out.kind = MentionType::Character;
                    out.character = Some(cast[cast_index].name.clone());
                    out.cast_index = Some(cast_index);
                    out.possessive = Some(possessive);
                }
                SpanKind::Pronoun {
                    pronoun,
                    case,
                    refers_to,
                    ambiguous,
                } => {
                    out.kind = MentionType::Pronoun;
                    out.pronoun = Some(pronoun);
                    out.case = Some(case.into());
                    out.refers_to = Some(refers_to.iter().map(|&i| cast[i].name.clone()).collect());
                    out.ambiguous = Some(ambiguous);
                }
                SpanKind::Unknown => {}
            }
            out
        })
        .collect()
}

/// Find the characters each caption names or refers to.
///
/// Names of `cast` members match case-insensitively as whole words ("Fred's" is a possessive
/// mention). Each pronoun is resolved to characters named or referred to before it: earlier
/// in its caption first, then in the previous captions, newest first. A capitalised word
/// that does not start a sentence, belongs to no cast member, is no pronoun, acronym, title,
/// day or month is reported as `unknown`: probably a character missing from the cast.
#[utoipa::path(post, path = "/api/mentions", tag = "stories", request_body = MentionsRequest,
    responses((status = 200, description = "Mentions per caption", body = MentionsResponse),
              (status = 400, description = "Malformed JSON", body = Problem),
              (status = 422, description = "Too many or too long captions, invalid or duplicate cast names", body = Problem)))]
pub async fn find(
    ApiJson(body): ApiJson<MentionsRequest>,
) -> ApiResult<axum::Json<MentionsResponse>> {
    let cast = check(&body)?;
    let analysed = mentions::analyse_off_thread(body.captions, cast.clone()).await?;
    Ok(axum::Json(MentionsResponse {
        captions: analysed
            .into_iter()
            .enumerate()
            .map(|(index, spans)| CaptionMentions {
                index,
                mentions: to_wire(spans, &cast),
            })
            .collect(),
    }))
}
