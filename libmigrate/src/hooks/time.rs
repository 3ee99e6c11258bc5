//! Blocking calls that the kernel ends with EINTR whenever a signal handler runs, whatever
//! SA_RESTART says: sleeps, poll/select/epoll waits, sigtimedwait, sem_timedwait. When the
//! interruption was a checkpoint (the checkpoint generation moved during the call), the hook
//! continues the call with the time that remained when the program was frozen, in this process
//! or a restored one, so the program never sees our EINTR and its sleeps neither end early nor
//! start over.

use super::next::{call_real, real_fn};
use super::{errno, set_errno};
use crate::state::{FREEZE_MONOTONIC_NS, INTERRUPTIONS};
use crate::sys;
use core::sync::atomic::Ordering;
use libc::{c_int, c_uint, sigset_t, timespec};

real_fn!(NANOSLEEP, b"nanosleep\0");
real_fn!(CLOCK_NANOSLEEP, b"clock_nanosleep\0");
real_fn!(POLL, b"poll\0");
real_fn!(PPOLL, b"ppoll\0");
real_fn!(SELECT, b"select\0");
real_fn!(PSELECT, b"pselect\0");
real_fn!(EPOLL_WAIT, b"epoll_wait\0");
real_fn!(EPOLL_PWAIT, b"epoll_pwait\0");
real_fn!(SIGTIMEDWAIT, b"sigtimedwait\0");
real_fn!(SIGWAITINFO, b"sigwaitinfo\0");
real_fn!(SEM_TIMEDWAIT, b"sem_timedwait\0");

pub fn resolve() {
    for r in [
        &NANOSLEEP,
        &CLOCK_NANOSLEEP,
        &POLL,
        &PPOLL,
        &SELECT,
        &PSELECT,
        &EPOLL_WAIT,
        &EPOLL_PWAIT,
        &SIGTIMEDWAIT,
        &SIGWAITINFO,
        &SEM_TIMEDWAIT,
    ] {
        r.get();
    }
}

fn generation() -> u64 {
    INTERRUPTIONS.load(Ordering::Acquire)
}

/// A timed wait's deadline on this host's CLOCK_MONOTONIC, and when the wait (or its last
/// continuation) began.
#[derive(Clone, Copy)]
pub(crate) struct Deadline {
    at: u64,
    began: u64,
}

impl Deadline {
    fn after_ns(ns: u64) -> Self {
        let now = sys::monotonic_ns_vdso();
        Deadline { at: now + ns, began: now }
    }
    /// A poll-style timeout: no clock is read for none (-1) or zero (a non-blocking call), the
    /// common cases of an event loop.
    fn after_ms(ms: c_int) -> Self {
        if ms <= 0 {
            return Deadline { at: 0, began: 0 };
        }
        Self::after_ns(ms as u64 * 1_000_000)
    }
    pub(crate) fn after_ts(ts: &timespec) -> Self {
        Self::after_ns(ts.tv_sec.max(0) as u64 * 1_000_000_000 + ts.tv_nsec.max(0) as u64)
    }
    /// Continues after our interruption. If the program was frozen during the wait, what
    /// remained at the freeze is waited from now (the clock may even be another host's);
    /// if it was only woken by the checkpoint signal, the deadline stands.
    pub(crate) fn continue_after_checkpoint(&mut self) {
        let freeze = FREEZE_MONOTONIC_NS.load(Ordering::Acquire);
        let now = sys::monotonic_ns_vdso();
        if freeze >= self.began {
            self.at = now + self.at.saturating_sub(freeze);
        }
        self.began = now;
    }
    fn remaining_ns(&self) -> u64 {
        self.at.saturating_sub(sys::monotonic_ns_vdso())
    }
    fn remaining_ms(&self) -> c_int {
        self.remaining_ns().div_ceil(1_000_000).min(c_int::MAX as u64) as c_int
    }
    pub(crate) fn remaining_ts(&self) -> timespec {
        sys::timespec_from_ns(self.remaining_ns())
    }
}

/// Runs `call` until it returns anything but an EINTR caused by us; errno is as the program
/// left it unless the call itself failed for the program.
fn retry_ours(mut call: impl FnMut(bool) -> c_int) -> c_int {
    let saved_errno = errno();
    let mut resumed = false;
    loop {
        let gen = generation();
        let r = call(resumed);
        if r == -1 && errno() == libc::EINTR && generation() != gen {
            resumed = true;
            set_errno(saved_errno);
            continue;
        }
        return r;
    }
}

/// # Safety
/// nanosleep(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nanosleep(req: *const timespec, rem: *mut timespec) -> c_int {
    let real = call_real!(NANOSLEEP: fn(*const timespec, *mut timespec) -> c_int);
    if req.is_null() {
        // SAFETY: pass-through (the real call reports EFAULT).
        return unsafe { real(req, rem) };
    }
    // SAFETY: `req` is the program's valid pointer.
    let mut want = unsafe { *req };
    let mut left = timespec { tv_sec: 0, tv_nsec: 0 };
    let saved_errno = errno();
    loop {
        let gen = generation();
        // SAFETY: both pointers are to locals.
        let r = unsafe { real(&want, &mut left) };
        if r == -1 && errno() == libc::EINTR && generation() != gen {
            // The kernel stored what remained at the interruption: sleep exactly that.
            want = left;
            set_errno(saved_errno);
            continue;
        }
        if !rem.is_null() {
            // SAFETY: the program's out-pointer.
            unsafe { *rem = left };
        }
        return r;
    }
}

/// # Safety
/// clock_nanosleep(2)'s contract (returns an error number, not -1).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn clock_nanosleep(
    clock: libc::clockid_t,
    flags: c_int,
    req: *const timespec,
    rem: *mut timespec,
) -> c_int {
    let real = call_real!(CLOCK_NANOSLEEP: fn(libc::clockid_t, c_int, *const timespec, *mut timespec) -> c_int);
    if req.is_null() {
        // SAFETY: pass-through.
        return unsafe { real(clock, flags, req, rem) };
    }
    // SAFETY: the program's valid pointer.
    let mut want = unsafe { *req };
    let mut left = timespec { tv_sec: 0, tv_nsec: 0 };
    loop {
        let gen = generation();
        // SAFETY: pointers to locals.
        let r = unsafe { real(clock, flags, &want, &mut left) };
        if r == libc::EINTR && generation() != gen {
            if flags & libc::TIMER_ABSTIME == 0 {
                want = left;
            }
            continue;
        }
        if r == libc::EINTR && !rem.is_null() && flags & libc::TIMER_ABSTIME == 0 {
            // SAFETY: the program's out-pointer.
            unsafe { *rem = left };
        }
        return r;
    }
}

fn sleep_ns(ns: u64) -> (c_int, timespec) {
    let req = sys::timespec_from_ns(ns);
    let mut rem = timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: pointers to locals.
    let r = unsafe { nanosleep(&req, &mut rem) };
    (r, rem)
}

#[unsafe(no_mangle)]
pub extern "C" fn sleep(secs: c_uint) -> c_uint {
    let saved = errno();
    let (r, rem) = sleep_ns(secs as u64 * 1_000_000_000);
    if r == 0 {
        set_errno(saved);
        0
    } else {
        (rem.tv_sec + (rem.tv_nsec > 0) as i64) as c_uint
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn usleep(usec: libc::useconds_t) -> c_int {
    sleep_ns(usec as u64 * 1000).0
}

/// # Safety
/// poll(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn poll(fds: *mut libc::pollfd, n: libc::nfds_t, timeout: c_int) -> c_int {
    let real = call_real!(POLL: fn(*mut libc::pollfd, libc::nfds_t, c_int) -> c_int);
    let mut deadline = Deadline::after_ms(timeout.max(0));
    retry_ours(|resumed| {
        let mut t = timeout;
        if resumed && timeout >= 0 {
            deadline.continue_after_checkpoint();
            t = deadline.remaining_ms();
        }
        // SAFETY: pass-through of the program's arguments.
        unsafe { real(fds, n, t) }
    })
}

/// # Safety
/// ppoll(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ppoll(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    tmo: *const timespec,
    mask: *const sigset_t,
) -> c_int {
    let real = call_real!(PPOLL: fn(*mut libc::pollfd, libc::nfds_t, *const timespec, *const sigset_t) -> c_int);
    // SAFETY: the program's pointer, checked.
    let mut deadline = if tmo.is_null() {
        None
    } else {
        // SAFETY: the program's timeout pointer, checked non-null.
        Some(Deadline::after_ts(unsafe { &*tmo }))
    };
    let mask_copy = if mask.is_null() { None } else { Some(super::signal::mask_without_ours(mask)) };
    retry_ours(|resumed| {
        let ts;
        let mut tp = tmo;
        if let (true, Some(d)) = (resumed, deadline.as_mut()) {
            d.continue_after_checkpoint();
            ts = d.remaining_ts();
            tp = &ts;
        }
        let mp = mask_copy.as_ref().map_or(core::ptr::null(), |m| m as *const sigset_t);
        // SAFETY: pointers valid for the call.
        unsafe { real(fds, n, tp, mp) }
    })
}

/// # Safety
/// select(2)'s contract. Linux writes the remaining time into `timeout` when interrupted, so
/// retrying with it continues where the checkpoint interrupted.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn select(
    n: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    timeout: *mut libc::timeval,
) -> c_int {
    let real = call_real!(SELECT: fn(c_int, *mut libc::fd_set, *mut libc::fd_set, *mut libc::fd_set, *mut libc::timeval) -> c_int);
    // SAFETY: pass-through; the sets are unmodified on EINTR.
    retry_ours(|_| unsafe { real(n, r, w, e, timeout) })
}

/// # Safety
/// pselect(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pselect(
    n: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    tmo: *const timespec,
    mask: *const sigset_t,
) -> c_int {
    let real = call_real!(PSELECT: fn(c_int, *mut libc::fd_set, *mut libc::fd_set, *mut libc::fd_set, *const timespec, *const sigset_t) -> c_int);
    // SAFETY: the program's pointer, checked.
    let mut deadline = if tmo.is_null() {
        None
    } else {
        // SAFETY: the program's timeout pointer, checked non-null.
        Some(Deadline::after_ts(unsafe { &*tmo }))
    };
    let mask_copy = if mask.is_null() { None } else { Some(super::signal::mask_without_ours(mask)) };
    retry_ours(|resumed| {
        let ts;
        let mut tp = tmo;
        if let (true, Some(d)) = (resumed, deadline.as_mut()) {
            d.continue_after_checkpoint();
            ts = d.remaining_ts();
            tp = &ts;
        }
        let mp = mask_copy.as_ref().map_or(core::ptr::null(), |m| m as *const sigset_t);
        // SAFETY: pointers valid for the call.
        unsafe { real(n, r, w, e, tp, mp) }
    })
}

/// # Safety
/// epoll_wait(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_wait(epfd: c_int, events: *mut libc::epoll_event, max: c_int, timeout: c_int) -> c_int {
    let real = call_real!(EPOLL_WAIT: fn(c_int, *mut libc::epoll_event, c_int, c_int) -> c_int);
    let mut deadline = Deadline::after_ms(timeout.max(0));
    retry_ours(|resumed| {
        let mut t = timeout;
        if resumed && timeout >= 0 {
            deadline.continue_after_checkpoint();
            t = deadline.remaining_ms();
        }
        // SAFETY: pass-through.
        unsafe { real(epfd, events, max, t) }
    })
}

/// # Safety
/// epoll_pwait(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
    mask: *const sigset_t,
) -> c_int {
    let real = call_real!(EPOLL_PWAIT: fn(c_int, *mut libc::epoll_event, c_int, c_int, *const sigset_t) -> c_int);
    let mut deadline = Deadline::after_ms(timeout.max(0));
    let mask_copy = if mask.is_null() { None } else { Some(super::signal::mask_without_ours(mask)) };
    retry_ours(|resumed| {
        let mut t = timeout;
        if resumed && timeout >= 0 {
            deadline.continue_after_checkpoint();
            t = deadline.remaining_ms();
        }
        let mp = mask_copy.as_ref().map_or(core::ptr::null(), |m| m as *const sigset_t);
        // SAFETY: pass-through.
        unsafe { real(epfd, events, max, t, mp) }
    })
}

/// # Safety
/// sigtimedwait(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigtimedwait(set: *const sigset_t, info: *mut libc::siginfo_t, tmo: *const timespec) -> c_int {
    let real = call_real!(SIGTIMEDWAIT: fn(*const sigset_t, *mut libc::siginfo_t, *const timespec) -> c_int);
    if set.is_null() {
        // SAFETY: pass-through.
        return unsafe { real(set, info, tmo) };
    }
    let copy = super::signal::mask_without_ours(set);
    // SAFETY: the program's pointer, checked.
    let mut deadline = if tmo.is_null() {
        None
    } else {
        // SAFETY: the program's timeout pointer, checked non-null.
        Some(Deadline::after_ts(unsafe { &*tmo }))
    };
    retry_ours(|resumed| {
        let ts;
        let mut tp = tmo;
        if let (true, Some(d)) = (resumed, deadline.as_mut()) {
            d.continue_after_checkpoint();
            ts = d.remaining_ts();
            tp = &ts;
        }
        // SAFETY: pointers valid for the call.
        unsafe { real(&copy, info, tp) }
    })
}

/// # Safety
/// sigwaitinfo(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigwaitinfo(set: *const sigset_t, info: *mut libc::siginfo_t) -> c_int {
    let real = call_real!(SIGWAITINFO: fn(*const sigset_t, *mut libc::siginfo_t) -> c_int);
    if set.is_null() {
        // SAFETY: pass-through.
        return unsafe { real(set, info) };
    }
    let copy = super::signal::mask_without_ours(set);
    // SAFETY: pointers valid for the call.
    retry_ours(|_| unsafe { real(&copy, info) })
}

/// # Safety
/// sem_timedwait(3)'s contract; the deadline is absolute (CLOCK_REALTIME), so a retry keeps it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sem_timedwait(sem: *mut libc::sem_t, abstime: *const timespec) -> c_int {
    let real = call_real!(SEM_TIMEDWAIT: fn(*mut libc::sem_t, *const timespec) -> c_int);
    // SAFETY: pass-through.
    retry_ours(|_| unsafe { real(sem, abstime) })
}
