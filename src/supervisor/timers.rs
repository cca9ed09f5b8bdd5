//! Time: when the loop must wake next, and what is due then (drain and
//! ready timeouts, kills, restarts, recycling checks).

use std::time::Instant;

use super::output::about;
use super::{Phase, RECYCLE_CHECK, Supervisor};
use crate::policy::Slot;
use crate::warn;

impl Supervisor {
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let restarts = self.slots.iter().filter_map(|s| s.restart_at);
        let kills = self
            .workers
            .iter()
            .flat_map(|p| [p.kill_at, p.replace_at])
            .flatten();
        let ready = self
            .workers
            .iter()
            .filter(|p| !p.ready && !p.retiring && !p.ready_timed_out)
            .map(|p| p.started + self.config.ready_timeout);
        let exits = self.exiting.iter().map(|e| e.give_up_at);
        let drain = match self.phase {
            Phase::Draining { deadline } => Some(deadline),
            _ => None,
        };
        restarts
            .chain(kills)
            .chain(exits)
            .chain(ready)
            .chain(drain)
            .chain(self.next_check)
            .min()
    }

    pub(super) fn on_timers(&mut self) {
        let now = Instant::now();
        if let Phase::Draining { deadline } = self.phase
            && now >= deadline
        {
            warn!(
                "drain timeout ({:.1}s): killing {} workers still running",
                self.config.drain_timeout.as_secs_f64(),
                self.workers.len()
            );
            self.kill_all();
        }
        let ready_timeout = self.config.ready_timeout;
        for p in &mut self.workers {
            let late =
                !p.ready && !p.retiring && !p.ready_timed_out && now >= p.started + ready_timeout;
            if late {
                warn!(
                    worker: about(&self.config, &self.slot_pools, p.slot, Some(p.pid));
                    "worker {} pid {}: not ready within {:.1}s; killing it",
                    p.slot,
                    p.pid,
                    ready_timeout.as_secs_f64()
                );
                p.ready_timed_out = true;
                p.kill();
            }
            if p.kill_at.is_some_and(|t| now >= t) {
                warn!(
                    worker: about(&self.config, &self.slot_pools, p.slot, Some(p.pid));
                    "worker {} pid {}: still running after {:.1}s of draining; killing it",
                    p.slot,
                    p.pid,
                    self.config.drain_timeout.as_secs_f64()
                );
                p.kill_at = None;
                p.kill();
            }
        }
        self.replace_due(now);
        self.exits_overdue(now);
        let limits = self.config.max_conns_per_worker.is_some() || self.config.max_rss.is_some();
        if limits && self.phase == Phase::Running {
            if self.next_check.is_none_or(|t| now >= t) {
                self.next_check = Some(now + RECYCLE_CHECK);
                self.recycle();
            }
        } else {
            self.next_check = None;
        }
        for slot in 0..self.slots.len() {
            if self.slots[slot].restart_at.is_some_and(|t| now >= t) {
                self.slots[slot].restart_at = None;
                // Something else took the slot meanwhile (a reload's
                // candidate): never two successors.
                if !self.covered(Slot(slot), 0) {
                    self.slots[slot].restarts += 1;
                    self.start_or_retry(Slot(slot));
                }
            }
        }
    }
}
