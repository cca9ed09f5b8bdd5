//! The control socket: `lb status`, `lb stop` and `lb send` talk to a running
//! master through a Unix socket (mode 0600; only root or the master's own
//! uid is served, checked with SO_PEERCRED). One JSON line each way.
//!
//! The socket lives on a thread of its own, which reads and writes with
//! timeouts and hands each request to the supervisor; a slow or hostile
//! client can never stall supervision. Never does anything the supervisor
//! does not expose.

pub mod client;
pub mod metrics;
mod wire;

pub use wire::{Request, Response, Status, WorkerStatus};

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use mio::Waker;

/// Longest request accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client may take to send its request or read the answer, and
/// how long the supervisor may take to answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a reload may take before its client stops waiting (the reload
/// itself goes on).
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Where a master listening on `port` keeps its control socket unless told
/// otherwise: `$XDG_RUNTIME_DIR/lb-<port>.sock`, else `/tmp/lb-<port>.sock`.
pub fn default_path(port: u16) -> PathBuf {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    dir.join(format!("lb-{port}.sock"))
}

/// Whether a peer with `peer_uid` may control a master running as `own_uid`.
pub fn allowed(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == own_uid
}

/// A request from a client, and where the supervisor's answer goes.
pub struct Incoming {
    pub request: Request,
    pub reply: Sender<Response>,
}

/// How long a stopping master waits for answers still being written (the
/// answer to `lb stop` itself, above all).
const FINISH_TIMEOUT: Duration = Duration::from_secs(1);

/// The bound socket; when dropped, lets answers in flight be written, then
/// removes its file.
pub struct Server {
    path: PathBuf,
    in_flight: Arc<AtomicUsize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "another lb master is already running with control socket {0}; stop it or pass --control"
    )]
    InUse(PathBuf),
    #[error("cannot create control socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
}

impl Server {
    /// Binds `path` (replacing a stale socket left by a dead master) and
    /// serves it on a thread; requests go to `requests`, then `waker` wakes
    /// the supervisor.
    pub fn start(
        path: &Path,
        requests: Sender<Incoming>,
        waker: Arc<Waker>,
    ) -> Result<Server, ControlError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let bind_err = |source| ControlError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        let own_uid = nix::unistd::getuid().as_raw();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&in_flight);
        std::thread::Builder::new()
            .name("lb-control".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let _ = serve(stream, own_uid, &requests, &waker);
                    counter.fetch_sub(1, Ordering::SeqCst);
                }
            })
            .map_err(bind_err)?;
        Ok(Server {
            path: path.to_path_buf(),
            in_flight,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let deadline = Instant::now() + FINISH_TIMEOUT;
        while self.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One client: check who it is, read one line, pass it on, write the answer.
fn serve(
    stream: UnixStream,
    own_uid: u32,
    requests: &Sender<Incoming>,
    waker: &Waker,
) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)?;
    let mut writer = stream.try_clone()?;
    let answer = if !allowed(peer.uid(), own_uid) {
        Response::error(format!(
            "uid {} may not control this master (only root and uid {own_uid})",
            peer.uid()
        ))
    } else {
        let mut line = String::new();
        BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
        match serde_json::from_str::<Request>(line.trim()) {
            Err(e) => Response::error(format!("bad request: {e}")),
            Ok(request) => {
                let wait = if request == Request::Reload {
                    RELOAD_TIMEOUT
                } else {
                    IO_TIMEOUT
                };
                let (reply, answer) = crossbeam_channel::bounded(1);
                let _ = requests.send(Incoming { request, reply });
                let _ = waker.wake();
                answer
                    .recv_timeout(wait)
                    .unwrap_or_else(|_| Response::error("the master did not answer in time".into()))
            }
        }
    };
    let mut text = serde_json::to_string(&answer).map_err(io::Error::other)?;
    text.push('\n');
    writer.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_and_the_owner_may_control() {
        assert!(allowed(0, 1000));
        assert!(allowed(1000, 1000));
        assert!(!allowed(1001, 1000));
    }

    #[test]
    fn default_path_names_the_port() {
        assert!(
            default_path(8000)
                .to_string_lossy()
                .ends_with("lb-8000.sock")
        );
    }
}
