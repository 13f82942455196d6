//! A live disk's tiering: its trusted version's mover (started, reported) and `tiers` (the
//! policy read and changed without a pause, mover rounds and scrubs started).

use super::*;

impl LiveDisk {
    /// Starts the tier mover of `trusted` if it is parallax-v2 and the mover is on; its rounds
    /// and failures become events. `None` when it does not run.
    pub(crate) fn start_mover(&self, trusted: &Arc<Parallax>) -> Option<Mover> {
        let interval = self.mover_interval?;
        if self.disk.read_only() || trusted.tier_status().is_none() {
            return None;
        }
        let (events, name, log) = (
            self.events.clone(),
            self.name.clone(),
            self.mover_log.clone(),
        );
        let relay = move |ev: MoverEvent| match ev {
            MoverEvent::Round {
                promoted,
                demoted,
                placed,
                no_room,
                secs,
            } => {
                {
                    let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                    l.rounds += 1;
                    l.last_round = Some(MoverRound {
                        unix_ms: unix_ms(),
                        promoted,
                        demoted,
                        placed,
                        no_room,
                        secs,
                    });
                }
                // A round that moved nothing is not news (one every interval).
                if promoted + demoted + placed + no_room == 0 {
                    return;
                }
                let message = format!(
                    "mover round: {promoted} blocks promoted to hot, {demoted} demoted to cold, \
                     {placed} placed by policy, {no_room} without room ({secs:.1} s)"
                );
                info!("disk {name}: {message}");
                events.publish(&name, "tiers", "daemon", message, None, None);
            }
            MoverEvent::Failed(why) => {
                let message = format!("tier mover failed (retrying in {interval:?}): {why}");
                warn!("disk {name}: {message}");
                log.lock().unwrap_or_else(|p| p.into_inner()).last_error = Some(MoverError {
                    unix_ms: unix_ms(),
                    message: why,
                });
                events.publish(&name, "tiers-failed", "daemon", message, None, None);
            }
        };
        match trusted.start_mover(interval, Box::new(relay)) {
            Ok(m) => {
                info!(
                    "disk {}: tier mover running every {:.1} s",
                    self.name,
                    interval.as_secs_f64()
                );
                Some(m)
            }
            Err(e) => {
                warn!(
                    "disk {}: cannot start the tier mover: {}",
                    self.name,
                    error_chain(&e)
                );
                None
            }
        }
    }

    /// The tier mover's state, for `tiers`.
    pub(super) fn mover_status(&self, set: &VersionSet) -> MoverStatus {
        let l = self.mover_log.lock().unwrap_or_else(|p| p.into_inner());
        let reason = if set.mover.is_some() {
            None
        } else if self.mover_interval.is_none() {
            Some("disabled (serve --mover-interval 0)".to_string())
        } else if self.disk.read_only() {
            Some("the disk is served read-only".to_string())
        } else {
            Some("it could not be started (see the daemon's log)".to_string())
        };
        MoverStatus {
            state: if set.mover.is_some() {
                "running"
            } else {
                "off"
            },
            reason,
            interval_secs: set
                .mover
                .as_ref()
                .and(self.mover_interval)
                .map(|i| i.as_secs_f64()),
            rounds: l.rounds,
            last_round: l.last_round.clone(),
            last_error: l.last_error.clone(),
        }
    }

    /// The trusted version, if it has block classes (parallax-v2); else why not.
    pub(super) fn tiered(&self, set: &VersionSet) -> Result<Arc<Parallax>, CommandError> {
        self.store().map_err(|e| {
            CommandError::new(
                ErrorCode::Conflict,
                format!("{}; it has no block classes", e.message),
            )
        })?;
        match set.parallax.as_ref() {
            Some(p) if p.tier_status().is_some() => Ok(p.clone()),
            _ => {
                let candidate = set
                    .candidate
                    .as_ref()
                    .filter(|c| c.parallax.tier_status().is_some())
                    .map(|c| {
                        format!(
                            " (its candidate {} is {}: `migrate`, then `promote` it)",
                            c.key, c.layout
                        )
                    })
                    .unwrap_or_default();
                Err(CommandError::new(
                    ErrorCode::Conflict,
                    format!(
                        "disk {} is {}, which has no block classes; upgrade it to \
                         parallax-v2{candidate}",
                        self.name, set.trusted_layout
                    ),
                ))
            }
        }
    }

    /// `tiers`: the trusted version's tiering (policy, tiers, usage, counters, mover), after
    /// carrying out `change`: a policy change is validated as a whole against the store's
    /// tiers and committed (a restart keeps it; the mover moves the blocks it concerns), then
    /// the scrub runs, then the mover is told to run a round. Nothing changes when anything is
    /// wrong. No pause.
    pub fn tiers(&self, change: &TierChange) -> Result<TiersReport, CommandError> {
        change.check()?;
        let invalid = |m: String| CommandError::new(ErrorCode::Invalid, m);
        let set = self.lock();
        let p = self.tiered(&set)?;
        let status = p.tier_status().ok_or_else(|| {
            CommandError::new(
                ErrorCode::Failed,
                format!("disk {}: no tiering status", self.name),
            )
        })?;
        if change.move_now && set.mover.is_none() {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {}: its tier mover is off ({}); nothing to run now",
                    self.name,
                    self.mover_status(&set).reason.unwrap_or_default()
                ),
            ));
        }
        let mut policy = status.policy;
        let mut changes = Vec::new();
        let tier_name = |i: u8| {
            status
                .tiers
                .get(usize::from(i))
                .map_or_else(|| format!("tier {i}"), |t| t.name.clone())
        };
        if let Some(name) = &change.class {
            let class = Class::parse(name).ok_or_else(|| {
                invalid(format!(
                    "unknown block class {}; metadata, hot or cold",
                    dovetail_store::names::shown(name)
                ))
            })?;
            let cn = class.name();
            let cp = &mut policy.classes[class as usize];
            if let Some(n) = change.copies {
                let copies = u8::try_from(n)
                    .ok()
                    .filter(|c| (1..=MAX_COPIES).contains(c))
                    .ok_or_else(|| {
                        invalid(format!("{cn}: {n} copies; 1 to {MAX_COPIES} are allowed"))
                    })?;
                if cp.copies != copies {
                    changes.push(format!("{cn} copies {} -> {copies}", cp.copies));
                    cp.copies = copies;
                }
            }
            if let Some(t) = &change.tier {
                let i = status
                    .tiers
                    .iter()
                    .position(|x| x.name == *t)
                    .and_then(|i| u8::try_from(i).ok())
                    .ok_or_else(|| {
                        invalid(format!(
                            "{cn}: the store has no tier named {t:?} (its tiers: {})",
                            status
                                .tiers
                                .iter()
                                .map(|x| x.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })?;
                if cp.tier != i {
                    changes.push(format!("{cn} tier {} -> {t}", tier_name(cp.tier)));
                    cp.tier = i;
                }
            }
            if let Some(c) = change.compress {
                if c && class != Class::Cold {
                    return Err(invalid(format!("{cn}: only cold data can be compressed")));
                }
                if cp.compress != c {
                    changes.push(format!("{cn} compress {} -> {c}", cp.compress));
                    cp.compress = c;
                }
            }
        }
        if let Some(n) = change.cold_after_secs {
            let secs = u32::try_from(n).ok().filter(|&v| v >= 1).ok_or_else(|| {
                invalid(format!("cold_after_secs {n}: 1 to {} seconds", u32::MAX))
            })?;
            if policy.cold_after_secs != secs {
                changes.push(format!(
                    "cold_after_secs {} -> {secs}",
                    policy.cold_after_secs
                ));
                policy.cold_after_secs = secs;
            }
        }
        if let Some(n) = change.hot_accesses {
            let v = u16::try_from(n)
                .ok()
                .filter(|&v| v >= 1)
                .ok_or_else(|| invalid(format!("hot_accesses {n}: 1 to {}", u16::MAX)))?;
            if policy.hot_accesses != v {
                changes.push(format!("hot_accesses {} -> {v}", policy.hot_accesses));
                policy.hot_accesses = v;
            }
        }
        if let Some(n) = change.move_mib_s {
            let v = u16::try_from(n)
                .ok()
                .filter(|&v| v >= 1)
                .ok_or_else(|| invalid(format!("move_mib_s {n}: 1 to {} MiB/s", u16::MAX)))?;
            if policy.move_mib_s != v {
                changes.push(format!("move_mib_s {} -> {v}", policy.move_mib_s));
                policy.move_mib_s = v;
            }
        }
        if change.changes_policy() && policy != status.policy {
            policy
                .validate(status.tiers.len())
                .map_err(|why| invalid(format!("tiering policy: {why}")))?;
            p.set_tier_policy(policy).map_err(|e| {
                let code = if matches!(e, dovetail_layout::Error::InvalidArgument(_)) {
                    ErrorCode::Invalid
                } else {
                    ErrorCode::Failed
                };
                CommandError::new(code, error_chain(&e))
            })?;
            let message = format!("tiering policy changed: {}", changes.join(", "));
            info!("disk {}: {message}", self.name);
            self.events.publish(
                &self.name,
                "tier-policy-changed",
                "daemon",
                message,
                None,
                None,
            );
        }
        let version = set.trusted_key.map(|k| k.0);
        let layout = set.trusted_layout.clone();
        let kicked = match (&set.mover, change.move_now) {
            (Some(m), true) => {
                m.kick();
                true
            }
            _ => false,
        };
        // The scrub reads every copy of the replicated blocks: not under the disk's control
        // lock, so status and other commands go on meanwhile.
        drop(set);
        let scrub_repairs = change.scrub.then(|| {
            let t = Instant::now();
            let n = p.scrub();
            let message = format!(
                "scrub: {n} bad cop{} rewritten ({:.1} s)",
                if n == 1 { "y" } else { "ies" },
                t.elapsed().as_secs_f64()
            );
            if n > 0 {
                warn!("disk {}: {message}", self.name);
            } else {
                info!("disk {}: {message}", self.name);
            }
            self.events
                .publish(&self.name, "scrubbed", "daemon", message, None, None);
            n
        });
        let status = p.tier_status().ok_or_else(|| {
            CommandError::new(
                ErrorCode::Failed,
                format!("disk {}: no tiering status", self.name),
            )
        })?;
        let mover = self.mover_status(&self.lock());
        Ok(TiersReport {
            version,
            layout,
            status,
            mover,
            changes,
            scrub_repairs,
            kicked,
        })
    }
}
