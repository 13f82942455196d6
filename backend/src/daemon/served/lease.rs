//! Ownership leases on a shared store (docs/format.md, *Lease record*): every daemon renews
//! the lease of each disk it serves every [`LEASE_RENEW`]; a daemon started with `serve
//! --takeover-after DURATION` also watches the disks it was to serve and could not (another
//! daemon owns them) and takes one over, fencing its owner first, when the owner's lease has
//! not changed for DURATION by this daemon's own clock (a lease left by an owner that died and
//! released its lock counts the same). An owner that renews is never taken over; a disk with no
//! lease record at all neither.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dovetail_store::{Lease, LEASE_RENEW, MIN_TAKEOVER_AFTER};
use log::{info, warn};

use super::Daemon;
use crate::daemon::proto::CommandError;

/// Parses `--takeover-after`: a whole number followed by `ms`, `s` or `m` (`s` if none);
/// at least [`MIN_TAKEOVER_AFTER`].
pub fn parse_takeover_after(s: &str) -> Result<Duration, String> {
    let d = crate::daemon::live::parse_span(s)?;
    if d < MIN_TAKEOVER_AFTER {
        return Err(format!(
            "{s:?} is shorter than {MIN_TAKEOVER_AFTER:?}: owners renew their lease every \
             {LEASE_RENEW:?}, and a timeout of fewer than three renewals would take disks from \
             owners that are merely slow"
        ));
    }
    Ok(d)
}

/// What a watcher knows of one disk's lease: the record last read and since when (by this
/// daemon's monotonic clock) it has not changed.
struct Seen {
    lease: Lease,
    since: Instant,
}

impl Daemon {
    /// On a shared store: a thread that renews the lease of every disk served here every
    /// [`LEASE_RENEW`] and, with `takeover_after`, takes over the disks this daemon wants whose
    /// owner's lease was not renewed for that long. Ends when `stop` says so.
    pub fn keep_leases(
        self: &Arc<Self>,
        takeover_after: Option<Duration>,
        stop: impl Fn() -> bool + Send + 'static,
    ) {
        let Some(store) = self.shared_store() else {
            return;
        };
        let daemon = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("lease".into())
            .spawn(move || {
                crate::sandbox::enter(dovetail_store::thread_kind::ThreadKind::Control);
                let mut seen: HashMap<String, Seen> = HashMap::new();
                while !stop() {
                    let Some(daemon) = daemon.upgrade() else {
                        return;
                    };
                    let started = Instant::now();
                    for live in daemon.served() {
                        let s = live.store().map_or_else(|_| store.clone(), Arc::clone);
                        for (d, why) in s.renew_leases() {
                            warn!("disk {d}: lease not renewed: {why}");
                        }
                    }
                    // Disks held for a change without being served (`attach`, `disk-delete`).
                    store.renew_leases();
                    if let Some(after) = takeover_after {
                        daemon.take_over_expired(&store, after, &mut seen);
                    }
                    drop(daemon);
                    std::thread::sleep(LEASE_RENEW.saturating_sub(started.elapsed()));
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start renewing ownership leases: {e}");
        }
    }

    fn take_over_expired(
        &self,
        store: &Arc<dovetail_store::Store>,
        after: Duration,
        seen: &mut HashMap<String, Seen>,
    ) {
        let failed = self.failed();
        seen.retain(|d, _| failed.iter().any(|f| f.name == *d));
        for f in failed {
            let name = f.name.as_str();
            // Only a disk that failed because another daemon owned it (or took it from this
            // one); one that failed to open for another reason waits for `reopen`.
            if !(f.reason.contains("owned by another daemon")
                || f.reason.contains("no longer owns"))
            {
                continue;
            }
            let owner = match store.disk_owner(name) {
                Ok(o) => o,
                Err(e) => {
                    warn!("disk {name}: cannot tell its owner: {e}");
                    continue;
                }
            };
            let lease = match store.disk_lease(name) {
                Ok(l) => l,
                Err(e) => {
                    warn!("disk {name}: cannot read its lease: {e}");
                    continue;
                }
            };
            let Some(lease) = lease else {
                // No lease was ever renewed for it: an owner that renews none (another
                // version) is never taken over automatically.
                seen.remove(name);
                continue;
            };
            // Nobody may hold the lock any more (a file store's dead owner's lock is gone):
            // the lease still has to stay unrenewed for the timeout, so that a disk handed
            // from one daemon to another (a live migration) is not snatched in between.
            let owner = owner.unwrap_or_else(|| "nobody holds its lock now".into());
            let now = Instant::now();
            let s = seen
                .entry(name.to_string())
                .or_insert(Seen { lease, since: now });
            if s.lease != lease {
                *s = Seen { lease, since: now };
                continue;
            }
            let stale = now - s.since;
            if stale < after {
                continue;
            }
            seen.remove(name);
            match self.take_over_stale(store, name, &owner, &lease, stale, after) {
                Ok(msg) => info!("disk {name}: {msg}"),
                Err(e) => warn!("disk {name}: automatic takeover failed: {}", e.message),
            }
        }
    }

    fn take_over_stale(
        &self,
        store: &dovetail_store::Store,
        name: &str,
        owner: &str,
        lease: &Lease,
        stale: Duration,
        after: Duration,
    ) -> Result<String, CommandError> {
        let why = format!(
            "its owner ({owner}) renewed no lease for {:.1} s (--takeover-after {:.1} s; last \
             renewal {} by pid {})",
            stale.as_secs_f64(),
            after.as_secs_f64(),
            lease.counter,
            lease.pid
        );
        warn!("disk {name}: {why}: fencing the owner and taking the disk over");
        // Under a seccomp filter a thread may signal this process only (SECURITY.md): a hung
        // owner on a store directory is then named, not killed.
        let may_kill = crate::sandbox::seccomp_mode() != crate::sandbox::SeccompMode::Trap;
        let fenced = store.take_over_expired(name, may_kill)?;
        let msg = format!(
            "taken over automatically: {why}; fenced {}",
            if fenced.is_empty() {
                "nobody (the owner was gone)".to_string()
            } else {
                fenced.join(", ")
            }
        );
        let served = self.reopen(name)?;
        self.events
            .publish(name, "disk-taken-over", "daemon", msg.clone(), None, None);
        Ok(format!("{msg}; {served}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeover_after_parses_units_and_refuses_short_or_bad_values() {
        assert_eq!(parse_takeover_after("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_takeover_after("4s"), Ok(Duration::from_secs(4)));
        assert_eq!(
            parse_takeover_after("3500ms"),
            Ok(Duration::from_millis(3500))
        );
        assert_eq!(parse_takeover_after("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_takeover_after("2s")
            .expect_err("too short")
            .contains("shorter"));
        assert!(parse_takeover_after("5h").is_err());
        assert!(parse_takeover_after("s").is_err());
        assert!(parse_takeover_after("-5s").is_err());
    }
}
