//! `chalk.sandbox.v1.CustomImageService`: content-addressed image builds.

use std::sync::Arc;

use compute_control::{BuildStatus, Builds};
use compute_image::{Recipe, Step};
use compute_proto::chalk::sandbox::v1::build_step::Step as WireStep;
use compute_proto::chalk::sandbox::v1::custom_image_service_server::CustomImageService;
use compute_proto::chalk::sandbox::v1::*;
use tonic::{Request, Response, Status};

use super::principal;
use crate::status::from_control;

/// The CustomImageService handler.
pub struct ImageApi {
    builds: Arc<Builds>,
}

impl ImageApi {
    /// A handler over `builds`.
    pub fn new(builds: Arc<Builds>) -> Self {
        Self { builds }
    }
}

/// Build-time state that Dockerfile instructions carry from one RUN to the next.
#[derive(Default)]
struct DockerState {
    exports: Vec<(String, String)>,
    workdir: Option<String>,
    /// The Dockerfile `USER` in force (RUN steps and the image's processes run as it).
    user: Option<String>,
}

impl DockerState {
    /// A RUN command with the ARG/ENV values and WORKDIR in force.
    fn script(&self, command: &str) -> String {
        let mut s = String::new();
        for (k, v) in &self.exports {
            s.push_str(&format!("export {k}={}\n", shell_quote(v)));
        }
        if let Some(w) = &self.workdir {
            s.push_str(&format!("mkdir -p {w} && cd {w}\n", w = shell_quote(w)));
        }
        s.push_str(command);
        s
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Splits on whitespace, keeping double- or single-quoted runs together (quotes removed).
fn words(text: &str) -> Vec<String> {
    let (mut out, mut cur, mut quote, mut any) = (Vec::new(), String::new(), None::<char>, false);
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `COPY [--from=IMAGE] [--chown=UID:GID] [--chmod=MODE] SRC... DEST` (or its JSON form). Only `--from` copies can
/// be built: the SDK sends no build context, so a plain `COPY`/`ADD` has nothing to copy from.
fn copy_step(instr: &str, rest: &str) -> Result<Step, String> {
    let mut from = None;
    let (mut chown, mut chmod) = (None, None);
    let mut rest = rest.trim_start();
    while rest.starts_with("--") {
        let (flag, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        rest = after.trim_start();
        let (name, value) = flag.split_once('=').unwrap_or((flag, ""));
        match name {
            "--from" if !value.is_empty() => from = Some(value.to_string()),
            "--chown" => chown = Some(numeric_owner(value)?),
            "--chmod" => {
                chmod = Some(
                    u32::from_str_radix(value, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .ok_or_else(|| format!("--chmod={value} is not an octal mode such as 755"))?,
                )
            }
            "--link" => {}
            other => return Err(format!("the flag {other} is not supported (supported: --from, --chown, --chmod)")),
        }
    }
    // The JSON form: ["src", ..., "dest"].
    let paths: Vec<String> = if rest.starts_with('[') {
        serde_json::from_str(rest.trim()).map_err(|e| format!("not a JSON array of paths: {e}"))?
    } else {
        words(rest)
    };
    let Some((dest, sources)) = paths.split_last().filter(|(_, s)| !s.is_empty()) else {
        return Err("name at least one source and a destination".into());
    };
    let Some(image) = from else {
        return Err(format!(
            "{instr} from a build context: the SDK sends none, so there is nothing to copy from; add local files with \
             Image.add_local_file / add_local_dir (strategy=\"copy\"), or copy from an image with COPY --from=IMAGE"
        ));
    };
    if instr.eq_ignore_ascii_case("ADD") {
        return Err("ADD --from is not a Dockerfile form: use COPY --from=IMAGE".into());
    }
    Ok(Step::CopyFrom { image, sources: sources.to_vec(), dest: dest.clone(), chown, chmod })
}

/// `--chown=UID[:GID]` with numeric ids (names would need the image's own user database); `root` is 0.
fn numeric_owner(value: &str) -> Result<(u32, u32), String> {
    let id = |s: &str| if s == "root" { Some(0) } else { s.parse::<u32>().ok() };
    let (u, g) = value.split_once(':').unwrap_or((value, value));
    match (id(u), id(g)) {
        (Some(u), Some(g)) => Ok((u, g)),
        _ => Err(format!("--chown={value}: give numeric ids (UID:GID), as user names are not resolved here")),
    }
}

/// `KEY=VALUE ...` or the legacy `KEY VALUE`.
fn assignments(rest: &str) -> Result<Vec<(String, String)>, String> {
    let w = words(rest);
    if w.len() >= 2 && !w[0].contains('=') {
        return Ok(vec![(w[0].clone(), w[1..].join(" "))]);
    }
    w.into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("{kv:?} is not KEY=VALUE")),
        })
        .collect()
}

/// The recipe of an image spec, or the message saying which step this server cannot build yet.
pub(crate) fn recipe(spec: ImageSpec) -> Result<Recipe, String> {
    let mut steps = Vec::new();
    let mut env: Vec<(String, String)> = Vec::new();
    let mut workdir = None;
    let mut docker = DockerState::default();
    for (i, step) in spec.steps.into_iter().enumerate() {
        let n = i + 1;
        match step.step {
            Some(WireStep::RunCommands(r)) => steps.push(Step::RunCommands(r.commands)),
            Some(WireStep::PipInstall(p)) => steps.push(Step::PipInstall(p.packages)),
            Some(WireStep::AddFile(f)) => {
                steps.push(Step::AddFile { destination: f.destination, content: f.content, mode: f.mode })
            }
            Some(WireStep::DockerfileCommands(d)) => {
                for line in d
                    .commands
                    .iter()
                    .flat_map(|c| c.lines())
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                {
                    let (instr, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
                    let rest = rest.trim();
                    let bad = |why: &str| format!("build step {n} (dockerfile_commands): {instr} {rest}: {why}");
                    match instr.to_ascii_uppercase().as_str() {
                        "RUN" => steps.push(match &docker.user {
                            Some(user) => {
                                Step::RunCommandsAs { user: user.clone(), commands: vec![docker.script(rest)] }
                            }
                            None => Step::RunCommands(vec![docker.script(rest)]),
                        }),
                        "USER" => {
                            let u = words(rest).join(" ");
                            let valid = !u.is_empty()
                                && u.split(':').count() <= 2
                                && u.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:$".contains(&b));
                            if !valid {
                                return Err(bad("USER takes a user name or id, optionally with :group"));
                            }
                            // root (or 0) is the default: record nothing, so the image stays the same as without it.
                            docker.user =
                                if u == "root" || u == "0" || u == "root:root" || u == "0:0" { None } else { Some(u) };
                        }
                        "ENV" => {
                            for (k, v) in assignments(rest).map_err(|e| bad(&e))? {
                                docker.exports.retain(|(ek, _)| *ek != k);
                                docker.exports.push((k.clone(), v.clone()));
                                env.retain(|(ek, _)| *ek != k);
                                env.push((k, v));
                            }
                        }
                        "ARG" => {
                            let (k, v) = rest.split_once('=').map(|(k, v)| (k.trim(), v.trim())).unwrap_or((rest, ""));
                            if k.is_empty() {
                                return Err(bad("ARG needs a name"));
                            }
                            docker.exports.retain(|(ek, _)| ek != k);
                            docker.exports.push((k.to_string(), words(v).join(" ")));
                        }
                        "WORKDIR" => {
                            let w = words(rest).join(" ");
                            if !w.starts_with('/') {
                                return Err(bad("WORKDIR must be an absolute path"));
                            }
                            docker.workdir = Some(w.clone());
                            workdir = Some(w);
                        }
                        // Labels are metadata this server does not keep; accepting them changes nothing.
                        "LABEL" => {}
                        "COPY" | "ADD" => steps.push(copy_step(instr, rest).map_err(|e| bad(&e))?),
                        other => {
                            return Err(format!(
                            "build step {n} (dockerfile_commands): the {other} instruction is not supported by this \
                                 server (supported: RUN, ENV, ARG, WORKDIR, USER, LABEL, COPY --from)"
                        ))
                        }
                    }
                }
            }
            Some(WireStep::UvPipInstall(p)) => steps.push(Step::UvPipInstall(p.packages)),
            Some(WireStep::UvSync(u)) => {
                use compute_proto::chalk::sandbox::v1::uv_sync_step::{PyprojectToml, UvLock};
                let field = |name: &str| format!("build step {n} (uv_sync): {name}");
                let pyproject = match u.pyproject_toml {
                    Some(PyprojectToml::PyprojectTomlLz4(b)) => {
                        lz4(&b).map_err(|e| format!("{}: {e}", field("pyproject_toml_lz4")))?
                    }
                    None => return Err(format!("{} is required", field("pyproject_toml_lz4"))),
                };
                let lock = match u.uv_lock {
                    Some(UvLock::UvLockLz4(b)) => Some(lz4(&b).map_err(|e| format!("{}: {e}", field("uv_lock_lz4")))?),
                    None => None,
                };
                let workdir = u.workdir.filter(|w| !w.is_empty()).unwrap_or_else(|| "/app".into());
                if !workdir.starts_with('/') {
                    return Err(format!("{} {workdir:?} must be an absolute path", field("workdir")));
                }
                if let Some(bad) = u
                    .extras
                    .iter()
                    .find(|e| e.is_empty() || !e.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
                {
                    return Err(format!(
                        "{} {bad:?} is not an extra's name (letters, digits, '-', '_', '.')",
                        field("extras")
                    ));
                }
                steps.push(Step::UvSync { pyproject, lock, extras: u.extras, workdir })
            }
            None => return Err(format!("build step {n} is empty")),
        }
    }
    for (k, v) in spec.env {
        env.retain(|(ek, _)| *ek != k);
        env.push((k, v));
    }
    env.sort();
    Ok(Recipe {
        base: spec.base_image,
        steps,
        env,
        workdir: spec.workdir.or(workdir),
        entrypoint: spec.entrypoint,
        cmd: spec.cmd,
        user: docker.user,
    })
}

/// Decompresses a uv_sync payload: an LZ4 frame, or an LZ4 block with its size prepended (what `lz4.block`
/// writes by default).
fn lz4(bytes: &[u8]) -> Result<Vec<u8>, String> {
    const FRAME_MAGIC: [u8; 4] = [0x04, 0x22, 0x4d, 0x18];
    const LIMIT: u64 = 64 << 20;
    if bytes.starts_with(&FRAME_MAGIC) {
        use std::io::Read;
        let mut out = Vec::new();
        lz4_flex::frame::FrameDecoder::new(bytes)
            .take(LIMIT + 1)
            .read_to_end(&mut out)
            .map_err(|e| format!("not a valid LZ4 frame: {e}"))?;
        if out.len() as u64 > LIMIT {
            return Err(format!("decompresses to more than {LIMIT} bytes"));
        }
        return Ok(out);
    }
    let declared = bytes.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64).unwrap_or(0);
    if declared > LIMIT {
        return Err("not LZ4 data (neither a frame nor a size-prefixed block)".into());
    }
    lz4_flex::block::decompress_size_prepended(bytes)
        .map_err(|e| format!("not LZ4 data (neither a frame nor a size-prefixed block): {e}"))
}

#[tonic::async_trait]
impl CustomImageService for ImageApi {
    async fn get_or_build_custom_image(
        &self,
        req: Request<GetOrBuildCustomImageRequest>,
    ) -> Result<Response<GetOrBuildCustomImageResponse>, Status> {
        principal(&req)?;
        let spec = req.into_inner().image_spec.ok_or_else(|| Status::invalid_argument("image_spec is required"))?;
        if spec.base_image.trim().is_empty() {
            return Err(Status::invalid_argument("image_spec.base_image is required"));
        }
        let recipe = match recipe(spec) {
            Ok(r) => r,
            Err(msg) => {
                return Ok(Response::new(GetOrBuildCustomImageResponse {
                    status: "failed".into(),
                    error: Some(msg),
                    ..Default::default()
                }))
            }
        };
        let a = self.builds.get_or_build(recipe).map_err(from_control)?;
        Ok(Response::new(GetOrBuildCustomImageResponse {
            image: a.image,
            build_id: a.build_id,
            status: a.status.into(),
            error: a.error,
            content_hash: a.content_hash,
        }))
    }

    async fn get_custom_image(
        &self,
        req: Request<GetCustomImageRequest>,
    ) -> Result<Response<GetCustomImageResponse>, Status> {
        principal(&req)?;
        let build_id = req.into_inner().build_id;
        let (status, image, error) = match self.builds.get(&build_id).map_err(from_control)? {
            BuildStatus::Building => ("building", String::new(), None),
            BuildStatus::Succeeded(image) => ("succeeded", image, None),
            BuildStatus::Failed(e) => ("failed", String::new(), Some(e)),
        };
        Ok(Response::new(GetCustomImageResponse { build_id, status: status.into(), image, error }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uv_sync_payloads_are_lz4_frames_or_size_prefixed_blocks() {
        use std::io::Write;
        let text = b"[project]\nname = \"demo\"\n".repeat(50);
        let mut frame = lz4_flex::frame::FrameEncoder::new(Vec::new());
        frame.write_all(&text).unwrap();
        assert_eq!(lz4(&frame.finish().unwrap()).unwrap(), text);
        assert_eq!(lz4(&lz4_flex::block::compress_prepend_size(&text)).unwrap(), text);
        assert!(lz4(b"plain text, not lz4").unwrap_err().contains("not LZ4"));
        // A block claiming a huge size is refused before anything is allocated.
        assert!(lz4(&[0xff, 0xff, 0xff, 0x7f, 0]).is_err());
    }

    fn docker(lines: &[&str]) -> Result<Recipe, String> {
        recipe(ImageSpec {
            base_image: "python:3.13-slim-trixie".into(),
            steps: vec![BuildStep {
                step: Some(WireStep::DockerfileCommands(DockerfileCommandsStep {
                    commands: lines.iter().map(|s| s.to_string()).collect(),
                })),
            }],
            ..Default::default()
        })
    }

    #[test]
    fn dockerfile_instructions_become_steps_and_config() {
        let r = docker(&["ARG V=1", "ENV A=x B=\"y z\"", "WORKDIR /app", "LABEL k=v", "RUN echo $A $V > f"]).unwrap();
        assert_eq!(r.env, vec![("A".into(), "x".into()), ("B".into(), "y z".into())]);
        assert_eq!(r.workdir.as_deref(), Some("/app"));
        let Step::RunCommands(cmds) = &r.steps[0] else { panic!("{:?}", r.steps) };
        assert!(
            cmds[0].contains("export V='1'") && cmds[0].contains("export A='x'") && cmds[0].contains("cd '/app'"),
            "{cmds:?}"
        );
        assert!(cmds[0].ends_with("echo $A $V > f"));
    }

    #[test]
    fn copy_from_an_image_becomes_a_step_and_a_context_copy_says_what_to_do_instead() {
        let r = docker(&["COPY --from=ghcr.io/astral-sh/uv:0.5 --chmod=755 /uv /uvx /bin/"]).unwrap();
        assert_eq!(
            r.steps,
            vec![Step::CopyFrom {
                image: "ghcr.io/astral-sh/uv:0.5".into(),
                sources: vec!["/uv".into(), "/uvx".into()],
                dest: "/bin/".into(),
                chown: None,
                chmod: Some(0o755),
            }]
        );
        let json = docker(&[r#"COPY --from=busybox --chown=1000:1000 ["/bin/busybox", "/opt/bb"]"#]).unwrap();
        assert!(matches!(&json.steps[0], Step::CopyFrom { chown: Some((1000, 1000)), dest, .. } if dest == "/opt/bb"));
        let err = docker(&["COPY . /app"]).unwrap_err();
        assert!(err.contains("build step 1 (dockerfile_commands)") && err.contains("add_local_file"), "{err}");
        for (line, why) in [
            ("COPY --from=x /a", "source and a destination"),
            ("COPY --from=x --chown=app /a /b", "numeric"),
            ("COPY --from=x --chmod=rwx /a /b", "octal"),
            ("COPY --from=x --exclude=y /a /b", "--exclude"),
            ("ADD --from=x /a /b", "COPY --from"),
        ] {
            let err = docker(&[line]).unwrap_err();
            assert!(err.contains(why), "{line}: {err}");
        }
    }

    #[test]
    fn unsupported_instructions_are_named() {
        let err = docker(&["EXPOSE 8080"]).unwrap_err();
        assert!(err.contains("build step 1 (dockerfile_commands)") && err.contains("EXPOSE"), "{err}");
        assert!(docker(&["WORKDIR relative"]).unwrap_err().contains("absolute"));
        assert!(docker(&["ENV =x"]).is_err());
    }
}
