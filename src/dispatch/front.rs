//! lb's listeners as the loop holds them: TCP or Unix, each accepted from
//! in turn (their counts are `Dispatcher::by_listener`, which outlive
//! them). The PROXY rules of each are the header stage's
//! (`header::Stage`), by the same index.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

#[derive(Debug)]
pub struct Front {
    /// Listening, non-blocking, in the poll as `Source::Listener(index)`.
    pub fd: OwnedFd,
    /// It may hold connections: set by its readiness, cleared by `EAGAIN`.
    pub waiting: bool,
    /// A Unix socket's file that lb made: removed first when stopping, so
    /// that a client arriving then is refused (`ENOENT`) rather than queued
    /// on a listener about to close, and reset.
    pub path: Option<PathBuf>,
}

impl Front {
    pub fn new(fd: OwnedFd, path: Option<PathBuf>) -> Front {
        Front {
            fd,
            waiting: true,
            path,
        }
    }
}
