//! lockclient: load generator and checker for lockserver (protocol: the crate's documentation,
//! src/lib.rs).
//!
//! usage: lockclient --addr HOST:PORT [--clients N] [--seconds S] [--until-file PATH] [--hold K]
//!                   [--connect-timeout SECS] [--reply-timeout SECS]
//!
//! Starts N clients (default 4), each a thread with one TCP connection (TCP_NODELAY) kept for the
//! whole run: a connection error is a failure to report, never a reason to reconnect — the point
//! is to show that established connections survive a live migration of the server.
//!
//! Client i, as owner `c<i>`:
//! 1. acquires K locks (default 2) `held-<i>-<j>` and keeps them for the whole run;
//! 2. loops over n = 0, 1, ...: `ACQUIRE work-<i>-<n>` (expects `OK`), `HOLDER` of it (expects
//!    `c<i>`), `RELEASE` of it (expects `OK`);
//! 3. at the end, for each held lock: `HOLDER` (expects `c<i>`), `ACQUIRE` by owner `x` (expects
//!    `BUSY c<i>`), `RELEASE` by `c<i>` (expects `OK`).
//!
//! Every reply's op number must be larger than the previous one on the same connection. Each
//! request's round trip is timed; the longest one is the *max stall*, and its start, in seconds
//! since lockclient started, is *max stall at*. A connection error, end of file, a reply not
//! received within --reply-timeout (default 30 s), an unexpected or malformed reply and an op
//! number that does not increase are all errors; a client whose connection fails stops.
//!
//! The run ends after --seconds S, or once the file --until-file exists, whichever comes first
//! (default: 10 seconds), or when every client has stopped. Output on stdout:
//!   progress ops=<requests answered> errors=<n> max_stall_ms=<ms>      (about every second)
//!   done ops=<n> errors=<n> max_stall_ms=<ms> max_stall_at=<s.mmm> held_ok=<true|false>
//! `held_ok` is true when every client got and kept all its held locks. Exit status 0 if there
//! was no error and held_ok, else 1 with the first errors on stderr; 2 for a usage error.

use migrate_lockserver::{parse_reply, Reply};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: lockclient --addr HOST:PORT [--clients N] [--seconds S] [--until-file PATH] [--hold K] \
                     [--connect-timeout SECS] [--reply-timeout SECS]";

/// Error messages kept for the final report (all errors are counted).
const KEEP_ERRORS: usize = 100;
/// Error messages printed on stderr at the end.
const SHOW_ERRORS: usize = 10;
/// How often the end condition is checked.
const POLL: Duration = Duration::from_millis(50);
/// Run length when neither --seconds nor --until-file is given.
const DEFAULT_SECONDS: f64 = 10.0;

struct Config {
    addr: String,
    clients: usize,
    seconds: Option<f64>,
    until_file: Option<PathBuf>,
    hold: usize,
    connect_timeout: Duration,
    reply_timeout: Duration,
}

fn usage_error(msg: &str) -> ! {
    eprintln!("lockclient: {msg}\n{USAGE}");
    std::process::exit(2)
}

fn positive_secs(flag: &str, v: &str) -> f64 {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 => s,
        _ => usage_error(&format!("{flag} needs a positive number of seconds, got {v:?}")),
    }
}

fn parse_args() -> Config {
    let mut addr = None;
    let mut cfg = Config {
        addr: String::new(),
        clients: 4,
        seconds: None,
        until_file: None,
        hold: 2,
        connect_timeout: Duration::from_secs(10),
        reply_timeout: Duration::from_secs(30),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--help" || arg == "-h" {
            println!("{USAGE}");
            std::process::exit(0)
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value =
            || inline.clone().or_else(|| args.next()).unwrap_or_else(|| usage_error(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--addr" => addr = Some(value()),
            "--clients" => {
                let v = value();
                cfg.clients = match v.parse() {
                    Ok(n) if n > 0 => n,
                    _ => usage_error(&format!("--clients needs a positive number, got {v:?}")),
                }
            }
            "--hold" => {
                let v = value();
                cfg.hold = v.parse().unwrap_or_else(|_| usage_error(&format!("--hold needs a number, got {v:?}")))
            }
            "--seconds" => cfg.seconds = Some(positive_secs("--seconds", &value())),
            "--until-file" => cfg.until_file = Some(PathBuf::from(value())),
            "--connect-timeout" => {
                cfg.connect_timeout = Duration::from_secs_f64(positive_secs("--connect-timeout", &value()))
            }
            "--reply-timeout" => {
                cfg.reply_timeout = Duration::from_secs_f64(positive_secs("--reply-timeout", &value()))
            }
            _ => usage_error(&format!("unexpected argument {arg:?}")),
        }
    }
    cfg.addr = addr.unwrap_or_else(|| usage_error("--addr HOST:PORT is required"));
    if cfg.seconds.is_none() && cfg.until_file.is_none() {
        cfg.seconds = Some(DEFAULT_SECONDS);
    }
    cfg
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The longest round trip so far, and when its request was sent (since start).
#[derive(Default)]
struct Stall {
    max: Duration,
    at: Duration,
}

/// What the clients share with the main thread.
struct Shared {
    start: Instant,
    stop: AtomicBool,
    /// Clients still working (not yet finished or stopped by a lost connection).
    running: AtomicUsize,
    ops: AtomicU64,
    errors: AtomicU64,
    /// `stall.max` in microseconds, read without the lock to skip it on the common path.
    stall_us: AtomicU64,
    stall: Mutex<Stall>,
    messages: Mutex<Vec<String>>,
}

impl Shared {
    fn error(&self, msg: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut m = lock(&self.messages);
        if m.len() < KEEP_ERRORS {
            m.push(msg);
        }
    }

    fn answered(&self, sent: Instant, rtt: Duration) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        if us > self.stall_us.load(Ordering::Relaxed) {
            let mut s = lock(&self.stall);
            if rtt > s.max {
                s.max = rtt;
                s.at = sent.saturating_duration_since(self.start);
                self.stall_us.store(us, Ordering::Relaxed);
            }
        }
    }

    fn stall(&self) -> (Duration, Duration) {
        let s = lock(&self.stall);
        (s.max, s.at)
    }

    fn summary(&self) -> String {
        format!(
            "ops={} errors={} max_stall_ms={}",
            self.ops.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
            self.stall().0.as_millis()
        )
    }
}

/// The client's connection failed (already recorded as an error): it stops.
struct Lost;

/// One client's connection.
struct Conn<'a> {
    client: usize,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    last_op: u64,
    line: Vec<u8>,
    shared: &'a Shared,
    reply_timeout: Duration,
}

impl<'a> Conn<'a> {
    fn connect(client: usize, cfg: &Config, shared: &'a Shared) -> Result<Conn<'a>, Lost> {
        let fail = |what: String| {
            shared.error(format!("client {client}: connect to {}: {what}", cfg.addr));
            Lost
        };
        let addrs = cfg.addr.to_socket_addrs().map_err(|e| fail(e.to_string()))?;
        let mut last = "no address".to_string();
        let mut stream = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, cfg.connect_timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = format!("{a}: {e}"),
            }
        }
        let stream = stream.ok_or_else(|| fail(last))?;
        let setup = stream
            .set_nodelay(true)
            .and_then(|()| stream.set_read_timeout(Some(cfg.reply_timeout)))
            .and_then(|()| stream.set_write_timeout(Some(cfg.reply_timeout)))
            .and_then(|()| stream.try_clone());
        let reader = setup.map_err(|e| fail(format!("socket setup: {e}")))?;
        Ok(Conn {
            client,
            reader: BufReader::new(reader),
            writer: stream,
            last_op: 0,
            line: Vec::with_capacity(128),
            shared,
            reply_timeout: cfg.reply_timeout,
        })
    }

    fn lost(&self, req: &str, what: String) -> Lost {
        self.shared.error(format!("client {}: {req}: {what}", self.client));
        Lost
    }

    /// Sends `req` and reads its reply line. `Ok(None)` for a malformed reply (recorded).
    fn call(&mut self, req: &str) -> Result<(String, Option<Reply>), Lost> {
        let sent = Instant::now();
        let mut msg = Vec::with_capacity(req.len() + 1);
        msg.extend_from_slice(req.as_bytes());
        msg.push(b'\n');
        if let Err(e) = self.writer.write_all(&msg) {
            let what = match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => format!("send blocked for {:?}", self.reply_timeout),
                _ => format!("send failed: {e}"),
            };
            return Err(self.lost(req, what));
        }
        self.line.clear();
        match self.reader.read_until(b'\n', &mut self.line) {
            Ok(_) if self.line.last() == Some(&b'\n') => {}
            Ok(0) => return Err(self.lost(req, "connection closed by the server (end of file)".to_string())),
            Ok(_) => {
                let partial = String::from_utf8_lossy(&self.line).into_owned();
                return Err(self.lost(req, format!("connection closed in the middle of a reply: {partial:?}")));
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(self.lost(req, format!("no reply within {:?}", self.reply_timeout)));
            }
            Err(e) => return Err(self.lost(req, format!("receive failed: {e}"))),
        }
        self.shared.answered(sent, sent.elapsed());
        self.line.pop();
        let text = String::from_utf8_lossy(&self.line).into_owned();
        let reply = match parse_reply(&text) {
            Ok(r) => r,
            Err(e) => {
                self.shared.error(format!("client {}: {req}: {e}", self.client));
                return Ok((text, None));
            }
        };
        if let Some(op) = reply.op() {
            if op <= self.last_op {
                self.shared.error(format!(
                    "client {}: {req}: reply {text:?} has op {op}, not after the previous {} (lost, repeated or \
                     reordered reply)",
                    self.client, self.last_op
                ));
            }
            self.last_op = self.last_op.max(op);
        }
        Ok((text, Some(reply)))
    }

    /// Sends `req`; true if the reply satisfies `ok`, else records an error naming `want`.
    fn expect(&mut self, req: &str, want: &str, ok: impl Fn(&Reply) -> bool) -> Result<bool, Lost> {
        let (text, reply) = self.call(req)?;
        match reply {
            Some(r) if ok(&r) => Ok(true),
            Some(_) => {
                self.shared.error(format!("client {}: {req}: got {text:?}, expected {want}", self.client));
                Ok(false)
            }
            None => Ok(false),
        }
    }
}

fn is_ok(r: &Reply) -> bool {
    matches!(r, Reply::Ok { .. })
}

/// Client `i`'s whole run; `Ok(held_ok)` unless its connection failed.
fn client(i: usize, cfg: &Config, shared: &Shared) -> Result<bool, Lost> {
    let mut conn = Conn::connect(i, cfg, shared)?;
    let owner = format!("c{i}");
    let holder = |r: &Reply| matches!(r, Reply::Holder { owner: Some(o), .. } if *o == owner);
    let want_holder = format!("HOLDER {owner} <op>");
    let mut held_ok = true;
    for j in 0..cfg.hold {
        held_ok &= conn.expect(&format!("ACQUIRE held-{i}-{j} {owner}"), "OK <op>", is_ok)?;
    }
    let mut n: u64 = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        let name = format!("work-{i}-{n}");
        conn.expect(&format!("ACQUIRE {name} {owner}"), "OK <op>", is_ok)?;
        conn.expect(&format!("HOLDER {name}"), &want_holder, holder)?;
        conn.expect(&format!("RELEASE {name} {owner}"), "OK <op>", is_ok)?;
        n += 1;
    }
    for j in 0..cfg.hold {
        let name = format!("held-{i}-{j}");
        held_ok &= conn.expect(&format!("HOLDER {name}"), &want_holder, holder)?;
        held_ok &= conn.expect(
            &format!("ACQUIRE {name} x"),
            &format!("BUSY {owner} <op>"),
            |r| matches!(r, Reply::Busy { holder, .. } if *holder == owner),
        )?;
        held_ok &= conn.expect(&format!("RELEASE {name} {owner}"), "OK <op>", is_ok)?;
    }
    Ok(held_ok)
}

fn main() {
    let cfg = Arc::new(parse_args());
    let shared = Arc::new(Shared {
        start: Instant::now(),
        stop: AtomicBool::new(false),
        running: AtomicUsize::new(cfg.clients),
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stall_us: AtomicU64::new(0),
        stall: Mutex::new(Stall::default()),
        messages: Mutex::new(Vec::new()),
    });

    let mut threads = Vec::with_capacity(cfg.clients);
    for i in 0..cfg.clients {
        let (c, s) = (Arc::clone(&cfg), Arc::clone(&shared));
        let spawned = std::thread::Builder::new().name(format!("client {i}")).spawn(move || {
            let held_ok = client(i, &c, &s).unwrap_or(false);
            s.running.fetch_sub(1, Ordering::Relaxed);
            held_ok
        });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                shared.error(format!("client {i}: cannot start its thread: {e}"));
                shared.running.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
    let mut held_ok = threads.len() == cfg.clients;

    let start = shared.start;
    let mut next_progress = start + Duration::from_secs(1);
    loop {
        let now = Instant::now();
        let timed_out = cfg.seconds.is_some_and(|s| now.duration_since(start).as_secs_f64() >= s);
        let told = cfg.until_file.as_ref().is_some_and(|p| p.exists());
        if timed_out || told || shared.running.load(Ordering::Relaxed) == 0 {
            break;
        }
        if now >= next_progress {
            println!("progress {}", shared.summary());
            while next_progress <= now {
                next_progress += Duration::from_secs(1);
            }
        }
        std::thread::sleep(POLL.min(next_progress.saturating_duration_since(now)));
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in threads {
        held_ok &= t.join().unwrap_or(false);
    }

    let (_, at) = shared.stall();
    println!("done {} max_stall_at={:.3} held_ok={held_ok}", shared.summary(), at.as_secs_f64());
    let _ = std::io::stdout().flush();
    let errors = shared.errors.load(Ordering::Relaxed);
    if errors == 0 && held_ok {
        return;
    }
    let messages = lock(&shared.messages);
    eprintln!("lockclient: {errors} error(s), held_ok={held_ok}; the first ones:");
    for m in messages.iter().take(SHOW_ERRORS) {
        eprintln!("  {m}");
    }
    std::process::exit(1)
}
