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
use crate::validate::MAX_CAPTION_CHARS;

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

/// What "they" refers to, given the characters of the caption so far (`here`) and of each
/// earlier caption (`history`, oldest first): the scopes are `here`, then the earlier captions
/// newest first.
fn resolve_they(here: &[usize], history: &[Vec<usize>], cast: &[CastMember]) -> Vec<usize> {
    let mut found: Vec<usize> = Vec::new();
    let scopes = std::iter::once(here).chain(history.iter().rev().map(Vec::as_slice));
    for scope in scopes.filter(|s| !s.is_empty()) {
        if scope.len() >= 2 {
            found = scope.to_vec();
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
    found
}

/// The characters of `scope` who go by `pronoun`.
fn matching(scope: &[usize], pronoun: Pronoun, cast: &[CastMember]) -> Vec<usize> {
    scope
        .iter()
        .copied()
        .filter(|&i| cast[i].pronoun == pronoun)
        .collect()
}

/// The newest earlier caption's characters who go by `pronoun` (he/she/it), if any has one.
fn nearest_in_history(pronoun: Pronoun, history: &[Vec<usize>], cast: &[CastMember]) -> Vec<usize> {
    history
        .iter()
        .rev()
        .map(|scope| matching(scope, pronoun, cast))
        .find(|found| !found.is_empty())
        .unwrap_or_default()
}

/// Resolves the pronouns of one caption. What the earlier captions offer a he/she/it is the
/// same for every pronoun of the caption, so it is looked up once per caption; "they" also
/// depends on the caption's own characters, which only grow, so its answer is kept until they
/// do. Each pronoun then costs at most a pass over the caption's own characters, not over the
/// whole story: analysing a story stays linear in its length.
struct Resolver<'a> {
    cast: &'a [CastMember],
    history: &'a [Vec<usize>],
    /// Per he/she/it (`slot`): the nearest earlier caption's matching characters.
    nearest: [Option<Vec<usize>>; 3],
    /// "they" for a caption whose own characters numbered `.0`.
    they: Option<(usize, Vec<usize>)>,
}

impl<'a> Resolver<'a> {
    fn new(cast: &'a [CastMember], history: &'a [Vec<usize>]) -> Self {
        Self {
            cast,
            history,
            nearest: [None, None, None],
            they: None,
        }
    }

    /// The characters `pronoun` refers to and whether that is ambiguous, given the
    /// characters the caption has named or resolved before it (`here`, which only grows).
    fn resolve(&mut self, pronoun: Pronoun, here: &[usize]) -> (Vec<usize>, bool) {
        let slot = match pronoun {
            Pronoun::They => {
                if !matches!(&self.they, Some((len, _)) if *len == here.len()) {
                    self.they = Some((here.len(), resolve_they(here, self.history, self.cast)));
                }
                let found = self
                    .they
                    .as_ref()
                    .map(|(_, f)| f.clone())
                    .unwrap_or_default();
                return (found, false);
            }
            Pronoun::He => 0,
            Pronoun::She => 1,
            Pronoun::It => 2,
        };
        let mut found = matching(here, pronoun, self.cast);
        if found.is_empty() {
            let (history, cast) = (self.history, self.cast);
            found = self.nearest[slot]
                .get_or_insert_with(|| nearest_in_history(pronoun, history, cast))
                .clone();
        }
        found.sort_unstable();
        found.dedup();
        let ambiguous = found.len() > 1;
        (found, ambiguous)
    }
}

/// Analyses every caption of a story in order; the result has one span list per caption,
/// ordered by position.
///
/// A caption longer than [`MAX_CAPTION_CHARS`] (one being typed, or a refused edit shown
/// back) is not analysed: it gets no spans and counts as naming nobody. That bounds the work
/// per caption whatever a request holds; the rest of the analysis is linear in the length of
/// the captions.
pub fn analyse(captions: &[&str], cast: &[CastMember]) -> Vec<Vec<Span>> {
    analyse_within(captions, cast, MAX_CAPTION_CHARS)
}

/// [`analyse`] with a limit on the length of an analysed caption, in characters.
#[doc(hidden)]
pub fn analyse_within(captions: &[&str], cast: &[CastMember], limit: usize) -> Vec<Vec<Span>> {
    let mut rules = rule_set(cast);
    // Characters of each earlier caption, newest last.
    let mut history: Vec<Vec<usize>> = Vec::with_capacity(captions.len());
    let mut out = Vec::with_capacity(captions.len());
    for caption in captions {
        if caption.len() > limit && caption.chars().count() > limit {
            history.push(Vec::new());
            out.push(Vec::new());
            continue;
        }
        let mentions = find_mentions(caption, &rules);
        let mut resolver = Resolver::new(cast, &history);
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
                    let (refers_to, ambiguous) = resolver.resolve(pronoun, &here);
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
        // Character offsets counted on from the previous one (the runs come in order), not
        // from the start of the caption each time.
        let mut counted = (0, 0);
        let mut char_offset = |byte: usize| {
            let (from_byte, from_char) = counted;
            let at = from_char + caption[from_byte..byte].chars().count();
            counted = (byte, at);
            at
        };
        for (byte_start, byte_end) in unknown_names(caption, &spans) {
            let (start, end) = (char_offset(byte_start), char_offset(byte_end));
            spans.push(Span {
                start,
                end,
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

/// Most analyses that run at once on the blocking pool; more wait their turn, so a burst of
/// large requests cannot take every core (or grow the blocking pool without bound).
const MAX_CONCURRENT_ANALYSES: usize = 4;
static ANALYSES: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(MAX_CONCURRENT_ANALYSES);
/// Captions with fewer bytes than this in all are analysed in place: that takes well under a
/// millisecond, less than handing the work to another thread.
const INLINE_BYTES: usize = 4 * 1024;

/// [`analyse`] for request handlers: small inputs in place, larger ones on the blocking pool
/// (at most [`MAX_CONCURRENT_ANALYSES`] at a time), so the async threads that serve every
/// other request (`/healthz` included) are never busy with it for long.
pub async fn analyse_off_thread(
    captions: Vec<String>,
    cast: Vec<CastMember>,
) -> crate::error::ApiResult<Vec<Vec<Span>>> {
    let bytes: usize = captions.iter().map(String::len).sum();
    let run = move || {
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        analyse(&refs, &cast)
    };
    if bytes < INLINE_BYTES {
        return Ok(run());
    }
    let _permit = ANALYSES
        .acquire()
        .await
        .map_err(crate::error::ApiError::internal)?;
    tokio::task::spawn_blocking(run)
        .await
        .map_err(crate::error::ApiError::internal)
}

/// Whether a caption is short enough to analyse (at most [`MAX_CAPTION_CHARS`] characters).
pub fn analysable(caption: &str) -> bool {
    // A quick bound on bytes first: counting characters is linear, but need not be done at all
    // for most captions.
    caption.len() <= MAX_CAPTION_CHARS || caption.chars().count() <= MAX_CAPTION_CHARS
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

/// Byte spans of capitalised words (runs of them) that look like unknown names, in order.
fn unknown_names(text: &str, known: &[Span]) -> Vec<(usize, usize)> {
    // Whether a word overlaps a known span, in one sweep: words come in order, so the spans
    // starting before the current word's end only grow; it overlaps one of them exactly when
    // the furthest end among them lies past its start.
    let mut known: Vec<(usize, usize)> = known.iter().map(|s| (s.byte_start, s.byte_end)).collect();
    known.sort_unstable();
    let mut next_known = 0;
    let mut furthest_end = 0;
    let mut taken = |w: &Word| {
        while let Some(&(start, end)) = known.get(next_known) {
            if start >= w.end {
                break;
            }
            furthest_end = furthest_end.max(end);
            next_known += 1;
        }
        furthest_end > w.start
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

/// `captions` with every mention of cast member `who` by name written as `new_name` (a
/// possessive keeps its ending: "Fred's" -> "Frederick's"); `None` for a caption that does not
/// name them. Mentions are found exactly as the highlights find them, so a rename rewrites
/// what the studio marked as that character and nothing else ("Freddy" stays).
pub fn rename_mentions(
    captions: &[&str],
    cast: &[CastMember],
    who: usize,
    new_name: &str,
) -> Vec<Option<String>> {
    let old_len = cast.get(who).map_or(0, |c| c.name.chars().count());
    analyse(captions, cast)
        .into_iter()
        .zip(captions)
        .map(|(spans, caption)| {
            let mut out = String::with_capacity(caption.len());
            let mut at = 0;
            for span in &spans {
                if !matches!(span.kind, SpanKind::Character { cast_index, .. } if cast_index == who)
                {
                    continue;
                }
                out.push_str(&caption[at..span.byte_start]);
                out.push_str(new_name);
                // The possessive's ending after the name.
                out.extend(span.text.chars().skip(old_len));
                at = span.byte_end;
            }
            (at > 0).then(|| {
                out.push_str(&caption[at..]);
                out
            })
        })
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
    fn they_follows_the_caption_as_it_names_more() {
        let cast = cast();
        let got = analyse(
            &[
                "Sam reads.",
                "Fred waves, they smile, then Wilma comes and they hug.",
            ],
            &cast,
        );
        assert_eq!(
            describe(&got[1], &cast),
            [
                "Fred=Fred",
                "they->Fred+Sam",
                "Wilma=Wilma",
                "they->Fred+Wilma+Sam"
            ]
        );
    }

    #[test]
    fn captions_over_the_limit_are_not_analysed() {
        let cast = cast();
        let long = format!("Fred meets Barney {}", "x".repeat(MAX_CAPTION_CHARS));
        assert!(!analysable(&long));
        let got = analyse(&["Wilma sings.", &long, "She smiles."], &cast);
        assert!(got[1].is_empty());
        // It names nobody, so the chain goes on past it.
        assert_eq!(describe(&got[2], &cast), ["She->Wilma"]);
        // Without the limit it is analysed as before.
        let got = analyse_within(&[&long], &cast, usize::MAX);
        assert_eq!(describe(&got[0], &cast), ["Fred=Fred", "Barney=unknown"]);
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

    #[test]
    fn a_rename_rewrites_only_that_characters_mentions() {
        let captions = [
            "Fred waves at Wilma. Fred's hat falls.",
            "Freddy and Wilma laugh.",
            "He runs; FRED stops.",
        ];
        let got = rename_mentions(&captions, &cast(), 0, "Frederick");
        assert_eq!(
            got[0].as_deref(),
            Some("Frederick waves at Wilma. Frederick's hat falls.")
        );
        assert_eq!(got[1], None, "another word that starts like the name stays");
        let third = analyse(&[captions[2]], &cast())[0]
            .iter()
            .any(|s| matches!(s.kind, SpanKind::Character { cast_index: 0, .. }));
        assert_eq!(got[2].is_some(), third, "as the highlights match the name");
        assert_eq!(
            rename_mentions(&captions, &cast(), 1, "Wilma B")[1].as_deref(),
            Some("Freddy and Wilma B laugh.")
        );
    }
}
