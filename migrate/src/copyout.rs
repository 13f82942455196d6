//! Copy-out: the background job that migrates every block a Tee's candidate does not hold yet
//! from the trusted version, through the [`Upgrade`] code.
//!
//! The job walks the presence map for absent blocks, in batches, each batch under its stripes
//! held shared (guest writes to those blocks wait for it; guest reads of them, and guest writes
//! elsewhere, do not). All-zero blocks
//! (holes included) become `write_zeroes(unmap)` on the candidate: nothing is copied for them.
//! Blocks a guest write migrated meanwhile (upgrade-on-write) are skipped. The copy is rate
//! limited (bytes of data per second) and sleeps between batches, so guest I/O keeps going.
//!
//! Guest reads of absent blocks are reported to the job (a bounded queue; a full queue drops the
//! report) and copied first. With [`Scope::ReadBlocks`] (copy-on-read) the job copies only
//! those: blocks move as the guest reads them (and, as always, as it writes them).
//!
//! Crash safety: at every checkpoint (every `checkpoint_every`, and at the end) the candidate is
//! flushed, then the presence map persisted, so a bit on disk means the block is durably in the
//! candidate. The presence map is the job's cursor: after a crash, kill -9 or power loss the
//! job starts again on the blocks still absent. Blocks copied after the last checkpoint are
//! absent again and are copied again (at most one checkpoint interval of work); a block whose bit
//! reached the disk is never copied again, and no absent block is ever skipped. (If a guest
//! FLUSH persisted a bit whose copy had not reached the candidate's disk, the Tee's resync after
//! the unclean stop compares and repairs it.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dovetail_layout::error_chain;
use serde::Serialize;

use crate::presence::MAP_BLOCK;
use crate::tee::{Inner, Tee, TeeError};
use crate::upgrade::Upgrade;

/// A rate limit in words: `no limit` for 0, else bytes per second in the largest binary unit
/// that divides it (`128 KiB/s`, `64 MiB/s`, `1000 B/s`).
pub fn rate_text(rate: u64) -> String {
    match rate {
        0 => "no limit".to_string(),
        r if r % (1 << 30) == 0 => format!("{} GiB/s", r >> 30),
        r if r % (1 << 20) == 0 => format!("{} MiB/s", r >> 20),
        r if r % (1 << 10) == 0 => format!("{} KiB/s", r >> 10),
        r => format!("{r} B/s"),
    }
}

/// The copy-out rate when none is given: 64 MiB/s of data.
pub const DEFAULT_RATE: u64 = 64 << 20;

/// How a copy-out runs.
#[derive(Debug, Clone)]
pub struct CopyOutOptions {
    /// Bytes of data copied per second at most; 0 for no limit.
    pub rate: u64,
    /// Blocks per batch (one stripe lock acquisition).
    pub batch_blocks: u64,
    /// How often the copied blocks are made durable and recorded.
    pub checkpoint_every: Duration,
    /// Which blocks the job copies.
    pub scope: Scope,
}

/// Which blocks a migration job copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// Every absent block (copy-out), those guest reads touch first.
    #[default]
    Everything,
    /// Only absent blocks guest reads touch (copy-on-read): the job waits for reads and
    /// finishes only if the guest has read (or written) every block.
    ReadBlocks,
}

impl Default for CopyOutOptions {
    fn default() -> Self {
        CopyOutOptions {
            rate: DEFAULT_RATE,
            batch_blocks: 16,
            checkpoint_every: Duration::from_secs(1),
            scope: Scope::Everything,
        }
    }
}

/// Where a copy-out is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    Running,
    Paused,
    /// Every block is present in the candidate.
    Done,
    Cancelled,
    /// The candidate was quarantined (or the Tee closed): the job stopped.
    Stopped,
    /// Reading the trusted version failed; `error` says why.
    Failed,
}

impl JobState {
    pub fn finished(self) -> bool {
        !matches!(self, JobState::Running | JobState::Paused)
    }
}

/// A copy-out's progress, for status, events and progress bars.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub state: JobState,
    pub blocks_present: u64,
    pub blocks_total: u64,
    /// Blocks this run copied with data, and all-zero blocks it recorded without copying.
    pub copied_blocks: u64,
    pub zero_blocks: u64,
    pub bytes_copied: u64,
    pub elapsed_seconds: f64,
    /// Data bytes per second over this run.
    pub rate_bytes_per_second: f64,
    /// The rate limit (0: none).
    pub rate_limit: u64,
    /// Seconds to go at the current pace, when known.
    pub eta_seconds: Option<f64>,
    pub checkpoints: u64,
    pub error: Option<String>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<JobState>,
    /// The worker is waiting in `Paused` (not in the middle of a batch or a checkpoint).
    parked: std::sync::atomic::AtomicBool,
    cv: Condvar,
    rate: AtomicU64,
    copied: AtomicU64,
    zero: AtomicU64,
    checkpoints: AtomicU64,
    error: Mutex<Option<String>>,
    started: Instant,
    /// Blocks absent when the job started.
    absent_at_start: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Called with (state, message) when the job finishes, for logs and events.
pub type OnFinish = Box<dyn FnOnce(JobState, String) + Send>;

/// A running (or finished) copy-out of one Tee.
#[derive(Debug)]
pub struct CopyOut {
    shared: Arc<Shared>,
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl CopyOut {
    /// Starts copying every block `tee`'s candidate does not hold.
    pub fn start(
        tee: &Tee,
        upgrade: Arc<dyn Upgrade>,
        opts: CopyOutOptions,
        on_finish: OnFinish,
    ) -> Result<CopyOut, TeeError> {
        let inner = tee.inner().clone();
        let shared = Arc::new(Shared {
            state: Mutex::new(JobState::Running),
            parked: std::sync::atomic::AtomicBool::new(false),
            cv: Condvar::new(),
            rate: AtomicU64::new(opts.rate),
            copied: AtomicU64::new(0),
            zero: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            error: Mutex::new(None),
            started: Instant::now(),
            absent_at_start: inner.blocks - inner.presence.count(),
        });
        // Reads from now on are reported, so none the job should take first is missed.
        inner.read_hints.set(true);
        let (s, i) = (shared.clone(), inner.clone());
        let thread = std::thread::Builder::new()
            .name(format!("copy-out-{}", inner.disk))
            .spawn(move || {
                dovetail_store::thread_kind::entered(
                    dovetail_store::thread_kind::ThreadKind::Background,
                );
                // A panic ends the job as failed (reported like any failure), not silently.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(&i, &s, &*upgrade, &opts)
                }));
                let (state, message) = ran.unwrap_or_else(|p| {
                    let cause = dovetail_layout::panic_message(&*p);
                    i.read_hints.set(false);
                    let message = format!("copy-out stopped: it panicked: {cause}");
                    *s.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(message.clone());
                    let mut g = s.lock();
                    *g = JobState::Failed;
                    s.cv.notify_all();
                    drop(g);
                    log::error!("disk {}: {message}", i.disk);
                    (JobState::Failed, message)
                });
                on_finish(state, message);
            })
            .map_err(|e| TeeError::Thread("copy-out", e))?;
        Ok(CopyOut {
            shared,
            inner,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn set(&self, from: &[JobState], to: JobState) -> bool {
        let mut g = self.shared.lock();
        if from.contains(&*g) {
            *g = to;
            self.shared.cv.notify_all();
            true
        } else {
            false
        }
    }

    /// Pauses the job after its current batch (false if it is not running).
    pub fn pause(&self) -> bool {
        self.set(&[JobState::Running], JobState::Paused)
    }

    /// Pauses the job and waits until it has finished its current batch or checkpoint (so it
    /// holds no lock of the Tee), for a live change that must not wait behind it. Returns
    /// whether it was running (and so must be resumed afterwards).
    pub fn hold(&self) -> bool {
        let was_running = self.pause();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut g = self.shared.lock();
        while was_running
            && *g == JobState::Paused
            && !self.shared.parked.load(Ordering::SeqCst)
            && Instant::now() < deadline
        {
            g = self
                .shared
                .cv
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        was_running
    }

    pub fn resume(&self) -> bool {
        self.set(&[JobState::Paused], JobState::Running)
    }

    /// Stops the job after a last checkpoint and waits for it.
    pub fn cancel(&self) {
        self.set(&[JobState::Running, JobState::Paused], JobState::Cancelled);
        self.join();
    }

    pub fn set_rate(&self, rate: u64) {
        self.shared.rate.store(rate, Ordering::Relaxed);
    }

    pub fn state(&self) -> JobState {
        *self.shared.lock()
    }

    /// Waits until the job finishes or `timeout` passes; returns its state.
    pub fn wait(&self, timeout: Duration) -> JobState {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        while !g.finished() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = self
                .shared
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *g
    }

    fn join(&self) {
        let h = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }

    pub fn progress(&self) -> Progress {
        let s = &self.shared;
        let copied = s.copied.load(Ordering::Relaxed);
        let zero = s.zero.load(Ordering::Relaxed);
        let elapsed = s.started.elapsed().as_secs_f64();
        let present = self.inner.presence.count();
        let total = self.inner.blocks;
        let bytes = copied * MAP_BLOCK;
        let done_blocks = copied + zero;
        let remaining = total - present;
        let eta = (done_blocks > 0 && elapsed > 0.0)
            .then(|| remaining as f64 / (done_blocks as f64 / elapsed));
        Progress {
            state: *s.lock(),
            blocks_present: present,
            blocks_total: total,
            copied_blocks: copied,
            zero_blocks: zero,
            bytes_copied: bytes,
            elapsed_seconds: elapsed,
            rate_bytes_per_second: if elapsed > 0.0 {
                bytes as f64 / elapsed
            } else {
                0.0
            },
            rate_limit: s.rate.load(Ordering::Relaxed),
            eta_seconds: eta,
            checkpoints: s.checkpoints.load(Ordering::Relaxed),
            error: s.error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// Blocks that were absent when the job started.
    pub fn absent_at_start(&self) -> u64 {
        self.shared.absent_at_start
    }
}

impl Drop for CopyOut {
    fn drop(&mut self) {
        self.cancel();
    }
}

fn checkpoint(inner: &Inner, s: &Shared) -> bool {
    match inner.migration_checkpoint() {
        Ok(true) => {
            s.checkpoints.fetch_add(1, Ordering::Relaxed);
            true
        }
        Ok(false) => false,
        Err(e) => {
            *s.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error_chain(&e));
            false
        }
    }
}

fn run(
    inner: &Inner,
    s: &Shared,
    upgrade: &dyn Upgrade,
    opts: &CopyOutOptions,
) -> (JobState, String) {
    let batch = opts.batch_blocks.max(1);
    let job = match opts.scope {
        Scope::Everything => "copy-out",
        Scope::ReadBlocks => "copy-on-read",
    };
    let mut buf = Vec::new();
    let mut cursor = 0u64;
    let mut last_checkpoint = Instant::now();
    // The rate limit: data bytes since `window_start` may not run ahead of the rate.
    let mut window_start = Instant::now();
    let mut window_bytes = 0u64;
    log::info!(
        "disk {}: {job} started ({} of {} blocks to migrate, upgrade {}, rate {})",
        inner.disk,
        s.absent_at_start,
        inner.blocks,
        upgrade.name(),
        rate_text(opts.rate)
    );
    // Guest reads of absent blocks come first (copy-on-read, and priority in a copy-out); they
    // are reported from `CopyOut::start` on.
    let mut hinted: Option<(u64, u64)> = None;
    let end = loop {
        {
            let mut g = s.lock();
            while *g == JobState::Paused {
                s.parked.store(true, Ordering::SeqCst);
                s.cv.notify_all();
                g = s.cv.wait(g).unwrap_or_else(|p| p.into_inner());
                s.parked.store(false, Ordering::SeqCst);
                window_start = Instant::now();
                window_bytes = 0;
            }
            if *g == JobState::Cancelled {
                break JobState::Cancelled;
            }
        }
        if hinted.is_none() {
            hinted = match opts.scope {
                Scope::Everything => inner.read_hints.rx.try_recv().ok(),
                Scope::ReadBlocks => {
                    if inner.presence.count() == inner.blocks {
                        break JobState::Done;
                    }
                    match inner.read_hints.rx.recv_timeout(Duration::from_millis(100)) {
                        Ok(h) => Some(h),
                        Err(_) => {
                            // Idle: keep what was copied durable, look at the state again.
                            if last_checkpoint.elapsed() >= opts.checkpoint_every {
                                if !checkpoint(inner, s) {
                                    break JobState::Stopped;
                                }
                                last_checkpoint = Instant::now();
                            }
                            continue;
                        }
                    }
                }
            };
        }
        // The next batch: from a run guest reads touched, else from the cursor.
        let (b, n, from_cursor) = match hinted.take() {
            Some((first, last)) => {
                let n = (last - first + 1).min(batch);
                if first + n <= last {
                    hinted = Some((first + n, last));
                }
                (first, n, false)
            }
            None => match inner.presence.next_absent(cursor) {
                Some(b) => (b, batch, true),
                None => break JobState::Done,
            },
        };
        match inner.migrate_blocks(b, n, upgrade, &mut buf) {
            Ok(Some((data, zero))) => {
                s.copied.fetch_add(data, Ordering::Relaxed);
                s.zero.fetch_add(zero, Ordering::Relaxed);
                window_bytes += data * MAP_BLOCK;
            }
            Ok(None) => break JobState::Stopped,
            Err(e) => {
                *s.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
                    "reading block {b} of the trusted version: {}",
                    error_chain(&e)
                ));
                break JobState::Failed;
            }
        }
        if from_cursor {
            cursor = b + batch;
        }
        if last_checkpoint.elapsed() >= opts.checkpoint_every {
            if !checkpoint(inner, s) {
                break JobState::Stopped;
            }
            last_checkpoint = Instant::now();
        }
        let rate = s.rate.load(Ordering::Relaxed);
        if rate > 0 {
            let due = Duration::from_secs_f64(window_bytes as f64 / rate as f64);
            let spent = window_start.elapsed();
            if due > spent {
                std::thread::sleep(due - spent);
            }
            if window_start.elapsed() > Duration::from_secs(2) {
                window_start = Instant::now();
                window_bytes = 0;
            }
        } else {
            // Let the guest's requests waiting on these stripes in.
            std::thread::yield_now();
        }
    };
    inner.read_hints.set(false);
    let end = if matches!(end, JobState::Done | JobState::Cancelled) && !checkpoint(inner, s) {
        JobState::Stopped
    } else {
        end
    };
    {
        let mut g = s.lock();
        *g = end;
        s.cv.notify_all();
    }
    let message = match end {
        JobState::Done => format!(
            "{job} finished: {} blocks copied, {} zero blocks recorded, every block present, \
             in {:.1} s",
            s.copied.load(Ordering::Relaxed),
            s.zero.load(Ordering::Relaxed),
            s.started.elapsed().as_secs_f64()
        ),
        JobState::Cancelled => format!(
            "{job} cancelled with {} of {} blocks present",
            inner.presence.count(),
            inner.blocks
        ),
        JobState::Failed | JobState::Stopped => format!(
            "{job} stopped: {}",
            s.error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_else(|| "the candidate was quarantined or the Tee closed".into())
        ),
        JobState::Running | JobState::Paused => String::new(),
    };
    log::info!("disk {}: {message}", inner.disk);
    (end, message)
}
