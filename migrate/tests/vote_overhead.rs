//! What a third member costs: guest-sized requests through today's two-member Tee, the voting
//! Tee with two members and with three, beside a single version, under mirror-only,
//! lazy-hashes and sync-cross-checks (ignored by default; run with
//! `cargo test --release -p dovetail-migrate --test vote_overhead -- --ignored --nocapture`).
//! In process, one request at a time, every member parallax-v1 on an in-memory space: it
//! measures the Tee's own work (the extra member's copy, hashing, voting), not the devices.
//! BENCHMARKS.md ("The N-version Tee") holds a run.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::*;
use dovetail_layout::{BlockLayout, Sector, Sectors};
use dovetail_migrate::presence::PresenceMap;
use dovetail_migrate::{Policy, TeeOptions, VotingTee};

const CAP: Sectors = Sectors(64 << 11); // 64 MiB
const BYTES: u64 = 64 << 20;

fn member() -> Arc<dyn BlockLayout> {
    parallax(CAP).1
}

/// Requests of `size` bytes, `count` of them, random (4 KiB) or sequential; returns ops/s.
fn cell(d: &dyn BlockLayout, write: bool, size: usize, count: u64, random: bool) -> f64 {
    let data = pattern(size as u64, size);
    let mut buf = vec![0u8; size];
    let slots = BYTES / size as u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let start = Instant::now();
    for i in 0..count {
        let slot = if random {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % slots
        } else {
            i % slots
        };
        let at = Sector(slot * size as u64 / 512);
        if write {
            d.write(at, &data).expect("write");
        } else {
            d.read(at, &mut buf).expect("read");
        }
    }
    if write {
        d.flush().expect("flush");
    }
    count as f64 / start.elapsed().as_secs_f64()
}

const CELLS: [(&str, bool, usize, u64, bool); 4] = [
    ("randread 4K", false, 4096, 20_000, true),
    ("randwrite 4K", true, 4096, 20_000, true),
    ("read 1M", false, 1 << 20, 128, false),
    ("write 1M", true, 1 << 20, 128, false),
];

fn fill(d: &dyn BlockLayout) {
    let data = pattern(7, 1 << 20);
    for i in 0..BYTES >> 20 {
        d.write(Sector(i << 11), &data).expect("fill");
    }
    d.flush().expect("flush");
}

/// Each cell three times, the median (the machine is shared: single runs vary by a third).
fn row(d: &dyn BlockLayout) -> Vec<f64> {
    CELLS
        .iter()
        .map(|&(_, w, s, n, r)| {
            let mut v: Vec<f64> = (0..3).map(|_| cell(d, w, s, n, r)).collect();
            v.sort_by(f64::total_cmp);
            v[1]
        })
        .collect()
}

fn voting(n: usize, policy: Policy) -> VotingTee {
    let blocks = BYTES / 4096;
    let cands = (1..n)
        .map(|_| (member(), Arc::new(PresenceMap::in_memory(blocks))))
        .collect();
    VotingTee::new(member(), cands, TeeOptions::new("bench", policy)).expect("voting tee")
}

fn show(v: f64, size: usize) -> String {
    if size >= 1 << 20 {
        format!("{:.0} MB/s", v * size as f64 / 1e6)
    } else {
        format!("{:.1}k IOPS", v / 1e3)
    }
}

#[test]
#[ignore]
fn a_third_member_against_todays_tee() {
    let single = member();
    fill(&*single);
    let base = row(&*single);
    println!("| policy | cell | single | Tee (2) | voting (2) | voting (3) | voting (3) time / Tee (2) time | voting (3) time / voting (2) time |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for policy in [
        Policy::MirrorOnly,
        Policy::LazyHashes,
        Policy::SyncCrossChecks,
    ] {
        let tee = tee_over(member(), member(), TeeOptions::new("bench", policy));
        fill(&tee);
        let two = row(&tee);
        assert!(!tee.quarantined());
        tee.close().expect("close");
        let v2 = voting(2, policy);
        fill(&v2);
        let vtwo = row(&v2);
        v2.close().expect("close");
        let v3 = voting(3, policy);
        fill(&v3);
        let vthree = row(&v3);
        assert_eq!(v3.counters().votes_lost, 0);
        assert!(v3.members().iter().all(|m| !m.quarantined));
        v3.close().expect("close");
        for (k, &(name, _, size, _, _)) in CELLS.iter().enumerate() {
            println!(
                "| {policy} | {name} | {} | {} | {} | {} | {:.2} | {:.2} |",
                show(base[k], size),
                show(two[k], size),
                show(vtwo[k], size),
                show(vthree[k], size),
                two[k] / vthree[k],
                vtwo[k] / vthree[k],
            );
        }
    }
}

/// Members behind a device's write latency (each member parallax-v1 in memory behind a
/// [`Probe`] whose writes take `LATENCY` first, as a write waiting for a device would): 4 KiB
/// random and 1 MiB sequential writes through a 3-member voting Tee, its members written one
/// after another (`set_parallel_min(MAX)`, as before parallel writes) and in parallel (the
/// default threshold), beside one such member alone.
#[test]
#[ignore]
fn a_third_member_behind_device_latency() {
    const LATENCY: std::time::Duration = std::time::Duration::from_micros(500);
    let slow = || -> Arc<dyn BlockLayout> {
        let mut p = Probe::new(member());
        p.write_delay = Some(LATENCY);
        Arc::new(p)
    };
    let cells: [(&str, usize, u64, bool); 2] = [
        ("randwrite 4K", 4096, 400, true),
        ("write 1M", 1 << 20, 64, false),
    ];
    let single = slow();
    let run = |d: &dyn BlockLayout| -> Vec<f64> {
        cells
            .iter()
            .map(|&(_, s, n, r)| {
                let mut v: Vec<f64> = (0..3).map(|_| cell(d, true, s, n, r)).collect();
                v.sort_by(f64::total_cmp);
                v[1]
            })
            .collect()
    };
    let base = run(&*single);
    let tee = |parallel: bool| {
        let blocks = BYTES / 4096;
        let cands = (1..3)
            .map(|_| (slow(), Arc::new(PresenceMap::in_memory(blocks))))
            .collect();
        let t = VotingTee::new(slow(), cands, TeeOptions::new("bench", Policy::MirrorOnly))
            .expect("voting tee");
        if !parallel {
            t.set_parallel_min(std::time::Duration::MAX);
        }
        t
    };
    let seq = tee(false);
    let one_by_one = run(&seq);
    seq.close().expect("close");
    let par = tee(true);
    let parallel = run(&par);
    assert_eq!(par.counters().votes_lost, 0);
    par.close().expect("close");
    println!("| cell ({LATENCY:?} per member write) | single | voting (3), one after another | voting (3), in parallel | one after another time / single time | in parallel time / single time |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (k, &(name, size, _, _)) in cells.iter().enumerate() {
        println!(
            "| {name} | {} | {} | {} | {:.2} | {:.2} |",
            show(base[k], size),
            show(one_by_one[k], size),
            show(parallel[k], size),
            base[k] / one_by_one[k],
            base[k] / parallel[k],
        );
    }
}
