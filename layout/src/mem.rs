//! The `mem` layout: a disk held in memory. Not durable; for tests, benchmarks of the request
//! path without storage underneath, and scratch disks.

use std::sync::RwLock;

use crate::{buffer_sectors, check_range, BlockLayout, Result, Sector, Sectors, SECTOR_SIZE};

/// A disk of `capacity` sectors in a `Vec<u8>`.
#[derive(Debug)]
pub struct MemLayout {
    data: RwLock<Vec<u8>>,
    capacity: Sectors,
}

impl MemLayout {
    /// A zero-filled disk of `capacity` sectors.
    pub fn new(capacity: Sectors) -> MemLayout {
        let bytes = usize::try_from(capacity.0 * SECTOR_SIZE).unwrap_or(usize::MAX);
        MemLayout {
            data: RwLock::new(vec![0; bytes]),
            capacity,
        }
    }

    /// A copy of the whole disk, for assertions.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn range(&self, at: Sector, len: Sectors) -> Result<std::ops::Range<usize>> {
        check_range(at, len, self.capacity)?;
        // In range of a Vec that exists, so these fit in usize.
        let start = (at.0 * SECTOR_SIZE) as usize;
        Ok(start..start + (len.0 * SECTOR_SIZE) as usize)
    }
}

impl BlockLayout for MemLayout {
    fn capacity(&self) -> Sectors {
        self.capacity
    }

    fn read(&self, at: Sector, buf: &mut [u8]) -> Result<()> {
        let r = self.range(at, buffer_sectors(buf.len())?)?;
        buf.copy_from_slice(&self.data.read().unwrap_or_else(|p| p.into_inner())[r]);
        Ok(())
    }

    fn write(&self, at: Sector, buf: &[u8]) -> Result<()> {
        let r = self.range(at, buffer_sectors(buf.len())?)?;
        self.data.write().unwrap_or_else(|p| p.into_inner())[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn discard(&self, at: Sector, len: Sectors) -> Result<()> {
        // Discarded space reads back as zeroes, like a punched hole.
        self.write_zeroes(at, len, true)
    }

    fn write_zeroes(&self, at: Sector, len: Sectors, _unmap: bool) -> Result<()> {
        let r = self.range(at, len)?;
        self.data.write().unwrap_or_else(|p| p.into_inner())[r].fill(0);
        Ok(())
    }
}
