//! The fault-injecting wrapper: every kind does exactly what it says to the data and to the disk
//! beneath, rules parse and print back, conditions (`op`, `nth`, `after`, `sector`, `prob`) count
//! as documented, and a seed replays the same faults.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use common::pattern;
use dovetail_layout::fault::{
    parse_rules, FaultKind, FaultLayout, FaultOp, FaultRule, FaultRuleError, FaultRuleProblem,
    STALE_BLOCKS,
};
use dovetail_layout::{BlockLayout, Error, MemLayout, Parallax, Sector, Sectors};
use dovetail_store::mem::{MemPool, MemSpace};
use dovetail_store::{ExtentId, StoreError, VersionKey, VersionSpace};

const CAPACITY: Sectors = Sectors(1024);

fn rule(s: &str) -> FaultRule {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// A `MemLayout` filled with a pattern, and a fault layout over it with `rules`.
fn setup(rules: &[&str], seed: u64) -> (Arc<MemLayout>, FaultLayout) {
    setup_with(CAPACITY, rules, seed)
}

fn setup_with(capacity: Sectors, rules: &[&str], seed: u64) -> (Arc<MemLayout>, FaultLayout) {
    let mem = Arc::new(MemLayout::new(capacity));
    mem.write(Sector(0), &pattern(1, (capacity.0 * 512) as usize))
        .expect("fill");
    let f = FaultLayout::new(mem.clone(), rules.iter().map(|s| rule(s)).collect(), seed);
    (mem, f)
}

fn read(d: &dyn BlockLayout, at: u64, sectors: usize) -> Vec<u8> {
    let mut buf = vec![0u8; sectors * 512];
    d.read(Sector(at), &mut buf)
        .unwrap_or_else(|e| panic!("read at {at}: {e}"));
    buf
}

fn bytes(disk: &[u8], at: u64, sectors: u64) -> &[u8] {
    &disk[(at * 512) as usize..((at + sectors) * 512) as usize]
}

/// Number of bits that differ.
fn bit_diff(a: &[u8], b: &[u8]) -> u32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
}

fn assert_eio(r: dovetail_layout::Result<()>, op: &str) {
    match r {
        Err(Error::Io {
            op: got,
            path,
            source,
        }) => {
            assert_eq!(got, op);
            assert!(path.contains("fault injection"), "{path}");
            assert_eq!(source.raw_os_error(), Some(libc::EIO));
        }
        other => panic!("expected EIO on {op}, got {other:?}"),
    }
}

/// Whether the `n` operations of `op` (0-based index) failed.
fn failures(f: &FaultLayout, n: usize, op: impl Fn(&FaultLayout, usize) -> bool) -> Vec<bool> {
    (0..n).map(|i| op(f, i)).collect()
}

fn read_fails(f: &FaultLayout, i: usize) -> bool {
    let mut buf = [0u8; 512];
    f.read(Sector(i as u64 % CAPACITY.0), &mut buf).is_err()
}

// ---------------------------------------------------------------------------------------------
// Parsing and printing
// ---------------------------------------------------------------------------------------------

#[test]
fn the_documented_examples_parse_and_print_back_unchanged() {
    for s in [
        "flip-read",
        "flip-read:prob=0.01",
        "flip-read:sector=2048",
        "stale-read",
        "misdirect-write:offset=16",
        "drop-write:prob=0.5",
        "eio:nth=5,op=write",
        "panic:nth=3",
        "write-outside:nth=1",
        "eio:after=100,op=flush",
        "panic:op=write-zeroes",
        "eio:op=discard",
        "eio:op=read",
        "misdirect-write:offset=3,nth=2,after=1,sector=7,prob=0.125",
    ] {
        let r = rule(s);
        assert_eq!(r.to_string(), s, "canonical form of {s}");
        assert_eq!(
            r.to_string().parse::<FaultRule>(),
            Ok(r),
            "round trip of {s}"
        );
    }
    let r = rule("eio:nth=5,op=write");
    assert_eq!(r.kind, FaultKind::Eio);
    assert_eq!(r.op, FaultOp::Write);
    assert_eq!(r.nth, Some(5));
    assert_eq!(rule("misdirect-write").offset, 8);
    for kind in FaultKind::ALL {
        let r = FaultRule::new(kind);
        assert_eq!(r.to_string(), kind.name());
        assert_eq!(rule(kind.name()), r);
    }
}

#[test]
fn non_canonical_rules_print_in_canonical_form_and_round_trip() {
    for (given, canonical) in [
        ("eio:op=write,nth=5", "eio:nth=5,op=write"),
        ("  eio : op = any , prob = 1.0  ", "eio"),
        ("flip-read:op=read", "flip-read"),
        ("drop-write:prob=0.50", "drop-write:prob=0.5"),
        ("drop-write:prob=1e-2", "drop-write:prob=0.01"),
        ("stale-read:after=0", "stale-read"),
        ("misdirect-write:offset=8", "misdirect-write"),
        ("panic:prob=0,sector=+5", "panic:sector=5,prob=0"),
        ("eio:sector=9,after=2,nth=3", "eio:nth=3,after=2,sector=9"),
    ] {
        let r = rule(given);
        assert_eq!(r.to_string(), canonical, "{given}");
        assert_eq!(rule(canonical), r, "{given}");
    }
}

#[test]
fn every_parse_error_names_the_problem() {
    use dovetail_store::rules::SyntaxProblem as S;
    use FaultRuleProblem as P;
    let cases: Vec<(&str, FaultRuleProblem, &str)> = vec![
        ("", P::Syntax(S::Empty), "empty"),
        ("   ", P::Syntax(S::Empty), "empty"),
        ("bogus", P::UnknownKind("bogus".into()), "\"bogus\""),
        ("Flip-Read", P::UnknownKind("Flip-Read".into()), "Flip-Read"),
        (":nth=1", P::UnknownKind("".into()), "unknown fault kind"),
        ("eio:", P::Syntax(S::NoParams), "nothing follows"),
        ("eio:nth=1,", P::Syntax(S::EmptyParam), "empty parameter"),
        ("eio:,nth=1", P::Syntax(S::EmptyParam), "empty parameter"),
        (
            "eio:nth",
            P::Syntax(S::NotKeyValue("nth".into())),
            "\"nth\"",
        ),
        (
            "eio:color=red",
            P::Syntax(S::UnknownKey {
                key: "color".into(),
                known: &["op", "prob", "sector", "nth", "after", "offset"],
            }),
            "\"color\"",
        ),
        (
            "eio:nth=1,nth=2",
            P::Syntax(S::DuplicateKey("nth")),
            "twice",
        ),
        ("eio:nth=", P::Syntax(S::MissingValue("nth")), "no value"),
        (
            "eio:nth=five",
            P::Syntax(S::BadValue {
                key: "nth",
                value: "five".into(),
                expected: "a count of 1 or more",
            }),
            "\"five\"",
        ),
        (
            "eio:nth=-1",
            P::Syntax(S::BadValue {
                key: "nth",
                value: "-1".into(),
                expected: "a count of 1 or more",
            }),
            "\"-1\"",
        ),
        (
            "eio:sector=1.5",
            P::Syntax(S::BadValue {
                key: "sector",
                value: "1.5".into(),
                expected: "a sector number",
            }),
            "sector",
        ),
        (
            "eio:after=x",
            P::Syntax(S::BadValue {
                key: "after",
                value: "x".into(),
                expected: "a count",
            }),
            "after",
        ),
        (
            "misdirect-write:offset=far",
            P::Syntax(S::BadValue {
                key: "offset",
                value: "far".into(),
                expected: "a number of sectors, 1 or more",
            }),
            "\"far\"",
        ),
        (
            "eio:prob=half",
            P::Syntax(S::BadValue {
                key: "prob",
                value: "half".into(),
                expected: "a probability between 0 and 1",
            }),
            "\"half\"",
        ),
        (
            "eio:nth=99999999999999999999999",
            P::Syntax(S::BadValue {
                key: "nth",
                value: "99999999999999999999999".into(),
                expected: "a count of 1 or more",
            }),
            "99999999999999999999999",
        ),
        (
            "eio:prob=1.5",
            P::Syntax(S::ProbOutOfRange("1.5".into())),
            "prob=1.5",
        ),
        (
            "eio:prob=-0.1",
            P::Syntax(S::ProbOutOfRange("-0.1".into())),
            "prob=-0.1",
        ),
        (
            "eio:prob=inf",
            P::Syntax(S::ProbOutOfRange("inf".into())),
            "prob=inf",
        ),
        (
            "eio:prob=NaN",
            P::Syntax(S::ProbOutOfRange("NaN".into())),
            "prob=NaN",
        ),
        ("panic:nth=0", P::Syntax(S::NthZero), "nth=0"),
        ("misdirect-write:offset=0", P::OffsetZero, "offset=0"),
        (
            "eio:offset=3",
            P::KeyNotForKind {
                key: "offset".into(),
                kind: FaultKind::Eio,
            },
            "\"offset\" does not apply to eio",
        ),
        (
            "drop-write:offset=3",
            P::KeyNotForKind {
                key: "offset".into(),
                kind: FaultKind::DropWrite,
            },
            "drop-write",
        ),
        ("eio:op=erase", P::UnknownOp("erase".into()), "\"erase\""),
        (
            "flip-read:op=write",
            P::OpNotForKind {
                kind: FaultKind::FlipRead,
                op: FaultOp::Write,
            },
            "op=write does not apply to flip-read",
        ),
        (
            "stale-read:op=any",
            P::OpNotForKind {
                kind: FaultKind::StaleRead,
                op: FaultOp::Any,
            },
            "stale-read",
        ),
        (
            "drop-write:op=read",
            P::OpNotForKind {
                kind: FaultKind::DropWrite,
                op: FaultOp::Read,
            },
            "op=write",
        ),
        (
            "misdirect-write:op=write-zeroes",
            P::OpNotForKind {
                kind: FaultKind::MisdirectWrite,
                op: FaultOp::WriteZeroes,
            },
            "misdirect-write",
        ),
        (
            "write-outside:op=flush",
            P::OpNotForKind {
                kind: FaultKind::WriteOutside,
                op: FaultOp::Flush,
            },
            "write-outside",
        ),
        (
            "eio:nth=2,after=5",
            P::Syntax(S::NeverHits { nth: 2, after: 5 }),
            "never hit",
        ),
    ];
    for (spec, expected, in_message) in cases {
        let err: FaultRuleError = match spec.parse::<FaultRule>() {
            Ok(r) => panic!("{spec:?} parsed as {r:?}"),
            Err(e) => e,
        };
        assert_eq!(err.spec, spec);
        assert_eq!(err.problem, expected, "{spec:?}");
        let msg = err.to_string();
        assert!(msg.contains(in_message), "{spec:?}: {msg}");
        assert!(
            msg.contains(&format!("{spec:?}")),
            "the message quotes the rule: {msg}"
        );
    }
}

#[test]
fn parse_rules_parses_all_or_reports_the_bad_one() {
    let specs: Vec<String> = ["flip-read:prob=0.01", "eio:nth=5,op=write"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let rules = parse_rules(&specs).expect("parse");
    assert_eq!(
        rules,
        vec![rule("flip-read:prob=0.01"), rule("eio:nth=5,op=write")]
    );
    assert_eq!(parse_rules(&[]), Ok(vec![]));
    let bad: Vec<String> = vec!["eio".into(), "eio:nth=0".into(), "bogus".into()];
    let err = parse_rules(&bad).expect_err("bad rule");
    assert_eq!(err.spec, "eio:nth=0");
    assert_eq!(
        err.problem,
        FaultRuleProblem::Syntax(dovetail_store::rules::SyntaxProblem::NthZero)
    );
}

#[test]
fn hand_built_rules_print_and_parse_back() {
    let mut r = FaultRule::new(FaultKind::MisdirectWrite);
    r.offset = 24;
    r.after = 3;
    r.prob = 0.75;
    r.check().expect("valid");
    assert_eq!(r.to_string(), "misdirect-write:offset=24,after=3,prob=0.75");
    assert_eq!(r.to_string().parse::<FaultRule>(), Ok(r));
}

// ---------------------------------------------------------------------------------------------
// Each kind
// ---------------------------------------------------------------------------------------------

#[test]
fn flip_read_flips_exactly_one_bit_and_leaves_the_disk_alone() {
    let (mem, f) = setup(&["flip-read"], 1);
    let disk = mem.snapshot();
    let mut positions = std::collections::BTreeSet::new();
    for i in 0..20u64 {
        let at = i * 17 % 1000;
        let got = read(&f, at, 16);
        let want = bytes(&disk, at, 16);
        assert_eq!(bit_diff(&got, want), 1, "read {i}");
        positions.insert((got.iter().zip(want).position(|(a, b)| a != b), at));
    }
    assert_eq!(positions.len(), 20);
    assert_eq!(mem.snapshot(), disk, "the disk beneath is untouched");
    assert_eq!(f.injected(), 20);
    assert_eq!(f.rule_hits(), vec![20]);
    // Writes are not affected.
    f.write(Sector(0), &[0xab; 512]).expect("write");
    assert_eq!(bytes(&mem.snapshot(), 0, 1), &[0xab; 512][..]);
}

#[test]
fn flip_read_with_a_sector_flips_a_bit_of_that_sector_only() {
    let (mem, f) = setup(&["flip-read:sector=100"], 2);
    let disk = mem.snapshot();
    // Reads not covering sector 100 are exact.
    assert_eq!(read(&f, 0, 100), bytes(&disk, 0, 100));
    assert_eq!(read(&f, 101, 50), bytes(&disk, 101, 50));
    assert_eq!(f.injected(), 0);
    for _ in 0..10 {
        let got = read(&f, 96, 8);
        let want = bytes(&disk, 96, 8);
        assert_eq!(bit_diff(&got, want), 1);
        let at = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .expect("a difference");
        assert_eq!(
            96 + at as u64 / 512,
            100,
            "the flipped bit is in sector 100"
        );
    }
    assert_eq!(f.injected(), 10);
}

#[test]
fn stale_read_returns_the_contents_before_the_latest_write() {
    let (mem, f) = setup(&["stale-read"], 3);
    let original = mem.snapshot();
    let (a, b) = (pattern(10, 8 * 512), pattern(11, 8 * 512));
    // Nothing written through the wrapper yet: reads are unaffected and not counted.
    assert_eq!(read(&f, 16, 8), bytes(&original, 16, 8));
    assert_eq!(f.injected(), 0);

    f.write(Sector(16), &a).expect("write a");
    assert_eq!(
        bytes(&mem.snapshot(), 16, 8),
        &a[..],
        "the write reached the disk"
    );
    assert_eq!(
        read(&f, 16, 8),
        bytes(&original, 16, 8),
        "before a: the original"
    );
    f.write(Sector(16), &b).expect("write b");
    assert_eq!(bytes(&mem.snapshot(), 16, 8), &b[..]);
    assert_eq!(read(&f, 16, 8), a, "before b: a");
    assert_eq!(f.injected(), 2);

    // A one-sector write remembers its whole 4 KiB block; a read wider than the remembered
    // blocks gets current data around them.
    let c = pattern(12, 512);
    f.write(Sector(43), &c).expect("write c");
    let now = mem.snapshot();
    let got = read(&f, 32, 24);
    assert_eq!(&got[..8 * 512], bytes(&now, 32, 8), "block 4 is current");
    assert_eq!(
        &got[8 * 512..16 * 512],
        bytes(&original, 40, 8),
        "block 5 is stale"
    );
    assert_eq!(&got[16 * 512..], bytes(&now, 48, 8), "block 6 is current");
    // Reads of unwritten blocks are still exact.
    assert_eq!(read(&f, 500, 8), bytes(&now, 500, 8));
    assert_eq!(f.injected(), 3);
}

#[test]
fn stale_read_forgets_the_oldest_blocks_beyond_the_bound() {
    let blocks = STALE_BLOCKS as u64 + 100;
    let (mem, f) = setup_with(Sectors(blocks * 8), &["stale-read"], 4);
    let original = mem.snapshot();
    // One write per block, oldest first: the first 100 are forgotten.
    let data = pattern(20, 4096);
    for b in 0..blocks {
        f.write(Sector(b * 8), &data).expect("write");
    }
    assert_eq!(read(&f, 0, 8), data, "block 0 forgotten: current contents");
    assert_eq!(read(&f, 99 * 8, 8), data, "block 99 forgotten");
    assert_eq!(
        read(&f, 100 * 8, 8),
        bytes(&original, 800, 8),
        "block 100 kept"
    );
    assert_eq!(
        read(&f, (blocks - 1) * 8, 8),
        bytes(&original, (blocks - 1) * 8, 8),
        "the newest block kept"
    );
}

#[test]
fn misdirect_write_lands_offset_sectors_further() {
    let (mem, f) = setup(&["misdirect-write"], 5);
    let before = mem.snapshot();
    let data = pattern(30, 4 * 512);
    f.write(Sector(100), &data).expect("acknowledged");
    let after = mem.snapshot();
    assert_eq!(bytes(&after, 100, 4), bytes(&before, 100, 4), "not at 100");
    assert_eq!(bytes(&after, 108, 4), &data[..], "at 108");
    let mut expected = before.clone();
    expected[108 * 512..112 * 512].copy_from_slice(&data);
    assert_eq!(after, expected, "nothing else changed");
    assert_eq!(f.injected(), 1);

    let (mem, f) = setup(&["misdirect-write:offset=16"], 5);
    f.write(Sector(0), &data).expect("acknowledged");
    assert_eq!(bytes(&mem.snapshot(), 16, 4), &data[..]);
}

#[test]
fn misdirect_write_wraps_around_and_is_clamped_to_fit() {
    let (mem, f) = setup(&["misdirect-write:offset=16"], 6);
    let data = pattern(31, 8 * 512);
    // 1016 + 16 wraps to 8.
    f.write(Sector(1016), &data).expect("wrapped");
    assert_eq!(bytes(&mem.snapshot(), 8, 8), &data[..]);
    // 1004 + 16 = 1020 does not fit 8 sectors: clamped to 1016.
    let data2 = pattern(32, 8 * 512);
    f.write(Sector(1004), &data2).expect("clamped");
    assert_eq!(bytes(&mem.snapshot(), 1016, 8), &data2[..]);
    assert_eq!(f.injected(), 2);
}

#[test]
fn drop_write_acknowledges_and_writes_nothing() {
    let (mem, f) = setup(&["drop-write"], 7);
    let before = mem.snapshot();
    f.write(Sector(10), &pattern(40, 64 * 512))
        .expect("acknowledged");
    f.write(Sector(0), &pattern(41, 512)).expect("acknowledged");
    assert_eq!(mem.snapshot(), before);
    assert_eq!(read(&f, 10, 64), bytes(&before, 10, 64));
    assert_eq!(f.injected(), 2);
    // Other operations go through.
    f.write_zeroes(Sector(0), Sectors(8), false)
        .expect("zeroes");
    assert_eq!(bytes(&mem.snapshot(), 0, 8), &[0u8; 4096][..]);
}

#[test]
fn eio_fails_every_operation_and_touches_nothing() {
    let (mem, f) = setup(&["eio"], 8);
    let before = mem.snapshot();
    let mut buf = vec![0x55u8; 512];
    assert_eio(f.read(Sector(0), &mut buf), "read");
    assert_eq!(buf, vec![0x55u8; 512], "the buffer is untouched");
    assert_eio(f.write(Sector(0), &[1; 512]), "write");
    assert_eio(f.flush(), "flush");
    assert_eio(f.discard(Sector(0), Sectors(8)), "discard");
    assert_eio(f.write_zeroes(Sector(0), Sectors(8), true), "write-zeroes");
    assert_eq!(mem.snapshot(), before);
    assert_eq!(f.injected(), 5);
    let err = f.flush().expect_err("eio");
    let msg = dovetail_layout::error_chain(&err);
    assert!(msg.contains("rule `eio`"), "{msg}");
}

#[test]
fn eio_op_selects_the_operations() {
    for (op, fails) in [
        ("read", [true, false, false, false, false]),
        ("write", [false, true, false, false, false]),
        ("flush", [false, false, true, false, false]),
        ("discard", [false, false, false, true, false]),
        ("write-zeroes", [false, false, false, false, true]),
        ("any", [true, true, true, true, true]),
    ] {
        let (_mem, f) = setup(&[&format!("eio:op={op}")], 9);
        let mut buf = [0u8; 512];
        let got = [
            f.read(Sector(0), &mut buf).is_err(),
            f.write(Sector(0), &buf).is_err(),
            f.flush().is_err(),
            f.discard(Sector(0), Sectors(1)).is_err(),
            f.write_zeroes(Sector(0), Sectors(1), false).is_err(),
        ];
        assert_eq!(got, fails, "op={op}");
    }
}

#[test]
fn panic_panics_naming_the_rule_and_the_layout_stays_usable() {
    let (mem, f) = setup(&["panic:nth=3"], 10);
    f.write(Sector(0), &[1; 512]).expect("1st");
    f.flush().expect("2nd");
    let before = mem.snapshot();
    let caught = catch_unwind(AssertUnwindSafe(|| f.write(Sector(8), &[2; 512])));
    let payload = caught.expect_err("the 3rd operation panics");
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(msg.contains("panic:nth=3"), "{msg}");
    assert!(msg.contains("write"), "{msg}");
    assert_eq!(mem.snapshot(), before, "the panicking write wrote nothing");
    assert_eq!(f.injected(), 1);
    // Once: later operations go through.
    f.write(Sector(8), &[3; 512]).expect("4th");
    assert_eq!(read(&f, 8, 1), vec![3u8; 512]);

    // A panic on flush, with no range in the message.
    let (_mem, f) = setup(&["panic:op=flush"], 10);
    let caught = catch_unwind(AssertUnwindSafe(|| f.flush()));
    assert!(caught.is_err());
    f.read(Sector(0), &mut [0u8; 512])
        .expect("reads unaffected");
}

/// Two parallax-v1 versions in one pool, with data written so that their extents interleave.
fn two_versions() -> (Arc<MemSpace>, Arc<MemSpace>, Arc<Parallax>, Parallax) {
    const EXTENT: u64 = 64 << 10;
    let pool = MemPool::new(256);
    let a = Arc::new(MemSpace::new(pool.clone(), VersionKey(1), EXTENT));
    let b = Arc::new(MemSpace::new(pool, VersionKey(2), EXTENT));
    let disk_a = Parallax::create(a.clone(), Sectors(8192)).expect("create a");
    let disk_b = Parallax::create(b.clone(), Sectors(8192)).expect("create b");
    for i in 0..8u64 {
        disk_a
            .write(Sector(i * 1000), &pattern(i, 128 * 512))
            .expect("write a");
        disk_b
            .write(Sector(i * 1000 + 3), &pattern(100 + i, 128 * 512))
            .expect("write b");
    }
    disk_a.flush().expect("flush a");
    disk_b.flush().expect("flush b");
    (a, b, Arc::new(disk_a), disk_b)
}

/// Every byte of every extent of the pool (256 extents), read through `space`.
fn pool_bytes(space: &MemSpace) -> Vec<u8> {
    let mut all = Vec::new();
    for e in 0..256 {
        let mut buf = vec![0u8; 64 << 10];
        space.read(ExtentId(e), 0, &mut buf).expect("read extent");
        all.extend_from_slice(&buf);
    }
    all
}

#[test]
fn write_outside_is_refused_by_the_store_and_changes_nothing() {
    let (a, b, disk_a, disk_b) = two_versions();
    let f = FaultLayout::new(disk_a.clone(), vec![rule("write-outside:nth=1")], 11)
        .with_space(a.clone());
    let pool_before = pool_bytes(&a);
    let a_disk_before = read(&*disk_a, 0, 8192);
    let b_disk_before = read(&disk_b, 0, 8192);

    let err = f
        .write(Sector(0), &[0xee; 4096])
        .expect_err("refused by the store");
    let extent = match err {
        Error::Store(StoreError::GrantViolation {
            key: VersionKey(1),
            extent,
            offset: 0,
        }) => extent,
        other => panic!("expected a grant violation, got {other:?}"),
    };
    assert!(!a.extents().contains(&extent), "{extent} is not a's");
    assert!(
        b.extents().contains(&extent),
        "the first extent a does not own is b's: {extent}, a {:?}, b {:?}",
        a.extents(),
        b.extents()
    );
    assert_eq!(a.grant_violations(), 1);
    assert_eq!(b.grant_violations(), 0);
    assert_eq!(f.injected(), 1);
    assert_eq!(pool_bytes(&a), pool_before, "no byte of the pool changed");
    assert_eq!(
        read(&*disk_a, 0, 8192),
        a_disk_before,
        "the write was not done"
    );
    assert_eq!(read(&disk_b, 0, 8192), b_disk_before);

    // nth=1: the next write goes through.
    f.write(Sector(0), &[0xdd; 4096]).expect("2nd write");
    assert_eq!(read(&f, 0, 8), vec![0xddu8; 4096]);
    assert_eq!(a.grant_violations(), 1);
}

#[test]
fn write_outside_without_a_space_is_an_invalid_argument() {
    let (mem, f) = setup(&["write-outside"], 12);
    let before = mem.snapshot();
    match f.write(Sector(0), &[1; 512]) {
        Err(Error::InvalidArgument(msg)) => {
            assert!(msg.contains("store-backed"), "{msg}");
            assert!(msg.contains("write-outside"), "{msg}");
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    assert_eq!(mem.snapshot(), before);
}

// ---------------------------------------------------------------------------------------------
// Conditions
// ---------------------------------------------------------------------------------------------

#[test]
fn nth_hits_only_the_nth_matching_operation_once() {
    let (mem, f) = setup(&["eio:nth=5,op=write"], 13);
    let mut results = Vec::new();
    for i in 0..10u64 {
        // Reads and flushes in between do not count.
        f.flush().expect("flush");
        read(&f, 0, 1);
        results.push(f.write(Sector(i), &[i as u8 + 1; 512]).is_err());
    }
    let mut expected = vec![false; 10];
    expected[4] = true;
    assert_eq!(results, expected);
    let disk = mem.snapshot();
    assert_eq!(
        bytes(&disk, 4, 1),
        &pattern(1, 5 * 512)[4 * 512..],
        "the 5th write failed"
    );
    assert_eq!(bytes(&disk, 5, 1), &[6u8; 512][..]);
    assert_eq!(f.injected(), 1);
}

#[test]
fn after_skips_the_first_matching_operations() {
    let (_mem, f) = setup(&["eio:after=3,op=flush"], 14);
    let got: Vec<bool> = (0..6).map(|_| f.flush().is_err()).collect();
    assert_eq!(got, [false, false, false, true, true, true]);
    let (_mem, f) = setup(&["eio:after=2,nth=4"], 14);
    let got: Vec<bool> = (0..6).map(|_| f.flush().is_err()).collect();
    assert_eq!(got, [false, false, false, true, false, false]);
}

#[test]
fn sector_limits_the_rule_to_operations_covering_it() {
    let (_mem, f) = setup(&["eio:sector=100"], 15);
    let mut buf = vec![0u8; 8 * 512];
    assert!(f.read(Sector(92), &mut buf).is_ok(), "92..100");
    assert!(f.read(Sector(93), &mut buf).is_err(), "93..101");
    assert!(f.read(Sector(100), &mut buf).is_err(), "100..108");
    assert!(f.read(Sector(101), &mut buf).is_ok(), "101..109");
    assert!(f.write(Sector(96), &buf).is_err());
    assert!(f.discard(Sector(0), Sectors(101)).is_err());
    assert!(f.discard(Sector(0), Sectors(100)).is_ok());
    assert!(f.write_zeroes(Sector(100), Sectors(1), false).is_err());
    assert!(f.flush().is_ok(), "a flush covers no sector");
    assert_eq!(f.injected(), 5);

    // Counting (nth) only sees operations covering the sector.
    let (_mem, f) = setup(&["eio:sector=100,nth=2"], 15);
    let mut one = [0u8; 512];
    let got: Vec<bool> = [100, 0, 1, 100, 100]
        .iter()
        .map(|&s| f.read(Sector(s), &mut one).is_err())
        .collect();
    assert_eq!(got, [false, false, false, true, false]);
}

#[test]
fn prob_hits_about_that_fraction_and_is_deterministic_for_a_seed() {
    let run = |seed| {
        let (_mem, f) = setup(&["eio:prob=0.3,op=read"], seed);
        let fails = failures(&f, 2000, read_fails);
        assert_eq!(f.injected(), fails.iter().filter(|&&x| x).count() as u64);
        fails
    };
    let a = run(42);
    let hits = a.iter().filter(|&&x| x).count();
    assert!((450..=750).contains(&hits), "{hits} of 2000 at p=0.3");
    assert_eq!(run(42), a, "same seed, same faults");
    assert_ne!(run(43), a, "another seed, other faults");

    let (_mem, f) = setup(&["eio:prob=0"], 1);
    assert!(failures(&f, 200, read_fails).iter().all(|&x| !x));
    let (_mem, f) = setup(&["eio:prob=1"], 1);
    assert!(failures(&f, 200, read_fails).iter().all(|&x| x));
}

#[test]
fn flipped_bits_are_deterministic_for_a_seed() {
    let run = |seed| {
        let (_mem, f) = setup(&["flip-read:prob=0.5", "drop-write:prob=0.5"], seed);
        let mut out = Vec::new();
        for i in 0..100u64 {
            out.push(read(&f, i * 7 % 1000, 8));
            f.write(Sector(i), &pattern(i, 512)).expect("write");
        }
        out.push(read(&f, 0, 1024));
        (out, f.rule_hits())
    };
    let (a, hits) = run(7);
    assert!(hits.iter().all(|&h| h > 20 && h < 80), "{hits:?}");
    assert_eq!(run(7), (a.clone(), hits));
    assert_ne!(run(8).0, a);
}

#[test]
fn the_first_deciding_rule_in_order_wins_and_only_it_is_counted() {
    let (mem, f) = setup(&["drop-write:nth=1", "eio:op=write", "misdirect-write"], 16);
    let before = mem.snapshot();
    f.write(Sector(0), &[9; 512]).expect("1st write dropped");
    assert_eq!(mem.snapshot(), before);
    assert_eio(f.write(Sector(0), &[9; 512]), "write");
    assert_eq!(f.rule_hits(), vec![1, 1, 0]);
    assert_eq!(f.injected(), 2);

    // Stale data, then a flip on top of it.
    let (mem, f) = setup(&["flip-read", "stale-read"], 17);
    let original = mem.snapshot();
    f.write(Sector(0), &[0; 4096]).expect("write");
    let got = read(&f, 0, 8);
    assert_eq!(bit_diff(&got, bytes(&original, 0, 8)), 1);
    assert_eq!(f.rule_hits(), vec![1, 1]);
}

// ---------------------------------------------------------------------------------------------
// Forwarding and robustness
// ---------------------------------------------------------------------------------------------

#[test]
fn without_hits_everything_is_forwarded() {
    let (mem, f) = setup(&["eio:nth=1000000", "flip-read:sector=999999"], 18);
    assert_eq!(f.capacity(), CAPACITY);
    assert_eq!(f.rules().len(), 2);
    let data = pattern(50, 16 * 512);
    f.write(Sector(3), &data).expect("write");
    assert_eq!(read(&f, 3, 16), data);
    f.flush().expect("flush");
    f.discard(Sector(0), Sectors(8)).expect("discard");
    f.write_zeroes(Sector(16), Sectors(8), false)
        .expect("write zeroes");
    let disk = mem.snapshot();
    assert_eq!(
        bytes(&disk, 0, 8),
        &[0u8; 4096][..],
        "MemLayout discards to zeroes"
    );
    assert_eq!(bytes(&disk, 16, 8), &[0u8; 4096][..]);
    assert_eq!(bytes(&disk, 8, 8), &data[5 * 512..13 * 512]);
    assert_eq!(f.injected(), 0);
    assert!(format!("{f:?}").contains("eio:nth=1000000"));
}

#[test]
fn invalid_requests_are_refused_before_any_rule_counts_them() {
    let (mem, f) = setup(&["eio:nth=1", "drop-write"], 19);
    let before = mem.snapshot();
    assert!(matches!(
        f.read(Sector(1020), &mut [0u8; 8 * 512]),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        f.write(Sector(0), &[0u8; 100]),
        Err(Error::Unaligned(100))
    ));
    assert!(matches!(
        f.discard(Sector(u64::MAX), Sectors(2)),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        f.write_zeroes(Sector(1024), Sectors(1), false),
        Err(Error::OutOfRange { .. })
    ));
    assert_eq!(f.injected(), 0);
    // The first valid operation is still the 1st for nth=1.
    assert_eio(f.flush(), "flush");
    assert_eq!(mem.snapshot(), before);
}

#[test]
fn faults_are_counted_exactly_from_several_threads() {
    let (_mem, f) = setup(&["eio:prob=0.5", "eio:nth=1000,op=read"], 20);
    let f = Arc::new(f);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut failed = 0u64;
                let mut buf = [0u8; 512];
                for i in 0..500u64 {
                    let at = Sector((t * 500 + i) % CAPACITY.0);
                    let r = if i % 2 == 0 {
                        f.read(at, &mut buf)
                    } else {
                        f.write(at, &buf)
                    };
                    failed += u64::from(r.is_err());
                }
                failed
            })
        })
        .collect();
    let failed: u64 = threads.into_iter().map(|t| t.join().expect("thread")).sum();
    assert_eq!(f.injected(), failed);
    assert!((800..=1200).contains(&failed), "{failed}");
    let hits = f.rule_hits();
    assert!(hits[1] <= 1, "nth hits at most once: {hits:?}");
    assert_eq!(hits.iter().sum::<u64>(), failed);
}
