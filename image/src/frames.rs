//! Compressed page sections (`VmaEntry::compression == PageCompression::Lz4`).
//!
//! A compressed VMA's `Pages` section is a sequence of independent **frames** followed by the
//! **frame table**:
//!
//! ```text
//! frame 0 | frame 1 | … | frame n-1 | word 0 | word 1 | … | word n-1 | n
//! ```
//!
//! Each run of stored pages is cut into frames of [`FRAME_PAGES`] consecutive pages (the last
//! frame of a run may be shorter): a frame never spans two runs, so it always fills one
//! contiguous range of the mapping, and the frames follow the runs in order. A frame is stored
//! as one lz4 *block* (lz4 block format, no frame header, no checksum of its own: the section's
//! checksum covers every stored byte), or raw when lz4 saves too little. The table holds one
//! little-endian u32 word per frame — the stored length, with [`RAW_BIT`] set for a raw frame —
//! then the frame count (u32). Frame `k` starts at the sum of the lengths before it, so the
//! section still streams front to back and a reader finds the frame of any page from the runs
//! and the table alone ([`FrameIndex`]).
//!
//! [`decompress_frame`] is the lz4 block decoder used by the restore's libc-free switch (and by
//! anything that must decode frames while the address space is half built, e.g. a lazy restore's
//! fault handler): it allocates nothing, calls no libc function (not even `memcpy`: the switch
//! runs while libmigrate's GOT and libc's data are unmapped), and never panics on bad input.
//! The compressor ([`compress_frame`]) is lz4_flex's, with a hash table made before the freeze.

/// Pages per frame (64 KiB).
pub const FRAME_PAGES: u64 = 16;
/// Bytes per full frame.
pub const FRAME_BYTES: usize = (FRAME_PAGES * crate::PAGE_SIZE) as usize;
/// Set in a table word: the frame is stored raw (its length is its page count × 4096).
pub const RAW_BIT: u32 = 1 << 31;
/// Room a compressed frame may need while it is being compressed (lz4's worst case for a full
/// frame); a frame that does not shrink is stored raw.
pub const MAX_COMPRESSED: usize = lz4_flex::block::get_maximum_output_size(FRAME_BYTES);

/// The compressor's hash table: make it (16 KiB, boxed by the caller) before the program is
/// frozen, and reuse it for every frame; compressing then allocates nothing.
pub type CompressTable = lz4_flex::block::CompressTable;

/// A hash table sized for full frames (a smaller one would be replaced — allocated — on the
/// first 64 KiB frame).
pub fn new_compress_table() -> CompressTable {
    CompressTable::large()
}

/// Why a frame cannot be decoded: the image is corrupted (or the table does not match).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The block ends inside a sequence.
    Truncated,
    /// A match refers to before the start of the frame, or has offset 0.
    BadOffset,
    /// The block decodes to more or fewer bytes than the frame holds.
    WrongSize,
}

impl FrameError {
    /// A fixed message (no formatting: usable from the switch).
    #[inline(always)]
    pub fn as_str(self) -> &'static str {
        match self {
            FrameError::Truncated => "an lz4 frame ends inside a sequence",
            FrameError::BadOffset => "an lz4 frame refers to bytes outside itself",
            FrameError::WrongSize => "an lz4 frame decodes to the wrong size",
        }
    }
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Number of frames of a run of `count` pages.
pub const fn frames_in_run(count: u64) -> u64 {
    count.div_ceil(FRAME_PAGES)
}

/// Number of frames of a VMA with these runs.
pub fn frame_count(runs: &[(u64, u64)]) -> u64 {
    runs.iter().map(|&(_, c)| frames_in_run(c)).fold(0u64, u64::saturating_add)
}

/// The frames of a VMA in order: (first page relative to the VMA's start, page count).
pub fn frame_pages(runs: &[(u64, u64)]) -> impl Iterator<Item = (u64, u64)> + '_ {
    runs.iter().flat_map(|&(first, count)| {
        (0..frames_in_run(count)).map(move |k| {
            let at = k * FRAME_PAGES;
            (first + at, (count - at).min(FRAME_PAGES))
        })
    })
}

/// Stored length of a table word.
#[inline(always)]
pub const fn word_len(word: u32) -> u32 {
    word & !RAW_BIT
}

/// Whether a table word marks a raw frame.
#[inline(always)]
pub const fn word_raw(word: u32) -> bool {
    word & RAW_BIT != 0
}

/// Compresses one frame (`src`: up to [`FRAME_BYTES`]) into `out` (at least
/// [`MAX_COMPRESSED`] bytes) and returns its table word. When lz4 saves less than 1/16 of the
/// frame the word says raw and the caller writes `src` itself (nothing useful is in `out`).
/// Allocates nothing with a table from [`new_compress_table`].
pub fn compress_frame(src: &[u8], out: &mut [u8], table: &mut CompressTable) -> u32 {
    let raw = src.len() as u32 | RAW_BIT;
    match lz4_flex::block::compress_into_with_table(src, out, table) {
        Ok(n) if n > 0 && n < src.len() - src.len() / 16 => n as u32,
        _ => raw,
    }
}

/// Checks a VMA's frame table (its words, without the count) against its runs and the
/// section length; returns the length of the frame data (where the table starts).
pub fn check_table(runs: &[(u64, u64)], words: &[u32], section_len: u64) -> Result<u64, String> {
    let want = frame_count(runs);
    if words.len() as u64 != want {
        return Err(format!("{} frames in the table, {want} expected from the stored pages", words.len()));
    }
    let mut data = 0u64;
    for (k, (&w, (_, pages))) in words.iter().zip(frame_pages(runs)).enumerate() {
        let size = pages * crate::PAGE_SIZE;
        let len = u64::from(word_len(w));
        let ok = if word_raw(w) { len == size } else { len > 0 && len < size };
        if !ok {
            return Err(format!(
                "frame {k} ({pages} pages) is {}stored in {len} bytes",
                if word_raw(w) { "raw but " } else { "" }
            ));
        }
        data += len;
    }
    let table = (words.len() as u64 + 1) * 4;
    if data.checked_add(table) != Some(section_len) {
        return Err(format!("{data} bytes of frames and a {table}-byte table in a section of {section_len} bytes"));
    }
    Ok(data)
}

/// Where one frame is: the answer of [`FrameIndex::locate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef {
    /// Index in the table.
    pub index: usize,
    /// Offset of its bytes from the start of the section, and their length.
    pub offset: u64,
    pub len: u32,
    pub raw: bool,
    /// The pages it fills: first page relative to the VMA's start, count.
    pub first_page: u64,
    pub pages: u64,
}

/// Random access to a compressed VMA's frames (for a lazy restore: the frame holding a page).
#[derive(Debug, Clone)]
pub struct FrameIndex {
    frames: Vec<FrameRef>,
}

impl FrameIndex {
    /// Builds the index from a table already checked with [`check_table`].
    pub fn new(runs: &[(u64, u64)], words: &[u32]) -> Self {
        let mut offset = 0u64;
        let frames = frame_pages(runs)
            .zip(words)
            .enumerate()
            .map(|(index, ((first_page, pages), &w))| {
                let f = FrameRef { index, offset, len: word_len(w), raw: word_raw(w), first_page, pages };
                offset += u64::from(f.len);
                f
            })
            .collect();
        FrameIndex { frames }
    }

    /// The frame that holds page `page` (relative to the VMA's start), if that page is stored.
    pub fn locate(&self, page: u64) -> Option<FrameRef> {
        let i = self.frames.partition_point(|f| f.first_page + f.pages <= page);
        self.frames.get(i).copied().filter(|f| f.first_page <= page)
    }

    pub fn frames(&self) -> &[FrameRef] {
        &self.frames
    }
}

/// Copies `n` bytes from `src` to `dst` forwards, one byte after the other as far as the
/// result goes (`rep movsb`): also right when the ranges overlap with `dst` after `src`.
/// Never a call to `memcpy`.
///
/// # Safety
/// `src..src+n` must be readable and `dst..dst+n` writable.
#[inline(always)]
unsafe fn copy_forward(dst: *mut u8, src: *const u8, n: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller guarantees both ranges; rep movsb touches nothing else (DF is clear
    // in the System V ABI).
    unsafe {
        core::arch::asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    for i in 0..n {
        // SAFETY: as above; volatile keeps the compiler from turning the loop into memcpy.
        unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
    }
}

/// Copies 16 bytes (two unaligned 8-byte loads and stores; no call).
///
/// # Safety
/// 16 bytes must be readable at `src` and writable at `dst`, the two ranges not overlapping.
#[inline(always)]
unsafe fn copy16(dst: *mut u8, src: *const u8) {
    // SAFETY: as the caller guarantees.
    unsafe {
        let a = core::ptr::read_unaligned(src as *const u64);
        let b = core::ptr::read_unaligned(src.add(8) as *const u64);
        core::ptr::write_unaligned(dst as *mut u64, a);
        core::ptr::write_unaligned(dst.add(8) as *mut u64, b);
    }
}

/// Reads an lz4 length continuation (bytes of 255 add up until a smaller one).
#[inline(always)]
fn more_length(src: &[u8], pos: &mut usize, mut n: usize) -> Result<usize, FrameError> {
    loop {
        let b = *src.get(*pos).ok_or(FrameError::Truncated)?;
        *pos += 1;
        n = n.checked_add(b as usize).ok_or(FrameError::WrongSize)?;
        if b != 255 {
            return Ok(n);
        }
    }
}

/// Decodes one lz4 block `src` into exactly `dst` (the frame's pages): every byte of `dst` is
/// written, every byte of `src` used. No allocation, no libc call, no panic on any input.
/// Always inlined: a call into another crate's code may go through the caller's GOT, which the
/// restore's switch has unmapped while it decodes.
#[inline(always)]
pub fn decompress_frame(src: &[u8], dst: &mut [u8]) -> Result<(), FrameError> {
    let out = dst.as_mut_ptr();
    let cap = dst.len();
    let mut ip = 0usize;
    let mut op = 0usize;
    loop {
        let token = *src.get(ip).ok_or(FrameError::Truncated)?;
        ip += 1;
        let mut literals = (token >> 4) as usize;
        if literals == 15 {
            literals = more_length(src, &mut ip, literals)?;
        }
        if literals > src.len() - ip {
            return Err(FrameError::Truncated);
        }
        if literals > cap - op {
            return Err(FrameError::WrongSize);
        }
        if literals <= 16 && src.len() - ip >= 16 && cap - op >= 16 {
            // Short literals (the common case): one 16-byte copy; what it writes past them is
            // overwritten by what follows (the frame is filled to its end or refused).
            // SAFETY: 16 bytes are readable at ip and writable at op, checked just above.
            unsafe { copy16(out.add(op), src.as_ptr().add(ip)) };
        } else {
            // SAFETY: ip + literals <= src.len() and op + literals <= cap, checked above.
            unsafe { copy_forward(out.add(op), src.as_ptr().add(ip), literals) };
        }
        ip += literals;
        op += literals;
        if ip == src.len() {
            // The last sequence has literals only.
            return if op == cap { Ok(()) } else { Err(FrameError::WrongSize) };
        }
        let lo = *src.get(ip).ok_or(FrameError::Truncated)?;
        let hi = *src.get(ip + 1).ok_or(FrameError::Truncated)?;
        ip += 2;
        let offset = u16::from_le_bytes([lo, hi]) as usize;
        if offset == 0 || offset > op {
            return Err(FrameError::BadOffset);
        }
        let mut length = (token & 15) as usize;
        if length == 15 {
            length = more_length(src, &mut ip, length)?;
        }
        length += 4;
        if length > cap - op {
            return Err(FrameError::WrongSize);
        }
        if offset >= 16 && length <= 32 && cap - op >= 32 {
            // A short match from at least 16 bytes back: two 16-byte copies, the second after
            // the first (it may read what the first wrote, as the match means).
            // SAFETY: the source op-offset.. lies in what was written (offset <= op) and its
            // 32 bytes end at op-offset+32 <= op+16, written by the first copy before the
            // second reads them; 32 bytes are writable at op (checked); each 16-byte copy's
            // ranges do not overlap (offset >= 16).
            unsafe {
                copy16(out.add(op), out.add(op - offset));
                copy16(out.add(op + 16), out.add(op + 16 - offset));
            }
            op += length;
            continue;
        }
        // The match repeats the `offset` bytes before it. Copy it in non-overlapping pieces
        // that double in size: what is already written is periodic with period `offset`.
        let mut done = 0usize;
        let mut piece = offset;
        while done < length {
            let n = piece.min(length - done);
            // SAFETY: source op-offset.. lies inside what was written (offset <= op); the
            // destination op+done..op+done+n stays below op+length <= cap; the source ends at
            // op-offset+n <= op+done, so the ranges do not overlap.
            unsafe { copy_forward(out.add(op + done), out.add(op - offset), n) };
            done += n;
            piece = offset + done;
        }
        op += length;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(seed: u64, n: usize, compressible: bool) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if compressible {
                    if (i / 64) % 3 == 0 {
                        0
                    } else {
                        b"abcdefgh"[(x % 3) as usize]
                    }
                } else {
                    x as u8
                }
            })
            .collect()
    }

    #[test]
    fn round_trip_through_lz4_flex_blocks() {
        let mut table = new_compress_table();
        let mut out = vec![0u8; MAX_COMPRESSED];
        for (seed, size, compressible) in
            [(1, FRAME_BYTES, true), (2, FRAME_BYTES, false), (3, 4096, true), (4, 12288, true), (5, FRAME_BYTES, true)]
        {
            let src = pages(seed, size, compressible);
            let w = compress_frame(&src, &mut out, &mut table);
            assert_eq!(word_raw(w), !compressible, "seed {seed}");
            if !word_raw(w) {
                let block = &out[..word_len(w) as usize];
                let mut back = vec![0xaau8; size];
                decompress_frame(block, &mut back).unwrap();
                assert!(back == src, "seed {seed}");
                // One byte short or long is refused, never a partial frame.
                assert!(decompress_frame(block, &mut back[..size - 1]).is_err());
                let mut longer = vec![0u8; size + 1];
                assert_eq!(decompress_frame(block, &mut longer), Err(FrameError::WrongSize));
            }
        }
        let zeros = vec![0u8; FRAME_BYTES];
        let w = compress_frame(&zeros, &mut out, &mut table);
        assert!(!word_raw(w) && word_len(w) < 400, "{w:#x}");
    }

    /// Garbage and damaged blocks: never a panic, and the answer agrees with lz4_flex's own
    /// decoder whenever that one fills the frame exactly.
    #[test]
    fn damaged_blocks_are_refused_like_lz4_flex_does() {
        let mut table = new_compress_table();
        let mut out = vec![0u8; MAX_COMPRESSED];
        let src = pages(9, 8192, true);
        let w = compress_frame(&src, &mut out, &mut table);
        let good = out[..word_len(w) as usize].to_vec();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n.max(1) as u64) as usize
        };
        for case in 0..20000 {
            let mut block = if case % 4 == 0 { (0..next(64)).map(|_| next(256) as u8).collect() } else { good.clone() };
            for _ in 0..1 + next(3) {
                match next(3) {
                    0 if !block.is_empty() => {
                        let i = next(block.len());
                        block[i] ^= 1 << next(8);
                    }
                    1 => block.truncate(next(block.len() + 1)),
                    _ => block.insert(next(block.len() + 1), next(256) as u8),
                }
            }
            let size = if case % 2 == 0 { 8192 } else { 1 + next(9000) };
            let mut ours = vec![0u8; size];
            let mut theirs = vec![0u8; size];
            let a = decompress_frame(&block, &mut ours);
            let b = lz4_flex::block::decompress_into(&block, &mut theirs);
            if let Ok(n) = b {
                if n == size {
                    assert!(a.is_ok() && ours == theirs, "case {case}: {a:?}");
                    continue;
                }
            }
            assert!(a.is_err(), "case {case}: we decoded a block lz4_flex refuses");
        }
    }

    #[test]
    fn tables_and_random_access() {
        let runs = [(0u64, 20u64), (40, 16), (100, 1)];
        assert_eq!(frame_count(&runs), 4);
        let layout: Vec<_> = frame_pages(&runs).collect();
        assert_eq!(layout, [(0, 16), (16, 4), (40, 16), (100, 1)]);
        let words = [100, (4 * 4096) | RAW_BIT, 300, 7];
        let table = 5 * 4;
        assert_eq!(check_table(&runs, &words, 100 + 16384 + 300 + 7 + table), Ok(100 + 16384 + 300 + 7));
        assert!(check_table(&runs, &words, 100 + 16384 + 300 + 7 + table + 1).is_err());
        assert!(check_table(&runs, &words[..3], 0).is_err());
        assert!(check_table(&runs, &[100, 4 * 4096, 300, 7], 0).is_err(), "a compressed frame as big as raw");
        assert!(check_table(&runs, &[100, (3 * 4096) | RAW_BIT, 300, 7], 0).is_err(), "a raw frame of the wrong size");
        assert!(check_table(&runs, &[0, (4 * 4096) | RAW_BIT, 300, 7], 0).is_err(), "an empty frame");
        let index = FrameIndex::new(&runs, &words);
        let f = index.locate(18).unwrap();
        assert_eq!((f.index, f.offset, f.len, f.raw, f.first_page, f.pages), (1, 100, 16384, true, 16, 4));
        assert_eq!(index.locate(40).unwrap().offset, 100 + 16384);
        assert_eq!(index.locate(100).unwrap().index, 3);
        assert!(index.locate(20).is_none() && index.locate(56).is_none() && index.locate(101).is_none());
    }
}
