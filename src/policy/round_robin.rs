//! Round-robin: each eligible worker in turn; ineligible ones are skipped
//! without losing the rotation.

use super::{Policy, Slot, WorkerView};

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: usize,
}

impl Policy for RoundRobin {
    fn pick(&mut self, workers: &[WorkerView]) -> Option<Slot> {
        let n = workers.len();
        let mut i = if self.next < n { self.next } else { 0 };
        for _ in 0..n {
            if workers[i].eligible {
                self.next = i + 1;
                return Some(Slot(i));
            }
            i = if i + 1 == n { 0 } else { i + 1 };
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::views;

    fn picks(p: &mut RoundRobin, w: &[WorkerView], n: usize) -> Vec<usize> {
        (0..n).map(|_| p.pick(w).unwrap().0).collect()
    }

    #[test]
    fn rotates_through_all() {
        let mut p = RoundRobin::default();
        assert_eq!(picks(&mut p, &views(3), 7), [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn skips_ineligible_and_keeps_order() {
        let mut p = RoundRobin::default();
        let mut w = views(4);
        w[1].eligible = false;
        assert_eq!(picks(&mut p, &w, 6), [0, 2, 3, 0, 2, 3]);
        w[1].eligible = true;
        assert_eq!(picks(&mut p, &w, 4), [0, 1, 2, 3]);
    }

    #[test]
    fn none_when_nobody_is_eligible() {
        let mut p = RoundRobin::default();
        let mut w = views(2);
        w[0].eligible = false;
        w[1].eligible = false;
        assert_eq!(p.pick(&w), None);
    }

    #[test]
    fn survives_the_pool_shrinking() {
        let mut p = RoundRobin::default();
        picks(&mut p, &views(5), 4);
        assert_eq!(picks(&mut p, &views(2), 3), [0, 1, 0]);
    }
}
