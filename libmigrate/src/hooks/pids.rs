//! getpid and friends: the program sees virtual ids (see pid-virt).

use crate::state;
use crate::sys;

pub fn resolve() {}

#[unsafe(no_mangle)]
pub extern "C" fn getpid() -> libc::pid_t {
    state::virtual_pid()
}

#[unsafe(no_mangle)]
pub extern "C" fn getppid() -> libc::pid_t {
    state::to_virt(sys::getppid())
}

#[unsafe(no_mangle)]
pub extern "C" fn gettid() -> libc::pid_t {
    state::to_virt(sys::gettid())
}

fn ret(r: sys::SysResult<()>) -> libc::c_int {
    match r {
        Ok(()) => 0,
        Err(e) => {
            super::set_errno(e.0);
            -1
        }
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn kill(pid: libc::pid_t, sig: libc::c_int) -> libc::c_int {
    ret(sys::kill(state::PIDS.pid_arg_to_real(pid), sig))
}

#[unsafe(no_mangle)]
pub extern "C" fn tgkill(tgid: libc::pid_t, tid: libc::pid_t, sig: libc::c_int) -> libc::c_int {
    ret(sys::tgkill(state::to_real(tgid), state::to_real(tid), sig))
}
