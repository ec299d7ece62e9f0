//! Compressed clusters (qcow2.txt, "Compressed Clusters Descriptor"):
//! raw deflate, as qemu writes with zlib's window of 2^12, or zstd. Each
//! decompresses to exactly one cluster; what follows the stream in its
//! last sector belongs to the next compressed cluster. The last few
//! clusters decompressed are kept, so that reads smaller than a cluster
//! through a compressed image decompress each cluster once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::header::Compression;

/// Clusters kept decompressed.
const RECENT: usize = 16;

/// Why a compressed cluster does not decompress.
#[derive(Debug)]
pub enum Undecodable {
    /// The stream ended after this many bytes, short of a cluster.
    Short { kind: Compression, bytes: u64 },
    /// The decoder refused the stream.
    Refused { kind: Compression, why: String },
}

impl std::fmt::Display for Undecodable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |kind: Compression| match kind {
            Compression::Zlib => ("deflate", "stream"),
            Compression::Zstd => ("zstd", "frame"),
        };
        match self {
            Undecodable::Short { kind, bytes } => {
                let (name, unit) = names(*kind);
                write!(f, "{name} {unit} gave {bytes} bytes, not a cluster")
            }
            Undecodable::Refused { kind, why } => write!(f, "{}: {why}", names(*kind).0),
        }
    }
}

/// Decompresses clusters, remembering the last few.
pub struct Decompressor {
    kind: Compression,
    cluster: usize,
    recent: Mutex<VecDeque<(u64, Arc<[u8]>)>>,
}

impl Decompressor {
    /// A decompressor for clusters of `cluster` bytes compressed as `kind`.
    pub fn new(kind: Compression, cluster: usize) -> Decompressor {
        Decompressor {
            kind,
            cluster,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
        }
    }

    /// Fill `out` with the cluster compressed in `bytes` bytes at
    /// `offset`, from `skip` bytes into it; `read` reads the image.
    pub fn read(
        &self,
        offset: u64,
        bytes: u64,
        skip: u64,
        out: &mut [u8],
        read: impl Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        let skip = skip as usize;
        if skip + out.len() > self.cluster {
            return Err(Error::corrupt(
                "a read past the end of a compressed cluster",
            ));
        }
        let cached = {
            let recent = self.recent.lock().expect("decompressor lock");
            recent
                .iter()
                .find(|(o, _)| *o == offset)
                .map(|(_, c)| c.clone())
        };
        let plain = match cached {
            Some(c) => c,
            None => {
                let mut compressed = vec![0u8; bytes as usize];
                read(&mut compressed, offset)?;
                let mut plain = vec![0u8; self.cluster];
                self.decompress(&compressed, &mut plain)
                    .map_err(|m| Error::corrupt(format!("compressed cluster at {offset}: {m}")))?;
                let plain: Arc<[u8]> = plain.into();
                let mut recent = self.recent.lock().expect("decompressor lock");
                if recent.len() == RECENT {
                    recent.pop_back();
                }
                recent.push_front((offset, plain.clone()));
                plain
            }
        };
        out.copy_from_slice(&plain[skip..skip + out.len()]);
        Ok(())
    }

    fn decompress(&self, input: &[u8], out: &mut [u8]) -> std::result::Result<(), Undecodable> {
        match self.kind {
            Compression::Zlib => inflate(input, out),
            Compression::Zstd => unzstd(input, out),
        }
    }
}

/// Raw deflate until `out` is full.
fn inflate(input: &[u8], out: &mut [u8]) -> std::result::Result<(), Undecodable> {
    let kind = Compression::Zlib;
    let mut d = flate2::Decompress::new(false);
    match d.decompress(input, out, flate2::FlushDecompress::Finish) {
        Ok(_) if d.total_out() == out.len() as u64 => Ok(()),
        Ok(_) => Err(Undecodable::Short {
            kind,
            bytes: d.total_out(),
        }),
        Err(e) => Err(Undecodable::Refused {
            kind,
            why: e.to_string(),
        }),
    }
}

/// A zstd frame until `out` is full.
fn unzstd(input: &[u8], out: &mut [u8]) -> std::result::Result<(), Undecodable> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let kind = Compression::Zstd;
    let refused = |e: std::io::Error| Undecodable::Refused {
        kind,
        why: e.to_string(),
    };
    let mut d = Decoder::new().map_err(refused)?;
    let mut src = InBuffer::around(input);
    let mut dst = OutBuffer::around(out);
    while dst.pos() < dst.capacity() && src.pos() < input.len() {
        let (read, written) = (src.pos(), dst.pos());
        d.run(&mut src, &mut dst).map_err(refused)?;
        if src.pos() == read && dst.pos() == written {
            break;
        }
    }
    if dst.pos() == dst.capacity() {
        Ok(())
    } else {
        Err(Undecodable::Short {
            kind,
            bytes: dst.pos() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn cluster() -> Vec<u8> {
        (0..65536u32).map(|i| (i / 100) as u8).collect()
    }

    #[test]
    fn raw_deflate_with_trailing_bytes_decompresses_to_one_cluster() {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&cluster()).unwrap();
        let mut compressed = e.finish().unwrap();
        compressed.extend_from_slice(&[0xAA; 300]);
        let mut out = vec![0u8; 65536];
        inflate(&compressed, &mut out).unwrap();
        assert_eq!(out, cluster());
    }

    #[test]
    fn a_zstd_frame_with_trailing_bytes_decompresses_to_one_cluster() {
        let mut compressed = zstd::bulk::compress(&cluster(), 3).unwrap();
        compressed.extend_from_slice(&[0x55; 300]);
        let mut out = vec![0u8; 65536];
        unzstd(&compressed, &mut out).unwrap();
        assert_eq!(out, cluster());
    }

    #[test]
    fn a_stream_too_short_for_a_cluster_is_an_error() {
        let compressed = zstd::bulk::compress(&cluster()[..1000], 3).unwrap();
        let mut out = vec![0u8; 65536];
        assert!(unzstd(&compressed, &mut out).is_err());
        assert!(inflate(&[1, 2, 3], &mut out).is_err());
    }
}
