//! The migrate command-line tools: `migrate-run`, `migrate-checkpoint`, `migrate-resume` and
//! `migrate-inspect`. Each binary is a thin main over [`main_with`] and one `cmd::<verb>`
//! module; exit codes are documented in [`exit`].

pub mod cli;
pub mod cmd;
pub mod elf;
pub mod exit;
pub mod host;
pub mod preload;
pub mod signals;
pub mod text;

pub use preload::find_libmigrate;

use clap::Parser;
use std::process::ExitCode;

/// Parses the arguments for `migrate-<verb>`, runs `body`, and turns its error into the
/// one-line report and exit code. Usage errors exit with code 2 on one line too.
pub fn main_with<A: Parser>(verb: &str, json: fn(&A) -> bool, body: fn(A) -> anyhow::Result<()>) -> ExitCode {
    let args = match A::try_parse() {
        Ok(a) => a,
        Err(e) => return usage_error(verb, e),
    };
    let json = json(&args);
    match body(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit::report(verb, &e, json),
    }
}

fn usage_error(verb: &str, e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let _ = e.print();
        return ExitCode::from(exit::USAGE);
    }
    // The first paragraph of clap's report, on one line.
    let rendered = e.render().to_string();
    let first = rendered
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let first = first.strip_prefix("error: ").unwrap_or(&first);
    let first = if first.is_empty() { "invalid arguments" } else { first };
    let json = std::env::args_os().skip(1).take_while(|a| a != "--").any(|a| a == "--json");
    exit::report_message(verb, &format!("{first}; see migrate-{verb} --help"), exit::USAGE, json)
}
