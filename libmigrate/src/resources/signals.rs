//! Signal dispositions and pending signals. Dump: the kernel's sigaction for every signal, and
//! the process-wide pending signals dequeued with their siginfo (threads dequeue their private
//! ones themselves while parking, see checkpoint/suspend.rs). Restore: rt_sigaction verbatim
//! (handler addresses are valid: the layout is identical), pending signals re-queued to self,
//! which keeps their siginfo (rt_sigqueueinfo to one's own process accepts any si_code).

use crate::state;
use crate::sys;
use alloc::vec::Vec;
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
    let mut out = Vec::new();
    let mut info = [0u8; 128];
    while out.len() < 1024 {
        match sys::rt_sigtimedwait_now(set, &mut info) {
            Ok(Some(signo)) => out.push(SigInfoEntry { signo, info: info.to_vec() }),
            _ => break,
        }
    }
    out
}

pub fn dump(shared_pending: Vec<SigInfoEntry>) -> SignalsEntry {
    SignalsEntry {
        actions: dump_actions(),
        shared_pending,
        checkpoint_signal: state::CHECKPOINT_SIGNAL.load(core::sync::atomic::Ordering::Relaxed),
    }
}

fn info_array(e: &SigInfoEntry) -> [u8; 128] {
    let mut info = [0u8; 128];
    let n = e.info.len().min(128);
    info[..n].copy_from_slice(&e.info[..n]);
    info
}

/// Puts dequeued signals back: process-wide ones to the process, private ones to their thread.
pub fn requeue(shared: &[SigInfoEntry], private: &[(i32, Vec<SigInfoEntry>)]) {
    let pid = sys::getpid();
    for e in shared {
        if let Err(err) = sys::rt_sigqueueinfo(pid, e.signo, &info_array(e)) {
            crate::info!("cannot re-queue pending signal {}: {err}", e.signo);
        }
    }
    for (tid, list) in private {
        for e in list {
            if let Err(err) = sys::rt_tgsigqueueinfo(pid, *tid, e.signo, &info_array(e)) {
                crate::info!("cannot re-queue pending signal {} for thread {tid}: {err}", e.signo);
            }
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
