//! `bench-functions`: `.remote()` calls through the server next to the same calls made straight to the function's
//! replica (its `chalk-remote-call` runtime on port 6666), measured in the same run with the same client.
//!
//! The SDK deploys a one-line `echo` function (the SDK's default image, built once into the server's image
//! store), and the time from deploy to the first answered `.remote()` is printed. Then, alternating for
//! `--rounds` rounds: `--calls` sequential calls through the server (`RemoteCallService/CallFunction`, which
//! resolves the function and applies its policies before it relays the call) and as many made directly to the
//! replica, both with the SDK's own remote-call client and the same request (and, for reference, the SDK's
//! `.remote()`, which adds its Arrow encoding and decoding); then `--threads` callers for `--seconds` on each path for
//! throughput. What the server's path costs is its latency and throughput next to the direct one. Last, the
//! time from a caller's send to the function starting, for `.defer()` (enqueued in the store, claimed by the
//! queue worker) next to `.remote()` in the same run.
//!
//! Needs the SDK (`scripts/sdk-venv.sh`); `--python` names its interpreter (default `.venv/bin/python`).
//!
//! Usage: cargo run --release -p compute-bench --bin bench-functions [-- --calls 200 --rounds 3 --threads 8
//! --seconds 3 --isolation native|gvisor --image-dir DIR --python PATH]

use std::process::Command;

use compute_bench::arg;

/// The SDK program: deploys `echo`, finds the replica's address (the function answers it), and measures.
const DRIVER: &str = r#"
import io, json, os, sys, threading, time, urllib.request
# Only the caller runs this; a replica imports the module for its functions.
if __name__ == "__main__":
    t0 = time.monotonic()
    # `.defer()` needs the SDK's web-identity mode (what `compute env --token-file` sets up): a token in a file.
    req = urllib.request.Request(os.environ["CHALK_API_SERVER"] + "/chalk.server.v1.AuthService/GetToken",
        data=json.dumps({"clientId": os.environ.pop("CHALK_CLIENT_ID"),
                         "clientSecret": os.environ.pop("CHALK_CLIENT_SECRET")}).encode(),
        headers={"content-type": "application/json"})
    with open("token", "w") as f:
        f.write(json.loads(urllib.request.urlopen(req).read())["accessToken"])
    os.environ["CHALK_WEB_IDENTITY_TOKEN_FILE"] = os.path.abspath("token")
    os.environ["CHALK_FUNCTION_QUEUE_ENDPOINT"] = os.environ["CHALK_API_SERVER"]
import chalkcompute
import pyarrow as pa, pyarrow.ipc as ipc
from chalkcompute._remote_call_client import RemoteCallClient

@chalkcompute.function()
def echo(x: str) -> str:
    if x == "?addr":
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(("192.0.2.1", 9))
        return s.getsockname()[0]
    return x

@chalkcompute.function()
def stamp(x: str) -> float:
    import time
    return time.time()

if __name__ == "__main__":
    calls, rounds, threads, seconds = (int(a) for a in sys.argv[1:5])
    echo.wait_ready()
    addr = echo.remote("?addr")
    cold = time.monotonic() - t0

    def payload(v):
        t = pa.table({"x": pa.array([v], pa.large_utf8())})
        b = io.BytesIO(); w = ipc.new_stream(b, t.schema); w.write_table(t); w.close()
        return b.getvalue()

    direct = RemoteCallClient(f"{addr}:6666", metadata=[], use_tls=False)
    # The same client and request to the server, which resolves the function, applies its policies and relays.
    bearer = [("authorization", "Bearer " + open("token").read().strip())]
    server = RemoteCallClient(os.environ["CHALK_API_SERVER"].split("://", 1)[1], metadata=bearer, use_tls=False)
    body = payload("hello")
    def check(out):
        assert ipc.open_stream(out[0]).read_all().column(0)[0].as_py() == "hello"
    def via_server():
        check(list(server.call_ipc("echo", body, metadata=[])))
    def via_direct():
        check(list(direct.call_ipc("echo", body, metadata=[])))
    def via_sdk():
        assert echo.remote("hello") == "hello"

    def latency(fn):
        samples = []
        for _ in range(calls):
            s = time.perf_counter(); fn(); samples.append(time.perf_counter() - s)
        samples.sort()
        return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]

    def throughput(fn):
        done = [0] * threads
        stop = time.monotonic() + seconds
        def worker(i):
            while time.monotonic() < stop:
                fn(); done[i] += 1
        ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        [t.start() for t in ts]; [t.join() for t in ts]
        return sum(done) / seconds

    def start_delay(call):
        # From the caller's send to the function body starting (same clock: one machine).
        samples = []
        for _ in range(max(calls // 4, 10)):
            s = time.time(); started = call(); samples.append(started - s)
        samples.sort()
        return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]

    via_server(); via_direct()
    stamp.wait_ready(); stamp.remote("warm"); stamp.defer("warm").get(timeout=120)
    via_sdk()
    out = {"cold_s": cold, "server": [], "direct": [], "sdk": [], "defer": [], "remote": []}
    for _ in range(rounds):
        p50, p99 = latency(via_sdk)
        out["sdk"].append({"p50": p50, "p99": p99})
        for name, fn in (("server", via_server), ("direct", via_direct)):
            p50, p99 = latency(fn)
            out[name].append({"p50": p50, "p99": p99, "rps": throughput(fn)})
        for name, call in (("defer", lambda: stamp.defer("x").get(timeout=120)), ("remote", lambda: stamp.remote("x"))):
            p50, p99 = start_delay(call)
            out[name].append({"p50": p50, "p99": p99})
    print("FIGURES:" + json.dumps(out))
"#;

fn main() -> anyhow::Result<()> {
    compute_bench::usage(
        "bench-functions",
        ".remote() through the server next to calls made straight to the function's replica, same run",
        &[
            ("--calls", "N", "sequential calls per round and path (default 200)"),
            ("--rounds", "N", "alternating rounds (default 3)"),
            ("--threads", "N", "concurrent callers for throughput (default 8)"),
            ("--seconds", "N", "seconds of throughput per round and path (default 3)"),
            ("--isolation", "native|gvisor", "the server's isolation (default: the server's own)"),
            ("--image-dir", "DIR", "an image store to reuse (default: a fresh one, so the image is built)"),
            ("--python", "PATH", "the SDK's interpreter (default .venv/bin/python)"),
        ],
    );
    let calls: u32 = arg("--calls", 200);
    let rounds: u32 = arg("--rounds", 3);
    let threads: u32 = arg("--threads", 8);
    let seconds: u32 = arg("--seconds", 3);
    let isolation: String = arg("--isolation", String::new());
    let image_dir: String = arg("--image-dir", String::new());
    let python: String = arg("--python", ".venv/bin/python".to_string());
    anyhow::ensure!(
        std::path::Path::new(&python).exists(),
        "no SDK interpreter at {python}: run scripts/sdk-venv.sh or pass --python"
    );
    // The driver runs in its own directory: a relative interpreter path would resolve from there.
    let python = std::path::absolute(&python)?.to_string_lossy().into_owned();
    let mut flags: Vec<&str> = Vec::new();
    if !isolation.is_empty() {
        flags.extend(["--isolation", &isolation]);
    }
    if !image_dir.is_empty() {
        flags.extend(["--image-dir", &image_dir]);
    }
    let server = compute_bench::Server::start("functions", &flags)?;
    let result = measure(&server, &python, [calls, rounds, threads, seconds]);
    server.stop();
    report(&result?, calls, threads)
}

fn measure(server: &compute_bench::Server, python: &str, args: [u32; 4]) -> anyhow::Result<serde_json::Value> {
    let dir = server.data_dir.join("bench-program");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bench_echo.py"), DRIVER)?;
    let out = Command::new(python)
        .arg("bench_echo.py")
        .args(args.map(|a| a.to_string()))
        .current_dir(&dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
        .env("CHALK_API_SERVER", server.url())
        .env("CHALK_CLIENT_ID", server.creds["client_id"].as_str().unwrap_or_default())
        .env("CHALK_CLIENT_SECRET", server.creds["client_secret"].as_str().unwrap_or_default())
        .output()
        .map_err(|e| anyhow::anyhow!("running {python}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let figures = stdout.lines().find_map(|l| l.strip_prefix("FIGURES:"));
    match figures {
        Some(json) if out.status.success() => Ok(serde_json::from_str(json)?),
        _ => anyhow::bail!(
            "the SDK program failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The median over rounds of one figure of one path.
fn median(v: &serde_json::Value, path: &str, key: &str) -> f64 {
    let mut xs: Vec<f64> = v[path].as_array().into_iter().flatten().filter_map(|r| r[key].as_f64()).collect();
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

fn report(v: &serde_json::Value, calls: u32, threads: u32) -> anyhow::Result<()> {
    println!("deploy to first answered .remote(): {:.2} s", v["cold_s"].as_f64().unwrap_or(f64::NAN));
    let ms = |path, key| median(v, path, key) * 1e3;
    println!("sequential calls, the SDK's remote-call client ({calls} a round, medians over rounds):");
    for (label, path) in [("through the server", "server"), ("direct to the replica (peer)", "direct")] {
        println!("  {label:<30} p50 {:>7.2} ms  p99 {:>7.2} ms", ms(path, "p50"), ms(path, "p99"));
    }
    println!(
        "  server/direct p50 ratio: {:.2}x (+{:.2} ms)",
        ms("server", "p50") / ms("direct", "p50"),
        ms("server", "p50") - ms("direct", "p50")
    );
    println!(
        "  the SDK's own .remote() (Arrow in and out, through the server): p50 {:.2} ms  p99 {:.2} ms",
        ms("sdk", "p50"),
        ms("sdk", "p99")
    );
    let (s, d) = (median(v, "server", "rps"), median(v, "direct", "rps"));
    println!("throughput with {threads} callers: server {s:.0} calls/s, direct {d:.0} calls/s, ratio {:.2}x", s / d);
    println!("send to the function starting (medians over rounds):");
    for (label, path) in [(".defer() (the durable queue)", "defer"), (".remote() (peer)", "remote")] {
        println!("  {label:<30} p50 {:>7.2} ms  p99 {:>7.2} ms", ms(path, "p50"), ms(path, "p99"));
    }
    println!(
        "  defer/remote p50 ratio: {:.2}x (+{:.2} ms)",
        ms("defer", "p50") / ms("remote", "p50"),
        ms("defer", "p50") - ms("remote", "p50")
    );
    Ok(())
}
