//! The Prometheus text exposition of a status (what `/metrics` serves).
//!
//! Per-worker series are labelled by `pool` and `slot`, never by pid: a
//! slot's series live as long as the slot, however often its process is
//! replaced, so `rate()` and `increase()` work and the number of series is
//! bounded by the slots. What a slot shows is its *current* process's (the
//! one that takes its connections, else the one about to, else the last
//! one going); its pid is a value (`lb_worker_pid`). A replaced process's
//! counters (connections, CPU) start again from 0, which Prometheus reads
//! as a counter reset: the old process is sent nothing once replaced, so
//! nothing is counted twice (docs/metrics.md).

use super::exposition::Exposition;
use super::{PoolStatus, Status, WorkerStatus};

/// Histogram bucket bounds for the hand-off latency, in seconds.
pub const BUCKETS: [f64; 14] = [
    1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 1e-2, 1e-1, 1.0,
];

/// Every state a worker can be in, each a series of `lb_worker_state`.
pub const STATES: [&str; 5] = ["starting", "ready", "stalled", "draining", "restarting"];

/// Prometheus text exposition of a status.
pub fn render(s: &Status) -> String {
    let mut o = Exposition(String::new());
    o.family(
        "lb_build_info",
        "gauge",
        "Always 1; lb's version as a label.",
    );
    o.sample("lb_build_info", &[("version", &s.version)], 1);
    o.family(
        "lb_dispatch_info",
        "gauge",
        "Always 1; who picks each connection's worker (master or kernel) as a label.",
    );
    o.sample("lb_dispatch_info", &[("dispatch", &s.dispatch)], 1);
    process(&mut o, s);
    for (name, help, v) in [
        (
            "lb_connections_accepted_total",
            "Connections accepted by the master.",
            s.accepted,
        ),
        (
            "lb_connections_dispatched_total",
            "Connections handed to a worker.",
            s.dispatched,
        ),
        (
            "lb_conn_messages_total",
            "CONN messages that carried connections to lb-protocol workers (fewer than \
             connections when workers take several per CONN).",
            s.conn_messages,
        ),
        (
            "lb_connections_rescued_total",
            "Connections read back from a dead worker's channel and handed to another.",
            s.rescued,
        ),
        (
            "lb_accept_pauses_total",
            "Times accepting paused because no worker had room.",
            s.paused,
        ),
        (
            "lb_proxy_connect_timeouts_total",
            "Proxy mode: connects to a worker not done within the connect timeout (the client \
             went to another worker).",
            s.proxy_connect_timeouts,
        ),
        (
            "lb_proxy_idle_timeouts_total",
            "Proxy mode: relays reset after the idle timeout without a byte moved.",
            s.proxy_idle_timeouts,
        ),
    ] {
        o.family(name, "counter", help);
        o.sample(name, &[], v);
    }
    listeners(&mut o, s);
    proxy_headers(&mut o, s);
    health(&mut o, s);
    pools(&mut o, &s.pools);
    workers(&mut o, &s.workers);
    latency(&mut o, s);
    o.0
}

/// Connections accepted from each listener (none in shared mode, where the
/// workers accept).
fn listeners(o: &mut Exposition, s: &Status) {
    o.family(
        "lb_listener_connections_accepted_total",
        "counter",
        "Connections accepted by the master, by listener.",
    );
    for l in &s.listeners {
        if let Some(n) = l.accepted {
            o.sample(
                "lb_listener_connections_accepted_total",
                &[("listener", &l.address)],
                n,
            );
        }
    }
}

/// The PROXY protocol: headers read by version, connections closed by reason.
fn proxy_headers(o: &mut Exposition, s: &Status) {
    let p = &s.proxy_headers;
    o.family(
        "lb_proxy_headers_total",
        "counter",
        "PROXY protocol headers read, by version.",
    );
    o.sample("lb_proxy_headers_total", &[("version", "v1")], p.v1);
    o.sample("lb_proxy_headers_total", &[("version", "v2")], p.v2);
    o.family(
        "lb_proxy_headers_local_total",
        "counter",
        "PROXY protocol headers without a client address (LOCAL, UNKNOWN: health checks).",
    );
    o.sample("lb_proxy_headers_local_total", &[], p.local);
    o.family(
        "lb_proxy_untrusted_served_total",
        "counter",
        "Connections from outside proxy_trusted served as direct clients.",
    );
    o.sample("lb_proxy_untrusted_served_total", &[], p.untrusted_served);
    o.family(
        "lb_proxy_header_failures_total",
        "counter",
        "Connections closed over their PROXY header (or their source), by reason.",
    );
    for (reason, n) in &p.failures {
        o.sample("lb_proxy_header_failures_total", &[("reason", reason)], n);
    }
}

/// The master process, by the names every Prometheus client library uses.
fn process(o: &mut Exposition, s: &Status) {
    let p = &s.process;
    o.family(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
    );
    o.sample("process_cpu_seconds_total", &[], p.cpu_s);
    o.family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
    );
    o.sample("process_resident_memory_bytes", &[], p.rss_bytes);
    for (name, help, v) in [
        (
            "process_open_fds",
            "Number of open file descriptors.",
            p.open_fds.map(|n| n as f64),
        ),
        (
            "process_max_fds",
            "Maximum number of open file descriptors.",
            p.max_fds.map(|n| n as f64),
        ),
        (
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            p.start_time_s,
        ),
    ] {
        o.family(name, "gauge", help);
        if let Some(v) = v {
            o.sample(name, &[], v);
        }
    }
}

/// What `/readyz` decides, as numbers to alert on.
fn health(o: &mut Exposition, s: &Status) {
    let ready = s.workers.iter().filter(|w| w.state == "ready").count();
    for (name, help, v) in [
        (
            "lb_workers",
            "Worker processes running (a slot waiting to restart has none).",
            s.workers.iter().filter(|w| w.pid.is_some()).count(),
        ),
        (
            "lb_workers_ready",
            "Workers that said READY and are neither stalled nor draining.",
            ready,
        ),
        (
            "lb_min_ready",
            "Ready workers needed for /readyz to answer 200 (min_ready).",
            s.min_ready,
        ),
        (
            "lb_ready",
            "1 when /readyz answers 200: min_ready workers ready and lb not stopping.",
            usize::from(!s.stopping && ready >= s.min_ready),
        ),
        (
            "lb_stopping",
            "1 while lb drains its workers on the way out.",
            usize::from(s.stopping),
        ),
    ] {
        o.family(name, "gauge", help);
        o.sample(name, &[], v);
    }
}

fn pools(o: &mut Exposition, pools: &[PoolStatus]) {
    o.family(
        "lb_pool_workers",
        "gauge",
        "Worker slots the pool is configured with.",
    );
    for p in pools {
        o.sample("lb_pool_workers", &[("pool", &p.name)], p.count);
    }
    o.family("lb_pool_weight", "gauge", "The pool's weight (wrr, lc).");
    for p in pools {
        o.sample("lb_pool_weight", &[("pool", &p.name)], p.weight);
    }
    o.family(
        "lb_pool_info",
        "gauge",
        "Always 1; the pool's worker mode as a label.",
    );
    for p in pools {
        o.sample("lb_pool_info", &[("pool", &p.name), ("mode", &p.mode)], 1);
    }
}

/// A slot's entries (its processes, or its wait to restart) and the one
/// its series show.
struct SlotView<'a> {
    slot: String,
    pool: &'a str,
    current: &'a WorkerStatus,
    all: Vec<&'a WorkerStatus>,
}

/// Which of a slot's processes its series follow: the one taking its
/// connections, else the one about to, else the last one going.
fn rank(state: &str) -> u8 {
    match state {
        "ready" => 0,
        "stalled" => 1,
        "starting" => 2,
        "restarting" => 3,
        _ => 4,
    }
}

fn slots(workers: &[WorkerStatus]) -> Vec<SlotView<'_>> {
    let mut by_slot: std::collections::BTreeMap<usize, Vec<&WorkerStatus>> = Default::default();
    for w in workers {
        by_slot.entry(w.slot).or_default().push(w);
    }
    by_slot
        .into_iter()
        .filter_map(|(slot, all)| {
            // Of two in the same rank, the newer.
            let current = *all.iter().min_by(|a, b| {
                (rank(&a.state), a.uptime_s)
                    .partial_cmp(&(rank(&b.state), b.uptime_s))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })?;
            Some(SlotView {
                slot: slot.to_string(),
                pool: &current.pool,
                current,
                all,
            })
        })
        .collect()
}

fn workers(o: &mut Exposition, workers: &[WorkerStatus]) {
    let slots = slots(workers);
    let name = "lb_worker_state";
    o.family(
        name,
        "gauge",
        "Per slot and state, how many of the slot's processes are in it: 1 for the state the \
         slot is in, 0 for the others (while a process is replaced, old and new both count).",
    );
    for v in &slots {
        for state in STATES {
            let n = v.all.iter().filter(|w| w.state == state).count();
            o.sample(
                name,
                &[("pool", v.pool), ("slot", &v.slot), ("state", state)],
                n,
            );
        }
    }
    type Get = fn(&WorkerStatus) -> Option<f64>;
    let series: [(&str, &str, &str, Get); 8] = [
        (
            "lb_worker_pid",
            "gauge",
            "The process id of the slot's current process (absent while it waits to restart).",
            |w| w.pid.map(f64::from),
        ),
        (
            "lb_worker_generation",
            "gauge",
            "The configuration generation the slot's current process was started with.",
            |w| Some(w.generation as f64),
        ),
        (
            "lb_worker_uptime_seconds",
            "gauge",
            "Seconds since the slot's current process started.",
            |w| w.pid.map(|_| w.uptime_s),
        ),
        (
            "lb_worker_resident_memory_bytes",
            "gauge",
            "Resident memory of the slot's current process.",
            |w| w.pid.map(|_| w.rss_bytes as f64),
        ),
        (
            "lb_worker_cpu_seconds_total",
            "counter",
            "User and system CPU seconds of the slot's current process (from 0 when it is \
             replaced: a counter reset).",
            |w| Some(w.cpu_s),
        ),
        (
            "lb_worker_connections_total",
            "counter",
            "Connections sent to the slot's current process (from 0 when it is replaced: a \
             counter reset).",
            |w| Some(w.total as f64),
        ),
        (
            "lb_worker_active_connections",
            "gauge",
            "Connections sent to the slot's current process and not reported closed (absent \
             when unknown).",
            |w| w.active.map(|n| n as f64),
        ),
        (
            "lb_worker_restarts_total",
            "counter",
            "Restarts and replacements of the slot's process.",
            |w| Some(w.restarts as f64),
        ),
    ];
    for (name, kind, help, get) in series {
        o.family(name, kind, help);
        for v in &slots {
            // A value that is unknown has no sample (Prometheus' way).
            if let Some(x) = get(v.current) {
                o.sample(name, &[("pool", v.pool), ("slot", &v.slot)], x);
            }
        }
    }
}

fn latency(o: &mut Exposition, s: &Status) {
    let name = "lb_dispatch_latency_seconds";
    o.family(
        name,
        "histogram",
        "From accept to the send that handed the connection over.",
    );
    let bucket = format!("{name}_bucket");
    for (le, count) in &s.latency_buckets {
        o.sample(&bucket, &[("le", &le.to_string())], count);
    }
    o.sample(&bucket, &[("le", "+Inf")], s.latency_count);
    o.sample(&format!("{name}_sum"), &[], s.latency_sum_s);
    o.sample(&format!("{name}_count"), &[], s.latency_count);
}

#[cfg(test)]
mod tests {
    use super::super::ProcessStatus;
    use super::*;

    fn status() -> Status {
        let worker = |slot, pid, state: &str, uptime_s| WorkerStatus {
            slot,
            pool: if slot < 2 { "web" } else { "canary" }.into(),
            pid,
            state: state.into(),
            uptime_s,
            ..WorkerStatus::default()
        };
        Status {
            version: "1.2.3".into(),
            accepted: 9,
            min_ready: 1,
            pools: vec![
                PoolStatus {
                    name: "web".into(),
                    mode: "native".into(),
                    count: 2,
                    weight: 3,
                },
                PoolStatus {
                    name: "canary".into(),
                    mode: "proxy".into(),
                    count: 1,
                    weight: 1,
                },
            ],
            process: ProcessStatus {
                cpu_s: 0.25,
                rss_bytes: 4096,
                open_fds: Some(12),
                max_fds: Some(1024),
                start_time_s: None,
            },
            latency_buckets: vec![(1e-6, 1), (1.0, 3)],
            latency_count: 4,
            latency_sum_s: 0.5,
            workers: vec![
                // Slot 0 mid-replacement: the old process drains, the new
                // one (ready) is the slot's.
                WorkerStatus {
                    total: 70,
                    restarts: 1,
                    ..worker(0, Some(11), "draining", 100.0)
                },
                WorkerStatus {
                    total: 5,
                    active: Some(2),
                    restarts: 1,
                    cpu_s: 1.5,
                    rss_bytes: 3 << 20,
                    generation: 2,
                    ..worker(0, Some(12), "ready", 4.0)
                },
                worker(1, None, "restarting", 0.0),
                worker(2, Some(13), "starting", 0.5),
            ],
            ..Status::default()
        }
    }

    #[test]
    fn worker_series_are_per_pool_and_slot_with_the_pid_as_a_value() {
        let text = render(&status());
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            "lb_build_info{version=\"1.2.3\"} 1",
            "# TYPE process_cpu_seconds_total counter",
            "process_cpu_seconds_total 0.25",
            "process_resident_memory_bytes 4096",
            "process_open_fds 12",
            "process_max_fds 1024",
            "# TYPE lb_connections_accepted_total counter",
            "lb_connections_accepted_total 9",
            "lb_workers 3",
            "lb_workers_ready 1",
            "lb_min_ready 1",
            "lb_ready 1",
            "lb_stopping 0",
            "lb_pool_workers{pool=\"web\"} 2",
            "lb_pool_weight{pool=\"canary\"} 1",
            "lb_pool_info{pool=\"canary\",mode=\"proxy\"} 1",
            "lb_worker_state{pool=\"web\",slot=\"0\",state=\"ready\"} 1",
            "lb_worker_state{pool=\"web\",slot=\"0\",state=\"draining\"} 1",
            "lb_worker_state{pool=\"web\",slot=\"0\",state=\"starting\"} 0",
            "lb_worker_state{pool=\"web\",slot=\"1\",state=\"restarting\"} 1",
            "lb_worker_state{pool=\"web\",slot=\"1\",state=\"ready\"} 0",
            "lb_worker_state{pool=\"canary\",slot=\"2\",state=\"starting\"} 1",
            "lb_worker_pid{pool=\"web\",slot=\"0\"} 12",
            "lb_worker_pid{pool=\"canary\",slot=\"2\"} 13",
            "lb_worker_generation{pool=\"web\",slot=\"0\"} 2",
            "lb_worker_uptime_seconds{pool=\"web\",slot=\"0\"} 4",
            "lb_worker_resident_memory_bytes{pool=\"web\",slot=\"0\"} 3145728",
            "# TYPE lb_worker_cpu_seconds_total counter",
            "lb_worker_cpu_seconds_total{pool=\"web\",slot=\"0\"} 1.5",
            "lb_worker_connections_total{pool=\"web\",slot=\"0\"} 5",
            "lb_worker_connections_total{pool=\"web\",slot=\"1\"} 0",
            "lb_worker_active_connections{pool=\"web\",slot=\"0\"} 2",
            "lb_worker_restarts_total{pool=\"web\",slot=\"0\"} 1",
            "# TYPE lb_dispatch_latency_seconds histogram",
            "lb_dispatch_latency_seconds_bucket{le=\"0.000001\"} 1",
            "lb_dispatch_latency_seconds_bucket{le=\"1\"} 3",
            "lb_dispatch_latency_seconds_bucket{le=\"+Inf\"} 4",
            "lb_dispatch_latency_seconds_sum 0.5",
            "lb_dispatch_latency_seconds_count 4",
        ] {
            assert!(lines.contains(&want), "{want} missing from:\n{text}");
        }
        // No pid label anywhere; the draining process's figures are not
        // the slot's; one series per slot (no duplicates).
        assert!(!text.contains("pid=\""), "{text}");
        assert!(!text.contains(" 70\n"), "{text}");
        let samples: Vec<&str> = lines
            .iter()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.rsplit_once(' ').unwrap().0)
            .collect();
        let mut unique = samples.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), samples.len(), "{text}");
        // Every state is a series for every slot.
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.starts_with("lb_worker_state{"))
                .count(),
            3 * STATES.len()
        );
        // Unknown is no sample at all, not a zero: no pid, uptime or memory
        // for a slot waiting to restart, no start time here.
        for absent in [
            "lb_worker_pid{pool=\"web\",slot=\"1\"}",
            "lb_worker_uptime_seconds{pool=\"web\",slot=\"1\"}",
            "lb_worker_resident_memory_bytes{pool=\"web\",slot=\"1\"}",
            "lb_worker_active_connections{pool=\"web\",slot=\"1\"}",
            "process_start_time_seconds ",
        ] {
            assert!(
                !lines.iter().any(|l| l.starts_with(absent)),
                "{absent} in:\n{text}"
            );
        }
    }

    #[test]
    fn readiness_follows_min_ready_and_stopping() {
        let mut s = status();
        s.min_ready = 2;
        assert!(render(&s).contains("\nlb_ready 0\n"));
        s.min_ready = 0;
        s.stopping = true;
        let text = render(&s);
        assert!(text.contains("\nlb_ready 0\n") && text.contains("\nlb_stopping 1\n"));
    }
}
