//! The master's log: every line with an RFC 3339 timestamp and a level,
//! as text or JSON (`--log-format`), about a worker with its slot, pid and
//! pool; to stderr or `--log-file`, reopened on SIGUSR1. Workers' output
//! lines share the layout (see `format`), in lb's log or in files named by
//! the `--worker-log` pattern (`pattern`). Never used on the hot path.
//!
//! Writing is the `lb-log` thread's (`queue`): no caller ever blocks on a
//! full or vanished sink.

mod budget;
mod format;
pub mod pattern;
mod queue;

pub use budget::Budget;
pub use format::{About, Level, Stream, Style, escape};
pub use queue::flush;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// `--log-timestamps`: `auto` leaves them out of lines that go to
/// journald, which stamps each line itself, and puts them everywhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timestamps {
    Auto,
    On,
    Off,
}

impl Timestamps {
    pub fn parse(s: &str) -> Option<Timestamps> {
        match s {
            "auto" => Some(Timestamps::Auto),
            "on" | "true" | "yes" => Some(Timestamps::On),
            "off" | "false" | "no" => Some(Timestamps::Off),
            _ => None,
        }
    }
}

/// What the log settings make of the sinks, fixed at start.
struct State {
    /// lb's own lines (and workers' lines that go with them).
    master: Style,
    /// Worker log files.
    files: Style,
    /// `--log-file`, reopened on SIGUSR1.
    file: Option<PathBuf>,
}

static STATE: OnceLock<State> = OnceLock::new();

/// The style of lb's log (plain text with timestamps until `init`).
pub fn style() -> Style {
    STATE.get().map_or(Style::TEXT, |s| s.master)
}

/// The style of the worker log files.
pub fn file_style() -> Style {
    STATE.get().map_or(Style::TEXT, |s| s.files)
}

/// Sets the log up, once, before the line that says lb is up: the format,
/// the timestamps, and `file` (appended to) instead of stderr for lb's
/// own lines.
pub fn init(format: LogFormat, timestamps: Timestamps, file: Option<&Path>) -> io::Result<()> {
    let json = format == LogFormat::Json;
    // Only lines written to stderr can reach the journal.
    let journal = file.is_none() && stderr_is_journal();
    let master = Style {
        json,
        timestamps: match timestamps {
            Timestamps::Auto => !journal,
            t => t == Timestamps::On,
        },
        journal: journal && !json,
    };
    let files = Style {
        json,
        timestamps: timestamps != Timestamps::Off,
        journal: false,
    };
    if let Some(path) = file {
        queue::set_sink(Box::new(open_append(path)?));
    }
    let _ = STATE.set(State {
        master,
        files,
        file: file.map(Path::to_path_buf),
    });
    Ok(())
}

/// Opens `--log-file` again (after logrotate moved it): lines logged from
/// now on go to the new file. `None` when lb logs to stderr.
pub fn reopen() -> Option<(&'static Path, io::Result<()>)> {
    let path = STATE.get()?.file.as_deref()?;
    Some((
        path,
        open_append(path).map(|f| queue::set_sink(Box::new(f))),
    ))
}

/// Opens a log file for appending, creating it. Without waiting: a FIFO
/// with no reader (or the like) fails instead of stalling the caller;
/// writes, once open, block only the thread that writes.
pub fn open_append(path: &Path) -> io::Result<File> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(OFlag::O_NONBLOCK.bits())
        .open(path)?;
    let flags = OFlag::from_bits_truncate(fcntl(&file, FcntlArg::F_GETFL)?);
    fcntl(&file, FcntlArg::F_SETFL(flags & !OFlag::O_NONBLOCK))?;
    Ok(file)
}

/// Whether stderr is journald's stream: systemd says which one in
/// `$JOURNAL_STREAM` (`DEV:INODE`), and a stderr redirected since is not.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    dev.parse() == Ok(stat.st_dev) && ino.parse() == Ok(stat.st_ino)
}

/// Queues one of lb's own lines. Never blocks.
pub fn record(level: Level, about: Option<&About<'_>>, msg: fmt::Arguments) {
    queue::master(format::master(style(), level, about, msg));
}

/// Queues a worker's output line for lb's log. Never blocks.
pub fn worker_line(about: &About<'_>, stream: Stream, line: &[u8]) {
    queue::worker(format::worker(style(), about, stream, line));
}

/// A worker's output line as it goes into a worker log file.
pub fn file_line(about: &About<'_>, stream: Stream, line: &[u8]) -> Vec<u8> {
    format::worker(file_style(), about, stream, line)
}

/// The error lb exits on: its last line in the log and, for whoever
/// started lb, on stderr when the log is elsewhere (or not set up yet).
pub fn fatal(error: &dyn fmt::Display) {
    use std::io::Write as _;
    let plain = || {
        let _ = writeln!(std::io::stderr(), "lb: error: {error}");
    };
    let Some(state) = STATE.get() else {
        return plain();
    };
    if state.master.json {
        record(Level::Error, None, format_args!("{error}"));
    } else {
        record(Level::Error, None, format_args!("error: {error}"));
    }
    flush(Duration::from_secs(2));
    if state.file.is_some() {
        plain();
    }
}

#[doc(hidden)]
#[macro_export]
macro_rules! __log {
    ($level:ident; worker: $about:expr; $($arg:tt)*) => {
        $crate::log::record($crate::log::Level::$level, Some(&$about), format_args!($($arg)*))
    };
    ($level:ident; $($arg:tt)*) => {
        $crate::log::record($crate::log::Level::$level, None, format_args!($($arg)*))
    };
}

/// One master log line at level info; `info!(worker: about; "…")` for one
/// about a worker ([`About`]). Never blocks.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::__log!(Info; $($arg)*) };
}

/// A master log line at level warn: something went wrong that lb handles.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::__log!(Warn; $($arg)*) };
}

/// A master log line at level error.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::__log!(Error; $($arg)*) };
}
