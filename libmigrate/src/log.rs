//! No-allocation logging: format into a stack buffer, one `write(2)` to stderr.
//! Usable from the checkpoint thread while the program is frozen.

use crate::sys;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU8, Ordering};

pub const QUIET: u8 = 0;
pub const INFO: u8 = 1;
pub const DEBUG: u8 = 2;
pub static LEVEL: AtomicU8 = AtomicU8::new(INFO);

pub struct StackBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackBuf<N> {
    pub const fn new() -> Self {
        StackBuf { buf: [0; N], len: 0 }
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
    pub fn clear(&mut self) {
        self.len = 0;
    }
    pub fn push_bytes(&mut self, b: &[u8]) {
        let n = b.len().min(N - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
    }
    /// The contents plus a terminating NUL (truncated if full), for syscalls taking paths.
    pub fn as_cstr(&mut self) -> &[u8] {
        if self.len == N {
            self.len -= 1;
        }
        self.buf[self.len] = 0;
        &self.buf[..self.len + 1]
    }
}

impl<const N: usize> Default for StackBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Write for StackBuf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push_bytes(s.as_bytes());
        Ok(())
    }
}

pub fn emit(level: u8, args: fmt::Arguments<'_>) {
    if LEVEL.load(Ordering::Relaxed) < level {
        return;
    }
    let mut b = StackBuf::<1024>::new();
    let _ = write!(b, "migrate[{}]: ", crate::state::virtual_pid());
    let _ = b.write_fmt(args);
    b.push_bytes(b"\n");
    let _ = sys::write_all(2, b.as_bytes());
}

#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::emit($crate::log::INFO, format_args!($($arg)*)) };
}
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log::emit($crate::log::DEBUG, format_args!($($arg)*)) };
}
