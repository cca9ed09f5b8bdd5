//! A child's set-up between fork and exec (`Command::pre_exec` closures):
//! only async-signal-safe calls, no allocation, errors as raw errnos.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::proto::scm::cvt;

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

/// Who the child becomes and where, prepared before fork (the child may
/// not allocate): its ids, the directory it starts in, its umask.
#[derive(Debug, Default)]
pub struct Become {
    /// uid, gid and the supplementary groups (gid first).
    pub ids: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    pub cwd: Option<std::ffi::CString>,
    pub umask: Option<libc::mode_t>,
}

/// Makes the child `cmd` will start become `who`: setgroups, setgid, then
/// setuid (each needs the privilege the one after drops), then chdir (as
/// the worker, so it is the worker's right to enter it that counts) and
/// umask. Call before [`prepare_child`]: a change of credentials clears
/// `PR_SET_PDEATHSIG`, which that then sets.
pub fn become_in_child(cmd: &mut Command, who: Become) {
    if who.ids.is_none() && who.cwd.is_none() && who.umask.is_none() {
        return;
    }
    // SAFETY: runs in the forked child before exec: setgroups, setgid,
    // setuid, chdir and umask are async-signal-safe, and read only memory
    // the closure owns (made before fork); nothing allocates or locks.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid, groups)) = &who.ids {
                cvt(libc::setgroups(groups.len(), groups.as_ptr()))?;
                cvt(libc::setgid(*gid))?;
                cvt(libc::setuid(*uid))?;
            }
            if let Some(dir) = &who.cwd {
                cvt(libc::chdir(dir.as_ptr()))?;
            }
            if let Some(mask) = who.umask {
                libc::umask(mask);
            }
            Ok(())
        });
    }
}

/// Gives the child `fds` as `first`, `first + 1`, … across exec (socket
/// activation's fds 3 on), whatever numbers they have in the master.
pub fn place_fds(cmd: &mut Command, mut fds: Vec<RawFd>, first: RawFd) {
    let end = first.saturating_add(fds.len() as RawFd);
    // SAFETY: runs in the forked child before exec; fcntl and dup2 are
    // async-signal-safe and touch only the child's own fd table; `fds` was
    // allocated before fork and is only indexed here.
    unsafe {
        cmd.pre_exec(move || {
            // A source inside the target range would be overwritten by an
            // earlier dup2: moved above it first.
            for fd in fds.iter_mut() {
                if (first..end).contains(fd) {
                    *fd = cvt(libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, end))?;
                }
            }
            for (i, fd) in fds.iter().enumerate() {
                // (dup2 clears CLOEXEC on the copy.)
                cvt(libc::dup2(*fd, first + i as RawFd))?;
            }
            Ok(())
        });
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
