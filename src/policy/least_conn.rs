//! Least-connections: the eligible worker with the fewest active connections
//! relative to its weight (`active / weight`, compared by cross-multiplying,
//! as nginx's `least_conn` does). Ties are broken round-robin: the scan
//! starts after the previous winner, and the first of equals wins.

use super::{Policy, Slot, WorkerView};

#[derive(Debug, Default)]
pub struct LeastConn {
    next: usize,
}

/// `a` carries strictly less load per unit of weight than `b`.
#[inline]
fn lighter(a: &WorkerView, b: &WorkerView) -> bool {
    u64::from(a.active) * u64::from(b.weight.max(1))
        < u64::from(b.active) * u64::from(a.weight.max(1))
}

impl Policy for LeastConn {
    fn pick(&mut self, workers: &[WorkerView]) -> Option<Slot> {
        let n = workers.len();
        let mut i = if self.next < n { self.next } else { 0 };
        let mut best: Option<usize> = None;
        for _ in 0..n {
            let w = &workers[i];
            if w.eligible && best.is_none_or(|b| lighter(w, &workers[b])) {
                best = Some(i);
            }
            i = if i + 1 == n { 0 } else { i + 1 };
        }
        let b = best?;
        self.next = b + 1;
        Some(Slot(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::views;

    #[test]
    fn picks_the_least_loaded() {
        let mut p = LeastConn::default();
        let mut w = views(3);
        w[0].active = 5;
        w[1].active = 2;
        w[2].active = 7;
        assert_eq!(p.pick(&w), Some(Slot(1)));
        assert_eq!(p.pick(&w), Some(Slot(1)));
    }

    #[test]
    fn ties_are_broken_round_robin() {
        let mut p = LeastConn::default();
        let w = views(3);
        let seq: Vec<_> = (0..6).map(|_| p.pick(&w).unwrap().0).collect();
        assert_eq!(seq, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn fills_up_evenly_when_nothing_closes() {
        let mut p = LeastConn::default();
        let mut w = views(3);
        for _ in 0..9 {
            let s = p.pick(&w).unwrap();
            w[s.0].active += 1;
        }
        assert!(w.iter().all(|v| v.active == 3));
    }

    #[test]
    fn steers_away_from_a_worker_holding_long_connections() {
        let mut p = LeastConn::default();
        let mut w = views(2);
        w[0].active = 4; // long-lived connections held by worker 0
        for _ in 0..10 {
            let s = p.pick(&w).unwrap();
            assert_eq!(s, Slot(1));
            // a short connection: opened and closed before the next pick
        }
    }

    #[test]
    fn weight_scales_the_share() {
        let mut p = LeastConn::default();
        let mut w = views(2);
        w[0].weight = 3;
        w[0].active = 2;
        w[1].active = 1; // 2/3 < 1/1
        assert_eq!(p.pick(&w), Some(Slot(0)));
    }

    #[test]
    fn skips_ineligible() {
        let mut p = LeastConn::default();
        let mut w = views(2);
        w[1].active = 10;
        w[0].eligible = false;
        assert_eq!(p.pick(&w), Some(Slot(1)));
        w[1].eligible = false;
        assert_eq!(p.pick(&w), None);
    }
}
