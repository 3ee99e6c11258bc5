//! libmigrate: injected with LD_PRELOAD into every managed process.
//!
//! Its constructor either starts the checkpoint machinery (a checkpoint thread waiting on the
//! control socket and the checkpoint signal) or, when MIGRATE_RESTORE names an image, restores
//! that image into this freshly exec'd process and never returns. See docs/ARCHITECTURE.md.

extern crate alloc;

pub mod alloc_arena;
pub mod checkpoint;
pub mod env;
pub mod hooks;
pub mod log;
pub mod resources;
pub mod restore;
pub mod state;
pub mod sys;
pub mod tree;

use core::sync::atomic::Ordering;

#[global_allocator]
static ARENA: alloc_arena::Arena = alloc_arena::Arena::new();

#[used]
#[unsafe(link_section = ".init_array")]
static CONSTRUCTOR: extern "C" fn() = constructor;

extern "C" fn constructor() {
    match env::var("MIGRATE_LOG").as_deref() {
        Some("quiet") => log::LEVEL.store(log::QUIET, Ordering::Relaxed),
        Some("debug") => log::LEVEL.store(log::DEBUG, Ordering::Relaxed),
        _ => {}
    }
    hooks::resolve_all();
    if let Some(sig) = env::var("MIGRATE_SIGNAL").and_then(|s| s.parse::<i32>().ok()) {
        if (1..=64).contains(&sig) && sig != state::SUSPEND_SIGNAL && sig != libc::SIGKILL && sig != libc::SIGSTOP {
            state::CHECKPOINT_SIGNAL.store(sig, Ordering::Relaxed);
        }
    }
    if let Some((image, force)) = restore::requested() {
        restore::run(&image, force);
    }
    start_managed();
}

/// Normal start: this process (or a fork child) becomes a managed process.
fn start_managed() {
    let pid = sys::getpid();
    state::VIRTUAL_PID.store(pid, Ordering::Relaxed);
    let _ = state::PIDS.insert(pid_virt::VirtPid(pid), pid_virt::RealPid(pid));
    // Membership of the tree: a fork child already has the registry mapped; an exec'd program
    // finds it at its reserved descriptor; migrate-run's program starts a new tree.
    // migrate-run names the pid of the program that starts a new tree (it execs: same pid);
    // descendants see the variable too, but with another pid, and join.
    let new_tree = env::var("MIGRATE_NEW_TREE").and_then(|v| v.parse::<i32>().ok()) == Some(pid);
    let have = tree::registry().is_some() && !new_tree;
    if !have && (new_tree || !tree::attach_inherited()) {
        if let Err(e) = tree::create() {
            info!("cannot create the tree registry ({e}); this process is checkpointed on its own");
        }
    }
    tree::join(pid);
    let dir = env::var_bytes("MIGRATE_CKPT_DIR").or_else(resources::files_cwd).unwrap_or_else(|| b".".to_vec());
    let _ = checkpoint::DEFAULT_DIR.set(dir);
    checkpoint::configure_periodic(pid);
    checkpoint::COMPRESS_BY_DEFAULT.store(env::var("MIGRATE_COMPRESS").is_some_and(|v| v == "1"), Ordering::Relaxed);
    let _ = checkpoint::LD_PRELOAD.set(env::var("LD_PRELOAD").unwrap_or_default());
    if let Err(e) = checkpoint::suspend::install_handlers() {
        info!("cannot install signal handlers ({e}); checkpoints are disabled in this process");
        return;
    }
    if let Err(e) = checkpoint::control::open_channel() {
        info!("cannot open the control socket ({e}); checkpoints by signal only");
    }
    spawn_checkpoint_thread();
    static ATFORK: std::sync::Once = std::sync::Once::new();
    ATFORK.call_once(|| {
        // SAFETY: the handlers are plain extern "C" functions valid for the process's lifetime.
        unsafe { libc::pthread_atfork(Some(before_fork), Some(after_fork_parent), Some(after_fork_child)) };
    });
    state::ACTIVE.store(1, Ordering::Release);
}

fn spawn_checkpoint_thread() {
    // The thread must never accept a signal meant for the program, not even before its first
    // instruction: it starts with every signal blocked (a new thread inherits the mask).
    let all = state::ALL_BUT_GLIBC_INTERNAL;
    let mut old = 0u64;
    let _ = sys::rt_sigprocmask(libc::SIG_SETMASK, Some(&all), Some(&mut old));
    let spawned =
        std::thread::Builder::new().name("migrate-ckpt".into()).stack_size(1 << 20).spawn(|| checkpoint::thread_main());
    let _ = sys::rt_sigprocmask(libc::SIG_SETMASK, Some(&old), None);
    if let Err(e) = spawned {
        info!("cannot start the checkpoint thread ({e}); checkpoints are disabled in this process");
    }
}

extern "C" fn before_fork() {
    // A lazy restore still bringing pages in: the child would not inherit the registration
    // and would read zeros where the pages are still missing.
    restore::lazy::wait_complete();
    ARENA.lock();
}

extern "C" fn after_fork_parent() {
    ARENA.unlock();
}

extern "C" fn after_fork_child() {
    ARENA.reset_lock_in_child();
    start_managed();
}
