//! The hot path: one mio loop, on its own thread, over the listener and the
//! workers' channels. Per connection: `accept4` (until `EAGAIN`), one policy
//! pick, one `sendmsg` carrying the fd, one `close`. Nothing on that path
//! allocates, formats, locks or logs; per-slot state lives in arrays
//! indexed by [`Slot`](crate::policy::Slot).
//!
//! Never spawns, waits for or signals processes: the supervisor does, and
//! tells this loop about workers through [`Command`]s; this loop reports
//! what workers say through [`Event`]s. See
//! `docs/lifetime-of-a-connection.md` for one connection's path by symbol,
//! and `docs/architecture.md` for where this loop sits.
//!
//! By concern: `api` (what callers send and get), `handoff` (accept, pick,
//! send), `lifecycle` (attach, READY, drain, detach, stop), `link` (the one
//! place that tells the links apart), one module per link — `native` (with
//! its stall watch), `node`, `shared`, `proxy` — and `tokens` (the loop's
//! mio tokens).

mod api;
mod conn;
mod front;
mod handoff;
mod handover;
pub mod header;
pub mod kernel;
mod lifecycle;
mod link;
mod native;
mod node;
mod proxy;
mod shared;
mod tokens;
mod worker;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TrySendError};
use mio::{Events, Interest, Poll, Waker};

use crate::policy::{Policy, PolicyKind, WorkerView};
use crate::proto::MAX_MESSAGE;
use crate::proto::scm::{self, RecvBatch};
pub use api::{
    CHATTER_QUEUE, Command, Event, EventQueues, Handle, Notifier, ProxyStats, Snapshot, Stats,
    WorkerStats,
};
use conn::{Conn, Pending};
use front::Front;
pub use handover::{Handed, Handover};
use link::Link;
use tokens::Source;
use worker::Table;

/// Connections held while no worker can take one (rescued, or accepted
/// while every channel is full). Preallocated: holding one never allocates.
const PENDING_CAPACITY: usize = 4096;

/// The dispatch loop and all of its state.
pub struct Dispatcher {
    poll: Poll,
    events: Events,
    /// lb's listeners (none in shared mode, and once stopping).
    listeners: Vec<Front>,
    /// Connections accepted from each listener, by its index.
    by_listener: Vec<u64>,
    /// Every attached worker process.
    workers: Table,
    /// Per slot: the table index of the process that takes its connections.
    current: Vec<Option<usize>>,
    /// Per slot: what the policy sees.
    views: Vec<WorkerView>,
    policy: Box<dyn Policy>,
    pending: Pending,
    /// The batch being accepted and sent, and what its sends refused
    /// (both preallocated, reused for every batch).
    accepted: Vec<Conn>,
    refused: Vec<Conn>,
    /// Connections waiting for their PROXY header (with proxy_protocol on).
    headers: Option<Box<header::Stage>>,
    commands: Receiver<Command>,
    notify: Notifier,
    seq: u64,
    /// Worker messages, many per syscall.
    batch: RecvBatch,
    /// Hand-off latency per connection, in ns (1 ns to 10 s, 3 digits).
    latency: hdrhistogram::Histogram<u64>,
    /// One datagram at a time: reading back a dead worker's queue.
    buf: Box<[u8]>,
    stats: Stats,
    shutting_down: bool,
    drained: bool,
    retry_at: Option<Instant>,
    running: bool,
    /// lb as the Node workers' cluster primary.
    node: node::Primary,
    /// The policy reads close reports (Node workers send them only then).
    reports: bool,
    /// Proxy mode's relays and probes.
    proxy: proxy::Proxy,
    /// Stop was asked for while relays were open: leave by this time.
    stop_by: Option<Instant>,
    /// Watching for workers that take none of their waiting connections.
    stall: Option<native::stall::Watch>,
    /// Failed accepts in a row (out of fds, memory); 0 when accepting works.
    accept_failures: u64,
    /// Kernel dispatch: the program that picks shared workers' listeners.
    steering: Option<kernel::Steering>,
    /// Kernel least-connections: workers whose messages wait for the tick
    /// (`kernel::reports`), and when that is.
    deferred: Vec<usize>,
    reads_at: Option<Instant>,
    /// Kernel dispatch: gone workers' listeners, kept listening while no
    /// worker is in the schedule to take what they hold (`kernel::pressure`).
    orphans: Vec<(crate::policy::Slot, u32, std::os::fd::OwnedFd)>,
    /// Stopping under kernel dispatch: DRAIN waits for the queues until then.
    stop_queues_by: Option<Instant>,
    /// `lb upgrade`: accepting is off until everything held is handed out.
    handing: Option<handover::Handing>,
}

impl Dispatcher {
    /// A dispatcher for `slots` workers (more can be attached later), with
    /// the listener already bound and listening.
    pub fn new(
        listener: std::net::TcpListener,
        policy: PolicyKind,
        slots: usize,
        notify: Notifier,
    ) -> io::Result<(Dispatcher, Handle)> {
        listener.set_nonblocking(true)?;
        let front = listener.local_addr()?;
        Dispatcher::build(vec![(listener.into(), None)], front, policy, slots, notify)
    }

    /// A dispatcher that accepts from every one of `listeners` (bound,
    /// listening, non-blocking; with the Unix socket file lb made, if
    /// any), in turn. `front` is the address Node workers are told they
    /// listen on.
    pub fn with_listeners(
        listeners: Vec<(std::os::fd::OwnedFd, Option<std::path::PathBuf>)>,
        front: SocketAddr,
        policy: PolicyKind,
        slots: usize,
        notify: Notifier,
    ) -> io::Result<(Dispatcher, Handle)> {
        Dispatcher::build(listeners, front, policy, slots, notify)
    }

    /// A dispatcher that accepts nothing: shared-mode workers accept from
    /// the listener at `front` themselves. It still tracks them (ready,
    /// drain) for the supervisor.
    pub fn without_listener(
        front: SocketAddr,
        policy: PolicyKind,
        slots: usize,
        notify: Notifier,
    ) -> io::Result<(Dispatcher, Handle)> {
        Dispatcher::build(Vec::new(), front, policy, slots, notify)
    }

    fn build(
        listeners: Vec<(std::os::fd::OwnedFd, Option<std::path::PathBuf>)>,
        front: SocketAddr,
        policy: PolicyKind,
        slots: usize,
        notify: Notifier,
    ) -> io::Result<(Dispatcher, Handle)> {
        let poll = Poll::new()?;
        for (i, (l, _)) in listeners.iter().enumerate() {
            poll.registry().register(
                &mut mio::unix::SourceFd(&std::os::fd::AsRawFd::as_raw_fd(l)),
                Source::Listener(i).token(),
                Interest::READABLE,
            )?;
        }
        let waker = Arc::new(Waker::new(poll.registry(), Source::Waker.token())?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let dispatcher = Dispatcher {
            poll,
            events: Events::with_capacity(1024),
            by_listener: vec![0; listeners.len()],
            listeners: listeners
                .into_iter()
                .map(|(fd, path)| Front::new(fd, path))
                .collect(),
            workers: Table::with_capacity(slots * 2),
            current: vec![None; slots],
            views: vec![WorkerView::default(); slots],
            policy: policy.build(slots),
            pending: Pending::with_capacity(PENDING_CAPACITY),
            accepted: Vec::with_capacity(scm::SEND_BATCH),
            refused: Vec::with_capacity(scm::SEND_BATCH),
            headers: None,
            commands: rx,
            notify,
            seq: 0,
            batch: RecvBatch::new(MAX_MESSAGE),
            latency: hdrhistogram::Histogram::new_with_bounds(1, 10_000_000_000, 3)
                .expect("valid bounds"),
            buf: vec![0u8; MAX_MESSAGE].into_boxed_slice(),
            stats: Stats::default(),
            shutting_down: false,
            drained: false,
            retry_at: None,
            running: true,
            node: node::Primary::new(front),
            reports: policy.uses_close_reports(),
            proxy: proxy::Proxy::default(),
            stop_by: None,
            stall: None,
            accept_failures: 0,
            steering: None,
            deferred: Vec::with_capacity(slots * 2),
            reads_at: None,
            orphans: Vec::new(),
            stop_queues_by: None,
            handing: None,
        };
        Ok((
            dispatcher,
            Handle {
                commands: tx,
                waker,
            },
        ))
    }

    /// Makes the relay slab for proxy-mode workers: `max_conns` relays,
    /// their pipes created now. A drained worker is signalled once its
    /// relays are done, or after `linger`.
    pub fn enable_proxy(&mut self, max_conns: usize, linger: Duration) -> io::Result<()> {
        self.proxy.enable(max_conns, linger)
    }

    /// Watches lb-protocol workers for connections they do not take: one
    /// with some waiting that takes none for `timeout` (or that closed its
    /// channel) is cut off and reported ([`Event::Stalled`]). `message_cost`
    /// is what one CONN takes of a channel's send buffer.
    pub fn watch_stalls(&mut self, timeout: Duration, message_cost: usize) {
        self.stall = Some(native::stall::Watch::new(timeout, message_cost));
    }

    /// Has the kernel pick shared workers' listeners with `steering`
    /// (attached to lb's listener already): ready workers are written into
    /// its schedule as they come and go.
    pub fn steer_in_kernel(&mut self, steering: kernel::Steering) {
        self.steering = Some(steering);
    }

    /// Runs until [`Command::Stop`]; returns the final counters.
    pub fn run(&mut self) -> io::Result<Stats> {
        while self.running {
            self.turn(None)?;
        }
        Ok(self.stats)
    }

    /// One poll (waiting at most `max_wait`, if given) and everything it
    /// made ready. `run` loops on it; a benchmark can drive it directly.
    pub fn turn(&mut self, max_wait: Option<Duration>) -> io::Result<()> {
        let wake = [
            self.retry_at,
            self.node.wake,
            self.proxy.wake,
            self.stop_by,
            self.stall_wake(),
            self.relay_wake(),
            self.steer_wake(),
            self.header_wake(),
            self.handover_wake(),
        ]
        .into_iter()
        .flatten()
        .min();
        let retry = wake.map(|t| t.saturating_duration_since(Instant::now()));
        let timeout = match (retry, max_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Err(e) = self.poll.poll(&mut self.events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e);
        }
        self.relay_clock();
        // Out of `self` while handling, put back after (no allocation: an
        // empty `Events` owns no buffer). Worker messages are handled before
        // the listener: a CLOSED that arrived in the same batch as a new
        // connection is counted before the pick.
        let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        let mut commands = false;
        for ev in events.iter() {
            match Source::of(ev.token()) {
                Source::Listener(i) => {
                    if let Some(l) = self.listeners.get_mut(i) {
                        l.waiting = true;
                    }
                }
                Source::Waker => commands = true,
                Source::Relay { relay, side } => self.relay_event(
                    relay,
                    side,
                    ev.is_readable() || ev.is_read_closed(),
                    ev.is_writable(),
                ),
                Source::Probe(index) => self.probe_event(index),
                Source::Header(place) => self.header_event(place),
                Source::Worker(index) => {
                    // (An end of the channel is read at once: it stays
                    // readable, and deferring it would wake every tick.)
                    if ev.is_readable() && !ev.is_read_closed() && self.reads_in_ticks() {
                        self.read_at_tick(index);
                    } else if ev.is_readable() || ev.is_read_closed() {
                        self.read_worker(index);
                    }
                    if ev.is_writable() {
                        self.worker_writable(index);
                    }
                }
            }
        }
        self.events = events;
        if commands {
            self.commands();
        }
        if let Some(t) = self.retry_at
            && Instant::now() >= t
        {
            self.retry_at = None;
            for l in &mut self.listeners {
                l.waiting = true;
            }
            let full: Vec<usize> = self
                .workers
                .indices()
                .filter(|&i| self.workers.get(i).is_some_and(|w| w.full))
                .collect();
            for index in full {
                self.worker_writable(index);
            }
        }
        self.node_timers();
        self.proxy_timers();
        self.stall_timers();
        self.steer_timers();
        self.header_timers();
        self.pump();
        self.handover_step();
        // Stopping: leave once the relays are done, or at the deadline.
        if let Some(by) = self.stop_by
            && (self.relays_active() == 0 || Instant::now() >= by)
        {
            self.running = false;
        }
        Ok(())
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    fn is_current(&self, index: usize) -> bool {
        self.workers
            .get(index)
            .is_some_and(|w| self.current[w.slot.0] == Some(index))
    }

    fn emit(&mut self, event: Event) {
        let queue = match event {
            Event::Message { .. } | Event::Malformed { .. } | Event::Note { .. } => {
                &self.notify.chatter
            }
            _ => &self.notify.lifecycle,
        };
        match queue.try_send(event) {
            Ok(()) => {
                if let Some(w) = &self.notify.waker {
                    let _ = w.wake();
                }
            }
            // Full (chatter only), or the supervisor is gone.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.events_dropped += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Slot;

    /// Worker chatter that the supervisor does not read in time is dropped
    /// and counted; a lifecycle event behind it still arrives.
    #[test]
    fn lifecycle_events_are_never_lost_behind_chatter() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (notifier, events) = Notifier::new(None);
        let (mut d, _handle) =
            Dispatcher::new(listener, PolicyKind::RoundRobin, 1, notifier).unwrap();
        let (slot, pid) = (Slot(0), 7);
        let flood = CHATTER_QUEUE + 1000;
        for _ in 0..flood {
            d.emit(Event::Message {
                slot,
                pid,
                payload: b"m".to_vec(),
            });
        }
        d.emit(Event::Leaving { slot, pid });
        assert_eq!(
            events.lifecycle.try_recv(),
            Ok(Event::Leaving { slot, pid })
        );
        assert_eq!(events.chatter.len(), CHATTER_QUEUE);
        assert_eq!(d.stats().events_dropped, 1000);
    }
}
