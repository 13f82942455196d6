//! `dovetail store ...`, and reading a store beside the daemon that serves it ([`read_store`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dovetail_store::{Store, TierSpec};

use crate::face::cli::StoreCommand;
use crate::face::tables::created_table;
use crate::face::CliError;

/// Reads of a store beside its writer ([`read_store`]) start over at most this many times.
pub const READ_PASSES: u32 = 20;

/// Runs the read-only `f` over the store in `dir`, also while a daemon serves it: then over
/// the last committed state, again if the daemon committed while `f` read (blocks it read may
/// have been reused), until a pass saw no commit.
pub fn read_store<T, E>(dir: &Path, f: impl Fn(&Arc<Store>) -> Result<T, E>) -> Result<T, CliError>
where
    CliError: From<E>,
{
    for pass in 1..=READ_PASSES {
        let store = Store::open_reader(dir)?;
        if !store.beside_writer() {
            return Ok(f(&store)?);
        }
        let read = store.info().generation;
        let r = f(&store).map_err(CliError::from);
        if store.committed_generation()? == read {
            return r;
        }
        std::thread::sleep(Duration::from_millis(u64::from(pass) * 5));
    }
    Err(CliError::KeptChanging(format!(
        "the daemon serving {} committed during each of {READ_PASSES} reads; try again when \
         its disks are quieter, or ask it (`dovetail ctl`)",
        dir.display()
    )))
}

/// Carries out `dovetail store ...`, printing what was done (or the report) on stdout.
pub fn run_store(cmd: StoreCommand) -> Result<(), CliError> {
    match cmd {
        StoreCommand::Create(a) => {
            let store = match a.size {
                Some(size) if a.tiers.is_empty() => Store::create(&a.dir, size.0, a.extent_size.0)?,
                None if !a.tiers.is_empty() => {
                    let tiers: Vec<TierSpec> = a
                        .tiers
                        .iter()
                        .map(|t| TierSpec {
                            name: t.name.clone(),
                            path: t.path.clone(),
                            size: t.size.0,
                        })
                        .collect();
                    Store::create_tiered(&a.dir, &tiers, a.extent_size.0)?
                }
                _ => {
                    return Err(CliError::Invalid(
                        "give either --size or one --tier per tier".into(),
                    ))
                }
            };
            let store = if a.single_instance {
                store.enable_single_instance()?
            } else {
                store
            };
            print!("{}", created_table(&a.dir, &store.info()));
            if store.single_instance() {
                println!("single-instance blocks: on");
            }
            Ok(())
        }
        StoreCommand::Check(a) => {
            let checks = if a.data {
                dovetail_layout::parallax::ParallaxCheck::ALL_DATA
            } else {
                dovetail_layout::parallax::ParallaxCheck::ALL
            };
            let mut report = dovetail_store::check_reader(&a.dir, &checks)?;
            if report.info.is_some() {
                // Presence maps and migration records of the candidates (maps/).
                let keys: Vec<_> = report.versions.iter().map(|v| v.key).collect();
                let (bad, notes) = crate::ops::maps::check(&a.dir, &report.disks, &keys);
                if report.beside_writer {
                    // The daemon may be rewriting them as they are read: worth knowing, not
                    // proof of damage.
                    report.notes.extend(bad.into_iter().map(|b| {
                        format!("{b} (read while the daemon serves the store; check again with it stopped)")
                    }));
                } else {
                    report.violations.extend(bad);
                }
                report.notes.extend(notes);
            }
            println!("{report}");
            if report.is_ok() && report.unchecked.is_some() {
                Err(CliError::NotFullyChecked { dir: a.dir })
            } else if report.is_ok() {
                Ok(())
            } else {
                Err(CliError::Inconsistent {
                    dir: a.dir,
                    count: report.violations.len(),
                })
            }
        }
        StoreCommand::Upgrade(a) => upgrade_store(&a.dir, a.single_instance, a.voting),
        StoreCommand::Takeover(a) => {
            let fenced = dovetail_store::rados::fence_holder(&a.dir)?;
            if fenced.is_empty() {
                println!("nobody held {}", a.dir.display());
            }
            for f in fenced {
                println!("fenced {f} and broke its lock on {}", a.dir.display());
            }
            Ok(())
        }
    }
}

/// `dovetail store upgrade`: opens the store adopting its tier files, and says what it is now.
fn upgrade_store(
    dir: &std::path::Path,
    single_instance: bool,
    voting: bool,
) -> Result<(), CliError> {
    let mut store = Store::open_adopting_tiers(dir)?;
    if single_instance {
        store = store.enable_single_instance()?;
    }
    if voting {
        store = store.enable_members()?;
    }
    let info = store.info();
    println!(
        "store {} is format version {}; its tier files:",
        dir.display(),
        info.format_version
    );
    for t in &info.tiers {
        println!("  tier {}: {}", t.name, t.path.display());
    }
    if store.single_instance() {
        let p = store.pool_status();
        println!(
            "single-instance blocks: on ({} shared blocks in use, {} references)",
            p.used, p.refs
        );
    }
    Ok(())
}
