"""Operating a server: the CLI over live workloads, and restart safety (kill -9, then start again)."""
import glob
import os
import pathlib
import re
import signal
import subprocess
import time

import pytest

from conftest import Server, compute_bin, require_root, run_sdk

START_THREE = """
from chalkcompute import Sandbox, Container, Image
ids = []
for name in ("crash-a", "crash-b", "crash-c"):
    sb = Sandbox(image=Image.debian_slim(), name=name).run()
    ids.append(sb.id)
p = Sandbox.from_id(ids[0]).exec_start("sleep", "300")
print("IDS", " ".join(ids))
"""


def leftovers(ids, data_dir):
    """Everything of these sandboxes that should be gone: mounts, cgroups, namespaces, veths, processes."""
    found = []
    with open("/proc/self/mountinfo") as f:
        found += [l.split()[4] for l in f if str(data_dir) in l.split()[4]]
    for i in ids:
        found += glob.glob(f"/sys/fs/cgroup/*/compute-*/{i}")
        if os.path.exists(f"/run/netns/compute-{i}"):
            found.append(f"netns compute-{i}")
        short = re.sub(r"[^a-z0-9]", "", i)[-11:]
        if subprocess.run(["ip", "link", "show", f"cs-{short}"], capture_output=True).returncode == 0:
            found.append(f"veth cs-{short}")
    agents = subprocess.run(["pgrep", "-f", f"compute-agent init {data_dir}"], capture_output=True, text=True).stdout.split()
    found += [f"agent pid {p}" for p in agents]
    return found


@pytest.fixture(autouse=True)
def _root():
    require_root()


def test_kill_9_then_restart_leaves_nothing_behind(tmp_path):
    server = Server(tmp_path / "data")
    try:
        proc = run_sdk(START_THREE, server.sdk_env())
        assert proc.returncode == 0, proc.stderr
        ids = re.search(r"IDS (.*)", proc.stdout).group(1).split()
        assert len(leftovers(ids, server.data_dir)) > 0, "the test must start from live sandboxes"
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        server.log.close()
        server.start()
        deadline = time.time() + 30
        while leftovers(ids, server.data_dir) and time.time() < deadline:
            time.sleep(0.2)
        assert leftovers(ids, server.data_dir) == [], "leaked after restart"
        token = server.token()
        for i in ids:
            status, body = server.connect("chalk.sandbox.v2.SandboxService/GetSandbox", {"id": i}, token)
            assert status == 200, body
            assert body["sandbox"]["status"] == "SANDBOX_STATUS_FAILED", body
            assert "server restarted" in body["sandbox"]["statusMessage"], body
        # And it works as before.
        proc = run_sdk(
            "from chalkcompute import Sandbox, Image\n"
            "sb = Sandbox(image=Image.debian_slim(), name='after-restart').run()\n"
            "print('OK', sb.exec('echo', 'fine').stdout_text.strip())\n"
            "sb.terminate()\n",
            server.sdk_env(),
        )
        assert "OK fine" in proc.stdout, proc.stderr
    finally:
        server.stop()


def parent_cgroup_of(sandbox_id):
    """The per-server parent cgroup (`compute-<hash of the data directory>`) a sandbox lives under."""
    for root in (pathlib.Path("/sys/fs/cgroup/pids"), pathlib.Path("/sys/fs/cgroup")):
        found = [p for p in root.glob(f"compute-*/{sandbox_id}") if p.is_dir()]
        if found:
            return found[0].parent
    raise AssertionError(f"no cgroup for sandbox {sandbox_id}")


def test_clean_shutdown_stops_every_sandbox(tmp_path):
    server = Server(tmp_path / "data")
    proc = run_sdk(START_THREE, server.sdk_env())
    assert proc.returncode == 0, proc.stderr
    ids = re.search(r"IDS (.*)", proc.stdout).group(1).split()
    parent = parent_cgroup_of(ids[0])
    server.stop()
    assert server.proc.returncode == 0
    assert leftovers(ids, server.data_dir) == []
    assert not parent.exists(), "a clean shutdown removes the server's parent cgroup"


def test_cli_over_live_workloads(tmp_path):
    server = Server(tmp_path / "data")
    try:
        proc = run_sdk(
            "from chalkcompute import Container, Image\n"
            "c = Container(image=Image.debian_slim(), name='cli-demo',"
            " entrypoint=['sh', '-c', 'echo tick-1; echo tick-2; sleep 300']).run()\n"
            "print('ID', c.id)\n",
            server.sdk_env(),
        )
        cid = re.search(r"ID (\S+)", proc.stdout).group(1)
        ls = server.cli("sandbox", "ls").stdout
        assert cid in ls and "cli-demo" in ls and "running" in ls, ls
        assert "cli-demo" in server.cli("container", "ls").stdout
        out = server.cli("sandbox", "exec", "cli-demo", "--", "sh", "-c", "echo out; exit 4", check=False)
        assert out.returncode == 4 and out.stdout == "out\n", out
        piped = subprocess.run(
            [compute_bin(), "sandbox", "exec", "-i", "cli-demo", "--data-dir", str(server.data_dir), "--", "wc", "-c"],
            input="12345", capture_output=True, text=True, timeout=60,
        )
        assert piped.stdout.strip() == "5", piped
        time.sleep(0.5)
        assert "tick-1\ntick-2\n" in server.cli("logs", "cli-demo").stdout
        assert "1 live workload" in server.cli("status").stdout
        server.cli("container", "stop", "cli-demo")
        assert "cli-demo" not in server.cli("container", "ls").stdout
        assert "terminated" in server.cli("sandbox", "ls", "--all").stdout
        missing = server.cli("sandbox", "rm", "no-such-sandbox", check=False)
        assert missing.returncode != 0 and "no workload named" in missing.stderr, missing
    finally:
        server.stop()


ADMISSION = """
from chalkcompute import Sandbox, Image
def run(**kw):
    try:
        return Sandbox(image=Image.debian_slim(), **kw).run()
    except Exception as e:
        print("REFUSED", kw, type(e).__name__, e)
run(name="huge", memory="1Ti")
a = run(name="adm-a", memory="1Gi")
b = run(name="adm-b", memory="1Gi")
run(name="adm-c", memory="1Gi")
a.terminate()
c = run(name="adm-c", memory="1Gi")
print("ADMITTED", c.id if c else None)
b.terminate(); c.terminate()
"""


def test_admission_control_refuses_memory_the_node_cannot_give(tmp_path):
    node = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal:")).split()[1]) * 1024
    # An overcommit that leaves room for two 1 GiB sandboxes, not three.
    factor = (2.5 * 2**30) / node
    server = Server(tmp_path / "data", extra_args=["--memory-overcommit", f"{factor:.6f}"])
    try:
        proc = run_sdk(ADMISSION, server.sdk_env(), timeout=600)
        out = proc.stdout
        refused = [l for l in out.splitlines() if l.startswith("REFUSED")]
        assert len(refused) == 2, out + proc.stderr
        huge, third = refused
        assert "'1Ti'" in huge and "resources.memory 1.0 TiB is more than this node can ever give" in huge, huge
        assert "memory_overcommit" in huge, huge
        assert "adm-c" in third and "left for sandboxes" in third and "2 live workloads" in third, third
        # Once one stopped, its memory is free again.
        assert "ADMITTED sbx-" in out, out
    finally:
        server.stop()
