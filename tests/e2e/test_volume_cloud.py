"""Volumes on cloud object stores: the same SDK calls, mounts and garbage collection as on the local directory,
with every object living in a real store server on loopback, configured through `volume_store` and
`[volume_store_options]`:
- S3: moto's standalone server (the S3 REST protocol with SigV4 signatures);
- Azure Blob Storage: Azurite, Microsoft's storage emulator (tests/e2e/package.json; shared-key signatures).
"""
import base64
import hashlib
import hmac
import os
import re
import subprocess
import sys
import time
import urllib.request
from email.utils import formatdate

import pytest

from conftest import Server, free_port, require_root, sdk_ok

CONTAINER = "compute-volumes"
HERE = os.path.dirname(os.path.abspath(__file__))
# Azurite's well-known development account.
AZ_ACCOUNT = "devstoreaccount1"
AZ_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def wait_until(ready, proc, what):
    deadline = time.time() + 30
    while True:
        try:
            return ready()
        except OSError:
            assert time.time() < deadline and proc.poll() is None, f"{what} did not start"
            time.sleep(0.2)


class S3:
    """moto's S3 server with one bucket."""

    def __init__(self, root):
        moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
        assert os.path.exists(moto), f"{moto} is missing: tests/e2e/requirements.txt installs moto[server]"
        self.endpoint = f"http://127.0.0.1:{free_port()}"
        self.log = open(root / "moto.log", "w")
        self.proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", self.endpoint.rsplit(":", 1)[1]],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        create = urllib.request.Request(f"{self.endpoint}/{CONTAINER}", method="PUT")
        wait_until(lambda: urllib.request.urlopen(create, timeout=2).close(), self.proc, "moto_server")
        self.config = (
            f'volume_store = "s3://{CONTAINER}/objects"\n[volume_store_options]\n'
            f'aws_endpoint = "{self.endpoint}"\nallow_http = "true"\naws_region = "us-east-1"\n'
            'aws_access_key_id = "compute-test"\naws_secret_access_key = "compute-test-secret"\n'
        )
        self.env = {}

    def keys(self, prefix):
        with urllib.request.urlopen(f"{self.endpoint}/{CONTAINER}?list-type=2&prefix={prefix}&max-keys=1000", timeout=10) as r:
            return re.findall(r"<Key>([^<]+)</Key>", r.read().decode())

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


class Azure:
    """Azurite's blob service with one container (readable anonymously, so the test can list it)."""

    def __init__(self, root):
        azurite = os.path.join(HERE, "node_modules", ".bin", "azurite-blob")
        assert os.path.exists(azurite), f"{azurite} is missing: scripts/test.sh installs it (npm ci in tests/e2e)"
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log = open(root / "azurite.log", "w")
        self.proc = subprocess.Popen([azurite, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",
                                      str(root / "azurite"), "--skipApiVersionCheck"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(lambda: self._create_container(), self.proc, "azurite")
        self.config = f'volume_store = "az://{CONTAINER}/objects"\n[volume_store_options]\nazure_storage_use_emulator = "true"\n'
        # Where object_store finds the emulator.
        self.env = {"AZURITE_BLOB_STORAGE_URL": self.endpoint}

    def _create_container(self):
        date, version = formatdate(usegmt=True), "2021-08-06"
        headers = {"x-ms-blob-public-access": "container", "x-ms-date": date, "x-ms-version": version}
        canonical = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
        to_sign = "PUT\n" + "\n" * 11 + canonical + f"/{AZ_ACCOUNT}/{AZ_ACCOUNT}/{CONTAINER}\nrestype:container"
        signature = base64.b64encode(hmac.new(base64.b64decode(AZ_KEY), to_sign.encode(), hashlib.sha256).digest())
        headers["Authorization"] = f"SharedKey {AZ_ACCOUNT}:{signature.decode()}"
        headers["Content-Length"] = "0"
        req = urllib.request.Request(f"{self.endpoint}/{AZ_ACCOUNT}/{CONTAINER}?restype=container", method="PUT",
                                     headers=headers)
        urllib.request.urlopen(req, timeout=2).close()

    def keys(self, prefix):
        url = f"{self.endpoint}/{AZ_ACCOUNT}/{CONTAINER}?restype=container&comp=list&prefix={prefix}&maxresults=5000"
        with urllib.request.urlopen(url, timeout=10) as r:
            return re.findall(r"<Name>([^<]+)</Name>", r.read().decode())

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module", params=["s3", "azure"])
def cloud(request, tmp_path_factory):
    require_root()
    root = tmp_path_factory.mktemp(request.param)
    store = (S3 if request.param == "s3" else Azure)(root)
    saved = {k: os.environ.get(k) for k in store.env}
    os.environ.update(store.env)  # the server process inherits it
    server = Server(root / "data", config=store.config)
    yield server, store
    server.stop()
    store.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def sdk(server, body, timeout=600):
    return sdk_ok(server, "import hashlib, os\nfrom chalkcompute import Volume, Sandbox, Image", body, timeout).stdout


def test_sdk_calls_keep_every_object_in_the_store(cloud):
    server, store = cloud
    out = sdk(server, """
        vol = Volume("in-the-cloud")
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
    keys = store.keys("objects/")
    assert len(keys) >= 3, keys
    assert all(re.fullmatch(r"objects/[^/]+/[0-9a-f]{2}/[0-9a-f]{64}", k) for k in keys), keys
    # Nothing went to the server's local object directory.
    local = server.data_dir / "volumes" / "objects"
    assert not local.exists() or not any(p.is_file() for p in local.rglob("*")), list(local.rglob("*"))[:5]


def test_a_mount_reads_from_and_commits_to_the_store(cloud):
    server, store = cloud
    before = set(store.keys("objects/"))
    out = sdk(server, """
        vol = Volume("mounted-cloud")
        data = os.urandom(9 << 20)
        vol.put_file("data.bin", data)
        sb = Sandbox(image=Image.debian_slim("3.13"), name="cloud-mount").mount_volume("mounted-cloud", "/data").run()
        r = sb.exec("sh", "-c", "sha256sum /data/data.bin | cut -c1-64 && head -c 2000000 /dev/urandom > /data/new.bin "
                                "&& sha256sum /data/new.bin | cut -c1-64 && sync /data/new.bin")
        read_sha, new_sha = r.stdout_text.split()
        print("READ", read_sha == hashlib.sha256(data).hexdigest())
        print("COMMITTED", hashlib.sha256(vol.read_file("new.bin")).hexdigest() == new_sha)
        sb.terminate()
    """)
    assert "READ True" in out, out
    assert "COMMITTED True" in out, out
    assert len(set(store.keys("objects/")) - before) >= 2


def test_gc_sweeps_the_store_and_keeps_what_versions_use(cloud):
    server, store = cloud
    sdk(server, """
        vol = Volume("collected")
        vol.put_file("keep.txt", b"keep me\\n")
        Volume("doomed").put_file("junk.bin", os.urandom(3 << 20))
    """)
    before = set(store.keys("objects/"))
    server.cli("volume", "rm", "doomed")
    out = server.cli("volume", "gc", "--grace", "0").stdout
    after = set(store.keys("objects/"))
    assert after < before, (out, len(before), len(after))
    assert "keep me" in sdk(server, 'print(Volume("collected").read_file("keep.txt").decode())')
