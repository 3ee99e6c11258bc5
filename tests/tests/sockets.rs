//! Network services: a TCP server with in-memory state comes back listening on its port with
//! its state; a connection that was open at checkpoint time is rebuilt with TCP repair (the
//! client notices nothing, not even a request it sent while the server was gone), or, with
//! --tcp-reset, comes back reset so the server sees ECONNRESET and clients reconnect; a port
//! taken on the target is refused up front, naming it.

use migrate_tests::*;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

const SERVER_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <pthread.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
static long counter;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static void *serve(void *arg) {
    int c = (int)(long)arg;
    char buf[256];
    FILE *in = fdopen(dup(c), "r");
    while (fgets(buf, sizeof buf, in)) {
        pthread_mutex_lock(&mu);
        long v = ++counter;
        pthread_mutex_unlock(&mu);
        char out[64];
        int n = snprintf(out, sizeof out, "count %ld\n", v);
        if (write(c, out, n) != n) break;
    }
    printf("client gone\n");
    fclose(in);
    close(c);
    return NULL;
}
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int l = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(l, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])), .sin_addr.s_addr = htonl(0x7f000001) };
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 17)) { perror("listen"); return 1; }
    printf("ready pid=%d\n", (int)getpid());
    /* With a path: connections stay in the accept queue until that file exists. */
    if (argc > 2) while (access(argv[2], F_OK) != 0) usleep(10000);
    for (;;) {
        int c = accept(l, NULL, NULL);
        if (c < 0) continue;
        pthread_t t;
        pthread_create(&t, NULL, serve, (void *)(long)c);
        pthread_detach(t);
    }
}
"#;

fn build(dir: &Path) -> PathBuf {
    compile_c(dir, "server", SERVER_C, &["-pthread"])
}

/// The server, started under migrate-run on a free port in `tmp`; with `go`, it accepts only
/// once that file (in `tmp`) exists.
struct Server {
    dir: PathBuf,
    port: u16,
    p: Managed,
    pid: i32,
}

fn start_server(tmp: &Path, go: Option<&str>) -> Server {
    let dir = fs::canonicalize(tmp).unwrap();
    let prog = build(&dir);
    let port = free_port();
    let mut args = vec![port.to_string()];
    args.extend(go.map(|g| dir.join(g).display().to_string()));
    let mut p = migrate_run(&dir, &prog, args);
    let pid: i32 = field_num(&p.wait_line("ready ", STARTUP), "pid");
    Server { dir, port, p, pid }
}

fn request(conn: &mut TcpStream, reader: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    conn.write_all(b"incr\n")?;
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
    }
    Ok(line.trim().to_string())
}

fn connect(port: u16) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the server");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

/// Whether nftables table `inet <name>` exists (a network lock in place).
fn lock_held(name: &str) -> bool {
    let out = std::process::Command::new("nft")
        .args(["list", "table", "inet", name])
        .output()
        .expect("nft (nftables) is installed");
    out.status.success()
}

struct Connected {
    port: u16,
    image: PathBuf,
    c: TcpStream,
    r: BufReader<TcpStream>,
}

/// The server with one client that made three requests, checkpointed with --kill and gone;
/// the client's connection is still open.
fn checkpoint_with_a_connection(tmp: &Path) -> Connected {
    let Server { dir, port, mut p, pid } = start_server(tmp, None);
    let (mut c, mut r) = connect(port);
    for want in 1..=3 {
        assert_eq!(request(&mut c, &mut r).unwrap(), format!("count {want}"));
    }
    let image = checkpoint(pid, true, &dir);
    p.read_to_eof(LINE);
    p.wait_exit(Duration::from_secs(10));
    Connected { port, image, c, r }
}

#[test]
fn an_open_connection_survives_with_tcp_repair() {
    let tmp = temp_dir();
    let Connected { port, image, mut c, mut r } = checkpoint_with_a_connection(tmp.path());
    let inspect = inspect_output(&[], &image);
    assert!(inspect.stdout.contains("TCP repair"), "the connection's state is in the image: {}", inspect.stdout);
    let lock = inspect.stdout.split("nft table inet ").nth(1).and_then(|r| r.split(')').next()).unwrap_or_else(|| {
        panic!("the image names its network lock: {}", inspect.stdout);
    });
    assert!(lock_held(lock), "the connection's traffic is held until the resume");
    // Sent while the server is gone: the lock drops it, the client's kernel retransmits.
    c.write_all(b"incr\n").unwrap();

    let mut s = resume(&image);
    let mut line = String::new();
    r.read_line(&mut line).expect("the request sent during the checkpoint is answered, not reset");
    assert_eq!(line.trim(), "count 4");
    assert_eq!(request(&mut c, &mut r).unwrap(), "count 5", "the same connection goes on");
    // A new client too; the counter is shared.
    let (mut c2, mut r2) = connect(port);
    assert_eq!(request(&mut c2, &mut r2).unwrap(), "count 6");
    assert!(!lock_held(lock), "the lock is lifted once the program runs again");
    let stderr = s.stderr_so_far().join("\n");
    assert!(!stderr.contains("was reset"), "{stderr}");
    s.kill();
}

#[test]
fn with_tcp_reset_an_open_connection_comes_back_reset() {
    let tmp = temp_dir();
    let Connected { port, image, mut c, mut r } = checkpoint_with_a_connection(tmp.path());
    let inspect = inspect_output(&[], &image);
    assert!(inspect.stdout.contains(&format!("listening on 127.0.0.1:{port}")), "{}", inspect.stdout);

    let mut s = resume_with(&["--tcp-reset"], &image);
    // The connection that was open comes back reset on the server's side: its thread ends.
    s.wait_line("client gone", STARTUP);
    // The old client sees its connection gone (the original process died), never a stale answer.
    assert!(request(&mut c, &mut r).is_err(), "the old connection must not silently answer");
    // A new client: same port, state intact (the counter goes on from 3).
    let (mut c2, mut r2) = connect(port);
    assert_eq!(request(&mut c2, &mut r2).unwrap(), "count 4");
    assert_eq!(request(&mut c2, &mut r2).unwrap(), "count 5");
    let stderr = s.stderr_so_far().join("\n");
    assert!(stderr.contains("was reset"), "resume says the connection was reset: {stderr}");
    s.kill();
}

#[test]
fn a_taken_port_is_refused_before_anything_runs() {
    let tmp = temp_dir();
    let Server { dir, port, mut p, pid } = start_server(tmp.path(), None);
    let image = checkpoint(pid, true, &dir);
    p.wait_exit(Duration::from_secs(10));
    let squatter = TcpListener::bind(("127.0.0.1", port)).expect("take the port");
    let out = run_tool("migrate-resume", resume_cmd(&[], &image), STARTUP);
    out.assert_fails("resume onto a taken port", 4, &[&format!("127.0.0.1:{port}"), "in use"]);
    assert!(out.stderr.contains("nft delete table inet"), "the kept network lock is explained: {}", out.stderr);
    // Once the port is free, the same image resumes (and lifts the lock).
    drop(squatter);
    let mut s = resume(&image);
    let mut c = connect_within(port, STARTUP);
    let mut r = BufReader::new(c.try_clone().unwrap());
    assert_eq!(request(&mut c, &mut r).unwrap(), "count 1");
    s.kill();
}

/// `n` clients whose connections the server has not accepted yet, each with a request sent.
fn waiting_clients(port: u16, n: usize) -> Vec<(TcpStream, BufReader<TcpStream>)> {
    let mut waiting: Vec<(TcpStream, BufReader<TcpStream>)> = (0..n).map(|_| connect(port)).collect();
    for (c, _) in waiting.iter_mut() {
        c.write_all(b"incr\n").unwrap();
    }
    waiting
}

/// The answer each waiting client gets once its connection is accepted, sorted.
fn sorted_replies(waiting: &mut [(TcpStream, BufReader<TcpStream>)]) -> Vec<String> {
    let mut counts: Vec<String> = waiting
        .iter_mut()
        .map(|(_, r)| {
            let mut line = String::new();
            r.read_line(&mut line).expect("a waiting connection is accepted and served");
            line.trim().to_string()
        })
        .collect();
    counts.sort();
    counts
}

#[test]
fn connections_waiting_in_the_accept_queue_are_carried() {
    let tmp = temp_dir();
    let Server { dir, port, mut p, pid } = start_server(tmp.path(), Some("go"));
    let go = dir.join("go");
    // The kernel completes these handshakes; the program has not accepted them yet. Their
    // requests wait in the connections' receive queues.
    let mut waiting = waiting_clients(port, 2);
    let image = checkpoint(pid, true, &dir);
    p.wait_exit(Duration::from_secs(10));
    let inspect = inspect_output(&[], &image);
    assert!(inspect.stdout.contains("(2 waiting connections carried)"), "{}", inspect.stdout);

    let mut s = resume(&image);
    fs::write(&go, "").unwrap(); // the program accepts from now on
    let counts = sorted_replies(&mut waiting);
    assert_eq!(counts, ["count 1", "count 2"], "both requests answered once");
    for (c, r) in waiting.iter_mut() {
        assert!(request(c, r).unwrap().starts_with("count "), "the connection goes on");
    }
    let stderr = s.stderr_so_far().join("\n");
    assert!(!stderr.contains("not carried"), "{stderr}");
    s.kill();
}

#[test]
fn connections_waiting_at_a_checkpoint_that_leaves_the_program_running_are_reported() {
    let tmp = temp_dir();
    let Server { dir, port, mut p, pid } = start_server(tmp.path(), Some("never"));
    // The kernel completes these handshakes; the program never accepts them.
    let waiting: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    // The program goes on, so its queue stays its own; then it crashes, and the image is all
    // that is left.
    let image = checkpoint(pid, false, &dir);
    p.kill();
    let inspect = inspect_output(&[], &image);
    assert!(inspect.stdout.contains("(2 connections waiting, not carried)"), "{}", inspect.stdout);
    let mut s = resume(&image);
    let deadline = std::time::Instant::now() + STARTUP;
    loop {
        let err = s.stderr_so_far().join("\n");
        if err.contains("2 connections waiting to be accepted") {
            assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "resume did not report the lost connections: {err}");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(waiting);
    s.kill();
}

const NETLINK_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
/* A NETLINK_ROUTE socket bound to a group below 32 and joined to one above: after a resume
   it still answers a link dump and has the same groups. */
static int links(int s) {
    struct { struct nlmsghdr h; struct ifinfomsg i; } req = {
        .h = { .nlmsg_len = sizeof req, .nlmsg_type = RTM_GETLINK, .nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP, .nlmsg_seq = 1 },
        .i = { .ifi_family = AF_UNSPEC } };
    if (send(s, &req, sizeof req, 0) < 0) return -1;
    static char buf[65536];
    int n = 0;
    for (;;) {
        int len = recv(s, buf, sizeof buf, 0);
        if (len <= 0) return -1;
        for (struct nlmsghdr *h = (void *)buf; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
            if (h->nlmsg_type == NLMSG_DONE) return n;
            if (h->nlmsg_type == NLMSG_ERROR) return -1;
            if (h->nlmsg_type == RTM_NEWLINK) n++;
        }
    }
}
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int s = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    struct sockaddr_nl a = { .nl_family = AF_NETLINK, .nl_groups = RTMGRP_LINK };
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a)) { perror("netlink"); return 1; }
    int g = RTNLGRP_BRVLAN; /* 33: only reachable with NETLINK_ADD_MEMBERSHIP */
    if (setsockopt(s, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &g, sizeof g)) { perror("membership"); return 1; }
    for (long tick = 1;; tick++) {
        unsigned words[2] = {0, 0};
        socklen_t len = sizeof words;
        getsockopt(s, SOL_NETLINK, NETLINK_LIST_MEMBERSHIPS, words, &len);
        printf("tick %ld links=%d groups=%x,%x\n", tick, links(s), words[0], words[1]);
        usleep(100000);
    }
}
"#;

#[test]
fn a_netlink_socket_keeps_its_groups_and_answers() {
    let tmp = temp_dir();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    let prog = compile_c(&dir, "netlink", NETLINK_C, &[]);
    let mut p = migrate_run(&dir, &prog, Vec::<String>::new());
    let before = p.wait_line("tick ", STARTUP);
    let groups = field(&before, "groups").expect("groups").to_string();
    assert_eq!(groups, "1,1", "RTMGRP_LINK (group 1) and group 33: {before}");
    let image = checkpoint(p.pid(), true, &dir);
    let last = p.read_to_eof(LINE).iter().rev().find(|l| l.starts_with("tick ")).cloned().unwrap_or(before);
    p.wait_exit(Duration::from_secs(10));

    let mut s = resume(&image);
    let next = s.wait_line("tick ", STARTUP);
    assert_eq!(tick_number(&next), tick_number(&last) + 1, "continues: {last} then {next}");
    assert_eq!(field(&next, "groups"), Some(groups.as_str()), "same groups: {next}");
    let links: i32 = field_num(&next, "links");
    assert!(links >= 1, "the restored socket answers a link dump: {next}");
    s.kill();
}

const UDP_C: &str = r#"
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>
/* A UDP server (bound: answers "incr" with a counter) and a connected UDP sender that sends
   "tick N" to a fixed peer: both must come back with their addresses. */
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int srv = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])), .sin_addr.s_addr = htonl(0x7f000001) };
    if (bind(srv, (struct sockaddr *)&a, sizeof a)) { perror("bind"); return 1; }
    int out = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in p = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])), .sin_addr.s_addr = htonl(0x7f000001) };
    if (connect(out, (struct sockaddr *)&p, sizeof p)) { perror("connect"); return 1; }
    printf("ready pid=%d\n", (int)getpid());
    long count = 0;
    for (long tick = 1;; tick++) {
        char msg[64];
        int n = snprintf(msg, sizeof msg, "tick %ld", tick);
        send(out, msg, n, 0);
        struct pollfd f = { .fd = srv, .events = POLLIN };
        if (poll(&f, 1, 100) == 1) {
            char buf[64];
            struct sockaddr_in from;
            socklen_t len = sizeof from;
            if (recvfrom(srv, buf, sizeof buf, 0, (struct sockaddr *)&from, &len) > 0) {
                n = snprintf(msg, sizeof msg, "count %ld", ++count);
                sendto(srv, msg, n, 0, (struct sockaddr *)&from, len);
            }
        }
    }
}
"#;

fn udp_request(u: &std::net::UdpSocket, port: u16) -> String {
    // UDP is lossy by contract (the port is closed until the resume binds it): ask again.
    for _ in 0..100 {
        let _ = u.send_to(b"incr", ("127.0.0.1", port));
        let mut buf = [0u8; 64];
        if let Ok((n, _)) = u.recv_from(&mut buf) {
            return String::from_utf8_lossy(&buf[..n]).into_owned();
        }
    }
    panic!("no answer from the UDP server on port {port}");
}

/// The next "tick N" datagram and where it came from, if one comes within the read timeout.
fn try_udp_tick(r: &std::net::UdpSocket) -> Option<(u64, std::net::SocketAddr)> {
    let mut buf = [0u8; 64];
    let (n, from) = r.recv_from(&mut buf).ok()?;
    Some((tick_number(&String::from_utf8_lossy(&buf[..n])), from))
}

fn udp_tick(r: &std::net::UdpSocket) -> (u64, std::net::SocketAddr) {
    try_udp_tick(r).expect("a tick datagram within the timeout")
}

#[test]
fn udp_sockets_come_back_bound_and_connected() {
    let tmp = temp_dir();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    let prog = compile_c(&dir, "udp", UDP_C, &[]);
    let port = free_port();
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    receiver.set_read_timeout(Some(STARTUP)).unwrap();
    let mut p = migrate_run(&dir, &prog, [port.to_string(), receiver.local_addr().unwrap().port().to_string()]);
    p.wait_line("ready ", STARTUP);
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert_eq!(udp_request(&client, port), "count 1");
    assert_eq!(udp_request(&client, port), "count 2");
    let (_, sender) = udp_tick(&receiver);
    let image = checkpoint(p.pid(), true, &dir);
    p.wait_exit(Duration::from_secs(10));
    // The last tick sent before the checkpoint.
    receiver.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut last = 0;
    while let Some((n, _)) = try_udp_tick(&receiver) {
        last = n;
    }
    receiver.set_read_timeout(Some(STARTUP)).unwrap();

    let mut s = resume(&image);
    let (next, from) = udp_tick(&receiver);
    assert_eq!(next, last + 1, "the connected socket sends on from where it was");
    assert_eq!(from, sender, "from the same address and port");
    assert_eq!(udp_request(&client, port), "count 3", "the bound socket serves with its state");
    s.kill();
}

#[test]
fn a_failed_checkpoint_hands_the_waiting_connections_back() {
    if !is_root() {
        println!("SKIP: a_failed_checkpoint_hands_the_waiting_connections_back needs root to mount a tiny tmpfs");
        return;
    }
    let tmp = temp_dir();
    let Server { dir, port, mut p, pid } = start_server(tmp.path(), Some("go"));
    let full = TmpfsMount::new(&dir.join("full"), "size=64k").expect("mount a 64 KiB tmpfs");
    let go = dir.join("go");
    let mut waiting = waiting_clients(port, 2);
    // The checkpoint takes them out of the queue, then fails writing: they go back.
    checkpoint_output(pid, true, full.path()).assert_fails("checkpoint into a full tmpfs", 6, &[]);
    assert!(p.try_exit().is_none(), "the program keeps running\n{}", p.report());
    fs::write(&go, "").unwrap();
    let counts = sorted_replies(&mut waiting);
    assert_eq!(counts, ["count 1", "count 2"]);
    p.kill();
}

const OPTIONS_C: &str = r#"
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
/* An IPv6 server with the options services set, answering one client at a time:
   "incr" -> "count N", "opts" -> the options of its listener and of the connection. */
static int get(int fd, int level, int name) { int v = -1; socklen_t n = sizeof v; getsockopt(fd, level, name, &v, &n); return v; }
static void set(int fd, int level, int name, int v) { setsockopt(fd, level, name, &v, sizeof v); }
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int l = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK, 0);
    set(l, IPPROTO_IPV6, IPV6_V6ONLY, 1);
    set(l, SOL_SOCKET, SO_REUSEADDR, 1);
    set(l, SOL_SOCKET, SO_REUSEPORT, 1);
    set(l, SOL_SOCKET, SO_RCVBUF, 96 * 1024);
    set(l, IPPROTO_TCP, TCP_NODELAY, 1);
    struct sockaddr_in6 a = { .sin6_family = AF_INET6, .sin6_port = htons(atoi(argv[1])), .sin6_addr = IN6ADDR_LOOPBACK_INIT };
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 23)) { perror("listen"); return 1; }
    printf("ready pid=%d\n", (int)getpid());
    long count = 0;
    for (;;) {
        int c = accept4(l, NULL, NULL, 0);
        if (c < 0) { struct pollfd f = { .fd = l, .events = POLLIN }; poll(&f, 1, -1); continue; }
        set(c, SOL_SOCKET, SO_KEEPALIVE, 1);
        set(c, IPPROTO_TCP, TCP_KEEPIDLE, 77);
        set(c, IPPROTO_TCP, TCP_NODELAY, 1);
        FILE *in = fdopen(dup(c), "r");
        char line[64], out[256];
        while (fgets(line, sizeof line, in)) {
            int n;
            if (!strncmp(line, "opts", 4))
                n = snprintf(out, sizeof out,
                    "listener v6only=%d reuseaddr=%d reuseport=%d rcvbuf=%d nodelay=%d nonblock=%d conn keepalive=%d keepidle=%d nodelay=%d\n",
                    get(l, IPPROTO_IPV6, IPV6_V6ONLY), get(l, SOL_SOCKET, SO_REUSEADDR), get(l, SOL_SOCKET, SO_REUSEPORT),
                    get(l, SOL_SOCKET, SO_RCVBUF), get(l, IPPROTO_TCP, TCP_NODELAY), !!(fcntl(l, F_GETFL) & O_NONBLOCK),
                    get(c, SOL_SOCKET, SO_KEEPALIVE), get(c, IPPROTO_TCP, TCP_KEEPIDLE), get(c, IPPROTO_TCP, TCP_NODELAY));
            else
                n = snprintf(out, sizeof out, "count %ld\n", ++count);
            if (write(c, out, n) != n) break;
        }
        fclose(in);
        close(c);
    }
}
"#;

/// A listener's backlog as the kernel reports it (`ss`: Send-Q of a listening socket).
fn listen_backlog(port: u16) -> Option<u32> {
    let out = std::process::Command::new("ss").args(["-ltnH", &format!("sport = :{port}")]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).split_whitespace().nth(2)?.parse().ok()
}

#[test]
fn an_ipv6_server_keeps_its_options_backlog_and_connection() {
    let tmp = temp_dir();
    let dir = fs::canonicalize(tmp.path()).unwrap();
    let prog = compile_c(&dir, "server6", OPTIONS_C, &[]);
    let port = free_port();
    let mut p = migrate_run(&dir, &prog, [port.to_string()]);
    p.wait_line("ready ", STARTUP);
    let c = TcpStream::connect(("::1", port)).expect("connect over IPv6");
    c.set_read_timeout(Some(STARTUP)).unwrap();
    let mut c = (c.try_clone().unwrap(), BufReader::new(c));
    let ask = |(w, r): &mut (TcpStream, BufReader<TcpStream>), what: &str| {
        w.write_all(format!("{what}\n").as_bytes()).unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap_or_else(|e| panic!("answer to {what}: {e}"));
        line.trim().to_string()
    };
    let options = ask(&mut c, "opts");
    assert!(options.contains("v6only=1 reuseaddr=1 reuseport=1") && options.contains("nonblock=1"), "{options}");
    assert!(options.contains("keepalive=1 keepidle=77 nodelay=1"), "{options}");
    assert_eq!(ask(&mut c, "incr"), "count 1");
    assert_eq!(listen_backlog(port), Some(23), "the backlog given to listen()");

    let image = checkpoint(p.pid(), true, &dir);
    p.wait_exit(Duration::from_secs(10));
    c.0.write_all(b"incr\n").unwrap(); // while the server is gone
    let mut s = resume(&image);
    let mut line = String::new();
    c.1.read_line(&mut line).expect("the IPv6 connection survives");
    assert_eq!(line.trim(), "count 2");
    assert_eq!(ask(&mut c, "opts"), options, "every option is back, on the listener and the connection");
    assert_eq!(listen_backlog(port), Some(23), "the backlog is back");
    s.kill();
}
