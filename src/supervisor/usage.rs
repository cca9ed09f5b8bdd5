//! The master's own use of the machine, as Prometheus' `process_*`
//! metrics name it (what every client library exports for its process):
//! CPU, resident memory, open and allowed file descriptors, start time.
//! Read from `/proc` at each status, as those libraries do at each scrape.

use std::sync::OnceLock;

use crate::sys;

/// The master process's figures; `None` where `/proc` would not say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub cpu_s: f64,
    pub rss_bytes: u64,
    pub open_fds: Option<u64>,
    /// The soft `RLIMIT_NOFILE` (what `open` is refused beyond).
    pub max_fds: Option<u64>,
    /// When the process started, in seconds since the Unix epoch.
    pub start_time_s: Option<f64>,
}

impl Usage {
    pub fn now() -> Usage {
        let (cpu_s, rss_bytes) = sys::proc_usage(std::process::id()).unwrap_or_default();
        Usage {
            cpu_s,
            rss_bytes,
            open_fds: std::fs::read_dir("/proc/self/fd")
                // (The count includes read_dir's own fd, as Prometheus'
                // client libraries' do.)
                .map(|d| d.count() as u64)
                .ok(),
            max_fds: nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .ok()
                .map(|(soft, _)| soft),
            start_time_s: *START.get_or_init(start_time),
        }
    }
}

/// Never changes; read once.
static START: OnceLock<Option<f64>> = OnceLock::new();

/// The boot time (`/proc/stat`'s `btime`) plus the process's start, in
/// clock ticks after boot (field 22 of `/proc/self/stat`).
fn start_time() -> Option<f64> {
    // USER_HZ is fixed at 100 by the Linux ABI (as `sys::proc_usage` says).
    const USER_HZ: f64 = 100.0;
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command (which may hold spaces and parentheses)
    // start at field 3, so field 22 is the 20th.
    let ticks: f64 = stat
        .rsplit(')')
        .next()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    Some(boot + ticks / USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_measured() {
        let u = Usage::now();
        assert!(u.rss_bytes > 0 && u.cpu_s >= 0.0, "{u:?}");
        let (open, max) = (u.open_fds.unwrap(), u.max_fds.unwrap());
        assert!(open >= 3 && open <= max, "{u:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = u.start_time_s.unwrap();
        // Started before now, and not before this test binary could have.
        assert!(
            start <= now + 1.0 && start > now - 3600.0,
            "{start} vs {now}"
        );
    }
}
