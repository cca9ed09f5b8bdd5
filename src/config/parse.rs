//! Value parsers for the settings: text to a bounded value, or the
//! `expected` half of the one-line refusal ("give a whole number from 1 to
//! 1024"). Bounded here, so that no deadline computed from a value can
//! overflow.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use super::{bounds, defaults, duration, size};

/// `HOST:PORT` (the first address it resolves to).
pub fn address(value: &str, example: &str) -> Result<SocketAddr, String> {
    value
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("give HOST:PORT, e.g. {example}"))
}

/// A number of workers (or of slots replaced at once): 1 to the most one
/// master runs.
pub fn count(value: &str) -> Result<usize, String> {
    whole_number(value, defaults::MAX_WORKERS, "")
}

/// A whole number from 1 to `max` (`note` follows the range).
pub fn whole_number<T>(value: &str, max: T, note: &str) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + From<u8> + std::fmt::Display + Copy,
{
    match value.trim().parse::<T>() {
        Ok(n) if (T::from(1)..=max).contains(&n) => Ok(n),
        _ => Err(format!("give a whole number from 1 to {max}{note}")),
    }
}

/// A duration from `min` to a day.
pub fn duration(value: &str, min: Duration) -> Result<Duration, String> {
    duration::parse(value)
        .filter(|d| (min..=bounds::DURATION_MAX).contains(d))
        .ok_or_else(|| {
            format!(
                "give a duration from {} to {}, like 500ms, 10s or 2m",
                duration::show(min),
                duration::show(bounds::DURATION_MAX)
            )
        })
}

/// A duration from a millisecond to a day, or 0: `None`, off.
pub fn duration_or_off(value: &str) -> Result<Option<Duration>, String> {
    match duration::parse(value) {
        Some(d) if d.is_zero() => Ok(None),
        Some(d) if (bounds::TIMEOUT_MIN..=bounds::DURATION_MAX).contains(&d) => Ok(Some(d)),
        _ => Err(format!(
            "give a duration from {} to {}, like 500ms, 10s or 2m (0 = off)",
            duration::show(bounds::TIMEOUT_MIN),
            duration::show(bounds::DURATION_MAX)
        )),
    }
}

/// A whole number up to `max`, or 0: `None`, no limit.
pub fn limit(value: &str, max: u64) -> Result<Option<u64>, String> {
    match value.trim().parse::<u64>() {
        Ok(0) => Ok(None),
        Ok(n) if n <= max => Ok(Some(n)),
        _ => Err(format!("give a whole number up to {max} (0 = no limit)")),
    }
}

/// A size from `min` to `max`, or 0: `None`, no limit.
pub fn size_limit(value: &str, min: u64, max: u64) -> Result<Option<u64>, String> {
    match size::parse(value) {
        Some(0) => Ok(None),
        Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(format!(
            "give a size from {} to {}, like 512MB or 1G (0 = no limit)",
            size::show(min),
            size::show(max)
        )),
    }
}

/// `SIGQUIT`, `quit` or `3` → the signal's number (catchable ones only).
pub fn signal(text: &str) -> Option<i32> {
    let t = text.trim();
    let signal = match t.parse::<i32>() {
        Ok(n) => nix::sys::signal::Signal::try_from(n).ok()?,
        Err(_) => {
            let upper = t.to_ascii_uppercase();
            let name = if upper.starts_with("SIG") {
                upper
            } else {
                format!("SIG{upper}")
            };
            name.parse::<nix::sys::signal::Signal>().ok()?
        }
    };
    use nix::sys::signal::Signal::{SIGKILL, SIGSTOP};
    (signal != SIGKILL && signal != SIGSTOP).then_some(signal as i32)
}

/// Comma-separated paths, none empty (`--watch src,config`).
pub fn paths(value: &std::ffi::OsStr) -> Result<Vec<std::path::PathBuf>, String> {
    use std::os::unix::ffi::OsStrExt;
    let paths: Vec<std::path::PathBuf> = value
        .as_bytes()
        .split(|&b| b == b',')
        .filter(|p| !p.is_empty())
        .map(|p| std::ffi::OsStr::from_bytes(p).into())
        .collect();
    if paths.is_empty() {
        return Err("give one or more paths, comma-separated, e.g. src,config".into());
    }
    Ok(paths)
}
