//! Facts about this machine that an image must match: the CPU's register-state features, the
//! kernel's vdso, the boot id and the kernel release.

use std::fs;

/// XCR0: the xsave state components the kernel enabled (what signal frames contain), or
/// `None` when the CPU or the kernel does not use xsave.
#[cfg(target_arch = "x86_64")]
pub fn xcr0() -> Option<u64> {
    use core::arch::x86_64::{__cpuid, _xgetbv};
    let leaf1 = __cpuid(1);
    if leaf1.ecx & (1 << 27) == 0 {
        return None;
    }
    // SAFETY: OSXSAVE (CPUID.1:ECX bit 27) is set, so the CPU supports xsave/xgetbv and the
    // kernel enabled it (CR4.OSXSAVE); xgetbv(0) cannot fault.
    Some(unsafe { _xgetbv(0) })
}

#[cfg(not(target_arch = "x86_64"))]
pub fn xcr0() -> Option<u64> {
    None
}

/// The size of the xsave area for the features enabled in XCR0 (CPUID leaf 0xD, sub-leaf 0,
/// EBX), or `None` without xsave.
#[cfg(target_arch = "x86_64")]
pub fn xsave_size() -> Option<u32> {
    use core::arch::x86_64::{__cpuid, __cpuid_count};
    if __cpuid(0).eax < 0xd || xcr0().is_none() {
        return None;
    }
    Some(__cpuid_count(0xd, 0).ebx)
}

#[cfg(not(target_arch = "x86_64"))]
pub fn xsave_size() -> Option<u32> {
    None
}

/// The CPU vendor string ("GenuineIntel", "AuthenticAMD").
#[cfg(target_arch = "x86_64")]
pub fn cpu_vendor() -> String {
    let r = core::arch::x86_64::__cpuid(0);
    let mut v = Vec::with_capacity(12);
    for w in [r.ebx, r.edx, r.ecx] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    String::from_utf8_lossy(&v).into_owned()
}

#[cfg(not(target_arch = "x86_64"))]
pub fn cpu_vendor() -> String {
    String::new()
}

/// Human names of the xsave feature bits set in `mask` (deduplicated, in bit order).
pub fn xfeature_names(mask: u64) -> Vec<&'static str> {
    const BITS: [(u32, &str); 12] = [
        (0, "x87"),
        (1, "SSE"),
        (2, "AVX"),
        (3, "MPX"),
        (4, "MPX"),
        (5, "AVX-512"),
        (6, "AVX-512"),
        (7, "AVX-512"),
        (9, "PKRU"),
        (17, "AMX"),
        (18, "AMX"),
        (19, "APX"),
    ];
    let mut names: Vec<&'static str> = Vec::new();
    for bit in 0..64 {
        if mask & (1u64 << bit) == 0 {
            continue;
        }
        let name = BITS.iter().find(|(b, _)| *b == bit).map(|(_, n)| *n).unwrap_or("other");
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// The address range of the `[vdso]` mapping in this process, from /proc/self/maps.
pub fn vdso_range() -> Option<(u64, u64)> {
    let maps = fs::read_to_string("/proc/self/maps").ok()?;
    maps_range(&maps, "[vdso]")
}

/// Finds the range of the mapping named `name` in the text of a maps file.
pub fn maps_range(maps: &str, name: &str) -> Option<(u64, u64)> {
    for line in maps.lines() {
        if line.split_whitespace().nth(5) != Some(name) {
            continue;
        }
        let range = line.split_whitespace().next()?;
        let (a, b) = range.split_once('-')?;
        let start = u64::from_str_radix(a, 16).ok()?;
        let end = u64::from_str_radix(b, 16).ok()?;
        return (end > start).then_some((start, end));
    }
    None
}

/// xxh3 of this process's vdso bytes and its length, or `None` when the kernel maps no vdso.
/// Every process on the same kernel build sees the same bytes.
pub fn vdso_hash() -> Option<(u64, u64)> {
    let (start, end) = vdso_range()?;
    let len = end - start;
    // SAFETY: /proc/self/maps lists [vdso] at start..end in our own address space; the kernel
    // maps it readable (r-xp) for the life of the process and nothing unmaps it, so the whole
    // range is valid, initialized, immutable memory for the duration of this borrow.
    let bytes = unsafe { std::slice::from_raw_parts(start as usize as *const u8, len as usize) };
    Some((xxhash_rust::xxh3::xxh3_64(bytes), len))
}

/// The kernel's boot id (changes at every boot), or `None` if unreadable.
pub fn boot_id() -> Option<String> {
    let s = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(s.trim().to_string())
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// This machine's host name.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_facts() {
        if let Some(x) = xcr0() {
            assert_eq!(x & 0b11, 0b11, "x87 and SSE are always enabled with xsave");
            assert!(xsave_size().unwrap() >= 576);
        }
        assert_eq!(xfeature_names(0b111), ["x87", "SSE", "AVX"]);
        assert_eq!(xfeature_names(0xe0 | (3 << 17)), ["AVX-512", "AMX"]);
        assert_eq!(xfeature_names(1 << 40), ["other"]);
    }

    #[test]
    fn vdso_is_stable() {
        let a = vdso_hash();
        assert_eq!(a, vdso_hash());
        if let Some((_, len)) = a {
            assert!(len > 0 && len % 4096 == 0);
        }
    }

    #[test]
    fn maps_parsing() {
        let maps = "7ffc1000-7ffc3000 r-xp 00000000 00:00 0                          [vdso]\n\
                    55550000-55551000 r--p 00000000 08:01 42   /usr/bin/foo [vdso]\n";
        assert_eq!(maps_range(maps, "[vdso]"), Some((0x7ffc1000, 0x7ffc3000)));
        assert_eq!(maps_range(maps, "[vvar]"), None);
    }

    #[test]
    fn boot_id_and_kernel() {
        if let Some(id) = boot_id() {
            assert_eq!(id.len(), 36);
        }
        assert!(!kernel_release().is_empty());
    }
}
