//! Coordinating a tree's checkpoint (see mod.rs). The steps, all bounded in time:
//! 1. freeze: this process, then every member in the registry, over its control socket; repeat
//!    until no child of a frozen member is unaccounted for (a fork in flight registers within
//!    milliseconds; a child that never does is not managed — static, or a cleared environment);
//! 2. write: one image file; each process in tree order (parents first) writes its own sections
//!    at the position it is given and reports them; then the tree section (processes, zombies,
//!    objects shared between processes), the table and the trailer; fsync; publish by rename;
//! 3. release everyone, or kill everyone with --kill.
//!
//! A forked checkpoint (`run_forked`, forked.rs) reorders this: the tree-level objects are read
//! first, each process starts a writer child for its part at a reserved position, everyone is
//! released, and only then are the parts collected and the image finished.
//!
//! Any failure releases every frozen member: a failed checkpoint never stops the program.

use super::control::Conn;
use super::forked;
use super::member::{self, WriteOutcome};
use super::{Outcome, Request, DEFAULT_DIR};
use crate::resources::{ipc, path_string, shared};
use crate::sys::{self, fs};
use crate::tree;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use migrate_image::{ImageWriter, SectionEntry, Sink, TreeMeta, TreeProcess, ZombieEntry};

/// A frozen member: this process (`conn` None) or another one.
struct Frozen {
    real: i32,
    vpid: i32,
    conn: Option<Conn>,
    own_fds: Vec<i32>,
    /// Its System V id table (resources/ipc.rs), as it reported it when it froze.
    sysv: Vec<(ipc::Kind, i32, i32)>,
}

struct FdSink(i32);

impl Sink for FdSink {
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        sys::write_all(self.0, buf).map_err(|e| std::io::Error::from_raw_os_error(e.0))
    }
}

fn nap_ms(ms: u64) {
    let ts = libc::timespec { tv_sec: 0, tv_nsec: (ms * 1_000_000) as i64 };
    // SAFETY: a plain relative sleep with a valid timespec.
    unsafe { sys::syscall6(libc::SYS_nanosleep, &ts as *const libc::timespec as usize, 0, 0, 0, 0, 0) };
}

fn exe_of(pid: i32) -> String {
    fs::read_link(format!("/proc/{pid}/exe").as_bytes()).map(|b| path_string(&b)).unwrap_or_else(|_| "?".into())
}

/// Asks member `real` to freeze.
fn freeze_remote(real: i32, vpid: i32) -> Result<Frozen, String> {
    let mut conn = Conn::connect(real)?;
    conn.send(b"freeze\n")?;
    let line = conn.read_line(30).map_err(|e| format!("process {vpid} did not freeze: {e}"))?;
    if let Some(rest) = line.strip_prefix(b"frozen") {
        // `frozen <fd>,<fd>,… sysv=<table>`
        let mut own_fds = Vec::new();
        let mut sysv = Vec::new();
        for word in rest.split(|&c| c == b' ').filter(|w| !w.is_empty()) {
            if word.starts_with(b"sysv=") {
                sysv = ipc::parse_report(word);
            } else {
                own_fds.extend(word.split(|&c| c == b',').filter_map(fs::parse_dec).map(|v| v as i32));
            }
        }
        return Ok(Frozen { real, vpid, conn: Some(conn), own_fds, sysv });
    }
    let msg = path_string(line.strip_prefix(b"error ").unwrap_or(&line));
    conn.close();
    Err(format!("process {vpid} could not freeze: {msg}"))
}

/// Lets every frozen member go on (after a failure, or at the end).
fn release_all(frozen: Vec<Frozen>) {
    for f in frozen {
        match f.conn {
            None => member::release(),
            Some(mut c) => {
                let _ = c.send(b"release\n");
                let _ = c.read_line(10);
                c.close();
            }
        }
    }
}

fn parent_of(pid: i32) -> i32 {
    let stat = fs::read_file(format!("/proc/{pid}/stat").as_bytes()).unwrap_or_default();
    let Some(close) = stat.iter().rposition(|&c| c == b')') else { return 0 };
    stat[close + 2..].split(|&c| c == b' ').nth(1).and_then(fs::parse_dec).unwrap_or(0) as i32
}

fn stat_field(pid: i32, field: usize) -> i64 {
    let stat = fs::read_file(format!("/proc/{pid}/stat").as_bytes()).unwrap_or_default();
    let Some(close) = stat.iter().rposition(|&c| c == b')') else { return 0 };
    stat[close + 2..].split(|&c| c == b' ' || c == b'\n').nth(field - 3).and_then(fs::parse_dec).unwrap_or(0)
}

/// Freezes the whole tree. On failure everything frozen so far is released.
fn freeze_tree() -> Result<Vec<Frozen>, String> {
    member::freeze()?;
    let me = sys::getpid();
    let mut frozen = alloc::vec![Frozen {
        real: me,
        vpid: crate::state::virtual_pid(),
        conn: None,
        own_fds: super::own_fds(),
        sysv: Vec::new(), // read at the dump
    }];
    let deadline = sys::monotonic_ns() + 15_000_000_000;
    loop {
        let mut added = false;
        for m in tree::members() {
            if frozen.iter().any(|f| f.real == m.real) {
                continue;
            }
            match freeze_remote(m.real, m.vpid) {
                Ok(f) => {
                    frozen.push(f);
                    added = true;
                }
                // It exited meanwhile: nothing to save.
                Err(_) if matches!(tree::state_of(m.real), None | Some(b'Z') | Some(b'X')) => {}
                Err(e) => {
                    release_all(frozen);
                    return Err(e);
                }
            }
        }
        // A child of a frozen member that is not (yet) one: a fork in flight, or unmanaged.
        let mut unknown = None;
        for f in &frozen {
            for c in tree::children(f.real) {
                if !frozen.iter().any(|g| g.real == c) && !matches!(tree::state_of(c), Some(b'Z') | Some(b'X') | None) {
                    unknown = Some((c, f.vpid));
                }
            }
        }
        match unknown {
            None if !added => return Ok(frozen),
            None => {}
            Some((child, parent)) if sys::monotonic_ns() > deadline => {
                release_all(frozen);
                return Err(format!(
                    "process {child} ({}), a child of process {parent}, is not managed by migrate (statically linked, \
                     or started with LD_PRELOAD removed); it cannot be checkpointed with its tree",
                    exe_of(child)
                ));
            }
            Some(_) => nap_ms(2),
        }
    }
}

/// Tree order: the root first (the earliest process whose parent is not a member), then
/// breadth-first, children by pid.
fn tree_order(frozen: &[Frozen]) -> Vec<usize> {
    let parents: Vec<i32> = frozen.iter().map(|f| parent_of(f.real)).collect();
    let is_member = |pid: i32| frozen.iter().any(|f| f.real == pid);
    let mut roots: Vec<usize> = (0..frozen.len()).filter(|&i| !is_member(parents[i])).collect();
    roots.sort_by_key(|&i| (tree::start_time(frozen[i].real), frozen[i].real));
    let mut order = Vec::with_capacity(frozen.len());
    let mut queue: alloc::collections::VecDeque<usize> = roots.into_iter().collect();
    while let Some(i) = queue.pop_front() {
        order.push(i);
        let mut kids: Vec<usize> = (0..frozen.len()).filter(|&j| parents[j] == frozen[i].real).collect();
        kids.sort_by_key(|&j| frozen[j].real);
        queue.extend(kids);
    }
    order
}

/// The vpid of a process of the tree (or its real pid if unknown).
fn vpid_of(real: i32) -> i32 {
    tree::registry().and_then(|r| r.vpid_of(real)).filter(|&v| v > 0).unwrap_or(real)
}

/// Writes process `proc` (frozen member `f`) into the image at `pos`.
fn write_member(
    f: &mut Frozen,
    image_fd: i32,
    proc: u32,
    pos: u64,
    req: &Request,
    parent: Option<&member::ParentImage>,
) -> Result<Option<member::Written>, String> {
    let (bins, kill, compress) = (req.with_binaries, req.kill, req.compress);
    let Some(conn) = f.conn.as_mut() else {
        let opts = member::WriteOptions { with_binaries: bins, kill, fork: false, compress, parent };
        return match member::write_process(image_fd, proc, pos, &opts)? {
            WriteOutcome::Written(w) => Ok(Some(w)),
            WriteOutcome::Restored => Ok(None),
            WriteOutcome::Forked(_) => Err("a forked write where none was asked".into()),
        };
    };
    conn.send_with_fd(
        format!(
            "write {proc} {pos} bins={} kill={}{}{}\n",
            u8::from(bins),
            u8::from(kill),
            compress_word(compress),
            parent_word(parent)
        )
        .as_bytes(),
        image_fd,
    )?;
    read_written(conn, f.vpid, 600).map(Some)
}

/// A member's `written …` answer and its section table.
fn read_written(conn: &mut Conn, vpid: i32, timeout_s: i64) -> Result<member::Written, String> {
    let line = conn.read_line(timeout_s).map_err(|e| format!("process {vpid} did not write its part: {e}"))?;
    let Some(rest) = line.strip_prefix(b"written ") else {
        let msg = path_string(line.strip_prefix(b"error ").unwrap_or(&line));
        return Err(format!("process {vpid}: {msg}"));
    };
    let n: Vec<i64> = rest.split(|&c| c == b' ').filter_map(fs::parse_dec).collect();
    if n.len() < 6 {
        return Err(format!("process {vpid} answered malformed: {}", path_string(&line)));
    }
    let table = conn.read_exact(n[1] as usize, 60)?;
    let sections: Vec<SectionEntry> =
        postcard::from_bytes(&table).map_err(|e| format!("process {vpid} sent a malformed table: {e}"))?;
    Ok(member::Written { end: n[0] as u64, sections, ids: (n[2] as i32, n[3] as i32, n[4] as i32, n[5] as i32) })
}

/// One checkpoint of the whole tree. `settle` is asked, once the image is written, whether
/// the tree dies (true) or goes on; `released` is told the frozen time when it goes on.
pub fn run(
    req: &Request,
    settle: &mut dyn FnMut(&Outcome) -> bool,
    released: &mut dyn FnMut(u64),
) -> Result<Outcome, String> {
    let t0 = sys::monotonic_ns();
    let mut frozen = freeze_tree()?;
    if req.fork {
        return run_forked(req, frozen, t0, released);
    }
    let mut sysv = Vec::new();
    match write_image(req, &mut frozen, &mut sysv) {
        Ok(Outcome::Restored) => {
            // We are the restored copy of the coordinator: the connections were the old
            // process's descriptors. Dropping a Conn closes nothing (only `close` does) and
            // frees its buffer, which forgetting it would leak at every resume.
            drop(frozen);
            Ok(Outcome::Restored)
        }
        Ok(written) if settle(&written) => {
            // The tree's System V objects moved into the image with it.
            ipc::remove(&sysv);
            // Everyone else dies now; this process dies once the requester has the answer.
            for f in frozen.iter_mut() {
                if let Some(c) = f.conn.as_ref() {
                    let _ = c.send(b"kill\n");
                }
            }
            let deadline = sys::monotonic_ns() + 5_000_000_000;
            for f in &frozen {
                while f.conn.is_some()
                    && !matches!(tree::state_of(f.real), None | Some(b'Z') | Some(b'X'))
                    && sys::monotonic_ns() < deadline
                {
                    nap_ms(1);
                }
            }
            for f in frozen {
                if let Some(c) = f.conn {
                    c.close();
                }
            }
            Ok(written)
        }
        Ok(Outcome::Written { path, bytes, processes, .. }) => {
            release_all(frozen);
            let frozen_ms = (sys::monotonic_ns() - t0) / 1_000_000;
            released(frozen_ms);
            Ok(Outcome::Written { path, bytes, frozen_ms, processes })
        }
        Err(e) => {
            release_all(frozen);
            Err(e)
        }
    }
}

/// The image file being written: a temporary file in the checkpoint directory, published by
/// rename, or the requester's descriptor (a stream to another host).
struct ImageFile {
    fd: i32,
    /// Written unnamed (O_TMPFILE) and linked under its name when complete: nothing is left
    /// behind if this process dies meanwhile (a forked checkpoint, where the program runs).
    unnamed: bool,
    tmp_path: String,
    dir: Vec<u8>,
    dir_str: String,
    exe_name: String,
    streamed: bool,
}

impl ImageFile {
    fn open(req: &Request, root_real: i32) -> Result<ImageFile, String> {
        let dir = req.dir.clone().or_else(|| DEFAULT_DIR.get().cloned()).unwrap_or_else(|| b".".to_vec());
        let dir_str = path_string(&dir);
        let exe = exe_of(root_real);
        let exe_name = exe.rsplit('/').next().unwrap_or("process").to_string();
        let streamed = req.image_fd.is_some();
        let tmp_path = if streamed {
            "the image stream".into()
        } else {
            format!("{dir_str}/.{exe_name}-{}.mig.tmp", sys::getpid())
        };
        // A forked checkpoint's image is written while the program runs, which may end
        // meanwhile: unnamed until complete where the filesystem allows it.
        let unnamed = match req.image_fd {
            None if req.fork => {
                sys::open(&fs::cpath(&dir), libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC, 0o600).ok()
            }
            _ => None,
        };
        if let Some(fd) = unnamed {
            let fd = super::control::move_high(fd);
            let tmp_path = format!("the new image in {dir_str}");
            return Ok(ImageFile { fd, unnamed: true, tmp_path, dir, dir_str, exe_name, streamed });
        }
        let fd = match req.image_fd {
            Some(given) => sys::fcntl(given, libc::F_DUPFD_CLOEXEC, 3).map_err(|e| format!("cannot use the image descriptor: {e}"))? as i32,
            None => sys::open(&fs::cpath(tmp_path.as_bytes()), libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC, 0o600)
                .map_err(|e| match e.0 {
                    libc::ENOENT => format!("the checkpoint directory {dir_str} does not exist; create it or choose another (--dir, --ckpt-dir or MIGRATE_CKPT_DIR)"),
                    libc::ENOSPC | libc::EDQUOT => format!("cannot create an image in {dir_str}: no space or no free inodes left there ({e}); free some or choose another directory (--dir, --ckpt-dir or MIGRATE_CKPT_DIR)"),
                    _ => format!("cannot create an image in {dir_str}: {e}; choose a writable directory (--dir, --ckpt-dir or MIGRATE_CKPT_DIR)"),
                })?,
        };
        let fd = super::control::move_high(fd);
        Ok(ImageFile { fd, unnamed: false, tmp_path, dir, dir_str, exe_name, streamed })
    }

    /// Gives the image up: closes it and removes the temporary file.
    fn fail<T>(&self, msg: String) -> Result<T, String> {
        let _ = sys::close(self.fd);
        super::clear_transient_fd(self.fd);
        if !self.streamed && !self.unnamed {
            let _ = sys::unlinkat(libc::AT_FDCWD, &fs::cpath(self.tmp_path.as_bytes()));
        }
        Err(msg)
    }

    fn write_error(&self, e: &migrate_image::ImageError) -> String {
        format!("cannot write image {}: {}", self.tmp_path, member::describe_write_error(e))
    }

    /// Adds the tree section, the table and the trailer, makes the image durable and publishes
    /// it; returns its path and length.
    fn finish(
        &self,
        mut writer: ImageWriter<FdSink>,
        tree: &TreeMeta,
        root_vpid: i32,
    ) -> Result<(String, u64), String> {
        let finished = writer.add_tree(tree).and_then(|_| writer.finish());
        let bytes = match finished {
            Ok((_, len)) => len,
            Err(e) => return self.fail(self.write_error(&e)),
        };
        if !self.streamed {
            if let Err(e) = sys::fsync(self.fd) {
                return self.fail(format!("cannot flush image {} to disk: {e}", self.tmp_path));
            }
        }
        let unnamed = self.unnamed.then_some(self.fd);
        let published = if self.streamed {
            Ok(self.tmp_path.clone())
        } else {
            publish(&self.tmp_path, unnamed, &self.dir, &self.dir_str, &self.exe_name, root_vpid)
        };
        let _ = sys::close(self.fd);
        super::clear_transient_fd(self.fd);
        Ok((published?, bytes))
    }
}

fn new_tree(req: &Request) -> TreeMeta {
    TreeMeta {
        processes: Vec::new(),
        zombies: Vec::new(),
        shared: Vec::new(),
        shared_fd_base: 3,
        sysv: Vec::new(),
        network_lock: req.lock.clone(),
        image_id: sys::random_u64().unwrap_or_else(|_| sys::monotonic_ns() ^ ((sys::getpid() as u64) << 32)),
        ancestors: Vec::new(),
    }
}

/// ` compress=1` for a member's `write` command of a compressed checkpoint.
fn compress_word(compress: bool) -> &'static str {
    if compress {
        " compress=1"
    } else {
        ""
    }
}

/// ` parent=<hex path>` for a member's `write` command (empty for a full image).
fn parent_word(parent: Option<&member::ParentImage>) -> String {
    parent.map(|p| format!(" parent={}", super::control::hex(p.path.as_bytes()))).unwrap_or_default()
}

/// For an incremental checkpoint (not into a stream): its parent, and the tree's ancestors.
fn incremental_parent(
    req: &Request,
    image: &ImageFile,
    root_vpid: i32,
    tree: &mut TreeMeta,
) -> Option<member::ParentImage> {
    // A compressed image is a full one: its frames cannot refer to an ancestor's pages.
    if !req.incremental || image.streamed || req.compress {
        return None;
    }
    let (path, ancestors) = choose_parent(&image.dir_str, &image.exe_name, root_vpid)?;
    crate::debug!("incremental checkpoint on top of {path}");
    tree.ancestors = ancestors;
    Some(member::ParentImage { path })
}

/// What only the coordinator sees, read while every member is frozen: zombies, the objects
/// several processes share (shared memory written as sections now) and System V objects.
/// `sysv` receives the real ids of the System V objects the image holds.
fn dump_tree_objects(
    frozen: &[Frozen],
    order: &[usize],
    writer: &mut ImageWriter<FdSink>,
    tree: &mut TreeMeta,
    sysv: &mut Vec<(ipc::Kind, i32)>,
) -> Result<(), String> {
    // Zombies: children a member had not reaped yet.
    for &i in order {
        let f = &frozen[i];
        for c in tree::children(f.real) {
            // A child with exit signal 0 (field 38) is no zombie the program's wait() reports:
            // a forked checkpoint's writer, left behind by a program that exec'd meanwhile.
            if matches!(tree::state_of(c), Some(b'Z')) && stat_field(c, 38) != 0 {
                let pgid = stat_field(c, 5) as i32;
                tree.zombies.push(ZombieEntry {
                    vpid: vpid_of(c),
                    vppid: f.vpid,
                    vpgid: vpid_of(pgid),
                    status: stat_field(c, 52) as i32,
                });
            }
        }
    }
    // Our own descriptors now include the image and the member connections.
    let me = sys::getpid();
    let holders: Vec<(u32, i32, Vec<i32>)> = order
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            let own = if frozen[i].real == me { super::own_fds() } else { frozen[i].own_fds.clone() };
            (k as u32, frozen[i].real, own)
        })
        .collect();
    let (objects, base) = shared::find(&holders)?;
    tree.shared = objects;
    tree.shared_fd_base = base;
    for (entry, segments) in shared::find_memory(&holders) {
        let j = tree.shared.len() as u32;
        let size = match &entry.object {
            migrate_image::SharedObject::Memory { size, .. } => *size,
            _ => 0,
        };
        shared::write_memory(writer, j, size, segments).map_err(|e| format!("cannot write the image: {e}"))?;
        tree.shared.push(entry);
    }
    // System V objects: every member is frozen, so their contents hold still.
    let members: Vec<ipc::Member> = order
        .iter()
        .map(|&i| ipc::Member {
            real: frozen[i].real,
            table: if frozen[i].real == me { ipc::entries() } else { frozen[i].sysv.clone() },
        })
        .collect();
    match ipc::dump(&members) {
        Ok(d) => {
            tree.sysv = d.objects;
            *sysv = d.real_ids;
        }
        Err(e) => return Err(format!("{e}; the checkpoint needs every System V object the tree uses")),
    }
    // The shared objects' descriptors must stay clear of libmigrate's own.
    if tree.shared_fd_base + tree.shared.len() as i32 > crate::state::OWN_FD_BASE
        && tree.shared_fd_base < crate::state::OWN_FD_BASE + 64
    {
        tree.shared_fd_base = crate::state::OWN_FD_BASE + 64;
    }
    Ok(())
}

/// `sysv` receives the real ids of the System V objects the image holds.
fn write_image(req: &Request, frozen: &mut [Frozen], sysv: &mut Vec<(ipc::Kind, i32)>) -> Result<Outcome, String> {
    let order = tree_order(frozen);
    let root_vpid = frozen[order[0]].vpid;
    let image = ImageFile::open(req, frozen[order[0]].real)?;
    let fd = image.fd;
    let mut writer = match ImageWriter::new(FdSink(fd), 64) {
        Ok(w) => w,
        Err(e) => return image.fail(image.write_error(&e)),
    };
    let mut tree = new_tree(req);
    let parent = incremental_parent(req, &image, root_vpid, &mut tree);
    for (k, &i) in order.iter().enumerate() {
        let pos = writer.position();
        match write_member(&mut frozen[i], fd, k as u32, pos, req, parent.as_ref()) {
            Ok(Some(w)) => {
                writer.adopt_sections(&w.sections, w.end);
                // The members wrote with pwrite: our own writes continue after their part.
                if let Err(e) = sys::lseek(fd, w.end as i64, libc::SEEK_SET) {
                    return image.fail(format!("cannot write image {}: {e}", image.tmp_path));
                }
                let (vpid, vppid, vpgid, vsid) = w.ids;
                tree.processes.push(TreeProcess { vpid, vppid, vpgid, vsid });
            }
            Ok(None) => {
                // Its descriptor was the old process's; dropping the writer closes nothing.
                drop(writer);
                return Ok(Outcome::Restored);
            }
            Err(e) => return image.fail(format!("cannot write image {}: {e}", image.tmp_path)),
        }
    }
    if let Err(e) = dump_tree_objects(frozen, &order, &mut writer, &mut tree, sysv) {
        return image.fail(e);
    }
    let processes = tree.processes.len();
    let (path, bytes) = image.finish(writer, &tree, root_vpid)?;
    Ok(Outcome::Written { path, bytes, frozen_ms: 0, processes })
}

/// A member's part of a forked checkpoint, between its `forked` answer and its result.
enum Pending {
    /// This process: its own writer child (`own`).
    Own,
    /// Another member: it answers `collect` over its connection.
    Remote,
}

/// A forked checkpoint (forked.rs): while frozen, the tree-level objects are read and every
/// process starts a writer child for its part at the position it is given (an upper bound of
/// the previous parts); then everyone is released — the freeze ends there — and the results
/// are collected, the table written and the image published. After the release a failure
/// stops the remaining writers and removes the temporary image; the program runs on anyway.
fn run_forked(
    req: &Request,
    mut frozen: Vec<Frozen>,
    t0: u64,
    released: &mut dyn FnMut(u64),
) -> Result<Outcome, String> {
    let order = tree_order(&frozen);
    let root_vpid = frozen[order[0]].vpid;
    let image = match ImageFile::open(req, frozen[order[0]].real) {
        Ok(i) => i,
        Err(e) => {
            release_all(frozen);
            return Err(e);
        }
    };
    let fd = image.fd;
    // Before the release: on failure, our own writer (if started) is stopped, the members'
    // stop theirs when their connection closes after `released`.
    let give_up = |frozen: Vec<Frozen>, own: Option<forked::Forked>, msg: String| -> Result<Outcome, String> {
        if let Some(w) = own {
            forked::abandon(w);
        }
        release_all(frozen);
        image.fail(msg)
    };
    let mut writer = match ImageWriter::new(FdSink(fd), 64) {
        Ok(w) => w,
        Err(e) => return give_up(frozen, None, image.write_error(&e)),
    };
    let mut tree = new_tree(req);
    let mut sysv = Vec::new();
    // Read before any writer child exists (it would show among the members' children).
    if let Err(e) = dump_tree_objects(&frozen, &order, &mut writer, &mut tree, &mut sysv) {
        return give_up(frozen, None, e);
    }
    let parent = incremental_parent(req, &image, root_vpid, &mut tree);
    let mut own: Option<forked::Forked> = None;
    let mut pending: Vec<(usize, Pending)> = Vec::with_capacity(order.len());
    for (k, &i) in order.iter().enumerate() {
        let pos = writer.position();
        let f = &mut frozen[i];
        let reserved_end = match f.conn.as_mut() {
            None => match member::write_process(
                fd,
                k as u32,
                pos,
                &member::WriteOptions {
                    with_binaries: req.with_binaries,
                    kill: false,
                    fork: true,
                    compress: req.compress,
                    parent: parent.as_ref(),
                },
            ) {
                Ok(WriteOutcome::Forked(w)) => {
                    let end = w.reserved_end;
                    own = Some(w);
                    pending.push((i, Pending::Own));
                    Ok(end)
                }
                Ok(WriteOutcome::Restored) => {
                    // We are the restored coordinator (the image holds our writer child's copy
                    // of this thread): nothing here belongs to this process.
                    drop(writer);
                    drop(frozen);
                    return Ok(Outcome::Restored);
                }
                Ok(WriteOutcome::Written(_)) => Err("an ordinary write where a forked one was asked".into()),
                Err(e) => Err(e),
            },
            Some(conn) => {
                let vpid = f.vpid;
                conn.send_with_fd(
                    format!(
                        "write {k} {pos} bins={} kill=0 fork=1{}{}\n",
                        u8::from(req.with_binaries),
                        compress_word(req.compress),
                        parent_word(parent.as_ref())
                    )
                    .as_bytes(),
                    fd,
                )
                .and_then(|_| conn.read_line(600).map_err(|e| format!("process {vpid} did not start its part: {e}")))
                .and_then(|line| match line.strip_prefix(b"forked ").and_then(fs::parse_dec) {
                    Some(end) if end as u64 >= pos => {
                        pending.push((i, Pending::Remote));
                        Ok(end as u64)
                    }
                    _ => Err(format!("process {vpid}: {}", path_string(line.strip_prefix(b"error ").unwrap_or(&line)))),
                })
            }
        };
        match reserved_end {
            Ok(end) => writer.adopt_sections(&[], end),
            Err(e) => return give_up(frozen, own, format!("cannot write image {}: {e}", image.tmp_path)),
        }
    }
    // The freeze ends here: members keep their connections for `collect`.
    for f in frozen.iter_mut() {
        match f.conn.as_mut() {
            None => member::release(),
            Some(c) => {
                let _ = c.send(b"release\n");
                let _ = c.read_line(10);
            }
        }
    }
    let frozen_ms = (sys::monotonic_ns() - t0) / 1_000_000;
    released(frozen_ms);
    // Every writer works at once; the results are read in tree order.
    for f in frozen.iter() {
        if let Some(c) = f.conn.as_ref() {
            let _ = c.send(b"collect\n");
        }
    }
    let mut failure: Option<String> = None;
    for (i, p) in pending {
        // After a failure nothing more is awaited: the remaining writers are stopped below.
        if failure.is_some() {
            break;
        }
        let result = match p {
            Pending::Own => match own.take() {
                Some(w) => forked::collect(w),
                None => Err("lost this process's writer".into()),
            },
            Pending::Remote => {
                let f = &mut frozen[i];
                let vpid = f.vpid;
                match f.conn.as_mut() {
                    Some(c) => read_written(c, vpid, (forked::WRITER_TIMEOUT_MS / 1000) as i64 + 60),
                    None => Err("lost the connection".into()),
                }
            }
        };
        match result {
            Ok(w) => {
                writer.adopt_sections(&w.sections, w.end);
                let (vpid, vppid, vpgid, vsid) = w.ids;
                tree.processes.push(TreeProcess { vpid, vppid, vpgid, vsid });
            }
            Err(e) => failure = Some(format!("cannot write image {}: {e}", image.tmp_path)),
        }
    }
    // The members have answered (or are gone); closing stops any writer still running.
    for f in frozen {
        if let Some(c) = f.conn {
            c.close();
        }
    }
    if let Some(own) = own {
        forked::abandon(own);
    }
    if let Some(e) = failure {
        return image.fail(e);
    }
    // Our own writes (table, trailer) go after every part: right after the last one's data,
    // not after its reservation (a single process's image has no gap at all; between the
    // parts of a tree, unused reservations stay as holes).
    writer.trim_to(0);
    if let Err(e) = sys::lseek(fd, writer.position() as i64, libc::SEEK_SET) {
        return image.fail(format!("cannot write image {}: {e}", image.tmp_path));
    }
    let processes = tree.processes.len();
    let (path, bytes) = image.finish(writer, &tree, root_vpid)?;
    Ok(Outcome::Written { path, bytes, frozen_ms, processes })
}

/// An incremental image's chain never grows longer than this: past it a full image is taken.
pub const CHAIN_LIMIT: usize = 8;

/// The images `<name>-<vpid>-<n>.mig` in `dir`, oldest first (by modification time, then n).
pub fn program_images(dir: &str, stem: &str) -> Vec<(String, u64)> {
    let prefix = format!("{stem}-");
    let mut images: Vec<(i64, u64, String)> = fs::list_dir(dir.as_bytes())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|name| {
            let n = fs::parse_dec(name.strip_prefix(prefix.as_bytes())?.strip_suffix(b".mig")?)? as u64;
            let st = sys::stat(&fs::cpath(format!("{dir}/{}", path_string(&name)).as_bytes())).ok()?;
            Some((st.st_mtime * 1_000_000_000 + st.st_mtime_nsec, n, path_string(&name)))
        })
        .collect();
    images.sort_unstable();
    images.into_iter().map(|(_, n, name)| (name, n)).collect()
}

/// The parent of an incremental checkpoint: the program's newest image in `dir` that is
/// intact, with the ancestor list the new image gets (the parent, then its ancestors). None
/// (a full image) when there is none, or its chain is already `CHAIN_LIMIT` long.
fn choose_parent(dir: &str, exe_name: &str, vpid: i32) -> Option<(String, Vec<migrate_image::AncestorRef>)> {
    let images = program_images(dir, &format!("{exe_name}-{vpid}"));
    let (name, _) = images.last()?;
    let path = format!("{dir}/{name}");
    let tree = migrate_image::ImageReader::open(std::path::Path::new(&path)).and_then(|r| r.tree()).ok()?;
    if tree.ancestors.len() + 1 >= CHAIN_LIMIT {
        crate::debug!("{path} ends a chain of {} images: a full image now", tree.ancestors.len() + 1);
        return None;
    }
    let mut ancestors = alloc::vec![migrate_image::AncestorRef { file: name.clone(), image_id: tree.image_id }];
    ancestors.extend(tree.ancestors);
    Some((path, ancestors))
}

/// Renames the finished image to `<name>-<vpid>-<n>.mig` without replacing an existing one
/// (or, for an unnamed temporary file, `unnamed` its descriptor, links it there), then makes
/// the new name durable.
fn publish(
    tmp_path: &str,
    unnamed: Option<i32>,
    dir: &[u8],
    dir_str: &str,
    exe_name: &str,
    vpid: i32,
) -> Result<String, String> {
    // Numbers grow with every image of the program in this directory, also across resumes.
    let mut seq = program_images(dir_str, &format!("{exe_name}-{vpid}")).iter().map(|(_, n)| *n).max().unwrap_or(0);
    let final_path = loop {
        seq += 1;
        let candidate = format!("{dir_str}/{exe_name}-{vpid}-{seq}.mig");
        const RENAME_NOREPLACE: usize = 1;
        let a = match unnamed {
            Some(fd) => fs::cpath(format!("/proc/thread-self/fd/{fd}").as_bytes()),
            None => fs::cpath(tmp_path.as_bytes()),
        };
        let b = fs::cpath(candidate.as_bytes());
        let r = match unnamed {
            // SAFETY: both paths are NUL-terminated buffers alive for the call.
            Some(_) => unsafe {
                sys::syscall6(
                    libc::SYS_linkat,
                    libc::AT_FDCWD as usize,
                    a.as_ptr() as usize,
                    libc::AT_FDCWD as usize,
                    b.as_ptr() as usize,
                    libc::AT_SYMLINK_FOLLOW as usize,
                    0,
                )
            },
            // SAFETY: both paths are NUL-terminated buffers alive for the call.
            None => unsafe {
                sys::syscall6(
                    libc::SYS_renameat2,
                    libc::AT_FDCWD as usize,
                    a.as_ptr() as usize,
                    libc::AT_FDCWD as usize,
                    b.as_ptr() as usize,
                    RENAME_NOREPLACE,
                    0,
                )
            },
        };
        if r == 0 {
            break candidate;
        }
        if r != -(libc::EEXIST as isize) {
            if unnamed.is_none() {
                let _ = sys::unlinkat(libc::AT_FDCWD, &a);
            }
            if r == -(libc::ENOENT as isize) {
                // The image was written into a file that is no longer there: someone removed
                // (or replaced) the directory meanwhile. Nothing was saved.
                return Err(format!(
                    "the checkpoint directory {dir_str} was removed or replaced while the image was written, so nothing was saved; \
                     recreate it (or choose another: --dir, --ckpt-dir or MIGRATE_CKPT_DIR) and checkpoint again"
                ));
            }
            return Err(format!("cannot publish {tmp_path} as {candidate}: {}", sys::Errno(-r as i32)));
        }
    };
    if let Ok(dfd) = sys::open(&fs::cpath(dir), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC, 0) {
        let _ = sys::fsync(dfd);
        let _ = sys::close(dfd);
    }
    Ok(final_path)
}
