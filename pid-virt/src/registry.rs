//! The tree registry: one small shared-memory table per process tree. Every managed process of
//! the tree maps it (a memfd inherited across fork and exec at a reserved descriptor) and puts
//! itself in: (real pid, virtual pid, start time). A checkpoint reads it to find every member,
//! orphans included; a resume uses it as the meeting point (everyone restored?) and as the
//! place where each process learns the others' new real pids. Plain atomics in a `#[repr(C)]`
//! layout shared by libmigrate and migrate-resume; no allocation, no locks.

use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

pub const MAGIC: u64 = 0x7472_6565_6772_696d; // "migrtree"
/// The descriptor number the registry's memfd has in every member.
pub const FD: i32 = 1002;
pub const MAX_MEMBERS: usize = 4096;
/// Bytes of the shared mapping.
pub const SIZE: usize = core::mem::size_of::<Registry>().next_multiple_of(4096);

#[repr(C)]
pub struct Member {
    pub real: AtomicI32,
    pub vpid: AtomicI32,
    /// Start time (clock ticks after boot, /proc/<pid>/stat field 22): tells a reused pid.
    pub start_time: AtomicU64,
}

#[repr(C)]
pub struct Registry {
    pub magic: AtomicU64,
    /// Processes a resume creates; each restored process counts itself in `restored`.
    pub expected: AtomicU32,
    pub restored: AtomicU32,
    /// Bumped when everyone has arrived (futex word).
    pub released: AtomicU32,
    /// Processes of a resume whose restore failed: the others give up rather than run a tree
    /// with a process missing.
    pub failed: AtomicU32,
    pub members: [Member; MAX_MEMBERS],
}

/// A registry full of members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryFull;

impl Registry {
    /// Initialises a zeroed mapping.
    pub fn init(&self) {
        self.magic.store(MAGIC, Ordering::Release);
    }

    pub fn is_valid(&self) -> bool {
        self.magic.load(Ordering::Acquire) == MAGIC
    }

    /// Records `real` (virtual `vpid`), replacing a stale entry for the same real pid.
    pub fn join(&self, real: i32, vpid: i32, start_time: u64) -> Result<(), RegistryFull> {
        for m in &self.members {
            if m.real.load(Ordering::Acquire) == real {
                m.vpid.store(vpid, Ordering::Release);
                m.start_time.store(start_time, Ordering::Release);
                return Ok(());
            }
        }
        for m in &self.members {
            if m.real.compare_exchange(0, real, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                m.vpid.store(vpid, Ordering::Release);
                m.start_time.store(start_time, Ordering::Release);
                return Ok(());
            }
        }
        Err(RegistryFull)
    }

    /// Forgets `real`.
    pub fn leave(&self, real: i32) {
        for m in &self.members {
            if m.real.load(Ordering::Acquire) == real {
                m.vpid.store(0, Ordering::Release);
                m.start_time.store(0, Ordering::Release);
                m.real.store(0, Ordering::Release);
            }
        }
    }

    /// Visits every entry (real, vpid, start time); the caller checks liveness.
    pub fn for_each(&self, mut f: impl FnMut(i32, i32, u64)) {
        for m in &self.members {
            let real = m.real.load(Ordering::Acquire);
            if real > 0 {
                f(real, m.vpid.load(Ordering::Acquire), m.start_time.load(Ordering::Acquire));
            }
        }
    }

    /// The virtual pid recorded for `real`.
    pub fn vpid_of(&self, real: i32) -> Option<i32> {
        self.members.iter().find(|m| m.real.load(Ordering::Acquire) == real).map(|m| m.vpid.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> &'static Registry {
        extern crate std;
        let b = std::boxed::Box::new(core::mem::MaybeUninit::<Registry>::zeroed());
        // SAFETY: all-zero is a valid Registry (atomics of zero).
        let r: &'static Registry = unsafe { std::boxed::Box::leak(b).assume_init_ref() };
        r.init();
        r
    }

    #[test]
    fn join_replace_leave() {
        let r = fresh();
        assert!(r.is_valid());
        r.join(100, 10, 5).unwrap();
        r.join(200, 20, 6).unwrap();
        r.join(100, 11, 7).unwrap();
        let mut seen = std::vec::Vec::new();
        extern crate std;
        r.for_each(|a, b, c| seen.push((a, b, c)));
        assert_eq!(seen, [(100, 11, 7), (200, 20, 6)]);
        assert_eq!(r.vpid_of(200), Some(20));
        r.leave(100);
        assert_eq!(r.vpid_of(100), None);
    }
}
