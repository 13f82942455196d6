//! The small per-disk records of a store on RADOS (a candidate's presence map, its migration
//! record): what a file store keeps as files of `maps/`, kept here as objects beside the
//! store's, `NAME.maps.FILE` (`FILE` the file's name in `maps/`, e.g. `NAME.maps.7.map` and
//! `NAME.maps.7.migration`), with the same bytes as the file (docs/format.md, *A store on Ceph
//! RADOS*, "Records").
//!
//! A store on RADOS names its `maps/` directory `rados:POOL/NAME/maps` ([`crate::Store::map_path`]),
//! and [`RadosDir::of_dir`] answers for such a name, so the migrate crate opens a record by the
//! path the store hands out whether the store is a directory or RADOS. Each record is changed
//! by one operation on its object, which RADOS applies whole or not at all: a new record is
//! created complete (`create` exclusive + `write_full` in one compound operation, so no
//! temporary name is needed), replaced by one `write_full`, and written in place (a presence
//! map's pages, its header sector) by one compound operation asserting the object exists, so a
//! crash leaves the old bytes or the new ones. A write is durable when the cluster acknowledges
//! it: nothing to sync.
//!
//! The records go through the client of the store handle that handed out their path (the
//! handle registers itself per version key in [`crate::Store::map_path`]), so a daemon that was
//! fenced (its client blocklisted) cannot change them either; else through the latest store
//! handle opened on the store in this process (each registers itself when it connects: a
//! reader for `store check`); with none, a client is connected for the purpose.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use dovetail_rados::{Pool, WriteOp};

use super::{io_error, RadosUrl, SCHEME};

/// The last component of a store's records "directory" name: `rados:POOL/NAME/maps`.
pub const MAPS: &str = "maps";
/// The most bytes a record object is written with at once (a whole presence map at its
/// creation, grow or upgrade): under the OSDs' default `osd_max_write_size` (90 MiB). A
/// presence map of a disk of [`MAX_TEED_DISK`] is 67 244 032 bytes.
pub const MAX_RECORD_WRITE: usize = 80 << 20;
/// The largest disk that may have a candidate on a store on RADOS (2 TiB): its presence map
/// (a 4096-byte header and a 4096-byte page per 32 704 blocks) fits in [`MAX_RECORD_WRITE`].
pub const MAX_TEED_DISK: u64 = 2 << 40;

/// The records of one store, through one client.
#[derive(Debug)]
pub struct RadosRecords {
    url: RadosUrl,
    pool: Arc<Pool>,
}

impl RadosRecords {
    pub(crate) fn new(url: RadosUrl, pool: Arc<Pool>) -> Arc<RadosRecords> {
        Arc::new(RadosRecords { url, pool })
    }

    /// The object holding record `file`.
    fn oid(&self, file: &str) -> io::Result<String> {
        record_oid(&self.url.name, file)
    }
}

/// The object of store `store`'s record `file`: `STORE.maps.FILE`, for a `file` of 1 to 128 of
/// `[A-Za-z0-9._-]` not starting with `.` (so never `.`, `..` or a path).
fn record_oid(store: &str, file: &str) -> io::Result<String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    if file.is_empty() || file.len() > 128 || !file.chars().all(ok) || file.starts_with('.') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not a record name (1 to 128 of [A-Za-z0-9._-], not starting with '.')",
                crate::names::shown(file)
            ),
        ));
    }
    Ok(format!("{store}.maps.{file}"))
}

struct Registered {
    url: String,
    key: Option<u64>,
    records: Weak<RadosRecords>,
}

/// Store handles open in this process, by URL and (when a handle handed out a version's map
/// path) version key.
static REGISTRY: Mutex<Vec<Registered>> = Mutex::new(Vec::new());

/// Records that `records` serves version `key`'s records of its store (the latest handle to ask
/// wins; dead handles are dropped).
pub(crate) fn register(records: &Arc<RadosRecords>, key: Option<u64>) {
    let url = records.url.to_string();
    let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    reg.retain(|r| r.records.strong_count() > 0 && !(r.url == url && r.key == key));
    reg.push(Registered {
        url,
        key,
        records: Arc::downgrade(records),
    });
}

/// The records of the store `url` for version `key`: the handle registered for that key, else
/// the latest registered for the store, else a new connection.
fn resolve(url: &RadosUrl, key: Option<u64>) -> io::Result<Arc<RadosRecords>> {
    let s = url.to_string();
    {
        let reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        let live = |want: &dyn Fn(&Registered) -> bool| {
            reg.iter()
                .rev()
                .filter(|r| r.url == s && want(r))
                .find_map(|r| r.records.upgrade())
        };
        if let Some(r) = key.and_then(|k| live(&|r| r.key == Some(k))) {
            return Ok(r);
        }
        if let Some(r) = live(&|_| true) {
            return Ok(r);
        }
    }
    let cluster = super::connect().map_err(|e| io::Error::other(e.to_string()))?;
    let pool = cluster.pool(&url.pool).map_err(|e| io_error(&e))?;
    Ok(RadosRecords::new(url.clone(), Arc::new(pool)))
}

/// The `maps/` of a store on RADOS, open: its records are objects (module docs).
#[derive(Debug, Clone)]
pub struct RadosDir {
    path: PathBuf,
    records: Arc<RadosRecords>,
}

fn rados_io(e: dovetail_rados::Error) -> io::Error {
    io_error(&e)
}

impl RadosDir {
    /// For `rados:POOL/NAME/maps` (what [`crate::Store::map_path`]'s parent is on a store on
    /// RADOS): that store's records, through the handle serving version `key` if one is open
    /// in this process. `None` for any path not starting with `rados:` (a directory); an error
    /// for a malformed one.
    pub fn of_dir(path: &Path, key: Option<u64>) -> Option<io::Result<RadosDir>> {
        let s = path.to_str()?;
        let rest = s.strip_prefix(SCHEME)?;
        Some((|| {
            let store = rest
                .strip_suffix(MAPS)
                .and_then(|r| r.strip_suffix('/'))
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "{s} is not the records of a store on RADOS ({SCHEME}POOL/NAME/{MAPS})"
                        ),
                    )
                })?;
            let url = RadosUrl::parse(store)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            Ok(RadosDir {
                path: path.to_path_buf(),
                records: resolve(&url, key)?,
            })
        })())
    }

    /// The records of a store handle this process holds (its own client).
    pub(crate) fn of_records(records: Arc<RadosRecords>) -> RadosDir {
        RadosDir {
            path: records.url.path().join(MAPS),
            records,
        }
    }

    /// `rados:POOL/NAME/maps`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pool and object holding record `file`, for messages.
    pub fn object(&self, file: &str) -> String {
        match self.records.oid(file) {
            Ok(o) => format!("{}/{o}", self.records.pool.name()),
            Err(_) => format!("{}/(bad name {file:?})", self.records.pool.name()),
        }
    }

    /// Record `file`'s size in bytes, `None` when there is none.
    pub fn stat(&self, file: &str) -> io::Result<Option<u64>> {
        let oid = self.records.oid(file)?;
        self.records.pool.stat(&oid).map_err(rados_io)
    }

    /// Reads exactly `buf.len()` bytes of record `file` at `off` (UnexpectedEof past its end,
    /// NotFound when there is no such record).
    pub fn read_exact_at(&self, file: &str, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let oid = self.records.oid(file)?;
        let mut done = 0;
        while done < buf.len() {
            let n = self
                .records
                .pool
                .read(&oid, off + done as u64, &mut buf[done..])
                .map_err(rados_io)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{} ends before byte {}",
                        self.object(file),
                        off + buf.len() as u64
                    ),
                ));
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `off` of the existing record `file`, in one operation (all of it or
    /// none; NotFound, and nothing written, if the record is gone).
    pub fn write_at(&self, file: &str, off: u64, data: &[u8]) -> io::Result<()> {
        let oid = self.records.oid(file)?;
        check_len(data)?;
        let op = WriteOp::new().assert_exists().write(off, data);
        self.records.pool.operate(&oid, op).map_err(rados_io)?;
        Ok(())
    }

    /// Creates record `file` holding `data`, complete, in one operation; AlreadyExists (and
    /// nothing written) if there is one.
    pub fn create(&self, file: &str, data: &[u8]) -> io::Result<()> {
        let oid = self.records.oid(file)?;
        check_len(data)?;
        let op = WriteOp::new().create(true).write_full(data);
        self.records.pool.operate(&oid, op).map_err(rados_io)?;
        Ok(())
    }

    /// Replaces (or creates) record `file` with `data`, in one operation.
    pub fn replace(&self, file: &str, data: &[u8]) -> io::Result<()> {
        let oid = self.records.oid(file)?;
        check_len(data)?;
        let op = WriteOp::new().write_full(data);
        self.records.pool.operate(&oid, op).map_err(rados_io)?;
        Ok(())
    }

    /// Removes record `file`; `false` when there was none.
    pub fn remove(&self, file: &str) -> io::Result<bool> {
        let oid = self.records.oid(file)?;
        self.records.pool.remove(&oid).map_err(rados_io)
    }

    /// The names of every record of the store (their objects listed by prefix), sorted.
    pub fn list(&self) -> io::Result<Vec<String>> {
        let prefix = format!("{}.maps.", self.records.url.name);
        let mut v: Vec<String> = self
            .records
            .pool
            .list_objects()
            .map_err(rados_io)?
            .into_iter()
            .filter_map(|o| o.strip_prefix(&prefix).map(str::to_string))
            .collect();
        v.sort();
        Ok(v)
    }
}

fn check_len(data: &[u8]) -> io::Result<()> {
    if data.len() > MAX_RECORD_WRITE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a record written at once is at most {MAX_RECORD_WRITE} bytes on RADOS, not {} \
                 (a presence map of a disk over 2 TiB)",
                data.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_map_to_objects_and_bad_ones_are_refused() {
        assert_eq!(record_oid("st", "7.map").expect("a map"), "st.maps.7.map");
        assert_eq!(
            record_oid("st", "7.migration").expect("a record"),
            "st.maps.7.migration"
        );
        let long = "x".repeat(129);
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../st.meta",
            "a b",
            "a\0b",
            long.as_str(),
        ] {
            let e = record_oid("st", bad).expect_err(bad);
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
            assert!(e.to_string().contains("not a record name"), "{bad:?}: {e}");
        }
        // Only `rados:POOL/NAME/maps` names records; a directory is not a RADOS name.
        assert!(RadosDir::of_dir(Path::new("/var/lib/st/maps"), None).is_none());
        for bad in ["rados:pool/st", "rados:pool/st/other", "rados:pool/ST/maps"] {
            let e = RadosDir::of_dir(Path::new(bad), None)
                .expect("a rados: name")
                .expect_err(bad);
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad}: {e}");
        }
    }
}
