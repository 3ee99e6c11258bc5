//! Membership of the process tree (see pid_virt::registry). The first process of a tree
//! (started by migrate-run, which sets MIGRATE_NEW_TREE) creates the registry: a memfd at
//! REGISTRY_FD, without close-on-exec so that exec'd children inherit it, mapped shared. Every
//! managed process — fork children, exec'd programs, restored processes — maps it and joins.

use crate::state::OWN_FD_BASE;
use crate::sys::{self, fs};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};
use pid_virt::registry::{Registry, SIZE};

/// The registry's descriptor number in every member.
pub const REGISTRY_FD: i32 = pid_virt::registry::FD;
const _: () = assert!(REGISTRY_FD == OWN_FD_BASE + 2);

/// Address of this process's mapping of the registry (0: none).
pub static REGISTRY: AtomicUsize = AtomicUsize::new(0);

pub fn registry() -> Option<&'static Registry> {
    match REGISTRY.load(Ordering::Acquire) {
        0 => None,
        // SAFETY: a live shared mapping of SIZE bytes holding a Registry (see attach/create).
        a => Some(unsafe { &*(a as *const Registry) }),
    }
}

/// Where the registry is mapped in this process (the restorer maps the new one there).
pub fn mapping() -> Option<(u64, u64)> {
    match REGISTRY.load(Ordering::Acquire) {
        0 => None,
        a => Some((a as u64, SIZE as u64)),
    }
}

fn map(fd: i32) -> sys::SysResult<usize> {
    sys::mmap(0, SIZE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
}

/// Tells the other processes of a resume that this one's restore failed (they wait for it at
/// the barrier), through the registry handed down at REGISTRY_FD.
pub fn restore_failed() {
    let (addr, ours) = match REGISTRY.load(Ordering::Acquire) {
        0 => match map(REGISTRY_FD) {
            Ok(a) => (a, true),
            Err(_) => return,
        },
        a => (a, false),
    };
    // SAFETY: a live shared mapping of SIZE bytes holding the resume's registry.
    let r = unsafe { &*(addr as *const Registry) };
    if r.is_valid() {
        r.failed.fetch_add(1, Ordering::AcqRel);
        sys::futex_wake_shared(&r.released);
    }
    if ours {
        // SAFETY: our own temporary mapping; `r` is not used past here.
        let _ = unsafe { sys::munmap(addr, SIZE) };
    }
}

/// Creates a new registry at REGISTRY_FD (replacing an inherited one).
pub fn create() -> sys::SysResult<()> {
    // SAFETY: the name is a NUL-terminated literal.
    let fd = unsafe { sys::syscall6(libc::SYS_memfd_create, c"migrate-tree".as_ptr() as usize, 0, 0, 0, 0, 0) };
    if fd < 0 {
        return Err(sys::Errno(-fd as i32));
    }
    let fd = fd as i32;
    // SAFETY: ftruncate on our fresh memfd.
    let r = unsafe { sys::syscall6(libc::SYS_ftruncate, fd as usize, SIZE, 0, 0, 0, 0) };
    if r < 0 {
        let _ = sys::close(fd);
        return Err(sys::Errno(-r as i32));
    }
    sys::dup3(fd, REGISTRY_FD, 0)?; // inherited across exec on purpose
    let _ = sys::close(fd);
    let addr = map(REGISTRY_FD)?;
    // SAFETY: fresh, zero-filled shared mapping of SIZE bytes.
    unsafe { (*(addr as *const Registry)).init() };
    REGISTRY.store(addr, Ordering::Release);
    Ok(())
}

/// Is REGISTRY_FD an open registry memfd (handed down by migrate-resume or inherited)?
pub fn registry_fd_valid() -> bool {
    sys::fstat(REGISTRY_FD).is_ok_and(|st| st.st_size as usize == SIZE)
}

/// Maps an inherited registry, if REGISTRY_FD is one.
pub fn attach_inherited() -> bool {
    let Ok(st) = sys::fstat(REGISTRY_FD) else { return false };
    if st.st_size as usize != SIZE {
        return false;
    }
    let Ok(addr) = map(REGISTRY_FD) else { return false };
    // SAFETY: a shared mapping of SIZE bytes of the inherited memfd.
    if !unsafe { &*(addr as *const Registry) }.is_valid() {
        // SAFETY: our own fresh mapping.
        let _ = unsafe { sys::munmap(addr, SIZE) };
        return false;
    }
    REGISTRY.store(addr, Ordering::Release);
    true
}

/// Start time of `pid` (field 22 of /proc/<pid>/stat), or 0.
pub fn start_time(pid: i32) -> u64 {
    let stat = fs::read_file(alloc::format!("/proc/{pid}/stat").as_bytes()).unwrap_or_default();
    let Some(close) = stat.iter().rposition(|&c| c == b')') else { return 0 };
    stat[close + 2..].split(|&c| c == b' ').nth(22 - 3).and_then(fs::parse_dec).unwrap_or(0) as u64
}

/// State letter of `pid` (field 3 of /proc/<pid>/stat).
pub fn state_of(pid: i32) -> Option<u8> {
    let stat = fs::read_file(alloc::format!("/proc/{pid}/stat").as_bytes()).ok()?;
    let close = stat.iter().rposition(|&c| c == b')')?;
    stat.get(close + 2).copied()
}

/// Puts this process in the registry.
pub fn join(vpid: i32) {
    if let Some(r) = registry() {
        let pid = sys::getpid();
        let start = start_time(pid);
        if r.join(pid, vpid, start).is_err() {
            // Processes that exited never say so: drop the stale entries and try again.
            let _ = members();
            if r.join(pid, vpid, start).is_err() {
                crate::info!("the tree registry is full; this process will not be part of tree checkpoints");
            }
        }
    }
}

/// A member of the tree, alive now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub real: i32,
    pub vpid: i32,
}

/// Live members (stale entries — exited, or a reused pid — are dropped from the registry).
pub fn members() -> Vec<Member> {
    let mut out = Vec::new();
    let Some(r) = registry() else {
        return alloc::vec![Member { real: sys::getpid(), vpid: crate::state::virtual_pid() }];
    };
    let mut stale = Vec::new();
    r.for_each(|real, vpid, start| {
        let alive = start_time(real) == start && !matches!(state_of(real), Some(b'Z') | Some(b'X') | None);
        if alive {
            out.push(Member { real, vpid });
        } else if state_of(real).is_none() || start_time(real) != start {
            stale.push(real);
        }
    });
    for real in stale {
        r.leave(real);
    }
    out
}

/// Children of `pid` (all its threads' children).
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::list_dir(alloc::format!("/proc/{pid}/task").as_bytes()) else { return out };
    for t in tasks {
        let path = [alloc::format!("/proc/{pid}/task/").as_bytes(), &t, b"/children"].concat();
        if let Ok(text) = fs::read_file(&path) {
            out.extend(text.split(|&c| c == b' ' || c == b'\n').filter_map(fs::parse_dec).map(|v| v as i32));
        }
    }
    out
}
