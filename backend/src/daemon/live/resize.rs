//! `resize`: a disk grown while its guest runs, and the guest told.

use std::sync::Arc;

use dovetail_layout::{error_chain, BlockLayout, ParallaxOptions, Sectors, SECTOR_SIZE};
use log::{info, warn};
use serde_json::{json, Value};

use super::{Backing, CommandError, ErrorCode, LiveDisk};
use crate::metrics::Metered;

/// Disk sizes are whole 4 KiB blocks (the store's rule, kept for images too).
const ALIGN: u64 = 4096;

impl LiveDisk {
    /// `resize`: grows the disk to `size` bytes. A raw image file is extended in place; a
    /// store's disk has its new size committed to the catalog first (its intended size: an
    /// open grows the version to it), then its trusted version grows in place
    /// (`parallax::grow_live`): the tables of the new size are prepared with I/O running, the
    /// version's state moves into a handle of the new shape during one short pause of its
    /// I/O (reopened grown instead, `Parallax::open_grown`, if that fails), and its pages are
    /// written and committed (one root-record commit) after the pause.
    /// Then the device's capacity is raised and the guest told
    /// (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`). Refused, with nothing changed: a size that is
    /// not a multiple of 4 KiB, shrinking, a size beyond what the store holds, a read-only
    /// disk, and a growth a version's snapshots forbid. A teed disk's Tee is closed during the
    /// pause and its candidate attached again grown (version, presence map, migration record);
    /// a copy-out running stops first and resumes from its record. A voting Tee is closed
    /// during the pause and every member reopened grown (`resize_voting`); each is then
    /// filled over the new blocks from the majority, which votes on them.
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
                    let Some(parallax) = set.parallax.clone() else {
                        return Err(CommandError::new(
                            ErrorCode::Failed,
                            format!("disk {name}: no trusted version is open"),
                        ));
                    };
                    // What open_grown would refuse after the catalog's commit is refused
                    // before it, so the catalog never names a size the version cannot take.
                    crate::ops::diskio::check_grow(&parallax, name, size)?;
                    if let Some(c) = &set.candidate {
                        crate::ops::diskio::check_grow(&c.parallax, name, size)?;
                    }
                    if let Some(v) = &set.voting {
                        for p in v.ids().iter().filter_map(|m| m.parallax.as_ref()) {
                            crate::ops::diskio::check_grow(p, name, size)?;
                        }
                    }
                    store.resize_disk(name, size).map_err(|e| {
                        let m = error_chain(&e);
                        match e {
                            dovetail_store::StoreError::Invalid(_) => invalid(m),
                            _ => CommandError::new(ErrorCode::Failed, m),
                        }
                    })?;
                    Self::pace(&mut set);
                    // The mover and a copy-out commit through the old handles: they stop
                    // first (a copy-out resumes below, from its migration record).
                    drop(set.mover.take());
                    let resume = set.migration.take().map(|m| {
                        let mode = m.mode;
                        m.stop();
                        mode
                    });
                    let old_candidate = set.candidate.take();
                    let old_voting = set.voting.take();
                    let metrics = set.trusted_metrics.clone();
                    // A commit with I/O running, so the one the pause makes before the grow
                    // has only the writes since (an error here is the pause's to report).
                    if old_candidate.is_none() && old_voting.is_none() {
                        if let Err(e) = parallax.flush() {
                            warn!("disk {name}: flushing before the grow: {}", error_chain(&e));
                        }
                    }
                    // The tables of the new size, with I/O running; an error here changes
                    // nothing served (the next open grows the version to the catalog's size).
                    let plan = match parallax.prepare_grow(capacity) {
                        Ok(plan) => Some(plan),
                        Err(e) => {
                            warn!(
                                "disk {name}: cannot prepare the grow in place ({}); the \
                                 version is reopened grown",
                                error_chain(&e)
                            );
                            None
                        }
                    };
                    let (opened, pause) = self.switch.pause(|cur| {
                        if let Some(c) = &old_candidate {
                            // Drains the candidate's stream, flushes both versions, closes
                            // the presence map cleanly.
                            if let Err(e) = c.tee.close() {
                                return Err(format!(
                                    "closing the Tee before the grow: {}",
                                    error_chain(&e)
                                ));
                            }
                            c.parallax.close();
                        }
                        if let Some(v) = &old_voting {
                            // Stops its fills, runs the queued votes, flushes every member
                            // and closes their presence maps; the members' versions are
                            // reopened grown below.
                            super::resize_voting::close(v)?;
                        }
                        if let Err(e) = parallax.flush() {
                            return Err(format!("flushing before the grow: {}", error_chain(&e)));
                        }
                        // Grown in place (its state moves into a new handle of the new
                        // shape: no reopen); the pages and the commit follow the pause.
                        let in_place = plan.and_then(|plan| {
                            parallax
                                .grow_prepared(plan, &ParallaxOptions::default())
                                .map_err(|e| {
                                    warn!(
                                        "disk {name}: growing in place failed ({}); the \
                                         version is reopened grown",
                                        error_chain(&e)
                                    )
                                })
                                .ok()
                        });
                        let was_in_place = in_place.is_some();
                        let grown = match in_place {
                            Some(g) => g,
                            None => {
                                parallax.close();
                                crate::ops::open::open_disk(store, name)
                                    .map_err(|e| error_chain(&e))?
                            }
                        };
                        let grown = Arc::new(grown);
                        let served: Arc<dyn BlockLayout> =
                            Arc::new(Metered::new(grown.clone(), metrics.clone()));
                        // The candidate, its presence map and migration record grow as
                        // they are attached again.
                        let (candidate, voting) = if old_voting.is_some() {
                            let v = super::resize_voting::reopen(
                                store,
                                name,
                                served.clone(),
                                metrics.clone(),
                            )?;
                            (None, Some(v))
                        } else {
                            let c = crate::ops::teed::attach_candidate(store, name, served.clone())
                                .map_err(|e| error_chain(&e))?;
                            (c, None)
                        };
                        *cur = match (&candidate, &voting) {
                            (Some(c), _) => c.tee.clone(),
                            (None, Some(v)) => v.tee.clone(),
                            (None, None) => served.clone(),
                        };
                        Ok((grown, served, candidate, voting, was_in_place))
                    });
                    let (grown, served, candidate, voting, in_place) = match opened {
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
                    if let Some(c) = &candidate {
                        self.forward_tee_events(c);
                    }
                    set.candidate = candidate;
                    if voting.is_some() {
                        set.voting = voting;
                        // Its events relayed again, and every member filled over the new
                        // blocks from the majority (they vote on them from then on).
                        self.resume_voting(&set);
                    }
                    // The pages at their new places and the grown root record, with I/O
                    // running (requests past the old end are refused until the capacity is
                    // raised below, after this commit).
                    if let Err(e) = grown.finish_grow() {
                        warn!(
                            "disk {name}: committing the grow to {size} bytes failed: {}",
                            error_chain(&e)
                        );
                        return Err(CommandError::new(
                            ErrorCode::Failed,
                            format!(
                                "disk {name}: the catalog says {size} bytes, but committing \
                                 the grown version failed: {}; `ctl reopen` or a restart \
                                 finishes the grow",
                                error_chain(&e)
                            ),
                        ));
                    }
                    if let (Some(_), Some(c)) = (resume, &set.candidate) {
                        let rec = super::read_record(store, c.key);
                        if let Some((mode, rate)) = rec.and_then(|r| Some((r.mode?, r.rate))) {
                            match self.start_migration(&set, mode, rate) {
                                Ok(m) => set.migration = Some(m),
                                Err(e) => warn!(
                                    "disk {name}: cannot resume the migration after the grow: {}",
                                    e.message
                                ),
                            }
                        }
                    }
                    self.switch.raise_capacity(capacity);
                    (
                        Some(pause),
                        if in_place {
                            "version grown in place"
                        } else {
                            "version reopened grown"
                        },
                    )
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
