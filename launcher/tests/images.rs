//! migrate-inspect and migrate-resume on valid, garbage, truncated, corrupted and foreign
//! images: exact exit codes and messages.

mod common;

use common::*;
use migrate_image::SectionKind;
use std::fs;
use std::path::Path;

fn valid_image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("valid.img");
    write_image(&path, &sample_meta(Path::new("/bin/sh"), &["sh"]));
    path
}

fn both(path: &Path, code: i32, needle: &str) {
    let mut c = bin("inspect");
    c.arg(path);
    run(c).expect_error("inspect", code, needle);
    let mut c = bin("resume");
    c.arg(path);
    run(c).expect_error("resume", code, needle);
}

#[test]
fn inspect_shows_a_valid_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = valid_image(dir.path());
    let mut c = bin("inspect");
    c.arg(&img);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let version = format!("version {}", migrate_image::FORMAT_VERSION);
    for needle in [
        version.as_str(),
        "all section checksums verified",
        "vpid 42",
        "0000000000010000-0000000000012000 rw-",
        "1/2",
        "vtid 42",
        "SIGUSR1",
        "RLIMIT_STACK",
        "pages of process 0 vma 0",
        "stored memory 4.0 KiB",
    ] {
        assert!(r.stdout.contains(needle), "missing {needle:?} in:\n{}", r.stdout);
    }
    assert!(r.stderr.is_empty(), "{}", r.stderr);

    let mut c = bin("inspect");
    c.arg("--json").arg(&img);
    let r = run(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["format_version"], migrate_image::FORMAT_VERSION);
    assert_eq!(v["image_bytes"], fs::metadata(&img).unwrap().len());
    assert_eq!(v["sections"].as_array().unwrap().len(), 4, "pages, page hashes, process metadata, tree");
    assert_eq!(v["tree"]["processes"][0]["vpid"], 42);
    assert_eq!(v["meta"]["process"]["vpid"], 42);
    assert_eq!(v["meta"]["process"]["threads"][0]["name"], "sample");
}

#[test]
fn garbage_missing_and_empty_files() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage");
    fs::write(&garbage, b"this is certainly not an image, just some text\n").unwrap();
    both(&garbage, 3, "is not a migrate image");
    let empty = dir.path().join("empty");
    fs::write(&empty, b"").unwrap();
    both(&empty, 3, "is not a migrate image");
    both(&dir.path().join("absent.img"), 3, "cannot read image");
    both(dir.path(), 3, "cannot read image");
}

#[test]
fn truncated_images() {
    let dir = tempfile::tempdir().unwrap();
    let img = valid_image(dir.path());
    let bytes = fs::read(&img).unwrap();
    let cut = dir.path().join("cut.img");
    fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    both(&cut, 3, "is truncated or incomplete");
    fs::write(&cut, &bytes[..5000]).unwrap();
    both(&cut, 3, "is truncated or incomplete");
    fs::write(&cut, &bytes[..20]).unwrap();
    both(&cut, 3, "is truncated or incomplete");
}

#[test]
fn corrupted_images() {
    let dir = tempfile::tempdir().unwrap();
    // A flipped byte in the metadata: both commands refuse.
    let img = valid_image(dir.path());
    let meta_at = section_offset(&img, |k| k == SectionKind::Meta { proc: 0 });
    flip_byte(&img, meta_at + 5);
    both(&img, 3, "is corrupted");

    // A flipped byte in the pages: inspect shows it only with --no-verify; resume refuses.
    let img = valid_image(dir.path());
    let pages_at = section_offset(&img, |k| matches!(k, SectionKind::Pages { .. }));
    flip_byte(&img, pages_at + 100);
    let mut c = bin("inspect");
    c.arg("--no-verify").arg(&img);
    assert_eq!(run(c).code, 0);
    let mut c = bin("inspect");
    c.arg(&img);
    run(c).expect_error("inspect", 3, "section 0 (Pages { proc: 0, vma: 0 }) checksum mismatch");
    let mut c = bin("resume");
    c.arg(&img);
    run(c).expect_error("resume", 3, "is corrupted");

    // A flipped byte in the header.
    let img = valid_image(dir.path());
    flip_byte(&img, 9);
    both(&img, 3, "header checksum mismatch");
}

fn with_version(path: &Path, version: u32) {
    let mut b = fs::read(path).unwrap();
    b[8..12].copy_from_slice(&version.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&b[0..16]);
    b[16..24].copy_from_slice(&sum.to_le_bytes());
    fs::write(path, b).unwrap();
}

#[test]
fn other_format_versions() {
    let dir = tempfile::tempdir().unwrap();
    let img = valid_image(dir.path());
    let newer = migrate_image::FORMAT_VERSION + 1;
    with_version(&img, newer);
    both(&img, 3, &format!("written by a newer migrate (image format {newer}"));
    // Format 1 (before timers) was only written by development builds.
    with_version(&img, 1);
    both(&img, 3, "uses image format 1, older than this build supports");
}

#[test]
fn json_errors_go_to_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage");
    fs::write(&garbage, b"nope nope nope nope nope").unwrap();
    for verb in ["inspect", "resume"] {
        let mut c = bin(verb);
        c.arg("--json").arg(&garbage);
        let r = run(c);
        assert_eq!(r.code, 3);
        let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
        assert_eq!(v["code"], 3);
        assert!(v["error"].as_str().unwrap().contains("is not a migrate image"));
    }
}

#[test]
fn usage_errors() {
    let mut c = bin("inspect");
    c.arg("--bogus");
    run(c).expect_error("inspect", 2, "unexpected argument '--bogus'");
    let mut c = bin("resume");
    c.arg("--help");
    let r = run(c);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("Exit codes:"), "{}", r.stdout);
}
