//! Exit codes shared by every migrate command, and the one place that turns an error into
//! the one-line report `migrate-<verb>: error: <message>` plus its code.
//!
//! | code | meaning                                                                            |
//! |------|------------------------------------------------------------------------------------|
//! | 0    | success                                                                            |
//! | 1    | any other failure                                                                  |
//! | 2    | usage: bad arguments or options                                                    |
//! | 3    | the image is invalid: unreadable, not an image, truncated, corrupted, wrong version |
//! | 4    | the target does not match: CPU features, vdso, a missing or changed binary,        |
//! |      | library or open file, libmigrate missing, a program migrate cannot manage          |
//! | 5    | the process is not managed, not found, or belongs to someone else                  |
//! | 6    | the checkpoint failed (as reported by the process) or timed out                    |
//!
//! A resumed program's own exit status becomes migrate-resume's, and a program started by
//! migrate-run keeps its own (both exec the program).

use migrate_image::ImageError;
use std::fmt;
use std::io::Write;
use std::process::ExitCode;

pub const OK: u8 = 0;
pub const OTHER: u8 = 1;
pub const USAGE: u8 = 2;
pub const IMAGE: u8 = 3;
pub const TARGET: u8 = 4;
pub const PROCESS: u8 = 5;
pub const CHECKPOINT: u8 = 6;

/// The exit-code table, appended to every command's `--help`.
pub const HELP: &str = "\
Exit codes:
  0  success
  1  any other failure
  2  usage: bad arguments or options
  3  the image is invalid: unreadable, not an image, truncated, corrupted, unsupported version
  4  the target does not match: CPU features, vdso, a missing or changed binary, library or
     open file, libmigrate missing, or a program migrate cannot manage (static, setuid)
  5  the process is not managed by migrate, does not exist, or belongs to another user
  6  the checkpoint failed (as reported by the process) or timed out
migrate-run and migrate-resume exec the program: its own exit status becomes theirs.";

/// An error that carries the exit code it must produce. Attach one with [`fail`] or
/// [`WithCode::code`]; context added on top keeps the code.
#[derive(Debug)]
pub struct Coded {
    pub code: u8,
    pub error: anyhow::Error,
}

impl fmt::Display for Coded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for Coded {}

/// An error with a message and an exit code.
pub fn fail(code: u8, message: impl fmt::Display) -> anyhow::Error {
    anyhow::Error::new(Coded { code, error: anyhow::anyhow!("{message}") })
}

/// Attaches an exit code to any error.
pub trait WithCode<T> {
    fn code(self, code: u8) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> WithCode<T> for Result<T, E> {
    fn code(self, code: u8) -> anyhow::Result<T> {
        self.map_err(|e| anyhow::Error::new(Coded { code, error: e.into() }))
    }
}

/// The exit code for an image error.
pub fn image_error_code(e: &ImageError) -> u8 {
    match e {
        ImageError::Encode(_) | ImageError::Write(_) => OTHER,
        ImageError::Io { .. }
        | ImageError::NotAnImage { .. }
        | ImageError::NewerVersion { .. }
        | ImageError::OlderVersion { .. }
        | ImageError::Truncated { .. }
        | ImageError::Corrupted { .. }
        | ImageError::Malformed { .. }
        | ImageError::MissingSection { .. } => IMAGE,
    }
}

/// The exit code an error produces: the outermost explicit code, else the image error's,
/// else [`OTHER`].
pub fn code_of(e: &anyhow::Error) -> u8 {
    if let Some(c) = e.downcast_ref::<Coded>() {
        return c.code;
    }
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<Coded>() {
            return c.code;
        }
        if let Some(ie) = cause.downcast_ref::<ImageError>() {
            return image_error_code(ie);
        }
    }
    OTHER
}

/// The one-line message of an error (causes joined with ": ", newlines flattened).
pub fn message_of(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    text.split('\n').map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

/// Reports an error as `migrate-<verb>: error: <message>` on stderr (and, with `json`, as
/// `{"error": ..., "code": ...}` on stdout) and returns its exit code.
pub fn report(verb: &str, e: &anyhow::Error, json: bool) -> ExitCode {
    let code = code_of(e);
    report_message(verb, &message_of(e), code, json)
}

/// Like [`report`] for a plain message.
pub fn report_message(verb: &str, message: &str, code: u8, json: bool) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "migrate-{verb}: error: {message}");
    if json {
        let v = serde_json::json!({ "error": message, "code": code });
        let _ = writeln!(std::io::stdout(), "{v}");
    }
    ExitCode::from(code)
}

/// Prints a warning line on stderr.
pub fn warn(verb: &str, message: &str) {
    let _ = writeln!(std::io::stderr(), "migrate-{verb}: warning: {message}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use std::path::PathBuf;

    fn p() -> PathBuf {
        PathBuf::from("/x.img")
    }

    #[test]
    fn image_errors_map_to_image_code() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let cases = [
            ImageError::Io { path: p(), source: io },
            ImageError::NotAnImage { path: p() },
            ImageError::NewerVersion { path: p(), found: 2, supported: 1 },
            ImageError::OlderVersion { path: p(), found: 0, oldest: 1 },
            ImageError::Truncated { path: p(), detail: "x".into() },
            ImageError::Corrupted { path: p(), what: "header".into(), stored: 1, computed: 2 },
            ImageError::Malformed { path: p(), what: "m".into(), detail: "d".into() },
            ImageError::MissingSection { path: p(), kind: migrate_image::SectionKind::Meta { proc: 0 } },
        ];
        for e in cases {
            assert_eq!(image_error_code(&e), IMAGE, "{e}");
            let any = anyhow::Error::new(e).context("while resuming");
            assert_eq!(code_of(&any), IMAGE);
        }
        assert_eq!(image_error_code(&ImageError::Encode("x".into())), OTHER);
    }

    #[test]
    fn explicit_codes_survive_context() {
        let e = fail(TARGET, "cpu").context("checking the target");
        assert_eq!(code_of(&e), TARGET);
        let r: Result<(), std::io::Error> = Err(std::io::Error::other("boom"));
        let e = r.code(PROCESS).context("outer").unwrap_err();
        assert_eq!(code_of(&e), PROCESS);
        assert_eq!(message_of(&e), "outer: boom");
        assert_eq!(code_of(&anyhow::anyhow!("plain")), OTHER);
    }

    #[test]
    fn messages_are_one_line() {
        let e = anyhow::anyhow!("first\nsecond");
        assert_eq!(message_of(&e), "first; second");
    }
}
