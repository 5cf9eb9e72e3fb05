//! JSON-lines tools behind `storygpt-v data make-referential` and `data stats`: each line is
//! a story `{"frames": [{"caption": str, "characters": [str]}], "pronouns": {name: pronoun}?}`.
//! Output lines are the input lines with a `"referential"` caption added to every frame;
//! every other field is kept as it was.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::str::FromStr;

use serde_json::Value as Json;

use crate::error::{DataError, Result};
use crate::referential::{make_referential, StoryFrame};
use crate::rules::RuleSet;
use crate::stats::{compute, StoryStats};

/// Which character rules to apply to JSON-lines stories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleChoice {
    /// FlintstonesSV characters and genders.
    Flintstones,
    /// PororoSV characters, text-based rules with the "they" prefix rule.
    Pororo,
    /// Per-line `"pronouns"` map (user stories).
    Custom,
}

impl FromStr for RuleChoice {
    type Err = DataError;
    fn from_str(s: &str) -> Result<RuleChoice> {
        match s.to_lowercase().as_str() {
            "flintstones" | "flintstonessv" => Ok(RuleChoice::Flintstones),
            "pororo" | "pororosv" => Ok(RuleChoice::Pororo),
            "custom" => Ok(RuleChoice::Custom),
            other => Err(DataError::Invalid(format!(
                "unknown dataset {other:?}: use flintstones, pororo or custom"
            ))),
        }
    }
}

fn rules_for(choice: RuleChoice, line: &Json) -> Result<RuleSet> {
    match choice {
        RuleChoice::Flintstones => Ok(RuleSet::flintstones()),
        RuleChoice::Pororo => Ok(RuleSet::pororo()),
        RuleChoice::Custom => {
            let pronouns: BTreeMap<String, String> = match line.get("pronouns") {
                Some(p) => serde_json::from_value(p.clone())?,
                None => BTreeMap::new(),
            };
            RuleSet::custom(&pronouns)
        }
    }
}

fn frames_of(line: &Json) -> Result<Vec<StoryFrame>> {
    let frames = line
        .get("frames")
        .ok_or_else(|| DataError::Invalid("a story line needs a \"frames\" array".into()))?;
    Ok(serde_json::from_value(frames.clone())?)
}

/// Parse one story line into its rules and frames.
pub fn parse_story_line(text: &str, choice: RuleChoice) -> Result<(RuleSet, Vec<StoryFrame>)> {
    let line: Json = serde_json::from_str(text)?;
    Ok((rules_for(choice, &line)?, frames_of(&line)?))
}

/// Add the `"referential"` caption to every frame of one story line.
pub fn referential_line(text: &str, choice: RuleChoice) -> Result<String> {
    let mut line: Json = serde_json::from_str(text)?;
    let rules = rules_for(choice, &line)?;
    let frames = frames_of(&line)?;
    let out = make_referential(&rules, &frames);
    if let Some(Json::Array(items)) = line.get_mut("frames") {
        for (item, r) in items.iter_mut().zip(out) {
            if let Json::Object(map) = item {
                map.insert("referential".into(), Json::String(r));
            }
        }
    }
    Ok(serde_json::to_string(&line)?)
}

/// Run `make-referential` over JSON lines; returns the number of stories written.
pub fn make_referential_lines(
    input: impl BufRead,
    mut output: impl Write,
    choice: RuleChoice,
) -> Result<usize> {
    let mut n = 0;
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(|e| DataError::io("<stdin>", e))?;
        if line.trim().is_empty() {
            continue;
        }
        let out = referential_line(&line, choice)
            .map_err(|e| DataError::Invalid(format!("line {}: {e}", i + 1)))?;
        writeln!(output, "{out}").map_err(|e| DataError::io("<stdout>", e))?;
        n += 1;
    }
    Ok(n)
}

/// Table-11 statistics of JSON-lines stories (custom rules take the union of all pronoun maps).
pub fn stats_lines(input: impl BufRead, choice: RuleChoice, name: &str) -> Result<StoryStats> {
    let mut stories = Vec::new();
    let mut pronouns: BTreeMap<String, String> = BTreeMap::new();
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(|e| DataError::io("<stdin>", e))?;
        if line.trim().is_empty() {
            continue;
        }
        let json: Json = serde_json::from_str(&line)
            .map_err(|e| DataError::Invalid(format!("line {}: {e}", i + 1)))?;
        if let Some(p) = json.get("pronouns") {
            pronouns.extend(serde_json::from_value::<BTreeMap<String, String>>(
                p.clone(),
            )?);
        }
        stories.push(frames_of(&json)?);
    }
    let rules = match choice {
        RuleChoice::Flintstones => RuleSet::flintstones(),
        RuleChoice::Pororo => RuleSet::pororo(),
        RuleChoice::Custom => RuleSet::custom(&pronouns)?,
    };
    Ok(compute(name, &rules, &stories, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_referential_and_keeps_fields() {
        let input = r#"{"id": 7, "frames": [{"caption": "Fred runs.", "characters": ["fred"], "x": 1}, {"caption": "Fred stops.", "characters": ["fred"]}]}

{"pronouns": {"Ada": "she"}, "frames": [{"caption": "Ada codes.", "characters": ["Ada"]}, {"caption": "Ada ships it.", "characters": ["Ada"]}]}"#;
        let mut out = Vec::new();
        let n =
            make_referential_lines(input.as_bytes(), &mut out, RuleChoice::Flintstones).unwrap();
        assert_eq!(n, 2);
        let text = String::from_utf8(out).unwrap();
        let first: Json = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["id"], 7);
        assert_eq!(first["frames"][0]["x"], 1);
        assert_eq!(first["frames"][1]["referential"], "He stops.");
        let custom = referential_line(input.lines().nth(2).unwrap(), RuleChoice::Custom).unwrap();
        assert!(custom.contains("\"referential\":\"She ships it.\""));
        assert!(make_referential_lines(
            "{\"frames\": 3}".as_bytes(),
            Vec::new(),
            RuleChoice::Pororo
        )
        .is_err());
        assert!("nope".parse::<RuleChoice>().is_err());
    }
}
