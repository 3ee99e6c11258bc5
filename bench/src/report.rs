//! Medians, the table, the targets and the JSON report.

use crate::measure::RunResult;
use crate::overhead::OverheadReport;
use crate::sys::Machine;
use serde::Serialize;
use std::fmt::Write as _;

/// Fixed-cost target (1 MiB program): checkpoint and resume each under this (BENCHMARKS.md).
pub const FIXED_COST_MS: f64 = 20.0;
/// The 1 GiB checkpoint aim: near the tmpfs write limit (BENCHMARKS.md, "Our targets").
const GIB_CKPT_AIM_MS: f64 = 400.0;
/// Lazy restore of a 1 GiB program to its next output (BENCHMARKS.md, "Our targets").
const LAZY_GIB_MS: f64 = 50.0;
/// The stop of a forked checkpoint, whatever the size (BENCHMARKS.md, "Our targets").
const FORK_FROZEN_MS: f64 = 10.0;
/// Interposition target: a managed redis-server under redis-benchmark keeps at least this share
/// of its unmanaged throughput (BENCHMARKS.md, "Our targets").
pub const REDIS_RATIO_MIN: f64 = 0.98;
/// Start-up target: migrate-run adds less than this to the start of a program.
pub const STARTUP_ADDED_MS: f64 = 5.0;
/// Runs of one kind whose throughputs lie further apart than this (max/min - 1) were disturbed.
const NOISY_SPREAD: f64 = 0.10;

/// One tool at one size: medians of the successful measurements, and every run.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub ckpt_ms: Option<f64>,
    /// migrate only: the program's stop time, ordinary and with --fork.
    pub frozen_ms: Option<f64>,
    pub fork_frozen_ms: Option<f64>,
    pub fork_ckpt_ms: Option<f64>,
    pub image_bytes: Option<u64>,
    pub restore_ms: Option<f64>,
    pub lazy_restore_ms: Option<f64>,
    /// migrate only: an --incremental checkpoint on top of the first, and its image.
    pub incr_ckpt_ms: Option<f64>,
    pub incr_image_bytes: Option<u64>,
    pub failed_runs: usize,
    pub all_runs: Vec<RunResult>,
}

impl Summary {
    pub fn new(all_runs: Vec<RunResult>) -> Summary {
        let ckpt: Vec<f64> = all_runs.iter().filter_map(|r| r.ckpt_ms).collect();
        let image: Vec<f64> = all_runs.iter().filter_map(|r| r.image_bytes.map(|b| b as f64)).collect();
        let restore: Vec<f64> = all_runs.iter().filter_map(|r| r.restore_ms).collect();
        let lazy: Vec<f64> = all_runs.iter().filter_map(|r| r.lazy_restore_ms).collect();
        let pick = |f: fn(&RunResult) -> Option<f64>| median(all_runs.iter().filter_map(f).collect());
        Summary {
            lazy_restore_ms: median(lazy),
            ckpt_ms: median(ckpt),
            frozen_ms: pick(|r| r.frozen_ms),
            fork_frozen_ms: pick(|r| r.fork_frozen_ms),
            fork_ckpt_ms: pick(|r| r.fork_ckpt_ms),
            incr_ckpt_ms: pick(|r| r.incr_ckpt_ms),
            incr_image_bytes: pick(|r| r.incr_image_bytes.map(|b| b as f64)).map(|b| b.round() as u64),
            image_bytes: median(image).map(|b| b.round() as u64),
            restore_ms: median(restore),
            failed_runs: all_runs.iter().filter(|r| r.failed.is_some()).count(),
            all_runs,
        }
    }
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 })
}

#[derive(Clone, Debug, Serialize)]
pub struct SizeReport {
    pub size_mib: u64,
    pub migrate: Summary,
    /// Compressed images (`--compress`); None when not measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migrate_lz4: Option<Summary>,
    /// None when no usable criu was found.
    pub criu: Option<Summary>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub runs: Vec<SizeReport>,
    /// The overhead while running; None when not measured (`--no-overhead`).
    pub overhead: Option<OverheadReport>,
}

fn size_label(mib: u64) -> String {
    format!("{mib} MiB")
}

fn cell_ms(v: Option<f64>, failed: bool) -> String {
    match v {
        Some(v) => format!("{v:.1}"),
        None if failed => "FAILED".into(),
        None => "-".into(),
    }
}

fn cell_mb(v: Option<u64>, failed: bool) -> String {
    match v {
        Some(b) => format!("{:.1}", b as f64 / 1e6),
        None if failed => "FAILED".into(),
        None => "-".into(),
    }
}

fn met(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "MISSED"
    }
}

/// `ours` against `theirs` (smaller is better): "0.63x MET" or "1.20x MISSED".
fn ratio(ours: Option<f64>, theirs: Option<f64>) -> String {
    match (ours, theirs) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x {}", a / b, met(a <= b)),
        (None, _) => "FAILED".into(),
        _ => "n/a".into(),
    }
}

fn under(ours: Option<f64>, limit: f64) -> String {
    match ours {
        Some(v) => format!("{v:.1} ms {}", met(v < limit)),
        None => "FAILED".into(),
    }
}

impl Report {
    /// The table, the overhead section, the targets and the failures, for stdout.
    pub fn render(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        if self.runs.is_empty() {
            let _ = writeln!(s, "migrate benchmark — {}, {} cores, kernel {}", m.cpu, m.nproc, m.kernel);
        } else {
            self.render_sizes(&mut s);
        }
        if let Some(o) = &self.overhead {
            if !self.runs.is_empty() {
                let _ = writeln!(s);
            }
            render_overhead(o, &mut s);
        }
        s
    }

    /// The size table, its targets and its failures.
    fn render_sizes(&self, s: &mut String) {
        let m = &self.machine;
        let fs_note = if m.image_fs == "tmpfs" { "tmpfs".to_string() } else { format!("NOT tmpfs: {}", m.image_fs) };
        let _ = writeln!(
            s,
            "migrate benchmark — {}, {} cores, kernel {}, images on {} ({fs_note}), median of {}",
            m.cpu,
            m.nproc,
            m.kernel,
            m.image_dir.display(),
            m.runs_per_size
        );
        let _ = writeln!(
            s,
            "page cache {}; workload memory: {}; criu: {}",
            if m.drop_caches { "dropped before each measured operation" } else { "NOT dropped" },
            m.memory,
            m.criu
        );
        let w = self.runs.iter().map(|r| size_label(r.size_mib).len() + 1).max().unwrap_or(0).max(9);
        let _ = writeln!(
            s,
            "{:<w$}| {:>7} | {:>8} | {:>10} | {:>7} || {:>12} | {:>13} | {:>15}",
            "size", "ckpt ms", "image MB", "restore ms", "lazy ms", "criu ckpt ms", "criu image MB", "criu restore ms"
        );
        for row in &self.runs {
            let mf = row.migrate.failed_runs > 0;
            let (cc, ci, cr) = match &row.criu {
                Some(c) => {
                    let f = c.failed_runs > 0;
                    (cell_ms(c.ckpt_ms, f), cell_mb(c.image_bytes, f), cell_ms(c.restore_ms, f))
                }
                None => ("-".into(), "-".into(), "-".into()),
            };
            let _ = writeln!(
                s,
                "{:<w$}| {:>7} | {:>8} | {:>10} | {:>7} || {cc:>12} | {ci:>13} | {cr:>15}",
                size_label(row.size_mib),
                cell_ms(row.migrate.ckpt_ms, mf),
                cell_mb(row.migrate.image_bytes, mf),
                cell_ms(row.migrate.restore_ms, mf),
                cell_ms(row.migrate.lazy_restore_ms, mf),
            );
            if let Some(z) = &row.migrate_lz4 {
                let f = z.failed_runs > 0;
                let _ = writeln!(
                    s,
                    "{:<w$}| {:>7} | {:>8} | {:>10} || {:>12} | {:>13} | {:>15}",
                    " lz4",
                    cell_ms(z.ckpt_ms, f),
                    cell_mb(z.image_bytes, f),
                    cell_ms(z.restore_ms, f),
                    "",
                    "",
                    ""
                );
            }
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "modes (migrate): the stop of an ordinary checkpoint and of --fork (which writes the image in the \
             background), and an --incremental checkpoint right after the first (the workload's memory is unchanged)"
        );
        let _ = writeln!(
            s,
            "{:<w$}| {:>9} | {:>14} | {:>16} | {:>11} | {:>12}",
            "size", "frozen ms", "fork frozen ms", "fork complete ms", "incr ckpt ms", "incr image MB"
        );
        for row in &self.runs {
            let mig = &row.migrate;
            let mf = mig.failed_runs > 0;
            let _ = writeln!(
                s,
                "{:<w$}| {:>9} | {:>14} | {:>16} | {:>11} | {:>12}",
                size_label(row.size_mib),
                cell_ms(mig.frozen_ms, mf),
                cell_ms(mig.fork_frozen_ms, mf),
                cell_ms(mig.fork_ckpt_ms, mf),
                cell_ms(mig.incr_ckpt_ms, mf),
                cell_mb(mig.incr_image_bytes, mf),
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "targets:");
        for row in &self.runs {
            let _ = writeln!(s, "{:<w$}{}", size_label(row.size_mib), self.targets(row));
        }
        let failures: Vec<String> = self
            .runs
            .iter()
            .flat_map(|row| {
                let tools = [
                    ("migrate", Some(&row.migrate)),
                    ("migrate --compress", row.migrate_lz4.as_ref()),
                    ("criu", row.criu.as_ref()),
                ];
                tools.into_iter().filter_map(|(name, summary)| summary.map(|s| (name, s))).flat_map(move |(name, s)| {
                    s.all_runs.iter().enumerate().filter_map(move |(i, r)| {
                        r.failed
                            .as_ref()
                            .map(|why| format!("{name} {} run {}: FAILED: {}", size_label(row.size_mib), i + 1, why))
                    })
                })
            })
            .collect();
        if !failures.is_empty() {
            let _ = writeln!(s);
            for f in failures {
                let _ = writeln!(s, "{f}");
            }
        }
    }

    fn targets(&self, row: &SizeReport) -> String {
        let mig = &row.migrate;
        let mut parts = Vec::new();
        if row.size_mib == 1 {
            parts.push(format!(
                "fixed costs < {FIXED_COST_MS:.0} ms: ckpt {}, restore {}",
                under(mig.ckpt_ms, FIXED_COST_MS),
                under(mig.restore_ms, FIXED_COST_MS)
            ));
        }
        match &row.criu {
            Some(c) => parts.push(format!(
                "ckpt ≤ CRIU {}, image ≤ CRIU {}, restore ≤ CRIU {}",
                ratio(mig.ckpt_ms, c.ckpt_ms),
                ratio(mig.image_bytes.map(|b| b as f64), c.image_bytes.map(|b| b as f64)),
                ratio(mig.restore_ms, c.restore_ms)
            )),
            None if row.size_mib != 1 => parts.push("no CRIU beside: ratios not computed".into()),
            None => {}
        }
        if row.size_mib == 1024 {
            parts.push(format!(
                "aim ckpt ≤ {GIB_CKPT_AIM_MS:.0} ms (write limit): {}; lazy restore ≤ {LAZY_GIB_MS:.0} ms: {}",
                under(mig.ckpt_ms, GIB_CKPT_AIM_MS),
                under(mig.lazy_restore_ms, LAZY_GIB_MS)
            ));
        }
        if row.size_mib >= 64 {
            parts
                .push(format!("--fork frozen ≤ {FORK_FROZEN_MS:.0} ms: {}", under(mig.fork_frozen_ms, FORK_FROZEN_MS)));
        }
        if mig.failed_runs > 0 {
            parts.push(format!("{} of {} runs FAILED", mig.failed_runs, mig.all_runs.len()));
        }
        parts.join("; ")
    }
}

fn cell(v: Option<f64>, decimals: usize, failed: bool) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None if failed => "FAILED".into(),
        None => "-".into(),
    }
}

fn percent(v: Option<f64>) -> String {
    v.map(|r| format!("{:.1}%", r * 100.0)).unwrap_or_else(|| "-".into())
}

/// The overhead section: redis throughput, start-up times, their targets and failures.
fn render_overhead(o: &OverheadReport, s: &mut String) {
    let _ = writeln!(s, "overhead while running — warm caches, plain and managed alternating");
    let r = &o.redis;
    match &r.skipped {
        Some(why) => {
            let _ = writeln!(s, "redis: skipped: {why}");
        }
        None => {
            let p = &r.params;
            let pin = match p.pin {
                Some((server, client)) => format!("server on CPU {server}, client on CPU {client}"),
                None => "not pinned".into(),
            };
            let _ = writeln!(
                s,
                "redis: {} under redis-benchmark {} ({pin}); median of {} runs each",
                r.server,
                p.benchmark_args(),
                p.runs
            );
            let _ = writeln!(
                s,
                "{:<9}| {:>11} | {:>13} | {:>13} || {:>22} | {:>7}",
                "test", "plain req/s", "managed req/s", "managed/plain", "server CPU µs/req plain", "managed"
            );
            let (pf, mf) = (r.plain.failed_runs > 0, r.managed.failed_runs > 0);
            let rows = [
                ("SET", r.plain.set_rps, r.managed.set_rps, None, None),
                ("GET", r.plain.get_rps, r.managed.get_rps, None, None),
                (
                    "SET+GET",
                    r.plain.rps,
                    r.managed.rps,
                    r.plain.server_cpu_us_per_request,
                    r.managed.server_cpu_us_per_request,
                ),
            ];
            for (test, plain, managed, plain_cpu, managed_cpu) in rows {
                let share = plain.zip(managed).filter(|(p, _)| *p > 0.0).map(|(p, m)| m / p);
                let (pc, mc) = if test == "SET+GET" {
                    (cell(plain_cpu, 3, pf), cell(managed_cpu, 3, mf))
                } else {
                    (String::new(), String::new())
                };
                let _ = writeln!(
                    s,
                    "{test:<9}| {:>11} | {:>13} | {:>13} || {pc:>22} | {mc:>7}",
                    cell(plain, 0, pf),
                    cell(managed, 0, mf),
                    percent(share)
                );
            }
            let _ = writeln!(
                s,
                "runs' spread (max/min - 1): plain {}, managed {}",
                percent(r.plain.spread),
                percent(r.managed.spread)
            );
        }
    }
    let runs = o.startup.first().map_or(0, |st| st.runs);
    let _ = writeln!(s, "start-up: from spawning the program to its exit, median of {runs} runs each");
    let w = o.startup.iter().map(|st| st.label.len() + 1).max().unwrap_or(0).max(8);
    let _ = writeln!(s, "{:<w$}| {:>8} | {:>10} | {:>8}", "program", "plain ms", "managed ms", "added ms");
    for st in &o.startup {
        let f = st.failed.is_some();
        let _ = writeln!(
            s,
            "{:<w$}| {:>8} | {:>10} | {:>8}",
            st.label,
            cell(st.plain_ms, 2, f),
            cell(st.managed_ms, 2, f),
            cell(st.added_ms, 2, f)
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "overhead targets:");
    let mut redis = match (&r.skipped, r.ratio) {
        (Some(_), _) => "not measured (redis not installed)".to_string(),
        (None, Some(ratio)) => format!("{} {}", percent(Some(ratio)), met(ratio >= REDIS_RATIO_MIN)),
        (None, None) => "FAILED".into(),
    };
    // Throughput on a shared machine swings with the other load; say so, with the figure that
    // does not (much).
    let spread = r.plain.spread.into_iter().chain(r.managed.spread).fold(0.0f64, f64::max);
    if r.skipped.is_none() && spread > NOISY_SPREAD {
        let cpu = r.managed.server_cpu_us_per_request.zip(r.plain.server_cpu_us_per_request).map(|(m, p)| m / p);
        redis += &format!(
            " (runs spread up to {}: other load on the machine; server CPU per request, managed/plain: {})",
            percent(Some(spread)),
            percent(cpu)
        );
    }
    let _ = writeln!(s, "redis     managed throughput ≥ {:.0}% of plain: {redis}", REDIS_RATIO_MIN * 100.0);
    let startup: Vec<String> = o
        .startup
        .iter()
        .map(|st| match st.added_ms {
            Some(a) if st.failed.is_none() => format!("{} {a:.2} ms {}", st.label, met(a < STARTUP_ADDED_MS)),
            _ => format!("{} FAILED", st.label),
        })
        .collect();
    let _ = writeln!(s, "start-up  added < {STARTUP_ADDED_MS:.0} ms: {}", startup.join("; "));
    let mut failures: Vec<String> = r
        .all_runs
        .iter()
        .filter_map(|run| {
            let kind = if run.managed { "managed" } else { "plain" };
            run.failed.as_ref().map(|why| format!("redis {kind} run: FAILED: {why}"))
        })
        .collect();
    failures.extend(
        o.startup.iter().filter_map(|st| st.failed.as_ref().map(|why| format!("start-up {}: FAILED: {why}", st.label))),
    );
    if !failures.is_empty() {
        let _ = writeln!(s);
        for f in failures {
            let _ = writeln!(s, "{f}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
    }

    #[test]
    fn summary_skips_failed_measurements() {
        let ok = RunResult {
            ckpt_ms: Some(10.0),
            image_bytes: Some(100),
            restore_ms: Some(5.0),
            fork_frozen_ms: Some(2.0),
            ..Default::default()
        };
        let bad = RunResult {
            ckpt_ms: Some(30.0),
            image_bytes: Some(300),
            restore_ms: None,
            failed: Some("x".into()),
            ..Default::default()
        };
        let s = Summary::new(vec![ok.clone(), bad, ok]);
        assert_eq!(s.ckpt_ms, Some(10.0));
        assert_eq!(s.image_bytes, Some(100));
        assert_eq!(s.restore_ms, Some(5.0));
        assert_eq!(s.fork_frozen_ms, Some(2.0));
        assert_eq!(s.failed_runs, 1);
    }

    #[test]
    fn overhead_targets() {
        use crate::overhead::{RedisParams, RedisReport, RedisSummary, StartupReport};
        let summary = |rps: f64, spread: f64| RedisSummary {
            set_rps: Some(rps),
            get_rps: Some(rps),
            rps: Some(rps),
            server_cpu_us_per_request: Some(0.5),
            spread: Some(spread),
            failed_runs: 0,
        };
        let startup = |added: f64| StartupReport {
            label: "/bin/true".into(),
            program: "/bin/true".into(),
            plain_ms: Some(1.0),
            managed_ms: Some(1.0 + added),
            added_ms: Some(added),
            runs: 3,
            failed: None,
            all_plain_ms: vec![],
            all_managed_ms: vec![],
        };
        let report = |managed: f64, spread: f64, added: f64| {
            let mut s = String::new();
            let o = OverheadReport {
                redis: RedisReport {
                    skipped: None,
                    server: "redis-server 7".into(),
                    params: RedisParams { runs: 3, requests: 1000, pipeline: 16, clients: 50, pin: None },
                    plain: summary(100.0, spread),
                    managed: summary(managed, spread),
                    ratio: Some(managed / 100.0),
                    all_runs: vec![],
                },
                startup: vec![startup(added)],
            };
            render_overhead(&o, &mut s);
            s
        };
        let good = report(99.0, 0.01, 1.5);
        assert!(good.contains("≥ 98% of plain: 99.0% MET\n"), "{good}");
        assert!(good.contains("/bin/true 1.50 ms MET"), "{good}");
        let bad = report(90.0, 0.5, 6.0);
        assert!(bad.contains("90.0% MISSED (runs spread up to 50.0%"), "{bad}");
        assert!(bad.contains("managed/plain: 100.0%)"), "{bad}");
        assert!(bad.contains("/bin/true 6.00 ms MISSED"), "{bad}");
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(1.0), Some(2.0)), "0.50x MET");
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50x MISSED");
        assert_eq!(ratio(None, Some(2.0)), "FAILED");
        assert_eq!(ratio(Some(1.0), None), "n/a");
    }
}
