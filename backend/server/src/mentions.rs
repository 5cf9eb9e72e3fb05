//! Who each caption of a story talks about: character names, pronouns resolved to the
//! characters of the captions before them, and capitalised words that look like names of
//! characters the cast does not have. The story editor highlights these as the user types
//! (`POST /ui/stories/{id}/highlight`) and `POST /api/mentions` returns them as JSON.
//!
//! Names and pronouns are found by `data::find_mentions` with the cast as a rule set, and the
//! characters a caption is about come from `data::referential::frame_characters`, the same
//! immediate-character rule the referential extension (Algorithm 1) uses. On top of that:
//!
//! - **Pronoun resolution.** A pronoun looks for its referent in scopes, nearest first: the
//!   characters named (or already resolved) earlier in the same caption, then each previous
//!   caption's characters (its names plus what its own pronouns resolved to), newest first.
//!   he/she/it take the characters of the nearest scope that has one with that pronoun; two or
//!   more there make the reference ambiguous and all are reported. "they" takes the nearest
//!   scope's group when it holds two or more characters, a lone character who goes by "they",
//!   or else gathers single characters from successive scopes until there are two.
//! - **Unknown names.** A capitalised word that is not at the start of a sentence, not part of
//!   a cast member's name, not a pronoun, not written all in capitals (acronyms such as "TV")
//!   and not in a small stop list (I, titles, days, months) is flagged; neighbouring
//!   capitalised words form one flag ("Bamm Bamm"). A name that opens a sentence cannot be
//!   told from an ordinary capitalised word, so it is not flagged.

use std::collections::BTreeSet;

use data::referential::{frame_characters, StoryFrame};
use data::rules::{Case, CharacterDef, Pronoun as DataPronoun, RuleMode, RuleSet};
use data::{find_mentions, MentionKind};

use crate::store::characters::Pronoun;

/// A member of the cast the captions are checked against.
#[derive(Debug, Clone, PartialEq)]
pub struct CastMember {
    /// The name as captions write it.
    pub name: String,
    /// The pronoun captions use for the character.
    pub pronoun: Pronoun,
}

/// What a highlighted span is.
#[derive(Debug, Clone, PartialEq)]
pub enum SpanKind {
    /// A cast member's name (index into the cast).
    Character {
        /// Index into the cast.
        cast_index: usize,
        /// Written as a possessive ("Fred's").
        possessive: bool,
    },
    /// A personal pronoun and the cast members it refers to (empty: nobody before it fits).
    Pronoun {
        /// The pronoun family.
        pronoun: Pronoun,
        /// Grammatical case as written.
        case: Case,
        /// Indices into the cast, in cast order.
        refers_to: Vec<usize>,
        /// More than one character fits a he/she/it.
        ambiguous: bool,
    },
    /// A capitalised word (or run of them) that looks like a name nobody in the cast has.
    Unknown,
}

/// One highlighted span of a caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
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
    /// What it is.
    pub kind: SpanKind,
}

fn to_data(p: Pronoun) -> DataPronoun {
    match p {
        Pronoun::He => DataPronoun::He,
        Pronoun::She => DataPronoun::She,
        Pronoun::They => DataPronoun::They,
        Pronoun::It => DataPronoun::It,
    }
}

fn from_data(p: DataPronoun) -> Pronoun {
    match p {
        DataPronoun::He => Pronoun::He,
        DataPronoun::She => Pronoun::She,
        DataPronoun::They => Pronoun::They,
        DataPronoun::It => Pronoun::It,
    }
}

/// The cast as a `data` rule set. Built directly rather than through `RuleSet::custom`, which
/// takes a name-sorted map: here the rule-set index must equal the cast index, because the
/// cast order picks each character's highlight colour.
pub fn rule_set(cast: &[CastMember]) -> RuleSet {
    RuleSet {
        name: "custom".into(),
        characters: cast
            .iter()
            .map(|c| CharacterDef::new(c.name.trim(), to_data(c.pronoun)))
            .collect(),
        mode: RuleMode::Labels,
    }
}

/// Resolves a pronoun against scopes of character indices, nearest scope first.
fn resolve(pronoun: Pronoun, scopes: &[Vec<usize>], cast: &[CastMember]) -> (Vec<usize>, bool) {
    let mut found: Vec<usize> = Vec::new();
    if pronoun == Pronoun::They {
        for scope in scopes.iter().filter(|s| !s.is_empty()) {
            if scope.len() >= 2 {
                found = scope.clone();
                break;
            }
            let only = scope[0];
            if cast[only].pronoun == Pronoun::They && found.is_empty() {
                found.push(only);
                break;
            }
            if !found.contains(&only) {
                found.push(only);
            }
            if found.len() >= 2 {
                break;
            }
        }
        found.sort_unstable();
        return (found, false);
    }
    for scope in scopes {
        let matching: Vec<usize> = scope
            .iter()
            .copied()
            .filter(|&i| cast[i].pronoun == pronoun)
            .collect();
        if !matching.is_empty() {
            found = matching;
            break;
        }
    }
    found.sort_unstable();
    found.dedup();
    let ambiguous = found.len() > 1;
    (found, ambiguous)
}

/// Analyses every caption of a story in order; the result has one span list per caption,
/// ordered by position.
pub fn analyse(captions: &[&str], cast: &[CastMember]) -> Vec<Vec<Span>> {
    let mut rules = rule_set(cast);
    // Characters of each earlier caption, newest last.
    let mut history: Vec<Vec<usize>> = Vec::with_capacity(captions.len());
    let mut out = Vec::with_capacity(captions.len());
    for caption in captions {
        let mentions = find_mentions(caption, &rules);
        let mut spans = Vec::with_capacity(mentions.len());
        // Characters this caption has named or resolved so far, in order of appearance.
        let mut here: Vec<usize> = Vec::new();
        for m in mentions {
            let kind = match m.kind {
                MentionKind::Character {
                    index, possessive, ..
                } => {
                    if !here.contains(&index) {
                        here.push(index);
                    }
                    SpanKind::Character {
                        cast_index: index,
                        possessive,
                    }
                }
                MentionKind::Pronoun { pronoun, case } => {
                    let pronoun = from_data(pronoun);
                    let scopes: Vec<Vec<usize>> = std::iter::once(here.clone())
                        .chain(history.iter().rev().cloned())
                        .collect();
                    let (refers_to, ambiguous) = resolve(pronoun, &scopes, cast);
                    for &i in &refers_to {
                        if !here.contains(&i) {
                            here.push(i);
                        }
                    }
                    SpanKind::Pronoun {
                        pronoun,
                        case,
                        refers_to,
                        ambiguous,
                    }
                }
            };
            spans.push(Span {
                start: m.start,
                end: m.end,
                byte_start: m.byte_start,
                byte_end: m.byte_end,
                text: m.text,
                kind,
            });
        }
        for (byte_start, byte_end) in unknown_names(caption, &spans) {
            spans.push(Span {
                start: caption[..byte_start].chars().count(),
                end: caption[..byte_end].chars().count(),
                byte_start,
                byte_end,
                text: caption[byte_start..byte_end].to_string(),
                kind: SpanKind::Unknown,
            });
        }
        spans.sort_by_key(|s| s.byte_start);
        // The caption's immediate characters as the referential extension sees them (its
        // names), plus whoever its pronouns pointed at: "He waves at Wilma." is about Fred too.
        let named: BTreeSet<usize> = frame_characters(
            &mut rules,
            &StoryFrame {
                caption: caption.to_string(),
                characters: None,
            },
        );
        let mut characters: Vec<usize> = named.into_iter().collect();
        for i in here {
            if !characters.contains(&i) {
                characters.push(i);
            }
        }
        characters.sort_unstable();
        history.push(characters);
        out.push(spans);
    }
    out
}

/// Capitalised words that are never taken for a character's name on their own.
const STOP_WORDS: &[&str] = &[
    "i",
    "mr",
    "mrs",
    "ms",
    "miss",
    "dr",
    "sir",
    "madam",
    "mister",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
    "christmas",
    "ok",
    "okay",
];

/// Stop words that introduce a name and may be followed by a dot.
const TITLES: &[&str] = &["mr", "mrs", "ms", "dr", "miss", "sir", "mister", "madam"];

/// A word of a caption: byte span.
struct Word {
    start: usize,
    end: usize,
}

fn words(text: &str) -> Vec<Word> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, ch) in text.char_indices() {
        if ch.is_alphanumeric() {
            start.get_or_insert(i);
        } else if let Some(s) = start.take() {
            out.push(Word { start: s, end: i });
        }
    }
    if let Some(s) = start {
        out.push(Word {
            start: s,
            end: text.len(),
        });
    }
    out
}

/// Whether the word starting at `byte` may open a sentence: nothing but brackets or dashes
/// between it and the start of the caption, a sentence-ending mark, or a quotation mark.
/// Quoted speech starts with a capital (`Fred says, "Hello."`), and a straight quote cannot be
/// told open from closed, so any quote counts: missing a name is better than a false flag.
fn at_sentence_start(text: &str, byte: usize) -> bool {
    for ch in text[..byte].chars().rev() {
        if ch.is_whitespace() || "([-—–".contains(ch) {
            continue;
        }
        return ".!?…\"'“”‘’«»".contains(ch);
    }
    true
}

fn looks_like_name(word: &str) -> bool {
    let mut chars = word.chars();
    let first_upper = chars.next().is_some_and(char::is_uppercase);
    let all_caps = word.chars().filter(|c| c.is_alphabetic()).count() > 1
        && !word.chars().any(char::is_lowercase);
    first_upper && !all_caps
}

/// Byte spans of capitalised words (runs of them) that look like unknown names.
fn unknown_names(text: &str, known: &[Span]) -> Vec<(usize, usize)> {
    let taken = |w: &Word| {
        known
            .iter()
            .any(|s| w.start < s.byte_end && s.byte_start < w.end)
    };
    // Runs as (start, end, holds a word outside the stop list).
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut run_open = false;
    // The previous capitalised word (end, was a title), when the word just before was one.
    let mut previous: Option<(usize, bool)> = None;
    for w in words(text) {
        let word = &text[w.start..w.end];
        let lower = word.to_lowercase();
        let candidate =
            looks_like_name(word) && !taken(&w) && DataPronoun::from_word(&lower, true).is_none();
        if !candidate {
            run_open = false;
            previous = None;
            continue;
        }
        let real = !STOP_WORDS.contains(&lower.as_str());
        // Joined to the previous capitalised word when only a space is between ("Bamm Bamm"),
        // or a dot-space after a title ("Mr. Stone"; elsewhere ". " ends a sentence).
        let joined = previous.is_some_and(|(e, title)| {
            let gap = &text[e..w.start];
            gap == " " || (title && gap == ". ")
        });
        previous = Some((w.end, TITLES.contains(&lower.as_str())));
        match runs.last_mut() {
            Some(run) if joined && run_open => {
                run.1 = w.end;
                run.2 |= real;
            }
            // The first word of a sentence is capitalised anyway: it cannot be judged, but
            // capitalised words right after it can ("Mr. Stone waves" flags "Stone").
            _ if !joined && at_sentence_start(text, w.start) => run_open = false,
            _ => {
                runs.push((w.start, w.end, real));
                run_open = true;
            }
        }
    }
    runs.into_iter()
        .filter(|&(_, _, real)| real)
        .map(|(s, e, _)| (s, e))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cast() -> Vec<CastMember> {
        vec![
            CastMember {
                name: "Fred".into(),
                pronoun: Pronoun::He,
            },
            CastMember {
                name: "Wilma".into(),
                pronoun: Pronoun::She,
            },
            CastMember {
                name: "Dino".into(),
                pronoun: Pronoun::It,
            },
            CastMember {
                name: "Sam".into(),
                pronoun: Pronoun::They,
            },
        ]
    }

    fn describe(spans: &[Span], cast: &[CastMember]) -> Vec<String> {
        spans
            .iter()
            .map(|s| match &s.kind {
                SpanKind::Character { cast_index, .. } => {
                    format!("{}={}", s.text, cast[*cast_index].name)
                }
                SpanKind::Pronoun {
                    refers_to,
                    ambiguous,
                    ..
                } => {
                    let names: Vec<&str> =
                        refers_to.iter().map(|&i| cast[i].name.as_str()).collect();
                    format!(
                        "{}->{}{}",
                        s.text,
                        names.join("+"),
                        if *ambiguous { "?" } else { "" }
                    )
                }
                SpanKind::Unknown => format!("{}=unknown", s.text),
            })
            .collect()
    }

    #[test]
    fn pronouns_resolve_to_earlier_captions() {
        let cast = cast();
        let got = analyse(
            &[
                "Fred opens the door.",
                "He waves at Wilma.",
                "They laugh and she hugs him.",
            ],
            &cast,
        );
        let got: Vec<_> = got.iter().map(|s| describe(s, &cast)).collect();
        assert_eq!(got[0], ["Fred=Fred"]);
        assert_eq!(got[1], ["He->Fred", "Wilma=Wilma"]);
        assert_eq!(got[2], ["They->Fred+Wilma", "she->Wilma", "him->Fred"]);
    }

    #[test]
    fn same_caption_names_come_first_and_ambiguity_is_reported() {
        let mut cast = cast();
        cast.push(CastMember {
            name: "Barney".into(),
            pronoun: Pronoun::He,
        });
        let got = analyse(&["Wilma sees Fred and Barney.", "He smiles at her."], &cast);
        assert_eq!(describe(&got[1], &cast), ["He->Fred+Barney?", "her->Wilma"]);
        let got = analyse(&["Fred meets Wilma and she smiles at him."], &cast);
        assert_eq!(
            describe(&got[0], &cast),
            ["Fred=Fred", "Wilma=Wilma", "she->Wilma", "him->Fred"]
        );
    }

    #[test]
    fn captions_without_characters_do_not_break_the_chain() {
        let cast = cast();
        let got = analyse(&["Fred runs.", "The sun sets.", "He sleeps."], &cast);
        assert_eq!(describe(&got[2], &cast), ["He->Fred"]);
        // Nobody before uses "she": the pronoun stays unresolved.
        let got = analyse(&["Fred runs.", "She waves."], &cast);
        assert_eq!(describe(&got[1], &cast), ["She->"]);
    }

    #[test]
    fn they_and_it() {
        let cast = cast();
        // A lone character who goes by "they".
        let got = analyse(&["Sam reads.", "They smile."], &cast);
        assert_eq!(describe(&got[1], &cast), ["They->Sam"]);
        // Two single characters in successive captions make a group.
        let got = analyse(&["Fred arrives.", "Wilma arrives.", "They hug."], &cast);
        assert_eq!(describe(&got[2], &cast), ["They->Fred+Wilma"]);
        // "it" counts because Dino uses it.
        let got = analyse(&["Dino barks.", "It wags its tail."], &cast);
        assert_eq!(describe(&got[1], &cast), ["It->Dino", "its->Dino"]);
    }

    #[test]
    fn unknown_capitalised_names_are_flagged() {
        let cast = cast();
        let got = analyse(
            &["Fred talks to Barney and Bamm Bamm about TV on Monday. Betty listens, I think."],
            &cast,
        );
        assert_eq!(
            describe(&got[0], &cast),
            ["Fred=Fred", "Barney=unknown", "Bamm Bamm=unknown"]
        );
        // Titles join the name they introduce; offsets count characters, not bytes.
        let got = analyse(&["Café with Mr. Stone and Zoë."], &cast);
        let spans = &got[0];
        assert_eq!(describe(spans, &cast), ["Mr. Stone=unknown", "Zoë=unknown"]);
        assert_eq!((spans[1].start, spans[1].end), (24, 27));
        assert_eq!(
            &"Café with Mr. Stone and Zoë."[spans[1].byte_start..spans[1].byte_end],
            "Zoë"
        );
        // Quotes and brackets do not hide a sentence start; a lone title is not a name.
        let got = analyse(&["Fred says: \"Hello there.\" (Later) Sir, yes."], &cast);
        assert_eq!(describe(&got[0], &cast), ["Fred=Fred"]);
        // After a sentence-opening word, the rest of a capitalised run is still judged; a
        // sentence end splits two names.
        let got = analyse(
            &["Mr. Stone waves. Bamm Bamm runs to Fred and Barney. Betty"],
            &cast,
        );
        assert_eq!(
            describe(&got[0], &cast),
            [
                "Stone=unknown",
                "Bamm=unknown",
                "Fred=Fred",
                "Barney=unknown"
            ]
        );
    }
}
