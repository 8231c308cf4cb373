//! `compute fn …` (alias `function`): the functions of the admin client's environment, through the running
//! server's ExternalFunctionCatalogService and FunctionQueueMetaService, as the SDK sees them.

use std::path::Path;
use std::time::Duration;

use clap::Subcommand;
use compute_proto::chalk::externalfunctioncatalog::v1::external_function_catalog_service_client::ExternalFunctionCatalogServiceClient;
use compute_proto::chalk::externalfunctioncatalog::v1::{
    DeleteExternalFunctionRequest, GetExternalFunctionRequest, GetExternalFunctionResponse,
    ListExternalFunctionVersionsRequest, ListExternalFunctionsRequest,
};
use compute_proto::chalk::runtime::v1::function_queue_meta_service_client::FunctionQueueMetaServiceClient;
use compute_proto::chalk::runtime::v1::{GetCallCountRequest, GetRecentCallsRequest, RemoteCallStatus};
use tonic::transport::Channel;

use crate::client::{ago, message_json, messages_json, print_json, status_error, ApiClient, Format};

/// `compute fn`.
#[derive(Subcommand, Debug)]
pub enum FunctionCommand {
    /// List functions with the version they serve, their group's state and schedule.
    Ls {
        /// Include deleted ones.
        #[arg(short, long)]
        all: bool,
        #[command(flatten)]
        format: Format,
    },
    /// A function's version, policies, schedule, replicas, queue and versions.
    Inspect {
        /// Function name.
        name: String,
        #[command(flatten)]
        format: Format,
    },
    /// The output of a function's replicas (what its code printed), each under a header.
    Logs {
        /// Function name.
        name: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
    },
    /// Its deferred and scheduled calls still kept, newest first: status and how each went.
    Runs {
        /// Function name.
        name: String,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Delete a function: its replicas stop, its queued calls and own secrets go.
    Rm {
        /// Function name.
        name: String,
    },
}

/// Runs a `compute fn` command against the server of `data_dir`.
pub async fn function(data_dir: &Path, cmd: FunctionCommand) -> anyhow::Result<()> {
    let client = ApiClient::connect(data_dir).await?;
    match cmd {
        FunctionCommand::Ls { all, format } => client.with_output(format.output).fn_ls(all).await,
        FunctionCommand::Inspect { name, format } => client.with_output(format.output).fn_inspect(&name).await,
        FunctionCommand::Logs { name, follow } => client.fn_logs(data_dir, &name, follow).await,
        FunctionCommand::Runs { name, limit } => client.fn_runs(&name, limit).await,
        FunctionCommand::Rm { name } => client.fn_rm(&name).await,
    }
}

fn status_name(status: i32) -> &'static str {
    match RemoteCallStatus::try_from(status).unwrap_or(RemoteCallStatus::Unspecified) {
        RemoteCallStatus::Pending => "pending",
        RemoteCallStatus::Running => "running",
        RemoteCallStatus::Completed => "completed",
        RemoteCallStatus::Failed => "failed",
        RemoteCallStatus::Expired => "expired",
        RemoteCallStatus::Unspecified => "-",
    }
}

impl ApiClient {
    fn catalog(&self) -> ExternalFunctionCatalogServiceClient<Channel> {
        ExternalFunctionCatalogServiceClient::new(self.channel())
    }

    fn queue_meta(&self) -> FunctionQueueMetaServiceClient<Channel> {
        FunctionQueueMetaServiceClient::new(self.channel())
    }

    async fn fn_get(&self, name: &str) -> anyhow::Result<GetExternalFunctionResponse> {
        let req = GetExternalFunctionRequest {
            function_name: Some(name.into()),
            include_active_schedule: Some(true),
            include_scaling_group: Some(true),
            include_deleted: Some(true),
            ..Default::default()
        };
        Ok(self.catalog().get_external_function(self.req(req)).await.map_err(status_error)?.into_inner())
    }

    /// `compute fn ls`.
    pub async fn fn_ls(&self, all: bool) -> anyhow::Result<()> {
        let req = ListExternalFunctionsRequest {
            limit: Some(1000),
            include_deleted: Some(all),
            include_scaling_group: Some(true),
            include_active_schedule: Some(true),
            ..Default::default()
        };
        let list = self.catalog().list_external_functions(self.req(req)).await.map_err(status_error)?.into_inner();
        if self.json() {
            let summary = "chalk.externalfunctioncatalog.v1.ExternalFunctionSummary";
            return self.finish_json(messages_json(summary, &list.functions)?);
        }
        println!(
            "{:<28} {:>7} {:<13} {:>7} {:<16} {:<20} URL",
            "NAME", "VERSION", "STATUS", "READY", "SCHEDULE", "CREATED"
        );
        for f in list.functions {
            let group = f.scaling_group.as_ref();
            let status = group.map(|g| g.status.clone()).unwrap_or_else(|| "deleted".into());
            let ready = group.map(|g| g.ready_replicas.to_string()).unwrap_or_else(|| "-".into());
            let url = group.and_then(|g| g.web_url.clone()).unwrap_or_default();
            let schedule = f.active_schedule.map(|s| s.cron).unwrap_or_else(|| "-".into());
            let created = f.created_at.map(|t| t.seconds).unwrap_or(0);
            println!(
                "{:<28} {:>7} {:<13} {:>7} {:<16} {:<20} {url}",
                f.name,
                f.current_version,
                status,
                ready,
                schedule,
                ago(created)
            );
        }
        Ok(())
    }

    /// `compute fn inspect NAME`.
    pub async fn fn_inspect(&self, name: &str) -> anyhow::Result<()> {
        let got = self.fn_get(name).await?;
        if self.json() {
            return self.fn_inspect_json(&got).await;
        }
        let f = got.external_function.unwrap_or_default();
        let current = f.current_version.as_ref().map(|v| v.version).unwrap_or_default();
        println!("{} ({})", f.name, f.id);
        println!("  version:  {current}");
        if let Some(s) = &got.active_schedule {
            println!("  schedule: {} (UTC)", s.cron);
        }
        let group = got.scaling_group.as_ref();
        match group {
            Some(g) => {
                println!("  group:    {} ({} {})", g.name, g.status, g.status_message.clone().unwrap_or_default());
                println!("  url:      {}", g.web_url.clone().unwrap_or_else(|| "-".into()));
                println!("  replicas: {} ready", g.ready_replicas);
            }
            None => println!("  group:    - (deleted)"),
        }
        if f.deleted_at.is_none() {
            let req = GetCallCountRequest { function_name: name.into() };
            let n = self.queue_meta().get_call_count(self.req(req)).await.map_err(status_error)?.into_inner().count;
            println!("  queue:    {n} call(s) waiting or running (compute fn runs {name})");
        }
        let req = ListExternalFunctionVersionsRequest {
            function_id: Some(f.id.clone()),
            limit: Some(100),
            include_deleted: Some(true),
            ..Default::default()
        };
        let versions = self.catalog().list_external_function_versions(self.req(req)).await.map_err(status_error)?;
        println!("  versions:");
        for e in versions.into_inner().entries {
            let v = e.external_function_version.unwrap_or_default();
            let mark = if v.version == current { "*" } else { " " };
            let created = v.created_at.map(|t| t.seconds).unwrap_or(0);
            println!(
                "    {mark} {:>3} {} {:<20} revision {}",
                v.version,
                v.id,
                ago(created),
                v.scaling_group_revision_id
            );
        }
        Ok(())
    }

    /// `compute fn inspect NAME -o json`: the function as GetExternalFunction answers, and its versions.
    async fn fn_inspect_json(&self, got: &GetExternalFunctionResponse) -> anyhow::Result<()> {
        let id = got.external_function.as_ref().map(|f| f.id.clone()).unwrap_or_default();
        let req = ListExternalFunctionVersionsRequest {
            function_id: Some(id),
            limit: Some(100),
            include_deleted: Some(true),
            ..Default::default()
        };
        let versions = self.catalog().list_external_function_versions(self.req(req)).await.map_err(status_error)?;
        let versions = message_json(
            "chalk.externalfunctioncatalog.v1.ListExternalFunctionVersionsResponse",
            &versions.into_inner(),
        )?;
        let function = message_json("chalk.externalfunctioncatalog.v1.GetExternalFunctionResponse", got)?;
        print_json(&serde_json::json!({ "function": function, "versions": versions["entries"] }))
    }

    /// `compute fn runs NAME`.
    pub async fn fn_runs(&self, name: &str, limit: u32) -> anyhow::Result<()> {
        let req = GetRecentCallsRequest { function_name: name.into(), limit, page_token: String::new() };
        let calls = self.queue_meta().get_recent_calls(self.req(req)).await.map_err(status_error)?.into_inner();
        println!("{:<30} {:<10} {:<20} RESULT", "CALL", "STATUS", "ENQUEUED");
        for c in calls.calls {
            let at = c.enqueued_at.map(|t| t.seconds).unwrap_or(0);
            println!("{:<30} {:<10} {:<20} {}", c.call_id, status_name(c.status), ago(at), c.result_summary);
        }
        Ok(())
    }

    /// `compute fn logs NAME`: each replica's log, followed while the function serves.
    pub async fn fn_logs(&self, data_dir: &Path, name: &str, follow: bool) -> anyhow::Result<()> {
        use std::io::{Read, Seek, Write};
        let mut offsets: std::collections::BTreeMap<String, u64> = Default::default();
        loop {
            let got = self.fn_get(name).await?;
            let group = got.scaling_group.as_ref();
            let replicas = group.map(crate::scaling_cli::replicas).unwrap_or_default();
            for r in &replicas {
                let path = data_dir.join("logs").join(format!("{r}.log"));
                let Ok(mut f) = std::fs::File::open(&path) else { continue };
                let offset = offsets.entry(r.clone()).or_insert(0);
                f.seek(std::io::SeekFrom::Start(*offset))?;
                let mut buf = Vec::new();
                f.read_to_end(&mut buf)?;
                if buf.is_empty() {
                    continue;
                }
                *offset += buf.len() as u64;
                let mut out = std::io::stdout().lock();
                writeln!(out, "==> replica {r} <==")?;
                out.write_all(&buf)?;
                out.flush()?;
            }
            if !follow || group.is_none() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// `compute fn rm NAME`.
    pub async fn fn_rm(&self, name: &str) -> anyhow::Result<()> {
        let req = DeleteExternalFunctionRequest { function_name: Some(name.into()), ..Default::default() };
        self.catalog().delete_external_function(self.req(req)).await.map_err(status_error)?;
        println!("deleted function {name}");
        Ok(())
    }
}
