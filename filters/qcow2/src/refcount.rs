//! Refcount block entries of any width from 1 to 64 bits (qcow2.txt,
//! "Host cluster management"): sub-byte widths count from the least
//! significant bit, wider ones are big-endian.

/// The refcount at `index` of a refcount block with 2^`order`-bit entries.
pub fn get(block: &[u8], order: u32, index: usize) -> u64 {
    match order {
        0..=2 => {
            let width = 1usize << order;
            let bit = index * width;
            let byte = block[bit / 8];
            u64::from(byte >> (bit % 8)) & ((1 << width) - 1)
        }
        3 => u64::from(block[index]),
        4 => u64::from(u16::from_be_bytes([block[2 * index], block[2 * index + 1]])),
        5 => u64::from(u32::from_be_bytes(
            block[4 * index..4 * index + 4].try_into().expect("4 bytes"),
        )),
        _ => u64::from_be_bytes(block[8 * index..8 * index + 8].try_into().expect("8 bytes")),
    }
}

/// Set the refcount at `index`; the caller keeps `value` within the
/// width.
pub fn set(block: &mut [u8], order: u32, index: usize, value: u64) {
    match order {
        0..=2 => {
            let width = 1usize << order;
            let bit = index * width;
            let mask = (((1u16 << width) - 1) as u8) << (bit % 8);
            let b = &mut block[bit / 8];
            *b = (*b & !mask) | (((value as u8) << (bit % 8)) & mask);
        }
        3 => block[index] = value as u8,
        4 => block[2 * index..2 * index + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[4 * index..4 * index + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[8 * index..8 * index + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_stores_what_it_reads_back_without_touching_neighbours() {
        for order in 0..=6u32 {
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            let mut block = vec![0u8; 512];
            let entries = (512 * 8) >> order;
            for i in 0..entries {
                set(&mut block, order, i, (i as u64 * 7 + 3) & max);
            }
            set(&mut block, order, 5, max);
            for i in 0..entries {
                let want = if i == 5 {
                    max
                } else {
                    (i as u64 * 7 + 3) & max
                };
                assert_eq!(get(&block, order, i), want, "order {order} entry {i}");
            }
        }
    }

    #[test]
    fn sub_byte_entries_start_at_the_least_significant_bit() {
        let mut block = [0u8; 1];
        set(&mut block, 0, 0, 1);
        assert_eq!(block[0], 0b0000_0001);
        set(&mut block, 1, 3, 2);
        assert_eq!(block[0], 0b1000_0001);
    }
}
