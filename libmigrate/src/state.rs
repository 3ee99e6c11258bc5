//! Process-wide state of libmigrate. Plain atomics and fixed arrays: it is read by hooks on
//! any program thread and by signal handlers, and it is part of the checkpointed memory, so a
//! restored process finds it as it was (the restore path then updates what the kernel changed).

use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use pid_virt::{PidTable, RealPid, VirtPid};

/// The reserved real-time signal that parks program threads (SIGRTMAX-1 in glibc's numbering).
pub const SUSPEND_SIGNAL: i32 = 63;
/// Default checkpoint signal.
pub const DEFAULT_CHECKPOINT_SIGNAL: i32 = libc::SIGUSR2;

/// The signal that triggers a checkpoint in this process.
pub static CHECKPOINT_SIGNAL: AtomicI32 = AtomicI32::new(DEFAULT_CHECKPOINT_SIGNAL);
/// The pid the program sees (its pid when first started).
pub static VIRTUAL_PID: AtomicI32 = AtomicI32::new(0);
pub static PIDS: PidTable = PidTable::new();

/// Bumped by the checkpoint signal's handler and at the start of every checkpoint: a hook
/// whose blocking call failed with EINTR knows from it whether the interruption was ours.
pub static INTERRUPTIONS: AtomicU64 = AtomicU64::new(0);
/// CLOCK_MONOTONIC (of the host where the checkpoint ran) when the program was frozen; hooks
/// that continue a timed wait compute the time that remained at that moment.
pub static FREEZE_MONOTONIC_NS: AtomicU64 = AtomicU64::new(0);

/// libmigrate's own descriptors live at and above this number, out of the program's way.
pub const OWN_FD_BASE: i32 = 1000;
pub static CONTROL_FD: AtomicI32 = AtomicI32::new(-1);
pub static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

/// Set once the process runs as a managed process (constructor finished).
pub static ACTIVE: AtomicU32 = AtomicU32::new(0);

pub fn virtual_pid() -> i32 {
    match VIRTUAL_PID.load(Ordering::Relaxed) {
        0 => crate::sys::getpid(),
        v => v,
    }
}

pub fn to_virt(real: i32) -> i32 {
    PIDS.to_virt(RealPid(real)).0
}

/// A resumed root that led its process group (or session) but now lives in its caller's —
/// migrate-resume's, whose job control must keep reaching it — answers to the original id:
/// (virtual id, real id) of that group and session.
pub static GROUP_ALIAS: [AtomicI32; 2] = [AtomicI32::new(0), AtomicI32::new(0)];
pub static SESSION_ALIAS: [AtomicI32; 2] = [AtomicI32::new(0), AtomicI32::new(0)];

/// A real process-group id as the program sees it.
pub fn pgid_to_virt(real: i32) -> i32 {
    if real > 0 && real == GROUP_ALIAS[1].load(Ordering::Relaxed) {
        return GROUP_ALIAS[0].load(Ordering::Relaxed);
    }
    to_virt(real)
}

/// A real session id as the program sees it.
pub fn sid_to_virt(real: i32) -> i32 {
    if real > 0 && real == SESSION_ALIAS[1].load(Ordering::Relaxed) {
        return SESSION_ALIAS[0].load(Ordering::Relaxed);
    }
    to_virt(real)
}

/// A virtual process-group id as the kernel knows it.
pub fn pgid_to_real(virt: i32) -> i32 {
    if virt > 0 && virt == GROUP_ALIAS[0].load(Ordering::Relaxed) {
        return GROUP_ALIAS[1].load(Ordering::Relaxed);
    }
    to_real(virt)
}

pub fn to_real(virt: i32) -> i32 {
    PIDS.to_real(VirtPid(virt)).0
}

/// Is `fd` one of libmigrate's own descriptors?
pub fn is_own_fd(fd: i32) -> bool {
    fd == CONTROL_FD.load(Ordering::Relaxed)
        || fd == WAKE_FD.load(Ordering::Relaxed)
        || (fd == crate::tree::REGISTRY_FD && crate::tree::registry().is_some())
}

/// Every signal but glibc's two internal ones (32: thread cancellation, 33: SIGSETXID, with
/// which setuid/setgid in a threaded process makes every thread change credentials and waits
/// for each): the checkpoint thread must take those, or a program dropping privileges hangs.
pub const ALL_BUT_GLIBC_INTERNAL: u64 = !((1u64 << 31) | (1u64 << 32));

/// Signal-set bits (kernel layout: bit n-1 for signal n) of the signals libmigrate owns.
pub fn own_signal_bits() -> u64 {
    (1u64 << (SUSPEND_SIGNAL - 1)) | (1u64 << (CHECKPOINT_SIGNAL.load(Ordering::Relaxed) - 1))
}
