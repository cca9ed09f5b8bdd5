//! What systemd hears from the supervisor loop besides READY/RELOADING/
//! STOPPING: `WATCHDOG=1` at half of `WatchdogSec=` and a `STATUS=` line
//! for `systemctl status` whenever it changes. Both are sent from the loop
//! itself, after its timers, so a supervisor wedged anywhere (a stuck fork,
//! a lock, a bug that spins elsewhere) stops the pings and systemd's
//! watchdog restarts the service.

use std::time::{Duration, Instant};

use super::{Phase, Supervisor};

/// The watchdog's schedule and the last status sent.
pub(super) struct Notify {
    /// `$NOTIFY_SOCKET` is set: someone listens.
    enabled: bool,
    interval: Option<Duration>,
    next_ping: Option<Instant>,
    status: String,
}

impl Notify {
    pub(super) fn new() -> Notify {
        let enabled = std::env::var_os(crate::systemd::VARS[0]).is_some();
        let interval = crate::systemd::watchdog_interval().filter(|_| enabled);
        Notify {
            enabled,
            interval,
            next_ping: interval.map(|_| Instant::now()),
            status: String::new(),
        }
    }

    /// When the loop must wake for the next ping.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.next_ping
    }

    fn tick(&mut self, now: Instant, status: String) {
        if let (Some(interval), Some(at)) = (self.interval, self.next_ping)
            && now >= at
        {
            crate::systemd::notify("WATCHDOG=1");
            self.next_ping = Some(now + interval);
        }
        if status != self.status {
            crate::systemd::notify(&format!("STATUS={status}"));
            self.status = status;
        }
    }
}

impl Supervisor {
    /// Once per pass of the loop.
    pub(super) fn notify_systemd(&mut self) {
        if !self.notify.enabled {
            return;
        }
        let status = self.status_line();
        self.notify.tick(Instant::now(), status);
    }

    /// `3/4 workers ready, generation 2` (with `, reloading` during a
    /// reload); `stopping: 2 workers left` once draining.
    fn status_line(&self) -> String {
        if self.phase != Phase::Running {
            let left = self.workers.len();
            let s = if left == 1 { "" } else { "s" };
            return format!("stopping: {left} worker{s} left");
        }
        let mut ready = vec![false; self.slots.len()];
        for w in &self.workers {
            if w.ready
                && !w.retiring
                && let Some(r) = ready.get_mut(w.slot.0)
            {
                *r = true;
            }
        }
        let n = ready.iter().filter(|&&r| r).count();
        let reloading = if self.reload.is_some() {
            ", reloading"
        } else {
            ""
        };
        format!(
            "{n}/{} workers ready, generation {}{reloading}",
            self.slots.len(),
            self.generation
        )
    }
}
