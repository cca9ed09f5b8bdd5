//! The shared link: the worker accepts from lb's listener itself (fd 3,
//! `LISTEN_FDS`), so it has no channel and is sent nothing. lb still tracks
//! it for the supervisor: it is ready as soon as it runs
//! (`Dispatcher::attached`),
//! and drained by its stop signal, which the supervisor sends. Under kernel
//! dispatch each has a listener of its own (`dispatch::kernel`).

use super::{Dispatcher, Event};

impl Dispatcher {
    /// Nothing to send: says Draining, and the supervisor signals it.
    pub(super) fn shared_drain(&mut self, index: usize) {
        let Some(w) = self.workers.get_mut(index) else {
            return;
        };
        w.drain_sent = true;
        let (slot, pid) = (w.slot, w.pid);
        self.emit(Event::Draining { slot, pid });
    }
}
