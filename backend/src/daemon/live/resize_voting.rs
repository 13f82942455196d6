//! `resize` of a disk served through a voting Tee: the Tee closed during the grow's pause and
//! reopened over every member grown to the catalog's new size (`ops::voting::open_voting`
//! opens each member's version grown, `Parallax::open_grown`, and grows its presence map).

use std::sync::Arc;

use dovetail_layout::{error_chain, BlockLayout};
use dovetail_store::Store;

use crate::metrics::VersionMetrics;
use crate::ops::voting::Voting;

/// Closes `v` for the grow: its fills stopped, its queued votes run, every member flushed and
/// its presence map closed, then every member's version closed.
pub(super) fn close(v: &Voting) -> Result<(), String> {
    v.tee.close().map_err(|e| {
        format!(
            "closing the voting Tee before the grow: {}",
            error_chain(&e)
        )
    })?;
    for p in v.ids().iter().filter_map(|m| m.parallax.as_ref()) {
        p.close();
    }
    Ok(())
}

/// The disk's voting Tee again, over its grown `served` trusted version and every member
/// reopened at the catalog's size.
pub(super) fn reopen(
    store: &Arc<Store>,
    name: &str,
    served: Arc<dyn BlockLayout>,
    metrics: Arc<VersionMetrics>,
) -> Result<Voting, String> {
    crate::ops::voting::open_voting(store, name, served, metrics)
        .map_err(|e| format!("reopening the voting Tee grown: {}", error_chain(&e)))?
        .ok_or_else(|| "the catalog no longer lists the voting Tee's members".to_string())
}
