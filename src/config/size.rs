//! Sizes as people write them in a config: `512MB`, `1G`, `300k`, or a bare
//! number of bytes. Binary multiples (1 K = 1024).

pub fn parse(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: u64 = num.parse().ok()?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    value.checked_mul(scale)
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
        assert_eq!(parse("1T"), None);
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
