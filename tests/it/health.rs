//! The metrics listener as ops use it: health checks for what is in front
//! of lb (`/livez`, `/healthz`, `/readyz`), a scrape that a real parser
//! (Python's `prometheus_client`) accepts with series by pool and slot,
//! and the pool in `lb status` and `--json`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::util::*;

/// One request, whole; the answer as (status line, head, body).
fn request(addr: &str, method: &str, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: m\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_string();
    (status, head.to_string(), body.to_string())
}

/// Asks `path` until its answer starts with `code` and its body with
/// `body`; that answer's body.
fn wait_for(addr: &str, path: &str, code: &str, body: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _, got) = request(addr, "GET", path);
        if status.starts_with(&format!("HTTP/1.1 {code} ")) && got.starts_with(body) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{path}: still {status}: {got:?}, not {code} {body:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A worker that says READY only once the file `$GATE<its slot>` exists.
fn gated_worker(dir: &std::path::Path) -> String {
    python_worker(
        dir,
        "gated.py",
        "while not os.path.exists(os.environ['GATE'] + os.environ['LB_WORKER_ID']):\n    \
         time.sleep(0.02)\nsend(16)\nserve_forever()",
    )
}

#[test]
fn readyz_waits_for_min_ready_workers_and_livez_for_the_supervisor() {
    let dir = scratch("readyz");
    let gate = dir.join("gate-").to_str().unwrap().to_string();
    let worker = gated_worker(&dir);
    let lb = Lb::start(
        &[
            "--workers",
            "2",
            "--min-ready",
            "2",
            "--metrics",
            "127.0.0.1:0",
            "--",
            "python3",
            &worker,
        ],
        &[("GATE", &gate)],
        0,
    );
    let addr = lb.metrics_addr();
    // Live from the start: the supervisor answers, whatever the workers do.
    for path in ["/livez", "/healthz"] {
        let (status, head, body) = request(&addr, "GET", path);
        assert_eq!(status, "HTTP/1.1 200 OK", "{path}: {body}");
        assert_eq!(body, "live: lb's supervisor answers\n");
        assert!(head.contains("\r\nCache-Control: no-store"), "{head}");
    }
    let (status, _, body) = request(&addr, "GET", "/readyz");
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert_eq!(body, "not ready: 0 of 2 workers ready, min_ready is 2\n");
    std::fs::write(format!("{gate}0"), "").unwrap();
    wait_for(
        &addr,
        "/readyz",
        "503",
        "not ready: 1 of 2 workers ready, min_ready is 2",
    );
    std::fs::write(format!("{gate}1"), "").unwrap();
    let body = wait_for(&addr, "/readyz", "200", "ready:");
    assert_eq!(body, "ready: 2 of 2 workers ready (min_ready 2)\n");

    // HEAD: the same head, no body.
    for path in ["/readyz", "/livez", "/metrics"] {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "HEAD {path} HTTP/1.1\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{path}: {answer}");
        assert!(!head.contains("Content-Length: 0\r\n"), "{path}: {head}");
        assert_eq!(body, "", "{path}");
    }
    // Only GET and HEAD.
    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        for path in ["/readyz", "/livez", "/metrics"] {
            let (status, head, _) = request(&addr, method, path);
            assert_eq!(status, "HTTP/1.1 405 Method Not Allowed", "{method} {path}");
            assert!(head.contains("\r\nAllow: GET, HEAD\r\n"), "{head}");
        }
    }
    // What probes try elsewhere is a 404 that names what is served.
    for path in ["/", "/health", "/ready"] {
        let (status, _, body) = request(&addr, "GET", path);
        assert!(status.starts_with("HTTP/1.1 404 "), "{path}: {status}");
        assert_eq!(
            body,
            "lb serves /metrics, /livez (or /healthz) and /readyz\n"
        );
    }
}

#[test]
fn readyz_is_503_while_lb_drains_and_livez_stays_200() {
    let dir = scratch("readyz-drain");
    // Ignores DRAIN (never reads its channel again), so lb drains it until
    // the drain timeout.
    let deaf = python_worker(&dir, "deaf.py", "send(16)\ntime.sleep(600)");
    let lb = Lb::start(
        &[
            "--workers",
            "1",
            "--drain-timeout",
            "10s",
            "--metrics",
            "127.0.0.1:0",
            "--",
            "python3",
            &deaf,
        ],
        &[],
        1,
    );
    let addr = lb.metrics_addr();
    wait_for(&addr, "/readyz", "200", "ready: 1 of 1 workers ready");
    lb.signal(libc::SIGTERM);
    let body = wait_for(&addr, "/readyz", "503", "not ready: lb is stopping");
    assert_eq!(body, "not ready: lb is stopping\n");
    let (status, _, body) = request(&addr, "GET", "/livez");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, "live: lb's supervisor answers (stopping)\n");
    let (_, _, metrics) = request(&addr, "GET", "/metrics");
    for line in ["lb_stopping 1", "lb_ready 0"] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
}

/// A `--min-ready` the workers cannot reach is refused at start.
#[test]
fn min_ready_beyond_the_workers_is_refused() {
    let (status, err) = run_to_exit(&["--workers", "2", "--min-ready", "3"], &[]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "min_ready is 3 but there are 2 workers in all, so /readyz could never answer 200; \
             lower min_ready or add workers"
        ),
        "{err}"
    );
    let (status, err) = run_to_exit(&["--workers", "2", "--min-ready", "many"], &[]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("give a whole number from 0 to 1024"), "{err}");
}

/// Parses a scrape with `prometheus_client` (what .ci/run installs from
/// PyPI); its families as JSON: name, type, samples (name, labels, value).
/// `None` (with a message) when the module is not installed.
fn parsed_by_prometheus_client(text: &str) -> Option<serde_json::Value> {
    const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
print(json.dumps([
    {"name": f.name, "type": f.type,
     "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]}
    for f in text_string_to_metric_families(sys.stdin.read())
]))
"#;
    let probe = std::process::Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "skipping the prometheus_client check: the Python module is not installed \
             (.ci/run installs it: python3 -m pip install prometheus_client)"
        );
        return None;
    }
    let mut child = std::process::Command::new("timeout")
        .args(["20", "python3", "-c", PARSE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn a_scrape_parses_with_prometheus_client_and_names_pools_and_slots() {
    let dir = scratch("prometheus-client");
    let config = write_config(
        &dir,
        "lb.toml",
        &format!("{}{}", hello_pool("web", 2), hello_pool("canary", 1)),
    );
    let lb = Lb::start(&["--config", &config, "--metrics", "127.0.0.1:0"], &[], 3);
    let addr = lb.metrics_addr();
    for _ in 0..6 {
        get(lb.addr, "/");
    }
    // A restart must not start new series: slot 0's process is replaced.
    let old = lb.pid_of_slot(0);
    send_signal(old, libc::SIGKILL);
    lb.wait_ready(4);
    let deadline = Instant::now() + WAIT;
    let new = loop {
        let pid = lb.pid_of_slot(0);
        if pid != old && lb.status()["workers"].as_array().unwrap().len() == 3 {
            break pid;
        }
        assert!(Instant::now() < deadline, "slot 0 was not replaced");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (status, head, text) = request(&addr, "GET", "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let Some(families) = parsed_by_prometheus_client(&text) else {
        return;
    };
    let families = families.as_array().unwrap();
    let family = |name: &str| {
        families
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("no family {name} in:\n{text}"))
    };
    let sample = |name: &str, labels: &[(&str, &str)]| -> f64 {
        families
            .iter()
            .flat_map(|f| f["samples"].as_array().unwrap())
            .find(|s| {
                s["name"] == name
                    && s["labels"].as_object().unwrap().len() == labels.len()
                    && labels.iter().all(|(k, v)| s["labels"][k] == *v)
            })
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{text}"))["value"]
            .as_f64()
            .unwrap()
    };
    // Types as declared (prometheus_client names a counter's family
    // without `_total`).
    for (name, kind) in [
        ("lb_build_info", "gauge"),
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
        ("lb_connections_dispatched", "counter"),
        ("lb_workers", "gauge"),
        ("lb_workers_ready", "gauge"),
        ("lb_ready", "gauge"),
        ("lb_pool_workers", "gauge"),
        ("lb_worker_state", "gauge"),
        ("lb_worker_pid", "gauge"),
        ("lb_worker_uptime_seconds", "gauge"),
        ("lb_worker_resident_memory_bytes", "gauge"),
        ("lb_worker_cpu_seconds", "counter"),
        ("lb_worker_connections", "counter"),
        ("lb_worker_restarts", "counter"),
        ("lb_dispatch_latency_seconds", "histogram"),
    ] {
        assert_eq!(family(name)["type"], kind, "{name}");
    }
    assert_eq!(
        sample("lb_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        1.0
    );
    assert!(sample("process_resident_memory_bytes", &[]) > 0.0);
    let open = sample("process_open_fds", &[]);
    assert!(open > 3.0 && open <= sample("process_max_fds", &[]));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = sample("process_start_time_seconds", &[]);
    assert!(started <= now && started > now - 600.0, "{started} {now}");
    assert_eq!(sample("lb_workers", &[]), 3.0);
    assert_eq!(sample("lb_workers_ready", &[]), 3.0);
    assert_eq!(sample("lb_ready", &[]), 1.0);
    assert_eq!(sample("lb_pool_workers", &[("pool", "web")]), 2.0);
    assert_eq!(sample("lb_pool_workers", &[("pool", "canary")]), 1.0);

    // Per worker: labelled by pool and slot only, never by pid; every
    // state a series; the pid a value, the new process's.
    for f in families
        .iter()
        .filter(|f| f["name"].as_str().unwrap().starts_with("lb_worker_"))
    {
        for s in f["samples"].as_array().unwrap() {
            let mut keys: Vec<&str> = s["labels"]
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.as_str())
                .collect();
            keys.sort_unstable();
            let want: &[&str] = if f["name"] == "lb_worker_state" {
                &["pool", "slot", "state"]
            } else {
                &["pool", "slot"]
            };
            assert_eq!(keys, want, "{s}");
        }
    }
    for (slot, pool) in [("0", "web"), ("1", "web"), ("2", "canary")] {
        let l = [("pool", pool), ("slot", slot)];
        for state in ["starting", "ready", "stalled", "draining", "restarting"] {
            let v = sample("lb_worker_state", &[l[0], l[1], ("state", state)]);
            assert_eq!(v, f64::from(u8::from(state == "ready")), "{slot} {state}");
        }
        let pid = if slot == "0" {
            new
        } else {
            lb.pid_of_slot(slot.parse().unwrap())
        };
        assert_eq!(sample("lb_worker_pid", &l), f64::from(pid), "{slot}");
        assert!(
            sample("lb_worker_resident_memory_bytes", &l) > 0.0,
            "{slot}"
        );
        assert!(sample("lb_worker_uptime_seconds", &l) >= 0.0, "{slot}");
        sample("lb_worker_cpu_seconds_total", &l);
        let restarts = sample("lb_worker_restarts_total", &l);
        assert_eq!(restarts, f64::from(u8::from(slot == "0")), "{slot}");
    }
    // The replaced process's connections went with it: the slot's counter
    // started again from 0 (a counter reset), the master's did not.
    assert_eq!(
        sample(
            "lb_worker_connections_total",
            &[("pool", "web"), ("slot", "0")]
        ),
        0.0
    );
    assert_eq!(sample("lb_connections_dispatched_total", &[]), 6.0);
    assert!(!text.contains(&format!("\"{old}\"")), "{text}");
}

#[test]
fn status_and_its_json_name_each_workers_pool() {
    let dir = scratch("status-pool");
    let config = write_config(
        &dir,
        "lb.toml",
        &format!("{}{}", hello_pool("web", 2), hello_pool("canary-v2", 1)),
    );
    let lb = Lb::start(&["--config", &config], &[], 3);
    let status = lb.status();
    let pools: Vec<(&str, u64)> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["pool"].as_str().unwrap(), w["slot"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        pools,
        [("web", 0), ("web", 1), ("canary-v2", 2)],
        "{status}"
    );
    assert_eq!(status["pools"][1]["name"], "canary-v2", "{status}");
    assert_eq!(status["pools"][0]["count"], 2, "{status}");
    assert_eq!(status["min_ready"], 1, "{status}");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"), "{status}");
    assert!(status["process"]["rss_bytes"].as_u64().unwrap() > 0);
    let table = lb.ctl(&["status"]);
    let lines: Vec<&str> = table.lines().collect();
    let header = lines.iter().position(|l| l.starts_with("slot")).unwrap();
    assert!(lines[header].starts_with("slot  pool       "), "{table}");
    for (row, (slot, pool)) in [(0, "web"), (1, "web"), (2, "canary-v2")]
        .iter()
        .enumerate()
    {
        let cells: Vec<&str> = lines[header + 1 + row].split_whitespace().collect();
        assert_eq!(&cells[..2], [slot.to_string().as_str(), pool], "{table}");
    }
    assert!(
        table.contains("ready: 3 of 3 workers (min_ready 1); pools: web 2×native weight 1"),
        "{table}"
    );
}
