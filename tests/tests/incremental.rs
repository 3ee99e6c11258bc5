//! Incremental checkpoints: `migrate-checkpoint --incremental` stores only the pages that
//! changed since the program's newest image (its parent); the rest are named in the chain of
//! ancestors, which migrate-resume and migrate-inspect follow. Periodic checkpoints can be
//! incremental too (`migrate-run --interval … --incremental`), and pruning keeps the ancestors
//! that kept images still use.

use migrate_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `migrate-checkpoint EXTRA… --dir DIR PID`, asserting success; the image path.
#[track_caller]
fn checkpoint_with(pid: i32, extra: &[&str], dir: &Path) -> PathBuf {
    let mut cmd = Command::new(bin("migrate-checkpoint"));
    cmd.args(extra).arg("--dir").arg(dir).arg(pid.to_string());
    let out = run_tool("migrate-checkpoint", cmd, CKPT);
    assert!(out.status.success(), "migrate-checkpoint {extra:?} {pid} failed: {}", out.describe());
    let path = PathBuf::from(out.stdout.lines().rev().map(str::trim).find(|l| !l.is_empty()).expect("an image path"));
    assert!(path.is_file(), "{} is not a file: {}", path.display(), out.describe());
    path
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// The tick after `n` (ticks are printed every few ms: wait for a later one).
fn wait_past(p: &mut Managed, n: u64) -> u64 {
    loop {
        let t = tick_number(&p.wait_line("tick ", LINE));
        if t > n {
            return t;
        }
    }
}

#[test]
fn incremental_images_store_only_changes_and_resume_through_their_chain() {
    let tmp = temp_dir();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let log = dir.join("counter.log");
    // 32 MiB of heap that never changes after start, and a tick every 20 ms.
    let mut p = migrate_run(&dir, &cbin("counter"), ["32", "20", log.to_str().unwrap()]);
    p.wait_line("ready ", STARTUP);
    let n = tick_number(&p.wait_line("tick ", LINE));
    let full = checkpoint_with(p.pid(), &[], &dir);
    let n = wait_past(&mut p, n + 2);
    let second = checkpoint_with(p.pid(), &["--incremental"], &dir);
    wait_past(&mut p, n + 2);
    let third = checkpoint_with(p.pid(), &["--incremental", "--kill"], &dir);
    p.wait_exit(QUICK);
    let ticks: Vec<String> = p.lines_so_far().into_iter().filter(|l| l.starts_with("tick ")).collect();
    let before = CounterTick::parse(ticks.last().unwrap());

    // The heap is stored once: each increment holds what changed (stack, .data, allocator).
    assert!(size(&full) > 32 << 20, "the full image holds the heap: {} bytes", size(&full));
    for inc in [&second, &third] {
        assert!(size(inc) * 16 < size(&full), "{} holds only changes: {} bytes", inc.display(), size(inc));
    }

    // migrate-inspect follows the chain: the third image names the second and the first.
    let out = inspect_output(&[], &third);
    assert!(out.status.success(), "migrate-inspect failed: {}", out.describe());
    let name = |p: &PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
    assert!(out.stdout.contains("incremental image: "), "{}", out.stdout);
    assert!(out.stdout.contains(&format!("ancestor 0: {}", name(&second))), "{}", out.stdout);
    assert!(out.stdout.contains(&format!("ancestor 1: {}", name(&full))), "{}", out.stdout);
    let json = inspect_output(&["--json"], &third);
    let doc: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(doc["tree"]["ancestors"].as_array().map(Vec::len), Some(2), "{}", json.stdout);

    // Resumed from the third image, through the chain: exactly where the --kill left it.
    let mut r = resume(&third);
    let line = r.wait_line("tick ", STARTUP);
    let first = CounterTick::parse(&line);
    assert_eq!(first.n, before.n + 1, "continues at the next tick: {line}");
    assert_eq!(first.heap, before.heap, "the heap, taken from the first image, is intact: {line}");
    first.check_model(&line);
    assert!(!r.lines_so_far().iter().any(|l| l.starts_with("ready ")), "it did not start again");
    r.kill();
    // The log moved on during that run: the chain's other images need --force now.
    let mut r = resume_with(&["--force"], &second);
    let line = r.wait_line("tick ", STARTUP);
    let t = CounterTick::parse(&line);
    assert_eq!(t.heap, before.heap, "{line}");
    t.check_model(&line);
    r.kill();
}

#[test]
fn a_missing_or_replaced_ancestor_is_refused_before_anything_runs() {
    let tmp = temp_dir();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let log = dir.join("counter.log");
    let mut p = migrate_run(&dir, &cbin("counter"), ["4", "20", log.to_str().unwrap()]);
    p.wait_line("ready ", STARTUP);
    let n = tick_number(&p.wait_line("tick ", LINE));
    let full = checkpoint_with(p.pid(), &[], &dir);
    wait_past(&mut p, n + 1);
    let other = checkpoint_with(p.pid(), &[], &dir);
    wait_past(&mut p, n + 3);
    // Its parent is the newest image: `other` (same directory).
    let inc = checkpoint_with(p.pid(), &["--incremental", "--kill"], &dir);
    p.wait_exit(QUICK);
    let parent = other.clone();
    let saved = dir.join("parent.saved");
    std::fs::rename(&parent, &saved).unwrap();
    let out = resume_output(&[], &inc);
    out.assert_fails("resume without its parent", 3, &["ancestor of the incremental image", "migrate-inspect"]);
    // Another image under the parent's name: not the one the chain was built on.
    std::fs::copy(&full, &parent).unwrap();
    let out = resume_output(&[], &inc);
    out.assert_fails("resume with a replaced parent", 3, &["is not the image", "chain is broken"]);
    let out = inspect_output(&["--no-verify"], &inc);
    assert_eq!(out.code(), Some(3), "migrate-inspect refuses the broken chain too: {}", out.describe());
    // The original back: it resumes.
    std::fs::rename(&saved, &parent).unwrap();
    let mut r = resume(&inc);
    let line = r.wait_line("tick ", STARTUP);
    CounterTick::parse(&line).check_model(&line);
    r.kill();
}

#[test]
fn periodic_incremental_checkpoints_keep_the_chains_they_need() {
    let tmp = temp_dir();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let log = dir.join("counter.log");
    let mut cmd = Command::new(bin("migrate-run"));
    cmd.arg("--ckpt-dir").arg(&dir).args(["--interval", "0.2", "--keep", "2", "--incremental", "--"]);
    cmd.arg(cbin("counter")).args(["16", "20"]).arg(&log);
    let mut p = Managed::spawn("counter", cmd);
    p.wait_line("ready ", STARTUP);
    let sequence =
        |i: &Path| -> u64 { i.file_stem().unwrap().to_string_lossy().rsplit('-').next().unwrap().parse().unwrap() };
    let deadline = Instant::now() + STARTUP;
    while !images_in(&dir).iter().any(|i| sequence(i) >= 5) {
        assert!(Instant::now() < deadline, "no fifth periodic image: {:?}", images_in(&dir));
        std::thread::sleep(Duration::from_millis(20));
    }
    p.kill();
    let images = images_in(&dir);
    let newest = images.iter().max_by_key(|i| sequence(i)).unwrap().clone();
    // It is incremental, and everything its chain names is still there (pruning kept it).
    let json = inspect_output(&["--json"], &newest);
    assert!(json.status.success(), "the newest image and its chain are intact: {}", json.describe());
    let doc: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let ancestors = doc["tree"]["ancestors"].as_array().cloned().unwrap_or_default();
    assert!(!ancestors.is_empty(), "periodic images are incremental: {}", json.stdout);
    for a in &ancestors {
        let file = a["file"].as_str().unwrap();
        assert!(dir.join(file).is_file(), "ancestor {file} was kept: {images:?}");
    }
    assert!(images.len() <= 2 + 8, "older images are pruned: {images:?}");
    let original: Vec<String> = p.lines_so_far().into_iter().filter(|l| l.starts_with("tick ")).collect();
    let before = CounterTick::parse(original.last().unwrap());
    let mut r = resume_with(&["--force"], &newest);
    let line = r.wait_line("tick ", STARTUP);
    let t = CounterTick::parse(&line);
    assert_eq!(t.heap, before.heap, "the same memory as the original run: {line}");
    assert!(t.n > 1 && t.n <= before.n + 1, "a tick of the original run: {line}");
    t.check_model(&line);
    r.kill();
}

#[test]
fn forked_checkpoints_can_be_incremental_or_compressed() {
    let tmp = temp_dir();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let log = dir.join("counter.log");
    let mut p = migrate_run(&dir, &cbin("counter"), ["16", "20", log.to_str().unwrap()]);
    p.wait_line("ready ", STARTUP);
    let n = tick_number(&p.wait_line("tick ", LINE));
    let full = checkpoint_with(p.pid(), &[], &dir);
    let n = wait_past(&mut p, n + 1);
    // An incremental image written by forked writers while the program runs on.
    let inc = checkpoint_with(p.pid(), &["--fork", "--incremental"], &dir);
    let n = wait_past(&mut p, n + 1);
    let packed = checkpoint_with(p.pid(), &["--fork", "--compress"], &dir);
    let n = wait_past(&mut p, n + 1);
    p.kill();
    let before = CounterTick::parse(
        p.lines_so_far().iter().rev().find(|l| l.starts_with("tick ")).expect("the original ticked"),
    );
    assert!(before.n >= n);
    assert!(size(&inc) * 16 < size(&full), "the forked incremental image holds only changes: {} bytes", size(&inc));
    let out = inspect_output(&[], &packed);
    assert!(out.status.success() && out.stdout.contains("lz4"), "a compressed image: {}", out.describe());
    for image in [&inc, &packed] {
        // The program went on after these images: its log moved on (--force).
        let mut r = resume_with(&["--force"], image);
        let line = r.wait_line("tick ", STARTUP);
        let t = CounterTick::parse(&line);
        assert_eq!(t.heap, before.heap, "{}: the memory of the original run: {line}", image.display());
        assert!(t.n > 1 && t.n <= before.n, "{}: a tick from within the original run: {line}", image.display());
        t.check_model(&line);
        assert!(!r.lines_so_far().iter().any(|l| l.starts_with("ready ")), "it did not start again");
        r.kill();
    }
}
