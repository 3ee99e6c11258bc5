//! Pre-copy for live migration: most of a large program's memory travels while it still runs,
//! so that the freeze only has to carry what changed.
//!
//! The source reads the tree's private memory through /proc/PID/mem (no freeze) in rounds and
//! sends every 4 KiB block whose content the target does not have yet (content-addressed by
//! xxh3-128; all-zero blocks never travel). A round that finds little new stops the rounds.
//! Then the frozen tree writes its complete image as usual, and the source sends it as a
//! sequence of records: a block the target already holds is a 16-byte reference, anything else
//! travels literally. Memory pages sit page-aligned in an image, so they line up with the
//! 4 KiB blocks. The target rebuilds the exact image file and verifies its checksums as for a
//! plain transfer — a reference that resolves to the wrong bytes cannot go unnoticed. The image
//! format is untouched.

use anyhow::{bail, Context, Result};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::xxh3_128;

pub const BLOCK: usize = 4096;
/// Blocks per pre-copy frame (1 MiB).
const BATCH: usize = 256;
const LITERAL: u8 = 0;
const REFERENCE: u8 = 1;
const ZERO: u8 = 2;

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

// ------------------------------------------------------------------ source side

/// The private memory ranges of `pid` worth sending ahead: writable private or anonymous
/// mappings (what an image stores), not the kernel's special ones.
fn ranges(pid: i32) -> Vec<(u64, u64)> {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { return Vec::new() };
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let name = l.split_whitespace().nth(5).unwrap_or("");
            if !perms.starts_with("rw") || !perms.ends_with('p') || name.starts_with("[v") {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
        })
        .collect()
}

/// What the rounds sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    pub rounds: u32,
    pub bytes: u64,
}

/// Sends the memory of `pids` ahead, in rounds, through `send_batch` (one frame payload of
/// whole blocks). `known` collects the hashes the target holds.
pub fn run(pids: &[i32], known: &mut HashSet<u128>, mut send_batch: impl FnMut(&[u8]) -> Result<()>) -> Result<Sent> {
    let mut sent = Sent::default();
    let mut first = 0u64;
    loop {
        let mut this = 0u64;
        let mut batch: Vec<u8> = Vec::with_capacity(BATCH * BLOCK);
        let mut buf = vec![0u8; 1 << 20];
        for &pid in pids {
            let Ok(mem) = File::open(format!("/proc/{pid}/mem")) else { continue };
            for (start, end) in ranges(pid) {
                let mut at = start;
                while at < end {
                    let n = ((end - at) as usize).min(buf.len());
                    // A range that went away or cannot be read is simply not sent ahead.
                    let Ok(got) = mem.read_at(&mut buf[..n], at) else { break };
                    if got == 0 {
                        break;
                    }
                    for block in buf[..got - got % BLOCK].chunks_exact(BLOCK) {
                        if is_zero(block) || !known.insert(xxh3_128(block)) {
                            continue;
                        }
                        batch.extend_from_slice(block);
                        this += BLOCK as u64;
                        if batch.len() == BATCH * BLOCK {
                            send_batch(&batch)?;
                            batch.clear();
                        }
                    }
                    at += got as u64;
                }
            }
        }
        if !batch.is_empty() {
            send_batch(&batch)?;
        }
        sent.rounds += 1;
        sent.bytes += this;
        if sent.rounds == 1 {
            first = this;
        }
        // Another round pays only while a good part of memory still changes.
        if sent.rounds >= 4 || this <= (first / 16).max(1 << 20) {
            return Ok(sent);
        }
    }
}

/// Encodes image bytes `data` as records, appending to `out`: references for blocks the
/// target holds, literals for the rest. Returns the literal bytes.
pub fn encode(data: &[u8], known: &HashSet<u128>, out: &mut Vec<u8>) -> u64 {
    let mut literal = 0;
    for block in data.chunks(BLOCK) {
        if block.len() == BLOCK && is_zero(block) {
            out.push(ZERO);
            continue;
        }
        if block.len() == BLOCK {
            let h = xxh3_128(block);
            if known.contains(&h) {
                out.push(REFERENCE);
                out.extend_from_slice(&h.to_le_bytes());
                continue;
            }
        }
        out.push(LITERAL);
        out.extend_from_slice(&(block.len() as u16).to_le_bytes());
        out.extend_from_slice(block);
        literal += block.len() as u64;
    }
    literal
}

// ------------------------------------------------------------------ target side

/// The blocks a source sent ahead, in a 0600 file of the spool (removed on drop).
pub struct Store {
    path: PathBuf,
    file: File,
    index: HashMap<u128, u64>,
    len: u64,
    limit: u64,
}

impl Store {
    pub fn new(spool: &Path, limit: u64) -> Result<Store> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = spool.join(format!(".precopy-{nanos}.blocks"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Store { path, file, index: HashMap::new(), len: 0, limit })
    }

    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// Adds a frame of whole blocks.
    pub fn add(&mut self, payload: &[u8]) -> Result<()> {
        if !payload.len().is_multiple_of(BLOCK) {
            bail!("a pre-copy frame of {} bytes is not made of whole blocks", payload.len());
        }
        for block in payload.chunks_exact(BLOCK) {
            let h = xxh3_128(block);
            if self.index.contains_key(&h) {
                continue;
            }
            if self.len + BLOCK as u64 > self.limit {
                bail!("the peer sent more memory ahead than this daemon accepts");
            }
            self.file.write_all_at(block, self.len).context("cannot store pre-copied memory")?;
            self.index.insert(h, self.len);
            self.len += BLOCK as u64;
        }
        Ok(())
    }

    /// Decodes one frame of records into `out` (the image being rebuilt), writing at most
    /// `limit` bytes (what the header announced is left); returns the bytes written.
    pub fn decode(&self, mut records: &[u8], out: &mut impl Write, limit: u64) -> Result<u64> {
        let mut written = 0u64;
        let mut block = vec![0u8; BLOCK];
        while let Some((&tag, rest)) = records.split_first() {
            records = rest;
            if written + if tag == LITERAL { 0 } else { BLOCK as u64 } > limit {
                bail!("the peer sent more than the image size it announced");
            }
            match tag {
                ZERO => {
                    out.write_all(&[0u8; BLOCK])?;
                    written += BLOCK as u64;
                }
                REFERENCE => {
                    let Some((h, rest)) = records.split_first_chunk::<16>() else { bail!("a cut reference") };
                    records = rest;
                    let h = u128::from_le_bytes(*h);
                    let Some(&at) = self.index.get(&h) else { bail!("a reference to memory that was not sent ahead") };
                    self.file.read_exact_at(&mut block, at).context("cannot read pre-copied memory back")?;
                    out.write_all(&block)?;
                    written += BLOCK as u64;
                }
                LITERAL => {
                    let Some((n, rest)) = records.split_first_chunk::<2>() else { bail!("a cut literal") };
                    let n = u16::from_le_bytes(*n) as usize;
                    if n > BLOCK || rest.len() < n {
                        bail!("a literal of {n} bytes does not fit its frame");
                    }
                    if written + n as u64 > limit {
                        bail!("the peer sent more than the image size it announced");
                    }
                    out.write_all(&rest[..n])?;
                    records = &rest[n..];
                    written += n as u64;
                }
                other => bail!("unknown record {other}"),
            }
        }
        Ok(written)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_rebuilds_from_references_and_literals() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::new(dir.path(), 1 << 30).unwrap();
        let ahead: Vec<u8> = (0..3 * BLOCK).map(|i| (i / BLOCK + 1) as u8).collect();
        let mut known = HashSet::new();
        for b in ahead.chunks(BLOCK) {
            known.insert(xxh3_128(b));
        }
        store.add(&ahead).unwrap();
        // An "image": a header-ish literal, two known blocks, a zero block, a changed block,
        // and a short tail.
        let mut image = vec![9u8; BLOCK];
        image.extend_from_slice(&ahead[BLOCK..3 * BLOCK]);
        image.extend_from_slice(&[0u8; BLOCK]);
        image.extend_from_slice(&[7u8; BLOCK]);
        image.extend_from_slice(&[5u8; 40]);
        let mut records = Vec::new();
        let literal = encode(&image, &known, &mut records);
        assert_eq!(literal, 2 * BLOCK as u64 + 40, "only what the target lacks travels");
        let mut rebuilt = Vec::new();
        assert_eq!(store.decode(&records, &mut rebuilt, image.len() as u64).unwrap(), image.len() as u64);
        assert_eq!(rebuilt, image);
        assert!(store.decode(&records, &mut Vec::new(), image.len() as u64 - 1).is_err(), "bounded by the header");
        // A reference the target does not hold is an error, not a guess.
        let mut bad = vec![REFERENCE];
        bad.extend_from_slice(&1234u128.to_le_bytes());
        assert!(store.decode(&bad, &mut Vec::new(), 1 << 20).is_err());
        assert!(store.add(&[1u8; 100]).is_err(), "whole blocks only");
    }

    #[test]
    fn a_running_process_memory_is_sent_ahead() {
        // 64 KiB of one byte value: it holds page-aligned blocks of that value.
        let marker = vec![0x5au8; 16 * BLOCK];
        let mut known = HashSet::new();
        let mut got = 0;
        let sent = run(&[std::process::id() as i32], &mut known, |b| {
            got += b.len();
            Ok(())
        })
        .unwrap();
        assert!(known.contains(&xxh3_128(&[0x5au8; BLOCK])), "the marker's pages were read");
        assert_eq!(got as u64, sent.bytes);
        assert!(sent.rounds >= 1);
        drop(marker);
    }
}
