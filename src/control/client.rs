//! The client side of the control socket: `lb status`, `lb stop`, `lb send`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::{Request, Response, Status};

/// Sends one request and returns the master's answer, or a one-line reason.
pub fn call(path: &Path, request: &Request) -> Result<Response, String> {
    let stream = UnixStream::connect(path).map_err(|e| {
        format!(
            "no lb master answers on {} ({e}); start one, or pass --control PATH",
            path.display()
        )
    })?;
    let timeout = Duration::from_secs(10);
    let read_timeout = if *request == Request::Reload {
        super::RELOAD_TIMEOUT + timeout
    } else {
        timeout
    };
    let _ = stream.set_read_timeout(Some(read_timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let mut text = serde_json::to_string(request).map_err(|e| e.to_string())?;
    text.push('\n');
    (&stream)
        .write_all(text.as_bytes())
        .map_err(|e| format!("cannot talk to the master on {}: {e}", path.display()))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| format!("no answer from the master on {}: {e}", path.display()))?;
    serde_json::from_str(line.trim()).map_err(|e| format!("unreadable answer from the master: {e}"))
}

/// The worker pids a master runs now.
pub fn worker_pids(path: &Path) -> Result<Vec<u32>, String> {
    let status = call(path, &Request::Status)?
        .status
        .ok_or("the master sent no status")?;
    Ok(status.workers.iter().filter_map(|w| w.pid).collect())
}

/// Waits until none of `pids` (the workers a reload replaced) is running
/// (`lb reload --wait`). The master kills a worker still draining at its
/// `drain_timeout`, so this ends; a status the master is slow to answer is
/// asked again.
pub fn wait_gone(path: &Path, pids: &[u32]) -> Result<(), String> {
    let mut failures = 0;
    loop {
        match worker_pids(path) {
            Ok(now) if !now.iter().any(|p| pids.contains(p)) => return Ok(()),
            Ok(_) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures >= 5 {
                    return Err(e);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `lb status` as a table, like `pm2 ls`.
pub fn render(s: &Status) -> String {
    let mut out = format!(
        "lb pid {}  listening on {}  policy {}  up {}\nconnections: {} accepted, {} dispatched, {} rescued\n\n",
        s.pid,
        s.listen,
        s.policy,
        human(s.uptime_s),
        s.accepted,
        s.dispatched,
        s.rescued
    );
    out += &format!(
        "{:>4}  {:>8}  {:>3}  {:<10}  {:>7}  {:>8}  {:>6}  {:>9}  {:>5}  {:>8}\n",
        "slot", "pid", "gen", "state", "uptime", "restarts", "active", "total", "cpu%", "rss"
    );
    for w in &s.workers {
        out += &format!(
            "{:>4}  {:>8}  {:>3}  {:<10}  {:>7}  {:>8}  {:>6}  {:>9}  {:>5.1}  {:>8}\n",
            w.slot,
            w.pid.map_or("-".to_string(), |p| p.to_string()),
            w.generation,
            w.state,
            human(w.uptime_s),
            w.restarts,
            w.active.map_or("-".to_string(), |a| a.to_string()),
            w.total,
            w.cpu_percent,
            bytes(w.rss_bytes)
        );
    }
    out
}

fn human(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn bytes(b: u64) -> String {
    match b {
        0..1024 => format!("{b}B"),
        1024..1048576 => format!("{:.1}K", b as f64 / 1024.0),
        _ => format!("{:.1}M", b as f64 / 1048576.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::WorkerStatus;

    #[test]
    fn table_has_a_row_per_worker() {
        let s = Status {
            pid: 10,
            listen: "127.0.0.1:8000".into(),
            policy: "round-robin".into(),
            workers: vec![
                WorkerStatus {
                    slot: 0,
                    pid: Some(11),
                    state: "ready".into(),
                    rss_bytes: 3 << 20,
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
        let t = render(&s);
        assert_eq!(t.lines().count(), 3 + 1 + 2);
        assert!(t.contains("3.0M") && t.contains("restarting"));
    }
}
