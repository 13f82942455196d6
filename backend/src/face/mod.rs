//! The faces, on top: the command line (clap arguments in [`cli`], the one-shot `store`, `disk`,
//! `migrate` and `promote` commands, `serve`), the `ctl` client and the text and tables they
//! print. They own [`CliError`] and [`Size`]; nothing below imports them.

pub mod bisect_out;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod disk_cmd;
pub mod error;
pub mod kit;
/// The libvirt `<disk>` element (it lives beside the QEMU options in `daemon::vm`, which
/// `attach`'s reply uses too).
pub use crate::daemon::vm as libvirt;
pub mod reload_disks;
pub mod render;
pub mod serve;
pub mod size;
pub mod store_cmd;
pub mod systemd;
pub mod systemd_serve;
pub mod tables;
pub mod top;
pub mod upgrade;
pub mod voting_text;

pub use error::CliError;
pub use size::Size;
