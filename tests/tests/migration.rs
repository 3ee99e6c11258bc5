//! Live migration between hosts. The rig: network namespaces on one machine — host A
//! (10.77.0.1), host B (10.77.0.2) and a client host (10.77.0.3) on a bridge of their own —
//! with the service address 10.77.0.100 on A. The lock server runs on A under migrate-run and
//! lockclient drives it from the client host over the service address; then
//! `migrate-checkpoint --to` moves it to the daemon on B with the address. The clients see no
//! error, no reconnect, no lost or repeated reply, their locks are still held, and the longest
//! stall they saw is printed. The failure paths (wrong secret, a target that refuses, a target
//! killed during the transfer) leave the server serving on A. Needs root (namespaces).

use migrate_tests::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const SERVICE: &str = "10.77.0.100";
const DAEMON: &str = "10.77.0.2:7000";

static RIGS: AtomicU32 = AtomicU32::new(0);

/// Three hosts and a switch, as network namespaces; removed (with whatever still runs in
/// them) on drop.
struct Rig {
    tag: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Rig {
    fn new(test: &str) -> Option<Rig> {
        if !is_root() {
            println!("SKIP: {test} needs root to build network namespaces");
            return None;
        }
        let tag = format!("mg{}x{}", std::process::id() % 100_000, RIGS.fetch_add(1, Ordering::Relaxed));
        let rig = Rig { tag };
        for h in ["a", "b", "c", "sw"] {
            ip(&["netns", "add", &rig.ns(h)]);
        }
        let sw = rig.ns("sw");
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for (n, h) in ["a", "b", "c"].iter().enumerate() {
            let (host, port) = (format!("v{}{h}", rig.tag), format!("p{}{h}", rig.tag));
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &port]);
            ip(&["link", "set", &host, "netns", &rig.ns(h), "name", "eth0"]);
            ip(&["link", "set", &port, "netns", &sw]);
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", &rig.ns(h), "addr", "add", &format!("10.77.0.{}/24", n + 1), "dev", "eth0"]);
            ip(&["-n", &rig.ns(h), "link", "set", "eth0", "up"]);
            ip(&["-n", &rig.ns(h), "link", "set", "lo", "up"]);
        }
        ip(&["-n", &rig.ns("a"), "addr", "add", &format!("{SERVICE}/24"), "dev", "eth0"]);
        Some(rig)
    }

    fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.tag)
    }

    /// `program` on `host`.
    fn cmd(&self, host: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)]).arg(program);
        c
    }

    /// Whether `host` holds the service address.
    fn has_service_address(&self, host: &str) -> bool {
        let out =
            Command::new("ip").args(["-n", &self.ns(host), "-o", "addr", "show", "to", SERVICE]).output().unwrap();
        !out.stdout.is_empty()
    }

    /// The pids of the processes in `host` whose command is `comm`.
    fn pids_of(&self, host: &str, comm: &str) -> Vec<i32> {
        let out = Command::new("ip").args(["netns", "pids", &self.ns(host)]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|p: &i32| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm))
            .collect()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for h in ["a", "b", "c", "sw"] {
            let ns = self.ns(h);
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for p in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                    // SAFETY: kill(2) on a process of this test's own namespace.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

fn secret(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A started scenario: the server on A, the clients on C, the daemon on B.
struct Scenario {
    rig: Rig,
    dir: PathBuf,
    server: Managed,
    pid: i32,
    client: Managed,
    stop: PathBuf,
    secret: PathBuf,
}

fn start(test: &str, tmp: &Path) -> Option<Scenario> {
    let rig = Rig::new(test)?;
    let dir = std::fs::canonicalize(tmp).unwrap();
    let secret = secret(&dir, "secret", "correct horse battery staple 2026\n");
    let mut run = rig.cmd("a", &bin("migrate-run"));
    run.arg("--ckpt-dir").arg(&dir).arg("--").arg(bin("lockserver")).args(["--listen", "0.0.0.0:7070"]);
    let mut server = Managed::spawn("lockserver", run);
    let pid: i32 = field_num(&server.wait_line("ready ", STARTUP), "pid");
    let stop = dir.join("stop");
    let mut c = rig.cmd("c", &bin("lockclient"));
    c.args(["--addr", &format!("{SERVICE}:7070"), "--clients", "4", "--until-file"]).arg(&stop);
    let mut client = Managed::spawn("lockclient", c);
    client.wait_line(|l: &str| l.starts_with("progress ") && field_num::<u64>(l, "ops") > 0, STARTUP);
    Some(Scenario { rig, dir, server, pid, client, stop, secret })
}

fn daemon(s: &Scenario, secret: &Path) -> Managed {
    let mut d = s.rig.cmd("b", &bin("migrate-resume"));
    d.args(["--listen", DAEMON, "--once", "--secret-file"]).arg(secret).arg("--spool").arg(s.dir.join("spool"));
    let mut d = Managed::spawn("daemon", d);
    d.wait_stderr_line(|l: &str| l.contains("listening on"), STARTUP);
    d
}

fn migrate(s: &Scenario, secret: &Path) -> ToolOutput {
    let mut m = s.rig.cmd("a", &bin("migrate-checkpoint"));
    m.args(["--to", DAEMON, "--move-ip", &format!("{SERVICE}/24"), "--json", "--secret-file"])
        .arg(secret)
        .arg(s.pid.to_string());
    run_tool("migrate-checkpoint", m, STARTUP)
}

/// The clients go on without an error: two more progress lines, then the final check.
fn clients_finish_cleanly(s: &mut Scenario, when: &str) -> String {
    for _ in 0..2 {
        let l = s.client.wait_line("progress ", STARTUP);
        assert_eq!(field(&l, "errors"), Some("0"), "{when}: {l}\n{}", s.client.report());
    }
    std::fs::write(&s.stop, "").unwrap();
    let done = s.client.wait_line("done ", STARTUP);
    assert_eq!(field(&done, "errors"), Some("0"), "{when}: {done}\n{}", s.client.report());
    assert_eq!(field(&done, "held_ok"), Some("true"), "{when}: locks held before are still held: {done}");
    done
}

#[test]
fn the_lock_server_moves_to_another_host_under_load() {
    let tmp = temp_dir();
    let Some(mut s) = start("the_lock_server_moves_to_another_host_under_load", tmp.path()) else { return };
    let mut d = daemon(&s, &s.secret.clone());
    let out = migrate(&s, &s.secret.clone());
    assert_eq!(out.code(), Some(0), "the migration succeeds: {}", out.describe());
    let summary: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("--json output");
    // The source is gone, the server runs on B with the address.
    s.server.wait_exit(Duration::from_secs(30));
    assert!(!s.rig.has_service_address("a") && s.rig.has_service_address("b"), "the address moved");
    assert_eq!(s.rig.pids_of("b", "lockserver").len(), 1, "the server runs on host B");
    assert!(d.wait_exit(Duration::from_secs(30)).success(), "the daemon's one migration succeeded");
    let done = clients_finish_cleanly(&mut s, "after the migration");
    println!(
        "migrated {} bytes; source frozen {:.3} s; the clients' longest stall {} ms (at {} s)",
        summary["image_bytes"],
        summary["frozen_seconds"].as_f64().unwrap_or(0.0),
        field(&done, "max_stall_ms").unwrap_or("?"),
        field(&done, "max_stall_at").unwrap_or("?")
    );
}

#[test]
fn a_wrong_secret_is_refused_and_the_server_stays() {
    let tmp = temp_dir();
    let Some(mut s) = start("a_wrong_secret_is_refused_and_the_server_stays", tmp.path()) else { return };
    let other = secret(&s.dir, "other", "another secret, not the daemon's\n");
    let mut d = daemon(&s, &s.secret.clone());
    let out = migrate(&s, &other);
    out.assert_fails("a migration with the wrong secret", 1, &["authentication failed"]);
    d.wait_stderr_line(|l: &str| l.contains("refused") && l.contains("authentication failed"), STARTUP);
    assert!(s.server.try_exit().is_none(), "the server keeps running on A");
    assert!(s.rig.has_service_address("a"));
    clients_finish_cleanly(&mut s, "after a refused migration");
    d.kill();
}

#[test]
fn a_target_that_refuses_leaves_the_server_serving() {
    let tmp = temp_dir();
    let Some(mut s) = start("a_target_that_refuses_leaves_the_server_serving", tmp.path()) else { return };
    // Something on B already holds the service's port: the resume there must fail.
    let mut squat = s.rig.cmd("b", &bin("lockserver"));
    squat.args(["--listen", "0.0.0.0:7070"]);
    let mut squatter = Managed::spawn("squatter", squat);
    squatter.wait_line("ready ", STARTUP);
    let mut d = daemon(&s, &s.secret.clone());
    let out = migrate(&s, &s.secret.clone());
    out.assert_fails("a migration to a host where the port is taken", 6, &["goes on here", "in use"]);
    assert!(!d.wait_exit(Duration::from_secs(30)).success(), "the daemon reports the failure");
    assert!(s.server.try_exit().is_none(), "the server keeps running on A");
    assert!(s.rig.has_service_address("a") && !s.rig.has_service_address("b"), "the address came back");
    clients_finish_cleanly(&mut s, "after a refused migration");
    squatter.kill();
}

#[test]
fn a_target_killed_during_the_transfer_leaves_the_server_serving() {
    let tmp = temp_dir();
    let Some(mut s) = start("a_target_killed_during_the_transfer_leaves_the_server_serving", tmp.path()) else {
        return;
    };
    let mut d = daemon(&s, &s.secret.clone());
    let mut m = s.rig.cmd("a", &bin("migrate-checkpoint"));
    m.args(["--to", DAEMON, "--move-ip", &format!("{SERVICE}/24"), "--secret-file"])
        .arg(&s.secret)
        .arg(s.pid.to_string());
    let mut sender = Managed::spawn("migrate-checkpoint", m);
    // As soon as the image starts to arrive, the target dies.
    d.wait_stderr_line(|l: &str| l.contains("receiving"), STARTUP);
    d.kill();
    let status = sender.wait_exit(STARTUP);
    assert_eq!(status.code(), Some(6), "the source reports the failure\n{}", sender.report());
    assert!(sender.stderr_so_far().join("\n").contains("goes on here"), "{}", sender.report());
    assert!(s.server.try_exit().is_none(), "the server keeps running on A");
    assert!(s.rig.has_service_address("a"), "the address is back on A");
    clients_finish_cleanly(&mut s, "after the target died");
}

const BALLAST_C: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>
/* MiB of pseudo-random memory that stays as it is, a few pages rewritten all the time, and a
   server that answers "sum" with a checksum of the memory and "tick" with the rewrite count. */
static unsigned long *mem, words, *hot;
static volatile unsigned long ticks;
static void *rewrite(void *arg) {
    for (;;) { for (int i = 0; i < 4 * 512; i++) hot[i] = ticks; ticks++; usleep(2000); }
    return arg;
}
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    words = (unsigned long)atoi(argv[1]) << 17;
    mem = malloc(words * 8);
    hot = malloc(4 * 4096);
    unsigned long x = 88172645463325252UL;
    for (unsigned long i = 0; i < words; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; mem[i] = x; }
    pthread_t t; pthread_create(&t, NULL, rewrite, NULL);
    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(7071) };
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 8)) { perror("listen"); return 1; }
    printf("ready pid=%d\n", (int)getpid());
    int c = accept(l, NULL, NULL);
    FILE *in = fdopen(c, "r");
    char line[64];
    while (fgets(line, sizeof line, in)) {
        char out[64];
        unsigned long s = 0;
        if (!strncmp(line, "sum", 3)) for (unsigned long i = 0; i < words; i++) s = s * 31 + mem[i];
        int n = snprintf(out, sizeof out, "%s %lx\n", line[0] == 's' ? "sum" : "tick", line[0] == 's' ? s : ticks);
        if (write(c, out, n) != n) break;
    }
    return 0;
}
"#;

#[test]
fn a_large_program_moves_with_precopy_and_a_short_freeze() {
    large_program_moves("a_large_program_moves_with_precopy_and_a_short_freeze", false);
}

/// The same with the daemon resuming lazily (`migrate-resume --listen … --lazy`): the program
/// runs on the target as soon as its layout is there, and its memory comes in from the
/// received image on first touch (the image may be gone from the spool by then).
#[test]
fn a_large_program_moves_and_resumes_lazily_on_the_target() {
    large_program_moves("a_large_program_moves_and_resumes_lazily_on_the_target", true);
}

fn large_program_moves(test: &str, lazy: bool) {
    let Some(rig) = Rig::new(test) else { return };
    let tmp = temp_dir();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let secret = secret(&dir, "secret", "correct horse battery staple 2026\n");
    let prog = compile_c(&dir, "ballast", BALLAST_C, &["-O2", "-pthread"]);
    let mut run = rig.cmd("a", &bin("migrate-run"));
    run.arg("--ckpt-dir").arg(&dir).arg("--").arg(&prog).arg("256");
    let mut server = Managed::spawn("ballast", run);
    let pid: i32 = field_num(&server.wait_line("ready ", STARTUP), "pid");
    let mut d = rig.cmd("b", &bin("migrate-resume"));
    d.args(["--listen", DAEMON, "--once", "--secret-file"]).arg(&secret).arg("--spool").arg(dir.join("spool"));
    if lazy {
        d.arg("--lazy");
    }
    let mut daemon = Managed::spawn("daemon", d);
    daemon.wait_stderr_line(|l: &str| l.contains("listening on"), STARTUP);

    // The client on host C: one connection, one request per line on its stdin.
    let client_c = r#"
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/socket.h>
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(7071) };
    inet_pton(AF_INET, "10.77.0.100", &a.sin_addr);
    if (connect(s, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 1; }
    char line[128];
    FILE *in = fdopen(s, "r");
    while (fgets(line, sizeof line, stdin)) {
        if (write(s, line, strlen(line)) < 0 || !fgets(line, sizeof line, in)) { printf("error\n"); return 1; }
        fputs(line, stdout);
    }
    return 0;
}
"#;
    let client_bin = compile_c(&dir, "client", client_c, &[]);
    let mut client = Managed::spawn("client", rig.cmd("c", &client_bin));
    client.send_line("sum");
    let before = client.wait_line("sum ", STARTUP);

    let mut m = rig.cmd("a", &bin("migrate-checkpoint"));
    m.args(["--to", DAEMON, "--move-ip", &format!("{SERVICE}/24"), "--precopy", "--json", "--secret-file"])
        .arg(&secret)
        .arg(pid.to_string());
    let out = run_tool("migrate-checkpoint", m, STARTUP);
    assert_eq!(out.code(), Some(0), "the migration succeeds: {}", out.describe());
    let summary: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("--json output");
    let image = summary["image_bytes"].as_u64().unwrap();
    let frozen = summary["frozen_bytes"].as_u64().unwrap();
    let ahead = summary["precopy_bytes"].as_u64().unwrap();
    assert!(ahead >= 256 << 20, "the memory went ahead: {summary}");
    assert!(frozen * 8 < image, "the freeze carried a small part of the image: {summary}");
    server.wait_exit(Duration::from_secs(30));
    assert!(daemon.wait_exit(Duration::from_secs(30)).success());
    for l in daemon.stderr_so_far() {
        println!("daemon: {l}");
    }
    // Same connection, same memory, and the rewriting thread goes on.
    client.send_line("sum");
    let after = client.wait_line("sum ", STARTUP);
    assert_eq!(after, before, "the 256 MiB came over intact, on the same connection");
    let mut tick = || {
        client.send_line("tick");
        u64::from_str_radix(client.wait_line("tick ", STARTUP).trim_start_matches("tick "), 16).unwrap()
    };
    let t1 = tick();
    // The rewriting thread runs over there (every 2 ms; a request takes far less).
    assert!((0..2000).any(|_| tick() > t1), "the program's threads run on host B");
    assert_eq!(rig.pids_of("b", "ballast").len(), 1, "on host B");
    println!(
        "256 MiB program{}: image {:.1} MB, {:.1} MB sent ahead in {} rounds, {:.1} MB during the freeze; source frozen {:.3} s",
        if lazy { ", lazy on the target" } else { "" },
        image as f64 / 1e6,
        ahead as f64 / 1e6,
        summary["precopy_rounds"],
        frozen as f64 / 1e6,
        summary["frozen_seconds"].as_f64().unwrap_or(0.0)
    );
    client.close_stdin();
}
