//! Inflight I/O tracking on the request path: where a queue worker takes its chains from and
//! how it completes them when the frontend shares an inflight region
//! (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, the tracker `vhost_user_backend::InflightQueue`).
//! The heads a crashed daemon had in flight are run again first, oldest first; every head
//! taken from the available ring is marked in flight at once; every completion goes through
//! the region's put protocol, whatever order the engine completes requests in.

use std::ops::Deref;

use vhost_user_backend::{InflightChain, InflightQueue, VringT};

use super::VringRwLock;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddress, GuestMemory};

/// A chain to serve: taken from the available ring, or one in flight before a restart.
#[derive(Clone)]
pub(super) enum Chain<M> {
    Popped(DescriptorChain<M>),
    Resubmitted(InflightChain<M>),
}

impl<M> Chain<M>
where
    M: Deref,
    M::Target: GuestMemory,
{
    pub(super) fn head_index(&self) -> u16 {
        match self {
            Chain::Popped(c) => c.head_index(),
            Chain::Resubmitted(c) => c.head_index(),
        }
    }
}

impl<M> Iterator for Chain<M>
where
    M: Deref,
    M::Target: GuestMemory,
{
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        match self {
            Chain::Popped(c) => c.next(),
            Chain::Resubmitted(c) => c.next(),
        }
    }
}

/// The next chain of the queue: a head left in flight by the previous daemon first, then the
/// available ring (the head marked in flight before anything else is taken).
pub(super) fn pop<'m, M: GuestMemory>(
    vring: &VringRwLock,
    mem: &'m M,
    track: Option<&InflightQueue>,
) -> Option<Chain<&'m M>> {
    if let Some(t) = track {
        if let Some(head) = t.next_resubmit() {
            let table = vring.get_ref().get_queue().desc_table();
            return Some(Chain::Resubmitted(t.chain(mem, GuestAddress(table), head)));
        }
    }
    let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem)?;
    if let Some(t) = track {
        t.get(chain.head_index());
    }
    Some(Chain::Popped(chain))
}

/// Puts `head` in the used ring with `len` bytes written, inside the region's put protocol.
pub(super) fn put<M: GuestMemory>(
    vring: &VringRwLock,
    mem: &M,
    track: Option<&InflightQueue>,
    head: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    if let Some(t) = track {
        t.pre_put(head);
    }
    let mut v = vring.get_mut();
    let q = v.get_queue_mut();
    q.add_used(mem, head, len)?;
    if let Some(t) = track {
        t.post_put(head, q.next_used());
    }
    Ok(())
}
