//! The shared link: the worker accepts from lb's listener itself (fd 3,
//! `LISTEN_FDS`), so it has no channel and is sent nothing. lb still tracks
//! it for the supervisor: it is ready as soon as it runs
//! (`Dispatcher::attached`),
//! and drained by its stop signal, which the supervisor sends. Under kernel
//! dispatch each has a listener of its own, and `steer` keeps the kernel's
//! program pointed at the ready ones.

use std::os::fd::AsFd;

use super::link::Link;
use super::worker::State;
use super::{Dispatcher, Event};

impl Dispatcher {
    /// Nothing to send: says Draining, and the supervisor signals it.
    pub(super) fn shared_drain(&mut self, index: usize) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        w.drain_sent = true;
        let (slot, pid) = (w.slot, w.pid);
        self.steer();
        self.emit(Event::Draining { slot, pid });
    }

    /// Kernel dispatch: points the program at each slot's ready worker's
    /// listener (a draining or gone one is out). Lifecycle events only.
    pub(super) fn steer(&mut self) {
        let Some(steering) = self.steering.as_mut() else {
            return;
        };
        let mut ready = Vec::with_capacity(self.current.len());
        for (slot, index) in self.current.iter().enumerate() {
            if let Some(w) = index.and_then(|i| self.workers.get(i))
                && w.state == State::Ready
                && let Link::Shared {
                    listener: Some(listener),
                } = &w.link
            {
                ready.push((slot, listener.as_fd(), w.weight));
            }
        }
        match steering.steer(&ready) {
            Ok(()) => steering.failing = false,
            Err(e) if !std::mem::replace(&mut steering.failing, true) => {
                self.emit(Event::SteeringFailed {
                    error: e.to_string(),
                });
            }
            Err(_) => {}
        }
    }
}
