//! The in-process hand-off: connections waiting in the listener's backlog go
//! through the real `Dispatcher` (accept4 → pick → sendmmsg → close) to two
//! workers on real socketpairs, which take and close them on threads of
//! their own and report closes. Criterion's throughput is connections/s.
//!
//! `node/…` rows: the same through Node.js's cluster IPC to threads that
//! answer as Node workers do (one connection in flight per worker, a JSON
//! ACK and reply each). `proxy/…`: accept, connect to the worker's port,
//! relay set-up (counted when the connect completes).
//!
//! The dispatcher is driven on the bench thread: each batch first fills the
//! backlog (not timed; nothing accepts meanwhile), then `Dispatcher::turn`
//! is timed until every connection of the batch has been dispatched.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lb::dispatch::Command;
use lb::policy::PolicyKind;

#[path = "../tests/support/inproc.rs"]
mod inproc;
use inproc::{Kind, Rig};

/// Connections per timed batch (below the listen backlog).
const BATCH: u64 = 256;
const WORKERS: usize = 2;

fn handoff(c: &mut Criterion) {
    let mut group = c.benchmark_group("handoff");
    group.throughput(Throughput::Elements(1));
    for (policy, kind) in [
        (PolicyKind::RoundRobin, Kind::Native),
        (PolicyKind::Weighted, Kind::Native),
        (PolicyKind::LeastConn, Kind::Native),
        (PolicyKind::RoundRobin, Kind::Node),
        (PolicyKind::LeastConn, Kind::Node),
        (PolicyKind::RoundRobin, Kind::Proxy),
    ] {
        let mut rig = Rig::new(policy, WORKERS);
        // Detached: they end with the process.
        drop(rig.serve(kind, WORKERS, drop));
        let Rig {
            dispatcher: mut d,
            handle,
            addr,
            ..
        } = rig;
        let name = match kind {
            Kind::Native => policy.name().to_string(),
            Kind::NativeSingle => format!("single/{}", policy.name()),
            Kind::Node => format!("node/{}", policy.name()),
            Kind::Proxy => format!("proxy/{}", policy.name()),
            Kind::Kernel => {
                unreachable!("not here: under kernel dispatch the master hands out nothing")
            }
        };
        // Until both workers are ready and one connection went through.
        let first = TcpStream::connect(addr).unwrap();
        while d.stats().dispatched < 1 {
            d.turn(Some(Duration::from_millis(10))).unwrap();
        }
        drop(first);
        group.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let n = BATCH.min(iters - done);
                    let clients: Vec<TcpStream> =
                        (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect();
                    let target = d.stats().dispatched + n;
                    let start = Instant::now();
                    while d.stats().dispatched < target {
                        d.turn(Some(Duration::from_millis(100))).unwrap();
                    }
                    total += start.elapsed();
                    drop(clients);
                    done += n;
                }
                total
            })
        });
        handle.send(Command::Shutdown);
        for _ in 0..10 {
            d.turn(Some(Duration::from_millis(10))).unwrap();
        }
    }
    group.finish();
}

criterion_group!(benches, handoff);
criterion_main!(benches);
