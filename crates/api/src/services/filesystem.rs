//! `chalk.sandbox.v2.SandboxFilesystemService`: streaming file upload and download.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use compute_control::Workloads;
use compute_proto::chalk::sandbox::v2::sandbox_filesystem_service_server::SandboxFilesystemService;
use compute_proto::chalk::sandbox::v2::upload_file_request::Payload;
use compute_proto::chalk::sandbox::v2::*;
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::principal;
use crate::status::from_control;

/// The SandboxFilesystemService handler.
pub struct FilesystemApi {
    workloads: Arc<Workloads>,
}

impl FilesystemApi {
    /// A handler over `workloads`.
    pub fn new(workloads: Arc<Workloads>) -> Self {
        Self { workloads }
    }
}

type DownloadStream = Pin<Box<dyn Stream<Item = Result<DownloadFileResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SandboxFilesystemService for FilesystemApi {
    async fn upload_file(
        &self,
        req: Request<Streaming<UploadFileRequest>>,
    ) -> Result<Response<UploadFileResponse>, Status> {
        let who = principal(&req)?.clone();
        let mut incoming = req.into_inner();
        let meta = match incoming.next().await {
            Some(Ok(UploadFileRequest { payload: Some(Payload::Metadata(m)) })) => m,
            Some(Ok(_)) => {
                return Err(Status::invalid_argument("the first message must be metadata (sandbox_id, destination)"))
            }
            Some(Err(s)) => return Err(s),
            None => return Err(Status::invalid_argument("empty upload stream")),
        };
        if meta.sandbox_id.is_empty() || meta.destination.is_empty() {
            return Err(Status::invalid_argument("metadata.sandbox_id and metadata.destination are required"));
        }
        if !meta.destination.starts_with('/') {
            return Err(Status::invalid_argument(format!(
                "metadata.destination {:?} must be an absolute path",
                meta.destination
            )));
        }
        if meta.mode.is_some_and(|m| m > 0o7777) {
            return Err(Status::invalid_argument("metadata.mode must be at most 0o7777"));
        }
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        let (err_tx, mut err_rx) = tokio::sync::oneshot::channel::<Status>();
        tokio::spawn(async move {
            while let Some(msg) = incoming.next().await {
                match msg {
                    Ok(UploadFileRequest { payload: Some(Payload::Data(d)) }) => {
                        if tx.send(Bytes::from(d)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {
                        let _ = err_tx.send(Status::invalid_argument("only data messages may follow the metadata"));
                        return;
                    }
                    Err(s) => {
                        let _ = err_tx.send(s);
                        return;
                    }
                }
            }
        });
        let written = self
            .workloads
            .upload(&who, &meta.sandbox_id, &meta.destination, meta.mode, rx)
            .await
            .map_err(from_control)?;
        if let Ok(status) = err_rx.try_recv() {
            return Err(status);
        }
        Ok(Response::new(UploadFileResponse { bytes_written: written }))
    }

    async fn download_file(&self, req: Request<DownloadFileRequest>) -> Result<Response<DownloadStream>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        if r.sandbox_id.is_empty() || r.path.is_empty() {
            return Err(Status::invalid_argument("sandbox_id and path are required"));
        }
        let chunks = self.workloads.download(&who, &r.sandbox_id, &r.path).await.map_err(from_control)?;
        // The response reads straight from the download's queue: when the client goes away the queue is dropped
        // with it, and that cancels the read in the sandbox.
        let stream = tokio_stream::wrappers::ReceiverStream::new(chunks).map(|chunk| {
            chunk
                .map(|data| DownloadFileResponse { data: data.to_vec() })
                .map_err(|e| from_control(compute_control::workloads::runtime_error(e)))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
