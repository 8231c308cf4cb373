"""Volumes mounted into workloads (FUSE view of a version, copy-on-write writes committed at stop), under the
server's isolation backend: program (d) verbatim, writes becoming versions, pinned read-only versions, forks."""
import os
import re
import textwrap

import pytest

from conftest import PROGRAMS, require_root, run_program, run_sdk, sdk_ok


def sdk(server, body, timeout=600):
    return sdk_ok(server, "from chalkcompute import Volume, Sandbox, Container, Image", body, timeout).stdout


def test_program_d_verbatim(shared_server):
    require_root()
    proc = run_program(PROGRAMS / "d_volume.py", shared_server.sdk_env())
    assert proc.returncode == 0, proc.stderr
    assert "READBACK: b'hello\\n'" in proc.stdout, proc.stdout
    assert "STDOUT: 'hello\\n' EXIT: 0" in proc.stdout, proc.stdout


def test_program_g2_verbatim_local_files_arrive_as_a_volume(shared_server):
    require_root()
    proc = run_program(PROGRAMS / "g2_sandbox_files.py", shared_server.sdk_env())
    assert proc.returncode == 0, proc.stderr
    assert "stdout=b'from local file\\n'" in proc.stdout and "exit_code=0" in proc.stdout, proc.stdout


def test_writes_in_a_sandbox_become_a_version_and_pinned_mounts_are_read_only(shared_server):
    require_root()
    out = sdk(shared_server, """
        vol = Volume("mounted")
        vol.put_file("keep.txt", b"keep\\n")
        vol.put_file("gone.txt", b"gone\\n")
        before = vol.latest_version().id
        sb = Sandbox(image=Image.debian_slim(), name="vol-writer").mount_volume("mounted", "/data").run()
        r = sb.exec("sh", "-c", "echo new > /data/new.txt && mkdir -p /data/d/e && echo deep > /data/d/e/f.txt "
                                "&& rm /data/gone.txt && head -c 3000000 /dev/urandom > /data/big.bin "
                                "&& sha256sum /data/big.bin | cut -c1-64 && sync")
        print("WRITE", r.exit_code, r.stderr_text)
        big_sha = r.stdout_text.strip()
        sb.terminate()
        after = vol.latest_version()
        print("VERSION", after.id > before, after.parent_id == before)
        print("FILES", sorted(f.path for f in vol.listdir() if f.kind == "file"))
        print("NEW", vol.read_file("new.txt"), vol.read_file("d/e/f.txt"))
        import hashlib
        print("BIG", hashlib.sha256(vol.read_file("big.bin")).hexdigest() == big_sha)

        old = vol.at_version(before)
        sb = Sandbox(image=Image.debian_slim(), name="vol-reader").mount_volume(old, "/old").run()
        print("OLD", sb.exec("cat", "/old/gone.txt").stdout_text.strip(),
              sb.exec("test", "-e", "/old/new.txt").exit_code)
        w = sb.exec("sh", "-c", "echo x > /old/x.txt")
        print("RO", w.exit_code != 0, "Read-only" in w.stderr_text)
        sb.terminate()
        print("UNCHANGED", vol.latest_version().id == after.id)
    """)
    assert "WRITE 0" in out, out
    assert "VERSION True True" in out, out
    assert "FILES ['big.bin', 'd/e/f.txt', 'keep.txt', 'new.txt']" in out, out
    assert "NEW b'new\\n' b'deep\\n'" in out, out
    assert "BIG True" in out, out
    assert "OLD gone 1" in out, out
    assert "RO True True" in out, out
    assert "UNCHANGED True" in out, out


def test_fork_then_diverge_in_sandboxes(shared_server):
    require_root()
    out = sdk(shared_server, """
        vol = Volume("forked")
        vol.put_file("shared.txt", b"base\\n")
        fork = vol.fork("agent-2")
        sb = Sandbox(image=Image.debian_slim(), name="fork-writer").mount_volume(fork, "/w").run()
        print("EXEC", sb.exec("sh", "-c", "echo mine > /w/shared.txt && echo extra > /w/extra.txt").exit_code)
        sb.terminate()
        fork.reload()  # a fork handle caches its version; the sandbox's commit moved the ref since
        print("FORK", fork.read_file("shared.txt"), sorted(f.path for f in fork.listdir()))
        print("MAIN", vol.read_file("shared.txt"), sorted(f.path for f in vol.listdir()))
    """)
    assert "EXEC 0" in out, out
    assert "FORK b'mine\\n' ['extra.txt', 'shared.txt']" in out, out
    assert "MAIN b'base\\n' ['shared.txt']" in out, out


def test_mounting_a_missing_volume_is_a_clear_error(shared_server):
    require_root()
    proc = run_sdk(textwrap.dedent("""
        from chalkcompute import Sandbox, Image
        Sandbox(image=Image.debian_slim(), name="no-vol").mount_volume("never-made", "/data").run()
    """), shared_server.sdk_env())
    assert proc.returncode != 0
    assert re.search(r"never-made.*not found", proc.stderr), proc.stderr


def test_fsync_inside_the_sandbox_commits_while_it_runs(shared_server):
    require_root()
    out = sdk(shared_server, """
        vol = Volume("synced")
        vol.put_file("docs/readme.md", b"v1\\n")
        vol.put_file("docs/old.txt", b"old\\n")
        start = vol.latest_version().id
        sb = Sandbox(image=Image.debian_slim(), name="fsyncer").mount_volume("synced", "/v").run()
        script = (
            "set -e; cd /v; echo v2 >> docs/readme.md; mkdir -p a/b; echo x > a/b/x.txt; ln -s ../docs/readme.md a/link;"
            "mv docs/old.txt docs/renamed.txt; chmod 600 docs/renamed.txt; printf 12345 > t.txt; truncate -s 2 t.txt;"
            "python3 -c 'import os; fd = os.open(\\"/v/t.txt\\", os.O_RDONLY); os.fsync(fd)'"
        )
        r = sb.exec("sh", "-c", script)
        print("EXEC", r.exit_code, r.stderr_text)
        mid = vol.latest_version()
        print("SYNCED_WHILE_RUNNING", mid.id > start)
        print("FILES", sorted((f.path, f.kind) for f in vol.listdir()))
        print("READ", vol.read_file("docs/readme.md"), vol.read_file("t.txt"), vol.read_file("a/b/x.txt"))
        print("MODE", oct([f for f in vol.listdir() if f.path == "docs/renamed.txt"][0].mode))
        r = sb.exec("sh", "-c", "rm -r /v/a && echo after > /v/after.txt")
        sb.terminate()
        print("FINAL", sorted(f.path for f in vol.listdir() if f.kind == "file"), vol.latest_version().id > mid.id)
    """)
    assert "EXEC 0" in out, out
    assert "SYNCED_WHILE_RUNNING True" in out, out
    assert ("FILES [('a', 'directory'), ('a/b', 'directory'), ('a/b/x.txt', 'file'), ('a/link', 'symlink'), "
            "('docs', 'directory'), ('docs/readme.md', 'file'), ('docs/renamed.txt', 'file'), ('t.txt', 'file')]") in out, out
    assert "READ b'v1\\nv2\\n' b'12' b'x\\n'" in out, out
    assert "MODE 0o600" in out, out
    assert "FINAL ['after.txt', 'docs/readme.md', 'docs/renamed.txt', 't.txt'] True" in out, out


def test_sync_on_request_while_the_sandbox_runs(shared_server):
    require_root()
    sdk(shared_server, """
        Volume("on-request").put_file("seed.txt", b"seed\\n")
        sb = Sandbox(image=Image.debian_slim(), name="sync-me").mount_volume("on-request", "/v").run()
        print(sb.exec("sh", "-c", "echo written > /v/w.txt").exit_code)
        # Leave it running; skip the SDK's interpreter-exit cleanup, which aborts while a sandbox stream is open.
        import os, sys
        sys.stdout.flush()
        os._exit(0)
    """)
    out = shared_server.cli("volume", "sync", "sync-me").stdout
    assert re.match(r"on-request: version \d+", out), out
    assert "nothing changed" in shared_server.cli("volume", "sync", "sync-me").stdout
    out = sdk(shared_server, """
        print("READ", Volume("on-request").read_file("w.txt"))
        Sandbox.from_name("sync-me").terminate()
    """)
    assert "READ b'written\\n'" in out, out
    stopped = shared_server.cli("volume", "sync", "sync-me", check=False)
    assert stopped.returncode != 0 and "not running" in stopped.stderr, stopped.stderr


def test_a_large_directory_stored_in_pieces_reads_and_writes_whole_through_a_mount(shared_server, tmp_path):
    """A 2,000-file directory is stored as leaves and index nodes: the mount lists and reads every file, and writes
    into it from the sandbox (new files, a removal) become a version that holds all the others."""
    require_root()
    src = tmp_path / "many"
    src.mkdir()
    for i in range(2000):
        (src / f"f{i:04}.txt").write_text(f"{i}\n")
    out = sdk(shared_server, f"""
        vol = Volume("pieces")
        vol.put_dir({str(src)!r}, "many")
        sb = Sandbox(image=Image.debian_slim(), name="pieces").mount_volume("pieces", "/data").run()
        r = sb.exec("sh", "-c", "ls /data/many | wc -l; cat /data/many/f1234.txt /data/many/f0000.txt /data/many/f1999.txt; "
                                "for i in $(seq 0 99); do echo new$i > /data/many/n$i.txt; done; rm /data/many/f0500.txt; sync")
        print("MOUNT", r.exit_code, r.stdout_text.split(), r.stderr_text)
        sb.terminate()
        names = {{f.path for f in vol.listdir("many")}}
        print("AFTER", len(names), "many/f0500.txt" in names, "many/n42.txt" in names, vol.read_file("many/f1999.txt"),
              vol.read_file("many/n99.txt"))
    """)
    assert "MOUNT 0 ['2000', '1234', '0', '1999']" in out, out
    assert "AFTER 2099 False True b'1999\\n' b'new99\\n'" in out, out


def test_a_volume_written_over_v1_by_plain_http_reads_in_the_sdk_and_mounts(shared_server):
    """#20 item 5: the hosted service's own examples, without the SDK: client credentials for a token at
    POST /v1/oauth/token, then chalk.volume.v1.VolumeService over Connect JSON. The writes are v2 versions the SDK
    reads, and a sandbox mounts."""
    import base64
    import json
    import urllib.request

    require_root()
    s = shared_server
    body = json.dumps({"client_id": s.client_id, "client_secret": s.client_secret,
                       "grant_type": "client_credentials"}).encode()
    req = urllib.request.Request(f"{s.url}/v1/oauth/token", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        token = json.loads(r.read())["access_token"]
    v1 = "chalk.volume.v1.VolumeService"

    def call(method, msg, code=200):
        status, out = s.connect(f"{v1}/{method}", msg, token=token)
        assert status == code, (method, status, out)
        return out

    b64 = lambda b: base64.b64encode(b).decode()
    created = call("CreateVolume", {"name": "from-v1"})["volume"]
    assert created["name"] == "from-v1" and "createdAt" in created, created
    big = os.urandom(200_000)
    call("PutFile", {"volumeName": "from-v1", "path": "data/hello.txt", "data": b64(b"hello from v1\n")})
    call("PutFile", {"volumeName": "from-v1", "path": "data/big.bin", "data": b64(big)})
    call("PutFile", {"volumeName": "from-v1", "path": "gone.txt", "data": b64(b"x")})
    call("RemoveFile", {"volumeName": "from-v1", "path": "gone.txt"})
    files = call("ListFiles", {"volumeName": "from-v1", "prefix": "data/"})["files"]
    assert sorted((f["path"], int(f["size"])) for f in files) == [("data/big.bin", 200_000), ("data/hello.txt", 14)], files
    assert call("ListFiles", {"volumeName": "from-v1", "prefix": "nope/"}).get("files", []) == []
    got = call("GetFile", {"volumeName": "from-v1", "path": "data/hello.txt"})
    assert base64.b64decode(got["data"]) == b"hello from v1\n", got
    url = call("GetFile", {"volumeName": "from-v1", "path": "data/big.bin", "getSignedUri": True})["signedDownloadUri"]
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.read() == big
    listed = [v["name"] for v in call("ListVolumes", {}).get("volumes", [])]
    assert "from-v1" in listed, listed
    # Bad input names the field.
    err = call("PutFile", {"volumeName": "from-v1", "path": "../escape", "data": b64(b"x")}, code=400)
    assert "path" in err["message"], err
    err = call("GetFile", {"volumeName": "from-v1", "path": "data/missing"}, code=404)
    assert "data/missing" in err["message"], err
    call("GetVolume", {"name": "no-such-volume"}, code=404)

    out = sdk(s, """
        vol = Volume("from-v1")
        print("SDK", vol.read_file("data/hello.txt"), len(vol.versions()))
        sb = Sandbox(image=Image.debian_slim(), name="v1-reader").mount_volume("from-v1", "/data").run()
        print("MOUNT", sb.exec("cat", "/data/data/hello.txt").stdout_text.strip(), sb.exec("test", "-e", "/data/gone.txt").exit_code)
        sb.terminate()
    """)
    assert "SDK b'hello from v1\\n' 4" in out, out
    assert "MOUNT hello from v1 1" in out, out
    call("DeleteVolume", {"name": "from-v1"})
    call("GetVolume", {"name": "from-v1"}, code=404)
