//! The value parsers behind nbdkit's `nbdkit_parse_*` functions, with
//! nbdkit's accepted forms and its error wording.

use std::ffi::{c_char, CStr};
use std::fmt;

/// Why an integer did not parse.
#[derive(Debug, PartialEq, Eq)]
pub enum IntError {
    Empty,
    Garbage,
    Negative,
    Range,
}

impl IntError {
    /// nbdkit's message for `what` = `text`.
    pub fn message(&self, what: &str, text: &str) -> String {
        match self {
            IntError::Empty => format!("{what}: empty string where we expected a number"),
            IntError::Garbage => {
                format!("{what}: could not parse number: \"{text}\": trailing garbage")
            }
            IntError::Negative => format!("{what}: negative numbers are not allowed"),
            IntError::Range => {
                format!("{what}: could not parse number: \"{text}\": Numerical result out of range")
            }
        }
    }
}

/// An integer as C's `strtoll` (or `strtoull`, refusing a minus sign)
/// reads it in base 0: leading blanks, a sign, and `0x` or `0` for
/// hexadecimal or octal; nothing may follow.
pub fn integer(text: &CStr, unsigned: bool) -> Result<i128, IntError> {
    let s = text.to_bytes();
    let start = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
    if unsigned && s.get(start) == Some(&b'-') {
        return Err(IntError::Negative);
    }
    let p = text.as_ptr();
    let mut end: *mut c_char = std::ptr::null_mut();
    // SAFETY: errno is this thread's; strtoll/strtoull read the
    // NUL-terminated string and set `end` inside it.
    let (v, errno, used) = unsafe {
        *libc::__errno_location() = 0;
        let v = if unsigned {
            i128::from(libc::strtoull(p, &mut end, 0))
        } else {
            i128::from(libc::strtoll(p, &mut end, 0))
        };
        (v, *libc::__errno_location(), end.offset_from(p) as usize)
    };
    if errno == libc::ERANGE {
        return Err(IntError::Range);
    }
    if used == 0 {
        return Err(IntError::Empty);
    }
    if used < s.len() {
        return Err(IntError::Garbage);
    }
    Ok(v)
}

/// Why a size did not parse; each holds the text (or the suffix) it names.
#[derive(Debug, PartialEq, Eq)]
pub enum SizeError {
    /// No digits where the number should start.
    NoNumber(String),
    /// A minus sign before a number other than zero.
    Negative(String),
    /// A number past `i64`.
    TooLarge(String),
    /// What follows the number is not one suffix letter.
    UnknownSuffix(String),
    /// The number times its suffix is past `i64`.
    Overflow(String),
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeError::NoNumber(text) => write!(f, "could not parse size string ({text})"),
            SizeError::Negative(text) => write!(f, "size cannot be negative ({text})"),
            SizeError::TooLarge(text) => write!(f, "size ({text}) exceeds maximum value"),
            SizeError::UnknownSuffix(rest) => {
                write!(f, "could not parse size: unknown suffix '{rest}'")
            }
            SizeError::Overflow(text) => write!(f, "overflow computing size ({text})"),
        }
    }
}

/// A size as nbdkit 1.32's `nbdkit_parse_size` reads it: a decimal
/// integer as `strtoimax` takes it (leading blanks and a sign allowed),
/// then nothing, or one suffix letter: `b`, `s` (512-byte sectors), or `k`
/// to `e` for powers of 1024, in either case. The error displays as
/// nbdkit's message.
pub fn size(text: &str) -> Result<i64, SizeError> {
    let t = text.trim_start();
    let sign = usize::from(t.starts_with(['+', '-']));
    let digits = t[sign..].bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(SizeError::NoNumber(text.to_owned()));
    }
    let (number, rest) = t.split_at(sign + digits);
    if number.starts_with('-') && number[1..].bytes().any(|b| b != b'0') {
        return Err(SizeError::Negative(text.to_owned()));
    }
    let value = number.trim_start_matches(['+', '-']).parse::<i64>();
    // strtoimax clamps: past the range it is the range's end with ERANGE.
    let value = value.map_err(|_| SizeError::TooLarge(text.to_owned()))?;
    let mut suffix = rest.chars();
    let scale: i64 = match suffix.next() {
        None => 1,
        Some('b' | 'B') => 1,
        Some('s' | 'S') => 512,
        Some(c) => match "kmgtpe".find(c.to_ascii_lowercase()) {
            Some(i) => 1 << (10 * (i + 1)),
            None => return Err(SizeError::UnknownSuffix(rest.to_owned())),
        },
    };
    if suffix.next().is_some() {
        return Err(SizeError::UnknownSuffix(rest.to_owned()));
    }
    value
        .checked_mul(scale)
        .ok_or_else(|| SizeError::Overflow(text.to_owned()))
}

/// nbdkit's booleans: `1`, `true`, `t`, `yes`, `y`, `on` and their
/// opposites, case aside.
pub fn boolean(s: &str) -> Option<bool> {
    let l = s.to_ascii_lowercase();
    match l.as_str() {
        "1" | "true" | "t" | "yes" | "y" | "on" => Some(true),
        "0" | "false" | "f" | "no" | "n" | "off" => Some(false),
        _ => None,
    }
}

/// A probability: `0.1`, `1e-1`, `10%`, `1:10` or `1/10`. Finite and not
/// negative, but possibly above 1.
pub fn probability(s: &str) -> Result<f64, &'static str> {
    let num = |t: &str| {
        t.trim()
            .parse::<f64>()
            .map_err(|_| "could not parse number")
    };
    let p = if let Some(pc) = s.trim().strip_suffix('%') {
        num(pc)? / 100.0
    } else if let Some((a, b)) = s.split_once([':', '/']) {
        let d = num(b)?;
        if d == 0.0 {
            return Err("denominator cannot be zero");
        }
        num(a)? / d
    } else {
        num(s)?
    };
    if !p.is_finite() || p < 0.0 {
        return Err("probability out of range");
    }
    Ok(p)
}

/// A delay in seconds (`1`, `1.5`, `1.5s`), milliseconds (`ms`),
/// microseconds (`us`, `μs`) or nanoseconds (`ns`), as (seconds,
/// nanoseconds).
pub fn delay(s: &str) -> Result<(u32, u32), &'static str> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ns") {
        (n, 1e-9)
    } else if let Some(n) = t.strip_suffix("us").or_else(|| t.strip_suffix("μs")) {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else {
        (t.strip_suffix('s').unwrap_or(t), 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| "could not parse delay")?;
    let secs = v * scale;
    if !secs.is_finite() || secs < 0.0 || secs >= f64::from(u32::MAX) {
        return Err("delay out of range");
    }
    let whole = secs.trunc();
    let nanos = ((secs - whole) * 1e9).round().min(999_999_999.0);
    Ok((whole as u32, nanos as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_nbdkit_1_32_reads_them() {
        assert_eq!(size("1M"), Ok(1 << 20));
        assert_eq!(size("+5"), Ok(5));
        assert_eq!(size(" 2s"), Ok(1024));
        assert_eq!(size("3b"), Ok(3));
        assert_eq!(size("7E"), Ok(7 << 60));
        assert_eq!(size("-0"), Ok(0));
        for (text, why) in [
            ("", "could not parse size string ()"),
            ("M", "could not parse size string (M)"),
            ("-1", "size cannot be negative (-1)"),
            ("1.5M", "could not parse size: unknown suffix '.5M'"),
            ("1MiB", "could not parse size: unknown suffix 'MiB'"),
            ("1 M", "could not parse size: unknown suffix ' M'"),
            ("0x100", "could not parse size: unknown suffix 'x100'"),
            ("8E", "overflow computing size (8E)"),
            (
                "99999999999999999999",
                "size (99999999999999999999) exceeds maximum value",
            ),
        ] {
            assert_eq!(
                size(text).map_err(|e| e.to_string()),
                Err(why.to_string()),
                "{text:?}"
            );
        }
    }

    #[test]
    fn integers_read_like_strtol_in_base_zero() {
        assert_eq!(integer(c"42", false), Ok(42));
        assert_eq!(integer(c"  -7", false), Ok(-7));
        assert_eq!(integer(c"0x1f", false), Ok(31));
        assert_eq!(integer(c"010", true), Ok(8));
        assert_eq!(integer(c"", false), Err(IntError::Empty));
        assert_eq!(integer(c"12ab", false), Err(IntError::Garbage));
        assert_eq!(integer(c" -1", true), Err(IntError::Negative));
        assert_eq!(
            integer(c"99999999999999999999", false),
            Err(IntError::Range)
        );
    }

    #[test]
    fn booleans_in_any_case() {
        assert_eq!(boolean("On"), Some(true));
        assert_eq!(boolean("n"), Some(false));
        assert_eq!(boolean("maybe"), None);
    }

    #[test]
    fn probabilities_in_every_form() {
        for s in ["0.1", "1e-1", "10%", "1:10", "1/10"] {
            assert!((probability(s).unwrap() - 0.1).abs() < 1e-12, "{s}");
        }
        assert_eq!(probability("200%"), Ok(2.0));
        assert!(probability("-1").is_err());
        assert!(probability("1/0").is_err());
        assert!(probability("x").is_err());
    }

    #[test]
    fn delays_in_every_unit() {
        assert_eq!(delay("1"), Ok((1, 0)));
        assert_eq!(delay("1.5s"), Ok((1, 500_000_000)));
        assert_eq!(delay("120ms"), Ok((0, 120_000_000)));
        assert_eq!(delay("1.2us"), Ok((0, 1_200)));
        assert_eq!(delay("3μs"), Ok((0, 3_000)));
        assert_eq!(delay("1ns"), Ok((0, 1)));
        assert!(delay("-1").is_err());
        assert!(delay("soon").is_err());
    }
}
