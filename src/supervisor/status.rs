//! The supervisor's status: the master and every worker as it sees them,
//! with the dispatcher's counts. `control` turns it into wire JSON.

use std::time::Duration;

use super::Supervisor;
use crate::dispatch::{Command, Stats};
use crate::policy::Slot;
use crate::sys;

/// The master and every worker (what `lb status` shows).
#[derive(Debug, Clone)]
pub struct Status {
    pub pid: u32,
    pub listen: String,
    pub policy: &'static str,
    pub uptime: Duration,
    pub stats: Stats,
    /// Hand-off latency per connection, ns.
    pub latency: hdrhistogram::Histogram<u64>,
    /// By slot, then pid (a slot waiting to restart has none).
    pub workers: Vec<WorkerStatus>,
}

/// A worker process, or a slot waiting to restart.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerStatus {
    pub slot: Slot,
    /// None while the slot waits to restart.
    pub pid: Option<u32>,
    pub generation: u64,
    pub state: WorkerState,
    pub uptime: Duration,
    pub restarts: u64,
    /// Open connections, if known.
    pub active: Option<u64>,
    pub total: u64,
    /// CPU seconds used since start.
    pub cpu_s: f64,
    pub rss_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Starting,
    Ready,
    /// Takes none of the connections waiting for it.
    Stalled,
    Draining,
    /// No process: the slot waits to restart.
    Restarting,
}

impl WorkerState {
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Stalled => "stalled",
            WorkerState::Draining => "draining",
            WorkerState::Restarting => "restarting",
        }
    }
}

impl Supervisor {
    /// Every process and every waiting slot, with the dispatcher's counts.
    pub(super) fn status(&self) -> Option<Status> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.dispatch.send(Command::Snapshot(reply));
        let snap = answer.recv_timeout(Duration::from_secs(2)).ok()?;
        let mut workers: Vec<WorkerStatus> = self
            .workers
            .iter()
            .map(|p| {
                let seen = snap.workers.iter().find(|w| w.pid == p.pid);
                let (cpu_s, rss) = sys::proc_usage(p.pid).unwrap_or_default();
                WorkerStatus {
                    slot: p.slot,
                    pid: Some(p.pid),
                    generation: p.generation,
                    state: if p.retiring {
                        WorkerState::Draining
                    } else if p.stalled {
                        WorkerState::Stalled
                    } else if p.ready {
                        WorkerState::Ready
                    } else {
                        WorkerState::Starting
                    },
                    uptime: p.started.elapsed(),
                    restarts: self.slots.get(p.slot.0).map_or(0, |s| s.restarts),
                    active: seen.and_then(|w| w.active),
                    total: seen.map_or(0, |w| w.total),
                    cpu_s,
                    rss_bytes: rss,
                }
            })
            .collect();
        for (slot, s) in self.slots.iter().enumerate() {
            if s.restart_at.is_some()
                && !self.workers.iter().any(|p| p.slot.0 == slot && !p.retiring)
            {
                workers.push(WorkerStatus {
                    slot: Slot(slot),
                    pid: None,
                    generation: self.generation,
                    state: WorkerState::Restarting,
                    uptime: Duration::ZERO,
                    restarts: s.restarts,
                    active: None,
                    total: 0,
                    cpu_s: 0.0,
                    rss_bytes: 0,
                });
            }
        }
        workers.sort_by_key(|w| (w.slot.0, w.pid));
        Some(Status {
            pid: std::process::id(),
            listen: self.listen.clone(),
            policy: self.config.policy.name(),
            uptime: self.started.elapsed(),
            stats: snap.stats,
            latency: snap.latency,
            workers,
        })
    }
}
