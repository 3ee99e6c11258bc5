//! Compressed images (`--compress`, lz4 frames): a program with tens of MiB of compressible
//! and random memory, and a tree, resume from them with the same memory and the next tick;
//! a damaged compressed section is refused before anything is restored; migrate-inspect shows
//! both sizes; and the image is smaller than the uncompressed one.

use migrate_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// zmem: `zmem <MiB compressible> <MiB random> <tick ms> <fork 0|1>`.
/// Memory: text-like and zero-filled pages (compressible), random bytes (not), a sparse mapping
/// where every third page is written (many one-page runs), and a PROT_NONE mapping written
/// before it was protected (the checkpoint reads it through /proc/self/mem). Prints
/// `ready pid=<pid>` and every tick `tick <n> who=<p|c> pid=<getpid> sum=<hex>`, the sum an
/// FNV-1a over every byte of all of it, constant for the life of the program.
const ZMEM: &str = r#"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

int main(int argc, char **argv)
{
    if (argc != 5) return 2;
    size_t text = (size_t)atol(argv[1]) << 20, rnd = (size_t)atol(argv[2]) << 20;
    int tick_ms = atoi(argv[3]), do_fork = atoi(argv[4]);
    const size_t sparse_len = 4 << 20, none_len = 256 << 10, page = 4096;
    unsigned char *a = mmap(0, text, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *b = malloc(rnd);
    unsigned char *s = mmap(0, sparse_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *z = mmap(0, none_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED || !b || s == MAP_FAILED || z == MAP_FAILED) return 3;
    static const char *words[] = {"checkpoint ", "restore ", "memory ", "page ", "frame ", "lz4 ", "\n"};
    uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (size_t i = 0; i < text;) {
        if ((i / page) % 5 == 4) { memset(a + i, 0, page); i += page; continue; }
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        const char *w = words[x % 7];
        size_t n = strlen(w);
        if (n > text - i) n = text - i;
        memcpy(a + i, w, n);
        i += n;
    }
    for (size_t i = 0; i < rnd; i += 8) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        memcpy(b + i, &x, 8);
    }
    for (size_t i = 0; i < sparse_len; i += 3 * page) {
        for (size_t j = 0; j < page; j++) s[i + j] = (unsigned char)(i / page + j % 7);
    }
    for (size_t i = 0; i < none_len; i++) z[i] = (unsigned char)(i * 31 + i / 4096);
    uint64_t none_sum = fnv(0xcbf29ce484222325ULL, z, none_len);
    mprotect(z, none_len, PROT_NONE);
    char who = 'p';
    if (do_fork) {
        pid_t c = fork();
        if (c < 0) return 4;
        if (c == 0) who = 'c';
    }
    if (who == 'p') printf("ready pid=%d\n", getpid());
    fflush(stdout);
    for (unsigned long n = 1;; n++) {
        usleep(tick_ms * 1000);
        uint64_t h = fnv(0xcbf29ce484222325ULL, a, text);
        h = fnv(h, b, rnd);
        h = fnv(h, s, sparse_len);
        h ^= none_sum;
        printf("tick %lu who=%c pid=%d sum=%016llx\n", n, who, getpid(), (unsigned long long)h);
        fflush(stdout);
    }
}
"#;

struct Tick {
    n: u64,
    pid: i32,
    sum: u64,
}

fn tick(line: &str) -> Tick {
    Tick { n: tick_number(line), pid: field_num(line, "pid"), sum: field_hex(line, "sum") }
}

fn is_who(who: &'static str) -> impl Fn(&str) -> bool {
    move |l: &str| is_tick(l) && field(l, "who") == Some(who)
}

/// The last tick of `who` among `lines` (none: `before`).
fn last_of(lines: &[String], who: &str, before: u64) -> u64 {
    lines.iter().filter(|l| is_tick(l) && field(l, "who") == Some(who)).map(|l| tick_number(l)).max().unwrap_or(before)
}

fn zmem(dir: &Path) -> PathBuf {
    compile_c(dir, "zmem", ZMEM, &[])
}

/// `migrate-checkpoint [--compress] [--kill] --dir DIR PID`, asserting success; the image path.
#[track_caller]
fn checkpoint_with(pid: i32, compress: bool, kill: bool, dir: &Path) -> PathBuf {
    let mut cmd = Command::new(bin("migrate-checkpoint"));
    cmd.args(compress.then_some("--compress")).args(kill.then_some("--kill"));
    cmd.arg("--dir").arg(dir).arg(pid.to_string());
    let out = run_tool("migrate-checkpoint", cmd, CKPT);
    assert!(out.status.success(), "migrate-checkpoint failed: {}", out.describe());
    let path = PathBuf::from(out.stdout.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default());
    assert!(path.is_file(), "no image at {}: {}", path.display(), out.describe());
    path
}

/// migrate-inspect's `compressed lz4:` line: (bytes of memory, bytes in the page sections).
#[track_caller]
fn inspect_sizes(image: &Path) -> (u64, u64) {
    let out = inspect_output(&[], image);
    assert!(out.status.success(), "migrate-inspect failed: {}", out.describe());
    let line = out.stdout.lines().find(|l| l.starts_with("compressed lz4:"));
    let line = line.unwrap_or_else(|| panic!("migrate-inspect shows no compressed sizes: {}", out.describe()));
    // "... (12.3%, <memory> bytes in <stored> bytes), ..."
    let nums: Vec<u64> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    let at = line.find(" bytes in ").expect("sizes in bytes");
    let memory: u64 = line[..at].rsplit(' ').next().and_then(|w| w.parse().ok()).expect("memory bytes");
    let stored: u64 = line[at + 10..].split(' ').next().and_then(|w| w.parse().ok()).expect("stored bytes");
    assert!(nums.contains(&memory) && nums.contains(&stored), "{line}");
    (memory, stored)
}

/// 24 MiB of compressible and 16 MiB of random memory: an uncompressed checkpoint (the program
/// goes on), then a compressed one with --kill. The compressed image is smaller by most of the
/// compressible part, inspect shows both sizes, and the resumed program prints the next tick
/// with the same checksum over all of its memory and the same pid.
#[test]
fn compressed_image_resumes_with_the_same_memory_and_is_smaller() {
    let dir = temp_dir();
    let prog = zmem(dir.path());
    let mut orig = migrate_run(dir.path(), &prog, ["24", "16", "50", "0"]);
    let pid: i32 = field_num(&orig.wait_line("ready ", STARTUP), "pid");
    let first = tick(&orig.wait_line(is_who("p"), LINE));
    assert_eq!(first.pid, pid);

    let plain = checkpoint_with(pid, false, false, dir.path());
    let t = tick(&orig.wait_line(is_who("p"), LINE));
    assert_eq!(t.sum, first.sum, "the program's memory must not change after a checkpoint");
    let packed = checkpoint_with(pid, true, true, dir.path());
    let rest = orig.read_to_eof(LINE);
    let last = last_of(&rest, "p", t.n);
    orig.wait_exit(Duration::from_secs(5));

    let plain_len = std::fs::metadata(&plain).unwrap().len();
    let packed_len = std::fs::metadata(&packed).unwrap().len();
    // The random 16 MiB cannot shrink; the 24 MiB of text and zeros shrink to well under half.
    assert!(
        packed_len < plain_len - (12 << 20) && packed_len > 16 << 20,
        "compressed image {packed_len} bytes, uncompressed {plain_len} bytes"
    );
    let (memory, stored) = inspect_sizes(&packed);
    assert!(memory >= 40 << 20 && stored < memory - (12 << 20), "inspect: {stored} bytes hold {memory} bytes");
    assert!(stored < packed_len, "the page sections ({stored}) are part of the image ({packed_len})");
    let plain_inspect = inspect_output(&[], &plain);
    assert!(!plain_inspect.stdout.contains("compressed lz4"), "{}", plain_inspect.describe());

    let mut r = resume(&packed);
    let line = r.wait_line(is_who("p"), STARTUP);
    let back = tick(&line);
    assert_eq!(back.n, last + 1, "the resumed program must continue with the next tick: {line}");
    assert_eq!(back.pid, pid, "getpid() must be the original pid: {line}");
    assert_eq!(back.sum, first.sum, "memory checksum changed across the compressed image: {line}");
    let again = tick(&r.wait_line(is_who("p"), LINE));
    assert_eq!((again.n, again.sum), (back.n + 1, back.sum));

    // The uncompressed image of the same program resumes too (the program is gone by now).
    drop(r);
    let mut r = resume(&plain);
    let back = tick(&r.wait_line(is_who("p"), STARTUP));
    assert_eq!((back.pid, back.sum), (pid, first.sum));
}

/// A tree (parent and a forked child, each with the memory) checkpointed compressed with
/// --kill resumes whole: both continue with their next tick and the same checksum.
#[test]
fn compressed_tree_resumes() {
    let dir = temp_dir();
    let mut guard = TreeGuard::new(dir.path());
    let prog = zmem(dir.path());
    let mut orig = migrate_run(dir.path(), &prog, ["6", "4", "50", "1"]);
    let pid: i32 = field_num(&orig.wait_line("ready ", STARTUP), "pid");
    let (p, c) = ticks_of_both(&mut orig, 1, LINE);
    let (p, c) = (p.into_iter().next().unwrap(), c.into_iter().next().unwrap());
    guard.add(c.pid);
    assert_eq!(p.sum, c.sum, "parent and child hold the same memory");
    let image = checkpoint_with(pid, true, true, dir.path());
    let rest = orig.read_to_eof(LINE);
    let (last_p, last_c) = (last_of(&rest, "p", p.n), last_of(&rest, "c", c.n));
    orig.wait_exit(Duration::from_secs(5));
    let (memory, stored) = inspect_sizes(&image);
    assert!(stored < memory, "{stored} bytes hold {memory} bytes");

    let mut r = resume(&image);
    let (bp, bc) = ticks_of_both(&mut r, 2, STARTUP);
    guard.add(bc[0].pid);
    assert_eq!((bp[0].n, bp[0].pid, bp[0].sum), (last_p + 1, pid, p.sum), "parent after the resume");
    assert_eq!((bc[0].n, bc[0].sum), (last_c + 1, c.sum), "child after the resume");
    assert_eq!((bp[1].n, bc[1].n), (bp[0].n + 1, bc[0].n + 1), "both go on tick by tick");
}

/// Reads tick lines until parent and child have printed `want` each: (parent's, child's).
fn ticks_of_both(p: &mut Managed, want: usize, timeout: Duration) -> (Vec<Tick>, Vec<Tick>) {
    let (mut parent, mut child) = (Vec::new(), Vec::new());
    while parent.len() < want || child.len() < want {
        let line = p.wait_line("tick ", timeout);
        match field(&line, "who") {
            Some("p") => parent.push(tick(&line)),
            _ => child.push(tick(&line)),
        }
    }
    (parent, child)
}

/// Copies image `src` to `dst` section by section, letting `edit` change a section's bytes
/// (the writer computes fresh checksums: the image stays consistent, only its contents lie).
fn rewrite_sections(src: &Path, dst: &Path, mut edit: impl FnMut(migrate_image::SectionKind, &mut Vec<u8>)) {
    use migrate_image::{ImageReader, ImageWriter};
    let reader = ImageReader::open(src).unwrap();
    let mut w = ImageWriter::new(std::fs::File::create(dst).unwrap(), reader.sections().len()).unwrap();
    for (i, s) in reader.sections().iter().enumerate() {
        let mut bytes = reader.read_section(i).unwrap();
        edit(s.kind, &mut bytes);
        w.add_section_bytes(s.kind, &bytes, s.offset % 4096 == 0).unwrap();
    }
    w.finish().unwrap();
}

/// A flipped bit in a compressed section fails its checksum; a frame table that no longer
/// matches the pages (checksums recomputed) is refused as malformed. Either way migrate-resume
/// refuses the image (exit 3) before any process exists, and migrate-inspect names it.
#[test]
fn damaged_compressed_sections_are_refused_before_anything_is_restored() {
    let dir = temp_dir();
    let prog = zmem(dir.path());
    let mut orig = migrate_run(dir.path(), &prog, ["4", "1", "50", "0"]);
    let pid: i32 = field_num(&orig.wait_line("ready ", STARTUP), "pid");
    orig.wait_line(is_who("p"), LINE);
    let image = checkpoint_with(pid, true, true, dir.path());
    orig.read_to_eof(LINE);
    orig.wait_exit(Duration::from_secs(5));

    // The section of the 4 MiB of text: the most memory among those lz4 shrank.
    let reader = migrate_image::ImageReader::open(&image).unwrap();
    let meta = reader.meta().unwrap();
    let (vma, s) = reader
        .sections()
        .iter()
        .filter_map(|s| match s.kind {
            migrate_image::SectionKind::Pages { proc: 0, vma } => Some((vma, *s)),
            _ => None,
        })
        .filter(|(vma, s)| s.length * 2 < meta.process.vmas[*vma as usize].stored_pages() * 4096)
        .max_by_key(|(vma, _)| meta.process.vmas[*vma as usize].stored_pages())
        .unwrap();
    let v = &meta.process.vmas[vma as usize];
    assert_eq!(v.compression, migrate_image::PageCompression::Lz4);
    assert!(v.stored_pages() >= 1024, "{} pages", v.stored_pages());
    drop(reader);

    // 1. A flipped bit inside a frame.
    let flipped = dir.path().join("flipped.mig");
    std::fs::copy(&image, &flipped).unwrap();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&flipped).unwrap();
    let at = s.offset + s.length / 3;
    let mut b = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[b[0] ^ 0x10], at).unwrap();
    drop(f);
    resume_output(&[], &flipped).assert_fails("resume of a flipped bit", 3, &["checksum mismatch", "Pages"]);
    inspect_output(&[], &flipped).assert_fails("inspect of a flipped bit", 3, &["checksum mismatch"]);
    // migrate-resume --lazy leaves the pages to the restore, which checks compressed sections
    // whole before its switch (the page server only ever sees raw pages).
    let lazy = resume_output(&["--lazy"], &flipped);
    assert!(!lazy.status.success() && lazy.stderr.contains("checksum mismatch"), "{}", lazy.describe());

    // 2. The frame table claims a compressed frame is raw: lengths no longer add up.
    let lying = dir.path().join("lying.mig");
    rewrite_sections(&image, &lying, |kind, bytes| {
        if kind == (migrate_image::SectionKind::Pages { proc: 0, vma }) {
            let n = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().unwrap()) as usize;
            let table = bytes.len() - 4 - 4 * n;
            let k = (0..n).find(|k| bytes[table + 4 * k + 3] & 0x80 == 0).expect("a compressed frame");
            bytes[table + 4 * k + 3] |= 0x80;
        }
    });
    resume_output(&[], &lying).assert_fails("resume of a lying frame table", 3, &["frame"]);
    inspect_output(&[], &lying).assert_fails("inspect of a lying frame table", 3, &["frame"]);

    // Nothing was started by any of these attempts.
    assert!(processes_mentioning(dir.path().as_os_str().as_encoded_bytes()).is_empty());
}

/// `migrate-run --interval --compress`: the periodic images are compressed, and resume.
#[test]
fn periodic_checkpoints_can_be_compressed() {
    let dir = temp_dir();
    let prog = zmem(dir.path());
    let mut cmd = Command::new(bin("migrate-run"));
    cmd.arg("--ckpt-dir").arg(dir.path()).args(["--interval", "0.5", "--keep", "2", "--compress", "--"]);
    cmd.arg(&prog).args(["2", "1", "50", "0"]);
    let mut orig = Managed::spawn("zmem", cmd);
    orig.wait_line("ready ", STARTUP);
    let t = tick(&orig.wait_line(is_who("p"), LINE));
    // Taken (hard link) before a later period prunes it.
    let image = dir.path().join("kept.img");
    for attempt in 0.. {
        let found = wait_for_image(dir.path(), STARTUP);
        match std::fs::hard_link(&found, &image) {
            Ok(()) => break,
            Err(e) if attempt < 20 && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("cannot keep {}: {e}", found.display()),
        }
    }
    let (memory, stored) = inspect_sizes(&image);
    assert!(stored < memory, "{stored} bytes hold {memory} bytes");
    drop(orig);
    let mut r = resume(&image);
    let back = tick(&r.wait_line(is_who("p"), STARTUP));
    assert_eq!(back.sum, t.sum);
}

/// Compression and incremental images: `--compress --incremental` is refused as a usage error
/// (an incremental image takes raw pages from its ancestors); an incremental checkpoint whose
/// newest image is compressed stores that memory again (full) and resumes on its own.
#[test]
fn an_incremental_image_never_takes_pages_from_a_compressed_one() {
    let dir = temp_dir();
    let prog = zmem(dir.path());
    let mut orig = migrate_run(dir.path(), &prog, ["4", "2", "50", "0"]);
    let pid: i32 = field_num(&orig.wait_line("ready ", STARTUP), "pid");
    let first = tick(&orig.wait_line(is_who("p"), LINE));

    let mut cmd = Command::new(bin("migrate-checkpoint"));
    cmd.args(["--compress", "--incremental", "--dir"]).arg(dir.path()).arg(pid.to_string());
    run_tool("migrate-checkpoint", cmd, CKPT).assert_fails("--compress --incremental", 2, &["--incremental"]);

    let packed = checkpoint_with(pid, true, false, dir.path());
    let mut cmd = Command::new(bin("migrate-checkpoint"));
    cmd.args(["--incremental", "--kill", "--dir"]).arg(dir.path()).arg(pid.to_string());
    let out = run_tool("migrate-checkpoint", cmd, CKPT);
    assert!(out.status.success(), "{}", out.describe());
    let incr = PathBuf::from(out.stdout.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default());
    let rest = orig.read_to_eof(LINE);
    let last = last_of(&rest, "p", first.n);
    orig.wait_exit(Duration::from_secs(5));

    let reader = migrate_image::ImageReader::open(&incr).unwrap();
    let tree = reader.tree().unwrap();
    let meta = reader.meta().unwrap();
    assert!(meta.process.vmas.iter().all(|v| v.inherited.is_empty()), "pages taken from the compressed {packed:?}");
    assert!(tree.ancestors.len() <= 1, "{:?}", tree.ancestors);
    drop(reader);
    // It resumes without its parent.
    std::fs::remove_file(&packed).unwrap();
    let mut r = resume(&incr);
    let back = tick(&r.wait_line(is_who("p"), STARTUP));
    assert_eq!((back.n, back.pid, back.sum), (last + 1, pid, first.sum));
}

/// `migrate-resume --lazy` of a compressed image: compressed mappings are decoded by the
/// switch, never left to the page server, and the program resumes with the same memory.
#[test]
fn a_compressed_image_resumes_lazily_too() {
    let dir = temp_dir();
    let prog = zmem(dir.path());
    let mut orig = migrate_run(dir.path(), &prog, ["8", "4", "50", "0"]);
    let pid: i32 = field_num(&orig.wait_line("ready ", STARTUP), "pid");
    let first = tick(&orig.wait_line(is_who("p"), LINE));
    let image = checkpoint_with(pid, true, true, dir.path());
    let last = last_of(&orig.read_to_eof(LINE), "p", first.n);
    orig.wait_exit(Duration::from_secs(5));
    let mut r = resume_with(&["--lazy"], &image);
    let back = tick(&r.wait_line(is_who("p"), STARTUP));
    assert_eq!((back.n, back.pid, back.sum), (last + 1, pid, first.sum));
}
