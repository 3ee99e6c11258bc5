//! `migrate-run`: start a program with libmigrate preloaded, in place (exec), so that the
//! program keeps migrate-run's PID, standard streams and parent.

use crate::cli::RunArgs;
use crate::elf::{self, Executable};
use crate::exit::{fail, TARGET, USAGE};
use crate::preload::{find_libmigrate, prepend_preload, set_personality, with_rseq_off};
use std::ffi::{CString, OsStr};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The search path execvp uses when PATH is unset.
const DEFAULT_PATH: &str = "/bin:/usr/bin";
/// How many `#!` interpreters deep the checks follow (the kernel's own limit).
const MAX_SCRIPT_DEPTH: usize = 4;

pub fn main(args: RunArgs) -> anyhow::Result<()> {
    let (program, rest) = match args.command.split_first() {
        Some(split) => split,
        None => return Err(fail(USAGE, "no program given; usage: migrate-run [OPTIONS] [--] PROGRAM [ARGS...]")),
    };
    let lib = find_libmigrate()?;
    let path = resolve_program(program)?;
    check_program(&path, 0)?;
    let ckpt_dir = checkpoint_dir(args.ckpt_dir)?;

    let mut cmd = Command::new(&path);
    cmd.arg0(program).args(rest);
    cmd.env("LD_PRELOAD", prepend_preload(&lib, std::env::var_os("LD_PRELOAD").as_deref()));
    cmd.env("GLIBC_TUNABLES", with_rseq_off(std::env::var_os("GLIBC_TUNABLES").as_deref()));
    cmd.env("MIGRATE_CKPT_DIR", &ckpt_dir);
    cmd.env("MIGRATE_SIGNAL", args.signal.to_string());
    // Periodic checkpoints, for the program itself (same pid: we exec), not its descendants.
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    match args.interval {
        Some(secs) => cmd.env(
            "MIGRATE_INTERVAL",
            format!("{}:{}:{me}:{}", (secs * 1000.0) as u64, args.keep, periodic_options(args.fork, args.incremental)),
        ),
        None => cmd.env_remove("MIGRATE_INTERVAL"),
    };
    // The checkpoints the program takes on its own (period, checkpoint signal) are compressed.
    if args.compress {
        cmd.env("MIGRATE_COMPRESS", "1");
    } else {
        cmd.env_remove("MIGRATE_COMPRESS");
    }
    // The program starts a process tree of its own (even under another managed program).
    // SAFETY: getpid has no preconditions. We exec: the program keeps this pid.
    cmd.env("MIGRATE_NEW_TREE", unsafe { libc::getpid() }.to_string());
    // A stale restore request from a resumed parent must not turn this start into a resume.
    cmd.env_remove("MIGRATE_RESTORE");
    cmd.env_remove("MIGRATE_FORCE");
    set_personality(None)?;
    let err = cmd.exec();
    Err(fail(TARGET, format!("cannot execute {}: {err}", path.display())))
}

/// The default checkpoint directory, made absolute: `--ckpt-dir`, else `$MIGRATE_CKPT_DIR`,
/// else the current directory.
fn checkpoint_dir(arg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = match arg {
        Some(d) => d,
        None => match std::env::var_os("MIGRATE_CKPT_DIR").filter(|d| !d.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => PathBuf::from("."),
        },
    };
    if dir.as_os_str().is_empty() {
        return Err(fail(USAGE, "--ckpt-dir is empty; name a directory"));
    }
    std::path::absolute(&dir).map_err(|e| fail(USAGE, format!("cannot make {} absolute: {e}", dir.display())))
}

/// Finds the program like execvp: a name with a '/' is taken as is, anything else is searched
/// in PATH.
pub fn resolve_program(program: &OsStr) -> anyhow::Result<PathBuf> {
    if program.is_empty() {
        return Err(fail(TARGET, "the program name is empty"));
    }
    if program.as_bytes().contains(&b'/') {
        let path = PathBuf::from(program);
        return match fs::metadata(&path) {
            Ok(_) => Ok(path),
            Err(e) => Err(fail(TARGET, format!("cannot run {}: {e}; check the path", path.display()))),
        };
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    let mut not_executable = None;
    for dir in search.as_bytes().split(|&b| b == b':') {
        let dir = if dir.is_empty() { Path::new(".") } else { Path::new(OsStr::from_bytes(dir)) };
        let candidate = dir.join(program);
        match fs::metadata(&candidate) {
            Ok(m) if m.is_file() && is_executable(&candidate) => return Ok(candidate),
            Ok(m) if m.is_file() => {
                not_executable.get_or_insert(candidate);
            }
            _ => {}
        }
    }
    match not_executable {
        Some(p) => Err(fail(TARGET, format!("{} is not executable; chmod +x it", p.display()))),
        None => Err(fail(
            TARGET,
            format!("cannot find {} in PATH; give its path or fix PATH", Path::new(program).display()),
        )),
    }
}

/// Refuses programs that LD_PRELOAD cannot reach: static or foreign ELF files and setuid,
/// setgid or file-capability programs (directly or as a script's interpreter).
pub fn check_program(path: &Path, depth: usize) -> anyhow::Result<()> {
    let shown = path.display();
    let meta = fs::metadata(path).map_err(|e| fail(TARGET, format!("cannot run {shown}: {e}")))?;
    if meta.is_dir() {
        return Err(fail(TARGET, format!("{shown} is a directory, not a program")));
    }
    if !meta.is_file() {
        return Err(fail(TARGET, format!("{shown} is not a regular file")));
    }
    if !is_executable(path) {
        return Err(fail(TARGET, format!("{shown} is not executable; chmod +x it")));
    }
    let mode = meta.permissions().mode();
    let setgid = mode & 0o2000 != 0 && mode & 0o010 != 0;
    if mode & 0o4000 != 0 || setgid {
        let which = if mode & 0o4000 != 0 { "setuid" } else { "setgid" };
        return Err(fail(
            TARGET,
            format!(
                "{shown} is {which}: LD_PRELOAD cannot reach it (the loader ignores it for privileged programs); run a copy without the {which} bit"
            ),
        ));
    }
    if super::resume::has_file_capabilities(path) {
        return Err(fail(
            TARGET,
            format!(
                "{shown} carries file capabilities: LD_PRELOAD cannot reach it (the loader ignores it for privileged programs); run a copy without them"
            ),
        ));
    }
    // An unreadable or odd file is left to exec to judge.
    match elf::classify(path) {
        Ok(Executable::Static) => Err(fail(
            TARGET,
            format!(
                "{shown} is statically linked: LD_PRELOAD cannot reach it; use a dynamically linked build of the program"
            ),
        )),
        Ok(Executable::Foreign { what }) => Err(fail(
            TARGET,
            format!("{shown} is {what}: migrate manages x86_64 programs only (LD_PRELOAD cannot reach it)"),
        )),
        Ok(Executable::Script { interpreter }) if interpreter.is_absolute() && depth < MAX_SCRIPT_DEPTH => {
            check_program(&interpreter, depth + 1).map_err(|e| {
                let why = crate::exit::message_of(&e);
                fail(TARGET, format!("{shown} is a script for {}, and {why}", interpreter.display()))
            })
        }
        _ => Ok(()),
    }
}

/// Whether we may execute `path` (access(2) with X_OK, which honours root's rules).
fn is_executable(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; access(2) only
    // reads it.
    unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
}

/// MIGRATE_INTERVAL's options field: comma-separated `fork`, `incr` (libmigrate's checkpoint/mod.rs).
fn periodic_options(fork: bool, incremental: bool) -> String {
    let mut o: Vec<&str> = Vec::new();
    if fork {
        o.push("fork");
    }
    if incremental {
        o.push("incr");
    }
    o.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn exit_code(e: &anyhow::Error) -> u8 {
        crate::exit::code_of(e)
    }

    #[test]
    fn resolves_like_execvp() {
        let p = resolve_program(OsStr::new("sh")).unwrap();
        assert!(p.ends_with("sh") && p.is_absolute(), "{}", p.display());
        let e = resolve_program(OsStr::new("no-such-program-xyz")).unwrap_err();
        assert_eq!(exit_code(&e), TARGET);
        assert!(format!("{e:#}").contains("in PATH"));
        assert!(resolve_program(OsStr::new("/no/such/thing")).is_err());
    }

    #[test]
    fn refuses_what_preload_cannot_reach() {
        assert!(check_program(Path::new("/bin/sh"), 0).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let stat = dir.path().join("static");
        let mut f = fs::File::create(&stat).unwrap();
        f.write_all(&crate::elf::tests::synthetic_elf(false)).unwrap();
        drop(f);
        fs::set_permissions(&stat, fs::Permissions::from_mode(0o755)).unwrap();
        let e = check_program(&stat, 0).unwrap_err();
        assert!(format!("{e:#}").contains("statically linked"), "{e:#}");

        let script = dir.path().join("script");
        fs::write(&script, format!("#!{}\n", stat.display())).unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let e = check_program(&script, 0).unwrap_err();
        assert!(format!("{e:#}").contains("is a script for"), "{e:#}");

        let suid = dir.path().join("suid");
        fs::copy("/bin/true", &suid).unwrap();
        fs::set_permissions(&suid, fs::Permissions::from_mode(0o4755)).unwrap();
        let e = check_program(&suid, 0).unwrap_err();
        assert!(format!("{e:#}").contains("setuid"), "{e:#}");

        assert!(check_program(dir.path(), 0).is_err());
    }
}
