//! Kernel dispatch's costs, all off the per-connection path (the kernel
//! picks; lb runs none of this per connection): computing a schedule for
//! 2, 8 and 64 ready workers, and a whole least-connections refresh
//! (`Steering::steer`: an `fstat` and a `getsockopt` per worker, and the
//! map writes when the schedule changed), which runs at most once a
//! millisecond while workers report. The refresh needs BPF (root, or
//! CAP_BPF and CAP_NET_ADMIN); without it that group says so and is
//! skipped.

use std::hint::black_box;
use std::net::TcpListener;
use std::os::fd::AsFd;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lb::dispatch::kernel::{self, Steering, Target};
use lb::policy::{LeastConn, PolicyKind, WorkerView};

fn views(n: usize) -> Vec<WorkerView> {
    (0..n)
        .map(|i| WorkerView {
            eligible: true,
            weight: 1 + (i % 3) as u32,
            active: (i * 7 % 11) as u32,
        })
        .collect()
}

fn schedules(c: &mut Criterion) {
    let mut group = c.benchmark_group("schedule");
    for n in [2usize, 8, 64] {
        let v = views(n);
        for kind in [PolicyKind::RoundRobin, PolicyKind::Weighted] {
            group.bench_with_input(BenchmarkId::new(kind.name(), n), &n, |b, _| {
                b.iter(|| kernel::schedule(kind, black_box(&v)))
            });
        }
        let mut lc = LeastConn::default();
        let mut out = Vec::with_capacity(kernel::SCHEDULE_MAX);
        // 20 connections since the last refresh: 20,000/s at 1 ms.
        group.bench_with_input(BenchmarkId::new("least-conn/20", n), &n, |b, _| {
            b.iter(|| {
                let mut v = v.clone();
                kernel::least_conn(&mut lc, &mut v, black_box(20), &mut out);
                out.len()
            })
        });
    }
    group.finish();
}

fn refresh(c: &mut Criterion) {
    let mut steering = match Steering::new(PolicyKind::LeastConn) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("refresh: skipped, BPF programs cannot be loaded here ({e})");
            return;
        }
    };
    let anchor = kernel::slot_listener("127.0.0.1:0".parse().unwrap(), 128).unwrap();
    let addr = TcpListener::from(anchor.try_clone().unwrap())
        .local_addr()
        .unwrap();
    steering.attach(anchor.as_fd()).unwrap();
    let mut group = c.benchmark_group("refresh");
    for n in [2usize, 8] {
        let listeners: Vec<_> = (0..n)
            .map(|_| kernel::slot_listener(addr, 128).unwrap())
            .collect();
        let mut round = 0u64;
        group.bench_with_input(BenchmarkId::new("least-conn", n), &n, |b, _| {
            b.iter(|| {
                round += 1;
                steering.arrivals = 20;
                // Loads that change every time, so the maps are written.
                let targets = listeners.iter().enumerate().map(|(slot, l)| Target {
                    slot,
                    listener: l.as_fd(),
                    weight: 1,
                    active: (round + slot as u64) % 7,
                });
                steering.steer(targets).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, schedules, refresh);
criterion_main!(benches);
