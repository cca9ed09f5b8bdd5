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

/// Lines queued for the writer, per source, before new ones are dropped.
const QUEUE: usize = 8192;

/// lb's own lines, and workers' output lines: two queues, so a chatty
/// worker cannot crowd out what lb says (the writer takes lb's first).
struct Queues {
    master: Sender<Vec<u8>>,
    workers: Sender<Vec<u8>>,
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
        // Without a writer every line is dropped and counted: still never
        // blocking anyone.
        let _ = std::thread::Builder::new()
            .name("lb-log".into())
            .spawn(move || write_all(&master_rx, &workers_rx, &mut std::io::stderr()));
        Queues { master, workers }
    })
}

fn enqueue(queue: &Sender<Vec<u8>>, text: &[u8]) {
    let mut buf = Vec::with_capacity(text.len() + 1);
    buf.extend_from_slice(text);
    buf.push(b'\n');
    match queue.try_send(buf) {
        Ok(()) => {
            QUEUED.fetch_add(1, Ordering::Relaxed);
        }
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Queues one of lb's own lines (a newline is added). Never blocks.
pub fn line(text: &[u8]) {
    enqueue(&queues().master, text);
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

/// The writer: blocks on the sink so that nobody else has to; lb's own
/// lines before workers' whenever both wait.
fn write_all(master: &Receiver<Vec<u8>>, workers: &Receiver<Vec<u8>>, sink: &mut dyn Write) {
    loop {
        let line = match master.try_recv() {
            Ok(line) => line,
            Err(_) => crossbeam_channel::select_biased! {
                recv(master) -> l => match l { Ok(l) => l, Err(_) => return },
                recv(workers) -> l => match l { Ok(l) => l, Err(_) => return },
            },
        };
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
        enqueue(&queues().workers, buf.strip_suffix(b"\n").unwrap_or(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Text a worker sent, made safe for a log line: control characters (a
/// newline that would start a forged `lb:` line, a carriage return, a
/// terminal escape) are written as `\n`, `\r`, `\x1b`…, invalid UTF-8 as
/// U+FFFD. Tabs stay.
pub fn escape(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    let text = String::from_utf8_lossy(bytes);
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push('\t'),
            c if c.is_control() => {
                use std::fmt::Write as _;
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// How many lines one source (a worker's messages) may have logged a
/// second, in bursts of as many; the rest are counted, and the count is
/// logged before the next line that may be (or when the source ends).
pub struct Budget {
    per_second: u32,
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl Budget {
    pub fn new(per_second: u32) -> Budget {
        Budget {
            per_second,
            tokens: f64::from(per_second),
            last: Instant::now(),
            suppressed: 0,
        }
    }

    /// Whether a line may be logged at `now`; if so, how many were not
    /// logged before it (to say so first).
    pub fn take(&mut self, now: Instant) -> Option<u64> {
        let rate = f64::from(self.per_second);
        let earned = now.saturating_duration_since(self.last).as_secs_f64() * rate;
        self.tokens = (self.tokens + earned).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// Lines not logged and not yet reported (the source has ended).
    pub fn unreported(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

/// One master log line: `lb: ` and the message. Never blocks.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => {
        $crate::log::line(format!("lb: {}", format_args!($($arg)*)).as_bytes())
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_cannot_forge_or_garble_a_line() {
        let forged = b"ok\nlb: worker 0 pid 1 gen 1: exit (killed by SIGKILL)\r\x1b[2K\tend";
        assert_eq!(
            escape(forged),
            "ok\\nlb: worker 0 pid 1 gen 1: exit (killed by SIGKILL)\\r\\x1b[2K\tend"
        );
        assert_eq!(escape("plain, ünïcode".as_bytes()), "plain, ünïcode");
        assert_eq!(escape(b"\xff"), "\u{fffd}");
    }

    #[test]
    fn a_budget_allows_bursts_then_its_rate_and_counts_the_rest() {
        let start = Instant::now();
        let mut b = Budget::new(10);
        let allowed = (0..25).filter(|_| b.take(start).is_some()).count();
        assert_eq!(allowed, 10);
        // A second later: ten more, the first of them saying 15 were not logged.
        let later = start + Duration::from_secs(1);
        assert_eq!(b.take(later), Some(15));
        assert_eq!(b.take(later), Some(0));
        assert_eq!(b.unreported(), 0);
    }
}
