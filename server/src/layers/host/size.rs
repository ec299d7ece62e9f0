//! Sizes given as parameters (`host->parse_size`), in the forms nbdkit
//! accepts, so that nbdkit command lines carry over.

/// Parse a size: a number with an optional binary suffix (`K`, `M`, `G`,
/// `T`, `P`, `E`, optionally followed by `iB` or `B`), or `s` for 512-byte
/// sectors. Fractions are allowed with a suffix (`1.5G`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let suffix = suffix.trim_end_matches("iB").trim_end_matches('B');
    let shift = match suffix {
        "" | "b" => 0,
        "s" | "S" => 9,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(format!("could not parse size '{s}': unknown suffix")),
    };
    let bad = || format!("could not parse size '{s}'");
    let value = if num.contains('.') {
        let f: f64 = num.parse().map_err(|_| bad())?;
        let v = f * (1u64 << shift) as f64;
        if !(0.0..9.223372036854776e18).contains(&v) {
            return Err(format!("size '{s}' is too large"));
        }
        v as u64
    } else {
        let n: u64 = num.parse().map_err(|_| bad())?;
        n.checked_shl(shift)
            .filter(|v| v >> shift == n)
            .ok_or_else(|| format!("size '{s}' is too large"))?
    };
    // Sizes reach layers as an `int64_t`.
    if value > i64::MAX as u64 {
        return Err(format!("size '{s}' is too large"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_nbdkit() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5T"), Ok(3 << 39));
        assert_eq!(parse_size("2s"), Ok(1024));
        assert!(parse_size("8E").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
    }
}
