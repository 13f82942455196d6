//! The store's files: the metadata file's header and slots, the tier files opened and
//! checked, a new store's files written.

use super::*;

/// Writes a new store's files: each tier's data file at its length, the header, slot A
/// holding an empty catalog at generation 1 and an empty slot B; then syncs them all.
pub(super) fn initialize(meta: &dyn StoreFile, data: &[&dyn StoreFile], h: &Header) -> Result<()> {
    for (t, file) in data.iter().enumerate() {
        file.set_size(h.tier_file_len(t))
            .and_then(|()| match h.has_tier_headers() {
                true => file.write_at(h.tier_len(t), &TierHeader::expected(h, t).encode()),
                false => Ok(()),
            })
            .and_then(|()| file.sync())
            .map_err(io_err(format!(
                "sizing tier {}'s data file",
                h.tiers[t].name
            )))?;
    }
    let payload = Meta::empty(h.extent_count).encode_for(h.version)?;
    meta.set_size(h.meta_len())
        .and_then(|()| meta.write_at(0, &h.encode()))
        .and_then(|()| meta.write_at(h.slot_offset(0), &encode_slot(h.version, 1, &payload)))
        .and_then(|()| meta.write_at(h.slot_offset(1), &[0u8; SLOT_HEADER]))
        .and_then(|()| meta.sync())
        .map_err(io_err("writing the metadata file"))
}

/// Reads and checks the header of a metadata file.
pub(crate) fn read_header(meta: &dyn StoreFile, location: &Path) -> Result<Header> {
    let size = meta
        .size()
        .map_err(io_err("reading the metadata file's size"))?;
    if size < HEADER_SIZE {
        return Err(StoreError::NotAStore {
            path: location.to_path_buf(),
            reason: format!("{size} bytes, shorter than the 4096-byte header"),
        });
    }
    let mut b = vec![0u8; HEADER_SIZE as usize];
    meta.read_at(0, &mut b)
        .map_err(io_err("reading the metadata header"))?;
    Header::decode(&b, location)
}

/// Reads slot `i` (0 = A, 1 = B) by the rules of the header's format version. Under a
/// version-2 header, a slot whose checksum is a version-1 one is valid too (a slot written
/// before the upgrade, decoded as version 1); under a version-1 header a version-2 slot is
/// not (one written by an upgrade interrupted before it rewrote the header).
pub(crate) fn read_slot(meta: &dyn StoreFile, h: &Header, i: usize) -> Result<Slot> {
    let at = h.slot_offset(i);
    let mut head = [0u8; SLOT_HEADER];
    meta.read_at(at, &mut head)
        .map_err(io_err("reading a metadata slot"))?;
    if head.iter().all(|&b| b == 0) {
        return Ok(Slot::Empty);
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&head[0..8]);
    let generation = u64::from_le_bytes(g);
    let mut l = [0u8; 4];
    l.copy_from_slice(&head[8..12]);
    let len = u32::from_le_bytes(l) as usize;
    l.copy_from_slice(&head[12..16]);
    let stored = u32::from_le_bytes(l);
    if len > h.max_payload() {
        return Ok(Slot::Invalid(format!(
            "payload length {len} exceeds the slot's {} bytes",
            h.max_payload()
        )));
    }
    let mut payload = vec![0u8; len];
    meta.read_at(at + SLOT_HEADER as u64, &mut payload)
        .map_err(io_err("reading a metadata slot"))?;
    // The format an upgrade to the header's version started from, and the one an upgrade from
    // it goes to: a slot of the first is valid (written before the upgrade), one of the second
    // is not (written by an upgrade interrupted before it rewrote the header).
    let (before, after) = match h.version {
        1 => (None, Some(UPGRADE_VERSION)),
        2 => (Some(1), None),
        3 => (None, Some(TIER_HEADER_VERSION)),
        4 => (Some(3), Some(ATTACH_VERSION)),
        5 => (Some(4), Some(crate::format::SHARED_VERSION)),
        6 => (Some(5), Some(crate::format::MEMBERS_VERSION)),
        _ => (Some(6), None),
    };
    let version = if slot_crc(h.version, &head[..12], &payload) == stored {
        h.version
    } else if before.is_some_and(|b| slot_crc(b, &head[..12], &payload) == stored) {
        before.unwrap_or(h.version)
    } else if let Some(a) = after.filter(|&a| slot_crc(a, &head[..12], &payload) == stored) {
        return Ok(Slot::Invalid(format!(
            "a format-version-{a} slot under a version-{} header: an upgrade was interrupted",
            h.version
        )));
    } else {
        return Ok(Slot::Invalid("checksum mismatch".into()));
    };
    if generation == 0 {
        return Ok(Slot::Invalid("generation 0".into()));
    }
    Ok(Slot::Valid {
        generation,
        payload,
        version,
    })
}

/// The slot to use: the valid one with the highest generation.
pub(crate) fn newest(slots: &[Slot; 2]) -> Result<usize> {
    match (&slots[0], &slots[1]) {
        (Slot::Valid { generation: a, .. }, Slot::Valid { generation: b, .. }) if a == b => Err(
            StoreError::Corrupt(format!("both metadata slots hold generation {a}")),
        ),
        (Slot::Valid { generation: a, .. }, Slot::Valid { generation: b, .. }) => {
            Ok(if a > b { 0 } else { 1 })
        }
        (Slot::Valid { .. }, _) => Ok(0),
        (_, Slot::Valid { .. }) => Ok(1),
        _ => Err(StoreError::Corrupt("neither metadata slot is valid".into())),
    }
}

pub(crate) fn slot_name(i: usize) -> char {
    if i == 0 {
        'A'
    } else {
        'B'
    }
}

/// Why tier `t`'s data file does not carry the [`TierHeader`] its entry in `h` expects, if it
/// does not: the rest of a sentence that starts with the file's path. Format version 4 only.
pub(crate) fn tier_header_problem(
    file: &dyn StoreFile,
    h: &Header,
    t: usize,
) -> Result<Option<String>> {
    let at = h.tier_len(t);
    let mut b = vec![0u8; TIER_HEADER_SIZE as usize];
    file.read_at(at, &mut b)
        .map_err(io_err(format!("reading tier {}'s header", h.tiers[t].name)))?;
    Ok(match TierHeader::decode(&b) {
        Err(why) => Some(format!("{why} (at byte {at})")),
        Ok(found) => TierHeader::expected(h, t).mismatch(&found),
    })
}

/// The tiers of `header` as [`TierStatus`], free counts from the grant table `owners`.
pub(crate) fn tier_status(header: &Header, dir: Option<&Path>, owners: &[u64]) -> Vec<TierStatus> {
    let mut first = 0u32;
    header
        .tiers
        .iter()
        .map(|t| {
            let s = TierStatus {
                name: t.name.clone(),
                path: resolve(dir, &t.path),
                first_extent: first,
                extents: t.extents,
                free: free_in(owners, first..first + t.extents),
            };
            first += t.extents;
            s
        })
        .collect()
}

/// Free entries of the grant table `owners` in `range`.
pub(super) fn free_in(owners: &[u64], range: Range<u32>) -> u32 {
    owners
        .get(range.start as usize..range.end as usize)
        .map_or(0, |r| r.iter().filter(|&&o| o == 0).count() as u32)
}

/// Whether two paths name the same file, as far as their text says (`a/./b` and `a//b/` are
/// `a/b`; no link is followed).
pub(super) fn same_path(a: &Path, b: &Path) -> bool {
    a.components().eq(b.components())
}

/// Why tier `t`'s data file (of header `h`) cannot hold the tier's extents, if it cannot: the
/// rest of a sentence that starts with the file's path.
pub(crate) fn tier_len_problem(
    file: &dyn StoreFile,
    h: &Header,
    t: usize,
) -> Result<Option<String>> {
    let len = file.size().map_err(io_err(format!(
        "reading the size of tier {}'s data file",
        h.tiers[t].name
    )))?;
    let want = h.tier_file_len(t);
    Ok((len < want).then(|| {
        format!(
            "is {len} bytes, shorter than the tier's {} extents of {} {}({want} bytes)",
            h.tiers[t].extents,
            human_size(h.extent_size),
            if h.has_tier_headers() {
                "and its tier header "
            } else {
                ""
            }
        )
    }))
}

/// Whether `path` names something other than a regular file (a device, a directory, a FIFO;
/// a symlink is followed): what a tier file never is. The rest of a sentence after the path.
pub(crate) fn not_a_regular_file(path: &Path) -> Option<String> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Some(format!(
            "is not a regular file ({}): a tier's data file is one",
            kind_of(&m)
        )),
        _ => None,
    }
}

fn kind_of(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// A format-3 store names its tier files by path and they carry nothing that proves they are
/// its own: one inside the store's directory (a plain file name, like `data.0`, not a symlink)
/// is the store's
/// (the directory came with `store.meta`), but one elsewhere could be any host file the
/// metadata was edited to name. Such a store is opened (to be upgraded, which writes into the
/// files) only when the operator says so ([`Store::open_adopting_tiers`]).
pub(crate) fn unproven_tier(h: &Header, dir: &Path) -> Result<()> {
    if h.version != 3 {
        return Ok(());
    }
    // A plain file name, and not a symlink (which could lead anywhere).
    let inside = |p: &Path| {
        let mut c = p.components();
        matches!(
            (c.next(), c.next()),
            (Some(std::path::Component::Normal(_)), None)
        ) && !std::fs::symlink_metadata(dir.join(p)).is_ok_and(|m| m.file_type().is_symlink())
    };
    match h.tiers.iter().find(|t| !inside(&t.path)) {
        None => Ok(()),
        Some(t) => Err(StoreError::TierFile {
            tier: t.name.clone(),
            path: resolve(Some(dir), &t.path),
            problem: format!(
                "is outside the store's directory, and this format-3 store cannot prove the file is \
                 its own (format 4 writes a header into each tier file). If the tier table names \
                 this store's files (`dovetail store check` lists them), run `dovetail store upgrade {}` \
                 once to adopt them",
                dir.display()
            ),
        }),
    }
}

/// Opens a tier's data file (read-write unless `read_only`); `None` if it does not exist. A
/// symlink or anything but a regular file there is refused.
pub(crate) fn open_tier_file(path: &Path, read_only: bool) -> Result<Option<File>> {
    match crate::safefs::open_file(path, !read_only) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io {
            op: format!("opening {}", path.display()),
            source: e,
        }),
    }
}

/// Opens a tier's data file as the header records it (`recorded`; `path` is it resolved
/// against the store's directory `dir`): a relative path through the directory's descriptor,
/// following no symlink on the way ([`crate::safefs::Dir::open_below`]), an absolute one (a
/// file on another device) by path without following a symlink at its last component
/// ([`open_tier_file`]). `None` if it does not exist.
pub(crate) fn open_tier_in(
    dir: &crate::safefs::Dir,
    recorded: &Path,
    path: &Path,
    read_only: bool,
) -> Result<Option<File>> {
    if recorded.is_absolute() {
        return open_tier_file(path, read_only);
    }
    match dir.open_below(recorded, !read_only) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io {
            op: format!("opening {}", path.display()),
            source: e,
        }),
    }
}

/// Opens `dir`'s metadata file read-only without any lock (beside a writer), through the
/// directory's descriptor, never following a symlink, a regular file only.
pub(crate) fn open_meta_unlocked(dir: &Path) -> Result<(File, PathBuf)> {
    let meta_path = dir.join(META_FILE);
    let meta = crate::safefs::Dir::open(dir)
        .and_then(|d| d.open_file(META_FILE, false))
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::NoStore(dir.to_path_buf()),
            _ => StoreError::Io {
                op: format!("opening {}", meta_path.display()),
                source: e,
            },
        })?;
    Ok((meta, meta_path))
}

/// Opens a store directory's metadata file, locked.
pub(crate) fn open_files(dir: &Path, read_only: bool) -> Result<(File, PathBuf)> {
    let meta_path = dir.join(META_FILE);
    // Through the directory's descriptor, never following a symlink, a regular file only.
    let meta = crate::safefs::Dir::open(dir)
        .and_then(|d| d.open_file(META_FILE, !read_only))
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::NoStore(dir.to_path_buf()),
            _ => StoreError::Io {
                op: format!("opening {}", meta_path.display()),
                source: e,
            },
        })?;
    let mode = if read_only {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    if !lock(&meta, mode).map_err(io_err(format!("locking {}", meta_path.display())))? {
        return Err(StoreError::InUse(dir.to_path_buf()));
    }
    Ok((meta, meta_path))
}
