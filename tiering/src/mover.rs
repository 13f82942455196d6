//! The mover: a thread that, every interval, observes the blocks' temperatures and then moves
//! blocks step by step, at the policy's rate, until a round over the disk is complete, through
//! the [`Tiered`] trait its layout implements.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::policy::TierPolicy;
use crate::status::{PassReport, TierStatus};

/// Bytes per block the mover moves (what its rate counts).
const BLOCK_BYTES: u64 = 4096;

/// A disk whose blocks are kept by class and moved by a mover: what the mover and the control
/// plane need of it.
pub trait Tiered: Send + Sync {
    type Error: std::error::Error + 'static;

    /// The tiering policy (`None`: the disk has no block classes).
    fn policy(&self) -> Option<TierPolicy>;

    /// Records every block's accesses since the last call (what makes a block hot, or cold
    /// once idle long enough). The mover calls it once per interval.
    fn observe(&self);

    /// One bounded step of the mover: looks at up to `scan` blocks from where the last step
    /// stopped and moves at most `max_blocks` of them where the policy says, durably.
    fn pass(&self, max_blocks: u64, scan: u64) -> Result<PassReport, Self::Error>;

    /// The policy and where the blocks are (`None`: no block classes).
    fn status(&self) -> Option<TierStatus>;

    /// Replaces the policy (validated against the disk's tiers) durably; blocks already
    /// placed move when the mover reaches them.
    fn set_policy(&self, policy: TierPolicy) -> Result<(), Self::Error>;

    /// Reads every copy of every replicated block in use and rewrites bad copies from good
    /// ones; returns how many were repaired.
    fn scrub(&self) -> u64;
}

/// What the mover reports (for the daemon's events and status).
#[derive(Debug, Clone)]
pub enum MoverEvent {
    /// A round over the whole disk ended.
    Round {
        promoted: u64,
        demoted: u64,
        placed: u64,
        no_room: u64,
        secs: f64,
    },
    /// A pass failed (the mover retries after its interval).
    Failed(String),
}

/// A running mover; stops (after its current pass) when dropped.
#[derive(Debug)]
pub struct Mover {
    stop: Arc<AtomicBool>,
    wake: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mover {
    /// Starts a mover thread named `name` over `disk` (which it holds weakly: the thread ends
    /// when the disk is dropped): every `interval` it observes the blocks' temperatures, then
    /// moves blocks at the policy's rate until a round over the disk is complete. `events`
    /// hears of each round and failure.
    pub fn start<T: Tiered + 'static>(
        disk: Weak<T>,
        name: String,
        interval: Duration,
        events: Box<dyn Fn(MoverEvent) + Send>,
    ) -> std::io::Result<Mover> {
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new((Mutex::new(false), Condvar::new()));
        let (stop2, wake2) = (stop.clone(), wake.clone());
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            dovetail_store::thread_kind::entered(
                dovetail_store::thread_kind::ThreadKind::Background,
            );
            mover_loop(disk, interval, &stop2, &wake2, &*events)
        })?;
        Ok(Mover {
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// Runs a pass now instead of at the end of the current interval.
    pub fn kick(&self) {
        let (m, cv) = &*self.wake;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }
}

impl Drop for Mover {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Blocks moved per step of the mover (a step holds their stripes while it copies them, and
/// the state lock only to allocate and to repoint).
const STEP_BLOCKS: u64 = 128;
/// Blocks looked at per step.
const STEP_SCAN: u64 = 8192;

/// An error followed by each of its sources, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

fn mover_loop<T: Tiered>(
    inner: Weak<T>,
    interval: Duration,
    stop: &AtomicBool,
    wake: &(Mutex<bool>, Condvar),
    events: &dyn Fn(MoverEvent),
) {
    let mut round = PassReport::default();
    let mut round_start;
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        round_start = Instant::now();
        // A panic in a step is the round's failure (an event), not the end of the mover: it
        // tries again at the next interval.
        let caught = |f: &mut dyn FnMut() -> Result<PassReport, String>| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
                let cause = p
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into());
                Err(format!("panicked: {cause}"))
            })
        };
        if let Err(e) = caught(&mut || {
            strong.observe();
            Ok(PassReport::default())
        }) {
            events(MoverEvent::Failed(e));
        }
        // Move until a round is complete, at the policy's rate.
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let rate = strong.policy().map_or(32, |p| p.move_mib_s);
            let t0 = Instant::now();
            match caught(&mut || {
                strong
                    .pass(STEP_BLOCKS, STEP_SCAN)
                    .map_err(|e| error_chain(&e))
            }) {
                Ok(r) => {
                    round.promoted += r.promoted;
                    round.demoted += r.demoted;
                    round.placed += r.placed;
                    round.no_room += r.no_room;
                    if r.moved() > 0 {
                        let bytes = r.moved() * BLOCK_BYTES;
                        let want =
                            Duration::from_secs_f64(bytes as f64 / (f64::from(rate) * 1048576.0));
                        if let Some(rest) = want.checked_sub(t0.elapsed()) {
                            std::thread::sleep(rest);
                        }
                    }
                    if r.wrapped {
                        events(MoverEvent::Round {
                            promoted: round.promoted,
                            demoted: round.demoted,
                            placed: round.placed,
                            no_room: round.no_room,
                            secs: round_start.elapsed().as_secs_f64(),
                        });
                        round = PassReport::default();
                        break;
                    }
                }
                Err(e) => {
                    events(MoverEvent::Failed(e));
                    break;
                }
            }
        }
        drop(strong);
        let (m, cv) = wake;
        let mut kicked = m.lock().unwrap_or_else(|p| p.into_inner());
        if !*kicked {
            kicked = cv
                .wait_timeout(kicked, interval)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        *kicked = false;
    }
}
