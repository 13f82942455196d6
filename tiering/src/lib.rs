//! Tiering of a disk's blocks, independent of how a layout stores them: the block classes
//! (metadata, hot and cold data) and their policies (copies, tier, compression, validated
//! here once), block temperatures observed from the annotations, the placement decision
//! (which class a block should be in), and the mover loop that applies it step by step.
//!
//! A layout that keeps blocks by class implements [`Tiered`] (parallax-v2 does, in
//! `dovetail_layout::parallax`: its extent groups, replicated reads and writes and the codec
//! of compressed blocks stay there); the mover and the control plane work through it.

mod mover;
mod policy;
mod status;
mod temps;

pub use mover::{Mover, MoverEvent, Tiered};
pub use policy::{Class, ClassPolicy, Kind, TierPolicy, MAX_COPIES};
pub use status::{ClassUsage, PassReport, TierStatus};
pub use temps::{BlockSet, Temps};

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc::channel;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A disk of `blocks` blocks whose every step looks at `scan` of them and moves one.
    #[derive(Debug)]
    struct Fake {
        blocks: u64,
        cursor: AtomicU64,
        observed: AtomicU64,
        fail: bool,
        /// Steps still to panic.
        panics: AtomicU64,
    }

    impl Tiered for Fake {
        type Error = std::io::Error;
        fn policy(&self) -> Option<TierPolicy> {
            let mut p = TierPolicy::defaults(1);
            p.move_mib_s = 1000;
            Some(p)
        }
        fn observe(&self) {
            self.observed.fetch_add(1, Ordering::SeqCst);
        }
        fn pass(&self, max_blocks: u64, scan: u64) -> Result<PassReport, std::io::Error> {
            if self.fail {
                return Err(std::io::Error::other("the device is gone"));
            }
            if self
                .panics
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                panic!("a bug in a step");
            }
            let at = self.cursor.load(Ordering::SeqCst);
            let n = scan.min(self.blocks - at);
            let wrapped = at + n >= self.blocks;
            self.cursor
                .store(if wrapped { 0 } else { at + n }, Ordering::SeqCst);
            Ok(PassReport {
                scanned: n,
                placed: max_blocks.min(1),
                wrapped,
                ..PassReport::default()
            })
        }
        fn status(&self) -> Option<TierStatus> {
            None
        }
        fn set_policy(&self, _: TierPolicy) -> Result<(), std::io::Error> {
            Ok(())
        }
        fn scrub(&self) -> u64 {
            0
        }
    }

    fn fake(fail: bool) -> Arc<Fake> {
        Arc::new(Fake {
            blocks: 20_000,
            cursor: AtomicU64::new(0),
            observed: AtomicU64::new(0),
            fail,
            panics: AtomicU64::new(0),
        })
    }

    fn start(disk: &Arc<Fake>) -> (Mover, std::sync::mpsc::Receiver<MoverEvent>) {
        let (tx, rx) = channel();
        let tx = Mutex::new(tx);
        let events = Box::new(move |e| {
            let _ = tx.lock().expect("events").send(e);
        });
        let m = Mover::start(
            Arc::downgrade(disk),
            "mover-test".into(),
            Duration::from_secs(3600),
            events,
        )
        .expect("start the mover");
        (m, rx)
    }

    #[test]
    fn a_round_observes_once_then_steps_to_the_end_of_the_disk() {
        let disk = fake(false);
        let (mover, rx) = start(&disk);
        let wait = Duration::from_secs(10);
        match rx.recv_timeout(wait).expect("a round") {
            // 20000 blocks, 8192 a step: three steps, each moving one block.
            MoverEvent::Round { placed, .. } => assert_eq!(placed, 3),
            e => panic!("{e:?}"),
        }
        assert_eq!(disk.observed.load(Ordering::SeqCst), 1);
        // The next round waits for the interval, or a kick.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        mover.kick();
        match rx.recv_timeout(wait).expect("a second round") {
            MoverEvent::Round { placed, .. } => assert_eq!(placed, 3),
            e => panic!("{e:?}"),
        }
        assert_eq!(disk.observed.load(Ordering::SeqCst), 2);
        drop(mover);
        assert_eq!(Arc::strong_count(&disk), 1, "the thread let the disk go");
    }

    #[test]
    fn a_failed_step_is_reported_with_its_causes() {
        let disk = fake(true);
        let (_mover, rx) = start(&disk);
        match rx.recv_timeout(Duration::from_secs(10)).expect("an event") {
            MoverEvent::Failed(why) => assert_eq!(why, "the device is gone"),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn a_panicking_step_is_a_failed_round_and_the_mover_goes_on() {
        let disk = fake(false);
        disk.panics.store(1, Ordering::SeqCst);
        let (mover, rx) = start(&disk);
        let wait = Duration::from_secs(10);
        match rx.recv_timeout(wait).expect("an event") {
            MoverEvent::Failed(why) => assert_eq!(why, "panicked: a bug in a step"),
            e => panic!("{e:?}"),
        }
        mover.kick();
        match rx.recv_timeout(wait).expect("a round after the panic") {
            MoverEvent::Round { placed, .. } => assert_eq!(placed, 3),
            e => panic!("{e:?}"),
        }
        drop(mover);
        assert_eq!(Arc::strong_count(&disk), 1, "the thread let the disk go");
    }
}
