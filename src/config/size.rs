//! Sizes as people write them in a config: `512MB`, `1G`, `1.5G`, `300k`,
//! or a bare number of bytes. Binary multiples (1 K = 1024), whatever the
//! spelling (`K`, `KB`, `KiB`, any case): `parse-size`'s, told so.

pub fn parse(s: &str) -> Option<u64> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .ok()
}

/// `n` bytes as [`parse`] reads it, in the largest unit that is exact:
/// `1M`, `1024G`, `300K`, `4096`.
pub fn show(n: u64) -> String {
    for (unit, scale) in [("G", 1u64 << 30), ("M", 1 << 20), ("K", 1 << 10)] {
        if n != 0 && n.is_multiple_of(scale) {
            return format!("{}{unit}", n / scale);
        }
    }
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse("512MB"), Some(512 << 20));
        assert_eq!(parse("1G"), Some(1 << 30));
        assert_eq!(parse("300k"), Some(300 << 10));
        assert_eq!(parse("4096"), Some(4096));
        assert_eq!(parse("12 mib"), Some(12 << 20));
        assert_eq!(parse("lots"), None);
        assert_eq!(parse("1T"), Some(1 << 40));
        assert_eq!(parse("1.5G"), Some(3 << 29));
        assert_eq!(parse("1 KiB"), Some(1024));
        assert_eq!(parse("-1"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse("99999999999999G"), None);
        assert_eq!(parse("99999999999999999999999"), None);
    }

    #[test]
    fn show_is_read_back_by_parse() {
        for n in [0, 4096, 300 << 10, 1 << 20, 512 << 20, 1 << 40] {
            assert_eq!(parse(&show(n)), Some(n), "{}", show(n));
        }
        assert_eq!(show(1 << 40), "1024G");
    }
}
