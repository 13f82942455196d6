//! Typed units for block addresses, so sectors and bytes never mix silently.

use std::fmt;

/// Size of one virtio-blk sector in bytes (fixed by the virtio spec, independent of `blk_size`).
pub const SECTOR_SIZE: u64 = 512;
/// `log2(SECTOR_SIZE)`.
pub const SECTOR_SHIFT: u32 = 9;

/// A sector address (512-byte units from the start of a disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Sector(pub u64);

/// A count of sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Sectors(pub u64);

impl Sector {
    /// Byte offset of this sector, or `None` if it does not fit in a `u64`.
    pub fn byte_offset(self) -> Option<u64> {
        self.0.checked_mul(SECTOR_SIZE)
    }

    /// `self + len`, or `None` on overflow.
    pub fn checked_add(self, len: Sectors) -> Option<Sector> {
        self.0.checked_add(len.0).map(Sector)
    }
}

impl Sectors {
    /// Length in bytes, or `None` if it does not fit in a `u64`.
    pub fn bytes(self) -> Option<u64> {
        self.0.checked_mul(SECTOR_SIZE)
    }

    /// The number of whole sectors in `bytes` (rounding down).
    pub fn from_bytes_floor(bytes: u64) -> Sectors {
        Sectors(bytes >> SECTOR_SHIFT)
    }

    /// The number of sectors in `bytes`, or `None` if `bytes` is not a multiple of the sector size.
    pub fn from_bytes_exact(bytes: u64) -> Option<Sectors> {
        (bytes % SECTOR_SIZE == 0).then_some(Sectors(bytes >> SECTOR_SHIFT))
    }
}

impl fmt::Display for Sector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sector {}", self.0)
    }
}

impl fmt::Display for Sectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} sectors", self.0)
    }
}

/// Checks that `[at, at + len)` lies within a disk of `capacity` sectors.
///
/// Every layout calls this before touching its backing store, so a bad range is rejected the
/// same way whatever the layout.
pub fn check_range(at: Sector, len: Sectors, capacity: Sectors) -> crate::Result<()> {
    match at.checked_add(len) {
        Some(end) if end.0 <= capacity.0 => Ok(()),
        _ => Err(crate::Error::OutOfRange { at, len, capacity }),
    }
}
