//! `lb upgrade` and SIGUSR2, the supervisor's part: refuse what cannot
//! move, check the new binary (on a thread: the loop goes on meanwhile),
//! take back the dispatcher's and the output thread's fds, and hand the
//! master everything the next image needs (`upgrade::State`). And, in that
//! next image, adopt the workers the state names.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::unix::SourceFd;
use mio::{Interest, Token};

use super::{CHILD_BASE, Phase, SlotState, Supervisor, Worker, layout, output, requests};
use crate::dispatch::{Command, Handed, Handover};
use crate::policy::Slot;
use crate::upgrade::{self, State, check, state};
use crate::{info, warn};

/// How long the dispatcher may take to give everything up (it holds on
/// for at most two seconds while handing out what it holds).
const HANDOVER_WAIT: Duration = Duration::from_secs(5);

/// An upgrade whose binary is being checked.
pub(super) struct Upgrading {
    result: Receiver<Result<check::Checked, String>>,
    reply: Option<Sender<requests::Answer>>,
    why: &'static str,
}

/// What the master execs with: the state and the fds it names (owned here
/// until the exec), the checked binary, and the answer still to send.
pub struct Carry {
    pub state: State,
    pub binary: OwnedFd,
    pub version: String,
    /// Kept open until the exec (the state names them by number).
    pub fds: Vec<OwnedFd>,
    pub reply: Option<Sender<requests::Answer>>,
}

/// How the supervisor's run ended.
pub enum Ended {
    /// Stopped; whether every worker drained in time.
    Stopped(bool),
    /// To be re-executed.
    Upgrade(Box<Carry>),
}

impl Supervisor {
    /// `lb upgrade` (with `reply`) or SIGUSR2.
    pub(super) fn begin_upgrade(
        &mut self,
        reply: Option<Sender<requests::Answer>>,
        why: &'static str,
    ) {
        if let Some(refusal) = self.unmovable() {
            info!("{why}: upgrade refused: {refusal}");
            if let Some(r) = reply {
                let _ = r.send(requests::Answer::Refused(format!(
                    "upgrade refused: {refusal}"
                )));
            }
            return;
        }
        let exe = upgrade::exec::started_as().to_path_buf();
        info!("{why}: upgrade: checking the new binary {}", exe.display());
        let running = check::report(&self.config);
        let control = self.control_path.clone();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let waker = std::sync::Arc::clone(&self._waker);
        let spawned = std::thread::Builder::new()
            .name("lb-upgrade-check".into())
            .spawn(move || {
                let _ = tx.send(check::check(&exe, &control, &running));
                let _ = waker.wake();
            });
        match spawned {
            Ok(_) => {
                self.upgrading = Some(Upgrading {
                    result: rx,
                    reply,
                    why,
                })
            }
            Err(e) => {
                if let Some(r) = reply {
                    let _ = r.send(requests::Answer::Refused(format!(
                        "upgrade refused: cannot start the check ({e})"
                    )));
                }
            }
        }
    }

    /// Why the master cannot be re-executed now, if it cannot.
    fn unmovable(&self) -> Option<String> {
        if self.upgrading.is_some() {
            return Some("an upgrade is already in progress".into());
        }
        if let Some(r) = &self.reload {
            return Some(format!(
                "{} is in progress; upgrade once it is done",
                r.what.article()
            ));
        }
        if self.phase != Phase::Running {
            return Some("the master is stopping".into());
        }
        if self.kernel_dispatch {
            return Some(
                "kernel dispatch's BPF program and maps are not handed over; restart lb to \
                 upgrade it"
                    .into(),
            );
        }
        if let Some(p) = self.config.pools.iter().find(|p| {
            matches!(
                p.mode,
                crate::config::Mode::Node | crate::config::Mode::Proxy
            )
        }) {
            return Some(format!(
                "pool `{}` runs in {} mode, whose state lives in the master ({}); restart lb \
                 to upgrade it",
                p.name,
                p.mode,
                if p.mode == crate::config::Mode::Node {
                    "Node's cluster IPC"
                } else {
                    "the relays of its clients' bytes"
                }
            ));
        }
        if !self.exiting.is_empty() || !self.waits.is_empty() {
            return Some("a worker is on its way out; try again once it has exited".into());
        }
        for slot in self.layout.taken() {
            let mut here = self.workers.iter().filter(|w| w.slot == slot);
            match (here.next(), here.next()) {
                (Some(w), None) if w.ready && !w.retiring && !w.recycling => {}
                (None, _) => {
                    return Some(format!(
                        "slot {slot} has no worker (it is restarting); try again once it is ready"
                    ));
                }
                _ => {
                    return Some(format!(
                        "slot {slot}'s worker is starting, draining or being replaced; try again \
                         once it is done"
                    ));
                }
            }
        }
        if let Some(w) = self.workers.iter().find(|w| !self.planned(w.slot)) {
            return Some(format!(
                "worker pid {} is draining from a slot scaled away; try again once it has exited",
                w.pid
            ));
        }
        None
    }

    /// The check's answer, if it has come; `Some` once the master is to
    /// re-execute.
    pub(super) fn upgrade_checked(&mut self) -> Option<Box<Carry>> {
        let result = self.upgrading.as_ref()?.result.try_recv().ok()?;
        let Upgrading { reply, why, .. } = self.upgrading.take()?;
        let refuse = |reply: Option<Sender<requests::Answer>>, refusal: String| {
            warn!("{why}: upgrade refused: {refusal}; this master goes on");
            if let Some(r) = reply {
                let _ = r.send(requests::Answer::Refused(format!(
                    "upgrade refused: {refusal}"
                )));
            }
            None
        };
        let checked = match result {
            Ok(c) => c,
            Err(e) => return refuse(reply, e),
        };
        // Something may have started or stopped while the check ran.
        if let Some(refusal) = self.unmovable() {
            return refuse(reply, refusal);
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.dispatch.send(Command::Handover(tx));
        let handover = match rx.recv_timeout(HANDOVER_WAIT) {
            Ok(Ok(h)) => h,
            Ok(Err(refusal)) => return refuse(reply, refusal),
            Err(_) => return refuse(reply, "the dispatcher did not answer".into()),
        };
        let pipes = self.output.hand_back();
        let carry = self.carry(handover, pipes, checked, reply);
        Some(Box::new(carry))
    }

    /// Everything into the state; the fds it names moved into `fds`.
    fn carry(
        &mut self,
        handover: Handover,
        pipes: Vec<output::Pipe>,
        checked: check::Checked,
        reply: Option<Sender<requests::Answer>>,
    ) -> Carry {
        let mut fds: Vec<OwnedFd> = Vec::new();
        let mut keep = |fd: OwnedFd| {
            let raw = fd.as_raw_fd();
            fds.push(fd);
            raw
        };
        // (The master adds what it knows of each: the file it made, the
        // name systemd gave it. In shared mode they are the supervisor's.)
        let shared = std::mem::take(&mut self.shared_listeners)
            .into_iter()
            .map(|(fd, _)| fd);
        let listeners = handover
            .listeners
            .into_iter()
            .map(|(fd, _)| fd)
            .chain(shared)
            .map(|fd| state::Listener {
                fd: keep(fd),
                made: None,
                name: None,
            })
            .collect();
        let reaper = self
            .reaper
            .take()
            .and_then(|r| r.hand_over())
            .map(|(pid, pidfd, pipe)| state::Reaper {
                pid,
                pidfd: keep(pidfd),
                pipe: keep(pipe),
            });
        let mut handed: Vec<Handed> = handover.workers;
        let mut pipes = pipes;
        let mut workers = Vec::new();
        for w in std::mem::take(&mut self.workers) {
            let link = handed
                .iter()
                .position(|h| h.pid == w.pid)
                .map(|i| handed.swap_remove(i));
            let mut pipe = |stderr: bool| {
                pipes
                    .iter()
                    .position(|p| p.pid == w.pid && p.stderr == stderr)
                    .map(|i| pipes.swap_remove(i).fd)
            };
            let (stdout, stderr) = (pipe(false), pipe(true));
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&w.pidfd.as_raw_fd()));
            // (Every worker the supervisor has is the dispatcher's too; one
            // it had no link for goes on with none, as a shared one.)
            let h = link.unwrap_or(Handed {
                slot: w.slot,
                pid: w.pid,
                weight: 1,
                ..Handed::default()
            });
            workers.push(state::Worker {
                slot: w.slot.0,
                pool: w.pool,
                pid: w.pid,
                generation: w.generation,
                uptime_ms: w.started.elapsed().as_millis() as u64,
                pidfd: keep(w.pidfd),
                stdout: stdout.map(&mut keep),
                stderr: stderr.map(&mut keep),
                weight: h.weight,
                channel: h.channel.map(&mut keep),
                peer: h.peer.map(&mut keep),
                peer_address: h.peer_address,
                batch: h.batch,
                sent: h.sent,
                closed: h.closed,
                reported: h.reported,
                messages: h.messages,
            });
        }
        let layout = (0..self.layout.len())
            .map(|s| {
                self.layout
                    .pool(Slot(s))
                    .and_then(|p| self.config.pools.get(p))
                    .map(|p| p.name.clone())
            })
            .collect();
        let state = State {
            version: state::VERSION,
            exe: upgrade::exec::started_as().to_path_buf(),
            upgrades: self.upgrades + 1,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            listeners,
            activated: false,
            control: None,
            metrics: None,
            reaper,
            workers,
            layout,
            configured: self.configured.clone(),
            slots: self
                .slots
                .iter()
                .map(|s| state::Slot {
                    restarts: s.restarts,
                    instance: s.instance.clone(),
                })
                .collect(),
            generation: self.generation,
            node_ids: self.node_ids,
            stats: handover.stats,
            by_listener: handover.by_listener,
            seq: handover.seq,
            notified_ready: self.notified_ready,
        };
        Carry {
            state,
            binary: checked.binary,
            version: checked.version,
            fds,
            reply,
        }
    }

    /// The next image's start: the workers, slots and counts the state
    /// names, adopted as they were (ready, in their slots); fds it names
    /// that are not open are said and their worker left out (its slot
    /// starts a new one).
    pub(super) fn adopt(&mut self, s: &mut State) {
        self.upgrades = s.upgrades;
        self.generation = s.generation;
        self.node_ids = s.node_ids;
        self.notified_ready = s.notified_ready;
        self.any_ready = true;
        if let Some(ms) = Instant::now().checked_sub(Duration::from_millis(s.uptime_ms)) {
            self.started = ms;
        }
        let names: Vec<String> = self.config.pools.iter().map(|p| p.name.clone()).collect();
        self.layout = layout::Layout::from_names(&s.layout, &names);
        for (i, p) in self.config.pools.iter_mut().enumerate() {
            p.count = self.layout.slots_of(i).len();
        }
        self.configured = s.configured.clone();
        self.slots = (0..self.layout.len())
            .map(|i| {
                let carried = s.slots.get(i).cloned().unwrap_or_default();
                SlotState {
                    restarts: carried.restarts,
                    instance: carried.instance,
                    ..SlotState::default()
                }
            })
            .collect();
        if let Some(r) = s.reaper.take() {
            match (sys_fd(r.pidfd), sys_fd(r.pipe)) {
                (Ok(pidfd), Ok(pipe)) => {
                    self.reaper = Some(super::reaper::Reaper::adopt(r.pid, pidfd, pipe))
                }
                _ => warn!("upgrade: the group reaper's fds were not handed over"),
            }
        }
        for w in std::mem::take(&mut s.workers) {
            let pid = w.pid;
            if let Err(e) = self.adopt_worker(w) {
                warn!(
                    "upgrade: worker pid {pid} could not be taken over ({e}): it was stopped, \
                     and its slot starts a new one"
                );
            }
        }
    }

    fn adopt_worker(&mut self, w: state::Worker) -> std::io::Result<()> {
        let pid = w.pid;
        let pidfd = match sys_fd(w.pidfd).or_else(|_| crate::sys::pidfd_open(pid)) {
            Ok(fd) => fd,
            Err(e) => {
                // Still this process's unreaped child: its pid is its own.
                super::kill_group(pid);
                let child = nix::unistd::Pid::from_raw(pid as i32);
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(child, None);
                return Err(e);
            }
        };
        match self.adopt_with(w, pidfd.try_clone()?) {
            Ok(()) => Ok(()),
            Err(e) => {
                // Not supervised, it would serve nobody: gone, and reaped.
                let _ = crate::sys::pidfd_signal(pidfd.as_fd(), libc::SIGKILL);
                super::kill_group(pid);
                let _ = nix::sys::wait::waitid(
                    nix::sys::wait::Id::PIDFd(pidfd.as_fd()),
                    nix::sys::wait::WaitPidFlag::WEXITED,
                );
                Err(e)
            }
        }
    }

    fn adopt_with(&mut self, w: state::Worker, pidfd: OwnedFd) -> std::io::Result<()> {
        let opt = |raw: Option<i32>| raw.map(sys_fd).transpose();
        let (stdout, stderr) = (opt(w.stdout)?, opt(w.stderr)?);
        let (channel, peer) = (opt(w.channel)?, opt(w.peer)?);
        let slot = Slot(w.slot);
        let pool = self
            .config
            .pools
            .iter()
            .find(|p| p.name == w.pool)
            .ok_or_else(|| std::io::Error::other(format!("no pool `{}`", w.pool)))?;
        let (stop_signal, drained_by) = (pool.stop_signal, pool.mode.drained_by());
        self.poll.registry().register(
            &mut SourceFd(&pidfd.as_raw_fd()),
            Token(CHILD_BASE + w.pid as usize),
            Interest::READABLE,
        )?;
        for (fd, stderr) in [(stdout, false), (stderr, true)] {
            if let Some(fd) = fd {
                self.output.add(output::Pipe {
                    slot,
                    pid: w.pid,
                    pool: w.pool.clone(),
                    stderr,
                    fd,
                });
            }
        }
        self.dispatch.send(Command::Adopt(Handed {
            slot,
            pid: w.pid,
            weight: w.weight,
            channel,
            peer,
            peer_address: w.peer_address,
            batch: w.batch,
            sent: w.sent,
            closed: w.closed,
            reported: w.reported,
            messages: w.messages,
        }));
        let started = Instant::now()
            .checked_sub(Duration::from_millis(w.uptime_ms))
            .unwrap_or_else(Instant::now);
        let mut adopted = Worker::new(
            slot,
            w.pool,
            w.pid,
            w.generation,
            pidfd,
            stop_signal,
            drained_by,
        );
        adopted.started = started;
        adopted.ready = true;
        self.workers.push(adopted);
        // (A worker that died while the master re-executed is a zombie:
        // its pidfd is readable at once, and its exit judged as any.)
        Ok(())
    }
}

fn sys_fd(raw: i32) -> std::io::Result<OwnedFd> {
    crate::sys::handed_over(raw)
}
