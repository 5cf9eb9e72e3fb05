//! Dataset statistics in the shape of the paper's Table 11: references (pronouns) per story
//! before and after the referential extension, number of characters and backgrounds.

use serde::{Deserialize, Serialize};

use crate::mentions::{count_references, find_mentions, MentionKind};
use crate::referential::{frame_characters, make_referential, StoryFrame};
use crate::rules::RuleSet;

/// Table-11 style statistics of one dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoryStats {
    /// Dataset name, e.g. "FlintstonesSV".
    pub dataset: String,
    /// Number of stories.
    pub stories: usize,
    /// Number of frames.
    pub frames: usize,
    /// Average pronoun references per story in the original captions.
    pub refs_before: f64,
    /// Average pronoun references per story after the referential extension.
    pub refs_after: f64,
    /// Fraction of frames whose caption the extension changed.
    pub frames_changed: f64,
    /// Average number of characters per frame (labels, or names in the caption).
    pub characters_per_frame: f64,
    /// Average number of character-name mentions per story before the extension.
    pub names_per_story: f64,
    /// Number of distinct characters of the dataset.
    pub characters: usize,
    /// Number of background labels, if the dataset has them.
    pub backgrounds: Option<usize>,
}

/// Compute statistics over stories (each a list of frames).
pub fn compute(
    name: &str,
    rules: &RuleSet,
    stories: &[Vec<StoryFrame>],
    backgrounds: Option<usize>,
) -> StoryStats {
    let mut rules_mut = rules.clone();
    let (mut before, mut after, mut frames, mut changed, mut chars, mut names) =
        (0usize, 0usize, 0usize, 0usize, 0usize, 0usize);
    for story in stories {
        let referential = make_referential(rules, story);
        for (frame, r) in story.iter().zip(&referential) {
            before += count_references(&frame.caption, rules);
            after += count_references(r, rules);
            changed += (r != &frame.caption) as usize;
            chars += frame_characters(&mut rules_mut, frame).len();
            names += find_mentions(&frame.caption, rules)
                .iter()
                .filter(|m| matches!(m.kind, MentionKind::Character { .. }))
                .count();
        }
        frames += story.len();
    }
    let per = |x: usize, n: usize| if n == 0 { 0.0 } else { x as f64 / n as f64 };
    StoryStats {
        dataset: name.to_string(),
        stories: stories.len(),
        frames,
        refs_before: per(before, stories.len()),
        refs_after: per(after, stories.len()),
        frames_changed: per(changed, frames),
        characters_per_frame: per(chars, frames),
        names_per_story: per(names, stories.len()),
        characters: rules.characters.len(),
        backgrounds,
    }
}

/// Statistics as pretty-printed JSON.
pub fn to_json(stats: &StoryStats) -> String {
    serde_json::to_string_pretty(stats).unwrap_or_default()
}

/// Render statistics as a Markdown table shaped like Table 11 (one row before, one after).
pub fn to_markdown(stats: &[StoryStats]) -> String {
    let mut s = String::from(
        "| Dataset | Stories | Frames | # Ref (avg.) | # Chars | # Backgrounds | Frames changed | Chars/frame |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for st in stats {
        let bg = st
            .backgrounds
            .map(|b| b.to_string())
            .unwrap_or_else(|| "None".into());
        s += &format!(
            "| {} | {} | {} | {:.2} | {} | {} | - | {:.2} |\n",
            st.dataset,
            st.stories,
            st.frames,
            st.refs_before,
            st.characters,
            bg,
            st.characters_per_frame
        );
        s += &format!(
            "| Extended {} | {} | {} | {:.2} | {} | {} | {:.1}% | {:.2} |\n",
            st.dataset,
            st.stories,
            st.frames,
            st.refs_after,
            st.characters,
            bg,
            100.0 * st.frames_changed,
            st.characters_per_frame
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_references_before_and_after() {
        let story = vec![
            StoryFrame::new("Fred sees the sky; he smiles.", &["fred"]),
            StoryFrame::new("Fred sits and Fred eats.", &["fred"]),
        ];
        let st = compute("Flintstones", &RuleSet::flintstones(), &[story], Some(3));
        assert_eq!(st.refs_before, 1.0);
        assert_eq!(st.refs_after, 3.0);
        assert_eq!(st.frames_changed, 0.5);
        assert!(to_markdown(&[st])
            .contains("| Extended Flintstones | 1 | 2 | 3.00 | 7 | 3 | 50.0% | 1.00 |"));
    }
}
