//! `lb restart SLOT|POOL|all`: a rolling restart of the workers named,
//! one slot at a time, each successor started and READY before the worker
//! it replaces drains (the reload's machinery, without a new
//! configuration); and `--wait`, answered once the replaced workers have
//! drained and exited.

use std::collections::VecDeque;

use super::layout::Layout;
use super::rolling::{Reload, Rolling};
use super::{Answer, Supervisor};
use crate::info;
use crate::policy::Slot;

/// A `--wait`ing restart's answer, sent once none of `pids` runs.
pub(super) struct Wait {
    pids: Vec<u32>,
    reply: crossbeam_channel::Sender<Answer>,
    msg: String,
}

/// `0-3, 5, 7-8`: slots, for messages.
fn ranges(slots: &[Slot]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < slots.len() {
        let start = slots[i].0;
        let mut end = start;
        while i + 1 < slots.len() && slots[i + 1].0 == end + 1 {
            i += 1;
            end += 1;
        }
        out.push(if end == start {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(", ")
}

/// The slots `target` names (a pool's name, a slot number, `all`), and how
/// the answer says them; or why it names none.
fn resolve(target: &str, names: &[&str], layout: &Layout) -> Result<(Vec<Slot>, String), String> {
    if let Some(i) = names.iter().position(|n| *n == target) {
        let slots = layout.slots_of(i);
        let n = slots.len();
        let label = format!(
            "{n} worker{} of pool `{target}` (slot{} {})",
            if n == 1 { "" } else { "s" },
            if n == 1 { "" } else { "s" },
            ranges(&slots)
        );
        return Ok((slots, label));
    }
    let taken = layout.taken();
    if let Ok(slot) = target.parse::<usize>() {
        if layout.pool(Slot(slot)).is_none() {
            return Err(format!(
                "no worker runs in slot {slot}; the slots are {}",
                ranges(&taken)
            ));
        }
        return Ok((vec![Slot(slot)], format!("worker {slot}")));
    }
    if target == "all" {
        let label = format!("all {} workers", taken.len());
        return Ok((taken, label));
    }
    Err(format!(
        "no pool or slot `{target}`; give a slot ({}), a pool ({}) or `all`",
        ranges(&taken),
        names.join(", ")
    ))
}

impl Supervisor {
    /// Starts a rolling restart of what `target` names, or answers why not.
    /// Answered when every slot named has switched (with `wait`, once the
    /// workers replaced are gone too).
    pub(super) fn begin_restart(
        &mut self,
        target: &str,
        wait: bool,
        reply: crossbeam_channel::Sender<Answer>,
    ) {
        if let Some(why) = self.busy(Rolling::Restart) {
            return self.refuse(Rolling::Restart, Some(reply), why);
        }
        let names: Vec<&str> = self.config.pools.iter().map(|p| p.name.as_str()).collect();
        let (slots, label) = match resolve(target, &names, &self.layout) {
            Ok(found) => found,
            Err(why) => return self.refuse(Rolling::Restart, Some(reply), why),
        };
        let pids: Vec<u32> = self
            .workers
            .iter()
            .filter(|p| slots.contains(&p.slot) && !p.retiring)
            .map(|p| p.pid)
            .collect();
        info!("restarting {label}, one at a time, each successor ready first");
        for s in &slots {
            self.slots[s.0].restarts += 1;
        }
        self.reload = Some(Reload {
            what: Rolling::Restart,
            queue: slots.into_iter().collect::<VecDeque<_>>(),
            candidates: Vec::new(),
            replaced: 0,
            parallel: 1,
            previous: None,
            added: Vec::new(),
            removed: Vec::new(),
            detail: label,
            wait: wait.then_some(pids),
            reply: Some(reply),
        });
        self.advance_reload();
    }

    /// Answers `msg` on `reply` once none of `pids` runs.
    pub(super) fn wait_gone(
        &mut self,
        pids: Vec<u32>,
        reply: crossbeam_channel::Sender<Answer>,
        msg: String,
    ) {
        self.waits.push(Wait { pids, reply, msg });
        self.answer_waits();
    }

    /// Answers the waits whose workers are all gone.
    pub(super) fn answer_waits(&mut self) {
        if self.waits.is_empty() {
            return;
        }
        let running = |pid: &u32| {
            self.workers.iter().any(|p| p.pid == *pid)
                || self.exiting.iter().any(|e| e.worker.pid == *pid)
        };
        let (done, waiting): (Vec<Wait>, Vec<Wait>) = std::mem::take(&mut self.waits)
            .into_iter()
            .partition(|w| !w.pids.iter().any(running));
        self.waits = waiting;
        for w in done {
            let _ = w.reply.send(Answer::Done(format!(
                "{}; every replaced worker has drained and exited",
                w.msg
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::layout::tests::pools;

    #[test]
    fn a_restart_names_a_pool_a_slot_or_all() {
        let p = pools(&[("web", 3), ("canary", 1)]);
        let mut layout = Layout::new(&p);
        layout.grow(0, 1, &[]);
        let names = ["web", "canary"];
        assert_eq!(
            resolve("web", &names, &layout),
            Ok((
                vec![Slot(0), Slot(1), Slot(2), Slot(4)],
                "4 workers of pool `web` (slots 0-2, 4)".into()
            ))
        );
        assert_eq!(
            resolve("canary", &names, &layout),
            Ok((vec![Slot(3)], "1 worker of pool `canary` (slot 3)".into()))
        );
        assert_eq!(
            resolve("3", &names, &layout),
            Ok((vec![Slot(3)], "worker 3".into()))
        );
        assert_eq!(resolve("all", &names, &layout).unwrap().0.len(), 5);
        assert_eq!(resolve("all", &names, &layout).unwrap().1, "all 5 workers");
        layout.shrink(0, 2);
        assert_eq!(
            resolve("4", &names, &layout),
            Err("no worker runs in slot 4; the slots are 0-1, 3".into())
        );
        assert_eq!(
            resolve("api", &names, &layout),
            Err(
                "no pool or slot `api`; give a slot (0-1, 3), a pool (web, canary) or `all`".into()
            )
        );
    }
}
