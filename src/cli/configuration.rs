//! `praefect configuration validate`: checks a configuration without starting anything.
//! Reads TOML from stdin; prints `{"errors":[{"key":[...],"message":"..."}]}` and exits 2
//! when the configuration is invalid, exits 1 when something else failed.

use std::io::Read;
use std::process::ExitCode;

use serde::Serialize;

use super::error::{report, CliError, EXIT_USAGE};
use crate::config::{self, ValidationError};

#[derive(Serialize)]
struct Report<'a> {
    errors: &'a [ValidationError],
}

pub fn validate_stdin() -> ExitCode {
    let mut text = String::new();
    if let Err(err) = std::io::stdin().read_to_string(&mut text) {
        return report("configuration validate", Err(CliError::Stdin(err)));
    }
    match config::load_str(&text) {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => match err.validation_errors() {
            Some(errors) => {
                match serde_json::to_string_pretty(&Report { errors: &errors }) {
                    Ok(json) => println!("{json}"),
                    Err(json_err) => eprintln!("praefect configuration validate: {json_err}"),
                }
                ExitCode::from(EXIT_USAGE)
            }
            None => {
                eprintln!("praefect configuration validate: {err}");
                ExitCode::FAILURE
            }
        },
    }
}
