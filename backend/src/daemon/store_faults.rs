//! `serve --store-faults RULES`: the store's own file fault layer (`dovetail_store::faultfile`:
//! EIO, ENOSPC, short writes, failed syncs, slow I/O) under a live daemon, switched on and off
//! at run time by the control verb `store-faults` (`ctl store-faults on|off|status`). For
//! tests and the soak only: it is compiled in only with the `failpoints` feature (the crash
//! points' test build); a production build refuses the option and the verb, saying that it
//! lacks fault injection (SECURITY.md).
//!
//! The tier files (the disks' data; not `store.meta`, nor the maps) are opened through one
//! [`FaultFile`](dovetail_store::faultfile::FaultFile) each, all sharing one
//! [`FaultControl`](dovetail_store::faultfile::FaultControl): off at start unless
//! `--store-faults-on` says otherwise.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use dovetail_store::Store;

use crate::daemon::proto::{CommandError, ErrorCode};

/// What a build without fault injection says to `--store-faults`.
pub const NOT_IN_THIS_BUILD: &str = "this build of dovetail has no fault injection (it was \
     built without the `failpoints` feature): --store-faults is for test builds only";

/// Splits `--store-faults` values (each `RULE[;RULE...]`) into rules and checks each; in a
/// build without fault injection, any rule at all is refused ([`NOT_IN_THIS_BUILD`]).
pub fn rules(values: &[String]) -> Result<Vec<String>, String> {
    let rules: Vec<String> = values
        .iter()
        .flat_map(|v| v.split(';'))
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .collect();
    if values.is_empty() {
        return Ok(rules);
    }
    if rules.is_empty() {
        return Err("--store-faults: no rule given".into());
    }
    check(&rules)?;
    Ok(rules)
}

#[cfg(not(feature = "failpoints"))]
fn check(_rules: &[String]) -> Result<(), String> {
    Err(NOT_IN_THIS_BUILD.into())
}

/// Opens the store in `dir` (`direct`: with direct I/O, as `--cache none`) with its tier files
/// wrapped in fault files carrying `rules`, injecting from the start if `on`.
#[cfg(not(feature = "failpoints"))]
pub fn open(
    _dir: &Path,
    _rules: &[String],
    _on: bool,
    _direct: bool,
) -> Result<Arc<Store>, String> {
    Err(NOT_IN_THIS_BUILD.into())
}

/// The control verb: `action` `on`, `off` or `status` (the default); the reply says whether
/// faults are injected, the rules, and the counts.
#[cfg(not(feature = "failpoints"))]
pub fn command(_action: Option<&str>) -> Result<Value, CommandError> {
    Err(CommandError::new(
        ErrorCode::NotAvailable,
        "store-faults: this build of dovetail has no fault injection (it was built without \
         the `failpoints` feature; the verb is for test builds only)",
    ))
}

#[cfg(feature = "failpoints")]
mod armed {
    use std::sync::OnceLock;

    use serde_json::json;

    use dovetail_store::faultfile::{FaultControl, FaultFile, FileFaultRule};

    use super::*;

    /// The rules and the control of this daemon's store (set once, when it is opened).
    struct Armed {
        rules: Vec<FileFaultRule>,
        control: Arc<FaultControl>,
    }

    static ARMED: OnceLock<Armed> = OnceLock::new();

    /// The seed of the rules' generators (`prob=`): fixed, so a run is repeatable as far as
    /// the order of operations is.
    const SEED: u64 = 0x0005_704e_fa17;

    fn parse(rules: &[String]) -> Result<Vec<FileFaultRule>, String> {
        rules
            .iter()
            .map(|r| r.parse::<FileFaultRule>())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("--store-faults: {e}"))
    }

    pub(super) fn check(rules: &[String]) -> Result<(), String> {
        parse(rules).map(|_| ())
    }

    pub fn open(
        dir: &Path,
        rules: &[String],
        on: bool,
        direct: bool,
    ) -> Result<Arc<Store>, String> {
        let parsed = parse(rules)?;
        let control = FaultControl::new();
        if !on {
            control.disable();
        }
        let wrap = |tier: &str, f: Box<dyn dovetail_store::file::StoreFile>| {
            Box::new(FaultFile::new(
                f,
                &format!("tier {tier}"),
                parsed.clone(),
                SEED,
                control.clone(),
            )) as Box<dyn dovetail_store::file::StoreFile>
        };
        let store = Store::open_wrapping_tiers(dir, direct, &wrap)
            .map_err(|e| dovetail_layout::error_chain(&e))?;
        let armed = Armed {
            rules: parsed,
            control: control.clone(),
        };
        if ARMED.set(armed).is_err() {
            return Err("--store-faults: the store was opened with fault injection twice".into());
        }
        log::warn!(
            "store {}: FAULT INJECTION (test build): tier files opened through the fault \
             layer with rules [{}], {} (ctl store-faults on|off)",
            dir.display(),
            rules.join("; "),
            if on {
                "injecting now"
            } else {
                "off until switched on"
            }
        );
        Ok(store)
    }

    pub fn command(action: Option<&str>) -> Result<Value, CommandError> {
        let Some(armed) = ARMED.get() else {
            return Err(CommandError::new(
                ErrorCode::NotAvailable,
                "store-faults: this daemon was started without --store-faults",
            ));
        };
        match action.unwrap_or("status") {
            "on" => {
                armed.control.enable();
                log::warn!("store fault injection switched on");
            }
            "off" => {
                armed.control.disable();
                log::warn!("store fault injection switched off");
            }
            "status" => {}
            other => {
                return Err(CommandError::new(
                    ErrorCode::Invalid,
                    format!(
                        "store-faults: unknown action {} (expected on, off or status)",
                        dovetail_store::names::shown(other)
                    ),
                ))
            }
        }
        let c = armed.control.counts();
        let last = armed.control.events().pop().map(|e| {
            json!({"file": e.file, "op": e.op.name(), "kind": e.kind.name(),
                   "offset": e.offset, "len": e.len, "rule": e.rule})
        });
        Ok(json!({
            "enabled": armed.control.is_enabled(),
            "rules": armed.rules.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "counts": {
                "total": c.total,
                "eio": c.eio,
                "enospc": c.enospc,
                "short_writes": c.short_writes,
                "slow": c.slow,
                "slow_ms": c.slow_ms,
                "reads": c.reads,
                "writes": c.writes,
                "syncs": c.syncs,
                "zero_ranges": c.zero_ranges,
                "lost_syncs": c.lost_syncs,
                "lost_bytes": c.lost_bytes,
            },
            "last": last,
        }))
    }
}

#[cfg(feature = "failpoints")]
use armed::check;
#[cfg(feature = "failpoints")]
pub use armed::{command, open};
