//! A real `compute serve` process on a free port with a temporary data directory.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestServer {
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    pub addr: std::net::SocketAddr,
    pub url: String,
    pub client_id: String,
    pub client_secret: String,
}

pub fn compute_bin() -> &'static str {
    env!("CARGO_BIN_EXE_compute")
}

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("compute-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

impl TestServer {
    pub fn start(name: &str, extra: &[&str]) -> Self {
        Self::start_in(temp_dir(name), extra)
    }

    pub fn start_in(data_dir: PathBuf, extra: &[&str]) -> Self {
        let info_path = data_dir.join("server.json");
        let _ = std::fs::remove_file(&info_path);
        let child = Command::new(compute_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .args(extra)
            .env("COMPUTE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting compute serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        let info: serde_json::Value = loop {
            if let Ok(bytes) = std::fs::read(&info_path) {
                if let Ok(v) = serde_json::from_slice(&bytes) {
                    break v;
                }
            }
            assert!(Instant::now() < deadline, "compute serve did not write server.json");
            std::thread::sleep(Duration::from_millis(20));
        };
        let creds: serde_json::Value =
            serde_json::from_slice(&std::fs::read(data_dir.join("admin-credentials.json")).unwrap()).unwrap();
        TestServer {
            child: Some(child),
            addr: info["listen"].as_str().unwrap().parse().unwrap(),
            url: info["url"].as_str().unwrap().to_string(),
            data_dir,
            client_id: creds["client_id"].as_str().unwrap().into(),
            client_secret: creds["client_secret"].as_str().unwrap().into(),
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server running");
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("compute serve did not exit within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a `compute` subcommand against this server's data directory.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(compute_bin()).args(args).arg("--data-dir").arg(&self.data_dir).output().unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
