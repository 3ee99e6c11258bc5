//! Lazy restore (`migrate-resume --lazy`): memory comes in on first touch through userfaultfd.
//! The program (examples/c/lazymem.c) checksums its memory on command; every answer after the
//! resume must equal the one before it, and its command counter must continue.
//!
//! `MIGRATE_LAZY_STATS=1` makes the page server report on stderr when it is done (pages, faults,
//! events seen); `MIGRATE_LAZY_DELAY_MS` holds its background fill back, so that what a test does
//! right after the resume surely happens while pages are still missing.

use migrate_tests::*;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const NOBODY: u32 = 65534;

/// The value of `key=` in `line`.
fn hex(line: &str, key: &str) -> u64 {
    field_hex(line, key)
}

/// A file of 64 KiB the program reads into its lazily restored buffer.
fn data_file(dir: &Path) -> PathBuf {
    let path = dir.join("data.bin");
    let bytes: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Starts lazymem with `mib` MiB, answers one `sum`, and checkpoints it with --kill.
/// Returns (the ready line, the image).
fn checkpointed(dir: &Path, mib: u32, data: &Path) -> (String, PathBuf) {
    let mut p = migrate_run(dir, &cbin("lazymem"), [mib.to_string(), data.display().to_string()]);
    let ready = p.wait_line("ready ", STARTUP);
    p.send_line("sum");
    let sum = p.wait_line("sum ", LINE);
    assert_eq!(field_num::<u32>(&sum, "n"), 1);
    assert_eq!(hex(&sum, "a"), hex(&ready, "a"), "checksum before the checkpoint");
    let image = checkpoint(p.pid(), true, dir);
    p.wait_exit(LINE);
    (ready, image)
}

/// `migrate-resume --lazy IMAGE` with the page server's report on, its background fill held
/// back `delay_ms`.
fn resume_lazy(image: &Path, delay_ms: u64) -> Managed {
    let mut cmd = resume_cmd(&["--lazy"], image);
    cmd.env("MIGRATE_LAZY_STATS", "1").env("MIGRATE_LAZY_DELAY_MS", delay_ms.to_string());
    Managed::spawn("migrate-resume --lazy", cmd)
}

/// The page server's report: `migrate: lazy restore of process … complete …`.
fn wait_report(s: &mut Managed) -> String {
    s.wait_stderr_line(|l: &str| l.contains("lazy restore of process"), CKPT)
}

/// 128 MiB come back whole: the same checksum, the next command number, all through the page
/// server (its report counts every stored page).
#[test]
fn a_lazy_resume_brings_back_every_page() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let data = data_file(dir);
    let (ready, image) = checkpointed(dir, 128, &data);

    let mut s = resume_lazy(&image, 0);
    s.send_line("sum");
    let sum = s.wait_line("sum ", STARTUP);
    assert_eq!(field_num::<u32>(&sum, "n"), 2, "the command counter continues: {sum}");
    assert_eq!(hex(&sum, "a"), hex(&ready, "a"), "128 MiB checksum after the lazy resume");
    let report = wait_report(&mut s);
    assert!(field_num::<u64>(&report, "pages") >= 128 * 256, "the page server had the memory to bring in: {report}");
    s.send_line("sum");
    let again = s.wait_line("sum ", LINE);
    assert_eq!((field_num::<u32>(&again, "n"), hex(&again, "a")), (3, hex(&ready, "a")), "after the fill");
    let stderr = s.stderr_so_far().join("\n");
    assert!(!stderr.contains("not available"), "no fallback: {stderr}");
    s.kill();
}

/// While pages are still missing, the program drops part of a region (madvise DONTNEED: it
/// must read zeros, never the image), moves another (mremap: its pages follow it), unmaps a
/// third, has the kernel write into a lazy buffer (read(2)), and forks (the child sees every
/// page). The page server saw each of these events.
#[test]
fn madvise_mremap_munmap_read_and_fork_while_pages_are_missing() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let data = data_file(dir);
    let (ready, image) = checkpointed(dir, 16, &data);

    let mut s = resume_lazy(&image, 3000);
    s.send_line("ops");
    let ops = s.wait_line("ops ", STARTUP);
    assert_eq!(field_num::<u32>(&ops, "n"), 2, "{ops}");
    assert_eq!(field_num::<u32>(&ops, "zero"), 1, "MADV_DONTNEED pages read zeros: {ops}");
    assert_eq!(hex(&ops, "b2"), hex(&ready, "b2"), "the rest of the madvised region: {ops}");
    assert_eq!(hex(&ops, "c"), hex(&ready, "c"), "the moved region at its new address: {ops}");
    assert_eq!(hex(&ops, "d1"), hex(&ready, "d1"), "the part of the unmapped region left: {ops}");
    assert_eq!(hex(&ops, "ehead"), hex(&ops, "file"), "read(2) into the lazy buffer: {ops}");
    assert_eq!(hex(&ops, "etail"), hex(&ready, "etail"), "the rest of that buffer: {ops}");
    assert_eq!(hex(&ops, "fork"), hex(&ready, "a"), "the fork child's checksum of the big region: {ops}");
    let report = wait_report(&mut s);
    for event in ["remove", "unmap", "remap"] {
        assert!(field_num::<u64>(&report, event) >= 1, "the page server saw the {event} event: {report}");
    }
    assert!(field_num::<u64>(&report, "faults") > 0, "pages came in on demand: {report}");
    s.send_line("sum");
    let sum = s.wait_line("sum ", LINE);
    assert_eq!((field_num::<u32>(&sum, "n"), hex(&sum, "a")), (3, hex(&ready, "a")));
    s.kill();
}

/// Four threads checksum their quarter of a region at once, each faulting on missing pages.
#[test]
fn threads_fault_on_missing_pages_concurrently() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let data = data_file(dir);
    let (ready, image) = checkpointed(dir, 64, &data);

    let mut s = resume_lazy(&image, 2000);
    s.send_line("threads");
    let t = s.wait_line("threads ", STARTUP);
    for q in ["q0", "q1", "q2", "q3"] {
        assert_eq!(hex(&t, q), hex(&ready, q), "quarter {q} computed by its thread: {t}");
    }
    let report = wait_report(&mut s);
    assert!(field_num::<u64>(&report, "faults") > 0, "{report}");
    s.kill();
}

/// A checkpoint asked for right after a lazy resume waits until every page is in: the next
/// image holds all of them (an image taken with pages missing would have lost them).
#[test]
fn a_checkpoint_right_after_a_lazy_resume_loses_no_page() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let data = data_file(dir);
    let (ready, image) = checkpointed(dir, 64, &data);

    let mut s = resume_lazy(&image, 1500);
    s.send_line("threads");
    s.wait_line("threads ", STARTUP);
    std::fs::remove_file(&image).unwrap();
    let second = checkpoint(s.pid(), true, dir);
    s.wait_exit(CKPT);

    let mut r = resume(&second);
    r.send_line("sum");
    let sum = r.wait_line("sum ", STARTUP);
    assert_eq!(field_num::<u32>(&sum, "n"), 3, "{sum}");
    assert_eq!(hex(&sum, "a"), hex(&ready, "a"), "every page of the lazily resumed program is in the next image");
    r.send_line("ops");
    let ops = r.wait_line("ops ", LINE);
    assert_eq!(
        (hex(&ops, "b2"), hex(&ops, "c"), hex(&ops, "etail")),
        (hex(&ready, "b2"), hex(&ready, "c"), hex(&ready, "etail"))
    );
    r.kill();
}

/// Runs `cmd` as user nobody (no supplementary groups).
fn as_nobody(cmd: &mut Command) {
    // SAFETY: setgroups/setgid/setuid between fork and exec are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(NOBODY) != 0 || libc::setuid(NOBODY) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sets vm.unprivileged_userfaultfd to 0 for the test's life (restored when dropped).
struct NoUnprivilegedUffd(Option<String>);

impl NoUnprivilegedUffd {
    const PATH: &'static str = "/proc/sys/vm/unprivileged_userfaultfd";
    fn new() -> Option<Self> {
        let old = std::fs::read_to_string(Self::PATH).ok()?;
        if old.trim() == "0" {
            return Some(NoUnprivilegedUffd(None));
        }
        std::fs::write(Self::PATH, "0").ok()?;
        Some(NoUnprivilegedUffd(Some(old)))
    }
}

impl Drop for NoUnprivilegedUffd {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write(Self::PATH, old.trim());
        }
    }
}

/// Where userfaultfd is not permitted (an ordinary user, vm.unprivileged_userfaultfd=0, no
/// access to /dev/userfaultfd), `--lazy` warns once and the resume is eager, and whole.
#[test]
fn without_userfaultfd_the_resume_is_eager_with_a_warning() {
    if !is_root() {
        eprintln!("SKIP: needs root to run the flow as another user and to set vm.unprivileged_userfaultfd");
        return;
    }
    let Some(_sysctl) = NoUnprivilegedUffd::new() else {
        eprintln!("SKIP: cannot set vm.unprivileged_userfaultfd here");
        return;
    };
    let tmp = temp_dir();
    let dir = tmp.path();
    std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let data = data_file(dir);
    // The binaries must be reachable by nobody: copies in the test's directory otherwise.
    let reachable = |p: &Path| {
        let mut probe = Command::new("/bin/sh");
        probe.args(["-c", r#"test -x "$1""#, "sh"]).arg(p);
        as_nobody(&mut probe);
        probe.status().is_ok_and(|s| s.success())
    };
    let tool = |name: &str| {
        let b = bin(name);
        if reachable(&b) {
            return b;
        }
        let to = dir.join(name);
        std::fs::copy(&b, &to).unwrap();
        to
    };
    let (run, ckpt, res) = (tool("migrate-run"), tool("migrate-checkpoint"), tool("migrate-resume"));
    let lib = target_dir().join("libmigrate.so");
    let lib = if reachable(&lib) {
        None
    } else {
        let to = dir.join("libmigrate.so");
        std::fs::copy(&lib, &to).unwrap();
        Some(to)
    };
    let program = dir.join("lazymem");
    std::fs::copy(cbin("lazymem"), &program).unwrap();
    let command = |tool: &Path| {
        let mut cmd = Command::new(tool);
        cmd.current_dir(dir).env("XDG_RUNTIME_DIR", dir);
        if let Some(lib) = &lib {
            cmd.env("MIGRATE_LIB", lib);
        }
        as_nobody(&mut cmd);
        cmd
    };

    let mut cmd = command(&run);
    cmd.arg("--ckpt-dir").arg(dir).arg("--").arg(&program).arg("16").arg(&data);
    let mut p = Managed::spawn("lazymem", cmd);
    let ready = p.wait_line("ready ", STARTUP);
    let mut cmd = command(&ckpt);
    cmd.arg("--kill").arg("--dir").arg(dir).arg(p.pid().to_string());
    let out = run_tool("migrate-checkpoint", cmd, CKPT);
    assert!(out.status.success(), "{}", out.describe());
    let image = PathBuf::from(out.stdout.lines().last().unwrap_or_default().trim());
    p.wait_exit(LINE);

    let mut cmd = command(&res);
    cmd.arg("--lazy").arg(&image).env("MIGRATE_LAZY_STATS", "1");
    let mut s = Managed::spawn("migrate-resume --lazy (nobody)", cmd);
    s.send_line("sum");
    let sum = s.wait_line("sum ", STARTUP);
    assert_eq!((field_num::<u32>(&sum, "n"), hex(&sum, "a")), (1, hex(&ready, "a")), "resumed eagerly and whole");
    let warning = s.wait_stderr_line(|l: &str| l.contains("lazy restore is not available"), LINE);
    assert!(warning.contains("userfaultfd") && warning.contains("eagerly"), "{warning}");
    s.kill();
    let stderr = s.stderr_so_far();
    assert_eq!(
        stderr.iter().filter(|l| l.contains("lazy restore")).count(),
        1,
        "one warning, no page server: {stderr:?}"
    );
}

/// A damaged page of a lazily restored region is found when the page server brings it in
/// (migrate-resume --lazy verifies everything but the pages up front): the program ends with
/// exit status 5 and a line naming the page's address, the image and the fix.
#[test]
fn a_damaged_page_ends_the_program_with_its_address() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let data = data_file(dir);
    let (_ready, image) = checkpointed(dir, 16, &data);
    // The middle page of the largest page section (the 16 MiB region).
    let (offset, length) = {
        let reader = migrate_image::ImageReader::open(&image).unwrap();
        let s = reader
            .sections()
            .iter()
            .filter(|s| matches!(s.kind, migrate_image::SectionKind::Pages { .. }))
            .max_by_key(|s| s.length)
            .copied()
            .expect("a page section");
        (s.offset, s.length)
    };
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&image).unwrap();
        let at = offset + (length / 2 / 4096) * 4096 + 100;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        b[0] ^= 0x5a;
        f.write_all_at(&b, at).unwrap();
    }
    let mut s = resume_lazy(&image, 0);
    s.send_line("sum");
    let status = s.wait_exit(CKPT);
    let stderr = s.stderr_so_far().join("\n");
    assert_eq!(status.code(), Some(5), "exit status 5: {stderr}");
    assert!(stderr.contains("does not match its hash"), "{stderr}");
    assert!(stderr.contains(&image.display().to_string()), "names the image: {stderr}");
    assert!(stderr.contains(" at 0x"), "names the address: {stderr}");
    assert!(!s.lines_so_far().iter().any(|l| l.starts_with("sum ")), "the program did not go on with a bad page");
}

/// An incremental image resumed lazily: the pages that did not change since its parent come
/// from the parent image, through the page server too.
#[test]
fn an_incremental_image_resumes_lazily_with_its_parents_pages() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let data = data_file(dir);
    let mut p = migrate_run(dir, &cbin("lazymem"), ["32".to_string(), data.display().to_string()]);
    let ready = p.wait_line("ready ", STARTUP);
    let parent = checkpoint(p.pid(), false, dir);
    p.send_line("ops");
    let ops = p.wait_line("ops ", LINE);
    let mut cmd = std::process::Command::new(bin("migrate-checkpoint"));
    cmd.arg("--incremental").arg("--kill").arg("--dir").arg(dir).arg(p.pid().to_string());
    let out = run_tool("migrate-checkpoint --incremental", cmd, CKPT);
    assert!(out.status.success(), "{}", out.describe());
    let child = PathBuf::from(out.stdout.lines().last().unwrap_or_default().trim());
    assert_ne!(child, parent);
    let size = |f: &Path| std::fs::metadata(f).unwrap().len();
    assert!(size(&child) * 2 < size(&parent), "the child image holds only what changed");
    p.wait_exit(LINE);

    let mut s = resume_lazy(&child, 0);
    s.send_line("sum");
    let sum = s.wait_line("sum ", STARTUP);
    assert_eq!((field_num::<u32>(&sum, "n"), hex(&sum, "a")), (2, hex(&ready, "a")), "{sum}");
    let report = wait_report(&mut s);
    assert!(field_num::<u64>(&report, "pages") >= 32 * 256, "{report}");
    assert_eq!(field_num::<u32>(&ops, "zero"), 1);
    s.kill();
}
