//! The dispatcher's proxy mode end to end, in process.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::config::Mode;
use crate::dispatch::{Command, Dispatcher, Event, Handle, Notifier, Snapshot};
use crate::policy::{PolicyKind, Slot};

const WAIT: Duration = Duration::from_secs(10);

/// A dispatcher with `relays` relay slots on its own thread.
fn dispatcher(
    relays: usize,
    connect: Duration,
    idle: Option<Duration>,
) -> (Handle, SocketAddr, crate::dispatch::EventQueues) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (notifier, events) = Notifier::new(None);
    let (mut d, handle) = Dispatcher::new(listener, PolicyKind::RoundRobin, 2, notifier).unwrap();
    d.enable_proxy(relays, Duration::from_secs(1)).unwrap();
    d.set_proxy_timeouts(connect, idle);
    std::thread::spawn(move || d.run().unwrap());
    (handle, addr, events)
}

/// Attaches a proxy worker on `port` in `slot` and waits for its READY.
fn attach(handle: &Handle, events: &crate::dispatch::EventQueues, slot: usize, port: u16) {
    handle.send(Command::Attach {
        slot: Slot(slot),
        pid: slot as u32 + 1,
        channel: None,
        peer: None,
        weight: 1,
        mode: Mode::Proxy,
        port,
        send_proxy: Default::default(),
        listener: None,
    });
    loop {
        match events.lifecycle.recv_timeout(WAIT) {
            Ok(Event::Ready { slot: s, .. }) if s == Slot(slot) => return,
            Ok(_) => {}
            Err(e) => panic!("slot {slot} never ready: {e}"),
        }
    }
}

fn snapshot(handle: &Handle) -> Snapshot {
    let (tx, rx) = crossbeam_channel::bounded(1);
    handle.send(Command::Snapshot(tx));
    rx.recv_timeout(WAIT).unwrap()
}

/// A worker that accepts and hands each relayed connection to the test
/// (the first connection is lb's readiness probe).
fn holding_worker() -> (u16, mpsc::Receiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming().skip(1) {
            let Ok(conn) = conn else { return };
            if tx.send(conn).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

/// Reads until EOF or an error; how the stream ended.
fn ended(s: &mut TcpStream) -> Result<(), std::io::Error> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(e),
        }
    }
}

/// A relay that moves nothing for the idle timeout is reset on both
/// sides, and counted; one that keeps moving bytes, even one at a time,
/// is not.
#[test]
fn an_idle_relay_is_reset_on_both_sides_and_counted() {
    let idle = Duration::from_millis(300);
    let (handle, addr, events) = dispatcher(4, Duration::from_secs(5), Some(idle));
    let (port, accepted) = holding_worker();
    attach(&handle, &events, 0, port);

    let mut busy = TcpStream::connect(addr).unwrap();
    let mut busy_up = accepted.recv_timeout(WAIT).unwrap();
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled.write_all(b"GET / HT").unwrap();
    let started = Instant::now();
    let mut stalled_up = accepted.recv_timeout(WAIT).unwrap();
    // A byte every 100 ms for 3 idle timeouts keeps `busy` open.
    busy_up.set_read_timeout(Some(WAIT)).unwrap();
    for _ in 0..9 {
        busy.write_all(b".").unwrap();
        let mut b = [0u8; 1];
        busy_up.read_exact(&mut b).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let e = ended(&mut stalled).expect_err("the client side is reset");
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    assert!(
        started.elapsed() >= idle,
        "reset after {:?}",
        started.elapsed()
    );
    let mut got = [0u8; 8];
    stalled_up.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"GET / HT", "what the client sent went through");
    let e = ended(&mut stalled_up).expect_err("the worker side is reset");
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    busy.write_all(b"!").unwrap();
    let mut b = [0u8; 1];
    busy_up.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"!", "the busy relay is still open");
    let stats = snapshot(&handle).stats;
    assert_eq!(
        (stats.proxy_idle_timeouts, stats.proxy_connect_timeouts),
        (1, 0)
    );
    // Once quiet, it goes the same way.
    let e = ended(&mut busy).expect_err("reset once idle");
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    assert_eq!(snapshot(&handle).stats.proxy_idle_timeouts, 2);
    handle.send(Command::Stop);
}

/// A connect to a worker whose accept queue is full (it listens with a
/// backlog of 0, never accepts, and lb's probe took the one place)
/// hangs: after the connect timeout the client goes to the other
/// worker, with what it sent, and the hung worker is out until a probe
/// gets through.
#[test]
fn a_connect_that_times_out_goes_to_another_worker() {
    let connect = Duration::from_millis(200);
    let (handle, addr, events) = dispatcher(4, connect, None);
    let hole = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    hole.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    hole.listen(0).unwrap();
    let hole_port = hole.local_addr().unwrap().as_socket().unwrap().port();
    attach(&handle, &events, 0, hole_port);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().skip(1) {
            let Ok(mut conn) = conn else { return };
            let mut b = [0u8; 5];
            if conn.read_exact(&mut b).is_ok() && &b == b"hello" {
                let _ = conn.write_all(b"1");
            }
        }
    });
    attach(&handle, &events, 1, port);
    // Round-robin sends one of the first two to the hung worker.
    for _ in 0..3 {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"hello").unwrap();
        c.set_read_timeout(Some(WAIT)).unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"1");
    }
    let stats = snapshot(&handle).stats;
    assert_eq!(
        (stats.proxy_connect_timeouts, stats.dispatched),
        (1, 3),
        "{stats:?}"
    );
    // Its probes keep timing out, so it stays out.
    std::thread::sleep(connect * 3);
    let snap = snapshot(&handle);
    assert!(!snap.workers.iter().any(|w| w.slot == Slot(0) && w.taking));
    assert_eq!(snap.stats.proxy_connect_timeouts, 1);
    drop(hole);
    handle.send(Command::Stop);
}
