//! The group reaper: what a master killed with SIGKILL leaves behind.
//!
//! A worker dies with its master (parent-death signal), but the processes
//! it started do not: nothing tells them. So the master starts one small
//! process of its own, `lb reap-groups`, and tells it, over a pipe, the
//! process group of every worker it starts (each worker leads its own) and
//! of every worker whose group it has cleaned up itself. When the pipe
//! ends — the master exited or was killed — the reaper sends SIGKILL to
//! every group still listed, and exits.
//!
//! The reaper runs in a process group of its own and ignores the signals a
//! terminal or a service manager sends the master's group, so it is still
//! there when the master is not. Never touches a group it was not told of.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufRead, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};

/// The master's handle on its reaper: known by its pidfd (an upgraded
/// master adopts its last image's reaper, a child it did not spawn).
pub struct Reaper {
    pid: u32,
    pidfd: OwnedFd,
    to: Option<File>,
}

impl Reaper {
    /// Starts `lb reap-groups` (this same binary).
    pub fn start() -> io::Result<Reaper> {
        // This binary, even if its file was replaced or deleted since.
        let mut child = Command::new("/proc/self/exe")
            .arg("reap-groups")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        let pid = child.id();
        let pidfd = crate::sys::pidfd_open(pid)?;
        let to = child.stdin.take().map(|p| File::from(OwnedFd::from(p)));
        // A reaper that stopped reading (stopped by hand) must not block
        // the supervisor: a full pipe drops what does not fit.
        if let Some(pipe) = &to {
            nix::fcntl::fcntl(
                pipe,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )?;
        }
        Ok(Reaper { pid, pidfd, to })
    }

    /// The reaper an earlier image of this master started (`lb upgrade`).
    pub fn adopt(pid: u32, pidfd: OwnedFd, pipe: OwnedFd) -> Reaper {
        Reaper {
            pid,
            pidfd,
            to: Some(File::from(pipe)),
        }
    }

    /// Its pid, pidfd and pipe, for the next image; the reaper goes on,
    /// its list as it was.
    pub fn hand_over(mut self) -> Option<(u32, OwnedFd, OwnedFd)> {
        let to = self.to.take()?;
        let pidfd = self.pidfd.try_clone().ok()?;
        let pid = self.pid;
        // Not dropped, which would wait for the reaper's exit; the pidfd
        // given is a copy, and this one closes at the exec (CLOEXEC).
        std::mem::forget(self);
        Some((pid, pidfd, OwnedFd::from(to)))
    }

    /// A worker leading process group `pgid` was started.
    pub fn add(&mut self, pgid: u32) {
        self.say(format_args!("+{pgid}\n"));
    }

    /// The group `pgid` was cleaned up (its leader reaped, the rest killed).
    pub fn remove(&mut self, pgid: u32) {
        self.say(format_args!("-{pgid}\n"));
    }

    fn say(&mut self, line: std::fmt::Arguments<'_>) {
        // One write of a few bytes: a pipe takes it whole or not at all. A
        // reaper that is gone (killed by hand) costs only that backstop;
        // one whose pipe is full misses this line.
        let text = line.to_string();
        if let Some(to) = self.to.as_mut()
            && let Err(e) = to.write(text.as_bytes())
            && e.kind() != io::ErrorKind::WouldBlock
        {
            self.to = None;
        }
    }
}

impl Drop for Reaper {
    /// A master that ends normally has cleaned up every group: the reaper
    /// sees the pipe end with nothing listed, and exits.
    fn drop(&mut self) {
        drop(self.to.take());
        // It exits at once on EOF; one stopped by hand is not waited for.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while std::time::Instant::now() < deadline {
            let exited = nix::sys::wait::waitid(
                nix::sys::wait::Id::PIDFd(self.pidfd.as_fd()),
                nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOHANG,
            );
            if !matches!(exited, Ok(nix::sys::wait::WaitStatus::StillAlive)) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

/// `lb reap-groups`: the reaper's side.
pub fn main() -> std::process::ExitCode {
    use nix::sys::signal::Signal;
    crate::sys::ignore_signals(&[
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ]);
    let mut groups = BTreeSet::new();
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let (op, pgid) = line.split_at(line.len().min(1));
        match (op, pgid.parse::<i32>()) {
            ("+", Ok(g)) if g > 1 => {
                groups.insert(g);
            }
            ("-", Ok(g)) => {
                groups.remove(&g);
            }
            _ => {}
        }
    }
    for g in groups {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(g), Signal::SIGKILL);
    }
    std::process::ExitCode::SUCCESS
}
