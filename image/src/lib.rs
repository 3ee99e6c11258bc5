//! The migrate image: one file per checkpoint.
//!
//! `format` defines the container (header, sections with checksums, section table, trailer);
//! `schema` defines the versioned metadata every resource kind dumps into it. Nothing else in the
//! workspace knows the byte layout.

pub mod file_hashes;
pub mod format;
pub mod frames;
pub mod schema;

pub use format::{
    page_hash, verified_identity, ImageError, ImageReader, ImageWriter, SectionEntry, SectionHasher, SectionKind, Sink,
    FORMAT_VERSION, HEADER_LEN, MAGIC, PAGE_SIZE,
};
pub use schema::*;
