//! close and close_range: a lazy restore's page server (restore/lazy.rs) reads the image and
//! answers faults through descriptors of its own, above the program's; a program that closes
//! them — a sweep of every descriptor, typically — waits until the server is done with them
//! (closing the userfaultfd would leave the missing pages zero, closing the image would stop
//! the restore). Outside a lazy restore these are plain pass-throughs.

use super::next::{call_real, real_fn};
use crate::restore::lazy;
use libc::{c_int, c_uint};

real_fn!(CLOSE, b"close\0");
real_fn!(CLOSE_RANGE, b"close_range\0");

pub fn resolve() {
    for r in [&CLOSE, &CLOSE_RANGE] {
        r.get();
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn close(fd: c_int) -> c_int {
    if lazy::is_server_fd(fd) {
        lazy::wait_complete();
    }
    let real = call_real!(CLOSE: fn(c_int) -> c_int);
    // SAFETY: an integer argument.
    unsafe { real(fd) }
}

#[unsafe(no_mangle)]
pub extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    if lazy::server_fd_in(first, last) {
        lazy::wait_complete();
    }
    let real = call_real!(CLOSE_RANGE: fn(c_uint, c_uint, c_int) -> c_int);
    // SAFETY: integer arguments.
    unsafe { real(first, last, flags) }
}
