//! Compiles the C example programs (examples/c/*.c) into `$OUT_DIR/cbin/<name>` and exports that
//! directory to the tests as `MIGRATE_CBIN_DIR`. `hello_static` is linked with `-static`: the
//! tests check that migrate-run refuses it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// (source name, extra flags)
const PROGRAMS: &[(&str, &[&str])] = &[
    ("counter", &[]),
    ("fifo_reader", &[]),
    ("sleeper", &[]),
    ("signals", &[]),
    ("hello_static", &["-static"]),
    ("exiter", &[]),
    ("sigclash", &[]),
    ("waiters", &["-pthread"]),
    ("threadpool", &["-pthread"]),
    ("threadchurn", &["-pthread"]),
    ("pids", &["-pthread"]),
    ("mainexit", &["-pthread"]),
    ("family", &[]),
    ("waiter", &[]),
    ("groups", &[]),
    ("sysv", &[]),
    ("sysv_private", &[]),
    ("timers", &["-pthread", "-lrt"]),
    ("clocks", &[]),
    ("lazymem", &["-pthread"]),
];

fn compile(cc: &str, src: &Path, out: &Path, extra: &[&str]) {
    let output = Command::new(cc)
        .args(["-O1", "-g", "-Wall"])
        .args(extra)
        .arg("-o")
        .arg(out)
        .arg(src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cc} to build {}: {e}", src.display()));
    if !output.status.success() {
        panic!(
            "{cc} failed to build {} ({}):\n{}{}",
            src.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Warnings are shown by cargo only with -vv; surface them as cargo warnings.
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        if line.contains("warning:") {
            println!("cargo:warning={line}");
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src_dir = manifest.join("..").join("examples").join("c");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("cbin");
    std::fs::create_dir_all(&out_dir).unwrap_or_else(|e| panic!("create {}: {e}", out_dir.display()));
    let cc = std::env::var("MIGRATE_CC").unwrap_or_else(|_| "gcc".to_string());
    println!("cargo:rerun-if-env-changed=MIGRATE_CC");
    for (name, extra) in PROGRAMS {
        let src = src_dir.join(format!("{name}.c"));
        println!("cargo:rerun-if-changed={}", src.display());
        compile(&cc, &src, &out_dir.join(name), extra);
    }
    println!("cargo:rustc-env=MIGRATE_CBIN_DIR={}", out_dir.display());
}
