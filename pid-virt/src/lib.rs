//! Virtual <-> real PID/TID translation.
//!
//! A managed program only ever sees *virtual* ids: the ones the kernel gave it when it was first
//! started. After a resume the kernel hands out new *real* ids; this table maps between the two.
//! It is a fixed array of atomics: no allocation and no locks, so the interposed `getpid`,
//! `kill`, … can consult it from any thread and from signal handlers. Writers are the
//! checkpoint/restore code (while the program is frozen) and the thread/fork hooks, which each
//! touch only their own entry.
#![no_std]

pub mod registry;

use core::sync::atomic::{AtomicI32, Ordering};

/// An id as the program sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VirtPid(pub i32);

/// An id as the kernel currently knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RealPid(pub i32);

/// How many ids one table holds (threads of one process plus relatives it knows).
pub const CAPACITY: usize = 4096;

/// Returned by [`PidTable::insert`] when every slot is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableFull;

struct Slot {
    virt: AtomicI32,
    real: AtomicI32,
}

/// The translation table. Slots with `virt == 0` are free.
pub struct PidTable {
    slots: [Slot; CAPACITY],
}

impl Default for PidTable {
    fn default() -> Self {
        Self::new()
    }
}

impl PidTable {
    pub const fn new() -> Self {
        #[allow(clippy::declare_interior_mutable_const)]
        const EMPTY: Slot = Slot { virt: AtomicI32::new(0), real: AtomicI32::new(0) };
        PidTable { slots: [EMPTY; CAPACITY] }
    }

    /// Records (or updates) the real id behind `virt`.
    pub fn insert(&self, virt: VirtPid, real: RealPid) -> Result<(), TableFull> {
        if virt.0 <= 0 {
            return Ok(());
        }
        for slot in &self.slots {
            if slot.virt.load(Ordering::Acquire) == virt.0 {
                slot.real.store(real.0, Ordering::Release);
                return Ok(());
            }
        }
        for slot in &self.slots {
            if slot.virt.compare_exchange(0, virt.0, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                slot.real.store(real.0, Ordering::Release);
                return Ok(());
            }
        }
        Err(TableFull)
    }

    /// Forgets `virt` (a thread or child that is gone).
    pub fn remove(&self, virt: VirtPid) {
        for slot in &self.slots {
            if slot.virt.load(Ordering::Acquire) == virt.0 {
                slot.real.store(0, Ordering::Release);
                slot.virt.store(0, Ordering::Release);
            }
        }
    }

    /// The real id for `virt`; ids the table does not know are passed through unchanged, so
    /// an unmanaged process keeps being addressed by its own id.
    pub fn to_real(&self, virt: VirtPid) -> RealPid {
        if virt.0 > 0 {
            for slot in &self.slots {
                if slot.virt.load(Ordering::Acquire) == virt.0 {
                    let real = slot.real.load(Ordering::Acquire);
                    if real != 0 {
                        return RealPid(real);
                    }
                }
            }
        }
        RealPid(virt.0)
    }

    /// The virtual id for `real`; unknown ids pass through unchanged.
    pub fn to_virt(&self, real: RealPid) -> VirtPid {
        if real.0 > 0 {
            for slot in &self.slots {
                if slot.real.load(Ordering::Acquire) == real.0 {
                    let virt = slot.virt.load(Ordering::Acquire);
                    if virt != 0 {
                        return VirtPid(virt);
                    }
                }
            }
        }
        VirtPid(real.0)
    }

    /// Translates a pid argument of kill()/waitpid(): negative values name process groups,
    /// 0 and -1 keep their special meaning.
    pub fn pid_arg_to_real(&self, pid: i32) -> i32 {
        match pid {
            0 | -1 | i32::MIN => pid,
            p if p > 0 => self.to_real(VirtPid(p)).0,
            p => -self.to_real(VirtPid(-p)).0,
        }
    }

    /// Visits every (virtual, real) pair.
    pub fn for_each(&self, mut f: impl FnMut(VirtPid, RealPid)) {
        for slot in &self.slots {
            let virt = slot.virt.load(Ordering::Acquire);
            if virt != 0 {
                f(VirtPid(virt), RealPid(slot.real.load(Ordering::Acquire)));
            }
        }
    }

    /// How many ids the table holds.
    pub fn len(&self) -> usize {
        let mut n = 0;
        self.for_each(|_, _| n += 1);
        n
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_ids_pass_through() {
        let t = PidTable::new();
        assert_eq!(t.to_real(VirtPid(42)), RealPid(42));
        assert_eq!(t.to_virt(RealPid(42)), VirtPid(42));
    }

    #[test]
    fn translates_both_ways_and_updates() {
        let t = PidTable::new();
        t.insert(VirtPid(100), RealPid(100)).unwrap();
        t.insert(VirtPid(100), RealPid(7000)).unwrap();
        assert_eq!(t.to_real(VirtPid(100)), RealPid(7000));
        assert_eq!(t.to_virt(RealPid(7000)), VirtPid(100));
        assert_eq!(t.len(), 1);
        assert_eq!(t.pid_arg_to_real(-100), -7000);
        assert_eq!(t.pid_arg_to_real(0), 0);
        assert_eq!(t.pid_arg_to_real(-1), -1);
        t.remove(VirtPid(100));
        assert!(t.is_empty());
        assert_eq!(t.to_real(VirtPid(100)), RealPid(100));
    }

    #[test]
    fn full_table_reports() {
        let t = PidTable::new();
        for i in 1..=CAPACITY as i32 {
            t.insert(VirtPid(i), RealPid(i + 1_000_000)).unwrap();
        }
        assert_eq!(t.insert(VirtPid(-5), RealPid(1)), Ok(()));
        assert_eq!(t.insert(VirtPid(999_999), RealPid(1)), Err(TableFull));
    }
}
