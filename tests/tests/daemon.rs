//! The migration daemon (`migrate-resume --listen`) against strangers and misbehaving peers, on
//! 127.0.0.1 with free ports (no namespaces, no root needed):
//!
//! * garbage of every kind (random bytes, a huge length, an HTTP request, a connection closed
//!   at once, a partial handshake, a wrong proof, a replayed handshake), over many
//!   connections, is refused with a log line naming the connection, and the daemon stays up;
//! * slow and silent connections are cut at the handshake deadline, however slowly they
//!   trickle bytes, and hold up nobody: a real migration (`migrate-checkpoint --to`) of a
//!   counter is served meanwhile, the source exits and the counter goes on under the daemon;
//! * an idle peer, authenticated or not, is dropped after the idle timeout, and so is one that
//!   trickles a frame;
//! * an authenticated peer that announces too large an image or sends too long a frame (or
//!   any other malformed stream) is refused with a clear log line and leaves nothing in the
//!   spool;
//! * one address cannot take more than its share of connections;
//! * after all of it the daemon still answers a new handshake.
//!
//! The test side speaks the protocol itself (launcher/src/cmd/wire.rs, written again here from
//! its documentation) so that it can misbehave after authenticating.

use migrate_tests::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SECRET: &str = "correct horse battery staple 2026\n";
const MAGIC: &[u8; 8] = b"MIGRATE1";
/// wire::MAX_FRAME.
const MAX_FRAME: u32 = 4 << 20;
/// receive.rs's MAX_IMAGE.
const MAX_IMAGE: u64 = 1 << 40;
/// wire::HANDSHAKE: the handshake deadline when the idle timeout is longer.
const HANDSHAKE: Duration = Duration::from_secs(10);
const HEADER: u8 = 1;
const DATA: u8 = 2;
const END: u8 = 3;
const RESULT: u8 = 4;

// ---------------------------------------------------------------------------------------------
// The daemon

struct Daemon {
    proc: Managed,
    port: u16,
    secret: PathBuf,
    spool: PathBuf,
}

impl Daemon {
    /// `migrate-resume --listen 127.0.0.1:PORT --secret-file DIR/secret --spool DIR/spool
    /// [--idle-timeout SECS]`, once it listens.
    fn start(dir: &Path, idle: Option<&str>) -> Daemon {
        let secret = dir.join("secret");
        std::fs::write(&secret, SECRET).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let spool = dir.join("spool");
        let port = free_port();
        let mut cmd = Command::new(bin("migrate-resume"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--secret-file"]).arg(&secret).arg("--spool").arg(&spool);
        if let Some(secs) = idle {
            cmd.args(["--idle-timeout", secs]);
        }
        let mut proc = Managed::spawn("migrate-resume --listen", cmd);
        proc.wait_stderr_line(|l: &str| l.contains("listening on"), STARTUP);
        Daemon { proc, port, secret, spool }
    }

    fn connect(&self) -> TcpStream {
        connect_within(self.port, QUICK)
    }

    /// Waits for the daemon's log line about the connection from local port `port` that
    /// mentions `needle`.
    #[track_caller]
    fn logged(&mut self, port: u16, needle: &str) -> String {
        let peer = format!("127.0.0.1:{port}:");
        self.proc.wait_stderr_line(|l: &str| l.contains(&peer) && l.contains(needle), QUICK)
    }

    /// Whether the daemon logged anything about the connection from local port `port`.
    fn said_anything_about(&mut self, port: u16) -> Option<String> {
        let peer = format!("127.0.0.1:{port}:");
        self.proc.stderr_so_far().into_iter().find(|l| l.contains(&peer))
    }

    #[track_caller]
    fn assert_running(&mut self) {
        if let Some(s) = self.proc.try_exit() {
            let r = self.proc.report();
            panic!("the daemon died: {}\n{r}", describe_status(s));
        }
    }

    /// Everything in the spool directory.
    fn spool_entries(&self) -> Vec<String> {
        match std::fs::read_dir(&self.spool) {
            Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The daemon still serves: a new peer authenticates.
    #[track_caller]
    fn assert_answers_a_handshake(&mut self) {
        self.assert_running();
        let peer = Peer::connect(self);
        drop(peer);
        self.assert_running();
    }
}

fn local_port(s: &TcpStream) -> u16 {
    s.local_addr().unwrap().port()
}

/// Reads (and drops) whatever comes until the daemon closes the connection; returns how long
/// that took. Panics if it is still open after `timeout`.
#[track_caller]
fn closed_within(s: &mut TcpStream, timeout: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        assert!(!left.is_zero(), "the daemon kept the connection open for {timeout:?}");
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return started.elapsed(),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the daemon kept the connection open for {timeout:?}")
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading from the daemon: {e}"),
        }
    }
}

/// Whether the daemon has sent something (or hung up) that is not read yet.
fn has_spoken(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let spoke = !matches!(s.peek(&mut [0u8; 1]), Err(e) if e.kind() == ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    spoke
}

/// Reads the daemon's 40-byte hello (magic and nonce).
#[track_caller]
fn read_hello(s: &mut TcpStream) -> [u8; 40] {
    let mut hello = [0u8; 40];
    s.read_exact(&mut hello).unwrap_or_else(|e| panic!("no hello from the daemon: {e}"));
    assert_eq!(&hello[..8], MAGIC, "the daemon's hello");
    hello
}

// ---------------------------------------------------------------------------------------------
// The protocol, from the source's side

fn key() -> [u8; 32] {
    blake3::derive_key("migrate 2026-11 peer authentication", SECRET.trim().as_bytes())
}

fn mac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    for p in parts {
        h.update(p);
    }
    *h.finalize().as_bytes()
}

/// A fresh 32-byte value (a nonce, or garbage).
fn fresh() -> [u8; 32] {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let mut h = blake3::Hasher::new();
    h.update(&t.to_le_bytes()).update(&N.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    *h.finalize().as_bytes()
}

/// `n` bytes of garbage.
fn garbage(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 32);
    while out.len() < n {
        out.extend_from_slice(&fresh());
    }
    out.truncate(n);
    out
}

fn frame_head(kind: u8, len: u32) -> [u8; 5] {
    let mut h = [kind, 0, 0, 0, 0];
    h[1..].copy_from_slice(&len.to_le_bytes());
    h
}

/// The JSON header a source sends before the image.
fn header(bytes: u64) -> Vec<u8> {
    format!(r#"{{"bytes":{bytes},"move_ip":null,"source":"daemon-test"}}"#).into_bytes()
}

/// An authenticated connection, from the source's side.
struct Peer {
    stream: TcpStream,
    port: u16,
    session: [u8; 32],
    sent: u64,
    received: u64,
    /// The client's half of the handshake, for a replay.
    answer: Vec<u8>,
}

impl Peer {
    #[track_caller]
    fn connect(d: &Daemon) -> Peer {
        let mut stream = d.connect();
        let port = local_port(&stream);
        let key = key();
        let hello = read_hello(&mut stream);
        let theirs = &hello[8..];
        let ours = fresh();
        let mut answer = MAGIC.to_vec();
        answer.extend_from_slice(&ours);
        answer.extend_from_slice(&mac(&key, &[b"client", theirs, &ours]));
        stream.write_all(&answer).unwrap();
        let mut proof = [0u8; 32];
        stream.read_exact(&mut proof).unwrap_or_else(|e| panic!("the daemon does not prove the secret: {e}"));
        assert_eq!(proof, mac(&key, &[b"server", &ours, theirs]), "the daemon's proof");
        let session = mac(&key, &[b"session", theirs, &ours]);
        Peer { stream, port, session, sent: 0, received: 0, answer }
    }

    /// Sends one well-formed frame (write errors are ignored: the daemon may have hung up).
    fn send(&mut self, kind: u8, payload: &[u8]) {
        let head = frame_head(kind, payload.len() as u32);
        let tag = mac(&self.session, &[b"frame", &self.sent.to_le_bytes(), &head, payload]);
        self.sent += 1;
        let mut out = head.to_vec();
        out.extend_from_slice(payload);
        out.extend_from_slice(&tag);
        let _ = self.stream.write_all(&out);
    }

    /// Sends raw bytes.
    fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Receives one frame, checking its MAC.
    #[track_caller]
    fn recv(&mut self) -> (u8, Vec<u8>) {
        self.stream.set_read_timeout(Some(QUICK)).unwrap();
        let mut head = [0u8; 5];
        self.stream.read_exact(&mut head).unwrap_or_else(|e| panic!("no frame from the daemon: {e}"));
        let len = u32::from_le_bytes(head[1..].try_into().unwrap()) as usize;
        assert!(len <= MAX_FRAME as usize, "the daemon sent a frame of {len} bytes");
        let mut body = vec![0u8; len + 32];
        self.stream.read_exact(&mut body).unwrap_or_else(|e| panic!("a cut frame from the daemon: {e}"));
        let (payload, tag) = body.split_at(len);
        let want = mac(&self.session, &[b"frame", &self.received.to_le_bytes(), &head, payload]);
        assert_eq!(tag, want, "the daemon's frame fails its MAC");
        self.received += 1;
        (head[0], payload.to_vec())
    }

    /// Expects the daemon's `error …` answer, then the end of the connection; returns the answer.
    #[track_caller]
    fn refused(&mut self) -> String {
        let (kind, said) = self.recv();
        let said = String::from_utf8_lossy(&said).into_owned();
        assert_eq!(kind, RESULT, "expected the daemon's answer, got a frame of kind {kind}: {said:?}");
        assert!(said.starts_with("error "), "expected an error answer: {said:?}");
        closed_within(&mut self.stream, QUICK);
        said
    }
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn garbage_is_refused_and_the_daemon_stays_up() {
    let tmp = temp_dir();
    let mut d = Daemon::start(tmp.path(), None);
    // A handshake of the real kind, recorded to be replayed.
    let recorded = Peer::connect(&d).answer.clone();
    let mut refused = 0;
    for round in 0..6 {
        // Random bytes.
        let mut s = d.connect();
        let _ = s.write_all(&garbage(64 + 100 * round));
        d.logged(local_port(&s), "refused");
        closed_within(&mut s, QUICK);
        // A frame header claiming 4 GiB, as if the handshake were over, and more behind it.
        let mut s = d.connect();
        let mut huge = frame_head(DATA, u32::MAX).to_vec();
        huge.extend_from_slice(&[0xff; 4096]);
        let _ = s.write_all(&huge);
        d.logged(local_port(&s), "does not speak the migrate protocol");
        closed_within(&mut s, QUICK);
        // An HTTP request, waiting for its answer: refused at once, not at a timeout.
        let mut s = d.connect();
        s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n").unwrap();
        let took = closed_within(&mut s, QUICK);
        assert!(took < Duration::from_secs(5), "an HTTP request was refused only after {took:?}");
        d.logged(local_port(&s), "does not speak the migrate protocol");
        // A connection closed at once.
        let s = d.connect();
        let port = local_port(&s);
        drop(s);
        d.logged(port, "refused");
        // A partial handshake, then gone.
        let mut s = d.connect();
        read_hello(&mut s);
        s.write_all(&[MAGIC.as_slice(), &garbage(20)].concat()).unwrap();
        let port = local_port(&s);
        drop(s);
        d.logged(port, "went away during the handshake");
        // The right shape with a wrong proof.
        let mut s = d.connect();
        read_hello(&mut s);
        s.write_all(&[MAGIC.as_slice(), &fresh(), &fresh()].concat()).unwrap();
        closed_within(&mut s, QUICK);
        d.logged(local_port(&s), "authentication failed");
        // A recorded handshake, replayed: the daemon's nonce is new.
        let mut s = d.connect();
        read_hello(&mut s);
        s.write_all(&recorded).unwrap();
        closed_within(&mut s, QUICK);
        d.logged(local_port(&s), "authentication failed");
        refused += 7;
        d.assert_running();
    }
    let lines = d.proc.stderr_so_far();
    assert!(
        lines.iter().filter(|l| l.starts_with("migrate-resume: refused 127.0.0.1:")).count() >= refused,
        "every garbage connection is refused with a log line:\n{}",
        lines.join("\n")
    );
    d.assert_answers_a_handshake();
    assert!(d.spool_entries().is_empty(), "nothing in the spool: {:?}", d.spool_entries());
}

/// Counter arguments: 1 MiB of heap, a tick every 100 ms, the log file.
fn counter_args(log: &Path) -> Vec<std::ffi::OsString> {
    vec!["1".into(), "100".into(), log.as_os_str().to_owned()]
}

/// The complete ticks in counter.c's log (A and B lines).
fn ticks_in(log: &Path) -> u64 {
    std::fs::read_to_string(log).map_or(0, |t| t.lines().filter(|l| l.starts_with("B ")).count() as u64)
}

#[test]
fn slow_and_silent_connections_hold_up_no_migration() {
    let tmp = temp_dir();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let mut guard = TreeGuard::new(&dir);
    // An idle timeout above the handshake deadline: a peer sending a byte every 3 s is never
    // idle, so only the deadline can cut it.
    let mut d = Daemon::start(&dir, Some("20"));

    let opened = Instant::now();
    let mut silent: Vec<TcpStream> = (0..3).map(|_| d.connect()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut slow = Vec::new();
    for _ in 0..3 {
        let s = d.connect();
        let mut writer = s.try_clone().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            // One byte every 3 s, starting with the right magic; ends when the daemon hangs up.
            for b in MAGIC.iter().copied().chain(std::iter::repeat_n(0u8, 64)) {
                if stop.load(Ordering::Relaxed) || writer.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(3));
            }
        });
        slow.push(s);
    }

    // Meanwhile, a real migration from a migrate-run on this host.
    let log = dir.join("counter.log");
    let mut counter = migrate_run(&dir, &cbin("counter"), counter_args(&log));
    let pid: i32 = field_num(&counter.wait_line("ready ", STARTUP), "pid");
    guard.add(pid);
    counter.wait_line("tick ", LINE);
    counter.wait_line("tick ", LINE);
    let mut cmd = Command::new(bin("migrate-checkpoint"));
    cmd.args(["--to", &format!("127.0.0.1:{}", d.port), "--secret-file"]).arg(&d.secret).arg(pid.to_string());
    let asked = Instant::now();
    let out = run_tool("migrate-checkpoint --to", cmd, STARTUP);
    let took = asked.elapsed();
    assert_eq!(out.code(), Some(0), "the migration succeeds: {}\n{}", out.describe(), d.proc.report());
    assert!(took < HANDSHAKE, "the migration took {took:?}: it waited for the slow connections");
    let busy: Vec<&TcpStream> = silent.iter().chain(slow.iter()).collect();
    if opened.elapsed() < HANDSHAKE {
        for s in &busy {
            let port = local_port(s);
            assert_eq!(d.said_anything_about(port), None, "the slow connection {port} was still being waited for");
        }
    }
    println!("migrated in {took:?} while 3 silent and 3 slow connections were open: {}", out.stdout.trim());

    // The source's copy exits; the counter goes on under the daemon (its stdout is not ours
    // any more: its log file shows it).
    counter.wait_exit(LINE);
    d.proc.wait_stderr_line(|l: &str| l.contains(": resumed as pid"), STARTUP);
    let at = ticks_in(&log);
    let deadline = Instant::now() + LINE;
    while ticks_in(&log) < at + 5 {
        assert!(Instant::now() < deadline, "the migrated counter does not go on: {at} ticks in its log");
        std::thread::sleep(Duration::from_millis(50));
    }
    let resumed: Vec<i32> = processes_mentioning(dir.as_os_str().as_encoded_bytes())
        .into_iter()
        .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "counter"))
        .collect();
    assert_eq!(resumed.len(), 1, "one counter runs, under the daemon: {resumed:?}");
    let now = ticks_in(&log);
    check_counter_log(&log, now, now + 100);

    // The slow and silent connections are cut at the handshake deadline, each with a log line.
    let cut = HANDSHAKE + Duration::from_secs(10);
    for s in silent.iter_mut().chain(slow.iter_mut()) {
        closed_within(s, cut.saturating_sub(opened.elapsed()).max(Duration::from_secs(1)));
        d.logged(local_port(s), "did not complete the handshake within 10 s");
    }
    stop.store(true, Ordering::Relaxed);
    let all = opened.elapsed();
    assert!(all >= HANDSHAKE - Duration::from_secs(1), "cut before the deadline: {all:?}");
    d.assert_answers_a_handshake();
    guard.kill_all();
}

#[test]
fn idle_peers_are_dropped_after_the_idle_timeout() {
    let tmp = temp_dir();
    let mut d = Daemon::start(tmp.path(), Some("2"));
    let idle = Duration::from_secs(2);
    let within = |took: Duration, what: &str| {
        assert!(
            took >= idle - Duration::from_millis(300) && took < idle + Duration::from_secs(8),
            "{what} was dropped after {took:?}, the idle timeout is {idle:?}"
        );
    };

    // A stranger that sends nothing (the handshake deadline is the idle timeout then).
    let mut s = d.connect();
    read_hello(&mut s);
    within(closed_within(&mut s, QUICK), "a silent stranger");
    d.logged(local_port(&s), "did not complete the handshake within 2 s");

    // An authenticated peer that then sends nothing.
    let mut p = Peer::connect(&d);
    within(closed_within(&mut p.stream, QUICK), "a silent peer");
    d.logged(p.port, "sent nothing for 2 s");

    // An authenticated peer that stops in the middle of the image.
    let mut p = Peer::connect(&d);
    p.send(HEADER, &header(1 << 20));
    p.send(DATA, &[7u8; 64 << 10]);
    let said = p.refused();
    assert!(said.contains("sent nothing for 2 s"), "{said}");
    d.logged(p.port, "sent nothing for 2 s");

    // An authenticated peer that trickles a frame, a byte every 0.5 s: never idle for 2 s, but
    // the frame must arrive whole within them.
    let mut p = Peer::connect(&d);
    p.send(HEADER, &header(1 << 20));
    p.send_raw(&frame_head(DATA, 4096));
    let started = Instant::now();
    // Until the daemon answers (no later: a write after its close would reset the connection).
    while !has_spoken(&p.stream) {
        assert!(started.elapsed() < QUICK, "the daemon waits for a trickled frame for ever");
        p.send_raw(&[1]);
        std::thread::sleep(Duration::from_millis(500));
    }
    let said = p.refused();
    assert!(said.contains("took more than 2 s to send a frame"), "{said}");
    d.logged(p.port, "took more than 2 s");

    assert!(d.spool_entries().is_empty(), "nothing is left in the spool: {:?}", d.spool_entries());
    d.assert_answers_a_handshake();
}

/// Bytes free in `dir`'s file system.
fn free_bytes(dir: &Path) -> u64 {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs is plain data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out pointer.
    assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0, "statvfs {}", dir.display());
    st.f_bavail * st.f_frsize
}

#[test]
fn oversized_images_and_frames_are_refused_and_leave_nothing_in_the_spool() {
    let tmp = temp_dir();
    let mut d = Daemon::start(tmp.path(), None);

    // An image larger than any the daemon accepts.
    let mut p = Peer::connect(&d);
    p.send(HEADER, &header(1 << 50));
    let said = p.refused();
    assert!(said.contains("larger than this daemon accepts"), "{said}");
    d.logged(p.port, "refused an image of 1125899906842624 bytes");

    // An image larger than the spool's free space (but not than the daemon's bound).
    let free = free_bytes(&d.spool);
    if free + (1 << 30) <= MAX_IMAGE {
        let mut p = Peer::connect(&d);
        p.send(HEADER, &header(free + (1 << 30)));
        let said = p.refused();
        assert!(said.contains("bytes free"), "{said}");
        d.logged(p.port, "bytes free");
    } else {
        println!("(the spool's file system has more than 1 TiB free: the free-space check is not exercised)");
    }

    // A header frame claiming 4 GiB: refused before anything is allocated.
    let mut p = Peer::connect(&d);
    p.send_raw(&frame_head(HEADER, u32::MAX));
    closed_within(&mut p.stream, QUICK);
    d.logged(p.port, "the peer sent a frame of 4294967295 bytes");

    // Part of an image, then a data frame one byte over the bound.
    let mut p = Peer::connect(&d);
    p.send(HEADER, &header(10 << 20));
    p.send(DATA, &[1u8; 1 << 20]);
    p.send_raw(&frame_head(DATA, MAX_FRAME + 1));
    let said = p.refused();
    assert!(said.contains(&format!("a frame of {} bytes", MAX_FRAME + 1)), "{said}");
    d.logged(p.port, &format!("a frame of {} bytes", MAX_FRAME + 1));

    // The same with the largest length there is.
    let mut p = Peer::connect(&d);
    p.send(HEADER, &header(10 << 20));
    p.send_raw(&frame_head(DATA, u32::MAX));
    p.refused();
    d.logged(p.port, "a frame of 4294967295 bytes");

    // More than announced.
    let mut p = Peer::connect(&d);
    p.send(HEADER, &header(1000));
    p.send(DATA, &[2u8; 2000]);
    p.refused();
    d.logged(p.port, "more than the 1000 bytes it announced");

    // Less than announced.
    let mut p = Peer::connect(&d);
    p.send(HEADER, &header(1 << 20));
    p.send(DATA, &[3u8; 1000]);
    p.send(END, &[]);
    p.refused();
    d.logged(p.port, "ended after 1000 of 1048576 bytes");

    // A frame altered on the way.
    let mut p = Peer::connect(&d);
    p.send(HEADER, &header(1 << 20));
    let head = frame_head(DATA, 100);
    let tag = mac(&p.session, &[b"frame", &p.sent.to_le_bytes(), &head, &[4u8; 100]]);
    p.send_raw(&[head.as_slice(), &[5u8; 100], &tag].concat());
    p.refused();
    d.logged(p.port, "failed its authentication check");

    // A frame of an unknown kind, and a malformed header.
    let mut p = Peer::connect(&d);
    p.send(HEADER, &header(1 << 20));
    p.send(99, b"?");
    p.refused();
    d.logged(p.port, "unexpected frame of kind 99");
    let mut p = Peer::connect(&d);
    p.send(HEADER, b"{\"bytes\": \"many\"}");
    closed_within(&mut p.stream, QUICK);
    d.logged(p.port, "malformed header");

    assert!(d.spool_entries().is_empty(), "nothing is left in the spool: {:?}", d.spool_entries());
    d.assert_answers_a_handshake();
}

#[test]
fn one_address_cannot_take_every_connection() {
    let tmp = temp_dir();
    let mut d = Daemon::start(tmp.path(), None);
    // Silent connections until the daemon refuses one (it says hello to those it serves).
    let mut held = Vec::new();
    let refused = loop {
        let mut s = d.connect();
        let mut hello = [0u8; 40];
        match s.read_exact(&mut hello) {
            Ok(()) => held.push(s),
            Err(_) => break local_port(&s),
        }
        assert!(held.len() <= 64, "the daemon took 65 unauthenticated connections from one address");
    };
    d.logged(refused, "too many unauthenticated connections from 127.0.0.1");
    println!("refused the connection after {} unauthenticated ones from 127.0.0.1", held.len());
    // They free their places when they go.
    let ports: Vec<u16> = held.iter().map(local_port).collect();
    drop(held);
    for port in ports {
        d.logged(port, "refused");
    }
    d.assert_answers_a_handshake();
}
