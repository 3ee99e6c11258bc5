//! System V IPC: shared memory segments, semaphore sets and message queues.
//!
//! Keys survive a resume, ids do not: migrate-resume recreates every object with its key (and
//! contents) and the kernel hands out new ids. The program keeps using the ids it was given, so
//! libmigrate keeps a table of (kind, virtual id, real id), filled by the hooks (hooks/ipc.rs)
//! whenever a get call returns an id, consulted by every call that takes one, and rewritten
//! after a resume from the list migrate-resume passes down (`MIGRATE_SYSV_IDS`, through the
//! restore plan). The table is fixed-size atomics: hooks never allocate, and it is part of the
//! checkpointed memory like everything else.
//!
//! Dump (the coordinator, every member frozen): the objects the tree uses are those in any
//! member's table, those a member created or last operated on (/proc/sysvipc, semctl GETPID)
//! and the segments a member has attached (its maps); their contents are read without
//! consuming anything: segments through a read-only attachment, semaphore values with GETALL,
//! messages with msgrcv(MSG_COPY).

use crate::sys::{self, fs};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use migrate_image::SysvObject;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Shm = 1,
    Sem = 2,
    Msg = 3,
}

impl Kind {
    /// The letter of `MIGRATE_SYSV_IDS` and of the checkpoint protocol: m(emory), s(emaphores),
    /// q(ueue).
    pub fn letter(self) -> u8 {
        match self {
            Kind::Shm => b'm',
            Kind::Sem => b's',
            Kind::Msg => b'q',
        }
    }

    pub fn from_letter(c: u8) -> Option<Kind> {
        match c {
            b'm' | b'M' => Some(Kind::Shm),
            b's' => Some(Kind::Sem),
            b'q' => Some(Kind::Msg),
            _ => None,
        }
    }

    fn from_bits(b: u64) -> Option<Kind> {
        match b {
            1 => Some(Kind::Shm),
            2 => Some(Kind::Sem),
            3 => Some(Kind::Msg),
            _ => None,
        }
    }

    pub fn noun(self) -> &'static str {
        match self {
            Kind::Shm => "shared memory segment",
            Kind::Sem => "semaphore set",
            Kind::Msg => "message queue",
        }
    }

    /// The ctl system call of this kind.
    pub fn ctl_nr(self) -> libc::c_long {
        match self {
            Kind::Shm => libc::SYS_shmctl,
            Kind::Sem => libc::SYS_semctl,
            Kind::Msg => libc::SYS_msgctl,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The id table

const SLOTS: usize = 512;
const ID_MASK: u64 = 0x7fff_ffff;
/// The real id of an object that the restored process knew but the image did not carry (it
/// had been removed): no object has it, so every call on it fails with EINVAL, as it would have.
pub const GONE: i32 = 0x7fff_ffff;

/// One word per entry, 0 when free: kind (2 bits) | virtual id (31) | real id (31). IPC ids are
/// never negative.
static TABLE: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];

fn pack(kind: Kind, virt: i32, real: i32) -> u64 {
    ((kind as u64) << 62) | ((virt as u64 & ID_MASK) << 31) | (real as u64 & ID_MASK)
}

fn unpack(w: u64) -> Option<(Kind, i32, i32)> {
    let kind = Kind::from_bits(w >> 62)?;
    Some((kind, ((w >> 31) & ID_MASK) as i32, (w & ID_MASK) as i32))
}

fn find(kind: Kind, virt: i32) -> Option<i32> {
    TABLE.iter().find_map(|s| match unpack(s.load(Ordering::Acquire)) {
        Some((k, v, r)) if k == kind && v == virt => Some(r),
        _ => None,
    })
}

/// The real id behind the id the program passes (unknown ids are passed on as they are).
pub fn to_real(kind: Kind, virt: i32) -> i32 {
    if virt < 0 {
        return virt;
    }
    find(kind, virt).unwrap_or(virt)
}

/// The id the program knows for real id `real`, if the table has one.
pub fn to_virt(kind: Kind, real: i32) -> Option<i32> {
    if real < 0 {
        return None;
    }
    TABLE.iter().find_map(|s| match unpack(s.load(Ordering::Acquire)) {
        Some((k, v, r)) if k == kind && r == real => Some(v),
        _ => None,
    })
}

/// Makes `virt` stand for `real` (replacing what it stood for). False when the table is full.
pub fn set(kind: Kind, virt: i32, real: i32) -> bool {
    if virt < 0 || real < 0 {
        return false;
    }
    let word = pack(kind, virt, real);
    let mut replaced = false;
    for s in &TABLE {
        let cur = s.load(Ordering::Acquire);
        if matches!(unpack(cur), Some((k, v, _)) if k == kind && v == virt)
            && s.compare_exchange(cur, word, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            replaced = true;
        }
    }
    replaced || TABLE.iter().any(|s| s.compare_exchange(0, word, Ordering::AcqRel, Ordering::Acquire).is_ok())
}

/// A get call returned real id `real`: the id the program is to see. An object the table knows
/// keeps its id; a new one gets its real id unless, after a resume, that number already stands
/// for another object (then the same slot with another sequence number).
pub fn adopt(kind: Kind, real: i32) -> i32 {
    if real < 0 {
        return real;
    }
    if let Some(v) = to_virt(kind, real) {
        return v;
    }
    let mut virt = real;
    for _ in 0..4096 {
        match find(kind, virt) {
            None => break,
            Some(r) if r == real => return virt,
            Some(_) => virt = ((virt as u64 + 0x8000) & ID_MASK) as i32,
        }
    }
    if set(kind, virt, real) {
        virt
    } else {
        real // table full: untranslated
    }
}

/// The object behind `virt` was removed.
pub fn forget(kind: Kind, virt: i32) {
    for s in &TABLE {
        let cur = s.load(Ordering::Acquire);
        if matches!(unpack(cur), Some((k, v, _)) if k == kind && v == virt) {
            let _ = s.compare_exchange(cur, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

/// Every entry: (kind, virtual id, real id).
pub fn entries() -> Vec<(Kind, i32, i32)> {
    TABLE.iter().filter_map(|s| unpack(s.load(Ordering::Acquire))).collect()
}

/// The table for the checkpoint protocol: `sysv=m:V:R,q:V:R,…`.
pub fn report() -> String {
    let mut s = String::from("sysv=");
    for (i, (k, v, r)) in entries().into_iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push(k.letter() as char);
        s.push_str(&format!(":{v}:{r}"));
    }
    s
}

/// `kind:a:b` triples separated by commas (the protocol's table, `MIGRATE_SYSV_IDS`); the kind
/// letter is returned as is.
pub fn parse_triples(text: &[u8]) -> Vec<(u8, i32, i32)> {
    text.split(|&c| c == b',')
        .filter_map(|t| {
            let mut f = t.trim_ascii().split(|&c| c == b':');
            let letter = *f.next()?.first()?;
            let a = fs::parse_dec(f.next()?)? as i32;
            let b = fs::parse_dec(f.next()?)? as i32;
            Some((letter, a, b))
        })
        .collect()
}

/// A member's table from its `sysv=…` report.
pub fn parse_report(text: &[u8]) -> Vec<(Kind, i32, i32)> {
    parse_triples(text.strip_prefix(b"sysv=").unwrap_or(text))
        .into_iter()
        .filter_map(|(l, v, r)| Some((Kind::from_letter(l)?, v, r)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Dump

/// A frozen member of the tree: its real pid and its table.
pub struct Member {
    pub real: i32,
    pub table: Vec<(Kind, i32, i32)>,
}

/// What the dump found: the image's entries, and the objects' real ids (removed after a
/// checkpoint with --kill: they moved into the image).
pub struct Dumped {
    pub objects: Vec<SysvObject>,
    pub real_ids: Vec<(Kind, i32)>,
}

/// The rows of /proc/sysvipc/<name> (without the header), as whitespace-separated fields.
fn listing(name: &str) -> Vec<Vec<i64>> {
    let text = fs::read_file(format!("/proc/sysvipc/{name}").as_bytes()).unwrap_or_default();
    text.split(|&c| c == b'\n')
        .skip(1)
        .filter(|l| !l.trim_ascii().is_empty())
        .map(|l| l.split(|&c| c == b' ').filter(|w| !w.is_empty()).map(|w| fs::parse_dec(w).unwrap_or(-1)).collect())
        .collect()
}

fn describe(kind: Kind, key: i32, id: i32) -> String {
    if key == 0 {
        format!("System V {} {id} (private)", kind.noun())
    } else {
        format!("System V {} key {:#010x} (id {id})", kind.noun(), key as u32)
    }
}

const MSG_COPY: i32 = 0o40000;
const SHM_DEST: u32 = 0o1000;
/// A bound on the receive buffer (in words): a message larger than 64 MiB is refused.
const MAX_MESSAGE_WORDS: usize = 8 << 20;

/// Copies a segment's bytes through a read-only attachment of our own.
fn shm_contents(id: i32, size: usize) -> sys::SysResult<Vec<u8>> {
    let addr = sys::shmat(id, 0, libc::SHM_RDONLY)?;
    let mut out = alloc::vec![0u8; size];
    // SAFETY: the attachment maps `size` readable bytes at `addr` (the segment's size); it is
    // ours alone and detached right after the copy.
    unsafe {
        core::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), size);
        let _ = sys::shmdt(addr);
    }
    Ok(out)
}

/// The messages of a queue, in order, without consuming them (MSG_COPY). A kernel without
/// CONFIG_CHECKPOINT_RESTORE lacks MSG_COPY: then the queue is drained and refilled in order
/// (every member is frozen, nobody else should be using it).
fn msg_contents(id: i32, cbytes: usize) -> sys::SysResult<Vec<(i64, Vec<u8>)>> {
    let mut buf = alloc::vec![0u64; cbytes.max(8).div_ceil(8) + 2];
    let mut out = Vec::new();
    let mut n = 0i64;
    loop {
        match sys::msgrcv(id, &mut buf, n, libc::IPC_NOWAIT | MSG_COPY) {
            Ok(len) => {
                out.push((buf[0] as i64, bytes_of(&buf[1..])[..len].to_vec()));
                n += 1;
            }
            Err(sys::Errno(libc::ENOMSG)) => return Ok(out),
            Err(sys::Errno(libc::E2BIG)) if buf.len() < MAX_MESSAGE_WORDS => buf.resize(buf.len() * 2, 0),
            Err(sys::Errno(libc::ENOSYS)) if n == 0 => return drain_and_refill(id, &mut buf),
            Err(e) => return Err(e),
        }
    }
}

fn bytes_of(words: &[u64]) -> &[u8] {
    // SAFETY: u64s viewed as bytes: same memory, alignment 1, length times 8.
    unsafe { core::slice::from_raw_parts(words.as_ptr() as *const u8, words.len() * 8) }
}

fn drain_and_refill(id: i32, buf: &mut Vec<u64>) -> sys::SysResult<Vec<(i64, Vec<u8>)>> {
    let mut out: Vec<(i64, Vec<u8>)> = Vec::new();
    let result = loop {
        match sys::msgrcv(id, buf, 0, libc::IPC_NOWAIT) {
            Ok(len) => out.push((buf[0] as i64, bytes_of(&buf[1..])[..len].to_vec())),
            Err(sys::Errno(libc::ENOMSG)) => break Ok(()),
            Err(sys::Errno(libc::E2BIG)) if buf.len() < MAX_MESSAGE_WORDS => buf.resize(buf.len() * 2, 0),
            Err(e) => break Err(e),
        }
    };
    for (ty, text) in &out {
        let mut m = alloc::vec![0u64; text.len().div_ceil(8) + 1];
        m[0] = *ty as u64;
        // SAFETY: the destination holds text.len() bytes after the type word.
        unsafe { core::ptr::copy_nonoverlapping(text.as_ptr(), m[1..].as_mut_ptr() as *mut u8, text.len()) };
        sys::msgsnd(id, &m, text.len(), libc::IPC_NOWAIT)?;
    }
    result.map(|_| out)
}

/// Describes every System V object the frozen tree uses, with its contents.
pub fn dump(members: &[Member]) -> Result<Dumped, String> {
    let is_member = |pid: i64| pid > 0 && members.iter().any(|m| m.real as i64 == pid);
    let in_tables = |kind: Kind, real: i32| members.iter().any(|m| m.table.iter().any(|e| e.0 == kind && e.2 == real));
    // The id the tree's programs know the object by.
    let virt_of = |kind: Kind, real: i32| {
        members.iter().find_map(|m| m.table.iter().find(|e| e.0 == kind && e.2 == real).map(|e| e.1)).unwrap_or(real)
    };
    // Segments attached by members (their maps name them /SYSV<key>; the inode is the id).
    let mut attached: Vec<i32> = Vec::new();
    for m in members {
        let Ok(text) = fs::read_file(format!("/proc/{}/maps", m.real).as_bytes()) else { continue };
        for l in super::memory::parse_maps(&text) {
            if l.shared && l.name.starts_with("/SYSV") && !attached.contains(&(l.inode as i32)) {
                attached.push(l.inode as i32);
            }
        }
    }
    let mut out = Dumped { objects: Vec::new(), real_ids: Vec::new() };

    // key shmid perms size cpid lpid nattch ...
    for row in listing("shm") {
        let [key, id, _perms, _size, cpid, lpid, ..] = row[..] else { continue };
        let (key, id) = (key as i32, id as i32);
        let used = attached.contains(&id) || is_member(cpid) || is_member(lpid);
        if !(used || in_tables(Kind::Shm, id)) {
            continue;
        }
        let what = || describe(Kind::Shm, key, id);
        let ds = sys::shmctl_stat(id).map_err(|e| format!("cannot read {}: {e}", what()))?;
        // Tables keep a segment's entry after IPC_RMID (it stays usable while attached): a
        // removed segment no member has attached any more is not the tree's.
        if !used && ds.shm_perm.mode as u32 & SHM_DEST != 0 {
            continue;
        }
        let contents = shm_contents(id, ds.shm_segsz).map_err(|e| format!("cannot read {}: {e}", what()))?;
        out.objects.push(SysvObject::Shm {
            id: virt_of(Kind::Shm, id),
            key,
            mode: ds.shm_perm.mode as u32,
            size: ds.shm_segsz as u64,
            contents,
        });
        out.real_ids.push((Kind::Shm, id));
    }
    // key semid perms nsems ... (no pids: each semaphore's last operator, from GETPID)
    for row in listing("sem") {
        let [key, id, _perms, nsems, ..] = row[..] else { continue };
        let (key, id) = (key as i32, id as i32);
        let used = in_tables(Kind::Sem, id)
            || (0..nsems.max(0) as i32).any(|n| sys::semctl_getpid(id, n).is_ok_and(|p| is_member(p as i64)));
        if !used {
            continue;
        }
        let what = || describe(Kind::Sem, key, id);
        let ds = sys::semctl_stat(id).map_err(|e| format!("cannot read {}: {e}", what()))?;
        let mut values = alloc::vec![0u16; ds.sem_nsems as usize];
        sys::semctl_getall(id, &mut values).map_err(|e| format!("cannot read {}: {e}", what()))?;
        out.objects.push(SysvObject::Sem { id: virt_of(Kind::Sem, id), key, mode: ds.sem_perm.mode as u32, values });
        out.real_ids.push((Kind::Sem, id));
    }
    // key msqid perms cbytes qnum lspid lrpid ...
    for row in listing("msg") {
        let [key, id, _perms, cbytes, _qnum, lspid, lrpid, ..] = row[..] else { continue };
        let (key, id) = (key as i32, id as i32);
        if !(in_tables(Kind::Msg, id) || is_member(lspid) || is_member(lrpid)) {
            continue;
        }
        let what = || describe(Kind::Msg, key, id);
        let ds = sys::msgctl_stat(id).map_err(|e| format!("cannot read {}: {e}", what()))?;
        let messages = msg_contents(id, cbytes.max(0) as usize)
            .map_err(|e| format!("cannot read the messages of {}: {e}", what()))?;
        out.objects.push(SysvObject::Msg { id: virt_of(Kind::Msg, id), key, mode: ds.msg_perm.mode as u32, messages });
        out.real_ids.push((Kind::Msg, id));
    }
    Ok(out)
}

/// Removes objects that moved into an image (checkpoint with --kill).
pub fn remove(ids: &[(Kind, i32)]) {
    for &(kind, id) in ids {
        let _ = sys::ipc_rmid(kind.ctl_nr(), id);
    }
}

// ---------------------------------------------------------------------------------------------
// Restore

/// One entry of `MIGRATE_SYSV_IDS`: the object the program knew as `old` is now `new`.
/// `remove`: a segment that had been marked for removal (IPC_RMID while attached); it is
/// marked again once every process of the tree has attached it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recreated {
    pub kind: u32,
    pub old: i32,
    pub new: i32,
    pub remove: u32,
}

impl Recreated {
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_bits(self.kind as u64)
    }
}

/// Parses `MIGRATE_SYSV_IDS` (`m:old:new,s:old:new,q:old:new`; `M` is a segment to mark for
/// removal once attached).
pub fn parse_env(text: &str) -> Vec<Recreated> {
    parse_triples(text.as_bytes())
        .into_iter()
        .filter_map(|(l, old, new)| {
            let kind = Kind::from_letter(l)?;
            Some(Recreated { kind: kind as u32, old, new, remove: (l == b'M') as u32 })
        })
        .collect()
}

/// The new id of segment `old` after the resume.
pub fn new_shm_id(list: &[Recreated], old: i32) -> Option<i32> {
    list.iter().find(|r| r.kind() == Some(Kind::Shm) && r.old == old).map(|r| r.new)
}

/// In the restored process: the ids now stand for the recreated objects; ids of objects the
/// image did not carry stand for nothing.
pub fn adopt_restored(list: &[Recreated]) {
    for s in &TABLE {
        let cur = s.load(Ordering::Acquire);
        if let Some((k, v, _)) = unpack(cur) {
            if !list.iter().any(|r| r.kind() == Some(k) && r.old == v) {
                let _ = s.compare_exchange(cur, pack(k, v, GONE), Ordering::AcqRel, Ordering::Acquire);
            }
        }
    }
    for r in list {
        if let Some(k) = r.kind() {
            set(k, r.old, r.new);
        }
    }
}

/// Once every process of the tree has attached its segments: marks again those that had been
/// marked for removal.
pub fn remove_marked(list: &[Recreated]) {
    for r in list.iter().filter(|r| r.remove != 0) {
        let _ = sys::ipc_rmid(libc::SYS_shmctl, r.new);
    }
}

/// A restore that failed before the program ran: the recreated objects would only block a
/// retry (their keys taken), so they go.
pub fn remove_recreated(list: &[Recreated]) {
    for r in list {
        if let Some(k) = r.kind() {
            let _ = sys::ipc_rmid(k.ctl_nr(), r.new);
        }
    }
}
