//! What the dispatcher reports about workers (READY, DRAINING, STOP, their
//! messages and protocol errors, stalls) and what each one means here.

use std::io;
use std::os::fd::AsFd;
use std::time::Instant;

use super::output::about;
use super::{MALFORMED_LIMIT, MALFORMED_LOGGED, Phase, SAID_PER_SECOND, Supervisor, backoff};
use crate::dispatch::Event;
use crate::policy::Slot;
use crate::sys;
use crate::{info, warn};

impl Supervisor {
    pub(super) fn on_event(&mut self, event: Event) {
        match event {
            Event::Ready { slot, pid } => {
                if let Some(i) = self.index_of(pid) {
                    let p = &mut self.workers[i];
                    p.ready = true;
                    self.any_ready = true;
                    info!(
                        worker: about(&self.config, &self.layout, slot, Some(pid));
                        "worker {slot} pid {pid} gen {}: ready", p.generation
                    );
                    if !self.notified_ready
                        && self.workers.iter().filter(|p| p.ready).count() >= self.layout.planned()
                    {
                        self.notified_ready = true;
                        crate::systemd::notify("READY=1");
                    }
                    // READY was the switch: what ran in the slot before drains.
                    // Not a reload's or restart's candidate, though: this one
                    // (still starting when it was started) is what it replaces.
                    let candidates = self.reload.as_ref().map(|r| r.candidates.as_slice());
                    let others: Vec<u32> = self
                        .workers
                        .iter()
                        .filter(|o| o.slot == slot && o.pid != pid && !o.retiring)
                        .filter(|o| !candidates.is_some_and(|c| c.contains(&o.pid)))
                        .map(|o| o.pid)
                        .collect();
                    for other in others {
                        self.retire(other);
                    }
                    if let Some(r) = self.reload.as_mut()
                        && let Some(k) = r.candidates.iter().position(|&c| c == pid)
                    {
                        r.candidates.swap_remove(k);
                        r.replaced += 1;
                        self.advance_reload();
                    }
                }
            }
            Event::Draining { slot, pid } => {
                if let Some(i) = self.index_of(pid) {
                    let p = &self.workers[i];
                    info!(
                        worker: self.about(slot, Some(pid));
                        "worker {slot} pid {pid} gen {}: draining", p.generation
                    );
                    if p.signal_on_drain {
                        let _ = sys::pidfd_signal(p.pidfd.as_fd(), p.stop_signal);
                    }
                }
            }
            Event::Leaving { slot, pid } => self.leaving(slot, pid),
            Event::Note { slot, pid, text } => {
                let text = crate::log::escape(text.as_bytes());
                self.say_for(slot, pid, format_args!("{text}"));
            }
            Event::Stop { slot, pid } => {
                let Some(i) = self.index_of(pid) else { return };
                let p = &self.workers[i];
                // Only one on its way out: STOP is the answer to DRAIN.
                if p.retiring || self.phase != Phase::Running {
                    let signal = nix::sys::signal::Signal::try_from(p.stop_signal)
                        .map_or_else(|_| p.stop_signal.to_string(), |s| s.to_string());
                    info!(
                        worker: self.about(slot, Some(pid));
                        "worker {slot} pid {pid}: stopping it with {signal}"
                    );
                    let _ = sys::pidfd_signal(p.pidfd.as_fd(), p.stop_signal);
                } else {
                    self.protocol_error(slot, pid, crate::proto::Malformed::EarlyStop);
                }
            }
            Event::Message { slot, pid, payload } => {
                let text = crate::log::escape(payload.trim_ascii_end());
                self.say_for(slot, pid, format_args!("message: {text}"));
            }
            Event::Malformed { slot, pid, error } => self.protocol_error(slot, pid, error),
            Event::Rescued { slot, pid, count } => {
                info!(
                    worker: self.about(slot, Some(pid));
                    "worker {slot} pid {pid}: rescued {count} queued connections for other workers"
                );
            }
            Event::AcceptError { errno } => {
                warn!(
                    "accept failed: {}; retrying every 10 ms (said once, until it works again)",
                    io::Error::from_raw_os_error(errno)
                );
            }
            Event::AcceptRecovered { failures } => {
                info!("accept works again, after {failures} failed tries");
            }
            Event::SteeringFailed { error } => {
                warn!(
                    "kernel dispatch: cannot update the program's maps ({error}); new \
                     connections may go by a stale schedule (said once, until an update works): \
                     restart lb, or run it with --dispatch master"
                );
            }
            Event::Drained => {
                let what = if self.listening.len() == 1 {
                    "listener closed"
                } else {
                    "listeners closed"
                };
                info!("{what}; every worker was sent DRAIN");
            }
            Event::Detached { pid, .. } => {
                // What it said before it died (chatter: messages) first.
                while let Ok(event) = self.events.chatter.try_recv() {
                    self.on_event(event);
                }
                self.exited(pid);
            }
            Event::Stalled {
                slot,
                pid,
                why,
                rescued,
            } => {
                warn!(
                    worker: self.about(slot, Some(pid));
                    "worker {slot} pid {pid} {why}: it gets no more, {rescued} went to other \
                     workers; replacing it, its successor ready first"
                );
                let Some(i) = self.index_of(pid) else { return };
                let covered = self.covered(slot, pid);
                let p = &mut self.workers[i];
                p.stalled = true;
                if p.retiring || p.recycling || covered || self.phase != Phase::Running {
                    return;
                }
                p.recycling = true;
                self.slots[slot.0].restarts += 1;
                self.start_or_retry(slot);
            }
        }
    }

    /// Logs a line a worker made lb log (its messages, notes about it),
    /// within that worker's budget: what is over it is counted, and the
    /// count said before its next line or at its exit.
    pub(super) fn say_for(&mut self, slot: Slot, pid: u32, text: std::fmt::Arguments<'_>) {
        let budget = match self.index_of(pid) {
            Some(i) => &mut self.workers[i].said,
            None => match self.exiting.iter_mut().find(|e| e.worker.pid == pid) {
                Some(e) => &mut e.worker.said,
                None => return,
            },
        };
        let Some(unlogged) = budget.take(Instant::now()) else {
            return;
        };
        if unlogged > 0 {
            info!(
                worker: self.about(slot, Some(pid));
                "worker {slot} pid {pid}: {unlogged} lines not logged (more than {SAID_PER_SECOND} a second)"
            );
        }
        info!(worker: self.about(slot, Some(pid)); "worker {slot} pid {pid}: {text}");
    }

    /// A worker broke the protocol: logged (the first few), counted, and at
    /// the limit replaced, its successor ready first. The successor starts
    /// after the back-off of a failed start: a build that does this would
    /// do it again, and must not churn.
    pub(super) fn protocol_error(&mut self, slot: Slot, pid: u32, error: crate::proto::Malformed) {
        let Some(i) = self.index_of(pid) else { return };
        let p = &mut self.workers[i];
        p.malformed += 1;
        let n = p.malformed;
        if n <= MALFORMED_LOGGED {
            warn!(
                worker: about(&self.config, &self.layout, slot, Some(pid));
                "worker {slot} pid {pid}: protocol error: {error}"
            );
        }
        if n == MALFORMED_LOGGED {
            warn!(
                worker: about(&self.config, &self.layout, slot, Some(pid));
                "worker {slot} pid {pid}: further protocol errors are counted, not logged"
            );
        }
        if n < MALFORMED_LIMIT || p.retiring || p.recycling || self.phase != Phase::Running {
            return;
        }
        p.recycling = true;
        let failures = self.slots[slot.0].failures.saturating_add(1);
        let delay = backoff::delay(failures);
        p.replace_at = Some(Instant::now() + delay);
        warn!(
            worker: self.about(slot, Some(pid));
            "worker {slot} pid {pid}: {n} protocol errors; replacing it in {} ms, its \
             successor ready first",
            delay.as_millis()
        );
        let s = &mut self.slots[slot.0];
        s.failures = failures;
        s.last_exit = format!("{n} protocol errors");
    }
}
