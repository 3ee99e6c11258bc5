//! The thin layer that owns raw system calls and the few assembly routines. Nothing here calls
//! libc: everything works while the program is frozen, half-restored, or holding libc's locks.
//! Every function returns the kernel's raw result (negative errno on failure); `Errno` wraps it.

pub mod context;
pub mod fs;

use core::arch::asm;

pub use libc::{c_int, c_long, c_void};

/// A failed system call's errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl core::fmt::Display for Errno {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let name = match self.0 {
            libc::EPERM => "EPERM: operation not permitted",
            libc::ENOENT => "ENOENT: no such file or directory",
            libc::EINTR => "EINTR",
            libc::EIO => "EIO: input/output error",
            libc::EBADF => "EBADF: bad file descriptor",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM: out of memory",
            libc::EACCES => "EACCES: permission denied",
            libc::EFAULT => "EFAULT",
            libc::EEXIST => "EEXIST: file exists",
            libc::ENOTDIR => "ENOTDIR: not a directory",
            libc::EISDIR => "EISDIR: is a directory",
            libc::EINVAL => "EINVAL: invalid argument",
            libc::ENOSPC => "ENOSPC: no space left on device",
            libc::EROFS => "EROFS: read-only file system",
            libc::EDQUOT => "EDQUOT: disk quota exceeded",
            libc::ENAMETOOLONG => "ENAMETOOLONG",
            _ => "",
        };
        if name.is_empty() {
            write!(f, "errno {}", self.0)
        } else {
            f.write_str(name)
        }
    }
}

pub type SysResult<T> = Result<T, Errno>;

#[inline(always)]
fn check(ret: isize) -> SysResult<usize> {
    if (-4095..0).contains(&ret) {
        Err(Errno(-ret as i32))
    } else {
        Ok(ret as usize)
    }
}

/// Raw `syscall` with up to six arguments.
///
/// # Safety
/// The caller guarantees the arguments are valid for system call `nr` (pointers point to
/// memory of the right size and lifetime).
#[inline(always)]
pub unsafe fn syscall6(nr: c_long, a1: usize, a2: usize, a3: usize, a4: usize, a5: usize, a6: usize) -> isize {
    let ret: isize;
    // SAFETY: the x86_64 syscall ABI: number in rax, args in rdi rsi rdx r10 r8 r9, rcx and r11
    // clobbered. Validity of the arguments is the caller's contract.
    unsafe {
        asm!("syscall", inlateout("rax") nr as isize => ret, in("rdi") a1, in("rsi") a2, in("rdx") a3,
             in("r10") a4, in("r8") a5, in("r9") a6, lateout("rcx") _, lateout("r11") _,
             options(nostack));
    }
    ret
}

macro_rules! sc {
    ($nr:expr) => { sc!($nr, 0, 0, 0, 0, 0, 0) };
    ($nr:expr, $a:expr) => { sc!($nr, $a, 0, 0, 0, 0, 0) };
    ($nr:expr, $a:expr, $b:expr) => { sc!($nr, $a, $b, 0, 0, 0, 0) };
    ($nr:expr, $a:expr, $b:expr, $c:expr) => { sc!($nr, $a, $b, $c, 0, 0, 0) };
    ($nr:expr, $a:expr, $b:expr, $c:expr, $d:expr) => { sc!($nr, $a, $b, $c, $d, 0, 0) };
    ($nr:expr, $a:expr, $b:expr, $c:expr, $d:expr, $e:expr) => { sc!($nr, $a, $b, $c, $d, $e, 0) };
    ($nr:expr, $a:expr, $b:expr, $c:expr, $d:expr, $e:expr, $f:expr) => {
        // SAFETY: each wrapper below passes arguments that match the syscall's contract; pointer
        // arguments come from references or from callers documented as unsafe.
        check(unsafe { syscall6($nr, $a as usize, $b as usize, $c as usize, $d as usize, $e as usize, $f as usize) })
    };
}

pub fn getpid() -> i32 {
    sc!(libc::SYS_getpid).unwrap_or(0) as i32
}
pub fn getppid() -> i32 {
    sc!(libc::SYS_getppid).unwrap_or(0) as i32
}
pub fn gettid() -> i32 {
    sc!(libc::SYS_gettid).unwrap_or(0) as i32
}
pub fn getuid() -> u32 {
    sc!(libc::SYS_getuid).unwrap_or(0) as u32
}
pub fn getpgid(pid: i32) -> SysResult<i32> {
    sc!(libc::SYS_getpgid, pid).map(|v| v as i32)
}
pub fn getsid(pid: i32) -> SysResult<i32> {
    sc!(libc::SYS_getsid, pid).map(|v| v as i32)
}

pub fn read(fd: i32, buf: &mut [u8]) -> SysResult<usize> {
    sc!(libc::SYS_read, fd, buf.as_mut_ptr(), buf.len())
}
pub fn write(fd: i32, buf: &[u8]) -> SysResult<usize> {
    sc!(libc::SYS_write, fd, buf.as_ptr(), buf.len())
}
/// `write(2)` from raw memory.
///
/// # Safety
/// `[addr, addr+len)` must be mapped (unreadable memory gives EFAULT, which is reported).
pub unsafe fn write_raw(fd: i32, addr: usize, len: usize) -> SysResult<usize> {
    sc!(libc::SYS_write, fd, addr, len)
}
/// `pread64(2)` into raw memory.
///
/// # Safety
/// `[addr, addr+len)` must be writable memory that nothing else is using.
pub unsafe fn pread_raw(fd: i32, addr: usize, len: usize, offset: u64) -> SysResult<usize> {
    sc!(libc::SYS_pread64, fd, addr, len, offset)
}
pub fn pread(fd: i32, buf: &mut [u8], offset: u64) -> SysResult<usize> {
    sc!(libc::SYS_pread64, fd, buf.as_mut_ptr(), buf.len(), offset)
}
pub fn write_all(fd: i32, mut buf: &[u8]) -> SysResult<()> {
    while !buf.is_empty() {
        match write(fd, buf) {
            Ok(0) => return Err(Errno(libc::EIO)),
            Ok(n) => buf = &buf[n..],
            Err(Errno(libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
pub fn close(fd: i32) -> SysResult<()> {
    sc!(libc::SYS_close, fd).map(|_| ())
}
/// Opens a path given as a NUL-terminated byte string.
pub fn open(path: &[u8], flags: i32, mode: u32) -> SysResult<i32> {
    assert!(path.last() == Some(&0), "path must be NUL-terminated");
    sc!(libc::SYS_openat, libc::AT_FDCWD, path.as_ptr(), flags, mode).map(|v| v as i32)
}
pub fn openat(dirfd: i32, path: &[u8], flags: i32, mode: u32) -> SysResult<i32> {
    assert!(path.last() == Some(&0), "path must be NUL-terminated");
    sc!(libc::SYS_openat, dirfd, path.as_ptr(), flags, mode).map(|v| v as i32)
}
pub fn lseek(fd: i32, off: i64, whence: i32) -> SysResult<u64> {
    sc!(libc::SYS_lseek, fd, off, whence).map(|v| v as u64)
}
pub fn fsync(fd: i32) -> SysResult<()> {
    sc!(libc::SYS_fsync, fd).map(|_| ())
}
pub fn fcntl(fd: i32, cmd: i32, arg: usize) -> SysResult<usize> {
    sc!(libc::SYS_fcntl, fd, cmd, arg)
}
pub fn dup3(old: i32, new: i32, flags: i32) -> SysResult<i32> {
    sc!(libc::SYS_dup3, old, new, flags).map(|v| v as i32)
}
pub fn renameat(olddir: i32, old: &[u8], newdir: i32, new: &[u8]) -> SysResult<()> {
    assert!(old.last() == Some(&0) && new.last() == Some(&0));
    sc!(libc::SYS_renameat, olddir, old.as_ptr(), newdir, new.as_ptr()).map(|_| ())
}
pub fn unlinkat(dir: i32, path: &[u8]) -> SysResult<()> {
    assert!(path.last() == Some(&0));
    sc!(libc::SYS_unlinkat, dir, path.as_ptr(), 0).map(|_| ())
}
/// A random u64 from the kernel (getrandom(2), never blocking once the pool is ready).
pub fn random_u64() -> SysResult<u64> {
    let mut v = 0u64;
    sc!(libc::SYS_getrandom, &mut v as *mut u64, 8usize, 0).map(|_| v)
}
pub fn fstat(fd: i32) -> SysResult<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    sc!(libc::SYS_fstat, fd, &mut st as *mut libc::stat).map(|_| st)
}
pub fn stat(path: &[u8]) -> SysResult<libc::stat> {
    assert!(path.last() == Some(&0));
    // SAFETY: as above.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    sc!(libc::SYS_newfstatat, libc::AT_FDCWD, path.as_ptr(), &mut st as *mut libc::stat, 0).map(|_| st)
}
pub fn readlink(path: &[u8], buf: &mut [u8]) -> SysResult<usize> {
    assert!(path.last() == Some(&0));
    sc!(libc::SYS_readlinkat, libc::AT_FDCWD, path.as_ptr(), buf.as_mut_ptr(), buf.len())
}
pub fn getdents64(fd: i32, buf: &mut [u8]) -> SysResult<usize> {
    sc!(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len())
}
pub fn chdir(path: &[u8]) -> SysResult<()> {
    assert!(path.last() == Some(&0));
    sc!(libc::SYS_chdir, path.as_ptr()).map(|_| ())
}
pub fn umask(mask: u32) -> u32 {
    sc!(libc::SYS_umask, mask).unwrap_or(0) as u32
}
pub fn prlimit(resource: u32, new: Option<&libc::rlimit64>) -> SysResult<libc::rlimit64> {
    let mut old = libc::rlimit64 { rlim_cur: 0, rlim_max: 0 };
    let newp = new.map_or(core::ptr::null(), |r| r as *const libc::rlimit64);
    sc!(libc::SYS_prlimit64, 0, resource, newp, &mut old as *mut libc::rlimit64).map(|_| old)
}
pub fn personality(p: u32) -> SysResult<u32> {
    sc!(libc::SYS_personality, p).map(|v| v as u32)
}

pub fn mmap(addr: usize, len: usize, prot: i32, flags: i32, fd: i32, off: u64) -> SysResult<usize> {
    sc!(libc::SYS_mmap, addr, len, prot, flags, fd, off)
}
/// A private anonymous mapping of its own for a checkpoint's scratch buffers (page hashes,
/// bounce buffer, the hashing thread's stack): made after the memory was described, so it is
/// not part of the image (the arena is, byte for byte). Unmapped when dropped; a restored
/// process, where it does not exist, `forget`s it.
pub struct ScratchMap {
    addr: usize,
    len: usize,
}

impl ScratchMap {
    pub fn new(len: usize) -> SysResult<ScratchMap> {
        let len = len.max(1).next_multiple_of(4096);
        let addr = mmap(0, len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)?;
        Ok(ScratchMap { addr, len })
    }

    /// The whole mapping (page-aligned, zero-filled at first).
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: our own mapping, alive as long as `self`, borrowed mutably once.
        unsafe { core::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }
}

impl Drop for ScratchMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping; the borrows `bytes` handed out ended with `self`'s borrow.
        let _ = unsafe { munmap(self.addr, self.len) };
    }
}

/// Splits `n` values of `T` off the front of `bytes` (aligned for `T`).
pub fn carve<'a, T: Copy>(bytes: &mut &'a mut [u8], n: usize) -> &'a mut [T] {
    let taken = core::mem::take(bytes);
    let pad = taken.as_ptr().align_offset(core::mem::align_of::<T>());
    let (head, rest) = taken.split_at_mut(pad + n * core::mem::size_of::<T>());
    *bytes = rest;
    // SAFETY: `head[pad..]` is aligned for T, holds n * size_of::<T>() bytes, and every bit
    // pattern is a valid value of the plain integer types this carves (u8, u32, u64).
    unsafe { core::slice::from_raw_parts_mut(head[pad..].as_mut_ptr() as *mut T, n) }
}

/// # Safety
/// Unmapping memory that Rust references point into is undefined behaviour; the caller
/// guarantees nothing live is in the range.
pub unsafe fn munmap(addr: usize, len: usize) -> SysResult<()> {
    sc!(libc::SYS_munmap, addr, len).map(|_| ())
}
/// # Safety
/// Removing access from memory in use by Rust code is the caller's responsibility.
pub unsafe fn mprotect(addr: usize, len: usize, prot: i32) -> SysResult<()> {
    sc!(libc::SYS_mprotect, addr, len, prot).map(|_| ())
}
pub fn brk(addr: usize) -> usize {
    sc!(libc::SYS_brk, addr).unwrap_or(0)
}

pub fn kill(pid: i32, sig: i32) -> SysResult<()> {
    sc!(libc::SYS_kill, pid, sig).map(|_| ())
}
pub fn tgkill(tgid: i32, tid: i32, sig: i32) -> SysResult<()> {
    sc!(libc::SYS_tgkill, tgid, tid, sig).map(|_| ())
}
/// A child process that is a copy of this one (copy-on-write memory, a copy of the descriptor
/// table), made with a raw clone(2) — not glibc's fork: no atfork handlers, no cached-pid
/// update — with exit signal 0: the parent gets no SIGCHLD when it ends, and only a wait with
/// `__WCLONE`/`__WALL` reports it (the program's own wait() and waitpid() never do). Returns the
/// child's pid in the parent and 0 in the child, which continues on its own copy of this
/// thread's stack and is single-threaded.
pub fn clone_process() -> SysResult<i32> {
    // No flags: neither CLONE_VM nor a new stack, so the child returns from the call like a
    // fork child; the low byte (the exit signal) is 0.
    sc!(libc::SYS_clone, 0, 0, 0, 0, 0).map(|v| v as i32)
}
/// Reaps child `pid` (`options`: WEXITED | WNOHANG | __WCLONE …). Returns (si_pid, si_code,
/// si_status): si_pid 0 when WNOHANG found it still running.
pub fn waitid_pid(pid: i32, options: i32) -> SysResult<(i32, i32, i32)> {
    let mut info = [0i32; 32];
    sc!(libc::SYS_waitid, libc::P_PID, pid, info.as_mut_ptr(), options, 0).map(|_| (info[4], info[2], info[6]))
}
/// Closes descriptors `first..=last`.
pub fn close_range(first: u32, last: u32) -> SysResult<()> {
    sc!(libc::SYS_close_range, first, last, 0).map(|_| ())
}
/// Ends the calling thread only (exit(2), not exit_group).
pub fn exit_thread() -> ! {
    loop {
        let _ = sc!(libc::SYS_exit, 0);
    }
}
pub fn exit_group(code: i32) -> ! {
    let _ = sc!(libc::SYS_exit_group, code);
    unreachable!("exit_group returned")
}

/// The kernel's `struct sigaction` on x86_64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelSigaction {
    pub handler: usize,
    pub flags: u64,
    pub restorer: usize,
    pub mask: u64,
}
pub const SA_RESTORER: u64 = 0x0400_0000;

pub fn rt_sigaction(sig: i32, new: Option<&KernelSigaction>, old: Option<&mut KernelSigaction>) -> SysResult<()> {
    let newp = new.map_or(core::ptr::null(), |r| r as *const KernelSigaction);
    let oldp = old.map_or(core::ptr::null_mut(), |r| r as *mut KernelSigaction);
    sc!(libc::SYS_rt_sigaction, sig, newp, oldp, 8).map(|_| ())
}
pub fn rt_sigprocmask(how: i32, set: Option<&u64>, old: Option<&mut u64>) -> SysResult<()> {
    let setp = set.map_or(core::ptr::null(), |r| r as *const u64);
    let oldp = old.map_or(core::ptr::null_mut(), |r| r as *mut u64);
    sc!(libc::SYS_rt_sigprocmask, how, setp, oldp, 8).map(|_| ())
}
/// Dequeues one pending signal from `set` without waiting; `Ok(None)` if none.
pub fn rt_sigtimedwait_now(set: u64, info: &mut [u8; 128]) -> SysResult<Option<i32>> {
    let ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    match sc!(libc::SYS_rt_sigtimedwait, &set as *const u64, info.as_mut_ptr(), &ts as *const libc::timespec, 8) {
        Ok(sig) => Ok(Some(sig as i32)),
        Err(Errno(libc::EAGAIN)) => Ok(None),
        Err(e) => Err(e),
    }
}
pub fn rt_sigqueueinfo(pid: i32, sig: i32, info: &[u8; 128]) -> SysResult<()> {
    sc!(libc::SYS_rt_sigqueueinfo, pid, sig, info.as_ptr()).map(|_| ())
}
pub fn rt_tgsigqueueinfo(pid: i32, tid: i32, sig: i32, info: &[u8; 128]) -> SysResult<()> {
    sc!(libc::SYS_rt_tgsigqueueinfo, pid, tid, sig, info.as_ptr()).map(|_| ())
}

/// A duration in nanoseconds as a `struct timespec`.
pub fn timespec_from_ns(ns: u64) -> libc::timespec {
    libc::timespec { tv_sec: (ns / 1_000_000_000) as i64, tv_nsec: (ns % 1_000_000_000) as i64 }
}
/// A (non-negative) `struct timespec` in nanoseconds.
pub fn ns_from_timespec(ts: &libc::timespec) -> u64 {
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn clock_gettime(clock: i32) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    let _ = sc!(libc::SYS_clock_gettime, clock, &mut ts as *mut libc::timespec);
    ns_from_timespec(&ts)
}
/// getitimer(2) / setitimer(2) on a raw `struct itimerval`.
pub fn getitimer(which: i32) -> SysResult<libc::itimerval> {
    let mut v = libc::itimerval {
        it_interval: libc::timeval { tv_sec: 0, tv_usec: 0 },
        it_value: libc::timeval { tv_sec: 0, tv_usec: 0 },
    };
    sc!(libc::SYS_getitimer, which, &mut v as *mut libc::itimerval).map(|_| v)
}
pub fn setitimer(which: i32, v: &libc::itimerval) -> SysResult<()> {
    sc!(libc::SYS_setitimer, which, v as *const libc::itimerval, 0usize).map(|_| ())
}

/// timer_gettime(2) for a kernel timer id.
pub fn timer_gettime(id: i32) -> SysResult<libc::itimerspec> {
    let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    let mut v = libc::itimerspec { it_interval: zero, it_value: zero };
    sc!(libc::SYS_timer_gettime, id, &mut v as *mut libc::itimerspec).map(|_| v)
}
/// timer_create(2) with a raw 64-byte `struct sigevent`; `id` is in/out (the kernel reads it
/// when PR_TIMER_CREATE_RESTORE_IDS is on).
pub fn timer_create(clock: i32, sigevent: &[u8; 64], id: &mut i32) -> SysResult<()> {
    sc!(libc::SYS_timer_create, clock, sigevent.as_ptr(), id as *mut i32).map(|_| ())
}
pub fn timer_settime(id: i32, v: &libc::itimerspec) -> SysResult<()> {
    sc!(libc::SYS_timer_settime, id, 0usize, v as *const libc::itimerspec, 0usize).map(|_| ())
}
pub fn timer_delete(id: i32) -> SysResult<()> {
    sc!(libc::SYS_timer_delete, id).map(|_| ())
}
/// prctl(2) with integer arguments only.
pub fn prctl(option: i32, a2: usize, a3: usize) -> SysResult<usize> {
    sc!(libc::SYS_prctl, option, a2, a3, 0usize, 0usize)
}

pub fn monotonic_ns() -> u64 {
    clock_gettime(libc::CLOCK_MONOTONIC)
}

/// CLOCK_MONOTONIC through libc (the vDSO: no system call). Only for code running as part of
/// the program (hooks), never while it is frozen or half restored.
pub fn monotonic_ns_vdso() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec; it is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ns_from_timespec(&ts)
}

pub const FUTEX_WAIT_PRIVATE: i32 = 128;
pub const FUTEX_WAKE_PRIVATE: i32 = 129;

/// Waits while `*word == expected`, at most `timeout_ns` (0: forever).
pub fn futex_wait(word: &core::sync::atomic::AtomicU32, expected: u32, timeout_ns: u64) -> SysResult<()> {
    let ts = timespec_from_ns(timeout_ns);
    let tsp = if timeout_ns == 0 { core::ptr::null() } else { &ts as *const libc::timespec };
    sc!(libc::SYS_futex, word.as_ptr(), FUTEX_WAIT_PRIVATE, expected, tsp).map(|_| ())
}
/// Like `futex_wait`, on a word in memory shared between processes.
pub fn futex_wait_shared(word: &core::sync::atomic::AtomicU32, expected: u32, timeout_ns: u64) -> SysResult<()> {
    let ts = timespec_from_ns(timeout_ns);
    sc!(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, expected, &ts as *const libc::timespec).map(|_| ())
}
pub fn futex_wake_shared(word: &core::sync::atomic::AtomicU32) {
    let _ = sc!(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
}
pub fn futex_wake(word: &core::sync::atomic::AtomicU32) {
    let _ = sc!(libc::SYS_futex, word.as_ptr(), FUTEX_WAKE_PRIVATE, i32::MAX);
}

pub const ARCH_SET_FS: i32 = 0x1002;
pub const ARCH_GET_FS: i32 = 0x1003;
pub fn arch_get_fs() -> u64 {
    let mut v = 0u64;
    let _ = sc!(libc::SYS_arch_prctl, ARCH_GET_FS, &mut v as *mut u64);
    v
}
pub fn get_tid_address() -> u64 {
    let mut v = 0u64;
    let _ = sc!(libc::SYS_prctl, libc::PR_GET_TID_ADDRESS, &mut v as *mut u64);
    v
}
pub fn get_robust_list() -> (u64, u64) {
    let (mut head, mut len) = (0u64, 0u64);
    let _ = sc!(libc::SYS_get_robust_list, 0, &mut head as *mut u64, &mut len as *mut u64);
    (head, len)
}
pub fn get_thread_name(buf: &mut [u8; 16]) {
    let _ = sc!(libc::SYS_prctl, libc::PR_GET_NAME, buf.as_mut_ptr());
}
pub fn set_thread_name(name: &[u8; 16]) {
    let _ = sc!(libc::SYS_prctl, libc::PR_SET_NAME, name.as_ptr());
}
pub fn sched_getaffinity(mask: &mut [u64; 16]) -> usize {
    sc!(libc::SYS_sched_getaffinity, 0, core::mem::size_of_val(mask), mask.as_mut_ptr()).unwrap_or(0)
}
pub fn sched_setaffinity(mask: &[u64]) {
    let _ = sc!(libc::SYS_sched_setaffinity, 0, core::mem::size_of_val(mask), mask.as_ptr());
}

pub fn socket(domain: i32, ty: i32, proto: i32) -> SysResult<i32> {
    sc!(libc::SYS_socket, domain, ty, proto).map(|v| v as i32)
}
pub fn bind(fd: i32, addr: &libc::sockaddr_un, len: u32) -> SysResult<()> {
    sc!(libc::SYS_bind, fd, addr as *const libc::sockaddr_un, len).map(|_| ())
}
pub fn listen(fd: i32, backlog: i32) -> SysResult<()> {
    sc!(libc::SYS_listen, fd, backlog).map(|_| ())
}
pub fn accept4(fd: i32, flags: i32) -> SysResult<i32> {
    sc!(libc::SYS_accept4, fd, 0, 0, flags).map(|v| v as i32)
}
pub fn peer_uid(fd: i32) -> SysResult<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = core::mem::size_of::<libc::ucred>() as u32;
    sc!(
        libc::SYS_getsockopt,
        fd,
        libc::SOL_SOCKET,
        libc::SO_PEERCRED,
        &mut cred as *mut libc::ucred,
        &mut len as *mut u32
    )
    .map(|_| cred.uid)
}
pub fn set_rcv_timeout(fd: i32, secs: i64) {
    let tv = libc::timeval { tv_sec: secs, tv_usec: 0 };
    let _ = sc!(
        libc::SYS_setsockopt,
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVTIMEO,
        &tv as *const libc::timeval,
        core::mem::size_of::<libc::timeval>()
    );
}
pub fn pipe2(fds: &mut [i32; 2], flags: i32) -> SysResult<()> {
    sc!(libc::SYS_pipe2, fds.as_mut_ptr(), flags).map(|_| ())
}
pub fn tee(fd_in: i32, fd_out: i32, len: usize, flags: u32) -> SysResult<usize> {
    sc!(libc::SYS_tee, fd_in, fd_out, len, flags)
}
/// `ioctl(2)` with a pointer argument.
///
/// # Safety
/// `arg` must point to memory of the size request `req` reads or writes.
pub unsafe fn ioctl_ptr(fd: i32, req: u64, arg: *mut u8) -> SysResult<usize> {
    sc!(libc::SYS_ioctl, fd, req, arg)
}
pub fn pidfd_open(pid: i32) -> SysResult<i32> {
    sc!(libc::SYS_pidfd_open, pid, 0).map(|v| v as i32)
}
/// A copy of descriptor `fd` of the process behind `pidfd` (needs ptrace access to it).
pub fn pidfd_getfd(pidfd: i32, fd: i32) -> SysResult<i32> {
    sc!(libc::SYS_pidfd_getfd, pidfd, fd, 0).map(|v| v as i32)
}
pub fn getsockopt_int(fd: i32, level: i32, name: i32) -> SysResult<i32> {
    let mut v: i32 = 0;
    let mut len = 4u32;
    sc!(libc::SYS_getsockopt, fd, level, name, &mut v as *mut i32, &mut len as *mut u32).map(|_| v)
}
/// getsockopt(TCP_INFO).
pub fn tcp_info(fd: i32) -> SysResult<libc::tcp_info> {
    // SAFETY: tcp_info is plain data; all-zero is a valid value.
    let mut v: libc::tcp_info = unsafe { core::mem::zeroed() };
    let mut len = core::mem::size_of::<libc::tcp_info>() as u32;
    sc!(
        libc::SYS_getsockopt,
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_INFO,
        &mut v as *mut libc::tcp_info,
        &mut len as *mut u32
    )
    .map(|_| v)
}
pub fn setsockopt_int(fd: i32, level: i32, name: i32, v: i32) -> SysResult<()> {
    sc!(libc::SYS_setsockopt, fd, level, name, &v as *const i32, 4).map(|_| ())
}
pub fn recv(fd: i32, buf: &mut [u8], flags: i32) -> SysResult<usize> {
    sc!(libc::SYS_recvfrom, fd, buf.as_mut_ptr(), buf.len(), flags, 0, 0)
}
pub fn send(fd: i32, buf: &[u8], flags: i32) -> SysResult<usize> {
    sc!(libc::SYS_sendto, fd, buf.as_ptr(), buf.len(), flags, 0, 0)
}
pub fn eventfd(flags: i32) -> SysResult<i32> {
    sc!(libc::SYS_eventfd2, 0, flags).map(|v| v as i32)
}
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> SysResult<usize> {
    sc!(libc::SYS_poll, fds.as_mut_ptr(), fds.len(), timeout_ms)
}
pub fn kcmp_file(pid: i32, fd1: i32, fd2: i32) -> SysResult<i32> {
    kcmp_files(pid, fd1, pid, fd2)
}
/// 0 when descriptor `fd1` of `pid1` and `fd2` of `pid2` are one open file description.
pub fn kcmp_files(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> SysResult<i32> {
    const KCMP_FILE: i32 = 0;
    sc!(libc::SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2).map(|v| v as i32)
}
pub fn pwrite(fd: i32, buf: &[u8], offset: u64) -> SysResult<usize> {
    sc!(libc::SYS_pwrite64, fd, buf.as_ptr(), buf.len(), offset)
}
/// The sockaddr of an abstract Unix socket name, and its length.
pub fn abstract_addr(name: &[u8]) -> (libc::sockaddr_un, u32) {
    // SAFETY: sockaddr_un is plain bytes.
    let mut addr: libc::sockaddr_un = unsafe { core::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    let n = name.len().min(addr.sun_path.len() - 1);
    for (i, &b) in name[..n].iter().enumerate() {
        addr.sun_path[i + 1] = b as libc::c_char;
    }
    (addr, (core::mem::size_of::<libc::sa_family_t>() + 1 + n) as u32)
}
/// connect(2) to raw `struct sockaddr` bytes.
pub fn connect_addr(fd: i32, addr: &[u8]) -> SysResult<()> {
    sc!(libc::SYS_connect, fd, addr.as_ptr(), addr.len()).map(|_| ())
}
pub fn connect(fd: i32, addr: &libc::sockaddr_un, len: u32) -> SysResult<()> {
    sc!(libc::SYS_connect, fd, addr as *const libc::sockaddr_un, len).map(|_| ())
}
/// Sends `data` with one descriptor attached (SCM_RIGHTS).
pub fn send_with_fd(sock: i32, data: &[u8], fd: i32) -> SysResult<usize> {
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain data; zero is a valid start.
    let mut msg: libc::msghdr = unsafe { core::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
    // SAFETY: the control buffer is large enough for one cmsg carrying one int (32 bytes).
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        *(libc::CMSG_DATA(c) as *mut i32) = fd;
    }
    sc!(libc::SYS_sendmsg, sock, &msg as *const libc::msghdr, libc::MSG_NOSIGNAL)
}
/// Receives into `buf`, returning the byte count and a descriptor if one was attached.
pub fn recv_with_fd(sock: i32, buf: &mut [u8]) -> SysResult<(usize, Option<i32>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data; zero is a valid start.
    let mut msg: libc::msghdr = unsafe { core::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = core::mem::size_of_val(&cbuf);
    let n = sc!(libc::SYS_recvmsg, sock, &mut msg as *mut libc::msghdr, libc::MSG_CMSG_CLOEXEC)?;
    let mut fd = None;
    // SAFETY: walking the control messages the kernel wrote into our buffer.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                fd = Some(*(libc::CMSG_DATA(c) as *const i32));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n, fd))
}
pub fn uname() -> libc::utsname {
    // SAFETY: utsname is plain bytes; zero is valid.
    let mut u: libc::utsname = unsafe { core::mem::zeroed() };
    let _ = sc!(libc::SYS_uname, &mut u as *mut libc::utsname);
    u
}
pub fn set_tid_address(addr: u64) -> i32 {
    sc!(libc::SYS_set_tid_address, addr).unwrap_or(0) as i32
}
pub fn set_robust_list(head: u64, len: u64) {
    let _ = sc!(libc::SYS_set_robust_list, head, len);
}

/// `prctl(PR_SET_MM, PR_SET_MM_MAP, …)` argument.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PrctlMmMap {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: u64,
    pub auxv_size: u32,
    pub exe_fd: u32,
}
pub fn prctl_set_mm_map(map: &PrctlMmMap) -> SysResult<()> {
    const PR_SET_MM: i32 = 35;
    const PR_SET_MM_MAP: i32 = 14;
    sc!(libc::SYS_prctl, PR_SET_MM, PR_SET_MM_MAP, map as *const PrctlMmMap, core::mem::size_of::<PrctlMmMap>(), 0)
        .map(|_| ())
}

/// XCR0 (enabled xsave features) and the xsave area size for them.
pub fn xsave_features() -> (u64, u32) {
    use core::arch::x86_64::__cpuid_count;
    // SAFETY: cpuid is available on every x86_64 CPU; xgetbv is executed only when CPUID says
    // OSXSAVE is set.
    unsafe {
        let leaf1 = __cpuid_count(1, 0);
        if leaf1.ecx & (1 << 27) == 0 {
            return (0, 0);
        }
        let xcr0 = core::arch::x86_64::_xgetbv(0);
        let leaf_d = __cpuid_count(0xd, 0);
        (xcr0, leaf_d.ebx)
    }
}

// System V IPC. The hooks (hooks/ipc.rs) call the real libc functions; these are for
// libmigrate's own use: the checkpoint's dump, the restore's mapping of segments.

pub fn shmget(key: i32, size: usize, flags: i32) -> SysResult<i32> {
    sc!(libc::SYS_shmget, key, size, flags).map(|v| v as i32)
}
/// Attaches segment `id` at `addr` (0: the kernel chooses) and returns where.
pub fn shmat(id: i32, addr: usize, flags: i32) -> SysResult<usize> {
    sc!(libc::SYS_shmat, id, addr, flags)
}
/// # Safety
/// Detaching memory that Rust references point into is undefined behaviour.
pub unsafe fn shmdt(addr: usize) -> SysResult<()> {
    sc!(libc::SYS_shmdt, addr).map(|_| ())
}
pub fn shmctl_stat(id: i32) -> SysResult<libc::shmid_ds> {
    // SAFETY: an all-zero shmid_ds is a valid value of this plain C struct.
    let mut ds: libc::shmid_ds = unsafe { core::mem::zeroed() };
    sc!(libc::SYS_shmctl, id, libc::IPC_STAT, &mut ds as *mut libc::shmid_ds).map(|_| ds)
}
/// shmctl/semctl/msgctl with a command that takes no argument (IPC_RMID).
pub fn ipc_rmid(kind_nr: c_long, id: i32) -> SysResult<()> {
    sc!(kind_nr, id, libc::IPC_RMID, 0, 0).map(|_| ())
}
pub fn semget(key: i32, nsems: i32, flags: i32) -> SysResult<i32> {
    sc!(libc::SYS_semget, key, nsems, flags).map(|v| v as i32)
}
pub fn semctl_stat(id: i32) -> SysResult<libc::semid_ds> {
    // SAFETY: an all-zero semid_ds is a valid value of this plain C struct.
    let mut ds: libc::semid_ds = unsafe { core::mem::zeroed() };
    sc!(libc::SYS_semctl, id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds).map(|_| ds)
}
/// semctl(GETALL): every semaphore's value; `values` must hold the set's size.
pub fn semctl_getall(id: i32, values: &mut [u16]) -> SysResult<()> {
    sc!(libc::SYS_semctl, id, 0, libc::GETALL, values.as_mut_ptr()).map(|_| ())
}
/// semctl(GETPID): the pid of the last process that operated on semaphore `num`.
pub fn semctl_getpid(id: i32, num: i32) -> SysResult<i32> {
    sc!(libc::SYS_semctl, id, num, libc::GETPID, 0).map(|v| v as i32)
}
pub fn msgget(key: i32, flags: i32) -> SysResult<i32> {
    sc!(libc::SYS_msgget, key, flags).map(|v| v as i32)
}
pub fn msgctl_stat(id: i32) -> SysResult<libc::msqid_ds> {
    // SAFETY: an all-zero msqid_ds is a valid value of this plain C struct.
    let mut ds: libc::msqid_ds = unsafe { core::mem::zeroed() };
    sc!(libc::SYS_msgctl, id, libc::IPC_STAT, &mut ds as *mut libc::msqid_ds).map(|_| ds)
}
/// msgrcv(2) into `buf` (a `long` type followed by the text); returns the text's length.
pub fn msgrcv(id: i32, buf: &mut [u64], msgtyp: i64, flags: i32) -> SysResult<usize> {
    let text_len = (buf.len().saturating_sub(1)) * 8;
    sc!(libc::SYS_msgrcv, id, buf.as_mut_ptr(), text_len, msgtyp, flags)
}
/// msgsnd(2) of `buf` (a `long` type followed by `text_len` bytes of text).
pub fn msgsnd(id: i32, buf: &[u64], text_len: usize, flags: i32) -> SysResult<()> {
    assert!(text_len <= buf.len().saturating_sub(1) * 8);
    sc!(libc::SYS_msgsnd, id, buf.as_ptr(), text_len, flags).map(|_| ())
}
/// mremap(2) with MREMAP_MAYMOVE|MREMAP_FIXED: moves `[old, old+len)` to `new`.
///
/// # Safety
/// Moving memory that Rust references point into is undefined behaviour.
pub unsafe fn mremap_fixed(old: usize, len: usize, new: usize) -> SysResult<usize> {
    sc!(libc::SYS_mremap, old, len, len, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, new)
}

// After `sc!`, which it uses (a macro is visible only below its definition).
pub mod inotify;
pub mod uffd;
