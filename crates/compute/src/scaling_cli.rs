//! `compute scaling-group …` (alias `sg`): the scaling groups of the admin client's environment, through the
//! running server's ScalingGroupManagerService, as the SDK sees them.

use compute_proto::chalk::scalinggroup::v1::list_scaling_group_revisions_request::ScalingGroupKey;
use compute_proto::chalk::scalinggroup::v1::scaling_group_manager_service_client::ScalingGroupManagerServiceClient;
use compute_proto::chalk::scalinggroup::v1::{
    DeleteScalingGroupRequest, GetScalingGroupRequest, ListScalingGroupRevisionsRequest, ListScalingGroupsRequest,
    ScalingGroupResponse,
};

use crate::client::{ago, message_json, messages_json, print_json, status_error, ApiClient};

fn number(g: &ScalingGroupResponse, key: &str) -> i64 {
    match g.metadata.get(key).and_then(|v| v.kind.as_ref()) {
        Some(prost_types::value::Kind::NumberValue(n)) => *n as i64,
        _ => 0,
    }
}

pub(crate) fn replicas(g: &ScalingGroupResponse) -> Vec<String> {
    match g.metadata.get("replicas").and_then(|v| v.kind.as_ref()) {
        Some(prost_types::value::Kind::ListValue(l)) => l
            .values
            .iter()
            .filter_map(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

impl ApiClient {
    fn groups(&self) -> ScalingGroupManagerServiceClient<tonic::transport::Channel> {
        ScalingGroupManagerServiceClient::new(self.channel())
    }

    /// `compute scaling-group ls`.
    pub async fn scaling_group_ls(&self, all: bool) -> anyhow::Result<()> {
        let req = ListScalingGroupsRequest { limit: Some(1000), include_deleted: Some(all), ..Default::default() };
        let list = self.groups().list_scaling_groups(self.req(req)).await.map_err(status_error)?.into_inner();
        if self.json() {
            return self
                .finish_json(messages_json("chalk.scalinggroup.v1.ScalingGroupResponse", &list.scaling_groups)?);
        }
        println!("{:<22} {:<24} {:<13} {:>7} {:<20} URL", "ID", "NAME", "STATUS", "READY", "CREATED");
        for g in list.scaling_groups {
            let ready = format!("{}/{}", g.ready_replicas, number(&g, "desired_replicas"));
            let created = g.created_at.map(|t| t.seconds).unwrap_or(0);
            let url = g.web_url.clone().unwrap_or_default();
            println!("{:<22} {:<24} {:<13} {:>7} {:<20} {url}", g.id, g.name, g.status, ready, ago(created));
        }
        Ok(())
    }

    /// `compute scaling-group inspect NAME`: its state, replicas and revisions.
    pub async fn scaling_group_inspect(&self, name: &str) -> anyhow::Result<()> {
        let req = GetScalingGroupRequest { name: Some(name.into()), include_deleted: Some(true), ..Default::default() };
        let g = self
            .groups()
            .get_scaling_group(self.req(req))
            .await
            .map_err(status_error)?
            .into_inner()
            .scaling_group
            .unwrap_or_default();
        let req = ListScalingGroupRevisionsRequest {
            scaling_group_key: Some(ScalingGroupKey::ScalingGroupId(g.id.clone())),
            limit: Some(100),
            include_deleted: Some(true),
            ..Default::default()
        };
        let revs = self.groups().list_scaling_group_revisions(self.req(req)).await.map_err(status_error)?.into_inner();
        if self.json() {
            let revisions = messages_json("chalk.scalinggroup.v1.ScalingGroupRevisionResponse", &revs.revisions)?;
            let group = message_json("chalk.scalinggroup.v1.ScalingGroupResponse", &g)?;
            return print_json(&serde_json::json!({ "scalingGroup": group, "revisions": revisions }));
        }
        println!("{} ({})", g.name, g.id);
        println!("  status:   {} {}", g.status, g.status_message.clone().unwrap_or_default());
        if let Some(d) = g.status_details.as_deref().filter(|d| !d.is_empty()) {
            println!("  details:\n    {}", d.replace('\n', "\n    "));
        }
        println!("  url:      {}", g.web_url.clone().unwrap_or_else(|| "-".into()));
        println!("  replicas: {} ready of {} wanted", g.ready_replicas, number(&g, "desired_replicas"));
        for r in replicas(&g) {
            println!("            {r}  (compute logs {r})");
        }
        println!("  revisions:");
        for rev in revs.revisions {
            let image = rev.spec.as_ref().and_then(|s| s.container_spec.as_ref()).map(|c| c.image.clone());
            let created = rev.created_at.map(|t| t.seconds).unwrap_or(0);
            let mark = if rev.latest { "*" } else { " " };
            println!("    {mark} {} {:<11} {:<20} {}", rev.id, rev.status, ago(created), image.unwrap_or_default());
        }
        Ok(())
    }

    /// `compute scaling-group rm NAME`: deletes it once its replicas stopped.
    pub async fn scaling_group_rm(&self, name: &str) -> anyhow::Result<()> {
        let req = DeleteScalingGroupRequest { name: Some(name.into()), ..Default::default() };
        let g = self.groups().delete_scaling_group(self.req(req)).await.map_err(status_error)?.into_inner();
        println!("deleted scaling group {name} ({})", g.scaling_group.map(|g| g.id).unwrap_or_default());
        Ok(())
    }
}
