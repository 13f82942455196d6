//! The codec of compressed blocks (parallax-v2's cold class): one 4 KiB block of guest data
//! as a zstd frame with its length and crc32c, in one block. Byte-by-byte description:
//! docs/format.md, *Compressed block*.

/// Bytes per block (data blocks and tree nodes alike).
pub const BLOCK_SIZE: usize = 4096;

/// Magic of a compressed block.
pub const ZBLOCK_MAGIC: [u8; 4] = *b"DVZ1";
/// Bytes of a compressed block's header.
pub const ZBLOCK_HEADER: usize = 12;

/// Encodes 4 KiB of data as a compressed block: magic, compressed length (u16), 2 zero bytes,
/// crc32c of the compressed bytes, the zstd frame, zero padding. `None` when the data does not
/// compress into one block.
pub fn encode_compressed(data: &[u8]) -> Option<[u8; BLOCK_SIZE]> {
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let mut out = [0u8; BLOCK_SIZE];
    let n = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(3).ok();
        }
        c.as_mut()?
            .compress_to_buffer(data, &mut out[ZBLOCK_HEADER..])
            .ok()
    })?;
    let frame_crc = crc32c::crc32c(&out[ZBLOCK_HEADER..ZBLOCK_HEADER + n]);
    out[..4].copy_from_slice(&ZBLOCK_MAGIC);
    out[4..6].copy_from_slice(&(n as u16).to_le_bytes());
    out[8..12].copy_from_slice(&frame_crc.to_le_bytes());
    Some(out)
}

/// Checks a compressed block's header and checksum (not its decompression); returns the
/// zstd frame.
pub fn check_compressed(block: &[u8]) -> std::result::Result<&[u8], String> {
    if block.len() != BLOCK_SIZE {
        return Err("a compressed block is 4 KiB".to_string());
    }
    if block[..4] != ZBLOCK_MAGIC {
        return Err("bad magic".to_string());
    }
    let len = usize::from(u16::from_le_bytes([block[4], block[5]]));
    if len > BLOCK_SIZE - ZBLOCK_HEADER || block[6..8] != [0, 0] {
        return Err(format!("bad header (length {len})"));
    }
    let frame = &block[ZBLOCK_HEADER..ZBLOCK_HEADER + len];
    let stored = u32::from_le_bytes([block[8], block[9], block[10], block[11]]);
    if crc32c::crc32c(frame) != stored {
        return Err("checksum mismatch".to_string());
    }
    Ok(frame)
}

/// Decodes a compressed block into `out` (4 KiB), validating magic, length, checksum and the
/// decompressed size.
pub fn decode_compressed(block: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    if out.len() != BLOCK_SIZE {
        return Err("a compressed block decodes into 4 KiB".to_string());
    }
    let frame = check_compressed(block)?;
    let n = DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?);
        }
        match d.as_mut() {
            Some(d) => d
                .decompress_to_buffer(frame, out)
                .map_err(|e| format!("zstd: {e}")),
            None => Err("zstd: no decompressor".to_string()),
        }
    })?;
    if n != BLOCK_SIZE {
        return Err(format!("decompresses to {n} bytes, not 4096"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_blocks_round_trip_and_reject_damage() {
        let mut data = [0u8; BLOCK_SIZE];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 64) as u8;
        }
        let block = encode_compressed(&data).expect("compressible");
        let mut out = [0u8; BLOCK_SIZE];
        decode_compressed(&block, &mut out).expect("decode");
        assert_eq!(out, data);
        let len = usize::from(u16::from_le_bytes([block[4], block[5]]));
        assert!(len < 512, "{len} bytes");
        for i in [0, 4, 9, ZBLOCK_HEADER + 3] {
            let mut bad = block;
            bad[i] ^= 1;
            assert!(
                decode_compressed(&bad, &mut out).is_err(),
                "flip at byte {i}"
            );
        }
        // Random bytes do not fit in one block once compressed.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        assert!(encode_compressed(&data).is_none());
    }
}
