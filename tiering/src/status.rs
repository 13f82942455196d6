//! What the mover reports: a step's work, and a disk's tiering state.

use dovetail_store::TierInfo;

use crate::policy::{Class, TierPolicy};

/// What one step of the mover ([`Tiered::pass`](crate::Tiered::pass)) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Guest blocks looked at.
    pub scanned: u64,
    /// Blocks moved to the hot class.
    pub promoted: u64,
    /// Blocks moved to the cold class.
    pub demoted: u64,
    /// Blocks (and tree nodes) moved to follow their class's policy (copies, tier).
    pub placed: u64,
    /// Blocks that should move but found no room on the tier their policy names.
    pub no_room: u64,
    /// Whether the pass reached the end of the disk (a round is complete).
    pub wrapped: bool,
}

impl PassReport {
    pub fn moved(&self) -> u64 {
        self.promoted + self.demoted + self.placed
    }
}

/// Blocks and groups of one class on one tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassUsage {
    pub class: Class,
    pub compressed: bool,
    /// The tier of the groups' primaries.
    pub tier: String,
    pub copies: u8,
    pub groups: u64,
    /// Blocks in use (each stored `copies` times).
    pub blocks: u64,
    /// Whether these groups follow the class's current policy.
    pub compliant: bool,
}

/// A parallax-v2 disk's tiering state, for `ctl tiers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierStatus {
    pub policy: TierPolicy,
    pub tiers: Vec<TierInfo>,
    pub usage: Vec<ClassUsage>,
    /// Bad copies rewritten from a good one.
    pub repairs: u64,
    pub promoted: u64,
    pub demoted: u64,
    pub placed: u64,
    /// Reads of compressed blocks.
    pub compressed_reads: u64,
}
