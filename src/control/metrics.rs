//! The optional metrics endpoint (`--metrics HOST:PORT`): Prometheus text
//! format at `/metrics`, from the same status the control socket serves.
//! Its own thread; each scrape asks the supervisor, which asks the
//! dispatcher for a snapshot: nothing is added to the per-connection path
//! but the counters and the latency histogram the dispatcher keeps anyway.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use mio::Waker;

use super::{Incoming, Request, Status, WorkerStatus};

/// Histogram bucket bounds for the hand-off latency, in seconds.
pub const BUCKETS: [f64; 14] = [
    1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 1e-2, 1e-1, 1.0,
];

/// Binds `addr` and serves scrapes on a thread; returns the bound address.
pub fn serve(
    addr: SocketAddr,
    requests: Sender<Incoming>,
    waker: Arc<Waker>,
) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("lb-metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = scrape(stream, &requests, &waker);
            }
        })?;
    Ok(bound)
}

fn scrape(mut stream: TcpStream, requests: &Sender<Incoming>, waker: &Waker) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let target = line.split_whitespace().nth(1).unwrap_or("");
    let (code, body) = if target == "/metrics" {
        let (reply, answer) = crossbeam_channel::bounded(1);
        let _ = requests.send(Incoming {
            request: Request::Status,
            reply,
        });
        let _ = waker.wake();
        match answer
            .recv_timeout(Duration::from_secs(5))
            .ok()
            .and_then(|r| r.status)
        {
            Some(status) => ("200 OK", render(&status)),
            None => (
                "503 Service Unavailable",
                "the master did not answer\n".into(),
            ),
        }
    } else {
        ("404 Not Found", "metrics are at /metrics\n".into())
    };
    write!(
        stream,
        "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

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
