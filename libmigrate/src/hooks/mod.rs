//! The exported C entry points that interpose libc, grouped by concern. Each one: translate,
//! call the real function (or a raw syscall), translate back. Hooks never allocate and never
//! take a lock the checkpoint path could need.

pub mod exec;
pub mod fds;
pub mod inotify;
pub mod ipc;
pub mod net;
pub mod next;
pub mod paths;
pub mod pids;
pub mod signal;
pub mod time;

/// Resolves every real function up front, so that no hook runs dlsym (which may allocate)
/// while the program is frozen.
pub fn resolve_all() {
    signal::resolve();
    exec::resolve();
    net::resolve();
    time::resolve();
    pids::resolve();
    paths::resolve();
    ipc::resolve();
    inotify::resolve();
    fds::resolve();
}

/// Sets errno (the program's, through libc's own accessor).
pub fn set_errno(e: i32) {
    // SAFETY: __errno_location returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

pub fn errno() -> i32 {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() }
}
