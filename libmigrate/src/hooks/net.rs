//! Socket calls whose arguments the kernel does not report later: the listen() backlog.

use super::next::{call_real, real_fn};
use core::sync::atomic::Ordering;
use libc::c_int;

real_fn!(LISTEN, b"listen\0");

pub fn resolve() {
    LISTEN.get();
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
