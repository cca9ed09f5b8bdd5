//! Processes: a child's pidfd (its exit, its signals without pid reuse),
//! what it holds and uses (from `/proc`), and the signals lb ignores.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::proto::scm::cvt;

/// A pidfd for a child we have not reaped yet (so the pid cannot have been
/// reused): readable once the child exits. CLOEXEC.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    let fd = cvt(r as libc::c_int)?;
    // SAFETY: the syscall just returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `signal` to a child through its pidfd (no pid-reuse race).
pub fn pidfd_signal(pidfd: BorrowedFd<'_>, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a null siginfo and no flags is the
    // equivalent of kill(2) on the process the pidfd refers to.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    cvt(r as libc::c_int).map(drop)
}

/// Whether `pid` or one of its descendants (at most 64 processes looked
/// at) has the socket with inode `inode` open: from `/proc`, for a worker
/// suspected of having closed its channel, never on a hot path. `true`
/// when it cannot tell.
pub fn tree_holds_socket(pid: u32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    let mut todo = vec![pid];
    let mut seen = 0;
    while let Some(p) = todo.pop() {
        seen += 1;
        if seen > 64 {
            return true;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{p}/fd")) else {
            continue; // gone, or not ours to read
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
        {
            return true;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    false
}

/// Whether this process runs under a seccomp filter (`Seccomp: 2` in
/// `/proc/self/status`): a refused syscall may be the filter's doing,
/// not a missing capability.
pub fn seccomp_filtered() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.strip_prefix("Seccomp:").is_some_and(|v| v.trim() == "2"))
    })
}

/// CPU seconds used so far and resident memory in bytes of `pid`, from
/// `/proc` (no libc needed; here beside the other process helpers). By
/// hand: two fields of two files do not need `procfs`, a crate of dozens of
/// modules and its own dependencies.
pub fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    // /proc counts CPU in clock ticks (USER_HZ: 100 on x86 and arm, not on
    // every architecture).
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&t| t > 0)
        .unwrap_or(100) as f64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Some((ticks / hz, rss_kb * 1024))
}

/// Ignores `signals` in this process (and what it execs).
pub fn ignore_signals(signals: &[nix::sys::signal::Signal]) {
    for &s in signals {
        // SAFETY: SIG_IGN installs no handler code that could run at an
        // unsafe moment; it only changes the disposition.
        let _ = unsafe { nix::sys::signal::signal(s, nix::sys::signal::SigHandler::SigIgn) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::process::Command;

    #[test]
    fn proc_usage_reads_this_process() {
        let (cpu, rss) = proc_usage(std::process::id()).unwrap();
        assert!(cpu >= 0.0);
        assert!(rss > 0);
        assert!(proc_usage(u32::MAX).is_none());
    }

    #[test]
    fn pidfd_becomes_readable_when_the_child_exits() {
        let mut child = Command::new("true").spawn().unwrap();
        let pidfd = pidfd_open(child.id()).unwrap();
        let mut pfd = [nix::poll::PollFd::new(
            pidfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let n = nix::poll::poll(&mut pfd, 5000u16).unwrap();
        assert_eq!(n, 1);
        assert!(child.wait().unwrap().success());
    }
}
