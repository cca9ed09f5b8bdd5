//! The master's log lines: `lb: ` and one line per event, on stderr. Never
//! used on the hot path.

/// Writes one log line to stderr.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => {
        eprintln!("lb: {}", format_args!($($arg)*))
    };
}
