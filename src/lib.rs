//! `lb`: a pre-forking L4 TCP load balancer.
//!
//! One master accepts TCP connections on one port and hands each accepted
//! socket (the fd itself, by `SCM_RIGHTS`) to one of a pool of worker
//! processes it started and supervises. After the hand-off the master is out
//! of the data path: the worker talks to the client directly.
//!
//! ```text
//! clients ──TCP──▶ [ master: dispatch thread ]  accept4 → pick → sendmsg(fd) → close
//!                  [ master: supervisor       ]  spawn, pidfd exits, restart, drain
//!                         │ one SOCK_SEQPACKET channel per worker, at the worker's fd 3
//!                  worker 0 … worker N-1 (any executable speaking the protocol)
//! ```
//!
//! The modules, by role:
//! - [`config`]: CLI + env + `lb.toml` → one validated [`config::Config`];
//! - [`policy`]: the scheduling strategies behind one small trait;
//! - [`dispatch`]: the hot path (the mio loop on its own thread);
//! - [`proto`]: the master↔worker contracts (lb's own, Node's cluster IPC);
//!   all fd-passing `unsafe`;
//! - [`shim`]: the accept shim (C, `LD_PRELOAD`) for unmodified servers;
//! - [`supervisor`]: worker processes and their lifecycles;
//! - [`control`]: the control socket behind `lb status/stop/send`;
//! - [`master`]: wires the above together;
//! - [`worker`]: the Rust worker-side adapter (depends on `proto` only);
//! - [`sys`]: the remaining libc (accept4, pidfd, child set-up);
//! - [`systemd`]: sd_notify and socket activation;
//! - [`manual`]: shell completions and the man page, from the CLI.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cli;
pub mod config;
pub mod control;
pub mod dispatch;
pub mod listeners;
pub mod log;
pub mod manual;
pub mod master;
pub mod policy;
pub mod proto;
pub mod shim;
pub mod supervisor;
pub mod sys;
pub mod systemd;
pub mod upgrade;
pub mod worker;
