//! Compiles the benchmark's C programs with `gcc -O2` into `$OUT_DIR` and exports their paths to
//! the benchmark: the workload (workload.c) as `MIGRATE_BENCH_WORKLOAD`, the start-up probe
//! (startup.c, dynamically linked) as `MIGRATE_BENCH_STARTUP`. `$MIGRATE_CC` overrides the
//! compiler.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=MIGRATE_CC");
    compile("workload", "MIGRATE_BENCH_WORKLOAD");
    compile("startup", "MIGRATE_BENCH_STARTUP");
}

/// Compiles `<name>.c` into `$OUT_DIR/<name>` and exports the path as `env`.
fn compile(name: &str, env: &str) {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set by cargo"));
    let src = manifest.join(format!("{name}.c"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo")).join(name);
    let cc = std::env::var("MIGRATE_CC").unwrap_or_else(|_| "gcc".to_string());
    println!("cargo:rerun-if-changed={}", src.display());

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
    println!("cargo:rustc-env={env}={}", out.display());
}
