//! Socket calls whose arguments the kernel does not report later (the listen() backlog), and
//! accept(), which hands out the connections carried from a listener's accept queue
//! (resources/accept_queue.rs).

use super::next::{call_real, real_fn};
use core::sync::atomic::Ordering;
use libc::c_int;

real_fn!(LISTEN, b"listen\0");
real_fn!(ACCEPT, b"accept\0");
real_fn!(ACCEPT4, b"accept4\0");
real_fn!(FCNTL, b"fcntl\0");
real_fn!(FCNTL64, b"fcntl64\0");

pub fn resolve() {
    LISTEN.get();
    ACCEPT.get();
    ACCEPT4.get();
    FCNTL.get();
    FCNTL64.get();
}

/// fcntl's owner commands take and give pids (nginx gives its own, cached from getpid()).
/// C-variadic: the third integer register is passed through as is (ABI-compatible on x86_64).
fn fcntl_common(real: unsafe extern "C" fn(c_int, c_int, usize) -> c_int, fd: c_int, cmd: c_int, arg: usize) -> c_int {
    const F_SETOWN_EX: c_int = 15;
    const F_GETOWN_EX: c_int = 16;
    match cmd {
        libc::F_SETOWN => {
            let pid = arg as c_int;
            let real_pid = if pid < 0 { -crate::state::pgid_to_real(-pid) } else { crate::state::to_real(pid) };
            // SAFETY: pass-through with a translated owner.
            unsafe { real(fd, cmd, real_pid as usize) }
        }
        libc::F_GETOWN => {
            // SAFETY: pass-through.
            let r = unsafe { real(fd, cmd, arg) };
            if r > 0 {
                crate::state::to_virt(r)
            } else if r < -1 {
                -crate::state::pgid_to_virt(-r)
            } else {
                r
            }
        }
        F_SETOWN_EX if arg != 0 => {
            // struct f_owner_ex { int type; pid_t pid; }: a copy with the real id.
            // SAFETY: the program passes a valid struct f_owner_ex.
            let mut owner = unsafe { *(arg as *const [c_int; 2]) };
            owner[1] =
                if owner[0] == 2 { crate::state::pgid_to_real(owner[1]) } else { crate::state::to_real(owner[1]) };
            // SAFETY: pass-through with our copy.
            unsafe { real(fd, cmd, owner.as_ptr() as usize) }
        }
        F_GETOWN_EX if arg != 0 => {
            // SAFETY: pass-through; then the program's struct gets the virtual id.
            let r = unsafe { real(fd, cmd, arg) };
            if r == 0 {
                // SAFETY: the kernel filled the program's struct f_owner_ex.
                unsafe {
                    let owner = &mut *(arg as *mut [c_int; 2]);
                    owner[1] = if owner[0] == 2 {
                        crate::state::pgid_to_virt(owner[1])
                    } else {
                        crate::state::to_virt(owner[1])
                    };
                }
            }
            r
        }
        // SAFETY: pass-through of the program's arguments.
        _ => unsafe { real(fd, cmd, arg) },
    }
}

/// # Safety
/// fcntl(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    fcntl_common(call_real!(FCNTL: fn(c_int, c_int, usize) -> c_int), fd, cmd, arg)
}

/// # Safety
/// fcntl64's contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: usize) -> c_int {
    fcntl_common(call_real!(FCNTL64: fn(c_int, c_int, usize) -> c_int), fd, cmd, arg)
}

#[unsafe(no_mangle)]
pub extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    let real = call_real!(LISTEN: fn(c_int, c_int) -> c_int);
    // SAFETY: plain integers.
    let r = unsafe { real(fd, backlog) };
    if r == 0 {
        if let Some(b) = crate::resources::sockets::BACKLOG.get(fd as usize) {
            b.store(backlog, Ordering::Relaxed);
        }
    }
    r
}

/// After a real accept: a carried connection replaces its stand-in, and the caller's address
/// buffer gets the carried connection's peer.
fn after_accept(fd: c_int, flags: c_int, addr: *mut libc::sockaddr, len: *mut libc::socklen_t) -> c_int {
    if fd >= 0 && crate::resources::accept_queue::substitute(fd, flags) && !addr.is_null() && !len.is_null() {
        // SAFETY: the program's own address buffer and length, as it passed them to accept.
        unsafe { libc::getpeername(fd, addr, len) };
    }
    fd
}

/// # Safety
/// accept(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut libc::sockaddr, len: *mut libc::socklen_t) -> c_int {
    let real = call_real!(ACCEPT: fn(c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> c_int);
    // SAFETY: pass-through of the program's arguments.
    after_accept(unsafe { real(fd, addr, len) }, 0, addr, len)
}

/// # Safety
/// accept4(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut libc::sockaddr,
    len: *mut libc::socklen_t,
    flags: c_int,
) -> c_int {
    let real = call_real!(ACCEPT4: fn(c_int, *mut libc::sockaddr, *mut libc::socklen_t, c_int) -> c_int);
    // SAFETY: pass-through of the program's arguments.
    after_accept(unsafe { real(fd, addr, len, flags) }, flags, addr, len)
}
