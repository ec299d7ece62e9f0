//! The block index of an xz file: where each block's compressed bytes
//! lie and which bytes of the uncompressed disk they hold, read from the
//! index at the end of each stream (xz's file format, sections 2 and 4),
//! and one block decompressed on its own.
//!
//! The index is parsed here because the xz2 crate wraps only whole-stream
//! coders: liblzma's `lzma_index_*` and `lzma_block_decoder` are reachable
//! only through raw FFI (liblzma-sys), which would bring unsafe code into
//! the filter for what is a small, fully specified structure. A block is
//! decompressed by liblzma's own stream decoder, given the stream's header
//! and then the block, so liblzma still checks the block's integrity.

use std::fmt;
use std::io;

use archive::NextReader;
use xz2::stream::{Action, Stream};

const HEADER_MAGIC: [u8; 6] = [0xFD, b'7', b'z', b'X', b'Z', 0];
const FOOTER_MAGIC: [u8; 2] = [b'Y', b'Z'];
/// Stream header and stream footer are both this long.
const HEADER_LEN: u64 = 12;

/// Why an xz file cannot be served.
#[derive(Debug)]
pub enum IndexError {
    /// Reading the layer below failed.
    Io(io::Error),
    /// The file does not end in an xz stream footer.
    NotXz,
    /// A structure of the file is malformed.
    Corrupt(&'static str),
    /// A checksum over a header, footer or index does not match.
    Checksum(&'static str),
    /// liblzma refused a block.
    Decode(xz2::stream::Error),
    /// A block decompressed to another size than the index says.
    BlockSize {
        number: usize,
        expected: u64,
        got: u64,
    },
}

impl fmt::Display for IndexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IndexError::Io(e) => write!(f, "reading the xz file: {e}"),
            IndexError::NotXz => f.write_str("not an xz file"),
            IndexError::Corrupt(what) => write!(f, "corrupt xz file: {what}"),
            IndexError::Checksum(what) => write!(f, "corrupt xz file: bad CRC32 of the {what}"),
            IndexError::Decode(e) => write!(f, "xz block cannot be decompressed: {e}"),
            IndexError::BlockSize {
                number,
                expected,
                got,
            } => write!(
                f,
                "xz block {number} decompressed to {got} bytes, its index says {expected}"
            ),
        }
    }
}

impl std::error::Error for IndexError {}

impl From<io::Error> for IndexError {
    fn from(e: io::Error) -> Self {
        IndexError::Io(e)
    }
}

/// One block: the stream header it needs to be decoded and where it lies
/// in the compressed file and in the disk.
#[derive(Debug, Clone)]
pub struct Block {
    stream_header: [u8; HEADER_LEN as usize],
    compressed_offset: u64,
    /// Header, data, padding and check: a multiple of four bytes.
    compressed_len: u64,
    /// Offset of its first byte in the uncompressed disk.
    pub offset: u64,
    /// Uncompressed length.
    pub len: u64,
}

/// Every block of every stream, in the order of the uncompressed disk.
#[derive(Debug)]
pub struct Index {
    /// The blocks, by increasing `offset`, none empty.
    pub blocks: Vec<Block>,
    /// Size of the uncompressed disk.
    pub size: u64,
}

impl Index {
    /// The number of the block holding byte `offset` of the disk.
    pub fn block_at(&self, offset: u64) -> Option<usize> {
        let i = self.blocks.partition_point(|b| b.offset + b.len <= offset);
        (i < self.blocks.len()).then_some(i)
    }

    /// The largest uncompressed block.
    pub fn largest_block(&self) -> u64 {
        self.blocks.iter().map(|b| b.len).max().unwrap_or(0)
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn read_at(r: &NextReader, offset: u64, len: u64) -> Result<Vec<u8>, IndexError> {
    let len = usize::try_from(len).map_err(|_| IndexError::Corrupt("index too large"))?;
    let mut v = vec![0; len];
    r.read_exact_at(&mut v, offset)?;
    Ok(v)
}

/// xz's variable-length integer: seven bits a byte, low bits first.
fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, IndexError> {
    let mut value = 0u64;
    for i in 0..9 {
        let byte = *buf
            .get(*pos)
            .ok_or(IndexError::Corrupt("index ends inside a number"))?;
        *pos += 1;
        value |= u64::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                break;
            }
            return Ok(value);
        }
    }
    Err(IndexError::Corrupt("malformed number in the index"))
}

/// The (compressed length with padding, uncompressed length) of each
/// record of one stream's index.
fn records(index: &[u8]) -> Result<Vec<(u64, u64)>, IndexError> {
    let body = index.len() - 4;
    if crc32fast::hash(&index[..body]) != le32(&index[body..]) {
        return Err(IndexError::Checksum("index"));
    }
    if index[0] != 0 {
        return Err(IndexError::Corrupt("index indicator is not zero"));
    }
    let mut pos = 1;
    let count = varint(index, &mut pos)?;
    let mut out = Vec::new();
    for _ in 0..count {
        let unpadded = varint(index, &mut pos)?;
        let uncompressed = varint(index, &mut pos)?;
        if unpadded < 5 {
            return Err(IndexError::Corrupt("block smaller than its header"));
        }
        let padded = unpadded
            .checked_next_multiple_of(4)
            .ok_or(IndexError::Corrupt("block size overflows"))?;
        out.push((padded, uncompressed));
        if pos > body {
            return Err(IndexError::Corrupt("index records overrun the index"));
        }
    }
    let padding = body
        .checked_sub(pos)
        .ok_or(IndexError::Corrupt("index records overrun the index"))?;
    if padding >= 4 || index[pos..body].iter().any(|&b| b != 0) {
        return Err(IndexError::Corrupt("index padding"));
    }
    Ok(out)
}

/// Read the index of every stream in the file, from its end backwards
/// (streams may be concatenated, with zero padding between them).
pub fn read(r: &NextReader) -> Result<Index, IndexError> {
    let mut end = r.size();
    if end < 2 * HEADER_LEN || end % 4 != 0 {
        return Err(IndexError::NotXz);
    }
    let mut streams: Vec<Vec<Block>> = Vec::new();
    while end > 0 {
        if read_at(r, end - 4, 4)? == [0; 4] {
            end -= 4;
            continue;
        }
        if end < 2 * HEADER_LEN {
            return Err(IndexError::Corrupt("stream too short"));
        }
        let footer = read_at(r, end - HEADER_LEN, HEADER_LEN)?;
        if footer[10..] != FOOTER_MAGIC {
            return Err(IndexError::NotXz);
        }
        if crc32fast::hash(&footer[4..10]) != le32(&footer[..4]) {
            return Err(IndexError::Checksum("stream footer"));
        }
        let index_len = (u64::from(le32(&footer[4..8])) + 1) * 4;
        let index_start = (end - HEADER_LEN)
            .checked_sub(index_len)
            .filter(|&s| s >= HEADER_LEN)
            .ok_or(IndexError::Corrupt("index larger than the file"))?;
        let index = read_at(r, index_start, index_len)?;
        let records = records(&index)?;
        let blocks_len = records
            .iter()
            .try_fold(0u64, |sum, (c, _)| sum.checked_add(*c))
            .ok_or(IndexError::Corrupt("blocks larger than the file"))?;
        let stream_start = (index_start - HEADER_LEN)
            .checked_sub(blocks_len)
            .ok_or(IndexError::Corrupt("blocks larger than the file"))?;
        let header = read_at(r, stream_start, HEADER_LEN)?;
        if header[..6] != HEADER_MAGIC {
            return Err(IndexError::Corrupt("no stream header where the index says"));
        }
        if crc32fast::hash(&header[6..8]) != le32(&header[8..]) {
            return Err(IndexError::Checksum("stream header"));
        }
        if header[6..8] != footer[8..10] {
            return Err(IndexError::Corrupt(
                "stream header and footer disagree on the flags",
            ));
        }
        let mut stream_header = [0; HEADER_LEN as usize];
        stream_header.copy_from_slice(&header);
        let mut at = stream_start + HEADER_LEN;
        let blocks = records
            .into_iter()
            .map(|(compressed_len, len)| {
                let b = Block {
                    stream_header,
                    compressed_offset: at,
                    compressed_len,
                    offset: 0,
                    len,
                };
                at += compressed_len;
                b
            })
            .collect();
        streams.push(blocks);
        end = stream_start;
    }
    let mut size = 0u64;
    let mut blocks = Vec::new();
    for mut b in streams.into_iter().rev().flatten().filter(|b| b.len > 0) {
        b.offset = size;
        size = size
            .checked_add(b.len)
            .ok_or(IndexError::Corrupt("uncompressed size overflows"))?;
        blocks.push(b);
    }
    Ok(Index { blocks, size })
}

/// Decompress block `number` of `index`: its stream's header followed by
/// the block make a stream prefix that liblzma decodes, verifying the
/// block's check, without the rest of the stream.
pub fn decompress(r: &NextReader, index: &Index, number: usize) -> Result<Vec<u8>, IndexError> {
    let b = &index.blocks[number];
    let mut input = b.stream_header.to_vec();
    input.extend(read_at(r, b.compressed_offset, b.compressed_len)?);
    let expected = b.len;
    let capacity = usize::try_from(expected + 1)
        .map_err(|_| IndexError::Corrupt("block larger than memory"))?;
    // One byte more than the index promises, so a block that decodes to
    // more is caught rather than cut.
    let mut out = Vec::with_capacity(capacity);
    let mut stream = Stream::new_stream_decoder(u64::MAX, 0).map_err(IndexError::Decode)?;
    loop {
        let (consumed, produced) = (stream.total_in(), out.len());
        let rest = &input[consumed as usize..];
        if rest.is_empty() {
            break;
        }
        stream
            .process_vec(rest, &mut out, Action::Run)
            .map_err(IndexError::Decode)?;
        if stream.total_in() == consumed && out.len() == produced {
            break;
        }
    }
    let got = out.len() as u64;
    if got != expected || stream.total_in() != input.len() as u64 {
        return Err(IndexError::BlockSize {
            number,
            expected,
            got,
        });
    }
    Ok(out)
}
