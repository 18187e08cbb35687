//! `praefect -config FILE accept-dataloss -virtual-storage X -relative-path Y
//! -authoritative-storage S`: accepts a data loss through a router
//! (PraefectInfoService/SetAuthoritativeStorage). The chosen replica becomes the only
//! up-to-date one; the reconciler then overwrites the others from it. Prints nothing on
//! success.

use super::dial::dial_praefect;
use super::error::CliError;
use crate::config::Config;
use crate::wire::proto::praefect_info_service_client::PraefectInfoServiceClient;
use crate::wire::proto::SetAuthoritativeStorageRequest;

pub async fn run(
    config: &Config,
    virtual_storage: String,
    relative_path: String,
    authoritative_storage: String,
) -> Result<(), CliError> {
    let channel = dial_praefect(config).await?;
    PraefectInfoServiceClient::new(channel)
        .set_authoritative_storage(SetAuthoritativeStorageRequest {
            virtual_storage,
            relative_path,
            authoritative_storage,
        })
        .await
        .map_err(|status| CliError::Rpc {
            what: Some("set authoritative storage"),
            status,
            with_code: false,
        })?;
    Ok(())
}
