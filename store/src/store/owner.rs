//! Disk ownership across daemons: any number of processes open one store with
//! [`Store::open_shared`]; each disk is served by at most one of them, the one holding the
//! disk's lock ([`Store::acquire_disk`]). docs/format.md (*Disk ownership*) describes the
//! lock files and lock names, SECURITY.md the threat model.
//!
//! - **Changes.** Every change of the catalog or the grants (anything done under
//!   [`Store::lock_state`]) runs under the store's *change lock*, taken for that one change,
//!   after the catalog was read again from the store (another process may have committed):
//!   on a file store an exclusive `flock` on `DIR/store.lock`; on RADOS the exclusive
//!   `cls_lock` `dovetail-change` on `NAME.meta`, with a lease ([`CHANGE_LEASE`]) so a dead
//!   holder blocks the others for a lease at most. On RADOS the commit itself is one compound
//!   operation asserting the change lock, the previous generation and the lock of every disk
//!   the change touches; on a file store the change is checked against the disk locks this
//!   process holds before the slot is written.
//! - **Disks.** A change that touches a disk the catalog already holds (its record, one of its
//!   versions, or an extent granted to or taken from one) needs that disk's lock: on a file
//!   store an exclusive `flock` on `DIR/owners/DISK.lock` (which holds the owner's pid and
//!   host, for messages), released by the kernel when the process dies; on RADOS the exclusive
//!   `cls_lock` `dovetail-disk.DISK` on `NAME.meta` itself (a lock a commit can assert must be
//!   on the object the commit changes), held until released or broken.
//! - **Fencing.** [`Store::take_over_disk`] fences the owner before breaking its lock: on RADOS
//!   its client address is blocklisted (the OSDs refuse its every later operation: data writes
//!   and commits), then the disk's lock and, if that client held it, the change lock are
//!   broken. On a file store the owner is a process on this host whose lock goes when it
//!   exits, so a takeover only acquires the lock. On RADOS, one [`Store`] handle is one client
//!   instance: a daemon opens one handle per disk it serves so that fencing one disk leaves
//!   the others served.
//!
//! The acquire and release are an API of their own so ownership can follow a VM (a live
//! migration's destination acquires when its rings start; the source releases when it
//! stops).

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::time::{Duration, Instant};

use dovetail_rados::{Cluster, Pool as RadosPool};

use super::rados_open::RadosMeta;
use super::*;
use crate::rados::RadosUrl;

mod lease;
pub use lease::{lease_key, Lease, LEASE_KEY_PREFIX, LEASE_LEN, LEASE_RENEW, MIN_TAKEOVER_AFTER};

/// The file in a store's directory whose `flock` is the change lock of shared opens.
pub const CHANGE_FILE: &str = "store.lock";
/// The directory in a store's directory holding one lock file per owned disk.
pub const OWNERS_DIR: &str = "owners";
/// The change lock's name on a RADOS store's metadata object.
pub const CHANGE_LOCK: &str = "dovetail-change";
/// The prefix of a disk's lock name on a RADOS store's metadata object.
pub const DISK_LOCK_PREFIX: &str = "dovetail-disk.";
/// How long a RADOS change lock lives if its holder dies holding it.
pub const CHANGE_LEASE: Duration = Duration::from_secs(10);

/// The lock name of disk `disk` on a RADOS store's metadata object.
pub fn disk_lock_name(disk: &str) -> String {
    format!("{DISK_LOCK_PREFIX}{disk}")
}

/// This process, as an owner is named to others: `pid P on HOST`.
fn who() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!("pid {} on {host}", std::process::id())
}

/// A shared open's state: how it takes the change lock and the disk locks it holds.
pub(super) struct Multi {
    who: String,
    kind: Kind,
    /// The disks this handle owns (their lock files on a file store).
    owned: Mutex<HashMap<String, Option<File>>>,
    /// Disks this handle owned and lost (fenced, or its lock found broken), with why.
    lost: Mutex<Vec<(String, String)>>,
    /// On RADOS, a handle connected ahead for the next [`Store::open_shared_again`].
    spare: Mutex<Option<Arc<Store>>>,
}

enum Kind {
    File {
        dir: PathBuf,
        change: File,
    },
    Rados {
        url: RadosUrl,
        cluster: Cluster,
        pool: RadosPool,
        cookie: String,
    },
}

impl std::fmt::Debug for Multi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Multi").field("who", &self.who).finish()
    }
}

/// [`Store::lock_state`]'s guard: the catalog lock and, on a shared open, the change lock
/// (released when the guard goes).
pub(super) struct StateGuard<'a> {
    st: MutexGuard<'a, MetaState>,
    multi: Option<&'a Multi>,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = MetaState;
    fn deref(&self) -> &MetaState {
        &self.st
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut MetaState {
        &mut self.st
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        if let (Some(m), Some(Ok(()))) = (self.multi, self.st.change.take()) {
            m.end_change();
        }
    }
}

fn flock_blocking(f: &File, op: libc::c_int) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    loop {
        // SAFETY: flock only reads its integer arguments; the descriptor is owned by `f` and
        // stays open for the call.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Opens `name` in `dir` read-write, creating it (mode 0600, no symlink followed) if missing.
fn open_or_create(dir: &crate::safefs::Dir, name: &str) -> io::Result<File> {
    match dir.open_file(name, true) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => match dir.create_new(name) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => dir.open_file(name, true),
            r => r,
        },
        r => r,
    }
}

/// The disks a change from `old` to `new` touches: records added, removed or changed,
/// versions added, removed or changed, extents granted or taken back (by their versions'
/// disks).
pub(super) fn touched_disks(old: &Meta, new: &Meta) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |d: &str| {
        if !out.iter().any(|o| o == d) {
            out.push(d.to_string());
        }
    };
    for d in &old.disks {
        if new.disks.iter().find(|n| n.name == d.name) != Some(d) {
            add(&d.name);
        }
    }
    for d in &new.disks {
        if !old.disks.iter().any(|o| o.name == d.name) {
            add(&d.name);
        }
    }
    let disk_of = |key: u64| {
        old.versions
            .iter()
            .chain(&new.versions)
            .find(|v| v.key == key)
            .map(|v| v.disk.as_str())
    };
    for v in &old.versions {
        if new.versions.iter().find(|n| n.key == v.key) != Some(v) {
            add(&v.disk);
        }
    }
    for v in &new.versions {
        if !old.versions.iter().any(|o| o.key == v.key) {
            add(&v.disk);
        }
    }
    for (e, (a, b)) in old.owners.iter().zip(&new.owners).enumerate() {
        if a != b {
            for k in [*a, *b] {
                if let Some(d) = disk_of(k) {
                    add(d);
                } else if k != 0 {
                    debug!("extent {e} changes hands with key {k}, of no disk");
                }
            }
        }
    }
    out.sort();
    out
}

impl Multi {
    fn rados_refused(&self, what: &str, e: &dovetail_rados::Error) -> String {
        if e.is_blocklisted() {
            format!(
                "{what}: this client is fenced (blocklisted): another daemon took a disk of this \
                 store handle over"
            )
        } else {
            format!("{what}: {e}")
        }
    }

    /// Takes the change lock and reads the catalog again if another process committed.
    fn begin_change(&self, store: &Store, st: &mut MetaState) -> std::result::Result<(), String> {
        match &self.kind {
            Kind::File { change, .. } => flock_blocking(change, libc::LOCK_EX)
                .map_err(|e| format!("taking the store's change lock {CHANGE_FILE}: {e}"))?,
            Kind::Rados {
                url, pool, cookie, ..
            } => {
                let oid = url.meta_oid();
                let deadline = Instant::now() + CHANGE_LEASE + Duration::from_secs(5);
                let mut pause = Duration::from_millis(1);
                loop {
                    match pool.lock_exclusive(
                        &oid,
                        CHANGE_LOCK,
                        cookie,
                        &self.who,
                        Some(CHANGE_LEASE),
                        true,
                    ) {
                        Ok(()) => {
                            if pause >= Duration::from_millis(20) {
                                debug!("{url}: waited for the change lock");
                            }
                            break;
                        }
                        Err(e)
                            if (e.errno() == libc::EBUSY || e.errno() == libc::EEXIST)
                                && Instant::now() < deadline =>
                        {
                            if pause == Duration::from_millis(16) {
                                let holders = pool.lockers(&oid, CHANGE_LOCK).unwrap_or_default();
                                info!(
                                    "{url}: waiting for the change lock, held by {}",
                                    holders
                                        .iter()
                                        .map(|l| format!("{} at {}", l.client, l.addr))
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                );
                            }
                            std::thread::sleep(pause);
                            pause = (pause * 2).min(Duration::from_millis(20));
                        }
                        Err(e) => {
                            let why =
                                self.rados_refused(&format!("taking {url}'s change lock"), &e);
                            if e.is_blocklisted() {
                                // The whole client is fenced: every disk it owned is lost.
                                self.mark_all_lost(&why);
                            }
                            return Err(why);
                        }
                    }
                }
            }
        }
        if let Err(e) = self.refresh(store, st) {
            self.end_change();
            return Err(format!("reading the store's catalog again: {e}"));
        }
        Ok(())
    }

    fn end_change(&self) {
        match &self.kind {
            Kind::File { change, .. } => {
                if let Err(e) = flock_blocking(change, libc::LOCK_UN) {
                    warn!("could not release the store's change lock: {e}");
                }
            }
            Kind::Rados {
                url, pool, cookie, ..
            } => {
                if let Err(e) = pool.unlock(&url.meta_oid(), CHANGE_LOCK, cookie) {
                    // It expires with its lease.
                    warn!("{url}: could not release the change lock: {e}");
                }
            }
        }
    }

    /// Reads the newest committed catalog into `st` (and the grant cache) if it is newer.
    fn refresh(&self, store: &Store, st: &mut MetaState) -> Result<()> {
        let (meta, generation, newest) = match &self.kind {
            Kind::File { .. } => {
                let h = &store.header;
                let mut gens = [0u64; 2];
                for (i, g) in gens.iter_mut().enumerate() {
                    let mut head = [0u8; 8];
                    store
                        .meta_file
                        .read_at(h.slot_offset(i), &mut head)
                        .map_err(io_err("reading a metadata slot's generation"))?;
                    *g = u64::from_le_bytes(head);
                }
                if gens[st.newest] == st.generation && gens[1 - st.newest] < st.generation {
                    return Ok(());
                }
                let slots = [
                    read_slot(&*store.meta_file, h, 0)?,
                    read_slot(&*store.meta_file, h, 1)?,
                ];
                let newest = newest(&slots)?;
                let Slot::Valid {
                    generation,
                    payload,
                    version,
                } = &slots[newest]
                else {
                    return Err(StoreError::Corrupt("no valid metadata slot".into()));
                };
                if *generation == st.generation {
                    return Ok(());
                }
                let (meta, free) = Meta::decode(payload, *version)?;
                check_meta(&store.header, &meta, free)?;
                (meta, *generation, newest)
            }
            Kind::Rados { .. } => {
                let Some(r) = store.rados_meta() else {
                    return Ok(());
                };
                if r.generation()? == st.generation {
                    return Ok(());
                }
                let loaded = r.load()?;
                let (meta, free) = Meta::decode(&loaded.catalog, store.header.version)?;
                check_meta(&store.header, &meta, free)?;
                (meta, loaded.generation, 0)
            }
        };
        debug!(
            "{}: catalog read again at generation {generation} (had {})",
            store.location.display(),
            st.generation
        );
        *store.grants_write() = meta.owners.clone();
        if meta.pool != st.meta.pool {
            let mut pool = PoolMem::from_meta(&meta.pool, store.tiers.len());
            pool.note_versions(&meta);
            *store.pool_mem() = pool;
        } else {
            store.pool_mem().note_versions(&meta);
        }
        st.meta = meta;
        st.generation = generation;
        st.newest = newest;
        Ok(())
    }

    /// Checks a commit from `st` to `new`: the change lock is held and every disk the change
    /// touches that the catalog held before is owned here. Returns the owned disks it touches
    /// (asserted by a RADOS commit).
    pub(super) fn check_commit(
        &self,
        store: &Store,
        st: &MetaState,
        new: &Meta,
    ) -> Result<Vec<String>> {
        match &st.change {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                return Err(StoreError::Io {
                    op: format!("changing the catalog of {} ({e})", store.location.display()),
                    source: io::Error::other(e.clone()),
                })
            }
            None => {
                return Err(StoreError::Invalid(
                    "a catalog change outside the store's change lock".into(),
                ))
            }
        }
        let touched = touched_disks(&st.meta, new);
        let owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
        let mut asserted = Vec::new();
        for d in touched {
            if owned.contains_key(&d) {
                asserted.push(d);
            } else if st.meta.disks.iter().any(|r| r.name == d) {
                drop(owned);
                let owner = self
                    .owner(&d)
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| "nobody".into());
                return Err(StoreError::Invalid(format!(
                    "disk {} is not owned by this daemon (owner: {owner}): acquire it (or take \
                     it over) before changing it",
                    crate::names::shown(&d)
                )));
            }
        }
        Ok(asserted)
    }

    /// Who owns `disk` now, if anyone (this process included).
    fn owner(&self, disk: &str) -> Result<Option<String>> {
        match &self.kind {
            Kind::File { dir, .. } => {
                let path = dir.join(OWNERS_DIR).join(format!("{disk}.lock"));
                let f = match crate::safefs::open_file(&path, true) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io_err(format!("opening {}", path.display()))(e)),
                };
                if lock(&f, LockMode::Shared)
                    .map_err(io_err(format!("testing {}", path.display())))?
                {
                    // Nobody holds it (this probe's lock goes with `f`).
                    return Ok(None);
                }
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut &f, &mut text);
                let text = text.trim();
                Ok(Some(if text.is_empty() {
                    "a process on this host".into()
                } else {
                    text.chars().take(200).collect()
                }))
            }
            Kind::Rados { url, pool, .. } => {
                let lockers = pool
                    .lockers(&url.meta_oid(), &disk_lock_name(disk))
                    .map_err(|e| crate::rados::rados_err(format!("listing {disk}'s owner"), e))?;
                Ok(lockers
                    .first()
                    .map(|l| format!("{} at {}, cookie {}", l.client, l.addr, l.cookie)))
            }
        }
    }

    fn acquire(&self, disk: &str) -> Result<()> {
        let refused = |owner: String| StoreError::DiskOwned {
            disk: disk.to_string(),
            owner,
        };
        let held = match &self.kind {
            Kind::File { dir, .. } => {
                let owners = dir.join(OWNERS_DIR);
                match std::fs::DirBuilder::new().mode(0o700).create(&owners) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                        return Err(io_err(format!("creating {}", owners.display()))(e))
                    }
                    _ => {}
                }
                let odir = crate::safefs::Dir::open(&owners)
                    .map_err(io_err(format!("opening {}", owners.display())))?;
                let name = format!("{disk}.lock");
                let f = open_or_create(&odir, &name)
                    .map_err(io_err(format!("opening {}", owners.join(&name).display())))?;
                if !lock(&f, LockMode::Exclusive)
                    .map_err(io_err(format!("locking {}", owners.join(&name).display())))?
                {
                    let owner = self
                        .owner(disk)?
                        .unwrap_or_else(|| "a process on this host".into());
                    return Err(refused(owner));
                }
                let text = format!("{} since {}\n", self.who, now());
                f.set_len(0)
                    .and_then(|()| (&f).write_all(text.as_bytes()))
                    .map_err(io_err(format!("writing {}", owners.join(&name).display())))?;
                Some(f)
            }
            Kind::Rados {
                url, pool, cookie, ..
            } => {
                match pool.lock_exclusive(
                    &url.meta_oid(),
                    &disk_lock_name(disk),
                    cookie,
                    &self.who,
                    None,
                    true,
                ) {
                    Ok(()) => None,
                    Err(e) if e.errno() == libc::EBUSY || e.errno() == libc::EEXIST => {
                        let owner = self.owner(disk)?.unwrap_or_else(|| "another client".into());
                        return Err(refused(owner));
                    }
                    Err(e) => {
                        return Err(StoreError::Io {
                            op: self.rados_refused(&format!("locking disk {disk} of {url}"), &e),
                            source: crate::rados::io_error(&e),
                        })
                    }
                }
            }
        };
        self.owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(disk.to_string(), held);
        info!("acquired disk {disk} ({})", self.who);
        Ok(())
    }

    fn release(&self, disk: &str) -> Result<bool> {
        let Some(held) = self
            .owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(disk)
        else {
            return Ok(false);
        };
        if let Kind::Rados {
            url, pool, cookie, ..
        } = &self.kind
        {
            pool.unlock(&url.meta_oid(), &disk_lock_name(disk), cookie)
                .map_err(|e| crate::rados::rados_err(format!("releasing disk {disk}"), e))?;
        }
        // A file store's lock goes with the file.
        drop(held);
        info!("released disk {disk}");
        Ok(true)
    }

    /// Notes that this handle lost `disk` (its lock broken by a takeover): it changes nothing
    /// of it from now on.
    fn mark_lost(&self, disk: &str, why: &str) {
        if self
            .owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(disk)
            .is_some()
        {
            error!("disk {disk}: this daemon no longer owns it ({why}); it stops serving it");
            self.lost
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((disk.to_string(), why.to_string()));
        }
    }

    fn mark_all_lost(&self, why: &str) {
        let disks: Vec<String> = self
            .owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for d in disks {
            self.mark_lost(&d, why);
        }
    }

    /// Commits a change on RADOS: one compound operation asserting the change lock, the
    /// disks' locks and the previous generation.
    pub(super) fn rados_commit(
        &self,
        r: &RadosMeta,
        previous: u64,
        generation: u64,
        payload: &[u8],
        disks: &[String],
    ) -> Result<()> {
        let Kind::Rados { cookie, .. } = &self.kind else {
            return Err(StoreError::Invalid("not a store on RADOS".into()));
        };
        let mut locks = vec![(CHANGE_LOCK.to_string(), cookie.clone())];
        locks.extend(disks.iter().map(|d| (disk_lock_name(d), cookie.clone())));
        let done = r.commit_with(previous, generation, payload, &locks);
        if let Err(e) = &done {
            let text = e.to_string();
            if text.contains("fenced") || text.contains("no longer holds") {
                for d in disks {
                    self.mark_lost(d, &text);
                }
            }
        }
        done
    }
}

impl Drop for Multi {
    fn drop(&mut self) {
        let disks: Vec<String> = self
            .owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for d in disks {
            if let Err(e) = self.release(&d) {
                warn!("{e}");
            }
        }
    }
}

/// Refuses a catalog read again that breaks a store-level invariant.
fn check_meta(header: &Header, meta: &Meta, free: u32) -> Result<()> {
    let violations = validate(header, meta, free);
    match violations.first() {
        None => Ok(()),
        Some(first) => Err(StoreError::Corrupt(format!(
            "{first}; `dovetail store check` lists every problem"
        ))),
    }
}

impl Store {
    /// The catalog lock; on a shared open also the store's change lock, with the catalog read
    /// again if another process committed since (see the module's text). A failure to take
    /// the change lock or to read is kept in the state: a commit under this guard then fails
    /// with it.
    pub(super) fn lock_state(&self) -> StateGuard<'_> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let multi = self.multi.get();
        if let Some(m) = multi {
            let begun = m.begin_change(self, &mut st);
            if let Err(e) = &begun {
                warn!("{}: {e}", self.location.display());
            }
            st.change = Some(begun);
        }
        StateGuard { st, multi }
    }

    fn multi(&self) -> Result<&Multi> {
        self.multi.get().ok_or_else(|| {
            StoreError::Invalid(format!(
                "{} is open by this process alone (not shared): it owns every disk; open it \
                 shared (`serve --shared-store`) to share its disks with other daemons",
                self.location.display()
            ))
        })
    }

    /// Opens the store at `dir` (a directory or `rados:POOL/NAME`) for reading and writing
    /// beside other processes that open it this way: each disk is then changed and served only
    /// by the one holding its lock ([`Store::acquire_disk`]). A process holding the store
    /// alone ([`Store::open`]) makes this fail with [`StoreError::InUse`], and the other way
    /// round on a file store.
    pub fn open_shared(dir: &Path) -> Result<Arc<Store>> {
        let who = who();
        if let Some(url) = RadosUrl::of(dir) {
            let url = url?;
            let store = Store::open_rados_as(&url, false, false, true)?;
            let r = store
                .rados_meta()
                .ok_or_else(|| StoreError::Invalid("not a store on RADOS".into()))?;
            if !r.holders()?.is_empty() {
                return Err(StoreError::InUse(url.path()));
            }
            let pool = r
                .cluster
                .pool(&url.pool)
                .map_err(|e| crate::rados::rados_err(format!("opening pool {}", url.pool), e))?;
            let cookie = format!(
                "{}-{}-{:x}",
                std::process::id(),
                r.cluster.instance_id(),
                random_u64()
            );
            let multi = Multi {
                who,
                kind: Kind::Rados {
                    url,
                    cluster: r.cluster.clone(),
                    pool,
                    cookie,
                },
                owned: Mutex::new(HashMap::new()),
                lost: Mutex::new(Vec::new()),
                spare: Mutex::new(None),
            };
            let _ = store.multi.set(multi);
            return Ok(store);
        }
        let sdir = crate::safefs::Dir::open(dir).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::NoStore(dir.to_path_buf()),
            _ => io_err(format!("opening directory {}", dir.display()))(e),
        })?;
        let (meta, meta_path) = open_meta_unlocked(dir)?;
        drop(meta);
        let meta = sdir
            .open_file(META_FILE, true)
            .map_err(io_err(format!("opening {}", meta_path.display())))?;
        if !lock(&meta, LockMode::Shared)
            .map_err(io_err(format!("locking {}", meta_path.display())))?
        {
            return Err(StoreError::InUse(dir.to_path_buf()));
        }
        let change = open_or_create(&sdir, CHANGE_FILE).map_err(io_err(format!(
            "opening {}",
            dir.join(CHANGE_FILE).display()
        )))?;
        // The open (and an upgrade it may make) under the change lock.
        flock_blocking(&change, libc::LOCK_EX).map_err(io_err(format!(
            "locking {}",
            dir.join(CHANGE_FILE).display()
        )))?;
        let opened = Store::open_files_as(dir, meta, meta_path, false, false, false);
        let _ = flock_blocking(&change, libc::LOCK_UN);
        let store = opened?;
        let multi = Multi {
            who,
            kind: Kind::File {
                dir: dir.to_path_buf(),
                change,
            },
            owned: Mutex::new(HashMap::new()),
            lost: Mutex::new(Vec::new()),
            spare: Mutex::new(None),
        };
        let _ = store.multi.set(multi);
        Ok(store)
    }

    /// Another handle on this store, opened shared ([`Store::open_shared`]): on RADOS a client
    /// of its own, so that fencing one handle's client leaves the other's disks alone (a daemon
    /// serves each disk of a RADOS store through a handle of its own).
    pub fn open_shared_again(self: &Arc<Self>) -> Result<Arc<Store>> {
        let m = self.multi()?;
        let path = match (self.rados_meta(), &self.dir) {
            (Some(r), _) => r.url.path(),
            (None, Some(d)) => d.clone(),
            (None, None) => {
                return Err(StoreError::Invalid(
                    "a store over given files cannot be opened again".into(),
                ))
            }
        };
        if !self.on_rados() {
            return Store::open_shared(&path);
        }
        let spare = m.spare.lock().unwrap_or_else(|p| p.into_inner()).take();
        // The next one is connected in the background: a new connection to a cluster can take
        // seconds (right after a blocklist, ~10 s measured), which a takeover should not wait.
        let me = Arc::downgrade(self);
        let again = path.clone();
        let spawned = std::thread::Builder::new()
            .name("store-spare".into())
            .spawn(move || {
                crate::thread_kind::entered(crate::thread_kind::ThreadKind::Control);
                match Store::open_shared(&again) {
                    Ok(s) => {
                        if let Some(m) = me.upgrade().as_ref().and_then(|me| me.multi.get()) {
                            *m.spare.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                        }
                    }
                    Err(e) => warn!("{}: no spare handle: {e}", again.display()),
                }
            });
        if let Err(e) = spawned {
            warn!(
                "{}: cannot start connecting a spare handle: {e}",
                path.display()
            );
        }
        match spare {
            Some(s) => Ok(s),
            None => Store::open_shared(&path),
        }
    }

    /// Hands disk `disk`'s lock from this handle to `to`, another shared handle on the same
    /// store: released here, then taken there.
    pub fn hand_over_disk(&self, disk: &str, to: &Store) -> Result<()> {
        self.release_disk(disk)?;
        to.acquire_disk(disk)
    }

    /// Whether this handle was opened shared ([`Store::open_shared`]).
    pub fn is_shared(&self) -> bool {
        self.multi.get().is_some()
    }

    /// Takes disk `disk`'s lock for this handle: from now on it alone changes the disk (and
    /// serves it). Held by another process: [`StoreError::DiskOwned`], naming it. Taking a disk
    /// this handle owns already is a no-op.
    pub fn acquire_disk(&self, disk: &str) -> Result<()> {
        let m = self.multi()?;
        check_disk_name(disk)?;
        {
            let st = self.lock_state();
            if let Some(Err(e)) = &st.change {
                return Err(StoreError::Io {
                    op: format!("acquiring disk {disk}"),
                    source: io::Error::other(e.clone()),
                });
            }
            if !st.meta.disks.iter().any(|d| d.name == disk) {
                return Err(StoreError::NoSuchDisk(disk.to_string()));
            }
        }
        if m.owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(disk)
        {
            return Ok(());
        }
        m.acquire(disk)
    }

    /// Gives disk `disk`'s lock back (detach, stop, or the source's end of a live migration).
    /// Returns whether this handle held it.
    pub fn release_disk(&self, disk: &str) -> Result<bool> {
        self.multi()?.release(disk)
    }

    /// Whether this handle owns `disk` (holds its lock, as far as it knows: a RADOS owner that
    /// was fenced learns it at its next commit or write).
    pub fn owns_disk(&self, disk: &str) -> bool {
        self.multi.get().is_some_and(|m| {
            m.owned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(disk)
        })
    }

    /// Who owns `disk` now (`None`: nobody), as a text for messages.
    pub fn disk_owner(&self, disk: &str) -> Result<Option<String>> {
        self.multi()?.owner(disk)
    }

    /// Disks this handle owned and lost to a takeover, with why (their commits were refused).
    pub fn lost_disks(&self) -> Vec<(String, String)> {
        self.multi.get().map_or_else(Vec::new, |m| {
            m.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
        })
    }

    /// Checks that this handle still holds the lock of every disk it owns: on RADOS, that the
    /// cluster still lists it as the holder (a fenced client's request is refused, a broken
    /// lock is listed no more). Disks found lost are marked ([`Store::lost_disks`]) and
    /// returned with why. A file store's locks cannot be lost while the process lives.
    pub fn check_owned(&self) -> Vec<(String, String)> {
        let Some(m) = self.multi.get() else {
            return Vec::new();
        };
        let Kind::Rados {
            url, pool, cookie, ..
        } = &m.kind
        else {
            return Vec::new();
        };
        let disks: Vec<String> = m
            .owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut lost = Vec::new();
        for d in disks {
            let why = match pool.lockers(&url.meta_oid(), &disk_lock_name(&d)) {
                Ok(l) if l.iter().any(|l| &l.cookie == cookie) => continue,
                Ok(l) => match l.first() {
                    Some(o) => format!("its lock is held by {} at {} now", o.client, o.addr),
                    None => "its lock was broken".to_string(),
                },
                Err(e) if e.is_blocklisted() => {
                    "this client is fenced (blocklisted): another daemon took the disk over"
                        .to_string()
                }
                // Not known to be lost (the cluster did not answer): checked again later.
                Err(_) => continue,
            };
            m.mark_lost(&d, &why);
            lost.push((d, why));
        }
        lost
    }

    /// Takes disk `disk` over from its owner (`ctl takeover DISK`), fencing it first. On RADOS
    /// the owner's client address is blocklisted (for `expire`, or the cluster's default), this
    /// client waits for the OSD map that fences it, and only then are the disk's lock and, if
    /// the owner held it, the change lock broken; the disk is then acquired. Returns the
    /// addresses fenced. On a file store the owner is a process on this host whose lock the
    /// kernel releases when it exits (kill -9 included), so this only acquires: a live owner
    /// is refused with [`StoreError::DiskOwned`].
    pub fn take_over_disk(&self, disk: &str, expire: Option<Duration>) -> Result<Vec<String>> {
        let m = self.multi()?;
        check_disk_name(disk)?;
        let mut fenced = Vec::new();
        if let Kind::Rados {
            url,
            cluster,
            pool,
            cookie,
        } = &m.kind
        {
            let oid = url.meta_oid();
            let name = disk_lock_name(disk);
            let lockers = pool
                .lockers(&oid, &name)
                .map_err(|e| crate::rados::rados_err(format!("listing {disk}'s owner"), e))?;
            let lockers: Vec<_> = lockers
                .into_iter()
                .filter(|l| &l.cookie != cookie)
                .collect();
            for l in &lockers {
                cluster.blocklist(&l.addr, expire).map_err(|e| {
                    crate::rados::rados_err(format!("fencing {} ({})", l.client, l.addr), e)
                })?;
                fenced.push(l.addr.clone());
            }
            if !lockers.is_empty() {
                cluster.wait_for_latest_osdmap().map_err(|e| {
                    crate::rados::rados_err("waiting for the osdmap that fences the owner", e)
                })?;
            }
            let change = pool
                .lockers(&oid, CHANGE_LOCK)
                .map_err(|e| crate::rados::rados_err("listing the change lock's holder", e))?;
            for l in &lockers {
                for (lock_name, held) in [(name.as_str(), l), (CHANGE_LOCK, l)] {
                    if lock_name == CHANGE_LOCK && !change.iter().any(|c| c.addr == held.addr) {
                        continue;
                    }
                    let holder = if lock_name == CHANGE_LOCK {
                        change.iter().find(|c| c.addr == held.addr).unwrap_or(held)
                    } else {
                        held
                    };
                    match pool.break_lock(&oid, lock_name, holder) {
                        Err(e) if e.errno() != libc::ENOENT => {
                            return Err(crate::rados::rados_err(
                                format!("breaking {}'s lock {lock_name}", holder.client),
                                e,
                            ))
                        }
                        _ => {}
                    }
                }
                warn!(
                    "{url}: fenced {} ({}) and broke its lock on disk {disk}",
                    l.client, l.addr
                );
            }
        }
        self.acquire_disk(disk).map_err(|e| match e {
            StoreError::DiskOwned { disk, owner } if !self.on_rados() => {
                StoreError::Invalid(format!(
                    "disk {disk} is owned by {owner}, which still runs: on a file store the \
                     owner is a process on this host and its lock goes when it exits; stop it \
                     (kill it if it hangs), then take the disk over"
                ))
            }
            e => e,
        })?;
        Ok(fenced)
    }

    /// A grant on a shared open: the extent chosen, zeroed and committed under one change
    /// lock, so two processes never pick the same free extent (the one that zeroes it could
    /// wipe the other's data).
    pub(super) fn grant_shared(
        &self,
        key: VersionKey,
        range: Range<u32>,
        tier: Option<usize>,
    ) -> Result<ExtentId> {
        let mut st = self.lock_state();
        let vi = st
            .meta
            .version_index(key.0)
            .map_err(|_| StoreError::NoSuchVersion(key))?;
        let Some(e) = range
            .clone()
            .find(|&e| st.meta.owners.get(e as usize) == Some(&0))
        else {
            return Err(match tier {
                None => StoreError::Full,
                Some(t) => StoreError::TierFull(self.tiers[t].name.clone()),
            });
        };
        // Checked before the zeroing too: a change of a disk this handle does not own touches
        // nothing.
        let mut new = st.meta.clone();
        new.owners[e as usize] = key.0;
        new.versions[vi].extents.push(e);
        if let Some(m) = self.multi.get() {
            m.check_commit(self, &st, &new)?;
        }
        let size = self.header.extent_size;
        let t = &self.tiers[self.tier_of(e)];
        t.file
            .zero_range(u64::from(e - t.first) * size, size)
            .map_err(io_err(format!(
                "zeroing extent {e} (tier {}, {}) before granting it",
                t.name,
                t.path.display()
            )))?;
        self.commit(&mut st, new)?;
        self.grants_write()[e as usize] = key.0;
        debug!("granted extent {e} (tier {}) to {key}", t.name);
        Ok(ExtentId(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, trusted: u64) -> DiskRec {
        DiskRec {
            name: name.into(),
            size: 4096,
            trusted,
            candidate: 0,
            tee: None,
            attach: None,
            members: Vec::new(),
        }
    }

    fn version(key: u64, disk: &str, extents: Vec<u32>) -> VersionRec {
        VersionRec {
            key,
            disk: disk.into(),
            layout: "parallax-v1".into(),
            extents,
            root: Vec::new(),
        }
    }

    #[test]
    fn a_change_touches_the_disks_whose_records_versions_or_extents_change() {
        let mut owners = vec![0u64; 8];
        owners[1] = 1;
        owners[2] = 2;
        let old = Meta {
            next_key: 3,
            owners,
            versions: vec![version(1, "a", vec![1]), version(2, "b", vec![2])],
            disks: vec![disk("a", 1), disk("b", 2)],
            pool: Default::default(),
        };
        assert!(touched_disks(&old, &old).is_empty());
        // A root commit of a's version touches a alone.
        let mut new = old.clone();
        new.versions[0].root = b"root".to_vec();
        assert_eq!(touched_disks(&old, &new), vec!["a".to_string()]);
        // An extent moving from b's version to a's touches both.
        let mut new = old.clone();
        new.owners[2] = 1;
        assert_eq!(
            touched_disks(&old, &new),
            vec!["a".to_string(), "b".to_string()]
        );
        // A new disk with its version; a deleted disk.
        let mut new = old.clone();
        new.disks.push(disk("c", 3));
        new.versions.push(version(3, "c", Vec::new()));
        assert_eq!(touched_disks(&old, &new), vec!["c".to_string()]);
        let mut new = old.clone();
        new.disks.remove(1);
        new.versions.remove(1);
        new.owners[2] = 0;
        assert_eq!(touched_disks(&old, &new), vec!["b".to_string()]);
        // A changed disk record (an attachment, a size).
        let mut new = old.clone();
        new.disks[0].size = 8192;
        assert_eq!(touched_disks(&old, &new), vec!["a".to_string()]);
    }
}
