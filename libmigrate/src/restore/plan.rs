//! The restore plan: everything the libc-free switch needs, as plain #[repr(C)] records in one
//! fresh mapping that lies outside both the current and the saved layout (its upper part is the
//! switch's stack). Nothing in it points into memory that the switch replaces.

use crate::resources::memory::MapLine;
use crate::sys::{self, fs, PrctlMmMap};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use migrate_image::{ImageMeta, PageCompression, SectionEntry, SectionKind, VmaKind, PROT_WRITE};

pub const PLAN_MAGIC: u64 = 0x6e61_6c70_7267_696d; // "migrplan"
pub const STACK_SIZE: usize = 256 * 1024;
/// The switch reads compressed frames (up to this many bytes of consecutive ones at once) here.
pub const SCRATCH_SIZE: usize = 1 << 20;

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

/// Pages `start..end` (page indexes within their VMA) are read from descriptor `fd` (the
/// image, or an ancestor of an incremental image) at byte `offset`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct PlanRun {
    pub start: u64,
    pub end: u64,
    pub fd: i32,
    pub offset: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct PlanVma {
    pub start: u64,
    pub end: u64,
    pub prot: i32,
    pub map_flags: i32,
    pub fd: i32,
    pub keep: u32,
    pub file_offset: u64,
    pub first_run: u32,
    pub nruns: u32,
    /// A System V segment to attach here (its new id), or -1; `shm_size` is its size.
    pub shm_id: i32,
    pub shm_size: u64,
    /// Compressed pages: this VMA's frame table words are `frames()[first_frame..][..nframes]`
    /// (migrate_image::frames) and its frames start at `frames_offset` of the image; 0 frames:
    /// each run says where its raw pages are.
    pub first_frame: u32,
    pub nframes: u32,
    pub frames_offset: u64,
    /// Restored lazily: mapped, its hot pages read, the rest left to the page server.
    pub lazy: u32,
    /// The saved mapping's index (its page hashes).
    pub index: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct PlanThread {
    pub fs_base: u64,
    pub tid_address: u64,
    pub robust_list: u64,
    pub robust_len: u64,
    pub resume_sp: u64,
    pub is_main: u32,
    pub new_tid: i32,
    /// The tid the thread had; recreated with it when `exact_tids` is set and it is free.
    pub vtid: i32,
}

#[repr(C)]
pub struct PlanHeader {
    pub magic: u64,
    pub region_start: u64,
    pub region_len: u64,
    pub image_fd: i32,
    pub nfds: u32,
    pub nkeep: u32,
    pub nvmas: u32,
    pub nruns: u32,
    pub nthreads: u32,
    pub keeps_off: u64,
    pub vmas_off: u64,
    pub runs_off: u64,
    pub threads_off: u64,
    pub fds_off: u64,
    pub auxv_off: u64,
    pub auxv_len: u64,
    pub path_off: u64,
    pub path_len: u64,
    pub mm: PrctlMmMap,
    pub stack_top: u64,
    /// When the saved main thread had exited (pthread_exit), the restorer's thread exits too,
    /// as a zombie leader; the kernel clears this word (CLONE_CHILD_CLEARTID semantics via
    /// set_tid_address) once it no longer uses the plan's stack.
    pub leader_exit_word: u32,
    /// Recreate threads with their original tids (migrate-resume --exact-pids, as root).
    pub exact_tids: u32,
    /// A terminal is now another size: send SIGWINCH once the program runs.
    pub window_changed: u32,
    /// The System V objects migrate-resume recreated (`ipc::Recreated` records): the id table
    /// is rewritten from them after the switch.
    pub sysv_off: u64,
    pub nsysv: u32,
    /// migrate-resume's stderr, for reporting a failure (the program's fd 2 is its own by now).
    pub error_fd: i32,
    /// migrate-resume's readiness pipe (MIGRATE_READY_FD), or -1: told once the tree runs.
    pub ready_fd: i32,
    /// The frame tables of the compressed VMAs, one after the other (u32 words).
    pub frames_off: u64,
    pub nframes: u32,
    /// Where compressed frames are read before they are decoded into place (empty when no
    /// VMA is compressed).
    pub scratch_off: u64,
    pub scratch_len: u64,
    /// Lazy restore (lazy.rs): the page server's mapping (0: eager restore), its userfaultfd,
    /// the address of `lazy::LAZY`, and the ranges the switch reads eagerly in lazy regions.
    pub lazy_server: u64,
    pub lazy_server_len: u64,
    pub lazy_uffd: i32,
    pub lazy_fd_lo: i32,
    pub lazy_fd_hi: i32,
    pub nhot: u32,
    pub lazy_state: u64,
    pub hot_off: u64,
}

impl PlanHeader {
    /// # Safety
    /// `self` must be the header at the start of a plan region built by [`build`].
    pub unsafe fn array<T>(&self, off: u64, n: u32) -> &[T] {
        // SAFETY: build() placed `n` initialised T's at `off` inside the region.
        unsafe {
            core::slice::from_raw_parts((self as *const Self as *const u8).add(off as usize) as *const T, n as usize)
        }
    }
    pub fn keeps(&self) -> &[Range] {
        // SAFETY: see `array`.
        unsafe { self.array(self.keeps_off, self.nkeep) }
    }
    pub fn vmas(&self) -> &[PlanVma] {
        // SAFETY: see `array`.
        unsafe { self.array(self.vmas_off, self.nvmas) }
    }
    pub fn runs(&self) -> &[PlanRun] {
        // SAFETY: see `array`.
        unsafe { self.array(self.runs_off, self.nruns) }
    }
    pub fn threads(&self) -> &[PlanThread] {
        // SAFETY: see `array`.
        unsafe { self.array(self.threads_off, self.nthreads) }
    }
    pub fn fds(&self) -> &[i32] {
        // SAFETY: see `array`.
        unsafe { self.array(self.fds_off, self.nfds) }
    }
    pub fn sysv(&self) -> &[crate::resources::ipc::Recreated] {
        // SAFETY: see `array`.
        unsafe { self.array(self.sysv_off, self.nsysv) }
    }
    pub fn frames(&self) -> &[u32] {
        // SAFETY: see `array`.
        unsafe { self.array(self.frames_off, self.nframes) }
    }
    /// The scratch buffer's address.
    pub fn scratch(&self) -> *mut u8 {
        (self as *const Self as u64 + self.scratch_off) as *mut u8
    }
    pub fn hot(&self) -> &[Range] {
        // SAFETY: see `array`.
        unsafe { self.array(self.hot_off, self.nhot) }
    }
    pub fn image_path(&self) -> &[u8] {
        // SAFETY: see `array`.
        unsafe { self.array(self.path_off, self.path_len as u32) }
    }
}

/// Picks an address range of `len` bytes free in both layouts.
fn free_range(len: u64, busy: &[(u64, u64)]) -> Option<u64> {
    let mut busy = busy.to_vec();
    busy.sort_unstable();
    let mut candidate = 0x1000_0000_0000u64;
    for &(s, e) in &busy {
        if e + 0x10_0000 <= candidate {
            continue;
        }
        if s >= candidate + len + 0x10_0000 {
            break;
        }
        candidate = (e + 0x10_0000).next_multiple_of(0x1000);
    }
    (candidate + len < 0x7f00_0000_0000).then_some(candidate)
}

fn open_high(path: &[u8], flags: i32, min_fd: i32) -> sys::SysResult<i32> {
    let fd = sys::open(path, flags | libc::O_CLOEXEC, 0)?;
    let high = sys::fcntl(fd, libc::F_DUPFD_CLOEXEC, min_fd as usize)? as i32;
    let _ = sys::close(fd);
    Ok(high)
}

/// Where a saved file is on this host: its own path, or the copy migrate-resume extracted from
/// the image (MIGRATE_FILE_MAP: `original\textracted` lines) when the host lacks it.
pub struct FileMap(Vec<(String, String)>);

impl FileMap {
    pub fn from_env() -> Self {
        let text = crate::env::var("MIGRATE_FILE_MAP").unwrap_or_default();
        FileMap(
            text.lines().filter_map(|l| l.split_once('\t')).map(|(a, b)| (String::from(a), String::from(b))).collect(),
        )
    }

    pub fn resolve<'a>(&'a self, path: &'a str) -> &'a str {
        self.0.iter().find(|(orig, _)| orig == path).map_or(path, |(_, copy)| copy.as_str())
    }
}

/// Is the current mapping `m` the saved `v`, byte for byte? migrate-resume has verified the file
/// at the (resolved) path by content, so path, range, protection and offset decide (inode
/// numbers differ between hosts).
fn same_mapping(m: &MapLine, v: &migrate_image::VmaEntry, meta: &ImageMeta, files: &FileMap) -> bool {
    let Some(f) = v.file else { return false };
    let path = files.resolve(&meta.process.files[f as usize].path);
    m.start == v.start && m.end == v.end && m.prot == v.prot && m.offset == v.file_offset && m.name == path
}

/// The reads that fill `v`: its runs, split where pages come from an ancestor image
/// (`ancestor_fds[k]` is ancestor k) rather than from this image's page section at
/// `data_offset`.
fn plan_runs(
    v: &migrate_image::VmaEntry,
    image_fd: i32,
    data_offset: u64,
    ancestor_fds: &[i32],
    out: &mut Vec<PlanRun>,
) -> Result<(), String> {
    for span in v.page_spans() {
        let (fd, offset) = match span.source {
            migrate_image::PageSource::Here { index } => (image_fd, data_offset + index * 4096),
            migrate_image::PageSource::Ancestor { ancestor, offset } => {
                (*ancestor_fds.get(ancestor as usize).ok_or("an ancestor image is not open")?, offset)
            }
        };
        out.push(PlanRun { start: span.first, end: span.end, fd, offset });
    }
    Ok(())
}

pub struct Built {
    pub addr: usize,
    pub stack_top: usize,
    /// A page server was set up (lazy restore); otherwise the caller closes what it opened.
    pub lazy: bool,
}

/// Builds the plan. `image_fd` is the image, open above every saved descriptor, whose pages
/// the caller has verified; the mapped files are opened above every saved descriptor too.
/// Fails (with nothing changed yet in memory) if the layout cannot be restored here.
#[allow(clippy::too_many_arguments)]
pub fn build(
    meta: &ImageMeta,
    proc: u32,
    sections: &[SectionEntry],
    image_path: &[u8],
    image_fd: i32,
    ancestor_fds: &[i32],
    current: &[MapLine],
    shared_maps: &[(u64, i32, u64)],
    sysv: &[crate::resources::ipc::Recreated],
    lazy: Option<&super::lazy::Opened>,
    hashes: &[Vec<u64>],
    frame_tables: &[(u32, Vec<u32>)],
) -> Result<Built, String> {
    let p = &meta.process;
    let file_map = FileMap::from_env();
    // Above every saved descriptor (they are all in place now), under the current limit.
    let min_fd = p.fds.iter().map(|f| f.fd).max().unwrap_or(2) + 1;
    if image_fd < min_fd {
        return Err(format!("the image's descriptor {image_fd} is where a saved descriptor goes"));
    }

    // Which saved mappings are already in place, byte for byte (the binary's and libraries' code).
    let mut keep = alloc::vec![false; p.vmas.len()];
    for (i, v) in p.vmas.iter().enumerate() {
        if v.kind == VmaKind::FilePrivate && v.prot & PROT_WRITE == 0 && v.runs.is_empty() {
            keep[i] = current.iter().any(|m| same_mapping(m, v, meta, &file_map));
        }
    }
    // The switch runs from libmigrate's code: that mapping must be one of the kept ones.
    let here = crate::restore::switch::restorer_main as *const () as u64;
    let code_kept = p.vmas.iter().zip(&keep).any(|(v, &k)| k && v.start <= here && here < v.end);
    if !code_kept {
        return Err("libmigrate.so is not at the address it had in the checkpointed process (the LD_PRELOAD list, \
                    the library build or RLIMIT_STACK differ); resume with the same migrate build and preload list"
            .into());
    }
    // The kernel's special mappings stay where they are; they must be where they were.
    for v in p.vmas.iter().filter(|v| v.kind == VmaKind::Special && v.name != "[vsyscall]") {
        if !current.iter().any(|m| m.name == v.name && m.start == v.start && m.end == v.end) {
            return Err(format!("the kernel placed {} elsewhere than in the checkpointed process; resume on a host with the same kernel", v.name));
        }
    }

    // Descriptors for file-backed mappings that must be mapped anew.
    let mut file_fds: Vec<(u32, i32)> = Vec::new();
    for (i, v) in p.vmas.iter().enumerate() {
        let Some(f) = v.file else { continue };
        if keep[i] || file_fds.iter().any(|&(g, _)| g == f) {
            continue;
        }
        let writable_shared =
            p.vmas.iter().any(|w| w.file == Some(f) && w.kind == VmaKind::FileShared && w.prot & PROT_WRITE != 0);
        let path = file_map.resolve(&p.files[f as usize].path);
        let flags = if writable_shared { libc::O_RDWR } else { libc::O_RDONLY };
        let fd = open_high(&fs::cpath(path.as_bytes()), flags, min_fd)
            .map_err(|e| format!("cannot open mapped file {path}: {e}"))?;
        file_fds.push((f, fd));
    }

    // Plan records.
    let mut vmas = Vec::with_capacity(p.vmas.len());
    let mut runs: Vec<PlanRun> = Vec::new();
    let mut frames: Vec<u32> = Vec::new();
    for (i, v) in p.vmas.iter().enumerate() {
        if v.kind == VmaKind::Special {
            continue;
        }
        let (map_flags, fd) = match v.kind {
            VmaKind::Anon | VmaKind::Heap => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
            VmaKind::Stack => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_GROWSDOWN, -1),
            VmaKind::SharedAnon => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
            VmaKind::FilePrivate | VmaKind::FileShared => {
                let f = v.file.unwrap_or(0);
                let fd = file_fds.iter().find(|&&(g, _)| g == f).map_or(-1, |&(_, fd)| fd);
                (if v.kind == VmaKind::FileShared { libc::MAP_SHARED } else { libc::MAP_PRIVATE }, fd)
            }
            // The new registry that migrate-resume handed down, where the old one was.
            VmaKind::Registry => (libc::MAP_SHARED, crate::tree::REGISTRY_FD),
            VmaKind::Special => unreachable!(),
            // The segment migrate-resume recreated, attached again by the switch.
            VmaKind::SysvShm { id } => {
                let new = crate::resources::ipc::new_shm_id(sysv, id).ok_or_else(|| {
                    format!(
                        "the System V shared memory segment {id} attached at {:#x} was not recreated; resume the \
                         image with migrate-resume",
                        v.start
                    )
                })?;
                let ds = sys::shmctl_stat(new)
                    .map_err(|e| format!("cannot use the recreated System V shared memory segment {new}: {e}"))?;
                vmas.push(PlanVma {
                    start: v.start,
                    end: v.end,
                    prot: v.prot as i32,
                    map_flags: 0,
                    fd: -1,
                    keep: 0,
                    file_offset: v.file_offset,
                    first_run: runs.len() as u32,
                    nruns: 0,
                    shm_id: new,
                    shm_size: ds.shm_segsz as u64,
                    first_frame: 0,
                    nframes: 0,
                    frames_offset: 0,
                    lazy: 0,
                    index: i as u32,
                });
                continue;
            }
        };
        // Memory shared with other processes of the tree: the handed-down object, not a copy.
        if let Some(&(_, fd, offset)) = shared_maps.iter().find(|m| m.0 == v.start) {
            vmas.push(PlanVma {
                start: v.start,
                end: v.end,
                prot: v.prot as i32,
                map_flags: libc::MAP_SHARED,
                fd,
                keep: 0,
                file_offset: offset,
                first_run: runs.len() as u32,
                nruns: 0,
                shm_id: -1,
                shm_size: 0,
                first_frame: 0,
                nframes: 0,
                frames_offset: 0,
                lazy: 0,
                index: i as u32,
            });
            continue;
        }
        let want = SectionKind::Pages { proc, vma: i as u32 };
        let data_offset = match sections.iter().find(|s| s.kind == want) {
            Some(s) => s.offset,
            None if v.stored_pages() > 0 => {
                return Err(format!("no page data for mapping {:#x}-{:#x}", v.start, v.end))
            }
            None => 0,
        };
        let first_frame = frames.len() as u32;
        if v.compression == PageCompression::Lz4 && !v.runs.is_empty() {
            let Some((_, table)) = frame_tables.iter().find(|(k, _)| *k == i as u32) else {
                return Err(format!("no frame table for the compressed mapping {:#x}-{:#x}", v.start, v.end));
            };
            frames.extend_from_slice(table);
        }
        // Lazily: private anonymous memory (not the main stack, which the kernel reads for
        // /proc/PID/cmdline), readable and writable, with enough stored pages to matter.
        let stored = v.data_pages();
        let rw = libc::PROT_READ as u32 | PROT_WRITE;
        // (Compressed pages are decoded by the switch: never lazily.)
        let lazy_vma = lazy.is_some()
            && v.compression == PageCompression::None
            && matches!(v.kind, VmaKind::Anon | VmaKind::Heap)
            && v.prot & rw == rw
            && stored >= super::lazy::MIN_PAGES;
        let first_run = runs.len() as u32;
        plan_runs(v, image_fd, data_offset, ancestor_fds, &mut runs)?;
        vmas.push(PlanVma {
            start: v.start,
            end: v.end,
            prot: v.prot as i32,
            map_flags,
            fd,
            keep: keep[i] as u32,
            file_offset: v.file_offset,
            first_run,
            nruns: runs.len() as u32 - first_run,
            shm_id: -1,
            shm_size: 0,
            first_frame,
            nframes: frames.len() as u32 - first_frame,
            frames_offset: data_offset,
            lazy: lazy_vma as u32,
            index: i as u32,
        });
    }
    let main_vtid = p.vpid;
    let threads: Vec<PlanThread> = p
        .threads
        .iter()
        .map(|t| PlanThread {
            fs_base: t.fs_base,
            tid_address: t.tid_address,
            robust_list: t.robust_list,
            robust_len: t.robust_list_len,
            resume_sp: t.resume_sp,
            is_main: (t.vtid == main_vtid) as u32,
            new_tid: 0,
            vtid: t.vtid,
        })
        .collect();
    if threads.iter().filter(|t| t.is_main != 0).count() > 1 {
        return Err("the image has two main threads".into());
    }
    let mut fds: Vec<i32> =
        file_fds.iter().map(|&(_, fd)| fd).chain([image_fd]).chain(ancestor_fds.iter().copied()).collect();
    for &(_, fd, _) in shared_maps {
        if !fds.contains(&fd) {
            fds.push(fd);
        }
    }

    // Lazy restore: the pages the restored threads touch at once (each one's saved context, the
    // handler frames and signal frame above it) and `lazy::LAZY`, which the switch writes, are
    // read eagerly; the page server gets the rest.
    let mut busy: Vec<(u64, u64)> = current.iter().map(|m| (m.start, m.end)).collect();
    busy.extend(p.vmas.iter().map(|v| (v.start, v.end)));
    let mut hot: Vec<Range> = Vec::new();
    let mut server = None;
    if let Some(o) = lazy.filter(|_| vmas.iter().any(|v| v.lazy != 0)) {
        let state = super::lazy::state_addr() & !4095;
        hot.push(Range { start: state, end: state + 4096 });
        for t in &threads {
            let sp = t.resume_sp & !4095;
            hot.push(Range { start: sp.saturating_sub(4096), end: sp + super::lazy::HOT_STACK });
        }
        let regions: Vec<super::lazy::LazyRegion> = vmas
            .iter()
            .filter(|v| v.lazy != 0)
            .map(|v| super::lazy::LazyRegion {
                start: v.start,
                end: v.end,
                runs: &runs[v.first_run as usize..(v.first_run + v.nruns) as usize],
                hashes: hashes.get(v.index as usize).map_or(&[][..], |h| &h[..]),
            })
            .collect();
        let built = super::lazy::build_server(o, &regions, &hot, image_path, |len| {
            let a = free_range(len, &busy)?;
            busy.push((a, a + len));
            Some(a)
        });
        match built {
            Ok(b) => server = Some(b),
            Err(e) => {
                super::warn_lazy(&e);
                vmas.iter_mut().for_each(|v| v.lazy = 0);
                hot.clear();
            }
        }
    }
    if lazy.is_some() {
        // migrate-resume verified everything but the pages: the ones read eagerly are checked
        // now (the page server checks the others as it brings them in).
        let image = String::from_utf8_lossy(image_path);
        super::lazy::verify_eager(&vmas, &runs, hashes, &hot, &image)?;
    }

    // Lay the region out.
    let hdr = core::mem::size_of::<PlanHeader>() as u64;
    let align = |x: u64| x.next_multiple_of(64);
    let keeps_count = keep.iter().filter(|&&k| k).count() + current.iter().filter(|m| m.is_special()).count() + 1 + 4;
    let keeps_off = align(hdr);
    let vmas_off = align(keeps_off + (keeps_count * core::mem::size_of::<Range>()) as u64);
    let runs_off = align(vmas_off + (vmas.len() * core::mem::size_of::<PlanVma>()) as u64);
    let threads_off = align(runs_off + (runs.len() * core::mem::size_of::<PlanRun>()) as u64);
    let fds_off = align(threads_off + (threads.len() * core::mem::size_of::<PlanThread>()) as u64);
    let auxv_off = align(fds_off + (fds.len() * 4) as u64);
    let sysv_off = align(auxv_off + (p.auxv.len() * 8) as u64);
    let hot_off = align(sysv_off + core::mem::size_of_val(sysv) as u64);
    let frames_off = align(hot_off + (hot.len() * core::mem::size_of::<Range>()) as u64);
    let path_off = align(frames_off + (frames.len() * 4) as u64);
    let scratch_off = align(path_off + image_path.len() as u64).next_multiple_of(4096);
    let scratch_len = if frames.is_empty() { 0 } else { SCRATCH_SIZE as u64 };
    let data_len = scratch_off + scratch_len;
    let region_len = data_len + STACK_SIZE as u64;

    let addr = free_range(region_len, &busy).ok_or("no free address range for the restore plan")?;
    let got = sys::mmap(
        addr as usize,
        region_len as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
        -1,
        0,
    )
    .map_err(|e| format!("cannot map the restore plan: {e}"))?;
    if got as u64 != addr {
        return Err("the restore plan landed at the wrong address".into());
    }

    let mut keeps: Vec<Range> =
        p.vmas.iter().zip(&keep).filter(|(_, &k)| k).map(|(v, _)| Range { start: v.start, end: v.end }).collect();
    keeps.extend(current.iter().filter(|m| m.is_special()).map(|m| Range { start: m.start, end: m.end }));
    keeps.push(Range { start: addr, end: addr + region_len });
    if let Some(b) = &server {
        keeps.extend(b.mappings.iter().map(|&(start, end)| Range { start, end }));
    }
    keeps.sort_unstable_by_key(|r| r.start);

    let mm = &p.mm;
    let header = PlanHeader {
        magic: PLAN_MAGIC,
        region_start: addr,
        region_len,
        image_fd,
        nfds: fds.len() as u32,
        nkeep: keeps.len() as u32,
        nvmas: vmas.len() as u32,
        nruns: runs.len() as u32,
        nthreads: threads.len() as u32,
        keeps_off,
        vmas_off,
        runs_off,
        threads_off,
        fds_off,
        auxv_off,
        auxv_len: p.auxv.len() as u64,
        path_off,
        path_len: image_path.len() as u64,
        mm: PrctlMmMap {
            start_code: mm.start_code,
            end_code: mm.end_code,
            start_data: mm.start_data,
            end_data: mm.end_data,
            start_brk: mm.start_brk,
            brk: mm.brk,
            start_stack: mm.start_stack,
            arg_start: mm.arg_start,
            arg_end: mm.arg_end,
            env_start: mm.env_start,
            env_end: mm.env_end,
            auxv: addr + auxv_off,
            auxv_size: (p.auxv.len() * 8) as u32,
            exe_fd: u32::MAX,
        },
        stack_top: addr + region_len,
        leader_exit_word: 1,
        exact_tids: crate::env::var("MIGRATE_EXACT_PIDS").is_some_and(|v| v == "1") as u32,
        window_changed: crate::resources::files::WINDOW_CHANGED.load(core::sync::atomic::Ordering::Relaxed) as u32,
        sysv_off,
        nsysv: sysv.len() as u32,
        error_fd: super::ERROR_FD.load(core::sync::atomic::Ordering::Relaxed),
        ready_fd: super::READY_FD.load(core::sync::atomic::Ordering::Relaxed),
        frames_off,
        nframes: frames.len() as u32,
        scratch_off,
        scratch_len,
        lazy_server: server.as_ref().map_or(0, |b| b.addr),
        lazy_server_len: server.as_ref().map_or(0, |b| b.len),
        lazy_uffd: server.as_ref().and(lazy).map_or(-1, |o| o.uffd),
        lazy_fd_lo: server.as_ref().map_or(-1, |b| b.fd_lo),
        lazy_fd_hi: server.as_ref().map_or(-1, |b| b.fd_hi),
        nhot: hot.len() as u32,
        lazy_state: super::lazy::state_addr(),
        hot_off,
    };
    // SAFETY: the region is freshly mapped, writable, and large enough for every array at the
    // offsets computed above; all records are plain data.
    unsafe {
        let base = addr as *mut u8;
        core::ptr::write(base as *mut PlanHeader, header);
        core::ptr::copy_nonoverlapping(keeps.as_ptr(), base.add(keeps_off as usize) as *mut Range, keeps.len());
        core::ptr::copy_nonoverlapping(vmas.as_ptr(), base.add(vmas_off as usize) as *mut PlanVma, vmas.len());
        core::ptr::copy_nonoverlapping(runs.as_ptr(), base.add(runs_off as usize) as *mut PlanRun, runs.len());
        core::ptr::copy_nonoverlapping(
            threads.as_ptr(),
            base.add(threads_off as usize) as *mut PlanThread,
            threads.len(),
        );
        core::ptr::copy_nonoverlapping(fds.as_ptr(), base.add(fds_off as usize) as *mut i32, fds.len());
        core::ptr::copy_nonoverlapping(p.auxv.as_ptr(), base.add(auxv_off as usize) as *mut u64, p.auxv.len());
        core::ptr::copy_nonoverlapping(
            sysv.as_ptr(),
            base.add(sysv_off as usize) as *mut crate::resources::ipc::Recreated,
            sysv.len(),
        );
        core::ptr::copy_nonoverlapping(hot.as_ptr(), base.add(hot_off as usize) as *mut Range, hot.len());
        core::ptr::copy_nonoverlapping(image_path.as_ptr(), base.add(path_off as usize), image_path.len());
        core::ptr::copy_nonoverlapping(frames.as_ptr(), base.add(frames_off as usize) as *mut u32, frames.len());
    }
    Ok(Built { addr: addr as usize, stack_top: (addr + region_len) as usize, lazy: server.is_some() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use migrate_image::{InheritedRun, VmaEntry, VmaKind};

    fn vma(runs: Vec<(u64, u64)>, inherited: Vec<InheritedRun>) -> VmaEntry {
        VmaEntry {
            start: 0x10000,
            end: 0x10000 + 16 * 4096,
            prot: 3,
            kind: VmaKind::Anon,
            file: None,
            file_offset: 0,
            name: String::new(),
            vm_flags: String::new(),
            runs,
            inherited,
            data_section: None,
            compression: migrate_image::PageCompression::None,
        }
    }

    fn triples(runs: &[PlanRun]) -> Vec<(u64, u64, i32, u64)> {
        runs.iter().map(|r| (r.start, r.end, r.fd, r.offset)).collect()
    }

    #[test]
    fn a_full_image_reads_every_run_from_its_own_section_in_order() {
        let mut out = Vec::new();
        plan_runs(&vma(vec![(0, 2), (5, 3)], vec![]), 7, 8192, &[], &mut out).unwrap();
        assert_eq!(triples(&out), vec![(0, 2, 7, 8192), (5, 8, 7, 8192 + 2 * 4096)]);
    }

    #[test]
    fn inherited_pages_are_read_from_their_ancestor_and_the_rest_from_the_section() {
        let inherited = vec![
            InheritedRun { first: 1, count: 2, ancestor: 0, offset: 40960 },
            InheritedRun { first: 5, count: 1, ancestor: 1, offset: 4096 },
            InheritedRun { first: 7, count: 1, ancestor: 0, offset: 0 },
        ];
        let mut out = Vec::new();
        plan_runs(&vma(vec![(0, 4), (5, 3)], inherited), 7, 1 << 20, &[20, 21], &mut out).unwrap();
        assert_eq!(
            triples(&out),
            vec![
                (0, 1, 7, 1 << 20),
                (1, 3, 20, 40960),
                (3, 4, 7, (1 << 20) + 4096),
                (5, 6, 21, 4096),
                (6, 7, 7, (1 << 20) + 2 * 4096),
                (7, 8, 20, 0),
            ]
        );
        // An ancestor the restore did not open is an error, never a read from elsewhere.
        let mut out = Vec::new();
        let one = vec![InheritedRun { first: 0, count: 1, ancestor: 3, offset: 0 }];
        assert!(plan_runs(&vma(vec![(0, 1)], one), 7, 0, &[20], &mut out).is_err());
    }
}
