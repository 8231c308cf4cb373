//! The agent's protocol loop: reads host frames from stdin, runs sessions, writes events to stdout.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use compute_agent_protocol::{
    Credit, Exit, Failure, FailureKind, FileRead, FileWrite, Frame, Hello, Kind, Resize, Shutdown, Signal, Spawn,
    Spawned, CHUNK, ENTRYPOINT_CHANNEL,
};

use crate::files::{Downloads, Uploads};
use crate::process::{self, Stdio};
use crate::reaper::{self, Ended};

/// What every process in the sandbox starts from.
pub struct Sandbox {
    /// Environment.
    pub env: Vec<(String, String)>,
    /// Default working directory.
    pub workdir: String,
    /// The entrypoint, if any.
    pub entrypoint: Option<Spawn>,
    /// The default user of processes (the image's `USER`).
    pub user: Option<String>,
}

/// The frame writer shared by every thread: one frame per locked write, so frames never interleave.
#[derive(Clone)]
pub struct Out(Arc<Mutex<File>>);

impl Out {
    /// Sends a frame; if the host is gone there is nobody to tell, and the main loop will notice.
    pub fn send(&self, frame: Frame) {
        let mut buf = Vec::with_capacity(9 + frame.payload.len());
        frame.encode(&mut buf);
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = f.write_all(&buf);
    }
}

/// Lets output readers wait while the host has paused their channel.
#[derive(Default)]
struct Gate {
    paused: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn set(&self, paused: bool) {
        *self.paused.lock().unwrap_or_else(|p| p.into_inner()) = paused;
        self.cv.notify_all();
    }

    fn wait_open(&self) {
        let mut p = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        while *p {
            p = self.cv.wait(p).unwrap_or_else(|p| p.into_inner());
        }
    }
}

struct Session {
    pid: i32,
    stdin: Mutex<Option<SyncSender<Option<Vec<u8>>>>>,
    pty: Option<File>,
    gate: Arc<Gate>,
    timed_out: AtomicBool,
}

type Sessions = Arc<Mutex<HashMap<u32, Arc<Session>>>>;

/// Serves the protocol until the host closes stdin or asks for shutdown. Returns the exit code.
pub fn serve(sandbox: Sandbox) -> std::io::Result<u8> {
    reaper::start();
    // SAFETY: fds 0 and 1 are the protocol pipes, owned by this loop from here on; nothing else uses them.
    let mut input = std::io::BufReader::with_capacity(256 * 1024, unsafe { File::from_raw_fd(0) });
    let out = Out(Arc::new(Mutex::new(unsafe { File::from_raw_fd(1) })));
    let sandbox = Arc::new(sandbox);
    let sessions: Sessions = Arc::default();
    let mut uploads = Uploads::default();
    let downloads = Downloads::default();

    out.send(Frame::json(Kind::Ready, 0, &Hello { version: env!("CARGO_PKG_VERSION").into() }));
    if let Some(entry) = sandbox.entrypoint.clone() {
        start(&sandbox, &sessions, &out, ENTRYPOINT_CHANNEL, entry);
    }

    loop {
        let frame = match Frame::read_from(&mut input) {
            Ok(Some(f)) => f,
            // The host went away (server stopped or crashed): nobody can use this sandbox any more.
            Ok(None) | Err(_) => {
                terminate_all(Duration::from_millis(500));
                return Ok(0);
            }
        };
        let ch = frame.channel;
        let session = || sessions.lock().unwrap_or_else(|p| p.into_inner()).get(&ch).cloned();
        match frame.kind {
            Kind::Spawn => match frame.parse::<Spawn>() {
                Ok(spec) => {
                    if session().is_some() {
                        out.send(Frame::json(
                            Kind::SpawnFailed,
                            ch,
                            &Failure::new(FailureKind::Invalid, "channel already in use"),
                        ));
                    } else {
                        start(&sandbox, &sessions, &out, ch, spec);
                    }
                }
                Err(e) => {
                    out.send(Frame::json(Kind::SpawnFailed, ch, &Failure::new(FailureKind::Invalid, e.to_string())))
                }
            },
            Kind::Stdin => {
                if let Some(s) = session() {
                    let tx = s.stdin.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if let Some(tx) = tx {
                        let _ = tx.send(Some(frame.payload));
                    }
                }
            }
            Kind::StdinEof => {
                if let Some(s) = session() {
                    if let Some(tx) = s.stdin.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        let _ = tx.send(None);
                    }
                }
            }
            Kind::Signal => {
                if let (Some(s), Ok(sig)) = (session(), frame.parse::<Signal>()) {
                    // The process itself, as a terminal's kill(1) would: its handlers decide for its children.
                    // SAFETY: kill has no memory effects; a stale pid at worst fails with ESRCH.
                    unsafe { libc::kill(s.pid, sig.signal) };
                }
            }
            Kind::Resize => {
                if let (Some(s), Ok(r)) = (session(), frame.parse::<Resize>()) {
                    if let Some(m) = &s.pty {
                        process::resize(m, r.cols, r.rows);
                    }
                }
            }
            Kind::Pause => {
                if let Some(s) = session() {
                    s.gate.set(true);
                }
            }
            Kind::Resume => {
                if let Some(s) = session() {
                    s.gate.set(false);
                }
            }
            Kind::FileWrite => match frame.parse::<FileWrite>() {
                Ok(req) => uploads.begin(ch, &req, &out),
                Err(e) => {
                    out.send(Frame::json(Kind::FileFailed, ch, &Failure::new(FailureKind::Invalid, e.to_string())))
                }
            },
            Kind::FileData => uploads.data(ch, &frame.payload),
            Kind::FileEnd => uploads.end(ch, &out),
            Kind::FileRead => match frame.parse::<FileRead>() {
                Ok(req) => download(&downloads, ch, req, &out),
                Err(e) => {
                    out.send(Frame::json(Kind::FileFailed, ch, &Failure::new(FailureKind::Invalid, e.to_string())))
                }
            },
            Kind::FileCredit => {
                if let Ok(c) = frame.parse::<Credit>() {
                    downloads.grant(ch, c.bytes);
                }
            }
            Kind::FileCancel => downloads.cancel(ch),
            Kind::Shutdown => {
                let grace = frame.parse::<Shutdown>().map(|s| s.grace_ms).unwrap_or(0);
                terminate_all(Duration::from_millis(grace));
                return Ok(0);
            }
            other => out.send(Frame::json(
                Kind::Error,
                ch,
                &Failure::new(FailureKind::Invalid, format!("unexpected frame {other:?}")),
            )),
        }
    }
}

/// Sends a file from its own thread, within the window the host grants.
fn download(downloads: &Downloads, ch: u32, req: FileRead, out: &Out) {
    let window = downloads.open(ch, req.window);
    let (out, fail, done) = (out.clone(), out.clone(), downloads.clone());
    let sender = thread(move || {
        crate::files::send_file(ch, &req.path, &window, &out);
        done.close(ch);
    });
    if sender.is_none() {
        downloads.close(ch);
        fail.send(Frame::json(Kind::FileFailed, ch, &Failure::new(FailureKind::Io, OUT_OF_THREADS)));
    }
}

fn merged_env(base: &[(String, String)], extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::with_capacity(base.len() + extra.len());
    for (k, v) in base.iter().chain(extra) {
        if let Some(slot) = env.iter_mut().find(|(ek, _)| ek == k) {
            slot.1 = v.clone();
        } else {
            env.push((k.clone(), v.clone()));
        }
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()));
    }
    env
}

fn start(sandbox: &Arc<Sandbox>, sessions: &Sessions, out: &Out, ch: u32, spec: Spawn) {
    let mut env = merged_env(&sandbox.env, &spec.env);
    if spec.pty.is_some() && !env.iter().any(|(k, _)| k == "TERM") {
        env.push(("TERM".into(), "xterm-256color".into()));
    }
    let workdir =
        PathBuf::from(spec.workdir.clone().filter(|w| !w.is_empty()).unwrap_or_else(|| sandbox.workdir.clone()));
    let workdir = if workdir.as_os_str().is_empty() { PathBuf::from("/") } else { workdir };
    // The image's working directory exists for its processes even if no layer made it (as with a Dockerfile's
    // WORKDIR). A directory asked for explicitly by an exec must already exist.
    if spec.workdir.as_deref().is_none_or(str::is_empty) {
        let _ = std::fs::create_dir_all(&workdir);
    }
    let user = spec.user.clone().filter(|u| !u.is_empty()).or_else(|| sandbox.user.clone().filter(|u| !u.is_empty()));
    let creds = match user.as_deref().map(process::lookup_user).transpose() {
        Ok(c) => c,
        Err(e) => {
            out.send(Frame::json(Kind::SpawnFailed, ch, &Failure::new(FailureKind::Invalid, &*e.0)));
            return;
        }
    };
    if let Some(c) = &creds {
        // Like a login: HOME (and USER) follow the user unless the environment sets them for it.
        match env.iter_mut().find(|(k, _)| k == "HOME") {
            Some((_, v)) if v.as_str() != "/root" => {}
            Some(slot) => slot.1 = c.home.clone(),
            None => env.push(("HOME".into(), c.home.clone())),
        }
        if !env.iter().any(|(k, _)| k == "USER") {
            env.push(("USER".into(), c.name.clone()));
        }
    }
    let path_var = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.clone()).unwrap_or_default();
    let resolved = match process::resolve(&spec.command, &path_var, &workdir) {
        // The SDK keeps sandboxes alive with `sleep infinity`; an image without `sleep` (distroless, a lone static
        // binary) gets the agent's own equivalent (an empty program: see `process::spawn`) instead of a sandbox
        // that cannot start.
        Err(_) if spec.command == "sleep" && spec.args == ["infinity"] => Ok(std::path::PathBuf::new()),
        other => other,
    };
    let started = resolved.and_then(|program| {
        process::spawn(&program, &spec.command, &spec.args, &env, &workdir, spec.pty, creds.as_ref())
    });
    let started = match started {
        Ok(s) => s,
        Err(e) => {
            out.send(Frame::json(Kind::SpawnFailed, ch, &Failure::new(FailureKind::NotFound, &*e.0)));
            return;
        }
    };
    let exit_rx = reaper::watch(started.pid);
    let gate = Arc::new(Gate::default());
    let (stdin_tx, stdin_rx) = sync_channel::<Option<Vec<u8>>>(256);
    let mut readers = Vec::new();
    let give_up = |why: &str| {
        signal_group(started.pid, libc::SIGKILL);
        out.send(Frame::json(Kind::SpawnFailed, ch, &Failure::new(FailureKind::Io, why)));
    };
    let (stdin_file, pty) = match started.stdio {
        Stdio::Pipes { stdin, stdout, stderr } => {
            readers.push(pump(stdout, Kind::Stdout, ch, out.clone(), gate.clone()));
            readers.push(pump(stderr, Kind::Stderr, ch, out.clone(), gate.clone()));
            (stdin, None)
        }
        Stdio::Pty { master } => match (process::dup_file(&master), process::dup_file(&master)) {
            (Ok(reader), Ok(writer)) => {
                readers.push(pump(reader, Kind::PtyOutput, ch, out.clone(), gate.clone()));
                (writer, Some(master))
            }
            _ => return give_up("the sandbox is out of file descriptors"),
        },
    };
    let Some(readers) = readers.into_iter().collect::<Option<Vec<_>>>() else {
        return give_up(OUT_OF_THREADS);
    };
    if thread(move || feed_stdin(stdin_file, stdin_rx)).is_none() {
        return give_up(OUT_OF_THREADS);
    }
    let session = Arc::new(Session {
        pid: started.pid,
        stdin: Mutex::new(Some(stdin_tx)),
        pty,
        gate,
        timed_out: AtomicBool::new(false),
    });
    sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(ch, session.clone());
    out.send(Frame::json(Kind::Spawned, ch, &Spawned { pid: started.pid }));

    if let Some(ms) = spec.timeout_ms {
        let s = session.clone();
        let sessions = sessions.clone();
        thread(move || {
            std::thread::sleep(Duration::from_millis(ms));
            let still_running =
                sessions.lock().unwrap_or_else(|p| p.into_inner()).get(&ch).is_some_and(|x| Arc::ptr_eq(x, &s));
            if still_running {
                s.timed_out.store(true, Ordering::SeqCst);
                signal_group(s.pid, libc::SIGKILL);
            }
        });
    }

    let sessions = sessions.clone();
    let out = out.clone();
    let waiter = thread(move || {
        let ended = exit_rx.recv().unwrap_or(Ended::Signal(libc::SIGKILL));
        // Output first, then the exit: wait for the readers to drain, but not forever (a background child
        // that inherited the pipes may keep them open).
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        for r in readers {
            while !r.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let (code, signal) = match ended {
            Ended::Code(c) => (Some(c), None),
            Ended::Signal(s) => (None, Some(s)),
        };
        let timed_out = session.timed_out.load(Ordering::SeqCst);
        sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(&ch);
        out.send(Frame::json(Kind::Exited, ch, &Exit { code, signal, timed_out }));
    });
    if waiter.is_none() {
        // Nobody would report the exit: end the process now rather than leave a session that never finishes.
        signal_group(started.pid, libc::SIGKILL);
    }
}

const OUT_OF_THREADS: &str = "the sandbox has no process slots left for the agent (pids limit reached)";

/// Starts a thread; `None` when the system refuses (e.g. the sandbox's pids limit is reached).
fn thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<std::thread::JoinHandle<T>> {
    std::thread::Builder::new().stack_size(256 * 1024).spawn(f).ok()
}

/// Copies a process stream to the host in frames, holding back while the channel is paused.
fn pump(mut from: File, kind: Kind, ch: u32, out: Out, gate: Arc<Gate>) -> Option<std::thread::JoinHandle<()>> {
    thread(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            gate.wait_open();
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.send(Frame::data(kind, ch, buf[..n].to_vec())),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // EIO: the PTY's last slave closed.
                Err(_) => break,
            }
        }
    })
}

fn feed_stdin(mut to: File, rx: std::sync::mpsc::Receiver<Option<Vec<u8>>>) {
    while let Ok(Some(chunk)) = rx.recv() {
        if to.write_all(&chunk).is_err() {
            // The process closed its stdin: drain and drop the rest.
            while let Ok(Some(_)) = rx.recv() {}
            return;
        }
    }
    // EOF: dropping `to` closes the pipe. (On a PTY, send the EOF character instead of closing the master.)
    if is_tty(&to) {
        let _ = to.write_all(&[4]);
    }
}

fn is_tty(f: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(f.as_raw_fd()) == 1 }
}

fn signal_group(pid: i32, sig: i32) {
    // SAFETY: kill has no memory effects; a stale pid at worst fails with ESRCH.
    unsafe {
        if libc::kill(-pid, sig) != 0 {
            libc::kill(pid, sig);
        }
    }
}

/// SIGTERM to every process in the sandbox, SIGKILL after `grace`.
pub fn terminate_all(grace: Duration) {
    if std::process::id() != 1 {
        return; // Only PID 1 owns "every process"; in tests the sessions die with their pipes.
    }
    // SAFETY: kill(-1) from PID 1 of a PID namespace signals every other process in it.
    unsafe {
        libc::kill(-1, libc::SIGTERM);
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if !Path::new("/proc").exists() || count_processes() <= 1 {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: as above.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
    }
}

fn count_processes() -> usize {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
                .count()
        })
        .unwrap_or(0)
}
