//! Objects several processes of a tree reach through one open file description: pipes between
//! them (with the bytes in flight) and regular files opened once and inherited (one offset for
//! all). The coordinator finds them while every member is frozen, from /proc/<pid>/fd and
//! fdinfo, telling descriptions apart with kcmp(KCMP_FILE). migrate-resume creates each once
//! and hands it down to its holders; everything held by a single process is restored by that
//! process itself (files.rs).

use crate::sys::{self, fs};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use migrate_image::{SharedEntry, SharedObject};

struct Held {
    proc: u32,
    real: i32,
    fd: i32,
}

/// (pos, flags) from /proc/<pid>/fdinfo/<fd>.
fn fdinfo(real: i32, fd: i32) -> (u64, u32) {
    let text = fs::read_file(format!("/proc/{real}/fdinfo/{fd}").as_bytes()).unwrap_or_default();
    let mut pos = 0;
    let mut flags = 0;
    for line in text.split(|&c| c == b'\n') {
        let value = |key: &[u8]| line.strip_prefix(key).map(|v| v.trim_ascii());
        if let Some(v) = value(b"pos:") {
            pos = fs::parse_dec(v).unwrap_or(0) as u64;
        } else if let Some(v) = value(b"flags:") {
            flags = core::str::from_utf8(v).ok().and_then(|s| u32::from_str_radix(s, 8).ok()).unwrap_or(0);
        }
    }
    (pos, flags)
}

const KEPT_FLAGS: u32 = (libc::O_ACCMODE | libc::O_APPEND | libc::O_NONBLOCK | libc::O_DSYNC | libc::O_SYNC) as u32;

/// The bytes in a pipe, through a new description of it (/proc/<pid>/fd/<n> of a reader),
/// copied with tee() so nothing is consumed.
fn peek_pipe(real: i32, fd: i32) -> (Vec<u8>, u32) {
    let path = fs::cpath(format!("/proc/{real}/fd/{fd}").as_bytes());
    let Ok(r) = sys::open(&path, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC, 0) else {
        return (Vec::new(), 65536);
    };
    let capacity = sys::fcntl(r, libc::F_GETPIPE_SZ, 0).unwrap_or(65536) as u32;
    let mut scratch = [0i32; 2];
    let mut data = Vec::new();
    if sys::pipe2(&mut scratch, libc::O_CLOEXEC | libc::O_NONBLOCK).is_ok() {
        let _ = sys::fcntl(scratch[1], libc::F_SETPIPE_SZ, capacity as usize);
        if let Ok(n) = sys::tee(r, scratch[1], capacity as usize, libc::SPLICE_F_NONBLOCK) {
            data.resize(n, 0);
            let mut got = 0;
            while got < n {
                match sys::read(scratch[0], &mut data[got..]) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => got += k,
                }
            }
            data.truncate(got);
        }
        let _ = sys::close(scratch[0]);
        let _ = sys::close(scratch[1]);
    }
    let _ = sys::close(r);
    (data, capacity)
}

fn distinct_procs(h: &[Held]) -> usize {
    let mut p: Vec<u32> = h.iter().map(|h| h.proc).collect();
    p.sort_unstable();
    p.dedup();
    p.len()
}

/// Finds the objects shared between the processes `(index, real pid, libmigrate's own fds)`.
/// Returns them and the first descriptor number free in every process (`shared_fd_base`).
pub fn find(processes: &[(u32, i32, Vec<i32>)]) -> Result<(Vec<SharedEntry>, i32), String> {
    // pipe inode → (read holders, write holders); (dev, ino) → regular file holders
    let mut pipes: Vec<(u64, Vec<Held>, Vec<Held>)> = Vec::new();
    let mut files: Vec<((u64, u64), String, Vec<Held>)> = Vec::new();
    let mut sockets: Vec<(u64, Held)> = Vec::new();
    let mut max_fd = 2;
    for (proc, real, own) in processes {
        let names = fs::list_dir(format!("/proc/{real}/fd").as_bytes())
            .map_err(|e| format!("cannot list the descriptors of process {real}: {e}"))?;
        for n in names {
            let Some(fd) = fs::parse_dec(&n).map(|v| v as i32) else { continue };
            if own.contains(&fd) {
                continue;
            }
            max_fd = max_fd.max(fd);
            let link = path_of(*real, fd);
            let held = Held { proc: *proc, real: *real, fd };
            if let Some(ino) =
                link.strip_prefix("pipe:[").and_then(|r| r.strip_suffix(']')).and_then(|r| r.parse().ok())
            {
                let (_, flags) = fdinfo(*real, fd);
                let write_end = flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32;
                let entry = match pipes.iter_mut().find(|p| p.0 == ino) {
                    Some(e) => e,
                    None => {
                        pipes.push((ino, Vec::new(), Vec::new()));
                        pipes.last_mut().ok_or("pipe table")?
                    }
                };
                if write_end {
                    entry.2.push(held)
                } else {
                    entry.1.push(held)
                }
            } else if let Some(ino) =
                link.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')).and_then(|r| r.parse::<u64>().ok())
            {
                sockets.push((ino, held));
            } else if link.starts_with('/') && !link.ends_with(" (deleted)") {
                let Ok(st) = sys::stat(&fs::cpath(format!("/proc/{real}/fd/{fd}").as_bytes())) else { continue };
                if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                    continue;
                }
                let key = (st.st_dev, st.st_ino);
                match files.iter_mut().find(|f| f.0 == key) {
                    Some(e) => e.2.push(held),
                    None => files.push((key, link, alloc::vec![held])),
                }
            }
        }
    }
    let mut out = Vec::new();
    for (ino, readers, writers) in pipes {
        // Both ends inside the tree and held by more than one process: recreate it once.
        let mut procs: Vec<u32> = readers.iter().chain(writers.iter()).map(|h| h.proc).collect();
        procs.sort_unstable();
        procs.dedup();
        if readers.is_empty() || writers.is_empty() || procs.len() < 2 {
            continue;
        }
        let (data, capacity) = peek_pipe(readers[0].real, readers[0].fd);
        let rflags = fdinfo(readers[0].real, readers[0].fd).1 & KEPT_FLAGS;
        let wflags = fdinfo(writers[0].real, writers[0].fd).1 & KEPT_FLAGS;
        out.push(SharedEntry {
            object: SharedObject::Pipe { pipe: ino, write_end: false, flags: rflags, capacity, data },
            holders: readers.iter().map(|h| (h.proc, h.fd)).collect(),
        });
        out.push(SharedEntry {
            object: SharedObject::Pipe { pipe: ino, write_end: true, flags: wflags, capacity, data: Vec::new() },
            holders: writers.iter().map(|h| (h.proc, h.fd)).collect(),
        });
    }
    // Connected pairs of Unix sockets with both ends in the tree (one process or several).
    if !sockets.is_empty() {
        let diag = super::unix_sockets::all().map_err(|e| format!("cannot list Unix sockets (sock_diag): {e}"))?;
        let held = |ino: u64| sockets.iter().any(|(i, _)| *i == ino);
        let mut done: Vec<u64> = Vec::new();
        for (ino, _) in &sockets {
            if done.contains(ino) {
                continue;
            }
            done.push(*ino);
            let holders: Vec<&Held> = sockets.iter().filter(|(i, _)| i == ino).map(|(_, h)| h).collect();
            let mut procs: Vec<u32> = holders.iter().map(|h| h.proc).collect();
            procs.sort_unstable();
            procs.dedup();
            let pair = diag.iter().find(|s| s.ino == *ino).filter(|s| s.peer != 0 && held(s.peer));
            let Some(s) = pair else {
                // Not a pair inside the tree: one socket several processes hold (a pre-forking
                // server's listener) is created once and handed to all of them.
                if procs.len() >= 2 {
                    if let Some(kind) = describe_remote(holders[0].real, holders[0].fd) {
                        out.push(SharedEntry {
                            object: SharedObject::NetSocket { socket: kind },
                            holders: holders.iter().map(|h| (h.proc, h.fd)).collect(),
                        });
                    }
                }
                continue;
            };
            let first = holders[0];
            let queued = if s.sock_type == libc::SOCK_STREAM {
                super::unix_sockets::queued(first.real, first.fd)
            } else {
                Vec::new()
            };
            out.push(SharedEntry {
                object: SharedObject::Socket {
                    pair: (*ino).min(s.peer),
                    end: u8::from(*ino > s.peer),
                    sock_type: s.sock_type,
                    flags: fdinfo(first.real, first.fd).1 & KEPT_FLAGS,
                    queued,
                },
                holders: holders.iter().map(|h| (h.proc, h.fd)).collect(),
            });
        }
    }
    for (_, path, holders) in files {
        if distinct_procs(&holders) < 2 {
            continue;
        }
        // Group the holders by open file description.
        let mut groups: Vec<Vec<&Held>> = Vec::new();
        for h in &holders {
            match groups.iter_mut().find(|g| sys::kcmp_files(g[0].real, g[0].fd, h.real, h.fd) == Ok(0)) {
                Some(g) => g.push(h),
                None => groups.push(alloc::vec![h]),
            }
        }
        for g in groups {
            let mut procs: Vec<u32> = g.iter().map(|h| h.proc).collect();
            procs.sort_unstable();
            procs.dedup();
            if procs.len() < 2 {
                continue;
            }
            let (pos, flags) = fdinfo(g[0].real, g[0].fd);
            out.push(SharedEntry {
                object: SharedObject::File { path: path.clone(), flags: flags & KEPT_FLAGS, pos },
                holders: g.iter().map(|h| (h.proc, h.fd)).collect(),
            });
        }
    }
    // Free in every process: above every program descriptor and clear of libmigrate's own.
    let base = if max_fd + 1 + out.len() as i32 <= crate::state::OWN_FD_BASE {
        max_fd + 1
    } else {
        (max_fd + 1).max(crate::state::OWN_FD_BASE + 64)
    };
    Ok((out, base))
}

/// A piece of a shared memory object as one process maps it.
pub struct MemorySegment {
    pub real: i32,
    pub start: u64,
    pub len: u64,
    pub offset: u64,
}

/// Shared memory mapped by several processes (found from their maps by device and inode):
/// objects to add, with the segments to read their contents from.
pub fn find_memory(processes: &[(u32, i32, Vec<i32>)]) -> Vec<(SharedEntry, Vec<MemorySegment>)> {
    struct Seen {
        key: (u64, u64),
        procs: Vec<u32>,
        mappings: Vec<(u32, u64, u64)>,
        segments: Vec<MemorySegment>,
        size: u64,
    }
    let mut seen: Vec<Seen> = Vec::new();
    let registry = crate::tree::mapping().map(|(a, _)| a);
    for (proc, real, _) in processes {
        let Ok(text) = fs::read_file(format!("/proc/{real}/maps").as_bytes()) else { continue };
        for m in super::memory::parse_maps(&text) {
            let anon_like = m.name.starts_with("/dev/zero") || m.name.starts_with("/memfd:");
            if !m.shared || m.inode == 0 || !anon_like || m.name.starts_with("/memfd:migrate-tree") {
                continue;
            }
            if *real == sys::getpid() && registry == Some(m.start) {
                continue;
            }
            let key = (m.dev, m.inode);
            let entry = match seen.iter_mut().find(|s| s.key == key) {
                Some(e) => e,
                None => {
                    seen.push(Seen { key, procs: Vec::new(), mappings: Vec::new(), segments: Vec::new(), size: 0 });
                    seen.last_mut().expect("just pushed")
                }
            };
            if !entry.procs.contains(proc) {
                entry.procs.push(*proc);
            }
            entry.mappings.push((*proc, m.start, m.offset));
            entry.size = entry.size.max(m.offset + (m.end - m.start));
            entry.segments.push(MemorySegment { real: *real, start: m.start, len: m.end - m.start, offset: m.offset });
        }
    }
    seen.into_iter()
        .filter(|s| s.procs.len() >= 2)
        .map(|s| {
            let entry = SharedEntry {
                object: SharedObject::Memory { size: s.size, mappings: s.mappings },
                holders: Vec::new(),
            };
            (entry, s.segments)
        })
        .collect()
}

/// Writes a shared memory object's bytes (read through the holders' /proc/<pid>/mem) as one
/// section of `size` bytes; gaps no process maps are zero.
pub fn write_memory<S: migrate_image::Sink>(
    w: &mut migrate_image::ImageWriter<S>,
    object: u32,
    size: u64,
    mut segments: Vec<MemorySegment>,
) -> Result<(), String> {
    segments.sort_by_key(|s| s.offset);
    w.begin_section(migrate_image::SectionKind::Shared { object }, true).map_err(|e| e.to_string())?;
    let mut buf = alloc::vec![0u8; 1 << 20];
    let mut done = 0u64; // bytes of the object written so far
    for s in &segments {
        let end = s.offset + s.len;
        if end <= done {
            continue;
        }
        while done < s.offset {
            let n = ((s.offset - done) as usize).min(buf.len());
            buf[..n].fill(0);
            w.write(&buf[..n]).map_err(|e| e.to_string())?;
            done += n as u64;
        }
        let mem =
            sys::open(&fs::cpath(format!("/proc/{}/mem", s.real).as_bytes()), libc::O_RDONLY | libc::O_CLOEXEC, 0)
                .map_err(|e| format!("cannot read the shared memory of process {}: {e}", s.real))?;
        let res = (|| {
            while done < end {
                let n = ((end - done) as usize).min(buf.len());
                let got = sys::pread(mem, &mut buf[..n], s.start + (done - s.offset))
                    .map_err(|e| format!("cannot read the shared memory of process {}: {e}", s.real))?;
                if got == 0 {
                    return Err(format!("the shared memory of process {} ended early", s.real));
                }
                w.write(&buf[..got]).map_err(|e| e.to_string())?;
                done += got as u64;
            }
            Ok(())
        })();
        let _ = sys::close(mem);
        res?;
    }
    while done < size {
        let n = ((size - done) as usize).min(buf.len());
        buf[..n].fill(0);
        w.write(&buf[..n]).map_err(|e| e.to_string())?;
        done += n as u64;
    }
    w.end_section();
    Ok(())
}

/// A socket of another member, described through a copy of its descriptor.
fn describe_remote(real: i32, fd: i32) -> Option<migrate_image::FdKind> {
    let pidfd = sys::pidfd_open(real).ok()?;
    let copy = sys::pidfd_getfd(pidfd, fd);
    let _ = sys::close(pidfd);
    let copy = copy.ok()?;
    let flags = fdinfo(real, fd).1 & KEPT_FLAGS;
    let kind = super::sockets::dump(copy, flags);
    let _ = sys::close(copy);
    matches!(kind, migrate_image::FdKind::Socket { .. }).then_some(kind)
}

fn path_of(real: i32, fd: i32) -> String {
    fs::read_link(format!("/proc/{real}/fd/{fd}").as_bytes()).map(|b| super::path_string(&b)).unwrap_or_default()
}
