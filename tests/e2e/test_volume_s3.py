"""Volumes on an S3 object store: the same SDK calls and mounts as on the local directory, with every object
living in a bucket of a real S3 server on loopback (moto's standalone server, speaking the S3 REST protocol with
SigV4 signatures), configured through `volume_store` and `[volume_store_options]`."""
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import Server, require_root, sdk_ok

BUCKET = "compute-volumes"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    require_root()
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    assert os.path.exists(moto), f"{moto} is missing: tests/e2e/requirements.txt installs moto[server]"
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT"), timeout=2).close()
            break
        except OSError:
            assert time.time() < deadline and proc.poll() is None, "moto_server did not start"
            time.sleep(0.2)
    config = (
        f'volume_store = "s3://{BUCKET}/objects"\n'
        "[volume_store_options]\n"
        f'aws_endpoint = "{endpoint}"\n'
        'allow_http = "true"\n'
        'aws_region = "us-east-1"\n'
        'aws_access_key_id = "compute-test"\n'
        'aws_secret_access_key = "compute-test-secret"\n'
    )
    server = Server(tmp_path_factory.mktemp("s3") / "data", config=config)
    yield server, endpoint
    server.stop()
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def bucket_keys(endpoint, prefix):
    with urllib.request.urlopen(f"{endpoint}/{BUCKET}?list-type=2&prefix={prefix}&max-keys=1000", timeout=10) as r:
        return re.findall(r"<Key>([^<]+)</Key>", r.read().decode())


def sdk(server, body, timeout=600):
    return sdk_ok(server, "import hashlib, os\nfrom chalkcompute import Volume, Sandbox, Image", body, timeout).stdout


def test_sdk_calls_keep_every_object_in_the_bucket(s3):
    server, endpoint = s3
    out = sdk(server, """
        vol = Volume("on-s3")
        big = os.urandom(24 << 20)  # chunked by the SDK
        vol.put_file("big.bin", big)
        with vol.batch_upload() as batch:
            for i in range(200):
                batch.put(f"small/{i}.txt", f"file {i}\\n".encode())
        first = vol.latest_version().id
        vol.remove_file("small/7.txt")
        print("BIG", hashlib.sha256(vol.read_file("big.bin")).hexdigest() == hashlib.sha256(big).hexdigest())
        print("SMALL", vol.read_file("small/42.txt"), len([f for f in vol.listdir("small")]))
        print("OLD", vol.at_version(first).read_file("small/7.txt"))
        fork = vol.fork("experiment")
        fork.put_file("only-in-fork.txt", b"fork\\n")
        print("FORK", fork.read_file("small/1.txt"), [f.path for f in vol.listdir() if f.path == "only-in-fork.txt"])
    """)
    assert "BIG True" in out, out
    assert "SMALL b'file 42\\n' 199" in out, out
    assert "OLD b'file 7\\n'" in out, out
    assert "FORK b'file 1\\n' []" in out, out
    keys = bucket_keys(endpoint, "objects/")
    assert len(keys) >= 3, keys
    assert all(re.fullmatch(r"objects/[^/]+/[0-9a-f]{2}/[0-9a-f]{64}", k) for k in keys), keys
    # Nothing went to the server's local object directory.
    local = server.data_dir / "volumes" / "objects"
    assert not local.exists() or not any(p.is_file() for p in local.rglob("*")), list(local.rglob("*"))[:5]


def test_a_mount_reads_from_and_commits_to_the_bucket(s3):
    server, endpoint = s3
    before = set(bucket_keys(endpoint, "objects/"))
    out = sdk(server, """
        vol = Volume("mounted-s3")
        data = os.urandom(9 << 20)
        vol.put_file("data.bin", data)
        sb = Sandbox(image=Image.debian_slim("3.13"), name="s3-mount").mount_volume("mounted-s3", "/data").run()
        r = sb.exec("sh", "-c", "sha256sum /data/data.bin | cut -c1-64 && head -c 2000000 /dev/urandom > /data/new.bin "
                                "&& sha256sum /data/new.bin | cut -c1-64 && sync /data/new.bin")
        read_sha, new_sha = r.stdout_text.split()
        print("READ", read_sha == hashlib.sha256(data).hexdigest())
        print("COMMITTED", hashlib.sha256(vol.read_file("new.bin")).hexdigest() == new_sha)
        sb.terminate()
    """)
    assert "READ True" in out, out
    assert "COMMITTED True" in out, out
    assert len(set(bucket_keys(endpoint, "objects/")) - before) >= 2


def test_gc_sweeps_the_bucket_and_keeps_what_versions_use(s3):
    server, endpoint = s3
    sdk(server, """
        vol = Volume("collected")
        vol.put_file("keep.txt", b"keep me\\n")
        Volume("doomed").put_file("junk.bin", os.urandom(3 << 20))
    """)
    before = set(bucket_keys(endpoint, "objects/"))
    server.cli("volume", "rm", "doomed")
    out = server.cli("volume", "gc", "--grace", "0").stdout
    after = set(bucket_keys(endpoint, "objects/"))
    assert after < before, (out, len(before), len(after))
    assert "keep me" in sdk(server, 'print(Volume("collected").read_file("keep.txt").decode())')
