//! Workers that take none of the connections waiting for them.
//!
//! A worker's channel holds at most `worker_queue` connections (its send
//! buffer is sized so, at spawn), so a slow or stuck worker soon has a full
//! channel and is skipped. What is already queued for it would wait until
//! it is killed: once a second the dispatcher looks at each lb-protocol
//! worker's unread bytes (`SIOCOUTQ`, one `ioctl` per worker per second,
//! nothing per connection). A worker with connections waiting that takes
//! none of them for `stall_timeout` — or that no longer has its channel
//! open at all in its process or its children (it closed fd 3: the master's
//! own copy of its end hides the EOF), checked once after a second without
//! progress — is marked stalled: it
//! gets nothing more, what waits in its channel is read back and handed to
//! the others at once, and the supervisor replaces it, successor first.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use crate::dispatch::link::Link;
use crate::dispatch::worker::State;
use crate::dispatch::{Dispatcher, Event};
use crate::sys;

/// How often waiting connections are looked at.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// No progress for this long makes lb check that the worker still has its
/// channel open.
const SUSPECT_AFTER: Duration = Duration::from_secs(1);

/// The dispatcher's watch: `stall_timeout`, and what one CONN costs a
/// channel's send buffer (to turn unread bytes into connections).
#[derive(Debug, Clone, Copy)]
pub struct Watch {
    pub timeout: Duration,
    pub message_cost: usize,
    pub(super) next: Instant,
}

impl Watch {
    pub fn new(timeout: Duration, message_cost: usize) -> Watch {
        Watch {
            timeout,
            message_cost: message_cost.max(1),
            next: Instant::now() + CHECK_EVERY,
        }
    }
}

/// Per worker: progress seen so far.
#[derive(Debug, Default)]
pub struct Progress {
    /// CONN messages it has taken, as of the last check.
    taken: u64,
    /// Since when it has had connections waiting and taken none.
    since: Option<Instant>,
    /// Its channel was found open (checked once per stall suspicion).
    open_checked: bool,
    /// Marked stalled: it gets nothing more.
    pub stalled: bool,
}

impl Dispatcher {
    /// The earliest time the watch needs the loop awake.
    pub(crate) fn stall_wake(&self) -> Option<Instant> {
        self.stall.map(|w| w.next)
    }

    /// Once a second: every lb-protocol worker's waiting connections.
    pub(crate) fn stall_timers(&mut self) {
        let Some(watch) = self.stall else { return };
        let now = Instant::now();
        if now < watch.next {
            return;
        }
        if let Some(w) = self.stall.as_mut() {
            w.next = now + CHECK_EVERY;
        }
        for index in 0..self.workers.end() {
            let Some(w) = self.workers.get_mut(index) else {
                continue;
            };
            let Link::Native(link) = &w.link else {
                continue;
            };
            if w.progress.stalled || w.state == State::Starting {
                continue;
            }
            let unread = sys::unread_bytes(link.channel.as_fd()).unwrap_or(0);
            // In CONN messages: a batching worker's carry several
            // connections each, and cost its channel about what one does.
            let waiting = unread.div_ceil(watch.message_cost) as u64;
            let taken = w.messages.saturating_sub(waiting);
            let p = &mut w.progress;
            if waiting == 0 || taken > p.taken {
                p.taken = taken;
                p.since = None;
                p.open_checked = false;
                continue;
            }
            let since = *p.since.get_or_insert(now);
            let idle = now.saturating_duration_since(since);
            let why = if idle >= watch.timeout {
                Some(format!(
                    "took none of its {waiting} waiting CONNs for {:.1}s",
                    idle.as_secs_f64()
                ))
            } else if idle >= SUSPECT_AFTER && !p.open_checked {
                p.open_checked = true;
                match nix::sys::stat::fstat(&link.peer) {
                    Ok(st) if !sys::tree_holds_socket(w.pid, st.st_ino) => Some(format!(
                        "closed its channel (fd 3) with {waiting} CONNs waiting"
                    )),
                    _ => None,
                }
            } else {
                None
            };
            if let Some(why) = why {
                self.stalled(index, why);
            }
        }
    }

    /// Worker `index` takes no connection any more: nothing new goes to it,
    /// what waits for it goes to the others, the supervisor replaces it.
    fn stalled(&mut self, index: usize, why: String) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        w.progress.stalled = true;
        let (slot, pid) = (w.slot, w.pid);
        let (rescued, lost) = match &w.link {
            Link::Native(n) => n.read_back(&mut self.buf, &mut self.pending),
            _ => (0, 0),
        };
        self.label_read_back(rescued);
        self.read_back_lost(slot, pid, lost);
        self.stats.rescued += rescued;
        // A DRAIN read back with them goes again, behind nothing now.
        if let Some(w) = self.workers.get_mut(index)
            && w.drain_sent
        {
            w.drain_sent = false;
            self.send_drain(index);
        }
        self.sync_view(slot);
        self.emit(Event::Stalled {
            slot,
            pid,
            why,
            rescued,
        });
    }
}
