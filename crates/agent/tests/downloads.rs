//! The agent's downloads against the real binary over its protocol pipes: flow control, cancellation, and files
//! that have no end.

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use compute_agent_protocol::{Credit, Failure, FailureKind, FileDone, FileRead, Frame, Kind, ServeConfig};

struct Agent {
    child: Child,
    stdin: ChildStdin,
    frames: Receiver<Frame>,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Agent {
    fn start(name: &str) -> Agent {
        let dir = std::env::temp_dir().join(format!("agent-downloads-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("serve.json");
        let cfg = ServeConfig { workdir: "/".into(), ..Default::default() };
        std::fs::write(&config, serde_json::to_vec(&cfg).unwrap()).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_compute-agent"))
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start compute-agent");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, frames) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            while let Ok(Some(f)) = Frame::read_from(&mut stdout) {
                if tx.send(f).is_err() {
                    break;
                }
            }
        });
        let agent = Agent { child, stdin, frames, _dir: TempDir(dir) };
        assert_eq!(agent.next().kind, Kind::Ready);
        agent
    }

    fn dir(&self) -> &std::path::Path {
        &self._dir.0
    }

    fn send(&mut self, f: Frame) {
        f.write_to(&mut self.stdin).unwrap();
        self.stdin.flush().unwrap();
    }

    fn read(&mut self, ch: u32, path: &str, window: Option<u64>) {
        self.send(Frame::json(Kind::FileRead, ch, &FileRead { path: path.into(), window }));
    }

    fn next(&self) -> Frame {
        self.frames.recv_timeout(Duration::from_secs(10)).expect("a frame from the agent within 10 s")
    }

    /// A download's bytes until FileOk, after those `received` already, checked against the count FileOk reports.
    fn receive_file(&self, received: Vec<u8>) -> Vec<u8> {
        let mut body = received;
        loop {
            let f = self.next();
            match f.kind {
                Kind::FileData => body.extend_from_slice(&f.payload),
                Kind::FileOk => {
                    assert_eq!(f.parse::<FileDone>().unwrap().bytes, body.len() as u64, "FileOk counts what came");
                    return body;
                }
                other => panic!("unexpected {other:?}: {}", String::from_utf8_lossy(&f.payload)),
            }
        }
    }

    /// Whatever arrives within `wait`.
    fn quiet_for(&self, wait: Duration) -> Vec<Frame> {
        let mut got = Vec::new();
        loop {
            match self.frames.recv_timeout(wait) {
                Ok(f) => got.push(f),
                Err(RecvTimeoutError::Timeout) => return got,
                Err(RecvTimeoutError::Disconnected) => panic!("the agent went away"),
            }
        }
    }

    /// Paths the agent holds open.
    fn open_files(&self) -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|p| p.display().to_string())
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn failure(f: &Frame) -> Failure {
    assert_eq!(f.kind, Kind::FileFailed, "{:?}", String::from_utf8_lossy(&f.payload));
    f.parse().unwrap()
}

#[test]
fn a_download_never_runs_ahead_of_its_window_and_a_cancel_closes_the_file() {
    let mut agent = Agent::start("window");
    let path = agent.dir().join("big.bin");
    std::fs::write(&path, vec![7u8; 8 << 20]).unwrap();
    let path = path.display().to_string();
    agent.read(5, &path, Some(1 << 20));

    let sent: usize = agent.quiet_for(Duration::from_millis(500)).iter().map(|f| f.payload.len()).sum();
    assert_eq!(sent, 1 << 20, "the agent sent {sent} bytes on a 1 MiB window");
    assert!(agent.open_files().contains(&path), "the file stays open while the download waits");

    agent.send(Frame::json(Kind::FileCredit, 5, &Credit { bytes: 512 << 10 }));
    let more: usize = agent.quiet_for(Duration::from_millis(500)).iter().map(|f| f.payload.len()).sum();
    assert_eq!(more, 512 << 10, "a credit lets exactly that much more through");

    agent.send(Frame::data(Kind::FileCancel, 5, Vec::new()));
    let after = agent.quiet_for(Duration::from_millis(500));
    assert!(after.is_empty(), "nothing follows a cancel, got {} frames", after.len());
    assert!(!agent.open_files().contains(&path), "a cancelled download closes its file");

    // The agent serves on: the same file, unlimited, arrives whole.
    agent.read(6, &path, None);
    assert_eq!(agent.receive_file(Vec::new()).len(), 8 << 20);
}

#[test]
fn devices_fifos_and_sockets_are_refused_naming_what_they_are() {
    let mut agent = Agent::start("special");
    let fifo = agent.dir().join("pipe");
    let c = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let socket = agent.dir().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let cases = [
        ("/dev/zero".to_string(), "a character device"),
        (fifo.display().to_string(), "a FIFO"),
        (socket.display().to_string(), "a socket"),
    ];
    for (i, (path, what)) in cases.iter().enumerate() {
        agent.read(10 + i as u32, path, Some(1 << 20));
        let f = failure(&agent.next());
        assert_eq!(f.kind, FailureKind::NotARegularFile, "{path}");
        assert!(f.message.contains(what) && f.message.contains("only regular files"), "{}", f.message);
    }
    assert!(!agent.open_files().iter().any(|p| p == "/dev/zero"), "a refused device is never left open");
    agent.read(20, "relative/path", None);
    assert_eq!(failure(&agent.next()).kind, FailureKind::Invalid);
    agent.read(21, "/nonexistent/file", None);
    assert_eq!(failure(&agent.next()).kind, FailureKind::NotFound);
}

#[test]
fn a_file_without_a_size_is_sent_whole_when_it_is_short() {
    let mut agent = Agent::start("proc");
    agent.read(3, "/proc/self/status", Some(1 << 20));
    let body = agent.receive_file(Vec::new());
    assert!(String::from_utf8_lossy(&body).contains("VmRSS"), "read /proc/self/status whole");
}

#[test]
fn a_file_is_sent_as_large_as_it_was_when_the_download_began() {
    let mut agent = Agent::start("growing");
    let path = agent.dir().join("log");
    std::fs::write(&path, vec![1u8; 300 << 10]).unwrap();
    agent.read(4, &path.display().to_string(), Some(64 << 10));
    let first = agent.next();
    assert_eq!(first.kind, Kind::FileData);
    // The file grows while the download waits for credit; the download still ends at the size it began with.
    std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(&vec![2u8; 1 << 20]).unwrap();
    agent.send(Frame::json(Kind::FileCredit, 4, &Credit { bytes: 16 << 20 }));
    assert_eq!(agent.receive_file(first.payload).len(), 300 << 10);
}
