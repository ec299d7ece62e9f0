//! The tls-fallback filter: a client without TLS gets one read-only
//! export of 512 bytes holding a message, whatever it asks for; a client
//! with TLS gets the layer below.

#![forbid(unsafe_code)]

use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, BlockSize, Error, ExportList, Filter, FilterHandle, Next,
    NextExports, NextOpener, ReadRequest, Result, Support,
};

/// The size of the plain clients' export.
const README_SIZE: usize = 512;

const DEFAULT_README: &str =
    "This NBD server requires TLS authentication before it will serve useful data.\n";

/// `text` cut to 512 bytes or padded to them with NULs, as nbdkit's
/// `strncpy` into its buffer does.
fn readme(text: &str) -> Box<[u8; README_SIZE]> {
    let mut b = Box::new([0u8; README_SIZE]);
    let n = text.len().min(README_SIZE);
    b[..n].copy_from_slice(&text.as_bytes()[..n]);
    b
}

/// The message plain clients read.
pub struct TlsFallback {
    readme: Box<[u8; README_SIZE]>,
}

impl Default for TlsFallback {
    fn default() -> TlsFallback {
        TlsFallback {
            readme: readme(DEFAULT_README),
        }
    }
}

#[callbacks]
impl Filter for TlsFallback {
    const NAME: &'static str = "tls-fallback";
    const DESCRIPTION: &'static str = "serve a message instead of the disk to clients without TLS";
    const CONFIG_HELP: &'static str =
        "tlsreadme=<MESSAGE>  Alternative contents for the plaintext dummy export.";
    type Handle = Served;

    fn nonblocking(&self) -> bool {
        true
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        if key != "tlsreadme" {
            return Ok(false);
        }
        self.readme = readme(value);
        Ok(true)
    }

    fn list_exports(
        &self,
        next: &NextExports,
        readonly: bool,
        is_tls: bool,
        exports: &mut ExportList,
    ) -> Result<()> {
        if is_tls {
            next.list_exports_into(readonly, is_tls, exports)
        } else {
            exports.add("", None)
        }
    }

    fn default_export(&self, next: &NextExports, readonly: bool, is_tls: bool) -> Result<String> {
        if is_tls {
            next.default_export(readonly, is_tls)
        } else {
            Ok(String::new())
        }
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Served> {
        if host::is_tls() {
            next.open(readonly, export_name)?;
            return Ok(Served::Below);
        }
        // The ABI requires the layer below to be opened; it is opened
        // read-only on its default export, whatever name the client gave,
        // and nothing of a plain client's reaches it after that.
        next.open(true, "")?;
        Ok(Served::Readme(self.readme.clone()))
    }
}

/// What one connection is served.
pub enum Served {
    /// TLS: the layer below, unchanged.
    Below,
    /// No TLS: the message, and nothing else.
    Readme(Box<[u8; README_SIZE]>),
}

/// A read past the 512 bytes, which the server's own bounds checks keep
/// from happening.
fn out_of_range() -> Error {
    Error::new(libc::EINVAL, "read beyond the end of the plaintext export")
}

fn copy_readme(readme: &[u8; README_SIZE], buf: &mut [u8], offset: u64) -> Result<()> {
    let start = usize::try_from(offset).map_err(|_| out_of_range())?;
    let src = start
        .checked_add(buf.len())
        .and_then(|end| readme.get(start..end))
        .ok_or_else(out_of_range)?;
    buf.copy_from_slice(src);
    Ok(())
}

macro_rules! plain_or_below {
    ($name:ident, $ty:ty, $plain:expr) => {
        fn $name(&self, next: &Next) -> Result<$ty> {
            match self {
                Served::Below => next.$name(),
                Served::Readme(_) => Ok($plain),
            }
        }
    };
}

#[callbacks]
impl FilterHandle for Served {
    fn get_size(&self, next: &Next) -> Result<u64> {
        match self {
            Served::Below => next.get_size(),
            Served::Readme(_) => Ok(README_SIZE as u64),
        }
    }
    plain_or_below!(block_size, Option<BlockSize>, None);
    plain_or_below!(can_write, bool, false);
    plain_or_below!(can_flush, bool, false);
    plain_or_below!(can_trim, bool, false);
    plain_or_below!(can_zero, bool, false);
    plain_or_below!(can_fast_zero, bool, false);
    plain_or_below!(can_fua, Support, Support::None);
    plain_or_below!(can_multi_conn, bool, false);
    plain_or_below!(can_cache, Support, Support::None);
    plain_or_below!(can_extents, bool, false);
    plain_or_below!(is_rotational, bool, false);
    plain_or_below!(export_description, Option<String>, None);

    fn pread(
        &self,
        next: &Next,
        buf: &mut [u8],
        offset: u64,
        flags: nbdhost_plugin_api::Flags,
    ) -> Result<()> {
        match self {
            Served::Below => next.pread(buf, offset, flags),
            Served::Readme(r) => copy_readme(r, buf, offset),
        }
    }
    fn async_pread(&self, next: &Next, mut req: ReadRequest) {
        match self {
            Served::Below => next.async_pread(req),
            Served::Readme(r) => {
                let offset = req.offset();
                let result = copy_readme(r, req.buf(), offset);
                req.complete(result)
            }
        }
    }
}

nbdhost_filter!(TlsFallback);
