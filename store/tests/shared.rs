//! Single-instance blocks (the shared pool, format version 6): identical blocks of several
//! versions kept once, holds committed atomically with the root records that reference them,
//! no version able to write a shared block, damage to one reported as damage to the shared
//! copy, `check` proving no block freed while referenced and none leaked, the upgrade from
//! format version 5, and power cuts at every sync of a workload of shares, releases and root
//! commits.
//!
//! The versions here use a toy layout, `toy-si`, whose root record is the list of the shared
//! blocks it references, each with the byte its 4096 bytes are filled with.

use std::collections::BTreeSet;
use std::sync::Arc;

use dovetail_store::format::{Header, FORMAT_VERSION, SHARED_VERSION};
use dovetail_store::rng::SplitMix64;
use dovetail_store::sim::{Power, SimFile, Torn};
use dovetail_store::{
    check_on, ExtentId, LayoutCheck, SharedRef, Store, StoreError, VersionInfo, VersionKey,
    VersionSpace,
};

const EXT: u64 = 16 << 10; // 4 blocks per extent
const EXTENTS: u64 = 12;
const TOY: &str = "toy-si";

/// Per version: the shared blocks it references, each with its fill byte.
type Fills = Vec<Vec<(SharedRef, u8)>>;

fn block(fill: u8) -> Vec<u8> {
    let mut b = vec![fill; 4096];
    b[0] = fill.wrapping_mul(7);
    b
}

/// The toy root record: (extent u32, block u32, fill u8) per referenced shared block.
fn root_of(refs: &[(SharedRef, u8)]) -> Vec<u8> {
    let mut r = Vec::new();
    for (s, f) in refs {
        r.extend_from_slice(&s.extent.0.to_le_bytes());
        r.extend_from_slice(&s.block.to_le_bytes());
        r.push(*f);
    }
    r
}

fn parse_root(r: &[u8]) -> Vec<(SharedRef, u8)> {
    r.chunks_exact(9)
        .map(|c| {
            (
                SharedRef {
                    extent: ExtentId(u32::from_le_bytes(c[0..4].try_into().expect("4 bytes"))),
                    block: u32::from_le_bytes(c[4..8].try_into().expect("4 bytes")),
                },
                c[8],
            )
        })
        .collect()
}

struct ToyCheck;

impl LayoutCheck for ToyCheck {
    fn layout(&self) -> &str {
        TOY
    }
    fn check(&self, _: &VersionInfo, space: Arc<dyn VersionSpace>) -> Vec<String> {
        let mut v = Vec::new();
        let mut buf = vec![0u8; 4096];
        for (r, fill) in parse_root(&space.root()) {
            match space.read_shared(r, &mut buf) {
                Ok(()) if buf == block(fill) => {}
                Ok(()) => v.push(format!("{r} does not hold fill {fill}")),
                Err(e) => v.push(format!("{r}: {e}")),
            }
        }
        v
    }
    fn shared_refs(
        &self,
        _: &VersionInfo,
        space: Arc<dyn VersionSpace>,
    ) -> Result<Option<Vec<SharedRef>>, String> {
        Ok(Some(
            parse_root(&space.root())
                .into_iter()
                .map(|(r, _)| r)
                .collect(),
        ))
    }
}

fn machine() -> (Arc<Power>, SimFile, SimFile) {
    let power = Power::new();
    (
        power.clone(),
        SimFile::new(power.clone()),
        SimFile::new(power),
    )
}

fn create(meta: &SimFile, data: &SimFile, single: bool) -> Arc<Store> {
    let s = Store::create_on(
        Box::new(meta.clone()),
        Box::new(data.clone()),
        EXTENTS * EXT,
        EXT,
    )
    .expect("create");
    if single {
        s.enable_single_instance().expect("enable single-instance")
    } else {
        s
    }
}

fn check(meta: &SimFile, data: &SimFile) -> dovetail_store::Report {
    check_on(Box::new(meta.clone()), Box::new(data.clone()), &[&ToyCheck]).expect("check runs")
}

/// A disk with a trusted and a candidate version of the toy layout.
fn teed(s: &Arc<Store>) -> (Arc<dyn VersionSpace>, Arc<dyn VersionSpace>) {
    let t = s.create_disk("vm", 1 << 20, TOY).expect("create disk");
    let c = s.add_version("vm", TOY).expect("add version");
    (s.space(t).expect("space"), s.space(c).expect("space"))
}

#[test]
fn off_by_default_and_format_5_kept() {
    let (_p, meta, data) = machine();
    let s = create(&meta, &data, false);
    assert_eq!(s.info().format_version, FORMAT_VERSION);
    assert!(!s.single_instance());
    let (t, _) = teed(&s);
    assert!(!t.single_instance());
    assert_eq!(t.share(&block(1)).expect("share"), None);
    assert!(check(&meta, &data).is_ok());
}

#[test]
fn identical_blocks_of_two_versions_are_kept_once() {
    let (_p, meta, data) = machine();
    let s = create(&meta, &data, true);
    assert_eq!(s.info().format_version, SHARED_VERSION);
    let (t, c) = teed(&s);
    assert!(t.single_instance());
    let a = t.share(&block(1)).expect("share").expect("shared");
    let b = t.share(&block(2)).expect("share").expect("shared");
    assert_ne!(a, b);
    // The same bytes from the other version: the same block.
    assert_eq!(c.share(&block(1)).expect("share"), Some(a));
    // A version references a pool block once: the same bytes again are its own to write.
    assert_eq!(t.share(&block(1)).expect("share"), None);
    let st = s.pool_status();
    assert_eq!((st.used, st.refs), (2, 3));
    t.commit_root(&root_of(&[(a, 1), (b, 2)]))
        .expect("succeeds");
    c.commit_root(&root_of(&[(a, 1)])).expect("succeeds");
    let r = check(&meta, &data);
    assert!(r.is_ok(), "{r}");
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("2 blocks in use, 3 holds (1 blocks saved)")),
        "{r}"
    );
    let mut buf = vec![0u8; 4096];
    c.read_shared(a, &mut buf).expect("read shared");
    assert_eq!(buf, block(1));

    // Reopened: the content index is rebuilt from the recorded checksums.
    drop((t, c, s));
    let s = Store::open_on(Box::new(meta.clone()), Box::new(data.clone())).expect("succeeds");
    let keys: Vec<VersionKey> = s.versions().iter().map(|v| v.key).collect();
    let c = s.space(keys[1]).expect("space");
    assert_eq!(c.held_shared(), vec![a]);
    assert_eq!(c.share(&block(2)).expect("share"), Some(b));
}

#[test]
fn no_version_can_write_a_shared_block() {
    let (_p, meta, data) = machine();
    let s = create(&meta, &data, true);
    let (t, c) = teed(&s);
    let a = t.share(&block(9)).expect("share").expect("expect");
    for sp in [&t, &c] {
        let e = sp
            .write(a.extent, u64::from(a.block) * 4096, &[0u8; 4096])
            .expect_err("refused");
        assert!(matches!(e, StoreError::GrantViolation { .. }), "{e}");
        assert!(sp.punch(a.extent, 0, 4096).is_err());
    }
    // Nor release a block it does not hold.
    let e = c.release_shared(a).expect_err("refused");
    assert!(e.to_string().contains("does not hold"), "{e}");
}

#[test]
fn a_damaged_shared_block_is_reported_as_shared_corruption() {
    let (_p, meta, data) = machine();
    let s = create(&meta, &data, true);
    let (t, c) = teed(&s);
    let a = t.share(&block(5)).expect("share").expect("expect");
    assert_eq!(c.share(&block(5)).expect("share"), Some(a));
    t.commit_root(&root_of(&[(a, 5)])).expect("succeeds");
    c.commit_root(&root_of(&[(a, 5)])).expect("succeeds");
    data.poke(
        u64::from(a.extent.0) * EXT + u64::from(a.block) * 4096 + 100,
        &[0xEE],
    );
    let mut buf = vec![0u8; 4096];
    let e = c.read_shared(a, &mut buf).expect_err("refused");
    assert!(
        matches!(e, StoreError::SharedCorrupt { block, .. } if block == a),
        "{e}"
    );
    assert!(e.to_string().contains("every version sharing it"), "{e}");
    let r = check(&meta, &data);
    assert!(
        r.violations
            .iter()
            .any(|v| v.starts_with("shared pool: ") && v.contains("is corrupt")),
        "{r}"
    );
}

#[test]
fn holds_change_only_with_the_root_commit() {
    let (_p, meta, data) = machine();
    let s = create(&meta, &data, true);
    let (t, c) = teed(&s);
    let a = t.share(&block(1)).expect("share").expect("expect");
    t.commit_root(&root_of(&[(a, 1)])).expect("succeeds");
    assert_eq!(c.share(&block(1)).expect("share"), Some(a));
    c.commit_root(&root_of(&[(a, 1)])).expect("succeeds");
    // t lets go; the block stays (c holds it).
    t.release_shared(a).expect("release shared");
    assert!(!t.holds_shared(a));
    t.commit_root(&root_of(&[])).expect("commit root");
    assert_eq!(s.pool_status().used, 1);
    // c lets go but has not committed: still in use, and a reopen brings the hold back.
    c.release_shared(a).expect("release shared");
    assert_eq!(s.pool_status().used, 1);
    let r = check(&meta, &data);
    assert!(r.is_ok(), "{r}");
    c.commit_root(&root_of(&[])).expect("commit root");
    assert_eq!(s.pool_status().used, 0);
    let r = check(&meta, &data);
    assert!(r.is_ok(), "{r}");
    // The free block is reused for new bytes.
    let b = t.share(&block(3)).expect("share").expect("expect");
    assert_eq!(b, a);

    // A cut: shares after it stay pending through a commit with it.
    let cut = c.shared_cut();
    let d = c.share(&block(4)).expect("share").expect("expect");
    c.commit_root_cut(&root_of(&[]), cut)
        .expect("commit root cut");
    let r = check(&meta, &data);
    assert!(r.is_ok(), "{r}");
    assert!(c.holds_shared(d));
    c.commit_root(&root_of(&[(d, 4)])).expect("succeeds");
    // t's share of block 3 is still pending: not a hold of any commit, so no leak.
    let r = check(&meta, &data);
    assert!(r.is_ok(), "{r}");
}

/// A layout captures its tree together with the store's cut, then writes and syncs it without
/// its lock: a guest write meanwhile can supersede a block the captured tree shares, and the
/// layout lets the pool block go before its commit has even started. The block stays allocated
/// until the commit that records the hold is done and a later one drops it: a share of other
/// bytes in between gets another block, and the committed root reads its own bytes, after a
/// power cut too. A block shared and let go before one cut is free once that commit ran.
#[test]
fn a_block_let_go_after_the_cut_stays_allocated_until_its_commits_ran() {
    let (_p, meta, data) = machine();
    let s = create(&meta, &data, true);
    let (t, c) = teed(&s);
    let a = t.share(&block(1)).expect("share").expect("shared");
    let cut = t.shared_cut();
    t.release_shared(a).expect("release after the cut");
    let b = c.share(&block(2)).expect("share").expect("shared");
    assert_ne!(b, a, "a block the coming commit holds was handed out again");
    t.commit_root_cut(&root_of(&[(a, 1)]), cut)
        .expect("commit with the cut");
    assert_eq!(s.pool_status().used, 2);
    let mut buf = vec![0u8; 4096];
    s.read_shared(a, &mut buf)
        .expect("read the committed block");
    assert_eq!(buf, block(1));
    c.commit_root(&root_of(&[(b, 2)])).expect("commit");
    // The power goes now: the committed roots read their own bytes and hold what they
    // reference.
    let after = Power::new();
    let (m2, d2) = (
        meta.after_crash(after.clone(), Torn::KeepNone),
        data.after_crash(after, Torn::KeepNone),
    );
    let r = check(&m2, &d2);
    assert!(r.is_ok(), "after a power cut: {r}");
    // The release is the next commit's.
    t.commit_root(&root_of(&[])).expect("commit the release");
    assert_eq!(s.pool_status().used, 1);
    // Shared and let go before one cut: free once that commit ran, and no hold recorded.
    let d = t.share(&block(5)).expect("share").expect("shared");
    t.release_shared(d).expect("release");
    assert_eq!(s.pool_status().used, 2, "in use until its commit");
    let cut = t.shared_cut();
    t.commit_root_cut(&root_of(&[]), cut).expect("commit");
    assert_eq!(s.pool_status().used, 1);
    let r = check(&meta, &data);
    assert!(r.is_ok(), "{r}");
}

/// The pool's blocks live in the tier's data file, so the layout's own sync of that file
/// before its root commit covers the blocks it shared until then: the commit syncs only the
/// metadata. Pool blocks written after that sync still get a sync of their own.
#[test]
fn a_root_commit_after_the_versions_sync_syncs_only_the_metadata() {
    let (power, meta, data) = machine();
    let s = create(&meta, &data, true);
    let (t, _c) = teed(&s);
    let own = t.grant_extent().expect("grant");
    let a = t.share(&block(1)).expect("share").expect("shared");
    t.write(own, 0, &block(9))
        .expect("write a block of its own");
    let cut = t.shared_cut();
    t.sync().expect("the version's sync");
    let before = power.syncs();
    t.commit_root_cut(&root_of(&[(a, 1)]), cut).expect("commit");
    assert_eq!(power.syncs() - before, 1, "the metadata's sync only");
    // A block shared after the version's sync is not covered by it.
    let b = t.share(&block(2)).expect("share").expect("shared");
    let before = power.syncs();
    t.commit_root(&root_of(&[(a, 1), (b, 2)])).expect("commit");
    assert_eq!(
        power.syncs() - before,
        2,
        "the pool's sync, then the metadata's"
    );
    // Both durable: a power cut now loses neither.
    let after = Power::new();
    let r = check(
        &meta.after_crash(after.clone(), Torn::KeepNone),
        &data.after_crash(after, Torn::KeepNone),
    );
    assert!(r.is_ok(), "{r}");
}

#[test]
fn dropping_a_version_drops_its_holds() {
    let (_p, meta, data) = machine();
    let s = create(&meta, &data, true);
    let (t, c) = teed(&s);
    let a = t.share(&block(1)).expect("share").expect("expect");
    let b = c.share(&block(2)).expect("share").expect("expect");
    assert_eq!(c.share(&block(1)).expect("share"), Some(a));
    t.commit_root(&root_of(&[(a, 1)])).expect("succeeds");
    c.commit_root(&root_of(&[(a, 1), (b, 2)]))
        .expect("succeeds");
    assert_eq!(s.pool_status().used, 2);
    s.drop_candidate("vm").expect("drop candidate");
    let st = s.pool_status();
    assert_eq!((st.used, st.refs), (1, 1));
    let r = check(&meta, &data);
    assert!(r.is_ok(), "{r}");
    // The freed block's place takes new bytes.
    let c2 = s
        .space(s.add_version("vm", TOY).expect("add version"))
        .expect("space");
    assert_eq!(c2.share(&block(7)).expect("share"), Some(b));
    drop((t, c, c2));
    s.delete_disk("vm").expect("delete disk");
    assert_eq!(s.pool_status().used, 0);
    let r = check(&meta, &data);
    assert!(r.is_ok(), "{r}");
}

#[test]
fn check_finds_unheld_references_and_leaks() {
    let (_p, meta, data) = machine();
    let s = create(&meta, &data, true);
    let (t, c) = teed(&s);
    let a = t.share(&block(1)).expect("share").expect("expect");
    let b = t.share(&block(2)).expect("share").expect("expect");
    // t holds a and b but its root names only a; c's root names a it does not hold.
    t.commit_root(&root_of(&[(a, 1)])).expect("succeeds");
    c.commit_root(&root_of(&[(a, 1)])).expect("succeeds");
    let r = check(&meta, &data);
    let text = r.violations.join("\n");
    assert!(
        text.contains(&format!(
            "it holds {b}, which none of its committed trees references"
        )),
        "{r}"
    );
    assert!(
        text.contains(&format!(
            "its committed tree references {a}, which it does not hold"
        )),
        "{r}"
    );
}

#[test]
fn a_format_5_store_is_upgraded_with_its_catalog() {
    let (_p, meta, data) = machine();
    let s = create(&meta, &data, false);
    let (t, _c) = teed(&s);
    t.commit_root(b"").expect("commit root");
    let before = (s.disks(), s.versions());
    drop(t);
    drop(_c);
    let s5meta = meta.durable_bytes();
    let s5data = data.durable_bytes();
    let s = s.enable_single_instance().expect("enable single instance");
    assert_eq!(s.info().format_version, SHARED_VERSION);
    assert_eq!((s.disks(), s.versions()), before);
    drop(s);
    let r = check(&meta, &data);
    assert!(r.is_ok(), "{r}");

    // The power cut at each sync of the upgrade: the store opens as 5 or 6, same catalog.
    for k in 1..=2u64 {
        for torn in [Torn::KeepNone, Torn::KeepAll, Torn::Random(k ^ 0x51)] {
            let power = Power::new();
            let m = SimFile::with_bytes(power.clone(), &s5meta);
            let d = SimFile::with_bytes(power.clone(), &s5data);
            let s = Store::open_on(Box::new(m.clone()), Box::new(d.clone())).expect("succeeds");
            power.crash_at_sync(power.syncs() + k);
            assert!(s.enable_single_instance().is_err(), "sync {k}");
            let after = Power::new();
            let m = m.after_crash(after.clone(), torn);
            let d = d.after_crash(after, torn);
            let h = Header::decode(&m.durable_bytes()[..4096], std::path::Path::new("m"))
                .expect("decode");
            let s = Store::open_on(Box::new(m.clone()), Box::new(d.clone()))
                .unwrap_or_else(|e| panic!("sync {k} {torn:?}: {e}"));
            assert!([FORMAT_VERSION, SHARED_VERSION].contains(&h.version));
            assert_eq!((s.disks(), s.versions()), before, "sync {k} {torn:?}");
            assert_eq!(s.single_instance(), h.version == SHARED_VERSION);
            let r = check(&m, &d);
            assert!(r.is_ok(), "sync {k} {torn:?}: {r}");
        }
    }
}

/// One step of the crash workload: a version shares a block (one of a few contents, so that
/// versions meet), releases one, or commits its root record naming exactly what it holds.
fn step(
    s: &Arc<Store>,
    spaces: &[Arc<dyn VersionSpace>],
    fills: &mut [Vec<(SharedRef, u8)>],
    rng: &mut SplitMix64,
) -> dovetail_store::Result<()> {
    let v = (rng.next_u64() % spaces.len() as u64) as usize;
    let sp = &spaces[v];
    match rng.next_u64() % 4 {
        0 | 1 => {
            let fill = (rng.next_u64() % 6) as u8 + 1;
            if let Some(r) = sp.share(&block(fill))? {
                fills[v].push((r, fill));
            }
        }
        2 if !fills[v].is_empty() => {
            let i = (rng.next_u64() % fills[v].len() as u64) as usize;
            let (r, _) = fills[v].remove(i);
            sp.release_shared(r)?;
        }
        _ => {
            let mut list = fills[v].clone();
            list.sort();
            sp.commit_root(&root_of(&list))?;
        }
    }
    let _ = s;
    Ok(())
}

fn workload(s: &Arc<Store>, seed: u64, power: &Power, ops: usize) -> Option<(usize, Fills)> {
    let cut = |e: StoreError| {
        assert!(power.is_cut(), "seed {seed}: {e}");
        Some((0, Vec::new()))
    };
    let t = match s.create_disk("a", 1 << 20, TOY) {
        Ok(k) => k,
        Err(e) => return cut(e),
    };
    let c = match s.add_version("a", TOY) {
        Ok(k) => k,
        Err(e) => return cut(e),
    };
    let u = match s.create_disk("b", 1 << 20, TOY) {
        Ok(k) => k,
        Err(e) => return cut(e),
    };
    let spaces: Vec<Arc<dyn VersionSpace>> = [t, c, u]
        .iter()
        .map(|&k| s.space(k).expect("space"))
        .collect();
    let mut fills = vec![Vec::new(); spaces.len()];
    let mut rng = SplitMix64::new(seed);
    for i in 0..ops {
        match step(s, &spaces, &mut fills, &mut rng) {
            Ok(()) => {}
            Err(_) if power.is_cut() => return Some((i, fills)),
            Err(e) => panic!("seed {seed}: operation {i} failed with the power on: {e}"),
        }
        // Now and then the candidate goes, and comes back empty.
        if i == ops / 2 {
            match s.drop_candidate("a") {
                Ok(_) => {}
                Err(_) if power.is_cut() => return Some((i, fills)),
                Err(e) => panic!("{e}"),
            }
            return workload_rest(s, seed, power, ops, i, spaces, fills, rng);
        }
    }
    None
}

#[allow(clippy::too_many_arguments)]
fn workload_rest(
    s: &Arc<Store>,
    seed: u64,
    power: &Power,
    ops: usize,
    from: usize,
    mut spaces: Vec<Arc<dyn VersionSpace>>,
    mut fills: Vec<Vec<(SharedRef, u8)>>,
    mut rng: SplitMix64,
) -> Option<(usize, Fills)> {
    let c = match s.add_version("a", TOY) {
        Ok(c) => c,
        Err(_) if power.is_cut() => return Some((from, fills)),
        Err(e) => panic!("{e}"),
    };
    spaces[1] = s.space(c).expect("space");
    fills[1].clear();
    for i in from + 1..ops {
        match step(s, &spaces, &mut fills, &mut rng) {
            Ok(()) => {}
            Err(_) if power.is_cut() => return Some((i, fills)),
            Err(e) => panic!("seed {seed}: operation {i} failed with the power on: {e}"),
        }
    }
    None
}

/// The power cut at every sync of a workload of shares, releases, root commits and a dropped
/// version, with unsynced sectors kept, lost or torn: the store opens, `check` proves every
/// committed reference held and every hold referenced, and every committed root's blocks read
/// back their bytes with a good checksum; the reopened store then shares and commits again.
#[test]
fn power_cut_at_every_sync_with_shares_in_flight() {
    const OPS: usize = 80;
    for seed in [1u64, 2, 3] {
        let (power, meta, data) = machine();
        let s = create(&meta, &data, true);
        let base = power.syncs();
        assert!(workload(&s, seed, &power, OPS).is_none());
        let points = power.syncs() - base;
        assert!(points > 20, "the workload should sync often ({points})");
        let r = check(&meta, &data);
        assert!(r.is_ok(), "seed {seed}, no crash: {r}");
        drop(s);
        for k in 1..=points {
            for torn in [Torn::KeepNone, Torn::KeepAll, Torn::Random(seed ^ (k << 8))] {
                let (power, meta, data) = machine();
                let s = create(&meta, &data, true);
                power.crash_at_sync(power.syncs() + k);
                workload(&s, seed, &power, OPS).expect("the power is cut during the workload");
                drop(s);
                let after = Power::new();
                let meta = meta.after_crash(after.clone(), torn);
                let data = data.after_crash(
                    after,
                    match torn {
                        Torn::Random(x) => Torn::Random(x.rotate_left(17)),
                        t => t,
                    },
                );
                let ctx = format!("seed {seed}, sync {k}, {torn:?}");
                let r = check(&meta, &data);
                assert!(r.is_ok(), "{ctx}: {r}");
                let s = Store::open_on(Box::new(meta.clone()), Box::new(data.clone()))
                    .unwrap_or_else(|e| panic!("{ctx}: reopen failed: {e}"));
                // Holds equal what the roots reference, and the store goes on.
                let mut all = BTreeSet::new();
                // The new blocks: one per disk (blocks are shared within a disk only).
                let mut more = BTreeSet::new();
                for v in s.versions() {
                    let sp = s.space(v.key).expect("space");
                    let refs: Vec<SharedRef> =
                        parse_root(&sp.root()).into_iter().map(|(r, _)| r).collect();
                    assert_eq!(sp.held_shared(), refs, "{ctx}: {}", v.key);
                    all.extend(refs);
                    let n = sp.share(&block(200)).expect("share");
                    if let Some(n) = n {
                        more.insert(n);
                        let mut list = parse_root(&sp.root());
                        list.push((n, 200));
                        list.sort();
                        sp.commit_root(&root_of(&list)).expect("commit root");
                    }
                }
                assert_eq!(
                    s.pool_status().used as usize,
                    all.len() + more.len(),
                    "{ctx}"
                );
                drop(s);
                let r = check(&meta, &data);
                assert!(r.is_ok(), "{ctx}, after more commits: {r}");
            }
        }
    }
}

/// Blocks are shared among the versions of one disk only: a write whose bytes another disk
/// holds gets a pool block of its own (no guest can learn another disk's data from which of
/// its writes complete without a data write).
#[test]
fn blocks_are_shared_within_one_disk_only() {
    let (_p, meta, data) = machine();
    let s = create(&meta, &data, true);
    let (t, c) = teed(&s);
    let other = s
        .space(s.create_disk("other", 1 << 20, TOY).expect("create disk"))
        .expect("succeeds");
    let a = t.share(&block(9)).expect("share").expect("shared");
    let b = other.share(&block(9)).expect("share").expect("shared");
    assert_ne!(a, b, "another disk's version got the same pool block");
    assert_eq!(
        c.share(&block(9)).expect("share"),
        Some(a),
        "the disk's own candidate shares it"
    );
    let p = s.pool_status();
    assert_eq!((p.used, p.refs), (2, 3));
}
