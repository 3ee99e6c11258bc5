//! Threads. Dump: each parked program thread's slot (checkpoint/suspend.rs) becomes a
//! ThreadEntry; the checkpoint thread describes itself. Restore: restore/switch.rs clones each
//! thread onto its saved context with its fs base and glibc's tid field; the thread re-registers
//! the rest itself (suspend.rs, `reinstate_current_thread`).

use crate::checkpoint::suspend::ThreadSlot;
use crate::sys;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;
use migrate_image::{SigInfoEntry, ThreadEntry};

fn name_string(raw: [u8; 16]) -> String {
    let end = raw.iter().position(|&c| c == 0).unwrap_or(16);
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

pub fn from_slot(slot: &ThreadSlot) -> ThreadEntry {
    ThreadEntry {
        vtid: slot.vtid.load(Ordering::Relaxed),
        is_checkpoint_thread: false,
        fs_base: slot.fs_base.load(Ordering::Relaxed),
        tid_address: slot.tid_address.load(Ordering::Relaxed),
        robust_list: slot.robust_head.load(Ordering::Relaxed),
        robust_list_len: slot.robust_len.load(Ordering::Relaxed),
        resume_sp: slot.resume_sp(),
        name: name_string(slot.name_bytes()),
        affinity: slot.affinity.iter().map(|a| a.load(Ordering::Relaxed)).collect(),
        pending: slot
            .pending()
            .iter()
            .map(|i| SigInfoEntry { signo: i32::from_ne_bytes([i[0], i[1], i[2], i[3]]), info: i.to_vec() })
            .collect(),
    }
}

/// The checkpoint thread's own entry (its resume_sp is filled in once it has saved itself).
pub fn checkpoint_thread_entry(vtid: i32) -> ThreadEntry {
    let mut name = [0u8; 16];
    sys::get_thread_name(&mut name);
    let (robust_list, robust_list_len) = sys::get_robust_list();
    ThreadEntry {
        vtid,
        is_checkpoint_thread: true,
        fs_base: sys::arch_get_fs(),
        tid_address: sys::get_tid_address(),
        robust_list,
        robust_list_len,
        resume_sp: 0,
        name: name_string(name),
        affinity: Vec::new(),
        pending: Vec::new(),
    }
}
