//! Kernel dispatch's back-pressure and stall check, from each ready
//! worker's own accept queue (one `getsockopt(TCP_INFO)` per worker each
//! time the schedule is computed, at least every [`super::QUEUE_PERIOD`]):
//!
//! - a worker whose queue is full gets nothing new while another has
//!   room, as a full channel is skipped under master dispatch;
//! - a worker with connections queued that makes no progress for
//!   `stall_timeout` (no accept reported, and its queue never shorter) is
//!   stalled: it leaves the schedule, its listener is shut down so that
//!   what was queued there moves to the others at once (the group's
//!   program migrates it; the worker's `accept` fails from then on), and
//!   the supervisor replaces it, as under master dispatch.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::dispatch::worker::State;
use crate::dispatch::{Dispatcher, Event};
use crate::sys;

/// How long a stopping lb waits for the workers to take what their queues
/// hold before it sends DRAIN (nobody else would take it).
const STOP_QUEUES: Duration = Duration::from_secs(2);

/// A worker's own accept queue, as last seen.
#[derive(Debug, Default)]
pub struct Queue {
    pub queued: u32,
    /// As long as the queue can hold.
    pub full: bool,
    /// Connections it had reported accepting, at the last look.
    taken: u64,
    /// Since when it has had connections queued and made no progress.
    since: Option<Instant>,
    /// Found stalled: its listener is to be shut down once it is out of
    /// the schedule.
    stop: bool,
}

impl Dispatcher {
    /// Looks at every current ready worker's queue; marks the stalled.
    pub(super) fn sample_queues(&mut self) {
        let now = Instant::now();
        let timeout = self.stall.map(|w| w.timeout);
        for slot in 0..self.current.len() {
            let Some(w) = self.current[slot].and_then(|i| self.workers.get_mut(i)) else {
                continue;
            };
            if w.state != State::Ready || w.progress.stalled {
                continue;
            }
            let Some(listener) = w.link.own_listener() else {
                continue;
            };
            let Ok((queued, max)) = sys::accept_queue(listener.as_fd()) else {
                continue;
            };
            let q = &mut w.queue;
            let progress = queued == 0 || queued < q.queued || w.sent > q.taken;
            q.full = max > 0 && queued >= max;
            q.queued = queued;
            q.taken = w.sent;
            if progress {
                q.since = None;
            } else if timeout.is_some_and(|t| now.duration_since(*q.since.get_or_insert(now)) >= t)
            {
                w.progress.stalled = true;
                q.stop = true;
            }
        }
    }

    /// Whether some current ready worker's queue has room.
    pub(super) fn queues_with_room(&self) -> bool {
        self.current.iter().any(|i| {
            i.and_then(|i| self.workers.get(i)).is_some_and(|w| {
                w.state == State::Ready
                    && !w.progress.stalled
                    && !w.queue.full
                    && w.link.own_listener().is_some()
            })
        })
    }

    /// Whether a worker was found stalled and is still to be stopped.
    pub(super) fn stalls_pending(&self) -> bool {
        self.workers
            .indices()
            .any(|i| self.workers.get(i).is_some_and(|w| w.queue.stop))
    }

    /// The stalled workers, out of the schedule now: their listeners shut
    /// down, what was queued moved on, the supervisor told.
    pub(super) fn stop_stalled(&mut self) {
        for index in 0..self.workers.end() {
            let Some(w) = self.workers.get_mut(index) else {
                continue;
            };
            if !std::mem::take(&mut w.queue.stop) {
                continue;
            }
            let (slot, pid) = (w.slot, w.pid);
            let idle = w.queue.since.map_or(0.0, |s| s.elapsed().as_secs_f64());
            let mut rescued = 0;
            if let Some(listener) = w.link.own_listener() {
                rescued = sys::accept_queue(listener.as_fd()).map_or(0, |(q, _)| u64::from(q));
                if sys::stop_listening(listener.as_fd()).is_err() {
                    rescued = 0;
                }
            }
            self.stats.rescued += rescued;
            self.emit(Event::Stalled {
                slot,
                pid,
                why: format!(
                    "accepted none of the connections queued in its listener for {idle:.1}s"
                ),
                rescued,
            });
        }
    }
}

impl Dispatcher {
    /// Stopping under kernel dispatch: no new connection is steered (the
    /// empty schedule drops SYNs; clients retry), and DRAIN waits until the
    /// workers took what their queues held (`queues_waiting`).
    pub(in crate::dispatch) fn kernel_stop(&mut self) {
        if self.steering.is_some() {
            self.stop_queues_by = Some(Instant::now() + STOP_QUEUES);
            self.steer();
        }
    }

    /// Stopping: some ready worker still has connections queued, and there
    /// is time left to wait for them.
    pub(in crate::dispatch) fn queues_waiting(&self) -> bool {
        let Some(by) = self.stop_queues_by else {
            return false;
        };
        Instant::now() < by
            && self.workers.indices().any(|i| {
                self.workers.get(i).is_some_and(|w| {
                    w.state == State::Ready
                        && w.link
                            .own_listener()
                            .is_some_and(|l| sys::accept_queue(l.as_fd()).is_ok_and(|(q, _)| q > 0))
                })
            })
    }

    /// A gone worker's listener (lb's copy, the last one). Closed when
    /// another worker is in the schedule, so that the kernel moves what
    /// is queued there to it; kept listening (out of the schedule) while
    /// none is, and closed once one is ready. How many were queued.
    pub(in crate::dispatch) fn let_go_of_listener(
        &mut self,
        w: &mut crate::dispatch::worker::Worker,
    ) -> u64 {
        let Some(listener) = w.link.take_own_listener() else {
            return 0;
        };
        let queued = sys::accept_queue(listener.as_fd()).map_or(0, |(q, _)| u64::from(q));
        if self.steering_names_someone() {
            drop(listener);
            queued
        } else {
            self.orphans.push((w.slot, w.pid, listener));
            0
        }
    }

    fn steering_names_someone(&self) -> bool {
        self.steering
            .as_ref()
            .is_some_and(|s| !s.written.is_empty())
    }

    /// Someone is in the schedule again: the kept listeners close, and
    /// what they held moves to it; how many.
    pub(in crate::dispatch) fn release_orphans(&mut self) {
        if self.orphans.is_empty() || !self.steering_names_someone() {
            return;
        }
        for (slot, pid, listener) in std::mem::take(&mut self.orphans) {
            let count = sys::accept_queue(listener.as_fd()).map_or(0, |(q, _)| u64::from(q));
            drop::<OwnedFd>(listener);
            self.stats.rescued += count;
            if count > 0 {
                self.emit(Event::Rescued { slot, pid, count });
            }
        }
    }
}
