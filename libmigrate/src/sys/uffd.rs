//! userfaultfd(2) for the lazy restore (restore/lazy.rs): the descriptor, its ioctls, the
//! message layout, and the two assembly routines the page server needs (a thread started on a
//! stack of its own, and an exit that unmaps that stack first). Declared after `sc!` in
//! sys/mod.rs, which it uses. Layouts and numbers are those of <linux/userfaultfd.h>.

use super::{check, syscall6, SysResult};
use core::arch::global_asm;

pub const UFFD_API: u64 = 0xaa;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

// _IOWR/_IOR(0xAA, nr, size)
const UFFDIO_API: u64 = 0xc018_aa3f;
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_UNREGISTER: u64 = 0x8010_aa01;
const UFFDIO_WAKE: u64 = 0x8010_aa02;
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
/// `USERFAULTFD_IOC_NEW` on /dev/userfaultfd (_IO(0xAA, 0)).
const USERFAULTFD_IOC_NEW: u64 = 0xaa00;
/// Bit of `_UFFDIO_COPY` in the ioctls a registration reports.
pub const UFFDIO_COPY_BIT: u64 = 1 << 3;

/// `struct uffd_msg`: 32 bytes; `arg` holds the event's three words (pagefault: flags,
/// address, thread id; remap: from, to, len; remove/unmap: start, end).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Msg {
    pub event: u8,
    pub reserved: [u8; 7],
    pub arg: [u64; 3],
}

#[repr(C)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct Register {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct Zeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

/// A new userfaultfd (close-on-exec, non-blocking) for this process's memory, kernel accesses
/// included (no UFFD_USER_MODE_ONLY): the system call, else /dev/userfaultfd (which an
/// administrator may open to users the vm.unprivileged_userfaultfd sysctl turns away).
pub fn create() -> SysResult<i32> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let first = match sc!(libc::SYS_userfaultfd, flags) {
        Ok(fd) => return Ok(fd as i32),
        Err(e) => e,
    };
    let dev = super::open(b"/dev/userfaultfd\0", libc::O_RDWR | libc::O_CLOEXEC, 0).map_err(|_| first)?;
    let got = sc!(libc::SYS_ioctl, dev, USERFAULTFD_IOC_NEW, flags);
    let _ = super::close(dev);
    got.map(|fd| fd as i32).map_err(|_| first)
}

/// UFFDIO_API: enables `features`; fails if the kernel lacks one of them.
pub fn api(fd: i32, features: u64) -> SysResult<()> {
    let mut a = Api { api: UFFD_API, features, ioctls: 0 };
    sc!(libc::SYS_ioctl, fd, UFFDIO_API, &mut a as *mut Api).map(|_| ())
}

/// UFFDIO_REGISTER in MISSING mode; returns the ioctls the range supports.
pub fn register(fd: i32, start: u64, len: u64) -> SysResult<u64> {
    let mut r = Register { start, len, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
    sc!(libc::SYS_ioctl, fd, UFFDIO_REGISTER, &mut r as *mut Register).map(|_| r.ioctls)
}

pub fn unregister(fd: i32, start: u64, len: u64) -> SysResult<()> {
    let r = Range { start, len };
    sc!(libc::SYS_ioctl, fd, UFFDIO_UNREGISTER, &r as *const Range).map(|_| ())
}

/// Wakes the threads waiting on a fault in the range.
pub fn wake(fd: i32, start: u64, len: u64) {
    let r = Range { start, len };
    let _ = sc!(libc::SYS_ioctl, fd, UFFDIO_WAKE, &r as *const Range);
}

/// UFFDIO_COPY of `len` bytes from `src` to the missing range at `dst` (waking its waiters).
/// Returns the bytes copied, or the error with the bytes copied before it.
///
/// # Safety
/// `[src, src+len)` must be readable memory of the caller.
pub unsafe fn copy(fd: i32, dst: u64, src: u64, len: u64) -> Result<u64, (super::Errno, u64)> {
    let mut c = Copy { dst, src, len, mode: 0, copy: 0 };
    match sc!(libc::SYS_ioctl, fd, UFFDIO_COPY, &mut c as *mut Copy) {
        Ok(_) => Ok(len),
        Err(e) => Err((e, c.copy.max(0) as u64)),
    }
}

/// UFFDIO_ZEROPAGE for the missing range (waking its waiters).
pub fn zeropage(fd: i32, start: u64, len: u64) -> SysResult<()> {
    let mut z = Zeropage { start, len, mode: 0, zeropage: 0 };
    sc!(libc::SYS_ioctl, fd, UFFDIO_ZEROPAGE, &mut z as *mut Zeropage).map(|_| ())
}

// migrate_clone_fn(flags, stack_top, child_tid, arg, f) -> tid in the parent
//   clone(2) whose child runs f(arg) on `stack_top` (16-byte aligned) and must never return.
// migrate_unmap_and_exit(addr, len) -> !
//   munmap(addr, len) then exit(0), touching no memory in between: the calling thread's
//   stack may lie in the range.
global_asm!(
    ".pushsection .text.migrate_uffd,\"ax\",@progbits",
    ".globl migrate_clone_fn",
    ".hidden migrate_clone_fn",
    ".type migrate_clone_fn,@function",
    "migrate_clone_fn:",
    "    push r12",
    "    push r13",
    "    mov r12, rcx",
    "    mov r13, r8",
    "    mov r10, rdx",
    "    xor edx, edx",
    "    xor r8d, r8d",
    "    mov eax, 56",
    "    syscall",
    "    test rax, rax",
    "    jnz 5f",
    "    xor ebp, ebp",
    "    mov rdi, r12",
    "    call r13",
    "    ud2",
    "5:",
    "    pop r13",
    "    pop r12",
    "    ret",
    ".globl migrate_unmap_and_exit",
    ".hidden migrate_unmap_and_exit",
    ".type migrate_unmap_and_exit,@function",
    "migrate_unmap_and_exit:",
    "    mov eax, 11",
    "    syscall",
    "    xor edi, edi",
    "    mov eax, 60",
    "    syscall",
    "    ud2",
    ".popsection",
);

unsafe extern "C" {
    fn migrate_clone_fn(flags: u64, stack_top: u64, child_tid: u64, arg: u64, f: extern "C" fn(u64) -> !) -> i64;
    fn migrate_unmap_and_exit(addr: u64, len: u64) -> !;
}

/// Starts a thread of this process running `f(arg)` on the stack ending at `stack_top`; the
/// kernel clears `*child_tid` and wakes its futex waiters (shared) when the thread exits.
///
/// # Safety
/// `stack_top` must be the 16-byte aligned top of a writable region that stays mapped while
/// the thread runs; `child_tid` a valid address for as long as the process lives.
pub unsafe fn spawn_thread(stack_top: u64, child_tid: u64, arg: u64, f: extern "C" fn(u64) -> !) -> i64 {
    let flags = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM
        | libc::CLONE_CHILD_CLEARTID) as u64;
    // SAFETY: per the contract above.
    unsafe { migrate_clone_fn(flags, stack_top, child_tid, arg, f) }
}

/// Unmaps `[addr, addr+len)` — the calling thread's own stack may be in it — and ends the
/// thread.
///
/// # Safety
/// Nothing may use the range afterwards.
pub unsafe fn unmap_and_exit(addr: u64, len: u64) -> ! {
    // SAFETY: per the contract above; the routine touches no memory between the two calls.
    unsafe { migrate_unmap_and_exit(addr, len) }
}
