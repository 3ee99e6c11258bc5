//! migrate-resume: see `migrate_launcher::cmd::resume`.

use migrate_launcher::{cli::ResumeArgs, cmd, main_with};
use std::process::ExitCode;

fn main() -> ExitCode {
    main_with::<ResumeArgs>("resume", |a| a.json, cmd::resume::main)
}
