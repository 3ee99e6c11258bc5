//! Where libmigrate.so lives and the environment a managed process runs with.

use crate::exit::{fail, TARGET};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// The file name cargo gives the libmigrate cdylib.
pub const LIB_NAME: &str = "libmigrate.so";
/// The glibc tunable that keeps glibc from registering rseq areas.
pub const RSEQ_TUNABLE: &str = "glibc.pthread.rseq=0";

/// Finds libmigrate.so: `$MIGRATE_LIB` if set, else next to the running executable, else in
/// `<exe dir>/../lib/migrate/`. Returns the absolute, canonical path (exit code 4 if absent).
pub fn find_libmigrate() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MIGRATE_LIB").filter(|p| !p.is_empty()) {
        return std::fs::canonicalize(&p).map_err(|e| {
            fail(
                TARGET,
                format!(
                    "MIGRATE_LIB={} cannot be used ({e}); point it at libmigrate.so or unset it",
                    Path::new(&p).display()
                ),
            )
        });
    }
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .map_err(|e| fail(TARGET, format!("cannot locate the running executable ({e}); set MIGRATE_LIB")))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    for candidate in [dir.join(LIB_NAME), dir.join("../lib/migrate").join(LIB_NAME)] {
        if candidate.is_file() {
            if let Ok(c) = std::fs::canonicalize(&candidate) {
                return Ok(c);
            }
        }
    }
    Err(fail(
        TARGET,
        format!(
            "cannot find {LIB_NAME} next to {}; build the workspace (cargo build) or set MIGRATE_LIB",
            exe.display()
        ),
    ))
}

/// LD_PRELOAD with `lib` first: any other occurrence of it is dropped, other entries keep
/// their order.
pub fn prepend_preload(lib: &Path, existing: Option<&OsStr>) -> OsString {
    let mut out = lib.as_os_str().to_os_string();
    if let Some(existing) = existing {
        for entry in existing.as_bytes().split(|&b| b == b':' || b == b' ') {
            if entry.is_empty() || entry == lib.as_os_str().as_bytes() {
                continue;
            }
            out.push(":");
            out.push(OsStr::from_bytes(entry));
        }
    }
    out
}

/// GLIBC_TUNABLES with rseq registration turned off (appended, so it wins over an earlier
/// setting).
pub fn with_rseq_off(existing: Option<&OsStr>) -> OsString {
    match existing {
        None => OsString::from(RSEQ_TUNABLE),
        Some(e) if e.is_empty() => OsString::from(RSEQ_TUNABLE),
        Some(e) => {
            let already = e.as_bytes().split(|&b| b == b':').next_back() == Some(RSEQ_TUNABLE.as_bytes());
            if already {
                e.to_os_string()
            } else {
                let mut v = e.as_bytes().to_vec();
                v.push(b':');
                v.extend_from_slice(RSEQ_TUNABLE.as_bytes());
                OsString::from_vec(v)
            }
        }
    }
}

/// Sets `ADDR_NO_RANDOMIZE` (and the other bits of `persona`) for this process and what it
/// execs.
pub fn set_personality(persona: Option<u64>) -> anyhow::Result<()> {
    // SAFETY: personality(0xffffffff) only queries the current persona; no memory is involved.
    let current = unsafe { libc::personality(0xffff_ffff) };
    if current < 0 {
        return Err(fail(TARGET, format!("cannot read the personality: {}", std::io::Error::last_os_error())));
    }
    let wanted = persona.unwrap_or(current as u32 as u64) | libc::ADDR_NO_RANDOMIZE as u64;
    // SAFETY: personality(2) takes a flag word and touches no memory of ours; the new persona
    // applies to the next execve.
    let r = unsafe { libc::personality(wanted as libc::c_ulong) };
    if r < 0 {
        return Err(fail(
            TARGET,
            format!("cannot set the personality {wanted:#x}: {}", std::io::Error::last_os_error()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preload_order() {
        let lib = Path::new("/opt/m/libmigrate.so");
        assert_eq!(prepend_preload(lib, None), "/opt/m/libmigrate.so");
        assert_eq!(prepend_preload(lib, Some(OsStr::new(""))), "/opt/m/libmigrate.so");
        assert_eq!(prepend_preload(lib, Some(OsStr::new("/a.so:/b.so"))), "/opt/m/libmigrate.so:/a.so:/b.so");
        assert_eq!(prepend_preload(lib, Some(OsStr::new("/a.so /opt/m/libmigrate.so"))), "/opt/m/libmigrate.so:/a.so");
    }

    #[test]
    fn tunables() {
        assert_eq!(with_rseq_off(None), RSEQ_TUNABLE);
        assert_eq!(with_rseq_off(Some(OsStr::new(RSEQ_TUNABLE))), RSEQ_TUNABLE);
        assert_eq!(
            with_rseq_off(Some(OsStr::new("glibc.malloc.arena_max=2"))),
            "glibc.malloc.arena_max=2:glibc.pthread.rseq=0"
        );
        assert_eq!(
            with_rseq_off(Some(OsStr::new("glibc.pthread.rseq=0:glibc.pthread.rseq=1"))),
            "glibc.pthread.rseq=0:glibc.pthread.rseq=1:glibc.pthread.rseq=0"
        );
    }
}
