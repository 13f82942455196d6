//! Single-instance data blocks in parallax-v1 (the store's shared pool, docs/format.md
//! *Shared pool*): two versions of one disk (a Tee's trusted and candidate) writing the same
//! blocks keep one copy; a version's overwrite or partial write never changes the other's
//! block (copy-on-write out of the pool); a snapshot keeps its shared blocks held until it is
//! deleted; a damaged shared block is reported as such; `store check` proves every referenced
//! block held and every held block referenced, also in every power-cut state of a workload
//! with shares and releases in flight.

use std::sync::Arc;

use dovetail_layout::parallax::ParallaxCheck;
use dovetail_layout::{BlockLayout, Parallax, ParallaxOptions, Sector, Sectors};
use dovetail_store::logwrites::{MemFile, Plan, Rebuilder, WriteLog};
use dovetail_store::{check_on, Store, StoreFile, VersionKey};

const EXTENT: u64 = 64 << 10;
const EXTENTS: u64 = 24;
const SIZE: u64 = 256 << 10;
const BLOCK: usize = 4096;
const BLOCKS: u64 = SIZE / BLOCK as u64;

/// A block's contents in the order it was given them, each with the log position of the FLUSH
/// that made it stable.
type History = Vec<(Vec<u8>, Option<usize>)>;

fn data(b: u64, n: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    for (i, chunk) in v.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&b.to_le_bytes());
        chunk[8..].copy_from_slice(&(n * 1000 + i as u64).to_le_bytes());
    }
    v
}

fn at(b: u64) -> Sector {
    Sector(b * BLOCK as u64 / 512)
}

fn new_store(meta: &MemFile, data: &MemFile) -> Arc<Store> {
    Store::create_on(
        Box::new(meta.clone()),
        Box::new(data.clone()),
        EXTENTS * EXTENT,
        EXTENT,
    )
    .expect("create")
    .enable_single_instance()
    .expect("single-instance on")
}

fn layout(store: &Arc<Store>, key: VersionKey) -> Parallax {
    let space = store.space(key).expect("space");
    if store.version(key).expect("version").root_len == 0 {
        Parallax::create_layout(
            space,
            "parallax-v1",
            Sectors(SIZE / 512),
            ParallaxOptions::default(),
        )
        .expect("format")
    } else {
        Parallax::open_with(space, ParallaxOptions::default()).expect("open")
    }
}

fn read(d: &Parallax, b: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK];
    d.read(at(b), &mut buf).expect("read");
    buf
}

fn check(meta: &MemFile, data: &MemFile) -> dovetail_store::Report {
    check_on(
        Box::new(meta.clone()),
        Box::new(data.clone()),
        &ParallaxCheck::ALL,
    )
    .expect("check runs")
}

fn used_extents(store: &Store, key: VersionKey) -> usize {
    store.version(key).expect("version").extents.len()
}

#[test]
fn two_versions_writing_the_same_blocks_keep_one_copy() {
    let (meta, file) = (MemFile::new(), MemFile::new());
    let store = new_store(&meta, &file);
    let t = store
        .create_disk("vm", SIZE, "parallax-v1")
        .expect("create disk");
    let c = store.add_version("vm", "parallax-v1").expect("add version");
    let (dt, dc) = (layout(&store, t), layout(&store, c));
    assert!(dt.shares_blocks() && dc.shares_blocks());
    for b in 0..BLOCKS {
        // One request of 4 blocks at a time, as a guest's 16 KiB writes.
        if b % 4 == 0 {
            let buf: Vec<u8> = (b..b + 4).flat_map(|x| data(x, 1)).collect();
            dt.write(at(b), &buf).expect("write");
            dc.write(at(b), &buf).expect("write");
        }
    }
    dt.flush().expect("flush");
    dc.flush().expect("flush");
    let p = store.pool_status();
    assert_eq!(p.used, BLOCKS, "one pool block per distinct guest block");
    assert_eq!(p.refs, 2 * BLOCKS, "each held by both versions");
    // The versions' own extents hold tree nodes only: one extent each.
    assert_eq!(used_extents(&store, t), 1);
    assert_eq!(used_extents(&store, c), 1);
    for b in 0..BLOCKS {
        assert_eq!(read(&dt, b), data(b, 1));
        assert_eq!(read(&dc, b), data(b, 1));
    }

    // The candidate diverges on block 3: the trusted version still reads its data.
    dc.write(at(3), &data(3, 2)).expect("write");
    // A partial write of the trusted version to block 5: copied out of the pool first.
    dt.write(Sector(at(5).0 + 1), &[0xEE; 512])
        .expect("succeeds");
    dt.flush().expect("flush");
    dc.flush().expect("flush");
    assert_eq!(read(&dc, 3), data(3, 2));
    assert_eq!(read(&dt, 3), data(3, 1));
    let mut merged = data(5, 1);
    merged[512..1024].fill(0xEE);
    assert_eq!(read(&dt, 5), merged);
    assert_eq!(read(&dc, 5), data(5, 1));
    let p = store.pool_status();
    assert_eq!(
        p.used,
        BLOCKS + 1,
        "the candidate's new block 3 is a pool block too"
    );
    assert_eq!(
        p.refs,
        2 * BLOCKS - 1,
        "the trusted version's block 5 is its own"
    );

    // Discard on the candidate: its holds go, the trusted version's blocks stay.
    dc.discard(at(8), Sectors(8 * BLOCK as u64 / 512))
        .expect("discard");
    dc.flush().expect("flush");
    assert_eq!(store.pool_status().refs, 2 * BLOCKS - 1 - 8);
    for b in 8..16 {
        assert_eq!(read(&dc, b), vec![0u8; BLOCK]);
        assert_eq!(read(&dt, b), data(b, 1));
    }
    let r = check(&meta, &file);
    assert!(r.is_ok(), "{r}");

    // Reopened: the same data, the same holds.
    let before = store.pool_status();
    drop((dt, dc));
    drop(store);
    let store = Store::open_on(Box::new(meta.clone()), Box::new(file.clone())).expect("succeeds");
    assert_eq!(store.pool_status().refs, before.refs);
    assert_eq!(store.pool_status().used, before.used);
    let (dt, dc) = (layout(&store, t), layout(&store, c));
    assert_eq!(read(&dt, 5), merged);
    assert_eq!(read(&dc, 3), data(3, 2));
    assert_eq!(read(&dt, 20), data(20, 1));
    assert_eq!(read(&dc, 20), data(20, 1));
}

#[test]
fn a_snapshot_keeps_its_shared_blocks_until_deleted() {
    let (meta, file) = (MemFile::new(), MemFile::new());
    let store = new_store(&meta, &file);
    let t = store
        .create_disk("vm", SIZE, "parallax-v1")
        .expect("create disk");
    let d = layout(&store, t);
    for b in 0..8 {
        d.write(at(b), &data(b, 1)).expect("write");
    }
    d.flush().expect("flush");
    d.snapshot("s").expect("snapshot");
    for b in 0..8 {
        d.write(at(b), &data(b, 2)).expect("write");
    }
    d.flush().expect("flush");
    // The snapshot's 8 blocks stay held (they are still referenced), beside the 8 new ones.
    assert_eq!(store.pool_status().refs, 16);
    let r = check(&meta, &file);
    assert!(r.is_ok(), "{r}");
    let snap = d.open_snapshot("s").expect("open snapshot");
    let mut buf = vec![0u8; BLOCK];
    snap.read(at(2), &mut buf).expect("read");
    assert_eq!(buf, data(2, 1));
    drop(snap);
    d.delete_snapshot("s").expect("delete snapshot");
    d.flush().expect("flush");
    assert_eq!(store.pool_status().refs, 8, "released with the snapshot");
    assert_eq!(store.pool_status().used, 8);
    let r = check(&meta, &file);
    assert!(r.is_ok(), "{r}");
    assert_eq!(read(&d, 2), data(2, 2));
}

#[test]
fn a_damaged_shared_block_is_reported_as_shared_not_as_a_disagreement() {
    let (meta, file) = (MemFile::new(), MemFile::new());
    let store = new_store(&meta, &file);
    let t = store
        .create_disk("vm", SIZE, "parallax-v1")
        .expect("create disk");
    let c = store.add_version("vm", "parallax-v1").expect("add version");
    let (dt, dc) = (layout(&store, t), layout(&store, c));
    dt.write(at(0), &data(0, 1)).expect("write");
    dc.write(at(0), &data(0, 1)).expect("write");
    dt.flush().expect("flush");
    dc.flush().expect("flush");
    let space = store.space(t).expect("space");
    let held = space.held_shared();
    assert_eq!(held.len(), 1);
    // One bit flipped in the one copy both versions read.
    let off = u64::from(held[0].extent.0) * EXTENT + u64::from(held[0].block) * BLOCK as u64 + 9;
    let mut byte = [0u8; 1];
    file.read_at(off, &mut byte).expect("read at");
    file.write_at(off, &[byte[0] ^ 0x10]).expect("write at");
    for d in [&dt, &dc] {
        let mut buf = vec![0u8; BLOCK];
        let e = d
            .read(at(0), &mut buf)
            .expect_err("a damaged shared block is not returned");
        let msg = dovetail_layout::error_chain(&e);
        assert!(
            msg.contains("shared block") && msg.contains("corrupt"),
            "{msg}"
        );
    }
    drop((dt, dc));
    drop(store);
    let r = check(&meta, &file);
    assert!(
        r.violations
            .iter()
            .any(|v| v.starts_with("shared pool:") && v.contains("corrupt")),
        "{r}"
    );
}

/// Two versions write the same blocks (shared), then diverge, discard and write partial blocks
/// (released), with FLUSHes between: in every power-cut state, the store opens, `store check`
/// finds no referenced block unheld and no held block unreferenced, and each version reads
/// what its last FLUSH before the cut made stable, or a later write.
#[test]
fn power_cut_at_every_sync_with_shared_blocks_in_flight() {
    let (meta, file) = (MemFile::new(), MemFile::new());
    drop(new_store(&meta, &file));
    let log = WriteLog::new();
    let store = Store::open_on(
        Box::new(log.wrap("meta", Box::new(meta)).expect("wrap")),
        Box::new(log.wrap("data", Box::new(file)).expect("wrap")),
    )
    .expect("open");
    let t = store
        .create_disk("vm", SIZE, "parallax-v1")
        .expect("create disk");
    let c = store.add_version("vm", "parallax-v1").expect("add version");
    let ds = [layout(&store, t), layout(&store, c)];
    // Per version, per block: the contents it was given, each with the log position of the
    // FLUSH that made it stable (the first: zeroes, stable from the start).
    let mut model: Vec<Vec<History>> =
        vec![vec![vec![(vec![0u8; BLOCK], Some(0))]; BLOCKS as usize]; 2];
    // 0: discard; 1, 2: write `data(b, n)`; 100 + v: sector 1 of the block overwritten.
    let rounds: [&dyn Fn(usize, u64) -> Option<u64>; 3] = [
        // Both write every other block with the same data.
        &|_, b| (b % 2 == 0).then_some(1),
        // The candidate diverges on a third of them; the trusted discards some.
        &|v, b| match (v, b % 6) {
            (1, 0) => Some(2),
            (0, 2) => Some(0),
            _ => None,
        },
        // Partial writes into shared blocks, and the same data again.
        &|v, b| match (v, b % 8) {
            (_, 4) => Some(100 + v as u64),
            (1, 2) => Some(1),
            _ => None,
        },
    ];
    for (round, f) in rounds.iter().enumerate() {
        for (v, d) in ds.iter().enumerate() {
            for b in 0..BLOCKS {
                let Some(n) = f(v, b) else { continue };
                let mut now = model[v][b as usize].last().expect("last").0.clone();
                if n == 0 {
                    d.discard(at(b), Sectors(8)).expect("discard");
                    now.fill(0);
                } else if n >= 100 {
                    d.write(Sector(at(b).0 + 1), &[n as u8; 512])
                        .expect("succeeds");
                    now[512..1024].fill(n as u8);
                } else {
                    d.write(at(b), &data(b, n)).expect("write");
                    now = data(b, n);
                }
                model[v][b as usize].push((now, None));
            }
        }
        for (v, d) in ds.iter().enumerate() {
            d.flush().expect("flush");
            let mark = log.mark(format!("round {round} version {v} flushed"));
            for w in model[v].iter_mut().flatten() {
                w.1.get_or_insert(mark);
            }
        }
    }
    assert!(store.pool_status().used > 0);
    drop(ds);
    drop(store);

    let rec = log.recording();
    let states = rec.states(&Plan {
        seed: 27,
        subsets: 2,
        torn: 2,
    });
    let mut rebuilder = Rebuilder::new(&rec);
    let mut opened = 0usize;
    for s in &states {
        let files = rebuilder.rebuild(s).expect("rebuild");
        let image = |name| {
            MemFile::with_image(
                files[rec.file_named(name).expect("file")]
                    .clone()
                    .expect("exists"),
            )
        };
        let (m, f) = (image("meta"), image("data"));
        let r = check(&m, &f);
        assert!(r.is_ok(), "{s}: {r}");
        let cut = rec.cut(s.syncs);
        let store = Store::open_on(Box::new(m), Box::new(f))
            .unwrap_or_else(|e| panic!("{s}: the store does not open: {e}"));
        for (v, key) in [t, c].into_iter().enumerate() {
            // Early states: the version not created yet, or never formatted.
            if store.version(key).map_or(true, |v| v.root_len == 0) {
                continue;
            }
            let d =
                Parallax::open_with(store.space(key).expect("space"), ParallaxOptions::default())
                    .unwrap_or_else(|e| panic!("{s}: version {v} does not open: {e}"));
            opened += 1;
            for b in 0..BLOCKS {
                let got = read(&d, b);
                let writes = &model[v][b as usize];
                let stable = writes
                    .iter()
                    .rposition(|w| w.1.is_some_and(|at| at < cut))
                    .unwrap_or(0);
                assert!(
                    writes[stable..].iter().any(|w| w.0 == got),
                    "{s}: version {v} block {b} holds neither what was stable at the cut nor a \
                     later write"
                );
            }
        }
    }
    eprintln!(
        "{} power-cut states, {opened} versions opened",
        states.len()
    );
    assert!(opened > 0);
}
