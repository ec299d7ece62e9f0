//! What every certificate the tool makes has, the CA's as the others':
//! how long it is valid, from a little before now, and a random serial
//! number.

use rcgen::SerialNumber;
use time::{Duration, OffsetDateTime};

use crate::error::Error;
use crate::random;

/// How far back a certificate's validity starts, so that a peer whose
/// clock is behind ours does not find it "not yet active" (qemu refuses
/// such a certificate outright).
const CLOCK_SKEW: Duration = Duration::hours(1);

/// The longest validity accepted, a hundred years: past that, a typo.
const MAX_DAYS: u32 = 36_525;

/// How long a certificate is valid, in days from now.
#[derive(Clone, Copy)]
pub struct Validity {
    pub days: u32,
}

impl Validity {
    /// The certificate's not-before and not-after times, in whole
    /// seconds (what X.509 can say).
    pub fn window(&self) -> Result<(OffsetDateTime, OffsetDateTime), Error> {
        if self.days == 0 || self.days > MAX_DAYS {
            return Err(Error::BadDays(self.days));
        }
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .map_err(|_| Error::BadDays(self.days))?;
        Ok((now - CLOCK_SKEW, now + Duration::days(self.days.into())))
    }
}

/// A random serial number of 126 bits: positive (the top bit of the
/// first byte clear) and exactly 16 bytes long in DER (the next bit
/// set), so that it never needs a leading zero byte and no two
/// certificates of one CA share one.
pub fn serial() -> Result<SerialNumber, Error> {
    let mut b = random::bytes::<16>()?;
    b[0] = (b[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&b))
}
