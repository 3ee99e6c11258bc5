//! The bundled service for the README demo: in-memory state that must survive a checkpoint.
//!
//! usage: counter-service <log file> [tick ms, default 200]
//!
//! Keeps a `HashMap<String, u64>` of counters and a ring of recent events. At tick n (from 1) it
//! adds n to counter `c{n % 5}`, records the event, and appends
//! `tick <n> total=<sum of counters> state=<16 hex digits>` to the log file (opened once with
//! O_APPEND and kept open) and prints the same line to stdout. `total` is n(n+1)/2; `state` is
//! FNV-1a over the counters sorted by key, each as `key=value;`. The first stdout line is
//! `ready pid=<pid>`.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::time::Duration;

const KEEP_EVENTS: usize = 64;

fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn state_hash(counters: &HashMap<String, u64>) -> u64 {
    let mut keys: Vec<&String> = counters.keys().collect();
    keys.sort();
    let mut h = 0xcbf2_9ce4_8422_2325;
    for k in keys {
        h = fnv1a(format!("{k}={};", counters[k]).as_bytes(), h);
    }
    h
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 || args.len() > 3 {
        eprintln!("usage: {} <log file> [tick ms]", args[0]);
        std::process::exit(2);
    }
    let tick_ms: u64 = match args.get(2) {
        Some(s) => s.parse().unwrap_or_else(|_| {
            eprintln!("counter-service: bad tick ms {s:?}");
            std::process::exit(2)
        }),
        None => 200,
    };
    let mut log = OpenOptions::new().create(true).append(true).open(&args[1]).unwrap_or_else(|e| {
        eprintln!("counter-service: open {}: {e}", args[1]);
        std::process::exit(1)
    });

    let mut counters: HashMap<String, u64> = HashMap::new();
    let mut events: Vec<String> = Vec::with_capacity(KEEP_EVENTS + 1);
    println!("ready pid={}", std::process::id());
    for n in 1u64.. {
        *counters.entry(format!("c{}", n % 5)).or_insert(0) += n;
        events.push(format!("tick {n}"));
        if events.len() > KEEP_EVENTS {
            events.remove(0);
        }
        let total: u64 = counters.values().sum();
        let line = format!("tick {n} total={total} state={:016x}\n", state_hash(&counters));
        // One write per line, so the log never holds half a line.
        if let Err(e) = log.write_all(line.as_bytes()) {
            eprintln!("counter-service: write log: {e}");
            std::process::exit(1);
        }
        print!("{line}");
        std::thread::sleep(Duration::from_millis(tick_ms));
    }
}
