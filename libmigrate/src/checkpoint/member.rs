//! One process's part of a checkpoint: freeze (park every program thread), describe itself,
//! write its own sections into the tree's image at the position the coordinator gives, then
//! release (or die with --kill). The coordinator may be this very process or another member.
//!
//! The checkpoint thread saves its own jump context right before writing memory, so the image
//! holds it in the middle of `write_process`: a restored process's copy of this thread
//! continues from `park_and_save` with a non-zero value and takes the "restored" branch.

use super::suspend::{self, PARKED, RESTORED_ARRIVED, SLOTS, SLOTS_USED};
use super::{clear_all_transient, set_transient_any, CHECKPOINT_VTID, LD_PRELOAD};
use crate::resources::{files, host, memory, process, signals, threads, Files};
use crate::state::{self, SUSPEND_SIGNAL};
use crate::sys::{self, context, fs};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::sync::atomic::Ordering;
use migrate_image::{ImageMeta, ImageWriter, ProcessEntry, SectionEntry, SectionKind, Sink, VmaKind, PAGE_SIZE};

struct SavedSp(UnsafeCell<u64>);
// SAFETY: only the checkpoint thread touches it.
unsafe impl Sync for SavedSp {}
static CHECKPOINT_THREAD_SP: SavedSp = SavedSp(UnsafeCell::new(0));

/// Is thread `tid` of this process a zombie (exited, not yet reaped with the process)?
fn is_zombie(tid: i32) -> bool {
    let stat = fs::read_file(format!("/proc/self/task/{tid}/stat").as_bytes()).unwrap_or_default();
    let state = stat.iter().rposition(|&c| c == b')').and_then(|i| stat.get(i + 2));
    matches!(state, Some(b'Z') | Some(b'X'))
}

/// Stops every program thread in its suspend handler (a main thread that called pthread_exit
/// stays a zombie and has nothing to save).
pub fn freeze() -> Result<(), String> {
    // Refused before anything is stopped: the program runs on untouched.
    if let Some(why) = crate::resources::timers::unsupported() {
        return Err(why);
    }
    super::forked::check_idle()?;
    state::INTERRUPTIONS.fetch_add(1, Ordering::AcqRel);
    let me = sys::gettid();
    let pid = sys::getpid();
    // Only the slots the last checkpoint used need clearing (the rest were never touched, and
    // touching them would cost pages in every image).
    let last = SLOTS_USED.swap(0, Ordering::AcqRel).min(SLOTS.len());
    for s in &SLOTS[..last] {
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
            let Some(tid) = fs::parse_dec(&t).map(|v| v as i32) else { continue };
            if tid == me || SLOTS[..used].iter().any(|s| s.tid.load(Ordering::Relaxed) == tid) || is_zombie(tid) {
                continue;
            }
            if used == SLOTS.len() {
                suspend::release_all();
                return Err(format!("more than {} threads", SLOTS.len()));
            }
            let slot = &SLOTS[used];
            slot.vtid.store(state::to_virt(tid), Ordering::Relaxed);
            slot.release_gen.store(gen, Ordering::Relaxed);
            slot.npending.store(0, Ordering::Relaxed);
            slot.tid.store(tid, Ordering::Release);
            used += 1;
            // Published before the signal: the handler looks its slot up among the used ones.
            SLOTS_USED.store(used, Ordering::Release);
            match sys::tgkill(pid, tid, SUSPEND_SIGNAL) {
                Ok(()) => {
                    alive += 1;
                    signalled += 1;
                }
                Err(_) => slot.tid.store(-1, Ordering::Release), // already gone
            }
        }
        if signalled == 0 {
            break;
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
    state::FREEZE_MONOTONIC_NS.store(sys::monotonic_ns(), Ordering::Release);
    Ok(())
}

/// Lets the program run again (signals dequeued by the dump are re-queued by the threads).
pub fn release() {
    // Connections a failed checkpoint took out of accept queues go back to the program.
    crate::resources::accept_queue::hand_back_taken();
    suspend::release_all();
}

/// Writes with pwrite(2) at an explicit position: several processes write one image, each
/// into its own range, through descriptors that share one file offset. Nothing is written at
/// or beyond `limit` (a forked checkpoint's reservation: the next process's part starts there).
pub struct PwriteSink {
    pub fd: i32,
    pub pos: u64,
    pub limit: u64,
}

impl Sink for PwriteSink {
    fn write_all(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        if self.pos.saturating_add(buf.len() as u64) > self.limit {
            return Err(std::io::Error::other(alloc::format!(
                "this process's part outgrew the {} bytes reserved for it at {}",
                self.limit.saturating_sub(self.pos),
                self.pos
            )));
        }
        while !buf.is_empty() {
            match sys::pwrite(self.fd, buf, self.pos) {
                Ok(0) => return Err(std::io::Error::from_raw_os_error(libc::EIO)),
                Ok(n) => {
                    buf = &buf[n..];
                    self.pos += n as u64;
                }
                Err(sys::Errno(libc::EINTR)) => {}
                Err(e) => return Err(std::io::Error::from_raw_os_error(e.0)),
            }
        }
        Ok(())
    }
}

struct WriteCtx<'a> {
    writer: &'a mut ImageWriter<PwriteSink>,
    proc: u32,
    process: &'a ProcessEntry,
    mem_fd: i32,
    bounce: &'a mut [u8],
    /// Pages copied while frozen (a forked checkpoint's MAP_SHARED mappings), by VMA index:
    /// written instead of the live mapping.
    copies: &'a [(u32, &'a [u8])],
    /// Where each VMA's pages start in `hashes` (and `decided`).
    first_page: &'a [usize],
    /// Every page's hash, VMA after VMA, in run order.
    hashes: &'a mut [u64],
    /// For an incremental checkpoint: the parent image's pages, and for each page which of
    /// them it equals (memory::NOT_INHERITED if none).
    parent: Option<&'a [memory::ParentPage]>,
    decided: &'a mut [u32],
    /// Per page: 1 when it held only zeros and was left out (private anonymous memory).
    dropped: &'a mut [u8],
    zero_hash: u64,
    /// Set for a compressed checkpoint (its VMAs marked `PageCompression::Lz4` get frames).
    lz4: Option<&'a mut memory::Lz4Writer>,
    /// The mappings another thread hashes while this one writes them (hasher.rs): by VMA
    /// index, the job number.
    hasher: Option<&'a mut super::hasher::Hasher>,
    hashed_elsewhere: &'a [(u32, usize)],
    /// What changes while pages are written, besides this thread's stack: see `volatile`.
    volatile: &'a [(u64, u64)],
    error: Option<migrate_image::ImageError>,
}

/// Whether mapping `v` holds memory that changes while it is written — the writing thread's
/// stack (at `here`) or one of the `volatile` ranges (the write's own buffers: page hashes,
/// decisions, the compressor's, the hashing thread's) — and must be copied first, so that each
/// page is hashed and written as the same bytes.
fn changes_while_written(v: &migrate_image::VmaEntry, here: u64, volatile: &[(u64, u64)]) -> bool {
    (v.start <= here && here < v.end) || volatile.iter().any(|&(p, len)| p < v.end && v.start < p + len)
}

/// Writes `v`'s runs straight from memory in large writes, following the hasher thread, which
/// hashes them ahead (job `job`): its hashes go to `hashes`, and (private anonymous memory,
/// `zeros`) pages of zeros are left out, flagged in `dropped`.
fn write_hashed_elsewhere<S: migrate_image::Sink>(
    w: &mut ImageWriter<S>,
    v: &migrate_image::VmaEntry,
    h: &super::hasher::Hasher,
    job: usize,
    hashes: &mut [u64],
    dropped: &mut [u8],
    zero_hash: Option<u64>,
) -> Result<(), migrate_image::ImageError> {
    const CHUNK: usize = 2048; // pages: 8 MiB writes
    let stopped = || migrate_image::ImageError::Write(std::io::Error::other("the page hashing thread stopped early"));
    let base = h.first_of(job);
    let mut k = 0usize; // page index among the runs
    for &(first, count) in &v.runs {
        let mut page = first;
        let end = first + count;
        while page < end {
            let n = ((end - page) as usize).min(CHUNK);
            if !h.wait_for_pages(base + k + n) {
                return Err(stopped());
            }
            hashes[k..k + n].copy_from_slice(h.hashes_of(base + k..base + k + n));
            // SAFETY: a readable mapping of this process that no thread changes (the program's
            // are parked; this one's stack and buffers are in other, copied, mappings).
            let bytes = unsafe { core::slice::from_raw_parts((v.start + page * 4096) as *const u8, n * 4096) };
            let mut batch = 0usize;
            for i in 0..=n {
                let zero = i < n
                    && zero_hash == Some(hashes[k + i])
                    && bytes[i * 4096..(i + 1) * 4096].iter().all(|&b| b == 0);
                if i == n || zero {
                    if batch < i {
                        w.write_unhashed_pages(&bytes[batch * 4096..i * 4096])?;
                        w.note_page_hashes(&hashes[k + batch..k + i]);
                    }
                    if zero {
                        dropped[k + i] = 1;
                    }
                    batch = i + 1;
                }
            }
            k += n;
            page += n as u64;
        }
    }
    Ok(())
}

/// Runs on the checkpoint thread's stack below its saved context: writes every stored page.
/// Allocates nothing (the allocator's state is being saved along with everything else).
extern "C" fn write_memory(arg: *mut libc::c_void) {
    // SAFETY: `arg` is the WriteCtx passed by `write_process`, alive for this call.
    let ctx = unsafe { &mut *(arg as *mut WriteCtx<'_>) };
    let here = &ctx as *const _ as u64;
    let parallel = ctx.hasher.as_deref_mut().is_some_and(|h| h.start());
    write_all_pages(ctx, here, parallel);
    if let Some(h) = ctx.hasher.as_deref_mut() {
        h.join(ctx.error.is_some());
    }
}

fn write_all_pages(ctx: &mut WriteCtx<'_>, here: u64, parallel: bool) {
    for (i, v) in ctx.process.vmas.iter().enumerate() {
        if v.runs.is_empty() {
            continue;
        }
        let pages = ctx.first_page[i]..ctx.first_page[i + 1];
        let kind = SectionKind::Pages { proc: ctx.proc, vma: i as u32 };
        if let Some(&(_, job)) = ctx.hashed_elsewhere.iter().find(|(vma, _)| *vma == i as u32).filter(|_| parallel) {
            let anonymous = matches!(v.kind, VmaKind::Anon | VmaKind::Heap | VmaKind::Stack);
            let res = match ctx.hasher.as_deref() {
                Some(h) => ctx.writer.begin_section(kind, true).and_then(|_| {
                    write_hashed_elsewhere(
                        ctx.writer,
                        v,
                        h,
                        job,
                        &mut ctx.hashes[pages.clone()],
                        &mut ctx.dropped[pages.clone()],
                        anonymous.then_some(ctx.zero_hash),
                    )
                }),
                None => Err(migrate_image::ImageError::Write(std::io::Error::other("no page hashing thread"))),
            };
            if let Err(e) = res {
                ctx.error = Some(e);
                return;
            }
            ctx.writer.end_section();
            continue;
        }
        let live = changes_while_written(v, here, ctx.volatile);
        let copy = ctx.copies.iter().find(|c| c.0 == i as u32).map(|c| c.1);
        let lz4 = match ctx.lz4.as_deref_mut() {
            Some(z) if v.compression == migrate_image::PageCompression::Lz4 => Some(z),
            _ => None,
        };
        let res = match (copy, lz4) {
            // A copy taken while frozen (never compressed, never inherited).
            (Some(bytes), _) => ctx.writer.begin_section(kind, true).and_then(|_| {
                let hashes = &mut ctx.hashes[pages];
                for (h, page) in hashes.iter_mut().zip(bytes.chunks_exact(PAGE_SIZE as usize)) {
                    *h = migrate_image::page_hash(page);
                }
                ctx.writer.write_hashed_pages(bytes, hashes)
            }),
            // Compressed sections need no page alignment (nothing maps or pre-copies them).
            (None, Some(z)) => ctx.writer.begin_section(kind, false).and_then(|_| {
                memory::write_pages_lz4(ctx.writer, v, ctx.mem_fd, ctx.bounce, live, z, &mut ctx.hashes[pages])
            }),
            (None, None) => {
                let anonymous = matches!(v.kind, VmaKind::Anon | VmaKind::Heap | VmaKind::Stack);
                let mut out = memory::PageOutcome {
                    hashes: &mut ctx.hashes[pages.clone()],
                    parent: match ctx.parent {
                        Some(parent) => Some((parent, &mut ctx.decided[pages.clone()])),
                        None => None,
                    },
                    zeros: anonymous.then_some((ctx.zero_hash, &mut ctx.dropped[pages])),
                };
                ctx.writer
                    .begin_section(kind, true)
                    .and_then(|_| memory::write_pages(ctx.writer, v, ctx.mem_fd, ctx.bounce, live, &mut out))
            }
        };
        if let Err(e) = res {
            ctx.error = Some(e);
            return;
        }
        ctx.writer.end_section();
    }
}

fn own_library_path(maps: &[memory::MapLine]) -> Option<String> {
    let here = own_library_path as *const () as u64;
    maps.iter().find(|m| m.start <= here && here < m.end).map(|m| m.name.clone())
}

/// Describes the frozen process.
fn dump() -> Result<(ImageMeta, Vec<memory::MapLine>), String> {
    // First: it writes the process-wide pending signals into a static (SHARED_PENDING, 8 KiB),
    // whose pages must be present when the memory dump reads the page map, or a page never
    // written before is not stored and the signals are lost at resume (it happened once the
    // static's page moved with the library's layout).
    let shared_pending = signals::take_shared_pending();
    let mut files = Files::default();
    let basics = process::dump(&mut files)?;
    let maps = memory::read_maps().map_err(|e| format!("cannot read the memory map: {e}"))?;
    let lib = own_library_path(&maps).ok_or("cannot find libmigrate's own mapping")?;
    let libmigrate = files.intern_path(&lib, true);
    let host = host::dump(&maps);
    let vmas = memory::dump(&maps, &mut files, basics.mm.start_brk, basics.mm.brk)?;
    let fds = files::dump(&mut files)?;
    let signals = signals::dump(shared_pending);
    let timers = crate::resources::timers::dump();
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
            timers,
        },
    };
    Ok((meta, maps))
}

/// The write's scratch buffers: a mapping of their own, or (when none can be made) the arena.
enum Scratch {
    Mapped(sys::ScratchMap),
    Arena(Vec<u8>),
}

impl Scratch {
    fn bytes(&mut self) -> &mut [u8] {
        match self {
            Scratch::Mapped(m) => m.bytes(),
            Scratch::Arena(v) => v,
        }
    }
}

/// What a process wrote: where its sections end, their table entries, and its ids.
pub struct Written {
    pub end: u64,
    pub sections: Vec<SectionEntry>,
    pub ids: (i32, i32, i32, i32),
}

pub enum WriteOutcome {
    Written(Written),
    /// A forked checkpoint: a writer child writes this process's sections (forked.rs).
    Forked(super::forked::Forked),
    /// We are the restored copy of this thread: the restore is finished, the program runs.
    Restored,
}

pub fn describe_write_error(e: &migrate_image::ImageError) -> String {
    match e {
        migrate_image::ImageError::Write(io) if io.raw_os_error() == Some(libc::ENOSPC) => {
            "no space left on device; free space there or checkpoint to another directory (--dir)".into()
        }
        migrate_image::ImageError::Write(io) if io.raw_os_error() == Some(libc::EFBIG) => {
            // The kernel also queued SIGXFSZ for this thread; it blocks every signal, so the
            // program was not killed: take it off the queue.
            let mut info = [0u8; 128];
            let _ = sys::rt_sigtimedwait_now(1u64 << (libc::SIGXFSZ - 1), &mut info);
            let limit = sys::prlimit(libc::RLIMIT_FSIZE, None).map_or(0, |l| l.rlim_cur);
            alloc::format!(
                "the image reached process {}'s file size limit (RLIMIT_FSIZE, ulimit -f: {limit} bytes), which applies \
                 because each process writes its own part of the image; raise it (prlimit --pid {} --fsize=unlimited) and retry",
                crate::state::virtual_pid(),
                sys::getpid()
            )
        }
        other => other.to_string(),
    }
}

/// Describes this (frozen) process and writes its sections, as process `proc` of the image,
/// into `image_fd` from `pos` on.
/// With `kill` the process dies after a successful checkpoint: its listeners' waiting
/// connections are taken out of their queues and carried (resources/accept_queue.rs).
/// With `fork` the sections are written by a writer child from a copy-on-write snapshot
/// (forked.rs) and the process may be released at once: `Forked` is returned.
pub fn write_process(image_fd: i32, proc: u32, pos: u64, opts: &WriteOptions<'_>) -> Result<WriteOutcome, String> {
    let WriteOptions { with_binaries, kill, fork, compress, parent } = *opts;
    crate::resources::accept_queue::TAKE_WAITING.store(kill, Ordering::Release);
    let dumped = dump();
    crate::resources::accept_queue::TAKE_WAITING.store(false, Ordering::Release);
    let (meta, maps) = dumped?;
    let mem_fd = sys::open(b"/proc/thread-self/mem\0", libc::O_RDONLY | libc::O_CLOEXEC, 0).unwrap_or(-1);
    set_transient_any(mem_fd);
    // The layout must not have changed while we described it (it would if anything we called
    // mapped memory): the image would miss a mapping.
    match memory::read_maps() {
        Ok(now) if now.iter().map(|m| (m.start, m.end)).eq(maps.iter().map(|m| (m.start, m.end))) => {}
        _ => {
            close_mem(mem_fd);
            return Err("the address space changed while it was being described; try again".into());
        }
    }
    if fork {
        let started = super::forked::start(image_fd, proc, pos, meta, mem_fd, opts);
        return started;
    }
    let sink = PwriteSink { fd: image_fd, pos, limit: u64::MAX };
    let what = WriteWhat { with_binaries, compress, page_copies: &[], file_copies: None, parent };
    write_sections(sink, proc, meta, mem_fd, &what)
}

pub(super) fn close_mem(mem_fd: i32) {
    if mem_fd >= 0 {
        let _ = sys::close(mem_fd);
        super::clear_transient_fd(mem_fd);
    }
}

/// How a process writes its part of a checkpoint.
#[derive(Clone, Copy)]
pub struct WriteOptions<'a> {
    /// The contents of the mapped executable, libraries and libmigrate too.
    pub with_binaries: bool,
    /// The process dies after a successful checkpoint: its listeners' waiting connections are
    /// taken out of their queues and carried (resources/accept_queue.rs).
    pub kill: bool,
    /// A writer child writes the sections from a copy-on-write snapshot (forked.rs); the
    /// process may be released at once: `Forked` is returned.
    pub fork: bool,
    /// Every page section as lz4 frames (migrate_image::frames).
    pub compress: bool,
    /// An incremental checkpoint's parent image.
    pub parent: Option<&'a ParentImage>,
}

/// What a process writes besides what `meta` describes.
#[derive(Clone, Copy)]
pub(super) struct WriteWhat<'a> {
    /// The contents of the mapped executable, libraries and libmigrate too.
    pub with_binaries: bool,
    /// Page sections as lz4 frames.
    pub compress: bool,
    /// A forked checkpoint's copies, taken while frozen, of what its writer child cannot read
    /// from its copy-on-write snapshot: pages of MAP_SHARED mappings, and deleted files.
    pub page_copies: &'a [(u32, &'a [u8])],
    pub file_copies: Option<&'a [(u32, &'a [u8])]>,
    /// An incremental checkpoint's parent image.
    pub parent: Option<&'a ParentImage>,
}

/// Writes the sections of this process described by `meta` through `sink`: its pages (after
/// saving the checkpoint thread's own context, so the image holds this thread right here),
/// the contents of deleted files (and of the binaries with `with_binaries`), its metadata.
/// Closes `mem_fd`. `page_copies` and `file_copies` are a forked checkpoint's copies, taken
/// while frozen, of what its writer child cannot read from its copy-on-write snapshot.
pub(super) fn write_sections(
    sink: PwriteSink,
    proc: u32,
    mut meta: ImageMeta,
    mem_fd: i32,
    what: &WriteWhat<'_>,
) -> Result<WriteOutcome, String> {
    let WriteWhat { with_binaries, compress, page_copies, file_copies, parent } = *what;
    let pos = sink.pos;
    let nsections = 2 * meta.process.vmas.iter().filter(|v| !v.runs.is_empty()).count() + meta.process.files.len() + 2;
    let mut writer = ImageWriter::continue_at(sink, pos, nsections);
    // The write's buffers in a mapping of their own, made now (after the description): not
    // stored in the image, as they would be from the arena (megabytes per GiB of memory).
    let all_pages: usize = meta.process.vmas.iter().map(|v| v.data_pages() as usize).sum();
    let incremental = parent.is_some() && !compress;
    let scratch_len = memory::WRITE_CHUNK
        + all_pages * 8
        + if incremental { all_pages * 4 } else { 0 }
        + super::hasher::Hasher::scratch_bytes(if incremental { 0 } else { all_pages })
        + all_pages
        + 5 * 64;
    // A program that lowered RLIMIT_AS below what it maps gets no new mapping: the arena's
    // reservation then serves (those bytes are stored too).
    let mut scratch = match sys::ScratchMap::new(scratch_len) {
        Ok(m) => Scratch::Mapped(m),
        Err(_) => Scratch::Arena(alloc::vec![0u8; scratch_len]),
    };
    let mut rest = scratch.bytes();
    let scratch_range = (rest.as_ptr() as u64, rest.len() as u64);
    let bounce = sys::carve::<u8>(&mut rest, memory::WRITE_CHUNK);
    // Everything the page writer fills is allocated now: it may not allocate.
    let mut first_page = Vec::with_capacity(meta.process.vmas.len() + 1);
    let mut total = 0usize;
    for v in &meta.process.vmas {
        first_page.push(total);
        total += v.data_pages() as usize;
    }
    first_page.push(total);
    let hashes = sys::carve::<u64>(&mut rest, total);
    let parent_pages = match parent {
        // A compressed image is a full one (its frames cannot refer to an ancestor's pages).
        Some(_) if compress => None,
        Some(p) => match load_parent(p, &meta.process) {
            Ok(pages) => Some(pages),
            Err(e) => {
                close_mem(mem_fd);
                return Err(e);
            }
        },
        None => None,
    };
    let decided = sys::carve::<u32>(&mut rest, if parent_pages.is_some() { total } else { 0 });
    decided.fill(memory::NOT_INHERITED);
    let dropped = sys::carve::<u8>(&mut rest, total);
    dropped.fill(0);
    // Everything the compressor needs, made now: the page writer must not allocate. A forked
    // checkpoint's copies (MAP_SHARED pages taken while frozen) stay uncompressed.
    let mut lz4 = compress.then(|| {
        let mut most = 0usize;
        for (i, v) in meta.process.vmas.iter_mut().enumerate() {
            if v.runs.is_empty() || page_copies.iter().any(|c| c.0 == i as u32) {
                continue;
            }
            v.compression = migrate_image::PageCompression::Lz4;
            most = most.max(migrate_image::frames::frame_count(&v.runs) as usize);
        }
        memory::Lz4Writer::new(most)
    });
    // The mappings a second thread may hash while this one writes them: read straight from
    // memory (not live: see write_memory, the hasher's own buffers included), neither
    // incremental nor compressed nor copied.
    let here = &pos as *const u64 as u64;
    let mut hasher =
        super::hasher::Hasher::new(meta.process.vmas.len(), if parent_pages.is_none() { total } else { 0 }, &mut rest);
    // Every buffer the write changes exists now, at its final address.
    let mut volatile: Vec<(u64, u64)> = alloc::vec![scratch_range];
    let buffers = lz4.as_ref().map(|z| z.buffers()).into_iter().flatten().chain(hasher.buffers());
    volatile.extend(buffers.map(|(p, len)| (p as u64, len as u64)));
    let mut hashed_elsewhere: Vec<(u32, usize)> = Vec::new();
    if parent_pages.is_none() {
        for (i, v) in meta.process.vmas.iter().enumerate() {
            if v.runs.is_empty()
                || changes_while_written(v, here, &volatile)
                || v.prot & migrate_image::PROT_READ == 0
                || v.compression != migrate_image::PageCompression::None
                || page_copies.iter().any(|c| c.0 == i as u32)
            {
                continue;
            }
            let pages = first_page[i]..first_page[i + 1];
            hashed_elsewhere.push((i as u32, hasher.jobs()));
            hasher.push(super::hasher::Job::new(v.start, &v.runs, pages.len()));
        }
    }
    RESTORED_ARRIVED.store(0, Ordering::Release);
    let mut ctx = WriteCtx {
        writer: &mut writer,
        proc,
        process: &meta.process,
        mem_fd,
        bounce,
        copies: page_copies,
        first_page: &first_page,
        hashes: &mut *hashes,
        parent: parent_pages.as_deref(),
        decided: &mut *decided,
        dropped: &mut *dropped,
        zero_hash: migrate_image::page_hash(&[0u8; PAGE_SIZE as usize]),
        lz4: lz4.as_mut(),
        hasher: Some(&mut hasher),
        hashed_elsewhere: &hashed_elsewhere,
        volatile: &volatile,
        error: None,
    };
    // SAFETY: ctx lives across the call; a non-zero result means we are the restored copy of this
    // thread, where the descriptors held in locals do not exist: we forget them (their memory is
    // ours, restored with the arena, and is freed: nothing here closes a descriptor on drop).
    let resumed = unsafe {
        context::park_and_save(
            CHECKPOINT_THREAD_SP.0.get(),
            write_memory,
            &mut ctx as *mut WriteCtx<'_> as *mut libc::c_void,
        )
    };
    if resumed != 0 {
        // Dropped, not forgotten: forgetting leaked their allocations in every resumed
        // generation (found by tests/tests/soak.rs).
        drop(ctx);
        drop(writer);
        drop(hasher);
        // The scratch mapping was made after the description: it does not exist here (and its
        // addresses may be the plan's). Forgotten, never unmapped.
        if let Scratch::Mapped(m) = scratch {
            core::mem::forget(m);
        }
        clear_all_transient();
        super::forked::forget_in_restored_process();
        crate::restore::finish_in_restored_process(resumed as usize, &meta);
        return Ok(WriteOutcome::Restored);
    }
    close_mem(mem_fd);
    if let Some(e) = ctx.error.take() {
        return Err(describe_write_error(&e));
    }
    drop(ctx);
    // The coordinator merges every process's sections into one table: the restore finds a
    // VMA's pages by kind (Pages { proc, vma }), not by index.
    for (i, v) in meta.process.vmas.iter_mut().enumerate() {
        if v.runs.is_empty() {
            continue;
        }
        let pages = first_page[i]..first_page[i + 1];
        if let Some(parent) = parent_pages.as_deref() {
            v.inherited = inherited_runs(v, &decided[pages.clone()], parent);
        }
        // Pages of zeros were left out: they are no longer pages with data.
        let kept = |k: &usize| dropped[pages.start + *k] == 0;
        if dropped[pages.clone()].contains(&1) {
            v.runs = runs_without(&v.runs, &dropped[pages.clone()]);
            if v.runs.is_empty() {
                // Nothing left: no page data at all; its (empty) page section goes too.
                writer.forget_empty_section(SectionKind::Pages { proc, vma: i as u32 });
                continue;
            }
        }
        let bytes: Vec<u8> = hashes[pages.clone()]
            .iter()
            .enumerate()
            .filter(|(k, _)| kept(k))
            .flat_map(|(_, h)| h.to_le_bytes())
            .collect();
        writer
            .add_section_bytes(SectionKind::PageHashes { proc, vma: i as u32 }, &bytes, false)
            .map_err(|e| describe_write_error(&e))?;
    }
    if let Some(t) = meta.process.threads.iter_mut().find(|t| t.is_checkpoint_thread) {
        // SAFETY: written by park_and_save on this thread.
        t.resume_sp = unsafe { *CHECKPOINT_THREAD_SP.0.get() };
    }
    if with_binaries {
        write_binaries(&mut writer, proc, &meta)?;
    }
    match file_copies {
        Some(copies) => {
            for &(file, bytes) in copies {
                writer
                    .add_section_bytes(SectionKind::FileContents { proc, file }, bytes, true)
                    .map_err(|e| describe_write_error(&e))?;
            }
        }
        None => write_deleted_files(&mut writer, proc, &meta)?,
    }
    writer.add_meta(proc, &meta).map_err(|e| describe_write_error(&e))?;
    let (_, end, sections) = writer.into_sections();
    let p = &meta.process;
    Ok(WriteOutcome::Written(Written { end, sections, ids: (p.vpid, p.vppid, p.vpgid, p.vsid) }))
}

/// Copies the whole file open at `src` into a new section `kind`, through `buf`.
fn copy_into_section(
    writer: &mut ImageWriter<PwriteSink>,
    kind: SectionKind,
    src: i32,
    buf: &mut [u8],
    what: &str,
) -> Result<(), String> {
    writer.begin_section(kind, true).map_err(|e| describe_write_error(&e))?;
    let mut off = 0u64;
    loop {
        let n = sys::pread(src, buf, off).map_err(|e| format!("cannot read {what}: {e}"))?;
        if n == 0 {
            break;
        }
        writer.write(&buf[..n]).map_err(|e| describe_write_error(&e))?;
        off += n as u64;
    }
    writer.end_section();
    Ok(())
}

/// Stores the contents of files the program holds open but that were deleted: nothing else
/// keeps them. Read through /proc/thread-self/fd (the descriptor may be write-only).
fn write_deleted_files(writer: &mut ImageWriter<PwriteSink>, proc: u32, meta: &ImageMeta) -> Result<(), String> {
    let mut buf = alloc::vec![0u8; 1 << 20];
    let mut done: Vec<u32> = Vec::new();
    for f in &meta.process.fds {
        let migrate_image::FdKind::Deleted { file, .. } = f.kind else { continue };
        if done.contains(&file) {
            continue;
        }
        done.push(file);
        let path = fs::cpath(format!("/proc/thread-self/fd/{}", f.fd).as_bytes());
        let src = sys::open(&path, libc::O_RDONLY | libc::O_CLOEXEC, 0).map_err(|e| {
            format!("cannot read deleted file {} (fd {}): {e}", meta.process.files[file as usize].path, f.fd)
        })?;
        let res = copy_into_section(writer, SectionKind::FileContents { proc, file }, src, &mut buf, "a deleted file");
        let _ = sys::close(src);
        res?;
    }
    Ok(())
}

/// Stores the whole contents of every mapped code file (executable, libraries, libmigrate), for
/// hosts that lack them (`--with-binaries`).
fn write_binaries(writer: &mut ImageWriter<PwriteSink>, proc: u32, meta: &ImageMeta) -> Result<(), String> {
    let mut buf = alloc::vec![0u8; 1 << 20];
    for (i, f) in meta.process.files.iter().enumerate() {
        if f.hash.is_none() {
            continue;
        }
        let src = sys::open(&fs::cpath(f.path.as_bytes()), libc::O_RDONLY | libc::O_CLOEXEC, 0)
            .map_err(|e| format!("cannot read {} to store it in the image: {e}", f.path))?;
        let res = copy_into_section(writer, SectionKind::FileContents { proc, file: i as u32 }, src, &mut buf, &f.path);
        let _ = sys::close(src);
        res?;
    }
    Ok(())
}

/// The image an incremental checkpoint builds on: its path, and the ancestor list of the new
/// image (the parent first, then its own ancestors, as the coordinator chose).
pub struct ParentImage {
    pub path: String,
}

/// The parent image's pages of this process (the process with the same vpid), sorted by
/// address: hash and where the bytes are, as the new image will name them (the parent is the
/// new image's ancestor 0, the parent's ancestor k its ancestor k + 1). Pages held by an
/// ancestor beyond the longest chain allowed are left out: they are stored again.
fn load_parent(parent: &ParentImage, me: &ProcessEntry) -> Result<Vec<memory::ParentPage>, String> {
    let reader = migrate_image::ImageReader::open(std::path::Path::new(&parent.path)).map_err(|e| e.to_string())?;
    let tree = reader.tree().map_err(|e| e.to_string())?;
    let mut pages = Vec::new();
    let Some(index) = tree.processes.iter().position(|p| p.vpid == me.vpid) else { return Ok(pages) };
    let meta = reader.process_meta(index as u32).map_err(|e| e.to_string())?;
    for (i, v) in meta.process.vmas.iter().enumerate() {
        // Compressed pages are not raw pages at an offset: a child stores them again.
        if v.runs.is_empty() || v.compression == migrate_image::PageCompression::Lz4 {
            continue;
        }
        let hashes = reader.page_hashes(index as u32, i as u32).map_err(|e| e.to_string())?;
        let data = reader
            .sections()
            .iter()
            .find(|s| s.kind == SectionKind::Pages { proc: index as u32, vma: i as u32 })
            .map_or(0, |s| s.offset);
        let mut k = 0usize;
        for span in v.page_spans() {
            for page in span.first..span.end {
                // The parent's ancestor k is the new image's k + 1; the parent is its 0.
                let (ancestor, offset) = match span.source {
                    migrate_image::PageSource::Here { index: n } => (0, data + (n + page - span.first) * 4096),
                    migrate_image::PageSource::Ancestor { ancestor, offset } => {
                        (ancestor + 1, offset + (page - span.first) * 4096)
                    }
                };
                if (ancestor as usize) < migrate_image::MAX_ANCESTORS {
                    pages.push(memory::ParentPage { addr: v.start + page * 4096, hash: hashes[k], ancestor, offset });
                }
                k += 1;
            }
        }
    }
    Ok(pages)
}

/// `runs` without the pages flagged in `dropped` (one flag per page of the runs, in order).
fn runs_without(runs: &[(u64, u64)], dropped: &[u8]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let pages = runs.iter().flat_map(|&(first, count)| first..first + count);
    for (page, &d) in pages.zip(dropped) {
        if d != 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 == page => last.1 += 1,
            _ => out.push((page, 1)),
        }
    }
    out
}

/// The inherited runs of `v` from the page writer's decisions (one per page of its runs).
fn inherited_runs(
    v: &migrate_image::VmaEntry,
    decided: &[u32],
    parent: &[memory::ParentPage],
) -> Vec<migrate_image::InheritedRun> {
    let mut out: Vec<migrate_image::InheritedRun> = Vec::new();
    let pages = v.runs.iter().flat_map(|&(first, count)| first..first + count);
    for (page, &d) in pages.zip(decided) {
        if d == memory::NOT_INHERITED {
            continue;
        }
        let p = parent[d as usize];
        match out.last_mut() {
            Some(r)
                if r.first + r.count == page && r.ancestor == p.ancestor && r.offset + r.count * 4096 == p.offset =>
            {
                r.count += 1
            }
            _ => {
                out.push(migrate_image::InheritedRun { first: page, count: 1, ancestor: p.ancestor, offset: p.offset })
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use migrate_image::{InheritedRun, VmaEntry, VmaKind};

    #[test]
    fn pages_of_zeros_leave_the_runs() {
        assert_eq!(runs_without(&[(0, 3), (5, 2)], &[0, 1, 0, 1, 1]), alloc::vec![(0, 1), (2, 1)]);
        assert_eq!(runs_without(&[(4, 2)], &[0, 0]), alloc::vec![(4, 2)]);
        assert!(runs_without(&[(4, 2)], &[1, 1]).is_empty());
    }

    #[test]
    fn identical_pages_become_runs_that_follow_their_source() {
        let v = VmaEntry {
            start: 0x10000,
            end: 0x20000,
            prot: 3,
            kind: VmaKind::Anon,
            file: None,
            file_offset: 0,
            name: String::new(),
            vm_flags: String::new(),
            runs: alloc::vec![(0, 3), (4, 3)],
            inherited: Vec::new(),
            data_section: None,
            compression: migrate_image::PageCompression::None,
        };
        let page = |addr, ancestor, offset| memory::ParentPage { addr, hash: 0, ancestor, offset };
        let parent = [page(0x10000, 0, 8192), page(0x11000, 0, 12288), page(0x15000, 1, 4096), page(0x16000, 0, 0)];
        let n = memory::NOT_INHERITED;
        // Pages 0, 1 (consecutive in ancestor 0), 2 stored, 4 stored, 5 (ancestor 1), 6 (ancestor 0 again).
        let decided = [0, 1, n, n, 2, 3];
        assert_eq!(
            inherited_runs(&v, &decided, &parent),
            alloc::vec![
                InheritedRun { first: 0, count: 2, ancestor: 0, offset: 8192 },
                InheritedRun { first: 5, count: 1, ancestor: 1, offset: 4096 },
                InheritedRun { first: 6, count: 1, ancestor: 0, offset: 0 },
            ]
        );
    }
}
