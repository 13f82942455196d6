//! A live guest connection on the handover channel (handover format 2, docs/format.md *The
//! handover protocol*): an exported connection (`crate::handoff`) as the JSON of a
//! `connection` message and its files in a fixed order, sent as `SCM_RIGHTS` in one or more
//! `connection-fds` messages (at most `handover::MAX_FDS` each), and back. Errors are the
//! reasons a message is refused (`daemon::handover` makes them `HandoverError::Bad`). What arrives is checked
//! as a frontend's messages would be: the counts must match the files, the connection and the
//! backend request channel must be Unix stream sockets; the handler refuses the rest
//! (regions, vrings) as it would refuse a frontend's.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};
use vhost_user_backend::handover::NegotiatedState;
use vhost_user_backend::{ExportedConnection, ExportedInflight, ExportedRegion, ExportedVring};

/// What a `connection` message describes of a connection (its files travel apart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnState {
    pub virtio_features: u64,
    pub acked_virtio_features: u64,
    pub acked_protocol_features: u64,
    /// The queues the frontend started, by index.
    pub started: Vec<u8>,
    pub owned: bool,
    pub features_acked: bool,
    pub regions: Vec<RegionState>,
    pub vrings: Vec<VringState>,
    pub inflight: Option<InflightState>,
    pub backend_req: bool,
    /// When the old process paused the connection (`CLOCK_MONOTONIC` ns; 0: unknown), for the
    /// new one's log of how long the guest's queues stood still.
    #[serde(default)]
    pub paused_at_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionState {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VringState {
    pub index: u16,
    pub size: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub started: bool,
    pub enabled: bool,
    pub kick: bool,
    pub call: bool,
    pub err: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InflightState {
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

impl ConnState {
    /// How many files go with it: the connection, each region's, each vring's kick, call and
    /// error eventfds present, the inflight region's, the backend request channel's.
    pub fn file_count(&self) -> usize {
        1 + self.regions.len()
            + self
                .vrings
                .iter()
                .map(|v| usize::from(v.kick) + usize::from(v.call) + usize::from(v.err))
                .sum::<usize>()
            + usize::from(self.inflight.is_some())
            + usize::from(self.backend_req)
    }
}

/// The state of `c` and its files' descriptors, in the order [`import`] takes them.
pub fn export(c: &ExportedConnection) -> (ConnState, Vec<RawFd>) {
    let mut fds = vec![c.conn.as_raw_fd()];
    fds.extend(c.regions.iter().map(|r| r.file.as_raw_fd()));
    for v in &c.vrings {
        for f in [&v.kick, &v.call, &v.err].into_iter().flatten() {
            fds.push(f.as_raw_fd());
        }
    }
    if let Some(i) = &c.inflight {
        fds.push(i.file.as_raw_fd());
    }
    if let Some(s) = &c.backend_req {
        fds.push(s.as_raw_fd());
    }
    let state = ConnState {
        virtio_features: c.negotiated.virtio_features,
        acked_virtio_features: c.negotiated.acked_virtio_features,
        acked_protocol_features: c.acked_protocol_features,
        started: c.negotiated.started.clone(),
        owned: c.owned,
        features_acked: c.features_acked,
        regions: c
            .regions
            .iter()
            .map(|r| RegionState {
                guest_phys_addr: r.guest_phys_addr,
                memory_size: r.memory_size,
                user_addr: r.user_addr,
                mmap_offset: r.mmap_offset,
            })
            .collect(),
        vrings: c
            .vrings
            .iter()
            .map(|v| VringState {
                index: v.index,
                size: v.size,
                desc_table: v.desc_table,
                avail_ring: v.avail_ring,
                used_ring: v.used_ring,
                next_avail: v.next_avail,
                next_used: v.next_used,
                started: v.started,
                enabled: v.enabled,
                kick: v.kick.is_some(),
                call: v.call.is_some(),
                err: v.err.is_some(),
            })
            .collect(),
        inflight: c.inflight.as_ref().map(|i| InflightState {
            mmap_size: i.mmap_size,
            mmap_offset: i.mmap_offset,
            num_queues: i.num_queues,
            queue_size: i.queue_size,
        }),
        backend_req: c.backend_req.is_some(),
        paused_at_ns: crate::handoff::paused_at(c).unwrap_or(0),
    };
    debug_assert_eq!(state.file_count(), fds.len());
    (state, fds)
}

fn stream(fd: OwnedFd, what: &str) -> Result<UnixStream, String> {
    let raw = fd.as_raw_fd();
    let domain = crate::server::socket_option(raw, libc::SO_DOMAIN);
    let kind = crate::server::socket_option(raw, libc::SO_TYPE);
    match (domain, kind) {
        (Ok(libc::AF_UNIX), Ok(libc::SOCK_STREAM)) => Ok(UnixStream::from(fd)),
        _ => Err(format!("the {what} is not a Unix stream socket")),
    }
}

/// The connection `state` describes, with its `fds` (in [`export`]'s order).
pub fn import(state: &ConnState, fds: Vec<OwnedFd>) -> Result<ExportedConnection, String> {
    if fds.len() != state.file_count() {
        return Err(format!(
            "a connection of {} files came with {}",
            state.file_count(),
            fds.len()
        ));
    }
    if state.vrings.len() > 256
        || state
            .started
            .iter()
            .any(|&i| usize::from(i) >= state.vrings.len())
    {
        return Err("a connection with a started queue it does not have".into());
    }
    let mut fds = fds.into_iter();
    let mut next = || fds.next().expect("counted above");
    let conn = stream(next(), "connection")?;
    let regions = state
        .regions
        .iter()
        .map(|r| ExportedRegion {
            guest_phys_addr: r.guest_phys_addr,
            memory_size: r.memory_size,
            user_addr: r.user_addr,
            mmap_offset: r.mmap_offset,
            file: File::from(next()),
        })
        .collect();
    let vrings = state
        .vrings
        .iter()
        .map(|v| {
            let mut take = |present: bool| present.then(|| File::from(next()));
            let kick = take(v.kick);
            let call = take(v.call);
            let err = take(v.err);
            ExportedVring {
                index: v.index,
                size: v.size,
                desc_table: v.desc_table,
                avail_ring: v.avail_ring,
                used_ring: v.used_ring,
                next_avail: v.next_avail,
                next_used: v.next_used,
                started: v.started,
                enabled: v.enabled,
                kick,
                call,
                err,
            }
        })
        .collect();
    let inflight = state.inflight.as_ref().map(|i| ExportedInflight {
        mmap_size: i.mmap_size,
        mmap_offset: i.mmap_offset,
        num_queues: i.num_queues,
        queue_size: i.queue_size,
        file: File::from(next()),
    });
    let backend_req = match state.backend_req {
        true => Some(stream(next(), "backend request channel")?),
        false => None,
    };
    let c = ExportedConnection {
        conn,
        negotiated: NegotiatedState {
            virtio_features: state.virtio_features,
            acked_virtio_features: state.acked_virtio_features,
            acked_protocol_features: state.acked_protocol_features,
            started: state.started.clone(),
        },
        owned: state.owned,
        features_acked: state.features_acked,
        acked_features: state.acked_virtio_features,
        acked_protocol_features: state.acked_protocol_features,
        regions,
        vrings,
        inflight,
        backend_req,
    };
    if state.paused_at_ns != 0 {
        crate::handoff::note_paused(&c, state.paused_at_ns);
    }
    Ok(c)
}

/// A disk name of a `connection` message: one the store could name (docs/format.md, Names), or
/// an image's file name (what `serve --image` names its disk); never empty or with a `/`.
pub fn check_disk_name(disk: &str) -> Result<(), String> {
    if disk.is_empty() || disk.len() > 255 || disk.contains('/') || disk.contains('\0') {
        return Err(format!(
            "a connection for disk {}",
            dovetail_store::names::shown(disk)
        ));
    }
    Ok(())
}
