//! The protect filter: ranges of the layer below that clients may read
//! but not change. A write, trim or zero touching them goes down only if
//! it leaves their bytes as they are; otherwise it fails with `EPERM`.

#![forbid(unsafe_code)]

use std::sync::Arc;

use nbdhost_plugin_api::{
    callbacks, nbdhost_filter, Error, Filter, FilterHandle, Flags, Next, NextOpener, RangeRequest,
    Result, WriteRequest,
};

/// The end nbdkit gives a range left open (`START-`, or the tail of a
/// `~` range): the largest disk size.
const OPEN_END: u64 = i64::MAX as u64;

/// Verifying reads are made in pieces of at most this many bytes, so a
/// large zero or trim over a protected range needs no buffer of its size.
const CHUNK: u64 = 1 << 20;

/// One protected range, both ends inclusive, with the parameter that
/// made it for the error message.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Range {
    start: u64,
    end: u64,
    origin: String,
}

/// A number as `strtoull` with base 0 reads it: hexadecimal after `0x`,
/// octal after a leading `0`, decimal otherwise.
fn parse_number(text: &str, origin: &str) -> Result<u64> {
    let bad = || {
        Error::new(
            libc::EINVAL,
            format!("protect: could not parse '{text}' in range {origin}"),
        )
    };
    let (digits, radix) =
        if let Some(h) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            (h, 16)
        } else if text.len() > 1 && text.starts_with('0') {
            (&text[1..], 8)
        } else {
            (text, 10)
        };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(bad());
    }
    u64::from_str_radix(digits, radix).map_err(|_| bad())
}

/// The ranges `START-END` or `~START-END` protects (a complement makes up
/// to two).
fn parse_range(value: &str) -> Result<Vec<Range>> {
    let (negate, body) = match value.strip_prefix('~') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let (start, end) = body.split_once('-').ok_or_else(|| {
        Error::new(
            libc::EINVAL,
            format!("protect: cannot parse range, missing '-': {value}"),
        )
    })?;
    let start = if start.is_empty() {
        0
    } else {
        parse_number(start, value)?
    };
    let end = if end.is_empty() {
        OPEN_END
    } else {
        parse_number(end, value)?
    };
    if end < start {
        return Err(Error::new(
            libc::EINVAL,
            format!("protect: invalid range, end < start: {value}"),
        ));
    }
    let range = |start, end| Range {
        start,
        end,
        origin: value.to_owned(),
    };
    Ok(if !negate {
        vec![range(start, end)]
    } else {
        let mut v = Vec::new();
        if start > 0 {
            v.push(range(0, start - 1));
        }
        if end < OPEN_END {
            v.push(range(end + 1, OPEN_END));
        }
        v
    })
}

/// Sort ranges and join those that overlap or touch.
fn merge(mut ranges: Vec<Range>) -> Vec<Range> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.end.saturating_add(1) >= r.start => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// A protected stretch a request touches: where it starts, how long it
/// is, and the range it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    offset: u64,
    len: u64,
    range: usize,
}

/// The configured ranges, sorted and joined.
#[derive(Default)]
pub struct Protect {
    given: Vec<Range>,
    ranges: Arc<Vec<Range>>,
}

impl Protect {
    fn pieces(ranges: &[Range], count: u64, offset: u64) -> Vec<Piece> {
        let Some(last) = offset.checked_add(count).and_then(|e| e.checked_sub(1)) else {
            return Vec::new();
        };
        let first = ranges.partition_point(|r| r.end < offset);
        let mut out = Vec::new();
        for (i, r) in ranges.iter().enumerate().skip(first) {
            if r.start > last {
                break;
            }
            let (mut from, to) = (r.start.max(offset), r.end.min(last));
            while from <= to {
                let len = (to - from + 1).min(CHUNK);
                out.push(Piece {
                    offset: from,
                    len,
                    range: i,
                });
                from += len;
            }
        }
        out
    }
}

#[callbacks]
impl Filter for Protect {
    const NAME: &'static str = "protect";
    const DESCRIPTION: &'static str = "refuse changes to ranges of the underlying disk";
    const CONFIG_HELP: &'static str =
        "protect=<START>-<END>      Protect range of bytes START-END (inclusive).";
    type Handle = Guarded;

    fn nonblocking(&self) -> bool {
        true
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "protect" => self.given.extend(parse_range(value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn config_complete(&mut self) -> Result<()> {
        self.ranges = Arc::new(merge(std::mem::take(&mut self.given)));
        Ok(())
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Guarded> {
        next.open(readonly, export_name)?;
        Ok(Guarded {
            ranges: self.ranges.clone(),
        })
    }
}

/// One connection, sharing the filter's ranges.
pub struct Guarded {
    ranges: Arc<Vec<Range>>,
}

/// What a request would leave in the bytes it covers.
trait Proposed: Send + 'static {
    /// Whether `found`, read at `offset`, is what the request leaves there.
    fn unchanged(&self, offset: u64, found: &[u8]) -> bool;
    /// Answer the request with an error, without passing it down.
    fn fail(self, e: Error);
}

impl Proposed for WriteRequest {
    fn unchanged(&self, offset: u64, found: &[u8]) -> bool {
        let at = (offset - self.offset()) as usize;
        self.buf()[at..at + found.len()] == *found
    }
    fn fail(self, e: Error) {
        self.complete(Err(e))
    }
}

impl Proposed for RangeRequest {
    fn unchanged(&self, _offset: u64, found: &[u8]) -> bool {
        found.iter().all(|&b| b == 0)
    }
    fn fail(self, e: Error) {
        self.complete(Err(e))
    }
}

fn refused(range: &Range) -> Error {
    Error::new(
        libc::EPERM,
        format!(
            "protect filter prevented write to protected range {}",
            range.origin
        ),
    )
}

impl Guarded {
    /// Read each protected piece of a request and check that the request
    /// would not change it.
    fn check(
        &self,
        next: &Next,
        count: u64,
        offset: u64,
        unchanged: impl Fn(u64, &[u8]) -> bool,
    ) -> Result<()> {
        let mut found = Vec::new();
        for p in Protect::pieces(&self.ranges, count, offset) {
            found.resize(p.len as usize, 0);
            next.pread(&mut found, p.offset, Flags::empty())?;
            if !unchanged(p.offset, &found) {
                return Err(refused(&self.ranges[p.range]));
            }
        }
        Ok(())
    }

    /// The asynchronous form of [`Guarded::check`]: read the pieces one
    /// after another (last first, popped off `todo`), then `pass` the
    /// request down, or fail it at the first piece it would change.
    fn check_async<R: Proposed>(
        ranges: Arc<Vec<Range>>,
        next: &Next,
        mut todo: Vec<Piece>,
        req: R,
        pass: fn(&Next, R),
    ) {
        let Some(p) = todo.pop() else {
            return pass(next, req);
        };
        let buf = vec![0; p.len as usize];
        next.async_pread_owned(
            buf,
            p.offset,
            Flags::empty(),
            move |next, found, r| match r {
                Err(e) => req.fail(e),
                Ok(()) if !req.unchanged(p.offset, &found) => req.fail(refused(&ranges[p.range])),
                Ok(()) => Guarded::check_async(ranges, next, todo, req, pass),
            },
        );
    }

    /// Pass a trim or zero down at once if it touches no protected byte,
    /// otherwise once its protected bytes are seen to be zero.
    fn range_async(&self, next: &Next, req: RangeRequest, pass: fn(&Next, RangeRequest)) {
        let mut todo = Protect::pieces(&self.ranges, req.count(), req.offset());
        todo.reverse();
        Guarded::check_async(self.ranges.clone(), next, todo, req, pass)
    }
}

fn zeroes(_offset: u64, found: &[u8]) -> bool {
    found.iter().all(|&b| b == 0)
}

#[callbacks]
impl FilterHandle for Guarded {
    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.check(next, buf.len() as u64, offset, |at, found| {
            let i = (at - offset) as usize;
            buf[i..i + found.len()] == *found
        })?;
        next.pwrite(buf, offset, flags)
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check(next, count, offset, zeroes)?;
        next.trim(count, offset, flags)
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.check(next, count, offset, zeroes)?;
        next.zero(count, offset, flags)
    }

    fn async_pwrite(&self, next: &Next, req: WriteRequest) {
        let mut todo = Protect::pieces(&self.ranges, req.len() as u64, req.offset());
        todo.reverse();
        Guarded::check_async(self.ranges.clone(), next, todo, req, |next, req| {
            next.async_pwrite(req)
        })
    }

    fn async_trim(&self, next: &Next, req: RangeRequest) {
        self.range_async(next, req, |next, req| next.async_trim(req))
    }

    fn async_zero(&self, next: &Next, req: RangeRequest) {
        self.range_async(next, req, |next, req| next.async_zero(req))
    }
}

nbdhost_filter!(Protect);

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(values: &[&str]) -> Vec<(u64, u64)> {
        let all = values
            .iter()
            .flat_map(|v| parse_range(v).unwrap())
            .collect();
        merge(all).iter().map(|r| (r.start, r.end)).collect()
    }

    #[test]
    fn numbers_are_decimal_octal_or_hexadecimal() {
        assert_eq!(spans(&["10-0x1f"]), [(10, 31)]);
        assert_eq!(spans(&["010-0X10"]), [(8, 16)]);
        assert_eq!(spans(&["0-0"]), [(0, 0)]);
        assert!(parse_range("1K-2K").is_err());
        assert!(parse_range("08-9").is_err());
        assert!(parse_range("-1-2").is_err());
    }

    #[test]
    fn open_ends_reach_the_start_and_the_largest_size() {
        assert_eq!(spans(&["-100"]), [(0, 100)]);
        assert_eq!(spans(&["100-"]), [(100, OPEN_END)]);
        assert_eq!(spans(&["-"]), [(0, OPEN_END)]);
    }

    #[test]
    fn a_complement_protects_both_sides() {
        assert_eq!(spans(&["~10-19"]), [(0, 9), (20, OPEN_END)]);
        assert_eq!(spans(&["~0-19"]), [(20, OPEN_END)]);
        assert_eq!(spans(&["~-"]), []);
    }

    #[test]
    fn overlapping_and_touching_ranges_join() {
        assert_eq!(
            spans(&["20-29", "0-9", "10-12", "25-40"]),
            [(0, 12), (20, 40)]
        );
    }

    #[test]
    fn bad_ranges_are_refused() {
        assert!(parse_range("100").is_err());
        assert!(parse_range("20-10").is_err());
        assert!(parse_range("x-10").is_err());
    }

    #[test]
    fn a_request_sees_only_its_protected_bytes_in_bounded_pieces() {
        let r = merge(parse_range("100-199").unwrap());
        let p = |count, offset| -> Vec<(u64, u64)> {
            Protect::pieces(&r, count, offset)
                .iter()
                .map(|p| (p.offset, p.len))
                .collect()
        };
        assert_eq!(p(100, 0), []);
        assert_eq!(p(101, 0), [(100, 1)]);
        assert_eq!(p(1000, 150), [(150, 50)]);
        assert_eq!(p(0, 150), []);
        let big = merge(parse_range("0-").unwrap());
        assert_eq!(
            Protect::pieces(&big, 3 * CHUNK, 5).len(),
            3,
            "{CHUNK}-byte pieces"
        );
    }
}
