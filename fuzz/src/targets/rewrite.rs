//! `proxy::rewrite` against a model: the input drives a generator of well-formed protobuf
//! messages (a repository at a random field path, unknown fields of every wire type, nested
//! messages, duplicates, wrong wire types, non-UTF-8 names), the model says what reading and
//! rewriting them must give, and the rewritten bytes must be exactly the model's encoding:
//! every field outside the repository's storage and path copied byte for byte.

use arbitrary::{Result as ArbResult, Unstructured};
use praefect::proxy::rewrite::{read_repository, rewrite_repository, RepositoryRef, RewriteError};

use crate::engine::Target;

pub const TARGET: Target = Target {
    name: "rewrite",
    about: "generated messages: read_repository and rewrite_repository against a byte-exact model",
    check,
    dictionary: Vec::new,
    max_len: 2048,
};

#[derive(Clone, Debug)]
enum Value {
    Varint(u64),
    I64([u8; 8]),
    I32([u8; 4]),
    Bytes(Vec<u8>),
    Message(Vec<Field>),
}

#[derive(Clone, Debug)]
struct Field {
    number: u32,
    value: Value,
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn encode(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for field in fields {
        let (wire, payload): (u64, Vec<u8>) = match &field.value {
            Value::Varint(v) => {
                let mut p = Vec::new();
                varint(&mut p, *v);
                (0, p)
            }
            Value::I64(b) => (1, b.to_vec()),
            Value::I32(b) => (5, b.to_vec()),
            Value::Bytes(b) => (2, b.clone()),
            Value::Message(m) => (2, encode(m)),
        };
        varint(&mut out, (u64::from(field.number) << 3) | wire);
        if wire == 2 {
            varint(&mut out, payload.len() as u64);
        }
        out.extend_from_slice(&payload);
    }
    out
}

fn is_len(value: &Value) -> bool {
    matches!(value, Value::Bytes(_) | Value::Message(_))
}

/// The single length-delimited field `number`, as the router must find it.
fn find_unique(fields: &[Field], number: u32) -> Result<Option<usize>, RewriteError> {
    let mut found = None;
    for (i, field) in fields.iter().enumerate() {
        if field.number != number {
            continue;
        }
        if !is_len(&field.value) {
            return Err(RewriteError::WrongType);
        }
        if found.is_some() {
            return Err(RewriteError::Ambiguous);
        }
        found = Some(i);
    }
    Ok(found)
}

fn child(fields: &[Field], number: u32) -> Result<&[Field], RewriteError> {
    let i = find_unique(fields, number)?.ok_or(RewriteError::NotFound)?;
    match &fields[i].value {
        Value::Message(inner) => Ok(inner),
        // The generator puts a message at every step of the path, and a duplicate makes it
        // ambiguous before this point.
        other => panic!("generator bug: path step is {other:?}"),
    }
}

fn string_field(fields: &[Field], number: u32) -> Result<String, RewriteError> {
    match find_unique(fields, number)? {
        None => Ok(String::new()),
        Some(i) => {
            let bytes = match &fields[i].value {
                Value::Bytes(b) => b.clone(),
                Value::Message(m) => encode(m),
                _ => unreachable!("find_unique returns length-delimited fields only"),
            };
            String::from_utf8(bytes).map_err(|_| RewriteError::Malformed)
        }
    }
}

fn model_read(fields: &[Field], path: &[u32]) -> Result<RepositoryRef, RewriteError> {
    let mut current = fields;
    for number in path {
        current = child(current, *number)?;
    }
    Ok(RepositoryRef {
        storage_name: string_field(current, 2)?,
        relative_path: string_field(current, 3)?,
    })
}

fn model_rewrite(
    fields: &[Field],
    path: &[u32],
    storage: &str,
    relative: &str,
) -> Result<Vec<Field>, RewriteError> {
    let Some((number, rest)) = path.split_first() else {
        let mut out: Vec<Field> = fields
            .iter()
            .filter(|f| f.number != 2 && f.number != 3)
            .cloned()
            .collect();
        for (number, value) in [(2, storage), (3, relative)] {
            out.push(Field {
                number,
                value: Value::Bytes(value.as_bytes().to_vec()),
            });
        }
        return Ok(out);
    };
    let i = find_unique(fields, *number)?.ok_or(RewriteError::NotFound)?;
    let inner = child(fields, *number)?;
    let mut out = fields.to_vec();
    out[i].value = Value::Message(model_rewrite(inner, rest, storage, relative)?);
    Ok(out)
}

fn random_value(u: &mut Unstructured<'_>, depth: u32) -> ArbResult<Value> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 => Value::Varint(u.arbitrary()?),
        1 => Value::I64(u.arbitrary()?),
        2 => Value::I32(u.arbitrary()?),
        3 if depth < 3 => Value::Message(random_fields(u, depth + 1)?),
        4 => Value::Bytes(u.arbitrary::<String>()?.into_bytes()),
        _ => {
            let len = u.int_in_range(0..=12usize)?;
            Value::Bytes(u.bytes(len)?.to_vec())
        }
    })
}

fn random_fields(u: &mut Unstructured<'_>, depth: u32) -> ArbResult<Vec<Field>> {
    let count = u.int_in_range(0..=4usize)?;
    let mut fields = Vec::with_capacity(count);
    for _ in 0..count {
        // Mostly small numbers, so that they meet the path's and the repository's fields.
        let number = if u.ratio(7, 8)? {
            u.int_in_range(1..=6u32)?
        } else {
            u.int_in_range(1..=(1 << 29) - 1)?
        };
        fields.push(Field {
            number,
            value: random_value(u, depth)?,
        });
    }
    Ok(fields)
}

/// A repository's name field: usually a string, sometimes bytes that are not UTF-8.
fn name_value(u: &mut Unstructured<'_>) -> ArbResult<Value> {
    Ok(if u.ratio(1, 8)? {
        let len = u.int_in_range(0..=8usize)?;
        Value::Bytes(u.bytes(len)?.to_vec())
    } else {
        Value::Bytes(u.arbitrary::<String>()?.into_bytes())
    })
}

/// A message with a repository at `path`, and the path.
fn generate(u: &mut Unstructured<'_>) -> ArbResult<(Vec<Field>, Vec<u32>)> {
    let depth = u.int_in_range(1..=3usize)?;
    let mut path = Vec::with_capacity(depth);
    for _ in 0..depth {
        path.push(u.int_in_range(1..=5u32)?);
    }
    let mut repository = random_fields(u, 2)?;
    for number in [2, 3] {
        // Absent, present once (the usual case) or twice.
        let copies = match u.int_in_range(0..=9u8)? {
            0 => 0,
            9 => 2,
            _ => 1,
        };
        for _ in 0..copies {
            let at = u.int_in_range(0..=repository.len())?;
            repository.insert(
                at,
                Field {
                    number,
                    value: name_value(u)?,
                },
            );
        }
    }
    let mut current = repository;
    for number in path.iter().rev() {
        let mut parent = if u.ratio(1, 2)? {
            Vec::new()
        } else {
            random_fields(u, 1)?
        };
        let at = u.int_in_range(0..=parent.len())?;
        parent.insert(
            at,
            Field {
                number: *number,
                value: Value::Message(current),
            },
        );
        current = parent;
    }
    Ok((current, path))
}

fn class<T>(result: &Result<T, RewriteError>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(err) => format!("{err:?}"),
    }
}

fn check(input: &[u8]) -> String {
    let mut u = Unstructured::new(input);
    let Ok((fields, path)) = generate(&mut u) else {
        return "short input".into();
    };
    let storage: String = u.arbitrary().unwrap_or_default();
    let relative: String = u.arbitrary().unwrap_or_else(|_| "@cluster/x".into());
    let message = encode(&fields);

    let read = read_repository(&message, &path);
    assert_eq!(
        read,
        model_read(&fields, &path),
        "read {path:?} of {fields:?}"
    );

    let rewritten = rewrite_repository(&message, &path, &storage, &relative);
    let expected = model_rewrite(&fields, &path, &storage, &relative);
    match (&rewritten, &expected) {
        (Ok(bytes), Ok(model)) => {
            assert_eq!(
                bytes,
                &encode(model),
                "rewrite {path:?} of {fields:?} differs from the model"
            );
            let back = read_repository(bytes, &path).expect("a rewritten repository reads");
            assert_eq!(
                (back.storage_name.as_str(), back.relative_path.as_str()),
                (storage.as_str(), relative.as_str())
            );
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("rewrite {path:?}: got {a:?}, model {b:?}"),
    }
    format!(
        "depth {}/{}/{}",
        path.len(),
        class(&read),
        class(&rewritten)
    )
}
