//! `struct nbdkit_extents` and `struct nbdkit_exports`: what stands behind
//! the opaque pointers nbdkit's API passes, and the functions that fill
//! and read them.
//!
//! An extent list handed to a plugin's `extents` forwards what the plugin
//! adds to the server's list, after applying nbdkit's rules: extents
//! wholly before the requested offset or from its end on are dropped, the
//! rest are clipped to the request, they must be contiguous, and the first
//! must cover the requested offset. A list made with `nbdkit_extents_new`
//! keeps its extents for the caller to read back.
//!
//! `nbdkit_use_default_export` is in `plugin.rs`, beside the plugin
//! callback it asks, so that the lists do not depend on the plugin.

use std::ffi::{c_char, c_int, c_void};

use nbdhost_plugin_api::abi;

use crate::calls::{fail, report};
use crate::host;

/// One extent: offset, length, type.
type Extent = (u64, u64, u32);

/// What a `struct nbdkit_extents *` points to.
pub struct ExtentList {
    start: u64,
    end: u64,
    /// Where the next extent must begin, once one was added.
    next: Option<u64>,
    sink: Sink,
}

enum Sink {
    /// The server's list for the request being answered.
    Server(*mut abi::Extents),
    /// Kept for the caller.
    Own(Vec<Extent>),
}

impl ExtentList {
    /// A list for the plugin to fill, forwarding to the server's.
    pub fn forwarding(start: u64, end: u64, to: *mut abi::Extents) -> ExtentList {
        ExtentList {
            start,
            end,
            next: None,
            sink: Sink::Server(to),
        }
    }

    fn add(&mut self, offset: u64, length: u64, typ: u32) -> c_int {
        if length == 0 {
            return 0;
        }
        let Some(last) = offset.checked_add(length) else {
            fail(libc::ERANGE, "nbdkit_add_extent: extent overflows");
            return -1;
        };
        match self.next {
            None if offset > self.start => {
                fail(
                    libc::ERANGE,
                    &format!(
                        "nbdkit_add_extent: first extent must not be > start ({})",
                        self.start
                    ),
                );
                return -1;
            }
            Some(n) if n != offset => {
                fail(
                    libc::ERANGE,
                    "nbdkit_add_extent: extents must be added in ascending order and must be contiguous",
                );
                return -1;
            }
            _ => {}
        }
        self.next = Some(last);
        if last <= self.start || offset >= self.end {
            return 0;
        }
        let (o, l) = (
            offset.max(self.start),
            last.min(self.end) - offset.max(self.start),
        );
        match &mut self.sink {
            Sink::Own(v) => {
                v.push((o, l, typ));
                0
            }
            Sink::Server(list) => match host::get().add_extent {
                // SAFETY: the server's list for the running extents call.
                Some(f) => unsafe { f(*list, o, l, typ) },
                None => -1,
            },
        }
    }

    fn own(&self) -> &[Extent] {
        match &self.sink {
            Sink::Own(v) => v,
            Sink::Server(_) => &[],
        }
    }
}

/// # Safety
/// `list` must be a list the adapter handed out.
unsafe fn extents<'a>(list: *mut c_void) -> Option<&'a mut ExtentList> {
    // SAFETY: as the caller promises.
    unsafe { list.cast::<ExtentList>().as_mut() }
}

/// See nbdkit_add_extent(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_add_extent(
    list: *mut c_void,
    offset: u64,
    length: u64,
    typ: u32,
) -> c_int {
    // SAFETY: plugins only have the lists the adapter gave them.
    match unsafe { extents(list) } {
        Some(l) => l.add(offset, length, typ),
        None => {
            report(c"nbdkit_add_extent: no extent list");
            -1
        }
    }
}

/// See nbdkit_extents_new(3).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_extents_new(start: u64, end: u64) -> *mut c_void {
    if start > end || end > i64::MAX as u64 {
        fail(
            libc::ERANGE,
            &format!("nbdkit_extents_new: start ({start}) > end ({end}), or too large"),
        );
        return std::ptr::null_mut();
    }
    Box::into_raw(Box::new(ExtentList {
        start,
        end,
        next: None,
        sink: Sink::Own(Vec::new()),
    }))
    .cast()
}

/// See nbdkit_extents_free(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_extents_free(list: *mut c_void) {
    if !list.is_null() {
        // SAFETY: lists a plugin may free came from nbdkit_extents_new.
        drop(unsafe { Box::from_raw(list.cast::<ExtentList>()) });
    }
}

/// See nbdkit_extents_count(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_extents_count(list: *const c_void) -> usize {
    // SAFETY: as in nbdkit_add_extent.
    unsafe { extents(list.cast_mut()) }.map_or(0, |l| l.own().len())
}

/// `struct nbdkit_extent`, as nbdkit_get_extent returns it by value.
#[repr(C)]
pub struct NbdkitExtent {
    pub offset: u64,
    pub length: u64,
    pub typ: u32,
}

/// See nbdkit_get_extent(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_get_extent(list: *const c_void, i: usize) -> NbdkitExtent {
    // SAFETY: as in nbdkit_add_extent.
    let e = unsafe { extents(list.cast_mut()) }.and_then(|l| l.own().get(i).copied());
    let (offset, length, typ) = e.unwrap_or_default();
    NbdkitExtent {
        offset,
        length,
        typ,
    }
}

/// What a `struct nbdkit_exports *` points to.
pub struct ExportList {
    pub readonly: c_int,
    pub is_tls: c_int,
    sink: ExportSink,
}

enum ExportSink {
    Server(*mut abi::Exports),
    Own(Vec<(String, Option<String>)>),
}

impl ExportList {
    /// A list for the plugin's `list_exports`, forwarding to the server's.
    pub fn forwarding(readonly: c_int, is_tls: c_int, to: *mut abi::Exports) -> ExportList {
        ExportList {
            readonly,
            is_tls,
            sink: ExportSink::Server(to),
        }
    }

    pub fn add(&mut self, name: *const c_char, desc: *const c_char) -> c_int {
        match &mut self.sink {
            ExportSink::Server(list) => match host::get().add_export {
                // SAFETY: the server's list for the running list_exports
                // call; the strings are the plugin's, valid for the call.
                Some(f) => unsafe { f(*list, name, desc) },
                None => -1,
            },
            ExportSink::Own(v) => match host::string(name) {
                Some(n) => {
                    v.push((n, host::string(desc)));
                    0
                }
                None => {
                    report(c"nbdkit_add_export: no name");
                    -1
                }
            },
        }
    }
}

/// # Safety
/// `list` must be a list the adapter handed out.
pub unsafe fn exports<'a>(list: *mut c_void) -> Option<&'a mut ExportList> {
    // SAFETY: as the caller promises.
    unsafe { list.cast::<ExportList>().as_mut() }
}

/// See nbdkit_add_export(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_add_export(
    list: *mut c_void,
    name: *const c_char,
    desc: *const c_char,
) -> c_int {
    // SAFETY: plugins only have the lists the adapter gave them.
    match unsafe { exports(list) } {
        Some(l) => l.add(name, desc),
        None => {
            report(c"nbdkit_add_export: no export list");
            -1
        }
    }
}

/// See nbdkit_exports_new(3).
#[unsafe(no_mangle)]
pub extern "C" fn nbdkit_exports_new() -> *mut c_void {
    Box::into_raw(Box::new(ExportList {
        readonly: 0,
        is_tls: 0,
        sink: ExportSink::Own(Vec::new()),
    }))
    .cast()
}

/// See nbdkit_exports_free(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_exports_free(list: *mut c_void) {
    if !list.is_null() {
        // SAFETY: lists a plugin may free came from nbdkit_exports_new.
        drop(unsafe { Box::from_raw(list.cast::<ExportList>()) });
    }
}

/// See nbdkit_exports_count(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nbdkit_exports_count(list: *const c_void) -> usize {
    // SAFETY: as in nbdkit_add_export.
    match unsafe { exports(list.cast_mut()) }.map(|l| &l.sink) {
        Some(ExportSink::Own(v)) => v.len(),
        _ => 0,
    }
}
