//! Scaling: more or fewer slots at run time (`lb scale`, SIGTTIN, SIGTTOU).

use super::{Phase, SlotState, Supervisor};
use crate::dispatch::Command;
use crate::policy::Slot;

impl Supervisor {
    /// Runs `target` workers: new slots start (and take connections once
    /// ready); removed slots' workers are drained. Single-pool masters only.
    pub(super) fn scale(&mut self, target: usize) -> Result<String, String> {
        if self.phase != Phase::Running {
            return Err("the master is stopping".into());
        }
        if self.reload.is_some() {
            return Err("a reload is in progress".into());
        }
        if self.config.pools.len() != 1 {
            return Err(format!(
                "this master runs {} pools; set each pool's count in the configuration and reload",
                self.config.pools.len()
            ));
        }
        let max = crate::config::defaults::MAX_WORKERS;
        if !(1..=max).contains(&target) {
            return Err(format!("{target} workers: give a count from 1 to {max}"));
        }
        let n = self.slots.len();
        self.config.pools[0].count = target;
        self.slot_pools = self.config.slot_pools();
        if target > n {
            for slot in n..target {
                self.slots.push(SlotState::default());
                self.start_or_retry(Slot(slot));
            }
            Ok(format!(
                "scaled from {n} to {target} workers ({} starting)",
                target - n
            ))
        } else {
            let leaving: Vec<(Slot, u32)> = self
                .procs
                .iter()
                .filter(|p| p.slot.0 >= target)
                .map(|p| (p.slot, p.pid))
                .collect();
            for (slot, pid) in leaving {
                self.dispatch.send(Command::Drain { slot, pid });
                self.retire(pid);
            }
            // An exit being judged in a removed slot restarts nothing.
            for e in self.exiting.iter_mut().filter(|e| e.proc.slot.0 >= target) {
                e.proc.retiring = true;
            }
            self.slots.truncate(target);
            Ok(format!(
                "scaled from {n} to {target} workers ({} draining)",
                n - target
            ))
        }
    }
}
