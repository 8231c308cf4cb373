//! File transfer: uploads arrive as FileWrite, FileData..., FileEnd; downloads go out as FileData..., FileOk,
//! never more bytes ahead than the host's window allows, and stop when the host cancels them.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use compute_agent_protocol::{Failure, FailureKind, FileDone, FileWrite, Frame, Kind, CHUNK, UNSIZED_FILE_LIMIT};

use crate::server::Out;

enum Upload {
    Open { file: File, bytes: u64, path: String },
    Failed,
}

/// Uploads in progress, by channel.
#[derive(Default)]
pub struct Uploads {
    open: HashMap<u32, Upload>,
    failed: HashMap<u32, Failure>,
}

impl Uploads {
    /// Opens the destination, creating parent directories. A failure is reported now; the data that follows
    /// is dropped.
    pub fn begin(&mut self, ch: u32, req: &FileWrite, out: &Out) {
        match open_for_write(req) {
            Ok(file) => {
                self.open.insert(ch, Upload::Open { file, bytes: 0, path: req.path.clone() });
            }
            Err(f) => {
                out.send(Frame::json(Kind::FileFailed, ch, &f));
                self.open.insert(ch, Upload::Failed);
            }
        }
    }

    /// Appends data.
    pub fn data(&mut self, ch: u32, data: &[u8]) {
        if let Some(Upload::Open { file, bytes, path }) = self.open.get_mut(&ch) {
            if let Err(e) = file.write_all(data) {
                let f = Failure::from_io(&format!("writing {path}"), &e);
                self.open.insert(ch, Upload::Failed);
                self.failed.insert(ch, f);
                return;
            }
            *bytes += data.len() as u64;
        }
    }

    /// Finishes: flushes to the file and reports.
    pub fn end(&mut self, ch: u32, out: &Out) {
        match self.open.remove(&ch) {
            Some(Upload::Open { file, bytes, path }) => match file.sync_data() {
                Ok(()) => out.send(Frame::json(Kind::FileOk, ch, &FileDone { bytes })),
                Err(e) => {
                    out.send(Frame::json(Kind::FileFailed, ch, &Failure::from_io(&format!("writing {path}"), &e)))
                }
            },
            Some(Upload::Failed) => {
                if let Some(f) = self.failed.remove(&ch) {
                    out.send(Frame::json(Kind::FileFailed, ch, &f));
                }
            }
            None => out.send(Frame::json(
                Kind::FileFailed,
                ch,
                &Failure::new(FailureKind::Invalid, "no upload open on this channel"),
            )),
        }
    }
}

fn open_for_write(req: &FileWrite) -> Result<File, Failure> {
    let path = Path::new(&req.path);
    if !path.is_absolute() {
        let message = format!("destination {:?} must be an absolute path", req.path);
        return Err(Failure::with_errno(FailureKind::Invalid, message, libc::EINVAL));
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Failure::from_io(&format!("creating {}", parent.display()), &e))?;
    }
    if path.is_dir() {
        let message = format!("{} is a directory", req.path);
        return Err(Failure::with_errno(FailureKind::IsADirectory, message, libc::EISDIR));
    }
    let mode = req.mode.unwrap_or(0o644) & 0o7777;
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Failure::from_io(&format!("opening {}", req.path), &e))?;
    // The umask may have narrowed the mode at creation; an existing file keeps its old mode otherwise.
    let _ = file.set_permissions(std::fs::Permissions::from_mode(mode));
    Ok(file)
}

/// A download's flow-control window: the bytes the host still has room for, or that it has given up.
pub struct Window {
    state: Mutex<WindowState>,
    cv: Condvar,
}

struct WindowState {
    credit: u64,
    cancelled: bool,
}

impl Window {
    /// A window of `initial` bytes; unlimited when `None` (a host that does not ask for flow control).
    pub fn new(initial: Option<u64>) -> Arc<Window> {
        let state = WindowState { credit: initial.unwrap_or(u64::MAX), cancelled: false };
        Arc::new(Window { state: Mutex::new(state), cv: Condvar::new() })
    }

    /// The host made room for `bytes` more.
    pub fn grant(&self, bytes: u64) {
        let mut s = lock(&self.state);
        s.credit = s.credit.saturating_add(bytes);
        self.cv.notify_all();
    }

    /// The host's reader went away: the sender stops at its next step.
    pub fn cancel(&self) {
        lock(&self.state).cancelled = true;
        self.cv.notify_all();
    }

    /// Waits until there is room; how many bytes (at most `want`) may be sent now, or `None` once cancelled.
    fn room(&self, want: usize) -> Option<usize> {
        let mut s = lock(&self.state);
        while s.credit == 0 && !s.cancelled {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        (!s.cancelled).then(|| usize::try_from(s.credit).unwrap_or(usize::MAX).min(want))
    }

    fn spend(&self, bytes: usize) {
        let mut s = lock(&self.state);
        s.credit = s.credit.saturating_sub(bytes as u64);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Downloads in progress, by channel: the protocol loop feeds their windows, each sender thread reads its own.
#[derive(Clone, Default)]
pub struct Downloads(Arc<Mutex<HashMap<u32, Arc<Window>>>>);

impl Downloads {
    /// Registers a download on `ch` with the request's window.
    pub fn open(&self, ch: u32, window: Option<u64>) -> Arc<Window> {
        let w = Window::new(window);
        lock(&self.0).insert(ch, w.clone());
        w
    }

    /// Forgets `ch` (its sender finished).
    pub fn close(&self, ch: u32) {
        lock(&self.0).remove(&ch);
    }

    /// Adds credit to `ch`'s window; a finished download ignores it.
    pub fn grant(&self, ch: u32, bytes: u64) {
        if let Some(w) = lock(&self.0).get(&ch) {
            w.grant(bytes);
        }
    }

    /// Cancels `ch`'s download.
    pub fn cancel(&self, ch: u32) {
        if let Some(w) = lock(&self.0).remove(&ch) {
            w.cancel();
        }
    }
}

/// Sends a file's bytes on `ch` as the window allows, then FileOk (or FileFailed); nothing more once cancelled.
pub fn send_file(ch: u32, path: &str, window: &Window, out: &Out) {
    match read_out(ch, path, window, out) {
        Ok(Some(bytes)) => out.send(Frame::json(Kind::FileOk, ch, &FileDone { bytes })),
        Ok(None) => {}
        Err(f) => out.send(Frame::json(Kind::FileFailed, ch, &f)),
    }
}

/// Opens a file to download: a regular file, with the size it has now (0 for `/proc` and `/sys` files, which
/// report none).
fn open_for_read(path: &str) -> Result<(File, u64), Failure> {
    let p = Path::new(path);
    if !p.is_absolute() {
        let message = format!("path {path:?} must be absolute");
        return Err(Failure::with_errno(FailureKind::Invalid, message, libc::EINVAL));
    }
    // Checked before opening (opening a device can have effects of its own), and again on the open file in case
    // the path was swapped in between.
    regular_file(path, &std::fs::metadata(p).map_err(|e| Failure::from_io(path, &e))?)?;
    // O_NONBLOCK: were it swapped for a FIFO, the open must not wait for a writer.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p)
        .map_err(|e| Failure::from_io(path, &e))?;
    let meta = f.metadata().map_err(|e| Failure::from_io(path, &e))?;
    regular_file(path, &meta)?;
    // SAFETY: F_SETFL on a descriptor this function owns (back to blocking reads); no memory is touched.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, 0) };
    Ok((f, meta.len()))
}

fn regular_file(path: &str, meta: &std::fs::Metadata) -> Result<(), Failure> {
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok(());
    }
    if ft.is_dir() {
        let message = format!("{path} is a directory");
        return Err(Failure::with_errno(FailureKind::IsADirectory, message, libc::EISDIR));
    }
    let what = if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_fifo() {
        "a FIFO"
    } else {
        "a socket"
    };
    let message = format!("{path} is {what}, which has no end to download; only regular files can be read");
    Err(Failure::with_errno(FailureKind::NotARegularFile, message, libc::EINVAL))
}

/// Streams the file; the bytes sent, or `None` if the host cancelled.
fn read_out(ch: u32, path: &str, window: &Window, out: &Out) -> Result<Option<u64>, Failure> {
    let (mut f, size) = open_for_read(path)?;
    // A file is sent as large as it was when opened (one that keeps growing would never end); one that reports no
    // size is sent up to UNSIZED_FILE_LIMIT, reading one byte past it to tell "exactly that long" from "longer".
    let cap = if size > 0 { size } else { UNSIZED_FILE_LIMIT + 1 };
    let mut buf = vec![0u8; CHUNK * 4];
    let mut total = 0u64;
    while total < cap {
        let left = usize::try_from(cap - total).unwrap_or(usize::MAX);
        let Some(room) = window.room(buf.len().min(left)) else { return Ok(None) };
        let n = match f.read(&mut buf[..room]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::from_io(path, &e)),
        };
        if size == 0 && total + n as u64 > UNSIZED_FILE_LIMIT {
            return Err(Failure::new(
                FailureKind::TooLarge,
                format!(
                    "{path} reports no size (as /proc and /sys files do) and is longer than the {} MiB the sandbox \
                     sends of such a file; copy the part you need to a regular file first",
                    UNSIZED_FILE_LIMIT >> 20
                ),
            ));
        }
        window.spend(n);
        total += n as u64;
        out.send(Frame::data(Kind::FileData, ch, buf[..n].to_vec()));
    }
    Ok(Some(total))
}
