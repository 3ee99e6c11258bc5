//! Forked checkpoints (`migrate-checkpoint --fork`, `migrate-run --interval … --fork`): the
//! program is stopped only while it is described, not while its memory is written.
//!
//! Each frozen process dumps its metadata as usual, then copies what a copy-on-write fork would
//! *not* preserve — the stored pages of its MAP_SHARED mappings and the contents of files it
//! holds open but that were deleted (the program may write both once it runs again) — into a
//! private mapping, and makes a **writer child** with a raw clone (`sys::clone_process`: no
//! glibc fork, no atfork handlers, exit signal 0, so the program's wait() never reports it and
//! no SIGCHLD is sent). The child closes every descriptor but the image, then writes the
//! process's sections from its copy-on-write snapshot through the ordinary path
//! (`member::write_sections`: `park_and_save`, then pages, file contents, metadata). The image
//! therefore holds the *child's* checkpoint thread in the middle of `write_sections`, at the
//! same addresses: a restored process comes back there with a non-zero value and takes the
//! usual restored branch, which returns before any of this file's child-only code.
//!
//! The coordinator must place every process's part before the children write, so each reports
//! an upper bound of its part's size (`reservation`); what a child leaves unused stays a zero
//! gap (a hole in the file), which the image reader accepts and checks. The child cannot write
//! past its reservation (`PwriteSink::limit`). It reports its section table and end position,
//! or its error, in a small MAP_SHARED page made before the clone, and exits; the process reaps
//! it when the coordinator asks for the result (`collect`).

use super::member::{self, PwriteSink, WriteOutcome, Written};
use crate::sys::{self, fs};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicI32, Ordering};
use migrate_image::{FdKind, ImageMeta, SectionEntry, VmaKind, PAGE_SIZE};

/// Bound on a writer child's work (as on a member's write in an ordinary checkpoint).
pub const WRITER_TIMEOUT_MS: u64 = 600_000;

/// The writer child of this process while it lives (0: none). A checkpoint never starts while
/// one lives: the freeze would find an unmanaged child.
pub static WRITER_PID: AtomicI32 = AtomicI32::new(0);

/// Bytes at the start of the report page: status (u64: 1 written, 2 failed), end (u64),
/// length of what follows (u64: the postcard section table, or the error message).
const REPORT_HEADER: usize = 24;
const WRITTEN: u64 = 1;
const FAILED: u64 = 2;

/// A writer child at work for this process.
pub struct Forked {
    pid: i32,
    pidfd: i32,
    report: usize,
    report_len: usize,
    /// Where this process's part of the image ends at most: the next one starts here.
    pub reserved_end: u64,
    ids: (i32, i32, i32, i32),
}

/// What the writer child cannot take from its copy-on-write snapshot, copied while frozen into
/// one private anonymous mapping (not the allocator's arena: it is not part of the image, and
/// the parent unmaps it as soon as the child exists).
struct Copies {
    base: usize,
    len: usize,
    /// (VMA index, offset in the mapping, length): the VMA's stored pages, concatenated.
    pages: Vec<(u32, usize, usize)>,
    /// (file index, offset, length): a deleted file's contents.
    files: Vec<(u32, usize, usize)>,
}

impl Copies {
    fn unmap(&self) {
        if self.len > 0 {
            // SAFETY: our own mapping, made by `take_copies`, used by no one else in this process.
            let _ = unsafe { sys::munmap(self.base, self.len) };
        }
    }

    /// The copies as slices, in the writer child.
    fn slices(&self, list: &[(u32, usize, usize)]) -> Vec<(u32, &[u8])> {
        list.iter()
            .map(|&(i, off, n)| {
                // SAFETY: `off..off+n` lies in the mapping, which the child never unmaps.
                (i, unsafe { core::slice::from_raw_parts((self.base + off) as *const u8, n) })
            })
            .collect()
    }
}

fn round_up(n: usize) -> usize {
    n.next_multiple_of(PAGE_SIZE as usize)
}

/// Reads `buf.len()` bytes at `off` of `fd` (fewer at its end); the count read.
fn read_full(fd: i32, buf: &mut [u8], off: u64) -> sys::SysResult<usize> {
    let mut got = 0;
    while got < buf.len() {
        match sys::pread(fd, &mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(sys::Errno(libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Copies the stored pages of the MAP_SHARED mappings this process stores itself, and the
/// contents of its deleted files, while it is frozen.
fn take_copies(meta: &ImageMeta, mem_fd: i32) -> Result<Copies, String> {
    let p = &meta.process;
    let mut total = 0usize;
    let mut pages = Vec::new();
    for (i, v) in p.vmas.iter().enumerate() {
        if v.kind == VmaKind::SharedAnon && !v.runs.is_empty() {
            let n = (v.stored_pages() * PAGE_SIZE) as usize;
            pages.push((i as u32, total, n));
            total += n;
        }
    }
    let mut files = Vec::new();
    let mut sources: Vec<i32> = Vec::new();
    let close_sources = |sources: &[i32]| {
        for &fd in sources {
            let _ = sys::close(fd);
        }
    };
    for f in &p.fds {
        let FdKind::Deleted { file, .. } = f.kind else { continue };
        if files.iter().any(|&(g, _, _)| g == file) {
            continue;
        }
        let path = fs::cpath(format!("/proc/thread-self/fd/{}", f.fd).as_bytes());
        let opened = sys::open(&path, libc::O_RDONLY | libc::O_CLOEXEC, 0).and_then(|fd| match sys::fstat(fd) {
            Ok(st) => Ok((fd, st.st_size as usize)),
            Err(e) => {
                let _ = sys::close(fd);
                Err(e)
            }
        });
        let (fd, size) = match opened {
            Ok(v) => v,
            Err(e) => {
                close_sources(&sources);
                return Err(format!(
                    "cannot read deleted file {} (fd {}): {e}",
                    p.files.get(file as usize).map_or("?", |x| x.path.as_str()),
                    f.fd
                ));
            }
        };
        sources.push(fd);
        files.push((file, total, size));
        total += size;
    }
    if total == 0 {
        close_sources(&sources);
        return Ok(Copies { base: 0, len: 0, pages, files });
    }
    let len = round_up(total);
    let base =
        match sys::mmap(0, len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) {
            Ok(b) => b,
            Err(e) => {
                close_sources(&sources);
                return Err(format!(
                    "cannot set aside {} KiB for the shared memory and deleted files a forked checkpoint copies: {e}",
                    len / 1024
                ));
            }
        };
    let mut copies = Copies { base, len, pages, files };
    // SAFETY: the mapping was just made, `len` bytes long, and nothing else refers to it.
    let dst = unsafe { core::slice::from_raw_parts_mut(base as *mut u8, len) };
    let mut result = Ok(());
    'pages: for &(i, off, _) in &copies.pages {
        let v = &p.vmas[i as usize];
        let mut at = off;
        for &(first, count) in &v.runs {
            let addr = v.start + first * PAGE_SIZE;
            let n = (count * PAGE_SIZE) as usize;
            if v.prot & migrate_image::PROT_READ != 0 {
                // SAFETY: a readable range of our own address space (a stored run of a mapping
                // just described); every program thread is parked.
                let src = unsafe { core::slice::from_raw_parts(addr as *const u8, n) };
                dst[at..at + n].copy_from_slice(src);
            } else {
                match read_full(mem_fd, &mut dst[at..at + n], addr) {
                    Ok(got) if got == n => {}
                    Ok(_) | Err(_) => {
                        result = Err(format!("cannot read the shared memory at {addr:#x} through /proc/self/mem"));
                        break 'pages;
                    }
                }
            }
            at += n;
        }
    }
    if result.is_ok() {
        for (k, entry) in copies.files.iter_mut().enumerate() {
            let (_, off, size) = *entry;
            match read_full(sources[k], &mut dst[off..off + size], 0) {
                // A file that shrank meanwhile (someone outside the tree) keeps what was read.
                Ok(got) => entry.2 = got,
                Err(e) => {
                    result = Err(format!("cannot read a deleted file's contents: {e}"));
                    break;
                }
            }
        }
    }
    close_sources(&sources);
    match result {
        Ok(()) => Ok(copies),
        Err(e) => {
            copies.unmap();
            Err(e)
        }
    }
}

/// An upper bound of the bytes `member::write_sections` writes for this process: every section
/// at its largest (a page section: its pages and the alignment before it; file contents: the
/// file and alignment; the metadata encoded with the largest resume address), plus slack, so
/// that a change in how sections are stored that costs a few bytes more still fits. A part that
/// does not fit fails the checkpoint (the sink refuses to write past it); a part that is
/// smaller leaves a zero gap. Whoever changes what a process writes changes this bound too.
fn reservation(meta: &mut ImageMeta, copies: &Copies, with_binaries: bool, incremental: bool) -> Result<u64, String> {
    const SLACK: u64 = 64;
    let mut total = 0u64;
    for v in meta.process.vmas.iter().filter(|v| !v.runs.is_empty()) {
        let bytes = v.stored_pages() * PAGE_SIZE;
        total += PAGE_SIZE - 1 + bytes + bytes / 128 + SLACK;
        // Its page hashes; and an incremental image's inherited runs in the metadata: at most
        // one per two pages, each four varints.
        total += v.data_pages() * 8 + SLACK;
        if incremental {
            total += (v.data_pages() / 2 + 1) * 40;
        }
    }
    for &(_, _, n) in &copies.files {
        total += PAGE_SIZE - 1 + n as u64 + SLACK;
    }
    if with_binaries {
        for f in meta.process.files.iter().filter(|f| f.hash.is_some()) {
            let st = sys::stat(&fs::cpath(f.path.as_bytes()))
                .map_err(|e| format!("cannot read {} to store it in the image: {e}", f.path))?;
            total += PAGE_SIZE - 1 + st.st_size as u64 + SLACK;
        }
    }
    // The checkpoint thread's resume address is known only once the child saved its context:
    // encode the largest value (postcard's varints are longest for it).
    let thread = meta.process.threads.iter().position(|t| t.is_checkpoint_thread);
    if let Some(t) = thread {
        meta.process.threads[t].resume_sp = u64::MAX;
    }
    let encoded = postcard::to_allocvec(&*meta).map(|b| b.len() as u64);
    if let Some(t) = thread {
        meta.process.threads[t].resume_sp = 0;
    }
    let encoded = encoded.map_err(|e| format!("cannot encode image metadata: {e}"))?;
    Ok(total + encoded + encoded / 4 + PAGE_SIZE)
}

/// Starts the writer child of this frozen process, described by `meta`, for its part of the
/// image at `pos`. Returns `Forked` in the process, `Restored` in a process restored from the
/// image (the child's copy), never in the child itself. Consumes `mem_fd`.
pub fn start(
    image_fd: i32,
    proc: u32,
    pos: u64,
    mut meta: ImageMeta,
    mem_fd: i32,
    opts: &member::WriteOptions<'_>,
) -> Result<WriteOutcome, String> {
    let copies = take_copies(&meta, mem_fd);
    member::close_mem(mem_fd);
    let copies = copies?;
    let (with_binaries, compress, parent) = (opts.with_binaries, opts.compress, opts.parent);
    let bound = match reservation(&mut meta, &copies, with_binaries, parent.is_some()) {
        Ok(b) => b,
        Err(e) => {
            copies.unmap();
            return Err(e);
        }
    };
    let limit = pos + bound;
    let nsections = 2 * meta.process.vmas.len() + meta.process.files.len() + 2;
    let report_len = round_up(REPORT_HEADER + 64 * nsections + 4096);
    let report = match sys::mmap(
        0,
        report_len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED | libc::MAP_ANONYMOUS,
        -1,
        0,
    ) {
        Ok(r) => r,
        Err(e) => {
            copies.unmap();
            return Err(format!("cannot map the writer child's report page: {e}"));
        }
    };
    let unmap_report = || {
        // SAFETY: our own mapping, made above.
        let _ = unsafe { sys::munmap(report, report_len) };
    };
    let p = &meta.process;
    let ids = (p.vpid, p.vppid, p.vpgid, p.vsid);
    // A test hook (tests/tests/forked.rs): the writer stops itself before it writes anything,
    // so that a test can show the program running on while its image is incomplete.
    let stop_first = crate::env::var("MIGRATE_TEST_STOP_WRITER").is_some_and(|v| v == "1");
    let out = Out { image_fd, proc, pos, limit, with_binaries, compress, report, report_len, stop_first };
    match sys::clone_process() {
        Ok(0) => {
            // The writer child. `write_child` returns only in a restored process.
            write_child(&out, meta, &copies, parent)
        }
        Ok(pid) => {
            copies.unmap();
            let pidfd = match sys::pidfd_open(pid) {
                Ok(fd) => super::control::move_high(fd),
                Err(e) => {
                    let _ = sys::kill(pid, libc::SIGKILL);
                    let _ = sys::waitid_pid(pid, libc::WEXITED | libc::__WCLONE);
                    unmap_report();
                    return Err(format!("cannot watch the writer child: {e}"));
                }
            };
            WRITER_PID.store(pid, Ordering::Release);
            Ok(WriteOutcome::Forked(Forked { pid, pidfd, report, report_len, reserved_end: limit, ids }))
        }
        Err(e) => {
            copies.unmap();
            unmap_report();
            Err(format!("cannot start a writer child (clone: {e}); retry without --fork"))
        }
    }
}

/// Where and how the writer child writes.
#[derive(Clone, Copy)]
struct Out {
    image_fd: i32,
    proc: u32,
    pos: u64,
    limit: u64,
    with_binaries: bool,
    compress: bool,
    report: usize,
    report_len: usize,
    stop_first: bool,
}

/// The writer child: writes this process's sections from its copy-on-write snapshot, reports,
/// and exits. Returns only in a process restored from the image.
fn write_child(
    out: &Out,
    meta: ImageMeta,
    copies: &Copies,
    parent: Option<&member::ParentImage>,
) -> Result<WriteOutcome, String> {
    let Out { image_fd, proc, pos, limit, with_binaries, compress, report, report_len, stop_first } = *out;
    // Dies with the checkpoint thread that made it (the program exits or execs meanwhile).
    let _ = sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as usize, 0);
    // Holds none of the program's descriptors: a pipe or socket the program closes must close.
    if image_fd > 0 {
        let _ = sys::close_range(0, image_fd as u32 - 1);
    }
    let _ = sys::close_range(image_fd as u32 + 1, u32::MAX);
    if stop_first {
        let _ = sys::kill(sys::getpid(), libc::SIGSTOP);
    }
    // Our own memory now (a descriptor opened by the parent would read the parent's).
    let mem_fd = sys::open(b"/proc/thread-self/mem\0", libc::O_RDONLY | libc::O_CLOEXEC, 0).unwrap_or(-1);
    let page_copies = copies.slices(&copies.pages);
    let file_copies = copies.slices(&copies.files);
    let sink = PwriteSink { fd: image_fd, pos, limit };
    let what = member::WriteWhat {
        with_binaries,
        compress,
        page_copies: &page_copies,
        file_copies: Some(&file_copies),
        parent,
    };
    let written = member::write_sections(sink, proc, meta, mem_fd, &what);
    match written {
        // A process restored from the image: the restore is done, the program runs. Nothing
        // below runs there.
        Ok(WriteOutcome::Restored) => Ok(WriteOutcome::Restored),
        Ok(WriteOutcome::Written(w)) => {
            let table = postcard::to_allocvec(&w.sections).unwrap_or_default();
            if REPORT_HEADER + table.len() > report_len {
                put_report(report, FAILED, 0, b"the section table does not fit in the report page");
            } else {
                put_report(report, WRITTEN, w.end, &table);
            }
            sys::exit_group(0)
        }
        Ok(WriteOutcome::Forked(_)) => sys::exit_group(1),
        Err(msg) => {
            let n = msg.len().min(report_len - REPORT_HEADER);
            put_report(report, FAILED, 0, &msg.as_bytes()[..n]);
            sys::exit_group(1)
        }
    }
}

fn put_report(report: usize, status: u64, end: u64, body: &[u8]) {
    // SAFETY: the report page is mapped (shared with the parent) and large enough: callers
    // bound `body` by its length.
    unsafe {
        core::ptr::copy_nonoverlapping(body.as_ptr(), (report + REPORT_HEADER) as *mut u8, body.len());
        core::ptr::write_volatile((report + 8) as *mut u64, end);
        core::ptr::write_volatile((report + 16) as *mut u64, body.len() as u64);
        core::ptr::write_volatile(report as *mut u64, status);
    }
}

/// Waits (bounded) until the process behind `pidfd` has exited; false on timeout.
fn wait_exit(pidfd: i32, timeout_ms: u64) -> bool {
    let deadline = sys::monotonic_ns() + timeout_ms * 1_000_000;
    loop {
        let left = deadline.saturating_sub(sys::monotonic_ns()) / 1_000_000;
        let mut fds = [libc::pollfd { fd: pidfd, events: libc::POLLIN, revents: 0 }];
        match sys::poll(&mut fds, left.min(i32::MAX as u64) as i32) {
            Ok(n) if n > 0 => return true,
            Ok(_) => return false,
            Err(sys::Errno(libc::EINTR)) if left > 0 => {}
            Err(_) => return false,
        }
    }
}

/// How the child ended, once it has: (si_code, si_status) of waitid, or None if it cannot be
/// reaped (someone else did: the program waits with __WALL).
fn reap(pid: i32) -> Option<(i32, i32)> {
    match sys::waitid_pid(pid, libc::WEXITED | libc::WNOHANG | libc::__WCLONE) {
        Ok((p, code, status)) if p == pid => Some((code, status)),
        _ => None,
    }
}

fn release_handle(f: &Forked) {
    // SAFETY: the report page made by `start`, no longer used by the (exited) child.
    let _ = unsafe { sys::munmap(f.report, f.report_len) };
    let _ = sys::close(f.pidfd);
    super::clear_transient_fd(f.pidfd);
    WRITER_PID.store(0, Ordering::Release);
}

/// Waits (bounded) for the writer child and returns what it wrote, as an ordinary write would.
pub fn collect(f: Forked) -> Result<Written, String> {
    let vpid = f.ids.0;
    let finished = wait_exit(f.pidfd, WRITER_TIMEOUT_MS);
    if !finished {
        let _ = sys::kill(f.pid, libc::SIGKILL);
        let _ = wait_exit(f.pidfd, 5_000);
    }
    let ended = reap(f.pid);
    // SAFETY: the report page is mapped until `release_handle`; the child has exited (or was
    // killed), so nothing writes it any more.
    let (status, end, len) = unsafe {
        (
            core::ptr::read_volatile(f.report as *const u64),
            core::ptr::read_volatile((f.report + 8) as *const u64),
            core::ptr::read_volatile((f.report + 16) as *const u64) as usize,
        )
    };
    let len = len.min(f.report_len - REPORT_HEADER);
    // SAFETY: as above; `len` is bounded by the page.
    let body = unsafe { core::slice::from_raw_parts((f.report + REPORT_HEADER) as *const u8, len) }.to_vec();
    release_handle(&f);
    if !finished {
        return Err(format!(
            "the writer of process {vpid}'s part of the image did not finish within {} s (a very slow disk?); \
             retry, or checkpoint without --fork",
            WRITER_TIMEOUT_MS / 1000
        ));
    }
    match status {
        WRITTEN => {
            let sections: Vec<SectionEntry> =
                postcard::from_bytes(&body).map_err(|e| format!("the writer child sent a malformed table: {e}"))?;
            Ok(Written { end, sections, ids: f.ids })
        }
        FAILED => Err(String::from_utf8_lossy(&body).into_owned()),
        _ => Err(match ended {
            Some((libc::CLD_KILLED | libc::CLD_DUMPED, sig)) => format!(
                "the process writing process {vpid}'s part of the image in the background (pid {}) was killed by signal {sig}; \
                 nothing was saved: checkpoint again",
                f.pid
            ),
            _ => format!(
                "the process writing process {vpid}'s part of the image in the background (pid {}) ended without a result; \
                 nothing was saved: checkpoint again",
                f.pid
            ),
        }),
    }
}

/// The checkpoint was given up: stops the writer child and reaps it.
pub fn abandon(f: Forked) {
    let _ = sys::kill(f.pid, libc::SIGKILL);
    let _ = wait_exit(f.pidfd, 5_000);
    let _ = reap(f.pid);
    release_handle(&f);
}

/// Refuses a new checkpoint while a writer child of an earlier one still lives.
pub fn check_idle() -> Result<(), String> {
    let pid = WRITER_PID.load(Ordering::Acquire);
    if pid == 0 {
        return Ok(());
    }
    match sys::waitid_pid(pid, libc::WEXITED | libc::WNOHANG | libc::__WCLONE) {
        Ok((0, _, _)) => Err(format!(
            "the writer of an earlier forked checkpoint (pid {pid}) is still running; retry when it has finished"
        )),
        _ => {
            WRITER_PID.store(0, Ordering::Release);
            Ok(())
        }
    }
}

/// In a restored process: no writer child of ours exists.
pub fn forget_in_restored_process() {
    WRITER_PID.store(0, Ordering::Release);
}
