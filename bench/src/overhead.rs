//! Overhead while running (BENCHMARKS.md, "Interposition"): redis-server's throughput under
//! redis-benchmark, started plainly and under migrate-run; and the time migrate-run adds to the
//! start of a program, from spawning it to its exit.
//!
//! Both are measured with warm caches (the page cache is not dropped: a running service is the
//! case being measured), plain and managed alternating so that both see the same conditions.

use crate::measure::Bins;
use crate::proc::{self, Detach, Group};
use crate::report::median;
use crate::sys;
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The start-up probe compiled by build.rs: a dynamically linked C program that exits at once.
pub const STARTUP_PROBE: &str = env!("MIGRATE_BENCH_STARTUP");

/// Bound on redis-server answering PING after its start.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one redis-benchmark run.
const BENCH_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on redis-server's exit after SIGTERM (it saves nothing: `--save ""`).
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one start of a program that exits at once.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Starts of each kind made before the measured ones (page cache, dynamic loader caches).
const WARMUP_STARTS: u32 = 3;

/// How the redis measurement is made.
#[derive(Clone, Debug, Serialize)]
pub struct RedisParams {
    /// Runs of each kind (plain, managed), alternating.
    pub runs: u32,
    /// `-n`: requests per test (SET, then GET).
    pub requests: u64,
    /// `-P`: requests pipelined per connection.
    pub pipeline: u32,
    /// `-c`: parallel connections.
    pub clients: u32,
    /// The CPUs of redis-server and of redis-benchmark, when pinned.
    pub pin: Option<(usize, usize)>,
}

impl RedisParams {
    /// The redis-benchmark arguments, as a command line (without host and port).
    pub fn benchmark_args(&self) -> String {
        format!("-t set,get -n {} -P {} -c {}", self.requests, self.pipeline, self.clients)
    }
}

/// One redis run: one server, one redis-benchmark.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RedisRun {
    pub managed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set_rps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub get_rps: Option<f64>,
    /// Both tests together: all requests over the time of both (the harmonic mean).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rps: Option<f64>,
    /// The server's CPU time (all its threads) over the run, per request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_request: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// Medians of the successful runs of one kind.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RedisSummary {
    pub set_rps: Option<f64>,
    pub get_rps: Option<f64>,
    pub rps: Option<f64>,
    pub server_cpu_us_per_request: Option<f64>,
    /// How far the runs' throughputs (SET and GET together) lie apart: max / min - 1.
    pub spread: Option<f64>,
    pub failed_runs: usize,
}

impl RedisSummary {
    fn new<'a>(runs: impl Iterator<Item = &'a RedisRun> + Clone) -> RedisSummary {
        let pick = |f: fn(&RedisRun) -> Option<f64>| median(runs.clone().filter_map(f).collect());
        RedisSummary {
            set_rps: pick(|r| r.set_rps),
            get_rps: pick(|r| r.get_rps),
            rps: pick(|r| r.rps),
            server_cpu_us_per_request: pick(|r| r.server_cpu_us_per_request),
            spread: spread(runs.clone().filter_map(|r| r.rps)),
            failed_runs: runs.filter(|r| r.failed.is_some()).count(),
        }
    }
}

/// max / min - 1 of positive values; None for none.
fn spread(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (min, max) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    (min.is_finite() && min > 0.0).then(|| max / min - 1.0)
}

/// The redis measurement, or why it was skipped.
#[derive(Clone, Debug, Serialize)]
pub struct RedisReport {
    /// Why it was not measured (redis-server or redis-benchmark not installed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// `redis-server --version`.
    pub server: String,
    pub params: RedisParams,
    pub plain: RedisSummary,
    pub managed: RedisSummary,
    /// Median managed throughput over median plain throughput (SET and GET together).
    pub ratio: Option<f64>,
    pub all_runs: Vec<RedisRun>,
}

/// Start-up cost for one program.
#[derive(Clone, Debug, Serialize)]
pub struct StartupReport {
    /// What the program is, for the table.
    pub label: String,
    pub program: PathBuf,
    pub plain_ms: Option<f64>,
    pub managed_ms: Option<f64>,
    /// Median managed minus median plain.
    pub added_ms: Option<f64>,
    pub runs: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    pub all_plain_ms: Vec<f64>,
    pub all_managed_ms: Vec<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct OverheadReport {
    pub redis: RedisReport,
    pub startup: Vec<StartupReport>,
}

impl OverheadReport {
    pub fn failed(&self) -> bool {
        self.redis.plain.failed_runs + self.redis.managed.failed_runs > 0
            || self.startup.iter().any(|s| s.failed.is_some())
    }
}

/// The CPUs to pin redis-server and redis-benchmark to: the last CPU we may run on for the
/// server, the first for the client; None with fewer than two.
pub fn default_pin() -> Option<(usize, usize)> {
    let cpus = allowed_cpus();
    match (cpus.first(), cpus.last()) {
        (Some(&client), Some(&server)) if client != server => Some((server, client)),
        _ => None,
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid, empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size given; pid 0 is this thread.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Vec::new();
    }
    // SAFETY: CPU_ISSET reads the set in bounds (CPU_SETSIZE).
    (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
}

/// Runs `cmd` on CPU `cpu` only (from before its exec).
fn pin(cmd: &mut Command, cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    // SAFETY: the closure runs in the child between fork and exec; it only builds a cpu_set_t
    // on its stack and calls sched_setaffinity(2), a plain system call, touching no shared state.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// What every overhead measurement needs.
pub struct Overhead<'a> {
    pub bins: &'a Bins,
    /// The work directory: logs, and redis-server's directory.
    pub dir: &'a Path,
}

impl Overhead<'_> {
    /// redis-server plain and managed, alternating, `params.runs` times each.
    pub fn redis(&self, params: &RedisParams) -> RedisReport {
        let mut report = RedisReport {
            skipped: None,
            server: String::new(),
            params: params.clone(),
            plain: RedisSummary::default(),
            managed: RedisSummary::default(),
            ratio: None,
            all_runs: Vec::new(),
        };
        let (Some(server), Some(client)) = (sys::find_in_path("redis-server"), sys::find_in_path("redis-benchmark"))
        else {
            let why = "redis-server or redis-benchmark not found (apt-get install redis-server redis-tools)";
            eprintln!("redis: skipped: {why}");
            report.skipped = Some(why.into());
            return report;
        };
        // "Redis server v=7.0.15 sha=… malloc=…": the version is enough.
        let version = proc::run(Command::new(&server).arg("--version"), "redis-server --version", START_TIMEOUT)
            .ok()
            .and_then(|f| f.stdout.split_whitespace().find_map(|w| w.strip_prefix("v=")).map(str::to_string));
        report.server = format!("redis-server {}", version.as_deref().unwrap_or("(version unknown)"));
        for run in 1..=params.runs {
            // Each kind goes first in every other pair.
            let order = if run % 2 == 1 { [false, true] } else { [true, false] };
            for managed in order {
                let r = self.redis_run(&server, &client, params, managed, run);
                let mut line =
                    format!("redis run {run}/{}, {}:", params.runs, if managed { "managed" } else { "plain" });
                if let (Some(rps), Some(set), Some(get)) = (r.rps, r.set_rps, r.get_rps) {
                    line += &format!(" {rps:.0} req/s (SET {set:.0}, GET {get:.0})");
                }
                if let Some(cpu) = r.server_cpu_us_per_request {
                    line += &format!(", server CPU {cpu:.3} µs/req");
                }
                if let Some(why) = &r.failed {
                    line += &format!(" FAILED: {why}");
                }
                eprintln!("{line}");
                report.all_runs.push(r);
            }
        }
        report.plain = RedisSummary::new(report.all_runs.iter().filter(|r| !r.managed));
        report.managed = RedisSummary::new(report.all_runs.iter().filter(|r| r.managed));
        report.ratio = match (report.managed.rps, report.plain.rps) {
            (Some(m), Some(p)) if p > 0.0 => Some(m / p),
            _ => None,
        };
        report
    }

    fn redis_run(&self, server: &Path, client: &Path, params: &RedisParams, managed: bool, run: u32) -> RedisRun {
        let mut result = RedisRun { managed, ..RedisRun::default() };
        let tag = format!("redis-{}-{run}", if managed { "managed" } else { "plain" });
        let log = self.dir.join(format!("{tag}.log"));
        if let Err(e) = self.redis_inner(server, client, params, managed, &log, &mut result) {
            result.failed = Some(format!("{e:#}"));
        }
        if let Err(e) = sys::remove_path(&log) {
            eprintln!("migrate-bench: warning: {e:#}");
        }
        result
    }

    fn redis_inner(
        &self,
        server: &Path,
        client: &Path,
        params: &RedisParams,
        managed: bool,
        log: &Path,
        result: &mut RedisRun,
    ) -> Result<()> {
        let port = free_port()?;
        let mut cmd = if managed {
            let mut c = Command::new(&self.bins.run);
            c.arg("--ckpt-dir").arg(self.dir).arg("--").arg(server);
            c
        } else {
            Command::new(server)
        };
        // The same configuration both ways: no persistence, only the loopback address.
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir)
            .args(["--logfile", ""])
            .env("MIGRATE_LOG", "quiet")
            .stdout(log_file(log)?)
            .stderr(log_file(log)?);
        pin(&mut cmd, params.pin.map(|(s, _)| s));
        let name = if managed { "migrate-run redis-server" } else { "redis-server" };
        let (mut group, _, _) = Group::spawn(&mut cmd, name, Detach::Group)?;
        wait_ping(port, &mut group, log)?;
        let pid = group.pid();

        let cpu_before = cpu_time_ns(pid);
        let mut bench = Command::new(client);
        bench
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "set,get", "--csv"])
            .args(["-n", &params.requests.to_string(), "-P", &params.pipeline.to_string()])
            .args(["-c", &params.clients.to_string()]);
        pin(&mut bench, params.pin.map(|(_, c)| c));
        let out = proc::run(&mut bench, "redis-benchmark", BENCH_TIMEOUT)?.check("redis-benchmark")?;
        let cpu_after = cpu_time_ns(pid);
        if let Some(status) = group.try_status()? {
            bail!("{name} exited ({status}) during the benchmark; its log:\n{}", proc::log_tail(log));
        }

        let (set, get) = parse_csv(&out.stdout)?;
        result.set_rps = Some(set);
        result.get_rps = Some(get);
        result.rps = Some(2.0 / (1.0 / set + 1.0 / get));
        if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
            let requests = 2 * params.requests;
            result.server_cpu_us_per_request = Some(b.saturating_sub(a) as f64 / 1e3 / requests as f64);
        }

        // SAFETY: kill(2) has no memory effects; `pid` is our live child (not yet reaped).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let (status, _) = group.wait(EXIT_TIMEOUT)?;
        ensure!(status.success(), "{name} exited with {status} after SIGTERM; its log:\n{}", proc::log_tail(log));
        Ok(())
    }

    /// `program` started plainly and under migrate-run, alternating, `runs` times each after a
    /// few unmeasured starts; each time from the spawn to the exit.
    pub fn startup(&self, label: &str, program: &Path, runs: u32) -> StartupReport {
        let mut report = StartupReport {
            label: label.to_string(),
            program: program.to_path_buf(),
            plain_ms: None,
            managed_ms: None,
            added_ms: None,
            runs,
            failed: None,
            all_plain_ms: Vec::new(),
            all_managed_ms: Vec::new(),
        };
        let result = (|| -> Result<()> {
            for i in 0..WARMUP_STARTS + runs {
                let plain = self.start_once(program, false)?;
                let managed = self.start_once(program, true)?;
                if i >= WARMUP_STARTS {
                    report.all_plain_ms.push(plain);
                    report.all_managed_ms.push(managed);
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            report.failed = Some(format!("{e:#}"));
        }
        report.plain_ms = median(report.all_plain_ms.clone());
        report.managed_ms = median(report.all_managed_ms.clone());
        report.added_ms = report.managed_ms.zip(report.plain_ms).map(|(m, p)| m - p);
        let mut line = format!("start-up {}:", report.label);
        if let (Some(p), Some(m), Some(a)) = (report.plain_ms, report.managed_ms, report.added_ms) {
            line += &format!(" plain {p:.2} ms, managed {m:.2} ms, added {a:.2} ms");
        }
        if let Some(why) = &report.failed {
            line += &format!(" FAILED: {why}");
        }
        eprintln!("{line}");
        report
    }

    /// Milliseconds from spawning `program` (under migrate-run if `managed`) to its exit.
    fn start_once(&self, program: &Path, managed: bool) -> Result<f64> {
        let mut cmd = if managed {
            let mut c = Command::new(&self.bins.run);
            c.arg("--ckpt-dir").arg(self.dir).arg("--").arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.env("MIGRATE_LOG", "quiet").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let what =
            if managed { format!("migrate-run -- {}", program.display()) } else { program.display().to_string() };
        let start = Instant::now();
        let (mut group, _, stderr) = Group::spawn(&mut cmd, &what, Detach::Group)?;
        let (status, end) = group.wait(START_TIMEOUT)?;
        if !status.success() {
            let mut text = String::new();
            if let Some(mut e) = stderr {
                let _ = e.read_to_string(&mut text);
            }
            bail!("{what} failed ({status}): {}", proc::tail(&text, 20));
        }
        Ok(end.saturating_duration_since(start).as_secs_f64() * 1e3)
    }
}

/// The start-up probes, with their labels: /bin/true (or `true` from PATH) and the C probe.
pub fn startup_programs() -> Vec<(String, PathBuf)> {
    let mut programs = Vec::new();
    let tru = Path::new("/bin/true");
    if tru.is_file() {
        programs.push((tru.display().to_string(), tru.to_path_buf()));
    } else if let Some(p) = sys::find_in_path("true") {
        programs.push((p.display().to_string(), p));
    }
    programs.push(("C, exits at once (bench/startup.c)".to_string(), PathBuf::from(STARTUP_PROBE)));
    programs
}

fn log_file(path: &Path) -> Result<File> {
    File::options().create(true).append(true).open(path).with_context(|| format!("cannot open {}", path.display()))
}

/// A TCP port on the loopback address that is free now (the kernel's choice).
fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind a TCP port on 127.0.0.1")?;
    Ok(l.local_addr().context("getsockname")?.port())
}

/// Waits until redis-server answers PING on `port`.
fn wait_ping(port: u16, server: &mut Group, log: &Path) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if ping(addr).is_ok() {
            return Ok(());
        }
        if let Some(status) = server.try_status()? {
            bail!("redis-server exited ({status}) before answering PING; its log:\n{}", proc::log_tail(log));
        }
        if Instant::now() > deadline {
            bail!("redis-server did not answer PING on port {port} within {} s", READY_TIMEOUT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ping(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf)?;
    ensure!(&buf == b"+PONG\r\n", "unexpected answer to PING: {:?}", String::from_utf8_lossy(&buf));
    Ok(())
}

/// The CPU time of all threads of `pid` so far, in ns: the sum of se.sum_exec_runtime in
/// /proc/PID/task/*/sched (µs precision), else utime + stime of /proc/PID/stat (clock ticks).
fn cpu_time_ns(pid: i32) -> Option<u64> {
    let from_sched = || -> Option<u64> {
        let mut total = 0.0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
            let text = std::fs::read_to_string(task.path().join("sched")).ok()?;
            let line = text.lines().find(|l| l.starts_with("se.sum_exec_runtime"))?;
            let ms: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
            total += ms;
        }
        Some((total * 1e6) as u64)
    };
    from_sched().or_else(|| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // After the command: state is field 3, utime 14 and stime 15 (1-based).
        let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf(3) has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (hz > 0).then(|| ticks * 1_000_000_000 / hz as u64)
    })
}

/// The SET and GET requests per second of `redis-benchmark --csv`.
fn parse_csv(text: &str) -> Result<(f64, f64)> {
    let rps = |test: &str| -> Result<f64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("\"{test}\",")))
            .with_context(|| format!("redis-benchmark printed no {test} line: {}", proc::tail(text, 5)))?;
        let field = line.split(',').nth(1).map(|f| f.trim_matches('"')).unwrap_or_default();
        let v: f64 = field.parse().with_context(|| format!("bad requests per second in {line:?}"))?;
        ensure!(v > 0.0, "redis-benchmark reports {v} requests per second for {test}");
        Ok(v)
    };
    Ok((rps("SET")?, rps("GET")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_benchmark_csv() {
        let text =
            "\"test\",\"rps\",\"avg_latency_ms\"\n\"SET\",\"833333.38\",\"0.802\"\n\"GET\",\"1000000.00\",\"0.666\"\n";
        assert_eq!(parse_csv(text).unwrap(), (833333.38, 1000000.0));
        assert!(parse_csv("\"SET\",\"1.0\"\n").is_err());
        assert!(parse_csv("\"SET\",\"x\"\n\"GET\",\"1\"\n").is_err());
    }

    #[test]
    fn cpu_time_of_self() {
        let pid = std::process::id() as i32;
        let a = cpu_time_ns(pid).unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(0u64);
        }
        assert!(cpu_time_ns(pid).unwrap() >= a);
    }
}
