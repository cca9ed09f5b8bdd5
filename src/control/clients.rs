//! What the control socket and the metrics endpoint share: clients that
//! have connected and not yet sent their whole request, kept oldest first
//! with a deadline and a bound, registered with the serving thread's mio
//! poll under tokens of their own; the accept loop; and the count of
//! answering threads. Each server keeps only its protocol: how a request
//! is read, what it is told when dropped, and how it is answered.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};

/// How long to wait before accepting again after accept(2) failed for want
/// of resources (the connection waits in the backlog meanwhile).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// An answering thread's stack: it formats a line and waits on a channel.
const ANSWER_STACK: usize = 128 * 1024;

/// The listener's token; clients' are above it.
pub(super) const LISTENER: Token = Token(0);

/// A client that has not sent its whole request yet.
pub(super) struct Waiting<S> {
    pub stream: S,
    pub buf: Vec<u8>,
    pub since: Instant,
}

/// Waiting clients by token; tokens only grow, so the first is the oldest.
pub(super) struct Clients<S> {
    waiting: BTreeMap<usize, Waiting<S>>,
    next: usize,
    deadline: Duration,
    max: usize,
    /// When to accept again after accept(2) failed for want of resources.
    accept_again: Option<Instant>,
}

impl<S: AsRawFd> Clients<S> {
    /// Each client gets `deadline` from its connection; at most `max` wait.
    pub fn new(deadline: Duration, max: usize) -> Clients<S> {
        Clients {
            waiting: BTreeMap::new(),
            next: LISTENER.0 + 1,
            deadline,
            max,
            accept_again: None,
        }
    }

    /// When the oldest client's time is up, or accepting is to be tried
    /// again, whichever is first.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiting
            .values()
            .next()
            .map(|w| w.since + self.deadline)
            .into_iter()
            .chain(self.accept_again)
            .min()
    }

    /// Registers `stream` (non-blocking already) as a waiting client; its
    /// token, or `None` if it could not be registered (it is dropped). When
    /// `max` were waiting, the oldest is taken out and returned, to be told
    /// why.
    pub fn add(&mut self, registry: &Registry, stream: S) -> (Option<usize>, Option<Waiting<S>>) {
        let evicted = if self.waiting.len() >= self.max {
            self.waiting.pop_first().map(|(_, w)| forget(registry, w))
        } else {
            None
        };
        let token = self.next;
        self.next += 1;
        let fd = stream.as_raw_fd();
        if registry
            .register(&mut SourceFd(&fd), Token(token), Interest::READABLE)
            .is_err()
        {
            return (None, evicted);
        }
        let w = Waiting {
            stream,
            buf: Vec::new(),
            since: Instant::now(),
        };
        self.waiting.insert(token, w);
        (Some(token), evicted)
    }

    pub fn get_mut(&mut self, token: usize) -> Option<&mut Waiting<S>> {
        self.waiting.get_mut(&token)
    }

    /// Takes `token`'s client out of the poll set and the list.
    pub fn take(&mut self, registry: &Registry, token: usize) -> Option<Waiting<S>> {
        self.waiting.remove(&token).map(|w| forget(registry, w))
    }

    /// Takes out every client whose time is up.
    pub fn expired(&mut self, registry: &Registry, now: Instant) -> Vec<Waiting<S>> {
        let mut out = Vec::new();
        while let Some(entry) = self.waiting.first_entry() {
            if entry.get().since + self.deadline > now {
                break;
            }
            out.push(forget(registry, entry.remove()));
        }
        out
    }
}

/// Takes a client out of the poll set (before its stream is closed or
/// handed on).
fn forget<S: AsRawFd>(registry: &Registry, w: Waiting<S>) -> Waiting<S> {
    let _ = registry.deregister(&mut SourceFd(&w.stream.as_raw_fd()));
    w
}

/// A server of clients that each send one short request: the control
/// socket's JSON line, a scrape's HTTP head.
pub(super) trait Serve {
    type Stream: AsRawFd;
    fn poll(&mut self) -> &mut Poll;
    fn clients(&mut self) -> &mut Clients<Self::Stream>;
    /// One accept(2) on the listener.
    fn accept(&self) -> io::Result<Self::Stream>;
    /// A new client, just accepted.
    fn admit(&mut self, stream: Self::Stream);
    /// Reads what a client sent.
    fn progress(&mut self, token: usize);
    /// Lets go of clients whose time is up.
    fn expire(&mut self);
    /// Said, once, if the poll fails (and the server stops).
    fn lost(&self, e: &io::Error);
}

/// Runs `server` until its poll fails: never blocks on a client.
pub(super) fn run(server: &mut impl Serve) {
    let mut events = Events::with_capacity(64);
    loop {
        let timeout = server
            .clients()
            .next_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()));
        if let Err(e) = server.poll().poll(&mut events, timeout)
            && e.kind() != io::ErrorKind::Interrupted
        {
            return server.lost(&e);
        }
        for ev in events.iter() {
            match ev.token() {
                LISTENER => accept_all(server),
                Token(t) => server.progress(t),
            }
        }
        if server
            .clients()
            .accept_again
            .is_some_and(|t| t <= Instant::now())
        {
            accept_all(server);
        }
        server.expire();
    }
}

/// Accepts until there is nothing left, admitting each; if accept(2)
/// failed for want of resources (out of fds or memory; the rest wait in the
/// backlog), when to try again.
fn accept_all(server: &mut impl Serve) {
    let mut accepted = Vec::new();
    let again = loop {
        match server.accept() {
            Ok(stream) => accepted.push(stream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.raw_os_error() == Some(libc::ECONNABORTED) => {}
            Err(_) => break Some(Instant::now() + ACCEPT_BACKOFF),
        }
    };
    server.clients().accept_again = again;
    for stream in accepted {
        server.admit(stream);
    }
}

/// Answering threads, counted so that at most so many run at once.
#[derive(Clone, Default)]
pub(super) struct Answering(Arc<AtomicUsize>);

/// One answering thread's place; given back when dropped, however the
/// thread ends (or if it could not be started).
pub(super) struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Answering {
    /// A place, if fewer than `max` threads are answering.
    pub fn claim(&self, max: usize) -> Option<Place> {
        if self.0.fetch_add(1, Ordering::SeqCst) >= max {
            self.0.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Place(Arc::clone(&self.0)))
    }

    /// Threads answering now.
    pub fn running(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Runs `work` on a short-lived thread named `name`, holding `place`. If
/// the thread cannot be started, `work` (and what it owns: the client's
/// stream, whose client then reads EOF) is dropped with the place.
pub(super) fn answer_on_thread(name: &str, place: Place, work: impl FnOnce() + Send + 'static) {
    let _ = std::thread::Builder::new()
        .name(name.into())
        .stack_size(ANSWER_STACK)
        .spawn(move || {
            let _place = place;
            work();
        });
}
