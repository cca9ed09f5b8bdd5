//! A connection handed to a blocking server ([`Conn`]), and the close
//! (and, under kernel dispatch, accept) reports every connection owes the
//! master ([`Reporter`]).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proto::{self, Wait, kind};

/// Reports closed connections to the master; cheap to clone (an `Arc`).
/// Does nothing when the master said it does not read them
/// (`LB_REPORT_CLOSED=0`).
#[derive(Debug, Clone)]
pub struct Reporter {
    pub(super) chan: Arc<OwnedFd>,
    pub(super) enabled: bool,
    /// Under kernel dispatch: connections accepted from the own listener
    /// and not yet reported. The lock is held across the sends so that
    /// every CLOSED goes out after the ACCEPTED that covers it, whichever
    /// thread closes: the master counts a close beyond what it knows of
    /// as a protocol error.
    pub(super) accepted: Option<Arc<Mutex<u64>>>,
}

/// Accepts reported in one ACCEPTED at most: a worker that never runs out
/// of connections to accept still tells least-connections about them.
pub(super) const ACCEPTED_BATCH: u64 = 32;

impl Reporter {
    /// Tells the master `n` connections have finished (feeds least-connections).
    pub fn closed(&self, n: u64) -> io::Result<()> {
        if n == 0 || !self.enabled {
            return Ok(());
        }
        let _held = match &self.accepted {
            Some(pending) => {
                let mut pending = lock(pending);
                self.send_accepted(&mut pending)?;
                Some(pending)
            }
            None => None,
        };
        ignore_gone(proto::send_plain(
            self.chan.as_fd(),
            kind::CLOSED,
            n,
            &[],
            Wait::Block,
        ))
    }

    /// Counts one connection accepted from the own listener; reports the
    /// batch once it is [`ACCEPTED_BATCH`] long.
    pub(super) fn accepted_one(&self) -> io::Result<()> {
        let Some(pending) = self.accepted.as_ref().filter(|_| self.enabled) else {
            return Ok(());
        };
        let mut pending = lock(pending);
        *pending += 1;
        if *pending >= ACCEPTED_BATCH {
            self.send_accepted(&mut pending)?;
        }
        Ok(())
    }

    /// Reports the accepts not reported yet (before the worker waits).
    pub(super) fn flush_accepted(&self) -> io::Result<()> {
        match self.accepted.as_ref().filter(|_| self.enabled) {
            Some(pending) => self.send_accepted(&mut lock(pending)),
            None => Ok(()),
        }
    }

    fn send_accepted(&self, pending: &mut u64) -> io::Result<()> {
        if *pending == 0 {
            return Ok(());
        }
        let n = std::mem::take(pending);
        ignore_gone(proto::send_plain(
            self.chan.as_fd(),
            kind::ACCEPTED,
            n,
            &[],
            Wait::Block,
        ))
    }
}

/// A counter has no invariant a panicking holder could have broken.
fn lock(m: &Mutex<u64>) -> std::sync::MutexGuard<'_, u64> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A master that has exited is not an error worth failing a close over.
pub(super) fn ignore_gone(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) => Ok(()),
        other => other,
    }
}

/// A connection from the master (or, under kernel dispatch, from the
/// worker's own listener) that reports its own close when dropped.
#[derive(Debug)]
pub struct Conn {
    pub(super) stream: Option<TcpStream>,
    pub(super) reporter: Reporter,
    pub(super) draining: Arc<AtomicBool>,
    /// Connections accepted and not yet dropped (shared with the listener).
    pub(super) live: Arc<AtomicU64>,
    /// The client's address from a PROXY header, as the master sent it.
    pub(super) client: Option<SocketAddr>,
}

impl Conn {
    /// The client's address: the one the master read from a PROXY
    /// protocol header in front of this connection, else the socket's
    /// peer (a direct client, or lb sent none: `docs/protocol.md` §2).
    /// Behind a balancer the socket's peer is the balancer.
    pub fn client_addr(&self) -> io::Result<SocketAddr> {
        match self.client {
            Some(a) => Ok(a),
            None => self.peer_addr(),
        }
    }

    /// Whether the worker has been told to DRAIN: answer with
    /// `Connection: close` from now on.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// For a blocking server between two requests on a kept-alive
    /// connection: waits until the client sends more or closes (`true`:
    /// read it), or, once the worker drains, until the connection has been
    /// idle for `grace` since this call (`false`: close it). DRAIN is
    /// checked every 100 ms, so a thread waiting here notices it without
    /// being told.
    pub fn wait_for_request(&mut self, grace: Duration) -> io::Result<bool> {
        const DRAIN_CHECK: Duration = Duration::from_millis(100);
        let draining = Arc::clone(&self.draining);
        let stream = self.stream.as_mut().expect("present until drop");
        let previous = stream.read_timeout()?;
        stream.set_read_timeout(Some(DRAIN_CHECK))?;
        let called = Instant::now();
        let result = loop {
            if draining.load(Ordering::Relaxed) && called.elapsed() >= grace {
                break Ok(false);
            }
            match stream.peek(&mut [0u8; 1]) {
                Ok(_) => break Ok(true),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => break Err(e),
            }
        };
        stream.set_read_timeout(previous)?;
        result
    }

    /// Closes after the last response without turning anything the client
    /// sent meanwhile (a pipelined request) into a reset that could destroy
    /// that response in flight: shuts the sending side, reads and discards
    /// until the client closes or `grace` passes, then closes (and reports).
    pub fn close_gracefully(mut self, grace: Duration) {
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        if stream.shutdown(Shutdown::Write).is_err() {
            return;
        }
        // A grace too long for an Instant (Duration::MAX) has no end.
        let until = Instant::now().checked_add(grace);
        let mut sink = [0u8; 4096];
        loop {
            let left = until.map_or(grace, |u| u.saturating_duration_since(Instant::now()));
            if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
                return;
            }
            match stream.read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

impl Deref for Conn {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        self.stream.as_ref().expect("present until drop")
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut TcpStream {
        self.stream.as_mut().expect("present until drop")
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (**self).read(buf)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (**self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        (**self).flush()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        drop(self.stream.take()); // close first, then report
        self.live.fetch_sub(1, Ordering::Relaxed);
        let _ = self.reporter.closed(1);
    }
}
