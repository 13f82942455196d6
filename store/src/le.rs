//! Little-endian integers read out of byte slices, for the format readers (every on-disk and
//! wire structure of the project is little-endian). Each reads at byte offset `at` and panics if
//! the slice is too short: the callers check a structure's length before reading its fields.

/// The `u16` at byte `at` of `b`.
pub fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The `u32` at byte `at` of `b`.
pub fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// The `u64` at byte `at` of `b`.
pub fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_little_endian_at_an_offset() {
        let b = [0xff, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0xee];
        assert_eq!(le_u16(&b, 1), 0x0201);
        assert_eq!(le_u32(&b, 1), 0x0403_0201);
        assert_eq!(le_u64(&b, 1), 0x0807_0605_0403_0201);
        assert_eq!(le_u64(&b, 2), 0xee08_0706_0504_0302);
    }

    #[test]
    #[should_panic]
    fn short_slice_panics() {
        le_u32(&[1, 2, 3], 0);
    }
}
