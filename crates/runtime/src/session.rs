//! Process sessions: a process started in a sandbox, independent of any client stream. Its events go to a
//! bounded replay buffer with increasing sequence numbers, so a client can detach and re-attach (`after_seq`).
//!
//! Memory is bounded and nothing is lost silently:
//! - while a reader is attached and falls behind by more than [`PAUSE_AT`] bytes, the agent is told to stop
//!   reading the process's output (the process then blocks on its own full pipe) until the reader catches up
//!   to [`RESUME_AT`];
//! - the buffer keeps at most [`REPLAY_BYTES`] of already-delivered output for re-attachment (more while a
//!   reader still has to consume it); a re-attach asking for output older than what is kept gets an explicit
//!   `output_truncated` error naming the oldest sequence number still available.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use compute_agent_protocol::{Frame, Kind};
use tokio::sync::{mpsc, Notify};

/// Already-delivered output kept for re-attachment, per session.
pub const REPLAY_BYTES: usize = 8 * 1024 * 1024;
/// Undelivered bytes at which the process's output is paused.
pub const PAUSE_AT: usize = 4 * 1024 * 1024;
/// Undelivered bytes at which it resumes.
pub const RESUME_AT: usize = 1024 * 1024;

/// How the process was asked to run: exactly what the agent is sent.
pub use compute_agent_protocol::Spawn as ExecSpec;

/// Which stream output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
    /// The PTY (stdout and stderr together).
    Pty,
}

/// Something that happened to the process, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// Output.
    Output(StreamKind, Bytes),
    /// The process ended.
    Exited {
        /// Exit code.
        code: Option<i32>,
        /// Killing signal.
        signal: Option<i32>,
    },
    /// The process was killed because its timeout passed.
    TimedOut {
        /// Exit code.
        code: Option<i32>,
        /// Killing signal.
        signal: Option<i32>,
    },
    /// The process could not be started.
    Failed(String),
}

impl SessionEvent {
    fn size(&self) -> usize {
        match self {
            SessionEvent::Output(_, d) => d.len(),
            _ => 64,
        }
    }

    fn is_final(&self) -> bool {
        !matches!(self, SessionEvent::Output(..))
    }
}

/// The process's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    /// Starting or running.
    Running,
    /// Exited.
    Exited {
        /// Exit code.
        code: Option<i32>,
        /// Killing signal.
        signal: Option<i32>,
    },
    /// Killed by its timeout.
    TimedOut {
        /// Exit code.
        code: Option<i32>,
        /// Killing signal.
        signal: Option<i32>,
    },
    /// Never started.
    Failed,
}

struct State {
    events: VecDeque<(u64, SessionEvent)>,
    next_seq: u64,
    bytes: usize,
    /// Highest seq the attached reader has taken (0: none).
    delivered: u64,
    readers: usize,
    paused: bool,
    status: ProcessState,
    pid: Option<i32>,
}

/// One process session.
pub struct Session {
    id: String,
    channel: u32,
    spec: ExecSpec,
    created_at_ms: i64,
    state: Mutex<State>,
    changed: Notify,
    to_agent: mpsc::Sender<Frame>,
}

impl Session {
    pub(crate) fn new(id: String, channel: u32, spec: ExecSpec, to_agent: mpsc::Sender<Frame>) -> Arc<Self> {
        Arc::new(Self {
            id,
            channel,
            spec,
            created_at_ms: now_ms(),
            state: Mutex::new(State {
                events: VecDeque::new(),
                next_seq: 1,
                bytes: 0,
                delivered: 0,
                readers: 0,
                paused: false,
                status: ProcessState::Running,
                pid: None,
            }),
            changed: Notify::new(),
            to_agent,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session id clients use.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// How it was started.
    pub fn spec(&self) -> &ExecSpec {
        &self.spec
    }

    /// When it was created, ms since the epoch.
    pub fn created_at_ms(&self) -> i64 {
        self.created_at_ms
    }

    /// Its current state.
    pub fn status(&self) -> ProcessState {
        self.lock().status
    }

    /// Its pid inside the sandbox, once started.
    pub fn pid(&self) -> Option<i32> {
        self.lock().pid
    }

    pub(crate) fn set_pid(&self, pid: i32) {
        self.lock().pid = Some(pid);
    }

    /// Records an event (from the agent's reader).
    pub(crate) fn push(&self, event: SessionEvent) {
        let mut pause = false;
        {
            let mut st = self.lock();
            if !matches!(st.status, ProcessState::Running) {
                return; // nothing after the end
            }
            match &event {
                SessionEvent::Exited { code, signal } => {
                    st.status = ProcessState::Exited { code: *code, signal: *signal }
                }
                SessionEvent::TimedOut { code, signal } => {
                    st.status = ProcessState::TimedOut { code: *code, signal: *signal }
                }
                SessionEvent::Failed(_) => st.status = ProcessState::Failed,
                SessionEvent::Output(..) => {}
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            st.bytes += event.size();
            st.events.push_back((seq, event));
            // Trim delivered history beyond the replay budget (never what a reader still has to take).
            while st.bytes > REPLAY_BYTES {
                let front_seq = st.events.front().map(|(s, _)| *s).unwrap_or(u64::MAX);
                if st.readers > 0 && front_seq > st.delivered {
                    break;
                }
                if let Some((_, e)) = st.events.pop_front() {
                    st.bytes -= e.size();
                }
            }
            if st.readers > 0 && !st.paused && undelivered(&st) > PAUSE_AT {
                st.paused = true;
                pause = true;
            }
        }
        if pause {
            self.send_control(Kind::Pause);
        }
        self.changed.notify_waiters();
    }

    fn send_control(&self, kind: Kind) {
        let frame = Frame::data(kind, self.channel, Vec::new());
        if let Err(mpsc::error::TrySendError::Full(frame)) = self.to_agent.try_send(frame) {
            let tx = self.to_agent.clone();
            tokio::spawn(async move {
                let _ = tx.send(frame).await;
            });
        }
    }

    /// Sends stdin bytes to the process.
    pub async fn write_stdin(&self, data: Vec<u8>) -> bool {
        self.to_agent.send(Frame::data(Kind::Stdin, self.channel, data)).await.is_ok()
    }

    /// Closes the process's stdin.
    pub async fn close_stdin(&self) -> bool {
        self.to_agent.send(Frame::data(Kind::StdinEof, self.channel, Vec::new())).await.is_ok()
    }

    /// Signals the process group.
    pub async fn signal(&self, signal: i32) -> bool {
        let f = Frame::json(Kind::Signal, self.channel, &compute_agent_protocol::Signal { signal });
        self.to_agent.send(f).await.is_ok()
    }

    /// Resizes the PTY.
    pub async fn resize(&self, cols: u16, rows: u16) -> bool {
        let f = Frame::json(Kind::Resize, self.channel, &compute_agent_protocol::Resize { cols, rows });
        self.to_agent.send(f).await.is_ok()
    }

    /// Starts reading events after `after_seq` (0: from the beginning).
    pub fn attach(self: &Arc<Self>, after_seq: u64) -> SessionReader {
        let mut st = self.lock();
        st.readers += 1;
        st.delivered = after_seq;
        drop(st);
        SessionReader { session: self.clone(), cursor: after_seq, done: false }
    }

    /// Whether the process has ended.
    pub fn finished(&self) -> bool {
        !matches!(self.lock().status, ProcessState::Running)
    }
}

fn undelivered(st: &State) -> usize {
    st.events.iter().rev().take_while(|(s, _)| *s > st.delivered).map(|(_, e)| e.size()).sum()
}

/// Reads one session's events in order. Dropping it detaches.
pub struct SessionReader {
    session: Arc<Session>,
    cursor: u64,
    done: bool,
}

/// What a reader gets.
#[derive(Debug)]
pub enum ReadItem {
    /// The next event and its sequence number.
    Event(u64, SessionEvent),
    /// Output between the cursor and `oldest` is no longer kept.
    Truncated {
        /// The oldest sequence number still available.
        oldest: u64,
    },
}

impl SessionReader {
    /// The next event; `None` after the final one.
    pub async fn next(&mut self) -> Option<ReadItem> {
        if self.done {
            return None;
        }
        loop {
            let notified = self.session.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut resume = false;
            let item = {
                let mut st = self.session.lock();
                let oldest = st.events.front().map(|(s, _)| *s).unwrap_or(st.next_seq);
                if self.cursor + 1 < oldest {
                    self.cursor = oldest - 1;
                    Some(ReadItem::Truncated { oldest })
                } else if let Some((seq, ev)) = st.events.iter().find(|(s, _)| *s > self.cursor).cloned() {
                    self.cursor = seq;
                    st.delivered = st.delivered.max(seq);
                    if ev.is_final() {
                        self.done = true;
                    }
                    if st.paused && undelivered(&st) <= RESUME_AT {
                        st.paused = false;
                        resume = true;
                    }
                    Some(ReadItem::Event(seq, ev))
                } else {
                    None
                }
            };
            if resume {
                self.session.send_control(Kind::Resume);
            }
            if let Some(item) = item {
                return Some(item);
            }
            notified.await;
        }
    }

    /// The last sequence number handed out.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }
}

impl Drop for SessionReader {
    fn drop(&mut self) {
        let resume = {
            let mut st = self.session.lock();
            st.readers = st.readers.saturating_sub(1);
            // Nobody to wait for: let the process run; history beyond the budget will be trimmed.
            let r = st.readers == 0 && st.paused;
            if r {
                st.paused = false;
            }
            r
        };
        if resume {
            self.session.send_control(Kind::Resume);
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> (Arc<Session>, mpsc::Receiver<Frame>) {
        let (tx, rx) = mpsc::channel(64);
        (Session::new("s".into(), 7, ExecSpec::default(), tx), rx)
    }

    fn out(n: usize) -> SessionEvent {
        SessionEvent::Output(StreamKind::Stdout, Bytes::from(vec![b'x'; n]))
    }

    #[tokio::test]
    async fn events_have_increasing_seq_and_end_with_the_exit() {
        let (s, _rx) = session();
        let mut r = s.attach(0);
        s.push(out(3));
        s.push(SessionEvent::Exited { code: Some(0), signal: None });
        s.push(out(1)); // after the end: ignored
        let mut seqs = Vec::new();
        while let Some(ReadItem::Event(seq, ev)) = r.next().await {
            seqs.push((seq, ev.is_final()));
        }
        assert_eq!(seqs, [(1, false), (2, true)]);
        assert_eq!(s.status(), ProcessState::Exited { code: Some(0), signal: None });
    }

    #[tokio::test]
    async fn reattach_replays_after_seq() {
        let (s, _rx) = session();
        for _ in 0..5 {
            s.push(out(1));
        }
        let mut r = s.attach(3);
        match r.next().await {
            Some(ReadItem::Event(4, _)) => {}
            other => panic!("expected seq 4, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_slow_reader_pauses_the_process_and_resumes_it() {
        let (s, mut rx) = session();
        let mut r = s.attach(0);
        let chunk = 64 * 1024;
        for _ in 0..(PAUSE_AT / chunk + 2) {
            s.push(out(chunk));
        }
        let pause = rx.try_recv().expect("a pause was sent");
        assert_eq!((pause.kind, pause.channel), (Kind::Pause, 7));
        // Nothing was dropped: the reader gets every byte, then the process resumes.
        let mut got = 0;
        for _ in 0..(PAUSE_AT / chunk + 2) {
            if let Some(ReadItem::Event(_, SessionEvent::Output(_, d))) = r.next().await {
                got += d.len();
            }
        }
        assert_eq!(got, (PAUSE_AT / chunk + 2) * chunk);
        assert_eq!(rx.try_recv().expect("a resume was sent").kind, Kind::Resume);
    }

    #[tokio::test]
    async fn detached_history_is_bounded_and_truncation_is_reported() {
        let (s, _rx) = session();
        let chunk = 1024 * 1024;
        for _ in 0..(REPLAY_BYTES / chunk * 2) {
            s.push(out(chunk));
        }
        let kept: usize = s.lock().bytes;
        assert!(kept <= REPLAY_BYTES, "kept {kept} bytes");
        let mut r = s.attach(0);
        match r.next().await {
            Some(ReadItem::Truncated { oldest }) => assert!(oldest > 1),
            other => panic!("expected a truncation notice, got {other:?}"),
        }
        assert!(matches!(r.next().await, Some(ReadItem::Event(..))));
    }
}
