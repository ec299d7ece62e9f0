//! libext2fs (e2fsprogs), reached through FFI: a file system opened over
//! the layer below, and one regular file in it read and written.
//!
//! libext2fs does its block I/O through an "I/O manager", a table of
//! callbacks; this module gives it one whose channel reads and writes the
//! layer below of the request being served. The layer below is only
//! known during a filter callback, so every call into libext2fs is made
//! inside [`Fs::with`], which lends the channel the callback's `Next` for
//! that call's duration.

#![allow(unsafe_code)]

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_long, c_uint, c_ulong, c_ulonglong, c_void, CStr, CString};
use std::fmt;
use std::ptr;
use std::sync::{Mutex, PoisonError};

use nbdhost_plugin_api::{Flags, Next};

type Errcode = c_long;
type Ino = u32;
type Filsys = *mut c_void;
type File = *mut c_void;

// From <ext2fs/ext2_err.h>, <ext2fs/ext2_io.h>, <ext2fs/ext2fs.h> and
// <ext2fs/ext2_fs.h> of e2fsprogs 1.47.
const EXT2_ET_MAGIC_IO_CHANNEL: Errcode = 2133571333;
const EXT2_ET_MAGIC_IO_MANAGER: Errcode = 2133571335;
const EXT2_ET_BAD_DEVICE_NAME: Errcode = 2133571343;
const EXT2_ET_INVALID_ARGUMENT: Errcode = 2133571394;
const EXT2_FLAG_RW: c_int = 0x01;
const EXT2_FLAG_64BITS: c_int = 0x20000;
const EXT2_FILE_WRITE: c_int = 0x0001;
const EXT2_SEEK_SET: c_int = 0;
const EXT2_ROOT_INO: Ino = 2;
const LINUX_S_IFMT: u16 = 0o170000;
const LINUX_S_IFREG: u16 = 0o100000;

/// `struct struct_io_channel`.
#[repr(C)]
struct IoChannel {
    magic: Errcode,
    manager: *const IoManager,
    name: *mut c_char,
    block_size: c_int,
    read_error: *const c_void,
    write_error: *const c_void,
    refcount: c_int,
    flags: c_int,
    reserved: [c_long; 14],
    private_data: *mut c_void,
    app_data: *mut c_void,
    align: c_int,
}

type ReadBlk = unsafe extern "C" fn(*mut IoChannel, c_ulong, c_int, *mut c_void) -> Errcode;
type WriteBlk = unsafe extern "C" fn(*mut IoChannel, c_ulong, c_int, *const c_void) -> Errcode;
type ReadBlk64 = unsafe extern "C" fn(*mut IoChannel, c_ulonglong, c_int, *mut c_void) -> Errcode;
type WriteBlk64 =
    unsafe extern "C" fn(*mut IoChannel, c_ulonglong, c_int, *const c_void) -> Errcode;
type Range64 = unsafe extern "C" fn(*mut IoChannel, c_ulonglong, c_ulonglong) -> Errcode;

/// `struct struct_io_manager`.
#[repr(C)]
struct IoManager {
    magic: Errcode,
    name: *const c_char,
    open: Option<unsafe extern "C" fn(*const c_char, c_int, *mut *mut IoChannel) -> Errcode>,
    close: Option<unsafe extern "C" fn(*mut IoChannel) -> Errcode>,
    set_blksize: Option<unsafe extern "C" fn(*mut IoChannel, c_int) -> Errcode>,
    read_blk: Option<ReadBlk>,
    write_blk: Option<WriteBlk>,
    flush: Option<unsafe extern "C" fn(*mut IoChannel) -> Errcode>,
    write_byte: Option<WriteBlk>,
    set_option:
        Option<unsafe extern "C" fn(*mut IoChannel, *const c_char, *const c_char) -> Errcode>,
    get_stats: Option<unsafe extern "C" fn(*mut IoChannel, *mut *mut c_void) -> Errcode>,
    read_blk64: Option<ReadBlk64>,
    write_blk64: Option<WriteBlk64>,
    discard: Option<Range64>,
    cache_readahead: Option<Range64>,
    zeroout: Option<Range64>,
    reserved: [c_long; 14],
}

/// The manager is immutable and only read by libext2fs.
struct Manager(IoManager);

// SAFETY: the table is never written after initialisation; its name
// pointer is to a static string.
unsafe impl Sync for Manager {}

static MANAGER: Manager = Manager(IoManager {
    magic: EXT2_ET_MAGIC_IO_MANAGER,
    name: c"nbdhost next layer".as_ptr(),
    open: Some(io_open),
    close: Some(io_close),
    set_blksize: Some(io_set_blksize),
    read_blk: Some(io_read_blk),
    write_blk: Some(io_write_blk),
    flush: Some(io_flush),
    write_byte: Some(io_write_byte),
    set_option: Some(io_set_option),
    get_stats: None,
    read_blk64: Some(io_read_blk64),
    write_blk64: Some(io_write_blk64),
    discard: None,
    cache_readahead: None,
    zeroout: None,
    reserved: [0; 14],
});

#[link(name = "ext2fs")]
extern "C" {
    fn ext2fs_open2(
        name: *const c_char,
        io_options: *const c_char,
        flags: c_int,
        superblock: c_int,
        block_size: c_uint,
        manager: *const IoManager,
        ret_fs: *mut Filsys,
    ) -> Errcode;
    fn ext2fs_close2(fs: Filsys, flags: c_int) -> Errcode;
    fn ext2fs_free(fs: Filsys);
    fn ext2fs_namei(fs: Filsys, root: Ino, cwd: Ino, name: *const c_char, ino: *mut Ino)
        -> Errcode;
    fn ext2fs_read_inode(fs: Filsys, ino: Ino, inode: *mut Inode) -> Errcode;
    fn ext2fs_file_open(fs: Filsys, ino: Ino, flags: c_int, ret: *mut File) -> Errcode;
    fn ext2fs_file_close(file: File) -> Errcode;
    fn ext2fs_file_flush(file: File) -> Errcode;
    fn ext2fs_file_get_lsize(file: File, size: *mut u64) -> Errcode;
    fn ext2fs_file_llseek(file: File, offset: u64, whence: c_int, pos: *mut u64) -> Errcode;
    fn ext2fs_file_read(file: File, buf: *mut c_void, wanted: c_uint, got: *mut c_uint) -> Errcode;
    fn ext2fs_file_write(
        file: File,
        buf: *const c_void,
        nbytes: c_uint,
        written: *mut c_uint,
    ) -> Errcode;
    static et_ext2_error_table: ErrorTable;
}

/// `struct error_table`, only ever pointed at.
#[repr(C)]
struct ErrorTable {
    _opaque: [u8; 0],
}

#[link(name = "com_err")]
extern "C" {
    fn error_message(code: c_long) -> *const c_char;
    fn add_error_table(table: *const ErrorTable) -> Errcode;
    fn remove_error_table(table: *const ErrorTable) -> Errcode;
}

/// Whether libext2fs's messages are in com_err's list.
static MESSAGES: Mutex<bool> = Mutex::new(false);

/// Put libext2fs's messages in com_err's list, for `error_message`, once.
/// Through `add_error_table` rather than `initialize_ext2_error_table`,
/// whose list node nothing can free: this one
/// [`forget_error_messages`] takes out again.
fn learn_error_messages() {
    let mut known = MESSAGES.lock().unwrap_or_else(PoisonError::into_inner);
    if !*known {
        // SAFETY: the address of libext2fs's own static table, which
        // com_err keeps until it is removed.
        *known = unsafe { add_error_table(ptr::addr_of!(et_ext2_error_table)) } == 0;
    }
}

/// Take libext2fs's messages out of com_err's list again, before the
/// filter and libext2fs are unloaded: the list would otherwise point
/// into an unloaded library, through a node left allocated.
pub fn forget_error_messages() {
    let mut known = MESSAGES.lock().unwrap_or_else(PoisonError::into_inner);
    if *known {
        // SAFETY: the table added by `learn_error_messages`.
        unsafe { remove_error_table(ptr::addr_of!(et_ext2_error_table)) };
        *known = false;
    }
}

/// `struct ext2_inode` (128 bytes); only its mode is read here.
#[repr(C, align(8))]
struct Inode {
    mode: u16,
    rest: [u8; 126],
}

/// A libext2fs error, with what was being done.
#[derive(Debug)]
pub struct Ext2Error {
    what: String,
    code: Errcode,
}

impl Ext2Error {
    fn new(what: impl Into<String>, code: Errcode) -> Self {
        Ext2Error {
            what: what.into(),
            code,
        }
    }

    /// The errno for the client: libext2fs passes system errors through
    /// as their errno; its own codes are far above.
    pub fn errno(&self) -> i32 {
        match i32::try_from(self.code) {
            Ok(e) if (1..4096).contains(&e) => e,
            _ => libc::EIO,
        }
    }
}

impl fmt::Display for Ext2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SAFETY: error_message returns a static or thread-local string
        // for any code, valid until the next call on this thread.
        let msg = unsafe { CStr::from_ptr(error_message(self.code)) };
        write!(f, "{}: {}", self.what, msg.to_string_lossy())
    }
}

impl std::error::Error for Ext2Error {}

fn check(what: &str, code: Errcode) -> Result<(), Ext2Error> {
    if code == 0 {
        Ok(())
    } else {
        Err(Ext2Error::new(what, code))
    }
}

/// What a channel reads and writes: the layer below of the callback in
/// progress, or nothing between callbacks.
struct Device {
    next: Cell<*const Next>,
}

/// The device of `channel`.
///
/// # Safety
/// `channel` is one of ours (made by `io_open`), whose device outlives it.
unsafe fn device<'a>(channel: *mut IoChannel) -> &'a Device {
    &*((*channel).private_data as *const Device)
}

/// Run `f` with the layer below lent to `channel`, or fail with EIO when
/// libext2fs does I/O outside a callback (it cannot: every call is in
/// `Fs::with`).
///
/// # Safety
/// As for [`device`].
unsafe fn with_next(channel: *mut IoChannel, f: impl FnOnce(&Next) -> Errcode) -> Errcode {
    let next = device(channel).next.get();
    if next.is_null() {
        return libc::EIO.into();
    }
    // SAFETY: set by `Fs::with` to the callback's `Next`, which lives
    // until that call returns and the pointer is cleared.
    f(&*next)
}

fn errcode(r: nbdhost_plugin_api::Result<()>) -> Errcode {
    match r {
        Ok(()) => 0,
        Err(e) => e.raw_errno().into(),
    }
}

/// Byte length of `count` blocks (or, negative, `-count` bytes).
///
/// # Safety
/// As for [`device`].
unsafe fn extent(channel: *mut IoChannel, block: u64, count: c_int) -> (u64, usize) {
    let bs = (*channel).block_size as u64;
    let len = if count < 0 {
        count.unsigned_abs() as usize
    } else {
        count as usize * bs as usize
    };
    (block * bs, len)
}

/// `name` is `nbdhost-ext2:ADDRESS`, the address of the `Device` that
/// `Fs::open` made for this file system.
unsafe extern "C" fn io_open(
    name: *const c_char,
    _flags: c_int,
    out: *mut *mut IoChannel,
) -> Errcode {
    // SAFETY: libext2fs passes the name given to ext2fs_open2.
    let name = CStr::from_ptr(name);
    let Some(device) = name
        .to_str()
        .ok()
        .and_then(|n| n.strip_prefix("nbdhost-ext2:"))
        .and_then(|a| usize::from_str_radix(a, 16).ok())
    else {
        return EXT2_ET_BAD_DEVICE_NAME;
    };
    let channel = Box::new(IoChannel {
        magic: EXT2_ET_MAGIC_IO_CHANNEL,
        manager: &MANAGER.0,
        name: CString::from(name).into_raw(),
        block_size: 1024,
        read_error: ptr::null(),
        write_error: ptr::null(),
        refcount: 1,
        flags: 0,
        reserved: [0; 14],
        private_data: device as *mut c_void,
        app_data: ptr::null_mut(),
        align: 0,
    });
    // SAFETY: `out` is libext2fs's place for the new channel.
    *out = Box::into_raw(channel);
    0
}

unsafe extern "C" fn io_close(channel: *mut IoChannel) -> Errcode {
    // SAFETY: a channel of ours; libext2fs counts its users in refcount
    // and the last close frees it, as io_open allocated it.
    (*channel).refcount -= 1;
    if (*channel).refcount > 0 {
        return 0;
    }
    let channel = Box::from_raw(channel);
    drop(CString::from_raw(channel.name));
    0
}

unsafe extern "C" fn io_set_blksize(channel: *mut IoChannel, size: c_int) -> Errcode {
    // SAFETY: a channel of ours.
    (*channel).block_size = size;
    0
}

unsafe extern "C" fn io_read_blk64(
    channel: *mut IoChannel,
    block: c_ulonglong,
    count: c_int,
    data: *mut c_void,
) -> Errcode {
    // SAFETY: a channel of ours; libext2fs's buffer holds the bytes it
    // asks for.
    let (offset, len) = extent(channel, block, count);
    let buf = std::slice::from_raw_parts_mut(data.cast::<u8>(), len);
    with_next(channel, |next| {
        errcode(next.pread(buf, offset, Flags::empty()))
    })
}

unsafe extern "C" fn io_write_blk64(
    channel: *mut IoChannel,
    block: c_ulonglong,
    count: c_int,
    data: *const c_void,
) -> Errcode {
    // SAFETY: as for reads.
    let (offset, len) = extent(channel, block, count);
    let buf = std::slice::from_raw_parts(data.cast::<u8>(), len);
    with_next(channel, |next| {
        errcode(next.pwrite(buf, offset, Flags::empty()))
    })
}

// `c_ulong` is 32 bits on some targets, where this conversion widens.
#[allow(clippy::useless_conversion)]
unsafe extern "C" fn io_read_blk(
    channel: *mut IoChannel,
    block: c_ulong,
    count: c_int,
    data: *mut c_void,
) -> Errcode {
    // SAFETY: the 64-bit call's contract.
    io_read_blk64(channel, block.into(), count, data)
}

// `c_ulong` is 32 bits on some targets, where this conversion widens.
#[allow(clippy::useless_conversion)]
unsafe extern "C" fn io_write_blk(
    channel: *mut IoChannel,
    block: c_ulong,
    count: c_int,
    data: *const c_void,
) -> Errcode {
    // SAFETY: the 64-bit call's contract.
    io_write_blk64(channel, block.into(), count, data)
}

// `c_ulong` is 32 bits on some targets, where this conversion widens.
#[allow(clippy::useless_conversion)]
unsafe extern "C" fn io_write_byte(
    channel: *mut IoChannel,
    offset: c_ulong,
    count: c_int,
    data: *const c_void,
) -> Errcode {
    let Ok(len) = usize::try_from(count) else {
        return EXT2_ET_INVALID_ARGUMENT;
    };
    // SAFETY: a channel of ours; `count` bytes at `data`.
    let buf = std::slice::from_raw_parts(data.cast::<u8>(), len);
    with_next(channel, |next| {
        errcode(next.pwrite(buf, offset.into(), Flags::empty()))
    })
}

unsafe extern "C" fn io_flush(channel: *mut IoChannel) -> Errcode {
    // SAFETY: a channel of ours.
    with_next(channel, |next| match next.can_flush() {
        Ok(true) => errcode(next.flush(Flags::empty())),
        Ok(false) => 0,
        Err(e) => e.raw_errno().into(),
    })
}

unsafe extern "C" fn io_set_option(
    _channel: *mut IoChannel,
    _option: *const c_char,
    _arg: *const c_char,
) -> Errcode {
    EXT2_ET_INVALID_ARGUMENT
}

/// One regular file, open in a file system over the layer below.
pub struct Fs {
    fs: Filsys,
    file: File,
    device: Box<Device>,
}

// SAFETY: libext2fs keeps no thread affinity; the filter serialises
// connections and holds the `Fs` behind a mutex, so one thread at a time
// uses it.
unsafe impl Send for Fs {}

/// libext2fs reads and writes at most this much per call (its lengths
/// are `unsigned int`).
const CHUNK: usize = 1 << 30;

impl Fs {
    /// Open the file system below `next` and the regular file at the
    /// absolute `path` in it, for writing unless `readonly`.
    pub fn open(next: &Next, readonly: bool, path: &str) -> Result<Fs, Ext2Error> {
        learn_error_messages();
        let device = Box::new(Device {
            next: Cell::new(ptr::null()),
        });
        let name = CString::new(format!(
            "nbdhost-ext2:{:x}",
            &*device as *const Device as usize
        ))
        .map_err(|_| Ext2Error::new("open", EXT2_ET_BAD_DEVICE_NAME))?;
        let mut fs = Fs {
            fs: ptr::null_mut(),
            file: ptr::null_mut(),
            device,
        };
        let flags = EXT2_FLAG_64BITS | if readonly { 0 } else { EXT2_FLAG_RW };
        let mut raw: Filsys = ptr::null_mut();
        // SAFETY: a valid name, our manager (static) and a place for the
        // handle; the device the name points at lives in `fs`.
        let r = fs.with(next, || unsafe {
            ext2fs_open2(
                name.as_ptr(),
                ptr::null(),
                flags,
                0,
                0,
                &MANAGER.0,
                &mut raw,
            )
        });
        check("open", r)?;
        fs.fs = raw;
        let rel = path.trim_start_matches('/');
        let mut ino = EXT2_ROOT_INO;
        if !rel.is_empty() {
            let c =
                CString::new(rel).map_err(|_| Ext2Error::new(path, EXT2_ET_INVALID_ARGUMENT))?;
            // SAFETY: an open file system and a valid string.
            let r = fs.with(next, || unsafe {
                ext2fs_namei(raw, EXT2_ROOT_INO, EXT2_ROOT_INO, c.as_ptr(), &mut ino)
            });
            check(&format!("{path}: namei"), r)?;
        }
        let mut inode = Inode {
            mode: 0,
            rest: [0; 126],
        };
        // SAFETY: an open file system; `inode` has the C struct's size.
        let r = fs.with(next, || unsafe { ext2fs_read_inode(raw, ino, &mut inode) });
        check(&format!("{path}: inode"), r)?;
        if inode.mode & LINUX_S_IFMT != LINUX_S_IFREG {
            return Err(Ext2Error::new(
                format!("{path}: must be a regular file in the file system"),
                EXT2_ET_INVALID_ARGUMENT,
            ));
        }
        let fflags = if readonly { 0 } else { EXT2_FILE_WRITE };
        let mut file: File = ptr::null_mut();
        // SAFETY: an open file system and a regular file's inode.
        let r = fs.with(next, || unsafe {
            ext2fs_file_open(raw, ino, fflags, &mut file)
        });
        check(&format!("{path}: open"), r)?;
        fs.file = file;
        Ok(fs)
    }

    /// Run a libext2fs call with the layer below lent to the channel.
    fn with<T>(&self, next: &Next, f: impl FnOnce() -> T) -> T {
        self.device.next.set(next);
        let r = f();
        self.device.next.set(ptr::null());
        r
    }

    /// The file's size.
    pub fn size(&self, next: &Next) -> Result<u64, Ext2Error> {
        let mut size = 0u64;
        // SAFETY: an open file.
        let r = self.with(next, || unsafe {
            ext2fs_file_get_lsize(self.file, &mut size)
        });
        check("size", r).map(|()| size)
    }

    fn seek(&self, offset: u64) -> Result<(), Ext2Error> {
        // SAFETY: an open file; seeking does no I/O.
        check("seek", unsafe {
            ext2fs_file_llseek(self.file, offset, EXT2_SEEK_SET, ptr::null_mut())
        })
    }

    /// Read `buf.len()` bytes of the file at `offset`.
    pub fn read(&self, next: &Next, buf: &mut [u8], offset: u64) -> Result<(), Ext2Error> {
        let mut done = 0;
        while done < buf.len() {
            self.seek(offset + done as u64)?;
            let want = (buf.len() - done).min(CHUNK);
            let mut got: c_uint = 0;
            // SAFETY: an open file and `want` writable bytes.
            let r = self.with(next, || unsafe {
                ext2fs_file_read(
                    self.file,
                    buf[done..].as_mut_ptr().cast(),
                    want as c_uint,
                    &mut got,
                )
            });
            check("read", r)?;
            if got == 0 {
                // Past the end of the file's data (the server checks
                // requests against the size, so this is a hole's end).
                buf[done..].fill(0);
                break;
            }
            done += got as usize;
        }
        Ok(())
    }

    /// Write `buf` into the file at `offset`.
    pub fn write(&self, next: &Next, buf: &[u8], offset: u64) -> Result<(), Ext2Error> {
        let mut done = 0;
        while done < buf.len() {
            self.seek(offset + done as u64)?;
            let want = (buf.len() - done).min(CHUNK);
            let mut written: c_uint = 0;
            // SAFETY: an open file and `want` readable bytes.
            let r = self.with(next, || unsafe {
                ext2fs_file_write(
                    self.file,
                    buf[done..].as_ptr().cast(),
                    want as c_uint,
                    &mut written,
                )
            });
            check("write", r)?;
            if written == 0 {
                return Err(Ext2Error::new("write", libc::ENOSPC.into()));
            }
            done += written as usize;
        }
        Ok(())
    }

    /// Write the file's buffered data and its inode to the file system.
    pub fn flush(&self, next: &Next) -> Result<(), Ext2Error> {
        // SAFETY: an open file.
        let r = self.with(next, || unsafe { ext2fs_file_flush(self.file) });
        check("flush", r)
    }

    /// Close the file and the file system, writing what is dirty.
    pub fn close(mut self, next: &Next) -> Result<(), Ext2Error> {
        let (fs, file) = (self.fs, self.file);
        self.fs = ptr::null_mut();
        self.file = ptr::null_mut();
        // SAFETY: the open file and file system, closed once: the fields
        // are cleared so Drop does not close them again.
        let r = self.with(next, || unsafe { ext2fs_file_close(file) });
        let r2 = self.with(next, || unsafe { ext2fs_close2(fs, 0) });
        if r2 != 0 {
            // SAFETY: ext2fs_close2 frees nothing when its flush fails.
            unsafe { ext2fs_free(fs) };
        }
        check("close", r)?;
        check("close", r2)
    }
}

impl Drop for Fs {
    // Reached without `close` only when the connection's open failed or
    // it ended unfinalised: free without writing (there is no layer
    // below to write to any more).
    fn drop(&mut self) {
        // SAFETY: whatever is still open, freed once; with no `Next` lent,
        // any write libext2fs attempts fails with EIO instead of running.
        unsafe {
            if !self.file.is_null() {
                ext2fs_file_close(self.file);
            }
            if !self.fs.is_null() {
                ext2fs_free(self.fs);
            }
        }
    }
}
