//! One module per kind of process resource, each with its dump and restore side by side.

pub mod accept_queue;
pub mod files;
pub mod host;
pub mod inotify;
pub mod ipc;
pub mod memory;
pub mod process;
pub mod shared;
pub mod signals;
pub mod sockets;
pub mod threads;
pub mod timers;
pub mod unix_sockets;

/// The current working directory, absolute.
pub fn files_cwd() -> Option<Vec<u8>> {
    fs::read_link(b"/proc/thread-self/cwd").ok()
}

use crate::sys::{self, fs};
use alloc::string::String;
use alloc::vec::Vec;
use migrate_image::FileIdentity;

/// The files an image refers to (mapped binaries and libraries, open files), by identity.
#[derive(Default)]
pub struct Files {
    pub list: Vec<FileIdentity>,
}

/// Content hashes of files already hashed in this process, by (dev, ino, size, mtime).
/// (dev, ino, size, mtime_ns) of a file.
type FileKey = (u64, u64, u64, i64);
static HASH_CACHE: std::sync::Mutex<Vec<(FileKey, u64)>> = std::sync::Mutex::new(Vec::new());

impl Files {
    /// The index of `path`'s identity, adding it if new. `hash` asks for a content hash (mapped
    /// code: a different build of a library must be caught even with the same size and mtime).
    pub fn intern_path(&mut self, path: &str, hash: bool) -> u32 {
        if let Some(i) = self.list.iter().position(|f| f.path == path) {
            if hash && self.list[i].hash.is_none() {
                self.list[i].hash = content_hash(&self.list[i]);
            }
            return i as u32;
        }
        let mut id = FileIdentity { path: path.into(), dev: 0, ino: 0, size: 0, mtime_ns: 0, hash: None };
        if let Ok(st) = sys::stat(&fs::cpath(path.as_bytes())) {
            id.dev = st.st_dev;
            id.ino = st.st_ino;
            id.size = st.st_size as u64;
            id.mtime_ns = st.st_mtime * 1_000_000_000 + st.st_mtime_nsec;
        }
        if hash {
            id.hash = content_hash(&id);
        }
        self.list.push(id);
        (self.list.len() - 1) as u32
    }
}

fn content_hash(id: &FileIdentity) -> Option<u64> {
    if let Ok(mem) = HASH_CACHE.lock() {
        if let Some((_, h)) = mem.iter().find(|(k, _)| *k == key_of(id)) {
            return Some(*h);
        }
    }
    // The user's persistent cache (migrate_image::file_hashes), keyed by the file's version.
    let uid = sys::getuid();
    let xdg = crate::env::var("XDG_RUNTIME_DIR");
    let h = migrate_image::file_hashes::cached(std::path::Path::new(&id.path), uid, xdg.as_deref(), || {
        read_and_hash(&id.path)
    })
    .ok()?;
    if let Ok(mut mem) = HASH_CACHE.lock() {
        mem.push((key_of(id), h));
    }
    Some(h)
}

/// The xxh3-64 of a whole file, read with raw system calls.
fn read_and_hash(path: &str) -> Result<u64, ()> {
    let fd = sys::open(&fs::cpath(path.as_bytes()), libc::O_RDONLY | libc::O_CLOEXEC, 0).map_err(|_| ())?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = alloc::vec![0u8; 1 << 20];
    let mut off = 0u64;
    let ok = loop {
        match sys::pread(fd, &mut buf, off) {
            Ok(0) => break true,
            Ok(n) => {
                hasher.update(&buf[..n]);
                off += n as u64;
            }
            Err(_) => break false,
        }
    };
    let _ = sys::close(fd);
    ok.then(|| hasher.digest()).ok_or(())
}

fn key_of(id: &FileIdentity) -> (u64, u64, u64, i64) {
    (id.dev, id.ino, id.size, id.mtime_ns)
}

/// Lossy UTF-8 of a byte path.
pub fn path_string(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
