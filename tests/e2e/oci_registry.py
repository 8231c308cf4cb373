"""A real OCI registry for the tests: Debian's docker-registry on loopback, seeded over the distribution API
with images the tests assemble themselves (busybox-static plus files, whiteouts, configs, multi-arch indexes)."""
import gzip
import hashlib
import io
import json
import os
import socket
import subprocess
import tarfile
import time
import urllib.request

from conftest import free_port

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
BUSYBOX = "/bin/busybox"
APPLETS = ["sh", "cat", "ls", "echo", "id", "env", "pwd", "sleep", "test", "true", "stat", "mkdir", "rm", "touch"]


def require_tools():
    missing = [t for t in ("/usr/bin/docker-registry", BUSYBOX) if not os.path.exists(t)]
    if missing:
        raise RuntimeError(f"registry tests need {missing} (scripts/setup.sh installs docker-registry, busybox-static)")


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(entries):
    """A gzipped layer tarball from (path, content) pairs: bytes are a file, a str ending in '/' is a directory,
    ('->', target) a symlink. Returns (blob, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, content in entries:
            info = tarfile.TarInfo(path.rstrip("/"))
            info.mtime = 0
            if content == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif isinstance(content, tuple) and content[0] == "->":
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                tar.addfile(info)
            else:
                data = content if isinstance(content, bytes) else content.encode()
                info.size, info.mode = len(data), 0o755 if data.startswith(b"\x7fELF") else 0o644
                tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, 1, mtime=0), sha256(tar_bytes)


def busybox_layer(extra=()):
    with open(BUSYBOX, "rb") as f:
        bb = f.read()
    entries = [("bin", "dir"), ("bin/busybox", bb)]
    entries += [(f"bin/{a}", ("->", "busybox")) for a in APPLETS]
    entries += [("etc", "dir"), ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/app:/bin/sh\n"),
                ("etc/group", "root:x:0:\napp:x:1000:\n"), ("tmp", "dir"), ("root", "dir")]
    return layer(entries + list(extra))


def config_blob(diff_ids, env=None, entrypoint=None, cmd=None, workdir=None, user=None, arch="amd64"):
    cfg = {k: v for k, v in {"Env": env, "Entrypoint": entrypoint, "Cmd": cmd, "WorkingDir": workdir, "User": user}.items() if v is not None}
    return json.dumps({"architecture": arch, "os": "linux", "config": cfg,
                       "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()


def manifest_blob(config, layers):
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": sha256(b), "size": len(b)} for b in layers],
    }).encode()


def index_blob(manifests):
    """manifests: [(manifest bytes, arch)]."""
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256(m), "size": len(m),
                       "platform": {"architecture": a, "os": "linux"}} for m, a in manifests],
    }).encode()


class LocalRegistry:
    """docker-registry serving ROOT on 127.0.0.1, optionally behind htpasswd basic auth."""

    def __init__(self, root, user=None, password=None):
        require_tools()
        self.root = str(root)
        os.makedirs(self.root, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.auth = None
        auth_cfg = ""
        if user:
            import crypt  # bcrypt through libxcrypt; docker-registry accepts only bcrypt

            with open(os.path.join(self.root, "htpasswd"), "w") as f:
                f.write(f"{user}:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
            auth_cfg = f"auth:\n  htpasswd:\n    realm: compute-test\n    path: {self.root}/htpasswd\n"
            import base64

            self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        cfg = os.path.join(self.root, "config.yml")
        with open(cfg, "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {self.root}/data\n"
                    f"  delete:\n    enabled: true\nhttp:\n  addr: {self.host}\n{auth_cfg}")
        self.log = open(os.path.join(self.root, "registry.log"), "w")
        self.proc = subprocess.Popen(["/usr/bin/docker-registry", "serve", cfg], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        raise RuntimeError(f"docker-registry did not start: {open(os.path.join(self.root, 'registry.log')).read()}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()

    def _request(self, method, path, data=None, headers=None):
        url = path if path.startswith("http") else f"http://{self.host}{path}"
        req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        if self.auth:
            req.add_header("Authorization", self.auth)
        return urllib.request.urlopen(req, timeout=60)

    def push_blob(self, repo, data):
        digest = sha256(data)
        with self._request("POST", f"/v2/{repo}/blobs/uploads/") as r:
            location = r.headers["Location"]
        sep = "&" if "?" in location else "?"
        with self._request("PUT", f"{location}{sep}digest={digest}", data, {"Content-Type": "application/octet-stream"}):
            pass
        return digest

    def push_manifest(self, repo, ref, body, media_type=OCI_MANIFEST):
        with self._request("PUT", f"/v2/{repo}/manifests/{ref}", body, {"Content-Type": media_type}):
            pass
        return sha256(body)

    def push_image(self, repo, tag, layers, **config):
        """Pushes an image of `layers` [(blob, diff_id)] with run settings `config`; returns its manifest digest."""
        for blob, _ in layers:
            self.push_blob(repo, blob)
        cfg = config_blob([d for _, d in layers], **config)
        self.push_blob(repo, cfg)
        manifest = manifest_blob(cfg, [b for b, _ in layers])
        return self.push_manifest(repo, tag, manifest), manifest

    def blob_file(self, digest):
        hexd = digest.split(":", 1)[1]
        return os.path.join(self.root, "data/docker/registry/v2/blobs/sha256", hexd[:2], hexd, "data")


def write_oci_archive(path, name, layers, **config):
    """An OCI archive (a tar of an OCI image layout) holding one image named `name`."""
    cfg = config_blob([d for _, d in layers], **config)
    manifest = manifest_blob(cfg, [b for b, _ in layers])
    blobs = {sha256(b): b for b in [cfg, manifest] + [b for b, _ in layers]}
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": sha256(manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": name}}]}).encode()
    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add("index.json", index)
        for d, b in blobs.items():
            add("blobs/sha256/" + d.split(":", 1)[1], b)
    return sha256(manifest)
