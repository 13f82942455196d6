//! parallax-v1 against an in-memory model: random writes, reads, discards, zeroing, flushes,
//! snapshots, snapshot reads and deletions, and crashes, with `check()` after every step.

mod common;

use std::sync::Arc;

use common::{assert_clean, assert_disk_eq, crash_and_reopen, pattern};
use dovetail_layout::{BlockLayout, Error, Parallax, Sector, Sectors};
use dovetail_store::mem::MemSpace;
use proptest::prelude::*;

/// Two levels of tree (601 blocks), the last block partial.
const CAPACITY: Sectors = Sectors(4803);

#[derive(Debug, Clone)]
enum Op {
    Write { at: u64, len: u64, seed: u64 },
    Read { at: u64, len: u64 },
    Discard { at: u64, len: u64 },
    Zeroes { at: u64, len: u64, unmap: bool },
    Flush,
    Snapshot,
    ReadSnapshot { idx: usize, at: u64, len: u64 },
    DeleteSnapshot { idx: usize },
    Crash,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..CAPACITY.0, prop_oneof![4 => 1..24u64, 1 => 1..300u64])
        .prop_map(|(at, len)| (at, len.min(CAPACITY.0 - at)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (range(), any::<u64>()).prop_map(|((at, len), seed)| Op::Write { at, len, seed }),
        3 => range().prop_map(|(at, len)| Op::Read { at, len }),
        2 => range().prop_map(|(at, len)| Op::Discard { at, len }),
        2 => (range(), any::<bool>()).prop_map(|((at, len), unmap)| Op::Zeroes { at, len, unmap }),
        2 => Just(Op::Flush),
        1 => Just(Op::Snapshot),
        2 => (any::<usize>(), range()).prop_map(|(idx, (at, len))| Op::ReadSnapshot { idx, at, len }),
        1 => any::<usize>().prop_map(|idx| Op::DeleteSnapshot { idx }),
        1 => Just(Op::Crash),
    ]
}

fn bytes(at: u64, len: u64) -> std::ops::Range<usize> {
    (at * 512) as usize..((at + len) * 512) as usize
}

fn run(ops: &[Op]) {
    let (_pool, space) = common::mem_space(64 << 10, 1 << 16);
    let mut space: Arc<MemSpace> = space;
    let mut disk = Parallax::create(space.clone(), CAPACITY).expect("create");
    let mut model = vec![0u8; (CAPACITY.0 * 512) as usize];
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let (mut durable, mut durable_snaps) = (model.clone(), snaps.clone());
    let mut next_name = 0;
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Write { at, len, seed } => {
                let data = pattern(*seed, (*len * 512) as usize);
                disk.write(Sector(*at), &data).expect("write");
                model[bytes(*at, *len)].copy_from_slice(&data);
            }
            Op::Read { at, len } => {
                let mut buf = vec![0u8; (*len * 512) as usize];
                disk.read(Sector(*at), &mut buf).expect("read");
                assert!(
                    buf[..] == model[bytes(*at, *len)],
                    "step {step}: read {op:?}"
                );
            }
            Op::Discard { at, len } => {
                disk.discard(Sector(*at), Sectors(*len)).expect("discard");
                model[bytes(*at, *len)].fill(0);
            }
            Op::Zeroes { at, len, unmap } => {
                disk.write_zeroes(Sector(*at), Sectors(*len), *unmap)
                    .expect("write zeroes");
                model[bytes(*at, *len)].fill(0);
            }
            Op::Flush => {
                disk.flush().expect("flush");
                durable = model.clone();
                durable_snaps = snaps.clone();
            }
            Op::Snapshot => {
                let name = format!("snap-{next_name}");
                next_name += 1;
                let info = disk.snapshot(&name).expect("snapshot");
                assert_eq!(info.name, name);
                assert!(matches!(
                    disk.snapshot(&name),
                    Err(Error::InvalidArgument(_))
                ));
                snaps.push((name, model.clone()));
                durable = model.clone();
                durable_snaps = snaps.clone();
            }
            Op::ReadSnapshot { idx, at, len } => {
                if snaps.is_empty() {
                    continue;
                }
                let (name, data) = &snaps[idx % snaps.len()];
                let view = disk.open_snapshot(name).expect("open snapshot");
                let mut buf = vec![0u8; (*len * 512) as usize];
                view.read(Sector(*at), &mut buf).expect("snapshot read");
                assert!(
                    buf[..] == data[bytes(*at, *len)],
                    "step {step}: snapshot {name} read {op:?}"
                );
                assert!(matches!(
                    view.write(Sector(*at), &buf),
                    Err(Error::ReadOnly)
                ));
            }
            Op::DeleteSnapshot { idx } => {
                if snaps.is_empty() {
                    assert!(matches!(
                        disk.delete_snapshot("none"),
                        Err(Error::NoSuchSnapshot(_))
                    ));
                    continue;
                }
                let (name, _) = snaps.remove(idx % snaps.len());
                let view = disk.open_snapshot(&name).expect("open before deletion");
                disk.delete_snapshot(&name).expect("delete snapshot");
                let mut buf = vec![0u8; 512];
                assert!(matches!(
                    view.read(Sector(0), &mut buf),
                    Err(Error::NoSuchSnapshot(_))
                ));
                durable = model.clone();
                durable_snaps = snaps.clone();
            }
            Op::Crash => {
                let (crashed, reopened) = crash_and_reopen(&space);
                space = crashed;
                disk = reopened;
                model = durable.clone();
                snaps = durable_snaps.clone();
            }
        }
        assert_clean(&disk, &format!("step {step} ({op:?})"));
    }
    let listed: Vec<String> = disk.snapshots().into_iter().map(|s| s.name).collect();
    let expected: Vec<String> = snaps.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(listed, expected, "snapshot list");
    assert_disk_eq(&disk, &model, "live disk at the end");
    for (name, data) in &snaps {
        let view = disk.open_snapshot(name).expect("open snapshot");
        assert_disk_eq(&view, data, &format!("snapshot {name} at the end"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn parallax_matches_the_model(ops in proptest::collection::vec(op(), 1..120)) {
        run(&ops);
    }
}
