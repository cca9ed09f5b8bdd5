//! The master's log: `lb: ` and one line per event, plus workers' output
//! lines when they go to lb's stderr. Never used on the hot path.
//!
//! Lines are queued and written to stderr by a thread of their own, so a
//! full pipe (a stalled log shipper) or a vanished one (`lb … | head -1`)
//! never blocks or kills the supervisor or the dispatcher: a line that does
//! not fit in the queue, or that the sink refuses, is dropped and counted,
//! and once the sink takes lines again one line says how many were lost.

use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

/// Lines queued for the writer before new ones are dropped.
const QUEUE: usize = 8192;

static QUEUE_TX: OnceLock<Sender<Vec<u8>>> = OnceLock::new();
/// Lines dropped since a line last said so.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Lines queued, and lines the writer is done with (written or dropped).
static QUEUED: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicU64 = AtomicU64::new(0);

fn queue() -> &'static Sender<Vec<u8>> {
    QUEUE_TX.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        // Without a writer every line is dropped and counted: still never
        // blocking anyone.
        let _ = std::thread::Builder::new()
            .name("lb-log".into())
            .spawn(move || write_all(&rx, &mut std::io::stderr()));
        tx
    })
}

/// Queues one line (a newline is added). Never blocks.
pub fn line(text: &[u8]) {
    let mut buf = Vec::with_capacity(text.len() + 1);
    buf.extend_from_slice(text);
    buf.push(b'\n');
    match queue().try_send(buf) {
        Ok(()) => {
            QUEUED.fetch_add(1, Ordering::Relaxed);
        }
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Waits (at most `timeout`) until every queued line has been written or
/// given up on: for the last lines before the process exits.
pub fn flush(timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while DONE.load(Ordering::Relaxed) < QUEUED.load(Ordering::Relaxed) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The writer: blocks on the sink so that nobody else has to.
fn write_all(rx: &Receiver<Vec<u8>>, sink: &mut dyn Write) {
    while let Ok(line) = rx.recv() {
        if sink.write_all(&line).is_ok() {
            let lost = DROPPED.swap(0, Ordering::Relaxed);
            if lost > 0 {
                let _ = writeln!(
                    sink,
                    "lb: {lost} log lines were dropped: the log (stderr) did not take them in time"
                );
            }
        } else {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        DONE.fetch_add(1, Ordering::Relaxed);
    }
}

/// A `Write` whose every `write` is one log line (without its newline):
/// for workers' output lines, which then share the master's queue.
pub struct Lines;

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        line(buf.strip_suffix(b"\n").unwrap_or(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One master log line: `lb: ` and the message. Never blocks.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => {
        $crate::log::line(format!("lb: {}", format_args!($($arg)*)).as_bytes())
    };
}
