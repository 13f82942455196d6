//! Every layout a disk can be served with, opened in-process the way the daemon opens it: a raw
//! image, parallax-v1 and parallax-v2 versions of a store, a Tee of a parallax-v1 trusted
//! version and a parallax-v2 candidate under sync-cross-checks, and a parallax-v2 version of a
//! two-tier store (`fast`, `slow`). Shared by the suites that loop over layouts
//! (`layouts_io`, `malformed`); a test binary includes it with
//! `#[path = "common/layouts.rs"] mod layouts;`.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use dovetail_layout::raw::{RawLayout, RawOptions};
use dovetail_layout::{BlockLayout, CacheMode, Parallax, ParallaxOptions, Sectors};
use dovetail_migrate::presence::PresenceMap;
use dovetail_migrate::{Policy, Tee, TeeOptions};
use dovetail_store::{Store, TierSpec};

const SECTOR: u64 = 512;

/// Every layout kind, by the name the helpers below take.
pub const LAYOUTS: [&str; 5] = ["raw", "parallax-v1", "parallax-v2", "tee", "tiered"];

/// The cache modes to run: `DOVETAIL_TEST_CACHE` (scripts/test.sh) picks one; unset, both.
pub fn modes() -> Vec<CacheMode> {
    match std::env::var("DOVETAIL_TEST_CACHE") {
        Ok(v) => vec![v.parse().expect("DOVETAIL_TEST_CACHE")],
        Err(_) => vec![CacheMode::None, CacheMode::Writeback],
    }
}

/// What a test needs to serve a disk, close it and open it again.
pub struct Opened {
    pub layout: Arc<dyn BlockLayout>,
    /// The store, for a store layout.
    pub store: Option<Arc<Store>>,
}

/// Opens the store in `dir/store` with `cache`.
pub fn open_store(dir: &Path, cache: CacheMode) -> Arc<Store> {
    let at = dir.join("store");
    match cache {
        CacheMode::None => Store::open_direct(&at).expect("open the store with direct I/O"),
        CacheMode::Writeback => Store::open(&at).expect("open the store"),
    }
}

/// Opens (`fresh`: creates) disk `vd` of `size` bytes and kind `layout` (one of [`LAYOUTS`])
/// in `dir` with `cache`.
pub fn open(dir: &Path, layout: &str, size: u64, cache: CacheMode, fresh: bool) -> Opened {
    if layout == "raw" {
        let raw = RawLayout::open(
            &dir.join("disk.img"),
            RawOptions {
                create_size: fresh.then_some(size),
                read_only: false,
                cache: Some(cache),
            },
        )
        .expect("raw image");
        return Opened {
            layout: Arc::new(raw),
            store: None,
        };
    }
    // Room for the data, its metadata, and a candidate's copy.
    let room = (8 * size).max(256 << 20).next_multiple_of(4 << 20);
    if fresh && layout == "tiered" {
        let tier = |name: &str| TierSpec {
            name: name.into(),
            path: dir.join(format!("{name}.data")),
            size: room,
        };
        Store::create_tiered(&dir.join("store"), &[tier("fast"), tier("slow")], 4 << 20)
            .expect("two-tier store");
    } else if fresh {
        Store::create(&dir.join("store"), room, 4 << 20).expect("store");
    }
    let store = open_store(dir, cache);
    assert_eq!(store.direct_io(), cache == CacheMode::None);
    let trusted_layout = match layout {
        "tee" => "parallax-v1",
        "tiered" => "parallax-v2",
        l => l,
    };
    let version = |key, layout: &str| -> Arc<Parallax> {
        let space = store.space(key).expect("space");
        Arc::new(if fresh {
            Parallax::create_layout(space, layout, Sectors(size / SECTOR), Default::default())
                .expect("create the version")
        } else {
            Parallax::open_with(space, ParallaxOptions::default()).expect("open the version")
        })
    };
    let (tkey, ckey) = if fresh {
        let t = store
            .create_disk("vd", size, trusted_layout)
            .expect("create the disk");
        let c = (layout == "tee").then(|| {
            store
                .add_version("vd", "parallax-v2")
                .expect("add a candidate")
        });
        (t, c)
    } else {
        let info = store.disk("vd").expect("the disk");
        (info.trusted, info.candidate)
    };
    let trusted = version(tkey, trusted_layout);
    let layout: Arc<dyn BlockLayout> = match ckey {
        None => trusted,
        Some(c) => {
            let candidate = version(c, "parallax-v2");
            let path = store.map_path(c);
            let presence = if fresh {
                PresenceMap::create(&path, size / 4096, c.0).expect("presence map")
            } else {
                PresenceMap::open(&path, size / 4096, c.0).expect("presence map")
            };
            Arc::new(
                Tee::new(
                    trusted,
                    candidate,
                    Arc::new(presence),
                    TeeOptions::new("vd", Policy::SyncCrossChecks),
                )
                .expect("tee"),
            )
        }
    };
    Opened {
        layout,
        store: Some(store),
    }
}
