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

/// Why a control subcommand got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the master re-executed but its new image did not answer within 30 s; see its log \
         (lb status tells whether it runs)"
    )]
    NotUpgraded,
    #[error("cannot tell who serves {}: {source}", .path.display())]
    Identify { path: PathBuf, source: io::Error },
    #[error(
        "the control socket {} is served by uid {uid}, neither root nor you (uid {me}), so it is \
         not believed and nothing was sent; if that is a master you mean to control, run lb as \
         uid {uid}; else remove the socket or pass --control PATH",
        .path.display()
    )]
    Foreign { path: PathBuf, uid: u32, me: u32 },
    #[error(
        "permission denied on control socket {} (it belongs to uid {uid}, mode {mode:o}, and you \
         are uid {me}); run lb as uid {uid} or as root, or pass --control PATH",
        .path.display()
    )]
    Denied {
        path: PathBuf,
        uid: u32,
        mode: u32,
        me: u32,
    },
    #[error(
        "permission denied on control socket {} (you, uid {me}, may not open it or its \
         directory); run lb as the master's user or as root, or pass --control PATH",
        .path.display()
    )]
    DeniedDir { path: PathBuf, me: u32 },
    #[error("cannot connect to control socket {}: {source}", .path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error(
        "no lb master answers on {} ({source}); start one, or pass --control PATH",
        .path.display()
    )]
    NotRunning { path: PathBuf, source: io::Error },
    #[error(
        "no lb master answers on any of {}; start one, or pass --control PATH (or --listen for \
         another port)",
        list(.paths)
    )]
    NoneRunning { paths: Vec<PathBuf> },
    #[error("{0}")]
    Encode(serde_json::Error),
    #[error("cannot talk to the master on {}: {source}", .path.display())]
    Send { path: PathBuf, source: io::Error },
    #[error("no answer from the master on {}: {source}", .path.display())]
    Receive { path: PathBuf, source: io::Error },
    #[error("the master on {} closed the connection without an answer", .path.display())]
    Hangup { path: PathBuf },
    #[error("unreadable answer from the master on {}: {source}", .path.display())]
    Unreadable {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the master sent no status")]
    NoStatus,
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

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

/// Why a socket this uid may not open cannot be opened.
fn denied(path: &Path, me: u32) -> ClientError {
    let path = path.to_path_buf();
    match std::fs::metadata(&path) {
        Ok(m) => ClientError::Denied {
            uid: m.uid(),
            mode: m.mode() & 0o777,
            me,
            path,
        },
        Err(_) => ClientError::DeniedDir { path, me },
    }
}

/// Connects to the first of `paths` that answers and runs as root or as
/// this uid; (its path, the stream), or why none.
pub fn connect(paths: &[PathBuf]) -> Result<(PathBuf, UnixStream), ClientError> {
    let me = nix::unistd::getuid().as_raw();
    let mut refused: Option<&Path> = None;
    let mut last = None;
    for path in paths {
        match reach(path) {
            Reach::Connected(stream) => {
                let uid = super::peer_uid(&stream).map_err(|source| ClientError::Identify {
                    path: path.clone(),
                    source,
                })?;
                if !super::allowed(uid, me) {
                    return Err(ClientError::Foreign {
                        path: path.clone(),
                        uid,
                        me,
                    });
                }
                return Ok((path.clone(), stream));
            }
            Reach::Absent(e) => last = Some(e),
            Reach::Denied => {
                refused.get_or_insert(path);
            }
            Reach::Failed(source) => {
                return Err(ClientError::Connect {
                    path: path.clone(),
                    source,
                });
            }
        }
    }
    if let Some(path) = refused {
        return Err(denied(path, me));
    }
    Err(match (paths, last) {
        ([one], Some(source)) => ClientError::NotRunning {
            path: one.clone(),
            source,
        },
        _ => ClientError::NoneRunning {
            paths: paths.to_vec(),
        },
    })
}

/// Sends one request to the first master of `paths` that answers (see
/// `connect`) and returns its answer, or why not.
pub fn call(paths: &[PathBuf], request: &Request) -> Result<Response, ClientError> {
    let (path, stream) = connect(paths)?;
    let timeout = Duration::from_secs(10);
    let read_timeout = if request.answered_when_done() {
        super::RELOAD_TIMEOUT + timeout
    } else {
        timeout
    };
    let _ = stream.set_read_timeout(Some(read_timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let mut text = serde_json::to_string(request).map_err(ClientError::Encode)?;
    text.push('\n');
    (&stream)
        .write_all(text.as_bytes())
        .map_err(|source| ClientError::Send {
            path: path.clone(),
            source,
        })?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|source| ClientError::Receive {
            path: path.clone(),
            source,
        })?;
    if line.is_empty() {
        return Err(ClientError::Hangup { path });
    }
    serde_json::from_str(line.trim()).map_err(|source| ClientError::Unreadable { path, source })
}

/// The worker pids a master runs now.
pub fn worker_pids(paths: &[PathBuf]) -> Result<Vec<u32>, ClientError> {
    let status = call(paths, &Request::Status)?
        .status
        .ok_or(ClientError::NoStatus)?;
    Ok(status.workers.iter().filter_map(|w| w.pid).collect())
}

/// Waits until none of `pids` (the workers a reload replaced) is running
/// (`lb reload --wait`). The master kills a worker still draining at its
/// `drain_timeout`, so this ends; a status the master is slow to answer is
/// asked again.
pub fn wait_gone(paths: &[PathBuf], pids: &[u32]) -> Result<(), ClientError> {
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

/// After `lb upgrade` was answered: waits until the master answers again
/// with more than `before` upgrades (its new image runs), up to 30 s.
pub fn wait_upgraded(paths: &[PathBuf], before: u64) -> Result<Status, ClientError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match call(paths, &Request::Status) {
            Ok(r) => {
                if let Some(s) = r.status.filter(|s| s.upgrades > before) {
                    return Ok(s);
                }
            }
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => {}
        }
        if std::time::Instant::now() >= deadline {
            return Err(ClientError::NotUpgraded);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `lb status` as a table, like `pm2 ls`.
pub fn render(s: &Status) -> String {
    let ready = s.workers.iter().filter(|w| w.state == "ready").count();
    let mut out = format!(
        "lb pid {}  listening on {}  policy {}{}  up {}{}\nconnections: {} accepted, {} dispatched, {} rescued\nready: {} of {} workers (min_ready {}){}\n\n",
        s.pid,
        s.listen,
        s.policy,
        if s.dispatch == "kernel" {
            " (kernel dispatch)"
        } else {
            ""
        },
        human(s.uptime_s),
        match s.upgrades {
            0 => String::new(),
            1 => "  upgraded once".to_string(),
            n => format!("  upgraded {n} times"),
        } + if s.stopping { "  STOPPING" } else { "" },
        s.accepted,
        s.dispatched,
        s.rescued,
        ready,
        s.pools.iter().map(|p| p.count).sum::<usize>(),
        s.min_ready,
        pools_line(s)
    );
    if s.listeners.len() > 1 {
        for l in &s.listeners {
            out += &match l.accepted {
                Some(n) => format!("listener {}: {n} accepted\n", l.address),
                None => format!("listener {}\n", l.address),
            };
        }
        out.push('\n');
    }
    // As wide as the longest pool name (names are the user's).
    let pool_width = s
        .workers
        .iter()
        .map(|w| w.pool.chars().count())
        .chain([4])
        .max()
        .unwrap_or(4);
    out += &format!(
        "{:>4}  {:<pool_width$}  {:>8}  {:>3}  {:<10}  {:>7}  {:>8}  {:>6}  {:>9}  {:>5}  {:>8}\n",
        "slot",
        "pool",
        "pid",
        "gen",
        "state",
        "uptime",
        "restarts",
        "active",
        "total",
        "cpu%",
        "rss"
    );
    for w in &s.workers {
        out += &format!(
            "{:>4}  {:<pool_width$}  {:>8}  {:>3}  {:<10}  {:>7}  {:>8}  {:>6}  {:>9}  {:>5.1}  {:>8}\n",
            w.slot,
            w.pool,
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

/// With several pools, each one's slots, mode and weight: `; pools: web
/// 3×native weight 3, canary 1×native weight 1`.
fn pools_line(s: &Status) -> String {
    if s.pools.len() < 2 {
        return String::new();
    }
    let pools: Vec<String> = s
        .pools
        .iter()
        .map(|p| format!("{} {}×{} weight {}", p.name, p.count, p.mode, p.weight))
        .collect();
    format!("; pools: {}", pools.join(", "))
}

/// An uptime in its largest whole unit, as `ps` and `pm2 ls` show it: a
/// table column wants `3h`, not `humantime`'s exact `3h 2m 5s 120ms`.
fn human(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Memory in binary units with one decimal, short enough for the column
/// (`bytesize` spells `3.0 MiB`, wider, and adds a crate for one line).
fn bytes(b: u64) -> String {
    const K: u64 = 1 << 10;
    match b {
        0..K => format!("{b}B"),
        K..0x10_0000 => format!("{:.1}K", b as f64 / K as f64),
        0x10_0000..0x4000_0000 => format!("{:.1}M", b as f64 / (1u64 << 20) as f64),
        _ => format!("{:.1}G", b as f64 / (1u64 << 30) as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{PoolStatus, WorkerStatus};

    #[test]
    fn table_has_a_row_per_worker() {
        let s = Status {
            pid: 10,
            listen: "127.0.0.1:8000".into(),
            policy: "round-robin".into(),
            min_ready: 1,
            pools: vec![
                PoolStatus {
                    name: "web".into(),
                    mode: "native".into(),
                    count: 1,
                    weight: 3,
                },
                PoolStatus {
                    name: "canary-v2".into(),
                    mode: "proxy".into(),
                    count: 1,
                    weight: 1,
                },
            ],
            workers: vec![
                WorkerStatus {
                    slot: 0,
                    pool: "web".into(),
                    pid: Some(11),
                    state: "ready".into(),
                    rss_bytes: 3 << 20,
                    ..WorkerStatus::default()
                },
                WorkerStatus {
                    slot: 1,
                    pool: "canary-v2".into(),
                    state: "restarting".into(),
                    ..WorkerStatus::default()
                },
            ],
            ..Status::default()
        };
        let t = render(&s);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4 + 1 + 2, "{t}");
        assert!(t.contains("3.0M") && t.contains("restarting"));
        assert_eq!(
            lines[2],
            "ready: 1 of 2 workers (min_ready 1); pools: web 1×native weight 3, canary-v2 \
             1×proxy weight 1"
        );
        // The pool column, as wide as the longest name, lines up.
        assert!(lines[4].starts_with("slot  pool       "), "{t}");
        assert!(lines[5].starts_with("   0  web        "), "{t}");
        assert!(lines[6].starts_with("   1  canary-v2  "), "{t}");
        let pid_end = lines[4].find("pid").unwrap() + 3;
        assert!(lines[5][..pid_end].ends_with(" 11"), "{t}");
        assert!(lines[6][..pid_end].ends_with(" -"), "{t}");
        assert!(!t.contains("STOPPING"));
        let stopping = Status {
            stopping: true,
            ..s
        };
        assert!(
            render(&stopping)
                .lines()
                .next()
                .unwrap()
                .ends_with("  STOPPING")
        );
    }

    #[test]
    fn why_no_answer_reads_as_one_line() {
        let p = PathBuf::from;
        assert_eq!(
            ClientError::Foreign {
                path: p("/run/lb.sock"),
                uid: 7,
                me: 1000
            }
            .to_string(),
            "the control socket /run/lb.sock is served by uid 7, neither root nor you (uid 1000), \
             so it is not believed and nothing was sent; if that is a master you mean to control, \
             run lb as uid 7; else remove the socket or pass --control PATH"
        );
        assert_eq!(
            ClientError::Denied {
                path: p("/run/lb.sock"),
                uid: 7,
                mode: 0o600,
                me: 1000
            }
            .to_string(),
            "permission denied on control socket /run/lb.sock (it belongs to uid 7, mode 600, and \
             you are uid 1000); run lb as uid 7 or as root, or pass --control PATH"
        );
        assert_eq!(
            ClientError::NoneRunning {
                paths: vec![p("/a"), p("/b")]
            }
            .to_string(),
            "no lb master answers on any of /a, /b; start one, or pass --control PATH (or \
             --listen for another port)"
        );
        let missing = std::env::temp_dir().join(format!("lb-client-none-{}", std::process::id()));
        let e = connect(std::slice::from_ref(&missing)).unwrap_err();
        assert!(matches!(e, ClientError::NotRunning { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "no lb master answers on {} ({}); start one, or pass --control PATH",
                missing.display(),
                io::Error::from_raw_os_error(libc::ENOENT)
            )
        );
        let e = connect(&[missing.clone(), missing.join("x")]).unwrap_err();
        assert!(matches!(e, ClientError::NoneRunning { ref paths } if paths.len() == 2));
    }

    #[test]
    fn uptimes_and_memory_fit_their_columns() {
        assert_eq!(human(59.9), "59s");
        assert_eq!(human(61.0), "1m");
        assert_eq!(human(7200.0), "2h");
        assert_eq!(human(3.0 * 86400.0), "3d");
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(1536), "1.5K");
        assert_eq!(bytes(3 << 20), "3.0M");
        assert_eq!(bytes(5 << 30), "5.0G", "not 5120.0M");
    }
}
