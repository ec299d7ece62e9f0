//! Sizes given as parameters (`host->parse_size`), in the forms nbdkit
//! accepts, so that nbdkit command lines carry over.

/// Why a size could not be parsed; the message quotes the text given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    /// A suffix that is not a binary multiple or `s`.
    UnknownSuffix(String),
    /// The number is not one.
    Unparsable(String),
    /// More than an `int64_t` holds.
    TooLarge(String),
}

impl std::fmt::Display for SizeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SizeError::UnknownSuffix(s) => write!(f, "could not parse size '{s}': unknown suffix"),
            SizeError::Unparsable(s) => write!(f, "could not parse size '{s}'"),
            SizeError::TooLarge(s) => write!(f, "size '{s}' is too large"),
        }
    }
}

impl std::error::Error for SizeError {}

/// Parse a size: a number with an optional binary suffix (`K`, `M`, `G`,
/// `T`, `P`, `E`, optionally followed by `iB` or `B`), or `s` for 512-byte
/// sectors. Fractions are allowed with a suffix (`1.5G`).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
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
        _ => return Err(SizeError::UnknownSuffix(s.to_string())),
    };
    let bad = || SizeError::Unparsable(s.to_string());
    let too_large = || SizeError::TooLarge(s.to_string());
    let value = if num.contains('.') {
        let f: f64 = num.parse().map_err(|_| bad())?;
        let v = f * (1u64 << shift) as f64;
        if !(0.0..9.223372036854776e18).contains(&v) {
            return Err(too_large());
        }
        v as u64
    } else {
        let n: u64 = num.parse().map_err(|_| bad())?;
        n.checked_shl(shift)
            .filter(|v| v >> shift == n)
            .ok_or_else(too_large)?
    };
    // Sizes reach layers as an `int64_t`.
    if value > i64::MAX as u64 {
        return Err(too_large());
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
