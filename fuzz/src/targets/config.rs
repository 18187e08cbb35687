//! The configuration loader (`config::parse_str`, `validate`, `load_str`). Properties: no
//! panic on any text; a syntax error names a line of the text; a configuration that parses
//! survives a round trip through TOML unchanged; and one that loads validates cleanly.
//! Texts with a `config_command` or a `token_file` are parsed but not loaded: loading would
//! run the command or read the file.

use praefect::config::{known_keys, load_str, parse_str, validate, ConfigError};

use crate::engine::Target;

pub const TARGET: Target = Target {
    name: "config",
    about: "parse_str, validate and load_str on TOML text; serialize/parse round trip",
    check,
    dictionary,
    max_len: 8192,
};

fn dictionary() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = [
        "\n",
        " = ",
        "\"",
        "'",
        "[",
        "]",
        "[[",
        "]]",
        "{",
        "}",
        ",",
        "#",
        "true",
        "false",
        "0",
        "-1",
        "1.5",
        "\"30s\"",
        "\"-1s\"",
        "\"0\"",
        "\"\"",
        "\"tcp://127.0.0.1:2305\"",
        "\"unix:/tmp/x.sock\"",
        "9223372036854775807",
        "1e400",
        "nan",
        "inf",
        "1979-05-27T07:32:00Z",
        "\"\"\"\n",
        "\\u0000",
    ]
    .iter()
    .map(|t| t.as_bytes().to_vec())
    .collect();
    for key in known_keys(&[]) {
        out.push(format!("{key} = ").into_bytes());
        out.push(format!("[{key}]\n").into_bytes());
        out.push(format!("[[{key}]]\n").into_bytes());
        for inner in known_keys(std::slice::from_ref(&key)) {
            out.push(format!("{inner} = ").into_bytes());
            out.push(format!("[{key}.{inner}]\n").into_bytes());
            out.push(format!("[[{key}.{inner}]]\n").into_bytes());
        }
    }
    out
}

fn check(input: &[u8]) -> String {
    let text = String::from_utf8_lossy(input);
    let (config, unknown) = match parse_str(&text) {
        Ok(parsed) => parsed,
        Err(ConfigError::Syntax(err)) => {
            if let Some(rest) = err.message.strip_prefix("line ") {
                let line: usize = rest
                    .split(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("a line number");
                assert!(
                    (1..=text.lines().count().max(1) + 1).contains(&line),
                    "line {line} of a text of {} lines: {}",
                    text.lines().count(),
                    err.message
                );
            }
            return "syntax".into();
        }
        Err(other) => panic!("parse_str returned {other:?}"),
    };
    let problems = validate(&config);

    let serialized = toml::to_string(&config).expect("a parsed configuration serializes");
    match parse_str(&serialized) {
        Ok((again, unknown_again)) => {
            assert!(
                unknown_again.is_empty(),
                "{unknown_again:?} in {serialized}"
            );
            assert_eq!(again, config, "round trip through\n{serialized}");
        }
        Err(err) => panic!("the serialized configuration does not parse: {err}\n{serialized}"),
    }

    if config.config_command.is_empty() && config.auth.token_file.is_empty() {
        match load_str(&text) {
            Ok(loaded) => assert_eq!(validate(&loaded), vec![], "loaded yet invalid"),
            Err(ConfigError::Invalid(errors)) => assert!(!errors.is_empty()),
            Err(other) => panic!("load_str after parse_str succeeded: {other:?}"),
        }
    }
    format!(
        "parsed/{} unknown/{} problems",
        unknown.len().min(3),
        problems.len().min(5)
    )
}
