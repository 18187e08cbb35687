//! The input of `track-repositories`: one JSON object per line with the keys
//! `relative_path`, `replica_path`, `virtual_storage` and `authoritative_storage`. This file
//! reads it and finds what is wrong with each line on its own (a key missing, a line that is
//! not an object, a relative path given twice); what needs the database or the nodes is
//! checked by the subcommand.

use std::collections::HashMap;

use super::track_repository::TrackRequest;

/// The keys every object must have, in the order problems are reported.
const KEYS: [&str; 4] = [
    "relative_path",
    "replica_path",
    "virtual_storage",
    "authoritative_storage",
];

/// One line of input: its number (from 1), and the request or what is wrong with it.
#[derive(Debug)]
pub struct Line {
    pub number: usize,
    pub request: Option<TrackRequest>,
    pub problems: Vec<String>,
}

/// Parses every non-blank line and reports duplicates of a (virtual storage, relative path)
/// seen on an earlier line.
pub fn parse(text: &str) -> Vec<Line> {
    let mut lines = Vec::new();
    let mut first_seen: HashMap<(String, String), usize> = HashMap::new();
    for (index, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let number = index + 1;
        let mut line = parse_line(number, raw);
        if let Some(request) = &line.request {
            let key = (
                request.virtual_storage.clone(),
                request.relative_path.clone(),
            );
            if let Some(first) = first_seen.get(&key) {
                line.problems.push(format!(
                    "duplicate entry for relative_path {:?}, first given on line {first}",
                    request.relative_path
                ));
            } else {
                first_seen.insert(key, number);
            }
        }
        lines.push(line);
    }
    lines
}

fn parse_line(number: usize, raw: &str) -> Line {
    let mut line = Line {
        number,
        request: None,
        problems: Vec::new(),
    };
    let object = match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(serde_json::Value::Object(object)) => object,
        Ok(_) => {
            line.problems.push("not a JSON object".to_string());
            return line;
        }
        Err(err) => {
            line.problems.push(format!("invalid JSON: {err}"));
            return line;
        }
    };
    let mut values = Vec::new();
    for key in KEYS {
        match object.get(key) {
            Some(serde_json::Value::String(value)) if !value.is_empty() => {
                values.push(value.clone())
            }
            Some(serde_json::Value::String(_)) | None => line
                .problems
                .push(format!("{key:?} is a required parameter")),
            Some(_) => line.problems.push(format!("{key:?} must be a string")),
        }
    }
    if !line.problems.is_empty() {
        return line;
    }
    if let Ok([relative_path, replica_path, virtual_storage, authoritative_storage]) =
        <[String; 4]>::try_from(values)
    {
        line.request = Some(TrackRequest {
            virtual_storage,
            relative_path,
            replica_path,
            authoritative_storage,
        });
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_checked_on_their_own_and_against_earlier_ones() {
        let text = r#"{"relative_path":"a.git","replica_path":"r/a","virtual_storage":"default","authoritative_storage":"s1"}

{"relative_path":"b.git","virtual_storage":"default","authoritative_storage":""}
not json
[1]
{"relative_path":"a.git","replica_path":"r/a2","virtual_storage":"default","authoritative_storage":"s1"}
{"relative_path":"a.git","replica_path":"r/a3","virtual_storage":"other","authoritative_storage":5}
"#;
        let lines = parse(text);
        let numbers: Vec<usize> = lines.iter().map(|l| l.number).collect();
        assert_eq!(numbers, [1, 3, 4, 5, 6, 7]);
        assert!(lines[0].problems.is_empty());
        assert_eq!(
            lines[0].request.as_ref().unwrap().replica_path,
            "r/a".to_string()
        );
        assert_eq!(
            lines[1].problems,
            [
                "\"replica_path\" is a required parameter",
                "\"authoritative_storage\" is a required parameter"
            ]
        );
        assert!(lines[2].problems[0].starts_with("invalid JSON"));
        assert_eq!(lines[3].problems, ["not a JSON object"]);
        assert_eq!(
            lines[4].problems,
            ["duplicate entry for relative_path \"a.git\", first given on line 1"]
        );
        assert_eq!(
            lines[5].problems,
            ["\"authoritative_storage\" must be a string"]
        );
    }
}
