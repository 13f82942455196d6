//! Self-describing blocks and the record of what the backend acknowledged.
//!
//! In verify mode every 512-byte sector the load generator writes describes itself, so a read
//! (or a later check after a crash) can tell a correct sector from a stale, misplaced, torn or
//! corrupted one without a copy of the data:
//!
//! | bytes    | field                                                    |
//! | -------- | -------------------------------------------------------- |
//! | 0..8     | magic `DVTBLK01`                                         |
//! | 8..16    | byte offset of this sector on the disk (u64 LE)          |
//! | 16..24   | sequence number of the write (u64 LE, never 0)           |
//! | 24..28   | size of the write in bytes (u32 LE)                      |
//! | 28..32   | index of this sector within the write (u32 LE)           |
//! | 32..508  | filler derived from (offset, sequence)                   |
//! | 508..512 | crc32c of bytes 0..508 (u32 LE)                          |
//!
//! Sequence numbers are unique across a run and carry on across runs through the state file, so
//! a sector left over from an earlier write is recognised as stale.
//!
//! [`VerifyState`] keeps, per block of the region under test, the sequence number of the last
//! write the backend acknowledged, of the write in flight (if any), and of the last write that
//! is *stable*: acknowledged before a FLUSH that was acknowledged in turn. While the backend
//! runs, a read must return the acknowledged write (or, sector by sector, the one in flight):
//! [`check_block`]. After the backend crashed (`kill -9`, power loss), what a FLUSH made stable
//! must still be there, and any sector may instead hold a later write to the same place (it may
//! or may not have reached the disk), but never an older one: [`check_block_after_crash`].
//! Without flushes (`flush_every` 0) nothing is stable, and only misplaced, damaged or
//! impossible (newer than anything issued) sectors are caught after a crash.
//!
//! State file (all little-endian):
//!
//! | bytes       | field                                                 |
//! | ----------- | ----------------------------------------------------- |
//! | 0..8        | magic `DVTBST02`                                      |
//! | 8..12       | block size in bytes (u32)                             |
//! | 12..16      | zero                                                  |
//! | 16..24      | byte offset of the region on the disk (u64)           |
//! | 24..32      | number of blocks `n` (u64)                            |
//! | 32..40      | next sequence number to use (u64)                     |
//! | 40..40+24n  | per block: acknowledged seq (u64), in-flight seq (u64), stable seq (u64) (0 = none) |
//! | then 4      | crc32c of everything before                           |
//!
//! Files with magic `DVTBST01` (16 bytes per block, no stable seq) are still read, with every
//! acknowledged write taken as stable.

use std::path::Path;

use serde::Serialize;

use crate::fill::fill_pattern;

/// Bytes per self-describing sector.
pub const SECTOR: usize = 512;
const MAGIC: &[u8; 8] = b"DVTBLK01";
const STATE_MAGIC: &[u8; 8] = b"DVTBST02";
const STATE_MAGIC_V1: &[u8; 8] = b"DVTBST01";
const CRC_AT: usize = SECTOR - 4;
const FILL_AT: usize = 32;

/// Writes the self-describing contents of a write of `buf.len()` bytes at `disk_offset` with
/// sequence number `seq` into `buf` (a whole number of sectors).
pub fn stamp(buf: &mut [u8], disk_offset: u64, seq: u64) {
    let len = buf.len() as u32;
    for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
        let off = disk_offset + (i * SECTOR) as u64;
        s[0..8].copy_from_slice(MAGIC);
        s[8..16].copy_from_slice(&off.to_le_bytes());
        s[16..24].copy_from_slice(&seq.to_le_bytes());
        s[24..28].copy_from_slice(&len.to_le_bytes());
        s[28..32].copy_from_slice(&(i as u32).to_le_bytes());
        fill_pattern(off ^ seq.rotate_left(32), &mut s[FILL_AT..CRC_AT]);
        let crc = crc32c::crc32c(&s[..CRC_AT]);
        s[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Why one sector is not what it should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SectorFault {
    /// Not a self-describing sector at all (never written by the generator, or overwritten).
    BadMagic,
    /// The magic is there but the checksum does not match: the sector was damaged.
    BadCrc,
    /// A valid sector that belongs somewhere else on the disk.
    Misplaced { found: u64 },
    /// A valid sector from a write other than the acknowledged (or in-flight) one.
    WrongSeq {
        found: u64,
        acked: u64,
        in_flight: u64,
    },
    /// After a crash: a sector older than the last stable write (a write lost although a FLUSH
    /// acknowledged it), or newer than any write issued to it.
    Lost {
        found: u64,
        stable: u64,
        latest: u64,
    },
}

impl std::fmt::Display for SectorFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SectorFault::BadMagic => write!(f, "not a self-describing sector"),
            SectorFault::BadCrc => write!(f, "checksum mismatch"),
            SectorFault::Misplaced { found } => {
                write!(f, "sector belongs at byte offset {found}")
            }
            SectorFault::WrongSeq {
                found,
                acked,
                in_flight,
            } => write!(
                f,
                "sequence {found}, expected {acked}{}",
                if *in_flight != 0 {
                    format!(" or {in_flight}")
                } else {
                    String::new()
                }
            ),
            SectorFault::Lost {
                found,
                stable,
                latest,
            } => write!(
                f,
                "after the crash: sequence {found}, expected the stable {stable} or a later \
                 write up to {latest}"
            ),
        }
    }
}

/// Decodes one sector read from `disk_offset`: its sequence number, or what is wrong with it.
pub fn decode_sector(s: &[u8], disk_offset: u64) -> Result<u64, SectorFault> {
    if s.len() != SECTOR || &s[0..8] != MAGIC {
        return Err(SectorFault::BadMagic);
    }
    let stored = u32::from_le_bytes([s[CRC_AT], s[CRC_AT + 1], s[CRC_AT + 2], s[CRC_AT + 3]]);
    if crc32c::crc32c(&s[..CRC_AT]) != stored {
        return Err(SectorFault::BadCrc);
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&s[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let found = u64_at(8);
    if found != disk_offset {
        return Err(SectorFault::Misplaced { found });
    }
    Ok(u64_at(16))
}

/// What the record says about one block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockState {
    /// Sequence number of the last acknowledged write (0: none recorded).
    pub acked: u64,
    /// Sequence number of a write submitted and not acknowledged (0: none).
    pub in_flight: u64,
    /// Sequence number of the last write acknowledged before an acknowledged FLUSH (0: none):
    /// what must survive a crash.
    pub stable: u64,
}

impl BlockState {
    /// Whether anything is known about the block's contents.
    pub fn known(&self) -> bool {
        self.acked != 0 || self.in_flight != 0
    }
}

/// One block that failed verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Corruption {
    /// Index of the block within the region.
    pub block: u64,
    /// Byte offset of the block on the disk.
    pub offset: u64,
    /// How many of its sectors are wrong.
    pub bad_sectors: u32,
    /// Byte offset on the disk of the first wrong sector.
    pub first_bad_offset: u64,
    /// What is wrong with the first wrong sector.
    pub fault: SectorFault,
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "block {} (byte offset {}): {} bad sector(s), first at byte offset {}: {}",
            self.block, self.offset, self.bad_sectors, self.first_bad_offset, self.fault
        )
    }
}

/// Outcome of checking one block read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockCheck {
    /// Every sector holds the acknowledged write (or, while one was in flight, that one).
    Good,
    /// Nothing is recorded about the block; its contents were not checked.
    Unknown,
    Corrupt(Corruption),
}

/// Checks a block read back from `offset` (block number `block`) against what the record says.
pub fn check_block(buf: &[u8], block: u64, offset: u64, state: BlockState) -> BlockCheck {
    if !state.known() {
        return BlockCheck::Unknown;
    }
    check_sectors(buf, block, offset, |sector| match sector {
        Ok(seq) if seq == state.acked && seq != 0 => None,
        Ok(seq) if seq == state.in_flight => None,
        Ok(found) => Some(SectorFault::WrongSeq {
            found,
            acked: state.acked,
            in_flight: state.in_flight,
        }),
        // A first write still in flight may not have reached this sector: whatever was
        // there before is allowed, as long as it does not claim to be a newer write here.
        Err(_) if state.acked == 0 => None,
        Err(fault) => Some(fault),
    })
}

/// Checks a block read back after the backend crashed and came back: every sector must hold the
/// block's stable write or a later write to the same place issued before the crash (each sector
/// on its own: writes after the last FLUSH may be torn). With nothing stable, a sector that is
/// not self-describing is accepted (the block's old contents).
pub fn check_block_after_crash(
    buf: &[u8],
    block: u64,
    offset: u64,
    state: BlockState,
) -> BlockCheck {
    if !state.known() && state.stable == 0 {
        return BlockCheck::Unknown;
    }
    let latest = state.acked.max(state.in_flight).max(state.stable);
    check_sectors(buf, block, offset, |sector| match sector {
        Ok(seq) if seq != 0 && seq >= state.stable && seq <= latest => None,
        Ok(found) => Some(SectorFault::Lost {
            found,
            stable: state.stable,
            latest,
        }),
        Err(_) if state.stable == 0 => None,
        Err(fault) => Some(fault),
    })
}

/// Decodes every sector of a block read from `offset` and asks `fault` what is wrong with each
/// (its sequence number, or why it could not be decoded): the block is good if nothing is.
fn check_sectors(
    buf: &[u8],
    block: u64,
    offset: u64,
    fault: impl Fn(Result<u64, SectorFault>) -> Option<SectorFault>,
) -> BlockCheck {
    let mut bad = 0u32;
    let mut first: Option<(u64, SectorFault)> = None;
    for (i, s) in buf.chunks(SECTOR).enumerate() {
        let at = offset + (i * SECTOR) as u64;
        if let Some(fault) = fault(decode_sector(s, at)) {
            bad += 1;
            first.get_or_insert((at, fault));
        }
    }
    match first {
        None => BlockCheck::Good,
        Some((first_bad_offset, fault)) => BlockCheck::Corrupt(Corruption {
            block,
            offset,
            bad_sectors: bad,
            first_bad_offset,
            fault,
        }),
    }
}

/// Why a state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read or write the state file")]
    Io(#[from] std::io::Error),
    #[error("the state file is damaged: {0}")]
    Damaged(&'static str),
    #[error(
        "the state file describes {have_blocks} blocks of {have_bs} bytes at byte offset \
         {have_offset}; this run uses {want_blocks} blocks of {want_bs} bytes at {want_offset}"
    )]
    Mismatch {
        have_bs: u32,
        have_offset: u64,
        have_blocks: u64,
        want_bs: u32,
        want_offset: u64,
        want_blocks: u64,
    },
}

/// The record of acknowledged and in-flight writes for every block of a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyState {
    /// Bytes per block (a multiple of [`SECTOR`]).
    pub block_size: u32,
    /// Byte offset of block 0 on the disk.
    pub offset: u64,
    /// Next sequence number to hand out (never 0).
    pub next_seq: u64,
    pub blocks: Vec<BlockState>,
}

impl VerifyState {
    /// A record of `blocks` blocks of `block_size` bytes from byte `offset`, nothing known.
    pub fn new(block_size: u32, offset: u64, blocks: u64) -> VerifyState {
        VerifyState {
            block_size,
            offset,
            next_seq: 1,
            blocks: vec![BlockState::default(); blocks as usize],
        }
    }

    /// Records what a block read back after a crash holds, so the run can go on from there: a
    /// block whose sectors all hold one write now has that write acknowledged and stable (what
    /// the backend serves after a restart is on its disk); a block of mixed sectors (a torn
    /// write) or of old contents is unknown until it is written again. Nothing is in flight.
    pub fn settle_after_crash(&mut self, index: usize, buf: &[u8]) {
        let at = self.offset + index as u64 * u64::from(self.block_size);
        let mut seqs = buf
            .chunks(SECTOR)
            .enumerate()
            .map(|(i, s)| decode_sector(s, at + (i * SECTOR) as u64).ok());
        let first = seqs.next().flatten();
        let uniform = first.filter(|&f| seqs.all(|s| s == Some(f)));
        self.blocks[index] = match uniform {
            Some(seq) => BlockState {
                acked: seq,
                in_flight: 0,
                stable: seq,
            },
            None => BlockState::default(),
        };
    }

    /// Loads the record at `path` if it exists (checking it describes the same region), or
    /// starts a new one.
    pub fn load_or_new(
        path: &Path,
        block_size: u32,
        offset: u64,
        blocks: u64,
    ) -> Result<VerifyState, StateError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let s = VerifyState::decode(&bytes)?;
                if (s.block_size, s.offset, s.blocks.len() as u64) != (block_size, offset, blocks) {
                    return Err(StateError::Mismatch {
                        have_bs: s.block_size,
                        have_offset: s.offset,
                        have_blocks: s.blocks.len() as u64,
                        want_bs: block_size,
                        want_offset: offset,
                        want_blocks: blocks,
                    });
                }
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(VerifyState::new(block_size, offset, blocks))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the record to `path` atomically (a temporary file renamed over it, after fsync).
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        use std::io::Write;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&self.encode())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(44 + 24 * self.blocks.len());
        b.extend_from_slice(STATE_MAGIC);
        b.extend_from_slice(&self.block_size.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&self.offset.to_le_bytes());
        b.extend_from_slice(&(self.blocks.len() as u64).to_le_bytes());
        b.extend_from_slice(&self.next_seq.to_le_bytes());
        for s in &self.blocks {
            b.extend_from_slice(&s.acked.to_le_bytes());
            b.extend_from_slice(&s.in_flight.to_le_bytes());
            b.extend_from_slice(&s.stable.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<VerifyState, StateError> {
        if b.len() < 44 || (&b[0..8] != STATE_MAGIC && &b[0..8] != STATE_MAGIC_V1) {
            return Err(StateError::Damaged("no state file magic"));
        }
        let per_block = if &b[0..8] == STATE_MAGIC { 24 } else { 16 };
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return Err(StateError::Damaged("checksum mismatch"));
        }
        let u64_at = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&body[at..at + 8]);
            u64::from_le_bytes(x)
        };
        let block_size = u32::from_le_bytes([body[8], body[9], body[10], body[11]]);
        let offset = u64_at(16);
        let n = u64_at(24);
        let next_seq = u64_at(32);
        if n.checked_mul(per_block as u64)
            .and_then(|x| x.checked_add(40))
            != Some(body.len() as u64)
        {
            return Err(StateError::Damaged("block count does not match the length"));
        }
        if block_size == 0 || block_size as usize % SECTOR != 0 || next_seq == 0 {
            return Err(StateError::Damaged("invalid block size or sequence number"));
        }
        let blocks = body[40..]
            .chunks_exact(per_block)
            .map(|c| {
                let at = |i: usize| {
                    let mut x = [0u8; 8];
                    x.copy_from_slice(&c[i..i + 8]);
                    u64::from_le_bytes(x)
                };
                let acked = at(0);
                BlockState {
                    acked,
                    in_flight: at(8),
                    // Version 1 records had no flushes: every acknowledged write was stable.
                    stable: if per_block == 24 { at(16) } else { acked },
                }
            })
            .collect();
        Ok(VerifyState {
            block_size,
            offset,
            next_seq,
            blocks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(offset: u64, seq: u64) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        stamp(&mut b, offset, seq);
        b
    }

    fn acked(seq: u64) -> BlockState {
        BlockState {
            acked: seq,
            in_flight: 0,
            stable: 0,
        }
    }

    #[test]
    fn a_stamped_block_checks_good_and_decodes_per_sector() {
        let b = block(8192, 5);
        assert_eq!(check_block(&b, 2, 8192, acked(5)), BlockCheck::Good);
        assert_eq!(decode_sector(&b[512..1024], 8192 + 512), Ok(5));
        assert_eq!(
            check_block(&b, 2, 8192, BlockState::default()),
            BlockCheck::Unknown
        );
    }

    #[test]
    fn damage_stale_data_and_misplacement_are_told_apart() {
        let mut b = block(8192, 5);
        b[1000] ^= 1;
        let BlockCheck::Corrupt(c) = check_block(&b, 2, 8192, acked(5)) else {
            panic!("a flipped bit went unnoticed");
        };
        assert_eq!(
            (c.bad_sectors, c.first_bad_offset, c.fault),
            (1, 8192 + 512, SectorFault::BadCrc)
        );

        let b = block(8192, 4);
        let BlockCheck::Corrupt(c) = check_block(&b, 2, 8192, acked(5)) else {
            panic!("stale data went unnoticed");
        };
        assert_eq!(c.bad_sectors, 8);
        assert_eq!(
            c.fault,
            SectorFault::WrongSeq {
                found: 4,
                acked: 5,
                in_flight: 0
            }
        );

        let b = block(0, 5);
        let BlockCheck::Corrupt(c) = check_block(&b, 2, 8192, acked(5)) else {
            panic!("a misplaced block went unnoticed");
        };
        assert_eq!(c.fault, SectorFault::Misplaced { found: 0 });

        let BlockCheck::Corrupt(c) = check_block(&[0u8; 4096], 2, 8192, acked(5)) else {
            panic!("zeroes went unnoticed");
        };
        assert_eq!(c.fault, SectorFault::BadMagic);
    }

    #[test]
    fn a_torn_write_in_flight_is_accepted_sector_by_sector() {
        let mut b = block(8192, 5);
        b[2048..].copy_from_slice(&block(8192, 9)[2048..]);
        let torn = BlockState {
            acked: 5,
            in_flight: 9,
            stable: 0,
        };
        assert_eq!(check_block(&b, 2, 8192, torn), BlockCheck::Good);
        assert!(matches!(
            check_block(&b, 2, 8192, acked(5)),
            BlockCheck::Corrupt(_)
        ));
        // A first write in flight over unknown contents.
        let mut first = vec![0u8; 4096];
        first[..512].copy_from_slice(&block(8192, 9)[..512]);
        let state = BlockState {
            acked: 0,
            in_flight: 9,
            stable: 0,
        };
        assert_eq!(check_block(&first, 2, 8192, state), BlockCheck::Good);
    }

    #[test]
    fn state_round_trips_and_rejects_damage() {
        let mut s = VerifyState::new(4096, 1 << 20, 3);
        s.next_seq = 42;
        s.blocks[1] = BlockState {
            acked: 7,
            in_flight: 41,
            stable: 3,
        };
        let bytes = s.encode();
        assert_eq!(VerifyState::decode(&bytes).expect("decodes"), s);
        let mut bad = bytes.clone();
        bad[50] ^= 1;
        assert!(matches!(
            VerifyState::decode(&bad),
            Err(StateError::Damaged(_))
        ));
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        s.save(&path).expect("save");
        assert_eq!(
            VerifyState::load_or_new(&path, 4096, 1 << 20, 3).expect("load"),
            s
        );
        assert!(matches!(
            VerifyState::load_or_new(&path, 512, 1 << 20, 3),
            Err(StateError::Mismatch { .. })
        ));
    }

    #[test]
    fn after_a_crash_stable_writes_must_survive_and_later_ones_may() {
        // Writes 5 (stable), 7 (acknowledged after the flush) and 9 (in flight at the crash).
        let state = BlockState {
            acked: 7,
            in_flight: 9,
            stable: 5,
        };
        for seq in [5, 7, 9] {
            assert_eq!(
                check_block_after_crash(&block(8192, seq), 2, 8192, state),
                BlockCheck::Good,
                "sequence {seq}"
            );
        }
        // Torn between the stable and the in-flight write.
        let mut torn = block(8192, 5);
        torn[1024..].copy_from_slice(&block(8192, 9)[1024..]);
        assert_eq!(
            check_block_after_crash(&torn, 2, 8192, state),
            BlockCheck::Good
        );
        // Older than the stable write: lost.
        let BlockCheck::Corrupt(c) = check_block_after_crash(&block(8192, 4), 2, 8192, state)
        else {
            panic!("a lost stable write went unnoticed");
        };
        assert_eq!(
            c.fault,
            SectorFault::Lost {
                found: 4,
                stable: 5,
                latest: 9
            }
        );
        // Newer than anything issued here, zeroes, misplaced: all wrong.
        assert!(matches!(
            check_block_after_crash(&block(8192, 10), 2, 8192, state),
            BlockCheck::Corrupt(_)
        ));
        assert!(matches!(
            check_block_after_crash(&[0u8; 4096], 2, 8192, state),
            BlockCheck::Corrupt(_)
        ));
        assert!(matches!(
            check_block_after_crash(&block(0, 5), 2, 8192, state),
            BlockCheck::Corrupt(_)
        ));
        // Nothing stable yet: old contents are fine, a write issued is fine.
        let fresh = BlockState {
            acked: 7,
            in_flight: 0,
            stable: 0,
        };
        assert_eq!(
            check_block_after_crash(&[0u8; 4096], 2, 8192, fresh),
            BlockCheck::Good
        );
        assert_eq!(
            check_block_after_crash(&block(8192, 7), 2, 8192, fresh),
            BlockCheck::Good
        );
    }

    #[test]
    fn settling_after_a_crash_takes_what_the_block_holds() {
        let mut s = VerifyState::new(4096, 8192, 2);
        s.blocks[0] = BlockState {
            acked: 7,
            in_flight: 9,
            stable: 5,
        };
        s.settle_after_crash(0, &block(8192, 9));
        assert_eq!(
            s.blocks[0],
            BlockState {
                acked: 9,
                in_flight: 0,
                stable: 9
            }
        );
        let mut torn = block(8192 + 4096, 5);
        torn[1024..].copy_from_slice(&block(8192 + 4096, 9)[1024..]);
        s.settle_after_crash(1, &torn);
        assert_eq!(s.blocks[1], BlockState::default());
    }

    #[test]
    fn version_1_state_files_are_read_with_every_acknowledged_write_stable() {
        let mut b = Vec::new();
        b.extend_from_slice(STATE_MAGIC_V1);
        b.extend_from_slice(&4096u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&12u64.to_le_bytes());
        b.extend_from_slice(&11u64.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let s = VerifyState::decode(&b).expect("a version 1 file decodes");
        assert_eq!(
            s.blocks,
            vec![BlockState {
                acked: 11,
                in_flight: 0,
                stable: 11
            }]
        );
    }
}
