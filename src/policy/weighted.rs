//! Smooth weighted round-robin, nginx's algorithm
//! (`ngx_http_upstream_get_peer`): every pick, each eligible worker's current
//! weight grows by its weight; the largest wins and is lowered by the total.
//! Weights 5,1,1 give `a a b a c a a`: proportional and interleaved, never
//! a burst of five.

use super::{Policy, Slot, WorkerView};

#[derive(Debug, Default)]
pub struct SmoothWeighted {
    current: Vec<i64>,
}

impl Policy for SmoothWeighted {
    fn pick(&mut self, workers: &[WorkerView]) -> Option<Slot> {
        if self.current.len() < workers.len() {
            // Only when slots were added without `resize`; never in steady state.
            self.current.resize(workers.len(), 0);
        }
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for (i, w) in workers.iter().enumerate() {
            if !w.eligible {
                continue;
            }
            let weight = i64::from(w.weight.max(1));
            self.current[i] += weight;
            total += weight;
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        self.current[b] -= total;
        Some(Slot(b))
    }

    fn resize(&mut self, slots: usize) {
        self.current.resize(slots, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::views;

    fn weighted(ws: &[u32]) -> Vec<WorkerView> {
        let mut v = views(ws.len());
        for (view, &w) in v.iter_mut().zip(ws) {
            view.weight = w;
        }
        v
    }

    #[test]
    fn nginx_sequence_for_5_1_1() {
        let mut p = SmoothWeighted::default();
        p.resize(3);
        let w = weighted(&[5, 1, 1]);
        let seq: String = (0..7)
            .map(|_| (b'a' + p.pick(&w).unwrap().0 as u8) as char)
            .collect();
        assert_eq!(seq, "aabacaa");
    }

    #[test]
    fn split_is_exactly_proportional_per_cycle() {
        let mut p = SmoothWeighted::default();
        p.resize(3);
        let w = weighted(&[3, 1, 2]);
        let mut count = [0; 3];
        for _ in 0..600 {
            count[p.pick(&w).unwrap().0] += 1;
        }
        assert_eq!(count, [300, 100, 200]);
    }

    #[test]
    fn equal_weights_are_round_robin() {
        let mut p = SmoothWeighted::default();
        p.resize(3);
        let seq: Vec<_> = (0..6).map(|_| p.pick(&views(3)).unwrap().0).collect();
        assert_eq!(seq, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn ineligible_workers_neither_win_nor_count() {
        let mut p = SmoothWeighted::default();
        p.resize(3);
        let mut w = weighted(&[5, 1, 1]);
        w[0].eligible = false;
        let seq: Vec<_> = (0..4).map(|_| p.pick(&w).unwrap().0).collect();
        assert_eq!(seq, [1, 2, 1, 2]);
        w[1].eligible = false;
        w[2].eligible = false;
        assert_eq!(p.pick(&w), None);
    }
}
