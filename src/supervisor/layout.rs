//! Which pool each slot runs, as pools grow and shrink at run time.
//!
//! A slot is a worker's identity for its whole life (`LB_WORKER_ID`, the
//! log lines, status, metrics), so a running worker's slot never changes
//! number: at start the pools take slots in order (`web` 0–3, `canary` 4);
//! a pool that grows takes the lowest free slot, else one past the last; a
//! pool that shrinks gives up its highest slots; free slots at the end are
//! dropped. So after `web` grows by one, it runs slots 0–3 and 5 while
//! `canary` keeps 4; after `web` shrinks by one again, slot 5 goes.

use crate::config::Pool;
use crate::policy::Slot;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// By slot: the index of its pool in the configuration, or `None` for
    /// a free slot (one whose last worker may still be draining).
    slots: Vec<Option<usize>>,
}

/// What a reload's new pools make of a layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remap {
    /// Kept slots with their pool's new index; added and removed as below.
    pub layout: Layout,
    /// Slots new to a pool (free until now), lowest first.
    pub added: Vec<Slot>,
    /// Slots no pool runs any more (their pool is gone or smaller): free in
    /// `layout`, never among `added`, their workers still to be drained.
    pub removed: Vec<Slot>,
}

/// Each pool's count, by name (what a reload compares with the next).
pub fn configured(pools: &[Pool]) -> Vec<(String, usize)> {
    pools.iter().map(|p| (p.name.clone(), p.count)).collect()
}

impl Layout {
    /// The pools in order, each `count` slots.
    pub fn new(pools: &[Pool]) -> Layout {
        Layout {
            slots: pools
                .iter()
                .enumerate()
                .flat_map(|(i, p)| std::iter::repeat_n(Some(i), p.count))
                .collect(),
        }
    }

    /// An earlier image's layout (`lb upgrade`), by pool name; a name
    /// the configuration no longer has leaves its slot free.
    pub fn from_names(slots: &[Option<String>], pools: &[String]) -> Layout {
        let mut layout = Layout {
            slots: slots
                .iter()
                .map(|n| n.as_ref().and_then(|n| pools.iter().position(|p| p == n)))
                .collect(),
        };
        layout.trim();
        layout
    }

    /// Slots, free ones between taken ones included.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// The pool `slot` runs, if any.
    pub fn pool(&self, slot: Slot) -> Option<usize> {
        self.slots.get(slot.0).copied().flatten()
    }

    /// Pool `pool`'s slots, lowest first.
    pub fn slots_of(&self, pool: usize) -> Vec<Slot> {
        (0..self.slots.len())
            .filter(|&s| self.slots[s] == Some(pool))
            .map(Slot)
            .collect()
    }

    /// How many slots some pool runs (`len` less the free ones).
    pub fn planned(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Every slot some pool runs, lowest first.
    pub fn taken(&self) -> Vec<Slot> {
        (0..self.slots.len())
            .filter(|&s| self.slots[s].is_some())
            .map(Slot)
            .collect()
    }

    /// Gives pool `pool` `n` more slots: the lowest free ones not in
    /// `avoid`, then new ones at the end.
    pub fn grow(&mut self, pool: usize, n: usize, avoid: &[Slot]) -> Vec<Slot> {
        let mut added = Vec::with_capacity(n);
        let mut s = 0;
        while added.len() < n {
            if s == self.slots.len() {
                self.slots.push(None);
            }
            if self.slots[s].is_none() && !avoid.contains(&Slot(s)) {
                self.slots[s] = Some(pool);
                added.push(Slot(s));
            }
            s += 1;
        }
        added
    }

    /// Takes `n` slots from pool `pool`, its highest first; they are free
    /// (still counted in `len` until `trim`).
    pub fn shrink(&mut self, pool: usize, n: usize) -> Vec<Slot> {
        let mut removed = self.slots_of(pool);
        removed.reverse();
        removed.truncate(n);
        for s in &removed {
            self.slots[s.0] = None;
        }
        removed
    }

    /// Drops the free slots at the end; the new length.
    pub fn trim(&mut self) -> usize {
        while self.slots.last() == Some(&None) {
            self.slots.pop();
        }
        self.slots.len()
    }

    /// The layout for `new` pools replacing `old` ones, pools matched by
    /// name: a pool still there keeps its slots (its highest given up if
    /// it shrank, free slots taken if it grew); a pool gone gives up all of
    /// its; a new pool takes free slots. The slots given up are not given
    /// to another pool in the same reload: their workers serve until it
    /// ends.
    pub fn remap(&self, old: &[Pool], new: &[Pool]) -> Remap {
        let index = |name: &str| new.iter().position(|p| p.name == name);
        let mut layout = Layout {
            slots: self
                .slots
                .iter()
                .map(|s| s.and_then(|i| old.get(i)).and_then(|p| index(&p.name)))
                .collect(),
        };
        let mut removed: Vec<Slot> = (0..self.slots.len())
            .filter(|&s| self.slots[s].is_some() && layout.slots[s].is_none())
            .map(Slot)
            .collect();
        let mut added = Vec::new();
        for (i, p) in new.iter().enumerate() {
            let has = layout.slots_of(i).len();
            if has > p.count {
                removed.extend(layout.shrink(i, has - p.count));
            }
        }
        for (i, p) in new.iter().enumerate() {
            let has = layout.slots_of(i).len();
            if has < p.count {
                added.extend(layout.grow(i, p.count - has, &removed));
            }
        }
        removed.sort();
        added.sort();
        Remap {
            layout,
            added,
            removed,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Pools of `sh`, by (name, count).
    pub(crate) fn pools(spec: &[(&str, usize)]) -> Vec<Pool> {
        use clap::Parser;
        let args = crate::cli::Cli::try_parse_from(["lb", "--", "sh"])
            .unwrap()
            .start;
        let path = std::env::var("PATH").ok();
        let env = |k: &str| (k == "PATH").then(|| path.clone()).flatten();
        let sh = crate::config::load(&args, &env).unwrap().pools.remove(0);
        spec.iter()
            .map(|&(name, count)| Pool {
                name: name.into(),
                count,
                ..sh.clone()
            })
            .collect()
    }

    fn slots(l: &Layout) -> Vec<Option<usize>> {
        l.slots.clone()
    }

    #[test]
    fn a_middle_pool_grows_without_moving_anyone() {
        let p = pools(&[("web", 2), ("canary", 1), ("batch", 1)]);
        let mut l = Layout::new(&p);
        assert_eq!(slots(&l), [Some(0), Some(0), Some(1), Some(2)]);
        assert_eq!(l.grow(0, 2, &[]), [Slot(4), Slot(5)]);
        assert_eq!(l.slots_of(0), [Slot(0), Slot(1), Slot(4), Slot(5)]);
        assert_eq!(l.pool(Slot(2)), Some(1));
        // Its highest go first; the end is trimmed, a hole in the middle stays.
        assert_eq!(l.shrink(0, 3), [Slot(5), Slot(4), Slot(1)]);
        assert_eq!(l.trim(), 4);
        assert_eq!(slots(&l), [Some(0), None, Some(1), Some(2)]);
        assert_eq!(l.taken(), [Slot(0), Slot(2), Slot(3)]);
        assert_eq!(l.planned(), 3);
        // The hole is the next slot taken, by any pool.
        assert_eq!(l.grow(2, 2, &[]), [Slot(1), Slot(4)]);
        assert_eq!(l.pool(Slot(1)), Some(2));
        assert_eq!(l.pool(Slot(9)), None);
    }

    #[test]
    fn a_reload_matches_pools_by_name() {
        let old = pools(&[("web", 2), ("canary", 1)]);
        let l = Layout::new(&old);
        // Same counts, other order: every slot kept, its pool renumbered.
        let r = l.remap(&old, &pools(&[("canary", 1), ("web", 2)]));
        assert_eq!(slots(&r.layout), [Some(1), Some(1), Some(0)]);
        assert!(r.added.is_empty() && r.removed.is_empty());
        // web grows, canary goes, batch comes: canary's slot is not reused.
        let r = l.remap(&old, &pools(&[("web", 3), ("batch", 1)]));
        assert_eq!(slots(&r.layout), [Some(0), Some(0), None, Some(0), Some(1)]);
        assert_eq!(r.added, [Slot(3), Slot(4)]);
        assert_eq!(r.removed, [Slot(2)]);
        // web shrinks: its highest slot goes.
        let r = l.remap(&old, &pools(&[("web", 1), ("canary", 2)]));
        assert_eq!(slots(&r.layout), [Some(0), None, Some(1), Some(1)]);
        assert_eq!((r.added, r.removed), (vec![Slot(3)], vec![Slot(1)]));
        // A rename is a pool gone and one new.
        let r = l.remap(&old, &pools(&[("www", 2), ("canary", 1)]));
        assert_eq!(r.removed, [Slot(0), Slot(1)]);
        assert_eq!(r.added, [Slot(3), Slot(4)]);
    }
}
