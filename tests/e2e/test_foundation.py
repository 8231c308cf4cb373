"""The foundation against the official SDK: every way the SDK authenticates, clear errors, environments."""
import base64
import json
import re
import subprocess
import time

from conftest import clean_env, compute_bin, run_sdk

# A program whose first resource call needs a valid token in the right environment: it lists containers.
FIRST_CALL = """
from chalkcompute import Container
try:
    print("RESULT: ran", len(Container.list_all()))
except Exception as e:
    code = getattr(e, "code", None)
    print("RESULT:", type(e).__name__, getattr(code, "name", code) or "", e)
"""


def result(proc):
    m = re.search(r"^RESULT: (.*)$", proc.stdout, re.M)
    assert m, f"program did not report a result\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return m.group(1)


def get_token_oks(server):
    m = re.search(
        r'compute_api_requests_total\{method="/chalk.server.v1.AuthService/GetToken",protocol="grpc",code="OK"\} (\d+)',
        server.metrics(),
    )
    return int(m.group(1)) if m else 0


def jwt_payload(token):
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def assert_authenticated(out):
    # The only acceptable failures are about the workload call itself, never about auth.
    assert "UNAUTHENTICATED" not in out and "PERMISSION_DENIED" not in out, out
    assert out.startswith("ran"), out


def test_compute_env_credentials_authenticate_the_sdk(server):
    # Exactly what a user does: eval "$(compute env)".
    script = f'eval "$({compute_bin()} env --data-dir {server.data_dir})"; exec python -c "$PROG"'
    import sys

    env = clean_env()
    env["PROG"] = FIRST_CALL
    env["PATH"] = f"{sys.prefix}/bin:" + env.get("PATH", "")
    before = get_token_oks(server)
    started = time.time()
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    out = result(proc)
    assert_authenticated(out)
    assert time.time() - started < 30
    # GetToken twice: once plain, once scoped to the resolved environment.
    assert get_token_oks(server) - before == 2


def test_env_prints_the_listening_address(server):
    out = server.cli("env").stdout
    assert f"export CHALK_API_SERVER={server.url}" in out
    assert f"export CHALK_CLIENT_ID={server.client_id}" in out
    assert f"export CHALK_CLIENT_SECRET={server.client_secret}" in out


def test_chalk_yml_in_home(server, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".chalk.yml").write_text(
        "tokens:\n"
        "  default:\n"
        f"    clientId: {server.client_id}\n"
        f"    clientSecret: {server.client_secret}\n"
        f"    apiServer: {server.url}\n"
        "    activeEnvironment: default\n"
    )
    env = clean_env()
    env["HOME"] = str(home)
    before = get_token_oks(server)
    proc = run_sdk(FIRST_CALL, env, cwd=str(home))
    assert_authenticated(result(proc))
    assert get_token_oks(server) - before >= 1


def test_web_identity_token_file(server, tmp_path):
    token = server.token()
    claims = jwt_payload(token)
    assert claims["environment_id"] == server.environment_id and claims["exp"] > time.time() + 86400
    path = tmp_path / "token.jwt"
    path.write_text(token)
    env = clean_env()
    env.update(CHALK_API_SERVER=server.url, CHALK_WEB_IDENTITY_TOKEN_FILE=str(path))
    before = get_token_oks(server)
    assert_authenticated(result(run_sdk(FIRST_CALL, env)))
    assert get_token_oks(server) == before, "the web-identity path makes no token exchange"

    # A forged token of the right shape is refused.
    forged = ".".join(
        base64.urlsafe_b64encode(json.dumps(p).encode()).decode().rstrip("=")
        for p in ({"alg": "HS256", "kid": "k-x"}, {"environment_id": server.environment_id, "exp": 9999999999})
    ) + ".c2ln"
    path.write_text(forged)
    out = result(run_sdk(FIRST_CALL, env))
    assert "UNAUTHENTICATED" in out, out


def test_wrong_secret_is_a_clear_auth_error(server):
    proc = run_sdk(FIRST_CALL, server.sdk_env(CHALK_CLIENT_SECRET="not-the-secret"))
    out = proc.stdout + proc.stderr
    # The SDK surfaces the server's message verbatim: it says what is wrong and where to look.
    assert "invalid client credentials: check CHALK_CLIENT_ID and CHALK_CLIENT_SECRET" in out, out


UNIMPLEMENTED_CALL = """
from chalkcompute._connect import ConnectClient
from chalkcompute._gen.chalk.sandbox.v1 import runtime_service_connect as rs, runtime_service_pb as pb
client = ConnectClient()
stub = client.stub(rs.SandboxRuntimeServiceClientSync)
try:
    for _ in client.call(stub.execute_python, iter([pb.ExecutePythonRequest()])):
        pass
    print("RESULT: ran")
except Exception as e:
    print("RESULT:", type(e).__name__, e)
"""


def test_unimplemented_method_fails_promptly(server):
    started = time.time()
    out = result(run_sdk(UNIMPLEMENTED_CALL, server.sdk_env()))
    elapsed = time.time() - started
    assert "SandboxRuntimeService/ExecutePython is not implemented by this Compute server yet" in out, out
    assert elapsed < 30, f"took {elapsed:.1f}s: an unimplemented method must fail fast, not hang"


def test_two_environments_cannot_see_each_other(server, tmp_path):
    server.cli("environment", "create", "staging")
    created = server.cli("client", "create", "stager", "--environment", "staging").stdout
    staging_id = re.search(r"environment:\s+(\S+)", created).group(1)
    cid = re.search(r"client_id:\s+(\S+)", created).group(1)
    secret = re.search(r"client_secret:\s+(\S+)", created).group(1)

    # The staging client authenticates in staging...
    env = server.sdk_env(CHALK_CLIENT_ID=cid, CHALK_CLIENT_SECRET=secret)
    assert_authenticated(result(run_sdk(FIRST_CALL, env)))
    # ...but cannot get into the default environment.
    out = result(run_sdk(FIRST_CALL, dict(env, CHALK_ENVIRONMENT="default")))
    assert "PERMISSION_DENIED" in out and "no access to environment" in out, out

    # A token for staging cannot act in default, even when the request says so.
    token = server.token(cid, secret)
    assert jwt_payload(token)["environment_id"] == staging_id
    path = tmp_path / "staging.jwt"
    path.write_text(token)
    wi = clean_env()
    wi.update(CHALK_API_SERVER=server.url, CHALK_WEB_IDENTITY_TOKEN_FILE=str(path), CHALK_ENVIRONMENT=server.environment_id)
    out = result(run_sdk(FIRST_CALL, wi))
    assert "PERMISSION_DENIED" in out, out

    # And the front door says which environment a token acts in.
    import urllib.request

    req = urllib.request.Request(f"{server.url}/v1/who-am-i", headers={"authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.loads(r.read())["environment_id"] == staging_id


def test_revoked_client_is_cut_off(server, tmp_path):
    created = server.cli("client", "create", "temp").stdout
    cid = re.search(r"client_id:\s+(\S+)", created).group(1)
    secret = re.search(r"client_secret:\s+(\S+)", created).group(1)
    token = server.token(cid, secret)
    path = tmp_path / "t.jwt"
    path.write_text(token)
    wi = clean_env()
    wi.update(CHALK_API_SERVER=server.url, CHALK_WEB_IDENTITY_TOKEN_FILE=str(path))
    assert_authenticated(result(run_sdk(FIRST_CALL, wi)))
    server.cli("client", "revoke", cid)
    out = result(run_sdk(FIRST_CALL, wi))
    assert "UNAUTHENTICATED" in out and "revoked" in out, out
    proc = run_sdk(FIRST_CALL, server.sdk_env(CHALK_CLIENT_ID=cid, CHALK_CLIENT_SECRET=secret))
    assert "revoked" in proc.stdout + proc.stderr
    assert "revoked" in server.cli("client", "ls").stdout


def test_status_reports_the_running_server(server):
    out = server.cli("status").stdout
    assert "server:      up" in out and server.url in out, out
    server.stop()
    proc = server.cli("status", check=False)
    assert proc.returncode == 3 and "not running" in proc.stdout
