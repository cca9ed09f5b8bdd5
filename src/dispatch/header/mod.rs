//! The PROXY protocol's header stage (`docs/proxy-protocol.md`): with
//! `proxy_protocol` on, a connection from a trusted balancer waits here,
//! registered in the loop's poll, until its header is all there; lb then
//! reads exactly the header (the application's first bytes stay in the
//! socket for the worker) and hands the connection on with the client's
//! address beside its fd.
//!
//! Nothing here allocates per connection: the places for waiting
//! connections are a slab made at start, each header is peeked into one
//! shared buffer to find its exact length, and the timeout needs no scan:
//! every waiting connection has the same timeout, so the list of them in
//! arrival order (its links in the slots) is also the order they expire
//! in. A malformed, oversized or slow header, or an untrusted source when
//! refused, closes that connection only, counted by reason, with a log
//! line at most once a second per reason.

pub mod parse;
pub mod write;

use std::io::{self, Read as _};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::Interest;
use mio::unix::SourceFd;

pub use parse::Failure;
use parse::{Framed, MAX_HEADER};

use super::Dispatcher;
use super::conn::Conn;
use super::tokens::Source;
use crate::config::{Cidr, ProxyProtocol, Untrusted, proxy};

/// Connections that may wait for their header at once; beyond it lb
/// stops accepting until one is done (the kernel backlog holds the rest).
pub const WAITING_MAX: usize = 4096;

/// The end of the timer list.
const NIL: u32 = u32::MAX;

/// How often each reason may be said in the log.
const SAY_EVERY: Duration = Duration::from_secs(1);

/// What lb reads, from whom, for how long (the configuration's).
#[derive(Debug, Clone)]
pub struct Rules {
    pub accept: ProxyProtocol,
    pub trusted: Vec<Cidr>,
    pub untrusted: Untrusted,
    pub timeout: Duration,
}

#[derive(Debug)]
struct Waiting {
    /// Any stream socket (a Unix listener's too): only read, peeked at and
    /// polled here.
    sock: Option<std::net::TcpStream>,
    /// The listener it came from, whose rules it is read by.
    listener: u16,
    /// In the poll (only once a first read found the header incomplete).
    registered: bool,
    expires: Instant,
    prev: u32,
    next: u32,
}

/// The slab of connections waiting for their header.
#[derive(Debug)]
pub struct Stage {
    /// By listener: `None` where no header is read. Every listener's
    /// timeout is the same (`proxy_header_timeout`), which keeps the timer
    /// list in expiry order.
    rules: Vec<Option<Rules>>,
    /// By listener: a Unix socket, whose peers have no address. Whoever
    /// may connect (the file's mode says who) may send a header.
    unix: Vec<bool>,
    timeout: Duration,
    slots: Vec<Waiting>,
    free: Vec<u32>,
    /// Oldest first: the head expires first.
    head: u32,
    tail: u32,
    /// Where each header is peeked.
    buf: Box<[u8]>,
    /// Per reason: when it was last said, and how many since.
    said: [Option<Instant>; Failure::ALL.len()],
    unsaid: [u64; Failure::ALL.len()],
}

impl Stage {
    pub fn new(timeout: Duration) -> Stage {
        let now = Instant::now();
        Stage {
            rules: Vec::new(),
            unix: Vec::new(),
            timeout,
            slots: (0..WAITING_MAX)
                .map(|_| Waiting {
                    sock: None,
                    listener: 0,
                    registered: false,
                    expires: now,
                    prev: NIL,
                    next: NIL,
                })
                .collect(),
            free: (0..WAITING_MAX as u32).rev().collect(),
            head: NIL,
            tail: NIL,
            buf: vec![0; MAX_HEADER].into_boxed_slice(),
            said: [None; Failure::ALL.len()],
            unsaid: [0; Failure::ALL.len()],
        }
    }

    pub fn full(&self) -> bool {
        self.free.is_empty()
    }

    pub fn waiting(&self) -> usize {
        WAITING_MAX - self.free.len()
    }

    /// Takes a place for `sock`, at the tail of the timer list.
    fn take(
        &mut self,
        sock: std::net::TcpStream,
        listener: usize,
        now: Instant,
    ) -> Result<usize, OwnedFd> {
        let Some(i) = self.free.pop() else {
            return Err(OwnedFd::from(sock));
        };
        let w = &mut self.slots[i as usize];
        w.sock = Some(sock);
        w.listener = listener as u16;
        w.registered = false;
        w.expires = now + self.timeout;
        w.prev = self.tail;
        w.next = NIL;
        match self.tail {
            NIL => self.head = i,
            t => self.slots[t as usize].next = i,
        }
        self.tail = i;
        Ok(i as usize)
    }

    /// Frees place `i`; its socket (and whether it is in the poll).
    fn release(&mut self, i: usize) -> Option<(std::net::TcpStream, bool)> {
        let w = &mut self.slots[i];
        let sock = w.sock.take()?;
        let (prev, next, registered) = (w.prev, w.next, w.registered);
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
        self.free.push(i as u32);
        Some((sock, registered))
    }
}

impl Dispatcher {
    /// Reads PROXY headers by `rules` on every listener from now on.
    pub fn read_proxy_headers(&mut self, rules: Rules) {
        for i in 0..self.listeners.len().max(1) {
            self.read_proxy_headers_on(i, rules.clone());
        }
    }

    /// Reads PROXY headers by `rules` on listener `index` from now on.
    pub fn read_proxy_headers_on(&mut self, index: usize, rules: Rules) {
        let unix = self.listeners.get(index).is_some_and(|l| {
            socket2::SockRef::from(&l.fd).domain().ok() == Some(socket2::Domain::UNIX)
        });
        let stage = self
            .headers
            .get_or_insert_with(|| Box::new(Stage::new(rules.timeout)));
        if stage.rules.len() <= index {
            stage.rules.resize(index + 1, None);
            stage.unix.resize(index + 1, false);
        }
        stage.rules[index] = Some(rules);
        stage.unix[index] = unix;
    }

    /// Whether accepting from listener `index` must wait: it reads PROXY
    /// headers, and every place for a waiting one is taken (a listener
    /// without them goes on).
    #[inline]
    pub(super) fn headers_full_for(&self, index: usize) -> bool {
        self.headers
            .as_ref()
            .is_some_and(|s| s.full() && matches!(s.rules.get(index), Some(Some(_))))
    }

    /// Connections still waiting for their header.
    pub(super) fn headers_waiting(&self) -> usize {
        self.headers.as_ref().map_or(0, |s| s.waiting())
    }

    /// A connection just accepted from `listener` (counted here). With PROXY
    /// headers on its listener: its source is checked, and
    /// a trusted one waits for its header. Returns it when it can go on
    /// at once (its header came with the handshake, or it is served
    /// untrusted); `None` when it waits, or was closed.
    pub(super) fn admit(&mut self, fd: OwnedFd, listener: usize) -> Option<Conn> {
        // Every accepted connection comes through here: counted once.
        self.stats.accepted += 1;
        self.by_listener[listener] += 1;
        let Some(stage) = self.headers.as_mut() else {
            return Some(Conn::new(fd, listener));
        };
        let Some(Some(rules)) = stage.rules.get(listener) else {
            return Some(Conn::new(fd, listener));
        };
        let unix = stage.unix[listener];
        let sock = std::net::TcpStream::from(fd);
        let source = if unix { None } else { sock.peer_addr().ok() };
        if !unix && !source.is_some_and(|s| proxy::trusted(&rules.trusted, s.ip())) {
            if rules.untrusted == Untrusted::Serve {
                self.stats.proxy.untrusted_served += 1;
                return Some(Conn::new(OwnedFd::from(sock), listener));
            }
            drop(sock);
            self.proxy_failed(Failure::Untrusted, source);
            return None;
        }
        match stage.take(sock, listener, Instant::now()) {
            Ok(i) => self.header_read(i),
            Err(fd) => {
                drop(fd);
                self.proxy_failed(Failure::Full, source);
                None
            }
        }
    }

    /// Readiness on waiting connection `i`: its header, if it is all there,
    /// goes on to a worker.
    pub(super) fn header_event(&mut self, i: usize) {
        if let Some(conn) = self.header_read(i) {
            self.header_done(conn);
        }
    }

    /// Peeks at what connection `i` sent: a whole header is read (exactly
    /// it) and the connection returned; a bad one closes it; a partial one
    /// waits, in the poll.
    fn header_read(&mut self, i: usize) -> Option<Conn> {
        let stage: &mut Stage = self.headers.as_deref_mut()?;
        let w = stage.slots.get(i)?;
        let sock = w.sock.as_ref()?;
        let listener = w.listener;
        let accept = stage.rules.get(usize::from(listener))?.as_ref()?.accept;
        let peeked = loop {
            match sock.peek(&mut stage.buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other,
            }
        };
        let framed = match peeked {
            Ok(0) => Framed::Bad(Failure::Closed),
            Ok(n) => parse::frame(&stage.buf[..n], accept),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Framed::Need,
            // Reset.
            Err(_) => Framed::Bad(Failure::Closed),
        };
        match framed {
            Framed::Need => {
                let w = &mut stage.slots[i];
                if !w.registered
                    && let Some(s) = &w.sock
                {
                    // Added with data already there, it is reported at once.
                    w.registered = self
                        .poll
                        .registry()
                        .register(
                            &mut SourceFd(&s.as_raw_fd()),
                            Source::Header(i).token(),
                            Interest::READABLE,
                        )
                        .is_ok();
                    if !w.registered {
                        self.header_close(i, Failure::Closed);
                    }
                }
                None
            }
            Framed::Bad(why) => {
                self.header_close(i, why);
                None
            }
            Framed::Header { len, v2, peer } => {
                let (mut sock, registered) = stage.release(i)?;
                // The bytes were peeked, so the read takes them all.
                let read = sock.read(&mut stage.buf[..len]);
                if registered {
                    // The socket lives on in the worker: out of our poll
                    // first, or its events would reach this slot's next.
                    let _ = self
                        .poll
                        .registry()
                        .deregister(&mut SourceFd(&sock.as_raw_fd()));
                }
                if !matches!(read, Ok(n) if n == len) {
                    drop(sock);
                    self.proxy_failed(Failure::Closed, peer);
                    return None;
                }
                let p = &mut self.stats.proxy;
                if v2 {
                    p.v2 += 1;
                } else {
                    p.v1 += 1;
                }
                p.local += u64::from(peer.is_none());
                Some(Conn {
                    fd: OwnedFd::from(sock),
                    peer,
                    listener,
                })
            }
        }
    }

    /// A connection whose header came later than its accept: it goes to a
    /// worker now, or waits behind those already held.
    fn header_done(&mut self, conn: Conn) {
        let conn = if self.pending.is_empty() {
            match self.hand_off(conn) {
                Ok(()) => return,
                Err(conn) => {
                    self.stats.paused += 1;
                    conn
                }
            }
        } else {
            conn
        };
        self.pending.push_back(conn);
    }

    /// Closes waiting connection `i` for `why`.
    fn header_close(&mut self, i: usize, why: Failure) {
        let Some(stage) = self.headers.as_mut() else {
            return;
        };
        // Closing the only copy takes it out of the poll too.
        if let Some((sock, _)) = stage.release(i) {
            let source = sock.peer_addr().ok();
            drop(sock);
            self.proxy_failed(why, source);
        }
    }

    /// Counts a connection closed for `why`; says so at most once a
    /// second per reason, with how many since the last line.
    fn proxy_failed(&mut self, why: Failure, source: Option<SocketAddr>) {
        let k = why as usize;
        self.stats.proxy.failures[k] += 1;
        let Some(stage) = self.headers.as_mut() else {
            return;
        };
        stage.unsaid[k] += 1;
        let now = Instant::now();
        if stage.said[k].is_some_and(|t| now < t + SAY_EVERY) {
            return;
        }
        stage.said[k] = Some(now);
        let n = std::mem::take(&mut stage.unsaid[k]);
        let from = source.map_or_else(String::new, |s| format!(" from {s}"));
        let what = match why {
            Failure::Malformed => "did not start with a valid PROXY header of a version its \
                                   listener's proxy_protocol takes; check what the balancer sends"
                .to_string(),
            Failure::Oversized => format!(
                "sent a PROXY header longer than lb reads ({MAX_HEADER} bytes for v2, {} for v1)",
                parse::V1_MAX
            ),
            Failure::Timeout => format!(
                "sent no whole PROXY header within --proxy-header-timeout {}",
                crate::config::duration::show(stage.timeout)
            ),
            Failure::Untrusted => "is outside --proxy-trusted (add the balancer's network \
                                   there, or set --proxy-untrusted serve)"
                .to_string(),
            Failure::Closed => "closed before its PROXY header was complete".to_string(),
            Failure::Full => format!(
                "found all {WAITING_MAX} places for connections waiting for their PROXY \
                 header taken while lb stops"
            ),
        };
        crate::warn!(
            "PROXY protocol: a connection{from} {what}: closed ({n} since the last such line, \
             {} in all: lb_proxy_header_failures_total{{reason=\"{}\"}})",
            self.stats.proxy.failures[k],
            why.name()
        );
    }

    /// When the oldest waiting header times out.
    pub(super) fn header_wake(&self) -> Option<Instant> {
        let stage = self.headers.as_ref()?;
        (stage.head != NIL).then(|| stage.slots[stage.head as usize].expires)
    }

    /// Closes the waiting connections whose time is up (only those: they
    /// are the head of the list).
    pub(super) fn header_timers(&mut self) {
        let Some(first) = self.header_wake() else {
            return;
        };
        let now = Instant::now();
        if first > now {
            return;
        }
        while let Some(stage) = self.headers.as_ref()
            && stage.head != NIL
            && stage.slots[stage.head as usize].expires <= now
        {
            let head = stage.head as usize;
            self.header_close(head, Failure::Timeout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage() -> Stage {
        Stage::new(Duration::from_secs(1))
    }

    fn sock(l: &std::net::TcpListener) -> std::net::TcpStream {
        std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap()
    }

    /// The timer list is arrival order whatever leaves from the middle, and
    /// every place comes back.
    #[test]
    fn places_expire_in_arrival_order_and_come_back() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = stage();
        let t0 = Instant::now();
        let a = s.take(sock(&l), 0, t0).unwrap();
        let b = s.take(sock(&l), 0, t0 + Duration::from_millis(1)).unwrap();
        let c = s.take(sock(&l), 0, t0 + Duration::from_millis(2)).unwrap();
        assert_eq!(s.waiting(), 3);
        assert_eq!(s.head as usize, a);
        assert!(s.release(b).is_some());
        assert!(s.release(b).is_none(), "released twice");
        assert_eq!(s.slots[a].next as usize, c);
        assert_eq!(s.slots[c].prev as usize, a);
        assert!(s.release(a).is_some());
        assert_eq!((s.head as usize, s.tail as usize), (c, c));
        assert!(s.release(c).is_some());
        assert_eq!((s.head, s.tail), (NIL, NIL));
        assert_eq!(s.waiting(), 0);
        assert!(!s.full());
    }
}
