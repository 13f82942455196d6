//! The faces, on top: the command line (clap arguments, the one-shot `store`, `disk`,
//! `migrate` and `promote` commands, `serve`), the `ctl` client and the tables they print.
//! They own [`CliError`] and [`Size`]; nothing below imports them.

pub mod cli;
pub mod ctl;
