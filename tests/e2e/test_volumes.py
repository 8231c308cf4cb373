"""Volumes against the official SDK: its Python control plane (gRPC) and its native data plane (Connect over
HTTP/1.1, signed URLs, BLAKE3 packs and chunks), history and forks, concurrency, signed-URL checks and crashes."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import blake3
import pytest

from conftest import Server, sdk_ok


def sdk(server, body, timeout=600):
    return sdk_ok(server, "import os, sys, time, pathlib, hashlib\nfrom chalkcompute import Volume, VolumeClient", body, timeout)


@pytest.fixture(scope="module")
def vols(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("volumes") / "data")
    yield s
    s.stop()


def test_put_read_list_history_fork(vols):
    out = sdk(vols, """
        vol = Volume("history")
        vol.put_file("inputs/example.txt", b"hello\\n")
        print("READ", vol.read_file("inputs/example.txt"))
        big = os.urandom(300_000)
        vol.put_file("big.bin", big)
        assert vol.read_file("big.bin") == big
        print("LIST", sorted((f.path, f.kind) for f in vol.listdir()))
        print("TOP", sorted(f.path for f in vol.listdir(recursive=False)))
        versions = vol.versions()
        print("VERSIONS", [(v.id, v.parent_id) for v in versions])
        fork = vol.fork("experiment")
        fork.put_file("inputs/example.txt", b"forked\\n")
        print("FORK", fork.read_file("inputs/example.txt"), "MAIN", vol.read_file("inputs/example.txt"))
        print("FORKS", [f.name for f in vol.forks()])
        old = vol.at_version(versions[-1].id)
        print("OLD", sorted(f.path for f in old.listdir()))
        try:
            old.put_file("x", b"y")
        except Exception as e:
            print("PINNED", type(e).__name__)
        vol.remove_file("big.bin")
        print("AFTER", sorted(f.path for f in vol.listdir()))
        try:
            vol.read_file("big.bin")
        except Exception as e:
            print("MISSING", type(e).__name__)
        fork.delete_fork()
        print("FORKS", [f.name for f in vol.forks()])
        print("LATEST", vol.latest_version().id)
    """).stdout
    assert "READ b'hello\\n'" in out, out
    assert "LIST [('big.bin', 'file'), ('inputs', 'directory'), ('inputs/example.txt', 'file')]" in out, out
    assert "TOP ['big.bin', 'inputs']" in out, out
    assert "VERSIONS [(2, 1), (1, None)]" in out, out
    assert "FORK b'forked\\n' MAIN b'hello\\n'" in out, out
    assert "FORKS ['experiment']" in out and "FORKS []" in out, out
    assert "OLD ['inputs', 'inputs/example.txt']" in out, out
    assert "PINNED VolumeError" in out, out
    assert "AFTER ['inputs', 'inputs/example.txt']" in out, out
    assert "MISSING" in out, out
    assert "LATEST 4" in out, out


def test_one_gib_file_goes_in_chunks_and_comes_back_whole(vols, tmp_path):
    src = tmp_path / "large.bin"
    digest = hashlib.sha256()
    with open(src, "wb") as fh:
        for _ in range(64):
            block = os.urandom(16 << 20)
            digest.update(block)
            fh.write(block)
    out = sdk(vols, f"""
        vol = Volume("large")
        t = time.time()
        vol.put_file_from_path("data/large.bin", {str(src)!r})
        put = time.time() - t
        dst = pathlib.Path({str(tmp_path / "back.bin")!r})
        t = time.time()
        vol.download_to_file("data/large.bin", dst)
        print("SIZE", [f.size for f in vol.listdir() if f.kind == "file"], "PUT_S", round(put, 1),
              "GET_S", round(time.time() - t, 1))
    """).stdout
    assert f"SIZE [{1 << 30}]" in out, out
    back = hashlib.sha256()
    with open(tmp_path / "back.bin", "rb") as fh:
        while block := fh.read(16 << 20):
            back.update(block)
    assert back.hexdigest() == digest.hexdigest()
    # It travelled as chunks: GetFile reports chunked content with signed ranged URLs.
    status, body = vols.connect("chalk.volume.v2.VolumeService/GetFile",
                                {"volume": {"name": "large"}, "path": "data/large.bin"}, token=vols.token())
    assert status == 200 and len(body["chunked"]["chunks"]) > 1, body


def test_ten_thousand_small_files(vols, tmp_path):
    src = tmp_path / "tree"
    for i in range(10_000):
        p = src / f"d{i % 100}" / f"f{i}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"file {i}\n")
    out = sdk(vols, f"""
        vol = Volume("small-files")
        vol.put_dir({str(src)!r}, "tree")
        files = [f for f in vol.listdir() if f.kind == "file"]
        print("COUNT", len(files))
        print("ONE", vol.read_file("tree/d7/f4507.txt"))
        dst = pathlib.Path({str(tmp_path / "down")!r})
        vol.download_to_directory(dst)
        print("DOWN", sum(1 for _ in dst.rglob("*.txt")), (dst / "tree/d99/f9999.txt").read_text().strip())
    """).stdout
    assert "COUNT 10000" in out, out
    assert "ONE b'file 4507\\n'" in out, out
    assert "DOWN 10000 file 9999" in out, out


def test_two_writers_at_once_lose_nothing(vols):
    sdk(vols, 'Volume("racing").put_file("seed", b"0")')
    script = textwrap.dedent("""
        import sys
        from chalkcompute import Volume
        vol = Volume("racing")
        for i in range(25):
            vol.put_file(f"{sys.argv[1]}/{i}.txt", f"{sys.argv[1]} {i}".encode())
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, name], env=vols.sdk_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    out = sdk(vols, """
        vol = Volume("racing")
        files = sorted(f.path for f in vol.listdir() if f.kind == "file")
        print("FILES", len(files), "VERSIONS", len(vol.versions()))
        print("A", vol.read_file("a/24.txt"), "B", vol.read_file("b/24.txt"))
    """).stdout
    assert "FILES 51 VERSIONS 51" in out, out
    assert "A b'a 24' B b'b 24'" in out, out


def put(url, data):
    req = urllib.request.Request(url, data=data, method="PUT", headers={"content-type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get(url, range_header=None):
    req = urllib.request.Request(url)
    if range_header:
        req.add_header("Range", range_header)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def upload_url(server, volume, data, token):
    h = blake3.blake3(data).hexdigest()
    key = f"{h[:2]}/{h}"
    status, body = server.connect("chalk.volume.v2.VolumeService/RequestUploadURLs", {
        "volume": {"name": volume},
        "objects": [{"objectKey": key, "hash": h, "contentSize": len(data), "kind": "UPLOADED_OBJECT_KIND_CHUNK"}],
    }, token=token)
    assert status == 200, body
    return key, body["urls"][0]


def test_signed_urls_refuse_tampering_bad_bytes_and_expiry(tmp_path):
    s = Server(tmp_path / "data", config='volume_url_ttl = "2s"\n')
    try:
        token = s.token()
        assert s.connect("chalk.volume.v2.VolumeService/CreateVolume", {"name": "signed"}, token=token)[0] == 200
        data = os.urandom(100_000)
        key, slot = upload_url(s, "signed", data, token)
        url = slot["signedUploadUri"]
        assert not slot.get("alreadyExists") and url.startswith(s.url + "/v2/blobs/"), slot
        sig = url.split("sig=")[1]
        tampered = url.replace("sig=" + sig, "sig=" + ("0" if sig[0] != "0" else "1") + sig[1:])
        status, body = put(tampered, data)
        assert status == 403 and b"signature" in body, (status, body)
        status, body = put(url.replace("exp=", "exp=9"), data)
        assert status == 403, (status, body)
        status, body = put(url, data[:-1] + b"\0")
        assert status == 400 and b"hash" in body, (status, body)
        assert put(url, data)[0] == 200
        # Held objects need no upload.
        assert upload_url(s, "signed", data, token)[1].get("alreadyExists") is True

        # Commit it as a chunked file, then read a range through the signed download URL GetFile returns.
        h = key.split("/")[1]
        status, body = s.connect("chalk.volume.v2.VolumeService/CommitVersion", {"intent": {
            "volume": {"name": "signed"}, "commitId": "c1", "ref": "main",
            "pathDeltas": {"upserts": [{"path": "blob.bin", "mode": "PATH_WRITE_MODE_UPSERT", "node": {"file": {
                "content": {"chunked": {"hash": h, "size": len(data),
                                        "chunks": [{"objectKey": key, "hash": h, "size": len(data), "offset": 0}]}}}}}]},
        }}, token=token)
        assert status == 200 and body["status"]["result"] == "COMMIT_RESULT_COMMITTED", body
        status, body = s.connect("chalk.volume.v2.VolumeService/GetFile",
                                 {"volume": {"name": "signed"}, "path": "blob.bin"}, token=token)
        chunk = body["chunked"]["chunks"][0]
        status, got, headers = get(chunk["signedDownloadUri"], "bytes=10-19")
        assert status == 206 and got == data[10:20], (status, got)
        assert headers.get("content-range") == f"bytes 10-19/{len(data)}", headers
        status, got, _ = get(chunk["signedDownloadUri"].replace("op=get", "op=put"))
        assert status == 403, got
        # The same commit id again is a no-op returning the same version.
        status, again = s.connect("chalk.volume.v2.VolumeService/CommitVersion", {"intent": {
            "volume": {"name": "signed"}, "commitId": "c1", "pathDeltas": {"upserts": []}}}, token=token)
        assert again["status"]["version"]["versionId"] == "1", again
        # A commit naming an object nobody uploaded is refused.
        missing = "ab/ab" + "0" * 62
        status, body = s.connect("chalk.volume.v2.VolumeService/CommitVersion", {"intent": {
            "volume": {"name": "signed"}, "commitId": "c2", "pathDeltas": {"upserts": [{"path": "x", "node": {"file": {
                "content": {"packed": {"hash": "0" * 64, "size": 1,
                                       "pack": {"objectKey": missing, "packId": "ab" + "0" * 62, "offset": 0,
                                                "size": 1}}}}}}]}}}, token=token)
        assert status == 400 and body["code"] == "failed_precondition" and "upload" in body["message"], body

        time.sleep(3)
        status, body = put(url, data)
        assert status == 403 and b"expired" in body, (status, body)
        status, got, _ = get(chunk["signedDownloadUri"], "bytes=0-1")
        assert status == 403 and b"expired" in got, (status, got)
    finally:
        s.stop()


def test_bad_requests_get_clear_errors(vols):
    token = vols.token()
    status, body = vols.connect("chalk.volume.v2.VolumeService/CreateVolume", {"name": "bad name!"}, token=token)
    assert status == 400 and "volume name" in body["message"], body
    status, body = vols.connect("chalk.volume.v2.VolumeService/GetVolume", {"volume": {"name": "absent"}}, token=token)
    assert status == 404 and body["code"] == "not_found", body
    assert vols.connect("chalk.volume.v2.VolumeService/CreateVolume", {"name": "dup"}, token=token)[0] == 200
    status, body = vols.connect("chalk.volume.v2.VolumeService/CreateVolume", {"name": "dup"}, token=token)
    assert status == 409 and body["code"] == "already_exists", body
    status, body = vols.connect("chalk.volume.v2.VolumeService/CommitVersion", {"intent": {
        "volume": {"name": "dup"}, "commitId": "x", "pathDeltas": {"upserts": [
            {"path": "../escape", "node": {"file": {"content": {"inline": {"data": "aGk="}}}}}]}}}, token=token)
    assert status == 400 and "'..'" in body["message"], body
    status, body = vols.connect("chalk.volume.v2.VolumeService/DeleteRef", {"volume": {"name": "dup"}, "name": "main"},
                                token=token)
    assert status == 400 and body["code"] == "failed_precondition", body
    out = sdk(vols, """
        from chalkcompute import VolumeNotFoundError
        try:
            VolumeClient.from_env().lookup("absent")
        except VolumeNotFoundError as e:
            print("NOTFOUND", e)
    """).stdout
    assert "NOTFOUND" in out, out


def test_kill_9_during_commits_leaves_only_whole_versions(tmp_path):
    s = Server(tmp_path / "data")
    code = textwrap.dedent("""
        from chalkcompute import Volume
        vol = Volume("crashy")
        for n in range(1000):
            with vol.batch_upload() as batch:
                for i in range(100):
                    batch.put(f"b{n:04}/f{i:03}.txt", f"{n} {i}".encode())
    """)
    writer = subprocess.Popen([sys.executable, "-c", code], env=s.sdk_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    # Wait until some commits landed, then kill the server in the middle of the next ones.
    deadline = time.time() + 120
    token = s.token()
    while time.time() < deadline:
        status, body = s.connect("chalk.volume.v2.VolumeService/ListVolumeVersions", {"volume": {"name": "crashy"}},
                                 token=token)
        if status == 200 and len(body.get("versions", [])) >= 5:
            break
        time.sleep(0.01)
    s.stop(signal.SIGKILL)
    writer.kill()
    writer.wait()
    s.start()
    try:
        out = sdk(s, """
            vol = Volume("crashy", create_if_missing=False)
            counts = []
            for v in vol.versions():
                files = [f for f in vol.at_version(v.id).listdir() if f.kind == "file"]
                counts.append(len(files))
                last = sorted(f.path for f in files)[-1]
                batch, name = last.split("/")
                body = vol.at_version(v.id).read_file(last).decode()
                assert body == f"{int(batch[1:])} {int(name[1:4])}", (last, body)
            print("COUNTS", counts)
        """).stdout
        counts = json.loads(out.split("COUNTS ")[1].strip())
        assert len(counts) >= 5, out
        # Every version holds whole commits of 100 files: nothing half-applied is visible, nothing committed lost.
        assert counts == [100 * (len(counts) - i) for i in range(len(counts))], counts
    finally:
        s.stop()


def test_cli_history_fork_diff_rollback_rm_gc(vols):
    sdk(vols, """
        vol = Volume("cli-vol")
        vol.put_file("a/x.txt", b"1")
        vol.put_file("a/y.txt", b"2")
        vol.remove_file("a/x.txt")
        vol.put_file("b.bin", os.urandom(100_000))
    """)
    assert "cli-vol" in vols.cli("volume", "ls").stdout
    versions = vols.cli("volume", "versions", "cli-vol").stdout.splitlines()
    assert [line.split()[0] for line in versions[1:]] == ["4", "3", "2", "1"], versions
    files = vols.cli("volume", "ls-files", "cli-vol@2").stdout
    assert "a/x.txt" in files and "a/y.txt" in files and "b.bin" not in files, files
    diff = vols.cli("volume", "diff", "cli-vol", "2", "4").stdout.splitlines()
    assert sorted(diff) == ["+ b.bin", "- a/x.txt"], diff
    vols.cli("volume", "fork", "cli-vol@2", "cli-copy")
    assert "a/x.txt" in vols.cli("volume", "ls-files", "cli-copy").stdout
    vols.cli("volume", "fork", "cli-vol", "experiment", "--ref")
    out = sdk(vols, 'print("FORKS", [f.name for f in Volume("cli-vol").forks()])').stdout
    assert "FORKS ['experiment']" in out, out
    assert "now at version 5" in vols.cli("volume", "rollback", "cli-vol", "2").stdout
    out = sdk(vols, 'v = Volume("cli-vol"); print("AFTER", sorted(f.path for f in v.listdir()), v.latest_version().id)')
    assert "AFTER ['a', 'a/x.txt', 'a/y.txt'] 5" in out.stdout, out.stdout
    vols.cli("volume", "rm", "cli-copy")
    assert "cli-copy" not in vols.cli("volume", "ls").stdout
    gc = vols.cli("volume", "gc", "--grace", "0").stdout
    assert re.match(r"deleted \d+ objects", gc), gc
    # Everything still referenced still reads after a collection.
    out = sdk(vols, 'v = Volume("cli-vol"); print("READ", v.read_file("a/y.txt"), len(v.at_version(4).read_file("b.bin")))')
    assert "READ b'2' 100000" in out.stdout, out.stdout
    bad = vols.cli("volume", "diff", "missing", "1", "2", check=False)
    assert bad.returncode != 0 and 'volume "missing" not found' in bad.stderr, bad.stderr


def test_the_rest_of_the_sdk_surface(vols, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.invalid", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "src").mkdir()
    (repo / "src" / "lib.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    local = tmp_path / "local.txt"
    local.write_text("from a path\n")
    out = sdk(vols, f"""
        vc = VolumeClient.from_env()
        made = vc.create("surface")
        print("CREATE", made.name, made.info.volume_id.startswith("vol-"))
        try:
            vc.create("surface")
        except Exception as e:
            print("DUP", type(e).__name__)
        print("EXISTS", vc.exists("surface"), "LIST", "surface" in [v.name for v in vc.list()])
        vol = vc.lookup("surface")
        vol.put_file_from_path("p/local.txt", {str(local)!r})
        vol.load_git_repo("file://{repo}", dest_prefix="code", revision="main")
        print("GIT", vol.read_file("code/src/lib.py"), any(f.path.startswith("code/.git") for f in vol.listdir()))
        print("ITER", sorted(f.path for f in vol.iterdir("p")))
        print("INFO", vol.info.name, vol.reload().name, vol.version.id == vol.latest_version().id)
        fork = vol.fork("side")
        side = vol.at_ref("side")
        side.put_file("only-side.txt", b"s")
        print("AT_REF", side.read_file("only-side.txt"), "only-side.txt" in [f.path for f in vol.listdir()])
        dst = pathlib.Path({str(tmp_path / "one.txt")!r})
        vol.download_to_file("p/local.txt", dst)
        print("DOWN", dst.read_text().strip())
        vol.delete()
        print("GONE", vc.exists("surface"))
    """).stdout
    assert "CREATE surface True" in out, out
    assert "DUP VolumeError" in out, out
    assert "EXISTS True LIST True" in out, out
    assert "GIT b'x = 1\\n' True" in out, out
    assert "ITER ['p/local.txt']" in out, out
    assert "INFO surface surface True" in out, out
    assert "AT_REF b's' False" in out, out
    assert "DOWN from a path" in out, out
    assert "GONE False" in out, out


def test_a_recursive_remove_of_the_root_replaces_the_tree_in_the_same_commit(vols):
    # The SDK's redeploy of a source volume: "clear the volume" and the new files, in one intent.
    sdk(vols, """
        vol = Volume("src-redeploy")
        vol.put_file("handler.py", b"old handler")
        vol.put_file("stale/module.py", b"stale")
    """)
    token = vols.token()
    status, body = vols.connect("chalk.volume.v2.VolumeService/CommitVersion", {"intent": {
        "volume": {"name": "src-redeploy"}, "commitId": "redeploy-2", "ref": "main",
        "pathDeltas": {"removes": [{"path": "/", "recursive": True}], "upserts": [
            {"path": "handler.py", "node": {"file": {"content": {"inline": {"data": "bmV3"}}}}}]}}}, token=token)
    assert status == 200 and body["status"]["result"] == "COMMIT_RESULT_COMMITTED", body
    out = sdk(vols, """
        vol = Volume("src-redeploy")
        print("FILES", sorted(f.path for f in vol.listdir(recursive=True) if f.kind != "directory"))
        print("HANDLER", vol.read_file("handler.py"))
    """).stdout
    assert "FILES ['handler.py']" in out and "HANDLER b'new'" in out, out


def test_one_file_commits_into_a_large_directory_store_little_and_hold_no_memory(vols, tmp_path):
    """#12 items 3 and 4: 1,000 one-file commits into a 3,000-file directory, through the SDK. Before, every commit
    stored the whole directory again (quadratic growth) and the server kept each version's tree in memory."""
    import sqlite3

    def tree_bytes():
        db = sqlite3.connect(f"file:{vols.data_dir / 'state.db'}?mode=ro", uri=True)
        try:
            return db.execute("SELECT COALESCE(SUM(LENGTH(body)), 0) FROM volume_trees").fetchone()[0]
        finally:
            db.close()

    def rss():
        with open(f"/proc/{vols.proc.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) * 1024

    src = tmp_path / "seed"
    src.mkdir()
    for i in range(3000):
        (src / f"f{i:05}.txt").write_text(f"{i}\n")
    sdk(vols, f'Volume("onebyone").put_dir({str(src)!r}, "d")')
    before_bytes, before_rss = tree_bytes(), rss()
    out = sdk(vols, """
        vol = Volume("onebyone")
        for i in range(1000):
            vol.put_file(f"d/n{i:04}", b"x")
        names = [f.path for f in vol.listdir("d")]
        print("COUNT", len(names), "LAST", vol.read_file("d/n0999"), "FIRST", vol.read_file("d/f00000.txt"))
    """).stdout
    assert "COUNT 4000 LAST b'x' FIRST b'0\\n'" in out, out
    stored, grown = tree_bytes() - before_bytes, rss() - before_rss
    print(f"1,000 one-file commits: {stored} bytes of trees stored, server memory {grown:+} bytes")
    # The 3,000-entry directory alone is ~300 KB: a commit that rewrote it would store ~300 MB over 1,000 commits.
    assert stored < 40 << 20, f"1,000 one-file commits stored {stored} bytes of trees"
    assert grown < 64 << 20, f"the server's memory grew by {grown} bytes over 1,000 commits"


def test_listings_print_the_apis_objects_as_json_for_scripts(vols):
    """#20 item 4: `-o json` on ls/inspect prints the API's own objects (the names Connect JSON uses), a listing as
    one array; text stays the default."""
    sdk(vols, """
        vol = Volume("json-vol")
        vol.put_file("d/one.txt", b"1")
        vol.put_file("d/two.txt", b"22")
    """)
    listed = json.loads(vols.cli("volume", "ls", "-o", "json").stdout)
    mine = [v for v in listed if v["name"] == "json-vol"]
    assert len(mine) == 1 and mine[0]["volumeId"].startswith("vol-"), listed
    versions = json.loads(vols.cli("volume", "versions", "json-vol", "--output", "json").stdout)
    assert [int(v["versionId"]) for v in versions] == [2, 1], versions
    files = json.loads(vols.cli("volume", "ls-files", "json-vol", "-o", "json").stdout)
    sizes = {f["path"]: int(f.get("size", 0)) for f in files if f.get("kind") == "FILE_KIND_FILE"}
    assert sizes == {"d/one.txt": 1, "d/two.txt": 2}, files
    assert json.loads(vols.cli("sandbox", "ls", "-o", "json").stdout) == []
    assert json.loads(vols.cli("image", "ls", "-o", "json").stdout) is not None
    assert vols.cli("volume", "ls").stdout.startswith("ID "), "text by default"
    clients = json.loads(vols.cli("client", "ls", "-o", "json").stdout)
    assert any(c["clientId"] == vols.client_id and not c["revoked"] for c in clients), clients
    assert any(e["name"] == "default" for e in json.loads(vols.cli("environment", "ls", "-o", "json").stdout))
    vols.cli("secret", "set", "JSON_LISTED", "--value", "s3cr3t-never-listed")
    secrets = json.loads(vols.cli("secret", "ls", "-o", "json").stdout)
    assert [s["name"] for s in secrets] == ["JSON_LISTED"] and "s3cr3t" not in json.dumps(secrets), secrets
    assert json.loads(vols.cli("integration", "ls", "-o", "json").stdout) == []
    bad = vols.cli("volume", "ls", "-o", "yaml", check=False)
    assert bad.returncode != 0 and "text" in bad.stderr and "json" in bad.stderr, bad.stderr
