//! Starting processes for sessions: fork + execve done by hand (so that PID 1's reaper owns every wait), with
//! pipes or a PTY, in their own session and process group.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::pty::{openpty, Winsize};
use nix::unistd::{pipe2, ForkResult};

static WORKLOAD_CGROUPS: std::sync::OnceLock<Vec<OwnedFd>> = std::sync::OnceLock::new();

/// Sets the `cgroup.procs` files every started process joins (before it execs).
pub fn set_workload_cgroups(fds: Vec<OwnedFd>) {
    let _ = WORKLOAD_CGROUPS.set(fds);
}

/// The host's ends of a started process's standard streams.
pub enum Stdio {
    /// Three pipes.
    Pipes {
        /// Write end of stdin.
        stdin: File,
        /// Read end of stdout.
        stdout: File,
        /// Read end of stderr.
        stderr: File,
    },
    /// One PTY master (read output, write input).
    Pty {
        /// The master side.
        master: File,
    },
}

/// A started process.
pub struct Started {
    /// Its pid.
    pub pid: i32,
    /// Its streams.
    pub stdio: Stdio,
}

/// Why a process could not be started, in words that name the problem.
#[derive(Debug)]
pub struct SpawnError(pub String);

/// Finds `command` like a shell would: as given when it has a slash, else in `PATH`.
pub fn resolve(command: &str, path_var: &str, workdir: &Path) -> Result<PathBuf, SpawnError> {
    if command.is_empty() {
        return Err(SpawnError("empty command".into()));
    }
    if command.contains('/') {
        let p = if Path::new(command).is_absolute() { PathBuf::from(command) } else { workdir.join(command) };
        return check_exec(&p).map(|()| p).map_err(|e| SpawnError(format!("{command}: {e}")));
    }
    for dir in path_var.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(command);
        if check_exec(&candidate).is_ok() {
            return Ok(candidate);
        }
    }
    Err(SpawnError(format!("command not found: {command} (searched PATH={path_var})")))
}

fn check_exec(p: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(p).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => "no such file".to_string(),
        _ => e.to_string(),
    })?;
    if meta.is_dir() {
        return Err("is a directory".into());
    }
    let c = CString::new(p.as_os_str().as_bytes()).map_err(|_| "path contains NUL".to_string())?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 {
        return Err("permission denied (not executable)".into());
    }
    Ok(())
}

fn cstring(s: &str, what: &str) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError(format!("{what} contains a NUL byte")))
}

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name (the uid itself when the passwd file has none).
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Home directory.
    pub home: String,
}

/// Resolves `user` (`name`, `uid`, `name:group` or `uid:gid`) against the sandbox's `/etc/passwd` and
/// `/etc/group`, as a container engine resolves an image's `USER`.
pub fn lookup_user(user: &str) -> Result<Credentials, SpawnError> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    resolve_user(user, &passwd, &group)
}

fn resolve_user(user: &str, passwd: &str, group: &str) -> Result<Credentials, SpawnError> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    // name:x:uid:gid:gecos:home:shell
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && (f[0] == u || (u.parse::<u32>().ok().is_some_and(|id| f[2].parse() == Ok(id)))));
    let (name, uid, mut gid, home) = match (&entry, u.parse::<u32>()) {
        (Some(f), _) => (
            f[0].to_string(),
            f[2].parse().map_err(|_| SpawnError(format!("/etc/passwd has a bad uid for {}", f[0])))?,
            f[3].parse().map_err(|_| SpawnError(format!("/etc/passwd has a bad gid for {}", f[0])))?,
            f[5].to_string(),
        ),
        (None, Ok(id)) => (id.to_string(), id, id, "/".to_string()),
        (None, Err(_)) => {
            return Err(SpawnError(format!("user {u:?} does not exist in the sandbox's /etc/passwd")));
        }
    };
    let groups_of = group.lines().map(|l| l.split(':').collect::<Vec<_>>()).filter(|f| f.len() >= 4);
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(id) => id,
            Err(_) => groups_of
                .clone()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| SpawnError(format!("group {g:?} does not exist in the sandbox's /etc/group")))?,
        };
    }
    let mut groups: Vec<u32> =
        groups_of.filter(|f| f[3].split(',').any(|m| m == name)).filter_map(|f| f[2].parse().ok()).collect();
    if !groups.contains(&gid) {
        groups.insert(0, gid);
    }
    Ok(Credentials { name, uid, gid, groups, home })
}

/// Starts `program` with `args` (argv[1..]), `env`, in `workdir`, on pipes or a PTY of `pty` (cols, rows), as
/// `creds` when given. An empty `program` starts a process that execs nothing and sleeps until a signal ends it
/// (the agent's stand-in for `sleep infinity` in images that have no `sleep`).
pub fn spawn(
    program: &Path,
    argv0: &str,
    args: &[String],
    env: &[(String, String)],
    workdir: &Path,
    pty: Option<(u16, u16)>,
    creds: Option<&Credentials>,
) -> Result<Started, SpawnError> {
    if !workdir.is_dir() {
        return Err(SpawnError(format!("working directory {} does not exist", workdir.display())));
    }
    // Everything the child needs is allocated before fork: after it, only async-signal-safe calls.
    let path_c = CString::new(program.as_os_str().as_bytes()).map_err(|_| SpawnError("program path has NUL".into()))?;
    let mut argv_c = vec![cstring(argv0, "command")?];
    for a in args {
        argv_c.push(cstring(a, "an argument")?);
    }
    let mut argv_p: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let env_c = env
        .iter()
        .map(|(k, v)| cstring(&format!("{k}={v}"), "an environment variable"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut env_p: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
    env_p.push(std::ptr::null());
    let dir_c = CString::new(workdir.as_os_str().as_bytes()).map_err(|_| SpawnError("workdir has NUL".into()))?;
    let cgroup_fds: Vec<i32> =
        WORKLOAD_CGROUPS.get().map(|v| v.iter().map(|f| f.as_raw_fd()).collect()).unwrap_or_default();

    let err = |what: &str, e: nix::errno::Errno| SpawnError(format!("{what}: {e}"));
    // Child's fds: (stdin, stdout, stderr) and the parent's ends.
    let (child_fds, parent): ([OwnedFd; 3], Stdio) = match pty {
        None => {
            let (in_r, in_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| err("pipe", e))?;
            let (out_r, out_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| err("pipe", e))?;
            let (err_r, err_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| err("pipe", e))?;
            (
                [in_r, out_w, err_w],
                Stdio::Pipes { stdin: File::from(in_w), stdout: File::from(out_r), stderr: File::from(err_r) },
            )
        }
        Some((cols, rows)) => {
            let ws = Winsize { ws_row: rows.max(1), ws_col: cols.max(1), ws_xpixel: 0, ws_ypixel: 0 };
            let p = openpty(Some(&ws), None).map_err(|e| err("openpty", e))?;
            set_cloexec(&p.master);
            set_cloexec(&p.slave);
            let slave = p.slave;
            let s2 = slave.try_clone().map_err(|e| SpawnError(format!("dup: {e}")))?;
            let s3 = slave.try_clone().map_err(|e| SpawnError(format!("dup: {e}")))?;
            ([slave, s2, s3], Stdio::Pty { master: File::from(p.master) })
        }
    };
    let is_pty = pty.is_some();
    // An empty program path: no exec, the child itself stands in for `sleep infinity`.
    let sleeper = program.as_os_str().is_empty();
    let ids: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)> = creds.map(|c| (c.uid, c.gid, c.groups.clone()));
    // Reports the child's execve errno to the parent; closed by a successful exec (CLOEXEC).
    let (status_r, status_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| err("pipe", e))?;

    // SAFETY: the child only makes async-signal-safe calls (setsid, ioctl, dup2, chdir, sigprocmask via libc,
    // execve, write, _exit) on memory allocated before the fork, then execs or exits.
    match unsafe { nix::unistd::fork() }.map_err(|e| err("fork", e))? {
        ForkResult::Child => unsafe {
            // Into the workload cgroup ("0" means the writing process), where the sandbox's limits apply.
            for fd in &cgroup_fds {
                libc::write(*fd, b"0".as_ptr().cast(), 1);
            }
            // Then drop to the user (groups first, while still allowed to change them).
            if let Some((uid, gid, groups)) = &ids {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                {
                    report_and_exit(status_w.as_raw_fd(), 3);
                }
            }
            libc::setsid();
            if is_pty {
                libc::ioctl(child_fds[0].as_raw_fd(), libc::TIOCSCTTY, 0);
            }
            for (i, fd) in child_fds.iter().enumerate() {
                libc::dup2(fd.as_raw_fd(), i as i32);
            }
            // The agent blocks no signals, but reset the mask and dispositions the exec'd program inherits.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            for sig in [libc::SIGPIPE, libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
                libc::signal(sig, libc::SIG_DFL);
            }
            if libc::chdir(dir_c.as_ptr()) != 0 {
                report_and_exit(status_w.as_raw_fd(), 1);
            }
            if sleeper {
                // Holds none of the agent's descriptors (closing the status pipe tells the parent it started),
                // then waits for the signal that ends it, as `sleep infinity` would.
                if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
                    for fd in 3..65536 {
                        libc::close(fd);
                    }
                }
                loop {
                    libc::pause();
                }
            }
            libc::execve(path_c.as_ptr(), argv_p.as_ptr(), env_p.as_ptr());
            report_and_exit(status_w.as_raw_fd(), 2);
        },
        ForkResult::Parent { child } => {
            crate::reaper::spawned();
            drop(child_fds);
            drop(status_w);
            let mut buf = [0u8; 5];
            let mut status = File::from(status_r);
            let n = read_full(&mut status, &mut buf);
            if n == 5 {
                let errno = nix::errno::Errno::from_raw(i32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]));
                // The child exits; the reaper collects it (its registration is never made, so it is dropped).
                let what = if buf[0] == 1 {
                    format!("cannot enter {}", workdir.display())
                } else if buf[0] == 3 {
                    format!("cannot switch to user {}", creds.map(|c| c.name.as_str()).unwrap_or("?"))
                } else {
                    format!("cannot execute {}", program.display())
                };
                return Err(SpawnError(format!("{what}: {}", errno.desc())));
            }
            Ok(Started { pid: child.as_raw(), stdio: parent })
        }
    }
}

/// In the forked child: writes (stage, errno) to the status pipe and exits without running destructors.
unsafe fn report_and_exit(fd: i32, stage: u8) -> ! {
    let errno = *libc::__errno_location();
    let e = errno.to_le_bytes();
    let msg = [stage, e[0], e[1], e[2], e[3]];
    libc::write(fd, msg.as_ptr().cast(), msg.len());
    libc::_exit(127);
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    n
}

fn set_cloexec(fd: &OwnedFd) {
    let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
}

/// Resizes a PTY.
pub fn resize(master: &File, cols: u16, rows: u16) {
    let ws = libc::winsize { ws_row: rows.max(1), ws_col: cols.max(1), ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a winsize struct that lives for the call; a non-PTY fd just fails.
    unsafe {
        libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws);
    }
}

/// Duplicates a raw fd into a `File` (for handing a stream to another thread).
pub fn dup_file(f: &File) -> io::Result<File> {
    // SAFETY: dup returns a new fd we own exclusively (or -1, checked).
    let fd = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod user_tests {
    use super::resolve_user;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\napp:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nstaff:x:50:app\n";

    #[test]
    fn names_ids_and_groups_resolve_like_a_container_engine() {
        let c = resolve_user("app", PASSWD, GROUP).unwrap();
        assert_eq!((c.uid, c.gid, c.home.as_str()), (1000, 1000, "/home/app"));
        assert_eq!(c.groups, vec![1000, 50]);
        assert_eq!(resolve_user("1000", PASSWD, GROUP).unwrap().name, "app");
        assert_eq!(resolve_user("app:staff", PASSWD, GROUP).unwrap().gid, 50);
        let anon = resolve_user("4242:4343", PASSWD, GROUP).unwrap();
        assert_eq!((anon.uid, anon.gid, anon.home.as_str()), (4242, 4343, "/"));
        assert!(resolve_user("nobody-here", PASSWD, GROUP).unwrap_err().0.contains("does not exist"));
        assert!(resolve_user("app:nogroup", PASSWD, GROUP).is_err());
    }
}
