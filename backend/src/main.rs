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
            let mut msg = format!("dovetail: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
