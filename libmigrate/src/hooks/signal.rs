//! Signal virtualization: libmigrate owns the checkpoint signal and the suspend signal. The
//! program may install handlers for them or block them as it likes; those calls are recorded
//! and reported back (virtualized) but never reach the kernel, so a checkpoint can always stop it.

use super::next::{call_real, real_fn};
use crate::state::{self, CHECKPOINT_SIGNAL, SUSPEND_SIGNAL};
use core::cell::Cell;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use libc::{c_int, sigset_t};

real_fn!(SIGACTION, b"sigaction\0");
real_fn!(SIGNAL, b"signal\0");
real_fn!(SIGPROCMASK, b"sigprocmask\0");
real_fn!(PTHREAD_SIGMASK, b"pthread_sigmask\0");
real_fn!(SIGSUSPEND, b"sigsuspend\0");
real_fn!(SIGNALFD, b"signalfd\0");
real_fn!(SIGWAIT, b"sigwait\0");

pub fn resolve() {
    for r in [&SIGACTION, &SIGNAL, &SIGPROCMASK, &PTHREAD_SIGMASK, &SIGSUSPEND, &SIGNALFD, &SIGWAIT] {
        r.get();
    }
}

/// The program's view of the disposition of one of our signals.
struct VirtualAction {
    handler: AtomicUsize,
    flags: AtomicU64,
    mask: AtomicU64,
}

static VIRTUAL: [VirtualAction; 2] = [
    VirtualAction { handler: AtomicUsize::new(0), flags: AtomicU64::new(0), mask: AtomicU64::new(0) },
    VirtualAction { handler: AtomicUsize::new(0), flags: AtomicU64::new(0), mask: AtomicU64::new(0) },
];
static WARNED: AtomicBool = AtomicBool::new(false);

fn virtual_slot(sig: c_int) -> Option<&'static VirtualAction> {
    if sig == CHECKPOINT_SIGNAL.load(Ordering::Relaxed) {
        Some(&VIRTUAL[0])
    } else if sig == SUSPEND_SIGNAL {
        Some(&VIRTUAL[1])
    } else {
        None
    }
}

fn warn_clash(sig: c_int, handler: usize) {
    if handler != libc::SIG_DFL && handler != libc::SIG_IGN && !WARNED.swap(true, Ordering::Relaxed) {
        crate::info!(
            "the program installs a handler for signal {sig}, which migrate uses for checkpoints; its handler \
             will not run (start it with `migrate-run --signal <other>` to leave this signal to the program)"
        );
    }
}

/// Removes our signals from a signal set, returning a copy.
fn without_ours(set: *const sigset_t) -> sigset_t {
    // SAFETY: the caller passes a valid sigset_t (the program's argument, checked non-null).
    let mut copy = unsafe { *set };
    // SAFETY: copy is a valid sigset_t.
    unsafe {
        libc::sigdelset(&mut copy, SUSPEND_SIGNAL);
        libc::sigdelset(&mut copy, CHECKPOINT_SIGNAL.load(Ordering::Relaxed));
    }
    copy
}

thread_local! {
    /// Which of our signals this thread's program code believes it has blocked (kernel
    /// signal-set bits); `None` until the thread first changes its mask.
    static VIRTUAL_BLOCKED: Cell<Option<u64>> = const { Cell::new(None) };
}
/// The last virtual blocked set any thread established: a new thread inherits its creator's
/// mask, and programs block signals in main before creating threads.
static LAST_VIRTUAL_BLOCKED: AtomicU64 = AtomicU64::new(0);

fn set_bits(set: *const sigset_t) -> u64 {
    // SAFETY: sigset_t is at least 8 bytes; the kernel's view is its first word.
    unsafe { *(set as *const u64) }
}

/// Blocks or unblocks signals, never ours; the program's own view of our signals is kept
/// apart and reported back.
fn filtered_mask(
    how: c_int,
    set: *const sigset_t,
    old: *mut sigset_t,
    real: unsafe extern "C" fn(c_int, *const sigset_t, *mut sigset_t) -> c_int,
) -> c_int {
    let ours = own_bits();
    let before = VIRTUAL_BLOCKED.with(|v| v.get()).unwrap_or_else(|| LAST_VIRTUAL_BLOCKED.load(Ordering::Relaxed));
    let r = if set.is_null() {
        // SAFETY: plain pass-through of the program's arguments.
        unsafe { real(how, set, old) }
    } else {
        let copy = without_ours(set);
        // SAFETY: `copy` lives across the call; `old` is the program's pointer.
        unsafe { real(how, &copy, old) }
    };
    if r != 0 {
        return r;
    }
    if !set.is_null() {
        let asked = set_bits(set) & ours;
        let after = match how {
            libc::SIG_BLOCK => before | asked,
            libc::SIG_UNBLOCK => before & !asked,
            libc::SIG_SETMASK => asked,
            _ => before,
        };
        VIRTUAL_BLOCKED.with(|v| v.set(Some(after)));
        LAST_VIRTUAL_BLOCKED.store(after, Ordering::Relaxed);
    }
    if !old.is_null() {
        // SAFETY: the program's out-pointer, just filled by the real call.
        unsafe { *(old as *mut u64) = (*(old as *mut u64) & !ours) | before };
    }
    r
}

/// # Safety
/// Called by the program with sigaction(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int {
    if let Some(v) = virtual_slot(sig) {
        if !old.is_null() {
            // SAFETY: `old` is the program's valid out-pointer.
            unsafe {
                core::ptr::write_bytes(old, 0, 1);
                (*old).sa_sigaction = v.handler.load(Ordering::Relaxed);
                (*old).sa_flags = v.flags.load(Ordering::Relaxed) as c_int;
                *(&mut (*old).sa_mask as *mut sigset_t as *mut u64) = v.mask.load(Ordering::Relaxed);
            }
        }
        if !act.is_null() {
            // SAFETY: `act` is the program's valid pointer.
            let a = unsafe { &*act };
            warn_clash(sig, a.sa_sigaction);
            v.handler.store(a.sa_sigaction, Ordering::Relaxed);
            v.flags.store(a.sa_flags as u64, Ordering::Relaxed);
            // SAFETY: sigset_t is at least 8 bytes.
            v.mask.store(unsafe { *(&a.sa_mask as *const sigset_t as *const u64) }, Ordering::Relaxed);
        }
        return 0;
    }
    let real = call_real!(SIGACTION: fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int);
    // SAFETY: pass-through of the program's arguments.
    unsafe { real(sig, act, old) }
}

/// # Safety
/// signal(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    if let Some(v) = virtual_slot(sig) {
        warn_clash(sig, handler);
        v.flags.store(libc::SA_RESTART as u64, Ordering::Relaxed);
        return v.handler.swap(handler, Ordering::Relaxed);
    }
    let real = call_real!(SIGNAL: fn(c_int, libc::sighandler_t) -> libc::sighandler_t);
    // SAFETY: pass-through.
    unsafe { real(sig, handler) }
}

/// # Safety
/// sigprocmask(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigprocmask(how: c_int, set: *const sigset_t, old: *mut sigset_t) -> c_int {
    let real = call_real!(SIGPROCMASK: fn(c_int, *const sigset_t, *mut sigset_t) -> c_int);
    filtered_mask(how, set, old, real)
}

/// # Safety
/// pthread_sigmask(3)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_sigmask(how: c_int, set: *const sigset_t, old: *mut sigset_t) -> c_int {
    let real = call_real!(PTHREAD_SIGMASK: fn(c_int, *const sigset_t, *mut sigset_t) -> c_int);
    filtered_mask(how, set, old, real)
}

/// # Safety
/// sigsuspend(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigsuspend(set: *const sigset_t) -> c_int {
    let real = call_real!(SIGSUSPEND: fn(*const sigset_t) -> c_int);
    if set.is_null() {
        // SAFETY: pass-through (the real call reports EFAULT).
        return unsafe { real(set) };
    }
    let copy = without_ours(set);
    // SAFETY: `copy` is valid for the call.
    unsafe { real(&copy) }
}

/// # Safety
/// signalfd(2)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn signalfd(fd: c_int, set: *const sigset_t, flags: c_int) -> c_int {
    let real = call_real!(SIGNALFD: fn(c_int, *const sigset_t, c_int) -> c_int);
    if set.is_null() {
        // SAFETY: pass-through.
        return unsafe { real(fd, set, flags) };
    }
    let copy = without_ours(set);
    // SAFETY: `copy` is valid for the call.
    unsafe { real(fd, &copy, flags) }
}

/// # Safety
/// sigwait(3)'s contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigwait(set: *const sigset_t, sig: *mut c_int) -> c_int {
    let real = call_real!(SIGWAIT: fn(*const sigset_t, *mut c_int) -> c_int);
    if set.is_null() {
        // SAFETY: pass-through.
        return unsafe { real(set, sig) };
    }
    let copy = without_ours(set);
    // sigwait is restarted by glibc on EINTR itself.
    // SAFETY: `copy` is valid for the call.
    unsafe { real(&copy, sig) }
}

/// A copy of `set` without our signals, for the time hooks' sigwaitinfo/sigtimedwait.
pub fn mask_without_ours(set: *const sigset_t) -> sigset_t {
    without_ours(set)
}

pub fn own_bits() -> u64 {
    state::own_signal_bits()
}
