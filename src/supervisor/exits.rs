//! Exits: a worker's death noticed by its pidfd, judged once the dispatcher
//! has let go of its channel, and the restart (or crash loop) it means; and
//! a worker that says it is leaving.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Instant;

use mio::unix::SourceFd;
use nix::sys::wait::{WaitPidFlag, WaitStatus};

use super::output::about;
use super::{DETACH_WAIT, Exiting, Phase, SAID_PER_SECOND, Supervisor, backoff, kill_group, spawn};
use crate::dispatch::Command;
use crate::log::Level;
use crate::policy::Slot;
use crate::{info, warn};

impl Supervisor {
    pub(super) fn on_exit(&mut self, pid: u32) {
        let Some(i) = self.index_of(pid) else { return };
        // What the worker leaves behind in its process group (a shell's
        // `sleep`, a server's own children) goes with it: while the exited
        // leader is not reaped its pid, and so the group's id, cannot be
        // reused by another process.
        let exited = nix::sys::wait::waitid(
            nix::sys::wait::Id::PIDFd(self.workers[i].pidfd.as_fd()),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        );
        if matches!(exited, Ok(s) if s != nix::sys::wait::WaitStatus::StillAlive) {
            kill_group(pid);
        }
        // Reaped by its pidfd (the process is known by nothing else).
        let status = match nix::sys::wait::waitid(
            nix::sys::wait::Id::PIDFd(self.workers[i].pidfd.as_fd()),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
        ) {
            Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => s,
            // A pidfd is readable only once the process exited; else spurious.
            _ => return,
        };
        let p = self.workers.swap_remove(i);
        if let Some(r) = self.reaper.as_mut() {
            r.remove(pid);
        }
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&p.pidfd.as_raw_fd()));
        // What the worker said last (a LEAVING just before it exited, say)
        // may still be unread in its channel: the dispatcher reads it, and
        // rescues what it never took, before it answers Detached. Only then
        // is the exit judged.
        self.dispatch.send(Command::Detach {
            slot: p.slot,
            pid: p.pid,
        });
        self.exiting.push(Exiting {
            uptime: p.started.elapsed(),
            how: spawn::describe(status),
            give_up_at: Instant::now() + DETACH_WAIT,
            worker: p,
        });
    }

    /// The dispatcher has read and let go of an exited worker's channel
    /// (or did not answer in time): what the exit means.
    pub(super) fn exited(&mut self, pid: u32) {
        let Some(i) = self.exiting.iter().position(|e| e.worker.pid == pid) else {
            return;
        };
        let Exiting {
            worker: mut p,
            uptime,
            how,
            ..
        } = self.exiting.swap_remove(i);
        let unlogged = p.said.unreported();
        if unlogged > 0 {
            info!(
                worker: self.about(p.slot, Some(p.pid));
                "worker {} pid {}: {unlogged} lines not logged (more than {SAID_PER_SECOND} a second)",
                p.slot, p.pid
            );
        }
        let expected = p.retiring || self.phase != Phase::Running;
        crate::log::record(
            if expected { Level::Info } else { Level::Warn },
            Some(&self.about(p.slot, Some(p.pid))),
            format_args!(
                "worker {} pid {} gen {}: exit ({how}, up {:.1}s, {})",
                p.slot,
                p.pid,
                p.generation,
                uptime.as_secs_f64(),
                if expected { "expected" } else { "unexpected" }
            ),
        );
        // (A slot scaled away meanwhile restarts nothing.)
        if p.retiring || self.phase != Phase::Running || !self.planned(p.slot) {
            return;
        }
        let how_text = || how.clone();
        if self
            .reload
            .as_ref()
            .is_some_and(|r| r.candidates.contains(&p.pid))
        {
            let why = if p.ready_timed_out {
                format!(
                    "not ready within {:.1}s",
                    self.config.ready_timeout.as_secs_f64()
                )
            } else {
                how_text()
            };
            self.abort_reload(format!(
                "worker {} of generation {} exited before READY ({why})",
                p.slot, p.generation
            ));
            // A slot the reload added is gone with it.
            if !self.planned(p.slot) {
                return;
            }
        }
        // Another live process still covers the slot (the one a failed
        // candidate was to replace, or the candidate replacing a dead one).
        // A failed successor leaves the one it was to replace to be
        // replaced again: at once when its limits say so (recycling), after
        // the back-off of a failed start when it takes nothing (stalled).
        if self.workers.iter().any(|o| o.slot == p.slot && !o.retiring) {
            if !p.ready {
                let s = &mut self.slots[p.slot.0];
                s.failures = s.failures.saturating_add(1);
                let retry = Instant::now() + backoff::delay(s.failures);
                for o in self.workers.iter_mut().filter(|o| o.slot == p.slot) {
                    o.recycling = false;
                    if o.stalled {
                        o.recycling = true;
                        o.replace_at = Some(retry);
                    }
                }
            }
            return;
        }
        let failures = backoff::failures_after(
            self.slots[p.slot.0].failures,
            uptime,
            self.config.min_uptime,
            p.ready,
        );
        let reason = if p.ready_timed_out {
            format!(
                "not ready within {:.1}s",
                self.config.ready_timeout.as_secs_f64()
            )
        } else {
            how
        };
        self.schedule_restart(p.slot, failures, reason);
    }

    /// Exits whose Detached is overdue (a dispatcher that is gone).
    pub(super) fn exits_overdue(&mut self, now: Instant) {
        let overdue: Vec<u32> = self
            .exiting
            .iter()
            .filter(|e| now >= e.give_up_at)
            .map(|e| e.worker.pid)
            .collect();
        for pid in overdue {
            self.exited(pid);
        }
    }

    /// Restarts `slot` after the backoff for `failures` consecutive failed
    /// starts; reports a crash loop once.
    pub(super) fn schedule_restart(&mut self, slot: Slot, failures: u32, reason: String) {
        let min_uptime = self.config.min_uptime;
        let s = &mut self.slots[slot.0];
        s.failures = failures;
        s.last_exit = reason;
        let delay = backoff::delay(failures);
        s.restart_at = Some(Instant::now() + delay);
        if !backoff::is_crash_loop(failures) {
            s.crash_loop_reported = false;
            info!(
                worker: about(&self.config, &self.layout, slot, None);
                "worker {slot}: restart #{} in {} ms",
                s.restarts + 1,
                delay.as_millis()
            );
        } else if !s.crash_loop_reported {
            s.crash_loop_reported = true;
            warn!(
                worker: about(&self.config, &self.layout, slot, None);
                "worker {slot} is crash-looping: {failures} failed starts in a row, each within \
                 {:.1}s or before READY (last: {}); restarting with backoff up to {}s, reported once",
                min_uptime.as_secs_f64(),
                s.last_exit,
                backoff::MAX.as_secs()
            );
        }
    }

    /// A worker announced it is leaving (it may have exited already: its
    /// exit is judged after this). Its replacement starts at once after a
    /// healthy run; one that leaves young is a failed start, backed off
    /// like a crash (a worker that keeps leaving young is a crash loop).
    /// A successor already starting (a reload's, a recycle's) is its
    /// replacement: never two.
    pub(super) fn leaving(&mut self, slot: Slot, pid: u32) {
        let (ready, uptime) = if let Some(i) = self.index_of(pid) {
            let p = &self.workers[i];
            let seen = (p.ready, p.started.elapsed());
            if !self.retire(pid) {
                return;
            }
            seen
        } else if let Some(e) = self.exiting.iter_mut().find(|e| e.worker.pid == pid) {
            if e.worker.retiring {
                return;
            }
            e.worker.retiring = true;
            (e.worker.ready, e.uptime)
        } else {
            return;
        };
        if self.phase != Phase::Running || !self.planned(slot) || self.covered(slot, pid) {
            return;
        }
        self.slots[slot.0].restarts += 1;
        if ready && uptime >= self.config.min_uptime {
            info!(
                worker: self.about(slot, Some(pid));
                "worker {slot} pid {pid}: leaving; starting its replacement first"
            );
            self.slots[slot.0].failures = 0;
            self.start_or_retry(slot);
        } else {
            let failures = self.slots[slot.0].failures.saturating_add(1);
            info!(
                worker: self.about(slot, Some(pid));
                "worker {slot} pid {pid}: leaving after {:.1}s{}; its replacement starts in {} ms",
                uptime.as_secs_f64(),
                if ready { "" } else { ", never ready" },
                backoff::delay(failures).as_millis()
            );
            let why = format!("left after {:.1}s", uptime.as_secs_f64());
            self.schedule_restart(slot, failures, why);
        }
    }
}
