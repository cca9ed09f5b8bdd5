//! The optional metrics listener (`--metrics HOST:PORT`): Prometheus text
//! format at `/metrics`, from the same status the control socket serves,
//! and health checks for what stands in front of lb (`/livez`, alias
//! `/healthz`; `/readyz`). Each scrape asks the supervisor, which asks the
//! dispatcher for a snapshot: nothing is added to the per-connection path
//! but the counters and the latency histogram the dispatcher keeps anyway.
//! A health check asks the supervisor only, with a short deadline: a
//! supervisor that does not answer in time is not live.
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

use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use mio::unix::SourceFd;
use mio::{Interest, Poll, Waker};

use super::clients::{self, Answering, Clients, LISTENER, answer_on_thread};
use super::http::{
    Answer, EXPOSITION, Endpoint, MAX_HEAD, Progress, Route, TEXT, read_head, reply_now, route,
};
use super::prometheus::render;
use super::{Health, Incoming, Request, Response};

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
/// How long the supervisor may take to answer a health check before it is
/// deemed wedged: well within a probe's usual timeout (Kubernetes' is 1s),
/// so the prober reads the reason rather than timing out.
const HEALTH_DEADLINE: Duration = Duration::from_millis(500);

/// Binds `addr` and serves scrapes on a thread; returns the bound address.
pub fn serve(
    addr: SocketAddr,
    requests: Sender<Incoming>,
    waker: Arc<Waker>,
) -> io::Result<SocketAddr> {
    serve_on(TcpListener::bind(addr)?, requests, waker)
}

/// Serves `listener` (bound: by `serve`, or by an earlier image of this
/// master, for `lb upgrade`).
pub fn serve_on(
    listener: TcpListener,
    requests: Sender<Incoming>,
    waker: Arc<Waker>,
) -> io::Result<SocketAddr> {
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
    requests: Sender<Incoming>,
    waker: Arc<Waker>,
    answering: Answering,
}

impl clients::Serve for Loop {
    type Stream = TcpStream;

    fn poll(&mut self) -> &mut Poll {
        &mut self.poll
    }

    fn clients(&mut self) -> &mut Clients<TcpStream> {
        &mut self.waiting
    }

    fn accept(&self) -> io::Result<TcpStream> {
        self.listener.accept().map(|(s, _)| s)
    }

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
                Route::Get {
                    endpoint,
                    head_only,
                } => self.answer(w.stream, endpoint, head_only),
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

    fn lost(&self, e: &io::Error) {
        crate::warn!("metrics: epoll failed ({e}); /metrics is no longer served");
    }
}

impl Loop {
    /// Asks the supervisor and writes the answer on a thread of its own.
    fn answer(&self, stream: TcpStream, endpoint: Endpoint, head_only: bool) {
        let Some(place) = self.answering.claim(MAX_ANSWERING) else {
            let mut busy = Answer::error(
                "503 Service Unavailable",
                format!("{MAX_ANSWERING} requests are being answered already; try again\n"),
            );
            busy.headers = "Retry-After: 1\r\n";
            busy.head_only = head_only;
            return reply_now(&stream, &busy);
        };
        let requests = self.requests.clone();
        let waker = Arc::clone(&self.waker);
        answer_on_thread("lb-metrics-answer", place, move || {
            let _ = respond(stream, endpoint, head_only, &requests, &waker);
        });
    }
}

/// On an answering thread: ask the supervisor, wait, write the answer.
fn respond(
    stream: TcpStream,
    endpoint: Endpoint,
    head_only: bool,
    requests: &Sender<Incoming>,
    waker: &Waker,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let (request, wait) = match endpoint {
        Endpoint::Metrics => (Request::Status, IO_TIMEOUT),
        Endpoint::Live | Endpoint::Ready => (Request::Health, HEALTH_DEADLINE),
    };
    let (reply, answer) = crossbeam_channel::bounded(1);
    let _ = requests.send(Incoming { request, reply });
    let _ = waker.wake();
    let response = answer.recv_timeout(wait).map(Response::from);
    let mut answer = match endpoint {
        Endpoint::Metrics => match response.ok().and_then(|r| r.status) {
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
        },
        _ => health(
            endpoint,
            response
                .map_err(|e| match e {
                    crossbeam_channel::RecvTimeoutError::Timeout => format!(
                        "lb's supervisor did not answer within {}ms",
                        HEALTH_DEADLINE.as_millis()
                    ),
                    crossbeam_channel::RecvTimeoutError::Disconnected => {
                        "lb's supervisor is gone".to_string()
                    }
                })
                .and_then(|r| {
                    r.health
                        .ok_or_else(|| "lb's supervisor sent no health".to_string())
                }),
        ),
    };
    answer.head_only = head_only;
    (&stream).write_all(&answer.bytes())?;
    stream.shutdown(Shutdown::Write)
}

/// A health check's answer: 200 or 503, with the reason on one line.
fn health(endpoint: Endpoint, health: Result<Health, String>) -> Answer {
    let (ok, reason) = match (endpoint, health) {
        (Endpoint::Live, Err(why)) => (false, format!("not live: {why}")),
        (Endpoint::Live, Ok(h)) => (
            true,
            format!(
                "live: lb's supervisor answers{}",
                if h.stopping { " (stopping)" } else { "" }
            ),
        ),
        (_, Err(why)) => (false, format!("not ready: {why}")),
        (_, Ok(h)) if h.stopping => (false, "not ready: lb is stopping".to_string()),
        (_, Ok(h)) if h.ready < h.min_ready => (
            false,
            format!(
                "not ready: {} of {} workers ready, min_ready is {}",
                h.ready, h.slots, h.min_ready
            ),
        ),
        (_, Ok(h)) => (
            true,
            format!(
                "ready: {} of {} workers ready (min_ready {})",
                h.ready, h.slots, h.min_ready
            ),
        ),
    };
    Answer {
        code: if ok {
            "200 OK"
        } else {
            "503 Service Unavailable"
        },
        // A cached "ready" would hide the master going down.
        headers: "Cache-Control: no-store\r\n",
        content_type: TEXT,
        body: reason + "\n",
        head_only: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(endpoint: Endpoint, h: Result<Health, String>) -> (&'static str, String) {
        let a = health(endpoint, h);
        (&a.code[..3], a.body)
    }

    /// What `respond` writes for `endpoint` when the supervisor's end of
    /// the channel does what `supervisor` does with the request.
    fn answered(endpoint: Endpoint, supervisor: impl FnOnce(Incoming)) -> (String, Duration) {
        use std::io::Read;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        let poll = Poll::new().unwrap();
        let waker = Waker::new(poll.registry(), mio::Token(0)).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let start = Instant::now();
        let answering = std::thread::spawn(move || respond(server, endpoint, false, &tx, &waker));
        supervisor(rx.recv_timeout(Duration::from_secs(5)).unwrap());
        answering.join().unwrap().unwrap();
        let mut text = String::new();
        client.read_to_string(&mut text).unwrap();
        (text, start.elapsed())
    }

    #[test]
    fn a_supervisor_that_does_not_answer_in_time_is_not_live() {
        // Wedged: the request is held, never answered.
        let held = std::sync::Mutex::new(None);
        let (text, took) = answered(Endpoint::Live, |i| *held.lock().unwrap() = Some(i));
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{text}"
        );
        assert!(
            text.ends_with("\r\n\r\nnot live: lb's supervisor did not answer within 500ms\n"),
            "{text}"
        );
        assert!(
            took >= HEALTH_DEADLINE && took < HEALTH_DEADLINE * 4,
            "{took:?}"
        );
        // Gone: the request is dropped unanswered.
        let (text, _) = answered(Endpoint::Ready, drop);
        assert!(
            text.ends_with("\r\n\r\nnot ready: lb's supervisor is gone\n"),
            "{text}"
        );
        // Answering: its health, at once.
        let (text, took) = answered(Endpoint::Ready, |i| {
            assert_eq!(i.request, Request::Health);
            let _ = i.reply.send(crate::supervisor::Answer::Health(
                crate::supervisor::Health {
                    ready: 1,
                    min_ready: 1,
                    slots: 1,
                    stopping: false,
                },
            ));
        });
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with("ready: 1 of 1 workers ready (min_ready 1)\n"));
        assert!(took < HEALTH_DEADLINE, "{took:?}");
    }

    #[test]
    fn health_is_200_or_503_with_the_reason() {
        let h = |ready, min_ready, stopping| {
            Ok(Health {
                ready,
                min_ready,
                slots: 4,
                stopping,
            })
        };
        let wedged = || Err("lb's supervisor did not answer within 500ms".to_string());
        assert_eq!(
            said(Endpoint::Ready, h(2, 1, false)),
            ("200", "ready: 2 of 4 workers ready (min_ready 1)\n".into())
        );
        assert_eq!(
            said(Endpoint::Ready, h(0, 0, false)),
            ("200", "ready: 0 of 4 workers ready (min_ready 0)\n".into())
        );
        assert_eq!(
            said(Endpoint::Ready, h(1, 2, false)),
            (
                "503",
                "not ready: 1 of 4 workers ready, min_ready is 2\n".into()
            )
        );
        assert_eq!(
            said(Endpoint::Ready, h(4, 1, true)),
            ("503", "not ready: lb is stopping\n".into())
        );
        assert_eq!(
            said(Endpoint::Ready, wedged()),
            (
                "503",
                "not ready: lb's supervisor did not answer within 500ms\n".into()
            )
        );
        // Live is about the supervisor only: no worker, or stopping, is live.
        assert_eq!(
            said(Endpoint::Live, h(0, 1, false)),
            ("200", "live: lb's supervisor answers\n".into())
        );
        assert_eq!(
            said(Endpoint::Live, h(0, 1, true)),
            ("200", "live: lb's supervisor answers (stopping)\n".into())
        );
        assert_eq!(
            said(Endpoint::Live, wedged()),
            (
                "503",
                "not live: lb's supervisor did not answer within 500ms\n".into()
            )
        );
        let a = health(Endpoint::Live, h(1, 1, false));
        assert!(
            String::from_utf8(a.bytes())
                .unwrap()
                .contains("\r\nCache-Control: no-store\r\n")
        );
    }
}
