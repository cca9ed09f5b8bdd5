//! Least-connections under kernel dispatch reads the workers' reports
//! (ACCEPTED, CLOSED) in ticks, not as they come: a worker sends one or
//! two per trip round its event loop, and waking the master for each
//! would cost it as much CPU per connection as handing the connections
//! out. A worker's channel that turns readable is taken out of the poll
//! and read at the next tick, [`LC_REFRESH`] later, with every other that
//! turned readable meanwhile; then the schedule is refreshed. The master
//! wakes at most once a tick however many connections come, and not at
//! all when none do (every [`QUEUE_PERIOD`] for the queues then).

use std::os::fd::AsRawFd;
use std::time::Instant;

use mio::Interest;
use mio::unix::SourceFd;

use super::{LC_REFRESH, QUEUE_PERIOD};
use crate::dispatch::Dispatcher;
use crate::dispatch::tokens::Source;
use crate::policy::PolicyKind;

impl Dispatcher {
    /// Whether worker messages wait for the tick.
    pub(in crate::dispatch) fn reads_in_ticks(&self) -> bool {
        self.steering
            .as_ref()
            .is_some_and(|s| s.policy == PolicyKind::LeastConn)
    }

    /// Worker `index`'s channel is readable: out of the poll until the tick.
    pub(in crate::dispatch) fn read_at_tick(&mut self, index: usize) {
        let Some(channel) = self.workers.get(index).and_then(|w| w.link.channel()) else {
            return;
        };
        if self.deferred.contains(&index) {
            return;
        }
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&channel.as_raw_fd()));
        // (Room for every worker was made at start: no allocation here.)
        self.deferred.push(index);
        let at = Instant::now() + LC_REFRESH;
        self.reads_at = Some(self.reads_at.map_or(at, |t| t.min(at)));
    }

    /// A detached worker's index may be reused: it is not read at the tick.
    pub(in crate::dispatch) fn forget_deferred(&mut self, index: usize) {
        self.deferred.retain(|&i| i != index);
    }

    /// Least-connections under kernel dispatch: counts changed, with
    /// `accepted` new connections among them.
    pub(in crate::dispatch) fn counts_changed(&mut self, accepted: u64) {
        if let Some(s) = self.steering.as_mut() {
            s.dirty |= s.policy == PolicyKind::LeastConn;
            s.arrivals = s.arrivals.saturating_add(accepted);
        }
    }

    /// When the next tick is: deferred reads, or the schedule's refresh.
    pub(in crate::dispatch) fn steer_wake(&self) -> Option<Instant> {
        let s = self.steering.as_ref()?;
        // Every policy looks at the queues; least-connections also follows
        // the reports.
        let refresh = s.steered_at + if s.dirty { LC_REFRESH } else { QUEUE_PERIOD };
        // Stopping: DRAIN waits for the queues, looked at every 10 ms.
        let refresh = match self.stop_queues_by {
            Some(_) if !self.drained => refresh.min(Instant::now() + LC_REFRESH * 10),
            _ => refresh,
        };
        Some(self.reads_at.map_or(refresh, |r| r.min(refresh)))
    }

    pub(in crate::dispatch) fn steer_timers(&mut self) {
        let now = Instant::now();
        if self.reads_at.is_some_and(|t| now >= t) {
            self.reads_at = None;
            let deferred = std::mem::take(&mut self.deferred);
            for &index in &deferred {
                self.read_worker(index);
                self.watch_again(index);
            }
            self.deferred = deferred;
            self.deferred.clear();
        }
        if self.steer_wake().is_some_and(|t| now >= t) {
            self.steer_with(false);
        }
    }

    /// Back in the poll (re-adding reports what came meanwhile).
    fn watch_again(&mut self, index: usize) {
        let Some(w) = self.workers.get(index) else {
            return;
        };
        let Some(channel) = w.link.channel() else {
            return;
        };
        let interest = if w.full || w.drain_queued || w.link.has_unwritten() {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let _ = self.poll.registry().register(
            &mut SourceFd(&channel.as_raw_fd()),
            Source::Worker(index).token(),
            interest,
        );
    }
}
