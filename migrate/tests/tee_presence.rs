//! The Tee and the presence map: what is compared, how partial blocks are completed, discard,
//! durability of the map, back-pressure, the resync after an unclean stop and the lazy job.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use dovetail_layout::{BlockLayout, MemLayout, Sector, Sectors};
use dovetail_migrate::presence::PresenceMap;
use dovetail_migrate::{EventKind, Policy, Tee, TeeOptions};

const CAP: Sectors = Sectors(1024); // 512 KiB, 128 blocks

fn garbage_candidate() -> Arc<MemLayout> {
    let c = Arc::new(MemLayout::new(CAP));
    c.write(Sector(0), &pattern(0xbad, (CAP.0 * 512) as usize))
        .expect("fill candidate");
    c
}

fn trusted_with_data() -> Arc<MemLayout> {
    let t = Arc::new(MemLayout::new(CAP));
    t.write(Sector(0), &pattern(0x600d, (CAP.0 * 512) as usize))
        .expect("fill trusted");
    t
}

fn block(d: &[u8], b: usize) -> &[u8] {
    &d[b * BLOCK..(b + 1) * BLOCK]
}

/// Blocks never written through the Tee are neither compared nor answered by the candidate,
/// even when it holds garbage there.
#[test]
fn absent_blocks_are_not_compared() {
    for policy in Policy::ALL {
        let t = trusted_with_data();
        let c = garbage_candidate();
        let tee = tee_over(t.clone(), c.clone(), TeeOptions::new("vda", policy));
        let whole = read_all(&tee);
        assert!(
            whole == t.snapshot(),
            "{policy}: absent blocks answered by the candidate"
        );
        // Block 5 written whole: now present, compared, equal.
        let d = pattern(5, BLOCK);
        tee.write(Sector(40), &d).expect("write");
        let mut back = vec![0u8; 3 * BLOCK];
        tee.read(Sector(32), &mut back)
            .expect("read across present and absent blocks");
        assert!(back[BLOCK..2 * BLOCK] == d[..], "{policy}");
        assert!(back[..BLOCK] == *block(&t.snapshot(), 4), "{policy}");
        tee.drain();
        assert!(!tee.quarantined(), "{policy}: {:?}", tee.events());
        assert!(tee.presence().contains(5) && !tee.presence().contains(4));
        assert_eq!(tee.presence().count(), 1);
        if policy.to_string().starts_with("sync") || policy == Policy::AsyncOldPrimary {
            assert_eq!(
                tee.counters().compared_bytes,
                BLOCK as u64,
                "{policy}: only the held block"
            );
        }
        tee.close().expect("close");
    }
}

/// A write covering part of a block the candidate does not hold is completed with the rest of
/// the block from the trusted version; a partial write to a held block is not.
#[test]
fn partial_writes_complete_the_block_from_the_trusted() {
    for policy in Policy::ALL {
        let t = trusted_with_data();
        let c = garbage_candidate();
        let tee = tee_over(t.clone(), c.clone(), TeeOptions::new("vda", policy));
        // Sectors 3..6 of block 0, and a write straddling blocks 2 and 3 (sectors 20..28).
        tee.write(Sector(3), &pattern(1, 3 * 512)).expect("write");
        tee.write(Sector(20), &pattern(2, 8 * 512)).expect("write");
        tee.drain();
        let (ts, cs) = (t.snapshot(), c.snapshot());
        for b in [0, 2, 3] {
            assert!(
                block(&ts, b) == block(&cs, b),
                "{policy}: block {b} not completed"
            );
            assert!(tee.presence().contains(b as u64));
        }
        assert!(!tee.presence().contains(1));
        assert!(
            block(&ts, 1) != block(&cs, 1),
            "{policy}: block 1 must stay untouched"
        );
        // Reading the partly written blocks compares equal.
        let mut back = vec![0u8; 4 * BLOCK];
        tee.read(Sector(0), &mut back).expect("read");
        assert!(back == ts[..4 * BLOCK], "{policy}");
        tee.drain();
        assert!(!tee.quarantined(), "{policy}: {:?}", tee.events());
        tee.close().expect("close");
    }
}

/// Discard and write-zeroes: both versions read zeroes, blocks become present, partial edge
/// blocks are completed from the trusted version.
#[test]
fn discard_zeroes_both_versions() {
    for policy in Policy::ALL {
        let t = trusted_with_data();
        let c = garbage_candidate();
        let tee = tee_over(t.clone(), c.clone(), TeeOptions::new("vda", policy));
        // Sectors 4..28: the tail of block 0, blocks 1 and 2, the head of block 3.
        tee.discard(Sector(4), Sectors(24)).expect("discard");
        tee.write_zeroes(Sector(64), Sectors(16), false)
            .expect("write zeroes");
        tee.drain();
        let (ts, cs) = (t.snapshot(), c.snapshot());
        assert!(ts[4 * 512..28 * 512].iter().all(|&b| b == 0), "{policy}");
        for b in [0, 1, 2, 3, 8, 9] {
            assert!(block(&ts, b) == block(&cs, b), "{policy}: block {b}");
            assert!(tee.presence().contains(b as u64), "{policy}: block {b}");
        }
        let mut back = vec![0u8; 10 * BLOCK];
        tee.read(Sector(0), &mut back).expect("read");
        assert!(back == ts[..10 * BLOCK]);
        tee.drain();
        assert!(!tee.quarantined(), "{policy}: {:?}", tee.events());
        tee.close().expect("close");
    }
}

/// A flush makes the map durable: a map reopened after the Tee vanished without closing has
/// the blocks written before the flush and is flagged unclean; `close` flags it clean.
#[test]
fn flush_persists_the_map_and_close_marks_it_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vda.map");
    let blocks = CAP.0 * 512 / BLOCK as u64;
    {
        let map = Arc::new(PresenceMap::create(&path, blocks, 2).expect("create"));
        let tee = Tee::new(
            Arc::new(MemLayout::new(CAP)),
            Arc::new(MemLayout::new(CAP)),
            map,
            TeeOptions::new("vda", Policy::AsyncOldPrimary),
        )
        .expect("tee");
        tee.write(Sector(8), &pattern(1, 2 * BLOCK)).expect("write");
        tee.flush().expect("flush");
        // Gone without close (kill -9).
        std::mem::forget(tee);
    }
    let map = PresenceMap::open(&path, blocks, 2).expect("open");
    assert!(!map.was_clean());
    assert!(map.contains(1) && map.contains(2) && !map.contains(0) && !map.contains(3));
    let tee = Tee::new(
        Arc::new(MemLayout::new(CAP)),
        Arc::new(MemLayout::new(CAP)),
        Arc::new(map),
        TeeOptions::new("vda", Policy::SyncCrossChecks),
    )
    .expect("tee");
    tee.write(Sector(0), &pattern(2, BLOCK)).expect("write");
    assert!(wait_for(Duration::from_secs(5), || tee.unverified_blocks() == 0));
    tee.close().expect("close");
    assert!(tee.write(Sector(0), &[0; 512]).is_err(), "closed");
    drop(tee);
    let map = PresenceMap::open(&path, blocks, 2).expect("open");
    assert!(map.was_clean());
    assert!(map.contains(0) && map.contains(1) && map.contains(2));
}

/// An unclean stop: the versions differ on a present block (the candidate lost a write). No
/// quarantine; the resync rewrites the block from the trusted version and says so.
#[test]
fn unclean_stop_resyncs_instead_of_quarantining() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vda.map");
    let blocks = CAP.0 * 512 / BLOCK as u64;
    let t = Arc::new(MemLayout::new(CAP));
    let c = Arc::new(MemLayout::new(CAP));
    {
        let map = Arc::new(PresenceMap::create(&path, blocks, 2).expect("create"));
        let tee = Tee::new(
            t.clone(),
            c.clone(),
            map,
            TeeOptions::new("vda", Policy::SyncCrossChecks),
        )
        .expect("tee");
        tee.write(Sector(0), &pattern(1, 64 * BLOCK))
            .expect("write");
        tee.flush().expect("flush");
        std::mem::forget(tee);
    }
    // After the crash the candidate lost a later write the trusted kept.
    t.write(Sector(24), &pattern(2, BLOCK))
        .expect("trusted kept it");
    c.write(Sector(80), &pattern(3, 512))
        .expect("and the candidate has one the trusted lost");
    let map = Arc::new(PresenceMap::open(&path, blocks, 2).expect("open"));
    assert!(!map.was_clean());
    let tee = Tee::new(
        t.clone(),
        c.clone(),
        map,
        TeeOptions::new("vda", Policy::SyncCrossChecks),
    )
    .expect("tee");
    let rx = tee.subscribe();
    // Reads meanwhile are not compared on unverified blocks.
    let mut back = vec![0u8; 64 * BLOCK];
    tee.read(Sector(0), &mut back).expect("read");
    assert!(back == t.snapshot()[..64 * BLOCK]);
    // The resync starts with the Tee: its event may come before `subscribe`, so the recent
    // events are looked at as well as the channel.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let ev = loop {
        if let Some(ev) = tee
            .events()
            .into_iter()
            .find(|e| e.kind == EventKind::Resynced)
        {
            break ev;
        }
        if let Ok(ev) = rx.recv_timeout(Duration::from_millis(100)) {
            if ev.kind == EventKind::Resynced {
                break ev;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no resync event in 30 s: {:?}",
            tee.events()
        );
    };
    assert!(ev.message.contains("2 rewritten"), "{}", ev.message);
    assert!(!tee.quarantined(), "{:?}", tee.events());
    assert_eq!(tee.counters().resync_blocks_repaired, 2);
    assert_eq!(tee.unverified_blocks(), 0);
    assert!(t.snapshot() == c.snapshot());
    // Now compared again.
    tee.read(Sector(0), &mut back).expect("read");
    assert!(tee.counters().compared_bytes >= 64 * BLOCK as u64);
    tee.close().expect("close");
}

/// A slow candidate: the stream never holds more than the budget plus one request, and the
/// request path waits instead.
#[test]
fn backpressure_bounds_the_stream() {
    for policy in [
        Policy::MirrorOnly,
        Policy::AsyncOldPrimary,
        Policy::AsyncNewPrimary,
    ] {
        let t = Arc::new(MemLayout::new(CAP));
        let mut probe = Probe::new(Arc::new(MemLayout::new(CAP)));
        if policy != Policy::AsyncNewPrimary {
            probe.write_delay = Some(Duration::from_millis(2));
        }
        let probe = Arc::new(probe);
        let mut opts = TeeOptions::new("vda", policy);
        opts.stream_bytes = 64 << 10;
        let slow_trusted: Arc<dyn BlockLayout> = if policy == Policy::AsyncNewPrimary {
            // The trusted version is the one written in the background here.
            let mut p = Probe::new(t.clone());
            p.write_delay = Some(Duration::from_millis(2));
            Arc::new(p)
        } else {
            t.clone()
        };
        let blocks = CAP.0 * 512 / BLOCK as u64;
        let tee = Tee::new(
            slow_trusted,
            probe.clone(),
            Arc::new(PresenceMap::in_memory(blocks)),
            opts,
        )
        .expect("tee");
        for i in 0..64u64 {
            tee.write(Sector((i % 32) * 32), &pattern(i, 16 << 10))
                .expect("write");
        }
        tee.flush().expect("flush");
        let c = tee.counters();
        assert!(c.backpressure_waits > 0, "{policy}: {c:?}");
        assert!(
            c.queue_high_water <= (64 << 10) + (16 << 10),
            "{policy}: {c:?}"
        );
        assert!(read_all(&*probe) == t.snapshot(), "{policy}");
        tee.close().expect("close");
    }
}

/// lazy-hashes with a short interval finds a block the candidate changed behind the Tee.
#[test]
fn lazy_hashes_find_a_flipped_block() {
    let t = Arc::new(MemLayout::new(CAP));
    let c = Arc::new(MemLayout::new(CAP));
    let mut opts = TeeOptions::new("vda", Policy::LazyHashes);
    opts.lazy_interval = Duration::from_millis(5);
    opts.lazy_region = 256 << 10;
    let tee = tee_over(t.clone(), c.clone(), opts);
    tee.write(Sector(0), &pattern(1, (CAP.0 * 512) as usize))
        .expect("fill");
    assert!(wait_for(Duration::from_secs(5), || tee
        .counters()
        .lazy_regions_checked
        >= 4));
    assert!(!tee.quarantined());
    let mut b = vec![0u8; 512];
    c.read(Sector(700), &mut b).expect("read");
    b[17] ^= 0x10;
    c.write(Sector(700), &b).expect("flip");
    assert!(wait_for(Duration::from_secs(10), || tee.quarantined()));
    let ev = tee
        .events()
        .into_iter()
        .find(|e| e.kind == EventKind::LazyMismatch)
        .expect("lazy mismatch");
    let req = ev.request.expect("piece");
    // The first difference, as a disk offset, is the flipped byte.
    assert_eq!(
        req.sector * 512 + ev.first_difference.expect("offset"),
        700 * 512 + 17
    );
    assert_eq!(ev.trusted.as_deref().map(str::len), Some(32));
    tee.close().expect("close");
}
