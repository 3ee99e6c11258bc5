//! Faults in the middle of things: a checkpoint whose directory disappears, whose requester is
//! killed, whose writes fail (file size limit, no free inodes); a resume that lacks a library,
//! memory or the right to run the program as it is. Each must end with a clear error (or, for a
//! killed requester, a complete image), leave the program running unharmed (checkpoint) or leave
//! nothing running (resume), never leave a partial image under a final name or touch the image,
//! and a retry once the cause is gone must work.
//!
//! errors.rs covers the simpler refusals (bad images, changed files, full disk, read-only
//! directory, other users); these are the faults that strike while an operation runs.

use migrate_tests::*;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

fn counter_args(mib: u32, tick_ms: u32, log: &Path) -> Vec<OsString> {
    vec![mib.to_string().into(), tick_ms.to_string().into(), log.as_os_str().to_owned()]
}

/// A temp dir whose path is canonical (the tools print canonical paths).
fn canonical_temp_dir() -> (TempDir, PathBuf) {
    let dir = temp_dir();
    let path = fs::canonicalize(dir.path()).expect("canonicalize temp dir");
    (dir, path)
}

/// Asserts that `out` failed with `code` and exactly one error line (`migrate-<verb>: error:`)
/// mentioning every needle.
#[track_caller]
fn assert_one_error(out: &ToolOutput, what: &str, code: i32, needles: &[&str]) {
    out.assert_fails(what, code, needles);
    let errors = out.stderr.lines().filter(|l| l.contains(": error: ")).count();
    assert_eq!(errors, 1, "{what}: expected exactly one error line: {}", out.describe());
}

/// Waits for the program's next ticks until one printed after this call: they must be
/// consecutive to `prev` with the same pid, heap and list, and follow the model.
#[track_caller]
fn ticks_go_on(p: &mut Managed, prev: CounterTick, what: &str) -> CounterTick {
    assert!(p.try_exit().is_none(), "{what}: the program must keep running\n{}", p.report());
    let seen = last_tick(&p.lines_so_far());
    let mut prev = prev;
    loop {
        let line = p.wait_line("tick ", LINE);
        let t = CounterTick::parse(&line);
        assert_eq!(t.n, prev.n + 1, "{what}: ticks must continue: {line}");
        assert_eq!((t.pid, t.heap, t.list), (prev.pid, prev.heap, prev.list), "{what}: the state changed: {line}");
        t.check_model(&line);
        prev = t;
        if prev.n > seen {
            return prev;
        }
    }
}

/// The image files (final or temporary) in `dir`.
fn image_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".mig") || n.ends_with(".mig.tmp"))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls (bounded) until a `.mig.tmp` appears in `dir`: the checkpoint is writing.
#[track_caller]
fn wait_for_tmp(dir: &Path, timeout: Duration) -> PathBuf {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(n) = image_files(dir).into_iter().find(|n| n.ends_with(".mig.tmp")) {
            return dir.join(n);
        }
        assert!(Instant::now() < deadline, "no .mig.tmp appeared in {} within {timeout:?}", dir.display());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Polls (bounded) until no `.mig.tmp` is left in `dir`.
#[track_caller]
fn wait_no_tmp(dir: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while image_files(dir).iter().any(|n| n.ends_with(".mig.tmp")) {
        assert!(
            Instant::now() < deadline,
            "a temporary image is still in {} after {timeout:?}: {:?}",
            dir.display(),
            image_files(dir)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Everything that identifies an image file's state: its bytes' hash, size and mtime.
fn fingerprint(path: &Path) -> (u64, u64, SystemTime) {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let md = fs::metadata(path).unwrap();
    (xxhash_rust::xxh3::xxh3_64(&bytes), md.len(), md.modified().unwrap())
}

/// Resumes `image` and checks that the counter continues at `last + 1` with the same state.
#[track_caller]
fn resumes_after(image: &Path, last: &CounterTick, what: &str) {
    let mut r = resume(image);
    let line = r.wait_line("tick ", STARTUP);
    let t = CounterTick::parse(&line);
    assert_eq!(t.n, last.n + 1, "{what}: the resumed program continues where it stopped: {line}");
    assert_eq!((t.pid, t.heap, t.list), (last.pid, last.heap, last.list), "{what}: its state is intact: {line}");
    t.check_model(&line);
    let next = CounterTick::parse(&r.wait_line("tick ", LINE));
    assert_eq!(next.n, t.n + 1, "{what}: and keeps going");
    r.kill();
}

/// Sends `sig` to `pid` (a stop or continue of a program under test).
fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a child of this test that is known to be alive.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
}

// ---------------------------------------------------------------------------------------------
// Checkpoint

/// The checkpoint directory disappears just before the checkpoint, then while the image is
/// being written (the program is stopped with SIGSTOP right after the temporary image appears,
/// so the removal surely lands mid-write): both fail with exit 6 and a line naming the
/// directory; nothing is left behind; the program goes on; a checkpoint into a directory that
/// exists works.
#[test]
fn checkpoint_directory_removed_before_or_during_the_write() {
    let (_t, dir) = canonical_temp_dir();
    let log = dir.join("counter.log");
    let mut p = migrate_run(&dir, &cbin("counter"), counter_args(128, 50, &log));
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    let mut prev = CounterTick::parse(&p.wait_line("tick ", STARTUP));

    // Just before: the directory is gone when the request arrives.
    let gone = dir.join("gone");
    fs::create_dir(&gone).unwrap();
    fs::remove_dir(&gone).unwrap();
    let out = checkpoint_output(pid, false, &gone);
    let gone_s = gone.to_string_lossy();
    assert_one_error(&out, "checkpoint into a directory removed just before", 6, &[&gone_s, "does not exist"]);
    prev = ticks_go_on(&mut p, prev, "after the checkpoint into a removed directory");

    // During: removed (with the temporary image) while the image is being written.
    let during = dir.join("during");
    fs::create_dir(&during).unwrap();
    let mut cmd = Command::new(bin("migrate-checkpoint"));
    cmd.arg("--dir").arg(&during).arg(pid.to_string());
    let mut ckpt = Managed::spawn("migrate-checkpoint", cmd);
    ckpt.close_stdin();
    wait_for_tmp(&during, CKPT);
    kill(pid, libc::SIGSTOP);
    let still_writing = image_files(&during).iter().any(|n| n.ends_with(".mig.tmp"));
    fs::remove_dir_all(&during).unwrap();
    kill(pid, libc::SIGCONT);
    assert!(still_writing, "the checkpoint of 128 MiB finished before it could be interrupted");
    let status = ckpt.wait_exit(CKPT);
    let out =
        ToolOutput { status, stdout: ckpt.lines_so_far().join("\n"), stderr: ckpt.stderr_so_far().join("\n") + "\n" };
    let during_s = during.to_string_lossy();
    assert_one_error(&out, "checkpoint whose directory was removed mid-write", 6, &[&during_s, "removed"]);
    assert!(!during.exists(), "nothing recreated the removed directory");
    prev = ticks_go_on(&mut p, prev, "after the checkpoint whose directory was removed");

    // The cause gone, a checkpoint works.
    let fine = dir.join("fine");
    fs::create_dir(&fine).unwrap();
    let image = checkpoint(pid, false, &fine);
    assert!(inspect_output(&[], &image).status.success(), "the later image verifies");
    assert_eq!(image_files(&fine).len(), 1, "{:?}", image_files(&fine));
    ticks_go_on(&mut p, prev, "after the later checkpoint");
    p.kill();
}

/// migrate-checkpoint is SIGKILLed while a 256 MiB program writes its image (the program is
/// stopped right then so that the kill surely lands mid-write). The program writes its image
/// itself, so the checkpoint completes: the image appears complete under its final name (no
/// temporary file is left, and it verifies), the program goes on unharmed, and later
/// checkpoints work — one with --kill is resumed to check the state.
#[test]
fn killed_checkpoint_requester_leaves_the_program_and_a_complete_image() {
    let (_t, dir) = canonical_temp_dir();
    let log = dir.join("counter.log");
    let mut p = migrate_run(&dir, &cbin("counter"), counter_args(256, 50, &log));
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    let mut prev = CounterTick::parse(&p.wait_line("tick ", STARTUP));

    let first = dir.join("first");
    fs::create_dir(&first).unwrap();
    let mut cmd = Command::new(bin("migrate-checkpoint"));
    cmd.arg("--dir").arg(&first).arg(pid.to_string());
    let mut ckpt = Managed::spawn("migrate-checkpoint", cmd);
    ckpt.close_stdin();
    wait_for_tmp(&first, CKPT);
    kill(pid, libc::SIGSTOP);
    let still_writing = image_files(&first).iter().any(|n| n.ends_with(".mig.tmp"));
    ckpt.signal(libc::SIGKILL);
    kill(pid, libc::SIGCONT);
    assert!(still_writing, "the checkpoint of 256 MiB finished before migrate-checkpoint could be killed");
    let status = ckpt.wait_exit(QUICK);
    assert_eq!(status.code(), None, "migrate-checkpoint died by the signal: {}", describe_status(status));

    wait_no_tmp(&first, CKPT);
    let left = images_in(&first);
    assert_eq!(left.len(), 1, "the checkpoint completes without its requester: {:?}", image_files(&first));
    let check = inspect_output(&[], &left[0]);
    assert!(check.status.success(), "the image left is complete and verifies: {}", check.describe());
    prev = ticks_go_on(&mut p, prev, "after migrate-checkpoint was killed");

    // Later checkpoints work: one more that leaves it running, then one with --kill, resumed.
    let second = dir.join("second");
    fs::create_dir(&second).unwrap();
    let image = checkpoint(pid, false, &second);
    assert!(inspect_output(&[], &image).status.success(), "the later image verifies");
    prev = ticks_go_on(&mut p, prev, "after the later checkpoint");
    let image = checkpoint(pid, true, &second);
    if let Some(l) = p.read_to_eof(LINE).into_iter().rfind(|l| is_tick(l)) {
        prev = CounterTick::parse(&l);
    }
    p.wait_exit(QUICK);
    resumes_after(&image, &prev, "the image taken after the killed requester");
}

/// The image is written by the program itself, so the program's own RLIMIT_FSIZE applies:
/// reaching it must give exit 6 and a line naming the limit and the fix — not kill the program
/// with SIGXFSZ (its checkpoint thread blocks the signal, the write fails with EFBIG), also
/// with --kill. Once the limit is raised (prlimit on the running program) the checkpoint works.
#[test]
fn file_size_limit_gives_a_clean_error_not_sigxfsz() {
    let (_t, dir) = canonical_temp_dir();
    let log = dir.join("counter.log");
    let limit: u64 = 1 << 20;
    let mut cmd = migrate_run_cmd(&dir, &cbin("counter"), counter_args(16, 50, &log));
    // SAFETY: setrlimit between fork and exec is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let rl = libc::rlimit { rlim_cur: limit, rlim_max: libc::RLIM_INFINITY };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &rl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut p = Managed::spawn("counter", cmd);
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    let mut prev = CounterTick::parse(&p.wait_line("tick ", STARTUP));

    let out_dir = dir.join("images");
    fs::create_dir(&out_dir).unwrap();
    for kill in [true, false] {
        let what = format!("checkpoint (kill={kill}) of 16 MiB under a 1 MiB RLIMIT_FSIZE");
        let out = checkpoint_output(pid, kill, &out_dir);
        assert_one_error(&out, &what, 6, &["RLIMIT_FSIZE", &limit.to_string(), "prlimit"]);
        prev = ticks_go_on(&mut p, prev, &what);
        assert!(image_files(&out_dir).is_empty(), "{what}: nothing left behind: {:?}", image_files(&out_dir));
    }
    // The kernel queued SIGXFSZ for the writing thread: nothing of it may stay pending.
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = fs::read_to_string(task.unwrap().path().join("status")).unwrap_or_default();
        for l in status.lines().filter(|l| l.starts_with("SigPnd:") || l.starts_with("ShdPnd:")) {
            let bits = u64::from_str_radix(l.split_whitespace().nth(1).unwrap_or("0"), 16).unwrap();
            assert_eq!(bits & (1 << (libc::SIGXFSZ - 1)), 0, "SIGXFSZ left pending: {l}");
        }
    }

    let raised = libc::rlimit64 { rlim_cur: libc::RLIM64_INFINITY, rlim_max: libc::RLIM64_INFINITY };
    // SAFETY: prlimit on our own child with a valid new limit and no old-value pointer.
    let rc = unsafe { libc::prlimit64(pid, libc::RLIMIT_FSIZE, &raised, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let image = checkpoint(pid, false, &out_dir);
    assert!(inspect_output(&[], &image).status.success(), "the image after raising the limit verifies");
    ticks_go_on(&mut p, prev, "after the checkpoint with the limit raised");
    p.kill();
}

/// A tmpfs with no free inode left: the temporary image cannot be created. Exit 6 naming the
/// directory and what ran out; the program goes on; with one inode freed it works.
#[test]
fn checkpoint_into_a_filesystem_without_free_inodes() {
    if !is_root() {
        println!("SKIP: checkpoint_into_a_filesystem_without_free_inodes needs root to mount a tmpfs");
        return;
    }
    let (_t, dir) = canonical_temp_dir();
    let mnt = dir.join("inodes");
    let mount = match TmpfsMount::new(&mnt, "size=64m,nr_inodes=16") {
        Ok(m) => m,
        Err(e) => {
            println!("SKIP: checkpoint_into_a_filesystem_without_free_inodes: {e}");
            return;
        }
    };
    let mut fillers = Vec::new();
    for i in 0..64 {
        let f = mount.path().join(format!("filler-{i}"));
        match fs::write(&f, b"") {
            Ok(()) => fillers.push(f),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", mnt.display()),
        }
    }
    assert!(fillers.len() < 64, "the tmpfs never ran out of inodes");

    let log = dir.join("counter.log");
    let mut p = migrate_run(&dir, &cbin("counter"), counter_args(4, 50, &log));
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    let mut prev = CounterTick::parse(&p.wait_line("tick ", STARTUP));
    let out = checkpoint_output(pid, true, mount.path());
    let mnt_s = mount.path().to_string_lossy();
    assert_one_error(&out, "checkpoint into a tmpfs without free inodes", 6, &[&mnt_s, "inodes"]);
    prev = ticks_go_on(&mut p, prev, "after the checkpoint into a tmpfs without inodes");
    assert!(image_files(mount.path()).is_empty(), "{:?}", image_files(mount.path()));

    fs::remove_file(fillers.pop().unwrap()).unwrap();
    let image = checkpoint(pid, false, mount.path());
    assert!(inspect_output(&[], &image).status.success(), "the image verifies");
    ticks_go_on(&mut p, prev, "after the checkpoint with an inode free");
    p.kill();
}

// ---------------------------------------------------------------------------------------------
// Resume

const FAULTLIB_C: &str = r#"
static unsigned long calls = 0;
unsigned long fault_mix(unsigned long x) { calls++; return x * 6364136223846793005UL + 1442695040888963407UL; }
unsigned long fault_calls(void) { return calls; }
"#;

const LIBUSER_C: &str = r#"
#include <stdio.h>
#include <unistd.h>
unsigned long fault_mix(unsigned long x);
unsigned long fault_calls(void);
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready pid=%d\n", getpid());
    unsigned long v = 1;
    for (unsigned long n = 1;; n++) {
        v = fault_mix(v);
        printf("tick %lu calls=%lu v=%016lx\n", n, fault_calls(), v);
        usleep(50000);
    }
}
"#;

fn mix(x: u64) -> u64 {
    x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407)
}

/// `tick n calls=n v=mix^n(1)`: the library's own state (.bss) and the program's agree.
#[track_caller]
fn check_lib_tick(line: &str) -> u64 {
    let n = tick_number(line);
    let v = (0..n).fold(1u64, |v, _| mix(v));
    assert_eq!(field_num::<u64>(line, "calls"), n, "{line}");
    assert_eq!(field_hex(line, "v"), v, "{line}");
    n
}

#[track_caller]
fn gcc(args: &[&str]) {
    let cc = std::env::var("MIGRATE_CC").unwrap_or_else(|_| "gcc".into());
    let out = Command::new(&cc).args(args).output().unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(out.status.success(), "{cc} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A program linked against a library of its own; the library is deleted before the resume:
/// exit 4 naming it, nothing runs, the image is untouched. With the library back (the same
/// contents: code is recognised by content) the same image resumes, the library's state too.
#[test]
fn resume_without_a_library_fails_then_works_with_it_back() {
    let (_t, dir) = canonical_temp_dir();
    let d = dir.to_string_lossy().into_owned();
    fs::write(dir.join("faultlib.c"), FAULTLIB_C).unwrap();
    fs::write(dir.join("libuser.c"), LIBUSER_C).unwrap();
    let lib = dir.join("libfaultlib.so");
    gcc(&["-O1", "-shared", "-fPIC", "-o", &format!("{d}/libfaultlib.so"), &format!("{d}/faultlib.c")]);
    let rpath = format!("-Wl,-rpath,{d}");
    gcc(&["-O1", "-o", &format!("{d}/libuser"), &format!("{d}/libuser.c"), &format!("-L{d}"), "-lfaultlib", &rpath]);

    let mut p = migrate_run(&dir, &dir.join("libuser"), Vec::<OsString>::new());
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    let mut last = p.wait_line("tick ", STARTUP);
    check_lib_tick(&last);
    let image = checkpoint(pid, true, &dir);
    if let Some(l) = p.read_to_eof(LINE).into_iter().rfind(|l| is_tick(l)) {
        last = l;
    }
    let last_n = check_lib_tick(&last);
    p.wait_exit(QUICK);

    let before = fingerprint(&image);
    let bytes = fs::read(&lib).unwrap();
    fs::remove_file(&lib).unwrap();
    let lib_s = lib.to_string_lossy();
    let out = resume_output(&[], &image);
    assert_one_error(&out, "resume without the program's library", 4, &[&lib_s, "missing"]);
    assert!(out.stdout.is_empty(), "nothing of the program ran: {}", out.describe());
    assert_eq!(fingerprint(&image), before, "the image is untouched");

    fs::write(&lib, &bytes).unwrap();
    let mut r = resume(&image);
    let line = r.wait_line("tick ", STARTUP);
    assert_eq!(check_lib_tick(&line), last_n + 1, "resumed where it stopped: {line}");
    assert_eq!(check_lib_tick(&r.wait_line("tick ", LINE)), last_n + 2);
    r.kill();
}

const CAP_SYS_RESOURCE: libc::c_ulong = 24;

/// Drops CAP_SYS_RESOURCE from the bounding set (so that even root cannot raise a hard limit
/// after exec) and lowers RLIMIT_AS to `bytes`, in a child before exec.
fn with_address_space_limit(cmd: &mut Command, bytes: u64) {
    // SAFETY: prctl and setrlimit between fork and exec are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            // Fails (EPERM) without CAP_SETPCAP: then there is no CAP_SYS_RESOURCE to drop.
            libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_RESOURCE, 0, 0, 0);
            let rl = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
            if libc::setrlimit(libc::RLIMIT_AS, &rl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// migrate-resume under an address-space limit lower than the program's (unlimited) one: the
/// saved limits cannot be applied, so it refuses before it creates any process — exit 4 naming
/// RLIMIT_AS and the fix — the image untouched; without the limit the same image resumes.
#[test]
fn resume_under_a_lower_memory_limit_is_refused_before_anything_runs() {
    let (_t, dir) = canonical_temp_dir();
    let log = dir.join("counter.log");
    let mut p = migrate_run(&dir, &cbin("counter"), counter_args(64, 50, &log));
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    let mut last = p.wait_line("tick ", STARTUP);
    let image = checkpoint(pid, true, &dir);
    if let Some(l) = p.read_to_eof(LINE).into_iter().rfind(|l| is_tick(l)) {
        last = l;
    }
    p.wait_exit(QUICK);
    let before = fingerprint(&image);

    let mut cmd = resume_cmd(&[], &image);
    with_address_space_limit(&mut cmd, 256 << 20);
    let out = run_tool("migrate-resume", cmd, QUICK);
    assert_one_error(&out, "resume under a 256 MiB RLIMIT_AS", 4, &["RLIMIT_AS", "ulimit"]);
    assert!(!out.stdout.contains("tick"), "nothing of the program ran: {}", out.describe());
    assert!(processes_mentioning(image.as_os_str().as_encoded_bytes()).is_empty(), "no process is left");
    assert_eq!(fingerprint(&image), before, "the image is untouched");

    resumes_after(&image, &CounterTick::parse(&last), "the image resumed without the limit");
}

/// Runs a 64 MiB counter, lowers its limit `resource` to `lowered(VmSize in bytes)` while it
/// runs (prlimit on the running program: mappings it has survive a new limit, and it goes on),
/// checkpoints it with --kill and resumes the image, which must fail with exit 5 and one line
/// mentioning `needles`, leave no process and the image untouched. The image itself is fine: a
/// copy with the limit lifted resumes where the program stopped.
fn restore_under_a_limit_lowered_while_running(
    resource: libc::__rlimit_resource_t,
    lowered: impl Fn(u64) -> u64,
    needles: &[&str],
    names_the_limit: bool,
) {
    let (_t, dir) = canonical_temp_dir();
    let log = dir.join("counter.log");
    let mut p = migrate_run(&dir, &cbin("counter"), counter_args(64, 50, &log));
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    let prev = CounterTick::parse(&p.wait_line("tick ", STARTUP));
    let limit = lower_limit(pid, resource, &lowered);
    let mut last = ticks_go_on(&mut p, prev, "after lowering the limit");
    let image = checkpoint(pid, true, &dir);
    if let Some(l) = p.read_to_eof(LINE).into_iter().rfind(|l| is_tick(l)) {
        last = CounterTick::parse(&l);
    }
    p.wait_exit(QUICK);
    let before = fingerprint(&image);

    let what = format!("restore under limit {resource} lowered to {limit} bytes");
    let out = resume_output(&[], &image);
    assert_one_error(&out, &what, 5, needles);
    if names_the_limit {
        assert!(out.stderr.contains(&limit.to_string()), "{what}: the limit is named: {}", out.describe());
    }
    assert!(!out.stdout.contains("tick"), "{what}: nothing of the program ran: {}", out.describe());
    assert!(processes_mentioning(image.as_os_str().as_encoded_bytes()).is_empty(), "{what}: no process is left");
    assert_eq!(fingerprint(&image), before, "{what}: the image is untouched");

    let lifted = dir.join("lifted.mig");
    rewrite_image(&image, &lifted, |m| {
        for l in m.process.rlimits.iter_mut().filter(|l| l.resource == resource) {
            l.cur = libc::RLIM64_INFINITY;
            l.max = libc::RLIM64_INFINITY;
        }
    });
    resumes_after(&lifted, &last, "the image with the limit lifted");
}

/// RLIMIT_AS below the address space the program had mapped: the restore sees, before it
/// replaces anything, that the switch cannot succeed, and says so with the sizes, the limit and
/// the fix.
#[test]
fn restore_out_of_address_space_is_reported_before_the_switch() {
    restore_under_a_limit_lowered_while_running(
        libc::RLIMIT_AS,
        |vm| vm - (32 << 20),
        &["out of memory", "RLIMIT_AS", "prlimit", "image is intact"],
        true,
    );
}

/// RLIMIT_DATA below the program's private writable memory: only the switch finds out (a
/// mapping fails after the point of no return). It names the region and its size, says what
/// runs out, and exits: the half-built process is gone and the image is intact.
#[test]
fn restore_out_of_memory_in_the_switch_is_reported_and_torn_down() {
    restore_under_a_limit_lowered_while_running(
        libc::RLIMIT_DATA,
        |_| 32 << 20,
        &["out of memory", "RLIMIT_DATA", "region 0x", "KiB", "image is intact"],
        false,
    );
}

/// A program started under address-space and data limits (ulimit -v, ulimit -d) well below the
/// 4 GiB libmigrate reserves for its allocator when nothing limits it: it runs (the reservation
/// shrinks to fit), checkpoints and resumes under the same limits.
#[test]
fn a_program_under_memory_limits_runs_and_resumes() {
    let (_t, dir) = canonical_temp_dir();
    let log = dir.join("counter.log");
    let mut cmd = migrate_run_cmd(&dir, &cbin("counter"), counter_args(16, 50, &log));
    // SAFETY: setrlimit between fork and exec is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            for (r, v) in [(libc::RLIMIT_AS, 1u64 << 30), (libc::RLIMIT_DATA, 512 << 20)] {
                let rl = libc::rlimit { rlim_cur: v, rlim_max: v };
                if libc::setrlimit(r, &rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut p = Managed::spawn("counter", cmd);
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    let mut last = CounterTick::parse(&p.wait_line("tick ", STARTUP));
    let image = checkpoint(pid, true, &dir);
    if let Some(l) = p.read_to_eof(LINE).into_iter().rfind(|l| is_tick(l)) {
        last = CounterTick::parse(&l);
    }
    p.wait_exit(QUICK);
    resumes_after(&image, &last, "a program under ulimit -v 1 GiB and ulimit -d 512 MiB");
}

const PRIVPROG_C: &str = r#"
#include <stdio.h>
#include <unistd.h>
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready pid=%d uid=%d euid=%d egid=%d\n", getpid(), getuid(), geteuid(), getegid());
    for (int n = 1;; n++) {
        printf("tick %d euid=%d egid=%d\n", n, geteuid(), getegid());
        usleep(50000);
    }
}
"#;

const NOBODY: u32 = 65534;

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

/// A file capability (cap_net_raw, effective) as a VFS_CAP_REVISION_2 xattr.
fn set_file_capability(path: &Path) -> std::io::Result<()> {
    let mut v = Vec::new();
    v.extend_from_slice(&(0x0200_0000u32 | 1).to_le_bytes());
    v.extend_from_slice(&(1u32 << 13).to_le_bytes());
    v.extend_from_slice(&[0; 12]);
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: NUL-terminated path and name, a buffer of the given length.
    let rc = unsafe {
        libc::setxattr(c.as_ptr(), c"security.capability".as_ptr(), v.as_ptr() as *const libc::c_void, v.len(), 0)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn remove_file_capability(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: NUL-terminated path and name.
    unsafe { libc::removexattr(c.as_ptr(), c"security.capability".as_ptr()) };
}

/// A program run and checkpointed as user nobody; then its root-owned executable is made
/// set-user-ID root, set-group-ID root, or given a file capability. The image still matches
/// (code is identified by contents, not mode), so without a check migrate-resume would exec a
/// privileged program for nobody (with --host-clocks no user namespace masks it, and the loader
/// would ignore libmigrate: the program would start afresh as euid 0). Each must be refused
/// with exit 4 naming the file and the reason, before anything runs; the image untouched. With
/// the bits gone the same image resumes, still as nobody.
#[test]
fn privileged_executables_are_refused_at_resume() {
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        println!("SKIP: privileged_executables_are_refused_at_resume needs root to make a set-user-ID root program");
        return;
    }
    let (_t, dir) = canonical_temp_dir();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let prog = compile_c(&dir, "privprog", PRIVPROG_C, &[]);
    fs::set_permissions(&prog, fs::Permissions::from_mode(0o755)).unwrap();
    let images = dir.join("images");
    fs::create_dir(&images).unwrap();
    std::os::unix::fs::chown(&images, Some(NOBODY), Some(NOBODY)).unwrap();

    let mut cmd = migrate_run_cmd(&images, &prog, Vec::<OsString>::new());
    as_nobody(&mut cmd);
    let mut p = Managed::spawn("privprog", cmd);
    let ready = p.wait_line("ready ", STARTUP);
    assert_eq!(field_num::<u32>(&ready, "euid"), NOBODY, "{ready}");
    let pid: i32 = field_num(&ready, "pid");
    let mut last = p.wait_line("tick ", STARTUP);
    let image = checkpoint(pid, true, &images);
    if let Some(l) = p.read_to_eof(LINE).into_iter().rfind(|l| is_tick(l)) {
        last = l;
    }
    p.wait_exit(QUICK);
    assert_eq!(fs::metadata(&image).unwrap().uid(), NOBODY, "the program wrote its own image");
    let before = fingerprint(&image);
    let prog_s = prog.to_string_lossy();

    let refused = |what: &str, needle: &str| {
        for extra in [&["--host-clocks"][..], &[][..]] {
            let mut cmd = resume_cmd(extra, &image);
            as_nobody(&mut cmd);
            let out = run_tool("migrate-resume", cmd, QUICK);
            let what = format!("resume of a {what} executable as nobody {extra:?}");
            assert_one_error(&out, &what, 4, &[&prog_s, needle, "privileges"]);
            assert!(out.stdout.is_empty(), "{what}: nothing of the program ran: {}", out.describe());
            assert!(processes_mentioning(image.as_os_str().as_encoded_bytes()).is_empty(), "{what}: nothing is left");
            assert_eq!(fingerprint(&image), before, "{what}: the image is untouched");
        }
    };
    fs::set_permissions(&prog, fs::Permissions::from_mode(0o4755)).unwrap();
    refused("set-user-ID root", "set-user-ID");
    fs::set_permissions(&prog, fs::Permissions::from_mode(0o2755)).unwrap();
    refused("set-group-ID root", "set-group-ID");
    fs::set_permissions(&prog, fs::Permissions::from_mode(0o755)).unwrap();
    match set_file_capability(&prog) {
        Ok(()) => {
            refused("file-capability", "capabilities");
            // migrate-run refuses it too (the loader would ignore libmigrate: unmanaged).
            let out = run_tool("migrate-run", migrate_run_cmd(&images, &prog, Vec::<OsString>::new()), QUICK);
            assert_one_error(&out, "migrate-run of a file-capability program", 4, &[&prog_s, "file capabilities"]);
            assert!(out.stdout.is_empty(), "the program did not run: {}", out.describe());
            remove_file_capability(&prog);
        }
        Err(e) => println!("SKIP (file capability part): cannot set security.capability: {e}"),
    }

    // Unprivileged again: the same image resumes, as nobody, where it stopped.
    let mut cmd = resume_cmd(&["--host-clocks"], &image);
    as_nobody(&mut cmd);
    let mut r = Managed::spawn("migrate-resume", cmd);
    let line = r.wait_line("tick ", STARTUP);
    assert_eq!(tick_number(&line), tick_number(&last) + 1, "{line}");
    assert_eq!(field_num::<u32>(&line, "euid"), NOBODY, "the resumed program runs as nobody: {line}");
    assert_eq!(field_num::<u32>(&line, "egid"), NOBODY, "{line}");
    r.kill();
}

/// Sets both of process `pid`'s limits `resource` to `lowered(its VmSize in bytes)`; returns
/// the limit.
fn lower_limit(pid: i32, resource: libc::__rlimit_resource_t, lowered: &impl Fn(u64) -> u64) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let vm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmSize in /proc/PID/status");
    let limit = lowered(vm_kib << 10);
    let rl = libc::rlimit64 { rlim_cur: limit, rlim_max: limit };
    // SAFETY: prlimit on a process we started with a valid new limit and no old-value pointer.
    let rc = unsafe { libc::prlimit64(pid, resource, &rl, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    limit
}

/// A tree whose child cannot be restored (its RLIMIT_AS was lowered below what it maps): the
/// child's restore fails before its switch, and the parent, already restored and waiting for
/// the whole tree at the barrier, gives up at once too: a tree never runs with a process
/// missing, and the failure is reported in seconds (the barrier's bound is a minute).
#[test]
fn a_tree_member_failing_its_restore_stops_the_whole_tree() {
    tree_member_fails(libc::RLIMIT_AS, |vm| vm - (32 << 20), "RLIMIT_AS");
}

/// The same when the child's restore fails in its switch (RLIMIT_DATA below its private
/// writable memory: only a mapping there finds out), after the point of no return.
#[test]
fn a_tree_member_failing_in_its_switch_stops_the_whole_tree() {
    tree_member_fails(libc::RLIMIT_DATA, |_| 64 << 20, "RLIMIT_DATA");
}

fn tree_member_fails(resource: libc::__rlimit_resource_t, lowered: impl Fn(u64) -> u64, needle: &str) {
    let (_t, dir) = canonical_temp_dir();
    let log = dir.join("family.log");
    let mut p = migrate_run(&dir, &cbin("family"), [log.to_str().unwrap(), "400", "50"]);
    let ready = p.wait_line("ready ", STARTUP);
    let consumer: i32 = field_num(&ready, "consumer");
    p.wait_line("child got 2 ", STARTUP);
    lower_limit(consumer, resource, &lowered);
    let image = checkpoint(p.pid(), true, &dir);
    p.wait_exit(QUICK);

    let out = resume_output(&[], &image);
    assert_eq!(out.code(), Some(5), "the resume fails: {}", out.describe());
    assert!(out.stderr.contains(needle), "the child's error is reported: {}", out.describe());
    assert!(
        out.stderr.contains("another process of the tree failed to restore"),
        "the parent gives up too: {}",
        out.describe()
    );
    assert!(!out.stdout.contains("parent wrote"), "nothing of the program ran: {}", out.describe());
    assert!(processes_mentioning(image.as_os_str().as_encoded_bytes()).is_empty(), "no process is left");
}
