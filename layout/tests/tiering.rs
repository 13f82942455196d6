//! parallax-v2 tiering on a two-tier in-memory store: metadata kept twice on distinct tiers and
//! repaired from the good copy when one is damaged; a known hot set promoted to the fast tier
//! and idle blocks demoted, compressed, to the slow one, reading back exactly; crashes at any
//! point of the mover's work lose nothing that was flushed.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use dovetail_layout::parallax::{Class, Parallax, ParallaxOptions, TierPolicy};
use dovetail_layout::{BlockLayout, Sector, Sectors};
use dovetail_store::mem::{MemPool, MemSpace};
use dovetail_store::{VersionKey, VersionSpace};

const CAP: Sectors = Sectors(2048 * 4); // 4 MiB, 1024 blocks
const BLOCK: usize = 4096;
const EXTENT: u64 = 256 << 10; // 64 blocks
const FAST: usize = 0;
const SLOW: usize = 1;

fn sector(block: u64) -> Sector {
    Sector(block * 8)
}

/// Compressible, and different for every block and seed.
fn text_block(seed: u64) -> Vec<u8> {
    let line = format!("block {seed:08} of a tiered disk; ");
    line.bytes().cycle().take(BLOCK).collect()
}

fn tiered_v2() -> (Arc<MemSpace>, Parallax) {
    let pool = MemPool::with_tiers(&[("fast", 64), ("slow", 256)]);
    let space = Arc::new(MemSpace::new(pool, VersionKey(1), EXTENT));
    let d = Parallax::create_layout(space.clone(), "parallax-v2", CAP, v2_options())
        .expect("create parallax-v2");
    (space, d)
}

fn reopen(space: &MemSpace) -> (Arc<MemSpace>, Parallax) {
    let crashed = Arc::new(space.crash());
    let dyn_space: Arc<dyn VersionSpace> = crashed.clone();
    let opts = ParallaxOptions {
        persist_every: None,
        ..ParallaxOptions::default()
    };
    let d = Parallax::open_with(dyn_space, opts).expect("reopen");
    (crashed, d)
}

/// Runs the mover until a whole round over the disk is done.
fn round(d: &Parallax) -> (u64, u64, u64) {
    let (mut promoted, mut demoted, mut placed) = (0, 0, 0);
    for _ in 0..10_000 {
        let r = d.tier_pass(64, 4096).expect("pass");
        promoted += r.promoted;
        demoted += r.demoted;
        placed += r.placed;
        if r.wrapped {
            return (promoted, demoted, placed);
        }
    }
    panic!("the mover never finished a round");
}

#[test]
fn defaults_keep_metadata_twice_on_distinct_tiers_and_data_once_on_the_fast_tier() {
    let (_space, d) = tiered_v2();
    for b in 0..300u64 {
        d.write(sector(b), &text_block(b)).expect("write");
    }
    d.flush().expect("flush");
    let status = d.tier_status().expect("parallax-v2 has tiering");
    assert_eq!(status.policy, TierPolicy::defaults(2));
    let groups = d.extent_groups();
    let meta: Vec<_> = groups.iter().filter(|g| g.class == Class::Meta).collect();
    assert!(!meta.is_empty());
    for g in &meta {
        assert_eq!(g.members.len(), 2, "metadata x2: {g:?}");
        assert!(g.members[0].0 < 64, "primary on the fast tier: {g:?}");
        assert!(g.members[1].0 >= 64, "replica on the slow tier: {g:?}");
    }
    for b in 0..300u64 {
        let p = d.placement(b).expect("placement").expect("written");
        assert_eq!(
            (p.class, p.tier, p.copies, p.compressed),
            (Class::Hot, FAST, 1, false)
        );
    }
    assert_eq!(d.placement(400).expect("placement"), None, "unwritten");
    assert_eq!(d.check(), Vec::<String>::new());
}

#[test]
fn a_corrupt_metadata_copy_is_read_around_and_repaired() {
    let (space, d) = tiered_v2();
    let mut model = vec![0u8; (CAP.0 * 512) as usize];
    for b in (0..1024u64).step_by(3) {
        let data = text_block(b);
        d.write(sector(b), &data).expect("write");
        model[b as usize * BLOCK..(b as usize + 1) * BLOCK].copy_from_slice(&data);
    }
    d.snapshot("before").expect("snapshot");
    let groups = d.extent_groups();
    drop(d);
    // Flip bytes in every block of the metadata groups' first copies: every tree node and
    // annotation page there is damaged; their second copies are intact.
    let meta: Vec<_> = groups.iter().filter(|g| g.class == Class::Meta).collect();
    let mut block = vec![0u8; BLOCK];
    let mut flipped = 0;
    for g in &meta {
        for i in 0..EXTENT / BLOCK as u64 {
            space
                .read(g.members[0], i * BLOCK as u64, &mut block)
                .expect("read");
            if block.iter().all(|&b| b == 0) {
                continue;
            }
            block[100] ^= 0xff;
            block[4000] ^= 0x01;
            space
                .write(g.members[0], i * BLOCK as u64, &block)
                .expect("corrupt");
            flipped += 1;
        }
    }
    space.sync().expect("sync");
    assert!(flipped > 4, "{flipped} metadata blocks damaged");
    // Reopening reads every node and page: all through the good copies, repairing the bad.
    let (space, d) = reopen(&space);
    assert_disk_eq(&d, &model, "after damage");
    let status = d.tier_status().expect("tiering");
    // Some damaged blocks were free (superseded); every block in use was repaired, which
    // check proves by comparing every copy of every block in use.
    assert!(status.repairs >= 4, "{} repairs", status.repairs);
    assert_eq!(
        d.check(),
        Vec::<String>::new(),
        "repaired copies check clean"
    );
    let snap = d.open_snapshot("before").expect("snapshot");
    let mut buf = vec![0u8; model.len()];
    snap.read(Sector(0), &mut buf).expect("snapshot read");
    assert!(buf == model, "the snapshot reads back");
    // The repair reached the disk: a fresh open repairs nothing more.
    d.flush().expect("flush");
    drop(snap);
    drop(d);
    let (space, d) = reopen(&space);
    assert_eq!(d.tier_status().expect("tiering").repairs, 0);
    assert_disk_eq(&d, &model, "second reopen");
    // Damage the second copies instead: reads never see them, check does, scrub fixes them.
    let groups = d.extent_groups();
    let mut damaged = 0;
    for g in groups.iter().filter(|g| g.class == Class::Meta) {
        for i in 0..EXTENT / BLOCK as u64 {
            space
                .read(g.members[1], i * BLOCK as u64, &mut block)
                .expect("read");
            if block.iter().all(|&b| b == 0) {
                continue;
            }
            block[7] ^= 0x10;
            space
                .write(g.members[1], i * BLOCK as u64, &block)
                .expect("corrupt");
            damaged += 1;
        }
    }
    assert!(damaged > 0);
    let problems = d.check();
    assert!(
        problems.iter().any(|p| p.contains("differs")),
        "check sees the damaged copies: {problems:?}"
    );
    assert!(d.scrub() >= damaged.min(1));
    assert_eq!(d.check(), Vec::<String>::new(), "scrubbed");
}

#[test]
fn a_known_hot_set_moves_to_the_fast_tier_and_cold_blocks_are_compressed() {
    let (space, d) = tiered_v2();
    let mut policy = TierPolicy::defaults(2);
    policy.cold_after_secs = 1;
    policy.hot_accesses = 2;
    d.set_tier_policy(policy).expect("policy");
    let mut model = vec![0u8; (CAP.0 * 512) as usize];
    for b in 0..512u64 {
        let data = text_block(b);
        d.write(sector(b), &data).expect("write");
        model[b as usize * BLOCK..(b as usize + 1) * BLOCK].copy_from_slice(&data);
    }
    d.flush().expect("flush");
    // Nothing has been idle for a second yet: the first round moves nothing.
    d.observe_temperature();
    let (p, dm, _) = round(&d);
    assert_eq!((p, dm), (0, 0));
    std::thread::sleep(Duration::from_millis(1100));
    d.observe_temperature();
    let (p, dm, _) = round(&d);
    assert_eq!(
        (p, dm),
        (0, 512),
        "every block idle for a second is demoted"
    );
    for b in 0..512u64 {
        let pl = d.placement(b).expect("placement").expect("written");
        assert_eq!(
            (pl.class, pl.tier, pl.compressed),
            (Class::Cold, SLOW, true),
            "block {b}"
        );
    }
    assert_disk_eq(&d, &model, "compressed cold blocks");
    let reads_before = d.tier_status().expect("tiering").compressed_reads;
    assert!(reads_before >= 512, "{reads_before} compressed reads");
    // The hot set: blocks 100..164, read three times each.
    let hot = 100..164u64;
    let mut buf = vec![0u8; BLOCK];
    for _ in 0..3 {
        for b in hot.clone() {
            d.read(sector(b), &mut buf).expect("read");
        }
    }
    d.observe_temperature();
    let (p, dm, _) = round(&d);
    assert_eq!((p, dm), (64, 0), "exactly the hot set is promoted");
    for b in 0..512u64 {
        let pl = d.placement(b).expect("placement").expect("written");
        let want = if hot.contains(&b) {
            (Class::Hot, FAST, false)
        } else {
            (Class::Cold, SLOW, true)
        };
        assert_eq!((pl.class, pl.tier, pl.compressed), want, "block {b}");
    }
    assert_disk_eq(&d, &model, "after promotion");
    assert_eq!(d.check(), Vec::<String>::new());
    // All of it is committed: a crash now keeps the placement and the data.
    let (_space, d) = reopen(&space);
    assert_disk_eq(&d, &model, "after a crash");
    assert_eq!(
        d.placement(120).expect("placement").map(|p| p.tier),
        Some(FAST)
    );
    assert_eq!(
        d.placement(20).expect("placement").map(|p| p.compressed),
        Some(true)
    );
    assert_eq!(d.check(), Vec::<String>::new());
}

#[test]
fn incompressible_cold_blocks_are_kept_uncompressed_on_the_slow_tier() {
    let (_space, d) = tiered_v2();
    let mut policy = TierPolicy::defaults(2);
    policy.cold_after_secs = 1;
    d.set_tier_policy(policy).expect("policy");
    let noise = pattern(7, 16 * BLOCK);
    d.write(Sector(0), &noise).expect("write");
    d.flush().expect("flush");
    d.observe_temperature();
    std::thread::sleep(Duration::from_millis(1100));
    d.observe_temperature();
    let (_, demoted, _) = round(&d);
    assert_eq!(demoted, 16);
    let pl = d.placement(3).expect("placement").expect("written");
    assert_eq!(
        (pl.class, pl.tier, pl.compressed),
        (Class::Cold, SLOW, false)
    );
    let mut back = vec![0u8; noise.len()];
    d.read(Sector(0), &mut back).expect("read");
    assert!(back == noise);
    // Nothing left to do: the next round moves nothing.
    d.observe_temperature();
    assert_eq!(round(&d), (0, 0, 0));
}

#[test]
fn a_policy_change_moves_blocks_and_nodes_to_follow_it() {
    let (_space, d) = tiered_v2();
    for b in 0..200u64 {
        d.write(sector(b), &text_block(b)).expect("write");
    }
    d.flush().expect("flush");
    // Hot data kept twice, metadata three times.
    let mut policy = TierPolicy::defaults(2);
    policy.classes[Class::Hot as usize].copies = 2;
    policy.classes[Class::Meta as usize].copies = 3;
    d.set_tier_policy(policy).expect("policy");
    d.observe_temperature();
    let (_, _, placed) = round(&d);
    assert!(placed >= 200, "{placed} blocks and nodes placed");
    for b in 0..200u64 {
        let pl = d.placement(b).expect("placement").expect("written");
        assert_eq!(
            (pl.class, pl.copies, pl.tier),
            (Class::Hot, 2, FAST),
            "block {b}"
        );
    }
    let status = d.tier_status().expect("tiering");
    for u in &status.usage {
        if u.blocks > 0 && u.class == Class::Meta {
            // Nodes of older groups were superseded; what is in use follows the policy.
            assert!(u.compliant || u.blocks == 0, "{u:?}");
        }
    }
    assert_eq!(d.check(), Vec::<String>::new());
    let bad = TierPolicy {
        cold_after_secs: 0,
        ..policy
    };
    assert!(d.set_tier_policy(bad).is_err());
    let mut bad = policy;
    bad.classes[2].tier = 5;
    let err = d.set_tier_policy(bad).expect_err("no tier 5");
    assert!(err.to_string().contains("tier 5"), "{err}");
}

#[test]
fn crashes_during_moves_lose_nothing_that_was_flushed() {
    let mut rng = Rng::new(0x7135_2026);
    for iteration in 0..12 {
        let (space, d) = tiered_v2();
        let mut policy = TierPolicy::defaults(2);
        policy.cold_after_secs = 1;
        policy.hot_accesses = 1;
        d.set_tier_policy(policy).expect("policy");
        let mut model = vec![0u8; (CAP.0 * 512) as usize];
        for b in 0..400u64 {
            let data = text_block(b + iteration * 10_000);
            d.write(sector(b), &data).expect("write");
            model[b as usize * BLOCK..(b as usize + 1) * BLOCK].copy_from_slice(&data);
        }
        d.flush().expect("flush");
        d.observe_temperature();
        std::thread::sleep(Duration::from_millis(1050));
        d.observe_temperature();
        // Move part of the way (each pass commits), with flushed guest writes in between,
        // then crash after a random number of passes.
        let passes = 1 + rng.below(12);
        let mut stable = model.clone();
        for _ in 0..passes {
            d.tier_pass(1 + rng.below(40), 4096).expect("pass");
            let b = rng.below(400);
            let data = text_block(b + 777 + iteration);
            d.write(sector(b), &data).expect("write");
            model[b as usize * BLOCK..(b as usize + 1) * BLOCK].copy_from_slice(&data);
            if rng.below(2) == 0 {
                d.flush().expect("flush");
                stable.clone_from(&model);
            }
        }
        let (_space, after) = reopen(&space);
        let got = read_all(&after);
        // Unflushed writes may or may not be there; everything flushed is.
        for b in 0..400usize {
            let r = b * BLOCK..(b + 1) * BLOCK;
            assert!(
                got[r.clone()] == stable[r.clone()] || got[r.clone()] == model[r.clone()],
                "iteration {iteration}, block {b}"
            );
        }
        assert_eq!(after.check(), Vec::<String>::new(), "iteration {iteration}");
        // The mover carries on after the crash and finishes.
        after.observe_temperature();
        round(&after);
        assert_eq!(after.check(), Vec::<String>::new(), "iteration {iteration}");
        drop(d);
    }
}
