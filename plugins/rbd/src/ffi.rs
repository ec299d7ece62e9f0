//! The binding to librados and librbd: exactly the calls the plugin makes,
//! declared from `rados/librados.h` and `rbd/librbd.h` (Ceph 16 and
//! later keep these signatures; `rbd_aio_write_zeroes` is the newest, from
//! Ceph 15), and safe types over them. The only `unsafe` code of the crate
//! is here.
//!
//! ## Asynchronous calls
//!
//! [`Image::aio_read`] and its siblings start librbd's `rbd_aio_*` calls
//! and return; librbd calls back, on a thread of its own, when the call
//! has ended. What the call reads into or writes from (a request's
//! buffer, [`ReadInto`] and [`WriteFrom`]) is held, with the function to
//! run at the end, until then, so no buffer is given back while librbd
//! may still use it. One request may take several calls (a write and the
//! flush FUA asks for, a large trim in pieces): [`Parts`] answers it once,
//! when the last has ended, with the first error. The callback runs on
//! librbd's completion thread, which every image of the process shares:
//! it reads the result, releases the completion and calls the end
//! function, and never unwinds into librbd.
//!
//! Thread safety, which the `Send`/`Sync` claims below rest on: a
//! `rados_t` after `rados_connect`, an ioctx that is no longer being
//! configured, and an open `rbd_image_t` may each be used from any number
//! of threads at once. librados and librbd take their own locks (an
//! image's `ImageCtx` guards its state with its owner and image locks,
//! and every synchronous call waits on a completion of its own); qemu and
//! rbd-nbd issue many requests at a time on one image handle. What must
//! not overlap is configuring a handle while it is used, and closing a
//! handle while calls on it run: configuration takes `&mut self` here,
//! and each handle keeps the one it was made from alive (`Arc`) and is
//! closed only when dropped, after every borrow of it ended.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use nbdhost_plugin_api::{ReadRequest, WriteRequest};

type RadosT = *mut c_void;
type IoctxT = *mut c_void;
type ImageT = *mut c_void;
type CompletionT = *mut c_void;
type DiffCallback = unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;
type AioCallback = unsafe extern "C" fn(CompletionT, *mut c_void);

/// `rbd_image_info_t`.
#[repr(C)]
struct ImageInfo {
    size: u64,
    obj_size: u64,
    num_objs: u64,
    order: c_int,
    block_name_prefix: [c_char; 24],
    parent_pool: i64,
    parent_name: [c_char; 96],
}

/// `rbd_image_spec_t`.
#[repr(C)]
struct ImageSpecRaw {
    id: *mut c_char,
    name: *mut c_char,
}

/// `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`: zeroes written, not holes.
const WRITE_ZEROES_FLAG_THICK_PROVISION: c_int = 1;

// build.rs links -lrbd -lrados when it sets cfg(have_librbd).
extern "C" {
    fn rados_create2(
        cluster: *mut RadosT,
        clustername: *const c_char,
        name: *const c_char,
        flags: u64,
    ) -> c_int;
    fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
    fn rados_conf_parse_env(cluster: RadosT, var: *const c_char) -> c_int;
    fn rados_conf_set(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_conf_get(
        cluster: RadosT,
        option: *const c_char,
        buf: *mut c_char,
        len: usize,
    ) -> c_int;
    fn rados_connect(cluster: RadosT) -> c_int;
    fn rados_shutdown(cluster: RadosT);
    fn rados_ioctx_create(cluster: RadosT, pool_name: *const c_char, ioctx: *mut IoctxT) -> c_int;
    fn rados_ioctx_destroy(io: IoctxT);
    fn rados_ioctx_set_namespace(io: IoctxT, nspace: *const c_char);

    fn rbd_open(io: IoctxT, name: *const c_char, image: *mut ImageT, snap: *const c_char) -> c_int;
    fn rbd_open_read_only(
        io: IoctxT,
        name: *const c_char,
        image: *mut ImageT,
        snap: *const c_char,
    ) -> c_int;
    fn rbd_close(image: ImageT) -> c_int;
    fn rbd_aio_close(image: ImageT, c: CompletionT) -> c_int;
    fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: Option<AioCallback>,
        c: *mut CompletionT,
    ) -> c_int;
    fn rbd_aio_is_complete(c: CompletionT) -> c_int;
    fn rbd_aio_get_return_value(c: CompletionT) -> isize;
    fn rbd_aio_release(c: CompletionT);
    fn rbd_get_size(image: ImageT, size: *mut u64) -> c_int;
    fn rbd_stat(image: ImageT, info: *mut ImageInfo, infosize: usize) -> c_int;
    fn rbd_get_features(image: ImageT, features: *mut u64) -> c_int;
    fn rbd_get_overlap(image: ImageT, overlap: *mut u64) -> c_int;
    fn rbd_read2(image: ImageT, ofs: u64, len: usize, buf: *mut c_char, op_flags: c_int) -> isize;
    fn rbd_write2(
        image: ImageT,
        ofs: u64,
        len: usize,
        buf: *const c_char,
        op_flags: c_int,
    ) -> isize;
    fn rbd_flush(image: ImageT) -> c_int;
    fn rbd_aio_read(image: ImageT, off: u64, len: usize, buf: *mut c_char, c: CompletionT)
        -> c_int;
    fn rbd_aio_write(
        image: ImageT,
        off: u64,
        len: usize,
        buf: *const c_char,
        c: CompletionT,
    ) -> c_int;
    fn rbd_aio_flush(image: ImageT, c: CompletionT) -> c_int;
    fn rbd_aio_discard(image: ImageT, off: u64, len: u64, c: CompletionT) -> c_int;
    fn rbd_aio_write_zeroes(
        image: ImageT,
        off: u64,
        len: usize,
        c: CompletionT,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
    fn rbd_discard(image: ImageT, ofs: u64, len: u64) -> c_int;
    fn rbd_write_zeroes(
        image: ImageT,
        ofs: u64,
        len: usize,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> isize;
    fn rbd_diff_iterate2(
        image: ImageT,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: Option<DiffCallback>,
        arg: *mut c_void,
    ) -> c_int;
    fn rbd_list2(io: IoctxT, images: *mut ImageSpecRaw, max_images: *mut usize) -> c_int;
    fn rbd_image_spec_list_cleanup(images: *mut ImageSpecRaw, num_images: usize);
}

/// A failed librados or librbd call: the (positive) errno it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // strerror's words, without std's " (os error N)".
        let s = std::io::Error::from_raw_os_error(self.0).to_string();
        f.write_str(s.split(" (os error").next().unwrap_or(&s))
    }
}

type Result<T> = std::result::Result<T, Errno>;

/// librados' and librbd's convention: negative errno on failure.
fn check(r: i64) -> Result<u64> {
    if r < 0 {
        Err(Errno(i32::try_from(-r).unwrap_or(libc_eio())))
    } else {
        Ok(r as u64)
    }
}

fn libc_eio() -> i32 {
    libc::EIO
}

/// A Rust string for C; an interior NUL cannot name anything.
fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Errno(libc::EINVAL))
}

/// The most a single discard or write-zeroes may cover: librbd refuses a
/// length above `INT_MAX`. A multiple of every object size (4 MiB by
/// default) so that the pieces still free whole objects.
const RANGE_CHUNK: u64 = 1 << 30;

/// A cluster connection (`rados_t`).
pub struct Cluster(RadosT);

// SAFETY: see the module comment; configuration needs `&mut self`.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// A handle for `client` (`client.ID`) of cluster `cluster`, not yet
    /// configured or connected.
    pub fn create(cluster: &str, client: &str) -> Result<Cluster> {
        let (cluster, client) = (cstr(cluster)?, cstr(client)?);
        let mut raw: RadosT = std::ptr::null_mut();
        // SAFETY: valid C strings and an out-pointer for the handle.
        check(unsafe { rados_create2(&mut raw, cluster.as_ptr(), client.as_ptr(), 0) }.into())?;
        Ok(Cluster(raw))
    }

    /// Read a configuration file, or (`None`) search librados' usual
    /// places: `$CEPH_CONF`, `/etc/ceph/$cluster.conf`, `~/.ceph/config`.
    pub fn read_conf(&mut self, path: Option<&Path>) -> Result<()> {
        let path = path
            .map(|p| CString::new(p.as_os_str().as_bytes()))
            .transpose()
            .map_err(|_| Errno(libc::EINVAL))?;
        let p = path.as_ref().map_or(std::ptr::null(), |p| p.as_ptr());
        // SAFETY: a configurable handle and a C string or NULL.
        check(unsafe { rados_conf_read_file(self.0, p) }.into()).map(drop)
    }

    /// Apply `$CEPH_ARGS`, as the ceph tools do.
    pub fn parse_env(&mut self) -> Result<()> {
        // SAFETY: NULL selects CEPH_ARGS.
        check(unsafe { rados_conf_parse_env(self.0, std::ptr::null()) }.into()).map(drop)
    }

    /// Set one option.
    pub fn set(&mut self, option: &str, value: &str) -> Result<()> {
        let (o, v) = (cstr(option)?, cstr(value)?);
        // SAFETY: a configurable handle and two C strings.
        check(unsafe { rados_conf_set(self.0, o.as_ptr(), v.as_ptr()) }.into()).map(drop)
    }

    /// An option's value, as text.
    pub fn get(&self, option: &str) -> Result<String> {
        let o = cstr(option)?;
        let mut buf = vec![0u8; 4096];
        // SAFETY: the buffer is writable for its length; librados writes a
        // NUL-terminated value or fails with -ENAMETOOLONG.
        check(
            unsafe { rados_conf_get(self.0, o.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
                .into(),
        )?;
        let s = CStr::from_bytes_until_nul(&buf).map_err(|_| Errno(libc_eio()))?;
        Ok(s.to_string_lossy().into_owned())
    }

    /// Authenticate with a monitor and fetch the cluster maps; librados'
    /// threads start here.
    pub fn connect(&mut self) -> Result<()> {
        // SAFETY: a configured handle, connected once.
        check(unsafe { rados_connect(self.0) }.into()).map(drop)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: every Pool holds an Arc of this Cluster, so none is left;
        // shutting down an unconnected handle is allowed.
        unsafe { rados_shutdown(self.0) }
    }
}

/// An I/O context (`rados_ioctx_t`): one pool and namespace.
pub struct Pool {
    raw: IoctxT,
    _cluster: Arc<Cluster>,
}

// SAFETY: see the module comment; the namespace is set before sharing.
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl Pool {
    /// Pool `name`, namespace `namespace` ("" for the default one).
    pub fn open(cluster: &Arc<Cluster>, name: &str, namespace: &str) -> Result<Pool> {
        let (n, ns) = (cstr(name)?, cstr(namespace)?);
        let mut raw: IoctxT = std::ptr::null_mut();
        // SAFETY: a connected cluster, a C string and an out-pointer.
        check(unsafe { rados_ioctx_create(cluster.0, n.as_ptr(), &mut raw) }.into())?;
        // SAFETY: the ioctx is new and not yet shared.
        unsafe { rados_ioctx_set_namespace(raw, ns.as_ptr()) };
        Ok(Pool {
            raw,
            _cluster: cluster.clone(),
        })
    }

    /// The names of the pool's images (in this namespace).
    pub fn images(&self) -> Result<Vec<String>> {
        let mut cap = 64usize;
        loop {
            let mut specs: Vec<ImageSpecRaw> = Vec::with_capacity(cap);
            let mut n = cap;
            // SAFETY: room for `n` specs; librbd fills at most `n` and
            // sets `n` to the count (or the count needed, with -ERANGE).
            let r = unsafe { rbd_list2(self.raw, specs.as_mut_ptr(), &mut n) };
            if r == -(libc::ERANGE) && n > cap {
                cap = n;
                continue;
            }
            check(r.into())?;
            // SAFETY: librbd initialised the first `n` entries.
            unsafe { specs.set_len(n) };
            let names = specs
                .iter()
                .filter(|s| !s.name.is_null())
                // SAFETY: a NUL-terminated name librbd allocated.
                .map(|s| {
                    unsafe { CStr::from_ptr(s.name) }
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            // SAFETY: frees the strings of exactly the entries librbd filled;
            // the Vec then frees only its own buffer.
            unsafe { rbd_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
            return Ok(names);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: every Image holds an Arc of this Pool, so none is left.
        unsafe { rados_ioctx_destroy(self.raw) }
    }
}

/// An open image (`rbd_image_t`), at its head or a snapshot.
pub struct Image {
    raw: ImageT,
    _pool: Arc<Pool>,
}

// SAFETY: see the module comment.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Image {
    /// Open image `name` of `pool`, at snapshot `snap` if given.
    /// `read_only` opens without a watch on the header, so a client with
    /// read-only capabilities can open it (and writes fail with `EROFS`).
    pub fn open(
        pool: &Arc<Pool>,
        name: &str,
        snap: Option<&str>,
        read_only: bool,
    ) -> Result<Image> {
        let n = cstr(name)?;
        let s = snap.map(cstr).transpose()?;
        let sp = s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut raw: ImageT = std::ptr::null_mut();
        let f = if read_only {
            rbd_open_read_only
        } else {
            rbd_open
        };
        // SAFETY: a live ioctx, C strings (or NULL for the head) and an
        // out-pointer for the handle.
        check(unsafe { f(pool.raw, n.as_ptr(), &mut raw, sp) }.into())?;
        Ok(Image {
            raw,
            _pool: pool.clone(),
        })
    }

    /// The size in bytes (of the snapshot, if one is open).
    pub fn size(&self) -> Result<u64> {
        let mut size = 0u64;
        // SAFETY: an open image and an out-pointer.
        check(unsafe { rbd_get_size(self.raw, &mut size) }.into())?;
        Ok(size)
    }

    /// The size of the image's objects (a power of two, 4 MiB by default).
    pub fn object_size(&self) -> Result<u64> {
        // SAFETY: ImageInfo is plain data; all zeroes is a valid value.
        let mut info: ImageInfo = unsafe { std::mem::zeroed() };
        // SAFETY: an open image and a struct of the size passed.
        check(unsafe { rbd_stat(self.raw, &mut info, std::mem::size_of::<ImageInfo>()) }.into())?;
        Ok(info.obj_size)
    }

    /// The image's feature bits (`RBD_FEATURE_*`).
    pub fn features(&self) -> Result<u64> {
        let mut f = 0u64;
        // SAFETY: an open image and an out-pointer.
        check(unsafe { rbd_get_features(self.raw, &mut f) }.into())?;
        Ok(f)
    }

    /// Whether the image is a clone whose parent still shows through
    /// somewhere (a parent overlap above zero).
    pub fn has_parent(&self) -> bool {
        let mut overlap = 0u64;
        // SAFETY: an open image and an out-pointer.
        let r = unsafe { rbd_get_overlap(self.raw, &mut overlap) };
        r == 0 && overlap > 0
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // SAFETY: the buffer is writable for its length, and the call
        // returns only once librbd is done with it.
        let r = unsafe { rbd_read2(self.raw, offset, buf.len(), buf.as_mut_ptr().cast(), 0) };
        if check(r as i64)? as usize != buf.len() {
            return Err(Errno(libc_eio()));
        }
        Ok(())
    }

    /// Write `buf` at `offset`.
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        // SAFETY: the buffer is readable for its length, and the call
        // returns only once librbd is done with it.
        let r = unsafe { rbd_write2(self.raw, offset, buf.len(), buf.as_ptr().cast(), 0) };
        if check(r as i64)? as usize != buf.len() {
            return Err(Errno(libc_eio()));
        }
        Ok(())
    }

    /// Wait until every write acknowledged so far is on the OSDs.
    pub fn flush(&self) -> Result<()> {
        // SAFETY: an open image.
        check(unsafe { rbd_flush(self.raw) }.into()).map(drop)
    }

    /// Discard a range (whole objects are removed; librbd may skip
    /// pieces smaller than its discard granularity).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        chunked(offset, len, |o, l| {
            // SAFETY: an open image; l ≤ RANGE_CHUNK < INT_MAX.
            check(unsafe { rbd_discard(self.raw, o, l) }.into()).map(drop)
        })
    }

    /// Make a range read as zeroes: by deallocating (`thick` false), or by
    /// writing zeroes (`thick` true).
    pub fn write_zeroes(&self, offset: u64, len: u64, thick: bool) -> Result<()> {
        let flags = if thick {
            WRITE_ZEROES_FLAG_THICK_PROVISION
        } else {
            0
        };
        chunked(offset, len, |o, l| {
            // SAFETY: an open image; l ≤ RANGE_CHUNK fits in size_t.
            check(unsafe { rbd_write_zeroes(self.raw, o, l as usize, flags, 0) } as i64).map(drop)
        })
    }

    /// Call `f(offset, length, exists)` for each allocated piece of
    /// `[offset, offset+len)` (including what a parent provides);
    /// `exists` false marks a piece known to be zero.
    pub fn diff(&self, offset: u64, len: u64, f: &mut dyn FnMut(u64, u64, bool)) -> Result<()> {
        unsafe extern "C" fn trampoline(
            o: u64,
            l: usize,
            exists: c_int,
            arg: *mut c_void,
        ) -> c_int {
            // SAFETY: `arg` is the `&mut &mut dyn FnMut` below, alive for
            // the whole rbd_diff_iterate2 call that invokes us.
            let f = unsafe { &mut *arg.cast::<&mut dyn FnMut(u64, u64, bool)>() };
            // A panic must not unwind into librbd's C++ frames.
            match catch_unwind(AssertUnwindSafe(|| f(o, l as u64, exists != 0))) {
                Ok(()) => 0,
                Err(_) => -libc_eio(),
            }
        }
        let mut f = f;
        let arg: *mut &mut dyn FnMut(u64, u64, bool) = &mut f;
        // SAFETY: an open image; NULL for "from the beginning of time";
        // the callback and its argument live for the call, which runs the
        // callback only before it returns.
        let r = unsafe {
            rbd_diff_iterate2(
                self.raw,
                std::ptr::null(),
                offset,
                len,
                1,
                0,
                Some(trampoline),
                arg.cast(),
            )
        };
        check(r.into()).map(drop)
    }
}

/// Memory librbd reads into: a read request's buffer.
///
/// # Safety
/// [`ReadInto::ptr`] must give the same address, writable for
/// [`ReadInto::len`] bytes, for as long as the value lives, wherever the
/// value itself is moved.
pub unsafe trait ReadInto: Send + 'static {
    fn ptr(&mut self) -> *mut u8;
    fn len(&self) -> usize;
}

// SAFETY: the server lends the buffer to the request until it completes
// (ABI 1.9), and completing it consumes the request; the pointer is the
// server's, not the request's, so moving the request does not move it.
unsafe impl ReadInto for ReadRequest {
    fn ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    fn len(&self) -> usize {
        ReadRequest::len(self)
    }
}

/// Memory librbd writes from: a write request's data.
///
/// # Safety
/// As [`ReadInto`], readable rather than writable.
pub unsafe trait WriteFrom: Send + 'static {
    fn ptr(&self) -> *const u8;
    fn len(&self) -> usize;
}

// SAFETY: as for ReadRequest.
unsafe impl WriteFrom for WriteRequest {
    fn ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn len(&self) -> usize {
        WriteRequest::len(self)
    }
}

/// Several librbd calls answered as one: what they hold (`H`, a request)
/// and the function (`F`) that the last of them to end runs, with the
/// first error any of them had.
pub struct Parts<H, F> {
    left: AtomicUsize,
    /// The first errno, 0 while none.
    error: AtomicI32,
    end: Mutex<Option<(H, F)>>,
}

impl<H, F: FnOnce(H, Result<()>)> Parts<H, F> {
    pub fn new(n: usize, held: H, then: F) -> Arc<Self> {
        Arc::new(Parts {
            left: AtomicUsize::new(n),
            error: AtomicI32::new(0),
            end: Mutex::new(Some((held, then))),
        })
    }

    /// `n` of the calls ended (or will never start) with `r`; the last
    /// one runs the end function.
    pub fn end(&self, n: usize, r: Result<()>) {
        if n == 0 {
            return;
        }
        if let Err(e) = r {
            let e = if e.0 == 0 { libc_eio() } else { e.0 };
            let _ = self
                .error
                .compare_exchange(0, e, Ordering::AcqRel, Ordering::Acquire);
        }
        if self.left.fetch_sub(n, Ordering::AcqRel) != n {
            return;
        }
        let taken = self.end.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((held, then)) = taken {
            let r = match self.error.load(Ordering::Acquire) {
                0 => Ok(()),
                e => Err(Errno(e)),
            };
            then(held, r);
        }
    }
}

/// One asynchronous call in flight: what librbd hands its callback.
struct Part<H, F> {
    parts: Arc<Parts<H, F>>,
    /// Keeps the image open while librbd works on it.
    image: Arc<Image>,
    /// What librbd must return for the call to have succeeded (a read's
    /// length); `None`: anything not negative.
    expect: Option<usize>,
}

/// librbd's result as the plugin's.
fn outcome(r: isize, expect: Option<usize>) -> Result<()> {
    let n = check(r as i64)?;
    match expect {
        Some(len) if n != len as u64 => Err(Errno(libc_eio())),
        _ => Ok(()),
    }
}

/// Let go of a call's hold on the image without closing it here: an
/// image must never be closed on librbd's own completion thread (the
/// close waits for that thread). The handle that started the call holds
/// the image while it is in flight, so this is only ever the last hold if
/// the server closed the handle early; the image is then left open.
fn let_go(image: Arc<Image>) {
    if Arc::strong_count(&image) == 1 {
        std::mem::forget(image);
    }
}

/// librbd's completion callback, for a [`Part`] of type `Part<H, F>`.
unsafe extern "C" fn ended<H, F>(c: CompletionT, arg: *mut c_void)
where
    H: Send + 'static,
    F: FnOnce(H, Result<()>) + Send + 'static,
{
    // SAFETY: `c` is the completion this callback was made for; it is
    // live until it is released here, once.
    let r = unsafe { rbd_aio_get_return_value(c) };
    // SAFETY: as above; librbd keeps its own reference while it calls us.
    unsafe { rbd_aio_release(c) };
    // SAFETY: `arg` is the Box that `launch` leaked for this completion,
    // which librbd gives back exactly once, here.
    let part = unsafe { Box::from_raw(arg.cast::<Part<H, F>>()) };
    // A panic must not unwind into librbd's thread. Were one to happen in
    // the end function, the request it held answers EIO as it is dropped.
    let _ = catch_unwind(AssertUnwindSafe(move || {
        let Part {
            parts,
            image,
            expect,
        } = *part;
        // Before the request is answered: until then the handle, and with
        // it a hold on the image, stays.
        let_go(image);
        parts.end(1, outcome(r, expect));
    }));
}

impl Image {
    /// Start one call of a request: `issue` starts it on the raw image
    /// with a completion whose callback ends one part of `parts`.
    /// `false` if it did not start (that part has then ended, with the
    /// error).
    fn launch<H, F>(
        self: &Arc<Self>,
        parts: &Arc<Parts<H, F>>,
        expect: Option<usize>,
        issue: impl FnOnce(ImageT, CompletionT) -> c_int,
    ) -> bool
    where
        H: Send + 'static,
        F: FnOnce(H, Result<()>) + Send + 'static,
    {
        let part = Box::into_raw(Box::new(Part {
            parts: parts.clone(),
            image: self.clone(),
            expect,
        }));
        let mut c: CompletionT = std::ptr::null_mut();
        // SAFETY: the callback's argument is `part`, which lives until the
        // callback takes it back; an out-pointer for the completion.
        let r = unsafe { rbd_aio_create_completion(part.cast(), Some(ended::<H, F>), &mut c) };
        let r = if r < 0 {
            r
        } else {
            let r = issue(self.raw, c);
            if r < 0 {
                // SAFETY: a call that fails to start never calls back, so
                // the completion is still ours, released once.
                unsafe { rbd_aio_release(c) };
            }
            r
        };
        if r < 0 {
            // SAFETY: librbd did not take `part` (no completion was made,
            // or the call did not start): it is still ours, freed once.
            let part = unsafe { Box::from_raw(part) };
            let Part { parts, image, .. } = *part;
            // Before the request is answered, as in `ended`.
            drop(image);
            parts.end(1, check(r.into()).map(drop));
            return false;
        }
        true
    }

    /// Read `buf.len()` bytes at `offset` into `buf`; `then(buf, result)`
    /// runs once librbd is done with the buffer, on librbd's thread (or on
    /// this one, if the read could not start).
    pub fn aio_read<B, F>(self: &Arc<Self>, offset: u64, mut buf: B, then: F)
    where
        B: ReadInto,
        F: FnOnce(B, Result<()>) + Send + 'static,
    {
        let (ptr, len) = (buf.ptr(), buf.len());
        let parts = Parts::new(1, buf, then);
        self.launch(&parts, Some(len), |image, c| {
            // SAFETY: an open image; `ptr` is writable for `len` bytes
            // until `then` takes `buf` back, after this read has ended.
            unsafe { rbd_aio_read(image, offset, len, ptr.cast(), c) }
        });
    }

    /// Write `buf` at `offset`, then, with `flush`, flush (FUA through a
    /// cache): the flush, started right after the write, waits for it
    /// (librbd's flushes wait for every write started before them; in
    /// librbd 16 that is its `FlushTracker`). `then` as for
    /// [`Image::aio_read`].
    pub fn aio_write<B, F>(self: &Arc<Self>, offset: u64, buf: B, flush: bool, then: F)
    where
        B: WriteFrom,
        F: FnOnce(B, Result<()>) + Send + 'static,
    {
        let (ptr, len) = (buf.ptr(), buf.len());
        let parts = Parts::new(1 + usize::from(flush), buf, then);
        let started = self.launch(&parts, None, |image, c| {
            // SAFETY: an open image; `ptr` is readable for `len` bytes
            // until `then` takes `buf` back, after this write has ended.
            unsafe { rbd_aio_write(image, offset, len, ptr.cast(), c) }
        });
        if flush {
            self.then_flush(&parts, started);
        }
    }

    /// The flush of a request's last part, if the parts before started
    /// (else it never starts).
    fn then_flush<H, F>(self: &Arc<Self>, parts: &Arc<Parts<H, F>>, started: bool)
    where
        H: Send + 'static,
        F: FnOnce(H, Result<()>) + Send + 'static,
    {
        if !started {
            parts.end(1, Ok(()));
            return;
        }
        self.launch(parts, None, |image, c| {
            // SAFETY: an open image and a fresh completion.
            unsafe { rbd_aio_flush(image, c) }
        });
    }

    /// Wait until every write acknowledged so far is on the OSDs; `held`
    /// (the request) is given back to `then`.
    pub fn aio_flush<H, F>(self: &Arc<Self>, held: H, then: F)
    where
        H: Send + 'static,
        F: FnOnce(H, Result<()>) + Send + 'static,
    {
        let parts = Parts::new(1, held, then);
        self.then_flush(&parts, true);
    }

    /// [`Image::discard`], asynchronously, then a flush with `flush`.
    pub fn aio_discard<H, F>(self: &Arc<Self>, offset: u64, len: u64, flush: bool, held: H, then: F)
    where
        H: Send + 'static,
        F: FnOnce(H, Result<()>) + Send + 'static,
    {
        self.aio_ranges(offset, len, flush, held, then, |image, o, l, c| {
            // SAFETY: an open image; l ≤ RANGE_CHUNK < INT_MAX.
            unsafe { rbd_aio_discard(image, o, l, c) }
        })
    }

    /// [`Image::write_zeroes`], asynchronously, then a flush with `flush`.
    pub fn aio_write_zeroes<H, F>(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        thick: bool,
        flush: bool,
        held: H,
        then: F,
    ) where
        H: Send + 'static,
        F: FnOnce(H, Result<()>) + Send + 'static,
    {
        let flags = if thick {
            WRITE_ZEROES_FLAG_THICK_PROVISION
        } else {
            0
        };
        self.aio_ranges(offset, len, flush, held, then, |image, o, l, c| {
            // SAFETY: an open image; l ≤ RANGE_CHUNK fits in size_t.
            unsafe { rbd_aio_write_zeroes(image, o, l as usize, c, flags, 0) }
        })
    }

    /// A range call over `[offset, offset+len)` in pieces of at most
    /// [`RANGE_CHUNK`], all in flight at once, then a flush with `flush`.
    fn aio_ranges<H, F>(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        flush: bool,
        held: H,
        then: F,
        issue: impl Fn(ImageT, u64, u64, CompletionT) -> c_int,
    ) where
        H: Send + 'static,
        F: FnOnce(H, Result<()>) + Send + 'static,
    {
        let pieces = pieces(offset, len);
        let n = pieces.clone().count();
        let parts = Parts::new(n + usize::from(flush), held, then);
        let mut started = 0;
        for (o, l) in pieces {
            if !self.launch(&parts, None, |image, c| issue(image, o, l, c)) {
                // The rest never start.
                parts.end(n - started - 1, Ok(()));
                break;
            }
            started += 1;
        }
        if flush {
            self.then_flush(&parts, started == n);
        }
    }
}

/// How [`Image::close_within`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// Closed, with librbd's result.
    Done(Result<()>),
    /// Still closing at the deadline: the image, its ioctx and its cluster
    /// are left as they are, since freeing any of them under a close in
    /// progress would be a use after free.
    Abandoned,
}

impl Image {
    /// Close the image (flushing its cache and releasing its lock), but
    /// wait no longer than until `deadline`: an unreachable cluster must
    /// not hold up the server's exit for a timeout per step of the close.
    /// Abandoning requires that nothing else holds this image, which
    /// taking it by value guarantees.
    pub fn close_within(self, deadline: std::time::Instant) -> Closed {
        let image = std::mem::ManuallyDrop::new(self);
        let mut c: CompletionT = std::ptr::null_mut();
        // SAFETY: no callback, so no argument; an out-pointer.
        if unsafe { rbd_aio_create_completion(std::ptr::null_mut(), None, &mut c) } < 0 {
            // Cannot even allocate a completion: close synchronously.
            let image = std::mem::ManuallyDrop::into_inner(image);
            drop(image);
            return Closed::Done(Ok(()));
        }
        // SAFETY: an open image nobody else uses, closed once; the
        // completion is ours.
        let r = unsafe { rbd_aio_close(image.raw, c) };
        if r < 0 {
            // SAFETY: the completion was never handed to librbd.
            unsafe { rbd_aio_release(c) };
            // Still open: close it synchronously instead.
            drop(std::mem::ManuallyDrop::into_inner(image));
            return Closed::Done(check(r.into()).map(drop));
        }
        // SAFETY (both calls in the loop): the completion is live until
        // released below.
        while unsafe { rbd_aio_is_complete(c) } == 0 {
            if std::time::Instant::now() >= deadline {
                // Leave the completion, the image (ManuallyDrop) and with
                // it the Arc of its pool to librbd's close.
                return Closed::Abandoned;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // SAFETY: complete; read its result, then release it once.
        let r = unsafe { rbd_aio_get_return_value(c) };
        // SAFETY: as above.
        unsafe { rbd_aio_release(c) };
        // The handle is closed: drop the pool's Arc but not the handle.
        let mut image = image;
        // SAFETY: `_pool` is dropped exactly once, here; `raw` is not
        // used again and has no destructor of its own.
        unsafe { std::ptr::drop_in_place(&mut image._pool) };
        Closed::Done(check(r as i64).map(drop))
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: no borrow of the image is left. rbd_close flushes and
        // releases the exclusive lock; its error has nowhere to go.
        unsafe { rbd_close(self.raw) };
    }
}

/// `[offset, offset+len)` in pieces of at most [`RANGE_CHUNK`], aligned
/// to it.
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + Clone {
    let end = offset.saturating_add(len);
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let next = (pos / RANGE_CHUNK + 1).saturating_mul(RANGE_CHUNK);
        let n = next.min(end) - pos;
        let piece = (pos, n);
        pos += n;
        Some(piece)
    })
}

/// Run `f` over [`pieces`] of `[offset, offset+len)`, one after another.
fn chunked(offset: u64, len: u64, mut f: impl FnMut(u64, u64) -> Result<()>) -> Result<()> {
    pieces(offset, len).try_for_each(|(o, l)| f(o, l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_cut_at_chunk_boundaries() {
        let mut v = Vec::new();
        chunked(RANGE_CHUNK - 10, RANGE_CHUNK + 20, |o, l| {
            v.push((o, l));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            v,
            [
                (RANGE_CHUNK - 10, 10),
                (RANGE_CHUNK, RANGE_CHUNK),
                (2 * RANGE_CHUNK, 10)
            ]
        );
    }

    #[test]
    fn an_empty_range_has_no_pieces() {
        assert_eq!(pieces(5, 0).count(), 0);
        assert_eq!(
            pieces(u64::MAX - 1, 10).collect::<Vec<_>>(),
            [(u64::MAX - 1, 1)]
        );
    }

    /// What an end function was called with.
    type Seen = Arc<Mutex<Vec<(u8, Result<()>)>>>;
    type End = Box<dyn FnOnce(u8, Result<()>) + Send>;

    /// Parts whose end function records its calls.
    fn recorded(n: usize) -> (Arc<Parts<u8, End>>, Seen) {
        let seen = Seen::default();
        let s = seen.clone();
        let end: End = Box::new(move |h, r| s.lock().unwrap().push((h, r)));
        (Parts::new(n, 7u8, end), seen)
    }

    #[test]
    fn the_last_part_answers_once_with_the_first_error() {
        let (parts, seen) = recorded(3);
        parts.end(1, Ok(()));
        parts.end(1, Err(Errno(libc::ETIMEDOUT)));
        assert!(seen.lock().unwrap().is_empty());
        parts.end(1, Err(Errno(libc::EPERM)));
        assert_eq!(*seen.lock().unwrap(), [(7, Err(Errno(libc::ETIMEDOUT)))]);
    }

    #[test]
    fn parts_that_never_start_end_together() {
        let (parts, seen) = recorded(4);
        parts.end(1, Err(Errno(libc::EIO)));
        parts.end(0, Ok(()));
        assert!(seen.lock().unwrap().is_empty());
        parts.end(3, Ok(()));
        assert_eq!(*seen.lock().unwrap(), [(7, Err(Errno(libc::EIO)))]);
    }

    #[test]
    fn parts_ending_on_many_threads_answer_once() {
        let (parts, seen) = recorded(64);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let p = parts.clone();
                std::thread::spawn(move || (0..8).for_each(|_| p.end(1, Ok(()))))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(*seen.lock().unwrap(), [(7, Ok(()))]);
    }

    #[test]
    fn a_short_read_is_an_error_and_a_write_s_count_is_not_checked() {
        assert_eq!(outcome(4096, Some(4096)), Ok(()));
        assert_eq!(outcome(100, Some(4096)), Err(Errno(libc::EIO)));
        assert_eq!(outcome(0, None), Ok(()));
        assert_eq!(
            outcome(-(libc::ETIMEDOUT as isize), None),
            Err(Errno(libc::ETIMEDOUT))
        );
    }
}
