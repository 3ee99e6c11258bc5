//! Medians, the table, the targets and the JSON report.

use crate::measure::RunResult;
use crate::sys::Machine;
use serde::Serialize;
use std::fmt::Write as _;

/// Fixed-cost target (1 MiB program): checkpoint and resume each under this (BENCHMARKS.md).
pub const FIXED_COST_MS: f64 = 20.0;
/// The 1 GiB checkpoint aim: near the tmpfs write limit (BENCHMARKS.md, "Our targets").
const GIB_CKPT_AIM_MS: f64 = 400.0;

/// One tool at one size: medians of the successful measurements, and every run.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub ckpt_ms: Option<f64>,
    pub image_bytes: Option<u64>,
    pub restore_ms: Option<f64>,
    pub failed_runs: usize,
    pub all_runs: Vec<RunResult>,
}

impl Summary {
    pub fn new(all_runs: Vec<RunResult>) -> Summary {
        let ckpt: Vec<f64> = all_runs.iter().filter_map(|r| r.ckpt_ms).collect();
        let image: Vec<f64> = all_runs.iter().filter_map(|r| r.image_bytes.map(|b| b as f64)).collect();
        let restore: Vec<f64> = all_runs.iter().filter_map(|r| r.restore_ms).collect();
        Summary {
            ckpt_ms: median(ckpt),
            image_bytes: median(image).map(|b| b.round() as u64),
            restore_ms: median(restore),
            failed_runs: all_runs.iter().filter(|r| r.failed.is_some()).count(),
            all_runs,
        }
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
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
    /// None when no usable criu was found.
    pub criu: Option<Summary>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub runs: Vec<SizeReport>,
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

/// `ours` against `limit` (smaller is better): "0.63x ok" or "1.20x MISSED".
fn ratio(ours: Option<f64>, theirs: Option<f64>) -> String {
    match (ours, theirs) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x {}", a / b, if a <= b { "ok" } else { "MISSED" }),
        (None, _) => "FAILED".into(),
        _ => "n/a".into(),
    }
}

fn under(ours: Option<f64>, limit: f64) -> String {
    match ours {
        Some(v) => format!("{v:.1} ms {}", if v < limit { "ok" } else { "MISSED" }),
        None => "FAILED".into(),
    }
}

impl Report {
    /// The table, the targets and the failures, for stdout.
    pub fn render(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
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
            "page cache {}; criu: {}",
            if m.drop_caches { "dropped before each measured operation" } else { "NOT dropped" },
            m.criu
        );
        let w = self.runs.iter().map(|r| size_label(r.size_mib).len() + 1).max().unwrap_or(0).max(9);
        let _ = writeln!(
            s,
            "{:<w$}| {:>7} | {:>8} | {:>10} || {:>12} | {:>13} | {:>15}",
            "size", "ckpt ms", "image MB", "restore ms", "criu ckpt ms", "criu image MB", "criu restore ms"
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
                "{:<w$}| {:>7} | {:>8} | {:>10} || {cc:>12} | {ci:>13} | {cr:>15}",
                size_label(row.size_mib),
                cell_ms(row.migrate.ckpt_ms, mf),
                cell_mb(row.migrate.image_bytes, mf),
                cell_ms(row.migrate.restore_ms, mf),
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
                let tools = [("migrate", Some(&row.migrate)), ("criu", row.criu.as_ref())];
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
        s
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
                "aim ckpt ≤ {GIB_CKPT_AIM_MS:.0} ms (write limit): {}",
                under(mig.ckpt_ms, GIB_CKPT_AIM_MS)
            ));
        }
        if mig.failed_runs > 0 {
            parts.push(format!("{} of {} runs FAILED", mig.failed_runs, mig.all_runs.len()));
        }
        parts.join("; ")
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
        let ok = RunResult { ckpt_ms: Some(10.0), image_bytes: Some(100), restore_ms: Some(5.0), failed: None };
        let bad = RunResult { ckpt_ms: Some(30.0), image_bytes: Some(300), restore_ms: None, failed: Some("x".into()) };
        let s = Summary::new(vec![ok.clone(), bad, ok]);
        assert_eq!(s.ckpt_ms, Some(10.0));
        assert_eq!(s.image_bytes, Some(100));
        assert_eq!(s.restore_ms, Some(5.0));
        assert_eq!(s.failed_runs, 1);
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(1.0), Some(2.0)), "0.50x ok");
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50x MISSED");
        assert_eq!(ratio(None, Some(2.0)), "FAILED");
        assert_eq!(ratio(Some(1.0), None), "n/a");
    }
}
