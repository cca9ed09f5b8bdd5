//! Recycling: replacing, successor first, a worker over a limit (connections
//! served, memory) or one whose successor's back-off is over.

use std::time::Instant;

use super::{Phase, RECYCLE_CHECK, Supervisor};
use crate::dispatch::Command;
use crate::info;
use crate::policy::Slot;
use crate::sys;

/// A worker's own connection limit: `max` plus its share, 0 to `jitter`,
/// of the jitter (gunicorn's `max_requests_jitter`), so workers started
/// together are not all replaced together. The share comes from `draw`,
/// fixed at its spawn; the limits themselves are read at each check, so a
/// reload that changes them applies to running workers too.
pub(super) fn conn_limit(max: Option<u64>, jitter: u64, draw: u64) -> Option<u64> {
    max.map(|m| m.saturating_add(draw % jitter.saturating_add(1)))
}

/// A random number for [`conn_limit`]: SipHash under the keys std seeds
/// from getrandom(2), fresh for each `RandomState` (no crate needed for
/// a spread that has nothing to keep secret).
pub(super) fn draw() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(Instant::now())
}

impl Supervisor {
    /// Replaces, successor first, every ready worker over a recycling limit:
    /// the new process takes the slot at its READY and the old one drains,
    /// so no request is cut short.
    pub(super) fn recycle(&mut self) {
        if self.reload.is_some() {
            return;
        }
        let totals = match self.config.max_conns_per_worker {
            Some(_) => {
                let (reply, answer) = crossbeam_channel::bounded(1);
                self.dispatch.send(Command::Snapshot(reply));
                answer
                    .recv_timeout(std::time::Duration::from_secs(2))
                    .map(|s| s.workers)
                    .unwrap_or_default()
            }
            None => Vec::new(),
        };
        let mut over = Vec::new();
        let mut fat_from_start = None;
        for p in self
            .workers
            .iter()
            .filter(|p| p.ready && !p.retiring && !p.recycling)
        {
            // Only when nothing else (a successor already) is in the slot.
            if self
                .workers
                .iter()
                .any(|o| o.slot == p.slot && o.pid != p.pid && !o.retiring)
            {
                continue;
            }
            let served = totals
                .iter()
                .find(|w| w.pid == p.pid)
                .map_or(0, |w| w.total);
            let limit = conn_limit(
                self.config.max_conns_per_worker,
                self.config.max_conns_per_worker_jitter,
                p.jitter_draw,
            );
            if let Some(limit) = limit.filter(|&l| served >= l) {
                over.push((
                    p.slot,
                    p.pid,
                    format!("served {served} connections (limit {limit})"),
                ));
                continue;
            }
            if let Some(limit) = self.config.max_rss.filter(|_| !self.rss_warned) {
                let rss = sys::proc_usage(p.pid).map_or(0, |u| u.1);
                // Over the limit at its first check once ready: so would
                // every successor be, and replacing it each second helps
                // nobody.
                let fresh = !p.rss_checked;
                if rss > limit && fresh {
                    fat_from_start = Some((limit, rss));
                } else if rss > limit {
                    over.push((
                        p.slot,
                        p.pid,
                        format!("uses {rss} bytes of memory (limit {limit})"),
                    ));
                }
            }
        }
        if self.config.max_rss.is_some() {
            for p in self.workers.iter_mut().filter(|p| p.ready) {
                p.rss_checked = true;
            }
        }
        if let Some((limit, rss)) = fat_from_start
            && !self.rss_warned
        {
            self.rss_warned = true;
            info!(
                "max_rss ({limit} bytes) is below what a fresh worker uses ({rss} bytes): \
                 workers are not replaced for memory until it is raised (lb reload)"
            );
        }
        for (slot, pid, why) in over {
            info!(
                worker: self.about(slot, Some(pid));
                "worker {slot} pid {pid} {why}; replacing it, its successor ready first"
            );
            if let Some(i) = self.index_of(pid) {
                self.workers[i].recycling = true;
            }
            self.slots[slot.0].restarts += 1;
            self.start_or_retry(slot);
        }
    }

    /// Starts the successors whose back-off is over, unless something else
    /// already replaces the worker: a reload (asked again after it), or
    /// another process in the slot.
    pub(super) fn replace_due(&mut self, now: Instant) {
        let due: Vec<(Slot, u32)> = self
            .workers
            .iter()
            .filter(|p| p.replace_at.is_some_and(|t| now >= t))
            .map(|p| (p.slot, p.pid))
            .collect();
        for (slot, pid) in due {
            let Some(i) = self.index_of(pid) else {
                continue;
            };
            if self.reload.is_some() {
                self.workers[i].replace_at = Some(now + RECYCLE_CHECK);
                continue;
            }
            self.workers[i].replace_at = None;
            let covered = self.covered(slot, pid);
            if self.workers[i].retiring || covered || self.phase != Phase::Running {
                self.workers[i].recycling = false;
                continue;
            }
            self.slots[slot.0].restarts += 1;
            self.start_or_retry(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_draws_its_own_limit_within_the_jitter() {
        let limits: Vec<u64> = (0..64)
            .map(|_| conn_limit(Some(1000), 500, draw()).unwrap())
            .collect();
        assert!(
            limits.iter().all(|l| (1000..=1500).contains(l)),
            "{limits:?}"
        );
        let mut distinct = limits.clone();
        distinct.sort_unstable();
        distinct.dedup();
        // 64 draws of 501 values: all alike only by a broken draw.
        assert!(distinct.len() > 16, "{limits:?}");
        // No jitter, no limit, and the largest values, as given.
        assert_eq!(conn_limit(Some(1000), 0, draw()), Some(1000));
        assert_eq!(conn_limit(None, 500, draw()), None);
        assert_eq!(
            conn_limit(Some(u64::MAX), u64::MAX, u64::MAX),
            Some(u64::MAX)
        );
        assert_eq!(conn_limit(Some(7), 3, 6), Some(9));
    }
}
