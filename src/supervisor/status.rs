//! The supervisor's status: the master and every worker as it sees them,
//! with the dispatcher's counts (`control` turns it into wire JSON); and
//! its health, which needs no dispatcher (what `/livez` and `/readyz`
//! ask).

use std::time::Duration;

use super::usage::Usage;
use super::{Phase, Supervisor};
use crate::dispatch::{Command, Stats};
use crate::policy::Slot;
use crate::sys;

/// The master and every worker (what `lb status` shows).
#[derive(Debug, Clone)]
pub struct Status {
    pub pid: u32,
    /// Every listener, comma-separated.
    pub listen: String,
    /// Each listener, in configured order.
    pub listeners: Vec<ListenerStatus>,
    pub policy: &'static str,
    /// Who picks each connection's worker: `master` or `kernel`.
    pub dispatch: &'static str,
    pub uptime: Duration,
    /// lb's version (`lb_build_info`).
    pub version: &'static str,
    /// In-place upgrades since lb started, and the binary the next runs.
    pub upgrades: u64,
    pub exe: String,
    /// Draining or killing its workers on the way out.
    pub stopping: bool,
    pub min_ready: usize,
    /// As configured now, in slot order.
    pub pools: Vec<PoolStatus>,
    /// The master process itself.
    pub process: Usage,
    pub stats: Stats,
    /// Hand-off latency per connection, ns.
    pub latency: hdrhistogram::Histogram<u64>,
    /// By slot, then pid (a slot waiting to restart has none).
    pub workers: Vec<WorkerStatus>,
}

/// One of lb's listeners.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerStatus {
    pub address: String,
    /// Connections lb accepted from it; `None` in shared mode and under
    /// kernel dispatch, where the workers accept.
    pub accepted: Option<u64>,
}

/// A pool as configured now.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolStatus {
    pub name: String,
    pub mode: String,
    pub count: usize,
    pub weight: u32,
}

/// A worker process, or a slot waiting to restart.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerStatus {
    pub slot: Slot,
    /// Its pool's name (a process's as it started; a slot waiting to
    /// restart, its pool's now).
    pub pool: String,
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

/// Whether the master is up and whether it should get traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Processes that said READY and are neither stalled nor draining.
    pub ready: usize,
    pub min_ready: usize,
    /// Slots configured now.
    pub slots: usize,
    pub stopping: bool,
}

impl Health {
    pub fn is_ready(&self) -> bool {
        !self.stopping && self.ready >= self.min_ready
    }
}

impl Supervisor {
    /// Answered from what the supervisor holds, without the dispatcher: a
    /// supervisor that answers this at all is live.
    pub(super) fn health(&self) -> Health {
        Health {
            ready: self
                .workers
                .iter()
                .filter(|p| p.ready && !p.retiring && !p.stalled)
                .count(),
            min_ready: self.config.min_ready,
            slots: self.layout.planned(),
            stopping: self.phase != Phase::Running,
        }
    }

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
                    pool: p.pool.clone(),
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
                    pool: self.pool_of(Slot(slot)),
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
            listen: self.listening.join(", "),
            listeners: self
                .listening
                .iter()
                .enumerate()
                .map(|(i, address)| ListenerStatus {
                    address: address.clone(),
                    // (Under kernel dispatch the workers accept.)
                    accepted: snap
                        .by_listener
                        .get(i)
                        .copied()
                        .filter(|_| !self.kernel_dispatch),
                })
                .collect(),
            policy: self.config.policy.name(),
            dispatch: if self.kernel_dispatch {
                "kernel"
            } else {
                "master"
            },
            uptime: self.started.elapsed(),
            version: env!("CARGO_PKG_VERSION"),
            upgrades: self.upgrades,
            exe: crate::upgrade::exec::started_as().display().to_string(),
            stopping: self.phase != Phase::Running,
            min_ready: self.config.min_ready,
            pools: self
                .config
                .pools
                .iter()
                .map(|p| PoolStatus {
                    name: p.name.clone(),
                    mode: p.mode.to_string(),
                    count: p.count,
                    weight: p.weight,
                })
                .collect(),
            process: Usage::now(),
            stats: snap.stats,
            latency: snap.latency,
            workers,
        })
    }

    /// The name of the pool `slot` belongs to now.
    fn pool_of(&self, slot: Slot) -> String {
        self.layout
            .pool(slot)
            .and_then(|p| self.config.pools.get(p))
            .map_or_else(String::new, |p| p.name.clone())
    }
}
