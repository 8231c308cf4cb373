"""End-to-end fixtures: a real `compute serve` on a free port with a temporary data directory, and a way to run
SDK programs against it in fresh interpreter processes (the SDK caches auth per process)."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import textwrap
import sys
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The SDK programs (a)-(g) every part of the system must serve, copied verbatim from the reference set.
PROGRAMS = ROOT / "tests" / "e2e" / "sdk_programs"


def image_dir():
    """One image store for the whole suite: base images are built once, not per test server."""
    d = os.environ.get("COMPUTE_E2E_IMAGE_DIR") or str(ROOT / "target" / "e2e-images")
    os.makedirs(d, exist_ok=True)
    return d


def isolation_args():
    """`COMPUTE_E2E_ISOLATION=gvisor|native` runs the suite under that backend (the test script runs both)."""
    iso = os.environ.get("COMPUTE_E2E_ISOLATION")
    return ["--isolation", iso] if iso else []


def compute_bin():
    path = os.environ.get("COMPUTE_BIN") or str(ROOT / "target" / "debug" / "compute")
    if not os.access(path, os.X_OK):
        pytest.fail(f"compute binary not found at {path}: build it (cargo build) or set COMPUTE_BIN", pytrace=False)
    return path


class Server:
    def __init__(self, data_dir, extra_args=(), config=None, images=None):
        """`images`: an image store of its own (default: the suite's shared one)."""
        self.data_dir = pathlib.Path(data_dir)
        self.extra_args = list(extra_args)
        self.images = str(images) if images else None
        self.proc = None
        if config is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            (self.data_dir / "config.toml").write_text(config)
        self.start()

    def start(self):
        info = self.data_dir / "server.json"
        if info.exists():
            info.unlink()
        self.log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab")
        self.proc = subprocess.Popen(
            [
                compute_bin(),
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(self.data_dir),
                "--image-dir",
                self.images or image_dir(),
                *isolation_args(),
                *self.extra_args,
            ],
            stdout=self.log,
            stderr=self.log,
        )
        deadline = time.time() + 30
        while True:
            try:
                self.info = json.loads(info.read_text())
                break
            except (FileNotFoundError, json.JSONDecodeError):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"compute serve exited with {self.proc.returncode}; see {self.log.name}")
                if time.time() > deadline:
                    raise RuntimeError("compute serve did not start within 30 s")
                time.sleep(0.02)
        creds = json.loads((self.data_dir / "admin-credentials.json").read_text())
        self.url = self.info["url"]
        self.client_id = creds["client_id"]
        self.client_secret = creds["client_secret"]
        self.environment_id = creds["environment_id"]

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def cli(self, *args, check=True):
        args = list(args)
        # Options go before a `--` that starts a command line.
        at = args.index("--") if "--" in args else len(args)
        argv = [compute_bin(), *args[:at], "--data-dir", str(self.data_dir), *args[at:]]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise AssertionError(f"compute {' '.join(args)} failed: {out.stderr}")
        return out

    def sdk_env(self, **extra):
        """An environment with the three variables `compute env` prints, and nothing else of Chalk's."""
        env = clean_env()
        env.update(CHALK_API_SERVER=self.url, CHALK_CLIENT_ID=self.client_id, CHALK_CLIENT_SECRET=self.client_secret)
        env.update(extra)
        return env

    def metrics(self):
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            return r.read().decode()

    def connect(self, method, body, token=None):
        """A Connect JSON unary call; returns (http status, parsed body)."""
        req = urllib.request.Request(f"{self.url}/{method}", data=json.dumps(body).encode(), method="POST")
        req.add_header("content-type", "application/json")
        if token:
            req.add_header("authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def token(self, client_id=None, secret=None, scope=None):
        body = {"clientId": client_id or self.client_id, "clientSecret": secret or self.client_secret}
        if scope:
            body["scope"] = scope
        status, out = self.connect("chalk.server.v1.AuthService/GetToken", body)
        assert status == 200, out
        return out["accessToken"]


def clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHALK_", "_CHALK_"))}
    env.pop("XDG_CONFIG_HOME", None)
    return env


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "data")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for a module's tests (sandbox tests start many workloads; a server each would only add
    start-up time)."""
    s = Server(tmp_path_factory.mktemp("shared") / "data")
    yield s
    s.stop()


def free_port():
    """A TCP port on loopback that nothing listens on right now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout=90):
    """Polls `check()` (which answers (done, what it saw)) until done; returns what it saw, or fails naming it."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        ok, last = check()
        if ok:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


def require_root():
    if os.geteuid() != 0:
        pytest.fail("sandbox tests need root (namespaces, cgroups, mounts): run the suite as root", pytrace=False)


def run_sdk(code, env, timeout=120, cwd=None):
    """Runs `code` with the SDK in a new interpreter; returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def sdk_ok(server, prelude, body, timeout=600):
    """Runs `prelude` and the dedented `body` with the SDK against `server`; fails the test, showing both streams,
    unless the program exits 0. Returns the CompletedProcess."""
    proc = run_sdk(prelude + "\n" + textwrap.dedent(body), server.sdk_env(), timeout=timeout)
    assert proc.returncode == 0, f"SDK program failed\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def run_program(path, env, timeout=600, cwd=None):
    return subprocess.run(
        [sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd or path.parent
    )
