//! Migration between layout versions: the Tee (a `BlockLayout` over a trusted and a candidate
//! version) with its validation policies and quarantine, the persistent presence map of what the
//! candidate holds; later upgrade-on-write, copy-out, promote/retire and deployment.
//!
//! Plain Rust: no virtio, no vhost. See ARCHITECTURE.md for where it sits.

pub mod presence;
