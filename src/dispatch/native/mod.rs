//! The native link: lb's protocol on a `SOCK_SEQPACKET` channel
//! (`docs/protocol.md`), spoken by lb-aware workers and, for its server, by
//! the accept shim. Connections go out many per `sendmmsg`; what a worker
//! says comes in many per `recvmmsg`. The master keeps a copy of the
//! worker's end, so a dead or stalled worker's unread connections can be
//! read back and handed to others (`stall` watches for workers that take
//! none of them).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

pub mod stall;

use super::conn::{Conn, PeerLines, PeerText, Pending};
use super::link::Link;
use super::{Dispatcher, Event};
use crate::policy::Slot;
use crate::proto::scm::Batch;
use crate::proto::{self, Malformed, Message, Wait, kind, scm, wire};

/// Most CONNs one accept batch makes for a batching worker.
const GROUP_CONNS: usize = scm::SEND_BATCH.div_ceil(wire::MAX_CONN_FDS);

#[derive(Debug)]
pub struct Native {
    /// The master's end.
    pub channel: OwnedFd,
    /// The master's copy of the worker's end, read only once the worker
    /// stopped taking connections (it died, or stalled).
    pub peer: OwnedFd,
    /// Kernel dispatch: the master's copy of the worker's own listener,
    /// sent to it as LISTENER when it starts.
    pub listener: Option<OwnedFd>,
    /// It was sent a listener of its own: it accepts by itself, and is
    /// never sent a CONN (even once the master let go of its copy).
    pub kernel: bool,
    /// Its READY said it accepts from that listener (`ready::OWN_LISTENER`):
    /// until then the kernel is not pointed at it.
    pub takes_listener: bool,
    /// Its READY said a CONN may carry the client's address
    /// (`ready::PEER_ADDRESS`): the ones lb knows go in their payloads.
    pub peer_address: bool,
    /// Its READY said a CONN may carry several fds (`ready::BATCH`): the
    /// connections a burst picked for it go out up to
    /// `wire::MAX_CONN_FDS` to a CONN.
    pub batch: bool,
}

impl Native {
    /// Reads every message still queued for the worker from the master's
    /// copy of its end; the connections (every fd of every CONN) go to
    /// `pending`, each with the client's address its CONN carried for it.
    /// How many, and how many more its CONNs said they carried that the
    /// kernel could not give lb (its own open-files limit: those clients
    /// are lost, and must be said).
    pub fn read_back(&self, buf: &mut [u8], pending: &mut Pending) -> (u64, u64) {
        let peer = self.peer.as_fd();
        let (mut count, mut lost) = (0, 0);
        while let Ok(mut got) = scm::recv(peer, buf, Wait::DontWait) {
            if got.len == 0 {
                break;
            }
            if let Ok(Message::Conn { peer, .. }) = wire::parse(&buf[..got.len], got.truncated) {
                let said = u64::from(buf[2].max(1));
                let mut peers = wire::peers(peer);
                let before = count;
                for fd in got.fds.take_all() {
                    let peer = peers
                        .next()
                        .and_then(|t| std::str::from_utf8(t).ok())
                        .and_then(|t| t.parse::<SocketAddr>().ok());
                    pending.push_back(Conn {
                        fd,
                        peer,
                        listener: 0,
                    });
                    count += 1;
                }
                lost += said.saturating_sub(count - before);
            }
        }
        (count, lost)
    }
}

impl Dispatcher {
    /// Sends one connection to native worker `index` (in `slot`).
    #[inline]
    pub(super) fn native_send(&mut self, index: usize, slot: Slot, conn: Conn) -> Result<(), Conn> {
        let Some(w) = self.workers.get_mut(index) else {
            self.views[slot.0].eligible = false;
            return Err(conn);
        };
        let Link::Native(n) = &w.link else {
            self.views[slot.0].eligible = false;
            return Err(conn);
        };
        self.seq += 1;
        let peer = PeerText::of(conn.peer.as_ref().filter(|_| n.peer_address));
        match proto::send_conn_with(
            n.channel.as_fd(),
            conn.fd.as_fd(),
            self.seq,
            peer.as_bytes(),
        ) {
            Ok(()) => {
                // Close our copy at once: until we do, the worker's close
                // does not release the socket (docs/architecture.md, "The
                // hot path").
                drop(conn);
                w.sent += 1;
                w.messages += 1;
                self.stats.dispatched += 1;
                self.stats.conn_messages += 1;
                Ok(())
            }
            Err(e) => {
                self.channel_refused(index, slot.0, Some(e));
                Err(conn)
            }
        }
    }

    /// Sends `fds` to `slot`'s worker; returns how many went out. Undoes the
    /// picks of the rest and marks the worker full (or unusable).
    pub(super) fn send_group(&mut self, slot: usize, fds: &[Conn]) -> usize {
        let Some(index) = self.current[slot] else {
            self.views[slot].active -= fds.len() as u32;
            self.views[slot].eligible = false;
            return 0;
        };
        // (Only slots whose link is native get here: `send_accepted`.)
        let Some(w) = self.workers.get_mut(index) else {
            return 0;
        };
        let Link::Native(n) = &w.link else {
            debug_assert!(false, "a batch for a link that takes them one by one");
            return 0;
        };
        // Payloads only for a worker that takes them, and only when some
        // connection has an address (else the batch is what it always was,
        // and no room for the texts is even made).
        let chan = n.channel.as_fd();
        let per = if n.batch { wire::MAX_CONN_FDS } else { 1 };
        let result = if n.peer_address && fds.iter().any(|c| c.peer.is_some()) {
            if per == 1 {
                let mut peers = [PeerText::EMPTY; scm::SEND_BATCH];
                for (t, c) in peers.iter_mut().zip(fds) {
                    *t = PeerText::of(c.peer.as_ref());
                }
                let k = fds.len().min(scm::SEND_BATCH);
                proto::send_conns(chan, fds, &peers[..k], self.seq + 1, 1)
            } else {
                // A group is at most one accept batch: two CONNs.
                let mut lines = [PeerLines::EMPTY; GROUP_CONNS];
                for (l, group) in lines.iter_mut().zip(fds.chunks(per)) {
                    *l = PeerLines::of(group);
                }
                let k = fds.len().div_ceil(per).min(GROUP_CONNS);
                proto::send_conns(
                    chan,
                    &fds[..fds.len().min(k * per)],
                    &lines[..k],
                    self.seq + 1,
                    per,
                )
            }
        } else {
            proto::send_conns(chan, fds, &[] as &[PeerText], self.seq + 1, per)
        };
        let sent = *result.as_ref().unwrap_or(&0);
        self.seq += sent as u64;
        w.sent += sent as u64;
        w.messages += sent.div_ceil(per) as u64;
        self.stats.conn_messages += sent.div_ceil(per) as u64;
        self.stats.dispatched += sent as u64;
        if sent < fds.len() {
            self.views[slot].active -= (fds.len() - sent) as u32;
            self.channel_refused(index, slot, result.err());
        }
        sent
    }

    /// Reads everything a native worker sent (edge-triggered: until the
    /// queue is empty, which a short `recvmmsg` count already proves).
    pub(super) fn native_read(&mut self, index: usize) {
        let mut batch = std::mem::take(&mut self.batch);
        while let Some(w) = self.workers.get(index) {
            let (slot, pid) = (w.slot, w.pid);
            let Link::Native(link) = &w.link else { break };
            let n = match batch.recv(link.channel.as_fd()) {
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
            Ok(Message::Ready { flags }) => self.native_ready(index, slot, pid, flags),
            Ok(Message::Accepted { n }) => self.accepted(index, slot, n),
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
            Ok(Message::Listener) => {
                self.emit(complaint(Malformed::WrongDirection(kind::LISTENER)))
            }
            Err(error) => self.emit(complaint(error)),
        }
    }

    /// Kernel dispatch: the worker's own listener goes first, before it
    /// can say READY.
    pub(super) fn native_attached(&mut self, index: usize) {
        let Some(w) = self.workers.get(index) else {
            return;
        };
        let (slot, pid) = (w.slot, w.pid);
        if let Link::Native(n) = &w.link
            && let Some(listener) = &n.listener
            && let Err(e) = proto::send_listener(n.channel.as_fd(), listener.as_fd())
        {
            self.emit(Event::Note {
                slot,
                pid,
                text: format!("its listener could not be sent ({e}): it gets no connections"),
            });
        }
        self.native_read(index);
    }

    /// READY, with its flags: under kernel dispatch a worker that does not
    /// say it accepts from its own listener (one older than LISTENER) is
    /// not ready at all, since nobody would accept what the kernel sent it.
    fn native_ready(&mut self, index: usize, slot: Slot, pid: u32, flags: u64) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        if let Link::Native(n) = &mut w.link
            && n.listener.is_some()
        {
            if flags & wire::ready::OWN_LISTENER == 0 {
                return self.emit(Event::Note {
                    slot,
                    pid,
                    text: "said READY without taking its own listener (LISTENER, docs/protocol.md \
                           §2), so it is not given connections under --dispatch kernel: use a \
                           worker that speaks it, or --dispatch master"
                        .into(),
                });
            }
            n.takes_listener = true;
        }
        if let Some(w) = self.workers.get_mut(index)
            && let Link::Native(n) = &mut w.link
        {
            n.peer_address = flags & wire::ready::PEER_ADDRESS != 0;
            n.batch = flags & wire::ready::BATCH != 0;
        }
        self.ready(index, slot, pid);
    }

    /// The channel has room again: a DRAIN that waited goes out, and the
    /// worker may be picked again.
    pub(super) fn native_writable(&mut self, index: usize) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        let slot = w.slot;
        if w.drain_queued {
            w.drain_queued = false;
            self.native_drain(index);
        }
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        if w.full {
            w.full = false;
            // Readable only again, unless DRAIN still waits for room: each
            // message the worker takes would wake the loop otherwise.
            let drain_waits = w.drain_queued;
            if !drain_waits {
                self.want_writable(index, false);
            }
            self.sync_view(slot);
        }
    }

    /// Sends DRAIN, or queues it until the channel has room.
    pub(super) fn native_drain(&mut self, index: usize) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        let (slot, pid) = (w.slot, w.pid);
        let Link::Native(n) = &w.link else { return };
        match proto::send_plain(n.channel.as_fd(), kind::DRAIN, 0, &[], Wait::DontWait) {
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

    /// A USER message; whether the channel took it.
    pub(super) fn native_message(&mut self, index: usize, payload: &[u8]) -> bool {
        let Some(w) = self.workers.get(index) else {
            return false;
        };
        let Link::Native(n) = &w.link else {
            return false;
        };
        proto::send_plain(n.channel.as_fd(), kind::USER, 0, payload, Wait::DontWait).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::wire::{self, kind};

    /// A CONN that says it carries more fds than arrived (lb at its
    /// open-files limit when it reads a dead worker's queue back): what
    /// came is rescued, the rest counted as lost, not passed over.
    #[test]
    fn read_back_counts_the_fds_a_conn_said_it_carried_but_lost() {
        let (channel, peer) = crate::proto::pair().unwrap();
        let n = Native {
            channel,
            peer,
            listener: None,
            kernel: false,
            takes_listener: false,
            peer_address: false,
            batch: true,
        };
        let (a, _b) = crate::proto::pair().unwrap();
        // Each with one fd: the first says 3 (byte 2), the second 1 (0).
        for (id, said) in [(1, 3), (4, 0)] {
            let mut header = wire::header(kind::CONN, id);
            header[2] = said;
            let fd = Some(a.as_fd());
            scm::send(n.channel.as_fd(), &header, &[], fd, Wait::DontWait).unwrap();
        }
        let mut buf = vec![0u8; crate::proto::MAX_MESSAGE];
        let mut pending = Pending::with_capacity(8);
        assert_eq!(n.read_back(&mut buf, &mut pending), (2, 2));
    }
}
