//! Dirty-page logging for QEMU's live migration (`VHOST_F_LOG_ALL`,
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
//!
//! While a VM migrates, QEMU copies its memory to the destination and copies again every page
//! written since; pages the backend writes must be marked in the log QEMU shares
//! (`VHOST_USER_SET_LOG_BASE`, one bit per 4 KiB guest page). vhost-user-backend installs that
//! log into the bitmap of each guest memory region (`BitmapMmapRegion`), so every write made
//! through vm-memory's accessors (status bytes, GET_ID, the used ring) marks its pages by
//! itself. The data of a read does not go through them: the layout, the io_uring engine or a
//! pool thread writes straight into guest buffers whose host addresses were resolved before
//! (`request::host_bufs`), so the request path marks those buffers here once the read has
//! completed (after the data landed, never before: QEMU may read and clear a bit at any time,
//! and a page marked before its data arrived could be sent without it).
//!
//! Marking costs nothing while no migration runs: [`DirtyLog::on`] is one relaxed load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dovetail_layout::IoBuf;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemory, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// Whether the frontend asked for dirty logging (`VHOST_F_LOG_ALL` acked), shared by a
/// connection's device and its queue workers.
#[derive(Debug, Clone, Default)]
pub struct DirtyLog(Arc<AtomicBool>);

impl DirtyLog {
    /// A log that is off.
    pub fn new() -> DirtyLog {
        DirtyLog::default()
    }

    /// Whether buffers written outside vm-memory must be marked now.
    pub fn on(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Turns marking on or off (the features the frontend acked).
    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::Release);
    }
}

/// Marks the guest pages under `bufs` (host addresses inside `mem`'s regions) dirty in each
/// region's bitmap. A buffer outside every region (a bounce buffer) is skipped; a buffer is
/// always within one region, as `host_bufs` resolved it (one vm-memory slice each). Memory
/// behind an IOMMU (no plain regions) marks nothing: the device is never given such memory.
/// Returns the bytes marked.
pub fn mark_written<M: GuestMemory + ?Sized>(mem: &M, bufs: &[IoBuf]) -> usize {
    let Some(mem) = mem.physical_memory() else {
        return 0;
    };
    let mut marked = 0;
    for b in bufs {
        if b.len == 0 {
            continue;
        }
        let addr = b.ptr as usize;
        for region in mem.iter() {
            let Ok(base) = region.get_host_address(MemoryRegionAddress(0)) else {
                continue;
            };
            let base = base as usize;
            let len = region.len() as usize;
            if addr >= base && addr - base < len {
                let off = addr - base;
                let n = b.len.min(len - off);
                region.bitmap().mark_dirty(off, n);
                marked += n;
                break;
            }
        }
    }
    marked
}
