//! `sendmsg`/`recvmsg` with `SCM_RIGHTS` on a `SOCK_SEQPACKET` socket: all of
//! the fd-passing `unsafe` lives here and nowhere else.
//!
//! Buffers are the caller's or on the stack; nothing here allocates, so the
//! dispatch hot path can call [`send`] once per connection.

use std::io;
use std::mem::{self, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::wire::MAX_CONN_FDS;

/// Most fds one received message may carry: a CONN to a batching worker
/// carries up to [`MAX_CONN_FDS`], every other message at most one. A
/// buggy peer's extra fds are received and closed here rather than leaking
/// into `MSG_CTRUNC` limbo.
pub const MAX_FDS: usize = MAX_CONN_FDS;

/// Room for one `SCM_RIGHTS` header with `MAX_FDS` ints, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

const _: () = assert!(mem::size_of::<libc::cmsghdr>() + MAX_FDS * mem::size_of::<RawFd>() <= 64);

/// Points `msg`'s control data at `buf` and writes one `SCM_RIGHTS` header
/// carrying `fds` (1..=[`MAX_FDS`] of them) there. `buf` must outlive every
/// use of `msg`.
fn attach_fds(msg: &mut libc::msghdr, buf: &mut CmsgBuf, fds: &[RawFd]) {
    let fds = &fds[..fds.len().min(MAX_FDS)];
    let bytes = mem::size_of_val(fds) as u32;
    msg.msg_control = buf.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic. CMSG_FIRSTHDR reads
    // only msg_control/msg_controllen, which now describe `buf`, a live,
    // aligned 64-byte buffer (at least CMSG_SPACE(4 * MAX_FDS), checked
    // above), so the header and the ints written through CMSG_DATA (at most
    // MAX_FDS) stay inside it.
    unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(bytes) as usize;
        let c = libc::CMSG_FIRSTHDR(msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(bytes) as usize;
        let data = libc::CMSG_DATA(c).cast::<RawFd>();
        for (i, &fd) in fds.iter().enumerate() {
            std::ptr::write_unaligned(data.add(i), fd);
        }
    }
}

/// A libc return value: `-1` means the call failed and set `errno`.
pub trait SysRet: Copy + PartialEq {
    const FAILED: Self;
}

impl SysRet for i32 {
    const FAILED: Self = -1;
}

impl SysRet for i64 {
    const FAILED: Self = -1;
}

impl SysRet for isize {
    const FAILED: Self = -1;
}

/// Turns a libc `-1` return into the `errno` it set. The one syscall-result
/// helper of the crate: `crate::sys` uses it too (this module imports
/// nothing from the crate, so the shared helper lives here).
pub fn cvt<T: SysRet>(r: T) -> io::Result<T> {
    if r == T::FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Runs a libc call until it is not interrupted (`EINTR`), through [`cvt`].
pub fn cvt_r<T: SysRet>(mut call: impl FnMut() -> T) -> io::Result<T> {
    loop {
        match cvt(call()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Whether a call may block. The master's sockets are non-blocking and always
/// pass `DontWait`; a worker may block on its channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Block,
    DontWait,
}

impl Wait {
    fn flag(self) -> libc::c_int {
        match self {
            Wait::Block => 0,
            Wait::DontWait => libc::MSG_DONTWAIT,
        }
    }
}

/// Sends one datagram made of `header` then `payload`, with `fd` attached if
/// given; returns the bytes sent (all of them but on a stream socket, where
/// the fd goes with the first byte). `EAGAIN` comes back as
/// `ErrorKind::WouldBlock`; a gone peer as `EPIPE`/`ECONNRESET` (never `SIGPIPE`).
pub fn send(
    sock: BorrowedFd<'_>,
    header: &[u8],
    payload: &[u8],
    fd: Option<BorrowedFd<'_>>,
    wait: Wait,
) -> io::Result<usize> {
    let mut iov = [
        libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: header.len(),
        },
        libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        },
    ];
    let mut cmsg = CmsgBuf([0; 64]);
    // SAFETY: msghdr is a plain C struct for which all-zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = if payload.is_empty() { 1 } else { 2 };
    if let Some(fd) = fd {
        attach_fds(&mut msg, &mut cmsg, &[fd.as_raw_fd()]);
    }
    // SAFETY: `msg` points at `iov` and `cmsg`, both alive for the call; the
    // kernel only reads them. `sock` is a valid open fd for the call.
    cvt_r(|| unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | wait.flag()) })
        .map(|n| n as usize)
}

/// The fds one received message carried. Owned: any not taken are closed
/// when this is dropped, so an unexpected fd can never leak.
pub struct Fds {
    fds: [Option<OwnedFd>; MAX_FDS],
    len: usize,
}

impl Fds {
    const fn new() -> Self {
        Fds {
            fds: [const { None }; MAX_FDS],
            len: 0,
        }
    }

    /// How many fds arrived.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes the first fd, if one arrived.
    pub fn take_first(&mut self) -> Option<OwnedFd> {
        self.fds[0].take()
    }

    /// Takes every fd not taken yet, in the order they arrived.
    pub fn take_all(&mut self) -> impl Iterator<Item = OwnedFd> + '_ {
        self.fds[..self.len].iter_mut().filter_map(Option::take)
    }
}

/// What one `recvmsg` delivered.
pub struct Received {
    /// Bytes of data written into the caller's buffer; 0 means the peer closed.
    pub len: usize,
    /// The datagram was longer than the buffer (`MSG_TRUNC`).
    pub truncated: bool,
    /// Some fds were discarded by the kernel for lack of room (`MSG_CTRUNC`).
    pub fds_truncated: bool,
    pub fds: Fds,
}

/// Receives one datagram into `buf`, with any fds it carried (made CLOEXEC
/// by the kernel). `EAGAIN` comes back as `ErrorKind::WouldBlock`.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8], wait: Wait) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cmsg = MaybeUninit::<CmsgBuf>::uninit();
    // SAFETY: msghdr is a plain C struct for which all-zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is pure arithmetic.
    msg.msg_controllen =
        unsafe { libc::CMSG_SPACE((MAX_FDS * mem::size_of::<RawFd>()) as u32) } as usize;
    // SAFETY: `msg` points at `iov` (covering `buf`) and `cmsg`, both alive
    // and writable for the call and at least as long as the lengths given.
    let n = cvt_r(|| unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | wait.flag(),
        )
    })? as usize;
    let mut fds = Fds::new();
    // SAFETY: after a successful recvmsg the kernel has written msg_controllen
    // valid bytes of control data into `cmsg`; CMSG_FIRSTHDR/CMSG_NXTHDR only
    // walk inside that range. Each SCM_RIGHTS payload is an array of fds that
    // the kernel just installed in this process and that nobody else owns, so
    // wrapping each in an OwnedFd (exactly once) is sound.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    if fds.len < MAX_FDS {
                        fds.fds[fds.len] = Some(fd);
                        fds.len += 1;
                    }
                    // else: dropped here, i.e. closed.
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Received {
        len: n.min(buf.len()),
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
        fds,
    })
}

/// What an inherited fd must be for [`adopt_inherited`] to take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inherited {
    /// A worker's channel: an `AF_UNIX` `SOCK_SEQPACKET` socket.
    Channel,
    /// A socket-activation listener (`LISTEN_FDS`): a listening stream
    /// socket, TCP or Unix.
    Listener,
    /// What an earlier image of this master held (`lb upgrade`): its state
    /// names what each fd is.
    Upgrade,
}

impl Inherited {
    fn accepts(self, sock: &socket2::SockRef<'_>) -> bool {
        use socket2::{Domain, Type};
        match self {
            Inherited::Channel => {
                sock.domain().ok() == Some(Domain::UNIX)
                    && sock.r#type().ok() == Some(Type::SEQPACKET)
            }
            Inherited::Listener => {
                matches!(sock.domain(), Ok(d) if d == Domain::IPV4 || d == Domain::IPV6 || d == Domain::UNIX)
                    && sock.r#type().ok() == Some(Type::STREAM)
                    && sock.is_listener().unwrap_or(false)
            }
            Inherited::Upgrade => true,
        }
    }

    fn refusal(self, raw: RawFd) -> String {
        match self {
            Inherited::Channel => format!("fd {raw} is not an AF_UNIX SOCK_SEQPACKET socket"),
            Inherited::Listener => {
                format!("fd {raw} from LISTEN_FDS is not a listening TCP or Unix stream socket")
            }
            Inherited::Upgrade => format!("fd {raw} of the upgrade state"),
        }
    }
}

/// Takes ownership of an fd this process inherited across exec (a worker's
/// channel, a socket-activation listener) after checking that it is open
/// and the socket `want` names, then marks it CLOEXEC so this process's
/// own children do not inherit it. Call once per fd number.
pub fn adopt_inherited(raw: RawFd, want: Inherited) -> io::Result<OwnedFd> {
    if raw < 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "negative fd"));
    }
    // SAFETY: F_GETFD on any integer is harmless; it only reports EBADF when
    // nothing is open there.
    cvt(unsafe { libc::fcntl(raw, libc::F_GETFD) })?;
    // SAFETY: the fd is open (checked above), and it is inherited: nothing
    // else in this process owns it (the caller adopts each number once); it
    // is borrowed only for the check below.
    let fd = unsafe { BorrowedFd::borrow_raw(raw) };
    if !want.accepts(&socket2::SockRef::from(&fd)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            want.refusal(raw),
        ));
    }
    // SAFETY: as above; from here on this OwnedFd is the only owner.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(owned)
}

/// Datagrams one [`RecvBatch::recv`] takes at most.
pub const BATCH: usize = 16;

/// Receives several datagrams with one `recvmmsg`, into buffers allocated
/// once. For a reader that expects no fds (the master reading its workers):
/// any fd that arrives is closed at once and the message marked.
pub struct RecvBatch {
    data: Box<[u8]>,
    cmsg: Box<[CmsgBuf]>,
    len: [usize; BATCH],
    flags: [libc::c_int; BATCH],
    had_fds: [bool; BATCH],
}

/// One datagram of a batch.
pub struct Datagram<'a> {
    pub data: &'a [u8],
    /// Longer than `MAX_MESSAGE` (`MSG_TRUNC`).
    pub truncated: bool,
    /// It carried fds (closed already), or some were lost (`MSG_CTRUNC`).
    pub had_fds: bool,
}

/// What one `recvmmsg` gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// `n` datagrams; fewer than [`BATCH`] means the queue is now empty.
    Got(usize),
    /// The peer closed.
    Closed,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            data: Box::default(),
            cmsg: Box::default(),
            len: [0; BATCH],
            flags: [0; BATCH],
            had_fds: [false; BATCH],
        }
    }
}

impl RecvBatch {
    /// Buffers for [`BATCH`] datagrams of up to `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        RecvBatch {
            data: vec![0u8; BATCH * max_message].into_boxed_slice(),
            cmsg: (0..BATCH).map(|_| CmsgBuf([0; 64])).collect(),
            ..RecvBatch::default()
        }
    }

    fn max_message(&self) -> usize {
        self.data.len() / BATCH
    }

    /// Receives what is queued, up to [`BATCH`] datagrams, without blocking.
    /// An empty queue is `ErrorKind::WouldBlock`.
    pub fn recv(&mut self, sock: BorrowedFd<'_>) -> io::Result<Batch> {
        if self.data.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "RecvBatch without buffers",
            ));
        }
        let max = self.max_message();
        let base = self.data.as_mut_ptr();
        let mut iov: [MaybeUninit<libc::iovec>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
        // SAFETY: mmsghdr is a plain C struct for which all-zeroes is valid.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        for i in 0..BATCH {
            // SAFETY: `i * max` is inside `data` (BATCH * max bytes long).
            let iov_base = unsafe { base.add(i * max) }.cast();
            let v = iov[i].write(libc::iovec {
                iov_base,
                iov_len: max,
            });
            hdrs[i].msg_hdr.msg_iov = v;
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_control = self.cmsg[i].0.as_mut_ptr().cast();
            hdrs[i].msg_hdr.msg_controllen = 64;
        }
        // SAFETY: every header points at a live iovec covering its own
        // `max`-byte region of `data` and at its own 64-byte control buffer;
        // all outlive the call, and the kernel writes only there.
        let n = cvt_r(|| unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
                std::ptr::null_mut(),
            )
        })? as usize;
        // At EOF every slot comes back as an empty datagram; the protocol
        // never sends empty ones, so an empty first one means closed.
        if n == 0 || hdrs[0].msg_len == 0 {
            return Ok(Batch::Closed);
        }
        for (i, h) in hdrs.iter().enumerate().take(n) {
            self.len[i] = h.msg_len as usize;
            self.flags[i] = h.msg_hdr.msg_flags;
            let mut fds = false;
            // SAFETY: the kernel wrote msg_controllen bytes of control data
            // into this header's own buffer; CMSG_FIRSTHDR/NXTHDR stay inside
            // it. Each SCM_RIGHTS fd was just installed here and is owned by
            // nobody else, so wrapping it in an OwnedFd (to close it) is sound.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                        let data = libc::CMSG_DATA(c).cast::<RawFd>();
                        let count =
                            ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / mem::size_of::<RawFd>();
                        for k in 0..count {
                            drop(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(k))));
                            fds = true;
                        }
                    }
                    c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
                }
            }
            self.had_fds[i] = fds || h.msg_hdr.msg_flags & libc::MSG_CTRUNC != 0;
        }
        Ok(Batch::Got(n))
    }

    /// Datagram `i` of the last `recv` (i < n).
    pub fn get(&self, i: usize) -> Datagram<'_> {
        let max = self.max_message();
        let start = i * max;
        Datagram {
            data: &self.data[start..start + self.len[i].min(max)],
            truncated: self.flags[i] & libc::MSG_TRUNC != 0,
            had_fds: self.had_fds[i],
        }
    }
}

/// Most datagrams one [`send_each`] or [`send_grouped`] sends.
pub const SEND_BATCH: usize = 16;

/// Sends `headers[i]` with `fds[i]` attached, one datagram each, with one
/// `sendmmsg` (at most [`SEND_BATCH`]); `payloads[i]`, when given (the
/// slice may be shorter, or empty), follows its header in the same
/// datagram. Returns how many went out, in order; `EAGAIN` before the
/// first is `ErrorKind::WouldBlock`.
pub fn send_each<F: AsFd, P: AsRef<[u8]>>(
    sock: BorrowedFd<'_>,
    headers: &[[u8; crate::proto::HEADER_LEN]],
    payloads: &[P],
    fds: &[F],
) -> io::Result<usize> {
    send_grouped(sock, headers, payloads, fds, 1)
}

/// Sends `fds` in datagrams of `per` fds each (the last may have fewer;
/// `per` at most [`MAX_FDS`]), all with one `sendmmsg` (at most
/// [`SEND_BATCH`] datagrams): datagram `i` is `headers[i]`, then
/// `payloads[i]` when given, with fds `i * per ..` attached in one
/// `SCM_RIGHTS` message. Returns how many datagrams went out, in order (a
/// datagram goes whole or not at all); `EAGAIN` before the first is
/// `ErrorKind::WouldBlock`.
pub fn send_grouped<F: AsFd, P: AsRef<[u8]>>(
    sock: BorrowedFd<'_>,
    headers: &[[u8; crate::proto::HEADER_LEN]],
    payloads: &[P],
    fds: &[F],
    per: usize,
) -> io::Result<usize> {
    let per = per.clamp(1, MAX_CONN_FDS);
    let n = headers.len().min(fds.len().div_ceil(per)).min(SEND_BATCH);
    if n == 0 {
        return Ok(0);
    }
    // Two per datagram, side by side: its header, then its payload (if any).
    // SAFETY: iovec is a plain C struct for which all-zeroes is valid.
    let mut iov: [libc::iovec; 2 * SEND_BATCH] = unsafe { mem::zeroed() };
    let mut lens = [1usize; SEND_BATCH];
    for i in 0..n {
        iov[2 * i] = libc::iovec {
            iov_base: headers[i].as_ptr() as *mut libc::c_void,
            iov_len: headers[i].len(),
        };
        let payload = payloads.get(i).map_or(&[][..], AsRef::as_ref);
        if !payload.is_empty() {
            iov[2 * i + 1] = libc::iovec {
                iov_base: payload.as_ptr() as *mut libc::c_void,
                iov_len: payload.len(),
            };
            lens[i] = 2;
        }
    }
    let mut cmsg: [CmsgBuf; SEND_BATCH] = [const { CmsgBuf([0; 64]) }; SEND_BATCH];
    // SAFETY: mmsghdr is a plain C struct for which all-zeroes is valid.
    let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { mem::zeroed() };
    let base = iov.as_mut_ptr();
    for i in 0..n {
        let m = &mut hdrs[i].msg_hdr;
        // (`wrapping_add`: pointer arithmetic that stays inside `iov`.)
        m.msg_iov = base.wrapping_add(2 * i);
        m.msg_iovlen = lens[i] as _;
        let group = &fds[i * per..fds.len().min((i + 1) * per)];
        let mut raw = [-1 as RawFd; MAX_CONN_FDS];
        for (r, f) in raw.iter_mut().zip(group) {
            *r = f.as_fd().as_raw_fd();
        }
        attach_fds(m, &mut cmsg[i], &raw[..group.len()]);
    }
    // SAFETY: the first `n` headers point at live iovecs (over `headers`
    // and `payloads`) and control buffers that outlive the call; the kernel
    // only reads them.
    cvt_r(|| unsafe {
        libc::sendmmsg(
            sock.as_raw_fd(),
            hdrs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    })
    .map(|n| n as usize)
}
