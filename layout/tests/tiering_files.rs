//! Tiering on a real two-tier store (files): bytes flipped in the fast tier's file, inside the
//! first copy of a metadata block, are caught by `store check`; opening the disk reads around
//! them (every byte of the guest's data reads back) and repairs the copy from the one on the
//! slow tier, after which `store check` passes.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use dovetail_layout::parallax::{Class, Parallax, ParallaxCheck, ParallaxOptions};
use dovetail_layout::{BlockLayout, Sector, Sectors};
use dovetail_store::store::TierSpec;
use dovetail_store::{check_with, Store, VersionSpace};

const EXTENT: u64 = 1 << 20;
const BLOCK: usize = 4096;

fn block_of(b: u64) -> Vec<u8> {
    format!("guest block {b:06}; ")
        .bytes()
        .cycle()
        .take(BLOCK)
        .collect()
}

fn check(dir: &Path) -> Vec<String> {
    check_with(dir, &ParallaxCheck::ALL)
        .expect("store check runs")
        .violations
}

fn open(dir: &Path) -> (Arc<Store>, Parallax) {
    let store = Store::open(dir).expect("open store");
    let key = store.disk("d").expect("disk").trusted;
    let space: Arc<dyn VersionSpace> = store.space(key).expect("space");
    let opts = ParallaxOptions {
        persist_every: None,
        ..ParallaxOptions::default()
    };
    let d = Parallax::open_with(space, opts).expect("open disk");
    (store, d)
}

#[test]
fn flipped_bytes_in_a_metadata_copy_are_found_read_around_and_repaired() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    let fast = tmp.path().join("fast.tier");
    let slow = tmp.path().join("slow.tier");
    let tiers = [
        TierSpec {
            name: "fast".into(),
            path: fast.clone(),
            size: 16 * EXTENT,
        },
        TierSpec {
            name: "slow".into(),
            path: slow.clone(),
            size: 32 * EXTENT,
        },
    ];
    let store = Store::create_tiered(&dir, &tiers, EXTENT).expect("create");
    let key = store
        .create_disk("d", 8 << 20, "parallax-v2")
        .expect("create disk");
    let space: Arc<dyn VersionSpace> = store.space(key).expect("space");
    let d = Parallax::create_layout(
        space,
        "parallax-v2",
        Sectors((8 << 20) / 512),
        ParallaxOptions {
            persist_every: None,
            ..ParallaxOptions::default()
        },
    )
    .expect("create parallax-v2");
    for b in 0..2048u64 {
        d.write(Sector(b * 8), &block_of(b)).expect("write");
    }
    d.flush().expect("flush");
    let groups = d.extent_groups();
    drop(d);
    drop(store);
    assert_eq!(check(&dir), Vec::<String>::new(), "consistent before");

    // Flip bytes in the fast tier's file, in every non-empty block of the metadata primaries
    // (tree nodes and annotation pages; their second copies are on the slow tier).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fast)
        .expect("open the fast tier's file");
    let mut flipped = 0;
    for g in groups.iter().filter(|g| g.class == Class::Meta) {
        let primary = g.members[0];
        assert!(
            primary.0 < 16,
            "metadata's first copy is on the fast tier: {g:?}"
        );
        assert!(
            g.members[1].0 >= 16,
            "its second copy on the slow tier: {g:?}"
        );
        for i in 0..EXTENT / BLOCK as u64 {
            let at = u64::from(primary.0) * EXTENT + i * BLOCK as u64;
            let mut buf = vec![0u8; BLOCK];
            file.read_exact_at(&mut buf, at).expect("read");
            if buf.iter().all(|&b| b == 0) {
                continue;
            }
            buf[64] ^= 0xa5;
            buf[2048] ^= 0x01;
            file.write_all_at(&buf, at).expect("flip");
            flipped += 1;
        }
    }
    file.sync_all().expect("sync");
    assert!(flipped >= 2, "{flipped} metadata blocks damaged");
    let problems = check(&dir);
    assert!(!problems.is_empty(), "store check finds the damaged copies");

    // Serving the disk reads around the damage and repairs it.
    let (store, d) = open(&dir);
    for b in 0..2048u64 {
        let mut buf = vec![0u8; BLOCK];
        d.read(Sector(b * 8), &mut buf).expect("read");
        assert!(buf == block_of(b), "block {b}");
    }
    let status = d.tier_status().expect("tiering");
    assert!(status.repairs >= 2, "{} repairs", status.repairs);
    d.flush().expect("flush");
    drop(d);
    drop(store);
    assert_eq!(
        check(&dir),
        Vec::<String>::new(),
        "consistent after the repair"
    );
}

/// Allocated bytes of a file on the host (`st_blocks` is in 512-byte units).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// After the mover demotes every block to the slow tier, the space the blocks leave on the
/// fast tier's file is released (holes punched once the commit that stops referencing them is
/// durable): what stays allocated there is about the metadata kept on that tier.
#[test]
fn the_space_demoted_blocks_leave_on_the_fast_tier_is_released() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    let fast = tmp.path().join("fast.tier");
    let slow = tmp.path().join("slow.tier");
    let tiers = [
        TierSpec {
            name: "fast".into(),
            path: fast.clone(),
            size: 32 * EXTENT,
        },
        TierSpec {
            name: "slow".into(),
            path: slow.clone(),
            size: 32 * EXTENT,
        },
    ];
    let store = Store::create_tiered(&dir, &tiers, EXTENT).expect("create");
    store
        .create_disk("d", 16 << 20, "parallax-v2")
        .expect("create disk");
    drop(store);
    let (store, d) = {
        let store = Store::open(&dir).expect("open store");
        let key = store.disk("d").expect("disk").trusted;
        let space: Arc<dyn VersionSpace> = store.space(key).expect("space");
        let opts = ParallaxOptions {
            persist_every: None,
            ..ParallaxOptions::default()
        };
        let d = Parallax::create_layout(space, "parallax-v2", Sectors((16 << 20) / 512), opts)
            .expect("create parallax-v2");
        (store, d)
    };
    let blocks = 4096u64; // 16 MiB
    for b in 0..blocks {
        d.write(Sector(b * 8), &block_of(b)).expect("write");
    }
    d.flush().expect("flush");
    let before = allocated(&fast);
    assert!(
        before >= blocks * BLOCK as u64,
        "{before} bytes on the fast tier"
    );
    let mut policy = d.tier_status().expect("v2").policy;
    policy.cold_after_secs = 1;
    d.set_tier_policy(policy).expect("policy");
    d.observe_temperature();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    d.observe_temperature();
    let mut demoted = 0;
    loop {
        let r = d.tier_pass(256, 8192).expect("pass");
        demoted += r.demoted;
        if r.wrapped {
            break;
        }
    }
    assert_eq!(demoted, blocks, "every block demoted");
    for b in 0..blocks {
        let pl = d.placement(b).expect("placement").expect("written");
        assert_eq!(pl.class, Class::Cold, "block {b}");
    }
    // The moves' commits freed the fast copies; their space is released off the commits'
    // path, by the version's puncher.
    d.settle_punches();
    let after = allocated(&fast);
    eprintln!("fast tier: {before} bytes allocated before the moves, {after} after");
    // Metadata kept on the fast tier: tree nodes, annotation and checksum pages (a few dozen
    // blocks, and the copies of nodes the moves rewrote until they are reused): well under
    // 1 MiB, against 16 MiB of data before.
    assert!(
        after < 1 << 20,
        "{after} bytes still allocated on the fast tier (was {before})"
    );
    let mut buf = vec![0u8; BLOCK];
    for b in 0..blocks {
        d.read(Sector(b * 8), &mut buf).expect("read");
        assert!(buf == block_of(b), "block {b}");
    }
    drop(d);
    drop(store);
    assert_eq!(check(&dir), Vec::<String>::new());
    let (_store, d) = open(&dir);
    for b in (0..blocks).step_by(97) {
        d.read(Sector(b * 8), &mut buf).expect("read after reopen");
        assert!(buf == block_of(b), "block {b}");
    }
    assert!(d.check_data().is_empty(), "{:?}", d.check_data());
}

/// Free extents of the store's tier `t`.
fn tier_free(store: &Store, t: usize) -> u32 {
    store.tiers()[t].free
}

/// After the mover demotes every block to the slow tier, the fast tier's extents that held the
/// data are given back to the store (a catalog commit once the commit that stopped naming
/// them is durable): free in the store's info and in `store check`, the version's grants
/// without them, and every block reads back, after a reopen too.
#[test]
fn extents_the_mover_empties_are_given_back_to_the_store() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    let fast = tmp.path().join("fast.tier");
    let slow = tmp.path().join("slow.tier");
    let tiers = [
        TierSpec {
            name: "fast".into(),
            path: fast.clone(),
            size: 32 * EXTENT,
        },
        TierSpec {
            name: "slow".into(),
            path: slow.clone(),
            size: 32 * EXTENT,
        },
    ];
    let store = Store::create_tiered(&dir, &tiers, EXTENT).expect("create");
    let key = store
        .create_disk("d", 16 << 20, "parallax-v2")
        .expect("create disk");
    let space: Arc<dyn VersionSpace> = store.space(key).expect("space");
    let opts = ParallaxOptions {
        persist_every: None,
        ..ParallaxOptions::default()
    };
    let d = Parallax::create_layout(space, "parallax-v2", Sectors((16 << 20) / 512), opts)
        .expect("create parallax-v2");
    let blocks = 4096u64; // 16 MiB
    for b in 0..blocks {
        d.write(Sector(b * 8), &block_of(b)).expect("write");
    }
    d.flush().expect("flush");
    let used_before = 32 - tier_free(&store, 0);
    assert!(used_before >= 16, "{used_before} fast extents in use");
    let mut policy = d.tier_status().expect("v2").policy;
    policy.cold_after_secs = 1;
    d.set_tier_policy(policy).expect("policy");
    d.observe_temperature();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    d.observe_temperature();
    let mut demoted = 0;
    loop {
        let r = d.tier_pass(256, 8192).expect("pass");
        demoted += r.demoted;
        if r.wrapped {
            break;
        }
    }
    assert_eq!(demoted, blocks, "every block demoted");
    // The freed runs are released by the puncher, after which a commit takes the emptied
    // groups out of the root record, and the commit after it gives their extents back.
    d.settle_punches();
    d.flush().expect("flush");
    d.flush().expect("flush");
    let used_after = 32 - tier_free(&store, 0);
    eprintln!("fast tier: {used_before} extents in use before the moves, {used_after} after");
    // What stays on the fast tier: the metadata group(s) (tree nodes, annotation and
    // checksum pages).
    assert!(
        used_after <= 2,
        "{used_after} fast extents still in use (were {used_before})"
    );
    let granted = store.version(key).expect("version").extents;
    assert_eq!(
        granted
            .iter()
            .filter(|e| store.extent_tier(**e) == 0)
            .count() as u32,
        used_after,
        "the version holds only the fast extents in use"
    );
    // Given back extents are refused to the version's writes from now on.
    let space = store.space(key).expect("space");
    let given_back = (0..32u32)
        .map(dovetail_store::ExtentId)
        .find(|e| !granted.contains(e))
        .expect("a free fast extent");
    assert!(space.write(given_back, 0, &[1u8; BLOCK]).is_err());
    let mut buf = vec![0u8; BLOCK];
    for b in 0..blocks {
        d.read(Sector(b * 8), &mut buf).expect("read");
        assert!(buf == block_of(b), "block {b}");
    }
    assert!(
        allocated(&fast) < 1 << 20,
        "{} bytes allocated on the fast tier",
        allocated(&fast)
    );
    drop(space);
    drop(d);
    drop(store);
    let report = check_with(&dir, &ParallaxCheck::ALL).expect("store check runs");
    assert_eq!(report.violations, Vec::<String>::new());
    let info = report.info.expect("store info");
    assert_eq!(
        32 - info.tiers[0].free,
        used_after,
        "store check's tier count"
    );
    let (store, d) = open(&dir);
    assert_eq!(32 - tier_free(&store, 0), used_after);
    for b in 0..blocks {
        d.read(Sector(b * 8), &mut buf).expect("read after reopen");
        assert!(buf == block_of(b), "block {b}");
    }
    assert!(d.check_data().is_empty(), "{:?}", d.check_data());
    // New writes after the reopen get extents again and read back.
    for b in 0..64 {
        d.write(Sector(b * 8), &block_of(b + 1)).expect("rewrite");
    }
    d.flush().expect("flush");
    for b in 0..64 {
        d.read(Sector(b * 8), &mut buf).expect("read");
        assert!(buf == block_of(b + 1), "block {b}");
    }
}
