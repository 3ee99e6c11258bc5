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
