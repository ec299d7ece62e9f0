//! Running a session's work on the layer chain: handshake queries
//! (preconnect, list, open), transmission requests, and closing the handle.
//! Every call is made for its connection, passed to the chain as a value
//! (the opened handle keeps it), and a panic below costs only the call
//! that raised it.

use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use nbdhost_plugin_api::{Error, Flags, Result, Support};

use super::backend::{write_zeroes, Backend, Handle};
use super::connection::Connection;
use crate::protocol::export::{ExportInfo, ExportPolicy, Extent, MAX_PAYLOAD};
use crate::protocol::handshake::{Answer, Query};
use crate::protocol::request::Command;
use crate::protocol::wire::{errno_to_nbd, EIO};
use crate::session::buffers::PooledBuf;
use crate::session::{Outcome, Request};

/// A connection's open export: the top handle of its chain and the
/// connection it was opened for.
pub struct Opened {
    handle: Box<dyn Handle>,
    conn: Arc<Connection>,
    /// Whether block status asks the chain or reports all data.
    can_extents: bool,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened").field("conn", &self.conn).finish()
    }
}

impl Opened {
    /// What a layer asked with `host->disconnect` since the last look:
    /// `Some(true)` to close at once, `Some(false)` once the running
    /// requests are answered.
    pub fn take_disconnect(&self) -> Option<bool> {
        self.conn.take_disconnect()
    }
}

/// Ask an opened handle everything negotiation needs.
fn describe(name: &str, h: &dyn Handle, policy: ExportPolicy) -> Result<ExportInfo> {
    let (min, pref, max) = h.block_size()?.unwrap_or((1, 4096, MAX_PAYLOAD));
    let writable = !policy.readonly && h.can_write()?;
    Ok(ExportInfo {
        name: name.to_string(),
        description: h.export_description()?,
        size: h.get_size()?,
        min_block: min,
        preferred_block: pref.max(min),
        max_block: max.min(MAX_PAYLOAD).max(pref.max(min)),
        readonly: !writable,
        can_flush: h.can_flush()?,
        can_fua: writable && h.can_fua()? != Support::None,
        can_trim: writable && h.can_trim()?,
        can_zero: writable && h.can_zero()?,
        can_fast_zero: writable && h.can_zero()? && h.can_fast_zero()?,
        can_multi_conn: !policy.no_multi_conn && h.can_multi_conn()?,
        can_cache: h.can_cache()? != Support::None,
        can_extents: h.can_extents()?,
        rotational: h.is_rotational()?,
    })
}

/// Answer a handshake query for the connection `client` (its export name
/// still empty: an open resolves one). For an open that is kept for
/// transmission, the opened export comes back too. With `preconnect`, an
/// open first asks the chain's `preconnect`, for a chain that could not be
/// asked when the client connected.
pub fn query(
    backend: &dyn Backend,
    q: Query,
    preconnect: bool,
    client: Arc<Connection>,
    policy: ExportPolicy,
) -> (Answer, Option<Opened>) {
    let failed = |q: &Query| match q {
        Query::Preconnect => Answer::Preconnect(Err("internal error".into())),
        Query::List => Answer::List(Err("internal error".into())),
        Query::Open { .. } => Answer::Open(Err((libc::EIO, "internal error".into()))),
    };
    let fallback = failed(&q);
    catch_unwind(AssertUnwindSafe(|| {
        run_query(backend, q, preconnect, client, policy)
    }))
    .unwrap_or_else(|_| {
        log::error!("{}: a handshake query panicked", backend.name());
        (fallback, None)
    })
}

fn run_query(
    backend: &dyn Backend,
    q: Query,
    preconnect: bool,
    client: Arc<Connection>,
    policy: ExportPolicy,
) -> (Answer, Option<Opened>) {
    let readonly = policy.readonly;
    let tls = client.is_tls;
    let msg = |e: Error| e.to_string();
    match q {
        Query::Preconnect => {
            let r = backend.preconnect(&client, readonly).map_err(msg);
            (Answer::Preconnect(r), None)
        }
        Query::List => {
            let r = backend.list_exports(&client, readonly, tls).map_err(msg);
            (Answer::List(r), None)
        }
        Query::Open { name, keep } => {
            if preconnect {
                if let Err(e) = backend.preconnect(&client, readonly) {
                    log::warn!("{}: client refused: {e}", backend.name());
                    return (Answer::Open(Err((libc::EPERM, e.to_string()))), None);
                }
            }
            let resolved = if name.is_empty() {
                backend.default_export(&client, readonly, tls)
            } else {
                Ok(name)
            };
            let opened = resolved.and_then(|name| {
                let export = CString::new(name.clone())
                    .map_err(|_| Error::new(libc::EINVAL, "NUL in export name"))?;
                let conn = client.renamed(export);
                let h = backend.open(conn.clone(), readonly)?;
                let info = describe(&name, &*h, policy)?;
                Ok((h, conn, info))
            });
            match opened {
                Ok((handle, conn, info)) => {
                    let opened = Opened {
                        handle,
                        conn,
                        can_extents: info.can_extents,
                    };
                    if keep {
                        (Answer::Open(Ok(info)), Some(opened))
                    } else {
                        close(opened);
                        (Answer::Open(Ok(info)), None)
                    }
                }
                Err(e) => {
                    log::warn!("{}: cannot open export: {e}", backend.name());
                    (Answer::Open(Err((e.raw_errno(), e.to_string()))), None)
                }
            }
        }
    }
}

/// Close an opened export: each layer finalizes, then closes, for the
/// connection its handle was opened for.
pub fn close(opened: Opened) {
    let Opened { handle, .. } = opened;
    let r = catch_unwind(AssertUnwindSafe(|| {
        if let Err(e) = handle.finalize() {
            log::error!("finalize: {e}");
        }
        drop(handle)
    }));
    if r.is_err() {
        log::error!("closing a handle panicked");
    }
}

/// Run one request on `opened`, for the connection its handle was opened
/// for (each layer's handle keeps its own). A read fills `buf`, which the
/// caller supplies with the read's length. `layer` names the top of the
/// chain in log lines.
pub fn request(opened: &Opened, req: &Request, buf: Option<PooledBuf>, layer: &str) -> Outcome {
    let run = || perform(opened, req, buf, layer);
    catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|_| {
        log::error!("{layer}: {} request panicked", req.op().command.name());
        Outcome::Failed(EIO)
    })
}

fn perform(opened: &Opened, req: &Request, buf: Option<PooledBuf>, layer: &str) -> Outcome {
    let h = &*opened.handle;
    let op = req.op();
    let off = op.offset;
    let fua = |on: bool| if on { Flags::FUA } else { Flags::empty() };
    let r: Result<Outcome> = match &op.command {
        Command::Read { len, .. } => match buf {
            Some(mut buf) if buf.len() == *len as usize => h
                .pread(buf.as_mut_slice(), off, Flags::empty())
                .map(|()| Outcome::Data(buf)),
            _ => Err(Error::new(libc::EIO, "internal error: no read buffer")),
        },
        Command::Write { data, fua: f } => h.pwrite(data, off, fua(*f)).map(|()| Outcome::Done),
        Command::Flush => h.flush(Flags::empty()).map(|()| Outcome::Done),
        Command::Trim { len, fua: f } => h.trim(*len, off, fua(*f)).map(|()| Outcome::Done),
        Command::Zero {
            len,
            fua: f,
            may_trim,
            fast,
        } => {
            let mut flags = fua(*f);
            flags.set(Flags::MAY_TRIM, *may_trim);
            flags.set(Flags::FAST_ZERO, *fast);
            // A filter may refuse to zero as well; the protocol only lets a
            // fast-zero request fail that way, so write zeroes through it.
            match h.zero(*len, off, flags) {
                Err(e) if e.raw_errno() == libc::ENOTSUP => write_zeroes(h, *len, off, flags),
                r => r,
            }
            .map(|()| Outcome::Done)
        }
        Command::Cache { len } => h.cache(*len, off, Flags::empty()).map(|()| Outcome::Done),
        Command::BlockStatus { len, req_one } => {
            let flags = if *req_one {
                Flags::REQ_ONE
            } else {
                Flags::empty()
            };
            if opened.can_extents {
                h.extents(*len, off, flags).map(Outcome::Extents)
            } else {
                Ok(Outcome::Extents(vec![Extent {
                    offset: off,
                    length: *len,
                    flags: 0,
                }]))
            }
        }
    };
    r.unwrap_or_else(|e| {
        if let Some(m) = e.message() {
            log::error!("{layer}: {} at offset {off}: {m}", op.command.name());
        }
        Outcome::Failed(errno_to_nbd(e.raw_errno()))
    })
}
