//! parallax-v1 and parallax-v2 written by several threads at once, as queue workers write one
//! disk: in each round every thread writes its own list of ranges (the same and different
//! blocks, whole and partial), while another thread reads, and FLUSH and snapshots run in the
//! middle of the writes. Every sector written holds a tag naming its write, so the outcome is
//! checked sector by sector against what the model allows: after a round, each sector holds
//! the last value some thread wrote to it in the round (or its value before); a read during the
//! round, or a snapshot taken during it, sees the value before or one the round wrote (never
//! data not yet written); a crash keeps everything a completed FLUSH covered.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Barrier};

use common::{assert_clean, crash_and_reopen};
use dovetail_layout::{BlockLayout, Parallax, Sector, Sectors};
use proptest::prelude::*;

/// Sectors of the disk (64 blocks of 4 KiB).
const SECTORS: u64 = 512;
const THREADS: usize = 3;

#[derive(Debug, Clone)]
struct Round {
    /// Per thread, the writes `(at, len)` in sectors, in order.
    writes: Vec<Vec<(u64, u64)>>,
    flush_mid: bool,
    snapshot_mid: bool,
    flush_end: bool,
    crash_end: bool,
}

fn write() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        // Whole blocks (the concurrent path), on few blocks so threads meet.
        3 => (0..16u64, 1..4u64).prop_map(|(b, n)| (b * 8, n * 8)),
        1 => (0..SECTORS, 1..20u64).prop_map(|(at, n)| (at, n.min(SECTORS - at))),
    ]
}

fn round() -> impl Strategy<Value = Round> {
    (
        proptest::collection::vec(proptest::collection::vec(write(), 1..8), THREADS),
        any::<bool>(),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(writes, flush_mid, snapshot_mid, flush_end, crash_end)| Round {
                writes,
                flush_mid,
                snapshot_mid,
                flush_end,
                crash_end,
            },
        )
}

/// The tag of sector `s` written by thread `t`'s write `i` of round `r` (never 0: 0 is the
/// unwritten disk).
fn tag(r: usize, t: usize, i: usize, s: u64) -> u64 {
    1 + ((r as u64) << 40 | (t as u64) << 32 | (i as u64) << 16 | s)
}

fn data(r: usize, t: usize, i: usize, at: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((len * 512) as usize);
    for s in at..at + len {
        for _ in 0..64 {
            out.extend_from_slice(&tag(r, t, i, s).to_le_bytes());
        }
    }
    out
}

/// The tag of every sector of `buf` (panics on a torn sector).
fn tags(buf: &[u8], first: u64, what: &str) -> Vec<u64> {
    buf.chunks(512)
        .enumerate()
        .map(|(k, sec)| {
            let v = u64::from_le_bytes(sec[..8].try_into().expect("8 bytes"));
            assert!(
                sec.chunks(8)
                    .all(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")) == v),
                "{what}: sector {} is torn",
                first + k as u64
            );
            v
        })
        .collect()
}

fn read_tags(d: &dyn BlockLayout, what: &str) -> Vec<u64> {
    let mut buf = vec![0u8; (SECTORS * 512) as usize];
    d.read(Sector(0), &mut buf).expect("read");
    tags(&buf, 0, what)
}

fn run(layout: &str, rounds: &[Round]) {
    let (_pool, space) = common::mem_space(64 << 10, 1 << 16);
    let mut space = space;
    let mut disk = Arc::new(
        Parallax::create_layout(
            space.clone(),
            layout,
            Sectors(SECTORS),
            common::v2_options(),
        )
        .expect("create"),
    );
    let mut model = vec![0u64; SECTORS as usize];
    // What a crash may leave, per sector.
    let mut durable: Vec<HashSet<u64>> = vec![HashSet::from([0]); SECTORS as usize];
    // Snapshots: name and the values each sector may hold.
    let mut snaps: Vec<(String, Vec<HashSet<u64>>)> = Vec::new();
    for (r, round) in rounds.iter().enumerate() {
        // Every value the round writes per sector, and per thread its last one.
        let mut any: Vec<HashSet<u64>> = model.iter().map(|&v| HashSet::from([v])).collect();
        let mut last: Vec<HashSet<u64>> = vec![HashSet::new(); SECTORS as usize];
        for (t, ws) in round.writes.iter().enumerate() {
            let mut mine = vec![None; SECTORS as usize];
            for (i, &(at, len)) in ws.iter().enumerate() {
                for s in at..at + len {
                    any[s as usize].insert(tag(r, t, i, s));
                    mine[s as usize] = Some(tag(r, t, i, s));
                }
            }
            for (s, v) in mine.into_iter().enumerate() {
                last[s].extend(v);
            }
        }
        let barrier = Barrier::new(THREADS + 2);
        let snap_name = format!("s{r}");
        std::thread::scope(|sc| {
            for (t, ws) in round.writes.iter().enumerate() {
                let (disk, barrier) = (&disk, &barrier);
                sc.spawn(move || {
                    barrier.wait();
                    for (i, &(at, len)) in ws.iter().enumerate() {
                        disk.write(Sector(at), &data(r, t, i, at, len))
                            .expect("write");
                    }
                });
            }
            // A reader: never a value the round did not write, never a torn sector.
            let (d, barrier, any) = (&disk, &barrier, &any);
            sc.spawn(move || {
                barrier.wait();
                for k in 0..6u64 {
                    let at = (k * 97 + r as u64 * 31) % (SECTORS - 16);
                    let mut buf = vec![0u8; 16 * 512];
                    d.read(Sector(at), &mut buf).expect("read");
                    for (j, v) in tags(&buf, at, "concurrent read").into_iter().enumerate() {
                        let s = at as usize + j;
                        assert!(any[s].contains(&v), "round {r}: read {v:#x} at sector {s}");
                    }
                }
            });
            barrier.wait();
            if round.flush_mid {
                disk.flush().expect("flush during writes");
            }
            if round.snapshot_mid {
                disk.snapshot(&snap_name).expect("snapshot during writes");
            }
        });
        let now = read_tags(&*disk, "after the round");
        for s in 0..SECTORS as usize {
            let ok = if last[s].is_empty() {
                now[s] == model[s]
            } else {
                last[s].contains(&now[s])
            };
            assert!(ok, "round {r}: sector {s} holds {:#x}", now[s]);
        }
        if round.snapshot_mid {
            snaps.push((snap_name, any.clone()));
        }
        if round.flush_mid || round.snapshot_mid {
            // Completed before the flush: durable; written during it: maybe.
            durable = any.clone();
        }
        model = now;
        if round.flush_end {
            disk.flush().expect("flush");
            durable = model.iter().map(|&v| HashSet::from([v])).collect();
        }
        assert_clean(&disk, &format!("round {r}"));
        if round.crash_end {
            let (s2, d2) = crash_and_reopen(&space);
            space = s2;
            disk = Arc::new(d2);
            let got = read_tags(&*disk, "after a crash");
            for s in 0..SECTORS as usize {
                assert!(
                    durable[s].contains(&got[s]),
                    "round {r}: after a crash sector {s} holds {:#x}",
                    got[s]
                );
            }
            model = got;
            durable = model.iter().map(|&v| HashSet::from([v])).collect();
            assert_clean(&disk, &format!("round {r}, reopened"));
        }
    }
    for (name, allowed) in &snaps {
        let snap = disk.open_snapshot(name).expect("open snapshot");
        let got = read_tags(&snap, name);
        for s in 0..SECTORS as usize {
            assert!(
                allowed[s].contains(&got[s]),
                "snapshot {name}: sector {s} holds {:#x}",
                got[s]
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn parallax_v1_threads_match_the_model(rounds in proptest::collection::vec(round(), 1..10)) {
        run("parallax-v1", &rounds);
    }

    #[test]
    fn parallax_v2_threads_match_the_model(rounds in proptest::collection::vec(round(), 1..10)) {
        run("parallax-v2", &rounds);
    }
}
