//! A worker process's life in the dispatcher — attached, READY, draining,
//! detached — and the dispatcher's own: the supervisor's commands, the
//! snapshot for status, and the stop that loses no connection.

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use mio::Interest;
use mio::unix::SourceFd;

use super::front::Front;
use super::link::Link;
use super::tokens::Source;
use super::worker::{State, Worker};
use super::{Command, Dispatcher, Event, Snapshot, WorkerStats, native};
use crate::policy::{Slot, WorkerView};
use crate::proto::Malformed;
use crate::sys;

/// A socket filter that drops TCP segments with SYN set and ACK clear (new
/// connections) and passes everything else: the filter sees the TCP
/// header, whose flags are byte 13.
const SYN_DROP: [socket2::SockFilter; 5] = [
    socket2::SockFilter::new(0x30, 0, 0, 13),   // ldb [13]
    socket2::SockFilter::new(0x45, 2, 0, 0x10), // jset ACK -> pass
    socket2::SockFilter::new(0x45, 0, 1, 0x02), // jset SYN -> drop, else pass
    socket2::SockFilter::new(0x06, 0, 0, 0),    // drop
    socket2::SockFilter::new(0x06, 0, 0, 0xffff_ffff), // pass
];
/// How long a stopping listener lets handshakes already under way complete.
const HANDSHAKE_GRACE: Duration = Duration::from_millis(50);
/// How long a stopping dispatcher waits for open relays to finish.
const STOP_LINGER: Duration = Duration::from_secs(5);

impl Dispatcher {
    pub(super) fn commands(&mut self) {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Attach {
                    slot,
                    pid,
                    channel,
                    peer,
                    weight,
                    mode,
                    port,
                    send_proxy,
                    listener,
                } => self.attach(
                    slot,
                    pid,
                    Link::new(mode, channel, peer, port, send_proxy, listener),
                    weight,
                ),
                Command::Detach { slot, pid } => self.detach(slot, pid),
                Command::Drain { slot, pid } => {
                    if let Some(index) = self.workers.find(slot, pid) {
                        self.drain_worker(index);
                    }
                }
                Command::Shutdown => self.shutdown(),
                Command::Handover(reply) => self.begin_handover(reply),
                Command::Adopt(handed) => self.adopt(handed),
                Command::Snapshot(reply) => {
                    let _ = reply.send(self.snapshot());
                }
                Command::Message {
                    target,
                    payload,
                    reply,
                } => {
                    let _ = reply.send(self.message(target, &payload));
                }
                // Relays still open get a few seconds to finish (their
                // workers have exited; what is left is bytes in flight).
                Command::Stop if self.relays_active() > 0 => {
                    self.stop_by = Some(Instant::now() + STOP_LINGER);
                }
                Command::Stop => self.running = false,
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        let workers = self
            .workers
            .indices()
            .filter_map(|i| {
                let w = self.workers.get(i)?;
                Some(WorkerStats {
                    slot: w.slot,
                    pid: w.pid,
                    taking: self.is_current(i) && w.state == State::Ready,
                    active: Link::active(w, self.reports),
                    total: w.sent,
                })
            })
            .collect();
        Snapshot {
            stats: self.stats,
            by_listener: self.by_listener.clone(),
            workers,
            latency: self.latency.clone(),
        }
    }

    /// Sends a USER message to the ready workers of `target`; how many took it.
    fn message(&mut self, target: Option<Slot>, payload: &[u8]) -> usize {
        let indices: Vec<usize> = self.workers.indices().collect();
        let mut delivered = 0;
        for i in indices {
            let Some(w) = self.workers.get(i) else {
                continue;
            };
            if w.state != State::Ready || target.is_some_and(|t| t != w.slot) {
                continue;
            }
            delivered += usize::from(self.send_message(i, payload));
        }
        delivered
    }

    fn attach(&mut self, slot: Slot, pid: u32, link: Link, weight: u32) {
        if slot.0 >= self.current.len() {
            self.current.resize(slot.0 + 1, None);
            self.views.resize(slot.0 + 1, WorkerView::default());
            self.policy.resize(slot.0 + 1);
        }
        // The new process is its slot's candidate: the current one (if any)
        // keeps taking connections until the new one says READY.
        let raw = link.channel().map(|c| c.as_raw_fd());
        let index = self.workers.insert(Worker {
            slot,
            pid,
            weight: weight.max(1),
            state: State::Starting,
            link,
            full: false,
            drain_queued: false,
            drain_sent: false,
            sent: 0,
            closed: 0,
            reported: false,
            progress: native::stall::Progress::default(),
            queue: super::kernel::pressure::Queue::default(),
            stop_seen: false,
            messages: 0,
        });
        // Readable only: a unix socket wakes its writer's EPOLLOUT waiters
        // each time the reader takes a message, which would wake this loop
        // once per connection. Writability is asked for only while full.
        // Without readiness we would never hear READY: the worker then never
        // gets a connection, and the supervisor's ready timeout replaces it.
        if let Some(raw) = raw
            && self
                .poll
                .registry()
                .register(
                    &mut SourceFd(&raw),
                    Source::Worker(index).token(),
                    Interest::READABLE,
                )
                .is_err()
        {
            return;
        }
        self.attached(index);
    }

    /// Forgets a process after it exited, having read what it said last
    /// and rescued every connection still queued (sent, never received) in
    /// its channel; then says Detached.
    fn detach(&mut self, slot: Slot, pid: u32) {
        let Some(index) = self.workers.find(slot, pid) else {
            return self.emit(Event::Detached { slot, pid });
        };
        // Its last words: a LEAVING, CLOSED reports. (Draining first: the
        // EOF of a dead Node worker's channel is not an announced exit.)
        if let Some(w) = self.workers.get_mut(index) {
            w.state = State::Draining;
        }
        self.read_worker(index);
        self.forget_deferred(index);
        let was_current = self.is_current(index);
        let mut w = self.workers.remove(index).expect("found above");
        if let Some(channel) = w.link.channel() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&channel.as_raw_fd()));
        }
        if was_current {
            self.current[slot.0] = None;
            self.views[slot.0] = WorkerView::default();
        }
        // Out of the kernel's schedule before its listener (if any) closes
        // with `w`: what is queued there migrates to the others, and is
        // counted as rescued (the master's copy is the last one now).
        self.steer();
        let migrated = self.let_go_of_listener(&mut w);
        let count = self.rescue(&mut w) + migrated;
        self.stats.rescued += count;
        if count > 0 {
            self.emit(Event::Rescued { slot, pid, count });
        }
        self.emit(Event::Detached { slot, pid });
    }

    pub(super) fn drain_worker(&mut self, index: usize) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        if w.drain_sent || w.drain_queued {
            return;
        }
        w.state = State::Draining;
        let slot = w.slot;
        self.sync_view(slot);
        // (Kernel dispatch: out of the program's schedule before it is told.)
        self.steer();
        if let Some(w) = self.workers.get_mut(index) {
            w.link.drop_own_listener();
        }
        self.send_drain(index);
    }

    /// Kernel dispatch: the worker accepted `n` connections from its own
    /// listener (it is sent none, so this is what it holds). Ignored from
    /// a worker the master hands connections to.
    pub(super) fn accepted(&mut self, index: usize, slot: Slot, n: u64) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        if w.link.delivery() != super::link::Delivery::Never {
            return;
        }
        // (A worker's word: never trusted to stay in range.)
        w.sent = w.sent.saturating_add(n);
        w.reported = true;
        if self.current[slot.0] == Some(index) {
            let v = &mut self.views[slot.0];
            v.active = v
                .active
                .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        }
        self.counts_changed(n);
    }

    /// The worker reports `n` of its connections closed.
    pub(super) fn closed(&mut self, index: usize, slot: Slot, n: u64) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        let fit = n.min(w.sent - w.closed);
        w.closed += fit;
        w.reported |= n > 0;
        let pid = w.pid;
        if self.current[slot.0] == Some(index) {
            let v = &mut self.views[slot.0];
            v.active = v.active.saturating_sub(fit as u32);
        }
        self.counts_changed(0);
        if fit < n {
            self.emit(Event::Malformed {
                slot,
                pid,
                error: Malformed::OverClosed(n - fit),
            });
        }
    }

    /// READY (a Node worker's `listening`): the switch. The slot's
    /// connections go to this process now; the one it replaces (if any) drains.
    pub(super) fn ready(&mut self, index: usize, slot: Slot, pid: u32) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        if w.state != State::Starting {
            return;
        }
        w.state = State::Ready;
        let weight = w.weight;
        let previous = self.current[slot.0].filter(|&i| i != index);
        self.current[slot.0] = Some(index);
        self.views[slot.0] = WorkerView {
            eligible: false,
            weight,
            active: 0,
        };
        self.sync_view(slot);
        self.steer();
        self.emit(Event::Ready { slot, pid });
        if let Some(previous) = previous {
            self.drain_worker(previous);
        }
        if self.shutting_down {
            self.drain_worker(index);
        }
    }

    /// The worker is leaving on its own: nothing new goes to it.
    pub(super) fn leaving(&mut self, index: usize, slot: Slot, pid: u32) {
        if let Some(w) = self.workers.get_mut(index) {
            w.state = State::Draining;
        }
        self.sync_view(slot);
        self.steer();
        if let Some(w) = self.workers.get_mut(index) {
            w.link.drop_own_listener();
        }
        self.emit(Event::Leaving { slot, pid });
    }

    fn shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        self.kernel_stop();
        // Nothing already in the backlog is lost: take it all, then close.
        // A handshake that completes between the last accept and the close
        // would be reset by the close, so new SYNs are dropped first (the
        // client retries, and meets the closed port: refused, never
        // accepted), handshakes under way get a moment to complete, and the
        // filter is taken off again just before the close (an inherited
        // socket lives on in systemd). (Off the hot path: `pending` may grow
        // past its capacity here when the backlog is configured larger.)
        // (A Unix socket's connect completes at once, with no handshake:
        // the file lb made goes first, and what queued before is taken.)
        let mut listeners = std::mem::take(&mut self.listeners);
        for l in &listeners {
            if let Some(path) = &l.path {
                let _ = std::fs::remove_file(path);
            }
        }
        let filtered: Vec<bool> = listeners
            .iter()
            .map(|l| {
                socket2::SockRef::from(&l.fd)
                    .attach_filter(&SYN_DROP)
                    .is_ok()
            })
            .collect();
        for (i, l) in listeners.iter_mut().enumerate() {
            self.take_backlog(i, l);
        }
        if filtered.contains(&true) {
            std::thread::sleep(HANDSHAKE_GRACE);
            for (i, l) in listeners.iter_mut().enumerate() {
                if filtered[i] {
                    self.take_backlog(i, l);
                    let _ = socket2::SockRef::from(&l.fd).detach_filter();
                }
            }
        }
        drop(listeners);
        self.pump();
    }

    /// Accepts every connection listener `index` holds now.
    fn take_backlog(&mut self, index: usize, listener: &mut Front) {
        loop {
            match sys::accept4(listener.fd.as_fd()) {
                Ok(fd) => {
                    if let Some(conn) = self.admit(fd, index) {
                        self.pending.push_back(conn);
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(_) => break,
            }
        }
    }

    /// During shutdown, once every held connection has gone out: DRAIN all.
    pub(super) fn send_drains(&mut self) {
        if self.drained
            || !self.pending.is_empty()
            || self.headers_waiting() > 0
            || self.queues_waiting()
        {
            return;
        }
        let all: Vec<usize> = self.workers.indices().collect();
        for index in all {
            self.drain_worker(index);
        }
        self.drained = true;
        self.emit(Event::Drained);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stopping listener's filter drops new connections' SYNs (a
    /// connect does not complete) and lets them through again once off.
    #[test]
    fn the_syn_filter_holds_new_connections_off() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sock = socket2::SockRef::from(&listener);
        sock.attach_filter(&SYN_DROP).unwrap();
        let held = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(held.is_err(), "a connect completed through the filter");
        sock.detach_filter().unwrap();
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    }
}
