//! migrate-checkpoint against a stand-in control socket served by the test itself for a
//! `sleep` child (the name only has to carry the child's pid).

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::process::{Child, Command};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

struct Target {
    child: Child,
}

impl Target {
    fn new() -> Self {
        Target { child: Command::new("sleep").arg("30").spawn().unwrap() }
    }
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves one connection: reads the request line, answers `reply` (if any), returns the
/// request. With `kill_pid`, kills that process right after answering.
fn serve(pid: i32, reply: Option<&'static str>, kill_pid: Option<i32>) -> JoinHandle<String> {
    let addr = SocketAddr::from_abstract_name(format!("migrate/ctl/{pid}")).unwrap();
    let listener = UnixListener::bind_addr(&addr).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if let Some(reply) = reply {
            (&stream).write_all(reply.as_bytes()).unwrap();
            if let Some(p) = kill_pid {
                std::thread::sleep(Duration::from_millis(50));
                // SAFETY: kill(2) with a pid and a signal number touches no memory.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        } else {
            // Hold the connection open without answering until the client gives up.
            let mut rest = String::new();
            let _ = reader.read_line(&mut rest);
        }
        line
    })
}

#[test]
fn prints_the_image_path() {
    let t = Target::new();
    let server = serve(t.pid(), Some("ok /tmp/ckpt/prog.img\n"), None);
    let mut c = bin("checkpoint");
    c.current_dir("/tmp").args(["--dir", "somewhere"]).arg(t.pid().to_string());
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.lines().last(), Some("/tmp/ckpt/prog.img"));
    assert_eq!(server.join().unwrap(), "checkpoint kill=0 bins=0 dir=/tmp/somewhere\n");
}

#[test]
fn fork_reports_the_frozen_time_before_the_path() {
    let t = Target::new();
    let server = serve(t.pid(), Some("frozen 7\nok /tmp/ckpt/prog.img\n"), None);
    let mut c = bin("checkpoint");
    c.args(["--fork", "--dir", "/tmp"]).arg(t.pid().to_string());
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.lines().last(), Some("/tmp/ckpt/prog.img"));
    assert!(r.stderr.contains(&format!("process {} frozen 7 ms", t.pid())), "{}", r.stderr);
    assert_eq!(server.join().unwrap(), "checkpoint kill=0 bins=0 fork=1 dir=/tmp\n");
}

#[test]
fn kill_waits_until_the_process_is_gone() {
    let t = Target::new();
    let server = serve(t.pid(), Some("ok /x/y.img\n"), Some(t.pid()));
    let mut c = bin("checkpoint");
    c.args(["--kill", "--json", "--timeout", "20"]).arg(t.pid().to_string());
    let started = Instant::now();
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(started.elapsed() >= Duration::from_millis(50));
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["image"], "/x/y.img");
    assert_eq!(v["pid"], t.pid());
    assert_eq!(v["killed"], true);
    assert!(v["seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(server.join().unwrap(), "checkpoint kill=1 bins=0 dir=\n");
}

#[test]
fn reports_the_process_error() {
    let t = Target::new();
    let server = serve(t.pid(), Some("error cannot write /ro/x.img: Read-only file system\n"), None);
    let mut c = bin("checkpoint");
    c.arg(t.pid().to_string());
    run(c).expect_error("checkpoint", 6, "cannot write /ro/x.img: Read-only file system");
    server.join().unwrap();
}

#[test]
fn times_out() {
    let t = Target::new();
    let _server = serve(t.pid(), None, None);
    let mut c = bin("checkpoint");
    c.args(["--timeout", "0.3"]).arg(t.pid().to_string());
    let started = Instant::now();
    run(c).expect_error("checkpoint", 6, "within 0.3 s (--timeout)");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn unmanaged_and_missing_processes() {
    let t = Target::new();
    let mut c = bin("checkpoint");
    c.arg(t.pid().to_string());
    run(c).expect_error("checkpoint", 5, "is not running under migrate-run (start it with migrate-run)");

    let mut c = bin("checkpoint");
    c.args(["--json", "2147483647"]);
    let r = run(c);
    r.expect_error("checkpoint", 5, "no process 2147483647");
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["code"], 5);

    let mut c = bin("checkpoint");
    c.arg("0");
    run(c).expect_error("checkpoint", 2, "PID");
}
