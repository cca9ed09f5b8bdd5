//! The master log's queues and its writer thread. Lines are queued and
//! written by a thread of their own, so a full pipe (a stalled log
//! shipper), a vanished one (`lb … | head -1`) or a slow disk never blocks
//! or kills the supervisor or the dispatcher: a line that does not fit in
//! the queue, or that the sink refuses, is dropped and counted, and once
//! the sink takes lines again one line says how many were lost.

use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::format::{self, Level};

/// Lines queued for the writer, per source, before new ones are dropped.
const QUEUE: usize = 8192;

pub type Sink = Box<dyn Write + Send>;

/// lb's own lines, and workers' output lines: two queues, so a chatty
/// worker cannot crowd out what lb says (the writer takes lb's first).
/// Sinks (the log file, reopened) come on a third, never full, and are
/// taken before any line queued after them.
struct Queues {
    master: Sender<Vec<u8>>,
    workers: Sender<Vec<u8>>,
    sinks: Sender<Sink>,
}

static QUEUES: OnceLock<Queues> = OnceLock::new();
/// Lines dropped since a line last said so.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Lines queued, and lines the writer is done with (written or dropped).
static QUEUED: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicU64 = AtomicU64::new(0);

fn queues() -> &'static Queues {
    QUEUES.get_or_init(|| {
        let (master, master_rx) = crossbeam_channel::bounded(QUEUE);
        let (workers, workers_rx) = crossbeam_channel::bounded(QUEUE);
        let (sinks, sinks_rx) = crossbeam_channel::unbounded();
        // Without a writer every line is dropped and counted: still never
        // blocking anyone.
        let _ = std::thread::Builder::new()
            .name("lb-log".into())
            .spawn(move || {
                write_all(
                    &sinks_rx,
                    &master_rx,
                    &workers_rx,
                    Box::new(std::io::stderr()),
                )
            });
        Queues {
            master,
            workers,
            sinks,
        }
    })
}

fn enqueue(queue: &Sender<Vec<u8>>, line: Vec<u8>) {
    match queue.try_send(line) {
        Ok(()) => {
            QUEUED.fetch_add(1, Ordering::Relaxed);
        }
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Queues one of lb's own lines (formatted, with its newline).
pub fn master(line: Vec<u8>) {
    enqueue(&queues().master, line);
}

/// Queues a worker's output line (formatted, with its newline).
pub fn worker(line: Vec<u8>) {
    enqueue(&queues().workers, line);
}

/// Lines queued from now on go to `sink`.
pub fn set_sink(sink: Sink) {
    let _ = queues().sinks.send(sink);
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

/// The writer: blocks on the sink so that nobody else has to; a new sink
/// first, then lb's own lines before workers' whenever both wait.
fn write_all(
    sinks: &Receiver<Sink>,
    master: &Receiver<Vec<u8>>,
    workers: &Receiver<Vec<u8>>,
    mut sink: Sink,
) {
    loop {
        let line = crossbeam_channel::select_biased! {
            recv(sinks) -> s => {
                if let Ok(new) = s {
                    let _ = sink.flush();
                    sink = new;
                }
                continue;
            },
            recv(master) -> l => match l { Ok(l) => l, Err(_) => return },
            recv(workers) -> l => match l { Ok(l) => l, Err(_) => return },
        };
        if sink.write_all(&line).is_ok() {
            let lost = DROPPED.swap(0, Ordering::Relaxed);
            if lost > 0 {
                let note = format::master(
                    super::style(),
                    Level::Warn,
                    None,
                    format_args!(
                        "{lost} log lines were dropped: the log did not take them in time"
                    ),
                );
                let _ = sink.write_all(&note);
            }
        } else {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        DONE.fetch_add(1, Ordering::Relaxed);
    }
}
