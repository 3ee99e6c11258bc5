//! Files deleted while open (open, unlink, keep using): saved with their contents and restored
//! as open, deleted files at the same offset; `--keep-deleted` leaves them visible instead.

use migrate_tests::*;
use std::fs;
use std::path::{Path, PathBuf};

const PROG_C: &str = r#"
#include <stdio.h>
#include <unistd.h>
#include <fcntl.h>
#include <string.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || unlink(argv[1]) != 0) { perror("tempfile"); return 1; }
    printf("ready pid=%d\n", (int)getpid());
    for (int n = 1;; n++) {
        char line[64];
        int len = snprintf(line, sizeof line, "record %d\n", n);
        if (write(fd, line, len) != len) { perror("write"); return 1; }
        long off = (long)lseek(fd, 0, SEEK_CUR);
        static char all[1 << 16];
        int got = (int)pread(fd, all, sizeof all - 1, 0);
        all[got > 0 ? got : 0] = 0;
        int count = 0;
        for (char *p = all; (p = strstr(p, "record")) != NULL; p++) count++;
        printf("tick %d off=%ld records=%d %s\n", n, off, count, count == n ? "ok" : "BAD");
        usleep(50000);
    }
}
"#;

fn build(dir: &Path) -> PathBuf {
    compile_c(dir, "tempfile", PROG_C, &[])
}

/// Runs the program until tick 4 and checkpoints it with --kill; returns the image, the last
/// tick line and the (deleted) scratch path.
fn image(dir: &Path) -> (PathBuf, String, PathBuf) {
    let prog = build(dir);
    let scratch = dir.join("scratch.tmp");
    let mut p = migrate_run(dir, &prog, [scratch.as_os_str()]);
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    p.wait_line("tick 4 ", LINE);
    assert!(!scratch.exists(), "the program unlinked its scratch file");
    let image = checkpoint(pid, true, dir);
    let mut lines = p.lines_so_far();
    lines.extend(p.read_to_eof(LINE));
    let last = lines.iter().rfind(|l| is_tick(l)).cloned().expect("a tick before the checkpoint");
    let inspect = inspect_output(&[], &image);
    assert!(inspect.stdout.contains("deleted file"), "inspect shows the deleted file: {}", inspect.stdout);
    (image, last, scratch)
}

#[test]
fn deleted_file_comes_back_open_deleted_and_intact() {
    let tmp = temp_dir();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    let (image, last, scratch) = image(&dir);
    let n = tick_number(&last);
    let off: u64 = field_num(&last, "off");
    let mut r = resume(&image);
    let first = r.wait_line("tick ", STARTUP);
    assert_eq!(tick_number(&first), n + 1, "continues at the next tick: {first}");
    assert!(first.ends_with(" ok"), "every earlier record is still in the file: {first}");
    let off2: u64 = field_num(&first, "off");
    assert_eq!(off2, off + format!("record {}\n", n + 1).len() as u64, "the offset continued: {first}");
    assert!(!scratch.exists(), "the file is deleted again after the resume");
    let more = r.wait_line("tick ", LINE);
    assert!(more.ends_with(" ok"), "{more}");
    r.kill();
}

#[test]
fn keep_deleted_leaves_the_file_visible() {
    let tmp = temp_dir();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    let (image, last, scratch) = image(&dir);
    let n = tick_number(&last);
    let mut r = resume_with(&["--keep-deleted"], &image);
    let first = r.wait_line("tick ", STARTUP);
    assert_eq!(tick_number(&first), n + 1, "{first}");
    assert!(scratch.exists(), "--keep-deleted leaves the file at its old path");
    let text = fs::read_to_string(&scratch).unwrap();
    assert!(text.starts_with("record 1\nrecord 2\n"), "the contents came back: {text:?}");
    r.kill();
}
