//! Restart delays and crash-loop detection: exponential, capped, reset once
//! a worker has been ready and stayed up long enough. Pure functions.

use std::time::Duration;

pub const FIRST: Duration = Duration::from_millis(100);
pub const MAX: Duration = Duration::from_secs(30);
/// Consecutive failed starts after which a slot is reported as crash-looping.
pub const CRASH_LOOP: u32 = 5;

/// Consecutive failed starts after a worker exited, given the count before.
/// A worker that said READY and lived at least `min_uptime` was healthy: the
/// count restarts at 1. Anything else (never ready, or died young) adds one.
pub fn failures_after(
    previous: u32,
    uptime: Duration,
    min_uptime: Duration,
    was_ready: bool,
) -> u32 {
    if was_ready && uptime >= min_uptime {
        1
    } else {
        previous.saturating_add(1)
    }
}

/// How long to wait before restart number `failures` (1 = first): 100 ms,
/// 200 ms, 400 ms, … capped at 30 s.
pub fn delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST.saturating_mul(1 << doublings).min(MAX)
}

/// Whether this many consecutive failures is a crash loop.
pub fn is_crash_loop(failures: u32) -> bool {
    failures >= CRASH_LOOP
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(1);

    #[test]
    fn doubles_then_caps() {
        let ms: Vec<u128> = (1..=10).map(|f| delay(f).as_millis()).collect();
        assert_eq!(
            ms,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000]
        );
        assert_eq!(delay(u32::MAX), MAX);
        assert_eq!(delay(0), FIRST);
    }

    #[test]
    fn a_healthy_run_resets_the_count() {
        assert_eq!(failures_after(7, Duration::from_secs(5), MIN, true), 1);
        assert_eq!(failures_after(7, Duration::from_millis(10), MIN, true), 8);
        assert_eq!(
            failures_after(u32::MAX, Duration::ZERO, MIN, true),
            u32::MAX
        );
    }

    #[test]
    fn never_ready_is_a_failure_however_long_it_ran() {
        assert_eq!(failures_after(2, Duration::from_secs(60), MIN, false), 3);
    }

    #[test]
    fn crash_loop_threshold() {
        assert!(!is_crash_loop(CRASH_LOOP - 1));
        assert!(is_crash_loop(CRASH_LOOP));
        // The delay by then is already well above the first one.
        assert_eq!(delay(CRASH_LOOP), Duration::from_millis(1600));
    }
}
