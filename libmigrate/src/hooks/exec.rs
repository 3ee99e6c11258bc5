//! exec and posix_spawn: a managed program's children stay in its tree even when it passes a
//! scrubbed environment (`env -i`, a fixed envp): the variables libmigrate needs (LD_PRELOAD,
//! GLIBC_TUNABLES, MIGRATE_CKPT_DIR, MIGRATE_SIGNAL, MIGRATE_COMPRESS) are put back. The tree registry and its
//! descriptor are inherited anyway. A statically linked target, which LD_PRELOAD cannot reach,
//! is reported: it leaves the tree.

use super::next::{call_real, real_fn};
use crate::state::{self, SUSPEND_SIGNAL};
use crate::sys;
use alloc::format;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use libc::{c_char, c_int};

real_fn!(EXECVE, b"execve\0");
real_fn!(EXECVPE, b"execvpe\0");
real_fn!(FEXECVE, b"fexecve\0");
real_fn!(POSIX_SPAWN, b"posix_spawn\0");
real_fn!(POSIX_SPAWNP, b"posix_spawnp\0");

pub fn resolve() {
    for r in [&EXECVE, &EXECVPE, &FEXECVE, &POSIX_SPAWN, &POSIX_SPAWNP] {
        r.get();
    }
}

unsafe extern "C" {
    static environ: *const *const c_char;
}

/// Runs `f` with SUSPEND_SIGNAL blocked, so that no checkpoint parks this thread while it holds
/// libmigrate's allocator.
fn unsuspendable<R>(f: impl FnOnce() -> R) -> R {
    let bit = 1u64 << (SUSPEND_SIGNAL - 1);
    let mut old = 0u64;
    let _ = sys::rt_sigprocmask(libc::SIG_BLOCK, Some(&bit), Some(&mut old));
    let r = f();
    let _ = sys::rt_sigprocmask(libc::SIG_SETMASK, Some(&old), None);
    r
}

/// The entries to add to `envp` (NUL-terminated "NAME=value" strings), if any are missing.
fn missing_entries(envp: *const *const c_char) -> Vec<Vec<u8>> {
    let compress = crate::checkpoint::COMPRESS_BY_DEFAULT.load(Ordering::Relaxed);
    let wanted: [(&str, Option<alloc::string::String>); 5] = [
        ("LD_PRELOAD", crate::checkpoint::LD_PRELOAD.get().cloned()),
        ("GLIBC_TUNABLES", Some("glibc.pthread.rseq=0".into())),
        (
            "MIGRATE_CKPT_DIR",
            crate::checkpoint::DEFAULT_DIR.get().map(|d| alloc::string::String::from_utf8_lossy(d).into_owned()),
        ),
        ("MIGRATE_SIGNAL", Some(format!("{}", state::CHECKPOINT_SIGNAL.load(Ordering::Relaxed)))),
        ("MIGRATE_COMPRESS", compress.then(|| "1".into())),
    ];
    let mut out = Vec::new();
    for (name, value) in wanted {
        let Some(value) = value.filter(|v| !v.is_empty()) else { continue };
        let mut present = false;
        // SAFETY: the program's NULL-terminated array of NUL-terminated strings.
        unsafe {
            let mut p = envp;
            while !p.is_null() && !(*p).is_null() {
                let e = core::ffi::CStr::from_ptr(*p).to_bytes();
                if e.len() > name.len() && e.starts_with(name.as_bytes()) && e[name.len()] == b'=' {
                    present = true;
                    break;
                }
                p = p.add(1);
            }
        }
        if !present {
            out.push(format!("{name}={value}\0").into_bytes());
        }
    }
    out
}

/// Calls `f` with an environment that keeps the child managed.
fn with_our_env<R>(envp: *const *const c_char, f: impl FnOnce(*const *const c_char) -> R) -> R {
    let (extra, array) = unsuspendable(|| {
        let extra = missing_entries(envp);
        if extra.is_empty() {
            return (extra, Vec::new());
        }
        let mut array: Vec<*const c_char> = Vec::new();
        // SAFETY: as in missing_entries.
        unsafe {
            let mut p = envp;
            while !p.is_null() && !(*p).is_null() {
                array.push(*p);
                p = p.add(1);
            }
        }
        array.extend(extra.iter().map(|e| e.as_ptr() as *const c_char));
        array.push(core::ptr::null());
        (extra, array)
    });
    let r = if array.is_empty() { f(envp) } else { f(array.as_ptr()) };
    // Only reached when the exec failed: free with the suspend signal blocked.
    unsuspendable(move || drop((extra, array)));
    r
}

/// Reports a statically linked target (no PT_INTERP): LD_PRELOAD cannot reach it.
fn warn_if_static(path: *const c_char) {
    if path.is_null() {
        return;
    }
    // SAFETY: the program's NUL-terminated path.
    let bytes = unsafe { core::ffi::CStr::from_ptr(path) }.to_bytes_with_nul();
    let Ok(fd) = sys::open(bytes, libc::O_RDONLY | libc::O_CLOEXEC, 0) else { return };
    let mut head = [0u8; 64];
    let ok = sys::pread(fd, &mut head, 0).is_ok_and(|n| n == 64) && head.starts_with(b"\x7fELF") && head[4] == 2;
    let mut is_static = false;
    if ok {
        let phoff = u64::from_le_bytes(head[32..40].try_into().unwrap_or([0; 8]));
        let phentsize = u16::from_le_bytes([head[54], head[55]]) as u64;
        let phnum = u16::from_le_bytes([head[56], head[57]]) as u64;
        let mut interp = false;
        for i in 0..phnum.min(64) {
            let mut ph = [0u8; 4];
            if sys::pread(fd, &mut ph, phoff + i * phentsize).is_ok_and(|n| n == 4) && u32::from_le_bytes(ph) == 3 {
                interp = true;
            }
        }
        is_static = !interp;
    }
    let _ = sys::close(fd);
    if is_static {
        crate::info!(
            "{} is statically linked: LD_PRELOAD cannot reach it, so it leaves the checkpointed tree \
             (a checkpoint of the tree will refuse while it runs)",
            alloc::string::String::from_utf8_lossy(&bytes[..bytes.len() - 1])
        );
    }
}

/// # Safety
/// execve(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    let real = call_real!(EXECVE: fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int);
    warn_if_static(path);
    // SAFETY: pass-through with a completed environment.
    with_our_env(envp, |e| unsafe { real(path, argv, e) })
}

/// # Safety
/// execv(3)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: execv is execve with the current environment.
    unsafe { execve(path, argv, environ) }
}

/// # Safety
/// execvpe(3)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvpe(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    let real = call_real!(EXECVPE: fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int);
    // SAFETY: pass-through with a completed environment.
    with_our_env(envp, |e| unsafe { real(file, argv, e) })
}

/// # Safety
/// execvp(3)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: execvp is execvpe with the current environment.
    unsafe { execvpe(file, argv, environ) }
}

/// # Safety
/// fexecve(3)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fexecve(fd: c_int, argv: *const *const c_char, envp: *const *const c_char) -> c_int {
    let real = call_real!(FEXECVE: fn(c_int, *const *const c_char, *const *const c_char) -> c_int);
    // SAFETY: pass-through with a completed environment.
    with_our_env(envp, |e| unsafe { real(fd, argv, e) })
}

/// # Safety
/// posix_spawn(3)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut libc::pid_t,
    path: *const c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let real = call_real!(POSIX_SPAWN: fn(*mut libc::pid_t, *const c_char, *const libc::posix_spawn_file_actions_t, *const libc::posix_spawnattr_t, *const *const c_char, *const *const c_char) -> c_int);
    warn_if_static(path);
    // SAFETY: pass-through with a completed environment.
    with_our_env(envp, |e| unsafe { real(pid, path, actions, attr, argv, e) })
}

/// # Safety
/// posix_spawnp(3)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut libc::pid_t,
    file: *const c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let real = call_real!(POSIX_SPAWNP: fn(*mut libc::pid_t, *const c_char, *const libc::posix_spawn_file_actions_t, *const libc::posix_spawnattr_t, *const *const c_char, *const *const c_char) -> c_int);
    // SAFETY: pass-through with a completed environment.
    with_our_env(envp, |e| unsafe { real(pid, file, actions, attr, argv, e) })
}
