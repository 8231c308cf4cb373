//! `compute image …`: the node's image store, through the running server (which knows what live workloads use).

use serde_json::{json, Value};

use compute_control::quantity::format_bytes as size;

use crate::client::{ago, print_json, ApiClient};

fn short(reference: &str) -> String {
    match reference.strip_prefix(compute_image::BUILT_PREFIX) {
        Some(key) => format!("{}{}", compute_image::BUILT_PREFIX, &key[..key.len().min(16)]),
        None => reference.to_string(),
    }
}

impl ApiClient {
    /// `compute image ls`.
    pub async fn image_ls(&self) -> anyhow::Result<()> {
        let out = self.admin("images/ls", json!({})).await?;
        if self.json() {
            return print_json(&out["images"]);
        }
        println!("{:<6} {:<48} {:>7} {:>11} CREATED", "KIND", "REFERENCE", "LAYERS", "SIZE");
        for i in out["images"].as_array().into_iter().flatten() {
            println!(
                "{:<6} {:<48} {:>7} {:>11} {}",
                i["kind"].as_str().unwrap_or(""),
                short(i["reference"].as_str().unwrap_or("")),
                i["layers"].as_array().map(Vec::len).unwrap_or(0),
                size(i["size_bytes"].as_u64().unwrap_or(0)),
                ago(i["created"].as_i64().unwrap_or(0)),
            );
        }
        Ok(())
    }

    /// `compute image inspect REF`.
    pub async fn image_inspect(&self, reference: &str) -> anyhow::Result<()> {
        let out = self.admin("images/inspect", json!({ "reference": reference })).await?;
        if self.json() {
            return print_json(&out);
        }
        let i = &out["image"];
        println!("reference:  {}", i["reference"].as_str().unwrap_or(""));
        println!("kind:       {}", i["kind"].as_str().unwrap_or(""));
        println!("size:       {}", size(i["size_bytes"].as_u64().unwrap_or(0)));
        if let Some(a) = out["alias"].as_str() {
            println!("alias:      {reference} -> {a} (operator alias)");
        }
        println!("provenance: {}", i["provenance"].as_str().unwrap_or("").trim());
        println!("layers (top first):");
        for l in i["layers"].as_array().into_iter().flatten() {
            println!("  {}", l.as_str().unwrap_or(""));
        }
        if out["config"] != Value::Null {
            println!("config:     {}", serde_json::to_string(&out["config"])?);
        }
        Ok(())
    }

    /// `compute image rm REF`.
    pub async fn image_rm(&self, reference: &str) -> anyhow::Result<()> {
        let out = self.admin("images/rm", json!({ "reference": reference })).await?;
        println!(
            "removed {} (its layers go at the next `compute image gc`)",
            out["removed"]["reference"].as_str().unwrap_or(reference)
        );
        Ok(())
    }

    /// `compute image resolve REF`.
    pub async fn image_resolve(&self, reference: &str) -> anyhow::Result<()> {
        let out = self.admin("images/resolve", json!({ "reference": reference })).await?;
        println!("{}", out["reference"].as_str().unwrap_or(reference));
        println!("provenance: {}", out["provenance"].as_str().unwrap_or("").trim());
        for l in out["layers"].as_array().into_iter().flatten() {
            println!("  {}", l.as_str().unwrap_or(""));
        }
        Ok(())
    }

    /// `compute image pull REF`.
    pub async fn image_pull(&self, reference: &str) -> anyhow::Result<()> {
        let out = self.admin("images/pull", json!({ "reference": reference })).await?;
        println!("pulled {}", out["reference"].as_str().unwrap_or(reference));
        println!("provenance: {}", out["provenance"].as_str().unwrap_or("").trim());
        Ok(())
    }

    /// `compute image import FILE [--name NAME]`.
    pub async fn image_import(&self, file: &std::path::Path, name: Option<&str>) -> anyhow::Result<()> {
        use anyhow::Context;
        let path = file.canonicalize().with_context(|| format!("{}", file.display()))?;
        let out = self.admin("images/import", json!({ "path": path, "name": name })).await?;
        println!(
            "imported {} ({} layers, manifest {})",
            out["reference"].as_str().unwrap_or(""),
            out["layers"].as_array().map(Vec::len).unwrap_or(0),
            out["manifest_digest"].as_str().unwrap_or("")
        );
        Ok(())
    }

    /// `compute image gc`.
    pub async fn image_gc(&self, grace_seconds: Option<u64>) -> anyhow::Result<()> {
        let r = self.admin("images/gc", json!({ "grace_seconds": grace_seconds })).await?;
        println!(
            "removed {} layers and {} bases, {} freed",
            r["layers_removed"],
            r["bases_removed"],
            size(r["bytes_freed"].as_u64().unwrap_or(0))
        );
        Ok(())
    }
}
