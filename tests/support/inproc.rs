//! In-process workers for a `Dispatcher` driven by a test or a benchmark:
//! real socketpairs, real fd passing, each worker on a thread of its own.
//! Shared by `tests/zero_alloc.rs`, `tests/dispatch.rs` (both as
//! `support::inproc`) and `benches/handoff.rs` (`#[path]`).
//!
//! Everything that knows how a dispatcher is built, how a worker is
//! attached (`Command::Attach`) and how a worker's side of the protocol is
//! spoken lives here, so that a change to the dispatcher's API is fixed in
//! one place.

// Each target uses its own part of this.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use lb::config::Mode;
use lb::dispatch::{Command, Dispatcher, Event, EventQueues, Handle, Notifier, Snapshot, Stats};
use lb::policy::{PolicyKind, Slot};
use lb::proto::{self, Wait};
use lb::worker::{Incoming, Listener};

/// Upper bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(20);
/// The listener's backlog: room for a benchmark's batches.
const BACKLOG: i32 = 4096;
/// Proxy mode's relays (twice a benchmark batch of 256).
const PROXY_RELAYS: usize = 512;
/// How long a drained proxy worker's relays may take.
const PROXY_LINGER: Duration = Duration::from_secs(5);

/// How the workers of [`Rig::serve`] take their connections.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// lb's protocol, as `lb::worker` speaks it (`PEER_ADDRESS | BATCH`:
    /// several connections to a CONN).
    Native,
    /// lb's protocol as a worker older than `BATCH` speaks it: READY 0,
    /// one connection to a CONN.
    NativeSingle,
    Node,
    Proxy,
    /// lb's protocol under kernel dispatch: each worker accepts from a
    /// listener of its own (LISTENER), reporting ACCEPTED and CLOSED.
    Kernel,
}

/// A dispatcher on a loopback listener, not running yet: a benchmark
/// drives it with `Dispatcher::turn`, a test usually [`Rig::spawn`]s it.
pub struct Rig {
    pub dispatcher: Dispatcher,
    pub handle: Handle,
    /// Where clients connect.
    pub addr: SocketAddr,
    pub events: EventQueues,
    /// Kernel dispatch: lb's own listener, the reuseport group's anchor.
    anchor: Option<OwnedFd>,
}

impl Rig {
    /// A dispatcher for `slots` workers picking with `policy`.
    pub fn new(policy: PolicyKind, slots: usize) -> Rig {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("a TCP socket");
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        socket.bind(&any.into()).unwrap();
        socket.listen(BACKLOG).unwrap();
        let listener = std::net::TcpListener::from(socket);
        let addr = listener.local_addr().unwrap();
        let (notifier, events) = Notifier::new(None);
        let (dispatcher, handle) = Dispatcher::new(listener, policy, slots, notifier).unwrap();
        Rig {
            dispatcher,
            handle,
            addr,
            events,
            anchor: None,
        }
    }

    /// The dispatcher that takes over from one that handed everything
    /// over (`lb upgrade`): its listeners, its workers, its counters.
    pub fn taking_over(handover: lb::dispatch::Handover, policy: PolicyKind, slots: usize) -> Rig {
        let (notifier, events) = Notifier::new(None);
        let addr = socket2::SockRef::from(&handover.listeners[0].0)
            .local_addr()
            .unwrap()
            .as_socket()
            .unwrap();
        let (mut dispatcher, handle) =
            Dispatcher::with_listeners(handover.listeners, addr, policy, slots, notifier).unwrap();
        dispatcher.carry_on(handover.stats, &handover.by_listener, handover.seq);
        for w in handover.workers {
            handle.send(Command::Adopt(w));
        }
        Rig {
            dispatcher,
            handle,
            addr,
            events,
            anchor: None,
        }
    }

    /// A dispatcher under kernel dispatch: it accepts nothing, and the
    /// program it attached to its anchor listener picks the workers' own
    /// listeners. `None` (said on stderr) where BPF cannot be loaded.
    pub fn kernel(policy: PolicyKind, slots: usize) -> Option<Rig> {
        use lb::dispatch::kernel::{Steering, slot_listener};
        use std::os::fd::AsFd;
        let steering = match Steering::new(policy) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("skipped: BPF programs cannot be loaded here ({e})");
                return None;
            }
        };
        let anchor = slot_listener("127.0.0.1:0".parse().unwrap(), BACKLOG as u32).unwrap();
        let addr = std::net::TcpListener::from(anchor.try_clone().unwrap())
            .local_addr()
            .unwrap();
        steering.attach(anchor.as_fd()).unwrap();
        let (notifier, events) = Notifier::new(None);
        let (mut dispatcher, handle) =
            Dispatcher::without_listener(addr, policy, slots, notifier).unwrap();
        dispatcher.steer_in_kernel(steering);
        Some(Rig {
            dispatcher,
            handle,
            addr,
            events,
            anchor: Some(anchor),
        })
    }

    /// Attaches `n` workers of `kind` that call `serve` on each connection
    /// (proxy mode: makes the relays first).
    pub fn serve<F>(&mut self, kind: Kind, n: usize, serve: F) -> Workers
    where
        F: Fn(TcpStream) + Clone + Send + 'static,
    {
        let threads = match kind {
            Kind::Native => workers(&self.handle, n, serve),
            Kind::NativeSingle => native_workers(&self.handle, n, 0, serve),
            Kind::Node => node_workers(&self.handle, n, serve),
            Kind::Kernel => kernel_workers(&self.handle, self.addr, n, serve),
            Kind::Proxy => {
                self.dispatcher
                    .enable_proxy(PROXY_RELAYS, PROXY_LINGER)
                    .unwrap();
                proxy_workers(&self.handle, n, serve)
            }
        };
        Workers { kind, threads }
    }

    /// Has the dispatcher read a PROXY header (v1 or v2) on every
    /// connection from 127.0.0.1 (as `--proxy-protocol any
    /// --proxy-trusted 127.0.0.1` does).
    pub fn read_proxy_headers(&mut self) {
        use lb::config::{Cidr, ProxyProtocol, Untrusted};
        self.dispatcher
            .read_proxy_headers(lb::dispatch::header::Rules {
                accept: ProxyProtocol::Any,
                trusted: vec![Cidr::parse("127.0.0.1").unwrap()],
                untrusted: Untrusted::Refuse,
                timeout: Duration::from_secs(3),
            });
    }

    /// Attaches `n` lb-protocol workers that say READY with `PEER_ADDRESS`
    /// (each CONN may carry the client's address) and `more` flags
    /// (`BATCH`, or 0), and call `serve` on each connection.
    pub fn serve_peers<F>(&mut self, n: usize, more: u64, serve: F) -> Workers
    where
        F: Fn(TcpStream) + Clone + Send + 'static,
    {
        Workers {
            kind: Kind::Native,
            threads: native_workers(
                &self.handle,
                n,
                proto::wire::ready::PEER_ADDRESS | more,
                serve,
            ),
        }
    }

    /// Turns the loop (bounded) until a lifecycle event satisfies `want`;
    /// the events up to and including it.
    pub fn turn_until(&mut self, what: &str, mut want: impl FnMut(&Event) -> bool) -> Vec<Event> {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            while let Ok(e) = self.events.lifecycle.try_recv() {
                let done = want(&e);
                seen.push(e);
                if done {
                    return seen;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; events: {seen:?}"
            );
            self.dispatcher
                .turn(Some(Duration::from_millis(10)))
                .unwrap();
        }
    }

    /// Runs the dispatcher on a thread of its own, which first calls `init`.
    pub fn spawn(self, init: impl FnOnce() + Send + 'static) -> Running {
        let Rig {
            mut dispatcher,
            handle,
            addr,
            events,
            anchor,
        } = self;
        let thread = Bounded::spawn(move || {
            init();
            dispatcher.run().unwrap()
        });
        Running {
            handle,
            addr,
            events,
            thread,
            _anchor: anchor,
        }
    }
}

/// The threads of [`Rig::serve`]'s workers.
pub struct Workers {
    kind: Kind,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Waits for the workers to end, as they do on DRAIN. Proxy workers
    /// are threads blocked in `accept`: they are left to end with the
    /// process.
    pub fn join(self) {
        if self.kind == Kind::Proxy {
            return;
        }
        for t in self.threads {
            t.join().unwrap();
        }
    }
}

/// A dispatcher running on its own thread.
pub struct Running {
    pub handle: Handle,
    pub addr: SocketAddr,
    pub events: EventQueues,
    thread: Bounded<Stats>,
    _anchor: Option<OwnedFd>,
}

impl Running {
    pub fn send(&self, command: Command) {
        self.handle.send(command);
    }

    pub fn snapshot(&self) -> Snapshot {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(Command::Snapshot(tx));
        rx.recv_timeout(WAIT).expect("a snapshot")
    }

    /// Polls snapshots (bounded) until `done` holds for one; that one.
    pub fn snapshot_until(&self, what: &str, done: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.snapshot();
            if done(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                (s.stats, s.workers)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `Command::Message`; how many workers took it.
    pub fn message(&self, target: Option<usize>, payload: &[u8]) -> usize {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.send(Command::Message {
            target: target.map(Slot),
            payload: payload.to_vec(),
            reply,
        });
        rx.recv_timeout(WAIT).expect("a message reply")
    }

    /// The next lifecycle event (bounded).
    pub fn event(&self) -> Event {
        self.events
            .lifecycle
            .recv_timeout(WAIT)
            .expect("a lifecycle event")
    }

    /// Takes lifecycle events (bounded) until `want` holds for one; those
    /// before it and it.
    pub fn events_until(&self, want: impl Fn(&Event) -> bool) -> Vec<Event> {
        let mut seen = Vec::new();
        loop {
            let e = self
                .events
                .lifecycle
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("timed out waiting for an event; got {seen:?}"));
            let done = want(&e);
            seen.push(e);
            if done {
                return seen;
            }
        }
    }

    /// Stops the loop; its final counters. The dispatcher is dropped with
    /// its thread, closing every worker's channel.
    pub fn stop(self) -> Stats {
        self.send(Command::Stop);
        self.thread.join("the dispatch thread")
    }

    /// `Command::Shutdown`, waits for `workers` to end on their DRAIN, then
    /// stops the loop; its final counters.
    pub fn shutdown(self, workers: Workers) -> Stats {
        self.send(Command::Shutdown);
        workers.join();
        self.stop()
    }
}

/// A thread whose end is waited for with a time limit.
struct Bounded<T> {
    done: Receiver<T>,
    thread: JoinHandle<()>,
}

impl<T: Send + 'static> Bounded<T> {
    fn spawn(f: impl FnOnce() -> T + Send + 'static) -> Bounded<T> {
        let (tx, done) = crossbeam_channel::bounded(1);
        let thread = std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        Bounded { done, thread }
    }

    /// Its result; panics if it takes longer than [`WAIT`], and with the
    /// thread's own panic if it had one.
    fn join(self, what: &str) -> T {
        match self.done.recv_timeout(WAIT) {
            Ok(v) => {
                self.thread.join().unwrap();
                v
            }
            Err(RecvTimeoutError::Timeout) => panic!("{what} did not end within {WAIT:?}"),
            Err(RecvTimeoutError::Disconnected) => match self.thread.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(()) => unreachable!("{what} ended without a result"),
            },
        }
    }
}

/// Attaches the worker in `slot` (pid `slot + 1`): `channel` is the
/// master's end (if the mode has one), made non-blocking here.
fn attach(
    handle: &Handle,
    slot: usize,
    weight: u32,
    channel: Option<OwnedFd>,
    peer: Option<OwnedFd>,
    mode: Mode,
    port: u16,
) {
    if let Some(channel) = &channel {
        nix::fcntl::fcntl(
            channel,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
    }
    handle.send(Command::Attach {
        slot: Slot(slot),
        pid: slot as u32 + 1,
        channel,
        peer,
        weight,
        mode,
        port,
        send_proxy: Default::default(),
        listener: None,
    });
}

/// A native worker of weight 1 a test drives step by step. It says READY only when
/// told ([`Worker::ready`]), reports closes only when told
/// ([`Worker::closed`]); a thread reads its channel, answers each
/// connection with one byte, its slot (see [`served_by`]), and hands the
/// test everything that arrived, in order ([`Worker::next`]).
pub struct Worker {
    pub slot: usize,
    /// The pid it was attached with.
    pub pid: u32,
    /// The test's end of the channel: sends only, never reads.
    side: Listener,
    got: Option<Receiver<Incoming>>,
    reader: Option<Bounded<()>>,
}

/// Attaches a [`Worker`] in `slot` whose thread reads its channel.
pub fn worker(handle: &Handle, slot: usize) -> Worker {
    let (master, end) = proto::pair().unwrap();
    let peer = end.try_clone().unwrap();
    let side = Listener::from_fd(end.try_clone().unwrap(), slot, 1);
    attach(handle, slot, 1, Some(master), Some(peer), Mode::Native, 0);
    let (tx, got) = crossbeam_channel::unbounded();
    let reader = Bounded::spawn(move || {
        let mut l = Listener::from_fd(end, slot, 1);
        loop {
            match l.next(Wait::Block) {
                Ok(Incoming::Conn(mut s)) => {
                    s.set_nonblocking(false).unwrap();
                    // A client may have given up already.
                    let _ = s.write_all(&[slot as u8]);
                    let _ = tx.send(Incoming::Conn(s));
                }
                Ok(Incoming::Closed) | Err(_) => return,
                Ok(other) => {
                    let _ = tx.send(other);
                }
            }
        }
    });
    Worker {
        slot,
        pid: slot as u32 + 1,
        side,
        got: Some(got),
        reader: Some(reader),
    }
}

/// Attaches a [`Worker`] in `slot` that never reads its channel: what the
/// dispatcher sends it waits there. The master's end gets a send buffer
/// of `send_buffer` bytes (the kernel's minimum if less), so that a few
/// connections fill it.
pub fn unread_worker(handle: &Handle, slot: usize, send_buffer: usize) -> Worker {
    let (master, end) = proto::pair().unwrap();
    socket2::SockRef::from(&master)
        .set_send_buffer_size(send_buffer)
        .unwrap();
    let peer = end.try_clone().unwrap();
    attach(handle, slot, 1, Some(master), Some(peer), Mode::Native, 0);
    Worker {
        slot,
        pid: slot as u32 + 1,
        side: Listener::from_fd(end, slot, 1),
        got: None,
        reader: None,
    }
}

impl Worker {
    /// Sends READY.
    pub fn ready(&self) {
        self.side.ready().unwrap();
    }

    /// Reports `n` connections closed.
    pub fn closed(&self, n: u64) {
        self.side.report_closed(n).unwrap();
    }

    fn got(&self) -> &Receiver<Incoming> {
        self.got.as_ref().expect("a worker that reads its channel")
    }

    /// What arrived next (bounded).
    pub fn next(&self) -> Incoming {
        self.got()
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("worker {} got nothing in {WAIT:?}", self.slot))
    }

    /// The next arrival, which must be a connection (already answered).
    pub fn conn(&self) -> TcpStream {
        match self.next() {
            Incoming::Conn(s) => s,
            other => panic!("worker {} got {other:?}, not a connection", self.slot),
        }
    }

    /// Asserts that nothing arrives within `d`.
    pub fn gets_nothing_for(&self, d: Duration) {
        if let Ok(got) = self.got().recv_timeout(d) {
            panic!("worker {} got {got:?}", self.slot);
        }
    }

    /// Waits (bounded) for the reader to end, which it does once the
    /// dispatcher lets go of the channel (`Detach`, or the dispatcher
    /// dropped); returns what arrived and was not taken.
    pub fn join(mut self) -> Vec<Incoming> {
        if let Some(reader) = self.reader.take() {
            reader.join(&format!("worker {}'s reader", self.slot));
        }
        self.got
            .take()
            .map_or_else(Vec::new, |r| r.try_iter().collect())
    }
}

/// Connects a client to `addr` (reads time out after [`WAIT`]).
pub fn client(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// The slot of the [`Worker`] that served `client` (the byte it answered with).
pub fn served_by(client: &mut TcpStream) -> usize {
    let mut b = [0u8; 1];
    client
        .read_exact(&mut b)
        .expect("a worker answers the client");
    usize::from(b[0])
}

/// Attaches `n` workers (slot i has weight i + 1 and pid i + 1) whose
/// threads say READY (as `lb::worker` does), call `serve` on every
/// connection, report its close, and end on DRAIN or when the channel
/// closes.
pub fn workers<F>(handle: &Handle, n: usize, serve: F) -> Vec<JoinHandle<()>>
where
    F: Fn(TcpStream) + Clone + Send + 'static,
{
    native_workers(handle, n, ADAPTER_READY, serve)
}

/// What `lb::worker`'s READY says under master dispatch.
const ADAPTER_READY: u64 = u64::MAX;

/// [`workers`] whose READY carries `flags`.
fn native_workers<F>(handle: &Handle, n: usize, flags: u64, serve: F) -> Vec<JoinHandle<()>>
where
    F: Fn(TcpStream) + Clone + Send + 'static,
{
    (0..n)
        .map(|slot| {
            let (master, worker) = proto::pair().unwrap();
            let peer = worker.try_clone().unwrap();
            attach(
                handle,
                slot,
                slot as u32 + 1,
                Some(master),
                Some(peer),
                Mode::Native,
                0,
            );
            let serve = serve.clone();
            std::thread::spawn(move || {
                if flags != ADAPTER_READY {
                    use std::os::fd::AsFd;
                    proto::send_plain(worker.as_fd(), proto::kind::READY, flags, &[], Wait::Block)
                        .unwrap();
                }
                let mut l = Listener::from_fd(worker, slot, 1);
                if flags == ADAPTER_READY {
                    l.ready().unwrap();
                }
                loop {
                    match l.next(Wait::Block) {
                        Ok(Incoming::Conn(s)) => {
                            serve(s);
                            let _ = l.report_closed(1);
                        }
                        Ok(Incoming::Message(_)) => {}
                        _ => return,
                    }
                }
            })
        })
        .collect()
}

/// Attaches `n` lb-protocol workers under kernel dispatch, each with a
/// listener of its own on `addr`: they take the LISTENER, say READY with
/// OWN_LISTENER, accept by themselves, call `serve` and report ACCEPTED
/// and CLOSED for each connection; they end on DRAIN.
pub fn kernel_workers<F>(
    handle: &Handle,
    addr: SocketAddr,
    n: usize,
    serve: F,
) -> Vec<JoinHandle<()>>
where
    F: Fn(TcpStream) + Clone + Send + 'static,
{
    use lb::proto::{kind, scm, wire};
    use std::os::fd::AsFd;
    (0..n)
        .map(|slot| {
            let (master, worker) = proto::pair().unwrap();
            let peer = worker.try_clone().unwrap();
            nix::fcntl::fcntl(
                &master,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )
            .unwrap();
            let own = lb::dispatch::kernel::slot_listener(addr, BACKLOG as u32).unwrap();
            handle.send(Command::Attach {
                slot: Slot(slot),
                pid: slot as u32 + 1,
                channel: Some(master),
                peer: Some(peer),
                weight: slot as u32 + 1,
                mode: Mode::Native,
                port: 0,
                send_proxy: Default::default(),
                listener: Some(own),
            });
            let serve = serve.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; wire::MAX_MESSAGE];
                let mut got = scm::recv(worker.as_fd(), &mut buf, Wait::Block).unwrap();
                assert_eq!(buf[1], kind::LISTENER, "LISTENER comes first");
                let listener = std::net::TcpListener::from(got.fds.take_first().unwrap());
                let say = |k, v| proto::send_plain(worker.as_fd(), k, v, &[], Wait::Block);
                say(kind::READY, wire::ready::OWN_LISTENER).unwrap();
                let mut fds = [
                    nix::poll::PollFd::new(listener.as_fd(), nix::poll::PollFlags::POLLIN),
                    nix::poll::PollFd::new(worker.as_fd(), nix::poll::PollFlags::POLLIN),
                ];
                loop {
                    nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE).unwrap();
                    let ready =
                        |f: &nix::poll::PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
                    if ready(&fds[1]) {
                        let m = scm::recv(worker.as_fd(), &mut buf, Wait::Block).unwrap();
                        if m.len == 0 || buf[1] == kind::DRAIN {
                            return;
                        }
                    }
                    if ready(&fds[0])
                        && let Ok((s, _)) = listener.accept()
                    {
                        let _ = say(kind::ACCEPTED, 1);
                        serve(s);
                        let _ = say(kind::CLOSED, 1);
                    }
                }
            })
        })
        .collect()
}

/// Attaches `n` threads that speak Node.js's cluster IPC the way a Node
/// worker does (queryServer, listening, handle ACK + `accepted` reply per
/// connection, the preload's `lb_closed` report), calling `serve` on each
/// connection; they end on `disconnect`.
pub fn node_workers<F>(handle: &Handle, n: usize, serve: F) -> Vec<JoinHandle<()>>
where
    F: Fn(TcpStream) + Clone + Send + 'static,
{
    use lb::proto::node::Lines;
    use lb::proto::scm;
    use std::io::Write;
    use std::os::fd::AsFd;

    (0..n)
        .map(|slot| {
            let (master, worker) = proto::stream_pair().unwrap();
            attach(handle, slot, slot as u32 + 1, Some(master), None, Mode::Node, 0);
            let serve = serve.clone();
            std::thread::spawn(move || {
                let mut chan = std::os::unix::net::UnixStream::from(worker);
                let mut seq = 0u64;
                let mut next = || {
                    seq += 1;
                    seq
                };
                let query = format!(
                    "{{\"cmd\":\"NODE_CLUSTER\",\"act\":\"online\",\"seq\":{}}}\n\
                     {{\"cmd\":\"NODE_CLUSTER\",\"act\":\"queryServer\",\"index\":0,\"data\":null,\
                     \"address\":null,\"port\":8000,\"addressType\":4,\"backlog\":0,\"seq\":{}}}\n",
                    next(),
                    next()
                );
                chan.write_all(query.as_bytes()).unwrap();
                let mut lines = Lines::new();
                let mut listening = false;
                loop {
                    let Ok(mut got) = scm::recv(chan.as_fd(), lines.spare(), proto::Wait::Block)
                    else {
                        return;
                    };
                    if got.len == 0 {
                        return;
                    }
                    let mut fd = got.fds.take_first();
                    let mut out = Vec::new();
                    let mut stop = false;
                    lines.filled(got.len, |line| {
                        let v: serde_json::Value = serde_json::from_slice(line.unwrap()).unwrap();
                        if v["ack"] == 2 && !listening {
                            listening = true;
                            out.extend_from_slice(
                                b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"listening\",\"seq\":3}\n",
                            );
                        } else if v["cmd"] == "NODE_HANDLE" {
                            let conn = TcpStream::from(fd.take().expect("newconn carries its fd"));
                            out.extend_from_slice(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n");
                            let reply = format!(
                                "{{\"cmd\":\"NODE_CLUSTER\",\"ack\":{},\"accepted\":true,\"seq\":{}}}\n",
                                v["msg"]["seq"],
                                next()
                            );
                            out.extend_from_slice(reply.as_bytes());
                            chan.write_all(&out).unwrap();
                            out.clear();
                            serve(conn);
                            out.extend_from_slice(b"{\"lb_closed\":1}\n");
                        } else if v["act"] == "disconnect" {
                            stop = true;
                        }
                    });
                    let _ = chan.write_all(&out);
                    if stop {
                        return;
                    }
                }
            })
        })
        .collect()
}

/// Attaches `n` proxy-mode workers: threads listening on loopback ports of
/// their own, calling `serve` on each connection they accept.
pub fn proxy_workers<F>(handle: &Handle, n: usize, serve: F) -> Vec<JoinHandle<()>>
where
    F: Fn(TcpStream) + Clone + Send + 'static,
{
    (0..n)
        .map(|slot| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            // No channel: lb relays to the port.
            attach(handle, slot, slot as u32 + 1, None, None, Mode::Proxy, port);
            let serve = serve.clone();
            std::thread::spawn(move || {
                // The first connection is lb's readiness probe.
                for conn in listener.incoming().skip(1) {
                    match conn {
                        Ok(s) => serve(s),
                        Err(_) => return,
                    }
                }
            })
        })
        .collect()
}
