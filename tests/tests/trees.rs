//! Process trees as one unit: a checkpoint of any member takes the whole tree (every managed
//! descendant), and a resume recreates it — parents and children, sessions and process groups,
//! zombies with their status, pipes between members with the bytes in flight, files shared
//! with one offset — so that a bash pipeline, a producer/consumer pair, a parent blocked in
//! waitpid and a daemon-like session leader all continue exactly.
//!
//! Every test holds a [`TreeGuard`] on its temporary directory: whatever happens, every process
//! of its trees (the originals and the resumed ones) is killed at the end.

use migrate_tests::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Common steps

/// Starts `program ARGS` under migrate-run, waits for its `ready pid=` line and checks the pid
/// is migrate-run's (it execs the program). Returns the process and the ready line.
fn start(dir: &Path, program: &Path, args: &[&str]) -> (Managed, String) {
    let mut p = migrate_run(dir, program, args);
    let ready = p.wait_line("ready ", STARTUP);
    let pid: i32 = field_num(&ready, "pid");
    assert_eq!(pid, p.pid(), "migrate-run must exec the program in place (same pid): {ready}");
    (p, ready)
}

/// Waits until no live process mentions the test directory any more (every member of the tree
/// is gone); panics with the survivors' command lines after `timeout`.
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
            let described: Vec<String> = alive
                .iter()
                .map(|p| {
                    let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                    let state = std::fs::read_to_string(format!("/proc/{p}/stat"))
                        .ok()
                        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim().chars().next().unwrap_or('?')))
                        .unwrap_or('?');
                    format!("pid {p} state {state}: {}", cmd.trim())
                })
                .collect();
            panic!("{what}: members of the tree are still alive after {timeout:?}:\n  {}", described.join("\n  "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `migrate-checkpoint --kill` on `p` (a migrate-run'd program, or a migrate-resume that stays
/// as its program's parent), then: every member of the tree must be gone, `p`'s stdout is read
/// to EOF (checked for `BAD`) and `p` is reaped. Returns the image and the lines printed after
/// the last wait.
fn checkpoint_kill(p: &mut Managed, dir: &Path) -> (PathBuf, Vec<String>) {
    let pid = p.pid();
    let out = checkpoint_output(pid, true, dir);
    if !out.status.success() {
        let r = p.report();
        panic!("migrate-checkpoint --kill {pid} failed: {}\nprogram: {r}", out.describe());
    }
    let image = PathBuf::from(out.stdout.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default());
    assert!(image.is_file(), "migrate-checkpoint reported {} which is not a file: {}", image.display(), out.describe());
    assert_tree_gone(dir, Duration::from_secs(5), &format!("after migrate-checkpoint --kill {pid}"));
    let rest = p.read_to_eof(LINE);
    assert_no_bad(p, "before the checkpoint");
    p.wait_exit(Duration::from_secs(5));
    (image, rest)
}

/// Asserts `got` is exactly `from..=to`, naming the first difference.
#[track_caller]
fn assert_consecutive(got: &[u64], from: u64, to: u64, what: &str) {
    let want: Vec<u64> = (from..=to).collect();
    if got != want.as_slice() {
        let at = got.iter().zip(&want).position(|(g, w)| g != w).unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: expected {from}..={to} in order, got {} numbers, first difference at index {at} (got {:?}, \
             expected {:?}); all: {got:?}",
            got.len(),
            got.get(at),
            want.get(at)
        );
    }
}

/// The lines of a text file (empty if it does not exist yet).
fn file_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).map(|t| t.lines().map(str::to_string).collect()).unwrap_or_default()
}

/// Polls `path` (bounded) until it has at least `n` lines; panics with `p`'s output otherwise.
#[track_caller]
fn wait_file_lines(path: &Path, n: usize, timeout: Duration, p: &mut Managed) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = file_lines(path);
        if lines.len() >= n {
            return lines;
        }
        if Instant::now() >= deadline {
            let r = p.report();
            panic!(
                "{} has {} lines after {timeout:?}, expected at least {n}; last lines: {:?}\n{r}",
                path.display(),
                lines.len(),
                &lines[lines.len().saturating_sub(5)..]
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The tree summary line of `migrate-inspect IMAGE` (`tree  N processes, M zombies, ...`) and
/// its whole output.
#[track_caller]
fn inspect_tree(image: &Path) -> (String, String) {
    let out = inspect_output(&[], image);
    assert!(out.status.success(), "migrate-inspect {} failed: {}", image.display(), out.describe());
    let summary = out.stdout.lines().find(|l| l.starts_with("tree ")).map(str::to_string);
    match summary {
        Some(s) => (s.split_whitespace().collect::<Vec<_>>().join(" "), out.stdout),
        None => panic!("migrate-inspect shows no `tree` line for a tree image: {}", out.describe()),
    }
}

/// The virtual pids of an image's processes and zombies, from migrate-inspect's tree lines
/// (`process K: vpid X ...`, `zombie: vpid X ...`).
fn image_pids(inspect_text: &str) -> Vec<i32> {
    inspect_text
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("process ") || l.starts_with("zombie: "))
        .filter_map(|l| l.split_whitespace().skip_while(|t| *t != "vpid").nth(1)?.parse().ok())
        .collect()
}

/// A process's state letter (`R`, `S`, `Z`, ...) and parent, if it exists.
fn state_of(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    Some((state, f.next()?.parse().ok()?))
}

/// How a test resumes a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pids {
    /// The default: the original pids are recreated (as root). The killed originals' orphans
    /// are reaped by init, which may take a while: wait until every pid of the image is free.
    Original,
    /// `--virtual-pids`: new pids, the program sees its original ones through the table.
    Virtual,
}

/// Waits (bounded) until none of `pids` exists any more.
#[track_caller]
fn wait_pids_free(pids: &[i32], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let taken: Vec<(i32, char, i32)> = pids.iter().filter_map(|&p| state_of(p).map(|(s, pp)| (p, s, pp))).collect();
        if taken.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "the original pids are still in use {timeout:?} after the tree was killed (pid, state, ppid): \
                 {taken:?}; init has not reaped the orphans"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Resumes `image` the way `mode` says; returns migrate-resume and the image's pids.
fn resume_tree(image: &Path, mode: Pids) -> (Managed, Vec<i32>) {
    let (_, text) = inspect_tree(image);
    let pids = image_pids(&text);
    assert!(!pids.is_empty(), "no process listed by migrate-inspect:\n{text}");
    let r = match mode {
        Pids::Original => {
            wait_pids_free(&pids, Duration::from_secs(10));
            resume(image)
        }
        Pids::Virtual => resume_with(&["--virtual-pids"], image),
    };
    (r, pids)
}

/// As root with [`Pids::Original`]: every process of the image runs again under its original
/// pid (a process of this test: it mentions the test directory) and every zombie is a zombie
/// again with its original pid and parent.
#[track_caller]
fn assert_original_pids(dir: &Path, mode: Pids, image: &Path, r: &mut Managed) {
    if mode != Pids::Original || !is_root() {
        return;
    }
    let (_, text) = inspect_tree(image);
    let marker = dir.as_os_str().as_encoded_bytes();
    let mut wrong = Vec::new();
    for l in text.lines().map(str::trim_start) {
        let vpid: Option<i32> = l.split_whitespace().skip_while(|t| *t != "vpid").nth(1).and_then(|v| v.parse().ok());
        let Some(vpid) = vpid else { continue };
        if l.starts_with("process ") {
            if !process_mentions(vpid, marker) {
                wrong.push(format!(
                    "{l}: pid {vpid} is not a resumed process of this test (state {:?})",
                    state_of(vpid)
                ));
            }
        } else if l.starts_with("zombie: ") {
            let parent: Option<i32> = l.split("child of ").nth(1).and_then(|t| t.split(')').next()?.parse().ok());
            match state_of(vpid) {
                Some(('Z', pp)) if Some(pp) == parent => {}
                other => wrong
                    .push(format!("{l}: pid {vpid} is (state, ppid) {other:?}, expected a zombie child of {parent:?}")),
            }
        }
    }
    if !wrong.is_empty() {
        let rep = r.report();
        panic!(
            "as root with the pids free, the resumed tree must have its original pids:\n  {}\n{rep}",
            wrong.join("\n  ")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (1) A bash pipeline

fn bash() -> PathBuf {
    ["/bin/bash", "/usr/bin/bash"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("bash is needed for the pipeline test (/bin/bash or /usr/bin/bash)")
}

/// Every line k (1-based) of the pipeline's output file must be `line k`.
#[track_caller]
fn check_pipeline_out(path: &Path, min_lines: usize) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let want = format!("line {}", i + 1);
        if *l != want {
            let from = i.saturating_sub(4);
            let to = (i + 4).min(lines.len());
            panic!(
                "{} line {} is {l:?}, expected {want:?} (a number lost or repeated across the checkpoint); \
                 lines {}..={}: {:?}",
                path.display(),
                i + 1,
                from + 1,
                to,
                &lines[from..to]
            );
        }
    }
    assert!(text.ends_with('\n'), "{} ends with a partial line: {:?}", path.display(), lines.last());
    assert!(lines.len() >= min_lines, "{} has {} lines, expected at least {min_lines}", path.display(), lines.len());
    lines.len()
}

/// A bash pipeline (a loop forking `sleep`, piped into awk, appending to a file) checkpointed
/// with --kill and resumed: the numbers continue with nothing lost or repeated.
#[test]
fn bash_pipeline_continues_after_resume() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let mut guard = TreeGuard::new(dir);
    let out = dir.join("out.txt");
    let script = dir.join("pipeline.sh");
    std::fs::write(
        &script,
        format!(
            "n=0\nwhile true; do n=$((n+1)); echo $n; sleep 0.1; done | awk -W interactive '{{ print \"line \" $1; \
             fflush() }}' >> '{}'\n",
            out.display()
        ),
    )
    .expect("write the script");

    let mut orig = migrate_run(dir, &bash(), [&script]);
    guard.add(orig.pid());
    wait_file_lines(&out, 5, STARTUP, &mut orig);
    let (image, _) = checkpoint_kill(&mut orig, dir);
    let before = check_pipeline_out(&out, 5);

    let (summary, text) = inspect_tree(&image);
    // bash, the loop's subshell, awk, and maybe a sleep.
    let procs: usize = summary.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(
        procs >= 3,
        "the image should hold bash, its loop subshell and awk (at least 3 processes): {summary}\n{text}"
    );

    let (mut r, pids) = resume_tree(&image, Pids::Original);
    guard.add(r.pid());
    for p in pids {
        guard.add(p);
    }
    wait_file_lines(&out, before + 10, Duration::from_secs(20), &mut r);
    // Members outside migrate-resume's process group keep its stdout open: kill them first.
    guard.kill_all();
    r.kill();
    assert_tree_gone(dir, Duration::from_secs(5), "after killing the resumed pipeline");
    let after = check_pipeline_out(&out, before + 10);
    assert!(after > before, "no new line after the resume ({before} before, {after} after)");
}

// ---------------------------------------------------------------------------------------------
// (2) family.c: pipe with data in flight, zombie, shared file, waitpid

const FAMILY_TICKS: u64 = 45;

/// (pid, consumer, zombie) of family.c's ready line.
fn family_ids(ready: &str) -> (i32, i32, i32) {
    (field_num(ready, "pid"), field_num(ready, "consumer"), field_num(ready, "zombie"))
}

/// Checks family.c's log: each of p1..pN and c1..cN exactly once, pK before cK, nothing else,
/// no partial line, and the file size is exactly the sum of the line lengths.
#[track_caller]
fn check_family_log(path: &Path, n: u64) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.split_terminator('\n').collect();
    let sum: usize = lines.iter().map(|l| l.len() + 1).sum();
    assert!(
        bytes.is_empty() || bytes.ends_with(b"\n"),
        "log {} ends with a partial line: {:?}",
        path.display(),
        lines.last()
    );
    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, l) in lines.iter().enumerate() {
        let ok = l.len() > 1
            && (l.starts_with('p') || l.starts_with('c'))
            && l[1..].parse::<u64>().is_ok_and(|k| (1..=n).contains(&k));
        assert!(
            ok,
            "log {} line {} is {l:?}: not pN/cN with N in 1..={n} (overwritten bytes or a wrong offset); all: {lines:?}",
            path.display(),
            i + 1
        );
        seen.entry(l.to_string()).or_default().push(i);
    }
    for k in 1..=n {
        for who in ['p', 'c'] {
            let e = format!("{who}{k}");
            match seen.get(&e).map(Vec::as_slice) {
                Some([_]) => {}
                other => panic!(
                    "log {}: {e} appears at lines {:?}, expected exactly once; all: {lines:?}",
                    path.display(),
                    other.unwrap_or(&[])
                ),
            }
        }
        let (p, c) = (seen[&format!("p{k}")][0], seen[&format!("c{k}")][0]);
        assert!(p < c, "log {}: c{k} (line {}) precedes p{k} (line {}); all: {lines:?}", path.display(), c + 1, p + 1);
    }
    assert_eq!(lines.len() as u64, 2 * n, "log {} line count; all: {lines:?}", path.display());
    assert_eq!(bytes.len(), sum, "log {} size differs from the sum of its line lengths", path.display());
}

/// The consumer's lines: every `child got N ppid=P ok|GAP` must be `ok` with ppid = `parent`.
#[track_caller]
fn check_consumer_lines(lines: &[String], parent: i32, what: &str) {
    for l in lines.iter().filter(|l| l.starts_with("child got ")) {
        assert!(l.ends_with(" ok"), "{what}: the consumer saw a gap in the pipe's data: {l}\nall: {lines:#?}");
        assert_eq!(field_num::<i32>(l, "ppid"), parent, "{what}: the consumer's getppid() changed: {l}");
    }
}

/// The processes (pid, command name, descriptors) that hold the pipe `pid`'s descriptor `fd`
/// refers to, as text; `None` if that descriptor is not a pipe.
fn pipe_holders(pid: i32, fd: i32) -> Option<String> {
    let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    let target = target.to_str()?.to_string();
    if !target.starts_with("pipe:") {
        return None;
    }
    let mut holders = Vec::new();
    for p in std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{p}/fd")) else { continue };
        let mut mine: Vec<String> = fds
            .filter_map(|e| {
                let e = e.ok()?;
                (std::fs::read_link(e.path()).ok()?.to_str()? == target)
                    .then(|| e.file_name().to_string_lossy().into_owned())
            })
            .collect();
        if !mine.is_empty() {
            mine.sort();
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            holders.push(format!("pid {p} ({}) fds {}", comm.trim(), mine.join(",")));
        }
    }
    Some(format!("{target} is held by: {}", holders.join("; ")))
}

/// Waits (bounded) for family.c's `child done` line. On timeout, says what is missing: if the
/// consumer never saw EOF, lists who still holds its pipe (a write end left open somewhere).
fn wait_child_done(r: &mut Managed, dir: &Path, consumer: i32, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = r.lines_so_far();
        if let Some(l) = lines.iter().find(|l| l.starts_with("child done ") || l.starts_with("BAD")) {
            assert!(!l.starts_with("BAD"), "a process of the tree reported a failed check: {l}\n{}", r.report());
            return l.clone();
        }
        if Instant::now() >= deadline {
            let eof = lines.iter().any(|l| l.starts_with("child eof "));
            let closed = lines.iter().any(|l| *l == format!("parent wrote {FAMILY_TICKS}"));
            let holders = if process_mentions(consumer, dir.as_os_str().as_encoded_bytes()) {
                // The consumer reads the pipe through its descriptor 3 or 4 (after the log).
                (3..=6).find_map(|fd| pipe_holders(consumer, fd)).unwrap_or_else(|| "no pipe found".into())
            } else {
                "(the consumer does not run under its original pid: holders not looked up)".into()
            };
            let rep = r.report();
            panic!(
                "no `child done` within {timeout:?}: the parent {} closed the pipe, the consumer {} EOF; \
                 the parent is blocked in waitpid(consumer). The consumer's pipe: {holders}\n{rep}",
                if closed { "wrote its last line and" } else { "had not yet" },
                if eof { "saw" } else { "never saw" },
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A producer/consumer pair over a pipe with data in flight, an unreaped zombie, a log file
/// shared by both through one description, and waitpid: checkpoint --kill at tick 8, resume,
/// and everything continues exactly.
fn family_continues(mode: Pids) {
    let tmp = temp_dir();
    let dir = tmp.path();
    let mut guard = TreeGuard::new(dir);
    let log = dir.join("family.log");
    let log_arg = log.to_str().expect("utf-8 temp path");
    let (mut orig, ready) = start(dir, &cbin("family"), &[log_arg]);
    let (pid, consumer, zombie) = family_ids(&ready);
    for p in [pid, consumer, zombie] {
        guard.add(p);
    }
    next_unless_bad(&mut orig, "parent wrote 8", LINE);
    let (image, _) = checkpoint_kill(&mut orig, dir);
    let before = orig.lines_so_far();
    check_consumer_lines(&before, pid, "before the checkpoint");
    let wrote_before = numbers_after(&before, "parent wrote ");
    let last = wrote_before.last().copied().unwrap_or(0);
    assert_consecutive(&wrote_before, 1, last, "`parent wrote` before the checkpoint");
    let got_before = numbers_after(&before, "child got ");
    assert!(
        (got_before.len() as u64) + 2 <= last,
        "the consumer should lag behind (several lines in flight at the checkpoint): wrote {last}, got {got_before:?}"
    );

    let (summary, text) = inspect_tree(&image);
    assert!(summary.starts_with("tree 2 processes, 1 zombies,"), "migrate-inspect: {summary}\n{text}");
    let zline = format!("zombie: vpid {zombie} (child of {pid}), wait status 0x700");
    assert!(text.contains(&zline), "migrate-inspect should show `{zline}`:\n{text}");
    assert!(text.contains("bytes in flight"), "migrate-inspect should show the pipe's bytes in flight:\n{text}");

    let (mut r, _) = resume_tree(&image, mode);
    guard.add(r.pid());
    next_unless_bad(&mut r, "parent wrote ", STARTUP);
    assert_original_pids(dir, mode, &image, &mut r);
    let done = wait_child_done(&mut r, dir, consumer, Duration::from_secs(10));
    let status = r.wait_exit(LINE);
    assert_no_bad(&mut r, "after the resume");
    let after = r.lines_so_far();
    check_consumer_lines(&after, pid, "after the resume");

    assert_consecutive(
        &numbers_after(&after, "parent wrote "),
        last + 1,
        FAMILY_TICKS,
        "`parent wrote` after the resume",
    );
    let got: Vec<u64> = got_before.iter().chain(&numbers_after(&after, "child got ")).copied().collect();
    assert_consecutive(&got, 1, FAMILY_TICKS, "`child got` before and after the checkpoint");
    let reaped: Vec<&String> = after.iter().filter(|l| l.starts_with("reaped ")).collect();
    assert_eq!(
        reaped,
        [&format!("reaped {zombie} status=7")],
        "the parent must reap the recreated zombie with its original pid and status\n{}",
        r.report()
    );
    assert!(
        after.iter().any(|l| l == &format!("child eof last={FAMILY_TICKS}")),
        "the consumer must see EOF after {FAMILY_TICKS}\n{}",
        r.report()
    );
    assert_eq!(done, format!("child done {consumer} status=0"), "waitpid on the consumer\n{}", r.report());
    assert_eq!(status.code(), Some(0), "migrate-resume must exit as the program did (0)\n{}", r.report());
    check_family_log(&log, FAMILY_TICKS);
}

#[test]
fn family_pipe_zombie_shared_file_and_waitpid() {
    family_continues(Pids::Original);
}

#[test]
fn family_pipe_zombie_shared_file_and_waitpid_virtual_pids() {
    family_continues(Pids::Virtual);
}

/// SIGUSR2 (the checkpoint signal) sent to a non-root member checkpoints the whole tree, which
/// keeps running.
#[test]
fn signal_to_a_member_checkpoints_the_whole_tree() {
    let tmp = temp_dir();
    let dir = tmp.path();
    let mut guard = TreeGuard::new(dir);
    let log = dir.join("family.log");
    let log_arg = log.to_str().expect("utf-8 temp path");
    // 300 ticks of 50 ms: it outlives the test, which kills it.
    let (mut orig, ready) = start(dir, &cbin("family"), &[log_arg, "300", "50"]);
    let (pid, consumer, zombie) = family_ids(&ready);
    for p in [pid, consumer, zombie] {
        guard.add(p);
    }
    next_unless_bad(&mut orig, "child got 2 ", LINE);
    // SAFETY: kill(2) on the consumer, a live child of our child (unreaped by its parent).
    let rc = unsafe { libc::kill(consumer, libc::SIGUSR2) };
    assert_eq!(rc, 0, "kill({consumer}, SIGUSR2): {}", std::io::Error::last_os_error());
    let image = wait_for_image(dir, Duration::from_secs(30));
    let (summary, text) = inspect_tree(&image);
    assert!(
        summary.starts_with("tree 2 processes, 1 zombies,"),
        "SIGUSR2 to the consumer must checkpoint the whole tree: {summary}\n{text}"
    );
    for want in [
        format!("process 0: vpid {pid} "),
        format!("process 1: vpid {consumer} ppid {pid} "),
        format!("zombie: vpid {zombie} (child of {pid}), wait status 0x700"),
    ] {
        assert!(text.contains(&want), "migrate-inspect should show `{want}`:\n{text}");
    }

    // The tree was left running: both members go on, the consumer without a gap.
    let wrote = numbers_after(&orig.lines_so_far(), "parent wrote ").last().copied().unwrap_or(0);
    let want = format!("parent wrote {}", wrote + 5);
    orig.wait_line(|l: &str| l == want || l.starts_with("BAD"), LINE);
    let got = numbers_after(&orig.lines_so_far(), "child got ").last().copied().unwrap_or(0);
    next_unless_bad(&mut orig, &format!("child got {} ", got + 2), LINE);
    assert_no_bad(&mut orig, "after the checkpoint");
    let lines = orig.lines_so_far();
    check_consumer_lines(&lines, pid, "after the signal");
    let all_got = numbers_after(&lines, "child got ");
    assert_consecutive(&all_got, 1, all_got.len() as u64, "`child got` across the checkpoint");
    let status = orig.try_exit();
    assert!(status.is_none(), "the tree must keep running after a checkpoint without --kill: {status:?}");
    guard.kill_all();
    orig.kill();
}

// ---------------------------------------------------------------------------------------------
// (3) waiter.c: a parent blocked in waitpid

/// Checks waiter.c's `child tick` lines: pid and ppid fixed, numbers `from`.. consecutive.
/// Returns the last number (or `from - 1`).
#[track_caller]
fn check_child_ticks(lines: &[String], child: i32, parent: i32, from: u64, what: &str) -> u64 {
    let ticks: Vec<&String> = lines.iter().filter(|l| l.starts_with("child tick ")).collect();
    for l in &ticks {
        assert_eq!(field_num::<i32>(l, "pid"), child, "{what}: the child's getpid() changed: {l}\nall: {lines:#?}");
        assert_eq!(field_num::<i32>(l, "ppid"), parent, "{what}: the child's getppid() changed: {l}\nall: {lines:#?}");
    }
    let nums = numbers_after(lines, "child tick ");
    let last = from + nums.len() as u64 - 1;
    assert_consecutive(&nums, from, last, what);
    last
}

/// (pid, child) of waiter.c's ready line.
fn waiter_ids(ready: &str) -> (i32, i32) {
    (field_num(ready, "pid"), field_num(ready, "child"))
}

/// Expects the rest of waiter.c from a freshly resumed tree (`r` has returned no line yet): its
/// first tick is `last + 1`, the ticks go on up to `total` (pid and ppid unchanged), then
/// `parent got <child> status=3`, and migrate-resume exits 0.
fn finish_waiter(r: &mut Managed, child: i32, parent: i32, last: u64, total: u64, what: &str) {
    let got = r.wait_line(|l: &str| l.starts_with("parent got ") || l.starts_with("BAD"), Duration::from_secs(15));
    let status = r.wait_exit(LINE);
    assert_no_bad(r, what);
    let lines = r.lines_so_far();
    let upto = lines.iter().position(|l| *l == got).unwrap_or(0);
    let early = numbers_after(&lines[..upto], "child tick ");
    assert_eq!(
        got,
        format!("parent got {child} status=3"),
        "{what}: the parent's waitpid (blocked in it at the checkpoint) must return the original child pid and \
         status 3 once the child has ticked to {total}; it returned `{got}` when the child had printed ticks \
         {early:?} since the resume\n{}",
        r.report()
    );
    assert_eq!(
        early.first(),
        Some(&(last + 1)),
        "{what}: the first child tick after the resume must be {}\n{}",
        last + 1,
        r.report()
    );
    let end = check_child_ticks(&lines, child, parent, last + 1, what);
    assert_eq!(
        end,
        total,
        "{what}: the child must tick up to {total} before the parent's waitpid returns\n{}",
        r.report()
    );
    assert_eq!(status.code(), Some(0), "{what}: migrate-resume must exit as the program did (0)\n{}", r.report());
}

/// A parent blocked in waitpid on a ticking child: checkpoint --kill mid-way, resume; the
/// child ticks on from the next number and the parent's waitpid returns the original child
/// pid with status 3.
fn waiter_continues(mode: Pids) {
    let tmp = temp_dir();
    let dir = tmp.path();
    let mut guard = TreeGuard::new(dir);
    let (mut orig, ready) = start(dir, &cbin("waiter"), &["30", "100"]);
    let (pid, child) = waiter_ids(&ready);
    guard.add(pid);
    guard.add(child);
    next_unless_bad(&mut orig, "child tick 5 ", LINE);
    let (image, _) = checkpoint_kill(&mut orig, dir);
    let before = orig.lines_so_far();
    let last = check_child_ticks(&before, child, pid, 1, "before the checkpoint");
    assert!(!before.iter().any(|l| l.starts_with("parent got")), "waitpid returned before the checkpoint: {before:?}");

    let (summary, text) = inspect_tree(&image);
    assert!(summary.starts_with("tree 2 processes, 0 zombies,"), "migrate-inspect: {summary}\n{text}");

    let (mut r, _) = resume_tree(&image, mode);
    guard.add(r.pid());
    finish_waiter(&mut r, child, pid, last, 30, &format!("after the resume ({mode:?} pids)"));
}

#[test]
fn parent_blocked_in_waitpid_continues() {
    waiter_continues(Pids::Original);
}

#[test]
fn parent_blocked_in_waitpid_continues_virtual_pids() {
    waiter_continues(Pids::Virtual);
}

/// Five cycles of checkpoint --kill and resume of the same 2-process tree (waiter.c), each
/// continuing exactly; the last one runs to the end.
#[test]
fn tree_checkpoint_repeated() {
    const TOTAL: u64 = 40;
    let tmp = temp_dir();
    let dir = tmp.path();
    let mut guard = TreeGuard::new(dir);
    let (mut p, ready) = start(dir, &cbin("waiter"), &[&TOTAL.to_string(), "100"]);
    let (pid, child) = waiter_ids(&ready);
    guard.add(pid);
    guard.add(child);
    next_unless_bad(&mut p, "child tick 2 ", LINE);
    let mut from = 1;
    for cycle in 1..=5 {
        let what = format!("cycle {cycle}");
        let (image, _) = checkpoint_kill(&mut p, dir);
        let lines = p.lines_so_far();
        assert!(!lines.iter().any(|l| l.starts_with("parent got")), "{what}: waitpid returned early: {lines:?}");
        let last = check_child_ticks(&lines, child, pid, from, &format!("{what}, before the checkpoint"));
        assert!(last < TOTAL - 5, "{what}: the child got too far ({last} of {TOTAL}) for the test to go on");
        let (r, _) = resume_tree(&image, Pids::Original);
        p = r;
        guard.add(p.pid());
        if cycle == 5 {
            finish_waiter(&mut p, child, pid, last, TOTAL, &format!("{what}, after the resume"));
            return;
        }
        let first = next_unless_bad(&mut p, "child tick ", STARTUP);
        assert!(
            first.starts_with(&format!("child tick {} ", last + 1)),
            "{what}: the first child tick after the resume must be {}: got `{first}`\n{}",
            last + 1,
            p.report()
        );
        next_unless_bad(&mut p, &format!("child tick {} ", last + 2), LINE);
        from = last + 1;
    }
}

// ---------------------------------------------------------------------------------------------
// (4) groups.c: sessions and process groups

/// The ids a groups.c line shows: (pid, ppid, pgid, sid).
type Ids = (i32, i32, i32, i32);

fn ids_of(line: &str) -> Ids {
    (field_num(line, "pid"), field_num(line, "ppid"), field_num(line, "pgid"), field_num(line, "sid"))
}

/// The last `ids2` line of each process name among `lines`.
fn last_ids2(lines: &[String]) -> BTreeMap<String, (Ids, String)> {
    let mut m = BTreeMap::new();
    for l in lines.iter().filter(|l| l.starts_with("ids2 ")) {
        let name = field(l, "name").unwrap_or("?").to_string();
        m.insert(name, (ids_of(l), l.clone()));
    }
    m
}

/// Waits until every one of P, A, B, C has printed an `ids2` line after the current position.
fn wait_all_ids2(p: &mut Managed, timeout: Duration) -> BTreeMap<String, (Ids, String)> {
    let deadline = Instant::now() + timeout;
    let mut seen: BTreeMap<String, (Ids, String)> = BTreeMap::new();
    while seen.len() < 4 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = next_unless_bad(p, "ids2 ", left.max(Duration::from_millis(1)));
        let name = field(&line, "name").unwrap_or("?").to_string();
        seen.insert(name, (ids_of(&line), line));
    }
    seen
}

/// (pid, ppid, pgrp, session) of a live process as the kernel sees it, with its state.
fn kernel_ids(pid: i32) -> Option<(Ids, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = f.first()?.chars().next()?;
    Some(((pid, f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?), state))
}

/// A tree with a setsid() session leader (A), a process group leader (B) and a member of B's
/// group (C): after checkpoint --kill and resume every process sees the same pid, ppid, pgid
/// and sid as before; as root with the original pids recreated, the kernel agrees for A, B, C.
fn groups_recreated(mode: Pids) {
    let tmp = temp_dir();
    let dir = tmp.path();
    let mut guard = TreeGuard::new(dir);
    // 150 rounds of 200 ms: 30 s at most, should every kill fail.
    let (mut orig, ready) = start(dir, &cbin("groups"), &["150", "200"]);
    let pid: i32 = field_num(&ready, "pid");
    guard.add(pid);
    let first = wait_all_ids2(&mut orig, LINE);
    for (ids, _) in first.values() {
        guard.add(ids.0);
    }
    // The shape the program builds.
    let get = |m: &BTreeMap<String, (Ids, String)>, n: &str| m.get(n).map(|v| v.0).expect("all four names seen");
    let (p, a, b, c) = (get(&first, "P"), get(&first, "A"), get(&first, "B"), get(&first, "C"));
    assert_eq!(p.0, pid, "{first:?}");
    assert_eq!((a.1, a.2, a.3), (p.0, a.0, a.0), "A must be a session leader, child of P: {first:?}");
    assert_eq!((b.1, b.2, b.3), (p.0, b.0, p.3), "B must lead its own group in P's session: {first:?}");
    assert_eq!((c.1, c.2, c.3), (b.0, b.0, p.3), "C must be B's child in B's group: {first:?}");
    // The `ids` lines printed at start agree with the `ids2` ones.
    for l in orig.lines_so_far().iter().filter(|l| l.starts_with("ids ")) {
        let name = field(l, "name").unwrap_or("?");
        assert_eq!(Some(ids_of(l)), first.get(name).map(|v| v.0), "`ids` and `ids2` differ for {name}: {l}");
    }

    let (image, _) = checkpoint_kill(&mut orig, dir);
    let before = last_ids2(&orig.lines_so_far());
    let (summary, text) = inspect_tree(&image);
    assert!(summary.starts_with("tree 4 processes, 0 zombies,"), "migrate-inspect: {summary}\n{text}");

    let (mut r, _) = resume_tree(&image, mode);
    guard.add(r.pid());
    let after = wait_all_ids2(&mut r, STARTUP);
    let mut diffs = Vec::new();
    for (name, (ids, line)) in &before {
        match after.get(name) {
            Some((now, _)) if now == ids => {}
            Some((_, l)) => diffs.push(format!("{name}: before `{line}`\n      after  `{l}`")),
            None => diffs.push(format!("{name}: no ids2 line after the resume")),
        }
    }
    assert!(
        diffs.is_empty(),
        "ids changed across checkpoint --kill and resume ({mode:?} pids):\n  {}\n{}",
        diffs.join("\n  "),
        r.report()
    );
    assert_original_pids(dir, mode, &image, &mut r);
    if mode == Pids::Original && is_root() {
        // The kernel's own view of the non-root members is the original one.
        let mut wrong = Vec::new();
        for name in ["A", "B", "C"] {
            let (want, line) = &after[name];
            let real = kernel_ids(want.0);
            if real.map(|(ids, _)| ids) != Some(*want) {
                wrong.push(format!(
                    "{name}: the program sees `{line}`, but the kernel (/proc/{}/stat) has (pid, ppid, pgrp, \
                     session) = {:?}, state {:?}",
                    want.0,
                    real.map(|r| r.0),
                    real.map(|r| r.1)
                ));
            }
        }
        assert!(wrong.is_empty(), "as root the original ids must be the real ones:\n  {}", wrong.join("\n  "));
    }
    // Members outside migrate-resume's process group keep its stdout open: kill them first.
    guard.kill_all();
    r.kill();
}

#[test]
fn sessions_and_process_groups_are_recreated() {
    groups_recreated(Pids::Original);
}

#[test]
fn sessions_and_process_groups_are_recreated_virtual_pids() {
    groups_recreated(Pids::Virtual);
}
