"""Image builds against the official SDK: program (b), cached and partial rebuilds, and clear failures."""
import os
import re

import pytest

from conftest import PROGRAMS, Server, require_root, run_program, sdk_ok

ALIASES = '[image_aliases]\n"python:3.12-slim-trixie" = "python:3.13-slim-trixie"\n'


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    require_root()
    s = Server(tmp_path_factory.mktemp("images") / "data", config=ALIASES)
    yield s
    s.stop()


def sdk(server, body, timeout=600):
    return sdk_ok(server, "import os, time\nfrom chalkcompute import Sandbox, Container, Image", body, timeout).stdout


def layers_in_store():
    from conftest import image_dir

    root = os.path.join(image_dir(), "layers")
    return {d for d in os.listdir(root) if not d.startswith(".")}


def test_program_b_verbatim_through_an_operator_alias(builder):
    proc = run_program(PROGRAMS / "b_container_pip.py", builder.sdk_env())
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"STDOUT: hi\n EXIT: 0 IMAGE: compute.local/image@sha256:[0-9a-f]{64}", proc.stdout), proc.stdout


def test_built_image_has_its_steps_and_config(builder):
    out = sdk(builder, """
        img = (
            Image.debian_slim("3.13")
            .pip_install(["six"])
            .run_commands("echo built > /built.txt", "mkdir -p /work", "touch /work/.owners", "chown -R 1000:1000 /work")
            .env({"GREETING": "hello"})
            .workdir("/work")
        )
        sb = Sandbox(image=img, name="built").run()
        print("SIX", sb.exec("python", "-c", "import six; print(six.__name__)").stdout_text.strip())
        print("FILE", sb.exec("cat", "/built.txt").stdout_text.strip())
        print("ENV", sb.exec("sh", "-c", "echo $GREETING").stdout_text.strip())
        print("PWD", sb.exec("pwd").stdout_text.strip())
        print("OWNERS", sb.exec("stat", "-c", "%n=%u:%g", "/built.txt", "/work").stdout_text.split())
        sb.terminate()
    """)
    assert "SIX six" in out and "FILE built" in out and "ENV hello" in out and "PWD /work" in out, out
    assert "OWNERS ['/built.txt=0:0', '/work=1000:1000']" in out, out
    # On disk, a built layer holds the ids the build saw, whatever user namespace its steps ran in.
    from conftest import image_dir

    layers = os.path.join(image_dir(), "layers")
    built = [os.path.join(layers, d, "diff") for d in os.listdir(layers)]
    built = [d for d in built if os.path.exists(os.path.join(d, "work", ".owners"))]
    assert built, f"no layer holds /work/.owners under {layers}"
    for diff in built:
        ids = [(s.st_uid, s.st_gid) for s in (os.stat(os.path.join(diff, p)) for p in ("built.txt", "work", "work/.owners"))]
        assert ids == [(0, 0), (1000, 1000), (1000, 1000)], f"{diff}: {ids}"


def test_uv_pip_install_brings_uv_when_the_base_lacks_it(builder):
    out = sdk(builder, """
        img = Image.debian_slim("3.13").uv_pip_install(["six==1.16.0"])
        sb = Sandbox(image=img, name="uv-built").run()
        print("SIX", sb.exec("python", "-c", "import six; print(six.__version__)").stdout_text.strip())
        print("UV", sb.exec("uv", "--version").exit_code)
        sb.terminate()
    """)
    assert "SIX 1.16.0" in out and "UV 0" in out, out


def test_dockerfile_commands(builder):
    out = sdk(builder, """
        img = Image.debian_slim("3.13").dockerfile_commands([
            "ARG FLAVOUR=plain",
            "ENV GREETING=hi",
            "WORKDIR /srv",
            "LABEL purpose=test",
            "RUN echo $GREETING-$FLAVOUR > note.txt",
        ])
        sb = Sandbox(image=img, name="dockerfile").run()
        print("NOTE", sb.exec("cat", "/srv/note.txt").stdout_text.strip())
        print("PWD", sb.exec("pwd").stdout_text.strip())
        print("ENV", sb.exec("sh", "-c", "echo $GREETING").stdout_text.strip())
        sb.terminate()
    """)
    assert "NOTE hi-plain" in out and "PWD /srv" in out and "ENV hi" in out, out


def test_dockerfile_user_runs_later_steps_and_the_workload_as_that_user(builder):
    out = sdk(builder, """
        img = Image.debian_slim("3.13").dockerfile_commands([
            "RUN useradd --create-home --uid 1234 app",
            "USER app",
            "WORKDIR /home/app",
            "RUN id -un > built-by.txt",
        ])
        sb = Sandbox(image=img, name="as-user").run()
        print("BUILT", sb.exec("cat", "/home/app/built-by.txt").stdout_text.strip())
        print("ID", sb.exec("id", "-u").stdout_text.strip(), sb.exec("sh", "-c", "echo $HOME").stdout_text.strip())
        print("ROOTONLY", sb.exec("sh", "-c", "touch /etc/x").exit_code != 0)
        sb.terminate()
        c = Container(image=img, name="as-user-entry", entrypoint=["sh", "-c", "id -u > /tmp/who; sleep 600"]).run()
        print("ENTRY", c.exec("cat", "/tmp/who").stdout_text.strip())
        c.stop()
    """)
    assert "BUILT app" in out, out
    assert "ID 1234 /home/app" in out, out
    assert "ROOTONLY True" in out, out
    assert "ENTRY 1234" in out, out


def test_cache_hit_and_partial_rebuild(builder):
    token = builder.token()
    fresh = os.urandom(6).hex()  # the image store outlives test runs: make this recipe new
    spec = {
        "baseImage": "python:3.13-slim-trixie",
        "steps": [
            {"runCommands": {"commands": [f"echo {fresh} > /one.txt"]}},
            {"runCommands": {"commands": ["echo two > /two.txt"]}},
        ],
    }

    def build(s):
        status, body = builder.connect("chalk.sandbox.v1.CustomImageService/GetOrBuildCustomImage", {"imageSpec": s}, token)
        assert status == 200, body
        while body.get("status") == "building":
            time.sleep(0.2)
            status, body = builder.connect("chalk.sandbox.v1.CustomImageService/GetCustomImage", {"buildId": body["buildId"]}, token)
        return body

    import time

    first = build(spec)
    assert first["status"] in ("succeeded", "exists") and first["image"], first
    before = layers_in_store()
    again = build(spec)
    assert again["status"] == "exists" and again["image"] == first["image"], again
    assert layers_in_store() == before, "a cache hit must build nothing"
    changed = dict(spec, steps=[spec["steps"][0], {"runCommands": {"commands": ["echo three > /two.txt"]}}])
    third = build(changed)
    assert third["status"] == "succeeded" and third["image"] != first["image"], third
    assert len(layers_in_store() - before) == 1, "only the changed last step is rebuilt"


def test_build_failures_name_the_step(builder):
    out = sdk(builder, """
        from chalkcompute import ImageBuildError
        cases = {
            "command": Image.debian_slim("3.13").run_commands("echo about to fail", "exit 3"),
            "pip": Image.debian_slim("3.13").pip_install(["definitely-not-a-real-package-zz9"]),
            "base": Image.debian_slim("3.10"),
            "dockerfile": Image.debian_slim("3.13").dockerfile_commands(["COPY . /app"]),
        }
        for name, img in cases.items():
            try:
                Sandbox(image=img.run_commands("true") if name == "base" else img, name=f"fail-{name}").run()
                print("BUILT", name)
            except Exception as e:
                print("FAIL", name, type(e).__name__, str(e).replace(chr(10), " | ")[:400])
    """)
    assert "BUILT" not in out, out
    assert re.search(r"FAIL command (?:Sandbox|Image)BuildError .*step 1 \(run_commands\): exited with code 3.*about to fail", out), out
    assert re.search(r"FAIL pip (?:Sandbox|Image)BuildError .*step 1 \(pip_install\).*definitely-not-a-real-package-zz9", out), out
    assert re.search(r"FAIL base .*3\.10", out), out
    # A COPY from a build context (the SDK sends none) says what to use instead.
    assert re.search(r"FAIL dockerfile (?:Sandbox|Image)BuildError .*step 1 \(dockerfile_commands\): COPY \. /app: COPY "
                     r"from a build context.*add_local_file.*COPY --from=IMAGE", out), out


def test_default_sandbox_image(builder):
    # `Sandbox()` without an image builds the SDK's `Image.sandbox()`: an apt-get run_commands step (through the
    # proxy, with the host's CA) and workdir /workspace, which exists for its processes.
    out = sdk(builder, """
        sb = Sandbox(name="default-image").run()
        print("PWD", sb.exec("pwd").stdout_text.strip())
        print("GIT", sb.exec("git", "--version").exit_code)
        sb.terminate()
    """)
    assert "PWD /workspace" in out and "GIT 0" in out, out


def test_image_commands_ls_inspect_resolve_rm_gc(tmp_path, monkeypatch):
    require_root()
    if os.environ.get("COMPUTE_E2E_ISOLATION") == "gvisor":
        pytest.skip("the image store's bookkeeping does not depend on the backend; the native run covers it")
    # A store of its own: gc must be free to remove everything unused without slowing the other tests.
    monkeypatch.setenv("COMPUTE_E2E_IMAGE_DIR", str(tmp_path / "images"))
    s = Server(tmp_path / "data")
    try:
        out = sdk(s, """
            img = Image.debian_slim("3.13").run_commands("echo inventory > /inventory.txt")
            sb = Sandbox(image=img, name="inv").run()
            print("FILE", sb.exec("cat", "/inventory.txt").stdout_text.strip())
            import os, sys
            sys.stdout.flush()
            os._exit(0)  # leave it running
        """)
        assert "FILE inventory" in out, out
        ref = re.search(r"compute\.local/image@sha256:[0-9a-f]{64}", s.cli("sandbox", "ls").stdout).group(0)
        ls = s.cli("image", "ls").stdout.splitlines()
        assert sorted(line.split()[0] for line in ls[1:]) == ["base", "built"], ls
        built = s.cli("image", "inspect", ref).stdout
        assert "kind:       built" in built and "debian archive" in built and "/inventory" not in built, built
        base = s.cli("image", "inspect", "python:3.13-slim-trixie").stdout
        assert "kind:       base" in base, base
        assert "rootfs" in s.cli("image", "resolve", "python:3.13-slim-trixie").stdout
        busy = s.cli("image", "rm", ref, check=False)
        assert busy.returncode != 0 and "live workload" in busy.stderr, busy.stderr
        kept = s.cli("image", "gc", "--grace", "0").stdout
        assert kept.startswith("removed 0 layers and 0 bases"), kept
        s.cli("sandbox", "rm", "inv")
        s.cli("image", "rm", ref)
        gc = s.cli("image", "gc", "--grace", "0").stdout
        assert re.match(r"removed 1 layers and 1 bases", gc), gc
        assert s.cli("image", "ls").stdout.splitlines()[1:] == []
        missing = s.cli("image", "inspect", "compute.local/image@sha256:" + "0" * 64, check=False)
        assert missing.returncode != 0 and "holds no image" in missing.stderr, missing.stderr
    finally:
        s.stop()


def test_a_step_past_the_build_timeout_fails_naming_it(tmp_path):
    require_root()
    s = Server(tmp_path / "data", config='build_step_timeout = "3s"\n')
    try:
        out = sdk(s, """
            try:
                Sandbox(image=Image.debian_slim("3.13").run_commands("sleep 60"), name="slow").run()
                print("RAN")
            except Exception as e:
                print("FAIL", type(e).__name__, e)
        """)
        assert re.search(r"FAIL \w+ .*step 1 \(run_commands\).*timed out after 3s", out), out
    finally:
        s.stop()


def test_build_outcomes_survive_a_server_restart(tmp_path):
    require_root()
    import time

    s = Server(tmp_path / "data")
    try:
        fresh = os.urandom(6).hex()

        def poll(spec):
            token = s.token()
            status, body = s.connect("chalk.sandbox.v1.CustomImageService/GetOrBuildCustomImage", {"imageSpec": spec}, token)
            assert status == 200, body
            while body.get("status") == "building":
                time.sleep(0.2)
                status, body = s.connect("chalk.sandbox.v1.CustomImageService/GetCustomImage",
                                         {"buildId": body["buildId"]}, token)
            return body

        bad = poll({"baseImage": "python:3.13-slim-trixie", "steps": [{"runCommands": {"commands": [f"echo {fresh}; exit 7"]}}]})
        good = poll({"baseImage": "python:3.13-slim-trixie", "steps": [{"runCommands": {"commands": [f"echo {fresh} > /ok"]}}]})
        assert bad["status"] == "failed" and good["status"] == "succeeded", (bad, good)
        s.stop()
        s.start()
        token = s.token()
        status, again = s.connect("chalk.sandbox.v1.CustomImageService/GetCustomImage", {"buildId": bad["buildId"]}, token)
        assert status == 200 and again["status"] == "failed" and "exited with code 7" in again.get("error", ""), again
        status, again = s.connect("chalk.sandbox.v1.CustomImageService/GetCustomImage", {"buildId": good["buildId"]}, token)
        assert status == 200 and again["status"] == "succeeded" and again["image"] == good["image"], again
        status, unknown = s.connect("chalk.sandbox.v1.CustomImageService/GetCustomImage", {"buildId": "build-" + "0" * 24}, token)
        assert status == 404 and "GetOrBuildCustomImage again" in unknown["message"], unknown
    finally:
        s.stop()


def test_from_dockerfile_and_with_tmux(builder, tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "FROM python:3.13-slim-trixie\nENV APP_MODE=docker\nRUN echo from-dockerfile > /marker.txt\nWORKDIR /srv\n"
    )
    out = sdk(builder, f"""
        sb = Sandbox(image=Image.from_dockerfile({str(dockerfile)!r}), name="from-df").run()
        print("DF", repr(sb.exec("sh", "-c", "cat /marker.txt; echo $APP_MODE; pwd").stdout_text))
        sb.terminate()
        sb = Sandbox(image=Image.debian_slim("3.13").with_tmux(), name="tmux").run()
        print("TMUX", sb.exec("tmux", "-V").stdout_text.strip())
        sb.terminate()
    """)
    assert "DF 'from-dockerfile\\ndocker\\n/srv\\n'" in out, out
    assert "TMUX tmux " in out, out


def test_compute_logs_prints_a_builds_steps(builder):
    token = builder.token()
    marker = os.urandom(4).hex()
    spec = {
        "baseImage": "python:3.13-slim-trixie",
        "steps": [
            {"runCommands": {"commands": [f"echo first-{marker}"]}},
            {"runCommands": {"commands": [f"echo second-{marker}; exit 4"]}},
        ],
    }
    status, body = builder.connect("chalk.sandbox.v1.CustomImageService/GetOrBuildCustomImage", {"imageSpec": spec}, token)
    assert status == 200, body
    out = builder.cli("logs", "--follow", body["buildId"], check=False)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"first-{marker}" in text and f"second-{marker}" in text, text
    assert text.index("--- step 1 ---") < text.index(f"first-{marker}") < text.index("--- step 2 ---"), text
    assert "failed" in out.stderr, out.stderr
    unknown = builder.cli("logs", "build-" + "0" * 24, check=False)
    assert unknown.returncode != 0 and "unknown" in unknown.stderr, unknown.stderr


def test_helpers_that_need_unreachable_hosts_fail_with_the_builds_own_error(builder):
    if os.environ.get("COMPUTE_E2E_ISOLATION") == "gvisor":
        pytest.skip("a failing build step reports the same way under both backends; the native run covers it")
    # with_gh and with_claude_code add third-party apt repositories whose hosts this machine cannot reach: the
    # build fails at the step that fetches from them, and says so with the step's own output.
    out = sdk(builder, """
        for name, img in {"gh": Image.debian_slim("3.13").with_gh(),
                          "claude": Image.debian_slim("3.13").with_claude_code()}.items():
            try:
                Sandbox(image=img, name=f"helper-{name}").run()
                print("BUILT", name)
            except Exception as e:
                msg = str(e).replace(chr(10), " | ")
                print("FAIL", name, type(e).__name__, msg[:120], "...", msg[-200:])
    """, timeout=900)
    assert "BUILT" not in out, out
    assert re.search(r"FAIL gh (?:Sandbox|Image)BuildError .*step 1 \(run_commands\): exited with code 6.*"
                     r"curl: \(6\) Could not resolve host: cli\.github\.com", out), out
    assert re.search(r"FAIL claude (?:Sandbox|Image)BuildError .*step \d+ \(run_commands\): exited with code \d+.*"
                     r"curl: \(\d+\)", out), out


def build_raw(server, token, spec, timeout=600):
    """GetOrBuildCustomImage over Connect JSON (for build steps SDK 2.13.11 has no builder method for), polled
    until done; returns the final answer."""
    import time

    status, body = server.connect("chalk.sandbox.v1.CustomImageService/GetOrBuildCustomImage", {"imageSpec": spec}, token)
    if status != 200:
        return status, body
    deadline = time.time() + timeout
    while body.get("status") == "building" and time.time() < deadline:
        time.sleep(1)
        status, body = server.connect("chalk.sandbox.v1.CustomImageService/GetCustomImage", {"buildId": body["buildId"]}, token)
    return status, body


def test_uv_sync_installs_a_projects_locked_dependencies(builder):
    if os.environ.get("COMPUTE_E2E_ISOLATION") == "gvisor":
        pytest.skip("build steps run the same way under both backends; the native run covers uv_sync")
    import base64

    import lz4.block
    import lz4.frame

    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    pyproject = (b'[project]\nname = "demo"\nversion = "0.1.0"\nrequires-python = ">=3.11"\n'
                 b'dependencies = ["six==1.16.0"]\n[project.optional-dependencies]\nfmt = ["idna==3.10"]\n')
    token = builder.token()
    # No lock: uv resolves (and leaves the uv.lock it made beside pyproject.toml); the extra is included.
    status, first = build_raw(builder, token, {"baseImage": "python:3.13-slim-trixie", "steps": [
        {"uvSync": {"pyprojectTomlLz4": b64(lz4.frame.compress(pyproject)), "extras": ["fmt"]}}]})
    assert status == 200 and first.get("status") in ("succeeded", "exists"), first
    out = sdk(builder, f"""
        sb = Sandbox(image={first["image"]!r}, name="uvsync").run()
        print("VERSIONS", sb.exec("python", "-c", "import six, idna; print(six.__version__, idna.__version__)").stdout_text.strip())
        print("LOCK", sb.exec("sh", "-c", "test -s /app/uv.lock && grep -c '^name = ' /app/uv.lock").stdout_text.strip())
        import base64
        print("LOCKB64", base64.b64encode(sb.fs.read_file("/app/uv.lock") if hasattr(sb.fs, "read_file") else sb.exec("cat", "/app/uv.lock").stdout).decode())
        sb.terminate()
    """)
    assert "VERSIONS 1.16.0 3.10" in out, out
    lock = base64.b64decode(re.search(r"LOCKB64 (\S+)", out).group(1))
    assert b'name = "six"' in lock, lock[:400]
    # With that lock (as a size-prefixed LZ4 block) in another directory: exactly the locked versions.
    status, second = build_raw(builder, token, {"baseImage": "python:3.13-slim-trixie", "steps": [
        {"uvSync": {"pyprojectTomlLz4": b64(lz4.frame.compress(pyproject)),
                    "uvLockLz4": b64(lz4.block.compress(lock, store_size=True)), "workdir": "/srv/proj"}}]})
    assert status == 200 and second.get("status") in ("succeeded", "exists"), second
    out = sdk(builder, f"""
        sb = Sandbox(image={second["image"]!r}, name="uvsync-locked").run()
        print("SIX", sb.exec("python", "-c", "import six; print(six.__version__)").stdout_text.strip())
        print("FILES", sb.exec("ls", "/srv/proj").stdout_text.split())
        sb.terminate()
    """)
    assert "SIX 1.16.0" in out, out
    assert "FILES ['pyproject.toml', 'uv.lock']" in out, out
    # A payload that is not LZ4 fails the build at once (as every malformed step does: the SDK raises
    # ImageBuildError with the message), naming the step and the field.
    status, bad = builder.connect("chalk.sandbox.v1.CustomImageService/GetOrBuildCustomImage", {"imageSpec": {
        "baseImage": "python:3.13-slim-trixie", "steps": [{"uvSync": {"pyprojectTomlLz4": b64(b"plain text, not lz4")}}]}}, token)
    assert status == 200 and bad["status"] == "failed", bad
    assert bad["error"].startswith("build step 1 (uv_sync): pyproject_toml_lz4: not LZ4 data"), bad


def test_the_seeds_chain_and_every_remaining_builder_method(builder, tmp_path):
    if os.environ.get("COMPUTE_E2E_ISOLATION") == "gvisor":
        pytest.skip("build steps run the same way under both backends; the native run covers these builders")
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("six==1.16.0\n")
    uv_reqs = tmp_path / "uv-requirements.txt"
    uv_reqs.write_text("idna==3.10\n")
    out = sdk(builder, f"""
        # The seed's chain (its Python 3.12 through the operator alias; a lighter package than ffmpeg).
        img = (
            Image.debian_slim("3.12")
            .pip_install(["six"])
            .run_commands("apt-get update", "apt-get install -y --no-install-recommends jq")
            .apt_install(["tree"])
            .pip_install_from_requirements({str(reqs)!r})
            .uv_pip_install_from_requirements({str(uv_reqs)!r})
            .entrypoint(["/bin/sh", "-c"])
            .cmd(["echo from-cmd"])
        )
        sb = Sandbox(image=img, name="chain").run()
        print("JQ", sb.exec("sh", "-c", "echo '{{\\"a\\": 7}}' | jq .a").stdout_text.strip())
        print("TREE", sb.exec("tree", "--version").exit_code)
        print("PY", sb.exec("python", "-c", "import six, idna; print(six.__version__, idna.__version__)").stdout_text.strip())
        sb.terminate()
    """, timeout=900)
    assert "JQ 7" in out and "TREE 0" in out and "PY 1.16.0 3.10" in out, out
    listed = [line for line in builder.cli("sandbox", "ls", "--all").stdout.splitlines() if " chain " in f" {line} "]
    ref = re.search(r"compute\.local/image@sha256:[0-9a-f]{64}", "\n".join(listed))
    assert ref, listed
    config = builder.cli("image", "inspect", ref.group(0)).stdout
    assert '"entrypoint":["/bin/sh","-c"]' in config.replace(" ", "") and '"cmd":["echofrom-cmd"]' in config.replace(" ", ""), config
    assert "operator alias python:3.12-slim-trixie -> python:3.13-slim-trixie" in config, config


def test_identical_concurrent_builds_join_one(builder):
    import concurrent.futures

    token = builder.token()
    fresh = os.urandom(6).hex()
    spec = {"baseImage": "python:3.13-slim-trixie",
            "steps": [{"runCommands": {"commands": [f"sleep 2; echo {fresh} > /joined.txt"]}}]}
    before = layers_in_store()

    def ask(_):
        return builder.connect("chalk.sandbox.v1.CustomImageService/GetOrBuildCustomImage", {"imageSpec": spec}, token)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert all(status == 200 for status, _ in answers), answers
    assert len({body["buildId"] for _, body in answers}) == 1, answers
    assert all(body["status"] == "building" for _, body in answers), answers
    status, done = build_raw(builder, token, spec)
    assert done["status"] in ("succeeded", "exists"), done
    assert len(layers_in_store() - before) == 1, "eight identical requests built one layer"
    log = builder.cli("logs", answers[0][1]["buildId"]).stdout
    assert log.count("step 1") <= 2, log  # one build's log, not eight
