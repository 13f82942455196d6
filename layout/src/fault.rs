//! A fault-injecting wrapper around any [`BlockLayout`], in the spirit of QEMU's `blkdebug`.
//!
//! [`FaultLayout`] forwards every request to an inner layout, except when one of its
//! [`FaultRule`]s *hits*: then it flips a bit of the data a read returns, returns stale data,
//! writes to the wrong place, drops a write, fails with `EIO`, panics, or tries to write outside
//! the version's grants in the store. It exists to prove that whatever sits above a layout (the
//! Tee's comparison, the store's isolation layer, the backend's error handling, the tests'
//! verifiers) notices each of those failures. Used by tests directly and by the CLI
//! (`dovetail disk tee ... --fault RULE`), which persists rules in the store catalog as the
//! strings [`FaultRule`]'s `Display` prints.
//!
//! # Rule grammar
//!
//! ```text
//! RULE   := KIND [ ":" PARAM { "," PARAM } ]
//! PARAM  := KEY "=" VALUE                       (spaces around KIND, KEY and VALUE are ignored)
//! KIND   := flip-read | stale-read | misdirect-write | drop-write | eio | panic | write-outside
//! KEY    := op | prob | sector | nth | after | offset
//! ```
//!
//! Kinds (what happens when the rule hits):
//!
//! | kind | applies to | effect |
//! | --- | --- | --- |
//! | `flip-read` | reads | one bit of the returned data is flipped (position from the seeded RNG; inside sector `S` if the rule has `sector=S`) |
//! | `stale-read` | reads | the read returns what the range held before its latest `write` through this wrapper (see below) |
//! | `misdirect-write` | writes | the data lands `offset` sectors further on (default 8, modulo the capacity, clamped so it fits); `Ok` is returned |
//! | `drop-write` | writes | `Ok` is returned, nothing is written |
//! | `eio` | any operation | the operation fails with `Error::Io` carrying `EIO`; nothing is done |
//! | `panic` | any operation | the operation panics; the message names the rule |
//! | `write-outside` | writes | instead of the write, the data is written through the version's space to an extent *not* granted to the version; the store refuses it with `StoreError::GrantViolation`, which is returned as `Error::Store` (needs [`FaultLayout::with_space`]) |
//!
//! Conditions (all optional, combined with AND):
//!
//! - `op=read|write|write-zeroes|flush|discard|any`: which operations the rule considers. The
//!   default is `read` for `flip-read`/`stale-read`, `write` for `misdirect-write`/`drop-write`/
//!   `write-outside` and `any` for `eio`/`panic`; only `eio` and `panic` accept another value.
//!   `write` means `write` requests only: `write-zeroes` is a separate operation.
//! - `sector=S`: only operations whose range covers sector `S` (a flush has no range, so it never
//!   covers a sector).
//! - `after=N`: skip the first `N` matching operations.
//! - `nth=N` (N ≥ 1): only the `N`th matching operation, so the rule hits at most once. With
//!   `after=M`, `M` must be below `N`.
//! - `prob=P` (0 ≤ P ≤ 1, default 1): a matching operation that passed `after`/`nth` is hit with
//!   probability `P`, drawn from the rule's own RNG (seeded from the layout's seed and the rule's
//!   position), so a run is deterministic for a seed and single-threaded I/O.
//! - `offset=N` (N ≥ 1, `misdirect-write` only): how far the write is misdirected, in sectors.
//!
//! A *matching* operation is one of the rule's `op` that the kind applies to, covering `sector`
//! if given; the rule's counter for `after`/`nth` counts those (1-based, per rule). Requests that
//! are invalid anyway (out of range, not whole sectors) are refused before any rule sees them.
//!
//! Examples: `flip-read`, `flip-read:prob=0.01`, `flip-read:sector=2048`, `stale-read`,
//! `misdirect-write:offset=16`, `drop-write:prob=0.5`, `eio:nth=5,op=write`, `panic:nth=3`,
//! `write-outside:nth=1`, `eio:after=100,op=flush`.
//!
//! `Display` prints the canonical form: the kind, then the parameters that differ from their
//! defaults in the order `offset, nth, after, sector, prob, op`. Every example above is already
//! canonical, and for every rule `r`, `r.to_string().parse() == Ok(r)`.
//!
//! # Several rules
//!
//! Every rule sees every operation (so each rule's counters and RNG advance independently of the
//! others). Of the rules that hit one operation, the first in rule order among `panic`, `eio`,
//! `write-outside`, `drop-write` and `misdirect-write` decides the operation's fate; the others
//! are not carried out. A read that was not failed gets every `stale-read` hit (applied once)
//! and then every `flip-read` hit (one bit each). [`FaultLayout::injected`] counts the faults
//! actually carried out.
//!
//! # Stale reads
//!
//! When a rule is `stale-read`, each `write` (and misdirected write) first reads the previous
//! contents of the 4 KiB blocks it touches from the inner layout and remembers them, for at most
//! [`STALE_BLOCKS`] blocks (the oldest are forgotten). A stale read replaces the parts of the
//! read range whose blocks have remembered contents; a read of blocks with none is unaffected
//! and not counted as injected. `write_zeroes` and `discard` are not remembered.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use dovetail_store::rng::SplitMix64;
use dovetail_store::rules::{self, SyntaxProblem};
use dovetail_store::{ExtentId, VersionSpace};

use crate::{buffer_sectors, check_range, BlockLayout, Error, Result, Sector, Sectors};

/// Sectors per 4 KiB block, the unit the stale-read history remembers.
const BLOCK_SECTORS: u64 = 8;
/// Bytes per sector, as `usize` for buffer indexing.
const SECTOR_BYTES: usize = crate::SECTOR_SIZE as usize;
/// At most this many 4 KiB blocks of old contents are remembered for `stale-read` (16 MiB).
pub const STALE_BLOCKS: usize = 4096;
/// `misdirect-write`'s default `offset`, in sectors (one 4 KiB block).
pub const DEFAULT_MISDIRECT_OFFSET: u64 = 8;

// ---------------------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------------------

/// What a rule does when it hits. See the [module documentation](self) for each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    FlipRead,
    StaleRead,
    MisdirectWrite,
    DropWrite,
    Eio,
    Panic,
    WriteOutside,
}

impl FaultKind {
    /// Every kind, in the order the documentation lists them.
    pub const ALL: [FaultKind; 7] = [
        FaultKind::FlipRead,
        FaultKind::StaleRead,
        FaultKind::MisdirectWrite,
        FaultKind::DropWrite,
        FaultKind::Eio,
        FaultKind::Panic,
        FaultKind::WriteOutside,
    ];

    /// The name used in rules (`flip-read`, ...).
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::FlipRead => "flip-read",
            FaultKind::StaleRead => "stale-read",
            FaultKind::MisdirectWrite => "misdirect-write",
            FaultKind::DropWrite => "drop-write",
            FaultKind::Eio => "eio",
            FaultKind::Panic => "panic",
            FaultKind::WriteOutside => "write-outside",
        }
    }

    /// The kind named `name`, if any.
    pub fn from_name(name: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The `op` a rule of this kind has unless it says otherwise.
    pub fn default_op(self) -> FaultOp {
        match self {
            FaultKind::FlipRead | FaultKind::StaleRead => FaultOp::Read,
            FaultKind::MisdirectWrite | FaultKind::DropWrite | FaultKind::WriteOutside => {
                FaultOp::Write
            }
            FaultKind::Eio | FaultKind::Panic => FaultOp::Any,
        }
    }

    /// Whether a rule of this kind can do anything to an operation of type `op`.
    fn applies_to(self, op: Op) -> bool {
        match self {
            FaultKind::FlipRead | FaultKind::StaleRead => op == Op::Read,
            FaultKind::MisdirectWrite | FaultKind::DropWrite | FaultKind::WriteOutside => {
                op == Op::Write
            }
            FaultKind::Eio | FaultKind::Panic => true,
        }
    }

    /// Whether the kind decides an operation's fate (fails, replaces or drops it), as opposed to
    /// changing the data a completed read returns.
    fn is_terminal(self) -> bool {
        !matches!(self, FaultKind::FlipRead | FaultKind::StaleRead)
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The operations a rule considers (its `op=` condition).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    WriteZeroes,
    Flush,
    Discard,
    /// Every operation.
    Any,
}

impl FaultOp {
    /// Every value, in the order error messages list them.
    pub const ALL: [FaultOp; 6] = [
        FaultOp::Read,
        FaultOp::Write,
        FaultOp::WriteZeroes,
        FaultOp::Flush,
        FaultOp::Discard,
        FaultOp::Any,
    ];

    /// The name used in rules (`read`, `write-zeroes`, ...).
    pub fn name(self) -> &'static str {
        match self {
            FaultOp::Read => "read",
            FaultOp::Write => "write",
            FaultOp::WriteZeroes => "write-zeroes",
            FaultOp::Flush => "flush",
            FaultOp::Discard => "discard",
            FaultOp::Any => "any",
        }
    }

    /// The value named `name`, if any.
    pub fn from_name(name: &str) -> Option<FaultOp> {
        FaultOp::ALL.into_iter().find(|o| o.name() == name)
    }

    fn matches(self, op: Op) -> bool {
        match self {
            FaultOp::Read => op == Op::Read,
            FaultOp::Write => op == Op::Write,
            FaultOp::WriteZeroes => op == Op::WriteZeroes,
            FaultOp::Flush => op == Op::Flush,
            FaultOp::Discard => op == Op::Discard,
            FaultOp::Any => true,
        }
    }
}

impl fmt::Display for FaultOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One fault rule: a kind and the conditions under which it hits.
///
/// Build one with [`FromStr`] (which validates it) or with [`FaultRule::new`] and the public
/// fields; [`FaultRule::check`] validates a hand-built rule. A [`FaultLayout`] never fails on an
/// invalid rule: conditions a kind cannot use are simply never met (an `op` the kind does not
/// apply to never matches; `offset` on another kind is ignored).
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    pub kind: FaultKind,
    /// Which operations the rule considers (`op=`); see [`FaultKind::default_op`].
    pub op: FaultOp,
    /// Probability that a matching operation is hit (`prob=`, 0..=1, default 1).
    pub prob: f64,
    /// Only operations covering this sector match (`sector=`).
    pub sector: Option<u64>,
    /// Only the `nth` matching operation (1-based) can be hit (`nth=`).
    pub nth: Option<u64>,
    /// The first `after` matching operations are never hit (`after=`, default 0).
    pub after: u64,
    /// How many sectors `misdirect-write` moves a write (`offset=`, default
    /// [`DEFAULT_MISDIRECT_OFFSET`]; ignored by the other kinds).
    pub offset: u64,
}

impl FaultRule {
    /// A rule of `kind` with every condition at its default (hits every operation it applies to).
    pub fn new(kind: FaultKind) -> FaultRule {
        FaultRule {
            kind,
            op: kind.default_op(),
            prob: 1.0,
            sector: None,
            nth: None,
            after: 0,
            offset: DEFAULT_MISDIRECT_OFFSET,
        }
    }

    /// Checks a rule built by hand the way [`FromStr`] checks a parsed one.
    pub fn check(&self) -> std::result::Result<(), FaultRuleError> {
        let err = |problem| FaultRuleError {
            spec: self.to_string(),
            problem,
        };
        if !self.kind_allows_op(self.op) {
            return Err(err(FaultRuleProblem::OpNotForKind {
                kind: self.kind,
                op: self.op,
            }));
        }
        if let Some(p) = rules::check_counts(self.prob, self.nth, self.after) {
            return Err(err(p.into()));
        }
        if self.kind == FaultKind::MisdirectWrite && self.offset == 0 {
            return Err(err(FaultRuleProblem::OffsetZero));
        }
        if self.kind != FaultKind::MisdirectWrite && self.offset != DEFAULT_MISDIRECT_OFFSET {
            return Err(err(FaultRuleProblem::KeyNotForKind {
                key: "offset".into(),
                kind: self.kind,
            }));
        }
        Ok(())
    }

    /// Whether `op=OP` is accepted on this rule's kind: only `eio` and `panic` may choose.
    fn kind_allows_op(&self, op: FaultOp) -> bool {
        op == self.kind.default_op() || matches!(self.kind, FaultKind::Eio | FaultKind::Panic)
    }

    /// Whether an operation of type `op` over `range` (`None` for a flush) matches the rule's
    /// `op` and `sector` conditions.
    fn matches(&self, op: Op, range: Option<(Sector, Sectors)>) -> bool {
        if !self.op.matches(op) || !self.kind.applies_to(op) {
            return false;
        }
        match (self.sector, range) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(s), Some((at, len))) => at.0 <= s && s - at.0 < len.0,
        }
    }
}

/// Keys a rule may carry, in the order error messages list them.
const KEYS: &[&str] = &["op", "prob", "sector", "nth", "after", "offset"];

impl FromStr for FaultRule {
    type Err = FaultRuleError;

    fn from_str(s: &str) -> std::result::Result<FaultRule, FaultRuleError> {
        parse_rule(s).map_err(|problem| FaultRuleError {
            spec: s.to_string(),
            problem,
        })
    }
}

/// The parser behind [`FaultRule::from_str`]; the caller attaches the spec to the problem.
fn parse_rule(s: &str) -> std::result::Result<FaultRule, FaultRuleProblem> {
    let spec = rules::split(s, KEYS)?;
    let kind = FaultKind::from_name(spec.kind)
        .ok_or_else(|| FaultRuleProblem::UnknownKind(spec.kind.to_string()))?;
    let mut rule = FaultRule::new(kind);
    for (key, value) in spec.params {
        match key {
            "op" => {
                let op = FaultOp::from_name(value)
                    .ok_or_else(|| FaultRuleProblem::UnknownOp(value.to_string()))?;
                if !rule.kind_allows_op(op) {
                    return Err(FaultRuleProblem::OpNotForKind { kind, op });
                }
                rule.op = op;
            }
            "prob" => rule.prob = rules::probability(key, value)?,
            "sector" => rule.sector = Some(rules::number(key, value, "a sector number")?),
            "nth" => rule.nth = Some(rules::nth(key, value)?),
            "after" => rule.after = rules::number(key, value, "a count")?,
            "offset" => {
                if kind != FaultKind::MisdirectWrite {
                    return Err(FaultRuleProblem::KeyNotForKind {
                        key: key.to_string(),
                        kind,
                    });
                }
                let n = rules::number(key, value, "a number of sectors, 1 or more")?;
                if n == 0 {
                    return Err(FaultRuleProblem::OffsetZero);
                }
                rule.offset = n;
            }
            // `split` let only `KEYS` through.
            _ => unreachable!("key {key} is not in KEYS"),
        }
    }
    match rules::check_counts(rule.prob, rule.nth, rule.after) {
        Some(p) => Err(p.into()),
        None => Ok(rule),
    }
}

impl fmt::Display for FaultRule {
    /// The canonical form: the kind, then the non-default parameters in the order
    /// `offset, nth, after, sector, prob, op`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.name())?;
        let mut sep = ':';
        let mut param = |f: &mut fmt::Formatter<'_>, p: fmt::Arguments<'_>| {
            let r = write!(f, "{sep}{p}");
            sep = ',';
            r
        };
        if self.kind == FaultKind::MisdirectWrite && self.offset != DEFAULT_MISDIRECT_OFFSET {
            param(f, format_args!("offset={}", self.offset))?;
        }
        if let Some(n) = self.nth {
            param(f, format_args!("nth={n}"))?;
        }
        if self.after != 0 {
            param(f, format_args!("after={}", self.after))?;
        }
        if let Some(s) = self.sector {
            param(f, format_args!("sector={s}"))?;
        }
        // `f64`'s Display is the shortest string that parses back to the same value.
        if self.prob != 1.0 {
            param(f, format_args!("prob={}", self.prob))?;
        }
        if self.op != self.kind.default_op() {
            param(f, format_args!("op={}", self.op))?;
        }
        Ok(())
    }
}

/// Parses one rule per string (each a `--fault` argument or a catalog entry).
pub fn parse_rules(specs: &[String]) -> std::result::Result<Vec<FaultRule>, FaultRuleError> {
    specs.iter().map(|s| s.parse()).collect()
}

/// A rule that does not parse: the rule as given and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad fault rule {spec:?}: {problem}")]
pub struct FaultRuleError {
    /// The rule as given.
    pub spec: String,
    pub problem: FaultRuleProblem,
}

/// What is wrong with a fault rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultRuleProblem {
    #[error(transparent)]
    Syntax(#[from] SyntaxProblem),
    #[error("unknown fault kind {0:?} (expected one of flip-read, stale-read, misdirect-write, drop-write, eio, panic, write-outside)")]
    UnknownKind(String),
    #[error("parameter {key:?} does not apply to {kind}")]
    KeyNotForKind { key: String, kind: FaultKind },
    #[error("offset=0 would not misdirect the write: the offset is 1 or more sectors")]
    OffsetZero,
    #[error("unknown op {0:?} (expected one of read, write, write-zeroes, flush, discard, any)")]
    UnknownOp(String),
    #[error("op={op} does not apply to {kind}, which only acts on op={default}", default = kind.default_op())]
    OpNotForKind { kind: FaultKind, op: FaultOp },
}

// ---------------------------------------------------------------------------------------------
// The layout
// ---------------------------------------------------------------------------------------------

/// The operation being carried out (`FaultOp` minus `Any`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    WriteZeroes,
    Flush,
    Discard,
}

impl Op {
    /// The `op` field of `Error::Io`, and the word in panic messages.
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::WriteZeroes => "write-zeroes",
            Op::Flush => "flush",
            Op::Discard => "discard",
        }
    }
}

/// The running state of one rule.
#[derive(Debug)]
struct RuleState {
    /// Matching operations seen (for `after` and `nth`).
    seen: AtomicU64,
    /// Faults this rule actually injected.
    hits: AtomicU64,
    /// This rule's RNG, for `prob` and for the bit `flip-read` flips.
    rng: Mutex<SplitMix64>,
}

/// Old contents of recently written 4 KiB blocks, for `stale-read`; bounded to
/// [`STALE_BLOCKS`] blocks, the least recently remembered forgotten first.
#[derive(Default)]
struct History {
    /// Block index → (sequence number, contents before the latest write). The contents are
    /// shorter than 4 KiB only for a partial last block of the disk.
    blocks: HashMap<u64, (u64, Vec<u8>)>,
    /// Sequence number → block, oldest first.
    order: BTreeMap<u64, u64>,
    next_seq: u64,
}

impl History {
    fn remember(&mut self, block: u64, old: Vec<u8>) {
        if let Some((seq, _)) = self.blocks.remove(&block) {
            self.order.remove(&seq);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.blocks.insert(block, (seq, old));
        self.order.insert(seq, block);
        while self.blocks.len() > STALE_BLOCKS {
            match self.order.pop_first() {
                Some((_, b)) => {
                    self.blocks.remove(&b);
                }
                None => break,
            }
        }
    }

    /// Overwrites the parts of `buf` (read at `at`) whose blocks have remembered contents.
    /// Returns whether any did.
    fn apply(&self, at: Sector, buf: &mut [u8]) -> bool {
        let len = (buf.len() / SECTOR_BYTES) as u64;
        if len == 0 {
            return false;
        }
        let (first, last) = (at.0 / BLOCK_SECTORS, (at.0 + len - 1) / BLOCK_SECTORS);
        let mut changed = false;
        let mut patch = |block: u64, old: &[u8]| {
            // Intersect the block's remembered sectors with the read, in sectors.
            let start = block * BLOCK_SECTORS;
            let end = start + (old.len() / SECTOR_BYTES) as u64;
            let (lo, hi) = (start.max(at.0), end.min(at.0 + len));
            if lo < hi {
                let dst = (lo - at.0) as usize * SECTOR_BYTES..(hi - at.0) as usize * SECTOR_BYTES;
                let src =
                    (lo - start) as usize * SECTOR_BYTES..(hi - start) as usize * SECTOR_BYTES;
                buf[dst].copy_from_slice(&old[src]);
                changed = true;
            }
        };
        if last - first < self.blocks.len() as u64 {
            for b in first..=last {
                if let Some((_, old)) = self.blocks.get(&b) {
                    patch(b, old);
                }
            }
        } else {
            // A read larger than the history: walk the history instead.
            for (&b, (_, old)) in &self.blocks {
                if (first..=last).contains(&b) {
                    patch(b, old);
                }
            }
        }
        changed
    }
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("History")
            .field("blocks", &self.blocks.len())
            .finish()
    }
}

/// A [`BlockLayout`] that forwards to `inner` and injects faults by [`FaultRule`]s. See the
/// [module documentation](self).
pub struct FaultLayout {
    inner: Arc<dyn BlockLayout>,
    rules: Vec<FaultRule>,
    /// One per rule, same order.
    state: Vec<RuleState>,
    /// For `write-outside`.
    space: Option<Arc<dyn VersionSpace>>,
    injected: AtomicU64,
    /// Present only if a rule is `stale-read` (otherwise writes skip the bookkeeping).
    history: Option<Mutex<History>>,
}

impl fmt::Debug for FaultLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rules: Vec<String> = self.rules.iter().map(|r| r.to_string()).collect();
        f.debug_struct("FaultLayout")
            .field("inner", &self.inner)
            .field("rules", &rules)
            .field("injected", &self.injected())
            .field("space", &self.space.as_ref().map(|s| s.key()))
            .field("history", &self.history)
            .finish()
    }
}

/// Locks `m`, ignoring poison: a `panic` rule may have unwound through a holder, and every
/// structure here stays consistent at each step.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FaultLayout {
    /// Wraps `inner` with `rules`. `seed` seeds every rule's RNG (each rule gets its own stream,
    /// so adding a rule does not change when another one hits).
    pub fn new(inner: Arc<dyn BlockLayout>, rules: Vec<FaultRule>, seed: u64) -> FaultLayout {
        let state = (0..rules.len() as u64)
            .map(|i| RuleState {
                seen: AtomicU64::new(0),
                hits: AtomicU64::new(0),
                rng: Mutex::new(SplitMix64::new(
                    seed ^ (i + 1).wrapping_mul(0xd1b5_4a32_d192_ed03),
                )),
            })
            .collect();
        let history = rules
            .iter()
            .any(|r| r.kind == FaultKind::StaleRead)
            .then(|| Mutex::new(History::default()));
        FaultLayout {
            inner,
            rules,
            state,
            space: None,
            injected: AtomicU64::new(0),
            history,
        }
    }

    /// Lets `write-outside` write through the version's space (needed for that rule only).
    /// `space` should be the space of the version `inner` lives in.
    pub fn with_space(mut self, space: Arc<dyn VersionSpace>) -> FaultLayout {
        self.space = Some(space);
        self
    }

    /// How many faults were injected so far (all rules).
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// How many faults each rule injected so far, in rule order.
    pub fn rule_hits(&self) -> Vec<u64> {
        self.state
            .iter()
            .map(|s| s.hits.load(Ordering::Relaxed))
            .collect()
    }

    /// The rules, in the order given.
    pub fn rules(&self) -> &[FaultRule] {
        &self.rules
    }

    /// The wrapped layout.
    pub fn inner(&self) -> &Arc<dyn BlockLayout> {
        &self.inner
    }

    /// Runs every rule's conditions against one operation and returns the indices of the rules
    /// that hit, in rule order. Allocates only when a rule hits.
    fn hits(&self, op: Op, range: Option<(Sector, Sectors)>) -> Vec<usize> {
        let mut hits = Vec::new();
        for (i, (rule, state)) in self.rules.iter().zip(&self.state).enumerate() {
            if !rule.matches(op, range) {
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
                lock(&state.rng).unit() < rule.prob
            };
            if hit {
                hits.push(i);
            }
        }
        hits
    }

    /// Counts one fault of rule `i` as injected.
    fn count(&self, i: usize, op: Op, at: Option<Sector>) {
        self.injected.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = self.state.get(i) {
            s.hits.fetch_add(1, Ordering::Relaxed);
        }
        log::debug!(
            "fault injection: rule {} hit a {} at {:?}",
            self.rules[i],
            op.name(),
            at.map(|s| s.0)
        );
    }

    /// The first hit (in rule order) that decides the operation's fate, if any.
    fn terminal(&self, hits: &[usize]) -> Option<usize> {
        hits.iter()
            .copied()
            .find(|&i| self.rules[i].kind.is_terminal())
    }

    /// Carries out a `panic` or `eio` hit (the only terminal kinds outside writes).
    fn fail(&self, i: usize, op: Op, at: Option<Sector>) -> Result<()> {
        let rule = &self.rules[i];
        self.count(i, op, at);
        match rule.kind {
            FaultKind::Panic => match at {
                Some(at) => panic!(
                    "fault injection: rule `{rule}` panicked a {} at {at}",
                    op.name()
                ),
                None => panic!("fault injection: rule `{rule}` panicked a {}", op.name()),
            },
            _ => Err(Error::Io {
                op: op.name(),
                path: format!("fault injection rule `{rule}`"),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            }),
        }
    }

    /// A write that really happens (plain or misdirected), remembering the old contents of its
    /// blocks if a rule is `stale-read`.
    fn write_through(&self, at: Sector, buf: &[u8]) -> Result<()> {
        let Some(history) = &self.history else {
            return self.inner.write(at, buf);
        };
        // Held across reading the old contents and writing, so the remembered contents are
        // those right before this write even with several writers.
        let mut history = lock(history);
        let old = self.old_blocks(at, (buf.len() / SECTOR_BYTES) as u64);
        self.inner.write(at, buf)?;
        for (block, data) in old {
            history.remember(block, data);
        }
        Ok(())
    }

    /// The current contents of the (at most [`STALE_BLOCKS`] last) 4 KiB blocks that a write of
    /// `len` sectors at `at` touches. Empty if the inner layout cannot read them (the write
    /// itself then decides what happens).
    fn old_blocks(&self, at: Sector, len: u64) -> Vec<(u64, Vec<u8>)> {
        if len == 0 {
            return Vec::new();
        }
        let capacity = self.inner.capacity().0;
        let last = (at.0 + len - 1) / BLOCK_SECTORS;
        let first = (at.0 / BLOCK_SECTORS).max((last + 1).saturating_sub(STALE_BLOCKS as u64));
        let start = first * BLOCK_SECTORS;
        let end = ((last + 1) * BLOCK_SECTORS).min(capacity);
        let mut data = vec![0u8; (end - start) as usize * SECTOR_BYTES];
        if let Err(e) = self.inner.read(Sector(start), &mut data) {
            log::debug!("fault injection: cannot read old contents for stale-read: {e}");
            return Vec::new();
        }
        data.chunks(BLOCK_SECTORS as usize * SECTOR_BYTES)
            .zip(first..)
            .map(|(chunk, block)| (block, chunk.to_vec()))
            .collect()
    }

    /// Carries out a write-only terminal hit (`misdirect-write`, `drop-write`, `write-outside`).
    fn fault_write(&self, i: usize, at: Sector, buf: &[u8]) -> Result<()> {
        let rule = &self.rules[i];
        match rule.kind {
            FaultKind::DropWrite => {
                self.count(i, Op::Write, Some(at));
                Ok(())
            }
            FaultKind::MisdirectWrite => {
                self.count(i, Op::Write, Some(at));
                let len = Sectors((buf.len() / SECTOR_BYTES) as u64);
                let to = misdirect_target(at, len, rule.offset, self.inner.capacity());
                self.write_through(to, buf)
            }
            FaultKind::WriteOutside => {
                self.count(i, Op::Write, Some(at));
                self.write_outside(rule, buf)
            }
            _ => self.fail(i, Op::Write, Some(at)),
        }
    }

    /// `write-outside`: writes `buf` (at most one extent of it; one zero sector if it is empty)
    /// at offset 0 of the lowest-numbered extent not granted to the version. The store must
    /// refuse with a grant violation, which is returned; if it accepts, that is an error too.
    fn write_outside(&self, rule: &FaultRule, buf: &[u8]) -> Result<()> {
        let Some(space) = &self.space else {
            return Err(Error::InvalidArgument(format!(
                "fault rule `{rule}` needs a store-backed version: give the fault layout the \
                 version's space (FaultLayout::with_space)"
            )));
        };
        let mut granted = space.extents();
        granted.sort_unstable();
        // The first gap in the sorted grants: an extent that exists in any store with an
        // extent beyond this version's, and that the version does not own.
        let mut target = 0u32;
        for e in &granted {
            if e.0 == target {
                target = target.saturating_add(1);
            } else if e.0 > target {
                break;
            }
        }
        let target = ExtentId(target);
        let zero = [0u8; SECTOR_BYTES];
        let data = if buf.is_empty() {
            &zero[..]
        } else {
            let max = usize::try_from(space.extent_size()).unwrap_or(usize::MAX);
            &buf[..buf.len().min(max)]
        };
        match space.write(target, 0, data) {
            Err(e) => Err(Error::Store(e)),
            Ok(()) => {
                log::error!(
                    "fault injection: the store accepted a write by {} to {target}, which is not \
                     granted to it",
                    space.key()
                );
                Err(Error::InvalidArgument(format!(
                    "fault rule `{rule}`: the store accepted a write by {} to {target}, which is \
                     not granted to it: the isolation layer is broken",
                    space.key()
                )))
            }
        }
    }

    /// Flips one bit of `buf` (read at `at`) for `flip-read` rule `i`: inside the rule's
    /// `sector` if it has one, anywhere otherwise. Returns whether a bit was flipped.
    fn flip(&self, i: usize, at: Sector, buf: &mut [u8]) -> bool {
        let rule = &self.rules[i];
        let region = match rule.sector {
            // `matches` made sure the read covers the sector.
            Some(s) => {
                let start = (s - at.0) as usize * SECTOR_BYTES;
                start..start + SECTOR_BYTES
            }
            None => 0..buf.len(),
        };
        if region.is_empty() || region.end > buf.len() {
            return false;
        }
        let bit = lock(&self.state[i].rng).below(region.len() as u64 * 8);
        buf[region.start + (bit / 8) as usize] ^= 1 << (bit % 8);
        true
    }

    /// Checks a ranged request the way every layout does, before any rule sees it.
    fn check(&self, at: Sector, len: Sectors) -> Result<()> {
        check_range(at, len, self.inner.capacity())
    }
}

/// Where `misdirect-write` sends a write of `len` sectors meant for `at`: `offset` sectors
/// further, modulo the capacity, moved back so that the write fits.
fn misdirect_target(at: Sector, len: Sectors, offset: u64, capacity: Sectors) -> Sector {
    if capacity.0 == 0 {
        return at;
    }
    let wrapped = ((u128::from(at.0) + u128::from(offset)) % u128::from(capacity.0)) as u64;
    Sector(wrapped.min(capacity.0.saturating_sub(len.0)))
}

impl BlockLayout for FaultLayout {
    fn capacity(&self) -> Sectors {
        self.inner.capacity()
    }

    fn read(&self, at: Sector, buf: &mut [u8]) -> Result<()> {
        let len = buffer_sectors(buf.len())?;
        self.check(at, len)?;
        let hits = self.hits(Op::Read, Some((at, len)));
        if let Some(i) = self.terminal(&hits) {
            return self.fail(i, Op::Read, Some(at));
        }
        self.inner.read(at, buf)?;
        // Stale data first, then bit flips on top of it.
        if let Some(&i) = hits
            .iter()
            .find(|&&i| self.rules[i].kind == FaultKind::StaleRead)
        {
            if let Some(history) = &self.history {
                if lock(history).apply(at, buf) {
                    self.count(i, Op::Read, Some(at));
                }
            }
        }
        for &i in &hits {
            if self.rules[i].kind == FaultKind::FlipRead && self.flip(i, at, buf) {
                self.count(i, Op::Read, Some(at));
            }
        }
        Ok(())
    }

    fn write(&self, at: Sector, buf: &[u8]) -> Result<()> {
        let len = buffer_sectors(buf.len())?;
        self.check(at, len)?;
        let hits = self.hits(Op::Write, Some((at, len)));
        match self.terminal(&hits) {
            Some(i) => self.fault_write(i, at, buf),
            None => self.write_through(at, buf),
        }
    }

    fn flush(&self) -> Result<()> {
        let hits = self.hits(Op::Flush, None);
        match self.terminal(&hits) {
            Some(i) => self.fail(i, Op::Flush, None),
            None => self.inner.flush(),
        }
    }

    fn discard(&self, at: Sector, len: Sectors) -> Result<()> {
        self.check(at, len)?;
        let hits = self.hits(Op::Discard, Some((at, len)));
        match self.terminal(&hits) {
            Some(i) => self.fail(i, Op::Discard, Some(at)),
            None => self.inner.discard(at, len),
        }
    }

    fn write_zeroes(&self, at: Sector, len: Sectors, unmap: bool) -> Result<()> {
        self.check(at, len)?;
        let hits = self.hits(Op::WriteZeroes, Some((at, len)));
        match self.terminal(&hits) {
            Some(i) => self.fail(i, Op::WriteZeroes, Some(at)),
            None => self.inner.write_zeroes(at, len, unmap),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemLayout;
    use dovetail_store::rules::SyntaxProblem as S;

    fn rule(s: &str) -> FaultRule {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn problem(s: &str) -> FaultRuleProblem {
        match s.parse::<FaultRule>() {
            Ok(r) => panic!("{s:?} parsed as {r:?}"),
            Err(e) => {
                assert_eq!(e.spec, s);
                e.problem
            }
        }
    }

    #[test]
    fn defaults_and_parameters_parse_into_fields() {
        assert_eq!(rule("flip-read"), FaultRule::new(FaultKind::FlipRead));
        let r = rule("eio:nth=5,op=write");
        assert_eq!(
            (r.kind, r.op, r.nth),
            (FaultKind::Eio, FaultOp::Write, Some(5))
        );
        let r = rule(" misdirect-write : offset = 16 , after=2, sector=9, prob=0.25 ");
        assert_eq!(r.offset, 16);
        assert_eq!(r.after, 2);
        assert_eq!(r.sector, Some(9));
        assert_eq!(r.prob, 0.25);
        assert_eq!(
            r.to_string(),
            "misdirect-write:offset=16,after=2,sector=9,prob=0.25"
        );
        assert_eq!(rule("eio:prob=-0").to_string(), "eio:prob=0");
        assert_eq!(
            rule("drop-write:op=write,prob=1.0").to_string(),
            "drop-write"
        );
        assert_eq!(
            rule("misdirect-write:offset=8").to_string(),
            "misdirect-write"
        );
    }

    #[test]
    fn problems_are_named() {
        assert_eq!(problem(""), FaultRuleProblem::Syntax(S::Empty));
        assert_eq!(
            problem("bogus"),
            FaultRuleProblem::UnknownKind("bogus".into())
        );
        assert_eq!(problem("eio:"), FaultRuleProblem::Syntax(S::NoParams));
        assert_eq!(
            problem("eio:nth=1,"),
            FaultRuleProblem::Syntax(S::EmptyParam)
        );
        assert_eq!(
            problem("eio:nth"),
            FaultRuleProblem::Syntax(S::NotKeyValue("nth".into()))
        );
        assert_eq!(
            problem("eio:nth=1,nth=2"),
            FaultRuleProblem::Syntax(S::DuplicateKey("nth"))
        );
        assert_eq!(
            problem("eio:offset=3"),
            FaultRuleProblem::KeyNotForKind {
                key: "offset".into(),
                kind: FaultKind::Eio
            }
        );
        assert_eq!(
            problem("eio:prob=nan"),
            FaultRuleProblem::Syntax(S::ProbOutOfRange("nan".into()))
        );
        assert_eq!(
            problem("eio:nth=3,after=3"),
            FaultRuleProblem::Syntax(S::NeverHits { nth: 3, after: 3 })
        );
    }

    #[test]
    fn hand_built_rules_are_checked_like_parsed_ones() {
        let mut r = FaultRule::new(FaultKind::FlipRead);
        assert!(r.check().is_ok());
        r.op = FaultOp::Write;
        assert!(matches!(
            r.check().map_err(|e| e.problem),
            Err(FaultRuleProblem::OpNotForKind { .. })
        ));
        let mut r = FaultRule::new(FaultKind::Eio);
        r.offset = 3;
        assert!(r.check().is_err());
        let mut r = FaultRule::new(FaultKind::Panic);
        r.prob = 1.5;
        assert!(r.check().is_err());
    }

    #[test]
    fn misdirect_target_wraps_and_clamps() {
        let cap = Sectors(1024);
        assert_eq!(misdirect_target(Sector(0), Sectors(8), 8, cap), Sector(8));
        assert_eq!(
            misdirect_target(Sector(1016), Sectors(8), 16, cap),
            Sector(8)
        );
        assert_eq!(
            misdirect_target(Sector(1000), Sectors(16), 10, cap),
            Sector(1008)
        );
        assert_eq!(
            misdirect_target(Sector(5), Sectors(1), u64::MAX, cap),
            Sector((5 + u64::MAX % 1024) % 1024)
        );
        assert_eq!(
            misdirect_target(Sector(0), Sectors(0), 8, Sectors(0)),
            Sector(0)
        );
    }

    #[test]
    fn history_is_bounded_and_forgets_the_oldest() {
        let mut h = History::default();
        for b in 0..(STALE_BLOCKS as u64 + 10) {
            h.remember(b, vec![b as u8; 4096]);
        }
        assert_eq!(h.blocks.len(), STALE_BLOCKS);
        assert_eq!(h.order.len(), STALE_BLOCKS);
        assert!(!h.blocks.contains_key(&9));
        assert!(h.blocks.contains_key(&10));
        // Re-remembering a block makes it the newest.
        h.remember(10, vec![1; 4096]);
        h.remember(99_999, vec![2; 4096]);
        assert!(h.blocks.contains_key(&10));
        assert!(!h.blocks.contains_key(&11));
        assert_eq!(h.order.len(), h.blocks.len());
    }

    #[test]
    fn history_patches_only_remembered_sectors() {
        let mut h = History::default();
        h.remember(1, vec![7; 4096]);
        let mut buf = vec![0u8; 24 * 512];
        // Read sectors 4..28: block 1 is sectors 8..16.
        assert!(h.apply(Sector(4), &mut buf));
        assert!(buf[..4 * 512].iter().all(|&b| b == 0));
        assert!(buf[4 * 512..12 * 512].iter().all(|&b| b == 7));
        assert!(buf[12 * 512..].iter().all(|&b| b == 0));
        let mut other = vec![0u8; 512];
        assert!(!h.apply(Sector(100), &mut other));
    }

    #[test]
    fn flip_read_on_sector_flips_inside_that_sector() {
        let inner = Arc::new(MemLayout::new(Sectors(64)));
        let f = FaultLayout::new(inner, vec![rule("flip-read:sector=10")], 7);
        for _ in 0..50 {
            let mut buf = vec![0u8; 16 * 512];
            f.read(Sector(4), &mut buf).expect("read");
            let ones: Vec<usize> = (0..buf.len()).filter(|&i| buf[i] != 0).collect();
            assert_eq!(ones.len(), 1);
            assert_eq!(ones[0] / 512, 6, "sector 10 is the 7th of the read");
            assert_eq!(buf[ones[0]].count_ones(), 1);
        }
        assert_eq!(f.injected(), 50);
    }
}
