//! The operator's kit generated from the clap definitions: `dovetail completions SHELL` (shell
//! completion scripts, clap_complete) and `dovetail man` (roff manual pages, clap_mangen), so
//! both always match the binary that prints them.

use std::io::Write;

use clap::CommandFactory;

use crate::face::cli::{Cli, CompletionsArgs, ManArgs};
use crate::face::CliError;

/// Prints the completion script for `a.shell` on stdout.
pub fn run_completions(a: CompletionsArgs) -> Result<(), CliError> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "dovetail", &mut out);
    write_stdout(&out)
}

/// Prints dovetail(1) on stdout, or writes every command's page into `a.dir`.
pub fn run_man(a: ManArgs) -> Result<(), CliError> {
    let cmd = Cli::command();
    match a.dir {
        Some(dir) => {
            if !dir.is_dir() {
                return Err(CliError::Invalid(format!(
                    "{} is not a directory (man --dir writes the pages into an existing one)",
                    dir.display()
                )));
            }
            clap_mangen::generate_to(cmd, &dir).map_err(|source| CliError::File {
                op: format!("write the manual pages into {}", dir.display()),
                source,
            })
        }
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .map_err(|source| CliError::File {
                    op: "render the manual page".into(),
                    source,
                })?;
            write_stdout(&out)
        }
    }
}

fn write_stdout(bytes: &[u8]) -> Result<(), CliError> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        // A closed stdout (`| head`) ends the command quietly.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|source| CliError::File {
            op: "write to stdout".into(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_naming_the_subcommands() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "dovetail", &mut out);
            let text = String::from_utf8(out).expect("utf-8");
            for word in ["serve", "store", "disk", "ctl", "completions", "man", "top"] {
                assert!(text.contains(word), "{shell}: no {word}");
            }
        }
    }
}
