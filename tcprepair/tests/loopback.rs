//! A real connection over loopback: saved with TCP repair, its socket closed silently, rebuilt
//! on a new socket; the client notices nothing and no byte is lost or repeated. Needs
//! CAP_NET_ADMIN (root in CI); says so and passes vacuously without it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::time::Duration;

fn sockaddr(a: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(v4) = a else { panic!("IPv4 expected") };
    let mut b = vec![0u8; 16];
    b[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    b[2..4].copy_from_slice(&v4.port().to_be_bytes());
    b[4..8].copy_from_slice(&v4.ip().octets());
    b
}

fn unread(s: &TcpStream) -> i32 {
    let mut n: i32 = 0;
    // SAFETY: FIONREAD writes one int.
    unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    n
}

#[test]
fn a_connection_moves_to_a_new_socket_with_its_queues() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (server, _) = listener.accept().unwrap();
    let (local, peer) = (server.local_addr().unwrap(), server.peer_addr().unwrap());
    // Unread by the server at the checkpoint: must come back in its receive queue.
    client.write_all(b"hello").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while unread(&server) < 5 {
        assert!(std::time::Instant::now() < deadline, "the bytes never arrived");
        std::thread::yield_now();
    }
    let saved = match migrate_tcprepair::dump(server.as_raw_fd()) {
        Ok(c) => c,
        Err(e) if e.not_permitted() => {
            eprintln!("skipped: TCP repair is not permitted here ({e})");
            return;
        }
        Err(e) => panic!("dump: {e}"),
    };
    assert_eq!(saved.recv_queue, b"hello");
    migrate_tcprepair::silence(server.as_raw_fd()).unwrap();
    drop(server); // no FIN, no RST: the client keeps its connection
    drop(listener);

    let fd = migrate_tcprepair::restore(libc::AF_INET, &sockaddr(local), &sockaddr(peer), &[], &saved).unwrap();
    // SAFETY: a descriptor restore() just returned, owned here.
    let mut rebuilt = unsafe { TcpStream::from_raw_fd(fd) };
    rebuilt.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 5];
    rebuilt.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello", "the unread bytes are back");
    rebuilt.write_all(b"world").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"world");
    client.write_all(b"again").unwrap();
    rebuilt.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"again");
    assert_eq!(rebuilt.peer_addr().unwrap(), peer);
    let _ = rebuilt.into_raw_fd();
}

#[test]
fn a_reset_socket_reports_econnreset() {
    let fd = migrate_tcprepair::reset_socket(libc::AF_INET).unwrap();
    // SAFETY: a descriptor reset_socket() just returned, owned here.
    let mut s = unsafe { TcpStream::from_raw_fd(fd) };
    let mut buf = [0u8; 1];
    let err = s.read(&mut buf).expect_err("the next use fails");
    assert_eq!(err.raw_os_error(), Some(libc::ECONNRESET));
}
