"""Base images from OCI registries and archives, against the official SDK: a real registry on loopback
(Debian's docker-registry) that the tests seed themselves, mirrors for Docker Hub names, credentials,
multi-arch indexes, digest pins and verification, whiteouts, image configs, builds on pulled bases, and
`compute image import` for machines with no registry."""
import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import Server, compute_bin, require_root, sdk_ok
from oci_registry import (OCI_INDEX, LocalRegistry, busybox_layer, config_blob, index_blob, layer, manifest_blob,
                          write_oci_archive)

CONFIG = dict(env=["PATH=/bin", "GREETING=from-config"], workdir="/app", user="app",
              entrypoint=["/bin/sh", "-c"], cmd=["echo entry $GREETING; id -u; pwd"])


def image_layers(arch):
    base = busybox_layer([("data", "dir"), ("data/old.txt", "old"), ("data/keep.txt", "kept"),
                          ("opaque", "dir"), ("opaque/a.txt", "a"), ("app", "dir")])
    top = layer([("data", "dir"), ("data/.wh.old.txt", b""), ("opaque", "dir"), ("opaque/.wh..wh..opq", b""),
                 ("opaque/b.txt", "b"), ("arch.txt", arch), ("app", "dir"), ("app/hello.txt", "hello")])
    return [base, top]


def push_multiarch(reg, repo, tag):
    """An index with linux/amd64 and linux/arm64 images, told apart by /arch.txt."""
    manifests = []
    for arch in ("arm64", "amd64"):
        layers = image_layers(arch)
        for blob, _ in layers:
            reg.push_blob(repo, blob)
        cfg = config_blob([d for _, d in layers], arch=arch, **CONFIG)
        reg.push_blob(repo, cfg)
        m = manifest_blob(cfg, [b for b, _ in layers])
        reg.push_manifest(repo, "sha256-" + arch, m)
        manifests.append((m, arch))
    return reg.push_manifest(repo, tag, index_blob(manifests), OCI_INDEX)


@pytest.fixture(scope="module")
def registries(tmp_path_factory):
    require_root()
    root = tmp_path_factory.mktemp("registries")
    open_reg = LocalRegistry(root / "open")
    locked = LocalRegistry(root / "locked", user="puller", password="s3cret")
    # Loopback registries, listed as an operator lists the registries on their own network.
    config = (
        f'insecure_registries = ["{open_reg.host}"]\n'
        f'[registry_mirrors]\n"docker.io" = ["http://{open_reg.host}"]\n'
        f'[registry_credentials]\n"{locked.host}" = {{ username = "puller", password = "s3cret" }}\n'
    )
    server = Server(root / "data", config=config)
    yield server, open_reg, locked
    server.stop()
    open_reg.stop()
    locked.stop()


def sdk(server, body, timeout=600):
    return sdk_ok(server, "import os, time\nfrom chalkcompute import Sandbox, Container, Image", body, timeout).stdout


def test_a_raw_reference_runs_with_its_config_layers_and_platform(registries):
    server, reg, _ = registries
    index_digest = push_multiarch(reg, "test/busybox", "1")
    ref = f"{reg.host}/test/busybox:1"
    out = sdk(server, f"""
        sb = Sandbox(image={ref!r}, name="pulled").run()
        def run(*cmd):
            r = sb.exec(*cmd)
            return r.exit_code, r.stdout_text.strip()
        print("ARCH", run("cat", "/arch.txt"))
        print("KEEP", run("cat", "/data/keep.txt"))
        print("WHITEOUT", run("test", "-e", "/data/old.txt"))
        print("OPAQUE", run("ls", "/opaque"))
        print("PWD", run("pwd"))
        print("ENV", run("sh", "-c", "echo $GREETING"))
        print("USER", run("id", "-u"))
        sb.terminate()
    """)
    assert "ARCH (0, 'amd64')" in out, out
    assert "KEEP (0, 'kept')" in out, out
    assert "WHITEOUT (1, '')" in out, out
    assert "OPAQUE (0, 'b.txt')" in out, out
    assert "PWD (0, '/app')" in out, out
    assert "ENV (0, 'from-config')" in out, out
    assert "USER (0, '1000')" in out, out
    # A workload that names no entrypoint (the SDK always sends one; other clients need not) runs the image's
    # Entrypoint and Cmd, as its User, in its WorkingDir.
    token = server.token()
    status, body = server.connect("chalk.sandbox.v2.SandboxService/CreateSandbox",
                                  {"spec": {"name": "pulled-entry", "image": ref}}, token)
    assert status == 200, body
    deadline = time.time() + 60
    while time.time() < deadline:
        _, got = server.connect("chalk.sandbox.v2.SandboxService/GetSandbox", {"id": body["sandbox"]["id"]}, token)
        if not any(w in got["sandbox"].get("status", "") for w in ("PENDING", "RUNNING", "UNSPECIFIED")):
            break
        time.sleep(0.5)
    assert got["sandbox"]["status"] == "SANDBOX_STATUS_SUCCEEDED", got
    logs = server.cli("logs", "pulled-entry").stdout
    assert logs.split() == ["entry", "from-config", "1000", "/app"], logs
    inspect = server.cli("image", "inspect", ref).stdout
    assert f"index {index_digest}" in inspect and f"registry http://{reg.host}" in inspect, inspect
    assert "linux/amd64" in inspect, inspect
    assert '"user":"app"' in inspect.replace(" ", ""), inspect
    # By digest: the same image, resolved without a tag.
    pinned = f"{reg.host}/test/busybox@{index_digest}"
    assert "amd64" in sdk(server, f"""
        sb = Sandbox(image={pinned!r}, name="pinned").run()
        print(sb.exec("cat", "/arch.txt").stdout_text)
        sb.terminate()
    """)


def test_docker_hub_names_come_from_the_configured_mirror(registries):
    server, reg, _ = registries
    tag = f"t{reg.port}"  # the image store is shared between test runs; a fresh tag is a fresh pull
    reg.push_image("library/busybox", tag, [busybox_layer([("hub.txt", "from the mirror")])], env=["PATH=/bin"])
    out = sdk(server, f"""
        sb = Sandbox(image="busybox:{tag}", name="hub").run()
        print("HUB", sb.exec("cat", "/hub.txt").stdout_text)
        sb.terminate()
    """)
    assert "HUB from the mirror" in out, out
    listing = server.cli("image", "ls").stdout
    assert f"docker.io/library/busybox:{tag}" in listing, listing


def test_credentials_are_used_and_refusals_are_clear(registries, tmp_path):
    server, _, locked = registries
    locked.push_image("private/app", "1", [busybox_layer([("secret.txt", "behind a login")])], env=["PATH=/bin"])
    out = sdk(server, f"""
        sb = Sandbox(image="{locked.host}/private/app:1", name="private").run()
        print("PRIVATE", sb.exec("cat", "/secret.txt").stdout_text)
        sb.terminate()
    """)
    assert "PRIVATE behind a login" in out, out
    # A server without the credentials is refused, and told what to configure.
    other = Server(tmp_path / "nocreds", config=f'insecure_registries = ["{locked.host}"]\n')
    try:
        r = other.cli("image", "pull", f"{locked.host}/private/app:1", check=False)
        assert r.returncode != 0 and "registry_credentials" in r.stderr, r.stderr
    finally:
        other.stop()


def test_a_reference_to_the_servers_own_network_is_refused_without_a_connection(tmp_path):
    import socket
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass
    t = threading.Thread(target=watch)
    t.start()
    server = Server(tmp_path / "data")
    try:
        for ref in (f"127.0.0.1:{port}/x:y", f"localhost:{port}/x:y", "169.254.169.254/latest:meta"):
            r = server.cli("image", "pull", ref, check=False)
            assert r.returncode != 0 and "insecure_registries" in r.stderr and "address" in r.stderr, r.stderr
        assert not accepted, "the server connected to the loopback port a reference named"
    finally:
        stop.set()
        t.join()
        listener.close()
        server.stop()


def test_a_tampered_blob_an_unknown_image_and_a_malformed_name_fail_clearly(registries):
    server, reg, _ = registries
    layers = [busybox_layer([("unique.txt", os.urandom(16).hex())])]
    reg.push_image("test/tampered", "1", layers, env=["PATH=/bin"])
    with open(reg.blob_file(__import__("oci_registry").sha256(layers[0][0])), "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = server.cli("image", "pull", f"{reg.host}/test/tampered:1", check=False)
    assert r.returncode != 0 and "failed verification" in r.stderr, r.stderr
    from conftest import image_dir

    leftovers = [n for n in os.listdir(os.path.join(image_dir(), "layers")) if n.endswith(".blob")]
    assert leftovers == [], f"a refused download was left behind: {leftovers}"
    assert not any("tampered" in line for line in server.cli("image", "ls").stdout.splitlines())
    r = server.cli("image", "pull", f"{reg.host}/test/nosuch:1", check=False)
    assert r.returncode != 0 and "MANIFEST_UNKNOWN" in r.stderr or "NAME_UNKNOWN" in r.stderr, r.stderr
    r = server.cli("image", "pull", "Not A Reference", check=False)
    assert r.returncode != 0 and "not a valid image reference" in r.stderr, r.stderr
    out = sdk(server, f"""
        c = Container(image="{reg.host}/test/nosuch:1", name="nosuch")
        try:
            c.run()
        except Exception as e:
            pass
        time.sleep(1)
        info = Sandbox.from_id(c.id).refresh()
        print("STATUS", info.status, info.status_message)
    """)
    assert re.search(r"STATUS FAILED image \S+/test/nosuch:1: registry \S+: GET /v2/test/nosuch/manifests/1: 404 Not Found: "
                     r"(MANIFEST_UNKNOWN|NAME_UNKNOWN)", out, re.I), out


def test_a_build_on_a_pulled_base(registries):
    server, reg, _ = registries
    reg.push_image("test/buildbase", "1", [busybox_layer()], env=["PATH=/bin"], workdir="/")
    out = sdk(server, f"""
        img = Image.base("{reg.host}/test/buildbase:1").run_commands("echo built-on-pull > /built.txt").env({{"X": "1"}})
        sb = Sandbox(image=img, name="onpull").run()
        print("BUILT", sb.exec("cat", "/built.txt").stdout_text.strip(), sb.exec("sh", "-c", "echo $X").stdout_text.strip())
        sb.terminate()
    """)
    assert "BUILT built-on-pull 1" in out, out


def test_import_oci_and_docker_archives_and_run_them_with_no_registry(registries, tmp_path):
    server, _, _ = registries
    archive = tmp_path / "app.tar"
    digest = write_oci_archive(str(archive), "1", [busybox_layer([("imported.txt", "from an archive")])],
                               env=["PATH=/bin"], cmd=["cat", "/imported.txt"])
    r = server.cli("image", "import", str(archive), check=False)
    assert r.returncode != 0 and "--name" in r.stderr, r.stderr
    out = server.cli("image", "import", str(archive), "--name", "offline/app:1").stdout
    assert "docker.io/offline/app:1" in out and digest in out, out
    out = sdk(server, """
        sb = Sandbox(image="offline/app:1", name="imported").run()
        print("IMPORTED", sb.exec("cat", "/imported.txt").stdout_text)
        sb.terminate()
    """)
    assert "IMPORTED from an archive" in out, out
    # Docker's `docker save` format (written here by skopeo from the registry) imports under its own tag.
    _, reg, _ = registries
    reg.push_image("test/saved", "1", [busybox_layer([("saved.txt", "from docker save")])], env=["PATH=/bin"])
    saved = tmp_path / "saved.tar"
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{reg.host}/test/saved:1",
                    f"docker-archive:{saved}:saved/app:2"], check=True)
    out = server.cli("image", "import", str(saved)).stdout
    assert "docker.io/saved/app:2" in out, out
    out = sdk(server, """
        sb = Sandbox(image="saved/app:2", name="from-docker-save").run()
        print("SAVED", sb.exec("cat", "/saved.txt").stdout_text)
        sb.terminate()
    """)
    assert "SAVED from docker save" in out, out
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    r = server.cli("image", "import", str(bad), "--name", "x:1", check=False)
    assert r.returncode != 0 and ("tar" in r.stderr or "oci-layout" in r.stderr), r.stderr


def test_gc_keeps_pulled_images_and_drops_removed_ones(registries, tmp_path, monkeypatch):
    if os.environ.get("COMPUTE_E2E_ISOLATION") == "gvisor":
        pytest.skip("the image store's bookkeeping does not depend on the backend; the native run covers it")
    _, reg, _ = registries
    # A store of its own: gc must be free to remove everything unused without touching the other tests' images.
    monkeypatch.setenv("COMPUTE_E2E_IMAGE_DIR", str(tmp_path / "images"))
    server = Server(tmp_path / "data", config=f'insecure_registries = ["{reg.host}"]\n')
    try:
        reg.push_image("test/gc", "1", [busybox_layer([("gc.txt", os.urandom(8).hex())])], env=["PATH=/bin"])
        ref = f"{reg.host}/test/gc:1"
        server.cli("image", "pull", ref)
        layers = [line.strip() for line in server.cli("image", "inspect", ref).stdout.splitlines() if "/layers/oci-" in line]
        assert len(layers) == 1, layers
        assert server.cli("image", "gc", "--grace", "0").stdout.startswith("removed 0 layers and 0 bases")
        assert os.path.isdir(layers[0]), "gc keeps what a stored image uses"
        server.cli("image", "rm", ref)
        gc = server.cli("image", "gc", "--grace", "0").stdout
        assert gc.startswith("removed 1 layers and 0 bases"), gc
        assert not os.path.exists(layers[0]), f"{layers[0]} outlived its image"
    finally:
        server.stop()


def test_a_musl_image_with_no_shell_runs(registries, tmp_path):
    """The agent runs in any image: here a dynamically linked musl program, musl's loader, and nothing else (no
    shell, no /etc)."""
    server, reg, _ = registries
    musl_gcc = shutil.which("musl-gcc")
    assert musl_gcc, "musl-gcc is missing: scripts/setup.sh installs musl-tools"
    (tmp_path / "hello.c").write_text('#include <stdio.h>\nint main(int c, char **v) { printf("hello from musl %s\\n", c > 1 ? v[1] : ""); return 0; }\n')
    subprocess.run([musl_gcc, "-O2", "-o", str(tmp_path / "hello"), str(tmp_path / "hello.c")], check=True)
    with open("/lib/ld-musl-x86_64.so.1", "rb") as f:
        loader = f.read()
    hello = (tmp_path / "hello").read_bytes()
    reg.push_image("test/musl", "1", [layer([("lib", "dir"), ("lib/ld-musl-x86_64.so.1", loader), ("hello", hello)])])
    out = sdk(server, f"""
        sb = Sandbox(image="{reg.host}/test/musl:1", name="musl").run()
        r = sb.exec("/hello", "there")
        print("HELLO", r.exit_code, r.stdout_text.strip())
        print("SH", sb.exec("sh", "-c", "true").error)
        sb.terminate()
    """)
    assert "HELLO 0 hello from musl there" in out, out
    assert re.search(r"SH process_failed: command not found: sh \(searched PATH=", out), out


def test_docker_hub_names_go_to_docker_hubs_endpoint_by_default(tmp_path):
    """#20 item 1: `Image.debian_slim("3.12")` (no Debian suite has 3.12) pulls python:3.12-slim-trixie from Docker
    Hub's endpoint with no mirror configured. A loopback registry stands in for that endpoint, set the way the
    default is (docker_hub_endpoint); a server left at the default, offline here, says what it tried and how to
    alias."""
    require_root()
    hub = LocalRegistry(tmp_path / "hub")
    # Image stores of their own: what the stand-in pulls must not answer other tests' Docker Hub names later.
    stand_in = Server(tmp_path / "data", config=f'docker_hub_endpoint = "http://{hub.host}"\n', images=tmp_path / "hub-images")
    default = Server(tmp_path / "default", images=tmp_path / "default-images")
    try:
        push_multiarch(hub, "library/python", "3.12-slim-trixie")
        out = sdk(stand_in, """
            sb = Sandbox(image=Image.debian_slim("3.12"), name="hub").run()
            print("ARCH", sb.exec("cat", "/arch.txt").stdout_text.strip())
            sb.terminate()
        """)
        assert "ARCH amd64" in out, out
        out = sdk(default, """
            try:
                Sandbox(image=Image.debian_slim("3.12"), name="offline").run()
                print("RAN")
            except Exception as e:
                print("REFUSED", type(e).__name__, e)
        """)
        assert "REFUSED" in out and "registry-1.docker.io" in out and "image_aliases" in out, out
    finally:
        stand_in.stop()
        default.stop()
        hub.stop()


def test_image_pull_shows_its_progress(registries, tmp_path, monkeypatch):
    """#20 item 4: `compute image pull` reports each layer stored as a line when stdout is not a terminal, and
    draws a progress bar (on stdout) when it is."""
    if os.environ.get("COMPUTE_E2E_ISOLATION") == "gvisor":
        pytest.skip("the image store's bookkeeping does not depend on the backend; the native run covers it")
    _, reg, _ = registries
    monkeypatch.setenv("COMPUTE_E2E_IMAGE_DIR", str(tmp_path / "images"))
    server = Server(tmp_path / "data", config=f'insecure_registries = ["{reg.host}"]\n')
    try:
        layers = [busybox_layer([("a.txt", os.urandom(4 << 20).hex())]), layer([("b.txt", os.urandom(1 << 20).hex())])]
        reg.push_image("test/progress", "1", layers, env=["PATH=/bin"])
        out = server.cli("image", "pull", f"{reg.host}/test/progress:1").stdout
        assert re.search(r"layer 1/2 stored \(.+ of .+\)\nlayer 2/2 stored \((\S+ \S+) of \1\)", out), out
        assert "pulled " in out, out
        if shutil.which("script"):
            reg.push_image("test/progress", "2", [busybox_layer([("c.txt", os.urandom(4 << 20).hex())])], env=["PATH=/bin"])
            cmd = f"{compute_bin()} image pull {reg.host}/test/progress:2 --data-dir {server.data_dir}"
            tty = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, timeout=120)
            assert tty.returncode == 0 and "pulled " in tty.stdout, tty
            assert "stored (" not in tty.stdout, "a terminal gets a bar, not the lines"
        else:
            print("util-linux `script` is missing: the terminal (progress bar) path is not exercised")
    finally:
        server.stop()


def test_dockerfile_copy_from_another_image(registries):
    """#20 item 4: `COPY --from=IMAGE` in dockerfile_commands copies paths out of another image (as its layers merge:
    whiteouts and opaque directories respected); a plain COPY names what to use instead."""
    server, reg, _ = registries
    push_multiarch(reg, "test/copysrc", "1")
    src = f"{reg.host}/test/copysrc:1"
    out = sdk(server, f"""
        img = Image.debian_slim("3.13").dockerfile_commands([
            "COPY --from={src} /app/hello.txt /arch.txt /opt/",
            "COPY --from={src} --chmod=700 /data /copied-data",
        ])
        sb = Sandbox(image=img, name="copy-from").run()
        def run(*cmd):
            r = sb.exec(*cmd)
            return r.exit_code, r.stdout_text.strip()
        print("HELLO", run("cat", "/opt/hello.txt"))
        print("ARCH", run("cat", "/opt/arch.txt"))
        print("DATA", run("ls", "/copied-data"))
        print("MODE", run("stat", "-c", "%a", "/copied-data/keep.txt"))
        sb.terminate()
        try:
            Sandbox(image=Image.debian_slim("3.13").dockerfile_commands(["COPY . /app"]), name="ctx").run()
        except Exception as e:
            print("REFUSED", str(e)[:300].replace("\\n", " "))
    """)
    assert "HELLO (0, 'hello')" in out and "ARCH (0, 'amd64')" in out, out
    # The top layer's whiteout hid data/old.txt.
    assert "DATA (0, 'keep.txt')" in out and "MODE (0, '700')" in out, out
    assert "REFUSED" in out and "add_local_file" in out, out
