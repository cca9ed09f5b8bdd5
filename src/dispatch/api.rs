//! What the dispatcher and its callers say to each other: the supervisor's
//! commands, the dispatcher's events, the counters and the handles.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use mio::Waker;

use crate::config::Mode;
use crate::policy::Slot;
use crate::proto::Malformed;

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
    /// master's end, for the modes that have one (`Mode::channel`: not
    /// shared or proxy); `peer` the master's copy of the worker's end
    /// (native and shim, `Mode::keeps_peer`), kept to rescue connections the
    /// worker never read.
    Attach {
        slot: Slot,
        pid: u32,
        channel: Option<OwnedFd>,
        peer: Option<OwnedFd>,
        weight: u32,
        mode: Mode,
        /// Proxy mode: the loopback port the worker listens on.
        port: u16,
        /// Proxy mode: the PROXY header written to that port first.
        send_proxy: crate::config::SendProxy,
        /// Kernel dispatch: the master's copy of the worker's own listener,
        /// which the kernel's program steers connections to once it is ready.
        listener: Option<OwnedFd>,
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
    /// `lb upgrade`: stop accepting, hand out what is held, then give up
    /// the listeners and every worker's link and leave the loop (or say
    /// why not, and go on).
    Handover(Sender<Result<super::Handover, String>>),
    /// A worker the master's last image handed over (ready, current).
    Adopt(super::Handed),
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
    /// Kernel dispatch: the program's maps could not be updated (which
    /// workers it steers to may be stale).
    SteeringFailed {
        error: String,
    },
    /// The process's channel is read to the end (what it said last came
    /// before this) and let go: the answer to `Command::Detach`.
    Detached {
        slot: Slot,
        pid: u32,
    },
}

/// Counters of the loop. Plain integers: only the dispatch thread writes
/// them. (Serialized for `lb upgrade`'s next image: a counter added later
/// starts at 0 there.)
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Stats {
    pub accepted: u64,
    pub dispatched: u64,
    /// The CONN messages lb-protocol workers were sent: one per connection,
    /// fewer for workers that take several per CONN (`ready::BATCH`).
    pub conn_messages: u64,
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
    /// PROXY protocol headers read, and connections closed over theirs.
    pub proxy: ProxyStats,
}

/// The PROXY protocol's counters (`docs/proxy-protocol.md`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ProxyStats {
    /// Headers read, by version.
    pub v1: u64,
    pub v2: u64,
    /// Of those, the ones without a client address (v2 `LOCAL`, v1
    /// `UNKNOWN`: a balancer's health checks).
    pub local: u64,
    /// Connections from outside `proxy_trusted` served as direct clients.
    pub untrusted_served: u64,
    /// Connections closed, by `header::Failure` (in its `ALL` order).
    pub failures: [u64; super::header::Failure::ALL.len()],
}

impl ProxyStats {
    /// Closed for `why`.
    pub fn failed(&self, why: super::header::Failure) -> u64 {
        self.failures[why as usize]
    }
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
    /// Connections accepted from each listener, in configured order.
    pub by_listener: Vec<u64>,
    pub workers: Vec<WorkerStats>,
    /// Hand-off latency per connection, ns.
    pub latency: hdrhistogram::Histogram<u64>,
}

/// How the supervisor (or a test) talks to a running dispatcher.
#[derive(Clone)]
pub struct Handle {
    pub(super) commands: Sender<Command>,
    pub(super) waker: Arc<Waker>,
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
    pub(super) lifecycle: Sender<Event>,
    pub(super) chatter: Sender<Event>,
    pub(super) waker: Option<Arc<Waker>>,
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
