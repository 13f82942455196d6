//! A store on Ceph RADOS, beside the file store: `rados:POOL/NAME` names the store `NAME` in
//! the pool `POOL` of the cluster the process connects to ([`set_connection`]: the
//! `--ceph-conf FILE` and `--ceph-id ID` options; else `$CEPH_CONF`, else
//! `/etc/ceph/ceph.conf`). Such a name is accepted wherever a store directory is
//! ([`crate::Store::open`], [`crate::Store::create`], ...).
//!
//! The objects (docs/format.md, *A store on RADOS*):
//! - `NAME.meta`: no data; its omap holds the store: `rados_format` (this mapping's version),
//!   `object_size`, `header` (the file store's 4096-byte header, [`crate::format::Header`]),
//!   `generation`, `catalog` (the metadata payload a file store keeps in a slot: grants,
//!   disks, versions, root records, tee and attachment records) and `catalog_crc`. A commit is
//!   one compound operation on it: the store lock asserted, `generation` compared with the one
//!   the catalog was built on, then the new generation, catalog and checksum set; all of it or
//!   nothing is applied, so there are no A/B slots.
//! - `NAME.data.T.INDEX` (`T` the tier, `INDEX` 16 hex digits): the tier's data space cut into
//!   objects of `object_size` bytes (4 MiB, or the extent size when extents are smaller), so an
//!   extent is a whole number of objects and giving it back removes them. An object never
//!   written reads as zeros; a write is durable when the cluster acknowledges it.
//! - `NAME.maps.FILE`: a teed disk's candidate's presence map (`KEY.map`) and migration record
//!   (`KEY.migration`), the bytes of the file `maps/FILE` of a file store, each changed by one
//!   operation ([`RadosDir`]).
//!
//! One read-write process at a time holds a store: an exclusive `cls_lock` (`dovetail-store`)
//! on `NAME.meta`, asserted by every metadata commit in the same operation, so a process whose
//! lock was broken (after it was fenced: its address blocklisted) can change nothing.

mod meta;
mod objects;
mod records;

pub(crate) use meta::RadosMeta;
pub use meta::LOCK_NAME;
pub use objects::ObjectFile;
pub(crate) use records::{register as register_records, RadosRecords};
pub use records::{RadosDir, MAPS, MAX_RECORD_WRITE, MAX_TEED_DISK};

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use dovetail_rados::{Cluster, ConnectOptions};

use crate::space::{Result, StoreError};

/// Fences whoever holds the store at `path` (`rados:POOL/NAME`) and breaks its lock
/// (`dovetail store takeover`): its client address is blocklisted for good, then the lock is
/// broken. Returns the addresses fenced.
pub fn fence_holder(path: &Path) -> Result<Vec<String>> {
    let Some(url) = RadosUrl::of(path) else {
        return Err(StoreError::Invalid(format!(
            "{} is a store directory: a file store's holder is a process on this host, stop it \
             instead (only a store on RADOS, rados:POOL/NAME, is taken over)",
            path.display()
        )));
    };
    let url = url?;
    let rm = RadosMeta::connect(&url)?;
    rm.load()?;
    rm.fence_holder(None)
}

/// What names a store on RADOS: `rados:POOL/NAME`.
pub const SCHEME: &str = "rados:";
/// Bytes per data object when extents are at least this large (extents then must be a
/// multiple of it).
pub const OBJECT_SIZE: u64 = 4 << 20;
/// The version of the object mapping (`rados_format` in `NAME.meta`'s omap).
pub const RADOS_FORMAT: u32 = 1;

/// A store's place in a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RadosUrl {
    pub pool: String,
    pub name: String,
}

impl RadosUrl {
    /// The store `path` names, if it is a `rados:` name: `None` for a directory, an error for a
    /// malformed `rados:` name.
    pub fn of(path: &Path) -> Option<Result<RadosUrl>> {
        let s = path.to_str()?;
        let rest = s.strip_prefix(SCHEME)?;
        Some(RadosUrl::parse(rest))
    }

    fn parse(rest: &str) -> Result<RadosUrl> {
        let bad = |why: &str| {
            Err(StoreError::Invalid(format!(
                "{SCHEME}{} is not a store on RADOS: {why} (the form is {SCHEME}POOL/NAME)",
                crate::names::shown(rest)
            )))
        };
        let Some((pool, name)) = rest.split_once('/') else {
            return bad("no '/' between the pool and the store's name");
        };
        if check_pool(pool).is_err() {
            return bad("a pool name is 1 to 128 of [A-Za-z0-9_.-]");
        }
        let ok_name = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c);
        if name.is_empty() || name.len() > 64 || !name.chars().all(ok_name) {
            return bad("a store's name is 1 to 64 of [a-z0-9_-]");
        }
        Ok(RadosUrl {
            pool: pool.to_string(),
            name: name.to_string(),
        })
    }

    /// The pool holding the data objects of tier `rec`: the store's own pool for a tier
    /// recorded by a plain name (`data.0`: a store created with one tier), or `POOL` for a
    /// tier recorded as `rados:POOL` (`store create rados:P/N --tier NAME=rados:POOL:SIZE`):
    /// a tier of its own is a pool of its own.
    pub fn tier_pool(&self, recorded: &Path) -> Result<String> {
        let Some(s) = recorded.to_str() else {
            return Err(StoreError::Corrupt(format!(
                "a tier of {self} is recorded as a path that is not UTF-8"
            )));
        };
        match s.strip_prefix(SCHEME) {
            None => Ok(self.pool.clone()),
            Some(pool) => check_pool(pool).map(|()| pool.to_string()),
        }
    }

    /// The object holding the store's metadata.
    pub fn meta_oid(&self) -> String {
        format!("{}.meta", self.name)
    }

    /// The prefix of tier `t`'s data objects.
    pub fn data_prefix(&self, t: usize) -> String {
        format!("{}.data.{t}.", self.name)
    }

    /// `rados:POOL/NAME`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(self.to_string())
    }
}

impl std::fmt::Display for RadosUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.pool, self.name)
    }
}

/// A pool's name: 1 to 128 of `[A-Za-z0-9_.-]`.
pub fn check_pool(pool: &str) -> Result<()> {
    let ok_pool = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
    if pool.is_empty() || pool.len() > 128 || !pool.chars().all(ok_pool) {
        return Err(StoreError::Invalid(format!(
            "{} is not a pool name: 1 to 128 of [A-Za-z0-9_.-]",
            crate::names::shown(pool)
        )));
    }
    Ok(())
}

/// How this process connects to its cluster.
#[derive(Debug, Clone, Default)]
struct Settings {
    conf: Option<PathBuf>,
    id: Option<String>,
}

static SETTINGS: Mutex<Settings> = Mutex::new(Settings {
    conf: None,
    id: None,
});

/// Sets the configuration file and client id every later connection of this process uses
/// (`--ceph-conf`, `--ceph-id`); `None` keeps the default.
pub fn set_connection(conf: Option<PathBuf>, id: Option<String>) {
    let mut s = SETTINGS.lock().unwrap_or_else(|p| p.into_inner());
    if conf.is_some() {
        s.conf = conf;
    }
    if id.is_some() {
        s.id = id;
    }
}

/// Connects to the cluster as [`set_connection`] said.
pub(crate) fn connect() -> Result<Cluster> {
    let s = SETTINGS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let conf = s.conf.or_else(|| {
        std::env::var_os("CEPH_CONF")
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from("/etc/ceph/ceph.conf")).filter(|p| p.exists()))
    });
    let opts = ConnectOptions {
        conf: conf.clone(),
        id: s.id,
        mount_timeout: Some(Duration::from_secs(30)),
        op_timeout: Some(Duration::from_secs(60)),
        settings: Vec::new(),
    };
    Cluster::connect(&opts).map_err(|e| {
        rados_err(
            format!(
                "connecting to the Ceph cluster ({})",
                conf.map_or("no configuration file: give --ceph-conf".into(), |c| c
                    .display()
                    .to_string())
            ),
            e,
        )
    })
}

/// A librados failure as a store error, `op` saying what was being done.
pub(crate) fn rados_err(op: impl Into<String>, e: dovetail_rados::Error) -> StoreError {
    StoreError::Io {
        op: op.into(),
        source: io_error(&e),
    }
}

/// A librados failure as an I/O error (the errno's kind, librados' message).
pub(crate) fn io_error(e: &dovetail_rados::Error) -> std::io::Error {
    let kind = match e.errno() {
        0 => std::io::ErrorKind::InvalidInput,
        n => std::io::Error::from_raw_os_error(n).kind(),
    };
    std::io::Error::new(kind, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_are_refused() {
        let u = RadosUrl::of(Path::new("rados:rbd/vm-store_1"))
            .expect("a rados: name")
            .expect("valid");
        assert_eq!((u.pool.as_str(), u.name.as_str()), ("rbd", "vm-store_1"));
        assert_eq!(u.to_string(), "rados:rbd/vm-store_1");
        assert_eq!(u.meta_oid(), "vm-store_1.meta");
        assert_eq!(u.data_prefix(2), "vm-store_1.data.2.");
        assert!(RadosUrl::of(Path::new("/var/lib/store")).is_none());
        for bad in [
            "rados:",
            "rados:pool",
            "rados:/name",
            "rados:pool/",
            "rados:pool/a/b",
            "rados:pool/UPPER",
            "rados:po ol/x",
        ] {
            let e = RadosUrl::of(Path::new(bad))
                .expect("a rados: name")
                .expect_err("refused");
            assert!(e.to_string().contains("POOL/NAME"), "{bad}: {e}");
        }
    }
}
