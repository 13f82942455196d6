//! The Tee under every policy × every fault: what reaches the guest and the trusted version,
//! which events and counters appear, and that nothing is quarantined without a fault.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use dovetail_layout::fault::FaultLayout;
use dovetail_layout::{BlockLayout, MemLayout, Sector, Sectors};
use dovetail_migrate::presence::PresenceMap;
use dovetail_migrate::{EventKind, Policy, Tee, TeeOptions};

const CAP: Sectors = Sectors(2048); // 1 MiB: 256 blocks, one lazy piece
const FAULTS: [Option<&str>; 8] = [
    None,
    Some("flip-read"),
    Some("stale-read"),
    Some("misdirect-write"),
    Some("drop-write"),
    Some("eio:nth=3"),
    Some("panic:nth=3"),
    Some("write-outside:nth=2"),
];

/// What the guest saw during the workload.
#[derive(Debug, Default)]
struct Outcome {
    /// Bytes of reads that differed from what the guest had written (the trusted state).
    wrong_read_bytes: u64,
    refused_writes: u64,
    /// What the guest wrote and was told succeeded.
    guest: Vec<u8>,
    /// The same, had every read returned the right data (copies take the model's bytes).
    correct: Vec<u8>,
}

fn write(tee: &Tee, o: &mut Outcome, at: u64, data: &[u8], correct: &[u8], policy: Policy) {
    // barrier-writes-async lets writes that arrive after the quarantine through, whatever the
    // application read before: the model follows the guest for those.
    let after_quarantine = tee.quarantined();
    match tee.write(Sector(at), data) {
        Ok(()) => {
            apply(&mut o.guest, at, data);
            apply(
                &mut o.correct,
                at,
                if after_quarantine { data } else { correct },
            );
        }
        Err(e) => {
            assert_eq!(policy, Policy::BarrierWritesAsync, "write refused: {e}");
            o.refused_writes += 1;
        }
    }
}

fn read(tee: &Tee, o: &mut Outcome, at: u64, sectors: u64) -> Vec<u8> {
    let mut buf = vec![0u8; (sectors * 512) as usize];
    tee.read(Sector(at), &mut buf).expect("read");
    let s = (at * 512) as usize;
    o.wrong_read_bytes += diff(&buf, &o.guest[s..s + buf.len()]);
    buf
}

/// Fill the disk; then rounds of partial writes, reads, copies (read then write what was read)
/// and flushes; then drain and read everything back.
fn workload(tee: &Tee, policy: Policy) -> Outcome {
    let bytes = (CAP.0 * 512) as usize;
    let mut o = Outcome {
        guest: vec![0; bytes],
        correct: vec![0; bytes],
        ..Outcome::default()
    };
    for i in 0..16u64 {
        let d = pattern(i, 64 << 10);
        write(tee, &mut o, i * 128, &d, &d.clone(), policy);
    }
    tee.flush().expect("flush");
    for round in 0..4u64 {
        let d = pattern(100 + round, 3 * 512);
        write(tee, &mut o, round * 37 + 5, &d, &d.clone(), policy);
        read(tee, &mut o, round * 64, 32);
        // A copy: what the guest writes derives from what it read.
        let src = 200 + round * 8;
        let data = read(tee, &mut o, src, 8);
        let right = o.correct[(src * 512) as usize..((src + 8) * 512) as usize].to_vec();
        write(tee, &mut o, 1000 + round * 8, &data, &right, policy);
        tee.flush().expect("flush");
    }
    tee.drain();
    for i in 0..16u64 {
        read(tee, &mut o, i * 128, 128);
    }
    tee.flush().expect("flush");
    o
}

fn kinds(tee: &Tee) -> Vec<EventKind> {
    tee.events().iter().map(|e| e.kind).collect()
}

fn check(policy: Policy, rule: Option<&str>) {
    let r = rig(policy, CAP, rule, |o| {
        o.lazy_interval = Duration::from_millis(5);
        o.lazy_region = 1 << 20;
    });
    let quarantined_at = Arc::new(AtomicU64::new(0));
    let callbacks = Arc::new(AtomicU64::new(0));
    {
        let q = quarantined_at.clone();
        let c = callbacks.clone();
        let probe = r.probe.clone();
        r.tee.on_quarantine(Box::new(move |ev| {
            assert_eq!(ev.kind, EventKind::Quarantined);
            q.store(probe.ops(), Ordering::SeqCst);
            c.fetch_add(1, Ordering::SeqCst);
        }));
    }
    let o = workload(&r.tee, policy);
    let name = format!("{policy} × {}", rule.unwrap_or("no fault"));
    let kind = rule.map(|r| r.split(':').next().unwrap_or(r));
    let data_fault = matches!(
        kind,
        Some("flip-read" | "stale-read" | "misdirect-write" | "drop-write")
    );
    let error_fault = rule.is_some() && !data_fault;

    // Lazy hashes find data faults in the background: give the job time.
    if policy == Policy::LazyHashes && data_fault {
        assert!(
            wait_for(Duration::from_secs(10), || r.tee.quarantined()),
            "{name}: lazy job did not catch the fault"
        );
    }
    let c = r.tee.counters();
    let ev = kinds(&r.tee);

    // The trusted version has exactly what the guest was told was written.
    assert!(
        r.trusted.snapshot() == o.guest,
        "{name}: trusted differs from the guest's writes"
    );

    // Exposure.
    match policy {
        Policy::SyncCrossChecks
        | Policy::SyncReadChecks
        | Policy::AsyncOldPrimary
        | Policy::LazyHashes
        | Policy::MirrorOnly => {
            assert_eq!(
                o.wrong_read_bytes, 0,
                "{name}: wrong bytes reached the guest"
            );
            assert_eq!(o.refused_writes, 0, "{name}");
        }
        Policy::BarrierWritesAsync => {
            // Bad reads may reach the application, never the trusted version.
            assert!(
                o.guest == o.correct,
                "{name}: data derived from a bad read reached the trusted version"
            );
        }
        Policy::AsyncNewPrimary => {
            // Errors may reach the guest and the disk; the trusted version still got every
            // acknowledged write (checked above) and nothing was refused.
            assert_eq!(o.refused_writes, 0, "{name}");
        }
    }
    if policy != Policy::BarrierWritesAsync && policy != Policy::AsyncNewPrimary || !data_fault {
        assert_eq!(
            o.wrong_read_bytes, 0,
            "{name}: wrong bytes reached the guest"
        );
    }
    if !data_fault || policy != Policy::BarrierWritesAsync {
        assert_eq!(o.refused_writes, 0, "{name}: writes refused");
    }

    // Quarantine: on every fault a policy can see, never without one.
    let expect_quarantine = error_fault || (data_fault && policy != Policy::MirrorOnly);
    assert_eq!(
        r.tee.quarantined(),
        expect_quarantine,
        "{name}: quarantine; events {ev:?}, counters {c:?}"
    );
    if expect_quarantine {
        assert_eq!(c.quarantines, 1, "{name}");
        assert!(ev.contains(&EventKind::Quarantined), "{name}: {ev:?}");
        assert_eq!(callbacks.load(Ordering::SeqCst), 1, "{name}: callbacks");
        let cause = match kind {
            Some("eio") => EventKind::CandidateError,
            Some("panic") => EventKind::CandidatePanic,
            Some("write-outside") => EventKind::GrantRefused,
            _ if policy == Policy::LazyHashes => EventKind::LazyMismatch,
            _ => EventKind::Mismatch,
        };
        assert!(ev.contains(&cause), "{name}: no {cause:?} in {ev:?}");
        match cause {
            EventKind::CandidateError => assert!(c.candidate_errors >= 1, "{name}"),
            EventKind::CandidatePanic => assert!(c.candidate_panics >= 1, "{name}"),
            EventKind::GrantRefused => assert!(c.grant_refusals >= 1, "{name}"),
            _ => assert!(c.mismatches >= 1, "{name}"),
        }
        let q = r
            .tee
            .events()
            .into_iter()
            .find(|e| e.kind == EventKind::Quarantined)
            .expect("event");
        assert_eq!(q.disk, "vda");
        assert_eq!(q.policy, policy);
        // From now on the candidate gets no I/O at all.
        let before = r.probe.ops();
        let d = pattern(999, 8192);
        r.tee.write(Sector(16), &d).expect("write after quarantine");
        let mut back = vec![0u8; 8192];
        r.tee
            .read(Sector(16), &mut back)
            .expect("read after quarantine");
        assert!(back == d, "{name}");
        r.tee.discard(Sector(64), Sectors(16)).expect("discard");
        r.tee.flush().expect("flush after quarantine");
        r.tee.drain();
        assert_eq!(
            r.probe.ops(),
            before,
            "{name}: candidate I/O after quarantine"
        );
        assert!(quarantined_at.load(Ordering::SeqCst) <= before);
    } else {
        assert_eq!(c.quarantines, 0, "{name}");
        assert_eq!(c.mismatches, 0, "{name}: {ev:?}");
        assert_eq!(callbacks.load(Ordering::SeqCst), 0);
        if rule.is_none() {
            // A good candidate ends up with exactly the guest's data.
            assert!(read_all(&*r.probe) == o.guest, "{name}: candidate differs");
            if policy.to_string() != "mirror-only" && policy != Policy::LazyHashes {
                assert!(c.compared_reads > 0, "{name}: nothing compared");
            }
        }
    }
    assert!(
        c.writes >= 24 && c.reads >= 24 && c.flushes >= 5,
        "{name}: {c:?}"
    );
    r.tee.close().expect("close");
}

macro_rules! matrix {
    ($($name:ident => $policy:expr,)*) => {$(
        #[test]
        fn $name() {
            for rule in FAULTS {
                check($policy, rule);
            }
        }
    )*};
}

matrix! {
    sync_cross_checks_under_every_fault => Policy::SyncCrossChecks,
    sync_read_checks_under_every_fault => Policy::SyncReadChecks,
    async_old_primary_under_every_fault => Policy::AsyncOldPrimary,
    barrier_writes_async_under_every_fault => Policy::BarrierWritesAsync,
    async_new_primary_under_every_fault => Policy::AsyncNewPrimary,
    lazy_hashes_under_every_fault => Policy::LazyHashes,
    mirror_only_under_every_fault => Policy::MirrorOnly,
}

/// Four threads write and read overlapping blocks; a good candidate is never quarantined and
/// ends up equal to the trusted version.
#[test]
fn concurrent_overlapping_writers_cause_no_false_positive() {
    for policy in Policy::ALL {
        let cap = Sectors(512); // 64 blocks, so threads collide often
        let trusted = Arc::new(MemLayout::new(cap));
        let cand = Arc::new(MemLayout::new(cap));
        let tee = Arc::new(tee_over(
            trusted.clone(),
            cand.clone(),
            TeeOptions::new("vdb", policy),
        ));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let tee = tee.clone();
                std::thread::spawn(move || {
                    let mut rng = Rng::new(t + 1);
                    for i in 0..400u64 {
                        let at = rng.below(480);
                        let len = 1 + rng.below(32);
                        match rng.below(10) {
                            0..=4 => {
                                let d = pattern(t * 10_000 + i, (len * 512) as usize);
                                tee.write(Sector(at), &d).expect("write");
                            }
                            5..=7 => {
                                let mut b = vec![0u8; (len * 512) as usize];
                                tee.read(Sector(at), &mut b).expect("read");
                            }
                            8 => tee
                                .write_zeroes(Sector(at), Sectors(len), false)
                                .expect("zeroes"),
                            _ => tee.flush().expect("flush"),
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        tee.drain();
        let c = tee.counters();
        assert!(
            !tee.quarantined(),
            "{policy}: false positive: {:?}",
            tee.events()
        );
        assert_eq!(c.mismatches, 0, "{policy}");
        // Every block written through the Tee is identical in both versions.
        let (t, k) = (trusted.snapshot(), cand.snapshot());
        for b in 0..(cap.0 * 512 / 4096) {
            if tee.presence().contains(b) {
                let r = (b * 4096) as usize..((b + 1) * 4096) as usize;
                assert!(t[r.clone()] == k[r], "{policy}: block {b} differs");
            }
        }
        tee.close().expect("close");
    }
}

/// barrier-writes-async: a write after a bad read is refused and reaches neither version; the
/// application did get the candidate's (bad) answer; later writes proceed on the trusted.
#[test]
fn barrier_refuses_the_write_after_a_bad_read() {
    // The trusted version is slow to read, so the write below arrives while the check of the
    // read before it is still running (and must wait for it at the barrier).
    let t = Arc::new(MemLayout::new(CAP));
    let mut slow = Probe::new(t.clone());
    slow.read_delay = Some(Duration::from_millis(100));
    let (space, cand) = parallax(CAP);
    let rules = vec!["flip-read".parse().expect("rule")];
    let fault = Arc::new(FaultLayout::new(cand, rules, 3).with_space(space));
    let blocks = CAP.0 * 512 / 4096;
    let tee = Tee::new(
        Arc::new(slow),
        fault,
        Arc::new(PresenceMap::in_memory(blocks)),
        TeeOptions::new("vda", Policy::BarrierWritesAsync),
    )
    .expect("tee");
    let d = pattern(1, 8192);
    tee.write(Sector(0), &d).expect("first write");
    let mut back = vec![0u8; 8192];
    tee.read(Sector(0), &mut back).expect("read");
    assert!(back != d, "the candidate answered (with a flipped bit)");
    let before = t.snapshot();
    let err = tee.write(Sector(100), &back).expect_err("refused");
    assert!(err.to_string().contains("write"), "{err}");
    assert!(
        t.snapshot() == before,
        "the refused write reached the trusted version"
    );
    assert!(tee.quarantined());
    let ev = kinds(&tee);
    assert!(
        ev.contains(&EventKind::Mismatch) && ev.contains(&EventKind::BarrierRefusedWrite),
        "{ev:?}"
    );
    assert_eq!(tee.counters().barrier_refused_writes, 1);
    // After the quarantine: the trusted version alone, writes proceed.
    tee.write(Sector(100), &d).expect("write after quarantine");
    tee.read(Sector(0), &mut back).expect("read");
    assert!(back == d);
    tee.close().expect("close");
}

/// Switching policies in the middle of a workload loses nothing and raises nothing.
#[test]
fn set_policy_between_requests_keeps_versions_identical() {
    let cap = Sectors(1024);
    let trusted = Arc::new(MemLayout::new(cap));
    let cand = Arc::new(MemLayout::new(cap));
    let tee = tee_over(
        trusted.clone(),
        cand.clone(),
        TeeOptions::new("vdc", Policy::MirrorOnly),
    );
    let mut model = vec![0u8; 1024 * 512];
    let mut rng = Rng::new(5);
    let rx = tee.subscribe();
    for (i, p) in Policy::ALL.iter().cycle().take(21).enumerate() {
        tee.set_policy(*p).expect("set policy");
        assert_eq!(tee.policy(), *p);
        for j in 0..20u64 {
            let at = rng.below(1000);
            let len = 1 + rng.below(24);
            let d = pattern((i as u64) << 32 | j, (len * 512) as usize);
            tee.write(Sector(at), &d).expect("write");
            apply(&mut model, at, &d);
            let at = rng.below(1000);
            let mut b = vec![0u8; 24 * 512];
            tee.read(Sector(at), &mut b).expect("read");
            assert!(
                b[..] == model[(at * 512) as usize..(at as usize + 24) * 512],
                "{p}"
            );
        }
    }
    tee.drain();
    assert!(!tee.quarantined(), "{:?}", tee.events());
    assert!(trusted.snapshot() == model);
    let changes = rx
        .try_iter()
        .filter(|e| e.kind == EventKind::PolicyChanged)
        .count();
    assert_eq!(changes, 21);
    tee.close().expect("close");
}

#[test]
fn versions_of_different_capacity_are_refused() {
    let t = Arc::new(MemLayout::new(Sectors(64)));
    let c = Arc::new(MemLayout::new(Sectors(72)));
    let presence = Arc::new(dovetail_migrate::presence::PresenceMap::in_memory(8));
    let err =
        Tee::new(t, c, presence, TeeOptions::new("vdd", Policy::MirrorOnly)).expect_err("refused");
    assert!(err.to_string().contains("candidate"), "{err}");
}

/// A manual quarantine runs the callbacks once and emits one event; a slow subscriber loses
/// events (counted) without blocking I/O.
#[test]
fn manual_quarantine_and_bounded_subscribers() {
    let cap = Sectors(64);
    let tee = tee_over(
        Arc::new(MemLayout::new(cap)),
        Arc::new(MemLayout::new(cap)),
        TeeOptions::new("vde", Policy::SyncCrossChecks),
    );
    let _slow = tee.subscribe();
    for _ in 0..1100 {
        tee.set_policy(Policy::MirrorOnly).expect("set");
        tee.set_policy(Policy::SyncCrossChecks).expect("set");
    }
    assert!(tee.counters().events_dropped > 0);
    assert_eq!(tee.events().len(), 256);
    tee.quarantine("operator said so");
    tee.quarantine("again");
    assert!(tee.quarantined());
    assert_eq!(tee.counters().quarantines, 1);
    let last = tee.events().pop().expect("event");
    assert_eq!(last.kind, EventKind::Quarantined);
    assert!(last.message.contains("operator said so"));
    let json = serde_json::to_string(&last).expect("json");
    assert!(json.contains("\"kind\":\"quarantined\""), "{json}");
}
