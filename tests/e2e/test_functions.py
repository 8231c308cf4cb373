"""Functions against the official SDK: program (e) verbatim, versions that follow the code, errors that carry the
remote traceback, the call policies (concurrency, rate limit, retries) enforced by the server, local secrets, calls
through the API (`CHALK_FUNCTION_CALL_VIA_API=1`), deletion, a server restart, and bad requests refused naming the
field. Every function runs in real replicas of `chalk-remote-call` built from the SDK's default image."""
import json
import shutil
import signal
import textwrap
import time
import uuid

import pytest

from conftest import PROGRAMS, Server, require_root, run_program, run_sdk, wait_for

CATALOG = "chalk.externalfunctioncatalog.v1.ExternalFunctionCatalogService"

# Several functions in one program: the SDK deploys every decorated function when the module loads, so each run
# after the first reuses the deployed versions.
POLICIES = textwrap.dedent('''
    import sys, threading, time
    import chalkcompute
    from chalkcompute import Secret

    @chalkcompute.function(concurrency=2)
    def slow(i: int) -> str:
        import time
        s = time.time(); time.sleep(0.2)
        return f"{s} {time.time()}"

    @chalkcompute.function(rate_limit=5)
    def limited(i: int) -> float:
        import time
        return time.time()

    @chalkcompute.function(retries=3)
    def flaky(key: str) -> int:
        import os
        p = f"/tmp/flaky-{key}"
        n = int(open(p).read()) if os.path.exists(p) else 0
        open(p, "w").write(str(n + 1))
        if n < 2:
            raise RuntimeError(f"attempt {n} fails")
        return n

    @chalkcompute.function()
    def broken(x: int) -> int:
        raise ValueError(f"bad x {x}")

    @chalkcompute.function(max_batching_size=5, max_buffer_duration=2000)
    def batched(i: int) -> float:
        import time
        return time.time()

    @chalkcompute.function(call_timeout=1.0)
    def sleepy(s: float) -> float:
        import time
        time.sleep(s)
        return s

    @chalkcompute.function(secrets=[Secret.from_local_env("FN_TOKEN")])
    def secret_reader(k: str) -> str:
        import os
        return os.environ.get(k, "<unset>")

    if __name__ == "__main__":
        which = sys.argv[1]
        if which == "concurrency":
            slow.wait_ready()
            out = []
            threads = [threading.Thread(target=lambda i=i: out.append(slow.remote(i))) for i in range(50)]
            [t.start() for t in threads]; [t.join() for t in threads]
            print("SPANS:", ";".join(out))
        elif which == "rate":
            limited.wait_ready()
            print("TIMES:", ",".join(str(limited.remote(i)) for i in range(21)))
        elif which == "retry":
            flaky.wait_ready()
            print("RESULT:", flaky.remote(sys.argv[2]))
        elif which == "broken":
            broken.wait_ready()
            try:
                broken.remote(3); print("RESULT: no error")
            except Exception as e:
                print("RESULT:", type(e).__name__, e)
        elif which == "batch":
            batched.wait_ready()
            batched.remote(-1)
            # Alone, a call waits for the batch to fill until max_buffer_duration (2 s) flushes it...
            sent = time.time(); alone = batched.remote(0) - sent
            # ...while five together fill it (max_batching_size=5) and run at once.
            delays = []
            def one(i):
                s = time.time(); delays.append(batched.remote(i) - s)
            threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
            [t.start() for t in threads]; [t.join() for t in threads]
            print("RESULT:", alone, max(delays))
        elif which == "timeout":
            sleepy.wait_ready()
            sent = time.time()
            try:
                sleepy.remote(8.0); print("RESULT: answered")
            except Exception as e:
                print("RESULT:", round(time.time() - sent, 1), type(e).__name__, e)
        elif which == "secret":
            secret_reader.wait_ready()
            print("RESULT:", secret_reader.remote("FN_TOKEN"))
''')

VERSIONED = textwrap.dedent('''
    import chalkcompute

    @chalkcompute.function()
    def greet(who: str) -> str:
        return "{word} " + who

    if __name__ == "__main__":
        greet.wait_ready()
        print("RESULT:", greet.remote("ada"))
''')


# Deferred calls (`.defer()` / `.get()` / `.purge()`): the SDK reaches the queue only in web-identity mode, with the
# variables `compute env --token-file` prints.
DEFERRED = textwrap.dedent('''
    import sys, time
    import chalkcompute
    from chalkcompute import QueuePolicy
    from chalkcompute._function import FunctionCallHandle

    @chalkcompute.function()
    def square(x: int) -> int:
        return x * x

    @chalkcompute.function()
    def nap(s: float) -> float:
        import time
        time.sleep(s)
        return s

    @chalkcompute.function(concurrency=1)
    def single(s: float) -> float:
        import time
        time.sleep(s)
        return s

    @chalkcompute.function(queue_policy=QueuePolicy(max_items=2))
    def tight(s: float) -> float:
        import time
        time.sleep(s)
        return s

    @chalkcompute.function()
    def sour(x: int) -> int:
        raise ValueError(f"deferred bad {x}")

    if __name__ == "__main__":
        which = sys.argv[1]
        if which == "defer":
            square.wait_ready()
            handles = [square.defer(i) for i in range(8)]
            print("RESULT:", [h.get(timeout=300) for h in handles])
        elif which == "error":
            sour.wait_ready()
            try:
                sour.defer(7).get(timeout=300); print("RESULT: no error")
            except Exception as e:
                print("RESULT:", type(e).__name__, e)
        elif which == "full":
            tight.wait_ready()
            handles = [tight.defer(4.0), tight.defer(4.0)]
            try:
                tight.defer(4.0); print("RESULT: a third call was accepted")
            except Exception as e:
                print("RESULT:", type(e).__name__, e, "| then", [h.get(timeout=300) for h in handles])
        elif which == "purge":
            single.wait_ready()
            handles = [single.defer(3.0) for _ in range(6)]
            time.sleep(0.5)
            dropped = single.purge()
            first = handles[0].get(timeout=300)
            try:
                handles[-1].get(timeout=60); last = "answered"
            except Exception as e:
                last = f"{type(e).__name__}: {e}"
            print("RESULT:", dropped, first, "|", last)
        elif which == "enqueue":
            nap.wait_ready()
            print("RESULT:", ",".join(nap.defer(float(sys.argv[2])).call_id for _ in range(3)))
        elif which == "collect":
            print("RESULT:", [FunctionCallHandle(nap, c).get(timeout=600) for c in sys.argv[2].split(",")])
''')


SCHEDULED = textwrap.dedent('''
    import chalkcompute

    @chalkcompute.function(schedule="2s")
    def ticker() -> str:
        import time
        print("tick at", time.time(), flush=True)
        return "ticked"

    @chalkcompute.function(schedule="* * * * * *")
    def every_second() -> int:
        return 1

    if __name__ == "__main__":
        ticker.wait_ready()
        every_second.wait_ready()
        print("RESULT: deployed")
''')


QUEUE_SCALED = textwrap.dedent('''
    import sys
    import chalkcompute
    from chalkcompute._function import FunctionCallHandle

    @chalkcompute.function(min_replicas=0, max_replicas=3, target_queue_depth=2, shutdown_delay_seconds=2)
    def drain(s: float) -> float:
        import time
        time.sleep(s)
        return s

    if __name__ == "__main__":
        drain.wait_ready()
        which = sys.argv[1]
        if which == "remote":
            print("RESULT:", drain.remote(0.0))
        elif which == "burst":
            print("RESULT:", ",".join(drain.defer(5.0).call_id for _ in range(6)))
        elif which == "collect":
            print("RESULT:", [FunctionCallHandle(drain, c).get(timeout=300) for c in sys.argv[2].split(",")])
''')


def group_state(server, name):
    status, out = server.connect("chalk.scalinggroup.v1.ScalingGroupManagerService/GetScalingGroup",
                                 {"name": name}, server.token())
    assert status == 200, out
    g = out["scalingGroup"]
    return g["status"], g.get("readyReplicas", 0)


def web_env(server):
    """The SDK's environment in web-identity mode, from what `compute env --token-file` prints."""
    token = server.workdir / "token"
    out = server.cli("env", "--token-file", str(token)).stdout
    exports = dict(l[len("export "):].split("=", 1) for l in out.splitlines() if l.startswith("export "))
    assert set(exports) == {"CHALK_API_SERVER", "CHALK_WEB_IDENTITY_TOKEN_FILE", "CHALK_FUNCTION_QUEUE_ENDPOINT"}, out
    assert "unset CHALK_CLIENT_ID CHALK_CLIENT_SECRET" in out, out
    assert oct(token.stat().st_mode & 0o777) == "0o600"
    env = server.sdk_env(**exports)
    env.pop("CHALK_CLIENT_ID")
    env.pop("CHALK_CLIENT_SECRET")
    return env


def deferred(server, *args):
    proc = run_program_args(server.workdir / "deferred.py", web_env(server), args)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return line(proc.stdout, "RESULT:")


@pytest.fixture(scope="module")
def fns(tmp_path_factory):
    require_root()
    d = tmp_path_factory.mktemp("functions")
    s = Server(d / "data")
    (d / "policies.py").write_text(POLICIES)
    (d / "deferred.py").write_text(DEFERRED)
    (d / "scheduled.py").write_text(SCHEDULED)
    (d / "queue_scaled.py").write_text(QUEUE_SCALED)
    s.workdir = d
    yield s
    s.stop()


def run(server, name, *args, **env):
    proc = run_program_args(server.workdir / name, server.sdk_env(FN_TOKEN="tok-e2e-41", **env), args)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return line(proc.stdout, "RESULT:") if "RESULT:" in proc.stdout else proc.stdout


def run_program_args(path, env, args, timeout=900):
    import subprocess
    import sys
    return subprocess.run([sys.executable, str(path), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=path.parent)


def line(out, prefix):
    return [l for l in out.splitlines() if l.startswith(prefix)][-1][len(prefix):].strip()


def deploy_result(server, filename, definition, function):
    """Deploys `function`, defined by `definition`, from a program file (the SDK reads a function's source from
    disk); returns "deployed" or the error's type and message."""
    code = "import chalkcompute\n" + textwrap.dedent(definition) + textwrap.dedent(f'''
        try:
            {function}.deploy(); print("RESULT: deployed")
        except Exception as e:
            print("RESULT:", type(e).__name__, e)
    ''')
    (server.workdir / filename).write_text(code)
    return line(run_program_args(server.workdir / filename, server.sdk_env(), []).stdout, "RESULT:")


def catalog(server, method, body):
    return server.connect(f"{CATALOG}/{method}", body, server.token())


def test_program_e_runs_verbatim_locally_and_remotely(fns, tmp_path):
    shutil.copy(PROGRAMS / "e_function.py", tmp_path / "e_function.py")
    proc = run_program(tmp_path / "e_function.py", fns.sdk_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LOCAL: Ada Lovelace" in proc.stdout and "REMOTE: Ada Lovelace" in proc.stdout, proc.stdout
    status, out = catalog(fns, "GetExternalFunction", {"functionName": "normalize_name", "includeScalingGroup": True})
    assert status == 200, out
    version = out["externalFunction"]["currentVersion"]
    assert version["version"] == 1 and version["scalingGroupName"] == "normalize-name", version
    assert [c["name"] for c in version["inputArrowSchema"]["columns"]] == ["name"]
    assert out["scalingGroup"]["spec"]["containerSpec"]["image"], "the function's group is shown with its image"


def test_program_f_runs_verbatim_with_its_function_and_container_secrets(fns, tmp_path):
    # What the program references and an operator provides: a secret and an integration.
    fns.cli("secret", "set", "OPENAI_API_KEY", "--value", "sk-operator-f")
    fns.cli("integration", "set", "prod_postgres", "--kind", "postgres", "--set", "host=db.internal",
            "--set", "user=app", "--set", "password=pg-pw-f", "--set", "database=prod")
    shutil.copy(PROGRAMS / "f_secrets.py", tmp_path / "f_secrets.py")
    proc = run_program(tmp_path / "f_secrets.py", fns.sdk_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FN REMOTE: s3cr3t" in proc.stdout, proc.stdout + proc.stderr
    log = (fns.data_dir.parent / f"{fns.data_dir.name}.log").read_text(errors="replace")
    assert "s3cr3t" not in log and "pg-pw-f" not in log and "sk-operator-f" not in log


def test_a_remote_error_carries_its_type_message_and_traceback(fns):
    out = run(fns, "policies.py", "broken")
    assert out.startswith("RemoteExecutionError"), out
    proc = run_program_args(fns.workdir / "policies.py", fns.sdk_env(FN_TOKEN="t"), ["broken"])
    assert "ValueError: bad x 3" in proc.stdout and 'raise ValueError(f"bad x {x}")' in proc.stdout, proc.stdout


def test_concurrency_is_capped_by_the_server_but_calls_do_overlap(fns):
    spans = [tuple(map(float, s.split())) for s in line(run(fns, "policies.py", "concurrency"), "SPANS:").split(";")]
    assert len(spans) == 50, "every call completes"
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    # The replica itself would run all fifty at once; the function's policy lets two through at a time.
    assert peak == 2, f"{peak} calls ran at once: {spans}"


def test_a_rate_limit_admits_at_most_rate_calls_in_any_window(fns):
    times = sorted(float(t) for t in line(run(fns, "policies.py", "rate"), "TIMES:").split(","))
    assert len(times) == 21
    assert times[-1] - times[0] > 3.9, "21 calls at five a second span four seconds"
    # rate_limit=5 is five per second: the sixth call after any call starts a second (less network jitter) later.
    gaps = [times[i + 5] - times[i] for i in range(len(times) - 5)]
    assert min(gaps) > 0.9, f"six calls within {min(gaps):.3f}s: {times}"


def test_batching_coalesces_calls_until_the_batch_is_full_or_the_buffer_time_passes(fns):
    alone, together = map(float, run(fns, "policies.py", "batch").split())
    assert alone > 1.5, f"a lone call ran {alone:.2f}s after it was sent: it was not held for the batch to fill"
    assert together < 1.5, f"five calls that fill the batch waited {together:.2f}s: the full batch was not flushed"


def test_call_timeout_ends_a_call_that_runs_too_long_with_deadline_exceeded(fns):
    elapsed, rest = run(fns, "policies.py", "timeout").split(" ", 1)
    # The SDK ends the call at call_timeout (TimeoutError) and cancels the stream; the server stops the call
    # with it (CANCELLED, or DEADLINE_EXCEEDED when the client sends grpc-timeout) rather than running 8 s.
    assert rest.startswith("TimeoutError") and "timed out after 1s" in rest, rest
    ended = [l for l in fns.metrics().splitlines()
             if l.startswith("compute_api_requests_total") and "RemoteCallService/CallFunction" in l
             and ('code="CANCELLED"' in l or 'code="DEADLINE_EXCEEDED"' in l)]
    assert ended, "the server did not record the call as cancelled or past its deadline"
    assert float(elapsed) < 6, f"a 1 s call_timeout ended an 8 s call only after {elapsed}s: {rest}"


def test_a_function_referring_to_a_missing_secret_is_refused_at_deploy_naming_it(fns):
    out = deploy_result(fns, "missing_secret.py", '''
        from chalkcompute import Secret
        @chalkcompute.function(secrets=[Secret.from_chalk_env("NO_SUCH_SECRET_41")])
        def needs_secret() -> int:
            return 1
    ''', "needs_secret")
    assert "NO_SUCH_SECRET_41" in out and out != "deployed", out


def test_a_failing_call_is_retried_until_it_succeeds(fns):
    assert run(fns, "policies.py", "retry", uuid.uuid4().hex[:8]) == "2", "two failures, then the third attempt"


def test_local_secrets_reach_the_function_and_calls_via_the_api_work(fns):
    assert run(fns, "policies.py", "secret") == "tok-e2e-41"
    assert run(fns, "policies.py", "secret", CHALK_FUNCTION_CALL_VIA_API="1") == "tok-e2e-41"
    status, out = fns.connect("chalk.server.v1.EnvironmentSecretsService/ListSecrets", {"includeScoped": True},
                              fns.token())
    assert status == 200 and "tok-e2e-41" not in json.dumps(out)
    scoped = [s for s in out["secrets"] if s["name"] == "FN_TOKEN"]
    assert scoped and scoped[0]["scope"]["ref"] == "secret_reader", out


def test_versions_follow_the_code_and_an_unchanged_deploy_reuses_its_version(fns):
    program = fns.workdir / "versioned.py"
    program.write_text(VERSIONED.replace("{word}", "hello"))
    assert run(fns, "versioned.py") == "hello ada"
    assert run(fns, "versioned.py") == "hello ada"
    status, out = catalog(fns, "GetExternalFunction", {"functionName": "greet"})
    assert out["externalFunction"]["currentVersion"]["version"] == 1, "an unchanged deploy adds no version"
    program.write_text(VERSIONED.replace("{word}", "howdy"))
    assert run(fns, "versioned.py") == "howdy ada"
    status, out = catalog(fns, "ListExternalFunctionVersions", {"functionName": "greet"})
    assert status == 200, out
    numbers = [e["externalFunctionVersion"]["version"] for e in out["entries"]]
    assert sorted(numbers) == [1, 2], numbers
    status, out = catalog(fns, "ListExternalFunctions", {"search": "gree"})
    assert [f["name"] for f in out["functions"]] == ["greet"] and out["functions"][0]["currentVersion"] == 2, out


def test_bad_requests_name_the_field_and_unknown_functions_are_not_found(fns):
    status, out = catalog(fns, "EnsureExternalFunction", {"functionName": "x"})
    assert status == 400 and "spec" in out["message"], out
    status, out = catalog(fns, "GetExternalFunction", {"functionName": "no_such_fn"})
    assert status == 404 and "no_such_fn" in out["message"], out
    code = "from chalkcompute import RemoteFunction\ntry:\n    RemoteFunction.from_name('no_such_fn').remote(1)\n" \
           "    print('RESULT: ran')\nexcept Exception as e:\n    print('RESULT:', type(e).__name__, e)\n"
    proc = run_sdk(code, fns.sdk_env())
    assert "no_such_fn" in proc.stdout and "RESULT: ran" not in proc.stdout, proc.stdout + proc.stderr


def test_deferred_calls_answer_each_in_turn_and_an_error_carries_its_traceback(fns):
    assert deferred(fns, "defer") == str([i * i for i in range(8)])
    out = deferred(fns, "error")
    assert out.startswith("RemoteExecutionError"), out
    proc = run_program_args(fns.workdir / "deferred.py", web_env(fns), ["error"])
    assert "ValueError: deferred bad 7" in proc.stdout and 'raise ValueError(f"deferred bad {x}")' in proc.stdout, \
        proc.stdout


def test_a_full_queue_refuses_a_call_naming_max_items_and_the_accepted_ones_run(fns):
    out = deferred(fns, "full")
    assert "RESOURCE_EXHAUSTED" in out.upper() or "(8," in out, out
    assert "max_items" in out and out.endswith("| then [4.0, 4.0]"), out


def test_a_purge_drops_the_calls_not_started_and_the_running_one_finishes(fns):
    # concurrency=1: one call runs at a time, so after half a second five of the six still wait.
    dropped, rest = deferred(fns, "purge").split(" ", 1)
    assert int(dropped) in (4, 5), rest
    first, last = rest.split(" | ")
    assert first == "3.0", rest
    assert "no deferred call" in last and "purged" in last, last


def completed_runs(server, name):
    out = server.cli("fn", "runs", name, "--limit", "100").stdout
    rows = out.splitlines()[1:]
    # One may be on its way (pending or running) as we look; none failed.
    assert rows and not any(" failed " in r for r in rows), out
    return sum(" completed " in r and "scheduled, completed in" in r for r in rows)


def test_scheduled_functions_run_on_their_period_and_cron_pattern_and_stop_when_deleted(fns):
    assert run(fns, "scheduled.py") == "deployed"
    time.sleep(7)
    # Every 2 s (the first 2 s after deploy) and every second by a six-field cron pattern, all answered.
    assert completed_runs(fns, "ticker") >= 2
    assert completed_runs(fns, "every_second") >= 4
    listed = fns.cli("fn", "ls").stdout
    assert any(l.startswith("ticker ") and " 2s " in l for l in listed.splitlines()), listed
    assert "* * * * * *" in listed, listed
    inspected = fns.cli("fn", "inspect", "ticker").stdout
    assert "schedule: 2s (UTC)" in inspected and "versions:" in inspected, inspected
    as_json = json.loads(fns.cli("fn", "inspect", "ticker", "-o", "json").stdout)
    assert as_json["function"]["externalFunction"]["name"] == "ticker" and as_json["versions"], as_json
    assert "ticker" in [f["name"] for f in json.loads(fns.cli("fn", "ls", "-o", "json").stdout)]
    logs = fns.cli("fn", "logs", "ticker").stdout
    assert logs.count("tick at") >= 2 and "==> replica sbx-" in logs, logs
    for name in ("ticker", "every_second"):
        fns.cli("fn", "rm", name)
    assert "ticker" not in fns.cli("fn", "ls").stdout
    out = fns.cli("fn", "runs", "nope", check=False)
    assert out.returncode != 0 and "nope" in out.stderr, out.stderr


def test_a_schedule_that_is_neither_cron_nor_a_period_is_refused_naming_the_field(fns):
    out = deploy_result(fns, "bad_schedule.py", '''
        @chalkcompute.function(schedule="every hour")
        def hourly() -> int:
            return 1
    ''', "hourly")
    assert "config.schedule" in out and "cron" in out and "period" in out, out


def test_a_function_scales_from_zero_on_a_call_and_on_its_queue_depth_and_back_to_zero(fns):
    def scaled(env=None):
        proc = run_program_args(fns.workdir / "queue_scaled.py", env or fns.sdk_env(), ["remote"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return line(proc.stdout, "RESULT:")

    # min_replicas=0: nothing runs until a call comes; the call waits for its replica and is answered.
    assert scaled() == "0.0"
    wait_for("back to zero after the call", lambda: (group_state(fns, "drain")[1] == 0, group_state(fns, "drain")))
    # Six deferred calls with target_queue_depth=2 want three replicas, up to max_replicas.
    proc = run_program_args(fns.workdir / "queue_scaled.py", web_env(fns), ["burst"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = line(proc.stdout, "RESULT:")
    wait_for("three replicas for six queued calls",
             lambda: (group_state(fns, "drain")[1] == 3, group_state(fns, "drain")))
    proc = run_program_args(fns.workdir / "queue_scaled.py", web_env(fns), ["collect", ids])
    assert line(proc.stdout, "RESULT:") == str([5.0] * 6), proc.stdout + proc.stderr
    wait_for("back to zero once the queue drained",
             lambda: (group_state(fns, "drain") == ("ScaledToZero", 0), group_state(fns, "drain")))


def test_deferred_calls_survive_a_kill_9_and_run_after_the_restart(fns):
    ids = deferred(fns, "enqueue", "4")
    time.sleep(1)  # they are running when the server dies
    fns.stop(signal.SIGKILL)
    fns.start()
    assert deferred(fns, "collect", ids) == "[4.0, 4.0, 4.0]"
    log = (fns.data_dir.parent / f"{fns.data_dir.name}.log").read_text(errors="replace")
    assert "deferred calls left running by the last server run again" in log, log[-3000:]


def test_a_function_serves_again_after_a_restart_and_a_deleted_one_is_gone(fns):
    fns.stop()
    fns.start()
    code = "from chalkcompute import RemoteFunction\nf = RemoteFunction.from_name('normalize_name')\n" \
           "f.wait_ready()\nprint('RESULT:', f.remote('grace hopper'))\n"
    proc = run_sdk(code, fns.sdk_env(), timeout=300)
    assert "RESULT: Grace Hopper" in proc.stdout, proc.stdout + proc.stderr
    status, out = catalog(fns, "DeleteExternalFunction", {"functionName": "normalize_name"})
    assert status == 200, out
    status, out = catalog(fns, "GetExternalFunction", {"functionName": "normalize_name"})
    assert status == 404, out
    status, out = fns.connect("chalk.scalinggroup.v1.ScalingGroupManagerService/GetScalingGroup",
                              {"name": "normalize-name"}, fns.token())
    assert status == 404, f"the function's scaling group is deleted with it: {out}"
