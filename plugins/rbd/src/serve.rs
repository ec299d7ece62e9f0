//! The plugin proper, on librbd (built when build.rs found it).
//!
//! ## One cluster connection, one image handle per image and mode
//!
//! The cluster is connected once, in `after_fork`: librados starts
//! threads when it connects, and a fork would not keep them. (A filter's
//! `startup` opens the plugin earlier, before the server goes to the
//! background; that connects on the spot, and `after_fork` connects again
//! if the process has changed since.) The image is opened then too,
//! read-only, so that a missing image, snapshot or permission stops the
//! server at start with the reason rather than at the first client.
//!
//! Connections then share one open image (one for writable connections,
//! one opened read-only for `-r` or a snapshot; with `image=POOL/`, one
//! per image asked for), kept until the plugin is unloaded, rather than
//! opening one each. librbd allows any number of
//! calls on one handle at once (see `ffi`), and sharing is what makes the
//! handle right for NBD:
//!
//! - librbd's cache (off unless the configuration chooses writeback or
//!   writethrough; see `no_write_around`) belongs to a handle. Handles of their own would let a
//!   write acknowledged on one connection sit in that handle's cache while
//!   a flush on another connection flushed only its own; with one handle a
//!   flush on any connection covers every connection's writes, which is
//!   what multi-conn promises. So `can_multi_conn` is true whatever the
//!   image's features or cache settings.
//! - With `exclusive-lock` (a default feature) only one handle at a time
//!   may write. Handles per connection would pass the lock back and forth
//!   on every write from a different connection (each hand-over flushes
//!   and invalidates the cache); one handle takes it once.
//! - qemu-img and nbdcopy open several connections, often one after
//!   another: opening an image costs several round trips to the OSDs.
//!
//! Other processes (other nbdhost servers on other hosts) have handles of
//! their own: librbd hands the exclusive lock between them on demand, and
//! a flush on one makes its writes visible to reads on the others (reads
//! are not cached unless the configuration asks for a cache; see the man
//! page for `writeback`).
//!
//! ## Requests
//!
//! Reads, writes, flushes, trims and zeroes are started with librbd's
//! asynchronous calls (`rbd_aio_*`, the plugin's `async_*` callbacks) and
//! answered from librbd's completion callback, so the number in flight
//! is bounded by the connection's byte budget rather than by `-t`. The
//! starting calls still run on the worker pool (the plugin does not
//! declare itself non-blocking): starting one can wait, for librbd's
//! throttles or for the exclusive lock to come back from another client,
//! and nothing may wait on an event loop. A worker returns as soon as the
//! call is started.
//!
//! Without a cache, librbd answers a write once the OSDs have it, so FUA
//! needs nothing more. With a cache the configuration chose, FUA is a
//! flush started right after the write (or trim, or zero), which librbd
//! orders after it (a flush waits for every write started before it);
//! librados' FUA op flag is honoured by the write-around cache but not by
//! the writeback one, so it is not relied on.
//!
//! The synchronous callbacks stay, on librbd's synchronous calls, for
//! filters above that call the plugin synchronously, and for extents,
//! which librbd has only synchronously (`rbd_diff_iterate2`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nbdhost_plugin_api::abi::{EXTENT_HOLE, EXTENT_ZERO};
use nbdhost_plugin_api::{
    callbacks, host, BlockSize, Error, ExportList, ExtentList, Flags, Handle, Plugin, RangeRequest,
    ReadRequest, Result, Support, WriteRequest,
};

use crate::config::{Config, ImageSpec, DEFAULT_TIMEOUT, HELP};
use crate::ffi::{Closed, Cluster, Errno, Image, Pool};

/// The most one `extents` call looks at, in objects: librbd asks the OSD
/// of each allocated object in the range for its extents, so a client
/// asking about a whole large disk gets an answer for the first part.
const EXTENTS_OBJECTS: u64 = 64;

/// The plugin: configuration, then (from `after_fork`) the connection.
#[derive(Default)]
pub struct Rbd {
    config: Config,
    /// Set by `after_fork`, or earlier by the first open (a filter's
    /// `startup` opens the plugin before the server forks).
    state: Mutex<Option<Arc<State>>>,
}

/// The connected cluster and the shared image handles.
struct State {
    /// The process that connected: librados' threads live only there.
    pid: u32,
    spec: ImageSpec,
    client: String,
    timeout: u32,
    pool: Arc<Pool>,
    /// The shared handles by image spec and read-only-ness, opened on
    /// first use and kept until unload.
    images: Mutex<HashMap<(String, bool), Arc<Image>>>,
    /// Whether librbd answers a write only once the OSDs have it (no
    /// cache): FUA then needs no flush.
    durable_writes: bool,
}

/// Why a call failed, in words, for the log: the errno's text plus what
/// it usually means coming from a cluster.
fn cause(e: Errno, client: &str, timeout: u32) -> String {
    let hint = match e.0 {
        libc::ENOENT => "no such image or snapshot".to_owned(),
        libc::EACCES | libc::EPERM => format!("{client} is not allowed to (check its caps)"),
        libc::ETIMEDOUT => format!("the cluster did not answer within {timeout} s"),
        // librados' EBLOCKLISTED.
        libc::ESHUTDOWN => format!("{client} was blocklisted by the cluster"),
        libc::EROFS => "the image is read-only (a snapshot, or opened read-only)".to_owned(),
        libc::EBUSY => "the image is locked by another client".to_owned(),
        _ => return e.to_string(),
    };
    format!("{e}: {hint}")
}

/// The errno the client should see. ESHUTDOWN from librados means this
/// client was blocklisted, not that the server is going away (which is
/// what NBD's ESHUTDOWN tells a client), so it becomes EIO.
fn client_errno(e: Errno) -> i32 {
    match e.0 {
        libc::ESHUTDOWN | libc::ETIMEDOUT => libc::EIO,
        n => n,
    }
}

impl State {
    fn error(&self, spec: &ImageSpec, what: impl std::fmt::Display, e: Errno) -> Error {
        Error::new(
            client_errno(e),
            format!(
                "{what} {}: {}",
                spec.display(),
                cause(e, &self.client, self.timeout)
            ),
        )
    }

    /// The image a connection asked for: the configured one, or with
    /// `image=POOL/` the one its export name (`IMAGE` or `IMAGE@SNAP`)
    /// names.
    fn requested(&self) -> Result<ImageSpec> {
        if !self.spec.is_pool() {
            return Ok(self.spec.clone());
        }
        let name = host::export_name().unwrap_or_default();
        let (image, snap) = match name.split_once('@') {
            Some((i, s)) => (i, Some(s)),
            None => (name.as_str(), None),
        };
        if image.is_empty() || image.contains('/') || snap == Some("") {
            return Err(Error::new(
                libc::ENOENT,
                format!(
                    "image={}: ask for an image of the pool by export name \
                     (IMAGE or IMAGE@SNAP; NBD_OPT_LIST lists them), not '{name}'",
                    self.spec.display()
                ),
            ));
        }
        let mut spec = self.spec.with_image(image);
        spec.snap = snap.map(str::to_owned);
        Ok(spec)
    }

    /// The shared handle of `spec` for writable (`read_only` false) or
    /// read-only connections, opened now if it is the first.
    fn image(&self, spec: &ImageSpec, read_only: bool) -> Result<Arc<Image>> {
        let mut images = self.images.lock().unwrap_or_else(|e| e.into_inner());
        let key = (spec.display(), read_only);
        if let Some(i) = images.get(&key) {
            return Ok(i.clone());
        }
        let image = Image::open(&self.pool, &spec.image, spec.snap.as_deref(), read_only)
            .map_err(|e| self.error(spec, "cannot open", e))?;
        let image = Arc::new(image);
        images.insert(key, image.clone());
        Ok(image)
    }
}

impl Rbd {
    /// The connection, made now if this is the first call to need it.
    fn state(&self) -> Result<Arc<State>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(st) = &*state {
            return Ok(st.clone());
        }
        let st = Arc::new(self.connect()?);
        *state = Some(st.clone());
        Ok(st)
    }

    /// Configure librados, connect, and check that the image opens.
    fn connect(&self) -> Result<State> {
        let c = &self.config;
        let spec = c.image.clone().expect("config_complete checked image=");
        let client = c.client_name();
        let cluster_name = c.cluster.as_deref().unwrap_or("ceph");
        let fail = |what: &str, e: Errno| Error::new(client_errno(e), format!("{what}: {e}"));
        let mut cluster =
            Cluster::create(cluster_name, &client).map_err(|e| fail("rados_create2", e))?;
        cluster
            .read_conf(c.conf.as_deref())
            .map_err(|e| match (&c.conf, e.0) {
                (None, libc::ENOENT) => Error::new(
                    libc::ENOENT,
                    format!(
                        "no {cluster_name}.conf found ($CEPH_CONF, /etc/ceph/{cluster_name}.conf, \
                     ~/.ceph/config, ./{cluster_name}.conf): give conf=FILE"
                    ),
                ),
                (Some(p), _) => fail(&format!("reading {}", p.display()), e),
                (None, _) => fail("reading the ceph configuration", e),
            })?;
        cluster
            .parse_env()
            .map_err(|e| fail("parsing $CEPH_ARGS", e))?;
        if let Some(k) = &c.keyring {
            cluster
                .set("keyring", &k.to_string_lossy())
                .map_err(|e| fail("keyring=", e))?;
        }
        let timeout = set_timeouts(&mut cluster, c.timeout)?;
        let durable_writes = no_write_around(&mut cluster)?;
        host::debug(&format!(
            "connecting to cluster {cluster_name} as {client} (timeout {timeout} s)"
        ));
        cluster.connect().map_err(|e| {
            let why = match e.0 {
                libc::ETIMEDOUT => format!(
                    "no monitor answered within {timeout} s (mon_host {})",
                    cluster.get("mon_host").unwrap_or_default()
                ),
                libc::EACCES | libc::EPERM => format!(
                    "{client} was refused: wrong key or no such user (keyring {})",
                    cluster.get("keyring").unwrap_or_default()
                ),
                libc::ENOENT => format!(
                    "no key for {client} found (keyring {})",
                    cluster.get("keyring").unwrap_or_default()
                ),
                _ => e.to_string(),
            };
            Error::new(
                client_errno(e),
                format!("cannot connect to cluster {cluster_name}: {why}"),
            )
        })?;
        let cluster = Arc::new(cluster);
        let pool = Pool::open(&cluster, &spec.pool, &spec.namespace).map_err(|e| {
            let why = if e.0 == libc::ENOENT {
                "no such pool".to_owned()
            } else {
                cause(e, &client, timeout)
            };
            Error::new(client_errno(e), format!("pool {}: {why}", spec.pool))
        })?;
        let state = State {
            pid: std::process::id(),
            spec,
            client,
            timeout,
            pool: Arc::new(pool),
            images: Mutex::new(HashMap::new()),
            durable_writes,
        };
        let spec = &state.spec;
        if spec.is_pool() {
            // Listing needs the same read access to the pool as opening.
            let n = state
                .pool
                .images()
                .map_err(|e| state.error(spec, "cannot list the images of", e))?
                .len();
            host::debug(&format!("serving the {n} images of {}", spec.display()));
            return Ok(state);
        }
        // Opened read-only (no watch, no lock), only to fail now if the
        // image or snapshot is missing or not ours to read.
        let probe = Image::open(&state.pool, &spec.image, spec.snap.as_deref(), true)
            .map_err(|e| state.error(spec, "cannot open", e))?;
        let size = probe.size().map_err(|e| state.error(spec, "size of", e))?;
        drop(probe);
        host::debug(&format!("serving {} ({size} bytes)", spec.display()));
        Ok(state)
    }
}

/// Bound every wait on the cluster: connecting (`client_mount_timeout`),
/// monitor and OSD requests (`rados_mon_op_timeout`,
/// `rados_osd_op_timeout`). `timeout=` sets all three; without it, each
/// that the configuration left at librados' default (forever for the
/// requests, 300 s for connecting) becomes [`DEFAULT_TIMEOUT`], so that an
/// unreachable cluster gives errors, not hung clients and a hung
/// shutdown. Returns the timeout for log messages.
fn set_timeouts(cluster: &mut Cluster, explicit: Option<u32>) -> Result<u32> {
    let t = explicit.unwrap_or(DEFAULT_TIMEOUT);
    for (option, librados_default) in [
        ("client_mount_timeout", 300.0),
        ("rados_mon_op_timeout", 0.0),
        ("rados_osd_op_timeout", 0.0),
    ] {
        let current: f64 = cluster
            .get(option)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(librados_default);
        if explicit.is_some() || current == librados_default {
            cluster
                .set(option, &t.to_string())
                .map_err(|e| Error::new(libc::EINVAL, format!("setting {option}: {e}")))?;
        }
    }
    Ok(t)
}

/// Turn librbd's write-around cache off, unless the configuration chose
/// another cache policy; returns whether writes are then answered only
/// once the OSDs have them (no cache at all).
///
/// Write-around (librbd's default: `rbd_cache=true`,
/// `rbd_cache_policy=writearound`) answers a write at once and sends it
/// on; a write that then fails is to be reported by the next flush. In
/// librbd 16 it is not, whenever the flush reaches the cache after the
/// writes have ended, which is the usual order (the flush first waits for
/// the writes in flight): with the cluster gone, writes time out and the
/// flush after them succeeds. Timeouts, which the plugin sets, are what
/// make writes fail rather than wait. So that a flush (or FUA) never
/// acknowledges a lost write, the cache is off: writes are answered when
/// the OSDs have them, as `rbd_cache=false` does, and reads were not
/// cached under write-around anyway. `writeback` or `writethrough` in
/// the configuration is left alone (and FUA is a write and a flush).
fn no_write_around(cluster: &mut Cluster) -> Result<bool> {
    let get = |option: &str| cluster.get(option).unwrap_or_default();
    let (cache, policy) = (get("rbd_cache"), get("rbd_cache_policy"));
    if cache == "false" {
        return Ok(true);
    }
    if policy != "writearound" {
        host::debug(&format!("rbd_cache_policy={policy}, as configured"));
        return Ok(false);
    }
    cluster
        .set("rbd_cache", "false")
        .map_err(|e| Error::new(libc::EINVAL, format!("setting rbd_cache: {e}")))?;
    Ok(true)
}

#[callbacks]
impl Plugin for Rbd {
    const NAME: &'static str = "rbd";
    const DESCRIPTION: &'static str = "Ceph RBD images through librbd";
    const CONFIG_HELP: &'static str = HELP;
    const MAGIC_CONFIG_KEY: Option<&'static str> = Some("image");
    type Handle = RbdHandle;

    fn config(&mut self, key: &str, value: &str) -> Result<()> {
        self.config.set(key, value)
    }

    fn config_complete(&mut self) -> Result<()> {
        self.config.complete()
    }

    /// Connect, unless already connected in this process. A filter's
    /// `startup` may have opened the image before the server went to the
    /// background: that connection's threads stayed with the parent, so
    /// here it is abandoned (closing it would wait for threads that are
    /// gone) and a new one made.
    fn after_fork(&self) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = state.take() {
            if old.pid == std::process::id() {
                *state = Some(old);
                return Ok(());
            }
            host::debug("connected before the server forked: connecting again");
            std::mem::forget(old);
        }
        *state = Some(Arc::new(self.connect()?));
        Ok(())
    }

    /// The pool's images with `image=POOL/`; otherwise the one export.
    fn list_exports(&self, readonly: bool, is_tls: bool, exports: &mut ExportList) -> Result<()> {
        let st = self.state()?;
        if !st.spec.is_pool() {
            return exports.add(
                &self.default_export(readonly, is_tls)?,
                Some(&format!("rbd image {}", st.spec.display())),
            );
        }
        let mut names = st
            .pool
            .images()
            .map_err(|e| st.error(&st.spec, "cannot list the images of", e))?;
        names.sort();
        for name in names {
            exports.add(&name, None)?;
        }
        Ok(())
    }

    fn open(&self, readonly: bool) -> Result<RbdHandle> {
        let st = self.state()?;
        let spec = st.requested()?;
        // A snapshot cannot be written: open it read-only whatever -r says.
        let read_only = readonly || spec.snap.is_some();
        let image = st.image(&spec, read_only)?;
        let size = image.size().map_err(|e| st.error(&spec, "size of", e))?;
        let object_size = image
            .object_size()
            .map_err(|e| st.error(&spec, "stat of", e))?;
        let features = image
            .features()
            .map_err(|e| st.error(&spec, "features of", e))?;
        host::debug(&format!(
            "{} opened{}: {size} bytes, {object_size}-byte objects, features {features:#x}",
            spec.display(),
            if read_only { " read-only" } else { "" }
        ));
        Ok(RbdHandle {
            // A clone's discards may have to copy its parent's data up
            // first, so zeroing one is not guaranteed fast.
            has_parent: image.has_parent(),
            image,
            who: Arc::new(Who {
                name: spec.display(),
                client: st.client.clone(),
                timeout: st.timeout,
            }),
            size,
            object_size,
            read_only,
            durable_writes: st.durable_writes,
        })
    }

    fn unload(&mut self) {
        let Some(st) = self
            .state
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        // Every connection is closed by now, so this is the last Arc.
        let Ok(st) = Arc::try_unwrap(st) else {
            return;
        };
        // Each image flushes and releases its lock as it closes, given at
        // most one cluster timeout in all: with the cluster gone, every
        // step of a close would wait a timeout of its own.
        let deadline = Instant::now() + Duration::from_secs(st.timeout.max(1).into());
        let images = std::mem::take(&mut *st.images.lock().unwrap_or_else(|e| e.into_inner()));
        let mut abandoned = 0;
        for ((name, _), image) in images {
            // Every connection is closed by now, so this is the last Arc.
            let Ok(image) = Arc::try_unwrap(image) else {
                continue;
            };
            match image.close_within(deadline) {
                Closed::Done(Ok(())) => {}
                Closed::Done(Err(e)) => host::debug(&format!(
                    "closing {name}: {}",
                    cause(e, &st.client, st.timeout)
                )),
                Closed::Abandoned => {
                    abandoned += 1;
                    host::debug(&format!(
                        "closing {name}: no answer from the cluster within {} s; not waiting",
                        st.timeout
                    ));
                }
            }
        }
        if abandoned > 0 {
            // A close still runs inside librbd on the ioctx and the
            // cluster handle, which must stay as they are: shutting the
            // cluster down under it could not end well, and the process
            // is about to exit.
            std::mem::forget(st);
        }
    }
}

/// One connection: the shared image handle and what was read at open.
pub struct RbdHandle {
    image: Arc<Image>,
    who: Arc<Who>,
    size: u64,
    object_size: u64,
    read_only: bool,
    has_parent: bool,
    /// See [`State::durable_writes`].
    durable_writes: bool,
}

/// What an error message names: the image, and the client and timeout
/// for the cause. Shared with the requests in flight, which fail on
/// librbd's thread.
struct Who {
    name: String,
    client: String,
    timeout: u32,
}

impl Who {
    fn error(&self, what: impl std::fmt::Display, e: Errno) -> Error {
        Error::new(
            client_errno(e),
            format!(
                "{what} {}: {}",
                self.name,
                cause(e, &self.client, self.timeout)
            ),
        )
    }
}

impl RbdHandle {
    fn error(&self, what: impl std::fmt::Display, e: Errno) -> Error {
        self.who.error(what, e)
    }

    /// Whether a zero with `flags` writes zeroes (thick) rather than
    /// deallocating; `ENOTSUP` for a fast zero that would not be fast.
    fn refuse_zero(&self, flags: Flags) -> Result<bool> {
        let thick = !flags.contains(Flags::MAY_TRIM);
        if flags.contains(Flags::FAST_ZERO) && (thick || self.has_parent) {
            return Err(Error::errno(libc::ENOTSUP));
        }
        Ok(thick)
    }

    /// Whether a request with `flags` needs a flush after it: FUA, when
    /// librbd may answer writes before the OSDs have them.
    fn flush_after(&self, flags: Flags) -> bool {
        flags.contains(Flags::FUA) && !self.durable_writes
    }

    fn fua(&self, flags: Flags) -> Result<()> {
        if self.flush_after(flags) {
            self.flush(Flags::empty())?;
        }
        Ok(())
    }
}

#[callbacks]
impl Handle for RbdHandle {
    fn get_size(&self) -> Result<u64> {
        Ok(self.size)
    }

    /// Any alignment works; the preferred size is the object size, so
    /// that copying clients write whole objects (one OSD operation each)
    /// and trims and zeroes free whole objects rather than zeroing parts.
    fn block_size(&self) -> Result<Option<BlockSize>> {
        let preferred = self
            .object_size
            .clamp(4096, 32 << 20)
            .next_power_of_two()
            .min(32 << 20) as u32;
        Ok(Some(BlockSize {
            minimum: 1,
            preferred,
            maximum: u32::MAX,
        }))
    }

    fn can_write(&self) -> Result<bool> {
        Ok(!self.read_only)
    }
    fn can_flush(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_trim(&self) -> Result<bool> {
        Ok(!self.read_only)
    }
    fn can_zero(&self) -> Result<bool> {
        Ok(!self.read_only)
    }
    fn can_fast_zero(&self) -> Result<bool> {
        Ok(!self.read_only)
    }
    fn can_fua(&self) -> Result<Support> {
        Ok(Support::Native)
    }
    /// Every connection shares one image handle (see the module comment).
    fn can_multi_conn(&self) -> Result<bool> {
        Ok(true)
    }
    fn can_extents(&self) -> Result<bool> {
        Ok(true)
    }
    fn export_description(&self) -> Option<String> {
        Some(format!("rbd image {}", self.who.name))
    }

    fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.image.read(buf, offset).map_err(|e| {
            self.error(
                format_args!("read of {} bytes at {offset} from", buf.len()),
                e,
            )
        })
    }

    fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.image.write(buf, offset).map_err(|e| {
            self.error(
                format_args!("write of {} bytes at {offset} to", buf.len()),
                e,
            )
        })?;
        self.fua(flags)
    }

    fn flush(&self, _flags: Flags) -> Result<()> {
        self.image.flush().map_err(|e| self.error("flush of", e))
    }

    fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.image
            .discard(offset, count)
            .map_err(|e| self.error(format_args!("discard of {count} bytes at {offset} in"), e))?;
        self.fua(flags)
    }

    /// `rbd_write_zeroes`: deallocating unless the client asked for no
    /// holes, when it writes zeroes (thick provisioning), which is no
    /// faster than the client writing them, so a fast zero is refused
    /// then. A clone's zeroing may copy its parent's data first, so a fast
    /// zero is refused on a clone too.
    fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let thick = self.refuse_zero(flags)?;
        self.image
            .write_zeroes(offset, count, thick)
            .map_err(|e| self.error(format_args!("zeroing {count} bytes at {offset} in"), e))?;
        self.fua(flags)
    }

    /// `rbd_aio_read`, answered from librbd's callback.
    fn async_pread(&self, req: ReadRequest) {
        let who = self.who.clone();
        let offset = req.offset();
        self.image.aio_read(offset, req, move |req, r| {
            let r = r.map_err(|e| {
                who.error(
                    format_args!("read of {} bytes at {offset} from", req.len()),
                    e,
                )
            });
            req.complete(r);
        });
    }

    /// `rbd_aio_write`, and with FUA `rbd_aio_flush` after it.
    fn async_pwrite(&self, req: WriteRequest) {
        let who = self.who.clone();
        let (offset, fua) = (req.offset(), self.flush_after(req.flags()));
        self.image.aio_write(offset, req, fua, move |req, r| {
            let r = r.map_err(|e| {
                who.error(
                    format_args!("write of {} bytes at {offset} to", req.len()),
                    e,
                )
            });
            req.complete(r);
        });
    }

    fn async_flush(&self, req: RangeRequest) {
        let who = self.who.clone();
        self.image.aio_flush(req, move |req, r| {
            req.complete(r.map_err(|e| who.error("flush of", e)));
        });
    }

    fn async_trim(&self, req: RangeRequest) {
        let who = self.who.clone();
        let (count, offset) = (req.count(), req.offset());
        let fua = self.flush_after(req.flags());
        self.image
            .aio_discard(offset, count, fua, req, move |req, r| {
                let r = r.map_err(|e| {
                    who.error(format_args!("discard of {count} bytes at {offset} in"), e)
                });
                req.complete(r);
            });
    }

    /// As `zero`, with `rbd_aio_write_zeroes`.
    fn async_zero(&self, req: RangeRequest) {
        let thick = match self.refuse_zero(req.flags()) {
            Ok(thick) => thick,
            Err(e) => return req.complete(Err(e)),
        };
        let who = self.who.clone();
        let (count, offset) = (req.count(), req.offset());
        let fua = self.flush_after(req.flags());
        self.image
            .aio_write_zeroes(offset, count, thick, fua, req, move |req, r| {
                let r = r.map_err(|e| {
                    who.error(format_args!("zeroing {count} bytes at {offset} in"), e)
                });
                req.complete(r);
            });
    }

    /// Allocation from `rbd_diff_iterate2` from the beginning of time
    /// (parent included, byte-exact rather than whole objects): what it
    /// reports is data; gaps and pieces known to be zero are holes.
    fn extents(&self, count: u64, offset: u64, _flags: Flags, list: &mut ExtentList) -> Result<()> {
        let obj = self.object_size.max(4096);
        let limit = (offset / obj + EXTENTS_OBJECTS) * obj;
        let end = (offset + count).min(limit).min(self.size);
        if end <= offset {
            return list.add(offset, count, 0);
        }
        let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
        self.image
            .diff(offset, end - offset, &mut |o, l, exists| {
                pieces.push((o, l, exists))
            })
            .map_err(|e| {
                self.error(
                    format_args!("allocation of {count} bytes at {offset} in"),
                    e,
                )
            })?;
        // Objects come in order on plain images, but a striped image's
        // pieces interleave: sort them, then fill the gaps with holes.
        pieces.sort_unstable_by_key(|p| p.0);
        let mut runs = Runs::new(offset);
        for (o, l, exists) in pieces {
            let (start, stop) = (o.max(offset), (o + l).min(end));
            if start >= stop {
                continue;
            }
            runs.push(start, stop, exists);
        }
        runs.finish(end);
        for (o, l, typ) in runs.out {
            list.add(o, l, typ)?;
        }
        Ok(())
    }
}

/// Extents being built: contiguous, in order, neighbours of one type merged.
struct Runs {
    pos: u64,
    out: Vec<(u64, u64, u32)>,
}

impl Runs {
    fn new(offset: u64) -> Self {
        Runs {
            pos: offset,
            out: Vec::new(),
        }
    }

    fn add(&mut self, start: u64, stop: u64, typ: u32) {
        if let Some(last) = self.out.last_mut() {
            if last.2 == typ && last.0 + last.1 == start {
                last.1 += stop - start;
                self.pos = stop;
                return;
            }
        }
        self.out.push((start, stop - start, typ));
        self.pos = stop;
    }

    /// A piece `[start, stop)`: a hole before it if there is a gap, then
    /// data (or a hole, for a piece known to be zero). Overlaps with what
    /// was already placed are cut off.
    fn push(&mut self, start: u64, stop: u64, data: bool) {
        let start = start.max(self.pos);
        if start >= stop {
            return;
        }
        if start > self.pos {
            self.add(self.pos, start, EXTENT_HOLE | EXTENT_ZERO);
        }
        let typ = if data { 0 } else { EXTENT_HOLE | EXTENT_ZERO };
        self.add(start, stop, typ);
    }

    fn finish(&mut self, end: u64) {
        if self.pos < end {
            self.add(self.pos, end, EXTENT_HOLE | EXTENT_ZERO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u32 = EXTENT_HOLE | EXTENT_ZERO;

    #[test]
    fn gaps_between_allocated_pieces_become_holes() {
        let mut r = Runs::new(100);
        r.push(200, 300, true);
        r.push(300, 400, true);
        r.push(400, 500, false);
        r.push(600, 700, true);
        r.finish(1000);
        assert_eq!(
            r.out,
            [
                (100, 100, H),
                (200, 200, 0),
                (400, 200, H),
                (600, 100, 0),
                (700, 300, H)
            ]
        );
    }

    #[test]
    fn a_range_with_nothing_allocated_is_one_hole() {
        let mut r = Runs::new(0);
        r.finish(4096);
        assert_eq!(r.out, [(0, 4096, H)]);
    }

    #[test]
    fn overlapping_pieces_are_not_reported_twice() {
        let mut r = Runs::new(0);
        r.push(0, 100, true);
        r.push(50, 150, true);
        r.finish(150);
        assert_eq!(r.out, [(0, 150, 0)]);
    }

    #[test]
    fn blocklisting_and_timeouts_reach_the_client_as_io_errors() {
        assert_eq!(client_errno(Errno(libc::ESHUTDOWN)), libc::EIO);
        assert_eq!(client_errno(Errno(libc::ETIMEDOUT)), libc::EIO);
        assert_eq!(client_errno(Errno(libc::EROFS)), libc::EROFS);
        assert!(cause(Errno(libc::EPERM), "client.x", 5).contains("client.x"));
    }
}
