//! `compute image …`: the node's image store, through the running server (which knows what live workloads use).

use serde_json::{json, Value};

use compute_control::quantity::format_bytes as size;

use crate::client::{ago, print_json, ApiClient};

/// A pull's progress as it goes: a bar when stdout is a terminal, a line per stored layer otherwise.
enum PullDisplay {
    Bar(indicatif::ProgressBar),
    Lines { layers_done: usize, last: compute_image::ProgressView },
}

impl PullDisplay {
    fn new(reference: &str) -> Self {
        use std::io::IsTerminal;
        if !std::io::stdout().is_terminal() {
            return PullDisplay::Lines { layers_done: 0, last: Default::default() };
        }
        let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stdout());
        let style = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:32.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("the template is valid")
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(format!("pulling {reference}"));
        PullDisplay::Bar(bar)
    }

    fn update(&mut self, p: compute_image::ProgressView) {
        match self {
            PullDisplay::Bar(bar) => {
                if p.bytes_total > 0 {
                    bar.set_length(p.bytes_total);
                }
                bar.set_position(p.bytes_done.min(p.bytes_total.max(p.bytes_done)));
            }
            PullDisplay::Lines { layers_done, last } => {
                *last = p;
                while *layers_done < p.layers_done {
                    *layers_done += 1;
                    println!(
                        "layer {}/{} stored ({} of {})",
                        layers_done,
                        p.layers_total,
                        size(p.bytes_done),
                        size(p.bytes_total)
                    );
                }
            }
        }
    }

    /// The pull ended; when it stored `layers` layers, whatever the last look missed is shown as done.
    fn finish(mut self, layers: Option<usize>) {
        match (&mut self, layers) {
            (PullDisplay::Bar(bar), Some(_)) => bar.finish_and_clear(),
            (PullDisplay::Bar(bar), None) => bar.abandon(),
            (PullDisplay::Lines { last, .. }, Some(n)) => {
                let total = last.bytes_total.max(last.bytes_done);
                let done = compute_image::ProgressView {
                    layers_total: n,
                    layers_done: n,
                    bytes_total: total,
                    bytes_done: total,
                };
                self.update(done);
            }
            (PullDisplay::Lines { .. }, None) => {}
        }
    }
}

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
        let pull = self.admin("images/pull", json!({ "reference": reference }));
        tokio::pin!(pull);
        let mut shown = PullDisplay::new(reference);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(150));
        let out = loop {
            tokio::select! {
                out = &mut pull => break out,
                _ = tick.tick() => {
                    let progress = self.admin("images/pull-progress", json!({ "reference": reference })).await;
                    if let Some(view) = progress.ok().and_then(|p| serde_json::from_value(p["progress"].clone()).ok()) {
                        shown.update(view);
                    }
                }
            }
        };
        shown.finish(out.as_ref().ok().map(|o| o["layers"].as_array().map(Vec::len).unwrap_or(0)));
        let out = out?;
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
