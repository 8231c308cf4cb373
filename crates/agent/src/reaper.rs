//! PID 1 must reap every child, including orphans re-parented to it. One thread waits for any child and hands
//! each status to whoever registered that pid; statuses that arrive before their registration are kept.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// How a process ended.
#[derive(Debug, Clone, Copy)]
pub enum Ended {
    /// Exited with a code.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
}

#[derive(Default)]
struct State {
    waiting: HashMap<i32, Sender<Ended>>,
    early: HashMap<i32, Ended>,
    children: usize,
}

struct Reaper {
    state: Mutex<State>,
    wake: Condvar,
}

fn reaper() -> &'static Arc<Reaper> {
    static R: OnceLock<Arc<Reaper>> = OnceLock::new();
    R.get_or_init(|| {
        let r = Arc::new(Reaper { state: Mutex::new(State::default()), wake: Condvar::new() });
        let thread_r = r.clone();
        std::thread::Builder::new().name("reaper".into()).spawn(move || run(&thread_r)).expect("spawning the reaper");
        r
    })
}

/// Starts the reaper (idempotent).
pub fn start() {
    reaper();
}

/// Tells the reaper a child was spawned, so it knows to wait (it sleeps while there are none).
pub fn spawned() {
    let r = reaper();
    r.state.lock().unwrap_or_else(|p| p.into_inner()).children += 1;
    r.wake.notify_one();
}

/// A receiver for `pid`'s end.
pub fn watch(pid: i32) -> Receiver<Ended> {
    let (tx, rx) = channel();
    let r = reaper();
    let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(ended) = st.early.remove(&pid) {
        let _ = tx.send(ended);
    } else {
        st.waiting.insert(pid, tx);
    }
    rx
}

fn run(r: &Reaper) {
    loop {
        {
            let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
            while st.children == 0 && std::process::id() != 1 {
                // Outside PID 1 (tests), only our own children exist: sleep until one is spawned.
                st = r.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) => deliver(r, pid.as_raw(), Ended::Code(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => deliver(r, pid.as_raw(), Ended::Signal(sig as i32)),
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => {
                let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
                if st.children == 0 {
                    // PID 1 with no children: wait for the next spawn.
                    let _ = r.wake.wait_timeout(st, std::time::Duration::from_millis(200));
                } else {
                    st.children = 0;
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

fn deliver(r: &Reaper, pid: i32, ended: Ended) {
    let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
    st.children = st.children.saturating_sub(1);
    match st.waiting.remove(&pid) {
        Some(tx) => {
            let _ = tx.send(ended);
        }
        // Either an orphan re-parented to PID 1 (nobody waits: just reaped), or a child whose spawner has not
        // registered yet. Keep a bounded number for the latter.
        None => {
            if st.early.len() > 4096 {
                st.early.clear();
            }
            st.early.insert(pid, ended);
        }
    }
}
