//! Resume, inside the new process: libmigrate's constructor sees MIGRATE_RESTORE, restores the
//! kernel objects while libc still works (descriptors, cwd, umask, rlimits, signal
//! dispositions), builds the plan and hands over to the libc-free switch (switch.rs). The
//! restored copies of the program's threads and of the checkpoint thread then meet again in
//! `finish_in_restored_process`, which releases them all at once.

pub mod lazy;
pub mod plan;
pub mod switch;

use crate::checkpoint::{control, suspend};
use crate::resources::{files, memory, process, signals};
use crate::state;
use crate::sys::{self, context};
use alloc::format;
use alloc::string::{String, ToString};
use core::sync::atomic::Ordering;
use migrate_image::{ImageMeta, SectionKind};
use pid_virt::{RealPid, VirtPid};
use std::os::fd::AsRawFd;

/// A copy of migrate-resume's stderr, taken before the program's descriptors are restored: a
/// failure is reported there, never into the program's own files.
pub static ERROR_FD: core::sync::atomic::AtomicI32 = core::sync::atomic::AtomicI32::new(2);

/// migrate-resume's readiness pipe (MIGRATE_READY_FD), or -1: each process of the tree writes
/// one byte to it once the whole tree is restored and about to run, then closes it; a failed
/// restore closes it without writing. migrate-resume lifts the network lock on that signal.
pub static READY_FD: core::sync::atomic::AtomicI32 = core::sync::atomic::AtomicI32::new(-1);

/// Restores the image at `path` into this process. Never returns.
pub fn run(path: &[u8], force: bool) -> ! {
    if let Ok(fd) = sys::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) {
        ERROR_FD.store(fd as i32, Ordering::Relaxed);
    }
    if let Some(fd) = crate::env::var("MIGRATE_READY_FD").and_then(|v| v.parse::<i32>().ok()) {
        if let Ok(moved) = sys::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) {
            let _ = sys::close(fd);
            READY_FD.store(moved as i32, Ordering::Relaxed);
        }
    }
    let err = match restore(path, force) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    // Nothing of the program runs: the System V objects migrate-resume recreated for it would
    // only keep their keys taken and make a retry fail; the rest of the tree gives up too.
    crate::resources::ipc::remove_recreated(&sysv_ids());
    crate::tree::restore_failed();
    let mut b = crate::log::StackBuf::<2048>::new();
    b.push_bytes(b"migrate-resume: error: ");
    b.push_bytes(err.as_bytes());
    b.push_bytes(b"\n");
    let _ = sys::write_all(ERROR_FD.load(Ordering::Relaxed), b.as_bytes());
    sys::exit_group(5)
}

enum Never {}

/// How this process's pages are checked before it runs.
#[derive(PartialEq, Eq)]
enum PageCheck {
    /// Their sections' checksums were verified (here or by migrate-resume).
    Verified,
    /// Page by page against the image's page hashes (lazy restore).
    ByHash,
}

/// The System V objects migrate-resume recreated (`MIGRATE_SYSV_IDS`, in this exec's
/// environment: read before the switch, which brings back the program's own).
fn sysv_ids() -> alloc::vec::Vec<crate::resources::ipc::Recreated> {
    crate::resources::ipc::parse_env(&crate::env::var("MIGRATE_SYSV_IDS").unwrap_or_default())
}

/// Whether open image `fd` is a file migrate-resume verified (MIGRATE_VERIFIED_IMAGE:
/// `dev:ino:size:mtime:ctime`, one per image of the chain, separated by `;`), unchanged since:
/// any write changes its ctime.
fn verified_by_migrate_resume(fd: i32) -> bool {
    let Some(list) = crate::env::var("MIGRATE_VERIFIED_IMAGE") else { return false };
    let Ok(st) = sys::fstat(fd) else { return false };
    let have = migrate_image::verified_identity(
        st.st_dev,
        st.st_ino,
        st.st_size as u64,
        (st.st_mtime, st.st_mtime_nsec),
        (st.st_ctime, st.st_ctime_nsec),
    );
    list.split(';').any(|want| !want.is_empty() && have == want)
}

/// Opens the ancestors of an incremental image whose pages this process uses (the others stay
/// -1), above descriptor `above`, each checked to be the image the chain names and, unless
/// migrate-resume just verified it, its page sections checked.
fn open_ancestors(
    path: &str,
    tree: &migrate_image::TreeMeta,
    meta: &ImageMeta,
    above: i32,
    by_hash: bool,
) -> Result<alloc::vec::Vec<i32>, String> {
    let mut fds = alloc::vec![-1; tree.ancestors.len()];
    let dir = path.rsplit_once('/').map_or(".", |(d, _)| if d.is_empty() { "/" } else { d });
    for v in &meta.process.vmas {
        for r in &v.inherited {
            let k = r.ancestor as usize;
            if fds[k] >= 0 {
                continue;
            }
            let a = &tree.ancestors[k];
            let apath = format!("{dir}/{}", a.file);
            let reader = migrate_image::ImageReader::open(std::path::Path::new(&apath)).map_err(|e| {
                format!("{e} (it is an ancestor of the incremental image {path}, which takes pages from it)")
            })?;
            let id = reader.tree().map_err(|e| e.to_string())?.image_id;
            if id != a.image_id {
                return Err(format!(
                    "{apath} is not the image {path} was built on (another image took its name); the chain is broken: resume an older image or restore the original {}",
                    a.file
                ));
            }
            // (A lazy restore checks each page it uses against this image's hashes instead.)
            if !by_hash && !verified_by_migrate_resume(reader.file().as_raw_fd()) {
                let mut buf = alloc::vec![0u8; 1 << 20];
                reader
                    .verify_sections(|s| matches!(s.kind, SectionKind::Pages { .. }), &mut buf)
                    .map_err(|e| e.to_string())?;
            }
            fds[k] = sys::fcntl(reader.file().as_raw_fd(), libc::F_DUPFD_CLOEXEC, above as usize)
                .map_err(|e| format!("cannot keep the image {apath} open: {e}"))? as i32;
        }
    }
    Ok(fds)
}

fn restore(path: &[u8], force: bool) -> Result<Never, String> {
    let all = !0u64;
    let _ = sys::rt_sigprocmask(libc::SIG_SETMASK, Some(&all), None);
    let path_str = String::from_utf8_lossy(path).into_owned();
    let proc: u32 = crate::env::var("MIGRATE_PROC").and_then(|v| v.parse().ok()).unwrap_or(0);
    // One open file of the image from here to the switch. This process's pages are checked
    // against their checksums now, before anything of it is restored, and the switch reads
    // them through this same file: an image that changed (or was replaced at its path) since
    // migrate-resume verified it is refused here, never half restored.
    let reader = migrate_image::ImageReader::open(std::path::Path::new(&path_str)).map_err(|e| e.to_string())?;
    let tree = reader.tree().map_err(|e| e.to_string())?;
    let meta = reader.process_meta(proc).map_err(|e| e.to_string())?;
    let sections = reader.sections().to_vec();
    let p = &meta.process;
    // Our copy of migrate-resume's stderr must not sit where a saved descriptor goes.
    let above = p.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(tree.shared_fd_base + tree.shared.len() as i32) + 1;
    for slot in [&ERROR_FD, &READY_FD] {
        let fd = slot.load(Ordering::Relaxed);
        if fd > 2 && fd < above {
            if let Ok(moved) = sys::fcntl(fd, libc::F_DUPFD_CLOEXEC, above as usize) {
                let _ = sys::close(fd);
                slot.store(moved as i32, Ordering::Relaxed);
            }
        }
    }
    // The switch's descriptor of the image: above every saved and handed-down number.
    let image_fd = sys::fcntl(reader.file().as_raw_fd(), libc::F_DUPFD_CLOEXEC, above as usize)
        .map_err(|e| format!("cannot keep the image {path_str} open: {e}"))? as i32;
    // Lazy restore (migrate-resume --lazy): a userfaultfd, and the page server's descriptors
    // out of the program's way, among libmigrate's own when the limit allows.
    let lazy_asked = crate::env::var("MIGRATE_LAZY").is_some_and(|v| v == "1");
    let lazy = if lazy_asked {
        let err = ERROR_FD.load(Ordering::Relaxed);
        match lazy::open(image_fd, err, above.max(state::OWN_FD_BASE + 16))
            .or_else(|_| lazy::open(image_fd, err, above))
        {
            Ok(o) => Some(o),
            Err(e) => {
                warn_lazy(&e);
                None
            }
        }
    } else {
        None
    };
    // This process's pages are checked now, before anything of it is restored, unless
    // migrate-resume verified this very file a moment ago, unchanged. With --lazy it verified
    // everything but the pages: each page is checked against its hash instead, before the
    // switch for those read eagerly, by the page server for the others.
    let pages = if lazy.is_some() {
        // Compressed mappings are decoded by the switch, never by the page server, and their
        // hashes are of the decoded pages: their sections are checked whole now instead.
        let compressed =
            |vma: u32| p.vmas.get(vma as usize).is_some_and(|v| v.compression == migrate_image::PageCompression::Lz4);
        let mut buf = alloc::vec![0u8; 1 << 20];
        reader
            .verify_sections(
                |s| matches!(s.kind, SectionKind::Pages { proc: q, vma } if q == proc && compressed(vma)),
                &mut buf,
            )
            .map_err(|e| e.to_string())?;
        PageCheck::ByHash
    } else if !lazy_asked && verified_by_migrate_resume(reader.file().as_raw_fd()) {
        crate::debug!("the image is the one migrate-resume verified, unchanged: its pages are not read twice");
        PageCheck::Verified
    } else {
        let mut buf = alloc::vec![0u8; 1 << 20];
        reader
            .verify_sections(|s| matches!(s.kind, SectionKind::Pages { proc: q, .. } if q == proc), &mut buf)
            .map_err(|e| e.to_string())?;
        PageCheck::Verified
    };
    let hashes: alloc::vec::Vec<alloc::vec::Vec<u64>> = match pages {
        PageCheck::ByHash => (0..p.vmas.len() as u32)
            .map(|i| reader.page_hashes(proc, i))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?,
        PageCheck::Verified => alloc::vec::Vec::new(),
    };
    let ancestor_fds = open_ancestors(&path_str, &tree, &meta, above, pages == PageCheck::ByHash)?;
    if p.vmas.iter().any(|v| v.kind == migrate_image::VmaKind::Registry) && !crate::tree::registry_fd_valid() {
        return Err("no tree registry was handed down; resume with migrate-resume".into());
    }
    // Descriptors shared with other processes of the tree come from migrate-resume, at
    // shared_fd_base + object index.
    let mut handed: alloc::vec::Vec<(i32, i32)> = tree
        .shared
        .iter()
        .enumerate()
        .flat_map(|(j, e)| {
            e.holders.iter().filter(|&&(k, _)| k == proc).map(move |&(_, fd)| (fd, tree.shared_fd_base + j as i32))
        })
        .collect();
    // Shared memory objects this process maps: kept open for the switch (no descriptor of the
    // program's own number: -1).
    for (j, e) in tree.shared.iter().enumerate() {
        if let migrate_image::SharedObject::Memory { mappings, .. } = &e.object {
            if mappings.iter().any(|m| m.0 == proc) {
                handed.push((-1, tree.shared_fd_base + j as i32));
            }
        }
    }
    let deleted: alloc::vec::Vec<(u32, alloc::vec::Vec<u8>)> = {
        let mut out = alloc::vec::Vec::new();
        for f in &p.fds {
            if let migrate_image::FdKind::Deleted { file, .. } = f.kind {
                let kind = migrate_image::SectionKind::FileContents { proc, file };
                let Some(i) = reader.sections().iter().position(|s| s.kind == kind) else {
                    return Err(format!(
                        "the image lacks the contents of deleted file {}",
                        p.files[file as usize].path
                    ));
                };
                out.push((file, reader.read_section(i).map_err(|e| e.to_string())?));
            }
        }
        out
    };
    // The frame tables of the compressed mappings, for the switch (checked against the runs
    // and the sections by the reader).
    let mut frame_tables: alloc::vec::Vec<(u32, alloc::vec::Vec<u32>)> = alloc::vec::Vec::new();
    for i in 0..p.vmas.len() as u32 {
        if let Some(table) = reader.frame_table(proc, i, &meta).map_err(|e| e.to_string())? {
            frame_tables.push((i, table));
        }
    }
    drop(reader);
    let keep_deleted = crate::env::var("MIGRATE_KEEP_DELETED").is_some_and(|v| v == "1");
    handed.push((-1, ERROR_FD.load(Ordering::Relaxed)));
    handed.push((-1, image_fd));
    if let Some(o) = &lazy {
        handed.extend([o.uffd, o.image_fd, o.out_fd].iter().filter(|&&fd| fd >= 0).map(|&fd| (-1, fd)));
    }
    handed.extend(ancestor_fds.iter().filter(|&&fd| fd >= 0).map(|&fd| (-1, fd)));
    if READY_FD.load(Ordering::Relaxed) >= 0 {
        handed.push((-1, READY_FD.load(Ordering::Relaxed)));
    }
    files::restore(p, force, &handed, &deleted, keep_deleted)?;
    // Shared memory is mapped by the switch from the handed-down memfds; other handed-down
    // descriptors are in place now.
    let mut shared_maps: alloc::vec::Vec<(u64, i32, u64)> = alloc::vec::Vec::new();
    for (j, e) in tree.shared.iter().enumerate() {
        let fd = tree.shared_fd_base + j as i32;
        match &e.object {
            migrate_image::SharedObject::Memory { mappings, .. } => {
                shared_maps.extend(mappings.iter().filter(|m| m.0 == proc).map(|m| (m.1, fd, m.2)));
                if !mappings.iter().any(|m| m.0 == proc) {
                    let _ = sys::close(fd);
                }
            }
            _ => {
                let _ = sys::close(fd);
            }
        }
    }
    signals::restore_actions(&p.signals);
    let current = memory::read_maps().map_err(|e| format!("cannot read /proc/self/maps: {e}"))?;
    let built = match plan::build(
        &meta,
        proc,
        &sections,
        path,
        image_fd,
        &ancestor_fds,
        &current,
        &shared_maps,
        &sysv_ids(),
        lazy.as_ref(),
        &hashes,
        &frame_tables,
    ) {
        Ok(b) => b,
        Err(e) => {
            if let Some(o) = lazy {
                o.close();
            }
            return Err(e);
        }
    };
    drop(frame_tables);
    if !built.lazy {
        if let Some(o) = lazy {
            o.close();
        }
    }
    // The saved rlimits last: a lower RLIMIT_NOFILE would forbid the plan's descriptors.
    process::restore(p)?;
    // SAFETY: build() wrote a complete header at the start of the plan region.
    let plan_len = unsafe { (*(built.addr as *const plan::PlanHeader)).region_len };
    check_address_space(p, plan_len)?;
    // SAFETY: the plan region is mapped and holds a complete plan; its top is the stack.
    unsafe { context::call_on_stack(built.addr, switch::restorer_main, built.stack_top) }
}

/// Lazy restore is not possible here: says so once on migrate-resume's stderr; the restore
/// goes on eagerly.
pub fn warn_lazy(why: &str) {
    let mut b = crate::log::StackBuf::<512>::new();
    b.push_bytes(b"migrate-resume: warning: lazy restore is not available (");
    b.push_bytes(why.as_bytes());
    b.push_bytes(b"); restoring eagerly\n");
    let _ = sys::write_all(ERROR_FD.load(Ordering::Relaxed), b.as_bytes());
}

/// At its peak the switch holds every saved region (special mappings included) and the plan.
/// Under an address-space limit below that it would fail half-way, so say so now, naming the
/// sizes. (A program may lower its RLIMIT_AS below what it has mapped: the kernel only checks
/// new mappings. Its restore cannot.)
fn check_address_space(p: &migrate_image::ProcessEntry, plan_len: u64) -> Result<(), String> {
    const TASK_SIZE: u64 = 0x7fff_ffff_f000;
    let limit = match sys::prlimit(libc::RLIMIT_AS, None) {
        Ok(l) if l.rlim_cur != libc::RLIM64_INFINITY => l.rlim_cur,
        _ => return Ok(()),
    };
    let needed = p.vmas.iter().filter(|v| v.end <= TASK_SIZE).map(|v| v.len()).sum::<u64>() + plan_len;
    if needed <= limit {
        return Ok(());
    }
    let mib = |b: u64| b as f64 / 1048576.0;
    Err(format!(
        "out of memory: the program needs {needed} bytes ({:.1} MiB) of address space, but its address-space limit \
         RLIMIT_AS (saved with it) is {limit} bytes ({:.1} MiB): the limit was lowered below what the program had \
         mapped, which a running process survives but a new one cannot be built under; raise the program's limit \
         (prlimit --pid PID --as=unlimited) and checkpoint it again. The image is intact",
        mib(needed),
        mib(limit)
    ))
}

/// Called on the restored checkpoint thread (see checkpoint::dump_and_write) with the plan's
/// address: finishes the restore and releases the program.
pub fn finish_in_restored_process(plan_addr: usize, meta: &ImageMeta) {
    // SAFETY: the plan region stays mapped until we unmap it below.
    let plan = unsafe { &*(plan_addr as *const plan::PlanHeader) };
    let p = &meta.process;
    // The System V ids the program knows stand for the recreated objects from now on.
    crate::resources::ipc::adopt_restored(plan.sysv());
    if let Some(me) = p.threads.iter().find(|t| t.is_checkpoint_thread) {
        sys::set_robust_list(me.robust_list, me.robust_list_len);
        let mut name = [0u8; 16];
        let n = me.name.len().min(15);
        name[..n].copy_from_slice(&me.name.as_bytes()[..n]);
        sys::set_thread_name(&name);
        let _ = state::PIDS.insert(VirtPid(me.vtid), RealPid(sys::gettid()));
    }
    let _ = state::PIDS.insert(VirtPid(p.vpid), RealPid(sys::getpid()));
    if p.vppid > 0 {
        let _ = state::PIDS.insert(VirtPid(p.vppid), RealPid(sys::getppid()));
    }
    // A leader of its group or session that now lives in migrate-resume's keeps its ids.
    let (real_pid, real_pgid, real_sid) = (sys::getpid(), sys::getpgid(0).unwrap_or(0), sys::getsid(0).unwrap_or(0));
    if p.vpgid == p.vpid && real_pgid != real_pid {
        state::GROUP_ALIAS[0].store(p.vpgid, Ordering::Relaxed);
        state::GROUP_ALIAS[1].store(real_pgid, Ordering::Relaxed);
    }
    if p.vsid == p.vpid && real_sid != real_pid {
        state::SESSION_ALIAS[0].store(p.vsid, Ordering::Relaxed);
        state::SESSION_ALIAS[1].store(real_sid, Ordering::Relaxed);
    }
    // Meet the other processes of the tree: everyone restored before anyone continues, and
    // each learns the others' new real pids.
    crate::tree::join(p.vpid);
    if let Some(r) = crate::tree::registry() {
        r.restored.fetch_add(1, Ordering::AcqRel);
        let expected = r.expected.load(Ordering::Acquire);
        let deadline = sys::monotonic_ns() + 60_000_000_000;
        while r.restored.load(Ordering::Acquire) < expected && sys::monotonic_ns() < deadline {
            let n = r.released.load(Ordering::Acquire);
            if r.failed.load(Ordering::Acquire) > 0 {
                // Another process of the tree could not be restored (its error is on
                // migrate-resume's stderr): a tree with a process missing must not run.
                let _ = sys::write_all(
                    plan.error_fd,
                    b"migrate-resume: error: another process of the tree failed to restore (see its error); this one stops too, the image is intact\n",
                );
                sys::exit_group(5);
            }
            if r.restored.load(Ordering::Acquire) >= expected {
                break;
            }
            let _ = sys::futex_wait_shared(&r.released, n, 10_000_000);
        }
        r.released.fetch_add(1, Ordering::AcqRel);
        sys::futex_wake_shared(&r.released);
        r.for_each(|real, vpid, _| {
            if vpid > 0 {
                let _ = state::PIDS.insert(VirtPid(vpid), RealPid(real));
            }
        });
    }
    // Every process of the tree has attached its segments: those that had been marked for
    // removal are marked again.
    crate::resources::ipc::remove_marked(plan.sysv());
    // Wait for every program thread to be back in its handler (so nothing runs on the plan's
    // stack any more), then drop the plan.
    let expected = (p.threads.len() - 1) as u32;
    let deadline = sys::monotonic_ns() + 30_000_000_000;
    loop {
        let n = suspend::RESTORED_ARRIVED.load(Ordering::Acquire);
        if n >= expected || sys::monotonic_ns() > deadline {
            break;
        }
        let _ = sys::futex_wait(&suspend::RESTORED_ARRIVED, n, 50_000_000);
    }
    if !p.threads.iter().any(|t| t.vtid == p.vpid) {
        // The restorer's thread leaves as a zombie leader; wait until it is off the plan's stack.
        let word = &plan.leader_exit_word as *const u32 as *const core::sync::atomic::AtomicU32;
        // SAFETY: the word lies in the plan region, mapped until below.
        let word = unsafe { &*word };
        let deadline = sys::monotonic_ns() + 10_000_000_000;
        while word.load(Ordering::Acquire) != 0 && sys::monotonic_ns() < deadline {
            let _ = sys::futex_wait(word, 1, 10_000_000);
        }
    }
    // Connections that waited to be accepted: rebuilt before the network lock is lifted.
    let waiting = crate::resources::accept_queue::rebuild(p);
    if plan.ready_fd >= 0 {
        // The whole tree is restored: migrate-resume's helper lifts the network lock (or the
        // --listen daemon hears from the source that its copy is gone), and the program goes
        // on only on its word. Without it — the helper or daemon died, the migration was
        // called off — this copy must not run: the original may be running still.
        let _ = sys::write_all(plan.ready_fd, b"1");
        let mut pfd = [libc::pollfd { fd: plan.ready_fd, events: libc::POLLIN, revents: 0 }];
        let mut word = [0u8; 1];
        let go = sys::poll(&mut pfd, 120_000).is_ok_and(|n| n > 0)
            && sys::read(plan.ready_fd, &mut word).is_ok_and(|n| n == 1)
            && word[0] == 1;
        if !go {
            let _ = sys::write_all(
                plan.error_fd,
                b"migrate-resume: error: the resume was called off before the program ran (the migration did not complete); this copy exits\n",
            );
            sys::exit_group(5);
        }
        let _ = sys::close(plan.ready_fd);
    }
    crate::resources::accept_queue::park_restored(waiting);
    // The job that had the terminal has it again (all groups exist now).
    crate::resources::files::retake_foreground(p);
    // Armed now, with what they had left: no program thread runs before release_all below.
    crate::resources::timers::restore(&p.timers);
    if plan.error_fd > 2 {
        let _ = sys::close(plan.error_fd);
    }

    if plan.window_changed != 0 {
        // Delivered when the program's own mask comes back, like a real resize.
        let _ = sys::kill(sys::getpid(), libc::SIGWINCH);
    }
    let image = String::from_utf8_lossy(plan.image_path()).into_owned();
    // SAFETY: nothing uses the plan region any more.
    let _ = unsafe { sys::munmap(plan.region_start as usize, plan.region_len as usize) };
    if let Err(e) = control::open_channel() {
        crate::info!("cannot open the control socket after resume: {e}; checkpoints by signal only");
    }
    crate::debug!("resumed from {image} as real pid {}", sys::getpid());
    suspend::release_all();
}

/// Reads MIGRATE_RESTORE / MIGRATE_FORCE: `Some((image path, force))` when this process is a
/// resume.
pub fn requested() -> Option<(alloc::vec::Vec<u8>, bool)> {
    let path = crate::env::var_bytes("MIGRATE_RESTORE")?;
    let force = crate::env::var("MIGRATE_FORCE").is_some_and(|v| v == "1");
    Some((path, force))
}
