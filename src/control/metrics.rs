//! The optional metrics endpoint (`--metrics HOST:PORT`): Prometheus text
//! format at `/metrics`, from the same status the control socket serves.
//! Each scrape asks the supervisor, which asks the dispatcher for a
//! snapshot: nothing is added to the per-connection path but the counters
//! and the latency histogram the dispatcher keeps anyway.
//!
//! Served as the control socket is (`super`): a thread of its own that
//! never blocks on a client accepts and reads request heads without
//! blocking (mio), gives each client `HEAD_DEADLINE` from its connection to
//! send a head of at most `MAX_HEAD` bytes and keeps at most `MAX_WAITING`
//! waiting (the one that waited longest goes first), each let go with an
//! HTTP error (408, 431). What is not a scrape is answered at once (400,
//! 404, 405); a scrape goes to a short-lived thread of its own (at most
//! `MAX_ANSWERING` at once, else 503) that asks the supervisor and writes
//! the answer. So a scrape is answered while idle or slow clients are
//! connected, and each of those costs an fd for two seconds at most.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use mio::unix::SourceFd;
use mio::{Interest, Poll, Waker};

use super::clients::{self, Answering, Clients, LISTENER, Serve as _, answer_on_thread};
use super::{Incoming, Request, Response, Status, WorkerStatus};

/// Histogram bucket bounds for the hand-off latency, in seconds.
pub const BUCKETS: [f64; 14] = [
    1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 1e-2, 1e-1, 1.0,
];

/// Longest request head accepted (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
/// How long a client has, from its connection, to send its whole head
/// (Prometheus sends it with the connection).
const HEAD_DEADLINE: Duration = Duration::from_secs(2);
/// Clients connected and not done sending their head, at most; one more
/// drops the one that waited longest.
const MAX_WAITING: usize = 128;
/// Scrapes being answered, at most; one more is answered 503.
const MAX_ANSWERING: usize = 8;
/// How long the supervisor may take to answer, and a client to read it.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// What is read of a client's further bytes before an error answer is
/// closed (so that the close is a FIN rather than a reset that could
/// discard the answer).
const MAX_DRAIN: usize = 64 * 1024;

/// Binds `addr` and serves scrapes on a thread; returns the bound address.
pub fn serve(
    addr: SocketAddr,
    requests: Sender<Incoming>,
    waker: Arc<Waker>,
) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let poll = Poll::new()?;
    poll.registry().register(
        &mut SourceFd(&listener.as_raw_fd()),
        LISTENER,
        Interest::READABLE,
    )?;
    let mut lp = Loop {
        poll,
        listener,
        waiting: Clients::new(HEAD_DEADLINE, MAX_WAITING),
        accept_again: None,
        requests,
        waker,
        answering: Answering::default(),
    };
    std::thread::Builder::new()
        .name("lb-metrics".into())
        .spawn(move || clients::run(&mut lp))?;
    Ok(bound)
}

/// The metrics thread: accepts, reads heads, answers or hands on.
struct Loop {
    poll: Poll,
    listener: TcpListener,
    waiting: Clients<TcpStream>,
    /// Set when accept(2) failed for want of resources.
    accept_again: Option<Instant>,
    requests: Sender<Incoming>,
    waker: Arc<Waker>,
    answering: Answering,
}

/// How far a client's head has come.
#[derive(Debug, PartialEq)]
enum Progress {
    More,
    /// The head (or what came before EOF).
    Head(Vec<u8>),
    TooLong,
    Gone,
}

/// What a head asks for.
#[derive(Debug, PartialEq)]
enum Route {
    /// GET (or, without the body, HEAD) `/metrics`.
    Metrics { head_only: bool },
    /// An answer that needs no supervisor.
    Error(Answer),
}

/// An HTTP answer; `head_only` leaves out the body (for HEAD).
#[derive(Debug, PartialEq)]
struct Answer {
    code: &'static str,
    headers: &'static str,
    content_type: &'static str,
    body: String,
    head_only: bool,
}

const TEXT: &str = "text/plain; charset=utf-8";
const EXPOSITION: &str = "text/plain; version=0.0.4";

impl Answer {
    fn error(code: &'static str, body: String) -> Answer {
        Answer {
            code,
            headers: "",
            content_type: TEXT,
            body,
            head_only: false,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
            self.code,
            self.content_type,
            self.body.len(),
            self.headers
        );
        if !self.head_only {
            out.push_str(&self.body);
        }
        out.into_bytes()
    }
}

impl clients::Serve for Loop {
    fn poll(&mut self) -> &mut Poll {
        &mut self.poll
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.waiting
            .next_deadline()
            .into_iter()
            .chain(self.accept_again)
            .min()
    }

    fn accept_all(&mut self) {
        let (accepted, again) = clients::accept_all(|| self.listener.accept().map(|(s, _)| s));
        self.accept_again = again;
        for stream in accepted {
            self.admit(stream);
        }
    }

    /// Reads what `token`'s client sent; a whole head is answered.
    fn progress(&mut self, token: usize) {
        let Some(w) = self.waiting.get_mut(token) else {
            return;
        };
        let progress = read_head(&w.stream, &mut w.buf);
        if progress == Progress::More {
            return;
        }
        let Some(w) = self.waiting.take(self.poll.registry(), token) else {
            return;
        };
        match progress {
            Progress::More | Progress::Gone => {}
            Progress::TooLong => reply_now(
                &w.stream,
                &Answer::error(
                    "431 Request Header Fields Too Large",
                    format!("a request head is at most {MAX_HEAD} bytes\n"),
                ),
            ),
            Progress::Head(head) => match route(&head) {
                Route::Error(answer) => reply_now(&w.stream, &answer),
                Route::Metrics { head_only } => self.answer(w.stream, head_only),
            },
        }
    }

    /// Drops the clients whose deadline has passed, telling them why.
    fn expire(&mut self) {
        for w in self.waiting.expired(self.poll.registry(), Instant::now()) {
            reply_now(
                &w.stream,
                &Answer::error(
                    "408 Request Timeout",
                    format!("no request head within {}s\n", HEAD_DEADLINE.as_secs()),
                ),
            );
        }
    }

    fn accept_due(&self) -> bool {
        self.accept_again.is_some_and(|t| t <= Instant::now())
    }

    fn lost(&self, e: &io::Error) {
        crate::info!("metrics: epoll failed ({e}); /metrics is no longer served");
    }
}

impl Loop {
    /// A new client: read from at once (it has most likely sent its head
    /// already), then left to wait for the rest.
    fn admit(&mut self, stream: TcpStream) {
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let (token, evicted) = self.waiting.add(self.poll.registry(), stream);
        if let Some(oldest) = evicted {
            reply_now(
                &oldest.stream,
                &Answer::error(
                    "408 Request Timeout",
                    format!(
                        "{MAX_WAITING} clients were connected without sending a request; the one \
                         that waited longest (this one) was dropped\n"
                    ),
                ),
            );
        }
        if let Some(token) = token {
            self.progress(token);
        }
    }

    /// Asks the supervisor and writes the scrape on a thread of its own.
    fn answer(&self, stream: TcpStream, head_only: bool) {
        let Some(place) = self.answering.claim(MAX_ANSWERING) else {
            let mut busy = Answer::error(
                "503 Service Unavailable",
                format!("{MAX_ANSWERING} scrapes are being answered already; try again\n"),
            );
            busy.headers = "Retry-After: 1\r\n";
            busy.head_only = head_only;
            return reply_now(&stream, &busy);
        };
        let requests = self.requests.clone();
        let waker = Arc::clone(&self.waker);
        answer_on_thread("lb-metrics-answer", place, move || {
            let _ = scrape(stream, head_only, &requests, &waker);
        });
    }
}

/// Where a request head ends (after its blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    crlf.into_iter().chain(lf).min()
}

/// Reads what is there without blocking, up to the end of the head (EOF
/// ends one too).
fn read_head(mut stream: &TcpStream, buf: &mut Vec<u8>) -> Progress {
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Progress::Gone,
            Ok(0) => return Progress::Head(std::mem::take(buf)),
            Ok(n) => {
                // The blank line may straddle two reads.
                let from = buf.len().saturating_sub(3);
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = head_end(&buf[from..]) {
                    buf.truncate(from + end);
                    return if buf.len() > MAX_HEAD {
                        Progress::TooLong
                    } else {
                        Progress::Head(std::mem::take(buf))
                    };
                }
                if buf.len() > MAX_HEAD {
                    return Progress::TooLong;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::More,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Progress::Gone,
        }
    }
}

/// What a request head asks for; only its request line matters.
fn route(head: &[u8]) -> Route {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(line));
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Route::Error(Answer::error(
            "400 Bad Request",
            "not an HTTP request line; GET /metrics\n".into(),
        ));
    };
    if !version.starts_with("HTTP/1.") {
        return Route::Error(Answer::error(
            "400 Bad Request",
            "HTTP/1.x only; GET /metrics\n".into(),
        ));
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let mut answer = Answer::error(
            "405 Method Not Allowed",
            "metrics are read with GET /metrics\n".into(),
        );
        answer.headers = "Allow: GET, HEAD\r\n";
        return Route::Error(answer);
    }
    if target.split('?').next() != Some("/metrics") {
        let mut answer = Answer::error("404 Not Found", "metrics are at /metrics\n".into());
        answer.head_only = head_only;
        return Route::Error(answer);
    }
    Route::Metrics { head_only }
}

/// An answer to a client the loop is done with, without waiting: nothing
/// was written to it before, so a short answer fits in the socket's
/// buffer; if not, or if the client is gone, it goes unsaid. What the
/// client sent beyond its head is read (a little) so that closing does
/// not reset the connection before the answer is read.
fn reply_now(stream: &TcpStream, answer: &Answer) {
    let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL;
    let _ = nix::sys::socket::send(stream.as_raw_fd(), &answer.bytes(), flags);
    let _ = stream.shutdown(Shutdown::Write);
    let mut chunk = [0u8; 4096];
    let mut drained = 0;
    while drained < MAX_DRAIN {
        match (&*stream).read(&mut chunk) {
            Ok(n) if n > 0 => drained += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            _ => return,
        }
    }
}

/// On an answering thread: ask the supervisor, wait, write the scrape.
fn scrape(
    stream: TcpStream,
    head_only: bool,
    requests: &Sender<Incoming>,
    waker: &Waker,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let (reply, answer) = crossbeam_channel::bounded(1);
    let _ = requests.send(Incoming {
        request: Request::Status,
        reply,
    });
    let _ = waker.wake();
    let mut answer = match answer
        .recv_timeout(IO_TIMEOUT)
        .ok()
        .and_then(|r| Response::from(r).status)
    {
        Some(status) => Answer {
            code: "200 OK",
            headers: "",
            content_type: EXPOSITION,
            body: render(&status),
            head_only: false,
        },
        None => Answer::error(
            "503 Service Unavailable",
            format!(
                "the master did not answer within {}s\n",
                IO_TIMEOUT.as_secs()
            ),
        ),
    };
    answer.head_only = head_only;
    (&stream).write_all(&answer.bytes())?;
    stream.shutdown(Shutdown::Write)
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
    counter(
        "lb_proxy_connect_timeouts_total",
        "Proxy mode: connects to a worker not done within the connect timeout (the client went to another worker).",
        s.proxy_connect_timeouts,
    );
    counter(
        "lb_proxy_idle_timeouts_total",
        "Proxy mode: relays reset after the idle timeout without a byte moved.",
        s.proxy_idle_timeouts,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(code: &'static str, head_only: bool) -> impl Fn(&Route) -> bool {
        move |r| matches!(r, Route::Error(a) if a.code.starts_with(code) && a.head_only == head_only)
    }

    #[test]
    fn a_head_routes_by_its_request_line() {
        let metrics = |head_only| Route::Metrics { head_only };
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            metrics(false)
        );
        assert_eq!(route(b"GET /metrics?a=b HTTP/1.0\n\n"), metrics(false));
        assert_eq!(route(b"HEAD /metrics HTTP/1.1\r\n\r\n"), metrics(true));
        assert!(answer("404", false)(&route(b"GET / HTTP/1.1\r\n\r\n")));
        assert!(answer("404", true)(&route(b"HEAD /x HTTP/1.1\r\n\r\n")));
        assert!(answer("405", false)(&route(
            b"POST /metrics HTTP/1.1\r\n\r\n"
        )));
        assert!(answer("400", false)(&route(b"PRI * HTTP/2.0\r\n\r\n")));
        assert!(answer("400", false)(&route(b"GET /metrics\r\n\r\n")));
        assert!(answer("400", false)(&route(b"\xff\xfe\r\n\r\n")));
        assert!(answer("400", false)(&route(b"")));
    }

    #[test]
    fn an_answer_is_a_whole_http_response() {
        let mut a = Answer::error("405 Method Not Allowed", "no\n".into());
        a.headers = "Allow: GET, HEAD\r\n";
        assert_eq!(
            String::from_utf8(a.bytes()).unwrap(),
            "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 3\r\nAllow: GET, HEAD\r\nConnection: close\r\n\r\nno\n"
        );
        a.head_only = true;
        assert!(
            String::from_utf8(a.bytes())
                .unwrap()
                .ends_with("Content-Length: 3\r\nAllow: GET, HEAD\r\nConnection: close\r\n\r\n")
        );
    }

    #[test]
    fn the_end_of_a_head_is_its_first_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\nrest"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    /// A connected pair of TCP streams on loopback.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, server)
    }

    /// Waits until `server` has `n` bytes to read.
    fn settle(server: &TcpStream, n: usize) {
        let mut probe = vec![0u8; n];
        for _ in 0..200 {
            if server.peek(&mut probe).is_ok_and(|got| got >= n) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("{n} bytes never arrived");
    }

    #[test]
    fn a_head_is_read_across_reads_and_bounded() {
        let (mut client, server) = pair();
        let mut buf = Vec::new();
        assert_eq!(read_head(&server, &mut buf), Progress::More);
        client.write_all(b"GET /metrics HTTP/1.1\r\n\r").unwrap();
        settle(&server, 24);
        assert_eq!(read_head(&server, &mut buf), Progress::More);
        client.write_all(b"\nafter").unwrap();
        settle(&server, 6);
        assert_eq!(
            read_head(&server, &mut buf),
            Progress::Head(b"GET /metrics HTTP/1.1\r\n\r\n".to_vec())
        );

        let (mut client, server) = pair();
        let mut buf = Vec::new();
        let long = vec![b'a'; MAX_HEAD + 1];
        client.write_all(&long).unwrap();
        settle(&server, long.len());
        assert_eq!(read_head(&server, &mut buf), Progress::TooLong);

        // EOF ends a head (what came so far); nothing at all is no request.
        let (mut client, server) = pair();
        client.write_all(b"GET /metrics HTTP/1.0\r\n").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        settle(&server, 23);
        let mut buf = Vec::new();
        let mut got = read_head(&server, &mut buf);
        for _ in 0..100 {
            if got != Progress::More {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
            got = read_head(&server, &mut buf);
        }
        assert_eq!(got, Progress::Head(b"GET /metrics HTTP/1.0\r\n".to_vec()));
        let (client, server) = pair();
        drop(client);
        let mut got = Progress::More;
        for _ in 0..100 {
            got = read_head(&server, &mut Vec::new());
            if got != Progress::More {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(got, Progress::Gone);
    }
}
