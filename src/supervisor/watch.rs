//! `--watch PATHS`: a rolling reload when files under them change (PM2's
//! `--watch`, gunicorn's `--reload`). inotify (through `notify`) reports
//! changes on its own thread; a thread of ours waits for them to go quiet
//! and then asks the supervisor for a reload the way `lb reload` does (a
//! control request and a wake), so the supervisor never waits on it.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use mio::Waker;
use notify::{EventKind, RecursiveMode, Watcher};

use crate::control::{Incoming, Request};
use crate::info;
use crate::supervisor::Answer;

/// A burst of changes (a `git checkout`, an editor's save, a build) makes
/// one reload once nothing changed for this long.
pub const QUIET: Duration = Duration::from_millis(500);
/// Files that never stop changing (a log nobody told lb to ignore) still
/// reload this often at most, rather than never.
const MOST_DELAY: Duration = Duration::from_secs(5);

/// Watching: dropping it stops the watch (its thread then ends).
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
}

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {reason}")]
pub struct WatchError {
    pub path: String,
    pub reason: String,
}

/// What is watched and what is not.
struct Filter {
    roots: Vec<PathBuf>,
    /// lb's own files (its log, the worker log, the control socket).
    own: Vec<PathBuf>,
    /// Directories lb writes files of its own in (a worker log pattern's).
    own_dirs: Vec<PathBuf>,
}

impl Filter {
    /// Whether a change to `path` calls for a reload.
    fn relevant(&self, path: &Path) -> bool {
        if self.own.iter().any(|o| o == path) || self.own_dirs.iter().any(|d| path.starts_with(d)) {
            return false;
        }
        // Only what is below the watched path counts (a watched directory
        // may itself be under a dot-directory: ~/.config/app).
        let below = self
            .roots
            .iter()
            .filter_map(|r| path.strip_prefix(r).ok())
            .min_by_key(|rest| rest.components().count());
        let Some(below) = below else {
            return true;
        };
        let ignored_dir = |c: &str| c.starts_with('.') || c == "node_modules" || c == "__pycache__";
        if below.components().any(|c| match c {
            Component::Normal(c) => c.to_str().is_some_and(ignored_dir),
            _ => false,
        }) {
            return false;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        // Compiled Python (written by the workers themselves as they
        // start), logs and their rotations, editors' backups and vim's
        // probe file.
        let noise = name.ends_with(".pyc")
            || name.ends_with(".pyo")
            || name.ends_with(".log")
            || name.contains(".log.")
            || name.ends_with('~')
            || name == "4913";
        !noise
    }
}

/// Starts watching `paths` (recursively), asking `requests` for a reload
/// when they change; `own` are lb's files and `own_dirs` directories it
/// writes its own files in, never a reason to reload.
pub fn start(
    paths: &[PathBuf],
    own: Vec<PathBuf>,
    own_dirs: Vec<PathBuf>,
    requests: Sender<Incoming>,
    waker: Arc<Waker>,
) -> Result<Option<Watch>, WatchError> {
    if paths.is_empty() {
        return Ok(None);
    }
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let filter = Filter {
        roots: paths.iter().map(|p| absolute(p)).collect(),
        own: own.iter().map(|p| absolute(p)).collect(),
        own_dirs: own_dirs.iter().map(|p| absolute(p)).collect(),
    };
    let roots = filter.roots.clone();
    // One slot: a change waiting to be seen is all the debounce needs to
    // know, so a flood of events costs nothing and loses nothing.
    let (changed, changes) = crossbeam_channel::bounded::<PathBuf>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else {
            // (An overflowed inotify queue: something changed.)
            let _ = changed.try_send(PathBuf::new());
            return;
        };
        if matches!(event.kind, EventKind::Access(_) | EventKind::Other) {
            return;
        }
        if let Some(path) = event.paths.into_iter().find(|p| filter.relevant(p)) {
            let _ = changed.try_send(path);
        }
    })
    .map_err(|e| WatchError {
        path: paths[0].display().to_string(),
        reason: reason(&e),
    })?;
    for (given, root) in paths.iter().zip(&roots) {
        watcher
            .watch(root, RecursiveMode::Recursive)
            .map_err(|e| WatchError {
                path: given.display().to_string(),
                reason: reason(&e),
            })?;
    }
    std::thread::Builder::new()
        .name("lb-watch".into())
        .spawn(move || debounce(changes, requests, waker))
        .map_err(|e| WatchError {
            path: paths[0].display().to_string(),
            reason: format!("cannot start its thread: {e}"),
        })?;
    info!(
        "watching {} for changes (a rolling reload after {} ms quiet)",
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        QUIET.as_millis()
    );
    Ok(Some(Watch { _watcher: watcher }))
}

/// The fix for what `notify` said, where there is one.
fn reason(e: &notify::Error) -> String {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => {
            format!("{e}; raise fs.inotify.max_user_watches (sysctl) or watch fewer directories")
        }
        notify::ErrorKind::PathNotFound => format!("{e}; give paths that exist"),
        _ => e.to_string(),
    }
}

/// Waits for a change, then for quiet, then asks for one reload and
/// waits for its answer (changes meanwhile make one more reload after it);
/// ends when the watcher or the supervisor is gone.
fn debounce(changes: Receiver<PathBuf>, requests: Sender<Incoming>, waker: Arc<Waker>) {
    let mut pending = None;
    loop {
        let first = match pending.take() {
            Some(path) => path,
            None => match changes.recv() {
                Ok(path) => path,
                Err(_) => return,
            },
        };
        let started = Instant::now();
        loop {
            let left = MOST_DELAY.saturating_sub(started.elapsed());
            match changes.recv_timeout(QUIET.min(left)) {
                Ok(_) if !left.is_zero() => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                _ => break,
            }
        }
        if first.as_os_str().is_empty() {
            info!("watch: changes were reported in bulk; reloading");
        } else {
            info!("watch: {} changed; reloading", first.display());
        }
        let (reply, answer) = crossbeam_channel::bounded::<Answer>(1);
        let asked = Incoming {
            request: Request::Reload,
            reply,
        };
        if requests.send(asked).is_err() {
            return;
        }
        let _ = waker.wake();
        // What changes during the reload may have been missed by workers
        // started before it: one more reload then.
        loop {
            select! {
                recv(answer) -> _ => break,
                recv(changes) -> change => match change {
                    Ok(path) => pending = pending.or(Some(path)),
                    Err(_) => return,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_lb_and_tools_write_is_no_reason_to_reload() {
        let f = Filter {
            roots: vec!["/home/u/.config/app".into(), "/srv/app".into()],
            own: vec!["/srv/app/workers.out".into()],
            own_dirs: vec!["/srv/app/logs".into()],
        };
        for yes in [
            "/srv/app/server.py",
            "/srv/app/lib/x.js",
            "/home/u/.config/app/settings.toml",
            "/srv/app",
        ] {
            assert!(f.relevant(Path::new(yes)), "{yes}");
        }
        for no in [
            "/srv/app/workers.out",
            "/srv/app/logs/web-0.stdout",
            "/srv/app/.git/index",
            "/srv/app/.server.py.swp",
            "/srv/app/node_modules/x/index.js",
            "/srv/app/__pycache__/server.cpython-311.pyc",
            "/srv/app/lib/x.pyc",
            "/srv/app/app.log",
            "/srv/app/app.log.1",
            "/srv/app/server.py~",
            "/srv/app/4913",
            "/home/u/.config/app/.cache/x",
        ] {
            assert!(!f.relevant(Path::new(no)), "{no}");
        }
    }
}
