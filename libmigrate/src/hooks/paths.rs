//! Paths under /proc that name a process or thread by id: `/proc/<pid>/…` and
//! `…/task/<tid>/…` opened with a virtual id are rewritten to the real id (into a stack buffer;
//! nothing is allocated). Everything else passes through untouched after a prefix check.

use super::next::{call_real, real_fn};
use crate::state;
use libc::{c_char, c_int, c_uint};

real_fn!(OPEN, b"open\0");
real_fn!(OPEN64, b"open64\0");
real_fn!(OPENAT, b"openat\0");
real_fn!(OPENAT64, b"openat64\0");
real_fn!(OPEN_2, b"__open_2\0");
real_fn!(OPEN64_2, b"__open64_2\0");
real_fn!(FOPEN, b"fopen\0");
real_fn!(FOPEN64, b"fopen64\0");
real_fn!(OPENDIR, b"opendir\0");
real_fn!(READLINK, b"readlink\0");
real_fn!(STAT, b"stat\0");
real_fn!(LSTAT, b"lstat\0");
real_fn!(ACCESS, b"access\0");

pub fn resolve() {
    for r in [
        &OPEN, &OPEN64, &OPENAT, &OPENAT64, &OPEN_2, &OPEN64_2, &FOPEN, &FOPEN64, &OPENDIR, &READLINK, &STAT, &LSTAT,
        &ACCESS,
    ] {
        r.get();
    }
}

const MAX_PATH: usize = 4096;

/// Appends the decimal form of `v`.
fn push_dec(out: &mut [u8; MAX_PATH], len: &mut usize, v: i32) -> bool {
    let mut digits = [0u8; 12];
    let mut n = v as u32;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    push(out, len, &digits[i..])
}

fn push(out: &mut [u8; MAX_PATH], len: &mut usize, bytes: &[u8]) -> bool {
    if *len + bytes.len() >= MAX_PATH {
        return false;
    }
    out[*len..*len + bytes.len()].copy_from_slice(bytes);
    *len += bytes.len();
    true
}

/// Splits off the leading path component.
fn component(s: &[u8]) -> (&[u8], &[u8]) {
    match s.iter().position(|&c| c == b'/') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, &[]),
    }
}

fn number(s: &[u8]) -> Option<i32> {
    if s.is_empty() || s.len() > 10 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0i32, |acc, &c| acc.checked_mul(10)?.checked_add((c - b'0') as i32))
}

/// The real-id form of `path` in `out`, or None when nothing needs translating.
pub fn translate_proc_path(path: &[u8], out: &mut [u8; MAX_PATH]) -> Option<usize> {
    let rest = path.strip_prefix(b"/proc/")?;
    let mut len = 0;
    push(out, &mut len, b"/proc/");
    let (first, mut rest) = component(rest);
    let mut changed = false;
    match number(first) {
        Some(v) => {
            let real = state::to_real(v);
            changed |= real != v;
            push_dec(out, &mut len, real);
        }
        None if first == b"self" || first == b"thread-self" => {
            push(out, &mut len, first);
        }
        None => return None,
    }
    if let Some(after) = rest.strip_prefix(b"/task/") {
        let (tid, tail) = component(after);
        if let Some(v) = number(tid) {
            let real = state::to_real(v);
            changed |= real != v;
            push(out, &mut len, b"/task/");
            push_dec(out, &mut len, real);
            rest = tail;
        }
    }
    if !changed || !push(out, &mut len, rest) {
        return None;
    }
    out[len] = 0;
    Some(len)
}

/// Runs `f` with the path the kernel must see.
fn with_real_path<R>(path: *const c_char, f: impl FnOnce(*const c_char) -> R) -> R {
    if path.is_null() {
        return f(path);
    }
    // SAFETY: the program passes a NUL-terminated path.
    let bytes = unsafe { core::ffi::CStr::from_ptr(path) }.to_bytes();
    if !bytes.starts_with(b"/proc/") {
        return f(path);
    }
    let mut buf = [0u8; MAX_PATH];
    match translate_proc_path(bytes, &mut buf) {
        Some(_) => f(buf.as_ptr() as *const c_char),
        None => f(path),
    }
}

macro_rules! path_first {
    ($name:ident, $real:ident, ($($a:ident: $t:ty),*) -> $r:ty) => {
        /// # Safety
        /// The libc function's own contract; only a /proc path is rewritten.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(path: *const c_char, $($a: $t),*) -> $r {
            let real = call_real!($real: fn(*const c_char, $($t),*) -> $r);
            // SAFETY: pass-through with a translated path.
            with_real_path(path, |p| unsafe { real(p, $($a),*) })
        }
    };
}

// open/open64 are C-variadic (mode only with O_CREAT/O_TMPFILE); passing the third integer
// register through is ABI-compatible on x86_64 and the callee reads it only when it exists.
path_first!(open, OPEN, (flags: c_int, mode: c_uint) -> c_int);
path_first!(open64, OPEN64, (flags: c_int, mode: c_uint) -> c_int);
path_first!(__open_2, OPEN_2, (flags: c_int) -> c_int);
path_first!(__open64_2, OPEN64_2, (flags: c_int) -> c_int);
path_first!(fopen, FOPEN, (mode: *const c_char) -> *mut libc::FILE);
path_first!(fopen64, FOPEN64, (mode: *const c_char) -> *mut libc::FILE);
path_first!(opendir, OPENDIR, () -> *mut libc::DIR);
path_first!(readlink, READLINK, (buf: *mut c_char, size: usize) -> isize);
path_first!(stat, STAT, (st: *mut libc::stat) -> c_int);
path_first!(lstat, LSTAT, (st: *mut libc::stat) -> c_int);
path_first!(access, ACCESS, (mode: c_int) -> c_int);

/// # Safety
/// openat(2)'s contract (C-variadic like open).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn openat(dirfd: c_int, path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    let real = call_real!(OPENAT: fn(c_int, *const c_char, c_int, c_uint) -> c_int);
    // SAFETY: pass-through with a translated path.
    with_real_path(path, |p| unsafe { real(dirfd, p, flags, mode) })
}

/// # Safety
/// openat64's contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn openat64(dirfd: c_int, path: *const c_char, flags: c_int, mode: c_uint) -> c_int {
    let real = call_real!(OPENAT64: fn(c_int, *const c_char, c_int, c_uint) -> c_int);
    // SAFETY: pass-through with a translated path.
    with_real_path(path, |p| unsafe { real(dirfd, p, flags, mode) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(path: &str) -> Option<String> {
        let mut buf = [0u8; MAX_PATH];
        translate_proc_path(path.as_bytes(), &mut buf).map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    #[test]
    fn rewrites_only_known_ids() {
        state::PIDS.insert(pid_virt::VirtPid(4242), pid_virt::RealPid(777)).unwrap();
        state::PIDS.insert(pid_virt::VirtPid(4243), pid_virt::RealPid(778)).unwrap();
        assert_eq!(t("/proc/4242/status").as_deref(), Some("/proc/777/status"));
        assert_eq!(t("/proc/4242").as_deref(), Some("/proc/777"));
        assert_eq!(t("/proc/4242/task/4243/comm").as_deref(), Some("/proc/777/task/778/comm"));
        assert_eq!(t("/proc/self/task/4243/stat").as_deref(), Some("/proc/self/task/778/stat"));
        assert_eq!(t("/proc/self/status"), None);
        assert_eq!(t("/proc/99999/status"), None);
        assert_eq!(t("/proc/meminfo"), None);
        assert_eq!(t("/etc/passwd"), None);
    }
}
