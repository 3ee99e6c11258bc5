//! `migrate-inspect`: show what an image holds, as text or JSON.

use crate::cli::InspectArgs;
use crate::signals;
use crate::text::{bytes, inotify_mask, limit, open_flags, prot, rlimit_name, utc_time};
use migrate_image::{
    FdKind, ImageMeta, ImageReader, PageCompression, SectionEntry, SectionKind, SharedObject, SysvObject, TreeMeta,
    VmaKind, PAGE_SIZE,
};
use std::fmt::Write as _;
use std::io::Write;

pub fn main(args: InspectArgs) -> anyhow::Result<()> {
    let reader = ImageReader::open(&args.image)?;
    let tree = reader.tree()?;
    let metas: Vec<ImageMeta> =
        (0..tree.processes.len() as u32).map(|k| reader.process_meta(k)).collect::<Result<_, _>>()?;
    if !args.no_verify {
        reader.verify_all()?;
    }
    // An incremental image: its chain must be there (and intact, unless --no-verify).
    let ancestors =
        if tree.ancestors.is_empty() { Vec::new() } else { super::chain::open_ancestors(&args.image, &tree, &metas)? };
    if !args.no_verify {
        for a in &ancestors {
            a.reader.verify_all()?;
        }
    }
    let out = if args.json {
        let mut s = serde_json::to_string_pretty(&json(&reader, &tree, &metas, !args.no_verify)?)?;
        s.push('\n');
        s
    } else {
        let mut o = String::new();
        if !tree.ancestors.is_empty() {
            o.push_str(&chain_text(&tree, &metas, &ancestors));
        }
        if metas.len() > 1 || !tree.zombies.is_empty() || !tree.shared.is_empty() || !tree.sysv.is_empty() {
            o.push_str(&tree_text(&tree));
        }
        for (k, meta) in metas.iter().enumerate() {
            if metas.len() > 1 {
                let _ =
                    writeln!(o, "\n==================== process {k} (vpid {}) ====================", meta.process.vpid);
            }
            o.push_str(&text(&reader, k as u32, meta, !args.no_verify));
        }
        if !tree.network_lock.is_empty() {
            let _ = writeln!(
                o,
                "\nnetwork lock: the TCP traffic is held (nft table inet {}) until migrate-resume lifts it",
                tree.network_lock
            );
        }
        o
    };
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(out.as_bytes()).and_then(|()| stdout.flush()) {
        // A reader that stopped early (`| head`) is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// The chain of an incremental image: how many of its pages each ancestor holds.
fn chain_text(tree: &TreeMeta, metas: &[ImageMeta], ancestors: &[super::chain::Ancestor]) -> String {
    let mut o = String::new();
    let own: u64 = metas.iter().flat_map(|m| &m.process.vmas).map(|v| v.stored_pages()).sum();
    let all: u64 = metas.iter().flat_map(|m| &m.process.vmas).map(|v| v.data_pages()).sum();
    let _ = writeln!(
        o,
        "incremental image: {own} of {all} pages stored here ({}), the rest in {} ancestor(s):",
        bytes(own * PAGE_SIZE),
        ancestors.len()
    );
    let pages = super::chain::pages_per_ancestor(tree, metas);
    for (k, a) in tree.ancestors.iter().enumerate() {
        let found =
            ancestors.iter().find(|x| x.index == k).map_or(String::new(), |x| format!(" ({})", x.path.display()));
        let _ = writeln!(o, "  ancestor {k}: {} id {:#018x}, {} pages{found}", a.file, a.image_id, pages[k]);
    }
    let _ = writeln!(o);
    o
}

/// The JSON document: `{"format_version", "flags", "image_bytes", "verified", "sections",
/// "tree", "meta" (the first process), "processes" (all)}`.
pub fn json(
    reader: &ImageReader,
    tree: &TreeMeta,
    metas: &[ImageMeta],
    verified: bool,
) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::json!({
        "format_version": reader.version,
        "flags": reader.flags,
        "image_bytes": reader.len(),
        "verified": verified,
        "sections": serde_json::to_value(reader.sections())?,
        "tree": serde_json::to_value(tree)?,
        "meta": serde_json::to_value(&metas[0])?,
        "processes": serde_json::to_value(metas)?,
    }))
}

/// The tree: processes, zombies and what they share.
pub fn tree_text(tree: &TreeMeta) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "tree       {} processes, {} zombies, {} shared objects, {} System V objects",
        tree.processes.len(),
        tree.zombies.len(),
        tree.shared.len(),
        tree.sysv.len()
    );
    for (k, p) in tree.processes.iter().enumerate() {
        let _ = writeln!(o, "  process {k}: vpid {} ppid {} pgid {} sid {}", p.vpid, p.vppid, p.vpgid, p.vsid);
    }
    for z in &tree.zombies {
        let _ = writeln!(o, "  zombie: vpid {} (child of {}), wait status {:#x}", z.vpid, z.vppid, z.status);
    }
    for (j, e) in tree.shared.iter().enumerate() {
        let what = match &e.object {
            SharedObject::Pipe { pipe, write_end, data, .. } => format!(
                "pipe:[{pipe}] {} end{}",
                if *write_end { "write" } else { "read" },
                if data.is_empty() { String::new() } else { format!(", {} bytes in flight", data.len()) }
            ),
            SharedObject::File { path, pos, .. } => format!("file {path} pos {pos}"),
            SharedObject::Socket { pair, end, queued, .. } => {
                format!("unix socket pair {pair} end {end}, {} bytes queued", queued.len())
            }
            SharedObject::NetSocket { socket } => match socket {
                FdKind::Socket { local, listening: true, .. } => {
                    format!("socket listening on {}", sockaddr_text(local))
                }
                FdKind::Socket { local, .. } => format!("socket {}", sockaddr_text(local)),
                _ => "socket".into(),
            },
            SharedObject::Memory { size, mappings } => {
                let at: Vec<String> = mappings.iter().map(|(p, a, _)| format!("{p}@{a:#x}")).collect();
                format!("shared memory, {} bytes, mapped by {}", size, at.join(" "))
            }
        };
        let holders: Vec<String> = e.holders.iter().map(|(p, fd)| format!("{p}:{fd}")).collect();
        let _ =
            writeln!(o, "  shared {j} (fd {}): {what}; held by {}", tree.shared_fd_base + j as i32, holders.join(" "));
    }
    for s in &tree.sysv {
        let _ = writeln!(o, "  sysv: {}", sysv_text(s));
    }
    o
}

/// One System V object: `message queue key 0x0000beef (id 3) mode 0600: 5 messages (40 bytes)`.
pub fn sysv_text(s: &SysvObject) -> String {
    let name = |noun: &str, key: i32, id: i32, mode: u32| {
        let key = if key == 0 { "private".to_string() } else { format!("key {:#010x}", key as u32) };
        format!("{noun} {key} (id {id}) mode {:04o}", mode & 0o777)
    };
    match s {
        SysvObject::Shm { id, key, mode, size, .. } => format!(
            "{}: {size} bytes{}",
            name("shared memory", *key, *id, *mode),
            if mode & 0o1000 != 0 { ", marked for removal" } else { "" }
        ),
        SysvObject::Sem { id, key, mode, values } => {
            format!("{}: {} semaphores, values {values:?}", name("semaphore set", *key, *id, *mode), values.len())
        }
        SysvObject::Msg { id, key, mode, messages } => format!(
            "{}: {} messages ({} bytes)",
            name("message queue", *key, *id, *mode),
            messages.len(),
            messages.iter().map(|(_, t)| t.len()).sum::<usize>()
        ),
    }
}

fn kind_text(k: SectionKind) -> String {
    match k {
        SectionKind::Tree => "tree".into(),
        SectionKind::Meta { proc } => format!("meta of process {proc}"),
        SectionKind::Pages { proc, vma } => format!("pages of process {proc} vma {vma}"),
        SectionKind::FileContents { proc, file } => format!("contents of process {proc} file {file}"),
        SectionKind::Shared { object } => format!("shared object {object}"),
        SectionKind::PageHashes { proc, vma } => format!("page hashes of process {proc} vma {vma}"),
    }
}

/// The human-readable report of process `proc` (`meta`).
pub fn text(reader: &ImageReader, proc: u32, meta: &ImageMeta, verified: bool) -> String {
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
    let _ = writeln!(o, "  {:<33} {:<4} {:<11} {:>17}  name", "range", "prot", "kind", "[lz4] stored/pages");
    let mut stored_total = 0u64;
    // Compressed mappings: (count, bytes of memory, bytes in their page sections).
    let mut lz4 = (0usize, 0u64, 0u64);
    for (i, v) in p.vmas.iter().enumerate() {
        let pages = v.len() / PAGE_SIZE;
        stored_total += v.stored_pages();
        let mut stored = if v.inherited.is_empty() {
            format!("{}/{}", v.stored_pages(), pages)
        } else {
            format!("{}+{}/{}", v.stored_pages(), v.data_pages() - v.stored_pages(), pages)
        };
        if v.compression == PageCompression::Lz4 && !v.runs.is_empty() {
            let kind = SectionKind::Pages { proc, vma: i as u32 };
            let len = reader.sections().iter().find(|s| s.kind == kind).map_or(0, |s| s.length);
            let memory = v.stored_pages() * PAGE_SIZE;
            lz4 = (lz4.0 + 1, lz4.1 + memory, lz4.2 + len);
            stored = format!("lz4 {:.0}% {stored}", 100.0 * len as f64 / memory.max(1) as f64);
        }
        let _ = writeln!(
            o,
            "  {:016x}-{:016x} {:<4} {:<11} {:>17}  {}",
            v.start,
            v.end,
            prot(v.prot),
            match v.kind {
                VmaKind::SysvShm { id } => format!("SysvShm {id}"),
                k => format!("{k:?}"),
            },
            stored,
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
            FdKind::Deleted { file: i, flags, pos } => {
                format!("deleted file {} pos {pos} {} (contents in the image)", file(*i), open_flags(*flags))
            }
            FdKind::Directory { path, flags, pos } => {
                format!("dir {path} pos {pos} {}", open_flags(*flags))
            }
            FdKind::CharDevice { path, rdev, flags } => {
                format!("chardev {path} (rdev {rdev:#x}) {}", open_flags(*flags))
            }
            FdKind::Inherited { what, flags } => format!("inherited {what} {}", open_flags(*flags)),
            FdKind::Terminal { what, flags, rows, cols, .. } => {
                format!("{what} ({cols}x{rows}, settings saved) {}", open_flags(*flags))
            }
            FdKind::Socket { listening, local, peer, sock_type, waiting, tcp, queued, .. } => {
                let kind = if *sock_type == libc::SOCK_DGRAM { "udp/dgram" } else { "stream" };
                let mut waiting =
                    if *waiting > 0 { format!(" ({waiting} connections waiting, not carried)") } else { String::new() };
                if !queued.is_empty() {
                    waiting.push_str(&format!(" ({} waiting connections carried)", queued.len()));
                }
                match (listening, peer) {
                    (true, _) => format!("{kind} socket listening on {}{waiting}", sockaddr_text(local)),
                    (false, Some(p)) => {
                        let state = match tcp {
                            Some(c) => format!(
                                " (TCP repair: {} bytes to send, {} unread)",
                                c.send_queue.len(),
                                c.recv_queue.len()
                            ),
                            None if *sock_type == libc::SOCK_STREAM => " (comes back reset)".to_string(),
                            None => String::new(),
                        };
                        format!("{kind} socket {} connected to {}{state}", sockaddr_text(local), sockaddr_text(p))
                    }
                    (false, None) => format!("{kind} socket bound to {}", sockaddr_text(local)),
                }
            }
            FdKind::EventFd { count, semaphore, flags } => {
                format!("eventfd count {count}{} {}", if *semaphore { " (semaphore)" } else { "" }, open_flags(*flags))
            }
            FdKind::TimerFd { clock, value_ns, interval_ns, ticks, .. } => format!(
                "timerfd clock {clock}, next in {:.3} s, every {:.3} s, {ticks} unread",
                *value_ns as f64 / 1e9,
                *interval_ns as f64 / 1e9
            ),
            FdKind::SignalFd { mask, .. } => {
                format!("signalfd {}", sig_list((1..=64).filter(|s| mask & (1u64 << (s - 1)) != 0)))
            }
            FdKind::Epoll { targets, .. } => {
                let t: Vec<String> = targets.iter().map(|(fd, ev, data)| format!("{fd}:{ev:#x}/{data:#x}")).collect();
                format!("epoll watching {}", t.join(" "))
            }
            FdKind::PidFd { vpid, .. } => format!("pidfd of process {vpid}"),
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
            FdKind::Inotify { flags, watches } => {
                format!("inotify, {} watches (queued events not carried) {}", watches.len(), open_flags(*flags))
            }
        };
        let shared = match f.shares_with.and_then(|s| p.fds.get(s as usize)) {
            Some(other) => format!(", shared with fd {}", other.fd),
            None => String::new(),
        };
        let _ = writeln!(o, "  {:>4}  {what}{}{shared}", f.fd, if f.cloexec { " cloexec" } else { "" });
        if let FdKind::Inotify { watches, .. } = &f.kind {
            for w in watches {
                let _ = writeln!(o, "          wd {:<4} {} {}", w.wd, w.path, inotify_mask(w.mask));
            }
        }
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

    let t = &p.timers;
    if !t.itimers.is_empty() || !t.posix.is_empty() {
        let _ = writeln!(o, "\ntimers (time left at checkpoint)");
        for it in &t.itimers {
            let which = ["ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF"].get(it.which as usize).unwrap_or(&"itimer?");
            let _ = writeln!(
                o,
                "  {which:<14} left {} ms, interval {} ms",
                it.value_ns / 1_000_000,
                it.interval_ns / 1_000_000
            );
        }
        for pt in &t.posix {
            let target = if pt.target_vtid != 0 { format!(" to thread {}", pt.target_vtid) } else { String::new() };
            let _ = writeln!(
                o,
                "  timer {:<8} clock {} SIG{}{target}, left {} ms, interval {} ms",
                pt.id,
                pt.clock,
                signals::name(pt.signo),
                pt.value_ns / 1_000_000,
                pt.interval_ns / 1_000_000
            );
        }
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
    if lz4.0 > 0 {
        let _ = writeln!(
            o,
            "compressed lz4: {} of memory in {} ({:.1}%, {} bytes in {} bytes), {} of {} mappings with pages",
            bytes(lz4.1),
            bytes(lz4.2),
            100.0 * lz4.2 as f64 / lz4.1.max(1) as f64,
            lz4.1,
            lz4.2,
            lz4.0,
            p.vmas.iter().filter(|v| !v.runs.is_empty()).count()
        );
    }
    let mut trimmed: String = o.lines().map(str::trim_end).collect::<Vec<_>>().join("\n");
    trimmed.push('\n');
    trimmed
}

fn sig_list(sigs: impl Iterator<Item = i32>) -> String {
    sigs.map(|n| format!("SIG{}", signals::name(n))).collect::<Vec<_>>().join(" ")
}

/// A saved `struct sockaddr` as text.
pub fn sockaddr_text(addr: &[u8]) -> String {
    if addr.len() < 2 {
        return "(unnamed)".into();
    }
    match u16::from_ne_bytes([addr[0], addr[1]]) as i32 {
        libc::AF_INET if addr.len() >= 8 => {
            format!("{}.{}.{}.{}:{}", addr[4], addr[5], addr[6], addr[7], u16::from_be_bytes([addr[2], addr[3]]))
        }
        libc::AF_INET6 if addr.len() >= 24 => {
            let ip = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&addr[8..24]).unwrap_or([0; 16]));
            format!("[{ip}]:{}", u16::from_be_bytes([addr[2], addr[3]]))
        }
        libc::AF_UNIX => {
            let p = &addr[2..];
            if p.first() == Some(&0) {
                format!("@{}", String::from_utf8_lossy(&p[1..]))
            } else {
                String::from_utf8_lossy(p.split(|&c| c == 0).next().unwrap_or(&[])).into_owned()
            }
        }
        f => format!("(family {f})"),
    }
}
