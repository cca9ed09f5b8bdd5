//! Kernel dispatch (`--dispatch kernel`): no process on the accept path.
//! Each shared-mode worker gets a listener of its own, all in one
//! `SO_REUSEPORT` group on lb's port with lb's own listener (the anchor,
//! which keeps the group and its program while workers come and go, and
//! never takes a connection). An `SK_REUSEPORT` program (`program.rs`)
//! picks each new connection's listener from a schedule the dispatcher
//! writes whenever the ready workers change: round-robin is the ready
//! slots in order, weighted round-robin their smooth weighted sequence.
//! Least-connections writes the picks lb's own least-connections would
//! make for the next connections, from each worker's open connections
//! (its ACCEPTED and CLOSED reports, plus what waits in its accept queue),
//! refreshed [`LC_REFRESH`] after reports change them and every
//! [`QUEUE_PERIOD`] otherwise.
//! A listener that closes (its worker exited and the master let go of its
//! copy) has its queued connections moved to the others by the same
//! program (`SELECT_OR_MIGRATE`): none is reset. Only lifecycle events
//! and those refreshes update the maps; per connection, lb does nothing.

pub mod pressure;
pub mod program;
mod reports;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::policy::{LeastConn, Policy, PolicyKind, WorkerView};
use crate::sys::bpf;

/// Entries of the schedule after its length: weighted round-robin's
/// sequence is scaled down to fit.
pub const SCHEDULE_MAX: usize = 4096;

/// Least-connections: how soon after a report changed the counts the
/// schedule follows (at most this stale, plus the worker's own batching).
pub const LC_REFRESH: Duration = Duration::from_millis(1);
/// How often the schedule is recomputed when nothing else changes it: the
/// workers' queues (`pressure`) and, for least-connections, their loads (a
/// worker that stopped accepting says nothing, but its queue grows).
pub const QUEUE_PERIOD: Duration = Duration::from_millis(20);

/// One ready worker, as the program is to see it.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub slot: usize,
    pub listener: BorrowedFd<'a>,
    pub weight: u32,
    /// Open connections (least-connections only).
    pub active: u64,
}

/// The program, its maps, and what the schedule was last set to.
#[derive(Debug)]
pub struct Steering {
    schedule: Array,
    /// The pick counter, which a new schedule sets back to 0 so that its
    /// first entry is the next pick (least-connections puts the least
    /// loaded worker there).
    counter: Array,
    sockets: OwnedFd,
    program: OwnedFd,
    policy: PolicyKind,
    /// The last update failed (said once, until one works again).
    pub failing: bool,
    /// Least-connections: the counts changed since the last schedule.
    pub dirty: bool,
    /// When the schedule was last computed.
    pub steered_at: Instant,
    /// The schedule last written, so an unchanged one is not written again,
    /// and the next one (both kept: a least-connections refresh allocates
    /// nothing).
    written: Vec<u32>,
    next: Vec<u32>,
    views: Vec<WorkerView>,
    /// Round-robin and weighted: the workers the written schedule is for.
    scheduled_for: Vec<WorkerView>,
    /// Least-connections: connections the workers reported accepting since
    /// the last schedule, the guess at how many the next one must cover.
    pub arrivals: u64,
    /// Least-connections' tie-breaking, kept across schedules.
    lc: LeastConn,
    /// Per slot: the inode of the socket in the sockarray, if any (a
    /// socket can be placed once: placing it again is `EBUSY`).
    placed: Vec<Option<u64>>,
}

impl Steering {
    /// The maps (for every slot a master may ever run: scaling and
    /// reloads add slots, and the program is never rebuilt) and the program
    /// over them. Fails without `CAP_BPF` and `CAP_NET_ADMIN` (or root), or
    /// on a kernel without `SK_REUSEPORT` programs.
    pub fn new(policy: PolicyKind) -> io::Result<Steering> {
        let slots = crate::config::defaults::MAX_WORKERS;
        let counter = Array::new(8, 1)?;
        let schedule = Array::new(4, 1 + SCHEDULE_MAX as u32)?;
        let sockets = bpf::map_create(bpf::MAP_REUSEPORT_SOCKARRAY, 8, slots.max(1) as u32)?;
        let insns = program::build(program::Maps {
            counter: counter.fd.as_raw_fd(),
            schedule: schedule.fd.as_raw_fd(),
            sockets: sockets.as_raw_fd(),
        });
        let program = bpf::load_reuseport_program(&insns)?;
        Ok(Steering {
            schedule,
            counter,
            sockets,
            program,
            policy,
            placed: vec![None; slots],
            failing: false,
            dirty: false,
            steered_at: Instant::now(),
            written: Vec::with_capacity(SCHEDULE_MAX),
            next: Vec::with_capacity(SCHEDULE_MAX),
            views: Vec::with_capacity(slots),
            scheduled_for: Vec::with_capacity(slots),
            arrivals: 0,
            lc: LeastConn::default(),
        })
    }

    /// Attaches the program to the group `anchor` (lb's own listener) is in.
    pub fn attach(&self, anchor: BorrowedFd<'_>) -> io::Result<()> {
        bpf::attach_reuseport_program(anchor, self.program.as_fd())
    }

    /// Points the program at `targets` (each ready slot's listener), in
    /// the policy's order. New sockets are placed before the schedule names
    /// them, and old ones removed only after it no longer does, so a pick
    /// never finds an empty slot.
    pub fn steer<'a>(
        &mut self,
        targets: impl Iterator<Item = Target<'a>> + Clone,
    ) -> io::Result<()> {
        self.schedule_for(targets.clone(), true)
    }

    /// Least-connections' refresh: the same workers as the last `steer`,
    /// with new loads: only the schedule is written.
    pub fn refresh<'a>(
        &mut self,
        targets: impl Iterator<Item = Target<'a>> + Clone,
    ) -> io::Result<()> {
        self.schedule_for(targets, false)
    }

    fn schedule_for<'a>(
        &mut self,
        targets: impl Iterator<Item = Target<'a>> + Clone,
        place: bool,
    ) -> io::Result<()> {
        self.dirty = false;
        self.steered_at = Instant::now();
        let max = targets.clone().map(|t| t.slot + 1).max().unwrap_or(0);
        if max > self.placed.len() {
            return Err(io::Error::other("a slot beyond the sockarray"));
        }
        // A worker whose socket cannot be placed is left out of this
        // schedule (said by the error), not the others with it; a refresh
        // names only what is placed.
        let mut failed = None;
        self.views.clear();
        self.views.resize(max, WorkerView::default());
        for t in targets.clone() {
            if place {
                if let Err(e) = self.place(&t) {
                    failed.get_or_insert(e);
                    continue;
                }
            } else if self.placed[t.slot].is_none() {
                continue;
            }
            self.views[t.slot] = WorkerView {
                eligible: true,
                weight: t.weight,
                active: u32::try_from(t.active).unwrap_or(u32::MAX),
            };
        }
        match self.policy {
            PolicyKind::LeastConn => {
                let picks = std::mem::take(&mut self.arrivals);
                least_conn(&mut self.lc, &mut self.views, picks, &mut self.next);
            }
            // Round-robin and weighted depend on who is eligible and their
            // weights only: the periodic look at the queues (which
            // allocates nothing) changes the schedule only when those do.
            _ if same_workers(&self.views, &self.scheduled_for) => {
                self.next.clone_from(&self.written);
            }
            policy => {
                self.next = schedule(policy, &self.views);
                self.scheduled_for.clone_from(&self.views);
            }
        }
        // (Never beyond the map, whatever the policy made.)
        self.next.truncate(SCHEDULE_MAX);
        if self.next != self.written {
            // The entries first, then the length that makes them visible.
            for (k, slot) in self.next.iter().enumerate() {
                self.schedule.set(1 + k, u64::from(*slot))?;
            }
            self.schedule.set(0, self.next.len() as u64)?;
            std::mem::swap(&mut self.next, &mut self.written);
        }
        // Least-connections' schedule starts with its first pick.
        if self.policy == PolicyKind::LeastConn {
            self.counter.set(0, 0)?;
        }
        if place {
            for slot in 0..self.placed.len() {
                if self.placed[slot].is_some() && !targets.clone().any(|t| t.slot == slot) {
                    match bpf::map_delete(self.sockets.as_fd(), slot as u32) {
                        Ok(()) => self.placed[slot] = None,
                        Err(e) => {
                            failed.get_or_insert(e);
                        }
                    }
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Puts `t`'s socket in its slot of the sockarray (once: placing the
    /// same socket again is `EBUSY`).
    fn place(&mut self, t: &Target<'_>) -> io::Result<()> {
        let inode = nix::sys::stat::fstat(t.listener)?.st_ino;
        if self.placed[t.slot] != Some(inode) {
            let raw = t.listener.as_raw_fd() as u64;
            bpf::map_set(self.sockets.as_fd(), t.slot as u32, &raw.to_ne_bytes())?;
            self.placed[t.slot] = Some(inode);
        }
        Ok(())
    }
}

/// An array map, written through memory where the kernel allows it (no
/// system call per entry), by `bpf(2)` otherwise.
#[derive(Debug)]
struct Array {
    fd: OwnedFd,
    mapped: Option<bpf::Mapped>,
    value_size: u32,
}

impl Array {
    fn new(value_size: u32, entries: u32) -> io::Result<Array> {
        let (fd, mapped) = match bpf::mapped_array(value_size, entries) {
            Ok((fd, m)) => (fd, Some(m)),
            Err(_) => (bpf::map_create(bpf::MAP_ARRAY, value_size, entries)?, None),
        };
        Ok(Array {
            fd,
            mapped,
            value_size,
        })
    }

    fn set(&self, index: usize, value: u64) -> io::Result<()> {
        match (&self.mapped, self.value_size) {
            (Some(m), 4) => m.store_u32(index, value as u32)?,
            (Some(m), _) => m.store_u64(index, value)?,
            (None, 4) => {
                bpf::map_set(self.fd.as_fd(), index as u32, &(value as u32).to_ne_bytes())?
            }
            (None, _) => bpf::map_set(self.fd.as_fd(), index as u32, &value.to_ne_bytes())?,
        }
        Ok(())
    }
}

impl super::Dispatcher {
    /// Points the program at each slot's ready worker's own listener (a
    /// draining or gone one is out). Lifecycle events.
    pub(super) fn steer(&mut self) {
        self.steer_with(true);
    }

    pub(super) fn steer_with(&mut self, lifecycle: bool) {
        if self.steering.is_none() {
            return;
        }
        self.sample_queues();
        // A stalled worker leaves the sockarray too, before it is stopped.
        let lifecycle = lifecycle || self.stalls_pending();
        // (Queues were sampled just now.) Stopping: nobody.
        let any_room = self.queues_with_room();
        let stopping = self.stop_queues_by.is_some();
        let Some(steering) = self.steering.as_mut() else {
            return;
        };
        let lc = steering.policy == PolicyKind::LeastConn;
        let workers = &self.workers;
        let ready = self
            .current
            .iter()
            .enumerate()
            .filter_map(move |(slot, index)| {
                if stopping {
                    return None;
                }
                let w = workers.get((*index)?)?;
                let listener = w.link.own_listener()?;
                // A worker whose queue is full gets nothing new while another
                // has room: the kernel's back-pressure, as a full channel is
                // under master dispatch.
                if w.state != super::worker::State::Ready
                    || w.progress.stalled
                    || (w.queue.full && any_room)
                {
                    return None;
                }
                // What it holds, and what waits for it: a worker that stopped
                // accepting looks ever busier.
                let active = if lc {
                    super::link::Link::active(w, true).unwrap_or(0) + u64::from(w.queue.queued)
                } else {
                    0
                };
                Some(Target {
                    slot,
                    listener: listener.as_fd(),
                    weight: w.weight,
                    active,
                })
            });
        let result = if lifecycle {
            steering.steer(ready)
        } else {
            steering.refresh(ready)
        };
        match result {
            Ok(()) => steering.failing = false,
            Err(e) if !std::mem::replace(&mut steering.failing, true) => {
                self.emit(super::Event::SteeringFailed {
                    error: e.to_string(),
                });
            }
            Err(_) => {}
        }
        self.stop_stalled();
        self.release_orphans();
    }
}

/// Whether `a` and `b` name the same eligible slots with the same weights.
fn same_workers(a: &[WorkerView], b: &[WorkerView]) -> bool {
    let eligible =
        |v: &[WorkerView], i: usize| v.get(i).filter(|w| w.eligible).map(|w| w.weight.max(1));
    (0..a.len().max(b.len())).all(|i| eligible(a, i) == eligible(b, i))
}

/// The order the program walks the eligible slots in: round-robin, each
/// once; weighted, nginx's smooth weighted round-robin over one period
/// (the weights' sum, scaled to fit `SCHEDULE_MAX`). (Least-connections
/// is [`least_conn`].)
pub fn schedule(policy: PolicyKind, views: &[WorkerView]) -> Vec<u32> {
    let eligible = views
        .iter()
        .enumerate()
        .filter(|(_, v)| v.eligible)
        .map(|(s, v)| (s as u32, u64::from(v.weight.max(1))));
    match policy {
        PolicyKind::Weighted => smooth(&eligible.collect::<Vec<_>>()),
        _ => eligible.map(|(s, _)| s).collect(),
    }
}

/// Least-connections' schedule: the picks `lc` (lb's own policy) makes for
/// the next `picks` connections (as many as came since the last schedule,
/// at least one, and few enough to compute quickly) if none closed
/// meanwhile. Few connections a refresh: the least loaded worker only;
/// many: they fill the least loaded up first, then go round. (When more
/// come than it covers before the next refresh, the program starts it
/// over.)
pub fn least_conn(lc: &mut LeastConn, views: &mut [WorkerView], picks: u64, out: &mut Vec<u32>) {
    let eligible = views.iter().filter(|v| v.eligible).count().max(1);
    let most = (SCHEDULE_MAX / 4).min(65_536 / eligible).max(1);
    // Twice what came last time, and a few rounds at least: a burst
    // (keep-alive clients connecting at once) goes round, not to one.
    let picks = usize::try_from(picks.saturating_mul(2))
        .unwrap_or(usize::MAX)
        .max(4 * eligible)
        .clamp(1, most);
    out.clear();
    while out.len() < picks
        && let Some(slot) = lc.pick(views)
    {
        views[slot.0].active = views[slot.0].active.saturating_add(1);
        out.push(slot.0 as u32);
    }
}

/// nginx's smooth weighted round-robin over one period of `weighted`
/// (slot, weight): the weights' sum, after their common factor, scaled
/// down to fit `SCHEDULE_MAX` with every slot kept.
fn smooth(weighted: &[(u32, u64)]) -> Vec<u32> {
    let eligible = weighted;
    let divisor = eligible.iter().fold(0, |g, &(_, w)| gcd(g, w)).max(1);
    let mut weights: Vec<u64> = eligible.iter().map(|&(_, w)| w / divisor).collect();
    let sum: u64 = weights.iter().sum();
    if sum > SCHEDULE_MAX as u64 {
        // Every slot keeps one entry, the rest shared in proportion: at
        // most `SCHEDULE_MAX` in all (rounding each up could exceed it).
        let budget = (SCHEDULE_MAX - weights.len().min(SCHEDULE_MAX)) as u64;
        for w in &mut weights {
            *w = 1 + *w * budget / sum;
        }
    }
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (k, w) in weights.iter().enumerate() {
            current[k] += *w as i64;
            if current[k] > current[best] {
                best = k;
            }
        }
        current[best] -= total;
        out.push(eligible[best].0);
    }
    out
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A listener for one slot on `addr`, in lb's reuseport group: CLOEXEC,
/// `SO_REUSEPORT` (and `SO_REUSEADDR`, as lb's own), bound and listening.
pub fn slot_listener(addr: std::net::SocketAddr, backlog: u32) -> io::Result<OwnedFd> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn views(weights: &[Option<u32>]) -> Vec<WorkerView> {
        weights
            .iter()
            .map(|w| match w {
                Some(weight) => WorkerView {
                    eligible: true,
                    weight: *weight,
                    active: 0,
                },
                None => WorkerView::default(),
            })
            .collect()
    }

    #[test]
    fn round_robin_is_the_ready_slots_in_order() {
        let v = views(&[Some(1), None, Some(5), Some(1)]);
        assert_eq!(schedule(PolicyKind::RoundRobin, &v), [0, 2, 3]);
        assert!(schedule(PolicyKind::RoundRobin, &views(&[None, None])).is_empty());
    }

    #[test]
    fn weighted_is_smooth_and_in_proportion() {
        let v = views(&[Some(5), Some(1), Some(1)]);
        // nginx's own example: a a b a c a a.
        assert_eq!(schedule(PolicyKind::Weighted, &v), [0, 0, 1, 0, 2, 0, 0]);
        // Common factors are taken out: 200:600 is 1:3.
        let v = views(&[Some(200), Some(600)]);
        assert_eq!(schedule(PolicyKind::Weighted, &v), [1, 0, 1, 1]);
        // Weights beyond the map are scaled, every slot kept.
        for weights in [
            &[Some(10_000), Some(1), Some(9_999)][..],
            // A canary: rounding each small share up once overflowed.
            &[Some(10_000), Some(1), Some(1)],
            &[Some(9_000), Some(1), Some(1)],
            &[Some(u32::MAX), Some(u32::MAX - 1), Some(1)],
        ] {
            let s = schedule(PolicyKind::Weighted, &views(weights));
            assert!(s.len() <= SCHEDULE_MAX, "{weights:?}: {}", s.len());
            for slot in 0..weights.len() as u32 {
                assert!(s.contains(&slot), "{weights:?}: slot {slot} dropped");
            }
        }
    }

    #[test]
    fn least_conn_fills_the_least_loaded_first_then_goes_round() {
        let mut lc = LeastConn::default();
        let mut run = |v: &mut Vec<WorkerView>, picks| {
            let mut out = Vec::new();
            least_conn(&mut lc, v, picks, &mut out);
            out
        };
        let mut v = views(&[Some(1), Some(1), None]);
        v[0].active = 3;
        // Twice what came, and four rounds at least: the least loaded
        // worker is filled up first, then they go round.
        assert_eq!(run(&mut v.clone(), 1), [1, 1, 1, 0, 1, 0, 1, 0]);
        assert_eq!(run(&mut v.clone(), 0).len(), 8, "a few rounds at least");
        assert_eq!(run(&mut v, 5)[..4], [1, 1, 1, 0]);
        // Nobody ready: nothing to pick.
        assert!(run(&mut views(&[None, None]), 4).is_empty());
        // Weights: twice the weight, twice the share once loads are equal.
        let mut v = views(&[Some(2), Some(1)]);
        let mut out = Vec::new();
        least_conn(&mut LeastConn::default(), &mut v, 3, &mut out);
        assert_eq!(out, [0, 1, 0, 1, 0, 0, 1, 0]);
    }

    /// The program in the kernel: 300 connections over three listeners are
    /// split exactly; a listener taken out of the schedule and closed with
    /// connections queued hands them to the others, none reset.
    #[test]
    fn the_kernel_splits_by_the_schedule_and_migrates_a_closed_listener() {
        let mut steering = match Steering::new(PolicyKind::RoundRobin) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("skipped: BPF unavailable here ({e})");
                return;
            }
        };
        let anchor = slot_listener("127.0.0.1:0".parse().unwrap(), 1024).unwrap();
        let addr = TcpListener::from(anchor.try_clone().unwrap())
            .local_addr()
            .unwrap();
        steering.attach(anchor.as_fd()).unwrap();
        let listeners: Vec<TcpListener> = (0..3)
            .map(|_| TcpListener::from(slot_listener(addr, 1024).unwrap()))
            .collect();
        let all: Vec<Target<'_>> = listeners
            .iter()
            .enumerate()
            .map(|(slot, l)| Target {
                slot,
                listener: l.as_fd(),
                weight: 1,
                active: 0,
            })
            .collect();
        steering.steer(all.iter().copied()).unwrap();
        let clients: Vec<TcpStream> = (0..300)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let taken = |l: &TcpListener| {
            l.set_nonblocking(true).unwrap();
            std::iter::from_fn(|| l.accept().ok()).count()
        };
        assert_eq!(
            listeners.iter().map(taken).collect::<Vec<_>>(),
            [100, 100, 100]
        );
        drop(clients);

        // Slot 0 alone takes 50; then it leaves the schedule and closes.
        steering.steer(all[..1].iter().copied()).unwrap();
        let queued: Vec<TcpStream> = (0..50).map(|_| TcpStream::connect(addr).unwrap()).collect();
        steering.steer(all[1..].iter().copied()).unwrap();
        let mut listeners = listeners;
        drop(listeners.remove(0));
        let moved: usize = listeners.iter().map(taken).sum();
        assert_eq!(moved, 50, "queued connections moved, not reset");
        drop(queued);
    }
}
