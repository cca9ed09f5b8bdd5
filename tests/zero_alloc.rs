//! The hot path allocates nothing: a counting global allocator watches the
//! dispatch thread while real TCP connections go through the real
//! `Dispatcher` to workers on real socketpairs.
//!
//! Its own test target because a `#[global_allocator]` applies to the whole
//! binary.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lb::policy::PolicyKind;

mod support;
use support::inproc::{Kind, Rig};

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// The counter is global: one test at a time, or one's dispatch thread
/// counts in the other's window.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

thread_local! {
    /// Set on the dispatch thread only: allocations elsewhere (clients,
    /// workers, the test harness) are not the hot path's.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

struct Counting;

// SAFETY: every method forwards to the system allocator with the caller's
// arguments unchanged; counting touches only an atomic and a const-initialised
// thread-local (which never allocates).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTED.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTED.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const WORKERS: usize = 2;

/// Connects, waits for the worker's one byte (so the connection really went
/// through), and resets (linger 0: no TIME_WAIT across 100k connections).
fn connections(addr: SocketAddr, n: usize) {
    connections_sending(addr, n, [b"", b""]);
}

/// [`connections`] whose clients first send `first[i]` (client thread i).
fn connections_sending(addr: SocketAddr, n: usize, first: [&'static [u8]; 2]) {
    bursts_sending(addr, n, 1, first);
}

/// [`connections_sending`], each client thread opening `burst` connections
/// at once before it waits for their answers: the dispatcher then accepts
/// several per wake-up, and a batching worker gets several per CONN.
fn bursts_sending(addr: SocketAddr, n: usize, burst: usize, first: [&'static [u8]; 2]) {
    let threads: Vec<_> = (0..2)
        .map(|i| {
            let first = first[i];
            std::thread::spawn(move || {
                let mut left = n / 2;
                while left > 0 {
                    let now = burst.min(left);
                    left -= now;
                    let streams: Vec<TcpStream> = (0..now)
                        .map(|_| {
                            let mut s = TcpStream::connect(addr).unwrap();
                            if !first.is_empty() {
                                s.write_all(first).unwrap();
                            }
                            s
                        })
                        .collect();
                    for mut s in streams {
                        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b).unwrap();
                        socket2::SockRef::from(&s)
                            .set_linger(Some(Duration::ZERO))
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Connections in bursts of `burst` (1: one at a time per client thread):
/// the allocations counted over the measured ones, and the stats.
fn run(
    policy: PolicyKind,
    kind: Kind,
    burst: usize,
    warmup: usize,
    measured: usize,
) -> (u64, lb::dispatch::Stats) {
    let mut rig = Rig::new(policy, WORKERS);
    // As the master runs it (stall_timeout's default), the once-a-second
    // stall watch included.
    rig.dispatcher
        .watch_stalls(std::time::Duration::from_secs(30), 768);
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let serve = move |mut s: TcpStream| {
        s.set_nonblocking(false).unwrap();
        let _ = s.write_all(b"!");
        counter.fetch_add(1, Ordering::Relaxed);
    };
    let workers = rig.serve(kind, WORKERS, serve);
    let running = rig.spawn(|| COUNTED.with(|c| c.set(true)));
    let addr = running.addr;

    bursts_sending(addr, warmup, burst, [b"", b""]);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    bursts_sending(addr, measured, burst, [b"", b""]);
    let after = ALLOCATIONS.load(Ordering::Relaxed);

    let stats = running.shutdown(workers);
    assert_eq!(stats.dispatched as usize, warmup + measured);
    assert_eq!(received.load(Ordering::Relaxed) as usize, warmup + measured);
    (after - before, stats)
}

#[test]
fn dispatch_allocates_nothing_per_connection() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // First, that the counter sees an allocation on a counted thread at all
    // (in this test, not a parallel one: the counter is global).
    let seen = std::thread::spawn(|| {
        COUNTED.with(|c| c.set(true));
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        drop(std::hint::black_box(vec![1u8; 32]));
        ALLOCATIONS.load(Ordering::Relaxed) - before
    })
    .join()
    .unwrap();
    assert!(seen >= 1, "the counting allocator is not counting");

    for (policy, kind, burst, measured) in [
        (PolicyKind::LeastConn, Kind::Native, 1, 100_000),
        (PolicyKind::RoundRobin, Kind::Native, 1, 20_000),
        (PolicyKind::Weighted, Kind::Native, 1, 20_000),
        // Workers older than BATCH: one connection to a CONN.
        (PolicyKind::LeastConn, Kind::NativeSingle, 1, 20_000),
        (PolicyKind::RoundRobin, Kind::NativeSingle, 16, 20_000),
        // Batching workers in bursts: several connections to a CONN.
        (PolicyKind::LeastConn, Kind::Native, 16, 20_000),
        (PolicyKind::RoundRobin, Kind::Native, 16, 20_000),
        // Node.js cluster workers: newconn out, ACK + reply + close report in.
        (PolicyKind::LeastConn, Kind::Node, 1, 20_000),
        (PolicyKind::RoundRobin, Kind::Node, 1, 20_000),
        // Proxy mode: connect, relay with splice, close, from the slab.
        (PolicyKind::LeastConn, Kind::Proxy, 1, 20_000),
    ] {
        let mode = format!("{kind:?}, bursts of {burst}");
        let (allocations, stats) = run(policy, kind, burst, 2_000, measured);
        let (dispatched, messages) = (stats.dispatched, stats.conn_messages);
        eprintln!(
            "{policy} ({mode}): {allocations} allocations on the dispatch thread over {measured} \
             connections ({dispatched} dispatched in all, in {messages} CONNs)"
        );
        match kind {
            Kind::NativeSingle => assert_eq!(messages, dispatched, "one fd to a CONN"),
            // Bursts reached a batching worker as CONNs of several fds.
            Kind::Native if burst > 1 => assert!(messages < dispatched, "{mode}: no batching"),
            _ => {}
        }
        assert_eq!(
            allocations, 0,
            "{policy} ({mode}): the hot path allocated {allocations} times over {measured} connections"
        );
    }
}

/// v1 from one client thread, v2 (over IPv6, with a TLV) from the other,
/// each followed by the application's first byte `x`.
const V1: &[u8] = b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\nx";
const V2: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x28\
    \x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x07\
    \x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\
    \x10\x92\x00\x50\x04\x00\x01\x00x";

/// PROXY headers on: each connection waits in the header stage (or not:
/// its header came with the handshake), is read to the byte, and goes to a
/// worker that takes the client's address in its CONN's payload.
#[test]
fn proxy_headers_allocate_nothing_per_connection() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    proxy_headers(0, 1);
    // Batching workers in bursts: a CONN carries one address line per fd.
    proxy_headers(lb::proto::wire::ready::BATCH, 16);
}

fn proxy_headers(flags: u64, burst: usize) {
    let mut rig = Rig::new(PolicyKind::LeastConn, WORKERS);
    rig.dispatcher
        .watch_stalls(std::time::Duration::from_secs(30), 768);
    rig.read_proxy_headers();
    let received = Arc::new(AtomicU64::new(0));
    let wrong = Arc::new(AtomicU64::new(0));
    let (counter, miss) = (Arc::clone(&received), Arc::clone(&wrong));
    let serve = move |mut s: TcpStream| {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // The header is gone: the application's first byte is first.
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).is_err() || b != *b"x" {
            miss.fetch_add(1, Ordering::Relaxed);
        }
        let _ = s.write_all(b"!");
        counter.fetch_add(1, Ordering::Relaxed);
    };
    let workers = rig.serve_peers(WORKERS, flags, serve);
    let running = rig.spawn(|| COUNTED.with(|c| c.set(true)));
    let addr = running.addr;
    let (warmup, measured) = (2_000, 20_000);
    bursts_sending(addr, warmup, burst, [V1, V2]);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    bursts_sending(addr, measured, burst, [V1, V2]);
    let after = ALLOCATIONS.load(Ordering::Relaxed);
    let stats = running.shutdown(workers);
    assert_eq!(stats.dispatched as usize, warmup + measured);
    assert_eq!(received.load(Ordering::Relaxed) as usize, warmup + measured);
    assert_eq!(
        wrong.load(Ordering::Relaxed),
        0,
        "a worker got header bytes"
    );
    assert_eq!(
        (stats.proxy.v1 + stats.proxy.v2) as usize,
        warmup + measured
    );
    eprintln!(
        "PROXY headers (native, READY flags {flags}, bursts of {burst}): {} allocations on \
         the dispatch thread over {measured} connections, in {} CONNs",
        after - before,
        stats.conn_messages
    );
    assert_eq!(after - before, 0, "the PROXY path allocated");
}

/// Kernel dispatch: the master hands out nothing, but under
/// least-connections it reads every worker's ACCEPTED and CLOSED reports
/// and refreshes the program's schedule each millisecond they come; none
/// of that may allocate either. Skipped (said) where BPF cannot be loaded.
#[test]
fn kernel_dispatch_allocates_nothing_per_connection() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for policy in [PolicyKind::LeastConn, PolicyKind::RoundRobin] {
        let Some(mut rig) = Rig::kernel(policy, WORKERS) else {
            return;
        };
        rig.dispatcher
            .watch_stalls(std::time::Duration::from_secs(30), 768);
        let received = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&received);
        let serve = move |mut s: TcpStream| {
            s.set_nonblocking(false).unwrap();
            let _ = s.write_all(b"!");
            counter.fetch_add(1, Ordering::Relaxed);
        };
        let workers = rig.serve(Kind::Kernel, WORKERS, serve);
        let running = rig.spawn(|| COUNTED.with(|c| c.set(true)));
        for _ in 0..WORKERS {
            running.events_until(|e| matches!(e, lb::dispatch::Event::Ready { .. }));
        }
        let (warmup, measured) = (2_000, 20_000);
        connections(running.addr, warmup);
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        connections(running.addr, measured);
        let after = ALLOCATIONS.load(Ordering::Relaxed);
        // Every connection was reported (the reports were read).
        let total = warmup + measured;
        let snapshot = running.snapshot_until("every ACCEPTED read", |s| {
            policy != PolicyKind::LeastConn
                || s.workers.iter().map(|w| w.total).sum::<u64>() == total as u64
        });
        let stats = running.shutdown(workers);
        assert_eq!(received.load(Ordering::Relaxed) as usize, total);
        assert_eq!(stats.dispatched, 0, "the master handed out nothing");
        let split: Vec<u64> = snapshot.workers.iter().map(|w| w.total).collect();
        eprintln!(
            "{policy} (kernel): {} allocations on the dispatch thread over {measured} \
             connections (reported per worker: {split:?})",
            after - before
        );
        assert_eq!(
            after - before,
            0,
            "{policy} (kernel): the dispatch thread allocated over {measured} connections"
        );
    }
}
