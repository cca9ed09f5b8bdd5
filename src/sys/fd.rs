//! Fds and sockets: the master's accept, what a channel holds unread, the
//! fds lb inherited (swept CLOEXEC, or adopted as its listener) and how
//! many it may open.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

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

/// Bytes sent on `sock` (a unix socket) that its peer has not read yet,
/// with the kernel's own overhead per message (`SIOCOUTQ`).
pub fn unread_bytes(sock: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which points at
    // a live, writable c_int; the fd is valid for the call.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut n) })?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Connections waiting in listening TCP socket `listener`'s accept queue,
/// and how many it holds at most (`TCP_INFO`'s `tcpi_unacked` and
/// `tcpi_sacked`, which a listener uses for that).
pub fn accept_queue(listener: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // SAFETY: tcp_info is plain integers, for which all zeroes is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which is
    // live and that large; the fd is valid for the call.
    cvt(unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    })?;
    Ok((info.tcpi_unacked, info.tcpi_sacked))
}

/// `TCP_DEFER_ACCEPT`: `listener` hands out a connection only once its
/// first bytes arrived (or after `seconds`), so a reader of a header that
/// clients send first never waits for it.
pub fn defer_accept(listener: BorrowedFd<'_>, seconds: u32) -> io::Result<()> {
    let v = libc::c_int::try_from(seconds).unwrap_or(libc::c_int::MAX);
    // SAFETY: the option value is one live c_int, its size given; the fd is
    // valid for the call.
    cvt(unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Stops `listener` listening, for every process that holds it: what is
/// queued there goes to the other listeners of its reuseport group (the
/// group's program migrates it), and `accept` on it fails from now on.
pub fn stop_listening(listener: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: shutdown takes a valid fd and a flag; nothing is borrowed.
    cvt(unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RD) }).map(drop)
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

/// Takes an fd an earlier image of this master handed over (`lb
/// upgrade`), marked close-on-exec again. Call once per fd number.
pub fn handed_over(raw: RawFd) -> io::Result<OwnedFd> {
    scm::adopt_inherited(raw, Inherited::Upgrade)
}

/// Clears close-on-exec on `fd`: an image exec'd by `lb upgrade` inherits
/// it at the same number.
pub fn inheritable(fd: RawFd) -> io::Result<()> {
    set_cloexec(fd, false)
}

/// Sets close-on-exec on `fd` again (an upgrade's exec failed).
pub fn keep_private(fd: RawFd) -> io::Result<()> {
    set_cloexec(fd, true)
}

fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD on an fd number only read and set its flags
    // (EBADF if nothing is open there); no memory is touched.
    unsafe {
        let flags = cvt(libc::fcntl(fd, libc::F_GETFD))?;
        let flags = if on {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        cvt(libc::fcntl(fd, libc::F_SETFD, flags))?;
    }
    Ok(())
}

/// Raises the soft open-files limit to the hard limit: each connection in
/// flight costs the master an fd until the worker takes it, and the kernel
/// caps fds in flight over unix sockets by the same limit. Returns the new
/// soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// Takes an inherited listening socket (socket activation) after checking
/// that `raw` is open, a TCP or Unix stream socket and listening; marks it CLOEXEC
/// and non-blocking. Call once per fd number.
pub fn inherited_listener(raw: RawFd) -> io::Result<OwnedFd> {
    let listener = scm::adopt_inherited(raw, Inherited::Listener)?;
    socket2::SockRef::from(&listener).set_nonblocking(true)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[test]
    fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
        use nix::sys::resource::{Resource, getrlimit};
        // Not lowered first: the other tests of this process share the limit.
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(raise_nofile_limit().unwrap(), hard);
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
    }

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
}
