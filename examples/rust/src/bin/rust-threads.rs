//! std::thread state that must survive a checkpoint: a channel, mutexes, atomics, a parked
//! thread.
//!
//! usage: rust-threads
//!
//! Threads: a producer sends 1, 2, 3, ... (one every millisecond) over an mpsc channel to a
//! consumer that adds each value to an `Arc<Mutex<(sum, received)>>` (checking they arrive in
//! order); three workers increment an `AtomicU64` and push to a `Mutex<Vec<u64>>`; a thread
//! waits in `thread::park_timeout(50 ms)` and is unparked by main every tick; a thread reads
//! stdin.
//!
//! Output (stdout, one line per event):
//!   ready pid=<pid>
//!   tick <n> pid=<std::process::id()> sum=<s> expected=<1 + 2 + ... + received> received=<r>
//!       atomic=<a> parks=<wakeups of the parked thread> ok=<1 if sum == expected and in order>
//!   BAD <what>                                    (a failed check, when it is found)
//!   joined ok=<1|0> sent=<values sent> received=<r> sum=<s> atomic=<a> vec=<len> workers=<sum of returns>
//!       parks=<p>                                 (after `stop` on stdin, or EOF)
//! and exits 0 (1 if a check failed).

use std::io::BufRead;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

const WORKERS: u64 = 3;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn main() {
    println!("ready pid={}", std::process::id());
    let stop = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(AtomicBool::new(false));

    let (tx, rx) = mpsc::channel::<u64>();
    let producer = {
        let stop = Arc::clone(&stop);
        thread::Builder::new()
            .name("rt-producer".into())
            .spawn(move || {
                let mut sent = 0u64;
                while !stop.load(Ordering::Acquire) {
                    sent += 1;
                    if tx.send(sent).is_err() {
                        return sent - 1;
                    }
                    thread::sleep(Duration::from_millis(1));
                }
                sent
            })
            .expect("spawn producer")
    };

    // (sum, received, in order)
    let totals = Arc::new(Mutex::new((0u64, 0u64, true)));
    let consumer = {
        let totals = Arc::clone(&totals);
        let bad = Arc::clone(&bad);
        thread::Builder::new()
            .name("rt-consumer".into())
            .spawn(move || {
                for v in rx {
                    let mut t = lock(&totals);
                    if v != t.1 + 1 && t.2 {
                        t.2 = false;
                        bad.store(true, Ordering::Release);
                        println!("BAD consumer got {v} after {}", t.1);
                    }
                    t.0 += v;
                    t.1 += 1;
                }
                lock(&totals).1
            })
            .expect("spawn consumer")
    };

    let atomic = Arc::new(AtomicU64::new(0));
    let vec = Arc::new(Mutex::new(Vec::<u64>::new()));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (stop, atomic, vec) = (Arc::clone(&stop), Arc::clone(&atomic), Arc::clone(&vec));
            thread::Builder::new()
                .name(format!("rt-worker{w}"))
                .spawn(move || {
                    let mut mine = 0u64;
                    while !stop.load(Ordering::Acquire) {
                        mine += 1;
                        atomic.fetch_add(1, Ordering::AcqRel);
                        lock(&vec).push(w * 1_000_000_000 + mine);
                        thread::sleep(Duration::from_millis(2));
                    }
                    mine
                })
                .expect("spawn worker")
        })
        .collect();

    let parks = Arc::new(AtomicU64::new(0));
    let parked = {
        let (stop, parks) = (Arc::clone(&stop), Arc::clone(&parks));
        thread::Builder::new()
            .name("rt-parked".into())
            .spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    thread::park_timeout(Duration::from_millis(50));
                    n += 1;
                    parks.store(n, Ordering::Release);
                }
                n
            })
            .expect("spawn parked")
    };

    let stop_request = Arc::new(AtomicBool::new(false));
    {
        let stop_request = Arc::clone(&stop_request);
        thread::Builder::new()
            .name("rt-stdin".into())
            .spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    match line {
                        Ok(l) if l.trim() == "stop" => break,
                        Ok(l) => println!("unknown {}", l.trim()),
                        Err(_) => break,
                    }
                }
                stop_request.store(true, Ordering::Release);
            })
            .expect("spawn stdin reader");
    }

    let mut n = 0u64;
    while !stop_request.load(Ordering::Acquire) {
        thread::sleep(Duration::from_millis(100));
        n += 1;
        parked.thread().unpark();
        let (sum, received, in_order) = *lock(&totals);
        let expected = received * (received + 1) / 2;
        let ok = sum == expected && in_order;
        if !ok {
            bad.store(true, Ordering::Release);
        }
        println!(
            "tick {n} pid={} sum={sum} expected={expected} received={received} atomic={} parks={} ok={}",
            std::process::id(),
            atomic.load(Ordering::Acquire),
            parks.load(Ordering::Acquire),
            u8::from(ok)
        );
    }

    stop.store(true, Ordering::Release);
    parked.thread().unpark();
    let mut ok = true;
    let mut join = |name: &str, h: thread::JoinHandle<u64>| match h.join() {
        Ok(v) => v,
        Err(_) => {
            println!("BAD {name} panicked");
            ok = false;
            0
        }
    };
    let sent = join("producer", producer);
    // The producer dropped its sender: the consumer drains the channel and returns.
    let received = join("consumer", consumer);
    let worker_sum: u64 = workers.into_iter().map(|h| join("worker", h)).sum();
    let parks_ret = join("parked", parked);
    let (sum, total_received, in_order) = *lock(&totals);
    let atomic = atomic.load(Ordering::Acquire);
    let vec_len = lock(&vec).len() as u64;
    let mut check = |cond: bool, what: String| {
        if !cond {
            println!("BAD {what}");
            ok = false;
        }
    };
    check(received == sent && total_received == sent, format!("sent {sent}, consumer received {received}"));
    check(sum == sent * (sent + 1) / 2 && in_order, format!("sum {sum} of {sent} values (in order: {in_order})"));
    check(
        atomic == worker_sum && vec_len == worker_sum,
        format!("atomic {atomic}, vec {vec_len}, workers {worker_sum}"),
    );
    check(parks_ret == parks.load(Ordering::Acquire) && parks_ret > 0, format!("parked thread returned {parks_ret}"));
    check(!bad.load(Ordering::Acquire), "a check failed earlier".to_string());
    println!(
        "joined ok={} sent={sent} received={received} sum={sum} atomic={atomic} vec={vec_len} workers={worker_sum} \
         parks={parks_ret}",
        u8::from(ok)
    );
    std::process::exit(if ok { 0 } else { 1 });
}
