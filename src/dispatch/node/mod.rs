//! The dispatcher's side of Node.js's cluster IPC: lb is the primary of
//! unmodified Node workers (`docs/node.md`).
//!
//! Per connection: one preformatted `newconn` line (with the client's
//! address behind a balancer, for the preload to give the socket) + the fd
//! in one `sendmsg`, then the worker's handle ACK and `{ack, accepted}` reply,
//! parsed without allocating. Like Node's own primary, a worker has at most
//! one connection in flight, and the master keeps its copy of the fd until
//! the reply: a refused connection goes to another worker, one whose
//! worker died before replying is handed out again. Everything else
//! (`queryServer`, user messages, replies lb writes) is rare and may
//! allocate.
//!
//! A worker may have one server per lb listener (`listen(8000)` and
//! `listen(8443)`, `listen('/run/app.sock')`): each connection goes with
//! the key of the server its listener routes to (`NodeLink::route`,
//! rebuilt when a server comes or goes), so a worker with any server takes
//! every listener's connections and the policy need not know listeners.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

mod inbound;

use super::link::Link;
use super::worker::State;
use super::{Dispatcher, Event};
use crate::config::Address;
use crate::policy::Slot;
use crate::proto::node::{self, Bad, Lines, NewConn};
use crate::proto::{Malformed, Wait, scm};

/// A worker that refused a connection is offered none for this long,
/// doubling while it keeps refusing (Node's own primary retries at once
/// and can bounce one connection thousands of times a second).
const REFUSED_FIRST: Duration = Duration::from_millis(1);
const REFUSED_MAX: Duration = Duration::from_millis(100);

/// A connection sent to a worker and not yet answered.
#[derive(Debug)]
struct Flight {
    fd: OwnedFd,
    /// The client's address from a PROXY header, sent with it (and with
    /// it again if the handle must be resent).
    peer: Option<SocketAddr>,
    /// The listener it came from, which says the server (again on a resend).
    listener: u16,
    seq: u64,
    acked: bool,
    nacks: u8,
}

/// lb as its Node workers' cluster primary: what is common to them all.
#[derive(Debug)]
pub struct Primary {
    /// lb's listeners, by index, which a worker's `listen()` is matched
    /// against (a Unix path absolute, as Node resolves the app's).
    listeners: Vec<Address>,
    /// The first worker's `queryServer` data, echoed to every worker.
    data: Option<String>,
    /// The earliest end of a worker's refusal back-off.
    pub wake: Option<Instant>,
}

impl Primary {
    pub fn new(front: SocketAddr) -> Primary {
        Primary {
            listeners: vec![Address::Tcp(front)],
            data: None,
            wake: None,
        }
    }
}

/// One Node worker's channel state.
#[derive(Debug)]
pub struct NodeLink {
    /// The master's end of the cluster channel (no copy of the worker's
    /// end is kept: its EOF is how a worker's exit shows).
    pub channel: OwnedFd,
    lines: Lines,
    /// Bytes not yet written (replies, `disconnect`, the rest of a `newconn`
    /// line a full socket cut short). Written before any new `newconn`.
    out: Vec<u8>,
    /// The worker's servers, in the order it listened: added by an
    /// answered `queryServer`, removed by its `close`.
    servers: Vec<Server>,
    /// By listener: the index in `servers` of the one that takes its
    /// connections (the one that asked for it, else the one that asked for
    /// none of lb's, else the first).
    route: Vec<u16>,
    flight: Option<Flight>,
    /// This side's cluster-message counter.
    seq: u64,
    refused_for: Duration,
    refused_until: Option<Instant>,
    /// `disconnect` is due once the connection in flight is answered.
    disconnect_due: bool,
    /// The worker closed its end.
    eof: bool,
    /// Kernel dispatch: the worker's own listener, sent as its server
    /// (Node's `SCHED_NONE`): it accepts its connections itself, and lb
    /// keeps this copy so what is queued migrates when it dies.
    pub listener: Option<OwnedFd>,
}

#[derive(Debug)]
struct Server {
    /// Its cluster key, unique among the worker's servers.
    key: String,
    /// The TCP port it asked for (0 for any); `None` for a Unix path.
    port: Option<u16>,
    /// The listeners it asked for by port or path; empty when it matched
    /// none: it takes those no other server asked for.
    claims: Vec<usize>,
    newconn: NewConn,
}

impl NodeLink {
    pub fn new(channel: OwnedFd, listener: Option<OwnedFd>) -> NodeLink {
        NodeLink {
            channel,
            listener,
            lines: Lines::new(),
            out: Vec::with_capacity(512),
            servers: Vec::new(),
            route: Vec::new(),
            flight: None,
            seq: 0,
            refused_for: REFUSED_FIRST,
            refused_until: None,
            disconnect_due: false,
            eof: false,
        }
    }

    /// Bytes not yet written to the worker.
    pub fn has_unwritten(&self) -> bool {
        !self.out.is_empty()
    }

    /// Has a server, nothing in flight, nothing unwritten, not backing off.
    #[inline]
    pub fn can_take(&self) -> bool {
        self.listener.is_none()
            && !self.servers.is_empty()
            && self.flight.is_none()
            && self.out.is_empty()
            && self.refused_until.is_none()
            && !self.eof
    }

    /// After the worker exited: the connection it never answered for goes
    /// first in `pending`; how many (0 or 1).
    pub fn rescue(&mut self, pending: &mut crate::dispatch::conn::Pending) -> u64 {
        match self.flight.take() {
            Some(f) => {
                pending.push_front(f.conn());
                1
            }
            None => 0,
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Which of `servers` takes listener `listener`'s connections (a
    /// worker with a server takes every listener's).
    #[inline]
    fn server_of(&self, listener: u16) -> usize {
        usize::from(self.route.get(usize::from(listener)).copied().unwrap_or(0))
    }

    /// Rebuilds `route` for `listeners` listeners, after `servers` changed.
    fn reroute(&mut self, listeners: usize) {
        let rest = self
            .servers
            .iter()
            .position(|s| s.claims.is_empty())
            .unwrap_or(0);
        self.route.clear();
        for l in 0..listeners {
            let own = self.servers.iter().position(|s| s.claims.contains(&l));
            self.route.push(own.unwrap_or(rest) as u16);
        }
    }
}

/// Which of `listeners` accepted `fd`, by its local address: the same
/// address, else a wildcard one on its port (a v4 client of `[::]` is
/// v4-mapped, still on that port), else the same path; 0 when none.
fn listener_of(listeners: &[Address], fd: &OwnedFd) -> u16 {
    let Ok(local) = socket2::SockRef::from(fd).local_addr() else {
        return 0;
    };
    let found = match local.as_socket() {
        Some(a) => listeners
            .iter()
            .position(|l| l.tcp() == Some(a))
            .or_else(|| {
                listeners.iter().position(|l| {
                    l.tcp()
                        .is_some_and(|t| t.port() == a.port() && t.ip().is_unspecified())
                })
            }),
        None => local.as_pathname().and_then(|p| {
            let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            listeners
                .iter()
                .position(|l| matches!(l, Address::Unix(q) if *q == p))
        }),
    };
    found.unwrap_or(0) as u16
}

impl Flight {
    /// Back to a connection, to be handed out again.
    fn conn(self) -> crate::dispatch::conn::Conn {
        crate::dispatch::conn::Conn {
            fd: self.fd,
            peer: self.peer,
            listener: self.listener,
        }
    }
}

impl Dispatcher {
    /// Tells Node workers' `listen()` what lb's listeners are, in the
    /// order the loop has them (`Source::Listener`'s index).
    pub fn node_listeners(&mut self, listeners: Vec<Address>) {
        self.node.listeners = listeners
            .into_iter()
            .map(|a| match a {
                // Node resolves the app's path against its directory.
                Address::Unix(p) => Address::Unix(std::path::absolute(&p).unwrap_or(p)),
                tcp => tcp,
            })
            .collect();
    }

    /// The newest `count` connections in `pending`, read back from an
    /// lb-protocol worker's channel, are given the listener their local
    /// address says (a CONN does not carry it), so that a Node worker
    /// serves them with that listener's server. Cold: a worker died or
    /// stalled; nothing to do with one listener.
    pub(super) fn label_read_back(&mut self, count: u64) {
        if self.node.listeners.len() < 2 {
            return;
        }
        let listeners = &self.node.listeners;
        for conn in self.pending.newest_mut(count as usize) {
            conn.listener = listener_of(listeners, &conn.fd);
        }
    }

    fn node(&mut self, index: usize) -> Option<&mut NodeLink> {
        match &mut self.workers.get_mut(index)?.link {
            Link::Node(n) => Some(n),
            _ => None,
        }
    }

    /// Sends `fd` to Node worker `index` with a `newconn` (naming `peer`,
    /// the client's address from a PROXY header, if there was one); keeps
    /// our copy until the reply. Gives `fd` back when the worker cannot
    /// take it now.
    #[inline]
    pub(super) fn node_send(
        &mut self,
        index: usize,
        fd: OwnedFd,
        peer: Option<SocketAddr>,
        listener: u16,
    ) -> Result<(), OwnedFd> {
        let Some(w) = self.workers.get_mut(index) else {
            return Err(fd);
        };
        let slot = w.slot;
        let Link::Node(n) = &mut w.link else {
            return Err(fd);
        };
        let free = n.can_take();
        let seq = n.seq + 1;
        let server = n.server_of(listener);
        let result = match (n.servers.get_mut(server), free) {
            (Some(server), true) => {
                let line = server.newconn.line_with_peer(seq, peer);
                match scm::send(
                    n.channel.as_fd(),
                    line,
                    &[],
                    Some(fd.as_fd()),
                    Wait::DontWait,
                ) {
                    Ok(sent) => {
                        // The fd went with the first byte; a full socket
                        // may have cut the line short: the rest goes first.
                        if sent < line.len() {
                            n.out.extend_from_slice(&line[sent..]);
                        }
                        n.seq = seq;
                        n.flight = Some(Flight {
                            fd,
                            peer,
                            listener,
                            seq,
                            acked: false,
                            nacks: 0,
                        });
                        Ok(!n.out.is_empty())
                    }
                    Err(e) => {
                        if e.kind() == io::ErrorKind::WouldBlock {
                            w.full = true;
                        } else {
                            w.state = State::Draining;
                        }
                        Err((fd, w.full))
                    }
                }
            }
            _ => Err((fd, false)),
        };
        let outcome = match result {
            Ok(partial) => {
                if partial {
                    self.want_writable(index, true);
                }
                Ok(())
            }
            Err((fd, full)) => {
                if full {
                    self.want_writable(index, true);
                }
                Err(fd)
            }
        };
        self.sync_view(slot);
        outcome
    }

    /// Reads everything a Node worker sent (edge-triggered: until `EAGAIN`).
    pub(super) fn node_read(&mut self, index: usize) {
        let Some(n) = self.node(index) else {
            return;
        };
        // Out of the worker while its lines are handled (an empty `Lines`
        // owns no memory: no allocation).
        let mut lines = std::mem::take(&mut n.lines);
        let mut eof = false;
        while let Some(w) = self.workers.get(index) {
            let Link::Node(n) = &w.link else { break };
            // Fds only come with a `NODE_HANDLE` line (the app's
            // `process.send(msg, socket)`): acknowledged, never used,
            // closed when `got` drops.
            let room = lines.spare().len();
            match scm::recv(n.channel.as_fd(), lines.spare(), Wait::DontWait) {
                Ok(got) if got.len == 0 => {
                    eof = true;
                    break;
                }
                Ok(got) => {
                    lines.filled(got.len, |line| self.node_line(index, line));
                    // A stream read stops short only when the queue is empty
                    // or at a message carrying fds: without fds, a short read
                    // drained it (a later write raises a new edge), so the
                    // `EAGAIN` read is saved (one syscall per connection).
                    if got.len < room && got.fds.is_empty() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        if let Some(n) = self.node(index) {
            n.lines = lines;
        }
        if eof {
            self.node_eof(index);
        }
    }

    /// The worker answered the `newconn` in flight.
    fn node_answered(&mut self, index: usize, slot: Slot, f: Flight, accepted: bool) {
        let current = self.current[slot.0] == Some(index);
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        let Link::Node(n) = &mut w.link else { return };
        if accepted {
            // Its copy is the connection now (closing ours is what Node's
            // primary does too).
            drop(f);
            n.refused_for = REFUSED_FIRST;
            w.sent += 1;
            self.stats.dispatched += 1;
        } else {
            let until = Instant::now() + n.refused_for;
            n.refused_until = Some(until);
            n.refused_for = (n.refused_for * 2).min(REFUSED_MAX);
            self.node.wake = Some(self.node.wake.map_or(until, |t| t.min(until)));
            self.stats.refused += 1;
            if current {
                let v = &mut self.views[slot.0];
                v.active = v.active.saturating_sub(1);
            }
            self.pending.push_front(f.conn());
        }
        let disconnect = std::mem::take(&mut n.disconnect_due);
        if disconnect {
            self.node_disconnect(index);
        }
        self.sync_view(slot);
    }

    /// `NODE_HANDLE_NACK`: the line arrived without its fd; send both again
    /// (as Node does, up to three times), then give the connection to
    /// another worker.
    fn node_resend(&mut self, index: usize, slot: Slot) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        let Link::Node(n) = &mut w.link else { return };
        // (Its server by the route now: the one it went to may have closed.)
        let Some(server) = n.flight.as_ref().map(|f| n.server_of(f.listener)) else {
            return;
        };
        let unwritten = !n.out.is_empty();
        let (Some(f), Some(server)) = (n.flight.as_mut(), n.servers.get_mut(server)) else {
            return;
        };
        if f.acked {
            return;
        }
        f.nacks += 1;
        let resent = f.nacks <= node::MAX_RETRANSMISSIONS && !unwritten && {
            let line = server.newconn.line_with_peer(f.seq, f.peer);
            scm::send(
                n.channel.as_fd(),
                line,
                &[],
                Some(f.fd.as_fd()),
                Wait::DontWait,
            )
            .is_ok_and(|sent| sent == line.len())
        };
        if !resent {
            let nacks = f.nacks;
            let (slot, pid) = (w.slot, w.pid);
            if let Some(f) = n.flight.take() {
                self.node_answered(index, slot, f, false);
            }
            self.emit(Event::Malformed {
                slot,
                pid,
                error: Malformed::Node(Bad::HandleLost(nacks)),
            });
        }
        self.sync_view(slot);
    }

    /// Kernel dispatch: sends the `queryServer` answer `line` with the
    /// worker's own listener (the fd goes with its first byte; the rest of
    /// a line a full socket cut short follows from `out`).
    pub(super) fn node_send_server(&mut self, index: usize, line: &[u8]) {
        self.node_flush(index);
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        let (slot, pid) = (w.slot, w.pid);
        let Link::Node(n) = &mut w.link else { return };
        let Some(listener) = n.listener.as_ref() else {
            return;
        };
        let sent = if n.out.is_empty() {
            scm::send(
                n.channel.as_fd(),
                line,
                &[],
                Some(listener.as_fd()),
                Wait::DontWait,
            )
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        };
        match sent {
            Ok(sent) => {
                n.out.extend_from_slice(&line[sent..]);
                let more = !n.out.is_empty();
                self.want_writable(index, more);
            }
            Err(e) => self.emit(Event::Note {
                slot,
                pid,
                text: format!(
                    "cannot send the worker its listener ({e}); it serves nothing until it \
                     listens again"
                ),
            }),
        }
    }

    /// Queues `bytes` after anything unwritten and writes what the socket takes.
    fn node_write(&mut self, index: usize, bytes: &[u8]) {
        if let Some(n) = self.node(index) {
            n.out.extend_from_slice(bytes);
        }
        self.node_flush(index);
    }

    /// Writes unwritten bytes; asks for writability while some remain.
    pub(super) fn node_flush(&mut self, index: usize) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        let slot = w.slot;
        let Link::Node(n) = &mut w.link else { return };
        let mut blocked = false;
        while !n.out.is_empty() {
            match scm::send(n.channel.as_fd(), &n.out, &[], None, Wait::DontWait) {
                Ok(sent) => {
                    n.out.drain(..sent);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    blocked = true;
                    break;
                }
                // Gone: its exit is the supervisor's news.
                Err(_) => {
                    n.out.clear();
                    n.eof = true;
                }
            }
        }
        self.want_writable(index, blocked);
        self.sync_view(slot);
    }

    /// Graceful stop (the `drain` of lb's protocol): the worker closes its
    /// server, finishes its connections, closes the channel. Deferred while
    /// a `newconn` is in flight, so none crosses it and bounces.
    pub(super) fn node_disconnect(&mut self, index: usize) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        let (slot, pid) = (w.slot, w.pid);
        let Link::Node(n) = &mut w.link else { return };
        if n.flight.is_some() {
            n.disconnect_due = true;
            return;
        }
        let line = node::disconnect(n.next_seq());
        w.drain_sent = true;
        self.node_write(index, &line);
        self.emit(Event::Draining { slot, pid });
    }

    /// The worker closed its end: it answers nothing more. A connection in
    /// flight is handed out again, and it gets nothing new.
    fn node_eof(&mut self, index: usize) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        let (slot, pid, state) = (w.slot, w.pid, w.state);
        let Link::Node(n) = &mut w.link else { return };
        n.eof = true;
        n.out.clear();
        if let Some(f) = n.flight.take() {
            // Not a refusal: the worker is gone. Handed out again at once.
            if self.current[slot.0] == Some(index) {
                let v = &mut self.views[slot.0];
                v.active = v.active.saturating_sub(1);
            }
            self.pending.push_front(f.conn());
            self.stats.rescued += 1;
            self.emit(Event::Rescued {
                slot,
                pid,
                count: 1,
            });
        }
        // Not an announced exit: the process may have crashed, and its
        // exit (which follows) is judged by how it ended.
        if state != State::Draining
            && let Some(w) = self.workers.get_mut(index)
        {
            w.state = State::Draining;
        }
        self.sync_view(slot);
        // (Kernel dispatch: out of the schedule, or it keeps its share.)
        self.steer();
    }

    /// Ends the back-off of workers whose refusal period is over.
    pub(super) fn node_timers(&mut self) {
        let Some(at) = self.node.wake else { return };
        let now = Instant::now();
        if now < at {
            return;
        }
        self.node.wake = None;
        for index in 0..self.workers.end() {
            let Some(w) = self.workers.get_mut(index) else {
                continue;
            };
            let slot = w.slot;
            let Link::Node(n) = &mut w.link else { continue };
            match n.refused_until {
                Some(t) if t <= now => {
                    n.refused_until = None;
                    self.sync_view(slot);
                }
                Some(t) => self.node.wake = Some(self.node.wake.map_or(t, |w| w.min(t))),
                None => {}
            }
        }
    }

    /// A user message (`lb send`) for `process.on('message')`.
    pub(super) fn node_message(&mut self, index: usize, payload: &[u8]) -> bool {
        let eof = self.node(index).is_none_or(|n| n.eof);
        if !eof {
            self.node_write(index, &node::user(payload));
        }
        !eof
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepted sockets say their listener by their local address.
    #[test]
    fn a_read_back_connection_is_given_its_listener() {
        let dir = std::env::temp_dir().join(format!("lb-listener-of-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let any = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let one = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listeners = vec![
            Address::Tcp(one.local_addr().unwrap()),
            Address::Unix(path.clone()),
            Address::Tcp(any.local_addr().unwrap()),
        ];
        let accepted = |l: &std::net::TcpListener| {
            let port = l.local_addr().unwrap().port();
            let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            OwnedFd::from(l.accept().unwrap().0)
        };
        assert_eq!(listener_of(&listeners, &accepted(&one)), 0);
        assert_eq!(listener_of(&listeners, &accepted(&any)), 2);
        let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let u = OwnedFd::from(unix.accept().unwrap().0);
        assert_eq!(listener_of(&listeners, &u), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
