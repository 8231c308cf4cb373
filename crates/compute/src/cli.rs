//! Command-line parsing and the small operator commands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use compute_control::{Control, ControlConfig};

use crate::client::{ApiClient, Format, Output};
use crate::runtime_file::{self, AdminCredentials};
use crate::settings::{self, Layer, Settings};

/// Compute: a self-hostable container runtime for agents, inference and data pipelines, wire-compatible with
/// the chalkcompute Python SDK.
#[derive(Parser, Debug)]
#[command(name = "compute", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

impl Format {
    /// A client of `dir`'s server that prints this way.
    async fn client(&self, dir: &DataDir) -> anyhow::Result<ApiClient> {
        Ok(ApiClient::connect(&dir.path()).await?.with_output(self.output))
    }
}

#[derive(Args, Debug, Clone)]
struct DataDir {
    /// Data directory (state store, credentials). Default: $XDG_DATA_HOME/compute or ~/.local/share/compute.
    #[arg(long, env = "COMPUTE_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
}

impl DataDir {
    fn path(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(settings::default_data_dir)
    }
}

#[derive(Args, Debug, Clone, Default)]
struct ServeFlags {
    /// Address to listen on [default: 127.0.0.1:8420].
    #[arg(long, env = "COMPUTE_LISTEN")]
    listen: Option<String>,
    /// PEM certificate chain: serve TLS (ALPN h2 and http/1.1) on the same port as cleartext.
    #[arg(long, env = "COMPUTE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "COMPUTE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "COMPUTE_LOG_FORMAT")]
    log_format: Option<String>,
    /// Largest RPC message accepted, e.g. 16MiB [default: 16MiB].
    #[arg(long, env = "COMPUTE_MAX_MESSAGE_SIZE")]
    max_message_size: Option<String>,
    /// Lifetime of issued access tokens, e.g. 365d, 12h [default: 365d].
    #[arg(long, env = "COMPUTE_TOKEN_TTL")]
    token_ttl: Option<String>,
    /// Sandbox isolation: native (namespaces, cgroups, seccomp) or gvisor (runsc, systrap).
    #[arg(long, env = "COMPUTE_ISOLATION")]
    isolation: Option<String>,
    /// Native sandboxes in user namespaces (root inside is an unprivileged host user) where the host supports
    /// them [default: true].
    #[arg(long, env = "COMPUTE_USER_NAMESPACE")]
    user_namespace: Option<bool>,
    /// Image store directory [default: DATA_DIR/images].
    #[arg(long, env = "COMPUTE_IMAGE_DIR")]
    image_dir: Option<PathBuf>,
    /// The compute-agent binary [default: next to this binary].
    #[arg(long, env = "COMPUTE_AGENT_BIN")]
    agent_bin: Option<PathBuf>,
    /// Memory limit of a sandbox whose spec sets none [default: 1Gi].
    #[arg(long, env = "COMPUTE_DEFAULT_MEMORY")]
    default_memory: Option<String>,
    /// Most processes (and threads) one sandbox may run at once [default: 4096].
    #[arg(long, env = "COMPUTE_PIDS_LIMIT")]
    pids_limit: Option<u64>,
    /// Volume object store: file:///path or an object store URL [default: DATA_DIR/volumes/objects].
    #[arg(long, env = "COMPUTE_VOLUME_STORE")]
    volume_store: Option<String>,
    /// Keep volume versions no ref points at for this long, e.g. 30d [default: forever].
    #[arg(long, env = "COMPUTE_VOLUME_RETENTION")]
    volume_retention: Option<String>,
    /// URL clients reach this server at, for signed volume URLs [default: the request's own host].
    #[arg(long, env = "COMPUTE_PUBLIC_URL")]
    public_url: Option<String>,
    /// DNS domain whose subdomains reach scaling groups: <group>.<environment>.<domain> [default: by path only].
    #[arg(long, env = "COMPUTE_INGRESS_DOMAIN")]
    ingress_domain: Option<String>,
    /// Longest run of one image build step, e.g. 30m [default: 30m].
    #[arg(long, env = "COMPUTE_BUILD_STEP_TIMEOUT")]
    build_step_timeout: Option<String>,
    /// Most client connections open at once [default: 4096].
    #[arg(long, env = "COMPUTE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// How far sandboxes' memory limits may add up past the node's memory, a factor [default: 2.0].
    #[arg(long, env = "COMPUTE_MEMORY_OVERCOMMIT")]
    memory_overcommit: Option<f64>,
    /// How long a client may take to send a request's headers, the first included, e.g. 10s [default: 10s].
    #[arg(long, env = "COMPUTE_REQUEST_HEADER_TIMEOUT")]
    request_header_timeout: Option<String>,
    /// Where Docker Hub names (python:3.13) are pulled from when no mirror is set for docker.io; "" refuses them
    /// [default: https://registry-1.docker.io].
    #[arg(long, env = "COMPUTE_DOCKER_HUB_ENDPOINT")]
    docker_hub_endpoint: Option<String>,
}

impl ServeFlags {
    fn layer(&self) -> Layer {
        Layer {
            listen: self.listen.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            log_format: self.log_format.clone(),
            max_message_size: self.max_message_size.clone(),
            token_ttl: self.token_ttl.clone(),
            isolation: self.isolation.clone(),
            user_namespace: self.user_namespace,
            image_dir: self.image_dir.clone(),
            agent_bin: self.agent_bin.clone(),
            default_memory: self.default_memory.clone(),
            pids_limit: self.pids_limit,
            image_aliases: None,
            volume_store: self.volume_store.clone(),
            volume_store_options: None,
            volume_retention: self.volume_retention.clone(),
            public_url: self.public_url.clone(),
            ingress_domain: self.ingress_domain.clone(),
            volume_url_ttl: None,
            build_step_timeout: self.build_step_timeout.clone(),
            image_providers: None,
            registry_mirrors: None,
            docker_hub_endpoint: self.docker_hub_endpoint.clone(),
            registry_credentials: None,
            insecure_registries: None,
            debian_mirror: None,
            max_connections: self.max_connections,
            memory_overcommit: self.memory_overcommit,
            request_header_timeout: self.request_header_timeout.clone(),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server on this machine (embedded defaults; settings from DATA_DIR/config.toml, COMPUTE_*, flags).
    Serve {
        #[command(flatten)]
        dir: DataDir,
        #[command(flatten)]
        flags: Box<ServeFlags>,
    },
    /// Print the `export` lines that point the SDK at this data directory's server: eval "$(compute env)".
    Env {
        /// Authenticate with a token written to this file (mode 0600) instead of the client secret: the SDK's
        /// web-identity mode, which `.defer()` needs (it then reaches the queue at CHALK_FUNCTION_QUEUE_ENDPOINT).
        /// The token lasts as long as the server's token lifetime (COMPUTE_TOKEN_TTL); run this again to renew it.
        #[arg(long, value_name = "PATH")]
        token_file: Option<PathBuf>,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Print a shell completion script: `compute completions bash > /etc/bash_completion.d/compute`, or for zsh
    /// `compute completions zsh > "${fpath[1]}/_compute"`, or `compute completions fish | source`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Is the server up; its version, address and what it holds.
    Status {
        #[command(flatten)]
        dir: DataDir,
    },
    /// Manage API clients (client id + secret).
    #[command(subcommand)]
    Client(ClientCommand),
    /// Manage environments (every resource belongs to exactly one).
    #[command(subcommand)]
    Environment(EnvironmentCommand),
    /// Manage the keys that sign access tokens.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Inspect and manage sandboxes (of the default environment).
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Inspect and manage containers (of the default environment).
    #[command(subcommand)]
    Container(ContainerCommand),
    /// Inspect and manage volumes (of the default environment): history, forks, diffs, rollback, GC.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Inspect and manage the node's images: built images, bases, layers.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Inspect and delete scaling groups (of the default environment): state, replicas, revisions.
    #[command(subcommand, name = "scaling-group", alias = "sg")]
    ScalingGroup(ScalingGroupCommand),
    /// Inspect functions (of the default environment): versions, replicas' output, deferred and scheduled runs.
    #[command(name = "fn", alias = "function")]
    Function {
        #[command(subcommand)]
        cmd: crate::function_cli::FunctionCommand,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Manage secrets (sealed at rest; values never shown): set, ls, rm, rotate-key.
    Secret {
        #[command(subcommand)]
        cmd: crate::secret_cli::SecretCommand,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Manage integrations: named bundles of keys (postgres, mysql, redis, s3, openai, generic).
    Integration {
        #[command(subcommand)]
        cmd: crate::secret_cli::IntegrationCommand,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Print a workload's entrypoint output, or an image build's step output (`build-…`).
    Logs {
        /// Sandbox or container id or name, or an image build id.
        name: String,
        /// Keep printing new output while the workload runs.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        dir: DataDir,
    },
}

#[derive(Subcommand, Debug)]
enum SandboxCommand {
    /// List live sandboxes (and containers, which are sandboxes too).
    Ls {
        /// Include finished ones.
        #[arg(short, long)]
        all: bool,
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Run a command in a sandbox and stream its output; exits with its exit code.
    Exec {
        /// Sandbox id or name.
        sandbox: String,
        /// Forward this terminal's stdin to the command.
        #[arg(short, long)]
        interactive: bool,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Terminate a sandbox.
    Rm {
        /// Sandbox id or name.
        sandbox: String,
        /// Seconds between SIGTERM and SIGKILL.
        #[arg(long, default_value_t = 10)]
        grace: u64,
        #[command(flatten)]
        dir: DataDir,
    },
}

#[derive(Subcommand, Debug)]
enum ScalingGroupCommand {
    /// List scaling groups with their status, ready and wanted replicas, and URL.
    Ls {
        /// Include deleted ones.
        #[arg(short, long)]
        all: bool,
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        dir: DataDir,
    },
    /// A group's state, replicas (their logs are `compute logs REPLICA`) and revisions.
    Inspect {
        /// Group name.
        group: String,
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Delete a group: it stops serving and its replicas stop.
    Rm {
        /// Group name.
        group: String,
        #[command(flatten)]
        dir: DataDir,
    },
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// List built images and bases, with their layers and sizes.
    Ls {
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        dir: DataDir,
    },
    /// An image's layers, config and where its base came from.
    Inspect {
        /// A built image's reference, a base reference (python:3.13-slim-trixie) or a base key from `ls`.
        reference: String,
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Forget an image (its layers go at the next gc).
    Rm {
        /// As for inspect.
        reference: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Resolve a reference to its layers, fetching its base if needed.
    Resolve {
        /// An image reference.
        reference: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Pull an image from its registry now, even if the store holds it (a tag that moved is updated).
    Pull {
        /// An image name: HOST[:PORT]/REPOSITORY[:TAG][@sha256:DIGEST], or a Docker Hub name.
        reference: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Import an image from an OCI archive (a tar of an OCI layout, e.g. `skopeo copy … oci-archive:FILE`), a
    /// `docker save` archive or an OCI layout directory, for machines with no registry. Workloads then use it by
    /// its name.
    Import {
        /// The archive (tar or tar.gz) or layout directory.
        file: std::path::PathBuf,
        /// The name to store it under, e.g. `myapp:1` (default: the name inside the archive).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Remove layers and bases no image or live workload uses.
    Gc {
        /// Keep what is younger than this many seconds (builds in progress) [default: 3600].
        #[arg(long)]
        grace: Option<u64>,
        #[command(flatten)]
        dir: DataDir,
    },
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// List volumes.
    Ls {
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        dir: DataDir,
    },
    /// List a volume's versions, newest first.
    Versions {
        /// Volume name.
        volume: String,
        /// Only the versions committed to this ref.
        #[arg(long = "ref")]
        r#ref: Option<String>,
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        dir: DataDir,
    },
    /// List the files of a volume's current version, or of NAME@VERSION.
    LsFiles {
        /// NAME or NAME@VERSION.
        volume: String,
        /// Only under this directory.
        #[arg(default_value = "")]
        path: String,
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Fork SRC (its current version, or SRC@VERSION) into a new volume DST; nothing is copied.
    Fork {
        /// NAME or NAME@VERSION.
        src: String,
        /// The new volume's name (or, with --ref, the new ref's).
        dst: String,
        /// Make a ref of SRC named DST instead of a new volume (what the SDK's Volume.fork does).
        #[arg(long = "ref")]
        as_ref: bool,
        #[command(flatten)]
        dir: DataDir,
    },
    /// The files added (+), modified (~) and removed (-) between two versions.
    Diff {
        /// Volume name.
        volume: String,
        /// The older version.
        from: u64,
        /// The newer version.
        to: u64,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Make a ref's content that of an earlier version again (as a new version; history is kept).
    Rollback {
        /// Volume name.
        volume: String,
        /// The version to go back to.
        #[arg(value_name = "VERSION")]
        to_version: u64,
        /// The ref to move.
        #[arg(long = "ref", default_value = "main")]
        r#ref: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Delete a volume with its versions.
    Rm {
        /// Volume name.
        volume: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Commit what a running sandbox wrote to its volume mounts (as fsync inside it, or its stop, would).
    Sync {
        /// Sandbox or container id or name.
        sandbox: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Delete objects and trees no version references (server-wide).
    Gc {
        /// Keep what is younger than this many seconds (uploads whose commit may still come) [default: 3600].
        #[arg(long)]
        grace: Option<u64>,
        #[command(flatten)]
        dir: DataDir,
    },
}

#[derive(Subcommand, Debug)]
enum ContainerCommand {
    /// List live containers.
    Ls {
        /// Include stopped ones.
        #[arg(short, long)]
        all: bool,
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Stop a container.
    Stop {
        /// Container id or name.
        container: String,
        /// Seconds between SIGTERM and SIGKILL.
        #[arg(long, default_value_t = 10)]
        grace: u64,
        #[command(flatten)]
        dir: DataDir,
    },
}

#[derive(Subcommand, Debug)]
enum ClientCommand {
    /// Create a client and print its credentials (the secret is shown only now).
    Create {
        /// A label for the client.
        name: String,
        /// Its primary environment (id or name).
        #[arg(long, default_value = compute_control::DEFAULT_ENVIRONMENT)]
        environment: String,
        /// Allow tokens for every environment, not just the primary one.
        #[arg(long)]
        all_environments: bool,
        #[command(flatten)]
        dir: DataDir,
    },
    /// List clients.
    Ls {
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Revoke a client: its secret and every token it holds stop working.
    Revoke {
        /// Client id.
        client_id: String,
        #[command(flatten)]
        dir: DataDir,
    },
}

#[derive(Subcommand, Debug)]
enum EnvironmentCommand {
    /// Create an environment.
    Create {
        /// Its name (lowercase letters, digits, '-').
        name: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// List environments.
    Ls {
        #[command(flatten)]
        format: Format,
        #[command(flatten)]
        dir: DataDir,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Start signing tokens with a new key. Old tokens stay valid unless --retire-previous.
    Rotate {
        /// Stop accepting tokens signed by every older key, now.
        #[arg(long)]
        retire_previous: bool,
        #[command(flatten)]
        dir: DataDir,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compute: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { dir, flags } => {
            let data_dir = dir.path();
            let layer = flags.layer().over(Layer::from_file(&data_dir)?);
            let settings = Settings::resolve(layer)?;
            init_logging(settings.json_logs);
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(crate::serve::run(&data_dir, settings))
        }
        Command::Env { token_file, dir } => env(&dir.path(), token_file.as_deref()),
        Command::Status { dir } => status(&dir.path()),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            use std::io::Write;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "compute", &mut script);
            match std::io::stdout().write_all(&script) {
                // `compute completions bash | head` is not an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                other => Ok(other?),
            }
        }
        Command::Client(c) => client(c),
        Command::Secret { cmd, dir } => crate::secret_cli::secret(&open_control(&dir.path())?, cmd),
        Command::Integration { cmd, dir } => crate::secret_cli::integration(&open_control(&dir.path())?, cmd),
        Command::Environment(c) => environment(c),
        Command::Sandbox(c) => block_on(async {
            match c {
                SandboxCommand::Ls { all, format, dir } => format.client(&dir).await?.list_sandboxes(all).await,
                SandboxCommand::Rm { sandbox, grace, dir } => {
                    ApiClient::connect(&dir.path()).await?.stop(&sandbox, grace).await
                }
                SandboxCommand::Exec { sandbox, interactive, command, dir } => {
                    let code = ApiClient::connect(&dir.path()).await?.exec(&sandbox, &command, interactive).await?;
                    std::process::exit(code);
                }
            }
        }),
        Command::Container(c) => block_on(async {
            match c {
                ContainerCommand::Ls { all, format, dir } => format.client(&dir).await?.list_containers(all).await,
                ContainerCommand::Stop { container, grace, dir } => {
                    ApiClient::connect(&dir.path()).await?.stop(&container, grace).await
                }
            }
        }),
        Command::Volume(c) => block_on(async {
            match c {
                VolumeCommand::Ls { format, dir } => format.client(&dir).await?.volume_ls().await,
                VolumeCommand::Versions { volume, r#ref, format, dir } => {
                    format.client(&dir).await?.volume_versions(&volume, r#ref).await
                }
                VolumeCommand::LsFiles { volume, path, format, dir } => {
                    format.client(&dir).await?.volume_ls_files(&volume, &path).await
                }
                VolumeCommand::Fork { src, dst, as_ref, dir } => {
                    ApiClient::connect(&dir.path()).await?.volume_fork(&src, &dst, as_ref).await
                }
                VolumeCommand::Diff { volume, from, to, dir } => {
                    ApiClient::connect(&dir.path()).await?.volume_diff(&volume, from, to).await
                }
                VolumeCommand::Rollback { volume, to_version, r#ref, dir } => {
                    ApiClient::connect(&dir.path()).await?.volume_rollback(&volume, to_version, &r#ref).await
                }
                VolumeCommand::Rm { volume, dir } => ApiClient::connect(&dir.path()).await?.volume_rm(&volume).await,
                VolumeCommand::Sync { sandbox, dir } => {
                    ApiClient::connect(&dir.path()).await?.volume_sync(&sandbox).await
                }
                VolumeCommand::Gc { grace, dir } => ApiClient::connect(&dir.path()).await?.volume_gc(grace).await,
            }
        }),
        Command::ScalingGroup(c) => block_on(async {
            match c {
                ScalingGroupCommand::Ls { all, format, dir } => format.client(&dir).await?.scaling_group_ls(all).await,
                ScalingGroupCommand::Inspect { group, format, dir } => {
                    format.client(&dir).await?.scaling_group_inspect(&group).await
                }
                ScalingGroupCommand::Rm { group, dir } => {
                    ApiClient::connect(&dir.path()).await?.scaling_group_rm(&group).await
                }
            }
        }),
        Command::Function { cmd, dir } => block_on(crate::function_cli::function(&dir.path(), cmd)),
        Command::Image(c) => block_on(async {
            match c {
                ImageCommand::Ls { format, dir } => format.client(&dir).await?.image_ls().await,
                ImageCommand::Inspect { reference, format, dir } => {
                    format.client(&dir).await?.image_inspect(&reference).await
                }
                ImageCommand::Rm { reference, dir } => {
                    ApiClient::connect(&dir.path()).await?.image_rm(&reference).await
                }
                ImageCommand::Resolve { reference, dir } => {
                    ApiClient::connect(&dir.path()).await?.image_resolve(&reference).await
                }
                ImageCommand::Pull { reference, dir } => {
                    ApiClient::connect(&dir.path()).await?.image_pull(&reference).await
                }
                ImageCommand::Import { file, name, dir } => {
                    ApiClient::connect(&dir.path()).await?.image_import(&file, name.as_deref()).await
                }
                ImageCommand::Gc { grace, dir } => ApiClient::connect(&dir.path()).await?.image_gc(grace).await,
            }
        }),
        Command::Logs { name, follow, dir } => block_on(logs(&dir.path(), &name, follow)),
        Command::Key(KeyCommand::Rotate { retire_previous, dir }) => {
            let control = open_control(&dir.path())?;
            let kid = control.auth().rotate_signing_key(retire_previous)?;
            println!("new signing key {kid}{}", if retire_previous { "; older keys retired" } else { "" });
            Ok(())
        }
    }
}

fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

/// Prints a workload's entrypoint output (kept in the data directory), following it while it runs.
async fn logs(data_dir: &std::path::Path, name: &str, follow: bool) -> anyhow::Result<()> {
    use std::io::{Read, Seek, Write};
    let client = ApiClient::connect(data_dir).await?;
    if name.starts_with("build-") {
        return build_logs(&client, data_dir, name, follow).await;
    }
    let (id, _) = client.resolve(name).await?;
    let path = data_dir.join("logs").join(format!("{id}.log"));
    let mut offset = 0u64;
    loop {
        if let Ok(mut f) = std::fs::File::open(&path) {
            f.seek(std::io::SeekFrom::Start(offset))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            offset += buf.len() as u64;
            std::io::stdout().write_all(&buf)?;
            std::io::stdout().flush()?;
        }
        if !follow {
            return Ok(());
        }
        let (_, status) = client.resolve(&id).await?;
        if !(status == "Running" || status == "Pending") {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// `compute logs build-…`: the output of an image build's steps, in order (each step ran in its own build
/// sandbox with its own log), followed while the build runs.
async fn build_logs(
    client: &ApiClient,
    data_dir: &std::path::Path,
    build_id: &str,
    follow: bool,
) -> anyhow::Result<()> {
    use std::io::{Read, Seek, Write};
    let dir = data_dir.join("logs").join("builds");
    let prefix = format!("{build_id}-");
    let mut offsets: std::collections::HashMap<std::path::PathBuf, u64> = Default::default();
    // The status first: an unknown build id is an error, not an empty log.
    let mut status = client.build_status(build_id).await?;
    loop {
        let mut steps: Vec<(usize, i64, std::path::PathBuf)> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let rest = name.strip_prefix(&prefix)?.strip_suffix(".log")?;
                let step: usize = rest.split('-').next()?.parse().ok()?;
                let mtime = e.metadata().ok()?.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
                Some((step, mtime as i64, e.path()))
            })
            .collect();
        steps.sort();
        for (step, _, path) in steps {
            let offset = offsets.entry(path.clone()).or_insert(0);
            let Ok(mut f) = std::fs::File::open(&path) else { continue };
            f.seek(std::io::SeekFrom::Start(*offset))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            if *offset == 0 {
                println!("--- step {} ---", step + 1);
            }
            *offset += buf.len() as u64;
            std::io::stdout().write_all(&buf)?;
            std::io::stdout().flush()?;
        }
        if !follow || status != "building" {
            if status == "failed" {
                eprintln!("compute: build {build_id} failed");
            }
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        status = client.build_status(build_id).await?;
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COMPUTE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Opens the control plane of a data directory that a server has already initialised.
fn open_control(data_dir: &std::path::Path) -> anyhow::Result<Control> {
    if !data_dir.join("state.db").exists() {
        anyhow::bail!(
            "no Compute data directory at {}: run `compute serve` first (or pass --data-dir)",
            data_dir.display()
        );
    }
    let (control, _) = Control::open(data_dir, ControlConfig::from_env())?;
    Ok(control)
}

fn env(data_dir: &std::path::Path, token_file: Option<&std::path::Path>) -> anyhow::Result<()> {
    let creds: AdminCredentials =
        runtime_file::read_json(&runtime_file::credentials_path(data_dir))?.with_context(|| {
            format!("no admin credentials in {}: run `compute serve` first (or pass --data-dir)", data_dir.display())
        })?;
    let url = match runtime_file::running_server(data_dir)? {
        Some(info) => info.url,
        None => {
            let settings = Settings::resolve(
                Layer { listen: std::env::var("COMPUTE_LISTEN").ok(), ..Default::default() }
                    .over(Layer::from_file(data_dir)?),
            )?;
            eprintln!("# note: no server is running on {}; showing its configured address", data_dir.display());
            runtime_file::client_url(settings.listen)
        }
    };
    println!("export CHALK_API_SERVER={url}");
    match token_file {
        None => {
            println!("export CHALK_CLIENT_ID={}", creds.client_id);
            println!("export CHALK_CLIENT_SECRET={}", creds.client_secret);
        }
        Some(path) => {
            let control = open_control(data_dir)?;
            let token = control.auth().get_token(&creds.client_id, &creds.client_secret, "", None)?;
            runtime_file::write_private(path, token.access_token.as_bytes())
                .with_context(|| format!("writing the token to {}", path.display()))?;
            let path = std::path::absolute(path)?;
            println!("export CHALK_WEB_IDENTITY_TOKEN_FILE={}", path.display());
            println!("unset CHALK_CLIENT_ID CHALK_CLIENT_SECRET");
            eprintln!(
                "# the token in {} expires in {} s; run this again to renew it",
                path.display(),
                token.expires_in
            );
        }
    }
    // Deferred calls (`.defer()`) go to the queue this server serves (the SDK reads it in web-identity mode).
    println!("export CHALK_FUNCTION_QUEUE_ENDPOINT={url}");
    Ok(())
}

fn status(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let Some(info) = runtime_file::running_server(data_dir)? else {
        println!("server: not running (data directory {})", data_dir.display());
        std::process::exit(3);
    };
    let healthy = probe_health(&info.listen);
    let uptime_s = (compute_store::now_millis() - info.started_at).max(0) / 1000;
    println!("server:      {} (pid {}, up {}s)", if healthy { "up" } else { "NOT RESPONDING" }, info.pid, uptime_s);
    println!("version:     {}", info.version);
    println!("address:     {}{}", info.url, if info.tls { " (TLS also served)" } else { "" });
    println!("data dir:    {}", data_dir.display());
    let control = open_control(data_dir)?;
    let envs = control.environments()?;
    let clients = control.auth().clients()?;
    println!("environments: {}", envs.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", "));
    println!("clients:     {} ({} revoked)", clients.len(), clients.iter().filter(|c| c.revoked_at.is_some()).count());
    let live = control.store().read(|r| r.sandboxes().live()).unwrap_or_default();
    println!("running:     {} live workload(s)", live.len());
    for w in live.iter().take(20) {
        println!("             {} {} ({}, {})", w.id, w.name, w.kind, w.status.as_str());
    }
    if !healthy {
        std::process::exit(1);
    }
    Ok(())
}

/// `GET /healthz` over a plain TCP connection.
fn probe_health(listen: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(addr) = listen.parse::<std::net::SocketAddr>() else {
        return false;
    };
    let addr =
        if addr.ip().is_unspecified() { std::net::SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: compute\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200")
}

fn client(cmd: ClientCommand) -> anyhow::Result<()> {
    match cmd {
        ClientCommand::Create { name, environment, all_environments, dir } => {
            let control = open_control(&dir.path())?;
            let creds = control.auth().create_client(&name, &environment, all_environments)?;
            println!("client_id:     {}", creds.client_id);
            println!("client_secret: {}", creds.client_secret);
            println!("environment:   {}", creds.environment_id);
            println!("# the secret is not stored and cannot be shown again");
        }
        ClientCommand::Ls { format, dir } => {
            let control = open_control(&dir.path())?;
            let envs = control.environments()?;
            if format.output == Output::Json {
                let items = control.auth().clients()?.into_iter().map(|c| {
                    serde_json::json!({ "clientId": c.id, "name": c.name, "environmentId": c.environment_id,
                        "allEnvironments": c.all_environments, "revoked": c.revoked_at.is_some() })
                });
                return crate::client::print_json(&serde_json::Value::Array(items.collect()));
            }
            println!("{:<24} {:<20} {:<16} {:<8} STATUS", "CLIENT ID", "NAME", "ENVIRONMENT", "SCOPE");
            for c in control.auth().clients()? {
                let env = envs
                    .iter()
                    .find(|e| e.id == c.environment_id)
                    .map_or(c.environment_id.as_str(), |e| e.name.as_str());
                println!(
                    "{:<24} {:<20} {:<16} {:<8} {}",
                    c.id,
                    c.name,
                    env,
                    if c.all_environments { "all" } else { "primary" },
                    if c.revoked_at.is_some() { "revoked" } else { "active" }
                );
            }
        }
        ClientCommand::Revoke { client_id, dir } => {
            let control = open_control(&dir.path())?;
            control.auth().revoke_client(&client_id)?;
            println!("revoked {client_id}");
        }
    }
    Ok(())
}

fn environment(cmd: EnvironmentCommand) -> anyhow::Result<()> {
    match cmd {
        EnvironmentCommand::Create { name, dir } => {
            let control = open_control(&dir.path())?;
            let env = control.create_environment(&name)?;
            println!("{}\t{}", env.id, env.name);
        }
        EnvironmentCommand::Ls { format, dir } => {
            let control = open_control(&dir.path())?;
            if format.output == Output::Json {
                let items =
                    control.environments()?.into_iter().map(|e| serde_json::json!({ "id": e.id, "name": e.name }));
                return crate::client::print_json(&serde_json::Value::Array(items.collect()));
            }
            println!("{:<20} NAME", "ID");
            for e in control.environments()? {
                println!("{:<20} {}", e.id, e.name);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
