//! Input rules shared by the JSON API and the HTML forms, so both refuse the same things
//! with the same codes.

use crate::error::ApiError;

/// Longest character name, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Longest caption, in characters.
pub const MAX_CAPTION_CHARS: usize = 1000;
/// Longest story title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// Most captions (frames) in one story.
pub const MAX_CAPTIONS: usize = 200;
/// Most characters in one story's cast.
pub const MAX_CAST: usize = 64;
/// Most ids a cast list may hold as sent, repeats included. Repeats are dropped, but a list
/// longer than this is refused before any work is done on it: a client sends each id once,
/// so a few times the cast limit is already generous.
pub const MAX_CAST_IDS: usize = 4 * MAX_CAST;

fn text(value: &str, what: &str, code: &'static str, max: usize) -> Result<String, ApiError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(ApiError::invalid(
            code,
            format!("the {what} must not be empty"),
        ));
    }
    let count = trimmed.chars().count();
    if count > max {
        return Err(ApiError::invalid(
            code,
            format!("the {what} is {count} characters long; at most {max} are allowed"),
        ));
    }
    if trimmed.chars().any(|c| c.is_control() && c != '\t') {
        return Err(ApiError::invalid(
            code,
            format!("the {what} must not contain control characters"),
        ));
    }
    Ok(trimmed.to_string())
}

/// Characters a name must not hold although they are not control characters: invisible ones
/// (zero-width spaces and joiners, word joiner, invisible operators, BOM, soft hyphen) and the
/// bidirectional overrides and isolates, which make a name display as something else than
/// what it is (U+202E turns "Fred\u{202E}kcirt" into "Fredtrick").
fn hidden_character(c: char) -> Option<&'static str> {
    match c {
        '\u{200B}'..='\u{200F}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}' | '\u{00AD}' => {
            Some("an invisible character")
        }
        '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' => {
            Some("a bidirectional override or isolate")
        }
        _ => None,
    }
}

/// A user-chosen name (a character's name, a story's title): NFC-normalised (so "Zoe" with a
/// combining accent and the precomposed "Zoé" are one name), then the rules of [`text`], and
/// neither control characters (tab included) nor invisible or bidi-control characters.
fn label(value: &str, what: &str, code: &'static str, max: usize) -> Result<String, ApiError> {
    use unicode_normalization::UnicodeNormalization;
    let normalized: String = value.trim().nfc().collect();
    let checked = text(&normalized, what, code, max)?;
    for c in checked.chars() {
        let kind = if c.is_control() {
            Some("a control character")
        } else {
            hidden_character(c)
        };
        if let Some(kind) = kind {
            return Err(ApiError::invalid(
                code,
                format!(
                    "the {what} contains {kind} (U+{:04X}), which would not show as written; \
                     remove it",
                    c as u32
                ),
            ));
        }
    }
    Ok(checked)
}

/// A character's name: NFC, trimmed, 1..=64 characters, one line, nothing invisible.
pub fn name(value: &str) -> Result<String, ApiError> {
    label(value, "name", "invalid_name", MAX_NAME_CHARS)
}

/// A caption: trimmed, 1..=1000 characters, one line.
pub fn caption(value: &str) -> Result<String, ApiError> {
    text(value, "caption", "invalid_caption", MAX_CAPTION_CHARS)
}

/// A negative prompt: as a caption (one line, at most 1000 characters), named as what it is.
pub fn negative_prompt(value: &str) -> Result<String, ApiError> {
    text(
        value,
        "negative prompt",
        "invalid_negative_prompt",
        MAX_CAPTION_CHARS,
    )
}

/// A story title: NFC, trimmed, 1..=200 characters, one line, nothing invisible.
pub fn title(value: &str) -> Result<String, ApiError> {
    label(value, "title", "invalid_title", MAX_TITLE_CHARS)
}

/// A list of captions for a new story: each valid, at most 200.
pub fn captions(values: &[String]) -> Result<Vec<String>, ApiError> {
    if values.len() > MAX_CAPTIONS {
        return Err(ApiError::invalid(
            "too_many_captions",
            format!(
                "a story has at most {MAX_CAPTIONS} captions; {} were given",
                values.len()
            ),
        ));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, c)| {
            caption(c)
                .map_err(|e| ApiError::invalid(e.code, format!("caption {}: {}", i + 1, e.detail)))
        })
        .collect()
}

/// A story's cast: no duplicates (order kept), at most 64; the list as sent at most 256 ids.
/// Linear in the length of the list.
pub fn cast(ids: &[i64]) -> Result<Vec<i64>, ApiError> {
    if ids.len() > MAX_CAST_IDS {
        return Err(ApiError::invalid(
            "too_many_characters",
            format!(
                "the cast lists {} character ids; a story has at most {MAX_CAST} characters \
                 (and a list at most {MAX_CAST_IDS} ids, repeats included)",
                ids.len()
            ),
        ));
    }
    let mut unique = std::collections::HashSet::with_capacity(ids.len());
    let mut seen = Vec::with_capacity(ids.len().min(MAX_CAST + 1));
    for &id in ids {
        if unique.insert(id) {
            seen.push(id);
        }
    }
    if seen.len() > MAX_CAST {
        return Err(ApiError::invalid(
            "too_many_characters",
            format!("a story has at most {MAX_CAST} characters"),
        ));
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_and_limits() {
        assert_eq!(name("  Fred ").unwrap(), "Fred");
        assert_eq!(name("   ").unwrap_err().code, "invalid_name");
        assert!(name(&"x".repeat(64)).is_ok());
        assert!(name(&"x".repeat(65)).is_err());
        assert!(caption("line\nbreak").is_err());
        assert!(captions(&vec!["a".to_string(); 201]).is_err());
        assert_eq!(
            captions(&["ok".into(), "".into()]).unwrap_err().detail,
            "caption 2: the caption must not be empty"
        );
        assert_eq!(cast(&[3, 1, 3]).unwrap(), vec![3, 1]);
        // Repeats do not count towards the cast limit, but the list as sent is bounded.
        let repeated: Vec<i64> = (0..MAX_CAST_IDS as i64).map(|i| i % 3).collect();
        assert_eq!(cast(&repeated).unwrap(), vec![0, 1, 2]);
        let long: Vec<i64> = vec![7; MAX_CAST_IDS + 1];
        assert_eq!(cast(&long).unwrap_err().code, "too_many_characters");
        let distinct: Vec<i64> = (0..=MAX_CAST as i64).collect();
        assert_eq!(cast(&distinct).unwrap_err().code, "too_many_characters");
    }

    #[test]
    fn names_are_nfc_and_visible() {
        assert_eq!(name("Zoe\u{301}").unwrap(), "Zo\u{e9}");
        assert_eq!(title(" Cafe\u{301} ").unwrap(), "Caf\u{e9}");
        // Length is counted after normalisation: 63 letters plus a combining accent fit.
        assert!(name(&format!("{}e\u{301}", "x".repeat(63))).is_ok());
        for bad in [
            "Fred\u{200B}",
            "\u{200D}Fred",
            "Fr\u{00AD}ed",
            "Fred\u{2060}",
            "\u{FEFF}Fred",
            "Fred\u{202E}kcirt",
            "Fred\u{2066}x",
            "Fred\tJr",
        ] {
            let err = name(bad).unwrap_err();
            assert_eq!(err.code, "invalid_name", "{bad:?}");
            assert!(err.detail.contains("U+"), "{}", err.detail);
        }
        assert_eq!(title("A\u{202D}B").unwrap_err().code, "invalid_title");
        // Captions keep their own rules (a tab is fine there).
        assert!(caption("a\tb").is_ok());
    }
}
