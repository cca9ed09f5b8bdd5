//! Relaying one connection: the connect to the worker, `splice` both
//! ways, half-closes, resets, and the timeouts.

use std::io::Write as _;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::Interest;
use nix::fcntl::{SpliceFFlags, splice};

use super::probe::{PROBE_EVERY, upstream_addr};
use super::slab::{CHUNK, CLIENT, Expired, Relays, Timeouts, UPSTREAM};
use crate::config::SendProxy;
use crate::dispatch::conn::Conn;
use crate::dispatch::header::write;
use crate::dispatch::tokens::Source;
use crate::dispatch::worker::{State, Worker};
use crate::dispatch::{Dispatcher, Link};
use crate::policy::Slot;

impl Dispatcher {
    /// Starts relaying `conn` to proxy worker `index` (connect in progress).
    /// Gives it back when no relay slot is free or the connect fails at once.
    pub(crate) fn proxy_start(&mut self, index: usize, conn: Conn) -> Result<(), Conn> {
        let Some(w) = self.workers.get(index) else {
            return Err(conn);
        };
        let (slot, pid, port, send_proxy) = match &w.link {
            Link::Proxy(p) => (w.slot, w.pid, p.port, p.send_proxy),
            _ => return Err(conn),
        };
        let Some(relays) = self.proxy.relays.as_mut() else {
            return Err(conn);
        };
        let Some(r) = relays.free.pop() else {
            return Err(conn);
        };
        let upstream = match mio::net::TcpStream::connect(upstream_addr(port)) {
            Ok(s) => s,
            Err(_) => {
                relays.free.push(r);
                return Err(conn);
            }
        };
        let Conn { fd, peer, listener } = conn;
        let client = mio::net::TcpStream::from_std(std::net::TcpStream::from(fd));
        let relay = &mut relays.slots[r as usize];
        relay.socks = [Some(client), Some(upstream)];
        for d in &mut relay.dirs {
            d.buffered = 0;
            d.eof = false;
            d.done = false;
            d.readable = false;
            d.writable = false;
        }
        // A new client socket has room to write to.
        relay.dirs[UPSTREAM].writable = true;
        relay.worker = index;
        relay.pid = pid;
        relay.slot = slot;
        relay.connecting = true;
        relay.client_out = false;
        relay.peer = peer;
        relay.listener = listener;
        relay.send_proxy = send_proxy;
        let registry = self.poll.registry();
        // The upstream's writability says when the connect is done.
        let interests = [Interest::READABLE, Interest::READABLE | Interest::WRITABLE];
        for side in [CLIENT, UPSTREAM] {
            if let Some(s) = relay.socks[side].as_mut() {
                let token = Source::Relay {
                    relay: r as usize,
                    side,
                }
                .token();
                let _ = registry.register(s, token, interests[side]);
            }
        }
        relays.take(r as usize);
        if let Some(Link::Proxy(p)) = self.workers.get_mut(index).map(|w| &mut w.link) {
            p.relays += 1;
        }
        if !self.relay_room() {
            self.sync_proxy_views();
        }
        Ok(())
    }

    /// Readiness on a relay socket.
    pub(crate) fn relay_event(&mut self, r: usize, side: usize, readable: bool, writable: bool) {
        let Some(relays) = self.proxy.relays.as_mut() else {
            return;
        };
        let Some(relay) = relays.slots.get_mut(r) else {
            return;
        };
        if relay.socks[side].is_none() {
            return;
        }
        // Side s readable feeds direction s; writable drains direction 1-s.
        if readable {
            relay.dirs[side].readable = true;
        }
        if writable {
            relay.dirs[1 - side].writable = true;
        }
        if side == UPSTREAM && relay.connecting && (writable || readable) {
            let connected = relay.socks[UPSTREAM]
                .as_ref()
                .is_some_and(|s| matches!(s.take_error(), Ok(None)) && s.peer_addr().is_ok());
            if !connected {
                return self.relay_refused(r);
            }
            // Before any byte of the client's (none is read while connecting).
            if relay.send_proxy != SendProxy::Off && !send_header(relay) {
                return self.relay_end(r, true);
            }
            let (index, pid) = (relay.worker, relay.pid);
            relays.opened(r);
            self.stats.dispatched += 1;
            if let Some(w) = self.relay_worker(index, pid) {
                w.sent += 1;
            }
        }
        self.relay_pump(r);
    }

    /// The worker's port refused the connection (it died or is restarting):
    /// the client has sent it nothing yet, so another worker gets it.
    fn relay_refused(&mut self, r: usize) {
        let Some(relays) = self.proxy.relays.as_mut() else {
            return;
        };
        let relay = &mut relays.slots[r];
        let (index, pid, slot) = (relay.worker, relay.pid, relay.slot);
        let client = relay.socks[CLIENT].take();
        let (peer, listener) = (relay.peer, relay.listener);
        if let Some(mut up) = relay.socks[UPSTREAM].take() {
            let _ = self.poll.registry().deregister(&mut up);
        }
        relays.release(r);
        self.relay_gone(index, pid, slot);
        let Some(mut client) = client else { return };
        let _ = self.poll.registry().deregister(&mut client);
        let fd = OwnedFd::from(std::net::TcpStream::from(client));
        // Probe the worker again before it gets more.
        if let Some(w) = self.relay_worker(index, pid)
            && w.state == State::Ready
            && let Link::Proxy(p) = &mut w.link
            && p.retry_at.is_none()
            && p.conn.is_none()
        {
            w.state = State::Starting;
            p.retry_at = Some(Instant::now() + PROBE_EVERY);
            let slot = w.slot;
            self.proxy.wake_at(Instant::now() + PROBE_EVERY);
            self.sync_view(slot);
        }
        // The refusing worker is out of the running until its port answers
        // again, so this ends: at worst the connection waits in `pending`.
        if let Err(conn) = self.hand_off(Conn { fd, peer, listener }) {
            self.pending.push_front(conn);
        }
        self.sync_proxy_views();
    }

    /// Moves what can be moved in both directions; ends the relay when
    /// both are done, resets both sides on an error.
    fn relay_pump(&mut self, r: usize) {
        let Some(relays) = self.proxy.relays.as_mut() else {
            return;
        };
        let relay = &mut relays.slots[r];
        let mut failed = false;
        let mut wait_out = false;
        // Bytes (or an EOF) went through: the relay is not idle.
        let mut moved = false;
        for d in [CLIENT, UPSTREAM] {
            let (src, dst) = (d, 1 - d);
            if d == CLIENT && relay.connecting {
                // Nothing is read from the client before the worker took
                // the connection: if its port refuses, the client goes to
                // another worker with every byte it sent still unread.
                continue;
            }
            loop {
                let dir = &mut relay.dirs[d];
                let mut progressed = false;
                if dir.buffered > 0 && dir.writable {
                    let Some(out) = relay.socks[dst].as_ref() else {
                        failed = true;
                        break;
                    };
                    match splice(
                        &dir.pipe_r,
                        None,
                        out.as_fd(),
                        None,
                        dir.buffered,
                        SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE,
                    ) {
                        Ok(n) => {
                            // Short: the socket's buffer is full.
                            if n < dir.buffered {
                                dir.writable = false;
                                wait_out |= dst == CLIENT;
                            }
                            dir.buffered -= n;
                            progressed = n > 0;
                            moved |= progressed;
                        }
                        Err(nix::errno::Errno::EAGAIN) => {
                            dir.writable = false;
                            wait_out |= dst == CLIENT;
                        }
                        Err(nix::errno::Errno::EINTR) => progressed = true,
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                if dir.buffered == 0 && dir.eof && !dir.done && !relay.connecting {
                    dir.done = true;
                    if let Some(out) = relay.socks[dst].as_ref() {
                        let _ = out.shutdown(Shutdown::Write);
                    }
                }
                if dir.readable && !dir.eof && dir.buffered < CHUNK {
                    let Some(input) = relay.socks[src].as_ref() else {
                        failed = true;
                        break;
                    };
                    match splice(
                        input.as_fd(),
                        None,
                        &dir.pipe_w,
                        None,
                        CHUNK - dir.buffered,
                        SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE,
                    ) {
                        Ok(0) => {
                            dir.eof = true;
                            progressed = true;
                            moved = true;
                        }
                        Ok(n) => {
                            dir.buffered += n;
                            progressed = true;
                            moved = true;
                        }
                        Err(nix::errno::Errno::EAGAIN) => dir.readable = false,
                        Err(nix::errno::Errno::EINTR) => progressed = true,
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                if !progressed {
                    break;
                }
            }
            if failed {
                break;
            }
        }
        if wait_out
            && !failed
            && !relay.client_out
            && let Some(c) = relay.socks[CLIENT].as_mut()
        {
            relay.client_out = true;
            let token = Source::Relay {
                relay: r,
                side: CLIENT,
            }
            .token();
            let both = Interest::READABLE | Interest::WRITABLE;
            if self.poll.registry().reregister(c, token, both).is_err() {
                failed = true;
            }
        }
        if failed {
            self.relay_end(r, true);
        } else if relay.dirs[CLIENT].done && relay.dirs[UPSTREAM].done {
            self.relay_end(r, false);
        } else if moved && !relay.connecting {
            relays.touch(r, self.proxy.timeouts.grain());
        }
    }

    /// Closes both sockets (with a reset when `abort`: the peer of a side
    /// that failed learns it failed) and frees the slot.
    fn relay_end(&mut self, r: usize, abort: bool) {
        let Some(relays) = self.proxy.relays.as_mut() else {
            return;
        };
        let relay = &mut relays.slots[r];
        let was_connecting = relay.connecting;
        // Closing a socket takes it out of the epoll set (no other copy of
        // it exists), so no deregistration is needed.
        for side in [CLIENT, UPSTREAM] {
            let sock = relay.socks[side].take();
            if abort && let Some(s) = &sock {
                let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
            }
            drop(sock);
        }
        // Bytes left in a pipe belong to no one now.
        for d in &mut relay.dirs {
            if d.buffered > 0 {
                drain_pipe(&d.pipe_r);
                d.buffered = 0;
            }
        }
        let (index, pid, slot) = (relay.worker, relay.pid, relay.slot);
        let was_full = !relays.has_room();
        relays.release(r);
        if !was_connecting && let Some(w) = self.relay_worker(index, pid) {
            w.closed = (w.closed + 1).min(w.sent);
        }
        self.relay_gone(index, pid, slot);
        if was_full {
            self.sync_proxy_views();
        }
    }

    /// The process a relay was sent to, if it is still attached.
    fn relay_worker(&mut self, index: usize, pid: u32) -> Option<&mut Worker> {
        self.workers.get_mut(index).filter(|w| w.pid == pid)
    }

    /// One relay to process `pid` (at `index`, in `slot`) less: its slot's
    /// count for the policy, and its own; the last of a drained worker's
    /// lets its stop signal go. Nothing, if that process has gone.
    fn relay_gone(&mut self, index: usize, pid: u32, slot: Slot) {
        let Some(w) = self.relay_worker(index, pid) else {
            return;
        };
        let Link::Proxy(p) = &mut w.link else { return };
        debug_assert!(p.relays > 0, "relay count of pid {pid} underflows");
        p.relays = p.relays.saturating_sub(1);
        let last_of_drained = p.relays == 0 && p.stop_at.is_some();
        if self.current[slot.0] == Some(index) {
            let v = &mut self.views[slot.0];
            v.active = v.active.saturating_sub(1);
        }
        if last_of_drained {
            self.proxy_stop(index);
        }
    }

    /// After a relay slot frees up or fills: proxy workers' eligibility.
    fn sync_proxy_views(&mut self) {
        for s in 0..self.current.len() {
            if self.current[s]
                .and_then(|i| self.workers.get(i))
                .is_some_and(|w| matches!(w.link, Link::Proxy(_)))
            {
                self.sync_view(Slot(s));
            }
        }
    }

    /// Whether a proxy worker could take a connection now (slab room).
    pub(crate) fn relay_room(&self) -> bool {
        self.proxy.relays.as_ref().is_some_and(Relays::has_room)
    }

    /// Relays still open (the dispatcher lingers for them on stop).
    pub(crate) fn relays_active(&self) -> usize {
        self.proxy.relays.as_ref().map_or(0, Relays::active)
    }

    /// Sets how long a relay's connect to its worker (and a readiness
    /// probe) may take, and how long an open relay may move no byte
    /// (`None`: forever). The defaults are the configuration's.
    pub fn set_proxy_timeouts(&mut self, connect: Duration, idle: Option<Duration>) {
        self.proxy.timeouts = Timeouts { connect, idle };
    }

    /// Reads the loop's clock for this turn (once, not per event).
    pub(crate) fn relay_clock(&mut self) {
        if let Some(relays) = self.proxy.relays.as_mut() {
            relays.now = Instant::now();
        }
    }

    /// When the next relay times out, if one is connecting or open.
    pub(crate) fn relay_wake(&self) -> Option<Instant> {
        self.proxy
            .relays
            .as_ref()
            .and_then(|r| r.deadline(&self.proxy.timeouts))
    }

    /// Refuses the connects, and resets the relays, whose time is up (only
    /// those: they are the heads of their lists).
    pub(super) fn relay_timers(&mut self) {
        let now = Instant::now();
        let timeouts = self.proxy.timeouts;
        let Some(relays) = self.proxy.relays.as_mut() else {
            return;
        };
        // What a refused client's next relay counts from.
        relays.now = now;
        // Each turn takes a head off its list; a relay started meanwhile
        // (a refused client's next) is not due before `now + connect`.
        while let Some(expired) = self
            .proxy
            .relays
            .as_ref()
            .and_then(|r| r.expired(&timeouts, now))
        {
            match expired {
                Expired::Connect(r) => {
                    self.stats.proxy_connect_timeouts += 1;
                    self.relay_refused(r);
                }
                Expired::Idle(r) => {
                    self.stats.proxy_idle_timeouts += 1;
                    self.relay_end(r, true);
                }
            }
        }
    }
}

/// Writes the relay's PROXY header to the worker (just connected: its
/// send buffer is empty, so the few bytes go in one write or not at all).
/// The client's address is its header's, else the socket's own peer; the
/// destination is the address the client came in to.
fn send_header(relay: &super::slab::Relay) -> bool {
    let (Some(client), Some(up)) = (&relay.socks[CLIENT], &relay.socks[UPSTREAM]) else {
        return false;
    };
    // A Unix listener's client has no address (the header says so), nor
    // a destination: a PROXY header's client that came in there goes on
    // with its family's unspecified one.
    let header = match (
        relay.peer.or_else(|| client.peer_addr().ok()),
        client.local_addr(),
    ) {
        (Some(src), Ok(dst)) => write::build(relay.send_proxy, src, dst),
        (Some(src), Err(_)) => {
            let any = match src {
                std::net::SocketAddr::V4(_) => std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
                std::net::SocketAddr::V6(_) => std::net::SocketAddr::from(([0u16; 8], 0)),
            };
            write::build(relay.send_proxy, src, any)
        }
        (None, _) => write::unknown(relay.send_proxy),
    };
    let Some(header) = header else {
        return false;
    };
    let mut up: &mio::net::TcpStream = up;
    matches!(up.write(header.as_bytes()), Ok(n) if n == header.as_bytes().len())
}

/// Empties a pipe whose bytes nobody will read (a relay that ended with
/// data in flight), so the slot starts clean.
fn drain_pipe(pipe: &OwnedFd) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = nix::unistd::read(pipe, &mut buf) {
        if n == 0 {
            break;
        }
    }
}
