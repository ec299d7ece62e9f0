//! The extentlist filter: answer block status from a static list of
//! extents read from a file, for layers that cannot tell where their
//! holes are (an sftp or http source whose sparseness is known
//! elsewhere).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use nbdhost_plugin_api::{
    abi, callbacks, host, nbdhost_filter, Error, ExtentList, ExtentsRequest, Filter, FilterHandle,
    Flags, Next, NextOpener, Result,
};

/// What a gap in the list is: a hole that reads as zeroes.
const HOLE: u32 = abi::EXTENT_HOLE | abi::EXTENT_ZERO;

/// One extent of the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Extent {
    offset: u64,
    length: u64,
    typ: u32,
}

impl Extent {
    fn end(&self) -> u64 {
        self.offset + self.length
    }
}

fn invalid(msg: String) -> Error {
    Error::new(libc::EINVAL, msg)
}

/// The type field: a number (its leading digits, as `scanf` reads it), or
/// words among which `hole` and `zero` count.
fn parse_type(field: Option<&str>) -> u32 {
    let Some(field) = field else {
        return 0;
    };
    let digits: String = field.chars().take_while(char::is_ascii_digit).collect();
    if let Ok(n) = digits.parse() {
        return n;
    }
    let mut typ = 0;
    if field.contains("hole") {
        typ |= abi::EXTENT_HOLE;
    }
    if field.contains("zero") {
        typ |= abi::EXTENT_ZERO;
    }
    typ
}

/// Parse the file's text into a sorted list that covers every offset,
/// gaps filled with holes. `size` parses an offset or a length.
fn parse(text: &str, name: &str, size: impl Fn(&str) -> Result<u64>) -> Result<Vec<Extent>> {
    let mut given = Vec::new();
    for line in text.lines() {
        let mut fields = line.split([' ', '\t']).filter(|f| !f.is_empty());
        let (Some(offset), Some(length)) = (fields.next(), fields.next()) else {
            return Err(invalid(format!("{name}: cannot parse {line}")));
        };
        let (offset, length) = (size(offset)?, size(length)?);
        if length == 0 {
            continue;
        }
        given.push(Extent {
            offset,
            length,
            typ: parse_type(fields.next()),
        });
    }
    given.sort_by_key(|e| e.offset);
    let mut out = Vec::with_capacity(2 * given.len() + 1);
    let mut end = 0;
    for e in given {
        if e.offset < end || e.offset.checked_add(e.length).is_none() {
            return Err(invalid(format!(
                "{name}: extents in the extent list are overlapping"
            )));
        }
        if e.offset > end {
            out.push(Extent {
                offset: end,
                length: e.offset - end,
                typ: HOLE,
            });
        }
        end = e.end();
        out.push(e);
    }
    if end < u64::MAX {
        out.push(Extent {
            offset: end,
            length: u64::MAX - end,
            typ: HOLE,
        });
    }
    Ok(out)
}

/// Add the extents of `list` that cover `count` bytes at `offset`.
fn describe(list: &[Extent], count: u64, offset: u64, out: &mut ExtentList) -> Result<()> {
    let stop = offset.saturating_add(count);
    let first = list.partition_point(|e| e.end() <= offset);
    let mut at = offset;
    for e in &list[first..] {
        if at >= stop {
            break;
        }
        let end = e.end().min(stop);
        out.add(at, end - at, e.typ)?;
        at = end;
    }
    Ok(())
}

/// The file named on the command line and, once read, its extents.
#[derive(Default)]
pub struct ExtentListFilter {
    file: Option<PathBuf>,
    extents: Arc<Vec<Extent>>,
}

#[callbacks]
impl Filter for ExtentListFilter {
    const NAME: &'static str = "extentlist";
    const DESCRIPTION: &'static str = "answer block status from a list of extents in a file";
    const CONFIG_HELP: &'static str = "extentlist=<FILENAME>  File of extents (required).";
    type Handle = Listed;

    fn nonblocking(&self) -> bool {
        true
    }

    fn config(&mut self, key: &str, value: &str) -> Result<bool> {
        if key != "extentlist" {
            return Ok(false);
        }
        if self.file.is_some() {
            return Err(invalid("extentlist cannot appear twice".into()));
        }
        self.file = Some(value.into());
        Ok(true)
    }

    fn config_complete(&mut self) -> Result<()> {
        let Some(file) = &self.file else {
            return Err(invalid(
                "you must supply the extentlist parameter on the command line".into(),
            ));
        };
        let name = file.display().to_string();
        let text = std::fs::read_to_string(file).map_err(|e| {
            Error::new(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("open: {name}: {e}"),
            )
        })?;
        self.extents = Arc::new(parse(&text, &name, host::parse_size)?);
        Ok(())
    }

    fn open(&self, next: &NextOpener, readonly: bool, export_name: &str) -> Result<Listed> {
        next.open(readonly, export_name)?;
        Ok(Listed {
            extents: self.extents.clone(),
        })
    }
}

/// One connection, sharing the filter's list.
pub struct Listed {
    extents: Arc<Vec<Extent>>,
}

#[callbacks]
impl FilterHandle for Listed {
    fn can_extents(&self, _next: &Next) -> Result<bool> {
        Ok(true)
    }

    fn extents(
        &self,
        _next: &Next,
        count: u64,
        offset: u64,
        _flags: Flags,
        list: &mut ExtentList,
    ) -> Result<()> {
        describe(&self.extents, count, offset, list)
    }

    // The answer is in memory: an asynchronous request is answered at
    // once, without going down.
    fn async_extents(&self, _next: &Next, mut req: ExtentsRequest) {
        let (count, offset) = (req.count(), req.offset());
        let r = describe(&self.extents, count, offset, req.list());
        req.complete(r);
    }
}

nbdhost_filter!(ExtentListFilter);

#[cfg(test)]
mod tests {
    use super::*;

    fn size(s: &str) -> Result<u64> {
        let (n, mult) = match s.strip_suffix('M') {
            Some(n) => (n, 1 << 20),
            None => (s, 1),
        };
        n.parse::<u64>()
            .map(|n| n * mult)
            .map_err(|_| invalid(format!("bad size {s}")))
    }

    fn list(text: &str) -> Vec<(u64, u64, u32)> {
        parse(text, "test", size)
            .unwrap()
            .iter()
            .map(|e| (e.offset, e.length, e.typ))
            .collect()
    }

    #[test]
    fn gaps_become_holes_and_the_list_is_sorted() {
        assert_eq!(
            list("1M 1M\n0 100 zero\n"),
            [
                (0, 100, 2),
                (100, (1 << 20) - 100, HOLE),
                (1 << 20, 1 << 20, 0),
                (2 << 20, u64::MAX - (2 << 20), HOLE),
            ]
        );
    }

    #[test]
    fn types_are_numbers_or_words() {
        let t = |s| list(&format!("0 1 {s}"))[0].2;
        assert_eq!(t("3"), 3);
        assert_eq!(t("1x"), 1);
        assert_eq!(t("hole"), 1);
        assert_eq!(t("hole,zero"), 3);
        assert_eq!(t("zero"), 2);
        assert_eq!(t("data"), 0);
        assert_eq!(list("0\t1")[0].2, 0);
    }

    #[test]
    fn empty_extents_are_skipped_and_an_empty_list_is_one_hole() {
        assert_eq!(list("5 0 data"), [(0, u64::MAX, HOLE)]);
        assert_eq!(list(""), [(0, u64::MAX, HOLE)]);
    }

    #[test]
    fn overlaps_and_short_lines_are_refused() {
        assert!(parse("0 10\n5 10\n", "t", size).is_err());
        assert!(parse("0\n", "t", size).is_err());
        assert!(parse("\n", "t", size).is_err());
    }
}
