use std::process::ExitCode;

use dovetail_backend::face::cli::{Command, ConfigCommand};
use dovetail_backend::face::disk_cmd::{run_disk, run_migrate, run_promote};
use dovetail_backend::face::serve::{check_args, run_serve, ServeConfig};
use dovetail_backend::face::store_cmd::run_store;

fn main() -> ExitCode {
    // `serve --config FILE` merges the file's options in; otherwise clap's parse.
    let (cli, config_source) = match dovetail_backend::face::config::parse_cli(check_args) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("dovetail: {e}");
            eprintln!("dovetail: the config file has errors: nothing served");
            return ExitCode::FAILURE;
        }
    };
    // The daemon logs what it does; the one-shot store and disk commands print their result on
    // stdout and log only warnings unless RUST_LOG says otherwise.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        Command::Store(_)
        | Command::Disk(_)
        | Command::Ctl(_)
        | Command::Migrate(_)
        | Command::Config(_) => "warn",
        Command::Promote(_) => "info",
        Command::Completions(_) | Command::Man(_) => "warn",
    };
    // RUST_LOG, else the default; `serve --log-level` (and SIGHUP) can change it later.
    dovetail_backend::face::config::init_logging(default_level);
    // A store on RADOS connects as these say (every command taking a store accepts one).
    dovetail_store::rados::set_connection(cli.ceph_conf.clone(), cli.ceph_id.clone());
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
        Command::Serve(args) => ServeConfig::try_from(args).and_then(|mut cfg| {
            cfg.config_source = config_source;
            run_serve(cfg)
        }),
        Command::Config(ConfigCommand::Check(a)) => {
            dovetail_backend::face::config::run_check(&a.file, check_args)
        }
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
