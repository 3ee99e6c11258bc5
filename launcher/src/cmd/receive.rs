//! `migrate-resume --listen ADDR:PORT --secret-file F`: the daemon on the target host that
//! receives migrations from `migrate-checkpoint --to` (send.rs).
//!
//! Per connection (each in its own thread, so a slow or silent peer delays nobody; every read
//! has a timeout and every length is bounded): authenticate the peer before reading anything
//! else, logging a refusal; receive the header and the image into the spool directory (0700,
//! images 0600, renamed into place only when complete and verified); take the service address
//! if it moves; run `migrate-resume --ready-fd N IMAGE` in a session of its own; once every
//! process of the tree says it is restored, lift the image's network lock, announce the
//! address, let the tree run and answer `restored`. Any failure is answered `error …` (the
//! source then lets its program go on), the address is given back, and the image is kept for
//! a retry. One migration is restored at a time.
//!
//! Strangers are kept cheap: at most [`MAX_CONNECTIONS`] connections are served at once, at
//! most [`MAX_HANDSHAKES_PER_ADDRESS`] of them unauthenticated from one address (more are
//! closed at once, with a log line), and the handshake has a deadline however slowly the peer
//! sends (wire.rs).

use super::ipmove::{self, ServiceAddr};
use super::wire::{self, Channel, HandshakeError, Header, Key};
use crate::cli::ResumeArgs;
use crate::exit::{fail, OTHER, USAGE};
use anyhow::{bail, Context, Result};
use migrate_image::ImageReader;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The largest image the daemon accepts.
const MAX_IMAGE: u64 = 1 << 40;
/// How long a restore may take before the daemon gives up on it.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);
/// Connections served at once, authenticated or not: what a flood of connections can cost
/// (threads, descriptors).
const MAX_CONNECTIONS: usize = 64;
/// Connections from one address that may be in the handshake at once, so that one host
/// cannot take every slot.
const MAX_HANDSHAKES_PER_ADDRESS: usize = 8;

/// The connections being served: in total, and unauthenticated ones per address.
#[derive(Default)]
struct Slots(Mutex<(usize, HashMap<IpAddr, usize>)>);

/// One connection's place in [`Slots`], given back when dropped.
struct Slot {
    slots: Arc<Slots>,
    /// Still counted against its address (until authenticated).
    address: Option<IpAddr>,
}

impl Slots {
    fn take(self: &Arc<Self>, address: IpAddr) -> Result<Slot, String> {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_address) = &mut *held;
        if *total >= MAX_CONNECTIONS {
            return Err(format!("too many connections ({MAX_CONNECTIONS} are served at once)"));
        }
        let from = per_address.entry(address).or_insert(0);
        if *from >= MAX_HANDSHAKES_PER_ADDRESS {
            return Err(format!(
                "too many unauthenticated connections from {address} ({MAX_HANDSHAKES_PER_ADDRESS} at once)"
            ));
        }
        *from += 1;
        *total += 1;
        Ok(Slot { slots: self.clone(), address: Some(address) })
    }
}

impl Slot {
    /// The peer proved the secret: it no longer counts against its address.
    fn authenticated(&mut self) {
        if let Some(a) = self.address.take() {
            let mut held = self.slots.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = held.1.get_mut(&a) {
                *n -= 1;
                if *n == 0 {
                    held.1.remove(&a);
                }
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.authenticated();
        let mut held = self.slots.0.lock().unwrap_or_else(|p| p.into_inner());
        held.0 -= 1;
    }
}

/// Bytes free for us in `dir`'s file system (None if unknown).
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

fn log(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "migrate-resume: {msg}");
}

fn spool_dir(args: &ResumeArgs) -> Result<PathBuf> {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let dir = args.spool.clone().unwrap_or_else(|| PathBuf::from(format!("/var/tmp/migrate-spool-{uid}")));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(fail(USAGE, format!("cannot create the spool directory {}: {e}", dir.display()))),
    }
    let meta = std::fs::metadata(&dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make the spool directory {} private", dir.display()))?;
    }
    Ok(dir)
}

/// `--listen … --lazy`: the resumes this daemon runs bring memory in lazily.
static RESUME_LAZY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn listen(args: &ResumeArgs, addr: &str) -> Result<()> {
    RESUME_LAZY.store(args.lazy, std::sync::atomic::Ordering::Relaxed);
    let secret = args.secret_file.as_ref().ok_or_else(|| fail(USAGE, "--listen needs --secret-file"))?;
    let key = Key::from_file(secret).map_err(|e| fail(USAGE, format!("{e:#}")))?;
    let spool = spool_dir(args)?;
    let idle = args.idle_timeout.map_or(wire::IDLE, Duration::from_secs_f64);
    let listener =
        TcpListener::bind(addr).map_err(|e| fail(OTHER, format!("cannot listen on {addr}: {e}; is it in use?")))?;
    log(&format!("listening on {} for migrations (spool {})", listener.local_addr()?, spool.display()));
    let one_at_a_time = Arc::new(Mutex::new(()));
    // Each attempted migration's outcome (refused peers do not count), for --once.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<bool>();
    let slots = Arc::new(Slots::default());
    let acceptor = std::thread::spawn(move || loop {
        let (stream, peer) = match listener.accept() {
            Ok(conn) => conn,
            Err(e) => {
                log(&format!("accept failed: {e}"));
                // Out of descriptors, say: give the connections being served time to end.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let slot = match slots.take(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                log(&format!("refused {peer}: {why}"));
                continue;
            }
        };
        let (key, spool, gate, done) = (key.clone(), spool.clone(), one_at_a_time.clone(), done_tx.clone());
        let spawned = std::thread::Builder::new().name("migrate-peer".into()).spawn(move || {
            match serve(stream, peer, slot, idle, &key, &spool, &gate) {
                Ok(None) => {}
                Ok(Some(resumed)) => {
                    let _ = done.send(resumed);
                }
                Err(e) => {
                    log(&format!("{peer}: {e:#}"));
                    let _ = done.send(false);
                }
            }
        });
        if let Err(e) = spawned {
            log(&format!("refused {peer}: cannot start a thread for it: {e}"));
        }
    });
    if !args.once {
        let _ = acceptor.join();
        return Ok(());
    }
    match done_rx.recv() {
        Ok(true) => Ok(()),
        _ => Err(fail(OTHER, "the migration failed (see above)")),
    }
}

/// One peer. `Ok(None)`: refused before any migration began; `Ok(Some(resumed))`: a
/// migration was attempted.
fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    mut slot: Slot,
    idle: Duration,
    key: &Key,
    spool: &Path,
    gate: &Mutex<()>,
) -> Result<Option<bool>> {
    let peer = peer.to_string();
    let _ = stream.set_write_timeout(Some(idle));
    let mut channel = match Channel::server_within(stream, key, idle, wire::HANDSHAKE) {
        Ok(c) => c,
        Err(HandshakeError::WrongSecret) => {
            drop(slot);
            log(&format!("refused {peer}: authentication failed (wrong secret)"));
            return Ok(None);
        }
        Err(e) => {
            drop(slot);
            log(&format!("refused {peer}: {e}"));
            return Ok(None);
        }
    };
    slot.authenticated();
    // Memory sent ahead (pre-copy) comes first, while the program still runs over there.
    let mut store: Option<super::precopy::Store> = None;
    let (kind, header) = loop {
        let (kind, payload) = channel.recv()?;
        if kind != wire::PRE {
            break (kind, payload);
        }
        if store.is_none() {
            store = Some(super::precopy::Store::new(spool, MAX_IMAGE)?);
        }
        store.as_mut().expect("created above").add(&payload)?;
    };
    if kind != wire::HEADER || header.len() > 64 << 10 {
        bail!("the peer sent no valid header");
    }
    let header: Header = serde_json::from_slice(&header).context("the peer sent a malformed header")?;
    if header.bytes > MAX_IMAGE {
        let _ = channel.send(wire::RESULT, b"error the image is larger than this daemon accepts");
        bail!("refused an image of {} bytes (at most {MAX_IMAGE} are accepted)", header.bytes);
    }
    if let Some(free) = free_bytes(spool).filter(|&free| header.bytes > free) {
        let why = format!("the spool {} has {free} bytes free", spool.display());
        let _ = channel.send(wire::RESULT, format!("error {why}, the image needs {}", header.bytes).as_bytes());
        bail!("refused an image of {} bytes: {why}", header.bytes);
    }
    let ahead = store.as_ref().map_or(String::new(), |s| format!(", {} bytes of it sent ahead", s.bytes()));
    log(&format!("receiving {} bytes from {peer} ({}){ahead}", header.bytes, header.source));
    let result = receive_and_resume(&mut channel, &header, spool, gate, store.as_ref());
    let resumed = result.is_ok();
    match result {
        Ok(said) => log(&format!("{peer}: resumed {said}")),
        Err(e) => {
            let answer = format!("error {e:#}");
            log(&format!("{peer}: {answer}"));
            let _ = channel.send(wire::RESULT, answer.as_bytes());
        }
    }
    Ok(Some(resumed))
}

/// The two-phase end: the tree is restored but held; the source hears `restored`, kills its
/// own copy, and says `GO`; only then does ours run. No word (the source or the network died
/// in between): ours exits, so nothing runs twice.
fn hand_off(channel: &mut Channel, said: &str) -> Result<()> {
    channel.send(wire::RESULT, format!("restored {said}").as_bytes())?;
    channel.set_read_timeout(Duration::from_secs(60))?;
    match channel.recv() {
        Ok((wire::GO, _)) => Ok(()),
        Ok((kind, _)) => bail!("the source answered with a frame of kind {kind} instead of GO"),
        Err(e) => Err(e.context("the source did not confirm that its copy is gone")),
    }
}

fn receive_and_resume(
    channel: &mut Channel,
    header: &Header,
    spool: &Path,
    gate: &Mutex<()>,
    store: Option<&super::precopy::Store>,
) -> Result<String> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let part = spool.join(format!(".incoming-{nanos}.mig.part"));
    let image = spool.join(format!("incoming-{nanos}.mig"));
    let t0 = std::time::Instant::now();
    let received = (|| -> Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&part)
            .with_context(|| format!("cannot create {}", part.display()))?;
        let mut got = 0u64;
        loop {
            let (kind, data) = channel.recv()?;
            match kind {
                wire::DATA => {
                    got += data.len() as u64;
                    if got > header.bytes {
                        bail!("the peer sent more than the {} bytes it announced", header.bytes);
                    }
                    file.write_all(&data).with_context(|| format!("cannot write {}", part.display()))?;
                }
                wire::BLOCKS => {
                    let Some(store) = store else { bail!("the peer referred to memory it never sent ahead") };
                    got += store.decode(&data, &mut file, header.bytes - got)?;
                }
                wire::END if got == header.bytes => break,
                wire::END => bail!("the image ended after {got} of {} bytes", header.bytes),
                other => bail!("unexpected frame of kind {other} in the image"),
            }
        }
        // No fsync: the source keeps its program frozen until this copy runs, so a crash here
        // loses nothing, and flushing hundreds of MB would lengthen the freeze.
        Ok(())
    })();
    if let Err(e) = received {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, &image)?;
    log(&format!("image complete in {} ms", t0.elapsed().as_millis()));
    let _guard = gate.lock().unwrap_or_else(|p| p.into_inner());
    match resume_here(&image, header, channel) {
        Ok(said) => {
            // The program runs from memory now; the spool keeps nothing it no longer needs.
            let _ = std::fs::remove_file(&image);
            Ok(said)
        }
        Err(e) => Err(e.context(format!("the image is kept in {}", image.display()))),
    }
}

fn resume_here(image: &Path, header: &Header, channel: &mut Channel) -> Result<String> {
    // (Every checksum is verified by the migrate-resume run below, before anything is restored.)
    let reader = ImageReader::open(image)?;
    let tree = reader.tree()?;
    let processes = tree.processes.len();
    drop(reader);

    let mut taken: Option<(ServiceAddr, String)> = None;
    if let Some(text) = &header.move_ip {
        let a = ServiceAddr::parse(text)?;
        let dev = ipmove::route_device(a.addr)?;
        if ipmove::take(&a, &dev)? {
            taken = Some((a, dev));
        }
    }
    let result = run_resume(image, processes, &tree.network_lock, taken.as_ref(), channel);
    if result.is_err() {
        if let Some((a, dev)) = &taken {
            let _ = ipmove::drop_addr(a, dev);
        }
    }
    result
}

fn run_resume(
    image: &Path,
    processes: usize,
    lock: &str,
    address: Option<&(ServiceAddr, String)>,
    channel: &mut Channel,
) -> Result<String> {
    let (mut ours, theirs) = UnixStream::pair()?;
    // SAFETY: clearing close-on-exec on our own descriptor, for the child to inherit.
    unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) };
    let exe = std::env::current_exe().context("cannot find migrate-resume itself")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--ready-fd").arg(theirs.as_raw_fd().to_string());
    if RESUME_LAZY.load(std::sync::atomic::Ordering::Relaxed) {
        cmd.arg("--lazy");
    }
    cmd.arg(image);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe; the resumed program leads a session of its own.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start migrate-resume")?;
    drop(theirs);
    let child_pid = child.id();
    // Its stderr: warnings, or why it failed. Forwarded line by line (a resumed tree with an
    // exact-pid parent keeps it open for as long as it runs).
    let stderr = child.stderr.take().expect("piped");
    let (line_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(|l| l.ok()) {
            log(&format!("[pid {child_pid}] {}", line.trim_start_matches("migrate-resume: ")));
            let _ = line_tx.send(line);
        }
    });
    // Reaped whenever it ends: it is the program itself (or its exact-pid parent).
    std::thread::spawn(move || child.wait());

    let t0 = std::time::Instant::now();
    ours.set_read_timeout(Some(RESTORE_TIMEOUT))?;
    let mut seen = 0;
    let mut buf = [0u8; 64];
    while seen < processes {
        match ours.read(&mut buf) {
            Ok(0) | Err(_) => {
                let text: Vec<String> = lines.iter().collect();
                let errors: Vec<&String> = text.iter().filter(|l| l.contains("error")).collect();
                let why = if errors.is_empty() {
                    text.join("; ")
                } else {
                    errors.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("; ")
                };
                bail!("the resume failed: {}", why.trim());
            }
            Ok(n) => seen += n,
        }
    }
    if !lock.is_empty() {
        // Only where the image was taken (a resume on the same host); absent elsewhere.
        if let Err(e) = super::netlock::unlock(lock) {
            log(&format!("cannot lift network lock {lock}: {e}"));
        }
    }
    log(&format!("restored in {} ms, holding it until the source lets go", t0.elapsed().as_millis()));
    let said = format!(
        "as pid {child_pid} on {}",
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim()
    );
    if let Err(e) = hand_off(channel, &said) {
        // Closing our end without the word makes every process of the tree exit.
        drop(ours);
        return Err(e);
    }
    if let Some((a, dev)) = address {
        if let Err(e) = ipmove::announce(a.addr, dev) {
            log(&format!("{e:#}"));
        }
    }
    let _ = ours.write_all(&vec![1u8; processes]);
    Ok(said)
}
