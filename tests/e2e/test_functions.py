"""Functions against the official SDK: program (e) verbatim, versions that follow the code, errors that carry the
remote traceback, the call policies (concurrency, rate limit, retries) enforced by the server, local secrets, calls
through the API (`CHALK_FUNCTION_CALL_VIA_API=1`), deletion, a server restart, and bad requests refused naming the
field. Every function runs in real replicas of `chalk-remote-call` built from the SDK's default image."""
import json
import shutil
import textwrap
import uuid

import pytest

from conftest import PROGRAMS, Server, require_root, run_program, run_sdk

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
        s = time.time(); time.sleep(0.4)
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

    @chalkcompute.function(secrets=[Secret.from_local_env("FN_TOKEN")])
    def secret_reader(k: str) -> str:
        import os
        return os.environ.get(k, "<unset>")

    if __name__ == "__main__":
        which = sys.argv[1]
        if which == "concurrency":
            slow.wait_ready()
            out = []
            threads = [threading.Thread(target=lambda i=i: out.append(slow.remote(i))) for i in range(12)]
            [t.start() for t in threads]; [t.join() for t in threads]
            print("SPANS:", ";".join(out))
        elif which == "rate":
            limited.wait_ready()
            print("TIMES:", ",".join(str(limited.remote(i)) for i in range(12)))
        elif which == "retry":
            flaky.wait_ready()
            print("RESULT:", flaky.remote(sys.argv[2]))
        elif which == "broken":
            broken.wait_ready()
            try:
                broken.remote(3); print("RESULT: no error")
            except Exception as e:
                print("RESULT:", type(e).__name__, e)
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


@pytest.fixture(scope="module")
def fns(tmp_path_factory):
    require_root()
    d = tmp_path_factory.mktemp("functions")
    s = Server(d / "data")
    (d / "policies.py").write_text(POLICIES)
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


def test_a_remote_error_carries_its_type_message_and_traceback(fns):
    out = run(fns, "policies.py", "broken")
    assert out.startswith("RemoteExecutionError"), out
    proc = run_program_args(fns.workdir / "policies.py", fns.sdk_env(FN_TOKEN="t"), ["broken"])
    assert "ValueError: bad x 3" in proc.stdout and 'raise ValueError(f"bad x {x}")' in proc.stdout, proc.stdout


def test_concurrency_is_capped_by_the_server_but_calls_do_overlap(fns):
    spans = [tuple(map(float, s.split())) for s in line(run(fns, "policies.py", "concurrency"), "SPANS:").split(";")]
    assert len(spans) == 12
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    # The replica itself would run all twelve at once; the function's policy lets two through at a time.
    assert peak == 2, f"{peak} calls ran at once: {spans}"


def test_a_rate_limit_admits_at_most_rate_calls_in_any_window(fns):
    times = sorted(float(t) for t in line(run(fns, "policies.py", "rate"), "TIMES:").split(","))
    assert len(times) == 12
    # rate_limit=5 is five per second: the sixth call after any call starts a second (less network jitter) later.
    gaps = [times[i + 5] - times[i] for i in range(len(times) - 5)]
    assert min(gaps) > 0.9, f"six calls within {min(gaps):.3f}s: {times}"


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
