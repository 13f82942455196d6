//! Migration between layout versions: the Tee (a `BlockLayout` over a trusted and a candidate
//! version) with its validation policies and quarantine, the persistent presence map of what the
//! candidate holds and the migration record, copy-out and upgrades, promote's verification pass
//! and readiness checks, and the choice of a sampled deployment.
//!
//! Plain Rust: no virtio, no vhost. See ARCHITECTURE.md for where it sits.
//!
//! - [`policy`]: the seven validation policies of the Dovetail paper's Table 1.
//! - [`tee`]: the [`Tee`] itself (ordering, presence, quarantine, durability; module docs).
//! - [`events`]: what the Tee reports: events with provenance, counters.
//! - [`switch`]: the [`Switch`] a running disk is served through, so its version set or policy
//!   can change between requests (a measured pause).
//! - [`presence`], [`record`]: the presence map and the migration record in a store's `maps/`
//!   (opened without following symlinks: `mapfile`).
//! - [`verify`]: promote's verification pass (every block of the candidate against the trusted
//!   version); [`promote`]: whether a candidate may be promoted; [`deploy`]: which disks a
//!   sampled deployment chooses. The backend carries these decisions out.
//! - [`journal`], [`bisect`]: the bounded request journal a Tee keeps on request, and the
//!   divergence bisection that replays it against fresh versions to name the first request
//!   after which the versions' views of a block differ; [`bisect_members`]: the same for a
//!   voting Tee of N members (when a member first left the majority).
//! - `stream`, `stripes`, `lazy`: the background stream, the striped lock table, the lazy hash
//!   job and the resync after an unclean stop (internal).

pub mod bisect;
pub mod bisect_members;
pub mod copyout;
pub mod deploy;
pub mod events;
pub mod journal;
mod lazy;
pub mod mapfile;
pub mod policy;
pub mod presence;
pub mod promote;
pub mod record;
mod stream;
mod stripes;
pub mod switch;
pub mod tee;
pub mod upgrade;
pub mod verify;
pub mod vote;
mod vote_writer;

pub use copyout::{CopyOut, CopyOutOptions, JobState, Progress, Scope};
pub use events::{EventKind, RequestInfo, TeeCounters, TeeEvent, TeeEvents};
pub use policy::Policy;
pub use switch::{Pause, PauseStats, Switch};
pub use tee::{Tee, TeeError, TeeOptions};
pub use upgrade::{Identity, Upgrade};
pub use vote::{MemberStatus, VoteCounters, VotingTee};
