//! A pre-forking server (issue: "parent + N workers sharing a listening socket and a
//! MAP_SHARED counter"): after checkpoint --kill and resume, the same workers accept on the one
//! listening socket, the counter they share goes on, and the parent still supervises them.

use migrate_tests::*;
use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

const SERVER_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    long *shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int l = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])), .sin_addr.s_addr = htonl(0x7f000001) };
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 64)) { perror("listen"); return 1; }
    for (int w = 0; w < 3; w++) {
        pid_t p = fork();
        if (p == 0) {
            for (;;) {
                int c = accept(l, NULL, NULL);
                if (c < 0) continue;
                long v = __sync_add_and_fetch(shared, 1);
                char out[64];
                int n = snprintf(out, sizeof out, "count %ld worker %d\n", v, (int)getpid());
                write(c, out, n);
                close(c);
            }
        }
        printf("worker %d\n", (int)p);
    }
    printf("ready pid=%d\n", (int)getpid());
    int st;
    pid_t gone = wait(&st); /* the supervisor: a worker ending is reported */
    printf("worker exited %d\n", (int)gone);
    return 0;
}
"#;

fn build(dir: &Path) -> PathBuf {
    compile_c(dir, "prefork", SERVER_C, &[])
}

fn ask(port: u16) -> (u64, i32) {
    // Right after migrate-resume starts, the listener may not be recreated yet: retry, bounded.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut s = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() > deadline => panic!("connect to port {port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(b"hi\n");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("an answer");
    let w: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(w.first(), Some(&"count"), "{line}");
    (w[1].parse().unwrap(), w[3].parse().unwrap())
}

/// Live processes running `prog`.
fn processes_running(prog: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
        let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = state.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'));
        if exe.as_deref() == Some(prog) && !zombie {
            out.push(pid);
        }
    }
    out
}

fn parent_of(pid: i32) -> i32 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(") ").and_then(|(_, r)| r.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

/// Kills the workers (they are not in the harness's process group after a resume).
struct Workers(Vec<i32>);
impl Drop for Workers {
    fn drop(&mut self) {
        for &p in &self.0 {
            // SAFETY: killing processes this test started.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
}

#[test]
fn prefork_server_workers_keep_accepting_on_one_socket() {
    let tmp = temp_dir();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    let prog = build(&dir);
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut p = migrate_run(&dir, &prog, [port.to_string()]);
    let mut workers = Workers(Vec::new());
    for _ in 0..3 {
        workers.0.push(field_num::<i32>(&p.wait_line("worker ", STARTUP).replace("worker ", "w="), "w"));
    }
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    let mut last = 0;
    for _ in 0..5 {
        last = ask(port).0;
    }
    assert_eq!(last, 5);
    let image = checkpoint(pid, true, &dir);
    p.read_to_eof(LINE);
    p.wait_exit(Duration::from_secs(10));
    let inspect = inspect_output(&[], &image);
    assert!(inspect.stdout.contains("4 processes"), "a parent and 3 workers: {}", inspect.stdout);
    assert!(inspect.stdout.contains(&format!("socket listening on 127.0.0.1:{port}")), "{}", inspect.stdout);

    let mut r = resume(&image);
    let mut seen = BTreeSet::new();
    for want in 6..=20 {
        let (count, worker) = ask(port);
        assert_eq!(count, want, "the shared counter goes on, one increment per request");
        seen.insert(worker);
    }
    let original: BTreeSet<i32> = workers.0.iter().copied().collect();
    assert!(seen.is_subset(&original), "the same workers answer (original pids {original:?}, seen {seen:?})");
    // The parent still supervises its workers: one ending is reported (with the pid the
    // parent knows it by). The restored processes are found by their program; when the original
    // pids could not be recreated (killed originals not reaped yet), they run under new ones.
    let running = processes_running(&prog);
    workers.0.extend(running.iter().copied());
    let root = *running.iter().find(|&&p| !running.contains(&parent_of(p))).expect("the resumed parent");
    let victim = *running.iter().find(|&&p| p != root).expect("a resumed worker");
    // SAFETY: a worker of this test.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let line = r.wait_line("worker exited", LINE);
    let reported: i32 = line.trim_start_matches("worker exited ").parse().unwrap();
    assert!(original.contains(&reported), "the parent reports one of its workers by its original pid: {line}");
    r.wait_exit(Duration::from_secs(10));
}
