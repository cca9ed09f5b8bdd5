//! Node.js's cluster IPC, as an unmodified Node worker speaks it: JSON
//! lines on an `AF_UNIX` `SOCK_STREAM` channel at fd 3, handles passed with
//! `SCM_RIGHTS` inside a `NODE_HANDLE` envelope, `NODE_CLUSTER` messages
//! matched by `seq`/`ack`. Spec: `docs/node.md`.
//!
//! Pure data, like [`super::wire`]: what a line means ([`parse`]) and the
//! bytes lb writes. The per-connection lines (the worker's handle ACK, its
//! `accepted` reply, the preload's close report) parse without allocating:
//! [`Head`] borrows the line and skips every field it does not name. Only
//! the rare lines (`queryServer`, user messages) are parsed further, by
//! their handlers, off the per-connection path.
//!
//! Two files, one per direction: `inbound` (a worker's lines: framing,
//! [`parse`], the `queryServer` fields) and `outbound` (the lines lb
//! writes: `newconn`, acks, `disconnect`, user messages, replies).

mod inbound;
mod outbound;

pub use inbound::{Bad, Head, Line, Lines, Query, parse};
pub use outbound::{
    Answer, HANDLE_ACK, NewConn, ack, answer, answer_with_server, disconnect, user,
};

/// Longest line accepted from a worker; a longer one is discarded whole
/// and reported, so a worker cannot make the master buffer without bound.
pub const MAX_LINE: usize = 64 * 1024;

/// How often a handle is re-sent after a `NODE_HANDLE_NACK` (Node's own
/// `MAX_HANDLE_RETRANSMISSIONS`).
pub const MAX_RETRANSMISSIONS: u8 = 3;

/// What a Node worker is started with.
pub mod env {
    /// Its presence makes `require('cluster')` the worker side; a unique
    /// number ≥ 1 per process (`cluster.worker.id`).
    pub const UNIQUE_ID: &str = "NODE_UNIQUE_ID";
    /// The channel's fd number (3).
    pub const CHANNEL_FD: &str = "NODE_CHANNEL_FD";
    /// `json`: one `JSON.stringify` + `\n` per message.
    pub const SERIALIZATION: &str = "NODE_CHANNEL_SERIALIZATION_MODE";
    /// Where the close-report preload is required from.
    pub const OPTIONS: &str = "NODE_OPTIONS";
    /// What the preload is to do, comma-separated: `closes` (report them,
    /// for least-connections), `addresses` (give sockets the client's
    /// address from a PROXY header). Unset: `closes`, as before it existed.
    pub const PRELOAD_WANTS: &str = "LB_NODE_PRELOAD";
}

/// The preload (`NODE_OPTIONS=--require`): close reports for
/// least-connections, clients' addresses behind a balancer.
pub const PRELOAD: &str = include_str!("node-preload.js");
