//! The environment, read straight from `environ`. Programs may define getenv/setenv/unsetenv
//! themselves (bash does, answering from its own variable table), and a call from libmigrate
//! would reach theirs: libmigrate never calls them.

use alloc::string::String;
use alloc::vec::Vec;

unsafe extern "C" {
    static environ: *const *const libc::c_char;
}

/// The value of `name`, as bytes.
pub fn var_bytes(name: &str) -> Option<Vec<u8>> {
    // SAFETY: `environ` is libc's NULL-terminated array of NUL-terminated strings; we only read
    // it (in the constructor, before the program runs, or on the checkpoint thread).
    unsafe {
        let mut p = environ;
        if p.is_null() {
            return None;
        }
        while !(*p).is_null() {
            let entry = core::ffi::CStr::from_ptr(*p).to_bytes();
            if entry.len() > name.len() && entry.starts_with(name.as_bytes()) && entry[name.len()] == b'=' {
                return Some(entry[name.len() + 1..].to_vec());
            }
            p = p.add(1);
        }
    }
    None
}

/// The value of `name` as text.
pub fn var(name: &str) -> Option<String> {
    var_bytes(name).map(|b| String::from_utf8_lossy(&b).into_owned())
}
