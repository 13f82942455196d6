//! `bisect`: which guest request first made a teed disk's versions disagree on a block
//! (`ops::bisect`, `dovetail_migrate::bisect`).

use serde_json::{json, Value};

use super::{CommandError, ErrorCode, LiveDisk};

impl LiveDisk {
    /// `bisect`: replays the Tee's request journal against fresh versions and names the first
    /// request after which the versions' views of `block` differ (or of the block its first
    /// mismatch names). Runs without the disk's control lock: the guest's I/O goes on, and the
    /// journal is read as one snapshot. The reply carries the whole report and where it was
    /// saved.
    pub fn bisect(&self, block: Option<u64>) -> Result<Value, CommandError> {
        let store = self.store()?.clone();
        let tee = {
            let set = self.lock();
            match (&set.candidate, &set.voting) {
                (Some(c), _) => c.tee.clone(),
                (None, Some(v)) => {
                    let (tee, ids) = (v.tee.clone(), v.ids());
                    drop(set);
                    return self.bisect_voting(&store, (&tee, &ids), block);
                }
                (None, None) => {
                    return Err(CommandError::new(
                        ErrorCode::Conflict,
                        format!(
                            "disk {} has no candidate: bisection compares a Tee's versions",
                            self.name
                        ),
                    ))
                }
            }
        };
        let done = crate::ops::bisect::run(&store, &tee, &self.name, block).map_err(|m| {
            CommandError::new(ErrorCode::Invalid, format!("disk {}: {m}", self.name))
        })?;
        let (file, not_saved) = match done.file {
            Ok(f) => (Some(f), None),
            Err(why) => (None, Some(why)),
        };
        Ok(json!({
            "report": done.report,
            "file": file,
            "not_saved": not_saved,
        }))
    }
}

impl LiveDisk {
    /// `bisect` of a voting Tee: names the first request after which a member's view of the
    /// block left the majority (the member of the Tee's first lost vote, when no block is
    /// named), replayed against fresh members of every member's layout.
    fn bisect_voting(
        &self,
        store: &std::sync::Arc<dovetail_store::Store>,
        v: (
            &std::sync::Arc<dovetail_migrate::VotingTee>,
            &[crate::ops::voting::MemberId],
        ),
        block: Option<u64>,
    ) -> Result<Value, CommandError> {
        let done = crate::ops::bisect_members::run(store, v, &self.name, block).map_err(|m| {
            CommandError::new(ErrorCode::Invalid, format!("disk {}: {m}", self.name))
        })?;
        let (file, not_saved) = match done.file {
            Ok(f) => (Some(f), None),
            Err(why) => (None, Some(why)),
        };
        Ok(json!({
            "report": done.report,
            "file": file,
            "not_saved": not_saved,
        }))
    }
}
