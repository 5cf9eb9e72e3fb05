//! Parsing the dataset's annotation and label files into plain records.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value as Json;

use crate::error::{DataError, Result};
use crate::pickle::Value;

#[derive(Debug, Clone, Default)]
pub(super) struct Annotation {
    pub caption: String,
    pub characters: Option<Vec<String>>,
    pub setting: Option<String>,
    pub segments: Vec<(u32, String, Option<[f64; 4]>)>,
}

pub(super) fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| DataError::Invalid(format!("{}: {e}", path.display())))
}

pub(super) fn pickle_map(
    v: Value,
    f: impl Fn(&Value) -> Result<Vec<f64>>,
) -> Result<HashMap<String, Vec<f64>>> {
    let Value::Dict(items) = v else {
        return Err(DataError::Invalid("expected a pickled dict".into()));
    };
    items
        .iter()
        .map(|(k, v)| {
            Ok((
                k.as_str()
                    .ok_or_else(|| DataError::Invalid("non-str key".into()))?
                    .to_string(),
                f(v)?,
            ))
        })
        .collect()
}

fn character_names(v: &Json) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| {
                    c.as_str()
                        .or_else(|| c.get("entityLabel").and_then(Json::as_str))
                })
                .map(|s| s.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn parse_annotation(v: &Json) -> Annotation {
    let caption = ["caption", "description"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Json::as_str))
        .or_else(|| {
            v.get("captions")
                .and_then(|c| c.get(0))
                .and_then(Json::as_str)
        })
        .unwrap_or("")
        .to_string();
    let segments = v
        .get("segments")
        .and_then(Json::as_array)
        .map(|segs| {
            segs.iter()
                .map(|s| {
                    let id = s.get("id").and_then(Json::as_u64).unwrap_or(0) as u32;
                    let word = ["name", "word"]
                        .iter()
                        .find_map(|k| s.get(*k).and_then(Json::as_str))
                        .unwrap_or("");
                    let bbox = s.get("bbox").and_then(Json::as_array).and_then(|b| {
                        let b: Vec<f64> = b.iter().filter_map(Json::as_f64).collect();
                        (b.len() == 4).then(|| [b[0], b[1], b[2], b[3]])
                    });
                    (id, word.to_string(), bbox)
                })
                .collect()
        })
        .unwrap_or_default();
    Annotation {
        caption,
        characters: v.get("characters").map(character_names),
        setting: v.get("setting").and_then(Json::as_str).map(str::to_string),
        segments,
    }
}
