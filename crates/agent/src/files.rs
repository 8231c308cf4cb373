//! File transfer: uploads arrive as FileWrite, FileData..., FileEnd; downloads go out as FileData..., FileOk.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use compute_agent_protocol::{Failure, FileDone, FileWrite, Frame, Kind, CHUNK};

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
                &Failure { kind: "invalid".into(), message: "no upload open on this channel".into(), errno: None },
            )),
        }
    }
}

fn open_for_write(req: &FileWrite) -> Result<File, Failure> {
    let path = Path::new(&req.path);
    if !path.is_absolute() {
        return Err(Failure {
            kind: "invalid".into(),
            message: format!("destination {:?} must be an absolute path", req.path),
            errno: Some(libc::EINVAL),
        });
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Failure::from_io(&format!("creating {}", parent.display()), &e))?;
    }
    if path.is_dir() {
        return Err(Failure {
            kind: "is_a_directory".into(),
            message: format!("{} is a directory", req.path),
            errno: Some(libc::EISDIR),
        });
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

/// Sends a file's bytes on `ch`, then FileOk (or FileFailed).
pub fn send_file(ch: u32, path: &str, out: &Out) {
    let result = (|| {
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(Failure {
                kind: "invalid".into(),
                message: format!("path {path:?} must be absolute"),
                errno: Some(libc::EINVAL),
            });
        }
        let meta = std::fs::metadata(p).map_err(|e| Failure::from_io(path, &e))?;
        if meta.is_dir() {
            return Err(Failure {
                kind: "is_a_directory".into(),
                message: format!("{path} is a directory"),
                errno: Some(libc::EISDIR),
            });
        }
        let mut f = File::open(p).map_err(|e| Failure::from_io(path, &e))?;
        let mut buf = vec![0u8; CHUNK * 4];
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(|e| Failure::from_io(path, &e))?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
            out.send(Frame::data(Kind::FileData, ch, buf[..n].to_vec()));
        }
    })();
    match result {
        Ok(bytes) => out.send(Frame::json(Kind::FileOk, ch, &FileDone { bytes })),
        Err(f) => out.send(Frame::json(Kind::FileFailed, ch, &f)),
    }
}
