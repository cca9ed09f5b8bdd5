//! The relay slab: every relay's sockets and pipes, made at start, and the
//! two intrusive timer lists (connects in flight, open relays) that find
//! what timed out without a scan.

use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use crate::policy::Slot;

/// Bytes moved per splice call (the pipe's default capacity).
pub(super) const CHUNK: usize = 64 * 1024;

pub(super) const CLIENT: usize = 0;
pub(super) const UPSTREAM: usize = 1;

/// No slot: the end of a timer list.
pub(super) const NIL: u32 = u32::MAX;
/// The timer lists (a busy slot is on exactly one: the one its
/// `connecting` says).
pub(super) const CONNECTING: usize = 0;
pub(super) const OPEN: usize = 1;

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
    pub(super) fn grain(&self) -> Duration {
        self.idle.map_or(Duration::MAX, |d| d / 8)
    }
}

/// Which relay expired, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expired {
    Connect(usize),
    Idle(usize),
}

/// A doubly linked list of slots, threaded through `Relay::prev/next`.
#[derive(Debug, Clone, Copy)]
pub(super) struct List {
    pub(super) head: u32,
    pub(super) tail: u32,
}

/// One direction of a relay: bytes from `from` to the other side, through
/// a pipe.
#[derive(Debug)]
pub(super) struct Dir {
    pub(super) pipe_r: OwnedFd,
    pub(super) pipe_w: OwnedFd,
    /// Bytes in the pipe, not yet written on.
    pub(super) buffered: usize,
    /// The source said EOF.
    pub(super) eof: bool,
    /// EOF forwarded (`shutdown(SHUT_WR)` on the destination).
    pub(super) done: bool,
    /// Edge-triggered readiness: readable until a read finds nothing
    /// (`EAGAIN`; a short splice into a pipe may only mean the pipe ran out
    /// of slots), writable until a write falls short (the socket's buffer
    /// is full).
    pub(super) readable: bool,
    pub(super) writable: bool,
}

#[derive(Debug)]
pub(super) struct Relay {
    pub(super) socks: [Option<mio::net::TcpStream>; 2],
    pub(super) dirs: [Dir; 2],
    /// The worker (table index, and its pid: the index may hold another
    /// process by the time the relay ends) and slot it was sent to.
    pub(super) worker: usize,
    pub(super) pid: u32,
    pub(super) slot: Slot,
    pub(super) connecting: bool,
    /// The client socket is registered for writability too (only after a
    /// write to it fell short: otherwise every ACK would wake the loop).
    pub(super) client_out: bool,
    /// The client's address from its PROXY header, if it had one.
    pub(super) peer: Option<std::net::SocketAddr>,
    /// The listener it came from (kept should it go to another worker).
    pub(super) listener: u16,
    /// The PROXY header to write to the worker once connected.
    pub(super) send_proxy: crate::config::SendProxy,
    /// Connecting: when the connect began. Open: when bytes last moved
    /// (refreshed at most once per `Timeouts::grain`).
    pub(super) since: Instant,
    /// Neighbours on the timer list the slot is on (`NIL` at the ends).
    pub(super) prev: u32,
    pub(super) next: u32,
}

/// The slab, made at start.
#[derive(Debug)]
pub struct Relays {
    pub(super) slots: Vec<Relay>,
    pub(super) free: Vec<u32>,
    /// `[CONNECTING]`: connects in flight, oldest first. `[OPEN]`: open
    /// relays, least recently active first.
    pub(super) lists: [List; 2],
    /// The loop's clock, read once per turn (what `since` is set from, so
    /// the per-event path reads no clock).
    pub(super) now: Instant,
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
                peer: None,
                listener: 0,
                send_proxy: crate::config::SendProxy::Off,
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
    pub(super) fn link(&mut self, list: usize, r: usize) {
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
    pub(super) fn unlink(&mut self, list: usize, r: usize) {
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
    pub(super) fn take(&mut self, r: usize) {
        self.slots[r].since = self.now;
        self.link(CONNECTING, r);
    }

    /// Slot `r`'s connect is done: it is open, and active now.
    pub(super) fn opened(&mut self, r: usize) {
        self.unlink(CONNECTING, r);
        self.slots[r].connecting = false;
        self.slots[r].since = self.now;
        self.link(OPEN, r);
    }

    /// Slot `r`, open, moved bytes this turn.
    pub(super) fn touch(&mut self, r: usize, grain: Duration) {
        if self.now.saturating_duration_since(self.slots[r].since) < grain {
            return;
        }
        self.unlink(OPEN, r);
        self.slots[r].since = self.now;
        self.link(OPEN, r);
    }

    /// Slot `r` (its sockets already gone) is free again.
    pub(super) fn release(&mut self, r: usize) {
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
    pub(super) fn deadline(&self, t: &Timeouts) -> Option<Instant> {
        let connect = self.head(CONNECTING).map(|r| r.since + t.connect);
        let idle = t
            .idle
            .and_then(|idle| self.head(OPEN).map(|r| r.since + t.grain() + idle));
        connect.into_iter().chain(idle).min()
    }

    /// A relay whose time is up at `now`, if any.
    pub(super) fn expired(&self, t: &Timeouts, now: Instant) -> Option<Expired> {
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

    pub(super) fn head(&self, list: usize) -> Option<&Relay> {
        match self.lists[list].head {
            NIL => None,
            r => Some(&self.slots[r as usize]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
