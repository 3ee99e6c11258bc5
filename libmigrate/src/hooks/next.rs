//! The one place that resolves the real libc functions behind our hooks (dlsym RTLD_NEXT),
//! eagerly in the constructor; `real!` falls back to resolving on first use for hooks that run
//! before it (other libraries' constructors).

use core::sync::atomic::{AtomicUsize, Ordering};

pub struct Real {
    name: &'static [u8],
    addr: AtomicUsize,
}

impl Real {
    pub const fn new(name: &'static [u8]) -> Self {
        Real { name, addr: AtomicUsize::new(0) }
    }

    /// Address of the next definition of this symbol after libmigrate.
    pub fn get(&self) -> usize {
        let a = self.addr.load(Ordering::Relaxed);
        if a != 0 {
            return a;
        }
        // SAFETY: `name` is a NUL-terminated static string; dlsym is safe to call with
        // RTLD_NEXT from a loaded library.
        let a = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr() as *const libc::c_char) } as usize;
        self.addr.store(a, Ordering::Relaxed);
        a
    }
}

/// Declares a table entry: `real_fn!(NANOSLEEP, b"nanosleep\0")`.
macro_rules! real_fn {
    ($id:ident, $name:expr) => {
        pub static $id: $crate::hooks::next::Real = $crate::hooks::next::Real::new($name);
    };
}
pub(crate) use real_fn;

/// Calls the real function as the given type: `call_real!(NANOSLEEP: fn(*const timespec, *mut timespec) -> c_int)(a, b)`.
macro_rules! call_real {
    ($id:path : fn($($arg:ty),* $(,)?) -> $ret:ty) => {{
        let addr = $id.get();
        if addr == 0 {
            $crate::sys::exit_group(127);
        }
        // SAFETY: the symbol was resolved by name from libc, whose prototype is the one given.
        unsafe { core::mem::transmute::<usize, unsafe extern "C" fn($($arg),*) -> $ret>(addr) }
    }};
}
pub(crate) use call_real;
