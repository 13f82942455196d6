//! The vhost-user-blk device: feature negotiation, config space, and one worker per queue.

use std::io;
use std::mem::{offset_of, size_of};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use log::{debug, error, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::disk::Disk;
use crate::request::{RequestWorker, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGS};

/// Guest memory as the vhost-user library hands it to us.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Largest queue size offered to the driver.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Largest number of queues a disk may have.
pub const MAX_QUEUES: usize = 64;
/// Segments per request the driver may use (QEMU's default queue size, 128, minus header and
/// status).
pub const SEG_MAX: u32 = 126;
/// Sectors per discard/write-zeroes alignment unit (4 KiB, the usual filesystem block).
pub const DISCARD_ALIGNMENT_SECTORS: u32 = 8;

/// Device settings that do not change while a guest is attached.
#[derive(Debug, Clone, Copy)]
pub struct DeviceConfig {
    pub num_queues: usize,
}

/// State of one queue's worker thread.
#[derive(Debug)]
struct Worker {
    requests: RequestWorker,
    mem: Option<GuestMem>,
}

#[derive(Debug)]
struct Inner {
    disk: Arc<Disk>,
    config: DeviceConfig,
    event_idx: AtomicBool,
    /// One per queue, locked only by that queue's worker thread (and briefly by `stop_vring`
    /// and `update_memory`), so queues never contend with each other.
    workers: Vec<Mutex<Worker>>,
}

/// The `VhostUserBackend` for one disk and one guest connection.
#[derive(Debug, Clone)]
pub struct BlkDevice {
    inner: Arc<Inner>,
}

impl BlkDevice {
    /// A device for `disk` with `config.num_queues` queues (clamped to 1..=MAX_QUEUES by the CLI).
    pub fn new(disk: Arc<Disk>, config: DeviceConfig) -> BlkDevice {
        let workers = (0..config.num_queues)
            .map(|_| {
                Mutex::new(Worker {
                    requests: RequestWorker::new(),
                    mem: None,
                })
            })
            .collect();
        BlkDevice {
            inner: Arc::new(Inner {
                disk,
                config,
                event_idx: AtomicBool::new(false),
                workers,
            }),
        }
    }

    fn worker(&self, index: usize) -> Option<MutexGuard<'_, Worker>> {
        let m = self.inner.workers.get(index)?;
        // A poisoned lock means a worker panicked mid-request; its buffers are still usable.
        Some(m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The virtio-blk config space, as the driver reads it.
    pub fn config_space(&self) -> Vec<u8> {
        let disk = &self.inner.disk;
        let mut c = vec![0u8; size_of::<virtio_blk_config>()];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(
            offset_of!(virtio_blk_config, capacity),
            &disk.capacity().0.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, seg_max),
            &SEG_MAX.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, blk_size),
            &512u32.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, num_queues),
            &(self.inner.config.num_queues as u16).to_le_bytes(),
        );
        if disk.supports_discard() {
            for (field, value) in [
                (
                    offset_of!(virtio_blk_config, max_discard_sectors),
                    MAX_DISCARD_SECTORS,
                ),
                (
                    offset_of!(virtio_blk_config, max_discard_seg),
                    MAX_DISCARD_SEGS as u32,
                ),
                (
                    offset_of!(virtio_blk_config, discard_sector_alignment),
                    DISCARD_ALIGNMENT_SECTORS,
                ),
                (
                    offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                    MAX_DISCARD_SECTORS,
                ),
                (
                    offset_of!(virtio_blk_config, max_write_zeroes_seg),
                    MAX_DISCARD_SEGS as u32,
                ),
            ] {
                put(field, &value.to_le_bytes());
            }
            put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
        }
        c
    }

    /// Drains the queue: pops every available chain, runs it, and publishes the completions.
    fn process_queue(&self, vring: &VringRwLock, worker: &mut Worker, queue: usize) {
        let Some(atomic) = worker.mem.as_ref() else {
            warn!("queue {queue}: kicked before the guest memory table was set; ignored");
            return;
        };
        let mem = atomic.memory();
        let disk = &*self.inner.disk;
        let mut completed = 0usize;
        loop {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            // Two clock reads and a few relaxed atomics per request.
            let start = Instant::now();
            let done = worker.requests.process(disk, &*mem, chain, queue);
            done.record(disk.metrics(), start.elapsed());
            if let Err(e) = vring.add_used(head, done.used_len) {
                // The used ring lies outside guest memory: nothing more can be completed.
                error!("queue {queue}: cannot add to the used ring: {e}");
                break;
            }
            completed += 1;
        }
        if completed > 0 {
            let notify = vring.needs_notification().unwrap_or_else(|e| {
                warn!("queue {queue}: reading the used event index failed ({e}); notifying anyway");
                true
            });
            if notify {
                if let Err(e) = vring.signal_used_queue() {
                    warn!("queue {queue}: signalling the guest failed: {e}");
                }
            }
        }
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.inner.config.num_queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.inner.disk.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        debug!("guest acked features {features:#x}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        debug!("device reset");
        self.inner.event_idx.store(false, Ordering::Relaxed);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config_space();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= config.len() => config[start..end].to_vec(),
            _ => {
                warn!(
                    "config read at {offset}+{size} past the {}-byte config space",
                    config.len()
                );
                Vec::new()
            }
        }
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        for i in 0..self.inner.workers.len() {
            if let Some(mut w) = self.worker(i) {
                w.mem = Some(mem.clone());
            }
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue: queue i is handled by thread i alone.
        (0..self.inner.config.num_queues)
            .map(|i| 1u64 << i)
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The queue is already marked not ready; taking its worker's lock waits for the request
        // batch in progress (if any) to complete before QEMU reads the ring base.
        drop(self.worker(queue_index as usize));
        debug!("queue {queue_index} stopped");
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            warn!("queue {thread_id}: unexpected event set {evset:?}");
            return Ok(());
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            warn!("queue {thread_id}: event for unknown vring {device_event}");
            return Ok(());
        };
        let Some(mut worker) = self.worker(thread_id) else {
            warn!("event on unknown worker thread {thread_id}");
            return Ok(());
        };
        let queue = thread_id;
        if self.inner.event_idx.load(Ordering::Relaxed) {
            // Process until the ring stays empty after notifications are re-enabled, so a
            // request added in between is never missed.
            loop {
                if let Err(e) = vring.disable_notification() {
                    warn!("queue {queue}: disabling notifications failed: {e}");
                }
                self.process_queue(vring, &mut worker, queue);
                match vring.enable_notification() {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        warn!("queue {queue}: enabling notifications failed: {e}");
                        break;
                    }
                }
            }
        } else {
            self.process_queue(vring, &mut worker, queue);
        }
        Ok(())
    }
}
