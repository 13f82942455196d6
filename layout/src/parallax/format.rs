//! The parallax on-disk format, both layouts' (parallax-v1, and parallax-v2's root record
//! extension: annotations, tiering, checksum pages): block pointers, tree nodes and the root
//! record, with their encoders and validating decoders. Everything read from the store is untrusted: decoders
//! return [`Error::Corrupt`] and never panic. Byte-by-byte description: docs/format.md.

use dovetail_store::le::le_u64;
use dovetail_store::ExtentId;
pub use dovetail_tiering::{Class, ClassPolicy, TierPolicy, MAX_COPIES};

pub use super::codec::{
    check_compressed, decode_compressed, encode_compressed, BLOCK_SIZE, ZBLOCK_HEADER, ZBLOCK_MAGIC,
};
use crate::{Error, Result, Sectors};

/// `log2(BLOCK_SIZE)`.
pub const BLOCK_SHIFT: u32 = 12;
/// Sectors per block.
pub const SECTORS_PER_BLOCK: u64 = (BLOCK_SIZE as u64) >> crate::SECTOR_SHIFT;
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Magic of a tree node.
pub const NODE_MAGIC: [u8; 8] = *b"DVPXNODE";
/// Magic of the root record.
pub const ROOT_MAGIC: [u8; 8] = *b"DVPXROOT";
/// Magic of a parallax-v2 root record (the same header, plus the annotation extension).
pub const ROOT_MAGIC_V2: [u8; 8] = *b"DVPX2ROO";
/// Format version of the parallax-v2 root record's extension this binary writes: 2 adds the
/// tiering section (class policies and extent groups), 3 the checksum pages (a crc32c of every
/// guest data block, in tree blocks after the annotation pages). Versions 1 (no tiering
/// section) and 2 (no checksum pages) are read and upgraded.
pub const V2_FORMAT_VERSION: u32 = 3;
/// Bytes of the fixed part of the parallax-v2 extension.
const V2_FIXED: usize = 32;
/// Taint labels a parallax-v2 disk can name (a 16-bit set per block).
pub const MAX_LABELS: usize = 16;
/// Longest taint label name, in bytes.
pub const MAX_LABEL: usize = 64;
/// Bytes of node header before the entries.
pub const NODE_HEADER: usize = 32;
/// Pointers per node.
pub const ENTRIES: usize = (BLOCK_SIZE - NODE_HEADER) / 8;
/// The deepest tree: `ENTRIES^6` blocks (about 2^54) cover any disk whose byte size fits in a
/// `u64` (2^52 blocks).
pub const MAX_DEPTH: u8 = 6;
/// Longest snapshot name, in bytes.
pub const MAX_NAME: usize = 255;
/// The largest guest a parallax-v2 disk may have: 16 TiB (2^32 blocks). Opening one keeps 20
/// bytes a guest block in memory (its annotation and its checksum), so a root record stating
/// more is refused before that memory is asked for, and `create` refuses it too.
pub const MAX_V2_GUEST_BLOCKS: u64 = 1 << 32;

const ROOT_HEADER: usize = 48;
const SNAPSHOT_FIXED: usize = 26;

/// The null pointer: an unwritten block (reads as zeroes, takes no space) or an empty subtree.
pub const NULL: u64 = 0;
const PRESENT: u64 = 1 << 63;
const MAX_EXTENT: u64 = (1 << 31) - 1;

/// Encodes a block address: bit 63 set, extent id in bits 62..32, block index in bits 31..0.
pub fn make_ptr(extent: ExtentId, index: u32) -> u64 {
    debug_assert!(u64::from(extent.0) <= MAX_EXTENT);
    PRESENT | (u64::from(extent.0) << 32) | u64::from(index)
}

/// Decodes a non-null pointer into (extent, block index), or `None` if it is malformed.
pub fn split_ptr(ptr: u64) -> Option<(ExtentId, u32)> {
    if ptr & PRESENT == 0 {
        return None;
    }
    Some((ExtentId(((ptr >> 32) & MAX_EXTENT) as u32), ptr as u32))
}

/// Formats a pointer for messages.
pub fn show_ptr(ptr: u64) -> String {
    match split_ptr(ptr) {
        _ if ptr == NULL => "null".to_string(),
        Some((e, i)) => format!("extent {} block {}", e.0, i),
        None => format!("malformed pointer {ptr:#018x}"),
    }
}

/// Disk blocks covered by one entry of a node at `level` (`ENTRIES^(level-1)`), saturating.
pub fn span(level: u8) -> u64 {
    let mut s: u64 = 1;
    for _ in 1..level {
        s = s.saturating_mul(ENTRIES as u64);
    }
    s
}

/// Number of 4 KiB blocks of a disk of `capacity` sectors (the last may be partial).
pub fn disk_blocks(capacity: Sectors) -> u64 {
    capacity.0.div_ceil(SECTORS_PER_BLOCK)
}

/// The tree depth for a disk of `blocks` blocks: the smallest `d >= 1` with `ENTRIES^d >= blocks`.
pub fn depth_for(blocks: u64) -> u8 {
    let mut d = 1;
    while d < MAX_DEPTH && span(d + 1) < blocks {
        d += 1;
    }
    d
}

/// A decoded tree node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// 1: entries point to data blocks; `k > 1`: entries point to nodes of level `k - 1`.
    pub level: u8,
    /// The generation in which the node was written.
    pub gen: u64,
    pub entries: Box<[u64; ENTRIES]>,
}

impl Node {
    /// An empty node.
    pub fn empty(level: u8, gen: u64) -> Node {
        Node {
            level,
            gen,
            entries: Box::new([NULL; ENTRIES]),
        }
    }

    /// Encodes the node as it is stored at `self_ptr`.
    pub fn encode(&self, self_ptr: u64, out: &mut [u8; BLOCK_SIZE]) {
        out[..8].copy_from_slice(&NODE_MAGIC);
        out[8] = self.level;
        out[9..16].fill(0);
        out[16..24].copy_from_slice(&self.gen.to_le_bytes());
        out[24..32].copy_from_slice(&self_ptr.to_le_bytes());
        for (chunk, e) in out[NODE_HEADER..]
            .chunks_exact_mut(8)
            .zip(self.entries.iter())
        {
            chunk.copy_from_slice(&e.to_le_bytes());
        }
        let crc = crc32c::crc32c(out);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes and validates a node read from `self_ptr`: magic, checksum, level, self pointer
    /// and generation (at most `max_gen`, the generation of whatever points at it). Entries are
    /// checked by the caller, which knows the version's extents.
    pub fn decode(buf: &[u8; BLOCK_SIZE], self_ptr: u64, level: u8, max_gen: u64) -> Result<Node> {
        let at = || show_ptr(self_ptr);
        if buf[..8] != NODE_MAGIC {
            return Err(Error::Corrupt(format!("node at {}: bad magic", at())));
        }
        let stored = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
        let mut copy = *buf;
        copy[12..16].fill(0);
        if crc32c::crc32c(&copy) != stored {
            return Err(Error::Corrupt(format!(
                "node at {}: checksum mismatch",
                at()
            )));
        }
        if buf[8] != level {
            return Err(Error::Corrupt(format!(
                "node at {}: level {} where level {} was expected",
                at(),
                buf[8],
                level
            )));
        }
        if buf[9..12].iter().any(|&b| b != 0) {
            return Err(Error::Corrupt(format!(
                "node at {}: reserved bytes not zero",
                at()
            )));
        }
        let gen = le_u64(buf, 16);
        if gen > max_gen {
            return Err(Error::Corrupt(format!(
                "node at {}: generation {} is newer than its parent's {}",
                at(),
                gen,
                max_gen
            )));
        }
        let own = le_u64(buf, 24);
        if own != self_ptr {
            return Err(Error::Corrupt(format!(
                "node at {} says it belongs at {}",
                at(),
                show_ptr(own)
            )));
        }
        let mut node = Node::empty(level, gen);
        for (e, chunk) in node
            .entries
            .iter_mut()
            .zip(buf[NODE_HEADER..].chunks_exact(8))
        {
            *e = le_u64(chunk, 0);
        }
        Ok(node)
    }
}

/// One snapshot as recorded in the root record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub name: String,
    pub root: u64,
    pub gen: u64,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

/// The version's root record: everything needed to find the tree and the snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootRecord {
    pub capacity: Sectors,
    pub depth: u8,
    pub root: u64,
    pub gen: u64,
    pub snapshots: Vec<SnapshotRecord>,
    /// parallax-v2 only: what the record adds for annotations.
    pub v2: Option<V2Ext>,
}

/// The parallax-v2 part of a root record. The tree of a parallax-v2 disk covers the guest's
/// blocks and, after them, the annotation pages: page `p` is tree block `annotations_at + p`.
/// The record's `capacity` is the tree's (guest blocks rounded up to whole blocks, plus the
/// pages); the guest sees `guest_capacity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V2Ext {
    pub guest_capacity: Sectors,
    /// Unix seconds when epoch 1 began.
    pub epoch_base: u64,
    /// Seconds per epoch.
    pub epoch_secs: u32,
    /// Labels on now: every block written gets them.
    pub active: u16,
    /// Taint label names; label `i` is bit `i` of a block's taint set.
    pub labels: Vec<String>,
    /// Block classes and extent groups (`None` when read from an extension of version 1,
    /// written before tiering existed).
    pub tiering: Option<Tiering>,
    /// The tree holds checksum pages after the annotation pages (extension version 3); false
    /// when read from an older extension, until the layout upgrades it.
    pub sums: bool,
}

/// A group of extents holding the same blocks: block `i` of the group is block `i` of each
/// member; tree pointers name the first member (the primary), the others are replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub class: Class,
    /// Blocks are stored compressed ([`encode_compressed`]).
    pub compressed: bool,
    /// 1 to [`MAX_COPIES`] distinct extents of the version.
    pub members: Vec<ExtentId>,
}

/// The tiering section of a parallax-v2 root record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tiering {
    pub policy: TierPolicy,
    pub groups: Vec<Group>,
}

impl V2Ext {
    /// The first tree block holding annotation pages.
    pub fn annotations_at(&self) -> u64 {
        disk_blocks(self.guest_capacity)
    }

    /// The first tree block holding checksum pages (after the annotation pages).
    pub fn sums_at(&self) -> u64 {
        let b = disk_blocks(self.guest_capacity);
        b + annotation_pages(b)
    }

    /// Blocks of the tree: guest blocks, annotation pages, and checksum pages if `sums`.
    pub fn tree_blocks(&self, sums: bool) -> u64 {
        let b = disk_blocks(self.guest_capacity);
        self.sums_at()
            + if sums {
                super::sumpage::pages_for(b)
            } else {
                0
            }
    }
}

/// Checks a taint label name read from a root record: 1 to [`MAX_LABEL`] bytes of ASCII
/// letters, digits, `-`, `_`, `.` (what earlier versions accepted; a new label follows the one
/// rule of [`dovetail_store::names`], which also wants a letter or digit first).
pub fn check_label(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        Err("empty label")
    } else if name.len() > MAX_LABEL {
        Err("longer than 64 bytes")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Err("only ASCII letters, digits, '-', '_' and '.' are allowed")
    } else {
        Ok(())
    }
}

impl RootRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            ROOT_HEADER
                + self
                    .snapshots
                    .iter()
                    .map(|s| SNAPSHOT_FIXED + s.name.len())
                    .sum::<usize>(),
        );
        out.extend_from_slice(if self.v2.is_some() {
            &ROOT_MAGIC_V2
        } else {
            &ROOT_MAGIC
        });
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.capacity.0.to_le_bytes());
        out.push(self.depth);
        out.push(BLOCK_SHIFT as u8);
        out.extend_from_slice(&(ENTRIES as u16).to_le_bytes());
        out.extend_from_slice(&(self.snapshots.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.root.to_le_bytes());
        out.extend_from_slice(&self.gen.to_le_bytes());
        for s in &self.snapshots {
            out.extend_from_slice(&s.root.to_le_bytes());
            out.extend_from_slice(&s.gen.to_le_bytes());
            out.extend_from_slice(&s.created.to_le_bytes());
            out.extend_from_slice(&(s.name.len() as u16).to_le_bytes());
            out.extend_from_slice(s.name.as_bytes());
        }
        if let Some(v2) = &self.v2 {
            let version: u32 = if v2.sums { V2_FORMAT_VERSION } else { 2 };
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&v2.epoch_secs.to_le_bytes());
            out.extend_from_slice(&v2.guest_capacity.0.to_le_bytes());
            out.extend_from_slice(&v2.epoch_base.to_le_bytes());
            out.extend_from_slice(&v2.active.to_le_bytes());
            out.push(v2.labels.len() as u8);
            out.extend_from_slice(&[0; 5]);
            for l in &v2.labels {
                out.push(l.len() as u8);
                out.extend_from_slice(l.as_bytes());
            }
            let t = v2.tiering.clone().unwrap_or_else(|| Tiering {
                policy: TierPolicy::defaults(1),
                groups: Vec::new(),
            });
            encode_tiering(&t, &mut out);
        }
        let crc = crc32c::crc32c(&out);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and validates a root record (pointers are checked by the caller).
    pub fn decode(buf: &[u8]) -> Result<RootRecord> {
        let bad = |what: String| Err(Error::Corrupt(format!("root record: {what}")));
        if buf.len() < ROOT_HEADER {
            return bad(format!("{} bytes, shorter than its header", buf.len()));
        }
        let is_v2 = buf[..8] == ROOT_MAGIC_V2;
        if buf[..8] != ROOT_MAGIC && !is_v2 {
            return bad("bad magic (not a parallax-v1 or parallax-v2 version)".to_string());
        }
        let version = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
        if version != FORMAT_VERSION {
            return bad(format!(
                "format version {version}, this binary reads version {FORMAT_VERSION}"
            ));
        }
        let stored = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
        let mut copy = buf.to_vec();
        copy[12..16].fill(0);
        if crc32c::crc32c(&copy) != stored {
            return bad("checksum mismatch".to_string());
        }
        let capacity = Sectors(le_u64(buf, 16));
        if capacity.bytes().is_none() {
            return bad(format!("capacity {capacity} does not fit in 64-bit bytes"));
        }
        let depth = buf[24];
        let want = depth_for(disk_blocks(capacity));
        if depth != want {
            return bad(format!(
                "tree depth {depth}, a disk of {capacity} needs {want}"
            ));
        }
        if u32::from(buf[25]) != BLOCK_SHIFT {
            return bad(format!("block shift {}, expected {BLOCK_SHIFT}", buf[25]));
        }
        let entries = u16::from_le_bytes([buf[26], buf[27]]);
        if usize::from(entries) != ENTRIES {
            return bad(format!("{entries} entries per node, expected {ENTRIES}"));
        }
        let count = u32::from_le_bytes([buf[28], buf[29], buf[30], buf[31]]);
        let root = le_u64(buf, 32);
        let gen = le_u64(buf, 40);
        let mut snapshots: Vec<SnapshotRecord> = Vec::new();
        let mut at = ROOT_HEADER;
        for i in 0..count {
            let Some(fixed) = buf.get(at..at + SNAPSHOT_FIXED) else {
                return bad(format!("snapshot {i} runs past the end"));
            };
            let sroot = le_u64(fixed, 0);
            let sgen = le_u64(fixed, 8);
            let created = le_u64(fixed, 16);
            let len = usize::from(u16::from_le_bytes([fixed[24], fixed[25]]));
            at += SNAPSHOT_FIXED;
            let Some(name) = buf.get(at..at + len) else {
                return bad(format!("snapshot {i}'s name runs past the end"));
            };
            at += len;
            let Ok(name) = std::str::from_utf8(name) else {
                return bad(format!("snapshot {i}'s name is not UTF-8"));
            };
            if let Err(why) = check_name(name) {
                return bad(format!("snapshot {i}: {why}"));
            }
            if snapshots.iter().any(|s| s.name == name) {
                return bad(format!("snapshot name {name:?} appears twice"));
            }
            if sgen > gen {
                return bad(format!(
                    "snapshot {name:?} has generation {sgen}, newer than the record's {gen}"
                ));
            }
            snapshots.push(SnapshotRecord {
                name: name.to_string(),
                root: sroot,
                gen: sgen,
                created,
            });
        }
        let v2 = if is_v2 {
            match decode_v2(buf, at, capacity) {
                Ok((v2, end)) => {
                    at = end;
                    Some(v2)
                }
                Err(why) => return bad(why),
            }
        } else {
            None
        };
        if at != buf.len() {
            return bad(format!("{} trailing bytes", buf.len() - at));
        }
        Ok(RootRecord {
            capacity,
            depth,
            root,
            gen,
            snapshots,
            v2,
        })
    }
}

/// Decodes the parallax-v2 extension at `buf[at..]` of a root record whose tree has
/// `capacity`; returns it and where it ends.
fn decode_v2(
    buf: &[u8],
    mut at: usize,
    capacity: Sectors,
) -> std::result::Result<(V2Ext, usize), String> {
    let Some(fixed) = buf.get(at..at + V2_FIXED) else {
        return Err("the parallax-v2 extension runs past the end".to_string());
    };
    let version = u32::from_le_bytes([fixed[0], fixed[1], fixed[2], fixed[3]]);
    if !(1..=V2_FORMAT_VERSION).contains(&version) {
        return Err(format!(
            "parallax-v2 extension version {version}, this binary reads version \
             {V2_FORMAT_VERSION}"
        ));
    }
    let epoch_secs = u32::from_le_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
    let guest_capacity = Sectors(le_u64(fixed, 8));
    let epoch_base = le_u64(fixed, 16);
    let active = u16::from_le_bytes([fixed[24], fixed[25]]);
    let count = usize::from(fixed[26]);
    if fixed[27..32] != [0; 5] {
        return Err("parallax-v2 extension: reserved bytes not zero".to_string());
    }
    if epoch_secs == 0 {
        return Err("parallax-v2 extension: epochs of 0 seconds".to_string());
    }
    if count > MAX_LABELS {
        return Err(format!(
            "{count} taint labels, at most {MAX_LABELS} are allowed"
        ));
    }
    if count < MAX_LABELS && active >> count != 0 {
        return Err(format!(
            "active taint set {active:#06x} names labels beyond the {count} defined"
        ));
    }
    let ext = V2Ext {
        guest_capacity,
        epoch_base,
        epoch_secs,
        active,
        labels: Vec::new(),
        tiering: None,
        sums: version >= 3,
    };
    let guest_blocks = guest_capacity
        .bytes()
        .map(|_| disk_blocks(guest_capacity))
        .ok_or_else(|| format!("guest capacity {guest_capacity} does not fit in 64-bit bytes"))?;
    if guest_blocks > MAX_V2_GUEST_BLOCKS {
        return Err(format!(
            "guest capacity {guest_capacity} is {guest_blocks} blocks, more than the \
             {MAX_V2_GUEST_BLOCKS} a parallax-v2 disk may have"
        ));
    }
    let pages = annotation_pages(guest_blocks)
        + if ext.sums {
            super::sumpage::pages_for(guest_blocks)
        } else {
            0
        };
    let want = guest_blocks
        .checked_add(pages)
        .and_then(|b| b.checked_mul(SECTORS_PER_BLOCK));
    if want != Some(capacity.0) {
        return Err(format!(
            "tree capacity {capacity}, a parallax-v2 disk of {guest_capacity} needs {} blocks \
             of data, annotation{} pages",
            guest_blocks.saturating_add(pages),
            if ext.sums { " and checksum" } else { "" }
        ));
    }
    at += V2_FIXED;
    let mut ext = ext;
    for i in 0..count {
        let Some(&len) = buf.get(at) else {
            return Err(format!("taint label {i} runs past the end"));
        };
        at += 1;
        let Some(name) = buf.get(at..at + usize::from(len)) else {
            return Err(format!("taint label {i}'s name runs past the end"));
        };
        at += usize::from(len);
        let Ok(name) = std::str::from_utf8(name) else {
            return Err(format!("taint label {i} is not UTF-8"));
        };
        check_label(name).map_err(|why| format!("taint label {i} ({name:?}): {why}"))?;
        if ext.labels.iter().any(|l| l == name) {
            return Err(format!("taint label {name:?} appears twice"));
        }
        ext.labels.push(name.to_string());
    }
    if version >= 2 {
        let (t, end) = decode_tiering(buf, at)?;
        ext.tiering = Some(t);
        at = end;
    }
    Ok((ext, at))
}

/// Bytes of the tiering section before the groups.
const TIERING_FIXED: usize = 4 + 3 * 4 + 8 + 4;

fn encode_tiering(t: &Tiering, out: &mut Vec<u8>) {
    out.extend_from_slice(&[3, 0, 0, 0]);
    for p in &t.policy.classes {
        out.extend_from_slice(&[p.copies, p.tier, u8::from(p.compress), 0]);
    }
    out.extend_from_slice(&t.policy.cold_after_secs.to_le_bytes());
    out.extend_from_slice(&t.policy.hot_accesses.to_le_bytes());
    out.extend_from_slice(&t.policy.move_mib_s.to_le_bytes());
    out.extend_from_slice(&(t.groups.len() as u32).to_le_bytes());
    for g in &t.groups {
        let n = g.members.len().clamp(1, usize::from(MAX_COPIES)) as u8;
        out.push(g.class as u8 | (u8::from(g.compressed) << 2) | ((n - 1) << 4));
        for m in &g.members {
            out.extend_from_slice(&m.0.to_le_bytes());
        }
    }
}

fn decode_tiering(buf: &[u8], mut at: usize) -> std::result::Result<(Tiering, usize), String> {
    let Some(fixed) = buf.get(at..at + TIERING_FIXED) else {
        return Err("the tiering section runs past the end".to_string());
    };
    if fixed[..4] != [3, 0, 0, 0] {
        return Err("tiering section: expected 3 block classes".to_string());
    }
    let mut classes = [ClassPolicy {
        copies: 1,
        tier: 0,
        compress: false,
    }; 3];
    for (i, c) in classes.iter_mut().enumerate() {
        let b = &fixed[4 + 4 * i..8 + 4 * i];
        if b[2] > 1 || b[3] != 0 {
            return Err(format!("tiering section: class {i} has bad flags"));
        }
        *c = ClassPolicy {
            copies: b[0],
            tier: b[1],
            compress: b[2] == 1,
        };
    }
    let policy = TierPolicy {
        classes,
        cold_after_secs: u32::from_le_bytes([fixed[16], fixed[17], fixed[18], fixed[19]]),
        hot_accesses: u16::from_le_bytes([fixed[20], fixed[21]]),
        move_mib_s: u16::from_le_bytes([fixed[22], fixed[23]]),
    };
    // Tier indexes are checked at open, against the store.
    policy
        .validate(256)
        .map_err(|why| format!("tiering policy: {why}"))?;
    let count = u32::from_le_bytes([fixed[24], fixed[25], fixed[26], fixed[27]]) as usize;
    at += TIERING_FIXED;
    // Each group takes at least 5 bytes (its flags and one extent id): reserve no more than the
    // record can hold, whatever count it states (fuzz target parallax_root).
    let mut groups = Vec::with_capacity(count.min(buf.len().saturating_sub(at) / 5));
    let mut seen = std::collections::HashSet::new();
    for i in 0..count {
        let Some(&flags) = buf.get(at) else {
            return Err(format!("extent group {i} runs past the end"));
        };
        at += 1;
        let class = Class::from_bits(flags & 3)
            .ok_or_else(|| format!("extent group {i}: class {} is unknown", flags & 3))?;
        let n = usize::from((flags >> 4) & 3) + 1;
        if flags & 0xc8 != 0 || n > usize::from(MAX_COPIES) {
            return Err(format!("extent group {i}: bad flags {flags:#04x}"));
        }
        let compressed = flags & 4 != 0;
        if compressed && class != Class::Cold {
            return Err(format!("extent group {i}: only cold groups are compressed"));
        }
        let mut members = Vec::with_capacity(n);
        for _ in 0..n {
            let Some(b) = buf.get(at..at + 4) else {
                return Err(format!("extent group {i} runs past the end"));
            };
            at += 4;
            let e = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if !seen.insert(e) {
                return Err(format!("extent {e} is in two extent groups"));
            }
            members.push(ExtentId(e));
        }
        groups.push(Group {
            class,
            compressed,
            members,
        });
    }
    Ok((Tiering { policy, groups }, at))
}

/// Annotation pages of a parallax-v2 disk of `guest_blocks` blocks.
pub fn annotation_pages(guest_blocks: u64) -> u64 {
    dovetail_annotations::Table::pages_for(guest_blocks)
}

/// Checks a snapshot name read from a root record: 1 to [`MAX_NAME`] bytes, no control
/// characters (what earlier versions accepted; a new snapshot's name follows the one rule of
/// [`dovetail_store::names`]).
pub fn check_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        Err("empty name")
    } else if name.len() > MAX_NAME {
        Err("name longer than 255 bytes")
    } else if name.chars().any(char::is_control) {
        Err("name contains control characters")
    } else {
        Ok(())
    }
}

/// Where one disk block is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub class: Class,
    /// The tier of the first copy.
    pub tier: usize,
    pub copies: usize,
    pub compressed: bool,
    /// The extent of the first copy.
    pub extent: ExtentId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_round_trip_and_null_is_distinct() {
        let p = make_ptr(ExtentId(0), 0);
        assert_ne!(p, NULL);
        assert_eq!(split_ptr(p), Some((ExtentId(0), 0)));
        let q = make_ptr(ExtentId(0x7fff_ffff), u32::MAX);
        assert_eq!(split_ptr(q), Some((ExtentId(0x7fff_ffff), u32::MAX)));
        assert_eq!(split_ptr(NULL), None);
        assert_eq!(split_ptr(12345), None);
    }

    #[test]
    fn depth_grows_with_capacity() {
        assert_eq!(ENTRIES, 508);
        assert_eq!(depth_for(0), 1);
        assert_eq!(depth_for(508), 1);
        assert_eq!(depth_for(509), 2);
        assert_eq!(depth_for(508 * 508), 2);
        assert_eq!(depth_for(508 * 508 + 1), 3);
        assert_eq!(depth_for(disk_blocks(Sectors(u64::MAX >> 9))), 6);
    }

    #[test]
    fn node_round_trip_and_every_corruption_is_caught() {
        let mut n = Node::empty(2, 7);
        n.entries[0] = make_ptr(ExtentId(3), 9);
        n.entries[ENTRIES - 1] = make_ptr(ExtentId(1), 1);
        let at = make_ptr(ExtentId(3), 4);
        let mut buf = [0u8; BLOCK_SIZE];
        n.encode(at, &mut buf);
        assert_eq!(Node::decode(&buf, at, 2, 7).expect("decode"), n);
        assert!(Node::decode(&buf, at, 1, 7).is_err(), "wrong level");
        assert!(Node::decode(&buf, at, 2, 6).is_err(), "newer than parent");
        assert!(
            Node::decode(&buf, make_ptr(ExtentId(3), 5), 2, 7).is_err(),
            "misplaced"
        );
        for i in [0, 8, 12, 20, 40, 4095] {
            let mut b = buf;
            b[i] ^= 1;
            assert!(matches!(Node::decode(&b, at, 2, 7), Err(Error::Corrupt(_))));
        }
    }

    #[test]
    fn root_record_round_trip_and_corruption() {
        let r = RootRecord {
            capacity: Sectors(1 << 20),
            depth: depth_for(disk_blocks(Sectors(1 << 20))),
            root: make_ptr(ExtentId(2), 3),
            gen: 9,
            snapshots: vec![
                SnapshotRecord {
                    name: "a".into(),
                    root: NULL,
                    gen: 1,
                    created: 100,
                },
                SnapshotRecord {
                    name: "nightly-é".into(),
                    root: make_ptr(ExtentId(2), 1),
                    gen: 5,
                    created: 200,
                },
            ],
            v2: None,
        };
        let guest = Sectors(1 << 20);
        let tree_blocks = disk_blocks(guest)
            + annotation_pages(disk_blocks(guest))
            + super::super::sumpage::pages_for(disk_blocks(guest));
        let capacity = Sectors(tree_blocks * SECTORS_PER_BLOCK);
        let r2 = RootRecord {
            capacity,
            depth: depth_for(tree_blocks),
            v2: Some(V2Ext {
                guest_capacity: guest,
                epoch_base: 1_700_000_000,
                epoch_secs: 3600,
                active: 0b10,
                labels: vec!["compromised".into(), "cve-2026-1".into()],
                tiering: Some(Tiering {
                    policy: TierPolicy::defaults(2),
                    groups: vec![
                        Group {
                            class: Class::Meta,
                            compressed: false,
                            members: vec![ExtentId(3), ExtentId(9)],
                        },
                        Group {
                            class: Class::Cold,
                            compressed: true,
                            members: vec![ExtentId(12)],
                        },
                    ],
                }),
                sums: true,
            }),
            ..r.clone()
        };
        // Extension version 2 (before checksum pages): the tree has no checksum pages.
        let mut r3 = r2.clone();
        let old_blocks = tree_blocks - super::super::sumpage::pages_for(disk_blocks(guest));
        r3.capacity = Sectors(old_blocks * SECTORS_PER_BLOCK);
        r3.depth = depth_for(old_blocks);
        if let Some(v) = r3.v2.as_mut() {
            v.sums = false;
        }
        for r in [r, r2, r3] {
            let b = r.encode();
            assert_eq!(RootRecord::decode(&b).expect("decode"), r);
            for i in 0..b.len() {
                let mut c = b.clone();
                c[i] ^= 0x40;
                assert!(RootRecord::decode(&c).is_err(), "flip at byte {i}");
            }
            for n in 0..b.len() {
                assert!(RootRecord::decode(&b[..n]).is_err(), "truncated to {n}");
            }
        }
    }

    #[test]
    fn labels_are_checked() {
        assert!(check_label("compromised-2026.11_a").is_ok());
        for bad in ["", "a b", "é", &"x".repeat(65)] {
            assert!(check_label(bad).is_err(), "{bad:?}");
        }
    }
}
