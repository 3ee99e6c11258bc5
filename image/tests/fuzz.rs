//! Fuzzing the image parser on stable Rust: images are untrusted input.
//!
//! Real images are built with the crate's own `ImageWriter` (two processes, pages, a deleted
//! file's contents, shared memory, a tree section), then damaged in four ways:
//!
//! - raw bytes: bit flips, byte changes, truncations, extensions, insertions, removals, 64-bit
//!   words (lengths, offsets) set to extreme values, bytes copied from elsewhere in the file,
//!   and whole files of garbage. Checksums are left as they are, so *any* change must be
//!   refused by `open` + `verify_all`;
//! - the container fixed up: the section table edited (entries out of range, huge, overlapping,
//!   duplicated, removed, kinds changed) or the trailer/header words changed, with every
//!   checksum recomputed, so the structural checks behind the checksums are reached;
//! - a section's contents edited (garbage postcard inside a valid container) and written again
//!   with a correct checksum;
//! - the decoded metadata edited field by field (indices, ranges, page runs, kinds) and
//!   re-encoded, for `validate` and the cross-checks against the section table.
//!
//! Every public read path runs on each result (`open`, `sections`, `tree`, `process_meta` in
//! and out of range, `meta`, `read_section` in and out of range, `verify_all`,
//! `verify_sections`) and must not panic; every error must be an `ImageError` other than `Io`
//! that names the file; no single allocation may exceed 16 MiB (a global allocator counts and
//! refuses larger ones: the test images are under 64 KiB, so only a length taken from the file
//! without checking it could ask for that much); and what the resume and the restore index
//! with (page runs against their section, file and descriptor indices) stays in range whenever
//! the reader accepts the image.
//!
//! Bounded by default (a fixed seed and a few thousand cases, a few seconds in debug). A longer
//! campaign:
//!
//! ```text
//! MIGRATE_FUZZ_CASES=200000 MIGRATE_FUZZ_SEED=$RANDOM cargo test --release -p migrate-image --test fuzz
//! ```
//!
//! A failure prints the smallest mutation proptest found and the seed that reproduces it.

use migrate_image::format::{MAX_METADATA_LEN, TRAILER_MAGIC};
use migrate_image::*;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::xxh3_64;

// ---------------------------------------------------------------------------------------------
// Allocation guard

/// Larger than anything a test image (under 64 KiB) or `verify_all`'s buffers (4 MiB) need.
const MAX_ONE_ALLOCATION: usize = 16 << 20;

thread_local! {
    /// Largest refused request made on this thread (0: none).
    static REFUSED: Cell<usize> = const { Cell::new(0) };
}

struct Guard;

impl Guard {
    fn allowed(size: usize) -> bool {
        if size <= MAX_ONE_ALLOCATION {
            return true;
        }
        let _ = REFUSED.try_with(|r| r.set(r.get().max(size)));
        false
    }
}

// SAFETY: every call is passed to the system allocator unchanged, except requests above the
// limit, which fail with a null pointer as an allocator may.
unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Guard::allowed(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Guard::allowed(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !Guard::allowed(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded; `ptr` came from `System` with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GUARD: Guard = Guard;

fn take_refused() -> usize {
    REFUSED.with(|r| r.replace(0))
}

// ---------------------------------------------------------------------------------------------
// Valid images

fn file(path: &str, hash: Option<u64>) -> FileIdentity {
    FileIdentity { path: path.into(), dev: 2049, ino: 1234, size: 99_000, mtime_ns: 1_700_000_000, hash }
}

fn vma(start: u64, pages: u64, kind: VmaKind, file: Option<u32>, runs: Vec<(u64, u64)>) -> VmaEntry {
    VmaEntry {
        start,
        end: start + pages * PAGE_SIZE,
        prot: PROT_READ | if file.is_some() { PROT_EXEC } else { PROT_WRITE },
        kind,
        file,
        file_offset: 0,
        name: if file.is_some() { "/usr/bin/prog".into() } else { String::new() },
        vm_flags: String::new(),
        runs,
        inherited: vec![],
        data_section: None,
        compression: PageCompression::None,
    }
}

fn thread(vtid: i32, checkpoint: bool) -> ThreadEntry {
    ThreadEntry {
        vtid,
        is_checkpoint_thread: checkpoint,
        fs_base: 0x7fff_f7d8_a740,
        tid_address: 0x7fff_f7d8_aa10,
        robust_list: 0x7fff_f7d8_aa20,
        robust_list_len: 24,
        resume_sp: 0x7fff_ffff_d000,
        name: "worker".into(),
        affinity: vec![3],
        pending: vec![SigInfoEntry { signo: 10, info: vec![7; 128] }],
    }
}

fn tcp() -> TcpConnection {
    TcpConnection {
        send_seq: 1000,
        recv_seq: 2000,
        send_queue: b"unacked".to_vec(),
        unsent: 2,
        recv_queue: b"unread".to_vec(),
        mss: 1460,
        snd_wscale: 7,
        rcv_wscale: 7,
        options: 7,
        timestamp: 12345,
        window: [1, 2, 3, 4, 5],
    }
}

/// Metadata of process `proc` of the sample tree: its VMAs store pages as `pages_of` says.
fn sample_meta(proc: u32) -> ImageMeta {
    let vpid = 100 + proc as i32;
    let mut vmas = vec![
        vma(0x40_0000, 4, VmaKind::FilePrivate, Some(0), vec![]),
        // Page 1 is held by the parent image (an incremental image).
        VmaEntry {
            inherited: vec![InheritedRun { first: 1, count: 1, ancestor: 0, offset: 8192 }],
            ..vma(0x60_0000, 8, VmaKind::Anon, None, vec![(0, 2), (5, 1)])
        },
        vma(0x80_0000, 2, VmaKind::Heap, None, vec![(1, 1)]),
        vma(0x7fff_f000_0000, 1, VmaKind::Registry, None, vec![]),
        vma(0x7fff_f100_0000, 2, VmaKind::SysvShm { id: 7 }, None, vec![]),
        vma(0x7fff_fffd_d000, 4, VmaKind::Stack, None, vec![(2, 2)]),
        vma(0xffff_ffff_ff60_0000, 1, VmaKind::Special, None, vec![]),
    ];
    vmas[6].name = "[vsyscall]".into();
    if proc == 1 {
        vmas.truncate(3);
    }
    let mut fds = vec![
        FdEntry { fd: 0, cloexec: false, shares_with: None, kind: FdKind::Inherited { what: "pipe".into(), flags: 0 } },
        FdEntry {
            fd: 1,
            cloexec: false,
            shares_with: None,
            kind: FdKind::Terminal {
                what: "/dev/pts/0".into(),
                flags: 2,
                termios: vec![1; 60],
                rows: 24,
                cols: 80,
                foreground_vpgid: vpid,
            },
        },
        FdEntry {
            fd: 2,
            cloexec: false,
            shares_with: Some(1),
            kind: FdKind::Inherited { what: "dup".into(), flags: 2 },
        },
        FdEntry { fd: 3, cloexec: true, shares_with: None, kind: FdKind::Regular { file: 1, flags: 2, pos: 17 } },
        FdEntry { fd: 4, cloexec: true, shares_with: None, kind: FdKind::Deleted { file: 2, flags: 2, pos: 5 } },
        FdEntry {
            fd: 5,
            cloexec: false,
            shares_with: None,
            kind: FdKind::Pipe { pipe: 77, write_end: false, flags: 0, capacity: 65536, data: b"in flight".to_vec() },
        },
        FdEntry {
            fd: 6,
            cloexec: false,
            shares_with: None,
            kind: FdKind::Socket {
                domain: 2,
                sock_type: 1,
                protocol: 0,
                flags: 2,
                listening: false,
                backlog: 0,
                local: vec![2, 0, 0x1f, 0x90, 127, 0, 0, 1],
                peer: Some(vec![2, 0, 0x1f, 0x91, 127, 0, 0, 1]),
                options: vec![(1, 2, 1)],
                waiting: 0,
                tcp: Some(tcp()),
                queued: vec![QueuedConnection { local: vec![2, 0], peer: vec![2, 1], tcp: tcp() }],
            },
        },
        FdEntry {
            fd: 7,
            cloexec: true,
            shares_with: None,
            kind: FdKind::Epoll { flags: 0, targets: vec![(6, 1, 42)] },
        },
        FdEntry {
            fd: 8,
            cloexec: true,
            shares_with: None,
            kind: FdKind::Inotify {
                flags: 0,
                watches: vec![
                    InotifyWatch { wd: 1, path: "/tmp/a".into(), mask: 0x100 },
                    InotifyWatch { wd: 4, path: "/tmp/b".into(), mask: 0x200 },
                ],
            },
        },
        FdEntry {
            fd: 9,
            cloexec: true,
            shares_with: None,
            kind: FdKind::EventFd { count: 3, semaphore: false, flags: 0 },
        },
    ];
    if proc == 1 {
        fds.truncate(4);
    }
    ImageMeta {
        host: HostEntry {
            hostname: "source".into(),
            boot_id: "0b5c3f5e-0000-4000-8000-000000000000".into(),
            kernel_release: "6.18.0".into(),
            tool_version: "0.1.0".into(),
            created_unix_ns: 1_700_000_000_000_000_000,
            cpu: CpuEntry { vendor: "AuthenticAMD".into(), xfeatures: 0x207, xsave_size: 2696 },
            vdso_hash: 0xdead_beef,
            vdso_len: 8192,
            clocks: ClockEntry { monotonic_ns: 1, boottime_ns: 2, realtime_ns: 3 },
        },
        process: ProcessEntry {
            vpid,
            vppid: if proc == 0 { 1 } else { 100 },
            vpgid: 100,
            vsid: 100,
            exe: 0,
            libmigrate: 1,
            ld_preload: "/usr/lib/libmigrate.so".into(),
            argv: vec!["prog".into(), "--serve".into()],
            personality: 0x40000,
            cwd: "/srv".into(),
            umask: 0o22,
            rlimits: vec![RlimitEntry { resource: 7, cur: 1024, max: 4096 }],
            mm: MmEntry { start_brk: 0x80_0000, brk: 0x80_2000, ..Default::default() },
            auxv: vec![6, 4096, 0, 0],
            files: vec![
                file("/usr/bin/prog", Some(1)),
                file("/usr/lib/libmigrate.so", Some(2)),
                file("/tmp/scratch", None),
            ],
            vmas,
            threads: vec![thread(vpid, false), thread(vpid + 1000, true)],
            fds,
            signals: SignalsEntry {
                actions: vec![SigActionEntry {
                    signo: 10,
                    handler: 0x40_1000,
                    flags: 0x0400_0000,
                    restorer: 0,
                    mask: 0,
                }],
                shared_pending: vec![SigInfoEntry { signo: 15, info: vec![0; 128] }],
                checkpoint_signal: 12,
            },
            pids: vec![(vpid, 4242 + proc as i32)],
            timers: TimersEntry {
                itimers: vec![ItimerEntry { which: 0, value_ns: 5, interval_ns: 10 }],
                posix: vec![PosixTimerEntry {
                    id: 0,
                    clock: 1,
                    notify: 0,
                    signo: 14,
                    sival: 0,
                    target_vtid: 0,
                    value_ns: 1,
                    interval_ns: 0,
                }],
            },
        },
    }
}

fn sample_tree(processes: u32) -> TreeMeta {
    TreeMeta {
        processes: (0..processes)
            .map(|k| TreeProcess { vpid: 100 + k as i32, vppid: if k == 0 { 1 } else { 100 }, vpgid: 100, vsid: 100 })
            .collect(),
        zombies: vec![ZombieEntry { vpid: 300, vppid: 100, vpgid: 100, status: 256 }],
        shared: vec![
            SharedEntry {
                object: SharedObject::Memory { size: PAGE_SIZE * 2, mappings: vec![(0, 0x7fff_f200_0000, 0)] },
                holders: vec![],
            },
            SharedEntry {
                object: SharedObject::Pipe { pipe: 9, write_end: true, flags: 1, capacity: 4096, data: vec![] },
                holders: vec![(0, 10), (processes - 1, 10)],
            },
        ],
        shared_fd_base: 20,
        sysv: vec![
            SysvObject::Shm { id: 7, key: 0x1234, mode: 0o600, size: 8192, contents: vec![5; 64] },
            SysvObject::Msg { id: 8, key: 0x1235, mode: 0o600, messages: vec![(1, b"hi".to_vec())] },
        ],
        network_lock: "migrate_lock_1".into(),
        image_id: 0x1234_5678_9abc_def0,
        ancestors: vec![AncestorRef { file: "parent-1.mig".into(), image_id: 0x0fed_cba9_8765_4321 }],
    }
}

/// Page bytes that differ from page to page, so moved or swapped data is never equal.
fn pages(seed: u64, count: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((count * PAGE_SIZE) as usize);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while out.len() < (count * PAGE_SIZE) as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// One section to write: kind, bytes, page-aligned.
type Part = (SectionKind, Vec<u8>, bool);

/// The sections of a valid tree of `processes` (1 or 2) processes, in the order
/// libmigrate writes them: each process's pages, its deleted file's contents and its metadata,
/// then the shared memory and the tree.
fn sample_parts(processes: u32) -> Vec<Part> {
    let mut parts = Vec::new();
    for proc in 0..processes {
        let meta = sample_meta(proc);
        for (i, v) in meta.process.vmas.iter().enumerate() {
            if !v.runs.is_empty() {
                let kind = SectionKind::Pages { proc, vma: i as u32 };
                let bytes = pages(u64::from(proc) * 64 + i as u64, v.stored_pages());
                // One hash per page with data, the inherited ones included.
                let mut hashes: Vec<u8> =
                    bytes.chunks(PAGE_SIZE as usize).flat_map(|p| migrate_image::page_hash(p).to_le_bytes()).collect();
                hashes.resize((v.data_pages() * 8) as usize, 0x5a);
                parts.push((kind, bytes, true));
                parts.push((SectionKind::PageHashes { proc, vma: i as u32 }, hashes, false));
            }
        }
        if proc == 0 {
            parts.push((SectionKind::FileContents { proc, file: 2 }, b"deleted but open".to_vec(), true));
        }
        parts.push((SectionKind::Meta { proc }, postcard::to_allocvec(&meta).unwrap(), false));
    }
    parts.push((SectionKind::Shared { object: 0 }, pages(999, 2), true));
    parts.push((SectionKind::Tree, postcard::to_allocvec(&sample_tree(processes)).unwrap(), false));
    parts
}

fn assemble(parts: &[Part]) -> Vec<u8> {
    let mut w = ImageWriter::new(Vec::new(), parts.len()).unwrap();
    for (kind, bytes, aligned) in parts {
        w.add_section_bytes(*kind, bytes, *aligned).unwrap();
    }
    w.finish().unwrap().0
}

/// The table of a well-formed image, and where it starts.
fn split(image: &[u8]) -> (u64, Vec<SectionEntry>) {
    let t = &image[image.len() - 40..];
    let offset = u64::from_le_bytes(t[0..8].try_into().unwrap());
    let len = u64::from_le_bytes(t[8..16].try_into().unwrap());
    let table = &image[offset as usize..(offset + len) as usize];
    (offset, postcard::from_bytes(table).unwrap())
}

/// `data` (header and data area) followed by a table of `entries` and a trailer, every
/// checksum correct.
fn with_table(data: &[u8], entries: &[SectionEntry]) -> Vec<u8> {
    let table = postcard::to_allocvec(entries).unwrap();
    let mut out = data.to_vec();
    let table_offset = out.len() as u64;
    out.extend_from_slice(&table);
    out.extend_from_slice(&trailer(table_offset, table.len() as u64, xxh3_64(&table)));
    out
}

fn trailer(table_offset: u64, table_len: u64, table_sum: u64) -> [u8; 40] {
    let mut t = [0u8; 40];
    t[0..8].copy_from_slice(&table_offset.to_le_bytes());
    t[8..16].copy_from_slice(&table_len.to_le_bytes());
    t[16..24].copy_from_slice(&table_sum.to_le_bytes());
    let sum = xxh3_64(&t[0..24]);
    t[24..32].copy_from_slice(&sum.to_le_bytes());
    t[32..40].copy_from_slice(&TRAILER_MAGIC);
    t
}

// ---------------------------------------------------------------------------------------------
// Running every read path

/// A file of our own in the temp directory, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let name = format!("migrate-fuzz-{}-{tag}.mig", std::process::id());
        Scratch(std::env::temp_dir().join(name))
    }
    fn write(&self, bytes: &[u8]) -> &Path {
        std::fs::write(&self.0, bytes).unwrap();
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An error must be one of the image's own, name the file, and say something.
fn check_error(path: &Path, what: &str, e: &ImageError) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    prop_assert!(
        !matches!(e, ImageError::Io { .. } | ImageError::Encode(_) | ImageError::Write(_)),
        "{what}: a damaged image must give an image error, not {msg}"
    );
    prop_assert!(msg.contains(&*path.to_string_lossy()), "{what}: the error does not name the file: {msg}");
    prop_assert!(msg.len() > path.as_os_str().len() + 10, "{what}: the error says nothing: {msg}");
    Ok(())
}

macro_rules! check {
    ($path:expr, $what:expr, $r:expr) => {
        match $r {
            Ok(v) => Some(v),
            Err(e) => {
                check_error($path, &$what, &e)?;
                None
            }
        }
    };
}

/// What a read of the whole image accepted.
#[derive(Default)]
struct Outcome {
    opened: bool,
    verified: bool,
    /// The tree, and at least one process's metadata, were accepted.
    tree: bool,
    meta: bool,
}

/// Runs every public read path on the image at `path` of `len` bytes.
fn read_everything(path: &Path, len: u64) -> Result<Outcome, TestCaseError> {
    let mut out = Outcome::default();
    let Some(r) = check!(path, "open", ImageReader::open(path)) else { return Ok(out) };
    out.opened = true;
    prop_assert_eq!(r.len(), len);
    let sections = r.sections().to_vec();
    // Every section lies in the data area (the restore reads from these offsets), none shares a
    // byte or a kind with another (all readers take the first of a kind).
    for (i, s) in sections.iter().enumerate() {
        prop_assert!(s.offset >= HEADER_LEN && s.offset.checked_add(s.length).is_some_and(|e| e <= len - 40));
        for t in &sections[i + 1..] {
            prop_assert!(s.kind != t.kind, "two sections hold {:?}", s.kind);
            let apart =
                s.length == 0 || t.length == 0 || s.offset + s.length <= t.offset || t.offset + t.length <= s.offset;
            prop_assert!(apart, "sections overlap: {:?} and {:?}", s, t);
        }
    }
    let tree = check!(path, "tree", r.tree());
    let n = tree.as_ref().map_or(2, |t| t.processes.len() as u32);
    if let Some(t) = &tree {
        prop_assert!(!t.processes.is_empty());
        for e in &t.shared {
            prop_assert!(e.holders.iter().all(|&(p, fd)| (p as usize) < t.processes.len() && fd >= 0));
        }
    }
    out.tree = tree.is_some();
    for k in (0..n.min(4)).chain([n, n + 1, u32::MAX]) {
        if let Some(m) = check!(path, format!("process_meta({k})"), r.process_meta(k)) {
            check_meta(&sections, k, &m)?;
            out.meta = true;
        }
    }
    check!(path, "meta", r.meta());
    for (i, s) in sections.iter().enumerate() {
        if let Some(bytes) = check!(path, format!("read_section({i})"), r.read_section(i)) {
            prop_assert_eq!(bytes.len() as u64, s.length);
            let mut hasher = SectionHasher::new(s.kind);
            hasher.update(&bytes);
            prop_assert_eq!(hasher.digest(), s.checksum);
        }
    }
    check!(path, "read_section(len)", r.read_section(sections.len()));
    check!(path, "read_section(MAX)", r.read_section(usize::MAX));
    let mut buf = [0u8; 1000];
    check!(path, "verify_sections", r.verify_sections(|_| true, &mut buf));
    check!(path, "verify_sections(empty buffer)", r.verify_sections(|s| s.length < 100, &mut []));
    out.verified = check!(path, "verify_all", r.verify_all()).is_some();
    Ok(out)
}

/// What the resume and the restore index with, for metadata the reader accepted.
fn check_meta(sections: &[SectionEntry], proc: u32, m: &ImageMeta) -> Result<(), TestCaseError> {
    let p = &m.process;
    let nfiles = p.files.len();
    prop_assert!((p.exe as usize) < nfiles && (p.libmigrate as usize) < nfiles);
    prop_assert!(!p.threads.is_empty());
    for f in &p.fds {
        if let FdKind::Regular { file, .. } | FdKind::Deleted { file, .. } = f.kind {
            prop_assert!((file as usize) < nfiles);
        }
        prop_assert!(f.shares_with.is_none_or(|s| (s as usize) < p.fds.len()));
    }
    for (i, v) in p.vmas.iter().enumerate() {
        prop_assert!(v.start < v.end && v.start % PAGE_SIZE == 0 && v.end % PAGE_SIZE == 0);
        prop_assert!(v.file.is_none_or(|f| (f as usize) < nfiles));
        // The plan maps file kinds from their file, and never writes pages over what the
        // kernel, the file, the new registry or a System V segment provides.
        prop_assert!(v.file.is_some() || !matches!(v.kind, VmaKind::FilePrivate | VmaKind::FileShared));
        let provided =
            matches!(v.kind, VmaKind::Special | VmaKind::FileShared | VmaKind::Registry | VmaKind::SysvShm { .. });
        prop_assert!(!provided || v.runs.is_empty(), "vma {} ({:?}) has pages", i, v.kind);
        let pages = (v.end - v.start) / PAGE_SIZE;
        for &(first, count) in &v.runs {
            prop_assert!(count > 0 && first.checked_add(count).is_some_and(|e| e <= pages));
        }
        for r in &v.inherited {
            // Inherited pages are pages of the runs (the plan splits the runs at them).
            let inside =
                v.runs.iter().any(|&(f, c)| f <= r.first && r.first.checked_add(r.count).is_some_and(|e| e <= f + c));
            prop_assert!(inside && r.count > 0, "vma {} inherits pages outside its runs", i);
        }
        if !v.runs.is_empty() {
            // The switch preads stored_pages() pages from the section's offset on.
            let s = sections.iter().find(|s| s.kind == SectionKind::Pages { proc, vma: i as u32 });
            prop_assert!(s.is_some_and(|s| s.length == v.stored_pages() * PAGE_SIZE), "vma {} outruns its pages", i);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Mutations

/// 64-bit values that break lengths and offsets.
fn extreme() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(39),
        Just(40),
        Just(4095),
        Just(4096),
        Just(4097),
        Just(MAX_METADATA_LEN),
        Just(MAX_METADATA_LEN + 1),
        Just(1 << 32),
        Just(1 << 40),
        Just(i64::MAX as u64),
        Just(u64::MAX - 4095),
        Just(u64::MAX - 39),
        Just(u64::MAX),
        any::<u64>(),
        0u64..200_000,
    ]
}

#[derive(Debug, Clone)]
enum Raw {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Truncate(Index),
    Extend(Vec<u8>),
    Insert(Index, Vec<u8>),
    Remove(Index, u16),
    Word(Index, u64),
    /// One of the trailer's five words (counted from its start).
    TrailerWord(u8, u64),
    /// Copies `n` bytes from one place in the file to another.
    Copy(Index, Index, u16),
}

fn raw() -> impl Strategy<Value = Raw> {
    prop_oneof![
        4 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Raw::FlipBit(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, v)| Raw::SetByte(i, v)),
        1 => any::<Index>().prop_map(Raw::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..600).prop_map(Raw::Extend),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..64)).prop_map(|(i, v)| Raw::Insert(i, v)),
        1 => (any::<Index>(), 1u16..5000).prop_map(|(i, n)| Raw::Remove(i, n)),
        2 => (any::<Index>(), extreme()).prop_map(|(i, v)| Raw::Word(i, v)),
        2 => (0u8..5, extreme()).prop_map(|(w, v)| Raw::TrailerWord(w, v)),
        1 => (any::<Index>(), any::<Index>(), 1u16..300).prop_map(|(a, b, n)| Raw::Copy(a, b, n)),
    ]
}

fn apply_raw(bytes: &mut Vec<u8>, m: &Raw) {
    let len = bytes.len();
    match m {
        Raw::FlipBit(i, b) if len > 0 => bytes[i.index(len)] ^= 1 << b,
        Raw::SetByte(i, v) if len > 0 => bytes[i.index(len)] = *v,
        Raw::Truncate(i) => bytes.truncate(i.index(len + 1)),
        Raw::Extend(v) => bytes.extend_from_slice(v),
        Raw::Insert(i, v) => {
            let at = i.index(len + 1);
            bytes.splice(at..at, v.iter().copied());
        }
        Raw::Remove(i, n) => {
            let at = i.index(len + 1);
            bytes.drain(at..(at + *n as usize).min(len));
        }
        Raw::Word(i, v) if len >= 8 => {
            let at = i.index(len - 7);
            bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        Raw::TrailerWord(w, v) if len >= 40 => {
            let at = len - 40 + *w as usize * 8;
            bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        Raw::Copy(a, b, n) if len > 0 => {
            let from = a.index(len);
            let to = b.index(len);
            let n = (*n as usize).min(len - from).min(len - to);
            bytes.copy_within(from..from + n, to);
        }
        _ => {}
    }
}

/// Edits of the section table, written back with correct checksums.
#[derive(Debug, Clone)]
enum TableEdit {
    Offset(Index, u64),
    Length(Index, u64),
    /// The entry starts inside another one (or at its start), keeping its length.
    Overlap(Index, Index, u16),
    Kind(Index, SectionKind),
    Checksum(Index, u64),
    Duplicate(Index),
    Remove(Index),
    Swap(Index, Index),
    Push(SectionEntry),
}

fn section_kind() -> impl Strategy<Value = SectionKind> {
    let small = prop_oneof![0u32..4, Just(u32::MAX)];
    prop_oneof![
        Just(SectionKind::Tree),
        small.clone().prop_map(|proc| SectionKind::Meta { proc }),
        (small.clone(), 0u32..8).prop_map(|(proc, vma)| SectionKind::Pages { proc, vma }),
        (small.clone(), 0u32..4).prop_map(|(proc, file)| SectionKind::FileContents { proc, file }),
        small.prop_map(|object| SectionKind::Shared { object }),
    ]
}

fn table_edit() -> impl Strategy<Value = TableEdit> {
    prop_oneof![
        (any::<Index>(), extreme()).prop_map(|(i, v)| TableEdit::Offset(i, v)),
        (any::<Index>(), extreme()).prop_map(|(i, v)| TableEdit::Length(i, v)),
        (any::<Index>(), any::<Index>(), any::<u16>()).prop_map(|(a, b, d)| TableEdit::Overlap(a, b, d)),
        (any::<Index>(), section_kind()).prop_map(|(i, k)| TableEdit::Kind(i, k)),
        (any::<Index>(), any::<u64>()).prop_map(|(i, v)| TableEdit::Checksum(i, v)),
        any::<Index>().prop_map(TableEdit::Duplicate),
        any::<Index>().prop_map(TableEdit::Remove),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| TableEdit::Swap(a, b)),
        (section_kind(), extreme(), extreme(), any::<u64>()).prop_map(|(kind, offset, length, checksum)| {
            TableEdit::Push(SectionEntry { kind, offset, length, checksum })
        }),
    ]
}

fn apply_table(entries: &mut Vec<SectionEntry>, e: &TableEdit) {
    let n = entries.len();
    if n == 0 && !matches!(e, TableEdit::Push(_)) {
        return;
    }
    match e {
        TableEdit::Offset(i, v) => entries[i.index(n)].offset = *v,
        TableEdit::Length(i, v) => entries[i.index(n)].length = *v,
        TableEdit::Overlap(a, b, d) => {
            let other = entries[b.index(n)];
            entries[a.index(n)].offset = other.offset.saturating_add(u64::from(*d) % other.length.max(1));
        }
        TableEdit::Kind(i, k) => entries[i.index(n)].kind = *k,
        TableEdit::Checksum(i, v) => entries[i.index(n)].checksum = *v,
        TableEdit::Duplicate(i) => entries.push(entries[i.index(n)]),
        TableEdit::Remove(i) => {
            entries.remove(i.index(n));
        }
        TableEdit::Swap(a, b) => entries.swap(a.index(n), b.index(n)),
        TableEdit::Push(s) => entries.push(*s),
    }
}

/// Edits of the header and trailer words, with their checksums recomputed.
#[derive(Debug, Clone)]
enum Fixed {
    Version(u32),
    Flags(u32),
    Reserved(Index, u8),
    TableOffset(u64),
    TableLen(u64),
    /// The table checksum recomputed over a range that is not the table.
    TableAt(u64, u64),
}

fn fixed() -> impl Strategy<Value = Fixed> {
    prop_oneof![
        prop_oneof![Just(0u32), Just(2), Just(3), Just(4), Just(u32::MAX), any::<u32>()].prop_map(Fixed::Version),
        any::<u32>().prop_map(Fixed::Flags),
        (any::<Index>(), 1u8..=255).prop_map(|(i, v)| Fixed::Reserved(i, v)),
        extreme().prop_map(Fixed::TableOffset),
        extreme().prop_map(Fixed::TableLen),
        (extreme(), extreme()).prop_map(|(o, l)| Fixed::TableAt(o, l)),
    ]
}

fn apply_fixed(bytes: &mut [u8], f: &Fixed) {
    let len = bytes.len();
    let word = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let (mut offset, mut table_len, mut sum) = (word(bytes, len - 40), word(bytes, len - 32), word(bytes, len - 24));
    match f {
        Fixed::Version(v) => bytes[8..12].copy_from_slice(&v.to_le_bytes()),
        Fixed::Flags(v) => bytes[12..16].copy_from_slice(&v.to_le_bytes()),
        Fixed::Reserved(i, v) => bytes[24 + i.index(HEADER_LEN as usize - 24)] = *v,
        Fixed::TableOffset(v) => offset = *v,
        Fixed::TableLen(v) => table_len = *v,
        Fixed::TableAt(o, l) => {
            (offset, table_len) = (*o, *l);
            if let Some(range) = o.checked_add(*l).filter(|&e| e <= len as u64) {
                sum = xxh3_64(&bytes[*o as usize..range as usize]);
            }
        }
    }
    let header_sum = xxh3_64(&bytes[0..16]);
    bytes[16..24].copy_from_slice(&header_sum.to_le_bytes());
    bytes[len - 40..].copy_from_slice(&trailer(offset, table_len, sum));
}

/// Edits of decoded metadata, re-encoded into a valid container.
#[derive(Debug, Clone)]
enum MetaEdit {
    Exe(u32),
    Libmigrate(u32),
    VmaRange(Index, u64, u64),
    VmaRuns(Index, Vec<(u64, u64)>),
    VmaKind(Index, u8),
    VmaFile(Index, Option<u32>),
    RemoveVma(Index),
    DuplicateVma(Index),
    SwapVmas(Index, Index),
    FdFile(Index, u32),
    FdShares(Index, Option<u32>),
    Watches(Index, Vec<i32>),
    NoThreads,
    NoFiles,
    ManyThreads(u32),
    /// (first, count, ancestor, offset) runs of pages held by ancestors.
    Inherited(Index, Vec<(u64, u64, u32, u64)>),
}

fn small_or_huge() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..8, Just(u32::MAX), any::<u32>()]
}

fn meta_edit() -> impl Strategy<Value = MetaEdit> {
    let run = (prop_oneof![0u64..10, extreme()], prop_oneof![0u64..10, extreme()]);
    prop_oneof![
        small_or_huge().prop_map(MetaEdit::Exe),
        small_or_huge().prop_map(MetaEdit::Libmigrate),
        (any::<Index>(), extreme(), extreme()).prop_map(|(i, s, e)| MetaEdit::VmaRange(i, s, e)),
        (any::<Index>(), prop::collection::vec(run, 0..5)).prop_map(|(i, r)| MetaEdit::VmaRuns(i, r)),
        (any::<Index>(), 0u8..9).prop_map(|(i, k)| MetaEdit::VmaKind(i, k)),
        (any::<Index>(), prop::option::of(small_or_huge())).prop_map(|(i, f)| MetaEdit::VmaFile(i, f)),
        any::<Index>().prop_map(MetaEdit::RemoveVma),
        any::<Index>().prop_map(MetaEdit::DuplicateVma),
        (any::<Index>(), any::<Index>()).prop_map(|(a, b)| MetaEdit::SwapVmas(a, b)),
        (any::<Index>(), small_or_huge()).prop_map(|(i, f)| MetaEdit::FdFile(i, f)),
        (any::<Index>(), prop::option::of(small_or_huge())).prop_map(|(i, f)| MetaEdit::FdShares(i, f)),
        (any::<Index>(), prop::collection::vec(-2i32..6, 0..4)).prop_map(|(i, w)| MetaEdit::Watches(i, w)),
        Just(MetaEdit::NoThreads),
        Just(MetaEdit::NoFiles),
        prop_oneof![Just(65536u32), Just(65537), 1u32..40].prop_map(MetaEdit::ManyThreads),
        (
            any::<Index>(),
            prop::collection::vec(
                (
                    prop_oneof![0u64..10, extreme()],
                    prop_oneof![0u64..4, extreme()],
                    prop_oneof![0u32..3, Just(u32::MAX)],
                    prop_oneof![Just(0u64), Just(4096), 1u64..5000, extreme()]
                ),
                0..4
            )
        )
            .prop_map(|(i, r)| MetaEdit::Inherited(i, r)),
    ]
}

fn vma_kind(k: u8) -> VmaKind {
    match k {
        0 => VmaKind::Registry,
        1 => VmaKind::Anon,
        2 => VmaKind::SharedAnon,
        3 => VmaKind::FilePrivate,
        4 => VmaKind::FileShared,
        5 => VmaKind::Heap,
        6 => VmaKind::Stack,
        7 => VmaKind::Special,
        _ => VmaKind::SysvShm { id: 7 },
    }
}

fn apply_meta(m: &mut ImageMeta, e: &MetaEdit) {
    let p = &mut m.process;
    let (nv, nf) = (p.vmas.len(), p.fds.len());
    match e {
        MetaEdit::Exe(v) => p.exe = *v,
        MetaEdit::Libmigrate(v) => p.libmigrate = *v,
        MetaEdit::VmaRange(i, s, e) if nv > 0 => {
            let v = &mut p.vmas[i.index(nv)];
            (v.start, v.end) = (*s, *e);
        }
        MetaEdit::VmaRuns(i, r) if nv > 0 => p.vmas[i.index(nv)].runs = r.clone(),
        MetaEdit::VmaKind(i, k) if nv > 0 => p.vmas[i.index(nv)].kind = vma_kind(*k),
        MetaEdit::VmaFile(i, f) if nv > 0 => p.vmas[i.index(nv)].file = *f,
        MetaEdit::RemoveVma(i) if nv > 0 => {
            p.vmas.remove(i.index(nv));
        }
        MetaEdit::DuplicateVma(i) if nv > 0 => {
            let at = i.index(nv);
            let v = p.vmas[at].clone();
            p.vmas.insert(at, v);
        }
        MetaEdit::SwapVmas(a, b) if nv > 0 => p.vmas.swap(a.index(nv), b.index(nv)),
        MetaEdit::FdFile(i, f) if nf > 0 => match &mut p.fds[i.index(nf)].kind {
            FdKind::Regular { file, .. } | FdKind::Deleted { file, .. } => *file = *f,
            k => *k = FdKind::Regular { file: *f, flags: 0, pos: 0 },
        },
        MetaEdit::FdShares(i, s) if nf > 0 => p.fds[i.index(nf)].shares_with = *s,
        MetaEdit::Watches(i, wds) if nf > 0 => {
            let watches = wds.iter().map(|&wd| InotifyWatch { wd, path: "/w".into(), mask: 2 }).collect();
            p.fds[i.index(nf)].kind = FdKind::Inotify { flags: 0, watches };
        }
        MetaEdit::NoThreads => p.threads.clear(),
        MetaEdit::NoFiles => p.files.clear(),
        MetaEdit::ManyThreads(n) => {
            let t = ThreadEntry { affinity: vec![], pending: vec![], ..thread(1, false) };
            p.threads = vec![t; *n as usize];
        }
        MetaEdit::Inherited(i, runs) if nv > 0 => {
            p.vmas[i.index(nv)].inherited = runs
                .iter()
                .map(|&(first, count, ancestor, offset)| InheritedRun { first, count, ancestor, offset })
                .collect()
        }
        _ => {}
    }
}

#[derive(Debug, Clone)]
enum TreeEdit {
    Processes(u32),
    Holder(u32, i32),
    SharedFdBase(i32),
    Ancestors(Vec<String>),
}

fn tree_edit() -> impl Strategy<Value = TreeEdit> {
    prop_oneof![
        prop_oneof![Just(0u32), 1u32..4, Just(65536), Just(65537)].prop_map(TreeEdit::Processes),
        (small_or_huge(), prop_oneof![Just(-1i32), 0i32..30, Just(i32::MIN)])
            .prop_map(|(p, fd)| TreeEdit::Holder(p, fd)),
        prop_oneof![Just(i32::MIN), -1i32..5, Just(i32::MAX)].prop_map(TreeEdit::SharedFdBase),
        prop::collection::vec(prop_oneof![Just("a.mig".to_string()), Just("../x".into()), Just(String::new())], 0..20)
            .prop_map(TreeEdit::Ancestors),
    ]
}

fn apply_tree(t: &mut TreeMeta, e: &TreeEdit) {
    match e {
        TreeEdit::Processes(n) => {
            t.processes = vec![TreeProcess { vpid: 100, vppid: 1, vpgid: 100, vsid: 100 }; *n as usize]
        }
        TreeEdit::Holder(p, fd) => t.shared[1].holders.push((*p, *fd)),
        TreeEdit::SharedFdBase(b) => t.shared_fd_base = *b,
        TreeEdit::Ancestors(files) => {
            t.ancestors = files.iter().map(|f| AncestorRef { file: f.clone(), image_id: 1 }).collect()
        }
    }
}

/// Byte edits of one section's contents (garbage postcard in a valid container).
#[derive(Debug, Clone)]
enum ContentEdit {
    Bytes(Vec<Raw>),
    /// Replaced by random bytes.
    Garbage(Vec<u8>),
    /// A varint length prefix made huge: postcard's lengths are LEB128.
    HugeVarint(Index),
}

fn content_edit() -> impl Strategy<Value = ContentEdit> {
    prop_oneof![
        4 => prop::collection::vec(raw(), 1..4).prop_map(ContentEdit::Bytes),
        1 => prop::collection::vec(any::<u8>(), 0..2000).prop_map(ContentEdit::Garbage),
        2 => any::<Index>().prop_map(ContentEdit::HugeVarint),
    ]
}

fn apply_content(bytes: &mut Vec<u8>, e: &ContentEdit) {
    match e {
        ContentEdit::Bytes(edits) => edits.iter().for_each(|m| apply_raw(bytes, m)),
        ContentEdit::Garbage(g) => *bytes = g.clone(),
        ContentEdit::HugeVarint(i) => {
            let at = i.index(bytes.len() + 1);
            bytes.splice(at..at, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        }
    }
}

#[derive(Debug, Clone)]
enum Case {
    /// Raw damage: any change must be refused.
    Raw(bool, Vec<Raw>),
    /// Table edits behind correct checksums.
    Table(bool, Vec<TableEdit>),
    /// Header/trailer words behind correct checksums.
    Fixed(bool, Fixed),
    /// One section's bytes edited, checksum recomputed.
    Content(bool, Index, ContentEdit),
    /// One process's decoded metadata edited.
    Meta(bool, u32, Vec<MetaEdit>),
    /// The decoded tree edited.
    Tree(bool, Vec<TreeEdit>),
    /// Not an image at all, or a header and then garbage.
    Garbage(bool, Vec<u8>),
}

fn case() -> impl Strategy<Value = Case> {
    let two = any::<bool>();
    prop_oneof![
        6 => (two, prop::collection::vec(raw(), 1..5)).prop_map(|(t, m)| Case::Raw(t, m)),
        4 => (two, prop::collection::vec(table_edit(), 1..4)).prop_map(|(t, m)| Case::Table(t, m)),
        2 => (two, fixed()).prop_map(|(t, f)| Case::Fixed(t, f)),
        4 => (two, any::<Index>(), content_edit()).prop_map(|(t, i, e)| Case::Content(t, i, e)),
        4 => (two, 0u32..2, prop::collection::vec(meta_edit(), 1..4)).prop_map(|(t, k, m)| Case::Meta(t, k, m)),
        2 => (two, prop::collection::vec(tree_edit(), 1..3)).prop_map(|(t, m)| Case::Tree(t, m)),
        1 => (two, prop::collection::vec(any::<u8>(), 0..5000)).prop_map(|(h, g)| Case::Garbage(h, g)),
    ]
}

/// The two base images: a tree of two processes, and one of a single process.
struct Bases {
    images: [Vec<u8>; 2],
    parts: [Vec<Part>; 2],
}

impl Bases {
    fn new() -> Bases {
        let parts = [sample_parts(2), sample_parts(1)];
        Bases { images: [assemble(&parts[0]), assemble(&parts[1])], parts }
    }
    fn pick(&self, two: bool) -> (&[u8], &[Part]) {
        let i = usize::from(!two);
        (&self.images[i], &self.parts[i])
    }
}

/// The damaged image, and whether every change in it must be refused by open + verify_all
/// (checksums not recomputed).
fn build(bases: &Bases, c: &Case) -> (Vec<u8>, bool) {
    match c {
        Case::Raw(two, edits) => {
            let mut bytes = bases.pick(*two).0.to_vec();
            edits.iter().for_each(|m| apply_raw(&mut bytes, m));
            (bytes, true)
        }
        Case::Table(two, edits) => {
            let image = bases.pick(*two).0;
            let (table_offset, mut entries) = split(image);
            edits.iter().for_each(|e| apply_table(&mut entries, e));
            (with_table(&image[..table_offset as usize], &entries), false)
        }
        Case::Fixed(two, f) => {
            let mut bytes = bases.pick(*two).0.to_vec();
            apply_fixed(&mut bytes, f);
            (bytes, false)
        }
        Case::Content(two, i, e) => {
            let mut parts = bases.pick(*two).1.to_vec();
            let at = i.index(parts.len());
            apply_content(&mut parts[at].1, e);
            (assemble(&parts), false)
        }
        Case::Meta(two, proc, edits) => {
            let mut parts = bases.pick(*two).1.to_vec();
            let proc = if *two { *proc } else { 0 };
            let part = parts.iter_mut().find(|p| p.0 == SectionKind::Meta { proc }).unwrap();
            let mut meta: ImageMeta = postcard::from_bytes(&part.1).unwrap();
            edits.iter().for_each(|e| apply_meta(&mut meta, e));
            part.1 = postcard::to_allocvec(&meta).unwrap();
            (assemble(&parts), false)
        }
        Case::Tree(two, edits) => {
            let mut parts = bases.pick(*two).1.to_vec();
            let part = parts.iter_mut().find(|p| p.0 == SectionKind::Tree).unwrap();
            let mut tree: TreeMeta = postcard::from_bytes(&part.1).unwrap();
            edits.iter().for_each(|e| apply_tree(&mut tree, e));
            part.1 = postcard::to_allocvec(&tree).unwrap();
            (assemble(&parts), false)
        }
        Case::Garbage(header, g) => {
            let mut bytes = Vec::new();
            if *header {
                bytes.extend_from_slice(&bases.images[1][..HEADER_LEN as usize]);
            }
            bytes.extend_from_slice(g);
            (bytes, false)
        }
    }
}

fn cases() -> u32 {
    std::env::var("MIGRATE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000)
}

fn seed() -> u64 {
    std::env::var("MIGRATE_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x6d69_6772_6174_6531)
}

fn runner(cases: u32, salt: u64) -> TestRunner {
    let mut s = [0u8; 32];
    for (i, chunk) in s.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(seed() ^ salt).wrapping_add(i as u64).to_le_bytes());
    }
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 2000, ..Config::default() };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &s))
}

fn report<T: std::fmt::Debug>(name: &str, r: Result<(), proptest::test_runner::TestError<T>>) {
    if let Err(e) = r {
        panic!("{name}: {e} (seed {}; run again with MIGRATE_FUZZ_SEED={})", seed(), seed());
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn the_sample_images_are_valid() {
    let bases = Bases::new();
    for (n, image) in bases.images.iter().enumerate() {
        let scratch = Scratch::new(&format!("valid-{n}"));
        let path = scratch.write(image);
        let r = ImageReader::open(path).unwrap();
        r.verify_all().unwrap();
        let tree = r.tree().unwrap();
        for k in 0..tree.processes.len() as u32 {
            assert_eq!(r.process_meta(k).unwrap(), sample_meta(k));
        }
        let out = read_everything(path, image.len() as u64).unwrap();
        assert!(out.opened && out.verified);
        // The sample has padding between sections, which the bit-flip test covers too.
        let (table_offset, entries) = split(image);
        let covered: u64 = entries.iter().map(|s| s.length).sum();
        assert!(covered + HEADER_LEN < table_offset, "the sample image has no padding");
    }
    assert_eq!(take_refused(), 0);
}

#[test]
fn damaged_images_are_refused_cleanly() {
    let bases = Bases::new();
    let scratch = Scratch::new("damaged");
    // How deep the damaged images got: opened, verified, tree accepted, metadata accepted.
    let depth = std::cell::RefCell::new([0u32; 5]);
    let result = runner(cases(), 1).run(&case(), |c| {
        let (bytes, any_change_refused) = build(&bases, &c);
        let path = scratch.write(&bytes);
        let out = read_everything(path, bytes.len() as u64)?;
        let refused = take_refused();
        prop_assert_eq!(refused, 0, "an allocation of {} bytes was asked for", refused);
        if any_change_refused && !bases.images.contains(&bytes) {
            prop_assert!(!(out.opened && out.verified), "a changed image passed open and verify_all");
        }
        let mut d = depth.borrow_mut();
        for (slot, reached) in d.iter_mut().zip([true, out.opened, out.verified, out.tree, out.meta]) {
            *slot += u32::from(reached);
        }
        Ok(())
    });
    let [all, opened, verified, tree, meta] = *depth.borrow();
    eprintln!(
        "{all} damaged images: {opened} opened, {verified} verified, {tree} with a tree, {meta} with metadata accepted"
    );
    // The damage must not be so crude that nothing gets past the checksums.
    assert!(opened * 3 > all && verified * 5 > all && meta * 10 > all, "the mutations stop at the surface");
    report("damaged_images_are_refused_cleanly", result);
}

/// Decoding arbitrary bytes as any part of the schema, and validating what decodes.
#[test]
fn schema_decoders_take_any_bytes() {
    let base_meta = postcard::to_allocvec(&sample_meta(0)).unwrap();
    let base_tree = postcard::to_allocvec(&sample_tree(2)).unwrap();
    let input = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..3000),
        prop::collection::vec(raw(), 1..6).prop_map(move |edits| {
            let mut b = base_meta.clone();
            edits.iter().for_each(|m| apply_raw(&mut b, m));
            b
        }),
        prop::collection::vec(raw(), 1..6).prop_map(move |edits| {
            let mut b = base_tree.clone();
            edits.iter().for_each(|m| apply_raw(&mut b, m));
            b
        }),
    ];
    let result = runner(cases(), 2).run(&input, |bytes| {
        if let Ok(m) = postcard::from_bytes::<ImageMeta>(&bytes) {
            if m.validate().is_ok() {
                // The sections it needs exist by construction here: only the indices matter.
                let sections: Vec<SectionEntry> = m
                    .process
                    .vmas
                    .iter()
                    .enumerate()
                    .map(|(i, v)| SectionEntry {
                        kind: SectionKind::Pages { proc: 0, vma: i as u32 },
                        offset: HEADER_LEN,
                        length: v.stored_pages() * PAGE_SIZE,
                        checksum: 0,
                    })
                    .collect();
                check_meta(&sections, 0, &m)?;
            }
        }
        if let Ok(t) = postcard::from_bytes::<TreeMeta>(&bytes) {
            if t.validate().is_ok() {
                prop_assert!(!t.processes.is_empty() && t.shared_fd_base >= 3);
                let _ = t.index_of(100);
            }
        }
        let _ = postcard::from_bytes::<Vec<SectionEntry>>(&bytes);
        let _ = postcard::from_bytes::<FdKind>(&bytes);
        let refused = take_refused();
        prop_assert_eq!(refused, 0, "decoding asked for {} bytes", refused);
        Ok(())
    });
    report("schema_decoders_take_any_bytes", result);
}

/// Flips bits of a valid image: every bit of the header, the table, the trailer and the
/// metadata and tree sections; one bit of every byte of the padding between sections (each
/// byte is checked whole); and a dense sample (every 61st bit) of the pages, the shared memory
/// and the file contents (each a single checksummed run). Each flip must be refused by `open`
/// + `verify_all`.
#[test]
fn every_flipped_bit_is_detected() {
    use std::os::unix::fs::FileExt;
    let bases = Bases::new();
    let image = &bases.images[0];
    let (table_offset, entries) = split(image);
    let section_at = |at: u64| entries.iter().find(|s| (s.offset..s.offset + s.length).contains(&at));
    let scratch = Scratch::new("flips");
    let path = scratch.write(image);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let (mut flipped, mut padding) = (0u64, 0u64);
    for byte in 0..image.len() as u64 {
        let bits: Vec<u64> = match section_at(byte) {
            _ if byte < HEADER_LEN || byte >= table_offset => (0..8).collect(),
            Some(s) if matches!(s.kind, SectionKind::Meta { .. } | SectionKind::Tree) => (0..8).collect(),
            Some(_) => (0..8).filter(|b| (byte * 8 + b) % 61 == 0).collect(),
            None => {
                padding += 1;
                vec![byte % 8]
            }
        };
        for bit in bits {
            f.write_all_at(&[image[byte as usize] ^ (1 << bit)], byte).unwrap();
            let r = ImageReader::open(path).and_then(|r| r.verify_all());
            match r {
                Ok(()) => panic!("bit {bit} of byte {byte} flipped went unnoticed (table at {table_offset})"),
                Err(e) => check_error(path, "flip", &e).unwrap(),
            }
            flipped += 1;
        }
        f.write_all_at(&image[byte as usize..byte as usize + 1], byte).unwrap();
    }
    assert!(padding > 1000, "only {padding} bytes of padding");
    eprintln!("{flipped} bits flipped in an image of {} bytes, {padding} bytes of padding", image.len());
    ImageReader::open(path).unwrap().verify_all().unwrap();
}

/// A section longer than memory (a sparse file claims one) gives an error, not an abort: the
/// buffer is reserved fallibly.
#[test]
fn a_huge_sparse_section_is_an_error() {
    use std::os::unix::fs::FileExt;
    const HUGE: u64 = 1 << 36; // 64 GiB, all hole
    let scratch = Scratch::new("sparse");
    let path = scratch.write(&[]);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let data_end = HEADER_LEN + HUGE;
    if f.set_len(data_end).is_err() {
        eprintln!("skipped: the temp directory cannot hold a 64 GiB sparse file");
        return;
    }
    let header = assemble(&[]);
    f.write_all_at(&header[..HEADER_LEN as usize], 0).unwrap();
    // The table and trailer go after the hole.
    let entry = SectionEntry {
        kind: SectionKind::FileContents { proc: 0, file: 0 },
        offset: HEADER_LEN,
        length: HUGE,
        checksum: 0,
    };
    let table = postcard::to_allocvec(&vec![entry]).unwrap();
    f.write_all_at(&table, data_end).unwrap();
    f.write_all_at(&trailer(data_end, table.len() as u64, xxh3_64(&table)), data_end + table.len() as u64).unwrap();
    let r = ImageReader::open(path).unwrap();
    let e = r.read_section(0).unwrap_err();
    assert!(e.to_string().contains("do not fit in memory"), "{e}");
    assert_eq!(take_refused(), HUGE as usize);
}
