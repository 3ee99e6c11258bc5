//! The migration wire protocol between `migrate-checkpoint --to` (the source) and
//! `migrate-resume --listen` (the target daemon), over TCP.
//!
//! Authentication is mutual and proves knowledge of a shared secret without sending it: the
//! key is derived from the secret file with BLAKE3 (`derive_key`), each side sends a fresh
//! random nonce, and each proves the key with a keyed BLAKE3 MAC over both nonces and its role.
//! The session key is a MAC of both nonces, so every session has its own.
//!
//! After that, everything travels in frames `[kind u8][len u32 LE][payload][MAC 32]`, where the
//! MAC is keyed with the session key over a per-direction sequence number, the kind, the length
//! and the payload: a frame that was altered, replayed, reordered or cut is refused. Lengths
//! are bounded before anything is allocated. The payload is not encrypted (see
//! docs/SECURITY.md): run migrations over a network you trust, or a tunnel.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"MIGRATE1";
/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 4 << 20;
/// How long a peer may stay silent before it is dropped.
pub const IDLE: Duration = Duration::from_secs(30);
/// How long the daemon gives a peer for the whole handshake, however it spreads its bytes (or
/// the idle timeout, if shorter): a peer trickling one byte at a time cannot hold a thread.
pub const HANDSHAKE: Duration = Duration::from_secs(10);

/// Frame kinds.
pub const HEADER: u8 = 1;
pub const DATA: u8 = 2;
pub const END: u8 = 3;
pub const RESULT: u8 = 4;
/// The source's word that its copy is gone: the target's may run.
pub const GO: u8 = 5;
/// Pre-copy: whole 4 KiB blocks of memory sent ahead, before the header (precopy.rs).
pub const PRE: u8 = 6;
/// The image as records referring to blocks sent ahead (instead of DATA).
pub const BLOCKS: u8 = 7;

/// The key both sides derive from the shared secret file.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl Key {
    /// Reads the secret file: at least 16 bytes, at most 4 KiB, readable by its owner only
    /// (like ssh's private keys).
    pub fn from_file(path: &Path) -> Result<Key> {
        use std::os::unix::fs::MetadataExt;
        let meta =
            std::fs::metadata(path).with_context(|| format!("cannot read the secret file {}", path.display()))?;
        if meta.mode() & 0o077 != 0 {
            bail!(
                "the secret file {} is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                meta.mode() & 0o777
            );
        }
        if meta.len() > 4096 {
            bail!("the secret file {} is larger than 4 KiB; is it the right file?", path.display());
        }
        let text = std::fs::read(path).with_context(|| format!("cannot read the secret file {}", path.display()))?;
        let secret = text.trim_ascii();
        if secret.len() < 16 {
            bail!(
                "the secret in {} is shorter than 16 bytes; use e.g. `head -c 32 /dev/urandom | base64`",
                path.display()
            );
        }
        Ok(Key(blake3::derive_key("migrate 2026-11 peer authentication", secret)))
    }

    #[cfg(test)]
    fn test(secret: &[u8]) -> Key {
        Key(blake3::derive_key("migrate 2026-11 peer authentication", secret))
    }

    fn mac(&self, parts: &[&[u8]]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        for p in parts {
            h.update(p);
        }
        h.finalize()
    }
}

fn nonce() -> Result<[u8; 32]> {
    let mut n = [0u8; 32];
    // SAFETY: getrandom fills the buffer it is given.
    let r = unsafe { libc::getrandom(n.as_mut_ptr() as *mut libc::c_void, n.len(), 0) };
    if r != n.len() as isize {
        bail!("cannot get random bytes: {}", std::io::Error::last_os_error());
    }
    Ok(n)
}

/// Why a handshake failed: the peer proved no knowledge of the secret, or something else.
#[derive(Debug)]
pub enum HandshakeError {
    WrongSecret,
    Other(anyhow::Error),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::WrongSecret => write!(f, "authentication failed (the peer does not have the same secret)"),
            HandshakeError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        HandshakeError::Other(anyhow::Error::new(e).context("the peer went away during the handshake"))
    }
}

/// An authenticated connection.
pub struct Channel {
    stream: TcpStream,
    session: Key,
    sent: u64,
    received: u64,
    /// The read timeout: how long the next frame may take to begin, and then to arrive whole.
    wait: std::cell::Cell<Duration>,
}

impl Channel {
    /// The source's side: the daemon speaks first.
    pub fn client(mut stream: TcpStream, key: &Key) -> Result<Channel, HandshakeError> {
        stream.set_read_timeout(Some(IDLE))?;
        let mut hello = [0u8; 40];
        stream.read_exact(&mut hello)?;
        if &hello[..8] != MAGIC {
            return Err(HandshakeError::Other(anyhow::anyhow!("the peer is not a migrate daemon (or a newer one)")));
        }
        let theirs: [u8; 32] = hello[8..].try_into().expect("32 bytes");
        let ours = nonce().map_err(HandshakeError::Other)?;
        let proof = key.mac(&[b"client", &theirs, &ours]);
        let mut msg = Vec::with_capacity(72);
        msg.extend_from_slice(MAGIC);
        msg.extend_from_slice(&ours);
        msg.extend_from_slice(proof.as_bytes());
        stream.write_all(&msg)?;
        let mut answer = [0u8; 32];
        if stream.read_exact(&mut answer).is_err() {
            // A daemon that does not share the secret hangs up instead of proving anything.
            return Err(HandshakeError::WrongSecret);
        }
        if key.mac(&[b"server", &ours, &theirs]) != blake3::Hash::from(answer) {
            return Err(HandshakeError::WrongSecret);
        }
        let session = Key(*key.mac(&[b"session", &theirs, &ours]).as_bytes());
        Ok(Channel { stream, session, sent: 0, received: 0, wait: IDLE.into() })
    }

    /// The daemon's side.
    pub fn server(stream: TcpStream, key: &Key) -> Result<Channel, HandshakeError> {
        Channel::server_within(stream, key, IDLE, HANDSHAKE)
    }

    /// The daemon's side, with its idle timeout; the whole handshake must be over within
    /// `handshake` (or `idle`, if shorter), whatever the peer sends meanwhile.
    pub fn server_within(
        mut stream: TcpStream,
        key: &Key,
        idle: Duration,
        handshake: Duration,
    ) -> Result<Channel, HandshakeError> {
        let limit = handshake.min(idle);
        let deadline = Instant::now() + limit;
        let late = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => HandshakeError::Other(anyhow::anyhow!(
                "the peer did not complete the handshake within {}",
                seconds(limit)
            )),
            _ => HandshakeError::from(e),
        };
        let ours = nonce().map_err(HandshakeError::Other)?;
        let mut hello = Vec::with_capacity(40);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&ours);
        stream.write_all(&hello)?;
        let mut msg = [0u8; 72];
        // The magic first: anything else (an HTTP request, a scanner) is refused at once.
        read_by(&mut stream, &mut msg[..8], deadline).map_err(late)?;
        if &msg[..8] != MAGIC {
            return Err(HandshakeError::Other(anyhow::anyhow!("the peer does not speak the migrate protocol")));
        }
        read_by(&mut stream, &mut msg[8..], deadline).map_err(late)?;
        stream.set_read_timeout(Some(idle))?;
        let theirs: [u8; 32] = msg[8..40].try_into().expect("32 bytes");
        let proof: [u8; 32] = msg[40..].try_into().expect("32 bytes");
        if key.mac(&[b"client", &ours, &theirs]) != blake3::Hash::from(proof) {
            return Err(HandshakeError::WrongSecret);
        }
        stream.write_all(key.mac(&[b"server", &theirs, &ours]).as_bytes())?;
        let session = Key(*key.mac(&[b"session", &ours, &theirs]).as_bytes());
        Ok(Channel { stream, session, sent: 0, received: 0, wait: idle.into() })
    }

    pub fn set_read_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.stream.set_read_timeout(Some(t))?;
        self.wait.set(t);
        Ok(())
    }

    pub fn peer(&self) -> String {
        self.stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into())
    }

    /// Sends one frame.
    pub fn send(&mut self, kind: u8, payload: &[u8]) -> Result<()> {
        if payload.len() > MAX_FRAME {
            bail!("internal error: a frame of {} bytes", payload.len());
        }
        let head = frame_head(kind, payload.len());
        let mac = self.session.mac(&[b"frame", &self.sent.to_le_bytes(), &head, payload]);
        self.sent += 1;
        let mut out = Vec::with_capacity(5 + payload.len() + 32);
        out.extend_from_slice(&head);
        out.extend_from_slice(payload);
        out.extend_from_slice(mac.as_bytes());
        self.stream.write_all(&out).context("the peer went away")
    }

    /// Receives one frame: (kind, payload), authenticated.
    pub fn recv(&mut self) -> Result<(u8, Vec<u8>)> {
        let wait = self.wait.get();
        let mut head = [0u8; 5];
        self.stream.read_exact(&mut head).map_err(|e| eof_or_timeout(e, "a frame", wait))?;
        let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            bail!("the peer sent a frame of {len} bytes (at most {MAX_FRAME} are accepted)");
        }
        let mut body = vec![0u8; len + 32];
        // Once begun, the whole frame must arrive within the same time: a peer trickling
        // bytes cannot hold the connection.
        let whole = read_by(&mut self.stream, &mut body, Instant::now() + wait);
        self.stream.set_read_timeout(Some(wait)).context("cannot set the read timeout")?;
        whole.map_err(|e| match e.kind() {
            std::io::ErrorKind::TimedOut => {
                anyhow::anyhow!("the peer took more than {} to send a frame of {len} bytes", seconds(wait))
            }
            _ => eof_or_timeout(e, "a frame", wait),
        })?;
        let (payload, mac) = body.split_at(len);
        let want = self.session.mac(&[b"frame", &self.received.to_le_bytes(), &head, payload]);
        if want != blake3::Hash::from(<[u8; 32]>::try_from(mac).expect("32 bytes")) {
            bail!("a frame failed its authentication check (altered, replayed or cut)");
        }
        self.received += 1;
        body.truncate(len);
        Ok((head[0], body))
    }
}

fn frame_head(kind: u8, len: usize) -> [u8; 5] {
    let mut h = [0u8; 5];
    h[0] = kind;
    h[1..].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// Reads `buf` whole by `deadline`, however the peer spreads its bytes (a timeout is
/// `TimedOut`). Leaves the stream's read timeout changed.
fn read_by(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[at..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The read timeout never reaches past the deadline.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Err(std::io::ErrorKind::TimedOut.into()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// "30 s", "0.5 s".
fn seconds(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

fn eof_or_timeout(e: std::io::Error, what: &str, wait: Duration) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => anyhow::anyhow!("the peer closed the connection while sending {what}"),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            anyhow::anyhow!("the peer sent nothing for {}", seconds(wait))
        }
        _ => anyhow::Error::new(e).context(format!("reading {what}")),
    }
}

/// What the source announces before the image.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Header {
    /// The image's size in bytes.
    pub bytes: u64,
    /// The service address to take over (`ADDR/PREFIX`), if it moves.
    pub move_ip: Option<String>,
    /// The source host's name, for the daemon's log.
    pub source: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(server_key: Key, client_key: Key) -> (Result<Channel, HandshakeError>, Result<Channel, HandshakeError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || Channel::client(TcpStream::connect(addr).unwrap(), &client_key));
        let (s, _) = l.accept().unwrap();
        // A refused server drops the connection: the client then sees no proof.
        let server = Channel::server(s, &server_key);
        (server, t.join().unwrap())
    }

    #[test]
    fn same_secret_talks_and_frames_are_checked() {
        let (s, c) = pair(Key::test(b"0123456789abcdef"), Key::test(b"0123456789abcdef"));
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        c.send(HEADER, b"hello").unwrap();
        c.send(DATA, &[7u8; 1000]).unwrap();
        assert_eq!(s.recv().unwrap(), (HEADER, b"hello".to_vec()));
        assert_eq!(s.recv().unwrap(), (DATA, vec![7u8; 1000]));
        s.send(RESULT, b"restored").unwrap();
        assert_eq!(c.recv().unwrap(), (RESULT, b"restored".to_vec()));
    }

    #[test]
    fn a_wrong_secret_is_refused_on_both_sides() {
        let (s, c) = pair(Key::test(b"0123456789abcdef"), Key::test(b"fedcba9876543210"));
        assert!(matches!(s, Err(HandshakeError::WrongSecret)));
        assert!(matches!(c, Err(HandshakeError::WrongSecret)));
    }

    #[test]
    fn a_trickling_peer_is_cut_at_the_handshake_deadline() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // One byte every 50 ms: never idle for long, but never done either.
        let t = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let mut hello = [0u8; 40];
            s.read_exact(&mut hello).unwrap();
            for b in MAGIC.iter().chain([0u8; 64].iter()) {
                if s.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let (s, _) = l.accept().unwrap();
        let started = Instant::now();
        let key = Key::test(b"0123456789abcdef");
        let r = Channel::server_within(s, &key, Duration::from_secs(30), Duration::from_millis(300));
        let e = r.err().expect("refused").to_string();
        assert!(e.contains("did not complete the handshake within 0.3 s"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        t.join().unwrap();
    }

    #[test]
    fn anything_but_the_magic_is_refused_at_once() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            // Held open: the refusal must not wait for more bytes.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        });
        let (s, _) = l.accept().unwrap();
        let e = Channel::server(s, &Key::test(b"0123456789abcdef")).err().expect("refused").to_string();
        assert!(e.contains("does not speak the migrate protocol"), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn an_altered_frame_is_refused() {
        let (s, c) = pair(Key::test(b"0123456789abcdef"), Key::test(b"0123456789abcdef"));
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        // A frame whose MAC was made for another sequence number (a replay).
        c.sent = 5;
        c.send(DATA, b"x").unwrap();
        assert!(s.recv().unwrap_err().to_string().contains("authentication"));
    }
}
