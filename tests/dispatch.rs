//! The dispatcher in process: the real `Dispatcher` on a loopback
//! listener, workers on real socketpairs answered by threads
//! (`support::inproc`), real TCP clients. Each client learns which worker
//! served it from the one byte the worker answers with: its slot.
//!
//! Every wait is bounded, and every test ends the threads it started: the
//! dispatcher's by `Stop`, the workers' readers when it lets go of their
//! channels.

mod support;

use std::net::TcpStream;
use std::time::Duration;

use lb::dispatch::{Command, Event, Snapshot, WorkerStats};
use lb::policy::{PolicyKind, Slot};
use lb::worker::Incoming;
use support::inproc::{Rig, Running, Worker, client, served_by, unread_worker, worker};

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);

/// Says READY for each of `workers` and waits for the dispatcher's Ready events.
fn make_ready(d: &Running, workers: &[&Worker]) {
    for w in workers {
        w.ready();
    }
    let seen: Vec<Event> = workers.iter().map(|_| d.event()).collect();
    for w in workers {
        let want = Event::Ready {
            slot: Slot(w.slot),
            pid: w.pid,
        };
        assert!(seen.contains(&want), "{want:?} not in {seen:?}");
    }
}

fn stats_of(s: &Snapshot, slot: usize) -> &WorkerStats {
    s.workers
        .iter()
        .find(|w| w.slot == Slot(slot))
        .unwrap_or_else(|| panic!("no worker in slot {slot}: {:?}", s.workers))
}

/// The slot that served each of `n` clients, one after another.
fn served_in_turn(d: &Running, n: usize) -> Vec<usize> {
    (0..n).map(|_| served_by(&mut client(d.addr))).collect()
}

/// Takes `n` connections from `w`.
fn take(w: &Worker, n: usize) -> Vec<TcpStream> {
    (0..n).map(|_| w.conn()).collect()
}

#[test]
fn a_worker_gets_nothing_before_ready_and_connections_after() {
    let rig = Rig::new(PolicyKind::RoundRobin, 1);
    let w = worker(&rig.handle, 0);
    let d = rig.spawn(|| {});

    let mut c = client(d.addr);
    let s = d.snapshot_until("the client accepted", |s| s.stats.accepted == 1);
    assert_eq!(s.stats.dispatched, 0, "sent before READY");
    w.gets_nothing_for(QUIET);

    make_ready(&d, &[&w]);
    let conn = w.conn();
    assert_eq!(served_by(&mut c), 0);
    assert_eq!(served_in_turn(&d, 2), [0, 0]);
    take(&w, 2);

    drop(conn);
    d.stop();
    assert!(w.join().is_empty());
}

#[test]
fn round_robin_takes_the_ready_workers_in_turn() {
    let rig = Rig::new(PolicyKind::RoundRobin, 4);
    let ws: Vec<Worker> = (0..4).map(|slot| worker(&rig.handle, slot)).collect();
    let d = rig.spawn(|| {});
    // Slot 2 never says READY: it is passed over.
    make_ready(&d, &[&ws[0], &ws[1], &ws[3]]);

    assert_eq!(served_in_turn(&d, 9), [0, 1, 3, 0, 1, 3, 0, 1, 3]);
    for slot in [0, 1, 3] {
        take(&ws[slot], 3);
    }
    ws[2].gets_nothing_for(QUIET);

    d.stop();
    for w in ws {
        assert!(w.join().is_empty());
    }
}

#[test]
fn least_conn_prefers_the_worker_with_fewer_open_connections() {
    let rig = Rig::new(PolicyKind::LeastConn, 2);
    let (w0, w1) = (worker(&rig.handle, 0), worker(&rig.handle, 1));
    let d = rig.spawn(|| {});
    make_ready(&d, &[&w0, &w1]);

    // Four held connections: ties go round-robin, 2 and 2.
    let mut held: Vec<TcpStream> = (0..4).map(|_| client(d.addr)).collect();
    let order: Vec<usize> = held.iter_mut().map(served_by).collect();
    assert_eq!(order, [0, 1, 0, 1]);
    let open0 = take(&w0, 2);
    drop(take(&w1, 2));

    // Worker 1 reports its two closed: it is the lighter one now.
    w1.closed(2);
    d.snapshot_until("worker 1's closes counted", |s| {
        stats_of(s, 1).active == Some(0)
    });
    assert_eq!(served_in_turn(&d, 2), [1, 1]);
    take(&w1, 2);
    w0.gets_nothing_for(QUIET);

    drop((open0, held));
    d.stop();
    assert!(w0.join().is_empty());
    assert!(w1.join().is_empty());
}

#[test]
fn drain_stops_deliveries_to_the_worker_and_sends_it_drain() {
    let rig = Rig::new(PolicyKind::RoundRobin, 2);
    let (w0, w1) = (worker(&rig.handle, 0), worker(&rig.handle, 1));
    let d = rig.spawn(|| {});
    make_ready(&d, &[&w0, &w1]);

    d.send(Command::Drain {
        slot: Slot(0),
        pid: w0.pid,
    });
    assert_eq!(
        d.event(),
        Event::Draining {
            slot: Slot(0),
            pid: w0.pid
        }
    );
    assert!(matches!(w0.next(), Incoming::Drain));
    let s = d.snapshot();
    assert!(stats_of(&s, 1).taking);

    assert_eq!(served_in_turn(&d, 4), [1, 1, 1, 1]);
    take(&w1, 4);
    w0.gets_nothing_for(QUIET);

    d.stop();
    assert!(w0.join().is_empty());
    assert!(w1.join().is_empty());
}

#[test]
fn detach_rescues_the_connections_a_worker_never_read() {
    let rig = Rig::new(PolicyKind::RoundRobin, 2);
    // Room in its channel for every connection it is sent.
    let w0 = unread_worker(&rig.handle, 0, 1 << 20);
    let w1 = worker(&rig.handle, 1);
    let d = rig.spawn(|| {});
    make_ready(&d, &[&w0, &w1]);

    let mut clients: Vec<TcpStream> = (0..8).map(|_| client(d.addr)).collect();
    let s = d.snapshot_until("8 dispatched", |s| s.stats.dispatched == 8);
    assert_eq!(stats_of(&s, 0).total, 4);
    assert_eq!(stats_of(&s, 1).total, 4);

    d.send(Command::Detach {
        slot: Slot(0),
        pid: w0.pid,
    });
    let events = d.events_until(|e| matches!(e, Event::Detached { .. }));
    assert_eq!(
        events,
        [
            Event::Rescued {
                slot: Slot(0),
                pid: w0.pid,
                count: 4
            },
            Event::Detached {
                slot: Slot(0),
                pid: w0.pid
            },
        ]
    );
    // Every client is served, by the worker that is left.
    for c in &mut clients {
        assert_eq!(served_by(c), 1);
    }
    take(&w1, 8);
    let s = d.snapshot();
    assert_eq!(s.stats.rescued, 4);
    assert_eq!(stats_of(&s, 1).total, 8);
    assert!(
        s.workers.iter().all(|w| w.slot != Slot(0)),
        "slot 0 forgotten"
    );

    d.stop();
    assert!(w0.join().is_empty());
    assert!(w1.join().is_empty());
}

#[test]
fn a_worker_whose_channel_is_full_is_skipped() {
    let rig = Rig::new(PolicyKind::RoundRobin, 2);
    // The smallest send buffer the kernel allows: a few connections fill it.
    let w0 = unread_worker(&rig.handle, 0, 0);
    let w1 = worker(&rig.handle, 1);
    let d = rig.spawn(|| {});
    make_ready(&d, &[&w0, &w1]);

    // One at a time, each dispatched before the next connects.
    let mut clients = Vec::new();
    for n in 1..=30 {
        clients.push(client(d.addr));
        d.snapshot_until("the client dispatched", |s| s.stats.dispatched == n);
    }
    let s = d.snapshot();
    let queued = stats_of(&s, 0).total;
    assert!(queued >= 1, "worker 0 was never sent to");
    assert!(queued < 15, "worker 0 kept its turns: {queued} of 30");
    assert_eq!(stats_of(&s, 1).total, 30 - queued);

    // From now on worker 1 takes everything.
    assert_eq!(served_in_turn(&d, 10), [1; 10]);
    let s = d.snapshot();
    assert_eq!(stats_of(&s, 0).total, queued);
    assert_eq!(stats_of(&s, 1).total, 40 - queued);

    // What waits in the full channel is not lost.
    d.send(Command::Detach {
        slot: Slot(0),
        pid: w0.pid,
    });
    let events = d.events_until(|e| matches!(e, Event::Detached { .. }));
    assert!(
        events.contains(&Event::Rescued {
            slot: Slot(0),
            pid: w0.pid,
            count: queued
        }),
        "{events:?}"
    );
    for c in &mut clients {
        assert_eq!(served_by(c), 1);
    }
    take(&w1, 40);

    d.stop();
    assert!(w0.join().is_empty());
    assert!(w1.join().is_empty());
}

#[test]
fn the_snapshot_counts_what_the_clients_did() {
    let rig = Rig::new(PolicyKind::LeastConn, 2);
    let (w0, w1) = (worker(&rig.handle, 0), worker(&rig.handle, 1));
    let d = rig.spawn(|| {});
    make_ready(&d, &[&w0, &w1]);

    let s = d.snapshot();
    assert_eq!((s.stats.accepted, s.stats.dispatched), (0, 0));

    assert_eq!(served_in_turn(&d, 10), [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]);
    let open0 = take(&w0, 5);
    let open1 = take(&w1, 5);
    let s = d.snapshot();
    assert_eq!(s.stats.accepted, 10);
    assert_eq!(s.stats.dispatched, 10);
    assert_eq!(s.stats.rescued, 0);
    assert_eq!(s.latency.len(), 10, "one hand-off latency per connection");
    for slot in [0, 1] {
        let w = stats_of(&s, slot);
        assert_eq!((w.total, w.active, w.taking), (5, Some(5), true));
    }

    drop(open0);
    w0.closed(5);
    let s = d.snapshot_until("worker 0's closes counted", |s| {
        stats_of(s, 0).active == Some(0)
    });
    assert_eq!(stats_of(&s, 0).total, 5);
    assert_eq!(stats_of(&s, 1).active, Some(5));
    assert_eq!(s.stats.accepted, 10);

    drop(open1);
    let stats = d.stop();
    assert_eq!((stats.accepted, stats.dispatched), (10, 10));
    assert!(w0.join().is_empty());
    assert!(w1.join().is_empty());
}

#[test]
fn a_message_reaches_only_the_ready_workers() {
    let rig = Rig::new(PolicyKind::RoundRobin, 3);
    let ws: Vec<Worker> = (0..3).map(|slot| worker(&rig.handle, slot)).collect();
    let d = rig.spawn(|| {});
    // Slot 2 never says READY.
    make_ready(&d, &[&ws[0], &ws[1]]);
    let message = |w: &Worker| match w.next() {
        Incoming::Message(m) => m,
        other => panic!("worker {} got {other:?}, not a message", w.slot),
    };

    assert_eq!(d.message(None, b"to all"), 2);
    assert_eq!(message(&ws[0]), b"to all");
    assert_eq!(message(&ws[1]), b"to all");

    assert_eq!(d.message(Some(1), b"to one"), 1);
    assert_eq!(message(&ws[1]), b"to one");
    assert_eq!(d.message(Some(2), b"to a starting one"), 0);

    // A draining worker is not ready either.
    d.send(Command::Drain {
        slot: Slot(0),
        pid: ws[0].pid,
    });
    assert!(matches!(ws[0].next(), Incoming::Drain));
    assert_eq!(d.message(None, b"after drain"), 1);
    assert_eq!(message(&ws[1]), b"after drain");

    ws[0].gets_nothing_for(QUIET);
    ws[2].gets_nothing_for(Duration::ZERO);

    d.stop();
    for w in ws {
        assert!(w.join().is_empty());
    }
}

#[test]
fn shutdown_hands_out_the_backlog_then_drains_every_worker() {
    let mut rig = Rig::new(PolicyKind::RoundRobin, 2);
    let ws = [worker(&rig.handle, 0), worker(&rig.handle, 1)];
    for w in &ws {
        w.ready();
    }
    let mut ready = 0;
    rig.turn_until("both workers ready", |e| {
        ready += usize::from(matches!(e, Event::Ready { .. }));
        ready == 2
    });

    // Driven by hand, the loop is not turning: these wait in the backlog.
    let mut clients: Vec<TcpStream> = (0..10).map(|_| client(rig.addr)).collect();
    rig.handle.send(Command::Shutdown);
    let events = rig.turn_until("Drained", |e| *e == Event::Drained);
    for w in &ws {
        let draining = Event::Draining {
            slot: Slot(w.slot),
            pid: w.pid,
        };
        assert!(events.contains(&draining), "{events:?}");
    }

    // Each worker: its connections, then DRAIN, then nothing.
    for w in &ws {
        let mut conns = 0;
        loop {
            match w.next() {
                Incoming::Conn(_) => conns += 1,
                Incoming::Drain => break,
                other => panic!("worker {} got {other:?}", w.slot),
            }
        }
        assert_eq!(conns, 5, "worker {}", w.slot);
        w.gets_nothing_for(QUIET);
    }
    let mut served: Vec<usize> = clients.iter_mut().map(served_by).collect();
    served.sort();
    assert_eq!(served, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]);
    let stats = rig.dispatcher.stats();
    assert_eq!((stats.accepted, stats.dispatched), (10, 10));
    assert!(
        TcpStream::connect(rig.addr).is_err(),
        "the listener is closed"
    );

    drop(rig);
    for w in ws {
        assert!(w.join().is_empty());
    }
}

/// `lb upgrade`'s hand-over: the loop gives up its listener and its
/// workers' links, a client that connects before the next loop runs is
/// queued by the kernel, and the next loop serves it and the rest through
/// the same workers, its counts going on.
#[test]
fn a_handover_gives_the_listener_and_the_workers_to_the_next_loop() {
    let rig = Rig::new(PolicyKind::RoundRobin, 2);
    let ws: Vec<Worker> = (0..2).map(|slot| worker(&rig.handle, slot)).collect();
    let d = rig.spawn(|| {});
    make_ready(&d, &[&ws[0], &ws[1]]);
    let mut first = served_in_turn(&d, 2);
    first.sort_unstable();
    assert_eq!(first, [0, 1]);
    take(&ws[0], 1);
    take(&ws[1], 1);

    let (tx, rx) = crossbeam_channel::bounded(1);
    d.send(Command::Handover(tx));
    let handover = rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(handover.workers.len(), 2);
    assert_eq!(handover.stats.accepted, 2);
    let addr = d.addr;
    d.stop();
    // Nobody accepts now: the kernel queues it.
    let mut waiting = client(addr);

    let next = Rig::taking_over(handover, PolicyKind::RoundRobin, 2).spawn(|| {});
    let slot = served_by(&mut waiting);
    take(&ws[slot], 1);
    let mut again = served_in_turn(&next, 2);
    again.sort_unstable();
    assert_eq!(again, [0, 1], "both workers serve again, with no READY");
    take(&ws[0], 1);
    take(&ws[1], 1);
    let s = next.snapshot();
    assert_eq!(s.stats.accepted, 5, "the counts go on");
    next.stop();
    for w in ws {
        w.join();
    }
}

/// A hand-over nobody takes (the supervisor gave up waiting) is taken
/// back: the loop serves on.
#[test]
fn a_handover_nobody_takes_is_taken_back() {
    let rig = Rig::new(PolicyKind::RoundRobin, 1);
    let w = worker(&rig.handle, 0);
    let d = rig.spawn(|| {});
    make_ready(&d, &[&w]);
    let (tx, rx) = crossbeam_channel::bounded(1);
    drop(rx);
    d.send(Command::Handover(tx));
    assert_eq!(served_in_turn(&d, 3), [0, 0, 0]);
    take(&w, 3);
    d.stop();
    assert!(w.join().is_empty());
}
