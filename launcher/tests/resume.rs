//! migrate-resume's target checks and its exec, with images built for this very host (libc
//! stands in for libmigrate, so nothing is actually restored).

mod common;

use common::*;
use migrate_image::{FdEntry, FdKind, ImageMeta};
use std::fs;
use std::path::{Path, PathBuf};

fn sh_meta(script: &str) -> ImageMeta {
    let sh = fs::canonicalize("/bin/sh").unwrap();
    sample_meta(&sh, &["sh", "-c", script])
}

fn resume(dir: &Path, meta: &ImageMeta, extra: &[&str]) -> (Run, PathBuf) {
    let img = dir.join(format!("r{}.img", fs::read_dir(dir).unwrap().count()));
    write_image(&img, meta);
    let mut c = bin("resume");
    c.args(extra).arg(&img);
    (run(c), img)
}

#[test]
fn execs_the_saved_program_with_the_restore_environment() {
    let dir = tempfile::tempdir().unwrap();
    let meta = sh_meta("echo \"$0|$MIGRATE_RESTORE|$LD_PRELOAD|$GLIBC_TUNABLES|${MIGRATE_FORCE-unset}\"; exit 9");
    let (r, img) = resume(dir.path(), &meta, &[]);
    assert_eq!(r.code, 9, "the program's exit status passes through; stderr: {}", r.stderr);
    let want = format!(
        "sh|{}|{}|glibc.pthread.rseq=0|unset\n",
        fs::canonicalize(&img).unwrap().display(),
        libc_path().display()
    );
    assert_eq!(r.stdout, want);
    assert!(r.stderr.is_empty(), "{}", r.stderr);

    let (r, _) = resume(dir.path(), &meta, &["--force"]);
    assert_eq!(r.code, 9);
    assert!(r.stdout.trim_end().ends_with("|1"), "{}", r.stdout);
}

#[test]
fn refuses_a_cpu_without_the_saved_features() {
    let dir = tempfile::tempdir().unwrap();
    let mut meta = sh_meta("exit 0");
    meta.host.cpu.xfeatures |= 1 << 62;
    let (r, _) = resume(dir.path(), &meta, &["--force"]);
    r.expect_error("resume", 4, "this CPU lacks register-state features the image needs");
}

#[test]
fn refuses_another_vdso() {
    let dir = tempfile::tempdir().unwrap();
    let mut meta = sh_meta("exit 0");
    meta.host.vdso_hash ^= 1;
    meta.host.kernel_release = "1.2.3-other".into();
    let (r, _) = resume(dir.path(), &meta, &[]);
    r.expect_error("resume", 4, "the kernel's vdso differs from the checkpointed one (kernel 1.2.3-other vs");
}

#[test]
fn refuses_missing_or_changed_binaries_even_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let mut meta = sh_meta("exit 0");
    meta.process.files[0].path = "/nonexistent/bin/prog".into();
    let (r, _) = resume(dir.path(), &meta, &[]);
    r.expect_error("resume", 4, "binary /nonexistent/bin/prog is missing on this host; copy it here");

    let mut meta = sh_meta("exit 0");
    meta.process.files[0].size += 1;
    let (r, _) = resume(dir.path(), &meta, &["--force"]);
    r.expect_error("resume", 4, "changed since the checkpoint (size");
    assert!(r.stderr.contains("--force cannot help"), "{}", r.stderr);

    let mut meta = sh_meta("exit 0");
    meta.process.files[1].hash = Some(12345);
    let (r, _) = resume(dir.path(), &meta, &["--force"]);
    r.expect_error("resume", 4, "libmigrate");
    assert!(r.stderr.contains("contents differ"), "{}", r.stderr);

    let mut meta = sh_meta("exit 0");
    meta.process.ld_preload = "/nonexistent/libmigrate.so".into();
    let (r, _) = resume(dir.path(), &meta, &[]);
    r.expect_error("resume", 4, "libmigrate /nonexistent/libmigrate.so cannot be used");

    let mut meta = sh_meta("exit 0");
    meta.process.ld_preload = String::new();
    let (r, _) = resume(dir.path(), &meta, &[]);
    r.expect_error("resume", 3, "records no LD_PRELOAD");
}

#[test]
fn changed_open_files_need_force() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.txt");
    fs::write(&data, "original\n").unwrap();
    let mut meta = sh_meta("echo ran");
    meta.process.files.push(identity(&data, false));
    meta.process.fds.push(FdEntry {
        fd: 3,
        cloexec: false,
        shares_with: None,
        kind: FdKind::Regular { file: 2, flags: 0, pos: 4 },
    });
    let (r, _) = resume(dir.path(), &meta, &[]);
    assert_eq!(r.code, 0, "an unchanged file is fine: {}", r.stderr);

    fs::write(&data, "changed, and longer\n").unwrap();
    let (r, _) = resume(dir.path(), &meta, &[]);
    r.expect_error("resume", 4, &format!("file {} changed since the checkpoint (size 9→20", data.display()));
    assert!(r.stderr.contains("pass --force"), "{}", r.stderr);

    let (r, _) = resume(dir.path(), &meta, &["--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "ran\n");
    assert!(r.stderr.starts_with("migrate-resume: warning: file"), "{}", r.stderr);

    fs::remove_file(&data).unwrap();
    let (r, _) = resume(dir.path(), &meta, &["--force"]);
    r.expect_error("resume", 4, "is missing on this host");
}

#[test]
fn unsupported_descriptors_need_force() {
    let dir = tempfile::tempdir().unwrap();
    let mut meta = sh_meta("echo ran");
    meta.process.fds.push(FdEntry {
        fd: 7,
        cloexec: false,
        shares_with: None,
        kind: FdKind::Unsupported { what: "io_uring".into() },
    });
    let (r, _) = resume(dir.path(), &meta, &[]);
    r.expect_error("resume", 4, "fd 7 (io_uring) cannot be restored");
    let (r, _) = resume(dir.path(), &meta, &["--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("warning: fd 7 (io_uring)"), "{}", r.stderr);
}

#[test]
fn json_reports_target_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut meta = sh_meta("exit 0");
    meta.process.files[0].path = "/nonexistent/bin/prog".into();
    let (r, _) = resume(dir.path(), &meta, &["--json"]);
    assert_eq!(r.code, 4);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["code"], 4);
    assert!(v["error"].as_str().unwrap().contains("is missing"));
}

#[test]
fn refuses_a_hard_limit_it_cannot_raise() {
    // Above fs.nr_open even CAP_SYS_RESOURCE cannot raise RLIMIT_NOFILE.
    let nr_open: u64 = fs::read_to_string("/proc/sys/fs/nr_open").unwrap().trim().parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut meta = sh_meta("exit 0");
    meta.process.rlimits.push(migrate_image::RlimitEntry {
        resource: libc::RLIMIT_NOFILE,
        cur: 1024,
        max: nr_open + 1,
    });
    let (r, _) = resume(dir.path(), &meta, &[]);
    r.expect_error("resume", 4, &format!("cannot raise RLIMIT_NOFILE to {}", nr_open + 1));
}

#[test]
fn restores_rlimits_before_the_exec() {
    let dir = tempfile::tempdir().unwrap();
    let mut meta = sh_meta("ulimit -n; ulimit -Hn");
    meta.process.rlimits.push(migrate_image::RlimitEntry { resource: libc::RLIMIT_NOFILE, cur: 77, max: 99 });
    let (r, _) = resume(dir.path(), &meta, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "77\n99\n");
}
