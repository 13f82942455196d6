// Copyright 2026 The Dovetail Authors.
//
// SPDX-License-Identifier: Apache-2.0

//! Handing a live vhost-user connection to another backend process.
//!
//! A backend replaced while a frontend is connected (a daemon upgrading itself in place) can
//! give the new process everything the frontend negotiated, so the frontend sees no
//! disconnect: [`VhostUserDaemon::export`](crate::VhostUserDaemon::export) stops the queues
//! (their requests in flight complete first) and describes the connection as an
//! [`ExportedConnection`]: the connection's socket, the negotiated features, the guest memory
//! regions, each vring's addresses, indexes and eventfds, the inflight I/O region and the
//! backend request channel, every file a duplicate the caller may send to another process
//! (`SCM_RIGHTS`). [`VhostUserDaemon::start_adopted`](crate::VhostUserDaemon::start_adopted)
//! rebuilds a daemon serving that connection: the handler is set up as the frontend's
//! messages set it up, the vrings start where the old backend stopped, and each started vring
//! is kicked and its driver signalled once (as after a reconnect), so nothing made available
//! or completed in between waits.

use std::fs::File;
use std::os::unix::net::UnixStream;

pub use vhost::vhost_user::NegotiatedState;

/// One guest memory region of an exported connection, as `SET_MEM_TABLE`/`ADD_MEM_REG`
/// described it.
#[derive(Debug)]
pub struct ExportedRegion {
    /// The region's guest physical address.
    pub guest_phys_addr: u64,
    /// Its size in bytes.
    pub memory_size: u64,
    /// Its address in the frontend's address space (vring addresses are given in those).
    pub user_addr: u64,
    /// The offset of the region in `file`.
    pub mmap_offset: u64,
    /// The file backing the region.
    pub file: File,
}

/// One vring of an exported connection.
#[derive(Debug)]
pub struct ExportedVring {
    /// The vring's index.
    pub index: u16,
    /// Its size (descriptors).
    pub size: u16,
    /// The descriptor table, available and used rings, in the frontend's address space (as
    /// `SET_VRING_ADDR` gives them); zero when the vring was never set up.
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// The next available index the backend takes.
    pub next_avail: u16,
    /// The next used index the backend puts.
    pub next_used: u16,
    /// Whether the vring was started (kick fd set, not stopped by `GET_VRING_BASE`).
    pub started: bool,
    /// Whether the frontend enabled it (`SET_VRING_ENABLE`).
    pub enabled: bool,
    /// Its kick, call and error eventfds.
    pub kick: Option<File>,
    pub call: Option<File>,
    pub err: Option<File>,
}

/// The inflight I/O tracking region of an exported connection.
#[derive(Debug)]
pub struct ExportedInflight {
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
    pub file: File,
}

/// Everything another backend needs to serve a connection this one negotiated.
#[derive(Debug)]
pub struct ExportedConnection {
    /// The connection to the frontend.
    pub conn: UnixStream,
    /// The request endpoint's state (features offered and acked, started queues).
    pub negotiated: NegotiatedState,
    /// `SET_OWNER` was received.
    pub owned: bool,
    /// `SET_FEATURES` was received, with these features.
    pub features_acked: bool,
    pub acked_features: u64,
    /// The protocol features the frontend acked.
    pub acked_protocol_features: u64,
    /// The guest memory regions.
    pub regions: Vec<ExportedRegion>,
    /// Every vring of the device, by index.
    pub vrings: Vec<ExportedVring>,
    /// The inflight I/O region, if the frontend set one.
    pub inflight: Option<ExportedInflight>,
    /// The backend request channel, if the frontend set one (`SET_BACKEND_REQ_FD`).
    pub backend_req: Option<UnixStream>,
}

impl ExportedConnection {
    /// How many files the connection carries (to size the messages that send them).
    pub fn file_count(&self) -> usize {
        1 + self.regions.len()
            + self
                .vrings
                .iter()
                .map(|v| {
                    usize::from(v.kick.is_some())
                        + usize::from(v.call.is_some())
                        + usize::from(v.err.is_some())
                })
                .sum::<usize>()
            + usize::from(self.inflight.is_some())
            + usize::from(self.backend_req.is_some())
    }
}
