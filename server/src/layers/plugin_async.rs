//! A plugin's asynchronous requests (ABI 1.9): starting them through its
//! `async_*` callbacks, with what the server does around a request as
//! on the synchronous path (FUA emulated by a flush after it, zeroes
//! written when the plugin cannot zero), and the synchronous calls a
//! plugin with only asynchronous callbacks is still asked (a filter above
//! it may be synchronous).

use std::sync::atomic::Ordering;

use nbdhost_plugin_api::{abi, Flags, Result, Support};

use super::backend::{run_sync, write_zeroes, AsyncOp, Handle};
use super::inflight::{self, Token};
use super::plugin::PluginHandle;

/// The handle, for a waiter that acts on it after the request it waits
/// for: the handle is not closed while any of its requests is in flight.
#[derive(Clone, Copy)]
struct HandlePtr(*const PluginHandle);

// SAFETY: the plugin's handle may be called from any thread its thread
// model allows; see above for its lifetime.
unsafe impl Send for HandlePtr {}

impl HandlePtr {
    /// # Safety
    /// Only while a request on the handle is in flight.
    unsafe fn get<'a>(self) -> &'a PluginHandle {
        // SAFETY: guaranteed by the caller.
        unsafe { &*self.0 }
    }
}

impl PluginHandle {
    /// Whether the plugin starts any kind of request asynchronously.
    pub(super) fn has_async(&self) -> bool {
        let t = self.async_callbacks();
        t.pread.is_some()
            || t.pwrite.is_some()
            || t.flush.is_some()
            || t.trim.is_some()
            || t.zero.is_some()
            || t.cache.is_some()
            || t.extents.is_some()
    }

    /// Start `op` for `token`: through the plugin's asynchronous callback
    /// for it when there is one, else synchronously here.
    pub(super) fn start_async(&self, op: AsyncOp, token: Token) {
        if let Err((op, token)) = self.try_start(op, token) {
            let r = run_sync(self, &op);
            inflight::complete(token, r, self.lib_name());
        }
    }

    /// Run `op` through the asynchronous callback for it, waiting here for
    /// its completion: the synchronous call of a plugin that has only the
    /// asynchronous one. `None` when there is none.
    pub(super) fn wait_async(&self, op: AsyncOp) -> Option<Result<()>> {
        let t = self.async_callbacks();
        let has = match op {
            AsyncOp::Read { .. } => t.pread.is_some(),
            AsyncOp::Write { .. } => t.pwrite.is_some(),
            AsyncOp::Flush { .. } => t.flush.is_some(),
            AsyncOp::Trim { .. } => t.trim.is_some(),
            AsyncOp::Zero { .. } => t.zero.is_some(),
            AsyncOp::Cache { .. } => t.cache.is_some(),
            AsyncOp::Extents { .. } => t.extents.is_some(),
        };
        has.then(|| {
            inflight::wait(|token| {
                if let Err((_, token)) = self.try_start(op, token) {
                    let e = nbdhost_plugin_api::Error::errno(libc::EIO);
                    inflight::complete(token, Err(e), self.lib_name());
                }
            })
        })
    }

    /// Start `op` through the plugin's asynchronous callback, or give it
    /// back when the plugin has none for it.
    fn try_start(&self, op: AsyncOp, token: Token) -> std::result::Result<(), (AsyncOp, Token)> {
        let t = self.async_callbacks();
        let h = self.raw_handle();
        let req = token.as_ptr();
        match op {
            AsyncOp::Read {
                buf,
                len,
                offset,
                flags,
            } => {
                let Some(f) = t.pread else {
                    return Err((op, token));
                };
                // SAFETY: the buffer stays writable until `token` completes;
                // the handle stays open until then.
                self.call(|| unsafe { f(h, buf.cast(), len as u64, offset, flags.bits(), req) });
            }
            AsyncOp::Write {
                buf,
                len,
                offset,
                flags,
            } => {
                let Some(f) = t.pwrite else {
                    return Err((op, token));
                };
                let (native, token) = self.with_fua(flags, token);
                let req = token.as_ptr();
                // SAFETY: as for reads, with a readable buffer.
                self.call(|| unsafe { f(h, buf.cast(), len as u64, offset, native.bits(), req) });
            }
            AsyncOp::Flush { flags } => {
                let Some(f) = t.flush else {
                    return Err((op, token));
                };
                // SAFETY: the handle stays open until `token` completes.
                self.call(|| unsafe { f(h, flags.bits(), req) });
            }
            AsyncOp::Trim {
                count,
                offset,
                flags,
            } => {
                let Some(f) = t.trim else {
                    return Err((op, token));
                };
                let (native, token) = self.with_fua(flags, token);
                self.start_range(f, count, offset, native, token);
            }
            AsyncOp::Zero {
                count,
                offset,
                flags,
            } => {
                let Some(f) = t
                    .zero
                    .filter(|_| self.zero_native().load(Ordering::Relaxed))
                else {
                    return Err((op, token));
                };
                let (native, token) = self.with_fua(flags, token);
                let token = self.with_zero_fallback(count, offset, flags, token);
                self.start_range(f, count, offset, native, token);
            }
            AsyncOp::Cache {
                count,
                offset,
                flags,
            } => {
                let native = matches!(self.can_cache(), Ok(Support::Native));
                let Some(f) = t.cache.filter(|_| native) else {
                    return Err((op, token));
                };
                self.start_range(f, count, offset, flags, token);
            }
            AsyncOp::Extents {
                count,
                offset,
                flags,
                list,
            } => {
                let Some(f) = t.extents else {
                    return Err((op, token));
                };
                let list = list.cast::<abi::Extents>();
                // SAFETY: the list lives until `token` completes.
                self.call(|| unsafe { f(h, count, offset, flags.bits(), list, req) });
            }
        }
        Ok(())
    }

    fn start_range(
        &self,
        f: abi::AsyncRangeFn,
        count: u64,
        offset: u64,
        flags: Flags,
        token: Token,
    ) {
        let (h, req) = (self.raw_handle(), token.as_ptr());
        // SAFETY: plain integers; the handle stays open until `token`
        // completes.
        self.call(|| unsafe { f(h, count, offset, flags.bits(), req) });
    }

    /// The flags the plugin gets for a write-type request, and the token
    /// it completes: FUA the plugin only emulates is a flush after the
    /// request, started from its completion.
    fn with_fua(&self, flags: Flags, token: Token) -> (Flags, Token) {
        let emulate = flags.contains(Flags::FUA)
            && matches!(self.fua_support_now(), Ok(s) if s != Support::Native);
        if !emulate {
            return (flags, token);
        }
        let me = HandlePtr(self);
        let inner = inflight::register(Box::new(move |r| match r {
            Err(e) => inflight::complete(token, Err(e), "server"),
            // On the pool: never a call into the plugin from inside its own
            // `complete`.
            Ok(()) => inflight::execute(Box::new(move || {
                // SAFETY: `token` is still in flight, so the handle is open.
                let h = unsafe { me.get() };
                let flush = AsyncOp::Flush {
                    flags: Flags::empty(),
                };
                h.start_async(flush, token);
            })),
        }));
        (flags - Flags::FUA, inner)
    }

    /// A token for the plugin's zero which, if the plugin says it cannot
    /// zero (`ENOTSUP`), writes the zeroes instead, on the pool, before
    /// completing `token`; as the synchronous path does.
    fn with_zero_fallback(&self, count: u64, offset: u64, flags: Flags, token: Token) -> Token {
        let me = HandlePtr(self);
        inflight::register(Box::new(move |r| match r {
            Err(e) if e.raw_errno() == libc::ENOTSUP => {
                inflight::execute(Box::new(move || {
                    // SAFETY: `token` is still in flight, so the handle is
                    // open.
                    let h = unsafe { me.get() };
                    if !flags.contains(Flags::FAST_ZERO) {
                        h.zero_native().store(false, Ordering::Relaxed);
                    }
                    let r = write_zeroes(h, count, offset, flags);
                    inflight::complete(token, r, "server");
                }));
            }
            r => inflight::complete(token, r, "server"),
        }))
    }
}
