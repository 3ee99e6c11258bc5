//! A minimal Rust counterpart of examples/c/counter.c.
//!
//! usage: rust-counter <MiB of heap buffer> <tick ms>
//!
//! Prints `ready pid=<pid> seed=<16 hex>` and then, every tick n (from 1),
//! `tick <n> pid=<pid> heap=<16 hex>`, where heap is a checksum of a `Vec<u8>` of the given size
//! filled with xorshift64 bytes (one 64-bit word per 64 bytes, FNV-1a mixed), recomputed from
//! memory every tick; it is constant for the life of the process.

use std::time::Duration;

fn xorshift64(s: &mut u64) -> u64 {
    let mut x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    x
}

fn heap_checksum(buf: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for chunk in buf.chunks(64) {
        let mut word = [0u8; 8];
        let n = chunk.len().min(8);
        word[..n].copy_from_slice(&chunk[..n]);
        h ^= u64::from_le_bytes(word);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        eprintln!("usage: rust-counter <MiB of heap buffer> <tick ms> (bad or missing {what})");
        std::process::exit(2)
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = arg(&args, 1, "MiB");
    let tick_ms: u64 = arg(&args, 2, "tick ms");
    let pid = std::process::id();
    let seed = 0x2545_f491_4f6c_dd1d_u64 ^ u64::from(pid);
    let mut state = seed;
    let mut buf = vec![0u8; (mib << 20).max(64)];
    for chunk in buf.chunks_mut(8) {
        let bytes = xorshift64(&mut state).to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    println!("ready pid={pid} seed={seed:016x}");
    for n in 1u64.. {
        println!("tick {n} pid={} heap={:016x}", std::process::id(), heap_checksum(&buf));
        std::thread::sleep(Duration::from_millis(tick_ms));
    }
}
