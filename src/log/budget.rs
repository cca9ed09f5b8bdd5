//! A rate limit on what one source may log.

use std::time::Instant;

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
