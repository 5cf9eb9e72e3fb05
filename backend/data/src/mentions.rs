//! Finding character mentions in a caption: names (case-insensitive whole words, multi-word
//! and dotted forms, possessives) and pronouns, with offsets a UI can highlight. Also the
//! small grammar heuristics (sentence starts, subject/object role) referential text needs.

use serde::{Deserialize, Serialize};

use crate::rules::{Case, Pronoun, RuleSet};

/// A token of a caption: a run of letters/digits, or one punctuation character.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    /// Byte offset of the first character.
    pub start: usize,
    /// Byte offset one past the last character.
    pub end: usize,
    /// Lowercased text.
    pub lower: String,
    /// Letters/digits (true) or punctuation (false).
    pub word: bool,
}

/// Split a caption into word and punctuation tokens (whitespace is dropped).
pub(crate) fn tokenize(text: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut word_start: Option<usize> = None;
    for (i, ch) in text.char_indices() {
        if ch.is_alphanumeric() {
            if word_start.is_none() {
                word_start = Some(i);
            }
            continue;
        }
        if let Some(s) = word_start.take() {
            out.push(Token {
                start: s,
                end: i,
                lower: text[s..i].to_lowercase(),
                word: true,
            });
        }
        if !ch.is_whitespace() {
            let e = i + ch.len_utf8();
            out.push(Token {
                start: i,
                end: e,
                lower: text[i..e].to_string(),
                word: false,
            });
        }
    }
    if let Some(s) = word_start {
        out.push(Token {
            start: s,
            end: text.len(),
            lower: text[s..].to_lowercase(),
            word: true,
        });
    }
    out
}

/// What a mention refers to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum MentionKind {
    /// A character's name; `possessive` when written "Fred's" / "Pebbles'".
    Character {
        /// Canonical character name.
        name: String,
        /// Index in the rule set's character list.
        index: usize,
        /// Written as a possessive.
        possessive: bool,
    },
    /// A personal pronoun.
    Pronoun {
        /// Pronoun family.
        pronoun: Pronoun,
        /// Grammatical case as written.
        case: Case,
    },
}

/// A highlighted span of a caption.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mention {
    /// Offset of the first character, counted in Unicode scalar values.
    pub start: usize,
    /// Offset one past the last character, in Unicode scalar values.
    pub end: usize,
    /// Byte offset of the first character.
    pub byte_start: usize,
    /// Byte offset one past the last character.
    pub byte_end: usize,
    /// The text as written (including "'s" for possessives).
    pub text: String,
    /// What it refers to.
    pub kind: MentionKind,
}

/// A name match in token space (internal).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct NameMatch {
    /// Character index in the rule set.
    pub index: usize,
    /// First token.
    pub first: usize,
    /// One past the last token, possessive marker included.
    pub last: usize,
    /// Byte span in the caption.
    pub start: usize,
    /// Byte end (possessive marker included).
    pub end: usize,
    /// Written as a possessive.
    pub possessive: bool,
}

pub(crate) fn is_apostrophe(t: &Token) -> bool {
    !t.word && (t.lower == "'" || t.lower == "\u{2019}")
}

/// The tokens a caption must hold to name `alias`, as (lowercased text, is a word): its words
/// and the punctuation between them ("O'Brien", "Jean-Luc": without it such a name could never
/// match as written), but no dots, which a caption may add after a word or leave out ("Mr
/// Slate", "Mr. Slate"), and nothing before its first word or after its last. Empty when it
/// has no word.
fn alias_tokens(alias: &str) -> Vec<(String, bool)> {
    let tokens = tokenize(alias);
    let first = tokens.iter().position(|t| t.word);
    let last = tokens.iter().rposition(|t| t.word);
    let (Some(first), Some(last)) = (first, last) else {
        return Vec::new();
    };
    tokens[first..=last]
        .iter()
        .filter(|t| t.word || t.lower != ".")
        .map(|t| {
            // Either apostrophe stands for both ("O'Brien" written "O’Brien").
            let text = if is_apostrophe(t) {
                "'".to_string()
            } else {
                t.lower.clone()
            };
            (text, t.word)
        })
        .collect()
}

/// Try to match an alias's tokens (see [`alias_tokens`]) at token `i`; returns the token
/// index one past the match.
fn match_alias(tokens: &[Token], i: usize, alias: &[(String, bool)]) -> Option<usize> {
    let mut j = i;
    for (k, (text, word)) in alias.iter().enumerate() {
        let t = tokens.get(j)?;
        let same = t.lower == *text || (text == "'" && is_apostrophe(t));
        if t.word != *word || !same {
            return None;
        }
        j += 1;
        // "Mr. Slate": an optional dot right after a non-final alias word.
        if *word && k + 1 < alias.len() {
            if let Some(d) = tokens.get(j) {
                if !d.word && d.lower == "." && d.start == t.end {
                    j += 1;
                }
            }
        }
    }
    Some(j)
}

/// All character-name matches, longest alias first, left to right.
pub(crate) fn find_names(tokens: &[Token], rules: &RuleSet) -> Vec<NameMatch> {
    let aliases: Vec<(usize, Vec<(String, bool)>)> = rules
        .characters
        .iter()
        .enumerate()
        .flat_map(|(ci, c)| {
            std::iter::once(&c.name)
                .chain(c.aliases.iter())
                .map(move |a| (ci, alias_tokens(a)))
        })
        .filter(|(_, tokens)| !tokens.is_empty())
        .collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let mut best: Option<(usize, usize)> = None;
        for (ci, words) in &aliases {
            if let Some(j) = match_alias(tokens, i, words) {
                if best.is_none_or(|(_, bj)| j > bj) {
                    best = Some((*ci, j));
                }
            }
        }
        let Some((index, mut j)) = best else {
            i += 1;
            continue;
        };
        let name_end = tokens[j - 1].end;
        let mut possessive = false;
        if let Some(a) = tokens
            .get(j)
            .filter(|a| is_apostrophe(a) && a.start == name_end)
        {
            let s_follows = tokens
                .get(j + 1)
                .is_some_and(|s| s.word && s.lower == "s" && s.start == a.end);
            if s_follows {
                possessive = true;
                j += 2;
            } else if tokens[j - 1].lower.ends_with('s')
                && !tokens
                    .get(j + 1)
                    .is_some_and(|n| n.word && n.start == a.end)
            {
                possessive = true;
                j += 1;
            }
        }
        out.push(NameMatch {
            index,
            first: i,
            last: j,
            start: tokens[i].start,
            end: tokens[j - 1].end,
            possessive,
        });
        i = j;
    }
    out
}

const PREPOSITIONS: &[&str] = &[
    "to", "at", "with", "for", "from", "behind", "beside", "besides", "near", "of", "by", "on",
    "about", "toward", "towards", "into", "onto", "like", "past", "around", "under", "over",
    "without", "against", "between", "among", "beneath", "above", "inside", "outside", "upon",
    "than", "in", "through", "across", "along", "beyond", "next", "via", "unlike", "off",
];
const CLAUSE_STARTERS: &[&str] = &[
    "and",
    "but",
    "or",
    "nor",
    "yet",
    "while",
    "as",
    "when",
    "whenever",
    "because",
    "so",
    "until",
    "since",
    "although",
    "though",
    "whereas",
    "where",
    "that",
    "who",
    "if",
    "once",
    "after",
    "before",
    "then",
    "meanwhile",
];
const ADVERBS: &[&str] = &[
    "then",
    "now",
    "meanwhile",
    "later",
    "soon",
    "also",
    "still",
    "here",
    "there",
    "today",
    "again",
    "first",
    "next",
    "finally",
    "suddenly",
    "both",
    "all",
    "even",
];
const DETERMINERS: &[&str] = &["a", "an", "the", "some", "this", "that", "these", "those"];

fn is_adverb(w: &str) -> bool {
    ADVERBS.contains(&w)
        || (w.len() > 4 && w.ends_with("ly") && !["only", "family", "belly", "jelly"].contains(&w))
}

/// Whether token `i` starts a sentence (nothing before it but opening quotes/brackets, or a
/// sentence-ending mark).
pub(crate) fn at_sentence_start(tokens: &[Token], i: usize) -> bool {
    let mut k = i;
    while k > 0 {
        let p = &tokens[k - 1];
        if p.word {
            return false;
        }
        match p.lower.as_str() {
            "." | "!" | "?" | ";" | "\u{2026}" => return true,
            "\"" | "'" | "(" | "[" | "\u{201c}" | "\u{2018}" | "-" | "\u{2014}" => k -= 1,
            _ => return false,
        }
    }
    true
}

/// Subject or object role of the phrase spanning tokens `[first, last)`.
pub(crate) fn role(tokens: &[Token], first: usize, last: usize) -> Case {
    let next_ends = tokens
        .get(last)
        .is_none_or(|t| !t.word && matches!(t.lower.as_str(), "." | "!" | "?" | "," | ";" | ":"));
    let mut k = first;
    loop {
        if k == 0 {
            return Case::Subject;
        }
        let p = &tokens[k - 1];
        if !p.word {
            return Case::Subject;
        }
        let w = p.lower.as_str();
        if PREPOSITIONS.contains(&w) {
            return Case::Object;
        }
        if is_adverb(w) {
            k -= 1;
            continue;
        }
        if CLAUSE_STARTERS.contains(&w) {
            return if next_ends {
                Case::Object
            } else {
                Case::Subject
            };
        }
        return Case::Object;
    }
}

/// Find character names and pronouns in a caption, ordered by position.
///
/// Linear in the caption's length (times the rule set's alias words): the name matches come
/// in token order, so whether a token lies inside one is read off the next match in one
/// sweep, and character offsets are counted on from the previous span, not from the start of
/// the caption for each one.
pub fn find_mentions(caption: &str, rules: &RuleSet) -> Vec<Mention> {
    let tokens = tokenize(caption);
    let names = find_names(&tokens, rules);
    let mut spans: Vec<(usize, usize, MentionKind)> = names
        .iter()
        .map(|m| {
            let kind = MentionKind::Character {
                name: rules.characters[m.index].name.clone(),
                index: m.index,
                possessive: m.possessive,
            };
            (m.start, m.end, kind)
        })
        .collect();
    let with_it = rules.uses_it();
    // The first name match that does not end at or before the current token.
    let mut next_name = 0;
    for (i, t) in tokens.iter().enumerate() {
        while names.get(next_name).is_some_and(|m| m.last <= i) {
            next_name += 1;
        }
        let in_name = names.get(next_name).is_some_and(|m| m.first <= i);
        if !t.word || in_name {
            continue;
        }
        if let Some((pronoun, mut case)) = Pronoun::from_word(&t.lower, with_it) {
            if t.lower == "her" {
                let next_is_noun = tokens.get(i + 1).is_some_and(|n| {
                    n.word
                        && !PREPOSITIONS.contains(&n.lower.as_str())
                        && !CLAUSE_STARTERS.contains(&n.lower.as_str())
                        && !DETERMINERS.contains(&n.lower.as_str())
                });
                if next_is_noun {
                    case = Case::Possessive;
                }
            }
            spans.push((t.start, t.end, MentionKind::Pronoun { pronoun, case }));
        }
    }
    spans.sort_by_key(|s| s.0);
    // (byte, char) offsets of the last position counted. Spans do not overlap, so the offsets
    // asked for only grow; counting from the start again covers any that would not.
    let mut counted = (0, 0);
    let mut char_offset = |byte: usize| {
        let (from_byte, from_char) = if byte >= counted.0 { counted } else { (0, 0) };
        let at = from_char + caption[from_byte..byte].chars().count();
        counted = (byte, at);
        at
    };
    spans
        .into_iter()
        .map(|(bs, be, kind)| Mention {
            start: char_offset(bs),
            end: char_offset(be),
            byte_start: bs,
            byte_end: be,
            text: caption[bs..be].to_string(),
            kind,
        })
        .collect()
}

/// Mentions as a JSON array.
pub fn to_json(mentions: &[Mention]) -> String {
    serde_json::to_string(mentions).unwrap_or_default()
}

/// Number of pronoun references (he/she/they families; "it" only for rule sets using it).
pub fn count_references(caption: &str, rules: &RuleSet) -> usize {
    find_mentions(caption, rules)
        .iter()
        .filter(|m| matches!(m.kind, MentionKind::Pronoun { .. }))
        .count()
}

/// Distinct character indices mentioned by name, in order of first mention.
pub fn mentioned_characters(caption: &str, rules: &RuleSet) -> Vec<usize> {
    let mut out = Vec::new();
    for m in find_names(&tokenize(caption), rules) {
        if !out.contains(&m.index) {
            out.push(m.index);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(caption: &str) -> Vec<(String, bool)> {
        find_mentions(caption, &RuleSet::flintstones())
            .into_iter()
            .filter_map(|m| match m.kind {
                MentionKind::Character {
                    name, possessive, ..
                } => Some((name, possessive)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn names_case_insensitive_whole_words() {
        let r = RuleSet::flintstones();
        let m = find_mentions(
            "fred talks to WILMA; Frederick and Wilmas do not count.",
            &r,
        );
        let texts: Vec<_> = m.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, vec!["fred", "WILMA"]);
        assert_eq!((m[1].start, m[1].end), (14, 19));
    }

    #[test]
    fn multi_word_dotted_and_possessive() {
        assert_eq!(
            names("Mr. Slate yells at Fred."),
            vec![("Mr Slate".into(), false), ("Fred".into(), false)]
        );
        assert_eq!(names("Mr Slate's desk"), vec![("Mr Slate".into(), true)]);
        assert_eq!(
            names("Pebbles' doll and Fred\u{2019}s hat"),
            vec![("Pebbles".into(), true), ("Fred".into(), true)]
        );
        assert_eq!(names("Slate rocks"), vec![]);
        // Punctuation inside a name is part of it; dots stay optional.
        let rules = RuleSet {
            name: "custom".into(),
            characters: vec![
                crate::rules::CharacterDef::new("O'Brien", Pronoun::He),
                crate::rules::CharacterDef::new("Jean-Luc", Pronoun::He),
                crate::rules::CharacterDef::new("Dr. No", Pronoun::He),
            ],
            mode: crate::rules::RuleMode::Labels,
        };
        let found: Vec<(String, bool)> = find_mentions(
            "O'Brien meets jean-luc and Dr No at O\u{2019}Brien's, not Jean Luc.",
            &rules,
        )
        .into_iter()
        .filter_map(|m| match m.kind {
            MentionKind::Character { possessive, .. } => Some((m.text, possessive)),
            _ => None,
        })
        .collect();
        assert_eq!(
            found,
            [
                ("O'Brien".into(), false),
                ("jean-luc".into(), false),
                ("Dr No".into(), false),
                ("O\u{2019}Brien's".into(), true)
            ]
        );
        let m = find_mentions("Fred's car", &RuleSet::flintstones());
        assert_eq!(m[0].text, "Fred's");
    }

    #[test]
    fn pronouns_and_unicode_offsets() {
        let r = RuleSet::flintstones();
        let m = find_mentions("Café: she gives him her hat; they smile at them.", &r);
        let got: Vec<_> = m.iter().map(|m| (m.text.clone(), m.start)).collect();
        assert_eq!(
            got,
            vec![
                ("she".into(), 6),
                ("him".into(), 16),
                ("her".into(), 20),
                ("they".into(), 29),
                ("them".into(), 43)
            ]
        );
        assert!(matches!(
            m[2].kind,
            MentionKind::Pronoun {
                case: Case::Possessive,
                ..
            }
        ));
        assert_eq!(
            count_references("The hen thinks the theme is there.", &r),
            0
        );
    }

    #[test]
    fn roles() {
        let t = tokenize("Fred hugs Wilma and then Barney runs to Dino, suddenly Betty sings");
        let at = |w: &str| t.iter().position(|x| x.lower == w).unwrap();
        assert_eq!(role(&t, at("fred"), at("fred") + 1), Case::Subject);
        assert_eq!(role(&t, at("wilma"), at("wilma") + 1), Case::Object);
        assert_eq!(role(&t, at("barney"), at("barney") + 1), Case::Subject);
        assert_eq!(role(&t, at("dino"), at("dino") + 1), Case::Object);
        assert_eq!(role(&t, at("betty"), at("betty") + 1), Case::Subject);
        assert!(at_sentence_start(&tokenize("Hi. \"Fred"), 3));
    }

    /// A caption built to be slow: a name, a pronoun and a multi-byte character every few
    /// characters, so there are as many mentions (and tokens) as a caption can hold.
    fn worst_case(chars: usize) -> String {
        let unit = "Fred and he é, Mr. Slate's cat; ";
        unit.repeat(chars / unit.chars().count() + 1)
    }

    #[test]
    fn offsets_are_counted_right_across_many_mentions() {
        let r = RuleSet::flintstones();
        let caption = format!("Ünïcödé: {} — she waves at him.", worst_case(2_000));
        let mentions = find_mentions(&caption, &r);
        assert!(mentions.len() > 150, "{}", mentions.len());
        for m in &mentions {
            assert_eq!(m.start, caption[..m.byte_start].chars().count());
            assert_eq!(m.end, caption[..m.byte_end].chars().count());
            assert_eq!(m.text, caption[m.byte_start..m.byte_end]);
        }
        let names = mentions
            .iter()
            .filter(|m| matches!(m.kind, MentionKind::Character { .. }))
            .count();
        // Per unit two names and a pronoun; two pronouns at the end.
        assert_eq!(names * 3, (mentions.len() - 2) * 2);
    }

    /// Issue #18: one caption's analysis was quadratic in its length (each token looked
    /// through every name match, each offset was counted from the start of the caption): 1-2
    /// s for this 400,000-character caption. It is measured against splitting the same
    /// caption into tokens, a linear pass it starts with, in the same run (best of three
    /// each), so a slow or busy machine does not make the test fail.
    #[test]
    fn find_mentions_is_linear_in_the_caption_length() {
        let r = RuleSet::flintstones();
        let caption = worst_case(400_000);
        let best = |f: &dyn Fn() -> usize| {
            (0..3)
                .map(|_| {
                    let started = std::time::Instant::now();
                    assert!(f() > 0);
                    started.elapsed()
                })
                .min()
                .unwrap_or_default()
        };
        let baseline = best(&|| tokenize(&caption).len());
        let took = best(&|| find_mentions(&caption, &r).len());
        println!("400k characters: tokenize {baseline:?}, find_mentions {took:?}");
        assert!(
            took < baseline * 15 + std::time::Duration::from_millis(20),
            "find_mentions took {took:?}, {:.1} times as long as tokenizing ({baseline:?})",
            took.as_secs_f64() / baseline.as_secs_f64().max(1e-9)
        );
    }
}
