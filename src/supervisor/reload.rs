//! Rolling reloads: a new configuration, and each slot switched to a worker
//! of the new generation once that one is ready.

use super::{Answer, Phase, Supervisor};
use crate::config::Config;
use crate::info;
use crate::policy::Slot;

/// A rolling reload in progress:
/// 1. the new configuration is loaded and the generation bumped;
/// 2. for each slot in turn, a worker of the new generation is started;
/// 3. its READY switches the slot to it and drains the old worker;
/// 4. a candidate that exits or times out before READY aborts the reload:
///    old workers keep serving, the previous configuration is restored for
///    restarts.
pub(super) struct Reload {
    pub(super) queue: std::collections::VecDeque<Slot>,
    /// New workers started and not yet ready (at most `reload_parallel`).
    pub(super) candidates: Vec<u32>,
    pub(super) replaced: usize,
    pub(super) previous: Config,
    pub(super) previous_generation: u64,
    pub(super) reply: Option<crossbeam_channel::Sender<Answer>>,
}

impl Supervisor {
    /// Starts a rolling reload, or answers why not.
    pub(super) fn begin_reload(&mut self, reply: Option<crossbeam_channel::Sender<Answer>>) {
        let refuse = |reply: Option<crossbeam_channel::Sender<Answer>>, why: String| {
            info!("reload refused: {why}");
            if let Some(r) = reply {
                let _ = r.send(Answer::Refused(why));
            }
        };
        if self.phase != Phase::Running {
            return refuse(reply, "the master is stopping".into());
        }
        if self.reload.is_some() {
            return refuse(reply, "a reload is already in progress".into());
        }
        let new = match (self.reconfigure)() {
            Ok(c) => c,
            Err(e) => {
                return refuse(
                    reply,
                    format!("the configuration is invalid, nothing changed: {e}"),
                );
            }
        };
        if new.slots() != self.config.slots() {
            return refuse(
                reply,
                format!(
                    "the new configuration has {} workers, the running one {}; change the count \
                     with a restart for now",
                    new.slots(),
                    self.config.slots()
                ),
            );
        }
        // What the dispatcher was built for at start: whether it accepts at
        // all (not in shared mode) and whether it has proxy relays.
        let shape = |c: &Config| (c.shared(), c.relays());
        if shape(&new) != shape(&self.config) {
            return refuse(
                reply,
                "the new configuration adds or removes shared or proxy mode, which lb sets up \
                 at start (who accepts, the relays); restart lb for that"
                    .into(),
            );
        }
        if new.listen != self.config.listen || new.policy != self.config.policy {
            info!("reload: the listen address and policy stay as they are until a restart");
        }
        let mut new = new;
        new.listen = self.config.listen;
        new.policy = self.config.policy;
        new.control = self.config.control.clone();
        let previous = std::mem::replace(&mut self.config, new);
        self.rss_warned = false;
        self.slot_pools = self.config.slot_pools();
        let previous_generation = self.generation;
        self.generation += 1;
        info!(
            "reloading {} workers to generation {}, {} at a time",
            self.slots.len(),
            self.generation,
            self.config.reload_parallel.max(1)
        );
        crate::systemd::notify(&crate::systemd::reloading());
        self.reload = Some(Reload {
            queue: (0..self.slots.len()).map(Slot).collect(),
            candidates: Vec::new(),
            replaced: 0,
            previous,
            previous_generation,
            reply,
        });
        self.advance_reload();
    }

    /// Starts new workers up to `reload_parallel` at once, or finishes the
    /// reload when every slot has switched.
    pub(super) fn advance_reload(&mut self) {
        let parallel = self.config.reload_parallel.max(1);
        loop {
            let Some(reload) = self.reload.as_mut() else {
                return;
            };
            if reload.candidates.len() >= parallel {
                return;
            }
            let Some(slot) = reload.queue.pop_front() else {
                if !reload.candidates.is_empty() {
                    return; // the last ones are still starting
                }
                let reload = self.reload.take().expect("checked above");
                let msg = format!(
                    "reloaded {} workers to generation {}",
                    reload.replaced, self.generation
                );
                info!("{msg}");
                crate::systemd::notify("READY=1");
                if let Some(r) = reload.reply {
                    let _ = r.send(Answer::Done(msg));
                }
                return;
            };
            // A slot waiting to restart gets the new generation directly.
            self.slots[slot.0].restart_at = None;
            match self.start(slot) {
                Ok(pid) => {
                    if let Some(r) = self.reload.as_mut() {
                        r.candidates.push(pid);
                    }
                }
                Err(e) => return self.abort_reload(e.to_string()),
            }
        }
    }

    /// Ends a failed reload: what already switched stays; the rest keeps its
    /// old workers, and restarts use the previous configuration again.
    pub(super) fn abort_reload(&mut self, why: String) {
        let Some(reload) = self.reload.take() else {
            return;
        };
        self.config = reload.previous;
        self.slot_pools = self.config.slot_pools();
        self.generation = reload.previous_generation;
        let msg = format!(
            "reload failed: {why}; {} workers were replaced, the others keep running",
            reload.replaced
        );
        info!("{msg}");
        if self.phase == Phase::Running {
            crate::systemd::notify("READY=1");
        }
        if let Some(r) = reload.reply {
            let _ = r.send(Answer::Refused(msg));
        }
    }
}
