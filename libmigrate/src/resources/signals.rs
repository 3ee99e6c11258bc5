//! Signal dispositions and pending signals. Dump: the kernel's sigaction for every signal, and
//! the process-wide pending signals dequeued with their siginfo (threads dequeue their private
//! ones themselves while parking, see checkpoint/suspend.rs). Restore: rt_sigaction verbatim
//! (handler addresses are valid: the layout is identical); pending signals are re-queued by the
//! threads themselves after the release, which keeps their siginfo (the kernel accepts any
//! si_code when a thread queues to its own id).

use crate::state;
use crate::sys;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, Ordering};
use migrate_image::{SigActionEntry, SigInfoEntry, SignalsEntry};

pub fn dump_actions() -> Vec<SigActionEntry> {
    let mut out = Vec::with_capacity(64);
    for signo in 1..=64 {
        if signo == libc::SIGKILL || signo == libc::SIGSTOP {
            continue;
        }
        let mut act = sys::KernelSigaction::default();
        if sys::rt_sigaction(signo, None, Some(&mut act)).is_ok() {
            out.push(SigActionEntry {
                signo,
                handler: act.handler as u64,
                flags: act.flags,
                restorer: act.restorer as u64,
                mask: act.mask,
            });
        }
    }
    out
}

/// Dequeues the process-wide pending signals (called on the checkpoint thread, which blocks
/// every signal, while all program threads are parked).
pub fn take_shared_pending() -> Vec<SigInfoEntry> {
    let set = !state::own_signal_bits() & !((1 << (libc::SIGKILL - 1)) | (1 << (libc::SIGSTOP - 1)));
    discard_own_pending(set);
    let mut out = Vec::new();
    // SAFETY: see SharedPending: no program thread runs now.
    let infos = unsafe { &mut *SHARED_PENDING.infos.get() };
    while out.len() < MAX_SHARED_PENDING {
        match sys::rt_sigtimedwait_now(set, &mut infos[out.len()]) {
            Ok(Some(signo)) => out.push(SigInfoEntry { signo, info: infos[out.len()].to_vec() }),
            _ => break,
        }
    }
    SHARED_PENDING.count.store(out.len() as u32, Ordering::Release);
    out
}

/// Signals pending for the checkpoint thread alone are libmigrate's own — SIGPIPE from answering
/// a migrate-checkpoint that was killed meanwhile, SIGXFSZ from an image write over the file
/// size limit — and never reached the program (the thread blocks every signal). rt_sigtimedwait
/// takes the calling thread's own signals before the process-wide ones, so they are dropped
/// first: saved as process-wide and re-queued after the checkpoint, they would kill the program.
fn discard_own_pending(set: u64) {
    let mut info = [0u8; 128];
    for _ in 0..256 {
        let own = crate::checkpoint::suspend::private_pending_set() & set;
        if own == 0 {
            return;
        }
        // One signal at a time, so that none of the same number pending process-wide is taken.
        match sys::rt_sigtimedwait_now(own & own.wrapping_neg(), &mut info) {
            Ok(Some(signo)) => crate::debug!("dropped signal {signo}, pending for the checkpoint thread itself"),
            _ => return,
        }
    }
}

pub fn dump(shared_pending: Vec<SigInfoEntry>) -> SignalsEntry {
    SignalsEntry {
        actions: dump_actions(),
        shared_pending,
        checkpoint_signal: state::CHECKPOINT_SIGNAL.load(core::sync::atomic::Ordering::Relaxed),
    }
}

/// Process-wide pending signals dequeued by the last checkpoint, waiting to be re-queued by the
/// main thread (the kernel lets a thread queue a signal with the sender's siginfo only to its
/// own id, and the process's id is the main thread's).
pub struct SharedPending {
    count: AtomicU32,
    infos: UnsafeCell<[[u8; 128]; MAX_SHARED_PENDING]>,
}
// SAFETY: filled by the checkpoint thread while every program thread is parked, read by the main
// thread after the release (RELEASE's ordering separates the two).
unsafe impl Sync for SharedPending {}
pub const MAX_SHARED_PENDING: usize = 64;
pub static SHARED_PENDING: SharedPending =
    SharedPending { count: AtomicU32::new(0), infos: UnsafeCell::new([[0; 128]; MAX_SHARED_PENDING]) };

fn requeue_one(pid: i32, tid: Option<i32>, info: &[u8; 128]) {
    let signo = i32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
    let res = match tid {
        Some(tid) => sys::rt_tgsigqueueinfo(pid, tid, signo, info),
        None => sys::rt_sigqueueinfo(pid, signo, info),
    };
    if let Err(err) = res {
        crate::info!("cannot re-queue pending signal {signo}: {err}");
    }
}

/// Re-queues, on the calling thread, the signals it had pending alone; on the main thread also
/// the process-wide ones. Runs in each parked thread's handler after the release.
pub fn requeue_for_current_thread(private: &[[u8; 128]]) {
    let pid = sys::getpid();
    let tid = sys::gettid();
    for info in private {
        requeue_one(pid, Some(tid), info);
    }
    if tid == pid {
        let n = (SHARED_PENDING.count.swap(0, Ordering::AcqRel) as usize).min(MAX_SHARED_PENDING);
        crate::debug!("main thread re-queues {n} process-wide and {} private pending signals", private.len());
        // SAFETY: see SharedPending.
        let infos = unsafe { &*SHARED_PENDING.infos.get() };
        for info in &infos[..n] {
            requeue_one(pid, None, info);
        }
    }
}

/// Restores every disposition (our own handlers included: they are in the saved set too).
pub fn restore_actions(s: &SignalsEntry) {
    for a in &s.actions {
        let act = sys::KernelSigaction {
            handler: a.handler as usize,
            flags: a.flags,
            restorer: a.restorer as usize,
            mask: a.mask,
        };
        if let Err(e) = sys::rt_sigaction(a.signo, Some(&act), None) {
            crate::debug!("cannot restore the disposition of signal {}: {e}", a.signo);
        }
    }
}
