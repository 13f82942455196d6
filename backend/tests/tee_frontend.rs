//! A disk served through a Tee, over a real vhost-user socket with an in-process frontend: the
//! trusted version is a raw image, the candidate a parallax-v1 version in a store, wrapped in a
//! fault layer. Two queues write and read back concurrently; the guest must see exactly the
//! data it wrote (status byte, used length, bytes) whatever the candidate does, and the image
//! must hold it. Without a fault the candidate is never quarantined and holds the same data.

mod common;

use std::sync::Arc;

use common::{image_bytes, pattern, Req, TestDriver, TestServer, SERIAL};
use dovetail_backend::disk::Disk;
use dovetail_layout::fault::{parse_rules, FaultLayout};
use dovetail_layout::raw::{RawLayout, RawOptions};
use dovetail_layout::{BlockLayout, Parallax, Sector, Sectors};
use dovetail_migrate::presence::PresenceMap;
use dovetail_migrate::{EventKind, Policy, Tee, TeeOptions};
use dovetail_store::Store;

const SIZE: u64 = 8 << 20;
const LEN: usize = 4096;
const PER_QUEUE: u64 = 120;

struct Setup {
    _dir: tempfile::TempDir,
    image: std::path::PathBuf,
    candidate: Arc<Parallax>,
    tee: Arc<Tee>,
}

fn setup(policy: Policy, faults: &[&str]) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("trusted.img");
    let trusted = RawLayout::open(
        &image,
        RawOptions {
            create_size: Some(SIZE),
            read_only: false,
            cache: None,
        },
    )
    .expect("raw image");
    let store = Store::create(&dir.path().join("store"), 256 << 20, 4 << 20).expect("store");
    let key = store.create_disk("vd", SIZE, "parallax-v1").expect("disk");
    let space = store.space(key).expect("space");
    let candidate =
        Arc::new(Parallax::create(space.clone(), Sectors(SIZE / 512)).expect("parallax"));
    let rules = parse_rules(&faults.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .expect("fault rules");
    let faulty: Arc<dyn BlockLayout> = if rules.is_empty() {
        candidate.clone()
    } else {
        Arc::new(FaultLayout::new(candidate.clone(), rules, 7).with_space(space))
    };
    let presence = PresenceMap::create(&store.map_path(key), SIZE / 4096, key.0).expect("map");
    let tee = Tee::new(
        Arc::new(trusted),
        faulty,
        Arc::new(presence),
        TeeOptions::new("vd", policy),
    )
    .expect("tee");
    Setup {
        _dir: dir,
        image,
        candidate,
        tee: Arc::new(tee),
    }
}

/// Two queues each write their own region and read it back; returns after checking every
/// completion and every byte the guest got.
fn guest_workload(tee: &Arc<Tee>) {
    let disk = Arc::new(Disk::new(tee.clone(), false, SERIAL).expect("disk"));
    let server = TestServer::start(disk, 2);
    let driver = TestDriver::connect(server.socket(), 2, 32 << 20);
    let spr = LEN as u64 / 512;
    std::thread::scope(|s| {
        for q in 0..2usize {
            let driver = &driver;
            s.spawn(move || {
                let base = q as u64 * PER_QUEUE * spr;
                let data = |i: u64| pattern(5000 * q as u64 + i, LEN);
                let writes: Vec<_> = (0..PER_QUEUE)
                    .map(|i| Req::write(base + i * spr, &data(i)))
                    .collect();
                for chunk in writes.chunks(20) {
                    for c in driver.submit_batch(q, chunk) {
                        c.assert_ok(0);
                    }
                }
                driver.submit(q, &Req::flush()).assert_ok(0);
                // Every block twice: the second pass runs after a quarantine, if any.
                for pass in 0..2 {
                    let reads: Vec<_> = (0..PER_QUEUE)
                        .map(|i| Req::read(base + i * spr, LEN as u32))
                        .collect();
                    let mut i = 0;
                    for chunk in reads.chunks(25) {
                        for c in driver.submit_batch(q, chunk) {
                            c.assert_ok(LEN as u32);
                            assert!(
                                c.data == data(i),
                                "queue {q}, pass {pass}: block {i} read back wrong"
                            );
                            i += 1;
                        }
                    }
                }
            });
        }
    });
    drop(driver);
    server.stop().expect("serve returns Ok");
}

fn expected_image() -> Vec<u8> {
    let spr = LEN as u64 / 512;
    let mut want = vec![0u8; (2 * PER_QUEUE) as usize * LEN];
    for q in 0..2u64 {
        for i in 0..PER_QUEUE {
            let off = ((q * PER_QUEUE * spr + i * spr) * 512) as usize;
            want[off..off + LEN].copy_from_slice(&pattern(5000 * q + i, LEN));
        }
    }
    want
}

#[test]
fn a_faultless_candidate_holds_what_the_guest_wrote_and_is_never_quarantined() {
    let s = setup(Policy::SyncCrossChecks, &[]);
    guest_workload(&s.tee);
    s.tee.close().expect("close");
    assert!(!s.tee.quarantined(), "events: {:?}", s.tee.events());
    let c = s.tee.counters();
    assert!(c.compared_reads >= 2 * 2 * PER_QUEUE, "{c:?}");
    assert_eq!(c.mismatches, 0, "{c:?}");
    let want = expected_image();
    assert!(
        image_bytes(&s.image, 0, want.len()) == want,
        "trusted image"
    );
    let mut got = vec![0u8; want.len()];
    s.candidate
        .read(Sector(0), &mut got)
        .expect("candidate read");
    assert!(got == want, "the candidate holds what the guest wrote");
    assert_eq!(s.tee.presence().count(), 2 * PER_QUEUE);
}

#[test]
fn a_candidate_that_flips_bits_is_quarantined_and_the_guest_sees_only_good_data() {
    for policy in [
        Policy::SyncCrossChecks,
        Policy::SyncReadChecks,
        Policy::AsyncOldPrimary,
    ] {
        let s = setup(policy, &["flip-read:prob=0.05"]);
        guest_workload(&s.tee);
        s.tee.close().expect("close");
        assert!(s.tee.quarantined(), "{policy}: not quarantined");
        let c = s.tee.counters();
        assert!(c.mismatches >= 1 && c.quarantines == 1, "{policy}: {c:?}");
        // Synchronous checks hold both answers and name the first differing byte; background
        // checks compare hashes.
        let sync = policy != Policy::AsyncOldPrimary;
        assert!(
            s.tee
                .events()
                .iter()
                .any(|e| matches!(e.kind, EventKind::Mismatch)
                    && e.trusted.is_some()
                    && e.candidate.is_some()
                    && (!sync || e.first_difference.is_some())),
            "{policy}: a mismatch event with its provenance: {:?}",
            s.tee.events()
        );
        let want = expected_image();
        assert!(
            image_bytes(&s.image, 0, want.len()) == want,
            "{policy}: trusted image intact"
        );
    }
}

#[test]
fn a_candidate_writing_outside_its_extents_is_refused_by_the_store_and_quarantined() {
    let s = setup(Policy::MirrorOnly, &["write-outside:nth=3"]);
    guest_workload(&s.tee);
    s.tee.close().expect("close");
    assert!(s.tee.quarantined());
    let c = s.tee.counters();
    assert_eq!(c.grant_refusals, 1, "{c:?}");
    assert!(
        s.tee
            .events()
            .iter()
            .any(|e| matches!(e.kind, EventKind::GrantRefused)),
        "{:?}",
        s.tee.events()
    );
    let want = expected_image();
    assert!(
        image_bytes(&s.image, 0, want.len()) == want,
        "trusted image intact"
    );
}
