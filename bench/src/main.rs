//! migrate-bench: the end-to-end benchmark of BENCHMARKS.md.
//!
//! For each size, a program that fills N MiB with random bytes and then appends a counter line
//! to a file every 100 ms (bench/workload.c) is checkpointed while left running (timed; image
//! size), then checkpointed with --kill and resumed, timed from the resume command until the
//! program writes its next line, which must continue the count (resumed with --host-clocks, so
//! that the workload's pending deadline has passed, as under CRIU: see measure.rs). CRIU is measured beside, the
//! same way and alternating with ours, when a working criu is installed.
//!
//! Then the overhead while running (overhead.rs): redis-server's throughput under
//! redis-benchmark, plain and managed, and the time migrate-run adds to a program's start.
//!
//! With `--compress`, each size also gets a row for compressed images (`--compress` on both
//! checkpoints); `--memory mixed` makes the workload's memory compressible in part.
//!
//! Usage: `cargo run --release -p migrate-bench -- [--sizes 1,64,256,1024] [--runs 3] [--json out.json]
//! [--overhead | --no-overhead] [--compress] [--memory random|mixed]`

mod measure;
mod overhead;
mod proc;
mod report;
mod sys;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use measure::{Bench, Bins, RunResult, WORKLOAD};
use overhead::{Overhead, OverheadReport, RedisParams};
use proc::{Detach, Group, WorkDir};
use report::{Report, SizeReport, Summary};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

/// End-to-end checkpoint/restore benchmark of migrate, with CRIU beside when it works here.
///
/// Images are written to a fresh directory on tmpfs, removed at the end. Run as root so that
/// the page cache can be dropped before each measured operation (see BENCHMARKS.md).
#[derive(Debug, Parser)]
#[command(name = "migrate-bench", version)]
struct Cli {
    /// Workload sizes in MiB, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "1,64,256,1024",
          value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    sizes: Vec<u64>,

    /// Runs per size (medians are reported)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,

    /// Measure only the overhead while running (redis throughput, start-up), not the sizes
    #[arg(long, conflicts_with_all = ["sizes", "runs", "no_overhead", "install_criu", "no_drop_caches"])]
    overhead: bool,

    /// Do not measure the overhead while running after the size table
    #[arg(long)]
    no_overhead: bool,

    /// Also measure compressed images (migrate-checkpoint --compress): a second migrate row per
    /// size, its runs alternating with the others
    #[arg(long)]
    compress: bool,

    /// The workload's memory: random bytes (incompressible, the default) or mixed (of every
    /// four 64 KiB blocks one random, one zeros, two text-like words)
    #[arg(long, value_name = "KIND", default_value = "random", value_parser = ["random", "mixed"])]
    memory: String,

    /// Overhead: redis runs of each kind, plain and managed alternating (medians are reported)
    #[arg(long, value_name = "N", default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=1000))]
    redis_runs: u32,

    /// Overhead: requests per redis-benchmark test (-n), for SET and for GET
    #[arg(long, value_name = "N", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1000..=1_000_000_000))]
    redis_requests: u64,

    /// Overhead: requests pipelined per connection (redis-benchmark -P)
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    redis_pipeline: u32,

    /// Overhead: parallel connections (redis-benchmark -c)
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    redis_clients: u32,

    /// Overhead: do not pin redis-server and redis-benchmark to CPUs of their own
    #[arg(long)]
    no_pin: bool,

    /// Overhead: starts of each kind for the start-up time (medians are reported)
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    startup_runs: u32,

    /// Directory in which to create the work directory for images (should be tmpfs)
    #[arg(long, value_name = "DIR", default_value = "/dev/shm")]
    dir: PathBuf,

    /// Also write the results as JSON to FILE
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Directory holding migrate-run, migrate-checkpoint and migrate-resume [default: the
    /// directory of this executable, i.e. target/release under cargo run --release]
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,

    /// Run `apt-get install -y criu` first
    #[arg(long)]
    install_criu: bool,

    /// Do not drop the page cache before each measured operation (for diagnosis only: the
    /// figures of BENCHMARKS.md were taken with it dropped)
    #[arg(long)]
    no_drop_caches: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match bench(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("migrate-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn bench(cli: &Cli) -> Result<ExitCode> {
    proc::install_interrupt_cleanup()?;

    let bin_dir = match &cli.bin_dir {
        Some(d) => d.clone(),
        None => {
            let exe = std::env::current_exe().context("cannot find the path of this executable")?;
            exe.parent().context("this executable has no parent directory")?.to_path_buf()
        }
    };
    let bins = Bins::locate(&bin_dir)?;
    ensure!(Path::new(WORKLOAD).is_file(), "the workload {WORKLOAD} is missing: rebuild migrate-bench");

    // The size table, unless only the overhead is asked for.
    let sizes = !cli.overhead;
    if cli.install_criu {
        install_criu();
    }
    let (criu, criu_status) = if sizes { detect_criu() } else { (None, "not used (--overhead)".into()) };
    eprintln!("{criu_status}");

    let work = WorkDir::create(&cli.dir)?;
    let image_fs = sys::fs_type(work.path())?;
    if image_fs != "tmpfs" {
        eprintln!(
            "migrate-bench: warning: {} is not on tmpfs ({image_fs}); figures are not comparable",
            cli.dir.display()
        );
    }
    let drop_caches = sizes && !cli.no_drop_caches && sys::is_root() && {
        match sys::drop_caches() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("migrate-bench: warning: {e:#}; the page cache will not be dropped");
                false
            }
        }
    };

    let machine = sys::Machine {
        cpu: sys::cpu_model(),
        nproc: sys::nproc(),
        kernel: sys::kernel_release(),
        image_dir: work.path().to_path_buf(),
        image_fs,
        drop_caches,
        runs_per_size: cli.runs,
        criu: criu_status,
        memory: cli.memory.clone(),
    };
    let bench = Bench { memory: &cli.memory, bins: &bins, dir: work.path(), drop_caches, criu: criu.as_deref() };

    let mut rows = Vec::new();
    for &mib in cli.sizes.iter().filter(|_| sizes) {
        let mut ours = Vec::new();
        let mut packed = Vec::new();
        let mut theirs = Vec::new();
        // Ours and CRIU's alternate, so that both see the same conditions.
        for run in 1..=cli.runs {
            let r = bench.migrate_run(mib, run, false);
            progress(mib, run, cli.runs, "migrate", &r);
            ours.push(r);
            if cli.compress {
                let r = bench.migrate_run(mib, run, true);
                progress(mib, run, cli.runs, "migrate --compress", &r);
                packed.push(r);
            }
            if criu.is_some() {
                let r = bench.criu_run(mib, run);
                progress(mib, run, cli.runs, "criu", &r);
                theirs.push(r);
            }
        }
        rows.push(SizeReport {
            size_mib: mib,
            migrate: Summary::new(ours),
            migrate_lz4: cli.compress.then(|| Summary::new(packed)),
            criu: criu.is_some().then(|| Summary::new(theirs)),
        });
    }
    let overhead = (!cli.no_overhead).then(|| measure_overhead(cli, &bins, work.path()));
    drop(work);

    let report = Report { machine, runs: rows, overhead };
    print!("{}", report.render());
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report).context("cannot serialize the report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    let failed = report
        .runs
        .iter()
        .any(|r| r.migrate.failed_runs > 0 || r.migrate_lz4.as_ref().is_some_and(|s| s.failed_runs > 0))
        || report.overhead.as_ref().is_some_and(OverheadReport::failed);
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// The overhead section: redis throughput plain and managed, then the start-up times.
fn measure_overhead(cli: &Cli, bins: &Bins, dir: &Path) -> OverheadReport {
    let o = Overhead { bins, dir };
    let params = RedisParams {
        runs: cli.redis_runs,
        requests: cli.redis_requests,
        pipeline: cli.redis_pipeline,
        clients: cli.redis_clients,
        pin: if cli.no_pin { None } else { overhead::default_pin() },
    };
    let redis = o.redis(&params);
    let startup = overhead::startup_programs()
        .iter()
        .map(|(label, program)| o.startup(label, program, cli.startup_runs))
        .collect();
    OverheadReport { redis, startup }
}

fn progress(mib: u64, run: u32, runs: u32, tool: &str, r: &RunResult) {
    let mut line = format!("{mib} MiB, run {run}/{runs}, {tool}:");
    if let Some(v) = r.ckpt_ms {
        line += &format!(" ckpt {v:.1} ms");
    }
    if let Some(b) = r.image_bytes {
        line += &format!(", image {:.1} MB", b as f64 / 1e6);
    }
    if let Some(v) = r.restore_ms {
        line += &format!(", restore {v:.1} ms");
    }
    if let Some(why) = &r.failed {
        line += &format!(" FAILED: {why}");
    }
    eprintln!("{line}");
}

/// `apt-get install -y criu`, its output on our stderr; a failure is reported, not fatal.
fn install_criu() {
    eprintln!("running apt-get install -y criu");
    let result = (|| -> Result<()> {
        let to_stderr = std::io::stderr().as_fd().try_clone_to_owned().context("cannot duplicate stderr")?;
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "criu"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::from(to_stderr))
            .stderr(Stdio::inherit());
        let (mut apt, _, _) = Group::spawn(&mut cmd, "apt-get install -y criu", Detach::Group)?;
        let (status, _) = apt.wait(Duration::from_secs(900))?;
        ensure!(status.success(), "apt-get install -y criu failed ({status})");
        Ok(())
    })();
    if let Err(e) = result {
        eprintln!("migrate-bench: warning: {e:#}");
    }
}

/// A criu on PATH that passes `criu check`, and a one-line account of what was found.
fn detect_criu() -> (Option<PathBuf>, String) {
    let Some(criu) = sys::find_in_path("criu") else {
        return (None, "criu not found; reporting migrate alone".into());
    };
    let check = proc::run(Command::new(&criu).arg("check"), "criu check", Duration::from_secs(60));
    let failure = match check {
        Ok(f) if f.status.success() => None,
        Ok(f) => {
            // criu's last line is its conclusion ("Could not initialize kernel features
            // detection."); its first is often an uninformative "exited, status=1".
            let text = format!("{}\n{}", f.stdout, f.stderr);
            let last = text.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("(no output)").to_string();
            Some(format!("{last} ({})", f.status))
        }
        Err(e) => Some(format!("{e:#}")),
    };
    if let Some(why) = failure {
        return (
            None,
            format!(
                "criu check failed: {why}; the distribution's criu 3.17 does not support this kernel — see \
                 BENCHMARKS.md; reporting migrate alone"
            ),
        );
    }
    let version = proc::run(Command::new(&criu).arg("--version"), "criu --version", Duration::from_secs(30))
        .ok()
        .and_then(|f| f.stdout.lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_else(|| "version unknown".into());
    let status = format!("{} ({version})", criu.display());
    (Some(criu), status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["migrate-bench", "--sizes", "64,256", "--runs", "1"]).unwrap();
        assert_eq!(cli.sizes, [64, 256]);
        assert_eq!(cli.runs, 1);
        let cli = Cli::try_parse_from(["migrate-bench"]).unwrap();
        assert_eq!(cli.sizes, [1, 64, 256, 1024]);
        assert!(Cli::try_parse_from(["migrate-bench", "--sizes", "0"]).is_err());
        assert!(!cli.overhead && !cli.no_overhead);
        let cli = Cli::try_parse_from(["migrate-bench", "--overhead", "--redis-runs", "3"]).unwrap();
        assert!(cli.overhead);
        assert_eq!(cli.redis_runs, 3);
        assert!(Cli::try_parse_from(["migrate-bench", "--overhead", "--sizes", "1"]).is_err());
        assert!(Cli::try_parse_from(["migrate-bench", "--overhead", "--no-overhead"]).is_err());
    }
}
