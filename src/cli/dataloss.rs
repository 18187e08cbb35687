//! `praefect -config FILE dataloss [-virtual-storage X] [-partially-unavailable]`: lists,
//! per virtual storage, the repositories that lost their primary (through a router,
//! PraefectInfoService/Dataloss), each with its in-sync and outdated storages, in Praefect's
//! layout so that runbooks read the same.

use std::fmt::Write as _;

use super::dial::dial_praefect;
use super::error::CliError;
use crate::config::Config;
use crate::wire::proto::dataloss_response::repository::Storage;
use crate::wire::proto::dataloss_response::Repository;
use crate::wire::proto::praefect_info_service_client::PraefectInfoServiceClient;
use crate::wire::proto::DatalossRequest;

pub async fn run(
    config: &Config,
    virtual_storage: Option<String>,
    partially_unavailable: bool,
) -> Result<(), CliError> {
    let mut virtual_storages: Vec<String> = match virtual_storage {
        Some(name) => vec![name],
        None => config
            .virtual_storage
            .iter()
            .map(|vs| vs.name.clone())
            .collect(),
    };
    virtual_storages.sort();
    let mut client = PraefectInfoServiceClient::new(dial_praefect(config).await?);
    for virtual_storage in virtual_storages {
        let mut stream = client
            .dataloss(DatalossRequest {
                virtual_storage: virtual_storage.clone(),
                include_partially_replicated: partially_unavailable,
            })
            .await
            .map_err(CliError::rpc)?
            .into_inner();
        let mut repositories = Vec::new();
        while let Some(message) = stream.message().await.map_err(CliError::rpc)? {
            repositories.extend(message.repositories);
        }
        print!(
            "{}",
            render(&virtual_storage, &repositories, partially_unavailable)
        );
    }
    Ok(())
}

/// Two spaces per level, as Praefect indents.
fn indent(level: usize) -> String {
    "  ".repeat(level)
}

/// One virtual storage's part of the output.
fn render(virtual_storage: &str, repositories: &[Repository], partially: bool) -> String {
    let mut out = format!("Virtual storage: {virtual_storage}\n");
    if repositories.is_empty() {
        let message = if partially {
            "All repositories are fully available on all assigned storages!"
        } else {
            "All repositories are available!"
        };
        let _ = writeln!(out, "{}{message}", indent(1));
        return out;
    }
    let _ = writeln!(out, "{}Repositories:", indent(1));
    for repository in repositories {
        let unavailable = if repository.unavailable {
            " (unavailable)"
        } else {
            ""
        };
        let primary = if repository.primary.is_empty() {
            "No Primary"
        } else {
            &repository.primary
        };
        let _ = writeln!(
            out,
            "{}{}{unavailable}:",
            indent(2),
            repository.relative_path
        );
        let _ = writeln!(out, "{}Primary: {primary}", indent(3));
        let _ = writeln!(out, "{}In-Sync Storages:", indent(3));
        for storage in repository.storages.iter().filter(|s| s.behind_by == 0) {
            let _ = writeln!(out, "{}{}{}", indent(4), storage.name, notes(storage));
        }
        let _ = writeln!(out, "{}Outdated Storages:", indent(3));
        for storage in repository.storages.iter().filter(|s| s.behind_by != 0) {
            let plural = if storage.behind_by == 1 { "" } else { "s" };
            let _ = writeln!(
                out,
                "{}{} is behind by {} change{plural} or less{}",
                indent(4),
                storage.name,
                storage.behind_by,
                notes(storage)
            );
        }
    }
    out
}

/// What follows a storage's name: whether it is assigned and whether it is unhealthy.
fn notes(storage: &Storage) -> String {
    let mut text = String::new();
    if storage.assigned {
        text.push_str(", assigned host");
    }
    if !storage.healthy {
        text.push_str(", unhealthy");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(name: &str, behind_by: i64, assigned: bool, healthy: bool) -> Storage {
        Storage {
            name: name.into(),
            behind_by,
            assigned,
            healthy,
            valid_primary: behind_by == 0 && healthy,
        }
    }

    #[test]
    fn layout_matches_praefect() {
        let repositories = [
            Repository {
                relative_path: "a.git".into(),
                primary: "gitaly-1".into(),
                unavailable: true,
                storages: vec![
                    storage("gitaly-1", 0, true, false),
                    storage("gitaly-2", 1, true, true),
                    storage("gitaly-3", 3, false, true),
                ],
            },
            Repository {
                relative_path: "b.git".into(),
                primary: String::new(),
                unavailable: false,
                storages: vec![storage("gitaly-2", 0, false, true)],
            },
        ];
        assert_eq!(
            render("default", &repositories, true),
            "Virtual storage: default
  Repositories:
    a.git (unavailable):
      Primary: gitaly-1
      In-Sync Storages:
        gitaly-1, assigned host, unhealthy
      Outdated Storages:
        gitaly-2 is behind by 1 change or less, assigned host
        gitaly-3 is behind by 3 changes or less
    b.git:
      Primary: No Primary
      In-Sync Storages:
        gitaly-2
      Outdated Storages:
"
        );
        assert_eq!(
            render("vs", &[], false),
            "Virtual storage: vs\n  All repositories are available!\n"
        );
        assert_eq!(
            render("vs", &[], true),
            "Virtual storage: vs\n  All repositories are fully available on all assigned storages!\n"
        );
    }
}
