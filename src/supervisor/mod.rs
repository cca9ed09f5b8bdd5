//! Worker processes: spawn (channel on fd 3), readiness, exit detection by
//! pidfd, restart with backoff, crash-loop reports, replacement of workers
//! that leave or misbehave, drain and shutdown on signals. Runs on the main
//! thread in its own mio loop, so a slow fork/exec or a log write never
//! stalls the dispatch thread.
//!
//! Never touches client sockets: it tells the dispatcher about workers with
//! [`dispatch::Command`]s and hears back [`dispatch::Event`]s.

pub mod backoff;
mod events;
mod exits;
mod launch;
mod layout;
mod notify;
mod output;
mod preload;
pub mod reaper;
mod recycle;
mod reload;
mod requests;
mod restart;
mod rolling;
mod scale;
mod signals;
mod spawn;
mod start;
mod status;
mod timers;
mod upgrade;
mod usage;
pub mod watch;

pub use requests::Answer;
pub use signals::handled_signals;
pub use spawn::message_cost;
pub use status::{Health, ListenerStatus, PoolStatus, Status, WorkerState, WorkerStatus};
pub use upgrade::{Carry, Ended};
pub use usage::Usage;

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Receiver;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::config::Config;
use crate::control::{self, Request};
use crate::dispatch::{self, Command};
use crate::policy::Slot;
use crate::sys;
use crate::warn;
use rolling::Reload;

const SIGNALS: Token = Token(0);
const WAKER: Token = Token(1);
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
    #[error("slot {0} belongs to no pool")]
    NoPool(usize),
    #[error("epoll: {0}")]
    Epoll(io::Error),
    #[error("eventfd: {0}")]
    Eventfd(io::Error),
}

/// The supervisor's event loop, made before what wakes it: the dispatcher's
/// notifier, the control socket and the metrics endpoint each get its waker
/// (`waker`) before the supervisor itself is made with the loop.
pub struct EventLoop {
    poll: Poll,
    waker: Arc<Waker>,
}

impl EventLoop {
    pub fn new() -> Result<EventLoop, SupervisorError> {
        let poll = Poll::new().map_err(SupervisorError::Epoll)?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(SupervisorError::Eventfd)?;
        Ok(EventLoop {
            poll,
            waker: Arc::new(waker),
        })
    }

    /// What wakes the supervisor when something is for it.
    pub fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }
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

/// A live worker process (the dispatcher keeps its own `Worker` for the
/// same process: its channel and counts).
struct Worker {
    slot: Slot,
    /// Its pool's name, as it was when it started (a reload may since
    /// have given the slot to another pool).
    pool: String,
    pid: u32,
    generation: u64,
    /// How it is known, signalled and reaped (`waitid(P_PIDFD)`): never by
    /// a bare pid, which could be another process's once it is reaped.
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
    /// Random, drawn at its spawn: its share of the connection limit's
    /// jitter (`recycle::conn_limit`).
    jitter_draw: u64,
    /// The signal that asks it to finish and exit (its pool's).
    stop_signal: libc::c_int,
    /// Draining it means that signal (shared and proxy workers have no
    /// channel to be told DRAIN on; the shim asks for it with STOP once the
    /// server has taken every connection sent before DRAIN).
    signal_on_drain: bool,
}

impl Worker {
    /// A worker process just started (or just taken over: the caller
    /// sets what differs), not yet ready.
    #[allow(clippy::too_many_arguments)]
    fn new(
        slot: Slot,
        pool: String,
        pid: u32,
        generation: u64,
        pidfd: OwnedFd,
        stop_signal: libc::c_int,
        drained_by: crate::config::DrainBy,
    ) -> Worker {
        Worker {
            slot,
            pool,
            pid,
            generation,
            pidfd,
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
            jitter_draw: recycle::draw(),
            stop_signal,
            signal_on_drain: drained_by == crate::config::DrainBy::Signal,
        }
    }

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
    worker: Worker,
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
    /// The instance number (`NODE_APP_INSTANCE`) its workers get, and the
    /// pool it was given for: kept across restarts of the slot.
    instance: Option<(String, usize)>,
}

pub struct Supervisor {
    poll: Poll,
    /// Kept with the poll it is registered in.
    _waker: Arc<Waker>,
    signals: SignalFd,
    output: output::Output,
    /// Kills what workers leave behind if this master is killed outright.
    reaper: Option<reaper::Reaper>,
    config: Config,
    /// Which pool each slot runs (see `layout`).
    layout: layout::Layout,
    /// Each pool's count as the configuration said it at the last (re)load,
    /// by name: a reload keeps what `lb scale` set unless that changed.
    configured: Vec<(String, usize)>,
    /// `lb restart --wait`s answered once the workers they name are gone.
    waits: Vec<restart::Wait>,
    slots: Vec<SlotState>,
    workers: Vec<Worker>,
    /// Exited workers whose exit is judged once the dispatcher has read
    /// their last words.
    exiting: Vec<Exiting>,
    dispatch: dispatch::Handle,
    events: dispatch::EventQueues,
    control: Receiver<control::Incoming>,
    /// For status: since when the master runs.
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
    node_preload: Option<preload::Preload>,
    /// The accept shim's in-memory file, made when a shim worker first needs it.
    shim: Option<crate::shim::Memfd>,
    /// Shared mode: the listeners every worker gets as fds 3 on, with their
    /// names (under kernel dispatch, the anchor of the reuseport group:
    /// workers get their own).
    shared_listeners: Vec<(OwnedFd, Option<String>)>,
    /// Kernel dispatch: each shared worker gets a listener of its own on
    /// `front`, in lb's reuseport group.
    kernel_dispatch: bool,
    front: std::net::SocketAddr,
    /// For status: what lb listens on, in configured order.
    listening: Vec<String>,
    /// lb's port.
    port: u16,
    /// The watchdog's schedule and the status systemd was last told.
    notify: notify::Notify,
    /// An upgrade whose new binary is being checked.
    upgrading: Option<upgrade::Upgrading>,
    /// In-place upgrades since lb started.
    upgrades: u64,
    /// The control socket's path.
    control_path: std::path::PathBuf,
    /// What an earlier image handed over, adopted when `run` starts.
    inherited: Option<crate::upgrade::State>,
}

/// Where the master listens; in shared mode, the listener itself (passed
/// to every worker).
pub struct Front {
    /// The first TCP listener's address (Node's and the shim's port,
    /// kernel dispatch's group), or the unspecified address, port 0.
    pub addr: std::net::SocketAddr,
    /// Every listener, as shown (status, metrics).
    pub listening: Vec<String>,
    /// Shared mode: the listeners, with their names.
    pub shared: Vec<(OwnedFd, Option<String>)>,
    /// Kernel dispatch is in effect.
    pub kernel: bool,
    /// The control socket's path (an upgrade's new binary checks it).
    pub control: std::path::PathBuf,
}

/// Loads the configuration again (the same sources as at start).
pub type Reconfigure = Box<dyn Fn() -> Result<Config, crate::config::ConfigError>>;

impl Supervisor {
    /// The caller has blocked [`handled_signals`] in every thread.
    pub fn new(
        event_loop: EventLoop,
        config: Config,
        reconfigure: Reconfigure,
        front: Front,
        dispatch: dispatch::Handle,
        events: dispatch::EventQueues,
        control: Receiver<control::Incoming>,
    ) -> Result<Supervisor, SupervisorError> {
        let Front {
            addr: listen,
            listening,
            shared: shared_listeners,
            kernel: kernel_dispatch,
            control: control_path,
        } = front;
        let EventLoop { poll, waker } = event_loop;
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
        let layout = layout::Layout::new(&config.pools);
        let slots = (0..layout.len()).map(|_| SlotState::default()).collect();
        let configured = layout::configured(&config.pools);
        Ok(Supervisor {
            poll,
            _waker: waker,
            signals,
            output,
            reaper: None,
            config,
            layout,
            configured,
            waits: Vec::new(),
            slots,
            workers: Vec::new(),
            exiting: Vec::new(),
            dispatch,
            events,
            control,
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
            shared_listeners,
            listening,
            kernel_dispatch,
            front: listen,
            notify: notify::Notify::new(),
            upgrading: None,
            upgrades: 0,
            control_path,
            inherited: None,
        })
    }

    /// An image started by `lb upgrade`: `run` adopts what `state` names
    /// instead of starting workers.
    pub fn taking_over(mut self, state: Option<crate::upgrade::State>) -> Supervisor {
        self.inherited = state;
        self
    }

    /// Starts every worker (or adopts those an earlier image handed over)
    /// and supervises until shutdown, or until it is to be re-executed.
    pub fn run(mut self) -> Result<Ended, SupervisorError> {
        if let Some(mut inherited) = self.inherited.take() {
            self.adopt(&mut inherited);
            for slot in self.layout.taken() {
                if !self.workers.iter().any(|w| w.slot == slot) {
                    self.start_or_retry(slot);
                }
            }
        } else {
            self.reaper = reaper::Reaper::start()
                .inspect_err(|e| {
                    warn!(
                        "cannot start the group reaper ({e}): if this master is killed with \
                         SIGKILL, what its workers started may outlive them"
                    )
                })
                .ok();
            for slot in 0..self.slots.len() {
                if let Err(e) = self.start(Slot(slot)) {
                    self.kill_all();
                    self.reap_all();
                    return Err(e);
                }
            }
        }
        let mut events = Events::with_capacity(64);
        loop {
            if self.phase != Phase::Running && self.workers.is_empty() && self.exiting.is_empty() {
                break;
            }
            let timeout = self
                .next_deadline()
                .into_iter()
                .chain(self.notify.deadline())
                .min()
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
                match incoming.request {
                    // Answered when the reload ends.
                    Request::Reload => self.begin_reload(Some(incoming.reply)),
                    // Answered when the restart ends (or its workers are gone).
                    Request::Restart { target, wait } => {
                        self.begin_restart(&target, wait, incoming.reply)
                    }
                    // Answered once checked and handed over, or refused.
                    Request::Upgrade => self.begin_upgrade(Some(incoming.reply), "lb upgrade"),
                    request => {
                        let answer = self.on_control(request);
                        let _ = incoming.reply.send(answer);
                    }
                }
            }
            for ev in events.iter() {
                match ev.token() {
                    SIGNALS => self.on_signals(),
                    WAKER => {}
                    Token(t) => self.on_exit((t - CHILD_BASE) as u32),
                }
            }
            if let Some(carry) = self.upgrade_checked() {
                // The dispatcher has left its loop; nothing is stopped.
                return Ok(Ended::Upgrade(carry));
            }
            self.on_timers();
            self.answer_waits();
            self.notify_systemd();
            if let Some(e) = self.none_can_start() {
                self.kill_all();
                self.reap_all();
                return Err(e);
            }
        }
        self.dispatch.send(Command::Stop);
        Ok(Ended::Stopped(!self.forced))
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

    /// Whether some pool runs `slot` (one scaled or reloaded away does not:
    /// what exits there restarts nothing).
    fn planned(&self, slot: Slot) -> bool {
        self.layout.pool(slot).is_some()
    }

    fn index_of(&self, pid: u32) -> Option<usize> {
        self.workers.iter().position(|p| p.pid == pid)
    }

    /// Whether a process other than `pid` takes, or is about to take, the
    /// slot's connections: not one on its way out (retiring), nor one that
    /// is itself being replaced (recycling, stalled).
    fn covered(&self, slot: Slot, pid: u32) -> bool {
        self.workers
            .iter()
            .any(|o| o.slot == slot && o.pid != pid && !o.retiring && !o.recycling && !o.stalled)
    }

    /// Marks the process `pid` as on its way out: its exit restarts nothing,
    /// and it is killed if still running after `drain_timeout`. False if it
    /// already was (or is gone).
    fn retire(&mut self, pid: u32) -> bool {
        let Some(i) = self.index_of(pid) else {
            return false;
        };
        let p = &mut self.workers[i];
        if p.retiring {
            return false;
        }
        p.retiring = true;
        p.kill_at = Some(Instant::now() + self.config.drain_timeout);
        true
    }
}
