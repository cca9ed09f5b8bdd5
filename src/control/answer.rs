//! The supervisor's answers as what travels: its status as the wire's
//! `Status` (seconds, percentages, latency buckets), its answer as a
//! `Response`.

use super::prometheus::BUCKETS;
use super::wire::{
    Health, ListenerStatus, PoolStatus, ProcessStatus, ProxyHeaders, Response, Status, WorkerStatus,
};
use crate::supervisor::{self, Answer};

impl From<Answer> for Response {
    fn from(answer: Answer) -> Response {
        match answer {
            Answer::Done(message) => Response::done(message),
            Answer::Refused(error) => Response::error(error),
            Answer::Status(status) => Response {
                ok: true,
                status: Some(Status::from(&*status)),
                ..Response::default()
            },
            Answer::Health(h) => Response {
                ok: true,
                health: Some(Health {
                    ready: h.ready,
                    min_ready: h.min_ready,
                    slots: h.slots,
                    stopping: h.stopping,
                }),
                ..Response::default()
            },
        }
    }
}

impl From<&supervisor::Status> for Status {
    fn from(s: &supervisor::Status) -> Status {
        Status {
            pid: s.pid,
            listen: s.listen.clone(),
            listeners: s
                .listeners
                .iter()
                .map(|l| ListenerStatus {
                    address: l.address.clone(),
                    accepted: l.accepted,
                })
                .collect(),
            policy: s.policy.into(),
            dispatch: s.dispatch.into(),
            uptime_s: s.uptime.as_secs_f64(),
            version: s.version.into(),
            upgrades: s.upgrades,
            exe: s.exe.clone(),
            stopping: s.stopping,
            min_ready: s.min_ready,
            pools: s
                .pools
                .iter()
                .map(|p| PoolStatus {
                    name: p.name.clone(),
                    mode: p.mode.clone(),
                    count: p.count,
                    weight: p.weight,
                })
                .collect(),
            process: ProcessStatus {
                cpu_s: s.process.cpu_s,
                rss_bytes: s.process.rss_bytes,
                open_fds: s.process.open_fds,
                max_fds: s.process.max_fds,
                start_time_s: s.process.start_time_s,
            },
            accepted: s.stats.accepted,
            dispatched: s.stats.dispatched,
            conn_messages: s.stats.conn_messages,
            rescued: s.stats.rescued,
            paused: s.stats.paused,
            proxy_connect_timeouts: s.stats.proxy_connect_timeouts,
            proxy_idle_timeouts: s.stats.proxy_idle_timeouts,
            proxy_headers: proxy_headers(&s.stats.proxy),
            latency_buckets: BUCKETS
                .iter()
                .map(|&le| (le, s.latency.count_between(0, (le * 1e9) as u64)))
                .collect(),
            latency_count: s.latency.len(),
            latency_sum_s: s.latency.mean() * s.latency.len() as f64 / 1e9,
            workers: s.workers.iter().map(WorkerStatus::from).collect(),
        }
    }
}

fn proxy_headers(p: &crate::dispatch::ProxyStats) -> ProxyHeaders {
    use crate::dispatch::header::Failure;
    ProxyHeaders {
        v1: p.v1,
        v2: p.v2,
        local: p.local,
        untrusted_served: p.untrusted_served,
        failures: Failure::ALL
            .iter()
            .map(|&f| (f.name().to_string(), p.failed(f)))
            .collect(),
    }
}

impl From<&supervisor::WorkerStatus> for WorkerStatus {
    fn from(w: &supervisor::WorkerStatus) -> WorkerStatus {
        let uptime = w.uptime.as_secs_f64();
        WorkerStatus {
            slot: w.slot.0,
            pool: w.pool.clone(),
            pid: w.pid,
            generation: w.generation,
            state: w.state.name().into(),
            uptime_s: uptime,
            restarts: w.restarts,
            active: w.active,
            total: w.total,
            cpu_percent: if uptime > 0.0 {
                100.0 * w.cpu_s / uptime
            } else {
                0.0
            },
            cpu_s: w.cpu_s,
            rss_bytes: w.rss_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::dispatch::Stats;
    use crate::policy::Slot;
    use crate::supervisor::WorkerState;

    fn worker(slot: usize, pid: Option<u32>, state: WorkerState) -> supervisor::WorkerStatus {
        supervisor::WorkerStatus {
            slot: Slot(slot),
            pool: "web".into(),
            pid,
            generation: 2,
            state,
            uptime: Duration::ZERO,
            restarts: 0,
            active: None,
            total: 0,
            cpu_s: 0.0,
            rss_bytes: 0,
        }
    }

    #[test]
    fn a_status_becomes_seconds_percentages_and_buckets() {
        let mut latency = hdrhistogram::Histogram::<u64>::new(3).unwrap();
        latency.record(1_500).unwrap(); // 1.5 µs
        latency.record(3_000_000).unwrap(); // 3 ms
        let mut ready = worker(0, Some(11), WorkerState::Ready);
        ready.uptime = Duration::from_secs(4);
        ready.cpu_s = 1.0;
        ready.active = Some(3);
        ready.total = 7;
        ready.restarts = 1;
        ready.rss_bytes = 4096;
        let s = supervisor::Status {
            pid: 10,
            listen: "127.0.0.1:8000".into(),
            listeners: vec![supervisor::ListenerStatus {
                address: "127.0.0.1:8000".into(),
                accepted: Some(3),
            }],
            policy: "least-conn",
            dispatch: "master",
            uptime: Duration::from_millis(2500),
            version: "1.2.3",
            upgrades: 1,
            exe: "/usr/bin/lb".into(),
            stopping: true,
            min_ready: 2,
            pools: vec![supervisor::PoolStatus {
                name: "web".into(),
                mode: "native".into(),
                count: 2,
                weight: 3,
            }],
            process: supervisor::Usage {
                cpu_s: 0.5,
                rss_bytes: 8192,
                open_fds: Some(9),
                max_fds: Some(1024),
                start_time_s: Some(1.7e9),
            },
            stats: Stats {
                accepted: 5,
                dispatched: 4,
                rescued: 1,
                paused: 2,
                proxy_connect_timeouts: 6,
                proxy_idle_timeouts: 8,
                proxy: crate::dispatch::ProxyStats {
                    v1: 3,
                    v2: 4,
                    failures: [1, 0, 2, 0, 0, 0],
                    ..Default::default()
                },
                ..Stats::default()
            },
            latency,
            workers: vec![ready, worker(1, None, WorkerState::Restarting)],
        };
        let w = Status::from(&s);
        assert_eq!(
            (w.pid, w.listen.as_str(), w.policy.as_str()),
            (10, "127.0.0.1:8000", "least-conn")
        );
        assert_eq!(w.uptime_s, 2.5);
        assert_eq!(
            (w.version.as_str(), w.stopping, w.min_ready),
            ("1.2.3", true, 2)
        );
        assert_eq!(
            w.pools,
            [PoolStatus {
                name: "web".into(),
                mode: "native".into(),
                count: 2,
                weight: 3
            }]
        );
        assert_eq!(
            w.process,
            ProcessStatus {
                cpu_s: 0.5,
                rss_bytes: 8192,
                open_fds: Some(9),
                max_fds: Some(1024),
                start_time_s: Some(1.7e9),
            }
        );
        assert_eq!(
            (w.accepted, w.dispatched, w.rescued, w.paused),
            (5, 4, 1, 2)
        );
        assert_eq!((w.proxy_connect_timeouts, w.proxy_idle_timeouts), (6, 8));
        assert_eq!((w.proxy_headers.v1, w.proxy_headers.v2), (3, 4));
        assert_eq!(w.proxy_headers.failures["malformed"], 1);
        assert_eq!(w.proxy_headers.failures["timeout"], 2);
        assert_eq!(w.proxy_headers.failures["full"], 0);
        assert_eq!(w.latency_count, 2);
        assert_eq!(w.latency_buckets.len(), BUCKETS.len());
        let at = |le: f64| w.latency_buckets.iter().find(|b| b.0 == le).unwrap().1;
        assert_eq!(
            (at(1e-6), at(2e-6), at(1e-3), at(5e-3), at(1.0)),
            (0, 1, 1, 2, 2)
        );
        assert!(
            (w.latency_sum_s - 0.0030015).abs() < 1e-5,
            "{}",
            w.latency_sum_s
        );
        assert_eq!(
            w.workers[0],
            WorkerStatus {
                slot: 0,
                pool: "web".into(),
                pid: Some(11),
                generation: 2,
                state: "ready".into(),
                uptime_s: 4.0,
                restarts: 1,
                active: Some(3),
                total: 7,
                cpu_percent: 25.0,
                cpu_s: 1.0,
                rss_bytes: 4096,
            }
        );
        // A slot waiting to restart: no process, no time, no division by it.
        assert_eq!(w.workers[1].state, "restarting");
        assert_eq!((w.workers[1].pid, w.workers[1].cpu_percent), (None, 0.0));
    }

    #[test]
    fn every_state_has_its_wire_name() {
        let names: Vec<String> = [
            WorkerState::Starting,
            WorkerState::Ready,
            WorkerState::Stalled,
            WorkerState::Draining,
            WorkerState::Restarting,
        ]
        .into_iter()
        .map(|s| WorkerStatus::from(&worker(0, None, s)).state)
        .collect();
        assert_eq!(
            names,
            ["starting", "ready", "stalled", "draining", "restarting"]
        );
    }

    #[test]
    fn an_answer_is_a_response() {
        let done = Response::from(Answer::Done("sent to 2 workers".into()));
        assert!(done.ok);
        assert_eq!(done.message.as_deref(), Some("sent to 2 workers"));
        assert!(done.error.is_none() && done.status.is_none() && done.health.is_none());
        let health = Response::from(Answer::Health(supervisor::Health {
            ready: 1,
            min_ready: 2,
            slots: 3,
            stopping: false,
        }));
        assert_eq!(
            serde_json::to_string(&health).unwrap(),
            r#"{"ok":true,"health":{"ready":1,"min_ready":2,"slots":3,"stopping":false}}"#
        );
        let refused = Response::from(Answer::Refused("a reload is in progress".into()));
        assert!(!refused.ok);
        assert_eq!(refused.error.as_deref(), Some("a reload is in progress"));
        assert_eq!(
            serde_json::to_string(&refused).unwrap(),
            r#"{"ok":false,"error":"a reload is in progress"}"#
        );
    }
}
