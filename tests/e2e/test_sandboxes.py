"""Sandboxes and containers against the official SDK: programs (a) and (g) verbatim, exec sessions, stdin,
signals, PTYs, timeouts, files, limits, isolation and bad input."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import PROGRAMS, require_root, run_program, run_sdk, sdk_ok


@pytest.fixture(scope="module", autouse=True)
def _root():
    require_root()


def sdk(server, body, timeout=300):
    """Runs `body` (with `sb` bound to a fresh sandbox, terminated afterwards) and returns stdout."""
    prelude = "import signal, time, hashlib, os, sys\nfrom chalkcompute import Sandbox, Container, Image"
    return sdk_ok(server, prelude, body, timeout).stdout


def test_program_a_container_verbatim(shared_server):
    proc = run_program(PROGRAMS / "a_container.py", shared_server.sdk_env())
    assert proc.returncode == 0, proc.stderr
    assert "STDOUT: hi\n EXIT: 0" in proc.stdout, proc.stdout


def test_program_g_sandbox_verbatim(shared_server):
    proc = run_program(PROGRAMS / "g_sandbox.py", shared_server.sdk_env())
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "EXEC: hello world" in out, out
    assert "CAT: ExecResult(stdout=b'line1\\nline2\\n', stderr=b'', exit_code=0" in out, out
    assert "SIGNAL: ExecResult(stdout=b'', stderr=b'', exit_code=None, signal=15" in out, out
    assert "FS: b'filedata'" in out, out


def test_exit_codes_missing_commands_and_timeouts(shared_server):
    out = sdk(shared_server, """
        sb = Sandbox(image=Image.debian_slim(), name="codes").run()
        r = sb.exec("sh", "-c", "echo out; echo err >&2; exit 7")
        print("R1", repr(r.stdout), repr(r.stderr), r.exit_code)
        r = sb.exec("definitely-not-a-command", "x")
        print("R2", r.error)
        r = sb.exec("sleep", "30", timeout_secs=1)
        print("R3", r.error, r.exit_code, r.signal)
        r = sb.exec("pwd", workdir="/tmp")
        print("R4", r.stdout_text.strip())
        r = sb.exec("sh", "-c", "echo $FOO", env={"FOO": "bar"})
        print("R5", r.stdout_text.strip())
        c = Container.from_id(sb.id)
        r = c.exec("sh", "-c", "exit 3")
        print("R6", r.exit_code)
        r = c.exec("nope-cmd")
        print("R7", r.exit_code, r.stderr_text.strip())
        sb.terminate()
    """)
    assert "R1 b'out\\n' b'err\\n' 7" in out, out
    assert "R2 process_failed: command not found: definitely-not-a-command" in out, out
    assert re.search(r"R3 timed_out: Process timed out None 9", out), out
    assert "R4 /tmp" in out and "R5 bar" in out, out
    assert "R6 3" in out, out
    assert "R7 127 command not found: nope-cmd" in out, out


def test_signals(shared_server):
    out = sdk(shared_server, """
        sb = Sandbox(image=Image.debian_slim(), name="signals").run()
        for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGHUP):
            p = sb.exec_start("sleep", "60")
            time.sleep(0.3)
            p.send_signal(sig)
            r = p.wait()
            print("SIG", int(sig), r.signal, r.exit_code)
        sb.terminate()
    """)
    for sig in (15, 9, 2, 1):
        assert f"SIG {sig} {sig} None" in out, out


# glibc 2.42 (Debian sid, the SDK's default python:3.14 image here) reads terminal settings with TCGETS2, which
# runsc 2024-07 does not implement: every terminal ioctl of such an image answers ENOTTY under gVisor. Older glibc
# (trixie's 2.41) uses TCGETS and works.
GVISOR_SID_PTY = pytest.mark.xfail(
    os.environ.get("COMPUTE_E2E_ISOLATION") == "gvisor",
    strict=True,
    reason="runsc 2024-07 lacks the TCGETS2 ioctl that glibc 2.42 (Debian sid) uses for terminal settings",
)


def test_signal_handlers_in_the_process_decide(shared_server):
    out = sdk(shared_server, """
        sb = Sandbox(image=Image.debian_slim(), name="handlers").run()
        p = sb.exec_start("sh", "-c", "trap 'echo got-usr1; exit 42' USR1; echo ready; while :; do sleep 0.05; done")
        text, code = "", None
        for ev in p.output():
            if ev.stdout:
                text += ev.stdout
                if "ready" in ev.stdout:
                    p.send_signal(signal.SIGUSR1)
            if ev.is_exited:
                code = ev.exit_code
        print("USR1", code, text.replace("ready", "").strip())
        sb.terminate()
    """)
    assert "USR1 42 got-usr1" in out, out


def test_streaming_50mb_of_stdin_through_cat(shared_server):
    out = sdk(shared_server, """
        sb = Sandbox(image=Image.debian_slim(), name="stdin50").run()
        p = sb.exec_start("sh", "-c", "cat | sha256sum")
        h = hashlib.sha256()
        block = os.urandom(1 << 20)
        for i in range(50):
            chunk = bytes([i]) + block[1:]
            h.update(chunk)
            p.write_stdin(chunk)
        p.close_stdin()
        r = p.wait()
        print("WANT", h.hexdigest())
        print("GOT", r.stdout_text.split()[0], r.exit_code)
        sb.terminate()
    """, timeout=600)
    want = re.search(r"WANT (\w+)", out).group(1)
    assert f"GOT {want} 0" in out, out


def server_rss(server):
    with open(f"/proc/{server.proc.pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) * 1024


def test_100mb_of_output_through_one_session_with_bounded_memory(shared_server):
    before = server_rss(shared_server)
    out = sdk(shared_server, """
        sb = Sandbox(image=Image.debian_slim(), name="out100").run()
        n = 0
        h = hashlib.sha256()
        cmd = "yes abcdefghijklmnopqrstuvwxyz0123456789 | head -c 104857600 | tee /tmp/blob; sha256sum /tmp/blob >&2"
        for ev in sb.exec_stream("sh", "-c", cmd):
            if ev.stdout is not None:
                n += len(ev.stdout); h.update(ev.stdout.encode())
            elif ev.stderr is not None:
                print("ERR", ev.stderr.split()[0])
        print("BYTES", n, h.hexdigest())
        sb.terminate()
    """, timeout=600)
    m = re.search(r"BYTES (\d+) (\w+)", out)
    assert m and int(m.group(1)) == 100 << 20, out
    assert f"ERR {m.group(2)}" in out, out
    grown = server_rss(shared_server) - before
    # The server holds at most a replay buffer per session, not the stream.
    assert grown < 64 << 20, f"server memory grew by {grown} bytes while streaming 100 MiB"


def test_50_concurrent_execs_in_one_sandbox(shared_server):
    out = sdk(shared_server, """
        from concurrent.futures import ThreadPoolExecutor
        sb = Sandbox(image=Image.debian_slim(), name="conc50").run()
        def one(i):
            r = sb.exec("sh", "-c", f"sleep 0.2; echo {i}")
            return r.stdout_text.strip() == str(i) and r.exit_code == 0
        with ThreadPoolExecutor(50) as pool:
            ok = list(pool.map(one, range(50)))
        print("OK", sum(ok))
        sb.terminate()
    """)
    assert "OK 50" in out, out


def test_20_sandboxes_at_once(shared_server):
    out = sdk(shared_server, """
        from concurrent.futures import ThreadPoolExecutor
        def one(i):
            sb = Sandbox(image=Image.debian_slim(), name=f"many-{i}").run()
            r = sb.exec("hostname")
            sb.terminate()
            return r.stdout_text.strip()
        with ThreadPoolExecutor(20) as pool:
            names = list(pool.map(one, range(20)))
        print("NAMES", sorted(names) == sorted(f"many-{i}" for i in range(20)))
    """, timeout=600)
    assert "NAMES True" in out, out


def test_100mb_upload_and_download(shared_server):
    out = sdk(shared_server, """
        sb = Sandbox(image=Image.debian_slim(), name="files100").run()
        data = os.urandom(100 << 20)
        sb.fs.write_bytes("/data/deep/dir/blob.bin", data)
        r = sb.exec("sha256sum", "/data/deep/dir/blob.bin")
        print("INSIDE", r.stdout_text.split()[0] == hashlib.sha256(data).hexdigest())
        back = sb.fs.read_bytes("/data/deep/dir/blob.bin")
        print("BACK", len(back), back == data)
        sb.fs.write_bytes("/tmp/script.sh", b"#!/bin/sh\\necho ran\\n", mode=0o755)
        print("MODE", sb.exec("/tmp/script.sh").stdout_text.strip(), sb.exec("stat", "-c", "%a", "/tmp/script.sh").stdout_text.strip())
        from chalkcompute._sandbox_fs import SandboxFileSystemError
        for path in ("/nope/missing.txt", "/tmp"):
            try:
                sb.fs.read_bytes(path)
            except SandboxFileSystemError as e:
                print("FSERR", path, e.error, e.errno, e)
        sb.terminate()
    """, timeout=600)
    assert "INSIDE True" in out and f"BACK {100 << 20} True" in out, out
    assert "MODE ran 755" in out, out
    assert re.search(r"FSERR /nope/missing.txt NOT_FOUND 2 .*No such file", out), out
    assert re.search(r"FSERR /tmp FAILED_PRECONDITION 21 .*is a directory", out), out


def test_limits_are_enforced_and_visible_inside(shared_server):
    # Native: the sandbox's cgroup namespace shows its own cgroup. gVisor: the host cgroup around the sandbox
    # enforces the limits and the agent shows them in gVisor's emulated cgroup filesystem.
    out = sdk(shared_server, """
        sb = Sandbox(image=Image.debian_slim(), name="limits", cpu="500m", memory="256Mi").run()
        print("MEM", sb.exec("cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes").stdout_text.strip())
        print("CPU", sb.exec("cat", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us").stdout_text.strip())
        sb.terminate()
    """)
    assert f"MEM {256 << 20}" in out, out
    assert "CPU 50000" in out, out


def isolation():
    return os.environ.get("COMPUTE_E2E_ISOLATION", "native")


def test_memory_hog_is_contained(shared_server):
    out = sdk(shared_server, """
        sb = Sandbox(image=Image.debian_slim(), name="hog", memory="256Mi").run()
        try:
            r = sb.exec("python3", "-c", "x = bytearray(512 * 1024 * 1024); print('survived')")
            print("HOG", r.signal, r.stdout_text.strip())
            print("AFTER", sb.exec("echo", "alive").stdout_text.strip())
        except Exception as e:
            time.sleep(1)
            info = sb.refresh()
            print("SANDBOX", info.status, info.status_message)
        other = Sandbox(image=Image.debian_slim(), name="hog-bystander").run()
        print("OTHER", other.exec("echo", "fine").stdout_text.strip())
        other.terminate()
        sb.terminate()
    """)
    if isolation() == "gvisor":
        # gVisor's Sentry holds the whole sandbox's memory: the sandbox ends, saying why.
        assert re.search(r"HOG 9|SANDBOX FAILED the sandbox was OOM-killed", out, re.I), out
    else:
        # Native: the hog alone is killed; the sandbox goes on.
        assert re.search(r"HOG 9 *\n", out) and "AFTER alive" in out, out
    assert "OTHER fine" in out, out


def test_disk_filling_is_contained(shared_server):
    out = sdk(shared_server, """
        sb = Sandbox(image=Image.debian_slim(), name="diskfill", memory="1Gi").run()
        r = sb.exec("sh", "-c", "dd if=/dev/zero of=/big bs=1M count=4096 2>&1")
        print("DISK", r.exit_code, r.stdout_text.replace(chr(10), " "))
        sb.exec("rm", "-f", "/big")
        print("ALIVE", sb.exec("echo", "ok").stdout_text.strip())
        sb.terminate()
    """)
    assert "No space left on device" in out, out
    assert "ALIVE ok" in out, out


def test_fork_bomb_is_contained(tmp_path):
    from conftest import Server

    server = Server(tmp_path / "bomb", ["--pids-limit", "128"])
    try:
        out = sdk(server, """
            sb = Sandbox(image=Image.debian_slim(), name="forkbomb", memory="2Gi").run()
            bomb = "import os, time\\nn = 0\\ntry:\\n    while n < 10000:\\n        if os.fork() == 0:\\n            time.sleep(60); os._exit(0)\\n        n += 1\\nexcept OSError as e:\\n    print(n, e.errno, flush=True)\\n    os._exit(0)"
            try:
                r = sb.exec("python3", "-c", bomb, timeout_secs=120)
                print("BOMB", r.stdout_text.strip())
                print("DURING", sb.exec("echo", "still-serving").stdout_text.strip())
            except Exception as e:
                print("ENDED", e)
            other = Sandbox(image=Image.debian_slim(), name="bystander").run()
            print("OTHER", other.exec("echo", "fine").stdout_text.strip())
            other.terminate()
            sb.terminate()
        """)
    finally:
        server.stop()
    # Both backends: natively the host's pids cgroup stops it; under gVisor, gVisor's own pids cgroup around the
    # workload (the agent outside it keeps serving). gVisor's controller admits a few more than pids.max (144 of
    # 128 measured with runsc 2024-07), so it gets a margin.
    m = re.search(r"BOMB (\d+) (\d+)", out)
    most = 128 if isolation() == "native" else 2 * 128
    assert m and int(m.group(1)) < most and m.group(2) == "11", f"the fork bomb was not stopped by EAGAIN: {out}"
    assert "DURING still-serving" in out, out
    assert "OTHER fine" in out, out


def test_isolation_from_host_and_other_sandboxes(shared_server, tmp_path):
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host only")
    out = sdk(shared_server, f"""
        a = Sandbox(image=Image.debian_slim(), name="iso-a").run()
        b = Sandbox(image=Image.debian_slim(), name="iso-b").run()
        b.fs.write_bytes("/tmp/b-only.txt", b"b")
        print("PIDS", a.exec("sh", "-c", "ls /proc | grep '^[0-9]' | wc -l").stdout_text.strip())
        print("HOSTFILE", a.exec("cat", "{secret}").exit_code)
        print("DATADIR", a.exec("ls", "{shared_server.data_dir}").exit_code)
        print("BFILE", a.exec("cat", "/tmp/b-only.txt").exit_code)
        print("HOSTNAME", a.exec("hostname").stdout_text.strip())
        print("MOUNT", a.exec("sh", "-c", "mount -t tmpfs x /mnt 2>&1; echo $?").stdout_text.strip().splitlines()[-1])
        ip_b = b.exec("python3", "-c", "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('10.255.255.255', 1)); print(s.getsockname()[0])").stdout_text.strip()
        b.exec("sh", "-c", "python3 -m http.server 8000 --bind 0.0.0.0 >/dev/null 2>&1 &")
        probe = "import time, urllib.request\\nfor _ in range(100):\\n    try:\\n        print(urllib.request.urlopen('http://127.0.0.1:8000/', timeout=5).status); break\\n    except OSError:\\n        time.sleep(0.1)"
        print("SELF", b.exec("python3", "-c", probe).stdout_text.strip())
        r = a.exec("python3", "-c", f"import socket; socket.create_connection(('{{ip_b}}', 8000), timeout=3); print('connected')")
        print("CROSS", r.exit_code, r.stdout_text.strip())
        a.terminate(); b.terminate()
    """)
    pids = int(re.search(r"PIDS (\d+)", out).group(1))
    assert pids < 10, f"host processes are visible: {out}"
    assert "HOSTFILE 1" in out and "DATADIR 2" in out and "BFILE 1" in out, out
    assert "HOSTNAME iso-a" in out, out
    assert "MOUNT 32" in out or "MOUNT 1" in out, out
    assert "SELF 200" in out, out
    assert re.search(r"CROSS 1 \n|CROSS 1$", out, re.M), out


def test_sandbox_cannot_reach_the_servers_host(shared_server):
    import socket

    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        out = sdk(shared_server, f"""
            sb = Sandbox(image=Image.debian_slim(), name="nohost").run()
            gw = sb.exec("sh", "-c", "awk '$2 == \\"00000000\\" {{print $3}}' /proc/net/route").stdout_text.strip()
            gw = ".".join(str(int(gw[i:i+2], 16)) for i in (6, 4, 2, 0))
            r = sb.exec("python3", "-c", f"import socket; socket.create_connection(('{{gw}}', {port}), timeout=3); print('connected')")
            print("HOST", r.exit_code, "connected" in r.stdout_text)
            sb.terminate()
        """)
        assert "HOST 1 False" in out, out
    finally:
        listener.close()


@pytest.mark.skipif(
    os.environ.get("COMPUTE_E2E_ISOLATION") == "gvisor",
    reason="native backend only: gVisor's sandboxed processes are not host processes (runsc maps its own ids)",
)
def test_native_sandboxes_run_in_their_own_user_namespaces(shared_server):
    """Root in a native sandbox is an unprivileged host user, a different one per sandbox; inside, the image's files,
    the runtime's /etc files, binds and volumes are root's, root can chown, bind port 80 and edit /etc/hosts."""
    out = sdk(shared_server, """
        from chalkcompute import Volume
        Volume("userns-vol").put_file("seed.txt", b"seed")
        a = Sandbox(image=Image.debian_slim(), name="userns-a").mount_volume("userns-vol", "/vol").run()
        b = Sandbox(image=Image.debian_slim(), name="userns-b").run()
        for name, sb in (("A", a), ("B", b)):
            print(name, "MAP", " ".join(sb.exec("cat", "/proc/self/uid_map").stdout_text.split()))
            sb.exec("sh", "-c", f"python3 -c 'import time; time.sleep(3600)' userns-marker-{name} >/dev/null 2>&1 &")
        print("ID", a.exec("id", "-u").stdout_text.strip())
        owners = "stat -c '%n %u:%g' /etc/passwd /etc/hosts /etc/ssl/certs/ca-certificates.crt /vol /vol/seed.txt"
        print(a.exec("sh", "-c", owners).stdout_text.strip())
        print("HOSTS", a.exec("sh", "-c", "echo '10.1.2.3 extra' >> /etc/hosts && grep -c extra /etc/hosts").stdout_text.strip())
        print("CHOWN", a.exec("sh", "-c", "touch /tmp/owned && chown 1000:1000 /tmp/owned && stat -c %u:%g /tmp/owned").stdout_text.strip())
        print("VOLWRITE", a.exec("sh", "-c", "echo hi > /vol/new.txt && stat -c %u:%g /vol/new.txt").stdout_text.strip())
        bind = "import socket; s = socket.socket(); s.bind(('0.0.0.0', 80)); print('bound')"
        print("PORT80", a.exec("python3", "-c", bind).stdout_text.strip())
        print("HOSTMOUNT", a.exec("sh", "-c", "mount -t tmpfs x /mnt 2>&1; echo $?").stdout_text.strip().splitlines()[-1])
        import json, os, glob
        ids = {}
        for pid in os.listdir("/proc"):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
                status = open(f"/proc/{pid}/status").read()
            except OSError:
                continue
            for name in ("A", "B"):
                if f"userns-marker-{name}".encode() in cmd:
                    uid = [l.split()[1] for l in status.splitlines() if l.startswith("Uid:")][0]
                    ids[name] = int(uid)
        print("HOSTUIDS", json.dumps(ids))
        upper = glob.glob(os.path.join("DATA_DIR", "sandboxes", "*", "rw", "upper", "tmp", "owned"))
        print("UPPER", [os.stat(p).st_uid for p in upper])
        a.terminate(); b.terminate()
    """.replace("DATA_DIR", str(shared_server.data_dir)))
    maps = dict(re.findall(r"^([AB]) MAP (.*)$", out, re.M))
    assert set(maps) == {"A", "B"}, out
    for m in maps.values():
        inside, host, count = (int(x) for x in m.split())
        assert (inside, count) == (0, 65536) and host >= 1 << 30, out
    assert maps["A"] != maps["B"], f"two sandboxes share an id range: {out}"
    host_uids = json.loads(re.search(r"HOSTUIDS (.*)", out).group(1))
    assert host_uids == {n: int(maps[n].split()[1]) for n in "AB"}, f"sandbox root on the host: {out}"
    assert "ID 0" in out, out
    for path in ("/etc/passwd", "/etc/hosts", "/etc/ssl/certs/ca-certificates.crt", "/vol", "/vol/seed.txt"):
        assert f"{path} 0:0" in out, out
    assert "HOSTS 1" in out and "CHOWN 1000:1000" in out and "VOLWRITE 0:0" in out, out
    assert "PORT80 bound" in out, out
    assert "HOSTMOUNT 0" not in out, out
    a_base = int(maps["A"].split()[1])
    assert f"UPPER [{a_base + 1000}]" in out, f"the writable layer holds shifted ids: {out}"


@pytest.mark.skipif(
    os.environ.get("COMPUTE_E2E_ISOLATION") == "gvisor", reason="native backend only: the setting is the native backend's"
)
def test_native_sandboxes_without_a_user_namespace(tmp_path):
    """`--user-namespace false` keeps the host's ids (root inside is host root): the same sandbox still works."""
    from conftest import Server

    server = Server(tmp_path / "no-userns", ["--user-namespace", "false"])
    try:
        out = sdk(server, """
            from chalkcompute import Volume
            Volume("plain-vol").put_file("seed.txt", b"seed")
            sb = Sandbox(image=Image.debian_slim(), name="no-userns").mount_volume("plain-vol", "/vol").run()
            print("MAP", " ".join(sb.exec("cat", "/proc/self/uid_map").stdout_text.split()))
            print(sb.exec("sh", "-c", "stat -c '%n %u:%g' /etc/hosts /vol/seed.txt").stdout_text.strip())
            print("VOLWRITE", sb.exec("sh", "-c", "echo hi > /vol/new.txt && cat /vol/new.txt").stdout_text.strip())
            print("MOUNT", sb.exec("sh", "-c", "mount -t tmpfs x /mnt 2>&1; echo $?").stdout_text.strip().splitlines()[-1])
            sb.terminate()
        """)
    finally:
        server.stop()
    assert "MAP 0 0 4294967295" in out, out
    assert "/etc/hosts 0:0" in out and "/vol/seed.txt 0:0" in out and "VOLWRITE hi" in out, out
    assert "MOUNT 0" not in out, out


def test_container_sessions_detach_and_reattach(shared_server):
    out = sdk(shared_server, """
        from chalkcompute._container import ContainerSession as CS
        def collect(session):
            text = ""
            for ev in session.events():
                if isinstance(ev, CS.OutputEvent):
                    text += ev.text
            return text
        c = Container(image=Image.debian_slim(), name="sessions").run()
        s = c.new_session("sh", "-c", "for i in 1 2 3 4 5; do echo line$i; sleep 0.2; done")
        sid = s.id
        for ev in s.events():
            if isinstance(ev, CS.OutputEvent):
                print("FIRST", ev.text.strip())
                break
        s.detach()
        again = c.attach_session(sid)
        print("REPLAY", collect(again).split())
        info = c.get_session(sid)
        print("INFO", info.status.state.name, [i.id for i in c.list_sessions()].count(sid))
        cid = c.id
        c.stop()
        try:
            Container.from_id(cid).exec("echo", "x")
        except Exception as e:
            print("STOPPED", type(e).__name__, e)
    """)
    assert "FIRST line1" in out, out
    assert "REPLAY ['line1', 'line2', 'line3', 'line4', 'line5']" in out, out
    assert "INFO EXITED 1" in out, out
    # The SDK words FAILED_PRECONDITION as "not ready for container sessions".
    assert re.search(r"STOPPED .*(FAILED_PRECONDITION|terminated|not ready for container sessions)", out), out


@pytest.mark.parametrize("python", ["3.13", pytest.param("3.14", marks=GVISOR_SID_PTY)])
def test_pty_sessions(shared_server, python):
    out = sdk(shared_server, f"""
        from chalkcompute._container import ContainerSession as CS
        c = Container(image=Image.debian_slim("{python}"), name="pty-{python.replace('.', '')}").run()
        p = c.new_session("sh", "-c", "stty size; tty", pty=(100, 40))
        text = ""
        for ev in p.events():
            if isinstance(ev, CS.OutputEvent):
                text += ev.text
        print("PTY", text.split())
        c.stop()
    """)
    assert re.search(r"PTY \['40', '100', '/dev/pts/\d+'\]", out), out


def test_bad_input(shared_server):
    out = sdk(shared_server, """
        for kw in (dict(cpu="lots"), dict(memory="4GB"), dict(memory="1Mi"), dict(cpu="0")):
            try:
                Sandbox(image=Image.debian_slim(), **kw).run()
                print("ACCEPTED", kw)
            except Exception as e:
                print("REJECTED", kw, e)
        try:
            Sandbox.from_id("sbx-doesnotexist")
        except Exception as e:
            print("UNKNOWN", type(e).__name__, e)
        try:
            Sandbox(image="python:3.12-slim-trixie").run()
        except Exception as e:
            print("IMAGE", e)
        sb = Sandbox(image=Image.debian_slim(), name="badinput").run()
        sid = sb.id
        sb.terminate()
        try:
            Sandbox.from_id(sid).exec("echo", "hi")
        except Exception as e:
            print("TERMINATED", type(e).__name__, getattr(getattr(e, "code", None), "name", ""), e)
        try:
            Sandbox(image=Image.debian_slim(), name="Bad_Name!").run()
        except Exception as e:
            print("NAME", e)
    """)
    assert "ACCEPTED" not in out, out
    assert re.search(r"REJECTED \{'cpu': 'lots'\}.*resources.cpu", out), out
    assert re.search(r"REJECTED \{'memory': '4GB'\}.*resources.memory.*512Mi", out), out
    assert re.search(r"UNKNOWN .*not found", out), out
    assert re.search(r"IMAGE .*Python 3.12", out), out
    assert re.search(r"TERMINATED .*(FAILED_PRECONDITION|terminated)", out), out
    assert re.search(r"NAME .*Bad_Name!", out), out
    # The server checks names too, for clients that do not.
    token = shared_server.token()
    status, body = shared_server.connect(
        "chalk.sandbox.v2.SandboxService/CreateSandbox",
        {"spec": {"name": "Bad_Name", "image": "python:3.13-slim-trixie"}},
        token,
    )
    assert status == 400 and body["code"] == "invalid_argument" and "spec.name" in body["message"], body
    status, body = shared_server.connect("chalk.sandbox.v2.SandboxService/GetSandbox", {"id": "sbx-nope"}, token)
    assert status == 404 and body["code"] == "not_found", body


def test_lifetime_and_entrypoint_exit(shared_server):
    out = sdk(shared_server, """
        def status(cid):
            info = Sandbox.from_id(cid).refresh()
            return info.status, info.status_message, info.status_details
        c = Container(image=Image.debian_slim(), name="exits3", entrypoint=["sh", "-c", "echo hello-log; sleep 1; exit 3"]).run()
        time.sleep(3)
        print("EXIT3", status(c.id))
        ok = Container(image=Image.debian_slim(), name="exits0", entrypoint=["sh", "-c", "sleep 1"]).run()
        time.sleep(3)
        print("EXIT0", status(ok.id))
        short = Container(image=Image.debian_slim(), name="short", lifetime="2s").run()
        time.sleep(4)
        print("LIFE", status(short.id))
        missing = Container(image=Image.debian_slim(), name="noentry", entrypoint=["no-such-binary"])
        try:
            missing.run()
        except Exception as e:
            print("MISSING", status(missing.id))
    """)
    assert re.search(r"EXIT3 \('FAILED', 'entrypoint exited with code 3', 'hello-log'\)", out, re.I), out
    assert re.search(r"EXIT0 \('SUCCEEDED', 'entrypoint exited with code 0'", out, re.I), out
    assert re.search(r"LIFE \('TERMINATED', 'its lifetime of 2s ended'", out, re.I), out
    assert re.search(r"MISSING \('FAILED', 'entrypoint could not start: command not found: no-such-binary", out, re.I), out


def test_outbound_network_through_nat(shared_server):
    # pip's own default index, through the sandbox's veth and NAT, trusting the host's CA bundle (the registry
    # sits behind a TLS-intercepting proxy here).
    out = sdk(shared_server, """
        sb = Sandbox(image=Image.debian_slim(), name="outbound").run()
        r = sb.exec("python3", "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", "/tmp/dl", "six")
        print("PIP", r.exit_code, r.stderr_text.strip()[-300:])
        print("FILES", sb.exec("ls", "/tmp/dl").stdout_text.split())
        sb.terminate()
    """)
    assert "PIP 0" in out, out
    assert re.search(r"FILES \['six-[^']+\.whl'\]", out), out


class DroppingProxy:
    """A TCP proxy in front of the server that cuts its first connection after `cut_after` bytes from the server,
    the way a flaky network drops a stream mid-way; later connections pass untouched."""

    def __init__(self, target_port, cut_after):
        import socket
        import threading

        self.target_port, self.cut_after, self.cut = target_port, cut_after, False
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        first = True
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            limit = self.cut_after if first else None
            first = False
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, limit), daemon=True).start()

    def _pipe(self, src, dst, limit):
        import socket

        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                sent += len(data)
                if limit is not None and sent >= limit:
                    self.cut = True
                    break
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.listener.close()


def test_reattach_after_a_dropped_stream(shared_server):
    port = int(shared_server.url.rsplit(":", 1)[1])
    proxy = DroppingProxy(port, cut_after=200_000)
    try:
        env = shared_server.sdk_env(CHALK_API_SERVER=f"http://127.0.0.1:{proxy.port}")
        code = textwrap.dedent("""
            from chalkcompute import Sandbox, Image
            sb = Sandbox(image=Image.debian_slim(), name="reattach").run()
            r = sb.exec("sh", "-c", "for i in $(seq 1 20000); do echo line-$i; done; sleep 0.5; echo done")
            lines = r.stdout_text.split()
            print("LINES", len(lines), lines[0], lines[-2], lines[-1], len(set(lines)), r.exit_code)
            sb.terminate()
        """)
        proc = run_sdk(code, env, timeout=300)
    finally:
        proxy.close()
    assert proxy.cut, "the proxy never cut the stream, so nothing was tested"
    assert "LINES 20001 line-1 line-20000 done 20001 0" in proc.stdout, proc.stdout + proc.stderr


def test_lookup_listing_and_unserved_surfaces(shared_server):
    out = sdk(shared_server, """
        sb = Sandbox(image=Image.debian_slim(), name="lookup").run()
        same = Sandbox.from_name("lookup")
        print("FROM_NAME", same.id == sb.id, same.exec("hostname").stdout_text.strip())
        print("LISTED", any(i.id == sb.id and i.status == "running" for i in Sandbox.list_all()))
        print("INFO", sb.info.status if sb.info else None, sb.refresh().status)
        try:
            sb.execute_python("print(1)")
        except Exception as e:
            print("PYEXEC", type(e).__name__, e)
        try:
            sb.git.clone("file:///nonexistent", "/tmp/repo")
        except Exception as e:
            print("GIT", type(e).__name__, str(e)[:200])
        sid = sb.id
        sb.terminate()
        print("AFTER", Sandbox.from_id(sid).refresh().status)
    """)
    assert "FROM_NAME True lookup" in out, out
    assert "LISTED True" in out, out
    assert re.search(r"PYEXEC .*(UNIMPLEMENTED|not implemented)", out, re.I), out
    # The base image has no git: the SDK's git helpers fail with the command's own error, not a hang.
    assert re.search(r"GIT .*command not found: git", out), out
    assert "AFTER terminated" in out, out


def test_a_process_that_cannot_start_or_is_too_large_is_refused_naming_the_argument(shared_server):
    out = sdk(shared_server, """
        sb = Sandbox(image=Image.debian_slim(), name="nularg").run()
        try:
            r = sb.exec("echo", "a\\x00b")
            print("RAN", r.exit_code, r.stderr)
        except Exception as e:
            print("REFUSED", type(e).__name__, e)
        try:
            r = sb.exec("echo", "x" * (10 << 20))
            print("RAN", r.exit_code)
        except Exception as e:
            print("TOOBIG", type(e).__name__, str(e)[:300])
        print("STILL", sb.exec("echo", "alive").stdout_text.strip())
        sb.terminate()
    """)
    assert "REFUSED" in out and "command[1] holds a NUL byte" in out, out
    # Ten MiB in one argument is refused naming the limit, and the sandbox lives on.
    assert "TOOBIG" in out and "command[1] is 10485760 bytes" in out and "131072" in out, out
    assert "STILL alive" in out, out


def test_the_sandboxes_init_shows_no_host_path(shared_server):
    out = sdk(shared_server, """
        sb = Sandbox(image=Image.debian_slim(), name="cmdline").run()
        for pid in ("1", "self"):
            print("CMDLINE", pid, repr(sb.exec("cat", f"/proc/{pid}/cmdline").stdout))
        sb.terminate()
    """)
    lines = [l for l in out.splitlines() if l.startswith("CMDLINE")]
    assert len(lines) == 2, out
    for l in lines:
        assert str(shared_server.data_dir) not in l and "/sandboxes/" not in l and "boot.json" not in l, l


def test_downloads_are_flow_controlled_cancelled_and_refuse_endless_files(shared_server):
    """#12 item 1: a reader that stalls holds the server to one window per download; one that goes away closes the
    file in the sandbox; a device is refused before a byte is read."""
    before = 0
    program = f"import time, sys\nfrom chalkcompute import Sandbox, Image\nWATCHER = {WATCHER!r}\n" + textwrap.dedent("""
        from chalkcompute._sandbox_fs import SandboxFileSystemError
        sb = Sandbox(image=Image.debian_slim(), name="dlflow").run()
        for path in ("/dev/zero", "/dev/urandom"):
            t = time.monotonic()
            try:
                sb.fs.read_bytes(path, timeout_secs=30)
                print("READ", path)
            except SandboxFileSystemError as e:
                print("REFUSED", path, e.error, round(time.monotonic() - t, 1), e)
        sb.exec("sh", "-c", "head -c 314572800 /dev/zero > /tmp/big && echo made")
        # The agent's descriptors are not readable from inside (it is not dumpable), so inotify tells when the
        # file is opened and closed.
        sb.fs.write_bytes("/tmp/watch.py", WATCHER.encode())
        sb.exec("sh", "-c", "python3 /tmp/watch.py </dev/null >/dev/null 2>&1 &")
        events = lambda: sb.exec("cat", "/tmp/events").stdout_text.split()
        while sb.exec("test", "-e", "/tmp/events").exit_code != 0:
            time.sleep(0.1)
        print("READY", flush=True)
        sys.stdin.readline()  # the test measures the server before the download
        it = sb.fs.download_iter("/tmp/big")
        print("FIRST", len(next(it)))
        time.sleep(3)
        print("STALLED", flush=True)
        sys.stdin.readline()  # the test measures the server here
        print("WHILE", events())
        it.close()
        deadline = time.monotonic() + 20
        while events().count("close") < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        print("AFTER", events())
        print("WHOLE", len(sb.fs.read_bytes("/tmp/big")) == 314572800)
        sb.terminate()
    """)
    proc = subprocess.Popen([sys.executable, "-c", program], env=shared_server.sdk_env(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(("READY", "STALLED")):
                if line.startswith("READY"):
                    before = server_rss(shared_server)
                else:
                    lines.append(f"HOOK {server_rss(shared_server) - before}\n")
                proc.stdin.write("go\n")
                proc.stdin.flush()
        out = "".join(lines)
        assert proc.wait(timeout=300) == 0, f"{out}\n{proc.stderr.read()}"
    finally:
        proc.kill()
    assert re.search(r"REFUSED /dev/zero FAILED_PRECONDITION \d+\.\d .*character device", out), out
    assert "REFUSED /dev/urandom FAILED_PRECONDITION" in out, out
    grown = int(re.search(r"HOOK (-?\d+)", out).group(1))
    # A stalled 300 MiB download holds a window's worth, not the file (it held +482 MiB before #12).
    assert grown < 48 << 20, f"server memory grew by {grown} bytes under a stalled download"
    assert "WHILE ['open']" in out and "AFTER ['open', 'close']" in out and "WHOLE True" in out, out


WATCHER = r"""
import ctypes, os, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init()
libc.inotify_add_watch(fd, b"/tmp/big", 0x20 | 0x10)  # IN_OPEN | IN_CLOSE_NOWRITE
with open("/tmp/events", "a", buffering=1) as out:
    while True:
        buf = os.read(fd, 4096)
        for i in range(0, len(buf), 16):
            _, mask, _, _ = struct.unpack_from("iIII", buf, i)
            out.write("open\n" if mask & 0x20 else "close\n")
"""


def test_security_fields_are_enforced_or_refused_never_ignored(shared_server):
    """#13: a network policy, resource detectors or a workload identity are refused naming the field until they are
    enforced; KERNEL_POLICY_RESTRICTED runs only under gVisor (never a silent downgrade), OPEN under either."""
    gvisor = os.environ.get("COMPUTE_E2E_ISOLATION", "gvisor") == "gvisor"
    out = sdk(shared_server, """
        from chalkcompute import NetworkPolicy, ContainerSecurityPolicy, KernelPolicy
        def attempt(label, **kw):
            try:
                sb = Sandbox(image=Image.debian_slim(), name=f"sec-{label}", **kw).run()
                print("RAN", label, sb.exec("true").exit_code)
                sb.terminate()
            except Exception as e:
                print("REFUSED", label, type(e).__name__, str(e).replace("\\n", " ")[:400])
        attempt("deny-all", network_policy=NetworkPolicy())
        attempt("identity", chalk_identity=True)
        attempt("restricted", security_policy=ContainerSecurityPolicy(kernel_policy=KernelPolicy.RESTRICTED))
        attempt("open", security_policy=ContainerSecurityPolicy(kernel_policy=KernelPolicy.OPEN))
    """)
    assert re.search(r"REFUSED deny-all .*spec\.network_policy.*not enforced", out), out
    assert re.search(r"REFUSED identity .*spec\.chalk_workload_identity", out), out
    if gvisor:
        assert "RAN restricted 0" in out, out
    else:
        assert re.search(r"REFUSED restricted .*KERNEL_POLICY_RESTRICTED needs gVisor", out), out
    assert "RAN open 0" in out, out
