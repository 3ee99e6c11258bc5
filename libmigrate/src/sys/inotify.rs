//! inotify, and the calls that finding and re-adding a watch's path needs (getcwd, lstat,
//! memfd_create, open_by_handle_at). Declared after `sc!` in sys/mod.rs, which it uses.

use super::{check, syscall6, SysResult};

pub fn inotify_init1(flags: i32) -> SysResult<i32> {
    sc!(libc::SYS_inotify_init1, flags).map(|v| v as i32)
}
/// Adds (or, for an inode already watched, modifies) a watch; returns its number.
pub fn inotify_add_watch(fd: i32, path: &[u8], mask: u32) -> SysResult<i32> {
    assert!(path.last() == Some(&0), "path must be NUL-terminated");
    sc!(libc::SYS_inotify_add_watch, fd, path.as_ptr(), mask).map(|v| v as i32)
}
pub fn inotify_rm_watch(fd: i32, wd: i32) -> SysResult<()> {
    sc!(libc::SYS_inotify_rm_watch, fd, wd).map(|_| ())
}

/// getcwd(2): the path with its NUL; returns the length including the NUL. A directory outside
/// our root comes back as "(unreachable)…", which callers reject as not absolute.
pub fn getcwd(buf: &mut [u8]) -> SysResult<usize> {
    sc!(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len())
}

/// stat(2) of the link itself.
pub fn lstat(path: &[u8]) -> SysResult<libc::stat> {
    assert!(path.last() == Some(&0));
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    sc!(libc::SYS_newfstatat, libc::AT_FDCWD, path.as_ptr(), &mut st as *mut libc::stat, libc::AT_SYMLINK_NOFOLLOW)
        .map(|_| st)
}

pub fn memfd_create(name: &[u8], flags: u32) -> SysResult<i32> {
    assert!(name.last() == Some(&0));
    sc!(libc::SYS_memfd_create, name.as_ptr(), flags).map(|v| v as i32)
}

/// The largest file handle the kernel produces (MAX_HANDLE_SZ).
pub const MAX_HANDLE_SZ: usize = 128;

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct FileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// open_by_handle_at(2): opens the inode that (`handle_type`, `handle`) names on the filesystem
/// `mount_fd` is on. Needs CAP_DAC_READ_SEARCH (EPERM otherwise).
pub fn open_by_handle_at(mount_fd: i32, handle_type: i32, handle: &[u8], flags: i32) -> SysResult<i32> {
    if handle.len() > MAX_HANDLE_SZ {
        return Err(super::Errno(libc::EINVAL));
    }
    let mut h = FileHandle { handle_bytes: handle.len() as u32, handle_type, f_handle: [0; MAX_HANDLE_SZ] };
    h.f_handle[..handle.len()].copy_from_slice(handle);
    sc!(libc::SYS_open_by_handle_at, mount_fd, &mut h as *mut FileHandle, flags).map(|v| v as i32)
}
