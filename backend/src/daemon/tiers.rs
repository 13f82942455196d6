//! The daemon's view of tiering: what `tiers` asks for ([`TierChange`]), what it reports
//! ([`TiersReport`], the movers' rounds and errors) and its reply (docs/control.md).

use std::time::Duration;

use dovetail_tiering::{Class, TierStatus};
use serde::Serialize;
use serde_json::{json, Value};

use crate::daemon::proto::{CommandError, ErrorCode};

/// The default of `serve --mover-interval`.
pub const DEFAULT_MOVER_INTERVAL: Duration = Duration::from_secs(10);

/// One round of the tier mover over the disk, as `tiers` reports the last one.
#[derive(Debug, Clone, Serialize)]
pub struct MoverRound {
    /// When it ended.
    pub unix_ms: u64,
    pub promoted: u64,
    pub demoted: u64,
    pub placed: u64,
    /// Blocks that should have moved but found no room on their tier.
    pub no_room: u64,
    pub secs: f64,
}

/// A failure of the tier mover (it retries after its interval).
#[derive(Debug, Clone, Serialize)]
pub struct MoverError {
    pub unix_ms: u64,
    pub message: String,
}

/// What the tier movers of one disk reported.
#[derive(Debug, Default)]
pub(crate) struct MoverLog {
    pub(crate) rounds: u64,
    pub(crate) last_round: Option<MoverRound>,
    pub(crate) last_error: Option<MoverError>,
}

/// A disk's tier mover as `tiers` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct MoverStatus {
    /// `running` or `off`.
    pub state: &'static str,
    /// Why it is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Seconds between rounds (`null` when off).
    pub interval_secs: Option<f64>,
    /// Rounds over the disk completed since the daemon started.
    pub rounds: u64,
    pub last_round: Option<MoverRound>,
    pub last_error: Option<MoverError>,
}

/// What a `tiers` request changes or asks for (every part optional; docs/control.md).
#[derive(Debug, Clone, Default)]
pub struct TierChange {
    /// The class `copies`, `tier` and `compress` are for.
    pub class: Option<String>,
    pub copies: Option<u64>,
    /// A tier of the store, by name.
    pub tier: Option<String>,
    pub compress: Option<bool>,
    pub cold_after_secs: Option<u64>,
    pub hot_accesses: Option<u64>,
    pub move_mib_s: Option<u64>,
    /// Run a round of the mover now.
    pub move_now: bool,
    /// Read every copy of the replicated blocks and rewrite the bad ones.
    pub scrub: bool,
}

impl TierChange {
    /// Checks the shape of the request (what needs what), without the disk.
    pub fn check(&self) -> Result<(), CommandError> {
        let per_class = self.copies.is_some() || self.tier.is_some() || self.compress.is_some();
        match (&self.class, per_class) {
            (None, true) => Err(CommandError::new(
                ErrorCode::BadRequest,
                "tiers: copies, tier and compress set one class's policy; \"class\" names it                  (metadata, hot or cold)",
            )),
            (Some(c), false) => Err(CommandError::new(
                ErrorCode::BadRequest,
                format!(
                    "tiers: class {c:?} is given but nothing to set for it (copies, tier or \
                     compress)"
                ),
            )),
            _ => Ok(()),
        }
    }

    pub(crate) fn changes_policy(&self) -> bool {
        self.class.is_some()
            || self.cold_after_secs.is_some()
            || self.hot_accesses.is_some()
            || self.move_mib_s.is_some()
    }
}

/// What `tiers` did and found.
#[derive(Debug, Clone)]
pub struct TiersReport {
    /// The trusted version's key and layout.
    pub version: Option<u64>,
    pub layout: String,
    pub status: TierStatus,
    pub mover: MoverStatus,
    /// The policy changes made, as `what old -> new`.
    pub changes: Vec<String>,
    /// Copies the scrub rewrote (with `scrub`).
    pub scrub_repairs: Option<u64>,
    /// Whether the mover was told to run a round now.
    pub kicked: bool,
}

/// Serialises a value of ours; our types always serialise.
fn to_json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// A `tiers` result (docs/control.md): the policy with tier names, the store's tiers, where the
/// blocks are, the counters and the mover.
pub fn tiers_result(disk: &str, r: &TiersReport) -> Value {
    let st = &r.status;
    let tier_name = |i: u8| {
        st.tiers
            .get(usize::from(i))
            .map_or_else(|| format!("tier {i}"), |t| t.name.clone())
    };
    let mut policy = serde_json::Map::new();
    for c in Class::ALL {
        let p = st.policy.class(c);
        policy.insert(
            c.name().into(),
            json!({"copies": p.copies, "tier": tier_name(p.tier), "compress": p.compress}),
        );
    }
    policy.insert("cold_after_secs".into(), json!(st.policy.cold_after_secs));
    policy.insert("hot_accesses".into(), json!(st.policy.hot_accesses));
    policy.insert("move_mib_s".into(), json!(st.policy.move_mib_s));
    let tiers: Vec<Value> = st
        .tiers
        .iter()
        .map(|t| json!({"name": t.name, "extents": t.extents, "free": t.free}))
        .collect();
    let usage: Vec<Value> = st
        .usage
        .iter()
        .map(|u| {
            json!({"class": u.class.name(), "compressed": u.compressed, "tier": u.tier,
                   "copies": u.copies, "groups": u.groups, "blocks": u.blocks,
                   "compliant": u.compliant})
        })
        .collect();
    let mut out = json!({
        "disk": disk,
        "version": r.version,
        "layout": r.layout,
        "policy": Value::Object(policy),
        "tiers": tiers,
        "usage": usage,
        "repairs": st.repairs,
        "promoted": st.promoted,
        "demoted": st.demoted,
        "placed": st.placed,
        "compressed_reads": st.compressed_reads,
        "mover": to_json(&r.mover),
        "changed": r.changes,
    });
    let mut said = Vec::new();
    if !r.changes.is_empty() {
        said.push(format!("tiering policy changed: {}", r.changes.join(", ")));
    }
    if let Some(n) = r.scrub_repairs {
        out["scrub_repairs"] = json!(n);
        said.push(format!(
            "scrub rewrote {n} bad cop{}",
            if n == 1 { "y" } else { "ies" }
        ));
    }
    if r.kicked {
        said.push("the mover runs a round now".into());
    }
    if !said.is_empty() {
        out["message"] = json!(said.join("; "));
    }
    out
}
