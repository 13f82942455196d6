use std::process::ExitCode;

use clap::Parser;
use dovetail_backend::cli::{run_serve, Cli, Command, ServeConfig};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let Command::Serve(args) = Cli::parse().command;
    let result = ServeConfig::try_from(args).and_then(run_serve);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dovetail: {}", dovetail_layout::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
