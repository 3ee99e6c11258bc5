//! Forked checkpoints (`migrate-checkpoint --fork`, `migrate-run --interval … --fork`): the
//! program is stopped only while it is described; a writer child per process writes the image
//! from a copy-on-write snapshot while the program runs on, and the image holds the state of
//! the freeze, not a later one.
//!
//! examples/c/forked.c changes its heap, its shared memory (shared with its child, and its
//! own), a deleted file and a pipe to its child only when told to (a line on stdin), and the
//! same state always prints the same lines: so a test knows exactly which state a checkpoint
//! saw, and a resumed copy must print, for the next tick, exactly the line the original
//! printed for it.

use migrate_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Starts examples/c/forked.c under migrate-run (with `env` set) and waits until it (and its
/// child) are ready.
fn start(dir: &Path, mib: u32, children: u32, extra_run: &[&str], env: &[(&str, &str)]) -> Managed {
    let mut cmd = Command::new(bin("migrate-run"));
    cmd.arg("--ckpt-dir").arg(dir).args(extra_run).arg("--").arg(cbin("forked"));
    cmd.arg(mib.to_string()).arg(children.to_string()).arg(dir);
    cmd.envs(env.iter().copied());
    let mut p = Managed::spawn("forked", cmd);
    p.wait_line("ready ", STARTUP);
    if children > 0 {
        p.wait_line_seen("child-ready ", STARTUP);
    }
    p
}

/// Makes tick `n` and returns its line.
fn tick(p: &mut Managed, n: u64) -> String {
    p.send_line("go");
    let prefix = format!("tick {n} ");
    let line = p.wait_line_seen(|l: &str| l.starts_with(&prefix), LINE);
    assert!(line.contains(" wait="), "{line}");
    line
}

/// The child's line for record `k` (printed at tick k+1).
fn child_line(p: &mut Managed, k: u64) -> String {
    let prefix = format!("child {k} ");
    let line = p.wait_line_seen(|l: &str| l.starts_with(&prefix), LINE);
    assert!(line.ends_with(" rec=ok"), "the record in flight came through intact: {line}");
    line
}

fn checkpoint_cmd(pid: i32, dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin("migrate-checkpoint"));
    cmd.args(extra).arg("--dir").arg(dir).arg(pid.to_string());
    cmd
}

fn image_of(out: &str) -> PathBuf {
    let last = out.lines().rev().map(str::trim).find(|l| !l.is_empty()).expect("an image path");
    let path = PathBuf::from(last);
    assert!(path.is_file(), "{} is not a file", path.display());
    path
}

/// The frozen time migrate-checkpoint reports on stderr.
fn frozen_ms(line: &str) -> u64 {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "frozen").expect("a frozen line");
    words[at + 1].parse().unwrap_or_else(|_| panic!("no frozen time in {line:?}"))
}

/// Children made by threads of `pid` other than its main thread: libmigrate's writer children
/// (the checkpoint thread makes them; the program's own children come from its main thread).
fn writers_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        if tid == pid.to_string() {
            continue;
        }
        let kids = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(kids.split_whitespace().filter_map(|k| k.parse::<i32>().ok()));
    }
    out
}

fn state_of(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().next()?.chars().next()
}

/// Waits (bounded) for the writer child of `pid` that stopped itself (MIGRATE_TEST_STOP_WRITER).
fn stopped_writer(pid: i32) -> i32 {
    let deadline = Instant::now() + LINE;
    loop {
        if let Some(&w) = writers_of(pid).iter().find(|&&w| state_of(w) == Some('T')) {
            return w;
        }
        assert!(Instant::now() < deadline, "no stopped writer child of process {pid} appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with plain integers.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
}

/// Nothing but finished images in `dir`: no temporary image left behind.
fn assert_no_temporary(dir: &Path) {
    let tmp: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "temporary images left: {tmp:?}");
}

#[test]
fn the_program_runs_on_while_its_image_is_written_and_resumes_at_the_freeze() {
    let tmp = temp_dir();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let mut p = start(&dir, 32, 0, &[], &[("MIGRATE_TEST_STOP_WRITER", "1")]);
    let pid = p.pid();
    for n in 1..=3 {
        tick(&mut p, n);
    }
    let mut ck = Managed::spawn("migrate-checkpoint", checkpoint_cmd(pid, &dir, &["--fork"]));
    let frozen = ck.wait_stderr_line(|l: &str| l.contains(" frozen "), CKPT);
    frozen_ms(&frozen);
    // The image is not written yet: its writer stopped itself before writing anything. The
    // program runs on and changes every page of its heap, its shared memory and its deleted
    // file meanwhile; the writer is no child its wait() sees.
    let writer = stopped_writer(pid);
    let later: Vec<String> = (4..=5).map(|n| tick(&mut p, n)).collect();
    assert!(later.iter().all(|l| l.ends_with(" wait=-1")), "the writer child is invisible to waitpid: {later:?}");
    assert!(ck.try_exit().is_none(), "migrate-checkpoint is still waiting for the image");
    assert!(images_in(&dir).is_empty(), "no image yet");
    signal(writer, libc::SIGCONT);
    let status = ck.wait_exit(CKPT);
    let out = ck.lines_so_far().join("\n");
    assert!(status.success(), "migrate-checkpoint --fork failed: {}", ck.report());
    let image = image_of(&out);
    assert_no_temporary(&dir);
    // The writer is gone (reaped), and the program goes on.
    assert!(writers_of(pid).is_empty(), "the writer child was reaped: {:?}", writers_of(pid));
    tick(&mut p, 6);
    p.kill();

    // The image holds the state after tick 3: the resumed copy prints what the original
    // printed for ticks 4 and 5 — not the state the program had when the writer wrote.
    let mut r = resume(&image);
    for (n, want) in (4..=5).zip(&later) {
        let got = tick(&mut r, n);
        assert_eq!(&got, want, "tick {n} after the resume continues from the freeze");
    }
    r.kill();
}

#[test]
fn a_tree_with_a_pipe_in_flight_and_shared_memory_resumes_at_the_freeze() {
    let tmp = temp_dir();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let mut p = start(&dir, 8, 1, &[], &[]);
    let pid = p.pid();
    for n in 1..=3 {
        tick(&mut p, n);
    }
    child_line(&mut p, 2);
    let out = run_tool("migrate-checkpoint", checkpoint_cmd(pid, &dir, &["--fork"]), CKPT);
    assert!(out.status.success(), "migrate-checkpoint --fork failed: {}", out.describe());
    assert!(out.stderr.contains(" frozen "), "the frozen time is reported: {}", out.describe());
    let image = image_of(&out.stdout);
    assert_no_temporary(&dir);
    // After the release: record 3 is read from the pipe, both processes change their memory.
    let original = [tick(&mut p, 4), child_line(&mut p, 3), tick(&mut p, 5), child_line(&mut p, 4)];
    p.kill();

    let mut r = resume(&image);
    let resumed = [tick(&mut r, 4), child_line(&mut r, 3), tick(&mut r, 5), child_line(&mut r, 4)];
    assert_eq!(resumed, original, "the tree resumes at the freeze, record 3 still in the pipe");
    r.kill();
}

/// The sequence number of an image `<name>-<vpid>-<n>.mig`.
fn sequence(image: &Path) -> u64 {
    let stem = image.file_stem().unwrap().to_string_lossy().into_owned();
    stem.rsplit('-').next().unwrap().parse().unwrap()
}

#[test]
fn periodic_forked_checkpoints_resume() {
    let tmp = temp_dir();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let keep = dir.join("keep");
    std::fs::create_dir(&keep).unwrap();
    let mut p = start(&dir, 8, 1, &["--interval", "1", "--keep", "2", "--fork"], &[]);
    for n in 1..=3 {
        tick(&mut p, n);
    }
    child_line(&mut p, 2);
    // An image taken wholly after tick 3: two sequence numbers past the newest one now.
    let newest = |dir: &Path| images_in(dir).iter().map(|i| sequence(i)).max().unwrap_or(0);
    let after = newest(&dir) + 2;
    let deadline = Instant::now() + STARTUP;
    let image = loop {
        if let Some(i) = images_in(&dir).into_iter().find(|i| sequence(i) >= after) {
            break i;
        }
        assert!(Instant::now() < deadline, "no periodic image appeared: {:?}", images_in(&dir));
        std::thread::sleep(Duration::from_millis(20));
    };
    // Kept aside: the period goes on pruning.
    let kept = keep.join(image.file_name().unwrap());
    std::fs::hard_link(&image, &kept).unwrap();
    assert!(images_in(&dir).len() <= 2, "the newest two are kept: {:?}", images_in(&dir));
    assert_no_temporary(&dir);
    let original = [tick(&mut p, 4), child_line(&mut p, 3)];
    assert!(p.try_exit().is_none(), "the program keeps running");
    p.kill();

    let mut r = resume(&kept);
    let resumed = [tick(&mut r, 4), child_line(&mut r, 3)];
    assert_eq!(resumed, original, "a periodic forked image resumes at its freeze");
    // The resumed program goes on with forked periodic checkpoints.
    let last = newest(&dir);
    let deadline = Instant::now() + STARTUP;
    while newest(&dir) <= last {
        assert!(Instant::now() < deadline, "the resumed program wrote no periodic image");
        std::thread::sleep(Duration::from_millis(20));
    }
    r.kill();
}

#[test]
fn a_killed_writer_fails_the_checkpoint_and_the_program_goes_on() {
    let tmp = temp_dir();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let mut p = start(&dir, 4, 0, &[], &[("MIGRATE_TEST_STOP_WRITER", "1")]);
    let pid = p.pid();
    tick(&mut p, 1);
    let mut ck = Managed::spawn("migrate-checkpoint", checkpoint_cmd(pid, &dir, &["--fork"]));
    ck.wait_stderr_line(|l: &str| l.contains(" frozen "), CKPT);
    signal(stopped_writer(pid), libc::SIGKILL);
    let status = ck.wait_exit(CKPT);
    assert_eq!(status.code(), Some(6), "a failed checkpoint: {}", ck.report());
    let err = ck.stderr_so_far().join("\n");
    assert!(err.contains("killed by signal 9") && err.contains("checkpoint again"), "{err}");
    assert!(images_in(&dir).is_empty(), "no image: {:?}", images_in(&dir));
    assert_no_temporary(&dir);
    // The program goes on, and checkpoints again (no writer is left over).
    tick(&mut p, 2);
    let image = checkpoint(pid, false, &dir);
    let line = tick(&mut p, 3);
    p.kill();
    let mut r = resume(&image);
    assert_eq!(tick(&mut r, 3), line);
    r.kill();
}

#[test]
fn fork_with_kill_or_to_is_refused() {
    let kill = run_tool(
        "migrate-checkpoint",
        {
            let mut c = Command::new(bin("migrate-checkpoint"));
            c.args(["--fork", "--kill", "1"]);
            c
        },
        QUICK,
    );
    kill.assert_fails("--fork --kill", 2, &["--fork", "--kill"]);
    let to = run_tool(
        "migrate-checkpoint",
        {
            let mut c = Command::new(bin("migrate-checkpoint"));
            c.args(["--fork", "--to", "127.0.0.1:9", "1"]);
            c
        },
        QUICK,
    );
    to.assert_fails("--fork --to", 2, &["--fork", "--to"]);
}

#[test]
fn a_full_disk_fails_the_forked_checkpoint_and_leaves_nothing() {
    if !is_root() {
        println!("SKIP: a_full_disk_fails_the_forked_checkpoint_and_leaves_nothing needs root (tmpfs mount)");
        return;
    }
    let tmp = temp_dir();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let mnt = dir.join("small");
    let mount = match TmpfsMount::new(&mnt, "size=4m") {
        Ok(m) => m,
        Err(e) => {
            println!("SKIP: a_full_disk_fails_the_forked_checkpoint_and_leaves_nothing: {e}");
            return;
        }
    };
    let mut p = start(&dir, 16, 0, &[], &[]);
    let pid = p.pid();
    tick(&mut p, 1);
    let out = run_tool("migrate-checkpoint", checkpoint_cmd(pid, mount.path(), &["--fork"]), CKPT);
    out.assert_fails("a forked checkpoint into a full filesystem", 6, &["no space left"]);
    let left: Vec<_> = std::fs::read_dir(mount.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "nothing left behind: {left:?}");
    // The program was released before the writer failed, and goes on.
    tick(&mut p, 2);
    p.kill();
}

#[test]
fn a_program_that_exits_during_the_write_leaves_nothing_behind() {
    let tmp = temp_dir();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let mut p = start(&dir, 4, 0, &[], &[("MIGRATE_TEST_STOP_WRITER", "1")]);
    let pid = p.pid();
    tick(&mut p, 1);
    let mut ck = Managed::spawn("migrate-checkpoint", checkpoint_cmd(pid, &dir, &["--fork"]));
    ck.wait_stderr_line(|l: &str| l.contains(" frozen "), CKPT);
    let writer = stopped_writer(pid);
    // The program ends (end of its input) while its image is being written.
    p.close_stdin();
    assert!(p.wait_exit(LINE).success(), "the program ends normally: {}", p.report());
    let status = ck.wait_exit(CKPT);
    assert_eq!(status.code(), Some(6), "the checkpoint is lost: {}", ck.report());
    // Its writer died with it, and no image, temporary or not, is left.
    let deadline = Instant::now() + LINE;
    while state_of(writer).is_some_and(|s| s != 'Z') {
        assert!(Instant::now() < deadline, "the writer child {writer} outlived the program");
        std::thread::sleep(Duration::from_millis(5));
    }
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "nothing left behind: {left:?}");
}
