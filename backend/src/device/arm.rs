//! A queue set up on a ring another device ran before (the source of a live migration, a
//! daemon that restarted) starts with that device's notification state in guest memory: the
//! avail event (`VIRTIO_RING_F_EVENT_IDX`) or the used ring's `NO_NOTIFY` flag as it last wrote
//! them. A device stopped in the middle of a pass (GET_VRING_BASE at the end of a migration)
//! may have left the avail event behind the driver's index, or notifications off; a driver
//! that has nothing outstanding then never kicks again (its next request is not past the avail
//! event), and the guest waits forever. So the first event of a queue that finds nothing to do
//! turns notifications on for this device's own index.

use std::sync::atomic::Ordering;

use log::warn;
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

use super::{BlkDevice, VringRwLock};

impl BlkDevice {
    /// Turns notifications on for queue `queue` (not running yet, nothing seen to serve):
    /// writes the avail event (or clears `NO_NOTIFY`) for the device's next avail index.
    /// Whether requests turned out to be available after all (the driver made one available
    /// meanwhile): then the caller serves them.
    pub(super) fn arm_idle_queue(&self, vring: &VringRwLock, queue: usize) -> bool {
        let Some(w) = self.worker(queue) else {
            return false;
        };
        let Some(mem) = w.mem.as_ref().map(|m| m.memory()) else {
            return false;
        };
        drop(w);
        if !vring.get_ref().get_queue().ready() {
            // Stopped: its notification state is the next device's to set.
            return false;
        }
        match vring.get_mut().get_queue_mut().enable_notification(&*mem) {
            Ok(more) => more,
            Err(e) => {
                warn!(
                    "queue {queue}: turning notifications on failed ({e}); event index {}",
                    self.inner.event_idx.load(Ordering::Relaxed)
                );
                false
            }
        }
    }
}
