//! The control socket: `lb status`, `lb stop` and `lb send` talk to a running
//! master through a Unix socket (mode 0600; only root or the master's own
//! uid is served, checked with SO_PEERCRED). One JSON line each way.
//!
//! The socket has a thread of its own, which never blocks on a client: it
//! accepts and reads request lines without blocking (mio), gives each
//! client `REQUEST_DEADLINE` to send its line and keeps at most
//! `MAX_WAITING` waiting (the one that waited longest goes first), then
//! hands each request to a short-lived thread of its own (at most
//! `MAX_ANSWERING` at once) that passes it to the supervisor and writes the
//! answer. So an idle or slow client costs an fd for two seconds, a reload's
//! client waits for its answer without holding anyone up, and nothing a
//! client does reaches the supervisor but a request. Never does anything the
//! supervisor does not expose.

mod answer;
pub mod client;
mod clients;
mod exposition;
mod http;
pub mod metrics;
pub mod path;
mod prometheus;
mod wire;

pub use wire::{Health, PoolStatus, ProcessStatus, Request, Response, Status, WorkerStatus};

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use mio::unix::SourceFd;
use mio::{Interest, Poll, Waker};

use clients::{Answering, Clients, LISTENER, answer_on_thread};

/// Longest request accepted.
const MAX_REQUEST: usize = 64 * 1024;
/// How long a client has, from its connection, to send its request line.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Clients connected and not done sending their request, at most; one more
/// drops the one that waited longest.
const MAX_WAITING: usize = 128;
/// Requests passed to the supervisor and not yet answered, at most; one
/// more is answered that the master is busy. (The supervisor answers all
/// but a reload at once, and refuses a second reload.)
const MAX_ANSWERING: usize = 16;
/// How long a client may take to read the answer, and how long the
/// supervisor may take to answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a reload may take before its client stops waiting (the reload
/// itself goes on).
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Whether a peer with `peer_uid` may control a master running as `own_uid`
/// (and, the other way round, whether a client of `own_uid` may believe a
/// server of `peer_uid`).
pub fn allowed(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == own_uid
}

/// The uid of the process at the other end of `stream` (SO_PEERCRED).
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(cred.uid())
}

/// A request from a client, and where the supervisor's answer goes.
pub struct Incoming {
    pub request: Request,
    pub reply: Sender<crate::supervisor::Answer>,
}

/// How long a stopping master waits for answers still being written (the
/// answer to `lb stop` itself, above all).
const FINISH_TIMEOUT: Duration = Duration::from_secs(1);

/// The bound socket; when dropped, lets answers in flight be written, then
/// removes its file.
pub struct Server {
    path: PathBuf,
    answering: Answering,
    /// A copy of the listening socket, for an upgrade's next image.
    listener: Option<std::os::fd::OwnedFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "another lb master is already running with control socket {0}; stop it or pass --control"
    )]
    InUse(PathBuf),
    #[error(
        "the control socket {path} is served by uid {uid}, neither root nor this uid ({own}): \
         not an lb master of yours; remove it (as root) or pass --control"
    )]
    Foreign { path: PathBuf, uid: u32, own: u32 },
    #[error(
        "{path} exists and is not a socket; pass --control with the path of a new socket, or \
         remove it"
    )]
    NotASocket { path: PathBuf },
    #[error(
        "a stale control socket {path} belongs to uid {uid}, not to uid {own}; remove it (as \
         root) or pass --control"
    )]
    StaleForeign { path: PathBuf, uid: u32, own: u32 },
    #[error("cannot create control socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    /// The default directory is missing and cannot be made, or is not safe.
    #[error("{0}")]
    Dir(String),
}

/// What is at `path` before a master binds it: nothing, or a stale socket
/// of `own_uid`'s (removed); anything else is an error.
fn clear(path: &Path, own_uid: u32) -> Result<(), ControlError> {
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ControlError::Bind {
                path: path.to_path_buf(),
                source,
            });
        }
        Ok(m) => m,
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(stream) => match peer_uid(&stream) {
            Ok(uid) if allowed(uid, own_uid) => Err(ControlError::InUse(path.to_path_buf())),
            Ok(uid) => Err(ControlError::Foreign {
                path: path.to_path_buf(),
                uid,
                own: own_uid,
            }),
            Err(source) => Err(ControlError::Bind {
                path: path.to_path_buf(),
                source,
            }),
        },
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            // Nobody listens: a dead master's. Ours to replace if ours.
            if meta.uid() != own_uid {
                return Err(ControlError::StaleForeign {
                    path: path.to_path_buf(),
                    uid: meta.uid(),
                    own: own_uid,
                });
            }
            std::fs::remove_file(path).map_err(|source| ControlError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(ControlError::Bind {
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl Server {
    /// Binds `path` (replacing a stale socket left by a dead master of this
    /// uid) and serves it on a thread; requests go to `requests`, then
    /// `waker` wakes the supervisor.
    pub fn start(
        path: &Path,
        requests: Sender<Incoming>,
        waker: Arc<Waker>,
    ) -> Result<Server, ControlError> {
        let own_uid = nix::unistd::getuid().as_raw();
        clear(path, own_uid)?;
        let bind_err = |source| ControlError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        Server::serve(path, listener, requests, waker)
    }

    /// Serves the socket an earlier image of this master bound at `path`
    /// (`lb upgrade`): clients that connected meanwhile are queued on it.
    pub fn adopt(
        path: &Path,
        listener: std::os::fd::OwnedFd,
        requests: Sender<Incoming>,
        waker: Arc<Waker>,
    ) -> Result<Server, ControlError> {
        Server::serve(path, UnixListener::from(listener), requests, waker)
    }

    fn serve(
        path: &Path,
        listener: UnixListener,
        requests: Sender<Incoming>,
        waker: Arc<Waker>,
    ) -> Result<Server, ControlError> {
        let own_uid = nix::unistd::getuid().as_raw();
        let bind_err = |source| ControlError::Bind {
            path: path.to_path_buf(),
            source,
        };
        listener.set_nonblocking(true).map_err(bind_err)?;
        let copy = std::os::fd::OwnedFd::from(listener.try_clone().map_err(bind_err)?);
        let poll = Poll::new().map_err(bind_err)?;
        poll.registry()
            .register(
                &mut SourceFd(&listener.as_raw_fd()),
                LISTENER,
                Interest::READABLE,
            )
            .map_err(bind_err)?;
        let answering = Answering::default();
        let mut lp = Loop {
            poll,
            listener,
            own_uid,
            waiting: Clients::new(REQUEST_DEADLINE, MAX_WAITING),
            requests,
            waker,
            answering: answering.clone(),
        };
        std::thread::Builder::new()
            .name("lb-control".into())
            .spawn(move || clients::run(&mut lp))
            .map_err(bind_err)?;
        Ok(Server {
            path: path.to_path_buf(),
            answering,
            listener: Some(copy),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `lb upgrade`: lets answers in flight be written (the upgrade's own
    /// above all), then gives up the socket, its file left in place for
    /// the next image.
    pub fn hand_over(mut self) -> Option<std::os::fd::OwnedFd> {
        self.finish();
        let listener = self.listener.take();
        self.path = PathBuf::new();
        listener
    }

    fn finish(&self) {
        let deadline = Instant::now() + FINISH_TIMEOUT;
        while self.answering.running() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.finish();
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The control thread: accepts, reads request lines, hands them on.
struct Loop {
    poll: Poll,
    listener: UnixListener,
    own_uid: u32,
    waiting: Clients<UnixStream>,
    requests: Sender<Incoming>,
    waker: Arc<Waker>,
    answering: Answering,
}

/// How far a client's request line has come.
enum Progress {
    More,
    Line(Vec<u8>),
    TooLong,
    Gone,
}

impl clients::Serve for Loop {
    type Stream = UnixStream;

    fn poll(&mut self) -> &mut Poll {
        &mut self.poll
    }

    fn clients(&mut self) -> &mut Clients<UnixStream> {
        &mut self.waiting
    }

    fn accept(&self) -> io::Result<UnixStream> {
        self.listener.accept().map(|(s, _)| s)
    }

    /// A new client: checked, then read from at once (it has most likely
    /// sent its line already), then left to wait for the rest.
    fn admit(&mut self, stream: UnixStream) {
        match peer_uid(&stream) {
            Ok(uid) if allowed(uid, self.own_uid) => {}
            Ok(uid) => {
                return reply_now(
                    &stream,
                    Response::error(format!(
                        "uid {uid} may not control this master (only root and uid {})",
                        self.own_uid
                    )),
                );
            }
            Err(_) => return,
        }
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let (token, evicted) = self.waiting.add(self.poll.registry(), stream);
        if let Some(oldest) = evicted {
            reply_now(
                &oldest.stream,
                Response::error(format!(
                    "{MAX_WAITING} control clients were connected without sending a request; \
                     the one that waited longest (this one) was dropped"
                )),
            );
        }
        if let Some(token) = token {
            self.progress(token);
        }
    }

    /// Reads what `token`'s client sent; a whole line is handed on.
    fn progress(&mut self, token: usize) {
        let Some(w) = self.waiting.get_mut(token) else {
            return;
        };
        let progress = read_request(&w.stream, &mut w.buf);
        if matches!(progress, Progress::More) {
            return;
        }
        let Some(w) = self.waiting.take(self.poll.registry(), token) else {
            return;
        };
        match progress {
            Progress::More | Progress::Gone => {}
            Progress::TooLong => reply_now(
                &w.stream,
                Response::error(format!(
                    "bad request: longer than {MAX_REQUEST} bytes without a newline; send one \
                     JSON line such as {{\"cmd\":\"status\"}}"
                )),
            ),
            Progress::Line(line) => match parse(&line) {
                Err(why) => reply_now(&w.stream, Response::error(why)),
                Ok(request) => self.answer(w.stream, request),
            },
        }
    }

    /// Drops the clients whose deadline has passed, telling them why.
    fn expire(&mut self) {
        for w in self.waiting.expired(self.poll.registry(), Instant::now()) {
            reply_now(
                &w.stream,
                Response::error(format!(
                    "no request within {}s; send one JSON line such as {{\"cmd\":\"status\"}}",
                    REQUEST_DEADLINE.as_secs()
                )),
            );
        }
    }

    fn lost(&self, e: &io::Error) {
        crate::info!(
            "control socket: epoll failed ({e}); lb status and stop no longer work, SIGTERM does"
        );
    }
}

impl Loop {
    /// Passes `request` to the supervisor on a thread of its own, which
    /// writes the answer.
    fn answer(&self, stream: UnixStream, request: Request) {
        let Some(place) = self.answering.claim(MAX_ANSWERING) else {
            return reply_now(
                &stream,
                Response::error(format!(
                    "the master is answering {MAX_ANSWERING} control requests already; try again"
                )),
            );
        };
        let requests = self.requests.clone();
        let waker = Arc::clone(&self.waker);
        answer_on_thread("lb-control-answer", place, move || {
            let _ = answer(stream, request, &requests, &waker);
        });
    }
}

/// Reads what is there without blocking, up to the first newline (a
/// request is one line; EOF ends one too).
fn read_request(mut stream: &UnixStream, buf: &mut Vec<u8>) -> Progress {
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Progress::Gone,
            Ok(0) => return Progress::Line(std::mem::take(buf)),
            Ok(n) => {
                if let Some(i) = chunk[..n].iter().position(|&b| b == b'\n') {
                    buf.extend_from_slice(&chunk[..i]);
                    return Progress::Line(std::mem::take(buf));
                }
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > MAX_REQUEST {
                    return Progress::TooLong;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::More,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Progress::Gone,
        }
    }
}

/// A request line, or the one-line reason it is not one.
fn parse(line: &[u8]) -> Result<Request, String> {
    const HINT: &str = "send one JSON line such as {\"cmd\":\"status\"}";
    let text = std::str::from_utf8(line).map_err(|e| {
        format!(
            "bad request: not UTF-8 (at byte {}); {HINT}",
            e.valid_up_to()
        )
    })?;
    serde_json::from_str(text.trim()).map_err(|e| format!("bad request: {e}; {HINT}"))
}

/// One line to a client the loop is done with, without waiting: nothing was
/// written to it before, so a short answer fits in the socket's buffer; if
/// not, or if the client is gone, it goes unsaid.
fn reply_now(stream: &UnixStream, answer: Response) {
    let Ok(mut text) = serde_json::to_string(&answer) else {
        return;
    };
    text.push('\n');
    let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL;
    let _ = nix::sys::socket::send(stream.as_raw_fd(), text.as_bytes(), flags);
}

/// On an answering thread: ask the supervisor, wait (long, for a reload),
/// write the answer.
fn answer(
    stream: UnixStream,
    request: Request,
    requests: &Sender<Incoming>,
    waker: &Waker,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let wait = if request.answered_when_done() {
        RELOAD_TIMEOUT
    } else {
        IO_TIMEOUT
    };
    let (reply, answer) = crossbeam_channel::bounded(1);
    let _ = requests.send(Incoming { request, reply });
    let _ = waker.wake();
    let answer = answer
        .recv_timeout(wait)
        .map(Response::from)
        .unwrap_or_else(|e| {
            Response::error(match e {
                crossbeam_channel::RecvTimeoutError::Timeout => {
                    format!("the master did not answer within {}s", wait.as_secs())
                }
                crossbeam_channel::RecvTimeoutError::Disconnected => {
                    "the master stopped before answering".into()
                }
            })
        });
    let mut text = serde_json::to_string(&answer).map_err(io::Error::other)?;
    text.push('\n');
    (&stream).write_all(text.as_bytes())
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
    fn a_request_is_one_utf8_json_line() {
        assert_eq!(parse(b"{\"cmd\":\"status\"}\r"), Ok(Request::Status));
        let e = parse(b"{\"cmd\":\"st\xffatus\"}").unwrap_err();
        assert!(e.contains("not UTF-8 (at byte 10)"), "{e}");
        let e = parse(b"status").unwrap_err();
        assert!(e.starts_with("bad request") && e.contains("cmd"), "{e}");
    }
}
