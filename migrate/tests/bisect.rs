//! Divergence bisection: seeded runs of 10 000 guest requests on 4 queues through a Tee whose
//! candidate (under a `FaultLayout`) goes wrong from request K on; the bisection must name
//! request K, confirmed by replaying the journal against fresh versions, in every run.

mod common;

use std::sync::{Arc, Barrier};

use common::{parallax, pattern, read_scattered, tee_over, write_scattered, Rng};
use dovetail_layout::fault::{FaultLayout, FaultRule};
use dovetail_layout::{BlockLayout, MemLayout, Sector, Sectors};
use dovetail_migrate::bisect::{self, Members};
use dovetail_migrate::journal::{JournalLimits, JournalOp};
use dovetail_migrate::mapfile::MapsDir;
use dovetail_migrate::{EventKind, Policy, Tee, TeeOptions};
use xxhash_rust::xxh3::xxh3_128;

const CAPACITY: Sectors = Sectors(16 << 11); // 16 MiB
const BLOCKS: u64 = CAPACITY.0 / 8;
const REQUESTS: usize = 10_000;
const QUEUES: usize = 4;

#[derive(Debug, Clone)]
enum Req {
    Write { at: u64, data: Vec<u8> },
    Zeroes { at: u64, len: u64, unmap: bool },
    Discard { at: u64, len: u64 },
    Flush,
    Read { at: u64, len: u64 },
}

impl Req {
    /// Whether the Tee journals it (reads are not journaled).
    fn journaled(&self) -> bool {
        !matches!(self, Req::Read { .. })
    }

    fn run(&self, tee: &Tee, scattered: bool) {
        // Errors are the candidate's (quarantined, then served by the trusted version alone)
        // or a refused write; the run goes on either way, as a guest's would.
        let _ = match self {
            Req::Write { at, data } if scattered => write_scattered(tee, *at, data),
            Req::Write { at, data } => tee.write(Sector(*at), data),
            Req::Zeroes { at, len, unmap } => tee.write_zeroes(Sector(*at), Sectors(*len), *unmap),
            Req::Discard { at, len } => tee.discard(Sector(*at), Sectors(*len)),
            Req::Flush => tee.flush(),
            Req::Read { at, len } => read_scattered(tee, *at, (*len * 512) as usize).map(|_| ()),
        };
    }
}

/// The injected fault: every write covering sector `sector` is dropped or misdirected one block
/// on; request `k` is the first to cover it.
struct Plan {
    reqs: Vec<Req>,
    k: usize,
    block: u64,
    rule: FaultRule,
}

fn plan(seed: u64) -> Plan {
    let mut r = Rng::new(seed);
    // The poisoned block, away from the disk's ends, and a sector in it.
    let block = 64 + r.below(BLOCKS - 128);
    let sector = block * 8 + r.below(8);
    let k = 2_000 + r.below(6_000) as usize;
    let rule: FaultRule = if seed % 2 == 0 {
        format!("drop-write:sector={sector}")
    } else {
        format!("misdirect-write:sector={sector}")
    }
    .parse()
    .expect("rule");
    // Requests before k never touch the poisoned block or the next one (where a misdirected
    // write lands); multi-block requests never touch them at all, so every request the fault
    // hits changes only those two blocks.
    let avoid = |at: u64, len: u64, i: usize| {
        let (a, b) = (at / 8, (at + len - 1) / 8);
        let multi = a != b;
        let near = a <= block + 1 && block <= b;
        near && (i < k || multi)
    };
    let mut reqs = Vec::with_capacity(REQUESTS);
    for i in 0..REQUESTS {
        if i == k {
            // Covers `sector`, within its block.
            let first = block * 8 + r.below(sector - block * 8 + 1);
            let last = sector + r.below(block * 8 + 8 - sector);
            let len = last - first + 1;
            reqs.push(Req::Write {
                at: first,
                data: pattern(seed ^ (i as u64) << 20, (len * 512) as usize),
            });
            continue;
        }
        loop {
            let roll = r.below(100);
            // Mostly within one block; some aligned multi-block requests up to 64 KiB.
            let (at, len) = if r.below(10) == 0 {
                let n = 1 + r.below(16);
                (r.below(BLOCKS - n) * 8, n * 8)
            } else {
                let b = r.below(BLOCKS);
                let off = r.below(8);
                (b * 8 + off, 1 + r.below(8 - off))
            };
            if roll >= 95 {
                reqs.push(Req::Flush);
                break;
            }
            if avoid(at, len, i) {
                continue;
            }
            reqs.push(match roll {
                0..=59 => Req::Write {
                    at,
                    data: pattern(seed ^ (i as u64) << 20, (len * 512) as usize),
                },
                60..=69 => Req::Zeroes {
                    at,
                    len,
                    unmap: roll % 2 == 0,
                },
                70..=74 => Req::Discard { at, len },
                _ => Req::Read { at, len },
            });
            break;
        }
    }
    Plan {
        reqs,
        k,
        block,
        rule,
    }
}

/// A fresh pair: a `MemLayout` trusted version and a candidate under a `FaultLayout` with
/// `rule`, over parallax-v1 or (for the long seeded runs, which must stay fast in a debug
/// build) over a `MemLayout`.
fn fresh_pair(rule: &FaultRule, parallax_candidate: bool) -> Members {
    let fault = if parallax_candidate {
        let (space, cand) = parallax(CAPACITY);
        FaultLayout::new(cand, vec![rule.clone()], 7).with_space(space)
    } else {
        FaultLayout::new(Arc::new(MemLayout::new(CAPACITY)), vec![rule.clone()], 7)
    };
    (Arc::new(MemLayout::new(CAPACITY)), Arc::new(fault))
}

/// Runs the plan on 4 queue threads: queue q takes requests q, q+4, ...; every request before
/// k completes before k starts, and k completes before any later one starts (a guest's
/// ordering point, e.g. a flush it waited for); everything else runs concurrently.
fn run(plan: &Plan, tee: &Arc<Tee>) {
    let barrier = Arc::new(Barrier::new(QUEUES));
    std::thread::scope(|s| {
        for q in 0..QUEUES {
            let (tee, barrier) = (tee.clone(), barrier.clone());
            s.spawn(move || {
                let mine = (q..REQUESTS).step_by(QUEUES);
                for i in mine.clone().filter(|&i| i < plan.k) {
                    plan.reqs[i].run(&tee, i % 3 == 0);
                }
                barrier.wait();
                if plan.k % QUEUES == q {
                    plan.reqs[plan.k].run(&tee, false);
                }
                barrier.wait();
                for i in mine.filter(|&i| i > plan.k) {
                    plan.reqs[i].run(&tee, i % 3 == 0);
                }
            });
        }
    });
    tee.drain();
}

fn check(seed: u64, policy: Policy, given_block: bool) {
    let plan = plan(seed);
    let mut o = TeeOptions::new("vda", policy);
    o.journal = Some(JournalLimits::requests(REQUESTS));
    let (trusted, candidate) = fresh_pair(&plan.rule, false);
    let tee = Arc::new(tee_over(trusted, candidate, o));
    run(&plan, &tee);

    // The request the fault first hit, as the journal numbers it: every journaled request
    // before it completed before it.
    let expect_seq = plan.reqs[..plan.k].iter().filter(|r| r.journaled()).count() as u64 + 1;
    let Req::Write { at, data } = &plan.reqs[plan.k] else {
        unreachable!("request k is a write")
    };
    let journal = tee.journal().expect("journal").snapshot();
    assert_eq!(journal.forgotten, 0, "seed {seed}");
    let entry = &journal.entries[(expect_seq - 1) as usize];
    assert_eq!(
        (entry.seq, entry.op, entry.sector, entry.hash),
        (expect_seq, JournalOp::Write, *at, Some(xxh3_128(data))),
        "seed {seed}: the journal's entry of request k"
    );

    let rule = plan.rule.clone();
    let fresh = move || Ok(fresh_pair(&rule, false));
    let block = given_block.then_some(plan.block);
    let report = tee.bisect(block, &fresh, None).expect("bisect");
    let bad = report
        .first_bad
        .as_ref()
        .unwrap_or_else(|| panic!("seed {seed} {policy}: no request named: {}", report.verdict));
    assert_eq!(
        (bad.seq, bad.op, bad.sector, bad.sectors),
        (expect_seq, "write", *at, data.len() as u64 / 512),
        "seed {seed} {policy}: {}",
        report.verdict
    );
    assert_eq!(
        bad.hash.as_deref(),
        Some(format!("{:032x}", xxh3_128(data)).as_str())
    );
    assert!(report.confirmed, "seed {seed}: {}", report.verdict);
    eprintln!(
        "seed {seed} {policy} ({}): block {} from {}, first bad request {expect_seq} of {} \
         journaled, {} requests replayed, confirmed",
        plan.rule,
        report.block,
        report.block_from,
        journal.entries.len(),
        report.replayed
    );
    let after = report.after.as_ref().expect("views after");
    assert_eq!(after.reference_agrees_with, Some("trusted"), "seed {seed}");
    assert!(
        report.block == plan.block || report.block == plan.block + 1,
        "seed {seed}: bisected block {} (poisoned {})",
        report.block,
        plan.block
    );
    assert!(report
        .earlier_requests_to_block
        .iter()
        .all(|e| e.seq < expect_seq));
    let ev = tee
        .events()
        .into_iter()
        .rfind(|e| e.kind == EventKind::Bisected)
        .expect("bisected event");
    assert_eq!(ev.request.as_ref().map(|r| r.seq), Some(expect_seq));
}

#[test]
fn bisection_names_the_injected_request_in_every_seeded_run() {
    // The block from the Tee's first mismatch event (sync-cross-checks reads every write back),
    // found by scanning (mirror-only reports nothing), or given (async-old-primary); odd seeds
    // misdirect the writes, even ones drop them. Seed 12's mismatch is a read-back of a write
    // the Tee extended to whole blocks, whose offset counts from the block's start, not the
    // request's. `DOVETAIL_SEED=N` runs seed N alone (seeds 1 to 60 all pass).
    let seeds: Vec<u64> = match std::env::var("DOVETAIL_SEED") {
        Ok(s) => vec![s.trim().parse().expect("DOVETAIL_SEED is a number")],
        Err(_) => vec![1, 2, 3, 12],
    };
    for seed in seeds {
        let (policy, given) = match seed % 3 {
            0 => (Policy::SyncCrossChecks, false),
            1 => (Policy::MirrorOnly, false),
            _ => (Policy::AsyncOldPrimary, true),
        };
        check(seed, policy, given);
    }
}

#[test]
fn no_divergence_in_the_window_names_no_request() {
    // The versions differ from before the journal started: nothing in it reproduces that.
    let cand = Arc::new(MemLayout::new(CAPACITY));
    cand.write(Sector(80), &[9; 4096]).expect("write");
    let mut o = TeeOptions::new("vda", Policy::MirrorOnly);
    o.journal = Some(JournalLimits::requests(64));
    let tee = tee_over(Arc::new(MemLayout::new(CAPACITY)), cand, o);
    tee.write(Sector(0), &[1; 4096]).expect("write");
    tee.drain();
    let fresh = || -> Result<Members, String> {
        Ok((
            Arc::new(MemLayout::new(CAPACITY)),
            Arc::new(MemLayout::new(CAPACITY)),
        ))
    };
    let report = tee.bisect(Some(10), &fresh, None).expect("bisect");
    assert!(report.first_bad.is_none());
    assert!(!report.confirmed);
    assert_eq!(
        report.live.as_ref().and_then(|v| v.first_difference),
        Some(0)
    );
    assert!(
        report.verdict.contains("does not reproduce"),
        "{}",
        report.verdict
    );
    // With no block named and none differing among those the journal changed: an error.
    let e = tee
        .bisect(None, &fresh, None)
        .expect_err("nothing to bisect");
    assert!(e.contains("name a block"), "{e}");
    // A Tee without a journal says how to get one.
    let plain = tee_over(
        Arc::new(MemLayout::new(CAPACITY)),
        Arc::new(MemLayout::new(CAPACITY)),
        TeeOptions::new("vdb", Policy::MirrorOnly),
    );
    let e = plain.bisect(Some(0), &fresh, None).expect_err("no journal");
    assert!(e.contains("--tee-journal"), "{e}");
}

#[test]
fn the_report_file_is_json_and_never_replaces_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let maps = MapsDir::open(dir.path()).expect("dir");
    let mut o = TeeOptions::new("vda", Policy::MirrorOnly);
    o.journal = Some(JournalLimits::requests(64));
    let rule: FaultRule = "drop-write:sector=16".parse().expect("rule");
    let (t, c) = fresh_pair(&rule, true);
    let tee = tee_over(t, c, o);
    tee.write(Sector(0), &[1; 4096]).expect("write");
    tee.write(Sector(16), &[2; 512]).expect("write");
    tee.drain();
    let fresh = move || Ok(fresh_pair(&rule, true));
    let save = |r: &bisect::BisectReport| {
        let name = bisect::report_name(r);
        bisect::write_report(&maps, &name, r).map_err(|e| e.to_string())?;
        Ok(name)
    };
    let report = tee.bisect(None, &fresh, Some(&save)).expect("bisect");
    assert_eq!(report.first_bad.as_ref().map(|e| e.seq), Some(2));
    let name = bisect::report_name(&report);
    // The event names the file the report went to.
    let ev = tee
        .events()
        .into_iter()
        .rfind(|e| e.kind == EventKind::Bisected)
        .expect("bisected event");
    assert!(
        ev.message.ends_with(&format!("(report: {name})")),
        "{}",
        ev.message
    );
    let text = std::fs::read_to_string(dir.path().join(&name)).expect("read");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["format"], 1);
    assert_eq!(v["block"], 2);
    assert_eq!(v["first_bad"]["seq"], 2);
    assert_eq!(v["first_bad"]["op"], "write");
    assert_eq!(v["confirmed"], true);
    let e = bisect::write_report(&maps, &name, &report).expect_err("exists");
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
}

#[test]
fn the_journal_stays_within_its_bounds_and_says_what_it_forgot() {
    // 64 KiB of data or 32 requests, whichever binds first; 200 writes of 1 to 8 KiB.
    let mut o = TeeOptions::new("vda", Policy::MirrorOnly);
    o.journal = Some(JournalLimits {
        requests: 32,
        bytes: 64 << 10,
    });
    let rule: FaultRule = "drop-write:sector=8".parse().expect("rule");
    let (t, c) = fresh_pair(&rule, false);
    let tee = tee_over(t, c, o);
    let mut r = Rng::new(11);
    let mut total = 0u64;
    for i in 0..200u64 {
        let len = 512 * (2 + r.below(15)) as usize;
        // Block 1 (the dropped sector) only by the first write.
        let at = if i == 0 { 8 } else { 64 + r.below(1024) * 8 };
        tee.write(Sector(at), &pattern(i, len)).expect("write");
        total += 1;
        let (n, bytes) = tee.journal().expect("journal").usage();
        assert!(n <= 32 && bytes <= 64 << 10, "{n} entries, {bytes} bytes");
    }
    tee.drain();
    let s = tee.journal().expect("journal").snapshot();
    assert_eq!(s.forgotten + s.entries.len() as u64, total);
    assert_eq!(s.entries.first().map(|e| e.seq), Some(s.forgotten + 1));
    assert!(s.forgotten >= 168, "forgot {}", s.forgotten);
    // The request that split block 1 is forgotten: the report says so rather than guessing.
    let fresh = move || Ok(fresh_pair(&rule, false));
    let report = tee.bisect(Some(1), &fresh, None).expect("bisect");
    assert!(report.first_bad.is_none());
    assert_eq!(report.window.forgotten, s.forgotten);
    assert_eq!(
        report.live.as_ref().and_then(|v| v.first_difference),
        Some(0)
    );
    assert!(report.verdict.contains("forgot"), "{}", report.verdict);
}

/// What the journal costs a guest's writes: 4 KiB writes on 4 threads through a mirror-only
/// Tee over two `MemLayout`s, with and without a journal (a measurement, not a check; run it
/// with `cargo test --release -p dovetail-migrate --test bisect journal_cost -- --ignored
/// --nocapture`).
#[test]
#[ignore]
fn journal_cost() {
    const WRITES: u64 = 50_000;
    let capacity = Sectors(256 << 11); // 256 MiB
    for journal in [None, Some(JournalLimits::requests(65_536))] {
        let mut o = TeeOptions::new("vda", Policy::MirrorOnly);
        o.journal = journal;
        let tee = Arc::new(tee_over(
            Arc::new(MemLayout::new(capacity)),
            Arc::new(MemLayout::new(capacity)),
            o,
        ));
        let t0 = std::time::Instant::now();
        std::thread::scope(|s| {
            for q in 0..4u64 {
                let tee = tee.clone();
                s.spawn(move || {
                    let mut r = Rng::new(q);
                    let data = pattern(q, 4096);
                    for _ in 0..WRITES / 4 {
                        let b = r.below(capacity.0 / 8);
                        tee.write(Sector(b * 8), &data).expect("write");
                    }
                });
            }
        });
        tee.drain();
        let el = t0.elapsed();
        let usage = tee.journal().map(|j| j.usage());
        eprintln!(
            "journal {:?}: {WRITES} writes of 4 KiB on 4 threads in {el:?}: {:.0} writes/s, {:.1} µs each; journal holds {usage:?} (entries, bytes)",
            journal.map(|l| (l.requests, l.bytes)),
            WRITES as f64 / el.as_secs_f64(),
            el.as_secs_f64() * 1e6 / WRITES as f64
        );
    }
}
