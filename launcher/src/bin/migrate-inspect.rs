//! migrate-inspect: see `migrate_launcher::cmd::inspect`.

use migrate_launcher::{cli::InspectArgs, cmd, main_with};
use std::process::ExitCode;

fn main() -> ExitCode {
    main_with::<InspectArgs>("inspect", |a| a.json, cmd::inspect::main)
}
