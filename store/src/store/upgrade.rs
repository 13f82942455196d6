//! The upgrades in place: format version 1 to 2 and 3 to 4 (see docs/format.md).

use super::*;

/// Upgrades a version-1 store in place to [`UPGRADE_VERSION`] (2), crash-safely. `newest` and
/// `generation` locate the catalog `meta` read from the newest slot; returns the slot holding
/// the new generation (`generation + 1`). Two steps, each followed by `fdatasync`:
///
/// 1. The catalog, encoded in format 2, goes to the *other* slot as `generation + 1`, with a
///    format-2 checksum. The header still says 1, and under it a format-2 slot is not valid:
///    every reader (this binary or a version-1 one) still sees the old slot and its catalog.
/// 2. The header's first sector is rewritten with version 2 (and its new checksum): one
///    sector, written whole or not at all. Under a version-2 header the new slot is valid and
///    the newer one; the old slot stays valid as a version-1 slot (same catalog, older
///    generation) until the next commit overwrites it.
///
/// A power cut before step 2 is durable leaves a version-1 store with its catalog (the next
/// read-write open upgrades again); after, a version-2 store with the same catalog.
///
/// The upgrade from version 3 to 4 ([`upgrade_tiers`]) writes each tier file's header first,
/// then takes the same two steps with `to` = 4.
pub(crate) fn upgrade(
    meta_file: &dyn StoreFile,
    header: &Header,
    meta: &Meta,
    newest: usize,
    generation: u64,
    to: u32,
) -> Result<(Header, usize)> {
    #[allow(non_snake_case)]
    let TO = to;
    let payload = meta.encode_for(TO)?;
    if payload.len() > header.max_payload() {
        return Err(StoreError::MetadataFull {
            needed: payload.len(),
            max: header.max_payload(),
        });
    }
    let target = 1 - newest;
    let next = generation + 1;
    meta_file
        .write_at(header.slot_offset(target), &encode_slot(TO, next, &payload))
        .and_then(|()| meta_file.sync())
        .map_err(io_err(format!(
            "upgrading the store: writing generation {next} in format version {TO} to slot {}",
            slot_name(target)
        )))?;
    let new = Header {
        version: TO,
        ..header.clone()
    };
    meta_file
        .write_at(0, &new.encode()[..HEADER_SECTOR])
        .and_then(|()| meta_file.sync())
        .map_err(io_err(format!(
            "upgrading the store: rewriting the header with format version {TO}"
        )))?;
    Ok((new, target))
}

/// Step 0 of the upgrade from format version 3 to 4: gives every tier file its [`TierHeader`],
/// right after the tier's extents, and syncs it. A version-3 file proves nothing, so only a
/// file that looks like what `create` made is adopted: exactly the tier's length (or that plus
/// this very header, or plus 4096 zeros, left by an upgrade interrupted during this step). The header still says 3
/// until [`upgrade`] rewrites it, and a version-3 reader ignores bytes past a tier's extents,
/// so a crash anywhere here leaves the version-3 store as it was.
pub(crate) fn upgrade_tiers(
    files: &[&dyn StoreFile],
    header: &Header,
    paths: &[PathBuf],
) -> Result<()> {
    for (t, file) in files.iter().enumerate() {
        let rec = &header.tiers[t];
        let path = paths.get(t).cloned().unwrap_or_default();
        let want = header.tier_len(t);
        let expected = TierHeader::expected(header, t);
        let len = file.size().map_err(io_err(format!(
            "reading the size of tier {}'s data file",
            rec.name
        )))?;
        let adopted = len == want + TIER_HEADER_SIZE && {
            let mut b = vec![0u8; TIER_HEADER_SIZE as usize];
            file.read_at(want, &mut b)
                .map_err(io_err(format!("reading tier {}'s header", rec.name)))?;
            // This very header, or zeros: the file was extended but the header not yet
            // written when the power went.
            b.iter().all(|&x| x == 0)
                || TierHeader::decode(&b).is_ok_and(|f| expected.mismatch(&f).is_none())
        };
        if len != want && !adopted {
            return Err(StoreError::TierFile {
                tier: rec.name.clone(),
                path,
                problem: format!(
                    "is {len} bytes, not the {want} bytes `store create` made for the tier: the upgrade \
                     to format version {TIER_HEADER_VERSION} does not adopt it as the tier's data file \
                     (format version 3 records no proof that a file belongs to its store)"
                ),
            });
        }
        file.set_size(want + TIER_HEADER_SIZE)
            .and_then(|()| file.write_at(want, &expected.encode()))
            .and_then(|()| file.sync())
            .map_err(io_err(format!(
                "upgrading the store: writing tier {}'s header",
                rec.name
            )))?;
    }
    Ok(())
}
