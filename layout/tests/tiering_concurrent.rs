//! The mover copies blocks while the guest writes and reads the same blocks: a step copies
//! under the blocks' stripes, not the version's exclusive lock, and a guest write that races a
//! copy wins (the tree is never repointed at a stale copy). Checked byte for byte against a
//! model, live and after a crash.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use dovetail_layout::parallax::{Class, Parallax, TierPolicy};
use dovetail_layout::{BlockLayout, Sector, Sectors};
use dovetail_store::mem::{MemPool, MemSpace};
use dovetail_store::VersionKey;

const CAP: Sectors = Sectors(2048 * 2); // 2 MiB, 512 blocks
const BLOCK: usize = 4096;
const EXTENT: u64 = 256 << 10; // 64 blocks
const BLOCKS: u64 = 256; // the blocks the guest writes (and the mover keeps moving)

fn sector(block: u64) -> Sector {
    Sector(block * 8)
}

/// Version `v` of block `b`: a header naming both, then bytes derived from them (compressible
/// for half the versions, so cold copies are compressed too).
fn content(b: u64, v: u64) -> Vec<u8> {
    let mut out = if v % 2 == 0 {
        format!("block {b:06} version {v:08};")
            .bytes()
            .cycle()
            .take(BLOCK)
            .collect()
    } else {
        pattern(b << 32 | v, BLOCK)
    };
    out[..8].copy_from_slice(&b.to_le_bytes());
    out[8..16].copy_from_slice(&v.to_le_bytes());
    out
}

/// Whether `got` is some version of block `b` (or zeroes: never written, or discarded).
fn is_a_version_of(b: u64, got: &[u8]) -> bool {
    if got.iter().all(|&x| x == 0) {
        return true;
    }
    let (Ok(hb), Ok(hv)) = (got[..8].try_into(), got[8..16].try_into()) else {
        return false;
    };
    u64::from_le_bytes(hb) == b && got == content(b, u64::from_le_bytes(hv)).as_slice()
}

fn tiered() -> (Arc<MemSpace>, Parallax) {
    let pool = MemPool::with_tiers(&[("fast", 128), ("slow", 256)]);
    let space = Arc::new(MemSpace::new(pool, VersionKey(1), EXTENT));
    let d = Parallax::create_layout(space.clone(), "parallax-v2", CAP, v2_options())
        .expect("create parallax-v2");
    (space, d)
}

/// Two policies the mover alternates between, so that every written block moves every round:
/// hot data once on the fast tier, then twice; idle blocks (none stays idle a whole second
/// here unless the writer skips it) compressed on the slow tier.
fn policies() -> [TierPolicy; 2] {
    let mut a = TierPolicy::defaults(2);
    a.cold_after_secs = 1;
    a.hot_accesses = 1;
    let mut b = a;
    b.classes[Class::Hot as usize].copies = 2;
    [a, b]
}

#[test]
fn guest_writes_racing_the_mover_on_the_same_blocks_always_win() {
    let (space, d) = tiered();
    let d = Arc::new(d);
    // model[b]: the version of block b last written (0: zeroes).
    let model: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(vec![0; BLOCKS as usize]));
    for b in 0..BLOCKS {
        d.write(sector(b), &content(b, 1)).expect("write");
        model.lock().expect("model")[b as usize] = 1;
    }
    d.flush().expect("flush");
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));

    // The guest: whole-block writes, partial writes (merging into a block the mover may be
    // copying), discards and FLUSHes, on the blocks the mover moves.
    let writer = {
        let (d, model, stop, writes) = (d.clone(), model.clone(), stop.clone(), writes.clone());
        std::thread::spawn(move || {
            let mut rng = Rng::new(0x5eed_2026);
            let mut v = 2u64;
            while !stop.load(Ordering::SeqCst) {
                let b = rng.below(BLOCKS);
                match rng.below(20) {
                    0 => {
                        d.discard(sector(b), Sectors(8)).expect("discard");
                        model.lock().expect("model")[b as usize] = 0;
                    }
                    1 => d.flush().expect("flush"),
                    2 => {
                        // A read-modify-write of the block's last 512 bytes, with the bytes
                        // it holds (so a reader never sees it torn).
                        let cur = model.lock().expect("model")[b as usize];
                        if cur > 0 {
                            let data = content(b, cur);
                            d.write(Sector(b * 8 + 7), &data[BLOCK - 512..])
                                .expect("partial write");
                        }
                    }
                    _ => {
                        d.write(sector(b), &content(b, v)).expect("write");
                        model.lock().expect("model")[b as usize] = v;
                        v += 1;
                    }
                }
                writes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // A reader: every block it reads is whole, some version of that block.
    let reader = {
        let (d, stop) = (d.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = Rng::new(0x0dd_2026);
            let mut buf = vec![0u8; BLOCK];
            let mut reads = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let b = rng.below(BLOCKS);
                d.read(sector(b), &mut buf).expect("read");
                assert!(is_a_version_of(b, &buf), "block {b} read torn or misplaced");
                reads += 1;
            }
            reads
        })
    };

    // The mover, in small steps, alternating policies round after round.
    let (mut moved, mut rounds) = (0u64, 0u64);
    let start = Instant::now();
    let policies = policies();
    while start.elapsed() < Duration::from_secs(4) || rounds < 4 {
        d.set_tier_policy(policies[(rounds % 2) as usize])
            .expect("policy");
        d.observe_temperature();
        loop {
            let r = d.tier_pass(16, 64).expect("pass");
            moved += r.moved();
            if r.wrapped {
                break;
            }
        }
        rounds += 1;
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    let reads = reader.join().expect("reader");
    let writes = writes.load(Ordering::Relaxed);
    assert!(moved > 2 * BLOCKS, "the mover moved only {moved} blocks");
    assert!(writes > 1000, "only {writes} guest writes ran");
    assert!(reads > 1000, "only {reads} guest reads ran");

    let expect = |model: &[u64]| -> Vec<u8> {
        let mut disk = vec![0u8; (CAP.0 * 512) as usize];
        for (b, &v) in model.iter().enumerate() {
            if v > 0 {
                disk[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&content(b as u64, v));
            }
        }
        disk
    };
    let want = expect(&model.lock().expect("model"));
    assert_disk_eq(&*d, &want, "after the race");
    assert_eq!(d.check(), Vec::<String>::new());
    assert_eq!(d.check_data(), Vec::<String>::new());
    d.flush().expect("flush");
    let (_space, d) = crash_and_reopen(&space);
    assert_disk_eq(&d, &want, "after a crash");
    assert_eq!(d.check(), Vec::<String>::new());
}

/// A measurement, not a check (timings depend on the machine): while the mover demotes (and
/// compresses) a 64 MiB disk in steps of 128 blocks, a guest writes other blocks of it in a
/// loop. Under the former exclusive lock each of those writes could wait for a whole step;
/// now a step holds only its own blocks' stripes. Prints the steps' durations and the writes'
/// latencies. On a `MemSpace` the tail of the writes is the test double's: its `sync` (each
/// step's commit) copies the whole space under the mutex every write takes. `cargo test --release -p dovetail-layout --test tiering_concurrent -- --ignored
/// --nocapture`.
#[test]
#[ignore = "a measurement: run by hand, in release mode"]
fn measure_guest_write_latency_while_the_mover_steps() {
    const N: u64 = 16384; // 64 MiB
    let pool = MemPool::with_tiers(&[("fast", 512), ("slow", 512)]);
    let space = Arc::new(MemSpace::new(pool, VersionKey(1), 1 << 20));
    let d = Parallax::create_layout(space, "parallax-v2", Sectors(N * 8), v2_options())
        .expect("create parallax-v2");
    let d = Arc::new(d);
    let mut policy = TierPolicy::defaults(2);
    policy.cold_after_secs = 1;
    policy.hot_accesses = 1;
    d.set_tier_policy(policy).expect("policy");
    for b in 0..N {
        d.write(sector(b), &content(b, 2)).expect("write");
    }
    d.flush().expect("flush");
    d.observe_temperature();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (d, stop) = (d.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut lat = Vec::new();
            let mut v = 3;
            while !stop.load(Ordering::SeqCst) {
                for b in 0..64 {
                    let data = content(b, v);
                    let t0 = Instant::now();
                    d.write(sector(b), &data).expect("write");
                    lat.push(t0.elapsed());
                }
                v += 1;
            }
            lat
        })
    };
    std::thread::sleep(Duration::from_millis(1100));
    d.observe_temperature();
    let mut steps = Vec::new();
    let mut demoted = 0;
    loop {
        let t0 = Instant::now();
        let r = d.tier_pass(128, 8192).expect("pass");
        if r.moved() > 0 {
            steps.push(t0.elapsed());
        }
        demoted += r.demoted;
        if r.wrapped {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let mut lat = writer.join().expect("writer");
    steps.sort();
    lat.sort();
    let pct = |v: &[Duration], p: f64| v[((v.len() - 1) as f64 * p) as usize];
    println!(
        "mover: {demoted} blocks demoted in {} steps; step p50 {:?}, max {:?}",
        steps.len(),
        pct(&steps, 0.5),
        steps.last().copied().unwrap_or_default()
    );
    println!(
        "guest writes to other blocks meanwhile: {}; p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?}",
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 0.999),
        lat.last().copied().unwrap_or_default()
    );
    assert!(demoted > N / 2, "{demoted} blocks demoted");
}
