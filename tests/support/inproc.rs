//! In-process workers for a `Dispatcher` driven by a test or a benchmark:
//! real socketpairs, real fd passing, each worker on a thread of its own.
//! Shared by `tests/zero_alloc.rs` and `benches/handoff.rs` (`#[path]`).

use std::net::TcpStream;
use std::thread::JoinHandle;

use lb::dispatch::{Command, Handle};
use lb::policy::Slot;
use lb::proto::{self, Wait};
use lb::worker::{Incoming, Listener};

/// Attaches `n` workers (slot i has weight i + 1 and pid i + 1) whose
/// threads say READY, call `serve` on every connection, report its close,
/// and end on DRAIN or when the channel closes.
pub fn workers<F>(handle: &Handle, n: usize, serve: F) -> Vec<JoinHandle<()>>
where
    F: Fn(TcpStream) + Clone + Send + 'static,
{
    (0..n)
        .map(|slot| {
            let (master, worker) = proto::pair().unwrap();
            let peer = worker.try_clone().unwrap();
            nix::fcntl::fcntl(
                &master,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )
            .unwrap();
            handle.send(Command::Attach {
                slot: Slot(slot),
                pid: slot as u32 + 1,
                channel: master,
                peer,
                weight: slot as u32 + 1,
            });
            let serve = serve.clone();
            std::thread::spawn(move || {
                let mut l = Listener::from_fd(worker, slot, 1);
                l.ready().unwrap();
                loop {
                    match l.next(Wait::Block) {
                        Ok(Incoming::Conn(s)) => {
                            serve(s);
                            let _ = l.report_closed(1);
                        }
                        Ok(Incoming::Message(_)) => {}
                        _ => return,
                    }
                }
            })
        })
        .collect()
}
