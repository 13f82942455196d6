//! `takeover` (docs/control.md): on a store shared by several daemons (`serve
//! --shared-store`), a disk another daemon owns is taken over: its owner fenced first, then its
//! lock taken and the disk served here as `reopen` serves a disk that failed to open.

use log::info;

use super::Daemon;
use crate::daemon::proto::{CommandError, ErrorCode};

impl Daemon {
    /// Takes disk `name` over from the daemon that owns it, fencing that daemon first, and
    /// serves it on the socket it was to be served on. Only a disk this daemon was to serve and
    /// could not (its owner was another daemon: `status` lists it as failed, naming it).
    pub fn take_over(&self, name: &str) -> Result<String, CommandError> {
        let store = {
            let r = self.reopener.lock().unwrap_or_else(|p| p.into_inner());
            r.store.as_ref().map(|sd| sd.store.clone())
        };
        let Some(store) = store else {
            return Err(CommandError::new(
                ErrorCode::NotAvailable,
                "this daemon serves no store: there is no disk to take over",
            ));
        };
        if !store.is_shared() {
            return Err(CommandError::new(
                ErrorCode::Conflict,
                "this daemon holds its store alone (serve --shared-store shares it with other \
                 daemons): every disk of it is this daemon's already",
            ));
        }
        if self.failed_disk(name).is_none() {
            return match self.disk(name) {
                Ok(_) => Err(CommandError::new(
                    ErrorCode::Conflict,
                    format!(
                        "disk {} is served by this daemon already",
                        dovetail_store::names::shown(name)
                    ),
                )),
                Err(e) => Err(e),
            };
        }
        let fenced = store.take_over_disk(name, None)?;
        if !fenced.is_empty() {
            info!("disk {name}: fenced its owner {}", fenced.join(", "));
        }
        let served = self.reopen(name)?;
        Ok(if fenced.is_empty() {
            format!("taken over; {served}")
        } else {
            format!("fenced {} and took it over; {served}", fenced.join(", "))
        })
    }
}
