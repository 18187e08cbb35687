//! `praefect -config FILE dial-nodes [-timeout 10s]`: can this router reach every node, is it
//! healthy, and does it serve the storages the configuration expects, readable and writable?

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::error::CliError;
use crate::config::Config;
use crate::nodes::{configured_nodes, dial};
use crate::wire::proto::server_service_client::ServerServiceClient;
use crate::wire::proto::ServerInfoRequest;

/// One distinct node address and the storages the configuration expects there.
struct Target {
    address: String,
    token: String,
    /// (storage, virtual storages that list it at this address)
    storages: Vec<(String, Vec<String>)>,
}

fn targets(config: &Config) -> Vec<Target> {
    let mut targets: Vec<Target> = Vec::new();
    for node in configured_nodes(config) {
        let index = match targets.iter().position(|t| t.address == node.address) {
            Some(i) => i,
            None => {
                targets.push(Target {
                    address: node.address.clone(),
                    token: node.token.clone(),
                    storages: Vec::new(),
                });
                targets.len() - 1
            }
        };
        let storages = &mut targets[index].storages;
        match storages.iter_mut().find(|(s, _)| *s == node.storage) {
            Some((_, vss)) => vss.push(node.virtual_storage.clone()),
            None => storages.push((node.storage.clone(), vec![node.virtual_storage.clone()])),
        }
    }
    targets
}

/// Checks one node; returns its report lines and whether it passed.
async fn check(config: &Config, target: &Target, timeout: Duration) -> (Vec<String>, bool) {
    let mut lines = vec!["dialing...".to_string()];
    let channel = match dial(config, &target.address, &target.token, timeout).await {
        Ok(channel) => channel,
        Err(err) => {
            lines.push(format!("ERROR: dialing failed: {err}"));
            return (lines, false);
        }
    };
    lines.push("dialed successfully!".to_string());
    lines.push("checking health...".to_string());
    let health = tokio::time::timeout(
        timeout,
        HealthClient::new(channel.clone()).check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await;
    match health {
        Ok(Ok(response)) if response.get_ref().status == ServingStatus::Serving as i32 => {
            lines.push("SUCCESS: node is healthy!".to_string());
        }
        Ok(Ok(response)) => {
            lines.push(format!(
                "ERROR: node is not serving (status {})",
                response.get_ref().status
            ));
            return (lines, false);
        }
        Ok(Err(status)) => {
            lines.push(format!("ERROR: health check failed: {}", status.message()));
            return (lines, false);
        }
        Err(_) => {
            lines.push("ERROR: health check timed out".to_string());
            return (lines, false);
        }
    }
    lines.push("checking consistency...".to_string());
    let info = tokio::time::timeout(
        timeout,
        ServerServiceClient::new(channel).server_info(ServerInfoRequest {}),
    )
    .await;
    let info = match info {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => {
            lines.push(format!("ERROR: ServerInfo failed: {}", status.message()));
            return (lines, false);
        }
        Err(_) => {
            lines.push("ERROR: ServerInfo timed out".to_string());
            return (lines, false);
        }
    };
    let mut consistent = true;
    for (storage, virtual_storages) in &target.storages {
        let reported = info
            .storage_statuses
            .iter()
            .find(|s| &s.storage_name == storage);
        let vs_list = format!("[{}]", virtual_storages.join(" "));
        match reported {
            Some(s) if s.readable && s.writeable => lines.push(format!(
                "SUCCESS: confirmed Gitaly storage {storage:?} in virtual storages {vs_list} is served"
            )),
            Some(s) => {
                consistent = false;
                if !s.readable {
                    lines.push(format!("ERROR: storage {storage:?} is not readable"));
                }
                if !s.writeable {
                    lines.push(format!("ERROR: storage {storage:?} is not writeable"));
                }
            }
            None => {
                consistent = false;
                lines.push(format!(
                    "ERROR: storage {storage:?} of virtual storages {vs_list} is not served by this node"
                ));
            }
        }
    }
    if consistent {
        lines.push("SUCCESS: node configuration is consistent!".to_string());
    }
    (lines, consistent)
}

/// The addresses of the nodes that fail their checks (for `check`), without the report.
pub async fn unhealthy_nodes(config: &Config, timeout: Duration) -> Vec<String> {
    let targets = targets(config);
    let results =
        futures::future::join_all(targets.iter().map(|t| check(config, t, timeout))).await;
    targets
        .iter()
        .zip(results)
        .filter(|(_, (_, ok))| !ok)
        .map(|(target, _)| target.address.clone())
        .collect()
}

pub async fn run(config: &Config, timeout: Duration) -> Result<(), CliError> {
    let targets = targets(config);
    let checks = targets.iter().map(|t| check(config, t, timeout));
    let results = futures::future::join_all(checks).await;
    let mut unhealthy = Vec::new();
    for (target, (lines, ok)) in targets.iter().zip(results) {
        for line in lines {
            println!("[{}]: {line}", target.address);
        }
        if !ok {
            unhealthy.push(target.address.clone());
        }
    }
    if unhealthy.is_empty() {
        Ok(())
    } else {
        Err(CliError::UnhealthyNodes(unhealthy))
    }
}
