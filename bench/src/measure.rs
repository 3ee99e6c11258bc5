//! One measured run: checkpoint (left running), image size, restore to the next output line;
//! under migrate, and under CRIU.

use crate::proc::{self, Detach, Group};
use crate::sys;
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

/// The workload program, compiled by build.rs.
pub const WORKLOAD: &str = env!("MIGRATE_BENCH_WORKLOAD");

/// Bound on the wait for the next output line after a restore.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the wait for a dumped/killed workload to be gone.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Polling period of the output file.
const POLL: Duration = Duration::from_millis(1);
/// The workload's period, plus a margin. A restore starts at least this long after the killing
/// checkpoint returned, so that the program's pending 100 ms deadline has passed: its next line
/// is then due at once, and the time to it measures the restore, not the rest of a period.
const SETTLE: Duration = Duration::from_millis(110);

/// Bound on filling the buffer, or on writing or reading an image, for `mib` MiB.
fn size_timeout(mib: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_millis(50) * u32::try_from(mib).unwrap_or(u32::MAX)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The outcome of one run of one tool; what was measured before a failure is kept.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ckpt_ms: Option<f64>,
    /// How long the program was stopped by that checkpoint (migrate-checkpoint's figure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen_ms: Option<f64>,
    /// The same with `--fork`: stopped only while described, the image written meanwhile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fork_frozen_ms: Option<f64>,
    /// The whole `--fork` checkpoint, until its image is published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fork_ckpt_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_ms: Option<f64>,
    /// The same resume with `--lazy` (migrate only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_restore_ms: Option<f64>,
    /// An `--incremental` checkpoint right after the first one, and its image (migrate only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incr_ckpt_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incr_image_bytes: Option<u64>,
    /// Why the run failed (a wrong line after restore is a correctness failure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// The migrate commands.
pub struct Bins {
    pub run: PathBuf,
    pub checkpoint: PathBuf,
    pub resume: PathBuf,
}

impl Bins {
    pub fn locate(dir: &Path) -> Result<Bins> {
        let find = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            ensure!(
                p.is_file(),
                "{} not found: build with cargo build --release first (or point --bin-dir at the directory holding \
                 migrate-run, migrate-checkpoint and migrate-resume)",
                p.display()
            );
            Ok(p)
        };
        Ok(Bins { run: find("migrate-run")?, checkpoint: find("migrate-checkpoint")?, resume: find("migrate-resume")? })
    }
}

/// What every run needs.
pub struct Bench<'a> {
    /// The workload's memory: "random" (incompressible) or "mixed" (see workload.c).
    pub memory: &'a str,
    pub bins: &'a Bins,
    /// The work directory (tmpfs): images, output files, logs.
    pub dir: &'a Path,
    pub drop_caches: bool,
    /// A criu that passed `criu check`.
    pub criu: Option<&'a Path>,
}

impl Bench<'_> {
    fn before_measure(&self) -> Result<()> {
        if self.drop_caches {
            sys::drop_caches()?;
        }
        Ok(())
    }

    /// One run under migrate; with `compress`, both checkpoints are `--compress`.
    pub fn migrate_run(&self, mib: u64, run: u32, compress: bool) -> RunResult {
        let mut result = RunResult::default();
        let tag = format!("migrate{}-{mib}-{run}", if compress { "-lz4" } else { "" });
        if let Err(e) = self.migrate_inner(mib, &tag, compress, &mut result) {
            result.failed = Some(format!("{e:#}"));
        }
        self.remove_run_files(&tag);
        result
    }

    /// One run under CRIU; `self.criu` must be set.
    pub fn criu_run(&self, mib: u64, run: u32) -> RunResult {
        let mut result = RunResult::default();
        let tag = format!("criu-{mib}-{run}");
        if let Err(e) = self.criu_inner(mib, &tag, &mut result) {
            result.failed = Some(format!("{e:#}"));
        }
        self.remove_run_files(&tag);
        result
    }

    fn path(&self, tag: &str, what: &str) -> PathBuf {
        self.dir.join(format!("{tag}.{what}"))
    }

    /// Removes what a run left in the work directory (all its names start with the tag).
    fn remove_run_files(&self, tag: &str) {
        let Ok(entries) = std::fs::read_dir(self.dir) else { return };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&format!("{tag}.")) {
                if let Err(e) = sys::remove_path(&entry.path()) {
                    eprintln!("migrate-bench: warning: {e:#}");
                }
            }
        }
    }

    fn migrate_inner(&self, mib: u64, tag: &str, compress: bool, result: &mut RunResult) -> Result<()> {
        let lz4: &[&str] = if compress { &["--compress"] } else { &[] };
        let out = self.path(tag, "out");
        let images = self.path(tag, "images");
        std::fs::create_dir(&images).with_context(|| format!("cannot create {}", images.display()))?;

        // 1. The workload under migrate-run, its stdout piped.
        let run_log = self.path(tag, "run.log");
        let mut cmd = Command::new(&self.bins.run);
        cmd.arg("--ckpt-dir")
            .arg(&images)
            .arg("--")
            .arg(WORKLOAD)
            .arg(mib.to_string())
            .arg(&out)
            .arg(self.memory)
            .env("MIGRATE_LOG", "quiet")
            .stdout(Stdio::piped())
            .stderr(log_file(&run_log)?);
        let (mut workload, stdout, _) = Group::spawn(&mut cmd, "migrate-run workload", Detach::Group)?;
        let stdout = stdout.context("no stdout pipe")?;
        wait_ready_pipe(stdout, &mut workload, mib, &run_log)?;
        let pid = workload.pid().to_string();

        // 2. Checkpoint, left running.
        self.before_measure()?;
        let ckpt = proc::run(
            Command::new(&self.bins.checkpoint).args(lz4).arg(&pid),
            "migrate-checkpoint",
            size_timeout(mib),
        )?
        .check(&format!("migrate-checkpoint {pid}"))?;
        let image = image_path(&ckpt.stdout)?;
        result.ckpt_ms = Some(ms(ckpt.elapsed));
        result.frozen_ms = frozen_of(&ckpt.stderr);
        result.image_bytes = Some(sys::size_of_path(&image)?);

        // 2a. An incremental checkpoint on top of it (the workload changed only its counter
        //     since): every page is read and hashed, the unchanged ones are not written.
        if lz4.is_empty() {
            self.before_measure()?;
            let incr = proc::run(
                Command::new(&self.bins.checkpoint).arg("--incremental").arg(&pid),
                "migrate-checkpoint --incremental",
                size_timeout(mib),
            )?
            .check(&format!("migrate-checkpoint --incremental {pid}"))?;
            let incr_image = image_path(&incr.stdout)?;
            result.incr_ckpt_ms = Some(ms(incr.elapsed));
            result.incr_image_bytes = Some(sys::size_of_path(&incr_image)?);
            sys::remove_path(&incr_image)?;
        }
        sys::remove_path(&image)?;

        // 2b. The same with --fork: the program is stopped only while it is described.
        self.before_measure()?;
        let fork = proc::run(
            Command::new(&self.bins.checkpoint).arg("--fork").arg(&pid),
            "migrate-checkpoint --fork",
            size_timeout(mib),
        )?
        .check(&format!("migrate-checkpoint --fork {pid}"))?;
        result.fork_ckpt_ms = Some(ms(fork.elapsed));
        result.fork_frozen_ms = frozen_of(&fork.stderr);
        sys::remove_path(&image_path(&fork.stdout)?)?;

        // 3. Checkpoint and kill (not timed), then resume, timed to the next line.
        let kill = proc::run(
            Command::new(&self.bins.checkpoint).args(lz4).arg("--kill").arg(&pid),
            "migrate-checkpoint --kill",
            size_timeout(mib),
        )?
        .check(&format!("migrate-checkpoint --kill {pid}"))?;
        let settled = Instant::now() + SETTLE;
        let image = image_path(&kill.stdout)?;
        workload.wait(EXIT_TIMEOUT).context("after migrate-checkpoint --kill")?;
        drop(workload);

        std::thread::sleep(settled.saturating_duration_since(Instant::now()));
        self.before_measure()?;
        let (offset, last) = last_counter(&out)?;
        // What the output file was at the checkpoint, put back for the lazy resume.
        let saved = std::fs::read(&out).with_context(|| format!("cannot read {}", out.display()))?;
        let mtime = std::fs::metadata(&out).and_then(|m| m.modified()).context("cannot stat the output file")?;
        result.restore_ms = Some(self.timed_resume(&image, &out, tag, offset, last, false)?);

        // 4. The same image resumed with --lazy, timed the same way, once the output file is
        //    back as it was (contents and mtime: migrate-resume checks both).
        let file = std::fs::File::create(&out).with_context(|| format!("cannot rewrite {}", out.display()))?;
        std::io::Write::write_all(&mut &file, &saved).context("cannot rewrite the output file")?;
        file.set_modified(mtime).context("cannot set the output file's mtime")?;
        drop(file);
        self.before_measure()?;
        result.lazy_restore_ms = Some(self.timed_resume(&image, &out, tag, offset, last, true)?);
        Ok(())
    }

    /// Resumes `image` (with `--lazy` if asked), timed from the command to the program's next
    /// line in `out` after `offset`, which must continue the count from `last`; then ends it.
    fn timed_resume(&self, image: &Path, out: &Path, tag: &str, offset: u64, last: u64, lazy: bool) -> Result<f64> {
        let resume_log = self.path(tag, if lazy { "resume-lazy.log" } else { "resume.log" });
        let mut cmd = Command::new(&self.bins.resume);
        // The host's clocks, as under CRIU: by default the resumed program's CLOCK_MONOTONIC
        // continues from the checkpoint (a time namespace), so its pending 100 ms deadline
        // would still lie ahead by the rest of the period, and the time to its next line would
        // measure that rest, not the restore.
        cmd.arg("--host-clocks");
        if lazy {
            cmd.arg("--lazy");
        }
        cmd.arg(image).env("MIGRATE_LOG", "quiet").stdout(Stdio::null()).stderr(log_file(&resume_log)?);
        let start = Instant::now();
        let (mut resumed, _, _) = Group::spawn(&mut cmd, "migrate-resume", Detach::Group)?;
        let (line, seen) = wait_next_line(out, offset, || match resumed.try_status()? {
            Some(status) => bail!(
                "migrate-resume {} exited ({status}) before the program wrote its next line; stderr:\n{}",
                image.display(),
                proc::log_tail(&resume_log)
            ),
            None => Ok(()),
        })?;
        check_next(line, last)?;
        Ok(ms(seen.saturating_duration_since(start)))
    }

    fn criu_inner(&self, mib: u64, tag: &str, result: &mut RunResult) -> Result<()> {
        let criu = self.criu.context("no usable criu")?;
        let out = self.path(tag, "out");
        let dump_dir = self.path(tag, "dump");
        let kill_dir = self.path(tag, "dump-kill");
        for d in [&dump_dir, &kill_dir] {
            std::fs::create_dir(d).with_context(|| format!("cannot create {}", d.display()))?;
        }

        // 1. The workload started directly, in its own session. Its stdout goes to a file
        //    rather than a pipe: a pipe to a process outside the dumped tree is an external
        //    resource to CRIU, a regular file is not.
        let ready_file = self.path(tag, "stdout");
        let workload_log = self.path(tag, "stderr");
        let mut cmd = Command::new(WORKLOAD);
        cmd.arg(mib.to_string())
            .arg(&out)
            .arg(self.memory)
            .stdout(log_file(&ready_file)?)
            .stderr(log_file(&workload_log)?);
        let (mut workload, _, _) = Group::spawn(&mut cmd, "workload (for CRIU)", Detach::Session)?;
        wait_ready_file(&ready_file, &mut workload, mib, &workload_log)?;
        let pid = workload.pid().to_string();

        // 2. Dump, left running; the image size as `du -sb` gives it.
        self.before_measure()?;
        let dump = proc::run(
            Command::new(criu).args(["dump", "-t", &pid, "-D"]).arg(&dump_dir).args(["--shell-job", "--leave-running"]),
            "criu dump --leave-running",
            size_timeout(mib),
        )?
        .check("criu dump --leave-running")?;
        result.ckpt_ms = Some(ms(dump.elapsed));
        let du = proc::run(Command::new("du").arg("-sb").arg(&dump_dir), "du -sb", Duration::from_secs(30))?
            .check("du -sb")?;
        let bytes = du.stdout.split_whitespace().next().and_then(|n| n.parse().ok());
        result.image_bytes =
            Some(bytes.with_context(|| format!("cannot parse the output of du -sb: {:?}", du.stdout))?);
        sys::remove_path(&dump_dir)?;

        // 3. Dump and kill (not timed), then restore, timed to the next line.
        proc::run(
            Command::new(criu).args(["dump", "-t", &pid, "-D"]).arg(&kill_dir).arg("--shell-job"),
            "criu dump",
            size_timeout(mib),
        )?
        .check("criu dump")?;
        let settled = Instant::now() + SETTLE;
        // Reap it: CRIU restores the program with its old pid, which must be free.
        workload.wait(EXIT_TIMEOUT).context("after criu dump")?;

        std::thread::sleep(settled.saturating_duration_since(Instant::now()));
        self.before_measure()?;
        let (offset, last) = last_counter(&out)?;
        let restore_log = self.path(tag, "restore.log");
        let mut cmd = Command::new(criu);
        cmd.args(["restore", "-D"])
            .arg(&kill_dir)
            .args(["--shell-job", "--restore-detached"])
            .stdout(Stdio::null())
            .stderr(log_file(&restore_log)?);
        let start = Instant::now();
        let (mut restore, _, _) = Group::spawn(&mut cmd, "criu restore", Detach::Group)?;
        let (line, seen) = wait_next_line(&out, offset, || match restore.try_status()? {
            Some(status) if !status.success() => {
                bail!("criu restore failed ({status}); stderr:\n{}", proc::log_tail(&restore_log))
            }
            _ => Ok(()),
        })?;
        check_next(line, last)?;
        result.restore_ms = Some(ms(seen.saturating_duration_since(start)));
        let (status, _) = restore.wait(EXIT_TIMEOUT)?;
        ensure!(status.success(), "criu restore failed ({status}); stderr:\n{}", proc::log_tail(&restore_log));
        // `workload` is dropped last: it kills its process group, which the restored program
        // has taken back.
        drop(restore);
        drop(workload);
        Ok(())
    }
}

fn log_file(path: &Path) -> Result<File> {
    File::create(path).with_context(|| format!("cannot create {}", path.display()))
}

/// The frozen time in migrate-checkpoint's `… frozen <ms> ms` line on stderr.
fn frozen_of(stderr: &str) -> Option<f64> {
    stderr.lines().find_map(|l| l.split_once(" frozen ")?.1.strip_suffix(" ms")?.trim().parse().ok())
}

/// The image path: the last line migrate-checkpoint printed.
fn image_path(stdout: &str) -> Result<PathBuf> {
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty());
    Ok(PathBuf::from(line.context("migrate-checkpoint printed no image path")?.trim()))
}

/// Waits for the workload to print "ready" on its piped stdout.
fn wait_ready_pipe(stdout: std::process::ChildStdout, workload: &mut Group, mib: u64, log: &Path) -> Result<()> {
    let lines = proc::line_reader(stdout);
    let deadline = Instant::now() + size_timeout(mib);
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line == "ready" => return Ok(()),
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => {
                bail!("the workload did not print ready within {:.0} s", size_timeout(mib).as_secs_f64())
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status =
                    workload.wait(EXIT_TIMEOUT).map(|(s, _)| s.to_string()).unwrap_or_else(|e| format!("{e:#}"));
                bail!("the workload exited ({status}) before printing ready; stderr:\n{}", proc::log_tail(log))
            }
        }
    }
}

/// Waits for the workload to write "ready" into `stdout_file`.
fn wait_ready_file(stdout_file: &Path, workload: &mut Group, mib: u64, log: &Path) -> Result<()> {
    let deadline = Instant::now() + size_timeout(mib);
    loop {
        let text = std::fs::read_to_string(stdout_file).unwrap_or_default();
        if text.lines().any(|l| l == "ready") {
            return Ok(());
        }
        if let Some(status) = workload.try_status()? {
            bail!("the workload exited ({status}) before printing ready; stderr:\n{}", proc::log_tail(log));
        }
        if Instant::now() > deadline {
            bail!("the workload did not print ready within {:.0} s", size_timeout(mib).as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The length of the complete lines of the output file, and the last counter in it (0 if none).
fn last_counter(path: &Path) -> Result<(u64, u64)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let text = std::str::from_utf8(&bytes[..complete]).context("the output file is not text")?;
    let last = match text.lines().last() {
        Some(line) => line.parse().with_context(|| format!("bad line {line:?} in {}", path.display()))?,
        None => 0,
    };
    Ok((complete as u64, last))
}

/// Polls the output file every millisecond until a complete line appears after `offset`;
/// returns that line and when it was seen. `alive` is called between polls and fails if the
/// restoring process died.
fn wait_next_line(path: &Path, offset: u64, mut alive: impl FnMut() -> Result<()>) -> Result<(String, Instant)> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    let mut buf = Vec::new();
    loop {
        let len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
        if len < offset {
            bail!("{} shrank from {offset} to {len} bytes", path.display());
        }
        if len > offset {
            let seen = Instant::now();
            buf.resize((len - offset) as usize, 0);
            let n = file.read_at(&mut buf, offset).with_context(|| format!("cannot read {}", path.display()))?;
            if let Some(end) = buf[..n].iter().position(|&b| b == b'\n') {
                return Ok((String::from_utf8_lossy(&buf[..end]).into_owned(), seen));
            }
        }
        alive()?;
        if Instant::now() > deadline {
            bail!("no new line in {} within {:.0} s of the restore", path.display(), RESTORE_TIMEOUT.as_secs_f64());
        }
        std::thread::sleep(POLL);
    }
}

/// The correctness check: the first line after the restore continues the count.
fn check_next(line: String, last: u64) -> Result<()> {
    let expected = last + 1;
    match line.parse::<u64>() {
        Ok(n) if n == expected => Ok(()),
        _ => bail!("correctness: the restored program wrote {line:?} after {last}; expected {expected}"),
    }
}
