//! Moving a service's IPv4 address with it: the source host gives the address up once the
//! program is frozen, the target host takes it before the program is restored (its sockets
//! bind to it) and announces it with a gratuitous ARP, so that neighbours — clients on the
//! same link, or the gateway — send to the new host at once instead of waiting for their ARP
//! entries to expire. TCP repair then keeps every connection to that address.
//!
//! The alternative when the address cannot move (different subnets): keep a stable address on
//! a gateway or load balancer in front of both hosts and re-point it; see docs/ARCHITECTURE.md.

use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::process::Command;

/// `ADDR/PREFIX`, IPv4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAddr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl ServiceAddr {
    pub fn parse(text: &str) -> Result<ServiceAddr> {
        let (a, p) = text.split_once('/').unwrap_or((text, "32"));
        let addr: Ipv4Addr = match a.parse() {
            Ok(v) => v,
            Err(_) if a.contains(':') => {
                bail!("{text}: moving an IPv6 address is not supported yet; keep the address on a gateway instead")
            }
            Err(_) => bail!("{text} is not an IPv4 address with a prefix length (like 10.0.0.100/24)"),
        };
        let prefix: u8 = p.parse().ok().filter(|&p| p <= 32).with_context(|| format!("{text}: bad prefix length"))?;
        Ok(ServiceAddr { addr, prefix })
    }

    pub fn cidr(&self) -> String {
        format!("{}/{}", self.addr, self.prefix)
    }
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The interface that holds `addr` on this host, if any.
pub fn holder(addr: Ipv4Addr) -> Result<Option<String>> {
    let out = ip(&["-o", "-4", "addr", "show", "to", &addr.to_string()])?;
    // "2: eth0    inet 10.0.0.100/24 scope global eth0 ..."
    Ok(out.split_whitespace().nth(1).map(|d| d.trim_end_matches(':').to_string()))
}

/// The interface this host would use to reach `addr` (where the address goes on the target).
pub fn route_device(addr: Ipv4Addr) -> Result<String> {
    let out = ip(&["-o", "route", "get", &addr.to_string()])?;
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "dev" {
            if let Some(d) = words.next() {
                return Ok(d.to_string());
            }
        }
    }
    bail!("no route to {addr} on this host: cannot tell which interface should take it")
}

/// Gives the address up (the source, once its program is frozen). Returns the interface it
/// was on, to give it back if the migration fails.
pub fn release(a: &ServiceAddr) -> Result<String> {
    let Some(dev) = holder(a.addr)? else {
        bail!("{} is not an address of this host; --move-ip names the address the service listens on", a.addr)
    };
    ip(&["addr", "del", &a.cidr(), "dev", &dev])?;
    Ok(dev)
}

/// Takes the address (the target, before the restore) on `dev`; true if it was added here.
pub fn take(a: &ServiceAddr, dev: &str) -> Result<bool> {
    if holder(a.addr)?.is_some() {
        return Ok(false);
    }
    ip(&["addr", "add", &a.cidr(), "dev", dev])?;
    Ok(true)
}

/// Removes an address this host took (a failed migration, or a source taking it back).
pub fn drop_addr(a: &ServiceAddr, dev: &str) -> Result<()> {
    ip(&["addr", "del", &a.cidr(), "dev", dev]).map(|_| ())
}

/// Gives the address back to `dev` (the source, after a failed migration).
pub fn restore(a: &ServiceAddr, dev: &str) -> Result<()> {
    ip(&["addr", "add", &a.cidr(), "dev", dev]).map(|_| ())?;
    let _ = announce(a.addr, dev);
    Ok(())
}

/// The interface's Ethernet address (SIOCGIFHWADDR: this network namespace's view, unlike a
/// /sys that was mounted elsewhere).
fn hardware_address(dev: &str) -> Result<[u8; 6]> {
    // SAFETY: ifreq is plain data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if dev.len() >= req.ifr_name.len() {
        bail!("interface name {dev} is too long");
    }
    for (d, s) in req.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: a datagram socket for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("cannot open a socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR fills the ifreq it is given.
    let r = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let err = std::io::Error::last_os_error();
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    if r < 0 {
        bail!("cannot read the MAC address of {dev}: {err}");
    }
    // SAFETY: the kernel filled the hardware address member of the union.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    if sa.sa_family != libc::ARPHRD_ETHER {
        bail!("{dev} is not an Ethernet interface: cannot announce an address on it");
    }
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = *b as u8;
    }
    Ok(mac)
}

/// A gratuitous ARP request for `addr` from `dev`'s MAC address, broadcast: neighbours update
/// their ARP caches to point at this host.
pub fn announce(addr: Ipv4Addr, dev: &str) -> Result<()> {
    let name = std::ffi::CString::new(dev).context("bad interface name")?;
    let mac = hardware_address(dev)?;
    // SAFETY: a NUL-terminated interface name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {dev}");
    }
    let mut frame = Vec::with_capacity(42);
    frame.extend_from_slice(&[0xff; 6]); // to everyone
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&0x0806u16.to_be_bytes()); // ARP
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet, IPv4, request
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&addr.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&addr.octets()); // target = sender: gratuitous
                                             // SAFETY: a raw packet socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0x0806u16.to_be() as i32) };
    if fd < 0 {
        bail!("cannot open a packet socket to announce {addr}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain data.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = 0x0806u16.to_be();
    to.sll_ifindex = index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let mut result = Ok(());
    for _ in 0..2 {
        // SAFETY: the frame and a valid sockaddr_ll.
        let r = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &to as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            result = Err(anyhow::anyhow!("cannot announce {addr} on {dev}: {}", std::io::Error::last_os_error()));
        }
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_addresses() {
        assert_eq!(ServiceAddr::parse("10.0.0.100/24").unwrap().cidr(), "10.0.0.100/24");
        assert_eq!(ServiceAddr::parse("10.0.0.100").unwrap().prefix, 32);
        assert!(ServiceAddr::parse("10.0.0.100/33").is_err());
        assert!(ServiceAddr::parse("fd00::1/64").unwrap_err().to_string().contains("IPv6"));
    }
}
