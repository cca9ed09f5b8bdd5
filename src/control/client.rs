//! The client side of the control socket: `lb status`, `lb stop`, `lb send`.
//!
//! It talks to the first of the candidate sockets that answers (one, when
//! told `--control`; the search order of `path.rs` otherwise), and only to a
//! server running as root or as this uid: a socket another local user bound
//! first gets no request, and its answer is not believed.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Request, Response, Status};

/// How a connection attempt ended, for choosing what to say.
enum Reach {
    Connected(UnixStream),
    /// Nothing there, or nobody listening: try the next candidate.
    Absent(io::Error),
    /// There, but not for this uid (EACCES, EPERM).
    Denied,
    Failed(io::Error),
}

fn reach(path: &Path) -> Reach {
    match UnixStream::connect(path) {
        Ok(s) => Reach::Connected(s),
        Err(e) => match e.raw_os_error() {
            Some(libc::ENOENT | libc::ECONNREFUSED | libc::ENOTDIR) => Reach::Absent(e),
            Some(libc::EACCES | libc::EPERM) => Reach::Denied,
            _ => Reach::Failed(e),
        },
    }
}

/// The one line for a socket this uid may not open.
fn denied(path: &Path, me: u32) -> String {
    match std::fs::metadata(path) {
        Ok(m) => format!(
            "permission denied on control socket {} (it belongs to uid {}, mode {:o}, and you are \
             uid {me}); run lb as uid {} or as root, or pass --control PATH",
            path.display(),
            m.uid(),
            m.mode() & 0o777,
            m.uid()
        ),
        Err(_) => format!(
            "permission denied on control socket {} (you, uid {me}, may not open it or its \
             directory); run lb as the master's user or as root, or pass --control PATH",
            path.display()
        ),
    }
}

/// Connects to the first of `paths` that answers and runs as root or as
/// this uid; (its path, the stream), or one line saying why none.
pub fn connect(paths: &[PathBuf]) -> Result<(PathBuf, UnixStream), String> {
    let me = nix::unistd::getuid().as_raw();
    let mut refused: Option<&Path> = None;
    let mut last = None;
    for path in paths {
        match reach(path) {
            Reach::Connected(stream) => {
                let uid = super::peer_uid(&stream)
                    .map_err(|e| format!("cannot tell who serves {}: {e}", path.display()))?;
                if !super::allowed(uid, me) {
                    return Err(format!(
                        "the control socket {} is served by uid {uid}, neither root nor you (uid \
                         {me}), so it is not believed and nothing was sent; if that is a master \
                         you mean to control, run lb as uid {uid}; else remove the socket or pass \
                         --control PATH",
                        path.display()
                    ));
                }
                return Ok((path.clone(), stream));
            }
            Reach::Absent(e) => last = Some(e),
            Reach::Denied => {
                refused.get_or_insert(path);
            }
            Reach::Failed(e) => {
                return Err(format!(
                    "cannot connect to control socket {}: {e}",
                    path.display()
                ));
            }
        }
    }
    if let Some(path) = refused {
        return Err(denied(path, me));
    }
    Err(match (paths, last) {
        ([one], Some(e)) => format!(
            "no lb master answers on {} ({e}); start one, or pass --control PATH",
            one.display()
        ),
        _ => format!(
            "no lb master answers on any of {}; start one, or pass --control PATH (or --listen \
             for another port)",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

/// Sends one request to the first master of `paths` that answers (see
/// `connect`) and returns its answer, or a one-line reason.
pub fn call(paths: &[PathBuf], request: &Request) -> Result<Response, String> {
    let (path, stream) = connect(paths)?;
    let path = path.display();
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
        .map_err(|e| format!("cannot talk to the master on {path}: {e}"))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| format!("no answer from the master on {path}: {e}"))?;
    if line.is_empty() {
        return Err(format!(
            "the master on {path} closed the connection without an answer"
        ));
    }
    serde_json::from_str(line.trim())
        .map_err(|e| format!("unreadable answer from the master on {path}: {e}"))
}

/// The worker pids a master runs now.
pub fn worker_pids(paths: &[PathBuf]) -> Result<Vec<u32>, String> {
    let status = call(paths, &Request::Status)?
        .status
        .ok_or("the master sent no status")?;
    Ok(status.workers.iter().filter_map(|w| w.pid).collect())
}

/// Waits until none of `pids` (the workers a reload replaced) is running
/// (`lb reload --wait`). The master kills a worker still draining at its
/// `drain_timeout`, so this ends; a status the master is slow to answer is
/// asked again.
pub fn wait_gone(paths: &[PathBuf], pids: &[u32]) -> Result<(), String> {
    let mut failures = 0;
    loop {
        match worker_pids(paths) {
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
