//! What reloads and restarts share: one slot after another switched to a
//! new worker once that one is READY, and how it ends (every slot
//! switched, or a candidate failed).

use super::layout::Layout;
use super::{Answer, Phase, Supervisor};
use crate::config::Config;
use crate::info;
use crate::policy::Slot;

/// What rolls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rolling {
    Reload,
    Restart,
}

impl Rolling {
    pub(super) fn article(self) -> &'static str {
        match self {
            Rolling::Reload => "a reload",
            Rolling::Restart => "a restart",
        }
    }

    pub(super) fn noun(self) -> &'static str {
        match self {
            Rolling::Reload => "reload",
            Rolling::Restart => "restart",
        }
    }
}

/// What a failed reload goes back to.
pub(super) struct Previous {
    pub(super) config: Config,
    pub(super) generation: u64,
    pub(super) layout: Layout,
    pub(super) configured: Vec<(String, usize)>,
}

/// A rolling reload (or restart) in progress:
/// 1. a reload loads the new configuration and bumps the generation; the
///    slots it adds and removes are worked out (`Layout::remap`);
/// 2. for each slot in turn (added ones first: capacity comes before
///    replacement), a new worker is started;
/// 3. its READY switches the slot to it and drains the old worker;
/// 4. once every slot has switched, the removed slots' workers drain;
/// 5. a candidate that exits or times out before READY aborts it: old
///    workers keep serving, added slots' workers drain, removed slots keep
///    theirs, the previous configuration is restored for restarts.
pub(super) struct Reload {
    pub(super) what: Rolling,
    pub(super) queue: std::collections::VecDeque<Slot>,
    /// New workers started and not yet ready (at most `parallel`).
    pub(super) candidates: Vec<u32>,
    pub(super) replaced: usize,
    pub(super) parallel: usize,
    /// A reload's: what a failure restores.
    pub(super) previous: Option<Previous>,
    pub(super) added: Vec<Slot>,
    pub(super) removed: Vec<Slot>,
    /// A reload's answer ends with what changed; a restart's says what it
    /// restarted.
    pub(super) detail: String,
    /// `lb restart --wait`: the workers replaced, answered once gone.
    pub(super) wait: Option<Vec<u32>>,
    pub(super) reply: Option<crossbeam_channel::Sender<Answer>>,
}

impl Supervisor {
    /// Refuses a control request (or SIGHUP) for `why`, logged.
    pub(super) fn refuse(
        &self,
        what: Rolling,
        reply: Option<crossbeam_channel::Sender<Answer>>,
        why: String,
    ) {
        info!("{} refused: {why}", what.noun());
        if let Some(r) = reply {
            let _ = r.send(Answer::Refused(why));
        }
    }

    /// Why no `what` may start now, if one may not.
    pub(super) fn busy(&self, what: Rolling) -> Option<String> {
        if self.phase != Phase::Running {
            return Some("the master is stopping".into());
        }
        let r = self.reload.as_ref()?;
        Some(if r.what == what {
            format!("{} is already in progress", what.article())
        } else {
            format!(
                "{} is in progress; {} once it is done",
                r.what.article(),
                what.noun()
            )
        })
    }

    /// Starts new workers up to the reload's parallelism, or finishes it
    /// when every slot has switched.
    pub(super) fn advance_reload(&mut self) {
        loop {
            let Some(reload) = self.reload.as_mut() else {
                return;
            };
            if reload.candidates.len() >= reload.parallel {
                return;
            }
            let Some(slot) = reload.queue.pop_front() else {
                if !reload.candidates.is_empty() {
                    return; // the last ones are still starting
                }
                return self.finish_reload();
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

    /// Every slot has switched: the removed slots' workers drain; the
    /// answer.
    fn finish_reload(&mut self) {
        let Some(reload) = self.reload.take() else {
            return;
        };
        self.vacate(&reload.removed);
        let len = self.layout.trim();
        self.slots.truncate(len);
        let msg = match reload.what {
            Rolling::Reload => format!(
                "reloaded {} workers to generation {}{}",
                reload.replaced, self.generation, reload.detail
            ),
            Rolling::Restart => format!("restarted {}", reload.detail),
        };
        info!("{msg}");
        crate::systemd::notify("READY=1");
        let Some(reply) = reload.reply else { return };
        match reload.wait {
            Some(pids) => self.wait_gone(pids, reply, msg),
            None => {
                let _ = reply.send(Answer::Done(msg));
            }
        }
    }

    /// Ends a failed reload or restart: what already switched stays; the
    /// rest keeps its old workers; a reload's added slots drain, and
    /// restarts use the previous configuration again.
    pub(super) fn abort_reload(&mut self, why: String) {
        let Some(reload) = self.reload.take() else {
            return;
        };
        if let Some(previous) = reload.previous {
            self.config = previous.config;
            self.generation = previous.generation;
            self.layout = previous.layout;
            self.configured = previous.configured;
            self.vacate(&reload.added);
            self.slots.truncate(self.layout.len());
            // A removed slot whose worker died meanwhile was not restarted.
            for slot in reload.removed {
                let empty = !self.workers.iter().any(|p| p.slot == slot && !p.retiring);
                if empty && self.phase == Phase::Running {
                    self.start_or_retry(slot);
                }
            }
        }
        let msg = format!(
            "{} failed: {why}; {} workers were replaced, the others keep running",
            reload.what.noun(),
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
