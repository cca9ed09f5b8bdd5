//! The hand-off: accept a batch, pick a worker for each connection, send
//! each worker its share, hold what no worker can take. Per connection:
//! `accept4`, one pick, its share of a `sendmmsg` (or the link's own way of
//! taking one), one `close`; no allocation, lock or log.

use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::conn::Conn;
use super::front::Front;
use super::link::Delivery;
use super::worker::State;
use super::{Dispatcher, Event};
use crate::policy::Slot;
use crate::proto::scm;
use crate::sys;

/// How long to stop accepting after the process ran out of fds or memory,
/// or the kernel refused more fds in flight.
const RESOURCE_RETRY: Duration = Duration::from_millis(10);

impl Dispatcher {
    /// Hands out held connections, then accepts until `EAGAIN` or until no
    /// worker can take more (the kernel backlog then holds the rest).
    pub(super) fn pump(&mut self) {
        while let Some(conn) = self.pending.pop_front() {
            if let Err(conn) = self.hand_off(conn) {
                self.pending.push_front(conn);
                return;
            }
        }
        if self.shutting_down {
            self.send_drains();
            return;
        }
        if self.retry_at.is_some() || self.handing_over() {
            return;
        }
        // Out of `self` for the batch so `hand_off` can borrow `self`
        // mutably (taking a `Vec` moves three words, never allocates).
        // A batch from each listener in turn, so that a flood on one does
        // not keep the others waiting.
        let mut listeners = std::mem::take(&mut self.listeners);
        let mut again = true;
        while again {
            again = false;
            for (i, listener) in listeners.iter_mut().enumerate() {
                // No worker took all of the last batch: the backlogs hold
                // the rest.
                if !self.pending.is_empty() {
                    again = false;
                    break;
                }
                if listener.waiting && self.retry_at.is_none() {
                    again |= self.accept_batch(i, listener);
                }
            }
        }
        self.listeners = listeners;
    }

    /// Accepts up to `SEND_BATCH` connections from listener `index` and
    /// sends them. Whether another batch may follow: the batch was full
    /// and every worker took its share.
    fn accept_batch(&mut self, index: usize, listener: &mut Front) -> bool {
        let mut more = true;
        while self.accepted.len() < scm::SEND_BATCH {
            // Every place for a PROXY header is taken: the backlog
            // holds the rest until one frees.
            if self.headers_full_for(index) {
                more = false;
                break;
            }
            match sys::accept4(listener.fd.as_fd()) {
                Ok(fd) => {
                    if let Some(conn) = self.admit(fd, index) {
                        self.accepted.push(conn);
                    }
                    if self.accept_failures > 0 {
                        let failures = std::mem::take(&mut self.accept_failures);
                        self.emit(Event::AcceptRecovered { failures });
                    }
                }
                Err(e) => {
                    match e.raw_os_error() {
                        Some(libc::EAGAIN) => listener.waiting = false,
                        // The client gave up before we accepted: next one.
                        Some(libc::ECONNABORTED | libc::EPROTO) => continue,
                        // Out of fds or memory (or anything unexpected):
                        // retry shortly instead of spinning.
                        // Said once per episode, not at every retry.
                        errno => {
                            self.retry_at = Some(Instant::now() + RESOURCE_RETRY);
                            self.accept_failures += 1;
                            if self.accept_failures == 1 {
                                self.emit(Event::AcceptError {
                                    errno: errno.unwrap_or(0),
                                });
                            }
                        }
                    }
                    more = false;
                    break;
                }
            }
        }
        if self.accepted.is_empty() {
            return false;
        }
        // Time from the end of the accepts to the last send, recorded
        // once per batch (two clock reads per batch, never a lock or an
        // allocation: the histogram is sized up front and saturates).
        let batch = self.accepted.len() as u64;
        let started = Instant::now();
        self.send_accepted();
        let nanos = started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        self.latency.saturating_record_n(nanos.max(1), batch);
        more && self.pending.is_empty()
    }

    /// Sends the accepted batch: one pick per connection (each counted
    /// active at once, so least-conn sees the batch's own picks), then one
    /// `sendmmsg` per worker, its connections in accept order, each closed
    /// right after the call that carried it. What a full channel refused
    /// goes through `hand_off` again.
    fn send_accepted(&mut self) {
        let mut batch = std::mem::take(&mut self.accepted);
        let n = batch.len();
        let mut slots = [usize::MAX; scm::SEND_BATCH];
        for slot in slots.iter_mut().take(n) {
            match self.policy.pick(&self.views) {
                Some(s) => {
                    *slot = s.0;
                    self.views[s.0].active += 1;
                    // One connection at a time: not picked again this batch.
                    if self.slot_delivery(s.0) == Delivery::Stepwise {
                        self.views[s.0].eligible = false;
                    }
                }
                None => break,
            }
        }
        // Group by worker, keeping accept order within a group (insertion
        // sort: n <= SEND_BATCH, and it moves nothing when already grouped).
        for i in 1..n {
            let mut j = i;
            while j > 0 && slots[j - 1] > slots[j] {
                slots.swap(j - 1, j);
                batch.swap(j - 1, j);
                j -= 1;
            }
        }
        let mut refused = std::mem::take(&mut self.refused);
        let mut start = 0;
        while start < n {
            let slot = slots[start];
            let end = (start..n).find(|&k| slots[k] != slot).unwrap_or(n);
            let len = end - start;
            if slot != usize::MAX && self.slot_delivery(slot) != Delivery::Batch {
                for conn in batch.drain(..len) {
                    if let Err(conn) = self.deliver_picked(slot, conn) {
                        refused.push(conn);
                    }
                }
                start = end;
                continue;
            }
            let sent = if slot == usize::MAX {
                0
            } else {
                self.send_group(slot, &batch[..len])
            };
            // Close what went out (the first `sent`), keep what did not.
            for (k, conn) in batch.drain(..len).enumerate() {
                if k >= sent {
                    refused.push(conn);
                }
            }
            start = end;
        }
        self.accepted = batch;
        for conn in refused.drain(..) {
            if let Err(conn) = self.hand_off(conn) {
                self.stats.paused += u64::from(self.pending.is_empty());
                self.pending.push_back(conn);
            }
        }
        self.refused = refused;
    }

    /// Delivers `fd` to `slot`'s worker one connection at a time (Node,
    /// proxy), already counted active by its pick; undoes that when it
    /// cannot take it.
    fn deliver_picked(&mut self, slot: usize, conn: Conn) -> Result<(), Conn> {
        let sent = match self.current[slot] {
            Some(index) => self.deliver(index, Slot(slot), conn),
            None => Err(conn),
        };
        if sent.is_err() {
            let v = &mut self.views[slot];
            v.active = v.active.saturating_sub(1);
        }
        sent
    }

    /// A send to worker `index` (in `slot`) stopped short: full, too many
    /// fds in flight, or (cannot happen while we hold its peer) broken.
    pub(super) fn channel_refused(&mut self, index: usize, slot: usize, error: Option<io::Error>) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        match error.as_ref().and_then(io::Error::raw_os_error) {
            // Too many fds in flight for this user: no writable edge will
            // tell us when that passes, so retry on a timer.
            Some(libc::ETOOMANYREFS) => self.retry_at = Some(Instant::now() + RESOURCE_RETRY),
            // A short sendmmsg (None) or EAGAIN: full; the writable edge says when not.
            None | Some(libc::EAGAIN) => {}
            Some(_) => w.state = State::Draining,
        }
        w.full = true;
        self.views[slot].eligible = false;
        self.want_writable(index, true);
    }

    /// Sends `conn` to the worker the policy picks, trying others while
    /// channels are full. Gives it back when no worker can take it.
    #[inline]
    pub(super) fn hand_off(&mut self, mut conn: Conn) -> Result<(), Conn> {
        loop {
            let Some(slot) = self.policy.pick(&self.views) else {
                return Err(conn);
            };
            let Some(index) = self.current[slot.0] else {
                // Eligible implies a current process; repair rather than spin.
                self.views[slot.0].eligible = false;
                continue;
            };
            match self.deliver(index, slot, conn) {
                Ok(()) => {
                    self.views[slot.0].active += 1;
                    return Ok(());
                }
                // `deliver` made the slot ineligible: pick again.
                Err(back) => conn = back,
            }
        }
    }

    /// Recomputes whether `slot` may be picked.
    pub(super) fn sync_view(&mut self, slot: Slot) {
        let current = self.current[slot.0].and_then(|i| self.workers.get(i));
        self.views[slot.0].eligible = current.is_some_and(|w| {
            w.state == State::Ready
                && !w.full
                && !w.progress.stalled
                && w.link.can_take(self.relay_room())
        });
    }

    /// How `slot`'s current process takes connections (a slot between
    /// processes is sent nothing: `send_group` finds it gone).
    #[inline]
    fn slot_delivery(&self, slot: usize) -> Delivery {
        self.current[slot]
            .and_then(|i| self.workers.get(i))
            .map_or(Delivery::Batch, |w| w.link.delivery())
    }
}
