//! A grant zeroes its extent with a hole and no `fdatasync` of the tier file (docs/format.md,
//! *Grant*): after a power cut the hole may be lost, and an extent granted to a disk may hold
//! a former owner's bytes again. This test shows that none of them ever reaches the new owner.
//!
//! One run per layout (parallax-v1, parallax-v2), recorded with the power-loss recorder
//! (`dovetail_store::logwrites`): a disk `old` fills every block with a pattern of its own,
//! flushes (durable) and is deleted (its extents freed, their holes not synced); a disk `new`
//! is then granted the same extents, writes some blocks, flushes, writes more (new grants) and
//! flushes again, then writes without a flush. In every crash state of the run: the store
//! opens, `new` opens, no block of it reads any byte of `old`'s pattern, every block reads as
//! zeros or as one of `new`'s writes, and every block a FLUSH acknowledged before the cut
//! holds what that FLUSH made stable (or a later write). And the hazard is real: in some
//! states an extent granted to `new` holds `old`'s bytes at the store's level.

use std::sync::Arc;

use dovetail_layout::{BlockLayout, Parallax, ParallaxOptions, Sector, Sectors};
use dovetail_store::logwrites::{MemFile, Plan, Rebuilder, WriteLog};
use dovetail_store::{Store, StoreFile};

const EXTENT: u64 = 64 << 10;
const EXTENTS: u64 = 12;
const SIZE: u64 = 256 << 10;
const BLOCK: usize = 4096;
const BLOCKS: u64 = SIZE / BLOCK as u64;

/// `old`'s bytes: a pattern that no write of `new` and no tree node contains.
const OLD: [u8; 8] = *b"OLD!old!";

fn old_block() -> Vec<u8> {
    OLD.iter().copied().cycle().take(BLOCK).collect()
}

/// `new`'s write number `n` to block `b`.
fn new_block(b: u64, n: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    for (i, chunk) in v.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&b.to_le_bytes());
        chunk[8..].copy_from_slice(&(n * 1000 + i as u64).to_le_bytes());
    }
    v
}

fn has_old(buf: &[u8]) -> bool {
    buf.windows(OLD.len()).any(|w| w == OLD)
}

fn open(store: &Arc<Store>, name: &str, layout: &str) -> Parallax {
    let key = store.disk(name).expect("disk").trusted;
    let space = store.space(key).expect("space");
    if store.version(key).expect("version").root_len == 0 {
        Parallax::create_layout(
            space,
            layout,
            Sectors(SIZE / 512),
            ParallaxOptions::default(),
        )
        .expect("format")
    } else {
        Parallax::open_with(space, ParallaxOptions::default()).expect("open")
    }
}

fn write(d: &Parallax, b: u64, data: &[u8]) {
    d.write(Sector(b * BLOCK as u64 / 512), data)
        .expect("write");
}

/// `new`'s writes in order: (block, write number, the log position of the FLUSH that made it
/// stable, if one did).
struct Model {
    writes: Vec<(u64, u64, Option<usize>)>,
}

fn run(layout: &str) {
    let (meta, data) = (MemFile::new(), MemFile::new());
    drop(
        Store::create_on(
            Box::new(meta.clone()),
            Box::new(data.clone()),
            EXTENTS * EXTENT,
            EXTENT,
        )
        .expect("create"),
    );
    let log = WriteLog::new();
    let store = Store::open_on(
        Box::new(log.wrap("meta", Box::new(meta)).expect("wrap")),
        Box::new(log.wrap("data", Box::new(data)).expect("wrap")),
    )
    .expect("open");

    // `old` fills every block, durably, and goes away.
    store.create_disk("old", SIZE, layout).expect("old");
    let old = open(&store, "old", layout);
    for b in 0..BLOCKS {
        write(&old, b, &old_block());
    }
    old.flush().expect("flush old");
    let old_extents = store
        .version(store.disk("old").expect("old").trusted)
        .expect("version")
        .extents;
    drop(old);
    store.delete_disk("old").expect("delete old");
    log.mark("old deleted");

    // `new` takes the same extents and writes part of its blocks in three rounds.
    store.create_disk("new", SIZE, layout).expect("new");
    let new = open(&store, "new", layout);
    let mut model = Model { writes: Vec::new() };
    let mut n = 0;
    for (round, blocks) in [(0u64..BLOCKS / 4), (BLOCKS / 2..BLOCKS * 3 / 4), (5..9)]
        .into_iter()
        .enumerate()
    {
        let first = model.writes.len();
        for b in blocks.step_by(2) {
            n += 1;
            write(&new, b, &new_block(b, n));
            model.writes.push((b, n, None));
        }
        if round < 2 {
            new.flush().expect("flush new");
            let at = log.mark(format!("new flush {round}"));
            for w in &mut model.writes[first..] {
                w.2 = Some(at);
            }
        }
    }
    let new_key = store.disk("new").expect("new").trusted;
    let new_extents = store.version(new_key).expect("version").extents;
    assert!(
        new_extents.iter().any(|e| old_extents.contains(e)),
        "new ({new_extents:?}) should be granted extents old had ({old_extents:?})"
    );
    drop(new);
    drop(store);

    let rec = log.recording();
    let states = rec.states(&Plan {
        seed: 19,
        subsets: 2,
        torn: 2,
    });
    let mut rebuilder = Rebuilder::new(&rec);
    let (mut opened, mut former) = (0usize, 0usize);
    for s in &states {
        let files = rebuilder.rebuild(s).expect("rebuild");
        let file = |name| {
            Box::new(MemFile::with_image(
                files[rec.file_named(name).expect("file")]
                    .clone()
                    .expect("exists"),
            )) as Box<dyn StoreFile>
        };
        let cut = rec.cut(s.syncs);
        let store = Store::open_on(file("meta"), file("data"))
            .unwrap_or_else(|e| panic!("{layout}, {s}: the store does not open: {e}"));
        let Ok(disk) = store.disk("new") else {
            continue;
        };
        if store.version(disk.trusted).expect("version").root_len == 0 {
            continue;
        }
        // The store level: granted extents of `new` may hold `old`'s bytes.
        let space = store.space(disk.trusted).expect("space");
        let mut raw = vec![0u8; EXTENT as usize];
        for e in space.extents() {
            space.read(e, 0, &mut raw).expect("read extent");
            if has_old(&raw) {
                former += 1;
            }
        }
        // The disk level: never.
        let d = Parallax::open_with(space, ParallaxOptions::default())
            .unwrap_or_else(|e| panic!("{layout}, {s}: new does not open: {e}"));
        opened += 1;
        let mut buf = vec![0u8; BLOCK];
        for b in 0..BLOCKS {
            d.read(Sector(b * BLOCK as u64 / 512), &mut buf)
                .unwrap_or_else(|e| panic!("{layout}, {s}: reading block {b}: {e}"));
            assert!(
                !has_old(&buf),
                "{layout}, {s}: block {b} of new shows old's bytes"
            );
            let writes: Vec<&(u64, u64, Option<usize>)> =
                model.writes.iter().filter(|w| w.0 == b).collect();
            let stable = writes.iter().rposition(|w| w.2.is_some_and(|at| at < cut));
            let allowed: Vec<Vec<u8>> = writes[stable.unwrap_or(0)..]
                .iter()
                .map(|w| new_block(b, w.1))
                .chain(stable.is_none().then(|| vec![0u8; BLOCK]))
                .collect();
            assert!(
                allowed.contains(&buf),
                "{layout}, {s}: block {b} holds neither what was stable at the cut nor a later \
                 write"
            );
        }
    }
    eprintln!(
        "{layout}: {} crash states, new opened in {opened}; {former} times an extent granted to \
         new held old's bytes at the store's level, never in a block of new",
        states.len()
    );
    assert!(opened > 0, "{layout}: no state had new to open");
    assert!(
        former > 0,
        "{layout}: no state had old's bytes in new's extents: the test shows nothing"
    );
}

#[test]
fn a_granted_extent_never_shows_a_former_owners_bytes_after_a_power_cut_v1() {
    run("parallax-v1");
}

#[test]
fn a_granted_extent_never_shows_a_former_owners_bytes_after_a_power_cut_v2() {
    run("parallax-v2");
}
