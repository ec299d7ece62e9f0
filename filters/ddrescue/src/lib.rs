//! The ddrescue filter: serve a disk image recovered by GNU ddrescue as
//! the broken disk it came from. Reads of what its mapfile does not call
//! rescued (`+`) fail with `EIO`, so that tools run on the image meet the
//! bad sectors where they were.

#![forbid(unsafe_code)]

use std::sync::Arc;

use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, Error, Filter, FilterHandle, Flags, Next, NextOpener,
    ReadRequest, Result, Support,
};

/// A number as C's `%i` reads it, after any blanks: an optional sign,
/// then hexadecimal after `0x`, octal after `0`, decimal otherwise.
/// Returns it and the rest of the text.
fn c_integer(text: &str) -> Option<(i64, &str)> {
    let t = text.trim_start();
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) if h.starts_with(|c: char| c.is_ascii_hexdigit()) => (16, h),
        _ if t.starts_with('0') => (8, t),
        _ => (10, t),
    };
    let end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    if end == 0 {
        return None;
    }
    let n = i64::from_str_radix(&digits[..end], radix).ok()?;
    Some((if negative { -n } else { n }, &digits[end..]))
}

/// One block line, `POS SIZE STATUS`; `None` for a line that is not one
/// (which the mapfile format allows, and nbdkit skips).
fn block(line: &str) -> Option<(i64, i64, char)> {
    let (pos, rest) = c_integer(line)?;
    let (size, rest) = c_integer(rest)?;
    let status = rest.trim_start().chars().next()?;
    Some((pos, size, status))
}

/// The rescued areas of a mapfile as sorted, joined `(start, end)` pairs,
/// `end` excluded.
fn rescued(text: &str, name: &str) -> Result<Vec<(u64, u64)>> {
    let mut lines = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .skip_while(|l| l.is_empty());
    // The first line is ddrescue's own state (current position, phase).
    lines.next();
    let mut areas = Vec::new();
    for line in lines {
        let Some((pos, size, status)) = block(line) else {
            continue;
        };
        if pos < 0 || size < 0 {
            return Err(Error::new(
                libc::EINVAL,
                format!("{name}: block offset and length must not be negative: {line}"),
            ));
        }
        if status == '+' && size > 0 {
            let (pos, size) = (pos as u64, size as u64);
            areas.push((pos, pos.saturating_add(size)));
        }
    }
    areas.sort_unstable();
    let mut joined: Vec<(u64, u64)> = Vec::with_capacity(areas.len());
    for (start, end) in areas {
        match joined.last_mut() {
            Some(last) if last.1 >= start => last.1 = last.1.max(end),
            _ => joined.push((start, end)),
        }
    }
    Ok(joined)
}

/// Whether `count` bytes at `offset` lie wholly in one rescued area.
fn readable(areas: &[(u64, u64)], count: u64, offset: u64) -> bool {
    let i = areas.partition_point(|a| a.1 <= offset);
    areas
        .get(i)
        .is_some_and(|&(start, end)| start <= offset && offset.saturating_add(count) <= end)
}

fn bad_area(count: u64, offset: u64) -> Error {
    host::debug(&format!(
        "ddrescue: read of {count} bytes at {offset:#x} meets an area not rescued"
    ));
    Error::errno(libc::EIO)
}

/// The rescued areas of the configured mapfile.
#[derive(Default)]
pub struct Ddrescue {
    areas: Option<Arc<Vec<(u64, u64)>>>,
}

#[callbacks]
impl Filter for Ddrescue {
    const NAME: &'static str = "ddrescue";
    const DESCRIPTION: &'static str = "fail reads of the areas a ddrescue mapfile calls bad";
    const CONFIG_HELP: &'static str = "ddrescue-mapfile=...     Specify ddrescue mapfile to use";
    type Handle = Rescued;

    fn nonblocking(&self) -> bool {
        true
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        if key != "ddrescue-mapfile" {
            return Ok(false);
        }
        let text = std::fs::read_to_string(value).map_err(|e| {
            Error::new(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("{value}: ddrescue: {e}"),
            )
        })?;
        self.areas = Some(Arc::new(rescued(&text, value)?));
        Ok(true)
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Rescued> {
        next.open(readonly, export_name)?;
        Ok(Rescued {
            areas: self.areas.clone().unwrap_or_default(),
        })
    }
}

/// One connection, sharing the filter's areas.
pub struct Rescued {
    areas: Arc<Vec<(u64, u64)>>,
}

#[callbacks]
impl FilterHandle for Rescued {
    fn can_write(&self, _next: &Next) -> Result<bool> {
        Ok(false)
    }

    fn can_cache(&self, _next: &Next) -> Result<Support> {
        Ok(Support::None)
    }

    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let count = buf.len() as u64;
        if !readable(&self.areas, count, offset) {
            return Err(bad_area(count, offset));
        }
        next.pread(buf, offset, flags)
    }

    fn async_pread(&self, next: &Next, req: ReadRequest) {
        let (count, offset) = (req.len() as u64, req.offset());
        if readable(&self.areas, count, offset) {
            next.async_pread(req)
        } else {
            req.complete(Err(bad_area(count, offset)))
        }
    }
}

nbdhost_filter!(Ddrescue);

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "# Mapfile. Created by GNU ddrescue version 1.27
# Command line: ddrescue /dev/sdb disk.img disk.map
# current_pos  current_status  current_pass
0x00000000     +               1
#      pos        size  status
0x00000000  0x00000200  +
0x00000200  0x00000200  -
0x00000400  0x00000200  +
0x00000600  0x00000200  /
0x00000800  0x00000200  +
0x00000A00  0x00000200  +
";

    #[test]
    fn only_rescued_blocks_count_and_touching_ones_join() {
        assert_eq!(
            rescued(MAP, "t").unwrap(),
            [(0, 0x200), (0x400, 0x600), (0x800, 0xc00)]
        );
    }

    #[test]
    fn the_status_line_is_not_a_block() {
        assert_eq!(rescued("0 1000 +\n", "t").unwrap(), []);
        assert_eq!(rescued("\n0 +\n0 512 +\n", "t").unwrap(), [(0, 512)]);
    }

    #[test]
    fn numbers_are_read_as_c_does() {
        assert_eq!(block("010 0x10\t+"), Some((8, 16, '+')));
        assert_eq!(block("  512 1024 -"), Some((512, 1024, '-')));
        assert_eq!(block("512 1024"), None);
        assert_eq!(block("garbage"), None);
        assert!(rescued("0 +\n-1 5 +\n", "t").is_err());
    }

    #[test]
    fn a_read_must_lie_wholly_in_one_rescued_area() {
        let areas = rescued(MAP, "t").unwrap();
        assert!(readable(&areas, 512, 0));
        assert!(!readable(&areas, 513, 0));
        assert!(!readable(&areas, 512, 0x200));
        assert!(readable(&areas, 1024, 0x800));
        assert!(!readable(&areas, 512, 0xc00));
    }
}
