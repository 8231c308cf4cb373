"""Secrets and integrations through the official SDK against a real server: program (f)'s container part
verbatim in spirit (lazy secrets upserted by the SDK, a secret set by the operator), integrations' variables
inside, a missing reference refused at create, and values that never show in the server's log, ListSecrets or
the database file."""
import json
import os
import pathlib
import textwrap

import pytest

from conftest import require_root, run_sdk, sdk_ok

PRELUDE = (
    "import os, json, tempfile\nfrom chalkcompute import Container, Sandbox, Image, Secret, ScalingGroup\n"
    "def text(x):\n    return x.decode() if isinstance(x, bytes) else x\n"
)


@pytest.fixture(scope="module", autouse=True)
def _root():
    require_root()


def env_inside(text):
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_program_f_container_gets_local_env_env_file_and_operator_secrets(shared_server):
    shared_server.cli("secret", "set", "OPENAI_API_KEY", "--value", "sk-operator-51c2")
    body = """
    os.environ["MY_LOCAL_TOKEN"] = "s3cr3t"
    env_file = os.path.join(tempfile.mkdtemp(), "test.env")
    open(env_file, "w").write("FOO=bar\\nBAZ='qux'\\n# a comment\\n\\n")
    c = Container(image=Image.debian_slim(), name="secret-demo",
                  secrets=[Secret.from_local_env("MY_LOCAL_TOKEN"), Secret.from_local_env_file(env_file),
                           Secret.from_chalk_env("OPENAI_API_KEY")]).run()
    r = c.exec("env")
    print("ENV-JSON:" + json.dumps(text(r.stdout)))
    c.stop()
    """
    proc = sdk_ok(shared_server, PRELUDE, body)
    out = [l for l in proc.stdout.splitlines() if l.startswith("ENV-JSON:")][0]
    env = env_inside(json.loads(out[len("ENV-JSON:"):]))
    assert env["MY_LOCAL_TOKEN"] == "s3cr3t"
    assert env["FOO"] == "bar" and env["BAZ"] == "qux"
    assert env["OPENAI_API_KEY"] == "sk-operator-51c2"
    # The SDK scoped its lazy secrets to the container; the operator's is environment-wide.
    ls = shared_server.cli("secret", "ls").stdout
    assert "sandbox:secret-demo" in ls and "MY_LOCAL_TOKEN" in ls
    assert "s3cr3t" not in ls and "sk-operator" not in ls


def test_an_integrations_variables_are_visible_inside_with_keys_aliases_and_prefix(shared_server):
    shared_server.cli("integration", "set", "prod_postgres", "--kind", "postgres", "--set", "host=db.internal",
                      "--set", "user=app", "--set", "password=pg-pw-7e1", "--set", "database=prod")
    ls = shared_server.cli("integration", "ls").stdout
    assert "prod_postgres" in ls and "PGPASSWORD" in ls and "pg-pw-7e1" not in ls
    body = """
    sb = Sandbox(image=Image.debian_slim(), name="integ",
                 secrets=[Secret.from_integration("prod_postgres"),
                          Secret.from_chalk_integration("prod_postgres", keys=["password"], aliases={"password": "DB_PW"},
                                                        prefix="APP_")]).run()
    print("ENV-JSON:" + json.dumps(text(sb.exec("env").stdout)))
    sb.terminate()
    """
    proc = sdk_ok(shared_server, PRELUDE, body)
    out = [l for l in proc.stdout.splitlines() if l.startswith("ENV-JSON:")][0]
    env = env_inside(json.loads(out[len("ENV-JSON:"):]))
    assert env["DATABASE_URL"] == "postgresql://app:pg-pw-7e1@db.internal:5432/prod"
    assert env["PGHOST"] == "db.internal" and env["PGPORT"] == "5432" and env["PGPASSWORD"] == "pg-pw-7e1"
    assert env["APP_DB_PW"] == "pg-pw-7e1"
    assert "APP_PGHOST" not in env


def test_a_reference_to_a_missing_secret_or_integration_is_refused_at_create_naming_it(shared_server):
    for ref, named in [("Secret.from_chalk_env('NOT_THERE_1')", "NOT_THERE_1"),
                       ("Secret.from_integration('no_such_integration')", "no_such_integration")]:
        body = f"""
        try:
            Container(image=Image.debian_slim(), name="missing-secret", secrets=[{ref}]).run()
            print("RESULT: created")
        except Exception as e:
            print("RESULT: refused", type(e).__name__, e)
        """
        proc = run_sdk(PRELUDE + textwrap.dedent(body), shared_server.sdk_env())
        assert "RESULT: refused" in proc.stdout, proc.stdout + proc.stderr
        assert named in proc.stdout and "FAILED_PRECONDITION" in proc.stdout.upper().replace(" ", "_"), proc.stdout
    # Nothing was started for the refused creates.
    assert "missing-secret" not in shared_server.cli("container", "ls").stdout


def test_a_secret_value_is_absent_from_the_log_list_and_the_database_file(server):
    value = "v4lue-that-must-not-leak-9b3e"
    body = f"""
    os.environ["LEAKY"] = "{value}"
    sb = Sandbox(image=Image.debian_slim(), name="noleak", secrets=[Secret.from_local_env("LEAKY")]).run()
    assert text(sb.exec("printenv", "LEAKY").stdout).strip() == "{value}"
    sb.terminate()
    """
    sdk_ok(server, PRELUDE, body)
    token = server.token()
    status, listed = server.connect("chalk.server.v1.EnvironmentSecretsService/ListSecrets", {"includeScoped": True},
                                    token)
    assert status == 200, listed
    names = [s["name"] for s in listed.get("secrets", [])]
    assert "LEAKY" in names and value not in json.dumps(listed)
    server.stop()
    log = pathlib.Path(server.log.name).read_bytes()
    assert value.encode() not in log
    for f in ("state.db", "state.db-wal"):
        p = server.data_dir / f
        if p.exists():
            assert value.encode() not in p.read_bytes(), f"{f} holds the value in clear"
    key = server.data_dir / "secrets.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    server.start()


def test_secrets_service_upsert_get_delete_and_scopes_over_the_wire(server):
    token = server.token()
    call = lambda m, body: server.connect(f"chalk.server.v1.EnvironmentSecretsService/{m}", body, token)
    status, out = call("UpsertSecret", {"name": "GLOBAL_ONE", "config": {"literal": "g1"}})
    assert status == 200 and out["secrets"][0]["name"] == "GLOBAL_ONE", out
    sid = out["secrets"][0]["id"]
    status, out = call("UpsertSecret", {"name": "GLOBAL_ONE", "config": {"literal": "g2"}})
    assert out["secrets"][0]["id"] == sid, "an upsert of the same name and scope keeps the secret"
    status, out = call("GetSecretValue", {"id": sid})
    assert out["secretValue"]["value"] == "g2"
    status, out = call("UpsertSecret", {"name": "SCOPED", "config": {"literal": "s"},
                                        "scope": {"type": "SECRET_SCOPE_TYPE_SCALING_GROUP", "ref": "api"}})
    assert status == 200, out
    status, out = call("ListSecrets", {})
    assert [s["name"] for s in out["secrets"]] == ["GLOBAL_ONE"], "scoped secrets are listed only when asked"
    status, out = call("UpsertSecret", {"name": "1BAD NAME", "config": {"literal": "x"}})
    assert status == 400 and "name" in out["message"], out
    status, out = call("UpsertSecret", {"name": "X", "config": {"literal": "x"}, "scope": {"type": "SECRET_SCOPE_TYPE_SANDBOX"}})
    assert status == 400 and "scope.ref" in out["message"], out
    status, out = call("DeleteSecret", {"name": "SCOPED"})
    assert status == 404 and "environment" in out["message"], out
    status, out = call("DeleteSecret", {"name": "SCOPED", "scope": {"type": "SECRET_SCOPE_TYPE_SCALING_GROUP", "ref": "api"}})
    assert status == 200, out
    # Rotating the key keeps every value readable.
    server.stop()
    assert "resealed" in server.cli("secret", "rotate-key").stdout
    server.start()
    token = server.token()
    status, out = server.connect("chalk.server.v1.EnvironmentSecretsService/GetSecretValue", {"id": sid}, token)
    assert out["secretValue"]["value"] == "g2"


SERVE_ENV = (
    "import http.server, os\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        b = os.environ.get(self.path.strip('/'), 'unset').encode()\n"
    "        self.send_response(200); self.send_header('content-length', str(len(b))); self.end_headers()\n"
    "        self.wfile.write(b)\n"
    "http.server.HTTPServer(('0.0.0.0', 8080), H).serve_forever()\n"
)


def test_a_scaling_group_replica_sees_the_secrets_scoped_to_its_group(shared_server):
    body = f"""
    os.environ["SG_TOKEN"] = "group-scoped-41"
    sg = ScalingGroup(image=Image.debian_slim(), name="secret-sg", port=8080, min_replicas=1, max_replicas=1,
                      entrypoint=["python3", "-c", {SERVE_ENV!r}],
                      secrets=[Secret.from_local_env("SG_TOKEN")]).deploy()
    sg.wait_ready(timeout=300)
    print("BODY:", bytes(sg.call("/SG_TOKEN", method="GET").content).decode())
    sg.delete()
    """
    proc = sdk_ok(shared_server, PRELUDE, body)
    assert "BODY: group-scoped-41" in proc.stdout, proc.stdout + proc.stderr
    assert "scaling-group:secret-sg" in shared_server.cli("secret", "ls").stdout


def test_a_nul_byte_in_an_env_value_or_a_secret_is_refused_at_create_naming_the_key(shared_server):
    token = shared_server.token()
    status, out = shared_server.connect("chalk.sandbox.v2.SandboxService/CreateSandbox", {"spec": {
        "image": "python:3.14-slim-trixie", "envVars": {"GOOD": "1", "BAD_ONE": "x\u0000y"}}}, token)
    assert status == 400 and "BAD_ONE" in out["message"] and "NUL" in out["message"], out
    status, out = shared_server.connect("chalk.server.v1.EnvironmentSecretsService/UpsertSecret",
                                        {"name": "NUL_SECRET", "config": {"literal": "a\u0000b"}}, token)
    assert status == 400 and "NUL_SECRET" in out["message"], out
