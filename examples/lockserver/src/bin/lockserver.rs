//! lockserver: named locks over TCP, state in memory only (protocol: the crate's documentation,
//! src/lib.rs).
//!
//! usage: lockserver [--listen ADDR:PORT] [--verbose]
//!
//! Listens on ADDR:PORT (default 0.0.0.0:7070; std sets SO_REUSEADDR on Linux), prints one line
//! `ready pid=<pid> addr=<bound address>` on stdout once listening, and then serves every
//! connection on its own thread until the connection closes. Nothing is printed per request;
//! `--verbose` prints a line on stderr per connection accepted and closed. Runs until killed.

use migrate_lockserver::{Locks, DEFAULT_LISTEN, MAX_LINE};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const USAGE: &str = "usage: lockserver [--listen ADDR:PORT] [--verbose]";

struct Config {
    listen: String,
    verbose: bool,
}

fn usage_error(msg: &str) -> ! {
    eprintln!("lockserver: {msg}\n{USAGE}");
    std::process::exit(2)
}

fn parse_args() -> Config {
    let mut cfg = Config { listen: DEFAULT_LISTEN.to_string(), verbose: false };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        match flag.as_str() {
            "--listen" => {
                cfg.listen = inline.or_else(|| args.next()).unwrap_or_else(|| usage_error("--listen needs ADDR:PORT"))
            }
            "--verbose" | "-v" if inline.is_none() => cfg.verbose = true,
            "--help" | "-h" if inline.is_none() => {
                println!("{USAGE}");
                std::process::exit(0)
            }
            _ => usage_error(&format!("unexpected argument {arg:?}")),
        }
    }
    cfg
}

fn lock(state: &Mutex<Locks>) -> MutexGuard<'_, Locks> {
    // A panicking connection thread leaves the map consistent (each request is one update).
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves one connection until EOF or an error, counting the requests served in `served`.
fn serve(stream: TcpStream, state: &Mutex<Locks>, served: &mut u64) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = Vec::with_capacity(128);
    let mut out = Vec::with_capacity(128);
    loop {
        line.clear();
        // At most MAX_LINE bytes and the newline: a longer line is refused, not buffered.
        let n = (&mut reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        let complete = line.last() == Some(&b'\n');
        if !complete && line.len() > MAX_LINE {
            out.extend_from_slice(b"ERR line too long\n");
            writer.write_all(&out)?;
            return Ok(());
        }
        if complete {
            line.pop();
        }
        let text = String::from_utf8_lossy(&line);
        let reply = lock(state).handle(&text);
        *served += 1;
        out.extend_from_slice(reply.as_bytes());
        out.push(b'\n');
        // Pipelined requests get their replies in one write; otherwise reply at once.
        if reader.buffer().is_empty() {
            writer.write_all(&out)?;
            out.clear();
        }
    }
    writer.write_all(&out)
}

fn connection(stream: TcpStream, peer: SocketAddr, state: &Mutex<Locks>, verbose: bool) {
    let mut served = 0;
    let res = serve(stream, state, &mut served);
    if verbose {
        match res {
            Ok(()) => eprintln!("lockserver: closed {peer} requests={served}"),
            Err(e) => eprintln!("lockserver: closed {peer} requests={served}: {e}"),
        }
    }
}

fn main() {
    let cfg = parse_args();
    let listener = TcpListener::bind(&cfg.listen).unwrap_or_else(|e| {
        eprintln!("lockserver: cannot listen on {}: {e}", cfg.listen);
        std::process::exit(1)
    });
    let addr = listener.local_addr().map_or_else(|_| cfg.listen.clone(), |a| a.to_string());
    let started = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let state = Arc::new(Mutex::new(Locks::new(std::process::id(), started)));

    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "ready pid={} addr={addr}", std::process::id());
    let _ = stdout.flush();
    drop(stdout);

    loop {
        let (stream, peer) = match listener.accept() {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors or memory, or a connection aborted before accept: keep
                // serving the others; the pause keeps a persistent error from spinning.
                eprintln!("lockserver: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if cfg.verbose {
            eprintln!("lockserver: accepted {peer}");
        }
        let state = Arc::clone(&state);
        let verbose = cfg.verbose;
        let spawned = std::thread::Builder::new()
            .name(format!("conn {peer}"))
            .spawn(move || connection(stream, peer, &state, verbose));
        if let Err(e) = spawned {
            eprintln!("lockserver: cannot start a thread for {peer}: {e}; connection dropped");
        }
    }
}
