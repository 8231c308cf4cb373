//! The host's end of a sandbox agent's protocol: one task reads the agent's frames and routes them to
//! sessions, file transfers and the entrypoint log; writers share one bounded queue to the agent.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use compute_agent_protocol::{
    Credit, Exit, Failure, FailureKind, FileDone, FileRead, FileWrite, Frame, Hello, Kind, Spawned, ENTRYPOINT_CHANNEL,
    MAX_FRAME,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use crate::session::{ExecSpec, Session, SessionEvent, StreamKind};
use crate::RuntimeError;

/// How the entrypoint ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntrypointEnd {
    /// It exited or was killed.
    Exited {
        /// Exit code.
        code: Option<i32>,
        /// Killing signal.
        signal: Option<i32>,
    },
    /// It could not be started.
    Failed(String),
    /// The agent itself went away (the sandbox died).
    AgentGone,
}

/// A piece of a downloaded file.
pub type DownloadChunk = Result<Bytes, RuntimeError>;

/// How many bytes of a download the agent may send ahead of its reader: the most one download holds in the
/// server between the agent and the reader's queue.
pub const DOWNLOAD_WINDOW: u64 = 1024 * 1024;

enum Pending {
    Spawn(oneshot::Sender<Result<i32, String>>),
    File(mpsc::UnboundedSender<Frame>),
}

struct Shared {
    sessions: Mutex<HashMap<u32, Arc<Session>>>,
    pending: Mutex<HashMap<u32, Pending>>,
    entrypoint: watch::Sender<Option<EntrypointEnd>>,
    log: Mutex<Option<std::fs::File>>,
}

/// A connection to one sandbox's agent.
#[derive(Clone)]
pub struct AgentConn {
    tx: mpsc::Sender<Frame>,
    shared: Arc<Shared>,
    next_channel: Arc<AtomicU32>,
    sandbox_id: String,
    by_id: Arc<Mutex<HashMap<String, Arc<Session>>>>,
    entry_rx: watch::Receiver<Option<EntrypointEnd>>,
}

impl AgentConn {
    /// Starts serving the agent on `reader`/`writer`; waits for its Ready frame. Entrypoint output is appended
    /// to `log_path`.
    pub async fn start(
        sandbox_id: &str,
        reader: impl AsyncRead + Unpin + Send + 'static,
        writer: impl AsyncWrite + Unpin + Send + 'static,
        log_path: PathBuf,
    ) -> Result<AgentConn, RuntimeError> {
        let (tx, rx) = mpsc::channel::<Frame>(64);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| RuntimeError::io(format!("opening {}", log_path.display()), e))?;
        let (entry_tx, entry_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            sessions: Mutex::default(),
            pending: Mutex::default(),
            entrypoint: entry_tx,
            log: Mutex::new(Some(log)),
        });
        tokio::spawn(write_loop(writer, rx));
        let (ready_tx, ready_rx) = oneshot::channel();
        tokio::spawn(read_loop(reader, shared.clone(), ready_tx, sandbox_id.to_string()));
        match tokio::time::timeout(std::time::Duration::from_secs(30), ready_rx).await {
            Ok(Ok(Ok(hello))) => {
                tracing::debug!(sandbox = sandbox_id, agent = hello.version, "agent ready")
            }
            Ok(Ok(Err(e))) => return Err(RuntimeError::Agent(e)),
            Ok(Err(_)) => return Err(RuntimeError::Agent("exited before it was ready".into())),
            Err(_) => return Err(RuntimeError::Agent("not ready within 30 s".into())),
        }
        Ok(AgentConn {
            tx,
            shared,
            next_channel: Arc::new(AtomicU32::new(1)),
            sandbox_id: sandbox_id.to_string(),
            by_id: Arc::default(),
            entry_rx,
        })
    }

    fn channel(&self) -> u32 {
        self.next_channel.fetch_add(1, Ordering::Relaxed)
    }

    /// Starts a process session. A command that cannot start yields a session whose only event is
    /// [`SessionEvent::Failed`] naming why.
    pub async fn exec(&self, spec: ExecSpec, session_id: String) -> Result<Arc<Session>, RuntimeError> {
        let ch = self.channel();
        let session = Session::new(session_id.clone(), ch, spec.clone(), self.tx.clone());
        let (done_tx, done_rx) = oneshot::channel();
        self.shared.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(ch, Pending::Spawn(done_tx));
        self.shared.sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(ch, session.clone());
        self.by_id.lock().unwrap_or_else(|p| p.into_inner()).insert(session_id, session.clone());
        let frame = Frame::json(Kind::Spawn, ch, &spec);
        self.send(frame).await?;
        match done_rx.await {
            Ok(Ok(pid)) => session.set_pid(pid),
            Ok(Err(msg)) => session.push(SessionEvent::Failed(msg)),
            Err(_) => session.push(SessionEvent::Failed(format!("sandbox {} stopped", self.sandbox_id))),
        }
        Ok(session)
    }

    /// A session by id.
    pub fn session(&self, id: &str) -> Option<Arc<Session>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// Every session, oldest first.
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        let mut v: Vec<_> = self.by_id.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        v.sort_by_key(|s| s.created_at_ms());
        v
    }

    async fn send(&self, frame: Frame) -> Result<(), RuntimeError> {
        // A frame past the limit would make the agent drop the connection (and the sandbox with it).
        if frame.payload.len() > MAX_FRAME {
            return Err(RuntimeError::TooLarge(format!(
                "the request is {} bytes; the sandbox agent takes at most {MAX_FRAME} bytes in one message",
                frame.payload.len()
            )));
        }
        self.tx.send(frame).await.map_err(|_| RuntimeError::NotRunning(self.sandbox_id.clone()))
    }

    /// Writes a file from `chunks`; returns the bytes written.
    pub async fn upload(
        &self,
        path: &str,
        mode: Option<u32>,
        mut chunks: mpsc::Receiver<Bytes>,
    ) -> Result<u64, RuntimeError> {
        let ch = self.channel();
        let (ftx, mut frx) = mpsc::unbounded_channel();
        self.shared.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(ch, Pending::File(ftx));
        let result = async {
            self.send(Frame::json(Kind::FileWrite, ch, &FileWrite { path: path.into(), mode })).await?;
            while let Some(chunk) = chunks.recv().await {
                // Stop early if the agent already refused the file.
                if let Ok(f) = frx.try_recv() {
                    return file_result(f);
                }
                for piece in chunk.chunks(MAX_FRAME / 4) {
                    self.send(Frame::data(Kind::FileData, ch, piece.to_vec())).await?;
                }
            }
            self.send(Frame::data(Kind::FileEnd, ch, Vec::new())).await?;
            match frx.recv().await {
                Some(f) => file_result(f),
                None => Err(RuntimeError::NotRunning(self.sandbox_id.clone())),
            }
        }
        .await;
        self.shared.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&ch);
        result
    }

    /// Reads a file; the receiver yields its bytes in order, or one error. The agent sends at most
    /// [`DOWNLOAD_WINDOW`] bytes ahead of what the receiver has taken, and dropping the receiver cancels the
    /// download in the agent (which closes the file).
    pub async fn download(&self, path: &str) -> Result<mpsc::Receiver<DownloadChunk>, RuntimeError> {
        let ch = self.channel();
        let (ftx, mut frx) = mpsc::unbounded_channel::<Frame>();
        self.shared.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(ch, Pending::File(ftx));
        let request = FileRead { path: path.into(), window: Some(DOWNLOAD_WINDOW) };
        self.send(Frame::json(Kind::FileRead, ch, &request)).await?;
        // Wait for the first frame so that "not found" and friends are an error of the call itself.
        let first = frx.recv().await.ok_or_else(|| RuntimeError::NotRunning(self.sandbox_id.clone()))?;
        if first.kind == Kind::FileFailed {
            self.shared.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&ch);
            return Err(file_result(first).unwrap_err());
        }
        let (out_tx, out_rx) = mpsc::channel(4);
        let conn = self.clone();
        tokio::spawn(async move {
            if !conn.forward_download(ch, first, frx, out_tx).await {
                let _ = conn.tx.send(Frame::data(Kind::FileCancel, ch, Vec::new())).await;
            }
            conn.shared.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&ch);
        });
        Ok(out_rx)
    }

    /// Hands a download's frames to its reader, granting the agent credit for each chunk the reader's queue
    /// took. False when the reader went away first (the agent should stop).
    async fn forward_download(
        &self,
        ch: u32,
        first: Frame,
        mut frx: mpsc::UnboundedReceiver<Frame>,
        out: mpsc::Sender<DownloadChunk>,
    ) -> bool {
        let mut next = Some(first);
        loop {
            let frame = match next.take() {
                Some(f) => f,
                None => tokio::select! {
                    f = frx.recv() => match f {
                        Some(f) => f,
                        None => {
                            let _ = out.send(Err(RuntimeError::NotRunning(self.sandbox_id.clone()))).await;
                            return true;
                        }
                    },
                    _ = out.closed() => return false,
                },
            };
            match frame.kind {
                Kind::FileData => {
                    let bytes = frame.payload.len() as u64;
                    if out.send(Ok(Bytes::from(frame.payload))).await.is_err() {
                        return false;
                    }
                    let _ = self.tx.send(Frame::json(Kind::FileCredit, ch, &Credit { bytes })).await;
                }
                Kind::FileOk => return true,
                _ => {
                    let _ = out.send(file_result(frame).map(|_| Bytes::new())).await;
                    return true;
                }
            }
        }
    }

    /// Asks the agent to stop everything (SIGTERM, SIGKILL after `grace_ms`) and exit.
    pub async fn shutdown(&self, grace_ms: u64) {
        let _ = self.send(Frame::json(Kind::Shutdown, 0, &compute_agent_protocol::Shutdown { grace_ms })).await;
    }

    /// Waits until the entrypoint ends (or the agent goes away) and says how.
    pub async fn entrypoint_end(&self) -> EntrypointEnd {
        let mut watch = self.entry_rx.clone();
        loop {
            if let Some(end) = watch.borrow().clone() {
                return end;
            }
            if watch.changed().await.is_err() {
                return EntrypointEnd::AgentGone;
            }
        }
    }
}

fn file_result(f: Frame) -> Result<u64, RuntimeError> {
    match f.kind {
        Kind::FileOk => Ok(f.parse::<FileDone>().map(|d| d.bytes).unwrap_or(0)),
        _ => {
            let failure =
                f.parse::<Failure>().unwrap_or_else(|_| Failure::new(FailureKind::Io, "file transfer failed"));
            Err(RuntimeError::File { kind: failure.kind, message: failure.message, errno: failure.errno })
        }
    }
}

async fn write_loop(mut w: impl AsyncWrite + Unpin, mut rx: mpsc::Receiver<Frame>) {
    let mut buf = Vec::with_capacity(256 * 1024);
    while let Some(frame) = rx.recv().await {
        buf.clear();
        frame.encode(&mut buf);
        // Batch whatever else is already queued into one write.
        while buf.len() < 1 << 20 {
            match rx.try_recv() {
                Ok(f) => f.encode(&mut buf),
                Err(_) => break,
            }
        }
        if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
            break;
        }
    }
}

async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<Frame>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if !(5..=MAX_FRAME + 5).contains(&len) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame length {len}")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Frame::decode_body(body).map(Some)
}

async fn read_loop(
    mut r: impl AsyncRead + Unpin,
    shared: Arc<Shared>,
    ready: oneshot::Sender<Result<Hello, String>>,
    sandbox: String,
) {
    let mut ready = Some(ready);
    loop {
        let frame = match read_frame(&mut r).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(%sandbox, error = %e, "agent protocol error; dropping the connection");
                break;
            }
        };
        let ch = frame.channel;
        let session = || shared.sessions.lock().unwrap_or_else(|p| p.into_inner()).get(&ch).cloned();
        match frame.kind {
            Kind::Ready => {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(frame.parse::<Hello>().map_err(|e| e.to_string()));
                }
            }
            Kind::Spawned | Kind::SpawnFailed => {
                let result = if frame.kind == Kind::Spawned {
                    frame.parse::<Spawned>().map(|s| s.pid).map_err(|e| e.to_string())
                } else {
                    Err(frame.parse::<Failure>().map(|f| f.message).unwrap_or_else(|e| e.to_string()))
                };
                if ch == ENTRYPOINT_CHANNEL {
                    if let Err(msg) = result {
                        shared.entrypoint.send_replace(Some(EntrypointEnd::Failed(msg)));
                    }
                } else if let Some(Pending::Spawn(tx)) =
                    shared.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&ch)
                {
                    let _ = tx.send(result);
                }
            }
            Kind::Stdout | Kind::Stderr | Kind::PtyOutput => {
                if ch == ENTRYPOINT_CHANNEL {
                    if let Some(f) = shared.log.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                        let _ = f.write_all(&frame.payload);
                    }
                } else if let Some(s) = session() {
                    let kind = match frame.kind {
                        Kind::Stdout => StreamKind::Stdout,
                        Kind::Stderr => StreamKind::Stderr,
                        _ => StreamKind::Pty,
                    };
                    s.push(SessionEvent::Output(kind, Bytes::from(frame.payload)));
                }
            }
            Kind::Exited => {
                let exit = frame.parse::<Exit>().unwrap_or(Exit { code: None, signal: Some(9), timed_out: false });
                if ch == ENTRYPOINT_CHANNEL {
                    shared
                        .entrypoint
                        .send_replace(Some(EntrypointEnd::Exited { code: exit.code, signal: exit.signal }));
                } else if let Some(s) = shared.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(&ch) {
                    s.push(if exit.timed_out {
                        SessionEvent::TimedOut { code: exit.code, signal: exit.signal }
                    } else {
                        SessionEvent::Exited { code: exit.code, signal: exit.signal }
                    });
                }
            }
            Kind::FileData | Kind::FileOk | Kind::FileFailed | Kind::FileEnd => {
                if let Some(Pending::File(tx)) = shared.pending.lock().unwrap_or_else(|p| p.into_inner()).get(&ch) {
                    let _ = tx.send(frame);
                }
            }
            Kind::Error => {
                let msg = frame.parse::<Failure>().map(|f| f.message).unwrap_or_default();
                tracing::warn!(%sandbox, channel = ch, "agent reported: {msg}");
            }
            other => tracing::warn!(%sandbox, ?other, "unexpected frame from the agent"),
        }
    }
    // The agent is gone: everything in flight ends now, visibly.
    if let Some(tx) = ready.take() {
        let _ = tx.send(Err("exited before it was ready".into()));
    }
    let sessions: Vec<_> = shared.sessions.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, s)| s).collect();
    for s in sessions {
        s.push(SessionEvent::Failed(format!("sandbox {sandbox} stopped while the process was running")));
    }
    shared.pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
    if shared.entrypoint.borrow().is_none() {
        shared.entrypoint.send_replace(Some(EntrypointEnd::AgentGone));
    }
    shared.log.lock().unwrap_or_else(|p| p.into_inner()).take();
}
