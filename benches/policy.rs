//! ns per `Policy::pick` for 2, 8 and 64 workers, each policy, in steady
//! state (all eligible, least-conn with varied loads).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lb::policy::{PolicyKind, WorkerView};

fn views(n: usize) -> Vec<WorkerView> {
    (0..n)
        .map(|i| WorkerView {
            eligible: true,
            weight: 1 + (i % 3) as u32,
            active: (i * 7 % 11) as u32,
        })
        .collect()
}

fn picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for kind in [
        PolicyKind::RoundRobin,
        PolicyKind::Weighted,
        PolicyKind::LeastConn,
    ] {
        for n in [2usize, 8, 64] {
            let mut policy = kind.build(n);
            let mut w = views(n);
            group.bench_with_input(BenchmarkId::new(kind.name(), n), &n, |b, _| {
                b.iter(|| {
                    let s = policy.pick(black_box(&w)).unwrap();
                    // Keep least-conn's input moving like real traffic.
                    w[s.0].active = w[s.0].active.wrapping_add(1) & 15;
                    s
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, picks);
criterion_main!(benches);
