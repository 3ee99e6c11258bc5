//! The versioned metadata schema: one struct per kind of process resource.
//!
//! Format version 4 (compressed page sections: `VmaEntry::compression`). Versions 1 to 3 were
//! only written by development builds and are refused as too old. Fields are only ever appended in new versions (postcard is positional:
//! a new version bumps `FORMAT_VERSION` and old versions stay decodable through their own types).
//! Addresses are the program's own; PIDs are *virtual* (what the program saw when first started).

use serde::{Deserialize, Serialize};

/// Everything in an image except the page bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageMeta {
    pub host: HostEntry,
    pub process: ProcessEntry,
}

/// Where and when the checkpoint was taken; what the target must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostEntry {
    pub hostname: String,
    pub boot_id: String,
    pub kernel_release: String,
    pub tool_version: String,
    pub created_unix_ns: u64,
    pub cpu: CpuEntry,
    /// xxh3 of the [vdso] bytes, and its size.
    pub vdso_hash: u64,
    pub vdso_len: u64,
    pub clocks: ClockEntry,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuEntry {
    pub vendor: String,
    /// XCR0: the xsave features enabled by the kernel, which the signal frames contain.
    pub xfeatures: u64,
    /// Size of the xsave area (CPUID 0xD.0 EBX) the frames were written with.
    pub xsave_size: u32,
}

/// Clock readings taken while the program was frozen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClockEntry {
    pub monotonic_ns: u64,
    pub boottime_ns: u64,
    pub realtime_ns: u64,
}

/// How a file is recognised again at resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    /// xxh3 of the whole contents, recorded for mapped executables and libraries.
    pub hash: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessEntry {
    pub vpid: i32,
    pub vppid: i32,
    pub vpgid: i32,
    pub vsid: i32,
    /// `files` index of the executable.
    pub exe: u32,
    /// `files` index of libmigrate itself (must be the same build at resume).
    pub libmigrate: u32,
    /// LD_PRELOAD as the process had it: the layout depends on it.
    pub ld_preload: String,
    pub argv: Vec<String>,
    pub personality: u32,
    pub cwd: String,
    pub umask: u32,
    pub rlimits: Vec<RlimitEntry>,
    pub mm: MmEntry,
    pub auxv: Vec<u64>,
    pub files: Vec<FileIdentity>,
    pub vmas: Vec<VmaEntry>,
    pub threads: Vec<ThreadEntry>,
    pub fds: Vec<FdEntry>,
    pub signals: SignalsEntry,
    /// Virtual <-> real PID pairs known to the process (real as at checkpoint).
    pub pids: Vec<(i32, i32)>,
    /// Interval timers and POSIX timers (format version 2).
    pub timers: TimersEntry,
}

/// The process's timers, with the time that remained when it was frozen: a resume arms them
/// with that remainder (the stopped time does not count, as for interrupted sleeps).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimersEntry {
    /// setitimer/alarm: ITIMER_REAL (0), ITIMER_VIRTUAL (1), ITIMER_PROF (2), armed ones only.
    pub itimers: Vec<ItimerEntry>,
    /// timer_create timers, by their kernel id (glibc's timer_t for signal timers).
    pub posix: Vec<PosixTimerEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItimerEntry {
    pub which: i32,
    pub value_ns: u64,
    pub interval_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixTimerEntry {
    pub id: i32,
    pub clock: i32,
    /// sigev_notify as the kernel holds it (SIGEV_SIGNAL, SIGEV_NONE, | SIGEV_THREAD_ID).
    pub notify: i32,
    pub signo: i32,
    pub sival: u64,
    /// The thread a SIGEV_THREAD_ID timer signals (virtual tid).
    pub target_vtid: i32,
    /// Time left (0: disarmed) and period.
    pub value_ns: u64,
    pub interval_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RlimitEntry {
    pub resource: u32,
    pub cur: u64,
    pub max: u64,
}

/// The mm fields that PR_SET_MM_MAP sets (see prctl(2)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmEntry {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

pub const PROT_READ: u32 = 1;
pub const PROT_WRITE: u32 = 2;
pub const PROT_EXEC: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmaKind {
    /// libmigrate's tree registry (shared with the other processes): mapped anew, not stored.
    Registry,
    /// Private anonymous memory (incl. thread stacks, guard pages).
    Anon,
    /// Shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, /dev/zero shared).
    SharedAnon,
    /// File-backed, private (copy-on-write) mapping.
    FilePrivate,
    /// File-backed, shared mapping: the file holds the contents.
    FileShared,
    Heap,
    Stack,
    /// [vdso], [vvar], [vvar_vclock], [vsyscall]: provided by the kernel, never filled.
    Special,
    /// An attached System V shared memory segment (`/SYSV<key>` in the maps), known to the
    /// program as `id` (see `SysvObject::Shm`): the tree section holds its contents, a resume
    /// attaches the recreated segment here. No pages stored.
    SysvShm {
        id: i32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmaEntry {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: u32,
    pub kind: VmaKind,
    /// `files` index for file-backed mappings.
    pub file: Option<u32>,
    pub file_offset: u64,
    /// The name /proc/self/maps shows ("[heap]", a path, "").
    pub name: String,
    /// VmFlags from smaps that matter for restore (e.g. "gd" for grows-down).
    pub vm_flags: String,
    /// Page runs that hold data (page index relative to `start`, page count), ascending:
    /// every page the restore fills, wherever its bytes are.
    pub runs: Vec<(u64, u64)>,
    /// The pages of `runs` whose bytes an ancestor image holds (an incremental image: they had
    /// not changed since it was written), ascending and within `runs`. Every other page of
    /// `runs` is in this image's `Pages` section, in order.
    pub inherited: Vec<InheritedRun>,
    /// Section holding the runs' bytes, when any page is stored.
    pub data_section: Option<u32>,
    /// How the `Pages` section holds the runs (format version 4): raw pages, or lz4 frames
    /// (image/src/frames.rs).
    pub compression: PageCompression,
}

/// The encoding of a VMA's `Pages` section.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PageCompression {
    /// The runs' pages concatenated, page-aligned (`stored_pages() * PAGE_SIZE` bytes).
    #[default]
    None,
    /// Independent lz4 blocks of up to 16 pages each, then the frame table
    /// (`crate::frames`).
    Lz4,
}

/// Pages of a mapping that an ancestor image holds: `count` pages from page `first` of the
/// mapping are the `count` pages at byte `offset` of image `TreeMeta::ancestors[ancestor]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InheritedRun {
    pub first: u64,
    pub count: u64,
    pub ancestor: u32,
    pub offset: u64,
}

impl VmaEntry {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Pages with data, wherever they are stored.
    pub fn data_pages(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }

    /// Pages stored in this image's own `Pages` section.
    pub fn stored_pages(&self) -> u64 {
        self.data_pages() - self.inherited.iter().map(|r| r.count).sum::<u64>()
    }

    /// The runs, in order, split where the pages' bytes change place: this image's `Pages`
    /// section, or an ancestor (`inherited`).
    pub fn page_spans(&self) -> Vec<PageSpan> {
        let mut out = Vec::new();
        let mut stored = 0u64; // pages of this image's section before the span
        let mut inherited = self.inherited.iter().peekable();
        for &(first, count) in &self.runs {
            let mut page = first;
            let end = first + count;
            while page < end {
                while inherited.peek().is_some_and(|r| r.first + r.count <= page) {
                    inherited.next();
                }
                match inherited.peek() {
                    Some(r) if r.first <= page => {
                        let upto = (r.first + r.count).min(end);
                        let source = PageSource::Ancestor {
                            ancestor: r.ancestor,
                            offset: r.offset + (page - r.first) * crate::PAGE_SIZE,
                        };
                        out.push(PageSpan { first: page, end: upto, source });
                        page = upto;
                    }
                    next => {
                        let upto = next.map_or(end, |r| r.first.min(end));
                        out.push(PageSpan { first: page, end: upto, source: PageSource::Here { index: stored } });
                        stored += upto - page;
                        page = upto;
                    }
                }
            }
        }
        out
    }
}

/// Pages `first..end` of a mapping and where their bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSpan {
    pub first: u64,
    pub end: u64,
    pub source: PageSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSource {
    /// In this image's `Pages` section, from its `index`-th page on.
    Here { index: u64 },
    /// In ancestor `ancestor`, from byte `offset` of that image on.
    Ancestor { ancestor: u32, offset: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadEntry {
    pub vtid: i32,
    /// The thread that libmigrate runs checkpoints on (recreated like any other).
    pub is_checkpoint_thread: bool,
    pub fs_base: u64,
    /// glibc's cached tid field (PR_GET_TID_ADDRESS).
    pub tid_address: u64,
    pub robust_list: u64,
    pub robust_list_len: u64,
    /// Stack pointer of the saved jump context (callee-saved registers pushed below it).
    pub resume_sp: u64,
    pub name: String,
    /// CPU affinity mask words.
    pub affinity: Vec<u64>,
    /// Signals pending for this thread only.
    pub pending: Vec<SigInfoEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdEntry {
    pub fd: i32,
    pub cloexec: bool,
    /// Index (in `fds`) of the first descriptor sharing this one's open file description.
    pub shares_with: Option<u32>,
    pub kind: FdKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    /// Regular file: reopened by path at `pos` with `flags` (O_* status and access flags).
    Regular {
        file: u32,
        flags: u32,
        pos: u64,
    },
    /// A file deleted while open: its contents are in `FileContents { proc, file }`; resume
    /// recreates it as an open, unlinked file (or, with --keep-deleted, a visible one).
    Deleted {
        file: u32,
        flags: u32,
        pos: u64,
    },
    Directory {
        path: String,
        flags: u32,
        pos: u64,
    },
    /// /dev/null, /dev/zero, /dev/urandom, …
    CharDevice {
        path: String,
        rdev: u64,
        flags: u32,
    },
    /// A terminal, pipe or socket leading outside the checkpoint on a standard stream:
    /// connected to migrate-resume's own descriptor of the same number.
    Inherited {
        what: String,
        flags: u32,
    },
    /// A terminal on a standard stream: connected to migrate-resume's own, which gets the saved
    /// settings (`termios`: the raw `struct termios`); a program whose terminal is now another
    /// size gets SIGWINCH.
    Terminal {
        what: String,
        flags: u32,
        termios: Vec<u8>,
        rows: u16,
        cols: u16,
        /// The terminal's foreground process group (virtual; 0 if unknown): the member of that
        /// group makes it the foreground of migrate-resume's terminal again, so Ctrl-C/Ctrl-Z
        /// reach the job that had the terminal.
        foreground_vpgid: i32,
    },
    /// A network or Unix socket on its own (not a pair inside the tree): a listening or bound
    /// socket comes back bound at the same address with its options; an established TCP
    /// connection comes back from its repair state (`tcp`) so the peer notices nothing, or,
    /// without it, reset (ECONNRESET on next use) so the program reconnects.
    Socket {
        domain: i32,
        sock_type: i32,
        protocol: i32,
        flags: u32,
        listening: bool,
        backlog: i32,
        /// Raw `struct sockaddr` bytes of the local and (if connected) peer address.
        local: Vec<u8>,
        peer: Option<Vec<u8>>,
        /// (level, option, value) of the integer options that were set.
        options: Vec<(i32, i32, i32)>,
        /// A TCP listener's accept queue at checkpoint time: connections completed by the
        /// kernel but not yet accepted, and not carried in `queued` (resume reports them).
        waiting: u32,
        /// An established TCP connection's state, read with TCP repair (needs CAP_NET_ADMIN).
        tcp: Option<TcpConnection>,
        /// A listener's waiting connections that were taken out of its accept queue at a
        /// checkpoint with --kill and saved with TCP repair: after the resume, the program's
        /// next accept() calls return them.
        queued: Vec<QueuedConnection>,
    },
    /// eventfd: its counter and semaphore mode.
    EventFd {
        count: u64,
        semaphore: bool,
        flags: u32,
    },
    /// timerfd: clock, time left until the next expiry, interval, expirations not yet read.
    TimerFd {
        clock: i32,
        value_ns: u64,
        interval_ns: u64,
        ticks: u64,
        flags: u32,
    },
    /// signalfd: the signal mask it reads.
    SignalFd {
        mask: u64,
        flags: u32,
    },
    /// epoll instance: (target descriptor, events incl. EPOLLET/EPOLLONESHOT, user data).
    Epoll {
        flags: u32,
        targets: Vec<(i32, u32, u64)>,
    },
    /// pidfd of a process (by its virtual pid).
    PidFd {
        vpid: i32,
        flags: u32,
    },
    /// A named pipe, reopened by path without waiting for the other side.
    Fifo {
        path: String,
        flags: u32,
    },
    /// One end of a pipe whose both ends are in the checkpoint. `data` (on the first entry of
    /// each pipe) holds the bytes that were in flight; `capacity` is F_GETPIPE_SZ.
    Pipe {
        pipe: u64,
        write_end: bool,
        flags: u32,
        capacity: u32,
        data: Vec<u8>,
    },
    /// A pipe or socket whose other side was outside the checkpoint (not on a standard
    /// stream): restored as a disconnected descriptor — reads see end-of-file, writes EPIPE —
    /// so the program fails cleanly instead of talking to something else.
    Detached {
        what: String,
        write_end: bool,
        flags: u32,
    },
    /// Not restorable by this version; resume reports it (and maps it to /dev/null with --force).
    Unsupported {
        what: String,
    },
    /// An inotify instance (`flags`: O_NONBLOCK) and its watches, by ascending number: each
    /// comes back on its path with the number the program knows. Queued events are not carried.
    Inotify {
        flags: u32,
        watches: Vec<InotifyWatch>,
    },
}

/// One watch of an inotify instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InotifyWatch {
    /// The watch descriptor the program holds.
    pub wd: i32,
    /// Absolute path of the watched file or directory.
    pub path: String,
    /// The mask as the kernel holds it (IN_* events, IN_ONESHOT, IN_EXCL_UNLINK), plus
    /// IN_DONT_FOLLOW when the watch is on a symbolic link itself.
    pub mask: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalsEntry {
    /// Dispositions as the kernel holds them (rt_sigaction), signals 1..=64.
    pub actions: Vec<SigActionEntry>,
    /// Signals pending for the whole process, with their siginfo.
    pub shared_pending: Vec<SigInfoEntry>,
    /// The checkpoint signal libmigrate owns in this process.
    pub checkpoint_signal: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigActionEntry {
    pub signo: i32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigInfoEntry {
    pub signo: i32,
    /// The raw 128-byte siginfo_t.
    pub info: Vec<u8>,
}

/// A checkpointed process tree: every live process (its own `Meta { proc }` section), the
/// zombies their parents had not reaped, and the kernel objects several processes shared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeMeta {
    pub processes: Vec<TreeProcess>,
    pub zombies: Vec<ZombieEntry>,
    pub shared: Vec<SharedEntry>,
    /// Descriptor numbers from here up are free in every process: migrate-resume hands the
    /// shared objects down at `shared_fd_base + object index`.
    pub shared_fd_base: i32,
    /// System V IPC objects the tree uses (shared memory, semaphore sets, message queues).
    pub sysv: Vec<SysvObject>,
    /// The nftables table (`inet <name>`) that holds the tree's TCP traffic from the
    /// checkpoint until the resume (migrate-checkpoint --kill); empty if none. migrate-resume
    /// deletes it once the tree runs again.
    pub network_lock: String,
    /// A random number naming this image: an incremental image names its ancestors by it.
    pub image_id: u64,
    /// The images whose pages this one uses (`InheritedRun::ancestor` indexes it): its parent
    /// first, then the parent's ancestors; empty for a full image.
    pub ancestors: Vec<AncestorRef>,
}

/// An ancestor of an incremental image: its file name (in the same directory as the image
/// that names it) and its `image_id`, checked when it is opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AncestorRef {
    pub file: String,
    pub image_id: u64,
}

/// An established TCP connection as TCP repair reads it: enough to rebuild it so that the
/// peer notices nothing (sequence numbers, both queues, negotiated options, window).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpConnection {
    /// The sequence number after the last byte of the send queue (write_seq).
    pub send_seq: u32,
    /// The sequence number after the last byte of the receive queue (rcv_nxt).
    pub recv_seq: u32,
    /// Bytes sent but not acknowledged, then bytes not sent yet (the last `unsent` of them).
    pub send_queue: Vec<u8>,
    pub unsent: u32,
    /// Bytes received but not read by the program.
    pub recv_queue: Vec<u8>,
    /// The negotiated maximum segment size and window scales, and which options the
    /// handshake agreed on (TCPI_OPT_* bits: timestamps, SACK, window scaling).
    pub mss: u32,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    pub options: u8,
    /// The TCP timestamp clock as the peer sees it.
    pub timestamp: u32,
    /// struct tcp_repair_window: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    pub window: [u32; 5],
}

/// A connection that was waiting in a listener's accept queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedConnection {
    /// Raw `struct sockaddr` bytes of its local and peer address.
    pub local: Vec<u8>,
    pub peer: Vec<u8>,
    pub tcp: TcpConnection,
}

/// A System V IPC object, recreated with its key (its id changes: libmigrate translates).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SysvObject {
    Shm { id: i32, key: i32, mode: u32, size: u64, contents: Vec<u8> },
    Sem { id: i32, key: i32, mode: u32, values: Vec<u16> },
    Msg { id: i32, key: i32, mode: u32, messages: Vec<(i64, Vec<u8>)> },
}

/// A shared object and who holds it: (process index, descriptor number) pairs. For those
/// descriptors it overrides what the process's own `FdEntry` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedEntry {
    pub object: SharedObject,
    pub holders: Vec<(u32, i32)>,
}

/// One live process of the tree, in creation order (parents before children).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeProcess {
    pub vpid: i32,
    pub vppid: i32,
    pub vpgid: i32,
    pub vsid: i32,
}

/// A child that had exited but was not yet reaped: recreated as a zombie with its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZombieEntry {
    pub vpid: i32,
    pub vppid: i32,
    pub vpgid: i32,
    /// The wait status (as waitpid reports it).
    pub status: i32,
}

/// A kernel object (open file description) held by several processes of the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SharedObject {
    /// One end of a pipe; `data` (kept on the read end) is what was in flight.
    Pipe { pipe: u64, write_end: bool, flags: u32, capacity: u32, data: Vec<u8> },
    /// A regular file opened once and inherited: one offset for all holders.
    File { path: String, flags: u32, pos: u64 },
    /// One end of a connected pair of Unix sockets whose both ends are in the tree (`pair`
    /// names the pair; `end` is 0 or 1); `queued` is what was waiting to be read on this end.
    Socket { pair: u64, end: u8, sock_type: i32, flags: u32, queued: Vec<u8> },
    /// A socket (listening, bound, …) several processes hold, e.g. the listening socket of a
    /// pre-forking server: `socket` is its description (an `FdKind::Socket`), recreated once.
    NetSocket { socket: FdKind },
    /// Shared memory (MAP_SHARED|MAP_ANONYMOUS inherited across fork, a memfd, …) mapped by
    /// several processes: its `size` bytes are in section `Shared { object }`, and each
    /// (process, start address, file offset) in `mappings` maps it there again.
    Memory { size: u64, mappings: Vec<(u32, u64, u64)> },
}

/// The longest chain of ancestors an incremental image may use.
pub const MAX_ANCESTORS: usize = 16;

impl TreeMeta {
    pub fn validate(&self) -> Result<(), String> {
        if self.processes.is_empty() || self.processes.len() > 65536 {
            return Err(format!("{} processes", self.processes.len()));
        }
        if self.ancestors.len() > MAX_ANCESTORS {
            return Err(format!("{} ancestors (at most {MAX_ANCESTORS})", self.ancestors.len()));
        }
        // A bare file name in the image's own directory: an image never points elsewhere.
        if let Some(a) =
            self.ancestors.iter().find(|a| a.file.is_empty() || a.file.contains('/') || a.file.starts_with('.'))
        {
            return Err(format!("ancestor {:?} is not a plain image file name", a.file));
        }
        if self.shared.len() > 1 << 20 || self.shared_fd_base < 3 {
            return Err("bad shared object table".into());
        }
        for e in &self.shared {
            if e.holders.iter().any(|&(p, fd)| p as usize >= self.processes.len() || fd < 0) {
                return Err("a shared object names a process or descriptor that does not exist".into());
            }
        }
        Ok(())
    }

    /// Index of the process with virtual pid `vpid`.
    pub fn index_of(&self, vpid: i32) -> Option<usize> {
        self.processes.iter().position(|p| p.vpid == vpid)
    }
}

impl ImageMeta {
    /// Structural checks on decoded metadata: every index in range, every VMA sane.
    pub fn validate(&self) -> Result<(), String> {
        let p = &self.process;
        let nfiles = p.files.len() as u32;
        if p.exe >= nfiles || p.libmigrate >= nfiles {
            return Err("executable or libmigrate file index out of range".into());
        }
        let mut prev_end = 0u64;
        for (i, v) in p.vmas.iter().enumerate() {
            if v.start % crate::PAGE_SIZE != 0 || v.end % crate::PAGE_SIZE != 0 || v.end <= v.start {
                return Err(format!("vma {i} has a bad range {:#x}-{:#x}", v.start, v.end));
            }
            if v.start < prev_end {
                return Err(format!("vma {i} overlaps the one before it"));
            }
            if v.end > 0x7fff_ffff_f000 && v.kind != VmaKind::Special {
                return Err(format!("vma {i} lies outside user space"));
            }
            prev_end = v.end;
            if v.file.is_some_and(|f| f >= nfiles) {
                return Err(format!("vma {i} names file {} of {nfiles}", v.file.unwrap_or(0)));
            }
            if matches!(v.kind, VmaKind::FilePrivate | VmaKind::FileShared) && v.file.is_none() {
                return Err(format!("vma {i} is a file mapping without a file"));
            }
            // What the kernel, the file, the registry or the tree section provides: no pages of
            // its own (a restore would write them over the new registry or a shared segment).
            let provided =
                matches!(v.kind, VmaKind::Special | VmaKind::FileShared | VmaKind::Registry | VmaKind::SysvShm { .. });
            if provided && !v.runs.is_empty() {
                return Err(format!("vma {i} ({:?}) cannot have stored pages", v.kind));
            }
            let pages = v.len() / crate::PAGE_SIZE;
            let mut next = 0u64;
            for &(first, count) in &v.runs {
                if first < next || count == 0 || first.checked_add(count).is_none_or(|e| e > pages) {
                    return Err(format!("vma {i} has a bad page run ({first}, {count})"));
                }
                next = first + count;
            }
            // Inherited pages lie within the runs, in order, and within the ancestor list's
            // reach (checked against the tree by `TreeMeta::check_ancestors`).
            let mut next = 0u64;
            for r in &v.inherited {
                let end = r.first.checked_add(r.count);
                let inside = end.is_some_and(|e| v.runs.iter().any(|&(f, c)| f <= r.first && e <= f + c));
                if r.first < next || r.count == 0 || !inside || r.offset % crate::PAGE_SIZE != 0 {
                    return Err(format!("vma {i} has a bad inherited run ({}, {})", r.first, r.count));
                }
                next = r.first + r.count;
            }
        }
        for f in &p.fds {
            if let FdKind::Regular { file, .. } | FdKind::Deleted { file, .. } = f.kind {
                if file >= nfiles {
                    return Err(format!("fd {} names file {file} of {nfiles}", f.fd));
                }
            }
            if f.shares_with.is_some_and(|s| s as usize >= p.fds.len()) {
                return Err(format!("fd {} shares with a descriptor that does not exist", f.fd));
            }
            // Restoring numbers watches in ascending order, each number once.
            if let FdKind::Inotify { watches, .. } = &f.kind {
                let mut prev = 0;
                for w in watches {
                    if w.wd <= prev {
                        return Err(format!("inotify fd {} has watch {} out of order", f.fd, w.wd));
                    }
                    prev = w.wd;
                }
            }
        }
        if p.threads.is_empty() || p.threads.len() > 65536 {
            return Err(format!("{} threads", p.threads.len()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inotify_is_appended_after_every_older_descriptor_kind() {
        // postcard encodes a variant by its index: older variants must keep theirs.
        let old = postcard::to_allocvec(&FdKind::Unsupported { what: String::new() }).unwrap();
        assert_eq!(old[0], 15);
        let kind = FdKind::Inotify {
            flags: 0o4000,
            watches: vec![
                InotifyWatch { wd: 1, path: "/tmp/a".into(), mask: 0x100 },
                InotifyWatch { wd: 3, path: "/tmp/b c".into(), mask: 0x8000_0200 },
            ],
        };
        let bytes = postcard::to_allocvec(&kind).unwrap();
        assert_eq!(bytes[0], 16);
        assert_eq!(postcard::from_bytes::<FdKind>(&bytes).unwrap(), kind);
    }
}
