//! The protocol between the runtime (host side) and the agent (PID 1 inside every sandbox).
//!
//! The agent's stdin and stdout carry it, because a pair of inherited pipes works the same under every
//! isolation backend (native namespaces, runsc, later a Kubernetes pod's attach stream). Each frame is
//!
//! ```text
//! u32 little-endian: length of what follows (kind + channel + payload)
//! u8:  kind
//! u32 little-endian: channel (a process session, or a file transfer)
//! payload
//! ```
//!
//! Control frames carry JSON payloads ([`Spawn`], [`Exit`], ...); data frames carry raw bytes. The agent
//! sends a process's output only while the host has not paused that channel, so the host bounds its memory
//! by pausing a channel whose reader fell behind; the process then blocks on its own full pipe, and nothing is
//! lost.

#![warn(missing_docs)]

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

/// Size of the data chunks the agent reads from a process or a file.
pub const CHUNK: usize = 64 * 1024;

/// Channel 0 is the sandbox's entrypoint process.
pub const ENTRYPOINT_CHANNEL: u32 = 0;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    // host -> agent
    /// JSON [`Spawn`]: start a process on this channel.
    Spawn = 1,
    /// Bytes for the process's stdin (or PTY).
    Stdin = 2,
    /// Close the process's stdin.
    StdinEof = 3,
    /// JSON [`Signal`]: deliver a signal to the process group.
    Signal = 4,
    /// JSON [`Resize`]: resize the PTY.
    Resize = 5,
    /// Stop sending this channel's output until [`Kind::Resume`].
    Pause = 6,
    /// Resume sending this channel's output.
    Resume = 7,
    /// JSON [`FileWrite`]: open a file for writing; [`Kind::FileData`] frames follow, then [`Kind::FileEnd`].
    FileWrite = 8,
    /// JSON [`FileRead`]: send a file's bytes as [`Kind::FileData`] frames, then [`Kind::FileOk`] (or
    /// [`Kind::FileFailed`]). The agent sends no more bytes than the host has granted: the request's
    /// [`FileRead::window`], then whatever each [`Kind::FileCredit`] adds.
    FileRead = 9,
    /// File bytes (both directions).
    FileData = 10,
    /// End of a file transfer (both directions).
    FileEnd = 11,
    /// JSON [`Shutdown`]: terminate every process (SIGTERM, then SIGKILL after the grace period) and exit.
    Shutdown = 12,
    /// JSON [`Credit`]: the host has room for this many more bytes of the download on this channel.
    FileCredit = 13,
    /// Stop the download on this channel now (its reader went away); the agent closes the file and sends nothing
    /// more on the channel.
    FileCancel = 14,

    // agent -> host
    /// JSON [`Hello`]: the agent is up and serving.
    Ready = 64,
    /// JSON [`Spawned`]: the process started.
    Spawned = 65,
    /// JSON [`Failure`]: the process could not be started.
    SpawnFailed = 66,
    /// Process stdout bytes.
    Stdout = 67,
    /// Process stderr bytes.
    Stderr = 68,
    /// PTY output bytes.
    PtyOutput = 69,
    /// JSON [`Exit`]: the process ended (after all its output was sent).
    Exited = 70,
    /// JSON [`FileDone`]: a file transfer succeeded.
    FileOk = 71,
    /// JSON [`Failure`]: a file transfer failed.
    FileFailed = 72,
    /// JSON [`Failure`]: a request on this channel was malformed or refused.
    Error = 73,
}

impl Kind {
    /// The kind for a wire byte.
    pub fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Spawn,
            2 => Stdin,
            3 => StdinEof,
            4 => Signal,
            5 => Resize,
            6 => Pause,
            7 => Resume,
            8 => FileWrite,
            9 => FileRead,
            10 => FileData,
            11 => FileEnd,
            12 => Shutdown,
            13 => FileCredit,
            14 => FileCancel,
            64 => Ready,
            65 => Spawned,
            66 => SpawnFailed,
            67 => Stdout,
            68 => Stderr,
            69 => PtyOutput,
            70 => Exited,
            71 => FileOk,
            72 => FileFailed,
            73 => Error,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it is.
    pub kind: Kind,
    /// Which session or transfer it belongs to.
    pub channel: u32,
    /// JSON or raw bytes, by kind.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame with a JSON payload.
    pub fn json<T: Serialize>(kind: Kind, channel: u32, value: &T) -> Frame {
        Frame { kind, channel, payload: serde_json::to_vec(value).expect("protocol messages serialize") }
    }

    /// A frame with raw bytes.
    pub fn data(kind: Kind, channel: u32, payload: Vec<u8>) -> Frame {
        Frame { kind, channel, payload }
    }

    /// Decodes the JSON payload.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> io::Result<T> {
        serde_json::from_slice(&self.payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad {:?} payload: {e}", self.kind)))
    }

    /// Encodes the frame into `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let len = 1 + 4 + self.payload.len();
        out.reserve(4 + len);
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.channel.to_le_bytes());
        out.extend_from_slice(&self.payload);
    }

    /// Writes the frame to `w` (one `write_all`, so frames from one writer never interleave).
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let mut buf = Vec::with_capacity(9 + self.payload.len());
        self.encode(&mut buf);
        w.write_all(&buf)
    }

    /// Reads one frame; `Ok(None)` at a clean end of stream.
    pub fn read_from(r: &mut impl Read) -> io::Result<Option<Frame>> {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes(len) as usize;
        if !(5..=MAX_FRAME + 5).contains(&len) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame length {len} out of range")));
        }
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf)?;
        Self::decode_body(buf).map(Some)
    }

    /// Decodes a frame body (everything after the length prefix).
    pub fn decode_body(mut buf: Vec<u8>) -> io::Result<Frame> {
        if buf.len() < 5 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "frame shorter than its header"));
        }
        let kind = Kind::from_u8(buf[0])
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unknown frame kind {}", buf[0])))?;
        let channel = u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]);
        buf.drain(..5);
        Ok(Frame { kind, channel, payload: buf })
    }
}

/// Start a process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spawn {
    /// Program (looked up in `PATH` when it has no slash).
    pub command: String,
    /// Arguments after the program.
    pub args: Vec<String>,
    /// Working directory; the image's when absent.
    pub workdir: Option<String>,
    /// Extra environment, over the sandbox's.
    pub env: Vec<(String, String)>,
    /// Kill the process group after this many milliseconds and report a timeout.
    pub timeout_ms: Option<u64>,
    /// Run on a PTY of this size (cols, rows) instead of pipes.
    pub pty: Option<(u16, u16)>,
    /// Run as this user (`name`, `uid`, `name:group` or `uid:gid`, resolved in the sandbox's `/etc/passwd` and
    /// `/etc/group`); the sandbox's default user when absent.
    #[serde(default)]
    pub user: Option<String>,
}

/// Deliver a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    /// Signal number.
    pub signal: i32,
}

/// Resize a PTY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

/// Open a file for writing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWrite {
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Permission bits; 0644 when absent.
    pub mode: Option<u32>,
}

/// Read a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRead {
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Bytes the agent may send before it waits for [`Kind::FileCredit`]; unlimited when absent.
    #[serde(default)]
    pub window: Option<u64>,
}

/// More room for a download.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    /// Bytes added to the channel's window.
    pub bytes: u64,
}

/// Largest download the agent sends of a file that reports no size (`/proc`, `/sys`): such files have no end the
/// agent can know in advance, so it stops here and says why.
pub const UNSIZED_FILE_LIMIT: u64 = 16 * 1024 * 1024;

/// A finished file transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDone {
    /// Bytes written or read.
    pub bytes: u64,
}

/// Terminate everything and exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shutdown {
    /// Milliseconds between SIGTERM and SIGKILL.
    pub grace_ms: u64,
}

/// The agent is serving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Agent version.
    pub version: String,
}

/// A started process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spawned {
    /// Its pid inside the sandbox.
    pub pid: i32,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal, when a signal killed it.
    pub signal: Option<i32>,
    /// Whether the agent killed it because its timeout passed.
    pub timed_out: bool,
}

/// What kind of failure a [`Failure`] is; the host maps it to a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The path or program does not exist.
    NotFound,
    /// The sandbox's permissions refuse it.
    PermissionDenied,
    /// A file was expected and the path is a directory.
    IsADirectory,
    /// A directory was expected and a path component is not one.
    NotADirectory,
    /// Only regular files can be transferred, and this is a device, FIFO or socket.
    NotARegularFile,
    /// The request itself is malformed.
    Invalid,
    /// The sandbox's disk is full.
    NoSpace,
    /// The file is larger than the agent sends (see [`UNSIZED_FILE_LIMIT`]).
    TooLarge,
    /// Any other I/O failure (and any kind a newer agent names that this host does not know).
    #[serde(other)]
    Io,
}

/// Why something failed, with a kind the host maps to a status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// Human message naming what failed.
    pub message: String,
    /// The POSIX errno, when an OS call failed.
    #[serde(default)]
    pub errno: Option<i32>,
}

impl Failure {
    /// A failure of `kind` with no errno.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure { kind, message: message.into(), errno: None }
    }

    /// A failure of `kind` that the SDK reports with this POSIX errno.
    pub fn with_errno(kind: FailureKind, message: impl Into<String>, errno: i32) -> Failure {
        Failure { kind, message: message.into(), errno: Some(errno) }
    }

    /// A failure from an I/O error about `what`.
    pub fn from_io(what: &str, e: &io::Error) -> Failure {
        let kind = match (e.kind(), e.raw_os_error()) {
            (io::ErrorKind::NotFound, _) => FailureKind::NotFound,
            (io::ErrorKind::PermissionDenied, _) => FailureKind::PermissionDenied,
            (io::ErrorKind::InvalidInput, _) => FailureKind::Invalid,
            (_, Some(21)) => FailureKind::IsADirectory,
            (_, Some(20)) => FailureKind::NotADirectory,
            (_, Some(28)) => FailureKind::NoSpace,
            _ => FailureKind::Io,
        };
        Failure { kind, message: format!("{what}: {e}"), errno: e.raw_os_error() }
    }
}

/// How the agent sets up a sandbox when it is started on the host by the native backend (`compute-agent init`).
/// Everything is prepared by the runtime beforehand (root filesystem mounted, cgroups and network namespace
/// created); the agent joins and enters them, then becomes the sandbox's PID 1.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootConfig {
    /// The mounted root filesystem (overlay) on the host.
    pub rootfs: String,
    /// Host name inside the sandbox.
    pub hostname: String,
    /// Network namespace to join (a bind-mounted nsfs file); a fresh empty one when absent.
    pub netns: Option<String>,
    /// `cgroup.procs` files to add the sandbox to before anything else runs.
    pub cgroup_procs: Vec<String>,
    /// `cgroup.procs` files every process the agent starts moves itself into (where the limits apply).
    #[serde(default)]
    pub workload_cgroup_procs: Vec<String>,
    /// Extra bind mounts: (host source, path inside the sandbox, read-only).
    pub binds: Vec<(String, String, bool)>,
    /// Inherited descriptors of ready-made detached mounts (id-mapped, read-only as asked) for `binds`, in the
    /// same order; a bind without one is bound from its host path.
    #[serde(default)]
    pub bind_fds: Vec<Option<i32>>,
    /// An inherited descriptor of the user namespace the sandbox runs in, as its root; none runs it as host root.
    #[serde(default)]
    pub userns_fd: Option<i32>,
    /// Apply the seccomp deny-list and drop capabilities (disable only to debug).
    pub harden: bool,
    /// The sandbox's environment for every process (image env, then spec env).
    pub env: Vec<(String, String)>,
    /// Default working directory.
    pub workdir: String,
    /// The entrypoint, started on channel [`ENTRYPOINT_CHANNEL`]; none for an idle sandbox.
    pub entrypoint: Option<Spawn>,
    /// The user processes run as unless their spawn names one (the image's `USER`); root when absent.
    #[serde(default)]
    pub user: Option<String>,
}

/// What the agent needs when it is already PID 1 inside a sandbox (gVisor): the same, minus the setup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServeConfig {
    /// The sandbox's environment for every process.
    pub env: Vec<(String, String)>,
    /// Default working directory.
    pub workdir: String,
    /// The entrypoint, if any.
    pub entrypoint: Option<Spawn>,
    /// The default user of processes.
    #[serde(default)]
    pub user: Option<String>,
    /// Limits the host enforces on the sandbox, for the agent to show in the sandbox's own cgroup filesystem
    /// (gVisor emulates one; its values would otherwise read as unlimited).
    #[serde(default)]
    pub visible_limits: Option<VisibleLimits>,
}

/// The limits a sandbox's processes should see in `/sys/fs/cgroup`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisibleLimits {
    /// `memory.limit_in_bytes`.
    pub memory_bytes: Option<u64>,
    /// `cpu.cfs_quota_us` over a period of `cpu.cfs_period_us`.
    pub cpu_quota_us: Option<u64>,
    /// `cpu.cfs_period_us`.
    pub cpu_period_us: u64,
    /// The sandbox's pids limit (enforced inside, on the workload's processes only: see the agent's `limits`).
    pub pids_max: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_kinds_travel_as_snake_case_and_an_unknown_one_reads_as_io() {
        let f = Failure::new(FailureKind::NotARegularFile, "x");
        let json = serde_json::to_string(&f).unwrap();
        assert!(json.contains("\"not_a_regular_file\""), "{json}");
        assert_eq!(serde_json::from_str::<Failure>(&json).unwrap(), f);
        let newer: Failure = serde_json::from_str(r#"{"kind":"quota_exceeded","message":"m"}"#).unwrap();
        assert_eq!(newer.kind, FailureKind::Io);
        let old: FileRead = serde_json::from_str(r#"{"path":"/a"}"#).unwrap();
        assert_eq!(old.window, None, "a request without a window is unlimited");
    }

    #[test]
    fn frames_round_trip() {
        let frames = vec![
            Frame::json(
                Kind::Spawn,
                7,
                &Spawn { command: "echo".into(), args: vec!["hi".into()], ..Default::default() },
            ),
            Frame::data(Kind::Stdout, 7, b"hi\n".to_vec()),
            Frame::data(Kind::StdinEof, 7, Vec::new()),
            Frame::json(Kind::Exited, 7, &Exit { code: Some(0), signal: None, timed_out: false }),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        let mut r = wire.as_slice();
        let mut back = Vec::new();
        while let Some(f) = Frame::read_from(&mut r).unwrap() {
            back.push(f);
        }
        assert_eq!(back, frames);
        let spawn: Spawn = back[0].parse().unwrap();
        assert_eq!(spawn.args, ["hi"]);
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        for wire in [&[1u8, 0, 0, 0, 1][..], &[6, 0, 0, 0, 200, 0, 0, 0, 0, 0], &[255, 255, 255, 255]] {
            assert!(Frame::read_from(&mut &wire[..]).is_err(), "{wire:?}");
        }
        // Truncated frame: an error, not a clean end.
        assert!(Frame::read_from(&mut &[10u8, 0, 0, 0, 2][..]).is_err());
        assert!(Frame::read_from(&mut &[][..]).unwrap().is_none());
    }

    #[test]
    fn the_frame_limit_is_max_frame_bytes_of_payload() {
        let mut at_limit = Vec::new();
        Frame::data(Kind::Stdin, 1, vec![0; MAX_FRAME]).encode(&mut at_limit);
        assert_eq!(Frame::read_from(&mut &at_limit[..]).unwrap().unwrap().payload.len(), MAX_FRAME);
        let mut past = Vec::new();
        Frame::data(Kind::Stdin, 1, vec![0; MAX_FRAME + 1]).encode(&mut past);
        let e = Frame::read_from(&mut &past[..]).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
    }
}
