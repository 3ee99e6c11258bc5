//! The container format.
//!
//! | offset            | size  | content                                                        |
//! |-------------------|-------|----------------------------------------------------------------|
//! | 0                 | 4096  | header: magic, format version, flags, header checksum, padding |
//! | 4096              | ...   | sections, each page-aligned when it holds memory pages         |
//! | table_offset      | ...   | section table: postcard `Vec<SectionEntry>`                    |
//! | end - 40          | 40    | trailer: table offset, table length, table checksum, magic     |
//!
//! Every section and the table carry an xxh3-64 checksum; the header's padding and the
//! alignment padding between sections are zeros, which the reader checks too, so no byte of an
//! image goes unchecked. The header is written first and the trailer last, so an image can be
//! streamed without seeking; a truncated image has no valid trailer. Sections never overlap and
//! no two have the same kind. All integers are little-endian.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// First bytes of every image.
pub const MAGIC: [u8; 8] = *b"MIGRATE\x7f";
/// Last bytes of every image (end of trailer).
pub const TRAILER_MAGIC: [u8; 8] = *b"\x7fETARGIM";
/// The format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 4;
/// The oldest format version this build reads (4 added per-page hashes, incremental images
/// and compressed page sections; the metadata of 3 decodes differently).
pub const OLDEST_READABLE_VERSION: u32 = 4;
/// Size of the header block; sections start here.
pub const HEADER_LEN: u64 = 4096;
/// Memory sections are aligned to this so they can be mapped.
pub const PAGE_SIZE: u64 = 4096;
const TRAILER_LEN: u64 = 40;
/// Upper bound for decoded metadata (the table and the metadata section).
pub const MAX_METADATA_LEN: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a migrate image (bad magic); pass an image written by migrate-checkpoint")]
    NotAnImage { path: PathBuf },
    #[error("{path} was written by a newer migrate (image format {found}, this build reads up to {supported}); resume it with a newer migrate-resume")]
    NewerVersion { path: PathBuf, found: u32, supported: u32 },
    #[error("{path} uses image format {found}, older than this build supports ({oldest}); resume it with the migrate version that wrote it")]
    OlderVersion { path: PathBuf, found: u32, oldest: u32 },
    #[error("{path} is truncated or incomplete ({detail}); the checkpoint did not finish or the copy was cut short: take a new checkpoint or copy the image again")]
    Truncated { path: PathBuf, detail: String },
    #[error("{path} is corrupted: {what} checksum mismatch (stored {stored:#018x}, computed {computed:#018x}); copy the image again")]
    Corrupted { path: PathBuf, what: String, stored: u64, computed: u64 },
    #[error("{path}: malformed {what}: {detail}")]
    Malformed { path: PathBuf, what: String, detail: String },
    #[error("{path} has no {0:?} section", kind)]
    MissingSection { path: PathBuf, kind: SectionKind },
    #[error("cannot encode image metadata: {0}")]
    Encode(String),
    #[error("cannot write image: {0}")]
    Write(io::Error),
}

/// What a section holds. `proc` indexes `TreeMeta::processes`. An image holds at most one
/// section of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SectionKind {
    /// postcard-encoded [`crate::schema::TreeMeta`]: the processes and what they share.
    Tree,
    /// postcard-encoded [`crate::schema::ImageMeta`] of one process.
    Meta { proc: u32 },
    /// Raw pages of one VMA of one process: the runs listed in its `runs`, concatenated.
    Pages { proc: u32, vma: u32 },
    /// A whole file's contents (deleted files, `--with-binaries`).
    FileContents { proc: u32, file: u32 },
    /// Contents of an object shared between processes (e.g. shared anonymous memory).
    Shared { object: u32 },
    /// The xxh3-64 (little-endian u64) of every page of one VMA's `runs`, in order, wherever
    /// the page is stored: an incremental checkpoint compares pages against them, a lazy
    /// restore checks each page it brings in.
    PageHashes { proc: u32, vma: u32 },
}

/// One entry of the section table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionEntry {
    pub kind: SectionKind,
    pub offset: u64,
    pub length: u64,
    pub checksum: u64,
}

/// Where the writer puts bytes. libmigrate implements it with raw `write(2)` so that writing
/// an image from the frozen program never goes through libc's buffered I/O.
pub trait Sink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
}

impl Sink for File {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        io::Write::write_all(self, buf)
    }
}

impl Sink for Vec<u8> {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.extend_from_slice(buf);
        Ok(())
    }
}

fn header_bytes(flags: u32) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&flags.to_le_bytes());
    let sum = xxh3_64(&h[0..16]);
    h[16..24].copy_from_slice(&sum.to_le_bytes());
    h
}

/// The xxh3-64 of one page, as a `PageHashes` section stores it.
pub fn page_hash(page: &[u8]) -> u64 {
    xxh3_64(page)
}

/// Computes a section's checksum. For most sections it is the xxh3-64 of its bytes; for a
/// `Pages` section it is the xxh3-64 of its pages' hashes (little-endian u64 each): the writer
/// hashes every page anyway (page hashes, incremental checkpoints), so one pass over the memory
/// yields both, and a reader checks the same bytes as strongly.
pub struct SectionHasher {
    pages: bool,
    outer: Xxh3,
    partial: Xxh3,
    fill: usize,
}

impl SectionHasher {
    pub fn new(kind: SectionKind) -> Self {
        SectionHasher {
            pages: matches!(kind, SectionKind::Pages { .. }),
            outer: Xxh3::new(),
            partial: Xxh3::new(),
            fill: 0,
        }
    }

    pub fn update(&mut self, mut buf: &[u8]) {
        if !self.pages {
            self.outer.update(buf);
            return;
        }
        const PAGE: usize = PAGE_SIZE as usize;
        if self.fill > 0 {
            let take = (PAGE - self.fill).min(buf.len());
            self.partial.update(&buf[..take]);
            self.fill += take;
            buf = &buf[take..];
            if self.fill == PAGE {
                self.outer.update(&self.partial.digest().to_le_bytes());
                self.partial.reset();
                self.fill = 0;
            }
        }
        while buf.len() >= PAGE {
            self.outer.update(&xxh3_64(&buf[..PAGE]).to_le_bytes());
            buf = &buf[PAGE..];
        }
        if !buf.is_empty() {
            self.partial.update(buf);
            self.fill = buf.len();
        }
    }

    /// Adds pages whose hashes the caller already computed (a `Pages` section only).
    pub fn update_page_hashes(&mut self, hashes: &[u64]) {
        debug_assert!(self.pages && self.fill == 0);
        for h in hashes {
            self.outer.update(&h.to_le_bytes());
        }
    }

    pub fn digest(&self) -> u64 {
        if self.fill > 0 {
            // Not a whole number of pages (a malformed section): still a deterministic value.
            let mut o = self.outer.clone();
            o.update(&self.partial.digest().to_le_bytes());
            return o.digest();
        }
        self.outer.digest()
    }
}

/// Writes an image front to back. Allocation happens only in `new` (table capacity), in
/// `add_section_bytes` callers' buffers and in `finish`: the page-writing path
/// (`begin_section`/`write`/`end_section`) allocates nothing while the table has capacity.
pub struct ImageWriter<S: Sink> {
    sink: S,
    pos: u64,
    sections: Vec<SectionEntry>,
    current: Option<(SectionKind, u64, SectionHasher)>,
}

impl<S: Sink> ImageWriter<S> {
    /// Starts an image, writing its header. `max_sections` sizes the table up front.
    pub fn new(mut sink: S, max_sections: usize) -> Result<Self, ImageError> {
        sink.write_all(&header_bytes(0)).map_err(ImageError::Write)?;
        Ok(ImageWriter { sink, pos: HEADER_LEN, sections: Vec::with_capacity(max_sections + 4), current: None })
    }

    /// Current file offset.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn raw(&mut self, buf: &[u8]) -> Result<(), ImageError> {
        self.sink.write_all(buf).map_err(ImageError::Write)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Pads with zeros to the next page boundary.
    pub fn align_to_page(&mut self) -> Result<(), ImageError> {
        const ZEROS: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
        let rem = (self.pos % PAGE_SIZE) as usize;
        if rem != 0 {
            self.raw(&ZEROS[..PAGE_SIZE as usize - rem])?;
        }
        Ok(())
    }

    /// Opens a section at the current (optionally page-aligned) offset.
    pub fn begin_section(&mut self, kind: SectionKind, page_aligned: bool) -> Result<u64, ImageError> {
        assert!(self.current.is_none(), "section already open");
        if page_aligned {
            self.align_to_page()?;
        }
        self.current = Some((kind, self.pos, SectionHasher::new(kind)));
        Ok(self.pos)
    }

    /// Appends bytes to the open section.
    pub fn write(&mut self, buf: &[u8]) -> Result<(), ImageError> {
        match self.current.as_mut() {
            Some((_, _, hasher)) => hasher.update(buf),
            None => panic!("write outside a section"),
        }
        self.raw(buf)
    }

    /// Appends whole pages to the open `Pages` section whose hashes (`page_hash`, one per
    /// page) the caller already computed.
    pub fn write_hashed_pages(&mut self, buf: &[u8], hashes: &[u64]) -> Result<(), ImageError> {
        debug_assert_eq!(buf.len() as u64, hashes.len() as u64 * PAGE_SIZE);
        match self.current.as_mut() {
            Some((_, _, hasher)) => hasher.update_page_hashes(hashes),
            None => panic!("write outside a section"),
        }
        self.raw(buf)
    }

    /// Appends whole pages to the open `Pages` section without hashing them: the caller hashes
    /// them (elsewhere, meanwhile) and closes the section with [`Self::end_pages_section`].
    pub fn write_unhashed_pages(&mut self, buf: &[u8]) -> Result<(), ImageError> {
        assert!(self.current.is_some(), "write outside a section");
        self.raw(buf)
    }

    /// The hashes of pages written with [`Self::write_unhashed_pages`], in order.
    pub fn note_page_hashes(&mut self, hashes: &[u64]) {
        match self.current.as_mut() {
            Some((_, _, hasher)) => hasher.update_page_hashes(hashes),
            None => panic!("no open section"),
        }
    }

    /// Removes section `kind` from the table if it holds no bytes (a writer that found nothing
    /// to store after all); the indices of later sections shift.
    pub fn forget_empty_section(&mut self, kind: SectionKind) {
        self.sections.retain(|s| s.kind != kind || s.length != 0);
    }

    /// Closes the open section and returns its index in the table.
    pub fn end_section(&mut self) -> u32 {
        let (kind, offset, hasher) = self.current.take().expect("no open section");
        self.sections.push(SectionEntry { kind, offset, length: self.pos - offset, checksum: hasher.digest() });
        (self.sections.len() - 1) as u32
    }

    /// Writes a whole section from one buffer.
    pub fn add_section_bytes(
        &mut self,
        kind: SectionKind,
        bytes: &[u8],
        page_aligned: bool,
    ) -> Result<u32, ImageError> {
        self.begin_section(kind, page_aligned)?;
        self.write(bytes)?;
        Ok(self.end_section())
    }

    /// Encodes and writes the metadata section of process `proc`.
    pub fn add_meta(&mut self, proc: u32, meta: &crate::schema::ImageMeta) -> Result<u32, ImageError> {
        let bytes = postcard::to_allocvec(meta).map_err(|e| ImageError::Encode(e.to_string()))?;
        self.add_section_bytes(SectionKind::Meta { proc }, &bytes, false)
    }

    /// Encodes and writes the tree section.
    pub fn add_tree(&mut self, tree: &crate::schema::TreeMeta) -> Result<u32, ImageError> {
        let bytes = postcard::to_allocvec(tree).map_err(|e| ImageError::Encode(e.to_string()))?;
        self.add_section_bytes(SectionKind::Tree, &bytes, false)
    }

    /// Continues an image that other writers started: no header is written; sections are
    /// appended from `pos`. Used by each process of a tree to add its own sections to the
    /// coordinator's file; `into_sections` hands them back for the coordinator's table.
    pub fn continue_at(sink: S, pos: u64, max_sections: usize) -> Self {
        ImageWriter { sink, pos, sections: Vec::with_capacity(max_sections + 4), current: None }
    }

    /// The sections written so far (for `continue_at` writers).
    pub fn into_sections(self) -> (S, u64, Vec<SectionEntry>) {
        (self.sink, self.pos, self.sections)
    }

    /// Adds entries written by other writers to this writer's table.
    pub fn adopt_sections(&mut self, entries: &[SectionEntry], end: u64) {
        self.sections.extend_from_slice(entries);
        self.pos = self.pos.max(end);
    }

    /// Continues at `end` instead, when other writers reserved more room than they used at
    /// the end of the data area: the table follows the last section (never before it).
    pub fn trim_to(&mut self, end: u64) {
        let last = self.sections.iter().map(|s| s.offset + s.length).max().unwrap_or(HEADER_LEN);
        self.pos = end.max(last).min(self.pos);
    }

    /// Writes the table and trailer; returns the sink and the image length.
    pub fn finish(mut self) -> Result<(S, u64), ImageError> {
        assert!(self.current.is_none(), "section still open");
        let table = postcard::to_allocvec(&self.sections).map_err(|e| ImageError::Encode(e.to_string()))?;
        let table_offset = self.pos;
        self.raw(&table)?;
        let mut trailer = [0u8; TRAILER_LEN as usize];
        trailer[0..8].copy_from_slice(&table_offset.to_le_bytes());
        trailer[8..16].copy_from_slice(&(table.len() as u64).to_le_bytes());
        trailer[16..24].copy_from_slice(&xxh3_64(&table).to_le_bytes());
        let tsum = xxh3_64(&trailer[0..24]);
        trailer[24..32].copy_from_slice(&tsum.to_le_bytes());
        trailer[32..40].copy_from_slice(&TRAILER_MAGIC);
        self.raw(&trailer)?;
        Ok((self.sink, self.pos))
    }
}

/// Reads and verifies an image file. Every length read from the file is bounded by the file's
/// size before anything is allocated.
///
/// What is checked where (the image is untrusted input):
/// - `open`: magic, header checksum, version, that the rest of the header is zeros, trailer
///   checksum and magic, table checksum and bounds, and the table itself: every section inside
///   the data area, no two overlapping, no kind twice.
/// - `tree` / `process_meta`: the section's checksum, then the decoded structure
///   ([`crate::schema::TreeMeta::validate`], [`crate::schema::ImageMeta::validate`]), and for a
///   process that every mapping with stored pages has its page section, of exactly that size.
/// - `read_section`: that section's checksum.
/// - `verify_all`: every section's checksum, and that every byte between sections (page
///   alignment) is zero: with `open`, a changed bit anywhere in the file is refused.
pub struct ImageReader {
    path: PathBuf,
    file: File,
    len: u64,
    pub version: u32,
    pub flags: u32,
    sections: Vec<SectionEntry>,
    /// Byte ranges of the data area that no section covers (alignment padding, zeros).
    gaps: Vec<(u64, u64)>,
}

impl ImageReader {
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let io_err = |source| ImageError::Io { path: path.to_path_buf(), source };
        let mut file = File::open(path).map_err(io_err)?;
        let len = file.seek(SeekFrom::End(0)).map_err(io_err)?;
        Self::from_file(path, file, len)
    }

    fn from_file(path: &Path, file: File, len: u64) -> Result<Self, ImageError> {
        let p = || path.to_path_buf();
        let io_err = |source| ImageError::Io { path: path.to_path_buf(), source };
        if len < 8 {
            return Err(ImageError::NotAnImage { path: p() });
        }
        let mut head = [0u8; 24];
        let n = read_at_most(&file, &mut head, 0).map_err(io_err)?;
        if n < 8 || head[0..8] != MAGIC {
            return Err(ImageError::NotAnImage { path: p() });
        }
        if n < 24 {
            return Err(ImageError::Truncated { path: p(), detail: "header cut short".into() });
        }
        let stored = u64::from_le_bytes(head[16..24].try_into().unwrap());
        let computed = xxh3_64(&head[0..16]);
        if stored != computed {
            return Err(ImageError::Corrupted { path: p(), what: "header".into(), stored, computed });
        }
        let version = u32::from_le_bytes(head[8..12].try_into().unwrap());
        let flags = u32::from_le_bytes(head[12..16].try_into().unwrap());
        if version > FORMAT_VERSION {
            return Err(ImageError::NewerVersion { path: p(), found: version, supported: FORMAT_VERSION });
        }
        if version < OLDEST_READABLE_VERSION {
            return Err(ImageError::OlderVersion { path: p(), found: version, oldest: OLDEST_READABLE_VERSION });
        }
        if len < HEADER_LEN + TRAILER_LEN {
            return Err(ImageError::Truncated { path: p(), detail: format!("{len} bytes, no trailer") });
        }
        // The rest of the header is reserved and written as zeros: no checksum covers it, so a
        // changed bit there is caught here.
        let mut reserved = [0u8; (HEADER_LEN - 24) as usize];
        file.read_exact_at(&mut reserved, 24).map_err(io_err)?;
        if let Some(i) = reserved.iter().position(|&b| b != 0) {
            return Err(ImageError::Malformed {
                path: p(),
                what: "header".into(),
                detail: format!(
                    "reserved byte {} is {:#04x}, not zero: the image is corrupted; copy it again",
                    i + 24,
                    reserved[i]
                ),
            });
        }
        let mut trailer = [0u8; TRAILER_LEN as usize];
        file.read_exact_at(&mut trailer, len - TRAILER_LEN).map_err(io_err)?;
        if trailer[32..40] != TRAILER_MAGIC {
            return Err(ImageError::Truncated { path: p(), detail: "no trailer at the end".into() });
        }
        let word = |i: usize| u64::from_le_bytes(trailer[i * 8..i * 8 + 8].try_into().unwrap());
        let (table_offset, table_len, table_sum, trailer_sum) = (word(0), word(1), word(2), word(3));
        let computed = xxh3_64(&trailer[0..24]);
        if trailer_sum != computed {
            return Err(ImageError::Corrupted { path: p(), what: "trailer".into(), stored: trailer_sum, computed });
        }
        let table_end = table_offset.checked_add(table_len);
        if table_offset < HEADER_LEN || table_end != Some(len - TRAILER_LEN) || table_len > MAX_METADATA_LEN {
            return Err(ImageError::Malformed {
                path: p(),
                what: "trailer".into(),
                detail: format!("table at {table_offset}+{table_len} in a file of {len} bytes"),
            });
        }
        let mut table = vec![0u8; table_len as usize];
        file.read_exact_at(&mut table, table_offset).map_err(io_err)?;
        let computed = xxh3_64(&table);
        if computed != table_sum {
            return Err(ImageError::Corrupted { path: p(), what: "section table".into(), stored: table_sum, computed });
        }
        let sections: Vec<SectionEntry> = postcard::from_bytes(&table).map_err(|e| ImageError::Malformed {
            path: p(),
            what: "section table".into(),
            detail: e.to_string(),
        })?;
        for (i, s) in sections.iter().enumerate() {
            let end = s.offset.checked_add(s.length);
            if s.offset < HEADER_LEN || end.is_none_or(|e| e > table_offset) {
                return Err(ImageError::Malformed {
                    path: p(),
                    what: format!("section {i}"),
                    detail: format!("{}+{} outside the data area (ends at {table_offset})", s.offset, s.length),
                });
            }
        }
        let gaps = layout(&sections, table_offset).map_err(|detail| ImageError::Malformed {
            path: p(),
            what: "section table".into(),
            detail,
        })?;
        Ok(ImageReader { path: path.to_path_buf(), file, len, version, flags, sections, gaps })
    }

    /// An I/O error while reading the data area: running into the end of the file means the
    /// file shrank (or was replaced) after `open` checked the layout.
    fn read_error(&self, what: &str, source: io::Error) -> ImageError {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            ImageError::Truncated {
                path: self.path.clone(),
                detail: format!("the file ended inside {what}; it changed while being read"),
            }
        } else {
            ImageError::Io { path: self.path.clone(), source }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn sections(&self) -> &[SectionEntry] {
        &self.sections
    }

    /// Reads a section whole and verifies its checksum.
    pub fn read_section(&self, index: usize) -> Result<Vec<u8>, ImageError> {
        let s = self.sections.get(index).copied().ok_or_else(|| ImageError::Malformed {
            path: self.path.clone(),
            what: "section reference".into(),
            detail: format!("section {index} does not exist ({} sections)", self.sections.len()),
        })?;
        // `open` bounded the length by the file's size; a huge (sparse) file still gets an
        // error rather than an abort when the memory is not there.
        let len = usize::try_from(s.length).unwrap_or(usize::MAX);
        let mut buf = Vec::new();
        buf.try_reserve_exact(len).map_err(|_| ImageError::Malformed {
            path: self.path.clone(),
            what: format!("section {index} ({:?})", s.kind),
            detail: format!("{} bytes do not fit in memory", s.length),
        })?;
        buf.resize(len, 0);
        self.file.read_exact_at(&mut buf, s.offset).map_err(|e| self.read_error(&format!("section {index}"), e))?;
        let mut hasher = SectionHasher::new(s.kind);
        hasher.update(&buf);
        let computed = hasher.digest();
        if computed != s.checksum {
            return Err(ImageError::Corrupted {
                path: self.path.clone(),
                what: format!("section {index} ({:?})", s.kind),
                stored: s.checksum,
                computed,
            });
        }
        Ok(buf)
    }

    /// Decodes the tree section.
    pub fn tree(&self) -> Result<crate::schema::TreeMeta, ImageError> {
        let index = self
            .sections
            .iter()
            .position(|s| s.kind == SectionKind::Tree)
            .ok_or(ImageError::MissingSection { path: self.path.clone(), kind: SectionKind::Tree })?;
        if self.sections[index].length > MAX_METADATA_LEN {
            return Err(ImageError::Malformed {
                path: self.path.clone(),
                what: "tree".into(),
                detail: format!("{} bytes exceeds the limit", self.sections[index].length),
            });
        }
        let bytes = self.read_section(index)?;
        let tree: crate::schema::TreeMeta = postcard::from_bytes(&bytes).map_err(|e| ImageError::Malformed {
            path: self.path.clone(),
            what: "tree".into(),
            detail: e.to_string(),
        })?;
        tree.validate().map_err(|detail| ImageError::Malformed {
            path: self.path.clone(),
            what: "tree".into(),
            detail,
        })?;
        Ok(tree)
    }

    /// Decodes the metadata of the first process (the root of the tree).
    pub fn meta(&self) -> Result<crate::schema::ImageMeta, ImageError> {
        self.process_meta(0)
    }

    /// Decodes the metadata section of process `proc`.
    pub fn process_meta(&self, proc: u32) -> Result<crate::schema::ImageMeta, ImageError> {
        let kind = SectionKind::Meta { proc };
        let index = self
            .sections
            .iter()
            .position(|s| s.kind == kind)
            .ok_or(ImageError::MissingSection { path: self.path.clone(), kind })?;
        if self.sections[index].length > MAX_METADATA_LEN {
            return Err(ImageError::Malformed {
                path: self.path.clone(),
                what: "metadata".into(),
                detail: format!("{} bytes exceeds the limit", self.sections[index].length),
            });
        }
        let bytes = self.read_section(index)?;
        let meta: crate::schema::ImageMeta = postcard::from_bytes(&bytes).map_err(|e| ImageError::Malformed {
            path: self.path.clone(),
            what: "metadata".into(),
            detail: e.to_string(),
        })?;
        meta.validate().and_then(|_| self.check_pages(proc, &meta)).map_err(|detail| ImageError::Malformed {
            path: self.path.clone(),
            what: format!("metadata of process {proc}"),
            detail,
        })?;
        Ok(meta)
    }

    /// Every mapping of process `proc` with stored pages has its page section, holding exactly
    /// those pages: the restore reads `stored_pages() * PAGE_SIZE` bytes from the section's
    /// offset, never past its end; and its page hashes, one per page with data. A page or hash
    /// section names a mapping that has such pages. Inherited pages name an existing ancestor.
    fn check_pages(&self, proc: u32, meta: &crate::schema::ImageMeta) -> Result<(), String> {
        let vmas = &meta.process.vmas;
        let ancestors = if vmas.iter().any(|v| !v.inherited.is_empty()) {
            self.tree().map_err(|e| e.to_string())?.ancestors.len()
        } else {
            0
        };
        for (i, v) in vmas.iter().enumerate() {
            if let Some(r) = v.inherited.iter().find(|r| r.ancestor as usize >= ancestors) {
                return Err(format!("vma {i} inherits pages from ancestor {} of {ancestors}", r.ancestor));
            }
            let section_len = |kind: SectionKind| self.sections.iter().find(|s| s.kind == kind).map(|s| s.length);
            let stored = v.stored_pages();
            let kind = SectionKind::Pages { proc, vma: i as u32 };
            if v.compression == crate::schema::PageCompression::Lz4 && stored > 0 {
                // Frames hold this image's pages; an ancestor's pages are raw at an offset.
                if !v.inherited.is_empty() {
                    return Err(format!("vma {i} is compressed but inherits pages"));
                }
                let Some(s) = self.sections.iter().find(|s| s.kind == kind) else {
                    return Err(format!("vma {i} stores pages but the image has no {kind:?} section"));
                };
                // The frame table must account for every stored page and every byte.
                self.read_frame_table(s, v).map_err(|e| format!("vma {i}: {e}"))?;
            } else {
                match section_len(kind) {
                    None if stored > 0 => {
                        return Err(format!("vma {i} stores pages but the image has no {kind:?} section"))
                    }
                    Some(len) if Some(len) != stored.checked_mul(PAGE_SIZE) => {
                        return Err(format!("vma {i} stores {stored} pages but its section holds {len} bytes"));
                    }
                    _ => {}
                }
            }
            let kind = SectionKind::PageHashes { proc, vma: i as u32 };
            let data = v.data_pages();
            match section_len(kind) {
                None if data > 0 => return Err(format!("vma {i} has pages but the image has no {kind:?} section")),
                Some(len) if Some(len) != data.checked_mul(8) => {
                    return Err(format!("vma {i} has {data} pages but {len} bytes of page hashes"));
                }
                _ => {}
            }
        }
        // (A page section is empty when every page is inherited.)
        for s in &self.sections {
            if let SectionKind::Pages { proc: q, vma } | SectionKind::PageHashes { proc: q, vma } = s.kind {
                if q == proc && vmas.get(vma as usize).is_none_or(|v| v.runs.is_empty()) {
                    return Err(format!("section {:?} belongs to no mapping that has pages", s.kind));
                }
            }
        }
        Ok(())
    }

    /// The frame table of a compressed VMA (`v`, whose page section is `s`): one word per frame
    /// (`crate::frames`), checked against the runs and the section's length. Reads only the
    /// table (4 bytes per 64 KiB of memory), not the frames.
    fn read_frame_table(&self, s: &SectionEntry, v: &crate::schema::VmaEntry) -> Result<Vec<u32>, String> {
        let frames = crate::frames::frame_count(&v.runs);
        let table_len = frames.checked_add(1).and_then(|n| n.checked_mul(4)).filter(|&n| n <= s.length);
        let Some(table_len) = table_len else {
            return Err(format!("{frames} frames cannot fit a section of {} bytes", s.length));
        };
        let mut raw = vec![0u8; table_len as usize];
        self.file
            .read_exact_at(&mut raw, s.offset + s.length - table_len)
            .map_err(|e| format!("cannot read its frame table: {e}"))?;
        let mut words: Vec<u32> = raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let count = words.pop().unwrap_or(0);
        if u64::from(count) != frames {
            return Err(format!("its frame table counts {count} frames, {frames} expected"));
        }
        crate::frames::check_table(&v.runs, &words, s.length)?;
        Ok(words)
    }

    /// The frame table of VMA `vma` of process `proc` (metadata `meta`) when it is compressed
    /// (checked as `process_meta` does), or None for raw pages or no pages.
    pub fn frame_table(
        &self,
        proc: u32,
        vma: u32,
        meta: &crate::schema::ImageMeta,
    ) -> Result<Option<Vec<u32>>, ImageError> {
        let malformed = |detail: String| ImageError::Malformed {
            path: self.path.clone(),
            what: format!("pages of process {proc} vma {vma}"),
            detail,
        };
        let Some(v) = meta.process.vmas.get(vma as usize) else {
            return Err(malformed("no such mapping".into()));
        };
        if v.compression != crate::schema::PageCompression::Lz4 || v.runs.is_empty() {
            return Ok(None);
        }
        let kind = SectionKind::Pages { proc, vma };
        let s = self.sections.iter().find(|s| s.kind == kind).ok_or_else(|| malformed("no page section".into()))?;
        self.read_frame_table(s, v).map(Some).map_err(malformed)
    }

    /// The page hashes of VMA `vma` of process `proc` (empty when it has no pages).
    pub fn page_hashes(&self, proc: u32, vma: u32) -> Result<Vec<u64>, ImageError> {
        let kind = SectionKind::PageHashes { proc, vma };
        let Some(index) = self.sections.iter().position(|s| s.kind == kind) else { return Ok(Vec::new()) };
        let bytes = self.read_section(index)?;
        Ok(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect())
    }

    /// Verifies the checksum of every section, then the padding between them. Reading and
    /// hashing overlap: one thread reads the next 4 MiB while this one hashes the last (two
    /// buffers passed back and forth); a small image is read and hashed on this thread alone.
    pub fn verify_all(&self) -> Result<(), ImageError> {
        const CHUNK: usize = 4 << 20;
        let total: u64 = self.sections.iter().map(|s| s.length).sum();
        if total <= CHUNK as u64 {
            let mut buf = vec![0u8; (total as usize).clamp(1, 64 << 10)];
            self.verify_sections(|_| true, &mut buf)?;
            return self.verify_gaps();
        }
        let io_err = |source| ImageError::Io { path: self.path.clone(), source };
        std::thread::scope(|scope| {
            let (to_hash, filled) = std::sync::mpsc::sync_channel::<io::Result<(Vec<u8>, usize)>>(1);
            let (to_read, empty) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
            let file = &self.file;
            let sections = &self.sections;
            scope.spawn(move || {
                for s in sections {
                    let mut off = s.offset;
                    let end = s.offset + s.length;
                    while off < end {
                        let Ok(mut buf) = empty.recv() else { return };
                        let n = ((end - off) as usize).min(CHUNK);
                        buf.resize(CHUNK, 0);
                        let r = file.read_exact_at(&mut buf[..n], off).map(|_| (buf, n));
                        let failed = r.is_err();
                        if to_hash.send(r).is_err() || failed {
                            return;
                        }
                        off += n as u64;
                    }
                }
            });
            let _ = to_read.send(vec![0u8; CHUNK]);
            let _ = to_read.send(vec![0u8; CHUNK]);
            for (index, s) in self.sections.iter().enumerate() {
                let mut hasher = SectionHasher::new(s.kind);
                let mut left = s.length;
                while left > 0 {
                    let (buf, n) = filled
                        .recv()
                        .map_err(|_| io_err(io::Error::other("reader stopped")))?
                        .map_err(|e| self.read_error(&format!("section {index}"), e))?;
                    hasher.update(&buf[..n]);
                    left -= n as u64;
                    let _ = to_read.send(buf);
                }
                self.check_section(index, s, hasher.digest())?;
            }
            Ok(())
        })?;
        self.verify_gaps()
    }

    /// The bytes no section covers (page alignment padding) are zeros, as the writer left them.
    fn verify_gaps(&self) -> Result<(), ImageError> {
        let mut buf = [0u8; 4096];
        for &(start, end) in &self.gaps {
            let mut off = start;
            while off < end {
                let n = ((end - off) as usize).min(buf.len());
                self.file.read_exact_at(&mut buf[..n], off).map_err(|e| self.read_error("the padding", e))?;
                if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                    return Err(ImageError::Malformed {
                        path: self.path.clone(),
                        what: "padding between sections".into(),
                        detail: format!(
                            "byte {} is {:#04x}, not zero: the image is corrupted; copy it again",
                            off + i as u64,
                            buf[i]
                        ),
                    });
                }
                off += n as u64;
            }
        }
        Ok(())
    }

    /// Verifies the checksums of the sections `pick` selects, one after the other on this
    /// thread, through `buf` (nothing else is allocated). For the restore, which checks its own
    /// process's pages just before replacing its memory with them.
    pub fn verify_sections(&self, pick: impl Fn(&SectionEntry) -> bool, buf: &mut [u8]) -> Result<(), ImageError> {
        let mut local = [0u8; 4096];
        let buf = if buf.is_empty() { &mut local[..] } else { buf };
        for (index, s) in self.sections.iter().enumerate().filter(|(_, s)| pick(s)) {
            let mut hasher = SectionHasher::new(s.kind);
            let mut off = s.offset;
            let end = s.offset + s.length;
            while off < end {
                let n = ((end - off) as usize).min(buf.len());
                self.file
                    .read_exact_at(&mut buf[..n], off)
                    .map_err(|e| self.read_error(&format!("section {index}"), e))?;
                hasher.update(&buf[..n]);
                off += n as u64;
            }
            self.check_section(index, s, hasher.digest())?;
        }
        Ok(())
    }

    /// Section `index`'s stored checksum against the one computed over its bytes.
    fn check_section(&self, index: usize, s: &SectionEntry, computed: u64) -> Result<(), ImageError> {
        if computed == s.checksum {
            return Ok(());
        }
        Err(ImageError::Corrupted {
            path: self.path.clone(),
            what: format!("section {index} ({:?})", s.kind),
            stored: s.checksum,
            computed,
        })
    }
}

/// Checks the table's layout (sections already known to lie in `HEADER_LEN..table_offset`):
/// no two sections share a byte or a kind. Returns the ranges between sections.
fn layout(sections: &[SectionEntry], table_offset: u64) -> Result<Vec<(u64, u64)>, String> {
    let mut kinds: Vec<SectionKind> = sections.iter().map(|s| s.kind).collect();
    kinds.sort_unstable();
    if let Some(w) = kinds.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("two sections hold {:?}", w[0]));
    }
    let mut order: Vec<usize> = (0..sections.len()).collect();
    order.sort_unstable_by_key(|&i| (sections[i].offset, sections[i].length));
    let mut gaps = Vec::new();
    let mut cursor = HEADER_LEN;
    let mut last: Option<usize> = None;
    for i in order {
        let s = &sections[i];
        if s.length == 0 {
            continue;
        }
        if s.offset < cursor {
            let other = last.map_or(String::from("the header"), |j| format!("section {j}"));
            return Err(format!("section {i} ({}+{}) overlaps {other}", s.offset, s.length));
        }
        if s.offset > cursor {
            gaps.push((cursor, s.offset));
        }
        cursor = s.offset + s.length;
        last = Some(i);
    }
    if cursor < table_offset {
        gaps.push((cursor, table_offset));
    }
    Ok(gaps)
}

fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
/// The identity of an image file that migrate-resume verified, as it hands it to the restore
/// in each new process (`MIGRATE_VERIFIED_IMAGE`), which then does not read the pages again:
/// device, inode, size, and modification and change times in nanoseconds (any write changes
/// the change time).
pub fn verified_identity(dev: u64, ino: u64, size: u64, mtime: (i64, i64), ctime: (i64, i64)) -> String {
    let ns = |(s, n): (i64, i64)| s as i128 * 1_000_000_000 + n as i128;
    format!("{dev}:{ino}:{size}:{}:{}", ns(mtime), ns(ctime))
}
