//! `migrate-resume --exact-pids`: start the resumed process with its original pid.
//!
//! clone3(2) with `set_tid` creates a child with a chosen pid when the caller may (root or
//! CAP_CHECKPOINT_RESTORE in the pid namespace's user namespace) and the number is free. The
//! child goes on to exec the program (whose restorer recreates the threads with their original
//! tids too, see libmigrate's restore/switch.rs); this process stays as its parent, forwards
//! the signals a shell sends, and exits the way the program does.

use crate::exit::warn;
use std::sync::atomic::{AtomicI32, Ordering};

/// `struct clone_args` (clone3(2)).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// What happened to the attempt.
pub enum Forked {
    /// We are the child, running with the original pid: carry on and exec the program.
    Child,
    /// We are the parent; the program runs as this child. Never returns normally.
    Parent(i32),
    /// Not possible here (the reason was printed); carry on without exact pids.
    Unavailable,
}

/// Forks a child with pid `pid` if the kernel allows it; with `insist`, says why not.
pub fn fork_with_pid(pid: i32, insist: bool) -> Forked {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } == pid {
        return Forked::Child; // already the right pid: no parent process needed
    }
    let want = pid;
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: &want as *const i32 as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM and without a stack is fork(): the child gets a copy of
    // this single-threaded process and returns 0 here.
    let r = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
    if r == 0 {
        return Forked::Child;
    }
    if r > 0 {
        return Forked::Parent(r as i32);
    }
    let err = std::io::Error::last_os_error();
    let why = match err.raw_os_error() {
        Some(libc::EEXIST) => format!("pid {pid} is in use on this host"),
        Some(libc::EPERM) => "choosing a pid needs root or CAP_CHECKPOINT_RESTORE".to_string(),
        Some(libc::EINVAL) => format!("pid {pid} is outside this pid namespace's range"),
        _ => format!("clone3 with set_tid failed: {err}"),
    };
    if insist {
        warn(
            "resume",
            &format!(
                "--exact-pids: {why}; resuming with a new pid (the program still sees {pid} through the translation table)"
            ),
        );
    }
    Forked::Unavailable
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Signals from the terminal (Ctrl-C, …) reach the whole foreground group, the program
    // included: pass on only what a process sent to us.
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    if unsafe { (*info).si_code } == libc::SI_KERNEL {
        return;
    }
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(child, sig) };
    }
}

/// Waits for the child, passing on the signals a shell or supervisor sends, then ends this
/// process the way the child ended.
pub fn wait_and_exit(child: i32) -> ! {
    CHILD.store(child, Ordering::Relaxed);
    // What was handed down (shared sockets, the registry, …) belongs to the program now; a
    // listening socket held here would outlive it.
    // SAFETY: closing descriptors of this process above stderr; nothing here uses them.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    for sig in [
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGTERM,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGCONT,
        libc::SIGWINCH,
        libc::SIGALRM,
    ] {
        // SAFETY: `forward` is async-signal-safe; a zeroed sigaction carrying it is valid.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = forward as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: valid out-pointer.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child {
            CHILD.store(0, Ordering::Relaxed); // never signal a reused pid
            break;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            std::process::exit(1);
        }
    }
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // SAFETY: restoring the default action and re-raising ends us like the child ended.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        std::process::exit(128 + sig);
    }
    std::process::exit(libc::WEXITSTATUS(status))
}
