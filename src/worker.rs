//! The Rust worker-side adapter: turns the channel lb leaves at fd 3 into a
//! listener of `std::net::TcpStream`s, sends READY, reports closes, and
//! handles DRAIN.
//!
//! Two levels: [`Listener::accept`]/[`Listener::incoming`] for blocking
//! servers (each [`Conn`] reports its own close when dropped), and
//! [`Listener::next`] plus `mio::event::Source` for event loops, which
//! report closes themselves with [`Listener::report_closed`] (after
//! deregistering the stream from their poller: `docs/protocol.md` §3).
//!
//! Draining so that keep-alive clients do not notice (`docs/protocol.md`
//! §4): once DRAIN has arrived ([`Listener::draining`], [`Conn::draining`]),
//! answer each further request with `Connection: close`, close a
//! connection once its response is written ([`Conn::close_gracefully`]),
//! and close one that stays idle for [`Listener::idle_grace`] (a blocking
//! server waits between requests with [`Conn::wait_for_request`]).
//!
//! Under kernel dispatch (`LB_OWN_LISTENER=1`, `docs/kernel-dispatch.md`)
//! the same API accepts from the listener of its own that the master sends
//! first: [`Listener::from_env`] takes it, READY says so, both levels
//! accept from it (the mio `Source` watches it and the channel, under one
//! token), accepts are reported in batches (ACCEPTED, always before the
//! CLOSED that follows them) when the master reads reports, and DRAIN
//! stops the listener at once so that what is queued in it moves to the
//! other workers. An app needs no change.
//!
//! Behind a balancer that sends PROXY protocol headers, the master reads
//! the client's address from the header and sends it with the connection
//! (`docs/protocol.md` §2); READY says the adapter takes it. A blocking
//! server asks [`Conn::client_addr`] (the header's address, else the
//! socket's peer), an event loop [`Listener::last_client_addr`] right
//! after [`Listener::next`] gave it a connection.
//!
//! Depends on [`crate::proto`] only.
//!
//! By concern: `listener` (the channel: READY, DRAIN, taking connections),
//! `conn` (a connection that reports its own close), `peer` (the client's
//! address a CONN carries), [`hello`] (the bundled worker built on both).

mod conn;
pub mod hello;
mod listener;
mod peer;

use std::io;
use std::net::TcpStream;
use std::os::fd::RawFd;

use crate::proto::VERSION;

pub use conn::{Conn, Reporter};
pub use listener::Listener;

/// Why this process cannot act as a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{0} is not set: this program must be started by lb (lb -- <this command>)")]
    NotAWorker(&'static str),
    #[error("{var}={value} is not valid")]
    BadEnv { var: &'static str, value: String },
    #[error("lb speaks protocol {0}, this worker speaks {VERSION}: use matching versions")]
    Protocol(String),
    #[error("inherited channel fd {fd} is unusable: {source}")]
    Channel { fd: RawFd, source: io::Error },
    #[error("LB_OWN_LISTENER=1 but lb sent no listener: {0}")]
    NoListener(String),
}

/// What the master sent.
#[derive(Debug)]
pub enum Incoming {
    /// A connection, non-blocking (the master accepted it so; under kernel
    /// dispatch the adapter accepts it so from the own listener).
    Conn(TcpStream),
    /// Stop accepting; finish what you have and exit.
    Drain,
    /// A user message.
    Message(Vec<u8>),
    /// The master is gone: exit.
    Closed,
}

/// Open files a worker keeps free: it stops taking connections from the
/// channel before it has fewer left (so the master, finding the channel
/// full, sends them to others), instead of receiving ones whose fds the
/// kernel cannot give it (it closes those: the client is lost).
pub const FD_RESERVE: u64 = 16;

/// How many files this process may have open (its soft `RLIMIT_NOFILE`;
/// lb's workers inherit the master's, raised to its hard limit).
pub fn open_files_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(u64::MAX, |(soft, _)| soft)
}

/// How many files this process has open now (from `/proc/self/fd`).
pub fn open_files() -> u64 {
    // The directory's own fd is among those listed.
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1) as u64)
}
