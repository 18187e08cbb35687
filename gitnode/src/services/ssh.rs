//! SSHService: fetch over the sidechannel, push over the gRPC stream.

use praefect_wire::backchannel::PeerInfo;
use praefect_wire::proto::ssh_service_server::SshService;
use praefect_wire::proto::*;
use tonic::{Request, Response, Status, Streaming};

use super::pack::{take_pipe, PackOptions};
use super::stream::{channel, forward, ResponseStream};
use super::Services;

#[tonic::async_trait]
impl SshService for Services {
    async fn ssh_upload_pack_with_sidechannel(
        &self,
        request: Request<SshUploadPackWithSidechannelRequest>,
    ) -> Result<Response<SshUploadPackWithSidechannelResponse>, Status> {
        let path = self
            .0
            .storages
            .existing_repo(request.get_ref().repository.as_ref())?;
        let req = request.get_ref();
        let options = PackOptions {
            stateless: false,
            advertise_refs: false,
            git_protocol: &req.git_protocol,
            config: &req.git_config_options,
            transaction: None,
        };
        self.upload_pack_over_sidechannel(
            request.metadata(),
            request.extensions().get::<PeerInfo>(),
            &path,
            &options,
        )
        .await?;
        Ok(Response::new(SshUploadPackWithSidechannelResponse {
            packfile_negotiation_statistics: None,
        }))
    }

    async fn ssh_receive_pack(
        &self,
        request: Request<Streaming<SshReceivePackRequest>>,
    ) -> Result<Response<ResponseStream<SshReceivePackResponse>>, Status> {
        // Registered for as long as receive-pack runs (moved into the task below).
        let transaction = self
            .0
            .transactions
            .begin(request.metadata(), request.extensions())?;
        let mut requests = request.into_inner();
        let first = requests
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty request stream"))?;
        let path = self.0.storages.existing_repo(first.repository.as_ref())?;
        let options = PackOptions {
            stateless: false,
            advertise_refs: false,
            git_protocol: &first.git_protocol,
            config: &first.git_config_options,
            transaction: transaction.as_ref(),
        };
        let mut child =
            self.start_receive_pack(&path, &options, first.stdin.clone(), requests, |m| m.stdin)?;
        let stdout = take_pipe(&mut child.stdout, "stdout")?;
        let stderr = take_pipe(&mut child.stderr, "stderr")?;
        let (tx, stream) = channel();
        tokio::spawn(async move {
            let _transaction = transaction;
            let wrap_out = |data| SshReceivePackResponse {
                stdout: data,
                ..Default::default()
            };
            let wrap_err = |data| SshReceivePackResponse {
                stderr: data,
                ..Default::default()
            };
            let (out_ok, err_ok) = tokio::join!(
                forward(stdout, &tx, wrap_out),
                forward(stderr, &tx, wrap_err)
            );
            let status = child.wait().await;
            if !(out_ok && err_ok) {
                return;
            }
            let message = match status {
                Ok(status) => Ok(SshReceivePackResponse {
                    exit_status: Some(ExitStatus {
                        value: status.code().unwrap_or(-1),
                    }),
                    ..Default::default()
                }),
                Err(err) => Err(Status::internal(format!("waiting for receive-pack: {err}"))),
            };
            let _ = tx.send(message).await;
        });
        Ok(Response::new(stream))
    }
}
