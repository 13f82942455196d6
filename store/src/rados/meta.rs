//! The metadata object `NAME.meta` of a store on RADOS: what it holds (in its omap), how a
//! store is written there at creation, read at open, committed, and who holds it.

use std::sync::{Arc, Mutex};

use dovetail_rados::{Cluster, Pool, WriteOp};
use log::{info, warn};

use super::{rados_err, RadosUrl, RADOS_FORMAT};
use crate::space::{Result, StoreError};

/// The exclusive `cls_lock` on `NAME.meta` held by the one read-write process.
pub const LOCK_NAME: &str = "dovetail-store";

const K_FORMAT: &str = "rados_format";
const K_OBJECT_SIZE: &str = "object_size";
const K_HEADER: &str = "header";
const K_GENERATION: &str = "generation";
const K_CATALOG: &str = "catalog";
const K_CATALOG_CRC: &str = "catalog_crc";

/// What `NAME.meta` holds, as read.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub object_size: u64,
    pub header: Vec<u8>,
    pub generation: u64,
    pub catalog: Vec<u8>,
}

/// A store's metadata object, as one process uses it: its connection, and the lock cookie when
/// it holds the store for writing.
pub(crate) struct RadosMeta {
    pub url: RadosUrl,
    pub cluster: Cluster,
    /// The metadata object's own context (librados keeps one "last version" per context).
    pool: Pool,
    /// The data objects' context, shared by the tiers.
    pub data: Arc<Pool>,
    /// The cookie of the lock this process holds; `None` read-only.
    cookie: Option<String>,
    /// Serialises this process's commits (the catalog lock does too; kept for `unlock`).
    commit_lock: Mutex<()>,
    /// The store's records (presence maps, migration records), through this client.
    pub records: Arc<super::RadosRecords>,
}

impl std::fmt::Debug for RadosMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RadosMeta")
            .field("url", &self.url)
            .field("locked", &self.cookie.is_some())
            .finish_non_exhaustive()
    }
}

fn crc(generation: u64, catalog: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&generation.to_le_bytes()), catalog)
}

fn u64_of(key: &str, v: &[u8]) -> Result<u64> {
    let b: [u8; 8] = v.try_into().map_err(|_| {
        StoreError::Corrupt(format!(
            "{key} in the metadata object is {} bytes, not 8",
            v.len()
        ))
    })?;
    Ok(u64::from_le_bytes(b))
}

impl RadosMeta {
    /// Connects to the store's pool (no lock).
    pub fn connect(url: &RadosUrl) -> Result<RadosMeta> {
        let cluster = super::connect()?;
        let open = |what: &str| {
            cluster
                .pool(&url.pool)
                .map_err(|e| rados_err(format!("opening pool {} ({what})", url.pool), e))
        };
        let pool = open("metadata")?;
        let data = Arc::new(open("data")?);
        let records = super::RadosRecords::new(url.clone(), data.clone());
        // Records opened by path with no handle registered for their version (`store check`
        // through a reader) go through this client rather than a new connection each.
        super::register_records(&records, None);
        Ok(RadosMeta {
            url: url.clone(),
            cluster,
            pool,
            data,
            cookie: None,
            commit_lock: Mutex::new(()),
            records,
        })
    }

    /// The data objects' context in `pool`: the store's own (shared) for its own pool, a new
    /// one for a tier kept in a pool of its own.
    pub fn data_in(&self, pool: &str) -> Result<Arc<Pool>> {
        if pool == self.url.pool {
            return Ok(self.data.clone());
        }
        self.cluster.pool(pool).map(Arc::new).map_err(|e| {
            rados_err(
                format!(
                    "opening pool {pool} (a tier's data objects of {})",
                    self.url
                ),
                e,
            )
        })
    }

    /// No store here: its metadata object does not exist.
    fn no_store(&self) -> StoreError {
        StoreError::NotAStore {
            path: self.url.path(),
            reason: format!(
                "there is no store: its metadata object {} does not exist in pool {}",
                self.url.meta_oid(),
                self.url.pool
            ),
        }
    }

    /// Whether the store's metadata object exists.
    pub fn exists(&self) -> Result<bool> {
        self.pool
            .stat(&self.url.meta_oid())
            .map(|s| s.is_some())
            .map_err(|e| rados_err(format!("looking for {}", self.url), e))
    }

    /// Writes a new store's metadata object, exclusively (an existing one is
    /// [`StoreError::StoreExists`]), at generation 1.
    pub fn create(&self, object_size: u64, header: &[u8], catalog: &[u8]) -> Result<()> {
        let gen = 1u64;
        let op = WriteOp::new()
            .create(true)
            .omap_set(&[
                (K_FORMAT, &RADOS_FORMAT.to_le_bytes()),
                (K_OBJECT_SIZE, &object_size.to_le_bytes()),
                (K_HEADER, header),
                (K_GENERATION, &gen.to_le_bytes()),
                (K_CATALOG, catalog),
                (K_CATALOG_CRC, &crc(gen, catalog).to_le_bytes()),
            ])
            .map_err(|e| rados_err("building the metadata", e))?;
        match self.pool.operate(&self.url.meta_oid(), op) {
            Err(e) if e.errno() == libc::EEXIST => Err(StoreError::StoreExists(self.url.path())),
            r => r
                .map(|_| ())
                .map_err(|e| rados_err(format!("creating {}", self.url.meta_oid()), e)),
        }
    }

    /// Reads the metadata object; refuses what this binary does not read or what fails its
    /// checksum.
    pub fn load(&self) -> Result<Loaded> {
        let oid = self.url.meta_oid();
        let kv = match self.pool.omap_get(&oid, "") {
            Err(e) if e.errno() == libc::ENOENT => return Err(self.no_store()),
            r => r.map_err(|e| rados_err(format!("reading {oid}"), e))?,
        };
        let get = |k: &str| -> Result<&[u8]> {
            kv.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_slice())
                .ok_or_else(|| StoreError::NotAStore {
                    path: self.url.path(),
                    reason: format!("{oid} has no {k} key"),
                })
        };
        let format = get(K_FORMAT)?;
        let format = u32::from_le_bytes(format.try_into().map_err(|_| {
            StoreError::Corrupt(format!("{K_FORMAT} is {} bytes, not 4", format.len()))
        })?);
        if format != RADOS_FORMAT {
            return Err(StoreError::Corrupt(format!(
                "the store's objects are in RADOS mapping version {format}; this binary reads version {RADOS_FORMAT}"
            )));
        }
        let object_size = u64_of(K_OBJECT_SIZE, get(K_OBJECT_SIZE)?)?;
        let generation = u64_of(K_GENERATION, get(K_GENERATION)?)?;
        let catalog = get(K_CATALOG)?.to_vec();
        let stored = get(K_CATALOG_CRC)?;
        let stored = u32::from_le_bytes(stored.try_into().map_err(|_| {
            StoreError::Corrupt(format!("{K_CATALOG_CRC} is {} bytes, not 4", stored.len()))
        })?);
        if crc(generation, &catalog) != stored {
            return Err(StoreError::Corrupt(format!(
                "the catalog of generation {generation} fails its checksum"
            )));
        }
        Ok(Loaded {
            object_size,
            header: get(K_HEADER)?.to_vec(),
            generation,
            catalog,
        })
    }

    /// The generation committed now.
    pub fn generation(&self) -> Result<u64> {
        let oid = self.url.meta_oid();
        let kv = match self.pool.omap_get(&oid, K_GENERATION) {
            Err(e) if e.errno() == libc::ENOENT => return Err(self.no_store()),
            r => r.map_err(|e| rados_err(format!("reading {oid}"), e))?,
        };
        match kv.iter().find(|(k, _)| k == K_GENERATION) {
            Some((_, v)) => u64_of(K_GENERATION, v),
            None => Err(StoreError::Corrupt(format!("{oid} has no generation"))),
        }
    }

    /// Takes the store for writing: the exclusive lock on the metadata object. Held by another
    /// client: [`StoreError::InUse`].
    pub fn lock(&mut self) -> Result<()> {
        let cookie = format!(
            "{}-{}-{:x}",
            std::process::id(),
            self.cluster.instance_id(),
            crate::store::random_u64()
        );
        let desc = format!("dovetail pid {}", std::process::id());
        match self
            .pool
            .lock_exclusive(&self.url.meta_oid(), LOCK_NAME, &cookie, &desc, None, false)
        {
            Ok(()) => {
                self.cookie = Some(cookie);
                Ok(())
            }
            Err(e) if e.errno() == libc::EBUSY || e.errno() == libc::EEXIST => {
                Err(StoreError::InUse(self.url.path()))
            }
            Err(e) => Err(rados_err(format!("locking {}", self.url), e)),
        }
    }

    /// Who holds the store's lock: `client (address)` each.
    pub fn holders(&self) -> Result<Vec<String>> {
        let lockers = self
            .pool
            .lockers(&self.url.meta_oid(), LOCK_NAME)
            .map_err(|e| rados_err(format!("listing the holders of {}", self.url), e))?;
        Ok(lockers
            .iter()
            .map(|l| format!("{} ({})", l.client, l.addr))
            .collect())
    }

    /// Fences whoever holds the store's lock (its client address blocklisted, so the cluster
    /// refuses its every later operation) and then breaks its lock. Returns the addresses
    /// fenced (none when nobody held it).
    pub fn fence_holder(&self, expire: Option<std::time::Duration>) -> Result<Vec<String>> {
        let oid = self.url.meta_oid();
        let lockers = self
            .pool
            .lockers(&oid, LOCK_NAME)
            .map_err(|e| rados_err(format!("listing the holders of {}", self.url), e))?;
        let mut fenced = Vec::new();
        for l in &lockers {
            self.cluster
                .blocklist(&l.addr, expire)
                .map_err(|e| rados_err(format!("fencing {} ({})", l.client, l.addr), e))?;
            fenced.push(l.addr.clone());
        }
        if !lockers.is_empty() {
            // Fenced everywhere before the lock goes: no OSD may take the old holder's writes.
            self.cluster
                .wait_for_latest_osdmap()
                .map_err(|e| rados_err("waiting for the osdmap that fences the holder", e))?;
        }
        for l in &lockers {
            match self.pool.break_lock(&oid, LOCK_NAME, l) {
                Err(e) if e.errno() != libc::ENOENT => {
                    return Err(rados_err(
                        format!("breaking {}'s lock on {}", l.client, self.url),
                        e,
                    ))
                }
                _ => warn!(
                    "{}: fenced {} ({}) and broke its lock",
                    self.url, l.client, l.addr
                ),
            }
        }
        Ok(fenced)
    }

    /// Commits `catalog` as generation `generation`, built on `previous`: one compound
    /// operation asserting the lock and the previous generation. A process whose lock was
    /// broken, or that was fenced, changes nothing and gets an error that says so.
    pub fn commit(&self, previous: u64, generation: u64, catalog: &[u8]) -> Result<()> {
        let Some(cookie) = &self.cookie else {
            return Err(StoreError::ReadOnly);
        };
        self.commit_with(
            previous,
            generation,
            catalog,
            &[(LOCK_NAME.to_string(), cookie.clone())],
        )
    }

    /// [`RadosMeta::commit`] asserting the locks `locks` (name, cookie; all held by this
    /// client) instead of the store's: a shared open's change lock and disk locks.
    pub fn commit_with(
        &self,
        previous: u64,
        generation: u64,
        catalog: &[u8],
        locks: &[(String, String)],
    ) -> Result<()> {
        let _serial = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut op = WriteOp::new();
        for (name, cookie) in locks {
            op = op.assert_locked(name, cookie);
        }
        let op = op
            .omap_cmp_eq(K_GENERATION, &previous.to_le_bytes())
            .omap_set(&[
                (K_GENERATION, &generation.to_le_bytes()),
                (K_CATALOG, catalog),
                (K_CATALOG_CRC, &crc(generation, catalog).to_le_bytes()),
            ])
            .map_err(|e| rados_err("building a metadata commit", e))?;
        let what = format!(
            "committing metadata generation {generation} of {}",
            self.url
        );
        match self.pool.operate(&self.url.meta_oid(), op) {
            Ok(_) => Ok(()),
            Err(e) if e.is_blocklisted() => Err(StoreError::Io {
                op: format!("{what}: this client is fenced (blocklisted); another daemon has taken the store over"),
                source: super::io_error(&e),
            }),
            Err(e) if e.errno() == libc::ECANCELED => Err(StoreError::Io {
                op: format!("{what}: the store's generation is no longer {previous} (another client committed)"),
                source: super::io_error(&e),
            }),
            Err(e) if [libc::EBUSY, libc::ENOENT, libc::ENOLCK].contains(&e.errno()) => {
                Err(StoreError::Io {
                    op: format!(
                        "{what}: this process no longer holds a lock it asserts ({}): another daemon took it over",
                        locks
                            .iter()
                            .map(|(n, _)| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    source: super::io_error(&e),
                })
            }
            Err(e) => Err(rados_err(what, e)),
        }
    }
}

impl Drop for RadosMeta {
    fn drop(&mut self) {
        if let Some(cookie) = self.cookie.take() {
            match self.pool.unlock(&self.url.meta_oid(), LOCK_NAME, &cookie) {
                Ok(()) => info!("{}: released the store's lock", self.url),
                Err(e) => warn!("{}: could not release the store's lock: {e}", self.url),
            }
        }
    }
}
