//! `migrate-resume`: verify an image and this machine, then exec the saved program with
//! `MIGRATE_RESTORE` set; libmigrate's constructor in the new process does the restore.
//!
//! Everything that can be checked from outside is checked here, before the exec, so that a
//! mismatch is reported clearly instead of crashing the restored program: the image's
//! checksums, the CPU's register-state features, the kernel's vdso, every mapped binary and
//! library, every open regular file, and libmigrate itself. Then the saved rlimits and
//! personality are applied, because the address-space layout of the exec depends on them.

use crate::cli::ResumeArgs;
use crate::exit::{fail, warn, WithCode, IMAGE, TARGET};
use crate::host;
use crate::preload::with_rseq_off;
use crate::text::{limit, rlimit_name, utc_time};
use anyhow::Context;
use migrate_image::{FdKind, FileIdentity, ImageMeta, ImageReader, SectionKind, TreeMeta, PROT_EXEC};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, IsTerminal, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Images with more section bytes than this show the verification's progress on a terminal.
const VERIFY_PROGRESS_MIN: u64 = 64 << 20;
/// How often the progress line is updated.
const PROGRESS_PERIOD: Duration = Duration::from_millis(200);

pub fn main(args: ResumeArgs) -> anyhow::Result<()> {
    if let Some(addr) = &args.listen {
        return super::receive::listen(&args, addr);
    }
    let image_arg = args.image.clone().expect("clap requires IMAGE without --listen");
    // Read by libmigrate in the resumed processes and by net.rs for sockets handed down.
    if args.tcp_reset {
        std::env::set_var("MIGRATE_TCP_RESET", "1");
    } else {
        std::env::remove_var("MIGRATE_TCP_RESET");
    }
    let reader = ImageReader::open(&image_arg)?;
    let tree = reader.tree()?;
    // Every return from here on is a failed resume (success execs the program).
    // (Not when a --listen daemon started us: it decides about the lock.)
    let _notice = (!tree.network_lock.is_empty() && args.ready_fd.is_none())
        .then(|| super::netlock::KeptNotice(tree.network_lock.clone()));
    let metas: Vec<ImageMeta> =
        (0..tree.processes.len() as u32).map(|k| reader.process_meta(k)).collect::<Result<_, _>>()?;
    // Lazy restore needs a userfaultfd, with the rights the tree will have: checked once here,
    // so that one warning says why the resume is eager instead. It reads every section but the
    // pages now; each page is checked against its hash when it is brought in.
    let lazy = args.lazy && lazy_available();
    let verify = |reader: &ImageReader| {
        if lazy {
            reader.verify_sections(|s| !matches!(s.kind, SectionKind::Pages { .. }), &mut vec![0u8; 1 << 20])
        } else {
            // (Started by a --listen daemon, the terminal is the daemon's: it shows its own progress.)
            verify_all(reader, args.ready_fd.is_none())
        }
    };
    verify(&reader)?;
    // An incremental image takes pages from its ancestors: each is checked as a whole too.
    let ancestors = super::chain::open_ancestors(&image_arg, &tree, &metas)?;
    for a in &ancestors {
        verify(&a.reader)?;
    }
    // The restore in the new process checks its pages again unless the file is the very one
    // verified here, unchanged (a write changes its ctime): this spares a second read.
    let identities: Vec<String> =
        std::iter::once(reader.file()).chain(ancestors.iter().map(|a| a.reader.file())).map(file_identity).collect();
    std::env::set_var("MIGRATE_VERIFIED_IMAGE", identities.join(";"));
    drop(ancestors);
    let image = fs::canonicalize(&image_arg)
        .with_context(|| format!("cannot resolve the image path {}", image_arg.display()))
        .code(IMAGE)?;
    check_cpu(&metas[0])?;
    check_vdso(&metas[0])?;

    // Everything that can fail is checked and prepared before the first fork.
    let mut commands = Vec::with_capacity(metas.len());
    for (k, meta) in metas.iter().enumerate() {
        let mut cmd = prepare(&reader, &tree, meta, k as u32, &image, &args)?;
        if lazy {
            cmd.env("MIGRATE_LAZY", "1");
        } else {
            cmd.env_remove("MIGRATE_LAZY");
        }
        commands.push(cmd);
    }
    let memory = super::tree::build_memory(&reader, &tree)?;
    // System V objects, with their keys (a key taken here fails the resume); removed again if
    // the resume fails before the program runs (`sysv` is dropped only then).
    let sysv = super::ipc::recreate(&tree)?;
    for cmd in commands.iter_mut() {
        if sysv.env.is_empty() {
            cmd.env_remove("MIGRATE_SYSV_IDS");
        } else {
            cmd.env("MIGRATE_SYSV_IDS", &sysv.env);
        }
    }
    // The reader's descriptor must not sit where a shared object goes. Descriptors are placed
    // before the rlimits: a lower RLIMIT_NOFILE does not close them, but would forbid placing them.
    drop(reader);
    super::tree::hand_down(&tree, memory)?;
    apply_rlimits(&metas[0])?;
    // The tree's TCP traffic was held at the checkpoint: lifted once the tree is restored.
    // Kept open until the exec, which the tree inherits (its processes are forked from here).
    let ready = if let Some(fd) = args.ready_fd {
        // Whoever started us (the --listen daemon) lifts the lock and answers the tree.
        std::env::set_var("MIGRATE_READY_FD", fd.to_string());
        None
    } else if tree.network_lock.is_empty() {
        None
    } else {
        match super::netlock::spawn_unlocker(&tree.network_lock, tree.processes.len()) {
            Ok(fd) => {
                std::env::set_var("MIGRATE_READY_FD", super::netlock::env_value(&fd));
                Some(fd)
            }
            Err(e) => {
                warn(
                    "resume",
                    &format!(
                        "cannot start the helper that lifts network lock {} ({e}); lift it with: nft delete table inet {}",
                        tree.network_lock, tree.network_lock
                    ),
                );
                None
            }
        }
    };
    // The tree forked or exec'd from here on reads the clocks it left off with. Unprivileged,
    // this joins a user namespace of our own (timens.rs): only ever when we hold no capability,
    // so nothing above or below (exact pids, ports) loses a privilege it had.
    if !args.host_clocks {
        super::timens::enter(&metas[0].host.clocks);
    }
    let exact = !args.virtual_pids;
    if exact {
        match super::exact_pids::fork_with_pid(metas[0].process.vpid, args.exact_pids) {
            super::exact_pids::Forked::Child => {}
            super::exact_pids::Forked::Parent(child) => {
                drop(ready); // only the tree tells the helper
                super::exact_pids::wait_and_exit(child)
            }
            super::exact_pids::Forked::Unavailable => {}
        }
    }
    let result = super::tree::become_process(0, &tree, &metas, commands, exact);
    drop(ready);
    drop(sysv);
    result
}

/// Whether this process may create a userfaultfd that handles kernel faults too (the system
/// call, else /dev/userfaultfd); warns (once) and returns false when not.
fn lazy_available() -> bool {
    // SAFETY: userfaultfd(2) takes flags only; the descriptor is closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) } as i32;
    if fd >= 0 {
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        return true;
    }
    let err = io::Error::last_os_error();
    // The device, which an administrator may open to users the sysctl turns away.
    const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;
    if let Ok(dev) = fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd") {
        use std::os::fd::AsRawFd;
        // SAFETY: the documented ioctl on the device, with flags as its argument.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd >= 0 {
            // SAFETY: our own descriptor.
            unsafe { libc::close(fd) };
            return true;
        }
    }
    let hint = if err.raw_os_error() == Some(libc::EPERM) {
        ": as an ordinary user it needs the sysctl vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd"
    } else {
        ""
    };
    warn("resume", &format!("lazy restore is not available (userfaultfd: {err}{hint}); restoring eagerly"));
    false
}

/// The identity of an open image file, as libmigrate's restore compares it (restore/mod.rs).
fn file_identity(file: &fs::File) -> String {
    use std::os::unix::fs::MetadataExt;
    match file.metadata() {
        Ok(m) => migrate_image::verified_identity(
            m.dev(),
            m.ino(),
            m.size(),
            (m.mtime(), m.mtime_nsec()),
            (m.ctime(), m.ctime_nsec()),
        ),
        Err(_) => String::new(),
    }
}

/// `reader.verify_all()`, which reads every section of the image once; with `show`, on a
/// terminal and for a large image, it shows the bytes verified so far and the rate meanwhile,
/// then clears the line. The bytes are this process's read count (rchar in /proc/self/io):
/// nothing else reads here meanwhile.
fn verify_all(reader: &ImageReader, show: bool) -> Result<(), migrate_image::ImageError> {
    let total: u64 = reader.sections().iter().map(|s| s.length).sum();
    let base = match read_chars() {
        Some(base) if show && total > VERIFY_PROGRESS_MIN && io::stderr().is_terminal() => base,
        _ => return reader.verify_all(),
    };
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let started = Instant::now();
            let mut shown = false;
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(PROGRESS_PERIOD) {
                let Some(now) = read_chars() else { break };
                let done = now.saturating_sub(base).min(total);
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                eprint!(
                    "\r\x1b[Kmigrate-resume: verifying the image: {:.1} of {:.1} MB, {:.0} MB/s",
                    done as f64 / 1e6,
                    total as f64 / 1e6,
                    done as f64 / 1e6 / secs
                );
                shown = true;
            }
            if shown {
                eprint!("\r\x1b[K");
            }
        });
        let result = reader.verify_all();
        drop(stop);
        result
    })
}

/// The bytes this process has read so far (rchar of /proc/self/io, all threads).
fn read_chars() -> Option<u64> {
    let io = fs::read_to_string("/proc/self/io").ok()?;
    io.lines().find_map(|l| l.strip_prefix("rchar:")).and_then(|v| v.trim().parse().ok())
}

/// The exec of process `k`: its binary (or the image's copy of it), argv, and the environment
/// its restore needs. Checks its files first.
fn prepare(
    reader: &ImageReader,
    tree: &TreeMeta,
    meta: &ImageMeta,
    k: u32,
    image: &Path,
    args: &ResumeArgs,
) -> anyhow::Result<Command> {
    let carried: Vec<u32> = reader
        .sections()
        .iter()
        .filter_map(|s| match s.kind {
            SectionKind::FileContents { proc, file } if proc == k => Some(file),
            _ => None,
        })
        .collect();
    let handed: Vec<i32> =
        tree.shared.iter().flat_map(|e| e.holders.iter().filter(|h| h.0 == k).map(|h| h.1)).collect();
    let checked = check_files(meta, &carried, args.force, &handed)?;
    for w in &checked.warnings {
        warn("resume", w);
    }
    let p = &meta.process;
    let mut copies: Vec<(u32, PathBuf)> = Vec::new();
    for &index in &checked.substitute {
        let copy = extract(reader, meta, k, index)?;
        warn(
            "resume",
            &format!(
                "{} is missing or differs here; using the copy stored in the image ({})",
                p.files[index as usize].path,
                copy.display()
            ),
        );
        copies.push((index, copy));
    }
    let copy_of = |index: u32| copies.iter().find(|(i, _)| *i == index).map(|(_, c)| c.clone());

    let exe = copy_of(p.exe).unwrap_or_else(|| PathBuf::from(&p.files[p.exe as usize].path));
    refuse_privileged(Path::new(&exe))?;
    let exe = exe.to_string_lossy().into_owned();
    let mut cmd = Command::new(&exe);
    match p.argv.split_first() {
        Some((argv0, rest)) => cmd.arg0(argv0).args(rest),
        None => cmd.arg0(&exe),
    };
    match copy_of(p.libmigrate) {
        // Same file contents, so the same layout; only the path differs.
        Some(lib) => {
            let rest: Vec<&str> = p.ld_preload.split([':', ' ']).filter(|s| !s.is_empty()).skip(1).collect();
            let mut list = lib.to_string_lossy().into_owned();
            for r in rest {
                list.push(':');
                list.push_str(r);
            }
            cmd.env("LD_PRELOAD", list)
        }
        None => cmd.env("LD_PRELOAD", &p.ld_preload),
    };
    if !copies.is_empty() {
        let libs = library_dir(&copies, meta)?;
        cmd.env("LD_LIBRARY_PATH", libs);
        let map: String =
            copies.iter().map(|(i, c)| format!("{}\t{}\n", p.files[*i as usize].path, c.display())).collect();
        cmd.env("MIGRATE_FILE_MAP", map);
    } else {
        cmd.env_remove("MIGRATE_FILE_MAP");
    }
    cmd.env("GLIBC_TUNABLES", with_rseq_off(std::env::var_os("GLIBC_TUNABLES").as_deref()));
    cmd.env("MIGRATE_RESTORE", image);
    cmd.env("MIGRATE_PROC", k.to_string());
    cmd.env_remove("MIGRATE_NEW_TREE");
    if args.keep_deleted {
        cmd.env("MIGRATE_KEEP_DELETED", "1");
    } else {
        cmd.env_remove("MIGRATE_KEEP_DELETED");
    }
    if args.force {
        cmd.env("MIGRATE_FORCE", "1");
    } else {
        cmd.env_remove("MIGRATE_FORCE");
    }
    if !args.virtual_pids {
        cmd.env("MIGRATE_EXACT_PIDS", "1");
    } else {
        cmd.env_remove("MIGRATE_EXACT_PIDS");
    }
    Ok(cmd)
}

/// A resumed program never gets more privileges than the user who resumes it: an executable
/// that is set-user-ID, set-group-ID or carries file capabilities is refused, whoever resumes
/// and whoever owns it. (Exec would grant them; the dynamic loader would also ignore
/// LD_PRELOAD, so the program would start afresh, privileged, instead of being restored.)
/// Checked right before the tree is created; migrate-run refuses such programs at start too.
pub fn refuse_privileged(path: &Path) -> anyhow::Result<()> {
    let md = match fs::metadata(path) {
        Ok(md) => md,
        Err(e) => return Err(fail(TARGET, format!("cannot check the program {}: {e}", path.display()))),
    };
    let mode = md.mode();
    let found = if mode & libc::S_ISUID != 0 {
        Some((
            format!("is set-user-ID (owner uid {}, mode {:o})", md.uid(), mode & 0o7777),
            "remove the bit (chmod u-s)",
        ))
    } else if mode & libc::S_ISGID != 0 && mode & libc::S_IXGRP != 0 {
        Some((
            format!("is set-group-ID (group gid {}, mode {:o})", md.gid(), mode & 0o7777),
            "remove the bit (chmod g-s)",
        ))
    } else {
        has_file_capabilities(path)
            .then(|| ("carries file capabilities (security.capability)".to_string(), "remove them (setcap -r)"))
    };
    match found {
        Some((what, fix)) => Err(fail(
            TARGET,
            format!(
                "{} {what}: a resumed program never gets more privileges than the user who resumes it, so migrate-resume refuses privileged executables; {fix} to resume it",
                path.display()
            ),
        )),
        None => Ok(()),
    }
}

/// Whether `path` carries file capabilities (a `security.capability` extended attribute).
pub fn has_file_capabilities(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: a size query (no buffer) on a NUL-terminated path that outlives the call.
    unsafe { libc::getxattr(c.as_ptr(), c"security.capability".as_ptr(), std::ptr::null_mut(), 0) >= 0 }
}

/// The saved register state must fit this CPU: XCR0 must contain every feature the image's
/// signal frames hold, and the xsave area must be at least as large.
pub fn check_cpu(meta: &ImageMeta) -> anyhow::Result<()> {
    let want = meta.host.cpu.xfeatures;
    let have = host::xcr0().unwrap_or(0);
    let missing = want & !have;
    if missing != 0 {
        let names = host::xfeature_names(missing).join("/");
        return Err(fail(
            TARGET,
            format!(
                "this CPU lacks register-state features the image needs (xfeatures {want:#x} vs {have:#x}, missing {names}); resume on a CPU with {names}"
            ),
        ));
    }
    let (want_size, have_size) = (meta.host.cpu.xsave_size, host::xsave_size().unwrap_or(0));
    if want != 0 && want_size > have_size {
        return Err(fail(
            TARGET,
            format!(
                "the image's xsave area ({want_size} bytes) is larger than this CPU's ({have_size} bytes); resume on a CPU of the kind the checkpoint was taken on ({})",
                meta.host.cpu.vendor
            ),
        ));
    }
    Ok(())
}

/// The vdso is not saved: the kernel provides it, so it must be the same build.
pub fn check_vdso(meta: &ImageMeta) -> anyhow::Result<()> {
    let (want_hash, want_len) = (meta.host.vdso_hash, meta.host.vdso_len);
    if want_hash == 0 && want_len == 0 {
        return Ok(()); // not recorded
    }
    let (have_hash, have_len) = host::vdso_hash().unwrap_or((0, 0));
    if (have_hash, have_len) != (want_hash, want_len) {
        return Err(fail(
            TARGET,
            format!(
                "the kernel's vdso differs from the checkpointed one (kernel {} vs {}); resume on a host running the same kernel build",
                meta.host.kernel_release,
                host::kernel_release()
            ),
        ));
    }
    Ok(())
}

/// How the program used a file, strictest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Use {
    /// Mapped code (executable, libraries, libmigrate): the layout depends on it.
    Code(&'static str),
    /// Mapped data (not executable): restored by mapping it again.
    Data,
    /// An open regular file descriptor: reopened by path.
    Open,
}

impl Use {
    fn noun(self) -> &'static str {
        match self {
            Use::Code(n) => n,
            Use::Data => "mapped file",
            Use::Open => "file",
        }
    }
}

/// Checks every file the program mapped or held open against its recorded identity. Returns
/// the warnings (mismatches that `--force` lets through); fails with the first error.
/// The result of checking the files: warnings to print, and the carried files this host lacks
/// (index into `files`), to be taken from the image.
pub struct FileCheck {
    pub warnings: Vec<String>,
    pub substitute: Vec<u32>,
}

/// `handed` are descriptors the tree hands down (shared with other processes): whatever this
/// process's own entry says about them does not apply.
pub fn check_files(meta: &ImageMeta, carried: &[u32], force: bool, handed: &[i32]) -> anyhow::Result<FileCheck> {
    let p = &meta.process;
    let mut uses: BTreeMap<u32, Use> = BTreeMap::new();
    let mut note = |i: u32, u: Use| {
        let e = uses.entry(i).or_insert(u);
        *e = (*e).min(u);
    };
    note(p.exe, Use::Code("binary"));
    note(p.libmigrate, Use::Code("libmigrate"));
    for v in &p.vmas {
        if let Some(f) = v.file {
            note(f, if v.prot & PROT_EXEC != 0 { Use::Code("library") } else { Use::Data });
        }
    }
    for fd in &p.fds {
        if let FdKind::Regular { file, .. } = fd.kind {
            note(file, Use::Open);
        }
    }
    let same_boot = host::boot_id().is_some_and(|b| b == meta.host.boot_id);

    let loader = dynamic_loader(meta);
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut substitute = Vec::new();
    for (&index, &u) in &uses {
        let Some(id) = p.files.get(index as usize) else {
            continue;
        };
        let forceable = u >= Use::Data;
        let result = compare(id, u == Use::Open && same_boot);
        if carried.contains(&index) && !matches!(result, Ok(None)) {
            if Some(index) == loader {
                errors.push(format!(
                    "the dynamic loader {} differs on this host or is missing, and migrate cannot carry it (the kernel loads it by path); resume on a host with the same loader build",
                    id.path
                ));
            } else {
                substitute.push(index); // the image holds the contents
            }
            continue;
        }
        match result {
            Ok(None) => {}
            Ok(Some(change)) if forceable && force => warnings.push(format!(
                "{} {} changed since the checkpoint ({change}); resuming anyway (--force)",
                u.noun(),
                id.path
            )),
            Ok(Some(change)) => {
                let fix = if forceable {
                    "restore the original file or pass --force"
                } else {
                    "restore the original file (--force cannot help: the program's memory layout depends on it)"
                };
                errors.push(format!("{} {} changed since the checkpoint ({change}); {fix}", u.noun(), id.path));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => errors.push(format!(
                "{} {} is missing on this host; copy it here (or checkpoint with --with-binaries)",
                u.noun(),
                id.path
            )),
            Err(e) => errors.push(format!("cannot check {} {}: {e}", u.noun(), id.path)),
        }
    }

    // The preloaded libmigrate is loaded by path from LD_PRELOAD: check that path too.
    let first = p.ld_preload.split([':', ' ']).find(|s| !s.is_empty());
    let lib = &p.files[p.libmigrate as usize];
    match first {
        None => return Err(fail(IMAGE, "the image records no LD_PRELOAD; it was not written by libmigrate")),
        Some(path) if path != lib.path => {
            let id = FileIdentity { path: path.to_string(), ..lib.clone() };
            match compare(&id, false) {
                Ok(None) => {}
                Ok(Some(change)) => errors.push(format!(
                    "libmigrate {path} differs from the one the program ran with ({change}); install the same migrate build at that path"
                )),
                Err(e) => errors.push(format!(
                    "libmigrate {path} cannot be used ({e}); install the same migrate build at that path"
                )),
            }
        }
        Some(_) => {}
    }

    // The addresses the program listens on (or is bound to) must be free here.
    for fd in p.fds.iter().filter(|f| !handed.contains(&f.fd)) {
        if let FdKind::Socket { domain, sock_type, local, peer, listening, .. } = &fd.kind {
            let inet = *domain == libc::AF_INET || *domain == libc::AF_INET6;
            let port = if local.len() >= 4 { u16::from_be_bytes([local[2], local[3]]) } else { 0 };
            if inet && port != 0 && (*listening || peer.is_none()) && !can_bind(*domain, *sock_type, local) {
                errors.push(format!(
                    "{} is in use on this host (fd {} of the program listens there); stop what holds it, or resume elsewhere",
                    super::inspect::sockaddr_text(local),
                    fd.fd
                ));
            }
        }
    }
    // Connections the kernel had completed but the program not yet accepted died with the old
    // socket: say so (their clients saw a reset and must retry).
    for fd in p.fds.iter() {
        if let FdKind::Socket { listening: true, waiting, local, .. } = &fd.kind {
            if *waiting > 0 {
                warnings.push(format!(
                    "{waiting} connections waiting to be accepted on {} (fd {}) at checkpoint time were not carried; their clients saw a reset",
                    super::inspect::sockaddr_text(local),
                    fd.fd
                ));
            }
        }
    }
    for fd in p.fds.iter().filter(|f| !handed.contains(&f.fd)) {
        if let FdKind::Detached { what, .. } = &fd.kind {
            warnings.push(format!(
                "fd {} ({what}) led outside the checkpoint; it is restored disconnected (end-of-file / EPIPE)",
                fd.fd
            ));
        }
        if let FdKind::Unsupported { what } = &fd.kind {
            if force {
                warnings.push(format!("fd {} ({what}) cannot be restored; it becomes /dev/null (--force)", fd.fd));
            } else {
                errors.push(format!(
                    "fd {} ({what}) cannot be restored by this version of migrate; pass --force to resume with /dev/null in its place",
                    fd.fd
                ));
            }
        }
    }

    match errors.len() {
        0 => Ok(FileCheck { warnings, substitute }),
        1 => Err(fail(TARGET, errors.remove(0))),
        n => Err(fail(TARGET, format!("{} (and {} more problems)", errors[0], n - 1))),
    }
}

/// Compares a file on disk with its recorded identity: `Ok(None)` if it is the same,
/// `Ok(Some(what changed))` if not, `Err` if it cannot be read.
fn compare(id: &FileIdentity, check_inode: bool) -> io::Result<Option<String>> {
    let md = fs::metadata(&id.path)?;
    let mtime = md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128;
    if let Some(want) = id.hash {
        // Code is recognised by content: on another host the same library has another mtime.
        if md.size() != id.size {
            return Ok(Some(format!("size {}→{}", id.size, md.size())));
        }
        let have = hash_file(Path::new(&id.path))?;
        if have != want {
            return Ok(Some(format!("contents differ: xxh3 {want:#018x}→{have:#018x}")));
        }
        return Ok(None);
    }
    if md.size() != id.size || mtime != id.mtime_ns as i128 {
        return Ok(Some(format!(
            "size {}→{}, modified {}→{}",
            id.size,
            md.size(),
            utc_time(id.mtime_ns as i128),
            utc_time(mtime)
        )));
    }
    if check_inode && (md.dev() != id.dev || md.ino() != id.ino) {
        return Ok(Some(format!("replaced: inode {}:{}→{}:{}", id.dev, id.ino, md.dev(), md.ino())));
    }
    if let Some(want) = id.hash {
        let have = hash_file(Path::new(&id.path))?;
        if have != want {
            return Ok(Some(format!("contents differ: xxh3 {want:#018x}→{have:#018x}")));
        }
    }
    Ok(None)
}

/// xxh3-64 of a whole file (the same value as `xxh3_64` over its bytes).
pub fn hash_file(path: &Path) -> io::Result<u64> {
    // The user's persistent cache (migrate_image::file_hashes); libmigrate fills it at
    // checkpoint time too.
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let xdg = std::env::var("XDG_RUNTIME_DIR").ok();
    migrate_image::file_hashes::cached(path, uid, xdg.as_deref(), || hash_file_contents(path))
}

/// The xxh3-64 of a file's whole contents.
fn hash_file_contents(path: &Path) -> io::Result<u64> {
    let mut f = fs::File::open(path)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hasher.digest())
}

fn getrlimit(resource: u32) -> io::Result<(u64, u64)> {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `rl` is a valid, writable rlimit for the duration of the call.
    let r = unsafe { libc::getrlimit(resource as _, &mut rl) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((rl.rlim_cur, rl.rlim_max))
}

fn setrlimit(resource: u32, cur: u64, max: u64) -> io::Result<()> {
    let rl = libc::rlimit { rlim_cur: cur, rlim_max: max };
    // SAFETY: `rl` is a valid rlimit that setrlimit only reads.
    let r = unsafe { libc::setrlimit(resource as _, &rl) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets every saved rlimit (RLIMIT_STACK moves the libraries). Hard limits that must be
/// raised go first; if one cannot be raised, the ones already changed are put back and
/// nothing is lowered.
pub fn apply_rlimits(meta: &ImageMeta) -> anyhow::Result<()> {
    let limits = &meta.process.rlimits;
    let mut old = Vec::with_capacity(limits.len());
    for l in limits {
        match getrlimit(l.resource) {
            Ok(v) => old.push(Some(v)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                warn("resume", &format!("this kernel does not know {}; not restored", rlimit_name(l.resource)));
                old.push(None);
            }
            Err(e) => return Err(fail(TARGET, format!("cannot read {}: {e}", rlimit_name(l.resource)))),
        }
    }
    let mut raised: Vec<usize> = Vec::new();
    for (i, l) in limits.iter().enumerate() {
        let Some((_, old_max)) = old[i] else { continue };
        if l.max <= old_max {
            continue;
        }
        if let Err(e) = setrlimit(l.resource, l.cur.min(l.max), l.max) {
            for &j in &raised {
                if let Some((c, m)) = old[j] {
                    let _ = setrlimit(limits[j].resource, c, m);
                }
            }
            let why = if e.raw_os_error() == Some(libc::EPERM) {
                let mut why = "raising a hard limit needs CAP_SYS_RESOURCE".to_string();
                if l.resource == libc::RLIMIT_NOFILE {
                    why.push_str(", and RLIMIT_NOFILE cannot exceed fs.nr_open");
                }
                why
            } else {
                e.to_string()
            };
            return Err(fail(
                TARGET,
                format!(
                    "cannot raise {} to {} (hard limit here {}; {why}); resume from a shell whose hard limit allows it (ulimit -H)",
                    rlimit_name(l.resource),
                    limit(l.max),
                    limit(old_max)
                ),
            ));
        }
        raised.push(i);
    }
    for (i, l) in limits.iter().enumerate() {
        if old[i].is_none() || raised.contains(&i) {
            continue;
        }
        setrlimit(l.resource, l.cur.min(l.max), l.max).map_err(|e| {
            fail(TARGET, format!("cannot set {} to {}/{}: {e}", rlimit_name(l.resource), limit(l.cur), limit(l.max)))
        })?;
    }
    Ok(())
}

/// Whether this host lets a socket bind `addr` now (with SO_REUSEADDR, as the restore does).
fn can_bind(domain: i32, sock_type: i32, addr: &[u8]) -> bool {
    // SAFETY: a throwaway socket; the saved address bytes with their length.
    unsafe {
        let fd = libc::socket(domain, sock_type | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return true; // cannot tell: let the restore report it
        }
        let one: libc::c_int = 1;
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one as *const _ as *const libc::c_void, 4);
        let ok = libc::bind(fd, addr.as_ptr() as *const libc::sockaddr, addr.len() as u32) == 0
            || std::io::Error::last_os_error().raw_os_error() != Some(libc::EADDRINUSE);
        libc::close(fd);
        ok
    }
}

/// The file the dynamic loader was mapped from: the mapping at auxv's AT_BASE.
fn dynamic_loader(meta: &ImageMeta) -> Option<u32> {
    const AT_BASE: u64 = 7;
    let auxv = &meta.process.auxv;
    let base = auxv.chunks_exact(2).find(|kv| kv[0] == AT_BASE)?[1];
    meta.process.vmas.iter().find(|v| v.start == base)?.file
}

/// A private directory for files taken out of images: $XDG_RUNTIME_DIR/migrate/files, else
/// /tmp/migrate-<uid>/files; every level owned by us and 0700 (never follow a planted link).
fn cache_dir() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let root = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("migrate"),
        _ => PathBuf::from(format!("/tmp/migrate-{uid}")),
    };
    for dir in [root.clone(), root.join("files")] {
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(fail(TARGET, format!("cannot create {}: {e}", dir.display()))),
        }
        let md = fs::symlink_metadata(&dir).map_err(|e| fail(TARGET, format!("cannot use {}: {e}", dir.display())))?;
        if !md.is_dir() || md.uid() != uid || md.permissions().mode() & 0o077 != 0 {
            return Err(fail(
                TARGET,
                format!("{} is not a private directory of uid {uid} (mode 0700); remove it and retry", dir.display()),
            ));
        }
    }
    Ok(root.join("files"))
}

/// Writes the image's copy of file `index` into the cache (verified by its content hash) and
/// returns its path. An earlier extraction with the right contents is reused.
fn extract(reader: &ImageReader, meta: &ImageMeta, proc: u32, index: u32) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let id = &meta.process.files[index as usize];
    let want = id.hash.ok_or_else(|| fail(IMAGE, format!("the image stores {} without a content hash", id.path)))?;
    let name = Path::new(&id.path).file_name().map(|n| n.to_owned()).unwrap_or_else(|| "file".into());
    let dir = cache_dir()?.join(format!("{want:016x}"));
    fs::create_dir_all(&dir).map_err(|e| fail(TARGET, format!("cannot create {}: {e}", dir.display())))?;
    let dest = dir.join(name);
    if hash_file_contents(&dest).is_ok_and(|h| h == want) {
        return Ok(dest);
    }
    let section = reader
        .sections()
        .iter()
        .position(|s| s.kind == SectionKind::FileContents { proc, file: index })
        .ok_or_else(|| fail(IMAGE, format!("the image lists {} as stored but has no section for it", id.path)))?;
    let bytes = reader.read_section(section)?;
    let have = xxhash_rust::xxh3::xxh3_64(&bytes);
    if have != want {
        return Err(fail(IMAGE, format!("the stored copy of {} does not match its recorded hash", id.path)));
    }
    let tmp = dir.join(format!(".tmp-{}", std::process::id()));
    fs::write(&tmp, &bytes)
        .and_then(|_| fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)))
        .and_then(|_| fs::rename(&tmp, &dest))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            fail(TARGET, format!("cannot write {}: {e} (is the disk full?)", dest.display()))
        })?;
    Ok(dest)
}

/// A directory of links, named as the program's libraries were, to the extracted copies: put
/// first on LD_LIBRARY_PATH so the dynamic loader maps the copies where the originals were.
fn library_dir(copies: &[(u32, PathBuf)], meta: &ImageMeta) -> anyhow::Result<PathBuf> {
    let p = &meta.process;
    // Named after the copies it links to, so resumes of the same image share it.
    let key: String = copies.iter().map(|(_, c)| c.to_string_lossy().into_owned()).collect();
    let dir = cache_dir()?.join(format!("libs-{:016x}", xxhash_rust::xxh3::xxh3_64(key.as_bytes())));
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(fail(TARGET, format!("cannot create {}: {e}", dir.display()))),
    }
    for (index, copy) in copies {
        if *index == p.exe || *index == p.libmigrate {
            continue;
        }
        if let Some(name) = Path::new(&p.files[*index as usize].path).file_name() {
            match std::os::unix::fs::symlink(copy, dir.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(fail(TARGET, format!("cannot link {}: {e}", copy.display()))),
            }
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn privileged_executables_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("prog");
        fs::copy("/bin/true", &prog).unwrap();
        fs::set_permissions(&prog, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(refuse_privileged(&prog).is_ok());
        for (mode, what) in [(0o4755, "set-user-ID"), (0o2755, "set-group-ID")] {
            fs::set_permissions(&prog, fs::Permissions::from_mode(mode)).unwrap();
            let e = refuse_privileged(&prog).unwrap_err();
            assert_eq!(crate::exit::code_of(&e), TARGET);
            let text = format!("{e:#}");
            assert!(text.contains(what) && text.contains(&*prog.to_string_lossy()), "{text}");
        }
        // Set-group-ID without group execute is mandatory locking, not a privilege.
        fs::set_permissions(&prog, fs::Permissions::from_mode(0o2745)).unwrap();
        assert!(refuse_privileged(&prog).is_ok());
        assert!(refuse_privileged(&dir.path().join("missing")).is_err());
    }
}
