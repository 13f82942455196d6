//! Promote's verification pass: before a candidate becomes the trusted version (the
//! irreversible step), every block of it is compared with the trusted version (XXH3-64 per
//! 4 KiB block), so that a presence map that lies (forged, or damaged in a way its checksums
//! cannot see) never promotes a candidate that lacks data.
//!
//! The pass runs over a Tee, piece by piece ([`Tee::compare_blocks`]: under the blocks' stripes,
//! after draining the background stream, so a concurrent guest write cannot cause a false
//! mismatch), rate limited (bytes of one version per second), and checkpoints its cursor
//! (through the caller, into the migration record) so that after a crash it resumes where it
//! stopped: blocks before the cursor were found equal, and the Tee keeps them equal (every
//! guest write reaches both versions; after an unclean stop its resync compares and repairs
//! them before the pass runs again).
//!
//! A mismatch does not stop the pass: it runs to the end to count them, and names the first
//! [`FIRST_MISMATCHES`]; the cursor it checkpoints stops at the first mismatch.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::presence::MAP_BLOCK;
use crate::tee::{Tee, PIECE};

/// Mismatched blocks a failed pass names.
pub const FIRST_MISMATCHES: usize = 16;
/// The pass's rate when none is given: 256 MiB/s of each version's data.
pub const DEFAULT_VERIFY_RATE: u64 = 256 << 20;
/// How often the cursor is checkpointed.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

const PIECE_BLOCKS: u64 = PIECE / MAP_BLOCK;

const RUNNING: u8 = 0;
const PASSED: u8 = 1;
const FAILED: u8 = 2;
const STOPPED: u8 = 3;

/// A pass's progress, shared with whoever reports it (`migrate --status`).
#[derive(Debug)]
pub struct VerifyProgress {
    blocks: u64,
    resumed_from: u64,
    cursor: AtomicU64,
    mismatched: AtomicU64,
    first: Mutex<Vec<u64>>,
    state: AtomicU8,
    error: Mutex<Option<String>>,
    rate: u64,
    started: Instant,
}

/// A pass as `migrate --status` reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VerifyStatus {
    /// `running`, `passed`, `failed` (mismatches or an error) or `stopped`.
    pub state: &'static str,
    /// Blocks compared so far (the pass's position), of `blocks_total`.
    pub blocks_verified: u64,
    pub blocks_total: u64,
    /// Where this run of the pass started (non-zero: resumed from a checkpoint).
    pub resumed_from: u64,
    pub mismatched_blocks: u64,
    /// The first mismatched blocks (4 KiB block numbers), at most 16.
    pub first_mismatches: Vec<u64>,
    /// The limit in bytes per second of each version (0: none).
    pub rate_limit: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How a pass ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every block is equal in both versions.
    Passed,
    /// `count` blocks differ; the first ones are named.
    Mismatch { count: u64, first: Vec<u64> },
    /// A version could not be read, the candidate was quarantined, a checkpoint failed.
    Failed(String),
    /// `stop` said so (the cursor was checkpointed).
    Stopped,
}

impl Outcome {
    /// One sentence for a refusal.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Passed => "every block of the candidate equals the trusted version".into(),
            Outcome::Mismatch { count, first } => format!(
                "{count} block(s) of the candidate differ from the trusted version (4 KiB \
                 blocks {}{})",
                first
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                if *count > first.len() as u64 {
                    format!(", and {} more", count - first.len() as u64)
                } else {
                    String::new()
                }
            ),
            Outcome::Failed(why) => format!("the verification pass failed: {why}"),
            Outcome::Stopped => "the verification pass was stopped".into(),
        }
    }
}

impl VerifyProgress {
    /// A pass over `blocks` blocks starting at `from`, at `rate` bytes per second (0: none).
    pub fn new(blocks: u64, from: u64, rate: u64) -> VerifyProgress {
        let from = from.min(blocks);
        VerifyProgress {
            blocks,
            resumed_from: from,
            cursor: AtomicU64::new(from),
            mismatched: AtomicU64::new(0),
            first: Mutex::new(Vec::new()),
            state: AtomicU8::new(RUNNING),
            error: Mutex::new(None),
            rate,
            started: Instant::now(),
        }
    }

    pub fn status(&self) -> VerifyStatus {
        VerifyStatus {
            state: match self.state.load(Ordering::Acquire) {
                RUNNING => "running",
                PASSED => "passed",
                FAILED => "failed",
                _ => "stopped",
            },
            blocks_verified: self.cursor.load(Ordering::Relaxed),
            blocks_total: self.blocks,
            resumed_from: self.resumed_from,
            mismatched_blocks: self.mismatched.load(Ordering::Relaxed),
            first_mismatches: self.first.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            rate_limit: self.rate,
            error: self.error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// Seconds since the pass started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Runs the pass over `tee` as `progress` says (from its cursor to the end of the disk).
/// `checkpoint(verified)` records that blocks `0..verified` were found equal (every
/// [`CHECKPOINT_EVERY`] and at the end); `stop()` is polled between pieces. Waits while the
/// Tee's resync after an unclean stop has blocks left (they may still differ until it repairs
/// them).
pub fn run(
    tee: &Tee,
    progress: &VerifyProgress,
    checkpoint: &mut dyn FnMut(u64) -> Result<(), String>,
    stop: &dyn Fn() -> bool,
) -> Outcome {
    let outcome = run_inner(tee, progress, checkpoint, stop);
    let (state, error) = match &outcome {
        Outcome::Passed => (PASSED, None),
        Outcome::Mismatch { .. } => (FAILED, None),
        Outcome::Failed(why) => (FAILED, Some(why.clone())),
        Outcome::Stopped => (STOPPED, None),
    };
    *progress.error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    progress.state.store(state, Ordering::Release);
    outcome
}

fn run_inner(
    tee: &Tee,
    p: &VerifyProgress,
    checkpoint: &mut dyn FnMut(u64) -> Result<(), String>,
    stop: &dyn Fn() -> bool,
) -> Outcome {
    let blocks = p.blocks;
    let mut at = p.cursor.load(Ordering::Relaxed);
    // The end of the prefix found equal (stops at the first mismatch).
    let mut equal_to = at;
    let mut first_bad: Option<u64> = None;
    let mut last_checkpoint = Instant::now();
    let window = Instant::now();
    let mut window_bytes = 0u64;
    let (mut t, mut c) = (Vec::new(), Vec::new());
    log::info!(
        "verification pass: blocks {at}..{blocks} ({}{})",
        crate::copyout::rate_text(p.rate),
        if at > 0 {
            format!(", resumed at block {at}")
        } else {
            String::new()
        }
    );
    while tee.unverified_blocks() > 0 {
        if stop() {
            return Outcome::Stopped;
        }
        if tee.quarantined() {
            return Outcome::Failed("the candidate is quarantined".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    while at < blocks {
        if stop() {
            let _ = checkpoint(equal_to);
            return Outcome::Stopped;
        }
        let last = (at + PIECE_BLOCKS).min(blocks) - 1;
        let bad = match tee.compare_blocks(at, last, &mut t, &mut c) {
            Ok(b) => b,
            Err(why) => {
                let _ = checkpoint(equal_to);
                return Outcome::Failed(why);
            }
        };
        if !bad.is_empty() {
            first_bad.get_or_insert(bad[0]);
            p.mismatched.fetch_add(bad.len() as u64, Ordering::Relaxed);
            let mut f = p.first.lock().unwrap_or_else(|e| e.into_inner());
            let room = FIRST_MISMATCHES.saturating_sub(f.len());
            f.extend(bad.iter().take(room));
        }
        at = last + 1;
        if first_bad.is_none() {
            equal_to = at;
        }
        p.cursor.store(at, Ordering::Relaxed);
        dovetail_store::failpoint::hit("promote-verify");
        if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            if let Err(why) = checkpoint(equal_to) {
                return Outcome::Failed(format!("checkpointing the cursor: {why}"));
            }
            last_checkpoint = Instant::now();
        }
        window_bytes += t.len() as u64;
        if p.rate > 0 {
            let due = Duration::from_secs_f64(window_bytes as f64 / p.rate as f64);
            let spent = window.elapsed();
            if due > spent {
                std::thread::sleep(due - spent);
            }
        }
    }
    if let Err(why) = checkpoint(equal_to) {
        return Outcome::Failed(format!("checkpointing the cursor: {why}"));
    }
    let count = p.mismatched.load(Ordering::Relaxed);
    if count == 0 {
        log::info!("verification pass: every block of blocks 0..{blocks} is equal");
        Outcome::Passed
    } else {
        let first = p.first.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Outcome::Mismatch { count, first }
    }
}
