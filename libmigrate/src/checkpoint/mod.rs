//! Checkpoints. Every managed process has a checkpoint thread (`thread_main`) serving its
//! control socket. A checkpoint request makes that process the **coordinator** of its tree
//! (coordinator.rs): it freezes every member (member.rs, over their control sockets), has each
//! write its own sections into one image file, adds the tree's description, publishes the image
//! and releases (or kills) everyone. A single process is simply a tree of one.

pub mod control;
pub mod coordinator;
pub mod forked;
pub mod hasher;
pub mod member;
pub mod suspend;

use crate::sys;
use alloc::string::String;
use alloc::vec::Vec;
use control::{Conn, Incoming};
use core::sync::atomic::{AtomicI32, Ordering};

pub struct Request {
    pub kill: bool,
    /// Store the contents of the mapped executable, libraries and libmigrate too.
    pub with_binaries: bool,
    /// Write every page section as lz4 frames.
    pub compress: bool,
    pub dir: Option<Vec<u8>>,
    /// The network lock migrate-checkpoint set up for this checkpoint (an nftables table),
    /// recorded in the image for migrate-resume to lift.
    pub lock: String,
    /// Write the image into this descriptor (sent with the request, e.g. a memfd that
    /// migrate-checkpoint --to streams to another host) instead of a file in `dir`.
    pub image_fd: Option<i32>,
    /// Keep the tree frozen once the image is written, answer `ok held <bytes>`, and wait for
    /// `commit` (the tree dies, as with kill) or `abort` (it goes on); a lost connection aborts.
    pub hold: bool,
    /// A periodic checkpoint (migrate-run --interval): quiet, and older images are pruned.
    pub periodic: bool,
    /// Store only the pages that changed since the newest image of the program in the
    /// checkpoint directory (its parent); the rest are named in the ancestors.
    pub incremental: bool,
    /// A forked checkpoint (forked.rs): the tree is released once described, and writer
    /// children write the image from copy-on-write snapshots.
    pub fork: bool,
}

impl Request {
    pub fn new() -> Self {
        Request {
            kill: false,
            with_binaries: false,
            compress: COMPRESS_BY_DEFAULT.load(Ordering::Relaxed),
            dir: None,
            lock: String::new(),
            image_fd: None,
            hold: false,
            periodic: false,
            incremental: false,
            fork: false,
        }
    }
}

/// `migrate-run --compress` (MIGRATE_COMPRESS=1): the checkpoints the program takes on its own
/// (periodic ones, the checkpoint signal) are compressed; migrate-checkpoint says so itself.
pub static COMPRESS_BY_DEFAULT: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Periodic checkpoints (migrate-run --interval SECS --keep N): the checkpoint thread wakes
/// every PERIOD_MS and checkpoints the tree, leaving it running, then removes all but the
/// newest KEEP images of the program. Statics: a resumed program carries on with them (its
/// CLOCK_MONOTONIC continues in its time namespace).
static PERIOD_MS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static KEEP: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);
static NEXT_DUE_NS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// Periodic checkpoints are forked ones (`migrate-run --fork`).
static PERIOD_FORK: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Periodic checkpoints are incremental (`incr` in MIGRATE_INTERVAL's options).
static PERIODIC_INCREMENTAL: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Reads MIGRATE_INTERVAL (`<ms>:<keep>:<pid>[:<options>]`, options comma-separated: `fork`,
/// `incr`): only the process migrate-run started (its pid) checkpoints periodically; its
/// descendants do not (a fork child inherits the statics).
pub fn configure_periodic(pid: i32) {
    let spec = crate::env::var("MIGRATE_INTERVAL").unwrap_or_default();
    let parts: Vec<&str> = spec.split(':').collect();
    let (period, keep, options) = match parts.as_slice() {
        [ms, keep, p, rest @ ..] if p.parse::<i32>().ok() == Some(pid) && rest.len() <= 1 => {
            (ms.parse().unwrap_or(0), keep.parse().unwrap_or(3), rest.first().copied().unwrap_or(""))
        }
        _ => (0, 0, ""),
    };
    let fork = options.split(',').any(|o| o == "fork");
    PERIODIC_INCREMENTAL.store(options.split(',').any(|o| o == "incr"), Ordering::Relaxed);
    PERIOD_MS.store(period, Ordering::Relaxed);
    KEEP.store(keep, Ordering::Relaxed);
    PERIOD_FORK.store(fork, Ordering::Relaxed);
    NEXT_DUE_NS.store(sys::monotonic_ns() + period * 1_000_000, Ordering::Relaxed);
}

/// How long the checkpoint thread may wait for a request before a periodic checkpoint is due
/// (poll timeout in ms; -1: no periodic checkpoints).
/// A periodic checkpoint's request.
pub fn periodic_request() -> Request {
    let mut req = Request::new();
    req.periodic = true;
    req.incremental = PERIODIC_INCREMENTAL.load(Ordering::Relaxed);
    req.fork = PERIOD_FORK.load(Ordering::Relaxed);
    req
}

pub fn periodic_wait_ms() -> i32 {
    let period = PERIOD_MS.load(Ordering::Relaxed);
    if period == 0 {
        return -1;
    }
    let now = sys::monotonic_ns();
    let mut due = NEXT_DUE_NS.load(Ordering::Relaxed);
    // A clock that jumped (a resume with --host-clocks): one period from now.
    if due > now + period * 1_000_000 {
        due = now + period * 1_000_000;
        NEXT_DUE_NS.store(due, Ordering::Relaxed);
    }
    (due.saturating_sub(now) / 1_000_000).min(i32::MAX as u64) as i32
}

/// Whether periodic checkpoints are forked ones.
fn schedule_next_periodic() {
    let period = PERIOD_MS.load(Ordering::Relaxed);
    if period > 0 {
        NEXT_DUE_NS.store(sys::monotonic_ns() + period * 1_000_000, Ordering::Relaxed);
    }
}

/// Removes all but the newest KEEP images `<name>-<vpid>-<n>.mig` next to `path`.
fn prune_images(path: &str) {
    let keep = KEEP.load(Ordering::Relaxed) as usize;
    let Some((dir, file)) = path.rsplit_once('/') else { return };
    let Some(stem) = file.strip_suffix(".mig").and_then(|f| f.rsplit_once('-')).map(|(s, _)| s) else { return };
    let images = coordinator::program_images(dir, stem);
    let excess = images.len().saturating_sub(keep.max(1));
    // The images an incremental image that stays takes pages from stay too.
    let mut needed: Vec<String> = Vec::new();
    for (name, _) in &images[excess..] {
        let p = alloc::format!("{dir}/{name}");
        if let Ok(tree) = migrate_image::ImageReader::open(std::path::Path::new(&p)).and_then(|r| r.tree()) {
            needed.extend(tree.ancestors.into_iter().map(|a| a.file));
        }
    }
    for (name, _) in &images[..excess] {
        if !needed.contains(name) {
            let _ = sys::unlinkat(libc::AT_FDCWD, &sys::fs::cpath(alloc::format!("{dir}/{name}").as_bytes()));
        }
    }
}

impl Default for Request {
    fn default() -> Self {
        Self::new()
    }
}

/// Descriptors a checkpoint holds while it runs (connections, the image, /proc/self/mem):
/// never part of the saved descriptor table.
static TRANSIENT_FDS: [AtomicI32; 64] = [const { AtomicI32::new(-1) }; 64];

pub fn set_transient_any(fd: i32) {
    for t in &TRANSIENT_FDS {
        if t.compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            return;
        }
    }
}
pub fn clear_transient_fd(fd: i32) {
    for t in &TRANSIENT_FDS {
        let _ = t.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Acquire);
    }
}
pub fn clear_all_transient() {
    for t in &TRANSIENT_FDS {
        t.store(-1, Ordering::Release);
    }
}
pub fn is_transient_fd(fd: i32) -> bool {
    TRANSIENT_FDS.iter().any(|t| t.load(Ordering::Acquire) == fd)
}
/// Every descriptor libmigrate holds right now.
pub fn own_fds() -> Vec<i32> {
    let mut v: Vec<i32> = TRANSIENT_FDS.iter().map(|t| t.load(Ordering::Acquire)).filter(|&fd| fd >= 0).collect();
    v.extend([
        crate::state::CONTROL_FD.load(Ordering::Acquire),
        crate::state::WAKE_FD.load(Ordering::Acquire),
        crate::tree::REGISTRY_FD,
    ]);
    v
}

/// The default checkpoint directory (absolute), set at start.
pub static DEFAULT_DIR: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
/// LD_PRELOAD as this process was started with (the layout depends on it).
pub static LD_PRELOAD: std::sync::OnceLock<String> = std::sync::OnceLock::new();
/// Virtual tid of the checkpoint thread.
pub static CHECKPOINT_VTID: AtomicI32 = AtomicI32::new(0);

pub enum Outcome {
    Written { path: String, bytes: u64, frozen_ms: u64, processes: usize },
    Restored,
}

/// The checkpoint thread's body.
pub fn thread_main() -> ! {
    let all = crate::state::ALL_BUT_GLIBC_INTERNAL;
    let _ = sys::rt_sigprocmask(libc::SIG_SETMASK, Some(&all), None);
    CHECKPOINT_VTID.store(sys::gettid(), Ordering::Relaxed);
    loop {
        match control::next_incoming() {
            Incoming::User(req, conn) => serve_user(req, conn),
            Incoming::Coordinator(conn) => serve_coordinator(conn),
        }
    }
}

/// A checkpoint request: this process coordinates its tree's checkpoint.
fn serve_user(req: Request, mut conn: Option<Conn>) {
    let hold = req.hold;
    let periodic = req.periodic;
    // Any checkpoint restarts the period (a manual one counts too).
    schedule_next_periodic();
    let mut kill = req.kill;
    // The requester learns the frozen time as soon as the tree runs again (with --fork, long
    // before the image is complete); not when the tree is to die or is held.
    let notify = conn.as_ref().map(|c| c.fd).filter(|_| !hold && !kill);
    // A held checkpoint: the requester decides, once it has the image, whether the tree dies
    // (its copy runs elsewhere now) or goes on.
    let mut settle = |written: &Outcome| -> bool {
        let (Some(c), true, Outcome::Written { bytes, .. }) = (conn.as_mut(), hold, written) else { return kill };
        if c.send(alloc::format!("ok held {bytes}\n").as_bytes()).is_err() {
            kill = false;
            return false;
        }
        kill = matches!(c.read_line(3600).as_deref(), Ok(b"commit"));
        kill
    };
    let mut released = |frozen_ms: u64| {
        if let Some(fd) = notify {
            let _ = sys::write_all(fd, alloc::format!("frozen {frozen_ms}\n").as_bytes());
        }
    };
    let result = coordinator::run(&req, &mut settle, &mut released);
    if let Some(fd) = req.image_fd {
        let _ = sys::close(fd);
        clear_transient_fd(fd);
    }
    match result {
        Ok(Outcome::Restored) => {
            // `conn`'s descriptor belonged to the process this image was taken from: dropped
            // (which frees its buffer and closes nothing), never closed.
            drop(conn);
        }
        Ok(Outcome::Written { path, bytes, frozen_ms, processes }) => {
            match conn {
                Some(c) if hold => c.reply(if kill { b"committed\n" } else { b"aborted\n" }),
                Some(c) => c.reply(alloc::format!("ok {path}\n").as_bytes()),
                None if periodic => {
                    crate::debug!(
                        "periodic checkpoint written to {path} ({} KiB, stopped for {frozen_ms} ms)",
                        bytes / 1024
                    );
                    prune_images(&path);
                }
                None => crate::info!(
                    "checkpoint of {processes} process(es) written to {path} ({} KiB, stopped for {frozen_ms} ms)",
                    bytes / 1024
                ),
            }
            if kill {
                crate::resources::sockets::silence_connections();
                let _ = sys::kill(sys::getpid(), libc::SIGKILL);
            }
        }
        Err(msg) => {
            crate::info!("checkpoint failed: {msg}");
            if let Some(c) = conn {
                c.reply(&control::error_line(&msg));
            }
        }
    }
}

/// Another member coordinates: freeze, write our sections when asked, then go on or die. In a
/// forked checkpoint our writer child writes them: after `release` we keep the connection and
/// answer `collect` with its result; a connection closed before that stops the child.
fn serve_coordinator(mut conn: Conn) {
    if let Err(e) = member::freeze() {
        conn.reply(&control::error_line(&e));
        return;
    }
    let own: Vec<String> = own_fds().iter().map(|fd| alloc::format!("{fd}")).collect();
    let sysv = crate::resources::ipc::report();
    if conn.send(alloc::format!("frozen {} {sysv}\n", own.join(",")).as_bytes()).is_err() {
        member::release();
        conn.close();
        return;
    }
    let mut writer: Option<forked::Forked> = None;
    let mut released = false;
    loop {
        // Once released, the coordinator may first wait for the other members' writers.
        let timeout = if released { (forked::WRITER_TIMEOUT_MS / 1000) as i64 * 2 } else { 600 };
        let line = match conn.read_line(timeout) {
            Ok(l) => l,
            Err(e) => {
                if !released {
                    crate::info!("the checkpoint's coordinator went away ({e}); the program continues");
                    member::release();
                }
                if let Some(w) = writer.take() {
                    forked::abandon(w);
                }
                conn.close();
                return;
            }
        };
        let words: Vec<&[u8]> = line.split(|&c| c == b' ').collect();
        match words.first().copied() {
            Some(b"write") if words.len() >= 4 => {
                let num = |w: &[u8]| crate::sys::fs::parse_dec(w).unwrap_or(-1);
                let (proc, pos) = (num(words[1]), num(words[2]));
                let bins = words[3] == b"bins=1";
                let kill = words.get(4).is_some_and(|w| *w == b"kill=1");
                // `parent=<hex path>`: an incremental checkpoint's parent image.
                let parent = words
                    .iter()
                    .find_map(|w| w.strip_prefix(b"parent="))
                    .and_then(control::unhex)
                    .map(|p| member::ParentImage { path: String::from_utf8_lossy(&p).into_owned() });
                let fork = words.iter().skip(4).any(|w| *w == b"fork=1");
                let compress = words.iter().skip(4).any(|w| *w == b"compress=1");
                let Some(image_fd) = conn.received_fd.take() else {
                    let _ = conn.send(b"error no image descriptor came with the write command\n");
                    continue;
                };
                if released || writer.is_some() || (fork && kill) {
                    let _ = sys::close(image_fd);
                    clear_transient_fd(image_fd);
                    let _ = conn.send(b"error write out of order\n");
                    continue;
                }
                let outcome = member::write_process(
                    image_fd,
                    proc as u32,
                    pos as u64,
                    &member::WriteOptions { with_binaries: bins, kill, fork, compress, parent: parent.as_ref() },
                );
                if !matches!(outcome, Ok(member::WriteOutcome::Restored)) {
                    let _ = sys::close(image_fd);
                    clear_transient_fd(image_fd);
                }
                match outcome {
                    Ok(member::WriteOutcome::Restored) => {
                        // Its descriptor belonged to the old process: dropped (frees the
                        // buffer, closes nothing), never closed.
                        drop(conn);
                        return;
                    }
                    Ok(member::WriteOutcome::Written(w)) => {
                        let _ = conn.send(&written_reply(&w));
                    }
                    Ok(member::WriteOutcome::Forked(f)) => {
                        let reply = alloc::format!("forked {}\n", f.reserved_end);
                        writer = Some(f);
                        let _ = conn.send(reply.as_bytes());
                    }
                    Err(e) => {
                        let _ = conn.send(&control::error_line(&e));
                    }
                }
            }
            Some(b"release") => {
                let first = !released;
                if first {
                    member::release();
                    released = true;
                }
                let _ = conn.send(b"released\n");
                // A forked checkpoint goes on: the coordinator collects our writer's result.
                if first && writer.is_some() {
                    continue;
                }
                if let Some(w) = writer.take() {
                    forked::abandon(w);
                }
                conn.close();
                return;
            }
            Some(b"collect") => {
                let reply = match writer.take() {
                    Some(w) => match forked::collect(w) {
                        Ok(w) => written_reply(&w),
                        Err(e) => control::error_line(&e),
                    },
                    None => control::error_line("there is no forked write to collect"),
                };
                if !released {
                    member::release();
                }
                let _ = conn.send(&reply);
                conn.close();
                return;
            }
            Some(b"kill") => {
                crate::resources::sockets::silence_connections();
                let _ = sys::kill(sys::getpid(), libc::SIGKILL);
            }
            _ => {
                let _ = conn.send(b"error unknown command\n");
            }
        }
    }
}

/// `written <end> <n> <vpid> <vppid> <vpgid> <vsid>` and the n bytes of the section table.
fn written_reply(w: &member::Written) -> Vec<u8> {
    let table = postcard::to_allocvec(&w.sections).unwrap_or_default();
    let (a, b, c, d) = w.ids;
    let mut msg = alloc::format!("written {} {} {a} {b} {c} {d}\n", w.end, table.len()).into_bytes();
    msg.extend_from_slice(&table);
    msg
}
