//! The query string of a page's URL (`?virtual_storage=default&relative_path=a%2Fb.git`):
//! `application/x-www-form-urlencoded`, as a browser's form sends it.

use std::collections::BTreeMap;

/// The pairs of `query`, decoded; a key given twice keeps its last value. Invalid escapes
/// are kept as written, and bytes that do not form UTF-8 are replaced.
pub fn parse(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(key), decode(value))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high * 16 + low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_form_values() {
        let pairs = parse("virtual_storage=default&relative_path=a%2Fb+c.git&x=%zz&y=%4");
        assert_eq!(pairs["virtual_storage"], "default");
        assert_eq!(pairs["relative_path"], "a/b c.git");
        assert_eq!(pairs["x"], "%zz");
        assert_eq!(pairs["y"], "%4");
        assert_eq!(parse("a=%C3%A9")["a"], "é");
    }
}
