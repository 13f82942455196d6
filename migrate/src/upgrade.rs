//! The programmer-provided code that turns one block of the trusted (old) layout into what the
//! candidate (new) layout is given when the block migrates, by upgrade-on-write or copy-out.
//!
//! The Tee hands the candidate *guest data* (the disk as the guest sees it); each layout keeps
//! its own metadata. An upgrade therefore sees the block's bytes and its number, and may change
//! the bytes (a format conversion) or only look at them (e.g. to compute the initial
//! annotations a new layout keeps per block). Same-layout candidates use [`Identity`].

use std::sync::Arc;

use dovetail_annotations::Annotation;
use dovetail_layout::parallax::Parallax;

/// Turns one 4 KiB block of the trusted version into the candidate's.
pub trait Upgrade: Send + Sync + std::fmt::Debug {
    /// A short name for logs and status (`identity`, `parallax-v1-to-v2`, ...).
    fn name(&self) -> &str;

    /// Converts `data`, the guest-visible content of block `block` (4 KiB, shorter for the last
    /// block of a disk whose size is not a multiple of 4 KiB), in place. An error quarantines
    /// the candidate: the upgrade code is part of what is being validated.
    fn upgrade_block(&self, block: u64, data: &mut [u8]) -> dovetail_layout::Result<()>;

    /// Called once block `block` is in the candidate (written, or recorded as zeroes), before
    /// it is marked present: sets what the new layout keeps *about* the block (e.g. its
    /// annotations), replacing whatever the migration's own write made the layout record.
    fn migrated(&self, _block: u64) -> dovetail_layout::Result<()> {
        Ok(())
    }
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

/// The upgrade from a trusted layout to a candidate layout, by their names (same layout:
/// [`Identity`]). Upgrades into parallax-v2 need the versions themselves: [`for_versions`].
pub fn for_layouts(from: &str, to: &str) -> Option<Box<dyn Upgrade>> {
    (from == to && to != "parallax-v2").then(|| Box::new(Identity) as Box<dyn Upgrade>)
}

/// The upgrade from trusted version `from` (of layout `from_layout`; `None` when it is not a
/// parallax disk) to candidate `to`, or `None` when no upgrade between those layouts exists.
pub fn for_versions(
    from_layout: &str,
    from: Option<Arc<Parallax>>,
    to: &Arc<Parallax>,
) -> Option<Box<dyn Upgrade>> {
    match (from_layout, to.layout()) {
        ("parallax-v1" | "parallax-v2", "parallax-v2") => {
            let from = from.filter(|f| f.annotations().is_some());
            let bits = from
                .as_ref()
                .map(|f| carry_labels(f, to))
                .unwrap_or_default();
            Some(Box::new(IntoV2 {
                from,
                to: to.clone(),
                name: format!("{from_layout}-to-parallax-v2"),
                bits,
            }))
        }
        (a, b) => for_layouts(a, b),
    }
}

/// Whether an upgrade from a `from` trusted version to a `to` candidate is known (what
/// [`for_versions`] finds for them): without one a copy-out cannot run and the candidate can
/// never hold every block, so it could never be promoted.
pub fn known(from: &str, to: &str) -> bool {
    matches!(
        (from, to),
        ("parallax-v1" | "parallax-v2", "parallax-v2") | ("parallax-v1", "parallax-v1")
    )
}

/// The layouts among `layouts` a `from` trusted version can be upgraded to, in their order.
pub fn targets<'a>(from: &str, layouts: &[&'a str]) -> Vec<&'a str> {
    layouts
        .iter()
        .copied()
        .filter(|to| known(from, to))
        .collect()
}

/// Defines every taint label of `from` in `to` (on if it is on in `from`), so blocks carry
/// their labels by name (a label's bit may differ between the versions). Returns, for each bit
/// of `from`, its bit in `to` (`None` if `to` could not define it: the label is not carried,
/// and the failure is logged).
fn carry_labels(from: &Parallax, to: &Parallax) -> [Option<u8>; 16] {
    let mut bits = [None; 16];
    for l in from.labels() {
        let defined = if l.active {
            to.set_taint(&l.name, true)
        } else {
            to.define_label(&l.name)
        };
        match defined {
            Ok(t) => bits[usize::from(l.bit) & 15] = Some(t.bit),
            Err(e) => log::warn!(
                "taint label {:?} cannot be carried into the candidate: {}",
                l.name,
                dovetail_layout::error_chain(&e)
            ),
        }
    }
    bits
}

/// `taint` of a block of the trusted version, in the candidate's bits.
fn translate(taint: u16, bits: &[Option<u8>; 16]) -> u16 {
    (0..16)
        .filter(|&i| taint & (1 << i) != 0)
        .filter_map(|i| bits[i].map(|b| 1u16 << b))
        .fold(0, |a, b| a | b)
}

/// Into parallax-v2: the block's bytes as they are; its annotations start from what the
/// trusted version had for it (a parallax-v2 trusted: counts, times, pattern and labels carried)
/// or from zero (no counts, no labels). Migration is not guest I/O: the candidate's count of the
/// migration's write is replaced, and the trusted version is read with `read_quiet`.
struct IntoV2 {
    from: Option<Arc<Parallax>>,
    to: Arc<Parallax>,
    name: String,
    /// Taint bits of the trusted version → the candidate's.
    bits: [Option<u8>; 16],
}

impl std::fmt::Debug for IntoV2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntoV2").field("name", &self.name).finish()
    }
}

impl Upgrade for IntoV2 {
    fn name(&self) -> &str {
        &self.name
    }

    fn upgrade_block(&self, _block: u64, _data: &mut [u8]) -> dovetail_layout::Result<()> {
        Ok(())
    }

    fn migrated(&self, block: u64) -> dovetail_layout::Result<()> {
        // The migration read the trusted version quietly (`read_quiet`): its annotation is
        // what the guest's own I/O made it.
        let carried = self
            .from
            .as_ref()
            .and_then(|f| f.annotations())
            .map(|t| t.get(block))
            .unwrap_or_default();
        let carried = Annotation {
            taint: translate(carried.taint, &self.bits),
            ..carried
        };
        let table = self.to.annotations().ok_or_else(|| {
            dovetail_layout::Error::InvalidArgument("the candidate keeps no annotations".into())
        })?;
        table.set(block, carried);
        Ok(())
    }
}
