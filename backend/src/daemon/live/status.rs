//! A live disk as `status` and the metrics endpoint report it.

use super::*;

impl LiveDisk {
    /// The trusted version's layout (`raw` for an image file).
    pub fn trusted_layout(&self) -> String {
        self.lock().trusted_layout.clone()
    }

    pub fn status(&self) -> DiskStatus {
        let set = self.lock();
        let candidate = match &self.backing {
            Backing::Image { .. } => None,
            Backing::Store { store, .. } => store.disk(&self.name).ok().and_then(|info| {
                let key = info.candidate?;
                let rec = info.tee.clone();
                let layout = store.version(key).map(|v| v.layout).unwrap_or_default();
                let live = set.candidate.as_ref().filter(|c| c.key == key);
                let quarantined = live.map_or(
                    rec.as_ref()
                        .is_some_and(|r| r.state == TeeState::Quarantined),
                    |c| c.tee.quarantined(),
                );
                Some(CandidateStatus {
                    version: key.0,
                    layout,
                    policy: live.map_or_else(
                        || rec.as_ref().map(|r| r.policy.clone()).unwrap_or_default(),
                        |c| c.tee.policy().to_string(),
                    ),
                    state: if quarantined { "quarantined" } else { "active" },
                    reason: rec.map(|r| r.reason).unwrap_or_default(),
                    blocks_present: live.map_or(0, |c| c.tee.presence().count()),
                    blocks_total: info.size.div_ceil(MAP_BLOCK),
                    counters: live.map(|c| c.tee.counters()),
                })
            }),
        };
        let mut candidate = candidate;
        voting::candidate_of_voting(&set, &mut candidate);
        DiskStatus {
            name: self.name.clone(),
            socket: self.socket.clone(),
            size: self.disk.capacity().0 * SECTOR_SIZE,
            read_only: self.disk.read_only(),
            trusted_version: set.trusted_key.map(|k| k.0),
            trusted_layout: set.trusted_layout.clone(),
            candidate,
            guest_connected: self.connected.load(Ordering::Relaxed),
            guests: self.guests.load(Ordering::Relaxed),
            refused_connections: self.refused.load(Ordering::Relaxed),
            requests: self.disk.metrics().snapshot(),
            pauses: self.switch.pause_stats(),
            migration: self.migration_of(&set),
            request_panics: self.disk.metrics().panics(),
            failed: self.disk.failed().map(str::to_string),
            voting: self.voting_status(&set),
        }
    }

    /// This disk's samples for the Prometheus exposition.
    pub fn render_metrics(&self, out: &mut Exposition) {
        let name = self.name.as_str();
        self.disk.metrics().render(name, out);
        let set = self.lock();
        let trusted_version = set
            .trusted_key
            .map_or_else(|| "image".to_string(), |k| k.0.to_string());
        set.trusted_metrics
            .render(name, &trusted_version, "trusted", &set.trusted_layout, out);
        if let Some(c) = &set.candidate {
            let version = c.key.0.to_string();
            c.metrics
                .render(name, &version, "candidate", &c.layout, out);
        }
        self.render_voting_metrics(&set, out);
        if let Backing::Store { store, .. } = &self.backing {
            let mut keys: Vec<(VersionKey, &str)> = Vec::new();
            if let Some(k) = set.trusted_key {
                keys.push((k, "trusted"));
            }
            if let Some(c) = &set.candidate {
                keys.push((c.key, "candidate"));
            }
            for (k, role) in keys {
                let v = k.0.to_string();
                out.counter(
                    "dovetail_grant_refusals_total",
                    "Writes of a version refused because they fell outside its granted extents.",
                    &[("disk", name), ("version", &v), ("role", role)],
                    store.grant_violations(k),
                );
            }
        }
        let pauses = self.switch.pause_stats();
        out.counter(
            "dovetail_pauses_total",
            "Pauses of a disk's I/O for a live change.",
            &[("disk", name)],
            pauses.pauses,
        );
        out.gauge(
            "dovetail_pause_last_seconds",
            "Length of the disk's last pause.",
            &[("disk", name)],
            pauses.last_us as f64 / 1e6,
        );
        out.gauge(
            "dovetail_pause_max_seconds",
            "Length of the disk's longest pause.",
            &[("disk", name)],
            pauses.max_us as f64 / 1e6,
        );
        out.gauge(
            "dovetail_guest_connected",
            "1 while a guest is attached to the disk.",
            &[("disk", name)],
            if self.connected.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            },
        );
        out.counter(
            "dovetail_guest_refused_total",
            "Connections to the disk's socket refused (closed at once) because a guest was \
             connected already.",
            &[("disk", name)],
            self.refused.load(Ordering::Relaxed),
        );
        if let Some(c) = &set.candidate {
            let t = c.tee.counters();
            let labels = [("disk", name)];
            for (metric, help, v) in [
                (
                    "dovetail_tee_compared_reads_total",
                    "Guest reads compared between the trusted and the candidate version.",
                    t.compared_reads,
                ),
                (
                    "dovetail_tee_compared_bytes_total",
                    "Bytes compared between the trusted and the candidate version.",
                    t.compared_bytes,
                ),
                (
                    "dovetail_tee_mismatches_total",
                    "Reads where the candidate's data differed from the trusted version's.",
                    t.mismatches,
                ),
                (
                    "dovetail_tee_candidate_errors_total",
                    "I/O errors of the candidate.",
                    t.candidate_errors,
                ),
                (
                    "dovetail_tee_candidate_panics_total",
                    "Panics of the candidate.",
                    t.candidate_panics,
                ),
                (
                    "dovetail_tee_grant_refusals_total",
                    "Candidate writes the store refused as outside its grants.",
                    t.grant_refusals,
                ),
                (
                    "dovetail_tee_quarantines_total",
                    "Quarantines of the candidate.",
                    t.quarantines,
                ),
                (
                    "dovetail_tee_backpressure_waits_total",
                    "Requests that waited for the background stream to make room.",
                    t.backpressure_waits,
                ),
                (
                    "dovetail_tee_lazy_regions_checked_total",
                    "Pieces compared by the lazy hash job.",
                    t.lazy_regions_checked,
                ),
            ] {
                out.counter(metric, help, &labels, v);
            }
            out.gauge(
                "dovetail_tee_quarantined",
                "1 when the disk's candidate is quarantined.",
                &labels,
                if c.tee.quarantined() { 1.0 } else { 0.0 },
            );
            out.gauge(
                "dovetail_candidate_blocks",
                "4 KiB blocks the candidate holds (migration progress).",
                &labels,
                c.tee.presence().count() as f64,
            );
            out.gauge(
                "dovetail_disk_blocks",
                "4 KiB blocks of the disk.",
                &labels,
                (self.disk.capacity().0 * SECTOR_SIZE).div_ceil(MAP_BLOCK) as f64,
            );
        }
    }
}
