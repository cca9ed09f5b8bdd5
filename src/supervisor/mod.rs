//! Worker processes: spawn (channel on fd 3), readiness, exit detection by
//! pidfd, restart with backoff, drain and shutdown on signals. Runs on the
//! main thread, in its own mio loop, so a slow fork/exec or a log write
//! never stalls the dispatch thread.
//!
//! Never touches client sockets: it tells the dispatcher about workers with
//! [`dispatch::Command`]s and hears back [`dispatch::Event`]s.

pub mod backoff;
mod spawn;

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Child;
use std::time::Instant;

use crossbeam_channel::Receiver;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::Signal;
use nix::sys::signalfd::{SfdFlags, SigSet, SignalFd};

use crate::config::Config;
use crate::dispatch::{self, Command, Event};
use crate::info;
use crate::policy::Slot;
use crate::sys;

/// Signals the master handles itself (blocked in every thread, read from a
/// signalfd here; unblocked again in each worker before exec).
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGQUIT,
        Signal::SIGHUP,
    ] {
        set.add(s);
    }
    set
}

const SIGNALS: Token = Token(0);
pub const WAKER: Token = Token(1);
const CHILD_BASE: usize = 2;

/// Why the master could not get going.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(
        "cannot start worker `{command}` (pool `{pool}`): {source}; check that it is an executable program"
    )]
    Spawn {
        pool: String,
        command: String,
        source: io::Error,
    },
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    #[error("supervisor event loop failed: {0}")]
    Poll(io::Error),
}

/// The master's life:
/// 1. `Running`: keep every slot filled, restart what exits;
/// 2. `Draining`: listener closed, DRAIN sent, waiting for exits until `deadline`;
/// 3. `Killing`: deadline passed or forced: SIGKILL sent, waiting for exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Draining { deadline: Instant },
    Killing,
}

struct Proc {
    child: Child,
    pidfd: OwnedFd,
    pid: u32,
    generation: u64,
    started: Instant,
}

#[derive(Default)]
struct SlotState {
    proc: Option<Proc>,
    /// Consecutive quick failures (see `backoff`).
    failures: u32,
    restart_at: Option<Instant>,
    restarts: u64,
}

pub struct Supervisor {
    poll: Poll,
    signals: SignalFd,
    config: Config,
    slot_pools: Vec<usize>,
    slots: Vec<SlotState>,
    dispatch: dispatch::Handle,
    events: Receiver<Event>,
    phase: Phase,
    generation: u64,
    interrupts: u32,
    /// Some worker was killed rather than drained.
    forced: bool,
}

impl Supervisor {
    /// `poll` must already carry the waker the dispatcher's notifier uses
    /// (token [`WAKER`]). The caller has blocked [`handled_signals`] in
    /// every thread.
    pub fn new(
        poll: Poll,
        config: Config,
        dispatch: dispatch::Handle,
        events: Receiver<Event>,
    ) -> Result<Supervisor, SupervisorError> {
        let signals = SignalFd::with_flags(
            &handled_signals(),
            SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
        )
        .map_err(|e| SupervisorError::Signals(e.into()))?;
        poll.registry()
            .register(
                &mut SourceFd(&signals.as_fd().as_raw_fd()),
                SIGNALS,
                Interest::READABLE,
            )
            .map_err(SupervisorError::Signals)?;
        let slot_pools = config.slot_pools();
        let slots = (0..slot_pools.len())
            .map(|_| SlotState::default())
            .collect();
        Ok(Supervisor {
            poll,
            signals,
            config,
            slot_pools,
            slots,
            dispatch,
            events,
            phase: Phase::Running,
            generation: 1,
            interrupts: 0,
            forced: false,
        })
    }

    /// Starts every worker and supervises until shutdown. Returns whether
    /// every worker drained in time.
    pub fn run(mut self) -> Result<bool, SupervisorError> {
        for slot in 0..self.slots.len() {
            if let Err(e) = self.start(Slot(slot)) {
                self.kill_all();
                self.reap_all();
                return Err(e);
            }
        }
        let mut events = Events::with_capacity(64);
        loop {
            if self.phase != Phase::Running && self.live() == 0 {
                break;
            }
            let timeout = self
                .next_deadline()
                .map(|t| t.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                return Err(SupervisorError::Poll(e));
            }
            for ev in events.iter() {
                match ev.token() {
                    SIGNALS => self.on_signals(),
                    WAKER => {}
                    Token(t) => self.on_exit(Slot(t - CHILD_BASE)),
                }
            }
            while let Ok(event) = self.events.try_recv() {
                self.on_event(event);
            }
            self.on_timers();
        }
        self.dispatch.send(Command::Stop);
        Ok(!self.forced)
    }

    fn live(&self) -> usize {
        self.slots.iter().filter(|s| s.proc.is_some()).count()
    }

    fn next_deadline(&self) -> Option<Instant> {
        let restarts = self.slots.iter().filter_map(|s| s.restart_at);
        let drain = match self.phase {
            Phase::Draining { deadline } => Some(deadline),
            _ => None,
        };
        restarts.chain(drain).min()
    }

    /// Starts the worker for `slot`; the error is fatal only at start-up.
    fn start(&mut self, slot: Slot) -> Result<(), SupervisorError> {
        let pool = &self.config.pools[self.slot_pools[slot.0]];
        let spawned =
            spawn::spawn(pool, slot, self.generation).map_err(|source| SupervisorError::Spawn {
                pool: pool.name.clone(),
                command: pool.command.display().to_string(),
                source,
            })?;
        let pid = spawned.child.id();
        info!("worker {slot} pid {pid} gen {}: online", self.generation);
        self.poll
            .registry()
            .register(
                &mut SourceFd(&spawned.pidfd.as_raw_fd()),
                Token(CHILD_BASE + slot.0),
                Interest::READABLE,
            )
            .map_err(SupervisorError::Poll)?;
        self.dispatch.send(Command::Attach {
            slot,
            pid,
            channel: spawned.channel,
            peer: spawned.peer,
            weight: pool.weight,
        });
        self.slots[slot.0].proc = Some(Proc {
            child: spawned.child,
            pidfd: spawned.pidfd,
            pid,
            generation: self.generation,
            started: Instant::now(),
        });
        Ok(())
    }

    fn on_exit(&mut self, slot: Slot) {
        let Some(state) = self.slots.get_mut(slot.0) else {
            return;
        };
        let Some(proc) = state.proc.as_mut() else {
            return;
        };
        let status = match proc.child.try_wait() {
            Ok(Some(status)) => status,
            // A pidfd is readable only once the process exited; anything
            // else is spurious.
            Ok(None) | Err(_) => return,
        };
        let mut proc = state.proc.take().expect("checked above");
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&proc.pidfd.as_raw_fd()));
        let uptime = proc.started.elapsed();
        let expected = self.phase != Phase::Running;
        info!(
            "worker {slot} pid {} gen {}: exit ({}, up {:.1}s, {})",
            proc.pid,
            proc.generation,
            spawn::describe(status),
            uptime.as_secs_f64(),
            if expected { "expected" } else { "unexpected" }
        );
        self.dispatch.send(Command::Detach {
            slot,
            pid: proc.pid,
        });
        let _ = proc.child.wait();
        if self.phase == Phase::Running {
            state.failures = backoff::failures_after(state.failures, uptime);
            let delay = backoff::delay(state.failures);
            state.restart_at = Some(Instant::now() + delay);
            info!(
                "worker {slot}: restart #{} in {} ms",
                state.restarts + 1,
                delay.as_millis()
            );
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Ready { slot, pid } => {
                if let Some(p) = self.proc(slot, pid) {
                    info!("worker {slot} pid {pid} gen {}: ready", p.generation);
                }
            }
            Event::Leaving { slot, pid } => {
                info!("worker {slot} pid {pid}: leaving (sends it nothing more)");
            }
            Event::Message { slot, pid, payload } => {
                info!(
                    "worker {slot} pid {pid}: message: {}",
                    String::from_utf8_lossy(&payload).trim_end()
                );
            }
            Event::Malformed { slot, pid, error } => {
                info!("worker {slot} pid {pid}: protocol error: {error}");
            }
            Event::Rescued { slot, pid, count } => {
                info!(
                    "worker {slot} pid {pid}: rescued {count} queued connections for other workers"
                );
            }
            Event::AcceptError { errno } => {
                info!(
                    "accept failed: {}; retrying shortly",
                    io::Error::from_raw_os_error(errno)
                );
            }
            Event::Drained => {
                info!("listener closed; every worker was sent DRAIN");
            }
        }
    }

    fn proc(&self, slot: Slot, pid: u32) -> Option<&Proc> {
        self.slots
            .get(slot.0)?
            .proc
            .as_ref()
            .filter(|p| p.pid == pid)
    }

    fn on_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            let Ok(signal) = Signal::try_from(info.ssi_signo as i32) else {
                continue;
            };
            match signal {
                Signal::SIGINT | Signal::SIGTERM => {
                    self.interrupts += 1;
                    if self.interrupts == 1 {
                        self.begin_drain(signal);
                    } else {
                        info!("{signal} again: stopping now");
                        self.kill_all();
                    }
                }
                Signal::SIGQUIT => {
                    info!("SIGQUIT: stopping now");
                    self.kill_all();
                }
                _ => {}
            }
        }
    }

    fn begin_drain(&mut self, signal: Signal) {
        let timeout = self.config.drain_timeout;
        info!(
            "{signal}: draining {} workers (up to {:.1}s); send it again to stop at once",
            self.live(),
            timeout.as_secs_f64()
        );
        for s in &mut self.slots {
            s.restart_at = None;
        }
        self.phase = Phase::Draining {
            deadline: Instant::now() + timeout,
        };
        self.dispatch.send(Command::Shutdown);
    }

    fn kill_all(&mut self) {
        if self.phase == Phase::Running {
            self.dispatch.send(Command::Shutdown);
        }
        self.phase = Phase::Killing;
        self.forced = true;
        for s in &mut self.slots {
            s.restart_at = None;
            if let Some(p) = &s.proc {
                let _ = sys::pidfd_signal(p.pidfd.as_fd(), libc::SIGKILL);
            }
        }
    }

    /// Waits for every child after `kill_all` at start-up (no loop yet).
    fn reap_all(&mut self) {
        for s in &mut self.slots {
            if let Some(mut p) = s.proc.take() {
                let _ = p.child.wait();
            }
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        if let Phase::Draining { deadline } = self.phase
            && now >= deadline
        {
            info!(
                "drain timeout: killing {} workers still running",
                self.live()
            );
            self.kill_all();
        }
        for slot in 0..self.slots.len() {
            let due = self.slots[slot].restart_at.is_some_and(|t| now >= t);
            if !due {
                continue;
            }
            self.slots[slot].restart_at = None;
            self.slots[slot].restarts += 1;
            if let Err(e) = self.start(Slot(slot)) {
                // Not fatal after start-up: try again later, backing off.
                let s = &mut self.slots[slot];
                s.failures = s.failures.saturating_add(1);
                let delay = backoff::delay(s.failures);
                s.restart_at = Some(now + delay);
                info!("{e}; retrying in {} ms", delay.as_millis());
            }
        }
    }
}
