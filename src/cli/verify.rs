//! `praefect -config FILE verify -repository-id N | -virtual-storage X [-storage S]`: marks
//! replicas unverified through a router (PraefectInfoService/MarkUnverified), so that the
//! background verifier checks them before any other, and prints how many were marked.

use super::dial::dial_praefect;
use super::error::CliError;
use crate::config::Config;
use crate::wire::proto::mark_unverified_request::{Selector, Storage};
use crate::wire::proto::praefect_info_service_client::PraefectInfoServiceClient;
use crate::wire::proto::MarkUnverifiedRequest;

/// The request for the flags given (clap has already made sure exactly one selector is set).
fn request(
    repository_id: Option<i64>,
    virtual_storage: Option<String>,
    storage: Option<String>,
) -> Result<MarkUnverifiedRequest, String> {
    let selector = match (repository_id, virtual_storage, storage) {
        (Some(id), None, None) => Selector::RepositoryId(id),
        (None, Some(virtual_storage), None) => Selector::VirtualStorage(virtual_storage),
        (None, Some(virtual_storage), Some(storage)) => Selector::Storage(Storage {
            virtual_storage,
            storage,
        }),
        _ => {
            return Err(
                "give either -repository-id, or -virtual-storage with an optional -storage"
                    .to_string(),
            )
        }
    };
    Ok(MarkUnverifiedRequest {
        selector: Some(selector),
    })
}

pub async fn run(
    config: &Config,
    repository_id: Option<i64>,
    virtual_storage: Option<String>,
    storage: Option<String>,
) -> Result<(), CliError> {
    let request = request(repository_id, virtual_storage, storage).map_err(CliError::Usage)?;
    let channel = dial_praefect(config).await?;
    let response = PraefectInfoServiceClient::new(channel)
        .mark_unverified(request)
        .await
        .map_err(|status| CliError::Rpc {
            what: Some("mark unverified"),
            status,
            with_code: true,
        })?;
    println!(
        "{} replicas marked unverified",
        response.into_inner().replicas_marked
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_become_the_selector() {
        let selector = |id, vs: Option<&str>, s: Option<&str>| {
            request(id, vs.map(String::from), s.map(String::from)).map(|r| r.selector)
        };
        assert_eq!(
            selector(Some(3), None, None),
            Ok(Some(Selector::RepositoryId(3)))
        );
        assert_eq!(
            selector(None, Some("vs"), None),
            Ok(Some(Selector::VirtualStorage("vs".into())))
        );
        assert_eq!(
            selector(None, Some("vs"), Some("s")),
            Ok(Some(Selector::Storage(Storage {
                virtual_storage: "vs".into(),
                storage: "s".into()
            })))
        );
        assert!(selector(None, None, None).is_err());
        assert!(selector(Some(1), Some("vs"), None).is_err());
        assert!(selector(None, None, Some("s")).is_err());
    }
}
