//! `chalk.sandbox.v2.SandboxProcessService`: exec (unary), sessions over a bidirectional stream, and session
//! inspection. A session outlives its stream; a client re-attaches with `after_seq` and gets what it missed.

use std::pin::Pin;
use std::sync::Arc;

use compute_control::{Principal, Workloads};
use compute_proto::chalk::sandbox::v2::open_session_request::Command;
use compute_proto::chalk::sandbox::v2::open_session_response::Event;
use compute_proto::chalk::sandbox::v2::sandbox_process_service_server::SandboxProcessService;
use compute_proto::chalk::sandbox::v2::*;
use compute_runtime::{ExecSpec, ProcessState, ReadItem, Session, SessionEvent, StreamKind};
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::principal;
use crate::status::from_control;

/// The SandboxProcessService handler.
pub struct ProcessApi {
    workloads: Arc<Workloads>,
    max_output: usize,
}

impl ProcessApi {
    /// A handler over `workloads`; unary exec output is capped at `max_output` bytes.
    pub fn new(workloads: Arc<Workloads>, max_output: usize) -> Self {
        Self { workloads, max_output }
    }
}

fn duration_ms(d: &Option<prost_types::Duration>, field: &str) -> Result<Option<u64>, Status> {
    match d {
        None => Ok(None),
        Some(d) if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) => {
            Err(Status::invalid_argument(format!("{field} must be positive")))
        }
        Some(d) => Ok(Some(d.seconds as u64 * 1000 + d.nanos as u64 / 1_000_000)),
    }
}

fn env_vec(map: std::collections::BTreeMap<String, String>) -> Vec<(String, String)> {
    map.into_iter().collect()
}

fn pty_size(p: &Option<PtyInfo>) -> Option<(u16, u16)> {
    p.as_ref().map(|p| (p.cols.clamp(1, 10_000) as u16, p.rows.clamp(1, 10_000) as u16))
}

fn status_of(s: ProcessState) -> ProcessStatus {
    match s {
        ProcessState::Running => ProcessStatus {
            state: compute_proto::chalk::sandbox::v2::ProcessState::Running as i32,
            exit_code: None,
            signal: None,
        },
        ProcessState::Exited { code, signal } => ProcessStatus {
            state: compute_proto::chalk::sandbox::v2::ProcessState::Exited as i32,
            exit_code: code,
            signal,
        },
        ProcessState::TimedOut { code, signal } => ProcessStatus {
            state: compute_proto::chalk::sandbox::v2::ProcessState::TimedOut as i32,
            exit_code: code,
            signal,
        },
        ProcessState::Failed => ProcessStatus {
            state: compute_proto::chalk::sandbox::v2::ProcessState::Failed as i32,
            exit_code: None,
            signal: None,
        },
    }
}

fn session_info(sandbox_id: &str, s: &Session) -> SessionInfo {
    let spec = s.spec();
    SessionInfo {
        session_id: s.id().to_string(),
        new_process: Some(NewProcess {
            sandbox_id: sandbox_id.to_string(),
            command: spec.command.clone(),
            args: spec.args.clone(),
            workdir: spec.workdir.clone(),
            env_vars: spec.env.iter().cloned().collect(),
            timeout: spec.timeout_ms.map(|ms| prost_types::Duration {
                seconds: (ms / 1000) as i64,
                nanos: ((ms % 1000) * 1_000_000) as i32,
            }),
            pty_info: spec.pty.map(|(cols, rows)| PtyInfo { cols: cols.into(), rows: rows.into() }),
        }),
        process_status: Some(status_of(s.status())),
    }
}

fn event_of(ev: SessionEvent) -> Event {
    match ev {
        SessionEvent::Output(kind, data) => Event::OutputData(OutputData {
            stream: match kind {
                StreamKind::Stdout => output_data::Stream::Stdout,
                StreamKind::Stderr => output_data::Stream::Stderr,
                StreamKind::Pty => output_data::Stream::PtyOutput,
            } as i32,
            data: data.to_vec(),
        }),
        SessionEvent::Exited { code, signal } => Event::ProcessExited(ProcessExited { exit_code: code, signal }),
        SessionEvent::TimedOut { code, signal } => Event::ProcessTimedOut(ProcessTimedOut { exit_code: code, signal }),
        SessionEvent::Failed(message) => Event::ProcessFailed(ProcessFailed { message }),
    }
}

fn resp(event: Event, seq: u64) -> OpenSessionResponse {
    OpenSessionResponse { event: Some(event), seq }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<OpenSessionResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SandboxProcessService for ProcessApi {
    async fn exec_command(&self, req: Request<ExecCommandRequest>) -> Result<Response<ExecCommandResponse>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        if r.sandbox_id.is_empty() {
            return Err(Status::invalid_argument("sandbox_id is required"));
        }
        let spec = ExecSpec {
            command: r.command,
            args: r.args,
            workdir: r.workdir.filter(|w| !w.is_empty()),
            env: env_vec(r.env_vars),
            timeout_ms: duration_ms(&r.timeout, "timeout")?,
            pty: None,
            user: None,
        };
        let session = self.workloads.exec(&who, &r.sandbox_id, spec).await.map_err(from_control)?;
        let mut reader = session.attach(0);
        if let Some(stdin) = r.stdin.filter(|s| !s.is_empty()) {
            session.write_stdin(stdin).await;
        }
        session.close_stdin().await;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut exit_code = 0;
        while let Some(item) = reader.next().await {
            match item {
                ReadItem::Event(_, SessionEvent::Output(kind, data)) => {
                    if stdout.len() + stderr.len() + data.len() > self.max_output {
                        session.signal(9).await;
                        return Err(Status::resource_exhausted(format!(
                            "the command's output exceeded {} bytes, the most a unary exec returns; the process was \
                             killed. Stream large output with exec_stream (OpenSession) instead",
                            self.max_output
                        )));
                    }
                    match kind {
                        StreamKind::Stderr => stderr.extend_from_slice(&data),
                        _ => stdout.extend_from_slice(&data),
                    }
                }
                ReadItem::Event(_, SessionEvent::Exited { code, signal }) => {
                    exit_code = code.unwrap_or(128 + signal.unwrap_or(0));
                }
                ReadItem::Event(_, SessionEvent::TimedOut { .. }) => {
                    stderr.extend_from_slice(b"\n[compute] the command was killed: its timeout passed\n");
                    exit_code = 124;
                }
                ReadItem::Event(_, SessionEvent::Failed(message)) => {
                    stderr.extend_from_slice(message.as_bytes());
                    stderr.push(b'\n');
                    exit_code = 127;
                }
                ReadItem::Truncated { .. } => {
                    return Err(Status::data_loss("output was lost while collecting it"));
                }
            }
        }
        Ok(Response::new(ExecCommandResponse { stdout, stderr, exit_code }))
    }

    async fn open_session(&self, req: Request<Streaming<OpenSessionRequest>>) -> Result<Response<EventStream>, Status> {
        let who = principal(&req)?.clone();
        let mut incoming = req.into_inner();
        let first = match incoming.next().await {
            Some(Ok(m)) => m,
            Some(Err(s)) => return Err(s),
            None => return Err(Status::invalid_argument("the stream ended before new_process or attach_session")),
        };
        let (sandbox_id, session, after_seq) = match first.command {
            Some(Command::NewProcess(np)) => {
                if np.sandbox_id.is_empty() {
                    return Err(Status::invalid_argument("new_process.sandbox_id is required"));
                }
                let spec = ExecSpec {
                    command: np.command,
                    args: np.args,
                    workdir: np.workdir.filter(|w| !w.is_empty()),
                    env: env_vec(np.env_vars),
                    timeout_ms: duration_ms(&np.timeout, "new_process.timeout")?,
                    pty: pty_size(&np.pty_info),
                    user: None,
                };
                let s = self.workloads.exec(&who, &np.sandbox_id, spec).await.map_err(from_control)?;
                (np.sandbox_id, s, 0)
            }
            Some(Command::AttachSession(a)) => {
                let s = self.workloads.session(&who, &a.sandbox_id, &a.session_id).map_err(from_control)?;
                if let Some((cols, rows)) = pty_size(&a.pty_info) {
                    s.resize(cols, rows).await;
                }
                (a.sandbox_id, s, a.after_seq.unwrap_or(0))
            }
            _ => return Err(Status::invalid_argument("the first message must be new_process or attach_session")),
        };
        let (tx, rx) = mpsc::channel::<Result<OpenSessionResponse, Status>>(32);
        let _ = tx
            .send(Ok(resp(Event::SessionAttached(SessionAttached { session_id: session.id().to_string() }), 0)))
            .await;
        tokio::spawn(serve_session(who, sandbox_id, session, after_seq, incoming, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_session(&self, req: Request<GetSessionRequest>) -> Result<Response<GetSessionResponse>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        let s = self.workloads.session(&who, &r.sandbox_id, &r.session_id).map_err(from_control)?;
        Ok(Response::new(GetSessionResponse { session: Some(session_info(&r.sandbox_id, &s)) }))
    }

    async fn list_sessions(&self, req: Request<ListSessionsRequest>) -> Result<Response<ListSessionsResponse>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        let sessions = self.workloads.sessions(&who, &r.sandbox_id).map_err(from_control)?;
        Ok(Response::new(ListSessionsResponse {
            sessions: sessions.iter().map(|s| session_info(&r.sandbox_id, s)).collect(),
        }))
    }
}

/// Pumps a session's events to the client and the client's requests to the session, until the process ends,
/// the client detaches, or the client goes away (the session lives on).
async fn serve_session(
    _who: Principal,
    _sandbox_id: String,
    session: Arc<Session>,
    after_seq: u64,
    mut incoming: Streaming<OpenSessionRequest>,
    tx: mpsc::Sender<Result<OpenSessionResponse, Status>>,
) {
    let mut reader = session.attach(after_seq);
    let mut client_open = true;
    loop {
        tokio::select! {
            item = reader.next() => {
                let Some(item) = item else { break };
                let msg = match item {
                    ReadItem::Event(seq, ev) => resp(event_of(ev), seq),
                    ReadItem::Truncated { oldest } => resp(Event::Error(SessionError {
                        code: "output_truncated".into(),
                        message: format!(
                            "output before sequence {oldest} is no longer kept (the session was detached while it \
                             produced more than {} bytes); re-attach with after_seq >= {}",
                            compute_runtime::session_replay_bytes(), oldest - 1
                        ),
                    }), 0),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return; // client gone; the session continues
                }
            }
            req = incoming.next(), if client_open => {
                match req {
                    Some(Ok(m)) => match m.command {
                        Some(Command::StdinData(d)) => { session.write_stdin(d.data).await; }
                        Some(Command::StdinEof(_)) => { session.close_stdin().await; }
                        Some(Command::Signal(s)) => {
                            if !(1..=64).contains(&s.signal) {
                                let _ = tx.send(Ok(resp(Event::Error(SessionError { code: "invalid_argument".into(), message: format!("signal {} is not a valid signal number (1-64)", s.signal) }), 0))).await;
                            } else {
                                session.signal(s.signal).await;
                            }
                        }
                        Some(Command::ResizePty(r)) => { session.resize(r.cols.clamp(1, 10_000) as u16, r.rows.clamp(1, 10_000) as u16).await; }
                        Some(Command::GetProcessStatus(_)) => {
                            let _ = tx.send(Ok(resp(Event::ProcessStatus(status_of(session.status())), 0))).await;
                        }
                        Some(Command::DetachSession(_)) => {
                            let _ = tx.send(Ok(resp(Event::SessionDetached(SessionDetached {}), 0))).await;
                            return;
                        }
                        Some(Command::NewProcess(_)) | Some(Command::AttachSession(_)) | None => {
                            let _ = tx.send(Ok(resp(Event::Error(SessionError { code: "invalid_argument".into(), message: "this stream is already attached to a session".into() }), 0))).await;
                        }
                    },
                    // The client closed its side (or broke it): keep sending output until the process ends.
                    Some(Err(_)) | None => client_open = false,
                }
            }
        }
    }
}
