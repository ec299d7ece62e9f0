//! The swab filter: serve the layer below with the bytes of each 2-, 4-
//! or 8-byte word in reverse order (nbdkit's swab filter, `swab-bits=`).
//! Requests must be aligned to the word; the size is rounded down to it.

#![forbid(unsafe_code)]

use nbdhost_plugin_api::{
    callbacks, nbdhost_filter, BlockSize, Error, ExtentList, Filter, FilterHandle, Flags, Next,
    NextOpener, RangeRequest, ReadRequest, Result, WriteRequest,
};

/// The configured word size.
pub struct Swab {
    /// Bytes per word: 1 (no swapping), 2, 4 or 8.
    word: u64,
}

impl Default for Swab {
    fn default() -> Self {
        Swab { word: 2 }
    }
}

#[callbacks]
impl Filter for Swab {
    const NAME: &'static str = "swab";
    const DESCRIPTION: &'static str = "swap the byte order of the disk";
    const CONFIG_HELP: &'static str = "swab-bits=8|16|32|64       Size of byte swap (default 16).";
    type Handle = SwabHandle;

    fn nonblocking(&self) -> bool {
        true
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        if key != "swab-bits" {
            return Ok(false);
        }
        self.word = match value.trim().parse::<u32>() {
            Ok(bits @ (8 | 16 | 32 | 64)) => u64::from(bits / 8),
            _ => {
                return Err(Error::new(
                    libc::EINVAL,
                    "invalid swab-bits, must be 8, 16, 32 or 64",
                ))
            }
        };
        Ok(true)
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<SwabHandle> {
        next.open(readonly, export_name)?;
        Ok(SwabHandle { word: self.word })
    }
}

/// One connection.
pub struct SwabHandle {
    word: u64,
}

/// Reverse the bytes of each `word`-byte word of `buf`, in place.
fn swap_words(buf: &mut [u8], word: u64) {
    for w in buf.chunks_exact_mut(word as usize) {
        w.reverse();
    }
}

impl SwabHandle {
    fn aligned(&self, count: u64, offset: u64) -> Result<()> {
        if count % self.word == 0 && offset % self.word == 0 {
            Ok(())
        } else {
            Err(Error::new(
                libc::EINVAL,
                "swab: requests to this filter must be aligned",
            ))
        }
    }

    fn swapped(&self, buf: &[u8]) -> Vec<u8> {
        let mut v = buf.to_vec();
        swap_words(&mut v, self.word);
        v
    }
}

/// Extents whose boundaries fall on multiples of `word`: a word that
/// straddles a boundary gets the types both sides share (it is a hole or
/// reads as zeroes only if all of it does). Where the extents given end
/// inside a word, the list stops before that word, or, if that leaves it
/// empty, reports the word as data.
fn aligned_extents(exts: &[(u64, u64, u32)], word: u64) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    let push = |out: &mut Vec<(u64, u64, u32)>, o: u64, l: u64, t: u32| match out.last_mut() {
        Some(last) if last.2 == t && last.0 + last.1 == o => last.1 += l,
        _ => out.push((o, l, t)),
    };
    let Some(&(first, _, _)) = exts.first() else {
        return out;
    };
    let mut pos = first - first % word;
    for (i, &(o, l, t)) in exts.iter().enumerate() {
        let end = o + l;
        if end <= pos {
            continue;
        }
        let whole_end = end - end % word;
        if whole_end > pos {
            push(&mut out, pos, whole_end - pos, t);
            pos = whole_end;
        }
        if end % word == 0 {
            continue;
        }
        let word_end = pos + word;
        let mut typ = t;
        let mut covered = end;
        for &(_, l2, t2) in &exts[i + 1..] {
            if covered >= word_end {
                break;
            }
            typ &= t2;
            covered += l2;
        }
        if covered < word_end {
            if out.is_empty() {
                out.push((pos, word, 0));
            }
            return out;
        }
        push(&mut out, pos, word, typ);
        pos = word_end;
    }
    out
}

#[callbacks]
impl FilterHandle for SwabHandle {
    fn get_size(&self, next: &Next) -> Result<u64> {
        let size = next.get_size()?;
        Ok(size - size % self.word)
    }

    fn block_size(&self, next: &Next) -> Result<Option<BlockSize>> {
        let word = self.word as u32;
        Ok(Some(match next.block_size()? {
            Some(b) => BlockSize {
                minimum: b.minimum.max(word),
                preferred: b.preferred.max(word),
                maximum: b.maximum,
            },
            None => BlockSize {
                minimum: word,
                preferred: 512,
                maximum: u32::MAX,
            },
        }))
    }

    fn pread(&self, next: &Next, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.aligned(buf.len() as u64, offset)?;
        next.pread(buf, offset, flags)?;
        swap_words(buf, self.word);
        Ok(())
    }

    fn pwrite(&self, next: &Next, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.aligned(buf.len() as u64, offset)?;
        next.pwrite(&self.swapped(buf), offset, flags)
    }

    fn trim(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.aligned(count, offset)?;
        next.trim(count, offset, flags)
    }

    fn zero(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.aligned(count, offset)?;
        next.zero(count, offset, flags)
    }

    fn cache(&self, next: &Next, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.aligned(count, offset)?;
        next.cache(count, offset, flags)
    }

    // Extents stay synchronous, as the offset filter's do: their answer
    // must be rebuilt.
    fn extents(
        &self,
        next: &Next,
        count: u64,
        offset: u64,
        flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
        self.aligned(count, offset)?;
        let flags = flags - Flags::REQ_ONE;
        let mut below = next.extents(count, offset, flags)?;
        // A layer below may answer with less than one word (one extent at
        // a time): ask for the rest of the first word, as nbdkit does, so
        // that its type is what all of it shares rather than a guess of
        // data.
        let word_end = offset + self.word;
        while let Some(end) = below.last().map(|&(o, n, _)| o + n) {
            if end >= word_end {
                break;
            }
            let more = next.extents(word_end - end, end, flags)?;
            if more.last().is_none_or(|&(o, n, _)| o + n <= end) {
                break;
            }
            below.extend(more);
        }
        for (o, l, t) in aligned_extents(&below, self.word) {
            let end = (o + l).min(offset + count);
            if end > o {
                list.add(o, end - o, t)?;
            }
        }
        Ok(())
    }

    fn async_pread(&self, next: &Next, req: ReadRequest) {
        if let Err(e) = self.aligned(req.len() as u64, req.offset()) {
            return req.complete(Err(e));
        }
        let word = self.word;
        next.async_pread_then(req, move |_, mut req, r| {
            if r.is_ok() {
                swap_words(req.buf(), word);
            }
            req.complete(r)
        })
    }

    fn async_pwrite(&self, next: &Next, req: WriteRequest) {
        if let Err(e) = self.aligned(req.len() as u64, req.offset()) {
            return req.complete(Err(e));
        }
        let data = self.swapped(req.buf());
        let (offset, flags) = (req.offset(), req.flags());
        next.async_pwrite_owned(data, offset, flags, move |_, _, r| req.complete(r))
    }

    fn async_trim(&self, next: &Next, req: RangeRequest) {
        match self.aligned(req.count(), req.offset()) {
            Ok(()) => next.async_trim(req),
            Err(e) => req.complete(Err(e)),
        }
    }

    fn async_zero(&self, next: &Next, req: RangeRequest) {
        match self.aligned(req.count(), req.offset()) {
            Ok(()) => next.async_zero(req),
            Err(e) => req.complete(Err(e)),
        }
    }

    fn async_cache(&self, next: &Next, req: RangeRequest) {
        match self.aligned(req.count(), req.offset()) {
            Ok(()) => next.async_cache(req),
            Err(e) => req.complete(Err(e)),
        }
    }
}

nbdhost_filter!(Swab);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_reversed() {
        let mut b = [0u8, 1, 2, 3, 4, 5, 6, 7];
        swap_words(&mut b, 2);
        assert_eq!(b, [1, 0, 3, 2, 5, 4, 7, 6]);
        let mut b = [0u8, 1, 2, 3, 4, 5, 6, 7];
        swap_words(&mut b, 8);
        assert_eq!(b, [7, 6, 5, 4, 3, 2, 1, 0]);
    }

    #[test]
    fn a_word_across_a_boundary_keeps_only_shared_types() {
        let exts = [(0, 5, 3), (5, 11, 2)];
        assert_eq!(aligned_extents(&exts, 4), vec![(0, 4, 3), (4, 12, 2)]);
        let exts = [(0, 4, 3), (4, 1, 0), (5, 11, 3)];
        assert_eq!(aligned_extents(&exts, 8), vec![(0, 8, 0), (8, 8, 3)]);
    }

    #[test]
    fn extents_ending_inside_a_word_stop_before_it() {
        assert_eq!(aligned_extents(&[(0, 9, 3)], 8), vec![(0, 8, 3)]);
        assert_eq!(aligned_extents(&[(0, 3, 3)], 8), vec![(0, 8, 0)]);
    }
}
