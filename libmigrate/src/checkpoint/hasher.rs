//! Page hashing beside the page writer. Writing a page into a tmpfs image costs about as much
//! as the kernel's copy and its page allocation; hashing it (xxh3, for the page hashes and the
//! section checksum) costs a sixth of that again on the same thread. For mappings the writer
//! writes straight from memory — not the live ones it copies first (its own stack, the buffers
//! it fills), not an incremental checkpoint's (each page's hash decides whether it is written),
//! not compressed ones — a second thread of the process hashes the pages meanwhile, on the
//! other core, while the writer issues large writes. It runs libc-free code on a stack of its
//! own (allocated before the write: nothing allocates meanwhile), only reads memory that no
//! program thread changes (they are all parked), writes only the hash array, and exits before
//! the writer returns.

use crate::sys::{self, uffd};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Below this many pages in total the writer hashes on its own (a thread costs more).
pub const MIN_PAGES: u64 = 1024;
const STACK: usize = 64 * 1024;

/// One mapping to hash: its start and its runs (its hashes go to the hasher's own array).
pub struct Job {
    pub start: u64,
    pub runs: *const (u64, u64),
    pub nruns: usize,
    pub npages: usize,
    /// Where its hashes start in `Hasher::out`.
    first: usize,
}

impl Job {
    pub fn new(start: u64, runs: &[(u64, u64)], npages: usize) -> Job {
        Job { start, runs: runs.as_ptr(), nruns: runs.len(), npages, first: 0 }
    }
}

/// The shared state of one hashing thread: made before the write, joined before it ends.
pub struct Hasher {
    jobs: Vec<Job>,
    /// The hashes of every job's pages, in order: written by the thread only (through a raw
    /// pointer), read by the writer once `done` covers the job. In the writer's scratch mapping.
    out: *mut u64,
    out_len: usize,
    stack: *mut u8,
    stack_len: usize,
    /// The thread's tid while it runs; the kernel clears it when the thread is gone.
    tid: AtomicU32,
    /// Pages hashed so far, all jobs in order (futex word): the writer follows behind.
    progress: AtomicU32,
    /// The writer waits on `progress` (the thread then wakes it).
    waiting: AtomicBool,
    stop: AtomicBool,
    started: bool,
}

// SAFETY: the raw pointers in `jobs` point into the writer's hash array and the frozen
// process's memory, which outlive the thread (joined before the writer returns).
unsafe impl Send for Hasher {}

impl Hasher {
    /// Bytes of scratch memory `new` takes for `pages` pages.
    pub fn scratch_bytes(pages: usize) -> usize {
        pages * 8 + STACK + 64
    }

    /// Room for `capacity` jobs of `pages` pages in all, its hash array and stack carved from
    /// `scratch` (see `scratch_bytes`): the buffers exist, at their final addresses, before any
    /// job.
    pub fn new(capacity: usize, pages: usize, scratch: &mut &mut [u8]) -> Hasher {
        let out = sys::carve::<u64>(scratch, pages);
        let stack = sys::carve::<u64>(scratch, STACK / 8);
        Hasher {
            jobs: Vec::with_capacity(capacity),
            out: out.as_mut_ptr(),
            out_len: out.len(),
            stack: stack.as_mut_ptr() as *mut u8,
            stack_len: STACK,
            tid: AtomicU32::new(0),
            progress: AtomicU32::new(0),
            waiting: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            started: false,
        }
    }

    /// Adds a job (within the capacity given: nothing moves).
    pub fn push(&mut self, mut job: Job) {
        job.first = self.jobs.last().map_or(0, |j| j.first + j.npages);
        debug_assert!(self.jobs.len() < self.jobs.capacity() && job.first + job.npages <= self.out_len);
        self.jobs.push(job);
    }

    pub fn jobs(&self) -> usize {
        self.jobs.len()
    }

    pub fn pages(&self) -> u64 {
        self.jobs.iter().map(|j| j.npages as u64).sum()
    }

    /// The memory the thread writes into while the writer writes (the writer copies a mapping
    /// that holds any of it before writing it).
    pub fn buffers(&self) -> [(*const u8, usize); 4] {
        [
            (self.out as *const u8, self.out_len * 8),
            (self.stack as *const u8, self.stack_len),
            (self as *const Hasher as *const u8, core::mem::size_of::<Hasher>()),
            (self.jobs.as_ptr() as *const u8, self.jobs.capacity() * core::mem::size_of::<Job>()),
        ]
    }

    /// Starts the thread (on failure the writer hashes on its own: `started` stays false).
    pub fn start(&mut self) -> bool {
        if self.pages() < MIN_PAGES {
            return false;
        }
        let top = (self.stack as u64 + self.stack_len as u64) & !15;
        self.tid.store(u32::MAX, Ordering::Release);
        // SAFETY: the stack and `self` stay in place until `join` saw the thread gone.
        let r = unsafe { uffd::spawn_thread(top, self.tid.as_ptr() as u64, self as *mut Hasher as u64, run) };
        self.started = r > 0;
        if !self.started {
            self.tid.store(0, Ordering::Release);
        }
        self.started
    }

    pub fn started(&self) -> bool {
        self.started
    }

    /// Where job `j`'s pages start in the hashing order.
    pub fn first_of(&self, j: usize) -> usize {
        self.jobs[j].first
    }

    /// Waits until the first `n` pages (all jobs in order) are hashed; false if the thread
    /// stopped before.
    pub fn wait_for_pages(&self, n: usize) -> bool {
        loop {
            let p = self.progress.load(Ordering::Acquire);
            if p as usize >= n {
                return true;
            }
            if self.tid.load(Ordering::Acquire) == 0 {
                return self.progress.load(Ordering::Acquire) as usize >= n;
            }
            self.waiting.store(true, Ordering::Release);
            if self.progress.load(Ordering::Acquire) == p {
                let _ = sys::futex_wait(&self.progress, p, 10_000_000);
            }
        }
    }

    /// The hashes of pages `range` (all jobs in order), once `wait_for_pages` covered them.
    pub fn hashes_of(&self, range: core::ops::Range<usize>) -> &[u64] {
        assert!(range.end <= self.out_len);
        // SAFETY: inside `out`; the thread wrote these before publishing `progress` past them
        // (Release, read with Acquire) and never writes them again.
        unsafe { core::slice::from_raw_parts(self.out.add(range.start), range.len()) }
    }

    /// Stops the thread early (an error) and waits until it is gone.
    pub fn join(&mut self, stop: bool) {
        if !self.started {
            return;
        }
        if stop {
            self.stop.store(true, Ordering::Release);
        }
        loop {
            let t = self.tid.load(Ordering::Acquire);
            if t == 0 {
                break;
            }
            let _ = sys::futex_wait_shared(&self.tid, t, 50_000_000);
        }
        self.started = false;
    }
}

/// The thread: every job's pages, in order, then exit (the kernel clears `tid` once the stack
/// is no longer used).
extern "C" fn run(arg: u64) -> ! {
    // SAFETY: `arg` is the Hasher, alive until it has seen this thread gone.
    let h = unsafe { &*(arg as *const Hasher) };
    let out = h.out;
    let mut hashed = 0u32;
    let publish = |n: u32| {
        h.progress.store(n, Ordering::Release);
        if h.waiting.swap(false, Ordering::AcqRel) {
            sys::futex_wake(&h.progress);
        }
    };
    'jobs: for job in h.jobs.iter() {
        // SAFETY: the job's runs, valid for the thread's life.
        let runs = unsafe { core::slice::from_raw_parts(job.runs, job.nruns) };
        // SAFETY: the job's part of `out`, which only this thread writes until `done` says so.
        let hashes = unsafe { core::slice::from_raw_parts_mut(out.add(job.first), job.npages) };
        let mut k = 0usize;
        for &(first, count) in runs {
            for page in first..first + count {
                if h.stop.load(Ordering::Relaxed) {
                    break 'jobs;
                }
                // SAFETY: a page of a readable mapping of this process, held still.
                let bytes = unsafe { core::slice::from_raw_parts((job.start + page * 4096) as *const u8, 4096) };
                hashes[k] = migrate_image::page_hash(bytes);
                k += 1;
                hashed += 1;
                if hashed.is_multiple_of(64) {
                    publish(hashed);
                }
            }
        }
        publish(hashed);
    }
    sys::exit_thread()
}
