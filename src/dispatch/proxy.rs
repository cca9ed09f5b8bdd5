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
//!
//! Two timeouts bound what a relay may hold (HAProxy's `timeout connect`
//! and, for both sides at once, `timeout client`/`server`): a connect to
//! the worker that has not completed after `connect` is a refused connect
//! (the client goes to another worker; the worker is probed again, its
//! probe bounded the same way), and an open relay that moved no byte in
//! either direction for `idle` is reset on both sides. Both are found
//! without a scan: every busy slot is on one of two intrusive lists, its
//! links in the slot itself. Connects are on theirs in the order they
//! began, so the head is the first to time out. Open relays are on theirs
//! least recently active first: activity moves a relay to the tail, but
//! at most once per `grain` (an eighth of `idle`), so a relay moving bytes
//! costs one comparison per event, and an idle one is reset between `idle`
//! and `idle + grain` after its last byte. The loop's timer is the earlier
//! of the two heads' deadlines; expiring is O(1) per relay that expires.

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

/// No slot: the end of a timer list.
const NIL: u32 = u32::MAX;
/// The timer lists (a busy slot is on exactly one: the one its
/// `connecting` says).
const CONNECTING: usize = 0;
const OPEN: usize = 1;

/// How long a relay's connect, and its silence once open, may last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A connect to the worker (and a readiness probe) not done after this
    /// is refused.
    pub connect: Duration,
    /// An open relay that moved no byte for this long is reset; `None`:
    /// never.
    pub idle: Option<Duration>,
}

impl Default for Timeouts {
    /// The configuration's defaults.
    fn default() -> Timeouts {
        use crate::config::{defaults, duration};
        Timeouts {
            connect: duration::parse(defaults::PROXY_CONNECT_TIMEOUT).expect("a valid default"),
            idle: duration::parse(defaults::PROXY_IDLE_TIMEOUT).filter(|d| !d.is_zero()),
        }
    }
}

impl Timeouts {
    /// How stale an open relay's activity time may get before it is
    /// refreshed (and the relay moved to its list's tail).
    fn grain(&self) -> Duration {
        self.idle.map_or(Duration::MAX, |d| d / 8)
    }
}

/// Which relay expired, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    Connect(usize),
    Idle(usize),
}

/// A doubly linked list of slots, threaded through `Relay::prev/next`.
#[derive(Debug, Clone, Copy)]
struct List {
    head: u32,
    tail: u32,
}

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
    /// Connecting: when the connect began. Open: when bytes last moved
    /// (refreshed at most once per `Timeouts::grain`).
    since: Instant,
    /// Neighbours on the timer list the slot is on (`NIL` at the ends).
    prev: u32,
    next: u32,
}

/// The slab, made at start.
#[derive(Debug)]
pub struct Relays {
    slots: Vec<Relay>,
    free: Vec<u32>,
    /// `[CONNECTING]`: connects in flight, oldest first. `[OPEN]`: open
    /// relays, least recently active first.
    lists: [List; 2],
    /// The loop's clock, read once per turn (what `since` is set from, so
    /// the per-event path reads no clock).
    now: Instant,
}

impl Relays {
    /// `n` relay slots with their pipes (4 fds each).
    pub fn new(n: usize) -> io::Result<Relays> {
        let now = Instant::now();
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
                since: now,
                prev: NIL,
                next: NIL,
            });
        }
        let free = (0..n as u32).rev().collect();
        let empty = List {
            head: NIL,
            tail: NIL,
        };
        Ok(Relays {
            slots,
            free,
            lists: [empty; 2],
            now,
        })
    }

    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    pub fn active(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Puts slot `r` at the tail of timer list `list`.
    fn link(&mut self, list: usize, r: usize) {
        let tail = self.lists[list].tail;
        let relay = &mut self.slots[r];
        relay.prev = tail;
        relay.next = NIL;
        match tail {
            NIL => self.lists[list].head = r as u32,
            t => self.slots[t as usize].next = r as u32,
        }
        self.lists[list].tail = r as u32;
    }

    /// Takes slot `r` off timer list `list`.
    fn unlink(&mut self, list: usize, r: usize) {
        let (prev, next) = (self.slots[r].prev, self.slots[r].next);
        debug_assert!(
            (prev != NIL || self.lists[list].head == r as u32)
                && (next != NIL || self.lists[list].tail == r as u32),
            "relay {r} is not on timer list {list}"
        );
        match prev {
            NIL => self.lists[list].head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.lists[list].tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
        self.slots[r].prev = NIL;
        self.slots[r].next = NIL;
    }

    /// Slot `r` is busy now, connecting (since this turn).
    fn take(&mut self, r: usize) {
        self.slots[r].since = self.now;
        self.link(CONNECTING, r);
    }

    /// Slot `r`'s connect is done: it is open, and active now.
    fn opened(&mut self, r: usize) {
        self.unlink(CONNECTING, r);
        self.slots[r].connecting = false;
        self.slots[r].since = self.now;
        self.link(OPEN, r);
    }

    /// Slot `r`, open, moved bytes this turn.
    fn touch(&mut self, r: usize, grain: Duration) {
        if self.now.saturating_duration_since(self.slots[r].since) < grain {
            return;
        }
        self.unlink(OPEN, r);
        self.slots[r].since = self.now;
        self.link(OPEN, r);
    }

    /// Slot `r` (its sockets already gone) is free again.
    fn release(&mut self, r: usize) {
        let list = if self.slots[r].connecting {
            CONNECTING
        } else {
            OPEN
        };
        self.unlink(list, r);
        self.slots[r].connecting = false;
        self.free.push(r as u32);
    }

    /// When the first connect, or the first idle relay, times out.
    fn deadline(&self, t: &Timeouts) -> Option<Instant> {
        let connect = self.head(CONNECTING).map(|r| r.since + t.connect);
        let idle = t
            .idle
            .and_then(|idle| self.head(OPEN).map(|r| r.since + t.grain() + idle));
        connect.into_iter().chain(idle).min()
    }

    /// A relay whose time is up at `now`, if any.
    fn expired(&self, t: &Timeouts, now: Instant) -> Option<Expired> {
        let connect = self.lists[CONNECTING].head;
        if connect != NIL && self.slots[connect as usize].since + t.connect <= now {
            return Some(Expired::Connect(connect as usize));
        }
        let open = self.lists[OPEN].head;
        match t.idle {
            Some(idle)
                if open != NIL && self.slots[open as usize].since + t.grain() + idle <= now =>
            {
                Some(Expired::Idle(open as usize))
            }
            _ => None,
        }
    }

    fn head(&self, list: usize) -> Option<&Relay> {
        match self.lists[list].head {
            NIL => None,
            r => Some(&self.slots[r as usize]),
        }
    }
}

/// A proxy worker: its port, its readiness probe, and its drain.
#[derive(Debug)]
pub struct Probe {
    pub port: u16,
    conn: Option<mio::net::TcpStream>,
    /// When the probe in flight (`conn`) counts as refused.
    conn_by: Option<Instant>,
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
            conn_by: None,
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
        let Some(relays) = self.relays.as_mut() else {
            return;
        };
        let relay = &mut relays.slots[r];
        let (index, pid, slot) = (relay.worker, relay.pid, relay.slot);
        let client = relay.socks[CLIENT].take();
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
        } else if moved && !relay.connecting {
            relays.touch(r, self.proxy_timeouts.grain());
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
        p.conn_by = None;
        if let Some(mut s) = p.conn.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        match mio::net::TcpStream::connect(Dispatcher::upstream_addr(p.port)) {
            Ok(mut s) => {
                let token = Token(PROBE_BASE + index);
                if self
                    .poll
                    .registry()
                    .register(&mut s, token, Interest::WRITABLE)
                    .is_ok()
                {
                    // A port whose accept queue is full drops the SYN: the
                    // connect would hang for the kernel's SYN retries
                    // (minutes), and the worker stay out that long after
                    // it has room again.
                    let by = Instant::now() + self.proxy_timeouts.connect;
                    p.conn = Some(s);
                    p.conn_by = Some(by);
                    self.proxy_wake_at(by);
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
        p.conn_by = None;
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

    /// Relays whose connect or silence lasted too long; probes whose
    /// retry time has come or whose connect did.
    pub(super) fn proxy_timers(&mut self) {
        self.relay_timers();
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
            let late = match self.workers.get(index).map(|w| &w.link) {
                Some(Link::Proxy(p)) if p.conn.is_some() => p.conn_by,
                _ => None,
            };
            match late {
                // Refused, in effect: try again with a fresh SYN.
                Some(t) if t <= now => self.probe_start(index),
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
        p.conn_by = None;
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

    /// Sets how long a relay's connect to its worker (and a readiness
    /// probe) may take, and how long an open relay may move no byte
    /// (`None`: forever). The defaults are the configuration's.
    pub fn set_proxy_timeouts(&mut self, connect: Duration, idle: Option<Duration>) {
        self.proxy_timeouts = Timeouts { connect, idle };
    }

    /// Reads the loop's clock for this turn (once, not per event).
    pub(super) fn relay_clock(&mut self) {
        if let Some(relays) = self.relays.as_mut() {
            relays.now = Instant::now();
        }
    }

    /// When the next relay times out, if one is connecting or open.
    pub(super) fn relay_wake(&self) -> Option<Instant> {
        self.relays
            .as_ref()
            .and_then(|r| r.deadline(&self.proxy_timeouts))
    }

    /// Refuses the connects, and resets the relays, whose time is up (only
    /// those: they are the heads of their lists).
    fn relay_timers(&mut self) {
        let now = Instant::now();
        let timeouts = self.proxy_timeouts;
        let Some(relays) = self.relays.as_mut() else {
            return;
        };
        // What a refused client's next relay counts from.
        relays.now = now;
        // Each turn takes a head off its list; a relay started meanwhile
        // (a refused client's next) is not due before `now + connect`.
        while let Some(expired) = self.relays.as_ref().and_then(|r| r.expired(&timeouts, now)) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;
    use crate::dispatch::{Command, Handle, Notifier, Snapshot};
    use crate::policy::PolicyKind;
    use std::io::{ErrorKind, Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::mpsc;

    const WAIT: Duration = Duration::from_secs(10);

    fn order(relays: &Relays, list: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut r = relays.lists[list].head;
        let mut prev = NIL;
        while r != NIL {
            assert_eq!(relays.slots[r as usize].prev, prev, "back link of {r}");
            out.push(r as usize);
            prev = r;
            r = relays.slots[r as usize].next;
        }
        assert_eq!(relays.lists[list].tail, prev);
        out
    }

    /// Connects are kept in the order they began, open relays least
    /// recently active first; activity within a grain moves nothing.
    #[test]
    fn timer_lists_keep_their_order() {
        let t = Timeouts {
            connect: Duration::from_secs(5),
            idle: Some(Duration::from_secs(8)),
        };
        let mut relays = Relays::new(4).unwrap();
        let start = relays.now;
        for r in 0..4 {
            relays.slots[r].connecting = true;
            relays.take(r);
        }
        assert_eq!(order(&relays, CONNECTING), [0, 1, 2, 3]);
        assert_eq!(relays.deadline(&t), Some(start + t.connect));
        relays.now = start + Duration::from_millis(10);
        relays.opened(2);
        relays.opened(0);
        assert_eq!(order(&relays, CONNECTING), [1, 3]);
        assert_eq!(order(&relays, OPEN), [2, 0]);
        // Within a grain (1s): no move.
        relays.now = start + Duration::from_millis(500);
        relays.touch(2, t.grain());
        assert_eq!(order(&relays, OPEN), [2, 0]);
        relays.now = start + Duration::from_millis(1100);
        relays.touch(2, t.grain());
        assert_eq!(order(&relays, OPEN), [0, 2]);
        relays.release(3);
        relays.release(0);
        assert_eq!(order(&relays, CONNECTING), [1]);
        assert_eq!(order(&relays, OPEN), [2]);
        assert_eq!(relays.free, [3, 2, 1, 0, 3, 0]);
        // Relay 1's connect is due first; then 2, idle since 1.1s.
        let now = start + t.connect;
        assert_eq!(relays.expired(&t, now), Some(Expired::Connect(1)));
        relays.release(1);
        assert_eq!(relays.expired(&t, now), None);
        let idle_at = start + Duration::from_millis(1100) + t.grain() + Duration::from_secs(8);
        assert_eq!(relays.deadline(&t), Some(idle_at));
        assert_eq!(relays.expired(&t, idle_at), Some(Expired::Idle(2)));
        relays.release(2);
        assert_eq!(relays.deadline(&t), None);
        let off = Timeouts { idle: None, ..t };
        relays.slots[0].connecting = true;
        relays.take(0);
        relays.opened(0);
        assert_eq!(relays.deadline(&off), None, "no idle timeout: no deadline");
    }

    /// A dispatcher with `relays` relay slots on its own thread.
    fn dispatcher(
        relays: usize,
        connect: Duration,
        idle: Option<Duration>,
    ) -> (Handle, SocketAddr, crate::dispatch::EventQueues) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (notifier, events) = Notifier::new(None);
        let (mut d, handle) =
            Dispatcher::new(listener, PolicyKind::RoundRobin, 2, notifier).unwrap();
        d.enable_proxy(relays, Duration::from_secs(1)).unwrap();
        d.set_proxy_timeouts(connect, idle);
        std::thread::spawn(move || d.run().unwrap());
        (handle, addr, events)
    }

    /// Attaches a proxy worker on `port` in `slot` and waits for its READY.
    fn attach(handle: &Handle, events: &crate::dispatch::EventQueues, slot: usize, port: u16) {
        handle.send(Command::Attach {
            slot: Slot(slot),
            pid: slot as u32 + 1,
            channel: None,
            peer: None,
            weight: 1,
            mode: Mode::Proxy,
            port,
        });
        loop {
            match events.lifecycle.recv_timeout(WAIT) {
                Ok(Event::Ready { slot: s, .. }) if s == Slot(slot) => return,
                Ok(_) => {}
                Err(e) => panic!("slot {slot} never ready: {e}"),
            }
        }
    }

    fn snapshot(handle: &Handle) -> Snapshot {
        let (tx, rx) = crossbeam_channel::bounded(1);
        handle.send(Command::Snapshot(tx));
        rx.recv_timeout(WAIT).unwrap()
    }

    /// A worker that accepts and hands each relayed connection to the test
    /// (the first connection is lb's readiness probe).
    fn holding_worker() -> (u16, mpsc::Receiver<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming().skip(1) {
                let Ok(conn) = conn else { return };
                if tx.send(conn).is_err() {
                    return;
                }
            }
        });
        (port, rx)
    }

    /// Reads until EOF or an error; how the stream ended.
    fn ended(s: &mut TcpStream) -> Result<(), std::io::Error> {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// A relay that moves nothing for the idle timeout is reset on both
    /// sides, and counted; one that keeps moving bytes, even one at a time,
    /// is not.
    #[test]
    fn an_idle_relay_is_reset_on_both_sides_and_counted() {
        let idle = Duration::from_millis(300);
        let (handle, addr, events) = dispatcher(4, Duration::from_secs(5), Some(idle));
        let (port, accepted) = holding_worker();
        attach(&handle, &events, 0, port);

        let mut busy = TcpStream::connect(addr).unwrap();
        let mut busy_up = accepted.recv_timeout(WAIT).unwrap();
        let mut stalled = TcpStream::connect(addr).unwrap();
        stalled.write_all(b"GET / HT").unwrap();
        let started = Instant::now();
        let mut stalled_up = accepted.recv_timeout(WAIT).unwrap();
        // A byte every 100 ms for 3 idle timeouts keeps `busy` open.
        busy_up.set_read_timeout(Some(WAIT)).unwrap();
        for _ in 0..9 {
            busy.write_all(b".").unwrap();
            let mut b = [0u8; 1];
            busy_up.read_exact(&mut b).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        let e = ended(&mut stalled).expect_err("the client side is reset");
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        assert!(
            started.elapsed() >= idle,
            "reset after {:?}",
            started.elapsed()
        );
        let mut got = [0u8; 8];
        stalled_up.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"GET / HT", "what the client sent went through");
        let e = ended(&mut stalled_up).expect_err("the worker side is reset");
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        busy.write_all(b"!").unwrap();
        let mut b = [0u8; 1];
        busy_up.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"!", "the busy relay is still open");
        let stats = snapshot(&handle).stats;
        assert_eq!(
            (stats.proxy_idle_timeouts, stats.proxy_connect_timeouts),
            (1, 0)
        );
        // Once quiet, it goes the same way.
        let e = ended(&mut busy).expect_err("reset once idle");
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        assert_eq!(snapshot(&handle).stats.proxy_idle_timeouts, 2);
        handle.send(Command::Stop);
    }

    /// A connect to a worker whose accept queue is full (it listens with a
    /// backlog of 0, never accepts, and lb's probe took the one place)
    /// hangs: after the connect timeout the client goes to the other
    /// worker, with what it sent, and the hung worker is out until a probe
    /// gets through.
    #[test]
    fn a_connect_that_times_out_goes_to_another_worker() {
        let connect = Duration::from_millis(200);
        let (handle, addr, events) = dispatcher(4, connect, None);
        let hole =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        hole.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        hole.listen(0).unwrap();
        let hole_port = hole.local_addr().unwrap().as_socket().unwrap().port();
        attach(&handle, &events, 0, hole_port);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming().skip(1) {
                let Ok(mut conn) = conn else { return };
                let mut b = [0u8; 5];
                if conn.read_exact(&mut b).is_ok() && &b == b"hello" {
                    let _ = conn.write_all(b"1");
                }
            }
        });
        attach(&handle, &events, 1, port);
        // Round-robin sends one of the first two to the hung worker.
        for _ in 0..3 {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"hello").unwrap();
            c.set_read_timeout(Some(WAIT)).unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"1");
        }
        let stats = snapshot(&handle).stats;
        assert_eq!(
            (stats.proxy_connect_timeouts, stats.dispatched),
            (1, 3),
            "{stats:?}"
        );
        // Its probes keep timing out, so it stays out.
        std::thread::sleep(connect * 3);
        let snap = snapshot(&handle);
        assert!(!snap.workers.iter().any(|w| w.slot == Slot(0) && w.taking));
        assert_eq!(snap.stats.proxy_connect_timeouts, 1);
        drop(hole);
        handle.send(Command::Stop);
    }
}
