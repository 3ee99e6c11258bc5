//! The lock service example under load (examples/lockserver): lockserver runs under migrate-run
//! while lockclient drives it over four long-lived connections; the server is checkpointed with
//! --kill and resumed. Every connection survives (TCP repair and the network lock), no reply is
//! lost, repeated or wrong (lockclient checks each one and its op number), the locks held before
//! the checkpoint are still held after it, and the longest stall the clients saw is printed.
//! A fifth, idle connection of the test's own looks at the server's state (`STATS`, `HOLDER`).

use migrate_tests::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Instant;

const CLIENTS: u64 = 4;
const HOLD: u64 = 2;

/// The test's own connection to the server.
struct Probe {
    conn: TcpStream,
    reader: BufReader<TcpStream>,
}

/// What `STATS` reports.
#[derive(Debug)]
struct Stats {
    locks: u64,
    ops: u64,
    pid: i32,
    started: u64,
}

impl Probe {
    fn connect(port: u16) -> Probe {
        let conn = connect_within(port, STARTUP);
        let reader = BufReader::new(conn.try_clone().expect("clone the probe socket"));
        Probe { conn, reader }
    }

    /// Sends one request line and returns the reply line.
    #[track_caller]
    fn request(&mut self, req: &str, when: &str) -> String {
        self.conn.write_all(format!("{req}\n").as_bytes()).unwrap_or_else(|e| panic!("{when}: send {req}: {e}"));
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(n) if n > 0 && line.ends_with('\n') => line.trim_end().to_string(),
            other => panic!("{when}: no reply to {req}: {other:?} {line:?}"),
        }
    }

    #[track_caller]
    fn stats(&mut self, when: &str) -> Stats {
        let line = self.request("STATS", when);
        assert!(line.starts_with("STATS "), "{when}: unexpected reply to STATS: {line:?}");
        Stats {
            locks: field_num(&line, "locks"),
            ops: field_num(&line, "ops"),
            pid: field_num(&line, "pid"),
            started: field_num(&line, "started"),
        }
    }

    /// Asserts that every client's held locks (`held-<i>-<j>`) are held by it (`c<i>`).
    #[track_caller]
    fn check_held(&mut self, when: &str) {
        for i in 0..CLIENTS {
            for j in 0..HOLD {
                let reply = self.request(&format!("HOLDER held-{i}-{j}"), when);
                let holder = reply.split_whitespace().nth(1);
                assert_eq!(holder, Some(format!("c{i}").as_str()), "{when}: held-{i}-{j}: {reply:?}");
            }
        }
    }
}

fn progress_ops(line: &str) -> u64 {
    field_num(line, "ops")
}

#[test]
fn lock_clients_keep_their_connections_and_locks_across_checkpoint_and_resume() {
    if !is_root() {
        println!("SKIP: lockserver migration needs root (TCP repair keeps the clients' connections)");
        return;
    }
    let tmp = temp_dir();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let mut guard = TreeGuard::new(&dir);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");

    let mut server = migrate_run(&dir, &bin("lockserver"), ["--listen", addr.as_str()]);
    let ready = server.wait_line("ready ", STARTUP);
    let pid: i32 = field_num(&ready, "pid");
    guard.add(pid);
    assert_eq!(field(&ready, "addr"), Some(addr.as_str()), "{ready}");

    let until = dir.join("stop");
    let mut client = lockclient(&addr, CLIENTS, HOLD, &until);
    let first = client.lines_so_far().into_iter().rev().find(|l| l.starts_with("progress ")).unwrap_or_default();
    assert_eq!(field(&first, "errors"), Some("0"), "errors before the checkpoint: {first}");

    // Every client holds its locks (checked once per progress line until they all do).
    let mut probe = Probe::connect(port);
    let deadline = Instant::now() + STARTUP;
    let before = loop {
        let s = probe.stats("before the checkpoint");
        if s.locks >= CLIENTS * HOLD {
            break s;
        }
        if Instant::now() >= deadline {
            let r = client.report();
            panic!("the clients do not hold their {HOLD} locks each: {s:?}\n{r}");
        }
        client.wait_line("progress ", LINE);
    };
    assert_eq!(before.pid, pid);
    assert!(before.locks <= CLIENTS * (HOLD + 1), "held locks and at most one work lock each: {before:?}");
    probe.check_held("before the checkpoint");

    // The migration: checkpoint and end the server (its TCP traffic is held), resume it.
    let image = checkpoint(pid, true, &dir);
    server.read_to_eof(LINE);
    server.wait_exit(LINE);
    let mut resumed = resume(&image);

    // The same server, with its state, on the same idle connection.
    let after = probe.stats("after the resume");
    assert_eq!((after.pid, after.started), (before.pid, before.started), "{before:?} then {after:?}");
    assert!(after.ops > before.ops, "{before:?} then {after:?}");
    assert!((CLIENTS * HOLD..=CLIENTS * (HOLD + 1)).contains(&after.locks), "{after:?}");
    probe.check_held("after the resume");

    // The clients' requests are served again: the server answers more than the probe's own
    // (their retransmissions may take a while to arrive; checked once per progress line).
    let deadline = Instant::now() + STARTUP;
    let served_from = after.ops + (CLIENTS * HOLD) + 1;
    loop {
        client.wait_line("progress ", LINE);
        let later = probe.stats("after the resume");
        if later.ops > served_from {
            break;
        }
        if Instant::now() >= deadline {
            let r = client.report();
            panic!("the clients' requests are not served after the resume: {after:?} then {later:?}\n{r}");
        }
    }
    // And the client sees it: its count of answered requests goes past all it printed so far.
    let seen = client.lines_so_far().iter().filter(|l| l.starts_with("progress ")).map(|l| progress_ops(l)).max();
    let seen = seen.unwrap_or(0);
    let moving = client.wait_line(|l: &str| l.starts_with("progress ") && progress_ops(l) > seen, LINE);
    assert_eq!(field(&moving, "errors"), Some("0"), "errors after the resume: {moving}\n{}", client.report());

    std::fs::write(&until, "").unwrap();
    let done = client.wait_line("done ", STARTUP);
    let status = client.wait_exit(LINE);
    let report = client.report();
    assert_eq!(field(&done, "errors"), Some("0"), "every reply arrived and was right: {done}\n{report}");
    assert_eq!(field(&done, "held_ok"), Some("true"), "the held locks survived: {done}\n{report}");
    assert!(status.success(), "lockclient: {}\n{report}", describe_status(status));
    assert!(progress_ops(&done) > seen, "{done} after {seen} ops");
    let stall_ms: u64 = field_num(&done, "max_stall_ms");
    let stall_at = field(&done, "max_stall_at").unwrap_or("?");
    println!("lockserver migrated under load: {done}");
    println!("max stall seen by a client: {stall_ms} ms, starting {stall_at} s into the run");

    let end = probe.stats("after the clients finished");
    assert_eq!(end.locks, 0, "every client released its locks: {end:?}");
    assert_eq!((end.pid, end.started), (before.pid, before.started));

    drop(probe);
    resumed.kill();
    guard.kill_all();
}
