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

mod probe;
mod relay;
mod slab;
#[cfg(test)]
mod tests;

use std::io;
use std::time::{Duration, Instant};

pub use probe::Probe;
use slab::{Relays, Timeouts};

/// The dispatcher's proxy-mode state: the relays and their timers.
#[derive(Debug, Default)]
pub struct Proxy {
    /// The relay slab (made by `Dispatcher::enable_proxy`).
    relays: Option<Relays>,
    /// How long a drained proxy worker's relays may take before it is
    /// signalled anyway.
    linger: Duration,
    /// The earliest readiness probe retry (or drain linger's end).
    pub(super) wake: Option<Instant>,
    /// How long a relay's connect, and its silence, may last.
    timeouts: Timeouts,
}

impl Proxy {
    /// Makes `max_conns` relays, their pipes created now.
    pub fn enable(&mut self, max_conns: usize, linger: Duration) -> io::Result<()> {
        self.relays = Some(Relays::new(max_conns)?);
        self.linger = linger;
        Ok(())
    }

    /// Wakes the loop by `at` at the latest.
    fn wake_at(&mut self, at: Instant) {
        self.wake = Some(self.wake.map_or(at, |t| t.min(at)));
    }
}
