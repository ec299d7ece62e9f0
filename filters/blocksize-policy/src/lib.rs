//! The blocksize-policy filter: advertise block size constraints of the
//! user's choosing, and optionally refuse requests that break them before
//! they reach the layer below.

#![forbid(unsafe_code)]

use std::sync::OnceLock;

use nbdhost_plugin_api::{
    callbacks, host, nbdhost_filter, BlockSize, Error, ExtentList, ExtentsRequest, Filter,
    FilterHandle, Flags, Next, NextOpener, RangeRequest, ReadRequest, Result, WriteRequest,
};

/// What to do with a request that breaks the advertised constraints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Policy {
    /// Pass it down and let the layers below cope.
    #[default]
    Allow,
    /// Fail it with `EINVAL`.
    Error,
}

/// The configured constraints; 0 means not given.
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    policy: Policy,
    minimum: u32,
    preferred: u32,
    maximum: u32,
    disconnect: u32,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(libc::EINVAL, msg.into())
}

fn parse_u32(key: &str, value: &str) -> Result<u32> {
    host::parse_size(value)
        .ok()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| invalid(format!("{key}: could not parse {value}")))
}

impl Config {
    /// nbdkit's checks of the parameters against each other.
    fn check(&self) -> Result<()> {
        let Config {
            minimum: min,
            preferred: pref,
            maximum: max,
            disconnect,
            ..
        } = *self;
        if min != 0 && !min.is_power_of_two() {
            return Err(invalid("blocksize-minimum must be a power of 2"));
        }
        if min > 65536 {
            return Err(invalid("blocksize-minimum must be <= 64K"));
        }
        if pref != 0 && !pref.is_power_of_two() {
            return Err(invalid("blocksize-preferred must be a power of 2"));
        }
        if pref != 0 && !(512..=32 << 20).contains(&pref) {
            return Err(invalid("blocksize-preferred must be between 512 and 32M"));
        }
        if min != 0 && pref != 0 && min > pref {
            return Err(invalid("blocksize-minimum must be <= blocksize-preferred"));
        }
        if pref != 0 && max != 0 && pref > max {
            return Err(invalid("blocksize-preferred must be <= blocksize-maximum"));
        }
        if min != 0 && disconnect != 0 && disconnect <= min {
            return Err(invalid(
                "blocksize-write-disconnect must be larger than blocksize-minimum",
            ));
        }
        Ok(())
    }

    /// The constraints to advertise over a layer that advertises `below`.
    fn effective(
        &self,
        below: impl FnOnce() -> Result<Option<BlockSize>>,
    ) -> Result<Option<BlockSize>> {
        let Config {
            minimum: min,
            preferred: pref,
            maximum: max,
            disconnect,
            ..
        } = *self;
        if min != 0 && pref != 0 && max != 0 {
            return Ok(Some(BlockSize {
                minimum: min,
                preferred: pref,
                maximum: max,
            }));
        }
        let below = below()?;
        if min == 0 && pref == 0 && max == 0 {
            return Ok(below);
        }
        let pick = |mine: u32, theirs: u32| if mine != 0 { mine } else { theirs };
        let bs = match below {
            Some(b) => BlockSize {
                minimum: pick(min, b.minimum),
                preferred: pick(pref, b.preferred),
                maximum: pick(max, b.maximum),
            },
            None => {
                let minimum = pick(min, 1);
                let maximum = match (max, disconnect) {
                    (0, 0) => u32::MAX,
                    (0, d) => d - d % minimum,
                    (m, _) => m,
                };
                BlockSize {
                    minimum,
                    preferred: pick(pref, 4096),
                    maximum,
                }
            }
        };
        if bs.minimum > bs.preferred || bs.preferred > bs.maximum {
            return Err(invalid(format!(
                "computed block size values are invalid, minimum {} > preferred {} \
                 or preferred > maximum {}",
                bs.minimum, bs.preferred, bs.maximum
            )));
        }
        Ok(Some(bs))
    }
}

/// The filter's configuration, shared by every connection.
#[derive(Default)]
pub struct BlocksizePolicy {
    config: Config,
}

#[callbacks]
impl Filter for BlocksizePolicy {
    const NAME: &'static str = "blocksize-policy";
    const DESCRIPTION: &'static str = "set block size constraints and their error policy";
    const CONFIG_HELP: &'static str =
        "blocksize-error-policy=allow|error  What to do with requests that break them.
blocksize-minimum=<SIZE>            Minimum block size to advertise.
blocksize-preferred=<SIZE>          Preferred block size to advertise.
blocksize-maximum=<SIZE>            Maximum block size to advertise.
blocksize-write-disconnect=<SIZE>   Disconnect a client writing more than this.";
    type Handle = Policed;

    fn nonblocking(&self) -> bool {
        true
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        let c = &mut self.config;
        match key {
            "blocksize-error-policy" => {
                c.policy = match value {
                    "allow" => Policy::Allow,
                    "error" => Policy::Error,
                    _ => return Err(invalid(format!("unknown {key}: {value}"))),
                }
            }
            "blocksize-minimum" => c.minimum = parse_u32(key, value)?,
            "blocksize-preferred" => c.preferred = parse_u32(key, value)?,
            "blocksize-maximum" => c.maximum = parse_u32(key, value)?,
            "blocksize-write-disconnect" => c.disconnect = parse_u32(key, value)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn config_complete(&mut self) -> Result<()> {
        self.config.check()
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Policed> {
        next.open(readonly, export_name)?;
        Ok(Policed {
            config: self.config,
            sizes: OnceLock::new(),
        })
    }
}

/// One connection: the constraints it was told, worked out once.
pub struct Policed {
    config: Config,
    sizes: OnceLock<Option<BlockSize>>,
}

/// Which rules a kind of request is held to: only reads and writes have
/// a maximum.
#[derive(Clone, Copy)]
enum Kind {
    Data(&'static str),
    Range(&'static str),
}

impl Policed {
    fn sizes(&self, next: &Next) -> Result<Option<BlockSize>> {
        if let Some(s) = self.sizes.get() {
            return Ok(*s);
        }
        let s = self.config.effective(|| next.block_size())?;
        Ok(*self.sizes.get_or_init(|| s))
    }

    /// `Ok` if the request may go down.
    fn admit(&self, next: &Next, kind: Kind, count: u64, offset: u64) -> Result<()> {
        if self.config.policy == Policy::Allow {
            return Ok(());
        }
        let Some(bs) = self.sizes(next)? else {
            return Ok(());
        };
        let (what, data) = match kind {
            Kind::Data(w) => (w, true),
            Kind::Range(w) => (w, false),
        };
        let min = u64::from(bs.minimum);
        let reject = |why: String| Err(invalid(format!("client {what} request rejected: {why}")));
        if min == 0 {
            return Ok(());
        }
        if count < min {
            return reject(format!("count {count} is smaller than minimum size {min}"));
        }
        if data && count > u64::from(bs.maximum) {
            return reject(format!(
                "count {count} is larger than maximum size {}",
                bs.maximum
            ));
        }
        if count % min != 0 {
            return reject(format!(
                "count {count} is not a multiple of minimum size {min}"
            ));
        }
        if offset % min != 0 {
            return reject(format!(
                "offset {offset} is not aligned to a multiple of minimum size {min}"
            ));
        }
        Ok(())
    }

    /// A write larger than `blocksize-write-disconnect` ends the
    /// connection.
    fn admit_write(&self, next: &Next, count: u64, offset: u64) -> Result<()> {
        let limit = self.config.disconnect;
        if limit != 0 && count > u64::from(limit) {
            host::disconnect(true);
            return Err(Error::new(
                libc::ESHUTDOWN,
                "disconnecting client due to oversize write request",
            ));
        }
        self.admit(next, Kind::Data("pwrite"), count, offset)
    }
}

/// An asynchronous request this filter may refuse.
trait Refusable {
    fn refuse(self, e: Error);
}

macro_rules! refusable {
    ($($t:ty),*) => {
        $(impl Refusable for $t {
            fn refuse(self, e: Error) {
                self.complete(Err(e))
            }
        })*
    };
}

refusable!(ReadRequest, WriteRequest, RangeRequest, ExtentsRequest);

/// Pass `req` down if it was admitted, otherwise answer it with the
/// reason.
fn gate<R: Refusable>(checked: Result<()>, next: &Next, req: R, pass: fn(&Next, R)) {
    match checked {
        Ok(()) => pass(next, req),
        Err(e) => req.refuse(e),
    }
}

#[callbacks]
impl FilterHandle for Policed {
    fn prepare(&self, next: &Next, _readonly: bool) -> Result<()> {
        self.sizes(next).map(drop)
    }

    fn block_size(&self, next: &Next) -> Result<Option<BlockSize>> {
        self.sizes(next)
    }

    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.admit(next, Kind::Data("pread"), buf.len() as u64, offset)?;
        next.pread(buf, offset, flags)
    }

    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.admit_write(next, buf.len() as u64, offset)?;
        next.pwrite(buf, offset, flags)
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.admit(next, Kind::Range("trim"), count, offset)?;
        next.trim(count, offset, flags)
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.admit(next, Kind::Range("zero"), count, offset)?;
        next.zero(count, offset, flags)
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.admit(next, Kind::Range("cache"), count, offset)?;
        next.cache(count, offset, flags)
    }

    fn extents(
        &self,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
        self.admit(next, Kind::Range("extents"), count, offset)?;
        next.extents_into(count, offset, flags, list)
    }

    // Requests are only checked: on an asynchronous chain they go down
    // as they are, or are answered at once.
    fn async_pread(&self, next: &Next, req: ReadRequest) {
        let checked = self.admit(next, Kind::Data("pread"), req.len() as u64, req.offset());
        gate(checked, next, req, |n, r| n.async_pread(r))
    }

    fn async_pwrite(&self, next: &Next, req: WriteRequest) {
        let checked = self.admit_write(next, req.len() as u64, req.offset());
        gate(checked, next, req, |n, r| n.async_pwrite(r))
    }

    fn async_trim(&self, next: &Next, req: RangeRequest) {
        let checked = self.admit(next, Kind::Range("trim"), req.count(), req.offset());
        gate(checked, next, req, |n, r| n.async_trim(r))
    }

    fn async_zero(&self, next: &Next, req: RangeRequest) {
        let checked = self.admit(next, Kind::Range("zero"), req.count(), req.offset());
        gate(checked, next, req, |n, r| n.async_zero(r))
    }

    fn async_cache(&self, next: &Next, req: RangeRequest) {
        let checked = self.admit(next, Kind::Range("cache"), req.count(), req.offset());
        gate(checked, next, req, |n, r| n.async_cache(r))
    }

    fn async_extents(&self, next: &Next, req: ExtentsRequest) {
        let checked = self.admit(next, Kind::Range("extents"), req.count(), req.offset());
        gate(checked, next, req, |n, r| n.async_extents(r))
    }
}

nbdhost_filter!(BlocksizePolicy);

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(minimum: u32, preferred: u32, maximum: u32) -> Config {
        Config {
            minimum,
            preferred,
            maximum,
            ..Config::default()
        }
    }

    fn bs(minimum: u32, preferred: u32, maximum: u32) -> Option<BlockSize> {
        Some(BlockSize {
            minimum,
            preferred,
            maximum,
        })
    }

    #[test]
    fn all_three_given_are_advertised_without_asking_below() {
        let c = cfg(512, 4096, 65536);
        assert_eq!(
            c.effective(|| panic!("asked")).unwrap(),
            bs(512, 4096, 65536)
        );
    }

    #[test]
    fn none_given_advertises_what_the_layer_below_does() {
        let c = cfg(0, 0, 0);
        assert_eq!(c.effective(|| Ok(None)).unwrap(), None);
        assert_eq!(
            c.effective(|| Ok(bs(1, 512, 1024))).unwrap(),
            bs(1, 512, 1024)
        );
    }

    #[test]
    fn some_given_over_no_constraints_fill_in_nbdkit_defaults() {
        assert_eq!(
            cfg(0, 32768, 0).effective(|| Ok(None)).unwrap(),
            bs(1, 32768, u32::MAX)
        );
        assert_eq!(
            cfg(512, 0, 0).effective(|| Ok(None)).unwrap(),
            bs(512, 4096, u32::MAX)
        );
        let d = Config {
            disconnect: 10000,
            ..cfg(512, 0, 0)
        };
        assert_eq!(d.effective(|| Ok(None)).unwrap(), bs(512, 4096, 9728));
    }

    #[test]
    fn some_given_replace_those_of_the_layer_below() {
        let below = || Ok(bs(512, 4096, 1 << 20));
        assert_eq!(
            cfg(0, 65536, 0).effective(below).unwrap(),
            bs(512, 65536, 1 << 20)
        );
        assert!(
            cfg(0, 0, 1024).effective(below).is_err(),
            "preferred > maximum"
        );
    }

    #[test]
    fn parameters_are_checked_against_each_other() {
        assert!(cfg(3, 0, 0).check().is_err());
        assert!(cfg(128 << 10, 0, 0).check().is_err());
        assert!(cfg(0, 256, 0).check().is_err());
        assert!(cfg(0, 64 << 20, 0).check().is_err());
        assert!(cfg(4096, 512, 0).check().is_err());
        assert!(cfg(0, 4096, 512).check().is_err());
        let d = Config {
            disconnect: 512,
            ..cfg(512, 0, 0)
        };
        assert!(d.check().is_err());
        assert!(cfg(512, 4096, 65536).check().is_ok());
    }
}
