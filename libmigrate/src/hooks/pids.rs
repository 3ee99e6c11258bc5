//! Process and thread ids: the program only ever sees *virtual* ids (see pid-virt). Every libc
//! entry point that takes or returns a pid translates it; `syscall()` is interposed for the
//! id-related numbers, so programs that bypass glibc's wrappers that way are covered too. What
//! stays visible: a raw `syscall` instruction, and the real ids in /proc seen by other programs.

use super::next::{call_real, real_fn};
use super::set_errno;
use crate::state;
use crate::sys;
use libc::{c_int, c_long, pid_t};

real_fn!(WAITPID, b"waitpid\0");
real_fn!(WAIT, b"wait\0");
real_fn!(WAIT4, b"wait4\0");
real_fn!(WAITID, b"waitid\0");
real_fn!(SETPGID, b"setpgid\0");
real_fn!(SETSID, b"setsid\0");
real_fn!(SIGQUEUE, b"sigqueue\0");
real_fn!(SCHED_SETAFFINITY, b"sched_setaffinity\0");
real_fn!(SCHED_GETAFFINITY, b"sched_getaffinity\0");
real_fn!(SCHED_SETSCHEDULER, b"sched_setscheduler\0");
real_fn!(SCHED_GETSCHEDULER, b"sched_getscheduler\0");
real_fn!(SCHED_SETPARAM, b"sched_setparam\0");
real_fn!(SCHED_GETPARAM, b"sched_getparam\0");
real_fn!(SCHED_RR_GET_INTERVAL, b"sched_rr_get_interval\0");
real_fn!(GETPRIORITY, b"getpriority\0");
real_fn!(SETPRIORITY, b"setpriority\0");
real_fn!(PRLIMIT, b"prlimit\0");
real_fn!(PRLIMIT64, b"prlimit64\0");
real_fn!(PIDFD_OPEN, b"pidfd_open\0");
real_fn!(SYSCALL, b"syscall\0");
real_fn!(TCGETPGRP, b"tcgetpgrp\0");
real_fn!(TCSETPGRP, b"tcsetpgrp\0");
real_fn!(TCGETSID, b"tcgetsid\0");

pub fn resolve() {
    for r in [
        &WAITPID,
        &WAIT,
        &WAIT4,
        &WAITID,
        &SETPGID,
        &SETSID,
        &SIGQUEUE,
        &SCHED_SETAFFINITY,
        &SCHED_GETAFFINITY,
        &SCHED_SETSCHEDULER,
        &SCHED_GETSCHEDULER,
        &SCHED_SETPARAM,
        &SCHED_GETPARAM,
        &SCHED_RR_GET_INTERVAL,
        &GETPRIORITY,
        &SETPRIORITY,
        &PRLIMIT,
        &PRLIMIT64,
        &PIDFD_OPEN,
        &SYSCALL,
        &TCGETPGRP,
        &TCSETPGRP,
        &TCGETSID,
    ] {
        r.get();
    }
}

/// A pid argument: 0 (self) and -1 ("any") keep their meaning; other negative values name
/// process groups.
fn arg(pid: pid_t) -> pid_t {
    if pid < -1 {
        return -state::pgid_to_real(-pid);
    }
    state::PIDS.pid_arg_to_real(pid)
}

/// A pid result: positive values are translated back.
fn ret(pid: pid_t) -> pid_t {
    if pid > 0 {
        state::to_virt(pid)
    } else {
        pid
    }
}

fn ok_or_errno(r: sys::SysResult<()>) -> c_int {
    match r {
        Ok(()) => 0,
        Err(e) => {
            set_errno(e.0);
            -1
        }
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn getpid() -> pid_t {
    state::virtual_pid()
}

#[unsafe(no_mangle)]
pub extern "C" fn getppid() -> pid_t {
    state::to_virt(sys::getppid())
}

#[unsafe(no_mangle)]
pub extern "C" fn gettid() -> pid_t {
    state::to_virt(sys::gettid())
}

#[unsafe(no_mangle)]
pub extern "C" fn getpgrp() -> pid_t {
    state::pgid_to_virt(sys::getpgid(0).unwrap_or(0))
}

#[unsafe(no_mangle)]
pub extern "C" fn getpgid(pid: pid_t) -> pid_t {
    match sys::getpgid(arg(pid)) {
        Ok(p) => state::pgid_to_virt(p),
        Err(e) => {
            set_errno(e.0);
            -1
        }
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn getsid(pid: pid_t) -> pid_t {
    match sys::getsid(arg(pid)) {
        Ok(p) => state::sid_to_virt(p),
        Err(e) => {
            set_errno(e.0);
            -1
        }
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn setpgid(pid: pid_t, pgid: pid_t) -> c_int {
    let real = call_real!(SETPGID: fn(pid_t, pid_t) -> c_int);
    let pgid = if pgid > 0 { state::pgid_to_real(pgid) } else { pgid };
    // SAFETY: plain integers.
    unsafe { real(arg(pid), pgid) }
}

#[unsafe(no_mangle)]
pub extern "C" fn setsid() -> pid_t {
    let real = call_real!(SETSID: fn() -> pid_t);
    // SAFETY: no arguments.
    ret(unsafe { real() })
}

#[unsafe(no_mangle)]
pub extern "C" fn kill(pid: pid_t, sig: c_int) -> c_int {
    ok_or_errno(sys::kill(arg(pid), sig))
}

/// glibc's killpg calls kill internally, past our hook: bash's `fg` and `bg` use it.
#[unsafe(no_mangle)]
pub extern "C" fn killpg(pgrp: pid_t, sig: c_int) -> c_int {
    if pgrp < 0 {
        set_errno(libc::EINVAL);
        return -1;
    }
    let real = if pgrp == 0 { 0 } else { -state::pgid_to_real(pgrp) };
    ok_or_errno(sys::kill(real, sig))
}

#[unsafe(no_mangle)]
pub extern "C" fn tgkill(tgid: pid_t, tid: pid_t, sig: c_int) -> c_int {
    ok_or_errno(sys::tgkill(state::to_real(tgid), state::to_real(tid), sig))
}

/// # Safety
/// sigqueue(3)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigqueue(pid: pid_t, sig: c_int, value: libc::sigval) -> c_int {
    let real = call_real!(SIGQUEUE: fn(pid_t, c_int, libc::sigval) -> c_int);
    // SAFETY: pass-through with a translated pid.
    unsafe { real(arg(pid), sig, value) }
}

/// # Safety
/// waitpid(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn waitpid(pid: pid_t, status: *mut c_int, options: c_int) -> pid_t {
    let real = call_real!(WAITPID: fn(pid_t, *mut c_int, c_int) -> pid_t);
    // SAFETY: pass-through with a translated pid.
    ret(unsafe { real(arg(pid), status, options) })
}

/// # Safety
/// wait(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wait(status: *mut c_int) -> pid_t {
    let real = call_real!(WAIT: fn(*mut c_int) -> pid_t);
    // SAFETY: pass-through.
    ret(unsafe { real(status) })
}

/// # Safety
/// wait4(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wait4(pid: pid_t, status: *mut c_int, options: c_int, usage: *mut libc::rusage) -> pid_t {
    let real = call_real!(WAIT4: fn(pid_t, *mut c_int, c_int, *mut libc::rusage) -> pid_t);
    // SAFETY: pass-through with a translated pid.
    ret(unsafe { real(arg(pid), status, options, usage) })
}

/// # Safety
/// waitid(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn waitid(
    idtype: libc::idtype_t,
    id: libc::id_t,
    info: *mut libc::siginfo_t,
    options: c_int,
) -> c_int {
    let real = call_real!(WAITID: fn(libc::idtype_t, libc::id_t, *mut libc::siginfo_t, c_int) -> c_int);
    let id = match idtype {
        libc::P_PID | libc::P_PGID => state::to_real(id as pid_t) as libc::id_t,
        _ => id,
    };
    // SAFETY: pass-through with a translated id.
    let r = unsafe { real(idtype, id, info, options) };
    if r == 0 && !info.is_null() {
        // SAFETY: the program's siginfo, filled by the kernel; si_pid is at offset 16.
        unsafe {
            let p = (info as *mut u8).add(16) as *mut pid_t;
            *p = ret(*p);
        }
    }
    r
}

macro_rules! pid_first {
    ($(#[$m:meta])* $name:ident, $real:ident, ($($a:ident: $t:ty),*) -> $r:ty) => {
        $(#[$m])*
        /// # Safety
        /// The libc function's own contract; only the pid is translated.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(pid: pid_t, $($a: $t),*) -> $r {
            let real = call_real!($real: fn(pid_t, $($t),*) -> $r);
            // SAFETY: pass-through with a translated pid.
            unsafe { real(arg(pid), $($a),*) }
        }
    };
}

pid_first!(sched_setaffinity, SCHED_SETAFFINITY, (size: usize, mask: *const libc::cpu_set_t) -> c_int);
pid_first!(sched_getaffinity, SCHED_GETAFFINITY, (size: usize, mask: *mut libc::cpu_set_t) -> c_int);
pid_first!(sched_setscheduler, SCHED_SETSCHEDULER, (policy: c_int, param: *const libc::sched_param) -> c_int);
pid_first!(sched_getscheduler, SCHED_GETSCHEDULER, () -> c_int);
pid_first!(sched_setparam, SCHED_SETPARAM, (param: *const libc::sched_param) -> c_int);
pid_first!(sched_getparam, SCHED_GETPARAM, (param: *mut libc::sched_param) -> c_int);
pid_first!(sched_rr_get_interval, SCHED_RR_GET_INTERVAL, (tp: *mut libc::timespec) -> c_int);
pid_first!(prlimit, PRLIMIT, (resource: c_int, new: *const libc::rlimit, old: *mut libc::rlimit) -> c_int);
pid_first!(prlimit64, PRLIMIT64, (resource: c_int, new: *const libc::rlimit64, old: *mut libc::rlimit64) -> c_int);
pid_first!(pidfd_open, PIDFD_OPEN, (flags: libc::c_uint) -> c_int);

/// The terminal's foreground group, in the program's ids (job control in shells).
#[unsafe(no_mangle)]
pub extern "C" fn tcgetpgrp(fd: c_int) -> pid_t {
    let real = call_real!(TCGETPGRP: fn(c_int) -> pid_t);
    // SAFETY: plain integer argument.
    let r = unsafe { real(fd) };
    if r > 0 {
        state::pgid_to_virt(r)
    } else {
        r
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn tcsetpgrp(fd: c_int, pgrp: pid_t) -> c_int {
    let real = call_real!(TCSETPGRP: fn(c_int, pid_t) -> c_int);
    // SAFETY: plain integer arguments.
    unsafe { real(fd, if pgrp > 0 { state::pgid_to_real(pgrp) } else { pgrp }) }
}

#[unsafe(no_mangle)]
pub extern "C" fn tcgetsid(fd: c_int) -> pid_t {
    let real = call_real!(TCGETSID: fn(c_int) -> pid_t);
    // SAFETY: plain integer argument.
    let r = unsafe { real(fd) };
    if r > 0 {
        state::sid_to_virt(r)
    } else {
        r
    }
}

/// getpriority/setpriority name a process only with PRIO_PROCESS (PRIO_PGRP: a group id).
fn who_arg(which: libc::__priority_which_t, who: libc::id_t) -> libc::id_t {
    match which {
        libc::PRIO_PROCESS | libc::PRIO_PGRP if who != 0 => state::to_real(who as pid_t) as libc::id_t,
        _ => who,
    }
}

/// # Safety
/// getpriority(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getpriority(which: libc::__priority_which_t, who: libc::id_t) -> c_int {
    let real = call_real!(GETPRIORITY: fn(libc::__priority_which_t, libc::id_t) -> c_int);
    // SAFETY: plain integers.
    unsafe { real(which, who_arg(which, who)) }
}

/// # Safety
/// setpriority(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn setpriority(which: libc::__priority_which_t, who: libc::id_t, prio: c_int) -> c_int {
    let real = call_real!(SETPRIORITY: fn(libc::__priority_which_t, libc::id_t, c_int) -> c_int);
    // SAFETY: plain integers.
    unsafe { real(which, who_arg(which, who), prio) }
}

/// `syscall(2)`: the id-related numbers are answered like their wrappers; everything else goes
/// to libc's syscall() untouched. C-variadic in libc; on x86_64 six integer arguments in
/// registers are ABI-compatible, and the callee reads only what the number needs.
///
/// # Safety
/// syscall(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn syscall(
    nr: c_long,
    a1: c_long,
    a2: c_long,
    a3: c_long,
    a4: c_long,
    a5: c_long,
    a6: c_long,
) -> c_long {
    match nr {
        libc::SYS_getpid => return getpid() as c_long,
        libc::SYS_getppid => return getppid() as c_long,
        libc::SYS_gettid => return gettid() as c_long,
        libc::SYS_kill => return kill(a1 as pid_t, a2 as c_int) as c_long,
        libc::SYS_tgkill => return tgkill(a1 as pid_t, a2 as pid_t, a3 as c_int) as c_long,
        libc::SYS_tkill => {
            return ok_or_errno(sys::tgkill(sys::getpid(), state::to_real(a1 as pid_t), a2 as c_int)) as c_long
        }
        _ => {}
    }
    if let Some(r) = super::ipc::via_syscall(nr, [a1, a2, a3, a4, a5, a6]) {
        return r;
    }
    let (a1, a2) = match nr {
        libc::SYS_getpgid
        | libc::SYS_getsid
        | libc::SYS_pidfd_open
        | libc::SYS_sched_getaffinity
        | libc::SYS_sched_setaffinity => (arg(a1 as pid_t) as c_long, a2),
        libc::SYS_setpgid => (arg(a1 as pid_t) as c_long, arg(a2 as pid_t) as c_long),
        libc::SYS_rt_sigqueueinfo => (arg(a1 as pid_t) as c_long, a2),
        libc::SYS_rt_tgsigqueueinfo => (state::to_real(a1 as pid_t) as c_long, state::to_real(a2 as pid_t) as c_long),
        _ => (a1, a2),
    };
    let real = call_real!(SYSCALL: fn(c_long, c_long, c_long, c_long, c_long, c_long, c_long) -> c_long);
    // SAFETY: pass-through of the program's arguments.
    let r = unsafe { real(nr, a1, a2, a3, a4, a5, a6) };
    match nr {
        libc::SYS_getpgid if r > 0 => state::pgid_to_virt(r as pid_t) as c_long,
        libc::SYS_getsid if r > 0 => state::sid_to_virt(r as pid_t) as c_long,
        libc::SYS_setsid if r > 0 => ret(r as pid_t) as c_long,
        _ => r,
    }
}
