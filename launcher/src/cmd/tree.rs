//! Recreating a process tree for `migrate-resume`. Before anything execs, this process creates
//! what the tree's processes share — the registry they meet in (a memfd at its reserved
//! descriptor) and the objects they held in common (pipes refilled with their in-flight bytes,
//! files opened once at their offsets), at the descriptor numbers the image names — then forks
//! the tree with its shape: each process forks its own children (and its unreaped zombies,
//! which exit at once with their saved status), sets up its session and process group, and
//! execs its program, whose libmigrate restores it. Everything is inherited, so each restored
//! process finds its shared descriptors where it expects them. This process becomes the root.

use crate::exit::{fail, TARGET};
use anyhow::Result;
use migrate_image::{ImageMeta, ImageReader, SectionKind, SharedObject, TreeMeta};
use pid_virt::registry::{Registry, FD as REGISTRY_FD, SIZE as REGISTRY_SIZE};
use std::convert::Infallible;
use std::os::unix::process::CommandExt;
use std::process::Command;

fn os_err(what: &str) -> anyhow::Error {
    fail(TARGET, format!("{what}: {}", std::io::Error::last_os_error()))
}

/// Puts `fd` at `number` (inherited across exec) and closes the original.
fn place(fd: i32, number: i32) -> Result<()> {
    if fd != number {
        // SAFETY: plain descriptor operations on descriptors we own.
        if unsafe { libc::dup2(fd, number) } < 0 {
            return Err(os_err(&format!("cannot place a shared descriptor at {number}")));
        }
        // SAFETY: as above.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// Memfds holding the tree's shared memory objects, filled from the image: (object index,
/// descriptor, at a high close-on-exec number until `hand_down` places it).
pub fn build_memory(reader: &ImageReader, tree: &TreeMeta) -> Result<Vec<(usize, i32)>> {
    let mut out = Vec::new();
    for (j, e) in tree.shared.iter().enumerate() {
        let SharedObject::Memory { size, .. } = &e.object else { continue };
        let kind = SectionKind::Shared { object: j as u32 };
        let index = reader.sections().iter().position(|s| s.kind == kind).ok_or_else(|| {
            fail(crate::exit::IMAGE, format!("the image lacks the contents of shared memory object {j}"))
        })?;
        let bytes = reader.read_section(index)?;
        // SAFETY: memfd_create with a literal name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"migrate-shm".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(os_err("cannot create shared memory"));
        }
        // SAFETY: sizing and filling our own memfd from a buffer of the written length.
        unsafe {
            if libc::ftruncate(fd, *size as i64) < 0
                || libc::pwrite(fd, bytes.as_ptr() as *const libc::c_void, bytes.len(), 0) != bytes.len() as isize
            {
                return Err(os_err("cannot fill shared memory"));
            }
        }
        // SAFETY: moving our descriptor above anything the reader or the objects use.
        let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 20000) };
        if high >= 0 {
            // SAFETY: our own descriptor.
            unsafe { libc::close(fd) };
        }
        out.push((j, if high >= 0 { high } else { fd }));
    }
    Ok(out)
}

/// Creates the registry and the shared objects at their numbers.
pub fn hand_down(tree: &TreeMeta, memory: Vec<(usize, i32)>) -> Result<()> {
    // SAFETY: memfd_create with a literal name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"migrate-tree".as_ptr(), 0) };
    if fd < 0 {
        return Err(os_err("cannot create the tree registry"));
    }
    // SAFETY: sizing and mapping our own memfd; the mapping is checked and used as a Registry,
    // whose all-zero state is valid.
    unsafe {
        if libc::ftruncate(fd, REGISTRY_SIZE as i64) < 0 {
            return Err(os_err("cannot size the tree registry"));
        }
        let addr = libc::mmap(
            std::ptr::null_mut(),
            REGISTRY_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        if addr == libc::MAP_FAILED {
            return Err(os_err("cannot map the tree registry"));
        }
        let r = &*(addr as *const Registry);
        r.init();
        r.expected.store(tree.processes.len() as u32, std::sync::atomic::Ordering::Release);
        libc::munmap(addr, REGISTRY_SIZE);
    }
    place(fd, REGISTRY_FD)?;

    let mut pipes: Vec<(u64, i32, i32)> = Vec::new();
    // Socket pairs: created once; what was queued for one end is written through the other.
    let mut pairs: Vec<(u64, [i32; 2])> = Vec::new();
    for entry in &tree.shared {
        let SharedObject::Socket { pair, sock_type, .. } = &entry.object else { continue };
        if pairs.iter().any(|p| p.0 == *pair) {
            continue;
        }
        let mut sv = [0i32; 2];
        // SAFETY: valid out-array; the result is checked.
        if unsafe { libc::socketpair(libc::AF_UNIX, *sock_type | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr()) } < 0 {
            return Err(os_err("cannot create a socket pair"));
        }
        pairs.push((*pair, sv));
    }
    for entry in &tree.shared {
        let SharedObject::Socket { pair, end, queued, .. } = &entry.object else { continue };
        if queued.is_empty() {
            continue;
        }
        let Some(&(_, sv)) = pairs.iter().find(|p| p.0 == *pair) else { continue };
        let other = sv[1 - (*end as usize).min(1)];
        // SAFETY: writing our buffer to our own socket; it fits the default buffer sizes
        // for what one end had queued (checked below).
        let n = unsafe { libc::send(other, queued.as_ptr() as *const libc::c_void, queued.len(), libc::MSG_DONTWAIT) };
        if n != queued.len() as isize {
            return Err(os_err("cannot refill a socket pair"));
        }
    }
    for (j, entry) in tree.shared.iter().enumerate() {
        let number = tree.shared_fd_base + j as i32;
        match &entry.object {
            SharedObject::Pipe { pipe, write_end, flags, capacity, data } => {
                let (r, w) = match pipes.iter().find(|p| p.0 == *pipe) {
                    Some(&(_, r, w)) => (r, w),
                    None => {
                        let mut ends = [0i32; 2];
                        // SAFETY: valid out-array.
                        if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
                            return Err(os_err("cannot create a pipe"));
                        }
                        // SAFETY: our own pipe.
                        unsafe { libc::fcntl(ends[1], libc::F_SETPIPE_SZ, *capacity as libc::c_int) };
                        pipes.push((*pipe, ends[0], ends[1]));
                        (ends[0], ends[1])
                    }
                };
                if !data.is_empty() {
                    // SAFETY: writing the saved bytes into our own pipe (they fit its capacity).
                    let n = unsafe { libc::write(w, data.as_ptr() as *const libc::c_void, data.len()) };
                    if n != data.len() as isize {
                        return Err(os_err(&format!("cannot refill pipe:[{pipe}]")));
                    }
                }
                // SAFETY: duplicating our own descriptor to the agreed number; status flags set
                // on the new description.
                unsafe {
                    let src = if *write_end { w } else { r };
                    if libc::dup2(src, number) < 0 {
                        return Err(os_err(&format!("cannot place pipe:[{pipe}] at {number}")));
                    }
                    libc::fcntl(number, libc::F_SETFL, (*flags as i32) & (libc::O_NONBLOCK | libc::O_APPEND));
                }
            }
            SharedObject::Socket { pair, end, flags, .. } => {
                let Some(&(_, sv)) = pairs.iter().find(|p| p.0 == *pair) else { continue };
                // SAFETY: duplicating our own descriptor to the agreed number.
                unsafe {
                    if libc::dup2(sv[(*end as usize).min(1)], number) < 0 {
                        return Err(os_err(&format!("cannot place a socket at {number}")));
                    }
                    libc::fcntl(number, libc::F_SETFL, (*flags as i32) & libc::O_NONBLOCK);
                }
            }
            SharedObject::NetSocket { socket } => {
                let fd = super::net::create(socket)?;
                place(fd, number)?;
            }
            SharedObject::Memory { .. } => {
                if let Some(&(_, fd)) = memory.iter().find(|(k, _)| *k == j) {
                    place(fd, number)?;
                }
            }
            SharedObject::File { path, flags, pos } => {
                let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_NONBLOCK | libc::O_DSYNC | libc::O_SYNC;
                let c =
                    std::ffi::CString::new(path.as_bytes()).map_err(|_| fail(TARGET, format!("bad path {path}")))?;
                // SAFETY: NUL-terminated path; result checked.
                let fd = unsafe { libc::open(c.as_ptr(), (*flags as i32 & keep) | libc::O_CLOEXEC) };
                if fd < 0 {
                    return Err(os_err(&format!("cannot reopen {path}")));
                }
                // SAFETY: our own descriptor.
                if unsafe { libc::lseek(fd, *pos as i64, libc::SEEK_SET) } < 0 {
                    return Err(os_err(&format!("cannot seek {path} to {pos}")));
                }
                place(fd, number)?;
            }
        }
    }
    for (_, sv) in pairs {
        // SAFETY: the originals; the placed copies stay open.
        unsafe {
            libc::close(sv[0]);
            libc::close(sv[1]);
        }
    }
    for (_, r, w) in pipes {
        // SAFETY: the originals; the placed copies stay open.
        unsafe {
            libc::close(r);
            libc::close(w);
        }
    }
    Ok(())
}

/// Forks a child, with pid `vpid` when `exact` and the kernel allows it.
fn fork_child(vpid: i32, exact: bool) -> Result<i32> {
    if exact {
        #[repr(C)]
        #[derive(Default)]
        struct CloneArgs([u64; 11]);
        let want = vpid;
        let mut a = CloneArgs::default();
        a.0[4] = libc::SIGCHLD as u64; // exit_signal
        a.0[8] = &want as *const i32 as u64; // set_tid
        a.0[9] = 1; // set_tid_size
                    // SAFETY: clone3 as fork (no CLONE_VM, no stack) of this single-threaded process.
        let r = unsafe { libc::syscall(libc::SYS_clone3, &a as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
        if r >= 0 {
            return Ok(r as i32);
        }
    }
    // SAFETY: this process is single-threaded; the child only execs or exits.
    let r = unsafe { libc::fork() };
    if r < 0 {
        return Err(os_err("cannot fork"));
    }
    Ok(r)
}

/// Makes this process process `k` of the tree: forks its children and zombies, then execs.
pub fn become_process(
    k: usize,
    tree: &TreeMeta,
    metas: &[ImageMeta],
    mut commands: Vec<Command>,
    exact: bool,
) -> Result<()> {
    let me = tree.processes[k];
    // SAFETY: getpid has no preconditions.
    let mut known: Vec<(i32, i32)> = vec![(me.vpid, unsafe { libc::getpid() })];
    let in_tree = |vpid: i32| tree.processes.iter().any(|p| p.vpid == vpid);
    let children: Vec<usize> = (0..tree.processes.len())
        .filter(|&c| {
            c != k && (tree.processes[c].vppid == me.vpid || (k == 0 && !in_tree(tree.processes[c].vppid) && c != 0))
        })
        .collect();
    let group_of = |vpgid: i32, known: &[(i32, i32)]| known.iter().find(|(v, _)| *v == vpgid).map(|&(_, r)| r);

    for c in children {
        let p = tree.processes[c];
        let pid = fork_child(p.vpid, exact)?;
        if pid == 0 {
            // SAFETY: session and group calls on ourselves; failures leave us in the parent's.
            unsafe {
                if p.vsid == p.vpid {
                    libc::setsid();
                } else if p.vpgid == p.vpid {
                    libc::setpgid(0, 0);
                } else if let Some(leader) = group_of(p.vpgid, &known) {
                    libc::setpgid(0, leader);
                }
            }
            let never: Result<Infallible> = become_process(c, tree, metas, commands, exact).map(|_| unreachable!());
            let e = never.err().map(|e| format!("{e:#}")).unwrap_or_default();
            eprintln!("migrate-resume: error: {e}");
            // SAFETY: leaving the forked child without running the parent's destructors.
            unsafe { libc::_exit(4) };
        }
        // SAFETY: the same group placement from the parent's side (as shells do, to win races) —
        // never for a session leader, whose own setsid() must come first.
        unsafe {
            if p.vsid == p.vpid {
            } else if p.vpgid == p.vpid {
                libc::setpgid(pid, pid);
            } else if let Some(leader) = group_of(p.vpgid, &known) {
                libc::setpgid(pid, leader);
            }
        }
        known.push((p.vpid, pid));
    }
    for z in tree.zombies.iter().filter(|z| z.vppid == me.vpid) {
        let pid = fork_child(z.vpid, exact)?;
        if pid == 0 {
            // SAFETY: the zombie-to-be ends at once with the saved status.
            unsafe {
                if let Some(leader) = group_of(z.vpgid, &known) {
                    libc::setpgid(0, leader);
                }
                if libc::WIFSIGNALED(z.status) {
                    let sig = libc::WTERMSIG(z.status);
                    libc::signal(sig, libc::SIG_DFL);
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, sig);
                    libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                    libc::kill(libc::getpid(), sig);
                }
                libc::_exit(libc::WEXITSTATUS(z.status));
            }
        }
        join_registry(pid, z.vpid);
        known.push((z.vpid, pid));
    }

    let meta = &metas[k];
    super::resume::apply_rlimits(meta)?;
    crate::preload::set_personality(Some(meta.process.personality as u64))?;
    let cmd = &mut commands[k];
    let err = cmd.exec();
    Err(fail(TARGET, format!("cannot execute {:?}: {err}", cmd.get_program())))
}

/// Records a process this resume created (a zombie) with its virtual pid.
fn join_registry(real: i32, vpid: i32) {
    // SAFETY: mapping the registry memfd we created at its descriptor; unmapped right after.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            REGISTRY_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            REGISTRY_FD,
            0,
        );
        if addr == libc::MAP_FAILED {
            return;
        }
        let _ = (*(addr as *const Registry)).join(real, vpid, 0);
        libc::munmap(addr, REGISTRY_SIZE);
    }
}
