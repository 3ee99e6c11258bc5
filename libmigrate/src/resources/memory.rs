//! The address space. Dump: /proc/self/maps describes the VMAs, /proc/thread-self/pagemap tells which
//! pages hold data of their own (never-touched anonymous pages and unmodified file pages are
//! not stored); pages are written straight from the mappings in large writes. Restore: the plan
//! (restore/plan.rs) turns each VmaEntry into a mapping and the runs into reads from the image.

use crate::resources::Files;
use crate::sys::{self, fs};
use alloc::string::String;
use alloc::vec::Vec;
use migrate_image::{VmaEntry, VmaKind, PROT_EXEC, PROT_READ, PROT_WRITE};

/// One line of /proc/self/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapLine {
    pub start: u64,
    pub end: u64,
    pub prot: u32,
    pub shared: bool,
    pub offset: u64,
    pub dev: u64,
    pub inode: u64,
    pub name: String,
}

impl MapLine {
    pub fn is_special(&self) -> bool {
        matches!(self.name.as_str(), "[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]")
    }
}

pub fn parse_maps(text: &[u8]) -> Vec<MapLine> {
    let mut out = Vec::new();
    for line in text.split(|&c| c == b'\n') {
        if line.is_empty() {
            continue;
        }
        let mut fields = line.splitn(6, |&c| c == b' ');
        let range = fields.next().unwrap_or(b"");
        let perms = fields.next().unwrap_or(b"");
        let offset = fields.next().unwrap_or(b"");
        let dev = fields.next().unwrap_or(b"");
        let inode = fields.next().unwrap_or(b"");
        let name = fields.next().unwrap_or(b"");
        let Some(dash) = range.iter().position(|&c| c == b'-') else {
            continue;
        };
        let (Some(start), Some(end)) = (fs::parse_hex(&range[..dash]), fs::parse_hex(&range[dash + 1..])) else {
            continue;
        };
        let mut prot = 0;
        if perms.first() == Some(&b'r') {
            prot |= PROT_READ;
        }
        if perms.get(1) == Some(&b'w') {
            prot |= PROT_WRITE;
        }
        if perms.get(2) == Some(&b'x') {
            prot |= PROT_EXEC;
        }
        let (major, minor) = match dev.iter().position(|&c| c == b':') {
            Some(c) => (fs::parse_hex(&dev[..c]).unwrap_or(0), fs::parse_hex(&dev[c + 1..]).unwrap_or(0)),
            None => (0, 0),
        };
        let name = name.iter().skip_while(|&&c| c == b' ').copied().collect::<Vec<u8>>();
        out.push(MapLine {
            start,
            end,
            prot,
            shared: perms.get(3) == Some(&b's'),
            offset: fs::parse_hex(offset).unwrap_or(0),
            dev: libc::makedev(major as u32, minor as u32),
            inode: fs::parse_dec(inode).unwrap_or(0) as u64,
            name: String::from_utf8_lossy(&name).into_owned(),
        });
    }
    out
}

pub fn read_maps() -> sys::SysResult<Vec<MapLine>> {
    Ok(parse_maps(&fs::read_file(b"/proc/thread-self/maps")?))
}

/// The frame number of the kernel's shared zero page (visible to root in pagemap), learned by
/// reading a fresh anonymous page; 0 when unknown. Pages mapped to it hold only zeros.
fn zero_pfn() -> u64 {
    static ZERO_PFN: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(u64::MAX);
    let known = ZERO_PFN.load(core::sync::atomic::Ordering::Relaxed);
    if known != u64::MAX {
        return known;
    }
    let mut pfn = 0;
    if let Ok(page) = sys::mmap(0, 4096, libc::PROT_READ, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) {
        // SAFETY: reading our own fresh readable page maps the zero page.
        let _ = unsafe { core::ptr::read_volatile(page as *const u8) };
        if let Ok(fd) = sys::open(b"/proc/thread-self/pagemap\0", libc::O_RDONLY | libc::O_CLOEXEC, 0) {
            let mut e = [0u8; 8];
            if sys::pread(fd, &mut e, (page as u64 / 4096) * 8).is_ok_and(|n| n == 8) {
                let v = u64::from_ne_bytes(e);
                if v & PM_PRESENT != 0 {
                    pfn = v & PM_PFN;
                }
            }
            let _ = sys::close(fd);
        }
        // SAFETY: our own scratch page.
        let _ = unsafe { sys::munmap(page, 4096) };
    }
    ZERO_PFN.store(pfn, core::sync::atomic::Ordering::Relaxed);
    pfn
}

const PM_PFN: u64 = (1 << 55) - 1;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// `struct pm_scan_arg` of the PAGEMAP_SCAN ioctl (Linux 6.7+).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// _IOWR('f', 16, struct pm_scan_arg)
const PAGEMAP_SCAN: u64 = 0xc060_6610;
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;

/// The runs `stored_runs` finds, asked of the kernel with PAGEMAP_SCAN, which walks the page
/// tables once and answers ranges rather than one entry per page. None when the kernel lacks it.
fn scanned_runs(pagemap_fd: i32, v: &MapLine, kind: VmaKind, regions: &mut [PageRegion]) -> Option<Vec<(u64, u64)>> {
    // Present or swapped, and not the shared zero page (never written: nothing to keep); in a
    // private file mapping, not the file's own page either (only copied-on-write ones).
    let excluded = if kind == VmaKind::FilePrivate { PAGE_IS_FILE } else { PAGE_IS_PFNZERO };
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut start = v.start;
    while start < v.end {
        let mut arg = PmScanArg {
            size: core::mem::size_of::<PmScanArg>() as u64,
            start,
            end: v.end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            category_inverted: excluded,
            category_mask: excluded,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..Default::default()
        };
        // SAFETY: `arg` describes `regions`, writable for `vec_len` entries, for the call.
        let n = unsafe { sys::ioctl_ptr(pagemap_fd, PAGEMAP_SCAN, &mut arg as *mut PmScanArg as *mut u8) }.ok()?;
        for r in &regions[..n.min(regions.len())] {
            let (first, end) = ((r.start - v.start) / 4096, (r.end - v.start) / 4096);
            match runs.last_mut() {
                Some(last) if last.0 + last.1 == first => last.1 += end - first,
                _ => runs.push((first, end - first)),
            }
        }
        if arg.walk_end <= start {
            return None;
        }
        start = arg.walk_end;
    }
    Some(runs)
}

/// Which pages of a VMA carry data of their own, as runs of (first page, count).
fn stored_runs(pagemap_fd: i32, v: &MapLine, kind: VmaKind, buf: &mut [u64]) -> sys::SysResult<Vec<(u64, u64)>> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    if matches!(kind, VmaKind::Special | VmaKind::FileShared) {
        return Ok(runs);
    }
    // `buf` doubles as the region vector (three words per region).
    // SAFETY: a u64 buffer viewed as PageRegion records (three u64 each, same alignment).
    let regions = unsafe { core::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut PageRegion, buf.len() / 3) };
    if let Some(runs) = scanned_runs(pagemap_fd, v, kind, regions) {
        return Ok(runs);
    }
    let pages = (v.end - v.start) / 4096;
    let first_page = v.start / 4096;
    let zero = zero_pfn();
    let mut done = 0u64;
    while done < pages {
        let n = (pages - done).min(buf.len() as u64) as usize;
        // SAFETY: u64 slice viewed as bytes for pread.
        let bytes = unsafe { core::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, n * 8) };
        let got = sys::pread(pagemap_fd, bytes, (first_page + done) * 8)?;
        let got = got / 8;
        if got == 0 {
            break;
        }
        for (i, &e) in buf[..got].iter().enumerate() {
            let stored = match kind {
                VmaKind::FilePrivate => (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAPPED != 0,
                // Present but still the shared zero page: never written, nothing to keep.
                _ if zero != 0 && e & PM_PRESENT != 0 && e & PM_PFN == zero => false,
                _ => e & (PM_PRESENT | PM_SWAPPED) != 0,
            };
            if stored {
                let page = done + i as u64;
                match runs.last_mut() {
                    Some(last) if last.0 + last.1 == page => last.1 += 1,
                    _ => runs.push((page, 1)),
                }
            }
        }
        done += got as u64;
    }
    Ok(runs)
}

fn kind_of(m: &MapLine, mm_start_brk: u64, mm_brk: u64) -> VmaKind {
    if m.is_special() {
        VmaKind::Special
    } else if m.name == "[stack]" {
        VmaKind::Stack
    } else if m.name == "[heap]"
        || (m.inode == 0 && m.start >= mm_start_brk && m.end <= mm_brk.next_multiple_of(4096) && mm_brk > mm_start_brk)
    {
        VmaKind::Heap
    } else if m.inode == 0 {
        if m.shared {
            VmaKind::SharedAnon
        } else {
            VmaKind::Anon
        }
    } else if m.shared {
        VmaKind::FileShared
    } else {
        VmaKind::FilePrivate
    }
}

/// How far below the describing thread's stack pointer its stack is stored whether or not the
/// pages are in use yet: the image holds this thread's context, which it saves later and deeper
/// (a forked checkpoint's writer child, or the write path, calls further down than the dump).
const LIVE_STACK_MARGIN: u64 = 256 * 1024;

/// `runs` of the mapping holding the checkpoint thread's own stack (at `sp`), plus every page
/// from `LIVE_STACK_MARGIN` below `sp` to the mapping's end.
fn with_live_stack(runs: Vec<(u64, u64)>, m: &MapLine, sp: u64) -> Vec<(u64, u64)> {
    let pages = (m.end - m.start) / 4096;
    let first = (sp.saturating_sub(LIVE_STACK_MARGIN).max(m.start) - m.start) / 4096;
    let mut out: Vec<(u64, u64)> = runs.into_iter().filter(|&(f, _)| f < first).collect();
    match out.last_mut() {
        // A run reaching into the forced range is cut there, then the range continues it.
        Some(last) if last.0 + last.1 >= first => last.1 = pages - last.0,
        _ => out.push((first, pages - first)),
    }
    out
}

/// Describes every VMA of the process, with the page runs to store.
pub fn dump(maps: &[MapLine], files: &mut Files, start_brk: u64, brk: u64) -> Result<Vec<VmaEntry>, String> {
    let here = &maps as *const _ as u64;
    let pagemap = sys::open(b"/proc/thread-self/pagemap\0", libc::O_RDONLY | libc::O_CLOEXEC, 0)
        .map_err(|e| alloc::format!("cannot open /proc/thread-self/pagemap: {e}"))?;
    let mut buf = alloc::vec![0u64; 65536];
    let mut out = Vec::with_capacity(maps.len());
    let mut result = Ok(());
    let registry = crate::tree::mapping();
    for m in maps {
        let mut kind = kind_of(m, start_brk, brk);
        if registry.is_some_and(|(at, _)| at == m.start) {
            // The tree registry: a resume maps its own new one here.
            out.push(VmaEntry {
                start: m.start,
                end: m.end,
                prot: m.prot,
                kind: VmaKind::Registry,
                file: None,
                file_offset: 0,
                name: m.name.clone(),
                vm_flags: String::new(),
                runs: Vec::new(),
                inherited: Vec::new(),
                data_section: None,
                compression: migrate_image::PageCompression::None,
            });
            continue;
        }
        if m.shared && m.name.starts_with("/SYSV") {
            // A System V segment (its inode number is its id): the coordinator stores it once
            // for the tree (resources/ipc.rs), a resume attaches the recreated one here.
            let real = m.inode as i32;
            let id = super::ipc::to_virt(super::ipc::Kind::Shm, real).unwrap_or(real);
            out.push(VmaEntry {
                start: m.start,
                end: m.end,
                prot: m.prot,
                kind: VmaKind::SysvShm { id },
                file: None,
                file_offset: m.offset,
                name: m.name.clone(),
                vm_flags: String::new(),
                runs: Vec::new(),
                inherited: Vec::new(),
                data_section: None,
                compression: migrate_image::PageCompression::None,
            });
            continue;
        }
        let mut file = None;
        let mut whole = false;
        if m.inode != 0 && !m.is_special() {
            if m.name.ends_with(" (deleted)") || !m.name.starts_with('/') {
                // The file is gone (or has no path: memfd, SysV shm): keep the contents instead —
                // all of them, untouched pages included, since nothing else holds them.
                kind = if m.shared { VmaKind::SharedAnon } else { VmaKind::Anon };
                whole = m.prot & PROT_READ != 0;
            } else {
                file = Some(files.intern_path(&m.name, m.prot & PROT_EXEC != 0));
            }
        }
        let runs = match stored_runs(pagemap, m, kind, &mut buf) {
            Ok(_) if whole => alloc::vec![(0, (m.end - m.start) / 4096)],
            Ok(r) if m.start <= here && here < m.end => with_live_stack(r, m, here),
            Ok(r) => r,
            Err(e) => {
                result =
                    Err(alloc::format!("cannot read /proc/thread-self/pagemap for {:#x}-{:#x}: {e}", m.start, m.end));
                break;
            }
        };
        out.push(VmaEntry {
            start: m.start,
            end: m.end,
            prot: m.prot,
            kind,
            file,
            file_offset: m.offset,
            name: m.name.clone(),
            vm_flags: if kind == VmaKind::Stack { "gd".into() } else { String::new() },
            runs,
            inherited: Vec::new(),
            data_section: None,
            compression: migrate_image::PageCompression::None,
        });
    }
    let _ = sys::close(pagemap);
    result.map(|_| out)
}

/// Chunk size for writing pages: hashed while hot in cache, then written.
pub const WRITE_CHUNK: usize = 256 * 1024;

/// A page with data in the parent image of an incremental checkpoint: its address, its hash,
/// and where its bytes are (an ancestor of the new image, by index, and the byte offset there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParentPage {
    pub addr: u64,
    pub hash: u64,
    pub ancestor: u32,
    pub offset: u64,
}

/// What the page writer learns about each page of a VMA's runs, in order: its hash, and for an
/// incremental checkpoint the index of the parent's identical page (`NOT_INHERITED` when the
/// page is stored in the new image).
pub struct PageOutcome<'a> {
    pub hashes: &'a mut [u64],
    pub parent: Option<(&'a [ParentPage], &'a mut [u32])>,
    /// For private anonymous memory: the hash of a page of zeros, and a flag per page set for
    /// the pages that hold only zeros, which are left out (a fresh anonymous page reads zeros).
    pub zeros: Option<(u64, &'a mut [u8])>,
}

pub const NOT_INHERITED: u32 = u32::MAX;

/// Writes the pages of `v`'s runs into the open section: every page is hashed (into
/// `out.hashes`); a page identical to the parent image's page at its address is not written
/// but recorded as inherited. Allocates nothing. `live` marks the mapping that holds the
/// writing thread's own stack: it changes while being hashed and written, so it is first copied
/// (through /proc/self/mem) into `bounce`; so is unreadable (PROT_NONE) memory.
pub fn write_pages<S: migrate_image::Sink>(
    w: &mut migrate_image::ImageWriter<S>,
    v: &VmaEntry,
    mem_fd: i32,
    bounce: &mut [u8],
    live: bool,
    out: &mut PageOutcome<'_>,
) -> Result<(), migrate_image::ImageError> {
    let io = |e: i32| migrate_image::ImageError::Write(std::io::Error::from_raw_os_error(e));
    // The parent's pages from this VMA's start on (they are sorted by address).
    let mut cursor = match &out.parent {
        Some((pages, _)) => pages.partition_point(|p| p.addr < v.start),
        None => 0,
    };
    let mut k = 0usize; // index of the page among the runs
    for &(first, count) in &v.runs {
        let mut addr = v.start + first * 4096;
        let end = addr + count * 4096;
        while addr < end {
            let n = ((end - addr) as usize).min(WRITE_CHUNK).min(bounce.len());
            let chunk: &[u8] = if v.prot & PROT_READ != 0 && !live {
                // SAFETY: the range is a mapped, readable part of our own address space that no
                // other thread modifies (they are all parked).
                unsafe { core::slice::from_raw_parts(addr as *const u8, n) }
            } else {
                let got = sys::pread(mem_fd, &mut bounce[..n], addr).map_err(|e| io(e.0))?;
                if got < 4096 {
                    return Err(io(libc::EIO));
                }
                &bounce[..got - got % 4096]
            };
            let npages = chunk.len() / 4096;
            // Consecutive pages to store are written together.
            let mut batch_start = 0usize;
            let mut batch_len = 0usize;
            for i in 0..npages {
                let page = &chunk[i * 4096..(i + 1) * 4096];
                let h = migrate_image::page_hash(page);
                out.hashes[k + i] = h;
                let mut inherited = false;
                if let Some((pages, decided)) = out.parent.as_mut() {
                    let here = addr + (i as u64) * 4096;
                    while cursor < pages.len() && pages[cursor].addr < here {
                        cursor += 1;
                    }
                    decided[k + i] = NOT_INHERITED;
                    if cursor < pages.len() && pages[cursor].addr == here && pages[cursor].hash == h {
                        decided[k + i] = cursor as u32;
                        inherited = true;
                    }
                }
                let mut zero = false;
                if let Some((zero_hash, dropped)) = out.zeros.as_mut() {
                    if !inherited && h == *zero_hash && page.iter().all(|&b| b == 0) {
                        dropped[k + i] = 1;
                        zero = true;
                    }
                }
                if inherited || zero {
                    if batch_len > 0 {
                        let b = &chunk[batch_start * 4096..(batch_start + batch_len) * 4096];
                        w.write_hashed_pages(b, &out.hashes[k + batch_start..k + batch_start + batch_len])?;
                    }
                    batch_start = i + 1;
                    batch_len = 0;
                } else {
                    batch_len += 1;
                }
            }
            if batch_len > 0 {
                let b = &chunk[batch_start * 4096..(batch_start + batch_len) * 4096];
                w.write_hashed_pages(b, &out.hashes[k + batch_start..k + batch_start + batch_len])?;
            }
            k += npages;
            addr += (npages * 4096) as u64;
        }
    }
    Ok(())
}

/// What a compressed checkpoint needs while the program is frozen, made beforehand: writing
/// pages allocates nothing (the allocator's own state is among them).
pub struct Lz4Writer {
    table: alloc::boxed::Box<migrate_image::frames::CompressTable>,
    /// Compressed frames waiting to be written, in order.
    out: Vec<u8>,
    /// The table words of the VMA being written (capacity: the most frames of any VMA).
    words: Vec<u32>,
}

impl Lz4Writer {
    /// Room for VMAs of up to `max_frames` frames.
    pub fn new(max_frames: usize) -> Self {
        Lz4Writer {
            table: alloc::boxed::Box::new(migrate_image::frames::new_compress_table()),
            out: alloc::vec![0u8; WRITE_CHUNK + migrate_image::frames::MAX_COMPRESSED],
            words: Vec::with_capacity(max_frames),
        }
    }
}

impl Lz4Writer {
    /// The memory it writes into while pages are written: (address, length) of each buffer.
    pub fn buffers(&self) -> [(*const u8, usize); 3] {
        [
            (self.out.as_ptr(), self.out.len()),
            (self.words.as_ptr() as *const u8, self.words.capacity() * 4),
            (
                &*self.table as *const migrate_image::frames::CompressTable as *const u8,
                core::mem::size_of_val(&*self.table),
            ),
        ]
    }
}

/// Writes the stored runs of `v` as lz4 frames followed by the frame table
/// (migrate_image::frames), and every page's hash into `hashes` (run order). Allocates nothing.
/// Frames that lz4 cannot shrink are written raw, straight from the mapping, consecutive ones
/// together; `live` and unreadable memory go through `bounce` as in [`write_pages`].
pub fn write_pages_lz4<S: migrate_image::Sink>(
    w: &mut migrate_image::ImageWriter<S>,
    v: &VmaEntry,
    mem_fd: i32,
    bounce: &mut [u8],
    live: bool,
    z: &mut Lz4Writer,
    hashes: &mut [u64],
) -> Result<(), migrate_image::ImageError> {
    use migrate_image::frames::{compress_frame, frame_pages, word_len, word_raw, MAX_COMPRESSED};
    let io = |e: sys::Errno| migrate_image::ImageError::Write(std::io::Error::from_raw_os_error(e.0));
    let direct = v.prot & PROT_READ != 0 && !live;
    z.words.clear();
    // Output not written yet: compressed bytes in `z.out[..fill]`, or raw pages at
    // `raw.0..raw.0+raw.1` of our own memory (never both).
    let mut fill = 0usize;
    let mut raw = (0u64, 0usize);
    let mut hashed = 0usize;
    let flush_raw =
        |w: &mut migrate_image::ImageWriter<S>, raw: &mut (u64, usize)| -> Result<(), migrate_image::ImageError> {
            if raw.1 > 0 {
                // SAFETY: a readable range of our own frozen memory (see write_pages).
                let bytes = unsafe { core::slice::from_raw_parts(raw.0 as *const u8, raw.1) };
                w.write(bytes)?;
                *raw = (0, 0);
            }
            Ok(())
        };
    for (first, pages) in frame_pages(&v.runs) {
        let addr = v.start + first * 4096;
        let size = (pages * 4096) as usize;
        let src: &[u8] = if direct {
            // SAFETY: as in write_pages: mapped, readable, not modified while we read it.
            unsafe { core::slice::from_raw_parts(addr as *const u8, size) }
        } else {
            let b = &mut bounce[..size];
            let mut got = 0;
            while got < size {
                let n = sys::pread(mem_fd, &mut b[got..], addr + got as u64).map_err(io)?;
                if n == 0 {
                    return Err(io(sys::Errno(libc::EIO)));
                }
                got += n;
            }
            b
        };
        // (`hashes` has one slot per page of the runs: sized by the caller.)
        for (h, page) in hashes.iter_mut().skip(hashed).zip(src.chunks_exact(4096)) {
            *h = migrate_image::page_hash(page);
        }
        hashed += pages as usize;
        if fill + MAX_COMPRESSED > z.out.len() {
            w.write(&z.out[..fill])?;
            fill = 0;
        }
        let word = compress_frame(src, &mut z.out[fill..], &mut z.table);
        if word_raw(word) {
            if fill > 0 {
                w.write(&z.out[..fill])?;
                fill = 0;
            }
            if !direct {
                w.write(src)?;
            } else if raw.1 > 0 && raw.0 + raw.1 as u64 == addr && raw.1 < WRITE_CHUNK {
                raw.1 += size;
            } else {
                flush_raw(w, &mut raw)?;
                raw = (addr, size);
            }
        } else {
            flush_raw(w, &mut raw)?;
            fill += word_len(word) as usize;
        }
        // Within the capacity reserved for the largest VMA: never an allocation.
        if z.words.len() == z.words.capacity() {
            return Err(io(sys::Errno(libc::EOVERFLOW)));
        }
        z.words.push(word);
    }
    flush_raw(w, &mut raw)?;
    if fill > 0 {
        w.write(&z.out[..fill])?;
    }
    // The table, then the count, through a stack buffer.
    let mut buf = [0u8; 4096];
    for chunk in z.words.chunks(buf.len() / 4) {
        for (i, word) in chunk.iter().enumerate() {
            buf[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
        }
        w.write(&buf[..chunk.len() * 4])?;
    }
    w.write(&(z.words.len() as u32).to_le_bytes())
}

#[cfg(test)]
mod live_stack_tests {
    use super::*;

    #[test]
    fn the_live_stack_is_stored_from_the_margin_below_the_stack_pointer_to_its_top() {
        let m = MapLine {
            start: 0x100000,
            end: 0x200000,
            prot: 3,
            shared: false,
            offset: 0,
            dev: 0,
            inode: 0,
            name: String::new(),
        };
        // sp in page 200 of 256: pages from 200 - 64 on, and the older runs below.
        let sp = 0x100000 + 200 * 4096 + 16;
        assert_eq!(with_live_stack(alloc::vec![(0, 2), (130, 10), (250, 6)], &m, sp), alloc::vec![(0, 2), (130, 126)]);
        assert_eq!(with_live_stack(alloc::vec![(0, 2)], &m, sp), alloc::vec![(0, 2), (136, 120)]);
        // Near the bottom of the mapping: from its first page.
        assert_eq!(with_live_stack(Vec::new(), &m, 0x100000 + 4096), alloc::vec![(0, 256)]);
    }
}

#[cfg(test)]
mod scan_tests {
    use super::*;

    #[test]
    fn pagemap_scan_finds_written_pages_and_skips_untouched_and_zero_pages() {
        let len = 64 * 4096;
        let addr = sys::mmap(0, len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
            .unwrap() as u64;
        // SAFETY: our own fresh mapping.
        unsafe {
            for page in [1u64, 2, 5, 40] {
                core::ptr::write_volatile((addr + page * 4096 + 8) as *mut u8, 7);
            }
            // Read only: the shared zero page, nothing of its own.
            let _ = core::ptr::read_volatile((addr + 7 * 4096) as *const u8);
        }
        let m = MapLine {
            start: addr,
            end: addr + len as u64,
            prot: 3,
            shared: false,
            offset: 0,
            dev: 0,
            inode: 0,
            name: String::new(),
        };
        let pagemap = sys::open(b"/proc/thread-self/pagemap\0", libc::O_RDONLY | libc::O_CLOEXEC, 0).unwrap();
        // A region vector of two entries: the walk continues where the kernel stopped.
        let mut regions = [PageRegion::default(); 2];
        let scanned = scanned_runs(pagemap, &m, VmaKind::Anon, &mut regions);
        let _ = sys::close(pagemap);
        // SAFETY: our own mapping.
        let _ = unsafe { sys::munmap(addr as usize, len) };
        assert_eq!(scanned, Some(alloc::vec![(1, 2), (5, 1), (40, 1)]));
    }
}
