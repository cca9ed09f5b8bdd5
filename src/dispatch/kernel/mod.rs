//! Kernel dispatch (`--dispatch kernel`): no process on the accept path.
//! Each shared-mode worker gets a listener of its own, all in one
//! `SO_REUSEPORT` group on lb's port with lb's own listener (the anchor,
//! which keeps the group and its program while workers come and go, and
//! never takes a connection). An `SK_REUSEPORT` program (`program.rs`)
//! picks each new connection's listener from a schedule the dispatcher
//! writes whenever the ready workers change: round-robin is the ready
//! slots in order, weighted round-robin their smooth weighted sequence.
//! A listener that closes (its worker exited and the master let go of its
//! copy) has its queued connections moved to the others by the same
//! program (`SELECT_OR_MIGRATE`): none is reset. Only lifecycle events
//! update the maps; per connection, lb does nothing at all.

pub mod program;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use crate::policy::{PolicyKind, WorkerView};
use crate::sys::bpf;

/// Entries of the schedule after its length: weighted round-robin's
/// sequence is scaled down to fit.
pub const SCHEDULE_MAX: usize = 4096;

/// The program, its maps, and what the schedule was last set to.
#[derive(Debug)]
pub struct Steering {
    schedule: OwnedFd,
    sockets: OwnedFd,
    program: OwnedFd,
    policy: PolicyKind,
    /// The last update failed (said once, until one works again).
    pub failing: bool,
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
        if policy == PolicyKind::LeastConn {
            return Err(io::Error::other(
                "least-conn needs close reports, which shared-mode workers do not send",
            ));
        }
        let counter = bpf::map_create(bpf::MAP_ARRAY, 8, 1)?;
        let schedule = bpf::map_create(bpf::MAP_ARRAY, 4, 1 + SCHEDULE_MAX as u32)?;
        let sockets = bpf::map_create(bpf::MAP_REUSEPORT_SOCKARRAY, 8, slots.max(1) as u32)?;
        let insns = program::build(program::Maps {
            counter: counter.as_raw_fd(),
            schedule: schedule.as_raw_fd(),
            sockets: sockets.as_raw_fd(),
        });
        // (The program holds its own reference to the counter: lb never
        // reads or resets it.)
        let program = bpf::load_reuseport_program(&insns)?;
        drop(counter);
        Ok(Steering {
            schedule,
            sockets,
            program,
            policy,
            placed: vec![None; slots],
            failing: false,
        })
    }

    /// Attaches the program to the group `anchor` (lb's own listener) is in.
    pub fn attach(&self, anchor: BorrowedFd<'_>) -> io::Result<()> {
        bpf::attach_reuseport_program(anchor, self.program.as_fd())
    }

    /// Points the program at `listeners` (each ready slot's, with its
    /// weight), in the policy's order. New sockets are placed before the
    /// schedule names them, and old ones removed only after it no longer
    /// does, so a pick never finds an empty slot.
    pub fn steer(&mut self, listeners: &[(usize, BorrowedFd<'_>, u32)]) -> io::Result<()> {
        let max = listeners.iter().map(|l| l.0 + 1).max().unwrap_or(0);
        if max > self.placed.len() {
            return Err(io::Error::other("a slot beyond the sockarray"));
        }
        for (slot, fd, _) in listeners {
            let inode = nix::sys::stat::fstat(fd)?.st_ino;
            if self.placed[*slot] != Some(inode) {
                let raw = fd.as_raw_fd() as u64;
                bpf::map_set(self.sockets.as_fd(), *slot as u32, &raw.to_ne_bytes())?;
                self.placed[*slot] = Some(inode);
            }
        }
        let views: Vec<WorkerView> = (0..self.placed.len())
            .map(|s| match listeners.iter().find(|l| l.0 == s) {
                Some(&(_, _, weight)) => WorkerView {
                    eligible: true,
                    weight,
                    active: 0,
                },
                None => WorkerView::default(),
            })
            .collect();
        let order = schedule(self.policy, &views);
        for (k, slot) in order.iter().enumerate() {
            bpf::map_set(self.schedule.as_fd(), 1 + k as u32, &slot.to_ne_bytes())?;
        }
        bpf::map_set(
            self.schedule.as_fd(),
            0,
            &(order.len() as u32).to_ne_bytes(),
        )?;
        for slot in 0..self.placed.len() {
            if self.placed[slot].is_some() && !listeners.iter().any(|l| l.0 == slot) {
                bpf::map_delete(self.sockets.as_fd(), slot as u32)?;
                self.placed[slot] = None;
            }
        }
        Ok(())
    }
}

impl super::Dispatcher {
    /// Points the program at each slot's ready worker's own listener (a
    /// draining or gone one is out). Lifecycle events only.
    pub(super) fn steer(&mut self) {
        let Some(steering) = self.steering.as_mut() else {
            return;
        };
        let mut ready = Vec::with_capacity(self.current.len());
        for (slot, index) in self.current.iter().enumerate() {
            if let Some(w) = index.and_then(|i| self.workers.get(i))
                && w.state == super::worker::State::Ready
                && let Some(listener) = w.link.own_listener()
            {
                ready.push((slot, listener.as_fd(), w.weight));
            }
        }
        match steering.steer(&ready) {
            Ok(()) => steering.failing = false,
            Err(e) if !std::mem::replace(&mut steering.failing, true) => {
                self.emit(super::Event::SteeringFailed {
                    error: e.to_string(),
                });
            }
            Err(_) => {}
        }
    }
}

/// The order the program walks the eligible slots in: round-robin, each
/// once; weighted, nginx's smooth weighted round-robin over one period
/// (the weights' sum, scaled to fit `SCHEDULE_MAX`).
pub fn schedule(policy: PolicyKind, views: &[WorkerView]) -> Vec<u32> {
    let eligible: Vec<(u32, u64)> = views
        .iter()
        .enumerate()
        .filter(|(_, v)| v.eligible)
        .map(|(s, v)| (s as u32, u64::from(v.weight.max(1))))
        .collect();
    if policy != PolicyKind::Weighted {
        return eligible.iter().map(|&(s, _)| s).collect();
    }
    let divisor = eligible.iter().fold(0, |g, &(_, w)| gcd(g, w)).max(1);
    let mut weights: Vec<u64> = eligible.iter().map(|&(_, w)| w / divisor).collect();
    let sum: u64 = weights.iter().sum();
    if sum > SCHEDULE_MAX as u64 {
        for w in &mut weights {
            *w = (*w * SCHEDULE_MAX as u64 / sum).max(1);
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
        let v = views(&[Some(10_000), Some(1), Some(9_999)]);
        let s = schedule(PolicyKind::Weighted, &v);
        assert!(s.len() <= SCHEDULE_MAX);
        for slot in [0, 1, 2] {
            assert!(s.contains(&slot), "slot {slot} dropped");
        }
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
        let all: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(s, l)| (s, l.as_fd(), 1))
            .collect();
        steering.steer(&all).unwrap();
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
        steering.steer(&all[..1]).unwrap();
        let queued: Vec<TcpStream> = (0..50).map(|_| TcpStream::connect(addr).unwrap()).collect();
        steering.steer(&all[1..]).unwrap();
        let mut listeners = listeners;
        drop(listeners.remove(0));
        let moved: usize = listeners.iter().map(taken).sum();
        assert_eq!(moved, 50, "queued connections moved, not reset");
        drop(queued);
    }
}
