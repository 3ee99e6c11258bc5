//! Saved execution contexts: the minimal "jump context" each thread leaves behind when it parks
//! (callee-saved registers, MXCSR, x87 control word and the stack pointer, pushed on its own
//! stack), and the routines that come back to it — in the same process after a checkpoint, or in
//! a new process after a restore. Everything else (all registers, FPU/AVX state, the signal
//! mask) is in the kernel's signal frame further up the same stack and comes back with
//! `rt_sigreturn` when the parked signal handler returns.

use core::arch::global_asm;

// migrate_park_and_save(slot: *mut u64, f: extern "C" fn(*mut c_void), arg: *mut c_void) -> u64
//   Pushes the jump context, stores the stack pointer in *slot, calls f(arg) below it and
//   returns 0 when f returns. A later migrate_resume_context(*slot, v) "returns" from the same
//   call a second time with v, on any thread, in this or a restored process.
// migrate_resume_context(sp: u64, value: u64) -> !
// migrate_clone_onto(flags, sp, ptid, ctid, tls, value) -> child tid (in the parent)
//   clone(2) whose child starts directly on the saved context `sp` and returns `value` there.
// migrate_clone3_onto(args, size, value) -> child tid (in the parent)
//   The same with clone3(2), so that the thread can get its old tid back (set_tid).
// migrate_call_on_stack(arg, f, stack_top) -> !
//   Switches to `stack_top` and calls f(arg), which must not return.
global_asm!(
    ".pushsection .text.migrate_context,\"ax\",@progbits",
    ".globl migrate_park_and_save",
    ".hidden migrate_park_and_save",
    ".type migrate_park_and_save,@function",
    "migrate_park_and_save:",
    "    push rbp",
    "    push rbx",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    sub rsp, 8",
    "    stmxcsr [rsp]",
    "    fnstcw [rsp+4]",
    "    mov [rdi], rsp",
    "    mov rdi, rdx",
    "    call rsi",
    "    xor eax, eax",
    "    jmp 2f",
    ".globl migrate_resume_context",
    ".hidden migrate_resume_context",
    ".type migrate_resume_context,@function",
    "migrate_resume_context:",
    "    mov rsp, rdi",
    "    mov rax, rsi",
    "2:",
    "    ldmxcsr [rsp]",
    "    fldcw [rsp+4]",
    "    add rsp, 8",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop rbx",
    "    pop rbp",
    "    ret",
    ".globl migrate_clone_onto",
    ".hidden migrate_clone_onto",
    ".type migrate_clone_onto,@function",
    "migrate_clone_onto:",
    "    push r12",
    "    mov r12, r9",
    "    mov r10, rcx",
    "    mov eax, 56",
    "    syscall",
    "    test rax, rax",
    "    jnz 3f",
    "    mov rdi, rsp",
    "    mov rsi, r12",
    "    jmp migrate_resume_context",
    "3:",
    "    pop r12",
    "    ret",
    ".globl migrate_clone3_onto",
    ".hidden migrate_clone3_onto",
    ".type migrate_clone3_onto,@function",
    "migrate_clone3_onto:",
    "    push r12",
    "    mov r12, rdx",
    "    mov eax, 435",
    "    syscall",
    "    test rax, rax",
    "    jnz 4f",
    "    mov rdi, rsp",
    "    mov rsi, r12",
    "    jmp migrate_resume_context",
    "4:",
    "    pop r12",
    "    ret",
    ".globl migrate_call_on_stack",
    ".hidden migrate_call_on_stack",
    ".type migrate_call_on_stack,@function",
    "migrate_call_on_stack:",
    "    and rdx, -16",
    "    mov rsp, rdx",
    "    xor ebp, ebp",
    "    call rsi",
    "    ud2",
    ".popsection",
);

unsafe extern "C" {
    fn migrate_park_and_save(slot: *mut u64, f: extern "C" fn(*mut libc::c_void), arg: *mut libc::c_void) -> u64;
    fn migrate_resume_context(sp: u64, value: u64) -> !;
    fn migrate_clone_onto(flags: u64, sp: u64, ptid: u64, ctid: u64, tls: u64, value: u64) -> i64;
    fn migrate_call_on_stack(arg: usize, f: extern "C" fn(usize) -> !, stack_top: usize) -> !;
    fn migrate_clone3_onto(args: *const CloneArgs, size: usize, value: u64) -> i64;
}

/// `struct clone_args` of clone3(2).
#[repr(C)]
#[derive(Default)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// clone3(2) whose child starts on the saved context at `args.stack + args.stack_size` and
/// returns `value` there; used to recreate a thread with its original tid (`set_tid`).
///
/// # Safety
/// As for [`clone_onto`]; `args` must be valid and its stack end a saved context.
pub unsafe fn clone3_onto(args: &CloneArgs, value: u64) -> i64 {
    // SAFETY: per the contract above.
    unsafe { migrate_clone3_onto(args, core::mem::size_of::<CloneArgs>(), value) }
}

/// Saves this thread's jump context into `*slot`, runs `f(arg)` further down the stack, and
/// returns 0 when it returns — or returns the `value` passed to [`resume_context`] when the
/// context is resumed later (possibly in a restored process).
///
/// # Safety
/// Everything the caller keeps on its stack must stay valid until the context is resumed; the
/// caller must treat a non-zero return like a fresh start of a new process (descriptors and
/// other kernel objects held in locals may not exist any more).
#[inline(never)]
pub unsafe fn park_and_save(slot: *mut u64, f: extern "C" fn(*mut libc::c_void), arg: *mut libc::c_void) -> u64 {
    // SAFETY: the assembly follows the SysV ABI; `slot` is the caller's valid pointer.
    unsafe { migrate_park_and_save(slot, f, arg) }
}

/// Jumps to a saved context.
///
/// # Safety
/// `sp` must come from [`park_and_save`] and the memory above it must hold that context intact.
pub unsafe fn resume_context(sp: u64, value: u64) -> ! {
    // SAFETY: per the contract above.
    unsafe { migrate_resume_context(sp, value) }
}

/// Clones a thread that starts on the saved context `sp` (returning `value` there).
///
/// # Safety
/// `sp` must be a saved context in memory shared with the new thread (CLONE_VM); `ptid`/`ctid`
/// must be valid for the flags given; `tls` the thread's fs base.
pub unsafe fn clone_onto(flags: u64, sp: u64, ptid: u64, ctid: u64, tls: u64, value: u64) -> i64 {
    // SAFETY: per the contract above.
    unsafe { migrate_clone_onto(flags, sp, ptid, ctid, tls, value) }
}

/// Runs `f(arg)` on another stack, never to return.
///
/// # Safety
/// `stack_top` must be the top of a writable region large enough for `f`.
pub unsafe fn call_on_stack(arg: usize, f: extern "C" fn(usize) -> !, stack_top: usize) -> ! {
    // SAFETY: per the contract above.
    unsafe { migrate_call_on_stack(arg, f, stack_top) }
}
