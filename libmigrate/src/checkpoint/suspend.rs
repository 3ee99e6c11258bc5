//! Parking program threads. The checkpoint thread sends SUSPEND_SIGNAL to every program thread;
//! the handler records what the kernel won't give back later (fs base, glibc's tid address,
//! robust list, name, affinity, its private pending signals), saves a jump context and parks on
//! a futex. The full register state is in the signal frame above it on the thread's own stack.
//! In a restored process the thread comes back here (from `park_and_save` returning non-zero),
//! re-registers what is per-thread in the kernel, and waits for the common release.

use crate::state::{self, SUSPEND_SIGNAL};
use crate::sys::{self, context};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

pub const MAX_THREADS: usize = 512;
pub const MAX_PENDING_PER_THREAD: usize = 8;

pub struct PendingBuf(pub UnsafeCell<[[u8; 128]; MAX_PENDING_PER_THREAD]>);
// SAFETY: written only by the owning thread before it parks, read by the checkpoint thread
// after it has parked (PARKED's acquire/release orders the two).
unsafe impl Sync for PendingBuf {}

pub struct ThreadSlot {
    /// Real tid (0: free). Assigned by the checkpoint thread before signalling.
    pub tid: AtomicI32,
    pub vtid: AtomicI32,
    pub release_gen: AtomicU32,
    pub fs_base: AtomicU64,
    pub tid_address: AtomicU64,
    pub robust_head: AtomicU64,
    pub robust_len: AtomicU64,
    pub resume_sp: UnsafeCell<u64>,
    pub name: [AtomicU64; 2],
    pub affinity: [AtomicU64; 16],
    pub npending: AtomicU32,
    pub pending: PendingBuf,
    /// Set by the thread itself once parked.
    pub parked: AtomicU32,
    /// Interrupted in wait4/waitid on one process (or group): its virtual id, so that the
    /// restarted call can wait for its new real id after a resume (0: none; negative: group).
    pub waiting_for: AtomicI32,
}

// SAFETY: resume_sp is written by its thread before parking and read after PARKED is seen.
unsafe impl Sync for ThreadSlot {}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: ThreadSlot = ThreadSlot {
    tid: AtomicI32::new(0),
    vtid: AtomicI32::new(0),
    release_gen: AtomicU32::new(0),
    fs_base: AtomicU64::new(0),
    tid_address: AtomicU64::new(0),
    robust_head: AtomicU64::new(0),
    robust_len: AtomicU64::new(0),
    resume_sp: UnsafeCell::new(0),
    name: [AtomicU64::new(0), AtomicU64::new(0)],
    affinity: [const { AtomicU64::new(0) }; 16],
    npending: AtomicU32::new(0),
    pending: PendingBuf(UnsafeCell::new([[0; 128]; MAX_PENDING_PER_THREAD])),
    parked: AtomicU32::new(0),
    waiting_for: AtomicI32::new(0),
};

pub static SLOTS: [ThreadSlot; MAX_THREADS] = [EMPTY_SLOT; MAX_THREADS];
/// Program threads parked in this checkpoint.
pub static PARKED: AtomicU32 = AtomicU32::new(0);
/// Program threads back in their handlers in a restored process.
pub static RESTORED_ARRIVED: AtomicU32 = AtomicU32::new(0);
/// Bumped to let parked threads return from their handlers.
pub static RELEASE: AtomicU32 = AtomicU32::new(0);

impl ThreadSlot {
    pub fn name_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.name[0].load(Ordering::Relaxed).to_ne_bytes());
        out[8..].copy_from_slice(&self.name[1].load(Ordering::Relaxed).to_ne_bytes());
        out
    }

    pub fn resume_sp(&self) -> u64 {
        // SAFETY: read after the owner parked (see the Sync impl).
        unsafe { *self.resume_sp.get() }
    }

    pub fn pending(&self) -> &[[u8; 128]] {
        let n = (self.npending.load(Ordering::Acquire) as usize).min(MAX_PENDING_PER_THREAD);
        // SAFETY: see PendingBuf.
        unsafe { &(&*self.pending.0.get())[..n] }
    }

    /// Records the per-thread state the kernel keeps for the calling thread.
    fn record_current_thread(&self) {
        self.fs_base.store(sys::arch_get_fs(), Ordering::Relaxed);
        self.tid_address.store(sys::get_tid_address(), Ordering::Relaxed);
        let (head, len) = sys::get_robust_list();
        self.robust_head.store(head, Ordering::Relaxed);
        self.robust_len.store(len, Ordering::Relaxed);
        let mut name = [0u8; 16];
        sys::get_thread_name(&mut name);
        self.name[0].store(u64::from_ne_bytes(name[..8].try_into().unwrap_or([0; 8])), Ordering::Relaxed);
        self.name[1].store(u64::from_ne_bytes(name[8..].try_into().unwrap_or([0; 8])), Ordering::Relaxed);
        let mut mask = [0u64; 16];
        sys::sched_getaffinity(&mut mask);
        for (a, m) in self.affinity.iter().zip(mask) {
            a.store(m, Ordering::Relaxed);
        }
    }

    /// Re-registers, in a restored process, what the kernel keeps per thread.
    fn reinstate_current_thread(&self) {
        let tid = sys::gettid();
        self.tid.store(tid, Ordering::Release);
        let _ = state::PIDS.insert(pid_virt::VirtPid(self.vtid.load(Ordering::Relaxed)), pid_virt::RealPid(tid));
        sys::set_robust_list(self.robust_head.load(Ordering::Relaxed), self.robust_len.load(Ordering::Relaxed));
        sys::set_thread_name(&self.name_bytes());
        let mut mask = [0u64; 16];
        for (m, a) in mask.iter_mut().zip(&self.affinity) {
            *m = a.load(Ordering::Relaxed);
        }
        if mask.iter().any(|&w| w != 0) {
            sys::sched_setaffinity(&mask);
        }
    }

    /// Dequeues the signals pending for this thread alone, to re-queue them after the checkpoint.
    fn take_private_pending(&self) {
        self.npending.store(0, Ordering::Relaxed);
        let set = private_pending_set()
            & !state::own_signal_bits()
            & !((1 << (libc::SIGKILL - 1)) | (1 << (libc::SIGSTOP - 1)));
        if set == 0 {
            return;
        }
        let mut n = 0;
        // SAFETY: only this thread writes its pending buffer, before parking.
        let buf = unsafe { &mut *self.pending.0.get() };
        while n < MAX_PENDING_PER_THREAD {
            match sys::rt_sigtimedwait_now(set, &mut buf[n]) {
                Ok(Some(_)) => n += 1,
                _ => break,
            }
        }
        self.npending.store(n as u32, Ordering::Release);
    }
}

/// SigPnd of /proc/thread-self/status: the signals pending for the calling thread only.
pub(crate) fn private_pending_set() -> u64 {
    let mut buf = [0u8; 4096];
    let Ok(fd) = sys::open(b"/proc/thread-self/status\0", libc::O_RDONLY | libc::O_CLOEXEC, 0) else {
        return 0;
    };
    let mut len = 0;
    while len < buf.len() {
        match sys::read(fd, &mut buf[len..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
    }
    let _ = sys::close(fd);
    let text = &buf[..len];
    let key = b"SigPnd:";
    let Some(pos) = text.windows(key.len()).position(|w| w == key) else {
        return 0;
    };
    let rest = &text[pos + key.len()..];
    let start = rest.iter().position(|c| c.is_ascii_hexdigit()).unwrap_or(0);
    let end = rest[start..].iter().position(|c| !c.is_ascii_hexdigit()).map_or(rest.len(), |e| start + e);
    sys::fs::parse_hex(&rest[start..end]).unwrap_or(0)
}

/// How many thread slots the current (or last) checkpoint used (the rest stay untouched).
pub static SLOTS_USED: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

pub fn find_slot(tid: i32) -> Option<&'static ThreadSlot> {
    let used = SLOTS_USED.load(Ordering::Acquire).min(SLOTS.len());
    SLOTS[..used].iter().find(|s| s.tid.load(Ordering::Acquire) == tid)
}

fn wait_for_release(slot: &ThreadSlot) {
    let gen = slot.release_gen.load(Ordering::Acquire);
    while RELEASE.load(Ordering::Acquire) == gen {
        let _ = sys::futex_wait(&RELEASE, gen, 0);
    }
}

extern "C" fn park(arg: *mut libc::c_void) {
    // SAFETY: `arg` is the &'static ThreadSlot passed by the handler below.
    let slot = unsafe { &*(arg as *const ThreadSlot) };
    slot.parked.store(1, Ordering::Release);
    PARKED.fetch_add(1, Ordering::AcqRel);
    sys::futex_wake(&PARKED);
    wait_for_release(slot);
}

/// The SUSPEND_SIGNAL handler (SA_SIGINFO|SA_RESTART, every signal blocked while it runs).
pub extern "C" fn suspend_handler(_sig: i32, _info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    // This handler interrupts the thread it runs on: mark it as ours here too, for a hook that
    // read the generation after the checkpoint's own mark but before this signal arrived.
    state::INTERRUPTIONS.fetch_add(1, Ordering::AcqRel);
    let Some(slot) = find_slot(sys::gettid()) else {
        return; // not asked for by a checkpoint in progress
    };
    slot.record_current_thread();
    slot.waiting_for.store(interrupted_wait(uctx).map_or(0, |(_, real, _)| pid_arg_to_virt(real)), Ordering::Relaxed);
    slot.take_private_pending();
    // SAFETY: the slot outlives the park; a non-zero return means we are in a restored process,
    // where only memory (not descriptors) of this frame is trusted — we use none.
    let resumed = unsafe { context::park_and_save(slot.resume_sp.get(), park, slot as *const ThreadSlot as *mut _) };
    if resumed != 0 {
        slot.reinstate_current_thread();
        RESTORED_ARRIVED.fetch_add(1, Ordering::AcqRel);
        sys::futex_wake(&RESTORED_ARRIVED);
        wait_for_release(slot);
        // The kernel restarts an interrupted wait4/waitid with the arguments in our frame: the
        // process it waits for has a new real id now.
        let v = slot.waiting_for.load(Ordering::Relaxed);
        if v != 0 {
            if let Some((reg, _, positive_group)) = interrupted_wait(uctx) {
                let real = if v > 0 { state::to_real(v) } else { -state::pgid_to_real(-v) };
                let value = if positive_group { real.abs() } else { real };
                // SAFETY: the signal frame's saved register, as interrupted_wait located it.
                unsafe { *reg = value as i64 };
            }
        }
    }
    // Signals still blocked here (the handler blocks all): they are delivered once the
    // program's own mask comes back with sigreturn.
    crate::resources::signals::requeue_for_current_thread(slot.pending());
}

/// A virtual pid argument (negative: a process group).
fn pid_arg_to_virt(real: i32) -> i32 {
    if real > 0 {
        state::to_virt(real)
    } else {
        -state::pgid_to_virt(-real)
    }
}

/// If the thread was interrupted in a restartable wait4(pid > 0 or a group) or waitid(P_PID or
/// P_PGID), the saved register holding that id (in the signal frame), its value as a pid
/// argument (negative: a group), and whether the register holds a group id as a positive number
/// (waitid).
fn interrupted_wait(uctx: *mut libc::c_void) -> Option<(*mut i64, i32, bool)> {
    if uctx.is_null() {
        return None;
    }
    // SAFETY: the kernel passes our SA_SIGINFO handler a valid ucontext_t on this stack.
    let gregs = unsafe { &mut (*(uctx as *mut libc::ucontext_t)).uc_mcontext.gregs };
    let rip = gregs[libc::REG_RIP as usize] as usize;
    let nr = gregs[libc::REG_RAX as usize];
    // A restart points the saved rip back at the `syscall` instruction (0f 05) with rax = nr.
    // SAFETY: rip points into mapped code of this process; two bytes before it are too.
    let at_syscall = rip >= 2 && unsafe { core::ptr::read_unaligned(rip as *const [u8; 2]) } == [0x0f, 0x05];
    if !at_syscall {
        return None;
    }
    let (reg, value, positive_group) = match nr {
        n if n == libc::SYS_wait4 => {
            let r = libc::REG_RDI as usize;
            (r, gregs[r] as i32, false)
        }
        n if n == libc::SYS_waitid && matches!(gregs[libc::REG_RDI as usize] as u32, libc::P_PID | libc::P_PGID) => {
            let r = libc::REG_RSI as usize;
            let id = gregs[r] as i32;
            let group = gregs[libc::REG_RDI as usize] as u32 == libc::P_PGID;
            (r, if group { -id } else { id }, group)
        }
        _ => return None,
    };
    if value == 0 || value == -1 {
        return None;
    }
    Some((&mut gregs[reg] as *mut i64, value, positive_group))
}

/// Lets every parked thread return from its handler.
pub fn release_all() {
    RELEASE.fetch_add(1, Ordering::AcqRel);
    sys::futex_wake(&RELEASE);
}

/// The checkpoint signal's handler: wakes the checkpoint thread, nothing else.
pub extern "C" fn checkpoint_signal_handler(_sig: i32, _info: *mut libc::siginfo_t, _uctx: *mut libc::c_void) {
    // This handler itself interrupts the thread it runs on: mark it as ours first.
    state::INTERRUPTIONS.fetch_add(1, Ordering::AcqRel);
    let fd = state::WAKE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let _ = sys::write(fd, &1u64.to_ne_bytes());
    }
}

/// Installs our two handlers with the real rt_sigaction.
pub fn install_handlers() -> sys::SysResult<()> {
    let restorer = restorer_address();
    let all = !0u64;
    let act = sys::KernelSigaction {
        handler: suspend_handler as *const () as usize,
        flags: (libc::SA_SIGINFO | libc::SA_RESTART) as u64 | sys::SA_RESTORER,
        restorer,
        mask: all,
    };
    sys::rt_sigaction(SUSPEND_SIGNAL, Some(&act), None)?;
    let act = sys::KernelSigaction { handler: checkpoint_signal_handler as *const () as usize, ..act };
    sys::rt_sigaction(state::CHECKPOINT_SIGNAL.load(Ordering::Relaxed), Some(&act), None)
}

/// glibc's signal trampoline (__restore_rt), read back from a disposition glibc installed.
fn restorer_address() -> usize {
    // Install a throwaway disposition through libc on a scratch signal and read the kernel's view.
    let probe = libc::SIGRTMAX() - 2;
    let mut old = sys::KernelSigaction::default();
    let _ = sys::rt_sigaction(probe, None, Some(&mut old));
    // SAFETY: a plain sigaction struct for libc's real sigaction (resolved, not our hook).
    let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
    sa.sa_sigaction = libc::SIG_IGN;
    let real = crate::hooks::next::call_real!(crate::hooks::signal::SIGACTION: fn(i32, *const libc::sigaction, *mut libc::sigaction) -> i32);
    // SAFETY: valid pointers to locals.
    unsafe { real(probe, &sa, core::ptr::null_mut()) };
    let mut now = sys::KernelSigaction::default();
    let _ = sys::rt_sigaction(probe, None, Some(&mut now));
    let _ = sys::rt_sigaction(probe, Some(&old), None);
    now.restorer
}
