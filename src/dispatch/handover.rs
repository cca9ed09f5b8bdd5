//! `lb upgrade`'s dispatcher side: the loop gives up its listeners and its
//! workers' channels whole (for the master's next image to take), and an
//! image that starts from an upgrade adopts them.
//!
//! Handing over stops accepting first — the listeners stay open, so the
//! kernel queues every new client for the next image, nothing is refused —
//! then waits, still serving, until the loop holds no connection of its own
//! (`pending`, the PROXY header stage): those would be lost with this
//! image. What a worker's channel holds (CONNs it has not read, its CLOSED
//! reports) stays in the socket, which the next image reads on.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use mio::Interest;
use mio::unix::SourceFd;

use super::link::Link;
use super::native::Native;
use super::tokens::Source;
use super::worker::{State, Worker};
use super::{Dispatcher, Stats};
use crate::policy::{Slot, WorkerView};

/// How long the loop may take to hand out what it holds before it gives
/// up the handover and accepts again.
const HOLD_LIMIT: Duration = Duration::from_secs(2);

/// Everything the dispatcher gives up, for the next image.
#[derive(Debug)]
pub struct Handover {
    /// lb's listeners in configured order, each with the Unix socket file
    /// lb made (removed when the master stops).
    pub listeners: Vec<(OwnedFd, Option<PathBuf>)>,
    pub workers: Vec<Handed>,
    pub stats: Stats,
    pub by_listener: Vec<u64>,
    /// The last connection id sent (ids go on from it: never one twice).
    pub seq: u64,
}

/// One worker process's link and counts.
#[derive(Debug, Default)]
pub struct Handed {
    pub slot: Slot,
    pub pid: u32,
    pub weight: u32,
    /// lb's protocol (native, shim): the master's end and its copy of the
    /// worker's; neither for a shared-mode worker.
    pub channel: Option<OwnedFd>,
    pub peer: Option<OwnedFd>,
    /// Its READY's flags that the master acts on.
    pub peer_address: bool,
    pub batch: bool,
    pub sent: u64,
    pub closed: u64,
    pub reported: bool,
    pub messages: u64,
}

/// A handover under way: accepting is off until it ends.
pub(super) struct Handing {
    by: Instant,
    reply: Sender<Result<Handover, String>>,
}

impl Dispatcher {
    /// The supervisor asks for everything: refused at once for what cannot
    /// move, else answered once nothing is held (`handover_step`).
    pub(super) fn begin_handover(&mut self, reply: Sender<Result<Handover, String>>) {
        if let Some(why) = self.unmovable() {
            let _ = reply.send(Err(why));
            return;
        }
        self.handing = Some(Handing {
            by: Instant::now() + HOLD_LIMIT,
            reply,
        });
        self.handover_step();
    }

    /// What this loop holds that another image could not take over.
    fn unmovable(&self) -> Option<String> {
        if self.shutting_down {
            return Some("the master is stopping".into());
        }
        if self.steering.is_some() {
            return Some(
                "kernel dispatch's BPF program and maps are not handed over; restart lb to \
                 upgrade it"
                    .into(),
            );
        }
        if self.relays_active() > 0 {
            return Some(
                "proxy mode relays its clients' bytes in the master, which a new image cannot \
                 take over; restart lb to upgrade it"
                    .into(),
            );
        }
        for i in self.workers.indices() {
            let w = self.workers.get(i)?;
            match (&w.link, w.state) {
                (Link::Proxy(_), _) => {
                    return Some(
                        "proxy-mode workers are reached through relays in the master, which a \
                         new image cannot take over; restart lb to upgrade it"
                            .into(),
                    );
                }
                (Link::Node(_), _) => {
                    return Some(
                        "Node workers' cluster IPC state is not handed over; restart lb to \
                         upgrade it"
                            .into(),
                    );
                }
                (_, State::Ready) if self.is_current(i) && !w.progress.stalled => {}
                _ => {
                    return Some(format!(
                        "worker {} pid {} is starting or draining; try again once it is done",
                        w.slot, w.pid
                    ));
                }
            }
        }
        None
    }

    /// Ends a handover under way once nothing is held (or gives it up at
    /// its limit). Called at the end of every turn.
    pub(super) fn handover_step(&mut self) {
        let Some(h) = &self.handing else {
            return;
        };
        let held = self.pending.len() + self.headers_waiting();
        if held > 0 && Instant::now() < h.by {
            return;
        }
        let Some(h) = self.handing.take() else {
            return;
        };
        if held > 0 {
            let _ = h.reply.send(Err(format!(
                "{held} connections were still waiting for a worker after {} s",
                HOLD_LIMIT.as_secs()
            )));
            return;
        }
        // What changed while it held on (a worker that said LEAVING, or
        // stalled) is not carried: refused, and accepting again.
        if let Some(why) = self.unmovable() {
            let _ = h.reply.send(Err(why));
            return;
        }
        let handover = self.give_up();
        match h.reply.send(Ok(handover)) {
            Ok(()) => self.running = false,
            // The supervisor gave up waiting: everything is taken back.
            Err(crossbeam_channel::SendError(back)) => {
                if let Ok(handover) = back {
                    self.take_back(handover);
                }
            }
        }
    }

    /// What `give_up` gave, back in the loop (no one took it).
    fn take_back(&mut self, h: Handover) {
        for (i, (fd, path)) in h.listeners.into_iter().enumerate() {
            let _ = self.poll.registry().register(
                &mut SourceFd(&fd.as_raw_fd()),
                Source::Listener(i).token(),
                Interest::READABLE,
            );
            self.listeners.push(super::front::Front::new(fd, path));
        }
        for w in h.workers {
            self.adopt(w);
        }
    }

    /// Accepting is paused for a handover.
    #[inline]
    pub(super) fn handing_over(&self) -> bool {
        self.handing.is_some()
    }

    /// When a handover under way gives up.
    pub(super) fn handover_wake(&self) -> Option<Instant> {
        self.handing.as_ref().map(|h| h.by)
    }

    fn give_up(&mut self) -> Handover {
        let listeners = std::mem::take(&mut self.listeners)
            .into_iter()
            .map(|l| {
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&l.fd.as_raw_fd()));
                (l.fd, l.path)
            })
            .collect();
        let indices: Vec<usize> = self.workers.indices().collect();
        let mut workers = Vec::with_capacity(indices.len());
        for i in indices {
            let Some(w) = self.workers.remove(i) else {
                continue;
            };
            if let Some(c) = w.link.channel() {
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&c.as_raw_fd()));
            }
            let (channel, peer, peer_address, batch) = match w.link {
                Link::Native(n) => (Some(n.channel), Some(n.peer), n.peer_address, n.batch),
                _ => (None, None, false, false),
            };
            workers.push(Handed {
                slot: w.slot,
                pid: w.pid,
                weight: w.weight,
                channel,
                peer,
                peer_address,
                batch,
                sent: w.sent,
                closed: w.closed,
                reported: w.reported,
                messages: w.messages,
            });
        }
        Handover {
            listeners,
            workers,
            stats: self.stats,
            by_listener: self.by_listener.clone(),
            seq: self.seq,
        }
    }

    /// A new image's start: the counters and the connection ids the last
    /// one had.
    pub fn carry_on(&mut self, stats: Stats, by_listener: &[u64], seq: u64) {
        self.stats = stats;
        self.seq = seq;
        for (mine, theirs) in self.by_listener.iter_mut().zip(by_listener) {
            *mine = *theirs;
        }
    }

    /// A worker the last image handed over: ready and its slot's current
    /// process at once (it said READY to the image before). Whatever it
    /// sent meanwhile waits in its channel and is read now.
    pub(super) fn adopt(&mut self, h: Handed) {
        let slot = h.slot;
        if slot.0 >= self.current.len() {
            self.current.resize(slot.0 + 1, None);
            self.views.resize(slot.0 + 1, WorkerView::default());
            self.policy.resize(slot.0 + 1);
        }
        let link = match (h.channel, h.peer) {
            (Some(channel), Some(peer)) => Link::Native(Native {
                channel,
                peer,
                listener: None,
                kernel: false,
                takes_listener: false,
                peer_address: h.peer_address,
                batch: h.batch,
            }),
            _ => Link::Shared { listener: None },
        };
        let raw = link.channel().map(|c| c.as_raw_fd());
        let open = h.sent.saturating_sub(h.closed);
        let index = self.workers.insert(Worker {
            slot,
            pid: h.pid,
            weight: h.weight.max(1),
            state: State::Ready,
            link,
            full: false,
            drain_queued: false,
            drain_sent: false,
            sent: h.sent,
            closed: h.closed.min(h.sent),
            reported: h.reported,
            progress: super::native::stall::Progress::default(),
            queue: super::kernel::pressure::Queue::default(),
            stop_seen: false,
            messages: h.messages,
        });
        if let Some(raw) = raw {
            let _ = self.poll.registry().register(
                &mut SourceFd(&raw),
                Source::Worker(index).token(),
                Interest::READABLE,
            );
        }
        self.current[slot.0] = Some(index);
        self.views[slot.0] = WorkerView {
            eligible: false,
            weight: h.weight.max(1),
            active: u32::try_from(open).unwrap_or(u32::MAX),
        };
        self.sync_view(slot);
        self.read_worker(index);
    }
}
