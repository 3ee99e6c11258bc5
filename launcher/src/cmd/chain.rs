//! The chain of an incremental image: the ancestor images whose pages it names
//! (`TreeMeta::ancestors`), found beside it and checked to be the very images it was built on.

use crate::exit::{WithCode, IMAGE};
use migrate_image::{ImageMeta, ImageReader, TreeMeta};
use std::path::{Path, PathBuf};

pub struct Ancestor {
    /// Index in `TreeMeta::ancestors` (0: the parent).
    pub index: usize,
    pub path: PathBuf,
    pub reader: ImageReader,
    /// Pages of this image that the ancestor holds.
    pub pages: u64,
}

/// How many pages of the image each ancestor holds (by ancestor index).
pub fn pages_per_ancestor(tree: &TreeMeta, metas: &[ImageMeta]) -> Vec<u64> {
    let mut pages = vec![0u64; tree.ancestors.len()];
    for r in metas.iter().flat_map(|m| &m.process.vmas).flat_map(|v| &v.inherited) {
        if let Some(p) = pages.get_mut(r.ancestor as usize) {
            *p += r.count;
        }
    }
    pages
}

/// Opens every ancestor the image takes pages from: in the image's directory, with the image
/// id the chain names. A missing or replaced ancestor is an invalid image (exit 3).
pub fn open_ancestors(image: &Path, tree: &TreeMeta, metas: &[ImageMeta]) -> anyhow::Result<Vec<Ancestor>> {
    let dir = image.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (index, pages) in pages_per_ancestor(tree, metas).into_iter().enumerate() {
        if pages == 0 {
            continue;
        }
        let a = &tree.ancestors[index];
        let path = dir.join(&a.file);
        let reader = ImageReader::open(&path)
            .map_err(|e| {
                anyhow::anyhow!(
                    "{e}\n(it is an ancestor of the incremental image {}, which takes {pages} pages from it; \
                     keep the images of a chain together: migrate-inspect lists them)",
                    image.display()
                )
            })
            .code(IMAGE)?;
        let id = reader.tree().code(IMAGE)?.image_id;
        if id != a.image_id {
            return Err(anyhow::anyhow!(
                "{} is not the image {} was built on (image id {id:#018x}, expected {:#018x}): the chain is broken; \
                 put the original {} back, or resume an image taken before it",
                path.display(),
                image.display(),
                a.image_id,
                a.file
            ))
            .code(IMAGE);
        }
        out.push(Ancestor { index, path, reader, pages });
    }
    Ok(out)
}
