//! Image recipes: a base, build steps and config, content-addressed. Each step's layer key is the hash of its
//! parent's key and the step, so identical prefixes share layers and a change to step k rebuilds k..n only.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One build step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// Shell commands, run in order; the first failure fails the step.
    RunCommands(Vec<String>),
    /// Shell commands run as a user (a Dockerfile `RUN` after `USER`).
    RunCommandsAs {
        /// `name`, `uid`, `name:group` or `uid:gid`.
        user: String,
        /// The commands.
        commands: Vec<String>,
    },
    /// `pip install` of these requirement specifiers.
    PipInstall(Vec<String>),
    /// `uv pip install --system` of these requirement specifiers (uv is installed first if the image lacks it).
    UvPipInstall(Vec<String>),
    /// The locked dependencies of a uv project (its `pyproject.toml` and, when given, `uv.lock`) installed into the
    /// image's Python; the project itself (whose source is not sent) is not installed.
    UvSync {
        /// `pyproject.toml`.
        pyproject: Vec<u8>,
        /// `uv.lock`, when given (then the install is exactly the lock's).
        lock: Option<Vec<u8>>,
        /// Optional dependency groups (`[project.optional-dependencies]`) to include.
        extras: Vec<String>,
        /// Where the project files are written (absolute).
        workdir: String,
    },
    /// `COPY --from=IMAGE SRC... DEST`: paths of another image copied into this one.
    CopyFrom {
        /// The image the paths come from (any reference the store can provide).
        image: String,
        /// Paths in that image.
        sources: Vec<String>,
        /// Where they go (absolute; a directory when it ends in `/` or there are several sources).
        dest: String,
        /// `--chown=UID:GID`, numeric.
        chown: Option<(u32, u32)>,
        /// `--chmod=MODE`.
        chmod: Option<u32>,
    },
    /// A file with inline content.
    AddFile {
        /// Absolute destination path.
        destination: String,
        /// Its bytes.
        content: Vec<u8>,
        /// Permission bits (0644 when absent).
        mode: Option<u32>,
    },
}

impl Step {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::RunCommands(_) | Step::RunCommandsAs { .. } => "run_commands",
            Step::PipInstall(_) => "pip_install",
            Step::UvPipInstall(_) => "uv_pip_install",
            Step::UvSync { .. } => "uv_sync",
            Step::AddFile { .. } => "add_file",
            Step::CopyFrom { .. } => "dockerfile_commands (COPY --from)",
        }
    }
}

/// What an image is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipe {
    /// Base image reference.
    pub base: String,
    /// Steps, in order.
    pub steps: Vec<Step>,
    /// Environment over the base's.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub workdir: Option<String>,
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Default command.
    pub cmd: Vec<String>,
    /// The user the image's processes run as (Dockerfile `USER`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

fn hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl Recipe {
    /// The layer key of every step, given the base's key.
    pub fn layer_keys(&self, base_key: &str) -> Vec<String> {
        let mut parent = base_key.to_string();
        self.steps
            .iter()
            .map(|step| {
                let step_json = serde_json::to_vec(step).expect("steps serialize");
                parent = hash(&[parent.as_bytes(), &step_json]);
                parent.clone()
            })
            .collect()
    }

    /// The image's key: its last layer's key and its config.
    pub fn image_key(&self, base_key: &str) -> String {
        let last = self.layer_keys(base_key).pop().unwrap_or_else(|| base_key.to_string());
        let mut env = self.env.clone();
        env.sort();
        let config =
            serde_json::to_vec(&(&env, &self.workdir, &self.entrypoint, &self.cmd)).expect("config serializes");
        match &self.user {
            // Keys of images without a USER stay what they were before images could have one.
            None => hash(&[last.as_bytes(), &config]),
            Some(user) => hash(&[last.as_bytes(), &config, b"user", user.as_bytes()]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(steps: Vec<Step>) -> Recipe {
        Recipe { base: "python:3.13-slim-trixie".into(), steps, ..Default::default() }
    }

    #[test]
    fn same_spec_same_key_and_prefixes_share_layers() {
        let a = recipe(vec![Step::PipInstall(vec!["flask".into()]), Step::RunCommands(vec!["echo 1".into()])]);
        let b = recipe(vec![Step::PipInstall(vec!["flask".into()]), Step::RunCommands(vec!["echo 2".into()])]);
        assert_eq!(a.image_key("base"), a.clone().image_key("base"));
        assert_ne!(a.image_key("base"), b.image_key("base"));
        let (ka, kb) = (a.layer_keys("base"), b.layer_keys("base"));
        assert_eq!(ka[0], kb[0], "the unchanged first step is shared");
        assert_ne!(ka[1], kb[1]);
        assert_ne!(a.layer_keys("other-base")[0], ka[0], "a different base changes every layer");
    }

    #[test]
    fn config_changes_the_image_not_the_layers() {
        let a = recipe(vec![Step::RunCommands(vec!["true".into()])]);
        let mut b = a.clone();
        b.env.push(("A".into(), "1".into()));
        assert_eq!(a.layer_keys("x"), b.layer_keys("x"));
        assert_ne!(a.image_key("x"), b.image_key("x"));
    }
}
