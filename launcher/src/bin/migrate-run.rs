//! migrate-run: see `migrate_launcher::cmd::run`.

use migrate_launcher::{cli::RunArgs, cmd, main_with};
use std::process::ExitCode;

fn main() -> ExitCode {
    main_with::<RunArgs>("run", |_| false, cmd::run::main)
}
