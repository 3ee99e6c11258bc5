//! System V IPC across a checkpoint: sysv.c's producer and consumer share a message queue, a
//! semaphore set and a shared memory segment. A checkpoint with --kill takes the objects with
//! their contents into the image (and off the host); a resume recreates them with their keys,
//! and the pair goes on with nothing lost, the counter still shared. A resume where one of the
//! keys is taken fails with exit code 4, naming the key, and leaves that object alone.
//!
//! Every test holds an [`IpcGuard`] (removes every object of its keys, whatever happens) and a
//! [`TreeGuard`] (kills every process of its trees).

use migrate_tests::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// System V objects from the test's side

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Msg,
    Sem,
    Shm,
}

/// The id of the object of `kind` with `key`, if there is one.
fn lookup(kind: Kind, key: i32) -> Option<i32> {
    // SAFETY: get calls without IPC_CREAT only look the key up.
    let id = unsafe {
        match kind {
            Kind::Msg => libc::msgget(key, 0),
            Kind::Sem => libc::semget(key, 0, 0),
            Kind::Shm => libc::shmget(key, 0, 0),
        }
    };
    (id >= 0).then_some(id)
}

fn remove(kind: Kind, id: i32) {
    // SAFETY: IPC_RMID with no buffer.
    unsafe {
        match kind {
            Kind::Msg => libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()),
            Kind::Sem => libc::semctl(id, 0, libc::IPC_RMID),
            Kind::Shm => libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()),
        };
    }
}

/// sysv.c's objects for key K: queue K, semaphores K+1, segment K+2.
fn objects(key: i32) -> [(Kind, i32); 3] {
    [(Kind::Msg, key), (Kind::Sem, key + 1), (Kind::Shm, key + 2)]
}

/// Removes, when dropped (a failed test included), every System V object with one of its keys —
/// whether the program, migrate-resume or the test made it.
struct IpcGuard {
    keys: Vec<(Kind, i32)>,
}

impl IpcGuard {
    /// Guards sysv.c's objects for `key`, removing leftovers of an earlier run first.
    fn new(key: i32) -> IpcGuard {
        let g = IpcGuard { keys: objects(key).to_vec() };
        g.remove_all();
        g
    }

    fn remove_all(&self) {
        for &(kind, key) in &self.keys {
            while let Some(id) = lookup(kind, key) {
                remove(kind, id);
                if lookup(kind, key) == Some(id) {
                    eprintln!("warning: cannot remove System V {kind:?} key {key:#x} (id {id})");
                    break;
                }
            }
        }
    }
}

impl Drop for IpcGuard {
    fn drop(&mut self) {
        self.remove_all();
    }
}

/// Removes, when dropped, every System V object (private ones included) that a process of the
/// test created or last used: /proc/sysvipc names their pids (a semaphore's last user comes
/// from semctl GETPID). For objects without a key.
struct PidIpcGuard {
    pids: Vec<i32>,
}

impl PidIpcGuard {
    fn add(&mut self, pid: i32) {
        if pid > 0 && !self.pids.contains(&pid) {
            self.pids.push(pid);
        }
    }
}

/// (id, the numbers of a /proc/sysvipc row) for every object of that listing.
fn sysvipc_rows(name: &str) -> Vec<Vec<i64>> {
    let text = std::fs::read_to_string(format!("/proc/sysvipc/{name}")).unwrap_or_default();
    text.lines().skip(1).map(|l| l.split_whitespace().map(|w| w.parse().unwrap_or(-1)).collect()).collect()
}

impl Drop for PidIpcGuard {
    fn drop(&mut self) {
        let ours = |p: i64| p > 0 && self.pids.contains(&(p as i32));
        for row in sysvipc_rows("shm") {
            // key shmid perms size cpid lpid
            if row.len() > 5 && (ours(row[4]) || ours(row[5])) {
                remove(Kind::Shm, row[1] as i32);
            }
        }
        for row in sysvipc_rows("msg") {
            // key msqid perms cbytes qnum lspid lrpid
            if row.len() > 6 && (ours(row[5]) || ours(row[6])) {
                remove(Kind::Msg, row[1] as i32);
            }
        }
        for row in sysvipc_rows("sem") {
            // key semid perms nsems
            if row.len() > 3 {
                let id = row[1] as i32;
                // SAFETY: GETPID takes no argument.
                if (0..row[3] as i32).any(|n| ours(unsafe { libc::semctl(id, n, libc::GETPID) } as i64)) {
                    remove(Kind::Sem, id);
                }
            }
        }
    }
}

/// A key of this test process (0x4d, 20 bits of the pid, 4 bits for the test) for sysv.c,
/// which uses it and the two after it.
fn unique_key(test: u32) -> i32 {
    (0x4d00_0000 | ((std::process::id() & 0xf_ffff) << 4) | (test << 2)) as i32
}

// ---------------------------------------------------------------------------------------------
// Common steps

/// Waits until no live process mentions `dir` (every member of the tree is gone).
#[track_caller]
fn assert_tree_gone(dir: &Path, timeout: Duration, what: &str) {
    let marker = dir.as_os_str().as_encoded_bytes();
    let deadline = Instant::now() + timeout;
    loop {
        let alive = processes_mentioning(marker);
        if alive.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("{what}: processes {alive:?} of the tree are still alive after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts sysv.c for `key` under migrate-run and waits until the parent has sent `sent` items.
fn start(dir: &Path, key: i32, count: u64, sent: u64, guard: &mut TreeGuard) -> Managed {
    let key_arg = format!("{key:#x}");
    let count_arg = count.to_string();
    let mut p = migrate_run(dir, &cbin("sysv"), [key_arg.as_str(), count_arg.as_str(), "50"]);
    guard.add(p.pid());
    let ready = p.wait_line("ready ", STARTUP);
    guard.add(field_num(&ready, "consumer"));
    let want = format!("parent sent {sent} ");
    p.wait_line(|l: &str| l.starts_with(&want) || l.starts_with("BAD"), LINE);
    assert_no_bad(&p.lines_so_far(), &mut p, "before the checkpoint");
    p
}

#[track_caller]
fn assert_no_bad(lines: &[String], p: &mut Managed, when: &str) {
    if let Some(b) = lines.iter().find(|l| l.starts_with("BAD") || l.contains(" GAP ")) {
        let r = p.report();
        panic!("{when}: the program reported a failed check: {b}\n{r}");
    }
}

/// `migrate-checkpoint --kill`; waits for the whole tree to be gone and returns the image and
/// every line the program printed.
fn checkpoint_kill(p: &mut Managed, dir: &Path) -> (PathBuf, Vec<String>) {
    let pid = p.pid();
    let out = checkpoint_output(pid, true, dir);
    if !out.status.success() {
        let r = p.report();
        panic!("migrate-checkpoint --kill {pid} failed: {}\nprogram: {r}", out.describe());
    }
    let image = PathBuf::from(out.stdout.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default());
    assert!(image.is_file(), "migrate-checkpoint reported {} which is not a file: {}", image.display(), out.describe());
    assert_tree_gone(dir, Duration::from_secs(5), "after migrate-checkpoint --kill");
    p.read_to_eof(LINE);
    p.wait_exit(Duration::from_secs(5));
    let lines = p.lines_so_far();
    assert_no_bad(&lines, p, "before the checkpoint");
    (image, lines)
}

/// migrate-inspect's `sysv:` lines for the image.
#[track_caller]
fn inspect_sysv(image: &Path) -> (String, Vec<String>) {
    let out = inspect_output(&[], image);
    assert!(out.status.success(), "migrate-inspect {} failed: {}", image.display(), out.describe());
    let summary = out.stdout.lines().find(|l| l.starts_with("tree ")).map(str::to_string);
    let summary = summary.unwrap_or_else(|| panic!("migrate-inspect shows no tree line: {}", out.describe()));
    let sysv = out.stdout.lines().map(str::trim).filter(|l| l.starts_with("sysv: ")).map(str::to_string).collect();
    (summary, sysv)
}

/// The number before `word` in `line` (`... 16 messages ...`).
fn number_before(line: &str, word: &str) -> Option<u64> {
    let toks: Vec<&str> = line.split_whitespace().collect();
    let i = toks.iter().position(|t| t.trim_end_matches([',', ':', ')']) == word)?;
    toks.get(i.checked_sub(1)?)?.trim_start_matches('(').parse().ok()
}

/// (pid of every process, state) of the image, from migrate-inspect's `process K: vpid X` lines.
fn image_pids(image: &Path) -> Vec<i32> {
    let out = inspect_output(&[], image);
    out.stdout
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("process ") && l.contains(": vpid "))
        .filter_map(|l| l.split_whitespace().skip_while(|t| *t != "vpid").nth(1)?.parse().ok())
        .collect()
}

/// Waits (bounded) until none of `pids` exists any more, so the resume can give the processes
/// their original pids (the killed orphans are reaped by init).
fn wait_pids_free(pids: &[i32], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|p| Path::new(&format!("/proc/{p}")).exists()) {
        if Instant::now() >= deadline {
            panic!("the image's pids {pids:?} are still in use {timeout:?} after the tree was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Resumes `image` and reads the program's output to the end.
fn resume_to_end(image: &Path, guard: &mut TreeGuard) -> (Vec<String>, Vec<String>) {
    wait_pids_free(&image_pids(image), Duration::from_secs(10));
    let mut r = resume(image);
    guard.add(r.pid());
    let lines = r.read_to_eof(Duration::from_secs(90));
    let status = r.wait_exit(Duration::from_secs(10));
    let err = r.stderr_so_far();
    assert!(status.success(), "the resumed program failed ({}): {}", describe_status(status), r.report());
    assert_no_bad(&lines, &mut r, "after the resume");
    (lines, err)
}

#[track_caller]
fn assert_consecutive(got: &[u64], to: u64, what: &str) {
    let want: Vec<u64> = (1..=to).collect();
    assert_eq!(got, want.as_slice(), "{what}: expected 1..={to} in order, each once");
}

/// Checks a whole run of sysv.c (the lines before the checkpoint and after the resume): every
/// item produced and consumed once, in order, with no gap; every value of the shared counter
/// printed exactly once (an increment lost, or a private copy of the segment, repeats values);
/// and the final tally.
#[track_caller]
fn check_whole_run(before: &[String], after: &[String], count: u64) {
    let all: Vec<String> = before.iter().chain(after).cloned().collect();
    assert_consecutive(&numbers_after(&all, "parent sent "), count, "items sent");
    assert_consecutive(&numbers_after(&all, "got "), count, "items received");
    for l in all.iter().filter(|l| l.starts_with("got ")) {
        assert!(l.split_whitespace().nth(2) == Some("ok"), "the consumer saw a gap: {l}");
    }
    let counters: Vec<u64> = all
        .iter()
        .filter(|l| l.starts_with("got ") || l.starts_with("parent sent "))
        .filter_map(|l| field(l, "counter")?.parse().ok())
        .collect();
    let distinct: BTreeSet<u64> = counters.iter().copied().collect();
    let want: BTreeSet<u64> = (1..=2 * count).collect();
    assert!(
        counters.len() as u64 == 2 * count && distinct == want,
        "the shared counter must take every value 1..={} exactly once (both processes increment one segment); \
         got {} values: {counters:?}",
        2 * count,
        counters.len()
    );
    let done = all.iter().find(|l| l.starts_with("parent done ")).expect("a `parent done` line");
    assert_eq!(
        (field_num::<u64>(done, "counter"), field_num::<u64>(done, "parent"), field_num::<u64>(done, "child")),
        (2 * count, count, count),
        "final tally: {done}"
    );
    assert!(all.iter().any(|l| l == &format!("child done last={count}")), "the consumer did not finish: {after:?}");
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Producer and consumer over a message queue, a semaphore set and a shared segment:
/// checkpoint --kill while items are queued, resume, and they go on exactly.
#[test]
fn sysv_producer_consumer_continue_after_resume() {
    const COUNT: u64 = 50;
    let tmp = temp_dir();
    let dir = tmp.path();
    let key = unique_key(0);
    let _ipc = IpcGuard::new(key);
    let mut tree = TreeGuard::new(dir);

    let mut p = start(dir, key, COUNT, 8, &mut tree);
    let (image, before) = checkpoint_kill(&mut p, dir);
    let sent = numbers_after(&before, "parent sent ").last().copied().unwrap_or(0);
    assert!(sent < COUNT, "the program finished before the checkpoint ({sent} items sent)");
    for (kind, k) in objects(key) {
        assert_eq!(
            lookup(kind, k),
            None,
            "{kind:?} key {k:#x} must be gone after checkpoint --kill: it moved into the image"
        );
    }

    // The image lists the three objects, the queue with its messages.
    let (summary, sysv) = inspect_sysv(&image);
    assert!(summary.contains("3 System V objects"), "tree summary: {summary}; sysv lines: {sysv:#?}");
    let line = |noun: &str, k: i32| {
        let want = format!("{noun} key {:#010x}", k as u32);
        sysv.iter().find(|l| l.contains(&want)).cloned().unwrap_or_else(|| panic!("no `{want}` in {sysv:#?}"))
    };
    let queue = line("message queue", key);
    let queued = number_before(&queue, "messages").unwrap_or_else(|| panic!("no message count in {queue}"));
    assert!(queued >= 1, "the queue should hold items at the checkpoint (the consumer is slow at first): {queue}");
    let sems = line("semaphore set", key + 1);
    let values = sems.split("values ").nth(1).unwrap_or_default();
    let values: Vec<u64> =
        values.trim_matches(['[', ']']).split(',').filter_map(|v| v.trim().parse().ok()).collect::<Vec<_>>();
    assert_eq!(values.len(), 2, "two semaphores: {sems}");
    assert!(
        values[0] <= queued && queued - values[0] <= 2,
        "the item semaphore ({}) must match the queued messages ({queued}) but for the operations in flight: {sems}",
        values[0]
    );
    let segment = line("shared memory", key + 2);
    assert!(segment.contains("4096 bytes"), "{segment}");

    let (after, err) = resume_to_end(&image, &mut tree);
    check_whole_run(&before, &after, COUNT);
    assert!(!err.iter().any(|l| l.contains("error")), "migrate-resume reported errors: {err:#?}");
    // The program removed its objects itself at the end.
    for (kind, k) in objects(key) {
        assert_eq!(lookup(kind, k), None, "{kind:?} key {k:#x} should have been removed by the program");
    }
}

/// A resume on a host where one of the image's keys is taken fails with exit code 4, naming
/// the key and the fix, leaves that object untouched and removes what it had created; once the
/// key is free, the same image resumes.
#[test]
fn sysv_resume_refuses_a_taken_key() {
    const COUNT: u64 = 20;
    let tmp = temp_dir();
    let dir = tmp.path();
    let key = unique_key(1);
    let _ipc = IpcGuard::new(key);
    let mut tree = TreeGuard::new(dir);

    let mut p = start(dir, key, COUNT, 5, &mut tree);
    let (image, before) = checkpoint_kill(&mut p, dir);

    // Someone else's queue with the image's key, holding a message of its own.
    // SAFETY: creating a queue with a fixed key.
    let theirs = unsafe { libc::msgget(key, libc::IPC_CREAT | libc::IPC_EXCL | 0o600) };
    assert!(theirs >= 0, "cannot create the conflicting queue: {}", std::io::Error::last_os_error());
    let mut msg = [0u8; 16];
    msg[..8].copy_from_slice(&7i64.to_ne_bytes());
    msg[8..12].copy_from_slice(b"mine");
    // SAFETY: `msg` holds the type and 4 bytes of text.
    let rc = unsafe { libc::msgsnd(theirs, msg.as_ptr() as *const libc::c_void, 4, libc::IPC_NOWAIT) };
    assert_eq!(rc, 0, "msgsnd: {}", std::io::Error::last_os_error());

    let out = resume_output(&[], &image);
    let hex = format!("{:#010x}", key as u32);
    out.assert_fails("resume with a message queue key taken", 4, &[&hex, "already in use", "ipcrm"]);
    assert!(
        processes_mentioning(dir.as_os_str().as_encoded_bytes()).is_empty(),
        "a failed resume must not start any process"
    );

    // Their queue is untouched: same id, the one message.
    assert_eq!(lookup(Kind::Msg, key), Some(theirs), "the conflicting queue must keep its id");
    let mut buf = [0u8; 64];
    // SAFETY: receiving into a local buffer of 56 bytes of text; IPC_NOWAIT.
    let n = unsafe { libc::msgrcv(theirs, buf.as_mut_ptr() as *mut libc::c_void, 56, 0, libc::IPC_NOWAIT) };
    assert_eq!(n, 4, "the conflicting queue should hold exactly its own message: {}", std::io::Error::last_os_error());
    assert_eq!((i64::from_ne_bytes(buf[..8].try_into().unwrap()), &buf[8..12]), (7, &b"mine"[..]));
    // SAFETY: as above.
    let more = unsafe { libc::msgrcv(theirs, buf.as_mut_ptr() as *mut libc::c_void, 56, 0, libc::IPC_NOWAIT) };
    assert_eq!(more, -1, "the failed resume must not have put messages into someone else's queue");
    // What the resume had created before it failed is gone again.
    for (kind, k) in &objects(key)[1..] {
        assert_eq!(lookup(*kind, *k), None, "{kind:?} key {k:#x} left behind by the failed resume");
    }

    // Once the key is free, the image resumes and finishes.
    remove(Kind::Msg, theirs);
    let (after, _) = resume_to_end(&image, &mut tree);
    check_whole_run(&before, &after, COUNT);
}

/// Private objects (no key), a segment already marked for removal, attached twice (once
/// read-only) with a page made read-only (the mapping split in three), semtimedop: checkpoint
/// with --kill, resume, and everything is as it was.
#[test]
fn sysv_private_objects_and_a_removed_split_segment() {
    const TICKS: u64 = 40;
    let tmp = temp_dir();
    let dir = tmp.path();
    let mut tree = TreeGuard::new(dir);
    let mut ipc = PidIpcGuard { pids: Vec::new() };

    let ticks = TICKS.to_string();
    let mut p = migrate_run(dir, &cbin("sysv_private"), [ticks.as_str(), "50"]);
    tree.add(p.pid());
    ipc.add(p.pid());
    p.wait_line("ready ", STARTUP);
    p.wait_line(|l: &str| l.starts_with("tick 8 ") || l.starts_with("BAD"), LINE);
    let (image, before) = checkpoint_kill(&mut p, dir);

    let (summary, sysv) = inspect_sysv(&image);
    assert!(summary.contains("3 System V objects"), "tree summary: {summary}; sysv lines: {sysv:#?}");
    let find = |what: &str| sysv.iter().find(|l| l.contains(what)).cloned();
    let segment = find("shared memory private").unwrap_or_else(|| panic!("no private segment in {sysv:#?}"));
    assert!(segment.contains("marked for removal"), "{segment}");
    let queue = find("message queue private").unwrap_or_else(|| panic!("no private queue in {sysv:#?}"));
    assert_eq!(number_before(&queue, "messages"), Some(3), "three messages are always queued ahead: {queue}");
    let out = inspect_output(&[], &image);
    let attachments = out.stdout.lines().filter(|l| l.contains(" SysvShm ")).count();
    assert_eq!(attachments, 4, "two attachments, one split in three: {}", out.stdout);

    wait_pids_free(&image_pids(&image), Duration::from_secs(10));
    let mut r = resume(&image);
    tree.add(r.pid());
    ipc.add(r.pid());
    let after = r.read_to_eof(Duration::from_secs(60));
    let status = r.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "the resumed program failed ({}): {}", describe_status(status), r.report());
    let all: Vec<String> = before.iter().chain(&after).cloned().collect();
    if let Some(bad) = all.iter().find(|l| l.starts_with("BAD") || (l.starts_with("tick ") && !l.ends_with(" ok"))) {
        panic!("a check failed: {bad}\nbefore: {before:#?}\nafter: {after:#?}");
    }
    assert_consecutive(&numbers_after(&all, "tick "), TICKS, "ticks");
    let counters: Vec<u64> = all.iter().filter_map(|l| field(l, "counter")?.parse().ok()).collect();
    assert_eq!(counters, (1..=TICKS).collect::<Vec<_>>(), "the counter in the segment continues");
    assert_eq!(after.last().map(String::as_str), Some("done"), "after: {after:#?}");
}
