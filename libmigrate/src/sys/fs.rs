//! Reading /proc and small files with raw system calls into buffers from libmigrate's own
//! allocator (never opendir/fopen: they call glibc's malloc).

use super::{close, getdents64, open, read, Errno, SysResult};
use alloc::vec::Vec;

/// A NUL-terminated copy of `s`.
pub fn cpath(s: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s);
    v.push(0);
    v
}

/// Reads a whole file (e.g. under /proc, where sizes are not known in advance).
pub fn read_file(path: &[u8]) -> SysResult<Vec<u8>> {
    let fd = open(&cpath(path), libc::O_RDONLY | libc::O_CLOEXEC, 0)?;
    let mut out = Vec::with_capacity(4096);
    let res = loop {
        if out.capacity() - out.len() < 4096 {
            out.reserve(out.capacity());
        }
        let len = out.len();
        let cap = out.capacity();
        out.resize(cap, 0);
        match read(fd, &mut out[len..]) {
            Ok(0) => {
                out.truncate(len);
                break Ok(());
            }
            Ok(n) => out.truncate(len + n),
            Err(Errno(libc::EINTR)) => out.truncate(len),
            Err(e) => {
                out.truncate(len);
                break Err(e);
            }
        }
    };
    let _ = close(fd);
    res.map(|_| out)
}

/// Names in a directory (without "." and "..").
pub fn list_dir(path: &[u8]) -> SysResult<Vec<Vec<u8>>> {
    let fd = open(&cpath(path), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC, 0)?;
    let mut names = Vec::new();
    let mut buf = alloc::vec![0u8; 16384];
    let res = loop {
        match getdents64(fd, &mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                let mut off = 0;
                while off < n {
                    let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
                    let name = &buf[off + 19..off + reclen];
                    let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
                    if name != b"." && name != b".." {
                        names.push(name.to_vec());
                    }
                    off += reclen;
                }
            }
            Err(e) => break Err(e),
        }
    };
    let _ = close(fd);
    res.map(|_| names)
}

/// readlink into a Vec.
pub fn read_link(path: &[u8]) -> SysResult<Vec<u8>> {
    let mut buf = alloc::vec![0u8; 4096];
    let n = super::readlink(&cpath(path), &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

pub fn parse_dec(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.first() {
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: i64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((c - b'0') as i64)?;
    }
    Some(if neg { -v } else { v })
}

pub fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in s {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        v = v.checked_mul(16)?.checked_add(d as u64)?;
    }
    Some(v)
}
