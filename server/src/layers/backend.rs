//! The one interface every link of the chain presents: the protocol code
//! talks to the top of the chain through [`Backend`] and [`Handle`] and never
//! knows whether a filter or the plugin is below it. The connection a call
//! is made for is passed to it: to the calls made before there is a
//! handle, and to `open`, whose handle keeps it.

use std::sync::Arc;

use nbdhost_plugin_api::{Error, Flags, Result, Support, ThreadModel};

use super::connection::Connection;
use super::extents::ExtentCollector;
use super::inflight::{self, Token};
use crate::protocol::export::{ExportEntry, Extent};

/// A link of the chain, not opened: global operations, and the calls a
/// connection makes before it has a handle.
pub trait Backend: Send + Sync {
    /// Short name, for logs.
    fn name(&self) -> &str;
    /// Concurrency allowed by this link and everything below it.
    fn thread_model(&self) -> ThreadModel;
    /// Whether no call into this link or below it ever waits, so calls may
    /// run on an event loop.
    fn nonblocking(&self) -> bool;
    /// The server is serving, in the background if it went there: the
    /// plugin first, then each filter up the chain.
    fn after_fork(&self) -> Result<()>;
    /// A client connected; an error refuses it.
    fn preconnect(&self, conn: &Arc<Connection>, readonly: bool) -> Result<()>;
    /// The exports to list to the client of `conn`.
    fn list_exports(
        &self,
        conn: &Arc<Connection>,
        readonly: bool,
        is_tls: bool,
    ) -> Result<Vec<ExportEntry>>;
    /// The name the empty export name stands for.
    fn default_export(
        &self,
        conn: &Arc<Connection>,
        readonly: bool,
        is_tls: bool,
    ) -> Result<String>;
    /// Open a handle for `conn`, under its export name. The handle keeps
    /// `conn`: every call on it is made for that connection.
    fn open(&self, conn: Arc<Connection>, readonly: bool) -> Result<Box<dyn Handle>>;
}

/// A link of the chain opened for one connection. Dropping it closes it.
pub trait Handle: Send + Sync {
    fn get_size(&self) -> Result<u64>;
    /// `(minimum, preferred, maximum)`, or `None` for no constraints.
    fn block_size(&self) -> Result<Option<(u32, u32, u32)>>;
    fn can_write(&self) -> Result<bool>;
    fn can_flush(&self) -> Result<bool>;
    fn can_trim(&self) -> Result<bool>;
    fn can_zero(&self) -> Result<bool>;
    fn can_fast_zero(&self) -> Result<bool>;
    fn can_fua(&self) -> Result<Support>;
    fn can_multi_conn(&self) -> Result<bool>;
    fn can_cache(&self) -> Result<Support>;
    fn can_extents(&self) -> Result<bool>;
    fn is_rotational(&self) -> Result<bool>;
    fn export_description(&self) -> Result<Option<String>>;
    fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()>;
    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()>;
    fn flush(&self, flags: Flags) -> Result<()>;
    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()>;
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()>;
    /// Extents covering at least the first byte of the range, in order.
    fn extents(&self, count: u64, offset: u64, flags: Flags) -> Result<Vec<Extent>>;
    fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()>;
    /// The local file whose bytes this handle serves, if any.
    fn local_file(&self) -> Result<Option<std::path::PathBuf>>;
    /// The connection is ending: each filter writes back what it kept for
    /// it, top layer first, while every layer is still open.
    fn finalize(&self) -> Result<()>;

    /// Whether this layer starts requests asynchronously (ABI 1.9): the
    /// request path then starts them with [`Handle::start`] and answers
    /// them when they complete, instead of waiting for each.
    fn is_async(&self) -> bool {
        false
    }

    /// Start `op`, whose result completes `token` exactly once, here or
    /// later from any thread; `op`'s buffers stay valid until then. A
    /// layer without an asynchronous path runs the request here.
    fn start(&self, op: AsyncOp, token: Token) {
        let r = run_sync(self, &op);
        inflight::complete(token, r, "server");
    }
}

/// A request on the asynchronous path, with what it was lent: buffers
/// and an extents list that stay valid until its token completes.
#[derive(Debug, Clone, Copy)]
pub enum AsyncOp {
    Read {
        buf: *mut u8,
        len: usize,
        offset: u64,
        flags: Flags,
    },
    Write {
        buf: *const u8,
        len: usize,
        offset: u64,
        flags: Flags,
    },
    Flush {
        flags: Flags,
    },
    Trim {
        count: u64,
        offset: u64,
        flags: Flags,
    },
    Zero {
        count: u64,
        offset: u64,
        flags: Flags,
    },
    Cache {
        count: u64,
        offset: u64,
        flags: Flags,
    },
    Extents {
        count: u64,
        offset: u64,
        flags: Flags,
        list: *mut ExtentCollector,
    },
}

// SAFETY: what an AsyncOp points at belongs to its request alone until the
// request completes, on whichever thread that happens.
unsafe impl Send for AsyncOp {}

/// Run `op` on `h` synchronously, filling its buffer or list.
pub fn run_sync<H: Handle + ?Sized>(h: &H, op: &AsyncOp) -> Result<()> {
    match *op {
        AsyncOp::Read {
            buf,
            len,
            offset,
            flags,
        } => {
            // SAFETY: the op's buffer is writable for `len` bytes until its
            // request completes, which this call does first.
            let buf = unsafe { std::slice::from_raw_parts_mut(buf, len) };
            h.pread(buf, offset, flags)
        }
        AsyncOp::Write {
            buf,
            len,
            offset,
            flags,
        } => {
            // SAFETY: as above, readable.
            let buf = unsafe { std::slice::from_raw_parts(buf, len) };
            h.pwrite(buf, offset, flags)
        }
        AsyncOp::Flush { flags } => h.flush(flags),
        AsyncOp::Trim {
            count,
            offset,
            flags,
        } => h.trim(count, offset, flags),
        AsyncOp::Zero {
            count,
            offset,
            flags,
        } => h.zero(count, offset, flags),
        AsyncOp::Cache {
            count,
            offset,
            flags,
        } => h.cache(count, offset, flags),
        AsyncOp::Extents {
            count,
            offset,
            flags,
            list,
        } => {
            // SAFETY: the op's list lives until its request completes.
            let list = unsafe { &mut *list };
            for e in h.extents(count, offset, flags)? {
                list.add(e.offset, e.length, e.flags)?;
            }
            Ok(())
        }
    }
}

/// Check the block-size constraints a plugin or filter reported, as the
/// NBD spec bounds them; all three zero means "no constraints".
pub fn checked_block_size(
    layer: &str,
    min: u32,
    pref: u32,
    max: u32,
) -> Result<Option<(u32, u32, u32)>> {
    if min == 0 && pref == 0 && max == 0 {
        return Ok(None);
    }
    let pow2 = |v: u32| v.is_power_of_two();
    if !pow2(min)
        || min > 65536
        || !pow2(pref)
        || pref < min
        || pref > 32 << 20
        || max < pref && max != u32::MAX
    {
        return Err(Error::new(
            libc::EINVAL,
            format!("{layer}: invalid block size constraints {min}/{pref}/{max}"),
        ));
    }
    Ok(Some((min, pref, max)))
}

/// Zero a range by writing zeroes, for a layer that cannot zero natively.
/// A fast-zero request fails at once instead, as the flag asks.
pub fn write_zeroes(h: &dyn Handle, mut count: u64, mut offset: u64, flags: Flags) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    if flags.contains(Flags::FAST_ZERO) {
        return Err(Error::errno(libc::ENOTSUP));
    }
    let buf = vec![0u8; CHUNK.min(count) as usize];
    while count > 0 {
        let n = CHUNK.min(count);
        // FUA on the last chunk covers the whole request.
        let last = if n == count {
            flags & Flags::FUA
        } else {
            Flags::empty()
        };
        h.pwrite(&buf[..n as usize], offset, last)?;
        count -= n;
        offset += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::checked_block_size;

    #[test]
    fn block_sizes_are_held_to_the_spec() {
        assert_eq!(checked_block_size("p", 0, 0, 0), Ok(None));
        assert_eq!(
            checked_block_size("p", 512, 4096, u32::MAX),
            Ok(Some((512, 4096, u32::MAX)))
        );
        for (min, pref, max) in [
            (3, 4096, 8192),
            (1 << 17, 1 << 17, 1 << 20),
            (4096, 512, 8192),
            (512, 64 << 20, u32::MAX),
            (512, 4096, 1024),
        ] {
            let e = checked_block_size("f", min, pref, max).unwrap_err();
            assert!(e.message().unwrap().starts_with("f: invalid block size"));
        }
    }
}
