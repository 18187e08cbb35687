//! The keys the loader knows, for "did you mean" hints on unknown keys.
//!
//! Go Praefect silently drops keys it does not know, so a typo there quietly falls back to a
//! default; we refuse them, and for a near miss we name the key that was probably meant.
//! The known keys are read from the serialized form of a configuration rather than listed
//! by hand, so a field added to the structs is known here without anyone remembering to.

use std::sync::LazyLock;

use serde_json::Value;

use super::{Config, Database, GoDuration, Node, VirtualStorage};

/// How alike (normalized Damerau-Levenshtein, 1 = equal) an unknown key and a known one must
/// be for a suggestion. 0.7 catches one or two slips in a short key (`tokn`, `hots`) and a
/// few in a long one (`listen_adr`, `batchsize`) without pairing unrelated short keys such
/// as `name` and `node`.
const MIN_SIMILARITY: f64 = 0.7;

/// Every key as a JSON tree: a configuration with one virtual storage holding one node (so
/// that the array tables have an element to show their keys) and every optional key set (a
/// `None` that skips serialization would hide its key).
static KNOWN: LazyLock<Value> = LazyLock::new(|| {
    let sample = Config {
        database: Database {
            stale_read_window: Some(GoDuration::ZERO),
            ..Database::default()
        },
        virtual_storage: vec![VirtualStorage {
            node: vec![Node::default()],
            ..VirtualStorage::default()
        }],
        ..Config::default()
    };
    serde_json::to_value(sample).unwrap_or(Value::Null)
});

/// The keys of the table at `parent` (segments as in a key path; an index such as `[3]`
/// stands for any element of the array), sorted; empty when `parent` is not a table we know.
pub fn known_keys(parent: &[String]) -> Vec<String> {
    let mut table = &*KNOWN;
    for segment in parent {
        table = if segment.starts_with('[') {
            match table.as_array().and_then(|a| a.first()) {
                Some(element) => element,
                None => return Vec::new(),
            }
        } else {
            match table.get(segment) {
                Some(value) => value,
                None => return Vec::new(),
            }
        };
    }
    let mut keys: Vec<String> = table
        .as_object()
        .map(|object| object.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

/// A hint for the unknown key at `path` (its last segment is the key), or None:
/// - the known key at the same level most like it, if one is like enough;
/// - otherwise, for a key inside a table that is a top-level key, that it must come before
///   the first table header (TOML puts every key after `[x]` into table `x`).
pub fn suggestion(path: &[String]) -> Option<String> {
    let (key, parent) = path.split_last()?;
    let typed = key.to_ascii_lowercase();
    let best = known_keys(parent)
        .into_iter()
        .map(|known| {
            (
                strsim::normalized_damerau_levenshtein(&typed, &known),
                known,
            )
        })
        .filter(|(similarity, _)| *similarity >= MIN_SIMILARITY)
        .max_by(|a, b| a.0.total_cmp(&b.0).then_with(|| b.1.cmp(&a.1)));
    if let Some((_, known)) = best {
        return Some(format!("did you mean {known:?}?"));
    }
    if !parent.is_empty() && known_keys(&[]).contains(key) {
        return Some(format!(
            "{key:?} is a top-level key: put it before the first [table] header"
        ));
    }
    None
}
