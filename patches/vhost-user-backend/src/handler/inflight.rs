// Copyright 2026 The Dovetail Authors.
//
// SPDX-License-Identifier: Apache-2.0

//! The handler's side of inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`):
//! `GET_INFLIGHT_FD`, `SET_INFLIGHT_FD`, and reading the region when a vring starts. The
//! region itself is [`crate::inflight`].

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Error as VhostUserError, Result as VhostUserResult};

use super::VhostUserHandler;
use crate::backend::VhostUserBackend;
use crate::inflight::InflightRegion;
use crate::vring::VringT;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_RING_PACKED;
use virtio_queue::QueueT;

impl<T: VhostUserBackend> VhostUserHandler<T> {
    /// The messages are served only for a backend that offers the feature, and only with split
    /// queues: the packed layout of the region is not implemented, so a backend offering
    /// `VIRTIO_F_RING_PACKED` is refused (the frontend may ask before it acks features).
    pub(super) fn inflight_offered(&self) -> VhostUserResult<()> {
        if !self
            .backend
            .protocol_features()
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            return Err(VhostUserError::InvalidOperation(
                "the backend does not track inflight I/O",
            ));
        }
        if self.backend.features() & (1 << VIRTIO_F_RING_PACKED) != 0 {
            log::error!("inflight I/O tracking is implemented for split virtqueues only");
            return Err(VhostUserError::InvalidOperation(
                "inflight I/O tracking of packed virtqueues is not implemented",
            ));
        }
        Ok(())
    }

    pub(super) fn inflight_geometry(&self, msg: &VhostUserInflight) -> VhostUserResult<()> {
        if msg.num_queues == 0
            || usize::from(msg.num_queues) > self.num_queues
            || msg.queue_size == 0
            || usize::from(msg.queue_size) > self.max_queue_size
        {
            log::error!(
                "inflight region for {} queues of {} descriptors refused (at most {} of {})",
                msg.num_queues,
                msg.queue_size,
                self.num_queues,
                self.max_queue_size
            );
            return Err(VhostUserError::InvalidParam);
        }
        Ok(())
    }

    /// `VHOST_USER_GET_INFLIGHT_FD`: a new zeroed region of the frontend's geometry. The
    /// handler does not keep it: the frontend hands it back with `SET_INFLIGHT_FD`.
    pub(super) fn inflight_get(
        &mut self,
        msg: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        self.inflight_offered()?;
        self.inflight_geometry(msg)?;
        let region = InflightRegion::create(msg.num_queues, msg.queue_size)
            .map_err(VhostUserError::ReqHandlerError)?;
        let file = region
            .file()
            .try_clone()
            .map_err(VhostUserError::ReqHandlerError)?;
        Ok((region.message(), file))
    }

    /// `VHOST_USER_SET_INFLIGHT_FD`: maps the frontend's region; each vring reads its part
    /// when it starts.
    pub(super) fn inflight_set(
        &mut self,
        msg: &VhostUserInflight,
        file: File,
    ) -> VhostUserResult<()> {
        self.inflight_offered()?;
        self.inflight_geometry(msg)?;
        let region = InflightRegion::adopt(file, msg).map_err(|e| {
            log::error!("inflight region refused: {e}");
            VhostUserError::ReqHandlerError(e)
        })?;
        log::info!(
            "inflight I/O tracked in the frontend's region: {} queue(s) of {} descriptors",
            msg.num_queues,
            msg.queue_size
        );
        self.adopt_inflight_region(Arc::new(region));
        Ok(())
    }

    /// The inflight region in use, if the frontend set one: its file and
    /// [`message`](InflightRegion::message) are what another process needs to take the
    /// device over ([`adopt_inflight_region`](Self::adopt_inflight_region)).
    pub(crate) fn inflight_region(&self) -> Option<Arc<InflightRegion>> {
        self.inflight.clone()
    }

    /// Uses `region` as if the frontend had set it (a region handed over by another process).
    pub(crate) fn adopt_inflight_region(&mut self, region: Arc<InflightRegion>) {
        self.inflight = Some(region);
    }

    /// Before vring `index` starts: reads its region (completing a cut-short put), resumes
    /// the available ring after the heads in flight, and hands the backend the tracker with
    /// those heads to run again. Returns whether the vring is to be kicked once started (it
    /// tracks inflight I/O: like libvhost-user, a kick in case requests were made available
    /// while no backend was there).
    pub(crate) fn inflight_start(&self, vring: &T::Vring, index: u8) -> VhostUserResult<bool> {
        let Some(region) = self.inflight.as_ref() else {
            return Ok(false);
        };
        let Some(tracker) = region.queue(u16::from(index)) else {
            log::warn!(
                "vring {index} is past the inflight region's {} queues: not tracked",
                region.num_queues()
            );
            self.backend.set_inflight_queue(u16::from(index), None);
            return Ok(false);
        };
        let size = vring.get_ref().get_queue().size();
        if size != region.queue_size() {
            log::error!(
                "vring {index} has {size} descriptors, its inflight region {}",
                region.queue_size()
            );
            return Err(VhostUserError::InvalidParam);
        }
        let used = vring
            .queue_used_idx()
            .map_err(|_| VhostUserError::BackendInternalError)?;
        let base = vring.queue_next_avail();
        let r = tracker.recover(used);
        if let Some(next) = r.next_avail {
            // After a crash the frontend could not ask where the ring stopped and sets the used
            // index (QEMU's `virtio_queue_restore_last_avail_idx`): the region says how far past
            // it. After a clean stop (GET_VRING_BASE) the frontend's index is exact, and may be
            // further on than the region can tell (entries the backend took and could not
            // complete, such as a head past the queue size): kept, so nothing runs twice.
            let ahead = base.wrapping_sub(used);
            let next = if ahead > next.wrapping_sub(used) && ahead <= size {
                base
            } else {
                next
            };
            vring.set_queue_next_avail(next);
            vring.set_queue_next_used(used);
        }
        if r.resubmit.is_empty() && !r.torn_put {
            log::debug!(
                "vring {index}: nothing in flight in the inflight region (used index {used}, \
                 avail index {} was {base})",
                vring.queue_next_avail()
            );
        } else {
            log::info!(
                "vring {index}: {} request(s) in flight resubmitted (heads {:?}), used index \
                 {used}{}",
                r.resubmit.len(),
                r.resubmit,
                if r.torn_put {
                    ", a cut-short completion finished"
                } else {
                    ""
                }
            );
        }
        self.backend
            .set_inflight_queue(u16::from(index), Some(tracker));
        Ok(true)
    }

    /// Writes 1 to the vring's kick and call eventfds: the backend looks at the avail ring (a
    /// request made available while no backend was there) and the driver at the used ring (a
    /// completion the dead backend wrote but did not signal), as libvhost-user does "in case of
    /// I/O hang after reconnecting".
    pub(crate) fn inflight_kick(vring: &T::Vring, index: u8) {
        if let Err(e) = vring.signal_used_queue() {
            log::warn!("vring {index}: signalling the driver after a start failed: {e}");
        }
        if let Some(kick) = vring.get_ref().get_kick() {
            let one = 1u64.to_ne_bytes();
            // SAFETY: an 8-byte write from a local buffer to an open eventfd.
            let n = unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), one.len()) };
            if n != 8 {
                log::warn!(
                    "vring {index}: kicking it after a start failed: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }
}
