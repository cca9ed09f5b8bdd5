//! The worker's end of the channel: READY, DRAIN, user messages, and the
//! connections the master hands over, or, under kernel dispatch
//! (`LB_OWN_LISTENER=1`), those the worker accepts from the listener of its
//! own that the master sent first (`docs/protocol.md` §2).

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::PollTimeout;
use nix::sys::socket::{getsockopt, sockopt};

use super::conn::ignore_gone;
use super::{Conn, FD_RESERVE, Incoming, Reporter, WorkerError, open_files, open_files_limit};
use crate::proto::{self, MAX_MESSAGE, Message, VERSION, Wait, env, kind, scm, wire};

/// `n` connections the kernel closed for want of a free fd to receive
/// them: the clients are gone; least-conn must hear of it, and the
/// operator (in lb's log), at most once a second.
fn lost(reporter: &Reporter, warned: &mut Option<Instant>, n: u64) {
    let _ = reporter.closed(n);
    if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
        *warned = Some(Instant::now());
        eprintln!(
            "lb::worker: {n} connection(s) lost: no free fd to receive them \
             (the open-files limit); raise RLIMIT_NOFILE"
        );
    }
}

/// The worker's end of the channel (and, under kernel dispatch, its own
/// listener).
#[derive(Debug)]
pub struct Listener {
    chan: Arc<OwnedFd>,
    /// Close (and accept) reports; whether they are sent at all.
    reporter: Reporter,
    /// Kernel dispatch: the listener the master sent, non-blocking, until
    /// DRAIN closes it.
    own: Option<mio::net::TcpListener>,
    /// The poller both fds are registered with (a `mio::event::Source`
    /// user's), so that DRAIN can take the listener out before closing it.
    registry: Option<mio::Registry>,
    slot: usize,
    generation: u64,
    /// The master's `drain_timeout` (`LB_DRAIN_TIMEOUT_MS`), if it said.
    drain_timeout: Option<Duration>,
    /// DRAIN has arrived (shared with every [`Conn`]).
    draining: Arc<AtomicBool>,
    /// When a lost connection was last reported on stderr.
    lost_warned: Option<Instant>,
    /// Files open besides the connections `accept` gave out (counted when
    /// the listener was made), and those connections.
    base_fds: u64,
    live: Arc<AtomicU64>,
    /// The client's address the last CONN carried (a PROXY header's).
    last_client: Option<SocketAddr>,
    /// The rest of a CONN that carried several connections
    /// (`wire::ready::BATCH`), with their clients' addresses: handed out
    /// before the channel is read again (DRAIN comes after them).
    queued: VecDeque<(OwnedFd, Option<SocketAddr>)>,
    done: bool,
    buf: Box<[u8]>,
}

impl Listener {
    /// Adopts the channel lb started this process with (`LB_FD` etc.).
    pub fn from_env() -> Result<Listener, WorkerError> {
        fn var(name: &'static str) -> Result<String, WorkerError> {
            std::env::var(name).map_err(|_| WorkerError::NotAWorker(name))
        }
        fn number<T: std::str::FromStr>(name: &'static str) -> Result<T, WorkerError> {
            let value = var(name)?;
            value
                .parse()
                .map_err(|_| WorkerError::BadEnv { var: name, value })
        }
        let protocol = var(env::PROTOCOL)?;
        if protocol != VERSION.to_string() {
            return Err(WorkerError::Protocol(protocol));
        }
        let fd: RawFd = number(env::FD)?;
        let slot = number(env::WORKER_ID)?;
        let generation = number(env::GENERATION)?;
        let drain_timeout = match std::env::var(env::DRAIN_TIMEOUT_MS) {
            Ok(_) => Some(Duration::from_millis(number(env::DRAIN_TIMEOUT_MS)?)),
            Err(_) => None,
        };
        let chan = scm::adopt_inherited(fd, scm::Inherited::Channel)
            .map_err(|source| WorkerError::Channel { fd, source })?;
        let mut listener = Listener::from_fd(chan, slot, generation);
        listener.drain_timeout = drain_timeout;
        // Nothing reads them: not sending them saves the master's CPU.
        listener.reporter.enabled = std::env::var(env::REPORT_CLOSED).as_deref() != Ok("0");
        if std::env::var(env::OWN_LISTENER).as_deref() == Ok("1") {
            listener.take_own_listener()?;
        }
        Ok(listener)
    }

    /// Kernel dispatch: takes the LISTENER the master sends first (what
    /// [`Listener::from_env`] does when `LB_OWN_LISTENER=1`); from now on
    /// connections are accepted from it, READY says so, and accepts are
    /// reported (batched) with closes.
    pub fn take_own_listener(&mut self) -> Result<(), WorkerError> {
        let fd = self.chan.as_raw_fd();
        let mut got = scm::recv(self.chan.as_fd(), &mut self.buf, Wait::Block)
            .map_err(|source| WorkerError::Channel { fd, source })?;
        let why = match wire::parse(&self.buf[..got.len], got.truncated) {
            _ if got.len == 0 => "the master closed the channel first".to_string(),
            Ok(Message::Listener) if got.fds.len() == 1 => String::new(),
            Ok(m) => format!("the first message was {m:?} with {} fds", got.fds.len()),
            Err(e) => format!("the first message was malformed: {e}"),
        };
        if !why.is_empty() {
            return Err(WorkerError::NoListener(why));
        }
        let listener = got.fds.take_first().expect("one fd");
        if getsockopt(&listener, sockopt::AcceptConn) != Ok(true) {
            return Err(WorkerError::NoListener(
                "its fd is not a listening socket".into(),
            ));
        }
        let listener = std::net::TcpListener::from(listener);
        // Shared with the master's copy, which never accepts from it.
        listener
            .set_nonblocking(true)
            .map_err(|source| WorkerError::Channel { fd, source })?;
        self.own = Some(mio::net::TcpListener::from_std(listener));
        self.reporter.accepted = Some(Arc::new(Mutex::new(0)));
        self.base_fds += 1;
        Ok(())
    }

    /// Whether connections come from a listener of this worker's own
    /// (kernel dispatch), not from the master; false again after DRAIN.
    pub fn owns_listener(&self) -> bool {
        self.own.is_some()
    }

    /// Wraps an already-open channel end (tests, embedding).
    pub fn from_fd(chan: OwnedFd, slot: usize, generation: u64) -> Listener {
        let chan = Arc::new(chan);
        Listener {
            reporter: Reporter {
                chan: Arc::clone(&chan),
                enabled: true,
                accepted: None,
            },
            chan,
            own: None,
            registry: None,
            slot,
            generation,
            drain_timeout: None,
            draining: Arc::new(AtomicBool::new(false)),
            lost_warned: None,
            base_fds: open_files(),
            live: Arc::new(AtomicU64::new(0)),
            last_client: None,
            queued: VecDeque::with_capacity(wire::MAX_CONN_FDS),
            done: false,
            buf: vec![0u8; MAX_MESSAGE].into_boxed_slice(),
        }
    }

    /// How long the master waits for this worker to drain before killing
    /// it (`LB_DRAIN_TIMEOUT_MS`), if it said.
    pub fn drain_timeout(&self) -> Option<Duration> {
        self.drain_timeout
    }

    /// How long a draining worker keeps an idle connection open, and a
    /// closing one half open: [`proto::IDLE_GRACE`] (2 s), at most a
    /// quarter of the drain timeout.
    pub fn idle_grace(&self) -> Duration {
        proto::idle_grace(self.drain_timeout)
    }

    /// What the next message is, without taking it: `Some(true)` for a
    /// connection, `Some(false)` for anything else (DRAIN, a message, the
    /// master's EOF), `None` when nothing is queued. A worker that may not
    /// take connections (at its open-files limit) still takes the rest.
    /// Under kernel dispatch a connection waiting in the own listener is
    /// `Some(true)` once the channel is empty ([`Listener::next`] takes
    /// the channel's messages first).
    pub fn next_is_conn(&self) -> io::Result<Option<bool>> {
        use nix::sys::socket::{MsgFlags, recv};
        if !self.queued.is_empty() {
            return Ok(Some(true));
        }
        let mut head = [0u8; proto::HEADER_LEN];
        match recv(
            self.chan.as_raw_fd(),
            &mut head,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(n) => Ok(Some(n >= 2 && head[0] == VERSION && head[1] == kind::CONN)),
            Err(nix::errno::Errno::EAGAIN) => match &self.own {
                Some(own) => Ok(readable(own.as_fd(), None, PollTimeout::ZERO)?.then_some(true)),
                None => Ok(None),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// Connections already received (the rest of a several-fd CONN) that
    /// [`Listener::next`] hands out before it reads the channel again. They
    /// hold their fds already: a worker at its open-files limit still takes
    /// them (and then what follows, DRAIN included).
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Whether DRAIN has arrived.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// This worker's slot (`LB_WORKER_ID`).
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// This worker's generation (`LB_GENERATION`).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Tells the master this worker takes connections. None arrive before.
    /// Under kernel dispatch it says that they come from the own listener
    /// (`wire::ready::OWN_LISTENER`): the kernel steers none to it before.
    /// Otherwise it says that a CONN may carry the client's address
    /// (`wire::ready::PEER_ADDRESS`) and several connections
    /// (`wire::ready::BATCH`), which this adapter reads.
    pub fn ready(&self) -> io::Result<()> {
        let flags = if self.own.is_some() {
            wire::ready::OWN_LISTENER
        } else {
            wire::ready::PEER_ADDRESS | wire::ready::BATCH
        };
        proto::send_plain(self.chan.as_fd(), kind::READY, flags, &[], Wait::Block)
    }

    /// Tells the master this worker is about to exit on its own: it sends
    /// nothing more and starts a replacement now. Connections already
    /// received ([`Listener::queued`]) are this worker's to serve: `next`
    /// and `accept` still hand them out.
    pub fn leaving(&self) -> io::Result<()> {
        ignore_gone(proto::send_plain(
            self.chan.as_fd(),
            kind::LEAVING,
            0,
            &[],
            Wait::Block,
        ))
    }

    /// Sends a user message (at most `proto::MAX_PAYLOAD` bytes) to the master.
    pub fn send(&self, payload: &[u8]) -> io::Result<()> {
        proto::send_plain(self.chan.as_fd(), kind::USER, 0, payload, Wait::Block)
    }

    /// Reports `n` closed connections (event-loop servers; [`Conn`] does it itself).
    pub fn report_closed(&self, n: u64) -> io::Result<()> {
        self.reporter().closed(n)
    }

    /// A handle for reporting closes from elsewhere (another thread).
    pub fn reporter(&self) -> Reporter {
        self.reporter.clone()
    }

    /// The client's address the master sent with the connection
    /// [`Listener::next`] returned last (from a PROXY protocol header),
    /// if it sent one; `None` means the socket's peer is the client
    /// (`peer_addr`). Ask before the next call.
    pub fn last_client_addr(&self) -> Option<SocketAddr> {
        self.last_client
    }

    /// The next thing the master sent, or under kernel dispatch the next
    /// connection from the own listener (the channel's messages first, so
    /// DRAIN is never stuck behind a busy listener). With `Wait::DontWait`,
    /// `WouldBlock` means nothing is queued. Malformed or unknown messages
    /// are skipped. A connection is non-blocking and CLOEXEC either way.
    /// A CONN that brought several connections (`wire::ready::BATCH`)
    /// gives them one per call, the rest without reading the channel: an
    /// event loop calls this until `WouldBlock` after each readable edge
    /// (as edge-triggered polling wants anyway), or they wait for the next
    /// message.
    ///
    /// At the open-files limit (`EMFILE`) a connection is left in the own
    /// listener's queue and this says `WouldBlock` (or, blocking, retries
    /// every 10 ms): keep [`FD_RESERVE`] free, as with the channel.
    pub fn next(&mut self, wait: Wait) -> io::Result<Incoming> {
        if self.done {
            return Ok(Incoming::Closed);
        }
        loop {
            if self.own.is_none() {
                return self.next_message(wait);
            }
            match self.next_message(Wait::DontWait) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            let Some(own) = &self.own else {
                continue; // DRAIN closed it
            };
            match own.accept() {
                Ok((stream, _)) => {
                    self.last_client = None;
                    // A report that cannot go out does not cost the client
                    // its connection (a broken channel shows on the next read).
                    let _ = self.reporter.accepted_one();
                    return Ok(Incoming::Conn(TcpStream::from(stream)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if accept_retries(&e) => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    if self
                        .lost_warned
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                    {
                        self.lost_warned = Some(Instant::now());
                        eprintln!(
                            "lb::worker: no free fd to accept a connection (the open-files \
                             limit): it waits in the listener's queue; raise RLIMIT_NOFILE"
                        );
                    }
                    if wait == Wait::Block {
                        self.reporter.flush_accepted()?;
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                }
                Err(e) => return Err(e),
            }
            // Nothing queued: what was accepted is reported before waiting.
            self.reporter.flush_accepted()?;
            if wait == Wait::DontWait {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            readable(self.chan.as_fd(), Some(own.as_fd()), PollTimeout::NONE)?;
        }
    }

    /// The next message on the channel (all of [`Listener::next`] under
    /// master dispatch).
    fn next_message(&mut self, wait: Wait) -> io::Result<Incoming> {
        if let Some((fd, client)) = self.queued.pop_front() {
            self.last_client = client;
            return Ok(Incoming::Conn(TcpStream::from(fd)));
        }
        loop {
            let mut got = scm::recv(self.chan.as_fd(), &mut self.buf, wait)?;
            if got.len == 0 {
                self.done = true;
                return Ok(Incoming::Closed);
            }
            match wire::parse(&self.buf[..got.len], got.truncated) {
                Ok(Message::Conn { peer, count, .. })
                    if !got.fds.is_empty() && got.fds.len() <= count =>
                {
                    let short = count - got.fds.len();
                    let mut peers = wire::peers(peer);
                    for fd in got.fds.take_all() {
                        let client = peers.next().and_then(super::peer::of_payload);
                        self.queued.push_back((fd, client));
                    }
                    // Fewer fds than the CONN says: the kernel closed the
                    // rest for want of room (at the fd limit).
                    if short > 0 {
                        lost(&self.reporter, &mut self.lost_warned, short as u64);
                    }
                    let (fd, client) = self.queued.pop_front().expect("one fd at least");
                    self.last_client = client;
                    return Ok(Incoming::Conn(TcpStream::from(fd)));
                }
                Ok(Message::Drain) => {
                    self.draining.store(true, Ordering::Relaxed);
                    self.close_own_listener();
                    return Ok(Incoming::Drain);
                }
                Ok(Message::User(p)) => return Ok(Incoming::Message(p.to_vec())),
                // The kernel closed the fd for want of room (at the fd
                // limit): the client is gone; least-conn must hear of it,
                // and the operator (in lb's log), at most once a second.
                Ok(Message::Conn { count, .. }) if got.fds.is_empty() && got.fds_truncated => {
                    lost(&self.reporter, &mut self.lost_warned, count as u64);
                }
                // Anything else (a CONN without its fds included):
                // skipped; any fds are closed as `got` drops.
                _ => continue,
            }
        }
    }

    /// Blocks for the next connection, made blocking for `std::io` use.
    /// `Ok(None)` after DRAIN or when the master is gone. User messages are
    /// skipped here; use [`Listener::next`] to see them.
    ///
    /// It takes no connection while fewer than [`FD_RESERVE`] files would
    /// be left free (it waits for a [`Conn`] to be dropped, saying so once),
    /// so that the master sends to other workers instead.
    pub fn accept(&mut self) -> io::Result<Option<Conn>> {
        let limit = open_files_limit();
        let mut said = false;
        loop {
            while self.queued.is_empty()
                && self.base_fds + self.live.load(Ordering::Relaxed) + FD_RESERVE >= limit
            {
                // Not a connection (DRAIN, the master gone): take it now.
                if self.next_is_conn()? == Some(false) {
                    break;
                }
                if !said {
                    said = true;
                    eprintln!(
                        "lb::worker: {} connections open, near the limit of {limit} open \
                         files: taking no more until some close",
                        self.live.load(Ordering::Relaxed)
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            match self.next(Wait::Block)? {
                Incoming::Conn(stream) => {
                    stream.set_nonblocking(false)?;
                    self.live.fetch_add(1, Ordering::Relaxed);
                    return Ok(Some(Conn {
                        stream: Some(stream),
                        reporter: self.reporter(),
                        draining: Arc::clone(&self.draining),
                        live: Arc::clone(&self.live),
                        client: self.last_client,
                    }));
                }
                Incoming::Drain | Incoming::Closed => {
                    self.done = true;
                    return Ok(None);
                }
                Incoming::Message(_) => continue,
            }
        }
    }

    /// Connections until DRAIN or the master's exit.
    pub fn incoming(&mut self) -> impl Iterator<Item = io::Result<Conn>> + '_ {
        std::iter::from_fn(move || self.accept().transpose())
    }

    /// DRAIN under kernel dispatch: the master keeps a copy of the own
    /// listener until it has seen this process go, so closing this fd
    /// alone would leave what is queued there waiting; shutting the socket
    /// down stops it listening now, and the kernel moves its queue to the
    /// other workers' listeners.
    fn close_own_listener(&mut self) {
        let Some(mut own) = self.own.take() else {
            return;
        };
        if let Some(registry) = self.registry.take() {
            // Before it closes (as `own` drops): epoll registers the
            // socket, which the master's copy may keep open.
            let _ = mio::event::Source::deregister(&mut own, &registry);
        }
        let _ = nix::sys::socket::shutdown(own.as_raw_fd(), nix::sys::socket::Shutdown::Read);
    }
}

/// Waits until `fd` (or `also`) is readable, or `timeout`; whether one is.
fn readable(
    fd: BorrowedFd<'_>,
    also: Option<BorrowedFd<'_>>,
    timeout: PollTimeout,
) -> io::Result<bool> {
    use nix::poll::{PollFd, PollFlags, poll};
    let mut both = [
        PollFd::new(fd, PollFlags::POLLIN),
        PollFd::new(fd, PollFlags::empty()),
    ];
    if let Some(also) = also {
        both[1] = PollFd::new(also, PollFlags::POLLIN);
    }
    let polled = &mut both[..1 + usize::from(also.is_some())];
    loop {
        match poll(polled, timeout) {
            Ok(n) => return Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Errors `accept` passes on from a connection that failed before it was
/// taken (`accept(2)`: to be retried like `EAGAIN`).
fn accept_retries(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
        || matches!(
            e.raw_os_error(),
            Some(
                libc::ECONNABORTED
                    | libc::EPROTO
                    | libc::ENETDOWN
                    | libc::ENOPROTOOPT
                    | libc::EHOSTDOWN
                    | libc::ENONET
                    | libc::EHOSTUNREACH
                    | libc::EOPNOTSUPP
                    | libc::ENETUNREACH
            )
        )
}

/// The channel's fd. Under kernel dispatch connections arrive on the own
/// listener, not here: a poller should take the `mio::event::Source`,
/// which registers both.
impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.chan.as_raw_fd()
    }
}

/// Under kernel dispatch both the channel (DRAIN, user messages) and the
/// own listener are registered, with the one token: an event on it means
/// "call [`Listener::next`] until `WouldBlock`".
impl mio::event::Source for Listener {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        mio::unix::SourceFd(&self.chan.as_raw_fd()).register(registry, token, interests)?;
        if let Some(own) = &mut self.own {
            own.register(registry, token, interests)?;
            self.registry = Some(registry.try_clone()?);
        }
        Ok(())
    }

    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        mio::unix::SourceFd(&self.chan.as_raw_fd()).reregister(registry, token, interests)?;
        match &mut self.own {
            Some(own) => own.reregister(registry, token, interests),
            None => Ok(()),
        }
    }

    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        mio::unix::SourceFd(&self.chan.as_raw_fd()).deregister(registry)?;
        self.registry = None;
        match &mut self.own {
            Some(own) => own.deregister(registry),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    #[test]
    fn conn_reports_its_close_and_drain_ends_incoming() {
        let (master, worker) = proto::pair().unwrap();
        let mut l = Listener::from_fd(worker, 0, 1);
        l.ready().unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        let (accepted, _) = tcp.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        proto::send_conn(master.as_fd(), accepted.as_fd(), 1).unwrap();
        drop(accepted);
        proto::send_plain(master.as_fd(), kind::DRAIN, 0, &[], Wait::Block).unwrap();

        let mut conns = l.incoming();
        let mut c = conns.next().unwrap().unwrap();
        assert!(!c.nonblocking_is_set());
        c.write_all(b"x").unwrap();
        drop(c);
        assert!(conns.next().is_none(), "DRAIN ends the iterator");

        let mut byte = [0u8; 1];
        client.read_exact(&mut byte).unwrap();
        let mut buf = [0u8; MAX_MESSAGE];
        let mut seen = Vec::new();
        while let Ok(got) = scm::recv(master.as_fd(), &mut buf, Wait::DontWait) {
            seen.push(wire::parse(&buf[..got.len], false).unwrap().to_owned_kind());
        }
        assert_eq!(seen, [kind::READY, kind::CLOSED]);
    }

    #[test]
    fn a_conn_knows_of_drain_and_closes_gracefully() {
        let (master, worker) = proto::pair().unwrap();
        let mut l = Listener::from_fd(worker, 0, 1);
        assert_eq!(l.idle_grace(), proto::IDLE_GRACE);
        l.drain_timeout = Some(Duration::from_secs(1));
        assert_eq!(l.idle_grace(), Duration::from_millis(250));
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        let (accepted, _) = tcp.accept().unwrap();
        proto::send_conn(master.as_fd(), accepted.as_fd(), 1).unwrap();
        drop(accepted);
        let mut c = l.accept().unwrap().unwrap();
        assert!(!c.draining() && !l.draining());
        proto::send_plain(master.as_fd(), kind::DRAIN, 0, &[], Wait::Block).unwrap();
        assert!(l.accept().unwrap().is_none());
        assert!(c.draining() && l.draining());
        // Between requests: none comes, so the idle grace ends the wait.
        let waited = Instant::now();
        assert!(!c.wait_for_request(Duration::from_millis(300)).unwrap());
        assert!(waited.elapsed() >= Duration::from_millis(300));
        // The last response, then a request the client had already sent:
        // the close must not reset the connection under the response.
        c.write_all(b"last").unwrap();
        client.write_all(b"pipelined request").unwrap();
        assert!(c.wait_for_request(Duration::from_secs(5)).unwrap());
        let closer = std::thread::spawn(move || c.close_gracefully(Duration::from_secs(5)));
        let mut got = [0u8; 4];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"last");
        assert_eq!(client.read(&mut got).unwrap(), 0, "a FIN, not a reset");
        drop(client);
        closer.join().unwrap();
    }

    #[test]
    fn an_endless_grace_does_not_overflow() {
        let (master, worker) = proto::pair().unwrap();
        let mut l = Listener::from_fd(worker, 0, 1);
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        let (accepted, _) = tcp.accept().unwrap();
        proto::send_conn(master.as_fd(), accepted.as_fd(), 1).unwrap();
        drop(accepted);
        let c = l.accept().unwrap().unwrap();
        // The client has closed: the close ends at its EOF, not the grace.
        drop(client);
        c.close_gracefully(Duration::MAX);
    }

    trait NonBlocking {
        fn nonblocking_is_set(&self) -> bool;
    }
    impl NonBlocking for Conn {
        fn nonblocking_is_set(&self) -> bool {
            let fl = nix::fcntl::fcntl(&**self, nix::fcntl::FcntlArg::F_GETFL).unwrap();
            fl & libc::O_NONBLOCK != 0
        }
    }
    trait KindOf {
        fn to_owned_kind(&self) -> u8;
    }
    impl KindOf for Message<'_> {
        fn to_owned_kind(&self) -> u8 {
            match self {
                Message::Ready { .. } => kind::READY,
                Message::Closed { .. } => kind::CLOSED,
                _ => 0,
            }
        }
    }

    #[test]
    fn from_env_explains_what_is_missing() {
        // The test process was not started by lb.
        if std::env::var(env::PROTOCOL).is_err() {
            let e = Listener::from_env().unwrap_err().to_string();
            assert!(
                e.contains("LB_PROTOCOL") && e.contains("started by lb"),
                "{e}"
            );
        }
    }

    /// Kernel dispatch against a fake master on a real socketpair: what
    /// it sends first, and everything the worker said, in order.
    struct FakeMaster {
        chan: OwnedFd,
        /// The master's copy of the worker's listener.
        tcp: TcpListener,
    }

    impl FakeMaster {
        fn start() -> (FakeMaster, Listener) {
            let (chan, worker) = proto::pair().unwrap();
            let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
            scm::send(
                chan.as_fd(),
                &wire::header(kind::LISTENER, 0),
                &[],
                Some(tcp.as_fd()),
                Wait::Block,
            )
            .unwrap();
            let mut l = Listener::from_fd(worker, 0, 1);
            l.take_own_listener().unwrap();
            assert!(l.owns_listener());
            (FakeMaster { chan, tcp }, l)
        }

        fn connect(&self) -> TcpStream {
            TcpStream::connect(self.tcp.local_addr().unwrap()).unwrap()
        }

        fn send(&self, k: u8) {
            proto::send_plain(self.chan.as_fd(), k, 0, &[], Wait::Block).unwrap();
        }

        /// (kind, value) of every message the worker sent so far.
        fn heard(&self) -> Vec<(u8, u64)> {
            let mut buf = [0u8; MAX_MESSAGE];
            let mut seen = Vec::new();
            while let Ok(got) = scm::recv(self.chan.as_fd(), &mut buf, Wait::DontWait) {
                assert_eq!(got.len, proto::HEADER_LEN);
                let mut value = [0u8; 8];
                value.copy_from_slice(&buf[8..16]);
                seen.push((buf[1], u64::from_le_bytes(value)));
            }
            seen
        }
    }

    #[test]
    fn kernel_dispatch_accepts_from_the_own_listener_and_reports_in_batches() {
        let (master, mut l) = FakeMaster::start();
        l.ready().unwrap();
        let mut clients: Vec<TcpStream> = (0..3).map(|_| master.connect()).collect();
        let mut conns: Vec<Conn> = (0..3).map(|_| l.accept().unwrap().unwrap()).collect();
        for (i, c) in conns.iter_mut().enumerate() {
            // Blocking, as the CONN ones are made for `std::io`; CLOEXEC.
            assert!(!c.nonblocking_is_set());
            let fd = nix::fcntl::fcntl(&**c, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(fd & libc::FD_CLOEXEC, 0);
            write!(c, "conn {i}").unwrap();
        }
        // Nothing is reported while accepts keep coming.
        assert_eq!(master.heard(), [(kind::READY, wire::ready::OWN_LISTENER)]);
        drop(conns);
        for (i, client) in clients.iter_mut().enumerate() {
            let mut text = String::new();
            client.read_to_string(&mut text).unwrap();
            assert_eq!(text, format!("conn {i}"));
        }
        // One ACCEPTED for the three, before any CLOSED.
        assert_eq!(
            master.heard(),
            [
                (kind::ACCEPTED, 3),
                (kind::CLOSED, 1),
                (kind::CLOSED, 1),
                (kind::CLOSED, 1)
            ]
        );
    }

    #[test]
    fn an_event_loop_sees_both_the_channel_and_the_own_listener() {
        let (master, mut l) = FakeMaster::start();
        let mut poll = mio::Poll::new().unwrap();
        let mut events = mio::Events::with_capacity(8);
        poll.registry()
            .register(&mut l, mio::Token(7), mio::Interest::READABLE)
            .unwrap();
        let _client = master.connect();
        poll.poll(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        assert!(events.iter().any(|e| e.token() == mio::Token(7)));
        let Incoming::Conn(stream) = l.next(Wait::DontWait).unwrap() else {
            panic!("not a connection");
        };
        // Non-blocking, as a CONN's is.
        let fl = nix::fcntl::fcntl(&stream, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        let e = l.next(Wait::DontWait).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        // Nothing more to accept: the accept is reported now.
        assert_eq!(master.heard(), [(kind::ACCEPTED, 1)]);
        l.report_closed(1).unwrap();
        drop(stream);
        // DRAIN comes on the channel, under the same token.
        master.send(kind::DRAIN);
        poll.poll(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        assert!(events.iter().any(|e| e.token() == mio::Token(7)));
        assert!(matches!(l.next(Wait::DontWait).unwrap(), Incoming::Drain));
        assert!(!l.owns_listener() && l.draining());
        // The listener is out of the poller: a connection attempt now
        // wakes nothing.
        let _ = TcpStream::connect(master.tcp.local_addr().unwrap());
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .unwrap();
        assert!(events.is_empty(), "a stale registration woke the poller");
        assert_eq!(master.heard(), [(kind::CLOSED, 1)]);
    }

    /// DRAIN stops the own listener at once, though the master still holds
    /// a copy of it: what is queued there is the kernel's to move to the
    /// other workers (here, with no other, to refuse).
    #[test]
    fn drain_stops_the_own_listener_though_the_master_holds_a_copy() {
        let (master, mut l) = FakeMaster::start();
        let queued = master.connect();
        // The channel comes first: DRAIN is not stuck behind the queue.
        master.send(kind::DRAIN);
        assert!(matches!(l.next(Wait::Block).unwrap(), Incoming::Drain));
        assert!(!l.owns_listener());
        assert_eq!(getsockopt(&master.tcp, sockopt::AcceptConn), Ok(false));
        let refused = TcpStream::connect(master.tcp.local_addr().unwrap());
        assert!(refused.is_err(), "still listening after DRAIN");
        // The queued connection was not accepted and kept: it is reset.
        let mut queued = queued;
        queued
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert!(
            queued
                .read(&mut [0u8; 1])
                .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionReset)
        );
    }

    #[test]
    fn a_blocking_accept_wakes_for_either() {
        let (master, mut l) = FakeMaster::start();
        let addr = master.tcp.local_addr().unwrap();
        let connector = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            TcpStream::connect(addr).unwrap()
        });
        let c = l.accept().unwrap().expect("a connection");
        let client = connector.join().unwrap();
        assert_eq!(c.peer_addr().unwrap(), client.local_addr().unwrap());
        let chan = master.chan.try_clone().unwrap();
        let drainer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            proto::send_plain(chan.as_fd(), kind::DRAIN, 0, &[], Wait::Block).unwrap();
        });
        assert!(l.accept().unwrap().is_none(), "DRAIN ends a blocked accept");
        drainer.join().unwrap();
        drop(c);
        // Reported before waiting, then the close.
        assert_eq!(master.heard(), [(kind::ACCEPTED, 1), (kind::CLOSED, 1)]);
    }

    #[test]
    fn master_dispatch_says_ready_without_the_flag() {
        let (master, worker) = proto::pair().unwrap();
        let l = Listener::from_fd(worker, 0, 1);
        assert!(!l.owns_listener());
        l.ready().unwrap();
        let mut buf = [0u8; MAX_MESSAGE];
        let got = scm::recv(master.as_fd(), &mut buf, Wait::DontWait).unwrap();
        // Without OWN_LISTENER; with PEER_ADDRESS and BATCH, which the
        // adapter reads.
        assert_eq!(
            &buf[..got.len],
            &wire::header(kind::READY, wire::ready::PEER_ADDRESS | wire::ready::BATCH)
        );
    }

    /// A fake master's CONN with `payload`; the client's end.
    fn conn_with(master: &OwnedFd, payload: &[u8]) -> TcpStream {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        let (accepted, _) = tcp.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        scm::send(
            master.as_fd(),
            &wire::header(kind::CONN, 1),
            payload,
            Some(accepted.as_fd()),
            Wait::Block,
        )
        .unwrap();
        client
    }

    /// Near the fd limit, the rest of a batched CONN (already
    /// open fds) must not wait for an unrelated connection to close.
    #[test]
    fn queued_conns_do_not_wait_at_the_fd_limit() {
        let (master, worker) = proto::pair().unwrap();
        let mut l = Listener::from_fd(worker, 0, 1);
        let limit = open_files_limit();
        // One fd of room below the reserve: the CONN is read.
        l.base_fds = limit - FD_RESERVE - 1;
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let _clients: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(tcp.local_addr().unwrap()).unwrap())
            .collect();
        let accepted: Vec<_> = (0..3).map(|_| tcp.accept().unwrap().0).collect();
        proto::send_conns(
            master.as_fd(),
            &accepted,
            &[] as &[&[u8]],
            1,
            wire::MAX_CONN_FDS,
        )
        .unwrap();
        drop(accepted);
        let first = l.accept().unwrap().expect("first");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let second = l.accept();
            let _ = tx.send(second.map(|c| c.is_some()));
        });
        let got = rx.recv_timeout(Duration::from_secs(2));
        drop(first);
        assert!(
            got.is_ok(),
            "the second connection, already received, waited for the first to close"
        );
    }

    /// A CONN with three fds (a batching worker's) is three connections,
    /// in fd order, each with its own line of the payload; DRAIN behind it
    /// comes after all three.
    #[test]
    fn a_conn_with_several_fds_is_as_many_connections_in_order() {
        let (master, worker) = proto::pair().unwrap();
        let mut l = Listener::from_fd(worker, 0, 1);
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let clients: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(tcp.local_addr().unwrap()).unwrap())
            .collect();
        let accepted: Vec<_> = (0..3).map(|_| tcp.accept().unwrap().0).collect();
        let payload: [&[u8]; 1] = [b"203.0.113.7:1\n\n[2001:db8::7]:3"];
        assert_eq!(
            proto::send_conns(master.as_fd(), &accepted, &payload, 1, wire::MAX_CONN_FDS).unwrap(),
            3
        );
        proto::send_plain(master.as_fd(), kind::DRAIN, 0, &[], Wait::Block).unwrap();
        let want = [
            Some("203.0.113.7:1".parse().unwrap()),
            None,
            Some("[2001:db8::7]:3".parse().unwrap()),
        ];
        for (client, want) in clients.iter().zip(want) {
            let c = l.accept().unwrap().expect("a connection");
            assert_eq!(
                c.peer_addr().unwrap(),
                client.local_addr().unwrap(),
                "fd order"
            );
            assert_eq!(
                c.client_addr().unwrap(),
                want.unwrap_or(client.local_addr().unwrap())
            );
        }
        assert!(l.accept().unwrap().is_none(), "DRAIN after them");
    }

    /// The client's address a CONN carries is the connection's; without
    /// one (or with one that is no address) it is the socket's peer.
    #[test]
    fn a_conn_knows_its_client_behind_a_balancer() {
        let (master, worker) = proto::pair().unwrap();
        let mut l = Listener::from_fd(worker, 0, 1);
        let _client = conn_with(&master, b"203.0.113.7:4242");
        let c = l.accept().unwrap().unwrap();
        assert_eq!(
            c.client_addr().unwrap(),
            "203.0.113.7:4242".parse().unwrap()
        );
        let _client = conn_with(&master, b"[2001:db8::7]:4242");
        let c = l.accept().unwrap().unwrap();
        assert_eq!(
            c.client_addr().unwrap(),
            "[2001:db8::7]:4242".parse().unwrap()
        );
        for payload in [
            &b""[..],
            b"garbage",
            b"203.0.113.7:99999",
            &[0xff; 4000][..],
        ] {
            let client = conn_with(&master, payload);
            let c = l.accept().unwrap().unwrap();
            assert_eq!(c.client_addr().unwrap(), client.local_addr().unwrap());
        }
        // An event loop asks the listener, right after `next`.
        let _client = conn_with(&master, b"198.51.100.1:1");
        assert!(matches!(l.next(Wait::Block).unwrap(), Incoming::Conn(_)));
        assert_eq!(
            l.last_client_addr(),
            Some("198.51.100.1:1".parse().unwrap())
        );
        let _client = conn_with(&master, b"");
        assert!(matches!(l.next(Wait::Block).unwrap(), Incoming::Conn(_)));
        assert_eq!(l.last_client_addr(), None);
    }

    #[test]
    fn a_first_message_other_than_listener_is_refused() {
        let (master, worker) = proto::pair().unwrap();
        proto::send_plain(master.as_fd(), kind::DRAIN, 0, &[], Wait::Block).unwrap();
        let mut l = Listener::from_fd(worker, 0, 1);
        let e = l.take_own_listener().unwrap_err().to_string();
        assert!(
            e.contains("LB_OWN_LISTENER=1") && e.contains("Drain"),
            "{e}"
        );
        // A LISTENER whose fd is not listening.
        let (master, worker) = proto::pair().unwrap();
        scm::send(
            master.as_fd(),
            &wire::header(kind::LISTENER, 0),
            &[],
            Some(master.as_fd()),
            Wait::Block,
        )
        .unwrap();
        let mut l = Listener::from_fd(worker, 0, 1);
        let e = l.take_own_listener().unwrap_err().to_string();
        assert!(e.contains("not a listening socket"), "{e}");
        drop(master);
        let (master, worker) = proto::pair().unwrap();
        drop(master);
        let mut l = Listener::from_fd(worker, 0, 1);
        let e = l.take_own_listener().unwrap_err().to_string();
        assert!(e.contains("closed the channel"), "{e}");
    }

    /// Connections closed on other threads while more are accepted: at no
    /// point has the master heard of more closes than accepts (it counts
    /// that as a protocol error), and in the end of every one of each.
    #[test]
    fn no_close_overtakes_its_accept_across_threads() {
        const N: u64 = 300;
        let (master, mut l) = FakeMaster::start();
        let addr = master.tcp.local_addr().unwrap();
        let chan = master.chan.try_clone().unwrap();
        let hearer = std::thread::spawn(move || {
            let (mut accepted, mut closed) = (0u64, 0u64);
            let mut buf = [0u8; MAX_MESSAGE];
            while closed < N {
                let got = scm::recv(chan.as_fd(), &mut buf, Wait::Block).unwrap();
                match wire::parse(&buf[..got.len], false).unwrap() {
                    Message::Accepted { n } => accepted += n,
                    Message::Closed { n } => closed += n,
                    _ => {}
                }
                assert!(closed <= accepted, "{closed} closed of {accepted} accepted");
            }
            accepted
        });
        let connector = std::thread::spawn(move || {
            for _ in 0..N {
                drop(TcpStream::connect(addr).unwrap());
            }
        });
        let (to_closers, from_acceptor) = std::sync::mpsc::channel::<Conn>();
        let from_acceptor = Arc::new(Mutex::new(from_acceptor));
        let closers: Vec<_> = (0..4)
            .map(|_| {
                let from = Arc::clone(&from_acceptor);
                std::thread::spawn(move || {
                    loop {
                        let next = from.lock().unwrap().recv();
                        let Ok(conn) = next else { return };
                        drop(conn);
                    }
                })
            })
            .collect();
        for _ in 0..N {
            to_closers.send(l.accept().unwrap().unwrap()).unwrap();
        }
        drop(to_closers);
        for c in closers {
            c.join().unwrap();
        }
        connector.join().unwrap();
        assert_eq!(hearer.join().unwrap(), N);
    }
}
