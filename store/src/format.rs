//! The store's metadata file, byte by byte (docs/format.md, "Store, format version 3"): a fixed
//! header (since format version 3 with the tier table: each tier's name, extent count and data
//! file), then two metadata slots A and B. A commit writes the whole catalog (the payload) to
//! the slot that does *not* hold the newest generation; the newest valid slot is the store's
//! state. Everything here is pure encoding and validation; I/O lives in `store.rs`.
//!
//! Format version 1 (no tee records, slot checksums without the version) is still decoded: a
//! version-1 store is read as it is by a read-only open and upgraded in place to format version
//! 2 by a read-write one (`store.rs`, docs/format.md "Upgrade from format version 1"). Format
//! version 2 differs from 3 only in its header, which has no tier table: it is read and written
//! as it is, as a store of one tier, `default`, at `data.0`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::le::{le_u32, le_u64};
use crate::space::{Result, StoreError};

/// Bytes 0..16 of every store's metadata file, in every format version.
pub const MAGIC: &[u8; 16] = b"DOVETAILSTORE\0\0\0";
/// The format this binary writes. Any change to the header, the slots or the payload encoding
/// bumps it. A binary reads the versions from [`MIN_FORMAT_VERSION`] up to its own and refuses
/// every other one (newer ones by name).
pub const FORMAT_VERSION: u32 = 5;
/// The format a version-4 store is upgraded to by a read-write open: version 5 adds each disk's
/// attachment record to the payload (docs/format.md "Attachment record" and "Upgrade from
/// format version 4").
pub const ATTACH_VERSION: u32 = 5;
/// The newest format this binary reads and writes: version 6 adds the shared pool of
/// single-instance blocks to the payload ([`Pool`]; docs/format.md "Shared pool"). Stores are
/// still created in [`FORMAT_VERSION`] (5); a store becomes version 6 only when single-instance
/// blocks are turned on for it (`store create --single-instance`, `store upgrade
/// --single-instance`: [`crate::Store::enable_single_instance`]), so a store that never asks
/// for them stays readable by a format-5 binary.
pub const SHARED_VERSION: u32 = 6;
/// The newest format this binary reads and writes: version 7 adds to each disk the members of
/// an N-version (voting) Tee beyond its candidate ([`MemberRec`]; docs/format.md "Tee
/// members"). Stores stay in their format until a third member is recorded for some disk
/// (`store upgrade --voting`: [`crate::Store::enable_members`]), so a store that never has one
/// stays readable by a binary of format 5 or 6.
pub const MEMBERS_VERSION: u32 = 7;
/// The most members of a voting Tee beyond the trusted version and the candidate (so at most
/// five members in all).
pub const MAX_EXTRA_MEMBERS: usize = 3;
/// The grant-table key of the shared pool's extents: no version ever has it (keys are handed
/// out upwards from 1), so no version's write passes the grant check there.
pub const POOL_KEY: u64 = u64::MAX;
/// Bytes of a shared block.
pub const SHARED_BLOCK: u64 = 4096;
/// The format a version-3 store is upgraded to by a read-write open: version 4 adds a
/// [`TierHeader`] to every tier's data file, which is how a tier file proves it belongs to the
/// store (docs/format.md "Tier file header" and "Upgrade from format version 3").
pub const TIER_HEADER_VERSION: u32 = 4;
/// The oldest format this binary reads (and upgrades to [`UPGRADE_VERSION`] on a read-write
/// open).
pub const MIN_FORMAT_VERSION: u32 = 1;
/// The format a version-1 store is upgraded to by a read-write open. Format version 2 is not
/// upgraded: it differs from [`FORMAT_VERSION`] only by the header's tier table, and a
/// version-2 store is a store of one tier (`default`, at `data.0`), read and written as it is
/// (so a binary of format version 2 can still open it).
pub const UPGRADE_VERSION: u32 = 2;
/// Bytes reserved for the header at the start of the metadata file.
pub const HEADER_SIZE: u64 = 4096;
/// Bytes of the header's fixed fields, before its checksum (format versions 1 and 2: the bytes
/// the checksum covers; version 3: the checksum covers them and the bytes after it).
const HEADER_USED: usize = 64;
/// Where the tier table starts (format version 3): the tier count u16, two reserved bytes,
/// then the entries.
const TIER_TABLE: usize = 68;
/// Bytes of a tier entry before its path: name (16, zero padded), extent count u32, path
/// length u16.
const TIER_ENTRY: usize = 22;
/// The most tiers a store may have.
pub const MAX_TIERS: usize = 8;
/// The longest tier name, in bytes (the names' own rule, [`crate::names`]).
pub use crate::names::MAX_TIER_NAME;
/// The longest tier path, in bytes (so eight tiers with the longest paths fit in the 4 KiB
/// header: 72 + 8 · (22 + 480) = 4088).
pub const MAX_TIER_PATH: usize = 480;
/// Bytes 0..16 of a tier file's header (format version 4).
pub const TIER_MAGIC: &[u8; 16] = b"DOVETAILTIER\0\0\0\0";
/// The size of a tier file's header, which follows the tier's last extent.
pub const TIER_HEADER_SIZE: u64 = 4096;
/// Where a tier header's checksum is.
const TIER_CRC: usize = 76;
/// The name of the one tier of a store created without tiers (and of a version-1 or -2 store).
pub const DEFAULT_TIER: &str = "default";
/// Bytes before the payload in a slot: generation u64, payload length u32, crc32c u32.
pub const SLOT_HEADER: usize = 16;
/// Bytes of the payload's fixed part: next_key u64, extent_count u32, free_extents u32,
/// version_count u32, disk_count u32.
pub const PAYLOAD_HEADER: usize = 24;
/// The largest root record a version may commit.
pub const MAX_ROOT: usize = 64 << 10;
/// Room in a slot for the catalog beyond the per-extent tables (versions, names, roots).
pub const CATALOG_BUDGET: u64 = 4 << 20;
/// The most extents a store may have (so a commit, which rewrites the extent table, stays
/// small: 12 bytes an extent at most).
pub const MAX_EXTENTS: u32 = 1 << 16;
/// The largest slot a header may state: the one a store of [`MAX_EXTENTS`] extents gets
/// ([`slot_size_for`]). A slot's payload is read into memory whole, so a larger (corrupt or
/// hostile) slot size is refused before it can size that allocation.
pub const MAX_SLOT_SIZE: u64 =
    ((SLOT_HEADER + PAYLOAD_HEADER) as u64 + 12 * MAX_EXTENTS as u64 + CATALOG_BUDGET)
        .div_ceil(4096)
        * 4096;
/// Extent sizes are whole multiples of this.
pub const EXTENT_ALIGN: u64 = 4096;
/// The data file of a store created without tiers (its one tier, `default`), in the store's
/// directory; the only data file of a format version 1 or 2 store.
pub const DATA_FILE: &str = "data.0";

/// The longest disk and layout names, in bytes (the names' own rule, [`crate::names`]).
pub use crate::names::{MAX_DISK_NAME, MAX_LAYOUT_NAME};
/// Disk sizes are whole multiples of this.
pub const DISK_ALIGN: u64 = 4096;
/// The longest tee policy or fault rule, in bytes of UTF-8 (encoded like a name: a u8 length).
pub const MAX_TEE_STRING: usize = 255;
/// The most fault rules a tee record holds.
pub const MAX_TEE_FAULTS: usize = 16;
/// The longest quarantine reason, in bytes of UTF-8 (longer ones are truncated).
pub const MAX_TEE_REASON: usize = 4096;
/// The longest socket path of an attachment record, in bytes: what a Unix socket address
/// holds (108 bytes with the terminating NUL).
pub const MAX_ATTACH_SOCKET: usize = 107;
/// The most queues an attachment record may ask for.
pub const MAX_ATTACH_QUEUES: u16 = 64;
/// The longest serial of an attachment record, in bytes (a virtio-blk ID).
pub const MAX_ATTACH_SERIAL: usize = 20;

/// One tier as the header records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierRec {
    /// `[a-z0-9_-]`, 1 to [`MAX_TIER_NAME`] bytes, unique in the store.
    pub name: String,
    /// Extents of the tier (at least 1); the tiers hold the store's extents in order.
    pub extents: u32,
    /// The tier's data file: absolute, or relative to the store's directory (`data.0`).
    pub path: PathBuf,
}

/// The metadata file's header: written once by `create`, never changed (but for the version
/// field, by the upgrade from format version 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The format version the header states (the slots are read by its rules).
    pub version: u32,
    pub uuid: [u8; 16],
    pub extent_size: u64,
    /// Extents of the whole store: the sum of the tiers' counts.
    pub extent_count: u32,
    pub slot_size: u64,
    /// The tiers, in extent order (format version 3; one `default` tier at `data.0` in a
    /// version-1 or -2 header, which does not encode it).
    pub tiers: Vec<TierRec>,
}

/// Slot size for a store of `extent_count` extents: the largest payload (extent table, extent
/// lists, catalog budget) plus the slot header, rounded up to 4 KiB.
pub fn slot_size_for(extent_count: u32) -> u64 {
    let need =
        (SLOT_HEADER + PAYLOAD_HEADER) as u64 + 12 * u64::from(extent_count) + CATALOG_BUDGET;
    need.div_ceil(4096) * 4096
}

/// The one tier of a store without a tier table (or created without tiers).
pub fn default_tier(extent_count: u32) -> TierRec {
    TierRec {
        name: DEFAULT_TIER.to_string(),
        extents: extent_count,
        path: PathBuf::from(DATA_FILE),
    }
}

impl Header {
    /// The header of a new store of one tier, `default`, at `data.0`.
    pub fn new(uuid: [u8; 16], extent_size: u64, extent_count: u32) -> Header {
        Header::with_tiers(uuid, extent_size, vec![default_tier(extent_count)])
    }

    /// The header of a new store made of `tiers` (checked by [`check_tiers`] beforehand).
    pub fn with_tiers(uuid: [u8; 16], extent_size: u64, tiers: Vec<TierRec>) -> Header {
        let extent_count = tiers.iter().map(|t| t.extents).sum();
        Header {
            version: FORMAT_VERSION,
            uuid,
            extent_size,
            extent_count,
            slot_size: slot_size_for(extent_count),
            tiers,
        }
    }

    /// The first extent of tier `t`.
    pub fn tier_start(&self, t: usize) -> u32 {
        self.tiers.iter().take(t).map(|x| x.extents).sum()
    }

    /// The bytes of tier `t`'s extents in its data file (where its [`TierHeader`] starts, in
    /// format version 4).
    pub fn tier_len(&self, t: usize) -> u64 {
        self.tiers
            .get(t)
            .map_or(0, |x| u64::from(x.extents) * self.extent_size)
    }

    /// Whether the tier files carry a [`TierHeader`] (format version 4 and later).
    pub fn has_tier_headers(&self) -> bool {
        self.version >= TIER_HEADER_VERSION
    }

    /// The length tier `t`'s data file must have at least: its extents, and its tier header in
    /// format version 4.
    pub fn tier_file_len(&self, t: usize) -> u64 {
        self.tier_len(t)
            + if self.has_tier_headers() {
                TIER_HEADER_SIZE
            } else {
                0
            }
    }

    /// Offset of slot `i` (0 = A, 1 = B) in the metadata file.
    pub fn slot_offset(&self, i: usize) -> u64 {
        HEADER_SIZE + i as u64 * self.slot_size
    }

    /// Length of the metadata file.
    pub fn meta_len(&self) -> u64 {
        HEADER_SIZE + 2 * self.slot_size
    }

    /// Largest payload a slot holds.
    pub fn max_payload(&self) -> usize {
        (self.slot_size as usize).saturating_sub(SLOT_HEADER)
    }

    /// The 4096 header bytes, stating `self.version`. In format versions 1 and 2 every
    /// non-zero byte is in the first 68, so rewriting the first 512-byte sector rewrites the
    /// whole header (the upgrade from version 1 relies on this); those versions have no tier
    /// table (`tiers` must be the one default tier). Format version 3 adds the tier table at
    /// byte 68, under the checksum. The tiers must pass [`check_tiers`].
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE as usize];
        b[0..16].copy_from_slice(MAGIC);
        b[16..20].copy_from_slice(&self.version.to_le_bytes());
        // 20..24 reserved, zero.
        b[24..40].copy_from_slice(&self.uuid);
        b[40..48].copy_from_slice(&self.extent_size.to_le_bytes());
        b[48..52].copy_from_slice(&self.extent_count.to_le_bytes());
        // 52..56 reserved, zero.
        b[56..64].copy_from_slice(&self.slot_size.to_le_bytes());
        if self.version >= 3 {
            b[TIER_TABLE..TIER_TABLE + 2].copy_from_slice(&(self.tiers.len() as u16).to_le_bytes());
            // 70..72 reserved, zero.
            let mut at = TIER_TABLE + 4;
            for t in &self.tiers {
                let path = t.path.as_os_str().as_bytes();
                b[at..at + t.name.len()].copy_from_slice(t.name.as_bytes());
                b[at + 16..at + 20].copy_from_slice(&t.extents.to_le_bytes());
                b[at + 20..at + 22].copy_from_slice(&(path.len() as u16).to_le_bytes());
                b[at + TIER_ENTRY..at + TIER_ENTRY + path.len()].copy_from_slice(path);
                at += TIER_ENTRY + path.len();
            }
        }
        let crc = header_crc(self.version, &b);
        b[64..68].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks a header. The magic is checked first, then the format version (one of
    /// [`MIN_FORMAT_VERSION`]`..=`[`FORMAT_VERSION`]), then the checksum: a store of another
    /// format version gets [`StoreError::Version`] even if that version moved the checksum.
    pub fn decode(b: &[u8], path: &Path) -> Result<Header> {
        let not_a_store = |reason: &str| StoreError::NotAStore {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if b.len() < HEADER_SIZE as usize {
            return Err(not_a_store("shorter than the 4096-byte header"));
        }
        if &b[0..16] != MAGIC {
            return Err(not_a_store("bad magic (expected \"DOVETAILSTORE\")"));
        }
        let version = le_u32(b, 16);
        if !(MIN_FORMAT_VERSION..=MEMBERS_VERSION).contains(&version) {
            return Err(StoreError::Version {
                found: version,
                supported: MEMBERS_VERSION,
            });
        }
        let b = &b[..HEADER_SIZE as usize];
        let stored = le_u32(b, 64);
        let crc = header_crc(version, b);
        if stored != crc {
            return Err(StoreError::Corrupt(format!(
                "header checksum mismatch (stored {stored:#010x}, computed {crc:#010x})"
            )));
        }
        let reserved_zero = if version >= 3 {
            b[TIER_TABLE + 2..TIER_TABLE + 4] == [0, 0]
        } else {
            b[68..].iter().all(|&x| x == 0)
        };
        if le_u32(b, 20) != 0 || le_u32(b, 52) != 0 || !reserved_zero {
            return Err(StoreError::Corrupt(
                "header reserved bytes are not zero".into(),
            ));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[24..40]);
        let extent_count = le_u32(b, 48);
        let tiers = if version >= 3 {
            decode_tiers(b).map_err(|e| StoreError::Corrupt(format!("header tier table: {e}")))?
        } else {
            vec![default_tier(extent_count)]
        };
        let h = Header {
            version,
            uuid,
            extent_size: le_u64(b, 40),
            extent_count,
            slot_size: le_u64(b, 56),
            tiers,
        };
        check_geometry(h.extent_size, h.extent_count)
            .map_err(|e| StoreError::Corrupt(format!("header geometry is invalid: {e}")))?;
        let sum: u64 = h.tiers.iter().map(|t| u64::from(t.extents)).sum();
        if sum != u64::from(h.extent_count) {
            return Err(StoreError::Corrupt(format!(
                "header tier table: the tiers hold {sum} extents but the store has {}",
                h.extent_count
            )));
        }
        let min = (SLOT_HEADER + PAYLOAD_HEADER) as u64 + 12 * u64::from(h.extent_count);
        if h.slot_size % 4096 != 0 || h.slot_size < min || h.slot_size > MAX_SLOT_SIZE {
            return Err(StoreError::Corrupt(format!(
                "header slot size {} is invalid for {} extents (a multiple of 4096 from {min} \
                 to {MAX_SLOT_SIZE})",
                h.slot_size, h.extent_count
            )));
        }
        Ok(h)
    }
}

/// The header's checksum in format `version`: crc32c over bytes 0..64 (versions 1 and 2), or
/// over bytes 0..64 then 68..4096 (version 3 and later: the tier table and the zeros after it).
fn header_crc(version: u32, b: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&b[..HEADER_USED]);
    if version >= 3 {
        crc32c::crc32c_append(crc, &b[HEADER_USED + 4..HEADER_SIZE as usize])
    } else {
        crc
    }
}

/// The header of a tier's data file (format version 4): 4096 bytes right after the tier's last
/// extent, at byte `extents · extent_size` of the file, naming the store (its uuid and extent
/// size) and the tier (its index, name and extent range). A file that does not carry the header
/// its tier table entry expects is refused: a store's metadata cannot make the daemon open a
/// file that was not created (or adopted, by the upgrade) as that tier of that store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierHeader {
    pub uuid: [u8; 16],
    pub extent_size: u64,
    /// The tier's first extent (global id) and its extent count.
    pub first: u32,
    pub extents: u32,
    /// The tier's position in the tier table.
    pub index: u16,
    pub name: String,
}

impl TierHeader {
    /// The header tier `t` of `h` must carry.
    pub fn expected(h: &Header, t: usize) -> TierHeader {
        TierHeader {
            uuid: h.uuid,
            extent_size: h.extent_size,
            first: h.tier_start(t),
            extents: h.tiers[t].extents,
            index: t as u16,
            name: h.tiers[t].name.clone(),
        }
    }

    /// The 4096 bytes (the name must be a valid tier name).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; TIER_HEADER_SIZE as usize];
        b[0..16].copy_from_slice(TIER_MAGIC);
        b[16..20].copy_from_slice(&TIER_HEADER_VERSION.to_le_bytes());
        // 20..24 reserved, zero.
        b[24..40].copy_from_slice(&self.uuid);
        b[40..48].copy_from_slice(&self.extent_size.to_le_bytes());
        b[48..52].copy_from_slice(&self.first.to_le_bytes());
        b[52..56].copy_from_slice(&self.extents.to_le_bytes());
        b[56..58].copy_from_slice(&self.index.to_le_bytes());
        // 58..60 reserved, zero.
        let n = self.name.len().min(MAX_TIER_NAME);
        b[60..60 + n].copy_from_slice(&self.name.as_bytes()[..n]);
        let crc = tier_crc(&b);
        b[TIER_CRC..TIER_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a tier header: magic, version, checksum, reserved bytes, name. One sentence on
    /// the first problem, to follow a file's path ("... has no tier header ...").
    pub fn decode(b: &[u8]) -> std::result::Result<TierHeader, String> {
        if b.len() < TIER_HEADER_SIZE as usize || &b[0..16] != TIER_MAGIC {
            return Err(
                "has no Dovetail tier header there (bad magic): it was not created as a \
                        tier file of a store"
                    .into(),
            );
        }
        let version = le_u32(b, 16);
        if version != TIER_HEADER_VERSION {
            return Err(format!(
                "has a tier header of format version {version} (this binary reads {TIER_HEADER_VERSION})"
            ));
        }
        let b = &b[..TIER_HEADER_SIZE as usize];
        let stored = le_u32(b, TIER_CRC);
        let crc = tier_crc(b);
        if stored != crc {
            return Err(format!(
                "has a damaged tier header (checksum stored {stored:#010x}, computed {crc:#010x})"
            ));
        }
        if le_u32(b, 20) != 0 || b[58..60] != [0, 0] || b[TIER_CRC + 4..].iter().any(|&c| c != 0) {
            return Err("has a tier header whose reserved bytes are not zero".into());
        }
        let raw = &b[60..60 + MAX_TIER_NAME];
        let len = raw.iter().position(|&c| c == 0).unwrap_or(MAX_TIER_NAME);
        if raw[len..].iter().any(|&c| c != 0) {
            return Err("has a tier header whose tier name is not zero padded".into());
        }
        let name = std::str::from_utf8(&raw[..len])
            .ok()
            .filter(|n| stored_tier_name_ok(n))
            .ok_or("has a tier header with an invalid tier name")?
            .to_string();
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[24..40]);
        Ok(TierHeader {
            uuid,
            extent_size: le_u64(b, 40),
            first: le_u32(b, 48),
            extents: le_u32(b, 52),
            index: u16::from_le_bytes([b[56], b[57]]),
            name,
        })
    }

    /// Why a file carrying `found` is not the file `self` expects, if it is not: the rest of a
    /// sentence after the file's path.
    pub fn mismatch(&self, found: &TierHeader) -> Option<String> {
        if found.uuid != self.uuid {
            return Some(format!(
                "belongs to another store (its tier header names store {}, this store is {})",
                format_uuid(&found.uuid),
                format_uuid(&self.uuid)
            ));
        }
        if found != self {
            return Some(format!(
                "is the data file of tier {} (index {}, extents {}..{} of {} bytes), not of tier {} \
                 (index {}, extents {}..{} of {} bytes)",
                found.name,
                found.index,
                found.first,
                u64::from(found.first) + u64::from(found.extents),
                found.extent_size,
                self.name,
                self.index,
                self.first,
                u64::from(self.first) + u64::from(self.extents),
                self.extent_size
            ));
        }
        None
    }
}

/// A tier header's checksum: crc32c over bytes 0..76, then 80..4096.
fn tier_crc(b: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&b[..TIER_CRC]);
    crc32c::crc32c_append(crc, &b[TIER_CRC + 4..TIER_HEADER_SIZE as usize])
}

/// Parses a version-3 header's tier table (`b` is the whole header) and checks it with
/// [`check_tiers`]; the bytes after the last entry must be zero.
fn decode_tiers(b: &[u8]) -> std::result::Result<Vec<TierRec>, String> {
    let count = u16::from_le_bytes([b[TIER_TABLE], b[TIER_TABLE + 1]]) as usize;
    if count == 0 || count > MAX_TIERS {
        return Err(format!("{count} tiers (a store has 1 to {MAX_TIERS})"));
    }
    let mut at = TIER_TABLE + 4;
    let mut tiers = Vec::with_capacity(count);
    for i in 0..count {
        if at + TIER_ENTRY > b.len() {
            return Err(format!("tier {i}'s entry runs past the header"));
        }
        let raw = &b[at..at + MAX_TIER_NAME];
        let len = raw.iter().position(|&c| c == 0).unwrap_or(MAX_TIER_NAME);
        if raw[len..].iter().any(|&c| c != 0) {
            return Err(format!("tier {i}'s name is not zero padded"));
        }
        let name = String::from_utf8(raw[..len].to_vec())
            .map_err(|_| format!("tier {i}'s name is not UTF-8"))?;
        let extents = le_u32(b, at + 16);
        let plen = u16::from_le_bytes([b[at + 20], b[at + 21]]) as usize;
        let start = at + TIER_ENTRY;
        if start + plen > b.len() {
            return Err(format!(
                "tier {name}'s path ({plen} bytes) runs past the header"
            ));
        }
        let path = PathBuf::from(OsStr::from_bytes(&b[start..start + plen]));
        tiers.push(TierRec {
            name,
            extents,
            path,
        });
        at = start + plen;
    }
    if b[at..].iter().any(|&c| c != 0) {
        return Err("bytes after the last tier entry are not zero".into());
    }
    check_tiers(&tiers)?;
    Ok(tiers)
}

/// Checks a new tier name ([`crate::names`]: 1 to 16 characters of `[a-z0-9_-]`, starting
/// with a letter or digit).
pub fn check_tier_name(name: &str) -> Result<()> {
    crate::names::check_name(crate::names::NameKind::Tier, name)
        .map_err(|e| StoreError::Invalid(e.to_string()))
}

/// Whether a tier name read from a header is one format 3 allows: 1 to 16 bytes of
/// `[a-z0-9_-]` (a first `_` or `-` included, as earlier versions accepted it).
fn stored_tier_name_ok(name: &str) -> bool {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-');
    !name.is_empty() && name.len() <= MAX_TIER_NAME && name.chars().all(ok)
}

/// Checks a store's tier table: 1 to [`MAX_TIERS`] tiers, names valid and unique, at least one
/// extent each, paths of 1 to [`MAX_TIER_PATH`] bytes without NUL, no path twice. (The total
/// extent count is [`check_geometry`]'s.) One sentence on the first problem found.
pub fn check_tiers(tiers: &[TierRec]) -> std::result::Result<(), String> {
    if tiers.is_empty() || tiers.len() > MAX_TIERS {
        return Err(format!(
            "{} tiers: a store has 1 to {MAX_TIERS}",
            tiers.len()
        ));
    }
    for (i, t) in tiers.iter().enumerate() {
        if !stored_tier_name_ok(&t.name) {
            return Err(format!(
                "tier name {} is invalid: use 1 to {MAX_TIER_NAME} characters from a-z 0-9 _ -",
                crate::names::shown(&t.name)
            ));
        }
        if tiers[..i].iter().any(|o| o.name == t.name) {
            return Err(format!("tier name {:?} is used twice", t.name));
        }
        if t.extents == 0 {
            return Err(format!("tier {} has no extent", t.name));
        }
        let p = t.path.as_os_str().as_bytes();
        if p.is_empty() || p.len() > MAX_TIER_PATH {
            return Err(format!(
                "tier {}'s path is {} bytes (1 to {MAX_TIER_PATH} allowed): {}",
                t.name,
                p.len(),
                t.path.display()
            ));
        }
        if p.contains(&0) {
            return Err(format!("tier {}'s path holds a NUL byte", t.name));
        }
        // A relative path names a file inside the store's directory: one plain name.
        if t.path.is_relative() && (p.contains(&b'/') || p == b"." || p == b"..") {
            return Err(format!(
                "tier {}'s path {} is relative but not a plain file name in the store's \
                 directory",
                t.name,
                t.path.display()
            ));
        }
        if let Some(o) = tiers[..i].iter().find(|o| o.path == t.path) {
            return Err(format!(
                "tiers {} and {} have the same data file {}",
                o.name,
                t.name,
                t.path.display()
            ));
        }
    }
    Ok(())
}

/// Checks the geometry of a store: extent size and count.
pub fn check_geometry(extent_size: u64, extent_count: u32) -> Result<()> {
    if extent_size == 0 || extent_size % EXTENT_ALIGN != 0 {
        return Err(StoreError::Invalid(format!(
            "extent size {extent_size} is not a positive multiple of {EXTENT_ALIGN}"
        )));
    }
    if extent_count == 0 {
        return Err(StoreError::Invalid(
            "a store needs at least one extent".into(),
        ));
    }
    if extent_count > MAX_EXTENTS {
        return Err(StoreError::Invalid(format!(
            "{extent_count} extents is more than the {MAX_EXTENTS} a store may have; use larger extents"
        )));
    }
    extent_size
        .checked_mul(u64::from(extent_count))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| StoreError::Invalid("store size overflows".into()))?;
    Ok(())
}

/// One version: a layout instance holding one disk's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRec {
    pub key: u64,
    pub disk: String,
    pub layout: String,
    /// Extents granted to this version, in grant order.
    pub extents: Vec<u32>,
    pub root: Vec<u8>,
}

/// The state of a disk's tee (on disk a u8: 0 active, 1 quarantined).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TeeState {
    /// The candidate is served beside the trusted version and validated.
    Active,
    /// The candidate failed validation: the disk is served from its trusted version alone.
    Quarantined,
}

impl TeeState {
    /// The state's byte on disk.
    pub fn to_byte(self) -> u8 {
        match self {
            TeeState::Active => 0,
            TeeState::Quarantined => 1,
        }
    }

    /// The state a byte on disk names; `None` for anything but 0 and 1 (corrupt).
    pub fn from_byte(b: u8) -> Option<TeeState> {
        match b {
            0 => Some(TeeState::Active),
            1 => Some(TeeState::Quarantined),
            _ => None,
        }
    }
}

impl std::fmt::Display for TeeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TeeState::Active => "active",
            TeeState::Quarantined => "quarantined",
        })
    }
}

/// The state of a voting Tee's member beyond the candidate (on disk a u8: 0 voting, 1
/// filling, 2 quarantined).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberState {
    /// Written and voted on like every member.
    Voting,
    /// Added live: written by every guest write and filled from the majority in the
    /// background; votes on the blocks it holds.
    Filling,
    /// Lost too many votes (or failed): no more I/O; `tee-remove` drops it.
    Quarantined,
}

impl MemberState {
    pub fn to_byte(self) -> u8 {
        match self {
            MemberState::Voting => 0,
            MemberState::Filling => 1,
            MemberState::Quarantined => 2,
        }
    }

    /// The state a byte on disk names; `None` for anything else (corrupt).
    pub fn from_byte(b: u8) -> Option<MemberState> {
        match b {
            0 => Some(MemberState::Voting),
            1 => Some(MemberState::Filling),
            2 => Some(MemberState::Quarantined),
            _ => None,
        }
    }
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemberState::Voting => "voting",
            MemberState::Filling => "filling",
            MemberState::Quarantined => "quarantined",
        })
    }
}

/// A member of a disk's voting Tee beyond its candidate (format version 7): a version of the
/// disk (its layout is the version record's), with its state. The trusted version is member
/// 0, the candidate member 1 (its state is the tee record's), these members 2 and up in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemberRec {
    pub key: u64,
    pub state: MemberState,
    /// Unix time in seconds of the last state change.
    pub changed: u64,
}

/// A disk's tee record: the disk is served through both its trusted and its candidate
/// version, validated by `policy`. Only a disk with a candidate may have one. The policy and
/// fault strings are opaque to the store (the Tee parses and validates them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TeeRec {
    /// The validation policy, at most [`MAX_TEE_STRING`] bytes.
    pub policy: String,
    /// Fault-injection rules, at most [`MAX_TEE_FAULTS`] of at most [`MAX_TEE_STRING`] bytes.
    pub faults: Vec<String>,
    pub state: TeeState,
    /// Empty while active; otherwise one line saying why and by what the candidate was
    /// quarantined, at most [`MAX_TEE_REASON`] bytes.
    pub reason: String,
    /// Unix time in seconds of the last state change.
    pub changed: u64,
}

/// `reason` made fit for a tee record: control characters (line breaks included) become
/// spaces, surrounding blanks go, and it is cut to at most [`MAX_TEE_REASON`] bytes on a
/// character boundary.
pub fn one_line_reason(reason: &str) -> String {
    let line: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut line = line.trim().to_string();
    if line.len() > MAX_TEE_REASON {
        let mut cut = MAX_TEE_REASON;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        // The cut may fall just after a blank, which must go too (fuzz target fault_rule).
        line.truncate(line.trim_end().len());
    }
    line
}

/// Every way `tee` breaks the record's rules, one sentence each (empty when it is fine).
pub fn tee_problems(tee: &TeeRec) -> Vec<String> {
    let mut v = Vec::new();
    if tee.policy.len() > MAX_TEE_STRING {
        v.push(format!(
            "its policy is {} bytes, more than {MAX_TEE_STRING}",
            tee.policy.len()
        ));
    }
    if tee.faults.len() > MAX_TEE_FAULTS {
        v.push(format!(
            "it has {} fault rules, more than {MAX_TEE_FAULTS}",
            tee.faults.len()
        ));
    }
    for (i, f) in tee.faults.iter().enumerate() {
        if f.len() > MAX_TEE_STRING {
            v.push(format!(
                "its fault rule {i} is {} bytes, more than {MAX_TEE_STRING}",
                f.len()
            ));
        }
    }
    if tee.reason.len() > MAX_TEE_REASON {
        v.push(format!(
            "its reason is {} bytes, more than {MAX_TEE_REASON}",
            tee.reason.len()
        ));
    }
    if tee.reason.chars().any(char::is_control) {
        v.push("its reason is not one line (it holds a control character)".into());
    }
    if tee.state == TeeState::Active && !tee.reason.is_empty() {
        v.push("it is active but has a quarantine reason".into());
    }
    v
}

/// A disk's attachment record (format version 5): the daemon serves the disk on this socket
/// whenever it runs (`ctl attach` records it before the disk is served, `ctl detach` removes it
/// before the disk stops being served).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AttachRec {
    /// The vhost-user socket: an absolute path of 1 to [`MAX_ATTACH_SOCKET`] bytes, no NUL.
    pub socket: PathBuf,
    /// Virtqueues offered to the guest, 1 to [`MAX_ATTACH_QUEUES`].
    pub queues: u16,
    /// Served read-only.
    pub read_only: bool,
    /// The virtio-blk serial, at most [`MAX_ATTACH_SERIAL`] bytes of UTF-8 without control
    /// characters (empty: the disk's name, cut to 20 bytes).
    pub serial: String,
}

/// Every way `a` breaks the attachment record's rules, one sentence each (empty when fine).
pub fn attach_problems(a: &AttachRec) -> Vec<String> {
    let mut v = Vec::new();
    let path = a.socket.as_os_str().as_bytes();
    if path.is_empty() || path.len() > MAX_ATTACH_SOCKET {
        v.push(format!(
            "its socket path is {} bytes, not 1 to {MAX_ATTACH_SOCKET}",
            path.len()
        ));
    }
    if !a.socket.is_absolute() {
        v.push(format!(
            "its socket path {} is not absolute",
            a.socket.display()
        ));
    }
    if path.contains(&0) {
        v.push("its socket path holds a NUL byte".into());
    }
    if a.queues == 0 || a.queues > MAX_ATTACH_QUEUES {
        v.push(format!(
            "it asks for {} queues, not 1 to {MAX_ATTACH_QUEUES}",
            a.queues
        ));
    }
    if a.serial.len() > MAX_ATTACH_SERIAL {
        v.push(format!(
            "its serial is {} bytes, more than {MAX_ATTACH_SERIAL}",
            a.serial.len()
        ));
    }
    if a.serial.chars().any(char::is_control) {
        v.push("its serial holds a control character".into());
    }
    v
}

/// One disk of the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRec {
    pub name: String,
    pub size: u64,
    pub trusted: u64,
    /// 0 = no candidate.
    pub candidate: u64,
    /// The disk's tee, if it is served through one (format version 2; only with a candidate).
    pub tee: Option<TeeRec>,
    /// Where the daemon serves the disk, if it is attached (format version 5).
    pub attach: Option<AttachRec>,
    /// A voting Tee's members after the candidate, at most [`MAX_EXTRA_MEMBERS`] (format
    /// version 7; only with a candidate and a tee record).
    pub members: Vec<MemberRec>,
}

/// A slot's payload: the whole catalog. Versions are sorted by key and disks by name, both
/// strictly (which also makes keys and names unique).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// The key the next new version gets; keys are never reused.
    pub next_key: u64,
    /// The grant table: `owners[e]` is the key extent `e` is granted to, 0 if free.
    pub owners: Vec<u64>,
    pub versions: Vec<VersionRec>,
    pub disks: Vec<DiskRec>,
    /// The shared pool of single-instance blocks (format version 6; empty before).
    pub pool: Pool,
}

/// The shared pool (format version 6): extents granted to [`POOL_KEY`], cut into 4 KiB shared
/// blocks, each held by the versions whose committed root records reference it. A block held
/// by no version is free. Block `p` of the pool is block `p % blocks_per_extent` of extent
/// `extents[p / blocks_per_extent]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pool {
    /// Single-instance blocks are on: versions may share blocks (flags bit 0).
    pub enabled: bool,
    /// `extent_size / 4096`.
    pub blocks_per_extent: u32,
    /// The pool's extents, in the order they were added.
    pub extents: Vec<u32>,
    /// crc32c of each pool block's 4096 bytes (0 for a free block).
    pub crcs: Vec<u32>,
    /// The versions holding blocks, by ascending key.
    pub holders: Vec<Holder>,
}

/// One version's hold on pool blocks: bit `p` (byte `p / 8`, bit `p % 8`) set when it holds
/// pool block `p`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub key: u64,
    pub held: Vec<u8>,
}

impl Holder {
    pub fn holds(&self, p: u32) -> bool {
        self.held
            .get((p / 8) as usize)
            .is_some_and(|b| b & (1 << (p % 8)) != 0)
    }

    /// The pool blocks held, ascending.
    pub fn blocks(&self) -> impl Iterator<Item = u32> + '_ {
        self.held.iter().enumerate().flat_map(|(i, &b)| {
            (0..8u32)
                .filter(move |j| b & (1 << j) != 0)
                .map(move |j| i as u32 * 8 + j)
        })
    }
}

impl Pool {
    /// Nothing recorded: not enabled, no extent (what a format-5 payload decodes to).
    pub fn is_empty(&self) -> bool {
        !self.enabled && self.extents.is_empty() && self.holders.is_empty()
    }

    /// Pool blocks in all.
    pub fn blocks(&self) -> u32 {
        self.extents.len() as u32 * self.blocks_per_extent
    }

    /// Bytes of a holder's bitmap.
    pub fn bitmap_len(&self) -> usize {
        (self.blocks() as usize).div_ceil(8)
    }

    /// How many versions hold pool block `p`.
    pub fn holders_of(&self, p: u32) -> usize {
        self.holders.iter().filter(|h| h.holds(p)).count()
    }

    /// The holder record of version `key`.
    pub fn holder(&self, key: u64) -> Option<&Holder> {
        self.holders.iter().find(|h| h.key == key)
    }

    /// The pool block in extent `e` at block `index`, if `e` is a pool extent.
    pub fn block_of(&self, e: u32, index: u32) -> Option<u32> {
        if index >= self.blocks_per_extent {
            return None;
        }
        let pos = self.extents.iter().position(|&x| x == e)?;
        Some(pos as u32 * self.blocks_per_extent + index)
    }

    /// The (extent, block index) of pool block `p`.
    pub fn place(&self, p: u32) -> Option<(u32, u32)> {
        let bpe = self.blocks_per_extent.max(1);
        let e = *self.extents.get((p / bpe) as usize)?;
        Some((e, p % bpe))
    }

    fn encoded_len(&self) -> usize {
        16 + 4 * self.extents.len()
            + 4 * self.crcs.len()
            + self.holders.len() * (8 + self.bitmap_len())
    }

    /// The pool section: flags u32, blocks per extent u32, extent count u32, the extent ids
    /// (u32 each), the crc32c of every pool block (u32 each), holder count u32, each holder's
    /// key (u64) and bitmap.
    fn put(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&u32::from(self.enabled).to_le_bytes());
        b.extend_from_slice(&self.blocks_per_extent.to_le_bytes());
        b.extend_from_slice(&(self.extents.len() as u32).to_le_bytes());
        for e in &self.extents {
            b.extend_from_slice(&e.to_le_bytes());
        }
        for c in &self.crcs {
            b.extend_from_slice(&c.to_le_bytes());
        }
        b.extend_from_slice(&(self.holders.len() as u32).to_le_bytes());
        for h in &self.holders {
            b.extend_from_slice(&h.key.to_le_bytes());
            b.extend_from_slice(&h.held);
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<Pool> {
        let flags = r.u32("the pool's flags")?;
        if flags > 1 {
            return Err(StoreError::Corrupt(format!(
                "the pool's flags are {flags:#x} (only bit 0 is defined)"
            )));
        }
        let blocks_per_extent = r.u32("the pool's blocks per extent")?;
        let n = r.u32("the pool's extent count")? as usize;
        let list = r.take(4 * n, "the pool's extent list")?;
        let extents: Vec<u32> = list.chunks_exact(4).map(|c| le_u32(c, 0)).collect();
        let blocks = (n as u64)
            .checked_mul(u64::from(blocks_per_extent))
            .filter(|&b| b <= u64::from(u32::MAX))
            .ok_or_else(|| StoreError::Corrupt("the pool has too many blocks".into()))?
            as usize;
        let table = r.take(4 * blocks, "the pool's checksums")?;
        let crcs = table.chunks_exact(4).map(|c| le_u32(c, 0)).collect();
        let hn = r.u32("the pool's holder count")?;
        let mut holders = Vec::new();
        for _ in 0..hn {
            let key = r.u64("a pool holder's key")?;
            let held = r
                .take(blocks.div_ceil(8), "a pool holder's bitmap")?
                .to_vec();
            holders.push(Holder { key, held });
        }
        Ok(Pool {
            enabled: flags & 1 != 0,
            blocks_per_extent,
            extents,
            crcs,
            holders,
        })
    }

    /// Every way the pool breaks its rules against the catalog `m` and geometry `h`.
    fn problems(&self, h: &Header, m: &Meta) -> Vec<String> {
        let mut v = Vec::new();
        if self.is_empty() {
            return v;
        }
        if h.version < SHARED_VERSION {
            v.push(format!(
                "a format-version-{} store has a shared pool (version {SHARED_VERSION} only)",
                h.version
            ));
        }
        let bpe = (h.extent_size / SHARED_BLOCK) as u32;
        if self.blocks_per_extent != bpe {
            v.push(format!(
                "the pool has {} blocks per extent, but extents of {} bytes hold {bpe}",
                self.blocks_per_extent, h.extent_size
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for &e in &self.extents {
            if !seen.insert(e) {
                v.push(format!("the pool lists extent {e} twice"));
            }
            if m.owners.get(e as usize) != Some(&POOL_KEY) {
                v.push(format!(
                    "the pool lists extent {e}, which the grant table does not give to the pool"
                ));
            }
        }
        for (e, &o) in m.owners.iter().enumerate() {
            if o == POOL_KEY && !seen.contains(&(e as u32)) {
                v.push(format!(
                    "extent {e} is granted to the pool but missing from the pool's extent list"
                ));
            }
        }
        if self.crcs.len() != self.blocks() as usize {
            v.push(format!(
                "the pool has {} checksums for {} blocks",
                self.crcs.len(),
                self.blocks()
            ));
        }
        for w in self.holders.windows(2) {
            if w[0].key >= w[1].key {
                v.push(format!(
                    "pool holders are not in strictly ascending key order ({} then {})",
                    w[0].key, w[1].key
                ));
            }
        }
        if self.crcs.len() == self.blocks() as usize {
            if let Some(p) =
                (0..self.blocks()).find(|&p| self.crcs[p as usize] != 0 && self.holders_of(p) == 0)
            {
                v.push(format!(
                    "pool block {p} is held by no version but has a checksum (a free block's is 0)"
                ));
            }
        }
        let spare = self.blocks() as usize % 8;
        for hold in &self.holders {
            if m.version(hold.key).is_none() {
                v.push(format!(
                    "pool holder {} is not a version in the catalog (its blocks would never be freed)",
                    hold.key
                ));
            }
            if hold.held.len() != self.bitmap_len() {
                v.push(format!(
                    "pool holder {}'s bitmap is {} bytes, not {}",
                    hold.key,
                    hold.held.len(),
                    self.bitmap_len()
                ));
            } else if spare != 0 && hold.held.last().is_some_and(|&b| b >> spare != 0) {
                v.push(format!(
                    "pool holder {}'s bitmap has bits set past the pool's last block",
                    hold.key
                ));
            }
            if hold.held.iter().all(|&b| b == 0) {
                v.push(format!(
                    "pool holder {} holds no block (an empty record)",
                    hold.key
                ));
            }
        }
        v
    }
}

impl Meta {
    /// The catalog of a new store of `extent_count` extents.
    pub fn empty(extent_count: u32) -> Meta {
        Meta {
            next_key: 1,
            owners: vec![0; extent_count as usize],
            versions: Vec::new(),
            disks: Vec::new(),
            pool: Pool::default(),
        }
    }

    pub fn free_extents(&self) -> u32 {
        self.owners.iter().filter(|&&o| o == 0).count() as u32
    }

    pub fn version_index(&self, key: u64) -> std::result::Result<usize, usize> {
        self.versions.binary_search_by_key(&key, |v| v.key)
    }

    pub fn version(&self, key: u64) -> Option<&VersionRec> {
        self.version_index(key).ok().map(|i| &self.versions[i])
    }

    pub fn disk_index(&self, name: &str) -> std::result::Result<usize, usize> {
        self.disks.binary_search_by(|d| d.name.as_str().cmp(name))
    }

    pub fn disk(&self, name: &str) -> Option<&DiskRec> {
        self.disk_index(name).ok().map(|i| &self.disks[i])
    }

    /// The payload bytes, in the current format ([`FORMAT_VERSION`]).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_payload(FORMAT_VERSION)
    }

    /// The payload bytes in format `version` (1 to 5; 3 and 4 encode the payload as 2 does).
    /// Format 1 has no tee records and formats before 5 no attachment records: a catalog
    /// holding one cannot be written in them. The store writes the payload of its header's
    /// format version (5, or 2 for a version-2 store it keeps as it is).
    pub fn encode_for(&self, version: u32) -> Result<Vec<u8>> {
        match version {
            1 if self.disks.iter().any(|d| d.tee.is_some()) => Err(StoreError::Invalid(
                "format version 1 has no tee records".into(),
            )),
            v if v < ATTACH_VERSION && self.disks.iter().any(|d| d.attach.is_some()) => {
                Err(StoreError::Invalid(format!(
                    "format version {v} has no attachment records (a store of that version \
                     cannot record which disks the daemon serves)"
                )))
            }
            v if v < SHARED_VERSION && !self.pool.is_empty() => Err(StoreError::Invalid(format!(
                "format version {v} has no shared pool (single-instance blocks need format \
                 version {SHARED_VERSION})"
            ))),
            v if v < MEMBERS_VERSION && self.disks.iter().any(|d| !d.members.is_empty()) => {
                Err(StoreError::Invalid(format!(
                    "format version {v} records no tee members beyond the candidate (a tee of \
                     three or more members needs format version {MEMBERS_VERSION}: `dovetail \
                     store upgrade --voting`)"
                )))
            }
            1..=MEMBERS_VERSION => Ok(self.encode_payload(version)),
            v => Err(StoreError::Version {
                found: v,
                supported: MEMBERS_VERSION,
            }),
        }
    }

    fn encode_payload(&self, version: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(
            PAYLOAD_HEADER
                + 8 * self.owners.len()
                + self
                    .versions
                    .iter()
                    .map(|v| 90 + 4 * v.extents.len() + v.root.len())
                    .sum::<usize>()
                + self
                    .disks
                    .iter()
                    .map(|d| {
                        92 + d.tee.as_ref().map_or(0, tee_len)
                            + d.attach.as_ref().map_or(0, attach_len)
                            + 1
                            + MEMBER_LEN * d.members.len()
                    })
                    .sum::<usize>()
                + self.pool.encoded_len(),
        );
        b.extend_from_slice(&self.next_key.to_le_bytes());
        b.extend_from_slice(&(self.owners.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.free_extents().to_le_bytes());
        b.extend_from_slice(&(self.versions.len() as u32).to_le_bytes());
        b.extend_from_slice(&(self.disks.len() as u32).to_le_bytes());
        for o in &self.owners {
            b.extend_from_slice(&o.to_le_bytes());
        }
        for v in &self.versions {
            b.extend_from_slice(&v.key.to_le_bytes());
            put_name(&mut b, &v.disk);
            put_name(&mut b, &v.layout);
            b.extend_from_slice(&(v.extents.len() as u32).to_le_bytes());
            for e in &v.extents {
                b.extend_from_slice(&e.to_le_bytes());
            }
            b.extend_from_slice(&(v.root.len() as u32).to_le_bytes());
            b.extend_from_slice(&v.root);
        }
        for d in &self.disks {
            put_name(&mut b, &d.name);
            b.extend_from_slice(&d.size.to_le_bytes());
            b.extend_from_slice(&d.trusted.to_le_bytes());
            b.extend_from_slice(&d.candidate.to_le_bytes());
            if version >= 2 {
                match &d.tee {
                    None => b.push(0),
                    Some(t) => {
                        b.push(1);
                        put_tee(&mut b, t);
                    }
                }
            }
            if version >= ATTACH_VERSION {
                match &d.attach {
                    None => b.push(0),
                    Some(a) => {
                        b.push(1);
                        put_attach(&mut b, a);
                    }
                }
            }
            if version >= MEMBERS_VERSION {
                put_members(&mut b, &d.members);
            }
        }
        if version >= SHARED_VERSION {
            self.pool.put(&mut b);
        }
        b
    }

    /// Parses a payload of format `version` (1, 2 or 3; 2 and 3 are the same). Only the encoding is checked here
    /// (lengths, UTF-8, state bytes, nothing left over); the catalog's invariants are
    /// [`validate`]'s. Returns the catalog and the free-extent count the payload records.
    pub fn decode(b: &[u8], version: u32) -> Result<(Meta, u32)> {
        if !(MIN_FORMAT_VERSION..=MEMBERS_VERSION).contains(&version) {
            return Err(StoreError::Version {
                found: version,
                supported: MEMBERS_VERSION,
            });
        }
        let mut r = Reader { b, at: 0 };
        let next_key = r.u64("next_key")?;
        let extent_count = r.u32("extent_count")?;
        let free = r.u32("free_extents")?;
        let version_count = r.u32("version_count")?;
        let disk_count = r.u32("disk_count")?;
        let table = r.take(8 * extent_count as usize, "the extent table")?;
        let owners = table
            .chunks_exact(8)
            .map(|c| le_u64(c, 0))
            .collect::<Vec<_>>();
        let mut versions = Vec::new();
        for _ in 0..version_count {
            let key = r.u64("a version key")?;
            let disk = r.name("a version's disk name")?;
            let layout = r.name("a version's layout name")?;
            let n = r.u32("a version's extent count")?;
            let list = r.take(4 * n as usize, "a version's extent list")?;
            let extents = list.chunks_exact(4).map(|c| le_u32(c, 0)).collect();
            let root_len = r.u32("a root record length")?;
            let root = r.take(root_len as usize, "a root record")?.to_vec();
            versions.push(VersionRec {
                key,
                disk,
                layout,
                extents,
                root,
            });
        }
        let mut disks = Vec::new();
        for _ in 0..disk_count {
            let name = r.name("a disk name")?;
            let size = r.u64("a disk size")?;
            let trusted = r.u64("a disk's trusted key")?;
            let candidate = r.u64("a disk's candidate key")?;
            let tee = if version >= 2 {
                match r.u8("a disk's tee flag")? {
                    0 => None,
                    1 => Some(r.tee(&name)?),
                    f => {
                        return Err(StoreError::Corrupt(format!(
                            "disk {name:?}'s tee flag is {f} (0 = none, 1 = present)"
                        )))
                    }
                }
            } else {
                None
            };
            let attach = if version >= ATTACH_VERSION {
                match r.u8("a disk's attachment flag")? {
                    0 => None,
                    1 => Some(r.attach(&name)?),
                    f => {
                        return Err(StoreError::Corrupt(format!(
                            "disk {name:?}'s attachment flag is {f} (0 = none, 1 = present)"
                        )))
                    }
                }
            } else {
                None
            };
            let members = if version >= MEMBERS_VERSION {
                r.members(&name)?
            } else {
                Vec::new()
            };
            disks.push(DiskRec {
                name,
                size,
                trusted,
                candidate,
                tee,
                attach,
                members,
            });
        }
        let pool = if version >= SHARED_VERSION {
            Pool::get(&mut r)?
        } else {
            Pool::default()
        };
        if r.at != b.len() {
            return Err(StoreError::Corrupt(format!(
                "{} bytes left over after the payload's last record",
                b.len() - r.at
            )));
        }
        Ok((
            Meta {
                next_key,
                owners,
                versions,
                disks,
                pool,
            },
            free,
        ))
    }
}

/// Bytes of a tee record after its flag byte.
fn tee_len(t: &TeeRec) -> usize {
    1 + 8
        + 1
        + t.policy.len()
        + 1
        + t.faults.iter().map(|f| 1 + f.len()).sum::<usize>()
        + 2
        + t.reason.len()
}

/// A tee record after its flag byte: state u8, changed u64, policy (u8 length + UTF-8), fault
/// count u8, each fault (u8 length + UTF-8), reason (u16 length + UTF-8). Lengths are checked
/// (by `Store::set_tee` and [`validate`]) before a record reaches a commit.
fn put_tee(b: &mut Vec<u8>, t: &TeeRec) {
    b.push(t.state.to_byte());
    b.extend_from_slice(&t.changed.to_le_bytes());
    put_name(b, &t.policy);
    b.push(t.faults.len() as u8);
    for f in &t.faults {
        put_name(b, f);
    }
    b.extend_from_slice(&(t.reason.len() as u16).to_le_bytes());
    b.extend_from_slice(t.reason.as_bytes());
}

/// Bytes of one member record: key u64, state u8, changed u64.
const MEMBER_LEN: usize = 17;

/// A disk's member list (format version 7): count u8 (at most [`MAX_EXTRA_MEMBERS`]), then
/// each member's key u64, state u8 and change time u64. The count is checked (by
/// `Store::add_member` and [`validate`]) before a list reaches a commit.
fn put_members(b: &mut Vec<u8>, members: &[MemberRec]) {
    b.push(members.len() as u8);
    for m in members {
        b.extend_from_slice(&m.key.to_le_bytes());
        b.push(m.state.to_byte());
        b.extend_from_slice(&m.changed.to_le_bytes());
    }
}

/// Bytes of an attachment record after its flag byte.
fn attach_len(a: &AttachRec) -> usize {
    1 + 2 + 2 + a.socket.as_os_str().len() + 1 + a.serial.len()
}

/// An attachment record after its flag byte: flags u8 (bit 0: read-only), queues u16, socket
/// path (u16 length + bytes), serial (u8 length + UTF-8). Lengths are checked (by
/// `Store::set_attachment` and [`validate`]) before a record reaches a commit.
fn put_attach(b: &mut Vec<u8>, a: &AttachRec) {
    b.push(u8::from(a.read_only));
    b.extend_from_slice(&a.queues.to_le_bytes());
    let path = a.socket.as_os_str().as_bytes();
    b.extend_from_slice(&(path.len() as u16).to_le_bytes());
    b.extend_from_slice(path);
    put_name(b, &a.serial);
}

fn put_name(b: &mut Vec<u8>, s: &str) {
    // Names (at most 64 bytes), policies and fault rules (at most 255) are validated before
    // they reach the catalog.
    b.push(s.len() as u8);
    b.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        match end {
            Some(end) => {
                let s = &self.b[self.at..end];
                self.at = end;
                Ok(s)
            }
            None => Err(StoreError::Corrupt(format!(
                "payload ends at byte {} in the middle of {what}",
                self.b.len()
            ))),
        }
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(le_u32(self.take(4, what)?, 0))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(le_u64(self.take(8, what)?, 0))
    }

    fn name(&mut self, what: &str) -> Result<String> {
        let len = self.take(1, what)?[0] as usize;
        self.string(len, what)
    }

    fn string(&mut self, len: usize, what: &str) -> Result<String> {
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| StoreError::Corrupt(format!("{what} is not UTF-8")))
    }

    /// An attachment record after its flag byte (see `put_attach`).
    fn attach(&mut self, disk: &str) -> Result<AttachRec> {
        let flags = self.u8("an attachment's flags")?;
        if flags & !1 != 0 {
            return Err(StoreError::Corrupt(format!(
                "disk {disk:?}'s attachment flags are {flags:#04x} (only bit 0, read-only, is defined)"
            )));
        }
        let queues = self.u16("an attachment's queue count")?;
        let len = self.u16("an attachment's socket path length")? as usize;
        if len == 0 || len > MAX_ATTACH_SOCKET {
            return Err(StoreError::Corrupt(format!(
                "disk {disk:?}'s attachment socket path is {len} bytes, not 1 to {MAX_ATTACH_SOCKET}"
            )));
        }
        let path = self.take(len, "an attachment's socket path")?;
        let socket = PathBuf::from(OsStr::from_bytes(path));
        let serial = self.name("an attachment's serial")?;
        Ok(AttachRec {
            socket,
            queues,
            read_only: flags & 1 != 0,
            serial,
        })
    }

    /// A disk's member list (see `put_members`): a count past [`MAX_EXTRA_MEMBERS`] or an
    /// unknown state is a clear error, before anything is allocated for it.
    fn members(&mut self, disk: &str) -> Result<Vec<MemberRec>> {
        let n = self.u8("a disk's tee member count")? as usize;
        if n > MAX_EXTRA_MEMBERS {
            return Err(StoreError::Corrupt(format!(
                "disk {disk:?} lists {n} tee members after its candidate, more than \
                 {MAX_EXTRA_MEMBERS} (a tee has at most 5 members)"
            )));
        }
        (0..n)
            .map(|_| {
                let key = self.u64("a tee member's key")?;
                let byte = self.u8("a tee member's state")?;
                let state = MemberState::from_byte(byte).ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "disk {disk:?}'s tee member {key} has state {byte} (0 = voting, 1 = \
                         filling, 2 = quarantined)"
                    ))
                })?;
                let changed = self.u64("a tee member's change time")?;
                Ok(MemberRec {
                    key,
                    state,
                    changed,
                })
            })
            .collect()
    }

    /// A tee record after its flag byte (see `put_tee`).
    fn tee(&mut self, disk: &str) -> Result<TeeRec> {
        let byte = self.u8("a tee state")?;
        let state = TeeState::from_byte(byte).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "disk {disk:?}'s tee state is {byte} (0 = active, 1 = quarantined)"
            ))
        })?;
        let changed = self.u64("a tee's change time")?;
        let policy = self.name("a tee policy")?;
        let n = self.u8("a tee's fault count")? as usize;
        if n > MAX_TEE_FAULTS {
            return Err(StoreError::Corrupt(format!(
                "disk {disk:?}'s tee has {n} fault rules, more than {MAX_TEE_FAULTS}"
            )));
        }
        let faults = (0..n)
            .map(|_| self.name("a tee fault rule"))
            .collect::<Result<Vec<_>>>()?;
        let len = self.u16("a tee reason length")? as usize;
        if len > MAX_TEE_REASON {
            return Err(StoreError::Corrupt(format!(
                "disk {disk:?}'s tee reason is {len} bytes, more than {MAX_TEE_REASON}"
            )));
        }
        let reason = self.string(len, "a tee reason")?;
        Ok(TeeRec {
            policy,
            faults,
            state,
            reason,
            changed,
        })
    }
}

/// Encodes a slot of format `version`: header (generation, payload length, crc32c) and
/// payload (which must be of the same format).
pub fn encode_slot(version: u32, generation: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(SLOT_HEADER + payload.len());
    b.extend_from_slice(&generation.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&slot_crc(version, &b[..12], payload).to_le_bytes());
    b.extend_from_slice(payload);
    b
}

/// The checksum of a slot of format `version`. Version 1: crc32c over the slot's first 12
/// bytes, then the payload. Version 2 and later: crc32c over the format version (u32), then
/// the slot's first 12 bytes, then the payload, so that a slot is valid only under the format
/// that wrote it (what makes the upgrade from version 1 crash-safe).
pub fn slot_crc(version: u32, head: &[u8], payload: &[u8]) -> u32 {
    let crc = if version == 1 {
        crc32c::crc32c(head)
    } else {
        crc32c::crc32c_append(crc32c::crc32c(&version.to_le_bytes()), head)
    };
    crc32c::crc32c_append(crc, payload)
}

/// What a slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// Never written (all of its header is zero).
    Empty,
    /// Torn by a crash during a commit, or damaged.
    Invalid(String),
    Valid {
        generation: u64,
        payload: Vec<u8>,
        /// The format the slot (and its payload) was written in: the header's, or 1 for a
        /// slot written before the store was upgraded from format version 1.
        version: u32,
    },
}

/// Validates a store-level catalog against its header. Every violation found is returned, in a
/// sentence each; an empty list means the catalog is consistent.
pub fn validate(h: &Header, m: &Meta, recorded_free: u32) -> Vec<String> {
    let mut v = Vec::new();
    let count = h.extent_count as usize;
    if m.owners.len() != count {
        v.push(format!(
            "the extent table has {} entries but the store has {count} extents",
            m.owners.len()
        ));
    }
    let free = m.free_extents();
    if recorded_free != free {
        v.push(format!(
            "free-space accounting: the payload records {recorded_free} free extents but the extent table has {free}"
        ));
    }
    if m.next_key == 0 {
        v.push("the next version key is 0 (keys start at 1)".into());
    }
    for w in m.versions.windows(2) {
        if w[0].key >= w[1].key {
            v.push(format!(
                "versions are not in strictly ascending key order ({} then {}): a duplicate or misplaced version",
                w[0].key, w[1].key
            ));
        }
    }
    for w in m.disks.windows(2) {
        if w[0].name >= w[1].name {
            v.push(format!(
                "disks are not in strictly ascending name order ({:?} then {:?}): a duplicate or misplaced disk",
                w[0].name, w[1].name
            ));
        }
    }
    for ver in &m.versions {
        let k = ver.key;
        if k == 0 {
            v.push("a version has key 0, which marks free extents".into());
        }
        if k >= m.next_key {
            v.push(format!(
                "version {k} is not below the next key {} (keys would repeat)",
                m.next_key
            ));
        }
        if let Err(e) = check_layout_name(&ver.layout) {
            v.push(format!("version {k}: {e}"));
        }
        if ver.root.len() > MAX_ROOT {
            v.push(format!(
                "version {k}'s root record is {} bytes, more than {MAX_ROOT}",
                ver.root.len()
            ));
        }
        match m.disk(&ver.disk) {
            None => v.push(format!(
                "version {k} belongs to disk {:?}, which is not in the catalog (a deleted disk's version)",
                ver.disk
            )),
            Some(d) if d.trusted != k && d.candidate != k && !d.members.iter().any(|m| m.key == k) => v.push(format!(
                "version {k} of disk {:?} is neither its trusted nor its candidate version (an orphan)",
                ver.disk
            )),
            Some(_) => {}
        }
        let mut seen = std::collections::BTreeSet::new();
        for &e in &ver.extents {
            if !seen.insert(e) {
                v.push(format!("version {k} lists extent {e} twice"));
            }
            match m.owners.get(e as usize) {
                None => v.push(format!(
                    "version {k} lists extent {e}, outside the store's {count} extents"
                )),
                Some(&o) if o != k => v.push(format!(
                    "version {k} lists extent {e}, but the grant table gives that extent to {}",
                    if o == 0 {
                        "nobody (free)".to_string()
                    } else {
                        format!("key {o}")
                    }
                )),
                Some(_) => {}
            }
        }
    }
    v.extend(m.pool.problems(h, m));
    for (e, &o) in m.owners.iter().enumerate() {
        if o == 0 || o == POOL_KEY {
            continue;
        }
        match m.version(o) {
            None => v.push(format!(
                "extent {e} is granted to key {o}, which is not a version in the catalog"
            )),
            Some(ver) if !ver.extents.contains(&(e as u32)) => v.push(format!(
                "extent {e} is granted to version {o} but missing from that version's extent list"
            )),
            Some(_) => {}
        }
    }
    for d in &m.disks {
        if let Err(e) = check_disk_name(&d.name) {
            v.push(e.to_string());
        }
        if d.size == 0 || d.size % DISK_ALIGN != 0 {
            v.push(format!(
                "disk {:?} has size {}, not a positive multiple of {DISK_ALIGN}",
                d.name, d.size
            ));
        }
        if d.candidate != 0 && d.candidate == d.trusted {
            v.push(format!(
                "disk {:?}'s candidate is its trusted version {}",
                d.name, d.trusted
            ));
        }
        if let Some(tee) = &d.tee {
            if d.candidate == 0 {
                v.push(format!(
                    "disk {:?} has a tee record but no candidate version (a tee needs both versions)",
                    d.name
                ));
            }
            for p in tee_problems(tee) {
                v.push(format!("disk {:?}'s tee record: {p}", d.name));
            }
        }
        v.extend(member_problems(d));
        if let Some(a) = &d.attach {
            for p in attach_problems(a) {
                v.push(format!("disk {:?}'s attachment record: {p}", d.name));
            }
            if let Some(other) = m.disks.iter().find(|o| {
                o.name < d.name && o.attach.as_ref().is_some_and(|b| b.socket == a.socket)
            }) {
                v.push(format!(
                    "disks {:?} and {:?} are both attached on {}: a socket serves one disk",
                    other.name,
                    d.name,
                    a.socket.display()
                ));
            }
        }
        // The trusted version must always exist; a candidate only when there is one (0 = none).
        let roles = [("trusted", d.trusted), ("candidate", d.candidate)]
            .into_iter()
            .chain(d.members.iter().map(|m| ("tee member", m.key)));
        for (role, key) in roles.filter(|&(r, k)| r == "trusted" || k != 0) {
            match m.version(key) {
                None => v.push(format!(
                    "disk {:?}'s {role} version {key} is not in the catalog",
                    d.name
                )),
                Some(ver) if ver.disk != d.name => v.push(format!(
                    "disk {:?}'s {role} version {key} belongs to disk {:?}",
                    d.name, ver.disk
                )),
                Some(_) => {}
            }
        }
    }
    v
}

/// Every way disk `d`'s member list breaks the format's rules, one sentence each.
fn member_problems(d: &DiskRec) -> Vec<String> {
    let mut v = Vec::new();
    if d.members.is_empty() {
        return v;
    }
    if d.members.len() > MAX_EXTRA_MEMBERS {
        v.push(format!(
            "disk {:?} has {} tee members after its candidate, more than {MAX_EXTRA_MEMBERS}",
            d.name,
            d.members.len()
        ));
    }
    if d.candidate == 0 || d.tee.is_none() {
        v.push(format!(
            "disk {:?} has tee members but no candidate and tee record (members follow the \
             candidate)",
            d.name
        ));
    }
    for (i, m) in d.members.iter().enumerate() {
        if m.key == 0 || m.key == d.trusted || m.key == d.candidate {
            v.push(format!(
                "disk {:?}'s tee member {} is its trusted version, its candidate or key 0",
                d.name, m.key
            ));
        }
        if d.members[..i].iter().any(|o| o.key == m.key) {
            v.push(format!(
                "disk {:?} lists tee member {} twice",
                d.name, m.key
            ));
        }
    }
    v
}

/// Checks a disk name ([`crate::names`]: 1 to 64 bytes of `[A-Za-z0-9._-]`, starting with a
/// letter or digit).
pub fn check_disk_name(name: &str) -> Result<()> {
    crate::names::check_name(crate::names::NameKind::Disk, name)
        .map_err(|e| StoreError::Invalid(e.to_string()))
}

/// Checks a layout name ([`crate::names`]: 1 to 32 bytes of `[A-Za-z0-9._-]`, starting with a
/// letter or digit).
pub fn check_layout_name(name: &str) -> Result<()> {
    crate::names::check_name(crate::names::NameKind::Layout, name)
        .map_err(|e| StoreError::Invalid(e.to_string()))
}

/// The uuid in its usual text form.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Meta {
        Meta {
            next_key: 3,
            owners: vec![1, 0, 2, 1],
            versions: vec![
                VersionRec {
                    key: 1,
                    disk: "vm1".into(),
                    layout: "parallax-v1".into(),
                    extents: vec![3, 0],
                    root: b"root".to_vec(),
                },
                VersionRec {
                    key: 2,
                    disk: "vm1".into(),
                    layout: "parallax-v2".into(),
                    extents: vec![2],
                    root: Vec::new(),
                },
            ],
            disks: vec![DiskRec {
                members: Vec::new(),
                name: "vm1".into(),
                size: 1 << 30,
                trusted: 1,
                candidate: 2,
                tee: None,
                attach: None,
            }],
            pool: Pool::default(),
        }
    }

    fn tee() -> TeeRec {
        TeeRec {
            policy: "compare-all".into(),
            faults: vec!["flip:1/1000".into(), String::new()],
            state: TeeState::Quarantined,
            reason: "read of block 7 differed".into(),
            changed: 1_700_000_000,
        }
    }

    #[test]
    fn header_round_trips_and_checks_magic_version_and_crc() {
        let h = Header::new([7; 16], 1 << 20, 10);
        let b = h.encode();
        assert_eq!(b.len(), 4096);
        assert_eq!(&b[..16], b"DOVETAILSTORE\0\0\0");
        let p = Path::new("m");
        assert_eq!(Header::decode(&b, p).expect("decode"), h);
        let mut bad = b.clone();
        bad[3] ^= 1;
        assert!(matches!(
            Header::decode(&bad, p),
            Err(StoreError::NotAStore { .. })
        ));
        assert_eq!(h.version, 5);
        assert_eq!(&b[16..20], &5u32.to_le_bytes());
        let mut newer = b.clone();
        // Versions 6 (the shared pool) and 7 (tee members) are read; 8 is not.
        newer[16..20].copy_from_slice(&8u32.to_le_bytes());
        assert!(matches!(
            Header::decode(&newer, p),
            Err(StoreError::Version {
                found: 8,
                supported: 7
            })
        ));
        // A version-3 header is the same bytes but for the version and the checksum.
        let v3 = Header {
            version: 3,
            ..h.clone()
        };
        let b3 = v3.encode();
        assert_eq!(b3[20..64], b[20..64]);
        assert_eq!(b3[68..], b[68..]);
        assert_eq!(Header::decode(&b3, p).expect("decode v3"), v3);
        // Version-1 and -2 headers still decode (their checksum covers bytes 0..64 only), with
        // the one default tier, which they do not encode: nothing past byte 68.
        for version in [1, 2] {
            let old = Header {
                version,
                ..h.clone()
            };
            let ob = old.encode();
            assert!(ob[68..].iter().all(|&x| x == 0));
            assert_eq!(
                &ob[64..68],
                &crc32c::crc32c(&ob[..64]).to_le_bytes(),
                "version {version}"
            );
            assert_eq!(Header::decode(&ob, p).expect("old"), old);
        }
        let mut flipped = b;
        flipped[41] ^= 1;
        assert!(matches!(
            Header::decode(&flipped, p),
            Err(StoreError::Corrupt(_))
        ));
    }

    fn two_tiers() -> Header {
        Header::with_tiers(
            [9; 16],
            1 << 20,
            vec![
                TierRec {
                    name: "fast".into(),
                    extents: 3,
                    path: "/nvme/ds.fast".into(),
                },
                TierRec {
                    name: "slow".into(),
                    extents: 5,
                    path: "/hdd/ds.slow".into(),
                },
            ],
        )
    }

    #[test]
    fn the_tier_table_round_trips_byte_exact_under_the_checksum() {
        let h = two_tiers();
        assert_eq!(h.extent_count, 8);
        assert_eq!((h.tier_start(0), h.tier_start(1)), (0, 3));
        assert_eq!(h.tier_len(1), 5 << 20);
        let b = h.encode();
        let p = Path::new("m");
        assert_eq!(Header::decode(&b, p).expect("decode"), h);
        assert_eq!(&b[68..72], &[2, 0, 0, 0]);
        let mut want = Vec::new();
        for (name, n, path) in [("fast", 3u32, "/nvme/ds.fast"), ("slow", 5, "/hdd/ds.slow")] {
            let mut field = [0u8; 16];
            field[..name.len()].copy_from_slice(name.as_bytes());
            want.extend_from_slice(&field);
            want.extend_from_slice(&n.to_le_bytes());
            want.extend_from_slice(&(path.len() as u16).to_le_bytes());
            want.extend_from_slice(path.as_bytes());
        }
        assert_eq!(&b[72..72 + want.len()], &want[..]);
        assert!(b[72 + want.len()..].iter().all(|&x| x == 0));
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..64]), &b[68..]);
        assert_eq!(&b[64..68], &crc.to_le_bytes());

        // Every table byte is under the checksum, even the zeros after the table.
        for at in [69, 75, 90, 100, 4095] {
            let mut bad = b.clone();
            bad[at] ^= 1;
            assert!(
                matches!(Header::decode(&bad, p), Err(StoreError::Corrupt(ref s)) if s.contains("checksum")),
                "byte {at}"
            );
        }
        // A table that breaks the rules, re-checksummed, is corrupt and says why.
        let reseal = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut bad = b.clone();
            edit(&mut bad);
            let crc = crc32c::crc32c_append(crc32c::crc32c(&bad[..64]), &bad[68..]);
            bad[64..68].copy_from_slice(&crc.to_le_bytes());
            match Header::decode(&bad, p) {
                Err(StoreError::Corrupt(s)) => s,
                other => panic!("{other:?}"),
            }
        };
        let e = reseal(&|b| b[68] = 0);
        assert!(e.contains("0 tiers"), "{e}");
        let e = reseal(&|b| b[68] = 9);
        assert!(e.contains("9 tiers"), "{e}");
        let e = reseal(&|b| b[72] = b'F');
        assert!(e.contains("tier name \"Fast\" is invalid"), "{e}");
        let e = reseal(&|b| b[72 + 35..72 + 39].copy_from_slice(b"fast"));
        assert!(e.contains("tier name \"fast\" is used twice"), "{e}");
        let e = reseal(&|b| b[72 + 16] = 4);
        assert!(
            e.contains("tiers hold 9 extents but the store has 8"),
            "{e}"
        );
        let e = reseal(&|b| b[72 + 16] = 0);
        assert!(e.contains("tier fast has no extent"), "{e}");
        let e = reseal(&|b| b[4000] = 1);
        assert!(e.contains("after the last tier entry"), "{e}");
        let e = reseal(&|b| b[70] = 1);
        assert!(e.contains("reserved"), "{e}");
    }

    /// A header's slot size is bounded by the largest store's before it sizes the read of a
    /// slot: one claiming more (re-checksummed, so only the bound can refuse it) is corrupt.
    #[test]
    fn slot_size_is_bounded_by_the_largest_store() {
        assert_eq!(MAX_SLOT_SIZE, slot_size_for(MAX_EXTENTS));
        let p = Path::new("store.meta");
        let mut h = Header::new([7; 16], 1 << 20, 8);
        let reseal = |h: &Header| {
            let b = h.encode();
            Header::decode(&b, p)
        };
        h.slot_size = MAX_SLOT_SIZE;
        assert!(reseal(&h).is_ok());
        for size in [MAX_SLOT_SIZE + 4096, 1 << 30, u64::MAX - 4095] {
            h.slot_size = size;
            match reseal(&h) {
                Err(StoreError::Corrupt(e)) => {
                    assert!(e.contains(&format!("slot size {size} is invalid")), "{e}")
                }
                other => panic!("slot size {size}: {other:?}"),
            }
        }
    }

    /// A tier header round-trips byte-exact at the offsets docs/format.md gives, and every
    /// way a file can fail to be the tier's own is named.
    #[test]
    fn tier_headers_round_trip_and_name_every_mismatch() {
        let h = two_tiers();
        let want = TierHeader::expected(&h, 1);
        assert_eq!(want.first, h.tiers[0].extents);
        let b = want.encode();
        assert_eq!(b.len(), 4096);
        assert_eq!(&b[0..16], b"DOVETAILTIER\0\0\0\0");
        assert_eq!(&b[16..20], &4u32.to_le_bytes());
        assert_eq!(&b[24..40], &h.uuid);
        assert_eq!(&b[40..48], &h.extent_size.to_le_bytes());
        assert_eq!(&b[48..52], &want.first.to_le_bytes());
        assert_eq!(&b[52..56], &want.extents.to_le_bytes());
        assert_eq!(&b[56..58], &1u16.to_le_bytes());
        assert_eq!(&b[60..60 + want.name.len()], want.name.as_bytes());
        let mut crc = crc32c::crc32c(&b[..76]);
        crc = crc32c::crc32c_append(crc, &b[80..]);
        assert_eq!(&b[76..80], &crc.to_le_bytes());
        assert!(b[80..].iter().all(|&x| x == 0));
        let got = TierHeader::decode(&b).expect("decode");
        assert_eq!(got, want);
        assert_eq!(want.mismatch(&got), None);
        // The other tier's header, another store's, a damaged one, none at all.
        let other = TierHeader::expected(&h, 0);
        assert!(want
            .mismatch(&other)
            .expect("mismatch")
            .contains("not of tier"));
        let foreign = TierHeader {
            uuid: [7; 16],
            ..want.clone()
        };
        assert!(want
            .mismatch(&foreign)
            .expect("mismatch")
            .contains("belongs to another store"));
        let mut bad = b.clone();
        bad[300] = 1;
        assert!(TierHeader::decode(&bad)
            .expect_err("crc")
            .contains("damaged"));
        assert!(TierHeader::decode(&[0u8; 4096])
            .expect_err("none")
            .contains("no Dovetail tier header"));
        assert!(TierHeader::decode(b"root:x:0:0:root:/root:/bin/bash\n")
            .expect_err("short")
            .contains("no Dovetail tier header"));
    }

    #[test]
    fn tier_tables_are_checked() {
        let ok = two_tiers().tiers;
        assert!(check_tiers(&ok).is_ok());
        let mut same = ok.clone();
        same[1].path = same[0].path.clone();
        let e = check_tiers(&same).expect_err("same file");
        assert!(
            e.contains("tiers fast and slow have the same data file"),
            "{e}"
        );
        let mut long = ok.clone();
        long[0].path = PathBuf::from(format!("/{}", "x".repeat(MAX_TIER_PATH)));
        let e = check_tiers(&long).expect_err("long path");
        assert!(e.contains("481 bytes (1 to 480 allowed)"), "{e}");
        let nine: Vec<_> = (0..9)
            .map(|i| TierRec {
                name: format!("t{i}"),
                extents: 1,
                path: format!("/t{i}").into(),
            })
            .collect();
        assert!(check_tiers(&nine).is_err());
        // Eight tiers with the longest paths fit in the header.
        let eight: Vec<_> = (0..8)
            .map(|i| TierRec {
                name: format!("{i}{}", "x".repeat(MAX_TIER_NAME - 1)),
                extents: 1,
                path: format!("/{i}{}", "p".repeat(MAX_TIER_PATH - 2)).into(),
            })
            .collect();
        assert!(check_tiers(&eight).is_ok());
        let h = Header::with_tiers([1; 16], 4096, eight);
        assert_eq!(
            Header::decode(&h.encode(), Path::new("m")).expect("fits"),
            h
        );
        for bad in ["", "Fast", "a b", "a.b", &"x".repeat(17)] {
            assert!(check_tier_name(bad).is_err(), "{bad:?}");
        }
        for good in ["fast", "slow-1", "t_0", &"x".repeat(16)] {
            assert!(check_tier_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn payload_round_trips_byte_exact() {
        let m = sample();
        let b = m.encode_for(2).expect("v2");
        // Fixed part, then the extent table at byte 24.
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[8..12], &4u32.to_le_bytes());
        assert_eq!(&b[12..16], &1u32.to_le_bytes());
        assert_eq!(&b[24..32], &1u64.to_le_bytes());
        assert_eq!(
            b.last(),
            Some(&0),
            "no tee: the disk record ends with flag 0"
        );
        let (back, free) = Meta::decode(&b, 2).expect("decode");
        assert_eq!(back, m);
        assert_eq!(free, 1);
        assert!(validate(&Header::new([0; 16], 4096, 4), &back, free).is_empty());
        for cut in [0, 10, 30, b.len() - 1] {
            assert!(Meta::decode(&b[..cut], 2).is_err(), "truncated at {cut}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(Meta::decode(&longer, 2).is_err(), "trailing bytes");
        // Version 1 is the same without the tee flag.
        let v1 = m.encode_for(1).expect("v1");
        assert_eq!(&v1[..], &b[..b.len() - 1]);
        assert_eq!(Meta::decode(&v1, 1).expect("decode v1").0, m);
        assert!(Meta::decode(&v1, 2).is_err());
        assert!(Meta::decode(&b, 1).is_err());
        // Versions 3 and 4 encode the payload as version 2 does.
        assert_eq!(m.encode_for(3).expect("v3"), b);
        assert_eq!(m.encode_for(4).expect("v4"), b);
        assert_eq!(Meta::decode(&b, 3).expect("decode v3").0, m);
        assert_eq!(Meta::decode(&b, 4).expect("decode v4").0, m);
        // Version 5 adds the attachment flag after the tee record.
        let v5 = m.encode();
        assert_eq!(v5, m.encode_for(5).expect("v5"));
        assert_eq!(&v5[..], &[&b[..], &[0u8][..]].concat()[..]);
        assert_eq!(Meta::decode(&v5, 5).expect("decode v5").0, m);
        assert!(Meta::decode(&b, 5).is_err(), "a version-4 payload is short");
        // Version 6 adds the pool section after the last disk record.
        let v6 = m.encode_for(6).expect("v6");
        assert_eq!(Meta::decode(&v6, 6).expect("decode v6").0, m);
        assert!(
            Meta::decode(&v5, 6).is_err(),
            "a version-5 payload has no pool section"
        );
        // Version 7 adds each disk's member count (and members) after its attachment flag.
        let v7 = m.encode_for(7).expect("v7");
        assert_eq!(Meta::decode(&v7, 7).expect("decode v7").0, m);
        assert_eq!(v7.len(), v6.len() + m.disks.len());
        assert!(
            Meta::decode(&v6, 7).is_err(),
            "a version-6 payload has no member counts"
        );
        assert!(matches!(
            Meta::decode(&b, 8),
            Err(StoreError::Version { found: 8, .. })
        ));
    }

    fn attach() -> AttachRec {
        AttachRec {
            socket: PathBuf::from("/run/dt/vm1.sock"),
            queues: 4,
            read_only: true,
            serial: "SER1".into(),
        }
    }

    #[test]
    fn an_attachment_record_round_trips_byte_exact_and_bad_bytes_are_corrupt() {
        let mut m = sample();
        m.disks[0].attach = Some(attach());
        let b = m.encode();
        let plain = sample().encode();
        let at = plain.len() - 1;
        assert_eq!(&b[..at], &plain[..at], "all before the flag is the same");
        let mut want = vec![1u8, 1];
        want.extend_from_slice(&4u16.to_le_bytes());
        want.extend_from_slice(&16u16.to_le_bytes());
        want.extend_from_slice(b"/run/dt/vm1.sock");
        want.push(4);
        want.extend_from_slice(b"SER1");
        assert_eq!(&b[at..], &want[..]);
        assert_eq!(Meta::decode(&b, 5).expect("decode").0, m);
        assert!(validate(&Header::new([0; 16], 4096, 4), &m, 1).is_empty());
        for v in 1..=4 {
            assert!(m.encode_for(v).is_err(), "version {v} cannot hold it");
        }
        let corrupt = |edit: &dyn Fn(&mut Vec<u8>), words: &str| {
            let mut bad = b.clone();
            edit(&mut bad);
            match Meta::decode(&bad, 5) {
                Err(StoreError::Corrupt(s)) => assert!(s.contains(words), "{s}"),
                other => panic!("{words}: {other:?}"),
            }
        };
        corrupt(&|b| b[at] = 2, "attachment flag is 2");
        corrupt(&|b| b[at + 1] = 3, "attachment flags are 0x03");
        corrupt(&|b| b[at + 4] = 0, "socket path is 0 bytes");
        corrupt(&|b| b[at + 4] = 108, "socket path is 108 bytes");
        corrupt(
            &|b| b.truncate(b.len() - 2),
            "in the middle of an attachment's serial",
        );
        // Rules the decoder leaves to validate.
        let problems = |edit: &dyn Fn(&mut AttachRec)| {
            let mut m = sample();
            let mut a = attach();
            edit(&mut a);
            m.disks[0].attach = Some(a);
            validate(&Header::new([0; 16], 4096, 4), &m, 1).join("; ")
        };
        assert!(problems(&|a| a.queues = 0).contains("asks for 0 queues"));
        assert!(problems(&|a| a.queues = 65).contains("asks for 65 queues"));
        assert!(problems(&|a| a.socket = "rel.sock".into()).contains("is not absolute"));
        assert!(problems(&|a| a.serial = "x".repeat(21)).contains("serial is 21 bytes"));
        assert!(problems(&|a| a.serial = "a\nb".into()).contains("control character"));
        // Two disks on one socket.
        let mut two = sample();
        let mut d2 = two.disks[0].clone();
        d2.name = "vm2".into();
        d2.trusted = 2;
        d2.candidate = 0;
        two.disks[0].candidate = 0;
        two.versions[1].disk = "vm2".into();
        two.disks.push(d2);
        for d in &mut two.disks {
            d.attach = Some(attach());
        }
        let v = validate(&Header::new([0; 16], 4096, 4), &two, 1).join("; ");
        assert!(v.contains("are both attached on /run/dt/vm1.sock"), "{v}");
    }

    #[test]
    fn a_tee_record_round_trips_byte_exact_and_bad_bytes_are_corrupt() {
        let mut m = sample();
        m.disks[0].tee = Some(tee());
        let b = m.encode_for(4).expect("v4");
        let plain = sample().encode_for(4).expect("v4");
        let at = plain.len() - 1;
        assert_eq!(&b[..at], &plain[..at]);
        let mut want = vec![1u8, 1];
        want.extend_from_slice(&1_700_000_000u64.to_le_bytes());
        want.push(11);
        want.extend_from_slice(b"compare-all");
        want.push(2);
        want.push(11);
        want.extend_from_slice(b"flip:1/1000");
        want.push(0);
        want.extend_from_slice(&24u16.to_le_bytes());
        want.extend_from_slice(b"read of block 7 differed");
        assert_eq!(&b[at..], &want[..]);
        assert_eq!(Meta::decode(&b, 2).expect("decode").0, m);
        assert!(validate(&Header::new([0; 16], 4096, 4), &m, 1).is_empty());
        assert!(m.encode_for(1).is_err(), "version 1 cannot hold a tee");

        let corrupt = |edit: &dyn Fn(&mut Vec<u8>), words: &str| {
            let mut bad = b.clone();
            edit(&mut bad);
            match Meta::decode(&bad, 2) {
                Err(StoreError::Corrupt(s)) => assert!(s.contains(words), "{s}"),
                other => panic!("{words}: {other:?}"),
            }
        };
        corrupt(&|b| b[at] = 2, "tee flag is 2");
        corrupt(&|b| b[at + 1] = 7, "tee state is 7");
        corrupt(&|b| b[at + 11 + 11] = 17, "17 fault rules");
        let reason_len = b.len() - 24 - 2;
        corrupt(
            &|b| b[reason_len..reason_len + 2].copy_from_slice(&5000u16.to_le_bytes()),
            "5000 bytes",
        );
        corrupt(&|b| b[at + 11] = 0xff, "not UTF-8");
    }

    #[test]
    fn validate_refuses_a_tee_without_a_candidate_and_a_bad_record() {
        let h = Header::new([0; 16], 4096, 4);
        let mut m = sample();
        let mut t = tee();
        t.state = TeeState::Active;
        t.faults = vec!["x".repeat(256); 17];
        m.disks[0].tee = Some(t);
        m.disks[0].candidate = 0;
        m.owners[2] = 0;
        m.versions.pop();
        let all = validate(&h, &m, 2).join("\n");
        assert!(
            all.contains("disk \"vm1\" has a tee record but no candidate"),
            "{all}"
        );
        assert!(all.contains("17 fault rules"), "{all}");
        assert!(all.contains("fault rule 16 is 256 bytes"), "{all}");
        assert!(all.contains("active but has a quarantine reason"), "{all}");
    }

    #[test]
    fn slot_checksums_depend_on_the_format_version() {
        let payload = sample().encode();
        for g in [1u64, 7, u64::MAX] {
            let v1 = encode_slot(1, g, &payload);
            let v2 = encode_slot(2, g, &payload);
            assert_eq!(&v1[..12], &v2[..12]);
            assert_ne!(&v1[12..16], &v2[12..16], "generation {g}");
            assert_eq!(
                &v1[12..16],
                &crc32c::crc32c_append(crc32c::crc32c(&v1[..12]), &payload).to_le_bytes()
            );
        }
    }

    #[test]
    fn reasons_are_made_one_line_and_cut_on_a_character_boundary() {
        assert_eq!(one_line_reason("  a\nb\tc  "), "a b c");
        let long = "é".repeat(3000);
        let cut = one_line_reason(&long);
        assert_eq!(cut.len(), 4096);
        assert!(long.starts_with(&cut));
        let odd = format!("x{}", "é".repeat(3000));
        assert_eq!(one_line_reason(&odd).len(), 4095);
    }

    #[test]
    fn validate_names_every_broken_invariant() {
        let h = Header::new([0; 16], 4096, 4);
        let mut m = sample();
        m.owners[1] = 9;
        m.disks[0].candidate = 0;
        let v = validate(&h, &m, 1);
        let all = v.join("\n");
        assert!(all.contains("extent 1 is granted to key 9"), "{all}");
        assert!(all.contains("free-space accounting"), "{all}");
        assert!(
            all.contains("version 2 of disk \"vm1\" is neither"),
            "{all}"
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(check_disk_name("vm-1.root_disk").is_ok());
        assert!(check_disk_name("").is_err());
        assert!(check_disk_name("-x").is_err());
        assert!(check_disk_name("a/b").is_err());
        assert!(check_disk_name(&"a".repeat(65)).is_err());
        assert!(check_layout_name("parallax-v1").is_ok());
    }
}
