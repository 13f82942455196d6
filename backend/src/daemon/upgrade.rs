//! The control socket's side of `upgrade`: the command is carried out by the serve command
//! (`face::upgrade`), which installs a hook here while it serves, and the outcome of the last
//! upgrade this process tried, which `hello` reports (a `ctl upgrade` client waits for it).

use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::daemon::proto::{CommandError, ErrorCode, UpgradeArgs};

/// Carries out an `upgrade` request; returns the reply's result.
pub type Hook = Arc<dyn Fn(UpgradeArgs) -> Result<Value, CommandError> + Send + Sync>;

static HOOK: Mutex<Option<Hook>> = Mutex::new(None);
static LAST: Mutex<Value> = Mutex::new(Value::Null);

/// Installs (or with `None` removes) what carries out `upgrade` in this process.
pub fn set_hook(hook: Option<Hook>) {
    *HOOK.lock().unwrap_or_else(|p| p.into_inner()) = hook;
}

/// `upgrade` over the control socket: `not-available` when nothing carries it out (a daemon
/// not started by `serve`).
pub fn request(args: UpgradeArgs) -> Result<Value, CommandError> {
    let hook = HOOK.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match hook {
        Some(h) => h(args),
        None => Err(CommandError::new(
            ErrorCode::NotAvailable,
            "this daemon cannot be upgraded in place",
        )),
    }
}

/// Records the state of the upgrade this process runs or ran (`{"state": ..., ...}`).
pub fn set_last(v: Value) {
    *LAST.lock().unwrap_or_else(|p| p.into_inner()) = v;
}

/// The state of the last upgrade this process tried (`null`: none).
pub fn last() -> Value {
    LAST.lock().unwrap_or_else(|p| p.into_inner()).clone()
}
