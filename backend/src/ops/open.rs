//! Opening a disk's versions as the catalog says: the trusted version (formatted, an empty tree,
//! on first use) and any version by key, as its layout.

use std::sync::Arc;

use dovetail_layout::parallax::{Parallax, ParallaxOptions};
use dovetail_layout::{Sectors, SECTOR_SIZE};
use dovetail_store::{Store, VersionKey};

use crate::ops::OpsError;

/// Opens the trusted version of disk `name`, formatting it (an empty tree) on first use.
pub fn open_disk(store: &Arc<Store>, name: &str) -> Result<Parallax, OpsError> {
    let info = store.disk(name)?;
    open_version(store, name, info.trusted, &info.layout, info.size)
}

/// Opens version `key` of disk `name` (`size` bytes) as its `layout`, formatting it (an empty
/// tree) on first use.
pub fn open_version(
    store: &Arc<Store>,
    name: &str,
    key: VersionKey,
    layout: &str,
    size: u64,
) -> Result<Parallax, OpsError> {
    if !dovetail_layout::parallax::LAYOUTS.contains(&layout) {
        return Err(OpsError::UnknownLayout(layout.to_string()));
    }
    let space = store.space(key)?;
    let fresh = store.version(key)?.root_len == 0;
    let opened = if fresh {
        Parallax::create_layout(
            space,
            layout,
            Sectors(size / SECTOR_SIZE),
            ParallaxOptions::default(),
        )
    } else {
        // The catalog's size is the disk's: a version below it (a grow that a crash cut
        // short after the catalog's commit) is grown to it now.
        Parallax::open_grown(
            space,
            Sectors(size / SECTOR_SIZE),
            ParallaxOptions::default(),
        )
    };
    let p = opened.map_err(|source| OpsError::OpenDisk {
        name: format!("{name} ({key})"),
        source,
    })?;
    if p.layout() != layout {
        return Err(OpsError::OpenDisk {
            name: format!("{name} ({key})"),
            source: dovetail_layout::Error::Corrupt(format!(
                "the catalog says {layout}, the version's root record is of {}",
                p.layout()
            )),
        });
    }
    Ok(p)
}
