//! `migrate` of a disk served through a voting Tee: a copy-out copies every block each live
//! member lacks from the majority (the Tee's fill, one thread per member), the way a
//! two-version copy-out copies the trusted version's blocks to the candidate; `upgrade-on-write`
//! leaves it to the guest's writes (a voting Tee always makes whole-block writes present).
//! `status`'s `migration` (and `migrate --status`) then counts the blocks of the member holding
//! the fewest, with mode `copy-out` while a fill runs.

use super::*;

impl LiveDisk {
    /// `migrate MODE` of a voting Tee; see the module documentation.
    pub(super) fn migrate_voting(
        &self,
        set: &VersionSet,
        mode: &str,
    ) -> Result<MigrationStatus, CommandError> {
        let Some(v) = set.voting.as_ref() else {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!("disk {} has no voting tee", self.name),
            ));
        };
        let started = match MigrationMode::parse(mode) {
            Some(MigrationMode::CopyOut) => {
                let mut n = 0;
                for i in 1..v.tee.len() {
                    if !v.tee.quarantined(i) && !v.tee.complete(i) && self.start_fill(v, i) {
                        n += 1;
                    }
                }
                n
            }
            Some(MigrationMode::UpgradeOnWrite) => 0,
            Some(MigrationMode::CopyOnRead) => {
                return Err(CommandError::new(
                    ErrorCode::Invalid,
                    format!(
                        "disk {} is served by a voting tee: copy-on-read is not offered there \
                         (copy-out fills every member from the majority)",
                        self.name
                    ),
                ))
            }
            None => {
                return Err(CommandError::new(
                    ErrorCode::Invalid,
                    format!(
                        "unknown migration mode {mode:?}; copy-out, copy-on-read or \
                         upgrade-on-write"
                    ),
                ))
            }
        };
        let mut status = voting_migration(v);
        status.mode = MigrationMode::parse(mode).map(|m| m.name());
        let message = format!(
            "migration by {mode} of the voting tee: {started} member fill(s) started; the \
             member holding the fewest blocks holds {} of {}",
            status.blocks_present, status.blocks_total
        );
        info!("disk {}: {message}", self.name);
        self.events.publish(
            &self.name,
            "migration-started",
            "daemon",
            message,
            None,
            None,
        );
        Ok(status)
    }
}

/// A voting Tee's migration as `status` and `migrate` report it: the live candidate holding
/// the fewest blocks; `mode` `copy-out` while a fill runs.
pub(super) fn voting_migration(v: &crate::ops::voting::Voting) -> MigrationStatus {
    let states = v.tee.members();
    let blocks = v
        .tee
        .capacity()
        .0
        .saturating_mul(SECTOR_SIZE)
        .div_ceil(MAP_BLOCK);
    let present = states
        .iter()
        .skip(1)
        .filter(|s| !s.quarantined)
        .map(|s| s.held_blocks)
        .min()
        .unwrap_or(blocks);
    let filling = !v
        .filling
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_empty();
    MigrationStatus {
        mode: filling.then(|| MigrationMode::CopyOut.name()),
        blocks_present: present,
        blocks_total: blocks,
        copy_out: None,
        verify: None,
    }
}
