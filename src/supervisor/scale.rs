//! Scaling: more or fewer slots for a pool at run time (`lb scale [POOL]
//! N|+N|-N`, SIGTTIN, SIGTTOU). Which slots a pool gains or gives up is
//! `layout`'s.

use super::{Phase, SlotState, Supervisor};
use crate::config::defaults::MAX_WORKERS;
use crate::dispatch::Command;
use crate::policy::Slot;

/// Why a master does not scale.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScaleError {
    #[error("the master is stopping")]
    Stopping,
    /// A reload or a restart: `"a reload"`.
    #[error("{0} is in progress; scale once it is done")]
    Busy(&'static str),
    #[error(
        "this master runs {} pools ({}); name the one to scale: lb scale POOL N|+N|-N",
        .0.len(),
        .0.join(", ")
    )]
    Pools(Vec<String>),
    #[error("no pool `{name}`; this master runs {}", .pools.join(", "))]
    NoPool { name: String, pools: Vec<String> },
    #[error("{}{target} workers: give a count from 1 to {max}", pool_prefix(.pool))]
    Count {
        pool: Option<String>,
        target: usize,
        max: usize,
    },
    #[error(
        "pool `{pool}` at {target} workers would make {total} in all, more than the {max} one \
         master runs; give a smaller count"
    )]
    Total {
        pool: String,
        target: usize,
        total: usize,
        max: usize,
    },
}

fn pool_prefix(pool: &Option<String>) -> String {
    pool.as_ref()
        .map_or_else(String::new, |p| format!("pool `{p}`: "))
}

/// A scaling done: a pool (named when there are several) from so many
/// slots to so many.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scaled {
    pub pool: Option<String>,
    pub from: usize,
    pub to: usize,
}

impl std::fmt::Display for Scaled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Scaled { from, to, .. } = *self;
        if let Some(pool) = &self.pool {
            write!(f, "scaled pool `{pool}` ")?;
        } else {
            write!(f, "scaled ")?;
        }
        if to > from {
            write!(f, "from {from} to {to} workers ({} starting)", to - from)
        } else {
            write!(f, "from {from} to {to} workers ({} draining)", from - to)
        }
    }
}

/// The slot count `lb scale` asks for: `count`, or `count` more (fewer, if
/// negative) than `current` when `relative`; below zero is zero.
pub fn target(current: usize, count: i64, relative: bool) -> usize {
    let target = if relative {
        (current as i64).saturating_add(count)
    } else {
        count
    };
    usize::try_from(target).unwrap_or(0)
}

/// The pool `name` names among `pools` (`None`: the only one), by index.
fn pick(pools: &[String], name: Option<&str>) -> Result<usize, ScaleError> {
    match name {
        None if pools.len() == 1 => Ok(0),
        None => Err(ScaleError::Pools(pools.to_vec())),
        Some(name) => pools
            .iter()
            .position(|p| p == name)
            .ok_or_else(|| ScaleError::NoPool {
                name: name.into(),
                pools: pools.to_vec(),
            }),
    }
}

/// Whether a pool may go to `target` slots when the others run `others`.
fn bounded(pool: Option<&str>, target: usize, others: usize) -> Result<(), ScaleError> {
    if !(1..=MAX_WORKERS).contains(&target) {
        return Err(ScaleError::Count {
            pool: pool.map(str::to_string),
            target,
            max: MAX_WORKERS,
        });
    }
    if others + target > MAX_WORKERS {
        return Err(ScaleError::Total {
            pool: pool.unwrap_or("main").into(),
            target,
            total: others + target,
            max: MAX_WORKERS,
        });
    }
    Ok(())
}

impl Supervisor {
    /// Runs `count` (or `count` more, `relative`) workers in pool `pool`
    /// (`None`: the only one): new slots start and take connections once
    /// ready; the pool's highest slots are drained.
    pub(super) fn scale(
        &mut self,
        pool: Option<&str>,
        count: i64,
        relative: bool,
    ) -> Result<Scaled, ScaleError> {
        if self.phase != Phase::Running {
            return Err(ScaleError::Stopping);
        }
        if let Some(r) = &self.reload {
            return Err(ScaleError::Busy(r.what.article()));
        }
        let names: Vec<String> = self.config.pools.iter().map(|p| p.name.clone()).collect();
        let i = pick(&names, pool)?;
        let several = names.len() > 1;
        let named = several.then(|| names[i].as_str());
        let from = self.layout.slots_of(i).len();
        let to = target(from, count, relative);
        bounded(named, to, self.layout.taken().len() - from)?;
        self.config.pools[i].count = to;
        if to > from {
            for slot in self.layout.grow(i, to - from, &[]) {
                if slot.0 >= self.slots.len() {
                    self.slots.resize_with(slot.0 + 1, SlotState::default);
                }
                // A slot taken again is a new worker's: its counts start over.
                self.slots[slot.0] = SlotState::default();
                self.start_or_retry(slot);
            }
        } else {
            let removed = self.layout.shrink(i, from - to);
            self.vacate(&removed);
            let len = self.layout.trim();
            self.slots.truncate(len);
        }
        Ok(Scaled {
            pool: named.map(str::to_string),
            from,
            to,
        })
    }

    /// Drains the workers of slots no pool runs any more; nothing restarts
    /// there.
    pub(super) fn vacate(&mut self, slots: &[Slot]) {
        let leaving: Vec<(Slot, u32)> = self
            .workers
            .iter()
            .filter(|p| slots.contains(&p.slot) && !p.retiring)
            .map(|p| (p.slot, p.pid))
            .collect();
        for (slot, pid) in leaving {
            self.dispatch.send(Command::Drain { slot, pid });
            self.retire(pid);
        }
        // An exit being judged there restarts nothing either.
        for e in self
            .exiting
            .iter_mut()
            .filter(|e| slots.contains(&e.worker.slot))
        {
            e.worker.retiring = true;
        }
        for s in slots {
            if let Some(state) = self.slots.get_mut(s.0) {
                state.restart_at = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scale_names_its_pool_when_there_are_several() {
        let one = ["main".to_string()];
        let two = ["web".to_string(), "canary".to_string()];
        assert_eq!(pick(&one, None), Ok(0));
        assert_eq!(pick(&two, Some("canary")), Ok(1));
        let e = pick(&two, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "this master runs 2 pools (web, canary); name the one to scale: lb scale POOL \
             N|+N|-N"
        );
        let e = pick(&two, Some("api")).unwrap_err();
        assert_eq!(e.to_string(), "no pool `api`; this master runs web, canary");
    }

    #[test]
    fn a_count_is_bounded_per_pool_and_in_all() {
        assert_eq!(bounded(None, 3, 0), Ok(()));
        assert_eq!(bounded(Some("web"), MAX_WORKERS - 1, 1), Ok(()));
        assert_eq!(
            bounded(None, 0, 0).unwrap_err().to_string(),
            format!("0 workers: give a count from 1 to {MAX_WORKERS}")
        );
        assert_eq!(
            bounded(Some("web"), MAX_WORKERS + 1, 0)
                .unwrap_err()
                .to_string(),
            format!(
                "pool `web`: {} workers: give a count from 1 to {MAX_WORKERS}",
                MAX_WORKERS + 1
            )
        );
        assert_eq!(
            bounded(Some("web"), MAX_WORKERS, 2)
                .unwrap_err()
                .to_string(),
            format!(
                "pool `web` at {MAX_WORKERS} workers would make {} in all, more than the \
                 {MAX_WORKERS} one master runs; give a smaller count",
                MAX_WORKERS + 2
            )
        );
        assert_eq!(
            ScaleError::Busy("a restart").to_string(),
            "a restart is in progress; scale once it is done"
        );
    }

    #[test]
    fn results_read_as_before_and_name_the_pool() {
        let scaled = |pool: Option<&str>, from, to| {
            Scaled {
                pool: pool.map(str::to_string),
                from,
                to,
            }
            .to_string()
        };
        assert_eq!(
            scaled(None, 2, 5),
            "scaled from 2 to 5 workers (3 starting)"
        );
        assert_eq!(
            scaled(None, 5, 2),
            "scaled from 5 to 2 workers (3 draining)"
        );
        assert_eq!(
            scaled(Some("web"), 2, 3),
            "scaled pool `web` from 2 to 3 workers (1 starting)"
        );
    }

    #[test]
    fn a_target_is_absolute_or_relative_and_never_below_zero() {
        assert_eq!(target(3, 5, false), 5);
        assert_eq!(target(3, 2, true), 5);
        assert_eq!(target(3, -2, true), 1);
        assert_eq!(target(3, -5, true), 0);
        assert_eq!(target(3, -1, false), 0);
        assert_eq!(target(3, i64::MAX, true), i64::MAX as usize);
    }
}
