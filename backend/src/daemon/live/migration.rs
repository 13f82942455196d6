//! A live disk's migration and promote: the copy-out or copy-on-read job, its record, the
//! verification pass and the role swap (the decisions: `dovetail_migrate::promote`).

use super::*;

impl LiveDisk {
    /// `migrate`: starts migrating every block to the candidate. `copy-out` runs the background
    /// job (and resumes it after a restart); `upgrade-on-write` lets guest writes alone bring
    /// blocks over (the Tee always does that). A copy-out already running gets the new rate.
    pub fn migrate(&self, mode: &str, rate: Option<u64>) -> Result<MigrationStatus, CommandError> {
        let store = self.store()?;
        let mut set = self.lock();
        if set.voting.is_some() {
            return self.migrate_voting(&set, mode);
        }
        let c = self.active_candidate(&set)?;
        let Some(mode) = MigrationMode::parse(mode) else {
            return Err(CommandError::new(
                ErrorCode::Invalid,
                format!(
                    "unknown migration mode {mode:?}; copy-out, copy-on-read or upgrade-on-write"
                ),
            ));
        };
        let key = c.key;
        if let Some(m) = &set.migration {
            if let (Some(job), true) = (&m.job, m.mode == mode) {
                let complete = c.tee.presence().count() == c.tee.presence().blocks();
                if !job.state().finished() || (job.state() == JobState::Done && complete) {
                    if let Some(r) = rate {
                        // A restart resumes the copy-out at the new rate.
                        write_record(store, key, c.tee.presence().blocks(), mode, r).map_err(
                            |e| {
                                CommandError::new(
                                    ErrorCode::Failed,
                                    format!("recording the new rate: {e}"),
                                )
                            },
                        )?;
                        job.set_rate(r);
                        info!(
                            "disk {}: {} rate changed to {}",
                            self.name,
                            mode.name(),
                            dovetail_migrate::copyout::rate_text(r)
                        );
                    }
                    return Ok(self
                        .migration_of(&set)
                        .unwrap_or_else(|| unreachable_status(key)));
                }
            }
        }
        write_record(
            store,
            key,
            c.tee.presence().blocks(),
            mode,
            rate.unwrap_or(DEFAULT_RATE),
        )
        .map_err(|e| {
            CommandError::new(ErrorCode::Failed, format!("recording the migration: {e}"))
        })?;
        // A job of another mode stops first (what it copied stays).
        if let Some(old) = set.migration.take() {
            old.stop();
        }
        let migration = self.start_migration(&set, mode, rate.unwrap_or(DEFAULT_RATE))?;
        set.migration = Some(migration);
        let message = format!(
            "migration by {} started ({} of {} blocks in the candidate)",
            mode.name(),
            c_present(&set),
            c_total(&set)
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
        Ok(self
            .migration_of(&set)
            .unwrap_or_else(|| unreachable_status(key)))
    }

    pub(super) fn active_candidate<'a>(
        &self,
        set: &'a VersionSet,
    ) -> Result<&'a Candidate, CommandError> {
        let Some(c) = &set.candidate else {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {} has no active candidate; `tee` attaches one",
                    self.name
                ),
            ));
        };
        if c.tee.quarantined() {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {}: candidate {} is quarantined; `untee` drops it",
                    self.name, c.key
                ),
            ));
        }
        Ok(c)
    }

    pub(super) fn start_migration(
        &self,
        set: &VersionSet,
        mode: MigrationMode,
        rate: u64,
    ) -> Result<Migration, CommandError> {
        let c = self.active_candidate(set)?;
        let job = match mode {
            MigrationMode::UpgradeOnWrite => None,
            MigrationMode::CopyOut | MigrationMode::CopyOnRead => {
                let upgrade: Arc<dyn dovetail_migrate::Upgrade> = Arc::from(
                    dovetail_migrate::upgrade::for_versions(
                        &set.trusted_layout,
                        set.parallax.clone(),
                        &c.parallax,
                    )
                    .ok_or_else(|| {
                        CommandError::new(
                            ErrorCode::Invalid,
                            format!(
                                "no upgrade from {} to {} is known",
                                set.trusted_layout, c.layout
                            ),
                        )
                    })?,
                );
                let (events, name) = (self.events.clone(), self.name.clone());
                let opts = CopyOutOptions {
                    rate,
                    scope: if mode == MigrationMode::CopyOnRead {
                        dovetail_migrate::Scope::ReadBlocks
                    } else {
                        dovetail_migrate::Scope::Everything
                    },
                    ..CopyOutOptions::default()
                };
                let job = CopyOut::start(
                    &c.tee,
                    upgrade,
                    opts,
                    Box::new(move |state, message| {
                        let kind = match state {
                            JobState::Done => "migration-done",
                            JobState::Cancelled => "migration-cancelled",
                            _ => "migration-stopped",
                        };
                        events.publish(&name, kind, "daemon", message, None, None);
                    }),
                )
                .map_err(|e| CommandError::new(ErrorCode::Failed, error_chain(&e)))?;
                Some(job)
            }
        };
        Ok(Migration { mode, job })
    }

    /// `migrate --pause/--resume/--cancel`.
    pub fn migration_action(&self, action: &str) -> Result<MigrationStatus, CommandError> {
        let store = self.store()?;
        let mut set = self.lock();
        let Some(m) = &set.migration else {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!("disk {} has no migration", self.name),
            ));
        };
        let Some(job) = &m.job else {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {} migrates by upgrade-on-write: there is no job to {action}",
                    self.name
                ),
            ));
        };
        let ok = match action {
            "pause" => job.pause(),
            "resume" => job.resume(),
            "cancel" => {
                job.cancel();
                true
            }
            other => {
                return Err(CommandError::new(
                    ErrorCode::Invalid,
                    format!("unknown migration action {other:?}"),
                ))
            }
        };
        if !ok {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {}: the copy-out is {:?}; cannot {action} it",
                    self.name,
                    job.state()
                ),
            ));
        }
        let status = self.migration_of(&set);
        if action == "cancel" {
            if let Some(c) = &set.candidate {
                remove_record(store, c.key);
            }
            set.migration = None;
        }
        self.events.publish(
            &self.name,
            match action {
                "pause" => "migration-paused",
                "resume" => "migration-resumed",
                _ => "migration-cancelled",
            },
            "daemon",
            format!("copy-out {action}"),
            None,
            None,
        );
        Ok(status.unwrap_or_else(|| unreachable_status(VersionKey(0))))
    }

    pub(super) fn migration_of(&self, set: &VersionSet) -> Option<MigrationStatus> {
        if let Some(v) = &set.voting {
            return Some(super::migrate_voting::voting_migration(v));
        }
        let c = set.candidate.as_ref()?;
        let m = set.migration.as_ref();
        Some(MigrationStatus {
            mode: m.map(|m| m.mode.name()),
            blocks_present: c.tee.presence().count(),
            blocks_total: c.tee.presence().blocks(),
            copy_out: m.and_then(|m| m.job.as_ref()).map(CopyOut::progress),
            verify: self.verify_status(c),
        })
    }

    /// Promote's verification pass of candidate `c`, as `migrate --status` shows it.
    pub(super) fn verify_status(&self, c: &Candidate) -> Option<VerifyStatus> {
        let slot = self.verify.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, p)) = &*slot {
            if *k == c.key {
                return Some(p.status());
            }
        }
        drop(slot);
        let Backing::Store { store } = &self.backing else {
            return None;
        };
        let (r, _) = MigrationRecord::read(&maps_dir(store, c.key), c.key.0).ok()??;
        (r.verified > 0).then(|| VerifyStatus {
            state: "checkpointed",
            blocks_verified: r.verified,
            blocks_total: r.blocks,
            resumed_from: 0,
            mismatched_blocks: 0,
            first_mismatches: Vec::new(),
            rate_limit: 0,
            error: None,
        })
    }

    /// Runs promote's verification pass over the disk's candidate (docs: README, "Migrating a
    /// disk"), without holding the disk's control lock (guest I/O and `status` go on), from the
    /// cursor the migration record checkpointed. `Ok(key)`: every block of candidate `key`
    /// equals the trusted version. A mismatch is an error naming the blocks, logged and
    /// published as a `verify-mismatch` event; the disk stays teed.
    pub(super) fn verify_candidate(
        &self,
        store: &Arc<Store>,
        rate: u64,
    ) -> Result<VersionKey, CommandError> {
        let (tee, key, blocks) = {
            let set = self.lock();
            let c = self.promotable(&set)?;
            (c.tee.clone(), c.key, c.tee.presence().blocks())
        };
        let from = MigrationRecord::verify_from(read_record(store, key).as_ref(), blocks);
        let progress = Arc::new(VerifyProgress::new(blocks, from, rate));
        {
            let mut slot = self.verify.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((k, p)) = &*slot {
                let st = p.status();
                if *k == key && st.state == "running" {
                    return Err(CommandError::new(
                        ErrorCode::Conflict,
                        format!(
                            "disk {}: promote's verification pass is already running ({} of {} \
                             blocks); `migrate --status` shows it",
                            self.name, st.blocks_verified, st.blocks_total
                        ),
                    ));
                }
            }
            *slot = Some((key, progress.clone()));
        }
        info!(
            "disk {}: verifying every block of candidate {key} against the trusted version \
             before promoting it ({}{})",
            self.name,
            dovetail_migrate::copyout::rate_text(rate),
            if from > 0 {
                format!("; resuming at block {from} of {blocks}")
            } else {
                String::new()
            }
        );
        let outcome = dovetail_migrate::verify::run(
            &tee,
            &progress,
            &mut |v| update_record(store, key, blocks, |r| r.verified = v),
            &|| self.stopping.load(Ordering::Relaxed),
        );
        match outcome {
            Outcome::Passed => {
                let message = format!(
                    "verification pass: every block of candidate {key} equals the trusted \
                     version ({blocks} blocks, {:.1} s)",
                    progress.elapsed().as_secs_f64()
                );
                info!("disk {}: {message}", self.name);
                self.events
                    .publish(&self.name, "verify-passed", "daemon", message, None, None);
                Ok(key)
            }
            Outcome::Mismatch { .. } => {
                let message = format!(
                    "disk {}: promote refused: {}; the disk stays teed and serving (`untee` drops \
                     the candidate)",
                    self.name,
                    outcome.describe()
                );
                warn!("{message}");
                self.events.publish(
                    &self.name,
                    "verify-mismatch",
                    "daemon",
                    message.clone(),
                    None,
                    None,
                );
                Err(CommandError::new(ErrorCode::Conflict, message))
            }
            Outcome::Failed(_) | Outcome::Stopped => {
                let message = format!(
                    "disk {}: promote refused: {}",
                    self.name,
                    outcome.describe()
                );
                warn!("{message}");
                Err(CommandError::new(ErrorCode::Failed, message))
            }
        }
    }

    /// The candidate, if it may be promoted: active, holding every block, without fault rules,
    /// and the trusted version without snapshots.
    pub(super) fn promotable<'a>(
        &self,
        set: &'a VersionSet,
    ) -> Result<&'a Candidate, CommandError> {
        let c = self.active_candidate(set)?;
        let snapshots = || {
            set.parallax
                .as_ref()
                .map(|p| p.snapshots().into_iter().map(|s| s.name).collect())
                .unwrap_or_default()
        };
        let ready = promote::check_candidate(
            c.tee.presence().count(),
            c.tee.presence().blocks(),
            c.faulty,
        )
        .and_then(|()| promote::check_snapshots(snapshots()));
        let why = match ready {
            Ok(()) => return Ok(c),
            Err(NotReady::Incomplete { present, total }) => format!(
                "disk {}: the candidate holds {present} of {total} blocks; `migrate` brings \
                 the rest over first",
                self.name
            ),
            Err(NotReady::FaultInjected) => format!(
                "disk {}: the candidate has fault rules injected (testing); it cannot be \
                 promoted",
                self.name
            ),
            Err(NotReady::Snapshots(names)) => format!(
                "disk {}: the trusted version has {} snapshot(s) ({}), which retire with \
                 it; export and delete them first",
                self.name,
                names.len(),
                names.join(", ")
            ),
        };
        Err(CommandError::new(ErrorCode::Conflict, why))
    }

    /// `promote`: once the candidate holds every block, and (unless `no_verify`) the
    /// verification pass found every block equal to the trusted version (at `verify_rate`
    /// bytes per second of each, default [`DEFAULT_VERIFY_RATE`]; 0: no limit), makes it the
    /// trusted version and retires the old one (its grants revoked, its extents freed).
    pub fn promote(
        &self,
        no_verify: bool,
        verify_rate: Option<u64>,
    ) -> Result<(String, Pause), CommandError> {
        self.promote_member(no_verify, verify_rate, None)
    }

    /// [`LiveDisk::promote`], naming the member to promote (a voting Tee's; `None`: the first
    /// candidate that holds every block).
    pub fn promote_member(
        &self,
        no_verify: bool,
        verify_rate: Option<u64>,
        member: Option<u64>,
    ) -> Result<(String, Pause), CommandError> {
        let store = self.store()?;
        {
            let mut set = self.lock();
            if set.voting.is_some() {
                return self.promote_voting(&mut set, store, member);
            }
        }
        let verified = if no_verify {
            warn!(
                "disk {}: promoting without the verification pass (--no-verify): the presence \
                 map is trusted as it is",
                self.name
            );
            None
        } else {
            Some(self.verify_candidate(store, verify_rate.unwrap_or(DEFAULT_VERIFY_RATE))?)
        };
        let mut set = self.lock();
        let c = self.promotable(&set)?;
        if verified.is_some_and(|k| k != c.key) {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {}: the candidate changed during the verification pass; promote again",
                    self.name
                ),
            ));
        }
        if let Some(m) = set.migration.take() {
            m.stop();
        }
        Self::pace(&mut set);
        let Some(c) = set.candidate.take() else {
            return Err(CommandError::new(
                ErrorCode::Failed,
                "the candidate went away",
            ));
        };
        let new_trusted: Arc<dyn BlockLayout> =
            Arc::new(Metered::new(c.parallax.clone(), c.metrics.clone()));
        // Flush both versions before pausing, so the flush inside the pause has little left.
        if let Err(e) = c.tee.flush() {
            warn!(
                "disk {}: flush before promotion: {}",
                self.name,
                error_chain(&e)
            );
        }
        // The old trusted version's tier mover stops (joined) before that version is retired:
        // it must not move blocks into extents about to be freed.
        drop(set.mover.take());
        let (r, pause) = self.switch.pause(|cur| -> Result<_, CommandError> {
            // Every write so far reaches both versions durably, the map is closed cleanly; then
            // one catalog commit swaps the roles. Releasing the old extents' space waits
            // until I/O runs again.
            c.tee
                .close()
                .map_err(|e| CommandError::new(ErrorCode::Failed, error_chain(&e)))?;
            let swapped = store.promote_deferred(&self.name)?;
            dovetail_store::failpoint::hit("promote-retire");
            *cur = new_trusted.clone();
            Ok(swapped)
        });
        let old = match r {
            Ok((old, freed)) => {
                let t = Instant::now();
                let n = freed.len();
                store.release(freed);
                debug!(
                    "disk {}: released the space of {n} extents of {old} in {:.3} ms, after the pause",
                    self.name,
                    t.elapsed().as_secs_f64() * 1e3
                );
                old
            }
            Err(e) => {
                // The catalog was not changed: the Tee is closed, serve the trusted version.
                let trusted = set.trusted.clone();
                self.switch.pause(|cur| *cur = trusted);
                set.mover = set.parallax.clone().and_then(|p| self.start_mover(&p));
                warn!(
                    "disk {}: promotion failed ({}); serving the trusted version alone, the \
                     candidate stays in the catalog",
                    self.name, e.message
                );
                return Err(e);
            }
        };
        if let Some(path) = c.tee.presence().path() {
            let _ = dovetail_migrate::presence::PresenceMap::remove(path);
        }
        remove_record(store, c.key);
        set.trusted = new_trusted;
        set.parallax = Some(c.parallax.clone());
        if let Err(e) = c.parallax.start_reserve() {
            warn!("disk {}: no extent reserve: {e}", self.name);
        }
        set.mover = self.start_mover(&c.parallax);
        set.trusted_metrics = c.metrics.clone();
        set.trusted_key = Some(c.key);
        set.trusted_layout = c.layout.clone();
        let message = format!(
            "promoted candidate {} ({}) to trusted; {old} retired, its extents freed",
            c.key, c.layout
        );
        self.changed(&mut set, "promoted", message.clone(), pause);
        Ok((message, pause))
    }
}
