//! The bundled example worker (`lb hello-worker`, what `lb` runs when given
//! no command): a single-threaded, event-driven HTTP/1.1 server that gets
//! its connections from lb over the native protocol. Every response body is
//! the one line `hello from worker <slot> (pid <pid>)`, or, when lb sent the
//! client's address from a PROXY protocol header with the connection,
//! `hello from worker <slot> to a client from <address> (pid <pid>)`.
//!
//! Under kernel dispatch (`LB_OWN_LISTENER=1`) it accepts them from its own
//! listener instead; `lb::worker` does that behind the same calls (the
//! channel's token covers the listener, `Listener::next` accepts,
//! `next_is_conn` sees what waits in its queue), so nothing here differs.
//!
//! Keep-alive aware; honours `Connection: close` and HTTP/1.0; answers
//! pipelined requests in order. `GET /sleep/<ms>` answers after blocking
//! that long (at most 60 s), like a slow handler in a single-threaded app.
//!
//! On DRAIN it drains so that keep-alive clients do not notice
//! (`docs/protocol.md` §4): every further request is answered with
//! `Connection: close`; after that response it shuts its side and waits
//! (at most the idle grace) for the client's FIN before closing, so a
//! request the client sent meanwhile cannot turn the close into a reset;
//! a connection that makes no progress (no request, no bytes in or out) for
//! the grace since DRAIN or its last activity is closed (a keep-alive
//! client between two requests sends its next one well within it; a
//! stalled client does not hold the drain up). It exits when no
//! connection is left.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::proto::Wait;
use crate::worker::{Incoming, Listener};

const CHANNEL: Token = Token(0);
/// Requests whose head does not fit are refused.
const MAX_HEAD: usize = 16 * 1024;
const MAX_SLEEP_MS: u64 = 60_000;

pub fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb hello-worker: {e}");
            ExitCode::from(2)
        }
    }
}

struct Client {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Close once `output` is flushed.
    close_after: Option<Closing>,
    /// When it arrived or last moved bytes either way: a drain's idle
    /// grace counts from here (or from DRAIN, if later).
    active_at: Instant,
    /// Our side is shut after the last response; waiting for the client's
    /// FIN (discarding what it sends) before closing.
    lingering: bool,
    /// Its own body, naming the client, when lb sent the client's address
    /// (else every connection shares the worker's).
    body: Option<String>,
}

/// Why a connection closes after its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// The client asked (`Connection: close`, HTTP/1.0), or sent garbage.
    Asked,
    /// The worker is draining: the client did not expect it, so close
    /// lingering.
    Draining,
}

fn run() -> anyhow::Result<()> {
    let mut listener = Listener::from_env()?;
    let body = format!(
        "hello from worker {} (pid {})\n",
        listener.slot(),
        std::process::id()
    );
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, CHANNEL, Interest::READABLE)?;
    listener.ready()?;

    let grace = listener.idle_grace();
    let mut w = Worker {
        clients: HashMap::new(),
        next_token: 1,
        drain_at: None,
        // What is open besides connections (stdio, the channel, the poller).
        base_fds: crate::worker::open_files(),
        limit: crate::worker::open_files_limit(),
        paused: false,
        slot: listener.slot(),
    };
    let mut events = Events::with_capacity(256);
    let mut take = true;
    loop {
        if w.drain_at.is_some() && w.clients.is_empty() {
            return Ok(());
        }
        let timeout = w.drain_at.and_then(|at| {
            w.clients
                .values()
                .map(|c| c.expires(at, grace))
                .min()
                .map(|t| t.saturating_duration_since(Instant::now()))
        });
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        for ev in events.iter() {
            if ev.token() == CHANNEL {
                take = true;
            } else {
                let draining = w.drain_at.is_some();
                serve_or_close(
                    &mut poll,
                    &mut w.clients,
                    ev.token(),
                    &body,
                    draining,
                    &listener,
                );
            }
        }
        if let Some(at) = w.drain_at {
            let now = Instant::now();
            let expired: Vec<Token> = w
                .clients
                .iter()
                .filter(|(_, c)| c.expires(at, grace) <= now)
                .map(|(t, _)| *t)
                .collect();
            for t in expired {
                close(&mut poll, &mut w.clients, t, &listener);
            }
        }
        // Paused at the open-files limit: a close may have made room.
        if take || w.paused {
            take = false;
            if !w.take_connections(&mut poll, &mut listener, &body)? {
                return Ok(()); // the master is gone: nothing will supervise us
            }
        }
    }
}

/// The worker's state between events.
struct Worker {
    clients: HashMap<Token, Client>,
    next_token: usize,
    /// When DRAIN came.
    drain_at: Option<Instant>,
    base_fds: u64,
    limit: u64,
    /// Not taking connections: too close to the open-files limit.
    paused: bool,
    slot: usize,
}

impl Worker {
    /// Room for one more connection, keeping `FD_RESERVE` files free.
    fn has_room(&self) -> bool {
        self.base_fds + self.clients.len() as u64 + crate::worker::FD_RESERVE < self.limit
    }

    /// Takes what the master sent until the channel is empty, or until the
    /// open-files limit is near (then stops reading: the master, finding
    /// the channel full, sends to others). False once the master is gone.
    fn take_connections(
        &mut self,
        poll: &mut Poll,
        listener: &mut Listener,
        body: &str,
    ) -> anyhow::Result<bool> {
        loop {
            // At the limit, what is not a connection (DRAIN) is still taken.
            if !self.has_room() && listener.queued() == 0 && listener.next_is_conn()? != Some(false)
            {
                if !self.paused {
                    self.paused = true;
                    eprintln!(
                        "lb hello-worker: {} connections open, near the limit of {} open \
                         files: taking no more until some close",
                        self.clients.len(),
                        self.limit
                    );
                }
                return Ok(true);
            }
            match listener.next(Wait::DontWait) {
                Ok(Incoming::Conn(stream)) => {
                    let client = listener.last_client_addr();
                    let token = Token(self.next_token);
                    self.next_token += 1;
                    let _ = stream.set_nodelay(true);
                    let mut stream = TcpStream::from_std(stream);
                    poll.registry().register(
                        &mut stream,
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    let client = Client {
                        stream,
                        input: Vec::new(),
                        output: Vec::new(),
                        close_after: None,
                        active_at: Instant::now(),
                        lingering: false,
                        body: client.map(|a| body_for(self.slot, a)),
                    };
                    self.clients.insert(token, client);
                    // Data may have arrived before registration.
                    let draining = self.drain_at.is_some();
                    serve_or_close(poll, &mut self.clients, token, body, draining, listener);
                }
                // Nothing is closed yet: an idle connection's next request
                // may be on its way.
                Ok(Incoming::Drain) => self.drain_at = Some(Instant::now()),
                Ok(Incoming::Message(_)) => {}
                Ok(Incoming::Closed) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.paused = false;
                    return Ok(true);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn serve_or_close(
    poll: &mut Poll,
    clients: &mut HashMap<Token, Client>,
    token: Token,
    body: &str,
    draining: bool,
    listener: &Listener,
) {
    if let Some(c) = clients.get_mut(&token)
        && serve(c, body, draining)
    {
        close(poll, clients, token, listener);
    }
}

/// Reads what the client sent, answers every complete request, writes what
/// fits. Returns whether the connection is finished.
fn serve(c: &mut Client, body: &str, draining: bool) -> bool {
    let mut eof = false;
    let mut chunk = [0u8; 8192];
    loop {
        match c.stream.read(&mut chunk) {
            Ok(0) => {
                eof = true;
                break;
            }
            // Lingering: what comes after the last response is discarded.
            Ok(_) if c.lingering => {}
            Ok(n) => {
                c.input.extend_from_slice(&chunk[..n]);
                c.active_at = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
    if c.lingering {
        return eof;
    }
    while c.close_after.is_none() {
        match next_request(&c.input) {
            Parsed::Incomplete => {
                if c.input.len() > MAX_HEAD {
                    respond(
                        c,
                        "431 Request Header Fields Too Large",
                        "request head too large\n",
                        Some(Closing::Asked),
                    );
                }
                break;
            }
            Parsed::Bad => {
                respond(c, "400 Bad Request", "bad request\n", Some(Closing::Asked));
                break;
            }
            Parsed::Request {
                len,
                close,
                sleep_ms,
            } => {
                c.input.drain(..len);
                if let Some(ms) = sleep_ms {
                    std::thread::sleep(Duration::from_millis(ms.min(MAX_SLEEP_MS)));
                }
                let closing = if close {
                    Some(Closing::Asked)
                } else if draining {
                    Some(Closing::Draining)
                } else {
                    None
                };
                // Put back after: no copy per response.
                let own = c.body.take();
                respond(c, "200 OK", own.as_deref().unwrap_or(body), closing);
                c.body = own;
            }
        }
    }
    while !c.output.is_empty() {
        match c.stream.write(&c.output) {
            Ok(n) => {
                c.output.drain(..n);
                c.active_at = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
    match c.close_after {
        Some(Closing::Draining) if !eof => {
            c.lingering = true;
            c.active_at = Instant::now();
            c.stream.shutdown(Shutdown::Write).is_err()
        }
        Some(_) => true,
        None => eof,
    }
}

/// The body for a client whose address lb sent (a PROXY header's).
fn body_for(slot: usize, client: SocketAddr) -> String {
    format!(
        "hello from worker {slot} to a client from {client} (pid {})\n",
        std::process::id()
    )
}

impl Client {
    /// When a draining worker closes this connection for want of progress:
    /// `grace` after it last moved bytes (or after DRAIN, `drain_at`):
    /// idle between requests, stalled in one, or lingering.
    fn expires(&self, drain_at: Instant, grace: Duration) -> Instant {
        self.active_at.max(drain_at) + grace
    }
}

fn respond(c: &mut Client, status: &str, body: &str, closing: Option<Closing>) {
    let connection = if closing.is_some() {
        "Connection: close\r\n"
    } else {
        ""
    };
    let _ = write!(
        c.output,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{connection}\r\n{body}",
        body.len()
    );
    c.close_after = closing;
    c.active_at = Instant::now();
}

/// Deregisters before closing (epoll registers open file descriptions, and
/// the master may still hold this one for an instant), then reports.
fn close(poll: &mut Poll, clients: &mut HashMap<Token, Client>, token: Token, listener: &Listener) {
    if let Some(mut c) = clients.remove(&token) {
        let _ = poll.registry().deregister(&mut c.stream);
        drop(c);
        let _ = listener.report_closed(1);
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Incomplete,
    Bad,
    Request {
        /// Bytes of head and body.
        len: usize,
        close: bool,
        sleep_ms: Option<u64>,
    },
}

/// Finds the first complete request in `buf` (head plus a `Content-Length`
/// body, if any).
fn next_request(buf: &[u8]) -> Parsed {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Parsed::Incomplete;
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Parsed::Bad;
    };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(_method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Bad;
    };
    let mut close = version.eq_ignore_ascii_case("HTTP/1.0");
    let mut body_len = 0usize;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Parsed::Bad;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            if value.to_ascii_lowercase().contains("close") {
                close = true;
            } else if value.to_ascii_lowercase().contains("keep-alive") {
                close = false;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            match value.parse() {
                Ok(n) => body_len = n,
                Err(_) => return Parsed::Bad,
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Bad; // chunked bodies are beyond this example
        }
    }
    let len = end + 4 + body_len;
    if buf.len() < len {
        return Parsed::Incomplete;
    }
    let sleep_ms = target
        .strip_prefix("/sleep/")
        .and_then(|ms| ms.parse().ok());
    Parsed::Request {
        len,
        close,
        sleep_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_names_the_client_and_keeps_the_slot_and_pid_where_they_were() {
        let b = body_for(3, "[2001:db8::7]:4242".parse().unwrap());
        let pid = std::process::id();
        assert_eq!(
            b,
            format!("hello from worker 3 to a client from [2001:db8::7]:4242 (pid {pid})\n")
        );
        // What the integration tests read out of a body.
        let slot = b
            .strip_prefix("hello from worker ")
            .and_then(|r| r.split_whitespace().next());
        assert_eq!(slot, Some("3"));
        let p = b
            .split("(pid ")
            .nth(1)
            .and_then(|r| r.trim_end().strip_suffix(')'));
        assert_eq!(p, Some(pid.to_string().as_str()));
    }

    #[test]
    fn keep_alive_close_and_http10() {
        let r = next_request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(
            r,
            Parsed::Request {
                len: 27,
                close: false,
                sleep_ms: None
            }
        );
        let r = next_request(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n");
        assert!(matches!(r, Parsed::Request { close: true, .. }));
        let r = next_request(b"GET / HTTP/1.0\r\n\r\n");
        assert!(matches!(r, Parsed::Request { close: true, .. }));
        let r = next_request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(matches!(r, Parsed::Request { close: false, .. }));
    }

    #[test]
    fn bodies_pipelining_and_garbage() {
        assert_eq!(next_request(b"GET / HTTP/1.1\r\n"), Parsed::Incomplete);
        let post = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab";
        assert_eq!(next_request(post), Parsed::Incomplete);
        let two = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n";
        assert!(matches!(next_request(two), Parsed::Request { len: 41, .. }));
        assert_eq!(next_request(b"nonsense\r\n\r\n"), Parsed::Bad);
        let r = next_request(b"GET /sleep/250 HTTP/1.1\r\n\r\n");
        assert!(matches!(
            r,
            Parsed::Request {
                sleep_ms: Some(250),
                ..
            }
        ));
    }
}
