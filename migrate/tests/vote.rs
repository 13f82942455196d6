//! The N-version Tee ([`VotingTee`]): a proptest model of 3..=5 members, one of them faulty,
//! against a reference disk under every policy; the fault matrix of a 3-member Tee (every
//! fault in one member under every policy); two faulty members on one block (no majority);
//! membership changes and promote readiness.

mod common;

use std::sync::Arc;

use common::*;
use dovetail_layout::fault::FaultLayout;
use dovetail_layout::{BlockLayout, MemLayout, Sector, Sectors};
use dovetail_migrate::presence::PresenceMap;
use dovetail_migrate::{EventKind, Policy, TeeOptions, VotingTee};
use proptest::prelude::*;

const CAP: u64 = 131; // sectors: 16 blocks and a partial one
const BLOCKS: u64 = 17;

/// One member: its base layout (read directly to check what it holds) under a fault layer.
struct M {
    base: Arc<dyn BlockLayout>,
    fault: Arc<FaultLayout>,
}

/// Member `i` of a rig: 0 in memory, 1 parallax-v1, 2 parallax-v2, the others in memory;
/// `rule` (if any) in its fault layer.
fn member(i: usize, cap: Sectors, rule: Option<&str>, seed: u64) -> M {
    let rules = rule
        .map(|r| vec![r.parse().expect("fault rule")])
        .unwrap_or_default();
    let (base, space): (
        Arc<dyn BlockLayout>,
        Option<Arc<dovetail_store::mem::MemSpace>>,
    ) = match i {
        1 => {
            let (s, d) = parallax(cap);
            (d, Some(s))
        }
        2 => {
            let (s, d) = parallax_of("parallax-v2", cap);
            (d, Some(s))
        }
        _ => (Arc::new(MemLayout::new(cap)), None),
    };
    let mut f = FaultLayout::new(base.clone(), rules, seed + i as u64);
    if let Some(s) = space {
        f = f.with_space(s);
    }
    M {
        base,
        fault: Arc::new(f),
    }
}

/// A voting Tee over `n` members; `faults[i]` is member `i`'s rule. Every candidate holds every
/// block (all zero, like the trusted one).
fn rig(n: usize, policy: Policy, cap: Sectors, faults: &[(usize, &str)]) -> (VotingTee, Vec<M>) {
    let ms: Vec<M> = (0..n)
        .map(|i| {
            let rule = faults.iter().find(|(k, _)| *k == i).map(|(_, r)| *r);
            member(i, cap, rule, 11)
        })
        .collect();
    let blocks = (cap.0 * 512).div_ceil(4096);
    let cands = ms[1..]
        .iter()
        .map(|m| {
            let p = Arc::new(PresenceMap::in_memory(blocks));
            p.insert_range(0, blocks);
            (m.fault.clone() as Arc<dyn BlockLayout>, p)
        })
        .collect();
    let mut o = TeeOptions::new("vdv", policy);
    o.lazy_interval = std::time::Duration::from_millis(20);
    let tee = VotingTee::new(ms[0].fault.clone(), cands, o).expect("voting tee");
    // Every other rig of a thread writes its members in parallel (these members answer from
    // memory, so by default they would be written one after another): the faults, the
    // matrix and the model cover both ways of writing.
    RIGS.with(|n| {
        n.set(n.get() + 1);
        if n.get() % 2 == 0 {
            tee.set_parallel_min(std::time::Duration::ZERO);
        }
    });
    (tee, ms)
}

thread_local! {
    static RIGS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn contents(l: &dyn BlockLayout) -> Vec<u8> {
    let mut v = vec![0u8; (l.capacity().0 * 512) as usize];
    l.read(Sector(0), &mut v).expect("read member");
    v
}

/// Which member answers guest reads without a vote first under `p` (`None`: the majority).
fn answerer(p: Policy) -> Option<usize> {
    match p {
        Policy::SyncCrossChecks | Policy::SyncReadChecks => None,
        Policy::BarrierWritesAsync | Policy::AsyncNewPrimary => Some(1),
        _ => Some(0),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Read(u64, u64),
    Write(u64, u64, u64),
    Zeroes(u64, u64),
    Flush,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..CAP).prop_flat_map(|at| (Just(at), 1..=(CAP - at).min(24)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => range().prop_map(|(a, n)| Op::Read(a, n)),
        4 => (range(), any::<u64>()).prop_map(|((a, n), s)| Op::Write(a, n, s)),
        1 => range().prop_map(|(a, n)| Op::Zeroes(a, n)),
        1 => Just(Op::Flush),
    ]
}

const FAULTS: [&str; 9] = [
    "flip-read:prob=0.3",
    "stale-read:prob=0.5",
    "misdirect-write:prob=0.3",
    "drop-write:prob=0.3",
    "eio:prob=0.1",
    "eio:prob=0.2,op=write",
    "panic:nth=7",
    "write-outside:nth=3",
    "flip-read",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// N members, one faulty (any of them, the trusted one included), random requests: reads
    /// equal the model wherever the answering member is not the faulty one (always under the
    /// synchronous policies); after a final scrub every healthy member holds exactly the model,
    /// no healthy member ever lost a vote or was quarantined.
    #[test]
    fn n_members_with_one_faulty_match_the_reference_disk(
        n in 3usize..=5,
        policy in prop::sample::select(Policy::ALL.to_vec()),
        faulty in 0usize..5,
        fault in prop::sample::select(FAULTS.to_vec()),
        ops in prop::collection::vec(op(), 1..50),
    ) {
        let faulty = faulty % n;
        // write-outside needs a member on a store space (1 or 2).
        let faulty = if fault.starts_with("write-outside") { 1 + faulty % 2 } else { faulty };
        let (tee, ms) = rig(n, policy, Sectors(CAP), &[(faulty, fault)]);
        let exposed = answerer(policy) == Some(faulty);
        let mut model = vec![0u8; (CAP * 512) as usize];
        for op in &ops {
            match *op {
                Op::Read(a, k) => {
                    let mut b = vec![0u8; (k * 512) as usize];
                    let r = tee.read(Sector(a), &mut b);
                    if !exposed {
                        prop_assert!(r.is_ok(), "{:?}: {:?}", op, r);
                        prop_assert!(b[..] == model[(a * 512) as usize..((a + k) * 512) as usize],
                            "{:?}: wrong bytes to the guest", op);
                    }
                }
                Op::Write(a, k, s) => {
                    let d = pattern(s, (k * 512) as usize);
                    match tee.write(Sector(a), &d) {
                        Ok(()) => apply(&mut model, a, &d),
                        Err(e) => prop_assert!(
                            exposed && policy == Policy::BarrierWritesAsync,
                            "{:?}: write failed: {}", op, e
                        ),
                    }
                }
                Op::Zeroes(a, k) => {
                    match tee.write_zeroes(Sector(a), Sectors(k), false) {
                        Ok(()) => apply(&mut model, a, &vec![0u8; (k * 512) as usize]),
                        Err(e) => prop_assert!(
                            exposed && policy == Policy::BarrierWritesAsync,
                            "{:?}: write-zeroes failed: {}", op, e
                        ),
                    }
                }
                Op::Flush => prop_assert!(tee.flush().is_ok(), "flush failed"),
            }
        }
        tee.drain();
        tee.scrub();
        let st = tee.members();
        for (i, m) in ms.iter().enumerate() {
            if i == faulty {
                continue;
            }
            prop_assert!(!st[i].quarantined, "healthy member {} quarantined: {:?}", i, tee.events());
            prop_assert_eq!(st[i].votes_lost, 0, "healthy member {} lost a vote", i);
            prop_assert!(contents(&*m.base) == model, "healthy member {} differs from the model", i);
        }
        prop_assert_eq!(tee.counters().no_majority, 0);
        prop_assert!(tee.disputed().is_empty());
        // A reading of the whole disk through the Tee under a synchronous policy is the model.
        tee.set_policy(Policy::SyncReadChecks);
        let mut all = vec![0u8; (CAP * 512) as usize];
        tee.read(Sector(0), &mut all).expect("final read");
        prop_assert!(all == model, "final read differs from the model");
        tee.close().expect("close");
    }
}

/// The outcome of one cell of the fault matrix.
#[derive(Debug, Default)]
struct Cell {
    wrong_bytes: u64,
    guest_errors: u64,
    votes_lost: u64,
    repairs: u64,
    quarantined: bool,
    healthy_ok: bool,
}

/// A 3-member Tee, `rule` in member `faulty`, under `policy`: every block written, read
/// twice, drained and scrubbed.
fn cell(policy: Policy, faulty: usize, rule: &str) -> Cell {
    let cap = Sectors(CAP);
    let (tee, ms) = rig(3, policy, cap, &[(faulty, rule)]);
    tee.set_lose_threshold(4);
    let mut model = vec![0u8; (CAP * 512) as usize];
    let mut out = Cell::default();
    for b in 0..BLOCKS {
        let at = b * 8;
        let k = (CAP - at).min(8);
        let d = pattern(b + 1, (k * 512) as usize);
        match tee.write(Sector(at), &d) {
            Ok(()) => apply(&mut model, at, &d),
            Err(_) => out.guest_errors += 1,
        }
    }
    for _ in 0..2 {
        for b in 0..BLOCKS {
            let at = b * 8;
            let k = (CAP - at).min(8);
            let mut buf = vec![0u8; (k * 512) as usize];
            match tee.read(Sector(at), &mut buf) {
                Ok(()) => out.wrong_bytes += diff(&buf, &model[(at * 512) as usize..][..buf.len()]),
                Err(_) => out.guest_errors += 1,
            }
        }
        tee.drain();
    }
    tee.scrub();
    let c = tee.counters();
    let st = tee.members();
    out.votes_lost = c.votes_lost;
    out.repairs = c.repairs;
    out.quarantined = st[faulty].quarantined;
    out.healthy_ok = (0..3)
        .filter(|&i| i != faulty)
        .all(|i| !st[i].quarantined && st[i].votes_lost == 0 && contents(&*ms[i].base) == model);
    tee.close().expect("close");
    out
}

const MATRIX: [&str; 7] = [
    "flip-read",
    "stale-read",
    "misdirect-write",
    "drop-write",
    "eio",
    "panic",
    "write-outside",
];

fn matrix_for(faulty: usize) {
    let mut table = String::new();
    for policy in Policy::ALL {
        for rule in MATRIX {
            let c = cell(policy, faulty, rule);
            table.push_str(&format!(
                "| {policy} | {rule} | {} | {} | {} | {} | {} |\n",
                c.wrong_bytes, c.guest_errors, c.votes_lost, c.repairs, c.quarantined
            ));
            let name = format!("member {faulty} {rule} under {policy}");
            assert!(c.healthy_ok, "{name}: a healthy member was hurt: {c:?}");
            // Promised: 0 wrong bytes whenever the answering member is sound.
            if answerer(policy) != Some(faulty) {
                assert_eq!(c.wrong_bytes, 0, "{name}: {c:?}");
                assert_eq!(c.guest_errors, 0, "{name}: {c:?}");
            }
            // Every fault is out-voted: repaired or the member quarantined. (stale-read only
            // differs after a member's own overwrite: the matrix writes each block once.)
            if rule != "stale-read" && policy != Policy::MirrorOnly || rule == "panic" {
                assert!(
                    c.quarantined || c.repairs > 0,
                    "{name}: neither repaired nor quarantined: {c:?}"
                );
            }
            if matches!(rule, "panic" | "write-outside") {
                assert!(c.quarantined, "{name}: {c:?}");
            }
        }
    }
    eprintln!(
        "| policy | fault (member {faulty}) | wrong bytes | guest errors | votes lost | repairs | quarantined |\n| --- | --- | --- | --- | --- | --- | --- |\n{table}"
    );
}

#[test]
fn fault_matrix_three_members_fault_in_a_candidate() {
    matrix_for(2);
}

#[test]
fn fault_matrix_three_members_fault_in_the_trusted_member() {
    matrix_for(0);
}

/// Two members faulty on one block (different bit flips): no majority, the trusted member's
/// data is returned, the block is marked disputed and a no-majority event names it.
#[test]
fn two_faulty_members_on_one_block_take_the_no_majority_path() {
    let cap = Sectors(CAP);
    let ms: Vec<M> = (0..3)
        .map(|i| {
            member(
                i,
                cap,
                (i > 0).then_some("flip-read:sector=16"),
                100 * i as u64,
            )
        })
        .collect();
    let cands = ms[1..]
        .iter()
        .map(|m| {
            let p = Arc::new(PresenceMap::in_memory(BLOCKS));
            p.insert_range(0, BLOCKS);
            (m.fault.clone() as Arc<dyn BlockLayout>, p)
        })
        .collect();
    let tee = VotingTee::new(
        ms[0].fault.clone(),
        cands,
        TeeOptions::new("vdn", Policy::SyncReadChecks),
    )
    .expect("tee");
    let d = pattern(5, 4096);
    tee.write(Sector(16), &d).expect("write");
    let mut b = vec![0u8; 4096];
    tee.read(Sector(16), &mut b).expect("read");
    assert_eq!(b, d, "the trusted member's data is returned");
    assert_eq!(tee.disputed(), vec![2]);
    let c = tee.counters();
    assert_eq!(c.no_majority, 1);
    assert_eq!(c.repairs, 0, "nothing is repaired without a majority");
    let ev = tee
        .events()
        .into_iter()
        .find(|e| e.kind == EventKind::NoMajority)
        .expect("no-majority event");
    assert_eq!(ev.block, Some(2));
    assert!(ev.message.contains("no majority"), "{}", ev.message);
    // The other blocks still vote normally.
    tee.read(Sector(0), &mut b).expect("read block 0");
    assert_eq!(tee.counters().votes_lost, 0);
}

/// A minority's block is rewritten from the majority, with an event naming the member, the
/// block and the first differing byte; past the threshold the member is quarantined.
#[test]
fn the_minority_is_repaired_and_a_persistent_loser_quarantined() {
    let (tee, ms) = rig(3, Policy::SyncReadChecks, Sectors(CAP), &[]);
    let d = pattern(9, 4096);
    tee.write(Sector(24), &d).expect("write");
    // Member 2 silently corrupts block 3 below the Tee.
    let mut bad = d.clone();
    bad[777] ^= 0x40;
    ms[2].base.write(Sector(24), &bad).expect("corrupt");
    let mut b = vec![0u8; 4096];
    tee.read(Sector(24), &mut b).expect("read");
    assert_eq!(b, d);
    let ev = tee
        .events()
        .into_iter()
        .find(|e| e.kind == EventKind::Outvoted)
        .expect("outvoted event");
    assert_eq!(
        (ev.member, ev.block, ev.first_difference),
        (Some(2), Some(3), Some(777))
    );
    assert!(tee
        .events()
        .iter()
        .any(|e| e.kind == EventKind::Repaired && e.member == Some(2)));
    assert_eq!(
        contents(&*ms[2].base)[24 * 512..][..4096],
        d[..],
        "repaired in place"
    );
    assert_eq!(tee.members()[2].repairs, 1);
    assert!(!tee.quarantined(2));
    // Keep corrupting: past the threshold the member is quarantined.
    tee.set_lose_threshold(2);
    for _ in 0..3 {
        ms[2].base.write(Sector(24), &bad).expect("corrupt");
        tee.read(Sector(24), &mut b).expect("read");
        assert_eq!(b, d);
    }
    assert!(tee.quarantined(2), "{:?}", tee.members());
    assert!(!tee.quarantined(0) && !tee.quarantined(1));
    // The trusted member can be out-voted and repaired too.
    ms[0].base.write(Sector(24), &bad).expect("corrupt trusted");
    tee.read(Sector(24), &mut b).expect("read");
    // 1-1 between trusted and member 1: no majority, the trusted member answers.
    assert_eq!(b, bad);
    assert_eq!(tee.disputed(), vec![3]);
}

/// Members join and leave between requests; a new member is filled from the majority and may
/// then be promoted; the trusted member may leave once member 1 holds every block.
#[test]
fn members_join_fill_and_leave() {
    let (tee, _ms) = rig(3, Policy::SyncCrossChecks, Sectors(CAP), &[]);
    let d = pattern(3, (CAP * 512) as usize);
    tee.write(Sector(0), &d).expect("write");
    let newcomer = Arc::new(MemLayout::new(Sectors(CAP)));
    let p = Arc::new(PresenceMap::in_memory(BLOCKS));
    let i = tee.add_member(newcomer.clone(), p).expect("add");
    assert_eq!((i, tee.len()), (3, 4));
    assert!(!tee.complete(3));
    // A whole-block write makes its block present in the newcomer.
    let w = pattern(4, 4096);
    tee.write(Sector(8), &w).expect("write");
    assert_eq!(tee.members()[3].held_blocks, 1);
    assert_eq!(tee.fill(3).expect("fill"), BLOCKS - 1);
    assert!(tee.complete(3));
    let mut want = d.clone();
    want[4096..8192].copy_from_slice(&w);
    assert_eq!(newcomer.snapshot(), want);
    // Five at most.
    tee.add_member(
        Arc::new(MemLayout::new(Sectors(CAP))),
        Arc::new(PresenceMap::in_memory(BLOCKS)),
    )
    .expect("fifth");
    let err = tee
        .add_member(
            Arc::new(MemLayout::new(Sectors(CAP))),
            Arc::new(PresenceMap::in_memory(BLOCKS)),
        )
        .expect_err("sixth");
    assert!(err.to_string().contains("at most 5"), "{err}");
    // Remove the trusted member: member 1 holds every block and becomes trusted.
    tee.remove_member(0).expect("remove trusted");
    tee.remove_member(3).expect("remove the fifth");
    assert_eq!(tee.len(), 3);
    let mut all = vec![0u8; want.len()];
    tee.read(Sector(0), &mut all).expect("read");
    assert_eq!(all, want);
    assert!(tee.remove_member(7).is_err());
    assert!(tee
        .events()
        .iter()
        .any(|e| e.kind == EventKind::MemberRemoved && e.member == Some(0)));
    assert_eq!(tee.counters().votes_lost, 0);
}

/// Wrong sizes and member counts are refused with clear messages.
#[test]
fn new_refuses_bad_member_sets() {
    let t: Arc<dyn BlockLayout> = Arc::new(MemLayout::new(Sectors(CAP)));
    let mk = |cap: u64, blocks: u64| {
        (
            Arc::new(MemLayout::new(Sectors(cap))) as Arc<dyn BlockLayout>,
            Arc::new(PresenceMap::in_memory(blocks)),
        )
    };
    let e = VotingTee::new(t.clone(), vec![], TeeOptions::new("x", Policy::MirrorOnly))
        .expect_err("one member");
    assert!(e.to_string().contains("2 to 5 members"), "{e}");
    let e = VotingTee::new(
        t.clone(),
        (0..5).map(|_| mk(CAP, BLOCKS)).collect(),
        TeeOptions::new("x", Policy::MirrorOnly),
    )
    .expect_err("six members");
    assert!(e.to_string().contains("not 6"), "{e}");
    let e = VotingTee::new(
        t.clone(),
        vec![mk(CAP, BLOCKS), mk(CAP + 8, BLOCKS)],
        TeeOptions::new("x", Policy::MirrorOnly),
    )
    .expect_err("capacity");
    assert!(e.to_string().contains("member 2 has"), "{e}");
    let e = VotingTee::new(
        t,
        vec![mk(CAP, 3)],
        TeeOptions::new("x", Policy::MirrorOnly),
    )
    .expect_err("presence");
    assert!(e.to_string().contains("presence map has 3 blocks"), "{e}");
}

/// Presence maps on files: a flush persists what each candidate holds; a clean close marks the
/// maps clean. A map left unclean (a crash) makes its member's lost votes repaired without
/// blame until the resync has voted on every block; then they count again.
#[test]
fn presence_maps_persist_and_an_unclean_member_is_resynced_without_blame() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cap = Sectors(CAP);
    let layouts: Vec<Arc<MemLayout>> = (0..3).map(|_| Arc::new(MemLayout::new(cap))).collect();
    let open_maps = || -> Vec<Arc<PresenceMap>> {
        (1..3u64)
            .map(|k| {
                Arc::new(
                    PresenceMap::open_or_create(&dir.path().join(format!("{k}.map")), BLOCKS, k)
                        .expect("map"),
                )
            })
            .collect()
    };
    let mk = |maps: Vec<Arc<PresenceMap>>| {
        let cands = layouts[1..]
            .iter()
            .zip(maps)
            .map(|(l, p)| (l.clone() as Arc<dyn BlockLayout>, p))
            .collect();
        let mut o = TeeOptions::new("vdp", Policy::SyncReadChecks);
        o.lazy_interval = std::time::Duration::from_millis(10);
        VotingTee::new(layouts[0].clone(), cands, o).expect("tee")
    };
    // First run: write two blocks and flush; a crash (no close) leaves the maps unclean.
    let tee = mk(open_maps());
    let d = pattern(7, 8192);
    tee.write(Sector(0), &d).expect("write");
    tee.flush().expect("flush");
    drop(tee);
    let maps = open_maps();
    assert!(maps.iter().all(|m| !m.was_clean() && m.count() == 2));
    // Member 2 missed the last write before the crash: it differs on block 1.
    let mut stale = d.clone();
    stale[4096 + 10] ^= 1;
    layouts[2]
        .write(Sector(8), &stale[4096..])
        .expect("diverge");
    let tee = mk(maps);
    tee.set_lose_threshold(0);
    // The resync runs on the lazy thread first: member 2 repaired, not quarantined.
    let t0 = std::time::Instant::now();
    while tee.counters().repairs == 0 && t0.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(tee.counters().repairs, 1, "{:?}", tee.events());
    assert!(!tee.quarantined(2), "{:?}", tee.members());
    assert_eq!(tee.members()[2].votes_lost, 0, "no blame during the resync");
    assert_eq!(layouts[2].snapshot()[..8192], d[..], "repaired in place");
    let t0 = std::time::Instant::now();
    while !tee.events().iter().any(|e| e.kind == EventKind::Resynced)
        && t0.elapsed() < std::time::Duration::from_secs(5)
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Settled: the next difference counts (threshold 0: quarantined at once).
    layouts[2]
        .write(Sector(8), &stale[4096..])
        .expect("diverge again");
    let mut b = vec![0u8; 4096];
    tee.read(Sector(8), &mut b).expect("read");
    assert_eq!(b[..], d[4096..]);
    assert!(tee.quarantined(2));
    tee.close().expect("close");
    // Member 1 was closed cleanly; member 2 was quarantined and its map left as it was.
    let maps = open_maps();
    assert!(maps[0].was_clean());
    assert_eq!(maps[0].count(), 2);
}

/// Any member holding every block can be promoted to trusted member 0: it then answers the
/// trusted member's reads and wins a tie; an incomplete one is refused. Quarantines reach the
/// `on_quarantine` callbacks with the member named.
#[test]
fn a_complete_member_is_promoted_and_quarantines_are_reported() {
    let (tee, ms) = rig(3, Policy::AsyncOldPrimary, Sectors(CAP), &[]);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    tee.on_quarantine(Box::new(move |ev| s2.lock().expect("lock").push(ev.member)));
    let d = pattern(11, 4096);
    tee.write(Sector(0), &d).expect("write");
    let late = tee
        .add_member(
            Arc::new(MemLayout::new(Sectors(CAP))),
            Arc::new(PresenceMap::in_memory(BLOCKS)),
        )
        .expect("add");
    let err = tee.promote(late).expect_err("incomplete");
    assert!(
        err.to_string().contains("does not hold every block"),
        "{err}"
    );
    tee.promote(2).expect("promote member 2");
    assert!(tee
        .events()
        .iter()
        .any(|e| e.kind == EventKind::MemberPromoted));
    // Member 2's layout is now member 0: under async-old-primary it answers reads, so a
    // difference planted in it alone reaches the guest, then loses the vote and is repaired.
    let mut bad = d.clone();
    bad[100] ^= 1;
    ms[2].base.write(Sector(0), &bad).expect("plant");
    let mut b = vec![0u8; 4096];
    tee.read(Sector(0), &mut b).expect("read");
    assert_eq!(b, bad, "the promoted member answered");
    tee.drain();
    assert_eq!(tee.members()[0].votes_lost, 1);
    assert_eq!(
        contents(&*ms[2].base)[..4096],
        d[..],
        "repaired from the majority"
    );
    tee.quarantine(1, "test").expect("quarantine");
    assert_eq!(*seen.lock().expect("lock"), vec![Some(1)]);
    tee.close().expect("close");
}

/// What no live member holds is never answered nor acknowledged: a read of it fails instead
/// of returning whatever the buffer held, and a partial write whose only holder failed fails
/// although the candidates (which lack the rest of the block) took it.
#[test]
fn blocks_no_live_member_holds_are_errors_not_answers() {
    let ms: Vec<M> = (0..3)
        .map(|i| member(i, Sectors(CAP), (i == 0).then_some("eio:op=write"), 5))
        .collect();
    let cands = ms[1..]
        .iter()
        .map(|m| {
            (
                m.fault.clone() as Arc<dyn BlockLayout>,
                Arc::new(PresenceMap::in_memory(BLOCKS)),
            )
        })
        .collect();
    let tee = VotingTee::new(
        ms[0].fault.clone(),
        cands,
        TeeOptions::new("vdh", Policy::SyncReadChecks),
    )
    .expect("tee");
    let err = tee
        .write(Sector(1), &pattern(1, 512))
        .expect_err("only the failed trusted member holds block 0");
    let msg = dovetail_layout::error_chain(&err);
    assert!(msg.contains("holding every block"), "{msg}");
    // A whole-block write is held by the candidates that took it: acknowledged.
    let d = pattern(2, 4096);
    tee.write(Sector(8), &d).expect("whole block");
    let mut b = vec![0xaau8; 4096];
    tee.read(Sector(8), &mut b).expect("read");
    assert_eq!(b, d);
    tee.quarantine(0, "test")
        .expect("quarantine the trusted member");
    let mut b = vec![0xaau8; 4096];
    let err = tee
        .read(Sector(16), &mut b)
        .expect_err("block 2 is held by nobody live");
    let msg = dovetail_layout::error_chain(&err);
    assert!(msg.contains("no live member"), "{msg}");
    tee.close().expect("close");
}

/// A member whose reads take 1 ms.
#[derive(Debug)]
struct Slow(MemLayout);

impl BlockLayout for Slow {
    fn capacity(&self) -> Sectors {
        self.0.capacity()
    }
    fn read(&self, at: Sector, buf: &mut [u8]) -> dovetail_layout::Result<()> {
        std::thread::sleep(std::time::Duration::from_millis(1));
        self.0.read(at, buf)
    }
    fn write(&self, at: Sector, buf: &[u8]) -> dovetail_layout::Result<()> {
        self.0.write(at, buf)
    }
    fn flush(&self) -> dovetail_layout::Result<()> {
        self.0.flush()
    }
    fn discard(&self, at: Sector, len: Sectors) -> dovetail_layout::Result<()> {
        self.0.discard(at, len)
    }
    fn write_zeroes(&self, at: Sector, len: Sectors, unmap: bool) -> dovetail_layout::Result<()> {
        self.0.write_zeroes(at, len, unmap)
    }
}

/// Background votes are bounded: with a slow member, reads of the same blocks wait for room in
/// the vote budget (and do not deadlock against the worker, which takes their stripes), and
/// every vote still runs.
#[test]
fn background_votes_are_bounded_by_the_budget() {
    let slow = Arc::new(Slow(MemLayout::new(Sectors(CAP))));
    let cands = (0..2)
        .map(|k| {
            let p = Arc::new(PresenceMap::in_memory(BLOCKS));
            p.insert_range(0, BLOCKS);
            let l: Arc<dyn BlockLayout> = if k == 0 {
                slow.clone()
            } else {
                Arc::new(MemLayout::new(Sectors(CAP)))
            };
            (l, p)
        })
        .collect();
    let tee = VotingTee::new(
        Arc::new(MemLayout::new(Sectors(CAP))),
        cands,
        TeeOptions::new("vdb", Policy::AsyncOldPrimary),
    )
    .expect("tee");
    tee.set_vote_budget(16);
    let mut b = vec![0u8; 8 * 4096];
    for _ in 0..60 {
        tee.read(Sector(0), &mut b).expect("read");
    }
    tee.drain();
    let c = tee.counters();
    assert!(c.votes_queued_peak <= 16, "{c:?}");
    assert!(c.votes_queued_peak >= 8, "{c:?}");
    assert_eq!(c.blocks_voted, 60 * 8, "every vote ran: {c:?}");
    tee.close().expect("close");
}

#[derive(Debug, Clone)]
enum MOp {
    Io(Op),
    Add,
    Remove(usize),
    Fill(usize),
    Promote(usize),
}

fn mop() -> impl Strategy<Value = MOp> {
    prop_oneof![
        8 => op().prop_map(MOp::Io),
        1 => Just(MOp::Add),
        1 => (0usize..5).prop_map(MOp::Remove),
        1 => (0usize..5).prop_map(MOp::Fill),
        1 => (0usize..5).prop_map(MOp::Promote),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Sound members joining (empty), filled, promoted and leaving between random requests:
    /// every read is the reference disk, no member ever loses a vote (a member must never
    /// vote on a block it does not hold), and at the end every member that holds every block
    /// holds exactly the reference.
    #[test]
    fn membership_changes_between_requests_keep_the_reference_disk(
        policy in prop::sample::select(Policy::ALL.to_vec()),
        ops in prop::collection::vec(mop(), 1..60),
    ) {
        let (tee, _ms) = rig(3, policy, Sectors(CAP), &[]);
        let mut layouts: Vec<Arc<dyn BlockLayout>> =
            (0..3).map(|i| tee.member(i).expect("member")).collect();
        let mut model = vec![0u8; (CAP * 512) as usize];
        for op in &ops {
            match op {
                MOp::Io(Op::Read(a, k)) => {
                    let mut b = vec![0u8; (*k * 512) as usize];
                    tee.read(Sector(*a), &mut b).expect("read");
                    prop_assert!(b[..] == model[(*a * 512) as usize..((*a + *k) * 512) as usize],
                        "{:?}: wrong bytes", op);
                }
                MOp::Io(Op::Write(a, k, s)) => {
                    let d = pattern(*s, (*k * 512) as usize);
                    tee.write(Sector(*a), &d).expect("write");
                    apply(&mut model, *a, &d);
                }
                MOp::Io(Op::Zeroes(a, k)) => {
                    tee.write_zeroes(Sector(*a), Sectors(*k), false).expect("zeroes");
                    apply(&mut model, *a, &vec![0u8; (*k * 512) as usize]);
                }
                MOp::Io(Op::Flush) => tee.flush().expect("flush"),
                MOp::Add => {
                    let l = Arc::new(MemLayout::new(Sectors(CAP)));
                    match tee.add_member(l.clone(), Arc::new(PresenceMap::in_memory(BLOCKS))) {
                        Ok(i) => {
                            prop_assert_eq!(i, layouts.len());
                            layouts.push(l);
                        }
                        Err(_) => prop_assert_eq!(layouts.len(), 5),
                    }
                }
                MOp::Remove(i) => {
                    let i = i % layouts.len();
                    if tee.remove_member(i).is_ok() {
                        layouts.remove(i);
                    }
                }
                MOp::Fill(i) => {
                    tee.fill(i % layouts.len()).expect("fill");
                }
                MOp::Promote(i) => {
                    let i = i % layouts.len();
                    if tee.promote(i).is_ok() {
                        layouts.swap(0, i);
                    }
                }
            }
            prop_assert_eq!(tee.len(), layouts.len());
        }
        tee.drain();
        tee.scrub();
        let st = tee.members();
        prop_assert_eq!(tee.counters().votes_lost, 0, "{:?}", tee.events());
        for (i, l) in layouts.iter().enumerate() {
            prop_assert!(!st[i].quarantined);
            if tee.complete(i) {
                prop_assert!(contents(&**l) == model, "member {} differs", i);
            }
        }
        tee.close().expect("close");
    }
}

/// The writes of a [`Meeting`] pair of members: how many each received, the writes that
/// waited out the timeout for the other, and each member's log of writes in arrival order.
#[derive(Debug, Default)]
struct Board {
    arrived: std::sync::Mutex<[u64; 3]>,
    cv: std::sync::Condvar,
    missed: std::sync::atomic::AtomicU64,
    /// Per member, the writes that ran on one of the Tee's writer threads.
    on_writer: std::sync::Mutex<[u64; 3]>,
    log: std::sync::Mutex<[Vec<(u64, usize, u64)>; 3]>,
}

/// Member `side` of a Tee whose writes are logged and, with `meet`, wait until member
/// `3 - side` (the other candidate) received as many writes: members written one after
/// another wait out the timeout (counted in `missed`), members written in parallel meet.
#[derive(Debug)]
struct Meeting {
    inner: MemLayout,
    side: usize,
    meet: bool,
    /// How long each write takes (a device's latency).
    delay: std::time::Duration,
    board: Arc<Board>,
}

const MEET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl BlockLayout for Meeting {
    fn capacity(&self) -> Sectors {
        self.inner.capacity()
    }
    fn read(&self, at: Sector, buf: &mut [u8]) -> dovetail_layout::Result<()> {
        self.inner.read(at, buf)
    }
    fn write(&self, at: Sector, buf: &[u8]) -> dovetail_layout::Result<()> {
        let tag = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        let b = &self.board;
        if std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("vote-w-"))
        {
            b.on_writer.lock().expect("lock")[self.side] += 1;
        }
        b.log.lock().expect("lock")[self.side].push((at.0, buf.len(), tag));
        let mut a = b.arrived.lock().expect("lock");
        a[self.side] += 1;
        let n = a[self.side];
        b.cv.notify_all();
        if self.meet {
            let other = 3 - self.side;
            let (a, t) =
                b.cv.wait_timeout_while(a, MEET_TIMEOUT, |a| a[other] < n)
                    .expect("lock");
            drop(a);
            if t.timed_out() {
                b.missed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        std::thread::sleep(self.delay);
        self.inner.write(at, buf)
    }
    fn flush(&self) -> dovetail_layout::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, at: Sector, len: Sectors) -> dovetail_layout::Result<()> {
        self.inner.discard(at, len)
    }
    fn write_zeroes(&self, at: Sector, len: Sectors, unmap: bool) -> dovetail_layout::Result<()> {
        self.inner.write_zeroes(at, len, unmap)
    }
}

/// A 3-member Tee over [`Meeting`] members (member 0 logs only).
fn meeting_rig(
    policy: Policy,
    meet: bool,
    parallel_min: Option<std::time::Duration>,
    delay: std::time::Duration,
) -> (VotingTee, Vec<Arc<Meeting>>, Arc<Board>) {
    let board = Arc::new(Board::default());
    let ms: Vec<Arc<Meeting>> = (0..3)
        .map(|side| {
            Arc::new(Meeting {
                inner: MemLayout::new(Sectors(CAP)),
                side,
                meet: meet && side > 0,
                delay,
                board: board.clone(),
            })
        })
        .collect();
    let cands = ms[1..]
        .iter()
        .map(|m| {
            let p = Arc::new(PresenceMap::in_memory(BLOCKS));
            p.insert_range(0, BLOCKS);
            (m.clone() as Arc<dyn BlockLayout>, p)
        })
        .collect();
    let tee = VotingTee::new(ms[0].clone(), cands, TeeOptions::new("vdp", policy)).expect("tee");
    if let Some(d) = parallel_min {
        tee.set_parallel_min(d);
    }
    (tee, ms, board)
}

/// A write reaches the members at once: each candidate's write waits for the other's to
/// arrive, which members written one after another never do (the first would wait out the
/// timeout). Under a plain and a verifying policy, full blocks and a partial one.
#[test]
fn a_write_reaches_the_members_in_parallel() {
    for policy in [Policy::MirrorOnly, Policy::SyncCrossChecks] {
        let (tee, ms, board) = meeting_rig(
            policy,
            true,
            Some(std::time::Duration::ZERO),
            std::time::Duration::ZERO,
        );
        let t0 = std::time::Instant::now();
        for (k, (at, n)) in [(0u64, 8u64), (24, 16), (3, 1), (120, 11)]
            .into_iter()
            .enumerate()
        {
            let data = pattern(100 + k as u64, (n * 512) as usize);
            tee.write(Sector(at), &data).expect("write");
        }
        tee.flush().expect("flush");
        let took = t0.elapsed();
        assert_eq!(
            board.missed.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "{policy}: a candidate's write waited {MEET_TIMEOUT:?} for the other's"
        );
        assert!(took < MEET_TIMEOUT, "{policy}: four writes took {took:?}");
        assert_eq!(*board.arrived.lock().expect("lock"), [4, 4, 4], "{policy}");
        // Member 0 (the first live one) is written on the request's thread.
        assert_eq!(
            *board.on_writer.lock().expect("lock"),
            [0, 4, 4],
            "{policy}"
        );
        let want = contents(&*ms[0]);
        for m in &ms[1..] {
            assert_eq!(diff(&contents(&**m), &want), 0, "{policy}");
        }
        let c = tee.counters();
        assert_eq!(
            (c.votes_lost, c.member_errors, c.quarantines),
            (0, 0, 0),
            "{c:?}"
        );
        tee.close().expect("close");
    }
}

/// Overlapping writes from four threads reach every member in the same order (the logs of
/// the three members are identical, write for write), and the members end identical.
#[test]
fn overlapping_writes_reach_every_member_in_the_same_order() {
    let (tee, ms, board) = meeting_rig(
        Policy::MirrorOnly,
        false,
        Some(std::time::Duration::ZERO),
        std::time::Duration::ZERO,
    );
    let tee = Arc::new(tee);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let tee = tee.clone();
            std::thread::spawn(move || {
                let mut r = common::Rng::new(t + 7);
                for k in 0..150u64 {
                    // Every write covers sector 16 (block 2), from somewhere in blocks 0..=2
                    // to somewhere in blocks 2..=4.
                    let at = r.next_u64() % 17;
                    let n = 17 - at + r.next_u64() % 24;
                    let data = pattern(t << 32 | k, (n * 512) as usize);
                    tee.write(Sector(at), &data).expect("write");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer thread");
    }
    let logs = board.log.lock().expect("lock").clone();
    assert_eq!(logs[0].len(), 600);
    assert_eq!(logs[1], logs[0], "member 1 saw the writes in another order");
    assert_eq!(logs[2], logs[0], "member 2 saw the writes in another order");
    let want = contents(&*ms[0]);
    for m in &ms[1..] {
        assert_eq!(diff(&contents(&**m), &want), 0);
    }
    assert_eq!(tee.counters().votes_lost, 0);
    tee.close().expect("close");
}

/// A write goes to the members in parallel only when their recent write times say
/// it saves time: members answering from memory are written one after another on the
/// request's thread; members whose writes take 20 ms (a slow device) are written in parallel
/// from the second write on (the first, sequential, measured them) under the default
/// threshold.
#[test]
fn writes_go_parallel_when_the_members_are_slow() {
    // (A threshold of 5 ms rather than the default: a debug build on a loaded machine may
    // stall a member's write now and then, which a production threshold may well follow.)
    let fast = Some(std::time::Duration::from_millis(5));
    let (tee, _ms, board) = meeting_rig(Policy::MirrorOnly, false, fast, std::time::Duration::ZERO);
    for k in 0..20u64 {
        tee.write(Sector(k % 16 * 8), &pattern(k, 4096))
            .expect("write");
    }
    assert_eq!(*board.on_writer.lock().expect("lock"), [0, 0, 0]);
    tee.close().expect("close");

    let (tee, _ms, board) = meeting_rig(
        Policy::MirrorOnly,
        false,
        None,
        std::time::Duration::from_millis(20),
    );
    for k in 0..4u64 {
        tee.write(Sector(k * 8), &pattern(k, 4096)).expect("write");
    }
    assert_eq!(*board.on_writer.lock().expect("lock"), [0, 3, 3]);
    tee.close().expect("close");
}
