//! `COPY --from=IMAGE`: copying paths out of another image's layers into a build step's layer, reading the layers
//! as overlayfs would merge them (the topmost layer that has a path wins; a whiteout hides what is below it; an
//! opaque directory hides the lower layers' entries), without mounting anything.

use std::collections::BTreeSet;
use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// What a copied file's owner and mode become.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyOptions {
    /// `--chown=UID:GID`: every copied entry's owner (numeric ids); the source's when absent.
    pub chown: Option<(u32, u32)>,
    /// `--chmod=MODE`: every copied entry's permission bits; the source's when absent.
    pub chmod: Option<u32>,
}

/// How a path stands in one layer.
enum Found {
    Absent,
    Whiteout,
    Entry(std::fs::Metadata),
}

fn look(layer: &Path, rel: &Path) -> Found {
    match std::fs::symlink_metadata(layer.join(rel)) {
        Err(_) => Found::Absent,
        Ok(m) if is_whiteout(&m) => Found::Whiteout,
        Ok(m) => Found::Entry(m),
    }
}

fn is_whiteout(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    m.file_type().is_char_device() && m.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    xattr::get(dir, "trusted.overlay.opaque").ok().flatten().is_some_and(|v| v == b"y")
}

/// `path` inside an image, relative to its root, refusing `..`.
fn relative(path: &str) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return Err(format!("{path:?} must not contain '..'")),
        }
    }
    Ok(out)
}

/// Copies `sources` of the image whose layers are `layers` (top first) to `dest` in the layer `into`, as a
/// Dockerfile's `COPY --from` does: a directory's contents are copied into `dest`; with several sources, or a `dest`
/// ending in `/`, each goes into the directory `dest` under its own name.
pub fn copy_from_layers(
    layers: &[PathBuf],
    sources: &[String],
    dest: &str,
    into: &Path,
    opts: CopyOptions,
) -> Result<(), String> {
    if !dest.starts_with('/') {
        return Err(format!("the destination {dest:?} must be an absolute path"));
    }
    let dest_rel = relative(dest)?;
    let into_dir = dest.ends_with('/') || sources.len() > 1;
    for source in sources {
        if source.contains(['*', '?', '[']) {
            return Err(format!("{source:?}: wildcards in COPY --from sources are not supported; name each path"));
        }
        let rel = relative(source)?;
        let top = (0..layers.len()).find_map(|i| match look(&layers[i], &rel) {
            Found::Absent => None,
            Found::Whiteout => Some(None),
            Found::Entry(m) => Some(Some((i, m))),
        });
        let Some(Some((_, meta))) = top else {
            return Err(format!("{source:?} does not exist in the image"));
        };
        let target = if meta.is_dir() {
            dest_rel.clone()
        } else if into_dir {
            dest_rel.join(rel.file_name().ok_or_else(|| format!("{source:?} names no file"))?)
        } else {
            dest_rel.clone()
        };
        copy_merged(layers, &rel, &into.join(&target), opts)?;
    }
    Ok(())
}

/// Copies the merged view of `rel` to `to`.
fn copy_merged(layers: &[PathBuf], rel: &Path, to: &Path, opts: CopyOptions) -> Result<(), String> {
    let mut top = None;
    for (i, layer) in layers.iter().enumerate() {
        match look(layer, rel) {
            Found::Absent => continue,
            Found::Whiteout => return Ok(()),
            Found::Entry(m) => {
                top = Some((i, m));
                break;
            }
        }
    }
    let Some((i, meta)) = top else { return Ok(()) };
    let from = layers[i].join(rel);
    let io = |what: &str, e: std::io::Error| format!("{what} {}: {e}", to.display());
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io("creating the parent of", e))?;
    }
    let ft = meta.file_type();
    if ft.is_dir() {
        std::fs::create_dir_all(to).map_err(|e| io("creating", e))?;
        // The entries of this directory in every layer down to (and including) the first that hides the rest.
        let mut names = BTreeSet::new();
        for layer in &layers[i..] {
            let dir = layer.join(rel);
            match look(layer, rel) {
                Found::Entry(m) if m.is_dir() => {
                    for e in std::fs::read_dir(&dir).map_err(|e| format!("reading {}: {e}", dir.display()))? {
                        let name = e.map_err(|e| format!("reading {}: {e}", dir.display()))?.file_name();
                        if !name.to_string_lossy().starts_with(".wh.") {
                            names.insert(name);
                        }
                    }
                    if is_opaque(&dir) {
                        break;
                    }
                }
                Found::Absent => continue,
                Found::Whiteout | Found::Entry(_) => break,
            }
        }
        for name in names {
            copy_merged(&layers[i..], &rel.join(&name), &to.join(&name), opts)?;
        }
    } else if ft.is_symlink() {
        let target = std::fs::read_link(&from).map_err(|e| format!("reading the link {}: {e}", from.display()))?;
        let _ = std::fs::remove_file(to);
        std::os::unix::fs::symlink(&target, to).map_err(|e| io("linking", e))?;
    } else if ft.is_file() {
        std::fs::copy(&from, to).map_err(|e| io("copying to", e))?;
    } else {
        return Err(format!("{} is a special file, which COPY --from does not copy", rel.display()));
    }
    let (uid, gid) = opts.chown.unwrap_or((meta.uid(), meta.gid()));
    lchown(to, Some(uid), Some(gid)).map_err(|e| io("setting the owner of", e))?;
    if !ft.is_symlink() {
        let mode = opts.chmod.unwrap_or(meta.mode() & 0o7777);
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io("setting the mode of", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, content: &str, mode: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn whiteout(path: &Path) -> bool {
        nix::sys::stat::mknod(path, nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::empty(), 0).is_ok()
    }

    #[test]
    fn copies_what_the_merged_image_shows_with_dockers_destination_rules() {
        let t = tempfile::tempdir().unwrap();
        let (top, low, out) = (t.path().join("top"), t.path().join("low"), t.path().join("out"));
        write(&low.join("bin/uv"), "old uv", 0o755);
        write(&low.join("bin/uvx"), "uvx", 0o755);
        write(&low.join("etc/conf/a"), "a", 0o644);
        write(&low.join("etc/conf/gone"), "gone", 0o644);
        write(&top.join("bin/uv"), "new uv", 0o755);
        write(&top.join("etc/conf/b"), "b", 0o600);
        let can_whiteout = whiteout(&top.join("etc/conf/gone"));
        std::os::unix::fs::symlink("uv", top.join("bin/uv-link")).unwrap();
        let layers = vec![top.clone(), low.clone()];
        let none = CopyOptions::default();

        copy_from_layers(&layers, &["/bin/uv".into(), "/bin/uvx".into()], "/usr/bin", &out, none).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("usr/bin/uv")).unwrap(), "new uv", "the top layer wins");
        assert_eq!(std::fs::read_to_string(out.join("usr/bin/uvx")).unwrap(), "uvx");
        let mode = std::fs::metadata(out.join("usr/bin/uvx")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);

        copy_from_layers(&layers, &["/bin/uv".into()], "/opt/uv-renamed", &out, none).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("opt/uv-renamed")).unwrap(), "new uv");

        copy_from_layers(&layers, &["/etc/conf".into()], "/conf", &out, none).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("conf/a")).unwrap(), "a", "a lower layer's entry shows");
        assert_eq!(std::fs::read_to_string(out.join("conf/b")).unwrap(), "b");
        if can_whiteout {
            assert!(!out.join("conf/gone").exists(), "a whiteout hides the lower file");
        }

        copy_from_layers(&layers, &["/bin/uv-link".into()], "/l/", &out, none).unwrap();
        assert_eq!(std::fs::read_link(out.join("l/uv-link")).unwrap(), Path::new("uv"));

        let opts = CopyOptions { chown: Some((1000, 1000)), chmod: Some(0o700) };
        copy_from_layers(&layers, &["/bin/uvx".into()], "/home/app/", &out, opts).unwrap();
        let m = std::fs::metadata(out.join("home/app/uvx")).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (1000, 1000, 0o700));

        for (src, dest, why) in [
            ("/nope", "/x", "does not exist"),
            ("/bin/*", "/x/", "wildcards"),
            ("/../etc/passwd", "/x", ".."),
            ("/bin/uv", "relative", "absolute"),
        ] {
            let err = copy_from_layers(&layers, &[src.into()], dest, &out, none).unwrap_err();
            assert!(err.contains(why), "{src} -> {dest}: {err}");
        }
    }
}
