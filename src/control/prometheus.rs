//! The Prometheus text exposition of a status (what `/metrics` serves).

use std::fmt::Write as _;

use super::{Status, WorkerStatus};

/// Histogram bucket bounds for the hand-off latency, in seconds.
pub const BUCKETS: [f64; 14] = [
    1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 1e-2, 1e-1, 1.0,
];

/// Prometheus text exposition of a status.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    };
    counter(
        "lb_connections_accepted_total",
        "Connections accepted by the master.",
        s.accepted,
    );
    counter(
        "lb_connections_dispatched_total",
        "Connections handed to a worker.",
        s.dispatched,
    );
    counter(
        "lb_connections_rescued_total",
        "Connections read back from a dead worker's channel and handed to another.",
        s.rescued,
    );
    counter(
        "lb_accept_pauses_total",
        "Times accepting paused because no worker had room.",
        s.paused,
    );
    counter(
        "lb_proxy_connect_timeouts_total",
        "Proxy mode: connects to a worker not done within the connect timeout (the client went to another worker).",
        s.proxy_connect_timeouts,
    );
    counter(
        "lb_proxy_idle_timeouts_total",
        "Proxy mode: relays reset after the idle timeout without a byte moved.",
        s.proxy_idle_timeouts,
    );
    let _ = writeln!(
        o,
        "# HELP lb_workers Worker processes.\n# TYPE lb_workers gauge\nlb_workers {}",
        s.workers.len()
    );
    // A worker whose value is unknown has no sample (Prometheus' way).
    let mut per_worker =
        |name: &str,
         kind: &str,
         help: &str,
         value: &dyn Fn(&WorkerStatus) -> (String, Option<u64>)| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for w in &s.workers {
                let (extra, Some(v)) = value(w) else { continue };
                let _ = writeln!(
                    o,
                    "{name}{{slot=\"{}\",pid=\"{}\"{extra}}} {v}",
                    w.slot,
                    pid(w.pid)
                );
            }
        };
    per_worker(
        "lb_worker_state",
        "gauge",
        "1 for the state each worker is in.",
        &|w| (format!(",state=\"{}\"", w.state), Some(1)),
    );
    per_worker(
        "lb_worker_active_connections",
        "gauge",
        "Connections sent and not reported closed (absent when unknown).",
        &|w| (String::new(), w.active),
    );
    per_worker(
        "lb_worker_connections_total",
        "counter",
        "Connections sent to the worker process.",
        &|w| (String::new(), Some(w.total)),
    );
    per_worker(
        "lb_worker_restarts_total",
        "counter",
        "Restarts and replacements of the slot.",
        &|w| (String::new(), Some(w.restarts)),
    );
    let name = "lb_dispatch_latency_seconds";
    let _ = writeln!(
        o,
        "# HELP {name} From accept to the send that handed the connection over.\n# TYPE {name} histogram"
    );
    for (le, count) in &s.latency_buckets {
        let _ = writeln!(o, "{name}_bucket{{le=\"{le}\"}} {count}");
    }
    let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {}", s.latency_count);
    let _ = writeln!(o, "{name}_sum {}", s.latency_sum_s);
    let _ = writeln!(o, "{name}_count {}", s.latency_count);
    o
}

fn pid(p: Option<u32>) -> String {
    p.map_or_else(String::new, |p| p.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_is_counters_per_worker_samples_and_a_histogram() {
        let s = Status {
            accepted: 9,
            latency_buckets: vec![(1e-6, 1), (1.0, 3)],
            latency_count: 4,
            latency_sum_s: 0.5,
            workers: vec![
                WorkerStatus {
                    slot: 0,
                    pid: Some(11),
                    state: "ready".into(),
                    active: Some(2),
                    total: 5,
                    restarts: 1,
                    ..WorkerStatus::default()
                },
                WorkerStatus {
                    slot: 1,
                    state: "restarting".into(),
                    ..WorkerStatus::default()
                },
            ],
            ..Status::default()
        };
        let text = render(&s);
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            "# TYPE lb_connections_accepted_total counter",
            "lb_connections_accepted_total 9",
            "lb_workers 2",
            "lb_worker_state{slot=\"0\",pid=\"11\",state=\"ready\"} 1",
            "lb_worker_state{slot=\"1\",pid=\"\",state=\"restarting\"} 1",
            "lb_worker_active_connections{slot=\"0\",pid=\"11\"} 2",
            "lb_worker_connections_total{slot=\"1\",pid=\"\"} 0",
            "lb_worker_restarts_total{slot=\"0\",pid=\"11\"} 1",
            "lb_dispatch_latency_seconds_bucket{le=\"0.000001\"} 1",
            "lb_dispatch_latency_seconds_bucket{le=\"1\"} 3",
            "lb_dispatch_latency_seconds_bucket{le=\"+Inf\"} 4",
            "lb_dispatch_latency_seconds_sum 0.5",
            "lb_dispatch_latency_seconds_count 4",
        ] {
            assert!(lines.contains(&want), "{want} missing from:\n{text}");
        }
        // Unknown is no sample at all, not a zero.
        assert!(
            !text.contains("lb_worker_active_connections{slot=\"1\""),
            "{text}"
        );
    }
}
