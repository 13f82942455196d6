//! The migration record, `maps/<key>.migration` (docs/format.md, "Migration record, version
//! 2"): that a migration of candidate `key` was started (its mode and rate), so that a
//! restarted daemon resumes it, and how far promote's verification pass got (its cursor), so
//! that a promote interrupted by a crash resumes the pass instead of starting it over.
//!
//! 64 bytes, checksummed; written as a new file (`<key>.migration.tmp`, created `O_EXCL`
//! mode 0600, `fsync`, `rename`, `fsync` of `maps/`), so a power cut leaves the old record or
//! the new one. Format version 1 (one line of JSON, no checksum) is read; the next write
//! replaces it with version 2.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use log::debug;

use crate::mapfile::{Dir, Entry};

/// Bytes 0..8 of a record.
pub const RECORD_MAGIC: &[u8; 8] = b"DVTLMREC";
/// The record format this module writes.
pub const RECORD_VERSION: u32 = 2;
/// Bytes of a record.
pub const RECORD_SIZE: usize = 64;

/// How a disk's blocks move to its candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationMode {
    /// The background job copies every absent block.
    CopyOut,
    /// Blocks move as the guest reads them (and writes them); a job copies the read ones.
    CopyOnRead,
    /// Only guest writes bring blocks over.
    UpgradeOnWrite,
}

impl MigrationMode {
    pub fn name(self) -> &'static str {
        match self {
            MigrationMode::CopyOut => "copy-out",
            MigrationMode::CopyOnRead => "copy-on-read",
            MigrationMode::UpgradeOnWrite => "upgrade-on-write",
        }
    }

    pub fn parse(name: &str) -> Option<MigrationMode> {
        [
            MigrationMode::CopyOut,
            MigrationMode::CopyOnRead,
            MigrationMode::UpgradeOnWrite,
        ]
        .into_iter()
        .find(|m| m.name() == name)
    }

    fn code(mode: Option<MigrationMode>) -> u32 {
        match mode {
            None => 0,
            Some(MigrationMode::CopyOut) => 1,
            Some(MigrationMode::CopyOnRead) => 2,
            Some(MigrationMode::UpgradeOnWrite) => 3,
        }
    }

    fn from_code(c: u32) -> Option<Option<MigrationMode>> {
        Some(match c {
            0 => None,
            1 => Some(MigrationMode::CopyOut),
            2 => Some(MigrationMode::CopyOnRead),
            3 => Some(MigrationMode::UpgradeOnWrite),
            _ => return None,
        })
    }
}

/// What a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationRecord {
    /// The candidate's version key.
    pub key: u64,
    /// The migration started (`None`: only a verification pass was recorded).
    pub mode: Option<MigrationMode>,
    /// The copy-out's limit in data bytes per second, 0 for none.
    pub rate: u64,
    /// Blocks of the disk (0 in a version 1 record: unknown).
    pub blocks: u64,
    /// Blocks `0..verified` were found equal in both versions by promote's verification pass.
    pub verified: u64,
}

/// Errors of a migration record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{op} {} failed", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Not a valid record (bad magic, checksum, length, field).
    #[error("migration record {} is corrupt: {why}", path.display())]
    Corrupt { path: PathBuf, why: String },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RecordError {
    let path = path.to_path_buf();
    move |source| RecordError::Io { op, path, source }
}

/// A record [`MigrationRecord::load`] read.
#[derive(Debug)]
pub struct Loaded {
    pub record: MigrationRecord,
    /// `Some` if the record was of an earlier format version: `Ok(version)` once rewritten in
    /// the current one, or why it could not be.
    pub upgraded: Option<Result<u32, RecordError>>,
}

/// The record's name in `maps/` for candidate `key`.
pub fn record_name(key: u64) -> String {
    format!("{key}.migration")
}

impl MigrationRecord {
    /// The 64 bytes of the record.
    pub fn encode(&self) -> [u8; RECORD_SIZE] {
        let mut b = [0u8; RECORD_SIZE];
        b[0..8].copy_from_slice(RECORD_MAGIC);
        b[8..12].copy_from_slice(&RECORD_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&MigrationMode::code(self.mode).to_le_bytes());
        b[16..24].copy_from_slice(&self.key.to_le_bytes());
        b[24..32].copy_from_slice(&self.rate.to_le_bytes());
        b[32..40].copy_from_slice(&self.blocks.to_le_bytes());
        b[40..48].copy_from_slice(&self.verified.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a record's bytes (either version) read from `path`, expected for candidate
    /// `key`. Returns the record and the format version it had.
    pub fn decode(
        bytes: &[u8],
        path: &Path,
        key: u64,
    ) -> Result<(MigrationRecord, u32), RecordError> {
        let corrupt = |why: String| RecordError::Corrupt {
            path: path.to_path_buf(),
            why,
        };
        if bytes.first() == Some(&b'{') {
            return MigrationRecord::decode_v1(bytes, key)
                .map_err(corrupt)
                .map(|r| (r, 1));
        }
        if bytes.len() != RECORD_SIZE {
            return Err(corrupt(format!(
                "{} bytes, but a record is {RECORD_SIZE}",
                bytes.len()
            )));
        }
        if &bytes[0..8] != RECORD_MAGIC {
            return Err(corrupt("bad magic (expected \"DVTLMREC\")".into()));
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let version = u32_at(8);
        if version != RECORD_VERSION {
            return Err(corrupt(format!(
                "format version {version}; this binary reads versions 1 and {RECORD_VERSION}"
            )));
        }
        let (stored, crc) = (u32_at(60), crc32c::crc32c(&bytes[..60]));
        if stored != crc {
            return Err(corrupt(format!(
                "checksum mismatch (stored {stored:#010x}, computed {crc:#010x})"
            )));
        }
        if bytes[48..60].iter().any(|&b| b != 0) {
            return Err(corrupt("reserved bytes are not zero".into()));
        }
        let mode = MigrationMode::from_code(u32_at(12))
            .ok_or_else(|| corrupt(format!("unknown mode {}", u32_at(12))))?;
        let r = MigrationRecord {
            key: u64_at(16),
            mode,
            rate: u64_at(24),
            blocks: u64_at(32),
            verified: u64_at(40),
        };
        if r.key != key {
            return Err(corrupt(format!(
                "it belongs to version {}, not version {key}",
                r.key
            )));
        }
        if r.verified > r.blocks {
            return Err(corrupt(format!(
                "{} blocks verified of {}",
                r.verified, r.blocks
            )));
        }
        Ok((r, RECORD_VERSION))
    }

    /// Version 1: `{"version":1,"mode":"copy-out","rate":67108864}`.
    fn decode_v1(bytes: &[u8], key: u64) -> Result<MigrationRecord, String> {
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("version 1 (JSON): {e}"))?;
        if v.get("version").and_then(|v| v.as_u64()) != Some(1) {
            return Err(format!("version 1 (JSON) without \"version\":1: {v}"));
        }
        let mode = v
            .get("mode")
            .and_then(|m| m.as_str())
            .and_then(MigrationMode::parse)
            .ok_or_else(|| format!("version 1 (JSON): mode {:?}", v.get("mode")))?;
        let rate = v
            .get("rate")
            .and_then(|r| r.as_u64())
            .ok_or_else(|| format!("version 1 (JSON): rate {:?}", v.get("rate")))?;
        Ok(MigrationRecord {
            key,
            mode: Some(mode),
            rate,
            blocks: 0,
            verified: 0,
        })
    }

    /// A record for candidate `key` of `blocks` blocks with nothing recorded yet.
    pub fn new(key: u64, blocks: u64) -> MigrationRecord {
        MigrationRecord {
            key,
            mode: None,
            rate: 0,
            blocks,
            verified: 0,
        }
    }

    /// The record to keep on with for candidate `key` of `blocks` blocks: `found` if it is for
    /// that many blocks, else a new one (a record of another size is not this candidate's).
    pub fn for_candidate(found: Option<MigrationRecord>, key: u64, blocks: u64) -> MigrationRecord {
        found
            .filter(|r| r.blocks == blocks)
            .unwrap_or_else(|| MigrationRecord::new(key, blocks))
    }

    /// Where a verification pass over `blocks` blocks resumes: the cursor `found` checkpointed
    /// for a candidate of that size, else the start.
    pub fn verify_from(found: Option<&MigrationRecord>, blocks: u64) -> u64 {
        found
            .filter(|r| r.blocks == blocks)
            .map_or(0, |r| r.verified)
    }

    /// Reads the record of candidate `key` like [`MigrationRecord::read`] and rewrites a record
    /// of an earlier format version in the current one (what that rewrite did is in the
    /// [`Loaded`] for the caller to report: the record read is good either way).
    pub fn load(dir: &Path, key: u64) -> Result<Option<Loaded>, RecordError> {
        let Some((record, version)) = MigrationRecord::read(dir, key)? else {
            return Ok(None);
        };
        let upgraded = (version != RECORD_VERSION).then(|| record.write(dir).map(|()| version));
        Ok(Some(Loaded { record, upgraded }))
    }

    /// Reads the record of candidate `key` in the `maps/` directory `dir`: `Ok(None)` if there
    /// is none. Also returns the format version found (1: rewrite it). Never follows a symlink.
    pub fn read(dir: &Path, key: u64) -> Result<Option<(MigrationRecord, u32)>, RecordError> {
        let name = record_name(key);
        let path = dir.join(&name);
        let d = match Dir::open(dir, key) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("opening", dir)(e)),
        };
        let f = match d.open_file(&name, false) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("opening", &path)(e)),
        };
        let len = f.size().map_err(io_err("reading", &path))?;
        if len > 4096 {
            return Err(RecordError::Corrupt {
                path,
                why: format!("{len} bytes"),
            });
        }
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, 0)
            .map_err(io_err("reading", &path))?;
        MigrationRecord::decode(&buf, &path, key).map(Some)
    }

    /// Replaces the record of `self.key` in the `maps/` directory `dir`, durably. A symlink (or
    /// anything but a regular file) at `<key>.migration.tmp` is refused, never followed.
    pub fn write(&self, dir: &Path) -> Result<(), RecordError> {
        let name = record_name(self.key);
        let tmp = format!("{name}.tmp");
        let tmp_path = dir.join(&tmp);
        let d = match Dir::open(dir, self.key).map_err(io_err("opening", dir))? {
            Dir::Files(d) => d,
            Dir::Rados(r) => {
                // One write_full: the old record or the new one, never a part.
                r.replace(&name, &self.encode())
                    .map_err(io_err("writing", &dir.join(&name)))?;
                debug!(
                    "wrote migration record {}: {self:?}",
                    dir.join(&name).display()
                );
                return Ok(());
            }
        };
        d.remove_stale(&tmp)
            .map_err(io_err("removing the stale", &tmp_path))?;
        let written = (|| {
            let f = d.create_file(&tmp).map_err(io_err("creating", &tmp_path))?;
            f.write_all_at(&self.encode(), 0)
                .and_then(|()| f.sync_all())
                .map_err(io_err("writing", &tmp_path))?;
            d.rename(&tmp, &name)
                .map_err(io_err("renaming", &dir.join(&name)))
        })();
        if written.is_err() {
            let _ = d.remove(&tmp);
        }
        written?;
        d.sync().map_err(io_err("syncing", dir))?;
        debug!(
            "wrote migration record {}: {self:?}",
            dir.join(&name).display()
        );
        Ok(())
    }

    /// Removes the record of candidate `key` (no error if there is none), durably.
    pub fn remove(dir: &Path, key: u64) -> Result<(), RecordError> {
        let name = record_name(key);
        let d = match Dir::open(dir, key) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("opening", dir)(e)),
        };
        match d
            .entry(&name)
            .map_err(io_err("looking up", &dir.join(&name)))?
        {
            Entry::Missing => Ok(()),
            _ => {
                d.remove(&name)
                    .map_err(io_err("removing", &dir.join(&name)))?;
                d.sync().map_err(io_err("syncing", dir))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_kept_only_for_a_candidate_of_its_size() {
        let t = tempfile::tempdir().expect("test step");
        assert!(MigrationRecord::load(t.path(), 9).expect("none").is_none());
        let mut r = MigrationRecord::new(9, 100);
        r.verified = 40;
        r.write(t.path()).expect("write");
        let loaded = MigrationRecord::load(t.path(), 9)
            .expect("load")
            .expect("a record");
        assert!(
            loaded.upgraded.is_none(),
            "a current record is not rewritten"
        );
        assert_eq!(loaded.record, r);
        assert_eq!(MigrationRecord::verify_from(Some(&r), 100), 40);
        assert_eq!(MigrationRecord::verify_from(Some(&r), 101), 0);
        assert_eq!(MigrationRecord::verify_from(None, 100), 0);
        assert_eq!(MigrationRecord::for_candidate(Some(r), 9, 100), r);
        assert_eq!(
            MigrationRecord::for_candidate(Some(r), 9, 101),
            MigrationRecord::new(9, 101)
        );
    }

    #[test]
    fn records_round_trip_and_refuse_damage() {
        let t = tempfile::tempdir().expect("test step");
        let r = MigrationRecord {
            key: 5,
            mode: Some(MigrationMode::CopyOnRead),
            rate: 131072,
            blocks: 4096,
            verified: 100,
        };
        r.write(t.path()).expect("test step");
        assert_eq!(
            MigrationRecord::read(t.path(), 5).expect("test step"),
            Some((r, 2))
        );
        assert_eq!(MigrationRecord::read(t.path(), 6).expect("test step"), None);
        let path = t.path().join("5.migration");
        let mut b = std::fs::read(&path).expect("test step");
        b[24] ^= 1;
        std::fs::write(&path, &b).expect("test step");
        let e = MigrationRecord::read(t.path(), 5)
            .expect_err("must fail")
            .to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        MigrationRecord::remove(t.path(), 5).expect("test step");
        MigrationRecord::remove(t.path(), 5).expect("test step");
        assert!(!path.exists());
    }

    #[test]
    fn version_1_records_are_read() {
        let t = tempfile::tempdir().expect("test step");
        std::fs::write(
            t.path().join("3.migration"),
            "{\"version\":1,\"mode\":\"copy-out\",\"rate\":65536}\n",
        )
        .expect("test step");
        let (r, v) = MigrationRecord::read(t.path(), 3)
            .expect("test step")
            .expect("test step");
        assert_eq!(v, 1);
        assert_eq!(
            r,
            MigrationRecord {
                key: 3,
                mode: Some(MigrationMode::CopyOut),
                rate: 65536,
                blocks: 0,
                verified: 0
            }
        );
        r.write(t.path()).expect("test step");
        assert_eq!(
            MigrationRecord::read(t.path(), 3)
                .expect("test step")
                .expect("test step")
                .1,
            2
        );
    }

    #[test]
    fn a_symlink_at_the_temporary_name_is_refused_and_its_target_kept() {
        let t = tempfile::tempdir().expect("test step");
        let target = t.path().join("target");
        std::fs::write(&target, b"keep").expect("test step");
        let maps = t.path().join("maps");
        std::fs::create_dir(&maps).expect("test step");
        std::os::unix::fs::symlink(&target, maps.join("4.migration.tmp")).expect("test step");
        let r = MigrationRecord {
            key: 4,
            mode: Some(MigrationMode::CopyOut),
            rate: 0,
            blocks: 1,
            verified: 0,
        };
        let e = dovetail_layout::error_chain(&r.write(&maps).expect_err("must fail"));
        assert!(e.contains("not a regular file"), "{e}");
        assert_eq!(std::fs::read(&target).expect("test step"), b"keep");
        std::fs::remove_file(maps.join("4.migration.tmp")).expect("test step");
        std::os::unix::fs::symlink(&target, maps.join("4.migration")).expect("test step");
        let e =
            dovetail_layout::error_chain(&MigrationRecord::read(&maps, 4).expect_err("must fail"));
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read(&target).expect("test step"), b"keep");
    }
}
