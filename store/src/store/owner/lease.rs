//! Ownership leases: the owner of a disk renews a lease record for it every [`LEASE_RENEW`]
//! while it runs, so that another process can tell a hung owner (SIGSTOP, a stuck host) from
//! a live one and take the disk over after a timeout it chooses (`serve --takeover-after`).
//! docs/format.md (*Disk ownership*, *Lease record*) describes the record.
//!
//! The record is 24 bytes: a renewal counter, the owner's wall clock in Unix milliseconds and
//! its pid, each a u64 little-endian. A reader never compares the clock with its own: it notes
//! when the record it reads last changed, by its own monotonic clock, so clocks that disagree
//! between hosts move no takeover earlier.
//!
//! - **File store:** `owners/DISK.lease`, rewritten in place by the process holding
//!   `owners/DISK.lock`. The kernel releases a dead owner's lock; the lease tells a hung one.
//!   A hung owner is fenced by killing it (it is a process on this host: the pid that holds the
//!   lock is read off `/proc/locks`, never off the files), then its lock is free.
//! - **RADOS:** the omap key `lease.DISK` on `NAME.meta`, written by one compound operation that
//!   asserts `dovetail-disk.DISK` with the owner's cookie, so only the holder of the disk's
//!   lock renews it and a fenced owner's renewals are refused by the OSDs.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use dovetail_rados::WriteOp;

use super::*;

/// How often an owner renews the lease of every disk it owns.
pub const LEASE_RENEW: Duration = Duration::from_secs(1);
/// The shortest takeover timeout accepted: three renewals, so one late renewal (a busy host)
/// never looks like a hung owner.
pub const MIN_TAKEOVER_AFTER: Duration = Duration::from_secs(3);
/// The prefix of a disk's lease key on a RADOS store's metadata object.
pub const LEASE_KEY_PREFIX: &str = "lease.";
/// The length of a lease record.
pub const LEASE_LEN: usize = 24;

static RENEWALS: AtomicU64 = AtomicU64::new(0);

/// A disk's lease record as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Renewals made by the writing process (grows by one or more each renewal).
    pub counter: u64,
    /// The owner's wall clock at the renewal (for messages only).
    pub unix_ms: u64,
    /// The owner's pid.
    pub pid: u64,
}

impl Lease {
    fn encode(&self) -> [u8; LEASE_LEN] {
        let mut b = [0u8; LEASE_LEN];
        b[0..8].copy_from_slice(&self.counter.to_le_bytes());
        b[8..16].copy_from_slice(&self.unix_ms.to_le_bytes());
        b[16..24].copy_from_slice(&self.pid.to_le_bytes());
        b
    }

    /// Decodes a record; anything not exactly [`LEASE_LEN`] bytes is refused.
    pub fn decode(b: &[u8]) -> Result<Lease> {
        if b.len() != LEASE_LEN {
            return Err(StoreError::Corrupt(format!(
                "a lease record is {} bytes, not {LEASE_LEN}",
                b.len()
            )));
        }
        let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        Ok(Lease {
            counter: u(0),
            unix_ms: u(8),
            pid: u(16),
        })
    }
}

/// The lease key of disk `disk` on a RADOS store's metadata object.
pub fn lease_key(disk: &str) -> String {
    format!("{LEASE_KEY_PREFIX}{disk}")
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The pid holding an exclusive `flock` on the file `f` (read off `/proc/locks`), if any.
fn flock_holder(f: &File) -> io::Result<Option<i32>> {
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata()?;
    let (dev, ino) = (m.dev(), m.ino());
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let locks = std::fs::read_to_string("/proc/locks")?;
    for line in locks.lines() {
        // `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF` (a blocked waiter's line has `->`).
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[1] != "FLOCK" || f[3] != "WRITE" {
            continue;
        }
        let mut id = f[5].split(':');
        let (Some(ma), Some(mi), Some(i)) = (id.next(), id.next(), id.next()) else {
            continue;
        };
        let same = u32::from_str_radix(ma, 16).ok() == Some(major)
            && u32::from_str_radix(mi, 16).ok() == Some(minor)
            && i.parse::<u64>().ok() == Some(ino);
        if same {
            return Ok(f[4].parse::<i32>().ok());
        }
    }
    Ok(None)
}

impl Multi {
    fn renew_one(&self, disk: &str, lease: &Lease) -> std::result::Result<(), String> {
        match &self.kind {
            Kind::File { dir, .. } => {
                let path = dir.join(OWNERS_DIR).join(format!("{disk}.lease"));
                let odir = crate::safefs::Dir::open(&dir.join(OWNERS_DIR))
                    .map_err(|e| format!("opening {}: {e}", dir.join(OWNERS_DIR).display()))?;
                let f = open_or_create(&odir, &format!("{disk}.lease"))
                    .map_err(|e| format!("opening {}: {e}", path.display()))?;
                f.write_all_at(&lease.encode(), 0)
                    .map_err(|e| format!("writing {}: {e}", path.display()))
            }
            Kind::Rados {
                url, pool, cookie, ..
            } => {
                let op = WriteOp::new()
                    .assert_locked(&disk_lock_name(disk), cookie)
                    .omap_set(&[(&lease_key(disk), &lease.encode())])
                    .map_err(|e| format!("building the lease renewal of {disk}: {e}"))?;
                match pool.operate(&url.meta_oid(), op) {
                    Ok(_) => Ok(()),
                    Err(e) if e.is_blocklisted() => {
                        let why = "this client is fenced (blocklisted): another daemon took the \
                                   disk over"
                            .to_string();
                        self.mark_lost(disk, &why);
                        Err(why)
                    }
                    Err(e) if [libc::EBUSY, libc::ENOENT, libc::ENOLCK].contains(&e.errno()) => {
                        let why = format!("its lock is no longer this daemon's ({e})");
                        self.mark_lost(disk, &why);
                        Err(why)
                    }
                    Err(e) => Err(format!("renewing the lease of {disk}: {e}")),
                }
            }
        }
    }

    fn read_lease(&self, disk: &str) -> Result<Option<Lease>> {
        match &self.kind {
            Kind::File { dir, .. } => {
                let path = dir.join(OWNERS_DIR).join(format!("{disk}.lease"));
                let f = match crate::safefs::open_file(&path, false) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io_err(format!("opening {}", path.display()))(e)),
                };
                let len = f
                    .metadata()
                    .map_err(io_err(format!("reading {}", path.display())))?
                    .len();
                if len == 0 {
                    // Created, not written yet.
                    return Ok(None);
                }
                // A record of another length is refused (the owner writes 24 bytes at once).
                let mut b = vec![0u8; usize::try_from(len.min(4096)).unwrap_or(4096)];
                f.read_exact_at(&mut b, 0)
                    .map_err(io_err(format!("reading {}", path.display())))?;
                Lease::decode(&b)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))
            }
            Kind::Rados { url, pool, .. } => {
                let key = lease_key(disk);
                let kv = pool
                    .omap_get(&url.meta_oid(), &key)
                    .map_err(|e| crate::rados::rados_err(format!("reading {disk}'s lease"), e))?;
                kv.iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| Lease::decode(v))
                    .transpose()
            }
        }
    }

    /// On a file store, kills the process holding `disk`'s lock (a hung owner on this host)
    /// and waits until the lock is free. Returns what was fenced.
    fn kill_file_owner(&self, disk: &str, may_kill: bool) -> Result<Option<String>> {
        let Kind::File { dir, .. } = &self.kind else {
            return Ok(None);
        };
        let path = dir.join(OWNERS_DIR).join(format!("{disk}.lock"));
        let f = match crate::safefs::open_file(&path, false) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("opening {}", path.display()))(e)),
        };
        let Some(pid) = flock_holder(&f).map_err(io_err("reading /proc/locks"))? else {
            return Ok(None);
        };
        if pid <= 1 || pid as u32 == std::process::id() {
            return Err(StoreError::Invalid(format!(
                "disk {disk}'s lock is held by pid {pid}, which this daemon does not fence"
            )));
        }
        if !may_kill {
            return Err(StoreError::Invalid(format!(
                "disk {disk}'s lock is held by pid {pid}, a hung owner this process may not \
                 fence (it may signal no other process): stop pid {pid}, then take the disk \
                 over"
            )));
        }
        // SAFETY: kill only sends a signal; `pid` is the process /proc/locks names as holding
        // the disk's lock (a hung owner: its lease was not renewed for the timeout).
        if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(io_err(format!("fencing pid {pid} (SIGKILL)"))(e));
            }
        }
        warn!("disk {disk}: fenced its hung owner, pid {pid}, with SIGKILL");
        let deadline = Instant::now() + Duration::from_secs(10);
        while flock_holder(&f).map_err(io_err("reading /proc/locks"))? == Some(pid) {
            if Instant::now() > deadline {
                return Err(StoreError::Invalid(format!(
                    "pid {pid} still holds disk {disk}'s lock 10 s after SIGKILL"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Some(format!("pid {pid}")))
    }
}

impl Store {
    /// Renews the lease of every disk this handle owns. Returns the disks whose renewal
    /// failed, with why (on RADOS a refusal means the disk was lost: fenced, or its lock
    /// broken; it is marked lost as [`Store::check_owned`] does).
    pub fn renew_leases(&self) -> Vec<(String, String)> {
        let Some(m) = self.multi.get() else {
            return Vec::new();
        };
        let disks: Vec<String> = m
            .owned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut failed = Vec::new();
        for d in disks {
            let lease = Lease {
                counter: RENEWALS.fetch_add(1, Ordering::Relaxed) + 1,
                unix_ms: unix_ms(),
                pid: u64::from(std::process::id()),
            };
            if let Err(why) = m.renew_one(&d, &lease) {
                failed.push((d, why));
            }
        }
        failed
    }

    /// Disk `disk`'s lease record as stored now (`None`: never written).
    pub fn disk_lease(&self, disk: &str) -> Result<Option<Lease>> {
        check_disk_name(disk)?;
        self.multi()?.read_lease(disk)
    }

    /// Takes over disk `disk`, whose owner's lease the caller saw unrenewed for its timeout:
    /// the owner fenced first (on RADOS as [`Store::take_over_disk`] does; on a file store the
    /// process holding the lock, a hung one on this host, is killed), then the disk acquired.
    /// Returns what was fenced. `may_kill`: whether this process may signal another (a
    /// seccomp filter that allows signals to this process only makes it `false`: a file
    /// store's live holder is then refused, named, rather than signalled).
    pub fn take_over_expired(&self, disk: &str, may_kill: bool) -> Result<Vec<String>> {
        let m = self.multi()?;
        check_disk_name(disk)?;
        let mut fenced = Vec::new();
        if let Some(killed) = m.kill_file_owner(disk, may_kill)? {
            fenced.push(killed);
        }
        fenced.extend(self.take_over_disk(disk, None)?);
        Ok(fenced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_record_round_trips_and_a_wrong_length_is_refused() {
        let l = Lease {
            counter: 7,
            unix_ms: 1_700_000_000_123,
            pid: 4242,
        };
        assert_eq!(Lease::decode(&l.encode()).expect("decode"), l);
        assert!(Lease::decode(&l.encode()[..23]).is_err());
        assert!(Lease::decode(&[0u8; 25]).is_err());
    }
}
