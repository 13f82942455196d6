//! One block's annotation and its 16-byte record.

use crate::{AnnotationError, RECORD_BYTES};

/// Largest value of either pattern nibble.
pub(crate) const NIBBLE_MAX: u8 = 15;

/// One block's annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Annotation {
    /// Guest reads that touched the block (saturating at `u32::MAX`).
    pub reads: u32,
    /// Guest writes that touched the block (saturating at `u32::MAX`).
    pub writes: u32,
    /// Epoch of the last read (0 = never), see [`crate::Epochs`].
    pub last_read: u16,
    /// Epoch of the last write (0 = never).
    pub last_write: u16,
    /// High nibble: sequential hits, low nibble: random hits (see [`Annotation::hit`]).
    pub pattern: u8,
    /// Taint label bits (bit `i` = label `i`, `i < MAX_LABELS`).
    pub taint: u16,
}

/// The access-pattern class of a block, from its pattern nibbles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// As many sequential as random hits (including none).
    Unknown,
    /// More sequential than random hits.
    Sequential,
    /// More random than sequential hits.
    Random,
}

impl Annotation {
    /// `reads + writes`.
    pub fn heat(&self) -> u64 {
        u64::from(self.reads) + u64::from(self.writes)
    }

    /// The sequential-hit nibble (0..=15).
    pub fn sequential_hits(&self) -> u8 {
        self.pattern >> 4
    }

    /// The random-hit nibble (0..=15).
    pub fn random_hits(&self) -> u8 {
        self.pattern & 0x0f
    }

    /// `Sequential` if the sequential nibble is larger, `Random` if the random one is, `Unknown`
    /// if they are equal (including 0, 0).
    pub fn class(&self) -> Pattern {
        classify(self.pattern)
    }

    /// Records one pattern hit (sequential or random) in `pattern`: see [`pattern_hit`].
    pub fn hit(&mut self, sequential: bool) {
        self.pattern = pattern_hit(self.pattern, sequential);
    }

    /// Writes the 16-byte little-endian record into `out[..16]`: reads u32, writes u32,
    /// last_read u16, last_write u16, pattern u8, reserved u8 (0), taint u16.
    ///
    /// # Panics
    /// If `out` is shorter than [`RECORD_BYTES`].
    pub fn encode(&self, out: &mut [u8]) {
        let out = &mut out[..RECORD_BYTES];
        out[0..4].copy_from_slice(&self.reads.to_le_bytes());
        out[4..8].copy_from_slice(&self.writes.to_le_bytes());
        out[8..10].copy_from_slice(&self.last_read.to_le_bytes());
        out[10..12].copy_from_slice(&self.last_write.to_le_bytes());
        out[12] = self.pattern;
        out[13] = 0;
        out[14..16].copy_from_slice(&self.taint.to_le_bytes());
    }

    /// Reads a record written by [`Annotation::encode`] from `b[..16]`. The reserved byte (13)
    /// must be zero.
    pub fn decode(b: &[u8]) -> Result<Annotation, AnnotationError> {
        if b.len() < RECORD_BYTES {
            return Err(AnnotationError::Corrupt(format!(
                "annotation record is {} bytes long, expected {RECORD_BYTES}",
                b.len()
            )));
        }
        if b[13] != 0 {
            return Err(AnnotationError::Corrupt(format!(
                "annotation record: reserved byte 13 is {:#04x}, must be 0",
                b[13]
            )));
        }
        Ok(Annotation {
            reads: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            writes: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            last_read: u16::from_le_bytes([b[8], b[9]]),
            last_write: u16::from_le_bytes([b[10], b[11]]),
            pattern: b[12],
            taint: u16::from_le_bytes([b[14], b[15]]),
        })
    }
}

/// The class of a pattern byte (high nibble sequential, low nibble random).
pub(crate) fn classify(pattern: u8) -> Pattern {
    let (seq, rnd) = (pattern >> 4, pattern & 0x0f);
    match seq.cmp(&rnd) {
        std::cmp::Ordering::Greater => Pattern::Sequential,
        std::cmp::Ordering::Less => Pattern::Random,
        std::cmp::Ordering::Equal => Pattern::Unknown,
    }
}

/// One pattern hit: increments the sequential (high) or random (low) nibble of `pattern`. A
/// nibble saturates at 15: a hit on a nibble already at 15 first halves *both* nibbles (rounding
/// down), then increments, so the byte follows recent behaviour (15 sequential hits then one
/// more give seq 8; the random count is halved too).
pub fn pattern_hit(pattern: u8, sequential: bool) -> u8 {
    let (mut seq, mut rnd) = (pattern >> 4, pattern & 0x0f);
    let full = if sequential { seq } else { rnd };
    if full >= NIBBLE_MAX {
        seq >>= 1;
        rnd >>= 1;
    }
    if sequential {
        seq += 1;
    } else {
        rnd += 1;
    }
    (seq << 4) | rnd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_layout() {
        let a = Annotation {
            reads: 0x0403_0201,
            writes: 0x0807_0605,
            last_read: 0x0a09,
            last_write: 0x0c0b,
            pattern: 0x3d,
            taint: 0x100f,
        };
        let mut b = [0xffu8; 16];
        a.encode(&mut b);
        assert_eq!(
            b,
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0x3d, 0, 0x0f, 0x10]
        );
        assert_eq!(Annotation::decode(&b).ok(), Some(a));
        b[13] = 1;
        assert!(matches!(
            Annotation::decode(&b),
            Err(AnnotationError::Corrupt(_))
        ));
        assert!(Annotation::decode(&b[..15]).is_err());
    }

    #[test]
    fn classes() {
        let mut a = Annotation::default();
        assert_eq!(a.class(), Pattern::Unknown);
        a.hit(true);
        assert_eq!(a.class(), Pattern::Sequential);
        a.hit(false);
        assert_eq!(a.class(), Pattern::Unknown);
        a.hit(false);
        assert_eq!(a.class(), Pattern::Random);
        assert_eq!((a.sequential_hits(), a.random_hits()), (1, 2));
    }

    #[test]
    fn nibble_saturation_halves_both() {
        let mut p = 0u8;
        for _ in 0..15 {
            p = pattern_hit(p, true);
        }
        assert_eq!(p, 0xf0);
        p = pattern_hit(p, false);
        assert_eq!(p, 0xf1);
        p = pattern_hit(p, true);
        // 15 -> 7 then +1; random 1 -> 0.
        assert_eq!(p, 0x80);
        let mut p = 0x5fu8;
        p = pattern_hit(p, false);
        assert_eq!(p, 0x28);
        // Long runs stay in range and follow the newest behaviour.
        let mut p = 0xf0u8;
        for _ in 0..100 {
            p = pattern_hit(p, false);
        }
        assert_eq!(classify(p), Pattern::Random);
        assert_eq!(p >> 4, 0);
    }
}
