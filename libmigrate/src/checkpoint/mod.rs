//! The checkpoint thread and the protocol: quiesce (park every program thread), dump (describe
//! every resource), write (pages straight from the mappings, then metadata; the image appears
//! under its final name only when complete and fsync'd), then resume the program — or, in a
//! restored process, come back here and finish the restore.
//!
//! The checkpoint thread saves its own jump context right before writing memory, so the image
//! holds it in the middle of this function: a restored process's copy of this thread continues
//! from `park_and_save` with a non-zero value and takes the "restored" branch.

pub mod control;
pub mod suspend;

use crate::resources::{self, files, host, memory, process, signals, threads, Files};
use crate::state::{self, SUSPEND_SIGNAL};
use crate::sys::{self, context, fs};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use migrate_image::{ImageMeta, ImageWriter, ProcessEntry, SectionKind, Sink};
use suspend::{PARKED, RESTORED_ARRIVED, SLOTS};

pub struct Request {
    pub kill: bool,
    /// Store the contents of the mapped executable, libraries and libmigrate too.
    pub with_binaries: bool,
    pub dir: Option<Vec<u8>>,
}

/// Descriptors the checkpoint itself holds while it runs (connection, image, /proc/self/mem):
/// never part of the saved descriptor table.
static TRANSIENT_FDS: [AtomicI32; 4] = [const { AtomicI32::new(-1) }; 4];

pub fn set_transient(slot: usize, fd: i32) {
    TRANSIENT_FDS[slot].store(fd, Ordering::Release);
}
pub fn clear_transient(slot: usize) {
    TRANSIENT_FDS[slot].store(-1, Ordering::Release);
}
pub fn is_transient_fd(fd: i32) -> bool {
    TRANSIENT_FDS.iter().any(|t| t.load(Ordering::Acquire) == fd)
}

/// The default checkpoint directory (absolute), set at start.
pub static DEFAULT_DIR: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
/// LD_PRELOAD as this process was started with (the layout depends on it).
pub static LD_PRELOAD: std::sync::OnceLock<String> = std::sync::OnceLock::new();
/// Virtual tid of the checkpoint thread.
pub static CHECKPOINT_VTID: AtomicI32 = AtomicI32::new(0);
static SEQUENCE: AtomicU32 = AtomicU32::new(0);

struct SavedSp(UnsafeCell<u64>);
// SAFETY: only the checkpoint thread touches it.
unsafe impl Sync for SavedSp {}
static CHECKPOINT_THREAD_SP: SavedSp = SavedSp(UnsafeCell::new(0));

pub enum Outcome {
    Written { path: String, bytes: u64, frozen_ms: u64 },
    Restored,
}

/// The checkpoint thread's body.
pub fn thread_main() -> ! {
    let all = !0u64;
    let _ = sys::rt_sigprocmask(libc::SIG_BLOCK, Some(&all), None);
    CHECKPOINT_VTID.store(sys::gettid(), Ordering::Relaxed);
    loop {
        let (req, conn) = control::next_request();
        let kill = req.kill;
        match run(&req) {
            Ok(Outcome::Restored) => {
                // `conn` belonged to the process this image was taken from.
                clear_transient(0);
            }
            Ok(Outcome::Written { path, bytes, frozen_ms }) => {
                if conn < 0 {
                    crate::info!(
                        "checkpoint written to {path} ({} KiB, program stopped for {frozen_ms} ms)",
                        bytes / 1024
                    );
                }
                let mut line = Vec::with_capacity(path.len() + 8);
                line.extend_from_slice(b"ok ");
                line.extend_from_slice(path.as_bytes());
                line.push(b'\n');
                control::reply(conn, &line);
                if kill {
                    let _ = sys::kill(sys::getpid(), libc::SIGKILL);
                }
            }
            Err(msg) => {
                crate::info!("checkpoint failed: {msg}");
                let mut line = Vec::with_capacity(msg.len() + 8);
                line.extend_from_slice(b"error ");
                line.extend_from_slice(msg.replace('\n', " ").as_bytes());
                line.push(b'\n');
                control::reply(conn, &line);
            }
        }
    }
}

/// Is thread `tid` of this process a zombie (exited, not yet reaped with the process)?
fn is_zombie(tid: i32) -> bool {
    let stat = fs::read_file(format!("/proc/self/task/{tid}/stat").as_bytes()).unwrap_or_default();
    let state = stat.iter().rposition(|&c| c == b')').and_then(|i| stat.get(i + 2));
    matches!(state, Some(b'Z') | Some(b'X'))
}

/// Stops every program thread in its suspend handler. Returns how many slots are in use.
fn quiesce(me: i32) -> Result<usize, String> {
    let pid = sys::getpid();
    for s in SLOTS.iter() {
        s.tid.store(0, Ordering::Relaxed);
        s.parked.store(0, Ordering::Relaxed);
    }
    PARKED.store(0, Ordering::Release);
    let gen = suspend::RELEASE.load(Ordering::Acquire);
    let mut used = 0usize;
    let mut alive = 0u32;
    loop {
        let tasks = fs::list_dir(b"/proc/self/task").map_err(|e| format!("cannot list /proc/self/task: {e}"))?;
        let mut signalled = 0;
        for t in tasks {
            let Some(tid) = fs::parse_dec(&t).map(|v| v as i32) else {
                continue;
            };
            if tid == me || SLOTS[..used].iter().any(|s| s.tid.load(Ordering::Relaxed) == tid) || is_zombie(tid) {
                continue; // a main thread that called pthread_exit stays as a zombie: nothing to save
            }
            if used == SLOTS.len() {
                return Err(format!("more than {} threads", SLOTS.len()));
            }
            let slot = &SLOTS[used];
            slot.vtid.store(state::to_virt(tid), Ordering::Relaxed);
            slot.release_gen.store(gen, Ordering::Relaxed);
            slot.npending.store(0, Ordering::Relaxed);
            slot.tid.store(tid, Ordering::Release);
            used += 1;
            match sys::tgkill(pid, tid, SUSPEND_SIGNAL) {
                Ok(()) => {
                    alive += 1;
                    signalled += 1;
                }
                Err(_) => slot.tid.store(-1, Ordering::Release), // already gone
            }
        }
        if signalled == 0 {
            return Ok(used);
        }
        // Wait until every signalled thread is parked; threads that exit meanwhile stop counting.
        let deadline = sys::monotonic_ns() + 10_000_000_000;
        loop {
            let parked = PARKED.load(Ordering::Acquire);
            if parked >= alive {
                break;
            }
            if sys::monotonic_ns() > deadline {
                let stuck: Vec<i32> = SLOTS[..used]
                    .iter()
                    .filter(|s| s.tid.load(Ordering::Relaxed) > 0 && s.parked.load(Ordering::Acquire) == 0)
                    .map(|s| s.tid.load(Ordering::Relaxed))
                    .collect();
                suspend::release_all();
                return Err(format!(
                    "threads {stuck:?} did not stop within 10 s (blocked in an uninterruptible state, or blocking signal {SUSPEND_SIGNAL} with raw system calls)"
                ));
            }
            let _ = sys::futex_wait(&PARKED, parked, 20_000_000);
            for s in &SLOTS[..used] {
                let tid = s.tid.load(Ordering::Relaxed);
                if tid > 0 && s.parked.load(Ordering::Acquire) == 0 && sys::tgkill(pid, tid, 0).is_err() {
                    s.tid.store(-1, Ordering::Release);
                    alive -= 1;
                }
            }
        }
    }
}

/// Writes raw bytes with write(2); a `Sink` for the image writer.
struct FdSink(i32);

impl Sink for FdSink {
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        sys::write_all(self.0, buf).map_err(|e| std::io::Error::from_raw_os_error(e.0))
    }
}

struct WriteCtx<'a> {
    writer: &'a mut ImageWriter<FdSink>,
    process: &'a ProcessEntry,
    sections: &'a mut [Option<u32>],
    mem_fd: i32,
    bounce: &'a mut [u8],
    error: Option<migrate_image::ImageError>,
}

/// Runs on the checkpoint thread's stack below its saved context: writes every stored page.
/// Allocates nothing (the allocator's state is being saved along with everything else).
extern "C" fn write_memory(arg: *mut libc::c_void) {
    // SAFETY: `arg` is the WriteCtx passed by `run`, alive for this call.
    let ctx = unsafe { &mut *(arg as *mut WriteCtx<'_>) };
    let here = &ctx as *const _ as u64;
    for (i, v) in ctx.process.vmas.iter().enumerate() {
        if v.runs.is_empty() {
            continue;
        }
        let live = v.start <= here && here < v.end;
        let res = ctx
            .writer
            .begin_section(SectionKind::Pages { vma: i as u32 }, true)
            .and_then(|_| memory::write_pages(ctx.writer, v, ctx.mem_fd, ctx.bounce, live));
        if let Err(e) = res {
            ctx.error = Some(e);
            return;
        }
        ctx.sections[i] = Some(ctx.writer.end_section());
    }
}

fn own_library_path(maps: &[memory::MapLine]) -> Option<String> {
    let here = own_library_path as *const () as u64;
    maps.iter().find(|m| m.start <= here && here < m.end).map(|m| m.name.clone())
}

fn dir_for(req: &Request) -> Vec<u8> {
    req.dir.clone().or_else(|| DEFAULT_DIR.get().cloned()).unwrap_or_else(|| b".".to_vec())
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Describes the frozen process.
fn dump() -> Result<(ImageMeta, Vec<memory::MapLine>), String> {
    let mut files = Files::default();
    let basics = process::dump(&mut files)?;
    let maps = memory::read_maps().map_err(|e| format!("cannot read /proc/self/maps: {e}"))?;
    let lib = own_library_path(&maps).ok_or("cannot find libmigrate's own mapping")?;
    let libmigrate = files.intern_path(&lib, true);
    let host = host::dump(&maps);
    let vmas = memory::dump(&maps, &mut files, basics.mm.start_brk, basics.mm.brk)?;
    let fds = files::dump(&mut files)?;
    let signals = signals::dump(signals::take_shared_pending());
    let mut thread_entries: Vec<_> = SLOTS
        .iter()
        .filter(|s| s.tid.load(Ordering::Relaxed) > 0 && s.parked.load(Ordering::Acquire) != 0)
        .map(threads::from_slot)
        .collect();
    thread_entries.push(threads::checkpoint_thread_entry(CHECKPOINT_VTID.load(Ordering::Relaxed)));
    let (vpid, vppid, vpgid, vsid) = process::ids();
    let mut pids = Vec::new();
    state::PIDS.for_each(|v, r| pids.push((v.0, r.0)));
    let meta = ImageMeta {
        host,
        process: ProcessEntry {
            vpid,
            vppid,
            vpgid,
            vsid,
            exe: basics.exe,
            libmigrate,
            ld_preload: LD_PRELOAD.get().cloned().unwrap_or_default(),
            argv: basics.argv,
            personality: basics.personality,
            cwd: basics.cwd,
            umask: basics.umask,
            rlimits: basics.rlimits,
            mm: basics.mm,
            auxv: basics.auxv,
            files: files.list,
            vmas,
            threads: thread_entries,
            fds,
            signals,
            pids,
        },
    };
    Ok((meta, maps))
}

/// One checkpoint, from quiesce to release.
fn run(req: &Request) -> Result<Outcome, String> {
    let t0 = sys::monotonic_ns();
    state::INTERRUPTIONS.fetch_add(1, Ordering::AcqRel);
    let me = sys::gettid();
    quiesce(me)?;
    state::FREEZE_MONOTONIC_NS.store(sys::monotonic_ns(), Ordering::Release);
    let result = dump_and_write(req, t0);
    match &result {
        Ok(Outcome::Restored) => {}
        Ok(Outcome::Written { .. }) if req.kill => {} // killed next, without running program code
        _ => suspend::release_all(),
    }
    result
}

fn describe_write_error(e: &migrate_image::ImageError, path: &str, dir: &str) -> String {
    match e {
        migrate_image::ImageError::Write(io) if io.raw_os_error() == Some(libc::ENOSPC) => {
            format!("cannot write image {path}: no space left on device; free space in {dir} or checkpoint to another directory (--dir)")
        }
        other => format!("cannot write image {path}: {other}"),
    }
}

fn dump_and_write(req: &Request, t0: u64) -> Result<Outcome, String> {
    let (mut meta, maps) = dump()?;
    let dir = dir_for(req);
    let dir_str = resources::path_string(&dir);
    let exe_name = basename(&meta.process.files[meta.process.exe as usize].path).to_string();
    let tmp_path = format!("{dir_str}/.{exe_name}-{}.mig.tmp", sys::getpid());
    let fd = sys::open(&fs::cpath(tmp_path.as_bytes()), libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC, 0o600)
        .map_err(|e| format!("cannot create an image in {dir_str}: {e}; choose a writable directory (--dir, --ckpt-dir or MIGRATE_CKPT_DIR)"))?;
    set_transient(1, fd);
    let mem_fd = sys::open(b"/proc/thread-self/mem\0", libc::O_RDONLY | libc::O_CLOEXEC, 0).unwrap_or(-1);
    set_transient(2, mem_fd);
    let cleanup = |fd: i32, mem_fd: i32| {
        let _ = sys::close(fd);
        if mem_fd >= 0 {
            let _ = sys::close(mem_fd);
        }
        let _ = sys::unlinkat(libc::AT_FDCWD, &fs::cpath(tmp_path.as_bytes()));
        clear_transient(1);
        clear_transient(2);
    };
    // The layout must not have changed while we described it (it would if anything we called
    // mapped memory): the image would miss a mapping.
    match memory::read_maps() {
        Ok(now) if now.iter().map(|m| (m.start, m.end)).eq(maps.iter().map(|m| (m.start, m.end))) => {}
        _ => {
            cleanup(fd, mem_fd);
            return Err("the address space changed while it was being described; try again".into());
        }
    }
    let nsections = meta.process.vmas.iter().filter(|v| !v.runs.is_empty()).count() + meta.process.files.len() + 2;
    let mut writer = match ImageWriter::new(FdSink(fd), nsections) {
        Ok(w) => w,
        Err(e) => {
            cleanup(fd, mem_fd);
            return Err(describe_write_error(&e, &tmp_path, &dir_str));
        }
    };
    let mut sections: Vec<Option<u32>> = alloc::vec![None; meta.process.vmas.len()];
    let mut bounce = alloc::vec![0u8; memory::WRITE_CHUNK];
    RESTORED_ARRIVED.store(0, Ordering::Release);
    let mut ctx = WriteCtx {
        writer: &mut writer,
        process: &meta.process,
        sections: &mut sections,
        mem_fd,
        bounce: &mut bounce,
        error: None,
    };
    // SAFETY: ctx lives across the call; a non-zero result means we are the restored copy of this
    // thread, where the descriptors held in locals do not exist: we forget them.
    let resumed = unsafe {
        context::park_and_save(
            CHECKPOINT_THREAD_SP.0.get(),
            write_memory,
            &mut ctx as *mut WriteCtx<'_> as *mut libc::c_void,
        )
    };
    if resumed != 0 {
        core::mem::forget(ctx);
        core::mem::forget(writer);
        for i in 0..TRANSIENT_FDS.len() {
            clear_transient(i);
        }
        crate::restore::finish_in_restored_process(resumed as usize, &meta);
        return Ok(Outcome::Restored);
    }
    if let Some(e) = ctx.error.take() {
        cleanup(fd, mem_fd);
        return Err(describe_write_error(&e, &tmp_path, &dir_str));
    }
    let frozen_ms = (sys::monotonic_ns() - t0) / 1_000_000;
    for (v, s) in meta.process.vmas.iter_mut().zip(&sections) {
        v.data_section = *s;
    }
    if let Some(t) = meta.process.threads.iter_mut().find(|t| t.is_checkpoint_thread) {
        // SAFETY: written by park_and_save on this thread.
        t.resume_sp = unsafe { *CHECKPOINT_THREAD_SP.0.get() };
    }
    if req.with_binaries {
        if let Err(e) = write_binaries(&mut writer, &meta) {
            cleanup(fd, mem_fd);
            return Err(e);
        }
    }
    let finished = writer.add_meta(&meta).and_then(|_| writer.finish());
    let bytes = match finished {
        Ok((_, len)) => len,
        Err(e) => {
            cleanup(fd, mem_fd);
            return Err(describe_write_error(&e, &tmp_path, &dir_str));
        }
    };
    if let Err(e) = sys::fsync(fd) {
        cleanup(fd, mem_fd);
        return Err(format!("cannot flush image {tmp_path} to disk: {e}"));
    }
    let _ = sys::close(fd);
    if mem_fd >= 0 {
        let _ = sys::close(mem_fd);
    }
    clear_transient(1);
    clear_transient(2);
    // Publish under the final name without replacing an existing image.
    let final_path = loop {
        let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed) + 1;
        let candidate = format!("{dir_str}/{exe_name}-{}-{seq}.mig", meta.process.vpid);
        const RENAME_NOREPLACE: usize = 1;
        let (a, b) = (fs::cpath(tmp_path.as_bytes()), fs::cpath(candidate.as_bytes()));
        // SAFETY: both paths are NUL-terminated buffers alive for the call.
        let r = unsafe {
            sys::syscall6(
                libc::SYS_renameat2,
                libc::AT_FDCWD as usize,
                a.as_ptr() as usize,
                libc::AT_FDCWD as usize,
                b.as_ptr() as usize,
                RENAME_NOREPLACE,
                0,
            )
        };
        if r == 0 {
            break candidate;
        }
        if r != -(libc::EEXIST as isize) {
            let _ = sys::unlinkat(libc::AT_FDCWD, &a);
            return Err(format!("cannot rename {tmp_path} to {candidate}: {}", sys::Errno(-r as i32)));
        }
    };
    if let Ok(dfd) = sys::open(&fs::cpath(&dir), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC, 0) {
        let _ = sys::fsync(dfd);
        let _ = sys::close(dfd);
    }
    Ok(Outcome::Written { path: final_path, bytes, frozen_ms })
}

/// Stores the whole contents of every mapped code file (executable, libraries, libmigrate), for
/// hosts that lack them (`--with-binaries`).
fn write_binaries(writer: &mut ImageWriter<FdSink>, meta: &ImageMeta) -> Result<(), String> {
    let mut buf = alloc::vec![0u8; 1 << 20];
    for (i, f) in meta.process.files.iter().enumerate() {
        if f.hash.is_none() {
            continue;
        }
        let src = sys::open(&fs::cpath(f.path.as_bytes()), libc::O_RDONLY | libc::O_CLOEXEC, 0)
            .map_err(|e| format!("cannot read {} to store it in the image: {e}", f.path))?;
        let res = (|| -> Result<(), String> {
            writer.begin_section(SectionKind::FileContents { file: i as u32 }, true).map_err(|e| e.to_string())?;
            let mut off = 0u64;
            loop {
                let n = sys::pread(src, &mut buf, off).map_err(|e| format!("cannot read {}: {e}", f.path))?;
                if n == 0 {
                    break;
                }
                writer.write(&buf[..n]).map_err(|e| e.to_string())?;
                off += n as u64;
            }
            writer.end_section();
            Ok(())
        })();
        let _ = sys::close(src);
        res?;
    }
    Ok(())
}
