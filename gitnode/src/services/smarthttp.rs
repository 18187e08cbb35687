//! SmartHTTPService: ref advertisements, fetch over the sidechannel, push over the stream.

use praefect_wire::backchannel::PeerInfo;
use praefect_wire::pktline;
use praefect_wire::proto::smart_http_service_server::SmartHttpService;
use praefect_wire::proto::*;
use tonic::{Request, Response, Status, Streaming};

use super::pack::{collect_stderr, report_failure, spawn, take_pipe, Pack, PackOptions};
use super::stream::{channel, forward, ResponseStream};
use super::Services;

impl Services {
    async fn info_refs(
        &self,
        request: Request<InfoRefsRequest>,
        pack: Pack,
        service: &'static str,
    ) -> Result<Response<ResponseStream<InfoRefsResponse>>, Status> {
        let req = request.into_inner();
        let path = self.0.storages.existing_repo(req.repository.as_ref())?;
        let options = PackOptions {
            stateless: true,
            advertise_refs: true,
            git_protocol: &req.git_protocol,
            config: &req.git_config_options,
            transaction: None,
        };
        let mut child = spawn(self.pack_command(pack, &path, &options)?, false)?;
        let stdout = take_pipe(&mut child.stdout, "stdout")?;
        let stderr = collect_stderr(&mut child);
        let (tx, stream) = channel();
        tokio::spawn(async move {
            let mut header = Vec::new();
            let _ =
                pktline::write_data(&mut header, format!("# service={service}\n").as_bytes()).await;
            header.extend_from_slice(pktline::FLUSH);
            if tx
                .send(Ok(InfoRefsResponse { data: header }))
                .await
                .is_err()
            {
                return;
            }
            if !forward(stdout, &tx, |data| InfoRefsResponse { data }).await {
                return;
            }
            report_failure(child, stderr, &tx, service, None).await;
        });
        Ok(Response::new(stream))
    }
}

#[tonic::async_trait]
impl SmartHttpService for Services {
    async fn info_refs_upload_pack(
        &self,
        request: Request<InfoRefsRequest>,
    ) -> Result<Response<ResponseStream<InfoRefsResponse>>, Status> {
        self.info_refs(request, Pack::UploadPack, "git-upload-pack")
            .await
    }

    async fn info_refs_receive_pack(
        &self,
        request: Request<InfoRefsRequest>,
    ) -> Result<Response<ResponseStream<InfoRefsResponse>>, Status> {
        self.info_refs(request, Pack::ReceivePack, "git-receive-pack")
            .await
    }

    async fn post_upload_pack_with_sidechannel(
        &self,
        request: Request<PostUploadPackWithSidechannelRequest>,
    ) -> Result<Response<PostUploadPackWithSidechannelResponse>, Status> {
        let path = self
            .0
            .storages
            .existing_repo(request.get_ref().repository.as_ref())?;
        let req = request.get_ref();
        let options = PackOptions {
            stateless: true,
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
        Ok(Response::new(PostUploadPackWithSidechannelResponse {
            packfile_negotiation_statistics: None,
        }))
    }

    async fn post_receive_pack(
        &self,
        request: Request<Streaming<PostReceivePackRequest>>,
    ) -> Result<Response<ResponseStream<PostReceivePackResponse>>, Status> {
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
            stateless: true,
            advertise_refs: false,
            git_protocol: &first.git_protocol,
            config: &first.git_config_options,
            transaction: transaction.as_ref(),
        };
        let mut child =
            self.start_receive_pack(&path, &options, first.data.clone(), requests, |m| m.data)?;
        let stdout = take_pipe(&mut child.stdout, "stdout")?;
        let stderr = collect_stderr(&mut child);
        let (tx, stream) = channel();
        tokio::spawn(async move {
            if !forward(stdout, &tx, |data| PostReceivePackResponse { data }).await {
                return;
            }
            report_failure(child, stderr, &tx, "receive-pack", transaction.as_ref()).await;
        });
        Ok(Response::new(stream))
    }
}
