//! `praefect -config FILE set-replication-factor -virtual-storage X -relative-path Y
//! -replication-factor N`: changes a repository's assignments through a router
//! (PraefectInfoService/SetReplicationFactor) and prints them as
//! `current assignments: a, b`.

use super::dial::dial_praefect;
use super::error::CliError;
use crate::config::Config;
use crate::wire::proto::praefect_info_service_client::PraefectInfoServiceClient;
use crate::wire::proto::SetReplicationFactorRequest;

pub async fn run(
    config: &Config,
    virtual_storage: String,
    relative_path: String,
    replication_factor: i32,
) -> Result<(), CliError> {
    let channel = dial_praefect(config).await?;
    let request = SetReplicationFactorRequest {
        virtual_storage,
        relative_path,
        replication_factor,
    };
    let response = PraefectInfoServiceClient::new(channel)
        .set_replication_factor(request)
        .await
        .map_err(CliError::rpc)?;
    let mut storages = response.into_inner().storages;
    storages.sort();
    println!("current assignments: {}", storages.join(", "));
    Ok(())
}
