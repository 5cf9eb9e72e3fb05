//! Referential extension of story captions (StoryGPT-V Algorithm 1, after Story-LDM): when a
//! frame shows the same characters as the immediate character set, their names become
//! he/she/they (him/her/them, his/her/their by role), so a model must resolve references.
//!
//! Differences from the authors' code, on purpose: single characters get the pronoun of
//! their own gender (not always "He"), frames without characters are fine, multi-word and
//! dotted names ("Mr. Slate") match, objects and possessives get their own forms, groups
//! match in any order with or without an Oxford comma, and the PororoSV "they" prefix rule
//! compares name *sets* with the previous frame's original caption.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::mentions::{
    at_sentence_start, find_names, is_apostrophe, role, tokenize, NameMatch, Token,
};
use crate::rules::{Case, Pronoun, RuleMode, RuleSet};

/// One frame of a story as input to the referential extension.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoryFrame {
    /// Original (non-referential) caption.
    pub caption: String,
    /// Character labels of the frame; `None` means "find them in the caption".
    #[serde(default)]
    pub characters: Option<Vec<String>>,
}

impl StoryFrame {
    /// A frame with labelled characters.
    pub fn new(caption: &str, characters: &[&str]) -> StoryFrame {
        StoryFrame {
            caption: caption.to_string(),
            characters: Some(characters.iter().map(|c| c.to_string()).collect()),
        }
    }
}

fn capitalise_if(word: &str, cap: bool) -> String {
    if !cap {
        return word.to_string();
    }
    let mut c = word.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

fn apply_edits(caption: &str, mut edits: Vec<(usize, usize, String)>) -> String {
    edits.sort_by_key(|e| e.0);
    let mut out = String::with_capacity(caption.len());
    let mut pos = 0;
    for (s, e, rep) in edits {
        if s < pos {
            continue;
        }
        out.push_str(&caption[pos..s]);
        out.push_str(&rep);
        pos = e;
    }
    out.push_str(&caption[pos..]);
    out
}

/// Is the text between two name matches a list separator ("," / "and" / ", and" / "&")?
fn separator(tokens: &[Token], a: &NameMatch, b: &NameMatch, last: bool) -> bool {
    let between: Vec<&str> = tokens[a.last..b.first]
        .iter()
        .map(|t| t.lower.as_str())
        .collect();
    match between.as_slice() {
        [","] => !last,
        ["and"] | ["&"] | [",", "and"] | [",", "&"] => last,
        _ => false,
    }
}

/// Name lists "A and B", "A, B and C", "A, B, and C" starting at name `p` with exactly
/// `n` members; returns the index of the last member.
fn group_at(tokens: &[Token], names: &[NameMatch], p: usize, n: usize) -> Option<usize> {
    let q = p + n - 1;
    if q >= names.len() {
        return None;
    }
    for k in p..q {
        if names[k].possessive || !separator(tokens, &names[k], &names[k + 1], k + 1 == q) {
            return None;
        }
    }
    Some(q)
}

/// Replacement text for a phrase covering tokens `[first, last)`.
fn pronoun_for(
    tokens: &[Token],
    first: usize,
    last: usize,
    possessive: bool,
    p: Pronoun,
) -> String {
    let case = if possessive {
        Case::Possessive
    } else {
        role(tokens, first, last)
    };
    capitalise_if(p.word(case), at_sentence_start(tokens, first))
}

/// Replace every group naming exactly `set` (two or more characters) by they/them/their.
fn group_edits(
    tokens: &[Token],
    names: &[NameMatch],
    set: &BTreeSet<usize>,
) -> Vec<(usize, usize, String)> {
    let mut edits = Vec::new();
    let mut p = 0;
    while p < names.len() {
        if let Some(q) = group_at(tokens, names, p, set.len()) {
            let members: BTreeSet<usize> = names[p..=q].iter().map(|m| m.index).collect();
            if &members == set {
                let rep = pronoun_for(
                    tokens,
                    names[p].first,
                    names[q].last,
                    names[q].possessive,
                    Pronoun::They,
                );
                edits.push((names[p].start, names[q].end, rep));
                p = q + 1;
                continue;
            }
        }
        p += 1;
    }
    edits
}

/// The plural form of a third-person singular present verb ("smiles" -> "smile"), used when a
/// singular "they" becomes the subject; `None` for words that are not such a verb form.
fn plural_verb(word: &str) -> Option<String> {
    let irregular = [
        ("is", "are"),
        ("was", "were"),
        ("has", "have"),
        ("does", "do"),
        ("goes", "go"),
    ];
    if let Some((_, plural)) = irregular.iter().find(|(singular, _)| *singular == word) {
        return Some(plural.to_string());
    }
    if !word.chars().all(|c| c.is_ascii_lowercase()) || word.len() < 3 {
        return None;
    }
    if let Some(stem) = word.strip_suffix("ies") {
        return (stem.len() >= 2).then(|| format!("{stem}y"));
    }
    for ending in ["sses", "shes", "ches", "xes", "zzes", "oes"] {
        if word.ends_with(ending) {
            return Some(word[..word.len() - 2].to_string());
        }
    }
    if word.ends_with("ss") || word.ends_with("us") || word.ends_with("is") {
        return None;
    }
    word.strip_suffix('s').map(str::to_string)
}

/// For a singular "they" subject, the edit that makes the verb after it agree
/// ("Alex smiles" -> "They smile"); an adverb in between ("Alex quickly runs") is skipped.
fn verb_agreement_edit(tokens: &[Token], after: usize) -> Option<(usize, usize, String)> {
    let mut k = after;
    while let Some(t) = tokens.get(k) {
        if !t.word {
            return None;
        }
        if t.lower.ends_with("ly") && tokens.get(k + 1).is_some_and(|n| n.word) {
            k += 1;
            continue;
        }
        return plural_verb(&t.lower).map(|plural| (t.start, t.end, plural));
    }
    None
}

/// Replace every mention of character `c` by its pronoun (subject, object or possessive).
fn single_edits(
    tokens: &[Token],
    names: &[NameMatch],
    c: usize,
    rules: &RuleSet,
) -> Vec<(usize, usize, String)> {
    let p = rules.characters[c].pronoun;
    let mut edits = Vec::new();
    for m in names.iter().filter(|m| m.index == c) {
        edits.push((
            m.start,
            m.end,
            pronoun_for(tokens, m.first, m.last, m.possessive, p),
        ));
        let subject = !m.possessive && role(tokens, m.first, m.last) == Case::Subject;
        if p == Pronoun::They && subject {
            edits.extend(verb_agreement_edit(tokens, m.last));
        }
    }
    edits
}

/// Rewrite a caption for an unchanged immediate set: one character becomes he/she (or the
/// character's own pronoun), a list naming exactly the set becomes they.
pub fn pronominalise(caption: &str, set: &BTreeSet<usize>, rules: &RuleSet) -> String {
    let tokens = tokenize(caption);
    let names = find_names(&tokens, rules);
    let edits = match set.len() {
        0 => Vec::new(),
        1 => single_edits(&tokens, &names, *set.iter().next().unwrap_or(&0), rules),
        _ => group_edits(&tokens, &names, set),
    };
    apply_edits(caption, edits)
}

/// The caption with every list naming exactly `set` (two or more characters) in alphabetical
/// order of the characters' names, each name as written, separators and a final possessive
/// kept: "Mia and Bob laugh" and "Bob and Mia laugh" both become "Bob and Mia laugh". A "they"
/// does not say in which order its original caption listed the group, so a target made from
/// that caption (stage 2's) must not depend on the order, or the model learns the mean of the
/// orders and no name slot holds one character.
pub fn canonical_group_order(caption: &str, set: &BTreeSet<usize>, rules: &RuleSet) -> String {
    if set.len() < 2 {
        return caption.to_string();
    }
    let tokens = tokenize(caption);
    let names = find_names(&tokens, rules);
    // A member's name without its possessive marker: up to the last word before "'".
    let name_span = |m: &NameMatch| -> (usize, usize) {
        let end = tokens[m.first..m.last]
            .iter()
            .take_while(|t| !is_apostrophe(t))
            .last()
            .map_or(m.end, |t| t.end);
        (m.start, end)
    };
    let mut edits = Vec::new();
    let mut p = 0;
    while p < names.len() {
        if let Some(q) = group_at(&tokens, &names, p, set.len()) {
            let group = &names[p..=q];
            let members: BTreeSet<usize> = group.iter().map(|m| m.index).collect();
            if &members == set {
                let mut sorted: Vec<&NameMatch> = group.iter().collect();
                sorted.sort_by_key(|m| rules.characters[m.index].name.to_lowercase());
                for (slot, member) in group.iter().zip(sorted) {
                    let (s, e) = name_span(slot);
                    let (ms, me) = name_span(member);
                    edits.push((s, e, caption[ms..me].to_string()));
                }
                p = q + 1;
                continue;
            }
        }
        p += 1;
    }
    apply_edits(caption, edits)
}

/// Referential captions for a story, one per frame (frame 1 is never changed).
pub fn make_referential(rules: &RuleSet, frames: &[StoryFrame]) -> Vec<String> {
    match rules.mode {
        RuleMode::Labels => labels_mode(rules, frames),
        RuleMode::PororoText => pororo_mode(rules, frames),
    }
}

/// The immediate character set of a frame: its labels, or the names in its caption.
pub fn frame_characters(rules: &mut RuleSet, frame: &StoryFrame) -> BTreeSet<usize> {
    match &frame.characters {
        Some(labels) => labels
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| rules.ensure(l))
            .collect(),
        None => {
            let tokens = tokenize(&frame.caption);
            find_names(&tokens, rules).iter().map(|m| m.index).collect()
        }
    }
}

fn labels_mode(rules: &RuleSet, frames: &[StoryFrame]) -> Vec<String> {
    let mut rules = rules.clone();
    let mut immediate: Option<BTreeSet<usize>> = None;
    let mut out = Vec::with_capacity(frames.len());
    for frame in frames {
        let set = frame_characters(&mut rules, frame);
        if !set.is_empty() && immediate.as_ref() == Some(&set) {
            out.push(pronominalise(&frame.caption, &set, &rules));
        } else {
            immediate = Some(set);
            out.push(frame.caption.clone());
        }
    }
    out
}

/// A name list of two or more characters at the very start of a caption.
fn leading_group(tokens: &[Token], names: &[NameMatch]) -> Option<(usize, BTreeSet<usize>)> {
    let first = names.first()?;
    if first.first != 0 && !at_sentence_start(tokens, first.first) || first.first > 2 {
        return None;
    }
    let q = (2..=names.len())
        .rev()
        .find_map(|n| group_at(tokens, names, 0, n))?;
    Some((q, names[..=q].iter().map(|m| m.index).collect()))
}

/// PororoSV's immediate character: the first name mentioned, taken from the last sentence
/// when a multi-sentence caption names several characters.
fn pick_immediate(tokens: &[Token], names: &[&NameMatch]) -> Option<usize> {
    let distinct: BTreeSet<usize> = names.iter().map(|m| m.index).collect();
    if distinct.len() > 1 {
        let mut end = tokens.len();
        while end > 0 && !tokens[end - 1].word {
            end -= 1;
        }
        let last_start = tokens[..end]
            .iter()
            .rposition(|t| !t.word && matches!(t.lower.as_str(), "." | "!" | "?"))
            .map(|i| i + 1);
        if let Some(s) = last_start {
            return names.iter().find(|m| m.first >= s).map(|m| m.index);
        }
    }
    names.first().map(|m| m.index)
}

fn pororo_mode(rules: &RuleSet, frames: &[StoryFrame]) -> Vec<String> {
    let mut immediate: Option<usize> = None;
    let mut prev_lead: Option<BTreeSet<usize>> = None;
    let mut out = Vec::with_capacity(frames.len());
    for (i, frame) in frames.iter().enumerate() {
        let tokens = tokenize(&frame.caption);
        let names = find_names(&tokens, rules);
        let lead = leading_group(&tokens, &names);
        let mut edits = Vec::new();
        let mut rest_from = 0;
        if let (Some((q, set)), Some(prev)) = (&lead, &prev_lead) {
            if i > 0 && set == prev {
                let rep = pronoun_for(
                    &tokens,
                    names[0].first,
                    names[*q].last,
                    names[*q].possessive,
                    Pronoun::They,
                );
                edits.push((names[0].start, names[*q].end, rep));
                rest_from = q + 1;
            }
        }
        let rest: Vec<&NameMatch> = names[rest_from..].iter().collect();
        let cand = pick_immediate(&tokens, &rest);
        if i > 0 && cand.is_some() && cand == immediate {
            let c = cand.unwrap_or_default();
            let p = rules.characters[c].pronoun;
            for m in rest.iter().filter(|m| m.index == c) {
                edits.push((
                    m.start,
                    m.end,
                    pronoun_for(&tokens, m.first, m.last, m.possessive, p),
                ));
            }
        } else {
            immediate = cand;
        }
        prev_lead = lead.map(|(_, s)| s);
        out.push(apply_edits(&frame.caption, edits));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_written_in_alphabetical_order_of_the_names() {
        let rules = RuleSet::flintstones();
        let set = |names: &[&str]| -> BTreeSet<usize> {
            names.iter().filter_map(|n| rules.index_of(n)).collect()
        };
        let fw = set(&["Fred", "Wilma"]);
        assert_eq!(
            canonical_group_order("Wilma and Fred laugh.", &fw, &rules),
            "Fred and Wilma laugh."
        );
        assert_eq!(
            canonical_group_order("Fred and Wilma laugh.", &fw, &rules),
            "Fred and Wilma laugh."
        );
        // The possessive stays at the end of the list; other names are left alone.
        assert_eq!(
            canonical_group_order("Barney sees Wilma and Fred's car.", &fw, &rules),
            "Barney sees Fred and Wilma's car."
        );
        let three = set(&["Fred", "Wilma", "Barney"]);
        assert_eq!(
            canonical_group_order("Wilma, Fred, and Barney sit.", &three, &rules),
            "Barney, Fred, and Wilma sit."
        );
        // A list that is not exactly the set, and single characters, are unchanged.
        assert_eq!(
            canonical_group_order("Wilma and Fred laugh.", &three, &rules),
            "Wilma and Fred laugh."
        );
        assert_eq!(
            canonical_group_order("Wilma waves.", &set(&["Wilma"]), &rules),
            "Wilma waves."
        );
    }
}
