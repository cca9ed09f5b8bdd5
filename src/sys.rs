//! The master's remaining libc calls: `accept4`, `pidfd_open`, the child's
//! set-up between fork and exec, and resource limits. Every `unsafe` block
//! outside fd passing (`proto::scm`) lives here, by topic: `fd` (fds and
//! sockets), `process` (pidfds, `/proc`, signals), `child` (between fork
//! and exec), `bpf` (kernel dispatch's maps and program). Results of libc calls go through `proto::scm`'s
//! `cvt`/`cvt_r`, the crate's one syscall-result helper.

pub mod bpf;
mod child;
mod fd;
mod process;

pub use child::{Become, become_in_child, exec_with_own_pid, keep_fd, place_fds, prepare_child};
pub use fd::{
    accept_queue, accept4, cloexec_from, defer_accept, handed_over, inheritable,
    inherited_listener, keep_private, raise_nofile_limit, stop_listening, unread_bytes,
};
pub use process::{
    ignore_signals, pidfd_open, pidfd_signal, proc_usage, seccomp_filtered, tree_holds_socket,
};
