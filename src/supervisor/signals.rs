//! Signals: the set the master handles itself, what each one does, and the
//! ways to stop (drain, kill).

use std::time::Instant;

use nix::sys::signal::Signal;
use nix::sys::signalfd::SigSet;

use super::{Phase, Supervisor};
use crate::dispatch::Command;
use crate::{info, warn};

/// Signals the master handles itself (blocked in every thread, read from a
/// signalfd here; unblocked again in each worker before exec): every one a
/// user or a tool may send whose default would stop or kill lb. Those not
/// meant to stop it are logged and ignored (`on_signals`). Fault signals
/// (SEGV, BUS, FPE, ILL, ABRT) keep their default: the kernel delivers a
/// real fault even when blocked, and one sent on purpose means "crash".
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGALRM,
        Signal::SIGPROF,
        Signal::SIGVTALRM,
        Signal::SIGXCPU,
        Signal::SIGXFSZ,
        Signal::SIGPWR,
        Signal::SIGSYS,
        Signal::SIGSTKFLT,
        Signal::SIGTRAP,
        Signal::SIGTSTP,
    ] {
        set.add(s);
    }
    set
}

impl Supervisor {
    pub(super) fn on_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            let Ok(signal) = Signal::try_from(info.ssi_signo as i32) else {
                continue;
            };
            match signal {
                Signal::SIGINT | Signal::SIGTERM => {
                    self.interrupts += 1;
                    if self.interrupts == 1 {
                        self.begin_drain(signal.as_str());
                    } else {
                        info!("{signal} again: stopping now");
                        self.kill_all();
                    }
                }
                Signal::SIGQUIT => {
                    info!("SIGQUIT: stopping now");
                    self.kill_all();
                }
                Signal::SIGHUP => self.begin_reload(None),
                // One more or one fewer worker, as gunicorn does.
                Signal::SIGTTIN | Signal::SIGTTOU => {
                    let by = if signal == Signal::SIGTTIN { 1 } else { -1 };
                    match self.scale(None, by, true) {
                        Ok(msg) => info!("{signal}: {msg}"),
                        Err(why) => info!("{signal}: not scaled: {why}"),
                    }
                }
                // What logrotate's postrotate sends. The worker log files
                // are the output thread's, which says what it reopened.
                Signal::SIGUSR1 => {
                    // lb's log first, so what the output thread says lands
                    // in the new file.
                    let master = crate::log::reopen();
                    let worker_files = self.output.reopen();
                    match master {
                        Some((path, Ok(()))) => info!("SIGUSR1: reopened {}", path.display()),
                        Some((path, Err(e))) => warn!(
                            "SIGUSR1: cannot reopen {} ({e}); lb's lines still go to the old file",
                            path.display()
                        ),
                        None if !worker_files => {
                            info!("SIGUSR1: no log file to reopen (lb logs to stderr)")
                        }
                        None => {}
                    }
                }
                // nginx's binary upgrade signal.
                Signal::SIGUSR2 => self.begin_upgrade(None, "SIGUSR2"),
                Signal::SIGTSTP => {
                    info!("SIGTSTP ignored: lb does not pause (SIGTERM stops it, SIGSTOP pauses)")
                }
                other => info!("{other} ignored (it has no meaning to lb)"),
            }
        }
    }

    pub(super) fn begin_drain(&mut self, why: &str) {
        let timeout = self.config.drain_timeout;
        info!(
            "{why}: draining {} workers (up to {:.1}s); send it again to stop at once",
            self.workers.len(),
            timeout.as_secs_f64()
        );
        for s in &mut self.slots {
            s.restart_at = None;
        }
        crate::systemd::notify("STOPPING=1");
        self.phase = Phase::Draining {
            deadline: Instant::now() + timeout,
        };
        // Stopping: what a failed reload would start again is not started.
        self.abort_reload("the master is stopping".into());
        self.dispatch.send(Command::Shutdown);
    }

    pub(super) fn kill_all(&mut self) {
        if self.phase == Phase::Running {
            self.dispatch.send(Command::Shutdown);
        }
        self.phase = Phase::Killing;
        for s in &mut self.slots {
            s.restart_at = None;
        }
        for p in &self.workers {
            self.forced = true;
            p.kill();
        }
    }

    /// Waits for every child after `kill_all`, outside the loop.
    pub(super) fn reap_all(&mut self) {
        for p in self.workers.drain(..) {
            let _ = nix::sys::wait::waitid(
                nix::sys::wait::Id::PIDFd(std::os::fd::AsFd::as_fd(&p.pidfd)),
                nix::sys::wait::WaitPidFlag::WEXITED,
            );
            if let Some(r) = self.reaper.as_mut() {
                r.remove(p.pid);
            }
        }
    }
}
