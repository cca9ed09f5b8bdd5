//! What the dispatcher knows of one worker process, and the table of them.

use super::link::Link;
use crate::policy::Slot;

/// A worker process's life as the dispatcher sees it:
/// 1. `Starting`: attached, waiting for READY (is never sent a connection);
///    its slot's previous process, if any, still serves;
/// 2. `Ready`: its slot's current process, taking connections (READY is the
///    switch: the previous process is sent DRAIN);
/// 3. `Draining`: sent DRAIN, said LEAVING, or replaced; takes nothing new;
///    ends with the supervisor's Detach once the process has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Starting,
    Ready,
    Draining,
}

#[derive(Debug)]
pub struct Worker {
    pub slot: Slot,
    pub pid: u32,
    /// The slot's weight for the policy once this process is current.
    pub weight: u32,
    pub state: State,
    /// How the master talks to it (and its channel, if it has one).
    pub link: Link,
    /// The last send hit `EAGAIN`; cleared by the channel's writable edge.
    pub full: bool,
    /// DRAIN could not be sent yet (channel full); sent on writable.
    pub drain_queued: bool,
    pub drain_sent: bool,
    /// Connections sent, and reported closed, over this process's life.
    pub sent: u64,
    pub closed: u64,
    /// It has reported a close: its open connections are known even when
    /// the policy does not ask for reports (`LB_REPORT_CLOSED=0`).
    pub reported: bool,
    /// Whether it takes the connections waiting for it (`stall`).
    pub progress: super::native::stall::Progress,
    /// Kernel dispatch: its own listener's accept queue, as last seen.
    pub queue: super::kernel::pressure::Queue,
    /// It has sent STOP (acted on once).
    pub stop_seen: bool,
    /// CONN messages sent (each one or, to a batching worker, several
    /// connections): what its channel's unread bytes are counted in.
    pub messages: u64,
}

/// Worker processes by index; an index is stable for a process's life and
/// names its mio token. Old and new processes of one slot can coexist
/// (a leaving worker finishing while its replacement runs).
#[derive(Debug, Default)]
pub struct Table {
    entries: Vec<Option<Worker>>,
}

impl Table {
    pub fn with_capacity(n: usize) -> Self {
        Table {
            entries: Vec::with_capacity(n),
        }
    }

    /// Stores `w` in a free entry; returns its index.
    pub fn insert(&mut self, w: Worker) -> usize {
        match self.entries.iter().position(Option::is_none) {
            Some(i) => {
                self.entries[i] = Some(w);
                i
            }
            None => {
                self.entries.push(Some(w));
                self.entries.len() - 1
            }
        }
    }

    pub fn remove(&mut self, index: usize) -> Option<Worker> {
        self.entries.get_mut(index)?.take()
    }

    #[inline]
    pub fn get(&self, index: usize) -> Option<&Worker> {
        self.entries.get(index)?.as_ref()
    }

    #[inline]
    pub fn get_mut(&mut self, index: usize) -> Option<&mut Worker> {
        self.entries.get_mut(index)?.as_mut()
    }

    /// The index of the process `pid` in `slot`.
    pub fn find(&self, slot: Slot, pid: u32) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.as_ref().is_some_and(|w| w.slot == slot && w.pid == pid))
    }

    /// One past the highest index in use (for index loops that mutate).
    pub fn end(&self) -> usize {
        self.entries.len()
    }

    pub fn indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|_| i))
    }
}
