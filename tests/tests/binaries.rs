//! `migrate-checkpoint --with-binaries`: an image that carries the program and its libraries
//! resumes where they are missing — the stand-in for a host without the same files — and the
//! library's own state (its .bss) continues with the program's.

use migrate_tests::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LIB_C: &str = r#"
static long calls;
long tick_next(long n) { calls++; return n + 1; }
long tick_calls(void) { return calls; }
"#;

const PROG_C: &str = r#"
#include <stdio.h>
#include <unistd.h>
long tick_next(long);
long tick_calls(void);
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready pid=%d\n", (int)getpid());
    long n = 0;
    for (;;) {
        n = tick_next(n);
        printf("tick %ld calls=%ld\n", n, tick_calls());
        usleep(50000);
    }
}
"#;

/// Builds `prog` linked against `lib/libtick.so` (found through its rpath) in `dir`.
fn build(dir: &Path) -> (PathBuf, PathBuf) {
    let lib_dir = dir.join("lib");
    fs::create_dir(&lib_dir).unwrap();
    fs::write(dir.join("libtick.c"), LIB_C).unwrap();
    fs::write(dir.join("prog.c"), PROG_C).unwrap();
    let lib = lib_dir.join("libtick.so");
    let prog = dir.join("prog");
    let cc = std::env::var("MIGRATE_CC").unwrap_or_else(|_| "gcc".into());
    let ok = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&lib)
        .arg(dir.join("libtick.c"))
        .status()
        .expect("run the C compiler")
        .success();
    assert!(ok, "building libtick.so failed");
    let ok = Command::new(&cc)
        .args(["-O1", "-o"])
        .arg(&prog)
        .arg(dir.join("prog.c"))
        .arg(format!("-L{}", lib_dir.display()))
        .arg("-ltick")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .status()
        .expect("run the C compiler")
        .success();
    assert!(ok, "building prog failed");
    (prog, lib)
}

/// Runs prog until tick 3, checkpoints it with --kill (and `extra`), returns the image and the
/// original's last tick.
fn image_of(dir: &Path, prog: &Path, extra: &[&str]) -> (PathBuf, u64) {
    let mut p = migrate_run(dir, prog, Vec::<String>::new());
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    p.wait_line("tick 3 ", LINE);
    let mut cmd = Command::new(bin("migrate-checkpoint"));
    cmd.arg("--kill").args(extra).arg("--dir").arg(dir).arg(pid.to_string());
    let out = run_tool("migrate-checkpoint", cmd, CKPT);
    assert!(out.status.success(), "checkpoint failed: {}", out.describe());
    let image = PathBuf::from(out.stdout.lines().last().expect("an image path").trim());
    let mut lines = p.lines_so_far();
    lines.extend(p.read_to_eof(LINE));
    p.wait_exit(Duration::from_secs(5));
    (image, last_tick(&lines))
}

/// The extracted copies go to $XDG_RUNTIME_DIR/migrate: keep them inside the test's temp dir.
fn resume_here(dir: &Path, image: &Path) -> Command {
    let mut cmd = resume_cmd(&[], image);
    cmd.env("XDG_RUNTIME_DIR", dir);
    cmd
}

#[test]
fn with_binaries_resumes_without_the_program_and_its_library() {
    let tmp = temp_dir();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    let (prog, lib) = build(&dir);
    let (image, last) = image_of(&dir, &prog, &["--with-binaries"]);
    fs::remove_file(&prog).unwrap();
    fs::remove_file(&lib).unwrap();

    let mut r = Managed::spawn("migrate-resume", resume_here(&dir, &image));
    let first = r.wait_line("tick ", STARTUP);
    assert_eq!(tick_number(&first), last + 1, "the resumed program must continue at the next tick: {first}");
    let calls: u64 = field_num(&first, "calls");
    assert_eq!(calls, last + 1, "the library's own state (its call counter) must continue too: {first}");
    let next = r.wait_line("tick ", LINE);
    assert_eq!(tick_number(&next), last + 2);
    let stderr = r.stderr_so_far().join("\n");
    assert!(
        stderr.contains("using the copy stored in the image"),
        "resume should say it used the image's copies: {stderr}"
    );
    r.kill();
}

#[test]
fn without_binaries_a_missing_library_is_refused() {
    let tmp = temp_dir();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    let (prog, lib) = build(&dir);
    let (image, _) = image_of(&dir, &prog, &[]);
    fs::remove_file(&lib).unwrap();
    let out = run_tool("migrate-resume", resume_here(&dir, &image), STARTUP);
    out.assert_fails("migrate-resume with a missing library", 4, &["libtick.so", "missing", "--with-binaries"]);
}
