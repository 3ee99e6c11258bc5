//! A per-user cache of the content hashes of code files (executables, libraries, libmigrate),
//! shared by the checkpoint (libmigrate, which records each mapped code file's hash) and
//! migrate-resume (which compares the files on the target against them). Hashing reads the
//! whole file — several MB, from disk when the page cache is cold — for every checkpoint and
//! every resume; the cache turns that into one small read.
//!
//! An entry is keyed by what changes whenever the file's contents can have changed: device,
//! inode, size, and the modification and *change* times in nanoseconds. The change time cannot
//! be set by a user (any write, chmod or utimensat moves it to now), so a file rewritten in
//! place, replaced by a rename or restored with its old mtime misses the cache. The cache lives
//! in the user's own private directory (`$XDG_RUNTIME_DIR/migrate`, else `/tmp/migrate-<uid>`,
//! mode 0700, owned by the user, checked before each use): only its owner can add entries, and
//! entries only ever speak about the owner's own checkpoints and resumes.
//!
//! Format: text lines `<dev> <ino> <size> <mtime_ns> <ctime_ns> <hash hex>`, appended with
//! O_APPEND (a line is one write, so writers never interleave); a file grown past
//! `MAX_BYTES` is started afresh. A line that does not parse is ignored.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What identifies one version of a file's contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl FileKey {
    pub fn of(md: &fs::Metadata) -> FileKey {
        FileKey {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
        }
    }
}

/// The cache file grows by about 60 bytes per file version; past this it starts afresh.
pub const MAX_BYTES: u64 = 256 << 10;
const FILE_NAME: &str = "file-hashes";

/// The user's private migrate directory: `$XDG_RUNTIME_DIR/migrate`, else `/tmp/migrate-<uid>`.
pub fn user_dir(uid: u32, xdg_runtime_dir: Option<&str>) -> PathBuf {
    match xdg_runtime_dir {
        Some(d) if !d.is_empty() => Path::new(d).join("migrate"),
        _ => PathBuf::from(format!("/tmp/migrate-{uid}")),
    }
}

/// `dir` exists (creating it, mode 0700, when missing) and is a directory of `uid` that no one
/// else may enter.
pub fn private_dir(dir: &Path, uid: u32) -> bool {
    let _ = fs::DirBuilder::new().mode(0o700).create(dir);
    fs::symlink_metadata(dir).is_ok_and(|md| md.is_dir() && md.uid() == uid && md.permissions().mode() & 0o077 == 0)
}

fn parse(line: &str) -> Option<(FileKey, u64)> {
    let mut w = line.split(' ');
    let mut num = || w.next()?.parse::<i64>().ok();
    let key =
        FileKey { dev: num()? as u64, ino: num()? as u64, size: num()? as u64, mtime_ns: num()?, ctime_ns: num()? };
    let hash = u64::from_str_radix(w.next()?, 16).ok()?;
    w.next().is_none().then_some((key, hash))
}

/// The cached hash of the file version `key`, if `dir` (a private directory: see
/// [`private_dir`]) has one.
pub fn lookup(dir: &Path, key: &FileKey) -> Option<u64> {
    let text = fs::read_to_string(dir.join(FILE_NAME)).ok()?;
    text.lines().rev().filter_map(parse).find(|(k, _)| k == key).map(|(_, h)| h)
}

/// Records `hash` for the file version `key` (best effort: a failure only costs a later hash).
pub fn store(dir: &Path, key: &FileKey, hash: u64) {
    let path = dir.join(FILE_NAME);
    let too_big = fs::metadata(&path).is_ok_and(|m| m.len() > MAX_BYTES);
    let line = format!("{} {} {} {} {} {hash:016x}\n", key.dev, key.ino, key.size, key.mtime_ns, key.ctime_ns);
    let mut opts = OpenOptions::new();
    opts.create(true).mode(0o600);
    if too_big {
        opts.write(true).truncate(true);
    } else {
        opts.append(true);
    }
    if let Ok(mut f) = opts.open(&path) {
        let _ = f.write_all(line.as_bytes());
    }
}

/// The content hash of the file at `path`: the cached one when the user's private directory
/// (`user_dir(uid, xdg_runtime_dir)`) knows this version of the file, else `compute()`'s,
/// recorded there if the file did not change while it was hashed. Without a usable directory it
/// is simply `compute()`.
pub fn cached<E>(
    path: &Path,
    uid: u32,
    xdg_runtime_dir: Option<&str>,
    compute: impl FnOnce() -> Result<u64, E>,
) -> Result<u64, E> {
    let dir = user_dir(uid, xdg_runtime_dir);
    let dir = private_dir(&dir, uid).then_some(dir);
    let key = fs::metadata(path).ok().map(|md| FileKey::of(&md));
    if let (Some(dir), Some(k)) = (dir.as_deref(), key.as_ref()) {
        if let Some(h) = lookup(dir, k) {
            return Ok(h);
        }
    }
    let h = compute()?;
    let after = fs::metadata(path).ok().map(|md| FileKey::of(&md));
    if let (Some(dir), Some(k)) = (dir.as_deref(), key) {
        if after == Some(k) {
            store(dir, &k, h);
        }
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_found_by_their_whole_key_and_bad_lines_are_ignored() {
        let dir = std::env::temp_dir().join(format!("migrate-file-hashes-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        // Our uid: the owner of a directory we make.
        fs::create_dir(&dir).unwrap();
        let uid = fs::metadata(&dir).unwrap().uid();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(!private_dir(&dir, uid), "a directory others may enter is not used");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(private_dir(&dir, uid));
        assert!(!private_dir(&dir, uid + 1), "nor someone else's");
        let key = FileKey { dev: 1, ino: 2, size: 3, mtime_ns: 4, ctime_ns: 5 };
        assert_eq!(lookup(&dir, &key), None);
        store(&dir, &key, 0xabc);
        fs::OpenOptions::new()
            .append(true)
            .open(dir.join(FILE_NAME))
            .unwrap()
            .write_all(b"garbage line\n1 2\n")
            .unwrap();
        assert_eq!(lookup(&dir, &key), Some(0xabc));
        // Another change time: another version of the file.
        assert_eq!(lookup(&dir, &FileKey { ctime_ns: 6, ..key }), None);
        store(&dir, &key, 0xdef);
        assert_eq!(lookup(&dir, &key), Some(0xdef), "the newest entry wins");
        fs::remove_dir_all(&dir).unwrap();
    }
}
