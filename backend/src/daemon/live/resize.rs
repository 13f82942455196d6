//! `resize`: a disk grown while its guest runs, and the guest told.

use std::sync::Arc;

use dovetail_layout::{error_chain, BlockLayout, Sectors, SECTOR_SIZE};
use log::{info, warn};
use serde_json::{json, Value};

use super::{Backing, CommandError, ErrorCode, LiveDisk};
use crate::metrics::Metered;

/// Disk sizes are whole 4 KiB blocks (the store's rule, kept for images too).
const ALIGN: u64 = 4096;

impl LiveDisk {
    /// `resize`: grows the disk to `size` bytes. A raw image file is extended in place; a
    /// store's disk has its new size committed to the catalog first (its intended size: an
    /// open grows the version to it), then, during one pause of its I/O, its trusted version
    /// is flushed, closed and reopened grown (`Parallax::open_grown`, one root-record commit).
    /// Then the device's capacity is raised and the guest told
    /// (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`). Refused, with nothing changed: a size that is
    /// not a multiple of 4 KiB, shrinking, a size beyond what the store holds, a read-only
    /// disk, a teed disk, and a growth the version's snapshots forbid.
    pub fn resize(&self, size: u64) -> Result<Value, CommandError> {
        let invalid = |m: String| CommandError::new(ErrorCode::Invalid, m);
        let conflict = |m: String| CommandError::new(ErrorCode::Conflict, m);
        let name = &self.name;
        if size == 0 || size % ALIGN != 0 {
            return Err(invalid(format!(
                "disk {name}: size {size} is not a positive multiple of {ALIGN} bytes"
            )));
        }
        if self.disk.read_only() {
            return Err(conflict(format!(
                "disk {name} is served read-only: it cannot be resized"
            )));
        }
        let mut set = self.lock();
        let old = self.disk.capacity().0 * SECTOR_SIZE;
        if size < old {
            return Err(invalid(format!(
                "disk {name} is {old} bytes: shrinking it to {size} bytes is not supported \
                 (only growing)"
            )));
        }
        let capacity = Sectors(size / SECTOR_SIZE);
        let (pause, what) = if size == old {
            (None, "already that size")
        } else {
            match &self.backing {
                Backing::Image { path } => {
                    // The image grows in place: no pause, requests past the old end are
                    // refused until the device's capacity is raised below.
                    self.switch.grow(capacity).map_err(|e| {
                        invalid(format!(
                            "disk {name}: cannot grow the image {}: {}",
                            path.display(),
                            error_chain(&e)
                        ))
                    })?;
                    (None, "image file extended")
                }
                Backing::Store { store } => {
                    if let Some(c) = &set.candidate {
                        return Err(conflict(format!(
                            "disk {name} has candidate {} ({}): promote it or drop it \
                             (`untee`), then resize",
                            c.key, c.layout
                        )));
                    }
                    let Some(parallax) = set.parallax.clone() else {
                        return Err(CommandError::new(
                            ErrorCode::Failed,
                            format!("disk {name}: no trusted version is open"),
                        ));
                    };
                    // What open_grown would refuse after the catalog's commit is refused
                    // before it, so the catalog never names a size the version cannot take.
                    crate::ops::diskio::check_grow(&parallax, name, size)?;
                    store.resize_disk(name, size).map_err(|e| {
                        let m = error_chain(&e);
                        match e {
                            dovetail_store::StoreError::Invalid(_) => invalid(m),
                            _ => CommandError::new(ErrorCode::Failed, m),
                        }
                    })?;
                    Self::pace(&mut set);
                    // The mover commits through the old handle: it stops first.
                    drop(set.mover.take());
                    let metrics = set.trusted_metrics.clone();
                    let (opened, pause) = self.switch.pause(|cur| {
                        if let Err(e) = parallax.flush() {
                            return Err(format!("flushing before the grow: {}", error_chain(&e)));
                        }
                        parallax.close();
                        let grown = crate::ops::open::open_disk(store, name)
                            .map_err(|e| error_chain(&e))?;
                        let grown = Arc::new(grown);
                        let served: Arc<dyn BlockLayout> =
                            Arc::new(Metered::new(grown.clone(), metrics.clone()));
                        *cur = served.clone();
                        Ok((grown, served))
                    });
                    let (grown, served) = match opened {
                        Ok(v) => v,
                        Err(why) => {
                            // The catalog holds the new size: the next open grows the version.
                            warn!(
                                "disk {name}: the grow to {size} bytes failed: {why}; its \
                                 flushes fail until it is reopened"
                            );
                            return Err(CommandError::new(
                                ErrorCode::Failed,
                                format!(
                                    "disk {name}: the catalog says {size} bytes, but growing \
                                     the version failed: {why}; `ctl reopen` or a restart \
                                     finishes the grow"
                                ),
                            ));
                        }
                    };
                    if let Err(e) = grown.start_reserve() {
                        warn!("disk {name}: no extent reserve: {e}");
                    }
                    set.trusted = served;
                    set.parallax = Some(grown.clone());
                    set.mover = self.start_mover(&grown);
                    self.switch.raise_capacity(capacity);
                    (Some(pause), "version reopened grown")
                }
            }
        };
        let told = size != old
            && match self.disk.grow(capacity) {
                Ok(told) => told,
                Err(why) => {
                    warn!("disk {name}: {why}");
                    false
                }
            };
        let message = format!(
            "grown from {} to {} ({what}){}",
            dovetail_store::human_size(old),
            dovetail_store::human_size(size),
            if told {
                "; the guest was told"
            } else if size == old {
                ""
            } else {
                "; no guest to tell"
            }
        );
        if let Some(p) = pause {
            self.changed(&mut set, "resized", message.clone(), p);
        } else if size != old {
            info!("disk {name}: {message}");
            self.events
                .publish(name, "resized", "daemon", message.clone(), None, None);
        }
        Ok(json!({
            "message": message,
            "old_size": old,
            "size": size,
            "guest_told": told,
            "pause": pause,
        }))
    }
}
