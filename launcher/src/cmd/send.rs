//! `migrate-checkpoint --to HOST:PORT`: live migration of a tree to a `migrate-resume --listen`
//! daemon on another host, without a shared file system and without an image on the source's
//! disk.
//!
//! The hand-off is atomic:
//! 1. authenticate the daemon (wire.rs) before touching the program;
//! 2. hold the tree's TCP traffic (netlock.rs), then ask the tree for a *held* checkpoint into
//!    a memfd: it stays frozen once the image is written;
//! 3. give up the service address (`--move-ip`), stream the image, wait for the daemon's word;
//! 4. restored over there: `commit` — the frozen tree dies silently (its connections now live
//!    on the target); anything else (an error, the daemon gone, a timeout): take the address
//!    back, `abort` — the tree goes on where it was, its traffic is released. Nothing runs
//!    twice and nothing is lost.

use super::checkpoint::{check_process, connect, read_reply, set_timeout, target_of, wait_gone};
use super::ipmove::{self, ServiceAddr};
use super::precopy;
use super::wire::{self, Channel, HandshakeError, Key};
use crate::cli::CheckpointArgs;
use crate::exit::{fail, warn, CHECKPOINT, OTHER, USAGE};
use anyhow::{bail, Context, Result};
use std::io::{IsTerminal, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// How long the target may take to restore once it has the whole image.
const RESTORE_WAIT: Duration = Duration::from_secs(300);

fn memfd() -> Result<std::fs::File> {
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"migrate-image".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        bail!("cannot create a memory file for the image: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just created and own.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Sends `data` with descriptor `fd` attached (SCM_RIGHTS).
fn send_with_fd(stream: &UnixStream, data: &[u8], fd: i32) -> std::io::Result<()> {
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; zero is a valid start.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
    // SAFETY: the 32-byte control buffer holds one cmsg with one int.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut i32, fd);
    }
    // SAFETY: a complete msghdr pointing at live buffers.
    let r = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if (r as usize) < data.len() {
        (&*stream).write_all(&data[r as usize..])?;
    }
    Ok(())
}

/// Progress on a terminal (bytes, pages, rate), nothing otherwise. `total` 0: unknown.
struct Progress {
    on: bool,
    total: u64,
    what: &'static str,
    started: Instant,
    last: Instant,
}

impl Progress {
    fn new(total: u64) -> Self {
        let now = Instant::now();
        Progress { on: std::io::stderr().is_terminal(), total, what: "sent", started: now, last: now }
    }
    fn update(&mut self, done: u64) {
        let complete = self.total > 0 && done >= self.total;
        if !self.on || (self.last.elapsed() < Duration::from_millis(200) && !complete) {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let of = if self.total > 0 { format!(" of {:.1}", self.total as f64 / 1e6) } else { String::new() };
        eprint!(
            "\rmigrate-checkpoint: {} {:.1}{of} MB ({} pages), {:.0} MB/s   ",
            self.what,
            done as f64 / 1e6,
            done / 4096,
            done as f64 / 1e6 / secs
        );
        if complete {
            eprintln!();
        }
    }
    fn finish(&mut self, done: u64) {
        if self.on && done > 0 {
            self.total = done;
            self.last = self.started;
            self.update(done);
        }
    }
}

/// What the transfer achieved.
struct Sent {
    bytes: u64,
    /// Bytes that travelled during the freeze (all of them without pre-copy).
    frozen_bytes: u64,
    transfer: Duration,
    target_said: String,
}

/// Resident memory of the tree in bytes (VmRSS).
fn resident(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
        .filter_map(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<u64>().ok()))
        .sum::<u64>()
        * 1024
}

pub fn main(args: CheckpointArgs, to: &str) -> Result<()> {
    let secret = args
        .secret_file
        .as_ref()
        .ok_or_else(|| fail(USAGE, "--to needs --secret-file (the same secret as the daemon's)"))?;
    let key = Key::from_file(secret).map_err(|e| fail(USAGE, format!("{e:#}")))?;
    let move_ip =
        args.move_ip.as_deref().map(ServiceAddr::parse).transpose().map_err(|e| fail(USAGE, format!("{e:#}")))?;
    let pid = target_of(args.pid);
    check_process(pid)?;

    // The daemon first: a wrong secret or an absent target changes nothing here.
    let addr = to
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| fail(USAGE, format!("{to} is not a HOST:PORT address")))?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(|e| {
        fail(
            OTHER,
            format!("cannot reach the migrate daemon at {to}: {e}; is `migrate-resume --listen` running there?"),
        )
    })?;
    let _ = stream.set_nodelay(true);
    let mut channel = Channel::client(stream, &key).map_err(|e| match e {
        HandshakeError::WrongSecret => fail(
            OTHER,
            format!("the daemon at {to} refused us: authentication failed (is --secret-file the daemon's secret?)"),
        ),
        other => fail(OTHER, format!("cannot talk to the daemon at {to}: {other}")),
    })?;

    let started = Instant::now();
    // Memory first, while the program runs: the freeze then carries what changed.
    let tree = super::netlock::tree_of(pid);
    let mut known = std::collections::HashSet::new();
    // A compressed image travels whole: pre-copy sends raw 4 KiB pages, and no lz4 frame of
    // the image would ever match one (the memory would cross twice).
    let ahead = if args.precopy || (!args.no_precopy && !args.compress && resident(&tree) > 64 << 20) {
        let mut progress = Progress::new(0);
        progress.what = "sent ahead";
        let mut ahead = 0u64;
        let sent = precopy::run(&tree, &mut known, |batch| {
            ahead += batch.len() as u64;
            progress.update(ahead);
            channel.send(wire::PRE, batch)
        })
        .map_err(|e| fail(OTHER, format!("the migration to {to} failed before the program was stopped: {e:#}")))?;
        progress.finish(ahead);
        Some(sent)
    } else {
        None
    };
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
    let mut control = connect(pid, deadline)?;
    let lock = if args.no_network_lock { None } else { super::netlock::lock(pid) };
    let image = memfd()?;
    let mut request = format!(
        "checkpoint kill=1 bins={} {}hold=1 ",
        u8::from(args.with_binaries),
        if args.compress { "compress=1 " } else { "" }
    );
    if let Some(l) = &lock {
        request.push_str(&format!("lock={} ", l.name));
    }
    request.push_str("dir=\n");
    let asked = Instant::now();
    let held = set_timeout(&control, pid, deadline, args.timeout)
        .and_then(|_| send_with_fd(&control, request.as_bytes(), image.as_raw_fd()).context("sending the request"))
        .and_then(|_| read_reply(&mut control, pid, deadline, args.timeout));
    let held = held.and_then(|line| match line.strip_prefix("ok held ") {
        Some(n) => n.trim().parse::<u64>().with_context(|| format!("process {pid} answered {line:?}")),
        None => Err(fail(CHECKPOINT, line.trim_start_matches("error ").to_string())),
    });
    let bytes = match held {
        Ok(n) => n,
        Err(e) => {
            // Nothing was frozen for long, and the program goes on: so does its traffic.
            if let Some(l) = lock {
                l.release();
            }
            return Err(e);
        }
    };

    // From here on, anything that goes wrong puts everything back.
    let mut released_on: Option<String> = None;
    let outcome = (|| -> Result<Sent> {
        if let Some(a) = &move_ip {
            released_on = Some(ipmove::release(a)?);
        }
        transfer(&mut channel, &image, bytes, move_ip.as_ref(), &known)
    })();
    match outcome {
        Ok(sent) => {
            // The copy over there is restored and held: this one dies without a word to its
            // peers, then the copy may run.
            let _ = control.set_read_timeout(Some(Duration::from_secs(30)));
            let _ = control.write_all(b"commit\n");
            let mut rest = String::new();
            let _ = control.read_to_string(&mut rest);
            let gone = wait_gone(pid, Instant::now() + Duration::from_secs(30));
            if let Err(e) = channel.send(wire::GO, &[]) {
                if let Some(l) = lock {
                    l.release();
                }
                return Err(fail(
                    CHECKPOINT,
                    format!("process {pid} handed over, but the target at {to} could not be told to go on ({e:#}); the service is stopped — resume it from the target's spool"),
                ));
            }
            let downtime = asked.elapsed();
            if let Some(l) = lock {
                l.release();
            }
            if !gone {
                warn("checkpoint", &format!("process {pid} did not exit after the hand-off; kill it"));
            }
            report(&args, to, pid, &sent, ahead, started.elapsed(), downtime)
        }
        Err(e) => {
            if let (Some(a), Some(dev)) = (&move_ip, &released_on) {
                if let Err(e2) = ipmove::restore(a, dev) {
                    warn("checkpoint", &format!("cannot take {} back: {e2:#}", a.cidr()));
                }
            }
            let _ = control.set_read_timeout(Some(Duration::from_secs(30)));
            let _ = control.write_all(b"abort\n");
            let mut rest = String::new();
            let _ = control.read_to_string(&mut rest);
            if let Some(l) = lock {
                l.release();
            }
            Err(fail(CHECKPOINT, format!("the migration to {to} failed, process {pid} goes on here: {e:#}")))
        }
    }
}

fn transfer(
    channel: &mut Channel,
    image: &std::fs::File,
    bytes: u64,
    move_ip: Option<&ServiceAddr>,
    known: &std::collections::HashSet<u128>,
) -> Result<Sent> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    let header = wire::Header { bytes, move_ip: move_ip.map(|a| a.cidr()), source: host };
    channel.send(wire::HEADER, &serde_json::to_vec(&header)?)?;
    let t0 = Instant::now();
    let mut progress = Progress::new(bytes);
    let mut buf = vec![0u8; 1 << 20];
    let mut records = Vec::with_capacity(buf.len() + buf.len() / 1000 + 64);
    let mut off = 0u64;
    let mut frozen_bytes = 0u64;
    while off < bytes {
        let n = ((bytes - off) as usize).min(buf.len());
        image.read_exact_at(&mut buf[..n], off).context("reading the image back")?;
        if known.is_empty() {
            channel.send(wire::DATA, &buf[..n])?;
            frozen_bytes += n as u64;
        } else {
            // Blocks the target holds already travel as references.
            records.clear();
            frozen_bytes += precopy::encode(&buf[..n], known, &mut records);
            channel.send(wire::BLOCKS, &records)?;
        }
        off += n as u64;
        progress.update(off);
    }
    channel.send(wire::END, &[])?;
    let transfer = t0.elapsed();
    channel.set_read_timeout(RESTORE_WAIT)?;
    let (kind, said) = channel.recv().context("waiting for the target's result")?;
    let said = String::from_utf8_lossy(&said).into_owned();
    if kind != wire::RESULT {
        bail!("the daemon answered with a frame of kind {kind}");
    }
    match said.strip_prefix("restored") {
        Some(rest) => Ok(Sent { bytes, frozen_bytes, transfer, target_said: rest.trim().to_string() }),
        None => bail!("the target says: {}", said.trim_start_matches("error ")),
    }
}

fn report(
    args: &CheckpointArgs,
    to: &str,
    pid: i32,
    sent: &Sent,
    ahead: Option<precopy::Sent>,
    total: Duration,
    downtime: Duration,
) -> Result<()> {
    let rate = sent.bytes as f64 / 1e6 / sent.transfer.as_secs_f64().max(1e-6);
    let precopy_text = match ahead {
        Some(a) => format!(
            "; {:.1} MB sent ahead in {} rounds, {:.1} MB during the freeze",
            a.bytes as f64 / 1e6,
            a.rounds,
            sent.frozen_bytes as f64 / 1e6
        ),
        None => String::new(),
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = serde_json::json!({
            "migrated_to": to,
            "pid": pid,
            "image_bytes": sent.bytes,
            "transfer_seconds": sent.transfer.as_secs_f64(),
            "megabytes_per_second": rate,
            "frozen_seconds": downtime.as_secs_f64(),
            "frozen_bytes": sent.frozen_bytes,
            "precopy_bytes": ahead.map(|a| a.bytes),
            "precopy_rounds": ahead.map(|a| a.rounds),
            "seconds": total.as_secs_f64(),
            "target": sent.target_said,
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "migrated process {pid} to {to} ({}): {:.1} MB image in {:.3} s ({rate:.0} MB/s), frozen {:.3} s{precopy_text}",
            sent.target_said,
            sent.bytes as f64 / 1e6,
            sent.transfer.as_secs_f64(),
            downtime.as_secs_f64()
        )?;
    }
    Ok(())
}
