//! A proxy worker's side: its port, the readiness probe that finds it
//! listening, and its drain (the stop signal waits for its relays).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::Interest;

use crate::dispatch::tokens::Source;
use crate::dispatch::worker::State;
use crate::dispatch::{Dispatcher, Event, Link};

/// How often a worker's port is tried until it accepts a connection.
pub(super) const PROBE_EVERY: Duration = Duration::from_millis(20);

/// A proxy worker: its port, its readiness probe, and its drain.
#[derive(Debug)]
pub struct Probe {
    pub port: u16,
    /// The PROXY header its port is sent before the client's bytes.
    pub send_proxy: crate::config::SendProxy,
    pub(super) conn: Option<mio::net::TcpStream>,
    /// When the probe in flight (`conn`) counts as refused.
    pub(super) conn_by: Option<Instant>,
    pub(super) retry_at: Option<Instant>,
    /// Relays to it, connecting or open.
    pub(super) relays: u32,
    /// Drained, but not signalled yet: its relays are still open. Signalled
    /// when the last ends, or at this time.
    pub(super) stop_at: Option<Instant>,
}

impl Probe {
    pub fn new(port: u16, send_proxy: crate::config::SendProxy) -> Probe {
        Probe {
            port,
            send_proxy,
            conn: None,
            conn_by: None,
            retry_at: None,
            relays: 0,
            stop_at: None,
        }
    }
}

/// A worker's loopback address.
pub(crate) fn upstream_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Dispatcher {
    /// Tries worker `index`'s port; READY when it accepts a connection.
    pub(crate) fn probe_start(&mut self, index: usize) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        let Link::Proxy(p) = &mut w.link else { return };
        p.retry_at = None;
        p.conn_by = None;
        if let Some(mut s) = p.conn.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        match mio::net::TcpStream::connect(upstream_addr(p.port)) {
            Ok(mut s) => {
                let token = Source::Probe(index).token();
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
                    let by = Instant::now() + self.proxy.timeouts.connect;
                    p.conn = Some(s);
                    p.conn_by = Some(by);
                    self.proxy.wake_at(by);
                    return;
                }
                p.retry_at = Some(Instant::now() + PROBE_EVERY);
            }
            Err(_) => p.retry_at = Some(Instant::now() + PROBE_EVERY),
        }
        self.proxy.wake_at(Instant::now() + PROBE_EVERY);
    }

    /// The probe's connect finished.
    pub(crate) fn probe_event(&mut self, index: usize) {
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
            self.proxy.wake_at(Instant::now() + PROBE_EVERY);
        }
    }

    /// Relays whose connect or silence lasted too long; probes whose
    /// retry time has come or whose connect did.
    pub(crate) fn proxy_timers(&mut self) {
        self.relay_timers();
        let Some(at) = self.proxy.wake else { return };
        let now = Instant::now();
        if now < at {
            return;
        }
        self.proxy.wake = None;
        for index in 0..self.workers.end() {
            let stop = match self.workers.get(index).map(|w| &w.link) {
                Some(Link::Proxy(p)) => p.stop_at,
                _ => None,
            };
            match stop {
                Some(t) if t <= now => self.proxy_stop(index),
                Some(t) => self.proxy.wake_at(t),
                None => {}
            }
            let late = match self.workers.get(index).map(|w| &w.link) {
                Some(Link::Proxy(p)) if p.conn.is_some() => p.conn_by,
                _ => None,
            };
            match late {
                // Refused, in effect: try again with a fresh SYN.
                Some(t) if t <= now => self.probe_start(index),
                Some(t) => self.proxy.wake_at(t),
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
                Some(t) => self.proxy.wake_at(t),
                None => {}
            }
        }
    }

    /// A proxy worker that leaves (it already gets no new connection): its
    /// stop signal waits for its relays, up to the linger.
    pub(crate) fn proxy_drain(&mut self, index: usize) {
        let linger = self.proxy.linger;
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
        self.proxy.wake_at(at);
    }

    /// The supervisor may signal worker `index` now (Draining).
    pub(super) fn proxy_stop(&mut self, index: usize) {
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
}
