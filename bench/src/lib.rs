//! A host-side vhost-user-blk load generator, and side-by-side benchmarks of the dovetail daemon,
//! qemu-storage-daemon and host fio.
//!
//! - [`driver`]: the driver side of a vhost-user-blk device (guest memory, negotiation, split
//!   virtqueues), shared with the backend's integration tests.
//! - [`load`]: the load generator proper: patterns, queue depth, queues, latency histograms.
//! - [`verify`]: self-describing blocks and the record of acknowledged writes.
//! - [`compare`]: the benchmark that runs fio, qemu-storage-daemon and dovetail on one file and
//!   writes BENCHMARKS.md.
//! - [`pause`]: the pause a live reconfiguration (tee, policy, snapshot, untee through the
//!   control socket) costs a busy guest.
//! - [`migrate`]: the copy-out migration: its throughput against dd, its cost to a busy guest,
//!   and the promote pause.
//! - [`annotate`]: what parallax-v2's per-block annotations cost against parallax-v1.
//! - [`sis`]: what single-instance blocks save a Tee in space and cost it in IOPS.
//! - [`seccomp_cost`]: what the daemon's seccomp filters cost a busy disk.
//! - [`soak`]: every layout under verified load, faults, snapshots, control-socket abuse and
//!   kill -9 with restarts, for minutes or hours; nothing acknowledged may be lost.

pub mod annotate;
pub mod chart;
pub mod commits;
pub mod compare;
pub mod comparison;
pub mod direct;
pub mod driver;
pub mod fill;
pub mod hostday;
pub mod layouts;
pub mod load;
pub mod migrate;
pub mod pause;
pub mod procstat;
pub mod seccomp_cost;
pub mod section;
pub mod sis;
pub mod soak;
pub mod tiers;
pub mod units;
pub mod verify;
