//! The machine: description for the report, file-system checks, page-cache dropping, PATH lookup.

use anyhow::{Context, Result};
use serde::Serialize;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What the report says about the machine.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub nproc: usize,
    pub kernel: String,
    /// Where the images were written.
    pub image_dir: PathBuf,
    /// The image directory's file system ("tmpfs", or its magic number in hex).
    pub image_fs: String,
    /// Whether the page cache was dropped before each measured operation.
    pub drop_caches: bool,
    pub runs_per_size: u32,
    /// "criu not found", "criu check failed: ...", or the version of the criu used.
    pub criu: String,
    /// The workload's memory: "random" or "mixed" (workload.c).
    pub memory: String,
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

pub fn nproc() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
}

/// The file system type of `path`: "tmpfs", or its statfs magic number.
#[allow(clippy::unnecessary_cast)] // the integer types of f_type and TMPFS_MAGIC differ between targets
pub fn fs_type(path: &Path) -> Result<String> {
    let c = CString::new(path.as_os_str().as_bytes()).context("path contains a NUL byte")?;
    // SAFETY: an all-zero statfs is a valid value; statfs(2) fills it in.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable statfs; both outlive the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("statfs {}", path.display()));
    }
    let magic = st.f_type as i64;
    Ok(if magic == libc::TMPFS_MAGIC as i64 { "tmpfs".into() } else { format!("0x{magic:x}") })
}

pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no arguments and always succeeds.
    unsafe { libc::geteuid() == 0 }
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches` (BENCHMARKS.md: this VM is backed lazily by host
/// memory, and runs without it are up to 5x slower and noisy).
pub fn drop_caches() -> Result<()> {
    // SAFETY: sync(2) has no arguments and always succeeds.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("cannot write /proc/sys/vm/drop_caches")
}

/// The first executable file called `name` in $PATH.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false))
}

/// Apparent size in bytes of a file, or of all the files under a directory.
pub fn size_of_path(path: &Path) -> Result<u64> {
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for entry in std::fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", path.display()))?;
        total += size_of_path(&entry.path())?;
    }
    Ok(total)
}

/// Removes a file or a directory tree; a path that is already gone is not an error.
pub fn remove_path(path: &Path) -> Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.with_context(|| format!("cannot remove {}", path.display()))
}
