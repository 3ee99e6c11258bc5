//! Pages of private anonymous memory that hold only zeros are not stored: a fresh anonymous
//! page reads zeros too. The program's memory still comes back exactly — the zeroed pages as
//! zeros, writable like any other — and the image is smaller by them.

use migrate_tests::*;

const PROGRAM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#define MIB (1024 * 1024)
int main(void) {
    /* 8 MiB, every page written; then the first 6 MiB zeroed again: present, but zeros. */
    unsigned char *buf = malloc(8 * MIB);
    memset(buf, 0xab, 8 * MIB);
    memset(buf, 0, 6 * MIB);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    for (unsigned long n = 1;; n++) {
        unsigned long sum = 0, nonzero = 0;
        for (size_t i = 0; i < 8 * MIB; i += 64) {
            sum += buf[i];
            nonzero += buf[i] != 0;
        }
        /* The zeroed part must take writes like any page: a byte set and cleared again. */
        buf[(n * 4096) % (6 * MIB)] = 1;
        buf[(n * 4096) % (6 * MIB)] = 0;
        printf("tick %lu sum=%lu nonzero=%lu\n", n, sum, nonzero);
        usleep(20000);
    }
}
"#;

#[test]
fn pages_of_zeros_are_not_stored_and_come_back_as_zeros() {
    let tmp = temp_dir();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let prog = compile_c(&dir, "zeros", PROGRAM, &[]);
    let mut p = migrate_run(&dir, &prog, Vec::<String>::new());
    p.wait_line("ready", STARTUP);
    let first = p.wait_line("tick ", LINE);
    let want = format!("sum={} nonzero={}", 0xab * (2 * 1024 * 1024 / 64), 2 * 1024 * 1024 / 64);
    assert!(first.ends_with(&want), "the program's own view: {first}");
    let image = checkpoint(p.pid(), true, &dir);
    p.wait_exit(QUICK);
    let last = tick_number(p.lines_so_far().iter().rev().find(|l| l.starts_with("tick ")).unwrap());

    // The 8 MiB buffer's mapping stores its 2 MiB of data, not the 6 MiB of zeros.
    let json = inspect_output(&["--json"], &image);
    assert!(json.status.success(), "{}", json.describe());
    let doc: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let vmas = doc["meta"]["process"]["vmas"].as_array().unwrap();
    let buffer = vmas
        .iter()
        .find(|v| {
            (8 << 20..(8 << 20) + (64 << 10)).contains(&(v["end"].as_u64().unwrap() - v["start"].as_u64().unwrap()))
        })
        .expect("the buffer's mapping");
    let stored: u64 = buffer["runs"].as_array().unwrap().iter().map(|r| r[1].as_u64().unwrap()).sum();
    assert!((512..=520).contains(&stored), "2 MiB of data stored, not the zeros: {stored} pages");

    let mut r = resume(&image);
    let line = r.wait_line("tick ", STARTUP);
    assert_eq!(tick_number(&line), last + 1, "it continues: {line}");
    assert!(line.ends_with(&want), "the zeros and the data came back: {line}");
    let line = r.wait_line("tick ", LINE);
    assert!(line.ends_with(&want), "and the zeroed pages take writes: {line}");
    r.kill();
}
