//! Regression tests for what the qcow2 fuzz targets (fuzz/fuzz_targets/
//! qcow2_parse.rs, qcow2_model.rs) found, each as the smallest image or
//! sequence that shows it.

use std::fs::File;

use qcow2filter::image::Image;
use qcow2filter::io::FileIo;

/// A version 3 image with 512-byte clusters and a 1 MiB disk: header,
/// refcount table, refcount block, L1 table, one cluster each.
fn small_image() -> Vec<u8> {
    let cs = 512;
    let mut b = vec![0u8; 4 * cs];
    let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
    put(0, &0x5146_49fbu32.to_be_bytes());
    put(4, &3u32.to_be_bytes());
    put(20, &9u32.to_be_bytes());
    put(24, &(1u64 << 20).to_be_bytes());
    put(36, &32u32.to_be_bytes());
    put(40, &(3 * cs as u64).to_be_bytes());
    put(48, &(cs as u64).to_be_bytes());
    put(56, &1u32.to_be_bytes());
    put(96, &4u32.to_be_bytes());
    put(100, &104u32.to_be_bytes());
    put(cs, &(2 * cs as u64).to_be_bytes());
    for c in 0..4 {
        put(2 * cs + 2 * c, &1u16.to_be_bytes());
    }
    b
}

fn file_io(bytes: &[u8]) -> (FileIo, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!(
        "qcow2-fuzz-found-{}-{}",
        std::process::id(),
        bytes.len() ^ bytes.iter().map(|&b| b as usize).sum::<usize>()
    ));
    std::fs::write(&path, bytes).unwrap();
    (
        FileIo::new(File::open(&path).unwrap(), path.display().to_string()),
        path,
    )
}

/// qcow2_parse: with clusters smaller than 4 KiB, the header extensions
/// were read past the first cluster, where qemu stops: an image whose
/// extensions fill the first cluster without an end marker was refused
/// when the next cluster's bytes did not look like one (qemu opens it).
#[test]
fn header_extensions_end_with_the_first_cluster() {
    let mut b = small_image();
    // An unknown extension up to the end of cluster 0, no end marker.
    b[104..108].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    b[108..112].copy_from_slice(&(512u32 - 104 - 8).to_be_bytes());
    // The refcount table's first entry, read as an extension header: a
    // backing-format extension of 64 KiB.
    b[512..516].copy_from_slice(&0xe279_2acau32.to_be_bytes());
    b[516..520].copy_from_slice(&0x10000u32.to_be_bytes());
    let (io, path) = file_io(&b);
    let got = Image::read_header(&io);
    std::fs::remove_file(path).unwrap();
    let (h, first) = got.expect("qemu opens this header");
    assert_eq!(first.len(), 512, "the whole first cluster, and only it");
    assert_eq!(h.backing_format, None);
}

#[path = "../../../fuzz/fuzz_targets/qcow2_io/mod.rs"]
mod qcow2_io;

/// qcow2_model: a flush wrote the metadata that drops a reference, then
/// dropped the refcount in memory only, so a flushed image, and one
/// closed after its last connection's flush, kept the freed clusters as
/// leaks (`qemu-img check` exits 3) until some later flush.
#[test]
fn a_flush_leaves_no_leaked_clusters() {
    use qcow2filter::check;
    use qcow2filter::image::Options;

    let io = qcow2_io::MemIo::new(small_image(), true);
    let (h, first) = Image::read_header(&io).unwrap();
    let image = Image::open(&io, h, &first, Options::default(), None, None).unwrap();
    image.make_writable(&io).unwrap();
    image.write(&io, &[0x5a; 4096], 0, false).unwrap();
    image.flush(&io).unwrap();
    assert!(check::check(&io).unwrap().is_clean());
    // Trimmed: the clusters are freed once the L2 table without them is
    // durable.
    image.trim(&io, 0, 4096, false).unwrap();
    image.flush(&io).unwrap();
    let r = check::check(&io).unwrap();
    assert!(r.is_clean(), "after one flush:\n{r}");
}
