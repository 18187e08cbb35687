//! `praefect -config FILE set-replication-factor -virtual-storage X -relative-path Y
//! -replication-factor N`: changes a repository's assignments through a router
//! (PraefectInfoService/SetReplicationFactor) and prints them as
//! `current assignments: a, b`.

use std::process::ExitCode;

use super::verify::dial_praefect;
use crate::config::Config;
use crate::wire::proto::praefect_info_service_client::PraefectInfoServiceClient;
use crate::wire::proto::SetReplicationFactorRequest;

pub async fn run(
    config: &Config,
    virtual_storage: String,
    relative_path: String,
    replication_factor: i32,
) -> ExitCode {
    let channel = match dial_praefect(config).await {
        Ok(channel) => channel,
        Err(message) => {
            eprintln!("praefect set-replication-factor: {message}");
            return ExitCode::FAILURE;
        }
    };
    let request = SetReplicationFactorRequest {
        virtual_storage,
        relative_path,
        replication_factor,
    };
    match PraefectInfoServiceClient::new(channel)
        .set_replication_factor(request)
        .await
    {
        Ok(response) => {
            let mut storages = response.into_inner().storages;
            storages.sort();
            println!("current assignments: {}", storages.join(", "));
            ExitCode::SUCCESS
        }
        Err(status) => {
            eprintln!("praefect set-replication-factor: {}", status.message());
            ExitCode::FAILURE
        }
    }
}
