//! The truncate filter: change the size of the layer below. Bytes past
//! its real end read as zeroes and may only be "written" with zeroes;
//! bytes cut off the end cannot be reached at all.

#![forbid(unsafe_code)]

use std::sync::OnceLock;

use nbdhost_plugin_api::{
    abi, callbacks, host, nbdhost_filter, Error, ExtentList, Filter, FilterHandle, Flags, Next,
    NextOpener, RangeRequest, ReadRequest, Result, WriteRequest,
};

/// Configured size changes, applied in this order: `truncate`, then
/// `round-up`, then `round-down` (as nbdkit does).
#[derive(Default, Clone, Copy)]
pub struct Truncate {
    size: Option<u64>,
    round_up: Option<u64>,
    round_down: Option<u64>,
}

fn power_of_two(key: &str, value: &str) -> Result<u64> {
    let n = host::parse_size(value)?;
    if n == 0 || !n.is_power_of_two() {
        return Err(Error::new(
            libc::EINVAL,
            format!("{key}={value}: must be a power of 2 greater than 0"),
        ));
    }
    Ok(n)
}

impl Truncate {
    /// The size to export for an underlying disk of `real` bytes.
    fn apply(&self, real: u64) -> Result<u64> {
        let mut size = self.size.unwrap_or(real);
        if let Some(n) = self.round_up {
            size = size
                .checked_next_multiple_of(n)
                .filter(|s| i64::try_from(*s).is_ok())
                .ok_or_else(|| {
                    Error::new(
                        libc::EINVAL,
                        format!("cannot round size {size} up to a multiple of {n}"),
                    )
                })?;
        }
        if let Some(n) = self.round_down {
            size -= size % n;
        }
        Ok(size)
    }
}

#[callbacks]
impl Filter for Truncate {
    const NAME: &'static str = "truncate";
    const DESCRIPTION: &'static str = "change the size of the underlying disk";
    const CONFIG_HELP: &'static str = "truncate=<SIZE>  The new size.
round-up=<N>     Round the size up to a multiple of N (a power of 2).
round-down=<N>   Round the size down to a multiple of N (a power of 2).";
    type Handle = Resized;

    fn nonblocking(&self) -> bool {
        true
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "truncate" => self.size = Some(host::parse_size(value)?),
            "round-up" => self.round_up = Some(power_of_two(key, value)?),
            "round-down" => self.round_down = Some(power_of_two(key, value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Resized> {
        next.open(readonly, export_name)?;
        Ok(Resized {
            config: *self,
            sizes: OnceLock::new(),
        })
    }
}

/// Real and exported size of one connection's disk.
#[derive(Clone, Copy)]
struct Sizes {
    real: u64,
    exported: u64,
}

/// One connection. Both sizes are fixed when first asked, so a disk
/// that changes size below a connection cannot move its end.
pub struct Resized {
    config: Truncate,
    sizes: OnceLock<Sizes>,
}

impl Resized {
    fn sizes(&self, next: &Next) -> Result<Sizes> {
        if let Some(s) = self.sizes.get() {
            return Ok(*s);
        }
        let real = next.get_size()?;
        let exported = self.config.apply(real)?;
        Ok(*self.sizes.get_or_init(|| Sizes { real, exported }))
    }

    /// How many of `count` bytes at `offset` lie on the real disk.
    fn below(&self, next: &Next, count: u64, offset: u64) -> Result<u64> {
        let real = self.sizes(next)?.real;
        Ok(count.min(real.saturating_sub(offset)))
    }

    /// How many bytes of a write of `buf` at `offset` go to the real
    /// disk. The rest must be zeroes: checked before anything is written,
    /// so that a refused request changes nothing.
    fn write_below(&self, next: &Next, buf: &[u8], offset: u64) -> Result<usize> {
        let n = self.below(next, buf.len() as u64, offset)? as usize;
        if buf[n..].iter().any(|&b| b != 0) {
            return Err(Error::new(
                libc::ENOSPC,
                format!(
                    "write beyond the end of the underlying disk ({} bytes)",
                    self.sizes(next)?.real
                ),
            ));
        }
        Ok(n)
    }

    /// How many bytes of a zero request go to the real disk.
    fn zero_below(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<u64> {
        let n = self.below(next, count, offset)?;
        // We advertise fast zero whatever the disk below can do.
        if n > 0 && flags.contains(Flags::FAST_ZERO) && !next.can_fast_zero()? {
            return Err(Error::errno(libc::ENOTSUP));
        }
        Ok(n)
    }

    /// Pass a trim, zero or cache down for its part on the real disk
    /// (`below`), answering at once when there is none.
    fn range_down(
        next: &Next,
        mut req: RangeRequest,
        below: Result<u64>,
        start: fn(&Next, RangeRequest),
    ) {
        match below {
            Err(e) => req.complete(Err(e)),
            Ok(0) => req.complete(Ok(())),
            Ok(n) => {
                req.truncate(n);
                start(next, req)
            }
        }
    }
}

#[callbacks]
impl FilterHandle for Resized {
    fn get_size(&self, next: &Next) -> Result<u64> {
        Ok(self.sizes(next)?.exported)
    }

    fn can_extents(&self, next: &Next) -> Result<bool> {
        // The zero tail is always known; still ask below, so that a layer
        // that fails here fails now rather than on the first request.
        next.can_extents()?;
        Ok(true)
    }

    fn can_fast_zero(&self, next: &Next) -> Result<bool> {
        // Zeroing the tail costs nothing; a fast zero that reaches the
        // real disk is refused there if that disk cannot do it.
        next.can_fast_zero()?;
        Ok(true)
    }

    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let n = self.below(next, buf.len() as u64, offset)? as usize;
        let (head, tail) = buf.split_at_mut(n);
        if !head.is_empty() {
            next.pread(head, offset, flags)?;
        }
        tail.fill(0);
        Ok(())
    }

    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        match self.write_below(next, buf, offset)? {
            0 => Ok(()),
            n => next.pwrite(&buf[..n], offset, flags),
        }
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match self.below(next, count, offset)? {
            0 => Ok(()),
            n => next.trim(n, offset, flags),
        }
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match self.zero_below(next, count, offset, flags)? {
            0 => Ok(()),
            n => next.zero(n, offset, flags),
        }
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        match self.below(next, count, offset)? {
            0 => Ok(()),
            n => next.cache(n, offset, flags),
        }
    }

    // On an asynchronous chain a request goes down cut to the real disk;
    // a read's part past it is zeroed first, here.
    fn async_pread(&self, next: &Next, mut req: ReadRequest) {
        let n = match self.below(next, req.len() as u64, req.offset()) {
            Ok(n) => n as usize,
            Err(e) => return req.complete(Err(e)),
        };
        req.buf()[n..].fill(0);
        if n == 0 {
            return req.complete(Ok(()));
        }
        req.truncate(n);
        next.async_pread(req)
    }

    fn async_pwrite(&self, next: &Next, mut req: WriteRequest) {
        match self.write_below(next, req.buf(), req.offset()) {
            Err(e) => req.complete(Err(e)),
            Ok(0) => req.complete(Ok(())),
            Ok(n) => {
                req.truncate(n);
                next.async_pwrite(req)
            }
        }
    }

    fn async_trim(&self, next: &Next, req: RangeRequest) {
        let below = self.below(next, req.count(), req.offset());
        Resized::range_down(next, req, below, Next::async_trim)
    }

    fn async_zero(&self, next: &Next, req: RangeRequest) {
        let below = self.zero_below(next, req.count(), req.offset(), req.flags());
        Resized::range_down(next, req, below, Next::async_zero)
    }

    fn async_cache(&self, next: &Next, req: RangeRequest) {
        let below = self.below(next, req.count(), req.offset());
        Resized::range_down(next, req, below, Next::async_cache)
    }

    fn extents(
        &self,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
        let Sizes { real, exported } = self.sizes(next)?;
        let tail = abi::EXTENT_HOLE | abi::EXTENT_ZERO;
        let end = offset.saturating_add(count).min(exported);
        if offset >= real {
            return list.add(offset, end - offset, tail);
        }
        let n = count.min(real - offset);
        let mut reached = offset;
        for (o, len, typ) in next.extents(n, offset, flags)? {
            // A layer may describe more than it was asked; nothing past
            // its real end is data.
            let stop = (o + len).min(real);
            if stop <= reached {
                continue;
            }
            list.add(o, stop - o, typ)?;
            reached = stop;
        }
        if reached == real && end > real && !flags.contains(Flags::REQ_ONE) {
            list.add(real, end - real, tail)?;
        }
        Ok(())
    }
}

nbdhost_filter!(Truncate);

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(size: Option<u64>, up: Option<u64>, down: Option<u64>) -> Truncate {
        Truncate {
            size,
            round_up: up,
            round_down: down,
        }
    }

    #[test]
    fn sizes_apply_in_nbdkit_order() {
        assert_eq!(cfg(None, None, None).apply(1000).unwrap(), 1000);
        assert_eq!(cfg(Some(5000), None, None).apply(1000).unwrap(), 5000);
        assert_eq!(cfg(Some(10), None, None).apply(1000).unwrap(), 10);
        assert_eq!(cfg(None, Some(512), None).apply(1000).unwrap(), 1024);
        assert_eq!(cfg(None, Some(512), None).apply(1024).unwrap(), 1024);
        assert_eq!(cfg(None, None, Some(512)).apply(1000).unwrap(), 512);
        assert_eq!(cfg(None, None, Some(512)).apply(100).unwrap(), 0);
        // truncate first, then rounding.
        assert_eq!(cfg(Some(3000), Some(1024), Some(4096)).apply(1).unwrap(), 0);
        assert_eq!(cfg(Some(3000), Some(4096), None).apply(1).unwrap(), 4096);
    }

    #[test]
    fn rounding_up_past_the_largest_size_fails() {
        assert!(cfg(Some(u64::MAX - 10), Some(1024), None).apply(0).is_err());
        assert!(cfg(Some(i64::MAX as u64), Some(2), None).apply(0).is_err());
    }
}
