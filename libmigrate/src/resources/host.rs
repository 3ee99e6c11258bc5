//! Facts about the machine a checkpoint runs on, recorded so resume can refuse a target that
//! cannot run the image (CPU register state, vdso).

use crate::resources::memory::MapLine;
use crate::sys::{self, fs};
use alloc::string::String;
use migrate_image::{ClockEntry, CpuEntry, HostEntry};

fn cstr_field(f: &[libc::c_char]) -> String {
    let bytes: alloc::vec::Vec<u8> = f.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

pub fn cpu_vendor() -> String {
    let r = core::arch::x86_64::__cpuid(0);
    let mut v = alloc::vec::Vec::with_capacity(12);
    for w in [r.ebx, r.edx, r.ecx] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    String::from_utf8_lossy(&v).into_owned()
}

/// xxh3 of the [vdso] mapping's bytes and its length.
pub fn vdso_hash(maps: &[MapLine]) -> (u64, u64) {
    match maps.iter().find(|m| m.name == "[vdso]") {
        Some(m) => {
            // SAFETY: the vdso is mapped readable in every process for its whole length.
            let bytes = unsafe { core::slice::from_raw_parts(m.start as *const u8, (m.end - m.start) as usize) };
            (xxhash_rust::xxh3::xxh3_64(bytes), m.end - m.start)
        }
        None => (0, 0),
    }
}

pub fn clocks() -> ClockEntry {
    ClockEntry {
        monotonic_ns: sys::monotonic_ns(),
        boottime_ns: sys::clock_gettime(libc::CLOCK_BOOTTIME),
        realtime_ns: sys::clock_gettime(libc::CLOCK_REALTIME),
    }
}

pub fn dump(maps: &[MapLine]) -> HostEntry {
    let u = sys::uname();
    let (xfeatures, xsave_size) = sys::xsave_features();
    let (vdso_hash, vdso_len) = vdso_hash(maps);
    let boot_id = fs::read_file(b"/proc/sys/kernel/random/boot_id")
        .map(|b| String::from_utf8_lossy(&b).trim().into())
        .unwrap_or_default();
    let clocks = clocks();
    HostEntry {
        hostname: cstr_field(&u.nodename),
        boot_id,
        kernel_release: cstr_field(&u.release),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        created_unix_ns: clocks.realtime_ns,
        cpu: CpuEntry { vendor: cpu_vendor(), xfeatures, xsave_size },
        vdso_hash,
        vdso_len,
        clocks,
    }
}
