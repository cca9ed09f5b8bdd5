//! Restart delays: exponential, capped, and reset once a worker has stayed
//! up long enough to count as healthy. Pure functions.

use std::time::Duration;

pub const FIRST: Duration = Duration::from_millis(100);
pub const MAX: Duration = Duration::from_secs(30);
/// A worker that lived at least this long did not crash-loop.
pub const MIN_UPTIME: Duration = Duration::from_secs(1);

/// Consecutive quick failures after a worker that lived `uptime` exited,
/// given the count before.
pub fn failures_after(previous: u32, uptime: Duration) -> u32 {
    if uptime >= MIN_UPTIME {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(failures_after(7, Duration::from_secs(5)), 1);
        assert_eq!(failures_after(7, Duration::from_millis(10)), 8);
        assert_eq!(failures_after(u32::MAX, Duration::ZERO), u32::MAX);
    }
}
