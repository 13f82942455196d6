//! Divergence bisection of a voting Tee of three members (`dovetail_migrate::bisect_members`):
//! seeded runs of guest requests through a Tee whose member 2 (under a `FaultLayout`) drops or
//! misdirects every write to one sector, first written by request K; the bisection must name
//! request K and member 2, confirmed against fresh members, and the reference model must side
//! with the two good members.

mod common;

use std::sync::{Arc, Mutex};

use common::{parallax, pattern, Rng};
use dovetail_layout::fault::{FaultLayout, FaultRule};
use dovetail_layout::{BlockLayout, MemLayout, Sector, Sectors};
use dovetail_migrate::bisect_members::{self, MembersReport};
use dovetail_migrate::journal::JournalLimits;
use dovetail_migrate::mapfile::MapsDir;
use dovetail_migrate::presence::PresenceMap;
use dovetail_migrate::{EventKind, Policy, TeeOptions, VotingTee};

const CAPACITY: Sectors = Sectors(4 << 11); // 4 MiB
const BLOCKS: u64 = CAPACITY.0 / 8;
const REQUESTS: usize = 1_200;

/// Fresh members: 0 in memory, 1 parallax-v1, 2 in memory under `rule`.
fn members(rule: &FaultRule) -> Vec<Arc<dyn BlockLayout>> {
    let (_, v1) = parallax(CAPACITY);
    let faulty = FaultLayout::new(Arc::new(MemLayout::new(CAPACITY)), vec![rule.clone()], 7);
    vec![Arc::new(MemLayout::new(CAPACITY)), v1, Arc::new(faulty)]
}

fn voting(m: Vec<Arc<dyn BlockLayout>>, policy: Policy) -> VotingTee {
    let cands = m[1..]
        .iter()
        .map(|l| {
            let p = Arc::new(PresenceMap::in_memory(BLOCKS));
            p.insert_range(0, BLOCKS);
            (l.clone(), p)
        })
        .collect();
    let mut o = TeeOptions::new("bis3", policy);
    o.journal = Some(JournalLimits::requests(REQUESTS + 16));
    VotingTee::new(m[0].clone(), cands, o).expect("voting tee")
}

/// Runs `REQUESTS` seeded requests; the poisoned block is first touched by request `k` (an
/// index, so journal sequence number `k + 1`). Returns (k, block).
fn run(tee: &VotingTee, seed: u64, sector: u64) -> usize {
    let block = sector / 8;
    let mut r = Rng::new(seed);
    let k = 200 + r.below(800) as usize;
    for i in 0..REQUESTS {
        if i == k {
            tee.write(Sector(block * 8), &pattern(seed ^ 0xabc, 4096))
                .expect("write k");
            continue;
        }
        let roll = r.below(100);
        let (at, len) = loop {
            let b = r.below(BLOCKS);
            let off = r.below(8);
            let len = 1 + r.below(8 - off);
            // Before k nothing touches the poisoned block nor its neighbours (where a
            // misdirected write lands); after it, anything goes.
            if i > k || b + 1 < block || b > block + 1 {
                break (b * 8 + off, len);
            }
        };
        let _ = match roll {
            0..=74 => tee.write(
                Sector(at),
                &pattern(seed ^ (i as u64) << 20, (len * 512) as usize),
            ),
            75..=84 => tee.write_zeroes(Sector(at), Sectors(len), roll % 2 == 0),
            85..=89 => tee.discard(Sector(at), Sectors(len)),
            _ => tee.flush(),
        };
    }
    k
}

fn check(report: &MembersReport, k: usize, block: u64) {
    let first = report.first_bad.as_ref().expect("a request is named");
    assert_eq!(first.seq, k as u64 + 1, "{}", report.verdict);
    assert_eq!(report.block, block);
    assert_eq!(report.diverged, vec![2], "{}", report.verdict);
    assert!(report.confirmed, "{}", report.verdict);
    let after = report.after.as_ref().expect("views after");
    assert_eq!(after.outside, vec![2]);
    assert_eq!(after.reference_agrees_with.as_deref(), Some(&[0, 1][..]));
    assert!(after.majority.is_some());
    assert_eq!(after.members[0], after.members[1]);
    assert_ne!(after.members[0], after.members[2]);
    assert_eq!(report.members, 3);
}

#[test]
fn bisection_names_the_request_that_put_the_faulty_member_outside_the_majority() {
    for (seed, kind) in [(1u64, "drop-write"), (2, "misdirect-write")] {
        let mut r = Rng::new(seed * 977);
        let block = 8 + r.below(BLOCKS - 16);
        let sector = block * 8 + r.below(8);
        let rule: FaultRule = format!("{kind}:sector={sector}").parse().expect("rule");
        // mirror-only: no vote repairs the live member, so its divergence stays.
        let tee = voting(members(&rule), Policy::MirrorOnly);
        let k = run(&tee, seed, sector);
        let fresh = || Ok(members(&rule));
        let dir = tempfile::tempdir().expect("tempdir");
        let maps = MapsDir::open(dir.path()).expect("dir");
        let saved = Mutex::new(None);
        let save = |rep: &MembersReport| -> Result<String, String> {
            let name = bisect_members::report_name(rep);
            bisect_members::write_report(&maps, &name, rep).map_err(|e| e.to_string())?;
            *saved.lock().expect("lock") = Some(name.clone());
            Ok(name)
        };
        // The block and the member named.
        let report = tee
            .bisect(Some(block), Some(2), &fresh, Some(&save))
            .expect("bisect");
        check(&report, k, block);
        assert_eq!(report.block_from, "given");
        // The live members: member 2 is the one outside the majority.
        assert_eq!(
            report.live.as_ref().map(|v| v.outside.clone()),
            Some(vec![2])
        );
        // The report file holds what was returned.
        let name = saved.lock().expect("lock").clone().expect("saved");
        let text = std::fs::read_to_string(dir.path().join(name)).expect("report file");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(json["first_bad"]["seq"], k as u64 + 1);
        assert_eq!(json["diverged"][0], 2);
        // A bisected event names the member, the block and the request.
        let ev = tee
            .events()
            .into_iter()
            .rev()
            .find(|e| e.kind == EventKind::Bisected)
            .expect("bisected event");
        assert_eq!(
            (ev.member, ev.block, ev.request.map(|q| q.seq)),
            (Some(2), Some(block), Some(k as u64 + 1))
        );
        // A member that never left the majority: no request named.
        let none = tee
            .bisect(Some(block), Some(1), &fresh, None)
            .expect("bisect");
        assert!(none.first_bad.is_none(), "{}", none.verdict);
        assert!(!none.confirmed);
        tee.close().expect("close");
    }
}

#[test]
fn with_no_block_named_the_first_lost_vote_chooses_block_and_member() {
    let seed = 5;
    let mut r = Rng::new(seed * 977);
    let block = 8 + r.below(BLOCKS - 16);
    let sector = block * 8 + r.below(8);
    let rule: FaultRule = format!("drop-write:sector={sector}").parse().expect("rule");
    let tee = voting(members(&rule), Policy::SyncReadChecks);
    let k = run(&tee, seed, sector);
    // A guest read of the block: member 2 loses the vote (an outvoted event names it).
    let mut buf = vec![0; 4096];
    tee.read(Sector(block * 8), &mut buf).expect("read");
    assert!(tee
        .events()
        .iter()
        .any(|e| e.kind == EventKind::Outvoted && e.block == Some(block) && e.member == Some(2)));
    let fresh = || Ok(members(&rule));
    let report = tee.bisect(None, None, &fresh, None).expect("bisect");
    assert_eq!(report.block_from, "event");
    assert_eq!(report.member, Some(2));
    check(&report, k, block);
    // Too many members from the factory: refused, not a wrong answer.
    let four = || {
        let mut m = members(&rule);
        m.push(Arc::new(MemLayout::new(CAPACITY)));
        Ok(m)
    };
    let e = tee
        .bisect(Some(block), None, &four, None)
        .expect_err("refused");
    assert!(e.contains("4 members"), "{e}");
    // A member the Tee does not have: refused.
    let e = tee
        .bisect(Some(block), Some(3), &fresh, None)
        .expect_err("refused");
    assert!(e.contains("member 3: the tee has 3 members"), "{e}");
    tee.close().expect("close");
}
