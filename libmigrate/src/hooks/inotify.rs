//! inotify calls whose arguments the kernel does not report later: the path each watch was
//! added with (fdinfo shows only the inode). Recorded in resources/inotify.rs's table.

use super::next::{call_real, real_fn};
use crate::resources::inotify;
use libc::{c_char, c_int};

real_fn!(INOTIFY_INIT, b"inotify_init\0");
real_fn!(INOTIFY_INIT1, b"inotify_init1\0");
real_fn!(INOTIFY_ADD_WATCH, b"inotify_add_watch\0");
real_fn!(INOTIFY_RM_WATCH, b"inotify_rm_watch\0");

pub fn resolve() {
    for r in [&INOTIFY_INIT, &INOTIFY_INIT1, &INOTIFY_ADD_WATCH, &INOTIFY_RM_WATCH] {
        r.get();
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn inotify_init() -> c_int {
    let real = call_real!(INOTIFY_INIT: fn() -> c_int);
    // SAFETY: no arguments.
    let fd = unsafe { real() };
    if fd >= 0 {
        inotify::forget_instance(fd);
    }
    fd
}

#[unsafe(no_mangle)]
pub extern "C" fn inotify_init1(flags: c_int) -> c_int {
    let real = call_real!(INOTIFY_INIT1: fn(c_int) -> c_int);
    // SAFETY: an integer argument.
    let fd = unsafe { real(flags) };
    if fd >= 0 {
        inotify::forget_instance(fd);
    }
    fd
}

/// # Safety
/// inotify_add_watch(2)'s contract: `path` is a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn inotify_add_watch(fd: c_int, path: *const c_char, mask: u32) -> c_int {
    let real = call_real!(INOTIFY_ADD_WATCH: fn(c_int, *const c_char, u32) -> c_int);
    // SAFETY: pass-through of the program's arguments.
    let wd = unsafe { real(fd, path, mask) };
    if wd >= 0 && !path.is_null() {
        // SAFETY: the kernel just read it as a NUL-terminated path.
        let bytes = unsafe { core::ffi::CStr::from_ptr(path) }.to_bytes();
        inotify::record(fd, wd, bytes);
    }
    wd
}

#[unsafe(no_mangle)]
pub extern "C" fn inotify_rm_watch(fd: c_int, wd: c_int) -> c_int {
    let real = call_real!(INOTIFY_RM_WATCH: fn(c_int, c_int) -> c_int);
    // SAFETY: integer arguments.
    let r = unsafe { real(fd, wd) };
    if r == 0 {
        inotify::forget(fd, wd);
    }
    r
}
