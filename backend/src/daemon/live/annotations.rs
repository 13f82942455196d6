//! A live disk's parallax-v2 annotations: the versions that keep them, and taint labels.

use super::*;

impl LiveDisk {
    /// The disk's versions that keep annotations (parallax-v2), with their role (`trusted`,
    /// `candidate`), trusted first. A quarantined candidate is left out.
    pub fn annotated_versions(&self) -> Vec<(&'static str, Arc<Parallax>)> {
        let set = self.lock();
        let mut out = Vec::new();
        if let Some(p) = set.parallax.as_ref().filter(|p| p.annotations().is_some()) {
            out.push(("trusted", p.clone()));
        }
        if let Some(c) = set
            .candidate
            .as_ref()
            .filter(|c| !c.tee.quarantined() && c.parallax.annotations().is_some())
        {
            out.push(("candidate", c.parallax.clone()));
        }
        out
    }

    /// `taint`: turns taint label `label` on or off in every parallax-v2 version of the disk
    /// (trusted and candidate), so blocks written meanwhile carry it in both, and it survives
    /// promotion. Each version commits the change before this returns.
    pub fn set_taint(&self, label: &str, on: bool) -> Result<Vec<String>, CommandError> {
        let versions = self.annotated_versions();
        if versions.is_empty() {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                format!(
                    "disk {} has no parallax-v2 version, which is what keeps annotations and \
                     taint labels; `tee --candidate parallax-v2` adds one",
                    self.name
                ),
            ));
        }
        let mut done = Vec::new();
        if !on
            && !versions
                .iter()
                .any(|(_, p)| p.labels().iter().any(|l| l.name == label))
        {
            return Err(CommandError::new(
                ErrorCode::Invalid,
                format!("disk {} has no taint label named {label:?}", self.name),
            ));
        }
        for (role, p) in versions {
            if !on && !p.labels().iter().any(|l| l.name == label) {
                continue;
            }
            p.set_taint(label, on).map_err(|e| {
                let code = if matches!(e, dovetail_layout::Error::InvalidArgument(_)) {
                    ErrorCode::Invalid
                } else {
                    ErrorCode::Failed
                };
                CommandError::new(code, format!("{role}: {}", error_chain(&e)))
            })?;
            done.push(role.to_string());
        }
        let message = format!(
            "taint label {label:?} {} in the {} version(s)",
            if on { "on" } else { "off" },
            done.join(" and ")
        );
        info!("disk {}: {message}", self.name);
        self.events.publish(
            &self.name,
            if on { "taint-on" } else { "taint-off" },
            "daemon",
            message,
            None,
            None,
        );
        Ok(done)
    }
}
