//! Just enough ELF to tell whether LD_PRELOAD can reach a program: a dynamically linked
//! executable has a PT_INTERP program header (the dynamic loader); a static one has none.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// What kind of executable a file is, as far as preloading is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Executable {
    /// An x86_64 ELF with a dynamic loader: LD_PRELOAD works.
    Dynamic { interpreter: String },
    /// An ELF without PT_INTERP: the dynamic loader never runs, LD_PRELOAD is ignored.
    Static,
    /// An ELF for another class or machine (32-bit, ARM, …): `what` describes it.
    Foreign { what: String },
    /// A `#!` script; the interpreter named on its first line (may be empty).
    Script { interpreter: PathBuf },
    /// Anything else (execvp hands it to /bin/sh).
    Other,
}

const PT_INTERP: u32 = 3;
const PN_XNUM: u16 = 0xffff;
const EM_X86_64: u16 = 62;

/// Classifies the file at `path` by reading its headers.
pub fn classify(path: &Path) -> io::Result<Executable> {
    let file = File::open(path)?;
    let mut head = [0u8; 256];
    let n = read_at_most(&file, &mut head, 0)?;
    let head = &head[..n];
    if head.starts_with(b"#!") {
        let line = head[2..].split(|&b| b == b'\n').next().unwrap_or(&[]);
        let line = String::from_utf8_lossy(line);
        let interp = line.split_whitespace().next().unwrap_or("");
        return Ok(Executable::Script { interpreter: PathBuf::from(interp) });
    }
    if !head.starts_with(b"\x7fELF") {
        return Ok(Executable::Other);
    }
    if head.len() < 64 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "ELF header cut short"));
    }
    let class = head[4];
    let data = head[5];
    if class != 2 || data != 1 {
        let bits = if class == 1 { "32-bit" } else { "non-64-bit" };
        let what = if data == 1 { bits.to_string() } else { format!("{bits} big-endian") };
        return Ok(Executable::Foreign { what: format!("a {what} ELF program") });
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let machine = u16_at(head, 18);
    if machine != EM_X86_64 {
        return Ok(Executable::Foreign { what: format!("an ELF program for machine {machine} (not x86_64)") });
    }
    let phoff = u64_at(head, 32);
    let shoff = u64_at(head, 40);
    let phentsize = u16_at(head, 54) as u64;
    let mut phnum = u16_at(head, 56) as u64;
    if phnum == PN_XNUM as u64 {
        // The real count is in sh_info of section header 0.
        let mut sh = [0u8; 4];
        file.read_exact_at(&mut sh, shoff.checked_add(44).ok_or_else(bad_header)?)?;
        phnum = u32::from_le_bytes(sh) as u64;
    }
    if phentsize < 56 || phnum > 65536 {
        return Err(bad_header());
    }
    let mut ph = [0u8; 56];
    for i in 0..phnum {
        let off = phoff.checked_add(i * phentsize).ok_or_else(bad_header)?;
        file.read_exact_at(&mut ph, off)?;
        if u32_at(&ph, 0) == PT_INTERP {
            let (p_offset, p_filesz) = (u64_at(&ph, 8), u64_at(&ph, 32).min(4096));
            let mut name = vec![0u8; p_filesz as usize];
            file.read_exact_at(&mut name, p_offset)?;
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            let interpreter = String::from_utf8_lossy(&name[..end]).into_owned();
            return Ok(Executable::Dynamic { interpreter });
        }
    }
    Ok(Executable::Static)
}

fn bad_header() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed ELF program headers")
}

fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal ELF64 x86_64 executable header with one PT_LOAD and, optionally, a PT_INTERP.
    pub(crate) fn synthetic_elf(with_interp: bool) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[0..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // ELFCLASS64
        b[5] = 1; // little-endian
        b[6] = 1; // EV_CURRENT
        b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&0x401000u64.to_le_bytes()); // entry
        b[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        b[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        b[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        let phnum: u16 = if with_interp { 2 } else { 1 };
        b[56..58].copy_from_slice(&phnum.to_le_bytes());
        let interp = b"/lib64/ld-linux-x86-64.so.2\0";
        let interp_off = 64 + 56 * phnum as u64;
        if with_interp {
            let mut ph = [0u8; 56];
            ph[0..4].copy_from_slice(&PT_INTERP.to_le_bytes());
            ph[8..16].copy_from_slice(&interp_off.to_le_bytes());
            ph[32..40].copy_from_slice(&(interp.len() as u64).to_le_bytes());
            b.extend_from_slice(&ph);
        }
        let mut load = [0u8; 56];
        load[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        b.extend_from_slice(&load);
        if with_interp {
            b.extend_from_slice(interp);
        }
        b
    }

    fn classify_bytes(bytes: &[u8]) -> Executable {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        classify(f.path()).unwrap()
    }

    #[test]
    fn bin_ls_is_dynamic() {
        match classify(Path::new("/bin/ls")).unwrap() {
            Executable::Dynamic { interpreter } => {
                assert!(interpreter.contains("ld-"), "{interpreter}")
            }
            other => panic!("/bin/ls classified as {other:?}"),
        }
    }

    #[test]
    fn synthetic_headers() {
        assert_eq!(classify_bytes(&synthetic_elf(false)), Executable::Static);
        assert_eq!(
            classify_bytes(&synthetic_elf(true)),
            Executable::Dynamic { interpreter: "/lib64/ld-linux-x86-64.so.2".into() }
        );
        let mut elf32 = synthetic_elf(false);
        elf32[4] = 1;
        assert!(matches!(classify_bytes(&elf32), Executable::Foreign { what } if what.contains("32-bit")));
    }

    #[test]
    fn scripts_and_garbage() {
        assert_eq!(classify_bytes(b"#!/bin/sh -e\necho hi\n"), Executable::Script { interpreter: "/bin/sh".into() });
        assert_eq!(classify_bytes(b"echo hi\n"), Executable::Other);
        assert_eq!(classify_bytes(b""), Executable::Other);
        assert!(classify(Path::new("/nonexistent/x")).is_err());
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"\x7fELF\x02\x01").unwrap();
        assert!(classify(f.path()).is_err());
        // Program headers pointing past the end of the file.
        let mut bad = synthetic_elf(false);
        bad[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(classify_bytes_err(&bad));
    }

    fn classify_bytes_err(bytes: &[u8]) -> bool {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        classify(f.path()).is_err()
    }
}
