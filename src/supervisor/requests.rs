//! Control requests (`lb status`, `lb stop`, `lb scale`, `lb send`) and the
//! status they read.

use super::{Phase, Supervisor};
use crate::control::{self, Request, Response, Status, WorkerStatus};
use crate::dispatch::Command;
use crate::info;
use crate::policy::Slot;
use crate::sys;

impl Supervisor {
    pub(super) fn on_control(&mut self, request: Request) -> Response {
        match request {
            Request::Status => match self.status() {
                Some(status) => Response {
                    ok: true,
                    status: Some(status),
                    ..Response::default()
                },
                None => Response::error("the dispatcher did not answer".into()),
            },
            Request::Reload => Response::error("reload is answered elsewhere".into()),
            Request::Scale { count, relative } => {
                let n = self.slots.len() as i64;
                let target = if relative {
                    n.saturating_add(count)
                } else {
                    count
                };
                let target = usize::try_from(target).unwrap_or(0);
                match self.scale(target) {
                    Ok(msg) => {
                        info!("{msg}");
                        Response::done(msg)
                    }
                    Err(why) => Response::error(why),
                }
            }
            Request::Stop => {
                if self.phase == Phase::Running {
                    info!("stop requested on the control socket");
                    self.begin_drain("lb stop");
                }
                Response::done(format!("draining {} workers", self.procs.len()))
            }
            Request::Send { slot, message } => {
                if message.len() > crate::proto::MAX_PAYLOAD {
                    return Response::error(format!(
                        "message of {} bytes is longer than {}",
                        message.len(),
                        crate::proto::MAX_PAYLOAD
                    ));
                }
                if slot.is_some_and(|s| s >= self.slots.len()) {
                    return Response::error(format!(
                        "no slot {}; slots are 0 to {}",
                        slot.unwrap_or(0),
                        self.slots.len() - 1
                    ));
                }
                let (reply, answer) = crossbeam_channel::bounded(1);
                self.dispatch.send(Command::Message {
                    target: slot.map(Slot),
                    payload: message.into_bytes(),
                    reply,
                });
                match answer.recv_timeout(std::time::Duration::from_secs(2)) {
                    Ok(0) => Response::error("no ready worker took the message".into()),
                    Ok(n) => Response::done(format!("sent to {n} workers")),
                    Err(_) => Response::error("the dispatcher did not answer".into()),
                }
            }
        }
    }

    /// Every process and every waiting slot, with the dispatcher's counts.
    pub(super) fn status(&self) -> Option<Status> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.dispatch.send(Command::Snapshot(reply));
        let snap = answer
            .recv_timeout(std::time::Duration::from_secs(2))
            .ok()?;
        let mut workers: Vec<WorkerStatus> = self
            .procs
            .iter()
            .map(|p| {
                let seen = snap.workers.iter().find(|w| w.pid == p.pid);
                let uptime = p.started.elapsed().as_secs_f64();
                let (cpu_s, rss) = sys::proc_usage(p.pid).unwrap_or_default();
                WorkerStatus {
                    slot: p.slot.0,
                    pid: Some(p.pid),
                    generation: p.generation,
                    state: if p.retiring {
                        "draining"
                    } else if p.stalled {
                        "stalled"
                    } else if p.ready {
                        "ready"
                    } else {
                        "starting"
                    }
                    .into(),
                    uptime_s: uptime,
                    restarts: self.slots.get(p.slot.0).map_or(0, |s| s.restarts),
                    active: seen.and_then(|w| w.active),
                    total: seen.map_or(0, |w| w.total),
                    cpu_percent: if uptime > 0.0 {
                        100.0 * cpu_s / uptime
                    } else {
                        0.0
                    },
                    rss_bytes: rss,
                }
            })
            .collect();
        for (slot, s) in self.slots.iter().enumerate() {
            if s.restart_at.is_some() && !self.procs.iter().any(|p| p.slot.0 == slot && !p.retiring)
            {
                workers.push(WorkerStatus {
                    slot,
                    generation: self.generation,
                    state: "restarting".into(),
                    restarts: s.restarts,
                    ..WorkerStatus::default()
                });
            }
        }
        workers.sort_by_key(|w| (w.slot, w.pid));
        Some(Status {
            pid: std::process::id(),
            listen: self.listen.clone(),
            policy: self.config.policy.name().into(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            accepted: snap.stats.accepted,
            dispatched: snap.stats.dispatched,
            rescued: snap.stats.rescued,
            paused: snap.stats.paused,
            proxy_connect_timeouts: snap.stats.proxy_connect_timeouts,
            proxy_idle_timeouts: snap.stats.proxy_idle_timeouts,
            latency_buckets: control::metrics::BUCKETS
                .iter()
                .map(|&le| (le, snap.latency.count_between(0, (le * 1e9) as u64)))
                .collect(),
            latency_count: snap.latency.len(),
            latency_sum_s: snap.latency.mean() * snap.latency.len() as f64 / 1e9,
            workers,
        })
    }
}
