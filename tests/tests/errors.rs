//! Failure cases: every one must end with the documented exit code and a message that says
//! what is wrong, and must never harm the program (a failed checkpoint leaves it running).
//!
//! Exit codes: 2 usage, 3 image invalid, 4 target mismatch, 5 not managed / restore failed,
//! 6 checkpoint failed.

use migrate_tests::*;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A temp dir whose path is canonical, so paths printed by the tools (which see
/// /proc/self/exe, /proc/self/fd) compare equal to ours.
fn canonical_temp_dir() -> (TempDir, PathBuf) {
    let dir = temp_dir();
    let path = fs::canonicalize(dir.path()).expect("canonicalize temp dir");
    (dir, path)
}

fn counter_args(mib: u32, tick_ms: u32, log: &Path) -> Vec<OsString> {
    vec![mib.to_string().into(), tick_ms.to_string().into(), log.as_os_str().to_owned()]
}

/// Runs `program` (a counter) under migrate-run until tick 2, checkpoints it with --kill into
/// `dir`, and returns the image and the last tick line the original printed.
fn counter_image(dir: &Path, program: &Path, log: &Path) -> (PathBuf, String) {
    let mut p = migrate_run(dir, program, counter_args(4, 50, log));
    let ready = p.wait_line("ready ", STARTUP);
    let pid: i32 = field_num(&ready, "pid");
    p.wait_line("tick ", LINE);
    let mut last = p.wait_line("tick ", LINE);
    let image = checkpoint(pid, true, dir);
    if let Some(l) = p.read_to_eof(LINE).into_iter().rfind(|l| is_tick(l)) {
        last = l;
    }
    p.wait_exit(Duration::from_secs(5));
    (image, last)
}

/// Expects both migrate-resume and migrate-inspect to refuse `image` with exit 3.
fn assert_bad_image(image: &Path, needle: &str) {
    let what = format!("migrate-resume on {}", image.display());
    resume_output(&[], image).assert_fails(&what, 3, &[needle]);
    let what = format!("migrate-inspect on {}", image.display());
    inspect_output(&[], image).assert_fails(&what, 3, &[needle]);
    let what = format!("migrate-inspect --json on {}", image.display());
    inspect_output(&["--json"], image).assert_fails(&what, 3, &[needle]);
}

#[test]
fn static_binary_is_refused() {
    let dir = temp_dir();
    let out = run_tool("migrate-run", migrate_run_cmd(dir.path(), &cbin("hello_static"), Vec::<&OsStr>::new()), QUICK);
    out.assert_fails("migrate-run on a statically linked program", 4, &["statically linked"]);
    assert!(!out.stdout.contains("hello from a static binary"), "the static program must not run: {}", out.describe());
}

#[test]
fn not_an_image_is_refused() {
    let dir = temp_dir();
    let text = dir.path().join("notes.mig");
    fs::write(&text, "these are not the bytes you are looking for\n".repeat(200)).unwrap();
    assert_bad_image(&text, "not a migrate image");
    let empty = dir.path().join("empty.mig");
    fs::write(&empty, b"").unwrap();
    assert_bad_image(&empty, "not a migrate image");
}

/// A real image of a counter, for the damaged-image tests.
fn real_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let (image, _) = counter_image(dir, &cbin("counter"), &dir.join("counter.log"));
    let bytes = fs::read(&image).unwrap();
    let ok = inspect_output(&[], &image);
    assert!(ok.status.success(), "migrate-inspect on an intact image should succeed: {}", ok.describe());
    (image, bytes)
}

#[test]
fn truncated_image_is_refused() {
    let dir = temp_dir();
    let (_, bytes) = real_image(dir.path());
    let half = dir.path().join("half.mig");
    fs::write(&half, &bytes[..bytes.len() / 2]).unwrap();
    assert_bad_image(&half, "truncated");
    let header_only = dir.path().join("header-cut.mig");
    fs::write(&header_only, &bytes[..20]).unwrap();
    assert_bad_image(&header_only, "truncated");
}

#[test]
fn corrupted_image_is_refused() {
    let dir = temp_dir();
    let (image, mut bytes) = real_image(dir.path());
    // Flip a byte in the middle of the largest section (memory pages), which only a checksum
    // can notice.
    let reader = migrate_image::ImageReader::open(&image).expect("the real image opens");
    let s = *reader.sections().iter().max_by_key(|s| s.length).expect("the image has sections");
    let at = (s.offset + s.length / 2) as usize;
    bytes[at] ^= 0xff;
    let bad = dir.path().join("flipped.mig");
    fs::write(&bad, &bytes).unwrap();
    assert_bad_image(&bad, "corrupted");
}

#[test]
fn newer_image_version_is_refused() {
    let dir = temp_dir();
    let (_, mut bytes) = real_image(dir.path());
    let newer = migrate_image::FORMAT_VERSION + 1;
    bytes[8..12].copy_from_slice(&newer.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&bytes[0..16]);
    bytes[16..24].copy_from_slice(&sum.to_le_bytes());
    let bad = dir.path().join("newer.mig");
    fs::write(&bad, &bytes).unwrap();
    assert_bad_image(&bad, "newer");
}

/// Runs a private copy of counter from the temp dir, checkpoints it, returns (image, copy).
fn image_of_copied_counter(dir: &Path) -> (PathBuf, PathBuf) {
    let exe = dir.join("counter-copy");
    fs::copy(cbin("counter"), &exe).unwrap();
    let (image, _) = counter_image(dir, &exe, &dir.join("counter.log"));
    (image, exe)
}

#[test]
fn resume_refuses_changed_binary() {
    let (_t, dir) = canonical_temp_dir();
    let (image, exe) = image_of_copied_counter(&dir);
    fs::OpenOptions::new().append(true).open(&exe).unwrap().write_all(b"\0").unwrap();
    let exe_s = exe.to_string_lossy();
    resume_output(&[], &image).assert_fails("resume with a changed binary", 4, &[&exe_s, "changed"]);
}

#[test]
fn resume_refuses_missing_binary() {
    let (_t, dir) = canonical_temp_dir();
    let (image, exe) = image_of_copied_counter(&dir);
    fs::remove_file(&exe).unwrap();
    let exe_s = exe.to_string_lossy();
    resume_output(&[], &image).assert_fails("resume with a deleted binary", 4, &[&exe_s, "missing"]);
}

#[test]
fn resume_refuses_changed_open_file_unless_forced() {
    let (_t, dir) = canonical_temp_dir();
    let log = dir.join("counter.log");
    let (image, last) = counter_image(&dir, &cbin("counter"), &log);
    fs::OpenOptions::new().append(true).open(&log).unwrap().write_all(b"someone else wrote here\n").unwrap();
    let log_s = log.to_string_lossy();
    resume_output(&[], &image).assert_fails("resume over a changed open file", 4, &[&log_s, "changed"]);

    let mut r = resume_with(&["--force"], &image);
    let line = r.wait_line("tick ", STARTUP);
    assert_eq!(tick_number(&line), tick_number(&last) + 1, "--force resumes anyway: {line}");
    assert_eq!(field(&line, "pid"), field(&last, "pid"), "{line}");
    assert_eq!(field(&line, "heap"), field(&last, "heap"), "{line}");
}

#[test]
fn checkpoint_of_unmanaged_process_fails() {
    let dir = temp_dir();
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    let mut sleeper = Managed::spawn("sleep", cmd);
    for kill in [false, true] {
        let out = checkpoint_output(sleeper.pid(), kill, dir.path());
        out.assert_fails(&format!("migrate-checkpoint (kill={kill}) of a process not run by migrate-run"), 5, &[]);
        assert!(sleeper.try_exit().is_none(), "an unmanaged process must be left alone\n{}", sleeper.report());
    }
    assert!(images_in(dir.path()).is_empty());
}

#[test]
fn checkpoint_of_missing_process_fails() {
    let dir = temp_dir();
    let mut gone = Managed::spawn("true", Command::new("true"));
    let pid = gone.pid();
    gone.wait_exit(QUICK);
    let out = checkpoint_output(pid, false, dir.path());
    out.assert_fails("migrate-checkpoint of a process that does not exist", 5, &[]);
}

/// A failed checkpoint (exit 6) must leave the program running with its state intact and
/// leave no image under its final name.
fn checkpoint_fails_and_program_continues(ckpt_target: &Path, kill: bool, what: &str) {
    let dir = temp_dir();
    let log = dir.path().join("counter.log");
    let mut p = migrate_run(dir.path(), &cbin("counter"), counter_args(64, 50, &log));
    let ready = p.wait_line("ready ", STARTUP);
    let pid: i32 = field_num(&ready, "pid");
    let before = CounterTick::parse(&p.wait_line("tick ", LINE));

    let out = checkpoint_output(pid, kill, ckpt_target);
    out.assert_fails(what, 6, &[]);
    assert!(p.try_exit().is_none(), "{what}: the program must keep running\n{}", p.report());
    // Ticks go on, consecutive and with the same state, at least one printed after the failure.
    let seen = last_tick(&p.lines_so_far());
    let mut prev = before;
    loop {
        let line = p.wait_line("tick ", LINE);
        let t = CounterTick::parse(&line);
        assert_eq!(t.n, prev.n + 1, "{what}: ticks must continue: {line}");
        assert_eq!((t.pid, t.heap, t.list), (prev.pid, prev.heap, prev.list), "{what}: {line}");
        t.check_model(&line);
        prev = t;
        if prev.n > seen {
            break;
        }
    }
    let left: Vec<PathBuf> = images_in(ckpt_target);
    assert!(left.is_empty(), "{what}: no image may appear under its final name: {left:?}");
}

#[test]
fn checkpoint_into_full_dir_fails_and_program_continues() {
    if !is_root() {
        println!("SKIP: checkpoint_into_full_dir_fails_and_program_continues needs root to mount a 1 MiB tmpfs");
        return;
    }
    let dir = temp_dir();
    let full = dir.path().join("full");
    let mount = match TmpfsMount::new(&full, "size=1m") {
        Ok(m) => m,
        Err(e) => {
            println!("SKIP: checkpoint_into_full_dir_fails_and_program_continues: {e}");
            return;
        }
    };
    // With --kill: a checkpoint that fails must not kill the program either.
    checkpoint_fails_and_program_continues(mount.path(), true, "checkpoint of 64 MiB into a 1 MiB tmpfs");
}

#[test]
fn checkpoint_into_read_only_dir_fails_and_program_continues() {
    let dir = temp_dir();
    let ro = dir.path().join("ro");
    let _mount = if is_root() {
        // Root ignores directory permissions: use a read-only mount.
        match TmpfsMount::new(&ro, "size=1m,ro") {
            Ok(m) => Some(m),
            Err(e) => {
                println!("SKIP: checkpoint_into_read_only_dir_fails_and_program_continues: {e}");
                return;
            }
        }
    } else {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir(&ro).unwrap();
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
        None
    };
    checkpoint_fails_and_program_continues(&ro, false, "checkpoint into a read-only directory");
}

/// XCR0 of this CPU (the xsave features the kernel enabled), or None without xsave.
#[cfg(target_arch = "x86_64")]
fn this_cpu_xcr0() -> Option<u64> {
    use std::arch::x86_64::{__cpuid, _xgetbv};
    // CPUID.1:ECX bit 27 (OSXSAVE): xgetbv is available and enabled.
    if __cpuid(1).ecx & (1 << 27) == 0 {
        return None;
    }
    // SAFETY: OSXSAVE is set, so xgetbv(0) is supported and cannot fault.
    Some(unsafe { _xgetbv(0) })
}

#[cfg(not(target_arch = "x86_64"))]
fn this_cpu_xcr0() -> Option<u64> {
    None
}

/// An xsave feature bit this CPU does not have enabled, with the name migrate gives it:
/// AMX tile data (17) unless the CPU has AMX (/proc/cpuinfo `amx_tile` or XCR0 bit 17), else
/// APX (19), else reserved bit 62.
fn absent_xfeature() -> Option<(u32, &'static str)> {
    let xcr0 = this_cpu_xcr0()?;
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_flag = |f: &str| cpuinfo.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|w| w == f));
    let candidates: [(u32, &str, Option<&str>); 3] =
        [(17, "AMX", Some("amx_tile")), (19, "APX", Some("apx")), (62, "other", None)];
    candidates
        .into_iter()
        .find(|&(bit, _, flag)| xcr0 & (1 << bit) == 0 && !flag.is_some_and(&has_flag))
        .map(|(bit, name, _)| (bit, name))
}

/// Rewrites a real counter image through the image crate: an unmodified copy resumes and
/// continues; a copy claiming a CPU feature this CPU lacks, or another vdso, is refused with
/// exit 4 before anything runs.
#[test]
fn resume_refuses_other_cpu_features_and_vdso() {
    let dir = temp_dir();
    let log = dir.path().join("counter.log");
    let (image, last) = counter_image(dir.path(), &cbin("counter"), &log);

    let same = dir.path().join("rewritten.mig");
    rewrite_image(&image, &same, |_| {});
    let original = migrate_image::ImageReader::open(&image).unwrap().meta().unwrap();
    let copy = migrate_image::ImageReader::open(&same).unwrap().meta().unwrap();
    assert!(original == copy, "rewrite_image without an edit must keep the metadata");

    match absent_xfeature() {
        Some((bit, name)) => {
            let cpu = dir.path().join("cpu.mig");
            rewrite_image(&image, &cpu, |m| m.host.cpu.xfeatures |= 1u64 << bit);
            let what = format!("resume of an image whose CPU had xfeature bit {bit} ({name})");
            let needles: &[&str] = if name == "other" { &["cpu", "features"] } else { &["cpu", "features", name] };
            resume_output(&[], &cpu).assert_fails(&what, 4, needles);
        }
        None => println!("SKIP (cpu part): cannot read XCR0 on this machine or every candidate bit is present"),
    }

    let vdso = dir.path().join("vdso.mig");
    rewrite_image(&image, &vdso, |m| m.host.vdso_hash ^= 1);
    resume_output(&[], &vdso).assert_fails("resume of an image with another vdso", 4, &["vdso"]);
    // --force is for changed files; it cannot make another kernel's vdso fit.
    resume_output(&["--force"], &vdso).assert_fails("resume --force of an image with another vdso", 4, &["vdso"]);

    // Last, because the resumed program writes to the log the image checks.
    let mut r = resume(&same);
    let line = r.wait_line("tick ", STARTUP);
    assert_eq!(
        tick_number(&line),
        tick_number(&last) + 1,
        "the rewritten copy resumes where the original stopped: {line}"
    );
    assert_eq!(field(&line, "pid"), field(&last, "pid"), "{line}");
    assert_eq!(field(&line, "heap"), field(&last, "heap"), "the rewritten copy's memory must be intact: {line}");
    assert_eq!(field(&line, "list"), field(&last, "list"), "{line}");
    let t = CounterTick::parse(&line);
    t.check_model(&line);
    let next = r.wait_line("tick ", LINE);
    assert_eq!(tick_number(&next), t.n + 1, "{next}");
}

#[test]
fn images_are_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir();
    let log = dir.path().join("counter.log");
    let (image, _) = counter_image(dir.path(), &cbin("counter"), &log);
    let mode = fs::metadata(&image).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "an image holds process memory: {} is {mode:o}", image.display());
}

/// Runs `cmd` as user and group 65534 (nobody), without supplementary groups.
fn as_nobody(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setgroups/setgid/setuid between fork and exec are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn another_user_cannot_checkpoint_a_process() {
    if !is_root() {
        println!("SKIP: another_user_cannot_checkpoint_a_process needs root to act as another user");
        return;
    }
    let dir = temp_dir();
    let log = dir.path().join("counter.log");
    let mut p = migrate_run(dir.path(), &cbin("counter"), counter_args(1, 50, &log));
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    // The tool, as user nobody.
    let mut cmd = Command::new(bin("migrate-checkpoint"));
    cmd.arg("--dir").arg(dir.path()).arg(pid.to_string());
    as_nobody(&mut cmd);
    let out = run_tool("migrate-checkpoint", cmd, STARTUP);
    out.assert_fails("a checkpoint by another user", 5, &["permission denied"]);
    // The control socket itself refuses too (the tool's own check aside): it answers a
    // stranger's connection with the refusal before reading anything.
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(20)\n\
         s.connect('\\0migrate/ctl/{pid}')\nprint(s.recv(200).decode())"
    );
    let mut direct = Command::new("python3");
    direct.args(["-c", &script]);
    as_nobody(&mut direct);
    let answer = run_tool("python3", direct, STARTUP);
    assert!(answer.stdout.contains("permission denied"), "the control socket refuses: {}", answer.describe());
    assert!(p.try_exit().is_none(), "the program goes on");
    assert!(images_in(dir.path()).is_empty(), "no image was written");
    p.kill();
}

/// The restore inside the new process checks that process's pages against their checksums
/// before anything of it is restored: an image whose pages changed after migrate-resume
/// verified it is refused, naming the section, and the program never runs. The change is made
/// between the check and the restore by starting the program the way migrate-resume execs it
/// (libmigrate preloaded, MIGRATE_RESTORE naming the image) on an altered copy.
#[test]
fn restore_refuses_pages_changed_after_migrate_resume_checked_them() {
    let dir = temp_dir();
    let (image, mut bytes) = real_image(dir.path());
    let reader = migrate_image::ImageReader::open(&image).expect("the real image opens");
    let meta = reader.meta().expect("the real image has metadata");
    let (index, s) = reader
        .sections()
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s.kind, migrate_image::SectionKind::Pages { proc: 0, .. }))
        .max_by_key(|(_, s)| s.length)
        .expect("the image stores pages");
    // migrate-resume verified this file as it was (and tells the restore so: its identity);
    // then one page byte changes in place.
    let changed = dir.path().join("changed.mig");
    fs::write(&changed, &bytes).unwrap();
    let verified = {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(&changed).unwrap();
        migrate_image::verified_identity(
            m.dev(),
            m.ino(),
            m.size(),
            (m.mtime(), m.mtime_nsec()),
            (m.ctime(), m.ctime_nsec()),
        )
    };
    let at = s.offset + s.length / 2;
    bytes[at as usize] ^= 0x01;
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&changed).unwrap();
        f.write_all_at(&bytes[at as usize..at as usize + 1], at).unwrap();
    }
    let p = &meta.process;
    let mut cmd = Command::new(&p.files[p.exe as usize].path);
    if let Some((argv0, rest)) = p.argv.split_first() {
        std::os::unix::process::CommandExt::arg0(&mut cmd, argv0).args(rest);
    }
    cmd.env("LD_PRELOAD", &p.ld_preload)
        .env("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
        .env("MIGRATE_RESTORE", &changed)
        .env("MIGRATE_VERIFIED_IMAGE", &verified)
        .env("MIGRATE_PROC", "0")
        .env_remove("MIGRATE_NEW_TREE");
    let out = run_tool("restore", cmd, QUICK);
    out.assert_fails(
        "a restore from pages changed after the check",
        5,
        &["corrupted", &format!("section {index} (Pages")],
    );
    assert!(
        !out.stderr.contains("replacing the address space"),
        "refused before the switch, not during it: {}",
        out.describe()
    );
    assert!(!out.stdout.contains("tick"), "the program must not run: {}", out.describe());
}
