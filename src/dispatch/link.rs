//! How the master talks to one worker process. Each link lives in its own
//! file — `native.rs` (lb's protocol, which the shim speaks for its
//! server), `node/` (Node.js's cluster IPC), `shared.rs` (no channel: the
//! worker accepts from the listener), `proxy/` (no channel: lb relays to
//! the worker's own port) — and this file is the one place outside them
//! that names them all. Every behaviour the rest of the dispatcher needs of
//! a worker is a method here, with one `match` that picks the link's own
//! code.

use std::os::fd::{AsRawFd, OwnedFd};

use mio::Interest;
use mio::unix::SourceFd;

use super::Dispatcher;
use super::conn::Conn;
use super::native::Native;
use super::node::NodeLink;
use super::proxy::Probe;
use super::tokens::Source;
use super::worker::Worker;
use crate::config::{ChannelKind, Mode, SendProxy};
use crate::policy::Slot;

#[derive(Debug)]
pub enum Link {
    Native(Native),
    Node(Box<NodeLink>),
    /// Under kernel dispatch, the master's copy of the worker's own
    /// listener (kept so its queued connections migrate, not reset, when
    /// the worker dies: see `dispatch::kernel`).
    Shared {
        listener: Option<OwnedFd>,
    },
    Proxy(Box<Probe>),
}

/// How a link takes connections, which is what the hand-off groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Many per `sendmmsg` (lb's protocol).
    Batch,
    /// One in flight at a time (Node), so never picked twice in a batch.
    Stepwise,
    /// A relay each (proxy).
    Relay,
    /// None at all (shared: the worker accepts itself).
    Never,
}

impl Link {
    /// The link of a `mode` worker, over the channel the supervisor made
    /// for it (`Mode::channel`) and the master's copy of the worker's end
    /// (`Mode::keeps_peer`); `port` and `send_proxy` are a proxy worker's,
    /// `listener` a shared one's own under kernel dispatch.
    pub fn new(
        mode: Mode,
        channel: Option<OwnedFd>,
        peer: Option<OwnedFd>,
        port: u16,
        send_proxy: SendProxy,
        listener: Option<OwnedFd>,
    ) -> Link {
        match (mode.channel(), channel, peer) {
            (ChannelKind::Packets, Some(channel), Some(peer)) => Link::Native(Native {
                channel,
                peer,
                kernel: listener.is_some(),
                listener,
                takes_listener: false,
                peer_address: false,
                batch: false,
            }),
            (ChannelKind::Stream, Some(channel), _) => {
                Link::Node(Box::new(NodeLink::new(channel, listener)))
            }
            (ChannelKind::None, _, _) if mode.relays() => {
                Link::Proxy(Box::new(Probe::new(port, send_proxy)))
            }
            (ChannelKind::None, _, _) => Link::Shared { listener },
            // A native worker without its peer could not be rescued: the
            // caller's bug, loudly.
            _ => panic!("a {mode} worker is attached without its channel or its peer"),
        }
    }

    /// Kernel dispatch: the worker's own listener, which the kernel's
    /// program steers connections to (a native one's once it said it
    /// takes it).
    pub fn own_listener(&self) -> Option<&OwnedFd> {
        match self {
            Link::Shared { listener } => listener.as_ref(),
            Link::Node(n) => n.listener.as_ref(),
            Link::Native(n) if n.takes_listener => n.listener.as_ref(),
            Link::Native(_) | Link::Proxy(_) => None,
        }
    }

    /// A draining worker's: lets go of the master's copy of its own
    /// listener (out of the kernel's schedule already), so that what is
    /// queued there moves to the others as soon as the worker closes its
    /// own, not when it exits. (A Node worker's is kept: it may `listen()`
    /// again while it finishes, and is answered with it.)
    pub fn drop_own_listener(&mut self) {
        match self {
            Link::Shared { listener } => *listener = None,
            Link::Native(n) => n.listener = None,
            Link::Node(_) | Link::Proxy(_) => {}
        }
    }

    /// The master's copy of the worker's own listener, whatever the link
    /// (the worker is gone).
    pub fn take_own_listener(&mut self) -> Option<OwnedFd> {
        match self {
            Link::Shared { listener } => listener.take(),
            Link::Native(n) => n.listener.take(),
            Link::Node(n) => n.listener.take(),
            Link::Proxy(_) => None,
        }
    }

    /// Under kernel dispatch: the worker accepts by itself.
    #[inline]
    fn accepts_itself(&self) -> bool {
        match self {
            Link::Shared { .. } => true,
            Link::Node(n) => n.listener.is_some(),
            Link::Native(n) => n.kernel,
            Link::Proxy(_) => false,
        }
    }

    /// Bytes the master still has to write to the worker (Node's stream).
    pub fn has_unwritten(&self) -> bool {
        match self {
            Link::Node(n) => n.has_unwritten(),
            Link::Native(_) | Link::Shared { .. } | Link::Proxy(_) => false,
        }
    }

    /// The master's end of the channel, if the link has one.
    pub fn channel(&self) -> Option<&OwnedFd> {
        match self {
            Link::Native(n) => Some(&n.channel),
            Link::Node(n) => Some(&n.channel),
            Link::Shared { .. } | Link::Proxy(_) => None,
        }
    }

    #[inline]
    pub fn delivery(&self) -> Delivery {
        match self {
            _ if self.accepts_itself() => Delivery::Never,
            Link::Native(_) => Delivery::Batch,
            Link::Node(_) => Delivery::Stepwise,
            Link::Proxy(_) => Delivery::Relay,
            Link::Shared { .. } => Delivery::Never,
        }
    }

    /// Whether the link lets the worker take a connection now: lb's
    /// protocol always does; Node's takes one at a time; a proxy worker
    /// needs a free relay (`relay_room`, the slab's).
    #[inline]
    pub fn can_take(&self, relay_room: bool) -> bool {
        match self {
            _ if self.accepts_itself() => false,
            Link::Native(_) => true,
            Link::Node(n) => n.can_take(),
            Link::Proxy(_) => relay_room,
            Link::Shared { .. } => false,
        }
    }

    /// Connections `w` has open, when lb can know: it sees a relay end
    /// itself and a shared worker's connections never; the others say
    /// (always when the policy asks for close reports, else once they have
    /// sent one).
    pub fn active(w: &Worker, reports: bool) -> Option<u64> {
        match w.link {
            Link::Proxy(_) => Some(w.sent - w.closed),
            Link::Shared { .. } => None,
            Link::Native(_) | Link::Node(_) => (reports || w.reported).then(|| w.sent - w.closed),
        }
    }
}

impl Dispatcher {
    fn delivery_of(&self, index: usize) -> Option<Delivery> {
        self.workers.get(index).map(|w| w.link.delivery())
    }

    /// Gives one connection to worker `index` (in `slot`) the way its link
    /// takes them. On failure it comes back and the slot is no longer
    /// eligible (full, busy, or gone), so a caller that picks again moves on.
    #[inline]
    pub(super) fn deliver(&mut self, index: usize, slot: Slot, conn: Conn) -> Result<(), Conn> {
        match self.delivery_of(index) {
            Some(Delivery::Batch) => self.native_send(index, slot, conn),
            Some(Delivery::Stepwise) => {
                let (peer, listener) = (conn.peer, conn.listener);
                self.node_send(index, conn.fd, peer, listener)
                    .map_err(|fd| Conn { fd, peer, listener })
            }
            Some(Delivery::Relay) => self.proxy_start(index, conn).inspect_err(|_| {
                self.views[slot.0].eligible = false;
            }),
            Some(Delivery::Never) | None => {
                self.views[slot.0].eligible = false;
                Err(conn)
            }
        }
    }

    /// Once attached: what the worker said before it was registered (no
    /// edge reports it), its readiness probe, or (shared) READY at once:
    /// it has the listener from its first instruction.
    pub(super) fn attached(&mut self, index: usize) {
        let Some(w) = self.workers.get(index) else {
            return;
        };
        let (slot, pid) = (w.slot, w.pid);
        match w.link {
            Link::Native(_) => self.native_attached(index),
            Link::Node(_) => self.read_worker(index),
            Link::Proxy(_) => self.probe_start(index),
            Link::Shared { .. } => self.ready(index, slot, pid),
        }
    }

    /// Reads everything worker `index` sent.
    pub(super) fn read_worker(&mut self, index: usize) {
        match self.workers.get(index).map(|w| &w.link) {
            Some(Link::Native(_)) => self.native_read(index),
            Some(Link::Node(_)) => self.node_read(index),
            _ => {}
        }
    }

    /// Worker `index`'s channel has room again.
    pub(super) fn worker_writable(&mut self, index: usize) {
        match self.workers.get(index).map(|w| &w.link) {
            Some(Link::Native(_)) => self.native_writable(index),
            Some(Link::Node(_)) => self.node_flush(index),
            _ => {}
        }
    }

    /// Tells worker `index` to drain, the way its link does.
    pub(super) fn send_drain(&mut self, index: usize) {
        match self.workers.get(index).map(|w| &w.link) {
            Some(Link::Native(_)) => self.native_drain(index),
            Some(Link::Node(_)) => self.node_disconnect(index),
            Some(Link::Proxy(_)) => self.proxy_drain(index),
            Some(Link::Shared { .. }) => self.shared_drain(index),
            None => {}
        }
    }

    /// Sends worker `index` a user message; whether it took it.
    pub(super) fn send_message(&mut self, index: usize, payload: &[u8]) -> bool {
        match self.workers.get(index).map(|w| &w.link) {
            Some(Link::Native(_)) => self.native_message(index, payload),
            Some(Link::Node(_)) => self.node_message(index, payload),
            // No channel: nothing to say it on.
            _ => false,
        }
    }

    /// After worker `w` exited and left the table: the connections it was
    /// sent and never took go to `pending`; how many.
    pub(super) fn rescue(&mut self, w: &mut Worker) -> u64 {
        match &mut w.link {
            Link::Native(n) => {
                let (count, lost) = n.read_back(&mut self.buf, &mut self.pending);
                self.label_read_back(count);
                self.read_back_lost(w.slot, w.pid, lost);
                count
            }
            Link::Node(n) => n.rescue(&mut self.pending),
            Link::Shared { .. } | Link::Proxy(_) => 0,
        }
    }

    /// Says how many queued connections could not be read back (lb out of
    /// fds): their clients are lost. Cold: a worker died or stalled.
    pub(super) fn read_back_lost(&mut self, slot: crate::policy::Slot, pid: u32, lost: u64) {
        if lost > 0 {
            self.emit(super::Event::Note {
                slot,
                pid,
                text: format!(
                    "{lost} connections queued for it could not be read back (lb is at its \
                     open-files limit): their clients are lost; raise the limit (LimitNOFILE=)"
                ),
            });
        }
    }

    /// Turns the writable interest of a worker's channel on (while it is
    /// full, or DRAIN waits for room) or off. Off the steady-state path:
    /// only when a channel fills up or frees again.
    pub(super) fn want_writable(&mut self, index: usize, on: bool) {
        let Some(channel) = self.workers.get(index).and_then(|w| w.link.channel()) else {
            return;
        };
        let interest = if on {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        // Re-arming reports readiness that is already there, so no edge is lost.
        let _ = self.poll.registry().reregister(
            &mut SourceFd(&channel.as_raw_fd()),
            Source::Worker(index).token(),
            interest,
        );
    }
}
