//! Durations as people write them in a config: `500ms`, `10s`, `2m`,
//! `1h30m`, `1.5s`, or a bare number of seconds.
//!
//! Units and compounds are `humantime`'s (`ms`, `s`/`sec`, `m`/`min`,
//! `h`/`hr`, `d`, written together or apart), exact to the nanosecond
//! with no float rounding; a bare number, which it refuses (a unit is its
//! rule), is read as seconds, as `lb.toml.example` promises.

use std::time::Duration;

pub fn parse(s: &str) -> Option<Duration> {
    let s = s.trim();
    let bare = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if bare {
        return humantime::parse_duration(&format!("{s}s")).ok();
    }
    humantime::parse_duration(s).ok()
}

/// `d` as [`parse`] reads it, in the largest unit that is exact: `0`,
/// `500ms`, `10s`, `2m`, `24h`.
pub fn show(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse("10 s"), Some(Duration::from_secs(10)));
        assert_eq!(parse("ten"), None);
        assert_eq!(parse("5x"), None);
        assert_eq!(parse("10S"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse("-1s"), None);
        assert_eq!(parse("."), None);
        assert_eq!(parse("1e9"), None);
    }

    #[test]
    fn compounds_and_long_unit_names() {
        assert_eq!(parse("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse("1h 30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse("5min"), Some(Duration::from_secs(300)));
        assert_eq!(parse("1d"), Some(Duration::from_secs(86400)));
        assert_eq!(parse("0"), Some(Duration::ZERO));
        assert_eq!(parse("5"), Some(Duration::from_secs(5)));
        assert_eq!(parse("0.25"), Some(Duration::from_millis(250)));
    }

    #[test]
    fn huge_values_parse_without_panicking() {
        // Out of range for a Duration: refused by the parser itself.
        assert_eq!(parse("99999999999999999999999h"), None);
        // In range for a Duration (the config then refuses them).
        assert!(parse("9223372036854775807s").is_some());
        assert!(parse("2562047788015215h").is_some());
    }

    #[test]
    fn show_is_read_back_by_parse() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(1),
            Duration::from_millis(1500),
            Duration::from_secs(10),
            Duration::from_secs(120),
            Duration::from_secs(24 * 3600),
        ] {
            assert_eq!(parse(&show(d)), Some(d), "{}", show(d));
        }
        assert_eq!(show(Duration::from_secs(24 * 3600)), "24h");
        assert_eq!(show(Duration::from_millis(1)), "1ms");
    }
}
