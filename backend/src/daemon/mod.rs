//! The daemon, below the faces and above the operations: the live disks (`live`: versions swapped
//! under a measured pause, migration, promote, snapshots, tiers, status), the event hub, the
//! daemon's set of served and failed disks (reopen, deploy), and the control server with its
//! typed protocol (`proto`), and what attaches a VM to a served disk (`vm`: QEMU's options,
//! libvirt's `<disk>` element).

pub mod control;
pub mod events;
pub mod handover;
pub mod handover_conn;
pub mod live;
pub mod proto;
pub mod served;
pub mod store_faults;
pub mod tiers;
pub mod upgrade;
pub mod vm;
