//! Real services from the distribution, unmodified, under migrate-run: checkpoint with --kill,
//! resume, and check that they carry on with their state rather than starting afresh.
//! redis-server (100 000 keys; same run_id, uptime continued), nginx (master + workers: the
//! same workers serve, the master still respawns them), memcached (threads + libevent) and a
//! threaded python3 socket server. A test whose program is not installed says SKIP and passes
//! (.ci/run installs them).

use migrate_tests::*;
use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn installed(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let found = std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file());
    if found.is_none() {
        eprintln!("SKIP: {name} is not installed (.ci/run installs it)");
    }
    found
}

/// One inline command, one reply line (redis and memcached both speak lines).
fn line_request(r: &mut BufReader<TcpStream>, cmd: &str) -> String {
    r.get_mut().write_all(cmd.as_bytes()).unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap_or_else(|e| panic!("reply to {cmd:?}: {e}"));
    line.trim_end().to_string()
}

fn read_exact_line(r: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    line.trim_end().to_string()
}

// ---------------------------------------------------------------- redis

/// A redis bulk-string reply ("$n" then the value, or "$-1").
fn redis_get(r: &mut BufReader<TcpStream>, key: &str) -> Option<String> {
    let head = line_request(r, &format!("GET {key}\r\n"));
    if head == "$-1" {
        return None;
    }
    assert!(head.starts_with('$'), "GET {key}: {head}");
    Some(read_exact_line(r))
}

/// INFO server as a map of its fields.
fn redis_info(r: &mut BufReader<TcpStream>) -> Vec<(String, String)> {
    let head = line_request(r, "INFO server\r\n");
    let len: usize = head.trim_start_matches('$').parse().unwrap_or_else(|_| panic!("INFO: {head}"));
    let mut body = vec![0u8; len + 2];
    r.read_exact(&mut body).unwrap();
    String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.to_string(), v.trim().to_string())))
        .collect()
}

fn info_field(info: &[(String, String)], key: &str) -> String {
    info.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("INFO has no {key}"))
}

#[test]
fn redis_keeps_its_keys_and_its_run() {
    let Some(redis) = installed("redis-server") else { return };
    let tmp = temp_dir();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    let port = free_port();
    // Default configuration (jemalloc background thread on), persistence off.
    let args = ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"];
    let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    args.push(dir.to_string_lossy().into_owned());
    let mut p = migrate_run(&dir, &redis, &args);
    p.wait_line(|l: &str| l.contains("Ready to accept connections"), STARTUP);
    let pid = p.pid();

    // 100 000 keys, pipelined: a writer thread so neither side's buffer fills up.
    const KEYS: usize = 100_000;
    let conn = connect_within(port, QUICK);
    let mut writer = conn.try_clone().unwrap();
    let feeder = std::thread::spawn(move || {
        let mut batch = String::new();
        for i in 0..KEYS {
            batch.push_str(&format!("SET key:{i} value-{i}\r\n"));
            if batch.len() > 64 * 1024 {
                writer.write_all(batch.as_bytes()).unwrap();
                batch.clear();
            }
        }
        writer.write_all(batch.as_bytes()).unwrap();
    });
    let mut r = BufReader::new(conn);
    for i in 0..KEYS {
        let l = read_exact_line(&mut r);
        assert_eq!(l, "+OK", "SET #{i}");
    }
    feeder.join().unwrap();
    assert_eq!(line_request(&mut r, "DBSIZE\r\n"), format!(":{KEYS}"));
    let before = redis_info(&mut r);
    let run_id = info_field(&before, "run_id");
    let uptime: u64 = info_field(&before, "uptime_in_seconds").parse().unwrap();
    let client_id = line_request(&mut r, "CLIENT ID\r\n");

    let image = checkpoint(pid, true, &dir);
    p.wait_exit(Duration::from_secs(10));
    // The client connection stays open across the checkpoint (TCP repair; its traffic is held
    // meanwhile): a request sent while redis is gone is answered once it is back.
    let mut kept = r;
    kept.get_mut().set_read_timeout(Some(STARTUP)).unwrap();
    kept.get_mut().write_all(b"GET key:7\r\n").unwrap();
    let mut s = resume(&image);
    assert_eq!(read_exact_line(&mut kept), "$7", "the request sent during the checkpoint is answered");
    assert_eq!(read_exact_line(&mut kept), "value-7");
    assert_eq!(line_request(&mut kept, "CLIENT ID\r\n"), client_id, "redis sees the same client connection");
    assert_eq!(line_request(&mut kept, "PING\r\n"), "+PONG");
    let mut r = BufReader::new(connect_within(port, STARTUP));
    assert_eq!(line_request(&mut r, "PING\r\n"), "+PONG");
    assert_eq!(line_request(&mut r, "DBSIZE\r\n"), format!(":{KEYS}"), "every key is back");
    for i in [0, 1, KEYS / 2, KEYS - 1] {
        assert_eq!(redis_get(&mut r, &format!("key:{i}")).as_deref(), Some(format!("value-{i}").as_str()));
    }
    let after = redis_info(&mut r);
    assert_eq!(info_field(&after, "run_id"), run_id, "the same redis run, not a fresh start");
    let uptime_after: u64 = info_field(&after, "uptime_in_seconds").parse().unwrap();
    assert!(uptime_after >= uptime, "uptime continued: {uptime} then {uptime_after}");
    // Still writable, and its process id is the one it had.
    assert_eq!(line_request(&mut r, "SET after resume\r\n"), "+OK");
    assert_eq!(info_field(&after, "process_id"), info_field(&before, "process_id"));
    s.kill();
}

// ---------------------------------------------------------------- memcached

/// The "STAT pid" line of `stats` (the rest read and dropped).
fn memcached_pid(r: &mut BufReader<TcpStream>) -> String {
    let first = line_request(r, "stats\r\n");
    assert!(first.starts_with("STAT pid "), "{first}");
    while read_exact_line(r) != "END" {}
    first
}

#[test]
fn memcached_keeps_its_items() {
    let Some(memcached) = installed("memcached") else { return };
    let tmp = temp_dir();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    let port = free_port();
    let args = ["-u", "root", "-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0", "-t", "4", "-v"];
    let p = migrate_run(&dir, &memcached, args);
    let pid = p.pid();
    let mut r = BufReader::new(connect_within(port, STARTUP));
    for i in 0..200 {
        let v = format!("item-{i}-{}", "x".repeat(i));
        let cmd = format!("set k{i} 0 0 {}\r\n{v}\r\n", v.len());
        assert_eq!(line_request(&mut r, &cmd), "STORED");
    }
    let stats_before = memcached_pid(&mut r);
    drop(r);

    let image = checkpoint(pid, true, &dir);
    drop(p);
    let mut s = resume(&image);
    let mut r = BufReader::new(connect_within(port, STARTUP));
    for i in [0usize, 7, 199] {
        let v = format!("item-{i}-{}", "x".repeat(i));
        assert_eq!(line_request(&mut r, &format!("get k{i}\r\n")), format!("VALUE k{i} 0 {}", v.len()));
        assert_eq!(read_exact_line(&mut r), v);
        assert_eq!(read_exact_line(&mut r), "END");
    }
    // The same server: its pid (first stats line) is unchanged, and it still takes writes.
    assert_eq!(memcached_pid(&mut r), stats_before);
    assert_eq!(line_request(&mut r, "set new 0 0 2\r\nok\r\n"), "STORED");
    s.kill();
}

// ---------------------------------------------------------------- nginx

/// GET / over a fresh connection: the body and the worker pid nginx reports.
fn nginx_get(port: u16) -> (String, u32) {
    let mut c = connect_within(port, STARTUP);
    c.write_all(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    let worker = resp
        .lines()
        .find_map(|l| l.strip_prefix("X-Worker: "))
        .unwrap_or_else(|| panic!("no X-Worker header: {resp}"))
        .trim()
        .parse()
        .unwrap();
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (body, worker)
}

/// The pids of `pid`'s children, as the kernel lists them.
fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let list = fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(list.split_whitespace().filter_map(|s| s.parse::<i32>().ok()));
    }
    out
}

/// The worker pids that answer `requests` fresh connections (each request checks the body).
fn workers_seen(port: u16, body: &str, requests: usize) -> BTreeSet<u32> {
    let mut seen = BTreeSet::new();
    for _ in 0..requests {
        let (b, w) = nginx_get(port);
        assert_eq!(b, body);
        seen.insert(w);
    }
    seen
}

fn write_nginx_conf(dir: &Path, port: u16) -> PathBuf {
    let www = dir.join("www");
    fs::create_dir_all(&www).unwrap();
    fs::create_dir_all(dir.join("logs")).unwrap();
    fs::write(www.join("index.html"), "hello from before the checkpoint\n").unwrap();
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\npid {d}/nginx.pid;\n\
         error_log {d}/logs/error.log;\nevents {{ worker_connections 64; accept_mutex off; }}\n\
         http {{\n access_log {d}/logs/access.log;\n client_body_temp_path {d}/tmp_body;\n\
         proxy_temp_path {d}/tmp_proxy;\n fastcgi_temp_path {d}/tmp_fcgi;\n\
         uwsgi_temp_path {d}/tmp_uwsgi;\n scgi_temp_path {d}/tmp_scgi;\n\
         server {{ listen 127.0.0.1:{port}; root {d}/www; add_header X-Worker $pid; }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, conf).unwrap();
    path
}

#[test]
fn nginx_master_and_workers_carry_on() {
    let Some(nginx) = installed("nginx").or_else(|| {
        let p = PathBuf::from("/usr/sbin/nginx");
        p.is_file().then_some(p)
    }) else {
        return;
    };
    let tmp = temp_dir();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    let port = free_port();
    let conf = write_nginx_conf(&dir, port);
    let error_log = dir.join("logs/error.log");
    let p = migrate_run(
        &dir,
        &nginx,
        ["-p", &dir.to_string_lossy(), "-e", &error_log.to_string_lossy(), "-c", &conf.to_string_lossy()],
    );
    let master = p.pid();
    let body = "hello from before the checkpoint\n";
    let deadline = Instant::now() + STARTUP;
    while children(master).len() < 2 {
        assert!(Instant::now() < deadline, "nginx started no workers");
        std::thread::sleep(Duration::from_millis(20));
    }
    workers_seen(port, body, 5);
    let original: BTreeSet<u32> = children(master).into_iter().map(|w| w as u32).collect();

    let image = checkpoint(master, true, &dir);
    drop(p);
    let s = resume(&image);
    // The workers that answer after the resume are the ones from before (nginx's $pid is
    // getpid() in the worker).
    let seen = workers_seen(port, body, 10);
    assert!(seen.is_subset(&original), "workers after resume {seen:?}, before {original:?}");

    // The master still supervises: kill a worker (its real pid), a new one takes its place.
    // migrate-resume is the master itself, or (original pids recreated) the master's parent.
    let comm = fs::read_to_string(format!("/proc/{}/comm", s.pid())).unwrap_or_default();
    let real_master = if comm.trim() == "nginx" { s.pid() } else { children(s.pid())[0] };
    let real_workers = children(real_master);
    assert_eq!(real_workers.len(), 2, "two workers under the resumed master: {real_workers:?}");
    // SAFETY: kill(2) on a process this test started (through migrate-resume).
    assert_eq!(unsafe { libc::kill(real_workers[0], libc::SIGKILL) }, 0);
    let deadline = Instant::now() + STARTUP;
    loop {
        let now = children(real_master);
        if now.len() == 2 && !now.contains(&real_workers[0]) {
            break;
        }
        assert!(Instant::now() < deadline, "the master did not replace its worker: {now:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (b, _) = nginx_get(port);
    assert_eq!(b, body);
    drop(s);
}

// ---------------------------------------------------------------- python3

const PY_SERVER: &str = r#"
import socketserver, sys, threading, os
state = {"count": 0, "log": []}
lock = threading.Lock()
class H(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            with lock:
                state["count"] += 1
                state["log"].append(line.strip().decode())
                reply = "count %d last %s pid %d\n" % (state["count"], state["log"][-1], os.getpid())
            self.wfile.write(reply.encode())
class S(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
srv = S(("127.0.0.1", int(sys.argv[1])), H)
print("ready pid=%d" % os.getpid(), flush=True)
srv.serve_forever()
"#;

#[test]
fn python_threaded_server_keeps_its_state() {
    let Some(python) = installed("python3") else { return };
    let tmp = temp_dir();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    let script = dir.join("server.py");
    fs::write(&script, PY_SERVER).unwrap();
    let port = free_port();
    let mut p = migrate_run(&dir, &python, [script.to_string_lossy().into_owned(), port.to_string()]);
    let ready = p.wait_line("ready ", STARTUP);
    let pid: i32 = field_num(&ready, "pid");
    let mut r = BufReader::new(connect_within(port, QUICK));
    let mut last = String::new();
    for i in 1..=5 {
        last = line_request(&mut r, &format!("hello{i}\n"));
        assert!(last.starts_with(&format!("count {i} last hello{i} ")), "{last}");
    }
    drop(r);
    let image = checkpoint(pid, true, &dir);
    p.wait_exit(Duration::from_secs(10));
    let mut s = resume(&image);
    let mut r = BufReader::new(connect_within(port, STARTUP));
    let next = line_request(&mut r, "again\n");
    let pid_part = last.rsplit_once(" pid ").unwrap().1;
    assert_eq!(next, format!("count 6 last again pid {pid_part}"), "state and getpid() continue");
    s.kill();
}
