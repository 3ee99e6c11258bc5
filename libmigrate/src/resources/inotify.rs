//! inotify instances. fdinfo lists every watch of an instance (its number, inode, device, mask,
//! file handle) but not the path it was added with: the inotify_add_watch hook
//! (hooks/inotify.rs) records that path here, in a fixed table of atomics that hooks fill
//! without a lock or an allocation and that the checkpoint thread reads while the program is
//! frozen.
//!
//! Dump: each watch fdinfo lists, with its path: the recorded one, or — for a watch added before
//! an exec, through syscall(2), or whose path did not fit the table — the path of the inode its
//! file handle opens (open_by_handle_at, needs CAP_DAC_READ_SEARCH). A watch found neither way
//! makes the descriptor unrestorable (resume refuses it; --force gives /dev/null).
//!
//! Restore: a new instance whose watches get their old numbers back. The kernel numbers an
//! instance's watches cyclically upward from 1, never reusing a number before it wraps, so the
//! numbers below each wanted one are used up by adding and removing a watch on a scratch memfd.
//! A path that no longer exists (or now names a file watched under another number) is skipped
//! with a message: the program keeps the number but gets no events for it. Events queued at
//! checkpoint time, and any raised while the watches are re-added, are lost.

use crate::resources::path_string;
use crate::sys::{self, fs, inotify as ino};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use migrate_image::{FdKind, InotifyWatch};

/// Watches the table can hold (for all instances together).
pub const SLOTS: usize = 2048;
const PATH_WORDS: usize = 128;
/// Longest path the table records; longer ones are found by file handle at checkpoint time.
pub const MAX_PATH: usize = PATH_WORDS * 8;

/// A slot's state sits in the low two bits of its state word; the bits above count its claims,
/// so a compare-exchange against a word read earlier fails if the slot was freed and claimed
/// again in between.
const STATE: u32 = 3;
const FREE: u32 = 0;
const BUSY: u32 = 1;
const READY: u32 = 2;
const GENERATION: u32 = 4;

struct Slot {
    state: AtomicU32,
    fd: AtomicI32,
    wd: AtomicI32,
    len: AtomicU32,
    path: [AtomicU64; PATH_WORDS],
    /// Used only by `collect` (one at a time): the state word a stale candidate had.
    scratch: AtomicU32,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            state: AtomicU32::new(FREE),
            fd: AtomicI32::new(-1),
            wd: AtomicI32::new(0),
            len: AtomicU32::new(0),
            path: [const { AtomicU64::new(0) }; PATH_WORDS],
            scratch: AtomicU32::new(0),
        }
    }

    fn holds(&self, word: u32, fd: i32) -> bool {
        word & STATE == READY && self.fd.load(Ordering::Relaxed) == fd
    }

    /// Takes the slot if its state word is still `word`; returns the busy word.
    fn take(&self, word: u32) -> Option<u32> {
        let busy = (word & !STATE).wrapping_add(GENERATION) | BUSY;
        self.state.compare_exchange(word, busy, Ordering::Acquire, Ordering::Relaxed).ok().map(|_| busy)
    }

    fn fill(&self, busy: u32, fd: i32, wd: i32, path: &[u8]) {
        self.fd.store(fd, Ordering::Relaxed);
        self.wd.store(wd, Ordering::Relaxed);
        self.len.store(path.len() as u32, Ordering::Relaxed);
        for (word, chunk) in self.path.iter().zip(path.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            word.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        self.state.store((busy & !STATE) | READY, Ordering::Release);
    }

    fn free(&self, word: u32) {
        let _ = self.state.compare_exchange(word, (word & !STATE) | FREE, Ordering::Release, Ordering::Relaxed);
    }
}

/// The path each watch was added with, by (inotify descriptor, watch number).
static TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
/// Set while one thread drops stale entries from a full table.
static COLLECTING: AtomicBool = AtomicBool::new(false);

/// Records that watch `wd` of instance `fd` was added with `path` (as the program gave it;
/// a relative path is taken from the current directory). Called by the hook after the kernel
/// accepted the watch; raw system calls only, nothing allocated, errno untouched.
pub fn record(fd: i32, wd: i32, path: &[u8]) {
    let mut buf = [0u8; MAX_PATH];
    let Some(len) = absolute(path, &mut buf) else {
        // Not recordable: an older entry for this number must not stand for it.
        forget(fd, wd);
        return;
    };
    let path = &buf[..len];
    for attempt in 0..2 {
        // The same inode added again keeps its number: its entry is updated.
        for s in &TABLE {
            let word = s.state.load(Ordering::Acquire);
            if s.holds(word, fd) && s.wd.load(Ordering::Relaxed) == wd {
                if let Some(busy) = s.take(word) {
                    s.fill(busy, fd, wd, path);
                    return;
                }
            }
        }
        for s in &TABLE {
            let word = s.state.load(Ordering::Relaxed);
            if word & STATE == FREE {
                if let Some(busy) = s.take(word) {
                    s.fill(busy, fd, wd, path);
                    return;
                }
            }
        }
        if attempt == 0 {
            collect();
        }
    }
    // Still full: this watch is found by file handle at checkpoint time.
}

/// Forgets watch `wd` of instance `fd` (inotify_rm_watch).
pub fn forget(fd: i32, wd: i32) {
    for s in &TABLE {
        let word = s.state.load(Ordering::Acquire);
        if s.holds(word, fd) && s.wd.load(Ordering::Relaxed) == wd {
            s.free(word);
        }
    }
}

/// Forgets every watch recorded for descriptor `fd`: a new instance got that number, so
/// entries left from a closed one must not be taken for its watches.
pub fn forget_instance(fd: i32) {
    for s in &TABLE {
        let word = s.state.load(Ordering::Acquire);
        if s.holds(word, fd) {
            s.free(word);
        }
    }
}

/// The recorded paths of watch `wd` of instance `fd` (normally one); with `fd` None, of watch
/// `wd` of any descriptor.
fn recorded(fd: Option<i32>, wd: i32) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for s in &TABLE {
        let word = s.state.load(Ordering::Acquire);
        if word & STATE != READY
            || fd.is_some_and(|fd| s.fd.load(Ordering::Relaxed) != fd)
            || s.wd.load(Ordering::Relaxed) != wd
        {
            continue;
        }
        let len = (s.len.load(Ordering::Relaxed) as usize).min(MAX_PATH);
        let mut path = Vec::with_capacity(len.div_ceil(8) * 8);
        for w in &s.path[..len.div_ceil(8)] {
            path.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        path.truncate(len);
        fence(Ordering::Acquire);
        if s.state.load(Ordering::Relaxed) == word {
            out.push(path);
        }
    }
    out
}

/// `path` made absolute in `out` (the current directory before a relative path); its length.
fn absolute(path: &[u8], out: &mut [u8; MAX_PATH]) -> Option<usize> {
    if path.is_empty() || path.len() > MAX_PATH {
        return None;
    }
    if path[0] == b'/' {
        out[..path.len()].copy_from_slice(path);
        return Some(path.len());
    }
    let with_nul = ino::getcwd(&mut out[..]).ok()?;
    let cwd_len = with_nul.checked_sub(1)?;
    if out.first() != Some(&b'/') {
        return None; // "(unreachable)": outside our root
    }
    let len = cwd_len + 1 + path.len();
    if len > MAX_PATH {
        return None;
    }
    out[cwd_len] = b'/';
    out[cwd_len + 1..len].copy_from_slice(path);
    Some(len)
}

/// Drops stale entries from the full table: those of descriptors that are no longer inotify
/// instances, and watches their instance no longer lists (removed by the kernel: IN_IGNORED
/// after the file was deleted, IN_ONESHOT). One thread at a time; another one that finds the
/// table full meanwhile just does not record its watch.
fn collect() {
    if COLLECTING.swap(true, Ordering::Acquire) {
        return;
    }
    let mut done = [0i32; 64];
    let mut ndone = 0;
    for s in &TABLE {
        let word = s.state.load(Ordering::Acquire);
        if word & STATE != READY {
            continue;
        }
        let fd = s.fd.load(Ordering::Relaxed);
        if done[..ndone].contains(&fd) {
            continue;
        }
        if ndone == done.len() {
            break;
        }
        done[ndone] = fd;
        ndone += 1;
        collect_instance(fd);
    }
    COLLECTING.store(false, Ordering::Release);
}

fn collect_instance(fd: i32) {
    // Candidates: the instance's entries before the listing is read. Each was recorded after
    // the kernel added its watch, so one the listing lacks is gone; an entry filled or
    // rewritten meanwhile is left alone (freeing compares against this snapshot).
    for s in &TABLE {
        let word = s.state.load(Ordering::Acquire);
        s.scratch.store(if s.holds(word, fd) { word } else { FREE }, Ordering::Relaxed);
    }
    if is_inotify(fd) {
        let listed = for_each_listed_wd(fd, |wd| {
            for s in &TABLE {
                if s.scratch.load(Ordering::Relaxed) != FREE && s.wd.load(Ordering::Relaxed) == wd {
                    s.scratch.store(FREE, Ordering::Relaxed);
                }
            }
        });
        if !listed {
            return; // cannot tell: keep everything
        }
    }
    for s in &TABLE {
        let word = s.scratch.load(Ordering::Relaxed);
        if word != FREE {
            s.free(word);
        }
    }
}

fn is_inotify(fd: i32) -> bool {
    let mut path = crate::log::StackBuf::<64>::new();
    let _ = write!(path, "/proc/thread-self/fd/{fd}");
    let mut link = [0u8; 32];
    matches!(sys::readlink(path.as_cstr(), &mut link), Ok(n) if &link[..n] == b"anon_inode:inotify")
}

/// Calls `f` with the number of every watch fdinfo lists for `fd` (read through a small stack
/// buffer: this runs in a hook). False if fdinfo cannot be read.
fn for_each_listed_wd(fd: i32, mut f: impl FnMut(i32)) -> bool {
    let mut path = crate::log::StackBuf::<64>::new();
    let _ = write!(path, "/proc/thread-self/fdinfo/{fd}");
    let Ok(file) = sys::open(path.as_cstr(), libc::O_RDONLY | libc::O_CLOEXEC, 0) else { return false };
    let mut buf = [0u8; 1024];
    let mut have = 0;
    let ok = loop {
        let n = match sys::read(file, &mut buf[have..]) {
            Ok(n) => n,
            Err(sys::Errno(libc::EINTR)) => continue,
            Err(_) => break false,
        };
        have += n;
        let mut start = 0;
        while let Some(end) = buf[start..have].iter().position(|&c| c == b'\n') {
            if let Some(wd) = listed_wd(&buf[start..start + end]) {
                f(wd);
            }
            start += end + 1;
        }
        if n == 0 {
            break true;
        }
        if start == 0 && have == buf.len() {
            have = 0; // a line longer than the buffer: not a watch line
        } else {
            buf.copy_within(start..have, 0);
            have -= start;
        }
    };
    let _ = sys::close(file);
    ok
}

/// The watch number of an fdinfo line "inotify wd:N ino:…".
fn listed_wd(line: &[u8]) -> Option<i32> {
    let rest = line.strip_prefix(b"inotify wd:")?;
    let end = rest.iter().position(|&c| c == b' ').unwrap_or(rest.len());
    fs::parse_dec(&rest[..end]).map(|v| v as i32)
}

/// One watch as fdinfo lists it.
#[derive(Debug, Default, PartialEq, Eq)]
struct Listed {
    wd: i32,
    ino: u64,
    /// The kernel's device number of the filesystem (major << 20 | minor).
    sdev: u64,
    mask: u32,
    /// (fhandle-type, f_handle bytes), when the filesystem gives handles.
    handle: Option<(i32, Vec<u8>)>,
}

/// The watches of an inotify instance's fdinfo:
/// `inotify wd:2 ino:3c4a7 sdev:fe00000 mask:200 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:a7c4030000000000`.
fn parse_fdinfo(text: &[u8]) -> Vec<Listed> {
    text.split(|&c| c == b'\n')
        .filter_map(|line| {
            let rest = line.strip_prefix(b"inotify ")?;
            let mut w = Listed::default();
            let mut have_wd = false;
            let (mut htype, mut hbytes) = (None, None);
            for token in rest.split(|&c| c == b' ' || c == b'\t').filter(|t| !t.is_empty()) {
                let Some(colon) = token.iter().position(|&c| c == b':') else { continue };
                let (key, value) = (&token[..colon], &token[colon + 1..]);
                match key {
                    b"wd" => {
                        w.wd = fs::parse_dec(value)? as i32;
                        have_wd = true;
                    }
                    b"ino" => w.ino = fs::parse_hex(value)?,
                    b"sdev" => w.sdev = fs::parse_hex(value)?,
                    b"mask" => w.mask = fs::parse_hex(value)? as u32,
                    b"fhandle-type" => htype = fs::parse_hex(value).map(|v| v as i32),
                    b"f_handle" => hbytes = hex_bytes(value),
                    _ => {}
                }
            }
            w.handle = htype.zip(hbytes);
            have_wd.then_some(w)
        })
        .collect()
}

fn hex_bytes(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() / 2 > ino::MAX_HANDLE_SZ {
        return None;
    }
    s.chunks(2).map(|pair| fs::parse_hex(pair).map(|v| v as u8)).collect()
}

/// Whether `path` leads to the watched inode: `Some(false)` through symbolic links, as
/// inotify_add_watch follows them, `Some(true)` as a link itself (IN_DONT_FOLLOW). The inode
/// number decides, not the device: on overlayfs stat reports a file's underlying device, while
/// fdinfo shows the overlay's.
fn leads_to(path: &[u8], w: &Listed) -> Option<bool> {
    let c = fs::cpath(path);
    if sys::stat(&c).is_ok_and(|st| st.st_ino == w.ino) {
        Some(false)
    } else if ino::lstat(&c).is_ok_and(|st| st.st_ino == w.ino) {
        Some(true)
    } else {
        None
    }
}

/// Mount points by the kernel's device number of their filesystem, from mountinfo
/// (`36 35 98:0 /mnt1 /mnt/parent rw,… - ext3 /dev/root rw`).
fn parse_mountinfo(text: &[u8]) -> Vec<(u64, Vec<u8>)> {
    text.split(|&c| c == b'\n')
        .filter_map(|line| {
            let mut f = line.split(|&c| c == b' ');
            let dev = f.nth(2)?;
            let point = f.nth(1)?;
            let colon = dev.iter().position(|&c| c == b':')?;
            let major = fs::parse_dec(&dev[..colon])? as u64;
            let minor = fs::parse_dec(&dev[colon + 1..])? as u64;
            Some((major << 20 | minor, unescape(point)))
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let octal = s.get(i + 1..i + 4).filter(|d| s[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                out.push(s[i]);
                i += 1;
            }
        }
    }
    out
}

/// The path of the watched inode found through its file handle: opened (O_PATH) on each mount
/// of its filesystem in turn, its /proc/thread-self/fd link read back and checked.
fn by_handle(w: &Listed, mounts: &mut Option<Vec<(u64, Vec<u8>)>>) -> Option<(Vec<u8>, bool)> {
    let (htype, handle) = w.handle.as_ref()?;
    let mounts = mounts
        .get_or_insert_with(|| parse_mountinfo(&fs::read_file(b"/proc/thread-self/mountinfo").unwrap_or_default()));
    for (_, point) in mounts.iter().filter(|(dev, _)| *dev == w.sdev) {
        // Not O_PATH: open_by_handle_at refuses an O_PATH mount descriptor (EBADF).
        let dir_flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
        let Ok(mount_fd) = sys::open(&fs::cpath(point), dir_flags, 0) else { continue };
        let opened = ino::open_by_handle_at(mount_fd, *htype, handle, libc::O_PATH | libc::O_CLOEXEC);
        let _ = sys::close(mount_fd);
        let fd = match opened {
            Ok(fd) => fd,
            Err(sys::Errno(libc::EPERM)) => return None, // no CAP_DAC_READ_SEARCH: no mount helps
            Err(_) => continue,
        };
        let link = fs::read_link(format!("/proc/thread-self/fd/{fd}").as_bytes());
        let _ = sys::close(fd);
        if let Ok(path) = link {
            if path.first() == Some(&b'/') {
                if let Some(dont_follow) = leads_to(&path, w) {
                    return Some((path, dont_follow));
                }
            }
        }
    }
    None
}

/// Describes inotify instance `fd` of this process.
pub fn dump(fd: i32, flags: u32) -> FdKind {
    let Ok(text) = fs::read_file(format!("/proc/thread-self/fdinfo/{fd}").as_bytes()) else {
        return FdKind::Unsupported { what: format!("inotify instance {fd} (its fdinfo cannot be read)") };
    };
    let mut mounts = None;
    let mut watches = Vec::new();
    for w in parse_fdinfo(&text) {
        let own = recorded(Some(fd), w.wd);
        let confirmed = |paths: &[Vec<u8>]| paths.iter().find_map(|p| leads_to(p, &w).map(|d| (p.clone(), d)));
        // Then under any descriptor: this one may be a dup (or dup2'd copy) of the one the
        // watch was added through. The inode check makes another instance's entry harmless.
        let found = confirmed(&own).or_else(|| confirmed(&recorded(None, w.wd))).or_else(|| by_handle(&w, &mut mounts));
        let (path, dont_follow) = match found {
            Some(found) => found,
            None => match own.into_iter().next() {
                // Renamed or replaced since it was added: the program asked for this path.
                Some(p) => {
                    crate::debug!(
                        "inotify fd {fd}: watch {} was added on {}, which now names another file",
                        w.wd,
                        path_string(&p)
                    );
                    (p, false)
                }
                None => {
                    return FdKind::Unsupported {
                        what: format!(
                            "inotify instance: the path of watch {} (inode {} on device {}:{}) is unknown — it was added before an exec, through syscall(2), or on a file deleted since; finding it by file handle needs CAP_DAC_READ_SEARCH",
                            w.wd,
                            w.ino,
                            w.sdev >> 20,
                            w.sdev & 0xf_ffff
                        ),
                    };
                }
            },
        };
        let mask = w.mask | if dont_follow { libc::IN_DONT_FOLLOW } else { 0 };
        watches.push(InotifyWatch { wd: w.wd, path: path_string(&path), mask });
    }
    watches.sort_by_key(|w| w.wd);
    FdKind::Inotify { flags, watches }
}

/// Recreates inotify instance `saved_fd` with its `watches` (ascending numbers); returns the new
/// descriptor (placed by the caller).
pub fn restore(saved_fd: i32, watches: &[InotifyWatch]) -> Result<i32, String> {
    // Non-blocking until the caller sets the saved flags, so the drain below cannot block.
    let fd = ino::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC)
        .map_err(|e| format!("cannot recreate inotify instance {saved_fd}: {e}"))?;
    let mut spare = None;
    let res = add_watches(fd, saved_fd, watches, &mut spare);
    if let Some((memfd, _)) = spare {
        let _ = sys::close(memfd);
    }
    // Removing the spare watches queued IN_IGNORED events; none of what is queued is the program's.
    let mut buf = [0u8; 4096];
    while let Ok(1..) = sys::read(fd, &mut buf) {}
    match res {
        Ok(()) => Ok(fd),
        Err(e) => {
            let _ = sys::close(fd);
            Err(e)
        }
    }
}

/// Adds the watches in order, using up the numbers in between with a watch on a scratch memfd
/// (`spare`: the memfd and its /proc path, made on first need).
fn add_watches(
    fd: i32,
    saved_fd: i32,
    watches: &[InotifyWatch],
    spare: &mut Option<(i32, Vec<u8>)>,
) -> Result<(), String> {
    let mut next = 1; // a new instance numbers from 1
    for w in watches {
        if w.wd < next {
            return Err(format!("inotify fd {saved_fd}: watch {} is out of order in the image", w.wd));
        }
        while next < w.wd {
            if spare.is_none() {
                let memfd = ino::memfd_create(b"migrate-inotify\0", libc::MFD_CLOEXEC)
                    .map_err(|e| format!("cannot create a scratch memfd for inotify fd {saved_fd}: {e}"))?;
                *spare = Some((memfd, fs::cpath(format!("/proc/thread-self/fd/{memfd}").as_bytes())));
            }
            let Some((_, path)) = spare.as_ref() else { unreachable!("just made") };
            let used = ino::inotify_add_watch(fd, path, libc::IN_ACCESS)
                .map_err(|e| format!("inotify fd {saved_fd}: cannot use up watch number {next}: {e}"))?;
            let _ = ino::inotify_rm_watch(fd, used);
            if used < next || used >= w.wd {
                return Err(format!(
                    "inotify fd {saved_fd}: the kernel numbered a watch {used} while {next} was expected; watch {} cannot get its number back",
                    w.wd
                ));
            }
            next = used + 1;
        }
        // IN_MASK_CREATE: a path that now leads to a file watched under another number fails
        // (EEXIST) instead of changing that watch.
        match ino::inotify_add_watch(fd, &fs::cpath(w.path.as_bytes()), w.mask | libc::IN_MASK_CREATE) {
            Ok(got) if got == w.wd => next = got + 1,
            Ok(got) => {
                return Err(format!(
                    "inotify fd {saved_fd}: watch on {} came back as number {got} instead of {}",
                    w.path, w.wd
                ));
            }
            Err(e @ sys::Errno(libc::ENOENT | libc::ENOTDIR | libc::EEXIST | libc::ELOOP)) => {
                let why = if e.0 == libc::EEXIST {
                    String::from("it now names a file watched under another number")
                } else {
                    format!("{e}")
                };
                crate::info!(
                    "inotify fd {saved_fd}: watch {} on {} is not restored ({why}); the program gets no events for it",
                    w.wd,
                    w.path
                );
            }
            Err(e) => return Err(format!("inotify fd {saved_fd}: cannot watch {} again: {e}", w.path)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fdinfo_watches() {
        let text = b"pos:\t0\nflags:\t02004000\nmnt_id:\t17\nino:\t17\n\
inotify wd:3 ino:10e0 sdev:1 mask:2 ignored_mask:0 fhandle-bytes:c fhandle-type:1 f_handle:2e759ec9e010000000000000\n\
inotify wd:1 ino:98c11d sdev:fe00000 mask:84000100 ignored_mask:0\n";
        let w = parse_fdinfo(text);
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].wd, w[0].ino, w[0].sdev, w[0].mask), (3, 0x10e0, 1, 2));
        let (htype, bytes) = w[0].handle.clone().unwrap();
        assert_eq!(htype, 1);
        assert_eq!(bytes, [0x2e, 0x75, 0x9e, 0xc9, 0xe0, 0x10, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            (w[1].wd, w[1].ino, w[1].sdev, w[1].mask, w[1].handle.clone()),
            (1, 0x98c11d, 0xfe00000, 0x8400_0100, None)
        );
        assert_eq!(listed_wd(b"inotify wd:12 ino:1 sdev:2"), Some(12));
        assert_eq!(listed_wd(b"tfd: 3 events: 19"), None);
    }

    #[test]
    fn parses_mountinfo() {
        let text = b"22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
40 22 0:35 / /mnt/with\\040space rw - tmpfs tmpfs rw\n";
        assert_eq!(parse_mountinfo(text), [(254 << 20, b"/".to_vec()), (35, b"/mnt/with space".to_vec())]);
    }

    #[test]
    fn table_records_updates_and_forgets() {
        record(900, 1, b"/tmp/a");
        record(900, 2, b"/tmp/b");
        record(901, 1, b"/tmp/other");
        assert_eq!(recorded(Some(900), 1), [b"/tmp/a".to_vec()]);
        record(900, 1, b"/tmp/a-again");
        assert_eq!(recorded(Some(900), 1), [b"/tmp/a-again".to_vec()]);
        forget(900, 1);
        assert!(recorded(Some(900), 1).is_empty());
        assert_eq!(recorded(Some(900), 2), [b"/tmp/b".to_vec()]);
        forget_instance(900);
        assert!(recorded(Some(900), 2).is_empty());
        assert_eq!(recorded(Some(901), 1), [b"/tmp/other".to_vec()]);
        let long = alloc::vec![b'x'; MAX_PATH + 1];
        record(901, 1, &long);
        assert!(recorded(Some(901), 1).is_empty(), "a path too long to record drops the old entry");

        // A full table drops what is stale: watches the instance no longer lists, descriptors
        // that are no longer inotify instances. (One test: the table is process-wide.)
        let fd = ino::inotify_init1(libc::IN_CLOEXEC).unwrap();
        let wd = ino::inotify_add_watch(fd, b"/\0", libc::IN_CREATE).unwrap();
        record(fd, wd, b"/");
        for i in 0.. {
            if TABLE.iter().all(|s| s.state.load(Ordering::Relaxed) & STATE == READY) {
                break;
            }
            record(if i % 2 == 0 { fd } else { 902 }, 1000 + i, b"/stale");
        }
        record(fd, wd + 1, b"/new");
        assert_eq!(recorded(Some(fd), wd + 1), [b"/new".to_vec()]);
        assert_eq!(recorded(Some(fd), wd), [b"/".to_vec()], "a listed watch is kept");
        assert!(recorded(Some(fd), 1000).is_empty() && recorded(Some(902), 1001).is_empty());
        forget_instance(fd);
        let _ = sys::close(fd);
    }

    #[test]
    fn watches_are_found_by_file_handle() {
        if sys::getuid() != 0 {
            std::eprintln!("skipped: open_by_handle_at needs CAP_DAC_READ_SEARCH");
            return;
        }
        let dir = std::env::temp_dir().join(format!("migrate-inotify-test-{}", sys::getpid()));
        std::fs::create_dir_all(&dir).unwrap();
        let fd = ino::inotify_init1(libc::IN_CLOEXEC).unwrap();
        let wd = ino::inotify_add_watch(fd, &fs::cpath(dir.as_os_str().as_encoded_bytes()), libc::IN_CREATE).unwrap();
        let text = fs::read_file(format!("/proc/thread-self/fdinfo/{fd}").as_bytes()).unwrap();
        let listed = parse_fdinfo(&text);
        let found = by_handle(&listed[0], &mut None);
        let _ = sys::close(fd);
        std::fs::remove_dir(&dir).unwrap();
        assert_eq!(listed[0].wd, wd);
        let (path, dont_follow) = found.expect("found by handle");
        assert_eq!(path, dir.as_os_str().as_encoded_bytes());
        assert!(!dont_follow);
    }

    #[test]
    fn relative_paths_are_taken_from_the_current_directory() {
        let mut out = [0u8; MAX_PATH];
        let n = absolute(b"sub/dir", &mut out).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(&out[..n], format!("{}/sub/dir", cwd.display()).as_bytes());
        assert_eq!(absolute(b"/abs", &mut out), Some(4));
        assert_eq!(absolute(b"", &mut out), None);
    }
}
