//! Scaling: more or fewer slots at run time (`lb scale`, SIGTTIN, SIGTTOU).

use super::{Phase, SlotState, Supervisor};
use crate::config::defaults::MAX_WORKERS;
use crate::dispatch::Command;
use crate::policy::Slot;

/// Why a master does not scale.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScaleError {
    #[error("the master is stopping")]
    Stopping,
    #[error("a reload is in progress")]
    Reloading,
    #[error("this master runs {0} pools; set each pool's count in the configuration and reload")]
    Pools(usize),
    #[error("{target} workers: give a count from 1 to {max}")]
    Count { target: usize, max: usize },
}

/// A scaling done: from so many slots to so many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scaled {
    pub from: usize,
    pub to: usize,
}

impl std::fmt::Display for Scaled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Scaled { from, to } = *self;
        if to > from {
            write!(
                f,
                "scaled from {from} to {to} workers ({} starting)",
                to - from
            )
        } else {
            write!(
                f,
                "scaled from {from} to {to} workers ({} draining)",
                from - to
            )
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

/// Whether a master may scale to `target` now.
fn check(running: bool, reloading: bool, pools: usize, target: usize) -> Result<(), ScaleError> {
    if !running {
        return Err(ScaleError::Stopping);
    }
    if reloading {
        return Err(ScaleError::Reloading);
    }
    if pools != 1 {
        return Err(ScaleError::Pools(pools));
    }
    if !(1..=MAX_WORKERS).contains(&target) {
        return Err(ScaleError::Count {
            target,
            max: MAX_WORKERS,
        });
    }
    Ok(())
}

impl Supervisor {
    /// Runs `target` workers: new slots start (and take connections once
    /// ready); removed slots' workers are drained. Single-pool masters only.
    pub(super) fn scale(&mut self, target: usize) -> Result<Scaled, ScaleError> {
        check(
            self.phase == Phase::Running,
            self.reload.is_some(),
            self.config.pools.len(),
            target,
        )?;
        let n = self.slots.len();
        self.config.pools[0].count = target;
        self.slot_pools = self.config.slot_pools();
        if target > n {
            for slot in n..target {
                self.slots.push(SlotState::default());
                self.start_or_retry(Slot(slot));
            }
        } else {
            let leaving: Vec<(Slot, u32)> = self
                .workers
                .iter()
                .filter(|p| p.slot.0 >= target)
                .map(|p| (p.slot, p.pid))
                .collect();
            for (slot, pid) in leaving {
                self.dispatch.send(Command::Drain { slot, pid });
                self.retire(pid);
            }
            // An exit being judged in a removed slot restarts nothing.
            for e in self
                .exiting
                .iter_mut()
                .filter(|e| e.worker.slot.0 >= target)
            {
                e.worker.retiring = true;
            }
            self.slots.truncate(target);
        }
        Ok(Scaled {
            from: n,
            to: target,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scale_is_refused_in_the_order_the_reasons_matter() {
        assert_eq!(check(true, false, 1, 3), Ok(()));
        assert_eq!(check(true, false, 1, MAX_WORKERS), Ok(()));
        assert_eq!(check(false, true, 2, 0), Err(ScaleError::Stopping));
        assert_eq!(check(true, true, 2, 0), Err(ScaleError::Reloading));
        assert_eq!(check(true, false, 2, 0), Err(ScaleError::Pools(2)));
        let count = |target| {
            Err(ScaleError::Count {
                target,
                max: MAX_WORKERS,
            })
        };
        assert_eq!(check(true, false, 1, 0), count(0));
        assert_eq!(
            check(true, false, 1, MAX_WORKERS + 1),
            count(MAX_WORKERS + 1)
        );
    }

    #[test]
    fn refusals_and_results_read_as_before() {
        assert_eq!(
            ScaleError::Pools(3).to_string(),
            "this master runs 3 pools; set each pool's count in the configuration and reload"
        );
        assert_eq!(
            ScaleError::Count { target: 0, max: 64 }.to_string(),
            "0 workers: give a count from 1 to 64"
        );
        assert_eq!(
            Scaled { from: 2, to: 5 }.to_string(),
            "scaled from 2 to 5 workers (3 starting)"
        );
        assert_eq!(
            Scaled { from: 5, to: 2 }.to_string(),
            "scaled from 5 to 2 workers (3 draining)"
        );
        assert_eq!(
            Scaled { from: 2, to: 2 }.to_string(),
            "scaled from 2 to 2 workers (0 draining)"
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
