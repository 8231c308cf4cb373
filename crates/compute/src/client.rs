//! The operator commands that act on workloads talk to the running server over its own API, as the SDK does,
//! with the admin credentials of the data directory.

use std::path::Path;

use anyhow::Context;
use compute_proto::chalk::container::v1::container_service_client::ContainerServiceClient;
use compute_proto::chalk::container::v1::{GetContainerRequest, ListContainersRequest};
use compute_proto::chalk::sandbox::v2::open_session_request::Command as SessionCommand;
use compute_proto::chalk::sandbox::v2::open_session_response::Event;
use compute_proto::chalk::sandbox::v2::sandbox_process_service_client::SandboxProcessServiceClient;
use compute_proto::chalk::sandbox::v2::sandbox_service_client::SandboxServiceClient;
use compute_proto::chalk::sandbox::v2::{
    ListSandboxesRequest, NewProcess, OpenSessionRequest, StdinData, StdinEof, TerminateSandboxRequest,
};
use compute_proto::chalk::server::v1::auth_service_client::AuthServiceClient;
use compute_proto::chalk::server::v1::GetTokenRequest;
use tonic::transport::Channel;

use crate::runtime_file::{self, AdminCredentials};

/// How the listing and inspection commands print.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Tables and lines for people.
    #[default]
    Text,
    /// The API's objects as JSON (a listing is one array), in the field names Connect JSON uses.
    Json,
}

/// How a listing or an inspection is printed (`-o`/`--output` on the ls and inspect commands).
#[derive(clap::Args, Debug, Clone)]
pub struct Format {
    /// text (a table for people) or json (the API's own objects, for scripts: `-o json | jq`).
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// A signed-in connection to the data directory's running server.
pub struct ApiClient {
    channel: Channel,
    bearer: String,
    output: Output,
}

/// A protobuf message as the API's JSON (proto3 JSON: lowerCamelCase names, as Connect returns it); `full_name` is
/// its type, e.g. `chalk.volume.v2.VolumeInfo`.
pub fn message_json<M: prost::Message>(full_name: &str, m: &M) -> anyhow::Result<serde_json::Value> {
    let desc = compute_proto::descriptor_pool()
        .get_message_by_name(full_name)
        .with_context(|| format!("no message type {full_name} in the schema"))?;
    let dynamic = prost_reflect::DynamicMessage::decode(desc, m.encode_to_vec().as_slice())?;
    Ok(serde_json::to_value(&dynamic)?)
}

/// Messages of one type as the API's JSON, in order (see [`message_json`]).
pub fn messages_json<M: prost::Message>(full_name: &str, items: &[M]) -> anyhow::Result<Vec<serde_json::Value>> {
    items.iter().map(|m| message_json(full_name, m)).collect()
}

/// Prints a JSON value, indented, with a final newline.
pub fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

impl ApiClient {
    /// Connects to the server of `data_dir` and signs in as its admin client.
    pub async fn connect(data_dir: &Path) -> anyhow::Result<ApiClient> {
        let info = runtime_file::running_server(data_dir)?.with_context(|| {
            format!("no server is running on data directory {} (start it with `compute serve`)", data_dir.display())
        })?;
        let creds: AdminCredentials = runtime_file::read_json(&runtime_file::credentials_path(data_dir))?
            .context("no admin credentials in the data directory")?;
        let channel = tonic::transport::Endpoint::from_shared(info.url.clone())?
            .connect()
            .await
            .with_context(|| format!("connecting to {}", info.url))?;
        let token = AuthServiceClient::new(channel.clone())
            .get_token(GetTokenRequest {
                client_id: creds.client_id,
                client_secret: creds.client_secret,
                grant_type: "client_credentials".into(),
                ..Default::default()
            })
            .await
            .map_err(status_error)?
            .into_inner()
            .access_token;
        Ok(ApiClient { channel, bearer: format!("Bearer {token}"), output: Output::Text })
    }

    /// The same client, printing `output`.
    pub fn with_output(self, output: Output) -> Self {
        Self { output, ..self }
    }

    /// Whether listings print JSON.
    pub fn json(&self) -> bool {
        self.output == Output::Json
    }

    /// Prints a listing's items as one JSON array, when listings print JSON.
    pub fn finish_json(&self, items: Vec<serde_json::Value>) -> anyhow::Result<()> {
        if self.json() {
            print_json(&serde_json::Value::Array(items))?;
        }
        Ok(())
    }

    /// An image build's status (`building`, `succeeded`, `failed`).
    pub async fn build_status(&self, build_id: &str) -> anyhow::Result<String> {
        use compute_proto::chalk::sandbox::v1::custom_image_service_client::CustomImageServiceClient;
        use compute_proto::chalk::sandbox::v1::GetCustomImageRequest;
        let mut c = CustomImageServiceClient::new(self.channel.clone());
        let r = c
            .get_custom_image(self.req(GetCustomImageRequest { build_id: build_id.into() }))
            .await
            .map_err(status_error)?;
        Ok(r.into_inner().status)
    }

    /// The connection.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Calls an operator endpoint (`/v1/admin/<resource>/<op>`) with a JSON body; returns the JSON answer.
    pub async fn admin(&self, op: &str, body: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("/v1/admin/{op}"))
            .header("content-type", "application/json")
            .header("authorization", &self.bearer)
            .body(tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(serde_json::to_vec(&body)?))))?;
        let resp = self.channel.clone().oneshot(req).await.with_context(|| format!("calling {op}"))?;
        let status = resp.status();
        let bytes =
            resp.into_body().collect().await.map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?.to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::json!({"message": String::from_utf8_lossy(&bytes)}));
        if !status.is_success() {
            anyhow::bail!("{}", value["message"].as_str().unwrap_or("the server refused the request"));
        }
        Ok(value)
    }

    pub(crate) fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert("authorization", self.bearer.parse().expect("tokens are ASCII"));
        r
    }

    /// Resolves an id or a name to an id.
    pub async fn resolve(&self, id_or_name: &str) -> anyhow::Result<(String, String)> {
        let mut c = ContainerServiceClient::new(self.channel.clone());
        let by = if id_or_name.starts_with("sbx-") {
            GetContainerRequest { id: Some(id_or_name.into()), ..Default::default() }
        } else {
            GetContainerRequest { name: Some(id_or_name.into()), ..Default::default() }
        };
        let info =
            c.get_container(self.req(by)).await.map_err(status_error)?.into_inner().container.unwrap_or_default();
        Ok((info.id, info.status))
    }

    /// `compute sandbox ls`.
    pub async fn list_sandboxes(&self, all: bool) -> anyhow::Result<()> {
        let mut c = SandboxServiceClient::new(self.channel.clone());
        let list = c
            .list_sandboxes(self.req(ListSandboxesRequest { limit: Some(1000), ..Default::default() }))
            .await
            .map_err(status_error)?;
        let mut json = Vec::new();
        if !self.json() {
            println!("{:<22} {:<24} {:<11} {:<26} CREATED", "ID", "NAME", "STATUS", "IMAGE");
        }
        for s in list.into_inner().sandboxes {
            let status = compute_proto::chalk::sandbox::v2::SandboxStatus::try_from(s.status)
                .map(|s| s.as_str_name().trim_start_matches("SANDBOX_STATUS_").to_lowercase())
                .unwrap_or_default();
            if !(all || status == "running" || status == "pending") {
                continue;
            }
            if self.json() {
                json.push(message_json("chalk.sandbox.v2.Sandbox", &s)?);
                continue;
            }
            let image = s.spec.as_ref().map(|sp| sp.image.clone()).unwrap_or_default();
            let created = s.created_at.map(|t| t.seconds).unwrap_or(0);
            println!("{:<22} {:<24} {:<11} {:<26} {}", s.id, s.name, status, image, ago(created));
        }
        self.finish_json(json)
    }

    /// `compute container ls`.
    pub async fn list_containers(&self, all: bool) -> anyhow::Result<()> {
        let mut c = ContainerServiceClient::new(self.channel.clone());
        let req = ListContainersRequest { include_stopped: Some(all), limit: Some(1000), ..Default::default() };
        let list = c.list_containers(self.req(req)).await.map_err(status_error)?.into_inner();
        if self.json() {
            return self.finish_json(messages_json("chalk.container.v1.ContainerResponse", &list.containers)?);
        }
        println!("{:<22} {:<24} {:<11} {:<26} CREATED", "ID", "NAME", "STATUS", "IMAGE");
        for s in list.containers {
            let image = s.spec.as_ref().map(|sp| sp.image.clone()).unwrap_or_default();
            let created = s.created_at.map(|t| t.seconds).unwrap_or(0);
            println!("{:<22} {:<24} {:<11} {:<26} {}", s.id, s.name, s.status, image, ago(created));
        }
        Ok(())
    }

    /// `compute sandbox rm` / `compute container stop`.
    pub async fn stop(&self, id_or_name: &str, grace_secs: u64) -> anyhow::Result<()> {
        let (id, _) = self.resolve(id_or_name).await?;
        let mut c = SandboxServiceClient::new(self.channel.clone());
        let req = TerminateSandboxRequest { id: id.clone(), grace_period: Some(prost_types_duration(grace_secs)) };
        c.terminate_sandbox(self.req(req)).await.map_err(status_error)?;
        println!("stopped {id}");
        Ok(())
    }

    /// `compute sandbox exec`: runs a command, streams its output, forwards stdin when asked; returns its exit code.
    pub async fn exec(&self, id_or_name: &str, command: &[String], stdin: bool) -> anyhow::Result<i32> {
        let (id, _) = self.resolve(id_or_name).await?;
        let (first, rest) = command.split_first().context("a command is required")?;
        let (tx, rx) = tokio::sync::mpsc::channel::<OpenSessionRequest>(16);
        tx.send(OpenSessionRequest {
            command: Some(SessionCommand::NewProcess(NewProcess {
                sandbox_id: id,
                command: first.clone(),
                args: rest.to_vec(),
                ..Default::default()
            })),
        })
        .await?;
        if stdin {
            let tx = tx.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut input = tokio::io::stdin();
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = input.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let msg = OpenSessionRequest {
                        command: Some(SessionCommand::StdinData(StdinData { data: buf[..n].to_vec() })),
                    };
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                }
                let _ = tx.send(OpenSessionRequest { command: Some(SessionCommand::StdinEof(StdinEof {})) }).await;
            });
        } else {
            tx.send(OpenSessionRequest { command: Some(SessionCommand::StdinEof(StdinEof {})) }).await?;
        }
        let mut c = SandboxProcessServiceClient::new(self.channel.clone());
        let mut events = c
            .open_session(self.req(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await
            .map_err(status_error)?
            .into_inner();
        use std::io::Write;
        while let Some(msg) = events.message().await.map_err(status_error)? {
            match msg.event {
                Some(Event::OutputData(o)) => {
                    if o.stream == 2 {
                        std::io::stderr().write_all(&o.data)?;
                    } else {
                        std::io::stdout().write_all(&o.data)?;
                        std::io::stdout().flush()?;
                    }
                }
                Some(Event::ProcessExited(e)) => return Ok(e.exit_code.unwrap_or(128 + e.signal.unwrap_or(0))),
                Some(Event::ProcessTimedOut(_)) => return Ok(124),
                Some(Event::ProcessFailed(f)) => {
                    eprintln!("compute: {}", f.message);
                    return Ok(127);
                }
                Some(Event::Error(e)) => anyhow::bail!("{}: {}", e.code, e.message),
                _ => {}
            }
        }
        drop(tx);
        anyhow::bail!("the stream ended before the process did")
    }
}

fn prost_types_duration(secs: u64) -> prost_types::Duration {
    prost_types::Duration { seconds: secs as i64, nanos: 0 }
}

pub(crate) fn ago(secs: i64) -> String {
    let now = compute_store::now_millis() / 1000;
    let d = (now - secs).max(0);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

pub(crate) fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", s.code(), s.message())
}
