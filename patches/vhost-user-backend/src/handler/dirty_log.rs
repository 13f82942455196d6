// Copyright 2026 The Dovetail Authors.
//
// SPDX-License-Identifier: Apache-2.0

//! The handler's side of the dirty-page log (`VHOST_USER_SET_LOG_BASE`) across memory table
//! changes, and ring addresses sent again to a running queue.
//!
//! QEMU hands the log over once when a migration starts, but may send a new memory table at
//! any time while it runs (`vhost_commit`, whenever the guest's memory map changes: it grows
//! the log first if needed, and sends `SET_LOG_BASE` again only then). Each memory region
//! carries its own bitmap, made empty with the region, so a table sent while logging must get
//! the log installed in its new regions before it is used: without that, every write the
//! backend made into guest memory from then on (used ring, status bytes, read data) went
//! unlogged, and the destination ran with those pages stale.

use std::sync::Arc;

use vhost::vhost_user::{Error as VhostUserError, Result as VhostUserResult};
use virtio_queue::QueueT;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

use super::VhostUserHandler;
use crate::backend::VhostUserBackend;
use crate::bitmap::{BitmapReplace, MemRegionBitmap, MmapLogReg};
use crate::vring::VringT;

impl<T: VhostUserBackend> VhostUserHandler<T>
where
    T::Bitmap: BitmapReplace,
{
    /// Installs `log` into the bitmap of every region of `mem`. The bitmaps are all made first,
    /// so a region the log does not cover changes nothing (and is an error: QEMU grows the log
    /// before it sends a table that needs more).
    pub(super) fn install_log(
        mem: &GuestMemoryMmap<T::Bitmap>,
        log: &Arc<MmapLogReg>,
    ) -> VhostUserResult<()> {
        let mut bitmaps = Vec::new();
        for region in mem.iter() {
            let bitmap = <<T::Bitmap as BitmapReplace>::InnerBitmap as MemRegionBitmap>::new(
                region,
                Arc::clone(log),
            )
            .map_err(VhostUserError::ReqHandlerError)?;
            bitmaps.push((region, bitmap));
        }
        for (region, bitmap) in bitmaps {
            region.bitmap().replace(bitmap);
        }
        Ok(())
    }

    /// A memory table about to replace the current one: the log, if one was handed over, is
    /// installed in its regions first.
    pub(super) fn log_new_table(&self, mem: &GuestMemoryMmap<T::Bitmap>) -> VhostUserResult<()> {
        match &self.log {
            Some(log) => Self::install_log(mem, log),
            None => Ok(()),
        }
    }

    /// Whether vring `index` runs (started by a kick and not stopped by `GET_VRING_BASE`).
    /// `SET_VRING_ADDR` on such a ring (QEMU switching `VHOST_VRING_F_LOG` as a migration
    /// starts or ends) must not reload the device's used index from guest memory: a worker may
    /// be adding to the used ring at that moment, and an index read before its entry and
    /// stored after would make the next entry overwrite it (a completion the guest never sees).
    pub(super) fn vring_running(vring: &T::Vring) -> bool {
        vring.get_ref().get_queue().ready()
    }
}
