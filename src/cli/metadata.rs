//! `praefect -config FILE metadata -repository-id N | -virtual-storage X -relative-path Y`:
//! prints a repository's record and its replicas (through a router,
//! PraefectInfoService/GetRepositoryMetadata) in Praefect's layout.

use std::fmt::Write as _;

use super::dial::dial_praefect;
use super::error::CliError;
use crate::config::Config;
use crate::wire::proto::get_repository_metadata_request::{Path, Query};
use crate::wire::proto::praefect_info_service_client::PraefectInfoServiceClient;
use crate::wire::proto::{GetRepositoryMetadataRequest, GetRepositoryMetadataResponse};

/// The query for the flags given (clap has already made sure one form is complete).
fn query(
    repository_id: Option<i64>,
    virtual_storage: Option<String>,
    relative_path: Option<String>,
) -> Result<Query, CliError> {
    match (repository_id, virtual_storage, relative_path) {
        (Some(id), None, None) => Ok(Query::RepositoryId(id)),
        (None, Some(virtual_storage), Some(relative_path)) => Ok(Query::Path(Path {
            virtual_storage,
            relative_path,
        })),
        _ => Err(CliError::Usage(
            "give either -repository-id, or -virtual-storage and -relative-path".into(),
        )),
    }
}

pub async fn run(
    config: &Config,
    repository_id: Option<i64>,
    virtual_storage: Option<String>,
    relative_path: Option<String>,
) -> Result<(), CliError> {
    let query = query(repository_id, virtual_storage, relative_path)?;
    let channel = dial_praefect(config).await?;
    let metadata = PraefectInfoServiceClient::new(channel)
        .get_repository_metadata(GetRepositoryMetadataRequest { query: Some(query) })
        .await
        .map_err(|status| CliError::Rpc {
            what: Some("get metadata"),
            status,
            with_code: false,
        })?
        .into_inner();
    print!("{}", render(&metadata));
    Ok(())
}

fn render(metadata: &GetRepositoryMetadataResponse) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Repository ID: {}", metadata.repository_id);
    let _ = writeln!(out, "Virtual Storage: {:?}", metadata.virtual_storage);
    let _ = writeln!(out, "Relative Path: {:?}", metadata.relative_path);
    let _ = writeln!(out, "Replica Path: {:?}", metadata.replica_path);
    let _ = writeln!(out, "Primary: {:?}", metadata.primary);
    let _ = writeln!(out, "Generation: {}", metadata.generation);
    let _ = writeln!(out, "Replicas:");
    for replica in &metadata.replicas {
        let generation = if replica.generation < 0 {
            "replica not yet created".to_string()
        } else if replica.generation < metadata.generation {
            format!(
                "{}, behind by {} changes",
                replica.generation,
                metadata.generation - replica.generation
            )
        } else {
            format!("{}, fully up to date", replica.generation)
        };
        let verified_at = replica
            .verified_at
            .as_ref()
            .and_then(|at| {
                chrono::DateTime::from_timestamp(at.seconds, u32::try_from(at.nanos).ok()?)
            })
            .map(go_time)
            .unwrap_or_else(|| "unverified".to_string());
        let _ = writeln!(out, "- Storage: {:?}", replica.storage);
        let _ = writeln!(out, "  Assigned: {}", replica.assigned);
        let _ = writeln!(out, "  Generation: {generation}");
        let _ = writeln!(out, "  Healthy: {}", replica.healthy);
        let _ = writeln!(out, "  Valid Primary: {}", replica.valid_primary);
        let _ = writeln!(out, "  Verified At: {verified_at}");
    }
    out
}

/// A time as Go prints one in UTC (`2006-01-02 15:04:05.123 +0000 UTC`: fractional seconds
/// without trailing zeros, none when whole), as Praefect's `metadata` does.
fn go_time(at: chrono::DateTime<chrono::Utc>) -> String {
    let nanos = at.timestamp_subsec_nanos();
    let fraction = if nanos == 0 {
        String::new()
    } else {
        format!(".{nanos:09}").trim_end_matches('0').to_string()
    };
    format!("{}{fraction} +0000 UTC", at.format("%Y-%m-%d %H:%M:%S"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::proto::get_repository_metadata_response::Replica;

    #[test]
    fn layout_matches_praefect() {
        let replica = |storage: &str, generation, verified_at| Replica {
            storage: storage.into(),
            assigned: storage != "gitaly-3",
            generation,
            healthy: storage != "gitaly-1",
            valid_primary: storage == "gitaly-2",
            verified_at,
        };
        let metadata = GetRepositoryMetadataResponse {
            repository_id: 7,
            virtual_storage: "default".into(),
            relative_path: "a.git".into(),
            replica_path: "@cluster/repositories/1/2/7".into(),
            primary: "gitaly-2".into(),
            generation: 3,
            replicas: vec![
                replica("gitaly-1", 1, None),
                replica(
                    "gitaly-2",
                    3,
                    Some(prost_types::Timestamp {
                        seconds: 1_700_000_000,
                        nanos: 120_000_000,
                    }),
                ),
                replica("gitaly-3", -1, None),
            ],
        };
        assert_eq!(
            render(&metadata),
            r#"Repository ID: 7
Virtual Storage: "default"
Relative Path: "a.git"
Replica Path: "@cluster/repositories/1/2/7"
Primary: "gitaly-2"
Generation: 3
Replicas:
- Storage: "gitaly-1"
  Assigned: true
  Generation: 1, behind by 2 changes
  Healthy: false
  Valid Primary: false
  Verified At: unverified
- Storage: "gitaly-2"
  Assigned: true
  Generation: 3, fully up to date
  Healthy: true
  Valid Primary: true
  Verified At: 2023-11-14 22:13:20.12 +0000 UTC
- Storage: "gitaly-3"
  Assigned: false
  Generation: replica not yet created
  Healthy: true
  Valid Primary: false
  Verified At: unverified
"#
        );
    }

    #[test]
    fn flags_become_the_query() {
        assert_eq!(query(Some(3), None, None).unwrap(), Query::RepositoryId(3));
        assert_eq!(
            query(None, Some("vs".into()), Some("p".into())).unwrap(),
            Query::Path(Path {
                virtual_storage: "vs".into(),
                relative_path: "p".into()
            })
        );
        assert!(query(None, Some("vs".into()), None).is_err());
        assert!(query(None, None, None).is_err());
    }
}
