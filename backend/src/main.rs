use std::process::ExitCode;

use clap::Parser;
use dovetail_backend::face::cli::{Cli, Command};
use dovetail_backend::face::disk_cmd::{run_disk, run_migrate, run_promote};
use dovetail_backend::face::serve::{run_serve, ServeConfig};
use dovetail_backend::face::store_cmd::run_store;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs what it does; the one-shot store and disk commands print their result on
    // stdout and log only warnings unless RUST_LOG says otherwise.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        Command::Store(_) | Command::Disk(_) | Command::Ctl(_) | Command::Migrate(_) => "warn",
        Command::Promote(_) => "info",
        Command::Completions(_) | Command::Man(_) => "warn",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .init();
    // Crash points, for the crash suite (a no-op unless built with the `failpoints` feature).
    match dovetail_store::failpoint::setup_from_env() {
        Ok(0) => {}
        Ok(n) => log::warn!("{n} crash point(s) armed from FAILPOINTS"),
        Err(e) => {
            eprintln!("dovetail: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Serve(args) => ServeConfig::try_from(args).and_then(run_serve),
        Command::Store(cmd) => run_store(cmd),
        Command::Disk(cmd) => run_disk(cmd),
        Command::Ctl(args) => dovetail_backend::face::ctl::run_ctl(args),
        Command::Migrate(args) => run_migrate(args),
        Command::Promote(args) => run_promote(args),
        Command::Completions(args) => dovetail_backend::face::kit::run_completions(args),
        Command::Man(args) => dovetail_backend::face::kit::run_man(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dovetail: {}", dovetail_layout::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
