"""Scaling groups against the official SDK: program (c) verbatim, replicas behind the HTTP/2 ingress, volume mounts,
autoscaling up and down (and to zero), rolling updates and rollbacks, failures that say why, authentication, a
server restart, and bad specs refused naming the field."""
import json
import re
import signal
import socket
import subprocess
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import PROGRAMS, Server, compute_bin, require_root, run_program, run_sdk, sdk_ok, wait_for

ALIASES = '[image_aliases]\n"python:3.12-slim-trixie" = "python:3.13-slim-trixie"\n'
IMAGE = "python:3.13-slim-trixie"
SG = "chalk.scalinggroup.v1.ScalingGroupManagerService"

# A replica: answers on 8080 with its own id, a file's content, a write into a mounted volume, or a slow answer.
APP = textwrap.dedent('''
    import http.server, os, socket, sys, time, urllib.parse
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            u = urllib.parse.urlparse(self.path); q = dict(urllib.parse.parse_qsl(u.query))
            if u.path == "/health":
                body = b"ok"
            elif u.path == "/whoami":
                body = (socket.gethostname() + " " + os.environ.get("VERSION", "")).encode()
            elif u.path == "/file":
                body = open(q["p"], "rb").read()
            elif u.path == "/write":
                with open(q["p"], "w") as f:
                    f.write(socket.gethostname())
                body = b"written"
            elif u.path == "/ws":
                # An upgrade to a byte echo, as a WebSocket server would switch protocols.
                self.send_response(101)
                self.send_header("Connection", "Upgrade")
                self.send_header("Upgrade", self.headers.get("Upgrade", ""))
                self.end_headers()
                self.wfile.flush()
                while True:
                    data = self.connection.recv(65536)
                    if not data:
                        break
                    self.connection.sendall(data)
                self.close_connection = True
                return
            elif u.path == "/burn":
                end = time.time() + float(q.get("s", "5"))
                while time.time() < end:
                    pass
                body = b"burnt"
            elif u.path == "/slow":
                time.sleep(float(q.get("s", "2"))); body = b"slow"
            elif u.path == "/headers":
                body = "\\n".join(f"{k.lower()}: {v}" for k, v in self.headers.items()).encode()
            else:
                self.send_response(404); self.send_header("content-length", "0"); self.end_headers(); return
            self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
''')
ENTRY = ["python", "-c", APP]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("sg") / "data", config=ALIASES)
    yield s
    s.stop()


def sdk(server, body, timeout=600):
    prelude = f"from chalkcompute import ScalingGroup, Volume\nIMAGE = {IMAGE!r}\nENTRY = {ENTRY!r}\n"
    return sdk_ok(server, prelude, body, timeout).stdout


def rpc(server, method, body, code=200):
    status, out = server.connect(f"{SG}/{method}", body, token=server.token())
    assert status == code, (status, out)
    return out


def group(server, name):
    return rpc(server, "GetScalingGroup", {"name": name})["scalingGroup"]


def live_sandboxes(server):
    """Sandboxes the server's runtime holds now (each has a working directory until it is torn down)."""
    d = server.data_dir / "sandboxes"
    return sorted(p.name for p in d.iterdir() if p.name.startswith("sbx-")) if d.exists() else []


def http_get(url, token=None, timeout=30):
    req = urllib.request.Request(url)
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_program_c_verbatim_through_an_operator_alias(srv):
    require_root()
    proc = run_program(PROGRAMS / "c_scaling_group.py", srv.sdk_env())
    assert proc.returncode == 0, proc.stderr
    assert "WEB_URL: http://" in proc.stdout and "/sg/default/hello-api" in proc.stdout, proc.stdout
    assert "CALL: 200" in proc.stdout and '"ok":true' in proc.stdout.replace(" ", ""), proc.stdout
    # Deleting waits for the replicas, so none is left and the group reads as deleted.
    assert rpc(srv, "GetScalingGroup", {"name": "hello-api"}, code=404)
    deleted = rpc(srv, "GetScalingGroup", {"name": "hello-api", "includeDeleted": True})["scalingGroup"]
    assert deleted["status"] == "Deleted" and "webUrl" not in deleted, deleted
    assert not live_sandboxes(srv)
    # app.py reached the replicas as an SDK-owned volume mounted into the group (add_local_file's default); the SDK
    # found it through ListScalingGroupRevisions and deleted it after the group.
    mounts = deleted["spec"]["containerSpec"].get("volumes", [])
    assert [m["mountPath"] for m in mounts if m["name"].startswith("chalkcompute-sg-files")], deleted["spec"]
    assert "chalkcompute-sg-files" not in srv.cli("volume", "ls").stdout


def test_replicas_serve_a_mounted_volume_and_their_writes_become_versions(srv):
    require_root()
    out = sdk(srv, """
        vol = Volume("sg-data")
        vol.put_file("greeting.txt", b"hello from the volume")
        before = vol.latest_version().id
        sg = ScalingGroup(image=IMAGE, name="vol-api", entrypoint=ENTRY, port=8080, min_replicas=2,
                          max_replicas=2, volumes=[("sg-data", "/data")]).deploy().wait_ready()
        r = sg.call("/file?p=/data/greeting.txt", method="GET")
        print("READ", r.status, bytes(r.content))
        hosts = set()
        for i in range(40):
            hosts.add(bytes(sg.call("/whoami", method="GET").content).decode().split()[0])
            if len(hosts) == 2:
                break
        print("HOSTS", len(hosts))
        for i in range(8):
            sg.call(f"/write?p=/data/out-{i}.txt", method="GET")
        sg.delete()
        vol = Volume("sg-data")
        files = sorted(f.path for f in vol.listdir() if f.path.startswith("out-"))
        print("FILES", files)
        print("WRITERS", sorted({vol.read_file(f).decode() for f in files}) == sorted(hosts))
        print("NEWER", vol.latest_version().id > before)
    """)
    assert "READ 200 b'hello from the volume'" in out, out
    assert "HOSTS 2" in out, out
    assert "FILES ['out-0.txt', 'out-1.txt', 'out-2.txt', 'out-3.txt', 'out-4.txt', 'out-5.txt', 'out-6.txt', " \
           "'out-7.txt']" in out, out
    assert "WRITERS True" in out and "NEWER True" in out, out


def test_scales_up_under_load_and_back_down_after_the_delay(srv):
    require_root()
    sdk(srv, """
        ScalingGroup(image=IMAGE, name="busy-api", entrypoint=ENTRY, port=8080, min_replicas=1, max_replicas=3,
                     scaling_interval_seconds=1, shutdown_delay_seconds=4).deploy().wait_ready()
    """)
    g = group(srv, "busy-api")
    assert g.get("readyReplicas", 0) == 1, g
    url = g["webUrl"]
    results = []

    def hit():
        results.append(http_get(f"{url}/slow?s=3", timeout=120))

    # 40 requests in flight at 8 per replica want 5 replicas: capped at 3.
    threads = [threading.Thread(target=hit) for _ in range(40)]
    for t in threads:
        t.start()
    peak = wait_for("3 ready replicas", lambda: ((g := group(srv, "busy-api")).get("readyReplicas", 0) == 3, g))
    assert peak["metadata"]["desired_replicas"] == 3, peak
    for t in threads:
        t.join()
    assert all(r == (200, "slow") for r in results), results
    wait_for("back to 1 replica", lambda: ((g := group(srv, "busy-api")).get("readyReplicas", 0) == 1
                                           and g["metadata"]["running_replicas"] == 1, g))
    rpc(srv, "DeleteScalingGroup", {"name": "busy-api"})


def test_a_cpu_target_scales_on_cpu_use(srv):
    require_root()
    sdk(srv, """
        ScalingGroup(image=IMAGE, name="cpu-api", entrypoint=ENTRY, port=8080, cpu="0.5", min_replicas=1,
                     max_replicas=2, target_cpu_utilization_percentage=50, scaling_interval_seconds=2,
                     shutdown_delay_seconds=4).deploy().wait_ready()
    """)
    url = group(srv, "cpu-api")["webUrl"]
    # One request in flight is far below the concurrency target: only its CPU use (its half core, all of it, twice
    # the 50 % target) can ask for a second replica.
    burner = threading.Thread(target=lambda: http_get(f"{url}/burn?s=8", timeout=60))
    burner.start()
    wait_for("a second replica", lambda: ((g := group(srv, "cpu-api")).get("readyReplicas", 0) == 2, g), timeout=60)
    burner.join()
    wait_for("back to one", lambda: ((g := group(srv, "cpu-api")).get("readyReplicas", 0) == 1
                                     and g["metadata"]["running_replicas"] == 1, g), timeout=60)
    rpc(srv, "DeleteScalingGroup", {"name": "cpu-api"})


def test_scales_to_zero_and_a_request_starts_a_replica(srv):
    require_root()
    sdk(srv, """
        sg = ScalingGroup(image=IMAGE, name="lazy-api", entrypoint=ENTRY, port=8080, min_replicas=0, max_replicas=1,
                          shutdown_delay_seconds=2).deploy()
        print("DEPLOYED", sg.info.status)
    """)
    assert group(srv, "lazy-api")["status"] == "ScaledToZero"
    out = sdk(srv, """
        sg = ScalingGroup.from_name("lazy-api")
        r = sg.call("/health", method="GET")
        print("CALL", r.status, bytes(r.content))
    """)
    assert "CALL 200 b'ok'" in out, out
    wait_for("scaled to zero again", lambda: ((g := group(srv, "lazy-api"))["status"] == "ScaledToZero", g))
    # The replica left the group at once; its sandbox is torn down right after.
    wait_for("the replica's sandbox gone", lambda: (not live_sandboxes(srv), live_sandboxes(srv)), timeout=30)
    # At zero replicas the group still needs its image: removing it is refused (and image gc keeps it).
    out = srv.cli("image", "rm", IMAGE, check=False)
    assert out.returncode != 0 and "scaling group" in out.stderr, out
    rpc(srv, "DeleteScalingGroup", {"name": "lazy-api"})


def test_a_cron_window_holds_its_replica_floor_while_it_is_open(srv):
    require_root()
    # Open from the 1st of January to the 31st of December (in Berlin): it is open now. A window that opened
    # and closed in the past hour (every hour, minute 0 to minute 0) is shut: it adds nothing.
    sdk(srv, """
        from chalkcompute import CronScalingTrigger, CronScalingWindow
        trigger = CronScalingTrigger(timezone="Europe/Berlin", windows=[
            CronScalingWindow(start="0 0 1 1 *", end="0 0 31 12 *", desired_replicas=2),
            CronScalingWindow(start="0 * * * *", end="0 * * * *", desired_replicas=3),
        ])
        ScalingGroup(image=IMAGE, name="cron-api", entrypoint=ENTRY, port=8080, min_replicas=0, max_replicas=3,
                     cron_scaling_trigger=trigger).deploy()
    """)
    wait_for("two replicas held by the open window",
             lambda: ((g := group(srv, "cron-api")).get("readyReplicas", 0) == 2, g))
    time.sleep(3)
    g = group(srv, "cron-api")
    assert g.get("readyReplicas", 0) == 2 and g["status"] == "Running", f"no traffic, and still the floor: {g}"
    rpc(srv, "DeleteScalingGroup", {"name": "cron-api"})


def test_an_update_rolls_replicas_over_and_a_rollback_returns(srv):
    require_root()
    sdk(srv, """
        ScalingGroup(image=IMAGE, name="roll-api", entrypoint=ENTRY, port=8080, env={"VERSION": "v1"},
                     min_replicas=2, max_replicas=2).deploy().wait_ready()
    """)
    g = group(srv, "roll-api")
    first_revision = g["revisionId"]
    url = g["webUrl"]
    stop = threading.Event()
    answers = []

    def poll():
        while not stop.is_set():
            try:
                answers.append(http_get(f"{url}/whoami"))
            except OSError as e:
                answers.append((0, repr(e)))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        roll(srv, g, first_revision, answers)
    finally:
        stop.set()
        poller.join()
    # Every request during both roll-overs was served.
    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:5]
    # Deleting lets the requests in flight finish; new ones are refused at once.
    slow = []
    slow_thread = threading.Thread(target=lambda: slow.append(http_get(f"{url}/slow?s=2")))
    slow_thread.start()
    wait_for("the slow request in flight", lambda: (group(srv, "roll-api")["metadata"].get("running_replicas") == 2
                                                     and slow_thread.is_alive(), None), timeout=10)
    time.sleep(0.5)
    rpc(srv, "DeleteScalingGroup", {"id": g["id"]})
    slow_thread.join()
    assert slow == [(200, "slow")], slow
    status, body = http_get(f"{url}/health")
    assert status == 404, (status, body)


def roll(srv, g, first_revision, answers):
    spec = g["spec"]
    spec["containerSpec"]["envVars"] = {"VERSION": "v2"}
    updated = rpc(srv, "UpdateScalingGroup", {"scalingGroupId": g["id"], "spec": spec, "updateMask": "spec"})
    assert updated["scalingGroup"]["revisionId"] != first_revision
    wait_for("v2 everywhere", lambda: (all(a[1].endswith(" v2") for a in answers[-10:]) and len(answers) > 10,
                                       answers[-3:]))
    revisions = rpc(srv, "ListScalingGroupRevisions", {"scalingGroupId": g["id"], "includeDeleted": True})
    assert [r.get("latest", False) for r in revisions["revisions"]] == [True, False], revisions
    back = rpc(srv, "UpdateScalingGroup", {
        "scalingGroupId": g["id"], "updateMask": "traffic",
        "traffic": {"targets": [{"scalingGroupRevisionId": first_revision, "percent": 100}]},
    })
    assert back["scalingGroup"]["revisionId"] == first_revision
    n = len(answers)
    wait_for("v1 again", lambda: (len(answers) > n + 10 and all(a[1].endswith(" v1") for a in answers[-10:]),
                                  answers[-3:]))


def test_an_unchanged_deploy_run_again_keeps_the_group_and_a_changed_one_rolls_a_new_revision(srv):
    require_root()
    deploy = """
        import os
        sg = ScalingGroup(image=IMAGE, name="redeploy-api", entrypoint=ENTRY, port=8080, min_replicas=1,
                          max_replicas=1, env={"VERSION": os.environ["V"], "B": "2", "A": "1"}).deploy().wait_ready()
        print("ID", sg.id if hasattr(sg, "id") else "")
        print("WHO", bytes(sg.call("/whoami", method="GET").content).decode())
    """
    def run(version):
        prelude = f"from chalkcompute import ScalingGroup\nIMAGE = {IMAGE!r}\nENTRY = {ENTRY!r}\n"
        proc = run_sdk(prelude + textwrap.dedent(deploy), srv.sdk_env(V=version), timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout
    first = run("one")
    assert first.rstrip().endswith(" one"), first
    g1 = group(srv, "redeploy-api")
    # The same script from a fresh process: the same group and revision (maps encode in one order).
    run("one")
    g2 = group(srv, "redeploy-api")
    assert (g2["id"], g2["revisionId"]) == (g1["id"], g1["revisionId"]), (g1, g2)
    # Changed: a new revision, rolled out as an update rolls it.
    changed = run("two")
    assert changed.rstrip().endswith(" two"), changed
    g3 = group(srv, "redeploy-api")
    assert g3["id"] == g1["id"] and g3["revisionId"] != g1["revisionId"], (g1, g3)
    revs = rpc(srv, "ListScalingGroupRevisions", {"scalingGroupName": "redeploy-api"})["revisions"]
    assert len(revs) == 2, revs
    rpc(srv, "DeleteScalingGroup", {"name": "redeploy-api"})


def test_a_crashing_replica_fails_the_group_with_its_output(srv):
    require_root()
    spec = {
        "containerSpec": {"name": "crash-api", "image": IMAGE, "port": 8080,
                          "entrypoint": ["python", "-c", "import sys; print('boom: no config'); sys.exit(3)"]},
        "scalingSpec": {"minReplicas": 1, "maxReplicas": 1},
    }
    rpc(srv, "CreateScalingGroup", {"spec": spec})
    g = wait_for("Failed", lambda: ((g := group(srv, "crash-api"))["status"] == "Failed", g), timeout=120)
    assert "exited with code 3" in g["statusMessage"], g
    assert "boom: no config" in g["statusDetails"], g
    inspect = srv.cli("scaling-group", "inspect", "crash-api").stdout
    assert "Failed" in inspect and "boom: no config" in inspect and "* sgr-" in inspect, inspect
    as_json = json.loads(srv.cli("scaling-group", "inspect", "crash-api", "-o", "json").stdout)
    assert as_json["scalingGroup"]["status"] == "Failed" and as_json["revisions"][0]["id"].startswith("sgr-"), as_json
    assert "crash-api" in [g["name"] for g in json.loads(srv.cli("sg", "ls", "-o", "json").stdout)]
    srv.cli("sg", "rm", "crash-api")
    assert "crash-api" not in srv.cli("sg", "ls").stdout
    assert "Deleted" in srv.cli("sg", "ls", "--all").stdout


def test_authenticated_groups_want_a_token_and_http1_works_too(srv):
    require_root()
    out = sdk(srv, """
        sg = ScalingGroup(image=IMAGE, name="private-api", entrypoint=ENTRY, port=8080,
                          authenticated=True).deploy().wait_ready()
        r = sg.call("/health", method="GET")
        print("SDK", r.status, bytes(r.content))
    """)
    assert "SDK 200 b'ok'" in out, out
    url = group(srv, "private-api")["webUrl"]
    status, body = http_get(f"{url}/health")
    assert status == 401 and "authenticated" in body, (status, body)
    status, body = http_get(f"{url}/health", token="not-a-token")
    assert status == 401, (status, body)
    srv.cli("environment", "create", "staging")
    created = srv.cli("client", "create", "stager", "--environment", "staging").stdout
    cid = re.search(r"client_id:\s+(\S+)", created).group(1)
    secret = re.search(r"client_secret:\s+(\S+)", created).group(1)
    status, body = http_get(f"{url}/health", token=srv.token(cid, secret))
    assert status == 403 and "another environment" in body, (status, body)
    status, body = http_get(f"{url}/headers?x=1", token=srv.token())
    assert status == 200, body
    assert "x-forwarded-prefix: /sg/default/private-api" in body, body
    status, body = http_get(f"{url}/nothing-here", token=srv.token())
    assert status == 404, (status, body)
    status, body = http_get(url.replace("private-api", "no-such-group") + "/health")
    assert status == 404 and "nothing is served at /sg/default/no-such-group" in body, (status, body)
    # An HTTP/1.1 upgrade (WebSocket's handshake) becomes a tunnel to the replica.
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1] + "/ws"
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n"
                     f"Authorization: Bearer {srv.token()}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        for msg in [b"ping", b"x" * 100000]:
            conn.sendall(msg)
            back = b""
            while len(back) < len(msg):
                back += conn.recv(65536)
            assert back == msg
    metrics = srv.metrics()
    assert 'compute_api_ingress_requests_total{group="default/private-api",code="401"}' in metrics, metrics
    assert 'compute_api_ingress_requests_total{group="default/private-api",code="200"}' in metrics, metrics
    listed = srv.cli("sg", "ls").stdout
    assert "private-api" in listed and "Running" in listed and url in listed, listed
    replica = group(srv, "private-api")["metadata"]["replicas"][0]
    assert f"compute logs {replica}" in srv.cli("sg", "inspect", "private-api").stdout
    srv.cli("logs", replica)
    rpc(srv, "DeleteScalingGroup", {"name": "private-api"})


def test_bad_specs_are_refused_naming_the_field(srv):
    def spec(**container):
        c = {"name": "bad-api", "image": IMAGE, "port": 8080}
        c.update(container)
        return {"containerSpec": c, "scalingSpec": {"minReplicas": 1, "maxReplicas": 2}}

    def refused(body, code, http_code, *words):
        status, out = srv.connect(f"{SG}/CreateScalingGroup", body, token=srv.token())
        assert status == http_code and out["code"] == code, (status, out)
        for w in words:
            assert w in out["message"], out

    refused({}, "invalid_argument", 400, "spec is required")
    no_port = spec()
    del no_port["containerSpec"]["port"]
    refused({"spec": no_port}, "invalid_argument", 400, "port is required")
    refused({"spec": spec(port=70000)}, "invalid_argument", 400, "70000", "1-65535")
    refused({"spec": spec(protocol="ftp")}, "invalid_argument", 400, "protocol", "ftp")
    refused({"spec": spec(name="Bad_Name")}, "invalid_argument", 400, "Bad_Name")
    refused({"spec": spec(image="")}, "invalid_argument", 400, "spec.image is required")
    bounds = spec()
    bounds["scalingSpec"] = {"minReplicas": 3, "maxReplicas": 2}
    refused({"spec": bounds}, "invalid_argument", 400, "max_replicas 2", "min_replicas (3)")
    cpu = spec()
    cpu["scalingSpec"]["targetCpuUtilizationPercentage"] = 0
    refused({"spec": cpu}, "invalid_argument", 400, "target_cpu_utilization_percentage 0")
    cron = spec()
    cron["scalingSpec"]["cronScalingTrigger"] = {"timezone": "UTC"}
    refused({"spec": cron}, "invalid_argument", 400, "cron_scaling_trigger.windows is empty")
    cron["scalingSpec"]["cronScalingTrigger"] = {
        "timezone": "Mars/Olympus", "windows": [{"start": "0 9 * * *", "end": "0 17 * * *", "desiredReplicas": 1}]}
    refused({"spec": cron}, "invalid_argument", 400, "cron_scaling_trigger.timezone", "Mars/Olympus")
    cron["scalingSpec"]["cronScalingTrigger"] = {
        "timezone": "UTC", "windows": [{"start": "0 9 * * *", "end": "at five", "desiredReplicas": 1}]}
    refused({"spec": cron}, "invalid_argument", 400, "cron_scaling_trigger.windows[0].end")
    queue = spec()
    queue["scalingSpec"]["functionQueueDepthTrigger"] = {"functionName": "f", "targetQueueDepth": 0}
    refused({"spec": queue}, "invalid_argument", 400, "target_queue_depth 0")
    gpu = spec()
    gpu["scalingSpec"]["gpuUtilizationTrigger"] = {"targetUtilizationPercentage": 50}
    refused({"spec": gpu}, "unimplemented", 501, "gpu_utilization_trigger")
    vol = spec(volumes=[{"name": "no-such-volume", "mountPath": "/data", "type": "versioned_chalkfs"}])
    refused({"spec": vol}, "not_found", 404, "no-such-volume")
    refused({"spec": spec(lifetime="60s")}, "invalid_argument", 400, "lifetime")
    status, out = srv.connect(f"{SG}/GetScalingGroup", {"name": "never-made"}, token=srv.token())
    assert status == 404 and "never-made" in out["message"], out
    status, out = srv.connect(f"{SG}/DeleteScalingGroup", {}, token=srv.token())
    assert status == 400 and "id or name" in out["message"], out
    # Creating a group of a name that exists deploys it again (the same group, no new revision when unchanged);
    # renaming through an update is refused.
    made = rpc(srv, "CreateScalingGroup", {"spec": spec(entrypoint=ENTRY)})["scalingGroup"]
    again = rpc(srv, "CreateScalingGroup", {"spec": spec(entrypoint=ENTRY)})["scalingGroup"]
    assert again["id"] == made["id"] and again["revisionId"] == made["revisionId"], (made, again)
    status, out = srv.connect(f"{SG}/UpdateScalingGroup",
                              {"scalingGroupId": made["id"], "spec": spec(name="other-api"), "updateMask": "spec"},
                              token=srv.token())
    assert status == 400 and "cannot be renamed" in out["message"], out
    split = {"scalingGroupId": made["id"], "updateMask": "traffic",
             "traffic": {"targets": [{"latestRevision": {}, "percent": 50}]}}
    status, out = srv.connect(f"{SG}/UpdateScalingGroup", split, token=srv.token())
    assert status == 501 and "splitting traffic" in out["message"], out
    listed = rpc(srv, "ListScalingGroups", {})
    assert "bad-api" in [g["name"] for g in listed["scalingGroups"]], listed
    rpc(srv, "DeleteScalingGroup", {"id": made["id"]})


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_groups_are_served_again_after_a_restart(tmp_path, how):
    require_root()
    s = Server(tmp_path / "data")
    try:
        out = sdk(s, """
            vol = Volume("durable-data")
            vol.put_file("f.txt", b"kept")
            sg = ScalingGroup(image=IMAGE, name="durable-api", entrypoint=ENTRY, port=8080,
                              volumes=[("durable-data", "/data")]).deploy().wait_ready()
            print("READ", bytes(sg.call("/file?p=/data/f.txt", method="GET").content))
        """)
        assert "READ b'kept'" in out, out
        before = group(s, "durable-api")
        old = live_sandboxes(s)
        assert len(old) == 1, old
        # A crash (SIGKILL) leaves the replica, its network and its FUSE mount behind: the restart removes them.
        s.stop(getattr(signal, how))
        s.start()
        wait_for("the old replica removed", lambda: (old[0] not in live_sandboxes(s), live_sandboxes(s)))
        after = wait_for("ready after the restart", lambda: ((g := group(s, "durable-api")).get("readyReplicas", 0) == 1, g))
        assert after["id"] == before["id"] and after["revisionId"] == before["revisionId"]
        assert after["metadata"]["replicas"] != before["metadata"]["replicas"], "new replicas after the restart"
        status, body = http_get(f"{after['webUrl']}/file?p=/data/f.txt")
        assert (status, body) == (200, "kept")
        rpc(s, "DeleteScalingGroup", {"name": "durable-api"})
        assert not live_sandboxes(s)
    finally:
        s.stop()


def raw_get(port, host, path, token=None):
    """GET over a plain socket to 127.0.0.1:port with this Host header (no DNS needed for a made-up domain)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def test_groups_are_reached_by_host_name_under_an_ingress_domain(tmp_path):
    require_root()
    s = Server(tmp_path / "data", config='ingress_domain = "Apps.Test"\n')
    try:
        sdk(s, """
            ScalingGroup(image=IMAGE, name="host-api", entrypoint=ENTRY, port=8080).deploy()
        """)
        port = int(s.url.rsplit(":", 1)[1])
        g = wait_for("ready", lambda: ((g := group(s, "host-api")).get("readyReplicas", 0) == 1, g))
        assert g["webUrl"] == f"http://host-api.default.apps.test:{port}", g["webUrl"]
        # The whole path reaches the replica: no prefix to strip, so apps with absolute links work.
        status, body = raw_get(port, f"host-api.default.apps.test:{port}", "/headers?x=1")
        assert status == 200 and f"host: host-api.default.apps.test:{port}" in body, body
        assert "x-forwarded-prefix" not in body, body
        assert raw_get(port, "host-api.apps.test", "/health") == (200, "ok"), "the default environment's short form"
        status, body = raw_get(port, "nope.default.apps.test", "/health")
        assert status == 404 and "nope" in body, body
        # Paths keep working, and the API itself is not shadowed by the domain.
        assert http_get(f"{s.url}/sg/default/host-api/health") == (200, "ok")
        assert http_get(f"{s.url}/healthz")[0] == 200
        rpc(s, "DeleteScalingGroup", {"name": "host-api"})
    finally:
        s.stop()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.toml").write_text('ingress_domain = "http://apps.test:80"\n')
    out = subprocess.run([compute_bin(), "serve", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "is not a DNS domain" in out.stderr, out


CT = "chalk.container.v1.ContainerService"


def test_a_container_with_a_port_is_reached_at_its_web_url(srv, tmp_path):
    """#20 item 3: the seed's "single long-running process: Container with port" gets a web_url through the ingress,
    by path and (with an ingress domain) by host; `authentication` is honoured; the route goes with the container;
    a scaling group and a container with a port cannot take one name."""
    require_root()
    out = sdk_ok(srv, "from chalkcompute import Container", f"""
        import urllib.request
        c = Container(image={IMAGE!r}, name="web-one", port=8080, entrypoint={ENTRY!r}).run()
        info = c.info
        print("URL", info.web_url)
        with urllib.request.urlopen(info.web_url + "/headers?x=1", timeout=60) as r:
            print("GOT", r.status, "x-forwarded-prefix: /sg/default/web-one" in r.read().decode())
        c.stop()
    """).stdout
    assert re.search(r"URL http://127\.0\.0\.1:\d+/sg/default/web-one\n", out), out
    assert "GOT 200 True" in out, out
    status, body = http_get(f"{srv.url}/sg/default/web-one/health")
    assert status == 404 and "nothing is served" in body, "the route went with the container"

    # Authenticated, over the wire as the SDK sends it; the name is then taken for scaling groups too.
    spec = {"name": "web-auth", "image": IMAGE, "entrypoint": ENTRY, "port": 8080, "authentication": "AUTHENTICATED"}
    status, c = srv.connect(f"{CT}/RunContainer", {"container": {"spec": spec}}, token=srv.token())
    assert status == 200 and c["container"]["webUrl"].endswith("/sg/default/web-auth"), c
    url = c["container"]["webUrl"]
    listed = json.loads(srv.cli("container", "ls", "-o", "json").stdout)
    assert [x["webUrl"] for x in listed if x["name"] == "web-auth"] == [url], listed
    assert http_get(f"{url}/health", timeout=90)[0] == 401
    assert http_get(f"{url}/health", token=srv.token(), timeout=90) == (200, "ok")
    taken = sdk_ok(srv, "from chalkcompute import ScalingGroup", f"""
        try:
            ScalingGroup(image={IMAGE!r}, name="web-auth", entrypoint={ENTRY!r}, port=8080).deploy()
            print("DEPLOYED")
        except Exception as e:
            print("REFUSED", e)
    """).stdout
    assert "REFUSED" in taken and "container of that name with a port" in taken, taken
    srv.connect(f"{CT}/StopContainer", {"name": "web-auth"}, token=srv.token())
    bad = dict(spec, name="web-bad", port=70000)
    status, err = srv.connect(f"{CT}/RunContainer", {"container": {"spec": bad}}, token=srv.token())
    assert status == 400 and "spec.port 70000" in err["message"], err

    # By host under an ingress domain.
    s = Server(tmp_path / "data", config='ingress_domain = "apps.test"\n' + ALIASES)
    try:
        status, c = s.connect(f"{CT}/RunContainer", {"container": {"spec": dict(spec, name="web-host", authentication="")}},
                              token=s.token())
        port = int(s.url.rsplit(":", 1)[1])
        assert status == 200 and c["container"]["webUrl"] == f"http://web-host.default.apps.test:{port}", c
        assert raw_get(port, f"web-host.default.apps.test:{port}", "/health") == (200, "ok")
        s.connect(f"{CT}/StopContainer", {"name": "web-host"}, token=s.token())
    finally:
        s.stop()
