// Copyright 2026 The Dovetail Authors.
//
// SPDX-License-Identifier: Apache-2.0

//! Inflight I/O tracking for split virtqueues (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`).
//!
//! The frontend asks the backend for a shared memory region (`VHOST_USER_GET_INFLIGHT_FD`),
//! keeps it, and hands it back with `VHOST_USER_SET_INFLIGHT_FD` every time it starts the
//! device, also after the backend died and a new one was connected. The backend records in
//! it, per queue, which descriptor heads it has taken from the available ring and not yet put
//! in the used ring, so a restarted backend can run those requests again, in the order they
//! were taken, before any new one.
//!
//! The layout is QEMU's (`docs/interop/vhost-user.rst`, "Inflight I/O tracking", and
//! libvhost-user's `VuVirtqInflight`/`VuDescStateSplit`), one region per queue, each
//! [`queue_region_size`] bytes, little-endian:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | `features` (0) |
//! | 8 | 2 | `version` (0: never used; 1) |
//! | 10 | 2 | `desc_num` (the queue size) |
//! | 12 | 2 | `last_batch_head`: the head being put in the used ring |
//! | 14 | 2 | `used_idx`: the used index once that put completed |
//! | 16 + 16 × i | 16 | `desc[i]`: `inflight` (u8), 5 bytes padding, `next` (u16, unused for split queues), `counter` (u64) |
//!
//! The protocol per request (libvhost-user's `vu_queue_inflight_get`/`pre_put`/`post_put`):
//! when a head is taken, `desc[head].counter` gets the queue's next counter and then
//! `desc[head].inflight = 1`; to complete it, `last_batch_head = head`, then the used element
//! and used index are written, then `desc[head].inflight = 0` and `used_idx` = the new used
//! index. A backend killed between any two of these steps leaves a region
//! [`InflightQueue::recover`] makes sense of: if the used ring's index is ahead of the
//! region's, the put of `last_batch_head` completed in the ring and only its bookkeeping was
//! cut short.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::VhostUserInflight;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// The region version this code writes.
pub const INFLIGHT_VERSION: u16 = 1;
/// Each queue's region is a multiple of this many bytes (QEMU's `INFLIGHT_ALIGNMENT`).
pub const INFLIGHT_ALIGNMENT: u64 = 64;
/// Bytes of a queue region's header.
pub const QUEUE_HEADER_SIZE: u64 = 16;
/// Bytes of one descriptor's state.
pub const DESC_STATE_SIZE: u64 = 16;
/// Largest queue size a split queue may have.
pub const MAX_QUEUE_SIZE: u16 = 32768;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const DESC_OFF_INFLIGHT: usize = 0;
const DESC_OFF_COUNTER: usize = 8;

/// Bytes of one queue's region for a queue of `queue_size` descriptors, as QEMU and
/// libvhost-user compute it (`vu_inflight_queue_size`).
pub fn queue_region_size(queue_size: u16) -> u64 {
    let raw = DESC_STATE_SIZE * u64::from(queue_size) + 2;
    raw.div_ceil(INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.into())
}

/// The shared inflight region of a device: every queue's region, mapped.
///
/// Shared between the message handler (which keeps it to hand it on, see
/// [`InflightRegion::file`]) and one [`InflightQueue`] per started queue.
#[derive(Debug)]
pub struct InflightRegion {
    file: File,
    addr: NonNull<u8>,
    /// Bytes mapped at `addr` (`mmap_size` of the message).
    len: usize,
    mmap_offset: u64,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is only accessed through atomics (`InflightQueue`), and the raw pointer
// is valid for the lifetime of the value whichever thread holds it.
unsafe impl Send for InflightRegion {}
// SAFETY: as above; `&InflightRegion` gives no access that is not atomic.
unsafe impl Sync for InflightRegion {}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are the mapping made in `map`, unmapped only here.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

impl InflightRegion {
    /// A new, zeroed region for `num_queues` queues of `queue_size` descriptors
    /// (`VHOST_USER_GET_INFLIGHT_FD`): an anonymous memory file sealed against growing and
    /// shrinking, so whoever maps it can never be made to fault on it.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<InflightRegion> {
        check_geometry(num_queues, queue_size)?;
        let size = u64::from(num_queues) * queue_region_size(queue_size);
        // SAFETY: a constant NUL-terminated name; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"vhost-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        // SAFETY: fcntl on an open descriptor; the result is checked.
        let r = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let region = Self::map(file, size, 0, num_queues, queue_size)?;
        for q in 0..num_queues {
            region.queue_base(q).store_desc_num(queue_size);
        }
        Ok(region)
    }

    /// Maps the region a frontend handed back (`VHOST_USER_SET_INFLIGHT_FD`), or a region
    /// [`file`](InflightRegion::file) and [`message`](InflightRegion::message) exported by
    /// another process. Refused: a size, offset or geometry that does not fit, a file smaller
    /// than the mapping or one that could shrink under it (no `F_SEAL_SHRINK`), and a queue
    /// region already used for another queue size.
    pub fn adopt(file: File, msg: &VhostUserInflight) -> io::Result<InflightRegion> {
        check_geometry(msg.num_queues, msg.queue_size)?;
        let need = u64::from(msg.num_queues) * queue_region_size(msg.queue_size);
        if msg.mmap_size < need {
            return Err(invalid(format!(
                "inflight region of {} bytes, {need} needed for {} queues of {}",
                msg.mmap_size, msg.num_queues, msg.queue_size
            )));
        }
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        if !msg.mmap_offset.is_multiple_of(page) {
            return Err(invalid(format!(
                "inflight region offset {} is not page aligned",
                msg.mmap_offset
            )));
        }
        let end = msg
            .mmap_offset
            .checked_add(msg.mmap_size)
            .ok_or_else(|| invalid("inflight region offset + size overflows"))?;
        if file.metadata()?.len() < end {
            return Err(invalid(format!(
                "inflight region file holds {} bytes, {end} needed",
                file.metadata()?.len()
            )));
        }
        // SAFETY: fcntl on an open descriptor; the result is checked.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(invalid(
                "inflight region file is not sealed against shrinking",
            ));
        }
        let region = Self::map(
            file,
            msg.mmap_size,
            msg.mmap_offset,
            msg.num_queues,
            msg.queue_size,
        )?;
        for q in 0..msg.num_queues {
            let b = region.queue_base(q);
            match (b.version(), b.desc_num()) {
                (0, _) => b.store_desc_num(msg.queue_size),
                (_, n) if n == msg.queue_size => {}
                (v, n) => {
                    return Err(invalid(format!(
                        "inflight region of queue {q} is version {v} for {n} descriptors, \
                         not {}",
                        msg.queue_size
                    )))
                }
            }
        }
        Ok(region)
    }

    fn map(
        file: File,
        size: u64,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<InflightRegion> {
        let len = usize::try_from(size).map_err(|_| invalid("inflight region too large"))?;
        let off = libc::off_t::try_from(offset).map_err(|_| invalid("offset too large"))?;
        // SAFETY: a new shared mapping of an open file; the result is checked. The file is
        // sealed against shrinking (checked by the callers), so the mapping stays backed.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(InflightRegion {
            file,
            addr: NonNull::new(p.cast()).ok_or_else(|| invalid("mmap returned null"))?,
            len,
            mmap_offset: offset,
            num_queues,
            queue_size,
        })
    }

    /// The file the region lives in (to hand it to another process).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The message describing the region, as `VHOST_USER_GET_INFLIGHT_FD` replies it.
    pub fn message(&self) -> VhostUserInflight {
        VhostUserInflight::new(
            self.len as u64,
            self.mmap_offset,
            self.num_queues,
            self.queue_size,
        )
    }

    /// Queues the region tracks.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Descriptors per queue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn queue_base(&self, index: u16) -> QueueMem<'_> {
        let off = usize::from(index) * queue_region_size(self.queue_size) as usize;
        // SAFETY: `index < num_queues` (callers), so the queue's region lies inside the
        // mapping (checked against `mmap_size` at creation).
        QueueMem {
            base: unsafe { self.addr.as_ptr().add(off) },
            desc_num: self.queue_size,
            _region: self,
        }
    }

    /// The tracker of queue `index`, or `None` past the region's queues.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<InflightQueue> {
        (index < self.num_queues).then(|| InflightQueue {
            region: self.clone(),
            index,
            counter: AtomicU64::new(0),
            resubmit: Mutex::new(VecDeque::new()),
        })
    }
}

fn check_geometry(num_queues: u16, queue_size: u16) -> io::Result<()> {
    if num_queues == 0 || queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(invalid(format!(
            "inflight region for {num_queues} queues of {queue_size} descriptors"
        )));
    }
    Ok(())
}

/// One queue's region, accessed through atomics (it is shared with the frontend and, after a
/// crash, written by a process that may have died at any instruction).
struct QueueMem<'a> {
    base: *mut u8,
    desc_num: u16,
    _region: &'a InflightRegion,
}

impl QueueMem<'_> {
    fn u16_at(&self, off: usize) -> &AtomicU16 {
        // SAFETY: `off` is one of the header's u16 fields (2-aligned, inside the region,
        // whose base is 64-aligned); the mapping outlives `self`.
        unsafe { &*(self.base.add(off) as *const AtomicU16) }
    }
    fn version(&self) -> u16 {
        u16::from_le(self.u16_at(OFF_VERSION).load(Ordering::Acquire))
    }
    fn set_version(&self, v: u16) {
        self.u16_at(OFF_VERSION).store(v.to_le(), Ordering::Release)
    }
    fn desc_num(&self) -> u16 {
        u16::from_le(self.u16_at(OFF_DESC_NUM).load(Ordering::Acquire))
    }
    fn store_desc_num(&self, n: u16) {
        self.u16_at(OFF_DESC_NUM)
            .store(n.to_le(), Ordering::Release)
    }
    fn last_batch_head(&self) -> u16 {
        u16::from_le(self.u16_at(OFF_LAST_BATCH_HEAD).load(Ordering::Acquire))
    }
    fn set_last_batch_head(&self, h: u16) {
        self.u16_at(OFF_LAST_BATCH_HEAD)
            .store(h.to_le(), Ordering::Release)
    }
    fn used_idx(&self) -> u16 {
        u16::from_le(self.u16_at(OFF_USED_IDX).load(Ordering::Acquire))
    }
    fn set_used_idx(&self, i: u16) {
        self.u16_at(OFF_USED_IDX)
            .store(i.to_le(), Ordering::Release)
    }
    /// Offset of `head`'s entry; callers check `head < desc_num`.
    fn desc(&self, head: u16) -> usize {
        debug_assert!(head < self.desc_num, "descriptor {head} past the queue");
        QUEUE_HEADER_SIZE as usize + usize::from(head) * DESC_STATE_SIZE as usize
    }
    fn inflight(&self, head: u16) -> &AtomicU8 {
        let off = self.desc(head) + DESC_OFF_INFLIGHT;
        // SAFETY: inside the region (`desc` checks the head); bytes need no alignment.
        unsafe { &*(self.base.add(off) as *const AtomicU8) }
    }
    fn counter(&self, head: u16) -> &AtomicU64 {
        let off = self.desc(head) + DESC_OFF_COUNTER;
        // SAFETY: inside the region; 8-aligned (16-byte entries after a 16-byte header).
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }
}

/// What [`InflightQueue::recover`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The index of the next available entry to take: the used index plus the requests in
    /// flight. `None` for a region never used before (the index the frontend set stands).
    pub next_avail: Option<u16>,
    /// Heads in flight, to run again in this order (by counter) before new ones.
    pub resubmit: Vec<u16>,
    /// The used ring was ahead of the region: the last put was cut short after the ring was
    /// updated, and its head is no longer in flight.
    pub torn_put: bool,
}

/// The inflight tracker of one queue, handed to the backend when the queue starts.
#[derive(Debug)]
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    index: u16,
    counter: AtomicU64,
    resubmit: Mutex<VecDeque<u16>>,
}

impl InflightQueue {
    fn mem(&self) -> QueueMem<'_> {
        self.region.queue_base(self.index)
    }

    /// The queue's index in the region.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Descriptors of the queue.
    pub fn queue_size(&self) -> u16 {
        self.region.queue_size
    }

    /// Reads the region when the queue starts, given the used ring's index (`used_idx`):
    /// completes a cut-short put, lists the heads in flight in the order they were taken
    /// (kept for [`next_resubmit`](InflightQueue::next_resubmit)) and says where taking new
    /// ones resumes (libvhost-user's `vu_check_queue_inflights`). A region never used before
    /// is marked in use (version 1) with nothing in flight.
    pub fn recover(&self, used_idx: u16) -> Recovery {
        let m = self.mem();
        let mut torn_put = false;
        if m.version() == 0 {
            m.set_used_idx(used_idx);
            m.set_version(INFLIGHT_VERSION);
            self.counter.store(0, Ordering::Relaxed);
            self.resubmit.lock().unwrap().clear();
            return Recovery {
                next_avail: None,
                resubmit: Vec::new(),
                torn_put,
            };
        }
        if m.used_idx() != used_idx {
            let last = m.last_batch_head();
            if last < m.desc_num {
                m.inflight(last).store(0, Ordering::Release);
            }
            fence(Ordering::SeqCst);
            m.set_used_idx(used_idx);
            torn_put = true;
        }
        let mut heads: Vec<(u64, u16)> = (0..m.desc_num)
            .filter(|&h| m.inflight(h).load(Ordering::Acquire) != 0)
            .map(|h| (u64::from_le(m.counter(h).load(Ordering::Acquire)), h))
            .collect();
        heads.sort_unstable();
        let next = heads.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        self.counter.store(next, Ordering::Relaxed);
        let resubmit: Vec<u16> = heads.iter().map(|&(_, h)| h).collect();
        *self.resubmit.lock().unwrap() = resubmit.iter().copied().collect();
        Recovery {
            next_avail: Some(used_idx.wrapping_add(resubmit.len() as u16)),
            resubmit,
            torn_put,
        }
    }

    /// The next head to run again, oldest first, if any is left.
    pub fn next_resubmit(&self) -> Option<u16> {
        self.resubmit.lock().unwrap().pop_front()
    }

    /// Heads still to run again.
    pub fn resubmit_pending(&self) -> usize {
        self.resubmit.lock().unwrap().len()
    }

    /// Marks `head` taken from the available ring and in flight (`vu_queue_inflight_get`).
    /// Call it right after taking the head, before taking the next one.
    pub fn get(&self, head: u16) {
        let m = self.mem();
        if head >= m.desc_num {
            return;
        }
        let c = self.counter.fetch_add(1, Ordering::Relaxed);
        m.counter(head).store(c.to_le(), Ordering::Release);
        m.inflight(head).store(1, Ordering::Release);
    }

    /// Before `head` is put in the used ring (`vu_queue_inflight_pre_put`).
    pub fn pre_put(&self, head: u16) {
        if head >= self.queue_size() {
            return;
        }
        self.mem().set_last_batch_head(head);
        fence(Ordering::SeqCst);
    }

    /// After `head` was put in the used ring and the used index became `used_idx`
    /// (`vu_queue_inflight_post_put`).
    pub fn post_put(&self, head: u16, used_idx: u16) {
        let m = self.mem();
        if head >= m.desc_num {
            return;
        }
        fence(Ordering::SeqCst);
        m.inflight(head).store(0, Ordering::Release);
        fence(Ordering::SeqCst);
        m.set_used_idx(used_idx);
    }

    /// Heads the region says are in flight, lowest counter first.
    pub fn in_flight(&self) -> Vec<u16> {
        let m = self.mem();
        let mut heads: Vec<(u64, u16)> = (0..m.desc_num)
            .filter(|&h| m.inflight(h).load(Ordering::Acquire) != 0)
            .map(|h| (u64::from_le(m.counter(h).load(Ordering::Acquire)), h))
            .collect();
        heads.sort_unstable();
        heads.into_iter().map(|(_, h)| h).collect()
    }

    /// The descriptor chain of `head` in the table at `desc_table` (a head to run again is not
    /// in the available ring where the queue resumes, so it is walked from its index).
    pub fn chain<M>(&self, mem: M, desc_table: GuestAddress, head: u16) -> InflightChain<M>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        InflightChain {
            mem,
            desc_table,
            table_len: self.queue_size(),
            head,
            next: head,
            ttl: self.queue_size(),
            indirect: false,
            yielded: 0,
        }
    }
}

/// A descriptor chain walked from its head index, with virtio-queue's `DescriptorChain` rules
/// (indirect tables one level deep, a 16-byte-multiple table length, at most the table's
/// length descriptors, at most 2^32 - 1 bytes); it yields nothing more at the first violation.
#[derive(Clone, Debug)]
pub struct InflightChain<M> {
    mem: M,
    desc_table: GuestAddress,
    table_len: u16,
    head: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    yielded: u32,
}

impl<M> InflightChain<M> {
    /// The chain's head index.
    pub fn head_index(&self) -> u16 {
        self.head
    }
}

impl<M> Iterator for InflightChain<M>
where
    M: Deref,
    M::Target: GuestMemory,
{
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.table_len {
                return None;
            }
            let addr = self
                .desc_table
                .checked_add(u64::from(self.next) * DESC_STATE_SIZE)?;
            let desc = self.mem.read_obj::<Descriptor>(addr).ok()?;
            if desc.refers_to_indirect_table() {
                if self.indirect || desc.len() % 16 != 0 {
                    self.ttl = 0;
                    return None;
                }
                let n = desc.len() / 16;
                if n > u32::from(u16::MAX) {
                    self.ttl = 0;
                    return None;
                }
                self.desc_table = desc.addr();
                self.table_len = n as u16;
                self.ttl = n as u16;
                self.next = 0;
                self.indirect = true;
                continue;
            }
            self.yielded = self.yielded.checked_add(desc.len())?;
            if desc.has_next() {
                self.next = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestMemoryMmap;

    // MockSplitQueue (virtio-queue 0.18) puts the used ring right after the first `QSIZE` bytes
    // of the avail ring's entries, over its second half: these tests use avail slots 0..8 only.
    const QSIZE: u16 = 16;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// A mock queue with `n` one-descriptor chains available (heads 0, 1, 2, ...).
    fn ring(mem: &GuestMemoryMmap, n: u16) -> MockSplitQueue<'_, GuestMemoryMmap> {
        let vq = MockSplitQueue::new(mem, QSIZE);
        for i in 0..n {
            let d = virtio_queue::desc::RawDescriptor::from(Descriptor::new(
                0x8000 + u64::from(i) * 0x100,
                0x100,
                0,
                0,
            ));
            vq.desc_table().store(i, d).unwrap();
            vq.avail()
                .ring()
                .ref_at(i as usize)
                .unwrap()
                .store(i.to_le());
        }
        vq.avail().idx().store(n.to_le());
        vq
    }

    fn take(q: &mut Queue, mem: &GuestMemoryMmap, t: &InflightQueue) -> u16 {
        let c = q.pop_descriptor_chain(mem).unwrap();
        t.get(c.head_index());
        c.head_index()
    }

    fn put(q: &mut Queue, mem: &GuestMemoryMmap, t: &InflightQueue, head: u16) {
        t.pre_put(head);
        q.add_used(mem, head, 0).unwrap();
        t.post_put(head, q.next_used());
    }

    #[test]
    fn layout_matches_qemu() {
        // vu_inflight_queue_size: ALIGN_UP(16 * size + 2, 64).
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(256), 4160);
        assert_eq!(queue_region_size(1024), 16448);
        // Header and descriptor entries fit in every size.
        for qs in 1..=1024u16 {
            assert!(QUEUE_HEADER_SIZE + DESC_STATE_SIZE * u64::from(qs) <= queue_region_size(qs));
        }
        assert_eq!(
            std::mem::size_of::<vhost::vhost_user::message::DescStateSplit>() as u64,
            DESC_STATE_SIZE
        );

        let r = Arc::new(InflightRegion::create(2, 128).unwrap());
        assert_eq!(r.message().mmap_size, 2 * 2112);
        assert_eq!(r.message().mmap_offset, 0);
        assert_eq!(r.file().metadata().unwrap().len(), 2 * 2112);
        let q1 = r.queue(1).unwrap();
        q1.recover(0);
        q1.get(5);
        // The bytes where QEMU's layout puts them.
        let mut bytes = vec![0u8; 2 * 2112];
        use std::os::unix::fs::FileExt;
        r.file().read_exact_at(&mut bytes, 0).unwrap();
        let q1b = &bytes[2112..];
        assert_eq!(u16::from_le_bytes([q1b[8], q1b[9]]), INFLIGHT_VERSION);
        assert_eq!(u16::from_le_bytes([q1b[10], q1b[11]]), 128);
        assert_eq!(q1b[16 + 5 * 16], 1, "desc[5].inflight");
        assert_eq!(&q1b[16 + 5 * 16 + 8..16 + 6 * 16], &0u64.to_le_bytes());
        // Queue 0 untouched but for desc_num.
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 0);
        assert_eq!(u16::from_le_bytes([bytes[10], bytes[11]]), 128);
        assert!(r.queue(2).is_none());
        // Sealed: cannot shrink.
        assert!(r.file().set_len(10).is_err());
    }

    #[test]
    fn adopt_refuses_what_does_not_fit() {
        let r = InflightRegion::create(1, 64).unwrap();
        let dup = || r.file().try_clone().unwrap();
        let good = r.message();
        assert!(InflightRegion::adopt(dup(), &good).is_ok());
        let mut small = good;
        small.mmap_size -= 1;
        assert!(InflightRegion::adopt(dup(), &small).is_err());
        let mut big = good;
        big.num_queues = 2;
        big.mmap_size *= 2;
        assert!(InflightRegion::adopt(dup(), &big).is_err(), "past the file");
        let mut odd = good;
        odd.mmap_offset = 1;
        assert!(InflightRegion::adopt(dup(), &odd).is_err());
        let mut zero = good;
        zero.queue_size = 0;
        assert!(InflightRegion::adopt(dup(), &zero).is_err());
        // Used for 64 descriptors: not adopted for 32.
        Arc::new(InflightRegion::adopt(dup(), &good).unwrap())
            .queue(0)
            .unwrap()
            .recover(0);
        let mut other = good;
        other.queue_size = 32;
        other.mmap_size = queue_region_size(32);
        assert!(InflightRegion::adopt(dup(), &other).is_err());
        // An unsealed file is refused.
        let f = tempfile::tempfile().unwrap();
        f.set_len(good.mmap_size).unwrap();
        assert!(InflightRegion::adopt(f, &good).is_err());
    }

    #[test]
    fn in_flight_out_of_order_resubmitted_in_order() {
        let mem = memory();
        let vq = ring(&mem, 6);
        let mut q: Queue = vq.create_queue().unwrap();
        let region = Arc::new(InflightRegion::create(1, QSIZE).unwrap());
        let t = region.queue(0).unwrap();
        assert_eq!(t.recover(0).next_avail, None, "a new region");
        let taken: Vec<u16> = (0..6).map(|_| take(&mut q, &mem, &t)).collect();
        assert_eq!(taken, [0, 1, 2, 3, 4, 5]);
        // Completed out of order: 4, 1, 2.
        for h in [4, 1, 2] {
            put(&mut q, &mem, &t, h);
        }
        assert_eq!(t.in_flight(), [0, 3, 5]);
        drop((q, t));

        // A new backend on the same region and ring.
        let region = Arc::new(
            InflightRegion::adopt(region.file().try_clone().unwrap(), &region.message()).unwrap(),
        );
        let t = region.queue(0).unwrap();
        let used = vq.used().idx().load();
        assert_eq!(used, 3);
        let r = t.recover(used);
        assert_eq!(
            r,
            Recovery {
                next_avail: Some(6),
                resubmit: vec![0, 3, 5],
                torn_put: false
            }
        );
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_next_avail(r.next_avail.unwrap());
        q.set_next_used(used);
        // Resubmitted first, oldest first; the chains are the guest's.
        let mut again = Vec::new();
        while let Some(h) = t.next_resubmit() {
            let c = t.chain(&mem, GuestAddress(q.desc_table()), h);
            let d: Vec<Descriptor> = c.collect();
            assert_eq!(d.len(), 1);
            assert_eq!(d[0].addr(), GuestAddress(0x8000 + u64::from(h) * 0x100));
            again.push(h);
            put(&mut q, &mem, &t, h);
        }
        assert_eq!(again, [0, 3, 5]);
        // Nothing taken twice: the ring is empty.
        assert!(q.pop_descriptor_chain(&mem).is_none());
        assert!(t.in_flight().is_empty());
        assert_eq!(vq.used().idx().load(), 6);
        // New requests get later counters than the recovered ones.
        vq.avail().ring().ref_at(6).unwrap().store(7u16.to_le());
        vq.desc_table()
            .store(
                7,
                virtio_queue::desc::RawDescriptor::from(Descriptor::new(0x9000, 16, 0, 0)),
            )
            .unwrap();
        vq.avail().idx().store(7u16.to_le());
        assert_eq!(take(&mut q, &mem, &t), 7);
        t.get(9);
        assert_eq!(t.in_flight(), [7, 9]);
    }

    #[test]
    fn a_used_ring_ahead_of_the_region_completes_the_cut_put() {
        let mem = memory();
        let vq = ring(&mem, 4);
        let mut q: Queue = vq.create_queue().unwrap();
        let region = Arc::new(InflightRegion::create(1, QSIZE).unwrap());
        let t = region.queue(0).unwrap();
        t.recover(0);
        for _ in 0..4 {
            take(&mut q, &mem, &t);
        }
        put(&mut q, &mem, &t, 2);
        // Killed inside the put of 1: the used ring has it, the region does not.
        t.pre_put(1);
        q.add_used(&mem, 1, 0).unwrap();
        assert_eq!(t.in_flight(), [0, 1, 3]);
        let t = region.queue(0).unwrap();
        let r = t.recover(vq.used().idx().load());
        assert!(r.torn_put);
        assert_eq!(r.resubmit, [0, 3]);
        assert_eq!(r.next_avail, Some(4));
        assert_eq!(t.in_flight(), [0, 3]);
        // A second recovery finds the region consistent.
        let r2 = region.queue(0).unwrap().recover(2);
        assert!(!r2.torn_put);
        assert_eq!(r2.resubmit, [0, 3]);
    }

    #[test]
    fn torn_updates_lose_nothing_and_run_nothing_twice() {
        let mem = memory();
        // Killed after pre_put, before the ring: the head is still in flight, run again.
        {
            let vq = ring(&mem, 3);
            let mut q: Queue = vq.create_queue().unwrap();
            let region = Arc::new(InflightRegion::create(1, QSIZE).unwrap());
            let t = region.queue(0).unwrap();
            t.recover(0);
            for _ in 0..3 {
                take(&mut q, &mem, &t);
            }
            put(&mut q, &mem, &t, 0);
            t.pre_put(2);
            let r = region.queue(0).unwrap().recover(vq.used().idx().load());
            assert!(!r.torn_put);
            assert_eq!(r.resubmit, [1, 2]);
            assert_eq!(r.next_avail, Some(3));
        }
        // Killed after the inflight flag was cleared, before used_idx: nothing run again.
        {
            let vq = ring(&mem, 2);
            let mut q: Queue = vq.create_queue().unwrap();
            let region = Arc::new(InflightRegion::create(1, QSIZE).unwrap());
            let t = region.queue(0).unwrap();
            t.recover(0);
            take(&mut q, &mem, &t);
            take(&mut q, &mem, &t);
            t.pre_put(0);
            q.add_used(&mem, 0, 0).unwrap();
            t.mem().inflight(0).store(0, Ordering::Release);
            let r = region.queue(0).unwrap().recover(vq.used().idx().load());
            assert!(r.torn_put);
            assert_eq!(r.resubmit, [1]);
            assert_eq!(r.next_avail, Some(2));
        }
        // Killed after a head was taken, before it was marked: the avail index resumes at it,
        // so it is taken again from the ring, once.
        {
            let vq = ring(&mem, 3);
            let mut q: Queue = vq.create_queue().unwrap();
            let region = Arc::new(InflightRegion::create(1, QSIZE).unwrap());
            let t = region.queue(0).unwrap();
            t.recover(0);
            take(&mut q, &mem, &t);
            take(&mut q, &mem, &t);
            let _unmarked = q.pop_descriptor_chain(&mem).unwrap();
            let t = region.queue(0).unwrap();
            let r = t.recover(vq.used().idx().load());
            assert_eq!(r.resubmit, [0, 1]);
            assert_eq!(r.next_avail, Some(2));
            let mut q: Queue = vq.create_queue().unwrap();
            q.set_next_avail(2);
            assert_eq!(q.pop_descriptor_chain(&mem).unwrap().head_index(), 2);
            assert!(q.pop_descriptor_chain(&mem).is_none());
        }
    }

    #[test]
    fn chains_walk_like_virtio_queue() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QSIZE);
        // A three-descriptor chain at 4 -> 5 -> 6 and an indirect one at 8.
        let descs = [
            Descriptor::new(0x8000, 16, 1, 5),
            Descriptor::new(0x8100, 512, 1, 6),
            Descriptor::new(0x8400, 1, 2, 0),
        ];
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table()
                .store(4 + i as u16, virtio_queue::desc::RawDescriptor::from(*d))
                .unwrap();
        }
        let region = Arc::new(InflightRegion::create(1, QSIZE).unwrap());
        let t = region.queue(0).unwrap();
        let got: Vec<_> = t
            .chain(&mem, vq.desc_table_addr(), 4)
            .map(|d| (d.addr().0, d.len()))
            .collect();
        assert_eq!(got, [(0x8000, 16), (0x8100, 512), (0x8400, 1)]);
        // Indirect: a table of 2 at 0x20000.
        let table = GuestAddress(0x2_0000);
        mem.write_obj(Descriptor::new(0xa000, 16, 1, 1), table)
            .unwrap();
        mem.write_obj(Descriptor::new(0xb000, 1, 2, 0), table.unchecked_add(16))
            .unwrap();
        vq.desc_table()
            .store(
                8,
                virtio_queue::desc::RawDescriptor::from(Descriptor::new(0x2_0000, 32, 4, 0)),
            )
            .unwrap();
        let got: Vec<_> = t
            .chain(&mem, vq.desc_table_addr(), 8)
            .map(|d| d.addr().0)
            .collect();
        assert_eq!(got, [0xa000, 0xb000]);
        // A loop ends after the queue size.
        vq.desc_table()
            .store(
                9,
                virtio_queue::desc::RawDescriptor::from(Descriptor::new(0x8000, 1, 1, 9)),
            )
            .unwrap();
        assert_eq!(
            t.chain(&mem, vq.desc_table_addr(), 9).count(),
            QSIZE as usize
        );
        // Past the table: nothing.
        assert_eq!(t.chain(&mem, vq.desc_table_addr(), QSIZE).count(), 0);
    }
}
