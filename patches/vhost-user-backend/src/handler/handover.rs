// Copyright 2026 The Dovetail Authors.
//
// SPDX-License-Identifier: Apache-2.0

//! The handler's side of handing a live connection over ([`crate::handover`]): stopping and
//! restarting its vrings in place, describing its state, and rebuilding it from a description.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserMemoryRegion, VhostUserVringAddrFlags,
};
use vhost::vhost_user::{Backend, Error as VhostUserError, VhostUserBackendReqHandlerMut};
use virtio_queue::QueueT;
use vm_memory::mmap::NewBitmap;
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};

use super::VhostUserHandler;
use crate::backend::VhostUserBackend;
use crate::bitmap::BitmapReplace;
use crate::handover::{ExportedConnection, ExportedInflight, ExportedRegion, ExportedVring};
use crate::inflight::InflightRegion;
use crate::vring::VringT;

/// A new descriptor of `fd`, close-on-exec, as a `File`.
fn dup_file(fd: i32) -> io::Result<File> {
    // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor (or fails) without touching memory.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `n` was just created and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(n) })
}

fn bad(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, why)
}

impl<T: VhostUserBackend> VhostUserHandler<T> {
    /// Stops every started vring in place, as `GET_VRING_BASE` does (the backend's
    /// `stop_vring` completes the requests in flight) but keeping its eventfds and indexes;
    /// the indexes of the vrings stopped are remembered for [`resume_vrings`] and the export.
    ///
    /// [`resume_vrings`]: Self::resume_vrings
    pub(crate) fn pause_vrings(&mut self) -> io::Result<()> {
        for (index, vring) in self.vrings.iter().enumerate() {
            if !vring.get_ref().get_queue().ready() {
                continue;
            }
            let index = index as u8;
            vring.set_queue_ready(false);
            self.update_vring_registration(vring, index)
                .map_err(|e| io::Error::other(e.to_string()))?;
            self.backend.stop_vring(u32::from(index))?;
            self.paused.push(index);
        }
        Ok(())
    }

    /// Starts again the vrings [`pause_vrings`](Self::pause_vrings) stopped, each kicked and
    /// its driver signalled once.
    pub(crate) fn resume_vrings(&mut self) -> io::Result<()> {
        for index in std::mem::take(&mut self.paused) {
            let vring = &self.vrings[usize::from(index)];
            vring.set_queue_ready(true);
            self.update_vring_registration(vring, index)
                .map_err(|e| io::Error::other(e.to_string()))?;
            Self::inflight_kick(vring, index);
        }
        Ok(())
    }

    fn gpa_to_vmm_va(&self, gpa: u64) -> Option<u64> {
        self.mappings
            .iter()
            .find(|m| gpa >= m.gpa_base && gpa - m.gpa_base < m.size)
            .map(|m| gpa - m.gpa_base + m.vmm_addr)
    }

    /// Describes the connection's state with duplicates of its files (the vrings paused).
    pub(crate) fn export(
        &self,
        conn: std::os::unix::net::UnixStream,
        negotiated: vhost::vhost_user::NegotiatedState,
    ) -> io::Result<ExportedConnection> {
        let mem = self.atomic_mem.memory();
        let mut regions = Vec::new();
        for region in mem.iter() {
            let gpa = region.start_addr().0;
            let Some(fo) = region.file_offset() else {
                return Err(io::Error::other(format!(
                    "the memory region at {gpa:#x} has no file"
                )));
            };
            let user_addr = self
                .mappings
                .iter()
                .find(|m| m.gpa_base == gpa)
                .map(|m| m.vmm_addr)
                .ok_or_else(|| io::Error::other(format!("no mapping of region {gpa:#x}")))?;
            regions.push(ExportedRegion {
                guest_phys_addr: gpa,
                memory_size: region.len(),
                user_addr,
                mmap_offset: fo.start(),
                file: fo.file().try_clone()?,
            });
        }
        let mut vrings = Vec::new();
        for (index, vring) in self.vrings.iter().enumerate() {
            let state = vring.get_ref();
            let q = state.get_queue();
            let started = q.ready() || self.paused.contains(&(index as u8));
            let va = |gpa: u64| {
                if started {
                    self.gpa_to_vmm_va(gpa).ok_or_else(|| {
                        io::Error::other(format!("vring {index}: {gpa:#x} is in no region"))
                    })
                } else {
                    Ok(self.gpa_to_vmm_va(gpa).unwrap_or(0))
                }
            };
            vrings.push(ExportedVring {
                index: index as u16,
                size: q.size(),
                desc_table: va(q.desc_table())?,
                avail_ring: va(q.avail_ring())?,
                used_ring: va(q.used_ring())?,
                next_avail: q.next_avail(),
                next_used: q.next_used(),
                started,
                enabled: state.is_enabled(),
                kick: state
                    .get_kick()
                    .as_ref()
                    .map(|f| dup_file(f.as_raw_fd()))
                    .transpose()?,
                call: state
                    .get_call()
                    .as_ref()
                    .map(|f| dup_file(f.as_raw_fd()))
                    .transpose()?,
                err: state
                    .get_err()
                    .as_ref()
                    .map(|f| dup_file(f.as_raw_fd()))
                    .transpose()?,
            });
        }
        let inflight = match &self.inflight {
            Some(r) => {
                let m = r.message();
                Some(ExportedInflight {
                    mmap_size: m.mmap_size,
                    mmap_offset: m.mmap_offset,
                    num_queues: m.num_queues,
                    queue_size: m.queue_size,
                    file: r.file().try_clone()?,
                })
            }
            None => None,
        };
        let backend_req = self
            .backend_req
            .as_ref()
            .map(|s| s.try_clone())
            .transpose()?;
        Ok(ExportedConnection {
            conn,
            negotiated,
            owned: self.owned,
            features_acked: self.features_acked,
            acked_features: self.acked_features,
            acked_protocol_features: self.acked_protocol_features,
            regions,
            vrings,
            inflight,
            backend_req,
        })
    }
}

impl<T: VhostUserBackend> VhostUserHandler<T>
where
    T::Bitmap: BitmapReplace + NewBitmap + Clone,
{
    /// Sets a new handler up as the frontend's messages set up the one `c` was exported from
    /// (its connection and negotiated state are the caller's). Refuses a description no
    /// frontend could have given: a vring or region out of range, features the backend does
    /// not offer.
    pub(crate) fn import(&mut self, c: &mut ExportedConnection) -> io::Result<()> {
        let vhost = |e: VhostUserError| io::Error::other(e.to_string());
        if c.vrings.len() > self.vrings.len() {
            return Err(bad(format!(
                "{} vrings, the device has {}",
                c.vrings.len(),
                self.vrings.len()
            )));
        }
        self.owned = c.owned;
        self.set_protocol_features(c.acked_protocol_features)
            .map_err(vhost)?;
        if c.features_acked {
            self.set_features(c.acked_features).map_err(vhost)?;
        }
        let mut table = Vec::new();
        let mut files = Vec::new();
        for r in c.regions.drain(..) {
            let ok = r.memory_size != 0
                && r.guest_phys_addr.checked_add(r.memory_size).is_some()
                && r.user_addr.checked_add(r.memory_size).is_some()
                && r.mmap_offset.checked_add(r.memory_size).is_some();
            if !ok {
                return Err(bad(format!(
                    "memory region at {:#x} of {:#x} bytes",
                    r.guest_phys_addr, r.memory_size
                )));
            }
            table.push(VhostUserMemoryRegion::new(
                r.guest_phys_addr,
                r.memory_size,
                r.user_addr,
                r.mmap_offset,
            ));
            files.push(r.file);
        }
        if !table.is_empty() {
            self.set_mem_table(&table, files, None).map_err(vhost)?;
        }
        if let Some(i) = c.inflight.take() {
            let msg =
                VhostUserInflight::new(i.mmap_size, i.mmap_offset, i.num_queues, i.queue_size);
            self.inflight_offered().map_err(vhost)?;
            self.inflight_geometry(&msg).map_err(vhost)?;
            let region = InflightRegion::adopt(i.file, &msg)?;
            self.adopt_inflight_region(Arc::new(region));
        }
        for v in c.vrings.iter_mut() {
            let index = u32::from(v.index);
            if usize::from(v.index) >= self.vrings.len() {
                return Err(bad(format!("vring {index} does not exist")));
            }
            self.set_vring_num(index, u32::from(v.size))
                .map_err(vhost)?;
            if v.started {
                self.set_vring_addr(
                    index,
                    VhostUserVringAddrFlags::empty(),
                    v.desc_table,
                    v.used_ring,
                    v.avail_ring,
                    0,
                )
                .map_err(vhost)?;
            }
            self.set_vring_base(index, u32::from(v.next_avail))
                .map_err(vhost)?;
            let idx = v.index as u8;
            self.set_vring_call(idx, v.call.take()).map_err(vhost)?;
            self.set_vring_err(idx, v.err.take()).map_err(vhost)?;
            self.vrings[usize::from(v.index)].set_enabled(v.enabled);
            let kick = v.kick.take();
            if v.started {
                if kick.is_none() {
                    return Err(bad(format!("vring {index} is started without a kick fd")));
                }
                self.set_vring_kick(idx, kick).map_err(vhost)?;
                let vring = &self.vrings[usize::from(v.index)];
                if !vring.get_ref().get_queue().ready() {
                    return Err(bad(format!("vring {index} did not start")));
                }
                // Whatever was made available or completed while no backend looked.
                Self::inflight_kick(vring, idx);
            } else if kick.is_some() {
                // A kick fd on a stopped vring: set, so it starts as it would have.
                self.set_vring_kick(idx, kick).map_err(vhost)?;
            }
        }
        if let Some(s) = c.backend_req.take() {
            self.set_backend_req_fd(Backend::from_stream(s));
        }
        Ok(())
    }
}
