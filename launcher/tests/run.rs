//! migrate-run: the environment and personality it gives the program, and what it refuses.
//! libc stands in for libmigrate (MIGRATE_LIB), so nothing is actually managed.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;

fn run_cmd() -> std::process::Command {
    let mut c = bin("run");
    c.env("MIGRATE_LIB", libc_path());
    c.env_remove("LD_PRELOAD").env_remove("GLIBC_TUNABLES").env_remove("MIGRATE_CKPT_DIR");
    c
}

#[test]
fn sets_the_environment_and_personality_and_passes_the_status() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = run_cmd();
    c.current_dir(dir.path());
    c.env("LD_PRELOAD", "/nonexistent/other.so").env("GLIBC_TUNABLES", "glibc.malloc.arena_max=2");
    c.args(["--signal", "RTMIN+3", "--ckpt-dir", "ckpts", "sh", "-c"]);
    c.arg("echo \"$LD_PRELOAD|$GLIBC_TUNABLES|$MIGRATE_CKPT_DIR|$MIGRATE_SIGNAL\"; cat /proc/self/personality; exit 7");
    let r = run(c);
    assert_eq!(r.code, 7, "{}", r.stderr);
    let mut lines = r.stdout.lines();
    let want = format!(
        "{}:/nonexistent/other.so|glibc.malloc.arena_max=2:glibc.pthread.rseq=0|{}|{}",
        libc_path().display(),
        fs::canonicalize(dir.path()).unwrap().join("ckpts").display(),
        libc::SIGRTMIN() + 3
    );
    assert_eq!(lines.next(), Some(want.as_str()));
    let persona = u32::from_str_radix(lines.next().unwrap().trim(), 16).unwrap();
    assert_ne!(persona & libc::ADDR_NO_RANDOMIZE as u32, 0);
}

#[test]
fn defaults() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = run_cmd();
    c.current_dir(dir.path()).env("MIGRATE_RESTORE", "/stale.img");
    c.args(["--", "sh", "-c", "echo \"$MIGRATE_CKPT_DIR|$MIGRATE_SIGNAL|${MIGRATE_RESTORE-unset}\""]);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let cwd = fs::canonicalize(dir.path()).unwrap();
    assert_eq!(r.stdout.trim(), format!("{}|12|unset", cwd.display()));

    let mut c = run_cmd();
    c.env("MIGRATE_CKPT_DIR", "/var/tmp/x").args(["sh", "-c", "echo $MIGRATE_CKPT_DIR"]);
    assert_eq!(run(c).stdout, "/var/tmp/x\n");
}

/// A minimal static ELF64 x86_64 header: one PT_LOAD, no PT_INTERP.
fn static_elf() -> Vec<u8> {
    let mut b = vec![0u8; 64];
    b[0..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[6] = 1;
    b[16] = 2;
    b[18] = 62;
    b[20] = 1;
    b[32] = 64;
    b[52] = 64;
    b[54] = 56;
    b[56] = 1;
    let mut ph = [0u8; 56];
    ph[0] = 1;
    b.extend_from_slice(&ph);
    b
}

#[test]
fn refuses_what_preload_cannot_reach() {
    let dir = tempfile::tempdir().unwrap();
    let stat = dir.path().join("static-prog");
    fs::write(&stat, static_elf()).unwrap();
    fs::set_permissions(&stat, fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = run_cmd();
    c.arg(&stat);
    run(c).expect_error("run", 4, "is statically linked: LD_PRELOAD cannot reach it");

    let suid = dir.path().join("suid-prog");
    fs::copy("/bin/true", &suid).unwrap();
    fs::set_permissions(&suid, fs::Permissions::from_mode(0o4755)).unwrap();
    let mut c = run_cmd();
    c.arg(&suid);
    run(c).expect_error("run", 4, "is setuid: LD_PRELOAD cannot reach it");

    let plain = dir.path().join("not-executable");
    fs::write(&plain, "#!/bin/sh\n").unwrap();
    fs::set_permissions(&plain, fs::Permissions::from_mode(0o644)).unwrap();
    let mut c = run_cmd();
    c.arg(&plain);
    run(c).expect_error("run", 4, "is not executable");

    let mut c = run_cmd();
    c.arg("no-such-program-anywhere");
    run(c).expect_error("run", 4, "cannot find no-such-program-anywhere in PATH");
}

#[test]
fn needs_libmigrate() {
    let mut c = bin("run");
    c.env("MIGRATE_LIB", "/nonexistent/libmigrate.so").arg("true");
    run(c).expect_error("run", 4, "MIGRATE_LIB=/nonexistent/libmigrate.so cannot be used");
}

#[test]
fn bad_signals_are_usage_errors() {
    for sig in ["KILL", "SIGSTOP", "RTMAX-1", "63", "NOPE", "0"] {
        let mut c = run_cmd();
        c.args(["--signal", sig, "true"]);
        run(c).expect_error("run", 2, "--signal");
    }
}
