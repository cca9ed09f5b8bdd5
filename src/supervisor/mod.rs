//! Worker processes: spawn (channel on fd 3), readiness, exit detection by
//! pidfd, restart with backoff, crash-loop reports, replacement of workers
//! that leave or misbehave, drain and shutdown on signals. Runs on the main
//! thread in its own mio loop, so a slow fork/exec or a log write never
//! stalls the dispatch thread.
//!
//! Never touches client sockets: it tells the dispatcher about workers with
//! [`dispatch::Command`]s and hears back [`dispatch::Event`]s.

pub mod backoff;
mod output;
pub mod reaper;
mod recycle;
mod reload;
mod requests;
mod scale;
mod signals;
mod spawn;

pub use signals::handled_signals;
pub use spawn::message_cost;

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Child;
use std::time::Instant;

use crossbeam_channel::Receiver;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::WaitPidFlag;

use crate::config::{Config, DrainBy, Mode};
use crate::control::{self, Request};
use crate::dispatch::{self, Command, Event};
use crate::info;
use crate::policy::Slot;
use crate::sys;
use reload::Reload;

const SIGNALS: Token = Token(0);
pub const WAKER: Token = Token(1);
/// A worker's pidfd is `Token(CHILD_BASE + pid)`: unique among live children.
const CHILD_BASE: usize = 2;
/// Protocol errors logged per worker before the rest are only counted.
const MALFORMED_LOGGED: u32 = 3;
/// Protocol errors after which a worker is replaced.
const MALFORMED_LIMIT: u32 = 10;
/// Lines a worker may make lb log a second (messages, notes), in bursts
/// of as many; the rest are counted.
const SAID_PER_SECOND: u32 = 100;
/// How often the recycling limits are checked.
const RECYCLE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Why the master could not go on.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot start worker `{command}` (pool `{pool}`): {source}; {hint}")]
    Spawn {
        pool: String,
        command: String,
        source: io::Error,
        hint: &'static str,
    },
    #[error(
        "no worker became ready: every worker failed {0} starts in a row (last: {1}); run the worker command by hand to see why"
    )]
    NoneReady(u32, String),
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    #[error("cannot start the worker output thread: {0}")]
    Output(io::Error),
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

/// A live worker process.
struct Proc {
    slot: Slot,
    pid: u32,
    generation: u64,
    child: Child,
    pidfd: OwnedFd,
    started: Instant,
    ready: bool,
    /// On its way out (left, replaced, drained): its exit restarts nothing.
    retiring: bool,
    /// Killed for not saying READY in time.
    ready_timed_out: bool,
    /// SIGKILL at this time if still alive (a retiring worker's drain limit).
    kill_at: Option<Instant>,
    malformed: u32,
    /// Being replaced, successor first (over a recycling limit, or too many
    /// protocol errors): its successor is starting, or due at `replace_at`.
    recycling: bool,
    /// When its successor is to be started (the back-off after protocol
    /// errors).
    replace_at: Option<Instant>,
    /// How much it may make lb log (messages, notes).
    said: crate::log::Budget,
    /// It takes none of the connections waiting for it (status says so).
    stalled: bool,
    /// Its memory has been checked against `max_rss` since it was ready.
    rss_checked: bool,
    /// The signal that asks it to finish and exit (its pool's).
    stop_signal: libc::c_int,
    /// Draining it means that signal (shared and proxy workers have no
    /// channel to be told DRAIN on; the shim asks for it with STOP once the
    /// server has taken every connection sent before DRAIN).
    signal_on_drain: bool,
}

impl Proc {
    /// SIGKILL to the worker and to the process group it leads (its own
    /// children, which would otherwise outlive it).
    fn kill(&self) {
        let _ = sys::pidfd_signal(self.pidfd.as_fd(), libc::SIGKILL);
        kill_group(self.pid);
    }
}

/// SIGKILL to the process group `leader` leads (every worker leads its
/// own); nothing if it is gone.
fn kill_group(leader: u32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(leader as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// A worker that has exited, waiting for the dispatcher's Detached.
struct Exiting {
    proc: Proc,
    uptime: std::time::Duration,
    how: String,
    /// Judge the exit anyway by then.
    give_up_at: Instant,
}

/// How long an exit waits for the dispatcher's Detached (it answers in
/// microseconds; this only guards against a dispatcher that is gone).
const DETACH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Per slot: what outlives its processes.
#[derive(Default)]
struct SlotState {
    /// Consecutive failed starts (see `backoff`).
    failures: u32,
    restart_at: Option<Instant>,
    restarts: u64,
    crash_loop_reported: bool,
    last_exit: String,
}

pub struct Supervisor {
    poll: Poll,
    signals: SignalFd,
    output: output::Output,
    /// Kills what workers leave behind if this master is killed outright.
    reaper: Option<reaper::Reaper>,
    config: Config,
    slot_pools: Vec<usize>,
    slots: Vec<SlotState>,
    procs: Vec<Proc>,
    /// Exited workers whose exit is judged once the dispatcher has read
    /// their last words.
    exiting: Vec<Exiting>,
    dispatch: dispatch::Handle,
    events: dispatch::EventQueues,
    control: Receiver<control::Incoming>,
    /// For status: where the master listens, and since when.
    listen: String,
    started: Instant,
    phase: Phase,
    generation: u64,
    interrupts: u32,
    /// Some worker was killed rather than drained.
    forced: bool,
    /// Some worker has said READY since start-up.
    any_ready: bool,
    /// Re-reads the configuration for a reload.
    reconfigure: Reconfigure,
    reload: Option<Reload>,
    /// Next check of the recycling limits (when any is set).
    next_check: Option<Instant>,
    /// systemd was told READY=1 (once every first worker was ready).
    notified_ready: bool,
    /// Said that max_rss is below a fresh worker's memory (once per
    /// configuration).
    rss_warned: bool,
    /// Node workers' `cluster.worker.id`s handed out so far.
    node_ids: u64,
    /// The close-report preload, written when a Node worker first needs it.
    node_preload: Option<spawn::Preload>,
    /// The accept shim's in-memory file, made when a shim worker first needs it.
    shim: Option<crate::shim::Memfd>,
    /// Shared mode: the listener every worker gets as fd 3.
    shared_listener: Option<OwnedFd>,
    /// lb's port.
    port: u16,
}

/// Where the master listens; in shared mode, the listener itself (passed
/// to every worker).
pub struct Front {
    pub addr: std::net::SocketAddr,
    pub shared: Option<OwnedFd>,
}

/// Loads the configuration again (the same sources as at start).
pub type Reconfigure = Box<dyn Fn() -> Result<Config, crate::config::ConfigError>>;

impl Supervisor {
    /// `poll` must already carry the waker the dispatcher's notifier uses
    /// (token [`WAKER`]). The caller has blocked [`handled_signals`] in
    /// every thread.
    pub fn new(
        poll: Poll,
        config: Config,
        reconfigure: Reconfigure,
        front: Front,
        dispatch: dispatch::Handle,
        events: dispatch::EventQueues,
        control: Receiver<control::Incoming>,
    ) -> Result<Supervisor, SupervisorError> {
        let Front {
            addr: listen,
            shared: shared_listener,
        } = front;
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
        let output =
            output::Output::start(config.worker_log.as_deref()).map_err(SupervisorError::Output)?;
        let reaper = reaper::Reaper::start()
            .inspect_err(|e| {
                info!(
                    "cannot start the group reaper ({e}): if this master is killed with \
                     SIGKILL, what its workers started may outlive them"
                )
            })
            .ok();
        let slot_pools = config.slot_pools();
        let slots = (0..slot_pools.len())
            .map(|_| SlotState::default())
            .collect();
        Ok(Supervisor {
            poll,
            signals,
            output,
            reaper,
            config,
            slot_pools,
            slots,
            procs: Vec::new(),
            exiting: Vec::new(),
            dispatch,
            events,
            control,
            listen: listen.to_string(),
            port: listen.port(),
            started: Instant::now(),
            phase: Phase::Running,
            generation: 1,
            interrupts: 0,
            forced: false,
            any_ready: false,
            reconfigure,
            reload: None,
            next_check: None,
            notified_ready: false,
            rss_warned: false,
            node_ids: 0,
            node_preload: None,
            shim: None,
            shared_listener,
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
            if self.phase != Phase::Running && self.procs.is_empty() && self.exiting.is_empty() {
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
            // What a worker said before it died is handled before its death.
            while let Ok(event) = self.events.lifecycle.try_recv() {
                self.on_event(event);
            }
            while let Ok(event) = self.events.chatter.try_recv() {
                self.on_event(event);
            }
            while let Ok(incoming) = self.control.try_recv() {
                if incoming.request == Request::Reload {
                    // Answered when the reload ends.
                    self.begin_reload(Some(incoming.reply));
                } else {
                    let answer = self.on_control(incoming.request);
                    let _ = incoming.reply.send(answer);
                }
            }
            for ev in events.iter() {
                match ev.token() {
                    SIGNALS => self.on_signals(),
                    WAKER => {}
                    Token(t) => self.on_exit((t - CHILD_BASE) as u32),
                }
            }
            self.on_timers();
            if let Some(e) = self.none_can_start() {
                self.kill_all();
                self.reap_all();
                return Err(e);
            }
        }
        self.dispatch.send(Command::Stop);
        Ok(!self.forced)
    }

    /// At start-up, before any worker was ever ready: if every slot is crash
    /// looping, waiting longer will not help.
    fn none_can_start(&self) -> Option<SupervisorError> {
        if self.any_ready || self.phase != Phase::Running {
            return None;
        }
        let all_looping = self
            .slots
            .iter()
            .all(|s| backoff::is_crash_loop(s.failures));
        all_looping.then(|| {
            let s = &self.slots[0];
            SupervisorError::NoneReady(s.failures, s.last_exit.clone())
        })
    }

    fn next_deadline(&self) -> Option<Instant> {
        let restarts = self.slots.iter().filter_map(|s| s.restart_at);
        let kills = self
            .procs
            .iter()
            .flat_map(|p| [p.kill_at, p.replace_at])
            .flatten();
        let ready = self
            .procs
            .iter()
            .filter(|p| !p.ready && !p.retiring && !p.ready_timed_out)
            .map(|p| p.started + self.config.ready_timeout);
        let exits = self.exiting.iter().map(|e| e.give_up_at);
        let drain = match self.phase {
            Phase::Draining { deadline } => Some(deadline),
            _ => None,
        };
        restarts
            .chain(kills)
            .chain(exits)
            .chain(ready)
            .chain(drain)
            .chain(self.next_check)
            .min()
    }

    /// Starts the worker for `slot`; the error is fatal only at start-up.
    fn start(&mut self, slot: Slot) -> Result<u32, SupervisorError> {
        let pool = &self.config.pools[self.slot_pools[slot.0]];
        let generation = self.generation;
        info!(
            "worker {slot} gen {generation}: spawn `{}`",
            spawn::describe_command(pool)
        );
        let report_closed = self.config.policy.uses_close_reports();
        if pool.mode == Mode::Node && report_closed && self.node_preload.is_none() {
            self.node_preload = Some(spawn::Preload::write().map_err(|source| {
                SupervisorError::Spawn {
                    pool: pool.name.clone(),
                    command: "the Node.js close-report preload".into(),
                    source,
                    hint: "it is written to $XDG_RUNTIME_DIR or the temp directory; check that one is writable",
                }
            })?);
        }
        if pool.mode == Mode::Shim && self.shim.is_none() {
            self.shim =
                Some(
                    crate::shim::Memfd::create().map_err(|source| SupervisorError::Spawn {
                        pool: pool.name.clone(),
                        command: "the accept shim (an in-memory file)".into(),
                        source,
                        hint: "memfd_create failed; check the fd limit",
                    })?,
                );
        }
        self.node_ids += 1;
        let proxy_port = if pool.mode.relays() {
            Some(spawn::free_port().map_err(|source| SupervisorError::Spawn {
                pool: pool.name.clone(),
                command: pool.command.display().to_string(),
                source,
                hint: "no free loopback port for the worker to listen on",
            })?)
        } else {
            None
        };
        let launch = spawn::Launch {
            slot,
            generation,
            report_closed,
            node_id: self.node_ids,
            node_preload: self
                .node_preload
                .as_ref()
                .filter(|_| report_closed)
                .map(|p| p.file.as_path()),
            port: self.port,
            proxy_port,
            shim: self.shim.as_ref(),
            listener: self.shared_listener.as_ref().map(|l| l.as_raw_fd()),
            drain_timeout: self.config.drain_timeout,
            queue: self.config.worker_queue,
        };
        let spawned = spawn::spawn(pool, &launch).map_err(|source| {
            // ENOENT for a file that exists: exec could not find what the file needs.
            let hint = if source.kind() == io::ErrorKind::NotFound && pool.command.exists() {
                "the file exists, so its #! interpreter or its dynamic loader is missing"
            } else {
                "check that it is an executable program"
            };
            SupervisorError::Spawn {
                pool: pool.name.clone(),
                command: pool.command.display().to_string(),
                source,
                hint,
            }
        })?;
        let pid = spawned.child.id();
        if let Some(r) = self.reaper.as_mut() {
            r.add(pid);
        }
        info!("worker {slot} pid {pid} gen {generation}: online");
        self.poll
            .registry()
            .register(
                &mut SourceFd(&spawned.pidfd.as_raw_fd()),
                Token(CHILD_BASE + pid as usize),
                Interest::READABLE,
            )
            .map_err(SupervisorError::Poll)?;
        for (fd, stderr) in [(spawned.stdout, false), (spawned.stderr, true)] {
            self.output.add(output::Pipe {
                slot,
                pid,
                stderr,
                fd,
            });
        }
        self.dispatch.send(Command::Attach {
            slot,
            pid,
            channel: spawned.channel,
            peer: spawned.peer,
            weight: pool.weight,
            mode: pool.mode,
            port: proxy_port.unwrap_or(0),
        });
        self.procs.push(Proc {
            slot,
            pid,
            generation,
            child: spawned.child,
            pidfd: spawned.pidfd,
            started: Instant::now(),
            ready: false,
            retiring: false,
            ready_timed_out: false,
            kill_at: None,
            malformed: 0,
            recycling: false,
            replace_at: None,
            said: crate::log::Budget::new(SAID_PER_SECOND),
            stalled: false,
            rss_checked: false,
            stop_signal: pool.stop_signal,
            signal_on_drain: pool.mode.drained_by() == DrainBy::Signal,
        });
        Ok(pid)
    }

    /// Starts `slot` now, or schedules a retry with backoff if that fails.
    fn start_or_retry(&mut self, slot: Slot) {
        if let Err(e) = self.start(slot) {
            let s = &mut self.slots[slot.0];
            s.failures = s.failures.saturating_add(1);
            s.last_exit = e.to_string();
            let delay = backoff::delay(s.failures);
            s.restart_at = Some(Instant::now() + delay);
            info!("{e}; retrying in {} ms", delay.as_millis());
        }
    }

    fn index_of(&self, pid: u32) -> Option<usize> {
        self.procs.iter().position(|p| p.pid == pid)
    }

    fn on_exit(&mut self, pid: u32) {
        let Some(i) = self.index_of(pid) else { return };
        // What the worker leaves behind in its process group (a shell's
        // `sleep`, a server's own children) goes with it: while the exited
        // leader is not reaped its pid, and so the group's id, cannot be
        // reused by another process.
        let exited = nix::sys::wait::waitid(
            nix::sys::wait::Id::PIDFd(self.procs[i].pidfd.as_fd()),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        );
        if matches!(exited, Ok(s) if s != nix::sys::wait::WaitStatus::StillAlive) {
            kill_group(pid);
        }
        let status = match self.procs[i].child.try_wait() {
            Ok(Some(status)) => status,
            // A pidfd is readable only once the process exited; else spurious.
            Ok(None) | Err(_) => return,
        };
        let p = self.procs.swap_remove(i);
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
            proc: p,
        });
    }

    /// The dispatcher has read and let go of an exited worker's channel
    /// (or did not answer in time): what the exit means.
    fn exited(&mut self, pid: u32) {
        let Some(i) = self.exiting.iter().position(|e| e.proc.pid == pid) else {
            return;
        };
        let Exiting {
            proc: mut p,
            uptime,
            how,
            ..
        } = self.exiting.swap_remove(i);
        let unlogged = p.said.unreported();
        if unlogged > 0 {
            info!(
                "worker {} pid {}: {unlogged} lines not logged (more than {SAID_PER_SECOND} a second)",
                p.slot, p.pid
            );
        }
        let expected = p.retiring || self.phase != Phase::Running;
        info!(
            "worker {} pid {} gen {}: exit ({how}, up {:.1}s, {})",
            p.slot,
            p.pid,
            p.generation,
            uptime.as_secs_f64(),
            if expected { "expected" } else { "unexpected" }
        );
        // (A slot scaled away meanwhile restarts nothing.)
        if p.retiring || self.phase != Phase::Running || p.slot.0 >= self.slots.len() {
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
        }
        // Another live process still covers the slot (the one a failed
        // candidate was to replace, or the candidate replacing a dead one).
        // A failed successor leaves the one it was to replace to be
        // replaced again: at once when its limits say so (recycling), after
        // the back-off of a failed start when it takes nothing (stalled).
        if self.procs.iter().any(|o| o.slot == p.slot && !o.retiring) {
            if !p.ready {
                let s = &mut self.slots[p.slot.0];
                s.failures = s.failures.saturating_add(1);
                let retry = Instant::now() + backoff::delay(s.failures);
                for o in self.procs.iter_mut().filter(|o| o.slot == p.slot) {
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
    fn exits_overdue(&mut self, now: Instant) {
        let overdue: Vec<u32> = self
            .exiting
            .iter()
            .filter(|e| now >= e.give_up_at)
            .map(|e| e.proc.pid)
            .collect();
        for pid in overdue {
            self.exited(pid);
        }
    }

    /// Restarts `slot` after the backoff for `failures` consecutive failed
    /// starts; reports a crash loop once.
    fn schedule_restart(&mut self, slot: Slot, failures: u32, reason: String) {
        let min_uptime = self.config.min_uptime;
        let s = &mut self.slots[slot.0];
        s.failures = failures;
        s.last_exit = reason;
        let delay = backoff::delay(failures);
        s.restart_at = Some(Instant::now() + delay);
        if !backoff::is_crash_loop(failures) {
            s.crash_loop_reported = false;
            info!(
                "worker {slot}: restart #{} in {} ms",
                s.restarts + 1,
                delay.as_millis()
            );
        } else if !s.crash_loop_reported {
            s.crash_loop_reported = true;
            info!(
                "worker {slot} is crash-looping: {failures} failed starts in a row, each within \
                 {:.1}s or before READY (last: {}); restarting with backoff up to {}s, reported once",
                min_uptime.as_secs_f64(),
                s.last_exit,
                backoff::MAX.as_secs()
            );
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Ready { slot, pid } => {
                if let Some(i) = self.index_of(pid) {
                    let p = &mut self.procs[i];
                    p.ready = true;
                    self.any_ready = true;
                    info!("worker {slot} pid {pid} gen {}: ready", p.generation);
                    if !self.notified_ready
                        && self.procs.iter().filter(|p| p.ready).count() >= self.slots.len()
                    {
                        self.notified_ready = true;
                        crate::systemd::notify("READY=1");
                    }
                    // READY was the switch: what ran in the slot before drains.
                    let others: Vec<u32> = self
                        .procs
                        .iter()
                        .filter(|o| o.slot == slot && o.pid != pid && !o.retiring)
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
                    let p = &self.procs[i];
                    info!("worker {slot} pid {pid} gen {}: draining", p.generation);
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
                let p = &self.procs[i];
                // Only one on its way out: STOP is the answer to DRAIN.
                if p.retiring || self.phase != Phase::Running {
                    let signal = nix::sys::signal::Signal::try_from(p.stop_signal)
                        .map_or_else(|_| p.stop_signal.to_string(), |s| s.to_string());
                    info!("worker {slot} pid {pid}: stopping it with {signal}");
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
                    "worker {slot} pid {pid}: rescued {count} queued connections for other workers"
                );
            }
            Event::AcceptError { errno } => {
                info!(
                    "accept failed: {}; retrying every 10 ms (said once, until it works again)",
                    io::Error::from_raw_os_error(errno)
                );
            }
            Event::AcceptRecovered { failures } => {
                info!("accept works again, after {failures} failed tries");
            }
            Event::Drained => {
                info!("listener closed; every worker was sent DRAIN");
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
                info!(
                    "worker {slot} pid {pid} {why}: it gets no more, {rescued} went to other \
                     workers; replacing it, its successor ready first"
                );
                let Some(i) = self.index_of(pid) else { return };
                let covered = self.covered(slot, pid);
                let p = &mut self.procs[i];
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
    fn say_for(&mut self, slot: Slot, pid: u32, text: std::fmt::Arguments<'_>) {
        let budget = match self.index_of(pid) {
            Some(i) => &mut self.procs[i].said,
            None => match self.exiting.iter_mut().find(|e| e.proc.pid == pid) {
                Some(e) => &mut e.proc.said,
                None => return,
            },
        };
        let Some(unlogged) = budget.take(Instant::now()) else {
            return;
        };
        if unlogged > 0 {
            info!(
                "worker {slot} pid {pid}: {unlogged} lines not logged (more than {SAID_PER_SECOND} a second)"
            );
        }
        info!("worker {slot} pid {pid}: {text}");
    }

    /// A worker announced it is leaving (it may have exited already: its
    /// exit is judged after this). Its replacement starts at once after a
    /// healthy run; one that leaves young is a failed start, backed off
    /// like a crash (a worker that keeps leaving young is a crash loop).
    /// A successor already starting (a reload's, a recycle's) is its
    /// replacement: never two.
    fn leaving(&mut self, slot: Slot, pid: u32) {
        let (ready, uptime) = if let Some(i) = self.index_of(pid) {
            let p = &self.procs[i];
            let seen = (p.ready, p.started.elapsed());
            if !self.retire(pid) {
                return;
            }
            seen
        } else if let Some(e) = self.exiting.iter_mut().find(|e| e.proc.pid == pid) {
            if e.proc.retiring {
                return;
            }
            e.proc.retiring = true;
            (e.proc.ready, e.uptime)
        } else {
            return;
        };
        if self.phase != Phase::Running || slot.0 >= self.slots.len() || self.covered(slot, pid) {
            return;
        }
        self.slots[slot.0].restarts += 1;
        if ready && uptime >= self.config.min_uptime {
            info!("worker {slot} pid {pid}: leaving; starting its replacement first");
            self.slots[slot.0].failures = 0;
            self.start_or_retry(slot);
        } else {
            let failures = self.slots[slot.0].failures.saturating_add(1);
            info!(
                "worker {slot} pid {pid}: leaving after {:.1}s{}; its replacement starts in {} ms",
                uptime.as_secs_f64(),
                if ready { "" } else { ", never ready" },
                backoff::delay(failures).as_millis()
            );
            let why = format!("left after {:.1}s", uptime.as_secs_f64());
            self.schedule_restart(slot, failures, why);
        }
    }

    /// Whether a process other than `pid` takes, or is about to take, the
    /// slot's connections: not one on its way out (retiring), nor one that
    /// is itself being replaced (recycling, stalled).
    fn covered(&self, slot: Slot, pid: u32) -> bool {
        self.procs
            .iter()
            .any(|o| o.slot == slot && o.pid != pid && !o.retiring && !o.recycling && !o.stalled)
    }

    /// A worker broke the protocol: logged (the first few), counted, and at
    /// the limit replaced, its successor ready first. The successor starts
    /// after the back-off of a failed start: a build that does this would
    /// do it again, and must not churn.
    fn protocol_error(&mut self, slot: Slot, pid: u32, error: crate::proto::Malformed) {
        let Some(i) = self.index_of(pid) else { return };
        let p = &mut self.procs[i];
        p.malformed += 1;
        let n = p.malformed;
        if n <= MALFORMED_LOGGED {
            info!("worker {slot} pid {pid}: protocol error: {error}");
        }
        if n == MALFORMED_LOGGED {
            info!("worker {slot} pid {pid}: further protocol errors are counted, not logged");
        }
        if n < MALFORMED_LIMIT || p.retiring || p.recycling || self.phase != Phase::Running {
            return;
        }
        p.recycling = true;
        let failures = self.slots[slot.0].failures.saturating_add(1);
        let delay = backoff::delay(failures);
        p.replace_at = Some(Instant::now() + delay);
        info!(
            "worker {slot} pid {pid}: {n} protocol errors; replacing it in {} ms, its \
             successor ready first",
            delay.as_millis()
        );
        let s = &mut self.slots[slot.0];
        s.failures = failures;
        s.last_exit = format!("{n} protocol errors");
    }

    /// Marks the process `pid` as on its way out: its exit restarts nothing,
    /// and it is killed if still running after `drain_timeout`. False if it
    /// already was (or is gone).
    fn retire(&mut self, pid: u32) -> bool {
        let Some(i) = self.index_of(pid) else {
            return false;
        };
        let p = &mut self.procs[i];
        if p.retiring {
            return false;
        }
        p.retiring = true;
        p.kill_at = Some(Instant::now() + self.config.drain_timeout);
        true
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        if let Phase::Draining { deadline } = self.phase
            && now >= deadline
        {
            info!(
                "drain timeout ({:.1}s): killing {} workers still running",
                self.config.drain_timeout.as_secs_f64(),
                self.procs.len()
            );
            self.kill_all();
        }
        let ready_timeout = self.config.ready_timeout;
        for p in &mut self.procs {
            let late =
                !p.ready && !p.retiring && !p.ready_timed_out && now >= p.started + ready_timeout;
            if late {
                info!(
                    "worker {} pid {}: not ready within {:.1}s; killing it",
                    p.slot,
                    p.pid,
                    ready_timeout.as_secs_f64()
                );
                p.ready_timed_out = true;
                p.kill();
            }
            if p.kill_at.is_some_and(|t| now >= t) {
                info!(
                    "worker {} pid {}: still running after {:.1}s of draining; killing it",
                    p.slot,
                    p.pid,
                    self.config.drain_timeout.as_secs_f64()
                );
                p.kill_at = None;
                p.kill();
            }
        }
        self.replace_due(now);
        self.exits_overdue(now);
        let limits = self.config.max_conns_per_worker.is_some() || self.config.max_rss.is_some();
        if limits && self.phase == Phase::Running {
            if self.next_check.is_none_or(|t| now >= t) {
                self.next_check = Some(now + RECYCLE_CHECK);
                self.recycle();
            }
        } else {
            self.next_check = None;
        }
        for slot in 0..self.slots.len() {
            if self.slots[slot].restart_at.is_some_and(|t| now >= t) {
                self.slots[slot].restart_at = None;
                // Something else took the slot meanwhile (a reload's
                // candidate): never two successors.
                if !self.covered(Slot(slot), 0) {
                    self.slots[slot].restarts += 1;
                    self.start_or_retry(Slot(slot));
                }
            }
        }
    }
}
