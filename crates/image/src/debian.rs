//! Building base root filesystems from the Debian archive with mmdebstrap.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::{BaseRef, ImageConfig, ImageError};

/// Where Debian packages come from: the machine's own apt configuration unless the operator says otherwise.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// Archive URI, e.g. the `URIs:` of the host's main Debian source.
    pub uri: String,
}

impl Mirror {
    /// The Debian archive this machine's apt uses (`/etc/apt/sources.list.d/*.sources`, then
    /// `/etc/apt/sources.list`), skipping security mirrors.
    pub fn from_host() -> Option<Mirror> {
        let mut files: Vec<PathBuf> = std::fs::read_dir("/etc/apt/sources.list.d")
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "sources")) {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            for stanza in text.split("\n\n") {
                let field =
                    |name: &str| stanza.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()));
                let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) else {
                    continue;
                };
                if suites.contains("-security") || !stanza.contains("debian") {
                    continue;
                }
                if let Some(uri) = uris.split_whitespace().next() {
                    return Some(Mirror { uri: uri.to_string() });
                }
            }
        }
        for f in [PathBuf::from("/etc/apt/sources.list")]
            .iter()
            .chain(files.iter().filter(|f| f.extension().is_some_and(|e| e == "list")))
        {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            for line in text.lines() {
                let mut words = line.split_whitespace().filter(|w| !w.starts_with('['));
                if words.next() != Some("deb") {
                    continue;
                }
                let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
                    continue;
                };
                if !suite.contains("-security") {
                    return Some(Mirror { uri: uri.to_string() });
                }
            }
        }
        None
    }
}

/// Removes a base build's directory, first unmounting what mmdebstrap mounted inside it (`/proc`, `/sys`,
/// `/dev/pts`, …) if it was killed before it could: deleting through a live `/proc` would fail (and must not be
/// attempted).
pub(crate) fn remove_build_dir(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let prefix = dir.to_string_lossy().into_owned();
    let mut under: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| m.replace("\\040", " "))
        .filter(|m| m == &prefix || m.starts_with(&format!("{prefix}/")))
        .collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in &under {
        if let Err(e) = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(mount = %m, error = %e, "could not unmount a leftover of an interrupted base build");
        }
    }
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove an interrupted base build");
        }
    }
}

/// Builds `base` into `target/rootfs` (plus `config.json` and `provenance`), atomically: a failed or interrupted
/// build leaves nothing under `target`.
pub async fn build(base: &BaseRef, mirror: &Mirror, target: &Path) -> Result<(), ImageError> {
    // Named after the whole target name (not `with_extension`, which would cut "python-3.13-trixie" at its dot and
    // make concurrent builds of 3.13 and 3.14 share a directory).
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = target.with_file_name(format!("{name}.building-{}", std::process::id()));
    remove_build_dir(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ImageError::Io(format!("creating {}: {e}", tmp.display())))?;
    let rootfs = tmp.join("rootfs");
    let mut includes = vec!["ca-certificates".to_string()];
    let mut hooks: Vec<String> = Vec::new();
    if let Some(py) = &base.python {
        includes.push(format!("python{py}"));
        includes.push(format!("python{py}-venv"));
        // Debian disables ensurepip for the system Python; its pip package is pure Python and importable by
        // every python3.X of the suite, so wrappers pin pip to the image's Python.
        includes.push("python3-pip".into());
        hooks.push(format!(
            "chroot \"$1\" sh -c 'ln -sf /usr/bin/python{py} /usr/local/bin/python && ln -sf /usr/bin/python{py} /usr/local/bin/python3'"
        ));
        // The official python images have pip and no PEP 668 marker; so do these.
        hooks.push("rm -f \"$1\"/usr/lib/python3*/EXTERNALLY-MANAGED".into());
        hooks.push(format!(
            "for p in pip pip3 pip{py}; do printf '#!/bin/sh\\nexec /usr/bin/python{py} -m pip \"$@\"\\n' > \"$1\"/usr/local/bin/$p; chmod 755 \"$1\"/usr/local/bin/$p; done"
        ));
        hooks.push(format!("chroot \"$1\" python{py} -m pip --version"));
    }
    let started = std::time::Instant::now();
    tracing::info!(image = %base.reference, suite = %base.suite, "building base image from the Debian archive");
    let mut cmd = tokio::process::Command::new("mmdebstrap");
    cmd.arg("--variant=minbase")
        .arg(format!("--include={}", includes.join(",")))
        .arg("--dpkgopt=path-exclude=/usr/share/man/*")
        .arg("--dpkgopt=path-exclude=/usr/share/doc/*")
        .arg("--dpkgopt=path-include=/usr/share/doc/*/copyright")
        .arg("--dpkgopt=path-exclude=/usr/share/locale/*")
        .arg("--aptopt=Acquire::Check-Valid-Until \"false\"")
        .arg("--aptopt=Acquire::Retries \"3\"");
    for h in &hooks {
        cmd.arg(format!("--customize-hook={h}"));
    }
    cmd.arg(&base.suite)
        .arg(&rootfs)
        .arg(&mirror.uri)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = cmd.output().await.map_err(|e| ImageError::Build {
        reference: base.reference.clone(),
        message: format!("running mmdebstrap (install it: apt-get install mmdebstrap): {e}"),
    })?;
    if !out.status.success() {
        remove_build_dir(&tmp);
        let text = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(ImageError::Build {
            reference: base.reference.clone(),
            message: format!("mmdebstrap failed:\n{}", tail.join("\n")),
        });
    }
    let mut env = vec![
        ("PATH".to_string(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
    ];
    let mut provenance = format!("debian archive {} suite {}", mirror.uri, base.suite);
    if let Some(py) = &base.python {
        env.push(("PYTHON_VERSION".into(), py.clone()));
        if let Some(req) = &base.requested_suite {
            provenance.push_str(&format!(
                "; Debian {req} does not ship Python {py}, so the root filesystem is Debian {} (which does)",
                base.suite
            ));
        }
    }
    let config = ImageConfig {
        env,
        workdir: "/".into(),
        entrypoint: vec![],
        cmd: if base.python.is_some() { vec!["python3".into()] } else { vec!["bash".into()] },
        user: None,
    };
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(tmp.join(name), bytes).map_err(|e| ImageError::Io(format!("writing {name}: {e}")))
    };
    write("config.json", &serde_json::to_vec_pretty(&config).expect("config serializes"))?;
    write("provenance", provenance.as_bytes())?;
    if target.exists() {
        let _ = std::fs::remove_dir_all(target);
    }
    std::fs::rename(&tmp, target).map_err(|e| ImageError::Io(format!("moving the build into place: {e}")))?;
    tracing::info!(image = %base.reference, seconds = started.elapsed().as_secs_f64(), %provenance, "base image built");
    Ok(())
}
