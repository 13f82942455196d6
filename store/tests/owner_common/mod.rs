//! What the ownership tests of the file store and of the store on RADOS share: the stamp
//! each grant writes, and the seeded grant stress with its checks.

#![allow(dead_code)]

use std::sync::Arc;

use dovetail_store::rng::SplitMix64;
use dovetail_store::{ExtentId, Store, StoreError, VersionKey};

/// The bytes version `key` writes into extent `e`.
pub fn stamp(key: VersionKey, e: ExtentId, len: usize) -> Vec<u8> {
    let seed = key.0.wrapping_mul(0x9e37_79b9) ^ u64::from(e.0).wrapping_mul(0x85eb_ca6b);
    (0..len)
        .map(|i| (seed.wrapping_add(i as u64 * 131) >> 3) as u8)
        .collect()
}

/// Two threads per handle, each granting (and stamping) or giving back extents of its
/// handle's version at random; returns what each thread holds at the end.
pub fn run_grant_stress(
    handles: &[Arc<Store>],
    keys: &[VersionKey],
    seed: u64,
    steps: usize,
) -> Vec<(VersionKey, Vec<ExtentId>)> {
    let mut joins = Vec::new();
    for (h, (s, &key)) in handles.iter().zip(keys).enumerate() {
        for t in 0..2 {
            let space = s.space(key).expect("space");
            let store = s.clone();
            let seed = seed ^ ((h * 2 + t) as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            joins.push(std::thread::spawn(move || {
                let mut rng = SplitMix64::new(seed);
                let mut mine: Vec<ExtentId> = Vec::new();
                for _ in 0..steps {
                    if mine.is_empty() || rng.below(3) != 0 {
                        match space.grant_extent() {
                            Ok(e) => {
                                space.write(e, 0, &stamp(key, e, 4096)).expect("stamp");
                                mine.push(e);
                            }
                            Err(StoreError::Full) => {}
                            Err(e) => panic!("grant: {e}"),
                        }
                    } else {
                        let i = rng.below(mine.len() as u64) as usize;
                        let e = mine.swap_remove(i);
                        store.ungrant(key, e).expect("ungrant");
                    }
                }
                space.sync().expect("sync");
                (key, mine)
            }));
        }
    }
    joins
        .into_iter()
        .map(|j| j.join().expect("thread"))
        .collect()
}

/// No extent is held by two threads; each holds what the catalog (as every handle reads it)
/// says its version holds, and still carries that thread's stamp (no other grant zeroed it).
pub fn check_grants(
    handles: &[Arc<Store>],
    keys: &[VersionKey],
    held: &[(VersionKey, Vec<ExtentId>)],
) {
    let mut all: Vec<u32> = held
        .iter()
        .flat_map(|(_, v)| v.iter().map(|e| e.0))
        .collect();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n, "an extent was handed out twice");
    assert!(n > 8, "too few grants to mean anything: {n}");
    for s in handles {
        for &key in keys {
            let mut cat: Vec<u32> = s
                .version(key)
                .expect("version")
                .extents
                .iter()
                .map(|e| e.0)
                .collect();
            let mut ours: Vec<u32> = held
                .iter()
                .filter(|(k, _)| *k == key)
                .flat_map(|(_, v)| v.iter().map(|e| e.0))
                .collect();
            cat.sort_unstable();
            ours.sort_unstable();
            assert_eq!(cat, ours, "the catalog of {key} as one handle reads it");
        }
    }
    for (key, extents) in held {
        let space = handles[0].space(*key).expect("space");
        for &e in extents {
            let mut b = vec![0u8; 4096];
            space.read(e, 0, &mut b).expect("read");
            assert!(b == stamp(*key, e, 4096), "{e} of {key} lost its data");
        }
    }
}
