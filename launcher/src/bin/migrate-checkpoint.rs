//! migrate-checkpoint: see `migrate_launcher::cmd::checkpoint`.

use migrate_launcher::{cli::CheckpointArgs, cmd, main_with};
use std::process::ExitCode;

fn main() -> ExitCode {
    main_with::<CheckpointArgs>("checkpoint", |a| a.json, cmd::checkpoint::main)
}
