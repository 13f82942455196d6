//! Disks of a store seen from the host: open a disk's trusted version, import a raw image into
//! it, export it (or one of its snapshots) to a raw image, take, list and delete snapshots.
//!
//! Imports and exports are sparse-aware: all-zero 4 KiB blocks are neither written to the
//! store (they take no space in parallax-v1) nor to the exported image (which stays sparse).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use dovetail_layout::parallax::SnapshotInfo;
use dovetail_layout::{BlockLayout, Sector, SECTOR_SIZE};
use dovetail_store::Store;
use indicatif::{ProgressBar, ProgressStyle};

use crate::ops::open::open_disk;
use crate::ops::OpsError;

/// Bytes moved per step of an import or export.
const CHUNK: usize = 1 << 20;
/// Granularity of zero detection (the parallax-v1 block size).
const BLOCK: usize = 4096;

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// Maps a layout error on disk `name` to the CLI's error.
fn disk_err(name: &str) -> impl FnOnce(dovetail_layout::Error) -> OpsError + '_ {
    move |source| OpsError::OpenDisk {
        name: name.to_string(),
        source,
    }
}

fn io_err(op: &str, path: &Path) -> impl FnOnce(std::io::Error) -> OpsError {
    let op = format!("{op} {}", path.display());
    move |source| OpsError::File { op, source }
}

/// Calls `f(offset, run)` for each run of consecutive non-zero blocks of `buf`.
fn nonzero_runs(
    buf: &[u8],
    mut f: impl FnMut(usize, &[u8]) -> Result<(), OpsError>,
) -> Result<(), OpsError> {
    let mut start = None;
    for (i, block) in buf.chunks(BLOCK).enumerate() {
        let zero = block.iter().all(|&b| b == 0);
        match (zero, start) {
            (false, None) => start = Some(i * BLOCK),
            (true, Some(s)) => {
                f(s, &buf[s..i * BLOCK])?;
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        f(s, &buf[s..])?;
    }
    Ok(())
}

/// What an import or export moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// Bytes covered (the image or disk size).
    pub bytes: u64,
    /// Bytes that held data and were written; the rest were zero and skipped.
    pub data: u64,
}

/// Writes the raw image `from` into disk `name` (created at the image's size if missing).
pub fn import(store: &Arc<Store>, name: &str, from: &Path) -> Result<Copied, OpsError> {
    let file = File::open(from).map_err(io_err("open", from))?;
    import_file(store, name, &file, from, true)
}

/// [`import`] from an open `file` (named `from` in messages), with a progress bar or not (a
/// live import by the daemon has none).
pub fn import_file(
    store: &Arc<Store>,
    name: &str,
    file: &File,
    from: &Path,
    show_progress: bool,
) -> Result<Copied, OpsError> {
    let len = file.metadata().map_err(io_err("stat", from))?.len();
    if len == 0 || len % BLOCK as u64 != 0 {
        return Err(OpsError::Invalid(format!(
            "image {} is {len} bytes; a disk needs a positive multiple of 4096",
            from.display()
        )));
    }
    match store.disk(name) {
        Ok(info) if info.size < len => {
            return Err(OpsError::Invalid(format!(
                "image {} ({len} bytes) does not fit disk {name} ({} bytes)",
                from.display(),
                info.size
            )))
        }
        Ok(_) => {}
        Err(dovetail_store::StoreError::NoSuchDisk(_)) => {
            store.create_disk(name, len, "parallax-v1")?;
        }
        Err(e) => return Err(e.into()),
    }
    // Through the Tee when the disk has one, so its candidate gets (and holds) the data too.
    let served = crate::ops::teed::open_served(store, name)?;
    let disk = &served.layout;
    let bar = if show_progress {
        progress(len, "import")
    } else {
        ProgressBar::hidden()
    };
    let mut buf = vec![0u8; CHUNK];
    let mut data = 0u64;
    let mut at = 0u64;
    while at < len {
        let n = CHUNK.min((len - at) as usize);
        file.read_exact_at(&mut buf[..n], at)
            .map_err(io_err("read", from))?;
        nonzero_runs(&buf[..n], |off, run| {
            data += run.len() as u64;
            disk.write(Sector((at + off as u64) / SECTOR_SIZE), run)
                .map_err(disk_err(name))
        })?;
        at += n as u64;
        bar.set_position(at);
    }
    disk.flush().map_err(disk_err(name))?;
    if let Some(tee) = &served.tee {
        tee.close().map_err(|e| {
            OpsError::Invalid(format!(
                "disk {name}: closing the Tee: {}",
                dovetail_layout::error_chain(&e)
            ))
        })?;
    }
    bar.finish_and_clear();
    Ok(Copied { bytes: len, data })
}

/// Writes disk `name` (or its snapshot `snapshot`) to a new sparse raw image `to`.
pub fn export(
    store: &Arc<Store>,
    name: &str,
    snapshot: Option<&str>,
    to: &Path,
) -> Result<Copied, OpsError> {
    let disk = open_disk(store, name)?;
    let view;
    let source: &dyn BlockLayout = match snapshot {
        Some(s) => {
            view = disk.open_snapshot(s).map_err(|source| OpsError::OpenDisk {
                name: format!("{name}@{s}"),
                source,
            })?;
            &view
        }
        None => &disk,
    };
    export_layout(source, to, true)
}

/// Writes `source` to a new sparse raw image `to` (which must not exist), with a progress bar
/// if `show_progress`.
pub fn export_layout(
    source: &dyn BlockLayout,
    to: &Path,
    show_progress: bool,
) -> Result<Copied, OpsError> {
    use std::os::unix::fs::OpenOptionsExt;
    // Exclusive (an existing file or a symlink is refused), never following a symlink, and
    // readable by the daemon's user only: it holds a guest's data.
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
        .map_err(io_err("create", to))?;
    export_into(source, out, to, show_progress)
}

/// Writes `source` to `out`, a new empty file at `to`, as a sparse raw image.
pub fn export_into(
    source: &dyn BlockLayout,
    out: std::fs::File,
    to: &Path,
    show_progress: bool,
) -> Result<Copied, OpsError> {
    let len = source.capacity().0 * SECTOR_SIZE;
    out.set_len(len).map_err(io_err("size", to))?;
    let bar = if show_progress {
        progress(len, "export")
    } else {
        ProgressBar::hidden()
    };
    let mut buf = vec![0u8; CHUNK];
    let mut data = 0u64;
    let mut at = 0u64;
    while at < len {
        let n = CHUNK.min((len - at) as usize);
        source
            .read(Sector(at / SECTOR_SIZE), &mut buf[..n])
            .map_err(|source| OpsError::OpenDisk {
                name: format!("the disk being exported to {}", to.display()),
                source,
            })?;
        nonzero_runs(&buf[..n], |off, run| {
            data += run.len() as u64;
            out.write_all_at(run, at + off as u64)
                .map_err(io_err("write", to))
        })?;
        at += n as u64;
        bar.set_position(at);
    }
    out.sync_all().map_err(io_err("sync", to))?;
    bar.finish_and_clear();
    Ok(Copied { bytes: len, data })
}

/// Freezes disk `name` as snapshot `snap`.
pub fn snapshot(store: &Arc<Store>, name: &str, snap: &str) -> Result<SnapshotInfo, OpsError> {
    let disk = open_disk(store, name)?;
    disk.snapshot(snap).map_err(disk_err(name))
}

/// The snapshots of disk `name`.
pub fn snapshots(store: &Arc<Store>, name: &str) -> Result<Vec<SnapshotInfo>, OpsError> {
    Ok(open_disk(store, name)?.snapshots())
}

/// Deletes snapshot `snap` of disk `name`, freeing the blocks only it referenced.
pub fn delete_snapshot(store: &Arc<Store>, name: &str, snap: &str) -> Result<(), OpsError> {
    open_disk(store, name)?
        .delete_snapshot(snap)
        .map_err(disk_err(name))
}

/// Refuses, before anything is committed, a growth of the open version `p` of disk `name` to
/// `size` bytes that `Parallax::open_grown` would refuse: a size the tree cannot address, or,
/// while the version has snapshots, a growth that adds a tree level or (parallax-v2) moves the
/// annotation and checksum pages (a snapshot's tree keeps the old shape).
pub fn check_grow(p: &dovetail_layout::Parallax, name: &str, size: u64) -> Result<(), OpsError> {
    use dovetail_layout::{Parallax, Sectors};
    let bad = |e: dovetail_layout::Error| {
        OpsError::Invalid(format!("disk {name}: {}", dovetail_layout::error_chain(&e)))
    };
    let (_, now) = Parallax::tree_size(p.layout(), p.capacity()).map_err(bad)?;
    let (_, then) = Parallax::tree_size(p.layout(), Sectors(size / SECTOR_SIZE)).map_err(bad)?;
    let snaps = p.snapshots().len();
    if snaps > 0 && (then != now || p.layout() != "parallax-v1") {
        return Err(OpsError::Invalid(format!(
            "disk {name} has {snaps} snapshot(s), whose trees keep the disk's old shape: \
             growing it to {size} bytes {}; delete its snapshots first",
            if then != now {
                "adds a tree level"
            } else {
                "moves its annotation and checksum pages"
            }
        )));
    }
    Ok(())
}

/// `disk resize`: grows disk `name` (not served) to `size` bytes: the catalog's size is
/// committed first, then its trusted version is opened grown (one root-record commit; a crash
/// between the two is finished by the next open). Returns the old size. Refused with nothing
/// changed: shrinking, a size that is not a multiple of 4 KiB or is beyond what the store
/// holds, a growth either version's snapshots forbid. A teed disk's candidate grows too, with
/// its presence map and migration record.
pub fn resize(store: &Arc<Store>, name: &str, size: u64) -> Result<u64, OpsError> {
    let info = store.disk(name)?;
    let candidate = match info.candidate {
        Some(k) => Some((k, store.version(k)?.layout)),
        None => None,
    };
    if size >= info.size {
        let p = open_disk(store, name)?;
        check_grow(&p, name, size)?;
        if let Some((k, layout)) = &candidate {
            let c = crate::ops::open::open_version(store, name, *k, layout, info.size)?;
            check_grow(&c, name, size)?;
        }
    }
    let old = store.resize_disk(name, size)?;
    let p = open_disk(store, name)?;
    p.flush().map_err(|source| OpsError::OpenDisk {
        name: name.to_string(),
        source,
    })?;
    if let Some((k, layout)) = &candidate {
        // The candidate's version, presence map and migration record grow as the next attach
        // would grow them.
        let c = crate::ops::open::open_version(store, name, *k, layout, size)?;
        c.flush().map_err(|source| OpsError::OpenDisk {
            name: format!("{name} ({k})"),
            source,
        })?;
        crate::ops::teed::grow_candidate_files(
            name,
            *k,
            &store.map_path(*k),
            size.div_ceil(dovetail_migrate::presence::MAP_BLOCK),
        )?;
    }
    Ok(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_nonzero_blocks() {
        let mut buf = vec![0u8; 6 * BLOCK];
        buf[BLOCK] = 1;
        buf[2 * BLOCK + 5] = 2;
        buf[5 * BLOCK + 4095] = 3;
        let mut runs = Vec::new();
        nonzero_runs(&buf, |off, run| {
            runs.push((off, run.len()));
            Ok(())
        })
        .expect("runs");
        assert_eq!(runs, vec![(BLOCK, 2 * BLOCK), (5 * BLOCK, BLOCK)]);
    }

    #[test]
    fn import_export_and_snapshots_round_trip() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("st");
        let store = Store::create(&dir, 128 << 20, 64 << 20).expect("store");
        // A 4 MiB image, mostly holes, with data in a few places.
        let img = t.path().join("in.img");
        let f = File::create(&img).expect("image");
        f.set_len(4 << 20).expect("size");
        f.write_all_at(&[7u8; 8192], 0).expect("w");
        f.write_all_at(&[9u8; 4096], 3 << 20).expect("w");
        drop(f);

        let c = import(&store, "vm", &img).expect("import");
        assert_eq!(
            c,
            Copied {
                bytes: 4 << 20,
                data: 12288
            }
        );
        let s = snapshot(&store, "vm", "before").expect("snapshot");
        assert_eq!(s.name, "before");
        {
            let disk = open_disk(&store, "vm").expect("open");
            disk.write(Sector(0), &[1u8; 4096]).expect("write");
            disk.flush().expect("flush");
        }
        assert_eq!(
            snapshots(&store, "vm")
                .expect("list")
                .iter()
                .map(|s| s.name.clone())
                .collect::<Vec<_>>(),
            vec!["before".to_string()]
        );

        let live = t.path().join("live.img");
        export(&store, "vm", None, &live).expect("export live");
        let then = t.path().join("then.img");
        export(&store, "vm", Some("before"), &then).expect("export snapshot");
        let original = std::fs::read(&img).expect("read");
        assert_eq!(std::fs::read(&then).expect("read"), original);
        let mut expected = original.clone();
        expected[..4096].fill(1);
        assert_eq!(std::fs::read(&live).expect("read"), expected);
        // Exports never overwrite a file.
        assert!(export(&store, "vm", None, &live).is_err());

        delete_snapshot(&store, "vm", "before").expect("delete");
        assert!(snapshots(&store, "vm").expect("list").is_empty());
        assert!(export(&store, "vm", Some("before"), &t.path().join("x.img")).is_err());
    }
}
