//! Helpers shared by the launcher's integration tests: running the built binaries and
//! writing small, valid images with the real ImageWriter.

#![allow(dead_code)]

use migrate_image::*;
use migrate_launcher::host;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin(name: &str) -> Command {
    let path = match name {
        "run" => env!("CARGO_BIN_EXE_migrate-run"),
        "checkpoint" => env!("CARGO_BIN_EXE_migrate-checkpoint"),
        "resume" => env!("CARGO_BIN_EXE_migrate-resume"),
        "inspect" => env!("CARGO_BIN_EXE_migrate-inspect"),
        _ => panic!("no binary {name}"),
    };
    let mut c = Command::new(path);
    c.env_remove("MIGRATE_LIB").env_remove("MIGRATE_FORCE").env_remove("MIGRATE_RESTORE");
    c
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(mut cmd: Command) -> Run {
    let Output { status, stdout, stderr } = cmd.output().expect("run binary");
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

impl Run {
    /// Asserts the exit code and that stderr is one error line containing `needle`.
    pub fn expect_error(&self, verb: &str, code: i32, needle: &str) {
        assert_eq!(self.code, code, "stderr: {}\nstdout: {}", self.stderr, self.stdout);
        let prefix = format!("migrate-{verb}: error: ");
        let line = self.stderr.lines().last().unwrap_or("");
        assert!(line.starts_with(&prefix), "stderr: {}", self.stderr);
        assert!(line.contains(needle), "expected {needle:?} in: {}", self.stderr);
    }
}

/// The canonical path of the libc this test runs with (a harmless thing to preload).
pub fn libc_path() -> PathBuf {
    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    let line = maps.lines().find(|l| l.contains("/libc.so") || l.contains("/libc-")).expect("libc in maps");
    let path = &line[line.find('/').unwrap()..];
    fs::canonicalize(path.trim()).unwrap()
}

pub fn identity(path: &Path, hash: bool) -> FileIdentity {
    let md = fs::metadata(path).unwrap();
    FileIdentity {
        path: path.to_str().unwrap().to_string(),
        dev: md.dev(),
        ino: md.ino(),
        size: md.size(),
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        hash: hash.then(|| xxhash_rust::xxh3::xxh3_64(&fs::read(path).unwrap())),
    }
}

/// Metadata for a process that resumes on this very host: `exe` run with `argv`, libc
/// standing in for libmigrate, one anonymous VMA with one stored page (section 0).
pub fn sample_meta(exe: &Path, argv: &[&str]) -> ImageMeta {
    let libc = libc_path();
    let (vdso_hash, vdso_len) = host::vdso_hash().unwrap_or((0, 0));
    let mut stack = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `stack` is a valid, writable rlimit for the call.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_STACK, &mut stack) };
    assert_eq!(r, 0);
    ImageMeta {
        host: HostEntry {
            hostname: host::hostname(),
            boot_id: host::boot_id().unwrap_or_default(),
            kernel_release: host::kernel_release(),
            tool_version: "test".into(),
            created_unix_ns: 1_700_000_000_000_000_000,
            cpu: CpuEntry {
                vendor: host::cpu_vendor(),
                xfeatures: host::xcr0().unwrap_or(0),
                xsave_size: host::xsave_size().unwrap_or(0),
            },
            vdso_hash,
            vdso_len,
            clocks: ClockEntry { monotonic_ns: 1, boottime_ns: 2, realtime_ns: 3 },
        },
        process: ProcessEntry {
            vpid: 42,
            vppid: 1,
            vpgid: 42,
            vsid: 42,
            exe: 0,
            libmigrate: 1,
            ld_preload: libc.to_str().unwrap().to_string(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            personality: 0,
            cwd: "/".into(),
            umask: 0o022,
            rlimits: vec![RlimitEntry { resource: libc::RLIMIT_STACK, cur: stack.rlim_cur, max: stack.rlim_max }],
            mm: MmEntry::default(),
            auxv: vec![],
            files: vec![identity(exe, true), identity(&libc, true)],
            vmas: vec![VmaEntry {
                start: 0x10000,
                end: 0x12000,
                prot: PROT_READ | PROT_WRITE,
                kind: VmaKind::Anon,
                file: None,
                file_offset: 0,
                name: "".into(),
                vm_flags: "rd wr mr mw me ac".into(),
                runs: vec![(0, 1)],
                inherited: vec![],
                data_section: Some(0),
                compression: migrate_image::PageCompression::None,
            }],
            threads: vec![ThreadEntry {
                vtid: 42,
                is_checkpoint_thread: false,
                fs_base: 0x7fff_f7d8_a740,
                tid_address: 0,
                robust_list: 0,
                robust_list_len: 0,
                resume_sp: 0,
                name: "sample".into(),
                affinity: vec![1],
                pending: vec![],
            }],
            fds: vec![FdEntry {
                fd: 1,
                cloexec: false,
                shares_with: None,
                kind: FdKind::Inherited { what: "pipe".into(), flags: 1 },
            }],
            signals: SignalsEntry {
                actions: vec![SigActionEntry {
                    signo: 10,
                    handler: 0x401000,
                    flags: 0x1400_0000,
                    restorer: 0,
                    mask: 0,
                }],
                shared_pending: vec![],
                checkpoint_signal: 12,
            },
            pids: vec![(42, 4242)],
            timers: Default::default(),
        },
    }
}

/// Writes `meta` as an image at `path`: one page section (section 0), then the metadata.
pub fn write_image(path: &Path, meta: &ImageMeta) {
    let file = fs::File::create(path).unwrap();
    let mut w = ImageWriter::new(file, 4).unwrap();
    let page = vec![0xabu8; PAGE_SIZE as usize];
    w.add_section_bytes(SectionKind::Pages { proc: 0, vma: 0 }, &page, true).unwrap();
    let hash = migrate_image::page_hash(&page).to_le_bytes();
    w.add_section_bytes(SectionKind::PageHashes { proc: 0, vma: 0 }, &hash, false).unwrap();
    w.add_meta(0, meta).unwrap();
    let p = &meta.process;
    let tree = migrate_image::TreeMeta {
        processes: vec![migrate_image::TreeProcess { vpid: p.vpid, vppid: p.vppid, vpgid: p.vpgid, vsid: p.vsid }],
        zombies: vec![],
        shared: vec![],
        shared_fd_base: 3,
        sysv: vec![],
        network_lock: String::new(),
        image_id: 1,
        ancestors: vec![],
    };
    w.add_tree(&tree).unwrap();
    w.finish().unwrap();
}

/// Offset of the first section of `kind` in the image at `path`.
pub fn section_offset(path: &Path, pred: impl Fn(SectionKind) -> bool) -> u64 {
    let r = ImageReader::open(path).unwrap();
    r.sections().iter().find(|s| pred(s.kind)).unwrap().offset
}

pub fn flip_byte(path: &Path, offset: u64) {
    let mut b = fs::read(path).unwrap();
    b[offset as usize] ^= 0xff;
    fs::write(path, b).unwrap();
}
