//! Process-wide attributes: identity (pids), executable, argv, cwd, umask, rlimits, personality,
//! the mm fields behind /proc/<pid>/cmdline and environ, and auxv.

use crate::resources::{path_string, Files};
use crate::state;
use crate::sys::{self, fs};
use alloc::string::String;
use alloc::vec::Vec;
use migrate_image::{MmEntry, RlimitEntry};

pub struct ProcessBasics {
    pub exe: u32,
    pub argv: Vec<String>,
    pub cwd: String,
    pub umask: u32,
    pub rlimits: Vec<RlimitEntry>,
    pub personality: u32,
    pub mm: MmEntry,
    pub auxv: Vec<u64>,
}

/// The mm fields from /proc/self/stat (fields after the command name) and the current brk.
pub fn read_mm() -> Result<MmEntry, String> {
    let stat = fs::read_file(b"/proc/thread-self/stat")
        .map_err(|e| alloc::format!("cannot read /proc/thread-self/stat: {e}"))?;
    let close = stat.iter().rposition(|&c| c == b')').ok_or("malformed /proc/thread-self/stat")?;
    // Field 3 (state) is the first after ") ".
    let fields: Vec<&[u8]> = stat[close + 2..].split(|&c| c == b' ' || c == b'\n').collect();
    let f = |n: usize| -> u64 { fields.get(n - 3).and_then(|s| fs::parse_dec(s)).unwrap_or(0) as u64 };
    Ok(MmEntry {
        start_code: f(26),
        end_code: f(27),
        start_stack: f(28),
        start_data: f(45),
        end_data: f(46),
        start_brk: f(47),
        brk: sys::brk(0) as u64,
        arg_start: f(48),
        arg_end: f(49),
        env_start: f(50),
        env_end: f(51),
    })
}

fn read_umask() -> u32 {
    let status = fs::read_file(b"/proc/thread-self/status").unwrap_or_default();
    let key = b"Umask:";
    status
        .windows(key.len())
        .position(|w| w == key)
        .and_then(|p| {
            let rest = &status[p + key.len()..];
            let digits: Vec<u8> = rest
                .iter()
                .skip_while(|c| c.is_ascii_whitespace())
                .take_while(|c| c.is_ascii_digit())
                .copied()
                .collect();
            u32::from_str_radix(core::str::from_utf8(&digits).ok()?, 8).ok()
        })
        .unwrap_or(0o022)
}

pub fn dump(files: &mut Files) -> Result<ProcessBasics, String> {
    let exe = fs::read_link(b"/proc/thread-self/exe")
        .map_err(|e| alloc::format!("cannot read /proc/thread-self/exe: {e}"))?;
    let exe = files.intern_path(&path_string(&exe), true);
    let argv = fs::read_file(b"/proc/thread-self/cmdline")
        .unwrap_or_default()
        .split(|&c| c == 0)
        .filter(|s| !s.is_empty())
        .map(path_string)
        .collect();
    let cwd = path_string(
        &fs::read_link(b"/proc/thread-self/cwd")
            .map_err(|e| alloc::format!("cannot read /proc/thread-self/cwd: {e}"))?,
    );
    let mut rlimits = Vec::new();
    for resource in 0..16u32 {
        if let Ok(r) = sys::prlimit(resource, None) {
            rlimits.push(RlimitEntry { resource, cur: r.rlim_cur, max: r.rlim_max });
        }
    }
    let auxv_bytes = fs::read_file(b"/proc/thread-self/auxv").unwrap_or_default();
    let auxv = auxv_bytes.chunks_exact(8).map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8]))).collect();
    Ok(ProcessBasics {
        exe,
        argv,
        cwd,
        umask: read_umask(),
        rlimits,
        personality: sys::personality(0xffff_ffff).unwrap_or(0),
        mm: read_mm()?,
        auxv,
    })
}

/// The (virtual) pid, parent, group and session of this process.
pub fn ids() -> (i32, i32, i32, i32) {
    (
        state::virtual_pid(),
        state::to_virt(sys::getppid()),
        state::to_virt(sys::getpgid(0).unwrap_or(0)),
        state::to_virt(sys::getsid(0).unwrap_or(0)),
    )
}

/// Restores cwd, umask and rlimits (before the address space switch, with libc working).
pub fn restore(p: &migrate_image::ProcessEntry) -> Result<(), String> {
    sys::chdir(&fs::cpath(p.cwd.as_bytes())).map_err(|e| {
        alloc::format!("cannot enter the saved working directory {}: {e}; create it or resume elsewhere", p.cwd)
    })?;
    sys::umask(p.umask);
    for r in &p.rlimits {
        let lim = libc::rlimit64 { rlim_cur: r.cur, rlim_max: r.max };
        if let Err(e) = sys::prlimit(r.resource, Some(&lim)) {
            crate::debug!("cannot restore rlimit {}: {e}", r.resource);
        }
    }
    Ok(())
}
