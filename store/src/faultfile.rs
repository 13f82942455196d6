//! A fault-injecting [`StoreFile`]: [`FaultFile`] wraps one of a store's files (the metadata
//! file or a tier's data file) and, when one of its [`FileFaultRule`]s *hits*, fails the
//! operation the way a failing device or a full file system does: `EIO`, `ENOSPC`, a short
//! write (part of the buffer written, then `ENOSPC`: what a `pwrite` loop sees when the device
//! fills), or a failed sync (`fdatasync` returning `EIO`), optionally losing the writes the
//! sync was to make durable; or it delays the operation (`slow`: a device that stalls) and
//! then does it. A store opened over such files ([`crate::Store::open_on`],
//! [`crate::Store::open_on_tiers`]) shows how the store, the layouts and the daemon above them
//! report storage errors, and whether anything acknowledged is lost. For tests.
//!
//! It is the file-level sibling of `dovetail_layout::fault::FaultLayout` (which fails whole
//! guest requests): here the faults land inside the store's own I/O (a tree node written back,
//! an extent zeroed before a grant, a metadata slot, a sync in the middle of a commit).
//!
//! # Rule grammar
//!
//! ```text
//! RULE   := KIND [ ":" PARAM { "," PARAM } ]
//! PARAM  := KEY "=" VALUE                     (spaces around KIND, KEY and VALUE are ignored)
//! KIND   := eio | enospc | short-write | slow
//! KEY    := op | nth | after | prob | keep | ms | lose
//! ```
//!
//! | kind | applies to | effect |
//! | --- | --- | --- |
//! | `eio` | every operation | fails with `EIO`; nothing is read, written or synced |
//! | `enospc` | write, zero-range, sync | fails with `ENOSPC`; nothing is written or synced |
//! | `short-write` | write | writes the first `keep` bytes of the buffer, then fails with `ENOSPC` |
//! | `slow` | every operation | waits `ms` milliseconds, then does the operation (which may still fail by another rule) |
//!
//! Conditions and parameters (all optional; conditions combine with AND):
//!
//! - `op=read|write|sync|zero-range|any`: which operations the rule considers. `read` is
//!   [`StoreFile::read_at`] and [`StoreFile::read_raw`], `write` is [`StoreFile::write_at`],
//!   `sync` is [`StoreFile::sync`], `zero-range` is [`StoreFile::zero_range`] (hole punching:
//!   what a grant does to an extent before handing it out). `size` and `set_size` are never
//!   faulted. The default is `any` for `eio` (every operation) and `write` for `enospc` and
//!   `short-write`; `enospc` also takes `zero-range`, `sync` and `any` (every operation it
//!   applies to), `short-write` only `write`.
//! - `after=N`: skip the first `N` matching operations.
//! - `nth=N` (N ≥ 1): only the `N`th matching operation, so the rule hits at most once. With
//!   `after=M`, `M` must be below `N`.
//! - `prob=P` (0 ≤ P ≤ 1, default 1): a matching operation that passed `after`/`nth` is hit
//!   with probability `P`, drawn from the rule's own generator (seeded from the file's seed and
//!   the rule's position), so a run is deterministic for a seed and a fixed order of operations.
//! - `keep=N` (`short-write` only): bytes written before the error. The default is half the
//!   buffer rounded down to a multiple of 512 bytes; either way at most the buffer's length
//!   minus one, so the write is always short.
//! - `ms=N` (`slow` only, 1 ≤ N ≤ 60000, default 10): the delay, in milliseconds. The delay
//!   is taken on the calling thread, before the operation, holding nothing the file's other
//!   operations wait for (except a `lose=true` sync failure, which waits for writes in
//!   progress).
//! - `lose=true|false` (`eio` and `enospc` with `op=sync` or `op=any`, default `false`): when
//!   the rule fails a sync, the writes made to the file since its last successful sync are lost:
//!   their ranges are overwritten with [`POISON`] in the underlying file. This is what Linux may
//!   do after a writeback error: the dirty pages are dropped (or marked clean) and the *next*
//!   `fsync` succeeds without having written them; a reader that missed the cache gets whatever
//!   the device holds. Poison is harsher than the device's old contents, so nothing that relies
//!   on the lost writes goes unnoticed. Without `lose`, the failed sync leaves the writes where
//!   they were (a later successful sync makes them durable).
//!
//! A *matching* operation is one of the rule's `op` that its kind applies to; the rule counts
//! those (1-based, per rule and per file) for `after` and `nth`.
//!
//! A `slow` rule does not decide an operation's fate: every `slow` rule that hits adds its
//! delay (each counted as a fault injected), and the first other rule that hits, if any, then
//! fails the operation as usual.
//!
//! Examples: `eio:op=read`, `eio:nth=5,op=write`, `enospc:prob=0.1`, `short-write:after=3`,
//! `short-write:keep=4096,nth=2`, `eio:nth=1,op=sync`, `eio:nth=2,op=sync,lose=true`,
//! `enospc:op=zero-range`, `slow:ms=50,op=sync`, `slow:ms=5,prob=0.01`.
//!
//! `Display` prints the canonical form: the kind, then the parameters that differ from their
//! defaults in the order `keep, ms, nth, after, prob, op, lose` (`ms` always, for `slow`); for every rule `r`,
//! `r.to_string().parse() == Ok(r)`.
//!
//! # Several rules, switching off, counting
//!
//! Every rule of a file sees every operation of the file (each rule's counter and generator
//! advance independently); of the rules that hit one operation, the first in rule order decides
//! its fate. Several files share one [`FaultControl`] (`Arc`), which counts the faults injected
//! (in total, by kind and by operation, plus a bounded log of the last ones) and switches
//! injection off and on at run time: a test runs its workload with faults, calls
//! [`FaultControl::disable`], then verifies through the same files. While disabled, rules
//! neither hit nor count operations.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::file::StoreFile;
use crate::rng::SplitMix64;
use crate::rules::{self, SyntaxProblem};

/// The byte a `lose=true` sync failure writes over every range it loses.
pub const POISON: u8 = 0xdb;

/// How many injected faults [`FaultControl::events`] keeps (the oldest are dropped).
pub const EVENT_LOG: usize = 4096;

/// Bytes poisoned per write when a sync loses a range.
const POISON_CHUNK: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------------

/// What a rule does when it hits. See the [module documentation](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileFaultKind {
    /// Fails with `EIO`.
    Eio,
    /// Fails with `ENOSPC`.
    Enospc,
    /// Writes part of the buffer, then fails with `ENOSPC`.
    ShortWrite,
    /// Delays the operation, then does it.
    Slow,
}

impl FileFaultKind {
    /// Every kind, in the order the documentation lists them.
    pub const ALL: [FileFaultKind; 4] = [
        FileFaultKind::Eio,
        FileFaultKind::Enospc,
        FileFaultKind::ShortWrite,
        FileFaultKind::Slow,
    ];

    /// The name used in rules.
    pub fn name(self) -> &'static str {
        match self {
            FileFaultKind::Eio => "eio",
            FileFaultKind::Enospc => "enospc",
            FileFaultKind::ShortWrite => "short-write",
            FileFaultKind::Slow => "slow",
        }
    }

    /// The kind named `name`, if any.
    pub fn from_name(name: &str) -> Option<FileFaultKind> {
        FileFaultKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The `op` a rule of this kind has unless it says otherwise.
    pub fn default_op(self) -> FileOp {
        match self {
            FileFaultKind::Eio | FileFaultKind::Slow => FileOp::Any,
            FileFaultKind::Enospc | FileFaultKind::ShortWrite => FileOp::Write,
        }
    }

    /// Whether a rule of this kind can do anything to an operation of type `op`.
    pub fn applies_to(self, op: Op) -> bool {
        match self {
            FileFaultKind::Eio | FileFaultKind::Slow => true,
            FileFaultKind::Enospc => op != Op::Read,
            FileFaultKind::ShortWrite => op == Op::Write,
        }
    }

    /// Whether `op=OP` may be given on a rule of this kind.
    fn allows(self, op: FileOp) -> bool {
        match self {
            FileFaultKind::Eio | FileFaultKind::Slow => true,
            FileFaultKind::Enospc => op != FileOp::Read,
            FileFaultKind::ShortWrite => op == FileOp::Write,
        }
    }

    /// The error the failed operation returns (a `slow` rule fails nothing).
    fn errno(self) -> i32 {
        match self {
            FileFaultKind::Eio | FileFaultKind::Slow => libc::EIO,
            FileFaultKind::Enospc | FileFaultKind::ShortWrite => libc::ENOSPC,
        }
    }
}

impl fmt::Display for FileFaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The operations a rule considers (its `op=` condition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileOp {
    Read,
    Write,
    Sync,
    ZeroRange,
    /// Every operation the rule's kind applies to.
    Any,
}

impl FileOp {
    /// Every value, in the order error messages list them.
    pub const ALL: [FileOp; 5] = [
        FileOp::Read,
        FileOp::Write,
        FileOp::Sync,
        FileOp::ZeroRange,
        FileOp::Any,
    ];

    /// The name used in rules.
    pub fn name(self) -> &'static str {
        match self {
            FileOp::Read => "read",
            FileOp::Write => "write",
            FileOp::Sync => "sync",
            FileOp::ZeroRange => "zero-range",
            FileOp::Any => "any",
        }
    }

    /// The value named `name`, if any.
    pub fn from_name(name: &str) -> Option<FileOp> {
        FileOp::ALL.into_iter().find(|o| o.name() == name)
    }

    fn matches(self, op: Op) -> bool {
        match self {
            FileOp::Read => op == Op::Read,
            FileOp::Write => op == Op::Write,
            FileOp::Sync => op == Op::Sync,
            FileOp::ZeroRange => op == Op::ZeroRange,
            FileOp::Any => true,
        }
    }
}

impl fmt::Display for FileOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One operation on a file, as counted and reported ([`FileOp`] without `Any`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write,
    Sync,
    ZeroRange,
}

impl Op {
    /// Every operation.
    pub const ALL: [Op; 4] = [Op::Read, Op::Write, Op::Sync, Op::ZeroRange];

    /// The operation's name, as in rules.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Sync => "sync",
            Op::ZeroRange => "zero-range",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One fault rule: a kind and the conditions under which it hits.
///
/// Build one with [`FromStr`] (which validates it) or with [`FileFaultRule::new`] and the
/// public fields, then [`FileFaultRule::check`]. A [`FaultFile`] does not fail on an invalid
/// rule: an `op` the kind does not apply to simply never matches.
#[derive(Debug, Clone, PartialEq)]
pub struct FileFaultRule {
    pub kind: FileFaultKind,
    /// Which operations the rule considers (`op=`); see [`FileFaultKind::default_op`].
    pub op: FileOp,
    /// Only the `nth` matching operation (1-based) can be hit (`nth=`).
    pub nth: Option<u64>,
    /// The first `after` matching operations are never hit (`after=`, default 0).
    pub after: u64,
    /// Probability that a matching operation is hit (`prob=`, 0..=1, default 1).
    pub prob: f64,
    /// `short-write`: bytes written before the error (`keep=`; `None`: half the buffer, rounded
    /// down to 512 bytes).
    pub keep: Option<u64>,
    /// `slow`: the delay in milliseconds (`ms=`, [`DEFAULT_SLOW_MS`] unless given); `None`
    /// for every other kind.
    pub ms: Option<u64>,
    /// A failed sync loses the writes since the file's last successful sync (`lose=`).
    pub lose: bool,
}

/// A `slow` rule's delay unless it gives `ms=`.
pub const DEFAULT_SLOW_MS: u64 = 10;

/// The longest delay a `slow` rule may ask for (ms).
pub const MAX_SLOW_MS: u64 = 60_000;

impl FileFaultRule {
    /// A rule of `kind` with every condition at its default (hits every operation it applies
    /// to).
    pub fn new(kind: FileFaultKind) -> FileFaultRule {
        FileFaultRule {
            kind,
            op: kind.default_op(),
            nth: None,
            after: 0,
            prob: 1.0,
            keep: None,
            ms: (kind == FileFaultKind::Slow).then_some(DEFAULT_SLOW_MS),
            lose: false,
        }
    }

    /// Checks a rule built by hand the way [`FromStr`] checks a parsed one.
    pub fn check(&self) -> Result<(), FileFaultRuleError> {
        self.problem().map_or(Ok(()), |problem| {
            Err(FileFaultRuleError {
                spec: self.to_string(),
                problem,
            })
        })
    }

    /// What is wrong with the rule's combination of values, if anything.
    fn problem(&self) -> Option<FileFaultRuleProblem> {
        if !self.kind.allows(self.op) {
            return Some(FileFaultRuleProblem::OpNotForKind {
                kind: self.kind,
                op: self.op,
            });
        }
        if let Some(p) = rules::check_counts(self.prob, self.nth, self.after) {
            return Some(p.into());
        }
        if self.keep.is_some() && self.kind != FileFaultKind::ShortWrite {
            return Some(FileFaultRuleProblem::KeyNotForKind {
                key: "keep",
                kind: self.kind,
            });
        }
        match (self.kind, self.ms) {
            (FileFaultKind::Slow, None) => return Some(FileFaultRuleProblem::SlowWithoutMs),
            (FileFaultKind::Slow, Some(ms)) if !(1..=MAX_SLOW_MS).contains(&ms) => {
                return Some(
                    SyntaxProblem::BadValue {
                        key: "ms",
                        value: ms.to_string(),
                        expected: "a delay of 1 to 60000 milliseconds",
                    }
                    .into(),
                )
            }
            (FileFaultKind::Slow, Some(_)) => {}
            (kind, Some(_)) => {
                return Some(FileFaultRuleProblem::KeyNotForKind { key: "ms", kind })
            }
            (_, None) => {}
        }
        if self.lose
            && (matches!(self.kind, FileFaultKind::ShortWrite | FileFaultKind::Slow)
                || !matches!(self.op, FileOp::Sync | FileOp::Any))
        {
            return Some(FileFaultRuleProblem::LoseWithoutSync {
                kind: self.kind,
                op: self.op,
            });
        }
        None
    }

    /// Whether an operation of type `op` matches the rule's `op` condition and kind.
    fn matches(&self, op: Op) -> bool {
        self.op.matches(op) && self.kind.applies_to(op)
    }

    /// Bytes a `short-write` hit writes of a buffer of `len` bytes.
    fn kept(&self, len: usize) -> usize {
        let want = match self.keep {
            Some(k) => usize::try_from(k).unwrap_or(usize::MAX),
            None => len / 2 / 512 * 512,
        };
        want.min(len.saturating_sub(1))
    }
}

/// Keys a rule may carry, in the order error messages list them.
const KEYS: &[&str] = &["op", "nth", "after", "prob", "keep", "ms", "lose"];

impl FromStr for FileFaultRule {
    type Err = FileFaultRuleError;

    fn from_str(s: &str) -> Result<FileFaultRule, FileFaultRuleError> {
        parse_rule(s).map_err(|problem| FileFaultRuleError {
            spec: s.to_string(),
            problem,
        })
    }
}

/// The parser behind [`FileFaultRule::from_str`]; the caller attaches the spec.
fn parse_rule(s: &str) -> Result<FileFaultRule, FileFaultRuleProblem> {
    let spec = rules::split(s, KEYS)?;
    let kind = FileFaultKind::from_name(spec.kind)
        .ok_or_else(|| FileFaultRuleProblem::UnknownKind(spec.kind.to_string()))?;
    let mut rule = FileFaultRule::new(kind);
    for (key, value) in spec.params {
        match key {
            "op" => {
                let op = FileOp::from_name(value)
                    .ok_or_else(|| FileFaultRuleProblem::UnknownOp(value.to_string()))?;
                if !kind.allows(op) {
                    return Err(FileFaultRuleProblem::OpNotForKind { kind, op });
                }
                rule.op = op;
            }
            "nth" => rule.nth = Some(rules::nth(key, value)?),
            "after" => rule.after = rules::number(key, value, "a count")?,
            "prob" => rule.prob = rules::probability(key, value)?,
            "keep" => {
                if kind != FileFaultKind::ShortWrite {
                    return Err(FileFaultRuleProblem::KeyNotForKind { key, kind });
                }
                rule.keep = Some(rules::number(key, value, "a number of bytes")?);
            }
            "ms" => {
                if kind != FileFaultKind::Slow {
                    return Err(FileFaultRuleProblem::KeyNotForKind { key, kind });
                }
                rule.ms = Some(rules::number(
                    key,
                    value,
                    "a delay of 1 to 60000 milliseconds",
                )?);
            }
            "lose" => {
                rule.lose = match value {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(SyntaxProblem::BadValue {
                            key,
                            value: value.to_string(),
                            expected: "true or false",
                        }
                        .into())
                    }
                };
            }
            // `split` let only `KEYS` through.
            _ => unreachable!("key {key} is not in KEYS"),
        }
    }
    // The checks that depend on several keys.
    match rule.problem() {
        Some(p) => Err(p),
        None => Ok(rule),
    }
}

impl fmt::Display for FileFaultRule {
    /// The canonical form: the kind, then the non-default parameters in the order
    /// `keep, ms, nth, after, prob, op, lose` (`ms` always, for `slow`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.name())?;
        let mut sep = ':';
        let mut param = |f: &mut fmt::Formatter<'_>, p: fmt::Arguments<'_>| {
            let r = write!(f, "{sep}{p}");
            sep = ',';
            r
        };
        if let Some(k) = self.keep {
            param(f, format_args!("keep={k}"))?;
        }
        if let Some(ms) = self.ms {
            param(f, format_args!("ms={ms}"))?;
        }
        if let Some(n) = self.nth {
            param(f, format_args!("nth={n}"))?;
        }
        if self.after != 0 {
            param(f, format_args!("after={}", self.after))?;
        }
        // `f64`'s Display is the shortest string that parses back to the same value.
        if self.prob != 1.0 {
            param(f, format_args!("prob={}", self.prob))?;
        }
        if self.op != self.kind.default_op() {
            param(f, format_args!("op={}", self.op))?;
        }
        if self.lose {
            param(f, format_args!("lose=true"))?;
        }
        Ok(())
    }
}

/// Parses one rule per string.
pub fn parse_rules<S: AsRef<str>>(specs: &[S]) -> Result<Vec<FileFaultRule>, FileFaultRuleError> {
    specs.iter().map(|s| s.as_ref().parse()).collect()
}

/// A rule that does not parse: the rule as given and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad file fault rule {spec:?}: {problem}")]
pub struct FileFaultRuleError {
    /// The rule as given.
    pub spec: String,
    pub problem: FileFaultRuleProblem,
}

/// What is wrong with a file fault rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileFaultRuleProblem {
    #[error(transparent)]
    Syntax(#[from] SyntaxProblem),
    #[error("unknown fault kind {0:?} (expected one of eio, enospc, short-write, slow)")]
    UnknownKind(String),
    #[error("parameter {key:?} does not apply to {kind}")]
    KeyNotForKind {
        key: &'static str,
        kind: FileFaultKind,
    },
    #[error("unknown op {0:?} (expected one of read, write, sync, zero-range, any)")]
    UnknownOp(String),
    #[error("op={op} does not apply to {kind} (eio, slow: any op; enospc: write, zero-range, sync, any; short-write: write)")]
    OpNotForKind { kind: FileFaultKind, op: FileOp },
    #[error("lose=true needs a rule that can fail a sync (eio or enospc with op=sync or op=any), not {kind} with op={op}")]
    LoseWithoutSync { kind: FileFaultKind, op: FileOp },
    #[error("a slow rule needs its delay (ms=N)")]
    SlowWithoutMs,
}

// ---------------------------------------------------------------------------------------------
// Control and counts
// ---------------------------------------------------------------------------------------------

/// One injected fault, as [`FaultControl::events`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// The name the file was given ([`FaultFile::new`]).
    pub file: String,
    pub op: Op,
    pub kind: FileFaultKind,
    /// Byte offset and length of the operation (0 and 0 for a sync).
    pub offset: u64,
    pub len: u64,
    /// Bytes a short write wrote; bytes a `lose=true` sync failure poisoned.
    pub bytes: u64,
    /// The rule that hit, in canonical form.
    pub rule: String,
}

/// Counts of injected faults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Every fault injected.
    pub total: u64,
    pub eio: u64,
    pub enospc: u64,
    pub short_writes: u64,
    /// Operations a `slow` rule delayed, and the milliseconds they waited in all.
    pub slow: u64,
    pub slow_ms: u64,
    /// Operations failed, by operation (`slow` delays are not counted here).
    pub reads: u64,
    pub writes: u64,
    pub syncs: u64,
    pub zero_ranges: u64,
    /// Failed syncs that lost writes (`lose=true`), and the bytes they poisoned.
    pub lost_syncs: u64,
    pub lost_bytes: u64,
}

/// Shared by the [`FaultFile`]s of one test: switches injection on and off and counts what
/// was injected. Injection starts enabled.
#[derive(Debug)]
pub struct FaultControl {
    enabled: AtomicBool,
    by_kind: [AtomicU64; 4],
    by_op: [AtomicU64; 4],
    slow_ms: AtomicU64,
    lost_syncs: AtomicU64,
    lost_bytes: AtomicU64,
    events: Mutex<VecDeque<Injected>>,
}

impl FaultControl {
    /// A control with injection enabled and nothing counted.
    pub fn new() -> Arc<FaultControl> {
        Arc::new(FaultControl {
            enabled: AtomicBool::new(true),
            by_kind: Default::default(),
            by_op: Default::default(),
            slow_ms: AtomicU64::new(0),
            lost_syncs: AtomicU64::new(0),
            lost_bytes: AtomicU64::new(0),
            events: Mutex::new(VecDeque::new()),
        })
    }

    /// Stops injecting: every operation of every file goes straight through from now on (an
    /// operation already past its rules is not affected).
    pub fn disable(&self) {
        self.enabled.store(false, Ordering::SeqCst);
    }

    /// Starts injecting again.
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::SeqCst);
    }

    /// Whether faults are being injected.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Faults injected so far, by every file sharing this control.
    pub fn injected(&self) -> u64 {
        self.by_kind.iter().map(|c| c.load(Ordering::SeqCst)).sum()
    }

    /// Operations of type `op` failed by a fault (delays not counted).
    pub fn injected_on(&self, op: Op) -> u64 {
        self.by_op[op.index()].load(Ordering::SeqCst)
    }

    /// Every count.
    pub fn counts(&self) -> FaultCounts {
        let k = |i: usize| self.by_kind[i].load(Ordering::SeqCst);
        FaultCounts {
            total: self.injected(),
            eio: k(0),
            enospc: k(1),
            short_writes: k(2),
            slow: k(3),
            slow_ms: self.slow_ms.load(Ordering::SeqCst),
            reads: self.injected_on(Op::Read),
            writes: self.injected_on(Op::Write),
            syncs: self.injected_on(Op::Sync),
            zero_ranges: self.injected_on(Op::ZeroRange),
            lost_syncs: self.lost_syncs.load(Ordering::SeqCst),
            lost_bytes: self.lost_bytes.load(Ordering::SeqCst),
        }
    }

    /// The last [`EVENT_LOG`] faults injected, oldest first.
    pub fn events(&self) -> Vec<Injected> {
        lock(&self.events).iter().cloned().collect()
    }

    fn record(&self, event: Injected) {
        let kind = match event.kind {
            FileFaultKind::Eio => 0,
            FileFaultKind::Enospc => 1,
            FileFaultKind::ShortWrite => 2,
            FileFaultKind::Slow => 3,
        };
        log::debug!(
            "file fault injection: {}: rule `{}` hit a {} of {} bytes at {}",
            event.file,
            event.rule,
            event.op,
            event.len,
            event.offset
        );
        let mut events = lock(&self.events);
        // Counted under the log's lock, so a reader of `events` and the counts sees both.
        self.by_kind[kind].fetch_add(1, Ordering::SeqCst);
        // By operation: the operations failed (a delay fails nothing).
        if event.kind != FileFaultKind::Slow {
            self.by_op[event.op.index()].fetch_add(1, Ordering::SeqCst);
        }
        if events.len() == EVENT_LOG {
            events.pop_front();
        }
        events.push_back(event);
    }
}

/// Locks `m`, ignoring poison: every structure here is consistent at each step.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------------

/// The running state of one rule.
#[derive(Debug)]
struct RuleState {
    /// Matching operations seen (for `after` and `nth`).
    seen: AtomicU64,
    /// Faults this rule injected.
    hits: AtomicU64,
    rng: Mutex<SplitMix64>,
}

/// Byte ranges written since the last successful sync: start → end, disjoint and not
/// adjacent.
#[derive(Debug, Default)]
struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    fn add(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (mut lo, mut hi) = (start, start.saturating_add(len));
        // Absorb every range that overlaps or touches [lo, hi).
        while let Some((&s, &e)) = self.0.range(..=hi).next_back() {
            if e < lo {
                break;
            }
            self.0.remove(&s);
            lo = lo.min(s);
            hi = hi.max(e);
        }
        self.0.insert(lo, hi);
    }
}

/// A [`StoreFile`] that forwards to `inner` and injects faults by [`FileFaultRule`]s. See
/// the [module documentation](self).
pub struct FaultFile {
    inner: Box<dyn StoreFile>,
    name: String,
    rules: Vec<FileFaultRule>,
    /// One per rule, same order.
    state: Vec<RuleState>,
    control: Arc<FaultControl>,
    /// Writes and zeroings hold it shared; a sync that loses writes holds it exclusively while
    /// it poisons them, so no write is half poisoned.
    gate: RwLock<()>,
    /// What a `lose=true` sync failure loses.
    unsynced: Mutex<Ranges>,
}

impl fmt::Debug for FaultFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rules: Vec<String> = self.rules.iter().map(|r| r.to_string()).collect();
        f.debug_struct("FaultFile")
            .field("name", &self.name)
            .field("inner", &self.inner)
            .field("rules", &rules)
            .field("hits", &self.rule_hits())
            .finish_non_exhaustive()
    }
}

impl FaultFile {
    /// Wraps `inner` (named `name` in counts and logs) with `rules`, counted by `control`.
    /// `seed` seeds the rules' generators (each rule its own stream, so adding a rule does not
    /// change when another one hits).
    pub fn new(
        inner: Box<dyn StoreFile>,
        name: &str,
        rules: Vec<FileFaultRule>,
        seed: u64,
        control: Arc<FaultControl>,
    ) -> FaultFile {
        let state = (0..rules.len() as u64)
            .map(|i| RuleState {
                seen: AtomicU64::new(0),
                hits: AtomicU64::new(0),
                rng: Mutex::new(SplitMix64::new(
                    seed ^ (i + 1).wrapping_mul(0xd1b5_4a32_d192_ed03),
                )),
            })
            .collect();
        FaultFile {
            inner,
            name: name.to_string(),
            rules,
            state,
            control,
            gate: RwLock::new(()),
            unsynced: Mutex::new(Ranges::default()),
        }
    }

    /// [`FaultFile::new`] with rules parsed from strings.
    pub fn with_specs<S: AsRef<str>>(
        inner: Box<dyn StoreFile>,
        name: &str,
        specs: &[S],
        seed: u64,
        control: Arc<FaultControl>,
    ) -> Result<FaultFile, FileFaultRuleError> {
        Ok(FaultFile::new(
            inner,
            name,
            parse_rules(specs)?,
            seed,
            control,
        ))
    }

    /// The rules, in the order given.
    pub fn rules(&self) -> &[FileFaultRule] {
        &self.rules
    }

    /// Faults each rule injected so far, in rule order.
    pub fn rule_hits(&self) -> Vec<u64> {
        self.state
            .iter()
            .map(|s| s.hits.load(Ordering::Relaxed))
            .collect()
    }

    /// The control this file reports to.
    pub fn control(&self) -> &Arc<FaultControl> {
        &self.control
    }

    /// The first rule (in rule order) that hits an operation of type `op` (at `offset`, of
    /// `len` bytes) and fails it, if any; every matching rule counts the operation. The
    /// `slow` rules that hit are counted and their delays taken here, before returning.
    fn hit(&self, op: Op, offset: u64, len: u64) -> Option<usize> {
        if !self.control.is_enabled() {
            return None;
        }
        let mut first = None;
        let mut delay = 0u64;
        for (i, (rule, state)) in self.rules.iter().zip(&self.state).enumerate() {
            if !rule.matches(op) {
                continue;
            }
            let n = state.seen.fetch_add(1, Ordering::Relaxed) + 1;
            if n <= rule.after || rule.nth.is_some_and(|nth| n != nth) {
                continue;
            }
            let hit = if rule.prob >= 1.0 {
                true
            } else if rule.prob <= 0.0 {
                false
            } else {
                let draw = lock(&state.rng).next_u64();
                ((draw >> 11) as f64 / (1u64 << 53) as f64) < rule.prob
            };
            if hit && rule.kind == FileFaultKind::Slow {
                let ms = rule.ms.unwrap_or(DEFAULT_SLOW_MS);
                self.state[i].hits.fetch_add(1, Ordering::Relaxed);
                self.control.slow_ms.fetch_add(ms, Ordering::SeqCst);
                self.control.record(Injected {
                    file: self.name.clone(),
                    op,
                    kind: rule.kind,
                    offset,
                    len,
                    bytes: 0,
                    rule: rule.to_string(),
                });
                delay = delay.saturating_add(ms);
            } else if hit && first.is_none() {
                first = Some(i);
            }
        }
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay));
        }
        first
    }

    /// Counts rule `i`'s hit and returns the error the operation fails with.
    fn fail(&self, i: usize, op: Op, offset: u64, len: u64, bytes: u64) -> io::Error {
        let rule = &self.rules[i];
        self.state[i].hits.fetch_add(1, Ordering::Relaxed);
        self.control.record(Injected {
            file: self.name.clone(),
            op,
            kind: rule.kind,
            offset,
            len,
            bytes,
            rule: rule.to_string(),
        });
        io::Error::from_raw_os_error(rule.kind.errno())
    }

    /// Overwrites every range written since the last successful sync with [`POISON`] and
    /// forgets them; returns the bytes poisoned.
    fn lose_unsynced(&self) -> u64 {
        let _only = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let ranges = std::mem::take(&mut *lock(&self.unsynced));
        let poison = vec![POISON; POISON_CHUNK as usize];
        let mut total = 0;
        for (start, end) in ranges.0 {
            let mut at = start;
            while at < end {
                let n = (end - at).min(POISON_CHUNK);
                if let Err(e) = self.inner.write_at(at, &poison[..n as usize]) {
                    log::warn!(
                        "file fault injection: {}: cannot poison {n} bytes at {at}: {e}",
                        self.name
                    );
                }
                at += n;
                total += n;
            }
        }
        total
    }
}

impl StoreFile for FaultFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if let Some(i) = self.hit(Op::Read, offset, buf.len() as u64) {
            return Err(self.fail(i, Op::Read, offset, buf.len() as u64, 0));
        }
        self.inner.read_at(offset, buf)
    }

    unsafe fn read_raw(&self, offset: u64, iov: &[libc::iovec]) -> io::Result<()> {
        let len = crate::file::iov_len(iov) as u64;
        if let Some(i) = self.hit(Op::Read, offset, len) {
            return Err(self.fail(i, Op::Read, offset, len, 0));
        }
        // SAFETY: the caller's promise on `iov` is passed on unchanged.
        unsafe { self.inner.read_raw(offset, iov) }
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let _shared = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let len = buf.len() as u64;
        if let Some(i) = self.hit(Op::Write, offset, len) {
            let rule = &self.rules[i];
            if rule.kind != FileFaultKind::ShortWrite {
                return Err(self.fail(i, Op::Write, offset, len, 0));
            }
            let kept = rule.kept(buf.len());
            let done = self.inner.write_at(offset, &buf[..kept]);
            lock(&self.unsynced).add(offset, kept as u64);
            done?;
            return Err(self.fail(i, Op::Write, offset, len, kept as u64));
        }
        let done = self.inner.write_at(offset, buf);
        // A failed write may have written part of the buffer: it counts as written.
        lock(&self.unsynced).add(offset, len);
        done
    }

    fn sync(&self) -> io::Result<()> {
        if let Some(i) = self.hit(Op::Sync, 0, 0) {
            let lost = if self.rules[i].lose {
                let n = self.lose_unsynced();
                self.control.lost_syncs.fetch_add(1, Ordering::SeqCst);
                self.control.lost_bytes.fetch_add(n, Ordering::SeqCst);
                n
            } else {
                0
            };
            return Err(self.fail(i, Op::Sync, 0, 0, lost));
        }
        // What is written from here on is not covered by this sync; what was written before
        // it started is, once it succeeds.
        let covered = std::mem::take(&mut *lock(&self.unsynced));
        match self.inner.sync() {
            Ok(()) => Ok(()),
            Err(e) => {
                // A real failure: the writes are as unsynced as they were.
                let mut now = lock(&self.unsynced);
                for (s, e) in covered.0 {
                    now.add(s, e - s);
                }
                Err(e)
            }
        }
    }

    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn set_size(&self, len: u64) -> io::Result<()> {
        self.inner.set_size(len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let _shared = self.gate.read().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = self.hit(Op::ZeroRange, offset, len) {
            return Err(self.fail(i, Op::ZeroRange, offset, len, 0));
        }
        let done = self.inner.zero_range(offset, len);
        lock(&self.unsynced).add(offset, len);
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::SyntaxProblem as S;
    use crate::sim::{Power, SimFile};
    use FileFaultRuleProblem as P;

    fn rule(s: &str) -> FileFaultRule {
        s.parse()
            .unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn problem(s: &str) -> FileFaultRuleProblem {
        match s.parse::<FileFaultRule>() {
            Ok(r) => panic!("{s:?} should not parse, got {r:?}"),
            Err(e) => {
                assert_eq!(e.spec, s);
                e.problem
            }
        }
    }

    /// A fault file over a simulated file, with its own control.
    fn file(specs: &[&str], seed: u64) -> (FaultFile, SimFile, Arc<FaultControl>) {
        let sim = SimFile::new(Power::new());
        let control = FaultControl::new();
        let f = FaultFile::with_specs(Box::new(sim.clone()), "f", specs, seed, control.clone())
            .expect("rules parse");
        (f, sim, control)
    }

    fn errno(r: io::Result<()>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    #[test]
    fn rules_parse_to_what_they_say() {
        let r = rule("eio:op=write,nth=5");
        assert_eq!(
            r,
            FileFaultRule {
                op: FileOp::Write,
                nth: Some(5),
                ..FileFaultRule::new(FileFaultKind::Eio)
            }
        );
        let r = rule("enospc:op=write,prob=0.1");
        assert_eq!(
            (r.kind, r.op, r.prob),
            (FileFaultKind::Enospc, FileOp::Write, 0.1)
        );
        let r = rule("short-write:after=3");
        assert_eq!(
            (r.kind, r.op, r.after, r.keep),
            (FileFaultKind::ShortWrite, FileOp::Write, 3, None)
        );
        let r = rule(" eio : op = sync , nth = 1 , lose = true ");
        assert_eq!((r.op, r.nth, r.lose), (FileOp::Sync, Some(1), true));
        assert_eq!(rule("eio").op, FileOp::Any);
        assert_eq!(rule("enospc").op, FileOp::Write);
        assert_eq!(rule("short-write:keep=100").keep, Some(100));
        assert_eq!(rule("eio:prob=-0").prob.to_string(), "0");
    }

    #[test]
    fn display_is_canonical_and_round_trips() {
        for canonical in [
            "eio",
            "eio:op=read",
            "eio:nth=5,op=write",
            "enospc:prob=0.1",
            "enospc:op=zero-range",
            "enospc:nth=2,op=sync,lose=true",
            "short-write:after=3",
            "short-write:keep=4096,nth=2",
            "eio:nth=1,op=sync",
            "eio:after=7,prob=0.25,lose=true",
            "eio:lose=true",
            "enospc:op=any,lose=true",
            "slow:ms=10",
            "slow:ms=50,op=sync",
            "slow:ms=5,prob=0.01",
            "slow:ms=60000,nth=3,op=read",
        ] {
            let r = rule(canonical);
            assert_eq!(r.to_string(), canonical);
            assert_eq!(r.to_string().parse::<FileFaultRule>(), Ok(r.clone()));
            r.check().expect("a parsed rule checks");
        }
        // Non-canonical spellings print canonically.
        assert_eq!(rule("eio:op=write,nth=5").to_string(), "eio:nth=5,op=write");
        assert_eq!(rule("eio:op=any").to_string(), "eio");
        assert_eq!(rule("enospc:op=write,prob=1").to_string(), "enospc");
        assert_eq!(rule("eio:lose=false,op=sync").to_string(), "eio:op=sync");
        // Hand-built rules round-trip too.
        for kind in FileFaultKind::ALL {
            for op in FileOp::ALL {
                let r = FileFaultRule {
                    op,
                    nth: Some(9),
                    after: 2,
                    prob: 0.5,
                    ..FileFaultRule::new(kind)
                };
                if r.check().is_ok() {
                    assert_eq!(r.to_string().parse::<FileFaultRule>(), Ok(r.clone()), "{r}");
                }
            }
        }
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        assert_eq!(problem(""), P::Syntax(S::Empty));
        assert_eq!(problem("  "), P::Syntax(S::Empty));
        assert_eq!(problem("eoi"), P::UnknownKind("eoi".into()));
        assert_eq!(problem("eio:"), P::Syntax(S::NoParams));
        assert_eq!(problem("eio:nth=1,,op=read"), P::Syntax(S::EmptyParam));
        assert_eq!(problem("eio:nth=1,"), P::Syntax(S::EmptyParam));
        assert_eq!(problem("eio:nth"), P::Syntax(S::NotKeyValue("nth".into())));
        assert_eq!(
            problem("eio:sector=3"),
            P::Syntax(S::UnknownKey {
                key: "sector".into(),
                known: KEYS
            })
        );
        assert_eq!(
            problem("eio:nth=1,nth=2"),
            P::Syntax(S::DuplicateKey("nth"))
        );
        assert_eq!(problem("eio:nth="), P::Syntax(S::MissingValue("nth")));
        assert_eq!(problem("eio:nth=0"), P::Syntax(S::NthZero));
        assert!(matches!(
            problem("eio:nth=x"),
            P::Syntax(S::BadValue { key: "nth", .. })
        ));
        assert!(matches!(
            problem("eio:after=-1"),
            P::Syntax(S::BadValue { key: "after", .. })
        ));
        assert!(matches!(
            problem("eio:prob=often"),
            P::Syntax(S::BadValue { key: "prob", .. })
        ));
        assert_eq!(
            problem("eio:prob=1.5"),
            P::Syntax(S::ProbOutOfRange("1.5".into()))
        );
        assert_eq!(
            problem("eio:prob=NaN"),
            P::Syntax(S::ProbOutOfRange("NaN".into()))
        );
        assert_eq!(problem("eio:op=fsync"), P::UnknownOp("fsync".into()));
        assert_eq!(
            problem("enospc:op=read"),
            P::OpNotForKind {
                kind: FileFaultKind::Enospc,
                op: FileOp::Read
            }
        );
        assert_eq!(
            problem("short-write:op=sync"),
            P::OpNotForKind {
                kind: FileFaultKind::ShortWrite,
                op: FileOp::Sync
            }
        );
        assert_eq!(
            problem("eio:nth=3,after=3"),
            P::Syntax(S::NeverHits { nth: 3, after: 3 })
        );
        assert_eq!(
            problem("eio:after=5,nth=2"),
            P::Syntax(S::NeverHits { nth: 2, after: 5 })
        );
        assert_eq!(
            problem("eio:keep=10"),
            P::KeyNotForKind {
                key: "keep",
                kind: FileFaultKind::Eio
            }
        );
        assert!(matches!(
            problem("short-write:keep=lots"),
            P::Syntax(S::BadValue { key: "keep", .. })
        ));
        assert!(matches!(
            problem("eio:op=sync,lose=yes"),
            P::Syntax(S::BadValue { key: "lose", .. })
        ));
        assert_eq!(
            problem("eio:op=write,lose=true"),
            P::LoseWithoutSync {
                kind: FileFaultKind::Eio,
                op: FileOp::Write
            }
        );
        assert_eq!(
            problem("short-write:lose=true"),
            P::LoseWithoutSync {
                kind: FileFaultKind::ShortWrite,
                op: FileOp::Write
            }
        );
        // The message names the rule and the problem.
        let e = "eio:op=fsync".parse::<FileFaultRule>().expect_err("bad op");
        let msg = e.to_string();
        assert!(
            msg.contains("\"eio:op=fsync\"") && msg.contains("unknown op"),
            "{msg}"
        );
        // Hand-built rules are checked the same way.
        let bad = FileFaultRule {
            nth: Some(0),
            ..FileFaultRule::new(FileFaultKind::Eio)
        };
        assert_eq!(
            bad.check().map_err(|e| e.problem),
            Err(P::Syntax(S::NthZero))
        );
        assert!(parse_rules(&["eio", "nope"]).is_err());
        assert_eq!(parse_rules(&["eio", "enospc"]).map(|r| r.len()), Ok(2));
    }

    #[test]
    fn nth_hits_once_and_after_skips() {
        let (f, _, control) = file(&["eio:op=write,nth=3"], 1);
        let results: Vec<Option<i32>> = (0..6)
            .map(|i| errno(f.write_at(i * 10, &[1; 10])))
            .collect();
        assert_eq!(results, [None, None, Some(libc::EIO), None, None, None]);
        assert_eq!(control.injected(), 1);
        assert_eq!(control.injected_on(Op::Write), 1);
        assert_eq!(f.rule_hits(), [1]);

        let (f, _, control) = file(&["enospc:after=2"], 1);
        let results: Vec<Option<i32>> = (0..4).map(|_| errno(f.write_at(0, &[1; 4]))).collect();
        assert_eq!(
            results,
            [None, None, Some(libc::ENOSPC), Some(libc::ENOSPC)]
        );
        // Reads are not something enospc applies to, so they neither hit nor count.
        let mut b = [0u8; 4];
        f.read_at(0, &mut b).expect("enospc never fails a read");
        assert_eq!(control.counts().enospc, 2);
    }

    #[test]
    fn ops_are_told_apart() {
        let (f, _, control) = file(&["eio:op=read", "enospc:op=zero-range", "eio:op=sync"], 1);
        f.write_at(0, &[7; 512]).expect("writes pass");
        let mut b = [0u8; 512];
        assert_eq!(errno(f.read_at(0, &mut b)), Some(libc::EIO));
        let mut raw = [0u8; 16];
        let iov = [libc::iovec {
            iov_base: raw.as_mut_ptr().cast(),
            iov_len: raw.len(),
        }];
        // SAFETY: `iov` covers `raw`, which outlives the call.
        let r = unsafe { f.read_raw(0, &iov) };
        assert_eq!(errno(r), Some(libc::EIO));
        assert_eq!(errno(f.zero_range(0, 512)), Some(libc::ENOSPC));
        assert_eq!(errno(f.sync()), Some(libc::EIO));
        assert_eq!(f.size().expect("size is never faulted"), 512);
        f.set_size(1024).expect("set_size is never faulted");
        let c = control.counts();
        assert_eq!((c.reads, c.writes, c.zero_ranges, c.syncs), (2, 0, 1, 1));
        assert_eq!((c.eio, c.enospc, c.total), (3, 1, 4));
        let ev = control.events();
        assert_eq!(ev.len(), 4);
        assert_eq!(
            (ev[2].op, ev[2].kind, ev[2].offset, ev[2].len),
            (Op::ZeroRange, FileFaultKind::Enospc, 0, 512)
        );
        assert_eq!(ev[3].rule, "eio:op=sync");
    }

    #[test]
    fn slow_rules_parse_check_and_print() {
        let r = rule("slow");
        assert_eq!(
            (r.kind, r.op, r.ms),
            (FileFaultKind::Slow, FileOp::Any, Some(DEFAULT_SLOW_MS))
        );
        assert_eq!(r.to_string(), "slow:ms=10", "the delay is always printed");
        assert_eq!(
            rule(" slow : op = write , ms = 7 ").to_string(),
            "slow:ms=7,op=write"
        );
        assert!(matches!(
            problem("slow:ms=0"),
            P::Syntax(S::BadValue { key: "ms", .. })
        ));
        assert!(matches!(
            problem("slow:ms=60001"),
            P::Syntax(S::BadValue { key: "ms", .. })
        ));
        assert!(matches!(
            problem("slow:ms=fast"),
            P::Syntax(S::BadValue { key: "ms", .. })
        ));
        assert_eq!(
            problem("eio:ms=5"),
            P::KeyNotForKind {
                key: "ms",
                kind: FileFaultKind::Eio
            }
        );
        assert_eq!(
            problem("slow:keep=5"),
            P::KeyNotForKind {
                key: "keep",
                kind: FileFaultKind::Slow
            }
        );
        assert!(matches!(
            problem("slow:op=sync,lose=true"),
            P::LoseWithoutSync { .. }
        ));
        let bad = FileFaultRule {
            ms: None,
            ..FileFaultRule::new(FileFaultKind::Slow)
        };
        assert_eq!(bad.check().map_err(|e| e.problem), Err(P::SlowWithoutMs));
        let msg = "bogus"
            .parse::<FileFaultRule>()
            .expect_err("bad kind")
            .to_string();
        assert!(msg.contains("slow"), "{msg}");
    }

    #[test]
    fn a_slow_rule_delays_then_does_the_operation() {
        use std::time::{Duration, Instant};
        let (f, sim, control) = file(&["slow:ms=40,op=write", "eio:op=write,nth=2"], 1);
        let t = Instant::now();
        f.write_at(0, &[7; 512]).expect("delayed, then written");
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(sim.live_bytes(), vec![7; 512]);
        // Slow does not decide the fate: the second write is delayed and then failed by eio.
        let t = Instant::now();
        assert_eq!(errno(f.write_at(512, &[8; 512])), Some(libc::EIO));
        assert!(t.elapsed() >= Duration::from_millis(40));
        assert_eq!(
            sim.live_bytes().len(),
            512,
            "the failed write wrote nothing"
        );
        // Reads and syncs are not delayed by an op=write rule.
        let t = Instant::now();
        let mut b = [0u8; 512];
        f.read_at(0, &mut b).expect("read");
        f.sync().expect("sync");
        assert!(t.elapsed() < Duration::from_millis(40), "{:?}", t.elapsed());
        let c = control.counts();
        assert_eq!((c.slow, c.slow_ms, c.eio, c.total), (2, 80, 1, 3));
        assert_eq!(
            (c.writes, c.reads, c.syncs),
            (1, 0, 0),
            "failed, not delayed"
        );
        assert_eq!(f.rule_hits(), [2, 1]);
        let ev = control.events();
        assert_eq!(
            (ev[0].kind, ev[0].op, ev[0].offset, ev[0].len),
            (FileFaultKind::Slow, Op::Write, 0, 512)
        );
        // Switched off: no delay, nothing counted.
        control.disable();
        let t = Instant::now();
        f.write_at(0, &[9; 512]).expect("write");
        assert!(t.elapsed() < Duration::from_millis(40));
        assert_eq!(control.counts().slow, 2);
    }

    #[test]
    fn a_short_write_writes_a_prefix_then_fails() {
        let (f, sim, control) = file(&["short-write:nth=1", "short-write:keep=3,nth=2"], 1);
        let data: Vec<u8> = (1..=255u8).cycle().take(4096).collect();
        assert_eq!(errno(f.write_at(0, &data)), Some(libc::ENOSPC));
        let live = sim.live_bytes();
        assert_eq!(live.len(), 2048, "half of the buffer, rounded to 512 bytes");
        assert_eq!(live[..], data[..2048]);
        assert_eq!(errno(f.write_at(8192, &data[..10])), Some(libc::ENOSPC));
        let live = sim.live_bytes();
        assert_eq!(live.len(), 8195);
        assert_eq!(live[8192..], data[..3]);
        // A buffer too small to keep half of: nothing is written, still an error.
        let (f, sim, _) = file(&["short-write"], 1);
        assert_eq!(errno(f.write_at(0, &[9])), Some(libc::ENOSPC));
        assert!(sim.live_bytes().is_empty());
        let ev = control.events();
        assert_eq!((ev[0].bytes, ev[1].bytes), (2048, 3));
        assert_eq!(control.counts().short_writes, 2);
    }

    #[test]
    fn probability_is_seeded_and_deterministic() {
        let run = |seed| {
            let (f, _, control) = file(&["eio:op=write,prob=0.3"], seed);
            let pattern: Vec<bool> = (0..400).map(|_| f.write_at(0, &[1]).is_err()).collect();
            (pattern, control.injected())
        };
        let (a, n) = run(42);
        assert_eq!(run(42).0, a, "same seed, same faults");
        assert_ne!(run(43).0, a, "another seed, other faults");
        assert!(
            (60..=180).contains(&n),
            "about 30% of 400 writes fail, got {n}"
        );
        let (f, _, control) = file(&["eio:prob=0"], 5);
        for _ in 0..50 {
            f.write_at(0, &[1]).expect("prob=0 never hits");
        }
        assert_eq!(control.injected(), 0);
    }

    #[test]
    fn faults_switch_off_and_on() {
        let (f, _, control) = file(&["eio:op=write"], 1);
        assert!(f.write_at(0, &[1]).is_err());
        control.disable();
        assert!(!control.is_enabled());
        f.write_at(0, &[2]).expect("disabled: passes");
        f.sync().expect("disabled: passes");
        control.enable();
        assert!(f.write_at(0, &[3]).is_err());
        assert_eq!(control.injected(), 2);
        // While disabled, operations are not counted for nth.
        let (f, _, control) = file(&["eio:op=write,nth=2"], 1);
        f.write_at(0, &[1]).expect("first");
        control.disable();
        f.write_at(0, &[1]).expect("not counted");
        control.enable();
        assert!(f.write_at(0, &[1]).is_err(), "the second counted write");
    }

    #[test]
    fn the_first_rule_that_hits_decides_and_every_rule_counts() {
        let (f, _, _) = file(&["enospc:nth=2", "eio:op=write,nth=2"], 1);
        f.write_at(0, &[1]).expect("first write");
        assert_eq!(errno(f.write_at(0, &[1])), Some(libc::ENOSPC));
        assert_eq!(f.rule_hits(), [1, 0]);
        f.write_at(0, &[1])
            .expect("both rules saw the second write");
    }

    #[test]
    fn a_failed_sync_without_lose_keeps_the_writes_for_the_next_sync() {
        let (f, sim, _) = file(&["eio:op=sync,nth=1"], 1);
        f.write_at(0, &[5; 1024]).expect("write");
        assert_eq!(errno(f.sync()), Some(libc::EIO));
        assert_eq!(sim.durable_bytes(), vec![0; 1024], "nothing synced yet");
        f.sync().expect("the next sync");
        assert_eq!(sim.durable_bytes(), vec![5; 1024]);
    }

    #[test]
    fn a_failed_sync_with_lose_poisons_what_was_unsynced_and_the_next_sync_succeeds() {
        let (f, sim, control) = file(&["eio:op=sync,nth=2,lose=true"], 1);
        f.write_at(0, &[1; 1024]).expect("write");
        f.sync().expect("first sync");
        f.write_at(512, &[2; 512]).expect("write");
        f.write_at(1024, &[3; 100])
            .expect("write, adjacent: one range");
        f.write_at(4096, &[4; 10]).expect("write");
        f.zero_range(8192, 512).expect("zeroing counts as a write");
        assert_eq!(errno(f.sync()), Some(libc::EIO));
        // Like Linux after a writeback error: the next sync reports success...
        f.sync().expect("the error was reported once");
        // ...but what the failed one was to make durable is gone.
        let d = sim.durable_bytes();
        assert_eq!(d[..512], [1; 512], "synced before: kept");
        assert!(d[512..1124].iter().all(|&b| b == POISON));
        assert!(d[1124..4096].iter().all(|&b| b == 0), "never written");
        assert!(d[4096..4106].iter().all(|&b| b == POISON));
        assert!(d[8192..8704].iter().all(|&b| b == POISON));
        let c = control.counts();
        assert_eq!((c.lost_syncs, c.lost_bytes), (1, 612 + 10 + 512));
        assert_eq!(control.events()[0].bytes, 1134);
        // Writes after the loss are kept by later syncs.
        f.write_at(512, &[6; 4]).expect("write");
        f.sync().expect("sync");
        assert_eq!(sim.durable_bytes()[512..516], [6; 4]);
    }

    #[test]
    fn ranges_merge() {
        let mut r = Ranges::default();
        r.add(10, 5);
        r.add(30, 5);
        r.add(15, 15);
        assert_eq!(r.0.into_iter().collect::<Vec<_>>(), [(10, 35)]);
        let mut r = Ranges::default();
        r.add(100, 10);
        r.add(0, 10);
        r.add(5, 100);
        r.add(200, 0);
        assert_eq!(r.0.into_iter().collect::<Vec<_>>(), [(0, 110)]);
    }

    #[test]
    fn the_event_log_is_bounded() {
        let (f, _, control) = file(&["eio:op=read"], 1);
        let mut b = [0u8; 1];
        for _ in 0..EVENT_LOG + 10 {
            assert!(f.read_at(0, &mut b).is_err());
        }
        assert_eq!(control.events().len(), EVENT_LOG);
        assert_eq!(control.injected(), EVENT_LOG as u64 + 10);
    }

    /// The store's side of a failed sync (the fix this file's `lose=true` found): once a sync
    /// of a data file fails, no later sync may report the writes it was to make durable as
    /// durable, for the version that was syncing and for every other version with writes no
    /// sync had covered; a version with nothing unsynced carries on; reopening starts afresh.
    #[test]
    fn after_a_failed_sync_the_store_never_claims_the_lost_writes_durable() {
        use crate::Store;
        let power = Power::new();
        let meta = SimFile::new(power.clone());
        let data = SimFile::new(power.clone());
        let control = FaultControl::new();
        control.disable();
        let wrap = |f: &SimFile, name: &str, specs: &[&str]| -> Box<dyn StoreFile> {
            Box::new(
                FaultFile::with_specs(Box::new(f.clone()), name, specs, 1, control.clone())
                    .expect("rules parse"),
            )
        };
        let store = Store::create_on(
            wrap(&meta, "meta", &[]),
            wrap(&data, "data", &["eio:nth=1,op=sync,lose=true"]),
            16 << 20,
            1 << 20,
        )
        .expect("create");
        let spaces: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|n| {
                let key = store.create_disk(n, 1 << 20, "test").expect("disk");
                let s = store.space(key).expect("space");
                let e = s.grant_extent().expect("grant");
                (s, e)
            })
            .collect();
        let [(a, ea), (b, eb), (c, ec)] = &spaces[..] else {
            unreachable!("three spaces")
        };
        let a_extent = *ea;
        a.write(*ea, 0, &[1; 4096]).expect("write");
        c.write(*ec, 0, &[3; 4096]).expect("write");
        a.sync().expect("a synced");
        c.sync().expect("c synced");
        // a and b have unsynced writes when the sync fails; c has none.
        a.write(*ea, 4096, &[2; 4096]).expect("write");
        b.write(*eb, 0, &[4; 4096]).expect("write");
        control.enable();
        assert!(a.sync().is_err(), "the injected failure");
        assert_eq!(control.counts().lost_syncs, 1);
        // The file's next sync would succeed (the rule hit once), and would not bring the
        // lost writes back: the store must not say otherwise.
        let again = a.sync().expect_err("a lost writes: its syncs keep failing");
        let msg = format!("{again}: {:?}", std::error::Error::source(&again));
        assert!(msg.contains("may be lost"), "{msg}");
        assert!(b.sync().is_err(), "b had unsynced writes too");
        let refused = a
            .write(*ea, 8192, &[5; 4096])
            .expect_err("a version that lost writes takes no more");
        let msg = format!("{refused}: {:?}", std::error::Error::source(&refused));
        assert!(msg.contains("may be lost"), "{msg}");
        assert!(a.sync().is_err(), "and still no sync");
        // c had nothing unsynced: its new writes are synced as usual.
        c.write(*ec, 4096, &[6; 4096]).expect("write");
        c.sync().expect("c is not affected");
        // The lost block is poison on the device; what a and c synced before is there.
        let bytes = data.durable_bytes();
        let at = |e: crate::ExtentId, off: usize| (u64::from(e.0) << 20) as usize + off;
        assert!(bytes[at(*ea, 0)..at(*ea, 4096)].iter().all(|&x| x == 1));
        assert!(bytes[at(*ea, 4096)..at(*ea, 8192)]
            .iter()
            .all(|&x| x == POISON));
        assert!(bytes[at(*ec, 4096)..at(*ec, 8192)].iter().all(|&x| x == 6));
        // In process: `renew_version` lets a space made after it write and sync again (the
        // layout reopened from its last commit), while the old space keeps failing.
        let key_a = store.disk("a").expect("disk a").trusted;
        assert!(store.lost_writes(key_a));
        assert!(store.renew_version(key_a), "a was marked");
        assert!(!store.lost_writes(key_a));
        assert!(!store.renew_version(key_a), "once");
        let fresh = store.space(key_a).expect("space");
        fresh
            .write(a_extent, 4096, &[8; 4096])
            .expect("the fresh space writes");
        fresh.sync().expect("and syncs");
        assert!(
            a.sync().is_err(),
            "the old space still cannot claim the lost writes"
        );
        assert!(a.write(*ea, 8192, &[5; 4096]).is_err(), "nor write");
        let bytes = data.durable_bytes();
        assert!(bytes[at(*ea, 4096)..at(*ea, 8192)].iter().all(|&x| x == 8));
        drop(fresh);
        // Reopened, the versions start from their last commit and sync again.
        drop(spaces);
        drop(store);
        let store =
            Store::open_on(wrap(&meta, "meta", &[]), wrap(&data, "data", &[])).expect("reopen");
        let key = store.disk("a").expect("disk a").trusted;
        let a = store.space(key).expect("space");
        a.write(a_extent, 4096, &[7; 4096]).expect("write");
        a.sync().expect("a syncs again after the reopen");
    }

    /// Many versions writing and syncing one data file at once, while syncs fail now and then
    /// and lose what was unsynced: every write whose sync returned `Ok` is durable (the store
    /// serialises the file's syncs, lets a version whose writes a later sync covered skip its
    /// own, and fails every sync of a version that may have lost writes).
    #[test]
    fn concurrent_syncs_never_acknowledge_a_lost_write() {
        use crate::Store;
        const VERSIONS: usize = 8;
        const ROUNDS: usize = 60;
        const SLOT: usize = 512;
        let power = Power::new();
        let data = SimFile::new(power.clone());
        let control = FaultControl::new();
        control.disable();
        let store = Store::create_on(
            Box::new(SimFile::new(power.clone())),
            Box::new(
                FaultFile::with_specs(
                    Box::new(data.clone()),
                    "data",
                    &["eio:op=sync,prob=0.05,lose=true"],
                    7,
                    control.clone(),
                )
                .expect("rules parse"),
            ),
            4 << 20,
            64 << 10,
        )
        .expect("create");
        let spaces: Vec<_> = (0..VERSIONS)
            .map(|v| {
                let key = store
                    .create_disk(&format!("v{v}"), 1 << 20, "test")
                    .expect("disk");
                let s = store.space(key).expect("space");
                let e = s.grant_extent().expect("grant");
                (s, e)
            })
            .collect();
        control.enable();
        let pattern = |v: usize, k: usize| -> Vec<u8> {
            (0..SLOT).map(|i| (v * 31 + k * 7 + i) as u8 | 1).collect()
        };
        let acked: Vec<Vec<usize>> = std::thread::scope(|scope| {
            let handles: Vec<_> = spaces
                .iter()
                .enumerate()
                .map(|(v, (space, extent))| {
                    scope.spawn(move || {
                        let mut acked = Vec::new();
                        for k in 0..ROUNDS {
                            // A version that lost writes takes no more (it is to be reopened
                            // from its last commit): its writes and syncs fail from then on.
                            if space
                                .write(*extent, (k * SLOT) as u64, &pattern(v, k))
                                .is_err()
                            {
                                continue;
                            }
                            if space.sync().is_ok() {
                                acked.push(k);
                            }
                        }
                        acked
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("no panic"))
                .collect()
        });
        let durable = data.durable_bytes();
        let (mut ok, mut total) = (0, 0);
        for (v, ks) in acked.iter().enumerate() {
            let base = (u64::from(spaces[v].1 .0) * (64 << 10)) as usize;
            for &k in ks {
                let at = base + k * SLOT;
                assert!(
                    durable[at..at + SLOT] == pattern(v, k)[..],
                    "version {v}: write {k} was acknowledged durable but is not"
                );
                ok += 1;
            }
            total += ROUNDS;
        }
        let c = control.counts();
        assert!(c.lost_syncs > 0, "no sync failed: the test tested nothing");
        assert!(ok > 0 && ok < total, "{ok} of {total} syncs acknowledged");
    }
}
