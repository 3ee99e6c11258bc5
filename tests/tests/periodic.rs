//! Periodic checkpoints: `migrate-run --interval SECS --keep N` checkpoints the program again
//! and again while it runs, keeping only the newest N images; any of them resumes where it was
//! taken. The program's own output is untouched (no line per checkpoint).

use migrate_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The sequence number of an image `<name>-<vpid>-<n>.mig`.
fn sequence(image: &Path) -> u64 {
    let stem = image.file_stem().unwrap().to_string_lossy().into_owned();
    stem.rsplit('-').next().unwrap().parse().unwrap()
}

#[test]
fn periodic_checkpoints_keep_the_newest_images_and_each_resumes() {
    let tmp = temp_dir();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let log = dir.join("counter.log");
    let mut cmd = Command::new(bin("migrate-run"));
    cmd.arg("--ckpt-dir").arg(&dir).args(["--interval", "0.2", "--keep", "2", "--"]).arg(cbin("counter"));
    cmd.args(["1", "20"]).arg(&log);
    let mut p = Managed::spawn("counter", cmd);
    p.wait_line("ready ", STARTUP);
    // Wait until the fifth periodic image exists and the older ones are gone.
    let deadline = Instant::now() + STARTUP;
    let images: Vec<PathBuf> = loop {
        let images = images_in(&dir);
        if images.iter().any(|i| sequence(i) >= 5) && images.len() == 2 {
            break images;
        }
        assert!(Instant::now() < deadline, "no pruned set of periodic images appeared: {images:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(images.iter().all(|i| sequence(i) >= 4), "only the newest two are kept: {images:?}");
    assert!(p.try_exit().is_none(), "the program keeps running");
    let lines = p.kill();
    assert!(
        lines.iter().chain(p.lines_so_far().iter()).all(|l| l.starts_with("tick ") || l.starts_with("ready ")),
        "no output of ours in the program's: {lines:?}"
    );
    // The newest image resumes and counts on. The program went on writing its log after that
    // image (as after a crash, the files have moved on): --force accepts that.
    let newest = images.iter().max_by_key(|i| sequence(i)).unwrap();
    let original: Vec<String> = p.lines_so_far().into_iter().filter(|l| l.starts_with("tick ")).collect();
    let before = CounterTick::parse(original.last().expect("the original ticked"));
    let mut s = resume_with(&["--force"], newest);
    let first_line = s.wait_line("tick ", STARTUP);
    let first = CounterTick::parse(&first_line);
    let second = CounterTick::parse(&s.wait_line("tick ", STARTUP));
    // Not a fresh start: the same heap (its checksum depends on a per-run seed), a tick from
    // within the original run (an image of it), and the state that goes with that tick.
    assert_eq!(first.heap, before.heap, "the same memory as the original run: {first_line}");
    assert!(first.n > 1 && first.n <= before.n + 1, "a tick of the original run, not 1: {first_line}");
    first.check_model(&first_line);
    assert!(!s.lines_so_far().iter().any(|l| l.starts_with("ready ")), "it did not start again");
    assert_eq!(second.n, first.n + 1, "it counts on from where the image was taken");
    // And the resumed program goes on checkpointing itself, still keeping two.
    let last = sequence(newest);
    let deadline = Instant::now() + STARTUP;
    while !images_in(&dir).iter().any(|i| sequence(i) > last + 1) {
        assert!(Instant::now() < deadline, "the resumed program wrote no periodic image");
        std::thread::sleep(Duration::from_millis(20));
    }
    s.kill();
    assert!(images_in(&dir).len() <= 3, "pruning goes on too: {:?}", images_in(&dir));
}
