//! The hot path: one mio loop, on its own thread, over the listener and the
//! workers' channels. Per connection: `accept4` (until `EAGAIN`), one policy
//! pick, one `sendmsg` carrying the fd, one `close`. Nothing on that path
//! allocates, formats, locks or logs; per-slot state lives in arrays
//! indexed by [`Slot`].
//!
//! Never spawns, waits for or signals processes: the supervisor does, and
//! tells this loop about workers through [`Command`]s; this loop reports
//! what workers say through [`Event`]s. See
//! `docs/lifetime-of-a-connection.md` for one connection's path by symbol.

mod node;
mod proxy;
pub mod stall;
mod worker;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::config::Mode;
use crate::policy::{Policy, PolicyKind, Slot, WorkerView};
use crate::proto::scm::{Batch, RecvBatch};
use crate::proto::{self, MAX_MESSAGE, Malformed, Message, Wait, kind, scm, wire};
use crate::sys;
use worker::{Link, State, Table, Worker};

/// The listening socket.
pub const LISTENER: Token = Token(0);
/// Commands from the supervisor are waiting.
pub const WAKER: Token = Token(1);
/// A worker process's channel is `Token(WORKER_BASE + its table index)`.
pub const WORKER_BASE: usize = 2;

/// Connections held while no worker can take one (rescued, or accepted
/// while every channel is full). Preallocated: holding one never allocates.
const PENDING_CAPACITY: usize = 4096;
/// How long to stop accepting after the process ran out of fds or memory,
/// or the kernel refused more fds in flight.
const RESOURCE_RETRY: Duration = Duration::from_millis(10);
/// How a slot's current process takes connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// lb's protocol: many per `sendmmsg` (and the shim, which speaks it).
    Batch,
    /// Node's cluster IPC: one in flight, so not picked twice in a batch.
    Stepwise,
    /// Proxy mode: a relay each.
    Relay,
}

/// A socket filter that drops TCP segments with SYN set and ACK clear (new
/// connections) and passes everything else: the filter sees the TCP
/// header, whose flags are byte 13.
const SYN_DROP: [socket2::SockFilter; 5] = [
    socket2::SockFilter::new(0x30, 0, 0, 13),   // ldb [13]
    socket2::SockFilter::new(0x45, 2, 0, 0x10), // jset ACK -> pass
    socket2::SockFilter::new(0x45, 0, 1, 0x02), // jset SYN -> drop, else pass
    socket2::SockFilter::new(0x06, 0, 0, 0),    // drop
    socket2::SockFilter::new(0x06, 0, 0, 0xffff_ffff), // pass
];
/// How long a stopping listener lets handshakes already under way complete.
const HANDSHAKE_GRACE: Duration = Duration::from_millis(50);
/// How long a stopping dispatcher waits for open relays to finish.
const STOP_LINGER: Duration = Duration::from_secs(5);
/// Best-effort events (what workers say: messages, protocol errors, notes)
/// the supervisor has not read yet; beyond this they are dropped (and
/// counted) rather than ever blocking here. Lifecycle events are never
/// dropped: there are a few per worker process, never one per connection
/// or per message.
pub const CHATTER_QUEUE: usize = 4096;

/// Supervisor → dispatcher.
#[derive(Debug)]
pub enum Command {
    /// A worker process was started in `slot`. When it says READY it becomes
    /// the slot's current process, and the one before it (if any) is sent
    /// DRAIN: until then the old one keeps serving. `channel` is the
    /// master's end; `peer` (native mode) the master's copy of the worker's
    /// end, kept to rescue connections the worker never read.
    Attach {
        slot: Slot,
        pid: u32,
        channel: Option<OwnedFd>,
        peer: Option<OwnedFd>,
        weight: u32,
        mode: Mode,
        /// Proxy mode: the loopback port the worker listens on.
        port: u16,
    },
    /// The process exited: hand what is queued in its channel to others.
    Detach { slot: Slot, pid: u32 },
    /// Stop sending to the process and tell it to DRAIN.
    Drain { slot: Slot, pid: u32 },
    /// Accept what is in the backlog, close the listener, DRAIN every worker
    /// once nothing is left to hand out.
    Shutdown,
    /// Report the counters and every worker's connections (for status).
    Snapshot(Sender<Snapshot>),
    /// Send a user message to the ready workers of `target` (all when
    /// `None`); replies with how many took it.
    Message {
        target: Option<Slot>,
        payload: Vec<u8>,
        reply: Sender<usize>,
    },
    /// Leave the loop.
    Stop,
}

/// Dispatcher → supervisor. Never per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Ready {
        slot: Slot,
        pid: u32,
    },
    /// DRAIN was sent to the process.
    Draining {
        slot: Slot,
        pid: u32,
    },
    Leaving {
        slot: Slot,
        pid: u32,
    },
    /// The worker asks to be sent its stop signal (the shim, on DRAIN).
    Stop {
        slot: Slot,
        pid: u32,
    },
    Message {
        slot: Slot,
        pid: u32,
        payload: Vec<u8>,
    },
    Malformed {
        slot: Slot,
        pid: u32,
        error: Malformed,
    },
    Rescued {
        slot: Slot,
        pid: u32,
        count: u64,
    },
    /// Something about a worker worth a log line (Node workers' refused
    /// `listen()`s, a closed server).
    Note {
        slot: Slot,
        pid: u32,
        text: String,
    },
    /// `accept4` failed for lack of resources; accepting is retried every
    /// 10 ms (said once, until it works again).
    AcceptError {
        errno: i32,
    },
    /// `accept4` works again, after `failures` failed tries.
    AcceptRecovered {
        failures: u64,
    },
    /// The listener is closed and every worker has been sent DRAIN.
    Drained,
    /// The process takes none of the connections waiting for it (or closed
    /// its channel): it gets nothing more, and `rescued` of them went to
    /// the others. Replace it.
    Stalled {
        slot: Slot,
        pid: u32,
        why: String,
        rescued: u64,
    },
    /// The process's channel is read to the end (what it said last came
    /// before this) and let go: the answer to `Command::Detach`.
    Detached {
        slot: Slot,
        pid: u32,
    },
}

/// Counters of the loop. Plain integers: only the dispatch thread writes them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub accepted: u64,
    pub dispatched: u64,
    pub rescued: u64,
    /// Times accepting paused because every worker was full (or none ready).
    pub paused: u64,
    /// Worker chatter (messages, protocol errors, notes) dropped because
    /// the supervisor fell behind.
    pub events_dropped: u64,
    /// Connections a Node worker refused (`accepted:false`), handed out again.
    pub refused: u64,
    /// Proxy mode: connects to a worker not done within the connect
    /// timeout (each client went to another worker).
    pub proxy_connect_timeouts: u64,
    /// Proxy mode: relays reset after the idle timeout without a byte moved.
    pub proxy_idle_timeouts: u64,
}

/// One worker process as the dispatcher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStats {
    pub slot: Slot,
    pub pid: u32,
    /// Takes new connections (ready, not draining, its slot's current process).
    pub taking: bool,
    /// Sent and not reported closed; unknown (`None`) when neither the
    /// policy asks for close reports nor the worker sent any.
    pub active: Option<u64>,
    /// Sent over the process's life.
    pub total: u64,
}

/// The dispatcher's counters and workers at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub stats: Stats,
    pub workers: Vec<WorkerStats>,
    /// Hand-off latency per connection, ns.
    pub latency: hdrhistogram::Histogram<u64>,
}

/// How the supervisor (or a test) talks to a running dispatcher.
#[derive(Clone)]
pub struct Handle {
    commands: Sender<Command>,
    waker: Arc<Waker>,
}

impl Handle {
    pub fn send(&self, command: Command) {
        // Both fail only once the dispatcher is gone, when nothing is left to tell.
        let _ = self.commands.send(command);
        let _ = self.waker.wake();
    }
}

/// Where events go, and how to wake their reader.
pub struct Notifier {
    lifecycle: Sender<Event>,
    chatter: Sender<Event>,
    waker: Option<Arc<Waker>>,
}

/// The supervisor's end: lifecycle events (READY, LEAVING, Draining, …;
/// every one arrives, in order) and worker chatter (best effort).
pub struct EventQueues {
    pub lifecycle: Receiver<Event>,
    pub chatter: Receiver<Event>,
}

impl Notifier {
    /// A notifier that wakes `waker` (if any) after each event.
    pub fn new(waker: Option<Arc<Waker>>) -> (Notifier, EventQueues) {
        let (lifecycle, lifecycle_rx) = crossbeam_channel::unbounded();
        let (chatter, chatter_rx) = crossbeam_channel::bounded(CHATTER_QUEUE);
        (
            Notifier {
                lifecycle,
                chatter,
                waker,
            },
            EventQueues {
                lifecycle: lifecycle_rx,
                chatter: chatter_rx,
            },
        )
    }
}

/// The dispatch loop and all of its state.
pub struct Dispatcher {
    poll: Poll,
    events: Events,
    listener: Option<mio::net::TcpListener>,
    /// The listener may hold connections: set by its readiness, cleared by `EAGAIN`.
    backlog_waiting: bool,
    /// Every attached worker process.
    workers: Table,
    /// Per slot: the table index of the process that takes its connections.
    current: Vec<Option<usize>>,
    /// Per slot: what the policy sees.
    views: Vec<WorkerView>,
    policy: Box<dyn Policy>,
    pending: VecDeque<OwnedFd>,
    /// The batch being accepted and sent, and what its sends refused
    /// (both preallocated, reused for every batch).
    accepted: Vec<OwnedFd>,
    refused: Vec<OwnedFd>,
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
    /// Where the listener is (Node workers are told it).
    front: SocketAddr,
    /// Per slot: how its current process takes connections.
    delivery: Vec<Delivery>,
    /// The first Node worker's `queryServer` data, echoed to every worker.
    node_data: Option<String>,
    /// The earliest end of a Node worker's refusal back-off.
    node_wake: Option<Instant>,
    /// The policy reads close reports (Node workers send them only then).
    reports: bool,
    /// Proxy mode's relay slab (made by `enable_proxy`).
    relays: Option<proxy::Relays>,
    /// How long a drained proxy worker's relays may take before it is
    /// signalled anyway.
    proxy_linger: Duration,
    /// The earliest proxy readiness probe retry.
    proxy_wake: Option<Instant>,
    /// How long a relay's connect, and its silence, may last.
    proxy_timeouts: proxy::Timeouts,
    /// Stop was asked for while relays were open: leave by this time.
    stop_by: Option<Instant>,
    /// Watching for workers that take none of their waiting connections.
    stall: Option<stall::Watch>,
    /// Failed accepts in a row (out of fds, memory); 0 when accepting works.
    accept_failures: u64,
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
        Dispatcher::build(
            Some(mio::net::TcpListener::from_std(listener)),
            front,
            policy,
            slots,
            notify,
        )
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
        Dispatcher::build(None, front, policy, slots, notify)
    }

    fn build(
        mut listener: Option<mio::net::TcpListener>,
        front: SocketAddr,
        policy: PolicyKind,
        slots: usize,
        notify: Notifier,
    ) -> io::Result<(Dispatcher, Handle)> {
        let poll = Poll::new()?;
        if let Some(l) = listener.as_mut() {
            poll.registry().register(l, LISTENER, Interest::READABLE)?;
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let dispatcher = Dispatcher {
            poll,
            events: Events::with_capacity(1024),
            backlog_waiting: listener.is_some(),
            listener,
            workers: Table::with_capacity(slots * 2),
            current: vec![None; slots],
            views: vec![WorkerView::default(); slots],
            policy: policy.build(slots),
            pending: VecDeque::with_capacity(PENDING_CAPACITY),
            accepted: Vec::with_capacity(scm::SEND_BATCH),
            refused: Vec::with_capacity(scm::SEND_BATCH),
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
            front,
            delivery: vec![Delivery::Batch; slots],
            node_data: None,
            node_wake: None,
            reports: policy.uses_close_reports(),
            relays: None,
            proxy_linger: Duration::ZERO,
            proxy_wake: None,
            proxy_timeouts: proxy::Timeouts::default(),
            stop_by: None,
            stall: None,
            accept_failures: 0,
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
        self.relays = Some(proxy::Relays::new(max_conns)?);
        self.proxy_linger = linger;
        Ok(())
    }

    /// Watches lb-protocol workers for connections they do not take: one
    /// with some waiting that takes none for `timeout` (or that closed its
    /// channel) is cut off and reported ([`Event::Stalled`]). `message_cost`
    /// is what one CONN takes of a channel's send buffer.
    pub fn watch_stalls(&mut self, timeout: Duration, message_cost: usize) {
        self.stall = Some(stall::Watch::new(timeout, message_cost));
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
            self.node_wake,
            self.proxy_wake,
            self.stop_by,
            self.stall_wake(),
            self.relay_wake(),
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
            match ev.token() {
                LISTENER => self.backlog_waiting = true,
                WAKER => commands = true,
                Token(t) if t >= proxy::RELAY_BASE => {
                    self.relay_event(t, ev.is_readable() || ev.is_read_closed(), ev.is_writable())
                }
                Token(t) if t >= proxy::PROBE_BASE => self.probe_event(t - proxy::PROBE_BASE),
                Token(t) => {
                    let index = t - WORKER_BASE;
                    if ev.is_readable() || ev.is_read_closed() {
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
            self.backlog_waiting = true;
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
        self.pump();
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

    /// Hands out held connections, then accepts until `EAGAIN` or until no
    /// worker can take more (the kernel backlog then holds the rest).
    fn pump(&mut self) {
        while let Some(fd) = self.pending.pop_front() {
            if let Err(fd) = self.hand_off(fd) {
                self.pending.push_front(fd);
                return;
            }
        }
        if self.shutting_down {
            self.send_drains();
            return;
        }
        if !self.backlog_waiting || self.retry_at.is_some() {
            return;
        }
        // Out of `self` for the batch so `hand_off` can borrow `self` mutably.
        let Some(listener) = self.listener.take() else {
            return;
        };
        self.accept_batch(&listener);
        self.listener = Some(listener);
    }

    /// Accepts up to `SEND_BATCH` connections at a time and sends them, until
    /// the backlog is empty or no worker has room.
    fn accept_batch(&mut self, listener: &mio::net::TcpListener) {
        loop {
            let mut more = true;
            while self.accepted.len() < scm::SEND_BATCH {
                match sys::accept4(listener.as_fd()) {
                    Ok(fd) => {
                        self.stats.accepted += 1;
                        self.accepted.push(fd);
                        if self.accept_failures > 0 {
                            let failures = std::mem::take(&mut self.accept_failures);
                            self.emit(Event::AcceptRecovered { failures });
                        }
                    }
                    Err(e) => {
                        match e.raw_os_error() {
                            Some(libc::EAGAIN) => self.backlog_waiting = false,
                            // The client gave up before we accepted: next one.
                            Some(libc::ECONNABORTED | libc::EPROTO) => continue,
                            // Out of fds or memory (or anything unexpected):
                            // retry shortly instead of spinning.
                            // Said once per episode, not at every retry.
                            errno => {
                                self.retry_at = Some(Instant::now() + RESOURCE_RETRY);
                                self.accept_failures += 1;
                                if self.accept_failures == 1 {
                                    self.emit(Event::AcceptError {
                                        errno: errno.unwrap_or(0),
                                    });
                                }
                            }
                        }
                        more = false;
                        break;
                    }
                }
            }
            if self.accepted.is_empty() {
                return;
            }
            // Time from the end of the accepts to the last send, recorded
            // once per batch (two clock reads per batch, never a lock or an
            // allocation: the histogram is sized up front and saturates).
            let batch = self.accepted.len() as u64;
            let started = Instant::now();
            self.send_accepted();
            let nanos = started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
            self.latency.saturating_record_n(nanos.max(1), batch);
            if !more || !self.pending.is_empty() {
                return;
            }
        }
    }

    /// Sends the accepted batch: one pick per connection (each counted
    /// active at once, so least-conn sees the batch's own picks), then one
    /// `sendmmsg` per worker, its connections in accept order, each closed
    /// right after the call that carried it. What a full channel refused
    /// goes through `hand_off` again.
    fn send_accepted(&mut self) {
        let mut batch = std::mem::take(&mut self.accepted);
        let n = batch.len();
        let mut slots = [usize::MAX; scm::SEND_BATCH];
        for slot in slots.iter_mut().take(n) {
            match self.policy.pick(&self.views) {
                Some(s) => {
                    *slot = s.0;
                    self.views[s.0].active += 1;
                    // One connection at a time: not picked again this batch.
                    if self.delivery[s.0] == Delivery::Stepwise {
                        self.views[s.0].eligible = false;
                    }
                }
                None => break,
            }
        }
        // Group by worker, keeping accept order within a group (insertion
        // sort: n <= SEND_BATCH, and it moves nothing when already grouped).
        for i in 1..n {
            let mut j = i;
            while j > 0 && slots[j - 1] > slots[j] {
                slots.swap(j - 1, j);
                batch.swap(j - 1, j);
                j -= 1;
            }
        }
        let mut refused = std::mem::take(&mut self.refused);
        let mut start = 0;
        while start < n {
            let slot = slots[start];
            let end = (start..n).find(|&k| slots[k] != slot).unwrap_or(n);
            let len = end - start;
            if slot != usize::MAX && self.delivery[slot] != Delivery::Batch {
                for fd in batch.drain(..len) {
                    if let Err(fd) = self.deliver_picked(slot, fd) {
                        refused.push(fd);
                    }
                }
                start = end;
                continue;
            }
            let sent = if slot == usize::MAX {
                0
            } else {
                self.send_group(slot, &batch[..len])
            };
            // Close what went out (the first `sent`), keep what did not.
            for (k, fd) in batch.drain(..len).enumerate() {
                if k >= sent {
                    refused.push(fd);
                }
            }
            start = end;
        }
        self.accepted = batch;
        for fd in refused.drain(..) {
            if let Err(fd) = self.hand_off(fd) {
                self.stats.paused += u64::from(self.pending.is_empty());
                self.pending.push_back(fd);
            }
        }
        self.refused = refused;
    }

    /// Delivers `fd` to `slot`'s worker one connection at a time (Node,
    /// proxy), already counted active by its pick; undoes that when it
    /// cannot take it.
    fn deliver_picked(&mut self, slot: usize, fd: OwnedFd) -> Result<(), OwnedFd> {
        let sent = match self.current[slot] {
            Some(index) => self.deliver(index, Slot(slot), fd),
            None => Err(fd),
        };
        if sent.is_err() {
            let v = &mut self.views[slot];
            v.active = v.active.saturating_sub(1);
        }
        sent
    }

    /// Sends `fds` to `slot`'s worker; returns how many went out. Undoes the
    /// picks of the rest and marks the worker full (or unusable).
    fn send_group(&mut self, slot: usize, fds: &[OwnedFd]) -> usize {
        let Some(index) = self.current[slot] else {
            self.views[slot].active -= fds.len() as u32;
            self.views[slot].eligible = false;
            return 0;
        };
        let Some(w) = self.workers.get_mut(index) else {
            return 0;
        };
        let result = proto::send_conns(w.channel.as_fd(), fds, self.seq + 1);
        let sent = *result.as_ref().unwrap_or(&0);
        self.seq += sent as u64;
        w.sent += sent as u64;
        self.stats.dispatched += sent as u64;
        if sent < fds.len() {
            self.views[slot].active -= (fds.len() - sent) as u32;
            self.channel_refused(index, slot, result.err());
        }
        sent
    }

    /// A send to worker `index` (in `slot`) stopped short: full, too many
    /// fds in flight, or (cannot happen while we hold its peer) broken.
    fn channel_refused(&mut self, index: usize, slot: usize, error: Option<io::Error>) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        match error.as_ref().and_then(io::Error::raw_os_error) {
            // Too many fds in flight for this user: no writable edge will
            // tell us when that passes, so retry on a timer.
            Some(libc::ETOOMANYREFS) => self.retry_at = Some(Instant::now() + RESOURCE_RETRY),
            // A short sendmmsg (None) or EAGAIN: full; the writable edge says when not.
            None | Some(libc::EAGAIN) => {}
            Some(_) => w.state = State::Draining,
        }
        w.full = true;
        self.views[slot].eligible = false;
        self.want_writable(index, true);
    }

    /// Sends `fd` to the worker the policy picks, trying others while
    /// channels are full. Gives the fd back when no worker can take it.
    #[inline]
    fn hand_off(&mut self, mut fd: OwnedFd) -> Result<(), OwnedFd> {
        loop {
            let Some(slot) = self.policy.pick(&self.views) else {
                return Err(fd);
            };
            let Some(index) = self.current[slot.0] else {
                // Eligible implies a current process; repair rather than spin.
                self.views[slot.0].eligible = false;
                continue;
            };
            match self.deliver(index, slot, fd) {
                Ok(()) => {
                    self.views[slot.0].active += 1;
                    return Ok(());
                }
                // `deliver` made the slot ineligible: pick again.
                Err(back) => fd = back,
            }
        }
    }

    /// Gives one connection to worker `index` (in `slot`) the way its link
    /// takes them. On failure the fd comes back and the slot is no longer
    /// eligible (full, busy, or gone), so a caller that picks again moves on.
    #[inline]
    fn deliver(&mut self, index: usize, slot: Slot, fd: OwnedFd) -> Result<(), OwnedFd> {
        let Some(w) = self.workers.get_mut(index) else {
            self.views[slot.0].eligible = false;
            return Err(fd);
        };
        match &w.link {
            Link::Native { .. } => {
                self.seq += 1;
                match proto::send_conn(w.channel.as_fd(), fd.as_fd(), self.seq) {
                    Ok(()) => {
                        // Close our copy at once: until we do, the worker's close
                        // does not release the socket (DESIGN.md, "The hot path").
                        drop(fd);
                        w.sent += 1;
                        self.stats.dispatched += 1;
                        Ok(())
                    }
                    Err(e) => {
                        self.channel_refused(index, slot.0, Some(e));
                        Err(fd)
                    }
                }
            }
            Link::Node(_) => self.node_send(index, fd),
            Link::Proxy(_) => self.proxy_start(index, fd).inspect_err(|_| {
                self.views[slot.0].eligible = false;
            }),
            Link::Shared { .. } => {
                self.views[slot.0].eligible = false;
                Err(fd)
            }
        }
    }

    /// Turns the writable interest of a worker's channel on (while it is
    /// full, or DRAIN waits for room) or off. Off the steady-state path:
    /// only when a channel fills up or frees again.
    fn want_writable(&mut self, index: usize, on: bool) {
        let Some(w) = self.workers.get(index) else {
            return;
        };
        let interest = if on {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        // Re-arming reports readiness that is already there, so no edge is lost.
        let _ = self.poll.registry().reregister(
            &mut SourceFd(&w.channel.as_raw_fd()),
            Token(WORKER_BASE + index),
            interest,
        );
    }

    /// Recomputes whether `slot` may be picked.
    fn sync_view(&mut self, slot: Slot) {
        let current = self.current[slot.0].and_then(|i| self.workers.get(i));
        let delivery = match current.map(|w| &w.link) {
            Some(Link::Node(_)) => Delivery::Stepwise,
            Some(Link::Proxy(_)) => Delivery::Relay,
            _ => Delivery::Batch,
        };
        self.views[slot.0].eligible = current.is_some_and(|w| {
            w.state == State::Ready && !w.full && !w.progress.stalled && w.link.can_take()
        }) && (delivery != Delivery::Relay || self.relay_room());
        self.delivery[slot.0] = delivery;
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

    /// Reads everything a worker sent (edge-triggered: until the queue is
    /// empty, which a short `recvmmsg` count already proves).
    fn read_worker(&mut self, index: usize) {
        if self.workers.get(index).is_some_and(|w| w.link.is_node()) {
            return self.node_read(index);
        }
        let mut batch = std::mem::take(&mut self.batch);
        while let Some(w) = self.workers.get(index) {
            let (slot, pid) = (w.slot, w.pid);
            let n = match batch.recv(w.channel.as_fd()) {
                Ok(Batch::Got(n)) => n,
                // Empty (WouldBlock); closed cannot happen while we hold the peer end.
                Ok(Batch::Closed) | Err(_) => break,
            };
            for i in 0..n {
                let d = batch.get(i);
                let message = if d.had_fds {
                    Err(Malformed::UnexpectedFd)
                } else {
                    wire::parse(d.data, d.truncated)
                };
                self.on_message(index, slot, pid, message);
            }
            if n < scm::BATCH {
                break;
            }
        }
        self.batch = batch;
    }

    fn on_message(
        &mut self,
        index: usize,
        slot: Slot,
        pid: u32,
        message: Result<Message<'_>, Malformed>,
    ) {
        let complaint = |error| Event::Malformed { slot, pid, error };
        match message {
            Ok(Message::Closed { n }) => self.closed(index, slot, n),
            Ok(Message::Ready) => self.ready(index, slot, pid),
            Ok(Message::Leaving) => self.leaving(index, slot, pid),
            // Once per process: a worker that repeats it makes no more work.
            Ok(Message::Stop) => {
                if let Some(w) = self.workers.get_mut(index)
                    && !std::mem::replace(&mut w.stop_seen, true)
                {
                    self.emit(Event::Stop { slot, pid });
                }
            }
            Ok(Message::User(payload)) => {
                let payload = payload.to_vec();
                self.emit(Event::Message { slot, pid, payload });
            }
            Ok(Message::Unknown(_)) => {}
            Ok(Message::Conn { .. }) => self.emit(complaint(Malformed::WrongDirection(kind::CONN))),
            Ok(Message::Drain) => self.emit(complaint(Malformed::WrongDirection(kind::DRAIN))),
            Err(error) => self.emit(complaint(error)),
        }
    }

    /// The worker reports `n` of its connections closed.
    fn closed(&mut self, index: usize, slot: Slot, n: u64) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        let fit = n.min(w.sent - w.closed);
        w.closed += fit;
        w.reported |= n > 0;
        let pid = w.pid;
        if self.current[slot.0] == Some(index) {
            let v = &mut self.views[slot.0];
            v.active = v.active.saturating_sub(fit as u32);
        }
        if fit < n {
            self.emit(Event::Malformed {
                slot,
                pid,
                error: Malformed::OverClosed(n - fit),
            });
        }
    }

    /// READY (a Node worker's `listening`): the switch. The slot's
    /// connections go to this process now; the one it replaces (if any) drains.
    fn ready(&mut self, index: usize, slot: Slot, pid: u32) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        if w.state != State::Starting {
            return;
        }
        w.state = State::Ready;
        let weight = w.weight;
        let previous = self.current[slot.0].filter(|&i| i != index);
        self.current[slot.0] = Some(index);
        self.views[slot.0] = WorkerView {
            eligible: false,
            weight,
            active: 0,
        };
        self.sync_view(slot);
        self.emit(Event::Ready { slot, pid });
        if let Some(previous) = previous {
            self.drain_worker(previous);
        }
        if self.shutting_down {
            self.drain_worker(index);
        }
    }

    /// The worker is leaving on its own: nothing new goes to it.
    fn leaving(&mut self, index: usize, slot: Slot, pid: u32) {
        if let Some(w) = self.workers.get_mut(index) {
            w.state = State::Draining;
        }
        self.sync_view(slot);
        self.emit(Event::Leaving { slot, pid });
    }

    fn worker_writable(&mut self, index: usize) {
        if self.workers.get(index).is_some_and(|w| w.link.is_node()) {
            return self.node_flush(index);
        }
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        let slot = w.slot;
        if w.drain_queued {
            w.drain_queued = false;
            self.send_drain(index);
        }
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        if w.full {
            w.full = false;
            self.sync_view(slot);
        }
    }

    fn commands(&mut self) {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Attach {
                    slot,
                    pid,
                    channel,
                    peer,
                    weight,
                    mode,
                    port,
                } => {
                    // (Until the table holds workers without a channel.)
                    let (channel, peer) = match channel {
                        Some(c) => (c, peer),
                        None => match proto::pair() {
                            Ok((c, p)) => (c, Some(p)),
                            Err(_) => continue,
                        },
                    };
                    let link = match (mode, peer) {
                        // The shim speaks lb's protocol for the server.
                        (Mode::Native | Mode::Shim, Some(peer)) => Link::Native { peer },
                        (Mode::Node, _) => Link::Node(Box::default()),
                        (Mode::Shared, peer) => Link::Shared { _placeholder: peer },
                        (Mode::Proxy, _) => Link::Proxy(Box::new(proxy::Probe::new(port))),
                        // Native without a peer cannot be rescued: treat the
                        // protocol mismatch as the caller's bug, loudly.
                        (Mode::Native | Mode::Shim, None) => {
                            panic!("a native worker is attached with its peer")
                        }
                    };
                    self.attach(slot, pid, channel, link, weight)
                }
                Command::Detach { slot, pid } => self.detach(slot, pid),
                Command::Drain { slot, pid } => {
                    if let Some(index) = self.workers.find(slot, pid) {
                        self.drain_worker(index);
                    }
                }
                Command::Shutdown => self.shutdown(),
                Command::Snapshot(reply) => {
                    let _ = reply.send(self.snapshot());
                }
                Command::Message {
                    target,
                    payload,
                    reply,
                } => {
                    let _ = reply.send(self.message(target, &payload));
                }
                // Relays still open get a few seconds to finish (their
                // workers have exited; what is left is bytes in flight).
                Command::Stop if self.relays_active() > 0 => {
                    self.stop_by = Some(Instant::now() + STOP_LINGER);
                }
                Command::Stop => self.running = false,
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        let workers = self
            .workers
            .indices()
            .filter_map(|i| {
                let w = self.workers.get(i)?;
                Some(WorkerStats {
                    slot: w.slot,
                    pid: w.pid,
                    taking: self.is_current(i) && w.state == State::Ready,
                    // lb sees a proxy relay end itself; a shared worker's
                    // connections it never sees at all.
                    active: match &w.link {
                        Link::Proxy(_) => Some(w.sent - w.closed),
                        Link::Shared { .. } => None,
                        _ => (self.reports || w.reported).then(|| w.sent - w.closed),
                    },
                    total: w.sent,
                })
            })
            .collect();
        Snapshot {
            stats: self.stats,
            workers,
            latency: self.latency.clone(),
        }
    }

    /// Sends a USER message to the ready workers of `target`; how many took it.
    fn message(&mut self, target: Option<Slot>, payload: &[u8]) -> usize {
        let indices: Vec<usize> = self.workers.indices().collect();
        let mut delivered = 0;
        for i in indices {
            let Some(w) = self.workers.get(i) else {
                continue;
            };
            if w.state != State::Ready || target.is_some_and(|t| t != w.slot) {
                continue;
            }
            if w.link.is_node() {
                delivered += usize::from(self.node_message(i, payload));
                continue;
            }
            if matches!(w.link, Link::Shared { .. } | Link::Proxy(_)) {
                continue;
            }
            let sent = proto::send_plain(w.channel.as_fd(), kind::USER, 0, payload, Wait::DontWait);
            delivered += usize::from(sent.is_ok());
        }
        delivered
    }

    fn attach(&mut self, slot: Slot, pid: u32, channel: OwnedFd, link: Link, weight: u32) {
        if slot.0 >= self.current.len() {
            self.current.resize(slot.0 + 1, None);
            self.views.resize(slot.0 + 1, WorkerView::default());
            self.delivery.resize(slot.0 + 1, Delivery::Batch);
            self.policy.resize(slot.0 + 1);
        }
        // The new process is its slot's candidate: the current one (if any)
        // keeps taking connections until the new one says READY.
        let raw = channel.as_raw_fd();
        let index = self.workers.insert(Worker {
            slot,
            pid,
            weight: weight.max(1),
            state: State::Starting,
            channel,
            link,
            full: false,
            drain_queued: false,
            drain_sent: false,
            sent: 0,
            closed: 0,
            reported: false,
            progress: stall::Progress::default(),
            stop_seen: false,
        });
        // Readable only: a unix socket wakes its writer's EPOLLOUT waiters
        // each time the reader takes a message, which would wake this loop
        // once per connection. Writability is asked for only while full.
        let registered = self.poll.registry().register(
            &mut SourceFd(&raw),
            Token(WORKER_BASE + index),
            Interest::READABLE,
        );
        // Without readiness we would never hear READY: the worker then never
        // gets a connection, and the supervisor's ready timeout replaces it.
        if registered.is_ok() {
            // Messages sent before registration raise no edge.
            self.read_worker(index);
        }
        if self
            .workers
            .get(index)
            .is_some_and(|w| matches!(w.link, Link::Proxy(_)))
        {
            self.probe_start(index);
        }
        // A shared-mode worker has the listener from its first instruction:
        // it is ready as soon as it runs.
        if self
            .workers
            .get(index)
            .is_some_and(|w| matches!(w.link, Link::Shared { .. }))
        {
            self.ready(index, slot, pid);
        }
    }

    /// Forgets a process after it exited, having read what it said last
    /// and rescued every connection still queued (sent, never received) in
    /// its channel; then says Detached.
    fn detach(&mut self, slot: Slot, pid: u32) {
        let Some(index) = self.workers.find(slot, pid) else {
            return self.emit(Event::Detached { slot, pid });
        };
        // Its last words: a LEAVING, CLOSED reports. (Draining first: the
        // EOF of a dead Node worker's channel is not an announced exit.)
        if let Some(w) = self.workers.get_mut(index) {
            w.state = State::Draining;
        }
        self.read_worker(index);
        let was_current = self.is_current(index);
        let mut w = self.workers.remove(index).expect("found above");
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&w.channel.as_raw_fd()));
        if was_current {
            self.current[slot.0] = None;
            self.views[slot.0] = WorkerView::default();
        }
        let mut count = 0;
        // A Node worker's unanswered connection; lb's protocol: read the
        // worker's side of the queue from our own copy of its end.
        if let Some(fd) = Dispatcher::node_rescue(&mut w.link) {
            self.pending.push_front(fd);
            count += 1;
        }
        if let Link::Native { peer } = &w.link {
            count += stall::read_back(peer, &mut self.buf, &mut self.pending);
        }
        self.stats.rescued += count;
        if count > 0 {
            self.emit(Event::Rescued { slot, pid, count });
        }
        self.emit(Event::Detached { slot, pid });
    }

    fn drain_worker(&mut self, index: usize) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        if w.drain_sent || w.drain_queued {
            return;
        }
        w.state = State::Draining;
        let slot = w.slot;
        self.sync_view(slot);
        self.send_drain(index);
    }

    fn send_drain(&mut self, index: usize) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        if w.link.is_node() {
            return self.node_disconnect(index);
        }
        if matches!(w.link, Link::Proxy(_)) {
            return self.proxy_drain(index);
        }
        if matches!(w.link, Link::Shared { .. }) {
            // Nothing to send: the supervisor signals the process.
            w.drain_sent = true;
            let (slot, pid) = (w.slot, w.pid);
            self.emit(Event::Draining { slot, pid });
            return;
        }
        let (slot, pid) = (w.slot, w.pid);
        match proto::send_plain(w.channel.as_fd(), kind::DRAIN, 0, &[], Wait::DontWait) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                w.drain_queued = true;
                self.want_writable(index, true);
            }
            // Sent, or the worker is gone (its exit is the supervisor's news).
            _ => {
                w.drain_sent = true;
                self.emit(Event::Draining { slot, pid });
            }
        }
    }

    fn shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        // Nothing already in the backlog is lost: take it all, then close.
        // A handshake that completes between the last accept and the close
        // would be reset by the close, so new SYNs are dropped first (the
        // client retries, and meets the closed port: refused, never
        // accepted), handshakes under way get a moment to complete, and the
        // filter is taken off again just before the close (an inherited
        // socket lives on in systemd). (Off the hot path: `pending` may grow
        // past its capacity here when the backlog is configured larger.)
        if let Some(listener) = self.listener.take() {
            let sock = socket2::SockRef::from(&listener);
            let filtered = sock.attach_filter(&SYN_DROP).is_ok();
            self.take_backlog(&listener);
            if filtered {
                std::thread::sleep(HANDSHAKE_GRACE);
                self.take_backlog(&listener);
                let _ = sock.detach_filter();
            }
            drop(listener);
        }
        self.pump();
    }

    /// Accepts every connection the listener holds now.
    fn take_backlog(&mut self, listener: &mio::net::TcpListener) {
        loop {
            match sys::accept4(listener.as_fd()) {
                Ok(fd) => {
                    self.stats.accepted += 1;
                    self.pending.push_back(fd);
                }
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(_) => break,
            }
        }
    }

    /// During shutdown, once every held connection has gone out: DRAIN all.
    fn send_drains(&mut self) {
        if self.drained || !self.pending.is_empty() {
            return;
        }
        let all: Vec<usize> = self.workers.indices().collect();
        for index in all {
            self.drain_worker(index);
        }
        self.drained = true;
        self.emit(Event::Drained);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stopping listener's filter drops new connections' SYNs (a
    /// connect does not complete) and lets them through again once off.
    #[test]
    fn the_syn_filter_holds_new_connections_off() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sock = socket2::SockRef::from(&listener);
        sock.attach_filter(&SYN_DROP).unwrap();
        let held = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(held.is_err(), "a connect completed through the filter");
        sock.detach_filter().unwrap();
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    }

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
