//! The worker's end of the channel: READY, DRAIN, user messages, and the
//! connections the master hands over.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::conn::ignore_gone;
use super::{Conn, FD_RESERVE, Incoming, Reporter, WorkerError, open_files, open_files_limit};
use crate::proto::{self, MAX_MESSAGE, Message, VERSION, Wait, env, kind, scm, wire};

/// The worker's end of the channel.
#[derive(Debug)]
pub struct Listener {
    chan: Arc<OwnedFd>,
    report_closed: bool,
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
        listener.report_closed = std::env::var(env::REPORT_CLOSED).as_deref() != Ok("0");
        Ok(listener)
    }

    /// Wraps an already-open channel end (tests, embedding).
    pub fn from_fd(chan: OwnedFd, slot: usize, generation: u64) -> Listener {
        Listener {
            chan: Arc::new(chan),
            report_closed: true,
            slot,
            generation,
            drain_timeout: None,
            draining: Arc::new(AtomicBool::new(false)),
            lost_warned: None,
            base_fds: open_files(),
            live: Arc::new(AtomicU64::new(0)),
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
    pub fn next_is_conn(&self) -> io::Result<Option<bool>> {
        use nix::sys::socket::{MsgFlags, recv};
        let mut head = [0u8; proto::HEADER_LEN];
        match recv(
            self.chan.as_raw_fd(),
            &mut head,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(n) => Ok(Some(n >= 2 && head[0] == VERSION && head[1] == kind::CONN)),
            Err(nix::errno::Errno::EAGAIN) => Ok(None),
            Err(e) => Err(e.into()),
        }
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
    pub fn ready(&self) -> io::Result<()> {
        proto::send_plain(self.chan.as_fd(), kind::READY, 0, &[], Wait::Block)
    }

    /// Tells the master this worker is about to exit on its own: it sends
    /// nothing more and starts a replacement now.
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
        Reporter {
            chan: Arc::clone(&self.chan),
            enabled: self.report_closed,
        }
    }

    /// The next thing the master sent. With `Wait::DontWait`, `WouldBlock`
    /// means nothing is queued. Malformed or unknown messages are skipped.
    pub fn next(&mut self, wait: Wait) -> io::Result<Incoming> {
        if self.done {
            return Ok(Incoming::Closed);
        }
        loop {
            let mut got = scm::recv(self.chan.as_fd(), &mut self.buf, wait)?;
            if got.len == 0 {
                self.done = true;
                return Ok(Incoming::Closed);
            }
            match wire::parse(&self.buf[..got.len], got.truncated) {
                Ok(Message::Conn { .. }) if got.fds.len() == 1 => {
                    let fd = got.fds.take_first().expect("one fd");
                    return Ok(Incoming::Conn(TcpStream::from(fd)));
                }
                Ok(Message::Drain) => {
                    self.draining.store(true, Ordering::Relaxed);
                    return Ok(Incoming::Drain);
                }
                Ok(Message::User(p)) => return Ok(Incoming::Message(p.to_vec())),
                // The kernel closed the fd for want of room (at the fd
                // limit): the client is gone; least-conn must hear of it,
                // and the operator (in lb's log), at most once a second.
                Ok(Message::Conn { .. }) if got.fds.is_empty() && got.fds_truncated => {
                    let _ = self.report_closed(1);
                    if self
                        .lost_warned
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                    {
                        self.lost_warned = Some(Instant::now());
                        eprintln!(
                            "lb::worker: a connection was lost: no free fd to receive it \
                             (the open-files limit); raise RLIMIT_NOFILE"
                        );
                    }
                }
                // Anything else (a CONN without exactly one fd included):
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
            while self.base_fds + self.live.load(Ordering::Relaxed) + FD_RESERVE >= limit {
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
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.chan.as_raw_fd()
    }
}

impl mio::event::Source for Listener {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        mio::unix::SourceFd(&self.chan.as_raw_fd()).register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        mio::unix::SourceFd(&self.chan.as_raw_fd()).reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        mio::unix::SourceFd(&self.chan.as_raw_fd()).deregister(registry)
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
}
