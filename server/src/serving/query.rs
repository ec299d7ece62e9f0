//! Answering a handshake query on a chain (preconnect, list, open) for
//! one connection, passed to the chain as a value; an open that is kept
//! for transmission gives the connection its [`OpenExport`].

use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use nbdhost_plugin_api::{Error, Result, Support};

use super::chain::Chain;
use super::client::Client;
use super::open::OpenExport;
use crate::layers::connection::Connection;
use crate::layers::Handle;
use crate::protocol::export::{ExportInfo, ExportPolicy, MAX_PAYLOAD};
use crate::protocol::handshake::{Answer, Query, Refusal};
use crate::session::Done;

impl From<Error> for Refusal {
    fn from(e: Error) -> Refusal {
        Refusal {
            errno: e.raw_errno(),
            message: e.to_string(),
        }
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

/// Answer a handshake query on `chain` for `client` (its export name
/// still empty: an open resolves one). An open that is kept for
/// transmission gives the open export too. With `preconnect`, an open
/// first asks the chain's `preconnect`, for a chain that could not be
/// asked when the client connected.
pub fn query(
    chain: &Arc<Chain>,
    q: Query,
    preconnect: bool,
    client: &Client,
) -> Done<Arc<OpenExport>> {
    let internal = || Refusal {
        errno: libc::EIO,
        message: "internal error".into(),
    };
    let fallback = match &q {
        Query::Preconnect => Answer::Preconnect(Err(internal())),
        Query::List => Answer::List(Err(internal())),
        Query::Open { .. } => Answer::Open(Err(internal())),
    };
    let (answer, opened) = catch_unwind(AssertUnwindSafe(|| {
        run_query(chain, q, preconnect, client.connection())
    }))
    .unwrap_or_else(|_| {
        log::error!("{}: a handshake query panicked", chain.name);
        (fallback, None)
    });
    Done::Query {
        answer,
        opened: opened.map(Arc::new),
    }
}

fn run_query(
    chain: &Arc<Chain>,
    q: Query,
    preconnect: bool,
    client: Arc<Connection>,
) -> (Answer, Option<OpenExport>) {
    let backend = &*chain.backend;
    let readonly = chain.policy.readonly;
    let tls = client.is_tls;
    match q {
        Query::Preconnect => {
            let r = backend.preconnect(&client, readonly).map_err(Refusal::from);
            (Answer::Preconnect(r), None)
        }
        Query::List => {
            let r = backend
                .list_exports(&client, readonly, tls)
                .inspect_err(|e| log::warn!("{}: cannot list exports: {e}", chain.name))
                .map_err(Refusal::from);
            (Answer::List(r), None)
        }
        Query::Open { name, keep } => {
            if preconnect {
                if let Err(e) = backend.preconnect(&client, readonly) {
                    log::warn!("{}: client refused: {e}", chain.name);
                    let refusal = Refusal {
                        errno: libc::EPERM,
                        message: e.to_string(),
                    };
                    return (Answer::Open(Err(refusal)), None);
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
                let info = describe(&name, &*h, chain.policy)?;
                Ok((h, conn, info))
            });
            match opened {
                Ok((handle, conn, mut info)) => {
                    if info.description.is_none() {
                        info.description.clone_from(&chain.description);
                    }
                    let asynchronous = handle.is_async();
                    let open = OpenExport {
                        handle,
                        conn,
                        can_extents: info.can_extents,
                        asynchronous,
                        chain: chain.clone(),
                    };
                    if keep {
                        (Answer::Open(Ok(info)), Some(open))
                    } else {
                        open.close();
                        (Answer::Open(Ok(info)), None)
                    }
                }
                Err(e) => {
                    log::warn!("{}: cannot open export: {e}", chain.name);
                    (Answer::Open(Err(Refusal::from(e))), None)
                }
            }
        }
    }
}
