//! libmigrate's private allocator.
//!
//! glibc's malloc can't be used while the program is frozen (a parked thread may hold its lock),
//! so all of libmigrate's Rust allocations come from here: one large `MAP_NORESERVE` region
//! reserved at the first allocation. Keeping every allocation inside one VMA matters for
//! checkpoints too: allocating while the address space is being described never adds a mapping
//! that the description misses. Small blocks come from power-of-two size classes with free
//! lists; large ones are page runs with a first-fit free list and are returned to the kernel
//! with MADV_DONTNEED when freed (so they cost nothing in an image).
//!
//! The lock is a spinlock that only libmigrate's own code takes; hooks never allocate, so a
//! parked program thread can never hold it. Fork handlers take it around fork().

use crate::sys;
use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicBool, Ordering};

const REGION_SIZE: usize = 4 << 30;
const MIN_REGION_SIZE: usize = 16 << 20;
const PAGE: usize = 4096;
const MIN_CLASS: usize = 16;
const NUM_CLASSES: usize = 12; // 16 B .. 32 KiB
const MAX_SMALL: usize = MIN_CLASS << (NUM_CLASSES - 1);
const MAX_LARGE_FREE: usize = 256;

struct State {
    base: usize,
    bump: usize,
    /// Length of the region at `base` (REGION_SIZE unless an address-space limit forbids it).
    size: usize,
    free_small: [usize; NUM_CLASSES],
    /// The current chunk of each class, handed out front to back (untouched pages stay
    /// untouched, so they cost nothing in an image).
    chunk_next: [usize; NUM_CLASSES],
    chunk_end: [usize; NUM_CLASSES],
    free_large: [(usize, usize); MAX_LARGE_FREE],
    nfree_large: usize,
}

pub struct Arena {
    lock: AtomicBool,
    state: core::cell::UnsafeCell<State>,
}

// SAFETY: `state` is only touched while `lock` is held.
unsafe impl Sync for Arena {}

impl Arena {
    pub const fn new() -> Self {
        Arena {
            lock: AtomicBool::new(false),
            state: core::cell::UnsafeCell::new(State {
                base: 0,
                bump: 0,
                size: 0,
                free_small: [0; NUM_CLASSES],
                chunk_next: [0; NUM_CLASSES],
                chunk_end: [0; NUM_CLASSES],
                free_large: [(0, 0); MAX_LARGE_FREE],
                nfree_large: 0,
            }),
        }
    }

    pub fn lock(&self) {
        while self.lock.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            // SAFETY: sched_yield has no arguments.
            unsafe { sys::syscall6(libc::SYS_sched_yield, 0, 0, 0, 0, 0, 0) };
        }
    }

    pub fn unlock(&self) {
        self.lock.store(false, Ordering::Release);
    }

    /// Resets the lock in a fork child, where the thread that held it does not exist.
    pub fn reset_lock_in_child(&self) {
        self.lock.store(false, Ordering::Release);
    }

    /// # Safety
    /// The caller holds the lock, so no other reference to the state exists.
    #[allow(clippy::mut_from_ref)]
    unsafe fn state(&self) -> &mut State {
        // SAFETY: per the contract, the lock makes this the only reference.
        unsafe { &mut *self.state.get() }
    }

    fn ensure_region(st: &mut State) -> bool {
        if st.base != 0 {
            return true;
        }
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // A reservation counts against RLIMIT_AS (ulimit -v) and, being private and writable,
        // RLIMIT_DATA (ulimit -d) like any mapping: under a limit, take a sixteenth of it (so
        // the program keeps its room), smaller still if that fails.
        let limit = [libc::RLIMIT_AS, libc::RLIMIT_DATA]
            .into_iter()
            .filter_map(|r| sys::prlimit(r, None).ok())
            .map(|l| l.rlim_cur)
            .min()
            .unwrap_or(libc::RLIM64_INFINITY);
        let mut size = if limit == libc::RLIM64_INFINITY {
            REGION_SIZE
        } else {
            ((limit / 16) as usize).clamp(MIN_REGION_SIZE, REGION_SIZE) & !(PAGE - 1)
        };
        loop {
            match sys::mmap(0, size, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) {
                Ok(addr) => {
                    st.base = addr;
                    st.bump = addr;
                    st.size = size;
                    return true;
                }
                Err(_) if size > MIN_REGION_SIZE => size /= 2,
                Err(_) => return false,
            }
        }
    }

    fn bump(st: &mut State, size: usize) -> usize {
        let size = (size + PAGE - 1) & !(PAGE - 1);
        if st.bump + size > st.base + st.size {
            return 0;
        }
        let p = st.bump;
        st.bump += size;
        p
    }

    fn class_of(size: usize) -> usize {
        let size = size.max(MIN_CLASS);
        (usize::BITS - (size - 1).leading_zeros()) as usize - 4
    }

    fn alloc_small(st: &mut State, class: usize) -> usize {
        let head = st.free_small[class];
        if head != 0 {
            // SAFETY: free blocks store the next pointer in their first word.
            st.free_small[class] = unsafe { *(head as *const usize) };
            return head;
        }
        let block = MIN_CLASS << class;
        if st.chunk_next[class] + block > st.chunk_end[class] {
            let chunk = (block * 64).max(64 * 1024);
            let start = Self::bump(st, chunk);
            if start == 0 {
                return 0;
            }
            st.chunk_next[class] = start;
            st.chunk_end[class] = start + chunk;
        }
        let p = st.chunk_next[class];
        st.chunk_next[class] += block;
        p
    }

    fn alloc_large(st: &mut State, size: usize) -> usize {
        let size = (size + PAGE - 1) & !(PAGE - 1);
        for i in 0..st.nfree_large {
            let (addr, len) = st.free_large[i];
            if len >= size {
                if len == size {
                    st.nfree_large -= 1;
                    st.free_large[i] = st.free_large[st.nfree_large];
                } else {
                    st.free_large[i] = (addr + size, len - size);
                }
                return addr;
            }
        }
        Self::bump(st, size)
    }

    fn free_large(st: &mut State, addr: usize, size: usize) {
        let size = (size + PAGE - 1) & !(PAGE - 1);
        // SAFETY: the block belongs to the caller, who is done with it; DONTNEED only drops
        // the pages (they read back as zeros).
        unsafe { sys::syscall6(libc::SYS_madvise, addr, size, libc::MADV_DONTNEED as usize, 0, 0, 0) };
        // Merge with a neighbour when possible, else remember it (or leak it if the list is full).
        for i in 0..st.nfree_large {
            let (a, l) = st.free_large[i];
            if a + l == addr {
                st.free_large[i].1 += size;
                return;
            }
            if addr + size == a {
                st.free_large[i] = (addr, l + size);
                return;
            }
        }
        if st.nfree_large < MAX_LARGE_FREE {
            st.free_large[st.nfree_large] = (addr, size);
            st.nfree_large += 1;
        }
    }
}

impl Default for Arena {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: blocks are handed out at most once until freed; small classes are powers of two, so
// a block of class c is aligned to min(c, PAGE); larger alignments take the page-run path.
unsafe impl GlobalAlloc for Arena {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.lock();
        // SAFETY: the lock is held until unlock() below.
        let st = unsafe { self.state() };
        let p = if !Self::ensure_region(st) {
            0
        } else if layout.size() <= MAX_SMALL && layout.align() <= PAGE {
            Self::alloc_small(st, Self::class_of(layout.size().max(layout.align())))
        } else {
            Self::alloc_large(st, layout.size())
        };
        self.unlock();
        p as *mut u8
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.lock();
        // SAFETY: the lock is held until unlock() below.
        let st = unsafe { self.state() };
        if layout.size() <= MAX_SMALL && layout.align() <= PAGE {
            let class = Self::class_of(layout.size().max(layout.align()));
            // SAFETY: the block is at least 16 bytes and no longer used by the caller.
            unsafe { *(ptr as *mut usize) = st.free_small[class] };
            st.free_small[class] = ptr as usize;
        } else {
            Self::free_large(st, ptr as usize, layout.size());
        }
        self.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(Arena::class_of(1), 0);
        assert_eq!(Arena::class_of(16), 0);
        assert_eq!(Arena::class_of(17), 1);
        assert_eq!(Arena::class_of(32768), NUM_CLASSES - 1);
    }
}
