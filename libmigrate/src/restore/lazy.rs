//! Lazy restore (`migrate-resume --lazy`): private anonymous memory comes in on first touch.
//!
//! Before the switch the restore opens a userfaultfd and builds the **page server**: one private
//! mapping holding everything it needs (its header, a bitmap of the stored pages still to
//! bring in, a message buffer, a 1 MiB page buffer and its stack) and two small growable
//! mappings (the spans of stored pages with their image offsets, and the registered ranges).
//! The switch maps the lazy regions without reading them (except a few hot pages), starts the
//! server thread, registers the regions in MISSING mode and lets the server go; then the
//! program runs. The server answers faults with UFFDIO_COPY from the image (or UFFDIO_ZEROPAGE
//! where nothing is stored), fills the rest in the background in 1 MiB chunks, follows the
//! program's madvise/munmap/mremap (REMOVE/UNMAP/REMAP events), and when every stored page is
//! in, unregisters, closes its descriptors, unmaps its mapping and exits. The kernel then
//! clears `LAZY.pending` (CLONE_CHILD_CLEARTID), which a checkpoint, fork() and closing our
//! descriptors wait for.
//!
//! Everything the server runs is libc-free and allocation-free, and it never touches the
//! program's memory (its statics included: it could fault on a page only it can bring in).

use super::plan::{PlanRun, PlanVma, Range};
use crate::sys::{self, uffd, Errno};
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicI32, AtomicU32, Ordering};

const PAGE: u64 = 4096;
/// Pages brought in per fault (the faulting page and the stored pages right after it).
const FAULT_AHEAD: u64 = 16;
/// Pages per background chunk (the page buffer's size).
const CHUNK: u64 = 256;
/// Messages read per read(2).
const MSGS: usize = 64;
/// Faults queued while events are read in the middle of a copy.
const FAULT_CAP: usize = 1024;
const STACK: u64 = 128 * 1024;
/// Regions with fewer stored pages are read eagerly (a few faults would cost more).
pub const MIN_PAGES: u64 = 16;
/// Read eagerly above each restored thread's saved stack pointer: its saved context, the
/// suspend handler's frames and the kernel's signal frame (with the xsave area) above them,
/// which the thread touches at once when it resumes.
pub const HOT_STACK: u64 = 64 * 1024;
const SERVER_MAGIC: u64 = 0x7265_7672_657a_616c; // "lazserver"
/// The image and its ancestors (at most 16), each read through a descriptor of the server's.
const MAX_SOURCES: usize = 24;

/// Shared between the program side and the page server's exit: `pending` is 1 from the switch
/// until the server thread has exited (the kernel clears it and wakes shared futex waiters).
/// Written by the switch through its address (this page is restored eagerly: see `hot`).
#[repr(C, align(64))]
/// `fd_lo..=fd_hi` holds the server's descriptors (the userfaultfd, the images, stderr).
pub struct LazyState {
    pub pending: AtomicU32,
    pub fd_lo: AtomicI32,
    pub fd_hi: AtomicI32,
}

pub static LAZY: LazyState =
    LazyState { pending: AtomicU32::new(0), fd_lo: AtomicI32::new(-1), fd_hi: AtomicI32::new(-1) };

/// Whether a lazy restore is still bringing pages in.
pub fn pending() -> bool {
    LAZY.pending.load(Ordering::Acquire) != 0
}

/// Waits until every page of a lazy restore is in and the page server is gone (at once when
/// none runs). A checkpoint must wait (pagemap would show the missing pages as never touched),
/// so must fork() (the child would not inherit the registration and would read zeros) and
/// closing the server's descriptors.
pub fn wait_complete() {
    let mut waited = false;
    loop {
        let v = LAZY.pending.load(Ordering::Acquire);
        if v == 0 {
            if waited {
                // The kernel wakes one waiter at the server's exit: pass it on.
                sys::futex_wake_shared(&LAZY.pending);
            }
            return;
        }
        waited = true;
        let _ = sys::futex_wait_shared(&LAZY.pending, v, 100_000_000);
    }
}

/// Whether `fd` is one of the page server's descriptors (while it runs).
pub fn is_server_fd(fd: i32) -> bool {
    fd >= 0 && server_fd_in(fd as u32, fd as u32)
}

/// Whether one of the page server's descriptors (while it runs) is in `[first, last]`.
pub fn server_fd_in(first: u32, last: u32) -> bool {
    let (lo, hi) = (LAZY.fd_lo.load(Ordering::Relaxed), LAZY.fd_hi.load(Ordering::Relaxed));
    pending() && lo >= 0 && first <= hi as u32 && lo as u32 <= last
}

// ---------------------------------------------------------------------------------------------
// Before the switch (libc and the allocator still usable)

/// What the restore opened for a lazy restore, before the plan is built.
pub struct Opened {
    pub uffd: i32,
    /// The restore's descriptor of the image (the switch's, closed by it), and the server's.
    pub source_fd: i32,
    pub image_fd: i32,
    pub min_fd: i32,
    pub out_fd: i32,
    pub stats: bool,
    pub delay_ms: u64,
}

/// Opens a userfaultfd for this process with the events the server follows, and its own
/// descriptors of the image and of migrate-resume's stderr, all at `min_fd` or above.
/// `Err` says why lazy restore is not possible here (the caller restores eagerly).
pub fn open(image_fd: i32, error_fd: i32, min_fd: i32) -> Result<Opened, String> {
    let raw = uffd::create().map_err(|e| alloc::format!("userfaultfd: {e}"))?;
    let features = uffd::UFFD_FEATURE_EVENT_REMOVE | uffd::UFFD_FEATURE_EVENT_UNMAP | uffd::UFFD_FEATURE_EVENT_REMAP;
    if let Err(e) = uffd::api(raw, features) {
        let _ = sys::close(raw);
        return Err(alloc::format!("userfaultfd without the events it needs (UFFDIO_API: {e})"));
    }
    let high = |fd: i32| sys::fcntl(fd, libc::F_DUPFD_CLOEXEC, min_fd as usize).map(|v| v as i32);
    let moved = high(raw);
    let _ = sys::close(raw);
    let uffd = moved.map_err(|e| alloc::format!("cannot place the userfaultfd: {e}"))?;
    let image = match high(image_fd) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = sys::close(uffd);
            return Err(alloc::format!("cannot keep the image open: {e}"));
        }
    };
    let out = high(error_fd).unwrap_or(-1);
    Ok(Opened {
        uffd,
        source_fd: image_fd,
        image_fd: image,
        min_fd,
        out_fd: out,
        stats: crate::env::var("MIGRATE_LAZY_STATS").is_some_and(|v| v == "1"),
        delay_ms: crate::env::var("MIGRATE_LAZY_DELAY_MS").and_then(|v| v.parse().ok()).unwrap_or(0),
    })
}

impl Opened {
    /// Closes what `open` opened (the restore goes eager, or failed).
    pub fn close(self) {
        for fd in [self.uffd, self.image_fd, self.out_fd] {
            if fd >= 0 {
                let _ = sys::close(fd);
            }
        }
    }
}

/// A run of stored pages: `pages` pages at `addr`, stored at image offset `off`, the first of
/// them being stored page number `first` (its bit in the bitmap, its hash's index).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Span {
    pub addr: u64,
    pub pages: u64,
    pub off: u64,
    pub first: u64,
    /// The server's descriptor of the image that holds these pages (an incremental image's
    /// ancestor, or the image itself).
    pub fd: i64,
}

/// A growable array of spans in a mapping of its own.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Table {
    pub ptr: u64,
    pub len: u64,
    pub cap: u64,
}

/// The page server's header, at the start of its mapping.
#[repr(C)]
pub struct Server {
    pub magic: u64,
    pub region_start: u64,
    pub region_len: u64,
    pub uffd: i32,
    pub out_fd: i32,
    /// The server's descriptors of the image and its ancestors.
    pub sources: [i32; MAX_SOURCES],
    pub nsources: u32,
    pub stats: u32,
    /// Set by the switch once every lazy region is registered (futex, private).
    pub go: AtomicU32,
    pub pid: i32,
    pub spans: Table,
    pub ranges: Table,
    pub bitmap: u64,
    pub total: u64,
    pub remaining: u64,
    /// One xxh3-64 per stored page (by stored page number), or 0: checked before each copy.
    pub hashes: u64,
    pub hashes_len: u64,
    pub buf: u64,
    pub msgs: u64,
    pub faults: u64,
    pub nfaults: u64,
    pub path: u64,
    pub path_len: u64,
    pub delay_ns: u64,
    pub started_ns: u64,
    pub cursor: u64,
    pub n_fault_pages: u64,
    pub n_faults: u64,
    pub n_background: u64,
    pub n_zero: u64,
    pub n_remove: u64,
    pub n_unmap: u64,
    pub n_remap: u64,
}

/// One lazy region for the builder: its range, its runs (where each one's pages are read
/// from) and its pages' hashes (one per page of the runs, in order; empty: none).
pub struct LazyRegion<'a> {
    pub start: u64,
    pub end: u64,
    pub runs: &'a [PlanRun],
    pub hashes: &'a [u64],
}

pub struct BuiltServer {
    pub addr: u64,
    pub len: u64,
    /// Every mapping the server owns, for the switch's kept ranges.
    pub mappings: [(u64, u64); 4],
    /// The server's descriptors lie in `fd_lo..=fd_hi`.
    pub fd_lo: i32,
    pub fd_hi: i32,
}

fn map_at(addr: u64, len: u64) -> Result<u64, String> {
    let got = sys::mmap(
        addr as usize,
        len as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE | libc::MAP_NORESERVE,
        -1,
        0,
    )
    .map_err(|e| alloc::format!("cannot map the lazy restore's page server: {e}"))?;
    if got as u64 != addr {
        return Err("the lazy restore's page server landed at the wrong address".into());
    }
    Ok(addr)
}

/// Builds the page server's mappings at addresses `free` gives (free in both layouts).
/// `hot`: ranges the switch reads eagerly (their pages are not the server's).
pub fn build_server(
    o: &Opened,
    regions: &[LazyRegion],
    hot: &[Range],
    image_path: &[u8],
    mut free: impl FnMut(u64) -> Option<u64>,
) -> Result<BuiltServer, String> {
    let nruns: usize = regions.iter().map(|r| r.runs.len()).sum();
    let total: u64 = regions.iter().flat_map(|r| r.runs.iter()).map(|r| r.end - r.start).sum();
    let with_hashes = regions.iter().all(|r| r.hashes.len() as u64 == r.runs.iter().map(|x| x.end - x.start).sum());
    let align = |x: u64| x.next_multiple_of(64);
    let hdr = align(core::mem::size_of::<Server>() as u64);
    let bitmap_off = hdr;
    let msgs_off = align(bitmap_off + total.div_ceil(64) * 8);
    let faults_off = align(msgs_off + (MSGS * core::mem::size_of::<uffd::Msg>()) as u64);
    let path_off = align(faults_off + (FAULT_CAP * 8) as u64);
    let buf_off = (path_off + image_path.len() as u64 + 1).next_multiple_of(PAGE);
    let len = buf_off + CHUNK * PAGE + STACK;
    let span_size = core::mem::size_of::<Span>() as u64;
    let spans_len = ((nruns as u64 * 2 + 1024) * span_size).next_multiple_of(PAGE);
    let ranges_len = ((regions.len() as u64 * 2 + 256) * span_size).next_multiple_of(PAGE);
    let hashes_len = if with_hashes { (total * 8).next_multiple_of(PAGE).max(PAGE) } else { PAGE };

    // The server's own descriptor of each image its pages come from.
    let mut sources: Vec<(i32, i32)> = alloc::vec![(o.source_fd, o.image_fd)];
    for r in regions.iter().flat_map(|r| r.runs.iter()) {
        if !sources.iter().any(|&(from, _)| from == r.fd) {
            if sources.len() == MAX_SOURCES {
                return Err("too many ancestor images".into());
            }
            match sys::fcntl(r.fd, libc::F_DUPFD_CLOEXEC, o.min_fd as usize) {
                Ok(fd) => sources.push((r.fd, fd as i32)),
                Err(e) => {
                    for &(_, fd) in &sources[1..] {
                        let _ = sys::close(fd);
                    }
                    return Err(format!("cannot keep an ancestor image open: {e}"));
                }
            }
        }
    }
    let close_sources = |sources: &[(i32, i32)]| {
        for &(_, fd) in &sources[1..] {
            let _ = sys::close(fd);
        }
    };

    let mut made: Vec<(u64, u64)> = Vec::new();
    let unmap_all = |made: &[(u64, u64)]| {
        for &(a, l) in made {
            // SAFETY: mappings made here, not used by anything else yet.
            let _ = unsafe { sys::munmap(a as usize, l as usize) };
        }
    };
    for want in [len, spans_len, ranges_len, hashes_len] {
        match free(want)
            .ok_or_else(|| String::from("no free address range for the page server"))
            .and_then(|a| map_at(a, want))
        {
            Ok(a) => made.push((a, want)),
            Err(e) => {
                unmap_all(&made);
                close_sources(&sources);
                return Err(e);
            }
        }
    }
    let (addr, spans_at, ranges_at, hashes_at) = (made[0].0, made[1].0, made[2].0, made[3].0);
    let source_of = |fd: i32| sources.iter().find(|&&(from, _)| from == fd).map_or(-1, |&(_, to)| to);

    // SAFETY: the four mappings are fresh, writable and sized for everything written below.
    unsafe {
        let spans = spans_at as *mut Span;
        let ranges = ranges_at as *mut Span;
        let bitmap = (addr + bitmap_off) as *mut u64;
        let hashes = hashes_at as *mut u64;
        let mut n = 0usize;
        let mut first = 0u64;
        let mut remaining = 0u64;
        for (j, r) in regions.iter().enumerate() {
            ranges.add(j).write(Span { addr: r.start, pages: (r.end - r.start) / PAGE, off: 0, first: 0, fd: -1 });
            if with_hashes {
                core::ptr::copy_nonoverlapping(r.hashes.as_ptr(), hashes.add(first as usize), r.hashes.len());
            }
            for run in r.runs {
                let pages = run.end - run.start;
                let start = r.start + run.start * PAGE;
                spans.add(n).write(Span { addr: start, pages, off: run.offset, first, fd: source_of(run.fd) as i64 });
                for k in 0..pages {
                    let a = start + k * PAGE;
                    if !hot.iter().any(|h| h.start <= a && a < h.end) {
                        let i = first + k;
                        *bitmap.add((i / 64) as usize) |= 1 << (i % 64);
                        remaining += 1;
                    }
                }
                n += 1;
                first += pages;
            }
        }
        core::ptr::copy_nonoverlapping(image_path.as_ptr(), (addr + path_off) as *mut u8, image_path.len());
        let mut fds = [-1i32; MAX_SOURCES];
        for (slot, &(_, fd)) in fds.iter_mut().zip(&sources) {
            *slot = fd;
        }
        (addr as *mut Server).write(Server {
            magic: SERVER_MAGIC,
            region_start: addr,
            region_len: len,
            uffd: o.uffd,
            out_fd: o.out_fd,
            sources: fds,
            nsources: sources.len() as u32,
            stats: o.stats as u32,
            go: AtomicU32::new(0),
            pid: sys::getpid(),
            spans: Table { ptr: spans_at, len: n as u64, cap: spans_len / span_size },
            ranges: Table { ptr: ranges_at, len: regions.len() as u64, cap: ranges_len / span_size },
            bitmap: addr + bitmap_off,
            total,
            remaining,
            hashes: if with_hashes { hashes_at } else { 0 },
            hashes_len,
            buf: addr + buf_off,
            msgs: addr + msgs_off,
            faults: addr + faults_off,
            nfaults: 0,
            path: addr + path_off,
            path_len: image_path.len() as u64,
            delay_ns: o.delay_ms * 1_000_000,
            started_ns: 0,
            cursor: 0,
            n_fault_pages: 0,
            n_faults: 0,
            n_background: 0,
            n_zero: 0,
            n_remove: 0,
            n_unmap: 0,
            n_remap: 0,
        });
    }
    let all_fds = sources.iter().map(|&(_, fd)| fd).chain([o.uffd, o.out_fd]).filter(|&fd| fd >= 0);
    let (fd_lo, fd_hi) = all_fds.fold((i32::MAX, -1), |(lo, hi), fd| (lo.min(fd), hi.max(fd)));
    let mut mappings = [(0u64, 0u64); 4];
    for (m, &(a, l)) in mappings.iter_mut().zip(&made) {
        *m = (a, a + l);
    }
    Ok(BuiltServer { addr, len, mappings, fd_lo, fd_hi })
}

/// Before the switch of a lazy restore: the pages the switch reads eagerly — every page of a
/// region that is not lazy, the hot pages of a lazy one — are checked against their hashes (the
/// page server checks the others as it brings them in; migrate-resume verified everything but
/// the pages). `hashes[i]` are the hashes of saved mapping `i`.
pub fn verify_eager(
    vmas: &[PlanVma],
    runs: &[PlanRun],
    hashes: &[Vec<u64>],
    hot: &[Range],
    image: &str,
) -> Result<(), String> {
    let mut buf = alloc::vec![0u8; (CHUNK * PAGE) as usize];
    // (Compressed regions, nframes > 0, were checked whole: their runs are not raw pages.)
    for v in vmas.iter().filter(|v| v.shm_id < 0 && v.nruns > 0 && v.nframes == 0) {
        let h = hashes.get(v.index as usize).map_or(&[][..], |h| &h[..]);
        let mut index = 0usize;
        for r in &runs[v.first_run as usize..(v.first_run + v.nruns) as usize] {
            let mut page = r.start;
            while page < r.end {
                let addr = v.start + page * PAGE;
                let wanted = v.lazy == 0 || hot.iter().any(|c| c.start <= addr && addr < c.end);
                if !wanted {
                    page += 1;
                    index += 1;
                    continue;
                }
                // A lazy region: only the hot pages from here on.
                let mut n = 1;
                while n < CHUNK && page + n < r.end {
                    let a = v.start + (page + n) * PAGE;
                    if v.lazy != 0 && !hot.iter().any(|c| c.start <= a && a < c.end) {
                        break;
                    }
                    n += 1;
                }
                let bytes = (n * PAGE) as usize;
                let off = r.offset + (page - r.start) * PAGE;
                let mut done = 0usize;
                while done < bytes {
                    match sys::pread(r.fd, &mut buf[done..bytes], off + done as u64) {
                        Ok(0) => return Err(format!("the image {image} ends before the page at {addr:#x}")),
                        Ok(k) => done += k,
                        Err(Errno(libc::EINTR)) => {}
                        Err(e) => return Err(format!("cannot read the page at {addr:#x} from the image {image}: {e}")),
                    }
                }
                for (k, page_bytes) in buf[..bytes].chunks_exact(PAGE as usize).enumerate() {
                    let want = h.get(index + k).copied();
                    if want != Some(xxhash_rust::xxh3::xxh3_64(page_bytes)) {
                        return Err(format!(
                            "the page at {:#x} of the image {image} does not match its hash: the image is damaged; \
                             resume from an intact copy of it",
                            addr + k as u64 * PAGE
                        ));
                    }
                }
                page += n;
                index += n as usize;
            }
        }
    }
    Ok(())
}

/// The address of `LAZY`, which the switch writes (the same in the restored layout).
pub fn state_addr() -> u64 {
    &LAZY as *const LazyState as u64
}

// ---------------------------------------------------------------------------------------------
// The page server (libc-free: raw system calls, no allocation, no statics)

/// For the switch, when it had to read a lazy region eagerly after all (the kernel refused to
/// register it, or the server could not start): checks the pages of `[start, end)` that the
/// server would have brought in against their hashes. Returns the first bad page's address.
pub fn check_present(server: u64, start: u64, end: u64) -> Option<u64> {
    // SAFETY: the header built by build_server; its tables are mapped.
    let s = unsafe { &*(server as *const Server) };
    for sp in spans(s).iter().filter(|sp| sp.addr >= start && sp.addr < end) {
        for k in 0..sp.pages {
            let addr = sp.addr + k * PAGE;
            // SAFETY: the page was just read into this mapped region.
            let page = unsafe { core::slice::from_raw_parts(addr as *const u8, PAGE as usize) };
            // Hot pages were checked before the switch; their bits are clear.
            if bit(s, sp.first + k) && !page_ok(s, sp.first + k, page) {
                return Some(addr);
            }
        }
    }
    None
}

/// The page server thread's entry: runs until every stored page is in, then leaves.
pub extern "C" fn server_main(addr: u64) -> ! {
    // SAFETY: the switch passes the header built by build_server; only this thread uses it
    // from here on (the switch touches `go` alone, atomically).
    let s = unsafe { &mut *(addr as *mut Server) };
    // Nothing here uses thread-local storage; the inherited fs base points into the replaced
    // layout, so make any stray use fault at once.
    // SAFETY: changes only this thread's fs base.
    unsafe { sys::syscall6(libc::SYS_arch_prctl, sys::ARCH_SET_FS as usize, 0, 0, 0, 0, 0) };
    while s.go.load(Ordering::Acquire) == 0 {
        let _ = sys::futex_wait(&s.go, 0, 100_000_000);
    }
    s.started_ns = sys::monotonic_ns();
    loop {
        let read = read_messages(s);
        while let Some(a) = pop_fault(s) {
            serve_fault(s, a);
        }
        if s.remaining == 0 {
            break;
        }
        let now = sys::monotonic_ns();
        let background_at = s.started_ns + s.delay_ns;
        if now >= background_at {
            background_chunk(s);
        } else if read == 0 {
            let ms = ((background_at - now) / 1_000_000 + 1).min(i32::MAX as u64) as i32;
            let mut pfd = [libc::pollfd { fd: s.uffd, events: libc::POLLIN, revents: 0 }];
            let _ = sys::poll(&mut pfd, ms);
        }
    }
    finish(s)
}

fn spans(s: &Server) -> &[Span] {
    // SAFETY: `len` initialised spans live at `ptr` (build_server, grow).
    unsafe { core::slice::from_raw_parts(s.spans.ptr as *const Span, s.spans.len as usize) }
}

fn table_mut(t: &mut Table) -> &mut [Span] {
    // SAFETY: as in `spans`; the server is the table's only user.
    unsafe { core::slice::from_raw_parts_mut(t.ptr as *mut Span, t.len as usize) }
}

fn bit(s: &Server, i: u64) -> bool {
    if i >= s.total {
        return false;
    }
    // SAFETY: i < total: inside the bitmap.
    unsafe { *(s.bitmap as *const u64).add((i / 64) as usize) & (1 << (i % 64)) != 0 }
}

/// Clears bit `i`; true if it was set (one page fewer to bring in).
fn take(s: &mut Server, i: u64) -> bool {
    if !bit(s, i) {
        return false;
    }
    // SAFETY: i < total (bit() checked).
    unsafe { *(s.bitmap as *mut u64).add((i / 64) as usize) &= !(1 << (i % 64)) };
    s.remaining -= 1;
    true
}

/// The first set bit in `[from, to)`.
fn next_set(s: &Server, mut from: u64, to: u64) -> Option<u64> {
    let to = to.min(s.total);
    while from < to {
        // SAFETY: from < total.
        let word = unsafe { *(s.bitmap as *const u64).add((from / 64) as usize) } >> (from % 64);
        if word != 0 {
            let i = from + word.trailing_zeros() as u64;
            return (i < to).then_some(i);
        }
        from = (from / 64 + 1) * 64;
    }
    None
}

/// How many bits from `i` on are set, at most `max`.
fn run_len(s: &Server, i: u64, max: u64) -> u64 {
    let mut n = 0;
    while n < max && bit(s, i + n) {
        n += 1;
    }
    n
}

/// The span holding `page`, and the page's index in it.
fn lookup(s: &Server, page: u64) -> Option<(usize, u64)> {
    let sp = spans(s);
    let (mut lo, mut hi) = (0usize, sp.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if sp[mid].addr <= page {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let i = lo.checked_sub(1)?;
    let sp = sp[i];
    (page < sp.addr + sp.pages * PAGE).then(|| (i, (page - sp.addr) / PAGE))
}

/// Reports a fatal error of the lazy restore on migrate-resume's stderr and ends the program:
/// it cannot go on with memory it does not have.
fn fatal(s: &Server, what: &[u8], addr: u64, err: i32, fix: &[u8]) -> ! {
    let fd = if s.out_fd >= 0 { s.out_fd } else { 2 };
    let _ = sys::write(fd, b"migrate-resume: error: lazy restore: ");
    let _ = sys::write(fd, what);
    let _ = sys::write(fd, b" at 0x");
    super::switch::write_num(fd, addr, 16);
    let _ = sys::write(fd, b" (process ");
    super::switch::write_num(fd, s.pid as u64, 10);
    if err != 0 {
        let _ = sys::write(fd, b", errno ");
        super::switch::write_num(fd, err as u64, 10);
    }
    let _ = sys::write(fd, b") from the image ");
    // SAFETY: path_len bytes were copied to `path` by build_server.
    let path = unsafe { core::slice::from_raw_parts(s.path as *const u8, s.path_len as usize) };
    let _ = sys::write(fd, path);
    let _ = sys::write(fd, b"; ");
    let _ = sys::write(fd, fix);
    let _ = sys::write(fd, b"\n");
    sys::exit_group(5)
}

/// Whether stored page `index`, read into `page`, is what the checkpoint wrote: compared with
/// its hash when the image carries per-page hashes (`hashes`); otherwise the image was verified
/// as a whole before the restore began.
fn page_ok(s: &Server, index: u64, page: &[u8]) -> bool {
    if s.hashes == 0 || index >= s.total {
        return true;
    }
    // SAFETY: `hashes` holds `total` words when set.
    let want = unsafe { *(s.hashes as *const u64).add(index as usize) };
    xxhash_rust::xxh3::xxh3_64(page) == want
}

/// Reads `len` bytes of image descriptor `fd` at `off` into the page buffer.
fn read_image(s: &Server, fd: i32, len: u64, off: u64, addr: u64) {
    let mut done = 0u64;
    while done < len {
        // SAFETY: the buffer holds CHUNK pages and len <= CHUNK pages.
        match unsafe { sys::pread_raw(fd, (s.buf + done) as usize, (len - done) as usize, off + done) } {
            Ok(0) => fatal(
                s,
                b"the image ended before the page",
                addr,
                0,
                b"the image file was truncated: resume from an intact copy",
            ),
            Ok(n) => done += n as u64,
            Err(Errno(libc::EINTR)) => {}
            Err(Errno(e)) => {
                fatal(s, b"cannot read the page", addr, e, b"check the disk holding the image and resume again")
            }
        }
    }
}

/// Brings in `n` stored pages from page `k` of span `i`. False when the copy met a pending
/// event (read meanwhile): the spans may have changed and the caller looks again.
fn fill(s: &mut Server, i: usize, k: u64, n: u64, on_fault: bool) -> bool {
    let sp = spans(s)[i];
    let dst = sp.addr + k * PAGE;
    let len = n * PAGE;
    read_image(s, sp.fd as i32, len, sp.off + k * PAGE, dst);
    for j in 0..n {
        // SAFETY: page j of the buffer was just read.
        let page = unsafe { core::slice::from_raw_parts((s.buf + j * PAGE) as *const u8, PAGE as usize) };
        if !page_ok(s, sp.first + k + j, page) {
            fatal(
                s,
                b"a page does not match its hash",
                dst + j * PAGE,
                0,
                b"the image is damaged: resume from an intact copy of it",
            );
        }
    }
    let mut done = 0u64;
    while done < len {
        // SAFETY: the buffer holds `len` bytes read above.
        let r = unsafe { uffd::copy(s.uffd, dst + done, s.buf + done, len - done) };
        let (copied, err) = match r {
            Ok(c) => (c, None),
            Err((e, c)) => (c, Some(e)),
        };
        let pages = copied / PAGE;
        for j in 0..pages {
            take(s, sp.first + k + done / PAGE + j);
        }
        if on_fault {
            s.n_fault_pages += pages;
        } else {
            s.n_background += pages;
        }
        done += pages * PAGE;
        match err {
            None => {}
            Some(Errno(libc::EAGAIN)) => {
                read_messages(s);
                return false;
            }
            // EEXIST: present already (the switch read it); ENOENT: no registered mapping
            // there any more. Either way nothing to bring in: the rest follows.
            Some(_) => {
                take(s, sp.first + k + done / PAGE);
                uffd::wake(s.uffd, dst + done, PAGE);
                done += PAGE;
            }
        }
    }
    true
}

fn serve_fault(s: &mut Server, addr: u64) {
    let page = addr & !(PAGE - 1);
    s.n_faults += 1;
    loop {
        match lookup(s, page) {
            Some((i, k)) if bit(s, spans(s)[i].first + k) => {
                let sp = spans(s)[i];
                let n = run_len(s, sp.first + k, FAULT_AHEAD.min(sp.pages - k));
                if fill(s, i, k, n, true) {
                    return;
                }
            }
            _ => match uffd::zeropage(s.uffd, page, PAGE) {
                Ok(()) => {
                    s.n_zero += 1;
                    return;
                }
                Err(Errno(libc::EAGAIN)) => {
                    read_messages(s);
                }
                Err(_) => {
                    uffd::wake(s.uffd, page, PAGE);
                    return;
                }
            },
        }
    }
}

/// Brings in the next CHUNK (or fewer) stored pages still missing.
fn background_chunk(s: &mut Server) {
    let mut wrapped = false;
    loop {
        let i = s.cursor as usize;
        let Some(&sp) = spans(s).get(i) else {
            if wrapped {
                // No set bit in any span: nothing left (the count is kept in step anyway).
                s.remaining = 0;
                return;
            }
            wrapped = true;
            s.cursor = 0;
            continue;
        };
        match next_set(s, sp.first, sp.first + sp.pages) {
            Some(b) => {
                let k = b - sp.first;
                let n = run_len(s, b, CHUNK.min(sp.pages - k));
                fill(s, i, k, n, false);
                return;
            }
            None => s.cursor += 1,
        }
    }
}

fn pop_fault(s: &mut Server) -> Option<u64> {
    if s.nfaults == 0 {
        return None;
    }
    s.nfaults -= 1;
    // SAFETY: nfaults < FAULT_CAP entries are initialised.
    Some(unsafe { *(s.faults as *const u64).add(s.nfaults as usize) })
}

/// Reads the messages waiting (without blocking): events are applied at once, faults queued.
/// Returns how many were read.
fn read_messages(s: &mut Server) -> usize {
    let size = core::mem::size_of::<uffd::Msg>();
    let mut total = 0;
    loop {
        // SAFETY: the message buffer holds MSGS messages.
        let got = unsafe { sys::syscall6(libc::SYS_read, s.uffd as usize, s.msgs as usize, MSGS * size, 0, 0, 0) };
        if got == -(libc::EINTR as isize) {
            continue;
        }
        if got <= 0 {
            return total;
        }
        let n = got as usize / size;
        for j in 0..n {
            // SAFETY: the kernel wrote n whole messages.
            let m = unsafe { *(s.msgs as *const uffd::Msg).add(j) };
            apply(s, &m);
        }
        total += n;
        if n < MSGS {
            return total;
        }
    }
}

fn apply(s: &mut Server, m: &uffd::Msg) {
    match m.event {
        uffd::UFFD_EVENT_PAGEFAULT => {
            if (s.nfaults as usize) < FAULT_CAP {
                // SAFETY: nfaults < FAULT_CAP.
                unsafe { *(s.faults as *mut u64).add(s.nfaults as usize) = m.arg[1] };
                s.nfaults += 1;
            } else {
                // The thread retries its access and faults again.
                uffd::wake(s.uffd, m.arg[1] & !(PAGE - 1), PAGE);
            }
        }
        uffd::UFFD_EVENT_REMOVE => {
            // madvise(DONTNEED/REMOVE/FREE): those pages read zeros from now on, never the image.
            s.n_remove += 1;
            clear(s, m.arg[0], m.arg[1]);
        }
        uffd::UFFD_EVENT_UNMAP => {
            s.n_unmap += 1;
            clear(s, m.arg[0], m.arg[1]);
            drop_range(s, true, m.arg[0], m.arg[1]);
            drop_range(s, false, m.arg[0], m.arg[1]);
        }
        uffd::UFFD_EVENT_REMAP => {
            s.n_remap += 1;
            let (from, to, len) = (m.arg[0], m.arg[1], m.arg[2]);
            // The destination's old contents were unmapped first (an UNMAP event came before).
            clear(s, to, to + len);
            for spans_table in [true, false] {
                drop_range(s, spans_table, to, to + len);
                split_at(s, spans_table, from);
                split_at(s, spans_table, from + len);
                let t = table_mut(if spans_table { &mut s.spans } else { &mut s.ranges });
                for sp in t.iter_mut().filter(|sp| sp.pages > 0 && sp.addr >= from && sp.addr < from + len) {
                    sp.addr = sp.addr - from + to;
                }
                normalize(if spans_table { &mut s.spans } else { &mut s.ranges });
            }
        }
        _ => {}
    }
}

/// Forgets the stored pages of `[start, end)` still missing.
fn clear(s: &mut Server, start: u64, end: u64) {
    for i in 0..s.spans.len as usize {
        let sp = spans(s)[i];
        let (a, b) = (sp.addr.max(start), (sp.addr + sp.pages * PAGE).min(end));
        let mut p = a;
        while p < b {
            take(s, sp.first + (p - sp.addr) / PAGE);
            p += PAGE;
        }
    }
    s.cursor = 0;
}

/// Splits the span of table `spans_table` (else the ranges) that straddles `x`.
fn split_at(s: &mut Server, spans_table: bool, x: u64) {
    let t = if spans_table { &mut s.spans } else { &mut s.ranges };
    for i in 0..t.len as usize {
        let sp = table_mut(t)[i];
        if sp.addr < x && x < sp.addr + sp.pages * PAGE {
            let k = (x - sp.addr) / PAGE;
            let tail = Span { addr: x, pages: sp.pages - k, off: sp.off + k * PAGE, first: sp.first + k, fd: sp.fd };
            table_mut(t)[i].pages = k;
            push(t, tail);
            return;
        }
    }
}

/// Appends to a table, growing its mapping when full.
fn push(t: &mut Table, sp: Span) {
    let size = core::mem::size_of::<Span>() as u64;
    if t.len == t.cap {
        let new_cap = t.cap * 2;
        // SAFETY: the table's own mapping, which nothing else points into.
        let r = unsafe {
            sys::syscall6(
                libc::SYS_mremap,
                t.ptr as usize,
                (t.cap * size) as usize,
                (new_cap * size) as usize,
                libc::MREMAP_MAYMOVE as usize,
                0,
                0,
            )
        };
        if (-4095..0).contains(&r) {
            let _ = sys::write(2, b"migrate: lazy restore: cannot grow the page server's table; exiting\n");
            sys::exit_group(5);
        }
        t.ptr = r as u64;
        t.cap = new_cap;
    }
    // SAFETY: len < cap after the growth above.
    unsafe { (t.ptr as *mut Span).add(t.len as usize).write(sp) };
    t.len += 1;
}

/// Drops the spans (or ranges) inside `[start, end)`.
fn drop_range(s: &mut Server, spans_table: bool, start: u64, end: u64) {
    split_at(s, spans_table, start);
    split_at(s, spans_table, end);
    let t = if spans_table { &mut s.spans } else { &mut s.ranges };
    for sp in table_mut(t).iter_mut().filter(|sp| sp.addr >= start && sp.addr < end) {
        sp.pages = 0;
    }
    normalize(t);
    s.cursor = 0;
}

/// Removes empty entries and sorts by address (insertion sort: the table is nearly sorted).
fn normalize(t: &mut Table) {
    let v = table_mut(t);
    let mut n = 0;
    for i in 0..v.len() {
        if v[i].pages > 0 {
            v[n] = v[i];
            n += 1;
        }
    }
    for i in 1..n {
        let mut j = i;
        while j > 0 && v[j - 1].addr > v[j].addr {
            v.swap(j - 1, j);
            j -= 1;
        }
    }
    t.len = n as u64;
}

/// Every page is in: unregister, answer what is left, report, close, unmap, exit.
fn finish(s: &mut Server) -> ! {
    for i in 0..s.ranges.len as usize {
        let r = table_mut(&mut s.ranges)[i];
        let _ = uffd::unregister(s.uffd, r.addr, r.pages * PAGE);
    }
    // Faults that arrived meanwhile (never-stored pages): zeros, or a wake where the
    // unregistration made the page an ordinary one.
    loop {
        if read_messages(s) == 0 && s.nfaults == 0 {
            break;
        }
        while let Some(a) = pop_fault(s) {
            serve_fault(s, a);
        }
    }
    if s.stats != 0 && s.out_fd >= 0 {
        let fd = s.out_fd;
        let ms = (sys::monotonic_ns() - s.started_ns) / 1_000_000;
        let _ = sys::write(fd, b"migrate: lazy restore of process ");
        super::switch::write_num(fd, s.pid as u64, 10);
        let _ = sys::write(fd, b" complete in ");
        super::switch::write_num(fd, ms, 10);
        let _ = sys::write(fd, b" ms: pages=");
        super::switch::write_num(fd, s.total, 10);
        let _ = sys::write(fd, b" faults=");
        super::switch::write_num(fd, s.n_faults, 10);
        let _ = sys::write(fd, b" on_demand=");
        super::switch::write_num(fd, s.n_fault_pages, 10);
        let _ = sys::write(fd, b" background=");
        super::switch::write_num(fd, s.n_background, 10);
        let _ = sys::write(fd, b" zero=");
        super::switch::write_num(fd, s.n_zero, 10);
        let _ = sys::write(fd, b" remove=");
        super::switch::write_num(fd, s.n_remove, 10);
        let _ = sys::write(fd, b" unmap=");
        super::switch::write_num(fd, s.n_unmap, 10);
        let _ = sys::write(fd, b" remap=");
        super::switch::write_num(fd, s.n_remap, 10);
        let _ = sys::write(fd, b"\n");
    }
    for &fd in s.sources.iter().take(s.nsources as usize).chain([&s.uffd, &s.out_fd]) {
        if fd >= 0 {
            let _ = sys::close(fd);
        }
    }
    let size = core::mem::size_of::<Span>() as u64;
    for t in [s.spans, s.ranges] {
        // SAFETY: the tables are the server's own mappings.
        let _ = unsafe { sys::munmap(t.ptr as usize, (t.cap * size) as usize) };
    }
    if s.hashes != 0 {
        // SAFETY: the hashes are the server's own mapping.
        let _ = unsafe { sys::munmap(s.hashes as usize, s.hashes_len as usize) };
    }
    let (start, len) = (s.region_start, s.region_len);
    // SAFETY: nothing uses the server's mapping after this thread; the routine touches no
    // memory between the unmap and the exit.
    unsafe { uffd::unmap_and_exit(start, len) }
}
