//! Compiles the benchmark workload (workload.c) with `gcc -O2` into `$OUT_DIR/workload` and
//! exports its path to the benchmark as `MIGRATE_BENCH_WORKLOAD`. `$MIGRATE_CC` overrides the
//! compiler.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set by cargo"));
    let src = manifest.join("workload.c");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo")).join("workload");
    let cc = std::env::var("MIGRATE_CC").unwrap_or_else(|_| "gcc".to_string());
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=MIGRATE_CC");

    let output = Command::new(&cc)
        .args(["-O2", "-g", "-Wall", "-Wextra", "-o"])
        .arg(&out)
        .arg(&src)
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
    for line in String::from_utf8_lossy(&output.stderr).lines().filter(|l| l.contains("warning:")) {
        println!("cargo:warning={line}");
    }
    println!("cargo:rustc-env=MIGRATE_BENCH_WORKLOAD={}", out.display());
}
