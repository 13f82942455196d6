//! The programmer-provided code that turns one block of the trusted (old) layout into what the
//! candidate (new) layout is given when the block migrates, by upgrade-on-write or copy-out.
//!
//! The Tee hands the candidate *guest data* (the disk as the guest sees it); each layout keeps
//! its own metadata. An upgrade therefore sees the block's bytes and its number, and may change
//! the bytes (a format conversion) or only look at them (e.g. to compute the initial
//! annotations a new layout keeps per block). Same-layout candidates use [`Identity`].

/// Turns one 4 KiB block of the trusted version into the candidate's.
pub trait Upgrade: Send + Sync + std::fmt::Debug {
    /// A short name for logs and status (`identity`, `parallax-v1-to-v2`, ...).
    fn name(&self) -> &str;

    /// Converts `data`, the guest-visible content of block `block` (4 KiB, shorter for the last
    /// block of a disk whose size is not a multiple of 4 KiB), in place. An error quarantines
    /// the candidate: the upgrade code is part of what is being validated.
    fn upgrade_block(&self, block: u64, data: &mut [u8]) -> dovetail_layout::Result<()>;
}

/// The upgrade between two versions of the same layout: the block as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity;

impl Upgrade for Identity {
    fn name(&self) -> &str {
        "identity"
    }

    fn upgrade_block(&self, _block: u64, _data: &mut [u8]) -> dovetail_layout::Result<()> {
        Ok(())
    }
}

/// The upgrade from a trusted layout to a candidate layout, by their names.
pub fn for_layouts(from: &str, to: &str) -> Option<Box<dyn Upgrade>> {
    (from == to).then(|| Box::new(Identity) as Box<dyn Upgrade>)
}
