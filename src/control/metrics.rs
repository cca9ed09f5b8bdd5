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

use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use mio::unix::SourceFd;
use mio::{Interest, Poll, Waker};

use super::clients::{self, Answering, Clients, LISTENER, Serve as _, answer_on_thread};
use super::http::{Answer, EXPOSITION, MAX_HEAD, Progress, Route, read_head, reply_now, route};
use super::prometheus::render;
use super::{Incoming, Request, Response};

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
        crate::warn!("metrics: epoll failed ({e}); /metrics is no longer served");
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
