//! `migrate-inspect`: show what an image holds, as text or JSON.

use crate::cli::InspectArgs;
use crate::signals;
use crate::text::{bytes, limit, open_flags, prot, rlimit_name, utc_time};
use migrate_image::{FdKind, ImageMeta, ImageReader, SectionEntry, SectionKind, PAGE_SIZE};
use std::fmt::Write as _;
use std::io::Write;

pub fn main(args: InspectArgs) -> anyhow::Result<()> {
    let reader = ImageReader::open(&args.image)?;
    let meta = reader.meta()?;
    if !args.no_verify {
        reader.verify_all()?;
    }
    let out = if args.json {
        let mut s = serde_json::to_string_pretty(&json(&reader, &meta, !args.no_verify)?)?;
        s.push('\n');
        s
    } else {
        text(&reader, &meta, !args.no_verify)
    };
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(out.as_bytes()).and_then(|()| stdout.flush()) {
        // A reader that stopped early (`| head`) is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// The JSON document: `{"format_version", "flags", "image_bytes", "verified", "sections", "meta"}`.
pub fn json(reader: &ImageReader, meta: &ImageMeta, verified: bool) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::json!({
        "format_version": reader.version,
        "flags": reader.flags,
        "image_bytes": reader.len(),
        "verified": verified,
        "sections": serde_json::to_value(reader.sections())?,
        "meta": serde_json::to_value(meta)?,
    }))
}

fn kind_text(k: SectionKind) -> String {
    match k {
        SectionKind::Meta => "meta".into(),
        SectionKind::Pages { vma } => format!("pages of vma {vma}"),
        SectionKind::FileContents { file } => format!("contents of file {file}"),
    }
}

/// The human-readable report.
pub fn text(reader: &ImageReader, meta: &ImageMeta, verified: bool) -> String {
    let mut o = String::new();
    let h = &meta.host;
    let p = &meta.process;
    let _ = writeln!(o, "image      {}", reader.path().display());
    let _ = writeln!(
        o,
        "format     version {}, flags {:#x}, {} ({} bytes){}",
        reader.version,
        reader.flags,
        bytes(reader.len()),
        reader.len(),
        if verified { ", all section checksums verified" } else { "" }
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "host       {} (kernel {}, boot {})", h.hostname, h.kernel_release, h.boot_id);
    let _ = writeln!(o, "created    {} by migrate {}", utc_time(h.created_unix_ns as i128), h.tool_version);
    let _ = writeln!(
        o,
        "cpu        {} xfeatures {:#x} ({}), xsave area {} bytes",
        h.cpu.vendor,
        h.cpu.xfeatures,
        crate::host::xfeature_names(h.cpu.xfeatures).join(" "),
        h.cpu.xsave_size
    );
    let _ = writeln!(o, "vdso       xxh3 {:#018x}, {} bytes", h.vdso_hash, h.vdso_len);
    let _ = writeln!(o);

    let file = |i: u32| p.files.get(i as usize).map(|f| f.path.as_str()).unwrap_or("?");
    let _ = writeln!(o, "process    vpid {} (ppid {}, pgid {}, sid {})", p.vpid, p.vppid, p.vpgid, p.vsid);
    let _ = writeln!(o, "exe        {}", file(p.exe));
    let _ = writeln!(o, "argv       {:?}", p.argv);
    let _ = writeln!(o, "cwd        {}", p.cwd);
    let _ = writeln!(o, "umask      {:04o}", p.umask);
    let _ = writeln!(o, "personality {:#x}", p.personality);
    let _ = writeln!(o, "LD_PRELOAD {}", p.ld_preload);
    let _ = writeln!(o, "libmigrate {}", file(p.libmigrate));

    let _ = writeln!(o, "\nmemory ({} mappings)", p.vmas.len());
    let _ = writeln!(o, "  {:<33} {:<4} {:<11} {:>17}  name", "range", "prot", "kind", "stored/pages");
    let mut stored_total = 0u64;
    for v in &p.vmas {
        let pages = v.len() / PAGE_SIZE;
        stored_total += v.stored_pages();
        let _ = writeln!(
            o,
            "  {:016x}-{:016x} {:<4} {:<11} {:>17}  {}",
            v.start,
            v.end,
            prot(v.prot),
            format!("{:?}", v.kind),
            format!("{}/{}", v.stored_pages(), pages),
            v.name
        );
    }

    let _ = writeln!(o, "\nthreads ({})", p.threads.len());
    for t in &p.threads {
        let _ = writeln!(
            o,
            "  vtid {:<7} fs {:#014x}  {:<16}{}{}",
            t.vtid,
            t.fs_base,
            format!("{:?}", t.name),
            if t.is_checkpoint_thread { "  checkpoint thread" } else { "" },
            if t.pending.is_empty() {
                String::new()
            } else {
                format!("  pending {}", sig_list(t.pending.iter().map(|s| s.signo)))
            }
        );
    }

    let _ = writeln!(o, "\nfile descriptors ({})", p.fds.len());
    for f in &p.fds {
        let what = match &f.kind {
            FdKind::Regular { file: i, flags, pos } => {
                format!("file {} pos {pos} {}", file(*i), open_flags(*flags))
            }
            FdKind::Directory { path, flags, pos } => {
                format!("dir {path} pos {pos} {}", open_flags(*flags))
            }
            FdKind::CharDevice { path, rdev, flags } => {
                format!("chardev {path} (rdev {rdev:#x}) {}", open_flags(*flags))
            }
            FdKind::Inherited { what, flags } => format!("inherited {what} {}", open_flags(*flags)),
            FdKind::Fifo { path, flags } => format!("fifo {path} {}", open_flags(*flags)),
            FdKind::Pipe { pipe, write_end, flags, data, .. } => format!(
                "pipe:[{pipe}] {} end, {} bytes in flight {}",
                if *write_end { "write" } else { "read" },
                data.len(),
                open_flags(*flags)
            ),
            FdKind::Detached { what, flags, .. } => {
                format!("detached {what} (peer outside the checkpoint) {}", open_flags(*flags))
            }
            FdKind::Unsupported { what } => format!("UNSUPPORTED {what}"),
        };
        let shared = match f.shares_with.and_then(|s| p.fds.get(s as usize)) {
            Some(other) => format!(", shared with fd {}", other.fd),
            None => String::new(),
        };
        let _ = writeln!(o, "  {:>4}  {what}{}{shared}", f.fd, if f.cloexec { " cloexec" } else { "" });
    }

    let s = &p.signals;
    let _ = writeln!(o, "\nsignals    checkpoint signal SIG{}", signals::name(s.checkpoint_signal));
    for a in s.actions.iter().filter(|a| a.handler != 0) {
        let handler = if a.handler == 1 { "ignore".to_string() } else { format!("handler {:#x}", a.handler) };
        let _ = writeln!(o, "  SIG{:<9} {handler} flags {:#x} mask {:#x}", signals::name(a.signo), a.flags, a.mask);
    }
    if !s.shared_pending.is_empty() {
        let _ = writeln!(o, "  pending (process): {}", sig_list(s.shared_pending.iter().map(|x| x.signo)));
    }

    let _ = writeln!(o, "\nrlimits");
    for r in &p.rlimits {
        let _ = writeln!(o, "  {:<18} {:>20} {:>20}", rlimit_name(r.resource), limit(r.cur), limit(r.max));
    }

    let _ = writeln!(o, "\nfiles ({})", p.files.len());
    for (i, f) in p.files.iter().enumerate() {
        let hash = f.hash.map(|h| format!(" xxh3 {h:#018x}")).unwrap_or_default();
        let _ = writeln!(o, "  {i:>3}  {} ({} bytes, dev {:#x} ino {}){hash}", f.path, f.size, f.dev, f.ino);
    }

    let _ = writeln!(o, "\nsections ({})", reader.sections().len());
    let _ = writeln!(o, "  {:>3}  {:<22} {:>14} {:>14}  checksum", "#", "kind", "offset", "length");
    let mut page_bytes = 0u64;
    for (i, SectionEntry { kind, offset, length, checksum }) in reader.sections().iter().enumerate() {
        if matches!(kind, SectionKind::Pages { .. }) {
            page_bytes += length;
        }
        let _ = writeln!(o, "  {i:>3}  {:<22} {offset:>14} {length:>14}  {checksum:#018x}", kind_text(*kind));
    }

    let _ = writeln!(
        o,
        "\ntotal      image {} ({} bytes); stored memory {} ({} pages, {} in page sections)",
        bytes(reader.len()),
        reader.len(),
        bytes(stored_total * PAGE_SIZE),
        stored_total,
        bytes(page_bytes)
    );
    let mut trimmed: String = o.lines().map(str::trim_end).collect::<Vec<_>>().join("\n");
    trimmed.push('\n');
    trimmed
}

fn sig_list(sigs: impl Iterator<Item = i32>) -> String {
    sigs.map(|n| format!("SIG{}", signals::name(n))).collect::<Vec<_>>().join(" ")
}
