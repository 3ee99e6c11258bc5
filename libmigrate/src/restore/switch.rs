//! The address-space switch. Runs on the plan's private stack with every signal blocked, using
//! raw system calls only: no libc, no allocation, no Rust statics (libmigrate's own data is
//! being replaced too). Steps: unmap everything that is not kept; map every saved region and
//! fill it from the image; set the mm fields; clone the other threads onto their saved
//! contexts; make this thread the saved main thread and jump into its parked handler.

use super::lazy;
use super::plan::{PlanHeader, PlanRun, PlanVma, Range, PLAN_MAGIC};
use crate::sys::{self, context, uffd};
use core::sync::atomic::Ordering;

const TASK_SIZE: u64 = 0x7fff_ffff_f000;

/// Reports a failure after the point of no return, on migrate-resume's stderr `fd` (from the
/// plan: no statics here, they are being replaced), and exits.
fn fail(fd: i32, what: &[u8], err: isize) -> ! {
    let _ = sys::write(fd, b"migrate-resume: error: restore failed while replacing the address space: ");
    let _ = sys::write(fd, what);
    fail_tail(fd, err)
}

/// Like [`fail`], naming the region that could not be mapped (address range and size) and, for
/// ENOMEM, what runs out.
fn fail_region(fd: i32, what: &[u8], start: u64, end: u64, err: isize) -> ! {
    let _ = sys::write(fd, b"migrate-resume: error: restore failed while replacing the address space: ");
    let _ = sys::write(fd, what);
    let _ = sys::write(fd, b" of the region 0x");
    write_num(fd, start, 16);
    let _ = sys::write(fd, b"-0x");
    write_num(fd, end, 16);
    let _ = sys::write(fd, b" (");
    write_num(fd, (end - start) >> 10, 10);
    let _ = sys::write(fd, b" KiB)");
    if err == -(libc::ENOMEM as isize) {
        let _ = sys::write(
            fd,
            b": out of memory (the address-space limit RLIMIT_AS or data limit RLIMIT_DATA, the host's commit limit or vm.max_map_count)",
        );
    }
    fail_tail(fd, err)
}

fn fail_tail(fd: i32, err: isize) -> ! {
    let _ = sys::write(fd, b" (errno ");
    write_num(fd, (-err) as u64, 10);
    let _ = sys::write(fd, b"); the image is intact\n");
    mark_tree_failed();
    sys::exit_group(5)
}

/// Tells the other processes of the tree that this restore failed (they wait for it at the
/// barrier, restore/mod.rs), through a fresh shared mapping of the registry's descriptor: the
/// address space is half replaced, nothing of it is trusted.
fn mark_tree_failed() {
    use core::sync::atomic::{AtomicU32, Ordering};
    use pid_virt::registry::{Registry, FD, MAGIC, SIZE};
    let Ok(addr) = sys::mmap(0, SIZE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, FD, 0) else {
        return;
    };
    // Field by field, by offset: no call into another crate's code, which may go through
    // libmigrate's data (GOT), unmapped by now.
    // SAFETY: a shared mapping of SIZE bytes of the registry memfd, made just now; the fields
    // are at their offsets in the repr(C) Registry.
    unsafe {
        let magic = core::ptr::read_volatile(addr as *const u64);
        if magic == MAGIC {
            let failed = &*((addr + core::mem::offset_of!(Registry, failed)) as *const AtomicU32);
            let released = &*((addr + core::mem::offset_of!(Registry, released)) as *const AtomicU32);
            failed.fetch_add(1, Ordering::AcqRel);
            sys::futex_wake_shared(released);
        }
        let _ = sys::munmap(addr, SIZE);
    }
}

/// Writes `n` in base 10 or 16 without formatting machinery (no libc, no allocation: the
/// switch and the lazy page server use it).
pub(super) fn write_num(fd: i32, mut n: u64, base: u64) {
    let mut num = [0u8; 24];
    let mut i = num.len();
    loop {
        i -= 1;
        let d = (n % base) as u8;
        num[i] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
        n /= base;
        if n == 0 {
            break;
        }
    }
    let _ = sys::write(fd, &num[i..]);
}

fn raw(nr: libc::c_long, a: u64, b: u64, c: u64, d: u64, e: u64, f: u64) -> isize {
    // SAFETY: the restorer passes arguments that are valid for each call (addresses inside the
    // plan region or the ranges being mapped).
    unsafe { sys::syscall6(nr, a as usize, b as usize, c as usize, d as usize, e as usize, f as usize) }
}

fn check(fd: i32, r: isize, what: &[u8]) -> u64 {
    if (-4095..0).contains(&r) {
        fail(fd, what, r);
    }
    r as u64
}

const CLONE_THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS) as u64;
const CLONE_TID_FLAGS: u64 = (libc::CLONE_PARENT_SETTID | libc::CLONE_CHILD_CLEARTID) as u64;

const SHM_RDONLY: u64 = 0o10000;
const SHM_REMAP: u64 = 0o40000;
const SHM_EXEC: u64 = 0o100000;

/// Attaches a recreated System V segment where the saved mapping was. A whole attachment is
/// made in place (SHM_REMAP); a piece of one (split by mprotect or munmap) is attached anywhere,
/// the piece moved into place with mremap and the rest detached.
fn attach_segment(efd: i32, v: &super::plan::PlanVma) {
    let len = v.end - v.start;
    let write = v.prot & libc::PROT_WRITE != 0;
    let exec = v.prot & libc::PROT_EXEC != 0;
    let flags = if write { 0 } else { SHM_RDONLY } | if exec { SHM_EXEC } else { 0 };
    let attached_prot =
        libc::PROT_READ | if write { libc::PROT_WRITE } else { 0 } | if exec { libc::PROT_EXEC } else { 0 };
    let size = v.shm_size.next_multiple_of(4096);
    let id = v.shm_id as u64;
    if v.file_offset == 0 && len == size {
        let got = check(efd, raw(libc::SYS_shmat, id, v.start, flags | SHM_REMAP, 0, 0, 0), b"shmat");
        if got != v.start {
            fail(efd, b"shmat placed a segment elsewhere", -(libc::EINVAL as isize));
        }
    } else {
        if v.file_offset + len > size {
            fail(efd, b"a System V segment is smaller than its saved mapping", -(libc::EINVAL as isize));
        }
        // A placeholder keeps the kernel from placing the whole attachment over the target.
        let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED) as u64;
        check(efd, raw(libc::SYS_mmap, v.start, len, libc::PROT_NONE as u64, anon, u64::MAX, 0), b"mmap");
        let tmp = check(efd, raw(libc::SYS_shmat, id, 0, flags, 0, 0, 0), b"shmat");
        let moved = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
        check(efd, raw(libc::SYS_mremap, tmp + v.file_offset, len, len, moved, v.start, 0), b"mremap");
        raw(libc::SYS_munmap, tmp, size, 0, 0, 0, 0);
    }
    if v.prot != attached_prot {
        check(efd, raw(libc::SYS_mprotect, v.start, len, v.prot as u64, 0, 0, 0), b"mprotect");
    }
}

/// Reads `len` bytes of the image at `off` into memory at `addr`.
fn read_exact(efd: i32, image_fd: u64, mut addr: u64, len: u64, mut off: u64) {
    let end = addr + len;
    while addr < end {
        let n =
            check(efd, raw(libc::SYS_pread64, image_fd, addr, end - addr, off, 0, 0), b"reading pages from the image");
        if n == 0 {
            fail(efd, b"the image ended early", -(libc::EIO as isize));
        }
        addr += n;
        off += n;
    }
}

/// Fills the runs of a compressed VMA (migrate_image::frames): a raw frame is read straight
/// into place; compressed ones are read into the plan's scratch buffer, as many consecutive
/// ones at a time as it holds, and each decoded straight into place (no memcpy, no libc).
fn fill_lz4(
    efd: i32,
    image_fd: u64,
    v: &super::plan::PlanVma,
    runs: &[super::plan::PlanRun],
    words: &[u32],
    scratch: *mut u8,
    scratch_len: u64,
) {
    use migrate_image::frames::{decompress_frame, word_len, word_raw, FRAME_PAGES};
    let mut off = v.frames_offset;
    // The scratch buffer holds the image's bytes buf_at..buf_at+buf_len.
    let (mut buf_at, mut buf_len) = (0u64, 0u64);
    let mut k = 0usize;
    for r in runs {
        let mut page = r.start;
        while page < r.end {
            let pages = (r.end - page).min(FRAME_PAGES);
            let dst = v.start + page * 4096;
            let size = pages * 4096;
            let Some(&word) = words.get(k) else {
                fail(efd, b"a compressed mapping has fewer frames than pages", -(libc::EIO as isize));
            };
            let len = word_len(word) as u64;
            if word_raw(word) {
                read_exact(efd, image_fd, dst, size, off);
            } else {
                if off < buf_at || off + len > buf_at + buf_len {
                    // This frame and the compressed ones after it, as far as they fit.
                    let mut want = 0u64;
                    let mut j = k;
                    while let Some(&w) = words.get(j) {
                        if word_raw(w) || want + word_len(w) as u64 > scratch_len {
                            break;
                        }
                        want += word_len(w) as u64;
                        j += 1;
                    }
                    if want < len {
                        fail(efd, b"a compressed frame is larger than the scratch buffer", -(libc::EIO as isize));
                    }
                    read_exact(efd, image_fd, scratch as u64, want, off);
                    (buf_at, buf_len) = (off, want);
                }
                // SAFETY: off..off+len lies in buf_at..buf_at+buf_len, which the scratch buffer
                // (plan region, not replaced) holds; dst..dst+size is a range of this mapping,
                // just mapped writable, that nothing else refers to.
                let (src, out) = unsafe {
                    (
                        core::slice::from_raw_parts(scratch.add((off - buf_at) as usize), len as usize),
                        core::slice::from_raw_parts_mut(dst as *mut u8, size as usize),
                    )
                };
                if let Err(e) = decompress_frame(src, out) {
                    fail(efd, e.as_str().as_bytes(), -(libc::EIO as isize));
                }
            }
            off += len;
            k += 1;
            page += pages;
        }
    }
}

/// Reads the runs of region `v` from the image (or an ancestor image) — only their parts inside
/// `clip` when given (the hot ranges of a lazy region).
fn read_runs(efd: i32, v: &PlanVma, runs: &[PlanRun], clip: Option<&[Range]>) {
    for r in runs {
        let (run_start, run_end) = (v.start + r.start * 4096, v.start + r.end * 4096);
        let whole = [Range { start: run_start, end: run_end }];
        for c in clip.unwrap_or(&whole) {
            let (mut addr, end) = (run_start.max(c.start), run_end.min(c.end));
            while addr < end {
                let n = check(
                    efd,
                    raw(libc::SYS_pread64, r.fd as u64, addr, end - addr, r.offset + (addr - run_start), 0, 0),
                    b"reading pages from the image",
                );
                if n == 0 {
                    fail(efd, b"the image ended early", -(libc::EIO as isize));
                }
                addr += n;
            }
        }
    }
}

/// A lazy region read eagerly after all: its pages are checked against their hashes here,
/// since the page server will not see them.
fn check_hashes(efd: i32, server: u64, v: &PlanVma) {
    if let Some(bad) = lazy::check_present(server, v.start, v.end) {
        let _ = sys::write(efd, b"migrate-resume: error: restore failed: the page at 0x");
        write_num(efd, bad, 16);
        let _ = sys::write(efd, b" does not match its hash: the image is damaged; resume from an intact copy of it\n");
        sys::exit_group(5);
    }
}

/// Lazy restore: marks the restore pending in the restored `lazy::LAZY` (its page is in: it is
/// hot), starts the page server, registers every lazy region with the userfaultfd and lets the
/// server go. A region the kernel will not register, or every one if the server cannot start,
/// is read eagerly instead.
fn start_lazy(plan: &PlanHeader, efd: i32) {
    let state = plan.lazy_state as *const lazy::LazyState;
    // SAFETY: `LAZY`'s page is mapped and present (hot); no other thread runs yet.
    let state = unsafe { &*state };
    state.fd_lo.store(plan.lazy_fd_lo, Ordering::Relaxed);
    state.fd_hi.store(plan.lazy_fd_hi, Ordering::Relaxed);
    state.pending.store(1, Ordering::Release);
    let server = plan.lazy_server;
    let all_runs = plan.runs();
    let runs_of = |v: &PlanVma| &all_runs[v.first_run as usize..(v.first_run + v.nruns) as usize];
    // SAFETY: the server's mapping ends with its stack; `pending` lives as long as the process.
    let tid = unsafe {
        uffd::spawn_thread(server + plan.lazy_server_len, state.pending.as_ptr() as u64, server, lazy::server_main)
    };
    if tid < 0 {
        let _ = sys::write(
            efd,
            b"migrate-resume: warning: cannot start the lazy restore's page server; restoring eagerly\n",
        );
        for v in plan.vmas().iter().filter(|v| v.lazy != 0) {
            read_runs(efd, v, runs_of(v), None);
            check_hashes(efd, server, v);
        }
        state.pending.store(0, Ordering::Release);
        // SAFETY: the header built by lazy::build_server; no server thread uses it.
        let s = unsafe { &*(server as *const lazy::Server) };
        for &fd in s.sources.iter().take(s.nsources as usize).chain([&s.uffd, &s.out_fd]) {
            raw(libc::SYS_close, fd as u64, 0, 0, 0, 0, 0);
        }
        return;
    }
    for v in plan.vmas().iter().filter(|v| v.lazy != 0) {
        let len = v.end - v.start;
        match uffd::register(plan.lazy_uffd, v.start, len) {
            Ok(ioctls) if ioctls & uffd::UFFDIO_COPY_BIT != 0 => {}
            registered => {
                if registered.is_ok() {
                    let _ = uffd::unregister(plan.lazy_uffd, v.start, len);
                }
                // The server finds these pages present (EEXIST) and moves on.
                read_runs(efd, v, runs_of(v), None);
                check_hashes(efd, server, v);
            }
        }
    }
    // SAFETY: the header built by lazy::build_server; `go` is atomic.
    let go = unsafe { &(*(server as *const lazy::Server)).go };
    go.store(1, Ordering::Release);
    sys::futex_wake(go);
}

/// Entry point on the private stack. `plan_addr` is the plan region.
pub extern "C" fn restorer_main(plan_addr: usize) -> ! {
    // SAFETY: the constructor passes the address of a plan it built; the region stays mapped.
    let plan = unsafe { &mut *(plan_addr as *mut PlanHeader) };
    if plan.magic != PLAN_MAGIC {
        fail(2, b"bad plan", -(libc::EINVAL as isize));
    }
    let efd = plan.error_fd;

    // 1. Unmap every gap between the kept ranges.
    let mut cursor = 0x1000u64;
    for k in plan.keeps() {
        if k.start >= TASK_SIZE {
            break; // [vsyscall] lies above user space
        }
        if k.start > cursor {
            check(efd, raw(libc::SYS_munmap, cursor, k.start - cursor, 0, 0, 0, 0), b"munmap");
        }
        if k.end > cursor {
            cursor = k.end;
        }
    }
    if cursor < TASK_SIZE {
        check(efd, raw(libc::SYS_munmap, cursor, TASK_SIZE - cursor, 0, 0, 0, 0), b"munmap");
    }

    // 2. Map and fill every saved region.
    let all_runs = plan.runs();
    for v in plan.vmas() {
        let len = v.end - v.start;
        if v.shm_id >= 0 {
            attach_segment(efd, v);
            continue;
        }
        let runs = &all_runs[v.first_run as usize..(v.first_run + v.nruns) as usize];
        let fill_prot = if runs.is_empty() { v.prot } else { v.prot | libc::PROT_READ | libc::PROT_WRITE };
        // Densely stored anonymous memory is populated by the kernel in one go rather than by
        // one fault per page during the reads. (Never a lazy region: a populated page is
        // present, and the page server could not bring its contents in any more.)
        let stored: u64 = runs.iter().map(|r| r.end - r.start).sum();
        let dense = v.fd < 0 && v.lazy == 0 && len >= (1 << 20) && stored * 4096 * 4 >= len * 3;
        if v.keep == 0 {
            let populate = if dense { libc::MAP_POPULATE } else { 0 };
            let flags = (v.map_flags | libc::MAP_FIXED | populate) as u64;
            let fd = if v.fd < 0 { u64::MAX } else { v.fd as u64 };
            let r = raw(libc::SYS_mmap, v.start, len, fill_prot as u64, flags, fd, v.file_offset);
            if (-4095..0).contains(&r) {
                fail_region(efd, b"mmap", v.start, v.end, r);
            }
            let got = r as u64;
            if got != v.start {
                fail(efd, b"mmap placed a region elsewhere", -(libc::EINVAL as isize));
            }
        } else if fill_prot != v.prot {
            check(efd, raw(libc::SYS_mprotect, v.start, len, fill_prot as u64, 0, 0, 0), b"mprotect");
        }
        if v.nframes > 0 {
            let words = &plan.frames()[v.first_frame as usize..(v.first_frame + v.nframes) as usize];
            fill_lz4(efd, plan.image_fd as u64, v, runs, words, plan.scratch(), plan.scratch_len);
        } else {
            // A lazy region gets only its hot pages now (it is readable and writable already).
            read_runs(efd, v, runs, if v.lazy != 0 { Some(plan.hot()) } else { None });
        }
        if fill_prot != v.prot {
            check(efd, raw(libc::SYS_mprotect, v.start, len, v.prot as u64, 0, 0, 0), b"mprotect");
        }
    }
    if plan.lazy_server != 0 {
        start_lazy(plan, efd);
    }
    for &fd in plan.fds() {
        raw(libc::SYS_close, fd as u64, 0, 0, 0, 0, 0);
    }

    // 3. The mm fields (brk, and where the kernel finds argv/env/auxv for /proc).
    const PR_SET_MM: u64 = 35;
    const PR_SET_MM_MAP: u64 = 14;
    let mm = &plan.mm as *const sys::PrctlMmMap as u64;
    let r = raw(libc::SYS_prctl, PR_SET_MM, PR_SET_MM_MAP, mm, core::mem::size_of::<sys::PrctlMmMap>() as u64, 0, 0);
    if r < 0 {
        // Not fatal: only /proc/<pid>/cmdline and later brk growth are affected.
        let _ = sys::write(2, b"migrate-resume: warning: cannot restore the process's mm fields (PR_SET_MM_MAP)\n");
    }

    // 4. The other threads, each straight onto its saved context.
    let nthreads = plan.nthreads as usize;
    let threads_ptr = (plan_addr + plan.threads_off as usize) as *mut super::plan::PlanThread;
    let mut main = None;
    for i in 0..nthreads {
        // SAFETY: i < nthreads; the records were written by build().
        let t = unsafe { &mut *threads_ptr.add(i) };
        if t.is_main != 0 {
            main = Some(i);
            continue;
        }
        let flags = CLONE_THREAD_FLAGS | if t.tid_address != 0 { CLONE_TID_FLAGS } else { 0 };
        let mut tid = -1i64;
        if plan.exact_tids != 0 {
            let want = t.vtid;
            let args = context::CloneArgs {
                flags,
                child_tid: t.tid_address,
                parent_tid: t.tid_address,
                stack: t.resume_sp - 64,
                stack_size: 64,
                tls: t.fs_base,
                set_tid: &want as *const i32 as u64,
                set_tid_size: 1,
                ..Default::default()
            };
            // SAFETY: as below; a taken tid makes clone3 fail and we fall back to clone.
            tid = unsafe { context::clone3_onto(&args, plan_addr as u64) };
        }
        if tid < 0 {
            // SAFETY: the saved context lies in memory restored above and shared with the child.
            tid = unsafe {
                context::clone_onto(flags, t.resume_sp, t.tid_address, t.tid_address, t.fs_base, plan_addr as u64)
            };
        }
        check(efd, tid as isize, b"clone");
        t.new_tid = tid as i32;
    }
    let Some(main) = main else {
        // The saved main thread had called pthread_exit: leave as a zombie leader, like it.
        let word = &plan.leader_exit_word as *const u32 as u64;
        raw(libc::SYS_set_tid_address, word, 0, 0, 0, 0, 0);
        loop {
            raw(libc::SYS_exit, 0, 0, 0, 0, 0, 0);
        }
    };
    // SAFETY: as above.
    let t = unsafe { &*threads_ptr.add(main) };

    // 5. This thread becomes the saved main thread.
    check(efd, raw(libc::SYS_arch_prctl, sys::ARCH_SET_FS as u64, t.fs_base, 0, 0, 0, 0), b"arch_prctl");
    if t.tid_address != 0 {
        let tid = raw(libc::SYS_set_tid_address, t.tid_address, 0, 0, 0, 0, 0);
        // SAFETY: glibc's tid field in the restored thread descriptor.
        unsafe { core::ptr::write_volatile(t.tid_address as *mut i32, tid as i32) };
    }
    if t.robust_list != 0 {
        raw(libc::SYS_set_robust_list, t.robust_list, t.robust_len, 0, 0, 0, 0);
    }
    // SAFETY: the saved context is in restored memory.
    unsafe { context::resume_context(t.resume_sp, plan_addr as u64) }
}
