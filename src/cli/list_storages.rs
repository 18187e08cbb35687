//! `praefect -config FILE list-storages [-virtual-storage X]`: the configured virtual
//! storages and their nodes as a borderless table. Read from the configuration only, so it
//! works while the router or the database is down.

use super::error::CliError;
use crate::config::Config;

pub async fn run(config: &Config, virtual_storage: Option<String>) -> Result<(), CliError> {
    print!("{}", render(config, virtual_storage.as_deref()));
    Ok(())
}

fn render(config: &Config, only: Option<&str>) -> String {
    let selected: Vec<_> = config
        .virtual_storage
        .iter()
        .filter(|vs| only.is_none_or(|name| vs.name == name))
        .collect();
    if let (Some(name), true) = (only, selected.is_empty()) {
        return format!("No virtual storages named {name}.\n");
    }
    let mut rows = vec![[
        "VIRTUAL_STORAGE".to_string(),
        "NODE".to_string(),
        "ADDRESS".to_string(),
    ]];
    for vs in selected {
        for node in &vs.node {
            rows.push([vs.name.clone(), node.storage.clone(), node.address.clone()]);
        }
    }
    table(&rows)
}

/// Left-aligned columns, each as wide as its widest cell, three spaces apart.
fn table(rows: &[[String; 3]]) -> String {
    let mut widths = [0usize; 3];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let text = r#"
listen_addr = "127.0.0.1:2305"
[[virtual_storage]]
name = "default"
[[virtual_storage.node]]
storage = "gitaly-1"
address = "tcp://10.0.0.1:8075"
[[virtual_storage.node]]
storage = "gitaly-long-name"
address = "tcp://10.0.0.2:8075"
[[virtual_storage]]
name = "vs2"
[[virtual_storage.node]]
storage = "g"
address = "unix:/run/g.sock"
"#;
        crate::config::parse_str(text).unwrap().0
    }

    #[test]
    fn a_borderless_table() {
        assert_eq!(
            render(&config(), None),
            "VIRTUAL_STORAGE   NODE               ADDRESS
default           gitaly-1           tcp://10.0.0.1:8075
default           gitaly-long-name   tcp://10.0.0.2:8075
vs2               g                  unix:/run/g.sock
"
        );
        assert_eq!(
            render(&config(), Some("vs2")),
            "VIRTUAL_STORAGE   NODE   ADDRESS\nvs2               g      unix:/run/g.sock\n"
        );
        assert_eq!(
            render(&config(), Some("nope")),
            "No virtual storages named nope.\n"
        );
    }
}
