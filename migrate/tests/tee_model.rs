//! Random operations from one thread on Tee(MemLayout, MemLayout) under every policy, without
//! faults: reads always equal a model, the candidate is never quarantined, and both versions
//! agree on every block the candidate holds.

mod common;

use std::sync::Arc;

use common::*;
use dovetail_layout::{BlockLayout, MemLayout, Sector, Sectors};
use dovetail_migrate::{Policy, TeeOptions};
use proptest::prelude::*;

const CAP: u64 = 131; // sectors: 16 blocks and a partial one

#[derive(Debug, Clone)]
enum Op {
    Read(u64, u64),
    Write(u64, u64, u64),
    Discard(u64, u64),
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
        1 => range().prop_map(|(a, n)| Op::Discard(a, n)),
        1 => range().prop_map(|(a, n)| Op::Zeroes(a, n)),
        1 => Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn reads_equal_the_model_under_every_policy(
        policy in prop::sample::select(Policy::ALL.to_vec()),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let t = Arc::new(MemLayout::new(Sectors(CAP)));
        let c = Arc::new(MemLayout::new(Sectors(CAP)));
        let tee = tee_over(t.clone(), c.clone(), TeeOptions::new("vdp", policy));
        let mut model = vec![0u8; (CAP * 512) as usize];
        for op in &ops {
            match *op {
                Op::Read(a, n) => {
                    // Slices and scattered guest buffers alternate.
                    let b = if (a + n) % 2 == 0 {
                        let mut b = vec![0u8; (n * 512) as usize];
                        tee.read(Sector(a), &mut b).expect("read");
                        b
                    } else {
                        read_scattered(&tee, a, (n * 512) as usize).expect("read_into")
                    };
                    prop_assert!(b[..] == model[(a * 512) as usize..((a + n) * 512) as usize], "{:?}", op);
                }
                Op::Write(a, n, s) => {
                    let d = pattern(s, (n * 512) as usize);
                    if s % 2 == 0 {
                        tee.write(Sector(a), &d).expect("write");
                    } else {
                        write_scattered(&tee, a, &d).expect("write_from");
                    }
                    apply(&mut model, a, &d);
                }
                Op::Discard(a, n) => {
                    tee.discard(Sector(a), Sectors(n)).expect("discard");
                    apply(&mut model, a, &vec![0u8; (n * 512) as usize]);
                }
                Op::Zeroes(a, n) => {
                    tee.write_zeroes(Sector(a), Sectors(n), false).expect("zeroes");
                    apply(&mut model, a, &vec![0u8; (n * 512) as usize]);
                }
                Op::Flush => tee.flush().expect("flush"),
            }
        }
        tee.drain();
        prop_assert!(!tee.quarantined(), "{:?}", tee.events());
        prop_assert!(t.snapshot() == model);
        let k = c.snapshot();
        for b in 0..(CAP * 512 / BLOCK as u64) {
            if tee.presence().contains(b) {
                let r = (b as usize * BLOCK)..((b as usize + 1) * BLOCK);
                prop_assert!(k[r.clone()] == model[r], "block {} differs", b);
            }
        }
        tee.close().expect("close");
    }
}
