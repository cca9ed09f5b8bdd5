//! The master's remaining libc calls: `accept4`, `pidfd_open`, the child's
//! set-up between fork and exec, and resource limits. Every `unsafe` block
//! outside fd passing (`proto::scm`) lives here.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::proto::scm::{self, Inherited, cvt, cvt_r};

/// Accepts one connection, non-blocking and CLOEXEC from birth, without
/// asking for the peer address (the worker can `getpeername` if it cares).
/// Retries `EINTR`; `EAGAIN` comes back as `WouldBlock`.
#[inline]
pub fn accept4(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: `listener` is a valid fd for the call; null address
    // pointers are allowed and mean "don't report the peer".
    let fd = cvt_r(|| unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: accept4 just returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

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

/// Arranges, for the child `cmd` will start, what must happen between fork
/// and exec:
///
/// 1. the channel (if any) lands on fd 3 without CLOEXEC. If it already *is* fd 3,
///    `dup2(3, 3)` would do nothing and leave CLOEXEC set, so clear it instead;
/// 2. `PR_SET_PDEATHSIG(SIGKILL)`, then a check that the parent is still the
///    master (it may have died before the prctl, which would then never fire).
///    The signal fires when the *thread* that forked exits: the supervisor
///    thread spawns and lives as long as the master;
/// 3. every signal's disposition is the default and the mask is empty: exec
///    keeps ignored signals ignored and the mask as it was, so a master
///    started by `nohup` (SIGHUP ignored) or with signals blocked (its own,
///    for its signalfd) would pass that on to servers that expect neither.
///
/// The caller also sets a process group of the child's own (Command's
/// `process_group(0)`), so a terminal's ^C reaches the master alone.
pub fn prepare_child(cmd: &mut Command, channel: Option<RawFd>, target: RawFd) {
    // SAFETY: getpid has no preconditions.
    let master = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it makes only fcntl, dup2, prctl,
    // getppid, signal, sigemptyset and pthread_sigmask calls on fds and
    // stack memory the child owns, and neither allocates nor locks (errors
    // are raw errnos: another thread may have held the allocator's lock at
    // fork).
    unsafe {
        cmd.pre_exec(move || {
            match channel {
                Some(channel) if channel == target => {
                    let flags = cvt(libc::fcntl(target, libc::F_GETFD))?;
                    cvt(libc::fcntl(
                        target,
                        libc::F_SETFD,
                        flags & !libc::FD_CLOEXEC,
                    ))?;
                }
                Some(channel) => {
                    cvt(libc::dup2(channel, target))?;
                }
                None => {}
            }
            cvt(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
            if libc::getppid() != master {
                return Err(io::Error::other(
                    "lb master exited before the worker started",
                ));
            }
            // SIGKILL and SIGSTOP cannot be changed, and glibc keeps two
            // real-time signals for itself: those calls fail, harmlessly.
            for signal in 1..=64 {
                libc::signal(signal, libc::SIG_DFL);
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            cvt(libc::pthread_sigmask(
                libc::SIG_SETMASK,
                &none,
                std::ptr::null_mut(),
            ))?;
            Ok(())
        });
    }
}

/// Bytes sent on `sock` (a unix socket) that its peer has not read yet,
/// with the kernel's own overhead per message (`SIOCOUTQ`).
pub fn unread_bytes(sock: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which points at
    // a live, writable c_int; the fd is valid for the call.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut n) })?;
    Ok(usize::try_from(n).unwrap_or(0))
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

/// Ignores `signals` in this process (and what it execs).
pub fn ignore_signals(signals: &[nix::sys::signal::Signal]) {
    for &s in signals {
        // SAFETY: SIG_IGN installs no handler code that could run at an
        // unsafe moment; it only changes the disposition.
        let _ = unsafe { nix::sys::signal::signal(s, nix::sys::signal::SigHandler::SigIgn) };
    }
}

/// Lets the child inherit `fd` (at the same number) across exec.
pub fn keep_fd(cmd: &mut Command, fd: RawFd) {
    // SAFETY: runs in the forked child before exec; fcntl is
    // async-signal-safe and touches only the child's own fd table.
    unsafe {
        cmd.pre_exec(move || {
            let flags = cvt(libc::fcntl(fd, libc::F_GETFD))?;
            cvt(libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC))?;
            Ok(())
        });
    }
}

/// The argv and envp of an exec prepared before fork, with one variable
/// whose value the child fills in with its own pid (`LISTEN_PID` must name
/// the process that has the fds: only the child knows its pid, and between
/// fork and exec nothing may allocate).
struct PidExec {
    program: std::ffi::CString,
    _strings: Vec<std::ffi::CString>,
    /// `NAME=` followed by room for the digits and the NUL.
    pid_var: Vec<u8>,
    pid_at: usize,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

// SAFETY: the raw pointers point into buffers this struct owns (which do
// not move when it does); it is only used by the one child that runs the
// closure owning it.
unsafe impl Send for PidExec {}
// SAFETY: as above; nothing reads it concurrently.
unsafe impl Sync for PidExec {}

/// Makes the child exec `cmd`'s program, arguments and environment itself,
/// with `var=<its own pid>` added: call last, after every other set-up
/// (it runs after them and does not return on success). The program must
/// be a path (no `PATH` search).
pub fn exec_with_own_pid(cmd: &mut Command, var: &str) -> io::Result<()> {
    use std::collections::BTreeMap;
    use std::ffi::{CString, OsString};
    use std::os::unix::ffi::OsStrExt;
    let nul = |e: std::ffi::NulError| io::Error::new(io::ErrorKind::InvalidInput, e);
    let program = CString::new(cmd.get_program().as_bytes()).map_err(nul)?;
    let mut env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => env.insert(k.to_owned(), v.to_owned()),
            None => env.remove(k),
        };
    }
    env.remove(std::ffi::OsStr::new(var));
    let mut strings = Vec::new();
    strings.push(program.clone());
    for a in cmd.get_args() {
        strings.push(CString::new(a.as_bytes()).map_err(nul)?);
    }
    let argc = strings.len();
    for (k, v) in &env {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        strings.push(CString::new(kv).map_err(nul)?);
    }
    let mut pid_var = format!("{var}=").into_bytes();
    let pid_at = pid_var.len();
    pid_var.resize(pid_at + 21, 0);
    let argv: Vec<*const libc::c_char> = strings[..argc]
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let mut envp: Vec<*const libc::c_char> = strings[argc..].iter().map(|s| s.as_ptr()).collect();
    envp.push(pid_var.as_ptr().cast());
    envp.push(std::ptr::null());
    let mut exec = PidExec {
        program,
        _strings: strings,
        pid_var,
        pid_at,
        argv,
        envp,
    };
    // SAFETY: runs in the forked child before exec, after the other
    // set-up closures: it writes decimal digits into a buffer it owns
    // (allocated before fork, no allocation here) and calls getpid and
    // execve, both async-signal-safe. The argv/envp arrays are
    // NULL-terminated and point at NUL-terminated strings kept alive by
    // `exec`, which the closure owns.
    unsafe {
        cmd.pre_exec(move || {
            // The whole struct, not its fields one by one (it is Send).
            let exec = &mut exec;
            let mut pid = libc::getpid() as u64;
            let mut digits = [0u8; 20];
            let mut n = 0;
            loop {
                digits[n] = b'0' + (pid % 10) as u8;
                n += 1;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            for i in 0..n {
                exec.pid_var[exec.pid_at + i] = digits[n - 1 - i];
            }
            exec.pid_var[exec.pid_at + n] = 0;
            libc::execve(
                exec.program.as_ptr(),
                exec.argv.as_ptr(),
                exec.envp.as_ptr(),
            );
            Err(io::Error::last_os_error())
        });
    }
    Ok(())
}

/// Marks every fd from `first` up close-on-exec: what lb inherited without
/// the flag (from a shell's redirections, a supervisor's leaked pipe) is not
/// its workers' to inherit. Call before anything opens an fd that a child
/// should get.
pub fn cloexec_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing; it only
    // sets a flag on the fds in the range that are open.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return Ok(());
    }
    // Before Linux 5.11: one by one, from the fds the process has open.
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd: &RawFd| fd >= first as RawFd)
        .collect();
    for fd in open {
        // SAFETY: F_GETFD/F_SETFD on an fd number only read and set its
        // flags; one closed meanwhile (the directory's own) reports EBADF.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
    Ok(())
}

/// Raises the soft open-files limit to the hard limit: each connection in
/// flight costs the master an fd until the worker takes it, and the kernel
/// caps fds in flight over unix sockets by the same limit. Returns the new
/// soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    // SAFETY: rlimit is a plain C struct; getrlimit fills it in.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is valid writable memory of the right type.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit; raising soft up to hard is allowed.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok(lim.rlim_cur)
}

/// Takes an inherited listening socket (socket activation) after checking
/// that `raw` is open, a TCP stream socket and listening; marks it CLOEXEC
/// and non-blocking. Call once per fd number.
pub fn inherited_listener(raw: RawFd) -> io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::from(scm::adopt_inherited(raw, Inherited::TcpListener)?);
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// CPU seconds used so far and resident memory in bytes of `pid`, from
/// `/proc` (no libc needed; here beside the other process helpers).
pub fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    // /proc counts CPU in USER_HZ, fixed at 100 by the Linux ABI on x86 and arm.
    const USER_HZ: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Some((ticks / USER_HZ, rss_kb * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[test]
    fn accept4_gives_nonblocking_cloexec_sockets() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        assert_eq!(
            accept4(l.as_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let fd = loop {
            match accept4(l.as_fd()) {
                Ok(fd) => break fd,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        };
        let fl = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        let fd_flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
    }

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
