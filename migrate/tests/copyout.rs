//! Copy-out: every block the candidate lacks is migrated from the trusted version, holes are
//! recorded without copying, guest writes during the copy win, a resumed job copies only what
//! is still absent, pause/cancel work, and a candidate failing mid-copy is quarantined.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use dovetail_layout::{BlockLayout, MemLayout, Sector, Sectors};
use dovetail_migrate::{
    CopyOut, CopyOutOptions, Identity, JobState, Policy, Scope, TeeOptions, Upgrade,
};

const CAP: Sectors = Sectors(2048); // 1 MiB, 256 blocks

/// A trusted version with data in every block but the multiples of 4 (holes).
fn trusted() -> Arc<MemLayout> {
    let t = Arc::new(MemLayout::new(CAP));
    for b in 0..256u64 {
        if b % 4 != 0 {
            t.write(Sector(b * 8), &pattern(1000 + b, BLOCK))
                .expect("fill");
        }
    }
    t
}

fn fast() -> CopyOutOptions {
    CopyOutOptions {
        rate: 0,
        batch_blocks: 8,
        checkpoint_every: Duration::from_millis(5),
        scope: Scope::Everything,
    }
}

fn start(tee: &dovetail_migrate::Tee, opts: CopyOutOptions) -> CopyOut {
    CopyOut::start(tee, Arc::new(Identity), opts, Box::new(|_, _| {})).expect("start copy-out")
}

#[test]
fn copy_out_migrates_every_block_and_records_holes_without_copying() {
    for policy in [
        Policy::SyncCrossChecks,
        Policy::AsyncOldPrimary,
        Policy::MirrorOnly,
    ] {
        let t = trusted();
        let (_space, cand) = parallax(CAP);
        let tee = tee_over(t.clone(), cand.clone(), TeeOptions::new("vda", policy));
        let job = start(&tee, fast());
        assert_eq!(
            job.wait(Duration::from_secs(30)),
            JobState::Done,
            "{policy}"
        );
        let p = job.progress();
        assert_eq!(p.blocks_present, 256);
        assert_eq!((p.copied_blocks, p.zero_blocks), (192, 64), "{policy}");
        assert!(p.checkpoints >= 1);
        assert_eq!(read_all(&*cand), t.snapshot(), "{policy}: block for block");
        // The holes took no space in the candidate: 192 data blocks and a few tree nodes.
        let used = cand.usage().used;
        assert!((192..200).contains(&used), "{policy}: {used} blocks used");
        // Reads are now compared everywhere and agree.
        let _ = read_all(&tee);
        tee.drain();
        assert!(!tee.quarantined(), "{policy}: {:?}", tee.events());
    }
}

#[test]
fn guest_writes_during_copy_out_are_never_overwritten_by_older_data() {
    let t = trusted();
    let (_space, cand) = parallax(CAP);
    let tee = Arc::new(tee_over(
        t.clone(),
        cand.clone(),
        TeeOptions::new("vda", Policy::SyncCrossChecks),
    ));
    let mut opts = fast();
    opts.batch_blocks = 2;
    let job = start(&tee, opts);
    let mut rng = Rng::new(7);
    let mut written = std::collections::BTreeMap::new();
    for i in 0..400u64 {
        let b = rng.below(256);
        let off = rng.below(8);
        let len = 1 + rng.below(8 - off);
        let d = pattern(50_000 + i, (len * 512) as usize);
        tee.write(Sector(b * 8 + off), &d).expect("guest write");
        written.insert(b, ());
    }
    assert_eq!(job.wait(Duration::from_secs(30)), JobState::Done);
    tee.drain();
    assert_eq!(
        read_all(&*cand),
        t.snapshot(),
        "trusted and candidate agree block for block"
    );
    assert!(!tee.quarantined(), "{:?}", tee.events());
    assert!(job.progress().copied_blocks < 192 + written.len() as u64);
}

#[test]
fn a_resumed_copy_out_copies_only_what_is_still_absent() {
    let t = trusted();
    let (_space, cand) = parallax(CAP);
    let tee = tee_over(
        t.clone(),
        cand.clone(),
        TeeOptions::new("vda", Policy::MirrorOnly),
    );
    let mut opts = fast();
    opts.rate = 256 << 10; // 64 blocks a second: slow enough to cancel midway
    let first = start(&tee, opts);
    std::thread::sleep(Duration::from_millis(300));
    first.cancel();
    assert_eq!(first.state(), JobState::Cancelled);
    let p1 = first.progress();
    assert!(p1.blocks_present > 0 && p1.blocks_present < 256, "{p1:?}");
    let second = start(&tee, fast());
    assert_eq!(second.absent_at_start(), 256 - p1.blocks_present);
    assert_eq!(second.wait(Duration::from_secs(30)), JobState::Done);
    let p2 = second.progress();
    assert_eq!(
        p1.copied_blocks + p1.zero_blocks + p2.copied_blocks + p2.zero_blocks,
        256,
        "no block copied twice, none skipped"
    );
    assert_eq!(read_all(&*cand), t.snapshot());
}

#[test]
fn pause_holds_the_job_and_resume_finishes_it() {
    let t = trusted();
    let (_space, cand) = parallax(CAP);
    let tee = tee_over(t.clone(), cand, TeeOptions::new("vda", Policy::MirrorOnly));
    let mut opts = fast();
    opts.rate = 512 << 10;
    let job = start(&tee, opts);
    std::thread::sleep(Duration::from_millis(100));
    assert!(job.pause());
    std::thread::sleep(Duration::from_millis(50));
    let held = job.progress();
    std::thread::sleep(Duration::from_millis(200));
    let still = job.progress();
    assert_eq!(
        held.blocks_present, still.blocks_present,
        "paused means paused"
    );
    assert_eq!(still.state, JobState::Paused);
    assert!(job.resume());
    job.set_rate(0);
    assert_eq!(job.wait(Duration::from_secs(30)), JobState::Done);
}

/// Upgrade code that fails on one block: the candidate is quarantined and the job stops.
#[derive(Debug)]
struct FailsOn(u64);

impl Upgrade for FailsOn {
    fn name(&self) -> &str {
        "fails-on"
    }
    fn upgrade_block(&self, block: u64, _data: &mut [u8]) -> dovetail_layout::Result<()> {
        if block == self.0 {
            Err(dovetail_layout::Error::InvalidArgument("bad block".into()))
        } else {
            Ok(())
        }
    }
}

#[test]
fn failing_upgrade_code_or_candidate_quarantines_and_stops_the_job() {
    let t = trusted();
    let (_space, cand) = parallax(CAP);
    let tee = tee_over(
        t.clone(),
        cand,
        TeeOptions::new("vda", Policy::SyncCrossChecks),
    );
    let job =
        CopyOut::start(&tee, Arc::new(FailsOn(101)), fast(), Box::new(|_, _| {})).expect("start");
    assert_eq!(job.wait(Duration::from_secs(30)), JobState::Stopped);
    assert!(tee.quarantined());
    assert!(!tee.presence().contains(101));
    // The guest still gets the trusted data.
    assert_eq!(read_all(&tee), t.snapshot());

    let r = rig(
        Policy::SyncCrossChecks,
        CAP,
        Some("eio:nth=3,op=write"),
        |_| {},
    );
    for b in 0..256u64 {
        r.trusted
            .write(Sector(b * 8), &pattern(b + 1, BLOCK))
            .expect("fill");
    }
    let job = start(&r.tee, fast());
    assert_eq!(job.wait(Duration::from_secs(30)), JobState::Stopped);
    assert!(r.tee.quarantined());
    assert_eq!(read_all(&r.tee), r.trusted.snapshot());
}

#[test]
fn copy_on_read_migrates_exactly_the_blocks_the_guest_reads() {
    let t = trusted();
    let (_space, cand) = parallax(CAP);
    let tee = tee_over(
        t.clone(),
        cand.clone(),
        TeeOptions::new("vda", Policy::SyncCrossChecks),
    );
    let job = start(
        &tee,
        CopyOutOptions {
            scope: Scope::ReadBlocks,
            ..fast()
        },
    );
    // The guest reads blocks 10..14 (a data run with a hole at 12) and block 100 (a hole).
    let mut buf = vec![0u8; 4 * BLOCK];
    tee.read(Sector(10 * 8), &mut buf).expect("read");
    assert_eq!(buf, t.snapshot()[10 * BLOCK..14 * BLOCK]);
    let mut one = vec![0u8; BLOCK];
    tee.read(Sector(100 * 8), &mut one).expect("read");
    let wanted = [10u64, 11, 12, 13, 100];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while wanted.iter().any(|&b| !tee.presence().contains(b)) {
        assert!(std::time::Instant::now() < deadline, "blocks never copied");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Nothing else moved: the job waits for reads, it does not walk the disk.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(job.state(), JobState::Running);
    assert_eq!(tee.presence().count(), 5);
    let p = job.progress();
    assert_eq!(
        (p.copied_blocks, p.zero_blocks),
        (3, 2),
        "blocks 12 and 100 are holes"
    );
    for b in wanted {
        let mut c = vec![0u8; BLOCK];
        cand.read(Sector(b * 8), &mut c).expect("candidate read");
        let at = b as usize * BLOCK;
        assert_eq!(
            c,
            t.snapshot()[at..at + BLOCK],
            "block {b} in the candidate"
        );
    }
    // Reading the rest of the disk finishes the migration.
    let _ = read_all(&tee);
    assert_eq!(job.wait(Duration::from_secs(30)), JobState::Done);
    assert_eq!(read_all(&*cand), t.snapshot());
    assert!(!tee.quarantined(), "{:?}", tee.events());
}

#[test]
fn a_copy_out_takes_the_blocks_guest_reads_touch_first() {
    let t = trusted();
    let (_space, cand) = parallax(CAP);
    let tee = tee_over(
        t.clone(),
        cand.clone(),
        TeeOptions::new("vda", Policy::MirrorOnly),
    );
    // Slowed down to 256 KiB/s (a batch of 8 data blocks every 0.125 s), the job walking from
    // block 0 would need seconds to reach the disk's last blocks; a read of them goes first.
    let job = start(
        &tee,
        CopyOutOptions {
            rate: 256 << 10,
            ..fast()
        },
    );
    let mut buf = vec![0u8; 2 * BLOCK];
    tee.read(Sector(250 * 8), &mut buf).expect("read");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !(tee.presence().contains(250) && tee.presence().contains(251)) {
        assert!(
            std::time::Instant::now() < deadline,
            "read blocks never copied"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let present = tee.presence().count();
    assert!(
        present <= 2 + 2 * 8,
        "{present} blocks present when the read blocks arrived: they did not go first"
    );
    job.set_rate(0);
    assert_eq!(job.wait(Duration::from_secs(30)), JobState::Done);
    assert_eq!(read_all(&*cand), t.snapshot());
}

/// Copy-out from parallax-v1 into parallax-v2 under a taint label: blocks the guest wrote
/// through the Tee while the label was on carry it (and their write counts); blocks the
/// copy-out brought over start with no counts and no labels (migration is not guest I/O).
#[test]
fn into_parallax_v2_annotations_count_the_guest_only_and_taint_survives_migration() {
    let (_ts, trusted) = parallax_of("parallax-v1", CAP);
    for b in 0..256u64 {
        if b % 4 != 0 {
            trusted
                .write(Sector(b * 8), &pattern(1000 + b, BLOCK))
                .expect("fill");
        }
    }
    let (_cs, cand) = parallax_of("parallax-v2", CAP);
    let tee = tee_over(
        trusted.clone(),
        cand.clone(),
        TeeOptions::new("vda", Policy::SyncCrossChecks),
    );
    let label = cand.set_taint("incident", true).expect("taint on");
    let bit = 1u16 << label.bit;
    tee.write(Sector(5 * 8), &pattern(5, BLOCK))
        .expect("guest write");
    tee.write(Sector(6 * 8 + 2), &[1u8; 512])
        .expect("partial guest write");
    cand.set_taint("incident", false).expect("taint off");
    tee.write(Sector(9 * 8), &pattern(9, BLOCK))
        .expect("guest write, label off");
    let upgrade: Arc<dyn Upgrade> = Arc::from(
        dovetail_migrate::upgrade::for_versions("parallax-v1", Some(trusted.clone()), &cand)
            .expect("v1 -> v2 upgrade"),
    );
    assert_eq!(upgrade.name(), "parallax-v1-to-parallax-v2");
    let job = CopyOut::start(&tee, upgrade, fast(), Box::new(|_, _| {})).expect("start");
    assert_eq!(job.wait(Duration::from_secs(30)), JobState::Done);
    let t = cand.annotations().expect("annotations");
    assert_eq!(
        t.ranges_with(bit),
        vec![(5, 7)],
        "only blocks written while on"
    );
    assert_eq!(t.get(5).writes, 1);
    assert_eq!(t.get(9).writes, 1);
    assert_eq!(t.get(9).taint, 0);
    let totals = t.totals();
    assert_eq!(totals.writes, 3, "migration writes are not counted");
    for b in [0u64, 1, 2, 100, 255] {
        assert_eq!(t.get(b), Default::default(), "migrated block {b}");
    }
    assert_eq!(read_all(&*cand), read_all(&*trusted), "block for block");
    assert!(!tee.quarantined(), "{:?}", tee.events());
}

/// Copy-out from parallax-v2 into parallax-v2 carries each block's annotations, labels
/// included.
#[test]
fn parallax_v2_to_v2_carries_annotations_and_labels() {
    let (_ts, trusted) = parallax_of("parallax-v2", CAP);
    let l = trusted.set_taint("pii", true).expect("label");
    for b in 20..30u64 {
        trusted
            .write(Sector(b * 8), &pattern(b, BLOCK))
            .expect("fill");
    }
    trusted.set_taint("pii", false).expect("off");
    let mut buf = vec![0u8; BLOCK];
    for _ in 0..3 {
        trusted.read(Sector(25 * 8), &mut buf).expect("read");
    }
    let (_cs, cand) = parallax_of("parallax-v2", CAP);
    // The candidate names its own labels: "pii" gets another bit there; the upgrade carries
    // labels by name (defining the trusted's in the candidate).
    let other = cand.define_label("other").expect("a label of its own");
    let tee = tee_over(
        trusted.clone(),
        cand.clone(),
        TeeOptions::new("vda", Policy::MirrorOnly),
    );
    let upgrade: Arc<dyn Upgrade> = Arc::from(
        dovetail_migrate::upgrade::for_versions("parallax-v2", Some(trusted.clone()), &cand)
            .expect("v2 -> v2 upgrade"),
    );
    let job = CopyOut::start(&tee, upgrade, fast(), Box::new(|_, _| {})).expect("start");
    assert_eq!(job.wait(Duration::from_secs(30)), JobState::Done);
    let (from, to) = (
        trusted.annotations().expect("annotations"),
        cand.annotations().expect("annotations"),
    );
    let pii = cand
        .labels()
        .into_iter()
        .find(|x| x.name == "pii")
        .expect("pii defined in the candidate");
    assert_ne!(pii.bit, l.bit);
    assert_ne!(pii.bit, other.bit);
    for b in 0..256u64 {
        let (f, t) = (from.get(b), to.get(b));
        assert_eq!(
            (t.reads, t.writes, t.last_read, t.last_write, t.pattern),
            (f.reads, f.writes, f.last_read, f.last_write, f.pattern),
            "block {b}"
        );
        let want = if f.taint != 0 { 1u16 << pii.bit } else { 0 };
        assert_eq!(t.taint, want, "block {b}");
    }
    assert_eq!(to.ranges_with(1 << pii.bit), vec![(20, 30)]);
    assert_eq!(to.get(25).reads, 3);
}

/// Validation is not guest I/O: the lazy job's hashing reads and the read-backs of writes leave
/// a parallax-v2 candidate's read counts alone; guest writes are counted once.
#[test]
fn validation_reads_are_not_counted_in_parallax_v2_annotations() {
    let (_ts, trusted) = parallax_of("parallax-v1", CAP);
    let (_cs, cand) = parallax_of("parallax-v2", CAP);
    let mut opts = TeeOptions::new("vda", Policy::LazyHashes);
    opts.lazy_interval = Duration::from_millis(1);
    let tee = tee_over(trusted.clone(), cand.clone(), opts);
    // Every block, so the 1 MiB pieces the lazy job hashes are wholly present.
    for b in 0..256u64 {
        tee.write(Sector(b * 8), &pattern(b, BLOCK)).expect("write");
    }
    tee.flush().expect("flush");
    assert!(
        wait_for(Duration::from_secs(20), || tee
            .counters()
            .lazy_regions_checked
            >= 4),
        "the lazy job never ran"
    );
    let t = cand.annotations().expect("annotations");
    assert_eq!(t.totals().reads, 0, "hashing reads counted");
    assert_eq!(t.totals().writes, 256);
    assert!(!tee.quarantined(), "{:?}", tee.events());
}

/// Upgrade code that stops on one block (under the batch's stripes) until released.
#[derive(Debug)]
struct StopsOn {
    block: u64,
    entered: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Upgrade for StopsOn {
    fn name(&self) -> &str {
        "stops-on"
    }
    fn upgrade_block(&self, block: u64, _data: &mut [u8]) -> dovetail_layout::Result<()> {
        if block == self.block {
            let _ = self.entered.lock().expect("entered").send(());
            let _ = self
                .release
                .lock()
                .expect("release")
                .recv_timeout(Duration::from_secs(20));
        }
        Ok(())
    }
}

#[test]
fn a_batch_being_copied_lets_guest_reads_of_its_blocks_through_and_holds_writes_back() {
    let t = trusted();
    let (_space, cand) = parallax(CAP);
    let tee = Arc::new(tee_over(
        t.clone(),
        cand.clone(),
        TeeOptions::new("vda", Policy::SyncCrossChecks),
    ));
    // Block 10 is in the candidate already (a guest write migrated it): a read of it is
    // compared with the candidate, under its stripe.
    let ten = pattern(77_010, BLOCK);
    tee.write(Sector(10 * 8), &ten).expect("guest write");
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let upgrade = Arc::new(StopsOn {
        block: 9,
        entered: std::sync::Mutex::new(entered_tx),
        release: std::sync::Mutex::new(release_rx),
    });
    let mut opts = fast();
    opts.batch_blocks = 8;
    let job = CopyOut::start(&tee, upgrade, opts, Box::new(|_, _| {})).expect("start copy-out");
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("the copy reached block 9");
    // The batch 8..16 is being copied. A read of block 10 is answered now, and compared.
    let (read_tx, read_rx) = std::sync::mpsc::channel();
    let reader = {
        let tee = tee.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; BLOCK];
            let r = tee.read(Sector(10 * 8), &mut buf).map(|()| buf);
            let _ = read_tx.send(r.is_ok());
            r
        })
    };
    assert_eq!(
        read_rx.recv_timeout(Duration::from_secs(5)),
        Ok(true),
        "a read of a block the copy holds was not answered while it copied"
    );
    let got = reader.join().expect("reader").expect("read");
    assert_eq!(got, ten, "block 10 as written");
    // A write to block 11 waits until the batch is in the candidate, then wins.
    let new = pattern(77_011, BLOCK);
    let (write_tx, write_rx) = std::sync::mpsc::channel();
    let writer = {
        let (tee, new) = (tee.clone(), new.clone());
        std::thread::spawn(move || {
            let r = tee.write(Sector(11 * 8), &new);
            let _ = write_tx.send(());
            r
        })
    };
    assert!(
        write_rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a write to a block being copied did not wait for the copy"
    );
    release.send(()).expect("release the copy");
    writer.join().expect("writer").expect("guest write");
    assert_eq!(job.wait(Duration::from_secs(30)), JobState::Done);
    tee.drain();
    let want = t.snapshot();
    assert_eq!(
        &want[10 * BLOCK..11 * BLOCK],
        &ten[..],
        "trusted has the first write"
    );
    assert_eq!(
        &want[11 * BLOCK..12 * BLOCK],
        &new[..],
        "trusted has the second write"
    );
    assert_eq!(
        read_all(&*cand),
        want,
        "the candidate has the write, not the copy"
    );
    assert!(!tee.quarantined(), "{:?}", tee.events());
}
