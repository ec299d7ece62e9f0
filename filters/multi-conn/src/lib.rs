//! The multi-conn filter: advertise multi-conn, emulating its flush
//! consistency for layers without it by flushing every connection's
//! layer below when a client flushes on one; or disable it; and skip
//! flushes that find nothing to flush.

#![deny(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, Error, Filter, FilterHandle, Flags, Next, NextOpener,
    RangeRequest, ReadRequest, Result, SharedNext, Support,
};

/// `multi-conn-mode=`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Mode {
    /// `emulate` when the layer below lacks multi-conn, `plugin` when it
    /// has it.
    #[default]
    Auto,
    Emulate,
    Plugin,
    Disable,
    Unsafe,
}

/// `multi-conn-track-dirty=`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Track {
    #[default]
    Connection,
    Fast,
    Off,
}

/// Dirty bits of one connection.
const WROTE: u8 = 1;
const READ: u8 = 2;

/// The connections whose flushes are kept together: all of the export's,
/// or those of one export name.
#[derive(Default)]
struct Group {
    members: Mutex<Vec<Arc<Member>>>,
    /// Written through any member since the group's last flush.
    dirty: AtomicBool,
}

/// One connection, as the other connections' flushes see it.
struct Member {
    below: SharedNext,
    /// Taken to read around every call this connection makes below, and
    /// to write around another connection's flush of it: the layers below
    /// may not allow two calls on one handle at once (serialize_requests).
    calls: RwLock<()>,
    dirty: AtomicU8,
}

impl Member {
    fn call<T>(&self, f: impl FnOnce() -> T) -> T {
        let _shared = self.calls.read().unwrap_or_else(PoisonError::into_inner);
        f()
    }
}

/// The filter's settings and the connections it tracks.
#[derive(Default)]
pub struct MultiConn {
    mode: Mode,
    track: Track,
    by_name: bool,
    /// Groups by export name (`None` for the one group without
    /// `multi-conn-exportname=true`); a group goes when its last member
    /// leaves.
    groups: Arc<Mutex<HashMap<Option<String>, Arc<Group>>>>,
}

fn parse_mode(v: &str) -> Result<Mode> {
    Ok(match v {
        "auto" => Mode::Auto,
        "emulate" => Mode::Emulate,
        "plugin" => Mode::Plugin,
        "disable" => Mode::Disable,
        "unsafe" => Mode::Unsafe,
        _ => {
            return Err(Error::new(
                libc::EINVAL,
                format!("unknown multi-conn mode '{v}'"),
            ))
        }
    })
}

fn parse_track(v: &str) -> Result<Track> {
    Ok(match v {
        "connection" | "conn" => Track::Connection,
        "fast" => Track::Fast,
        "off" => Track::Off,
        _ => {
            return Err(Error::new(
                libc::EINVAL,
                format!("unknown multi-conn track-dirty setting '{v}'"),
            ))
        }
    })
}

#[callbacks]
impl Filter for MultiConn {
    const NAME: &'static str = "multi-conn";
    const DESCRIPTION: &'static str = "enable, emulate or disable multi-conn";
    const CONFIG_HELP: &'static str =
        "multi-conn-mode=<MODE>          'auto' (default), 'emulate', 'plugin',
                                'disable', or 'unsafe'.
multi-conn-track-dirty=<LEVEL>  'conn' (default), 'fast', or 'off'.
multi-conn-exportname=<BOOL>    true to limit emulation by export name.";
    type Handle = Conn;

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "multi-conn-mode" => self.mode = parse_mode(value)?,
            "multi-conn-track-dirty" => self.track = parse_track(value)?,
            "multi-conn-exportname" | "multi-conn-export-name" => {
                self.by_name = host::parse_bool(key, value)?
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Conn> {
        next.open(readonly, export_name)?;
        Ok(Conn {
            track: self.track,
            configured: self.mode,
            key: self.by_name.then(|| export_name.to_owned()),
            groups: self.groups.clone(),
            joined: OnceLock::new(),
        })
    }
}

/// One connection: its mode, resolved in `prepare`, and its place in its
/// group, taken there too.
pub struct Conn {
    track: Track,
    configured: Mode,
    key: Option<String>,
    groups: Arc<Mutex<HashMap<Option<String>, Arc<Group>>>>,
    joined: OnceLock<Joined>,
}

struct Joined {
    mode: Mode,
    me: Arc<Member>,
    group: Arc<Group>,
}

fn not_prepared() -> Error {
    Error::new(
        libc::EIO,
        "multi-conn: request on a connection not prepared",
    )
}

impl Conn {
    fn joined(&self) -> Result<&Joined> {
        self.joined.get().ok_or_else(not_prepared)
    }

    /// Note what a request may leave in a cache: data written (for a
    /// write) or read (which a later flush elsewhere may make stale).
    fn mark(&self, j: &Joined, wrote: bool) {
        // Unlocked: a client must wait for a flush's reply before relying
        // on it, so a flush racing another request is the client's error.
        match self.track {
            Track::Connection => {
                j.me.dirty
                    .fetch_or(if wrote { WROTE } else { READ }, Ordering::AcqRel);
                if wrote {
                    j.group.dirty.store(true, Ordering::Release);
                }
            }
            Track::Fast => {
                if wrote {
                    j.group.dirty.store(true, Ordering::Release);
                }
            }
            Track::Off => {}
        }
    }

    /// A write, zero or trim: with FUA when emulating, the write goes down
    /// without it and a flush of every connection follows, so the data is
    /// stable for them all.
    fn write_like(
        &self,
        next: &Next,
        flags: Flags,
        op: impl FnOnce(Flags) -> Result<()>,
    ) -> Result<()> {
        let j = self.joined()?;
        let fua = flags.contains(Flags::FUA);
        let emulate_fua = fua && j.mode == Mode::Emulate;
        if !fua || emulate_fua {
            self.mark(j, true);
        }
        let flags = if emulate_fua {
            flags - Flags::FUA
        } else {
            flags
        };
        j.me.call(|| op(flags))?;
        if emulate_fua {
            self.flush(next, Flags::empty())?;
        }
        Ok(())
    }

    /// Flush every member of the group that needs it, this one included.
    fn flush_group(&self, j: &Joined, flags: Flags) -> Result<()> {
        let members = j
            .group
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let group_dirty = j.group.dirty.load(Ordering::Acquire);
        for m in members.iter() {
            let d = m.dirty.load(Ordering::Acquire);
            let needed = self.track == Track::Off
                || d & WROTE != 0
                || (group_dirty && (self.track == Track::Fast || d & READ != 0));
            if !needed {
                continue;
            }
            let _alone = m.calls.write().unwrap_or_else(PoisonError::into_inner);
            // SAFETY: every member is in the list from the end of its
            // handle's prepare until its finalize or drop, both of which
            // take the list's lock first, and its handle is open all that
            // time; `_alone` keeps this call apart from the handle's own.
            #[allow(unsafe_code)]
            let below = unsafe { m.below.get() };
            below.flush(flags)?;
            m.dirty.store(0, Ordering::Release);
        }
        j.group.dirty.store(false, Ordering::Release);
        Ok(())
    }

    /// Leave the group, dropping it with its last member.
    fn leave(&self) {
        let Some(j) = self.joined.get() else { return };
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        let mut members = j
            .group
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let before = members.len();
        members.retain(|m| !Arc::ptr_eq(m, &j.me));
        if members.len() != before && members.is_empty() {
            groups.remove(&self.key);
        }
    }
}

impl Drop for Conn {
    // A handle closed without finalize (a layer above failed its prepare)
    // must leave too; leaving twice is harmless.
    fn drop(&mut self) {
        self.leave();
    }
}

#[callbacks]
impl FilterHandle for Conn {
    fn prepare(&self, next: &Next, _readonly: bool) -> Result<()> {
        let mode = match self.configured {
            Mode::Auto if next.can_multi_conn()? => Mode::Plugin,
            Mode::Auto => Mode::Emulate,
            m => m,
        };
        if mode == Mode::Emulate && !next.can_flush()? {
            return Err(Error::new(
                libc::EINVAL,
                "emulating multi-conn requires working flush",
            ));
        }
        let me = Arc::new(Member {
            below: next.share(),
            calls: RwLock::new(()),
            dirty: AtomicU8::new(0),
        });
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        let group = groups.entry(self.key.clone()).or_default().clone();
        group
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(me.clone());
        self.joined
            .set(Joined { mode, me, group })
            .map_err(|_| Error::new(libc::EIO, "multi-conn: handle prepared twice"))
    }

    fn finalize(&self, _next: &Next) -> Result<()> {
        self.leave();
        Ok(())
    }

    fn can_fua(&self, next: &Next) -> Result<Support> {
        // Native FUA would reach only this connection's layer below; when
        // every connection must be flushed, FUA is a write then a flush.
        let fua = next.can_fua()?;
        let j = self.joined()?;
        Ok(match (fua, j.mode) {
            (Support::Native, Mode::Emulate) => Support::Emulate,
            (f, _) => f,
        })
    }

    fn can_multi_conn(&self, next: &Next) -> Result<bool> {
        match self.joined()?.mode {
            Mode::Emulate | Mode::Unsafe => Ok(true),
            Mode::Disable => Ok(false),
            Mode::Plugin | Mode::Auto => next.can_multi_conn(),
        }
    }

    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let j = self.joined()?;
        self.mark(j, false);
        j.me.call(|| next.pread(buf, offset, flags))
    }

    fn async_pread(&self, next: &Next, req: ReadRequest) {
        match self.joined() {
            Ok(j) => {
                self.mark(j, false);
                j.me.call(|| next.async_pread(req))
            }
            Err(e) => req.complete(Err(e)),
        }
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let j = self.joined()?;
        self.mark(j, false);
        j.me.call(|| next.cache(count, offset, flags))
    }

    fn async_cache(&self, next: &Next, req: RangeRequest) {
        match self.joined() {
            Ok(j) => {
                self.mark(j, false);
                j.me.call(|| next.async_cache(req))
            }
            Err(e) => req.complete(Err(e)),
        }
    }

    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.write_like(next, flags, |f| next.pwrite(buf, offset, f))
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.write_like(next, flags, |f| next.zero(count, offset, f))
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.write_like(next, flags, |f| next.trim(count, offset, f))
    }

    fn flush(&self, next: &Next, flags: Flags) -> Result<()> {
        let j = self.joined()?;
        if j.mode == Mode::Emulate {
            return self.flush_group(j, flags);
        }
        if self.track != Track::Off && !j.group.dirty.load(Ordering::Acquire) {
            return Ok(());
        }
        j.me.call(|| next.flush(flags))?;
        match self.track {
            Track::Connection if next.can_multi_conn()? => {
                let members = j
                    .group
                    .members
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                for m in members.iter() {
                    m.dirty.store(0, Ordering::Release);
                }
                j.group.dirty.store(false, Ordering::Release);
            }
            Track::Connection => j.me.dirty.store(0, Ordering::Release),
            Track::Fast => j.group.dirty.store(false, Ordering::Release),
            Track::Off => {}
        }
        Ok(())
    }
}

nbdhost_filter!(MultiConn);
