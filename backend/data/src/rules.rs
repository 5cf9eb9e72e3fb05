//! Character rule sets: who the named characters of a dataset are, how captions spell their
//! names, and which pronoun replaces them. Used by mention finding and referential extension.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::DataError;

/// Grammatical role of a name or pronoun in its sentence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Case {
    /// "he", "she", "they".
    Subject,
    /// "him", "her", "them".
    Object,
    /// "his", "her", "their".
    Possessive,
    /// "himself", "herself", "themselves".
    Reflexive,
}

/// The pronoun family a character is referred to by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pronoun {
    /// he / him / his.
    He,
    /// she / her / her.
    She,
    /// they / them / their (groups, and anyone who asks for it).
    They,
    /// it / it / its.
    It,
}

impl Pronoun {
    /// The lowercase word for this pronoun in the given case.
    pub fn word(self, case: Case) -> &'static str {
        use Case::*;
        match (self, case) {
            (Pronoun::He, Subject) => "he",
            (Pronoun::He, Object) => "him",
            (Pronoun::He, Possessive) => "his",
            (Pronoun::He, Reflexive) => "himself",
            (Pronoun::She, Subject) => "she",
            (Pronoun::She, Object | Possessive) => "her",
            (Pronoun::She, Reflexive) => "herself",
            (Pronoun::They, Subject) => "they",
            (Pronoun::They, Object) => "them",
            (Pronoun::They, Possessive) => "their",
            (Pronoun::They, Reflexive) => "themselves",
            (Pronoun::It, Subject | Object) => "it",
            (Pronoun::It, Possessive) => "its",
            (Pronoun::It, Reflexive) => "itself",
        }
    }

    /// Parse a user-given pronoun: "he", "she", "they", "it", or forms like "she/her".
    pub fn parse(text: &str) -> Result<Pronoun, DataError> {
        let first = text.trim().to_lowercase();
        let first = first.split(['/', ',', ' ']).next().unwrap_or("");
        match first {
            "he" | "him" | "his" | "male" | "m" => Ok(Pronoun::He),
            "she" | "her" | "hers" | "female" | "f" => Ok(Pronoun::She),
            "they" | "them" | "their" => Ok(Pronoun::They),
            "it" | "its" => Ok(Pronoun::It),
            _ => Err(DataError::Invalid(format!(
                "unknown pronoun {text:?}: use he, she, they or it"
            ))),
        }
    }

    /// Recognise a pronoun word (lowercase) with its case. "her" is returned as object; the
    /// caller decides between object and possessive from context. "it"/"its" only when
    /// `with_it` is set, because "it" is mostly not a character reference.
    pub fn from_word(word: &str, with_it: bool) -> Option<(Pronoun, Case)> {
        use Case::*;
        Some(match word {
            "he" => (Pronoun::He, Subject),
            "him" => (Pronoun::He, Object),
            "his" => (Pronoun::He, Possessive),
            "himself" => (Pronoun::He, Reflexive),
            "she" => (Pronoun::She, Subject),
            "her" => (Pronoun::She, Object),
            "hers" => (Pronoun::She, Possessive),
            "herself" => (Pronoun::She, Reflexive),
            "they" => (Pronoun::They, Subject),
            "them" => (Pronoun::They, Object),
            "their" | "theirs" => (Pronoun::They, Possessive),
            "themselves" => (Pronoun::They, Reflexive),
            "it" if with_it => (Pronoun::It, Subject),
            "its" if with_it => (Pronoun::It, Possessive),
            "itself" if with_it => (Pronoun::It, Reflexive),
            _ => return None,
        })
    }
}

/// One named character of a rule set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CharacterDef {
    /// Canonical display name, e.g. "Mr Slate".
    pub name: String,
    /// Short label key used in label files, e.g. "slate".
    pub label: String,
    /// How captions spell the name (the canonical name is always included). A "." after a
    /// word of a multi-word alias is optional in captions, so "Mr Slate" matches "Mr. Slate".
    pub aliases: Vec<String>,
    /// Pronoun family.
    pub pronoun: Pronoun,
}

impl CharacterDef {
    /// A character whose only caption spelling is its name.
    pub fn new(name: &str, pronoun: Pronoun) -> CharacterDef {
        CharacterDef {
            name: name.to_string(),
            label: name.to_lowercase(),
            aliases: vec![name.to_string()],
            pronoun,
        }
    }
}

/// How the immediate character set of a frame is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleMode {
    /// From the frame's character labels (FlintstonesSV, toy world, user stories); the names
    /// mentioned in the caption are used when a frame has no labels.
    Labels,
    /// From the caption text, one immediate character plus the "they" prefix rule (PororoSV).
    PororoText,
}

/// A dataset's characters and the referential rule flavour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleSet {
    /// Name of the rule set ("flintstones", "pororo", "custom", "toyworld").
    pub name: String,
    /// Characters in label order.
    pub characters: Vec<CharacterDef>,
    /// How immediate characters are found.
    pub mode: RuleMode,
}

/// FlintstonesSV label order used by `labels.pkl`.
pub const FLINTSTONES_LABELS: [&str; 7] = [
    "fred", "wilma", "barney", "betty", "pebbles", "dino", "slate",
];

/// PororoSV label order used by `labels.pkl`.
pub const PORORO_LABELS: [&str; 9] = [
    "pororo", "loopy", "crong", "eddy", "poby", "petty", "tongtong", "rody", "harry",
];

fn capitalise(word: &str) -> String {
    let mut c = word.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

impl RuleSet {
    /// The characters' names, in label order.
    pub fn character_names(&self) -> Vec<&str> {
        self.characters.iter().map(|c| c.name.as_str()).collect()
    }

    /// FlintstonesSV: Wilma, Betty, Pebbles are "she"; Fred, Barney, Dino, Mr Slate are "he".
    pub fn flintstones() -> RuleSet {
        let characters = FLINTSTONES_LABELS
            .iter()
            .map(|&label| {
                let pronoun = match label {
                    "wilma" | "betty" | "pebbles" => Pronoun::She,
                    _ => Pronoun::He,
                };
                if label == "slate" {
                    CharacterDef {
                        name: "Mr Slate".into(),
                        label: label.into(),
                        aliases: vec!["Mr Slate".into(), "Mister Slate".into()],
                        pronoun,
                    }
                } else {
                    let mut def = CharacterDef::new(&capitalise(label), pronoun);
                    def.label = label.into();
                    def
                }
            })
            .collect();
        RuleSet {
            name: "flintstones".into(),
            characters,
            mode: RuleMode::Labels,
        }
    }

    /// PororoSV: Petty and Loopy are "she", the other seven "he"; text-based rules.
    pub fn pororo() -> RuleSet {
        let characters = PORORO_LABELS
            .iter()
            .map(|&label| {
                let pronoun = match label {
                    "petty" | "loopy" => Pronoun::She,
                    _ => Pronoun::He,
                };
                let mut def = CharacterDef::new(&capitalise(label), pronoun);
                def.label = label.into();
                def
            })
            .collect();
        RuleSet {
            name: "pororo".into(),
            characters,
            mode: RuleMode::PororoText,
        }
    }

    /// A user story's characters with user-given pronouns (e.g. {"Ada": "she", "Bo": "they"}).
    pub fn custom(pronouns: &BTreeMap<String, String>) -> Result<RuleSet, DataError> {
        let mut characters = Vec::with_capacity(pronouns.len());
        for (name, p) in pronouns {
            if name.trim().is_empty() {
                return Err(DataError::Invalid("empty character name".into()));
            }
            characters.push(CharacterDef::new(name.trim(), Pronoun::parse(p)?));
        }
        Ok(RuleSet {
            name: "custom".into(),
            characters,
            mode: RuleMode::Labels,
        })
    }

    /// Index of the character a label or name refers to (case-insensitive; label key, name
    /// or alias; "." and extra spaces ignored).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        let key = normalise_name(name);
        self.characters.iter().position(|c| {
            normalise_name(&c.name) == key
                || normalise_name(&c.label) == key
                || c.aliases.iter().any(|a| normalise_name(a) == key)
        })
    }

    /// Whether some character uses "it", so "it"/"its" count as references.
    pub fn uses_it(&self) -> bool {
        self.characters.iter().any(|c| c.pronoun == Pronoun::It)
    }

    /// Add a character unknown to the rule set (user stories name people the pronoun map
    /// does not cover); it is referred to as "they". Returns its index.
    pub fn ensure(&mut self, name: &str) -> usize {
        match self.index_of(name) {
            Some(i) => i,
            None => {
                self.characters
                    .push(CharacterDef::new(name.trim(), Pronoun::They));
                self.characters.len() - 1
            }
        }
    }
}

/// Lowercase, dots removed, whitespace collapsed: "Mr.  Slate" -> "mr slate".
pub fn normalise_name(name: &str) -> String {
    name.replace('.', " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flintstones_lookup_and_pronouns() {
        let r = RuleSet::flintstones();
        assert_eq!(r.index_of("slate"), Some(6));
        assert_eq!(r.index_of("Mr. Slate"), Some(6));
        assert_eq!(r.index_of("WILMA"), Some(1));
        assert_eq!(r.characters[6].pronoun, Pronoun::He);
        assert_eq!(r.characters[4].pronoun, Pronoun::She);
        assert_eq!(r.index_of("Bamm Bamm"), None);
    }

    #[test]
    fn pronoun_parsing() {
        assert_eq!(Pronoun::parse("She/her").unwrap(), Pronoun::She);
        assert_eq!(Pronoun::parse("they").unwrap(), Pronoun::They);
        assert_eq!(Pronoun::parse("it").unwrap(), Pronoun::It);
        assert!(Pronoun::parse("xe").is_err());
        assert_eq!(Pronoun::It.word(Case::Possessive), "its");
        assert_eq!(Pronoun::She.word(Case::Object), "her");
    }
}
