//! The `dovetail` daemon: serves a disk (any `BlockLayout`) to QEMU over vhost-user-blk.
//!
//! This is the only crate that knows about vhost, virtio or guest memory. The request path reads
//! straight down: [`server`] accepts a guest → [`device`] runs one worker thread per queue →
//! [`request`] parses and checks each descriptor chain → [`disk::Disk`] → the layout.

pub mod access;
pub mod daemon;
pub mod device;
pub mod dirty;
pub mod disk;
pub mod face;
#[cfg(feature = "test-utils")]
pub mod fuzzing;
pub mod handoff;
pub mod heartbeat;
pub mod metrics;
pub mod ops;
pub mod priority;
pub mod request;
pub mod sandbox;
pub mod server;
pub mod split;
pub mod strict_json;

pub use device::{BlkDevice, DeviceConfig};
pub use disk::Disk;
pub use server::{listen, serve, ListenOn, ServeError, Shutdown};
