//! Proxy mode: for servers that can only listen on a port of their own.
//! Each worker listens on a loopback port lb gave it; lb accepts the
//! client, connects to the worker, and relays bytes both ways with
//! `splice(2)` through pipes, so they never enter user space.
//!
//! Everything a relay needs is made at start: a slab of `max_conns` slots,
//! each with its two pipes. A connection takes a free slot and allocates
//! nothing; when none is free lb stops accepting (the kernel backlog
//! holds the rest). Half-closes are forwarded (`shutdown(SHUT_WR)` once a
//! direction's bytes are all through), a reset or error on either side
//! resets the other, and a slow reader stops lb reading its peer once the
//! pipe between them is full. A worker that dies takes only its own
//! connections with it. Readiness is a successful connect to its port.
//!
//! Draining a worker (reload, scale-down, stop) first stops sending it new
//! connections, then lets its relays finish, and only then has the
//! supervisor send it its stop signal: a server that exits on SIGTERM at
//! once (Python's `http.server`) would otherwise cut off the requests lb
//! had relayed to it, and the connects still in flight. Relays that do not
//! end by themselves (keep-alive clients) get half the drain timeout;
//! then the server is signalled anyway, for its own graceful stop.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::{Interest, Token};
use nix::fcntl::{SpliceFFlags, splice};

use super::worker::{Link, State};
use super::{Dispatcher, Event};
use crate::policy::Slot;

/// Relay sockets are `Token(RELAY_BASE + 2 * slot + side)`.
pub const RELAY_BASE: usize = 1 << 24;
/// A worker's readiness probe is `Token(PROBE_BASE + its table index)`.
pub const PROBE_BASE: usize = 1 << 23;
/// How often a worker's port is tried until it accepts a connection.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// Bytes moved per splice call (the pipe's default capacity).
const CHUNK: usize = 64 * 1024;

const CLIENT: usize = 0;
const UPSTREAM: usize = 1;

/// One direction of a relay: bytes from `from` to the other side, through
/// a pipe.
#[derive(Debug)]
struct Dir {
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    /// Bytes in the pipe, not yet written on.
    buffered: usize,
    /// The source said EOF.
    eof: bool,
    /// EOF forwarded (`shutdown(SHUT_WR)` on the destination).
    done: bool,
    /// Edge-triggered readiness: readable until a read finds nothing
    /// (`EAGAIN`; a short splice into a pipe may only mean the pipe ran out
    /// of slots), writable until a write falls short (the socket's buffer
    /// is full).
    readable: bool,
    writable: bool,
}

#[derive(Debug)]
struct Relay {
    socks: [Option<mio::net::TcpStream>; 2],
    dirs: [Dir; 2],
    /// The worker (table index, and its pid: the index may hold another
    /// process by the time the relay ends) and slot it was sent to.
    worker: usize,
    pid: u32,
    slot: Slot,
    connecting: bool,
    /// The client socket is registered for writability too (only after a
    /// write to it fell short: otherwise every ACK would wake the loop).
    client_out: bool,
}

/// The slab, made at start.
#[derive(Debug)]
pub struct Relays {
    slots: Vec<Relay>,
    free: Vec<u32>,
}

impl Relays {
    /// `n` relay slots with their pipes (4 fds each).
    pub fn new(n: usize) -> io::Result<Relays> {
        let mut slots = Vec::with_capacity(n);
        for _ in 0..n {
            let dir = || -> io::Result<Dir> {
                let (r, w) = nix::unistd::pipe2(
                    nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC,
                )?;
                Ok(Dir {
                    pipe_r: r,
                    pipe_w: w,
                    buffered: 0,
                    eof: false,
                    done: false,
                    readable: false,
                    writable: false,
                })
            };
            slots.push(Relay {
                socks: [None, None],
                dirs: [dir()?, dir()?],
                worker: 0,
                pid: 0,
                slot: Slot(0),
                connecting: false,
                client_out: false,
            });
        }
        let free = (0..n as u32).rev().collect();
        Ok(Relays { slots, free })
    }

    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    pub fn active(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

/// A proxy worker: its port, its readiness probe, and its drain.
#[derive(Debug)]
pub struct Probe {
    pub port: u16,
    conn: Option<mio::net::TcpStream>,
    retry_at: Option<Instant>,
    /// Relays to it, connecting or open.
    relays: u32,
    /// Drained, but not signalled yet: its relays are still open. Signalled
    /// when the last ends, or at this time.
    stop_at: Option<Instant>,
}

impl Probe {
    pub fn new(port: u16) -> Probe {
        Probe {
            port,
            conn: None,
            retry_at: None,
            relays: 0,
            stop_at: None,
        }
    }
}

impl Dispatcher {
    fn upstream_addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Starts relaying `fd` to proxy worker `index` (connect in progress).
    /// Gives `fd` back when no relay slot is free or the connect fails at once.
    pub(super) fn proxy_start(&mut self, index: usize, fd: OwnedFd) -> Result<(), OwnedFd> {
        let Some(w) = self.workers.get(index) else {
            return Err(fd);
        };
        let (slot, pid, port) = match &w.link {
            Link::Proxy(p) => (w.slot, w.pid, p.port),
            _ => return Err(fd),
        };
        let Some(relays) = self.relays.as_mut() else {
            return Err(fd);
        };
        let Some(r) = relays.free.pop() else {
            return Err(fd);
        };
        let upstream = match mio::net::TcpStream::connect(Dispatcher::upstream_addr(port)) {
            Ok(s) => s,
            Err(_) => {
                relays.free.push(r);
                return Err(fd);
            }
        };
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
        let registry = self.poll.registry();
        // The upstream's writability says when the connect is done.
        let interests = [Interest::READABLE, Interest::READABLE | Interest::WRITABLE];
        for side in [CLIENT, UPSTREAM] {
            if let Some(s) = relay.socks[side].as_mut() {
                let token = Token(RELAY_BASE + 2 * r as usize + side);
                let _ = registry.register(s, token, interests[side]);
            }
        }
        if let Some(Link::Proxy(p)) = self.workers.get_mut(index).map(|w| &mut w.link) {
            p.relays += 1;
        }
        if !self.relay_room() {
            self.sync_proxy_views();
        }
        Ok(())
    }

    /// Readiness on a relay socket.
    pub(super) fn relay_event(&mut self, token: usize, readable: bool, writable: bool) {
        let r = (token - RELAY_BASE) / 2;
        let side = (token - RELAY_BASE) % 2;
        let Some(relays) = self.relays.as_mut() else {
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
            relay.connecting = false;
            let (index, pid) = (relay.worker, relay.pid);
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
        let Some(relays) = self.relays.as_mut() else {
            return;
        };
        let relay = &mut relays.slots[r];
        let (index, pid, slot) = (relay.worker, relay.pid, relay.slot);
        let client = relay.socks[CLIENT].take();
        if let Some(mut up) = relay.socks[UPSTREAM].take() {
            let _ = self.poll.registry().deregister(&mut up);
        }
        relays.free.push(r as u32);
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
            self.proxy_wake_at(Instant::now() + PROBE_EVERY);
            self.sync_view(slot);
        }
        // The refusing worker is out of the running until its port answers
        // again, so this ends: at worst the connection waits in `pending`.
        if let Err(fd) = self.hand_off(fd) {
            self.pending.push_front(fd);
        }
        self.sync_proxy_views();
    }

    /// Moves what can be moved in both directions; ends the relay when
    /// both are done, resets both sides on an error.
    fn relay_pump(&mut self, r: usize) {
        let Some(relays) = self.relays.as_mut() else {
            return;
        };
        let relay = &mut relays.slots[r];
        let mut failed = false;
        let mut wait_out = false;
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
                        }
                        Ok(n) => {
                            dir.buffered += n;
                            progressed = true;
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
            let token = Token(RELAY_BASE + 2 * r + CLIENT);
            let both = Interest::READABLE | Interest::WRITABLE;
            if self.poll.registry().reregister(c, token, both).is_err() {
                failed = true;
            }
        }
        if failed {
            self.relay_end(r, true);
        } else if relay.dirs[CLIENT].done && relay.dirs[UPSTREAM].done {
            self.relay_end(r, false);
        }
    }

    /// Closes both sockets (with a reset when `abort`: the peer of a side
    /// that failed learns it failed) and frees the slot.
    fn relay_end(&mut self, r: usize, abort: bool) {
        let Some(relays) = self.relays.as_mut() else {
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
        relay.connecting = false;
        let (index, pid, slot) = (relay.worker, relay.pid, relay.slot);
        let was_full = !relays.has_room();
        relays.free.push(r as u32);
        if !was_connecting && let Some(w) = self.relay_worker(index, pid) {
            w.closed = (w.closed + 1).min(w.sent);
        }
        self.relay_gone(index, pid, slot);
        if was_full {
            self.sync_proxy_views();
        }
    }

    /// The process a relay was sent to, if it is still attached.
    fn relay_worker(&mut self, index: usize, pid: u32) -> Option<&mut super::worker::Worker> {
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
    pub(super) fn relay_room(&self) -> bool {
        self.relays.as_ref().is_some_and(Relays::has_room)
    }

    /// Tries worker `index`'s port; READY when it accepts a connection.
    pub(super) fn probe_start(&mut self, index: usize) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        let Link::Proxy(p) = &mut w.link else { return };
        p.retry_at = None;
        match mio::net::TcpStream::connect(Dispatcher::upstream_addr(p.port)) {
            Ok(mut s) => {
                let token = Token(PROBE_BASE + index);
                if self
                    .poll
                    .registry()
                    .register(&mut s, token, Interest::WRITABLE)
                    .is_ok()
                {
                    p.conn = Some(s);
                    return;
                }
                p.retry_at = Some(Instant::now() + PROBE_EVERY);
            }
            Err(_) => p.retry_at = Some(Instant::now() + PROBE_EVERY),
        }
        self.proxy_wake_at(Instant::now() + PROBE_EVERY);
    }

    /// The probe's connect finished.
    pub(super) fn probe_event(&mut self, index: usize) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        let (slot, pid) = (w.slot, w.pid);
        let Link::Proxy(p) = &mut w.link else { return };
        let Some(mut s) = p.conn.take() else { return };
        let _ = self.poll.registry().deregister(&mut s);
        let up = matches!(s.take_error(), Ok(None)) && s.peer_addr().is_ok();
        drop(s);
        if up {
            if w.state == State::Starting && self.current[slot.0] == Some(index) {
                // Back after a refused connect: it serves again.
                w.state = State::Ready;
                self.sync_view(slot);
            } else {
                self.ready(index, slot, pid);
            }
        } else {
            p.retry_at = Some(Instant::now() + PROBE_EVERY);
            self.proxy_wake_at(Instant::now() + PROBE_EVERY);
        }
    }

    fn proxy_wake_at(&mut self, at: Instant) {
        self.proxy_wake = Some(self.proxy_wake.map_or(at, |t| t.min(at)));
    }

    /// Probes whose retry time has come.
    pub(super) fn proxy_timers(&mut self) {
        let Some(at) = self.proxy_wake else { return };
        let now = Instant::now();
        if now < at {
            return;
        }
        self.proxy_wake = None;
        for index in 0..self.workers.end() {
            let stop = match self.workers.get(index).map(|w| &w.link) {
                Some(Link::Proxy(p)) => p.stop_at,
                _ => None,
            };
            match stop {
                Some(t) if t <= now => self.proxy_stop(index),
                Some(t) => self.proxy_wake_at(t),
                None => {}
            }
            let due = match self.workers.get(index).map(|w| &w.link) {
                Some(Link::Proxy(p)) => p.retry_at,
                _ => None,
            };
            match due {
                Some(t) if t <= now => {
                    let draining = self
                        .workers
                        .get(index)
                        .is_some_and(|w| w.state == State::Draining);
                    if !draining {
                        self.probe_start(index);
                    }
                }
                Some(t) => self.proxy_wake_at(t),
                None => {}
            }
        }
    }

    /// A proxy worker that leaves (it already gets no new connection): its
    /// stop signal waits for its relays, up to the linger.
    pub(super) fn proxy_drain(&mut self, index: usize) {
        let linger = self.proxy_linger;
        let Some(Link::Proxy(p)) = self.workers.get_mut(index).map(|w| &mut w.link) else {
            return;
        };
        if p.stop_at.is_some() {
            return;
        }
        if let Some(mut s) = p.conn.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        p.retry_at = None;
        let at = Instant::now() + linger;
        p.stop_at = Some(at);
        if p.relays == 0 {
            return self.proxy_stop(index);
        }
        self.proxy_wake_at(at);
    }

    /// The supervisor may signal worker `index` now (Draining).
    fn proxy_stop(&mut self, index: usize) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        if let Link::Proxy(p) = &mut w.link {
            p.stop_at = None;
        }
        if w.drain_sent {
            return;
        }
        w.drain_sent = true;
        let (slot, pid) = (w.slot, w.pid);
        self.emit(Event::Draining { slot, pid });
    }

    /// Relays still open (the dispatcher lingers for them on stop).
    pub(super) fn relays_active(&self) -> usize {
        self.relays.as_ref().map_or(0, Relays::active)
    }
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
