//! What the dispatcher knows of one worker slot.

use std::os::fd::OwnedFd;

/// A slot's life as the dispatcher sees it:
/// 1. `Empty`: no process;
/// 2. `Starting`: attached, waiting for READY (never sent a connection);
/// 3. `Ready`: takes connections;
/// 4. `Draining`: sent DRAIN or said LEAVING; takes nothing new; ends with
///    the supervisor's Detach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Empty,
    Starting,
    Ready,
    Draining,
}

#[derive(Debug)]
pub struct Worker {
    pub pid: u32,
    pub state: State,
    /// The master's end of the channel.
    pub channel: Option<OwnedFd>,
    /// The master's copy of the worker's end, read only after the worker died.
    pub peer: Option<OwnedFd>,
    /// The last send hit `EAGAIN`; cleared by the channel's writable edge.
    pub full: bool,
    /// DRAIN could not be sent yet (channel full); sent on writable.
    pub drain_queued: bool,
    pub drain_sent: bool,
    /// Connections sent, and reported closed, over this process's life.
    pub sent: u64,
    pub closed: u64,
}

impl Worker {
    pub fn empty() -> Self {
        Worker {
            pid: 0,
            state: State::Empty,
            channel: None,
            peer: None,
            full: false,
            drain_queued: false,
            drain_sent: false,
            sent: 0,
            closed: 0,
        }
    }

    pub fn attached(pid: u32, channel: OwnedFd, peer: OwnedFd) -> Self {
        Worker {
            pid,
            state: State::Starting,
            channel: Some(channel),
            peer: Some(peer),
            ..Worker::empty()
        }
    }
}
